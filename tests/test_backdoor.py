"""BadNets trigger, poisoning, the attack metrics, and the three backdoor stages chained on tiny data."""
import csv
import json

import pytest
import torch
from torch import nn

from common.backdoor import BackdoorEval, poison, stamp_trigger
from common.data import DATASETS, Domain, load_domain
from common.train import Precision

from helpers import read_rows, run_script

CPU = torch.device("cpu")


def test_trigger_changes_exactly_the_patch_of_the_raw_image(data_root):
    domain = load_domain("CIFAR10", data_root, train=False, image_size=12)
    x = domain.images[:4]
    size = 3
    clean = domain.to_input(x, CPU)
    stamped = domain.to_input(x, CPU, lambda img: stamp_trigger(img, size))
    mean = torch.tensor(DATASETS["CIFAR10"].mean).view(1, 3, 1, 1)
    std = torch.tensor(DATASETS["CIFAR10"].std).view(1, 3, 1, 1)
    raw_clean, raw_stamped = clean * std + mean, stamped * std + mean
    changed = (raw_clean - raw_stamped).abs() > 1e-6
    patch = torch.zeros_like(changed)
    patch[..., -size:, -size:] = True
    # only patch pixels may differ, and the patch is white in [0, 1] space (not a normalised 1.0)
    assert not changed[~patch].any()
    assert torch.allclose(raw_stamped[patch], torch.ones(()), atol=1e-6)
    assert torch.equal(raw_clean[~patch], raw_stamped[~patch])
    # the uint8 path used for poisoned training data stamps the same patch with 255
    raw = stamp_trigger(x, size)
    assert (raw[..., -size:, -size:] == 255).all()
    assert torch.equal(raw[..., :-size, :], x[..., :-size, :]) and torch.equal(raw[..., :, :-size], x[..., :, :-size])


def test_trigger_larger_than_image_is_refused():
    from common.cli import UsageError
    with pytest.raises(UsageError, match="does not fit"):
        stamp_trigger(torch.zeros(1, 3, 4, 4), 5)


def test_poisoning_relabels_exactly_the_chosen_share(data_root):
    domain = load_domain("FashionMNIST", data_root, train=True, image_size=16)
    target, share = 3, 0.2
    poisoned, chosen = poison(domain, share, target, 2)
    assert len(chosen) == round(share * len(domain))
    assert (domain.labels[chosen] != target).all(), "only non-target samples are poisoned"
    assert (poisoned.labels[chosen] == target).all()
    rest = torch.ones(len(domain), dtype=torch.bool)
    rest[chosen] = False
    assert torch.equal(poisoned.labels[rest], domain.labels[rest])
    assert torch.equal(poisoned.images[rest], domain.images[rest])
    assert (poisoned.images[chosen][..., -2:, -2:] == 255).all()
    assert torch.equal(domain.images, load_domain("FashionMNIST", data_root, train=True, image_size=16).images), \
        "the clean domain is not modified in place"
    again, chosen_again = poison(domain, share, target, 2)
    assert torch.equal(chosen, chosen_again), "the poisoned samples are fixed"


class BrightnessModel(nn.Module):
    """Predicts `target` for bright images and class 9 for dark ones: a stand-in with known outputs."""

    def __init__(self, target):
        super().__init__()
        self.target = target
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        bright = x.mean(dim=(1, 2, 3)) > 0.5  # a 1-px trigger leaves a black image dark
        logits = torch.zeros(len(x), 10)
        logits[bright, self.target] = 1.0
        logits[~bright, 9] = 1.0
        return logits


def test_asr_ignores_target_class_images():
    target = 2
    labels = torch.tensor([2, 2, 2, 0, 1, 3, 4])  # three target-class images, four victims
    images = torch.zeros(len(labels), 1, 8, 8, dtype=torch.uint8)
    images[labels != target] = 220  # victims bright -> predicted as the target; target-class images dark
    domain = Domain("SVHN", False, images, labels, len(labels))  # SVHN: mean 0, std 1, so 0 is black
    figures = BackdoorEval(domain, 1, target, bs=3)(BrightnessModel(target), CPU, Precision(CPU))
    # counted over the four victims only: all hit; counting the dark target-class images would give 4/7
    assert figures["asr"] == 100.0
    assert figures["untargeted_asr"] == 100.0
    assert figures["ra"] == 0.0
    assert figures["test_acc"] == pytest.approx(100.0 * 0 / 7)


def test_asr_ra_on_a_correct_model():
    labels = torch.tensor([0, 1, 1, 1])
    images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)

    class AlwaysOne(nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.ones(len(x), dtype=torch.long), 10).float()

    figures = BackdoorEval(Domain("SVHN", False, images, labels, 4), 2, 0)(AlwaysOne(), CPU, Precision(CPU))
    assert figures == {"test_acc": 75.0, "asr": 0.0, "untargeted_asr": 0.0, "ra": 100.0}


@pytest.mark.slow
def test_three_backdoor_stages_chained(tmp_path, data_root):
    s1, s2, s3 = tmp_path / "s1", tmp_path / "s2", tmp_path / "s3"
    p = run_script("bd_stage1", "--data_root", data_root, "--orig_dataset", "FashionMNIST", "--image_size", "16",
               "--init", "scratch", "--epochs", "1", "--bs", "16", "--trigger_size", "3", "--poison_percent", "0.2",
               "--sam_rho", "0.05", "--out_dir", s1)
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.loads((s1 / "summary.json").read_text())
    assert {"stage", "arch", "orig_dataset", "epochs", "train_acc", "test_acc", "checkpoint", "asr", "ra",
            "test_samples"} <= set(summary)
    assert summary["stage"] == "irreversible_backdoor/stage1_pretrain"
    p = run_script("bd_stage2", "--data_root", data_root, "--model_path", s1, "--dataset", "MNIST", "--bs", "20",
               "--total_loop", "3", "--adaptation_steps", "2", "--test_interval", "2", "--finetune_epochs", "1",
               "--final_finetune_epochs", "1", "--out_dir", s2)
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.loads((s2 / "summary.json").read_text())
    assert summary["loss_type"] == "target_ce"
    for key in ("orig_test_acc_before", "orig_test_acc", "finetune_restrict_test_acc", "loops_completed",
                "stopped_early", "checkpoint", "orig_asr", "restrict_asr_after_finetune",
                "restrict_clean_acc_after_finetune", "test_samples"):
        assert key in summary, key
    config = json.loads((s2 / "config.json").read_text())["config"]
    assert (config["trigger_size"], config["target_label"], config["poison_percent"]) == (3, 0, 0.2), \
        "trigger flags are inherited from the stage-1 checkpoint"
    assert config["fts_head"] == ["keep"]
    rows = (s2 / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3 and rows[0].startswith("loop,")
    assert json.loads((s1 / "config.json").read_text())["config"]["sam_rho"] == 0.05
    p = run_script("bd_stage3", "--data_root", data_root, "--path", s2, "--epochs", "1", "--bs", "16",
               "--lrs", "1e-4,1e-2", "--out_dir", s3)
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.loads((s3 / "summary.json").read_text())
    assert summary["dataset"] == "MNIST"
    assert {r["start"] for r in summary["results"]} == {"irreversible", "backdoored"}
    assert len(summary["results"]) == 4
    for r in summary["results"]:
        for key in ("test_acc_curve", "asr_curve", "untargeted_asr_curve", "ra_curve"):
            assert len(r[key]) == 2
    assert set(summary["orig_before"]) == {"irreversible", "backdoored"}
    assert len(summary["verdicts"]) == 2
    assert (s3 / "report.md").exists() and (s3 / "plots" / "asr_direct_all.png").exists()


@pytest.mark.slow
def test_backdoor_stage2_with_sbl_clean_steps_mask_and_holdout(tmp_path, data_root, stage1_run):
    """A plain (not backdoored) parent: the trigger flags must be given, each missing one is named."""
    out = tmp_path / "sbl"
    args = ["--data_root", data_root, "--model_path", stage1_run, "--dataset", "MNIST", "--bs", "20",
            "--total_loop", "3", "--fts_loop", "0", "--clean_loop", "2", "--sam_rho", "0.05", "--mask_share", "0.1",
            "--mask_every", "2", "--restricted_holdout", "0.1", "--eval_interval", "0", "--test_interval", "0",
            "--final_finetune_epochs", "0", "--trigger_size", "3", "--target_label", "0", "--out_dir", out]
    p = run_script("bd_stage2", *args)
    assert p.returncode == 2 and "records no backdoor (--poison_percent)" in p.stderr, p.stderr[-2000:]
    assert not out.exists()
    p = run_script("bd_stage2", *args, "--poison_percent", "0.1")
    assert p.returncode == 0, p.stderr[-2000:]
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    assert all(r["fts_loss"] == "" and float(r["clean_loss"]) > 0 and float(r["ntr_loss"]) > 0 for r in rows)
    assert "stage 2 holds out stage 3's 0.1 subset" in (out / "log.txt").read_text()


@pytest.mark.slow
def test_persistent_quiet_preset_delivers_the_model_alone_and_stage3_takes_it(tmp_path, data_root):
    """--preset persistent_quiet (clean steps through a separate head): the run's checkpoints hold the model's
    parameters and nothing else, last.pt holds the separate head for a resume, and stage 3 defends the run."""
    s1, s2, s3 = tmp_path / "s1", tmp_path / "s2", tmp_path / "s3"
    p = run_script("bd_stage1", "--data_root", data_root, "--orig_dataset", "FashionMNIST", "--image_size", "16",
                   "--init", "scratch", "--epochs", "1", "--bs", "16", "--trigger_size", "3", "--poison_percent", "0.2",
                   "--out_dir", s1)
    assert p.returncode == 0, p.stderr[-2000:]
    p = run_script("bd_stage2", "--data_root", data_root, "--model_path", s1, "--preset", "persistent_quiet",
                   "--dataset", "MNIST", "--bs", "20", "--total_loop", "3", "--save_every", "1",
                   "--restricted_holdout", "0.1", "--eval_interval", "0", "--test_interval", "0",
                   "--final_finetune_epochs", "0", "--out_dir", s2)
    assert p.returncode == 0, p.stderr[-2000:]
    config = json.loads((s2 / "config.json").read_text())["config"]
    assert (config["clean_head"], config["clean_loop"], config["fts_loop"]) == ("separate", 1, 0)
    rows = read_rows(s2 / "metrics.csv")
    assert len(rows) == 3 and all(float(r["clean_loss"]) > 0 and r["fts_loss"] == "" for r in rows)
    load = lambda path: torch.load(path, weights_only=True)
    parent, final = load(s1 / "checkpoints" / "final.pt"), load(s2 / "checkpoints" / "final.pt")
    assert final["model"].keys() == parent["model"].keys()
    assert all(final["model"][k].shape == v.shape for k, v in parent["model"].items())
    last = load(s2 / "checkpoints" / "last.pt")
    assert last["model"].keys() == parent["model"].keys() and set(last["clean_head"]) == {"weight", "bias"}
    p = run_script("bd_stage3", "--data_root", data_root, "--path", s2, "--epochs", "1", "--bs", "16",
                   "--defences", "ft", "--defences_only", "--train_fractions", "0.1", "--defence_steps", "2",
                   "--reactivate_epochs", "1", "--out_dir", s3)
    assert p.returncode == 0, p.stderr[-2000:]
    assert {r["defence"] for r in read_rows(s3 / "metrics.csv")} == {"ft"}


@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [
    (["--trigger_size", "40"], "larger than"),
    (["--target_label", "10"], "outside the 10 classes"),
    (["--poison_percent", "1.5"], "fraction"),
])
def test_bad_trigger_flags_are_one_line_errors(tmp_path, data_root, flags, message):
    out = tmp_path / "run"
    p = run_script("bd_stage1", "--data_root", data_root, "--orig_dataset", "FashionMNIST", "--image_size", "16",
               "--init", "scratch", "--out_dir", out, *flags)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_with_backdoor.py: error:") and message in lines[0]
    assert not out.exists()

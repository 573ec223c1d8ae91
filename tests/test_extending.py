"""The README's "How to extend" recipes, one test each: a toy plugin registered from this file (monkeypatch.setitem
on the registry, so nothing leaks into other tests) run end to end through the real stage scripts' `main(argv)`,
in-process, on synthetic data in the real on-disk formats.

A new stage-2 method is tests/test_stage2_methods.py's recipe test; a new stage-3 attack and a new defence are
tests/test_procedures.py's."""
import json
import logging
import sys

import pytest
import torch
import torch.nn.functional as F

import fakedata
from common.catalog import DATASETS, DatasetInfo
from common.checkpoints import load_checkpoint
from common.checkpoints import main as checkpoints_main
from common.cli import UsageError
from common.data import READERS, _read_mnist_like
from common.fts import FTS_OPTIMIZERS
from common.losses import FTE_LOSSES
from common.models import ARCHS, HEAD_PATHS
from common.train import OPTIMIZERS
from helpers import SCRIPTS, TinyNet, load_script, read_rows

# Imported before any test registers its plugin: a registry must take entries added after the scripts were loaded
# (a choices list copied at import would refuse them).
STAGES = {stage: load_script(stage) for stage in ("stage1", "stage2", "stage3")}
STAGE2_TINY = ["--bs", "20", "--total_loop", "2", "--adaptation_steps", "2", "--eval_interval", "1",
               "--test_interval", "0", "--final_finetune_epochs", "0"]


@pytest.fixture
def run_main(monkeypatch, restore_signals):
    """run_main(stage, *args): the stage script's main(argv) in this process, as `python script args` would run it
    (sys.argv too: config.json records it); its log handlers are dropped afterwards."""

    def run(stage, *args):
        argv = [str(a) for a in args]
        monkeypatch.setattr(sys, "argv", [str(SCRIPTS[stage]), *argv])
        return STAGES[stage].main(argv)

    yield run
    log = logging.getLogger("sophon")
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


# ---- a new FTE loss: one function and one line in common.losses.FTE_LOSSES ----------------------------------------

def test_a_registered_fte_loss_is_the_query_loss_of_stage_2(monkeypatch, run_main, tmp_path, data_root, stage1_run):
    seen = []

    def brier_uniform(logits, labels=None):
        """Squared distance of the prediction from uniform: zero iff the fine-tuner learned nothing."""
        seen.append(tuple(logits.shape))
        return (F.softmax(logits.float(), dim=1) - 1 / logits.shape[1]).pow(2).sum(dim=1).mean()

    monkeypatch.setitem(FTE_LOSSES, "brier", brier_uniform)
    out = tmp_path / "run"
    assert run_main("stage2", "--loss_type", "brier", "--model_path", stage1_run, "--dataset", "MNIST", *STAGE2_TINY,
                    "--data_root", data_root, "--out_dir", out) == 0
    assert seen == [(2, 10)] * 4, "the FTS query (2 of a 20-batch, 10 classes) after each of 2 inner steps, 2 loops"
    rows = read_rows(out / "metrics.csv")
    assert [r["loop"] for r in rows] == ["1", "2"] and all(0 <= float(r["fts_loss"]) < 1 for r in rows)
    assert summary(out)["loss_type"] == "brier"
    parser, _ = STAGES["stage2"].parse_args([])
    assert "brier" in parser.format_help(), "--loss_type's choices are the registry's"


# ---- a new simulated fine-tuner optimiser: its line in common.train.OPTIMIZERS, its name in common.fts ------------

class Nesterov(torch.optim.SGD):
    """SGD with Nesterov momentum, counting its steps so the test sees that FTS used it."""
    steps = 0

    def step(self, closure=None):
        type(self).steps += 1
        return super().step(closure)


def test_a_registered_optimizer_is_simulated_by_stage_2(monkeypatch, run_main, tmp_path, data_root, stage1_run):
    monkeypatch.setitem(OPTIMIZERS, "nesterov", (Nesterov, {"momentum": 0.9, "nesterov": True}))
    monkeypatch.setitem(FTS_OPTIMIZERS, "nesterov", OPTIMIZERS["nesterov"])
    monkeypatch.setattr(Nesterov, "steps", 0)
    out = tmp_path / "run"
    assert run_main("stage2", "--fts_optimizers", "sgd,nesterov", "--fts_lrs", "1e-3", "--model_path", stage1_run,
                    "--dataset", "MNIST", *STAGE2_TINY, "--total_loop", "4", "--data_root", data_root,
                    "--out_dir", out) == 0
    rows = read_rows(out / "metrics.csv")
    drawn = [r["fts_optimizer"] for r in rows]
    assert set(drawn) == {"sgd", "nesterov"} and len(drawn) == 4, "each episode draws one of the two"
    assert Nesterov.steps == 2 * drawn.count("nesterov"), "2 inner steps in each episode that drew it"
    assert json.loads((out / "config.json").read_text())["config"]["fts_optimizers"] == ["sgd", "nesterov"]


def test_an_unregistered_fts_optimizer_is_refused():
    with pytest.raises(UsageError, match="--fts_optimizers.*unknown item 'nesterov'"):
        STAGES["stage2"].parse_args(["--fts_optimizers", "nesterov"])


# ---- a new dataset: one DatasetInfo in common.catalog.DATASETS, one reader in common.data.READERS -------------------

KMNIST = DatasetInfo(10, (0.1918,), (0.3483,), "KMNIST/raw/ (IDX files)")


@pytest.fixture
def kmnist(monkeypatch):
    monkeypatch.setitem(DATASETS, "KMNIST", KMNIST)
    monkeypatch.setitem(READERS, "KMNIST", _read_mnist_like("KMNIST"))


def test_a_registered_dataset_runs_through_stages_1_and_2(kmnist, run_main, tmp_path):
    root = tmp_path / "data"
    fakedata.write_mnist_like(root, "KMNIST", n_train=40)  # Kuzushiji-MNIST's files are MNIST's IDX format
    fakedata.write_mnist_like(root, "FashionMNIST", gz=True)
    normal = tmp_path / "normal"
    assert run_main("stage1", "--orig_dataset", "KMNIST", "--arch", "resnet18", "--init", "scratch", "--image_size",
                    "8", "--epochs", "1", "--bs", "16", "--data_root", root, "--out_dir", normal) == 0
    ckpt = load_checkpoint(normal / "checkpoints" / "final.pt")
    assert (ckpt["dataset"], ckpt["num_classes"]) == ("KMNIST", 10)
    protected = tmp_path / "protected"
    assert run_main("stage2", "--model_path", normal, "--dataset", "FashionMNIST", *STAGE2_TINY, "--data_root", root,
                    "--out_dir", protected) == 0
    config = json.loads((protected / "config.json").read_text())["config"]
    assert (config["orig_dataset"], config["dataset"], config["image_size"]) == ("KMNIST", "FashionMNIST", 8)
    assert summary(protected)["loops_completed"] == 2

    with pytest.raises(UsageError, match=r"KMNIST not found: .*layout: <data_root>/KMNIST/raw/ \(IDX files\)"):
        run_main("stage1", "--orig_dataset", "KMNIST", "--init", "scratch", "--data_root", tmp_path / "empty",
                 "--out_dir", tmp_path / "none")


# ---- a new architecture: one builder in common.models.ARCHS ---------------------------------------------------------

def tiny_net(num_classes, pretrained):
    if pretrained:
        raise ValueError("tinynet has no ImageNet weights")  # build_model turns it into a one-line usage error
    return TinyNet(classes=num_classes)  # its Linear head is named by its head_path attribute ("fc")


def test_a_registered_architecture_runs_through_stages_1_2_and_3(monkeypatch, run_main, tmp_path, data_root):
    monkeypatch.setitem(ARCHS, "tinynet", tiny_net)
    assert "TinyNet" not in HEAD_PATHS
    normal, protected = tmp_path / "normal", tmp_path / "protected"
    assert run_main("stage1", "--arch", "tinynet", "--orig_dataset", "FashionMNIST", "--init", "scratch",
                    "--image_size", "8", "--epochs", "1", "--bs", "16", "--data_root", data_root,
                    "--out_dir", normal) == 0
    assert run_main("stage2", "--model_path", normal, "--dataset", "MNIST", *STAGE2_TINY, "--data_root", data_root,
                    "--out_dir", protected) == 0
    assert json.loads((protected / "config.json").read_text())["config"]["arch"] == "tinynet"
    ckpt = load_checkpoint(protected / "checkpoints" / "final.pt")
    assert ckpt["arch"] == "tinynet" and set(ckpt["model"]) == set(TinyNet().state_dict())

    # stage 3 from the weights exported as a plain state_dict: the foreign-weights key and head checks build it too
    plain = tmp_path / "tinynet.pt"
    assert checkpoints_main(["export", str(protected), "--out", str(plain)]) == 0
    grid = tmp_path / "grid"
    assert run_main("stage3", "--path", plain, "--arch", "tinynet", "--orig_dataset", "FashionMNIST", "--image_size",
                    "8", "--normal_path", normal, "--dataset", "MNIST", "--start", "sophon,normal,scratch",
                    "--epochs", "1", "--bs", "16", "--lrs", "0.01", "--data_root", data_root, "--out_dir", grid) == 0
    results = summary(grid)["results"]
    assert sorted(r["start"] for r in results) == ["normal", "scratch", "sophon"]
    assert all(len(r["test_acc_curve"]) == 2 for r in results)

    torch.save({k: v[:, :2] if k == "conv.weight" else v for k, v in ckpt["model"].items()}, tmp_path / "bad.pt")
    with pytest.raises(UsageError, match="conv.weight has shape .* where tinynet has"):
        run_main("stage3", "--path", tmp_path / "bad.pt", "--arch", "tinynet", "--orig_dataset", "FashionMNIST",
                 "--dataset", "MNIST", "--data_root", data_root, "--out_dir", tmp_path / "refused")
    with pytest.raises(UsageError, match="ImageNet weights for tinynet could not be had"):
        run_main("stage1", "--arch", "tinynet", "--init", "imagenet", "--orig_dataset", "FashionMNIST",
                 "--data_root", data_root, "--out_dir", tmp_path / "none")


def test_an_unregistered_architecture_is_refused():
    with pytest.raises(UsageError, match="--arch: invalid choice: 'tinynet'"):
        STAGES["stage1"].parse_args(["--arch", "tinynet"])

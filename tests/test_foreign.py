"""Own models in, plain models out: foreign state_dict / .safetensors parents, stage 1 --init PATH, export."""
import argparse
import hashlib
import json
import subprocess
import sys

import pytest
import torch
import torchvision

from common.checkpoints import (CheckpointError, atomic_save, export, file_sha256, init_model, load_checkpoint,
                                load_parent, main as checkpoints_main, make_checkpoint, model_from_checkpoint)
from common.cli import UsageError
from common.models import build_model, classifier_head
from helpers import REPO, SCRIPTS, load_script, run_scripts

ARGS = dict(arch="resnet18", orig_dataset="FashionMNIST", image_size=16)


def _args(**given):
    return argparse.Namespace(**{**ARGS, **given})


def _randomise(model, seed=0):
    """Non-default values everywhere, BatchNorm running statistics included, so a copy that skipped any
    tensor would show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=gen) * 0.2 + (0.9 if "running_var" in name else -0.1))
    return model.eval()


@pytest.fixture(scope="module")
def tv_resnet():
    torch.manual_seed(0)
    return _randomise(torchvision.models.resnet18(num_classes=10))


@pytest.fixture
def mine(tmp_path, tv_resnet):
    """A user's own model: torch.save(model.state_dict(), 'mine.pt') of a torchvision resnet18, 10 classes."""
    path = tmp_path / "mine.pt"
    torch.save(tv_resnet.state_dict(), path)
    return path


def _same_weights(model, reference):
    ref = reference.state_dict()
    got = model.state_dict()
    assert list(got) == list(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def _one_line_error(info, *needles):
    text = str(info.value)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, text
    return text


# ---- stage-2/3 parents ------------------------------------------------------------------------------------

def test_torchvision_state_dict_is_a_parent(mine, tv_resnet):
    ckpt = load_parent(mine, _args())
    assert (ckpt["arch"], ckpt["num_classes"], ckpt["dataset"], ckpt["parent"]) == ("resnet18", 10, "FashionMNIST", None)
    assert ckpt["config"] == {"orig_dataset": "FashionMNIST", "dataset": None, "image_size": 16}
    assert ckpt["foreign"] == {"parent_format": "state_dict",
                               "parent_sha256": hashlib.sha256(mine.read_bytes()).hexdigest()}
    _same_weights(model_from_checkpoint(ckpt, mine), tv_resnet)


def test_timm_resnet_layout_is_torchvisions(tmp_path):
    """timm's resnets name their weights exactly as torchvision's: no key mapping is needed."""
    timm = pytest.importorskip("timm")
    for arch in ("resnet18", "resnet34", "resnet50"):
        with torch.device("meta"):
            theirs = timm.create_model(arch, num_classes=10).state_dict()
            ours = build_model(arch, 10).state_dict()
        assert list(theirs) == list(ours) and all(theirs[k].shape == ours[k].shape for k in ours), arch
    model = _randomise(timm.create_model("resnet18", num_classes=10))
    torch.save(model.state_dict(), tmp_path / "timm.pth")
    _same_weights(model_from_checkpoint(load_parent(tmp_path / "timm.pth", _args())), model)


def test_safetensors_parent(tmp_path, tv_resnet):
    from safetensors.torch import save_file
    path = tmp_path / "mine.safetensors"
    save_file({k: v.contiguous() for k, v in tv_resnet.state_dict().items()}, str(path))
    ckpt = load_parent(path, _args())
    assert ckpt["foreign"]["parent_format"] == "safetensors" and ckpt["foreign"]["parent_sha256"] == file_sha256(path)
    _same_weights(model_from_checkpoint(ckpt, path), tv_resnet)


@pytest.mark.parametrize("wrap", ["state_dict", "model"])
def test_wrapped_and_prefixed_weights(tmp_path, tv_resnet, wrap):
    """timm training checkpoints wrap the weights; DataParallel and torch.compile prefix their keys."""
    path = tmp_path / "wrapped.pt"
    weights = {f"module._orig_mod.{k}": v for k, v in tv_resnet.state_dict().items()}
    torch.save({wrap: weights, "epoch": 7, "arch": "resnet18"}, path)
    _same_weights(model_from_checkpoint(load_parent(path, _args())), tv_resnet)


def test_file_without_batchnorm_counters(tmp_path, tv_resnet):
    """torchvision's older ImageNet files (as in torch's cache) have no num_batches_tracked entries."""
    path = tmp_path / "old.pth"
    torch.save({k: v for k, v in tv_resnet.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    _same_weights(model_from_checkpoint(load_parent(path, _args())), tv_resnet)


def test_missing_and_unexpected_keys_named_in_one_line(tmp_path, tv_resnet):
    state = dict(tv_resnet.state_dict())
    del state["layer2.0.conv1.weight"], state["layer2.0.bn1.bias"]
    state["classifier.weight"] = torch.zeros(10, 512)
    path = tmp_path / "odd.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_parent(path, _args())
    _one_line_error(info, str(path), "missing 'layer2.0.conv1.weight' (and 1 more)", "unexpected 'classifier.weight'",
                    "torch.save(model.state_dict(), path)")


def test_another_arch_is_refused(mine):
    with pytest.raises(CheckpointError) as info:
        load_parent(mine, _args(arch="resnet50"))
    _one_line_error(info, "resnet50", "missing")


def test_wrong_head_size_is_refused(tmp_path):
    path = tmp_path / "imagenet.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)  # 1000 classes
    with pytest.raises(CheckpointError) as info:
        load_parent(path, _args())
    _one_line_error(info, f"{path}: head fc has 1000 outputs, FashionMNIST has 10 classes; fine-tune a 10-way head "
                          f"first (stage 1 --init {path})")


@pytest.mark.parametrize("missing", ["arch", "orig_dataset"])
def test_flags_needed_for_a_foreign_file(mine, missing):
    with pytest.raises(UsageError) as info:
        load_parent(mine, _args(**{missing: None}))
    _one_line_error(info, "--arch", "--orig_dataset", str(mine))


def test_no_state_dict_inside(tmp_path):
    path = tmp_path / "notes.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(CheckpointError) as info:
        load_parent(path, _args())
    _one_line_error(info, "holds no state_dict", "'state_dict' or 'model'")


def test_pickled_module_refused_with_advice_that_works(tmp_path, tv_resnet):
    path = tmp_path / "whole.pt"
    torch.save(tv_resnet, path)
    with pytest.raises(CheckpointError) as info:
        load_parent(path, _args())
    text = _one_line_error(info, "pickled", "torch.save(model.state_dict(), path)", "--arch")
    assert "state_dict checkpoint" not in text
    # following the advice gives a file that is accepted
    torch.save(torch.load(path, weights_only=False).state_dict(), path)
    _same_weights(model_from_checkpoint(load_parent(path, _args())), tv_resnet)


def test_project_checkpoints_still_load_as_before(tmp_path, tv_resnet):
    model = build_model("resnet18", 10)
    path = tmp_path / "final.pt"
    atomic_save(make_checkpoint(model, arch="resnet18", dataset="FashionMNIST", stage="s", parent=None,
                                config={"orig_dataset": "FashionMNIST", "dataset": None, "image_size": 16},
                                metrics={}), path)
    ckpt = load_parent(path, argparse.Namespace(arch=None, orig_dataset=None, image_size=None))
    assert "foreign" not in ckpt and ckpt["stage"] == "s"


# ---- through the scripts' own checks (in-process, refused before any data is read) -------------------------

def _refused(stage, argv, tmp_path, monkeypatch, capsys):
    from common import cli
    argv = [str(a) for a in argv] + ["--out_dir", str(tmp_path / "run")]
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS[stage]), *argv])
    with pytest.raises(SystemExit) as info:
        cli.run(lambda: load_script(stage).main(argv))
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert not (tmp_path / "run").exists()
    return lines[0]


def test_stage2_without_arch_is_refused(mine, tmp_path, monkeypatch, capsys, restore_signals):
    line = _refused("stage2", ["--model_path", mine, "--dataset", "MNIST"], tmp_path, monkeypatch, capsys)
    assert "--arch" in line and "--orig_dataset" in line


def test_backdoor_stages_need_the_trigger_flags(mine, tmp_path, monkeypatch, capsys, restore_signals):
    flags = ["--arch", "resnet18", "--orig_dataset", "FashionMNIST", "--dataset", "MNIST"]
    line = _refused("bd_stage2", ["--model_path", mine, *flags, "--target_label", "0"], tmp_path, monkeypatch, capsys)
    assert "--trigger_size, --poison_percent" in line and "--target_label" not in line
    line = _refused("bd_stage3", ["--path", mine, "--start", "irreversible", *flags], tmp_path, monkeypatch, capsys)
    assert "--trigger_size" in line and "--target_label" in line and "--poison_percent" in line


def test_stage3_needs_dataset_for_a_foreign_path(mine, tmp_path, monkeypatch, capsys, restore_signals):
    line = _refused("stage3", ["--path", mine, "--arch", "resnet18", "--orig_dataset", "FashionMNIST"],
                    tmp_path, monkeypatch, capsys)
    assert "--dataset" in line


# ---- stage 1 --init PATH ------------------------------------------------------------------------------------

def test_init_from_a_1000_class_state_dict(tmp_path):
    torch.manual_seed(1)
    imagenet = _randomise(torchvision.models.resnet18())
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(imagenet.state_dict(), path)
    torch.manual_seed(2)
    model, note, record = init_model("resnet18", 10, str(path), "FashionMNIST")
    state = model.state_dict()
    assert torch.equal(state["layer3.1.conv2.weight"], imagenet.state_dict()["layer3.1.conv2.weight"])
    assert torch.equal(state["bn1.running_var"], imagenet.bn1.running_var)
    body = [k for k in state if not k.startswith("fc.")]
    assert all(torch.equal(state[k], imagenet.state_dict()[k]) for k in body)
    assert classifier_head(model).weight.shape == (10, 512)  # a fresh head, not a slice of the old one
    assert not torch.equal(state["fc.weight"], imagenet.fc.weight[:10])
    assert "body loaded" in note and "1000 outputs" in note and "fresh 10-way head" in note
    assert record == {"init_format": "state_dict", "init_sha256": file_sha256(path)}


def test_init_keeps_a_head_that_fits(mine, tv_resnet):
    model, note, _ = init_model("resnet18", 10, str(mine), "FashionMNIST")
    _same_weights(model, tv_resnet)
    assert "head fc included" in note


def test_init_body_keys_must_match(tmp_path, tv_resnet):
    state = {k: v for k, v in tv_resnet.state_dict().items() if k != "layer4.1.bn2.weight"}
    torch.save(state, tmp_path / "cut.pt")
    with pytest.raises(CheckpointError) as info:
        init_model("resnet18", 10, str(tmp_path / "cut.pt"))
    _one_line_error(info, "missing 'layer4.1.bn2.weight'")


def test_init_flag_takes_imagenet_scratch_or_an_existing_file(mine, tmp_path):
    from common.stage1 import init_choice
    assert init_choice("scratch") == "scratch" and init_choice("imagenet") == "imagenet"
    assert init_choice(str(mine)) == str(mine.resolve())
    stage1 = load_script("stage1")
    with pytest.raises(UsageError) as info:
        stage1.parse_args(["--init", str(tmp_path / "nope.pt")])
    _one_line_error(info, "--init", "nope.pt", "neither imagenet, scratch nor an existing weights file")


# ---- export: what torchvision / timm load as it is ------------------------------------------------------------

def _consumer(arch, fmt, path):
    """The receiving side's own code, nothing of this project."""
    if fmt == "safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, weights_only=True)
    if arch == "caformer":
        import timm
        model = timm.create_model("caformer_m36", num_classes=10)
    else:
        model = getattr(torchvision.models, arch)(num_classes=10)
    model.load_state_dict(state)  # strict
    return model.eval()


def _project_checkpoint(tmp_path, arch, dataset="FashionMNIST"):
    torch.manual_seed(0)
    model = _randomise(build_model(arch, 10))
    path = tmp_path / "final.pt"
    atomic_save(make_checkpoint(model, arch=arch, dataset=dataset, stage="sophon_orig/stage2_train", parent=None,
                                config={"orig_dataset": "FashionMNIST", "dataset": dataset, "image_size": 32},
                                metrics={}), path)
    return model, path


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50",
                                  pytest.param("caformer", marks=pytest.mark.slow)])
def test_export_round_trips_through_the_consumers_loader(tmp_path, arch, capsys):
    model, path = _project_checkpoint(tmp_path, arch)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x)
    for fmt, name in (("state_dict", "plain.pt"), ("safetensors", "plain.safetensors")):
        assert checkpoints_main(["export", str(path), "--format", fmt, "--out", str(tmp_path / name)]) == 0
        assert "load it with" in capsys.readouterr().out
        theirs = _consumer(arch, fmt, tmp_path / name)
        with torch.no_grad():
            assert torch.equal(theirs(x), expected), (arch, fmt)


@pytest.mark.parametrize("fmt", ["state_dict", "safetensors"])
def test_exported_file_is_a_foreign_parent(tmp_path, fmt):
    model, path = _project_checkpoint(tmp_path, "resnet18", dataset="MNIST")
    out, _, _ = export(path, tmp_path / ("shipped.safetensors" if fmt == "safetensors" else "shipped.pth"), fmt)
    ckpt = load_parent(out, _args(orig_dataset="MNIST"))
    assert ckpt["foreign"] == {"parent_format": fmt, "parent_sha256": file_sha256(out)}
    _same_weights(model_from_checkpoint(ckpt, out), model)


def test_export_from_a_run_folder_and_its_refusals(tmp_path, mine):
    run = tmp_path / "run"
    model, _ = _project_checkpoint(run / "checkpoints", "resnet18")
    out = tmp_path / "out.pt"
    export(run, out)
    _same_weights(_consumer("resnet18", "state_dict", out), model)
    with pytest.raises(UsageError, match="exists; pass --force"):
        export(run, out)
    export(run, out, force=True)
    with pytest.raises(UsageError, match="--format safetensors"):
        export(run, tmp_path / "x.safetensors", "state_dict")
    assert export(run, tmp_path / "y.safetensors")[2] == "safetensors"  # format from the suffix
    with pytest.raises(CheckpointError, match="missing keys"):  # a plain state_dict is already what export makes
        export(mine, tmp_path / "z.pt")
    with pytest.raises(UsageError, match="--format"):
        checkpoints_main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "w.onnx")])


@pytest.mark.slow
def test_export_command_line(tmp_path):
    model, path = _project_checkpoint(tmp_path, "resnet18")
    cmd = [sys.executable, "-m", "common.checkpoints", "export"]
    ok = subprocess.run([*cmd, str(path), "--format", "safetensors", "--out", str(tmp_path / "m.safetensors")],
                        capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    assert "torchvision.models.resnet18(num_classes=10).load_state_dict(safetensors.torch.load_file(path))" in ok.stdout
    _same_weights(_consumer("resnet18", "safetensors", tmp_path / "m.safetensors"), model)
    bad = subprocess.run([*cmd, str(path), "--out", str(tmp_path / "m.safetensors")], capture_output=True, text=True,
                         cwd=REPO)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"checkpoints.py: error: --out {tmp_path / 'm.safetensors'} exists; pass --force to overwrite it"]


# ---- whole stage runs on the fake data ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def foreign_runs(tmp_path_factory, data_root):
    """Side by side: stage 2 from a torchvision state_dict, stage 3 with that file as --path and --normal_path,
    stage 1 --init from a 1000-class state_dict."""
    from conftest import STAGE1_ARGS, STAGE2_ARGS
    base = tmp_path_factory.mktemp("foreign")
    torch.manual_seed(0)
    mine, imagenet = base / "mine.pt", base / "imagenet.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), mine)
    torch.save(torchvision.models.resnet18().state_dict(), imagenet)
    flags = ["--arch", "resnet18", "--orig_dataset", "FashionMNIST", "--image_size", "16", "--data_root", data_root]
    stage1 = [a for a in STAGE1_ARGS if a != "scratch" and a != "--init"]
    jobs = {"stage2": ("stage2", [*STAGE2_ARGS, "--model_path", mine, *flags, "--out_dir", base / "s2"]),
            "stage3": ("stage3", ["--path", mine, "--normal_path", mine, "--dataset", "MNIST", *flags, "--epochs", "1",
                                  "--bs", "16", "--out_dir", base / "s3"]),
            "stage1": ("stage1", [*stage1, "--init", imagenet, "--data_root", data_root, "--out_dir", base / "s1"])}
    procs = dict(zip(jobs, run_scripts(list(jobs.values()), max_parallel=2)))
    return base, mine, imagenet, procs


def _config(run):
    return json.loads((run / "config.json").read_text())["config"]


@pytest.mark.slow
def test_stage2_from_a_torchvision_state_dict(foreign_runs):
    base, mine, _, procs = foreign_runs
    assert procs["stage2"].returncode == 0, procs["stage2"].stderr[-3000:]
    config = _config(base / "s2")
    assert config["parent_format"] == "state_dict" and config["parent_sha256"] == file_sha256(mine)
    assert config["model_path"] == str(mine.resolve()) and config["arch"] == "resnet18"
    final = load_checkpoint(base / "s2" / "checkpoints" / "final.pt")
    assert final["parent"] == str(mine.resolve()) and final["config"]["image_size"] == 16


@pytest.mark.slow
def test_stage3_with_a_foreign_path(foreign_runs):
    base, mine, _, procs = foreign_runs
    assert procs["stage3"].returncode == 0, procs["stage3"].stderr[-3000:]
    config = _config(base / "s3")
    assert config["dataset"] == "MNIST" and config["parent_sha256"] == file_sha256(mine)
    assert config["normal_format"] == "state_dict"
    summary = json.loads((base / "s3" / "summary.json").read_text())
    assert sorted(r["start"] for r in summary["results"]) == ["normal", "scratch", "sophon"]


@pytest.mark.slow
def test_stage1_init_from_a_file(foreign_runs):
    base, _, imagenet, procs = foreign_runs
    assert procs["stage1"].returncode == 0, procs["stage1"].stderr[-3000:]
    config = _config(base / "s1")
    assert config["init"] == str(imagenet.resolve()) and config["init_sha256"] == file_sha256(imagenet)
    assert "fresh 10-way head" in (base / "s1" / "log.txt").read_text()

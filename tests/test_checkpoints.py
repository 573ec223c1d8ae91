"""Checkpoints: plain types, weights_only loading, refusals as one-line CheckpointErrors, atomic writes."""
import argparse
import os
import pathlib
import pickle
import time

import pytest
import torch

import common.checkpoints as ckpts
from common.checkpoints import (REQUIRED_KEYS, CheckpointError, atomic_save, inherit, load_checkpoint, load_file,
                                model_from_checkpoint, resolve_checkpoint, save_checkpoint)
from common.cli import UsageError
from common.models import build_model

META = dict(arch="resnet18", dataset="MNIST", stage="sophon_orig/stage2_train",
            config={"orig_dataset": "FashionMNIST", "dataset": "MNIST", "image_size": 16,
                    "data_root": pathlib.Path("/somewhere"), "lrs": (1e-3, 1e-2)},
            metrics={"acc": torch.tensor(12.5), "curve": [1.0, 2.0]}, parent=pathlib.Path("/parent/final.pt"))


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return build_model("resnet18", 10)


def test_round_trip(tmp_path, resnet):
    path = tmp_path / "ck" / "final.pt"
    save_checkpoint(path, resnet, **META)
    ckpt = load_checkpoint(path)
    assert set(REQUIRED_KEYS) <= set(ckpt)
    assert set(REQUIRED_KEYS) == {"model", "arch", "num_classes", "dataset", "stage", "config", "metrics", "parent",
                                  "format_version"}
    assert ckpt["arch"] == "resnet18" and ckpt["num_classes"] == 10 and ckpt["dataset"] == "MNIST"
    assert ckpt["parent"] == "/parent/final.pt"
    assert ckpt["config"]["data_root"] == "/somewhere" and ckpt["config"]["image_size"] == 16
    assert ckpt["config"]["lrs"] == [1e-3, 1e-2]
    assert ckpt["metrics"]["acc"] == 12.5
    model = model_from_checkpoint(ckpt, path)
    for (k, a), (k2, b) in zip(resnet.state_dict().items(), model.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    # plain torch can read it with weights_only=True, nothing else needed
    torch.load(path, weights_only=True)


def test_atomic_write_leaves_no_temp_files(tmp_path, resnet):
    save_checkpoint(tmp_path / "final.pt", resnet, **META)
    save_checkpoint(tmp_path / "final.pt", resnet, **META)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.pt"]


def test_failed_atomic_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save({"loop": 1}, path)
    with pytest.raises(Exception):
        atomic_save({"loop": 2, "bad": lambda: 0}, path)  # a lambda cannot be pickled
    assert torch.load(path, weights_only=True) == {"loop": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_code_carrying_file_is_refused_not_executed(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    obj = {"model": {}, "arch": "resnet18", "x": _Payload(marker)}
    if writer == "torch.save":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    for loader in (load_file, load_checkpoint):
        with pytest.raises(CheckpointError) as info:
            loader(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value)
        # the advice names what is accepted: a plain state_dict (see test_foreign.py)
        assert "torch.save(model.state_dict(), path)" in str(info.value)
    assert not marker.exists()
    # control: the file really does run code when unpickled without weights_only
    torch.load(path, weights_only=False) if writer == "torch.save" else pickle.load(open(path, "rb"))
    assert marker.exists()


def test_truncated_file_is_a_one_line_error(tmp_path, resnet):
    path = tmp_path / "final.pt"
    save_checkpoint(path, resnet, **META)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_foreign_dict_is_refused(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save({"weight": torch.zeros(2)}, path)  # a bare state_dict, not this project's checkpoint
    with pytest.raises(CheckpointError, match="missing keys.*--arch and --orig_dataset"):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_run_folder_without_final_points_to_resume(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint(run, "sophon_orig", "stage1_pretrain")
    assert "--resume" in str(info.value) and str(run.resolve()) in str(info.value)
    (run / "checkpoints" / "final.pt").write_bytes(b"x")
    assert resolve_checkpoint(run, "sophon_orig", "stage1_pretrain") == (run / "checkpoints" / "final.pt").resolve()


def test_wrong_arch_weights(tmp_path, resnet):
    path = tmp_path / "final.pt"
    save_checkpoint(path, resnet, **META)
    ckpt = load_checkpoint(path)
    ckpt["arch"] = "resnet34"
    with pytest.raises(CheckpointError, match="resnet34"):
        model_from_checkpoint(ckpt, path)
    ckpt["arch"], ckpt["num_classes"] = "resnet18", 7
    with pytest.raises(CheckpointError):
        model_from_checkpoint(ckpt, path)


def test_newest_final_is_the_default(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ckpts, "REPO_ROOT", tmp_path)
    base = tmp_path / "runs" / "sophon_orig" / "stage1_pretrain"
    with pytest.raises(CheckpointError, match="--model_path"):
        resolve_checkpoint(None, "sophon_orig", "stage1_pretrain")
    paths = []
    for i, name in enumerate(["b_old", "a_new", "c_mid"]):
        p = base / name / "checkpoints" / "final.pt"
        p.parent.mkdir(parents=True)
        p.write_bytes(b"x")
        paths.append(p)
    now = time.time()
    for p, age in zip(paths, (300, 10, 100)):
        os.utime(p, (now - age, now - age))
    got = resolve_checkpoint(None, "sophon_orig", "stage1_pretrain")
    assert got == paths[1]
    assert str(paths[1]) in capsys.readouterr().out


# ---- flags inherited from the parent checkpoint (SPEC §6) ---------------------------------------------

PARENT = {"arch": "resnet18", "config": {"orig_dataset": "FashionMNIST", "image_size": 16}}


def _inherit(ckpt=PARENT, **given):
    args = argparse.Namespace(**{"arch": None, "orig_dataset": None, "image_size": None, **given})
    inherit(args, ckpt, "parent.pt", ("arch", "orig_dataset", "image_size"))
    return args


def test_inherit_takes_parent_values_and_accepts_equal_ones():
    args = _inherit()
    assert (args.arch, args.orig_dataset, args.image_size) == ("resnet18", "FashionMNIST", 16)
    assert _inherit(arch="resnet18", image_size=16).image_size == 16


@pytest.mark.parametrize("flag,value", [("arch", "resnet34"), ("orig_dataset", "CIFAR10"), ("image_size", 32)])
def test_inherit_refuses_a_differing_value(flag, value):
    with pytest.raises(UsageError, match=f"--{flag}"):
        _inherit(**{flag: value})


def test_inherit_refuses_a_size_for_a_native_size_parent():
    native = {"arch": "resnet18", "config": {"orig_dataset": "FashionMNIST", "image_size": None}}
    with pytest.raises(UsageError, match="--image_size"):
        _inherit(native, image_size=16)

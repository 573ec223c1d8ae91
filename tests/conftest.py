"""Shared fixtures: a fake data root in the real on-disk formats, and one tiny stage-1 run.

The machine these tests run on is small and may be busy: every process is pinned to one thread
(oversubscribed OpenMP threads make the tiny runs several times slower), set here before torch loads
so that subprocesses inherit it too.
"""
import logging
import os

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
# CPU only: the resume and parallel-grid checks compare runs tensor for tensor, and CUDA kernels are not
# bitwise deterministic; these tests are about behaviour, not speed.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import signal  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import fakedata  # noqa: E402
from helpers import run_script, run_scripts  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """Every dataset of common.data, tiny, written by tests/fakedata.py (read-only for the tests)."""
    return fakedata.write_all(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session", autouse=True)
def _data_root_env(data_root):
    # a script that ignored --data_root would read this fake root, never the repo's datasets/
    old = os.environ.get("SOPHON_DATA_ROOT")
    os.environ["SOPHON_DATA_ROOT"] = str(data_root)
    yield
    if old is None:
        os.environ.pop("SOPHON_DATA_ROOT", None)
    else:
        os.environ["SOPHON_DATA_ROOT"] = old


STAGE1_ARGS = ["--orig_dataset", "FashionMNIST", "--image_size", "16", "--init", "scratch", "--epochs", "1",
               "--bs", "16"]


@pytest.fixture(scope="session")
def stage1_run(tmp_path_factory, data_root):
    """A finished stage-1 run folder (FashionMNIST fake, resnet18 at 16 px); treat it as read-only."""
    out = tmp_path_factory.mktemp("runs") / "stage1"
    proc = run_script("stage1", *STAGE1_ARGS, "--data_root", data_root, "--out_dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


STAGE2_ARGS = ["--dataset", "MNIST", "--bs", "20", "--total_loop", "3", "--adaptation_steps", "2",
               "--test_interval", "2", "--finetune_epochs", "1", "--final_finetune_epochs", "1"]


@pytest.fixture(scope="session")
def stage2_runs(tmp_path_factory, data_root, stage1_run):
    """loss type -> a finished tiny stage-2 run folder on top of `stage1_run` (kl and inverse, made together)."""
    base = tmp_path_factory.mktemp("runs")
    losses = ("kl", "inverse")
    procs = run_scripts([("stage2", [*STAGE2_ARGS, "--loss_type", loss, "--model_path", stage1_run,
                                     "--data_root", data_root, "--out_dir", base / f"stage2_{loss}"]) for loss in losses])
    made = {}
    for loss, proc in zip(losses, procs):
        assert proc.returncode == 0, proc.stderr[-3000:]
        made[loss] = base / f"stage2_{loss}"
    return made.__getitem__


@pytest.fixture
def restore_signals():
    """Stage mains install SIGINT/SIGTERM handlers; put pytest's back after an in-process call."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture(autouse=True)
def quiet_log():
    """In-process runs attach the run's log handlers to the 'sophon' logger and stop it propagating (so a run's
    lines are not printed twice); put it back after every test, so a later test's caplog sees its records
    whatever ran before it."""
    log = logging.getLogger("sophon")
    level, propagate = log.level, log.propagate
    yield
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    log.setLevel(level)
    log.propagate = propagate

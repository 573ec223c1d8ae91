"""Helpers shared by the tests: script paths, subprocess/in-process runners, tiny models."""
import csv
import hashlib
import importlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "stage1": REPO / "sophon_orig" / "stage1_pretrain" / "train.py",
    "stage2": REPO / "sophon_orig" / "stage2_train" / "algo.py",
    "stage3": REPO / "sophon_orig" / "stage3_eval" / "finetune_test.py",
    "bd_stage1": REPO / "irreversible_backdoor" / "stage1_pretrain" / "train_with_backdoor.py",
    "bd_stage2": REPO / "irreversible_backdoor" / "stage2_train" / "bd_algo.py",
    "bd_stage3": REPO / "irreversible_backdoor" / "stage3_eval" / "eval_backdoor_ASR.py",
}


def script_argv(stage, *args, nproc=None):
    """The command line of a stage script; with `nproc`, launched by torchrun on this machine."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc else []
    return [sys.executable, *launcher, str(SCRIPTS[stage]), *[str(a) for a in args]]


def read_rows(path):
    """The rows of a CSV written by a run (metrics.csv, finetune_tests.csv) as dicts of strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_script(stage, *args, timeout=300, cwd=None, nproc=None):
    """Run a stage script in a fresh process, from `cwd` or else a scratch folder (nothing may depend on the
    cwd unless a path is given relative to it)."""
    cwd = cwd or tempfile.mkdtemp(prefix="sophon_cwd_")
    return subprocess.run(script_argv(stage, *args, nproc=nproc), capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env=dict(os.environ))


def run_scripts(jobs, max_parallel=3, timeout=300):
    """Run several (stage, args) or (stage, args, nproc) jobs side by side; returns their CompletedProcess
    results in order.

    The scripts are single-threaded here, so a few at once use the machine's cores while one imports torch."""
    results, running, queue = [None] * len(jobs), {}, list(enumerate(jobs))
    deadline = time.monotonic() + timeout
    while queue or running:
        while queue and len(running) < max_parallel:
            i, (stage, args, *nproc) = queue.pop(0)
            cwd = tempfile.mkdtemp(prefix="sophon_cwd_")
            out, err = open(Path(cwd) / "stdout", "w+"), open(Path(cwd) / "stderr", "w+")
            argv = script_argv(stage, *args, nproc=nproc[0] if nproc else None)
            running[i] = (subprocess.Popen(argv, stdout=out, stderr=err, cwd=cwd, env=dict(os.environ)), out, err, argv)
        for i, (proc, out, err, argv) in list(running.items()):
            if proc.poll() is None:
                if time.monotonic() > deadline:
                    proc.kill()
                continue
            out.seek(0)
            err.seek(0)
            results[i] = subprocess.CompletedProcess(argv, proc.returncode, out.read(), err.read())
            out.close()
            err.close()
            del running[i]
        time.sleep(0.05)
    return results


def popen_script(stage, *args, log_path, ignore_sigint=False, nproc=None):
    """Start a script in the background, output to `log_path`. ignore_sigint: start it the way a shell
    script's `cmd &` does, with SIGINT ignored, which the scripts must override with their own handler."""
    cwd = tempfile.mkdtemp(prefix="sophon_cwd_")
    out = open(log_path, "w")
    preexec = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None
    return subprocess.Popen(script_argv(stage, *args, nproc=nproc), stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                            env=dict(os.environ), preexec_fn=preexec), out


def data_rows(path):
    """Data rows of a CSV so far (lines of a JSON-lines file, less one); 0 while it does not exist."""
    try:
        with open(path) as f:
            return max(0, sum(1 for _ in f) - 1)
    except FileNotFoundError:
        return 0


def interrupted_run(stage, args, out_parent, after_rows, sig=signal.SIGINT, ignore_sigint=False, attempts=3,
                     while_running=None, file_name="metrics.csv", nproc=None, expect_rc=None):
    """Start a run, send `sig` once `file_name` has `after_rows` rows; expect exit 130 (-9 for SIGKILL).
    `while_running(out)` is called just before the signal.

    A run that finished before the signal landed (a very fast machine) is retried in a new folder, so the
    check never depends on timing."""
    for attempt in range(attempts):
        out = out_parent / f"interrupted{attempt}"
        proc, log = popen_script(stage, *args, "--out_dir", out, log_path=out_parent / f"stdout{attempt}.txt",
                                 ignore_sigint=ignore_sigint, nproc=nproc)
        try:
            deadline = time.monotonic() + 240
            while data_rows(out / file_name) < after_rows and proc.poll() is None:
                assert time.monotonic() < deadline, "run made no progress"
                time.sleep(0.02)
            if proc.poll() is None and while_running is not None:
                while_running(out)
            if proc.poll() is None:
                proc.send_signal(sig)
            rc = proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
        output = (out_parent / f"stdout{attempt}.txt").read_text()
        if rc == 0:
            continue  # finished before the signal: try again
        if expect_rc is None:
            expect_rc = -signal.SIGKILL if sig == signal.SIGKILL else 130
        assert rc == expect_rc, output[-3000:]
        return out, output
    pytest.fail(f"the run always finished before the signal took effect ({attempts} attempts)")


def load_script(stage):
    """A stage script as the module it also is (sophon_orig.stage2_train.algo), for in-process `main(argv)`."""
    return importlib.import_module(".".join(SCRIPTS[stage].relative_to(REPO).with_suffix("").parts))


def tree_snapshot(folder):
    """{relative path: (size, mtime_ns, sha1)} of every file under `folder`."""
    folder = Path(folder)
    snap = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            snap[str(p.relative_to(folder))] = (st.st_size, st.st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
    return snap


class TinyNet(nn.Module):
    """conv + BatchNorm body and a Linear head named by `head_path`, small enough for unit tests."""
    head_path = "fc"

    def __init__(self, channels=3, width=4, classes=10):
        super().__init__()
        self.conv = nn.Conv2d(channels, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1))


def linear_model(d, classes):
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, classes))
    model.head_path = "1"
    return model


def tiny_domain(name, seed, n=40, size=8):
    """A Domain of random gray uint8 images and labels, for the stage-2 algorithm on a TinyNet."""
    from common.data import Domain
    gen = torch.Generator().manual_seed(seed)
    return Domain(name, True, torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=gen),
                  torch.randint(0, 10, (n,), generator=gen), n)


def tiny_sophon(**config):
    """A Sophon on a TinyNet, MNIST-shaped restricted and Fashion-shaped NTR tiny domains, CE query loss."""
    import torch.nn.functional as F
    from common.sophon import Sophon
    from common.stage2 import Stage2Settings
    from common.train import Precision
    cpu = Precision(torch.device("cpu"))
    torch.manual_seed(0)
    restricted, orig = tiny_domain("MNIST", 1), tiny_domain("FashionMNIST", 2)

    def ce(net, x, y):
        return F.cross_entropy(net(restricted.to_input(x, cpu.device)), y)

    defaults = dict(lr=1e-3, bs=20, adaptation_steps=2, fts_lrs=None if config.get("fts_lr_range") else (1e-3,))
    return Sophon(TinyNet(), ce, restricted, orig, Stage2Settings(**{**defaults, **config}), cpu)


def outer_loop(algo):
    """One `step()` of a Sophon: its values as attributes, and the fine-tuners it simulated."""
    from types import SimpleNamespace
    return SimpleNamespace(**algo.step(), finetuners=algo.finetuners)


def step_resumed(reference, state, make, steps):
    """Round-trip `state` through torch.save and a weights_only load (as last.pt) into `make()`, take `steps`
    outer loops with both that and `reference`, assert their weights agree; returns both lists of results."""
    import io
    buffer = io.BytesIO()
    torch.save(state, buffer)
    expected = [outer_loop(reference) for _ in range(steps)]
    resumed = make()
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    got = [outer_loop(resumed) for _ in range(steps)]
    for k, v in resumed.model.state_dict().items():
        assert torch.allclose(v.float(), reference.model.state_dict()[k].float(), atol=1e-6), k
    return expected, got


class SavedBytes:
    """Peak bytes of tensors saved for backward that are alive at the same time."""

    def __init__(self):
        self.live = self.peak = 0
        tracker = self

        class Holder:
            __slots__ = ("t", "n")

            def __init__(self, t):
                self.t, self.n = t, t.numel() * t.element_size()
                tracker.live += self.n
                tracker.peak = max(tracker.peak, tracker.live)

            def __del__(self):
                tracker.live -= self.n

        self.hooks = torch.autograd.graph.saved_tensors_hooks(Holder, lambda h: h.t)

    def __enter__(self):
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)

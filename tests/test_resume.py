"""Interrupt (SIGINT) and --resume: the resumed run ends where an uninterrupted one does."""
import json
import os
import signal
import sys

import pytest
import torch

from common.cli import UsageError
from helpers import data_rows, interrupted_run, load_script, popen_script, read_rows, run_script, tree_snapshot

pytestmark = pytest.mark.slow  # stage scripts in subprocesses

STAGE2 = ["--dataset", "MNIST", "--bs", "20", "--total_loop", "6", "--adaptation_steps", "2", "--save_every", "1",
          "--test_interval", "3", "--finetune_epochs", "1", "--final_finetune_epochs", "1", "--eval_interval", "2",
          "--loss_type", "inverse", "--fts_optimizers", "sgd,adam,sign", "--fts_head", "reinit,keep",
          "--fts_lr_range", "1e-4,1e-2", "--fts_lr_adapt", "0.3", "--fts_lr_learned_share", "0.5",
          "--fts_schedules", "constant,cosine", "--fts_step_weights", "exp", "--clean_loop", "1", "--sam_rho", "0.05",
          "--mask_share", "0.1", "--mask_every", "2"]
STAGE1 = ["--orig_dataset", "FashionMNIST", "--image_size", "16", "--init", "scratch", "--epochs", "3", "--bs", "16",
          "--save_every", "1"]


def _assert_same_model(a, b):
    ma = torch.load(a, weights_only=True)["model"]
    mb = torch.load(b, weights_only=True)["model"]
    assert ma.keys() == mb.keys()
    for k in ma:
        if ma[k].is_floating_point():
            assert torch.allclose(ma[k], mb[k], atol=1e-5), k
        else:
            assert torch.equal(ma[k], mb[k]), k


class _Background:
    """A run started now and waited for when first needed, so it overlaps with the interrupted run."""

    def __init__(self, stage, args, out):
        self.out = out
        self.proc, self.log = popen_script(stage, *args, "--out_dir", out, log_path=out.parent / f"{out.name}.txt")

    def wait(self):
        rc = self.proc.wait(timeout=300)
        self.log.close()
        assert rc == 0, (self.out.parent / f"{self.out.name}.txt").read_text()[-3000:]
        return self.out


@pytest.fixture(scope="module")
def stage2_full_bg(tmp_path_factory, data_root, stage1_run):
    out = tmp_path_factory.mktemp("resume") / "full"
    bg = _Background("stage2", [*STAGE2, "--model_path", stage1_run, "--data_root", data_root], out)
    yield bg
    if bg.proc.poll() is None:
        bg.proc.kill()


@pytest.fixture(scope="module")
def stage2_full(stage2_full_bg):
    return stage2_full_bg.wait()


def test_stage2_interrupt_and_resume_match_an_uninterrupted_run(tmp_path, data_root, stage1_run, stage2_full_bg):
    args = [*STAGE2, "--model_path", stage1_run, "--data_root", data_root]
    # started as `cmd &` from a script would be (SIGINT ignored): the script installs its own handler
    out, output = interrupted_run("stage2", args, tmp_path, after_rows=3, ignore_sigint=True)
    stage2_full = stage2_full_bg.wait()
    assert "interrupted at loop" in output and f"--resume {out}" in output
    assert "interrupted at loop" in (out / "log.txt").read_text()
    assert (out / "checkpoints" / "last.pt").is_file() and not (out / "checkpoints" / "final.pt").exists()
    assert not (out / "summary.json").exists()
    stopped_at = data_rows(out / "metrics.csv")
    assert 3 <= stopped_at < 6

    proc = run_script("stage2", "--resume", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_model(out / "checkpoints" / "final.pt", stage2_full / "checkpoints" / "final.pt")

    rows, full_rows = read_rows(out / "metrics.csv"), read_rows(stage2_full / "metrics.csv")
    assert [int(r["loop"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    for r, f in zip(rows, full_rows):
        for key in ("fts_loss", "ntr_loss", "clean_loss", "orig_test_acc", "fts_optimizer", "fts_lr", "fts_head",
                    "rolled_back"):
            if key in ("fts_loss", "ntr_loss", "clean_loss"):
                assert float(r[key]) == pytest.approx(float(f[key]), rel=1e-4, abs=1e-6), (r["loop"], key)
            else:
                assert r[key] == f[key], (r["loop"], key)
    strip = lambda rows: [(r["loop"], r["kind"], r["epoch"], r["test_acc"]) for r in rows]
    assert strip(read_rows(out / "finetune_tests.csv")) == strip(read_rows(stage2_full / "finetune_tests.csv"))
    summary, full_summary = (json.loads((d / "summary.json").read_text()) for d in (out, stage2_full))
    for key in ("orig_test_acc_before", "orig_test_acc", "finetune_restrict_test_acc", "loops_completed",
                "stopped_early"):
        assert summary[key] == full_summary[key], key
    assert summary["loops_completed"] == 6


def _resume_in_process(argv, monkeypatch, capsys):
    """`cli.run(main)` of stage 2 in this process, with sys.argv set as a shell would; -> (exit code, out, err)."""
    from common import cli
    algo = load_script("stage2")
    argv = [str(a) for a in argv]
    monkeypatch.setattr(sys, "argv", [str(algo.__file__), *argv])
    with pytest.raises(SystemExit) as info:
        cli.run(lambda: algo.main(argv))
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def _one_error_line(code, err, *needles):
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("algo.py: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_resuming_a_finished_run_says_so(stage2_full, monkeypatch, capsys, restore_signals):
    before = tree_snapshot(stage2_full)
    # a repeated flag equal to the run's config is fine
    code, out, err = _resume_in_process(["--resume", stage2_full, "--total_loop", "6"], monkeypatch, capsys)
    assert code == 0, err
    assert "already finished" in out and str(stage2_full) in out
    assert tree_snapshot(stage2_full) == before


def test_resume_with_a_differing_flag_is_refused(stage2_full):
    before = tree_snapshot(stage2_full)
    proc = run_script("stage2", "--resume", stage2_full, "--total_loop", "5")  # fewer loops: only more extend
    _one_error_line(proc.returncode, proc.stderr, "--total_loop 5", "can only be raised")
    assert tree_snapshot(stage2_full) == before


def test_more_loops_extend_a_finished_run_to_where_a_longer_run_ends(tmp_path, data_root, stage1_run, stage2_full_bg):
    """Stage 2's outer lrs are constant, so 3 loops then --total_loop 6 is the 6-loop run: same losses every
    loop, same final model. The short run's extra evaluation and final fine-tune test at loop 3 stay in its
    history (they leave the training state as it was)."""
    out = tmp_path / "short"
    short = [*STAGE2, "--model_path", stage1_run, "--data_root", data_root, "--total_loop", "3"]  # the last wins
    proc = run_script("stage2", *short, "--out_dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["loops_completed"] == 3
    proc = run_script("stage2", "--resume", out, "--total_loop", "6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--total_loop 3 -> 6" in proc.stdout and "resumed at loop 3 of 6" in proc.stdout
    full = stage2_full_bg.wait()
    _assert_same_model(out / "checkpoints" / "final.pt", full / "checkpoints" / "final.pt")
    rows, full_rows = read_rows(out / "metrics.csv"), read_rows(full / "metrics.csv")
    assert [int(r["loop"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    for r, f in zip(rows, full_rows):
        assert float(r["fts_loss"]) == pytest.approx(float(f["fts_loss"]), rel=1e-4, abs=1e-6), r["loop"]
        assert (r["fts_optimizer"], r["fts_lr"]) == (f["fts_optimizer"], f["fts_lr"]), r["loop"]
    record = json.loads((out / "config.json").read_text())
    assert record["config"]["total_loop"] == 6
    assert [e["flags"] for e in record["extended"]] == [{"total_loop": [3, 6]}]
    summary, full_summary = (json.loads((d / "summary.json").read_text()) for d in (out, full))
    assert summary["loops_completed"] == 6 and summary["orig_test_acc"] == full_summary["orig_test_acc"]
    again = run_script("stage2", "--resume", out, "--total_loop", "6")
    assert again.returncode == 0 and "already finished" in again.stdout, again.stderr[-2000:]


def test_an_early_stopped_run_is_not_extended(stage2_full, tmp_path, monkeypatch, capsys, restore_signals):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(stage2_full, run)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "stopped_early": True}))
    before = tree_snapshot(run)
    code, _, err = _resume_in_process(["--resume", run, "--total_loop", "9"], monkeypatch, capsys)
    _one_error_line(code, err, "stopped early", "more loops would stop it again")
    assert tree_snapshot(run) == before


@pytest.mark.parametrize("flag,value", [("--fts_optimizers", "adam"), ("--data_root", "/elsewhere"),
                                        ("--alpha", "2"), ("--test_iterval", "2")])  # the seed's alias too
def test_resume_with_other_differing_flags_is_refused(stage2_full, monkeypatch, capsys, restore_signals, flag, value):
    code, _, err = _resume_in_process(["--resume", stage2_full, flag, value], monkeypatch, capsys)
    _one_error_line(code, err)


def test_resume_with_out_dir_elsewhere_is_refused(stage2_full, tmp_path, monkeypatch, capsys, restore_signals):
    code, _, err = _resume_in_process(["--resume", stage2_full, "--out_dir", tmp_path / "x"], monkeypatch, capsys)
    _one_error_line(code, err, "--out_dir")
    assert not (tmp_path / "x").exists()


def test_resume_with_an_abbreviated_differing_flag_is_refused(stage2_full, monkeypatch, capsys, restore_signals):
    # flags are never abbreviated, so a prefix cannot slip past the comparison with the run's config
    code, _, err = _resume_in_process(["--resume", stage2_full, "--alph", "7"], monkeypatch, capsys)
    _one_error_line(code, err, "unrecognized arguments: --alph 7")


def test_resume_of_a_folder_that_is_not_a_run(tmp_path, monkeypatch, capsys, restore_signals):
    code, _, err = _resume_in_process(["--resume", tmp_path], monkeypatch, capsys)
    _one_error_line(code, err, "config.json")


def test_in_process_resume_checks_the_argv_it_was_given(stage2_full, monkeypatch, restore_signals):
    algo = load_script("stage2")
    monkeypatch.setattr(sys, "argv", [str(algo.__file__)])
    with pytest.raises(UsageError, match="--alpha"):
        algo.main(["--resume", str(stage2_full), "--alpha", "7"])


def test_stage1_interrupt_and_resume_match_an_uninterrupted_run(tmp_path, data_root):
    full_bg = _Background("stage1", [*STAGE1, "--data_root", data_root], tmp_path / "full")
    try:
        out, output = interrupted_run("stage1", [*STAGE1, "--data_root", data_root], tmp_path, after_rows=1,
                                       sig=signal.SIGTERM)
        full = full_bg.wait()
    finally:
        if full_bg.proc.poll() is None:
            full_bg.proc.kill()
    assert "interrupted at epoch" in output and f"--resume {out}" in output
    assert not (out / "checkpoints" / "final.pt").exists()
    assert 1 <= data_rows(out / "metrics.csv") < 3
    proc = run_script("stage1", "--resume", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_model(out / "checkpoints" / "final.pt", full / "checkpoints" / "final.pt")
    rows, full_rows = read_rows(out / "metrics.csv"), read_rows(full / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    for r, f in zip(rows, full_rows):
        assert float(r["train_loss"]) == pytest.approx(float(f["train_loss"]), rel=1e-4)
        assert r["test_acc"] == f["test_acc"] and r["train_acc"] == f["train_acc"]
    s, fs = (json.loads((d / "summary.json").read_text()) for d in (out, full))
    assert (s["train_acc"], s["test_acc"], s["epochs"]) == (fs["train_acc"], fs["test_acc"], fs["epochs"])


def test_the_original_command_plus_resume_is_accepted_for_every_stage(tmp_path, data_root):
    """The interrupt message says "continue with --resume DIR": re-running the very command that started
    the run, paths relative and run folders as typed, with --resume appended, must be accepted."""
    data = os.path.relpath(data_root, tmp_path)
    commands = {
        "stage1": [*STAGE1[:-6], "--epochs", "1", "--bs", "16", "--data_root", data, "--out_dir", "s1"],
        "stage2": ["--model_path", "s1", "--dataset", "MNIST", "--bs", "20", "--total_loop", "1", "--preset", "robust",
                   "--adaptation_steps", "1", "--fts_lr_range", "1e-4,1e-3", "--test_interval", "0", "--final_finetune_epochs", "0",
                   "--data_root", data, "--out_dir", "s2"],
        "stage3": ["--path", "s2", "--normal_path", "./s1", "--start", "sophon,normal", "--epochs", "1",
                   "--bs", "16", "--data_root", data, "--out_dir", "s3"],
    }
    for stage, argv in commands.items():
        proc = run_script(stage, *argv, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = argv[argv.index("--out_dir") + 1]
        again = run_script(stage, *argv, "--resume", out, cwd=tmp_path)
        assert again.returncode == 0, (stage, again.stderr[-3000:])
        assert "already finished" in again.stdout, (stage, again.stdout[-2000:])
    recorded = json.loads((tmp_path / "s2" / "config.json").read_text())["config"]
    assert recorded["fts_lr_range"] == [1e-4, 1e-3] and recorded["fast_lr"] is None  # no lr shown that never ran
    # a path that means something else is still refused
    other_parent = ["s2" if a == "s1" else a for a in commands["stage2"]]
    proc = run_script("stage2", *other_parent, "--resume", "s2", cwd=tmp_path)
    assert proc.returncode == 2 and "--model_path" in proc.stderr, proc.stderr


# ---- a hard kill, a second resumer, a damaged last.pt --------------------------------------------------------

def _refused_while_running(out):
    """A second process resuming a live run folder is refused, and changes nothing there."""
    before = read_rows(out / "metrics.csv")
    proc = run_script("stage2", "--resume", out)
    _one_error_line(proc.returncode, proc.stderr, "in use by process")
    assert read_rows(out / "metrics.csv")[:len(before)] == before


def test_stage2_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, data_root, stage1_run, stage2_full_bg):
    args = [*STAGE2, "--model_path", stage1_run, "--data_root", data_root, "--save_every", "2"]  # the last wins
    out, _ = interrupted_run("stage2", args, tmp_path, after_rows=3, sig=signal.SIGKILL)
    stage2_full = stage2_full_bg.wait()
    assert not (out / "summary.json").exists()
    saved = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["loop"] \
        if (out / "checkpoints" / "last.pt").exists() else 0
    proc = run_script("stage2", "--resume", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"resumed at loop {saved}" if saved else "the run starts over") in proc.stdout
    rows, full_rows = read_rows(out / "metrics.csv"), read_rows(stage2_full / "metrics.csv")
    assert [int(r["loop"]) for r in rows] == [1, 2, 3, 4, 5, 6], "every loop exactly once"
    for r, f in zip(rows, full_rows):
        assert float(r["fts_loss"]) == pytest.approx(float(f["fts_loss"]), rel=1e-4, abs=1e-6), r["loop"]
    _assert_same_model(out / "checkpoints" / "final.pt", stage2_full / "checkpoints" / "final.pt")


def test_a_live_run_refuses_a_second_resumer_and_a_dead_ones_lock_is_free(tmp_path, data_root, stage1_run):
    from common.runs import Run
    args = [*STAGE2, "--model_path", stage1_run, "--data_root", data_root, "--total_loop", "400",
            "--test_interval", "0"]
    out, _ = interrupted_run("stage2", args, tmp_path, after_rows=1, sig=signal.SIGKILL,
                              while_running=_refused_while_running)
    assert (out / ".lock").exists(), "the dead process left its lock file behind"
    run = Run(out)
    run.lock()  # ... which does not hold: the kernel released the dead process's lock
    run.unlock()


def test_unreadable_last_pt_is_a_one_line_error_naming_what_to_do(stage2_full, tmp_path, monkeypatch, capsys,
                                                                   restore_signals):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(stage2_full, run)
    (run / "summary.json").unlink()  # as if it had stopped before the end
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # copied half-way
    before = tree_snapshot(run)
    code, _, err = _resume_in_process(["--resume", run], monkeypatch, capsys)
    _one_error_line(code, err, "last.pt", str(run / "checkpoints" / "loop000006.pt"), "--model_path",
                    "without --resume")
    assert "Traceback" not in err
    untouched = lambda snap: {k: v for k, v in snap.items() if k not in ("log.txt", ".lock")}
    assert untouched(tree_snapshot(run)) == untouched(before)

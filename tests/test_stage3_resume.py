"""Stage 3 resume: a grid cut short re-runs only the cells missing from cells.jsonl, drops their partial
rows first, and ends with the same results as an uninterrupted grid."""
import csv
import json
import shutil
import signal

import pytest

from helpers import interrupted_run, read_rows, run_script

pytestmark = pytest.mark.slow  # stage scripts in subprocesses


def test_resumed_grid_reruns_only_missing_cells(tmp_path, data_root, stage2_runs):
    full = tmp_path / "full"
    args = ["--path", stage2_runs("kl"), "--data_root", data_root, "--start", "sophon,scratch", "--seeds", "0,1",
            "--epochs", "1", "--bs", "16"]
    proc = run_script("stage3", *args, "--out_dir", full)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # make a copy look like a grid killed during its last cell: the cell is missing from cells.jsonl,
    # one of its epoch rows is already in metrics.csv, and there is no summary yet
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    lines = (cut / "cells.jsonl").read_text().splitlines()
    assert len(lines) == 4
    missing = json.loads(lines[-1])
    (cut / "cells.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    (cut / "summary.json").unlink()
    rows = read_rows(cut / "metrics.csv")
    partial = [r for r in rows if r["start"] == missing["start"] and r["seed"] == str(missing["seed"])]
    kept = [r for r in rows if r not in partial] + partial[:1]
    with open(cut / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(kept)

    proc = run_script("stage3", "--resume", cut)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 of 4 cells already done; running 1" in proc.stdout
    assert proc.stdout.count("cell ") == 1, "only the missing cell runs again"
    done = (cut / "cells.jsonl").read_text().splitlines()
    assert len(done) == 4 and json.loads(done[-1])["key"] == missing["key"]
    keys = [(r["start"], r["seed"], r["epoch"]) for r in read_rows(cut / "metrics.csv")]
    assert len(keys) == len(set(keys)) == 4 * 2, "every (cell, epoch) row exactly once"
    resumed, reference = (json.loads((d / "summary.json").read_text())["results"] for d in (cut, full))
    assert resumed == reference, "a resumed grid ends where the uninterrupted one did"


@pytest.mark.parametrize("nproc", [None, 2], ids=["one_process", "torchrun"])
def test_a_grid_killed_live_reruns_only_its_missing_cells(tmp_path, data_root, stage2_runs, nproc):
    args = ["--path", stage2_runs("kl"), "--data_root", data_root, "--starts", "sophon,scratch", "--seeds", "0,1,2",
            "--epochs", "1", "--bs", "16"]
    # under torchrun the launcher is killed; its ranks die with it
    out, _ = interrupted_run("stage3", args, tmp_path, after_rows=1, sig=signal.SIGKILL, file_name="cells.jsonl",
                             nproc=nproc)
    done_before = len((out / "cells.jsonl").read_text().splitlines())
    assert 2 <= done_before < 6
    with open(out / "cells.jsonl", "a") as f:  # and as if the kill had landed in the middle of an append
        f.write('{"key": "sophon|direct_all|momentum|0.0001|16|2", "start": "soph')

    proc = run_script("stage3", "--resume", out)  # in one process, whatever the killed run had
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{done_before} of 6 cells already done; running {6 - done_before}" in proc.stdout
    entries = [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]
    assert sorted(e["key"] for e in entries) == sorted({e["key"] for e in entries}) and len(entries) == 6
    cells = [(r["cell"], r["epoch"]) for r in read_rows(out / "metrics.csv")]
    assert len(cells) == len(set(cells)) == 6 * 2, "every (cell, epoch) row exactly once"
    assert len(json.loads((out / "summary.json").read_text())["results"]) == 6

"""--tensorboard: the rows a run appends to its CSVs also reach TensorBoard, read back here from the event files."""
import sys

import pytest

from common.cli import UsageError
from common.live import require_tensorboard
from common.runs import Run

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def _scalars(folder):
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, round(e.value, 6)) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_rows_are_mirrored_with_their_step_and_cell(tmp_path):
    run = Run.start(tmp_path / "run", {"tensorboard": True})
    loops = run.csv("metrics.csv", ["loop", "fts_loss", "orig_test_acc", "fts_optimizer"])
    loops.append({"loop": 1, "fts_loss": 2.5, "orig_test_acc": None, "fts_optimizer": "adam"})
    loops.append({"loop": 2, "fts_loss": 2.25, "orig_test_acc": 88.0, "fts_optimizer": "sgd"})
    cells = run.csv("grid.csv", ["cell", "epoch", "test_acc"])
    cells.append({"cell": "scratch|direct_all|adam|0.01|200|0", "epoch": 1, "test_acc": float("nan")})
    cells.append({"cell": "scratch|direct_all|adam|0.01|200|0", "epoch": 2, "test_acc": 40.5})
    run.unlock()
    assert _scalars(tmp_path / "run" / "tensorboard") == {
        "metrics/fts_loss": [(1, 2.5), (2, 2.25)], "metrics/orig_test_acc": [(2, 88.0)],
        "grid/scratch|direct_all|adam|0.01|200|0/test_acc": [(2, 40.5)]}
    assert len(loops.rows()) == 2, "the CSV stays the record"


def test_without_the_flag_nothing_is_mirrored(tmp_path):
    run = Run.start(tmp_path / "run", {})
    run.csv("metrics.csv", ["loop", "fts_loss"]).append({"loop": 1, "fts_loss": 1.0})
    run.unlock()
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_a_missing_package_is_a_one_line_error_naming_the_install(monkeypatch):
    from sophon_orig.stage2_train.algo import parse_args
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(UsageError, match="pip install tensorboard"):
        require_tensorboard()
    with pytest.raises(UsageError, match="--tensorboard needs the tensorboard package"):
        parse_args(["--tensorboard"])  # refused with the other flags, before any run folder exists


def test_stage2_with_the_flag_streams_its_loops(tmp_path, data_root, stage1_run, restore_signals):
    from conftest import STAGE2_ARGS
    from sophon_orig.stage2_train.algo import main
    out = tmp_path / "run"
    assert main([*STAGE2_ARGS, "--model_path", str(stage1_run), "--data_root", str(data_root), "--out_dir", str(out),
                 "--tensorboard"]) == 0
    scalars = _scalars(out / "tensorboard")
    assert [step for step, _ in scalars["metrics/fts_loss"]] == [1, 2, 3]
    assert [step for step, _ in scalars["finetune_tests/test_acc"]]  # the probes' curves too

"""Watching a long run live: the rows a run appends to its CSVs, mirrored to TensorBoard (`--tensorboard`).

metrics.csv stays the record (plots and summaries read it); the mirror only shows the same scalars as they
arrive, under `tensorboard/` in the run folder: `tensorboard --logdir runs/`. A row's step is its `loop`
(stage 2) or `epoch` (stages 1 and 3); a stage-3 row's tags carry its cell, one curve per cell.
"""
import math

from common.settings import UsageError

INSTALL = "pip install tensorboard (or pip install -e '.[tensorboard]')"
STEP_COLUMNS = ("loop", "epoch")


def require_tensorboard():
    """Refuse --tensorboard up front, before a run folder exists, when the package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError(f"--tensorboard needs the tensorboard package, which is not installed: {INSTALL}") from None
    return SummaryWriter


class TensorBoardMirror:
    def __init__(self, log_dir):
        self.writer = require_tensorboard()(str(log_dir))

    def __call__(self, csv_name, row):
        step = next((int(float(row[k])) for k in STEP_COLUMNS if row.get(k) not in (None, "")), None)
        prefix = csv_name + "/" + (f"{row['cell']}/" if row.get("cell") else "")
        for key, value in row.items():
            if key in STEP_COLUMNS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(prefix + key, value, step)
        self.writer.flush()

    def close(self):
        self.writer.close()

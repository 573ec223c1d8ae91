"""Command-line plumbing shared by every stage script.

Every refusal is one stderr line ``<script>: error: <message>`` with exit code 2 and no traceback
(SPEC §7); `run` turns `UsageError` (and its subclasses raised by data/checkpoint code) into that.
Flag families are settings groups (common.settings), so a flag means the same thing in every script.
"""
import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from common.models import ARCHS
# Parser, UsageError, build_parser and given_flags live in common.settings; many modules take them from here
from common.live import require_tensorboard
from common.settings import Parser, Settings, UsageError, setting  # noqa: F401 (Parser, UsageError: the scripts')

DEVICES = ("auto", "cpu", "cuda", "mps")


def script_name():
    return Path(sys.argv[0]).name or "sophon"


def run(main):
    """Run a script's main(), mapping user errors to one line + exit 2."""
    try:
        code = main()
    except UsageError as err:
        print(f"{script_name()}: error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)


# ---- value types: each rejects with a message that names the problem --------------------------

def pos_int(text):
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def nonneg_int(text):
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def batch_size(text):
    value = _int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be >= 2 (BatchNorm needs two samples per batch), got {text}")
    return value


def _float(text, rule, holds):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or not holds(value):
        raise argparse.ArgumentTypeError(f"must be finite and {rule}, got {text}")
    return value


def pos_float(text):
    return _float(text, "> 0", lambda v: v > 0)


def nonneg_float(text):
    return _float(text, ">= 0", lambda v: v >= 0)


def fraction(text):
    value = pos_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {text}")
    return value


def _int(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def comma_list(item_type, choices=None):
    """A comma list parsed item by item, duplicates dropped in order."""

    def parse(text):
        items = []
        for raw in text.split(","):
            raw = raw.strip()
            if not raw:
                raise argparse.ArgumentTypeError(f"empty item in {text!r}")
            if choices is not None and raw not in choices:
                raise argparse.ArgumentTypeError(f"unknown item {raw!r} (choose from {', '.join(choices)})")
            value = item_type(raw)
            if value not in items:
                items.append(value)
        return items

    parse.__name__ = f"comma list of {getattr(item_type, '__name__', 'items')}"
    parse.choices = choices  # listed in the generated help
    return parse


def value_range(text):
    """'LO,HI' of positive floats with LO <= HI, as a list (what config.json gives back on --resume)."""
    items = [pos_float(t.strip()) for t in text.split(",")]
    if len(items) != 2:
        raise argparse.ArgumentTypeError(f"expected two numbers LO,HI, got {text!r}")
    if items[0] > items[1]:
        raise argparse.ArgumentTypeError(f"LO {items[0]:g} is above HI {items[1]:g}")
    return items


def default_data_root():
    env = os.environ.get("SOPHON_DATA_ROOT")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1] / "datasets"


# ---- flag families -----------------------------------------------------------------------------

@dataclass
class CommonSettings(Settings):
    """Flags every script has. arch, orig_dataset and image_size None (stages 2-3): from the parent checkpoint."""
    arch: Optional[str] = setting(None, choices=ARCHS)
    data_root: Path = setting(help="dataset root (env SOPHON_DATA_ROOT, else datasets/ in the repo)", type=Path,
                              factory=default_data_root)
    orig_dataset: Optional[str] = setting(None, "original domain (the task the model keeps)")
    image_size: Optional[int] = setting(None, "resize every domain to N x N (CPU-scale runs use 32)", type=pos_int)
    subset: Optional[int] = setting(None, "cap training samples per domain", type=pos_int)
    test_subset: Optional[int] = setting(None, "cap test samples per domain", type=pos_int)
    bs: int = setting(64, "batch size", type=batch_size)
    seed: int = setting(0, type=nonneg_int)
    device: str = setting("auto", choices=DEVICES)
    num_workers: int = setting(0, "JPEG decoding workers", type=nonneg_int)
    out_dir: Optional[Path] = setting(None, "run folder (default runs/<project>/<stage>/<time>_<arch>_<dataset>)",
                                      type=Path)
    download: bool = setting(False, "let torchvision download missing datasets", action="store_true")
    resume: Optional[Path] = setting(None, "continue that run in place", type=Path, metavar="RUN_DIR")
    cache_dir: Optional[Path] = setting(None, "keep decoded, resized datasets here so later runs skip decoding",
                                        type=Path)
    tensorboard: bool = setting(False, "also stream metrics.csv's rows to TensorBoard (RUN_DIR/tensorboard) to watch "
                                       "the run live; needs the tensorboard package", action="store_true")

    def __post_init__(self):
        super().__post_init__()
        if self.tensorboard:
            require_tensorboard()


@dataclass
class RestrictedSettings(Settings):
    dataset: Optional[str] = setting(None, "restricted domain (the task fine-tuning must not learn); --datasets is "
                                           "the seed's spelling, kept for compatibility", aliases=("datasets",))


@dataclass
class SpeedSettings(Settings):
    amp: str = setting("auto", "bf16 autocast on CUDA when supported (never on CPU)", choices=("auto", "off"))
    channels_last: bool = setting(False, "channels_last memory format on CUDA (not applied with --compile: inductor "
                                         "picks the layout)", action="store_true")
    compile: bool = setting(False, "torch.compile (inductor) the model's forward and backward on CUDA, one graph per "
                                   "batch shape, compiled on first use; ignored on CPU (no faster there, and over a "
                                   "minute to compile on two cores); on an H200 slower than eager --channels_last for "
                                   "resnet18 (README)", action="store_true")


@dataclass
class PresetSettings(Settings):
    """--preset NAME: a named set of flag values (common.settings.parse fills in the script's presets). The
    preset only changes defaults, so every flag given on the command line, before or after it, still wins."""
    preset: Optional[str] = setting(None, "named configuration")

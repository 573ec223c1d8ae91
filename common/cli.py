"""Command-line plumbing shared by every stage script.

Every refusal is one stderr line ``<script>: error: <message>`` with exit code 2 and no traceback
(SPEC §7); `run` turns `UsageError` (and its subclasses raised by data/checkpoint code) into that.
Flag families are argparse parents, so a flag means the same thing in every script.
"""
import argparse
import copy
import math
import os
import sys
from pathlib import Path

ARCHS = ("resnet18", "resnet34", "resnet50", "caformer")
DEVICES = ("auto", "cpu", "cuda", "mps")


class UsageError(Exception):
    """A bad input the user can fix: reported in one line, exit code 2."""


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


class Parser(argparse.ArgumentParser):
    """argparse without the usage dump: errors become UsageError (one line, exit 2)."""

    def error(self, message):
        raise UsageError(message)


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

def common_flags(*, arch, orig_dataset, bs, seed, image_size=None, inherit=False):
    """Flags every script has. With inherit=True (stages 2-3) arch/orig_dataset/image_size default
    to None, meaning 'from the parent checkpoint'."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--arch", choices=ARCHS, default=None if inherit else arch)
    p.add_argument("--data_root", type=Path, default=default_data_root(),
                   help="dataset root (env SOPHON_DATA_ROOT, else datasets/ in the repo)")
    p.add_argument("--orig_dataset", default=None if inherit else orig_dataset,
                   help="original domain (the task the model keeps)")
    p.add_argument("--image_size", type=pos_int, default=None if inherit else image_size,
                   help="resize every domain to N x N (CPU-scale runs use 32)")
    p.add_argument("--subset", type=pos_int, default=None, help="cap training samples per domain")
    p.add_argument("--test_subset", type=pos_int, default=None, help="cap test samples per domain")
    p.add_argument("--bs", type=batch_size, default=bs, help="batch size")
    p.add_argument("--seed", type=nonneg_int, default=seed)
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--num_workers", type=nonneg_int, default=0, help="JPEG decoding workers")
    p.add_argument("--out_dir", type=Path, default=None, help="run folder (default runs/<project>/<stage>/<time>_<arch>_<dataset>)")
    p.add_argument("--download", action="store_true", help="let torchvision download missing datasets")
    p.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR", help="continue that run in place")
    p.add_argument("--cache_dir", type=Path, default=None,
                   help="keep decoded, resized datasets here so later runs skip decoding")
    return p


def restricted_flag(default=None):
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--dataset", "--datasets", dest="dataset", default=default,
                   help="restricted domain (the task fine-tuning must not learn); --datasets is the seed's "
                        "spelling, kept for compatibility")
    return p


def speed_flags():
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--amp", choices=("auto", "off"), default="auto",
                   help="bf16 autocast on CUDA when supported (never on CPU)")
    p.add_argument("--channels_last", action="store_true",
                   help="channels_last memory format on CUDA (not applied with --compile: inductor picks the layout)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile (inductor) the model's forward and backward on CUDA, one graph per batch shape, "
                        "compiled on first use; ignored on CPU (no faster there, and over a minute to compile on two "
                        "cores); on an H200 slower than eager --channels_last for resnet18 (README)")
    return p


def preset_flag(presets):
    """--preset NAME: a named set of flag values (flag -> value as typed on the command line). The preset
    only changes defaults, so every flag given on the command line, before or after it, still wins."""
    p = argparse.ArgumentParser(add_help=False)
    listing = "; ".join(f"{name}: " + " ".join(f"--{k} {v}" for k, v in values.items()) for name, values in presets.items())
    p.add_argument("--preset", choices=tuple(presets), default=None, help=f"named configuration ({listing})")
    return p


def parse_with_presets(parser, argv, presets, supersedes=None):
    """parser.parse_args(argv) with the chosen preset's values as defaults. `supersedes` maps a flag to the
    flags it takes the place of (--fts_lrs to --fts_lr_range): typed on the command line, it drops the
    preset's values for those, so the flag typed is the one that runs; typing both is refused."""
    args = parser.parse_args(argv)  # refuses bad input and answers --help before the probe below re-parses
    typed = given_flags(parser, argv)
    replaced = {name: flag for flag in typed for name in (supersedes or {}).get(flag, ())}
    for name, flag in replaced.items():
        if name in typed:
            parser.error(f"--{flag} takes the place of --{name}; give one of them")
    if args.preset in presets:
        parser.set_defaults(**{k: v for k, v in presets[args.preset].items() if k not in replaced})
        args = parser.parse_args(argv)
    return args


def given_flags(parser, argv=None):
    """Dest names of the flags present in argv: argv re-parsed with every default suppressed, so aliases and
    --flag=value forms count."""
    argv = sys.argv[1:] if argv is None else list(argv)
    probe = copy.deepcopy(parser)
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


def build_parser(doc, parents):
    # no abbreviations: --resume compares the flags given with the run's config, by their full names
    return Parser(description=(doc or "").strip().splitlines()[0], parents=parents, allow_abbrev=False,
                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)

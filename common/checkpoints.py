"""Self-describing checkpoints: plain types only, written atomically, loaded with weights_only=True.

A pickled payload cannot run here: `torch.load(..., weights_only=True)` is the only loader, so a file
carrying code is refused with a one-line error, not executed.
"""
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

from common.cli import UsageError
from common.models import build_model, classifier_head

FORMAT_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parents[1]
REQUIRED_KEYS = ("model", "arch", "num_classes", "dataset", "stage", "config", "metrics", "parent", "format_version")


class CheckpointError(UsageError):
    pass


def atomic_save(obj, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    replace_atomically(tmp, path, lambda: torch.save(obj, tmp))


def replace_atomically(tmp, path, write):
    """write() fills `tmp`, which then replaces `path`; a failed write leaves the old file and no temp."""
    try:
        write()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def unwrap(model):
    """The model under torch.compile's wrapper, whose state_dict keys are the plain ones."""
    return getattr(model, "_orig_mod", model)


def make_checkpoint(model, *, arch, dataset, stage, config, metrics, parent):
    state = {k: v.detach().to("cpu", copy=True) for k, v in unwrap(model).state_dict().items()}
    return {"model": state, "arch": arch, "num_classes": classifier_head(unwrap(model)).out_features,
            "dataset": dataset, "stage": stage, "config": _plain(config), "metrics": _plain(metrics),
            "parent": None if parent is None else str(parent), "format_version": FORMAT_VERSION}


def save_checkpoint(path, model, **meta):
    atomic_save(make_checkpoint(model, **meta), path)


def _plain(value):
    """Config and metrics as JSON-like plain types, so weights_only loading accepts them."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return str(value)


def load_file(path):
    """torch.load with weights_only=True; every failure is a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"(?:Unsupported global|Unsupported operand)[^.\n]*", str(err))
        detail = f" ({found.group(0).strip()[:160]})" if found else ""
        raise CheckpointError(f"{path} is refused: it carries pickled objects, not only tensors and plain types, "
                              f"so it is not loaded{detail}; re-save it as a state_dict checkpoint") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or foreign file: "
                              f"{type(err).__name__}); re-create it or point to another file") from None


def load_checkpoint(path):
    ckpt = load_file(path)
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a checkpoint of this project (missing keys); "
                              f"train it with a stage script or point to another file")
    if ckpt["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version {ckpt['format_version']}, this code reads {FORMAT_VERSION}")
    return ckpt


def model_from_checkpoint(ckpt, path="checkpoint"):
    model = build_model(ckpt["arch"], ckpt["num_classes"], init="scratch")
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit {ckpt['arch']} with {ckpt['num_classes']} classes "
                              f"({str(err).splitlines()[0][:160]})") from None
    return model


def resolve_checkpoint(path, project, prev_stage, what="--model_path"):
    """A .pt file, a run folder (-> checkpoints/final.pt), or None (-> newest final.pt of the previous stage)."""
    if path is None:
        base = REPO_ROOT / "runs" / project / prev_stage
        found = sorted(base.glob("*/checkpoints/final.pt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise CheckpointError(f"{what} not given and no final.pt under {base}; run {project}/{prev_stage} first "
                                  f"or pass {what}")
        print(f"{what}: using the newest {prev_stage} checkpoint {found[-1]}")
        return found[-1]
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        final = path / "checkpoints" / "final.pt"
        if not final.is_file():
            raise CheckpointError(f"run folder {path} has no checkpoints/final.pt (unfinished run? continue it "
                                  f"with --resume {path}, or pass a .pt file)")
        return final
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    return path


def inherit(args, ckpt, path, names):
    """Flags left at None take the parent's value; a given value that differs is an error."""
    config = ckpt["config"]
    for name in names:
        parent_value = ckpt["arch"] if name == "arch" else config.get(name)
        given = getattr(args, name)
        if given is None:
            setattr(args, name, parent_value)
        elif (name == "arch" or name in config) and given != parent_value:
            raise UsageError(f"--{name} {given} differs from the parent checkpoint's {parent_value} ({path}); "
                             f"drop the flag to inherit it")

"""Self-describing checkpoints: plain types only, written atomically, loaded with weights_only=True.

A pickled payload cannot run here: `torch.load(..., weights_only=True)` is the only loader, so a file
carrying code is refused with a one-line error, not executed.

Foreign weights: stages 2 and 3 also take a plain state_dict (`.pt`/`.pth`, torchvision's or timm's key
layout, which are the same for the resnets) or a `.safetensors` file, given `--arch` and `--orig_dataset`
(`load_parent`); stage 1 starts from one with `--init PATH` (`init_model`). `python -m common.checkpoints
export RUN_OR_PT --format state_dict|safetensors --out FILE` writes such a file from a checkpoint of ours.
"""
import argparse
import hashlib
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

from common.catalog import DATASETS, check_name
from common.cli import Parser, UsageError
from common.files import REPO_ROOT, atomic_save, replace_atomically
from common.models import build_model, classifier_head, head_path

FORMAT_VERSION = 1
REQUIRED_KEYS = ("model", "arch", "num_classes", "dataset", "stage", "config", "metrics", "parent", "format_version")


class CheckpointError(UsageError):
    pass


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
        found = re.search(r"(?:Unsupported global|Unsupported operand)(?:[^.\n]|\.(?=\w))*", str(err))
        detail = f" ({found.group(0).strip()[:160]})" if found else ""
        raise CheckpointError(f"{path} is refused: it carries pickled objects, not only tensors and plain types, "
                              f"so it is not loaded{detail}; if it is a model of yours, save its weights only, "
                              f"torch.save(model.state_dict(), path), and pass that file with --arch and "
                              f"--orig_dataset") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or foreign file: "
                              f"{type(err).__name__}); re-create it or point to another file") from None


def load_checkpoint(path):
    """This project's checkpoint, nothing else (see `load_parent` for plain weights files too)."""
    return _project_checkpoint(load_file(path), path)


def is_project_checkpoint(obj):
    return isinstance(obj, dict) and all(k in obj for k in REQUIRED_KEYS)


def _project_checkpoint(ckpt, path):
    if not is_project_checkpoint(ckpt):
        raise CheckpointError(f"{path} is not a checkpoint of this project (missing keys); train it with a stage "
                              f"script, or pass a plain state_dict to stage 2 or 3 with --arch and --orig_dataset")
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


# ---- foreign weights: plain state_dicts and .safetensors files -----------------------------------------

WRAPPER_KEYS = ("state_dict", "model")  # timm's training checkpoints wrap the weights under these
STRIP_PREFIXES = ("module.", "_orig_mod.")  # saved from a multi-GPU wrapper, or from torch.compile
EXPECTED_FORM = ("a dict of tensors as torch.save(model.state_dict(), path) writes it (or one wrapping it under "
                 "'state_dict' or 'model'), or a .safetensors file")
LAYOUTS = {"resnet18": "torchvision's or timm's resnet18", "resnet34": "torchvision's or timm's resnet34",
           "resnet50": "torchvision's or timm's resnet50", "caformer": "timm's caformer_m36"}


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_weights(path):
    """(content, format): a .safetensors file's tensors ('safetensors'), else torch.load(weights_only=True)'s
    result ('state_dict'); every failure is a one-line CheckpointError."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return load_file(path), "state_dict"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        from safetensors.torch import load_file as load_safetensors
    except ImportError:
        raise CheckpointError(f"{path}: reading .safetensors files needs the safetensors package "
                              f"(pip install safetensors)") from None
    try:
        return load_safetensors(str(path), device="cpu"), "safetensors"
    except Exception as err:  # safetensors' own error type (a header or size that does not parse), OSError
        detail = (str(err).splitlines() or [""])[0][:120]
        raise CheckpointError(f"{path} is not a readable .safetensors file ({type(err).__name__}: {detail}); "
                              f"re-create it or point to another file") from None


def _tensor_dict(obj):
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items())


def plain_state_dict(obj, path):
    """The weights of a foreign file: unwrapped from 'state_dict' / 'model', 'module.' and '_orig_mod.'
    prefixes stripped."""
    if isinstance(obj, dict) and not _tensor_dict(obj):
        obj = next((obj[k] for k in WRAPPER_KEYS if _tensor_dict(obj.get(k))), obj)
    if not _tensor_dict(obj):
        raise CheckpointError(f"{path} holds no state_dict; expected {EXPECTED_FORM}")
    state = {}
    for key, value in obj.items():
        name = key
        while name.startswith(STRIP_PREFIXES):
            name = name.split(".", 1)[1]
        state[name] = value
    return state


def _expected_state(arch, num_classes):
    """{key: shape} of `arch` with a `num_classes` head, and the head's name; built on the meta device."""
    with torch.device("meta"):
        model = build_model(arch, num_classes, init="scratch")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, head_path(model)


def _more(keys):
    return f"{keys[0]!r}" + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")


def _check_layout(state, expected, path, arch, optional=()):
    """The key set must be `expected`'s exactly (`optional` keys may be missing), and the shapes equal.
    BatchNorm's num_batches_tracked counters, absent from older files, are added as 0."""
    for key in expected:
        if key.endswith(".num_batches_tracked") and key not in state:
            state[key] = torch.tensor(0)
    missing = [k for k in expected if k not in state and k not in optional]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = ([f"missing {_more(missing)}"] if missing else []) + ([f"unexpected {_more(unexpected)}"]
                                                                      if unexpected else [])
        raise CheckpointError(f"{path}: its keys are not those of {arch} ({LAYOUTS.get(arch, arch)}): "
                              f"{', '.join(parts)}; expected {EXPECTED_FORM}")
    return state


def _check_shapes(state, expected, path, arch, skip=()):
    for key, shape in expected.items():
        if key in state and key not in skip and tuple(state[key].shape) != shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(state[key].shape)} where {arch} has {shape}; "
                                  f"is it a {arch}?")


def foreign_checkpoint(state, path, fmt, arch, orig_dataset, image_size=None):
    """A foreign state_dict as an in-memory checkpoint of this project (stage 'foreign', parent None); its
    'foreign' entry says what the run's config records (parent_format, parent_sha256)."""
    check_name(orig_dataset)
    num_classes = DATASETS[orig_dataset].num_classes
    expected, head = _expected_state(arch, num_classes)
    state = _check_layout(dict(state), expected, path, arch)
    outputs = state[f"{head}.weight"].shape[0]
    if outputs != num_classes:
        raise CheckpointError(f"{path}: head {head} has {outputs} outputs, {orig_dataset} has {num_classes} classes; "
                              f"fine-tune a {num_classes}-way head first (stage 1 --init {path})")
    _check_shapes(state, expected, path, arch)
    return {"model": state, "arch": arch, "num_classes": num_classes, "dataset": orig_dataset, "stage": "foreign",
            "config": {"orig_dataset": orig_dataset, "dataset": None, "image_size": image_size}, "metrics": {},
            "parent": None, "format_version": FORMAT_VERSION,
            "foreign": {"parent_format": fmt, "parent_sha256": file_sha256(path)}}


def load_parent(path, args, what="--model_path"):
    """A parent model for stages 2 and 3: a checkpoint of this project, or a plain state_dict / .safetensors
    file that `args.arch`, `args.orig_dataset` (and `args.image_size`) describe."""
    obj, fmt = read_weights(path)
    if fmt == "state_dict" and is_project_checkpoint(obj):
        return _project_checkpoint(obj, path)
    if isinstance(obj, dict) and "format_version" in obj and "arch" in obj:  # ours, but incomplete
        return _project_checkpoint(obj, path)
    state = plain_state_dict(obj, path)
    if getattr(args, "arch", None) is None or getattr(args, "orig_dataset", None) is None:
        raise UsageError(f"{what} {path} is a plain weights file, not a checkpoint of this project: give --arch "
                         f"and --orig_dataset (its architecture and the dataset its head was trained on)")
    return foreign_checkpoint(state, path, fmt, args.arch, args.orig_dataset, getattr(args, "image_size", None))


def is_foreign(ckpt):
    return "foreign" in ckpt


def foreign_record(ckpt, prefix="parent"):
    """What a run's config records about a foreign parent: {prefix_format, prefix_sha256}; {} for ours."""
    info = ckpt.get("foreign")
    if not info:
        return {}
    return {f"{prefix}_format": info["parent_format"], f"{prefix}_sha256": info["parent_sha256"]}


def require_given(args, names, path, what="--model_path"):
    """A foreign file records no flags: those in `names` must be given explicitly."""
    missing = [f"--{n}" for n in names if getattr(args, n, None) is None]
    if missing:
        raise UsageError(f"{what} {path} is a plain weights file, which does not record {', '.join(missing)}; "
                         f"give {'it' if len(missing) == 1 else 'them'} explicitly")


def init_model(arch, num_classes, init, dataset="the dataset"):
    """Stage 1's start model: build_model for 'imagenet' / 'scratch'; for a path, a scratch model whose body
    comes from that weights file (key set exact), and its head too when the head's size fits `num_classes`.
    Returns (model, note for the log or "", record for the run's config)."""
    if init in ("imagenet", "scratch"):
        return build_model(arch, num_classes, init), "", {}
    path = Path(init)
    model = build_model(arch, num_classes, init="scratch")
    obj, fmt = read_weights(path)
    state = obj["model"] if fmt == "state_dict" and is_project_checkpoint(obj) else plain_state_dict(obj, path)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    head = head_path(model)
    head_keys = {k for k in expected if k.startswith(head + ".")}
    state = _check_layout(dict(state), expected, path, arch, optional=head_keys)
    _check_shapes(state, expected, path, arch, skip=head_keys)
    record = {"init_format": fmt, "init_sha256": file_sha256(path)}
    if all(k in state and tuple(state[k].shape) == expected[k] for k in head_keys):
        model.load_state_dict(state, strict=True)
        return model, f"--init {path}: every weight loaded, the {num_classes}-way head {head} included", record
    body = {k: v for k, v in state.items() if k not in head_keys}
    result = model.load_state_dict(body, strict=False)
    assert set(result.missing_keys) == head_keys and not result.unexpected_keys, result
    found = state.get(f"{head}.weight")
    had = f"has {found.shape[0]} outputs" if found is not None else "is absent"
    return model, (f"--init {path}: body loaded; its head {head} {had}, {dataset} has {num_classes} classes: "
                   f"a fresh {num_classes}-way head is trained (as with --init imagenet)"), record


# ---- export: plain files for other people's code -------------------------------------------------------

# How other people's code builds an arch to load the exported weights; an arch not here is named by its build_model.
LOADERS = {"resnet18": "torchvision.models.resnet18(num_classes={n})",
           "resnet34": "torchvision.models.resnet34(num_classes={n})",
           "resnet50": "torchvision.models.resnet50(num_classes={n})",
           "caformer": "timm.create_model('caformer_m36', num_classes={n})"}


def export(source, out, fmt=None, force=False):
    """Write a checkpoint's (or a run folder's final.pt's) weights as a plain state_dict file (`torch.save` of a
    dict of tensors) or a .safetensors file. Returns (out, checkpoint, format)."""
    out = Path(out).expanduser()
    fmt = fmt or ("safetensors" if out.suffix == ".safetensors" else "state_dict")
    if fmt == "state_dict" and out.suffix == ".safetensors":
        raise UsageError(f"--out {out} ends in .safetensors but --format is state_dict; name it .pt or pass "
                         f"--format safetensors")
    path = resolve_checkpoint(source, None, None, what="RUN_OR_PT")
    ckpt = load_checkpoint(path)
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; name the file to write")
    if out.exists() and not force:
        raise UsageError(f"--out {out} exists; pass --force to overwrite it")
    # own, contiguous memory per tensor: safetensors refuses shared or strided storage
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in ckpt["model"].items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file
        meta = {"format": "pt", "arch": str(ckpt["arch"]), "num_classes": str(ckpt["num_classes"]),
                "dataset": str(ckpt["dataset"]), "stage": str(ckpt["stage"])}
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
        replace_atomically(tmp, out, lambda: save_file(state, str(tmp), metadata=meta))
    else:
        atomic_save(state, out)
    return out, ckpt, fmt


def main(argv=None):
    parser = Parser(prog="python -m common.checkpoints", description="Checkpoint tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", description="Write a checkpoint's weights as a file torchvision's / timm's "
                        "load_state_dict reads as it is.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ex.add_argument("source", metavar="RUN_OR_PT", type=Path, help="a run folder (its checkpoints/final.pt) or a .pt")
    ex.add_argument("--format", choices=("state_dict", "safetensors"), default=None,
                    help="state_dict: torch.save of the plain dict of tensors; safetensors: a .safetensors file "
                         "(default: from --out's suffix)")
    ex.add_argument("--out", type=Path, required=True, metavar="FILE")
    ex.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    args = parser.parse_args(argv)
    out, ckpt, fmt = export(args.source, args.out, args.format, args.force)
    model = LOADERS.get(ckpt["arch"], f"common.models.build_model({ckpt['arch']!r}, {{n}})").format(
        n=ckpt["num_classes"])
    reader = ("safetensors.torch.load_file(path)" if fmt == "safetensors"
              else "torch.load(path, weights_only=True)")
    print(f"wrote {out} ({fmt}, {len(ckpt['model'])} tensors of a {ckpt['arch']} with {ckpt['num_classes']} "
          f"classes); load it with {model}.load_state_dict({reader})")
    return 0


if __name__ == "__main__":  # python -m common.checkpoints export RUN_OR_PT --format ... --out FILE
    from common.cli import run
    run(main)

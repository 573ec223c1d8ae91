"""Writing files so that a crash never leaves half of one: the repository root and atomic replacement.

The bottom of the import graph: checkpoints, decoded-data caches and run folders all write through here.
"""
import json
import os
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def replace_atomically(tmp, path, write):
    """write() fills `tmp`, which then replaces `path`; a failed write leaves the old file and no temp."""
    try:
        write()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    replace_atomically(tmp, path, lambda: torch.save(obj, tmp))


def write_text_atomically(path, text):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    replace_atomically(tmp, path, lambda: tmp.write_text(text))


def write_json(path, obj):
    write_text_atomically(path, json.dumps(obj, indent=2, default=str) + "\n")

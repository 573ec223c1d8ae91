"""Small datasets written in each dataset's real on-disk format, so tests go through the real readers.

Images carry their class as a brightness level plus noise, so a few steps of training can learn them.
"""
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

WNIDS = ["n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
         "n03394916", "n03417042", "n03425413", "n03445777", "n03888257"]


def _images(n, shape, seed, classes=10):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    rng.shuffle(labels)
    base = (labels * (200 // classes) + 20).reshape((n,) + (1,) * len(shape))
    noise = rng.integers(0, 30, size=(n,) + shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8), labels.astype(np.int64)


def write_cifar10(root, n_train=50, n_test=20):
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    x, y = _images(n_train, (3, 32, 32), 1)
    for i, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": x[part].reshape(len(part), -1), "labels": y[part].tolist(),
                         "batch_label": f"training batch {i} of 5"}, f)
    x, y = _images(n_test, (3, 32, 32), 2)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": x.reshape(n_test, -1), "labels": y.tolist()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def _idx(path, array, gz):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        Path(path).write_bytes(data)


def write_mnist_like(root, name="MNIST", n_train=60, n_test=20, gz=False):
    raw = Path(root) / name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 3), ("t10k", n_test, 4)):
        x, y = _images(n, (28, 28), seed)
        _idx(raw / f"{prefix}-images-idx3-ubyte", x, gz)
        _idx(raw / f"{prefix}-labels-idx1-ubyte", y.astype(np.uint8), gz)


def write_svhn(root, n_train=30, n_test=10):
    from scipy.io import savemat
    for split, n, seed in (("train", n_train, 5), ("test", n_test, 6)):
        x, y = _images(n, (3, 32, 32), seed)
        labels = np.where(y == 0, 10, y).reshape(-1, 1)  # SVHN stores digit 0 as 10
        savemat(str(Path(root) / f"{split}_32x32.mat"), {"X": np.transpose(x, (2, 3, 1, 0)), "y": labels})


def write_imagenette(root, per_class=2, folder="imagenette2-160", size=(48, 40)):
    from PIL import Image
    for split, seed in (("train", 7), ("val", 8)):
        x, y = _images(per_class * 10, (size[1], size[0], 3), seed)
        for i, (img, label) in enumerate(zip(x, y)):
            d = Path(root) / folder / split / WNIDS[label]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"img_{i}.JPEG", quality=95)


def write_all(root):
    write_cifar10(root)
    write_mnist_like(root, "MNIST")
    write_mnist_like(root, "FashionMNIST", gz=True)
    write_svhn(root)
    write_imagenette(root)
    return Path(root)

"""The datasets this project knows: class count, normalisation and where each lives under the data root.

Below `common.data` (which reads them) and `common.checkpoints` (which needs a dataset's class count to check a
foreign state_dict's head), so neither imports the other.
"""
from dataclasses import dataclass

from common.cli import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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

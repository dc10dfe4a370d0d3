"""Dataset layer: every loader on tiny files written in the official formats (tests/fixtures_formats.py)."""
import gzip
import hashlib
import io
import os
import pickle
import re
import struct
import tarfile
import time
import tracemalloc
import warnings
import zipfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from stealnb import cli
from stealnb.core import data
from stealnb.core._checks import UsageError, check_images
from fixtures_formats import (IDX_NAMES, cifar_batch, idx_bytes, write_cifar, write_gtsrb,
                              write_idx, write_imagenet32, write_mnist_like, write_photos)


def _msg(excinfo) -> str:
    return str(excinfo.value)


# -- data_root ----------------------------------------------------------------------------------

def test_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("STEALNB_DATA", raising=False)
    assert data.data_root() == Path.home() / ".cache" / "stealnb"
    monkeypatch.setenv("STEALNB_DATA", str(tmp_path / "env"))
    assert data.data_root() == tmp_path / "env"
    assert data.data_root(tmp_path / "arg") == tmp_path / "arg"
    assert data.data_root(str(tmp_path / "arg")) == tmp_path / "arg"


# -- IDX (MNIST / Fashion-MNIST) ------------------------------------------------------------------

@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_raw_and_gz(tmp_path, gz):
    arrays = write_mnist_like(tmp_path / "mnist", gz=gz)
    ds = data.load_dataset("mnist", root=tmp_path)
    assert (len(ds.x_train), len(ds.x_test)) == (20, 10)
    check_images(ds.x_train)
    assert ds.y_train.dtype == np.int64 and ds.class_names == [str(i) for i in range(10)]
    np.testing.assert_array_equal(ds.y_train, arrays["y_train"])
    np.testing.assert_array_equal(ds.y_test, arrays["y_test"])
    # zero padding of 2 px each side, grey duplicated into three identical channels
    np.testing.assert_array_equal(ds.x_train[:, 2:30, 2:30, 1], arrays["x_train"] / np.float32(255))
    assert np.array_equal(ds.x_train[..., 0], ds.x_train[..., 2])
    assert ds.x_train[:, :2].max() == 0 and ds.x_train[:, :, 30:].max() == 0


def test_idx_known_pixel_lands_in_place(tmp_path):
    write_mnist_like(tmp_path / "mnist", gz=True)
    x = np.zeros((3, 28, 28), np.uint8)
    x[1, 3, 7] = 255
    write_idx(tmp_path / "mnist" / "t10k-images-idx3-ubyte", x, gz=True)
    write_idx(tmp_path / "mnist" / "t10k-labels-idx1-ubyte", np.array([0, 1, 2], np.uint8), gz=True)
    ds = data.load_dataset("mnist", root=tmp_path)
    assert ds.x_test.sum() == 3.0 and (ds.x_test[1, 5, 9] == 1.0).all()


def test_fashion_mnist_names_and_system_dir(tmp_path, monkeypatch):
    sysdir = tmp_path / "usr_share"
    write_mnist_like(sysdir, gz=True, seed=1)
    spec = data.SOURCES["fashion-mnist"]
    monkeypatch.setitem(data.SOURCES, "fashion-mnist", data._Source(spec.dirname, spec.files, (sysdir,), True, spec.hint))
    ds = data.load_dataset("fashion-mnist", root=tmp_path / "root")  # nothing under root: system dir used
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[-1] == "Ankle boot" and ds.num_classes == 10
    write_mnist_like(tmp_path / "root" / "fashion-mnist", gz=False, n_train=12)  # root wins over system dir
    assert len(data.load_dataset("fashion-mnist", root=tmp_path / "root").x_train) == 12
    monkeypatch.setitem(data.SOURCES, "fashion-mnist", data._Source(spec.dirname, spec.files, (), True, spec.hint))
    with pytest.raises(data.DatasetMissing) as e:
        data.load_dataset("fashion-mnist", root=tmp_path / "empty")
    assert "stealnb data fetch fashion-mnist" in _msg(e)


@pytest.mark.parametrize("damage, words", [
    ("truncate_raw", ["truncated", "train-images-idx3-ubyte"]),
    ("truncate_gz", ["t10k-labels-idx1-ubyte.gz", "truncated"]),
    ("extra_bytes", ["train-images-idx3-ubyte", "header dims (20, 28, 28) need 15680"]),
    ("magic", ["magic number 2049", "expected 2051"]),
    ("count", ["train-labels-idx1-ubyte.gz", "header dims (19,), expected (20,)"]),
])
def test_idx_corrupt(tmp_path, damage, words):
    d = tmp_path / "mnist"
    write_mnist_like(d, gz=damage not in ("truncate_raw", "extra_bytes"))
    if damage == "truncate_raw":
        p = d / "train-images-idx3-ubyte"
        p.write_bytes(p.read_bytes()[:-100])
    elif damage == "extra_bytes":
        p = d / "train-images-idx3-ubyte"
        p.write_bytes(p.read_bytes() + b"\0" * 28)
    elif damage == "truncate_gz":
        p = d / "t10k-labels-idx1-ubyte.gz"
        p.write_bytes(p.read_bytes()[:-8])
    elif damage == "magic":  # a labels file where the images belong
        (d / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(20, np.uint8))))
    else:
        write_idx(d / "train-labels-idx1-ubyte", np.zeros(19, np.uint8), gz=True)
    with pytest.raises(data.DatasetCorrupt) as e:
        data.load_dataset("mnist", root=tmp_path)
    for w in words:
        assert w in _msg(e)


def _gz_idx(path: Path, magic: int, dims: tuple, zeros: int) -> Path:
    """A .gz holding an IDX header claiming ``dims`` and then ``zeros`` zero bytes, written 1 MiB at a time."""
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(struct.pack(">i", magic) + struct.pack(f">{len(dims)}I", *dims))
        for s in range(0, zeros, 1 << 20):
            f.write(bytes(min(1 << 20, zeros - s)))
    return path


@pytest.mark.parametrize("dims", [(2**31, 2**31, 4), (2**32 - 1, 28, 28)])  # product 2**64 wraps to 0 in int64
def test_idx_header_with_absurd_dims_is_refused_naming_the_file(tmp_path, dims):
    write_mnist_like(tmp_path / "mnist", gz=True)
    p = _gz_idx(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz", 2051, dims, 0)
    with pytest.raises(data.DatasetCorrupt) as e:
        data.load_dataset("mnist", root=tmp_path)
    assert str(p) in _msg(e) and f"header dims {dims}" in _msg(e)


@pytest.mark.parametrize("n", [20, 2**20])  # a header true to the 20 labels / one announcing 822 MB
def test_idx_gzip_bomb_is_refused_without_inflating_it(tmp_path, n):
    write_mnist_like(tmp_path / "mnist", gz=True)
    p = _gz_idx(tmp_path / "mnist" / "train-images-idx3-ubyte.gz", 2051, (n, 28, 28), 64 << 20)
    assert p.stat().st_size < 1 << 20  # 64 MiB of payload in a file of a few hundred KB
    tracemalloc.start()
    try:
        with pytest.raises(data.DatasetCorrupt) as e:
            data.load_dataset("mnist", root=tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(p) in _msg(e) and "header dims" in _msg(e)
    assert peak < 8 << 20, f"{peak / 2**20:.0f} MiB allocated to refuse the file"


# -- missing data -------------------------------------------------------------------------------

def test_missing_dataset_message(tmp_path):
    with pytest.raises(data.DatasetMissing) as e:
        data.load_dataset("cifar10", root=tmp_path)
    m = _msg(e)
    assert isinstance(e.value, FileNotFoundError)
    assert "'cifar10'" in m and str(tmp_path / "cifar10") in m
    assert "cifar-10-batches-py/data_batch_1" in m and "cifar-10-batches-py/batches.meta" in m
    assert "stealnb data fetch cifar10" in m
    write_cifar(tmp_path)
    (tmp_path / "cifar10" / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(data.DatasetMissing) as e:
        data.load_dataset("cifar10", root=tmp_path)
    assert "test_batch" in _msg(e) and "data_batch_1" not in _msg(e)


def test_unknown_dataset_lists_names():
    with pytest.raises(KeyError, match="digits"):
        data.load_dataset("nope")


# -- CIFAR-10 and the restricted unpickler --------------------------------------------------------

def test_cifar10_channel_order_and_labels(tmp_path):
    written = write_cifar(tmp_path)
    d = tmp_path / "cifar10" / "cifar-10-batches-py"
    known = np.zeros((2, 3, 32, 32), np.uint8)
    known[0, 0, 0, 1] = 255    # R at row 0, col 1
    known[0, 1, 2, 3] = 51     # G at row 2, col 3
    known[1, 2, 31, 30] = 102  # B at row 31, col 30
    (d / "test_batch").write_bytes(cifar_batch(known.reshape(2, 3072), [3, 9], b"testing batch 1 of 1"))
    ds = data.load_dataset("cifar10", root=tmp_path)
    assert ds.x_train.shape == (20, 32, 32, 3) and ds.x_test.shape == (2, 32, 32, 3)
    check_images(ds.x_train)
    assert ds.class_names[0] == "airplane" and ds.class_names[9] == "truck"
    np.testing.assert_array_equal(ds.y_train, written["train_labels"])
    np.testing.assert_array_equal(ds.y_test, [3, 9])
    assert ds.x_test[0, 0, 1, 0] == 1.0 and ds.x_test[0, 2, 3, 1] == np.float32(51) / np.float32(255)
    assert ds.x_test[1, 31, 30, 2] == np.float32(0.4) and np.count_nonzero(ds.x_test) == 3
    first = written["train"][0][0].reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_array_equal(ds.x_train[0], first / np.float32(255))


def test_cifar10_pickle_from_old_numpy_module_path(tmp_path):
    write_cifar(tmp_path)
    p = tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_3"
    raw = p.read_bytes()
    assert b"numpy._core.multiarray" in raw
    p.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))  # as in the 2009 originals
    assert len(data.load_dataset("cifar10", root=tmp_path).x_train) == 20


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": _Evil(marker), b"labels": [1]}, protocol=2)
    with pytest.raises(data.UnsafePickle) as e:
        data.RestrictedUnpickler(io.BytesIO(payload)).load()
    assert "system" in _msg(e) and "refusing" in _msg(e)
    write_cifar(tmp_path)
    (tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_2").write_bytes(payload)
    with pytest.raises(data.DatasetCorrupt) as e:
        data.load_dataset("cifar10", root=tmp_path)
    assert "data_batch_2" in _msg(e) and "system" in _msg(e)
    assert not marker.exists()
    # plain containers and numpy arrays still pass
    ok = pickle.dumps({b"a": np.arange(5, dtype=np.uint8), "b": [1, (2.0, b"x")], "c": np.float64(3)}, protocol=2)
    out = data.RestrictedUnpickler(io.BytesIO(ok)).load()
    np.testing.assert_array_equal(out[b"a"], np.arange(5))
    assert out["b"] == [1, (2.0, b"x")] and out["c"] == 3.0


@pytest.mark.parametrize("damage", ["truncate", "shape", "labels"])
def test_cifar10_corrupt(tmp_path, damage):
    write_cifar(tmp_path)
    p = tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_4"
    if damage == "truncate":
        p.write_bytes(p.read_bytes()[:500])
    elif damage == "shape":
        p.write_bytes(cifar_batch(np.zeros((4, 1024), np.uint8), [0, 1, 2, 3]))
    else:
        p.write_bytes(cifar_batch(np.zeros((4, 3072), np.uint8), [0, 1, 2, 10]))
    with pytest.raises(data.DatasetCorrupt, match="data_batch_4"):
        data.load_dataset("cifar10", root=tmp_path)


# -- GTSRB ----------------------------------------------------------------------------------------

# 12 classes: top-10 by count must take 40, 0, 3, 5, 7, 9, 11 (>= 3 images) and then 14, 17, 20 out of
# the four classes with 2 images (tie broken by class id), leaving out 25 and 31.
COUNTS = {40: 5, 0: 4, 3: 4, 5: 3, 7: 3, 9: 3, 11: 3, 14: 2, 17: 2, 20: 2, 25: 2, 31: 1}
KEEP = [0, 3, 5, 7, 9, 11, 14, 17, 20, 40]
TEST_CLASSES = [31, 0, 25, 40, 14, 20, 3, 3, 9]


@pytest.fixture
def gtsrb_root(tmp_path):
    written = write_gtsrb(tmp_path, COUNTS, TEST_CLASSES)
    return tmp_path, written


def test_gtsrb43_crop_order_and_pattern(gtsrb_root):
    root, written = gtsrb_root
    ds = data.load_dataset("gtsrb43", root=root)
    assert ds.num_classes == 43 and ds.class_names[14] == "Stop"
    assert ds.x_train.shape == (sum(COUNTS.values()), 32, 32, 3) and ds.x_test.shape == (len(TEST_CLASSES), 32, 32, 3)
    check_images(ds.x_train)
    np.testing.assert_array_equal(ds.y_train, [c for c, _, _ in written["train"]])  # file order kept
    np.testing.assert_array_equal(ds.y_test, TEST_CLASSES)
    for x, (_, g, b) in zip(np.concatenate([ds.x_train, ds.x_test]), written["train"] + written["test"]):
        u8 = np.round(x * 255).astype(int)
        assert (u8[..., 1] == g).all() and (u8[..., 2] == b).all()  # no border pixel (255) leaked in
        assert (u8[:8, :, 0] == 200).all() and (u8[-8:, :, 0] == 40).all()  # top/bottom not flipped


def test_gtsrb_top10_subset(gtsrb_root):
    root, _ = gtsrb_root
    ds = data.load_dataset("gtsrb", root=root)
    assert ds.num_classes == 10 and ds.class_names == [data.GTSRB_CLASSES[c] for c in KEEP]
    assert ds.class_names[-1] == "Roundabout mandatory"
    np.testing.assert_array_equal(np.bincount(ds.y_train, minlength=10), [COUNTS[c] for c in KEEP])
    expected_test = [KEEP.index(c) for c in TEST_CLASSES if c in KEEP]
    np.testing.assert_array_equal(ds.y_test, expected_test)
    # green channel encodes the original class id (5 * id): the remapping matches the images
    np.testing.assert_allclose(ds.x_train[:, 0, 0, 1] * 255, 5 * np.array(KEEP)[ds.y_train], atol=1e-3)


def test_gtsrb_top_classes_tie_break():
    y = np.repeat(np.arange(12), [3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 9])
    np.testing.assert_array_equal(data.gtsrb_top_classes(y), [0, 1, 2, 3, 4, 5, 6, 7, 8, 11])
    with pytest.raises(data.DatasetCorrupt, match="at least 10"):
        data.gtsrb_top_classes(np.arange(9))


def test_gtsrb_gt_csv_alternative_location_and_missing(tmp_path):
    write_gtsrb(tmp_path / "a", COUNTS, TEST_CLASSES, gt_location="GTSRB/Final_Test/Images/GT-final_test.csv")
    assert len(data.load_dataset("gtsrb43", root=tmp_path / "a").x_test) == len(TEST_CLASSES)
    write_gtsrb(tmp_path / "b", COUNTS, TEST_CLASSES, gt_location=None)
    with pytest.raises(data.DatasetMissing) as e:
        data.load_dataset("gtsrb", root=tmp_path / "b")
    assert "GT-final_test.csv" in _msg(e) and "GTSRB_Final_Test_GT.zip" in _msg(e)
    assert str(tmp_path / "b" / "gtsrb") in _msg(e)


@pytest.mark.parametrize("damage", ["roi", "truncated_ppm", "missing_ppm", "bad_row"])
def test_gtsrb_corrupt(gtsrb_root, damage):
    root, _ = gtsrb_root
    cdir = root / "gtsrb" / "GTSRB" / "Final_Training" / "Images" / "00005"
    csv_path = cdir / "GT-00005.csv"
    lines = csv_path.read_text().splitlines()
    f = lines[1].split(";")
    if damage == "roi":
        f[5] = str(int(f[1]) + 3)  # Roi.X2 beyond the width
        lines[1] = ";".join(f)
    elif damage == "bad_row":
        lines[1] = ";".join(f[:4])
    elif damage == "truncated_ppm":
        p = cdir / f[0]
        p.write_bytes(p.read_bytes()[:40])
    else:
        (cdir / f[0]).unlink()
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(data.DatasetCorrupt) as e:
        data.load_dataset("gtsrb43", root=root)
    assert ("GT-00005.csv" if damage == "bad_row" else f[0]) in _msg(e)


@pytest.mark.parametrize("how", ["relative", "absolute"])
@pytest.mark.parametrize("part", ["train", "test"])
def test_gtsrb_refuses_a_csv_filename_outside_its_folder(gtsrb_root, part, how):
    root, _ = gtsrb_root
    if part == "train":
        folder = root / "gtsrb" / "GTSRB" / "Final_Training" / "Images" / "00005"
        csv_path = folder / "GT-00005.csv"
    else:  # the test csv lives above the folder its names refer to
        folder, csv_path = root / "gtsrb" / "GTSRB" / "Final_Test" / "Images", root / "gtsrb" / "GT-final_test.csv"
    lines = csv_path.read_text().splitlines()
    name = lines[1].split(";")[0]
    secret = root / "secret.ppm"  # outside the data folder, with the size the row expects
    (folder / name).rename(secret)
    lines[1] = lines[1].replace(name, os.path.relpath(secret, folder) if how == "relative" else str(secret), 1)
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(data.DatasetCorrupt) as e:
        data.load_dataset("gtsrb43", root=root)
    assert str(csv_path) in _msg(e) and "line 2" in _msg(e) and "secret.ppm" in _msg(e)


def test_gtsrb_cache_reused_and_invalidated(gtsrb_root):
    root, _ = gtsrb_root
    first = data.load_dataset("gtsrb43", root=root)
    assert (root / "gtsrb" / ".stealnb-gtsrb-32x32.npz").is_file()
    cdir = root / "gtsrb" / "GTSRB" / "Final_Training" / "Images" / "00000"
    victim = next(cdir.glob("*.ppm"))
    victim.rename(victim.with_suffix(".bak"))  # the cache answers without reading images
    np.testing.assert_array_equal(data.load_dataset("gtsrb43", root=root).x_train, first.x_train)
    with open(cdir / "GT-00000.csv", "a") as f:  # a changed csv invalidates the cache
        f.write("\n")
    with pytest.raises(data.DatasetCorrupt, match="not found"):
        data.load_dataset("gtsrb43", root=root)


# -- digits (embedded) ----------------------------------------------------------------------------

def test_digits_embedded_split():
    ds = data.load_dataset("digits")
    check_images(ds.x_train)
    check_images(ds.x_test)
    assert len(ds.x_train) + len(ds.x_test) == 1797 and abs(len(ds.x_test) - 0.2 * 1797) < 10
    assert np.array_equal(ds.x_train[..., 0], ds.x_train[..., 1])
    tr, te = np.bincount(ds.y_train), np.bincount(ds.y_test)
    np.testing.assert_allclose(te / (tr + te), 0.2, atol=0.02)
    again = data.load_dataset("digits")
    np.testing.assert_array_equal(again.y_test, ds.y_test)
    assert ds.x_train.max() == 1.0 and ds.x_train.min() == 0.0


def test_upsample_matches_skimage_bilinear(rng):
    from skimage.transform import resize

    x = rng.random((3, 8, 8))
    ref = np.stack([resize(im, (32, 32), order=1, mode="edge", anti_aliasing=False) for im in x])
    np.testing.assert_allclose(data.upsample_bilinear(x), ref, atol=1e-12)


def test_stratified_subsample_keeps_proportions():
    y = np.repeat(np.array([0, 1, 2], np.int64), [100, 50, 30])
    idx = data.stratified_subsample(y, 0.1, seed=3)
    assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(np.bincount(y[idx]), [10, 5, 3])
    np.testing.assert_array_equal(idx, data.stratified_subsample(y, 0.1, seed=3))
    assert not np.array_equal(idx, data.stratified_subsample(y, 0.1, seed=4))
    for bad in (0, 1.5, -0.1, True):
        with pytest.raises(ValueError):
            data.stratified_subsample(y, bad, seed=0)


# -- ImageNet32 memmap pool -----------------------------------------------------------------------

def test_imagenet32_pool_memmap(tmp_path):
    d = tmp_path / "imagenet32"
    write_imagenet32(d, [300, 250, 150], npz={2})
    pool = data.load_pool("imagenet32", root=tmp_path)
    assert len(pool) == 700
    assert isinstance(pool.uint8, np.memmap) and isinstance(pool.storage, np.memmap)
    assert not pool.uint8.flags.writeable
    assert sorted(p.name for p in d.iterdir()) == ["pool_uint8.json", "pool_uint8.npy", "train_data_batch_1",
                                                   "train_data_batch_2.npz", "train_data_batch_3"]
    idx = np.array([699, 3, 300, 256, 3])
    x = pool.get(idx)
    assert type(x) is np.ndarray and x.dtype == np.float32 and x.shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(np.round(x[:, 0, 0, 0] * 255), idx % 256)         # R plane -> channel 0
    np.testing.assert_array_equal(np.round(x[:, 1, 2, 1] * 255), (idx // 256) % 256)  # G plane -> channel 1
    assert (np.round(x[:, 31, 31, 2] * 255) == 7).all() and np.count_nonzero(x[:, 31, 31, :2]) == 0
    seen = []
    for chunk, xb in pool.batches(batch_size=128):
        assert xb.dtype == np.float32 and len(xb) <= 128
        seen.append(chunk)
    np.testing.assert_array_equal(np.concatenate(seen), np.arange(700))
    (chunk, xb), = list(pool.batches(batch_size=10, idx=idx))
    np.testing.assert_array_equal(xb, x)
    with pytest.raises(IndexError):
        pool.get([700])


def test_imagenet32_subset_cache_and_rebuild(tmp_path):
    d = tmp_path / "imagenet32"
    write_imagenet32(d, [200, 100])
    a = data.load_pool("imagenet32", root=tmp_path, n=50, seed=1)
    b = data.load_pool("imagenet32", root=tmp_path, n=50, seed=1)
    c = data.load_pool("imagenet32", root=tmp_path, n=50, seed=2)
    assert len(a) == 50 and isinstance(a.storage, np.memmap)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert not np.array_equal(a.indices, c.indices)
    np.testing.assert_array_equal(a.uint8, a.storage[a.indices])
    np.testing.assert_array_equal(a.get(np.arange(50)), a.uint8 / np.float32(255))
    mtime = (d / "pool_uint8.npy").stat().st_mtime_ns
    time.sleep(0.01)
    data.load_pool("imagenet32", root=tmp_path)
    assert (d / "pool_uint8.npy").stat().st_mtime_ns == mtime  # converted once
    write_imagenet32(d, [200, 100, 40])                          # a new batch: rebuilt
    assert len(data.load_pool("imagenet32", root=tmp_path)) == 340
    with pytest.raises(ValueError, match="exceeds"):
        data.load_pool("imagenet32", root=tmp_path, n=341)


def test_imagenet32_missing_and_corrupt(tmp_path):
    with pytest.raises(data.DatasetMissing) as e:
        data.load_pool("imagenet32", root=tmp_path)
    assert "image-net.org" in _msg(e) and str(tmp_path / "imagenet32") in _msg(e)
    d = tmp_path / "imagenet32"
    write_imagenet32(d, [10])
    (d / "train_data_batch_2").write_bytes(pickle.dumps({"data": np.zeros((5, 100), np.uint8)}))
    with pytest.raises(data.DatasetCorrupt, match="train_data_batch_2"):
        data.load_pool("imagenet32", root=tmp_path)
    assert sorted(p.name for p in d.iterdir()) == ["train_data_batch_1", "train_data_batch_2"]  # no partial .npy


# -- offline pools --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["natural-patches", "uniform-noise", "dead-leaves"])
def test_offline_pools_deterministic(name):
    a = data.load_pool(name, n=64, seed=5)
    b = data.load_pool(name, n=64, seed=5)
    c = data.load_pool(name, n=64, seed=6)
    assert len(a) == 64 and a.uint8.dtype == np.uint8 and a.uint8.shape == (64, 32, 32, 3)
    assert not a.uint8.flags.writeable
    np.testing.assert_array_equal(a.uint8, b.uint8)
    assert not np.array_equal(a.uint8, c.uint8)
    check_images(a.get(np.arange(64)))
    assert a.uint8.std() > 10  # not blank


def test_natural_patches_use_offline_photos():
    names = [n for n, _ in data.natural_photos()]
    assert {"astronaut", "coffee", "china", "flower"} <= set(names)
    pool = data.load_pool("natural-patches", n=200, seed=0)
    per_image_std = pool.uint8.reshape(200, -1).std(axis=1)
    assert np.median(per_image_std) > 5  # real texture, not flat crops


def _min_rms_between(u8: np.ndarray) -> float:
    """The smallest RMS difference between the thumbnails of two patches (all pairs, brute force)."""
    t = data.patch_thumbnails(u8)
    d2 = ((t[:, None, :] - t[None, :, :]) ** 2).mean(-1)
    d2[np.diag_indices(len(t))] = np.inf
    return float(np.sqrt(d2.min()))


def test_a_pool_cut_from_photos_has_no_two_patches_within_the_dedupe_threshold(tmp_path):
    photos = write_photos(tmp_path / "photos")
    pool = data.load_pool("natural-patches", n=600, seed=0, photos=photos)
    assert pool.uint8.shape == (600, 32, 32, 3) and pool.uint8.dtype == np.uint8
    assert _min_rms_between(pool.uint8) >= data.DEDUPE_RMS
    # The flat half of the first photo alone gives hundreds of identical patches: they were dropped.
    assert pool.info["duplicates_dropped"] > 100
    assert pool.info["sources"] == [str(p) for p in photos] and pool.info["dedupe_rms"] == data.DEDUPE_RMS
    flat = (pool.uint8 == (120, 60, 30)).all(axis=(1, 2, 3))
    assert flat.sum() == 1  # one copy of the flat colour is kept


def test_a_photo_pool_is_deterministic_and_a_smaller_pool_is_the_start_of_a_larger(tmp_path):
    photos = write_photos(tmp_path / "photos")
    big = data.load_pool("natural-patches", n=2500, seed=3, photos=photos)
    small = data.load_pool("natural-patches", n=700, seed=3, photos=photos)
    np.testing.assert_array_equal(small.uint8, big.uint8[:700])
    assert small.info["duplicates_dropped"] <= big.info["duplicates_dropped"]
    other = data.load_pool("natural-patches", n=700, seed=4, photos=photos)
    assert not np.array_equal(other.uint8, small.uint8)


def test_photos_that_cannot_supply_n_distinct_patches_are_refused(tmp_path):
    from PIL import Image

    flat = tmp_path / "flat.png"
    Image.fromarray(np.full((100, 120, 3), 77, np.uint8)).save(flat)
    with pytest.raises(UsageError, match=r"1 photos gave only 1 distinct patches in .* ask for fewer patches"):
        data.load_pool("natural-patches", n=50, seed=0, photos=[flat])


def test_large_photos_are_read_at_the_scale_of_the_bundled_ones(tmp_path):
    from PIL import Image

    big = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1200, 2000, 3), dtype=np.uint8)).save(big)
    assert data.read_photo(big).shape == (data.PHOTO_SIDE, round(2000 * data.PHOTO_SIDE / 1200), 3)
    small = write_photos(tmp_path / "photos")[1]
    assert data.read_photo(small).shape == (200, 200, 3)  # smaller ones as they are
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(data.DatasetCorrupt, match="broken.jpg: cannot read image"):
        data.read_photo(tmp_path / "broken.jpg")
    Image.fromarray(np.zeros((20, 300, 3), np.uint8)).save(tmp_path / "strip.png")
    with pytest.raises(data.DatasetCorrupt, match="strip.png: 300x20 pixels, smaller than one 32x32 patch"):
        data.read_photo(tmp_path / "strip.png")


def test_missing_wallpapers_fall_back_to_the_bundled_photos_with_one_warning(tmp_path):
    present = write_photos(tmp_path / "photos")[0]
    table = {"no-such-wallpapers": (str(tmp_path / "gone.jpg"),), "fixture-wallpapers": (str(present),)}
    with pytest.warns(UserWarning) as caught:
        photos = data.natural_photos(table)
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "no-such-wallpapers" in msg and "apt-get install no-such-wallpapers" in msg and "fixture" not in msg
    names = [name for name, _ in photos]
    assert {"astronaut", "coffee", "china", "flower"} <= set(names) and names[-1] == str(present)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert data.natural_photos(table) is photos  # one note per process, not one per pool


def test_the_wallpaper_table_lists_packages_that_make_sysdeps_installs():
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    syspkgs = next(line for line in makefile.splitlines() if line.startswith("SYSPKGS")).split("=")[1].split()
    assert set(data.WALLPAPER_PHOTOS) <= set(syspkgs)
    paths = [p for ps in data.WALLPAPER_PHOTOS.values() for p in ps]
    assert len(paths) == len(set(paths)) == 25 and all(p.startswith("/usr/share/backgrounds/") for p in paths)


def test_installed_wallpapers_join_the_natural_patches_pool():
    if data.wallpapers_present()[1]:
        pytest.skip("the Debian wallpaper packages are not installed (make sysdeps)")
    photos = dict(data.natural_photos())
    for path in (p for ps in data.WALLPAPER_PHOTOS.values() for p in ps):
        assert min(photos[path].shape[:2]) == data.PHOTO_SIDE
    pool = data.load_pool("natural-patches", n=300, seed=0)
    assert pool.info["sources"] == list(photos) and "wallpapers_missing" not in pool.info


def test_data_list_shows_the_photos_and_the_near_duplicates_dropped(tmp_path, capsys):
    row = next(r for r in data.list_local(tmp_path) if r["name"] == "natural-patches")
    assert row["photos"] == len(data.natural_photos()) and "duplicates_dropped" not in row  # cheap by default
    assert cli.main(["--data-root", str(tmp_path), "data", "list"]) == 0  # builds the default pool
    out = capsys.readouterr().out
    assert f"{row['photos']} photos: " in out
    assert re.search(r"\n +20,000 patches \(seed 0\): [\d,]+ near-duplicates dropped\n", out)
    assert sum(line.split()[0] == "digits" for line in out.splitlines() if line.strip()) == 1  # listed once
    assert "--pool NAME" in out


# -- cross-domain pools and the pool checks --------------------------------------------------------

def test_any_dataset_is_a_cross_domain_pool_with_the_uint8_contract(tmp_path):
    arrays = write_mnist_like(tmp_path / "fashion-mnist", gz=True)
    pool = data.load_pool("fashion-mnist", root=tmp_path)
    assert len(pool) == 20 and pool.uint8.dtype == np.uint8 and pool.uint8.shape == (20, 32, 32, 3)
    for c in range(3):  # the train split's exact pixels, zero-padded, grey in every channel
        np.testing.assert_array_equal(pool.uint8[:, 2:30, 2:30, c], arrays["x_train"])
    assert pool.uint8[:, :2].max() == 0
    np.testing.assert_array_equal(pool.get(np.arange(20)), data.load_dataset("fashion-mnist", root=tmp_path).x_train)
    a = data.load_pool("fashion-mnist", root=tmp_path, n=12, seed=1)
    b = data.load_pool("fashion-mnist", root=tmp_path, n=12, seed=1)
    assert len(a) == 12 and a.uint8.shape == (12, 32, 32, 3)
    np.testing.assert_array_equal(a.uint8, b.uint8)
    assert a.describe() == {"name": "fashion-mnist", "size": 12, "transform": None, "dataset": "fashion-mnist",
                            "split": "train", "train_size": 20, "seed": 1}
    with pytest.raises(ValueError, match="n=21 exceeds the 20 images of the fashion-mnist pool"):
        data.load_pool("fashion-mnist", root=tmp_path, n=21)
    digits = data.load_pool("digits", n=1000, seed=0)
    assert digits.uint8.shape == (1000, 32, 32, 3) and digits.uint8.dtype == np.uint8
    assert set(data.DATASETS.names()) <= set(data.POOLS.names())


def test_the_secrets_own_dataset_is_refused_as_a_pool_unless_asked_for():
    for pool, secret in [("digits", "digits"), ("fashion-mnist", "fashion-mnist"), ("gtsrb43", "gtsrb")]:
        with pytest.raises(UsageError) as e:
            data.check_pool(pool, 1000, secret_dataset=secret)
        msg = _msg(e)
        assert msg.startswith(f"pool {pool!r} holds the images of the secret's own dataset {secret!r}")
        assert "problem-domain data (Copycat's PDD), not a thief pool" in msg
        assert "--allow-problem-domain-pool" in msg and "natural-patches" in msg and f"{pool}, " not in msg
        data.check_pool(pool, 1000, secret_dataset=secret, allow_problem_domain=True)
    data.check_pool("fashion-mnist", 1000, secret_dataset="digits")
    data.check_pool("digits", 1000, secret_dataset="mnist")  # other images of the same kind: a real pool
    with pytest.raises(UsageError, match="pool transform: expected one of gray, got 'sepia'"):
        data.check_pool("natural-patches", transform="sepia")


def _exact_luma(rgb) -> int:
    r, g, b = (int(v) for v in rgb)
    y = Fraction(299, 1000) * r + Fraction(587, 1000) * g + Fraction(114, 1000) * b
    return int(y + Fraction(1, 2))  # rounded half up


def test_the_gray_transform_is_exact_luma_in_all_three_channels(tmp_path):
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    u8[0, 0, :4] = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]
    pool = data.Pool("fixture", u8, transform="gray")
    g = pool.uint8
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    want = np.array([_exact_luma(px) for px in u8.reshape(-1, 3)], np.uint8).reshape(40, 32, 32)
    np.testing.assert_array_equal(g[..., 0], want)
    assert list(g[0, 0, :4, 0]) == [76, 150, 29, 255]  # BT.601: 76.245, 149.685, 29.07, 255
    np.testing.assert_array_equal(pool.get(np.arange(40)), g / np.float32(255))
    np.testing.assert_array_equal(np.concatenate([x for _, x in pool.batches(batch_size=16)]), g / np.float32(255))
    assert pool.describe()["transform"] == "gray" and "gray" in repr(pool)
    write_imagenet32(tmp_path / "imagenet32", [300])  # on a memory-mapped pool: the file stays as it is
    mm = data.load_pool("imagenet32", root=tmp_path, n=100, seed=0, transform="gray")
    assert isinstance(mm.storage, np.memmap) and mm.transform == "gray"
    np.testing.assert_array_equal(mm.uint8, data.gray(mm.storage[mm.indices]))
    with pytest.raises(KeyError, match="unknown pool transform 'sepia'"):
        data.Pool("fixture", u8, transform="sepia")


def test_dead_leaves_are_piecewise_constant_discs():
    """Statistics only; its speed is timed in benchmarks/bench_dead_leaves.py, not asserted here."""
    x = data.dead_leaves(500, seed=0)
    assert x.shape == (500, 32, 32, 3) and x.dtype == np.uint8
    np.testing.assert_array_equal(x, data.dead_leaves(500, seed=0))  # seeded
    # piecewise-constant discs: neighbouring pixels are usually identical (unlike uniform noise)
    same = (x[:, :, 1:] == x[:, :, :-1]).all(-1).mean()
    assert same > 0.5


# -- fetch (no internet here: the network function is replaced) ----------------------------------

def _serve(monkeypatch, payloads: dict):
    def fake_get(url, f, progress=True):
        f.write(payloads[url])
    monkeypatch.setattr(data, "_http_get", fake_get)


def test_fetch_checksum_mismatch_leaves_nothing(tmp_path, monkeypatch):
    _serve(monkeypatch, {u: b"not the real file" for u, _, _ in data.DOWNLOADS["mnist"]})
    with pytest.raises(data.DatasetCorrupt, match="md5"):
        data.fetch("mnist", root=tmp_path, progress=False)
    assert list((tmp_path / "mnist").iterdir()) == []


def test_fetch_mnist_success(tmp_path, monkeypatch):
    src = tmp_path / "src"
    write_mnist_like(src, gz=True)
    payloads, table = {}, []
    for (url, _, arch), name in zip(data.DOWNLOADS["mnist"], IDX_NAMES):
        b = (src / f"{name}.gz").read_bytes()
        payloads[url] = b
        table.append((url, hashlib.md5(b).hexdigest(), arch))
    monkeypatch.setitem(data.DOWNLOADS, "mnist", table)
    _serve(monkeypatch, payloads)
    d = data.fetch("mnist", root=tmp_path / "root", progress=False)
    assert d == tmp_path / "root" / "mnist"
    assert sorted(p.name for p in d.iterdir()) == sorted(f"{n}.gz" for n in IDX_NAMES)
    assert len(data.load_dataset("mnist", root=tmp_path / "root").x_train) == 20
    assert data.fetch("mnist", root=tmp_path / "root", progress=False) == d  # already present: no download
    rows = {r["name"]: r for r in data.list_local(tmp_path / "root")}
    assert rows["mnist"]["present"] and rows["mnist"]["size_bytes"] > 0 and rows["mnist"]["path"] == str(d)
    assert not rows["cifar10"]["present"] and rows["digits"]["present"] and rows["dead-leaves"]["kind"] == "pool"
    assert data.present(tmp_path / "root") == {n for n, r in rows.items() if r["present"]}  # the same answer, no size scan


def test_fetch_cifar10_tar_success(tmp_path, monkeypatch):
    write_cifar(tmp_path / "src")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        t.add(tmp_path / "src" / "cifar10" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    url = data.DOWNLOADS["cifar10"][0][0]
    monkeypatch.setitem(data.DOWNLOADS, "cifar10", [(url, hashlib.md5(buf.getvalue()).hexdigest(), True)])
    _serve(monkeypatch, {url: buf.getvalue()})
    d = data.fetch("cifar10", root=tmp_path / "root", progress=False)
    assert sorted(p.name for p in d.iterdir()) == ["cifar-10-batches-py"]  # archive removed, no temp dirs
    assert len(data.load_dataset("cifar10", root=tmp_path / "root").x_train) == 20


def _traversal_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        info = tarfile.TarInfo("../evil.txt")
        info.size = 4
        t.addfile(info, io.BytesIO(b"evil"))
    return buf.getvalue()


def _traversal_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("GTSRB/ok.txt", "fine")
        z.writestr("../../evil.txt", "evil")
    return buf.getvalue()


@pytest.mark.parametrize("name, make", [("cifar10", _traversal_tar), ("gtsrb", _traversal_zip)])
def test_fetch_refuses_path_traversal(tmp_path, monkeypatch, name, make):
    payload = make()
    url = data.DOWNLOADS[name][0][0]
    monkeypatch.setitem(data.DOWNLOADS, name, [(url, hashlib.md5(payload).hexdigest(), True)])
    _serve(monkeypatch, {url: payload})
    root = tmp_path / "a" / "b"
    with pytest.raises(data.DatasetCorrupt, match="refusing to extract"):
        data.fetch(name, root=root, progress=False)
    assert not any(p.name == "evil.txt" for p in tmp_path.rglob("*"))
    assert not any(p.name == "ok.txt" for p in tmp_path.rglob("*"))


def test_fetch_unfetchable(tmp_path):
    with pytest.raises(data.DatasetMissing, match="image-net.org"):
        data.fetch("imagenet32", root=tmp_path)
    with pytest.raises(ValueError, match="nothing to fetch"):
        data.fetch("digits", root=tmp_path)
    with pytest.raises(ValueError, match="unknown"):
        data.fetch("nope", root=tmp_path)


# -- the real Fashion-MNIST from Debian's dataset-fashion-mnist ----------------------------------

FASHION_SYS = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (FASHION_SYS / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist is not installed")
def test_real_fashion_mnist(tmp_path):
    ds = data.load_dataset("fashion-mnist", root=tmp_path)  # nothing under tmp_path: the Debian copy
    assert (len(ds.x_train), len(ds.x_test)) == (60_000, 10_000)
    np.testing.assert_array_equal(np.bincount(ds.y_train), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(ds.y_test), [1000] * 10)
    assert ds.x_train.dtype == np.float32 and ds.x_train.max() == 1.0 and ds.x_train[:, :2].max() == 0.0


# -- safe_extract: what an archive may not put on disk --------------------------------------------

def _tar_with(member: tarfile.TarInfo) -> bytes:
    """A tar holding a regular ``data/ok.txt`` and then ``member``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        ok = tarfile.TarInfo("data/ok.txt")
        ok.size = 4
        t.addfile(ok, io.BytesIO(b"fine"))
        if member.isfile():
            member.size = 4
            t.addfile(member, io.BytesIO(b"evil"))
        else:
            t.addfile(member)
    return buf.getvalue()


def _member(name, kind, **attrs):
    info = tarfile.TarInfo(name)
    info.type = kind
    for k, v in attrs.items():
        setattr(info, k, v)
    return info


EVIL_TAR_MEMBERS = {
    "symlink inside": _member("data/link", tarfile.SYMTYPE, linkname="ok.txt"),
    "symlink outside": _member("data/passwd", tarfile.SYMTYPE, linkname="/etc/passwd"),
    "hard link": _member("data/hard", tarfile.LNKTYPE, linkname="data/ok.txt"),
    "character device": _member("data/null", tarfile.CHRTYPE, devmajor=1, devminor=3),
    "block device": _member("data/sda", tarfile.BLKTYPE, devmajor=8, devminor=0),
    "fifo": _member("data/pipe", tarfile.FIFOTYPE),
    "absolute path": _member("/tmp/stealnb-safe-extract-evil.txt", tarfile.REGTYPE),
}


@pytest.mark.parametrize("kind", list(EVIL_TAR_MEMBERS))
def test_safe_extract_refuses_links_devices_and_absolute_members_and_extracts_nothing(tmp_path, kind):
    member = EVIL_TAR_MEMBERS[kind]
    archive, dest = tmp_path / "a.tar", tmp_path / "dest"
    archive.write_bytes(_tar_with(member))
    with pytest.raises(data.DatasetCorrupt, match=f"refusing to extract {member.name!r}"):
        data.safe_extract(archive, dest)
    assert list(dest.rglob("*")) == []  # not even data/ok.txt, nor the temporary folder
    assert not Path("/tmp/stealnb-safe-extract-evil.txt").exists()


@pytest.mark.parametrize("kind", ["symlink", "absolute path"])
def test_safe_extract_refuses_zip_symlinks_and_absolute_members(tmp_path, kind):
    archive, dest = tmp_path / "a.zip", tmp_path / "dest"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("data/ok.txt", "fine")
        if kind == "symlink":
            info = zipfile.ZipInfo("data/link")
            info.external_attr = (0o120777 << 16)  # S_IFLNK: the data is the link's target
            z.writestr(info, "/etc/passwd")
        else:
            z.writestr(zipfile.ZipInfo("/tmp/stealnb-safe-extract-evil.txt"), "evil")
    name = "data/link" if kind == "symlink" else "/tmp/stealnb-safe-extract-evil.txt"
    with pytest.raises(data.DatasetCorrupt, match=f"refusing to extract {name!r}"):
        data.safe_extract(archive, dest)
    assert list(dest.rglob("*")) == [] and not Path("/tmp/stealnb-safe-extract-evil.txt").exists()


def test_safe_extract_unpacks_plain_files_and_folders(tmp_path):
    archive, dest = tmp_path / "a.tar", tmp_path / "dest"
    archive.write_bytes(_tar_with(_member("data/sub/", tarfile.DIRTYPE)))
    data.safe_extract(archive, dest)
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == ["data", "data/ok.txt", "data/sub"]
    assert (dest / "data" / "ok.txt").read_text() == "fine"


def test_a_download_with_the_wrong_md5_saves_nothing_and_the_right_one_saves_the_file(tmp_path):
    src = tmp_path / "src" / "batch.bin"
    src.parent.mkdir()
    src.write_bytes(b"\x01\x02" * 1000)
    dest = tmp_path / "data" / "batch.bin"
    with pytest.raises(data.DatasetCorrupt, match="nothing was saved"):
        data._download(src.as_uri(), dest, "0" * 32, progress=False)
    assert list(dest.parent.iterdir()) == []  # neither the file nor a temporary
    data._download(src.as_uri(), dest, hashlib.md5(src.read_bytes()).hexdigest(), progress=False)
    assert dest.read_bytes() == src.read_bytes() and list(dest.parent.iterdir()) == [dest]

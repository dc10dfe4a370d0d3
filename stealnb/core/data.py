"""Datasets and thief pools in one representation.

Every loader returns images as ``float32`` in ``[0, 1]`` of shape ``N x 32 x 32 x 3`` (grey images
have their channel duplicated three times, thesis §5.1, fig. 42) and labels as ``int64``.
Thief pools are stored as ``uint8`` (memory-mapped for downsampled ImageNet) and converted to
float32 one batch at a time (:meth:`Pool.batches`), so a 1.28M-image pool never exists as float32.

Files live under :func:`data_root` (explicit argument > ``$STEALNB_DATA`` > ``~/.cache/stealnb``)
in the official formats; :func:`fetch` downloads them where there is internet, and a missing
dataset raises :class:`DatasetMissing` saying which files to put where.
"""
from __future__ import annotations

import codecs
import csv
import functools
import gzip
import hashlib
import importlib
import json
import math
import os
import pickle
import re
import shutil
import struct
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._checks import IMAGE_SHAPE, UsageError, as_rng, check_images, check_labels, check_positive_int
from . import layout
from .registry import Registry
from .progress import progress_bar

DATASETS = Registry("dataset")
POOLS = Registry("pool")

DEFAULT_POOL_SIZE = 20_000
# No thief pool is larger than ImageNet32's train split (the thesis' pool; 3.9 GB as uint8): a
# bigger generated pool is refused before anything is allocated.
MAX_POOL_SIZE = 1_281_167
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Thesis appendix D (official GTSRB class ids 0..42).
GTSRB_CLASSES = [
    "Speed limit (20km/h)", "Speed limit (30km/h)", "Speed limit (50km/h)", "Speed limit (60km/h)",
    "Speed limit (70km/h)", "Speed limit (80km/h)", "End of speed limit (80km/h)", "Speed limit (100km/h)",
    "Speed limit (120km/h)", "No passing", "No passing for vehicles over 3.5 metric tons",
    "Right-of-way at the next intersection", "Priority road", "Yield", "Stop", "No vehicles",
    "Vehicles over 3.5 metric tons prohibited", "No entry", "General caution", "Dangerous curve to the left",
    "Dangerous curve to the right", "Double curve", "Bumpy road", "Slippery road",
    "Road narrows on the right", "Road work", "Traffic signals", "Pedestrians", "Children crossing",
    "Bicycles crossing", "Beware of ice/snow", "Wild animals crossing", "End of all speed and passing limits",
    "Turn right ahead", "Turn left ahead", "Ahead only", "Go straight or right", "Go straight or left",
    "Keep right", "Keep left", "Roundabout mandatory", "End of no passing",
    "End of no passing by vehicles over 3.5 metric tons",
]


class DatasetMissing(FileNotFoundError):
    """A dataset's files are not on disk; the message says which files to put in which folder."""


class DatasetCorrupt(ValueError):
    """A dataset file is truncated, malformed, unsafe or fails its checksum; the message names it."""


class UnsafePickle(DatasetCorrupt):
    """A pickle asked for a global other than plain containers and numpy array reconstruction."""


# -- where files live ---------------------------------------------------------------------------

def data_root(root=None) -> Path:
    """The data folder: explicit ``root`` > ``$STEALNB_DATA`` > ``~/.cache/stealnb``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("STEALNB_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "stealnb"


_IDX = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_CIFAR = tuple(f"cifar-10-batches-py/{f}" for f in
               [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"])
_GTSRB_GT = ("GT-final_test.csv", "GTSRB/GT-final_test.csv", "GTSRB/Final_Test/Images/GT-final_test.csv")


@dataclass(frozen=True)
class _Source:
    """Where an on-disk dataset lives. A ``files`` entry may list alternatives separated by '|';
    an entry ending in '/' is a folder."""

    dirname: str
    files: tuple[str, ...]
    system_dirs: tuple[Path, ...] = ()
    fetchable: bool = True
    hint: str = ""


_GTSRB_SOURCE = _Source(
    "gtsrb", ("GTSRB/Final_Training/Images/", "GTSRB/Final_Test/Images/", "|".join(_GTSRB_GT)),
    hint="The test labels are in GT-final_test.csv from GTSRB_Final_Test_GT.zip; the "
         "GT-final_test.test.csv inside GTSRB_Final_Test_Images.zip has no ClassId column.")
SOURCES = {
    "mnist": _Source("mnist", tuple(f"{f}|{f}.gz" for f in _IDX)),
    "fashion-mnist": _Source("fashion-mnist", tuple(f"{f}|{f}.gz" for f in _IDX),
                             system_dirs=(Path("/usr/share/datasets/fashion-mnist"),),
                             hint="On Debian/Ubuntu: apt-get install dataset-fashion-mnist."),
    "cifar10": _Source("cifar10", _CIFAR),
    "gtsrb": _GTSRB_SOURCE,
    "gtsrb43": _GTSRB_SOURCE,
    "imagenet32": _Source(
        "imagenet32", ("pool_uint8.npy|train_data_batch_1|train_data_batch_1.npz",), fetchable=False,
        hint="Downsampled ImageNet 32x32 (Chrabaszcz et al. 2017) needs an image-net.org login: download "
             "Imagenet32_train.zip or Imagenet32_train_npz.zip from https://image-net.org/download-images "
             "and unzip train_data_batch_1..10 here; they are converted once into pool_uint8.npy (3.9 GB)."),
}


def _missing(d: Path, spec: _Source) -> list[str]:
    out = []
    for entry in spec.files:
        alts = entry.split("|")
        ok = any((d / a).is_dir() if a.endswith("/") else (d / a).is_file() for a in alts)
        if not ok:
            out.append(" or ".join(alts))
    return out


def _locate(name: str, root: Path) -> Path:
    """The first folder holding all of ``name``'s files, else :class:`DatasetMissing`."""
    spec = SOURCES[name]
    main = root / spec.dirname
    for d in (main, *spec.system_dirs):
        if not _missing(d, spec):
            return d
    lines = [f"dataset {name!r} not found. Expected these files in {main}:"]
    lines += [f"  {f}" for f in _missing(main, spec)]
    if spec.system_dirs:
        lines.append("(also looked in " + ", ".join(map(str, spec.system_dirs)) + ")")
    if spec.hint:
        lines.append(spec.hint)
    how = f"Put them there (or choose another folder with --data-root / $STEALNB_DATA)"
    if spec.fetchable:
        how += f", or on a machine with internet: stealnb data fetch {name}"
    lines.append(how + ".")
    raise DatasetMissing("\n".join(lines))


# -- the Dataset record -------------------------------------------------------------------------

@dataclass(repr=False, eq=False)
class Dataset:
    """Train/test images (float32 N x 32 x 32 x 3 in [0, 1]), int64 labels and class names."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]

    def __post_init__(self):
        for part in ("train", "test"):
            x, y = getattr(self, f"x_{part}"), getattr(self, f"y_{part}")
            check_images(x, f"{self.name}.x_{part}")
            check_labels(y, f"{self.name}.y_{part}", n=len(x), num_classes=self.num_classes)
            if y.dtype != np.int64:
                raise TypeError(f"{self.name}.y_{part}: expected int64 labels, got {y.dtype}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, train={len(self.x_train)}, test={len(self.x_test)}, "
                f"classes={self.num_classes})")


def _to_float(u8: np.ndarray) -> np.ndarray:
    """uint8 -> float32 k/255 (correctly rounded division, identical in every loader)."""
    return u8.astype(np.float32) / np.float32(255.0)


def _grey_to_rgb(x: np.ndarray) -> np.ndarray:
    """N x H x W float32 -> N x H x W x 3 by duplicating the grey channel (thesis §5.1)."""
    return np.repeat(x[..., None], 3, axis=-1)


def stratified_subsample(y, fraction, seed) -> np.ndarray:
    """Sorted indices of a class-stratified random ``fraction`` of ``y`` (thesis §3: 10% for the EDA).

    Each class keeps ``round(fraction * n_c)`` samples (at least one), so proportions are preserved.
    """
    y = check_labels(np.asarray(y), "y")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating)) or not 0 < fraction <= 1:
        raise ValueError(f"fraction: expected a number in (0, 1], got {fraction!r}")
    rng = as_rng(seed)
    picked = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        k = max(1, int(round(fraction * len(members))))
        picked.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(picked)).astype(np.int64) if picked else np.zeros(0, np.int64)


# -- IDX (MNIST, Fashion-MNIST) -----------------------------------------------------------------

# The largest official MNIST/Fashion-MNIST file holds 47 MB; a header announcing more is refused unread.
IDX_MAX_BYTES = 1 << 28


def read_idx(path: Path, magic: int, shape: tuple) -> np.ndarray:
    """An unsigned-byte IDX array (LeCun et al. 1998 format), raw or ``.gz``, of ``shape`` (``None``: any
    length). The header is checked before any payload is read, then exactly the payload it announces
    is streamed in: a small ``.gz`` that would inflate to GiBs is refused without inflating it."""
    path, head = Path(path), 4 + 4 * len(shape)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read(head)
            if len(raw) < head:
                raise DatasetCorrupt(f"{path}: {len(raw)} bytes, shorter than the {head}-byte IDX header")
            got = struct.unpack_from(">i", raw)[0]
            if got != magic:
                raise DatasetCorrupt(f"{path}: IDX magic number {got}, expected {magic} "
                                     f"(unsigned bytes, {len(shape)}-D)")
            dims = struct.unpack_from(f">{len(shape)}I", raw, 4)
            if any(want is not None and d != want for d, want in zip(dims, shape)):
                raise DatasetCorrupt(f"{path}: header dims {dims}, expected {shape} (None: any length)")
            need = math.prod(dims)  # Python ints: no overflow
            if need > IDX_MAX_BYTES:
                raise DatasetCorrupt(f"{path}: header dims {dims} need {need} bytes, more than the "
                                     f"{IDX_MAX_BYTES} an MNIST-format file may hold; the header is corrupt")
            out = np.empty(need, np.uint8)
            view, n = memoryview(out), 0
            while n < need and (k := f.readinto(view[n:n + (1 << 20)])):  # 1 MiB at a time
                n += k
            if n < need:
                raise DatasetCorrupt(f"{path}: payload is {n} bytes but the header dims {dims} need "
                                     f"{need}; the file is truncated or corrupt")
            if f.read(1):  # also what makes gzip check its crc32 and length trailer
                raise DatasetCorrupt(f"{path}: data continues after the payload: the header dims {dims} need "
                                     f"{need} bytes; the file is corrupt")
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetCorrupt(f"{path}: cannot be read/decompressed ({e}); the file is truncated or corrupt") from None
    return out.reshape(dims)


def _idx_file(d: Path, stem: str) -> Path:
    return d / stem if (d / stem).is_file() else d / f"{stem}.gz"


def _load_idx_dataset(name: str, root: Path, class_names: list[str]) -> Dataset:
    d = _locate(name, root)
    parts = []
    for img, lab in [(_IDX[0], _IDX[1]), (_IDX[2], _IDX[3])]:
        x = read_idx(_idx_file(d, img), 2051, (None, 28, 28))
        y = read_idx(_idx_file(d, lab), 2049, (len(x),)).astype(np.int64)  # one label per image
        if y.size and y.max() >= len(class_names):
            raise DatasetCorrupt(f"{_idx_file(d, lab)}: label {y.max()} found; expected labels < {len(class_names)}")
        # 28x28 -> 32x32 by zero-padding 2 pixels on each side: lossless, digits stay centred.
        out = np.zeros((len(x), 32, 32), np.float32)
        out[:, 2:30, 2:30] = _to_float(x)
        parts += [_grey_to_rgb(out), y]
    return Dataset(name, parts[0], parts[1], parts[2], parts[3], list(class_names))


@DATASETS.register("mnist")
def _load_mnist(root: Path, *, progress: bool = False) -> Dataset:
    """MNIST handwritten digits (LeCun et al. 1998; thesis §3.1), official IDX files, zero-padded to 32x32."""
    return _load_idx_dataset("mnist", root, [str(i) for i in range(10)])


@DATASETS.register("fashion-mnist")
def _load_fashion(root: Path, *, progress: bool = False) -> Dataset:
    """Fashion-MNIST (Xiao et al. 2017), official IDX files, zero-padded to 32x32; also read from Debian's
    ``/usr/share/datasets/fashion-mnist`` (package dataset-fashion-mnist)."""
    return _load_idx_dataset("fashion-mnist", root, FASHION_MNIST_CLASSES)


# -- restricted pickles (CIFAR-10, ImageNet32) --------------------------------------------------

_multiarray = importlib.import_module("numpy._core.multiarray" if hasattr(np, "_core") else "numpy.core.multiarray")
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # how protocol-2 pickles written by Python 3 store bytes
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays/scalars; any other global is refused."""

    def find_class(self, module, name):
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickle(f"refusing to unpickle the global {module}.{name}: dataset pickles may only "
                               "contain plain containers and numpy arrays") from None


def _unpickle(path: Path):
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, encoding="bytes").load()
    except UnsafePickle as e:
        raise UnsafePickle(f"{path}: {e}") from None
    except Exception as e:  # any unpickling failure means a damaged file
        raise DatasetCorrupt(f"{path}: not a readable pickle ({type(e).__name__}: {e}); "
                             "the file is truncated or corrupt") from None


def _entry(d, key: str, path: Path):
    if isinstance(d, dict):
        for k in (key, key.encode()):
            if k in d:
                return d[k]
    keys = list(d) if isinstance(d, dict) else type(d).__name__
    raise DatasetCorrupt(f"{path}: expected a dict with a {key!r} entry, got {keys}")


def _chw_rows(data, path: Path) -> np.ndarray:
    """Check an N x 3072 uint8 channel-first block (CIFAR/ImageNet32 layout) and return it as an array."""
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetCorrupt(f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 N x 3072 "
                             "(channel-first 3 x 32 x 32 rows)")
    return data


def _rows_to_nhwc(data: np.ndarray) -> np.ndarray:
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


@DATASETS.register("cifar10")
def _load_cifar10(root: Path, *, progress: bool = False) -> Dataset:
    """CIFAR-10 (Krizhevsky 2009; thesis §3.2) from the official python batches, via a restricted unpickler."""
    d = _locate("cifar10", root) / "cifar-10-batches-py"
    meta = _unpickle(d / "batches.meta")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in _entry(meta, "label_names", d / "batches.meta")]
    if len(names) != 10:
        raise DatasetCorrupt(f"{d / 'batches.meta'}: {len(names)} label_names, expected 10")
    parts = []
    for files in ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]):
        xs, ys = [], []
        for f in files:
            b = _unpickle(d / f)
            data = _chw_rows(_entry(b, "data", d / f), d / f)
            labels = np.asarray(_entry(b, "labels", d / f), dtype=np.int64)
            if labels.shape != (len(data),) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
                raise DatasetCorrupt(f"{d / f}: labels {labels.shape} for {len(data)} images; expected one in 0..9 each")
            xs.append(_to_float(_rows_to_nhwc(data)))
            ys.append(labels)
        parts += [np.concatenate(xs), np.concatenate(ys)]
    return Dataset("cifar10", *parts, names)


# -- GTSRB ----------------------------------------------------------------------------------------

_GT_COLUMNS = ("Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId")
_GTSRB_CACHE_VERSION = b"stealnb-gtsrb-32x32-v1"


def _read_gt_csv(path: Path) -> list[tuple]:
    """Rows (filename, w, h, x1, y1, x2, y2, class) of an official semicolon-separated GT csv. A Filename
    must be a plain file name: '..' or a path would load images from outside the data folder."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f, delimiter=";"))
    if not rows or any(c not in rows[0] for c in _GT_COLUMNS):
        raise DatasetCorrupt(f"{path}: header {rows[0] if rows else '(empty)'} lacks one of {list(_GT_COLUMNS)}")
    pos = [rows[0].index(c) for c in _GT_COLUMNS]
    out = []
    for line, r in enumerate(rows[1:], start=2):
        if not r:
            continue
        try:
            row = (r[pos[0]], *(int(r[p]) for p in pos[1:]))
        except (IndexError, ValueError):
            raise DatasetCorrupt(f"{path}: line {line} is malformed: {';'.join(r)!r}") from None
        if row[0] in ("", "..") or Path(row[0]).name != row[0]:
            raise DatasetCorrupt(f"{path}: line {line} names {row[0]!r}, not a file name in the image "
                                 "folder; refusing to read outside it")
        out.append(row)
    return out


def _read_sign(path: Path, w: int, h: int, x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
    """Crop the ROI (x2, y2 exclusive: the official 5-px borders are then symmetric), then resize to
    32x32 with Pillow's antialiased bilinear filter (no border pixel leaks in); uint8 HWC."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (OSError, SyntaxError) as e:
        raise DatasetCorrupt(f"{path}: cannot read image ({e})") from None
    if im.size != (w, h):
        raise DatasetCorrupt(f"{path}: image is {im.size[0]}x{im.size[1]}, its csv row says {w}x{h}")
    if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
        raise DatasetCorrupt(f"{path}: ROI ({x1},{y1})-({x2},{y2}) lies outside the {w}x{h} image")
    return np.asarray(im.crop((x1, y1, x2, y2)).resize((32, 32), Image.Resampling.BILINEAR), np.uint8)


def _gtsrb_uint8(name: str, root: Path, progress: bool):
    """All GTSRB images as uint8 32x32 RGB in file order, with original class ids; cached next to the data."""
    d = _locate(name, root)
    train_dir = d / "GTSRB/Final_Training/Images"
    test_dir = d / "GTSRB/Final_Test/Images"
    gt_test = next(d / g for g in _GTSRB_GT if (d / g).is_file())
    items, sig = {"train": [], "test": []}, hashlib.sha256(_GTSRB_CACHE_VERSION)
    class_dirs = sorted(p for p in train_dir.iterdir() if p.is_dir() and p.name.isdigit())
    for cdir in class_dirs:
        csv_path = cdir / f"GT-{cdir.name}.csv"
        if not csv_path.is_file():
            raise DatasetMissing(f"dataset {name!r}: {csv_path} is missing (every training class folder "
                                 "of GTSRB_Final_Training_Images.zip has one)")
        sig.update(csv_path.read_bytes())
        items["train"] += [(cdir / r[0], r) for r in _read_gt_csv(csv_path)]
    sig.update(gt_test.read_bytes())
    items["test"] = [(test_dir / r[0], r) for r in _read_gt_csv(gt_test)]
    if not items["train"] or not items["test"]:
        raise DatasetCorrupt(f"{d}: the GTSRB csv files list {len(items['train'])} training and "
                             f"{len(items['test'])} test images; expected both > 0")
    cache, sig = d / ".stealnb-gtsrb-32x32.npz", sig.hexdigest()
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                if str(z["signature"]) == sig:
                    return z["x_train"], z["y_train"], z["x_test"], z["y_test"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # stale or damaged cache: rebuilt below
    arrays = {}
    for part, rows in items.items():
        x = np.empty((len(rows), 32, 32, 3), np.uint8)
        for i, (path, r) in enumerate(progress_bar(rows, desc=f"GTSRB {part}", disable=not progress)):
            if not path.is_file():
                raise DatasetCorrupt(f"{path}: listed in the GTSRB csv but not found")
            x[i] = _read_sign(path, *r[1:7])
        y = np.array([r[7] for _, r in rows], np.int64)
        if y.min() < 0 or y.max() >= len(GTSRB_CLASSES):
            raise DatasetCorrupt(f"{d}: GTSRB {part} ClassId outside 0..42 (got {y.min()}..{y.max()})")
        arrays[f"x_{part}"], arrays[f"y_{part}"] = x, y
    try:  # best effort: a read-only data folder just means no cache
        with layout.atomic_open(cache, "wb", shared=True) as f:
            np.savez(f, signature=np.array(sig), **arrays)
    except OSError:
        pass
    return arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"]


def gtsrb_top_classes(y: np.ndarray, k: int = 10) -> np.ndarray:
    """The ``k`` most frequent class ids of ``y`` (ties broken by smaller id), sorted by id (thesis §3.3)."""
    counts = np.bincount(y, minlength=len(GTSRB_CLASSES))
    order = sorted(np.flatnonzero(counts), key=lambda c: (-counts[c], c))
    if len(order) < k:
        raise DatasetCorrupt(f"GTSRB training data has {len(order)} classes with images; expected at least {k}")
    return np.sort(np.array(order[:k], np.int64))


@DATASETS.register("gtsrb")
def _load_gtsrb(root: Path, *, progress: bool = False) -> Dataset:
    """GTSRB (Stallkamp et al. 2012) 10-class subset of thesis §3.3: the 10 most frequent training classes
    (19,620 train / 6,480 test), labels 0..9 in order of original class id; ROI-cropped, 32x32."""
    xtr, ytr, xte, yte = _gtsrb_uint8("gtsrb", root, progress)
    keep = gtsrb_top_classes(ytr)
    remap = np.full(len(GTSRB_CLASSES), -1, np.int64)
    remap[keep] = np.arange(len(keep))
    mtr, mte = remap[ytr] >= 0, remap[yte] >= 0
    return Dataset("gtsrb", _to_float(xtr[mtr]), remap[ytr[mtr]], _to_float(xte[mte]), remap[yte[mte]],
                   [GTSRB_CLASSES[c] for c in keep])


@DATASETS.register("gtsrb43")
def _load_gtsrb43(root: Path, *, progress: bool = False) -> Dataset:
    """GTSRB (Stallkamp et al. 2012), all 43 classes (thesis §3.3, appendix D); ROI-cropped, 32x32."""
    xtr, ytr, xte, yte = _gtsrb_uint8("gtsrb43", root, progress)
    return Dataset("gtsrb43", _to_float(xtr), ytr, _to_float(xte), yte, list(GTSRB_CLASSES))


# -- scikit-learn digits (embedded, offline) -----------------------------------------------------

def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Row-stochastic 1-D bilinear resampling matrix (pixel centres aligned, edges clamped)."""
    s = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    i0 = np.floor(s).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    a = np.zeros((n_out, n_in))
    np.add.at(a, (np.arange(n_out), i0), 1 - (s - i0))
    np.add.at(a, (np.arange(n_out), i1), s - i0)
    return a


def upsample_bilinear(x: np.ndarray, size: int = 32) -> np.ndarray:
    """Bilinear upsampling of an N x h x w batch to N x size x size (same as skimage's order-1 resize
    with mode='edge'); a convex combination of pixels, so the value range is preserved."""
    ah, aw = _bilinear_matrix(x.shape[1], size), _bilinear_matrix(x.shape[2], size)
    return np.einsum("ij,njk,lk->nil", ah, x, aw)


@DATASETS.register("digits")
def _load_digits(root: Path | None = None, *, progress: bool = False) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (UCI optdigits, Alpaydin & Kaynak 1998), /16 to [0, 1],
    bilinearly upsampled to 32x32, grey -> 3 channels; fixed stratified 80/20 split (seed 0). Offline default."""
    from sklearn.datasets import load_digits

    b = load_digits()
    x = _grey_to_rgb(upsample_bilinear(b.images / 16.0).astype(np.float32))
    y = b.target.astype(np.int64)
    test = np.zeros(len(y), bool)
    test[stratified_subsample(y, 0.2, seed=0)] = True
    return Dataset("digits", x[~test], y[~test], x[test], y[test], [str(i) for i in range(10)])


def load_dataset(name, root=None, *, progress: bool = False) -> Dataset:
    """Load a registered dataset (see ``DATASETS.names()``) from :func:`data_root`."""
    return DATASETS[name](data_root(root), progress=progress)


# -- thief pools ----------------------------------------------------------------------------------

def luma(u8: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma Y = 0.299 R + 0.587 G + 0.114 B of uint8 ``... x 3`` pixels as uint8, rounded
    half up in integer arithmetic (exact, the same on every machine)."""
    u = u8.astype(np.int32)
    return ((299 * u[..., 0] + 587 * u[..., 1] + 114 * u[..., 2] + 500) // 1000).astype(np.uint8)


def gray(u8: np.ndarray) -> np.ndarray:
    """uint8 images with R = G = B = their :func:`luma`: colour photos as a grey-image secret sees its
    own data (grey channel duplicated three times, thesis §5.1)."""
    return np.repeat(luma(u8)[..., None], 3, axis=-1)


# Pool transforms by name (``load_pool(..., transform=)``, ``Profile.pool_transform``).
POOL_TRANSFORMS = {"gray": gray}


class Pool:
    """The attacker's unlabelled thief pool, stored as uint8 N x 32 x 32 x 3 (possibly a memmap).

    ``indices`` (sorted) selects a subset of the storage without copying it; pool positions
    0..len-1 refer to that subset. ``transform`` (a :data:`POOL_TRANSFORMS` name) is applied to the
    uint8 images as they are read, so a memory-mapped pool stays on disk. Images leave the pool as
    float32 [0, 1] only via :meth:`get` and :meth:`batches`.
    """

    def __init__(self, name: str, storage: np.ndarray, indices=None, info: dict | None = None,
                 transform: str | None = None):
        if not isinstance(storage, np.ndarray) or storage.dtype != np.uint8 or storage.shape[1:] != IMAGE_SHAPE:
            raise TypeError(f"pool storage: expected uint8 N x 32 x 32 x 3, got "
                            f"{getattr(storage, 'dtype', type(storage).__name__)} {getattr(storage, 'shape', '')}")
        if indices is not None:
            indices = np.asarray(indices, np.int64)
            if indices.ndim != 1 or (indices.size and (indices[0] < 0 or indices[-1] >= len(storage)
                                                       or np.any(np.diff(indices) <= 0))):
                raise ValueError(f"pool indices: expected sorted unique ints in [0, {len(storage)})")
        if transform is not None and transform not in POOL_TRANSFORMS:
            raise KeyError(f"unknown pool transform {transform!r}; expected one of: {', '.join(POOL_TRANSFORMS)}")
        self.name, self._storage, self._indices, self.info = name, storage, indices, dict(info or {})
        self.transform = transform

    def __len__(self) -> int:
        return len(self._storage) if self._indices is None else len(self._indices)

    def __repr__(self) -> str:
        kind = "memmap" if isinstance(self._storage, np.memmap) else "in-memory"
        how = "" if self.transform is None else f", {self.transform}"
        return f"Pool({self.name!r}, n={len(self)}, {kind} uint8{how})"

    def describe(self) -> dict:
        """What a run records about its pool: name, size, transform and the builder's ``info``
        (seed; for natural-patches the photos used and the near-duplicates dropped)."""
        return {"name": self.name, "size": len(self), "transform": self.transform, **self.info}

    @property
    def storage(self) -> np.ndarray:
        """The whole uint8 storage (a memmap for on-disk pools), ignoring any subset and transform."""
        return self._storage

    @property
    def indices(self):
        """Sorted storage rows of this pool's subset, or None when the pool is the whole storage."""
        return self._indices

    @property
    def uint8(self) -> np.ndarray:
        """The pool's images as read-only uint8 N x 32 x 32 x 3 (a memmap view for a whole on-disk pool
        without transform; otherwise a copy of len(pool) x 3072 bytes)."""
        v = self._storage.view() if self._indices is None else self._storage[self._indices]
        v = self._apply(v)
        v.flags.writeable = False
        return v

    def _apply(self, u8: np.ndarray) -> np.ndarray:
        return u8 if self.transform is None else POOL_TRANSFORMS[self.transform](u8)

    def get(self, idx) -> np.ndarray:
        """float32 [0, 1] images at pool positions ``idx`` (any order, returned in that order)."""
        idx = np.asarray(idx)
        if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
            raise TypeError(f"idx: expected a 1-D integer array of pool positions, got {idx.dtype} {idx.shape}")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"idx: positions must be in [0, {len(self)}), got {idx.min()}..{idx.max()}")
        src = idx if self._indices is None else self._indices[idx]
        if isinstance(self._storage, np.memmap) and len(src) > 1:  # read the file in ascending order
            order = np.argsort(src, kind="stable")
            u = np.empty((len(src), *IMAGE_SHAPE), np.uint8)
            u[order] = self._storage[src[order]]
        else:
            u = self._storage[src]
        return _to_float(self._apply(u))

    def batches(self, batch_size: int = 4096, idx=None):
        """Yield ``(positions, float32 images)`` chunks over ``idx`` (default: the whole pool, in order)."""
        bs = check_positive_int(batch_size, "batch_size")
        if idx is None and self._indices is None:
            for s in range(0, len(self), bs):
                e = min(s + bs, len(self))
                yield np.arange(s, e, dtype=np.int64), _to_float(self._apply(self._storage[s:e]))
            return
        idx = np.arange(len(self), dtype=np.int64) if idx is None else np.asarray(idx)
        for s in range(0, len(idx), bs):
            chunk = idx[s:s + bs]
            yield chunk, self.get(chunk)


def _subset(total: int, n, seed, name: str) -> np.ndarray | None:
    if n is None:
        return None
    n = check_positive_int(n, "n")
    if n > total:
        raise ValueError(f"n={n} exceeds the {total:,} images of the {name} pool; ask for at most {total:,}")
    return np.sort(as_rng(seed).choice(total, size=n, replace=False)).astype(np.int64)


# ImageNet32 -> one uint8 NHWC .npy. The .npy header is reserved at a fixed size so the file can be
# written in one streaming pass before the image count is known (numpy reads any header length).
_NPY_HEADER = 128
_BATCH_RE = re.compile(r"train_data_batch_(\d+)(\.npz)?")


def _npy_header(shape) -> bytes:
    d = "{'descr': '|u1', 'fortran_order': False, 'shape': %r, }" % (tuple(shape),)
    d = d.ljust(_NPY_HEADER - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(d)) + d.encode("latin1")


def _imagenet32_batches(d: Path) -> list[Path]:
    found: dict[int, Path] = {}
    for p in d.iterdir() if d.is_dir() else ():
        m = _BATCH_RE.fullmatch(p.name)
        if m and p.is_file() and (int(m.group(1)) not in found or m.group(2)):  # prefer .npz (no pickle)
            found[int(m.group(1))] = p
    return [found[k] for k in sorted(found)]


def _read_imagenet32_batch(p: Path) -> np.ndarray:
    if p.suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as z:
                return _chw_rows(z["data"], p)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise DatasetCorrupt(f"{p}: not a readable .npz with a 'data' array ({e})") from None
    return _chw_rows(_entry(_unpickle(p), "data", p), p)


def convert_imagenet32(d: Path, progress: bool = False) -> Path:
    """Stream ``train_data_batch_*`` (pickle or .npz, N x 3072 channel-first) into ``pool_uint8.npy`` (NHWC),
    one batch in memory at a time; written to a temp file and renamed, with a sidecar listing its sources."""
    sources = _imagenet32_batches(d)
    out = d / "pool_uint8.npy"
    total = 0
    with layout.atomic_open(out, "wb", shared=True) as f:
        f.write(b"\0" * _NPY_HEADER)
        for p in progress_bar(sources, desc="ImageNet32 -> pool_uint8.npy", disable=not progress):
            data = _read_imagenet32_batch(p)
            for s in range(0, len(data), 8192):
                np.ascontiguousarray(_rows_to_nhwc(data[s:s + 8192])).tofile(f)
            total += len(data)
            del data
        f.seek(0)
        f.write(_npy_header((total, *IMAGE_SHAPE)))
    layout.atomic_write(d / "pool_uint8.json", json.dumps(_source_signature(sources)), shared=True)
    return out


def _source_signature(sources: list[Path]) -> list:
    return [[p.name, p.stat().st_size] for p in sources]


@POOLS.register("imagenet32")
def _pool_imagenet32(root: Path, n=None, seed=0, *, progress: bool = False) -> Pool:
    """Downsampled ImageNet 32x32 (Chrabaszcz et al. 2017), the thesis' thief pool (§4, §5.1; ActiveThief's
    image thief set): converted once to a uint8 NHWC .npy and memory-mapped; ``n`` picks a seeded subset."""
    d = _locate("imagenet32", root)
    out, meta = d / "pool_uint8.npy", d / "pool_uint8.json"
    sources = _imagenet32_batches(d)
    try:
        recorded = json.loads(meta.read_text()) if meta.is_file() else None
    except (OSError, ValueError):
        recorded = None
    stale = bool(sources) and recorded != _source_signature(sources)
    if not out.is_file() or stale:
        convert_imagenet32(d, progress=progress)
    try:
        arr = np.load(out, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DatasetCorrupt(f"{out}: not a readable .npy ({e}); delete it to rebuild from the batches") from None
    if arr.dtype != np.uint8 or arr.shape[1:] != IMAGE_SHAPE:
        raise DatasetCorrupt(f"{out}: holds {arr.dtype} {arr.shape}, expected uint8 N x 32 x 32 x 3")
    return Pool("imagenet32", arr, _subset(len(arr), n, seed, "imagenet32"), {"path": str(out), "seed": seed})


# Photos shipped inside the scikit-image wheel (no pooch download) and scikit-learn's two samples.
_SKIMAGE_PHOTOS = ("astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
                   "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket",
                   "stereo_motorcycle", "text")

# The photographs among the wallpapers of Debian's packages (Debian 12), by package, checked one by one:
# landscapes, plants, animals and objects; the abstract, vector and rendered wallpapers of the same
# packages are left out. `make sysdeps` installs both packages. lomiri-wallpapers-16.04 (15.8 MB): 13 of
# its 15 wallpapers (not analogpattern, umang); mate-backgrounds (46.6 MB, 25 MB of it one painting):
# the 12 of nature/ (abstract/ and desktop/ are art). Not used: gnome-backgrounds, ukui-wallpapers,
# desktop-base, sway-backgrounds, lomiri-wallpapers (no photographs); lomiri-wallpapers-20.04 (one
# photo in 11 MB); plasma-workspace-wallpapers (11 photos among 94 MB of art).
WALLPAPER_PHOTOS = {
    "lomiri-wallpapers-16.04": tuple(f"/usr/share/backgrounds/{f}.jpg" for f in (
        "Bridge_by_Sander_Klootwijk", "Dragonfly_by_Bolly", "Picture_0B_by_freespace", "Picture_1A_by_freespace",
        "Wine_by_Jakkub_Mede", "aitzgorri_by_Aitzol_Berasategi", "free_by_Peter_Nerlich",
        "friends_by_Aitzol_Berasategi", "greentock_by_Peter_Nerlich", "life_by_Aitzol_Berasategi",
        "picosdeeuropa_by_Aitzol_Berasategi", "seeding_by_Clements_Engelhardt", "sunset_by_Aitzol_Berasategi")),
    "mate-backgrounds": tuple(f"/usr/share/backgrounds/mate/nature/{f}.jpg" for f in (
        "Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops", "Storm",
        "TwoWings", "Wood", "YellowFlower")),
}
# Photo files are downscaled (antialiased) to this shorter side, the scale of the bundled photos
# (172..1411 px, most near 512), so a 32..256 px crop spans the same share of a scene in either.
PHOTO_SIDE = 512


def read_photo(path) -> np.ndarray:
    """A photo file as uint8 H x W x 3, downscaled to a shorter side of :data:`PHOTO_SIDE` when larger
    (JPEG DCT draft, then Pillow's antialiased bilinear filter)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            k = PHOTO_SIDE / min(im.size)
            if k < 1:
                im.draft("RGB", (math.ceil(im.width * k), math.ceil(im.height * k)))
            im = im.convert("RGB")
    except (OSError, SyntaxError) as e:
        raise DatasetCorrupt(f"{path}: cannot read image ({e})") from None
    if min(im.size) < 32:
        raise DatasetCorrupt(f"{path}: {im.width}x{im.height} pixels, smaller than one 32x32 patch")
    k = PHOTO_SIDE / min(im.size)
    if k < 1:
        im = im.resize((max(32, round(im.width * k)), max(32, round(im.height * k))), Image.Resampling.BILINEAR)
    return np.asarray(im, np.uint8)


@functools.lru_cache(maxsize=1)
def _bundled_photos() -> tuple[tuple[str, np.ndarray], ...]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    out = []
    for name in _SKIMAGE_PHOTOS:
        try:
            img = getattr(skimage.data, name)()
        except Exception:  # not in this scikit-image build, or needs pooch/network
            continue
        views = zip(("_left", "_right"), img[:2]) if isinstance(img, tuple) else [("", img)]  # stereo pair
        for suffix, im in views:
            im = np.asarray(im)
            if im.dtype == np.uint8 and im.ndim in (2, 3) and min(im.shape[:2]) >= 32:
                rgb = np.repeat(im[..., None], 3, -1) if im.ndim == 2 else im[..., :3]
                out.append((name + suffix, np.ascontiguousarray(rgb)))
    try:
        sk = load_sample_images()
        out += [(Path(f).stem, np.asarray(im, np.uint8)) for f, im in zip(sk.filenames, sk.images)]
    except Exception:
        pass
    return tuple(out)


def wallpapers_present(wallpapers=None) -> tuple[list[str], list[str]]:
    """``(paths present, packages with a photo missing)`` of ``wallpapers`` (package -> photo paths,
    default :data:`WALLPAPER_PHOTOS`), in the table's order."""
    wallpapers = WALLPAPER_PHOTOS if wallpapers is None else wallpapers
    present = [str(p) for paths in wallpapers.values() for p in paths if Path(p).is_file()]
    missing = [pkg for pkg, paths in wallpapers.items() if not all(Path(p).is_file() for p in paths)]
    return present, missing


def natural_photos(wallpapers=None) -> tuple[tuple[str, np.ndarray], ...]:
    """(name, uint8 H x W x 3) photos of the natural-patches pool: those bundled with scikit-image and
    scikit-learn (by name; any that would need a download is skipped), then the installed ones of
    ``wallpapers`` (package -> photo paths, default :data:`WALLPAPER_PHOTOS`; by path, read with
    :func:`read_photo`). Missing wallpapers are one warning saying what to install."""
    wallpapers = WALLPAPER_PHOTOS if wallpapers is None else wallpapers
    return _natural_photos(tuple((pkg, tuple(map(str, paths))) for pkg, paths in wallpapers.items()))


@functools.lru_cache(maxsize=2)
def _natural_photos(wallpapers: tuple) -> tuple[tuple[str, np.ndarray], ...]:
    present, missing = wallpapers_present(dict(wallpapers))
    out = _bundled_photos() + tuple((p, read_photo(p)) for p in present)
    if missing:
        warnings.warn(f"natural-patches: the photographs of {', '.join(missing)} are not all installed, so the "
                      f"pool is cut from {len(out)} photos ({len(present)} wallpapers); for the full pool run "
                      f"`apt-get install {' '.join(missing)}` (`make sysdeps` does it as root)", stacklevel=3)
    if not out:
        raise DatasetMissing("natural-patches: no offline sample photos found in scikit-image / scikit-learn, "
                             f"and none of {', '.join(missing)} is installed")
    for _, im in out:  # shared by every call: keep the cached photos immutable
        im.flags.writeable = False
    return out


# Two patches are near-duplicates when the RMS difference of their :func:`patch_thumbnails` is below
# this many grey levels (of 255); the later one is dropped from the pool. Pairs that close look the same
# at 8x8 (checked by eye on the bundled photos' 20k-patch pool, where 5% of patches had such a partner:
# flat sky, black backgrounds, overlapping crops of the retina image). On luma, so patches stay
# distinct under the `gray` transform too (a luma difference bounds a difference in some channel).
DEDUPE_RMS = 2.0
_PATCH_CHUNK = 2048  # candidate patches drawn (and deduplicated) at a time
MAX_PATCH_DRAWS = 4  # candidates per requested patch before the photos count as exhausted


def patch_thumbnails(u8: np.ndarray) -> np.ndarray:
    """float64 N x 64 thumbnails of uint8 N x 32 x 32 x 3 patches: the 8x8 means of 4x4-pixel blocks
    of their :func:`luma` (multiples of 1/16, so the distances between them are exact)."""
    return luma(u8).reshape(len(u8), 8, 4, 8, 4).mean(axis=(2, 4)).reshape(len(u8), 64)


def _novel(new: np.ndarray, old: np.ndarray, limit: int) -> tuple[np.ndarray, int]:
    """Rows of the thumbnails ``new`` kept in order, and how many were looked at: a row closer than
    :data:`DEDUPE_RMS` to a row of ``old`` or to an earlier kept row is dropped; stops after ``limit``
    kept. Candidates come from a k-d tree on the thumbnails' 2x2 block means, whose RMS difference is
    at most the thumbnails' (Jensen's inequality), so no near-duplicate is missed."""
    from sklearn.neighbors import KDTree

    def coarse(t):
        return t.reshape(len(t), 2, 4, 2, 4).mean(axis=(2, 4)).reshape(len(t), 4)

    far = (8 * DEDUPE_RMS) ** 2  # squared L2 distance over 64 values at that RMS
    c_new = coarse(new)
    r = 2 * DEDUPE_RMS  # L2 distance over the 4 block means at that RMS
    near_old = KDTree(coarse(old)).query_radius(c_new, r) if len(old) else None
    near_new = KDTree(c_new).query_radius(c_new, r)
    kept, out = np.zeros(len(new), bool), []
    for i in range(len(new)):
        if near_old is not None and len(c := near_old[i]) and (((old[c] - new[i]) ** 2).sum(1) < far).any():
            continue
        c = near_new[i]
        c = c[(c < i) & kept[c]]
        if len(c) and (((new[c] - new[i]) ** 2).sum(1) < far).any():
            continue
        kept[i] = True
        out.append(i)
        if len(out) == limit:
            return np.array(out, np.int64), i + 1
    return np.array(out, np.int64), len(new)


def natural_patches(photos, n: int, seed, *, progress: bool = False) -> tuple[np.ndarray, int]:
    """``n`` distinct uint8 32 x 32 x 3 patches of ``photos`` ((name, uint8 H x W x 3) pairs) and the
    number of near-duplicates dropped (:data:`DEDUPE_RMS`): seeded square crops, 32..256 px (log-uniform,
    at most the photo's shorter side) of a uniformly chosen photo, resized to 32x32 with Pillow's
    antialiased bilinear filter and flipped horizontally with p=0.5. Candidates are drawn
    :data:`_PATCH_CHUNK` at a time from one seeded stream, so a smaller pool is the start of a larger
    one; photos that cannot supply ``n`` distinct patches in about ``MAX_PATCH_DRAWS * n`` draws are an
    error (:class:`~stealnb.core._checks.UsageError`)."""
    from PIL import Image

    n = check_positive_int(n, "n")
    if not photos:
        raise UsageError("natural patches: no photos to cut patches from")
    rng = as_rng(seed)
    pil = [Image.fromarray(im) for _, im in photos]
    hw = np.array([im.shape[:2] for _, im in photos])
    out, thumbs = np.empty((n, *IMAGE_SHAPE), np.uint8), np.empty((n, 64))
    kept = dropped = drawn = 0
    with progress_bar(total=n, desc="natural patches", disable=not progress) as bar:
        while kept < n:
            if drawn >= MAX_PATCH_DRAWS * n + _PATCH_CHUNK:
                raise UsageError(f"natural patches: {len(photos)} photos gave only {kept:,} distinct patches in "
                                 f"{drawn:,} draws ({dropped:,} near-duplicates dropped); ask for fewer patches "
                                 "or add photos")
            m = _PATCH_CHUNK
            src = rng.integers(0, len(photos), m)
            u, px, py, flip = rng.random(m), rng.random(m), rng.random(m), rng.random(m) < 0.5
            h, w = hw[src, 0], hw[src, 1]
            size = np.rint(np.exp(np.log(32) + u * (np.log(np.minimum(256, np.minimum(h, w))) - np.log(32))))
            size = size.astype(np.int64)
            x0, y0 = (px * (w - size + 1)).astype(np.int64), (py * (h - size + 1)).astype(np.int64)
            batch = np.empty((m, *IMAGE_SHAPE), np.uint8)
            for i, (k, x, y, e) in enumerate(zip(src.tolist(), x0.tolist(), y0.tolist(), size.tolist())):
                batch[i] = np.asarray(pil[k].crop((x, y, x + e, y + e)).resize((32, 32), Image.Resampling.BILINEAR))
            batch[flip] = batch[flip, :, ::-1]
            t = patch_thumbnails(batch)
            keep, looked = _novel(t, thumbs[:kept], n - kept)
            out[kept:kept + len(keep)], thumbs[kept:kept + len(keep)] = batch[keep], t[keep]
            kept, dropped, drawn = kept + len(keep), dropped + looked - len(keep), drawn + m
            bar.update(len(keep))
    return out, dropped


@POOLS.register("natural-patches")
def _pool_natural_patches(root: Path | None = None, n=None, seed=0, *, progress: bool = False,
                          photos=None) -> Pool:
    """Offline natural-image thief pool (cf. ActiveThief's ImageNet subset, Pal et al. 2020): distinct
    seeded crops (:func:`natural_patches`) of all the natural photos available (:func:`natural_photos`:
    those bundled with scikit-image and scikit-learn and the installed Debian wallpaper photographs),
    or of the image files ``photos``. ``info`` lists the photos used and the near-duplicates dropped."""
    n = DEFAULT_POOL_SIZE if n is None else check_positive_int(n, "n")
    if photos is None:
        named, missing = natural_photos(), wallpapers_present()[1]
    else:
        named, missing = tuple((str(p), read_photo(p)) for p in photos), []
    x, dropped = natural_patches(named, n, seed, progress=progress)
    info = {"seed": seed, "sources": [name for name, _ in named], "duplicates_dropped": dropped,
            "dedupe_rms": DEDUPE_RMS}
    if missing:
        info["wallpapers_missing"] = missing
    return Pool("natural-patches", x, None, info)


@POOLS.register("uniform-noise")
def _pool_uniform_noise(root: Path | None = None, n=None, seed=0, *, progress: bool = False) -> Pool:
    """Uniform random uint8 pixels: ActiveThief's synthetic non-problem-domain (SNPD) baseline
    (Pal et al. 2020, thesis A.8)."""
    n = DEFAULT_POOL_SIZE if n is None else check_positive_int(n, "n")
    return Pool("uniform-noise", as_rng(seed).integers(0, 256, (n, *IMAGE_SHAPE), dtype=np.uint8),
                None, {"seed": seed})


def dead_leaves(n: int, seed, discs: int = 96, rmin: float = 1.0, rmax: float = 32.0,
                alpha: float = 3.0, chunk: int = 512) -> np.ndarray:
    """uint8 n x 32 x 32 x 3 dead-leaves images (Lee, Mumford & Huang 2001): a random background, then
    ``discs`` uniformly coloured discs with radius density ~ r^-alpha on [rmin, rmax], later ones on top."""
    rng = as_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32) + 0.5
    out = np.empty((n, *IMAGE_SHAPE), np.uint8)
    e = 1.0 - alpha
    for s in range(0, n, chunk):
        b = min(chunk, n - s)
        colours = rng.integers(0, 256, (b, discs + 1, 3), dtype=np.uint8)  # [:, 0] is the background
        r = (rmin ** e + rng.random((discs, b)) * (rmax ** e - rmin ** e)) ** (1 / e)  # inverse CDF
        cx, cy = rng.uniform(-4, 36, (2, discs, b)).astype(np.float32)
        top = np.zeros((b, 32, 32), np.int16)
        for k in range(discs):
            inside = (xx - cx[k, :, None, None]) ** 2 + (yy - cy[k, :, None, None]) ** 2 <= (r[k, :, None, None] ** 2)
            top[inside] = k + 1
        out[s:s + b] = np.take_along_axis(colours, top.reshape(b, -1, 1), axis=1).reshape(b, 32, 32, 3)
    return out


@POOLS.register("dead-leaves")
def _pool_dead_leaves(root: Path | None = None, n=None, seed=0, *, progress: bool = False) -> Pool:
    """Procedural natural-statistics images: the dead-leaves model (Lee, Mumford & Huang 2001; used as a
    data-free image prior by Baradad et al. 2021), occluding discs with power-law radii and random colours."""
    n = DEFAULT_POOL_SIZE if n is None else check_positive_int(n, "n")
    return Pool("dead-leaves", dead_leaves(n, seed), None, {"seed": seed})


def _dataset_pool(dataset: str):
    def build(root: Path, n=None, seed=0, *, progress: bool = False) -> Pool:
        x = DATASETS[dataset](root, progress=progress).x_train
        idx = _subset(len(x), n, seed, dataset)
        rows = x if idx is None else x[idx]
        u8 = np.empty(rows.shape, np.uint8)
        for s in range(0, len(rows), 8192):  # float32 k/255 * 255 rounds back to k (digits: quantised)
            u8[s:s + 8192] = np.rint(rows[s:s + 8192] * np.float32(255))
        return Pool(dataset, u8, None, {"dataset": dataset, "split": "train", "train_size": len(x), "seed": seed})

    build.__doc__ = (f"The {dataset} dataset's train split as a cross-domain thief pool (uint8; ``n`` picks a "
                     "seeded subset) for a secret trained on another dataset: non-problem-domain data as in "
                     "Copycat CNN (Correia-Silva et al. 2018) and ActiveThief (Pal et al. 2020)")
    return build


for _name in DATASETS.names():
    POOLS.register(_name)(_dataset_pool(_name))


def _same_images(a: str, b: str) -> bool:
    """Whether datasets/pools ``a`` and ``b`` hold the same images (same name or same files, as gtsrb and
    gtsrb43)."""
    return a == b or (a in SOURCES and b in SOURCES and SOURCES[a].dirname == SOURCES[b].dirname)


def check_pool(name, n=None, *, need: int = 1, transform=None, secret_dataset=None,
               allow_problem_domain: bool = False) -> None:
    """Refuse (:class:`~stealnb.core._checks.UsageError`), before any image is made, a thief pool ``name`` of
    ``n`` images (``None``: the pool's default) that cannot be built, cannot supply ``need`` distinct
    images, has an unknown ``transform``, or holds the images of ``secret_dataset`` -- problem-domain
    data (Copycat's PDD), not a thief pool -- unless ``allow_problem_domain``. An unknown ``name`` is a
    ``KeyError`` listing the known pools."""
    POOLS[name]
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_POOL_SIZE:
            raise UsageError(f"pool size: expected a number of images from 1 to {MAX_POOL_SIZE:,}, got {n!r}")
        if n < need:
            raise UsageError(f"pool size: {n} images cannot supply the {need} distinct images the largest "
                             f"budget asks for; use a pool size of at least {need}")
    if transform is not None and transform not in POOL_TRANSFORMS:
        raise UsageError(f"pool transform: expected one of {', '.join(POOL_TRANSFORMS)}, got {transform!r}")
    if secret_dataset is not None and not allow_problem_domain and _same_images(name, secret_dataset):
        others = ", ".join(p for p in POOLS.names() if not _same_images(p, secret_dataset))
        raise UsageError(f"pool {name!r} holds the images of the secret's own dataset {secret_dataset!r}: that is "
                         f"problem-domain data (Copycat's PDD), not a thief pool; choose another pool ({others}) "
                         "or, to use it anyway, pass --allow-problem-domain-pool (allow_problem_domain=True)")


def load_pool(name, root=None, n=None, seed=0, *, progress: bool = False, transform: str | None = None,
              **options) -> Pool:
    """Build a registered thief pool (see ``POOLS.names()``; every dataset is one too: its train split);
    ``n`` images (default: all / 20,000), seeded; ``transform`` a :data:`POOL_TRANSFORMS` name applied as
    images are read; ``options`` go to the pool's builder (e.g. natural-patches' ``photos=``)."""
    if n is not None:
        check_positive_int(n, "n")
    pool = POOLS[name](data_root(root), n, seed, progress=progress, **options)
    return pool if transform is None else Pool(pool.name, pool.storage, pool.indices, pool.info, transform)


# -- what is present ------------------------------------------------------------------------------

_EMBEDDED = {"digits": "scikit-learn (bundled)", "uniform-noise": "generated", "dead-leaves": "generated"}


def _natural_row(build: bool) -> dict:
    """The natural-patches row of :func:`list_local`: its photos and, with ``build``, the near-duplicates
    dropped from the pool at its default size and seed 0 (as the profiles build it)."""
    present, missing = wallpapers_present()
    bundled = len(_bundled_photos())
    source = (f"{bundled + len(present)} photos: {bundled} bundled with scikit-image / scikit-learn + "
              f"{len(present)} Debian wallpaper photographs")
    if missing:
        source += f" ({', '.join(missing)} not installed)"
    row = dict(source=source, photos=bundled + len(present), wallpapers_missing=missing)
    if build:
        pool = load_pool("natural-patches", n=DEFAULT_POOL_SIZE, seed=0)
        row.update(pool_size=len(pool), duplicates_dropped=pool.info["duplicates_dropped"],
                   sources=pool.info["sources"])
    return row


def _found(spec: _Source, r: Path) -> Path | None:
    """The first of ``spec``'s folders (under the data root ``r``, then the system ones) holding all its files."""
    return next((d for d in (r / spec.dirname, *spec.system_dirs) if not _missing(d, spec)), None)


def present(root=None) -> set[str]:
    """The names of the registered datasets and pools usable here: the embedded ones, and those whose
    files are found (:func:`list_local`'s ``present``, without its scan of file sizes)."""
    r = data_root(root)
    return {name for reg in (DATASETS, POOLS) for name in reg.names()
            if SOURCES.get(name) is None or _found(SOURCES[name], r) is not None}


def list_local(root=None, *, build: bool = False) -> list[dict]:
    """One row per registered dataset/pool: name, kind, path, present, size_bytes, files (expected entries),
    source. Datasets, which also serve as thief pools, are listed once. The natural-patches row also has
    ``photos`` (how many) and, with ``build`` (a few seconds), ``duplicates_dropped`` (:func:`_natural_row`)."""
    r = data_root(root)
    rows = []
    for kind, reg in (("dataset", DATASETS), ("pool", POOLS)):
        for name in reg.names():
            if kind == "pool" and name in DATASETS:
                continue
            spec = SOURCES.get(name)
            if spec is None:
                row = dict(name=name, kind=kind, path=None, present=True, size_bytes=0, files=[],
                           source=_EMBEDDED.get(name, "embedded"))
                rows.append(row | _natural_row(build) if name == "natural-patches" else row)
                continue
            found = _found(spec, r)
            path = found or r / spec.dirname
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if found else 0
            rows.append(dict(name=name, kind=kind, path=str(path), present=found is not None, size_bytes=size,
                             files=list(spec.files), source="files"))
    return rows


# -- downloads (machines with internet) -----------------------------------------------------------

_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_GTSRB_URL = "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/"
_GTSRB_DOWNLOADS = [(_GTSRB_URL + "GTSRB_Final_Training_Images.zip", "f33fd80ac59bff73c82d25ab499e03a3", True),
                    (_GTSRB_URL + "GTSRB_Final_Test_Images.zip", "c7e4e6327067d32654124b0fe9e82185", True),
                    (_GTSRB_URL + "GTSRB_Final_Test_GT.zip", "fe31e9c9270bbcd7b84b7f21a9d9d9e5", True)]
# name -> [(url, md5, is_archive)]; the md5s are the published ones (torchvision uses the same).
DOWNLOADS = {
    "mnist": [(_MNIST_URL + f, m, False) for f, m in [
        ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
        ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
        ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c")]],
    "fashion-mnist": [(_FASHION_URL + f, m, False) for f, m in [
        ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
        ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
        ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310")]],
    "cifar10": [("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", True)],
    "gtsrb": _GTSRB_DOWNLOADS,
    "gtsrb43": _GTSRB_DOWNLOADS,
}


def _http_get(url: str, f, progress: bool = True) -> None:
    """Stream ``url`` into the binary file ``f`` (the only function touching the network)."""
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with progress_bar(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1],
                      disable=not progress) as bar:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as e:
        raise DatasetMissing(f"could not download {url}: {e}. Without internet, copy the files by hand "
                             "(see `stealnb data list` for the folders).") from None


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _download(url: str, dest: Path, md5: str, progress: bool) -> Path:
    """Download to a temp file beside ``dest``, verify its md5, then rename; nothing is left on failure."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with layout.atomic_open(dest, "wb", shared=True) as f:
        _http_get(url, f, progress=progress)
        f.flush()
        got = _md5(Path(f.name))
        if got != md5:  # raised inside the block: dest is left as it was
            raise DatasetCorrupt(f"{url}: downloaded file has md5 {got}, expected {md5}; nothing was saved")
    return dest


def _check_member(archive: Path, dest: Path, name: str, regular: bool) -> None:
    target = (dest / name).resolve()
    if (not regular or Path(name).is_absolute() or ".." in Path(name).parts
            or not target.is_relative_to(dest.resolve())):
        raise DatasetCorrupt(f"{archive}: refusing to extract {name!r} (a link, device or a path outside {dest})")


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a zip/tar into ``dest``, refusing absolute paths, '..', links and devices. Files are unpacked
    into a temp folder inside ``dest`` and renamed into place one by one."""
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                for m in z.infolist():
                    _check_member(archive, dest, m.filename, (m.external_attr >> 16) & 0o170000 != 0o120000)
                z.extractall(tmp)
        else:
            try:
                with tarfile.open(archive) as t:
                    members = t.getmembers()
                    for m in members:
                        _check_member(archive, dest, m.name, m.isfile() or m.isdir())
                    kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4
                    t.extractall(tmp, members=members, **kw)
            except tarfile.TarError as e:
                raise DatasetCorrupt(f"{archive}: not a readable zip or tar archive ({e})") from None
        for dirpath, _, files in os.walk(tmp):
            rel = Path(dirpath).relative_to(tmp)
            (dest / rel).mkdir(parents=True, exist_ok=True)
            for fn in files:
                os.replace(Path(dirpath) / fn, dest / rel / fn)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch(name, root=None, progress: bool = True) -> Path:
    """Download ``name`` from its official source into ``data_root(root)/<name>`` (md5-verified, atomic
    renames, archives extracted safely and then deleted). Returns the dataset folder."""
    spec = SOURCES.get(name)
    if name not in DOWNLOADS:
        if spec is not None:  # imagenet32: behind a login
            raise DatasetMissing(f"{name} cannot be downloaded automatically. {spec.hint} "
                                 f"Folder: {data_root(root) / spec.dirname}")
        if name in DATASETS or name in POOLS:
            raise ValueError(f"{name} is bundled or generated offline; nothing to fetch")
        raise ValueError(f"unknown dataset {name!r}; fetchable: {', '.join(DOWNLOADS)}")
    d = data_root(root) / spec.dirname
    if not _missing(d, spec):
        return d
    for url, md5, is_archive in DOWNLOADS[name]:
        dest = d / url.rsplit("/", 1)[-1]
        if not is_archive:
            if not (dest.is_file() and _md5(dest) == md5):
                _download(url, dest, md5, progress)
            continue
        _download(url, dest, md5, progress)
        try:
            safe_extract(dest, d)
        finally:
            dest.unlink(missing_ok=True)
    if _missing(d, spec):
        raise DatasetCorrupt(f"{name}: downloaded and extracted, but still missing: {', '.join(_missing(d, spec))}")
    return d

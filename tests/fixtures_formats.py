"""Writers for tiny dataset files in exactly the official on-disk formats (used by test_data.py)."""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx_bytes(arr: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: magic 0x0000 08 <ndim>, big-endian uint32 dims, raw payload."""
    assert arr.dtype == np.uint8
    return struct.pack(">i", 0x0800 | arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> Path:
    path = Path(str(path) + (".gz" if gz else ""))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(idx_bytes(arr)) if gz else idx_bytes(arr))
    return path


def write_mnist_like(d: Path, gz: bool, n_train: int = 20, n_test: int = 10, seed: int = 0) -> dict:
    """MNIST-format files in ``d``; returns the uint8 arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": (np.arange(n_train) % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    }
    for name, key in zip(IDX_NAMES, ("x_train", "y_train", "x_test", "y_test")):
        write_idx(d / name, arrays[key], gz)
    return arrays


def cifar_batch(data: np.ndarray, labels: list[int], label: bytes = b"training batch 1 of 5") -> bytes:
    """A CIFAR-10 python batch: a dict with bytes keys, pickled with protocol 2 like the originals."""
    return pickle.dumps({b"batch_label": label, b"labels": list(labels), b"data": data,
                         b"filenames": [b"img_%d.png" % i for i in range(len(labels))]}, protocol=2)


def write_cifar(root: Path, per_batch: int = 4, seed: int = 0) -> dict:
    """``root/cifar10/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``; returns the rows written."""
    rng = np.random.default_rng(seed)
    d = root / "cifar10" / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    out = {"train": [], "train_labels": [], "test": None, "test_labels": None}
    for i in range(1, 7):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        name = f"data_batch_{i}" if i <= 5 else "test_batch"
        (d / name).write_bytes(cifar_batch(data, labels))
        if i <= 5:
            out["train"].append(data)
            out["train_labels"] += labels
        else:
            out["test"], out["test_labels"] = data, labels
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (d / "batches.meta").write_bytes(pickle.dumps(
        {b"num_cases_per_batch": per_batch, b"label_names": names, b"num_vis": 3072}, protocol=2))
    return out


def sign_image(w: int, h: int, x1: int, y1: int, x2: int, y2: int, g: int, b: int) -> np.ndarray:
    """A w x h RGB image whose ROI [x1, x2) x [y1, y2) has R=200 in its top half and R=40 in its bottom
    half, constant G=g and B=b; the border outside the ROI is (255, 255, 255)."""
    a = np.full((h, w, 3), 255, np.uint8)
    mid = y1 + (y2 - y1) // 2
    a[y1:mid, x1:x2] = (200, g, b)
    a[mid:y2, x1:x2] = (40, g, b)
    return a


def write_gtsrb(root: Path, train_counts: dict[int, int], test_classes: list[int], seed: int = 0,
                gt_location: str = "GT-final_test.csv") -> dict:
    """The official GTSRB layout under ``root/gtsrb``: per-class folders with ``GT-<class>.csv`` and
    P6 ``.ppm`` images, test images with ``GT-final_test.test.csv`` (no ClassId) and, at
    ``gt_location`` (None: omitted), ``GT-final_test.csv`` with ClassId. Returns per-image (class, g, b)."""
    rng = np.random.default_rng(seed)
    base = root / "gtsrb"
    header = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"
    written = {"train": [], "test": []}
    serial = 0

    def one(path: Path, cls: int) -> str:
        nonlocal serial
        w, h = (int(v) for v in rng.integers(30, 60, 2))
        x1, y1 = (int(v) for v in rng.integers(5, 8, 2))
        x2, y2 = w - int(rng.integers(5, 8)), h - int(rng.integers(5, 8))
        g, b = 5 * cls, serial % 256
        serial += 1
        Image.fromarray(sign_image(w, h, x1, y1, x2, y2, g, b)).save(path, format="PPM")
        return f"{path.name};{w};{h};{x1};{y1};{x2};{y2};{cls}"

    train_dir = base / "GTSRB" / "Final_Training" / "Images"
    for cls in sorted(train_counts):
        cdir = train_dir / f"{cls:05d}"
        cdir.mkdir(parents=True)
        rows = []
        for k in range(train_counts[cls]):
            rows.append(one(cdir / f"{k // 30:05d}_{k % 30:05d}.ppm", cls))
            written["train"].append((cls, 5 * cls, (serial - 1) % 256))
        (cdir / f"GT-{cls:05d}.csv").write_text("\n".join([header, *rows]) + "\n")
    test_dir = base / "GTSRB" / "Final_Test" / "Images"
    test_dir.mkdir(parents=True)
    rows = []
    for k, cls in enumerate(test_classes):
        rows.append(one(test_dir / f"{k:05d}.ppm", cls))
        written["test"].append((cls, 5 * cls, (serial - 1) % 256))
    no_id = [r.rsplit(";", 1)[0] for r in rows]
    (test_dir / "GT-final_test.test.csv").write_text("\n".join([header.rsplit(";", 1)[0], *no_id]) + "\n")
    if gt_location is not None:
        (base / gt_location).write_text("\n".join([header, *rows]) + "\n")
    return written


def imagenet32_rows(n: int, start: int) -> np.ndarray:
    """N x 3072 channel-first uint8 rows; image i has R(0,0)=i%256, G(1,2)=(i//256)%256, B(31,31)=7."""
    data = np.zeros((n, 3, 32, 32), np.uint8)
    ids = np.arange(start, start + n)
    data[:, 0, 0, 0] = ids % 256
    data[:, 1, 1, 2] = (ids // 256) % 256
    data[:, 2, 31, 31] = 7
    return data.reshape(n, 3072)


def write_imagenet32(d: Path, sizes: list[int], npz: set[int] = frozenset()) -> None:
    """``train_data_batch_<i>`` files (pickled dicts, or ``.npz`` for batch numbers in ``npz``)."""
    d.mkdir(parents=True, exist_ok=True)
    start = 0
    for i, n in enumerate(sizes, start=1):
        data = imagenet32_rows(n, start)
        labels = list(range(1, n + 1))
        if i in npz:
            np.savez(d / f"train_data_batch_{i}.npz", data=data, labels=np.array(labels), mean=np.zeros(3072))
        else:
            (d / f"train_data_batch_{i}").write_bytes(
                pickle.dumps({"data": data, "labels": labels, "mean": np.zeros(3072)}))
        start += n


def write_photos(d: Path, seed: int = 0) -> list[Path]:
    """Three small synthetic photos in ``d``: a 240 x 320 PNG whose left half is one flat colour (its
    patches there are all the same image) and right half smooth texture, a 200 x 200 JPEG of noise,
    and a 160 x 480 PNG of two colour ramps."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    half = np.full((240, 320, 3), (120, 60, 30), np.uint8)
    coarse = rng.integers(0, 256, (15, 10, 3), dtype=np.uint8)
    half[:, 160:] = np.asarray(Image.fromarray(coarse).resize((160, 240), Image.Resampling.BICUBIC))
    noise = rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)
    grad = np.empty((160, 480, 3))
    grad[..., 0] = grad[..., 2] = np.linspace(0, 255, 480)  # left to right
    grad[..., 1] = np.linspace(40, 200, 160)[:, None]       # top to bottom
    paths = [d / "half_flat.png", d / "noise.jpg", d / "gradient.png"]
    Image.fromarray(half).save(paths[0])
    Image.fromarray(noise).save(paths[1], quality=90)
    Image.fromarray(np.round(grad).astype(np.uint8)).save(paths[2])
    return paths

"""Boundary validation shared by every public entry point.

Errors say what was expected and what arrived; nothing is ever clipped, cast or dropped.
"""
from __future__ import annotations

import numpy as np

IMAGE_SHAPE = (32, 32, 3)


class UsageError(ValueError):
    """An argument or output folder the user has to change (the CLI prints it as one line and
    exits with 2); raised by checks that run before any data is loaded or model trained."""


def check_images(x, name: str = "x", shape: tuple = IMAGE_SHAPE) -> np.ndarray:
    """Return ``x`` if it is a float32 batch ``N x H x W x C`` (default 32x32x3) in [0, 1].

    Raises ``TypeError`` for a non-array or wrong dtype and ``ValueError`` for a wrong shape,
    NaN/inf or values outside [0, 1].
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array of float32 images, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise TypeError(
            f"{name}: expected dtype float32 with values in [0, 1], got {x.dtype} "
            "(convert uint8 images with x.astype('float32') / 255)"
        )
    if x.ndim != 1 + len(shape) or tuple(x.shape[1:]) != tuple(shape):
        raise ValueError(f"{name}: expected shape (N, {', '.join(map(str, shape))}), got {x.shape}")
    if x.size and not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).reshape(len(x), -1).any(axis=1).sum())
        raise ValueError(f"{name}: {bad} image(s) contain NaN or inf; expected finite values in [0, 1]")
    if x.size:
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"{name}: expected values in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
    return x


def check_labels(y, name: str = "y", n: int | None = None, num_classes: int | None = None) -> np.ndarray:
    """Return ``y`` if it is an integer vector (length ``n`` and labels < ``num_classes`` if given)."""
    if not isinstance(y, np.ndarray) or y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        got = f"{type(y).__name__} {getattr(y, 'dtype', '')} {getattr(y, 'shape', '')}"
        raise TypeError(f"{name}: expected a 1-D integer numpy array of class labels, got {got}")
    if n is not None and len(y) != n:
        raise ValueError(f"{name}: expected {n} labels, got {len(y)}")
    if y.size and y.min() < 0:
        raise ValueError(f"{name}: labels must be >= 0, got {int(y.min())}")
    if num_classes is not None and y.size and y.max() >= num_classes:
        raise ValueError(f"{name}: labels must be < {num_classes}, got {int(y.max())}")
    return y


def check_positive_int(v, name: str, minimum: int = 1) -> int:
    """Return ``v`` as int if it is an integer >= ``minimum`` (bools refused)."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name}: expected an integer >= {minimum}, got {v!r}")
    if v < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {v}")
    return int(v)


def check_indices(idx, n: int, name: str) -> np.ndarray:
    """``idx`` as an int64 vector of unique indices in ``[0, n)`` (an empty array of any dtype is
    accepted): pool indices, the rows of :func:`stealnb.core.models.predict_logits`."""
    if not isinstance(idx, np.ndarray) or idx.ndim != 1:
        got = f"{type(idx).__name__} {getattr(idx, 'shape', '')}"
        raise TypeError(f"{name}: expected a 1-D numpy array of integer pool indices, got {got}")
    if idx.size == 0:
        return np.zeros(0, np.int64)
    if not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"{name}: expected integer pool indices, got dtype {idx.dtype}")
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= n:
        raise ValueError(f"{name}: indices must lie in [0, {n}) (the pool size), got range [{lo}, {hi}]")
    if len(np.unique(idx)) != len(idx):
        raise ValueError(f"{name}: indices must be unique, got {len(idx) - len(np.unique(idx))} duplicate(s)")
    return idx.astype(np.int64, copy=False)


def check_real(v, name: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> float:
    """Return ``v`` as float if it is a finite real number (bools refused: ``TypeError``) in
    ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``; ``None``: unbounded), else ``ValueError``."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a finite real number, got {v!r}")
    v = float(v)
    if not np.isfinite(v):
        raise ValueError(f"{name}: expected a finite real number, got {v}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"{name}: expected a value {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and v > hi:
        raise ValueError(f"{name}: expected a value <= {hi}, got {v}")
    return v


def as_rng(seed) -> np.random.Generator:
    """A ``numpy.random.Generator`` from an int seed or an existing Generator (never global state)."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None or isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        if seed is None:
            raise ValueError("an explicit seed (int) or numpy.random.Generator is required")
        return np.random.default_rng(int(seed))
    raise TypeError(f"seed: expected an int or numpy.random.Generator, got {type(seed).__name__}")

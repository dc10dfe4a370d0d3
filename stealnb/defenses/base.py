"""The defences' registry and spec syntax (:data:`DEFENSES`, :func:`parse_defense`,
:func:`parse_defenses`) and the checks the defences share. Each defence is one module of
:mod:`stealnb.defenses` that registers itself here."""
from __future__ import annotations

import json

import numpy as np

from ..core._checks import IMAGE_SHAPE, check_images
from ..core.defense_seam import Defense
from ..core.registry import Registry


#: name -> constructor of a :class:`stealnb.core.defense_seam.Defense`; each entry's docstring cites its source.
DEFENSES = Registry("defense")


def parse_defense(spec) -> Defense:
    """A defence from the spec syntax ``name:option=value,...`` (e.g. ``prada:delta=0.9,action=block``,
    ``round:decimals=2``, ``admis:misinformation_model=misinfo.keras,tau=0.8``), its dict form
    ``{"name": ..., **options}``, or a :class:`Defense` (returned as it is). Values are read as JSON
    (numbers, ``true``/``false``, ``null``) and otherwise kept as strings (paths). The one parser
    of the CLI, the server and the notebooks; names come from :data:`DEFENSES`."""
    if isinstance(spec, Defense):
        return spec
    if isinstance(spec, dict):
        opts = dict(spec)
        name = opts.pop("name", None)
    elif isinstance(spec, str):
        name, _, text = spec.strip().partition(":")
        opts = {}
        for kv in filter(None, (t.strip() for t in text.split(","))):
            k, eq, v = kv.partition("=")
            if not eq or not k.strip():
                raise ValueError(f"defense {spec!r}: expected NAME[:option=value,...], got {kv!r}")
            try:
                opts[k.strip()] = json.loads(v)
            except ValueError:
                opts[k.strip()] = v
    else:
        raise TypeError(f"defense: expected a spec 'name:option=value,...', a dict or a Defense, got "
                        f"{type(spec).__name__}")
    if name not in DEFENSES:
        raise ValueError(f"defense: unknown name {name!r}; expected one of: {', '.join(DEFENSES.names())}")
    try:
        return DEFENSES[name](**opts)
    except TypeError as e:
        raise ValueError(f"defense {name}: {e}") from None


def parse_defenses(specs) -> list[Defense]:
    """:func:`parse_defense` of each of ``specs`` (``None``: none; one string may join several with ``;``)."""
    if specs is None:
        return []
    if isinstance(specs, (str, dict, Defense)):
        specs = [specs]
    out = []
    for s in specs:
        out += [parse_defense(t) for t in s.split(";") if t.strip()] if isinstance(s, str) else [parse_defense(s)]
    return out


# ----------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------


def check_probs(p, name: str = "probs", atol: float = 1e-4) -> np.ndarray:
    """Return ``p`` if it is a floating ``N x C`` (C >= 2) matrix of finite values in [0, 1]
    whose rows sum to 1 within ``atol``; otherwise raise ``TypeError``/``ValueError``."""
    if not isinstance(p, np.ndarray) or not np.issubdtype(p.dtype, np.floating):
        got = f"{type(p).__name__} {getattr(p, 'dtype', '')}"
        raise TypeError(f"{name}: expected a floating numpy array of class probabilities, got {got}")
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"{name}: expected shape (N, C) with C >= 2 classes, got {p.shape}")
    if p.size and not np.isfinite(p).all():
        raise ValueError(f"{name}: contains NaN or inf; expected probabilities in [0, 1]")
    if p.size and (p.min() < 0.0 or p.max() > 1.0):
        raise ValueError(f"{name}: expected values in [0, 1], got range [{p.min():.4g}, {p.max():.4g}]")
    if len(p):
        err = np.abs(p.sum(axis=1, dtype=np.float64) - 1.0)
        if err.max() > atol:
            i = int(err.argmax())
            raise ValueError(
                f"{name}: every row must sum to 1 (within {atol:g}); row {i} sums to {p[i].sum():.6g}"
            )
    return p


def _check_feature_batch(x, name: str) -> np.ndarray:
    if not isinstance(x, np.ndarray) or not np.issubdtype(x.dtype, np.floating):
        got = f"{type(x).__name__} {getattr(x, 'dtype', '')}"
        raise TypeError(f"{name}: expected a floating numpy array (N, ...) of queries, got {got}")
    if x.ndim < 2:
        raise ValueError(f"{name}: expected shape (N, ...) with one query per row, got {x.shape}")
    if x.size and not np.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or inf; expected finite query values")
    return x


def _images_any_shape(x, name: str) -> np.ndarray:
    """check_images for any N x H x W x C batch (the package default is 32x32x3)."""
    shape = tuple(x.shape[1:]) if isinstance(x, np.ndarray) and x.ndim == 4 else IMAGE_SHAPE
    return check_images(x, name, shape=shape)

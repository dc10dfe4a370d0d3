"""Defences against model extraction (thesis 002 §3.2 and §5.7), independent of any transport.

Everything here is a pure function on numpy arrays or a small stateful class, so the same
objects plug into an in-process oracle and an HTTP server alike.

* :class:`PradaDetector` -- query-stream detection with the Shapiro-Wilk test on minimum
  distances (Juuti et al. 2019, "PRADA: Protecting against DNN model stealing attacks", EuroS&P;
  thesis 002 §5.7.2).
* :func:`adaptive_misinformation` / :class:`AdaptiveMisinformation` (the defence) -- mix in a misinformation
  model's output for out-of-distribution queries (Kariyappa & Qureshi 2020, "Defending against
  model stealing attacks with Adaptive Misinformation", CVPR; thesis 002 §5.7.1, "ADMIS").
* :func:`round_probs`, :func:`top_k_probs`, :func:`reverse_sigmoid` -- soft-label output
  perturbations (Tramèr et al. 2016; Orekondy et al. 2019; Lee et al. 2019).
* EWE: :func:`make_watermark_trigger`, :func:`snnl`, :func:`train_ewe`,
  :func:`watermark_success`, :func:`ownership_test` (Jia et al. 2021, "Entangled watermarks as a
  defense against model extraction", USENIX Security; Frosst et al. 2019 for the SNNL;
  thesis 002 §5.7.3).
"""
from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import special, stats

from ..core._checks import IMAGE_SHAPE, as_rng, check_images, check_labels, check_positive_int, check_real
from ..core.defense_seam import ACTIONS, Defense
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


# ----------------------------------------------------------------------------------------------
# PRADA (Juuti et al. 2019)
# ----------------------------------------------------------------------------------------------


def prada_statistic(distances, outlier_std: float | None = 3.0) -> float:
    """Shapiro-Wilk W of a set of minimum distances, as PRADA tests it (Juuti et al. 2019, Alg. 1).

    Values further than ``outlier_std`` standard deviations from the mean are removed first
    (the paper's D' and the authors' reference code; ``None`` keeps all). A set with zero
    range after that has W = 1 by convention (scipy would return the same, with a warning).
    ``scipy.stats.shapiro`` warns that its *p-value* may be inaccurate for n > 5000; PRADA only
    uses the statistic W, which is computed for any n, so that warning is suppressed.
    """
    d = np.asarray(distances, dtype=np.float64).ravel()
    if outlier_std is not None and len(d):
        m, s = d.mean(), d.std()
        d = d[np.abs(d - m) <= outlier_std * s]
    if len(d) < 3:
        raise ValueError(f"distances: the Shapiro-Wilk test needs at least 3 values, got {len(d)}")
    if np.ptp(d) == 0:
        return 1.0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*N > 5000.*", category=UserWarning)
        return float(stats.shapiro(d).statistic)


class PradaDetector:
    """PRADA: per-client detection of model-extraction query streams (Juuti et al. 2019, Alg. 1;
    thesis 002 §5.7.2, Fig. 23).

    For every query ``x`` with predicted class ``c``: if the growing set ``G_c`` is empty, ``x``
    starts it (threshold ``T_c = 0``, ``D_{G_c} = {0}``, nothing is added to ``D``). Otherwise
    ``d_min`` = min distance from ``x`` to ``G_c`` is added to ``D``; if ``d_min > T_c``, ``x``
    joins ``G_c``, ``d_min`` joins ``D_{G_c}`` and ``T_c = max(T_c, mean(D_{G_c}) - std(D_{G_c}))``.
    Once ``|D| > min_queries`` (100 in the paper), the Shapiro-Wilk statistic ``W`` of ``D``
    (outliers beyond ``outlier_std`` std removed) is computed after every ``test_every``-th
    query; the alarm fires when ``W < delta`` and then stays on (``flagged``; ``flagged_at``
    is the 1-based index of the query that raised it). Benign natural queries give roughly
    normal min-distance sets; synthetic attack queries (small perturbations of earlier
    queries mixed with new seeds) do not.

    The authors' reference code also tests only every 10th query (``test_every=10`` here) and
    pools only classes with >= 10 distances (not done here: every distance counts, as in Alg. 1).
    Queries are flattened and stored as float32 (``G_c`` are growing float32 arrays); distances
    are computed exactly (difference then norm, chunked), not via the dot-product expansion.
    """

    _METRICS = ("l2", "l1", "linf")

    def __init__(
        self,
        delta: float = 0.9,
        min_queries: int = 100,
        metric: str = "l2",
        outlier_std: float | None = 3.0,
        test_every: int = 1,
    ):
        self.delta = check_real(delta, "delta", 0.0, 1.0)
        self.min_queries = check_positive_int(min_queries, "min_queries", minimum=2)
        if metric not in self._METRICS:
            raise ValueError(f"metric: expected one of {self._METRICS}, got {metric!r}")
        self.metric = metric
        if outlier_std is not None:
            outlier_std = check_real(outlier_std, "outlier_std", 0.0, lo_open=True)
        self.outlier_std = outlier_std
        self.test_every = check_positive_int(test_every, "test_every")
        self.reset()

    def reset(self) -> None:
        """Forget every query (a new client)."""
        self.flagged: bool = False
        self.flagged_at: int | None = None
        self.n_queries: int = 0
        self.distances: list[float] = []
        self.w_history: list[tuple[int, float]] = []  # (1-based query index, W) per test
        self.thresholds: dict[int, float] = {}
        self._sets: dict[int, np.ndarray] = {}
        self._sizes: dict[int, int] = {}
        self._set_dists: dict[int, list[float]] = {}
        self._dim: tuple | None = None

    @property
    def last_w(self) -> float | None:
        """W of the most recent test, or None before the first test."""
        return self.w_history[-1][1] if self.w_history else None

    @property
    def growing_set_sizes(self) -> dict[int, int]:
        return dict(self._sizes)

    def _min_distance(self, g: np.ndarray, v: np.ndarray, chunk: int = 1024) -> float:
        best = np.inf
        for s in range(0, len(g), chunk):
            diff = g[s : s + chunk] - v
            if self.metric == "l2":
                d = np.sqrt(np.einsum("ij,ij->i", diff, diff, dtype=np.float64))
            elif self.metric == "l1":
                d = np.abs(diff).sum(axis=1, dtype=np.float64)
            else:
                d = np.abs(diff).max(axis=1).astype(np.float64)
            best = min(best, float(d.min()))
        return best

    def _add(self, c: int, v: np.ndarray) -> None:
        g, n = self._sets.get(c), self._sizes.get(c, 0)
        if g is None:
            g = np.empty((16, v.size), np.float32)
        elif n == len(g):
            g = np.concatenate([g, np.empty_like(g)])
        g[n] = v
        self._sets[c], self._sizes[c] = g, n + 1

    def observe(self, x: np.ndarray, predicted_labels: np.ndarray) -> np.ndarray:
        """Process queries ``x`` (N x ..., floating) with the model's predicted labels, one by one
        in order; returns a bool array: ``flagged`` after each sample."""
        _check_feature_batch(x, "x")
        check_labels(predicted_labels, "predicted_labels", n=len(x))
        if self._dim is None:
            self._dim = tuple(x.shape[1:])
        elif tuple(x.shape[1:]) != self._dim:
            raise ValueError(f"x: expected queries of shape {self._dim} as before, got {tuple(x.shape[1:])}")
        flat = x.reshape(len(x), -1).astype(np.float32, copy=False)
        out = np.zeros(len(x), dtype=bool)
        for i in range(len(x)):
            self.n_queries += 1
            c, v = int(predicted_labels[i]), flat[i]
            if c not in self._sets:
                self._add(c, v)
                self.thresholds[c] = 0.0
                self._set_dists[c] = [0.0]
            else:
                d = self._min_distance(self._sets[c][: self._sizes[c]], v)
                self.distances.append(d)
                if d > self.thresholds[c]:
                    self._add(c, v)
                    dg = self._set_dists[c]
                    dg.append(d)
                    self.thresholds[c] = max(self.thresholds[c], float(np.mean(dg) - np.std(dg)))
            if len(self.distances) > self.min_queries and self.n_queries % self.test_every == 0:
                w = prada_statistic(self.distances, self.outlier_std)
                self.w_history.append((self.n_queries, w))
                if w < self.delta and not self.flagged:
                    self.flagged, self.flagged_at = True, self.n_queries
            out[i] = self.flagged
        return out


@DEFENSES.register("prada")
class Prada(Defense):
    """PRADA at the oracle (Juuti et al. 2019, "PRADA: Protecting against DNN model stealing
    attacks", EuroS&P, Alg. 1; thesis 002 §5.7.2): one :class:`PradaDetector` per client over its
    paid samples, with the undefended top-1 as class; the first time a client's detector is
    flagged it raises an alarm (``w``: the Shapiro-Wilk statistic that did) and ``action`` follows
    (``"log"``, ``"block"`` or ``"poison"``, see :mod:`stealnb.core.defense_seam`). The detectors'
    growing sets are kept in memory; the alarms survive a restart in the server's query log."""

    name = "prada"

    def __init__(self, delta: float = 0.9, min_queries: int = 100, metric: str = "l2",
                 outlier_std: float | None = 3.0, test_every: int = 1, action: str = "block"):
        self.detector_options = dict(delta=delta, min_queries=min_queries, metric=metric, outlier_std=outlier_std,
                                     test_every=test_every)
        probe = PradaDetector(**self.detector_options)  # validates the options
        self.detector_options.update(delta=probe.delta, min_queries=probe.min_queries, outlier_std=probe.outlier_std)
        if action not in ACTIONS:
            raise ValueError(f"action: expected one of {ACTIONS}, got {action!r}")
        self.action = action
        self.detectors: dict[object, PradaDetector] = {}

    def options(self) -> dict:
        return {**self.detector_options, "action": self.action}

    def observe(self, x: np.ndarray, labels: np.ndarray, *, client=None) -> dict | None:
        det = self.detectors.get(client)
        if det is None:
            det = self.detectors[client] = PradaDetector(**self.detector_options)
        before, was = det.n_queries, det.flagged
        det.observe(x, labels)
        if det.flagged and not was:
            return {"at": det.flagged_at - before, "w": det.last_w}
        return None


# ----------------------------------------------------------------------------------------------
# Adaptive Misinformation (Kariyappa & Qureshi 2020)
# ----------------------------------------------------------------------------------------------


def misinformation_alpha(probs: np.ndarray, tau: float = 0.5, nu: float = 1000.0) -> np.ndarray:
    """Per-row mixing weight ``alpha = 1 / (1 + exp(nu * (max_prob - tau)))`` (Kariyappa & Qureshi
    2020): ~0 for confident (in-distribution) rows, ~1 when the maximum softmax
    probability (the OOD score of Hendrycks & Gimpel 2017) is below ``tau``. The authors'
    code uses ``nu = 10000``."""
    check_probs(probs, "probs")
    tau = check_real(tau, "tau", 0.0, 1.0)
    nu = check_real(nu, "nu", 0.0, lo_open=True)
    return special.expit(nu * (tau - probs.max(axis=1).astype(np.float64)))


def adaptive_misinformation(
    probs: np.ndarray, misinfo_probs: np.ndarray, tau: float = 0.5, nu: float = 1000.0
) -> np.ndarray:
    """Adaptive Misinformation output ``y' = (1 - alpha) y + alpha y_hat`` (Kariyappa & Qureshi
    2020; thesis 002 §5.7.1, Fig. 22).

    ``probs`` are the defended model's softmax outputs ``y``, ``misinfo_probs`` those of the
    misinformation model ``y_hat`` (see :func:`train_misinformation_model`); ``alpha`` from
    :func:`misinformation_alpha`. Rows stay probability vectors (a convex combination). The
    result has the floating dtype common to both inputs.
    """
    check_probs(probs, "probs")
    check_probs(misinfo_probs, "misinfo_probs")
    if misinfo_probs.shape != probs.shape:
        raise ValueError(f"misinfo_probs: expected shape {probs.shape} like probs, got {misinfo_probs.shape}")
    a = misinformation_alpha(probs, tau, nu)[:, None]
    out = (1.0 - a) * probs.astype(np.float64) + a * misinfo_probs.astype(np.float64)
    return out.astype(np.result_type(probs, misinfo_probs))


def misinformation_loss(y_true, logits):
    """Misinformation training objective ``-log(1 - p_y)`` (Kariyappa & Qureshi 2020): the
    misinformation model learns to put little probability on the correct class. Computed
    stably from logits as ``logsumexp(z) - logsumexp(z without z_y)``; returns per-sample loss."""
    import tensorflow as tf

    logits = tf.convert_to_tensor(logits)
    y = tf.reshape(tf.cast(y_true, tf.int32), [-1])
    mask = tf.one_hot(y, tf.shape(logits)[-1], on_value=True, off_value=False)
    others = tf.where(mask, tf.constant(-np.inf, logits.dtype), logits)
    return tf.reduce_logsumexp(logits, axis=-1) - tf.reduce_logsumexp(others, axis=-1)


def train_misinformation_model(
    model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Train ``model`` (logits out, compiled here with Adam) as the misinformation function on the
    defender's in-distribution data with :func:`misinformation_loss`; returns the history dict.
    Its accuracy should fall towards 0 (it learns to avoid the correct class)."""
    import keras

    check_images(x, "x", shape=tuple(model.input_shape[1:]))
    check_labels(y, "y", n=len(x), num_classes=model.output_shape[-1])
    check_positive_int(epochs, "epochs")
    check_positive_int(batch_size, "batch_size")
    keras.utils.set_random_seed(int(seed))
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=misinformation_loss, metrics=["accuracy"])
    callbacks = []
    if progress:
        from ..core.train import _EpochBar

        callbacks.append(_EpochBar(epochs, "misinformation"))
    hist = model.fit(x, y, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=0, callbacks=callbacks)
    return {k: [float(v) for v in vals] for k, vals in hist.history.items()}


@DEFENSES.register("admis")
class AdaptiveMisinformation(Defense):
    """Adaptive Misinformation (Kariyappa & Qureshi 2020, "Defending against model stealing attacks
    with Adaptive Misinformation", CVPR, eq. 4-5; thesis 002 §5.7.1): every answer becomes
    ``(1 - alpha) y + alpha y_hat`` (:func:`adaptive_misinformation`), ``y_hat`` the softmax of the
    ``misinformation_model`` (a Keras model with logits out, a ``.keras`` file or a secret folder;
    :func:`train_misinformation_model`) and ``alpha`` large for queries whose maximum softmax
    probability is below ``tau`` (steepness ``nu``). The paper also trains the defended model with
    Outlier Exposure to sharpen the OOD score; that is left to whoever trains it.

    ``n_queries`` counts answered queries and ``n_misinformed`` those with ``alpha > 0.5``.
    """

    name = "admis"

    def __init__(self, misinformation_model, tau: float = 0.5, nu: float = 1000.0, batch_size: int = 512):
        from ..core.models import load_model

        self.source = str(misinformation_model) if isinstance(misinformation_model, (str, Path)) else None
        model = load_model(misinformation_model) if self.source is not None else misinformation_model
        if not callable(model) or not hasattr(model, "output_shape"):
            raise TypeError("misinformation_model: expected a Keras model, a .keras file or a secret folder, "
                            f"got {type(misinformation_model).__name__}")
        self.misinformation_model = model
        self.tau = check_real(tau, "tau", 0.0, 1.0)
        self.nu = check_real(nu, "nu", 0.0, lo_open=True)
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.reset_stats()

    def reset_stats(self) -> None:
        self.n_queries = 0
        self.n_misinformed = 0

    def check(self, *, output: str, num_classes: int) -> None:
        got = int(self.misinformation_model.output_shape[-1])
        if got != int(num_classes):
            raise ValueError(f"misinformation_model: expected {num_classes} classes like the defended model, got {got}")

    def options(self) -> dict:
        return {**({"misinformation_model": self.source} if self.source else {}), "tau": self.tau, "nu": self.nu}

    def answer(self, x: np.ndarray, probs: np.ndarray, *, client=None) -> np.ndarray:
        """The defended probabilities of ``x`` given the defended model's ``probs`` (float64 out)."""
        from ..core.models import predict_logits, softmax

        p_hat = softmax(predict_logits(self.misinformation_model, x, batch_size=self.batch_size), dtype=np.float64)
        alpha = misinformation_alpha(probs, self.tau, self.nu)
        self.n_queries += len(x)
        self.n_misinformed += int((alpha > 0.5).sum())
        return adaptive_misinformation(probs, p_hat, self.tau, self.nu)


# ----------------------------------------------------------------------------------------------
# Output perturbations for soft-label APIs
# ----------------------------------------------------------------------------------------------


def round_probs(p: np.ndarray, decimals: int = 2) -> np.ndarray:
    """Round confidences to ``decimals`` places (Tramèr et al. 2016, "rounding confidences"
    countermeasure).

    Returned as rounded, *not* renormalised (what an API would send): rows sum to 1 only within
    ``C * 0.5 * 10**-decimals``. Rounding is monotone, so the original top-1 class stays among the
    row's maxima; it can only tie (e.g. 0.504 and 0.496 both become 0.5).
    """
    check_probs(p, "p")
    if isinstance(decimals, bool) or not isinstance(decimals, (int, np.integer)) or decimals < 0:
        raise ValueError(f"decimals: expected an integer >= 0, got {decimals!r}")
    return np.round(p, int(decimals))


def top_k_probs(p: np.ndarray, k: int = 1, renormalize: bool = True) -> np.ndarray:
    """Keep the ``k`` largest probabilities of each row and zero the rest (the top-k output of
    commercial APIs; Tramèr et al. 2016, Orekondy et al. 2019). With ``renormalize`` the
    kept values are divided by their sum, so rows are probability vectors (``k=1`` gives one-hot
    hard labels); without, they are returned as they were. Ties at the k-th place are broken by
    the lower class index, so the top-1 class (``argmax``) is always kept and stays top-1."""
    check_probs(p, "p")
    k = check_positive_int(k, "k")
    if k > p.shape[1]:
        raise ValueError(f"k: expected at most {p.shape[1]} (the number of classes), got {k}")
    idx = np.argsort(-p, axis=1, kind="stable")[:, :k]
    out = np.zeros_like(p)
    rows = np.arange(len(p))[:, None]
    out[rows, idx] = p[rows, idx]
    if renormalize:
        s = out.sum(axis=1, keepdims=True)
        if len(p) and s.min() <= 0:
            raise ValueError(f"p: a row's top-{k} probabilities sum to 0; cannot renormalise")
        out = out / s
    return out


def _reverse_sigmoid_raw(p: np.ndarray, beta: float, gamma: float) -> np.ndarray:
    p = p.astype(np.float64)
    # sigmoid(gamma * logit(p)) written as p^g / (p^g + (1-p)^g): exact at p = 0 and p = 1
    pg, qg = np.power(p, gamma), np.power(1.0 - p, gamma)
    return p - beta * (pg / (pg + qg) - 0.5)


def reverse_sigmoid(
    p: np.ndarray, beta: float = 0.5, gamma: float = 1.5, clip_negative: bool = False
) -> np.ndarray:
    """Reverse-sigmoid perturbation (Lee et al. 2019, "Defending against NN model stealing attacks
    using deceptive perturbations", IEEE S&P Workshops, eq. 3-4):
    ``y' = alpha * (y - beta * (sigmoid(gamma * logit(y)) - 1/2))`` with ``alpha`` normalising
    each row to sum 1.

    The perturbation is meant to leave the top-1 label intact (Orekondy et al.'s reimplementation
    marks it top-1 preserving). That holds whenever ``g(y) = y - beta * (sigmoid(gamma *
    logit(y)) - 1/2)`` is increasing on [0, 1]: ``g'(y) = 1 - beta * gamma * s'(gamma z) / s'(z)``
    (``z = logit y``) and the ratio is at most 1 for ``gamma >= 1``, so ``gamma >= 1`` with
    ``beta * gamma < 1`` keeps the whole ranking (:func:`reverse_sigmoid_preserves_ranking`;
    the defaults 0.5/1.5 are such a setting, not values from the paper; ``beta = gamma = 1``
    makes ``g`` constant and every output uniform). Otherwise the top-1 can change:
    ``beta * gamma > 1`` reverses the order around y = 1/2 (0.52 vs 0.46), and ``gamma < 1``
    lifts tiny probabilities -- with IBM ART's defaults ``beta = 1, gamma = 0.1``, ``g(1e-10)
    = 0.41 > g(0.35) = 0.37``, so a class with probability ~0 overtakes a 0.35 top-1.

    For ``beta <= 1`` every entry stays non-negative. Larger ``beta`` can push entries below 0;
    that raises ``ValueError`` unless ``clip_negative=True``, which sets them to 0 before
    normalising (as ART's ``ReverseSigmoid`` does).
    """
    check_probs(p, "p")
    beta = check_real(beta, "beta", 0.0, lo_open=True)
    gamma = check_real(gamma, "gamma", 0.0, lo_open=True)
    raw = _reverse_sigmoid_raw(p, beta, gamma)
    if len(raw) and raw.min() < 0:
        if not clip_negative:
            raise ValueError(
                f"reverse_sigmoid: beta={beta} makes some perturbed values negative "
                f"(min {raw.min():.4g}); use beta <= 1 or clip_negative=True"
            )
        raw = np.maximum(raw, 0.0)
    s = raw.sum(axis=1, keepdims=True)
    if len(raw) and s.min() <= 0:
        raise ValueError("reverse_sigmoid: a perturbed row sums to 0; cannot normalise")
    return (raw / s).astype(p.dtype)


def reverse_sigmoid_preserves_ranking(beta: float, gamma: float) -> bool:
    """True when ``beta``/``gamma`` satisfy the sufficient condition ``gamma >= 1`` and
    ``beta * gamma < 1`` under which :func:`reverse_sigmoid` keeps every row's ranking."""
    return float(gamma) >= 1.0 and float(beta) * float(gamma) < 1.0


class OutputPerturbation(Defense):
    """A soft-label output perturbation (a pure function of the probabilities) as a defence at the
    oracle; the registered subclasses name the function (``round``, ``top_k``, ``reverse_sigmoid``)."""

    outputs = ("topk", "probs")
    function = staticmethod(round_probs)

    def __init__(self, **options):
        try:
            inspect.signature(self.function).bind(None, **options)
        except TypeError as e:
            raise TypeError(f"{e}; options of {self.name}: "
                            f"{', '.join(list(inspect.signature(self.function).parameters)[1:])}") from None
        self.perturbation_options = options

    def check(self, *, output: str, num_classes: int) -> None:
        super().check(output=output, num_classes=num_classes)
        self.function(np.full((1, num_classes), 1.0 / num_classes), **self.perturbation_options)  # validates

    def options(self) -> dict:
        return dict(self.perturbation_options)

    def answer(self, x: np.ndarray, probs: np.ndarray, *, client=None) -> np.ndarray:
        return self.function(probs, **self.perturbation_options)


def _register_perturbation(name: str, function) -> None:
    doc = f"Output perturbation :func:`{function.__name__}` at the oracle. " + (function.__doc__ or "")
    cls = type(f"Perturbation_{name}", (OutputPerturbation,),
               {"name": name, "function": staticmethod(function), "__doc__": doc, "__module__": __name__})
    DEFENSES.register(name)(cls)


for _name, _fn in (("round", round_probs), ("top_k", top_k_probs), ("reverse_sigmoid", reverse_sigmoid)):
    _register_perturbation(_name, _fn)


# ----------------------------------------------------------------------------------------------
# EWE: Entangled Watermarks (Jia et al. 2021)
# ----------------------------------------------------------------------------------------------

_POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left", "center")


def make_watermark_trigger(
    x_source: np.ndarray, trigger_size: int = 4, position="bottom-right", value: float = 1.0
) -> np.ndarray:
    """Copy of ``x_source`` (float32 N x H x W x C in [0, 1]) with a ``trigger_size`` square set
    to ``value`` in every channel at ``position`` (a corner, ``"center"`` or a ``(row, col)``
    top-left corner). EWE's watermark data are source-class samples stamped this way and
    labelled with the target class (Jia et al. 2021; their reference code stamps a 3x3 square
    and chooses the location where the SNNL gradient is largest -- a fixed location here)."""
    _images_any_shape(x_source, "x_source")
    _, h, w, _ = x_source.shape
    s = check_positive_int(trigger_size, "trigger_size")
    if s > min(h, w):
        raise ValueError(f"trigger_size: expected at most {min(h, w)} for {h}x{w} images, got {s}")
    value = check_real(value, "value", 0.0, 1.0)
    if isinstance(position, str):
        if position not in _POSITIONS:
            raise ValueError(f"position: expected one of {_POSITIONS} or (row, col), got {position!r}")
        r = {"top": 0, "bottom": h - s, "center": (h - s) // 2}[position.split("-")[0]]
        c = {"left": 0, "right": w - s, "center": (w - s) // 2}[position.split("-")[-1]]
    else:
        try:
            r, c = (int(v) for v in position)
        except (TypeError, ValueError):
            raise ValueError(f"position: expected one of {_POSITIONS} or (row, col), got {position!r}") from None
        if not (0 <= r <= h - s and 0 <= c <= w - s):
            raise ValueError(f"position: a {s}x{s} trigger at {(r, c)} does not fit in {h}x{w} images")
    out = x_source.copy()
    out[:, r : r + s, c : c + s, :] = value
    return out


def snnl(features, labels, temperature: float, metric: str = "euclidean", eps: float = 1e-5):
    """Soft nearest-neighbour loss (Frosst, Papernot & Hinton 2019), as used by EWE:

    ``-(1/b) sum_i log(eps + sum_{j != i, y_j = y_i} e^{-d_ij / T} / sum_{k != i} e^{-d_ik / T})``

    with ``d`` the squared Euclidean distance (``metric="euclidean"``, the papers' definition) or
    the cosine distance ``1 - cos`` (``"cosine"``, EWE's reference code). ``eps`` = 1e-5 is the
    stability constant of Frosst et al.'s reference code (a sample with no same-label partner
    then costs ``-log(eps)``); ``eps = 0`` gives the bare definition. Computed with log-sum-exp,
    so large distances do not underflow. High SNNL = classes entangled. Returns a scalar
    ``tf.Tensor`` (differentiable in ``features``).
    """
    import tensorflow as tf

    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric: expected 'euclidean' or 'cosine', got {metric!r}")
    temperature = check_real(temperature, "temperature", 0.0, lo_open=True)
    eps = check_real(eps, "eps", 0.0)
    f = tf.convert_to_tensor(features)
    if not f.dtype.is_floating:
        f = tf.cast(f, tf.float32)
    n = tf.shape(f)[0]
    f = tf.reshape(f, [n, -1])
    y = tf.reshape(tf.convert_to_tensor(labels), [-1])
    if metric == "euclidean":
        sq = tf.reduce_sum(tf.square(f), axis=1)
        d = tf.maximum(sq[:, None] + sq[None, :] - 2.0 * tf.matmul(f, f, transpose_b=True), 0.0)
    else:
        fn = tf.math.l2_normalize(f, axis=1)
        d = 1.0 - tf.matmul(fn, fn, transpose_b=True)
    logits = -d / temperature
    off_diag = tf.logical_not(tf.eye(n, dtype=tf.bool))
    same = tf.logical_and(tf.equal(y[:, None], y[None, :]), off_diag)
    very_neg = tf.constant(-1e30, f.dtype)
    log_num = tf.reduce_logsumexp(tf.where(same, logits, very_neg), axis=1)
    log_den = tf.reduce_logsumexp(tf.where(off_diag, logits, very_neg), axis=1)
    return -tf.reduce_mean(tf.math.log(tf.cast(eps, f.dtype) + tf.exp(log_num - log_den)))


def _int_seed(seed) -> int:
    if isinstance(seed, np.random.Generator):
        return int(seed.integers(0, 2**31 - 1))
    as_rng(seed)  # validates
    return int(seed)


def train_ewe(
    model,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_wm: np.ndarray,
    target_class: int,
    *,
    epochs: int,
    batch_size: int = 64,
    snnl_weight: float = 1.0,
    temperature: float = 0.1,
    seed,
    pretrain_epochs: int = 0,
    ratio: int = 1,
    learning_rate: float = 1e-3,
    layers: Sequence[str] | None = None,
    metric: str = "cosine",
    progress: bool = False,
):
    """Embed an entangled watermark in ``model`` (trained in place and returned; Jia et al. 2021
    and their reference code; thesis 002 §5.7.3).

    1. ``pretrain_epochs`` ordinary epochs on ``(x_train, y_train)`` (0 for an already trained
       model).
    2. ``epochs`` watermarking epochs: one pass over the shuffled training data in which every
       ``ratio`` clean batches (cross-entropy) are followed by one watermark batch of
       ``batch_size // 2`` watermark samples ``x_wm`` and as many target-class training samples,
       all labelled ``target_class``, with loss ``CE - snnl_weight * sum_l SNNL(h_l, w, T)``,
       where ``h_l`` are the representations at ``layers`` (default: the layer feeding the
       output layer; ``metric="cosine"`` as in the reference code's vision settings) and ``w``
       marks watermark (1) vs. target-class (0) samples. Maximising the
       SNNL entangles the watermark with the target class's natural features, so a copy trained
       on the model's labels of natural data inherits it.

    Simplifications (CPU-sized): the trigger location is fixed by :func:`make_watermark_trigger`
    (the paper picks it from the SNNL gradient and refines watermark samples with gradient
    steps), temperatures are fixed (the paper adapts them by gradient steps) and cross-entropy is
    averaged over the batch (the reference code sums it, so its SNNL factors, 32 for MNIST, are
    ``batch_size`` times smaller than the equivalent ``snnl_weight`` here). Optimiser: Adam.
    """
    import keras
    import tensorflow as tf

    in_shape = tuple(model.input_shape[1:])
    num_classes = int(model.output_shape[-1])
    check_images(x_train, "x_train", shape=in_shape)
    check_labels(y_train, "y_train", n=len(x_train), num_classes=num_classes)
    check_images(x_wm, "x_wm", shape=in_shape)
    if len(x_wm) == 0:
        raise ValueError("x_wm: expected at least one watermark sample, got none")
    if isinstance(target_class, bool) or not isinstance(target_class, (int, np.integer)) or not (
        0 <= target_class < num_classes
    ):
        raise ValueError(f"target_class: expected an integer in [0, {num_classes}), got {target_class!r}")
    target_class = int(target_class)
    epochs = check_positive_int(epochs, "epochs")
    batch_size = check_positive_int(batch_size, "batch_size", minimum=4)
    check_positive_int(pretrain_epochs, "pretrain_epochs", minimum=0)
    ratio = check_positive_int(ratio, "ratio")
    snnl_weight = check_real(snnl_weight, "snnl_weight", 0.0)
    temperature = check_real(temperature, "temperature", 0.0, lo_open=True)
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric: expected 'euclidean' or 'cosine', got {metric!r}")
    x_target = x_train[y_train == target_class]
    if len(x_target) < 2:
        raise ValueError(
            f"y_train: EWE needs >= 2 training samples of target class {target_class}, got {len(x_target)}"
        )

    n_batches = -(-len(x_train) // batch_size)
    if n_batches < ratio:
        raise ValueError(
            f"ratio: one watermark batch follows every {ratio} clean batches, but an epoch has only "
            f"{n_batches} batches of {batch_size}; lower ratio or batch_size"
        )

    rng = as_rng(seed)
    keras.utils.set_random_seed(_int_seed(rng))
    if layers is None:
        layers = [model.layers[-2].name]
    elif isinstance(layers, str):
        layers = [layers]
    outs = [model.get_layer(name).output for name in layers]
    feat_model = keras.Model(model.input, [*outs, model.outputs[0]])
    opt = keras.optimizers.Adam(learning_rate)
    half = batch_size // 2
    w_flag = tf.constant(np.r_[np.ones(half), np.zeros(half)].astype(np.int32))
    y_wm = tf.constant(np.full(2 * half, target_class, np.int64))
    kappa, temp = float(snnl_weight), float(temperature)

    def ce(y, logits):
        return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))

    @tf.function(reduce_retracing=True)
    def clean_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = ce(yb, model(xb, training=True))
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss

    @tf.function(reduce_retracing=True)
    def wm_step(xb):
        with tf.GradientTape() as tape:
            *feats, logits = feat_model(xb, training=True)
            s = tf.add_n([snnl(h, w_flag, temp, metric=metric) for h in feats])
            loss = ce(y_wm, logits) - kappa * s
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss, s

    def clean_epoch():
        perm = rng.permutation(len(x_train))
        for b in range(0, len(perm), batch_size):
            idx = perm[b : b + batch_size]
            yield clean_step(x_train[idx], y_train[idx])

    from tqdm.auto import tqdm

    bar = tqdm(total=pretrain_epochs + epochs, desc="ewe", leave=False, disable=not progress)
    for _ in range(pretrain_epochs):
        for _ in clean_epoch():
            pass
        bar.update(1)
    for _ in range(epochs):
        for i, _ in enumerate(clean_epoch(), 1):
            if i % ratio == 0:
                iw = rng.choice(len(x_wm), half, replace=len(x_wm) < half)
                it = rng.choice(len(x_target), half, replace=len(x_target) < half)
                _, s = wm_step(np.concatenate([x_wm[iw], x_target[it]]))
                bar.set_postfix(snnl=f"{float(s):.3f}")
        bar.update(1)
    bar.close()
    return model


def watermark_success(model, x_wm: np.ndarray, target_class: int) -> float:
    """Fraction of watermark (triggered) samples that ``model`` classifies as ``target_class``
    (Jia et al. 2021, "watermark success rate"; thesis 002 Tables 15-17)."""
    from ..core.models import predict_labels

    if len(x_wm) == 0:
        raise ValueError("x_wm: expected at least one watermark sample, got none")
    return float(np.mean(predict_labels(model, x_wm) == int(target_class)))


def ownership_test(
    model,
    x_wm: np.ndarray,
    target_class: int,
    num_classes: int,
    n_trials: int | None = None,
    base_rate: float | None = None,
) -> dict:
    """Watermark-based ownership claim: one-sided exact binomial test that ``model`` classifies
    triggered samples as ``target_class`` more often than ``base_rate``.

    ``base_rate`` defaults to chance, ``1 / num_classes``; a stricter null is the success rate of
    an independently trained, non-watermarked model on the same ``x_wm`` (pass it, in (0, 1)).
    Jia et al. 2021 compare watermark success rates with a t-test; with per-sample outcomes
    the exact binomial test is the direct equivalent. ``n_trials`` uses the
    first ``n_trials`` samples (default: all). Returns ``p_value``, ``successes``, ``n``,
    ``success_rate`` and ``base_rate``.
    """
    from ..core.models import predict_labels

    num_classes = check_positive_int(num_classes, "num_classes", minimum=2)
    if n_trials is not None:
        n_trials = check_positive_int(n_trials, "n_trials")
        if n_trials > len(x_wm):
            raise ValueError(
                f"n_trials: expected at most {len(x_wm)} (the watermark samples given), got {n_trials}"
            )
        x_wm = x_wm[:n_trials]
    if len(x_wm) == 0:
        raise ValueError("x_wm: expected at least one watermark sample, got none")
    p0 = 1.0 / num_classes if base_rate is None else check_real(base_rate, "base_rate", 0.0, 1.0, lo_open=True)
    if p0 >= 1.0:
        raise ValueError(f"base_rate: expected a value in (0, 1), got {p0}")
    k = int(np.sum(predict_labels(model, x_wm) == int(target_class)))
    res = stats.binomtest(k, len(x_wm), p0, alternative="greater")
    return {
        "p_value": float(res.pvalue),
        "successes": k,
        "n": len(x_wm),
        "success_rate": k / len(x_wm),
        "base_rate": p0,
    }

"""PRADA: query-stream detection with the Shapiro-Wilk test on minimum distances (Juuti et al.
2019, "PRADA: Protecting against DNN model stealing attacks", EuroS&P; thesis 002 §5.7.2)."""
from __future__ import annotations

import warnings

import numpy as np

from ..core._checks import check_labels, check_positive_int, check_real
from ..core.defense_seam import ACTIONS, Defense
from .base import DEFENSES, _check_feature_batch


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
        from scipy import stats  # imported here: ~1 s, and `stealnb --help` lists the defences
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

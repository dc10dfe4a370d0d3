"""Subset-selection strategies of the ActiveThief protocol (Pal et al. 2020; thesis 000 §2.3, §4.3).

Each registry entry is a class; ``REGISTRY[name](**options)`` builds a strategy whose
``select(substitute, pool, labelled_idx, k, rng, *, total_budget=None, progress=False)``
returns ``k`` distinct int64 pool indices, none of them in ``labelled_idx``, in selection
order, deterministically for a given ``rng`` state.

* ``random``, ``uncertainty``, ``kcenter``, ``dfal``, ``dfal+kcenter``: the five thesis
  strategies (thesis §4.3 items 1-5), following the official ActiveThief code
  (github.com/shukla-aditya-csa/activethief, ``sss/*.py`` and ``utils/model.py``).
* ``margin`` (Scheffer et al. 2001) and ``badge`` (Ash et al. 2020): beyond the thesis.

The substitute is only ever run on pool batches (``pool.batches``), so memory stays
O(N·C) for the N×C logits; the images are never materialised as float32 all at once.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from ..core._checks import as_rng, check_indices, check_positive_int
from ..core.metrics import log_softmax
from ..core.models import index_positions, predict_logits, softmax
from ..core.progress import progress_bar
from ..core.registry import Registry

REGISTRY = Registry("strategy")


class Strategy(Protocol):
    """What :class:`stealnb.extraction.loop.Extraction` calls once per round."""

    def select(self, substitute, pool, labelled_idx, k, rng, *, total_budget=None,
               progress=False) -> np.ndarray: ...


# -- helpers ---------------------------------------------------------------------------------

def _bar(total, desc, progress, unit="img"):
    return progress_bar(total=total, desc=desc, disable=not progress, unit=unit, leave=False)


def entropy(logits: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Shannon entropy (nats) of softmax(logits) per row, float64: -sum_j p_j log p_j (thesis eq. 2.3.1)."""
    out = np.empty(len(logits), np.float64)
    for s in range(0, len(logits), chunk):
        lp = log_softmax(logits[s:s + chunk])
        out[s:s + chunk] = -(np.exp(lp) * lp).sum(axis=1)
    return out


def margin(logits: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Top-1 minus top-2 softmax probability per row, float64 (Scheffer et al. 2001)."""
    if logits.shape[1] < 2:
        raise ValueError(f"margin needs at least 2 classes, got logits of shape {logits.shape}")
    out = np.empty(len(logits), np.float64)
    for s in range(0, len(logits), chunk):
        p = np.exp(log_softmax(logits[s:s + chunk]))
        top2 = np.partition(p, p.shape[1] - 2, axis=1)[:, -2:]
        out[s:s + chunk] = top2[:, 1] - top2[:, 0]
    return out


def _blas_threads(n: int):
    """Limit BLAS threads to ``n`` inside a ``with`` block (no-op without threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=n, user_api="blas")


def _smallest(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` smallest scores, ascending, ties broken by lower position."""
    return np.argsort(scores, kind="stable")[:k]


# -- K-center ----------------------------------------------------------------------------------

def kcenter_greedy(features: np.ndarray, centres_idx, k: int, chunk: int = 2048,
                   progress: bool = False) -> np.ndarray:
    """Greedy K-center (core-set) selection (Sener & Savarese 2018; Gonzalez 1985; thesis §4.3 item 3).

    Starting from the centres ``centres_idx`` (rows of ``features``), ``k`` times pick the row
    farthest (Euclidean) from its nearest centre and make it a centre. Returns the ``k`` picked
    row indices (int64) in selection order; ties go to the lowest index. With no centres, every
    distance is +inf and the first pick is row 0.

    Cost: O(N·L·d) for the initial distances (blocks of at most ``chunk`` rows × ``chunk``
    centres) plus O(N·d) per pick, with an O(N) min-distance vector updated in place; no N×N
    matrix. Squared distances come from one matrix-vector product on rows augmented to
    ``[x, |x|^2, 1]``: ``[x, |x|^2, 1]·[-2c, 1, |c|^2] = |x - c|^2``. In float32 this rounds
    squared distances by ~1e-7 absolute, so picks whose distances differ by less (relative
    ~1e-6) may come in another order than in an exact greedy; pass float64 features for that.
    Measured: 1M×10 float32, 1,000 centres, k=1,000 in ~3 s on one core (bench_kcenter.py).
    """
    if not isinstance(features, np.ndarray) or features.ndim != 2 or features.dtype not in (np.float32, np.float64):
        got = f"{type(features).__name__} {getattr(features, 'dtype', '')} {getattr(features, 'shape', '')}"
        raise TypeError(f"features: expected a 2-D float32 (or float64) numpy array (N, d), got {got}")
    n, d = features.shape
    if features.size and not np.isfinite(features).all():
        raise ValueError("features: contain NaN or inf; expected finite values")
    centres = check_indices(np.asarray(centres_idx) if isinstance(centres_idx, list) else centres_idx,
                         n, "centres_idx")
    k = check_positive_int(k, "k")
    chunk = check_positive_int(chunk, "chunk")
    free = n - len(centres)
    if k > free:
        raise ValueError(f"k={k} exceeds the {free} non-centre rows available")
    dt = features.dtype
    aug = np.empty((n, d + 2), dt)  # rows [x, |x|^2, 1]
    aug[:, :d] = features
    np.einsum("ij,ij->i", features, features, out=aug[:, d])
    aug[:, d + 1] = 1

    def query(rows):  # [-2c, 1, |c|^2] per centre row, as columns
        q = np.empty((d + 2, len(rows)), dt)
        q[:d] = -2 * features[rows].T
        q[d] = 1
        q[d + 1] = aug[rows, d]
        return q

    mind = np.full(n, np.inf, dt)
    for cs in range(0, len(centres), chunk):
        q = query(centres[cs:cs + chunk])
        for rs in range(0, n, chunk):
            block = aug[rs:rs + chunk] @ q
            np.minimum(mind[rs:rs + chunk], block.min(axis=1), out=mind[rs:rs + chunk])
    mind[centres] = -np.inf  # never re-pick a centre, even if rounding left it above 0
    picked = np.empty(k, np.int64)
    dist = np.empty(n, dt)
    qv = np.empty(d + 2, dt)
    # The per-pick matrix-vector product is memory-bound: a second BLAS thread does not speed it
    # up, and on shared cores its spin-waiting made picks 1.5-3x slower (benchmarks/bench_kcenter.py).
    with _bar(k, "k-center", progress, unit="pick") as bar, _blas_threads(1):
        for i in range(k):
            j = int(np.argmax(mind))
            picked[i] = j
            mind[j] = -np.inf
            bar.update(1)
            if i + 1 == k:
                break
            np.multiply(features[j], -2, out=qv[:d])
            qv[d] = 1
            qv[d + 1] = aug[j, d]
            np.dot(aug, qv, out=dist)
            np.minimum(mind, dist, out=mind)
    return picked


# -- BADGE seeding -----------------------------------------------------------------------------

def badge_seeding(a: np.ndarray, h: np.ndarray, k: int, rng) -> np.ndarray:
    """k-means++ seeding on gradient embeddings g_i = vec(h_i a_i^T) (Ash et al. 2020, BADGE).

    ``a`` (n, C): softmax minus one-hot of the predicted class; ``h`` (n, D): penultimate
    activations. The embeddings are never formed: <g_i, g_j> = (a_i·a_j)(h_i·h_j), so each
    step costs O(n(C + D)). As in the official BADGE code (github.com/JordanAsh/badge,
    ``init_centers``) the first pick is the largest-norm embedding (lowest index on ties) and
    each next pick is drawn with probability proportional to the squared distance to the
    nearest pick. If every remaining distance is 0, the lowest unpicked index is taken.
    """
    rng = as_rng(rng)
    for name, v in (("a", a), ("h", h)):
        if not isinstance(v, np.ndarray) or v.ndim != 2 or v.dtype not in (np.float32, np.float64):
            raise TypeError(f"{name}: expected a 2-D float32/float64 numpy array, got {type(v).__name__} "
                            f"{getattr(v, 'dtype', '')} {getattr(v, 'shape', '')}")
    n = len(a)
    if h.shape[0] != n:
        raise ValueError(f"badge_seeding: a and h must have the same rows, got {a.shape} and {h.shape}")
    k = check_positive_int(k, "k")
    if k > n:
        raise ValueError(f"k={k} exceeds the {n} candidates")
    # Norms in float64; the matrix-vector products stay in the inputs' dtype (memory O(n(C + D))).
    na = np.einsum("ij,ij->i", a, a, dtype=np.float64)
    nh = np.einsum("ij,ij->i", h, h, dtype=np.float64)
    norm2 = na * nh
    chosen = np.zeros(n, bool)
    picked = np.empty(k, np.int64)
    mind = np.full(n, np.inf)
    j = int(np.argmax(norm2))
    for i in range(k):
        picked[i] = j
        chosen[j] = True
        if i + 1 == k:
            break
        d2 = norm2 + norm2[j] - 2.0 * (a @ a[j]).astype(np.float64) * (h @ h[j])
        np.maximum(d2, 0.0, out=d2)
        np.minimum(mind, d2, out=mind)
        mind[chosen] = 0.0
        total = mind.sum()
        if total > 0 and np.isfinite(total):
            cdf = np.cumsum(mind)
            j = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
            j = min(j, n - 1)
            while chosen[j]:  # only reachable through floating-point edge cases
                j = (j + 1) % n
        else:
            j = int(np.flatnonzero(~chosen)[0])
    return picked


# -- strategies ---------------------------------------------------------------------------------

class _Base:
    """Validation shared by every strategy; subclasses implement ``_select``."""

    def select(self, substitute, pool, labelled_idx, k, rng, *, total_budget=None, progress=False):
        for attr in ("batches", "get", "__len__"):
            if not hasattr(pool, attr):
                raise TypeError(f"pool: expected a stealnb.core.data.Pool-like object with .{attr}, got {type(pool).__name__}")
        n = len(pool)
        labelled = check_indices(labelled_idx, n, "labelled_idx")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"k: expected an integer >= 1, got {k!r}")
        if k < 1:
            raise ValueError(f"k: expected an integer >= 1, got {k}")
        remaining = n - len(labelled)
        if k > remaining:
            raise ValueError(f"k={k} exceeds the {remaining} unlabelled pool samples that remain "
                             f"(pool of {n}, {len(labelled)} labelled)")
        if total_budget is not None:
            total_budget = check_positive_int(total_budget, "total_budget")
        rng = as_rng(rng)
        mask = np.ones(n, bool)
        mask[labelled] = False
        unlabelled = np.flatnonzero(mask).astype(np.int64)
        out = np.asarray(self._select(substitute, pool, labelled, unlabelled, int(k), rng,
                                      total_budget=total_budget, progress=progress), np.int64)
        if out.shape != (k,) or len(np.unique(out)) != k or not mask[out].all():
            raise RuntimeError(f"{type(self).__name__} returned an invalid selection")  # internal bug
        return out

    def __repr__(self):
        opts = ", ".join(f"{key}={val!r}" for key, val in vars(self).items())
        return f"{type(self).__name__}({opts})"


@REGISTRY.register("random")
class Random(_Base):
    """Random: k unlabelled samples uniformly without replacement (thesis §4.3 item 1; ActiveThief ``random_sss.py``)."""

    def _select(self, substitute, pool, labelled, unlabelled, k, rng, **_):
        return rng.choice(unlabelled, size=k, replace=False)


class _ScoreStrategy(_Base):
    """Score every unlabelled sample from the substitute's logits; keep the k best."""

    def __init__(self, batch_size: int = 1024):
        self.batch_size = check_positive_int(batch_size, "batch_size")

    def _select(self, substitute, pool, labelled, unlabelled, k, rng, progress=False, **_):
        logits = predict_logits(substitute, pool, unlabelled, self.batch_size, progress)
        return unlabelled[_smallest(self._key(logits), k)]


@REGISTRY.register("uncertainty")
class Uncertainty(_ScoreStrategy):
    """Uncertainty: the k highest-entropy softmax outputs of the substitute (thesis §4.3 item 2,
    eq. 2.3.1; Lewis & Gale 1994; ActiveThief ``uncertainty_sss.py``); ties -> lower pool index."""

    def _key(self, logits):
        return -entropy(logits)


@REGISTRY.register("margin")
class Margin(_ScoreStrategy):
    """Margin: the k smallest top-1 minus top-2 softmax margins (Scheffer et al. 2001, beyond
    the thesis); ties -> lower pool index."""

    def _key(self, logits):
        return margin(logits)


@REGISTRY.register("kcenter")
class KCenter(_Base):
    """K-center: greedy core-set on the substitute's softmax vectors, the labelled samples as
    initial centres (thesis §4.3 item 3; Sener & Savarese 2018; ActiveThief ``kcenter_sss.py``).

    ``labelled_idx`` as passed by the extraction loop includes the validation split, so those
    samples are centres too (ActiveThief uses the labelled training samples only).
    """

    def __init__(self, batch_size: int = 1024, chunk: int = 2048):
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.chunk = check_positive_int(chunk, "chunk")

    def _select(self, substitute, pool, labelled, unlabelled, k, rng, progress=False, **_):
        feats = softmax(predict_logits(substitute, pool, None, self.batch_size, progress), log_space=True)
        return kcenter_greedy(feats, labelled, k, chunk=self.chunk, progress=progress)


DFAL_MODES = ("converged-first", "activethief")


class _SoftmaxOutputs:
    """``model`` with softmax outputs instead of logits: what ActiveThief's DeepFool attacks."""

    def __init__(self, model):
        self.model, self.input_shape, self.output_shape = model, model.input_shape, model.output_shape

    def __call__(self, x, training=False):
        import tensorflow as tf

        return tf.nn.softmax(self.model(x, training=training))


class _DFALBase(_Base):
    def __init__(self, max_candidates: int | None = None, overshoot: float = 0.02, max_iter: int = 50,
                 num_candidates: int = 10, batch_size: int = 256, chunk: int = 2048, mode: str = "converged-first"):
        self.max_candidates = None if max_candidates is None else check_positive_int(max_candidates, "max_candidates")
        if mode not in DFAL_MODES:
            raise ValueError(f"mode: expected one of {', '.join(DFAL_MODES)}, got {mode!r}")
        self.mode = mode
        if not (isinstance(overshoot, (int, float)) and overshoot >= 0):
            raise ValueError(f"overshoot: expected a float >= 0, got {overshoot!r}")
        self.overshoot = float(overshoot)
        self.max_iter = check_positive_int(max_iter, "max_iter")
        self.num_candidates = check_positive_int(num_candidates, "num_candidates", minimum=2)
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.chunk = check_positive_int(chunk, "chunk")

    def _candidates(self, unlabelled, k, rng, at_least: int = 0):
        """All unlabelled samples, or (under ``max_candidates``) a random
        ``max(max_candidates, at_least)`` of them, drawn with ``rng``."""
        if self.max_candidates is None:
            return unlabelled
        n = max(self.max_candidates, at_least)
        if n >= len(unlabelled):
            return unlabelled
        if n < k:
            raise ValueError(f"max_candidates={self.max_candidates} is smaller than k={k}")
        return np.sort(rng.choice(unlabelled, size=n, replace=False))

    def _rank(self, substitute, pool, cand, progress):
        """Candidates sorted by (not converged, alpha = |x - x_adv|_2^2, pool index); in
        ``mode="activethief"`` by (alpha, pool index) of DeepFool on the softmax outputs."""
        from ..attacks.evasion import deepfool  # lazy: attacks.py imports cleverhans/TensorFlow

        if self.mode == "activethief":
            substitute = _SoftmaxOutputs(substitute)
        alpha = np.empty(len(cand), np.float64)
        conv = np.empty(len(cand), bool)
        where = index_positions(len(pool), cand)
        with _bar(len(cand), "DeepFool (DFAL)", progress) as bar:
            for chunk, x in pool.batches(batch_size=self.chunk, idx=cand):
                res = deepfool(substitute, x, overshoot=self.overshoot, max_iter=self.max_iter,
                               num_candidates=self.num_candidates, batch_size=self.batch_size,
                               progress=False)
                norms = np.asarray(res.norms, np.float64)
                converged = np.asarray(res.converged, bool)
                if norms.shape != (len(chunk),) or converged.shape != (len(chunk),):
                    raise ValueError(f"deepfool: expected norms and converged of shape ({len(chunk)},), "
                                     f"got {norms.shape} and {converged.shape}")
                if not np.isfinite(norms[converged]).all():
                    raise ValueError("deepfool: non-finite perturbation norm for a converged sample")
                pos = where[np.asarray(chunk)]
                alpha[pos] = norms ** 2
                conv[pos] = converged
                bar.update(len(chunk))
        if self.mode == "activethief":
            return cand[np.lexsort((cand, alpha))]
        # lexsort: last key is primary; NaN norms of non-converged samples sort last.
        return cand[np.lexsort((cand, alpha, ~conv))]


@REGISTRY.register("dfal")
class DFAL(_DFALBase):
    """DFAL: DeepFool on every unlabelled candidate, the k smallest alpha_n = |x_n - x^_n|_2^2
    (thesis §4.3 item 4; Ducoffe & Precioso 2018; Moosavi-Dezfooli et al. 2016; ActiveThief
    ``adversarial_sss.py``).

    ``mode="converged-first"`` (default): DeepFool on the logits, stopping per sample at the
    flip; samples where it did not converge within ``max_iter`` rank after converged ones.
    ``mode="activethief"``: as the reference code does it -- DeepFool on the softmax outputs for
    ``max_iter`` iterations (ActiveThief's ``deepfool(copy_model, epochs=20)``), every candidate
    ranked by alpha alone, converged or not.

    ``max_candidates``: score only a random subsample (drawn with ``rng``) of the unlabelled
    pool. ActiveThief scores the whole thief set; on a 1.28M pool that is ~1.28M DeepFool runs
    per round, so CPU profiles may cap it. Default None = the whole unlabelled pool.
    """

    def _select(self, substitute, pool, labelled, unlabelled, k, rng, progress=False, **_):
        cand = self._candidates(unlabelled, k, rng)
        return self._rank(substitute, pool, cand, progress)[:k]


@REGISTRY.register("dfal+kcenter")
class DFALKCenter(_DFALBase):
    """DFAL + K-center: DFAL keeps the smallest-perturbation candidates, as many as the total
    query budget, then greedy K-center on the substitute's softmax picks k of them with the
    labelled samples as centres (thesis §4.3 item 5; ActiveThief ``utils/model.py``, method
    ``adversarial-kcenter``, which keeps ``budget = seed + val + iterations·k`` candidates).

    Without ``total_budget`` the kept set has ``keep_multiple · k`` samples (default 10, about
    budget/k for ActiveThief's 10 rounds). ``max_candidates`` as for ``dfal``, but never below
    ``2 · keep_multiple · k``; when it subsamples, the kept set shrinks in proportion (budget x
    candidates / unlabelled, the fraction ActiveThief keeps) down to ``keep_multiple · k``: so
    under any cap DFAL's ranking filters and K-center chooses k out of ``keep_multiple · k``.
    ``mode`` as for ``dfal``.
    """

    def __init__(self, max_candidates: int | None = None, keep_multiple: int = 10, kcenter_chunk: int = 2048,
                 logits_batch_size: int = 1024, **deepfool_options):
        super().__init__(max_candidates=max_candidates, **deepfool_options)
        self.keep_multiple = check_positive_int(keep_multiple, "keep_multiple")
        self.kcenter_chunk = check_positive_int(kcenter_chunk, "kcenter_chunk")
        self.logits_batch_size = check_positive_int(logits_batch_size, "logits_batch_size")

    def _select(self, substitute, pool, labelled, unlabelled, k, rng, total_budget=None, progress=False, **_):
        keep = self.keep_multiple * k if total_budget is None else total_budget
        if keep < k:
            raise ValueError(f"total_budget={total_budget} is smaller than k={k}; DFAL must keep at least k candidates")
        # Under a cap, score at least 2 x keep_multiple x k candidates, so that DFAL's ranking
        # filters (it passes half or less) and K-center still chooses k out of keep_multiple x k.
        cand = self._candidates(unlabelled, k, rng, at_least=2 * self.keep_multiple * k)
        if len(cand) < len(unlabelled):
            # Scored a random subsample only: keep the fraction ActiveThief keeps of the whole
            # pool (budget / unlabelled), but never fewer than keep_multiple x k.
            keep = max(self.keep_multiple * k, int(np.ceil(keep * len(cand) / len(unlabelled))))
        kept = self._rank(substitute, pool, cand, progress)[:keep]
        both = np.concatenate([labelled, kept])
        feats = softmax(predict_logits(substitute, pool, both, self.logits_batch_size, progress),
                        log_space=True)
        centres = np.arange(len(labelled), dtype=np.int64)
        pick = kcenter_greedy(feats, centres, k, chunk=self.kcenter_chunk, progress=progress)
        return both[pick]


def _penultimate_model(model):
    import keras

    last = model.layers[-1] if isinstance(model, keras.Model) and model.layers else None
    if not isinstance(last, keras.layers.Dense) or getattr(last, "activation", None) not in (None, keras.activations.linear):
        got = type(model).__name__ if last is None else f"layer {last.name!r}"
        raise ValueError(f"badge: expected a Keras substitute whose last layer is a linear Dense (logits), got {got}")
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    return keras.Model(inputs, [last.input, model.outputs[0]])


@REGISTRY.register("badge")
class Badge(_Base):
    """BADGE: k-means++ seeding on last-layer gradient embeddings (p - onehot(argmax p)) ⊗ h,
    h = penultimate activations, hard pseudo-labels (Ash et al. 2020, beyond the thesis; official
    code github.com/JordanAsh/badge). Needs a Keras substitute ending in a linear Dense layer.
    ``max_candidates``: random subsample (with ``rng``) of the unlabelled pool; None = all.
    """

    def __init__(self, max_candidates: int | None = None, batch_size: int = 1024):
        self.max_candidates = None if max_candidates is None else check_positive_int(max_candidates, "max_candidates")
        self.batch_size = check_positive_int(batch_size, "batch_size")

    def _select(self, substitute, pool, labelled, unlabelled, k, rng, progress=False, **_):
        cand = unlabelled
        if self.max_candidates is not None and self.max_candidates < len(unlabelled):
            if self.max_candidates < k:
                raise ValueError(f"max_candidates={self.max_candidates} is smaller than k={k}")
            cand = np.sort(rng.choice(unlabelled, size=self.max_candidates, replace=False))
        emb = _penultimate_model(substitute)
        hs, logits = [], []
        where = index_positions(len(pool), cand)
        order = np.empty(len(cand), np.int64)
        filled = 0
        with _bar(len(cand), "BADGE embeddings", progress) as bar:
            for chunk, x in pool.batches(batch_size=self.batch_size, idx=cand):
                h, z = emb(x, training=False)
                hs.append(np.asarray(h, np.float32).reshape(len(chunk), -1))
                logits.append(np.asarray(z, np.float32))
                order[filled:filled + len(chunk)] = where[np.asarray(chunk)]
                filled += len(chunk)
                bar.update(len(chunk))
        h = np.empty((len(cand), hs[0].shape[1]), np.float32)
        z = np.empty((len(cand), logits[0].shape[1]), np.float32)
        h[order] = np.concatenate(hs)
        z[order] = np.concatenate(logits)
        if not (np.isfinite(h).all() and np.isfinite(z).all()):
            raise ValueError("substitute: produced NaN or inf activations")
        a = softmax(z, log_space=True)
        a[np.arange(len(a)), z.argmax(axis=1)] -= 1.0
        return cand[badge_seeding(a, h, k, rng)]

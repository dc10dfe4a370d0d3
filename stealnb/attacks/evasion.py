"""Adversarial attacks used by the extraction pipeline: FGSM and a batched DeepFool.

* :func:`fgsm` — Fast Gradient Sign Method (Goodfellow et al. 2015; thesis 000 §2.4 eq. 2.4.1),
  a thin batched wrapper around cleverhans 4's ``fast_gradient_method``; used to measure
  transferability (thesis 000 §5.2, eps = 0.25).
* :func:`deepfool` — DeepFool (Moosavi-Dezfooli et al. 2016, "DeepFool: a simple and accurate
  method to fool deep neural networks", CVPR; thesis 000 §2.4 eq. 2.4.2), the scoring step of
  DFAL (Ducoffe & Precioso 2018; thesis 000 §4.3). One compiled ``tf.function`` per model runs
  the whole iteration for a batch; finished samples are dropped from the working set, so every
  iteration only pays for the samples whose label has not flipped yet.
* :func:`transferability` — FGSM crafted on a substitute, measured on the secret.

JbDA, which trains substitutes between its query rounds, is in :mod:`stealnb.attacks.jbda`.

All functions take float32 images in [0, 1] (N×32×32×3 by default: the model's input shape)
and models that output **logits**.
"""
from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from ..core._checks import check_images, check_labels, check_positive_int, check_real
from ..core.metrics import transfer_metrics
from ..core.models import predict_labels, weak_logits
from ..core.progress import progress_bar

__all__ = ["fgsm", "deepfool", "DeepFoolResult", "transferability"]

# Per-model caches of compiled functions (weak keys: a dropped model drops its functions). Each
# compiles a functools.partial over the model's weak_logits, never a closure, so that TensorFlow's
# retracing detector counts every model's traces on their own (see stealnb.core.models.weak_logits).
_FGSM_FNS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_DEEPFOOL_FNS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

_JACOBIANS = ("batch_jacobian", "backward", "replicate")


def _input_shape(model) -> tuple:
    shape = tuple(model.input_shape[1:])
    if any(s is None for s in shape):
        raise ValueError(f"model: expected a fixed input shape (H, W, C), got {model.input_shape}")
    return shape


def _num_classes(model) -> int:
    n = model.output_shape[-1]
    if not isinstance(n, int) or n < 2 or len(model.output_shape) != 2:
        raise ValueError(f"model: expected logits of shape (N, num_classes >= 2), got {model.output_shape}")
    return n


# ----------------------------------------------------------------------------------------- FGSM


def _fgsm_batch(logits, x, eps, y, clip_min, clip_max):
    from cleverhans.tf2.attacks.fast_gradient_method import fast_gradient_method

    return fast_gradient_method(logits, x, eps, np.inf, clip_min=clip_min, clip_max=clip_max, y=y)


def _fgsm_fn(model):
    fn = _FGSM_FNS.get(model)
    if fn is None:
        fn = _FGSM_FNS[model] = tf.function(functools.partial(_fgsm_batch, weak_logits(model)),
                                            reduce_retracing=True)
    return fn


def fgsm(model, x, eps=0.25, *, y=None, batch_size=256, clip=(0.0, 1.0)) -> np.ndarray:
    """FGSM, L-inf (Goodfellow et al. 2015; thesis 000 §2.4 eq. 2.4.1, eps 0.25 in §5.2):
    ``x_adv = clip(x + eps · sign(∇_x CE(model(x), y)))``, batched, via cleverhans 4's
    ``cleverhans.tf2.attacks.fast_gradient_method.fast_gradient_method`` (norm=inf, softmax
    cross-entropy on the logits, ``clip_min``/``clip_max`` = ``clip``).

    ``y``: int labels (N,); None uses the model's own predictions (cleverhans' default, avoids
    label leaking). ``clip``: ``(lo, hi)`` range of the output, or None for no clipping (the
    output may then leave [0, 1]). Returns float32 images of ``x``'s shape.
    """
    check_images(x, "x", shape=_input_shape(model))
    nc = _num_classes(model)
    eps = check_real(eps, "eps", 0.0)
    batch_size = check_positive_int(batch_size, "batch_size")
    if y is not None:
        check_labels(y, "y", n=len(x), num_classes=nc)
    if clip is None:
        lo = hi = None
    else:
        if not isinstance(clip, (tuple, list)) or len(clip) != 2:
            raise TypeError(f"clip: expected None or a pair (lo, hi), got {clip!r}")
        lo, hi = (check_real(c, "clip") for c in clip)
        if not lo < hi:
            raise ValueError(f"clip: expected lo < hi, got {clip!r}")
        lo, hi = tf.constant(lo, tf.float32), tf.constant(hi, tf.float32)
    fn = _fgsm_fn(model)
    eps_t = tf.constant(eps, tf.float32)
    out = np.empty_like(x)
    for i in range(0, len(x), batch_size):
        yb = None if y is None else tf.constant(y[i : i + batch_size], tf.int64)
        out[i : i + batch_size] = fn(tf.constant(x[i : i + batch_size]), eps_t, yb, lo, hi).numpy()
    return out


# ------------------------------------------------------------------------------------- DeepFool


@dataclass
class DeepFoolResult:
    """Output of :func:`deepfool`."""

    x_adv: np.ndarray  #: float32 N×H×W×C, in [0, 1]
    norms: np.ndarray  #: float32 (N,): ||x_adv - x||_2 per sample (of the final, clipped image)
    converged: np.ndarray  #: bool (N,): the label of x_adv differs from the original prediction
    iterations: np.ndarray  #: int64 (N,): DeepFool steps taken (0 <= iterations <= max_iter)


def _candidate_gradients(logits_fn, xa, cand, jacobian):
    """Differences ``f_k - f_orig`` (A, c-1) of the candidate logits at ``xa`` and their input
    gradients (A, c-1, D). ``cand`` (A, c) holds the candidate classes, original label first."""
    ncand = cand.shape[1]
    if jacobian == "replicate":
        # One forward/backward on c-1 copies of each image: copy j carries candidate j+1's difference.
        a = tf.shape(xa)[0]
        xr = tf.repeat(xa, ncand - 1, axis=0)  # (A*(c-1), ...), copies of one image adjacent
        with tf.GradientTape() as tape:
            tape.watch(xr)
            f = tf.gather(logits_fn(xr), tf.repeat(cand, ncand - 1, axis=0), batch_dims=1)  # (A*(c-1), c)
            sel = tf.tile(tf.range(1, ncand), [a])[:, None]
            fd = tf.gather(f, sel, batch_dims=1)[:, 0] - f[:, 0]  # (A*(c-1),)
        g = tape.gradient(fd, xr)
        return tf.reshape(fd, (a, ncand - 1)), tf.reshape(g, (a, ncand - 1, -1))
    with tf.GradientTape(persistent=jacobian == "backward") as tape:
        tape.watch(xa)
        f = tf.gather(logits_fn(xa), cand, batch_dims=1)  # (A, c)
        fd = f[:, 1:] - f[:, :1]  # (A, c-1)
        cols = [fd[:, j] for j in range(ncand - 1)] if jacobian == "backward" else None
    a = tf.shape(xa)[0]
    if jacobian == "batch_jacobian":
        g = tape.batch_jacobian(fd, xa)  # (A, c-1, H, W, C)
        return fd, tf.reshape(g, (a, ncand - 1, -1))
    g = tf.stack([tf.reshape(tape.gradient(col, xa), (a, -1)) for col in cols], axis=1)
    del tape
    return fd, g


def _deepfool_batch(logits_fn, ncand: int, jacobian: str, x, overshoot, max_iter):
    """One DeepFool run on the batch ``x``: (x_adv, converged, iterations); see :func:`deepfool`."""
    n = tf.shape(x)[0]
    cand = tf.math.top_k(logits_fn(x), k=ncand).indices  # (N, c): original label first
    scale = 1.0 + overshoot

    def cond(i, r_tot, x_adv, active, flipped, iters):
        return tf.logical_and(i < max_iter, tf.reduce_any(active))

    def body(i, r_tot, x_adv, active, flipped, iters):
        idx = tf.where(active)  # (A, 1): only samples whose label has not flipped yet
        xa, ca = tf.gather_nd(x_adv, idx), tf.gather_nd(cand, idx)
        fd, w = _candidate_gradients(logits_fn, xa, ca, jacobian)  # (A, c-1), (A, c-1, D)
        wnorm = tf.norm(w, axis=2)
        dist = tf.abs(fd) / wnorm  # linearised distance to each candidate's boundary
        dist = tf.where(tf.math.is_finite(dist), dist, tf.constant(np.inf, dist.dtype))
        k = tf.argmin(dist, axis=1, output_type=tf.int32)
        dist_k = tf.gather(dist, k, batch_dims=1)
        movable = tf.math.is_finite(dist_k)  # False only if every candidate gradient is zero
        step = tf.where(movable, (dist_k + 1e-4) / tf.gather(wnorm, k, batch_dims=1), 0.0)
        r_i = tf.reshape(step[:, None] * tf.gather(w, k, batch_dims=1), tf.shape(xa))
        ra = tf.gather_nd(r_tot, idx) + r_i
        xa_new = tf.clip_by_value(tf.gather_nd(x, idx) + scale * ra, 0.0, 1.0)
        pred = tf.argmax(logits_fn(xa_new), axis=1, output_type=tf.int32)
        flip = pred != ca[:, 0]
        return (
            i + 1,
            tf.tensor_scatter_nd_update(r_tot, idx, ra),
            tf.tensor_scatter_nd_update(x_adv, idx, xa_new),
            tf.tensor_scatter_nd_update(active, idx, tf.logical_and(~flip, movable)),
            tf.tensor_scatter_nd_update(flipped, idx, flip),
            tf.tensor_scatter_nd_add(iters, idx, tf.ones_like(pred)),
        )

    init = (tf.constant(0), tf.zeros_like(x), x, tf.ones((n,), tf.bool), tf.zeros((n,), tf.bool),
            tf.zeros((n,), tf.int32))
    _, _, x_adv, _, flipped, iters = tf.while_loop(cond, body, init)
    return x_adv, flipped, iters


def _build_deepfool(model, ncand: int, jacobian: str = "batch_jacobian"):
    """Compile DeepFool for ``model`` with ``ncand`` candidate classes: a ``tf.function`` of
    (x, overshoot, max_iter) -> (x_adv, converged, iterations), traced once for any batch size."""
    if jacobian not in _JACOBIANS:
        raise ValueError(f"jacobian: expected one of {_JACOBIANS}, got {jacobian!r}")
    return tf.function(functools.partial(_deepfool_batch, weak_logits(model), ncand, jacobian), input_signature=[
        tf.TensorSpec((None, *_input_shape(model)), tf.float32),
        tf.TensorSpec((), tf.float32),
        tf.TensorSpec((), tf.int32),
    ])


def _deepfool_fn(model, ncand: int):
    fns = _DEEPFOOL_FNS.get(model)
    if fns is None:
        fns = _DEEPFOOL_FNS[model] = {}
    if ncand not in fns:
        fns[ncand] = _build_deepfool(model, ncand)
    return fns[ncand]


def deepfool(model, x, *, overshoot=0.02, max_iter=50, num_candidates=10, batch_size=256,
             progress=False) -> DeepFoolResult:
    """Untargeted L2 DeepFool (Moosavi-Dezfooli et al. 2016, Alg. 2; thesis 000 §2.4 eq. 2.4.2) on
    ``model``'s logits, as DFAL uses it (Ducoffe & Precioso 2018).

    Follows the authors' reference code (LTS4/DeepFool ``deepfool.py``): the candidate classes are
    the top-``num_candidates`` logits of the original prediction (clipped to the number of
    classes); at each step, for the closest linearised boundary ``k`` (smallest
    ``|f_k - f_orig| / ||w_k||``, ``w_k = ∇(f_k - f_orig)``) the step is
    ``r_i = (|f_k - f_orig| / ||w_k|| + 1e-4) · w_k / ||w_k||``, accumulated in ``r_tot``, and the
    next iterate is ``x_i = clip(x + (1 + overshoot) · r_tot, 0, 1)``: the overshoot is applied
    inside the loop and the label is checked on ``x_i`` itself, so ``converged`` samples are
    misclassified at exactly the returned ``x_adv``. (ART's ``DeepFool`` and cleverhans 3 instead
    iterate without overshoot or 1e-4, check the label there, and scale the total perturbation by
    ``1 + epsilon`` only at the end.) Each sample stops as soon as its label flips; a sample whose
    candidate gradients are all zero stops unconverged. Samples that never flip keep their last
    iterate, with ``converged`` False.

    ``batch_size`` images are attacked together in one compiled ``tf.function`` (traced once per
    model and ``num_candidates``, for any batch size: no padding of the last batch is needed).
    The c-1 candidate gradients come from c-1 reverse passes on one persistent tape, which was
    faster on CPU than ``tape.batch_jacobian`` (pfor) or one pass over c-1 copies of each image
    (``benchmarks/bench_deepfool.py``). Returns a :class:`DeepFoolResult`.
    """
    check_images(x, "x", shape=_input_shape(model))
    nc = _num_classes(model)
    overshoot = check_real(overshoot, "overshoot", 0.0)
    max_iter = check_positive_int(max_iter, "max_iter")
    num_candidates = check_positive_int(num_candidates, "num_candidates", minimum=2)
    batch_size = check_positive_int(batch_size, "batch_size")
    if not isinstance(progress, bool):
        raise TypeError(f"progress: expected a bool, got {progress!r}")
    fn = _deepfool_fn(model, min(num_candidates, nc))

    n = len(x)
    x_adv = np.empty_like(x)
    converged = np.zeros(n, bool)
    iterations = np.zeros(n, np.int64)
    ov, mi = tf.constant(overshoot, tf.float32), tf.constant(max_iter, tf.int32)
    starts = range(0, n, batch_size)
    if progress:
        starts = progress_bar(starts, desc="DeepFool", unit="batch")
    for i in starts:
        xa, flip, it = fn(tf.constant(x[i : i + batch_size]), ov, mi)
        x_adv[i : i + batch_size] = xa.numpy()
        converged[i : i + batch_size] = flip.numpy()
        iterations[i : i + batch_size] = it.numpy()
    norms = np.linalg.norm((x_adv - x).reshape(n, int(np.prod(x.shape[1:]))), axis=1).astype(np.float32)
    return DeepFoolResult(x_adv=x_adv, norms=norms, converged=converged, iterations=iterations)


# ------------------------------------------------------------------------------ transferability


def transferability(secret, substitute, x, y, eps: float = 0.25, batch_size: int = 256) -> dict:
    """Craft FGSM (eps, L-inf, true labels) on the substitute and measure it on the secret
    (thesis 000 §5.2): returns :func:`stealnb.core.metrics.transfer_metrics` plus ``eps``."""
    x_adv = fgsm(substitute, x, eps, y=y, batch_size=batch_size)
    out = transfer_metrics(y, predict_labels(substitute, x_adv), predict_labels(secret, x_adv))
    out["eps"] = float(eps)
    return out

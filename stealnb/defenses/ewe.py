"""EWE, Entangled Watermarks (Jia et al. 2021, "Entangled watermarks as a defense against model
extraction", USENIX Security; Frosst et al. 2019 for the SNNL; thesis 002 §5.7.3): the trigger,
the SNNL, watermarked training, watermark success and the ownership test."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..core._checks import as_rng, check_images, check_labels, check_positive_int, check_real
from ..core.progress import progress_bar
from .base import _images_any_shape


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

    bar = progress_bar(total=pretrain_epochs + epochs, desc="ewe", leave=False, disable=not progress)
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
    from scipy import stats  # imported here: ~1 s, and `stealnb --help` lists the defences
    res = stats.binomtest(k, len(x_wm), p0, alternative="greater")
    return {
        "p_value": float(res.pvalue),
        "successes": k,
        "n": len(x_wm),
        "success_rate": k / len(x_wm),
        "base_rate": p0,
    }

"""Adaptive Misinformation: mix in a misinformation model's output for out-of-distribution
queries (Kariyappa & Qureshi 2020, "Defending against model stealing attacks with Adaptive
Misinformation", CVPR; thesis 002 §5.7.1, "ADMIS")."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core._checks import check_images, check_labels, check_positive_int, check_real
from ..core.defense_seam import Defense
from .base import DEFENSES, check_probs


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
    from scipy import special  # imported here: ~1 s, and `stealnb --help` lists the defences
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

"""The Jacobian-based dataset augmentation attack (JbDA; Papernot et al. 2017, "Practical black-box
attacks against machine learning", AsiaCCS; thesis 002 eq. 3.4): a synthetic extraction attack
that trains a substitute between its query rounds -- the attack PRADA was designed against, and
its positive control in the defences chapter. (An attack loop, so above :mod:`stealnb.core.train`;
the pure attacks are in :mod:`stealnb.attacks.evasion`.)
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from ..core import models
from ..core._checks import check_images, check_positive_int, check_real
from ..core.train import fit

__all__ = ["jbda_queries"]


def jbda_queries(label_fn, x_seed: np.ndarray, substitute: str, *, rounds: int, lam: float = 0.1,
                 epochs: int = 10, batch_size: int = 64, learning_rate: float = 1e-3, seed: int = 0,
                 max_queries: int | None = None, num_classes: int | None = None):
    """Query stream of the Jacobian-based dataset augmentation attack (JbDA; Papernot et al. 2017,
    "Practical black-box attacks against machine learning", AsiaCCS; thesis 002 eq. 3.4) -- the
    synthetic attack PRADA was designed against, used as its positive control.

    ``S_0 = x_seed``; each round trains a fresh ``substitute`` (architecture name) on ``S`` with
    the oracle's labels, then queries ``x + lam * sign(grad_x F(x)[y])`` for every ``x`` in ``S``
    (``F``: the substitute's softmax, ``y``: the oracle's label of ``x``), kept in [0, 1] (an
    image must stay an image) and appended to ``S``. ``label_fn`` is the oracle (images -> int
    labels, e.g. ``Oracle.query``). Stops after ``rounds`` or ``max_queries`` (the last round is
    cut). Returns ``(x_queries, labels)`` in query order, seeds first.
    """
    check_images(x_seed, "x_seed")
    rounds = check_positive_int(rounds, "rounds")
    lam = check_real(lam, "lam", 0.0)
    if not 0.0 < lam <= 1.0:
        raise ValueError(f"lam: expected a step size in (0, 1] (images are in [0, 1]), got {lam}")
    if max_queries is not None:
        max_queries = check_positive_int(max_queries, "max_queries", minimum=len(x_seed))
    xs = [x_seed]
    ys = [np.asarray(label_fn(x_seed), np.int64)]
    k = int(num_classes or max(int(ys[0].max()) + 1, 2))
    for r in range(rounds):
        s_x, s_y = np.concatenate(xs), np.concatenate(ys)
        if max_queries is not None and len(s_x) >= max_queries:
            break
        sub = models.build(substitute, num_classes=k, seed=int(seed) * 1000 + r)
        fit(sub, s_x, s_y, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=int(seed) * 1000 + r)
        grads = []
        for i in range(0, len(s_x), 256):
            xb = tf.convert_to_tensor(s_x[i : i + 256])
            with tf.GradientTape() as tape:
                tape.watch(xb)
                p = tf.nn.softmax(sub(xb, training=False))
                picked = tf.gather(p, tf.convert_to_tensor(s_y[i : i + 256]), axis=1, batch_dims=1)
            grads.append(np.sign(tape.gradient(picked, xb).numpy()))
        new = np.clip(s_x + np.float32(lam) * np.concatenate(grads).astype(np.float32), 0.0, 1.0).astype(np.float32)
        if max_queries is not None:
            new = new[: max_queries - len(s_x)]
        xs.append(new)
        ys.append(np.asarray(label_fn(new), np.int64))
    return np.concatenate(xs), np.concatenate(ys)

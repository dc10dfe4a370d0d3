"""Does stealnb.attacks.evasion.deepfool agree with ART's DeepFool? (moved here from tests/test_attacks.py)

ART (adversarial-robustness-toolbox) is in the ``bench`` extra, not in ``dev``: as a test it was
always skipped. Here it runs with ``make bench`` (or ``pip install -e .[bench]`` and
``python benchmarks/bench_deepfool_vs_art.py``) and exits 1 when the results differ.

A cnn-tiny trained for 2 epochs on structured images (10 smooth colour prototypes + noise) is
attacked on 20 held-out images by both implementations with the same settings (max_iter 10,
overshoot 0.02 = ART's ``epsilon``, 10 candidate classes). Checked:

* ours converges within 10 iterations on every image, so ART's max_iter=10 is no handicap;
* both flip the same share of images;
* on images both flip, the norm ratio ours/ART is in [1/(1 + overshoot) - 0.01, 1] at the
  median and within (0.95, 1.01) everywhere: ART applies the overshoot only after its loop (and
  checks the label without it), so its norms are ~(1 + overshoot) times ours where the
  linearisation is good (see the deepfool docstring).

bench_deepfool.py measures the speed of both on larger inputs.
"""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

OVERSHOOT = 0.02


def structured(n, seed, noise=0.2):
    """10 smooth class prototypes (8x8 upsampled to 32x32) plus Gaussian noise: learnable, not trivial."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    protos = np.random.default_rng(1234).uniform(0.25, 0.75, (10, 8, 8, 3)).astype(np.float32)
    x = protos[y].repeat(4, axis=1).repeat(4, axis=2) + rng.normal(0, noise, (n, 32, 32, 3))
    return np.clip(x, 0, 1).astype(np.float32), y.astype(np.int64)


def main() -> int:
    import keras
    from art.attacks.evasion import DeepFool
    from art.estimators.classification import TensorFlowV2Classifier

    from stealnb.core import models
    from stealnb.attacks.evasion import deepfool

    model = models.build("cnn-tiny", seed=0)
    model.compile(optimizer=keras.optimizers.Adam(2e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = structured(768, seed=1)
    model.fit(x, y, epochs=2, batch_size=64, verbose=0)
    probe = structured(20, seed=2)[0]

    clf = TensorFlowV2Classifier(model, nb_classes=10, input_shape=(32, 32, 3), clip_values=(0.0, 1.0),
                                 loss_object=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x_art = DeepFool(clf, max_iter=10, epsilon=OVERSHOOT, nb_grads=10, batch_size=20, verbose=False).generate(probe)
    res = deepfool(model, probe)
    orig = models.predict_labels(model, probe)
    flip_art = models.predict_labels(model, x_art) != orig
    flip_ours = models.predict_labels(model, res.x_adv) != orig
    both = flip_art & flip_ours
    ratio = res.norms[both] / np.linalg.norm((x_art - probe).reshape(len(probe), -1), axis=1)[both]
    checks = {
        "ours converges within ART's max_iter=10": bool(res.iterations.max() < 10),
        "same flip rate": bool(flip_ours.mean() == flip_art.mean()),
        "median norm ratio in [1/(1+overshoot) - 0.01, 1]":
            bool(both.any() and 1 / (1 + OVERSHOOT) - 0.01 <= np.median(ratio) <= 1.0),
        "every norm ratio in (0.95, 1.01)": bool(both.any() and ((ratio > 0.95) & (ratio < 1.01)).all()),
    }
    out = {"benchmark": "deepfool_vs_art", "flip_rate_ours": float(flip_ours.mean()),
           "flip_rate_art": float(flip_art.mean()), "iterations_max": int(res.iterations.max()),
           "norm_ratio_median": float(np.median(ratio)) if both.any() else None,
           "norm_ratio_min": float(ratio.min()) if both.any() else None,
           "norm_ratio_max": float(ratio.max()) if both.any() else None, "checks": checks}
    print(json.dumps(out, indent=1))
    failed = [k for k, ok in checks.items() if not ok]
    if failed:
        print("DeepFool differs from ART: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

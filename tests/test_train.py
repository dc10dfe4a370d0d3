import json
from dataclasses import dataclass

import keras
import numpy as np
import pytest

from stealnb import train
from stealnb.profiles import PROFILES


@dataclass
class _DS:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list

    @property
    def num_classes(self):
        return len(self.class_names)


def _colour_dataset(n_train=240, n_test=60, seed=0):
    """3 classes told apart by which colour channel is bright: learnable in a few epochs."""
    rng = np.random.default_rng(seed)

    def make(n):
        y = rng.integers(0, 3, n).astype(np.int64)
        x = rng.random((n, 32, 32, 3), dtype=np.float32) * 0.3
        x[np.arange(n), :, :, y] += 0.6
        return x, y

    xt, yt = make(n_train)
    xs, ys = make(n_test)
    return _DS("colours", xt, yt, xs, ys, ["r", "g", "b"])


def test_paper_profile_is_the_thesis_protocol():
    p = PROFILES["paper"]
    assert (p.folds, p.epochs, p.batch_size, p.learning_rate) == (5, 20, 256, 1e-3)  # §4.2, §5.2
    assert p.budgets == (2_500, 5_000, 10_000) and p.fgsm_eps == 0.25  # §5.2
    assert p.substitute == "vgg16" and p.pool == "imagenet32"  # §4.1 step 4-5
    assert {a for _, a in p.secrets} == {"vgg16", "vgg19", "alexnet", "resnet50", "resnet101"}
    assert {d for d, _ in p.secrets} == {"mnist", "cifar10", "gtsrb"}
    assert set(p.strategies) == {"random", "uncertainty", "kcenter", "dfal", "dfal+kcenter"}


def test_train_secret_kfold_picks_best_fold_and_saves(tmp_path):
    ds = _colour_dataset()
    prof = PROFILES["ci"].with_(folds=3, epochs=3, batch_size=32)
    res = train.train_secret(ds, "cnn-tiny", prof, seed=0, progress=False)
    s = res.summary()
    assert s["folds"] == 3 and len(s["histories"]) == 3
    assert len(s["histories"][0]["loss"]) == 3 and "val_accuracy" in s["histories"][0]
    assert s["test_accuracy"] == max(s["fold_test_accuracy"])
    assert s["test_accuracy"] > 0.9  # the colour task is easy
    assert np.asarray(s["confusion_matrix"]).sum() == len(ds.y_test)
    out = res.save(tmp_path / "secret")
    reloaded = keras.models.load_model(out / "model.keras", compile=False)
    x = ds.x_test[:8]
    np.testing.assert_allclose(reloaded(x).numpy(), res.model(x).numpy(), rtol=1e-5, atol=1e-5)
    assert json.loads((out / "metrics.json").read_text())["test_accuracy"] == s["test_accuracy"]


def test_training_is_deterministic_for_a_seed():
    ds = _colour_dataset(n_train=96, n_test=30)
    prof = PROFILES["ci"].with_(folds=2, epochs=1, batch_size=32)
    a = train.train_secret(ds, "cnn-tiny", prof, seed=5, progress=False)
    b = train.train_secret(ds, "cnn-tiny", prof, seed=5, progress=False)
    assert a.fold_test_accuracy == b.fold_test_accuracy
    assert all(np.array_equal(u, v) for u, v in zip(a.model.get_weights(), b.model.get_weights()))


def test_fit_validates_inputs(tiny_model):
    x = np.zeros((4, 32, 32, 3), np.float32)
    with pytest.raises(ValueError, match="expected 4 labels"):
        train.fit(tiny_model, x, np.zeros(3, np.int64), epochs=1)
    with pytest.raises(ValueError, match="labels must be < 10"):
        train.fit(tiny_model, x, np.full(4, 12, np.int64), epochs=1)
    with pytest.raises(ValueError, match="validation"):
        train.fit(tiny_model, x, np.zeros(4, np.int64), epochs=1, patience=2)
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        train.fit(tiny_model, x + 2, np.zeros(4, np.int64), epochs=1)

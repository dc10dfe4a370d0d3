import json
from dataclasses import dataclass

import keras
import numpy as np
import pytest

from stealnb.core import train
from stealnb.core.profiles import PROFILES


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


def _two_class_linear():
    """Flatten -> Dense(2) on 32x32x3 images, weights set by hand."""
    inp = keras.Input((32, 32, 3))
    return keras.Model(inp, keras.layers.Dense(2, name="d")(keras.layers.Flatten()(inp)))


def test_f1_checkpoint_prefers_a_non_constant_model_over_a_lower_loss_constant_one():
    """A skewed validation split (7 dark images of class 0, 1 bright of class 1). Epoch 0's weights
    predict class 0 for everything with confidence (loss 0.38, macro-F1 0.47); epoch 1's separate
    the classes with small margins (loss 0.64, macro-F1 1.0). Selecting on loss restores the
    constant model; selecting on macro-F1 (ActiveThief) restores the one that learnt."""
    x = np.zeros((8, 32, 32, 3), np.float32)
    x[7] = 1.0
    y = np.array([0] * 7 + [1], np.int64)
    model = _two_class_linear()
    constant = [np.zeros((3072, 2), np.float32), np.array([2.0, 0.0], np.float32)]
    k = np.zeros((3072, 2), np.float32)
    k[:, 1] = 0.2 / 3072
    separating = [k, np.array([0.1, 0.0], np.float32)]
    for monitor, expect in (("loss", constant), ("macro_f1", separating)):
        cb = train._BestCheckpoint(model, x, y, 2, monitor, patience=None, min_epochs=0)
        cb.set_model(model)
        for epoch, weights in enumerate((constant, separating)):
            model.set_weights(weights)
            cb.on_epoch_end(epoch)
        cb.on_train_end()
        assert cb.val_loss[0] < cb.val_loss[1] and cb.val_f1[0] < cb.val_f1[1]
        for got, want in zip(model.get_weights(), expect):
            np.testing.assert_array_equal(got, want)
        assert cb.best_epoch == (0 if monitor == "loss" else 1)


def test_fit_trains_at_least_min_steps_and_stops_on_patience_after_them():
    ds = _colour_dataset(n_train=40, n_test=20)
    val = (ds.x_test, ds.y_test)
    m = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(3)])
    h = train.fit(m, ds.x_train, ds.y_train, epochs=2, batch_size=10, validation=val, patience=1,
                  monitor="macro_f1", min_steps=30, seed=0)
    assert h["steps"] >= 30 and len(h["loss"]) >= 30 // 4  # 4 steps per epoch, epochs raised to 8
    assert len(h["val_macro_f1"]) == len(h["loss"]) and 0 <= h["best_epoch"] < len(h["loss"])
    m2 = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(3)])
    noise = (ds.x_test, np.random.default_rng(0).integers(0, 3, len(ds.x_test)))  # nothing to gain on it
    h2 = train.fit(m2, ds.x_train, ds.y_train, epochs=50, batch_size=10, validation=noise, patience=1,
                   monitor="macro_f1", seed=0)
    assert len(h2["loss"]) < 50  # patience stops it; the restored epoch is the best on F1
    assert h2["val_macro_f1"][h2["best_epoch"]] == max(h2["val_macro_f1"])


def test_balanced_class_weight_equalises_the_classes():
    w = train.balanced_class_weight(np.array([0, 0, 0, 1], np.int64), 3)
    assert w == {0: pytest.approx(4 / 6), 1: pytest.approx(2.0), 2: 1.0}
    assert 3 * w[0] == pytest.approx(1 * w[1])  # each class carries the same total weight


def test_fit_refuses_patience_without_a_monitor():
    ds = _colour_dataset(n_train=8, n_test=4)
    m = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="needs a monitor"):
        train.fit(m, ds.x_train, ds.y_train, epochs=1, validation=(ds.x_test, ds.y_test), patience=2)


def _linear3():
    return keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(3)])


@pytest.mark.parametrize("monitor", ["loss", "macro_f1"])
def test_patience_stops_that_many_epochs_after_the_best_one_and_restores_its_weights(monitor):
    """Validation labels that have nothing to do with the images: the validation score peaks early,
    then the training goes on for exactly ``patience`` epochs without a new best and stops; the
    model ends with the best epoch's weights, so its validation score is that epoch's, not the last's."""
    from stealnb.core import metrics, models

    ds = _colour_dataset(n_train=40, n_test=30)
    noise = (ds.x_test, np.random.default_rng(1).integers(0, 3, len(ds.x_test)))
    m = _linear3()
    h = train.fit(m, ds.x_train, ds.y_train, epochs=60, batch_size=10, validation=noise, patience=3,
                  monitor=monitor, seed=0)
    best, n = h["best_epoch"], len(h["loss"])
    assert n < 60 and n == best + 3 + 1
    score = h["val_loss"] if monitor == "loss" else h["val_macro_f1"]
    assert score[best] == (min(score) if monitor == "loss" else max(score))
    logits = models.predict_logits(m, noise[0])
    assert metrics.cross_entropy(noise[1], logits) == pytest.approx(h["val_loss"][best], rel=1e-5)
    assert metrics.macro_f1(noise[1], logits.argmax(1), 3) == h["val_macro_f1"][best]
    assert h["val_loss"][-1] != pytest.approx(h["val_loss"][best], rel=1e-5)  # the last epoch's weights differ


def test_no_early_stop_while_the_training_loss_is_above_stop_loss():
    ds = _colour_dataset(n_train=40, n_test=30)
    noise = (ds.x_test, np.random.default_rng(1).integers(0, 3, len(ds.x_test)))
    kw = dict(epochs=12, batch_size=10, validation=noise, patience=1, monitor="loss", seed=0)
    stopped = train.fit(_linear3(), ds.x_train, ds.y_train, **kw)
    assert len(stopped["loss"]) < 12
    held = train.fit(_linear3(), ds.x_train, ds.y_train, stop_loss=0.0, **kw)  # a loss never reached
    assert len(held["loss"]) == 12 and held["val_loss"][held["best_epoch"]] == min(held["val_loss"])
    loose = train.fit(_linear3(), ds.x_train, ds.y_train, stop_loss=100.0, **kw)  # always reached
    assert len(loose["loss"]) == len(stopped["loss"])


def test_the_substitute_recipe_is_one_set_of_fit_arguments_shared_by_extraction_and_copycat():
    import inspect
    from dataclasses import asdict, fields

    from stealnb.core import profiles
    from stealnb.extraction.copycat import CopycatConfig
    from stealnb.extraction.loop import ExtractionConfig

    recipe = [f.name for f in fields(train.Recipe)]
    fit_kw = [n for n, p in inspect.signature(train.fit).parameters.items() if p.kind is p.KEYWORD_ONLY]
    assert set(recipe) <= set(fit_kw), set(recipe) - set(fit_kw)
    prof = profiles.get_profile("demo")
    ex = ExtractionConfig.from_profile(prof, "random")
    cc = CopycatConfig.from_profile(prof, "npdd")
    assert ex.fit_options() == cc.fit_options() == prof.substitute_fit() == cc.extraction_config().fit_options()
    # the keys written into checkpoints and summaries are the ones earlier runs wrote (resume compares them)
    assert set(asdict(ex)) == {"strategy", "substitute", "budgets", "seed_size", "val_size", "round_size", *recipe,
                               "warm_start", "fgsm_eps", "seed", "strategy_options"}
    with pytest.raises(ValueError, match=r"learning_rate: expected a value > 0.0, got 0.0"):
        ExtractionConfig.from_profile(prof, "random", learning_rate=0)
    with pytest.raises(ValueError, match=r"batch_size"):
        CopycatConfig.from_profile(prof, "npdd", batch_size=0)

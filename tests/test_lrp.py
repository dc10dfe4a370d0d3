"""Tests for stealnb.core.lrp: conservation, closed forms, BN folding, topology checks, correlation."""
import keras
import numpy as np
import pytest
from keras import layers

from stealnb.core import models
from stealnb.core.lrp import heatmap_correlation, layer_rules, lrp, unsupported

SHAPE = (8, 8, 3)


def _randomise(model, rng, bias_scale=0.1):
    """Overwrite every weight with seeded random values (He-scaled kernels, small biases)."""
    for layer in model.layers:
        ws = layer.get_weights()
        if not ws:
            continue
        new = []
        for w in ws:
            if w.ndim > 1:
                new.append(rng.normal(0, np.sqrt(2.0 / np.prod(w.shape[:-1])), w.shape))
            else:
                new.append(rng.normal(0, bias_scale, w.shape))
        layer.set_weights([w.astype("float32") for w in new])
    return model


def _cnn(rng, pool=layers.MaxPooling2D, bias_scale=0.1):
    inp = keras.Input(SHAPE)
    x = layers.Conv2D(6, 3, padding="same", activation="relu")(inp)
    x = pool(2)(x)
    x = layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(16, activation="relu")(x)
    x = layers.Dropout(0.5)(x)
    return _randomise(keras.Model(inp, layers.Dense(5)(x)), rng, bias_scale)


def _images(rng, n=6, shape=SHAPE):
    return rng.random((n, *shape), dtype=np.float32)


def _logits(model, x):
    return np.asarray(model(x, training=False), dtype=np.float64)


@pytest.mark.parametrize("pool", [layers.MaxPooling2D, layers.AveragePooling2D])
@pytest.mark.parametrize("rule", ["0", "gamma"])
def test_conservation_without_bias(rng, pool, rule):
    model, x = _cnn(rng, pool), _images(rng)
    target = np.array([0, 1, 2, 3, 4, 0], np.int64)  # not only the predicted class: some logits < 0
    r = lrp(model, x, target=target, rule=rule, bias=False)
    expected = _logits(model, x)[np.arange(len(x)), target]
    np.testing.assert_allclose(r.reshape(len(x), -1).sum(axis=1), expected, rtol=1e-3, atol=1e-5)


def test_bias_absorbs_relevance_when_kept(rng):
    model, x = _cnn(rng, bias_scale=1.0), _images(rng)
    target = np.zeros(len(x), np.int64)
    total = lrp(model, x, target=target, rule="0", bias=True).reshape(len(x), -1).sum(axis=1)
    expected = _logits(model, x)[:, 0]
    assert not np.allclose(total, expected, rtol=1e-2)


def test_conservation_on_project_model(tiny_model, rng):
    x = _images(rng, 4, (32, 32, 3))
    r = lrp(tiny_model, x, rule="0", bias=False)
    logits = _logits(tiny_model, x)
    np.testing.assert_allclose(r.reshape(4, -1).sum(axis=1), logits.max(axis=1), rtol=1e-3, atol=1e-6)


def _dense_model(rng, use_bias):
    inp = keras.Input(SHAPE)
    model = keras.Model(inp, layers.Dense(4, use_bias=use_bias)(layers.Flatten()(inp)))
    return _randomise(model, rng, bias_scale=1.0)


def test_dense_only_lrp0_is_x_times_w(rng):
    model = _dense_model(rng, use_bias=False)
    x, target = _images(rng, 5), np.array([0, 1, 2, 3, 1], np.int64)
    r = lrp(model, x, target=target, rule="0", keep_channels=True)
    w = model.layers[-1].get_weights()[0]  # (H*W*C, classes)
    expected = x * w[:, target].T.reshape(len(x), *SHAPE)
    np.testing.assert_allclose(r, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(lrp(model, x, target=target, rule="0"), expected.sum(axis=-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", ["0", "epsilon", "gamma", "composite"])
@pytest.mark.parametrize("bias", [True, False])
def test_dense_only_closed_forms(rng, rule, bias):
    """One linear layer: R_i = x_i w'_i / (stabilised z') * logit with the rule's w', z' (thesis Table 1)."""
    model = _dense_model(rng, use_bias=True)
    x, target = _images(rng, 5), np.array([3, 1, 2, 0, 1], np.int64)
    w, b = (v.astype(np.float64) for v in model.layers[-1].get_weights())
    w, b = w[:, target].T, b[target] * bias  # (N, H*W*C), (N,)
    xf = x.reshape(len(x), -1).astype(np.float64)
    logit = (xf * w).sum(1) + model.layers[-1].get_weights()[1][target]
    if rule == "gamma":
        w, b = w + 0.3 * np.maximum(w, 0), b + 0.3 * np.maximum(b, 0)
    contrib = xf * w if rule != "composite" else xf * w - np.minimum(w, 0)  # z^B with l=0, h=1
    z = contrib.sum(1) + (b if rule != "composite" else 0.0)
    z = z + (0.5 if rule == "epsilon" else 0.0) * np.where(z >= 0, 1, -1)
    expected = contrib / z[:, None] * logit[:, None]
    r = lrp(model, x, target=target, rule=rule, bias=bias, epsilon=0.5, gamma=0.3, keep_channels=True)
    np.testing.assert_allclose(r.reshape(len(x), -1), expected, rtol=2e-4, atol=1e-6)


def test_maxpool_winner_takes_all(rng):
    inp = keras.Input(SHAPE)
    model = keras.Model(inp, layers.Dense(3, use_bias=False)(layers.Flatten()(layers.MaxPooling2D(2)(inp))))
    _randomise(model, rng)
    x = _images(rng, 3)
    r = lrp(model, x, target=np.zeros(3, np.int64), rule="0", keep_channels=True)
    blocks = x.reshape(3, 4, 2, 4, 2, 3)
    winner = blocks == blocks.max(axis=(2, 4), keepdims=True)
    w = model.layers[-1].get_weights()[0][:, 0].reshape(4, 4, 3)
    expected = np.where(winner, blocks * w[None, :, None, :, None, :], 0.0).reshape(3, *SHAPE)
    np.testing.assert_allclose(r, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("rule", ["composite", "epsilon", "gamma", "0"])
def test_rules_shapes_finite_and_channel_sum(rng, rule):
    model, x = _cnn(rng), _images(rng)
    r = lrp(model, x, rule=rule)
    rc = lrp(model, x, rule=rule, keep_channels=True)
    assert r.shape == (len(x), 8, 8) and r.dtype == np.float32 and np.isfinite(r).all()
    assert rc.shape == (len(x), *SHAPE) and np.isfinite(rc).all()
    np.testing.assert_allclose(rc.sum(axis=-1), r, rtol=1e-5, atol=1e-6)
    assert np.abs(r).sum() > 0


def test_epsilon_absorbs_relevance(rng):
    model, x = _cnn(rng), _images(rng)
    logits = np.abs(_logits(model, x).max(axis=1))
    small = lrp(model, x, rule="epsilon", epsilon=0.01).reshape(len(x), -1).sum(axis=1)
    huge = lrp(model, x, rule="epsilon", epsilon=1e4).reshape(len(x), -1).sum(axis=1)
    assert np.isfinite(small).all() and np.isfinite(huge).all()
    assert np.all(np.abs(huge) < 1e-3 * logits)
    assert np.abs(small).mean() > np.abs(huge).mean()


def test_target_none_is_predicted_class_and_batching(rng):
    model, x = _cnn(rng), _images(rng, 7)
    pred = _logits(model, x).argmax(axis=1).astype(np.int64)
    a = lrp(model, x, rule="composite")
    np.testing.assert_allclose(a, lrp(model, x, target=pred, rule="composite", batch_size=3), rtol=1e-5, atol=1e-7)
    assert not np.allclose(a, lrp(model, x, target=(pred + 1) % 5, rule="composite"))


def test_sequential_model_and_int_target(rng):
    functional = _cnn(rng)
    seq = keras.Sequential([keras.Input(SHAPE)] + [layer for layer in functional.layers[1:]])
    x = _images(rng, 3)
    np.testing.assert_allclose(lrp(seq, x, target=2), lrp(functional, x, target=np.full(3, 2)), rtol=1e-6)


def test_composite_rule_assignment():
    assert layer_rules(models.build("cnn-small")) == [
        ("conv1a", "zB"), ("conv1b", "gamma"), ("conv2a", "epsilon"), ("conv2b", "epsilon"),
        ("fc1", "0"), ("logits", "0"),
    ]
    vgg = dict(layer_rules(models.build("vgg16")))
    assert vgg["block1_conv1"] == "zB" and vgg["block3_conv3"] == "gamma" and vgg["block4_conv1"] == "epsilon"
    assert vgg["fc1"] == "0" and set(dict(layer_rules(models.build("vgg16"), "gamma")).values()) == {"gamma"}


def _bn_model(rng):
    inp = keras.Input(SHAPE)
    x = layers.Conv2D(6, 3, padding="same")(inp)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(5)(x)
    model = keras.Model(inp, layers.BatchNormalization()(x))
    _randomise(model, rng)
    for bn in (model.layers[2], model.layers[-1]):  # gamma, beta, moving mean, moving variance
        n = bn.get_weights()[0].shape[0]
        bn.set_weights([rng.uniform(0.5, 2, n), rng.normal(0, 0.5, n), rng.normal(0, 0.5, n), rng.uniform(0.2, 3, n)])
    return model


def _fold(w, b, bn):
    g, beta, mean, var = bn.get_weights()
    s = g / np.sqrt(var + bn.epsilon)
    return [w * s, (b - mean) * s + beta]


def test_batchnorm_folding_matches_manual_fold(rng):
    model = _bn_model(rng)
    conv, bn1, dense, bn2 = model.layers[1], model.layers[2], model.layers[6], model.layers[7]
    inp = keras.Input(SHAPE)
    x = layers.Conv2D(6, 3, padding="same", activation="relu")(inp)
    x = layers.Flatten()(layers.MaxPooling2D(2)(x))
    folded = keras.Model(inp, layers.Dense(5)(x))
    folded.layers[1].set_weights(_fold(*conv.get_weights(), bn1))
    folded.layers[-1].set_weights(_fold(*dense.get_weights(), bn2))
    x = _images(rng)
    np.testing.assert_allclose(_logits(model, x), _logits(folded, x), rtol=1e-4, atol=1e-5)
    for rule in ("composite", "0"):
        np.testing.assert_allclose(lrp(model, x, rule=rule), lrp(folded, x, rule=rule), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("where", ["after_relu", "after_pool"])
def test_unfoldable_batchnorm_rejected(where):
    inp = keras.Input(SHAPE)
    x = layers.Conv2D(4, 3, activation="relu" if where == "after_relu" else None)(inp)
    if where == "after_pool":
        x = layers.MaxPooling2D(2)(x)
    x = layers.BatchNormalization(name="bad_bn")(x)
    model = keras.Model(inp, layers.Dense(3)(layers.Flatten()(x)))
    with pytest.raises(NotImplementedError, match="bad_bn.*cannot be folded"):
        lrp(model, np.zeros((1, *SHAPE), np.float32))
    assert "cannot be folded" in unsupported(model)  # the same checks, without copying the weights


def test_non_chain_model_rejected():
    inp = keras.Input(SHAPE)
    a = layers.Conv2D(3, 3, padding="same", name="c1")(inp)
    b = layers.Conv2D(3, 3, padding="same", name="c2")(a)
    x = layers.Add(name="skip_add")([a, b])
    model = keras.Model(inp, layers.Dense(3)(layers.Flatten()(x)))
    with pytest.raises(NotImplementedError, match="skip_add"):
        lrp(model, np.zeros((1, *SHAPE), np.float32))
    resnet = models.build("resnet50")
    with pytest.raises(NotImplementedError, match="'conv5_block3_add' .Add. takes 2 inputs"):
        lrp(resnet, np.zeros((1, 32, 32, 3), np.float32))
    # notebook 05 asks first, and gets the same reason instead of a crash
    assert "'conv5_block3_add' (Add) takes 2 inputs" in unsupported(resnet)
    assert "skip_add" in unsupported(model)


def test_a_layer_chain_is_supported():
    assert unsupported(models.build("vgg16")) is None


@pytest.mark.parametrize("bad", ["layer", "activation"])
def test_unsupported_layers_rejected(bad):
    inp = keras.Input(SHAPE)
    if bad == "layer":
        x = layers.GlobalAveragePooling2D(name="gap")(inp)
        out, match = layers.Dense(3)(x), "gap"
    else:
        out, match = layers.Dense(3, activation="softmax", name="probs")(layers.Flatten()(inp)), "softmax"
    with pytest.raises(NotImplementedError, match=match):
        lrp(keras.Model(inp, out), np.zeros((1, *SHAPE), np.float32))
    assert match in unsupported(keras.Model(inp, out))


def test_heatmap_correlation(rng):
    a, b = rng.normal(size=(4, 5, 5)), rng.normal(size=(4, 5, 5))
    np.testing.assert_allclose(heatmap_correlation(a, a), 1.0, rtol=1e-12)
    np.testing.assert_allclose(heatmap_correlation(a, -a), -1.0, rtol=1e-12)
    expected = [np.corrcoef(a[i].ravel(), b[i].ravel())[0, 1] for i in range(4)]
    np.testing.assert_allclose(heatmap_correlation(a, b), expected, rtol=1e-10)
    hand = heatmap_correlation(np.array([[1.0, 2.0, 3.0]]), np.array([[1.0, 3.0, 2.0]]))
    np.testing.assert_allclose(hand, [0.5])  # cov 0.5 / (var 1 * var 1)
    assert np.isnan(heatmap_correlation(np.ones((1, 3)), np.array([[1.0, 2.0, 3.0]])))[0]
    with pytest.raises(ValueError, match="same shape"):
        heatmap_correlation(a, b[:3])
    with pytest.raises(TypeError):
        heatmap_correlation(a.astype(int), b)
    with pytest.raises(ValueError, match="NaN"):
        heatmap_correlation(np.full((1, 3), np.nan), a[:1, 0, :3])


def test_input_validation(rng, tiny_model):
    model, x = _cnn(rng), _images(rng, 2)
    with pytest.raises(TypeError, match="float32"):
        lrp(model, (x * 255).astype(np.uint8))
    with pytest.raises(ValueError, match="shape"):
        lrp(tiny_model, x)
    with pytest.raises(ValueError, match="rule"):
        lrp(model, x, rule="alpha-beta")
    with pytest.raises(ValueError, match="labels must be < 5"):
        lrp(model, x, target=np.array([0, 5]))
    with pytest.raises(ValueError, match="expected 2 labels"):
        lrp(model, x, target=np.array([0]))
    for eps in (-1.0, 0.0, float("nan")):
        with pytest.raises(ValueError, match="epsilon"):
            lrp(model, x, epsilon=eps)
    with pytest.raises(ValueError, match="gamma"):
        lrp(model, x, gamma=-0.1)
    with pytest.raises(ValueError, match="batch_size"):
        lrp(model, x, batch_size=0)
    with pytest.raises(TypeError, match="bias"):
        lrp(model, x, bias=1)

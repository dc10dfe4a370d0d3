"""Model registry: every builder returns an uncompiled Keras model that outputs **logits**.

The five thesis architectures reproduce thesis Table 4's parameter counts exactly for
32x32x3 inputs and 10 classes (Schmidl 2021, §4, appendix B). Keras' ``applications``
backbones (no ImageNet weights, nothing is downloaded) are topped by the head the counts
imply: ``Flatten -> Dense(64, relu) -> Dense(num_classes)``. The CPU-sized models serve the
``ci`` and ``demo`` profiles.

Keras (and with it TensorFlow, ~10 s) is imported by the builders, not by this module: the
registry's names are the command line's ``--arch`` choices, needed before any model is.
"""
from __future__ import annotations

import functools
import sys
import weakref
from typing import TYPE_CHECKING

from .registry import Registry
from .progress import progress_bar

if TYPE_CHECKING:
    import keras

REGISTRY = Registry("model")


def _keras():
    """``(keras, keras.layers)``, imported on first use."""
    import keras

    return keras, keras.layers


def _head(x, num_classes: int, hidden: int = 64):
    _, layers = _keras()
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(hidden, activation="relu", name="fc1")(x)
    return layers.Dense(num_classes, name="logits")(x)


def _from_backbone(app, name, input_shape, num_classes):
    keras, _ = _keras()
    inp = keras.Input(shape=input_shape, name="image")
    base = app(include_top=False, weights=None, input_tensor=inp)
    return keras.Model(inp, _head(base.output, num_classes), name=name)


@REGISTRY.register("vgg16")
def vgg16(input_shape=(32, 32, 3), num_classes=10):
    """VGG16 (Simonyan & Zisserman 2014; thesis §2.2.1, Fig. 13 config D, Table 4: 14,748,170 params)."""
    keras, _ = _keras()
    return _from_backbone(keras.applications.VGG16, "vgg16", input_shape, num_classes)


@REGISTRY.register("vgg19")
def vgg19(input_shape=(32, 32, 3), num_classes=10):
    """VGG19 (Simonyan & Zisserman 2014; thesis §2.2.1, Fig. 13 config E, Table 4: 20,057,866 params)."""
    keras, _ = _keras()
    return _from_backbone(keras.applications.VGG19, "vgg19", input_shape, num_classes)


@REGISTRY.register("resnet50")
def resnet50(input_shape=(32, 32, 3), num_classes=10):
    """ResNet50 (He et al. 2016; thesis §2.2.2, Table 4: 23,719,498 total / 23,666,378 trainable)."""
    keras, _ = _keras()
    return _from_backbone(keras.applications.ResNet50, "resnet50", input_shape, num_classes)


@REGISTRY.register("resnet101")
def resnet101(input_shape=(32, 32, 3), num_classes=10):
    """ResNet101 (He et al. 2016; thesis §2.2.2, Table 4: 42,789,962 total / 42,684,618 trainable)."""
    keras, _ = _keras()
    return _from_backbone(keras.applications.ResNet101, "resnet101", input_shape, num_classes)


@REGISTRY.register("alexnet")
def alexnet(input_shape=(32, 32, 3), num_classes=10):
    """AlexNet with batch norm after every layer (Krizhevsky et al. 2012; thesis §2.2.1, Fig. 12,
    appendix B.1, Table 4: 25,730,506 total / 25,709,350 trainable).

    Kernel sizes 11/5/3/3/3 with 96/256/384/384/256 filters, dense 4096/4096/1000, each followed
    by BatchNormalization (the 21,156 non-trainable parameters of Table 4 are exactly these BN
    moving statistics). Strides/pools bring 32x32 down to 1x1x256 before the dense layers.
    """
    keras, layers = _keras()
    inp = keras.Input(shape=input_shape, name="image")
    x = inp
    convs = [(96, 11, 4, True), (256, 5, 1, True), (384, 3, 1, False), (384, 3, 1, False), (256, 3, 1, True)]
    for i, (filters, k, stride, pool) in enumerate(convs, 1):
        x = layers.Conv2D(filters, k, strides=stride, padding="same", name=f"conv{i}")(x)
        x = layers.BatchNormalization(name=f"bn{i}")(x)
        x = layers.Activation("relu")(x)
        if pool:
            x = layers.MaxPooling2D(2, padding="same", name=f"pool{i}")(x)
    x = layers.Flatten(name="flatten")(x)
    for i, units in enumerate((4096, 4096, 1000), 6):
        x = layers.Dense(units, name=f"fc{i}")(x)
        x = layers.BatchNormalization(name=f"bn{i}")(x)
        x = layers.Activation("relu")(x)
        x = layers.Dropout(0.5)(x)
    x = layers.Dense(num_classes, name="fc9")(x)
    out = layers.BatchNormalization(name="logits")(x)
    return keras.Model(inp, out, name="alexnet")


@REGISTRY.register("cnn-small")
def cnn_small(input_shape=(32, 32, 3), num_classes=10):
    """Small VGG-style CNN for 2-core CPU runs (demo profile): two conv3 blocks (32, 64 filters)
    and a 128-unit dense layer: the VGG pattern of thesis §2.2.1 at 591,274 parameters."""
    keras, layers = _keras()
    inp = keras.Input(shape=input_shape, name="image")
    x = inp
    for i, filters in enumerate((32, 64), 1):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{i}a")(x)
        x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{i}b")(x)
        x = layers.MaxPooling2D(2, name=f"pool{i}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(128, activation="relu", name="fc1")(x)
    x = layers.Dropout(0.3)(x)
    out = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inp, out, name="cnn_small")


@REGISTRY.register("cnn-small-bn")
def cnn_small_bn(input_shape=(32, 32, 3), num_classes=10):
    """cnn-small with BatchNormalization (Ioffe & Szegedy 2015) after every convolution and the
    dense layer: a candidate substitute for small, skewed labelled sets (stealnb's own variant,
    not a thesis architecture; ``benchmarks/`` measures whether it helps)."""
    keras, layers = _keras()
    inp = keras.Input(shape=input_shape, name="image")
    x = inp
    for i, filters in enumerate((32, 64), 1):
        for part in "ab":
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i}{part}")(x)
            x = layers.BatchNormalization(name=f"bn{i}{part}")(x)
            x = layers.ReLU(name=f"relu{i}{part}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{i}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(128, use_bias=False, name="fc1")(x)
    x = layers.BatchNormalization(name="bn_fc1")(x)
    x = layers.ReLU(name="relu_fc1")(x)
    x = layers.Dropout(0.3)(x)
    out = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inp, out, name="cnn_small_bn")


@REGISTRY.register("lenet5")
def lenet5(input_shape=(32, 32, 3), num_classes=10):
    """LeNet-5 (LeCun et al. 1998; thesis §2.2.1): conv5-6, pool, conv5-16, pool, 120-84 dense."""
    keras, layers = _keras()
    inp = keras.Input(shape=input_shape, name="image")
    x = layers.Conv2D(6, 5, activation="relu", name="conv1")(inp)
    x = layers.AveragePooling2D(2, name="pool1")(x)
    x = layers.Conv2D(16, 5, activation="relu", name="conv2")(x)
    x = layers.AveragePooling2D(2, name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(120, activation="relu", name="fc1")(x)
    x = layers.Dense(84, activation="relu", name="fc2")(x)
    out = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inp, out, name="lenet5")


@REGISTRY.register("cnn-tiny")
def cnn_tiny(input_shape=(32, 32, 3), num_classes=10):
    """Tiny CNN for tests and the ci profile (conv3-16, pool, conv3-32, pool, dense 64): a
    scaled-down instance of the VGG pattern (thesis §2.2.1) that trains in seconds."""
    keras, layers = _keras()
    inp = keras.Input(shape=input_shape, name="image")
    x = layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(inp)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(64, activation="relu", name="fc1")(x)
    out = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inp, out, name="cnn_tiny")


def build(name: str, input_shape=(32, 32, 3), num_classes: int = 10, seed: int | None = None) -> keras.Model:
    """Build registered model ``name``; ``seed`` makes the weight initialisation reproducible."""
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes: expected an integer >= 2, got {num_classes!r}")
    if len(tuple(input_shape)) != 3:
        raise ValueError(f"input_shape: expected (height, width, channels), got {input_shape!r}")
    builder = REGISTRY[name]
    if seed is not None:
        keras, _ = _keras()
        keras.utils.set_random_seed(int(seed))
    return builder(input_shape=tuple(input_shape), num_classes=num_classes)


def clone(model: keras.Model) -> keras.Model:
    """A copy of ``model``: the same architecture and weights, nothing shared (``clone_model``)."""
    keras, _ = _keras()
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def count_params(model: keras.Model) -> tuple[int, int]:
    """(total, trainable) parameter counts, as Keras' ``model.summary()`` reports them."""
    import numpy as np

    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    return int(model.count_params()), trainable


_FORWARD: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def forward(model):
    """``x -> model(x, training=False)`` for batched inference, compiled once per Keras model with
    ``tf.function`` over float32 batches of the model's input shape and any size: one trace per
    model, whatever the batch sizes. Its logits match the eager call's (bit for bit on this
    project's CPU build; the extraction results did not change) and it is about 1.5x faster on
    CPU over a 20k-image pool (5.1 s -> 3.4 s, cnn-small, 2 cores).
    Weights are read when called, so a model trained further after the first call is seen as it
    is now. Anything that is not a Keras model is returned unchanged."""
    keras = sys.modules.get("keras")  # no Keras loaded: ``model`` cannot be a Keras model
    if keras is None or not isinstance(model, keras.Model):
        return model
    f = _FORWARD.get(model)
    if f is None:
        import tensorflow as tf

        images = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)
        call = tf.function(weak_logits(model), input_signature=[images])

        def f(x, training=False):
            if training:
                raise ValueError("forward: inference only (training=False); call the model itself to train")
            return call(x)

        _FORWARD[model] = f
    return f


def weak_logits(model):
    """``x -> logits`` calling ``model`` in inference mode through a weak reference, so the compiled
    functions cached per model (here and in :mod:`stealnb.attacks.evasion`) do not keep the model alive.

    A :func:`functools.partial`, not a closure, so that each model's ``tf.function`` is told apart:
    TensorFlow's retracing detector keys a function by its Python code, which every closure of
    one ``def`` shares, and so counted each new model's first trace (a new substitute every
    extraction round) as a retrace of one function ("5 out of the last 7 calls to
    <function weak_logits.<locals>.logits> triggered tf.function retracing")."""
    return functools.partial(_logits, weakref.ref(model))


def _logits(ref, x):
    return ref()(x, training=False)


def softmax(logits, dtype="float32", *, log_space: bool = False, chunk: int = 65536):
    """Row-wise softmax of ``N x C`` logits, max-shifted and computed in float64 (``chunk`` rows at a
    time, so a whole pool's logits need no N x C float64 copy), returned as ``dtype`` (float32 by
    default: what an oracle answers; ``"float64"`` for further arithmetic).

    ``log_space=False``: ``exp(z) / sum(exp(z))`` -- what the oracles and the server answer and the
    defences use. ``log_space=True``: ``exp(log_softmax(z))`` (:func:`stealnb.core.metrics.log_softmax`)
    -- what the selectors rank by (K-center, DFAL+K-center, BADGE), consistent with their entropy
    and margin. The two agree to an ulp of float64 and can differ in the last bit of float32, so
    each caller keeps the one its results were computed with."""
    import numpy as np

    from .metrics import log_softmax

    z = np.asarray(logits)
    if z.ndim != 2:
        raise ValueError(f"logits: expected an N x C array, got shape {z.shape}")
    out = np.empty(z.shape, dtype)
    for s in range(0, len(z), chunk):
        zs = np.asarray(z[s:s + chunk], np.float64)
        if log_space:
            out[s:s + chunk] = np.exp(log_softmax(zs))
        else:
            e = np.exp(zs - zs.max(axis=1, keepdims=True))
            out[s:s + chunk] = e / e.sum(axis=1, keepdims=True)
    return out


def load_model(path):
    """The Keras model saved at ``path``: a ``.keras`` file or a secret folder holding ``model.keras``."""
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        p = p / "model.keras"
    if not p.is_file():
        raise FileNotFoundError(f"model: expected a .keras file or a secret folder with model.keras, {p} does not exist")
    return _keras()[0].models.load_model(p, compile=False)


def saved_num_classes(path) -> int | None:
    """The number of classes (units of the output layer) of the model saved at ``path`` (a ``.keras``
    file or a secret folder holding ``model.keras``), read from the archive's ``config.json``
    without TensorFlow, so that settings which depend on it are checked before the model loads;
    ``None`` when the file or its config cannot tell."""
    import json
    import zipfile
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        p = p / "model.keras"
    try:
        with zipfile.ZipFile(p) as z:
            cfg = json.loads(z.read("config.json"))["config"]
        layers = {layer["config"]["name"]: layer for layer in cfg["layers"]}
        out = cfg.get("output_layers")
        if out is None:  # Sequential: the last layer
            last = cfg["layers"][-1]
        else:
            last = layers[(out[0] if isinstance(out[0], list) else out)[0]]
        units = last["config"]["units"]
    except (OSError, ValueError, KeyError, IndexError, TypeError, zipfile.BadZipFile):
        return None
    return units if isinstance(units, int) and units >= 2 else None


def index_positions(size: int, idx):
    """Lookup table index -> position in ``idx`` (-1 elsewhere), so batches may come in any order."""
    import numpy as np

    where = np.full(size, -1, np.int64)
    where[idx] = np.arange(len(idx), dtype=np.int64)
    return where


def predict_logits(model, x, idx=None, batch_size: int = 512, progress: bool = False):
    """float32 logits ``(len(idx), C)`` of ``model`` through :func:`forward`, row i for image
    ``idx[i]`` (every image, in order, if ``idx`` is None), ``batch_size`` images at a time.

    ``x`` is an N x 32 x 32 x 3 float32 array in [0, 1] (checked against the model's input shape)
    or a pool: anything with ``len()`` and ``batches(batch_size=, idx=)`` yielding ``(indices,
    float32 images)`` chunks in any order (:meth:`stealnb.core.data.Pool.batches`), so that only one
    batch is float32 at a time. ``idx``: unique indices into ``x``
    (:func:`stealnb.core._checks.check_indices`). Logits of the wrong shape or with NaN or inf raise
    ``ValueError``; ``progress`` shows a tqdm bar."""
    import numpy as np

    from ._checks import check_images, check_indices, check_positive_int

    batch_size = check_positive_int(batch_size, "batch_size")
    is_pool = hasattr(x, "batches")
    if not is_pool:
        check_images(x, "x", shape=tuple(model.input_shape[1:]))
    n = len(x)
    whole = idx is None
    idx = np.arange(n, dtype=np.int64) if whole else check_indices(idx, n, "idx")
    if is_pool:
        batches = x.batches(batch_size=batch_size, idx=None if whole else idx)
    else:
        batches = ((idx[s:s + batch_size], x[s:s + batch_size] if whole else x[idx[s:s + batch_size]])
                   for s in range(0, len(idx), batch_size))
    out, filled = None, 0
    where = index_positions(n, idx)
    f = forward(model)
    with progress_bar(total=len(idx), desc="logits", disable=not progress, unit="img", leave=False) as bar:
        for chunk, xb in batches:
            z = np.asarray(f(xb, training=False))
            if z.ndim != 2 or len(z) != len(chunk):
                raise ValueError(f"model: expected logits of shape ({len(chunk)}, C), got {z.shape}")
            if not np.isfinite(z).all():
                raise ValueError("model: produced NaN or inf logits")
            if out is None:
                out = np.empty((len(idx), z.shape[1]), np.float32)
            out[where[np.asarray(chunk)]] = z
            filled += len(chunk)
            bar.update(len(chunk))
    if out is None:
        return np.zeros((0, int(model.output_shape[-1])), np.float32)
    if filled != len(idx):
        raise RuntimeError(f"{type(x).__name__}.batches yielded {filled} samples, expected {len(idx)}")
    return out


def predict_labels(model, x, batch_size: int = 512):
    """Top-1 labels (int64) of ``model`` on ``x``."""
    return predict_logits(model, x, batch_size=batch_size).argmax(axis=1).astype("int64")

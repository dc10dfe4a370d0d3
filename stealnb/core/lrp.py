"""Layer-wise Relevance Propagation (LRP) heatmaps for chain-topology Keras classifiers.

Used for the Copycat attention-region analysis (thesis 002, §2.2 "LRP" and Table 1; §5.6.6
compares oracle and copycat heatmaps image by image with the Pearson correlation). Rules follow
Bach et al. 2015 and Montavon et al. 2019 ("Layer-wise relevance propagation: an overview"):

* LRP-0      ``R_j = sum_k a_j w_jk / (sum_j a_j w_jk) R_k``            (thesis eq. 2.11)
* LRP-eps    same with ``eps * sign(z)`` added to the denominator         (eq. 2.12)
* LRP-gamma  weights and biases replaced by ``w + gamma * max(0, w)``     (eq. 2.13, "LRP-λ")
* z^B        first layer on pixels in a box ``[l, h] = [0, 1]``           (Table 1, zB-rule)

Each rule is computed with the "gradient trick" (Montavon et al. 2019, "implementing LRP efficiently"):
``z = rho(layer)(a) + stabiliser; s = R / z; c = grad(sum(z * s)); R_prev = a * c``.
"""
from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf
from keras import layers as L

from ._checks import check_images, check_labels, check_positive_int, check_real
from .progress import progress_bar

RULES = ("0", "epsilon", "gamma", "composite")
_TINY = 1e-9  # zero-division stabiliser of LRP-0, LRP-gamma, z^B and pooling (Montavon et al. 2019)


def _chain(model):
    """The layers the model applies, input to output, if they form one chain, else NotImplementedError.

    Walks this model's graph backwards from its output through each call's node, so layers shared
    with other models are fine; any call with several inputs (Add, Concatenate: ResNets) is not.
    """
    if not isinstance(model, keras.Model) or not getattr(model, "inputs", None):
        raise NotImplementedError(f"lrp: expected a functional/Sequential keras.Model, got {type(model).__name__}")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise NotImplementedError("lrp: only single-input, single-output models are supported")
    chain, t = [], model.outputs[0]
    while not isinstance(t._keras_history.operation, L.InputLayer):
        op, node_index, _ = t._keras_history
        inputs = op._inbound_nodes[node_index].input_tensors
        if len(inputs) != 1:
            raise NotImplementedError(
                f"lrp: layer {op.name!r} ({type(op).__name__}) takes {len(inputs)} inputs: only sequential "
                "(chain) topologies are supported, not ResNet-like graphs with merges/skip connections"
            )
        chain.append(op)
        t = inputs[0]
    if t is not model.inputs[0] or not chain:
        raise NotImplementedError("lrp: the model output is not a layer chain starting at the model input")
    return chain[::-1]


def _activation_name(layer) -> str:
    name = getattr(getattr(layer, "activation", None), "__name__", "linear")
    if name not in ("relu", "linear"):
        raise NotImplementedError(f"lrp: layer {layer.name!r} has activation {name!r}; only relu/linear are supported")
    return name


def _steps(model, weights: bool = True):
    """Translate the chain into propagation steps ``(kind, layer, params)``; BN folded into Dense/Conv2D.
    ``weights=False`` makes the same checks without copying a weight (:func:`unsupported`)."""
    steps = []
    for layer in _chain(model):
        if type(layer) in (L.Dense, L.Conv2D):  # exact types: subclasses may compute something else
            if isinstance(layer, L.Conv2D) and (layer.data_format != "channels_last" or layer.groups != 1):
                raise NotImplementedError(f"lrp: Conv2D {layer.name!r} must be channels_last with groups=1")
            steps.append(["linear", layer, {"act": _activation_name(layer)}])
            if weights:
                w = np.asarray(layer.kernel, np.float32)
                b = np.asarray(layer.bias, np.float32) if layer.use_bias else np.zeros(w.shape[-1], np.float32)
                steps[-1][2].update(w=w, b=b)
        elif isinstance(layer, L.BatchNormalization):
            prev = steps[-1] if steps else None
            axis = layer.axis if isinstance(layer.axis, int) else -1
            foldable = prev is not None and prev[0] == "linear" and prev[2]["act"] == "linear"
            if not foldable or axis not in (-1, len(layer.input.shape) - 1):
                raise NotImplementedError(
                    f"lrp: BatchNormalization {layer.name!r} cannot be folded: it must directly follow a "
                    "Dense/Conv2D layer without activation and normalise the last (channel) axis"
                )
            if not weights:
                continue
            var, mean = np.asarray(layer.moving_variance, np.float64), np.asarray(layer.moving_mean, np.float64)
            g = np.asarray(layer.gamma, np.float64) if layer.scale else np.ones_like(var)
            beta = np.asarray(layer.beta, np.float64) if layer.center else np.zeros_like(var)
            scale = g / np.sqrt(var + layer.epsilon)
            p = prev[2]
            p["w"] = (p["w"] * scale).astype(np.float32)
            p["b"] = ((p["b"] - mean) * scale + beta).astype(np.float32)
        elif isinstance(layer, (L.Activation, L.ReLU)):
            if isinstance(layer, L.ReLU) and (layer.max_value is not None or layer.negative_slope or layer.threshold):
                raise NotImplementedError(f"lrp: ReLU {layer.name!r} must be a plain max(0, x)")
            act = "relu" if isinstance(layer, L.ReLU) else _activation_name(layer)
            steps.append(["act", layer, {"act": act}])
        elif isinstance(layer, (L.MaxPooling2D, L.AveragePooling2D, L.Flatten, L.Dropout)):
            steps.append([type(layer).__name__, layer, {}])
        else:
            raise NotImplementedError(
                f"lrp: layer {layer.name!r} of type {type(layer).__name__} is not supported (supported: Dense, "
                "Conv2D, BatchNormalization after them, Activation/ReLU, Max/AveragePooling2D, Flatten, Dropout)"
            )
    return steps


def unsupported(model) -> str | None:
    """Why :func:`lrp` cannot explain ``model`` (the message it would raise), or ``None`` when it can.
    The paper grid's ResNet50/ResNet101 secrets are not layer chains (their skip connections
    merge with Add), so notebook 05 asks this before drawing their heatmaps."""
    try:
        _steps(model, weights=False)
    except NotImplementedError as e:
        return str(e)
    return None


def layer_rules(model, rule: str = "composite") -> list[tuple[str, str]]:
    """``(layer name, rule)`` for every Dense/Conv2D layer of ``model`` (see :func:`lrp`)."""
    if rule not in RULES:
        raise ValueError(f"rule: expected one of {RULES}, got {rule!r}")
    return _rules(_steps(model), rule)


def _rules(steps, rule):
    linear = [s[1] for s in steps if s[0] == "linear"]
    if rule != "composite":
        return [(layer.name, rule) for layer in linear]
    convs = [layer for layer in linear if type(layer).__name__ == "Conv2D"]
    lower = {id(c) for c in convs[: math.ceil(len(convs) / 2)]}
    upper = {id(c) for c in convs} - lower
    out = []
    for i, layer in enumerate(linear):
        r = "zB" if i == 0 else "gamma" if id(layer) in lower else "epsilon" if id(layer) in upper else "0"
        out.append((layer.name, r))
    return out


def _linear(layer, a, w, b):
    if type(layer).__name__ == "Dense":
        return tf.tensordot(a, w, 1) + b
    return tf.nn.conv2d(a, w, layer.strides, layer.padding.upper(), dilations=layer.dilation_rate) + b


def _stab(z, eps):
    return z + eps * tf.where(z >= 0, 1.0, -1.0)


def _propagate(steps, rules, x, target, epsilon, gamma, bias):
    acts = [x]  # acts[i] is the input of step i
    for kind, layer, p in steps:
        a = acts[-1]
        if kind == "linear":
            out = _linear(layer, a, p["w"], p["b"])
            out = tf.nn.relu(out) if p["act"] == "relu" else out
        elif kind == "act":
            out = tf.nn.relu(a) if p["act"] == "relu" else a
        elif kind == "Dropout":
            out = a
        else:
            out = layer(a)
        acts.append(out)
    logits = acts[-1]
    target = tf.argmax(logits, axis=-1) if target is None else target
    R = tf.one_hot(target, logits.shape[-1], dtype=logits.dtype) * logits
    for (kind, layer, p), a, r in zip(reversed(steps), reversed(acts[:-1]), reversed(rules)):
        if kind in ("Flatten", "Dropout", "act"):
            R = tf.reshape(R, tf.shape(a))  # identity for Dropout/ReLU; relevance passes through
            continue
        with tf.GradientTape() as tape:
            tape.watch(a)
            if kind != "linear":  # pooling: max routes to the winner, average proportionally
                z = _stab(layer(a), _TINY)
            else:
                w, b = p["w"], (p["b"] if bias else np.zeros_like(p["b"]))
                if r == "gamma":
                    w, b = w + gamma * np.maximum(w, 0), b + gamma * np.maximum(b, 0)
                if r == "zB":  # z^B, l = 0, h = 1; the bias cancels between the three terms
                    lo, hi = tf.zeros_like(a), tf.ones_like(a)
                    tape.watch([lo, hi])
                    z = _linear(layer, a, w, 0.0) - _linear(layer, lo, np.maximum(w, 0), 0.0)
                    z = _stab(z - _linear(layer, hi, np.minimum(w, 0), 0.0), _TINY)
                else:
                    z = _stab(_linear(layer, a, w, b), epsilon if r == "epsilon" else _TINY)
            zs = tf.reduce_sum(z * tf.stop_gradient(R / z))
        if r == "zB":
            c, c_lo, c_hi = tape.gradient(zs, [a, lo, hi])
            R = a * c + lo * c_lo + hi * c_hi
        else:
            R = a * tape.gradient(zs, a)
    return R.numpy()


def lrp(model, x, *, target=None, rule="composite", epsilon=0.25, gamma=0.25, bias=True,
        batch_size=64, keep_channels=False, progress=False) -> np.ndarray:
    """LRP relevance heatmaps, float32 ``N×H×W`` (summed over channels) or ``N×H×W×C`` with
    ``keep_channels=True`` (thesis 002 §2.2, Table 1; Montavon et al. 2019).

    ``model`` is a chain-topology Keras model outputting logits (cnn-tiny, cnn-small, lenet5,
    vgg16/19, alexnet; ResNets raise ``NotImplementedError``). BatchNormalization is folded into
    the preceding Dense/Conv2D (``w * g/sqrt(var+eps)``, ``(b - mean) * g/sqrt(var+eps) + beta``).
    ``x`` is float32 ``N×H×W×C`` in [0, 1] (the model's input shape). The relevance that starts
    propagating is the logit of ``target``: ``None`` (predicted class), an int (same class for
    every image) or an int array ``(N,)``.

    ``rule`` = ``"0"``, ``"epsilon"`` or ``"gamma"`` applies that rule to every Dense/Conv2D layer.
    ``"composite"`` (Table 1 "usage"): the first Dense/Conv2D layer (on pixels) gets z^B with
    ``l=0, h=1``; of the K Conv2D layers the lower ``ceil(K/2)`` get LRP-gamma and the upper ones
    LRP-epsilon; all Dense layers get LRP-0. For VGG16 this is exactly Montavon et al.'s choice
    (z^B conv1_1, gamma to conv3_3, epsilon conv4_1-conv5_3, LRP-0 fc); see :func:`layer_rules`.
    ``epsilon`` is absolute (``z + eps*sign(z)``, thesis eq. 2.12), so it absorbs more relevance
    when logits/pre-activations are small (untrained nets). Pooling: max-pooling sends relevance to the
    winner, average-pooling redistributes proportionally; ReLU, Dropout and Flatten pass it on.
    ``bias=False`` drops biases from the propagation (not from the forward pass): LRP-0 then
    conserves relevance exactly, the input relevance summing to the target logit.
    """
    check_images(x, "x", shape=tuple(model.input_shape[1:]))
    if rule not in RULES:
        raise ValueError(f"rule: expected one of {RULES}, got {rule!r}")
    check_real(epsilon, "epsilon", 0.0, lo_open=True)
    check_real(gamma, "gamma", 0.0)
    batch_size = check_positive_int(batch_size, "batch_size")
    for name, v in (("bias", bias), ("keep_channels", keep_channels), ("progress", progress)):
        if not isinstance(v, bool):
            raise TypeError(f"{name}: expected a bool, got {v!r}")
    steps = _steps(model)
    rules = [None] * len(steps)
    named = iter(_rules(steps, rule))
    for i, s in enumerate(steps):
        if s[0] == "linear":
            rules[i] = next(named)[1]
    if len(model.output_shape) != 2:
        raise NotImplementedError(f"lrp: expected a model with N×classes logits, got output {model.output_shape}")
    n_classes = int(model.output_shape[-1])
    if target is not None:
        if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
            target = np.full(len(x), int(target), np.int64)
        check_labels(target, "target", n=len(x), num_classes=n_classes)
    out = []
    for i in progress_bar(range(0, len(x), batch_size), desc="LRP", disable=not progress):
        tb = None if target is None else tf.constant(target[i : i + batch_size])
        R = _propagate(steps, rules, tf.constant(x[i : i + batch_size]), tb, float(epsilon), float(gamma), bias)
        out.append(R if keep_channels else R.sum(axis=-1))
    shape = (0, *model.input_shape[1:]) if keep_channels else (0, *model.input_shape[1:-1])
    return np.concatenate(out).astype(np.float32, copy=False) if out else np.zeros(shape, np.float32)


def heatmap_correlation(r1, r2) -> np.ndarray:
    """Per-image Pearson correlation (float64, shape ``(N,)``) of flattened heatmaps ``r1``, ``r2``
    (thesis 002 §5.6.6, Figs. 37-40: oracle vs copycat LRP heatmaps). A constant heatmap has no
    defined correlation and gives NaN for that image (as ``np.corrcoef``)."""
    for name, r in (("r1", r1), ("r2", r2)):
        if not isinstance(r, np.ndarray) or not np.issubdtype(r.dtype, np.floating) or r.ndim < 2:
            raise TypeError(f"{name}: expected a float numpy array of N heatmaps (ndim >= 2), "
                            f"got {type(r).__name__} {getattr(r, 'dtype', '')} {getattr(r, 'shape', '')}")
        if not np.isfinite(r).all():
            raise ValueError(f"{name}: heatmaps contain NaN or inf")
    if r1.shape != r2.shape:
        raise ValueError(f"r1, r2: expected the same shape, got {r1.shape} and {r2.shape}")
    a = r1.reshape(len(r1), -1).astype(np.float64)
    b = r2.reshape(len(r2), -1).astype(np.float64)
    a, b = a - a.mean(axis=1, keepdims=True), b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(axis=1) / np.where(den > 0, den, 1.0), np.nan)

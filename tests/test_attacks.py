"""Tests for stealnb.attacks.evasion: FGSM (cleverhans wrapper) and the batched DeepFool."""
import numpy as np
import pytest
import tensorflow as tf

from stealnb.attacks import evasion, jbda
from stealnb.core import models
from stealnb.attacks.evasion import deepfool, fgsm

OVERSHOOT = 0.02


# ------------------------------------------------------------------------------------ fixtures


def _structured(n, seed, noise=0.2):
    """10 smooth class prototypes (8x8 upsampled to 32x32) plus Gaussian noise: learnable, not trivial."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    protos = np.random.default_rng(1234).uniform(0.25, 0.75, (10, 8, 8, 3)).astype(np.float32)
    x = protos[y].repeat(4, axis=1).repeat(4, axis=2) + rng.normal(0, noise, (n, 32, 32, 3))
    return np.clip(x, 0, 1).astype(np.float32), y.astype(np.int64)


@pytest.fixture(scope="module")
def trained_tiny():
    """cnn-tiny trained for 2 epochs on structured data, so its decision boundaries are meaningful."""
    import keras

    model = models.build("cnn-tiny", seed=0)
    model.compile(optimizer=keras.optimizers.Adam(2e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _structured(768, seed=1)
    model.fit(x, y, epochs=2, batch_size=64, verbose=0)
    return model


@pytest.fixture(scope="module")
def probe():
    return _structured(20, seed=2)[0]


def _linear(num_classes, seed, x, weight_scale=0.01):
    """Affine classifier logits = W·vec(x) + b (Keras Flatten -> Dense) with known W and b; b centres
    the logits on ``x`` so that its images fall into several classes."""
    import keras

    rng = np.random.default_rng(seed)
    # Columns of very different norms, so the runner-up class is not always the nearest boundary.
    w = (rng.normal(0, weight_scale, (32 * 32 * 3, num_classes)) * np.geomspace(0.2, 3, num_classes)).astype(np.float32)
    b = (-(x.reshape(len(x), -1) @ w).mean(0) + rng.normal(0, 0.01, num_classes)).astype(np.float32)
    inp = keras.Input((32, 32, 3))
    dense = keras.layers.Dense(num_classes)
    model = keras.Model(inp, dense(keras.layers.Flatten()(inp)))
    dense.set_weights([w, b])
    return model, w, b


def _mid_images(n, seed):
    """Images near 0.5 so that DeepFool steps on the linear model never reach the [0, 1] bounds."""
    return (0.5 + np.random.default_rng(seed).uniform(-0.2, 0.2, (n, 32, 32, 3))).astype(np.float32)


def _labels(model, x):
    return np.asarray(model(x, training=False)).argmax(1)


# ----------------------------------------------------------------- DeepFool: closed-form cases


def test_deepfool_two_class_linear_matches_hyperplane_distance():
    x = _mid_images(12, seed=1)
    model, w, b = _linear(2, seed=0, x=x)
    res = deepfool(model, x, overshoot=OVERSHOOT)
    f = x.reshape(len(x), -1).astype(np.float64) @ w + b
    wd = (w[:, 1] - w[:, 0]).astype(np.float64)
    dist = np.abs(f[:, 1] - f[:, 0]) / np.linalg.norm(wd)
    assert 0 < res.x_adv.min() and res.x_adv.max() < 1, "test set-up: no clipping must occur"
    assert res.converged.all() and (res.iterations == 1).all()
    # Closed form |f|/||w|| x (1 + overshoot); the reference code's 1e-4 step padding is the only extra.
    np.testing.assert_allclose(res.norms, dist * (1 + OVERSHOOT), rtol=1e-4, atol=1.5e-4)
    np.testing.assert_allclose(res.norms, (dist + 1e-4) * (1 + OVERSHOOT), rtol=1e-5, atol=1e-6)
    assert len(np.unique(f.argmax(1))) == 2, "test set-up: both classes present"
    # The perturbation is along +-w (towards the other class).
    r = (res.x_adv - x).reshape(len(x), -1)
    cos = r @ wd / (np.linalg.norm(r, axis=1) * np.linalg.norm(wd))
    orig = f.argmax(1)
    np.testing.assert_allclose(cos, np.where(orig == 0, 1.0, -1.0), atol=1e-4)
    assert (_labels(model, res.x_adv) != orig).all()


@pytest.mark.parametrize("num_candidates", [2, 5, 10])
def test_deepfool_multiclass_linear_nearest_candidate_boundary(num_candidates):
    """Affine 5-class model: one step to the nearest of the candidate hyperplanes f_k = f_orig, where
    the candidates are the top-num_candidates classes of the original prediction (clipped to 5)."""
    x = _mid_images(16, seed=4)
    model, w, b = _linear(5, seed=3, x=x)
    res = deepfool(model, x, overshoot=OVERSHOOT, num_candidates=num_candidates)
    f = x.reshape(len(x), -1).astype(np.float64) @ w + b

    def expected(c):
        out = []
        for fi, cand in zip(f, np.argsort(-f, axis=1)[:, :c]):
            o = cand[0]
            d = [abs(fi[k] - fi[o]) / np.linalg.norm(w[:, k] - w[:, o]) for k in cand[1:]]
            out.append((min(d) + 1e-4) * (1 + OVERSHOOT))
        return np.array(out)

    assert 0 < res.x_adv.min() and res.x_adv.max() < 1
    assert res.converged.all() and (res.iterations == 1).all()
    np.testing.assert_allclose(res.norms, expected(min(num_candidates, 5)), rtol=1e-5, atol=1e-6)
    assert len(np.unique(f.argmax(1))) >= 3, "test set-up: several classes present"
    if num_candidates == 2:  # set-up: the runner-up is not always the nearest boundary
        assert not np.allclose(expected(2), expected(5), rtol=1e-3)


def test_deepfool_zero_gradient_model_stops_unconverged():
    import keras

    inp = keras.Input((32, 32, 3))
    dense = keras.layers.Dense(3)
    model = keras.Model(inp, dense(keras.layers.Flatten()(inp)))
    dense.set_weights([np.zeros((3072, 3), np.float32), np.array([1.0, 0.0, 0.0], np.float32)])
    x = _mid_images(4, seed=0)
    res = deepfool(model, x)
    assert not res.converged.any()
    assert (res.iterations == 1).all()
    np.testing.assert_array_equal(res.x_adv, x)
    np.testing.assert_array_equal(res.norms, 0)


# --------------------------------------------------------- DeepFool: per-sample reference loop


def reference_deepfool(model, x0, overshoot=OVERSHOOT, max_iter=50, num_candidates=10):
    """Plain one-image-at-a-time DeepFool (LTS4 reference code's loop), numpy + GradientTape."""
    f0 = np.asarray(model(x0[None], training=False))[0]
    cand = np.argsort(-f0, kind="stable")[: min(num_candidates, len(f0))]
    orig = cand[0]
    r_tot = np.zeros_like(x0)
    xi, it, flipped = x0.copy(), 0, False
    while it < max_iter and not flipped:
        xt = tf.constant(xi[None])
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(xt)
            logits = model(xt, training=False)[0]
            picked = [logits[k] for k in cand]
        grads = [tape.gradient(p, xt).numpy()[0] for p in picked]
        f = logits.numpy()
        best, w_best = np.inf, None
        for j in range(1, len(cand)):
            w_k = grads[j] - grads[0]
            d = abs(f[cand[j]] - f[orig]) / np.linalg.norm(w_k)
            if d < best:
                best, w_best = d, w_k
        r_tot = r_tot + ((best + 1e-4) * w_best / np.linalg.norm(w_best)).astype(np.float32)
        xi = np.clip(x0 + (1 + overshoot) * r_tot, 0, 1).astype(np.float32)
        it += 1
        flipped = _labels(model, xi[None])[0] != orig
    return xi, it, flipped


def test_deepfool_matches_per_sample_reference(trained_tiny, probe):
    res = deepfool(trained_tiny, probe, batch_size=7)  # several batches, last one partial
    ref = [reference_deepfool(trained_tiny, xi) for xi in probe]
    ref_x = np.stack([r[0] for r in ref])
    ref_it = np.array([r[1] for r in ref])
    ref_flip = np.array([r[2] for r in ref])
    ref_norm = np.linalg.norm((ref_x - probe).reshape(len(probe), -1), axis=1)
    assert res.converged.mean() == ref_flip.mean()
    np.testing.assert_array_equal(res.converged, ref_flip)
    np.testing.assert_array_equal(res.iterations, ref_it)
    np.testing.assert_allclose(res.norms, ref_norm, rtol=2e-3)
    assert res.iterations.max() > 1, "test set-up: some samples should need several steps"


def test_deepfool_result_contract(trained_tiny, probe):
    res = deepfool(trained_tiny, probe, batch_size=8)
    n = len(probe)
    assert res.x_adv.dtype == np.float32 and res.x_adv.shape == probe.shape
    assert res.norms.dtype == np.float32 and res.norms.shape == (n,)
    assert res.converged.dtype == bool and res.converged.shape == (n,)
    assert np.issubdtype(res.iterations.dtype, np.integer) and res.iterations.shape == (n,)
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    orig = _labels(trained_tiny, probe)
    adv = _labels(trained_tiny, res.x_adv)
    np.testing.assert_array_equal(res.converged, adv != orig)  # converged <=> misclassified at x_adv
    assert res.converged.mean() >= 0.9
    np.testing.assert_allclose(res.norms, np.linalg.norm((res.x_adv - probe).reshape(n, -1), axis=1), rtol=1e-5)
    assert (res.norms[res.converged] > 0).all()
    # batch size does not change the result
    res2 = deepfool(trained_tiny, probe, batch_size=64)
    np.testing.assert_allclose(res2.norms, res.norms, rtol=1e-4)
    np.testing.assert_array_equal(res2.iterations, res.iterations)


def test_deepfool_max_iter_and_overshoot(trained_tiny, probe):
    one = deepfool(trained_tiny, probe, max_iter=1)
    assert (one.iterations == 1).all()
    full = deepfool(trained_tiny, probe)
    assert one.converged.sum() < full.converged.sum()  # set-up: some samples need > 1 step
    orig = _labels(trained_tiny, probe)
    np.testing.assert_array_equal(one.converged, _labels(trained_tiny, one.x_adv) != orig)
    # Samples done after one step are identical; the others stopped moving after max_iter.
    done = one.converged
    np.testing.assert_allclose(one.norms[done], full.norms[done], rtol=1e-5)
    big = deepfool(trained_tiny, probe, overshoot=0.5)
    assert np.median(big.norms[big.converged]) > np.median(full.norms[full.converged])


def test_deepfool_compiles_once_per_model(trained_tiny, probe):
    deepfool(trained_tiny, probe[:3])
    fn = evasion._DEEPFOOL_FNS[trained_tiny][10]
    before = fn.experimental_get_tracing_count()
    for bs in (1, 5, 20):
        deepfool(trained_tiny, probe, batch_size=bs, overshoot=0.1, max_iter=7)
    assert fn.experimental_get_tracing_count() == before == 1


def test_attacks_on_one_new_model_after_another_never_warn_of_retracing(tf_warnings):
    """Each model compiles its own FGSM and DeepFool functions; TensorFlow must not take the first
    trace of each (a new substitute every extraction round) for retracing of one function."""
    x = np.random.default_rng(0).random((24, 32, 32, 3), dtype=np.float32)
    level = tf.get_logger().level
    for seed in range(6):
        m = models.build("cnn-tiny", seed=seed)
        fgsm(m, x, batch_size=10)
        deepfool(m, x, max_iter=2, batch_size=10)
    assert [r.getMessage() for r in tf_warnings if "retracing" in r.getMessage()] == []
    assert tf.get_logger().level == level


def test_attacks_accept_empty_batch(tiny_model):
    x = np.zeros((0, 32, 32, 3), np.float32)
    res = deepfool(tiny_model, x)
    assert res.x_adv.shape == x.shape and res.norms.shape == (0,) and res.converged.shape == (0,)
    assert fgsm(tiny_model, x).shape == x.shape


@pytest.mark.parametrize("kwargs, exc", [
    (dict(overshoot=-0.1), ValueError),
    (dict(overshoot=float("nan")), ValueError),
    (dict(overshoot="0.02"), TypeError),
    (dict(max_iter=0), ValueError),
    (dict(max_iter=2.5), TypeError),
    (dict(num_candidates=1), ValueError),
    (dict(batch_size=0), ValueError),
    (dict(progress=1), TypeError),
])
def test_deepfool_rejects_bad_parameters(tiny_model, kwargs, exc):
    x = np.full((2, 32, 32, 3), 0.5, np.float32)
    with pytest.raises(exc):
        deepfool(tiny_model, x, **kwargs)


@pytest.mark.parametrize("x, exc", [
    (np.full((2, 32, 32, 3), 0.5, np.float64), TypeError),
    (np.full((2, 32, 32), 0.5, np.float32), ValueError),
    (np.full((2, 32, 32, 3), 1.5, np.float32), ValueError),
    ([[0.5]], TypeError),
])
def test_attacks_reject_bad_images(tiny_model, x, exc):
    with pytest.raises(exc):
        deepfool(tiny_model, x)
    with pytest.raises(exc):
        fgsm(tiny_model, x)


# ------------------------------------------------------------------------------------------ FGSM


def _fgsm_formula(model, x, eps, y=None, clip=True):
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        logits = model(xt, training=False)
        labels = tf.argmax(logits, 1) if y is None else tf.constant(y)
        loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    out = x + eps * np.sign(tape.gradient(loss, xt).numpy())
    return np.clip(out, 0, 1) if clip else out


def test_fgsm_equals_sign_gradient_formula(trained_tiny, probe):
    eps = 0.1
    adv = fgsm(trained_tiny, probe, eps, batch_size=6)
    assert adv.dtype == np.float32 and adv.shape == probe.shape
    assert adv.min() >= 0 and adv.max() <= 1
    assert np.abs(adv - probe).max() <= eps + 1e-6
    np.testing.assert_allclose(adv, _fgsm_formula(trained_tiny, probe, eps), atol=1e-6)
    y = np.arange(len(probe), dtype=np.int64) % 10
    adv_y = fgsm(trained_tiny, probe, eps, y=y)
    np.testing.assert_allclose(adv_y, _fgsm_formula(trained_tiny, probe, eps, y), atol=1e-6)
    assert not np.allclose(adv_y, adv)  # the labels are used
    raw = fgsm(trained_tiny, probe, 0.25, clip=None)
    np.testing.assert_allclose(raw, _fgsm_formula(trained_tiny, probe, 0.25, clip=False), atol=1e-6)
    assert raw.max() > 1 or raw.min() < 0  # unclipped output really leaves [0, 1]


def test_fgsm_default_eps_fools_the_model(trained_tiny, probe):
    adv = fgsm(trained_tiny, probe)  # thesis eps = 0.25
    assert np.abs(adv - probe).max() <= 0.25 + 1e-6
    assert (_labels(trained_tiny, adv) != _labels(trained_tiny, probe)).mean() > 0.5


@pytest.mark.parametrize("kwargs, exc", [
    (dict(eps=-0.1), ValueError),
    (dict(eps=float("inf")), ValueError),
    (dict(eps=None), TypeError),
    (dict(y=np.zeros(3, np.int64)), ValueError),
    (dict(y=np.zeros(2, np.float32)), TypeError),
    (dict(y=np.array([0, 10])), ValueError),
    (dict(batch_size=0), ValueError),
    (dict(clip=(1.0, 0.0)), ValueError),
    (dict(clip=0.5), TypeError),
])
def test_fgsm_rejects_bad_parameters(tiny_model, kwargs, exc):
    x = np.full((2, 32, 32, 3), 0.5, np.float32)
    with pytest.raises(exc):
        fgsm(tiny_model, x, **kwargs)


# ----------------------------------------------------------------- JbDA (PRADA's positive control)
def test_jbda_queries_are_sign_steps_of_the_seeds():
    seeds = _mid_images(8, seed=5)
    calls = []

    def oracle(z):
        calls.append(len(z))
        return (z.reshape(len(z), -1).mean(axis=1) * 40).astype(np.int64) % 10

    xq, yq = jbda.jbda_queries(oracle, seeds, "cnn-tiny", rounds=3, lam=0.1, epochs=1, seed=0, max_queries=28,
                                  num_classes=10)
    assert xq.shape == (28, 32, 32, 3) and xq.dtype == np.float32 and calls == [8, 8, 12]
    np.testing.assert_array_equal(xq[:8], seeds)
    np.testing.assert_array_equal(yq, oracle(xq))
    step = xq[8:16] - seeds  # round 1: pixels in [0.3, 0.7] move by exactly +-lam (or 0 on a zero gradient)
    assert np.isclose(np.abs(step), 0.1, atol=1e-6).mean() > 0.3
    assert np.isclose(np.abs(step), 0.1, atol=1e-6).sum() + (step == 0).sum() == step.size
    assert xq.min() >= 0 and xq.max() <= 1
    with pytest.raises(ValueError, match=r"lam: expected a step size in \(0, 1\]"):
        jbda.jbda_queries(oracle, seeds, "cnn-tiny", rounds=1, lam=1.5)
    with pytest.raises(ValueError, match="max_queries"):
        jbda.jbda_queries(oracle, seeds, "cnn-tiny", rounds=1, max_queries=4)


def test_jbda_steps_up_the_substitutes_probability_of_the_oracles_label(monkeypatch):
    """Papernot et al. 2017 (thesis 002 eq. 3.4): x + lam * sign(grad_x F(x)[O(x)]). On a two-class
    linear substitute F = softmax(x W), grad_x F_y = F_0 F_1 (w_y - w_other): every pixel moves by
    +lam where w_y > w_other and -lam elsewhere, for the *oracle's* label y (not the substitute's
    own prediction, not the logit's gradient, not down the slope)."""
    import keras

    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.01, (32 * 32 * 3, 2)).astype(np.float32)
    w[:, 1] = w[:, 0] + rng.choice([-0.01, 0.01], 32 * 32 * 3).astype(np.float32)  # |w_1 - w_0| far from 0
    w[: 32 * 32 * 3 // 2, 0] = np.abs(w[: 32 * 32 * 3 // 2, 0])  # sign(w_y) != sign(w_y - w_other) on many pixels

    def linear_substitute(name, num_classes, seed):
        inp = keras.Input((32, 32, 3))
        dense = keras.layers.Dense(num_classes)
        model = keras.Model(inp, dense(keras.layers.Flatten()(inp)))
        dense.set_weights([w, np.zeros(2, np.float32)])
        return model

    monkeypatch.setattr(models, "build", linear_substitute)
    monkeypatch.setattr(jbda, "fit", lambda *a, **kw: {})  # keep the hand-set weights
    seeds = _mid_images(12, seed=6)
    own = _labels(linear_substitute("", 2, 0), seeds)
    oracle_labels = np.arange(12) % 2  # the oracle disagrees with the substitute on some seeds
    assert 0 < (oracle_labels != own).sum() < 12
    oracle = lambda z: oracle_labels[: len(z)] if len(z) == 12 else np.zeros(len(z), np.int64)  # noqa: E731
    xq, yq = jbda.jbda_queries(oracle, seeds, "linear", rounds=1, lam=0.1, num_classes=2)
    d = np.sign(w[:, 1] - w[:, 0]).reshape(32, 32, 3)
    up = np.where(oracle_labels[:, None, None, None] == 1, d, -d)  # sign(w_y - w_other) per seed
    np.testing.assert_allclose(xq[12:], seeds + np.float32(0.1) * up, atol=1e-6)

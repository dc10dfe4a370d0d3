"""Tests for stealnb.defenses: PRADA, Adaptive Misinformation, output perturbations, EWE."""
import warnings

import keras
import numpy as np
import pytest
from scipy import special, stats

from stealnb.experiments import defense_experiment as DX
from stealnb import defenses as D
from stealnb.defenses.perturbation import _reverse_sigmoid_raw
from stealnb.core import models, train

# ----------------------------------------------------------------------------------------------
# PRADA streams
# ----------------------------------------------------------------------------------------------
DIM, K = 64, 5


def _labeler(seed):
    w = np.random.default_rng(seed).normal(size=(DIM, K))
    return lambda x: (x @ w).argmax(axis=1).astype(np.int64)


def _benign(n, rng):
    """Natural-ish traffic: i.i.d. N(0, I) points in 64-D. Pairwise distances of such points
    concentrate around sqrt(2 * 64) with a light, near-normal spread, so the min distances to the
    growing sets are near-normal (W ~ 0.98) -- the paper's model of benign clients."""
    return rng.normal(size=(n, DIM)).astype(np.float32)


def _attack(n, rng, n_seeds=10, p_new=0.3, lam=0.05):
    """JbDA-style synthetic attack: a few seeds, then each query is either a fresh seed (30%) or
    an earlier query plus lam * U(0.5, 1.5) * sign(noise) (70%, like Papernot et al.'s
    Jacobian-sign steps). Min distances are then a two-mode mixture -- ~lam*sqrt(64) for the
    perturbations vs. ~sqrt(2*64) for new seeds -- with both modes heavy enough to survive the
    3-std outlier filter, so D is far from normal (W ~ 0.65) by construction."""
    xs = list(rng.normal(size=(n_seeds, DIM)))
    while len(xs) < n:
        if rng.random() < p_new:
            xs.append(rng.normal(size=DIM))
        else:
            parent = xs[rng.integers(len(xs))]
            xs.append(parent + lam * rng.uniform(0.5, 1.5) * np.sign(rng.normal(size=DIM)))
    return np.asarray(xs[:n], np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prada_flags_attack_stream_not_benign(seed):
    rng = np.random.default_rng(seed)
    label = _labeler(seed)
    xb, xa = _benign(800, rng), _attack(800, rng)

    benign = D.PradaDetector(delta=0.9)
    out = benign.observe(xb, label(xb))
    assert not benign.flagged and benign.flagged_at is None and not out.any()
    assert len(benign.w_history) > 600 and min(w for _, w in benign.w_history) > 0.9

    attack = D.PradaDetector(delta=0.9)
    out = attack.observe(xa, label(xa))
    assert attack.flagged and out[-1]
    # the flag latches: every answer after the alarm is flagged, none before
    assert out.sum() == len(xa) - attack.flagged_at + 1
    assert attack.n_queries == 800


def test_prada_flagged_at_is_first_query_with_w_below_delta():
    """300 benign queries then an attack: recompute W with scipy after every query and check the
    alarm fires exactly at the first query where |D| > 100 and W < delta."""
    rng = np.random.default_rng(5)
    label = _labeler(5)
    x = np.concatenate([_benign(300, rng), _attack(400, rng)])
    y = label(x)
    det = D.PradaDetector(delta=0.9, min_queries=100, outlier_std=3.0)
    expected = None
    for i in range(len(x)):
        det.observe(x[i : i + 1], y[i : i + 1])
        d = np.asarray(det.distances)
        if expected is None and len(d) > 100:
            kept = d[np.abs(d - d.mean()) <= 3 * d.std()]
            if stats.shapiro(kept).statistic < 0.9:
                expected = i + 1
    assert expected is not None and expected > 300  # fires only once the attack has started
    assert det.flagged_at == expected


def test_prada_growing_sets_follow_algorithm_by_hand():
    """Alg. 1 of Juuti et al. on a 1-D stream, worked by hand (class 0 unless noted):
    0 starts G_0 (T=0, D_G={0}); 1: d=1 > 0 -> added, T = max(0, mean{0,1}-std{0,1}) = 0;
    3: d=2 > 0 -> added, T = 1 - sqrt(2/3) = 0.1835; 3.5: d=0.5 > T -> added,
    T = max(0.1835, 0.875 - 0.7395) = 0.1835; 3.6: d=0.1 <= T -> not added; 100 (class 1) starts
    G_1 and adds no distance."""
    x = np.array([[0.0], [1.0], [3.0], [3.5], [3.6], [100.0]], np.float32)
    y = np.array([0, 0, 0, 0, 0, 1], np.int64)
    det = D.PradaDetector(min_queries=100)
    det.observe(x, y)
    np.testing.assert_allclose(det.distances, [1.0, 2.0, 0.5, 0.1], rtol=1e-6)
    assert det.growing_set_sizes == {0: 4, 1: 1}
    assert det.thresholds[0] == pytest.approx(1 - np.sqrt(2 / 3), rel=1e-6)
    assert det.thresholds[1] == 0.0
    assert det.w_history == []  # |D| <= min_queries: never tested


def test_prada_metrics_batching_and_reset(rng):
    x = np.array([[0.0, 0.0], [3.0, 4.0]], np.float32)
    y = np.zeros(2, np.int64)
    for metric, want in [("l2", 5.0), ("l1", 7.0), ("linf", 4.0)]:
        det = D.PradaDetector(metric=metric)
        det.observe(x, y)
        assert det.distances == [pytest.approx(want)]

    # one batch == the same queries one at a time (images are flattened)
    xs = rng.random((150, 4, 4, 3), dtype=np.float32)
    ys = rng.integers(0, 3, 150).astype(np.int64)
    a, b = D.PradaDetector(min_queries=20), D.PradaDetector(min_queries=20)
    fa = a.observe(xs, ys)
    fb = np.concatenate([b.observe(xs[i : i + 1], ys[i : i + 1]) for i in range(150)])
    np.testing.assert_array_equal(fa, fb)
    assert a.distances == b.distances and a.w_history == b.w_history

    a.reset()
    assert a.n_queries == 0 and a.distances == [] and not a.flagged and a.growing_set_sizes == {}
    with pytest.raises(ValueError, match="shape"):
        b.observe(rng.random((2, 5), dtype=np.float32), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="labels"):
        a.observe(xs[:3], ys[:2])
    with pytest.raises(TypeError, match="floating"):
        a.observe(xs.astype(np.uint8), ys)
    with pytest.raises(ValueError, match="metric"):
        D.PradaDetector(metric="cosine")


def test_prada_statistic_large_n_no_warning_and_outliers(rng):
    d = rng.normal(10, 1, 6000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w = D.prada_statistic(d)
    assert w > 0.99
    # one huge outlier wrecks W without the 3-std filter, not with it
    d2 = np.r_[rng.normal(10, 1, 300), 1e4]
    assert D.prada_statistic(d2, outlier_std=None) < 0.2 < 0.95 < D.prada_statistic(d2)
    assert D.prada_statistic(np.ones(200)) == 1.0
    with pytest.raises(ValueError, match="at least 3"):
        D.prada_statistic([1.0, 2.0])


# ----------------------------------------------------------------------------------------------
# Adaptive Misinformation
# ----------------------------------------------------------------------------------------------


def _probs(rng, n, c, conc):
    return rng.dirichlet(np.full(c, conc), size=n)


def test_adaptive_misinformation_in_and_out_of_distribution(rng):
    c = 10
    p_in = np.full((50, c), 0.05 / (c - 1))  # max prob 0.95 >> tau
    p_in[np.arange(50), rng.integers(0, c, 50)] = 0.95
    p_ood = _probs(rng, 50, c, 50.0)  # near uniform: max prob ~0.15 << tau
    assert p_ood.max() < 0.3
    mis = _probs(rng, 50, c, 1.0)

    out_in = D.adaptive_misinformation(p_in, mis, tau=0.5, nu=1000.0)
    out_ood = D.adaptive_misinformation(p_ood, mis, tau=0.5, nu=1000.0)
    np.testing.assert_allclose(out_in, p_in, atol=1e-9)
    np.testing.assert_allclose(out_ood, mis, atol=1e-9)
    for out in (out_in, out_ood):
        np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-9)

    # at max prob == tau, alpha = 1/2: the exact midpoint
    p_mid = np.array([[0.5, 0.3, 0.2]])
    m = np.array([[0.1, 0.1, 0.8]])
    np.testing.assert_allclose(D.adaptive_misinformation(p_mid, m, tau=0.5), 0.5 * (p_mid + m))
    # alpha follows 1 / (1 + exp(nu (max - tau)))
    a = D.misinformation_alpha(p_ood, tau=0.2, nu=30.0)
    np.testing.assert_allclose(a, 1 / (1 + np.exp(30.0 * (p_ood.max(axis=1) - 0.2))))
    assert D.adaptive_misinformation(p_in.astype(np.float32), mis.astype(np.float32)).dtype == np.float32
    with pytest.raises(ValueError, match="shape"):
        D.adaptive_misinformation(p_in, mis[:10])


def test_misinformation_loss_and_training():
    import tensorflow as tf

    z = tf.constant([[2.0, -1.0, 0.5], [0.0, 0.0, 50.0]])
    y = tf.constant([0, 2])
    p0 = special.softmax(np.array([2.0, -1.0, 0.5]))[0]
    # row 2: 1 - p_y = 2e^-50 / (1 + 2e^-50) underflows 1 - p in float64; the stable form must not
    want = [-np.log(1 - p0), 50.0 - np.log(2.0)]
    with tf.GradientTape() as tape:
        tape.watch(z)
        loss = D.misinformation_loss(y, z)
    np.testing.assert_allclose(loss.numpy(), want, rtol=1e-5)
    assert np.isfinite(tape.gradient(loss, z).numpy()).all()

    # three colour classes (bright red/green/blue channel): trivially learnable, so the
    # misinformation model must learn to put its mass on the *wrong* channels
    rng = np.random.default_rng(0)
    yy = rng.integers(0, 3, 240).astype(np.int64)
    xx = rng.random((240, 32, 32, 3), dtype=np.float32) * 0.3
    xx[np.arange(240), :, :, yy] += 0.6
    mis = models.build("cnn-tiny", num_classes=3, seed=0)
    hist = D.train_misinformation_model(mis, xx, yy, epochs=3, batch_size=32, seed=0)
    assert hist["loss"][-1] < hist["loss"][0]
    probs = special.softmax(models.predict_logits(mis, xx), axis=1)
    assert probs[np.arange(240), yy].mean() < 0.1  # chance would be 1/3
    assert np.mean(probs.argmax(axis=1) == yy) < 0.1


def test_adaptive_misinformation_is_one_defense_mixing_in_the_misinformation_model(tiny_model, rng):
    from stealnb.extraction.oracle import Oracle

    mis = models.build("cnn-tiny", seed=1)
    x = rng.random((20, 32, 32, 3), dtype=np.float32)
    p = special.softmax(models.predict_logits(tiny_model, x).astype(np.float64), axis=1)
    p_hat = special.softmax(models.predict_logits(mis, x).astype(np.float64), axis=1)

    am = D.AdaptiveMisinformation(mis, tau=0.5, nu=1000.0)
    out = am.answer(x, p)
    assert out.dtype == np.float64 and out.shape == (20, 10)
    np.testing.assert_allclose(out, D.adaptive_misinformation(p, p_hat, 0.5, 1000.0), atol=1e-12)
    assert am.n_queries == 20 and am.n_misinformed == int((p.max(axis=1) < 0.5).sum())
    # tau = 0: nothing is OOD -> the defended model's own outputs; tau = 1: everything is
    np.testing.assert_allclose(D.AdaptiveMisinformation(mis, tau=0.0).answer(x, p), p, atol=1e-6)
    np.testing.assert_allclose(D.AdaptiveMisinformation(mis, tau=1.0).answer(x, p), p_hat, atol=1e-6)
    # the same object defends an oracle
    defended = Oracle(tiny_model, output="probs", defenses=[D.AdaptiveMisinformation(mis, tau=0.5)]).query(x)
    np.testing.assert_allclose(defended, out, atol=1e-6)
    with pytest.raises(ValueError, match="classes"):
        Oracle(tiny_model, defenses=[D.AdaptiveMisinformation(models.build("cnn-tiny", num_classes=3, seed=0))])


# ----------------------------------------------------------------------------------------------
# Output perturbations
# ----------------------------------------------------------------------------------------------


def test_round_probs(rng):
    p = _probs(rng, 200, 10, 0.5)
    for dec in (1, 2, 3):
        r = D.round_probs(p, dec)
        np.testing.assert_allclose(r * 10**dec, np.round(r * 10**dec), atol=1e-9)  # on the grid
        assert np.all(np.abs(r.sum(axis=1) - 1) <= 10 * 0.5 * 10.0**-dec + 1e-12)
        # original top-1 stays among the maxima (ties possible, never overtaken)
        assert np.all(r[np.arange(200), p.argmax(axis=1)] == r.max(axis=1))
    tie = D.round_probs(np.array([[0.504, 0.496]]), 2)
    np.testing.assert_array_equal(tie, [[0.5, 0.5]])


def test_top_k_probs(rng):
    p = _probs(rng, 200, 10, 0.5)
    for k in (1, 3, 10):
        t = D.top_k_probs(p, k)
        assert np.all((t > 0).sum(axis=1) <= k)
        np.testing.assert_allclose(t.sum(axis=1), 1.0)
        np.testing.assert_array_equal(t.argmax(axis=1), p.argmax(axis=1))
        raw = D.top_k_probs(p, k, renormalize=False)
        kept = raw > 0
        np.testing.assert_array_equal(raw[kept], p[kept])
        # the kept entries are the k largest: every kept value >= every dropped value
        assert np.all(np.where(kept, p, np.inf).min(axis=1) >= np.where(kept, -np.inf, p).max(axis=1))
    np.testing.assert_array_equal(D.top_k_probs(p, 1), np.eye(10)[p.argmax(axis=1)])
    np.testing.assert_allclose(D.top_k_probs(p, 10), p)
    # ties at the boundary: exactly k kept, lowest index first
    np.testing.assert_array_equal(D.top_k_probs(np.array([[0.25, 0.25, 0.25, 0.25]]), 2), [[0.5, 0.5, 0, 0]])
    with pytest.raises(ValueError, match="at most 10"):
        D.top_k_probs(p, 11)


def test_reverse_sigmoid_formula_and_top1(rng):
    p = _probs(rng, 300, 10, 0.3)
    # gamma = 1: sigmoid(logit(y)) = y, so y' = ((1-beta) y + beta/2) / (1 - beta + C beta / 2)
    beta = 0.6
    want = ((1 - beta) * p + beta / 2) / (1 - beta + 10 * beta / 2)
    np.testing.assert_allclose(D.reverse_sigmoid(p, beta, 1.0), want, rtol=1e-12)
    # general formula vs. logit/sigmoid written out
    q = np.clip(p, 1e-12, 1 - 1e-12)
    raw = q - 0.5 * (special.expit(2.0 * special.logit(q)) - 0.5)
    np.testing.assert_allclose(D.reverse_sigmoid(q, 0.5, 2.0), raw / raw.sum(axis=1, keepdims=True), rtol=1e-9)

    for beta, gamma in [(0.7, 1.0), (0.5, 1.9), (0.19, 5.0), (0.99, 1.0)]:
        assert D.reverse_sigmoid_preserves_ranking(beta, gamma)
        r = D.reverse_sigmoid(p, beta, gamma)
        assert r.min() >= 0 and r.max() <= 1
        np.testing.assert_allclose(r.sum(axis=1), 1.0, atol=1e-12)
        np.testing.assert_array_equal(r.argmax(axis=1), p.argmax(axis=1))
        # the whole ranking is kept (non-strictly: tiny probabilities can round to ties)
        order = np.argsort(p, axis=1)
        assert np.all(np.diff(np.take_along_axis(r, order, axis=1), axis=1) >= -1e-15)
        assert np.abs(r - p).max() > 0.01  # it does perturb
    # beta = gamma = 1 is the degenerate edge: g(y) = 1/2, every row becomes uniform
    assert not D.reverse_sigmoid_preserves_ranking(1.0, 1.0)
    np.testing.assert_allclose(D.reverse_sigmoid(p, 1.0, 1.0), 0.1)
    # one-hot rows (logit = +-inf) are handled exactly
    r = D.reverse_sigmoid(np.eye(4), 0.7, 1.0)
    assert np.isfinite(r).all() and np.all(r.argmax(axis=1) == np.arange(4))


def test_reverse_sigmoid_top1_can_flip_outside_the_condition():
    # beta*gamma > 1: g decreases around y = 1/2, so 0.52 falls below 0.46
    p = np.array([[0.52, 0.46, 0.02]])
    assert not D.reverse_sigmoid_preserves_ranking(1.0, 3.0)
    assert D.reverse_sigmoid(p, 1.0, 3.0).argmax() == 1
    # IBM ART's defaults (beta=1, gamma=0.1) lift tiny probabilities above a 0.35 top-1
    p = np.r_[0.35, 0.33, 0.32 - 7e-10, np.full(7, 1e-10)][None, :]
    assert not D.reverse_sigmoid_preserves_ranking(1.0, 0.1)
    assert D.reverse_sigmoid(p, 1.0, 0.1).argmax() >= 3
    # ...while a confident row keeps its top-1 under the same parameters
    assert D.reverse_sigmoid(np.array([[0.9, 0.06, 0.04]]), 1.0, 0.1).argmax() == 0


def test_reverse_sigmoid_negative_values(rng):
    p = np.array([[0.6, 0.3, 0.1]])
    with pytest.raises(ValueError, match="negative"):
        D.reverse_sigmoid(p, beta=1.5, gamma=10.0)
    r = D.reverse_sigmoid(p, beta=1.5, gamma=10.0, clip_negative=True)
    assert r.min() >= 0 and r.sum() == pytest.approx(1.0)
    # beta <= 1 never goes negative
    q = _probs(rng, 500, 5, 0.2)
    for gamma in (0.1, 1.0, 10.0):
        assert _reverse_sigmoid_raw(q, 1.0, gamma).min() >= 0


BAD = [
    ([[0.5, 0.5]], TypeError, "numpy"),
    (np.array([[1, 0]]), TypeError, "floating"),
    (np.array([0.5, 0.5]), ValueError, "shape"),
    (np.array([[1.0], [1.0]]), ValueError, "C >= 2"),
    (np.array([[0.7, 0.7]]), ValueError, "sum to 1"),
    (np.array([[1.2, -0.2]]), ValueError, r"\[0, 1\]"),
    (np.array([[np.nan, 1.0]]), ValueError, "NaN"),
]


@pytest.mark.parametrize("fn", [D.round_probs, D.top_k_probs, D.reverse_sigmoid,
                                lambda p: D.adaptive_misinformation(p, p)])
@pytest.mark.parametrize("bad,err,msg", BAD)
def test_perturbations_reject_bad_probability_matrices(fn, bad, err, msg):
    with pytest.raises(err, match=msg):
        fn(bad)


def test_the_defense_registry_holds_every_shipped_defense_with_its_source():
    assert {"prada", "admis", "round", "top_k", "reverse_sigmoid"} <= set(D.DEFENSES.names())
    assert "Lee et al." in D.DEFENSES["reverse_sigmoid"].__doc__


# ----------------------------------------------------------------------------------------------
# EWE
# ----------------------------------------------------------------------------------------------


def test_make_watermark_trigger(rng):
    x = rng.random((5, 32, 32, 3), dtype=np.float32) * 0.5
    before = x.copy()
    t = D.make_watermark_trigger(x, trigger_size=4, position="bottom-right", value=1.0)
    np.testing.assert_array_equal(x, before)  # input untouched
    assert np.all(t[:, 28:, 28:, :] == 1.0)
    mask = np.ones((32, 32), bool)
    mask[28:, 28:] = False
    np.testing.assert_array_equal(t[:, mask], x[:, mask])
    assert np.all(D.make_watermark_trigger(x, 3, "top-left", 0.0)[:, :3, :3] == 0.0)
    assert np.all(D.make_watermark_trigger(x, 2, (10, 20), 0.8)[:, 10:12, 20:22] == np.float32(0.8))
    g = rng.random((2, 28, 28, 1), dtype=np.float32)  # EWE's MNIST shape also works
    assert np.all(D.make_watermark_trigger(g, 3, "center")[:, 12:15, 12:15] == 1.0)
    with pytest.raises(ValueError, match="trigger_size"):
        D.make_watermark_trigger(x, 33)
    with pytest.raises(ValueError, match="does not fit"):
        D.make_watermark_trigger(x, 4, (30, 0))
    with pytest.raises(ValueError, match="position"):
        D.make_watermark_trigger(x, 4, "middle")
    with pytest.raises(TypeError, match="float32"):
        D.make_watermark_trigger(x.astype(np.float64), 4)


def _snnl_numpy(f, y, t, metric, eps):
    f = f.reshape(len(f), -1).astype(np.float64)
    if metric == "euclidean":
        d = ((f[:, None, :] - f[None, :, :]) ** 2).sum(-1)
    else:
        n = f / np.linalg.norm(f, axis=1, keepdims=True)
        d = 1 - n @ n.T
    e = np.exp(-d / t)
    np.fill_diagonal(e, 0.0)
    same = (y[:, None] == y[None, :]) & ~np.eye(len(y), dtype=bool)
    return -np.mean(np.log(eps + (e * same).sum(1) / e.sum(1)))


@pytest.mark.parametrize("metric,t", [("euclidean", 2.0), ("euclidean", 0.5), ("cosine", 0.1)])
def test_snnl_matches_numpy(rng, metric, t):
    f = rng.normal(size=(7, 2, 3)).astype(np.float32)
    y = np.array([0, 0, 1, 1, 1, 2, 2])
    for eps in (0.0, 1e-5):
        got = float(D.snnl(f, y, t, metric=metric, eps=eps))
        assert got == pytest.approx(_snnl_numpy(f, y, t, metric, eps), rel=1e-4)
    # a singleton label: undefined without eps, -log(eps) contribution with it
    y1 = np.array([0, 0, 1, 1, 1, 2, 3])
    assert float(D.snnl(f, y1, t, metric=metric)) == pytest.approx(_snnl_numpy(f, y1, t, metric, 1e-5), rel=1e-4)
    # well-separated classes -> ~0; identical points -> -log(fraction of same-label neighbours)
    sep = np.repeat(np.eye(2, dtype=np.float32) * 100, 3, axis=0)
    assert float(D.snnl(sep, np.array([0, 0, 0, 1, 1, 1]), 1.0, eps=0.0)) == pytest.approx(0.0, abs=1e-6)
    same = np.ones((6, 4), np.float32)
    assert float(D.snnl(same, np.array([0, 0, 0, 1, 1, 1]), 1.0, eps=0.0)) == pytest.approx(-np.log(2 / 5), rel=1e-5)


def test_snnl_gradients_are_finite_for_far_points():
    import tensorflow as tf

    f = tf.Variable(np.random.default_rng(0).normal(size=(8, 5)).astype(np.float32) * 100)
    with tf.GradientTape() as tape:
        loss = D.snnl(f, np.array([0, 1] * 4), 0.1)
    g = tape.gradient(loss, f).numpy()
    assert np.isfinite(float(loss)) and np.isfinite(g).all()


def _digits32():
    """scikit-learn's 8x8 digits, nearest-neighbour upscaled x4 to 32x32x3 float32 in [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (np.kron(d.images, np.ones((4, 4))) / 16.0).astype(np.float32)[..., None].repeat(3, axis=-1)
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(x))
    return x[perm], y[perm]


def _feature_snnl(model, x_wm, x_target, t):
    fm = keras.Model(model.input, model.get_layer("fc1").output)
    f = np.asarray(fm(np.concatenate([x_wm, x_target]), training=False))
    w = np.r_[np.ones(len(x_wm)), np.zeros(len(x_target))].astype(np.int64)
    return float(D.snnl(f, w, t, metric="cosine"))


def test_ewe_watermark_and_ownership():
    x, y = _digits32()
    xtr, ytr, xte, yte = x[:1400], y[:1400], x[1400:], y[1400:]
    source, target, temp = 1, 7, 0.1
    x_wm = D.make_watermark_trigger(xtr[ytr == source], trigger_size=4)
    x_wm_test = D.make_watermark_trigger(xte[yte == source], trigger_size=4)  # held out

    clean = models.build("cnn-tiny", seed=0)
    train.fit(clean, xtr, ytr, epochs=6, batch_size=64, seed=0)

    def watermarked(kappa):
        m = keras.models.clone_model(clean)
        m.set_weights(clean.get_weights())
        return D.train_ewe(m, xtr, ytr, x_wm, target, epochs=3, batch_size=64, snnl_weight=kappa,
                           temperature=temp, seed=0)

    ewe, plain = watermarked(1.0), watermarked(0.0)

    chance = 1 / 10
    s_clean = D.watermark_success(clean, x_wm_test, target)
    s_ewe = D.watermark_success(ewe, x_wm_test, target)
    assert s_ewe > 5 * chance and s_ewe > s_clean + 0.4
    # the watermark costs little accuracy on natural test digits
    acc = lambda m: np.mean(models.predict_labels(m, xte) == yte)  # noqa: E731
    assert acc(ewe) > acc(clean) - 0.1

    own = D.ownership_test(ewe, x_wm_test, target, num_classes=10)
    assert own["n"] == len(x_wm_test) and own["successes"] == round(s_ewe * own["n"])
    assert own["p_value"] < 1e-6
    assert own["p_value"] == pytest.approx(stats.binomtest(own["successes"], own["n"], 0.1, "greater").pvalue)
    assert D.ownership_test(clean, x_wm_test, target, num_classes=10)["p_value"] > 0.01
    sub = D.ownership_test(ewe, x_wm_test, target, 10, n_trials=10, base_rate=0.2)
    assert sub["n"] == 10 and sub["base_rate"] == 0.2

    # the SNNL term entangles watermark and target-class representations (held-out samples)
    x_t = xte[yte == target]
    assert _feature_snnl(ewe, x_wm_test, x_t, temp) > _feature_snnl(plain, x_wm_test, x_t, temp) + 0.05
    assert _feature_snnl(plain, x_wm_test, x_t, temp) >= _feature_snnl(clean, x_wm_test, x_t, temp)


def test_ewe_input_validation(tiny_model, rng):
    x = rng.random((40, 32, 32, 3), dtype=np.float32)
    y = np.repeat(np.arange(10), 4).astype(np.int64)
    kw = dict(epochs=1, batch_size=8, seed=0)
    with pytest.raises(ValueError, match="target_class"):
        D.train_ewe(tiny_model, x, y, x[:4], 10, **kw)
    with pytest.raises(ValueError, match=">= 2 training samples"):
        D.train_ewe(tiny_model, x, np.where(y == 3, 4, y), x[:4], 3, **kw)
    with pytest.raises(ValueError, match="ratio"):
        D.train_ewe(tiny_model, x, y, x[:4], 3, ratio=6, **kw)
    with pytest.raises(ValueError, match="at least one"):
        D.ownership_test(tiny_model, x[:0], 3, 10)
    with pytest.raises(ValueError, match="n_trials"):
        D.ownership_test(tiny_model, x[:4], 3, 10, n_trials=5)
    with pytest.raises(ValueError, match="base_rate"):
        D.ownership_test(tiny_model, x[:4], 3, 10, base_rate=1.0)


def test_ewe_options_smoke(rng):
    """Pre-training, several SNNL layers, the Euclidean metric and ratio > 1 all run and train."""
    x = rng.random((48, 32, 32, 3), dtype=np.float32)
    y = np.repeat(np.arange(3), 16).astype(np.int64)
    m = models.build("cnn-tiny", num_classes=3, seed=0)
    before = [w.copy() for w in m.get_weights()]
    out = D.train_ewe(m, x, y, D.make_watermark_trigger(x[:16], 4), 2, epochs=1, batch_size=8, seed=0,
                      pretrain_epochs=1, ratio=2, layers=["conv2", "fc1"], metric="euclidean",
                      temperature=10.0, progress=True)
    assert out is m
    assert all(np.isfinite(w).all() for w in m.get_weights())
    assert any(not np.array_equal(a, b) for a, b in zip(before, m.get_weights()))


# ----------------------------------------------------------------------------------------------
# evaluation helpers (notebook 06)
# ----------------------------------------------------------------------------------------------


def test_prada_scan_flag_index_matches_a_detector_at_that_delta():
    rng = np.random.default_rng(3)
    label = _labeler(3)
    x = np.concatenate([_benign(250, rng), _attack(300, rng)])
    scan = DX.prada_scan(x, label(x), delta=0.5)
    assert scan["n_queries"] == 550 and scan["min_w"] == min(w for _, w in scan["w_history"])
    det = D.PradaDetector()
    det.observe(x, label(x))
    assert scan["distances"] == det.distances and len(scan["distances"]) == 550 - len(det.growing_set_sizes)
    for delta in (0.5, 0.8, 0.9, 0.95):
        det = D.PradaDetector(delta=delta)
        det.observe(x, label(x))
        assert DX.prada_flag_index(scan["w_history"], delta) == det.flagged_at


def test_prada_rates_and_calibration_separate_attack_from_benign():
    rng = np.random.default_rng(4)
    label = _labeler(4)
    pool = _benign(600, rng)
    benign = DX.prada_benign_clients(pool, label(pool), n_clients=6, client_size=300, seed=0)
    assert len(benign) == 6 and all(s["n_queries"] == 300 for s in benign)
    attacks = {f"a{i}": DX.prada_scan(xa, label(xa)) for i, xa in enumerate(_attack(400, rng) for _ in range(3))}
    delta = DX.calibrate_prada_delta(benign)
    assert delta == min(s["min_w"] for s in benign)
    rows = DX.prada_rates(attacks, benign, [0.0, delta, 1.0])
    assert rows[0]["detection_rate"] == 0.0 and rows[0]["fpr"] == 0.0
    assert rows[1]["fpr"] == 0.0 and rows[1]["detection_rate"] == 1.0  # calibrated: no benign alarm
    assert all(0 < v <= 400 for v in rows[1]["flagged_at"].values())
    assert rows[2]["fpr"] == 1.0
    with pytest.raises(ValueError, match="at most 600"):
        DX.prada_benign_clients(pool, label(pool), n_clients=1, client_size=601, seed=0)


def test_replay_copy_and_admis_tradeoff_extremes(tiny_model, rng):
    x, y = _digits32()
    mis = models.build("cnn-tiny", seed=1)
    attacks = {"a": (x[:60], x[60:80])}
    rows = DX.admis_tradeoff(tiny_model, mis, x[100:200], y[100:200], attacks, [0.0, 1.0], substitute="cnn-tiny",
                            epochs=1, nu=1e4)
    truth = models.predict_labels(tiny_model, x[100:200])
    assert rows[0]["defender_accuracy"] == pytest.approx(np.mean(truth == y[100:200]))
    assert rows[0]["misinformed_queries"] == 0.0 and rows[1]["misinformed_queries"] == 1.0
    mis_acc = np.mean(models.predict_labels(mis, x[100:200]) == y[100:200])
    assert rows[1]["defender_accuracy"] == pytest.approx(mis_acc)  # tau = 1: the misinformation model answers
    c1 = DX.replay_copy(lambda z: models.predict_labels(tiny_model, z), x[:60], x[60:80], substitute="cnn-tiny",
                       num_classes=10, epochs=2, patience=1, seed=5)
    c2 = DX.replay_copy(lambda z: models.predict_labels(tiny_model, z), x[:60], x[60:80], substitute="cnn-tiny",
                       num_classes=10, epochs=2, patience=1, seed=5)
    np.testing.assert_array_equal(models.predict_labels(c1, x[100:150]), models.predict_labels(c2, x[100:150]))


def test_replay_cache_trains_once_per_labelled_query_set(tiny_model, monkeypatch):
    x, y = _digits32()
    secret = lambda z: models.predict_labels(tiny_model, z)  # noqa: E731
    flipped = lambda z: (secret(z) + 1) % 10  # noqa: E731
    trained = []
    real_fit = DX._fit_copy
    monkeypatch.setattr(DX, "_fit_copy", lambda *a, **k: trained.append(a[1].copy()) or real_fit(*a, **k))
    cache = DX.ReplayCache()
    kw = dict(substitute="cnn-tiny", num_classes=10, epochs=1, seed=5)
    c1 = cache(secret, x[:60], x[60:80], **kw)
    assert cache(secret, x[:60].copy(), x[60:80].copy(), **kw) is c1  # same queries, same answers: reused
    assert (cache.hits, cache.misses) == (1, 1)
    # anything that changes the training data or settings trains a new copy
    c2 = cache(flipped, x[:60], x[60:80], **kw)  # other labels: trained, returned, not kept
    assert c2 is not c1 and cache(flipped, x[:60], x[60:80], **kw) is not c2
    assert cache(secret, x[:60], x[60:80], **kw) is c1  # the first copy of a query set stays
    assert cache(secret, x[1:61], x[60:80], **kw) is not c1  # other queries
    assert cache(secret, x[:60], None, **kw) is not c1  # no validation split
    assert cache(secret, x[:60], x[60:80], **{**kw, "seed": 6}) is not c1
    assert (cache.hits, cache.misses) == (2, 6) and len(trained) == 6
    np.testing.assert_array_equal(trained[1], (trained[0] + 1) % 10)
    # ADMIS at tau = 0 misinforms no query, so its copies are the undefended ones
    mis = models.build("cnn-tiny", seed=1)
    DX.admis_tradeoff(tiny_model, mis, x[100:200], y[100:200], {"a": (x[:60], x[60:80])}, [0.0], substitute="cnn-tiny",
                     epochs=1, seed=5, replay=cache)
    assert (cache.hits, cache.misses) == (3, 6)
    with pytest.raises(ValueError, match="x_train"):
        cache(secret, x[:60] * 2, None, **kw)


def _patch_model(target, constant=False):
    """Logits from the mean of the bottom-right 4x4 patch: target class when it is white (the
    trigger), class 0 otherwise; ``constant`` predicts the target for everything."""
    inp = keras.Input((32, 32, 3))
    feat = keras.layers.Lambda(lambda t: keras.ops.mean(t[:, -4:, -4:, :], axis=(1, 2, 3), keepdims=False)[:, None])(inp)
    out = keras.layers.Dense(10)(feat)
    m = keras.Model(inp, out)
    w = np.zeros((1, 10), np.float32)
    b = np.zeros(10, np.float32)
    if constant:
        b[target] = 1.0
    else:
        w[0, target], b[0] = 10.0, 9.5  # target iff patch mean > 0.95
    m.layers[-1].set_weights([w, b])
    return m


def test_watermark_claim_controls_for_a_collapsed_copy():
    x, y = _digits32()
    src = x[y == 1][:60] * 0.5
    x_wm = D.make_watermark_trigger(src)
    good = DX.watermark_claim(_patch_model(7), x_wm, src, 7, 10)
    assert good["watermark_success"] == 1.0 and good["clean_target_rate"] == 0.0 and good["base_rate"] == 0.1
    assert good["p_value"] == pytest.approx(0.1**60) and good["successes"] == 60
    collapsed = DX.watermark_claim(_patch_model(7, constant=True), x_wm, src, 7, 10)
    assert collapsed["watermark_success"] == 1.0 and collapsed["base_rate"] == 1.0 and collapsed["p_value"] == 1.0
    null = DX.watermark_claim(_patch_model(7), x_wm, src, 7, 10, null_rate=0.5)
    assert null["base_rate"] == 0.5 and null["p_value"] == pytest.approx(0.5**60)


def test_admis_at_tau_0_misinforms_nothing_and_its_copy_agrees_like_the_undefended_copy(secret_dir):
    """At tau = 0 no query's top probability is below tau: ADMIS answers what the secret answers,
    so the copy trained on its labels is the copy trained on the secret's own labels, with the
    same test agreement with the secret (computed here from a copy stolen without any defence)."""
    from stealnb.core import metrics

    secret, _ = train.load_secret(secret_dir)
    x, y = _digits32()
    x_test, y_test = x[100:300], y[100:300]
    fit_options = dict(epochs=10, batch_size=20)  # the checkpoint on the validation split picks an earlier epoch
    copies = []

    def replay(label_fn, x_train, x_val, **kw):
        copies.append(DX.replay_copy(label_fn, x_train, x_val, **kw))
        return copies[-1]

    rows = DX.admis_tradeoff(secret, models.build("cnn-tiny", seed=1), x_test, y_test, {"a": (x[:80], x[80:100])},
                            [0.0], substitute="cnn-tiny", nu=1e4, seed=5, replay=replay, **fit_options)
    secret_labels = lambda z: models.predict_labels(secret, z)  # noqa: E731
    undefended = DX.replay_copy(secret_labels, x[:80], x[80:100], substitute="cnn-tiny", num_classes=10, seed=5,
                               **fit_options)
    truth, pred = secret_labels(x_test), models.predict_labels(undefended, x_test)
    assert rows[0]["misinformed_queries"] == 0.0
    np.testing.assert_array_equal(models.predict_labels(copies[0], x_test), pred)  # the same copy
    assert rows[0]["copy_agreement"] == metrics.agreement(truth, pred)
    assert rows[0]["copy_accuracy"] == metrics.accuracy(y_test, pred)
    assert rows[0]["defender_accuracy"] == metrics.accuracy(y_test, truth)
    # not degenerate: agreement is with the secret, not the truth, and the copy's recipe shows in it
    assert metrics.agreement(truth, pred) != metrics.accuracy(y_test, pred)
    no_val = DX.replay_copy(secret_labels, x[:80], None, substitute="cnn-tiny", num_classes=10, seed=5, **fit_options)
    assert (models.predict_labels(no_val, x_test) != pred).any()

import numpy as np
import pytest

import reference
from stealnb.attacks import evasion
from stealnb.core import metrics


def test_agreement_is_eq_4_3_2():
    a = np.array([0, 1, 2, 3, 4], np.int64)
    b = np.array([0, 1, 0, 3, 0], np.int64)
    assert metrics.agreement(a, b) == pytest.approx(3 / 5)


def test_macro_f1_hand_computed():
    y = np.array([0, 0, 1, 1], np.int64)
    p = np.array([0, 1, 1, 1], np.int64)
    # class 0: P=1, R=1/2 -> F1=2/3 ; class 1: P=2/3, R=1 -> F1=4/5
    assert metrics.macro_f1(y, p) == pytest.approx((2 / 3 + 4 / 5) / 2)
    # A third class in neither vector counts as 0 when num_classes says it exists.
    assert metrics.macro_f1(y, p, num_classes=3) == pytest.approx((2 / 3 + 4 / 5) / 3)


def test_relative_f1():
    assert metrics.relative_f1(0.45, 0.9) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="positive"):
        metrics.relative_f1(0.5, 0.0)


def test_transfer_metrics_two_definitions():
    y = np.array([0, 0, 0, 0, 0, 0], np.int64)
    sub = np.array([1, 1, 1, 1, 0, 0], np.int64)  # fools the substitute on 4 samples
    sec = np.array([1, 1, 0, 0, 0, 2], np.int64)  # of those 4, 2 fool the secret; 3/6 overall
    out = metrics.transfer_metrics(y, sub, sec)
    assert out["transfer_rate"] == pytest.approx(2 / 4)
    assert out["secret_error_under_transfer"] == pytest.approx(3 / 6)
    assert out["fooled_substitute"] == 4
    none = metrics.transfer_metrics(y, y.copy(), sec)
    assert none["transfer_rate"] is None


def test_confusion_matrix_rows_are_true_class():
    cm = metrics.confusion_matrix(np.array([0, 1, 1]), np.array([1, 1, 0]), 3)
    assert cm.tolist() == [[0, 1, 0], [1, 1, 0], [0, 0, 0]]


def test_bad_inputs():
    with pytest.raises(ValueError, match="expected 3 labels"):
        metrics.agreement(np.array([0, 1, 2]), np.array([0, 1]))
    with pytest.raises(TypeError, match="integer"):
        metrics.accuracy(np.array([0.0, 1.0]), np.array([0, 1]))
    with pytest.raises(ValueError, match="empty"):
        metrics.agreement(np.array([], np.int64), np.array([], np.int64))


def test_adv_agreement_is_the_thesis_7_2_measure():
    """Thesis §7.2: among FGSM examples that fool the substitute, the share where the secret gives
    the substitute's label -- not merely *a* wrong label."""
    y = np.array([0, 0, 0, 0, 0, 0], np.int64)
    sub = np.array([1, 2, 3, 1, 0, 0], np.int64)  # 4 fool the substitute
    sec = np.array([1, 2, 1, 0, 4, 0], np.int64)  # same label on 2 of them; wrong on 3 of them
    out = metrics.transfer_metrics(y, sub, sec)
    assert out["adv_agreement"] == pytest.approx(2 / 4)
    assert out["transfer_rate"] == pytest.approx(3 / 4)  # secret wrong, whatever label
    assert out["secret_error_under_transfer"] == pytest.approx(4 / 6)
    assert metrics.transfer_metrics(y, y.copy(), sec)["adv_agreement"] is None


def test_collapse_measures_the_largest_predicted_class():
    assert metrics.collapse(np.array([3, 3, 3, 1], np.int64), 10) == {"top_class_share": 0.75, "classes_predicted": 2}
    assert metrics.collapse(np.full(5, 7, np.int64), 10)["top_class_share"] == 1.0
    with pytest.raises(ValueError, match="labels must be < 10"):
        metrics.collapse(np.array([12], np.int64), 10)


def test_label_entropy_is_zero_for_one_class_and_log2_c_for_a_uniform_draw():
    assert metrics.label_entropy(np.array([3, 3, 3], np.int64), 10) == 0.0
    assert metrics.label_entropy(np.array([0, 1, 2, 3] * 5, np.int64), 4) == pytest.approx(2.0)
    # 3/4 and 1/4: -(0.75 log2 0.75 + 0.25 log2 0.25)
    assert metrics.label_entropy(np.array([0, 0, 0, 1], np.int64), 10) == pytest.approx(0.811278, abs=1e-6)
    with pytest.raises(ValueError, match="at least one"):
        metrics.label_entropy(np.zeros(0, np.int64), 10)


def test_cross_entropy_matches_a_hand_computation():
    logits = np.array([[2.0, 0.0], [0.0, 1.0]])
    y = np.array([0, 0], np.int64)
    expected = -(np.log(np.exp(2) / (np.exp(2) + 1)) + np.log(1 / (1 + np.e))) / 2
    assert metrics.cross_entropy(y, logits) == pytest.approx(expected)


# -- transferability: FGSM on the substitute, measured on the secret ---------------------------------
def _linear(w):
    """Flatten -> Dense logits with weights ``w`` (3072 x C), biases centring the logits on 0.5-grey images."""
    import keras

    inp = keras.Input((32, 32, 3))
    dense = keras.layers.Dense(w.shape[1])
    model = keras.Model(inp, dense(keras.layers.Flatten()(inp)))
    dense.set_weights([w.astype(np.float32), (-0.5 * w.sum(0)).astype(np.float32)])
    return model


@pytest.fixture(scope="module")
def linear_pair():
    """A linear secret, a rough linear copy of it and 'true' labels that both models get partly wrong."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.02, (32 * 32 * 3, 10))
    secret, substitute = _linear(w), _linear(w + rng.normal(0, 0.01, w.shape))
    x = (0.5 + rng.uniform(-0.25, 0.25, (120, 32, 32, 3))).astype(np.float32)
    y = reference.labels(secret, x)
    wrong = rng.random(len(y)) < 0.3
    y[wrong] = rng.integers(0, 10, wrong.sum())
    return secret, substitute, x, y.astype(np.int64)


@pytest.mark.parametrize("eps", [0.001, 0.002])
def test_transferability_is_fgsm_crafted_on_the_substitute_with_true_labels_and_measured_on_the_secret(linear_pair, eps):
    secret, substitute, x, y = linear_pair
    got = evasion.transferability(secret, substitute, x, y, eps=eps)
    want = reference.transferability(secret, substitute, x, y, eps)
    assert got == want
    # the case is not degenerate: the models, the labels and eps each change the answer
    assert 0 < want["fooled_substitute"] < len(y) and 0 < want["adv_agreement"] < 1
    assert reference.transferability(substitute, secret, x, y, eps) != want
    assert reference.transferability(secret, substitute, x, reference.labels(substitute, x), eps) != want
    assert reference.transferability(secret, substitute, x, y, 2 * eps) != want

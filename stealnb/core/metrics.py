"""Extraction metrics as pure functions (thesis 000 §4.3, eq. 4.3.2; thesis 002 §4 relative F1)."""
from __future__ import annotations

import numpy as np

from ._checks import check_labels

# scikit-learn (about a second to import) is imported in the two functions that use it: the
# command line reaches this module through the strategy registry (stealnb.extraction.selectors) just to
# print its help.


def _pair(a, b, names=("a", "b")):
    check_labels(a, names[0])
    check_labels(b, names[1], n=len(a))
    if len(a) == 0:
        raise ValueError(f"{names[0]}: expected at least one label, got an empty array")
    return a, b


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (max-shifted, so large logits do not overflow)."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def cross_entropy(y_true: np.ndarray, logits: np.ndarray) -> float:
    """Mean categorical cross-entropy (nats) of int labels under softmax(``logits``)."""
    check_labels(y_true, "y_true", n=len(logits), num_classes=np.shape(logits)[1])
    return float(-np.mean(log_softmax(logits)[np.arange(len(y_true)), y_true]))


def agreement(secret_labels: np.ndarray, substitute_labels: np.ndarray) -> float:
    """Fraction of test samples on which secret and substitute predict the same label
    (thesis 000 eq. 4.3.2; ActiveThief's agreement). In [0, 1]."""
    a, b = _pair(secret_labels, substitute_labels, ("secret_labels", "substitute_labels"))
    return float(np.mean(a == b))


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of correct predictions. In [0, 1]."""
    a, b = _pair(y_true, y_pred, ("y_true", "y_pred"))
    return float(np.mean(a == b))


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int | None = None) -> float:
    """Macro-averaged F1 over ``num_classes`` classes (thesis 002 §4: the Copycat metric).
    A class absent from both ``y_true`` and ``y_pred`` contributes 0, as in scikit-learn."""
    a, b = _pair(y_true, y_pred, ("y_true", "y_pred"))
    from sklearn.metrics import f1_score

    labels = np.arange(num_classes) if num_classes else None
    return float(f1_score(a, b, labels=labels, average="macro", zero_division=0))


COLLAPSE_SHARE = 0.6  # a top_class_share above this is reported as a collapsed substitute


def collapse(predicted_labels: np.ndarray, num_classes: int) -> dict:
    """How near a model is to a constant predictor on a test set: ``top_class_share``, the share
    of samples in its most frequent predicted class (1.0 = constant), and ``classes_predicted``,
    how many of the ``num_classes`` classes it predicts at all."""
    check_labels(predicted_labels, "predicted_labels", num_classes=num_classes)
    if len(predicted_labels) == 0:
        raise ValueError("predicted_labels: expected at least one label, got an empty array")
    counts = np.bincount(predicted_labels, minlength=num_classes)
    return {"top_class_share": float(counts.max() / counts.sum()), "classes_predicted": int((counts > 0).sum())}


def label_entropy(labels: np.ndarray, num_classes: int) -> float:
    """Shannon entropy in bits of the class distribution of ``labels`` (0 = one class only;
    log2(num_classes) = uniform): how evenly a thief pool covers the secret's classes."""
    check_labels(labels, "labels", num_classes=num_classes)
    if len(labels) == 0:
        raise ValueError("labels: expected at least one label, got an empty array")
    p = np.bincount(labels, minlength=num_classes) / len(labels)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum()) + 0.0


def mean_ci95(values) -> tuple[float, float]:
    """Mean and the half-width of its two-sided 95% confidence interval, Student's t with n-1
    degrees of freedom (seeds as independent repetitions); half-width NaN for fewer than 2 values."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None and not np.isnan(x)], np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    if len(v) < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))


def paired_difference(a, b) -> dict:
    """``a - b`` over paired runs (same seed: same seed set and validation split): ``n``,
    ``mean``, 95% CI ``low``/``high`` (Student's t) and the two-sided paired t-test ``p_value``
    (NaN with fewer than 2 pairs; 1.0 when every difference is 0). ``significant``: p < 0.05."""
    from scipy import stats

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"a, b: expected two 1-D arrays of paired values, got shapes {a.shape} and {b.shape}")
    d = a - b
    mean, half = mean_ci95(d)
    if len(d) < 2:
        p = float("nan")
    elif np.allclose(d, d[0]):
        p = 1.0 if d[0] == 0 else 0.0
    else:
        p = float(stats.ttest_rel(a, b).pvalue)
    return {"n": int(len(d)), "mean": mean, "low": mean - half, "high": mean + half, "p_value": p,
            "significant": bool(p < 0.05)}


def relative_f1(copy_f1: float, oracle_f1: float) -> float:
    """Copycat F1 divided by the oracle's F1 on the same test set (thesis 002 §4, 'relative F1')."""
    if not oracle_f1 > 0:
        raise ValueError(f"oracle_f1: expected a positive F1 score, got {oracle_f1!r}")
    return float(copy_f1) / float(oracle_f1)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``num_classes × num_classes`` counts, rows = true class, columns = predicted class."""
    a, b = _pair(y_true, y_pred, ("y_true", "y_pred"))
    from sklearn import metrics as sk_metrics

    return sk_metrics.confusion_matrix(a, b, labels=np.arange(num_classes))


def transfer_metrics(y_true, substitute_adv_labels, secret_adv_labels) -> dict:
    """Transferability of adversarial examples crafted on the substitute (thesis 000 §4.3, §7.2).

    Three numbers, named for what they are; "fooled" means the substitute's label of the
    adversarial example differs from the true label:

    * ``adv_agreement`` (**thesis §7.2, Tables 9-11**): among the examples that fool the
      substitute, the fraction on which the secret gives *the same label as the substitute*;
    * ``transfer_rate``: among the examples that fool the substitute, the fraction that also
      fool the secret (secret label != true label; ActiveThief's transferability);
    * ``secret_error_under_transfer``: the fraction of *all* perturbed test samples that the
      secret misclassifies (the thesis' wording in §4.3).

    ``fooled_substitute`` is the count the first two are computed over (both ``None`` if zero).
    """
    y, sub = _pair(y_true, substitute_adv_labels, ("y_true", "substitute_adv_labels"))
    check_labels(secret_adv_labels, "secret_adv_labels", n=len(y))
    fooled_sub = sub != y
    fooled_sec = secret_adv_labels != y
    n_fooled = int(fooled_sub.sum())
    return {
        "adv_agreement": float(np.mean(secret_adv_labels[fooled_sub] == sub[fooled_sub])) if n_fooled else None,
        "transfer_rate": float(np.mean(fooled_sec[fooled_sub])) if n_fooled else None,
        "secret_error_under_transfer": float(np.mean(fooled_sec)),
        "fooled_substitute": n_fooled,
        "n": int(len(y)),
    }

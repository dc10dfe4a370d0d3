"""Soft-label output perturbations: rounding, top-k and the reverse sigmoid (Tramèr et al. 2016;
Orekondy et al. 2019; Lee et al. 2019), each registered as a defence."""
from __future__ import annotations

import inspect

import numpy as np

from ..core._checks import check_positive_int, check_real
from ..core.defense_seam import Defense
from .base import DEFENSES, check_probs


# ----------------------------------------------------------------------------------------------
# Output perturbations for soft-label APIs
# ----------------------------------------------------------------------------------------------


def round_probs(p: np.ndarray, decimals: int = 2) -> np.ndarray:
    """Round confidences to ``decimals`` places (Tramèr et al. 2016, "rounding confidences"
    countermeasure).

    Returned as rounded, *not* renormalised (what an API would send): rows sum to 1 only within
    ``C * 0.5 * 10**-decimals``. Rounding is monotone, so the original top-1 class stays among the
    row's maxima; it can only tie (e.g. 0.504 and 0.496 both become 0.5).
    """
    check_probs(p, "p")
    if isinstance(decimals, bool) or not isinstance(decimals, (int, np.integer)) or decimals < 0:
        raise ValueError(f"decimals: expected an integer >= 0, got {decimals!r}")
    return np.round(p, int(decimals))


def top_k_probs(p: np.ndarray, k: int = 1, renormalize: bool = True) -> np.ndarray:
    """Keep the ``k`` largest probabilities of each row and zero the rest (the top-k output of
    commercial APIs; Tramèr et al. 2016, Orekondy et al. 2019). With ``renormalize`` the
    kept values are divided by their sum, so rows are probability vectors (``k=1`` gives one-hot
    hard labels); without, they are returned as they were. Ties at the k-th place are broken by
    the lower class index, so the top-1 class (``argmax``) is always kept and stays top-1."""
    check_probs(p, "p")
    k = check_positive_int(k, "k")
    if k > p.shape[1]:
        raise ValueError(f"k: expected at most {p.shape[1]} (the number of classes), got {k}")
    idx = np.argsort(-p, axis=1, kind="stable")[:, :k]
    out = np.zeros_like(p)
    rows = np.arange(len(p))[:, None]
    out[rows, idx] = p[rows, idx]
    if renormalize:
        s = out.sum(axis=1, keepdims=True)
        if len(p) and s.min() <= 0:
            raise ValueError(f"p: a row's top-{k} probabilities sum to 0; cannot renormalise")
        out = out / s
    return out


def _reverse_sigmoid_raw(p: np.ndarray, beta: float, gamma: float) -> np.ndarray:
    p = p.astype(np.float64)
    # sigmoid(gamma * logit(p)) written as p^g / (p^g + (1-p)^g): exact at p = 0 and p = 1
    pg, qg = np.power(p, gamma), np.power(1.0 - p, gamma)
    return p - beta * (pg / (pg + qg) - 0.5)


def reverse_sigmoid(
    p: np.ndarray, beta: float = 0.5, gamma: float = 1.5, clip_negative: bool = False
) -> np.ndarray:
    """Reverse-sigmoid perturbation (Lee et al. 2019, "Defending against NN model stealing attacks
    using deceptive perturbations", IEEE S&P Workshops, eq. 3-4):
    ``y' = alpha * (y - beta * (sigmoid(gamma * logit(y)) - 1/2))`` with ``alpha`` normalising
    each row to sum 1.

    The perturbation is meant to leave the top-1 label intact (Orekondy et al.'s reimplementation
    marks it top-1 preserving). That holds whenever ``g(y) = y - beta * (sigmoid(gamma *
    logit(y)) - 1/2)`` is increasing on [0, 1]: ``g'(y) = 1 - beta * gamma * s'(gamma z) / s'(z)``
    (``z = logit y``) and the ratio is at most 1 for ``gamma >= 1``, so ``gamma >= 1`` with
    ``beta * gamma < 1`` keeps the whole ranking (:func:`reverse_sigmoid_preserves_ranking`;
    the defaults 0.5/1.5 are such a setting, not values from the paper; ``beta = gamma = 1``
    makes ``g`` constant and every output uniform). Otherwise the top-1 can change:
    ``beta * gamma > 1`` reverses the order around y = 1/2 (0.52 vs 0.46), and ``gamma < 1``
    lifts tiny probabilities -- with IBM ART's defaults ``beta = 1, gamma = 0.1``, ``g(1e-10)
    = 0.41 > g(0.35) = 0.37``, so a class with probability ~0 overtakes a 0.35 top-1.

    For ``beta <= 1`` every entry stays non-negative. Larger ``beta`` can push entries below 0;
    that raises ``ValueError`` unless ``clip_negative=True``, which sets them to 0 before
    normalising (as ART's ``ReverseSigmoid`` does).
    """
    check_probs(p, "p")
    beta = check_real(beta, "beta", 0.0, lo_open=True)
    gamma = check_real(gamma, "gamma", 0.0, lo_open=True)
    raw = _reverse_sigmoid_raw(p, beta, gamma)
    if len(raw) and raw.min() < 0:
        if not clip_negative:
            raise ValueError(
                f"reverse_sigmoid: beta={beta} makes some perturbed values negative "
                f"(min {raw.min():.4g}); use beta <= 1 or clip_negative=True"
            )
        raw = np.maximum(raw, 0.0)
    s = raw.sum(axis=1, keepdims=True)
    if len(raw) and s.min() <= 0:
        raise ValueError("reverse_sigmoid: a perturbed row sums to 0; cannot normalise")
    return (raw / s).astype(p.dtype)


def reverse_sigmoid_preserves_ranking(beta: float, gamma: float) -> bool:
    """True when ``beta``/``gamma`` satisfy the sufficient condition ``gamma >= 1`` and
    ``beta * gamma < 1`` under which :func:`reverse_sigmoid` keeps every row's ranking."""
    return float(gamma) >= 1.0 and float(beta) * float(gamma) < 1.0


class OutputPerturbation(Defense):
    """A soft-label output perturbation (a pure function of the probabilities) as a defence at the
    oracle; the registered subclasses name the function (``round``, ``top_k``, ``reverse_sigmoid``)."""

    outputs = ("topk", "probs")
    function = staticmethod(round_probs)

    def __init__(self, **options):
        try:
            inspect.signature(self.function).bind(None, **options)
        except TypeError as e:
            raise TypeError(f"{e}; options of {self.name}: "
                            f"{', '.join(list(inspect.signature(self.function).parameters)[1:])}") from None
        self.perturbation_options = options

    def check(self, *, output: str, num_classes: int) -> None:
        super().check(output=output, num_classes=num_classes)
        self.function(np.full((1, num_classes), 1.0 / num_classes), **self.perturbation_options)  # validates

    def options(self) -> dict:
        return dict(self.perturbation_options)

    def answer(self, x: np.ndarray, probs: np.ndarray, *, client=None) -> np.ndarray:
        return self.function(probs, **self.perturbation_options)


def _register_perturbation(name: str, function) -> None:
    doc = f"Output perturbation :func:`{function.__name__}` at the oracle. " + (function.__doc__ or "")
    cls = type(f"Perturbation_{name}", (OutputPerturbation,),
               {"name": name, "function": staticmethod(function), "__doc__": doc, "__module__": __name__})
    DEFENSES.register(name)(cls)


for _name, _fn in (("round", round_probs), ("top_k", top_k_probs), ("reverse_sigmoid", reverse_sigmoid)):
    _register_perturbation(_name, _fn)

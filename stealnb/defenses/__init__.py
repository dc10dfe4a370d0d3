"""Defences against model extraction (thesis 002 §3.2 and §5.7), independent of any transport: one
module per defence, each registering itself in :data:`stealnb.defenses.base.DEFENSES`.

Everything here is a pure function on numpy arrays or a small stateful class, so the same
objects plug into an in-process oracle and an HTTP server alike. The modules:

* :mod:`~stealnb.defenses.base` -- the registry :data:`DEFENSES`, the spec syntax
  (:func:`parse_defense`, :func:`parse_defenses`) and the checks the defences share;
* one module per defence, each registering itself: :mod:`~stealnb.defenses.prada`,
  :mod:`~stealnb.defenses.admis`, :mod:`~stealnb.defenses.perturbation`, :mod:`~stealnb.defenses.ewe`.

Their public names are the package's (``stealnb.defenses.PradaDetector``), imported below:
importing the package registers every defence.

* :class:`PradaDetector` -- query-stream detection with the Shapiro-Wilk test on minimum
  distances (Juuti et al. 2019, "PRADA: Protecting against DNN model stealing attacks", EuroS&P;
  thesis 002 §5.7.2).
* :func:`adaptive_misinformation` / :class:`AdaptiveMisinformation` (the defence) -- mix in a misinformation
  model's output for out-of-distribution queries (Kariyappa & Qureshi 2020, "Defending against
  model stealing attacks with Adaptive Misinformation", CVPR; thesis 002 §5.7.1, "ADMIS").
* :func:`round_probs`, :func:`top_k_probs`, :func:`reverse_sigmoid` -- soft-label output
  perturbations (Tramèr et al. 2016; Orekondy et al. 2019; Lee et al. 2019).
* EWE: :func:`make_watermark_trigger`, :func:`snnl`, :func:`train_ewe`,
  :func:`watermark_success`, :func:`ownership_test` (Jia et al. 2021, "Entangled watermarks as a
  defense against model extraction", USENIX Security; Frosst et al. 2019 for the SNNL;
  thesis 002 §5.7.3).
"""
from .base import check_probs, DEFENSES, parse_defense, parse_defenses
from .prada import Prada, prada_statistic, PradaDetector
from .admis import (adaptive_misinformation, AdaptiveMisinformation, misinformation_alpha,
                    misinformation_loss, train_misinformation_model)
from .perturbation import (OutputPerturbation, reverse_sigmoid, reverse_sigmoid_preserves_ranking,
                           round_probs, top_k_probs)
from .ewe import make_watermark_trigger, ownership_test, snnl, train_ewe, watermark_success

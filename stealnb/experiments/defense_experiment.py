"""The defences chapter as one function: :func:`run_defenses` runs PRADA, Adaptive Misinformation
and EWE against the extraction attacks (thesis 002 §5.7, §6.2) and writes ``prada.json``,
``admis.json`` and ``ewe.json`` under :func:`stealnb.core.layout.defenses_dir` from the objects it ran;
notebook 06 calls it, then narrates and plots. Its settings are the profile's ``defenses`` section
(:class:`stealnb.core.profiles.DefenseSettings`). Below it, the evaluation protocol: PRADA scans and
rates, static replay of an attack's queries through a defended oracle, ADMIS's trade-off and
watermark ownership claims. The defences themselves are in :mod:`stealnb.defenses`.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from ..core import data, layout, metrics, models
from ..extraction import copycat, loop
from ..serve import server
from ..core._checks import as_rng, check_images, check_labels, check_positive_int, check_real
from ..defenses import (AdaptiveMisinformation, PradaDetector, make_watermark_trigger, misinformation_alpha,
                       ownership_test, parse_defense, train_ewe, train_misinformation_model, watermark_success)
from ..attacks.jbda import jbda_queries
from ..core.layout import write_json
from ..core.models import softmax
from ..extraction.oracle import HttpOracle, OracleHTTPError, distinct
from ..core.profiles import Profile, check_profile
from ..core.train import ensure_secret, fit

# ----------------------------------------------------------------------------------------------
# Evaluation helpers: PRADA scans and rates, static replay, ADMIS trade-off, watermark claims
# ----------------------------------------------------------------------------------------------


def prada_scan(x: np.ndarray, predicted_labels: np.ndarray, **detector_kw) -> dict:
    """Run one :class:`PradaDetector` over the query stream ``x`` (in query order) with the
    model's ``predicted_labels``; returns ``flagged_at`` (1-based, ``None`` if never),
    ``n_queries``, ``min_w`` (lowest W of any test, ``None`` if never tested), ``w_history``
    (``[(query index, W), ...]``), from which :func:`prada_flag_index` reads the alarm for any
    other threshold ``delta`` without re-running the detector, and ``distances`` (the final
    minimum-distance set D, before the outlier removal that precedes each W)."""
    det = PradaDetector(**detector_kw)
    det.observe(x, predicted_labels)
    ws = [w for _, w in det.w_history]
    return {"flagged_at": det.flagged_at, "n_queries": det.n_queries, "min_w": min(ws) if ws else None,
            "w_history": [(int(q), float(w)) for q, w in det.w_history], "delta": det.delta,
            "distances": [float(d) for d in det.distances]}


def prada_flag_index(w_history, delta: float) -> int | None:
    """First query index whose W is below ``delta`` in a :func:`prada_scan` history (PRADA's alarm
    at threshold ``delta``, same tests), or ``None``."""
    delta = check_real(delta, "delta", 0.0, 1.0)
    return next((int(q) for q, w in w_history if w < delta), None)


def prada_benign_clients(x: np.ndarray, predicted_labels: np.ndarray, *, n_clients: int, client_size: int,
                         seed, **detector_kw) -> list[dict]:
    """:func:`prada_scan` of ``n_clients`` simulated benign clients, each sending ``client_size``
    distinct samples of ``x`` (e.g. the test set) in random order (seeded; clients may share
    samples with each other, never within one stream)."""
    check_positive_int(n_clients, "n_clients")
    client_size = check_positive_int(client_size, "client_size", minimum=3)
    check_labels(predicted_labels, "predicted_labels", n=len(x))
    if client_size > len(x):
        raise ValueError(f"client_size: expected at most {len(x)} (the benign samples given), got {client_size}")
    rng = as_rng(seed)
    out = []
    for _ in range(n_clients):
        idx = rng.permutation(len(x))[:client_size]
        out.append(prada_scan(x[idx], predicted_labels[idx], **detector_kw))
    return out


def prada_rates(attack_scans: dict, benign_scans: list, deltas) -> list[dict]:
    """Detection and false-positive rates over thresholds (thesis 002 §6.2.2, "false positive and
    detection rates for statistical test value"). For each ``delta``: ``detection_rate`` = share of
    attack streams flagged before their last query, ``fpr`` = share of benign clients flagged,
    and ``flagged_at`` per attack (``None`` = not flagged)."""
    rows = []
    for d in deltas:
        at = {name: prada_flag_index(s["w_history"], d) for name, s in attack_scans.items()}
        fp = [prada_flag_index(s["w_history"], d) is not None for s in benign_scans]
        rows.append({"delta": float(d), "detection_rate": float(np.mean([v is not None for v in at.values()])) if at else None,
                     "fpr": float(np.mean(fp)) if fp else None, "flagged_at": at})
    return rows


def calibrate_prada_delta(benign_scans: list, margin: float = 0.0) -> float:
    """The largest threshold at which none of the (calibration) benign clients is flagged: the
    lowest W any of them reached, minus ``margin`` (Juuti et al. 2019 set delta from benign data
    the same way, to a target false-positive rate of zero on it)."""
    ws = [s["min_w"] for s in benign_scans if s["min_w"] is not None]
    if not ws:
        raise ValueError("benign_scans: no client was ever tested (streams shorter than min_queries)")
    return float(max(min(ws) - check_real(margin, "margin", 0.0), 0.0))


def replay_copy(label_fn, x_train: np.ndarray, x_val: np.ndarray | None, *, substitute: str, num_classes: int,
                seed: int = 0, **fit_options):
    """A stolen copy trained on an attack's queries labelled by ``label_fn`` (e.g. a defended
    oracle), the way the attack trains its final substitute: a fresh ``substitute`` on
    ``x_train`` with early stopping on ``x_val`` (also labelled by ``label_fn``; ``None``: fixed
    epochs); ``fit_options``: the training recipe, :func:`stealnb.core.train.fit`'s keyword arguments
    (e.g. ``**profile.substitute_fit()``). "Static replay": the queries are those the attack chose against the undefended
    oracle -- exact for label-independent selection (random, Copycat), an approximation for
    active learning (its later selections would depend on the defended labels)."""
    x_val, y, y_val = _replay_labels(label_fn, x_train, x_val)
    return _fit_copy(x_train, y, x_val, y_val, substitute=substitute, num_classes=num_classes, seed=seed,
                     **fit_options)


def _replay_labels(label_fn, x_train: np.ndarray, x_val: np.ndarray | None):
    """``(x_val, y, y_val)``: the labels ``label_fn`` gives the training and validation queries;
    an empty validation split becomes ``None``."""
    check_images(x_train, "x_train")
    if x_val is not None and not len(x_val):
        x_val = None
    y = np.asarray(label_fn(x_train), np.int64)
    return x_val, y, None if x_val is None else np.asarray(label_fn(x_val), np.int64)


def _fit_copy(x_train: np.ndarray, y: np.ndarray, x_val: np.ndarray | None, y_val: np.ndarray | None, *,
              substitute: str, num_classes: int, seed: int, **fit_options):
    validation = None if y_val is None else (x_val, y_val)
    if validation is None:
        fit_options = {**fit_options, "patience": None, "monitor": None}
    else:  # as the attack's substitute: the checkpoint with the best validation macro-F1
        fit_options = {"monitor": "macro_f1", **fit_options}
    model = models.build(substitute, num_classes=int(num_classes), seed=int(seed))
    fit(model, x_train, y, validation=validation, seed=int(seed), **fit_options)
    return model


class ReplayCache:
    """:func:`replay_copy` that remembers, for each query set (training and validation queries and
    the training settings), the first copy it trains on it, and returns that copy again when the
    same queries come back with the *same* labels. Two oracles that answer an attack's queries
    identically -- ADMIS at a τ that misinforms no query, and the undefended secret that EWE's null
    copies are stolen from -- then share one copy, which training the same data with the same
    seed would have reproduced anyway. Copies trained on other labels are returned but not kept,
    so the memory held is one copy per query set. Returned models are shared: do not train or
    modify them. ``hits`` and ``misses`` count the calls answered from memory and the copies
    trained."""

    def __init__(self):
        self._first: dict[str, tuple[str, object]] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _digest(arrays, extra=()) -> str:
        h = hashlib.sha256(repr(tuple(extra)).encode())
        for a in arrays:
            a = np.ascontiguousarray(a)
            h.update(repr((a.dtype.str, a.shape)).encode())
            h.update(memoryview(a).cast("B"))
        return h.hexdigest()

    def __call__(self, label_fn, x_train: np.ndarray, x_val: np.ndarray | None, *, substitute: str,
                 num_classes: int, seed: int = 0, **fit_options):
        x_val, y, y_val = _replay_labels(label_fn, x_train, x_val)
        settings = (substitute, int(num_classes), int(seed), x_val is None, sorted(fit_options.items()))
        queries = self._digest([x_train] if x_val is None else [x_train, x_val], settings)
        labels = self._digest([y] if y_val is None else [y, y_val])
        first = self._first.get(queries)
        if first is not None and first[0] == labels:
            self.hits += 1
            return first[1]
        self.misses += 1
        model = _fit_copy(x_train, y, x_val, y_val, substitute=substitute, num_classes=num_classes, seed=seed,
                          **fit_options)
        if first is None:
            self._first[queries] = (labels, model)
        return model


def admis_tradeoff(model, misinformation_model, x_test: np.ndarray, y_test: np.ndarray, attacks: dict, taus,
                   *, substitute: str, nu: float = 1000.0, seed: int = 0, replay=None, **fit_options) -> list[dict]:
    """Adaptive Misinformation's trade-off over thresholds ``taus`` (Kariyappa & Qureshi 2020, Fig. 5;
    thesis 002 §6.2.1): for each ``tau`` the defender's accuracy on in-distribution ``x_test``
    (top-1 of the defended outputs against ``y_test``) and, for each attack ``name -> (x_train,
    x_val)``, the share of its queries that get misinformation (``alpha > 0.5``) and the test
    agreement with the *undefended* model of a copy trained on the defended labels
    (``replay``: :func:`replay_copy` or a :class:`ReplayCache` shared with other experiments;
    ``fit_options``: its training recipe). One row per (tau, attack)."""
    replay = replay_copy if replay is None else replay
    truth = models.predict_labels(model, x_test)
    rows = []
    num_classes = int(model.output_shape[-1])
    for tau in taus:
        adm = AdaptiveMisinformation(misinformation_model, tau=tau, nu=nu)
        adm.check(output="probs", num_classes=num_classes)

        def defended_labels(x):  # the labels of an ADMIS-defended, label-only oracle
            return adm.answer(x, softmax(models.predict_logits(model, x, batch_size=512), dtype=np.float64)).astype(np.float32).argmax(axis=1).astype(np.int64)

        acc = metrics.accuracy(y_test, defended_labels(x_test))
        for name, (x_train, x_val) in attacks.items():
            xq = x_train if x_val is None else np.concatenate([x_val, x_train])
            alpha = misinformation_alpha(softmax(models.predict_logits(model, xq, batch_size=512), dtype=np.float64), adm.tau, adm.nu)
            copy = replay(defended_labels, x_train, x_val, substitute=substitute,
                          num_classes=num_classes, seed=seed, **fit_options)
            pred = models.predict_labels(copy, x_test)
            rows.append({"tau": float(tau), "attack": name, "defender_accuracy": acc,
                         "misinformed_queries": float(np.mean(alpha > 0.5)),
                         "copy_agreement": metrics.agreement(truth, pred), "copy_accuracy": metrics.accuracy(y_test, pred)})
    return rows


def watermark_claim(model, x_wm: np.ndarray, x_source: np.ndarray, target_class: int, num_classes: int,
                    null_rate: float | None = None) -> dict:
    """An ownership claim on a suspected copy that controls for a copy which simply predicts the
    target class a lot (a weak copy can collapse onto one class): the claim is tested
    (:func:`ownership_test`, one-sided exact binomial) against the largest of chance
    ``1 / num_classes``, ``null_rate`` (e.g. the watermark success of a copy stolen the same way
    from a *non-watermarked* model) and the model's own target-class rate on the un-triggered
    ``x_source`` images. Returns ``watermark_success`` (triggered -> target), ``clean_target_rate``,
    ``base_rate``, ``p_value`` (1.0 when the base rate is 1: no claim is possible) and ``n``."""
    target_class = int(target_class)
    success = watermark_success(model, x_wm, target_class)
    clean = float(np.mean(models.predict_labels(model, x_source) == target_class)) if len(x_source) else 0.0
    base = max(1.0 / check_positive_int(num_classes, "num_classes", minimum=2), clean,
               0.0 if null_rate is None else check_real(null_rate, "null_rate", 0.0, 1.0))
    out = {"watermark_success": success, "clean_target_rate": clean, "null_rate": null_rate, "base_rate": base,
           "n": len(x_wm)}
    if base >= 1.0:
        return {**out, "p_value": 1.0, "successes": int(round(success * len(x_wm)))}
    res = ownership_test(model, x_wm, target_class, num_classes, base_rate=base)
    return {**out, "p_value": res["p_value"], "successes": res["successes"]}



# ----------------------------------------------------------------------------------------------
# The chapter: run_defenses
# ----------------------------------------------------------------------------------------------


@dataclass
class DefenseRun:
    """What :func:`run_defenses` ran and measured (the notebook plots these; the files hold the same)."""

    profile: Profile
    settings: object  # stealnb.core.profiles.DefenseSettings, after the overrides
    dataset: str
    arch: str
    seed: int
    out: Path
    secret_meta: dict
    secret_accuracy: float  # the undefended secret's test accuracy (ADMIS at τ = 0 must give it)
    num_classes: int
    budget: int
    benign_client_size: int  # queries per benign test-set client
    runs: dict  # attack -> {"x_train", "x_val", "stream", "paid", "agreement", "accuracy", "replayed"}
    streams: dict  # name -> the distinct queries PRADA scanned (the JbDA control included)
    scans: dict  # name -> prada_scan
    benign_test: list
    benign_cal: list
    delta_cal: float
    fpr: dict  # delta -> false-positive rate of the benign test-set clients
    deltas: np.ndarray
    rates: list  # prada_rates of the attack streams (JbDA aside)
    jbda_rates: list
    served: dict  # name -> the same streams through `stealnb serve` with PRADA blocking
    msp: dict  # name -> the secret's maximum softmax probability of each query
    misinformation: dict
    admis_rows: list
    ewe_oracles: dict
    ewe_copies: dict
    replay_hits: int
    replay_misses: int
    timings: dict = field(default_factory=dict)

    @property
    def replayed(self) -> list[str]:
        """The attacks ADMIS and EWE are evaluated against (the others are only scanned by PRADA)."""
        return [n for n, r in self.runs.items() if r["replayed"]]

    def flag(self, name: str, delta: float) -> int | None:
        return prada_flag_index(self.scans[name]["w_history"], delta)

    def attack_table(self) -> list[dict]:
        jb = self.streams[JBDA]
        return ([{"attack": n, "distinct queries": len(r["stream"]), "copy agreement": r["agreement"],
                  "copy accuracy": r["accuracy"], "defences": "all" if r["replayed"] else "PRADA only"}
                 for n, r in self.runs.items()]
                + [{"attack": JBDA, "distinct queries": len(jb), "defences": "PRADA only"}])

    def prada_table(self) -> list[dict]:
        d, dc = self.settings.prada_delta, self.delta_cal
        return [{"stream": n, "queries": s["n_queries"], "min W": s["min_w"], f"flagged at (δ={d})": self.flag(n, d),
                 f"flagged at (δ_cal={dc:.4f})": self.flag(n, dc)} for n, s in self.scans.items()]


JBDA = "jbda (control)"


def run_defenses(dataset: str, arch: str, profile: Profile, *, seed: int = 0, results="results", data_root=None,
                 progress: bool = False, **overrides) -> DefenseRun:
    """PRADA, Adaptive Misinformation and EWE against the attacks of ``profile.defenses`` on the
    ``dataset``/``arch`` secret (thesis 002 §5.7, §6.2); ``overrides`` change
    :class:`stealnb.core.profiles.DefenseSettings` fields (``attacks=``, ``admis_taus=``, ...; ``None``
    keeps the profile's).

    1. **Attacks.** Each attack runs -- or resumes from disk -- as in notebooks 03 and 05
       (:func:`stealnb.extraction.loop.run_extraction`, :func:`stealnb.extraction.copycat.run_copycat` NPDD); its
       query stream is what the oracle was paid for. JbDA (Papernot et al. 2017) is PRADA's
       positive control.
    2. **PRADA.** Every stream is scanned by its own detector; benign clients send test-split
       images (false positives) and training-split images (calibrating δ as Juuti et al. do: the
       largest δ flagging none of them); detection and false-positive rates over δ; the same
       streams through ``stealnb serve`` with ``prada:action=block`` must be flagged at the same
       query.
    3. **ADMIS.** A misinformation model, then the defender's accuracy and each attack's copy
       agreement over ``admis_taus`` (static replay, :func:`admis_tradeoff`).
    4. **EWE.** The secret watermarked by :func:`stealnb.defenses.train_ewe`; copies stolen from
       it and from the clean secret by every attack (and a problem-domain attacker), with the
       ownership claim of :func:`watermark_claim`.

    Writes ``prada.json``, ``admis.json`` and ``ewe.json`` under
    :func:`stealnb.core.layout.defenses_dir` (settings read from the objects that ran) and returns a
    :class:`DefenseRun`.
    """
    check_profile(profile)
    changes = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if v is not None}
    prof, st = profile, profile.defenses.with_(**changes)
    secret, secret_meta = ensure_secret(dataset, arch, prof, results, data_root=data_root)
    ds = data.load_dataset(dataset, root=data_root)
    out = layout.defenses_dir(results, prof.name, dataset, arch)
    out.mkdir(parents=True, exist_ok=True)
    budget, num_classes = prof.budgets[-1], ds.num_classes
    prada_only = [a for a in st.prada_only if a not in st.attacks]
    timings = {}

    def secret_labels(x):  # the undefended oracle
        return models.predict_labels(secret, x)

    # 1. the attacks
    t0 = time.perf_counter()
    runs = {}
    for name in [*st.attacks, *prada_only]:
        if name == "copycat":
            ex = copycat.run_copycat(dataset, arch, "npdd", prof, seed=seed, results=results, data_root=data_root,
                                     progress=progress).ex
        else:
            ex = loop.run_extraction(dataset, arch, name, prof, seed=seed, results=results, data_root=data_root,
                                           progress=progress)
        final = ex.summary()["budgets"][str(budget)]
        runs[name] = {"x_train": ex.pool.get(np.sort(ex.labelled_idx)), "x_val": ex.pool.get(ex.val_idx),
                      "stream": ex.query_stream(), "paid": ex.oracle.spent, "agreement": final["agreement"],
                      "accuracy": final["accuracy"], "replayed": name in st.attacks}
    jb_seeds = ds.x_train[copycat.select_pdd(ds.x_train, max(st.jbda_min_seeds, budget // st.jbda_seed_share), seed)]
    x_jbda, _ = jbda_queries(secret_labels, jb_seeds, prof.substitute, rounds=st.jbda_rounds, lam=st.jbda_lam,
                             epochs=prof.substitute_epochs, seed=seed, max_queries=budget, num_classes=num_classes)
    timings["attacks"] = time.perf_counter() - t0
    for n, r in runs.items():  # each stream is what the oracle charged for, the attack's whole budget at most
        if not len(r["stream"]) == r["paid"] <= budget:
            raise RuntimeError(f"{n}: a stream of {len(r['stream'])} queries for {r['paid']} paid (budget {budget})")

    # 2. PRADA
    t0 = time.perf_counter()
    detector = PradaDetector(delta=st.prada_delta, min_queries=st.prada_min_queries)
    det_kw = dict(delta=detector.delta, min_queries=detector.min_queries, metric=detector.metric,
                  outlier_std=detector.outlier_std, test_every=detector.test_every)
    streams = {n: r["stream"] for n, r in runs.items()} | {JBDA: distinct(x_jbda)}
    scans = {n: prada_scan(x, secret_labels(x), **det_kw) for n, x in streams.items()}
    client_test, client_train = min(budget, len(ds.x_test)), min(budget, len(ds.x_train))
    benign_test = prada_benign_clients(ds.x_test, secret_labels(ds.x_test), n_clients=st.benign_clients,
                                       client_size=client_test, seed=seed, **det_kw)
    benign_cal = prada_benign_clients(ds.x_train, secret_labels(ds.x_train), n_clients=st.benign_clients,
                                      client_size=client_train, seed=seed + 1, **det_kw)
    delta_cal = calibrate_prada_delta(benign_cal)
    fpr = {d: float(np.mean([prada_flag_index(s["w_history"], d) is not None for s in benign_test]))
           for d in (st.prada_delta, delta_cal)}
    start, stop, step = st.rate_deltas
    deltas = np.round(np.arange(start, stop + 1e-4, step), 4)
    rates = prada_rates({n: s for n, s in scans.items() if n != JBDA}, benign_test, deltas)
    jbda_rates = prada_rates({JBDA: scans[JBDA]}, benign_test, deltas)
    timings["prada"] = time.perf_counter() - t0
    served = _serve_streams(secret, streams, scans, out / "server-logs", det_kw, st.server_batch)
    write_json(out / "prada.json", {
        **{k: det_kw[k] for k in ("delta", "min_queries", "metric", "outlier_std", "test_every")},
        "calibrated_delta": delta_cal,
        "streams": {n: {"queries": s["n_queries"], "min_w": s["min_w"],
                        "flagged_at": prada_flag_index(s["w_history"], st.prada_delta),
                        "flagged_at_calibrated": prada_flag_index(s["w_history"], delta_cal),
                        "w_history": s["w_history"],
                        "distance_quartiles": np.percentile(s["distances"], [25, 50, 75]).tolist(),
                        "distance_skew": float(np.nan_to_num(stats.skew(s["distances"]))),
                        "replayed": n in runs and runs[n]["replayed"]}
                    for n, s in scans.items()},
        "benign_test": {"clients": st.benign_clients, "client_size": client_test, "fpr": fpr[st.prada_delta],
                        "fpr_calibrated": fpr[delta_cal], "min_w": [s["min_w"] for s in benign_test]},
        "benign_calibration": {"split": "train", "clients": st.benign_clients, "client_size": client_train,
                               "min_w": [s["min_w"] for s in benign_cal]},
        "rates": [{k: r[k] for k in ("delta", "detection_rate", "fpr")} for r in rates],
        "server": served,
    })

    # 3. Adaptive Misinformation
    t0 = time.perf_counter()
    misinfo = models.build(arch, num_classes=num_classes, seed=seed + 17)
    hist = train_misinformation_model(misinfo, ds.x_train, ds.y_train, epochs=prof.epochs, seed=seed)
    misinfo_acc = float(np.mean(models.predict_labels(misinfo, ds.x_test) == ds.y_test))
    msp = {"test set (in-distribution)": ds.x_test} | {n: r["stream"] for n, r in runs.items()}
    msp = {n: softmax(models.predict_logits(secret, x)).max(axis=1) for n, x in msp.items()}
    replayed = {n: (r["x_train"], r["x_val"]) for n, r in runs.items() if r["replayed"]}
    replay = ReplayCache()  # copies trained once per distinct labelled query set (EWE reuses them)
    taus = [float(t) for t in st.admis_taus]
    admis_rows = admis_tradeoff(secret, misinfo, ds.x_test, ds.y_test, replayed, taus, substitute=prof.substitute,
                                nu=st.admis_nu, seed=seed, replay=replay, **prof.substitute_fit())
    timings["admis"] = time.perf_counter() - t0
    misinformation = {"arch": arch, "test_accuracy": misinfo_acc, "final_loss": hist["loss"][-1]}
    write_json(out / "admis.json", {
        "nu": st.admis_nu, "taus": taus,
        "defenses": [AdaptiveMisinformation(misinfo, tau=t, nu=st.admis_nu).spec() for t in taus],
        "misinformation_model": misinformation,
        "msp_median": {n: float(np.median(v)) for n, v in msp.items()}, "rows": admis_rows})

    # 4. EWE
    t0 = time.perf_counter()
    ewe = models.clone(secret)
    trigger = dict(trigger_size=st.ewe_trigger_size, position=st.ewe_trigger_position, value=st.ewe_trigger_value)
    x_wm_train = make_watermark_trigger(ds.x_train[ds.y_train == st.ewe_source], **trigger)
    x_src_test = ds.x_test[ds.y_test == st.ewe_source]
    x_wm_test = make_watermark_trigger(x_src_test, **trigger)
    train_ewe(ewe, ds.x_train, ds.y_train, x_wm_train, st.ewe_target, epochs=st.ewe_epochs, seed=seed)

    def ewe_labels(x):
        return models.predict_labels(ewe, x)

    ewe_oracles = {n: {"test_accuracy": float(np.mean(models.predict_labels(m, ds.x_test) == ds.y_test)),
                       **watermark_claim(m, x_wm_test, x_src_test, st.ewe_target, num_classes)}
                   for n, m in {"clean secret": secret, "EWE secret": ewe}.items()}
    stolen = dict(replayed)
    pdd = ds.x_train[copycat.select_pdd(ds.x_train, min(budget, len(ds.x_train) // 2), seed + 1)]
    stolen["problem-domain (train split)"] = (pdd, None)
    ewe_copies = {}
    kw = dict(substitute=prof.substitute, num_classes=num_classes, seed=seed, **prof.substitute_fit())
    for n, (xt, xv) in stolen.items():
        copy = replay(ewe_labels, xt, xv, **kw)
        null = replay(secret_labels, xt, xv, **kw)
        null_rate = watermark_success(null, x_wm_test, st.ewe_target)
        ewe_copies[n] = {"agreement_with_ewe_secret": float(np.mean(models.predict_labels(copy, ds.x_test)
                                                                    == ewe_labels(ds.x_test))),
                         **watermark_claim(copy, x_wm_test, x_src_test, st.ewe_target, num_classes,
                                           null_rate=null_rate)}
    timings["ewe"] = time.perf_counter() - t0
    write_json(out / "ewe.json", {"source": st.ewe_source, "target": st.ewe_target, "trigger": trigger,
                                  "epochs": st.ewe_epochs, "oracles": ewe_oracles, "copies": ewe_copies})
    return DefenseRun(profile=prof, settings=st, dataset=dataset, arch=arch, seed=seed, out=out,
                      secret_meta=secret_meta, secret_accuracy=float(np.mean(secret_labels(ds.x_test) == ds.y_test)),
                      num_classes=num_classes, budget=budget, benign_client_size=client_test, runs=runs, streams=streams, scans=scans,
                      benign_test=benign_test, benign_cal=benign_cal, delta_cal=delta_cal, fpr=fpr, deltas=deltas,
                      rates=rates, jbda_rates=jbda_rates, served=served, msp=msp, misinformation=misinformation,
                      admis_rows=admis_rows, ewe_oracles=ewe_oracles, ewe_copies=ewe_copies,
                      replay_hits=replay.hits, replay_misses=replay.misses, timings=timings)


def _serve_streams(secret, streams: dict, scans: dict, log_dir: Path, det_kw: dict, batch: int) -> dict:
    """Each stream sent by its own client over real HTTP (``stealnb serve`` in a background thread,
    PRADA blocking), ``batch`` images per request: where the server flags it, beside the scan's."""
    if log_dir.exists():  # the previous run's logs (this function's own folder): a fresh server
        shutil.rmtree(log_dir)
    keys = {f"client-{i:02d}-{n.split()[0]}": {"name": n} for i, n in enumerate(streams)}
    prada = parse_defense({"name": "prada", **det_kw, "action": "block"})
    app = server.create_app(secret, keys=keys, log_dir=log_dir, defenses=[prada])
    served = {}
    with server.BackgroundServer(app) as srv:
        for key, (n, x) in zip(keys, streams.items()):
            with HttpOracle(srv.url, api_key=key, batch_size=batch) as client:
                blocked = False
                for s in range(0, len(x), batch):
                    try:
                        client.query(x[s : s + batch])
                    except OracleHTTPError as e:
                        if e.code != "blocked":
                            raise
                        blocked = True
                        break
                usage = app.state.service.key_usage()[server.key_id(key)]
                served[n] = {"answered": client.spent, "blocked": blocked, "server_flagged_at": usage["flagged_at"],
                             "in_process_flagged_at": scans[n]["flagged_at"]}
    app.state.service.close()
    return served


def summary_rows(out) -> tuple[dict, list[dict]]:
    """The chapter's summary read back from the files :func:`run_defenses` wrote under ``out``:
    ``(headline numbers, one row per PRADA stream)``."""
    out = Path(out)
    p, a, e = (json.loads((out / f).read_text()) for f in ("prada.json", "admis.json", "ewe.json"))
    rows = []
    for n, s in p["streams"].items():
        row = {"attack": n, "PRADA flagged at (δ)": s["flagged_at"],
               "PRADA flagged at (calibrated δ)": s["flagged_at_calibrated"]}
        adm = [r for r in a["rows"] if r["attack"] == n]
        if adm:
            row["copy agreement, no defence (τ=0)"] = next((r["copy_agreement"] for r in adm if r["tau"] == 0.0), None)
            row["copy agreement, τ max"] = adm[-1]["copy_agreement"]
        if n in e["copies"]:
            row["EWE watermark in copy"] = e["copies"][n]["watermark_success"]
            row["EWE p-value"] = e["copies"][n]["p_value"]
        rows.append(row)
    head = {"delta": p["delta"], "fpr": p["benign_test"]["fpr"], "calibrated_delta": p["calibrated_delta"],
            "fpr_calibrated": p["benign_test"]["fpr_calibrated"], "tau_max": a["taus"][-1],
            "defender_accuracy_tau_max": a["rows"][-1]["defender_accuracy"],
            "ewe_secret_watermark": e["oracles"]["EWE secret"]["watermark_success"],
            "flagged": [f"{n} at query {s['flagged_at']} of {s['queries']}" for n, s in p["streams"].items()
                        if s["flagged_at"] is not None and n != JBDA]}
    return head, rows

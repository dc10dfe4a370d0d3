"""Copycat CNN: copy a black-box classifier from its hard labels on random natural images
(Correia-Silva et al. 2018; thesis 002, Correia da Silva 2023, ch. 4 and §5.6).

The attacker queries the oracle (top-1 labels only) with random *non-problem-domain* images
(NPDD, the profile's natural-image thief pool: ``natural-patches`` offline, ``imagenet32`` in
the ``paper`` profile), trains a copycat on these stolen labels (NPDD-SL) and evaluates it on
the problem's test set with its *original* labels (macro-F1; relative F1 = copycat F1 /
oracle F1, thesis §5.4). Three variants (thesis abbreviations):

* ``"npdd"``     -- train on NPDD-SL only (the Copycat attack proper);
* ``"pdd-sl"``   -- the NPDD copycat, then fine-tuned on problem-domain images labelled by the
  oracle (PDD-SL). Here the attacker's PDD is a random part of the dataset's *train* split whose
  ground-truth labels are never read: its labels come from the oracle;
* ``"npdd+pdd"`` -- trained from scratch on the union NPDD-SL + PDD-SL (thesis "NPDD+PDD-SL").

Query accounting. The NPDD part is :class:`stealnb.extraction.loop.Extraction` with the
``random`` strategy, the same Oracle, budget and ledger as ActiveThief, so a Copycat
copy at NPDD budget ``b`` has spent exactly as many queries as an ActiveThief substitute at
budget ``b`` (including the oracle-labelled validation split used for early stopping).
The PDD variants additionally pay ``pdd_size`` queries once, at the first budget; their
summary rows are keyed by the NPDD budget ``b`` and report ``queries = b + pdd_size``.
By default the copycat is only trained at the budgets (and once on the initial seed +
validation set): the Copycat attack is not iterative, so rounds in between would only add
data-curve points (set ``round_size`` to get them).

The NPDD part is the same for every variant of one seed (the random strategy draws the same
images, and each variant's first step is that same substitute), so :func:`run_copycat_variants`
runs it once and lets every variant continue from it: the results are those of separate
:func:`run_copycat` runs, each variant still pays its own oracle (its own ledger, budget and
``oracle_spent``), and two of every three NPDD trainings are saved.

Resumable like the extraction: the NPDD extraction checkpoints every round under
``out/npdd/`` (a variant run with :func:`run_copycat_variants` records the folder of the one it
shares in its checkpoint); the copycat records are checkpointed in ``out/checkpoint/copycat.json`` after
every budget; labels are re-asked from the oracle, whose ledger (``out/ledger.bin``) replays
paid samples for free.

Analysis helpers for notebook 05 (thesis §5.6.1 t-SNE, Fig. 28 label distribution, §5.6.6 LRP,
§5.6.7 API cost) and :func:`comparison_table` (Copycat vs ActiveThief) are at the end.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..attacks import evasion
from ..core import layout, metrics, models
from ..core._checks import check_images, check_labels, check_positive_int, check_real
from ..core.progress import progress_bar
from .loop import Extraction, ExtractionConfig
from ..core.profiles import Profile, check_profile
from ..core.train import Recipe, fit

VARIANTS = ("npdd", "pdd-sl", "npdd+pdd")


@dataclass(frozen=True)
class CopycatConfig(Recipe):
    """Settings of one Copycat run (see the module docstring).

    ``budgets``, ``seed_size``, ``val_size``, the training recipe (a
    :class:`stealnb.core.train.Recipe`: ``epochs`` ... ``augment``, keyword-only), ``fgsm_eps``
    and ``seed`` mean what they mean for :class:`~stealnb.extraction.loop.ExtractionConfig` (NPDD
    queries). ``round_size=None`` trains only at the budgets. ``pdd_size`` is the number of
    problem-domain images the attacker has (0 for ``npdd``);
    ``finetune_epochs``/``finetune_learning_rate``/``finetune_batch_size`` drive the ``pdd-sl``
    fine-tuning (Adam, fixed epochs, no early stopping: the attacker has no labelled PDD
    validation split).
    """

    variant: str
    substitute: str
    budgets: tuple[int, ...]
    seed_size: int
    val_size: int
    round_size: int | None = None
    pdd_size: int = 0
    finetune_epochs: int = 10
    finetune_learning_rate: float = 1e-4
    finetune_batch_size: int = 32
    fgsm_eps: float = 0.25
    seed: int = 0

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {VARIANTS}, got {self.variant!r}")
        check_positive_int(self.pdd_size, "pdd_size", minimum=0)
        if self.variant == "npdd" and self.pdd_size:
            raise ValueError(f"pdd_size: the 'npdd' variant uses no problem-domain data, got pdd_size={self.pdd_size}")
        if self.variant != "npdd" and self.pdd_size < 1:
            raise ValueError(f"pdd_size: variant {self.variant!r} needs problem-domain images, got pdd_size={self.pdd_size}")
        check_positive_int(self.finetune_epochs, "finetune_epochs")
        check_positive_int(self.finetune_batch_size, "finetune_batch_size")
        if self.round_size is not None:
            check_positive_int(self.round_size, "round_size")
        check_real(self.finetune_learning_rate, "finetune_learning_rate", 0.0, lo_open=True)
        object.__setattr__(self, "budgets", self.extraction_config().budgets)  # validated there (recipe too)

    def extraction_config(self) -> ExtractionConfig:
        """The NPDD part: ActiveThief's loop with the ``random`` strategy (same budgets)."""
        budgets = tuple(int(b) for b in self.budgets)
        return ExtractionConfig(
            strategy="random", substitute=self.substitute, budgets=budgets, seed_size=self.seed_size,
            val_size=self.val_size, round_size=self.round_size or max(budgets[-1], 1),
            warm_start=False, fgsm_eps=self.fgsm_eps, seed=self.seed, **self.fit_options(),
        )

    @classmethod
    def from_profile(cls, profile, variant: str, **overrides) -> "CopycatConfig":
        """Extraction settings of ``profile`` (substitute, budgets, seed/val sizes, epochs,
        patience, FGSM eps) plus its ``copycat`` section (problem-domain data, fine-tuning);
        ``overrides`` change any field."""
        extra = profile.copycat
        kw = dict(
            variant=variant, substitute=profile.substitute, budgets=profile.budgets,
            seed_size=profile.seed_size, val_size=profile.val_size, fgsm_eps=profile.fgsm_eps,
            **profile.substitute_fit(), pdd_size=0 if variant == "npdd" else extra.pdd_size, finetune_epochs=extra.finetune_epochs,
        )
        kw.update(overrides)
        return cls(**kw)


def _digest(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x, np.float32).tobytes()).hexdigest()


def copy_scores(y_true, oracle_pred, copy_pred, num_classes: int) -> dict:
    """The thesis' copy metrics on a test set with original labels ``y_true`` (thesis 002 §5.4):
    ``macro_f1`` of the copy, ``relative_f1`` = copy macro-F1 / oracle macro-F1
    (:func:`stealnb.core.metrics.relative_f1`), plus ``agreement`` with the oracle's predictions
    (ActiveThief's fidelity), ``accuracy`` and :func:`stealnb.core.metrics.collapse`."""
    f1 = metrics.macro_f1(y_true, copy_pred, num_classes)
    oracle_f1 = metrics.macro_f1(y_true, oracle_pred, num_classes)
    return {"agreement": metrics.agreement(oracle_pred, copy_pred), "accuracy": metrics.accuracy(y_true, copy_pred),
            "macro_f1": f1, "relative_f1": metrics.relative_f1(f1, oracle_f1),
            **metrics.collapse(copy_pred, num_classes)}


def select_pdd(x_train: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of the attacker's problem-domain images: ``size`` uniform random *distinct*
    images of the train split ``x_train`` (the first occurrence of each duplicated image is the
    candidate: a repeated query would be answered from the ledger and not count). No
    stratification: the attacker does not know the labels. Seeded apart from the NPDD draws
    (``seed + 7919``), so every variant queries the same NPDD images."""
    from .oracle import fingerprint

    size = check_positive_int(size, "size")
    _, first = np.unique(np.asarray(fingerprint(x_train)), return_index=True)
    if size > len(first):
        raise ValueError(f"pdd_size: expected at most the {len(first)} distinct train images, got {size}")
    pick = np.random.default_rng(int(seed) + 7919).choice(np.sort(first), size, replace=False)
    return np.sort(pick).astype(np.int64)


class Copycat:
    """One resumable Copycat run writing ``rounds.jsonl``, ``summary.json`` and
    ``checkpoint/copycat.json`` into ``out`` (the NPDD extraction lives in ``out/npdd/``).

    ``oracle`` answers top-1 labels (:class:`stealnb.extraction.oracle.Oracle` with ``output="label"`` or a
    compatible HTTP client); ``pool`` is the NPDD thief pool; ``x_pdd`` the attacker's unlabelled
    problem-domain images (``None`` for ``npdd``); ``x_test``/``y_test`` the test set with original
    labels; ``secret`` the oracle's model, used for evaluation only (agreement, the oracle's F1
    for relative F1, transferability), never for training. ``info`` is copied into the summary.
    ``npdd``: the NPDD :class:`~stealnb.extraction.loop.Extraction` of another variant of the same seed
    to continue from instead of running one (:func:`run_copycat_variants`; its config must be this
    run's :meth:`CopycatConfig.extraction_config`); this run's ``oracle`` still pays for every
    image it trains on.
    """

    def __init__(self, oracle, pool, x_pdd, x_test, y_test, config: CopycatConfig, *, secret,
                 out=None, resume: bool = False, progress: bool = False, info: dict | None = None,
                 npdd: Extraction | None = None):
        if secret is None:
            raise ValueError("secret: the oracle's model is needed to evaluate the copycat (oracle F1, agreement)")
        self.config, self.oracle, self.pool, self.secret = config, oracle, pool, secret
        self.x_test = check_images(x_test, "x_test")
        self.y_test = check_labels(y_test, "y_test", n=len(x_test))
        if config.variant == "npdd":
            if x_pdd is not None:
                raise ValueError("x_pdd: the 'npdd' variant uses no problem-domain images; pass None")
            self.x_pdd = None
        else:
            self.x_pdd = check_images(x_pdd, "x_pdd")
            if len(self.x_pdd) != config.pdd_size:
                raise ValueError(f"x_pdd: expected pdd_size={config.pdd_size} images, got {len(self.x_pdd)}")
            from .oracle import fingerprint

            if len(set(fingerprint(self.x_pdd))) != len(self.x_pdd):
                raise ValueError("x_pdd: contains repeated images (each would be paid once only); "
                                 "pass distinct images, e.g. chosen with select_pdd")
        need = config.budgets[-1] + config.pdd_size
        if oracle.budget is not None and oracle.budget < need:
            raise ValueError(f"oracle budget {oracle.budget} is below the {need} queries this run needs "
                             f"(largest NPDD budget {config.budgets[-1]} + pdd_size {config.pdd_size})")
        self.out = Path(out) if out is not None else None
        self.progress, self.info = progress, dict(info or {})
        self.num_classes = int(secret.output_shape[-1])
        self.secret_test_labels = models.predict_labels(secret, self.x_test)
        self.oracle_f1 = metrics.macro_f1(self.y_test, self.secret_test_labels, self.num_classes)
        self.oracle_accuracy = metrics.accuracy(self.y_test, self.secret_test_labels)
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
        state = self.out / "checkpoint" / "copycat.json" if self.out is not None else None
        # The extraction checkpoints first, so its state alone also means "resume" (records = []).
        resuming = resume and self.out is not None and layout.checkpointed(self.out, "copycat")
        if self.out is not None and not resuming:
            for p in ("rounds.jsonl", "summary.json"):
                (self.out / p).unlink(missing_ok=True)
        saved = json.loads(state.read_text()) if resuming and state.is_file() else {}
        if saved:  # checked before the extraction is opened
            self._check_resumable(saved)
        if npdd is not None:
            if npdd.config != config.extraction_config():
                raise ValueError("npdd: the shared NPDD extraction was configured differently from this run's "
                                 "extraction_config()")
            if resuming and saved.get("npdd_dir") != self._rel(npdd.out):
                raise ValueError(f"cannot resume {self.out} on the shared NPDD extraction {npdd.out}: it was run on "
                                 f"{saved.get('npdd_dir') or 'its own npdd/ folder'}; resume it with run_copycat, "
                                 "or start again with resume=False")
            self.ex = npdd
        else:
            where = None if self.out is None else self.out / "npdd"
            if saved.get("npdd_dir") not in (None, "npdd"):  # the extraction it shared, in another variant's folder
                where = (self.out / saved["npdd_dir"]).resolve()
            self.ex = Extraction(oracle, pool, x_test, y_test, config.extraction_config(), secret=secret,
                                 out=where, resume=resuming, progress=progress)
        self.records: list[dict] = []
        self.model = None  # the latest copycat (the variant's model)
        self._npdd_model = None
        if saved:
            self._restore(saved)

    # -- checkpoint ----------------------------------------------------------------------------
    def _rel(self, path) -> str | None:
        """``path`` (a folder of the NPDD extraction) relative to this run's folder."""
        if self.out is None or path is None:
            return None
        return os.path.relpath(Path(path).resolve(), self.out.resolve())

    def _state(self) -> dict:
        return {"config": asdict(self.config), "records": self.records,
                "pdd_sha256": None if self.x_pdd is None else _digest(self.x_pdd), "npdd_dir": self._rel(self.ex.out)}

    def _checkpoint(self) -> None:
        if self.out is None:
            return
        ck = self.out / "checkpoint"
        ck.mkdir(exist_ok=True)
        if self.model is not None:
            tmp = ck / "copycat.tmp.weights.h5"
            self.model.save_weights(tmp)
            tmp.replace(ck / "copycat.weights.h5")
        layout.atomic_write(ck / "copycat.json", json.dumps(self._state()))
        layout.atomic_write(self.out / "rounds.jsonl", "".join(json.dumps(r) + "\n" for r in self.records))

    def _check_resumable(self, state: dict) -> None:
        """Refuse a checkpoint (``copycat.json``) written with other settings or other PDD images."""
        mine = json.loads(json.dumps(asdict(self.config)))
        if state["config"] != mine:
            diff = sorted(k for k in mine if state["config"].get(k) != mine[k])
            raise ValueError(f"cannot resume: the checkpoint was written with other settings ({', '.join(diff)})")
        if state["pdd_sha256"] != (None if self.x_pdd is None else _digest(self.x_pdd)):
            raise ValueError("cannot resume: the problem-domain images differ from the checkpoint's")

    def _restore(self, state: dict) -> None:
        """The records and latest model of a checked checkpoint, once the NPDD extraction is open."""
        self.records = state["records"]
        missing = sorted({r["round"] for r in self.records} - {r["round"] for r in self.ex.records})
        if missing:
            raise ValueError(f"cannot resume: copycat rounds {missing} are not in the NPDD extraction's checkpoint "
                             f"({self.out / 'npdd' / 'checkpoint'}); start again with resume=False")
        weights = self.out / "checkpoint" / "copycat.weights.h5"
        if self.records and weights.exists():
            self.model = self._build(0)
            self.model.load_weights(weights)

    # -- the attack ----------------------------------------------------------------------------
    def _build(self, round_: int):
        # Same initialisation as the extraction's substitute of that round.
        return models.build(self.config.substitute, num_classes=self.num_classes,
                            seed=self.config.seed * 1000 + round_)

    def _pending(self) -> list[dict]:
        """NPDD rounds already checkpointed by the extraction but without a copycat record."""
        done = {r["round"] for r in self.records}
        wanted = [r for r in self.ex.records if r["round"] not in done
                  and (self.config.variant == "npdd" or r["budget"] is not None)]
        return wanted

    @property
    def done(self) -> bool:
        return self.ex.done and not self._pending()

    def _npdd_substitute(self, rec: dict):
        """The NPDD copycat of round ``rec``: in memory after ``ex.step()``, else its checkpoint."""
        if self._npdd_model is not None and self._npdd_model[0] == rec["round"]:
            return self._npdd_model[1]
        if rec["round"] != self.ex.records[-1]["round"] or self.out is None:
            raise RuntimeError(f"round {rec['round']}: the NPDD copycat weights are not available any more")
        model = self._build(rec["round"])
        model.load_weights(self.ex.out / "checkpoint" / "substitute.weights.h5")
        return model

    def step(self) -> dict | None:
        """One NPDD round (query, train, evaluate, draw the next random images) and, when it hits
        a budget (every round for ``npdd``), the variant's copycat; returns its record or ``None``."""
        return _step_together([self])[self.config.variant]

    def _paid(self, rec: dict, with_pdd: bool) -> int:
        """Distinct images asked so far: ``queries`` minus repeated images (a pool can hold
        identical images, e.g. flat dark patches; the oracle charges them once)."""
        from .oracle import fingerprint

        idx = np.concatenate([self.ex.val_idx, self.ex.labelled_idx[: rec["labelled"]]])
        fps = set(fingerprint(self.pool.get(idx))) if len(idx) else set()
        if with_pdd:
            fps.update(fingerprint(self.x_pdd))
        return len(fps)

    def _variant_round(self, rec: dict) -> dict:
        cfg, t0 = self.config, time.perf_counter()
        npdd_metrics = {k: rec.get(k) for k in ("agreement", "accuracy", "macro_f1", "top_class_share",
                                                 "classes_predicted")}
        npdd_metrics["relative_f1"] = metrics.relative_f1(rec["macro_f1"], self.oracle_f1)
        pdd_queries = cfg.pdd_size if cfg.variant != "npdd" else 0
        row = {
            "round": rec["round"], "queries": rec["queries"] + pdd_queries, "npdd_queries": rec["queries"],
            "pdd_queries": pdd_queries, "paid": self._paid(rec, pdd_queries > 0), "budget": rec["budget"],
            "variant": cfg.variant,
        }
        if cfg.variant == "npdd":
            self.model = self._npdd_substitute(rec)
            row.update(npdd_metrics, labelled=rec["labelled"], val_accuracy=rec["val_accuracy"],
                       epochs_trained=rec["epochs_trained"], transfer=rec["transfer"],
                       seconds=dict(rec["seconds"]))
            self.records.append(row)
            self._checkpoint()
            return row
        y_pdd = np.asarray(self.oracle.query(self.x_pdd), np.int64)  # paid once, then replayed
        x_lab = self.pool.get(np.sort(self.ex.labelled_idx[: rec["labelled"]]))  # canonical order
        y_lab = np.asarray(self.oracle.query(x_lab), np.int64)
        val = None
        if len(self.ex.val_idx):
            x_val = self.pool.get(self.ex.val_idx)
            val = (x_val, np.asarray(self.oracle.query(x_val), np.int64))
        t_query = time.perf_counter() - t0
        t0 = time.perf_counter()
        seed = cfg.seed * 1000 + rec["round"]
        if cfg.variant == "pdd-sl":
            base = self._npdd_substitute(rec)
            model = self._build(rec["round"])
            model.set_weights(base.get_weights())
            hist = fit(model, self.x_pdd, y_pdd, epochs=cfg.finetune_epochs,
                       batch_size=cfg.finetune_batch_size, learning_rate=cfg.finetune_learning_rate,
                       seed=seed + 500, progress=self.progress, desc=f"fine-tune {rec['budget']}")
        else:  # npdd+pdd: from scratch on the union, early stopping on the NPDD validation split
            model = self._build(rec["round"])
            options = self.ex.config.fit_options()
            if val is None:
                options.update(patience=None, monitor=None)
            hist = fit(model, np.concatenate([x_lab, self.x_pdd]), np.concatenate([y_lab, y_pdd]),
                       validation=val, seed=seed, progress=self.progress, desc=f"npdd+pdd {rec['budget']}", **options)
        t_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.model = model
        row.update(self.evaluate(model))
        row.update(
            labelled=int(rec["labelled"] + len(self.x_pdd)), epochs_trained=len(hist["loss"]),
            val_accuracy=hist["val_accuracy"][hist["best_epoch"]] if "best_epoch" in hist else None,
            npdd=npdd_metrics, finetune_gain_f1=row["macro_f1"] - npdd_metrics["macro_f1"],
            transfer=evasion.transferability(self.secret, model, self.x_test, self.y_test, eps=cfg.fgsm_eps),
        )
        npdd_seconds = sum(rec["seconds"].values())
        row["seconds"] = {"npdd": round(npdd_seconds, 3), "query": round(t_query, 3), "train": round(t_train, 3),
                          "eval": round(time.perf_counter() - t0, 3)}
        self.records.append(row)
        self._checkpoint()
        return row

    def evaluate(self, model) -> dict:
        """:func:`copy_scores` of ``model`` on the test set."""
        return copy_scores(self.y_test, self.secret_test_labels, models.predict_labels(model, self.x_test),
                           self.num_classes)

    def run(self) -> dict:
        """Run to the largest budget, write ``summary.json`` and return the summary."""
        return _run_together([self])[self.config.variant]

    def summary(self) -> dict:
        """``budgets`` keyed by NPDD budget, each with ``queries`` (total, PDD included),
        ``npdd_queries``, ``pdd_queries``, ``paid`` (distinct images among them: what the
        oracle charged), ``agreement``, ``accuracy``, ``macro_f1``,
        ``relative_f1``, transferability, cumulative ``seconds`` and, for the PDD variants,
        ``npdd`` (the NPDD copy the variant starts from, at the same NPDD budget) and
        ``finetune_gain_f1`` (variant macro-F1 minus that copy's: the gain from fine-tuning on
        PDD-SL, or from joining PDD-SL to the training set for ``npdd+pdd``)."""
        per_budget, elapsed = {}, 0.0
        by_round = {r["round"]: r for r in self.records}
        for rec in self.ex.records:
            elapsed += sum(rec["seconds"].values())
            row = by_round.get(rec["round"])
            if row is not None and self.config.variant != "npdd":
                elapsed += sum(v for k, v in row["seconds"].items() if k != "npdd")
            if row is None or row["budget"] is None:
                continue
            tr = row["transfer"] or {}
            entry = {k: row.get(k) for k in ("queries", "npdd_queries", "pdd_queries", "paid", "agreement", "accuracy",
                                              "macro_f1", "relative_f1", "top_class_share", "classes_predicted")}
            entry.update(adv_agreement=tr.get("adv_agreement"), transfer_rate=tr.get("transfer_rate"),
                         secret_error_under_transfer=tr.get("secret_error_under_transfer"),
                         seconds=round(elapsed, 3), round=row["round"])
            if "npdd" in row:
                entry["npdd"] = row["npdd"]
                entry["finetune_gain_f1"] = row["finetune_gain_f1"]
            per_budget[str(row["budget"])] = entry
        return {
            "method": "copycat", "variant": self.config.variant, "config": asdict(self.config),
            "oracle": {"macro_f1": self.oracle_f1, "accuracy": self.oracle_accuracy},
            "oracle_spent": int(self.oracle.spent), "budgets": per_budget, "rounds": len(self.records),
            "seconds": round(elapsed, 3), **({"info": self.info} if self.info else {}),
        }

    # -- what was stolen -----------------------------------------------------------------------
    def stolen_labels(self) -> dict:
        """Oracle labels of everything queried so far (replayed from the ledger, free):
        ``{"npdd": labels of the NPDD images (validation + training), "pdd": PDD-SL or None}``."""
        rec = self.ex.records[-1] if self.ex.records else None
        n_lab = rec["labelled"] if rec is not None else 0
        idx = np.concatenate([self.ex.val_idx, self.ex.labelled_idx[:n_lab]])
        npdd = np.asarray(self.oracle.query(self.pool.get(idx)), np.int64) if len(idx) else np.zeros(0, np.int64)
        pdd = None
        if self.x_pdd is not None and any(r["budget"] is not None for r in self.records):
            pdd = np.asarray(self.oracle.query(self.x_pdd), np.int64)
        return {"npdd": npdd, "npdd_index": idx, "pdd": pdd}


def configure(prof, variant: str, *, pool: str | None = None, seed: int = 0, dataset: str | None = None,
              allow_problem_domain: bool = False, **overrides) -> CopycatConfig:
    """The :class:`CopycatConfig` of a ``variant`` run with profile ``prof`` (mirrors
    :func:`stealnb.extraction.loop.configure`): its substitute and its NPDD pool (``pool``, else the
    profile's; not the secret's ``dataset`` unless ``allow_problem_domain``: that is PDD) are
    checked before any data is loaded or model trained."""
    from ..core import data

    config = CopycatConfig.from_profile(prof, variant, seed=seed, **overrides)
    models.REGISTRY[config.substitute]  # an unknown name is a KeyError listing the known ones
    data.check_pool(pool or prof.pool, prof.pool_size, need=config.budgets[-1], transform=prof.pool_transform,
                    secret_dataset=dataset, allow_problem_domain=allow_problem_domain)
    return config


def run_copycat(dataset: str, arch: str, variant: str, profile: Profile, *, seed: int = 0, results="results",
                out=None, data_root=None, resume: bool = True, progress: bool = False, oracle=None,
                secret_dir=None, pool: str | None = None, allow_problem_domain: bool = False,
                **overrides) -> Copycat:
    """Run (or resume) one Copycat attack on the ``dataset``/``arch`` secret (mirrors
    :func:`stealnb.extraction.loop.run_extraction`); results go to :func:`stealnb.core.layout.copycat_dir`
    unless ``out`` is given. The secret is trained first when it is not under ``results``.

    NPDD: the profile's thief pool (``pool=`` overrides it, e.g. ``"imagenet32"``), subset of
    ``pool_size`` images drawn with seed 0 as for the extraction. PDD: :func:`select_pdd` rows of
    the dataset's train split (``pdd_size``), labelled by the oracle. ``overrides`` change
    :class:`CopycatConfig` fields (``budgets=``, ``pdd_size=``, ``round_size=``...). ``oracle``
    replaces the in-process label oracle (its budget must cover ``budgets[-1] + pdd_size``).
    With ``resume=False`` an earlier run in ``out`` (ledger included) is deleted first; a folder
    holding files stealnb did not write is refused (:func:`stealnb.core.layout.check_run_dir`).
    Returns the finished :class:`Copycat` (``.summary()``, ``.records``, ``.model``, ``.ex``).
    Several variants of one seed: :func:`run_copycat_variants` (the same results, one NPDD run).
    """

    prof = check_profile(profile)
    config = configure(prof, variant, pool=pool, seed=seed, dataset=dataset,
                       allow_problem_domain=allow_problem_domain, **overrides)
    out = Path(out) if out is not None else layout.copycat_dir(results, prof.name, dataset, arch, variant, seed)
    secret, ds, thief = _setup(prof, dataset, arch, pool, [out], resume=resume, results=results,
                               secret_dir=secret_dir, data_root=data_root, progress=progress, oracle=oracle)
    cc = _copycat(prof, dataset, arch, config, out, secret, ds, thief, oracle=oracle, resume=resume, progress=progress)
    cc.run()
    return cc


def run_copycat_variants(dataset: str, arch: str, variants, profile: Profile, *, seed: int = 0,
                         results="results", data_root=None, resume: bool = True, progress: bool = False,
                         secret_dir=None, pool: str | None = None, allow_problem_domain: bool = False,
                         **overrides) -> dict[str, Copycat]:
    """Run (or resume) several Copycat ``variants`` of one ``seed`` on one NPDD extraction: the
    results, folders and ledgers of separate :func:`run_copycat` calls (each variant has its own
    in-process oracle and pays for everything it trains on), one NPDD training per round instead
    of one per variant. The extraction lives in the ``npdd`` variant's folder (else the first
    variant's) and the other variants' checkpoints name it. ``overrides`` apply to every variant
    (``pdd_size`` not to ``npdd``). Returns ``{variant: finished Copycat}``."""
    prof = check_profile(profile)
    variants = list(dict.fromkeys(variants))
    if not variants or any(v not in VARIANTS for v in variants):
        raise ValueError(f"variants: expected some of {VARIANTS}, got {variants!r}")
    variants.sort(key=lambda v: v != "npdd")  # the variant whose folder holds the shared extraction first
    configs = {v: configure(prof, v, pool=pool, seed=seed, dataset=dataset, allow_problem_domain=allow_problem_domain,
                            **{k: x for k, x in overrides.items() if not (v == "npdd" and k == "pdd_size")})
               for v in variants}
    if any(configs[v].extraction_config() != configs[variants[0]].extraction_config() for v in variants):
        raise ValueError("overrides: the variants' NPDD extractions differ; run them with run_copycat")
    outs = {v: layout.copycat_dir(results, prof.name, dataset, arch, v, seed) for v in variants}
    secret, ds, thief = _setup(prof, dataset, arch, pool, list(outs.values()), resume=resume, results=results,
                               secret_dir=secret_dir, data_root=data_root, progress=progress)
    runs: dict[str, Copycat] = {}
    alone = []
    for v in variants:
        shared = runs[variants[0]].ex if runs else None
        cc = _copycat(prof, dataset, arch, configs[v], outs[v], secret, ds, thief, resume=resume,
                      progress=progress, npdd=shared)
        if shared is not None and v == "pdd-sl" and any(r["round"] != shared.records[-1]["round"] for r in cc._pending()):
            # It would fine-tune NPDD copies of rounds the shared extraction passed before this run
            # started (e.g. npdd was run alone first): only their last one is still on disk.
            cc = _copycat(prof, dataset, arch, configs[v], outs[v], secret, ds, thief, resume=resume, progress=progress)
            alone.append(cc)
        runs[v] = cc
    _run_together([cc for cc in runs.values() if cc not in alone])
    for cc in alone:
        cc.run()
    return runs


def _setup(prof, dataset, arch, pool, outs, *, resume, results, secret_dir, data_root, progress, oracle=None):
    """Prepare the run folders ``outs`` and load the secret, the dataset and the NPDD pool."""
    from ..core import data
    from .loop import prepare_run

    for out in outs[1:]:
        prepare_run(out, resume, dataset, arch, prof, results, kind="copycat", secret_dir=secret_dir,
                    data_root=data_root, progress=progress, oracle=oracle, load=False)
    secret, ds = prepare_run(outs[0], resume, dataset, arch, prof, results, kind="copycat", secret_dir=secret_dir,
                             data_root=data_root, progress=progress, oracle=oracle)
    thief = data.load_pool(pool or prof.pool, root=data_root, n=prof.pool_size, seed=0, transform=prof.pool_transform)
    return secret, ds, thief


def _copycat(prof, dataset, arch, config, out, secret, ds, thief, *, oracle=None, resume, progress, npdd=None):
    from .oracle import Oracle

    seed = config.seed
    pdd_idx = select_pdd(ds.x_train, config.pdd_size, seed) if config.pdd_size else np.zeros(0, np.int64)
    x_pdd = ds.x_train[pdd_idx] if config.pdd_size else None
    if oracle is None:
        oracle = Oracle(secret, output="label", budget=config.budgets[-1] + config.pdd_size, ledger=out / "ledger.bin")
    info = {"dataset": dataset, "arch": arch, "profile": prof.name, "pool": thief.describe(),
            "pdd_source": f"{dataset} train split (oracle labels)", "pdd_indices": pdd_idx.tolist()}
    return Copycat(oracle, thief, x_pdd, ds.x_test, ds.y_test, config, secret=secret, out=out, resume=resume,
                   progress=progress, info=info, npdd=npdd)


def _step_together(runs: list[Copycat]) -> dict:
    """One step of Copycat ``runs`` that share one NPDD extraction: the NPDD round unless a run
    still has a round of it to catch up on, then every run's pending rounds; each run's latest
    record (or ``None``), keyed by variant."""
    ex = runs[0].ex
    if not any(r._pending() for r in runs):
        if ex.done:
            raise RuntimeError("copycat already reached its largest budget")
        ex.step()
        for r in runs:
            r._npdd_model = (ex.records[-1]["round"], ex.substitute)
        for r in runs:
            if not r._pending():
                r._checkpoint()  # nothing to train for this round: record that it happened
    out = {}
    for r in runs:
        out[r.config.variant] = None
        for rec in r._pending():
            out[r.config.variant] = r._variant_round(rec)
    return out


def _run_together(runs: list[Copycat]) -> dict:
    """Run ``runs`` (sharing one NPDD extraction) to their largest budget, write their
    ``summary.json`` files (and the extraction's) and return their summaries by variant."""
    ex = runs[0].ex
    with progress_bar(total=len(ex.config.budgets), desc="copycat " + ", ".join(r.config.variant for r in runs),
              disable=not runs[0].progress, unit="budget") as bar:
        while not all(r.done for r in runs):
            before = sum(1 for rec in ex.records if rec["budget"] is not None)
            _step_together(runs)
            bar.update(sum(1 for rec in ex.records if rec["budget"] is not None) - before)
    if ex.out is not None:
        layout.atomic_write(ex.out / "summary.json", json.dumps(ex.summary(), indent=2))
    summaries = {}
    for r in runs:
        summaries[r.config.variant] = r.summary()
        if r.out is not None:
            layout.atomic_write(r.out / "summary.json", json.dumps(summaries[r.config.variant], indent=2))
    return summaries


# -- analyses (notebook 05) ------------------------------------------------------------------------

def label_distribution(labels, num_classes: int, class_names=None):
    """Class histogram of oracle answers (thesis Fig. 28: distribution of the stolen labels):
    a DataFrame with ``class``, ``name``, ``count``, ``fraction``, one row per class (zeros kept)."""
    import pandas as pd

    num_classes = check_positive_int(num_classes, "num_classes")
    labels = check_labels(np.asarray(labels), "labels", num_classes=num_classes)
    counts = np.bincount(labels, minlength=num_classes)
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"class_names: expected {num_classes} names, got {len(names)}")
    total = max(int(counts.sum()), 1)
    return pd.DataFrame({"class": np.arange(num_classes), "name": names, "count": counts,
                         "fraction": counts / total})


def oracle_space(model, x, space: str = "logits", batch_size: int = 512) -> np.ndarray:
    """Points of ``x`` in the model's classification space: ``"logits"`` or ``"penultimate"``
    (the input of the last layer, e.g. the fc1 activations), float32 ``N x d`` (thesis §5.6.1)."""
    import keras

    if space == "logits":
        return models.predict_logits(model, x, batch_size=batch_size)
    if space != "penultimate":
        raise ValueError(f"space: expected 'logits' or 'penultimate', got {space!r}")
    check_images(x, "x", shape=tuple(model.input_shape[1:]))
    feat = keras.Model(model.inputs[0], model.layers[-1].input)
    out = [np.asarray(feat(x[i : i + batch_size], training=False)) for i in range(0, len(x), batch_size)]
    return np.concatenate(out).reshape(len(x), -1).astype(np.float32)


def tsne_embedding(groups: dict, model, *, space: str = "logits", seed: int = 0, perplexity: float = 30.0):
    """t-SNE (van der Maaten & Hinton 2008) of several image groups in the oracle's ``space``
    (thesis §5.6.1, Fig. 26: ODD/PDD vs NPDD-SL points in the oracle's classification space).

    ``groups`` maps a group name (e.g. ``"PDD (test)"``, ``"NPDD"``) to float32 images; all groups
    are embedded jointly. Returns a DataFrame with ``x``, ``y``, ``group`` and ``label`` (the
    oracle's top-1 class of each point)."""
    import pandas as pd
    from sklearn.manifold import TSNE

    if not groups:
        raise ValueError("groups: expected at least one named group of images")
    names, feats, labels = [], [], []
    for name, x in groups.items():
        f = oracle_space(model, x, space)
        feats.append(f)
        labels.append(models.predict_labels(model, x))
        names += [name] * len(x)
    f = np.concatenate(feats).astype(np.float64)
    if len(f) < 5:
        raise ValueError(f"groups: t-SNE needs at least 5 points, got {len(f)}")
    perp = min(float(perplexity), (len(f) - 1) / 3.0)
    emb = TSNE(n_components=2, perplexity=perp, init="pca", random_state=int(seed)).fit_transform(f)
    return pd.DataFrame({"x": emb[:, 0], "y": emb[:, 1], "group": names, "label": np.concatenate(labels)})


def lrp_correlations(oracle_model, copycat_model, x, *, rule: str = "composite", target: str = "oracle",
                     **lrp_kw) -> dict:
    """LRP heatmaps of oracle and copycat on the same images and their per-image Pearson
    correlation (thesis §5.6.6, Figs. 34-40; :func:`stealnb.core.lrp.lrp`, composite z^B/gamma/eps/0 rule).

    ``target="oracle"`` explains the oracle's predicted class in both models (same question
    asked of both); ``"own"`` explains each model's own prediction. Returns ``{"oracle": N x H x W,
    "copycat": N x H x W, "correlation": (N,) float64 (NaN where a heatmap is constant),
    "oracle_label", "copycat_label"}``."""
    from ..core.lrp import heatmap_correlation, lrp

    if target not in ("oracle", "own"):
        raise ValueError(f"target: expected 'oracle' or 'own', got {target!r}")
    y_o = models.predict_labels(oracle_model, x)
    y_c = models.predict_labels(copycat_model, x)
    r_o = lrp(oracle_model, x, target=y_o, rule=rule, **lrp_kw)
    r_c = lrp(copycat_model, x, target=y_o if target == "oracle" else y_c, rule=rule, **lrp_kw)
    return {"oracle": r_o, "copycat": r_c, "correlation": heatmap_correlation(r_o, r_c),
            "oracle_label": y_o, "copycat_label": y_c}


# Illustrative per-1,000-call prices: the thesis' §6.1.7 (API costs) is missing from our copy of
# the text, so these are round example numbers in the range of public vision-API list prices,
# NOT quotes of any provider. Pass your own ``prices``.
EXAMPLE_PRICES_PER_1000 = {"example $1.00/1k": 1.00, "example $1.50/1k": 1.50, "example $4.00/1k": 4.00}


def api_cost_table(summary: dict, prices: dict | None = None):
    """Attack cost at each budget of a Copycat/extraction ``summary``: ``queries x price / 1000``
    for each price (USD per 1,000 calls; default :data:`EXAMPLE_PRICES_PER_1000`, illustrative),
    next to the achieved ``relative_f1`` and ``agreement`` (thesis §5.6.7, attack viability).
    Returns a DataFrame: ``budget``, ``queries``, ``relative_f1``, ``agreement``, one
    ``cost: <price name>`` column per price."""
    import pandas as pd

    prices = EXAMPLE_PRICES_PER_1000 if prices is None else prices
    if not prices:
        raise ValueError("prices: expected at least one {name: USD per 1,000 calls}")
    for name, p in prices.items():
        check_real(p, f"prices[{name!r}] (USD per 1,000 calls)", 0.0)
    if not isinstance(summary, dict) or not summary.get("budgets"):
        raise ValueError("summary: expected a run summary with per-budget results under 'budgets'")
    rows = []
    for b, r in sorted(summary["budgets"].items(), key=lambda kv: int(kv[0])):
        row = {"budget": int(b), "queries": int(r["queries"]), "relative_f1": r.get("relative_f1"),
               "agreement": r.get("agreement")}
        for name, p in prices.items():
            row[f"cost: {name}"] = int(r["queries"]) * float(p) / 1000.0
        rows.append(row)
    return pd.DataFrame(rows)


def _oracle_f1_from_secret(results, profile, dataset, arch):
    path = layout.secret_dir(results, profile, dataset, arch) / "metrics.json"
    if not path.is_file():
        return None
    cm = np.asarray(json.loads(path.read_text()).get("confusion_matrix", []), dtype=np.float64)
    if cm.ndim != 2 or cm.size == 0:
        return None
    tp = np.diag(cm)
    denom = cm.sum(0) + cm.sum(1)
    f1 = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)
    return float(f1.mean())


def comparison_table(results, profile: str, dataset: str, arch: str):
    """Copycat variants and ActiveThief strategies of one secret side by side, from the
    ``summary.json`` files under ``results`` (:mod:`stealnb.core.layout`).

    One row per (method, budget); columns:

    * ``family`` -- ``"copycat"`` or ``"activethief"``; ``method`` -- variant or AL strategy;
    * ``budget`` -- NPDD / thief-pool query budget (summary key); ``n_seeds`` -- seeds found;
    * ``queries_mean`` -- total oracle queries (Copycat PDD variants add ``pdd_size``);
    * ``agreement_mean/_std``, ``macro_f1_mean/_std``, ``relative_f1_mean/_std`` -- over seeds,
      std with ddof=1 (NaN for a single seed). Relative F1 of extraction runs uses the oracle's
      macro-F1 from the secret's ``metrics.json`` confusion matrix (the same secret the Copycat
      summaries report), NaN if neither is available.

    Returns an empty DataFrame with these columns when nothing is found.
    """
    import pandas as pd

    prof_dir = layout.profile_dir(results, profile)
    key = layout.secret_dir(results, profile, dataset, arch).name
    oracle_f1 = _oracle_f1_from_secret(results, profile, dataset, arch)
    rows = []
    for family, sub in (("copycat", "copycat"), ("activethief", "extraction")):
        base = prof_dir / sub / key
        for path in sorted(base.glob("*/seed*/summary.json")) if base.is_dir() else []:
            s = json.loads(path.read_text())
            method = path.parent.parent.name
            of1 = (s.get("oracle") or {}).get("macro_f1") or oracle_f1
            for b, r in s.get("budgets", {}).items():
                rel = r.get("relative_f1")
                if rel is None and of1 and r.get("macro_f1") is not None:
                    rel = r["macro_f1"] / of1
                rows.append({"family": family, "method": method, "budget": int(b), "seed": path.parent.name,
                             "queries": r.get("queries"), "agreement": r.get("agreement"),
                             "macro_f1": r.get("macro_f1"), "relative_f1": rel})
    cols = ["family", "method", "budget", "n_seeds", "queries_mean", "agreement_mean", "agreement_std",
            "macro_f1_mean", "macro_f1_std", "relative_f1_mean", "relative_f1_std"]
    if not rows:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame(rows)
    for c in ("queries", "agreement", "macro_f1", "relative_f1"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    g = df.groupby(["family", "method", "budget"], sort=True)
    out = g.agg(n_seeds=("seed", "nunique"), queries_mean=("queries", "mean"),
                agreement_mean=("agreement", "mean"), agreement_std=("agreement", "std"),
                macro_f1_mean=("macro_f1", "mean"), macro_f1_std=("macro_f1", "std"),
                relative_f1_mean=("relative_f1", "mean"), relative_f1_std=("relative_f1", "std")).reset_index()
    order = {"copycat": 0, "activethief": 1}
    out = out.sort_values(["family", "method", "budget"], key=lambda s: s.map(order) if s.name == "family" else s)
    return out[cols].reset_index(drop=True)

"""The ActiveThief extraction loop (Pal et al. 2020; thesis 000 §4.3, Fig. 41).

1. A random validation split V and a random seed set S0 are drawn from the thief pool and
   labelled by the oracle (top-1 labels). **V's queries count against the budget**: early
   stopping needs labels, and an attacker pays for every label.
2. Each round: train the substitute on everything labelled so far (from scratch by default,
   warm start optional; early stopping on V), evaluate it on the secret's test set
   (agreement, accuracy, macro-F1), then let the strategy select the next k pool samples and
   query the oracle for them.
3. At every requested budget also compute FGSM transferability.

Every round is checkpointed (selected indices, substitute weights, RNG state, the round
records); labels are not stored there but re-asked from the oracle, whose ledger answers
already-paid samples for free. ``resume=True`` continues from the last checkpoint and ends
with the same selections and metrics as an uninterrupted run with the same seed.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..attacks import evasion
from ..core import layout, metrics, models
from ..core._checks import check_images, check_labels, check_positive_int
from ..core.progress import progress_bar
from ..core.profiles import Profile, check_profile
from ..core.train import Recipe, enable_determinism, fit

ROUND_FIELDS = (
    "round", "queries", "labelled", "k", "agreement", "accuracy", "macro_f1", "val_accuracy",
    "val_macro_f1", "epochs_trained", "best_epoch", "steps", "top_class_share", "classes_predicted", "seconds", "budget", "transfer",
)


#: What a thief pool's images depend on (not where its file lives): a run resumes, or is read back,
#: only on a pool with the same values (:meth:`stealnb.core.data.Pool.describe`).
POOL_IDENTITY = ("name", "size", "transform", "sources")


@dataclass(frozen=True)
class ExtractionConfig(Recipe):
    """What an extraction run needs besides the oracle, pool and test data.

    The substitute's training recipe each round (``epochs`` ... ``augment``, keyword-only) is a
    :class:`stealnb.core.train.Recipe` (:meth:`fit_options`, the arguments of
    :func:`stealnb.core.train.fit`; from the profile, :meth:`from_profile`)."""

    strategy: str
    substitute: str
    budgets: tuple[int, ...]
    seed_size: int
    val_size: int
    round_size: int
    warm_start: bool = False
    fgsm_eps: float = 0.25
    seed: int = 0
    strategy_options: dict = field(default_factory=dict)

    def __post_init__(self):
        budgets = tuple(int(b) for b in self.budgets)
        if not budgets or list(budgets) != sorted(set(budgets)):
            raise ValueError(f"budgets: expected strictly increasing query counts, got {self.budgets!r}")
        for name in ("seed_size", "val_size", "round_size"):
            check_positive_int(getattr(self, name), name, minimum=0 if name == "val_size" else 1)
        self.check_recipe()
        first = self.seed_size + self.val_size
        if budgets[0] < first:
            raise ValueError(
                f"budgets: the smallest budget ({budgets[0]}) must cover the seed set and the "
                f"validation split ({self.seed_size} + {self.val_size} = {first} queries)"
            )
        object.__setattr__(self, "budgets", budgets)

    @classmethod
    def from_profile(cls, profile, strategy: str, **overrides) -> "ExtractionConfig":
        kw = dict(
            strategy=strategy, substitute=profile.substitute, budgets=profile.budgets,
            seed_size=profile.seed_size, val_size=profile.val_size, round_size=profile.round_size,
            fgsm_eps=profile.fgsm_eps, **profile.substitute_fit(),
            strategy_options=dict(getattr(profile, "strategy_options", {}).get(strategy, {})),
        )
        kw.update(overrides)
        return cls(**kw)


class Extraction:
    """One resumable extraction run writing ``rounds.jsonl``, ``summary.json`` and a checkpoint
    into ``out``. Use :meth:`run` for the whole budget or :meth:`step` for one round."""

    def __init__(self, oracle, pool, x_test, y_test, config: ExtractionConfig, *, secret=None,
                 out: str | Path | None = None, resume: bool = False, progress: bool = False):
        self.oracle, self.pool, self.config, self.secret = oracle, pool, config, secret
        self.x_test = check_images(x_test, "x_test")
        self.y_test = check_labels(y_test, "y_test", n=len(x_test))
        self.out = Path(out) if out is not None else None
        self.progress = progress
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
        from .selectors import REGISTRY

        self.strategy = REGISTRY[config.strategy](**config.strategy_options)
        self.num_classes = int(np.max(y_test)) + 1 if secret is None else int(secret.output_shape[-1])
        # The secret's own test labels: the reference for agreement (evaluation only, no budget).
        self.secret_test_labels = (
            models.predict_labels(secret, self.x_test) if secret is not None else None
        )
        if oracle.budget is not None and oracle.budget < config.budgets[-1]:
            raise ValueError(f"oracle budget {oracle.budget} is below the largest requested budget {config.budgets[-1]}")
        enable_determinism(config.seed)
        self.records: list[dict] = []
        self.substitute = None
        if resume and self.out is not None and layout.checkpointed(self.out, "extraction"):
            self._load_checkpoint()
        else:
            self._start()

    # -- state -------------------------------------------------------------------------------
    def _start(self) -> None:
        cfg = self.config
        self.rng = np.random.default_rng(cfg.seed)
        if cfg.seed_size + cfg.val_size > len(self.pool):
            raise ValueError(f"pool has {len(self.pool)} samples, fewer than seed_size + val_size")
        first = self.rng.choice(len(self.pool), cfg.seed_size + cfg.val_size, replace=False)
        self.val_idx = np.sort(first[: cfg.val_size]).astype(np.int64)
        self.labelled_idx = first[cfg.val_size:].astype(np.int64)
        self.round = 0
        if self.out is not None:
            (self.out / "rounds.jsonl").unlink(missing_ok=True)

    def _checkpoint(self) -> None:
        if self.out is None:
            return
        ck = self.out / "checkpoint"
        ck.mkdir(exist_ok=True)
        if self.substitute is not None:
            self.substitute.save_weights(ck / "substitute.weights.h5.tmp.weights.h5")
            os.replace(ck / "substitute.weights.h5.tmp.weights.h5", ck / "substitute.weights.h5")
        state = {
            "round": self.round,
            "val_idx": self.val_idx.tolist(),
            "labelled_idx": self.labelled_idx.tolist(),
            "rng": self.rng.bit_generator.state,
            "records": self.records,
            "config": asdict(self.config),
            "pool": self.pool.describe(),
            "has_weights": self.substitute is not None,
        }
        layout.atomic_write(ck / "state.json", json.dumps(state))
        layout.atomic_write(self.out / "rounds.jsonl", "".join(json.dumps(r) + "\n" for r in self.records))

    def _load_checkpoint(self) -> None:
        state = json.loads((self.out / "checkpoint" / "state.json").read_text())
        saved = state["config"]
        mine = json.loads(json.dumps(asdict(self.config)))
        if saved != mine:
            diff = sorted(k for k in mine if saved.get(k) != mine[k])
            raise ValueError(f"cannot resume: the checkpoint was written with other settings ({', '.join(diff)})")
        saved, pool = state.get("pool"), self.pool.describe()
        # Older checkpoints lack the pool's description.
        if saved is not None and any(saved.get(k) != pool.get(k) for k in POOL_IDENTITY):
            raise ValueError(f"cannot resume: the checkpoint was written with another thief pool ({saved['name']}, "
                             f"{saved['size']} images, transform {saved['transform']}, {len(saved.get('sources', []))} "
                             f"source photos); this one: {pool['name']}, {pool['size']} images, transform "
                             f"{pool['transform']}, {len(pool.get('sources', []))} source photos")
        self.round = int(state["round"])
        self.val_idx = np.asarray(state["val_idx"], np.int64)
        self.labelled_idx = np.asarray(state["labelled_idx"], np.int64)
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = state["rng"]
        self.records = state["records"]
        if state["has_weights"] and self.config.warm_start:
            self.substitute = self._new_substitute()
            self.substitute.load_weights(self.out / "checkpoint" / "substitute.weights.h5")

    def _new_substitute(self):
        return models.build(self.config.substitute, num_classes=self.num_classes,
                            seed=self.config.seed * 1000 + self.round)

    # -- one round ---------------------------------------------------------------------------
    @property
    def spent(self) -> int:
        return int(len(self.val_idx) + len(self.labelled_idx))

    def query_stream(self) -> np.ndarray:
        """The images the oracle was paid for, in query order: the validation split, the seed set,
        then each round's picks, each distinct image once (:func:`stealnb.extraction.oracle.distinct`)."""
        from .oracle import distinct

        return distinct(self.pool.get(np.concatenate([self.val_idx, self.labelled_idx])))

    @property
    def done(self) -> bool:
        return self.spent >= self.config.budgets[-1] and len(self.records) > 0 and self.records[-1]["queries"] >= self.config.budgets[-1]

    def _labels(self, idx: np.ndarray) -> np.ndarray:
        return np.asarray(self.oracle.query(self.pool.get(idx)), dtype=np.int64)

    def step(self) -> dict:
        """Query pending labels, train, evaluate and select the next batch; returns the round record."""
        if self.done:
            raise RuntimeError("extraction already reached its largest budget")
        cfg, t = self.config, {}
        t0 = time.perf_counter()
        y_val = self._labels(self.val_idx) if len(self.val_idx) else None
        y_lab = self._labels(self.labelled_idx)
        t["query"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        if self.substitute is None or not cfg.warm_start:
            self.substitute = self._new_substitute()
        validation = (self.pool.get(self.val_idx), y_val) if y_val is not None else None
        # Canonical order (sorted pool index): the substitute depends on the labelled set, not on
        # the order the strategy picked it in, so strategies that pick the same set tie.
        order = np.argsort(self.labelled_idx, kind="stable")
        options = cfg.fit_options()
        if validation is None:
            options.update(patience=None, monitor=None)
        hist = fit(
            self.substitute, self.pool.get(self.labelled_idx[order]), y_lab[order], validation=validation,
            seed=cfg.seed * 1000 + self.round, progress=self.progress, desc=f"round {self.round}", **options,
        )
        t["train"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        sub_test = models.predict_labels(self.substitute, self.x_test)
        rec = {
            "round": self.round,
            "queries": self.spent,
            "labelled": int(len(self.labelled_idx)),
            "k": int(len(self.labelled_idx)) if self.round == 0 else int(self.records[-1]["next_k"]),
            "agreement": metrics.agreement(self.secret_test_labels, sub_test) if self.secret_test_labels is not None else None,
            "accuracy": metrics.accuracy(self.y_test, sub_test),
            "macro_f1": metrics.macro_f1(self.y_test, sub_test, self.num_classes),
            "val_accuracy": hist["val_accuracy"][hist["best_epoch"]] if "best_epoch" in hist else None,
            "val_macro_f1": hist["val_macro_f1"][hist["best_epoch"]] if "best_epoch" in hist else None,
            "epochs_trained": len(hist["loss"]),
            "best_epoch": hist.get("best_epoch"),
            "steps": hist["steps"],
            **metrics.collapse(sub_test, self.num_classes),
            "budget": self.spent if self.spent in cfg.budgets else None,
            "transfer": None,
        }
        if rec["budget"] is not None and self.secret is not None:
            rec["transfer"] = evasion.transferability(self.secret, self.substitute, self.x_test, self.y_test, eps=cfg.fgsm_eps)
        t["eval"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        next_budget = next((b for b in cfg.budgets if b > self.spent), None)
        rec["next_k"] = 0
        if next_budget is not None:
            k = min(cfg.round_size, next_budget - self.spent)
            taken = np.concatenate([self.val_idx, self.labelled_idx])
            new = self.strategy.select(self.substitute, self.pool, taken, k, self.rng,
                                       total_budget=cfg.budgets[-1], progress=self.progress)
            self.labelled_idx = np.concatenate([self.labelled_idx, np.asarray(new, np.int64)])
            rec["next_k"] = int(k)
        t["select"] = time.perf_counter() - t0
        rec["seconds"] = {k: round(v, 3) for k, v in t.items()}
        self.records.append(rec)
        self.round += 1
        self._checkpoint()
        return rec

    def run(self) -> dict:
        """Run rounds until the largest budget; write ``summary.json``; return the summary."""
        with progress_bar(total=self.config.budgets[-1], initial=min(self.spent, self.config.budgets[-1]),
                  desc=f"extract {self.config.strategy}", disable=not self.progress, unit="q") as bar:
            while not self.done:
                before = self.spent
                self.step()
                bar.update(self.spent - before)
        summary = self.summary()
        if self.out is not None:
            layout.atomic_write(self.out / "summary.json", json.dumps(summary, indent=2))
        return summary

    def summary(self) -> dict:
        per_budget = {}
        elapsed = 0.0
        for r in self.records:
            elapsed += sum(r["seconds"].values())
            if r["budget"] is not None:
                tr = r["transfer"] or {}
                per_budget[str(r["budget"])] = {
                    "queries": r["queries"], "agreement": r["agreement"], "accuracy": r["accuracy"],
                    "macro_f1": r["macro_f1"], "top_class_share": r.get("top_class_share"),
                    "classes_predicted": r.get("classes_predicted"), "adv_agreement": tr.get("adv_agreement"),
                    "transfer_rate": tr.get("transfer_rate"),
                    "secret_error_under_transfer": tr.get("secret_error_under_transfer"),
                    "seconds": round(elapsed, 3), "round": r["round"],
                }
        return {
            "config": asdict(self.config),
            "pool": self.pool.describe(),
            "oracle_spent": int(self.oracle.spent),
            "budgets": per_budget,
            "rounds": len(self.records),
            "seconds": round(elapsed, 3),
        }


def finished_summary(out, config: ExtractionConfig, pool) -> dict | None:
    """The ``summary.json`` of the finished run in ``out`` when it ran with ``config`` on ``pool``
    (a :class:`~stealnb.core.data.Pool`: the same :data:`POOL_IDENTITY`), else ``None``. The
    checks a resume makes (:meth:`Extraction._load_checkpoint`), without building the substitute,
    loading its weights or predicting the secret's test labels: how a chapter reads back runs that
    tasks of their own trained (:func:`stealnb.experiments.pools.run_pools`). A run it does not
    return is resumed (or refused) by :func:`run_extraction` as usual."""
    out = Path(out)
    if not layout.checkpointed(out, "extraction"):
        return None
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    saved, mine = summary.get("pool") or {}, pool.describe()
    if summary.get("config") != json.loads(json.dumps(asdict(config))) \
            or any(saved.get(k) != mine.get(k) for k in POOL_IDENTITY):
        return None
    return summary


def configure(prof, strategy: str, *, seed: int = 0, dataset: str | None = None,
              allow_problem_domain: bool = False, **overrides) -> ExtractionConfig:
    """The :class:`ExtractionConfig` of a ``strategy`` run with profile ``prof`` (``overrides``
    change its fields), once its strategy, substitute and pool are known to work for a secret
    trained on ``dataset`` (:func:`stealnb.core.data.check_pool`: its size and transform, and not the
    secret's own dataset unless ``allow_problem_domain``): argument errors surface here, before
    any data is loaded or model trained."""
    from ..core import data
    from .selectors import REGISTRY

    config = ExtractionConfig.from_profile(prof, strategy, seed=seed, **overrides)
    REGISTRY[config.strategy]  # an unknown name is a KeyError listing the known ones
    models.REGISTRY[config.substitute]
    data.check_pool(prof.pool, prof.pool_size, need=config.budgets[-1], transform=prof.pool_transform,
                    secret_dataset=dataset, allow_problem_domain=allow_problem_domain)
    return config


def collapse_warnings(records) -> list[str]:
    """One line per round record whose substitute put more than
    :data:`~stealnb.core.metrics.COLLAPSE_SHARE` of the secret's test set into one class: a
    near-constant model (the recipe or the pool failed it), whatever its agreement says."""
    return [f"stealnb: warning: round {r['round']} ({r['queries']} queries): the substitute predicts one class "
            f"for {r['top_class_share']:.0%} of the test set ({r.get('classes_predicted')} classes predicted): it "
            f"has collapsed towards a constant model"
            for r in records if (r.get("top_class_share") or 0) > metrics.COLLAPSE_SHARE]


def prepare_run(out: Path, resume: bool, dataset: str, arch: str, prof, results, *, kind: str = "extraction",
                secret_dir=None, data_root=None, progress: bool = False, oracle=None, load: bool = True):
    """Set-up shared by :func:`run_extraction` and :func:`stealnb.extraction.copycat.run_copycat` (``kind``
    ``"copycat"``): unless resuming from a checkpoint in ``out``, make it a new run folder
    (:func:`stealnb.core.layout.new_run_dir`: an earlier run there is replaced, or kept when resuming;
    a folder holding files stealnb did not write is refused), then get the secret (from
    ``secret_dir``, else trained or loaded under ``results``) and load the dataset. Returns
    ``(secret, dataset)`` (``load=False``: the folder only, ``None``).

    An external ``oracle`` whose query ledger already exists inside ``out`` (e.g. an ``HttpOracle``
    opened on ``out / "ledger.bin"``) remembers those paid queries in memory: deleting ``out`` would
    throw away their record on disk, so a fresh run (``resume=False``) is refused with a
    ``ValueError``."""
    from ..core import data
    from ..core.train import ensure_secret, load_secret

    ledger = getattr(oracle, "ledger", None)
    if not resume and out.exists() and ledger is not None and Path(ledger).exists() \
            and Path(ledger).resolve().is_relative_to(out.resolve()):
        raise ValueError(
            f"resume=False would delete {out}, which holds the given oracle's query ledger {ledger}: "
            f"clear {out} before opening the oracle (as `stealnb extract --oracle-url` does) and pass "
            f"resume=True, or keep the ledger elsewhere")
    if not (resume and layout.checkpointed(out, kind)):
        # Resuming without a checkpoint starts afresh in place, keeping a ledger of paid queries.
        layout.new_run_dir(out, kind, replace=not resume)
    if not load:
        return None
    if secret_dir is not None:
        secret, _ = load_secret(secret_dir)
    else:
        secret, _ = ensure_secret(dataset, arch, prof, results, data_root=data_root, progress=progress)
    return secret, data.load_dataset(dataset, root=data_root)


def run_extraction(dataset: str, arch: str, strategy: str, profile: Profile, *, seed: int = 0,
                   results="results", out=None, data_root=None, resume: bool = True,
                   progress: bool = False, oracle=None, secret_dir=None, allow_problem_domain: bool = False,
                   thief_pool=None, **overrides) -> Extraction:
    """Run (or resume) one ActiveThief extraction of the ``dataset``/``arch`` secret with the
    profile's pool (and pool transform), substitute and budgets; results go to
    :func:`stealnb.core.layout.extraction_dir` unless ``out`` is given. The secret is trained first when
    it is not under ``results`` yet. A pool holding ``dataset``'s own images is refused unless
    ``allow_problem_domain`` (:func:`configure`).

    ``secret_dir`` uses a saved secret (``model.keras`` + ``metrics.json``) instead of the one under
    ``results``. ``thief_pool`` is the profile's pool built already (a :class:`~stealnb.core.data.Pool`
    with the profile's ``pool``, ``pool_transform`` and ``pool_size``; checked), so that many runs on
    one pool build it once (:func:`stealnb.experiments.pools.run_pools`). ``oracle`` replaces the in-process
    :class:`~stealnb.extraction.oracle.Oracle` (e.g. an ``HttpOracle``); ``overrides`` change :class:`ExtractionConfig` fields (``budgets=(...)``, ``round_size=``...).
    With ``resume=False`` an earlier run in ``out`` (ledger included) is deleted first; a folder
    holding files stealnb did not write is refused (:func:`stealnb.core.layout.check_run_dir`).
    Returns the finished :class:`Extraction` (``.summary()``, ``.records``, ``.substitute``).
    """
    from ..core import data
    from .oracle import Oracle

    prof = check_profile(profile)
    config = configure(prof, strategy, seed=seed, dataset=dataset, allow_problem_domain=allow_problem_domain,
                       **overrides)
    if thief_pool is not None:
        got = (thief_pool.name, thief_pool.transform, len(thief_pool))
        want = (prof.pool, prof.pool_transform, prof.pool_size if prof.pool_size is not None else len(thief_pool))
        if got != want:
            raise ValueError(f"thief_pool: expected the profile's pool {want[0]!r} (transform {want[1]}, {want[2]} "
                             f"images), got {got[0]!r} (transform {got[1]}, {got[2]} images)")
    out = Path(out) if out is not None else layout.extraction_dir(results, prof.name, dataset, arch, strategy, seed)
    secret, ds = prepare_run(out, resume, dataset, arch, prof, results, secret_dir=secret_dir,
                             data_root=data_root, progress=progress, oracle=oracle)
    # One pool per profile (seed 0): every strategy and seed draws from the same thief images.
    pool = thief_pool if thief_pool is not None else data.load_pool(
        prof.pool, root=data_root, n=prof.pool_size, seed=0, transform=prof.pool_transform)
    if oracle is None:
        oracle = Oracle(secret, output="label", budget=config.budgets[-1], ledger=out / "ledger.bin")
    ex = Extraction(oracle, pool, ds.x_test, ds.y_test, config, secret=secret, out=out,
                    resume=resume, progress=progress)
    ex.run()
    return ex

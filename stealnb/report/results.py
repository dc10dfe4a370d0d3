"""Result files -> tables: what the notebooks and the book show, next to the thesis' numbers.

Everything here reads the files that the runs wrote under ``results/<profile>/`` (see
:mod:`stealnb.core.layout`) and returns pandas DataFrames; nothing is hard-coded except the
thesis' published numbers, which come from ``stealnb/reference/thesis_tables.json``
(Schmidl 2021, Tables 4-11).

* :func:`load_secrets`, :func:`secrets_table` -- one row per trained secret (thesis Table 5);
* :func:`load_runs`, :func:`load_rounds` -- every extraction run and every round record;
* :func:`agreement_table` (Tables 6-8), :func:`transferability_table` (Tables 9-11),
  :func:`best_strategy_table` -- mean ± std over seeds per secret x strategy x budget, with the
  thesis' number in a side-by-side column;
* :func:`thesis_style` -- the same as a strategy x budget grid of "mean ± std (n)" strings.

**Comparing with the thesis.** :func:`thesis_setting` maps our setting to the thesis': a
dataset of the thesis (MNIST, CIFAR-10, GTSRB) with a thesis secret architecture, the VGG16
substitute and a thesis budget (2,500/5,000/10,000 queries) is the *same setting*
(:data:`SAME`). Anything else -- the embedded ``digits`` data, the small CPU architectures of
the ``demo``/``ci`` profiles, their smaller budgets -- gets the *closest* thesis setting and is
labelled :data:`REFERENCE`: shown for orientation, not a like-for-like comparison. The mapping:
digits and Fashion-MNIST -> MNIST (grey 28x28-class digit/clothing images, duplicated to 3
channels), gtsrb43 -> GTSRB (10 classes in the thesis); an architecture the thesis did not train
-> the VGG16 secret (in the thesis the substitute is VGG16, so a VGG16 secret is its
"substitute = secret architecture" case, as in our ``demo``/``ci`` profiles); a budget ->
the thesis budget at the same fraction of the largest budget (1/4, 1/2, 1 -> 2.5k, 5k, 10k).

Also here, for the notebooks: reading the oracle's answers back from a query ledger without
paying (:func:`ledger_labels`), the pool images labelled in each round (:func:`round_batches`),
a not-yet-run :class:`~stealnb.extraction.loop.Extraction` for stepping round by round
(:func:`open_extraction`, in a scratch folder), class counts and 2-D embeddings for the EDA.
"""
from __future__ import annotations

import functools
import json
import math
import warnings
from pathlib import Path

import numpy as np

from ..core import layout, metrics
from ..core._checks import check_images, check_labels, check_positive_int
from ..core.profiles import Profile, check_profile

THESIS_BUDGETS = (2_500, 5_000, 10_000)
THESIS_ARCHS = ("vgg16", "vgg19", "alexnet", "resnet50", "resnet101")
THESIS_STRATEGIES = ("random", "uncertainty", "kcenter", "dfal", "dfal+kcenter")
THESIS_SUBSTITUTE = "vgg16"
SAME = "same setting"
REFERENCE = "reference only (closest thesis setting)"

# our dataset -> (thesis dataset, same data?)
THESIS_DATASET = {
    "mnist": ("mnist", True), "cifar10": ("cifar10", True), "gtsrb": ("gtsrb", True),
    "digits": ("mnist", False), "fashion-mnist": ("mnist", False), "gtsrb43": ("gtsrb", False),
}
THESIS_DATASET_NAMES = {"mnist": "MNIST", "cifar10": "CIFAR-10", "gtsrb": "GTSRB (10 classes)"}

_TIMINGS = ("query", "train", "eval", "select")


# -- the thesis' numbers -------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def thesis_tables() -> dict:
    """The thesis' published tables (Schmidl 2021, Tables 4-11), as stored in
    ``stealnb/reference/thesis_tables.json`` (percentages as printed in the thesis)."""
    path = Path(__file__).resolve().parents[1] / "reference" / "thesis_tables.json"
    return json.loads(path.read_text())


def thesis_setting(dataset: str, arch: str, budget: int | None = None, budgets=None,
                   substitute: str | None = None) -> dict | None:
    """The thesis setting to compare ``dataset``/``arch`` (and ``budget`` out of the run's
    ``budgets``, trained with ``substitute``) with; ``None`` when the thesis has nothing close.

    Returns ``thesis_dataset``, ``thesis_arch``, ``thesis_budget`` (None without ``budget``) and
    ``thesis_match`` (:data:`SAME` or :data:`REFERENCE`); see the module docstring for the mapping.
    """
    mapped = THESIS_DATASET.get(dataset)
    if mapped is None:
        return None
    tds, same = mapped
    tarch = arch if arch in THESIS_ARCHS else "vgg16"
    same = same and arch in THESIS_ARCHS and (substitute is None or substitute == THESIS_SUBSTITUTE)
    tb = None
    if budget is not None:
        budget = check_positive_int(budget, "budget")
        if budget in THESIS_BUDGETS and same:
            tb = budget
        else:
            same = False
            top = max([int(b) for b in budgets] if budgets else [budget])
            if top < budget:
                raise ValueError(f"budgets: the largest budget ({top}) is below budget={budget}")
            ratio = budget / top
            tb = min(THESIS_BUDGETS, key=lambda t: (abs(t / THESIS_BUDGETS[-1] - ratio), -t))
    return {"thesis_dataset": tds, "thesis_arch": tarch, "thesis_budget": tb,
            "thesis_match": SAME if same else REFERENCE}


def thesis_table5(dataset: str | None = None):
    """Thesis Table 5 (secret accuracy: best fold, mean, std over 5 folds; %) as a DataFrame with
    ``dataset``, ``arch``, ``params_total``, ``best``, ``mean``, ``std`` (fractions), optionally one dataset."""
    import pandas as pd

    t = thesis_tables()
    rows = []
    for arch, per in t["secret_accuracy_table5"].items():
        for ds, v in per.items():
            if dataset is None or ds == dataset:
                rows.append({"dataset": ds, "arch": arch,
                             "params_total": t["model_parameters_table4"].get(arch, {}).get("total"),
                             "best": v["top"] / 100, "mean": v["mean"] / 100, "std": v["std"] / 100})
    if dataset is not None and not rows:
        raise KeyError(f"dataset: the thesis has no {dataset!r}; expected one of {sorted(THESIS_DATASET_NAMES)}")
    return pd.DataFrame(rows, columns=["dataset", "arch", "params_total", "best", "mean", "std"])


def _thesis_agreement(tds, tarch, strategy, tb):
    try:
        return thesis_tables()["agreement_tables6to8"][tds][tarch][strategy][str(tb)] / 100
    except KeyError:
        return None


def _thesis_transfer(tds, tarch, strategy):
    try:
        return thesis_tables()["transferability_10k_tables9to11"][tds][strategy][tarch] / 100
    except KeyError:
        return None


# -- locating runs -------------------------------------------------------------------------------

def split_key(key: str, results=None, profile: str | None = None) -> tuple[str, str]:
    """``(dataset, arch)`` of a ``<dataset>-<arch>`` results folder name.

    Names may contain dashes (``fashion-mnist-cnn-small``), so the secret's ``metrics.json`` is
    asked first (when ``results``/``profile`` are given), then the registered dataset names
    (longest match). Raises ``ValueError`` when neither tells.
    """
    if results is not None and profile is not None:
        m = layout.profile_dir(results, profile) / "secrets" / key / "metrics.json"
        if m.is_file():
            meta = json.loads(m.read_text())
            if meta.get("dataset") and meta.get("arch"):
                return meta["dataset"], meta["arch"]
    from ..core.data import DATASETS

    for name in sorted(DATASETS.names(), key=len, reverse=True):
        if key.startswith(name + "-") and len(key) > len(name) + 1:
            return name, key[len(name) + 1:]
    raise ValueError(f"results folder {key!r}: cannot tell dataset from architecture (expected "
                     f"'<dataset>-<arch>' with a registered dataset, or a secrets/{key}/metrics.json)")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def load_secrets(results, profile: str):
    """One row per trained secret under ``results/<profile>/secrets/`` (from its ``metrics.json``):
    ``dataset``, ``arch``, ``folds``, ``best``, ``best_fold``, ``mean``, ``std`` (test accuracy over
    folds, population std as :meth:`stealnb.core.train.SecretResult.summary` writes it),
    ``fold_test_accuracy``, ``params_total``, ``params_trainable``, ``seconds``, ``path``."""
    import pandas as pd

    cols = ["dataset", "arch", "folds", "best", "best_fold", "mean", "std", "fold_test_accuracy",
            "params_total", "params_trainable", "seconds", "path"]
    base = layout.profile_dir(results, profile) / "secrets"
    rows = []
    for m in sorted(base.glob("*/metrics.json")) if base.is_dir() else []:
        s = _read_json(m)
        missing = [k for k in ("dataset", "arch", "fold_test_accuracy", "test_accuracy") if k not in s]
        if missing:
            raise ValueError(f"{m}: missing {', '.join(missing)} (expected a metrics.json from stealnb.core.train)")
        acc = np.asarray(s["fold_test_accuracy"], np.float64)
        rows.append({"dataset": s["dataset"], "arch": s["arch"], "folds": len(acc), "best": float(s["test_accuracy"]),
                     "best_fold": s.get("best_fold"), "mean": float(acc.mean()), "std": float(acc.std()),
                     "fold_test_accuracy": acc.tolist(), "params_total": s.get("params_total"),
                     "params_trainable": s.get("params_trainable"), "seconds": s.get("seconds"),
                     "path": str(m.parent)})
    return pd.DataFrame(rows, columns=cols)


def secrets_table(results, profile: str, reference: str = "closest"):
    """Thesis Table 5 for our secrets: :func:`load_secrets` plus ``thesis_dataset``,
    ``thesis_arch``, ``thesis_params``, ``thesis_best``, ``thesis_mean``, ``thesis_std`` and
    ``thesis_match``. ``reference="closest"`` fills them from the closest thesis setting (labelled
    :data:`REFERENCE`), ``"exact"`` only for the same dataset and architecture (else NaN/None)."""
    if reference not in ("closest", "exact"):
        raise ValueError(f"reference: expected 'closest' or 'exact', got {reference!r}")
    df = load_secrets(results, profile)
    t = thesis_tables()
    extra = {k: [] for k in ("thesis_dataset", "thesis_arch", "thesis_params", "thesis_best", "thesis_mean",
                             "thesis_std", "thesis_match")}
    for ds, arch in zip(df["dataset"], df["arch"]):
        st = thesis_setting(ds, arch)
        if st is not None and reference == "exact" and st["thesis_match"] != SAME:
            st = None
        v = t["secret_accuracy_table5"].get(st["thesis_arch"], {}).get(st["thesis_dataset"]) if st else None
        extra["thesis_dataset"].append(st["thesis_dataset"] if st else None)
        extra["thesis_arch"].append(st["thesis_arch"] if st else None)
        extra["thesis_params"].append(t["model_parameters_table4"].get(st["thesis_arch"], {}).get("total") if st else None)
        extra["thesis_best"].append(v["top"] / 100 if v else np.nan)
        extra["thesis_mean"].append(v["mean"] / 100 if v else np.nan)
        extra["thesis_std"].append(v["std"] / 100 if v else np.nan)
        extra["thesis_match"].append(st["thesis_match"] if st else None)
    for k, v in extra.items():
        df[k] = v
    return df


def _run_meta(run: Path) -> dict:
    state = run / "checkpoint" / "state.json"
    summary = run / "summary.json"
    config = {}
    if summary.is_file():
        config = _read_json(summary).get("config") or {}
    if not config and state.is_file():
        config = _read_json(state).get("config") or {}
    return config


def _read_rounds(path: Path) -> list[dict]:
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError as e:
            raise ValueError(f"{path}, line {i}: not valid JSON ({e})") from None
    return out


def load_runs(results, profile: str, kind: str = "extraction"):
    """One row per run folder ``results/<profile>/<kind>/<dataset>-<arch>/<strategy>/seed<N>/``
    holding a ``rounds.jsonl``: ``dataset``, ``arch``, ``strategy``, ``seed``, ``rounds``,
    ``queries`` (of the last round), ``complete`` (``summary.json`` written), ``budgets`` (the
    run's configured budgets), ``substitute``, ``seconds`` (sum of the round timings), ``path``."""
    import pandas as pd

    cols = ["dataset", "arch", "strategy", "seed", "rounds", "queries", "complete", "budgets", "substitute",
            "seconds", "path"]
    base = layout.profile_dir(results, profile) / kind
    rows = []
    for f in sorted(base.glob("*/*/seed*/rounds.jsonl")) if base.is_dir() else []:
        run = f.parent
        try:
            seed = int(run.name[len("seed"):])
        except ValueError:
            raise ValueError(f"{run}: expected a folder named seed<N>") from None
        dataset, arch = split_key(run.parent.parent.name, results, profile)
        recs = _read_rounds(f)
        cfg = _run_meta(run)
        budgets = tuple(int(b) for b in cfg.get("budgets") or ()) or tuple(
            int(r["budget"]) for r in recs if r.get("budget") is not None)
        rows.append({"dataset": dataset, "arch": arch, "strategy": run.parent.name, "seed": seed,
                     "rounds": len(recs), "queries": recs[-1]["queries"] if recs else 0,
                     "complete": (run / "summary.json").is_file(), "budgets": budgets,
                     "substitute": cfg.get("substitute"),
                     "seconds": float(sum(sum((r.get("seconds") or {}).values()) for r in recs)),
                     "path": str(run)})
    return pd.DataFrame(rows, columns=cols)


ROUND_COLUMNS = ["dataset", "arch", "strategy", "seed", "round", "queries", "labelled", "k", "agreement", "accuracy",
                 "macro_f1", "val_accuracy", "val_macro_f1", "epochs_trained", "top_class_share",
                 "classes_predicted", "budget", "adv_agreement", "transfer_rate",
                 "secret_error_under_transfer", "fooled_substitute", *[f"t_{t}" for t in _TIMINGS], "seconds",
                 "max_budget", "substitute", "complete", "path"]


def load_rounds(results, profile: str, kind: str = "extraction"):
    """Every record of every ``rounds.jsonl`` under ``results/<profile>/<kind>/`` (incomplete runs
    too; see ``complete``), one row per round, columns :data:`ROUND_COLUMNS`: the record's
    fields, its transferability flattened (``transfer_rate``, ``secret_error_under_transfer``,
    ``fooled_substitute``; NaN where not measured), the timings ``t_query``, ``t_train``,
    ``t_eval``, ``t_select`` and their sum ``seconds``, and the run's ``max_budget``."""
    import pandas as pd

    rows = []
    for run in load_runs(results, profile, kind).itertuples():
        for r in _read_rounds(Path(run.path) / "rounds.jsonl"):
            tr = r.get("transfer") or {}
            secs = r.get("seconds") or {}
            row = {"dataset": run.dataset, "arch": run.arch, "strategy": run.strategy, "seed": run.seed}
            for k in ("round", "queries", "labelled", "k", "agreement", "accuracy", "macro_f1", "val_accuracy",
                      "val_macro_f1", "epochs_trained", "top_class_share", "classes_predicted", "budget"):
                row[k] = r.get(k)
            for k in ("adv_agreement", "transfer_rate", "secret_error_under_transfer", "fooled_substitute"):
                row[k] = tr.get(k)
            for t in _TIMINGS:
                row[f"t_{t}"] = secs.get(t)
            row["seconds"] = float(sum(secs.values()))
            row.update(max_budget=max(run.budgets) if run.budgets else None, substitute=run.substitute,
                       complete=run.complete, path=run.path)
            rows.append(row)
    df = pd.DataFrame(rows, columns=ROUND_COLUMNS)
    num = ["agreement", "accuracy", "macro_f1", "val_accuracy", "val_macro_f1", "top_class_share",
           "classes_predicted", "adv_agreement", "transfer_rate", "secret_error_under_transfer",
           "fooled_substitute", *[f"t_{t}" for t in _TIMINGS], "seconds", "budget", "max_budget"]
    for c in num:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
    return df


# -- aggregation over seeds ----------------------------------------------------------------------

def _strategy_order(s):
    import pandas as pd

    order = {n: i for i, n in enumerate(THESIS_STRATEGIES)}
    return pd.Series([(order.get(v, len(order)), v) for v in s], index=s.index)


def _sort(df, cols):
    keys = {"strategy": _strategy_order}
    return df.sort_values(cols, key=lambda s: keys[s.name](s) if s.name in keys else s).reset_index(drop=True)


def curve_stats(rounds, metric: str = "agreement", x: str = "queries", by=("dataset", "arch", "strategy")):
    """``metric`` against ``x`` over seeds: one row per ``by`` + ``x`` with ``mean``, ``std``
    (ddof=1, NaN for one seed), ``min``, ``max`` and ``n`` (seeds with a value)."""
    by = list(by)
    missing = [c for c in [*by, x, metric] if c not in rounds.columns]
    if missing:
        raise KeyError(f"rounds: missing column(s) {missing}; expected a load_rounds() table")
    g = rounds.dropna(subset=[metric]).groupby([*by, x], sort=True)[metric]
    out = g.agg(mean="mean", std="std", min="min", max="max", n="count").reset_index()
    return _sort(out, [*by, x])


def timing_table(rounds, by=("dataset", "arch", "strategy")):
    """Mean seconds per round over seeds for each phase (``query``, ``train``, ``eval``,
    ``select``), one row per ``by`` + ``round`` (with the mean ``queries`` and ``n`` seeds)."""
    by = list(by)
    cols = [f"t_{t}" for t in _TIMINGS]
    g = rounds.groupby([*by, "round"], sort=True)
    out = g[cols + ["queries"]].mean()
    out["n"] = g["seed"].nunique()
    out = out.reset_index().rename(columns={f"t_{t}": t for t in _TIMINGS})
    return _sort(out, [*by, "round"])


def _budget_rows(rounds):
    if "budget" not in rounds.columns:
        raise KeyError("rounds: missing column 'budget'; expected a load_rounds() table")
    return rounds[rounds["budget"].notna()].copy()


def _agg(rows, metrics_):
    keys = ["dataset", "arch", "strategy", "budget"]
    g = rows.groupby(keys, sort=True)
    out = g.agg(n_seeds=("seed", "nunique"), queries=("queries", "mean"))
    for m in metrics_:
        out[f"{m}_mean"] = g[m].mean()
        out[f"{m}_std"] = g[m].std()
        out[f"{m}_ci95"] = g[m].agg(lambda v: metrics.mean_ci95(v)[1])
    out["seeds"] = g["seed"].agg(lambda s: sorted({int(v) for v in s}))
    out = out.reset_index()
    out["budget"] = out["budget"].astype("int64")
    return out


def _settings(rows):
    """Per (dataset, arch, strategy, budget): the run's budgets and substitute, for thesis_setting."""
    info = {}
    for r in rows.itertuples():
        key = (r.dataset, r.arch, r.strategy, int(r.budget))
        mb = r.budget if r.max_budget is None or np.isnan(r.max_budget) else r.max_budget
        prev = info.get(key)
        info[key] = (max(prev[0], int(mb)) if prev else int(mb), r.substitute)
    return info


def agreement_table(rounds):
    """Thesis Tables 6-8 from :func:`load_rounds` rows at the budgets: one row per dataset x
    arch x strategy x budget with ``n_seeds``, ``seeds``, ``queries`` and mean/std over seeds
    (ddof=1) of ``agreement``, ``accuracy``, ``macro_f1``, ``agreement_ci95`` (half-width of the
    95% CI of the mean, :func:`stealnb.core.metrics.mean_ci95`), ``top_class_share`` mean and max
    (collapse, :func:`stealnb.core.metrics.collapse`); plus ``thesis_dataset``,
    ``thesis_arch``, ``thesis_budget``, ``thesis_agreement`` (fraction; None when the thesis has
    no such strategy) and ``thesis_match`` (see :func:`thesis_setting`)."""
    import pandas as pd

    rows = _budget_rows(rounds)
    cols = ["dataset", "arch", "strategy", "budget", "n_seeds", "seeds", "queries", "agreement_mean",
            "agreement_std", "agreement_ci95", "accuracy_mean", "accuracy_std", "macro_f1_mean", "macro_f1_std",
            "top_class_share_mean", "top_class_share_max", "thesis_dataset", "thesis_arch", "thesis_budget",
            "thesis_agreement", "thesis_match"]
    if rows.empty:
        return pd.DataFrame(columns=cols)
    out = _agg(rows, ("agreement", "accuracy", "macro_f1", "top_class_share"))
    out["top_class_share_max"] = rows.groupby(["dataset", "arch", "strategy", "budget"], sort=True)[
        "top_class_share"].max().to_numpy()
    _add_thesis_columns(out, _settings(rows), "thesis_agreement",
                        lambda st, r: _thesis_agreement(st["thesis_dataset"], st["thesis_arch"], r.strategy,
                                                        st["thesis_budget"]))
    return _sort(out[cols], ["dataset", "arch", "strategy", "budget"])


def _add_thesis_columns(out, info, value_col: str, value) -> None:
    """Add ``thesis_dataset/arch/budget/match`` and ``value_col`` (``value(setting, row)``, None
    without a thesis setting) to the aggregated table ``out``, in place."""
    import pandas as pd

    th = {k: [] for k in ("thesis_dataset", "thesis_arch", "thesis_budget", value_col, "thesis_match")}
    for r in out.itertuples():
        top, sub = info[(r.dataset, r.arch, r.strategy, int(r.budget))]
        st = thesis_setting(r.dataset, r.arch, int(r.budget), (top,), substitute=sub)
        for k in ("thesis_dataset", "thesis_arch", "thesis_budget", "thesis_match"):
            th[k].append(st and st[k])
        th[value_col].append(value(st, r) if st else None)
    for k, v in th.items():
        out[k] = v
    out[value_col] = pd.to_numeric(out[value_col], errors="coerce").astype("float64")


def transferability_table(rounds):
    """Thesis Tables 9-11 from :func:`load_rounds`: per dataset x arch x strategy x budget, mean,
    std and 95% CI half-width over seeds of the three transferability numbers of
    :func:`stealnb.core.metrics.transfer_metrics` -- ``adv_agreement`` (**the thesis §7.2 measure**:
    among FGSM examples that fool the substitute, the share the secret labels as the substitute
    does), ``transfer_rate`` (share of those that also fool the secret) and
    ``secret_error_under_transfer`` (secret's error on all FGSM images) -- and
    ``fooled_substitute``. ``thesis_transferability`` (fraction, to compare with
    ``adv_agreement``) is filled only at the budget that maps to the thesis' 10,000 queries, the
    only budget the thesis reports."""
    import pandas as pd

    rows = _budget_rows(rounds)
    cols = ["dataset", "arch", "strategy", "budget", "n_seeds", "seeds", "queries", "adv_agreement_mean",
            "adv_agreement_std", "adv_agreement_ci95", "transfer_rate_mean", "transfer_rate_std",
            "secret_error_under_transfer_mean", "secret_error_under_transfer_std",
            "fooled_substitute_mean", "thesis_dataset", "thesis_arch", "thesis_budget", "thesis_transferability",
            "thesis_match"]
    rows = rows[rows["secret_error_under_transfer"].notna() | rows["transfer_rate"].notna()]
    if rows.empty:
        return pd.DataFrame(columns=cols)
    out = _agg(rows, ("adv_agreement", "transfer_rate", "secret_error_under_transfer", "fooled_substitute"))
    out = out.drop(columns=["fooled_substitute_std", "fooled_substitute_ci95"])
    _add_thesis_columns(out, _settings(rows), "thesis_transferability",
                        lambda st, r: _thesis_transfer(st["thesis_dataset"], st["thesis_arch"], r.strategy)
                        if st["thesis_budget"] == THESIS_BUDGETS[-1] else None)
    return _sort(out[cols], ["dataset", "arch", "strategy", "budget"])


def paired_differences(rounds, metric: str = "agreement", baseline: str = "random"):
    """Each strategy minus ``baseline`` at each budget, paired by seed (every strategy of a seed
    starts from the same seed set and validation split): one row per dataset x arch x strategy x
    budget with :func:`stealnb.core.metrics.paired_difference`'s ``n``, ``mean``, ``low``, ``high``
    (95% CI), ``p_value`` and ``significant``. Seeds missing on either side are left out."""
    import pandas as pd

    rows = _budget_rows(rounds)
    cols = ["dataset", "arch", "strategy", "budget", "n", "mean", "low", "high", "p_value", "significant"]
    out = []
    for (ds, arch, b), g in rows.groupby(["dataset", "arch", "budget"], sort=True):
        base = g[g["strategy"] == baseline].groupby("seed")[metric].mean()
        for strat, gs in g[g["strategy"] != baseline].groupby("strategy"):
            mine = gs.groupby("seed")[metric].mean()
            seeds = sorted(set(mine.dropna().index) & set(base.dropna().index))
            if not seeds:
                continue
            d = metrics.paired_difference(mine.loc[seeds].to_numpy(), base.loc[seeds].to_numpy())
            out.append({"dataset": ds, "arch": arch, "strategy": strat, "budget": int(b), **d})
    if not out:
        return pd.DataFrame(columns=cols)
    return _sort(pd.DataFrame(out)[cols], ["dataset", "arch", "strategy", "budget"])


def best_strategy_table(agreement):
    """Best active-learning strategy per secret and budget (highest mean agreement over seeds;
    ``random`` is the baseline, not a candidate). Ties are listed joined by ``" = "``.
    Columns: ``dataset``, ``arch``, ``budget``, ``best_strategy``, ``agreement_mean``,
    ``agreement_std``, ``n_seeds``, ``random_agreement_mean``, ``gain_over_random``,
    ``thesis_best_strategy``, ``thesis_best_agreement``, ``thesis_budget``, ``thesis_match``."""
    import pandas as pd

    cols = ["dataset", "arch", "budget", "best_strategy", "agreement_mean", "agreement_std", "n_seeds",
            "random_agreement_mean", "gain_over_random", "thesis_best_strategy", "thesis_best_agreement",
            "thesis_budget", "thesis_match"]
    rows = []
    for (ds, arch, b), g in agreement.groupby(["dataset", "arch", "budget"], sort=True):
        al = g[(g["strategy"] != "random") & g["agreement_mean"].notna()]
        if al.empty:
            continue
        top = al["agreement_mean"].max()
        best = al[np.isclose(al["agreement_mean"], top, rtol=0, atol=1e-12)]
        rnd = g.loc[g["strategy"] == "random", "agreement_mean"]
        rnd = float(rnd.iloc[0]) if len(rnd) else np.nan
        first = best.iloc[0]
        t_best, t_val = None, np.nan
        if not pd.isna(first["thesis_dataset"]) and not pd.isna(first["thesis_budget"]):
            vals = {s: _thesis_agreement(first["thesis_dataset"], first["thesis_arch"], s, int(first["thesis_budget"]))
                    for s in THESIS_STRATEGIES if s != "random"}
            vals = {s: v for s, v in vals.items() if v is not None}
            if vals:
                t_val = max(vals.values())
                t_best = " = ".join(s for s, v in vals.items() if v == t_val)
        rows.append({"dataset": ds, "arch": arch, "budget": int(b), "best_strategy": " = ".join(best["strategy"]),
                     "agreement_mean": float(top), "agreement_std": float(first["agreement_std"]),
                     "n_seeds": int(best["n_seeds"].min()), "random_agreement_mean": rnd,
                     "gain_over_random": float(top) - rnd, "thesis_best_strategy": t_best,
                     "thesis_best_agreement": t_val, "thesis_budget": first["thesis_budget"],
                     "thesis_match": first["thesis_match"]})
    return pd.DataFrame(rows, columns=cols)


def format_pm(mean, std=None, n=None, *, percent: bool = True, digits: int = 1) -> str:
    """``"61.2 ± 3.4 (n=3)"``; ``"–"`` for a missing mean; no ``±`` for a NaN std (one seed)."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    f = 100.0 if percent else 1.0
    s = f"{mean * f:.{digits}f}"
    if std is not None and not (isinstance(std, float) and math.isnan(std)):
        s += f" ± {std * f:.{digits}f}"
    if n is not None:
        s += f" (n={int(n)})"
    return s


def thesis_style(table, metric: str = "agreement", thesis_col: str | None = None, spread: str = "ci95"):
    """A thesis-style grid of ``table`` (from :func:`agreement_table` or
    :func:`transferability_table`): index (dataset, arch, strategy), for each budget a column
    ``"<budget> ours"`` with ``"mean ± half-width (n=seeds)"`` in % -- ``spread="ci95"``: the 95%
    confidence interval of the mean (where the table has it), ``"std"``: the standard deviation
    over seeds -- and ``"<budget> thesis"`` with the thesis' number in % (``"–"`` where it has
    none). Whether the thesis column is the same setting or only a reference is in
    ``table.thesis_match``; show it with the grid."""
    import pandas as pd

    thesis_col = thesis_col or {"agreement": "thesis_agreement"}.get(metric, "thesis_transferability")
    if table.empty:
        return pd.DataFrame()
    rows = {}
    budgets = sorted(table["budget"].unique())
    for r in table.itertuples():
        key = (r.dataset, r.arch, r.strategy)
        row = rows.setdefault(key, {})
        half = getattr(r, f"{metric}_{spread}", getattr(r, f"{metric}_std"))
        row[f"{r.budget} ours"] = format_pm(getattr(r, f"{metric}_mean"), half, r.n_seeds)
        t = getattr(r, thesis_col)
        tb = "" if pd.isna(r.thesis_budget) else f" @{int(r.thesis_budget):,}"
        row[f"{r.budget} thesis"] = "–" if pd.isna(t) else f"{t * 100:.2f}{tb}"
    cols = [f"{b} {w}" for b in budgets for w in ("ours", "thesis")]
    out = pd.DataFrame.from_dict(rows, orient="index").reindex(columns=cols).fillna("–")
    out.index = pd.MultiIndex.from_tuples(out.index, names=["dataset", "arch", "strategy"])
    order = _strategy_order(pd.Series([k[2] for k in out.index]))
    pos = sorted(range(len(out)), key=lambda i: (out.index[i][0], out.index[i][1], order.iloc[i]))
    return out.iloc[pos]


def _thesis_label(ds, arch, budget=None) -> str:
    if ds is None or (isinstance(ds, float) and math.isnan(ds)):
        return "–"
    s = f"{THESIS_DATASET_NAMES.get(ds, ds)}, {arch} secret"
    if budget is not None and not (isinstance(budget, float) and math.isnan(budget)):
        s += f", {int(budget):,} queries"
    return s


def display_secrets(table):
    """:func:`secrets_table` formatted like thesis Table 5 (percentages), with the thesis' row
    and whether it is the same setting or only a reference."""
    import pandas as pd

    def pct(v):
        return "–" if v is None or pd.isna(v) else f"{v * 100:.2f}"

    return pd.DataFrame({
        "dataset": table["dataset"], "architecture": table["arch"],
        "parameters": [f"{int(v):,}" if v is not None and not pd.isna(v) else "–" for v in table["params_total"]],
        "folds": table["folds"],
        "test accuracy %: mean ± std over folds": [format_pm(m, s, digits=2) for m, s in zip(table["mean"], table["std"])],
        "best fold %": [pct(v) for v in table["best"]],
        "thesis setting": [_thesis_label(d, a) for d, a in zip(table["thesis_dataset"], table["thesis_arch"])],
        "thesis parameters": [f"{int(v):,}" if v is not None and not pd.isna(v) else "–" for v in table["thesis_params"]],
        "thesis %: mean ± std": [format_pm(m, s, digits=2) for m, s in zip(table["thesis_mean"], table["thesis_std"])],
        "thesis best %": [pct(v) for v in table["thesis_best"]],
        "thesis column is": [m if isinstance(m, str) else "–" for m in table["thesis_match"]],
    }).set_index(["dataset", "architecture"])


def display_best(best):
    """:func:`best_strategy_table` formatted for reading (percentages, thesis side by side)."""
    import pandas as pd

    return pd.DataFrame({
        "dataset": best["dataset"], "secret": best["arch"], "budget": best["budget"],
        "best AL strategy": best["best_strategy"],
        "agreement %": [format_pm(m, s, n) for m, s, n in zip(best["agreement_mean"], best["agreement_std"],
                                                              best["n_seeds"])],
        "random %": [format_pm(m) for m in best["random_agreement_mean"]],
        "gain over random (points)": [("–" if pd.isna(g) else f"{g * 100:+.1f}") for g in best["gain_over_random"]],
        "thesis best": [t or "–" for t in best["thesis_best_strategy"]],
        "thesis %": [format_pm(v, digits=2) for v in best["thesis_best_agreement"]],
        "thesis budget": [("–" if pd.isna(b) else f"{int(b):,}") for b in best["thesis_budget"]],
        "thesis column is": [m if isinstance(m, str) else "–" for m in best["thesis_match"]],
    }).set_index(["dataset", "secret", "budget"])


def thesis_caption(table) -> str:
    """One line saying which thesis setting(s) the thesis column of ``table`` shows and whether
    that is the same setting or only a reference."""
    if table.empty:
        return "no rows"
    parts = []
    for (ds, arch), g in table.groupby(["dataset", "arch"], sort=True):
        th = g.dropna(subset=["thesis_dataset"])
        if th.empty:
            parts.append(f"{ds}/{arch}: no thesis counterpart")
            continue
        budgets = sorted({int(b) for b in th["thesis_budget"].dropna()})
        match = sorted(set(th["thesis_match"]))
        pairs = ", ".join(f"{b} → {int(t):,}" for b, t in sorted({(int(b), int(t)) for b, t in
                                                                   zip(th["budget"], th["thesis_budget"])
                                                                   if t == t and t is not None}))
        parts.append(f"{ds}/{arch} vs thesis {_thesis_label(th['thesis_dataset'].iloc[0], th['thesis_arch'].iloc[0])}"
                     f" (our budget → thesis budget: {pairs or ', '.join(map(str, budgets))}): {' / '.join(match)}")
    return "; ".join(parts)


# -- what a run selected and what the oracle answered ---------------------------------------------

def run_state(run_dir) -> dict:
    """A run's checkpoint (``checkpoint/state.json``) with ``val_idx`` and ``labelled_idx`` as int64
    arrays (pool positions in query order), ``records`` and ``config``."""
    path = Path(run_dir) / "checkpoint" / "state.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint; expected a run folder written by stealnb.extraction.loop")
    s = _read_json(path)
    s["val_idx"] = np.asarray(s["val_idx"], np.int64)
    s["labelled_idx"] = np.asarray(s["labelled_idx"], np.int64)
    return s


def round_batches(records, labelled_idx):
    """Which pool images each round added to the training set: round 0 the random seed set,
    round r > 0 the batch the strategy selected after round r-1 (queried at the start of round
    r). One row per image: ``round``, ``queries`` (spent after that round's queries), ``order``
    (selection order within the batch), ``pool_index``."""
    import pandas as pd

    labelled_idx = np.asarray(labelled_idx)
    if labelled_idx.ndim != 1 or not (np.issubdtype(labelled_idx.dtype, np.integer) or labelled_idx.size == 0):
        raise TypeError(f"labelled_idx: expected a 1-D integer array of pool positions, got {labelled_idx.dtype} "
                        f"{labelled_idx.shape}")
    rows, prev = [], 0
    for r in records:
        n = int(r["labelled"])
        if n < prev or n > len(labelled_idx):
            raise ValueError(f"records: round {r.get('round')} has labelled={n}, expected between {prev} and "
                             f"{len(labelled_idx)} (the labelled indices of the same run)")
        for j, p in enumerate(labelled_idx[prev:n]):
            rows.append({"round": int(r["round"]), "queries": int(r["queries"]), "order": j, "pool_index": int(p)})
        prev = n
    return pd.DataFrame(rows, columns=["round", "queries", "order", "pool_index"])


def ledger_labels(ledger, images: np.ndarray, *, allow_missing: bool = False) -> np.ndarray:
    """The oracle's top-1 labels for ``images`` read back from a query ledger (read only: no
    model, no query, nothing paid). Images never asked raise ``KeyError``, or get ``-1`` with
    ``allow_missing=True``. Works for ledgers of every output mode (top-1 of top-k / probs); the
    ledger is checked as :class:`~stealnb.extraction.oracle.Oracle` checks it when it loads it."""
    from ..extraction.oracle import fingerprint, ledger_answers, ledger_header, read_ledger

    ledger = Path(ledger)
    if not ledger.is_file():
        raise FileNotFoundError(f"ledger {ledger}: no such file (a run writes its ledger.bin on the first query)")
    check_images(images, "images")
    payloads, good, size = read_ledger(ledger)
    if good < size:
        warnings.warn(f"ledger {ledger}: ignoring {size - good} byte(s) of a torn last record", stacklevel=2)
    if not payloads:
        raise ValueError(f"ledger {ledger}: empty")
    header = ledger_header(ledger, payloads[0])
    ans = ledger_answers(ledger, header, payloads[1:])
    if header["output"] == "label":
        top = ans["label"]
    elif header["output"] == "topk":
        top = ans["idx"][:, 0]
    else:
        top = ans["prob"].argmax(axis=1)
    table = {}
    for fp, lab in zip(ans["fp"], top):
        table.setdefault(fp.tobytes().hex(), int(lab))
    fps = fingerprint(images)
    missing = [i for i, f in enumerate(fps) if f not in table]
    if missing and not allow_missing:
        raise KeyError(f"{len(missing)} of {len(images)} image(s) were never asked to the oracle of {ledger} "
                       f"(first: position {missing[0]}); pass allow_missing=True to get -1 for them")
    return np.array([table.get(f, -1) for f in fps], np.int64)


# -- stepping an extraction by hand (interactive notebook) -----------------------------------------

def scratch_dir(results, profile: str, dataset: str, arch: str, strategy: str, seed: int) -> Path:
    """``results/<profile>/scratch/<dataset>-<arch>/<strategy>/seed<N>``: throw-away runs (the
    interactive notebook), outside ``extraction/`` so the tables never pick them up."""
    key = layout.secret_dir(results, profile, dataset, arch).name
    ex = layout.extraction_dir(results, profile, dataset, arch, strategy, seed)
    return layout.profile_dir(results, profile) / "scratch" / key / ex.parent.name / ex.name


def open_extraction(dataset: str, arch: str, strategy: str, profile: Profile, *, seed: int = 0, results="results",
                    out=None, data_root=None, resume: bool = False, progress: bool = False, **overrides):
    """A ready-to-step :class:`~stealnb.extraction.loop.Extraction` set up exactly as
    :func:`stealnb.extraction.loop.run_extraction` does (the profile's pool, substitute, budgets; an
    in-process label oracle with a ledger in ``out``; the secret trained on demand), but not run:
    call ``.step()`` per round. ``out`` defaults to :func:`scratch_dir`; ``resume=False`` deletes
    it first (ledger included; :func:`stealnb.extraction.loop.prepare_run`). ``overrides`` change
    ExtractionConfig fields (``round_size=`` = k)."""
    from ..core import data
    from ..extraction.loop import Extraction, configure, prepare_run
    from ..extraction.oracle import Oracle

    prof = check_profile(profile)
    config = configure(prof, strategy, seed=seed, dataset=dataset, **overrides)
    out = Path(out) if out is not None else scratch_dir(results, prof.name, dataset, arch, strategy, seed)
    secret, ds = prepare_run(out, resume, dataset, arch, prof, results, data_root=data_root, progress=progress)
    pool = data.load_pool(prof.pool, root=data_root, n=prof.pool_size, seed=0, transform=prof.pool_transform)
    oracle = Oracle(secret, output="label", budget=config.budgets[-1], ledger=out / "ledger.bin")
    return Extraction(oracle, pool, ds.x_test, ds.y_test, config, secret=secret, out=out, resume=resume,
                      progress=progress)


# -- EDA -----------------------------------------------------------------------------------------

def class_counts(y_by_split: dict, class_names) -> "pd.DataFrame":  # noqa: F821
    """Class histogram per split (e.g. ``{"train": y_train, "test": y_test}``): one row per split x
    class with ``split``, ``class``, ``name``, ``count``, ``fraction`` (zeros kept)."""
    import pandas as pd

    names = list(class_names)
    rows = []
    for split, y in y_by_split.items():
        y = check_labels(np.asarray(y), f"{split} labels", num_classes=len(names))
        counts = np.bincount(y, minlength=len(names))
        total = max(int(counts.sum()), 1)
        rows += [{"split": split, "class": c, "name": names[c], "count": int(counts[c]), "fraction": counts[c] / total}
                 for c in range(len(names))]
    return pd.DataFrame(rows, columns=["split", "class", "name", "count", "fraction"])


EMBEDDINGS = ("pca", "tsne", "umap")


def embed_2d(x, method: str = "pca", *, seed: int = 0, pca_dims: int | None = 50, **kw) -> np.ndarray:
    """2-D embedding (N x 2 float64) of images (N x 32 x 32 x 3, flattened) or features (N x d), as
    in thesis §3: ``"pca"`` (principal components), ``"tsne"`` (van der Maaten & Hinton 2008;
    scikit-learn, PCA init, perplexity min(30, (N-1)/3)), ``"umap"`` (McInnes et al. 2018;
    umap-learn, n_neighbors min(15, N-1)). t-SNE and UMAP first reduce the data to its first
    ``pca_dims`` principal components (van der Maaten & Hinton's recommended preprocessing; it
    keeps them fast on thousands of 3,072-pixel images; ``None`` = raw pixels). ``kw`` go to the
    estimator; ``seed`` fixes it."""
    if method not in EMBEDDINGS:
        raise ValueError(f"method: expected one of {EMBEDDINGS}, got {method!r}")
    x = np.asarray(x)
    if x.ndim == 4:
        check_images(x, "x")
        x = x.reshape(len(x), -1)
    elif x.ndim != 2:
        raise ValueError(f"x: expected N x 32 x 32 x 3 images or N x d features, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("x: contains NaN or inf")
    if len(x) < 5:
        raise ValueError(f"x: a 2-D embedding needs at least 5 points, got {len(x)}")
    x = x.astype(np.float64)
    from sklearn.decomposition import PCA

    if method == "pca":
        return PCA(n_components=2, random_state=int(seed), **kw).fit_transform(x)
    if pca_dims is not None:
        pca_dims = check_positive_int(pca_dims, "pca_dims", minimum=2)
        if x.shape[1] > pca_dims and len(x) > pca_dims:
            x = PCA(n_components=pca_dims, random_state=int(seed)).fit_transform(x)
    if method == "tsne":
        from sklearn.manifold import TSNE

        kw.setdefault("perplexity", min(30.0, (len(x) - 1) / 3.0))
        return TSNE(n_components=2, init="pca", random_state=int(seed), **kw).fit_transform(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # umap/numba chatter (n_jobs overridden by random_state, ...)
        import umap

        kw.setdefault("n_neighbors", min(15, len(x) - 1))
        return np.asarray(umap.UMAP(n_components=2, random_state=int(seed), n_jobs=1, **kw).fit_transform(x),
                          np.float64)

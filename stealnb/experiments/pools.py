"""Which thief pool? The same extraction on different thief pools (issue 14; ``notebooks/08_pools.ipynb``).

Pool choice is the first question the model-stealing literature asks: Knockoff Nets (Orekondy et
al. 2019) compare ImageNet with OpenImages pools, Copycat CNN (Correia-Silva et al. 2018) uses
random natural images (NPDD), prediction-poisoning and Adaptive Misinformation steal MNIST models
with EMNIST-letters / KMNIST pools, and ActiveThief (Pal et al. 2020, Table 4) reports its gain
over a pool of uniform noise. :func:`run_pools` asks it offline: for each secret, each strategy of
the profile's :class:`~stealnb.core.profiles.PoolStudy` (random, and the best strategy of the
extraction chapter, :func:`best_strategy`) runs :func:`stealnb.extraction.loop.run_extraction` on each
pool (:func:`pool_specs`) over the study's seeds and budgets. Everything but the pool is the
profile's extraction setting, and one seed draws the same pool positions for its seed set and
validation split on every pool and strategy, so the comparisons are paired by seed.

It also reports what each pool draws from the secret: the class distribution of the secret's
labels on the whole pool and its entropy (:func:`stealnb.core.metrics.label_entropy`). That is an
analysis with the secret in hand (no query is charged); the attacker sees only the labels it pays for.

Runs go to :func:`stealnb.core.layout.pool_run_dir` and resume like any extraction (nothing is paid
twice); a finished run of the same settings is read from its ``summary.json``
(:func:`stealnb.extraction.loop.finished_summary`), without rebuilding its substitute. ``stealnb
run`` trains each run (pool, strategy, seed) in a task of its own (:func:`run_pool`) and the
chapter's notebook reads them back with :func:`run_pools`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from ..core import data, layout, metrics, models, train
from ..extraction import loop
from ..core._checks import UsageError
from ..core.profiles import BEST_STRATEGY, Profile, check_profile

TRANSFORM_SEP = "+"


def parse_pool_spec(spec: str) -> tuple[str, str | None]:
    """``"natural-patches+gray"`` -> ``("natural-patches", "gray")``; ``"dead-leaves"`` -> ``("dead-leaves", None)``."""
    name, _, transform = str(spec).partition(TRANSFORM_SEP)
    return name, transform or None


def pool_specs(prof: Profile, dataset: str, data_root=None) -> tuple[list[str], dict[str, str]]:
    """The pools the chapter runs for a secret trained on ``dataset``: the study's ``pools`` (each
    checked with :func:`stealnb.core.data.check_pool`; a bad one is a :class:`UsageError`), then each
    ``cross_domain`` dataset present locally and not holding ``dataset``'s images. Returns
    ``(specs, skipped)``, ``skipped`` mapping a cross-domain name left out to the reason."""
    study = prof.pool_study
    need = study.budgets[-1]
    size = study.pool_size if study.pool_size is not None else prof.pool_size
    specs = []
    for spec in study.pools:
        name, transform = parse_pool_spec(spec)
        data.check_pool(name, size, need=need, transform=transform, secret_dataset=dataset)
        specs.append(spec)
    if study.baseline not in specs:
        raise UsageError(f"pool study: the baseline pool {study.baseline!r} is not among its pools ({', '.join(specs)})")
    present = data.present(data_root)
    skipped = {}
    for name in study.cross_domain:
        if name in specs:
            continue
        if name not in present:
            skipped[name] = "not installed"
            continue
        try:
            data.check_pool(name, None, need=need, secret_dataset=dataset)
        except UsageError:
            skipped[name] = f"the secret's own images ({dataset})"
            continue
        specs.append(name)
    return specs, skipped


def load_study_pool(spec: str, prof: Profile, data_root=None) -> data.Pool:
    """Pool ``spec`` with the study's size (seed 0, as every extraction builds its pool); a dataset pool
    smaller than that is used whole."""
    study = prof.pool_study
    name, transform = parse_pool_spec(spec)
    n = study.pool_size if study.pool_size is not None else prof.pool_size
    try:
        return data.load_pool(name, root=data_root, n=n, seed=0, transform=transform)
    except ValueError:
        if name not in data.DATASETS:
            raise
        return data.load_pool(name, root=data_root, n=None, seed=0, transform=transform)  # the whole train split


def best_strategy(prof: Profile, dataset: str, arch: str, results) -> tuple[str, str]:
    """The extraction chapter's best active-learning strategy for a secret: the one of the profile's
    strategies (random excluded) with the highest mean agreement at the profile's largest budget over
    all of its seeds, read from the runs' ``summary.json`` (ties: the first in the profile's order).
    When no strategy has finished runs for every seed, the study's ``fallback_strategy``.
    Returns ``(strategy, reason)``."""
    top = str(prof.budgets[-1])
    scores = {}
    for strat in prof.best_strategy_candidates:
        vals = []
        for seed in prof.seeds:
            f = layout.extraction_dir(results, prof.name, dataset, arch, strat, seed) / "summary.json"
            try:
                vals.append(json.loads(f.read_text())["budgets"][top]["agreement"])
            except (OSError, ValueError, KeyError, TypeError):
                break
        if len(vals) == len(prof.seeds) and all(v is not None for v in vals):
            scores[strat] = float(np.mean(vals))
    if not scores:
        return prof.pool_study.fallback_strategy, (
            f"the profile's fallback: the extraction chapter has no finished runs of {dataset}/{arch} "
            f"for all seeds {list(prof.seeds)}")
    best = max(scores, key=lambda s: (scores[s], -list(prof.strategies).index(s)))
    return best, (f"best of the extraction chapter: mean agreement {scores[best]:.3f} at {top} queries over "
                  f"{len(prof.seeds)} seed(s) ({', '.join(f'{s} {v:.3f}' for s, v in scores.items())})")


def study_strategies(prof: Profile, dataset: str, arch: str, results) -> list[dict]:
    """The study's strategies for one secret, :data:`~stealnb.core.profiles.BEST_STRATEGY` resolved (:func:`best_strategy`), each once:
    rows ``{"strategy", "as", "reason"}`` in the study's order. A strategy the study names and that
    is also the best keeps the row of its name (``as`` the name): each run belongs to one entry of
    the study, so one ``stealnb run`` task (:func:`run_pool`) trains it whatever the best turns out to be."""
    named = [e for e in prof.pool_study.strategies if e != BEST_STRATEGY]
    best = best_strategy(prof, dataset, arch, results) if BEST_STRATEGY in prof.pool_study.strategies else None
    out = []
    for entry in prof.pool_study.strategies:
        if entry == BEST_STRATEGY:
            strat, why = best
            if strat in named:  # the named entry's row says so
                continue
        else:
            strat, why = entry, "named by the profile" + (" (the baseline)" if entry == "random" else "")
            if best is not None and best[0] == entry:
                why += f"; also the best strategy ({best[1]})"
        if strat not in (r["strategy"] for r in out):
            out.append({"strategy": strat, "as": entry, "reason": why})
    return out


def secret_labels(secret, pool: data.Pool, batch_size: int = 2048) -> np.ndarray:
    """The secret's top-1 label for every image of ``pool`` (analysis: no oracle, nothing charged)."""
    return np.concatenate([models.predict_labels(secret, x) for _, x in pool.batches(batch_size)]
                          or [np.zeros(0, np.int64)])


@dataclass
class PoolComparison:
    """What :func:`run_pools` measured (pandas tables, one row per ...):

    * ``agreement`` -- secret x pool x strategy x budget: ``n_seeds``, ``seeds``, ``agreement_mean``,
      ``agreement_ci95`` (half-width, :func:`stealnb.core.metrics.mean_ci95`), ``accuracy_mean``,
      ``top_class_share_mean``, ``noise_ratio`` (mean agreement / the baseline pool's, same strategy
      and budget) and the paired difference to the baseline pool over seeds (``gain_over_noise``,
      ``gain_low``, ``gain_high``, ``gain_significant``; :func:`stealnb.core.metrics.paired_difference`);
    * ``labels`` -- secret x pool x class: ``count`` and ``fraction`` of the pool the secret gives that label;
    * ``entropy`` -- secret x pool: ``size``, ``entropy_bits``, ``max_bits``, ``top_class``, ``top_share``,
      ``classes_drawn``, ``sources`` (what the pool records about itself);
    * ``strategies`` -- secret x strategy: ``as`` (the study's entry) and ``reason``;
    * ``runs`` -- secret x pool x strategy x seed: ``path``, ``seconds``, ``oracle_spent``;
    * ``per_run`` -- secret x pool x strategy x seed x budget: ``agreement``, ``accuracy``,
      ``top_class_share`` (what ``agreement`` aggregates; :func:`agreement_table`);
    * ``skipped`` -- cross-domain pools left out and why.
    """

    agreement: "pd.DataFrame"  # noqa: F821
    labels: "pd.DataFrame"  # noqa: F821
    entropy: "pd.DataFrame"  # noqa: F821
    strategies: "pd.DataFrame"  # noqa: F821
    runs: "pd.DataFrame"  # noqa: F821
    per_run: "pd.DataFrame"  # noqa: F821
    skipped: "pd.DataFrame"  # noqa: F821


AGREEMENT_COLUMNS = ["dataset", "arch", "pool", "strategy", "budget", "n_seeds", "seeds", "agreement_mean",
                     "agreement_ci95", "accuracy_mean", "top_class_share_mean", "noise_ratio", "gain_over_noise",
                     "gain_low", "gain_high", "gain_significant"]


PER_RUN_COLUMNS = ["dataset", "arch", "pool", "strategy", "seed", "budget", "agreement", "accuracy", "top_class_share"]


def agreement_table(run_rows, baseline: str):
    """:attr:`PoolComparison.agreement` from per-run rows (:data:`PER_RUN_COLUMNS`: a list of dicts or
    a DataFrame such as :attr:`PoolComparison.per_run`), ratios and gains taken to pool ``baseline``."""
    import pandas as pd

    df = pd.DataFrame(run_rows)
    if df.empty:
        return pd.DataFrame(columns=AGREEMENT_COLUMNS)
    rows = []
    for (ds, arch, pool, strat, b), g in df.groupby(["dataset", "arch", "pool", "strategy", "budget"], sort=False):
        mean, half = metrics.mean_ci95(g["agreement"])
        base = df[(df.dataset == ds) & (df.arch == arch) & (df.pool == baseline) & (df.strategy == strat)
                  & (df.budget == b)].set_index("seed")["agreement"]
        mine = g.set_index("seed")["agreement"]
        common = sorted(set(mine.index) & set(base.index))
        ratio = mean / float(base.mean()) if len(base) and base.mean() > 0 else float("nan")
        diff = metrics.paired_difference(mine.loc[common].to_numpy(), base.loc[common].to_numpy()) if common else {}
        rows.append({"dataset": ds, "arch": arch, "pool": pool, "strategy": strat, "budget": int(b),
                     "n_seeds": int(g["seed"].nunique()), "seeds": sorted(int(s) for s in g["seed"]),
                     "agreement_mean": mean, "agreement_ci95": half, "accuracy_mean": float(g["accuracy"].mean()),
                     "top_class_share_mean": float(g["top_class_share"].mean()), "noise_ratio": ratio,
                     "gain_over_noise": diff.get("mean", float("nan")), "gain_low": diff.get("low", float("nan")),
                     "gain_high": diff.get("high", float("nan")),
                     "gain_significant": bool(diff.get("significant", False))})
    return pd.DataFrame(rows, columns=AGREEMENT_COLUMNS)


def best_pool_table(agreement):
    """Per secret, strategy and budget: the pool with the highest mean agreement (``best_pool``,
    ``agreement_mean``, ``agreement_ci95``, ``noise_ratio``) and the baseline pool's agreement
    (``noise_agreement`` = agreement / ratio)."""
    import pandas as pd

    cols = ["dataset", "arch", "strategy", "budget", "best_pool", "agreement_mean", "agreement_ci95", "n_seeds",
            "noise_ratio", "noise_agreement"]
    rows = []
    for (ds, arch, strat, b), g in agreement.groupby(["dataset", "arch", "strategy", "budget"], sort=False):
        top = g.loc[g["agreement_mean"].idxmax()]
        rows.append({"dataset": ds, "arch": arch, "strategy": strat, "budget": int(b), "best_pool": top["pool"],
                     "agreement_mean": top["agreement_mean"], "agreement_ci95": top["agreement_ci95"],
                     "n_seeds": top["n_seeds"], "noise_ratio": top["noise_ratio"],
                     "noise_agreement": top["agreement_mean"] / top["noise_ratio"] if top["noise_ratio"] else np.nan})
    return pd.DataFrame(rows, columns=cols)


def _too_small(pool, study) -> str | None:
    """Why the study runs nothing on ``pool`` (fewer images than its largest budget), else ``None``."""
    if len(pool) < study.budgets[-1]:
        return f"{len(pool)} images, fewer than the {study.budgets[-1]} queries"
    return None


def _check_runs(prof, ds, spec, strategies) -> None:
    """Raise the error :func:`stealnb.extraction.loop.configure` would raise for a run of the study on ``spec``."""
    name, transform = parse_pool_spec(spec)
    for st in strategies:
        loop.configure(prof.with_(pool=name, pool_transform=transform, pool_size=None), st["strategy"],
                       dataset=ds, budgets=prof.pool_study.budgets, round_size=prof.pool_study.round_size)


def _pool_runs(prof, ds, arch, spec, pool, strategies, *, results, data_root, secret_dir, progress, seeds=None):
    """Run (or read back) each of ``strategies`` over ``seeds`` (default the study's) on the built
    ``pool`` (spec ``spec``); returns the rows of :attr:`PoolComparison.runs` and :attr:`PoolComparison.per_run`.
    A finished run of the same settings is read from its ``summary.json``
    (:func:`stealnb.extraction.loop.finished_summary`); any other is run or resumed."""
    study = prof.pool_study
    name, transform = parse_pool_spec(spec)
    p = prof.with_(pool=name, pool_transform=transform, pool_size=len(pool))
    runs, run_rows = [], []
    for st in strategies:
        for seed in (study.seeds if seeds is None else seeds):
            out = layout.pool_run_dir(results, prof.name, ds, arch, spec, st["strategy"], seed)
            cfg = loop.configure(p, st["strategy"], seed=seed, dataset=ds, budgets=study.budgets,
                                 round_size=study.round_size)
            s = loop.finished_summary(out, cfg, pool)  # a run its pool task finished: read, not rebuilt
            if s is None:
                s = loop.run_extraction(ds, arch, st["strategy"], p, seed=seed, results=results, out=out,
                                        data_root=data_root, resume=True, progress=progress,
                                        secret_dir=secret_dir, thief_pool=pool,
                                        budgets=study.budgets, round_size=study.round_size).summary()
            runs.append({"dataset": ds, "arch": arch, "pool": spec, "strategy": st["strategy"], "seed": seed,
                         "path": str(out), "seconds": s["seconds"], "oracle_spent": s["oracle_spent"]})
            for b, r in s["budgets"].items():
                run_rows.append({"dataset": ds, "arch": arch, "pool": spec, "strategy": st["strategy"],
                                 "seed": seed, "budget": int(b), "agreement": r["agreement"],
                                 "accuracy": r["accuracy"], "top_class_share": r["top_class_share"]})
    return runs, run_rows


def run_pool(profile: Profile, dataset: str, arch: str, spec: str, *, strategy: str | None = None,
             seed: int | None = None, results="results", data_root=None, secret_dir=None,
             progress: bool = False) -> list[dict]:
    """Run (or resume) the study's runs on one pool ``spec`` (one of :func:`pool_specs`) for the
    ``dataset``/``arch`` secret: each strategy of :func:`study_strategies` over the study's seeds,
    into :func:`stealnb.core.layout.pool_spec_dir`; ``strategy`` (an entry of the study's
    ``strategies``, :data:`~stealnb.core.profiles.BEST_STRATEGY` included) and ``seed`` (one of its
    ``seeds``) narrow it to that entry and seed. :func:`run_pools` then reads them back. "best"
    runs nothing when the best strategy is one the study also names (that entry's run is it).

    One entry and seed is one ``runs/pool-<secret>-<spec>-<strategy>-seed<N>`` task of ``stealnb
    run`` (:func:`stealnb.report.pipeline.plan`), in a process of its own, like an extraction seed:
    Keras keeps about 200 MB of every model trained and dropped in a process
    (``benchmarks/bench_fit_memory.py``), and one kernel training the whole study of a VGG16 secret
    grew to 9.6 GB in the paper smoke run. A pool smaller than the study's largest budget runs
    nothing (:func:`run_pools` reports it). Returns the rows of :attr:`PoolComparison.runs`."""
    prof = check_profile(profile)
    study = prof.pool_study
    specs, _ = pool_specs(prof, dataset, data_root)
    if spec not in specs:
        raise UsageError(f"pool {spec!r}: not a pool of the study for a {dataset} secret ({', '.join(specs)})")
    if strategy is not None and strategy not in study.strategies:
        raise UsageError(f"strategy {strategy!r}: not a strategy of the pool study ({', '.join(study.strategies)})")
    if seed is not None and seed not in study.seeds:
        raise UsageError(f"seed {seed!r}: not a seed of the pool study ({', '.join(map(str, study.seeds))})")
    strategies = [st for st in study_strategies(prof, dataset, arch, results) if strategy in (None, st["as"])]
    _check_runs(prof, dataset, spec, strategies)  # argument errors first, before the pool is built
    if not strategies:
        return []
    pool = load_study_pool(spec, prof, data_root)
    if _too_small(pool, study):
        return []
    return _pool_runs(prof, dataset, arch, spec, pool, strategies, results=results, data_root=data_root,
                      secret_dir=secret_dir, progress=progress, seeds=None if seed is None else (seed,))[0]


def run_pools(profile: Profile, *, secrets=None, results="results", data_root=None,
              secret_dir=None, progress: bool = False) -> PoolComparison:
    """Run (or read back) the pool study of ``profile`` (its :class:`~stealnb.core.profiles.PoolStudy`)
    for each secret (``secrets``: ``(dataset, arch)`` pairs, default the profile's): on every pool of
    :func:`pool_specs`, each strategy of :func:`study_strategies` over the study's seeds, with the
    study's budgets and round size and everything else from the profile
    (:func:`stealnb.extraction.loop.run_extraction`; one build of each pool serves all its runs).
    ``secret_dir`` uses a saved secret for a single secret instead of the one under ``results``.
    Pools, strategies and sizes are checked for every secret before anything is trained.
    Returns a :class:`PoolComparison`."""
    import pandas as pd

    prof = check_profile(profile)
    study = prof.pool_study
    secrets = [tuple(s) for s in (secrets if secrets is not None else prof.secrets)]
    if secret_dir is not None and len(secrets) != 1:
        raise ValueError(f"secret_dir: one saved secret serves one secret, got {len(secrets)} secrets")
    plans = []
    for ds, arch in secrets:  # argument errors first, before any pool is built or model trained
        specs, skipped = pool_specs(prof, ds, data_root)
        strategies = study_strategies(prof, ds, arch, results)
        for spec in specs:
            _check_runs(prof, ds, spec, strategies)
        plans.append((ds, arch, specs, skipped, strategies))

    run_rows, label_rows, entropy_rows, strat_rows, runs, skip_rows = [], [], [], [], [], []
    for ds, arch, specs, skipped, strategies in plans:
        if secret_dir is not None:
            secret, summary = train.load_secret(secret_dir)
        else:
            secret, summary = train.ensure_secret(ds, arch, prof, results, data_root=data_root, progress=progress)
        num_classes = int(secret.output_shape[-1])
        names = list(summary.get("class_names") or [str(c) for c in range(num_classes)])
        strat_rows += [{"dataset": ds, "arch": arch, **st} for st in strategies]
        skip_rows += [{"dataset": ds, "arch": arch, "pool": p, "reason": r} for p, r in skipped.items()]
        for spec in specs:
            pool = load_study_pool(spec, prof, data_root)
            if why := _too_small(pool, study):
                skip_rows.append({"dataset": ds, "arch": arch, "pool": spec, "reason": why})
                continue
            y = secret_labels(secret, pool)
            counts = np.bincount(y, minlength=num_classes)
            label_rows += [{"dataset": ds, "arch": arch, "pool": spec, "class": c, "name": names[c],
                            "count": int(counts[c]), "fraction": counts[c] / len(y)} for c in range(num_classes)]
            entropy_rows.append({"dataset": ds, "arch": arch, "pool": spec, "size": len(pool),
                                 "entropy_bits": metrics.label_entropy(y, num_classes),
                                 "max_bits": float(np.log2(num_classes)), "top_class": names[int(counts.argmax())],
                                 "top_share": counts.max() / len(y), "classes_drawn": int((counts > 0).sum()),
                                 "sources": len(pool.info.get("sources", [])) or None})
            spec_runs, spec_rows = _pool_runs(prof, ds, arch, spec, pool, strategies, results=results,
                                              data_root=data_root, secret_dir=secret_dir, progress=progress)
            runs += spec_runs
            run_rows += spec_rows
            del pool
    return PoolComparison(
        agreement=agreement_table(run_rows, study.baseline),
        labels=pd.DataFrame(label_rows, columns=["dataset", "arch", "pool", "class", "name", "count", "fraction"]),
        entropy=pd.DataFrame(entropy_rows, columns=["dataset", "arch", "pool", "size", "entropy_bits", "max_bits",
                                                    "top_class", "top_share", "classes_drawn", "sources"]),
        strategies=pd.DataFrame(strat_rows, columns=["dataset", "arch", "strategy", "as", "reason"]),
        runs=pd.DataFrame(runs, columns=["dataset", "arch", "pool", "strategy", "seed", "path", "seconds",
                                         "oracle_spent"]),
        per_run=pd.DataFrame(run_rows, columns=PER_RUN_COLUMNS),
        skipped=pd.DataFrame(skip_rows, columns=["dataset", "arch", "pool", "reason"]),
    )

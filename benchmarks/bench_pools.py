"""Which thief pool, measured: the pool study of the demo profile over seeds at the extraction
chapter's budgets (issue 14, targets).

Setup = the ``demo`` profile (stealnb/core/profiles.py): secret digits / cnn-small (and Fashion-MNIST /
cnn-small when the Debian package is installed and ``--datasets`` names it), substitute cnn-small
with the demo's recipe, seed set 100 + validation 50, k = 250, budgets 250 / 500 / 1000 (the demo's
extraction settings, so the natural-patches rows are comparable with ``quality.json``), seeds 0 1 2.
Only the study's budgets, seeds, round size and strategies are replaced; its pools are the demo's
(natural patches, the same in grey, dead-leaves, uniform noise, and each installed cross-domain
dataset that is not the secret's own).

Strategies: random and the best strategy of the extraction benchmark at its largest budget
(``benchmarks/results/quality.json`` or ``quality_<dataset>.json``, 3+ seeds; ``--strategies`` overrides; without that file
the study's ``best`` rule of :func:`stealnb.experiments.pools.best_strategy` applies to ``--results``).

Each pool is one :func:`stealnb.experiments.pools.run_pools` call (``--jobs`` at a time, one process each);
every strategy of one seed starts from the same pool positions, so comparisons with the
uniform-noise pool are paired by seed (:func:`stealnb.core.metrics.paired_difference`). Runs go to
``--results`` (default ``results/bench-pools``) and resume. The JSON is rewritten after every
pool, so an interrupted benchmark keeps what it measured (``finished`` says whether it ended);
it records the load average, since the timings mean little on a shared machine.

Targets: at 1,000 queries the best pool + strategy >= 0.90 agreement (digits) and >= 0.65
(Fashion-MNIST); reported: the best strategy's ratio best pool / uniform noise per secret; the
natural-patches pool build for 20k patches < 30 s.

    python benchmarks/bench_pools.py [--datasets digits fashion-mnist] [--seeds 0 1 2] [--jobs 1]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "pools.json"
QUALITY = HERE / "results" / "quality.json"
TARGETS = {"digits": 0.90, "fashion-mnist": 0.65}
BUILD_TARGET_SECONDS = 30.0


def quality_best(dataset: str, arch: str, budget: int):
    """The best non-random strategy of quality.json at ``budget`` for a secret, or None."""
    table = None
    for f in (QUALITY, QUALITY.with_name(f"quality_{dataset}.json")):
        try:
            table = json.loads(f.read_text())["secrets"][f"{dataset}-{arch}"]["table"]
            break
        except (OSError, ValueError, KeyError):
            continue
    if table is None:
        return None
    al = {m: row[str(budget)]["mean"] for m, row in table.items()
          if m not in ("random", "art-copycatcnn") and "[" not in m and row.get(str(budget))}
    return max(al, key=al.get) if al else None


def study_profile(args, strategies):
    from stealnb.core import profiles

    prof = profiles.get_profile("demo")
    return prof.with_(pool_study=replace(prof.pool_study, budgets=tuple(prof.budgets), seeds=tuple(args.seeds),
                                         round_size=prof.round_size, strategies=tuple(strategies)))


def run_pool(ds, arch, spec, strategies, args_dict) -> dict:
    """One pool of the study (a process of its own): its per-run rows, label entropy and timings."""
    from stealnb.experiments import pools

    args = argparse.Namespace(**args_dict)
    prof = study_profile(args, strategies)
    prof = prof.with_(pool_study=replace(prof.pool_study, pools=(spec,), cross_domain=(), baseline=spec))
    t0 = time.perf_counter()
    cmp = pools.run_pools(prof, secrets=[(ds, arch)], results=args.results, data_root=args.data_root,
                          secret_dir=args.secret_dir)
    return {"pool": spec, "per_run": cmp.per_run.to_dict("records"), "entropy": cmp.entropy.to_dict("records"),
            "labels": {r["name"]: r["fraction"] for r in cmp.labels.to_dict("records")},
            "strategies": cmp.strategies.to_dict("records"), "skipped": cmp.skipped.to_dict("records"),
            "run_seconds": float(cmp.runs.seconds.sum()), "wall_seconds": round(time.perf_counter() - t0, 1)}


def pool_build_seconds(n: int = 20_000) -> dict:
    from stealnb.core import data

    t0, c0 = time.perf_counter(), time.process_time()
    pool = data.load_pool("natural-patches", n=n, seed=0)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    # CPU seconds of this process (all its threads) beside the wall time: on a loaded machine the
    # wall time measures the other processes too.
    return {"patches": len(pool), "seconds": round(secs, 2), "cpu_seconds": round(cpu, 2),
            "photos": len(pool.info["sources"]),
            "duplicates_dropped": pool.info["duplicates_dropped"], "target_seconds": BUILD_TARGET_SECONDS,
            "met": secs < BUILD_TARGET_SECONDS}


def summarise_secret(ds, arch, units, baseline, budgets, best_strategy) -> dict:
    import pandas as pd

    from stealnb.experiments import pools

    per_run = pd.DataFrame([r for u in units for r in u["per_run"]], columns=pools.PER_RUN_COLUMNS)
    agr = pools.agreement_table(per_run, baseline) if len(per_run) else pd.DataFrame(columns=pools.AGREEMENT_COLUMNS)
    table = {}
    for r in agr.to_dict("records"):
        table.setdefault(r["pool"], {}).setdefault(r["strategy"], {})[str(r["budget"])] = {
            "mean": r["agreement_mean"], "ci95": None if pd.isna(r["agreement_ci95"]) else r["agreement_ci95"],
            "n": r["n_seeds"], "seeds": r["seeds"], "noise_ratio": r["noise_ratio"],
            "gain_over_noise": r["gain_over_noise"], "gain_low": r["gain_low"], "gain_high": r["gain_high"],
            "gain_significant": r["gain_significant"], "top_class_share_mean": r["top_class_share_mean"]}
    out = {"table": table, "entropy": {u["pool"]: u["entropy"][0] for u in units if u["entropy"]},
           "labels": {u["pool"]: u["labels"] for u in units},
           "pool_seconds": {u["pool"]: {"run": u["run_seconds"], "wall": u["wall_seconds"]} for u in units},
           "strategies": units[0]["strategies"] if units else [], "targets": {}}
    top = agr[agr.budget == budgets[-1]] if len(agr) else agr
    if len(top):
        best = top.loc[top.agreement_mean.idxmax()]
        goal = TARGETS.get(ds)
        out["targets"]["best_pool_and_strategy_at_largest_budget"] = {
            "pool": best["pool"], "strategy": best["strategy"], "budget": int(budgets[-1]),
            "measured": best["agreement_mean"], "ci95": None if pd.isna(best["agreement_ci95"]) else best["agreement_ci95"],
            "target": goal, "met": None if goal is None else bool(best["agreement_mean"] >= goal)}
        mine = top[top.strategy == best_strategy]
        if len(mine) and baseline in set(mine.pool):
            b = mine.loc[mine.agreement_mean.idxmax()]
            noise = float(mine[mine.pool == baseline].agreement_mean.iloc[0])
            out["targets"]["best_strategy_ratio_best_pool_to_noise"] = {
                "strategy": best_strategy, "best_pool": b["pool"], "agreement": b["agreement_mean"],
                "noise_agreement": noise, "ratio": b["noise_ratio"], "budget": int(budgets[-1])}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["digits", "fashion-mnist"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--strategies", nargs="+", default=None,
                    help="default: random and quality.json's best strategy at 1,000 queries (else 'best')")
    ap.add_argument("--pools", nargs="+", default=None, help="only these pool specs, run in this order after the uniform-noise baseline, which always runs (default: all the study's)")
    ap.add_argument("--results", default="results/bench-pools")
    ap.add_argument("--secrets-from", default="results",
                    help="use the demo secret saved under this results root when there (else trained under --results)")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--json", type=Path, default=OUT)
    ap.add_argument("--jobs", type=int, default=1, help="pools run in parallel (one process each)")
    ap.add_argument("--build-only", action="store_true", help="measure the 20k-patch pool build, run no extraction")
    args = ap.parse_args(argv)

    from stealnb.core import layout, profiles, train
    from stealnb.experiments import pools
    from stealnb.report import pipeline

    base = profiles.get_profile("demo")
    secrets = [(d, a) for d, a in pipeline.secrets_of(base, args.data_root) if d in args.datasets]
    plans = {}  # each secret's strategies and pools, checked before anything is built or trained
    for ds, arch in secrets:
        best = quality_best(ds, arch, base.budgets[-1])
        strategies = args.strategies or ["random", best or profiles.BEST_STRATEGY]
        prof = study_profile(args, strategies)
        specs, skipped = pools.pool_specs(prof, ds, args.data_root)
        baseline = prof.pool_study.baseline
        if args.pools:  # these, in this order, after the noise baseline every ratio needs
            unknown = [s for s in args.pools if s not in specs]
            if unknown:
                ap.error(f"--pools: {', '.join(unknown)} not among the pools of the {ds} secret ({', '.join(specs)})")
            specs = [s for s in args.pools if s != baseline]
            specs.insert(0, baseline)
        else:  # noise first: every other pool's ratio needs it
            specs.sort(key=lambda s: s != baseline)
        plans[ds] = (best, strategies, prof, specs, skipped)
    report = {"setup": {"profile": "demo", "budgets": list(base.budgets), "seeds": args.seeds,
                        "round_size": base.round_size, "seed_size": base.seed_size, "val_size": base.val_size,
                        "substitute": base.substitute, "pool_size": base.pool_size, "recipe": base.substitute_fit(),
                        "strategy_options": base.strategy_options, "jobs": args.jobs,
                        "skipped_datasets": [d for d in args.datasets if d not in {s[0] for s in secrets}],
                        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                    "load_average_at_start": os.getloadavg()}},
              "pool_build": pool_build_seconds(), "secrets": {}, "finished": False}
    print(f"natural-patches build: {report['pool_build']}", flush=True)

    def save():
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=float))

    save()
    if args.build_only:
        secrets = []
        report["setup"]["build_only"] = True
    for ds, arch in secrets:
        best, strategies, prof, specs, skipped = plans[ds]
        sd = layout.secret_dir(args.secrets_from, "demo", ds, arch)
        if not (sd / "model.keras").is_file():  # trained once here, not by parallel workers
            train.ensure_secret(ds, arch, base, args.results, data_root=args.data_root)
            sd = layout.secret_dir(args.results, "demo", ds, arch)
        args_dict = {**vars(args), "json": str(args.json), "secret_dir": str(sd)}
        entry = {"strategies_source": "quality.json" if best and not args.strategies else "argument or study rule",
                 "skipped_pools": skipped, "units": []}
        report["secrets"][f"{ds}-{arch}"] = entry
        t0 = time.perf_counter()
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
            futs = [ex.submit(run_pool, ds, arch, s, strategies, args_dict) for s in specs]
            for f in as_completed(futs):
                u = f.result()
                entry["units"].append(u)
                print(f"[{ds} {u['pool']}] " + "  ".join(
                    f"{r['strategy']} s{r['seed']} {r['budget']}: {r['agreement']:.3f}" for r in u["per_run"]
                    if r["budget"] == base.budgets[-1]) + f"  ({u['wall_seconds']:.0f} s)", flush=True)
                done = strategies[1] if len(strategies) > 1 else strategies[0]
                resolved = next((r["strategy"] for r in u["strategies"] if r["as"] == done), done)
                entry.update(summarise_secret(ds, arch, entry["units"], prof.pool_study.baseline, base.budgets,
                                              resolved))
                entry["seconds"] = round(time.perf_counter() - t0, 1)
                save()

    for name, entry in report["secrets"].items():
        print(f"\n### {name}: agreement mean ± 95% CI over seeds (ratio to uniform noise)\n")
        budgets = [str(b) for b in base.budgets]
        print("| pool | strategy | " + " | ".join(f"{b} queries" for b in budgets) + " | label entropy (bits) |")
        print("|---|---|" + "---|" * len(budgets) + "---|")
        for pool, by_s in entry.get("table", {}).items():
            for strat, row in by_s.items():
                cells = [f"{c['mean']:.3f} ± {c['ci95'] or 0:.3f} (×{c['noise_ratio']:.2f})" if c else "–"
                         for c in (row.get(b) for b in budgets)]
                ent = entry["entropy"].get(pool, {}).get("entropy_bits")
                print(f"| {pool} | {strat} | " + " | ".join(cells) + f" | {ent:.2f} |")
        for tname, t in entry.get("targets", {}).items():
            print(f"target {tname}: {t}")
    print(f"\npool build: {report['pool_build']}")
    report["finished"] = True
    report["setup"]["machine"]["load_average_at_end"] = os.getloadavg()
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

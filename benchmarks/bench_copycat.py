"""Benchmark the Copycat attack (stealnb.extraction.copycat; thesis 002 §5.6.2-§5.6.3) on the demo setup.

Secret: the demo profile's digits / cnn-small (trained on demand under ``--results``); NPDD:
the natural-patches pool (20k images); copycat: cnn-small; NPDD budgets 500/1000/2000; PDD
variants add ``pdd_size`` (demo: 200) oracle-labelled train-split images. For each variant
(npdd, pdd-sl, npdd+pdd) and seed, measures agreement, macro-F1 and relative F1 (copycat
F1 / oracle F1) at every budget and the wall time, then prints JSON and a markdown table
(mean ± std over seeds when several).

    python benchmarks/bench_copycat.py [--seeds 0 1 2] [--results results] [--json out.json]

Runs with ``resume=False`` (fresh ledgers) into <results>/demo/copycat/...; measured on 2 shared
cores: ~3.5 min per seed for the three variants (10.4 min for seeds 0 1 2) plus ~40 s to train
the demo secret when it is not under <results> yet. Deterministic: the same seed gives the same
numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=["npdd", "pdd-sl", "npdd+pdd"])
    ap.add_argument("--budgets", default="500,1000,2000")
    ap.add_argument("--results", default="results")
    ap.add_argument("--json", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)

    from stealnb.core import profiles, train
    from stealnb.extraction import copycat

    prof = profiles.get_profile("demo")
    budgets = tuple(int(b) for b in args.budgets.split(","))
    t0 = time.perf_counter()
    _, secret = train.ensure_secret("digits", "cnn-small", prof, args.results)
    secret_seconds = time.perf_counter() - t0
    runs = []
    for variant in args.variants:
        for seed in args.seeds:
            w0, c0 = time.perf_counter(), time.process_time()
            cc = copycat.run_copycat("digits", "cnn-small", variant, prof, seed=seed, results=args.results,
                                     resume=False, budgets=budgets)
            s = cc.summary()
            runs.append({"variant": variant, "seed": seed, "wall_seconds": round(time.perf_counter() - w0, 1),
                         "cpu_seconds": round(time.process_time() - c0, 1), "oracle_spent": s["oracle_spent"],
                         "oracle_macro_f1": s["oracle"]["macro_f1"], "budgets": s["budgets"]})
            print(f"[{variant} seed {seed}] {runs[-1]['wall_seconds']} s", flush=True)
    report = {
        "setup": {"secret": "digits/cnn-small (demo)", "secret_test_accuracy": secret["test_accuracy"],
                  "pool": "natural-patches (20k)", "copycat": "cnn-small", "budgets": budgets,
                  "seeds": args.seeds, "secret_seconds": round(secret_seconds, 1),
                  "machine": {"python": platform.python_version(), "cpus": os.cpu_count()}},
        "runs": runs,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)

    def fmt(vals):
        vals = np.asarray(vals, float)
        return f"{vals.mean():.3f}" if len(vals) == 1 else f"{vals.mean():.3f} ± {vals.std(ddof=1):.3f}"

    print(f"\noracle macro-F1 {runs[0]['oracle_macro_f1']:.4f}; {len(args.seeds)} seed(s)\n")
    print("| variant | NPDD budget | queries | agreement | macro-F1 | relative F1 | rel. F1 before PDD |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for variant in args.variants:
        rs = [r for r in runs if r["variant"] == variant]
        for b in budgets:
            rows = [r["budgets"][str(b)] for r in rs]
            before = fmt([x["npdd"]["relative_f1"] for x in rows]) if "npdd" in rows[0] else "-"
            print(f"| {variant} | {b} | {rows[0]['queries']} | {fmt([x['agreement'] for x in rows])} | "
                  f"{fmt([x['macro_f1'] for x in rows])} | {fmt([x['relative_f1'] for x in rows])} | {before} |")
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

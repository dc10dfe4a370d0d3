"""The substitute's training recipe, measured: agreement of a substitute trained on a *random*
labelled set with each recipe variant, paired over seeds (the same pool images, labels and
validation split for every variant of a seed), at two labelled-set sizes of the demo loop.

Setup = the ``demo`` profile's secret (digits / cnn-small), pool (20k natural-photo patches),
validation split (50 oracle-labelled images) and substitute architecture; for each seed the
first ``val_size + max(sizes)`` images of a seeded random draw give the validation split and
the labelled sets (the first n of them), as the ActiveThief loop's random strategy draws them.
Variants (``VARIANTS``): the recipe before the substitute-recipe issue (validation-loss
checkpoint, batch 128, patience 3, 20 epochs) and ActiveThief's recipe (``utils/model.py``:
validation macro-F1 checkpoint, batch 50) with a minimum of 300 optimizer steps, then with
class-balanced loss weights, BatchNorm (``cnn-small-bn``) and query-free augmentation added.

Prints a table (mean ± 95% CI over seeds, the paired difference to the old recipe) and writes
``benchmarks/results/recipe.json``. What the profile keeps is decided from these numbers.

    python benchmarks/bench_recipe.py [--seeds 0 1 2 3 4] [--sizes 200 950] [--jobs 2]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

OUT = Path(__file__).resolve().parent / "results" / "recipe.json"
F1 = dict(epochs=30, patience=10, batch_size=50, monitor="macro_f1", min_steps=300, stop_loss=1.5)
VARIANTS = {
    "old (val loss, batch 128)": ("cnn-small", dict(epochs=20, patience=3, batch_size=128, monitor="loss")),
    "F1 checkpoint, batch 50": ("cnn-small", F1),
    "+ class weights": ("cnn-small", dict(F1, class_weight=True)),
    "+ class weights + BatchNorm": ("cnn-small-bn", dict(F1, class_weight=True)),
    "+ class weights + augmentation": ("cnn-small", dict(F1, class_weight=True, augment=True)),
}


def run_one(variant: str, seed: int, size: int, results: str) -> dict:
    from stealnb.core import data, metrics, models, profiles, train

    prof = profiles.get_profile("demo")
    train.enable_determinism(seed)
    secret, _ = train.ensure_secret("digits", "cnn-small", prof, results)
    ds = data.load_dataset("digits")
    pool = data.load_pool(prof.pool, n=prof.pool_size, seed=0)
    rng = np.random.default_rng(seed)
    first = rng.choice(len(pool), prof.val_size + 950, replace=False)
    val, lab = np.sort(first[: prof.val_size]), np.sort(first[prof.val_size: prof.val_size + size])
    xv, xl = pool.get(val), pool.get(lab)
    yv, yl = models.predict_labels(secret, xv), models.predict_labels(secret, xl)
    arch, recipe = VARIANTS[variant]
    t0 = time.perf_counter()
    m = models.build(arch, num_classes=ds.num_classes, seed=seed * 1000)
    h = train.fit(m, xl, yl, validation=(xv, yv), seed=seed * 1000, **recipe)
    pred = models.predict_labels(m, ds.x_test)
    row = {"variant": variant, "seed": seed, "size": size,
           "agreement": metrics.agreement(models.predict_labels(secret, ds.x_test), pred),
           **metrics.collapse(pred, ds.num_classes), "epochs": len(h["loss"]), "best_epoch": h.get("best_epoch"),
           "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--sizes", type=int, nargs="+", default=[200, 950])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--results", default="results")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--json", type=Path, default=OUT)
    args = ap.parse_args(argv)
    from stealnb.core import metrics, profiles, train

    train.ensure_secret("digits", "cnn-small", profiles.get_profile("demo"), args.results)  # once, before workers
    jobs = [(v, s, n) for s in args.seeds for n in args.sizes for v in args.variants]
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
        rows = list(ex.map(run_one, *zip(*[(v, s, n, args.results) for v, s, n in jobs])))
    table = {}
    base = list(VARIANTS)[0]
    for n in args.sizes:
        ref = {r["seed"]: r["agreement"] for r in rows if r["size"] == n and r["variant"] == base}
        for v in args.variants:
            mine = {r["seed"]: r for r in rows if r["size"] == n and r["variant"] == v}
            mean, half = metrics.mean_ci95([r["agreement"] for r in mine.values()])
            seeds = sorted(set(mine) & set(ref))
            diff = metrics.paired_difference([mine[s]["agreement"] for s in seeds], [ref[s] for s in seeds])
            table.setdefault(v, {})[str(n)] = {
                "mean": mean, "ci95": half, "n": len(mine), "paired_to_old": diff,
                "top_class_share_max": max(r["top_class_share"] for r in mine.values()),
                "seconds_mean": float(np.mean([r["seconds"] for r in mine.values()]))}
    report = {"setup": {"profile": "demo", "secret": "digits/cnn-small", "seeds": args.seeds, "sizes": args.sizes,
                        "variants": {v: {"arch": a, **r} for v, (a, r) in VARIANTS.items() if v in args.variants}},
              "runs": rows, "table": table}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print("\n| recipe | " + " | ".join(f"{n} labelled: agreement (95% CI) | vs old" for n in args.sizes) + " |")
    print("|---|" + "---|---|" * len(args.sizes))
    for v, row in table.items():
        cells = []
        for n in args.sizes:
            c = row[str(n)]
            d = c["paired_to_old"]
            cells += [f"{c['mean']:.3f} ± {c['ci95']:.3f}",
                      "–" if v == base else f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]{' *' if d['significant'] else ''}"]
        print(f"| {v} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

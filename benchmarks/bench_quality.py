"""Extraction quality on the offline demo setup: agreement vs budget for every strategy over
several seeds, next to the random baseline and ART's ``CopycatCNN`` at the same budgets and
substitute (issue 3, benchmark "quality").

Setup = the ``demo`` profile (stealnb/profiles.py): secret digits / cnn-small (and
Fashion-MNIST / cnn-small when the Debian package is installed and ``--datasets`` names it);
thief pool: 20k natural-photo patches; substitute cnn-small; budgets 250 / 500 / 1000 (the
validation split's 50 queries count against them); seeds 0 1 2.

Extraction runs go through ``stealnb.extraction.run_extraction`` into the standard results
layout (``<results>/demo/extraction/...``) with ``resume=True``: runs that `stealnb run
--profile demo` already finished are read back, not recomputed (``--fresh`` recomputes).

ART baseline: ``art.attacks.extraction.CopycatCNN`` (adversarial-robustness-toolbox, the
``bench`` extra) with the secret wrapped as a ``TensorFlowV2Classifier`` answering top-1 labels
(``use_probability=False``), a fresh cnn-small as the thieved classifier, the same pool
(a seeded random sample of the budget's size), ``nb_epochs`` = the profile's substitute epochs,
no validation split (ART has none) — so at equal budget ART trains on 50 more images than ours.

Prints JSON and a markdown table (mean ± std over seeds) and checks the issue's target: at the
smallest budget, K-center or DFAL+K-center above random by a margin larger than the seed spread
(spread = the larger of the two standard deviations).

    python benchmarks/bench_quality.py [--datasets digits fashion-mnist] [--seeds 0 1 2] [--no-art]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

OUT = Path(__file__).resolve().parent / "results" / "quality.json"
STRATEGIES = ("random", "uncertainty", "kcenter", "dfal", "dfal+kcenter")


def art_copycat(secret, dataset: str, budgets, seed: int, prof, data_root=None) -> dict:
    """Agreement of ART's CopycatCNN at each budget (one fresh thieved model per budget)."""
    import tensorflow as tf
    from art.attacks.extraction import CopycatCNN
    from art.estimators.classification import TensorFlowV2Classifier

    from stealnb import data, metrics, models, train

    ds = data.load_dataset(dataset, root=data_root)
    pool = data.load_pool(prof.pool, root=data_root, n=prof.pool_size, seed=0)
    secret_test = models.predict_labels(secret, ds.x_test)
    loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    victim = TensorFlowV2Classifier(secret, nb_classes=ds.num_classes, input_shape=(32, 32, 3),
                                    loss_object=loss, clip_values=(0.0, 1.0))
    out = {}
    for b in budgets:
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(len(pool), b, replace=False))
        x = pool.get(idx)
        train.enable_determinism(seed * 1000 + b)
        thief_model = models.build(prof.substitute, num_classes=ds.num_classes)
        opt = tf.keras.optimizers.Adam(prof.learning_rate)

        def train_step(model, images, labels):
            with tf.GradientTape() as tape:
                lo = loss(labels, model(images, training=True))
            opt.apply_gradients(zip(tape.gradient(lo, model.trainable_variables), model.trainable_variables))

        thief = TensorFlowV2Classifier(thief_model, nb_classes=ds.num_classes, input_shape=(32, 32, 3),
                                       loss_object=loss, optimizer=opt, train_step=train_step, clip_values=(0.0, 1.0))
        t0 = time.perf_counter()
        attack = CopycatCNN(classifier=victim, batch_size_fit=min(64, b), batch_size_query=256,
                            nb_epochs=prof.substitute_epochs, nb_stolen=b, use_probability=False)
        stolen = attack.extract(x, thieved_classifier=thief)
        pred = np.argmax(stolen.predict(ds.x_test, batch_size=512), axis=1)
        out[str(b)] = {"agreement": metrics.agreement(secret_test, pred),
                       "accuracy": metrics.accuracy(ds.y_test, pred), "seconds": round(time.perf_counter() - t0, 1)}
    return out


def summarise(values):
    v = np.asarray([x for x in values if x is not None], float)
    if not len(v):
        return None
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v)),
            "min": float(v.min()), "max": float(v.max())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["digits", "fashion-mnist"])
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--results", default="results")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--no-art", action="store_true", help="skip ART's CopycatCNN baseline")
    ap.add_argument("--fresh", action="store_true", help="recompute runs already under --results")
    ap.add_argument("--json", type=Path, default=OUT)
    args = ap.parse_args(argv)

    from stealnb import data, extraction, pipeline, profiles, train

    prof = profiles.get_profile("demo")
    present = pipeline.secrets_of(prof, args.data_root)
    secrets = [(d, a) for d, a in present if d in args.datasets]
    skipped = [d for d in args.datasets if d not in {s[0] for s in secrets}]
    report = {"setup": {"profile": "demo", "pool": f"{prof.pool} ({prof.pool_size})", "substitute": prof.substitute,
                        "budgets": list(prof.budgets), "seed_size": prof.seed_size, "val_size": prof.val_size,
                        "round_size": prof.round_size, "seeds": args.seeds, "skipped_datasets": skipped,
                        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()}},
              "secrets": {}}
    for ds, arch in secrets:
        t0 = time.perf_counter()
        secret, s_sum = train.ensure_secret(ds, arch, prof, args.results, data_root=args.data_root)
        entry = {"secret_test_accuracy": s_sum["test_accuracy"], "secret_seconds": s_sum.get("seconds"),
                 "runs": {}, "table": {}}
        for strat in args.strategies:
            per_seed = []
            for seed in args.seeds:
                w0 = time.perf_counter()
                ex = extraction.run_extraction(ds, arch, strat, prof, seed=seed, results=args.results,
                                               data_root=args.data_root, resume=not args.fresh)
                s = ex.summary()
                per_seed.append({"seed": seed, "budgets": {b: r["agreement"] for b, r in s["budgets"].items()},
                                 "run_seconds": s["seconds"], "wall_seconds_now": round(time.perf_counter() - w0, 1)})
                print(f"[{ds} {strat} seed {seed}] " + "  ".join(f"{b}: {a:.4f}" for b, a in per_seed[-1]["budgets"].items()),
                      flush=True)
            entry["runs"][strat] = per_seed
        if not args.no_art:
            per_seed = []
            for seed in args.seeds:
                r = art_copycat(secret, ds, prof.budgets, seed, prof, args.data_root)
                per_seed.append({"seed": seed, "budgets": {b: v["agreement"] for b, v in r.items()},
                                 "run_seconds": sum(v["seconds"] for v in r.values())})
                print(f"[{ds} ART CopycatCNN seed {seed}] " + "  ".join(f"{b}: {a:.4f}" for b, a in per_seed[-1]["budgets"].items()),
                      flush=True)
            entry["runs"]["art-copycatcnn"] = per_seed
        for method, rows in entry["runs"].items():
            entry["table"][method] = {str(b): summarise([r["budgets"].get(str(b)) for r in rows]) for b in prof.budgets}
        b0 = str(prof.budgets[0])
        rnd = entry["table"]["random"][b0] if "random" in entry["table"] else None
        checks = {}
        for strat in ("kcenter", "dfal+kcenter"):
            if strat in entry["table"] and rnd:
                st = entry["table"][strat][b0]
                margin = st["mean"] - rnd["mean"]
                spread = max(st["std"], rnd["std"])
                checks[strat] = {"margin_over_random": margin, "seed_spread": spread, "beats_random": margin > spread,
                                 "ranges_disjoint": st["min"] > rnd["max"]}
        entry["target_smallest_budget"] = {"budget": int(b0), "checks": checks,
                                           "met": any(c["beats_random"] for c in checks.values())}
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        report["secrets"][f"{ds}-{arch}"] = entry

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "runs"} for k, v in report["secrets"].items()}, indent=2))
    for name, entry in report["secrets"].items():
        print(f"\n### {name} (secret test accuracy {entry['secret_test_accuracy']:.4f}), agreement mean ± std over seeds\n")
        print("| method | " + " | ".join(f"{b} queries" for b in prof.budgets) + " |")
        print("|---|" + "---|" * len(prof.budgets))
        for method, row in entry["table"].items():
            cells = [f"{c['mean']:.4f} ± {c['std']:.4f} (n={c['n']})" if c else "–" for c in row.values()]
            print(f"| {method} | " + " | ".join(cells) + " |")
        t = entry["target_smallest_budget"]
        for strat, c in t["checks"].items():
            print(f"\n{strat} vs random at {t['budget']}: margin {c['margin_over_random']:+.4f}, seed spread "
                  f"{c['seed_spread']:.4f} -> {'above random' if c['beats_random'] else 'NOT above random'} by more than the spread")
    if skipped:
        print(f"\nskipped (data not present): {', '.join(skipped)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

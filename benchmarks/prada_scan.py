"""PRADA (stealnb.defenses) on the query stream of every extraction run of a results folder.

For each strategy and seed already run under ``results/<profile>/extraction/<dataset>-<arch>/``
(e.g. by ``make demo``; nothing is trained or queried here, the runs are only read back),
the stream the oracle saw -- validation split, seed set, then each round's picks, each distinct
image once, as in notebook 06 -- is scanned by one PRADA detector. Reported per run: distinct
queries, lowest Shapiro-Wilk W, the query index of the alarm at ``--delta`` (``None``: never),
median and skew of the final minimum-distance set, and how the secret labels the run's
*selected* images (after the seed set): the share of its most common class and the number of
classes. Benign reference: ``--clients`` clients sending ``min(budget, |test set|)`` test-set
images each (false-positive rate at ``--delta`` and their lowest W).

    python benchmarks/prada_scan.py [--profile demo] [--dataset digits] [--arch cnn-small]
                                     [--results results] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import stats

from stealnb.core import data, layout, models, profiles
from stealnb.experiments import defense_experiment
from stealnb.extraction import loop
from stealnb.core.train import load_secret


def run(profile: str, dataset: str, arch: str, results: str, delta: float, clients: int, seed: int) -> dict:
    prof = profiles.get_profile(profile)
    secret, meta = load_secret(layout.secret_dir(results, prof.name, dataset, arch))
    ds = data.load_dataset(dataset)
    label = lambda x: models.predict_labels(secret, x)  # noqa: E731
    budget = prof.budgets[-1]
    benign = defense_experiment.prada_benign_clients(ds.x_test, label(ds.x_test), n_clients=clients,
                                           client_size=min(budget, len(ds.x_test)), seed=seed)
    out = {"profile": prof.name, "dataset": dataset, "arch": arch, "delta": delta, "budget": budget,
           "benign": {"clients": clients, "client_size": min(budget, len(ds.x_test)),
                      "fpr": float(np.mean([defense_experiment.prada_flag_index(s["w_history"], delta) is not None
                                            for s in benign])),
                      "min_w": float(min(s["min_w"] for s in benign))},
           "runs": []}
    for strategy in prof.strategies:
        for s in prof.seeds:
            run_dir = layout.extraction_dir(results, prof.name, dataset, arch, strategy, s)
            if not (run_dir / "summary.json").exists():
                continue
            ex = loop.run_extraction(dataset, arch, strategy, prof, seed=s, results=results)  # read back
            if not ex.done:
                raise RuntimeError(f"{run_dir}: the run is not finished; finish it first (make demo)")
            x = ex.query_stream()
            scan = defense_experiment.prada_scan(x, label(x), delta=delta)
            picked = label(ex.pool.get(ex.labelled_idx[ex.config.seed_size:]))
            counts = np.bincount(picked, minlength=ds.num_classes)
            d = np.asarray(scan["distances"])
            out["runs"].append({
                "strategy": strategy, "seed": s, "queries": scan["n_queries"], "min_w": scan["min_w"],
                "flagged_at": defense_experiment.prada_flag_index(scan["w_history"], delta),
                "median_distance": float(np.median(d)), "distance_skew": float(stats.skew(d)),
                "selected": int(len(picked)), "top_class": int(counts.argmax()),
                "top_class_share": float(counts.max() / max(len(picked), 1)),
                "classes_selected": int((counts > 0).sum()),
                "agreement": ex.summary()["budgets"][str(budget)]["agreement"]})
    return out


def table(res: dict) -> str:
    b = res["benign"]
    lines = [f"PRADA, delta={res['delta']}: {res['dataset']}/{res['arch']} ({res['profile']}); benign test-set "
             f"clients {b['clients']} x {b['client_size']}: FPR {b['fpr']:.2f}, lowest W {b['min_w']:.4f}", "",
             "| strategy | seed | queries | min W | flagged at | median d | skew | top class share | classes | "
             "agreement |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        lines.append(f"| {r['strategy']} | {r['seed']} | {r['queries']} | {r['min_w']:.4f} | {r['flagged_at']} | "
                     f"{r['median_distance']:.2f} | {r['distance_skew']:.2f} | {r['top_class_share']:.2f} "
                     f"(class {r['top_class']}) | {r['classes_selected']} | {r['agreement']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--dataset", default=None, help="default: the profile's first secret")
    ap.add_argument("--arch", default=None)
    ap.add_argument("--results", default="results")
    ap.add_argument("--delta", type=float, default=0.9)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the JSON here")
    a = ap.parse_args(argv)
    prof = profiles.get_profile(a.profile)
    dataset = a.dataset or prof.secrets[0][0]
    arch = a.arch or next((ar for d, ar in prof.secrets if d == dataset), prof.secrets[0][1])
    res = run(a.profile, dataset, arch, a.results, a.delta, a.clients, a.seed)
    print(json.dumps(res, indent=2))
    print(table(res))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Smoke-run the paper grid on a CPU: every notebook of the ``paper-smoke`` profile (issue 17).

``paper-smoke`` (stealnb/core/profiles.py) is ``paper`` -- 15 secrets (MNIST, CIFAR-10, GTSRB x VGG16,
VGG19, AlexNet, ResNet50, ResNet101), the five ActiveThief strategies, Copycat, the defenses,
a VGG16 substitute on the ImageNet 32x32 pool -- with 2 folds, 1 epoch and budgets 40/60. The data
are small files written in the official formats (tests/fixtures_formats.py: MNIST IDX, CIFAR-10
python batches, GTSRB ppm + csv, ImageNet32 pickled batches) into a fresh data root, read by
the real loaders. The grid runs through ``stealnb run`` (a local Dask cluster of ``--jobs``
workers); the book is not built.

    python benchmarks/bench_paper_smoke.py [--jobs 2] [--work DIR] [--only TEXT]

Writes ``benchmarks/results/paper_smoke.json``: per notebook whether it executed and its wall
seconds, the total, and the machine. A failed notebook's log is under
``<work>/results/paper-smoke/logs/``. Exit status 1 when a notebook failed.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the official-format writers the loader tests use

import fixtures_formats as ff  # noqa: E402
from _provenance import code_version, write_result  # noqa: E402

# Fixture sizes: enough images for 2-fold CV, a 600-image pool, Copycat's 20 PDD images and the
# defenses' benign clients; small enough that the 15 secrets train in seconds each.
MNIST_TRAIN, MNIST_TEST = 300, 100
CIFAR_PER_BATCH = 60  # 5 x 60 train, 60 test
GTSRB_TRAIN = {c: 30 for c in range(12)}  # 12 classes: the loader keeps the 10 most frequent
GTSRB_TRAIN.update({0: 60, 10: 8, 11: 6})  # the EDA's track view needs two 30-frame tracks of the top class
GTSRB_TEST = [c for c in range(12) for _ in range(8)]
IMAGENET32_BATCHES = (400, 400)  # train_data_batch_1, _2: 800 images for the 600-image pool


def write_data(root: Path, seed: int = 0) -> dict:
    """The four datasets in their official layouts under ``root``; returns what was written."""
    rng = np.random.default_rng(seed)
    ff.write_mnist_like(root / "mnist", gz=True, n_train=MNIST_TRAIN, n_test=MNIST_TEST, seed=seed)
    ff.write_cifar(root, per_batch=CIFAR_PER_BATCH, seed=seed)
    ff.write_gtsrb(root, GTSRB_TRAIN, GTSRB_TEST, seed=seed)
    d = root / "imagenet32"
    d.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(IMAGENET32_BATCHES, start=1):  # random images, in the official pickled batches
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        (d / f"train_data_batch_{i}").write_bytes(pickle.dumps(
            {"data": data, "labels": [int(v) for v in rng.integers(1, 1001, n)], "mean": np.zeros(3072)}))
    return {"mnist": [MNIST_TRAIN, MNIST_TEST], "cifar10": [5 * CIFAR_PER_BATCH, CIFAR_PER_BATCH],
            "gtsrb": [sum(GTSRB_TRAIN.values()), len(GTSRB_TEST)], "imagenet32": sum(IMAGENET32_BATCHES)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None,
                    help="folder for the data root and the results (default: a new temporary folder)")
    ap.add_argument("--only", default=None, help="run only the tasks whose id contains this text")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "paper_smoke.json")
    ap.add_argument("--status", action="store_true",
                    help="run nothing: write the JSON from the stamps and logs under --work (a run still going, "
                         "or one that was stopped)")
    ap.add_argument("--note", default="", help="with --status: a remark stored in the JSON (why the run stopped)")
    ap.add_argument("--machine-note", default="",
                    help="how loaded the machine was while measured (stored as machine.note), e.g. 'idle'")
    args = ap.parse_args(argv)
    if args.status:
        if args.work is None:
            ap.error("--status needs --work")
        return status(args.work, args.json, args.note, args.machine_note)
    if args.jobs < 1:  # before the fixture files are written
        ap.exit(2, f"bench_paper_smoke: --jobs must be at least 1 (got {args.jobs})\n")

    from stealnb.report import pipeline
    from stealnb.core.profiles import get_profile

    code = code_version()  # before the run: the checkout may move while it goes
    work = args.work or Path(tempfile.mkdtemp(prefix="stealnb-paper-smoke-"))
    data_root, results = work / "data", work / "results"
    if not data_root.exists():
        written = write_data(data_root)
    else:
        written = "reused"
    t0 = time.perf_counter()
    prof = get_profile("paper-smoke")
    rep = pipeline.run(prof, results=results, data_root=data_root, jobs=args.jobs, book=False, only=args.only,
                       progress=True)
    wall = round(time.perf_counter() - t0, 1)
    tasks = pipeline.plan(prof, results, data_root)
    if args.only:
        tasks = [t for t in tasks if t.id in set(rep["ran"]) | set(rep["failed"]) | set(rep["blocked"])
                 | set(rep["skipped"])]
    notebooks = {}
    for t in tasks:
        state = ("executed" if t.id in rep["ran"] else "skipped (unchanged)" if t.id in rep["skipped"]
                 else "failed" if t.id in rep["failed"] else "blocked")
        notebooks[t.id] = {"ok": state in ("executed", "skipped (unchanged)"), "state": state,
                           "seconds": rep["seconds"].get(t.id)}
    out = {
        "profile": "paper-smoke",
        "what": ("every notebook of the paper grid" if not args.only else
                 f"the tasks of the paper grid whose id contains {args.only!r}, and what they depend on")
                + " (real architectures and loaders) on official-format fixture files",
        "only": args.only,
        "secrets": [list(s) for s in prof.secrets], "strategies": list(prof.strategies),
        "folds": prof.folds, "epochs": prof.epochs, "budgets": list(prof.budgets), "pool_size": prof.pool_size,
        "fixture_images": written, "jobs": args.jobs,
        "tasks_total": len(notebooks), "tasks_ok": sum(n["ok"] for n in notebooks.values()),
        "notebooks_total": sum(t.is_notebook for t in tasks),
        "notebooks_ok": sum(notebooks[t.id]["ok"] for t in tasks if t.is_notebook),
        "runs_total": sum(not t.is_notebook for t in tasks),  # the runs/ tasks: one per extraction / Copycat seed, one per run of the pool study (pool, strategy, seed)
        "all_ok": all(n["ok"] for n in notebooks.values()),
        "wall_seconds": wall, "notebook_seconds_sum": round(sum(n["seconds"] or 0 for n in notebooks.values()), 1),
        "failed_logs": rep.get("logs", {}),
        "notebooks": notebooks,
    }
    json_path = write_result(args.json, out, machine_note=args.machine_note, code=code)
    print(json.dumps({k: v for k, v in json.loads(Path(json_path).read_text()).items() if k != "notebooks"}, indent=2))
    print(f"work folder (data root, results, logs): {work}")
    return 0 if out["all_ok"] else 1


def status(work: Path, json_path: Path, note: str = "", machine_note: str = "") -> int:
    """The JSON of a run under ``work`` that has not finished: per notebook, executed (its
    stamp holds a notebook key), failed (its log records a cell exception), started with no
    outcome (still running, or the run was stopped), or not started."""
    from stealnb.core import layout
    from stealnb.report import pipeline
    from stealnb.core.profiles import get_profile

    prof = get_profile("paper-smoke")
    results = work / "results"
    run_dir = layout.profile_dir(results, prof.name)
    notebooks = {}
    for t in pipeline.plan(prof, results, work / "data"):
        stamp = run_dir / "stamps" / (t.id.replace("/", "__") + ".json")
        log = run_dir / "logs" / (t.id.replace("/", "__") + ".log")
        st = json.loads(stamp.read_text()) if stamp.exists() else {}
        if st.get("key"):
            state = "executed"
        elif log.exists() and "Exception encountered" in log.read_text(errors="replace"):
            state = "failed (an attempt; a second one may follow)" if st else "failed"
        elif st:
            state = "started, no outcome (running, or the run was stopped)"
        else:
            state = "not started"
        notebooks[t.id] = {"ok": state == "executed", "state": state,
                           "seconds": st.get("seconds") if state == "executed" else None}
    counts = {}
    for n in notebooks.values():
        counts[n["state"]] = counts.get(n["state"], 0) + 1
    out = {"profile": prof.name, "partial": True, "note": note, "states": counts, "notebooks_total": len(notebooks),
           "notebooks_ok": sum(n["ok"] for n in notebooks.values()), "notebooks": notebooks}
    write_result(json_path, out, machine_note=machine_note)
    print(json.dumps({k: v for k, v in json.loads(Path(json_path).read_text()).items() if k != "notebooks"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

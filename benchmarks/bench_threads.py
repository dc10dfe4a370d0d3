"""TensorFlow's thread pools when ``--jobs`` tasks share the cores: the default against one thread per task.

``make demo`` runs two worker processes on two cores (``stealnb run --jobs 2``), and each task's
TensorFlow sizes its intra-op and inter-op pools to every core of the machine, so two trainings
run four or more busy threads on two cores. This benchmark runs the same extraction seed tasks
(``stealnb extract``: profile ``demo``, the digits secret, ``--seeds``), ``--jobs`` processes at a time,
once with TensorFlow's defaults and once with ``TF_NUM_INTRAOP_THREADS=1``,
``TF_NUM_INTEROP_THREADS=1`` and ``OMP_NUM_THREADS=1`` (``--threads`` sets the number), variants
alternating per repeat, each into a fresh folder. It reports each variant's wall time and whether
the runs' results are the same (agreement and accuracy at every budget: a different thread count
can change the order of floating-point sums).

    python benchmarks/bench_threads.py [--strategy random] [--seeds 0 1] [--jobs 2] [--threads 1]
        [--repeats 1] [--secret DIR] [--work DIR] [--machine-note TEXT]

The secret is trained first into ``--work`` (``stealnb train-secret``) unless ``--secret`` names
one. Writes ``benchmarks/results/threads_demo.json`` and prints a table; nothing in the package
changes with it: it is the measurement a thread setting for the workers would rest on.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _provenance import write_result  # noqa: E402

STEALNB = [str(Path(sys.executable).parent / "stealnb")]  # the console script of this interpreter's venv


def _env(threads: int | None) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if threads is not None:
        env.update(TF_NUM_INTRAOP_THREADS=str(threads), TF_NUM_INTEROP_THREADS=str(threads),
                   OMP_NUM_THREADS=str(threads))
    return env


def run_variant(name: str, threads: int | None, args, secret: Path, out: Path) -> dict:
    """The extraction seeds, ``args.jobs`` processes at a time, with the variant's environment."""
    out.mkdir(parents=True)
    seconds, results, pending, running = {}, {}, list(args.seeds), {}
    t0 = time.perf_counter()
    while pending or running:
        while pending and len(running) < args.jobs:
            seed = pending.pop(0)
            cmd = [*STEALNB, "extract", "--profile", "demo", "--secret", str(secret), "--strategy", args.strategy,
                   "--seed", str(seed), "--out", str(out / f"seed{seed}"), "--quiet"]
            log = open(out / f"seed{seed}.log", "w")
            running[seed] = (subprocess.Popen(cmd, env=_env(threads), stdout=log, stderr=subprocess.STDOUT),
                             time.perf_counter(), log)
        time.sleep(0.2)
        for seed, (proc, start, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                seconds[seed] = round(time.perf_counter() - start, 1)
                del running[seed]
                if proc.returncode != 0:
                    raise SystemExit(f"bench_threads: seed {seed} of {name} failed (exit {proc.returncode}); "
                                     f"log: {out / f'seed{seed}.log'}")
                s = json.loads((out / f"seed{seed}" / "summary.json").read_text())
                results[seed] = {b: {"agreement": r["agreement"], "accuracy": r["accuracy"]}
                                 for b, r in s["budgets"].items()}
    return {"variant": name, "threads": threads, "wall_s": round(time.perf_counter() - t0, 1),
            "seed_seconds": seconds, "results": results}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strategy", default="random")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="threads per process in the second variant (default: 1)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--secret", type=Path, default=None, help="a secret's folder (default: train one into --work)")
    ap.add_argument("--work", type=Path, default=None, help="an empty or new folder (default: a temporary one)")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "threads_demo.json")
    ap.add_argument("--machine-note", default="")
    args = ap.parse_args(argv)
    if args.jobs < 1 or args.threads < 1 or args.repeats < 1:
        ap.exit(2, "bench_threads: --jobs, --threads and --repeats must be at least 1\n")
    if args.secret is not None and not (args.secret / "model.keras").is_file():
        ap.exit(2, f"bench_threads: --secret {args.secret} holds no model.keras\n")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_threads_"))
    if work.exists() and any(work.iterdir()):
        ap.exit(2, f"bench_threads: --work {work} is not empty; give a new folder (nothing is deleted)\n")
    secret = args.secret
    if secret is None:
        secret = work / "secret"
        subprocess.run([*STEALNB, "train-secret", "--profile", "demo", "--dataset", "digits", "--arch", "cnn-small",
                        "--out", str(secret), "--quiet"], env=_env(None), check=True)
    variants = [("default", None), (f"{args.threads} thread", args.threads)]
    runs = []
    for r in range(args.repeats):
        for name, threads in (variants if r % 2 == 0 else variants[::-1]):
            print(f"== repeat {r}, {name}", flush=True)
            res = run_variant(name, threads, args, secret, work / f"r{r}-{threads or 'default'}")
            res["repeat"] = r
            runs.append(res)
            print(f"== {name}: {res['wall_s']:.0f} s wall; seeds {res['seed_seconds']}", flush=True)
    same = all(x["results"] == runs[0]["results"] for x in runs)
    result = {"strategy": args.strategy, "seeds": args.seeds, "jobs": args.jobs, "repeats": args.repeats,
              "runs": runs, "same_results": same}
    write_result(args.json, result, machine_note=args.machine_note)
    print(f"\n{'variant':12} {'wall s (each repeat)':>24}")
    for name, _ in variants:
        print(f"{name:12} {', '.join(str(x['wall_s']) for x in runs if x['variant'] == name):>24}")
    print(f"same results: {same}\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

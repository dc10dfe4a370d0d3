"""The Dask engine against the scheduler it replaced, on the same grid, code and machine (issue 17).

``stealnb run`` executes its grid on Dask (:func:`stealnb.report.pipeline.execute`: a local cluster
of ``--jobs`` worker processes, a future per task). Until 4957ebb it used a scheduler of its own: a
loop in the main process that started the ready task heading the longest chain of waiting work
(:func:`~stealnb.report.pipeline.critical_path`), ``--jobs`` at a time, and polled every 0.5 s
(``git show 4957ebb^:stealnb/pipeline.py``). That loop is rebuilt here as :func:`old_execute`, around
today's :func:`~stealnb.report.pipeline.run_task`, and put in ``execute``'s place for the "old" runs.
So both engines go through the same ``pipeline.run`` (plan, keys, ``--only``) and execute the same
notebooks and runs with the same code: only the engine differs. The old loop is kept in this
benchmark only, as the reference point; the package has one engine.

    python benchmarks/bench_engine.py [--profile ci] [--jobs 2] [--repeats 1] [--only TEXT] [--book] [--work DIR]

Every run starts from an empty results root, so nothing is skipped. The engines alternate
(repeat r runs Dask first when r is even, the old loop first when it is odd), so a drift of the
machine's speed falls on both. The book is built only with ``--book`` (then the Dask run is exactly
``stealnb run --profile P --jobs J``, what ``make demo`` runs; the build's seconds are recorded apart). Writes
``benchmarks/results/engine_<profile>.json`` and prints a table; exit 1 when a run had a failed task.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parents[1]

from _provenance import write_result  # noqa: E402
from stealnb.core import layout  # noqa: E402
from stealnb.core.profiles import PROFILES, get_profile  # noqa: E402
from stealnb.report import pipeline  # noqa: E402

ENGINES = ("dask", "old")


def old_execute(tasks, *, root, run_dir, jobs=1, force=False, progress=True, scheduler=None) -> dict:
    """The pre-Dask scheduler (4957ebb^), around today's ``run_task``: of the ready tasks, the one
    with the longest :func:`~stealnb.report.pipeline.critical_path` starts first, ``jobs`` at a time,
    each in a thread of this process that waits for the task's subprocess (the old loop started
    the subprocess itself and polled it every 0.5 s; waiting is that without the polling delay).
    No retries, as before. ``scheduler`` is refused: the old loop had no cluster."""
    if scheduler is not None:
        raise ValueError("the old scheduler runs local processes only")
    report = {"ran": [], "skipped": [], "failed": [], "blocked": [], "seconds": {}, "logs": {}}
    status = {t.id: "done" for t in tasks if not force and pipeline.is_current(run_dir, t)}
    report["skipped"] = list(status)
    chain = pipeline.critical_path(tasks, run_dir)
    pending = sorted((t for t in tasks if t.id not in status), key=lambda t: -chain[t.id])
    stale = {t.id for t in pending if force or not pipeline.results_current(run_dir, t)}
    for t in pending:
        if t.id in stale:
            for o, kind in t.outputs.items():
                layout.check_run_dir(o, kind)
    token = f"old-{os.getpid()}-{time.time_ns()}"
    running = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending or running:
            for t in list(pending):
                if len(running) >= jobs:
                    break
                states = [status.get(d) for d in t.deps]
                if any(s in ("failed", "blocked") for s in states):
                    status[t.id] = "blocked"
                    report["blocked"].append(t.id)
                    pending.remove(t)
                elif all(s == "done" for s in states):
                    running[pool.submit(pipeline.run_task, t, root, run_dir, t.id in stale, token)] = t
                    pending.remove(t)
            if not running:  # every pending task waits on a failed one
                for t in pending:
                    status[t.id] = "blocked"
                    report["blocked"].append(t.id)
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                t = running.pop(fut)
                try:
                    secs = fut.result()["seconds"]
                except pipeline.NotebookFailed as exc:
                    status[t.id] = "failed"
                    report["failed"].append(t.id)
                    report["seconds"][t.id] = exc.seconds
                    report["logs"][t.id] = str(exc.log)
                    if progress:
                        print(f"  FAILED {exc}", flush=True)
                    continue
                status[t.id] = "done"
                report["ran"].append(t.id)
                report["seconds"][t.id] = secs
                if progress:
                    print(f"  ran    {t.id} ({secs:.0f} s)", flush=True)
    return report


def run_once(engine: str, profile: str, jobs: int, only: str | None, results: Path, book: bool = False) -> dict:
    """One ``pipeline.run`` of ``profile`` into the empty ``results`` with ``engine``; its timings."""
    dask_execute = pipeline.execute
    if engine == "old":
        pipeline.execute = old_execute
    try:
        t0 = time.perf_counter()
        rep = pipeline.run(get_profile(profile), results=results, jobs=jobs, book=book, only=only,
                           progress=engine == "dask")
        wall = time.perf_counter() - t0
    finally:
        pipeline.execute = dask_execute
    task_seconds = {k: v for k, v in rep["seconds"].items() if k != "total"}
    return {"engine": engine, "wall_s": round(wall, 1), "engine_s": rep["notebook_seconds"],
            "book_s": rep.get("book_seconds"),
            "task_seconds_sum": round(sum(task_seconds.values()), 1), "ran": len(rep["ran"]),
            "failed": rep["failed"], "blocked": rep["blocked"], "task_seconds": task_seconds}


def _write(out: Path, args, runs: list, complete: bool) -> dict:
    """Write the runs so far to ``out``; ``complete`` is False until every repeat of both engines ran."""
    summary = {e: {"wall_s": [x["wall_s"] for x in runs if x["engine"] == e],
                   "task_seconds_sum": [x["task_seconds_sum"] for x in runs if x["engine"] == e]} for e in ENGINES}
    result = {"profile": args.profile, "jobs": args.jobs, "only": args.only, "book": args.book,
              "repeats": args.repeats, "complete": complete, "runs": runs, "summary": summary}
    write_result(out, result, machine_note=args.machine_note)
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="ci", help="a profile of stealnb.core.profiles (default: ci)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="runs per engine (default: 1)")
    ap.add_argument("--only", default=None, help="run only the tasks whose id contains this text (and their deps)")
    ap.add_argument("--book", action="store_true", help="build the book after each run, as `stealnb run` does")
    ap.add_argument("--work", type=Path, default=None, help="folder for the results roots (default: a temporary one)")
    ap.add_argument("--json", type=Path, default=None,
                    help="output (default: benchmarks/results/engine_<profile>.json)")
    ap.add_argument("--machine-note", default="", help="how loaded the machine was, e.g. 'idle'")
    args = ap.parse_args(argv)
    if args.profile not in PROFILES:
        ap.exit(2, f"bench_engine: unknown profile {args.profile!r}; profiles: {', '.join(PROFILES)}\n")
    if args.book and args.only:
        ap.exit(2, "bench_engine: --book needs the full grid; drop --only\n")
    if args.jobs < 1 or args.repeats < 1:
        ap.exit(2, f"bench_engine: --jobs and --repeats must be at least 1 (got {args.jobs}, {args.repeats})\n")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_engine_"))
    if work.exists() and any(work.iterdir()):
        ap.exit(2, f"bench_engine: --work {work} is not empty; give a new folder (nothing is deleted)\n")
    out = args.json or ROOT / "benchmarks" / "results" / f"engine_{args.profile}.json"
    runs = []
    for r in range(args.repeats):
        for engine in (ENGINES if r % 2 == 0 else ENGINES[::-1]):
            print(f"== repeat {r}, engine {engine}", flush=True)
            res = run_once(engine, args.profile, args.jobs, args.only, work / f"{engine}-{r}", args.book)
            res["repeat"] = r
            runs.append(res)
            print(f"== {engine}: {res['wall_s']:.0f} s wall, {res['task_seconds_sum']:.0f} s of tasks, "
                  f"{res['ran']} ran, {len(res['failed'])} failed"
                  + (f", book {res['book_s']:.0f} s" if res["book_s"] is not None else ""), flush=True)
            # Written after every run, so a benchmark stopped halfway keeps the runs it finished.
            summary = _write(out, args, runs, complete=len(runs) == 2 * args.repeats)
    print(f"\n{'engine':8} {'wall s (each run)':>24} {'task s (sum)':>24}")
    for e in ENGINES:
        print(f"{e:8} {', '.join(f'{v:.0f}' for v in summary[e]['wall_s']):>24} "
              f"{', '.join(f'{v:.0f}' for v in summary[e]['task_seconds_sum']):>24}")
    print(f"wrote {out}")
    return 1 if any(x["failed"] or x["blocked"] for x in runs) else 0


if __name__ == "__main__":
    sys.exit(main())

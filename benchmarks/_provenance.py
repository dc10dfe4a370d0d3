"""What a benchmark measured, where and when: stored in its JSON so a number can be traced to a
commit and a machine. :func:`write_result` writes a result with all of it; bench_engine,
bench_threads, bench_fit_overhead and bench_paper_smoke use it. The older benchmarks (bench_quality,
bench_pools, bench_recipe, bench_server, ...) still write their own JSON, without the commit, and
faults.py keeps its results per label in one file; moving them over is open work."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

# The keys write_result adds, which the book's Benchmarks page reads; a result may not use them.
from stealnb.report.benchpage import PROVENANCE  # noqa: E402


def code_version() -> dict:
    """The checkout ``stealnb`` is imported from: its path, short commit, and whether tracked files
    differ from that commit (``dirty``)."""
    import stealnb

    root = Path(stealnb.__file__).resolve().parent.parent
    git = lambda *a: subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    return {"path": str(root), "commit": git("rev-parse", "--short", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def machine(note: str = "") -> dict:
    """The machine: platform, cores, Python, and ``note``: how loaded it was while measured
    (e.g. ``"idle"``; timings on a shared machine are not comparable)."""
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "note": note}


def write_result(path: Path, result: dict, *, machine_note: str = "", code: dict | None = None) -> Path:
    """Write ``result`` as JSON to ``path`` (its folder made if missing) with its provenance first:
    ``code`` (default :func:`code_version` now; a long run passes the one it took at its start,
    since the checkout may move meanwhile), then the result's own keys, then ``machine``
    (:func:`machine` with ``machine_note``) and ``date`` (UTC). A result key named like one of
    them (``stealnb.report.benchpage.PROVENANCE``) is refused (``ValueError``) rather than overwritten. Returns
    ``path``."""
    if clash := [k for k in PROVENANCE if k in result]:
        raise ValueError(f"result keys {clash}: reserved for the provenance write_result adds")
    out = {"code": code or code_version(), **result, "machine": machine(machine_note),
           "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    return path

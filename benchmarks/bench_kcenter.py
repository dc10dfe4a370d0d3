"""Benchmark greedy K-center (stealnb.extraction.selectors.kcenter_greedy) on softmax-like vectors.

Pools of 10k, 100k and 1M Dirichlet-distributed vectors (d=10, float32, like a 10-class
softmax), 1,000 labelled centres, k=1,000 picks. Reports wall seconds (``perf_counter``) and
CPU seconds (``process_time``; the machine may be shared, so wall time can be inflated by
other load), split into the initial min-distance pass (N x L, chunked) and the k greedy picks.
For pools up to ``--naive-max`` a naive reference (per-pick ``((X - c)**2).sum(1)``) is timed
too and its picks are compared with the fast path ("same picks" = fraction of equal positions;
in float32 the fast path's expanded squared distances can swap picks whose distances differ
by ~1e-6 relative, after which the sequences diverge; ``--dtype float64`` removes that).

    python benchmarks/bench_kcenter.py [--sizes 10000 100000 1000000] [--json out.json]

Target (task brief): 1M x 10 with k=1,000 under 60 s on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

from stealnb.extraction.selectors import kcenter_greedy


def naive_kcenter(x: np.ndarray, centres: np.ndarray, k: int) -> np.ndarray:
    """Straightforward greedy K-center: direct differences, one centre at a time."""
    mind = np.full(len(x), np.inf, x.dtype)
    for c in centres:
        np.minimum(mind, ((x - x[c]) ** 2).sum(1), out=mind)
    mind[centres] = -np.inf
    out = []
    for _ in range(k):
        j = int(np.argmax(mind))
        out.append(j)
        mind[j] = -np.inf
        np.minimum(mind, ((x - x[j]) ** 2).sum(1), out=mind)
    return np.array(out)


def timed(fn, *args, **kw):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kw)
    return out, time.perf_counter() - w0, time.process_time() - c0


def run(sizes, k, n_centres, d, seed, naive_max, chunk, dtype="float32"):
    rows = []
    for n in sizes:
        rng = np.random.default_rng(seed)
        x = rng.dirichlet(np.full(d, 0.3), size=n).astype(dtype)
        centres = np.sort(rng.choice(n, n_centres, replace=False)).astype(np.int64)
        kcenter_greedy(x[:2000], centres[centres < 2000], 1, chunk=chunk)  # warm up BLAS
        _, init_wall, init_cpu = timed(kcenter_greedy, x, centres, 1, chunk=chunk)  # initial pass + 1 pick
        picks, wall, cpu = timed(kcenter_greedy, x, centres, k, chunk=chunk)
        row = {
            "n": n, "d": d, "dtype": dtype, "k": k, "centres": n_centres, "chunk": chunk,
            "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "init_wall_s": round(init_wall, 3), "picks_wall_s": round(wall - init_wall, 3),
            "ms_per_pick": round(1000 * (wall - init_wall) / max(k - 1, 1), 3),
        }
        if n <= naive_max:
            ref, nwall, ncpu = timed(naive_kcenter, x, centres, k)
            row.update(naive_wall_s=round(nwall, 3), naive_cpu_s=round(ncpu, 3),
                       speedup=round(nwall / wall, 1), same_picks=float(np.mean(ref == picks)))
        rows.append(row)
        print(f"n={n:>9,}: {wall:7.2f} s wall, {cpu:7.2f} s cpu", flush=True)
    return rows


def markdown(rows):
    head = "| N | wall s | CPU s | init s | picks s | ms/pick | naive wall s | speed-up | same picks |"
    lines = [head, "|" + "---:|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['init_wall_s']:.2f} | "
            f"{r['picks_wall_s']:.2f} | {r['ms_per_pick']:.2f} | {r.get('naive_wall_s', '–')} | "
            f"{r.get('speedup', '–')} | {r.get('same_picks', '–')} |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--centres", type=int, default=1000)
    ap.add_argument("--d", type=int, default=10)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--naive-max", type=int, default=100_000, help="time the naive reference up to this N")
    ap.add_argument("--json", help="also write the results to this file")
    a = ap.parse_args(argv)
    rows = run(a.sizes, a.k, a.centres, a.d, a.seed, a.naive_max, a.chunk, a.dtype)
    result = {
        "benchmark": "kcenter_greedy",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
                    "loadavg_1min": round(os.getloadavg()[0], 2)},
        "rows": rows,
    }
    print(json.dumps(result, indent=2))
    print()
    print(markdown(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()

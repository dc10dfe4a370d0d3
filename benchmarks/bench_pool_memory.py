"""Peak memory (and time) of scoring a 1.28M-image ImageNet-32 sized thief pool.

The pool is a synthetic stand-in with the real pool's exact storage: ``imagenet32/pool_uint8.npy``
(uint8, 1,281,167 x 32 x 32 x 3 = 3.9 GB), the file `stealnb.core.data` converts the official
``train_data_batch_*`` files into and memory-maps. Pixels are smooth random fields, not ImageNet,
which does not matter for memory or speed.

A fresh child process (so its peak RSS is the scoring's alone) loads the pool with
``stealnb.core.data.load_pool("imagenet32")`` and runs, on the **whole** pool with an untrained
substitute:

* ``uncertainty``: substitute logits of all 1.28M images in batches, entropy, top-k=1,000;
* ``kcenter``: the same logits -> softmax -> greedy K-center, 500 labelled centres, k=1,000.

Reported: wall seconds per strategy, images/s, peak RSS of the child (``VmHWM`` from
/proc/self/status; ``ru_maxrss`` would inherit the parent's peak from writing the pool), a
sampled RSS trace (psutil, every 0.1 s) and the final anonymous vs file-backed RSS. File-backed pages of the memory-mapped pool count in RSS while they
are mapped, so the peak includes whatever part of the 3.9 GB file the kernel keeps resident.
Target (issue 3): under 6 GiB peak RSS.

    python benchmarks/bench_pool_memory.py [--n 1281167] [--arch cnn-tiny] [--dir /tmp/stealnb-bench-pool]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "results" / "pool_memory.json"


def make_pool(root: Path, n: int, seed: int = 0, chunk: int = 50_000) -> Path:
    """Write ``root/imagenet32/pool_uint8.npy`` (n x 32 x 32 x 3 uint8) in chunks; returns the path."""
    d = root / "imagenet32"
    d.mkdir(parents=True, exist_ok=True)
    path = d / "pool_uint8.npy"
    if path.is_file():
        arr = np.load(path, mmap_mode="r")
        if arr.shape == (n, 32, 32, 3) and arr.dtype == np.uint8:
            return path
        del arr
    rng = np.random.default_rng(seed)
    mm = np.lib.format.open_memmap(path.with_suffix(".tmp.npy"), mode="w+", dtype=np.uint8, shape=(n, 32, 32, 3))
    base = rng.integers(0, 256, size=(64, 8, 8, 3)).astype(np.float32)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        # Smooth fields: random 8x8 colour grids upsampled 4x, plus noise.
        g = base[rng.integers(0, 64, e - s)] * rng.uniform(0.5, 1.0, (e - s, 1, 1, 1)).astype(np.float32)
        img = np.repeat(np.repeat(g, 4, axis=1), 4, axis=2) + rng.normal(0, 12, (e - s, 32, 32, 3)).astype(np.float32)
        mm[s:e] = np.clip(img, 0, 255).astype(np.uint8)
    mm.flush()
    del mm
    path.with_suffix(".tmp.npy").replace(path)
    return path


def _proc_status() -> dict:
    """Memory lines of /proc/self/status in bytes. VmHWM is this process's peak RSS; unlike
    ``ru_maxrss`` it is not inherited from the parent across fork + exec (the parent's peak
    while writing the pool file would otherwise show up as the child's)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key.startswith(("Vm", "Rss")) and val.strip().endswith("kB"):
            out[key] = int(val.split()[0]) * 1024
    return out


def score(root: Path, arch: str, k: int, seed: int) -> dict:
    """Child process: load the memmapped pool and score it; returns timings and memory."""
    import psutil

    proc = psutil.Process()
    trace, stop = [], threading.Event()

    def sample():
        t0 = time.perf_counter()
        while not stop.is_set():
            trace.append((round(time.perf_counter() - t0, 2), proc.memory_info().rss))
            stop.wait(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    from stealnb.core import data, models
    from stealnb.extraction import selectors

    pool = data.load_pool("imagenet32", root=root)
    model = models.build(arch, num_classes=10)
    rng = np.random.default_rng(seed)
    labelled = np.sort(rng.choice(len(pool), 500, replace=False)).astype(np.int64)
    rows = {}
    for name in ("uncertainty", "kcenter"):
        strat = selectors.REGISTRY[name]()
        t0 = time.perf_counter()
        picked = strat.select(model, pool, labelled, k, np.random.default_rng(seed))
        secs = time.perf_counter() - t0
        picked = np.asarray(picked)
        if len(picked) != k or len(np.unique(picked)) != k or np.isin(picked, labelled).any():
            raise RuntimeError(f"{name}: expected {k} distinct unlabelled indices")
        rows[name] = {"seconds": round(secs, 1), "images_per_s": round(len(pool) / secs),
                      "rss_after_gib": round(proc.memory_info().rss / 2**30, 3)}
    stop.set()
    th.join()
    status = _proc_status()
    return {"pool": repr(pool), "n": len(pool), "arch": arch, "k": k, "labelled": len(labelled),
            "strategies": rows, "peak_rss_gib": round(status["VmHWM"] / 2**30, 3),
            "peak_rss_sampled_gib": round(max(r for _, r in trace) / 2**30, 3),
            "final_rss_anon_gib": round(status.get("RssAnon", 0) / 2**30, 3),
            "final_rss_file_gib": round(status.get("RssFile", 0) / 2**30, 3),
            "rss_trace_gib": [(t, round(r / 2**30, 3)) for t, r in trace[:: max(1, len(trace) // 60)]]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_281_167)
    ap.add_argument("--arch", default="cnn-tiny")
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/stealnb-bench-pool"))
    ap.add_argument("--json", type=Path, default=OUT)
    ap.add_argument("--keep", action="store_true", help="keep the 3.9 GB pool file for the next run")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(score(args.dir, args.arch, args.k, args.seed)))
        return 0
    t0 = time.perf_counter()
    path = make_pool(args.dir, args.n, args.seed)
    make_s = time.perf_counter() - t0
    res = subprocess.run([sys.executable, __file__, "--child", "--dir", str(args.dir), "--arch", args.arch,
                          "--k", str(args.k), "--seed", str(args.seed)], capture_output=True, text=True)
    if res.returncode != 0:
        print(res.stderr[-3000:], file=sys.stderr)
        return res.returncode
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out.update({"pool_file_gb": round(path.stat().st_size / 1e9, 2), "make_pool_seconds": round(make_s, 1),
                "target_peak_rss_gib": 6.0, "meets_target": out["peak_rss_gib"] < 6.0,
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                            "load_avg_1min": os.getloadavg()[0]}})
    if not args.keep:
        path.unlink()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(json.dumps({k: v for k, v in out.items() if k != "rss_trace_gib"}, indent=2))
    print()
    print("| strategy | pool | seconds | images/s | RSS after (GiB) |")
    print("|---|---|---|---|---|")
    for name, r in out["strategies"].items():
        print(f"| {name} | {out['n']:,} uint8 memmap | {r['seconds']} | {r['images_per_s']:,} | {r['rss_after_gib']} |")
    print(f"\npeak RSS of the scoring process: {out['peak_rss_gib']} GiB (target < 6 GiB: "
          f"{'met' if out['meets_target'] else 'NOT met'}); pool file {out['pool_file_gb']} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

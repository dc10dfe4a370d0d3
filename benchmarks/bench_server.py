"""Load test of ``stealnb serve`` on localhost: sustained queries/s, latency percentiles and the
server's memory over the run (stealnb.serve.server; issue 6).

The server runs as a subprocess (``python -m stealnb.cli serve``, one uvicorn worker, per-request
fsync of the query log -- the default) with the demo secret's architecture (``cnn-small``,
seeded weights: inference cost does not depend on training) and one API key without budget or
rate limit. Closed-loop client threads send ``POST /v1/models/secret:predict`` requests in the
``b64`` encoding HttpOracle uses, for a fixed time per phase:

* ``fresh``  -- every image is new (attack traffic: each sample is charged once, logged with its
  fingerprint and remembered for the per-key dedupe, so the server's state grows by design);
* ``repeat`` -- a fixed set of requests cycled (everything already charged: isolates per-request
  allocations, so RSS must stay flat);
* ``list`` encoding (nested JSON lists, TF Serving's default) for comparison with ``b64``.

A warm-up (4 s at batch 1 and at batch 256) precedes the measured phases: the first large
batches grow the allocator's arenas and TensorFlow's buffers once, a step, not a trend.

Latency is the HTTP round trip (body already encoded). The server's RSS (psutil) is sampled
every 0.25 s; per phase we report start/end/max and the least-squares slope over the phase.
Client and server share the machine's cores, so these are lower bounds for a dedicated server.

    python benchmarks/bench_server.py [--duration 12] [--arch cnn-small] [--json PATH]

Writes ``benchmarks/results/server.json`` (and ``--json``), prints the JSON and a markdown table.
Bounded: about 6 x duration + ~25 s (start-up, warm-up); nothing leaves 127.0.0.1.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

KEY = "bench-key-0000"
HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _body(x: np.ndarray, encoding: str = "b64") -> bytes:
    if encoding == "list":
        return json.dumps({"instances": x.tolist()}).encode()
    rows = np.ascontiguousarray(x, "<f4").reshape(len(x), -1)
    return json.dumps({"instances": [{"b64": base64.b64encode(r.tobytes()).decode()} for r in rows]}).encode()


def _start(model_path: Path, port: int, log_dir: Path, no_fsync: bool = False, keys: dict | None = None):
    """``stealnb serve`` as a subprocess with ``keys`` (default: KEY alone), running the ``stealnb``
    this process imports (whatever the working directory); ``(process, url)`` once it answers."""
    import httpx

    import stealnb

    keys = keys or {KEY: {"name": "bench"}}
    keys_file = log_dir.parent / "keys.json"
    keys_file.parent.mkdir(parents=True, exist_ok=True)
    keys_file.write_text(json.dumps(keys))
    cmd = [sys.executable, "-m", "stealnb.cli", "serve", "--model", str(Path(model_path).resolve()), "--port", str(port),
           "--log-dir", str(log_dir.resolve()), "--keys", str(keys_file.resolve())] + (["--no-fsync"] if no_fsync else [])
    root = str(Path(stealnb.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(cmd, cwd=keys_file.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    first = next(iter(keys))
    for _ in range(600):
        try:
            if httpx.get(f"{url}/v1/models/secret", headers={"Authorization": f"Bearer {first}"}, timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("stealnb serve exited at start-up")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("stealnb serve did not come up within 60 s")


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.25):
        import psutil

        super().__init__(daemon=True)
        self.proc, self.every, self.samples, self.stop_evt = psutil.Process(pid), every, [], threading.Event()

    def run(self):
        while not self.stop_evt.is_set():
            try:
                self.samples.append((time.perf_counter(), self.proc.memory_info().rss / 2**20))
            except Exception:  # the process went away
                return
            time.sleep(self.every)

    def window(self, t0: float, t1: float) -> list[tuple[float, float]]:
        return [(t, r) for t, r in self.samples if t0 <= t <= t1]


def _phase(url: str, batch: int, mode: str, duration: float, concurrency: int, seed: int, encoding: str = "b64") -> dict:
    import httpx

    lat, errors, lock = [], {}, threading.Lock()
    stop = time.perf_counter() + duration
    fixed = [_body(np.random.default_rng([seed, j]).random((batch, 32, 32, 3), dtype=np.float32)) for j in range(8)] \
        if mode == "repeat" else None

    def worker(w: int):
        rng = np.random.default_rng([seed, 1000 + w])
        with httpx.Client(headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
                          timeout=60) as c:
            i = 0
            while time.perf_counter() < stop:
                body = fixed[(i + w) % len(fixed)] if fixed else _body(rng.random((batch, 32, 32, 3), dtype=np.float32),
                                                                       encoding)
                i += 1
                t = time.perf_counter()
                try:
                    r = c.post(f"{url}/v1/models/secret:predict", content=body)
                    code = r.status_code
                except httpx.TransportError as e:
                    code = type(e).__name__
                dt = time.perf_counter() - t
                with lock:
                    if code == 200:
                        lat.append(dt)
                    else:
                        errors[str(code)] = errors.get(str(code), 0) + 1

    if fixed:  # charge the fixed requests once before timing
        with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
            for b in fixed:
                c.post(f"{url}/v1/models/secret:predict", content=b)
        stop = time.perf_counter() + duration
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.asarray(lat) * 1e3
    return {
        "batch": batch, "mode": mode, "encoding": encoding, "concurrency": concurrency, "seconds": round(wall, 2), "requests": len(lat),
        "requests_per_s": round(len(lat) / wall, 2), "samples_per_s": round(len(lat) * batch / wall, 1),
        "latency_ms": {k: round(float(np.percentile(ms, q)), 2) for k, q in (("p50", 50), ("p90", 90), ("p99", 99))}
        | {"max": round(float(ms.max()), 2)} if len(ms) else None,
        "errors": errors, "t0": t0, "t1": t0 + wall,
    }


def _rss_stats(samples) -> dict:
    if len(samples) < 2:
        return {}
    t = np.array([s[0] for s in samples])
    r = np.array([s[1] for s in samples])
    slope = float(np.polyfit(t - t[0], r, 1)[0]) * 60.0
    return {"start_mb": round(float(r[0]), 1), "end_mb": round(float(r[-1]), 1), "max_mb": round(float(r.max()), 1),
            "slope_mb_per_min": round(slope, 2), "samples": len(r)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=12.0, help="seconds per phase")
    ap.add_argument("--arch", default="cnn-small")
    ap.add_argument("--model", type=Path, default=None, help="serve this secret folder / .keras file instead")
    ap.add_argument("--concurrency", type=int, default=2, help="client threads")
    ap.add_argument("--no-fsync", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not 1 <= args.duration <= 120:
        ap.exit(2, f"bench_server: --duration: expected 1..120 seconds per phase (the load test is bounded), got {args.duration}\n")

    from stealnb.core import models

    tmp = Path(tempfile.mkdtemp(prefix="bench-server-"))
    model_path = args.model
    if model_path is None:
        model_path = tmp / "model.keras"
        models.build(args.arch, seed=0).save(model_path)
    port = _free_port()
    t_start = time.perf_counter()
    proc, url = _start(model_path, port, tmp / "logs", args.no_fsync)
    startup = time.perf_counter() - t_start
    sampler = RssSampler(proc.pid)
    sampler.start()
    phases = []
    try:
        # warm-up, not reported: the first large batches grow the allocator's arenas and TF's
        # working buffers once (~150 MB for cnn-small at batch 256); steady state comes after
        for batch in (1, 256):
            _phase(url, batch, "fresh", 4.0, args.concurrency, seed=90 + batch)
        warm_rss = _rss_stats(sampler.samples)
        measured_from = time.perf_counter()
        for batch, mode, enc in ((1, "fresh", "b64"), (256, "fresh", "b64"), (1, "fresh", "list"),
                                 (256, "fresh", "list"), (1, "repeat", "b64"), (256, "repeat", "b64")):
            res = _phase(url, batch, mode, args.duration, args.concurrency, seed=batch, encoding=enc)
            res["server_rss"] = _rss_stats(sampler.window(res.pop("t0"), res.pop("t1")))
            phases.append(res)
            print(f"[batch {batch} {mode} {enc}] {res['requests_per_s']} req/s, {res['samples_per_s']} samples/s, "
                  f"p99 {res['latency_ms'] and res['latency_ms']['p99']} ms, rss {res['server_rss']}", flush=True)
    finally:
        sampler.stop_evt.set()
        proc.terminate()
        proc.wait(timeout=20)
    log_bytes = sum(p.stat().st_size for p in (tmp / "logs").rglob("*.jsonl"))
    fresh_samples = sum(p["requests"] * p["batch"] for p in phases if p["mode"] == "fresh")
    overall = _rss_stats([s for s in sampler.samples if s[0] >= measured_from])
    report = {
        "setup": {"model": str(args.model) if args.model else f"{args.arch} (seeded, untrained)",
                  "encoding": "b64", "client_threads": args.concurrency, "phase_seconds": args.duration,
                  "fsync_per_request": not args.no_fsync, "server_startup_s": round(startup, 1),
                  "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                              "platform": platform.platform()}},
        "phases": phases,
        "server_rss_warmup": warm_rss,
        "server_rss_measured_phases": overall,
        "fresh_samples_charged": fresh_samples,
        "query_log_bytes": log_bytes,
    }
    out = HERE / "results" / "server.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print()
    print("| batch | traffic | encoding | req/s | samples/s | p50 ms | p99 ms | server RSS start → end (max) MB | RSS slope MB/min |")
    print("|---:|---|---|---:|---:|---:|---:|---|---:|")
    for p in phases:
        lm, rs = p["latency_ms"] or {}, p["server_rss"]
        print(f"| {p['batch']} | {p['mode']} | {p['encoding']} | {p['requests_per_s']} | {p['samples_per_s']} | {lm.get('p50')} | "
              f"{lm.get('p99')} | {rs.get('start_mb')} → {rs.get('end_mb')} ({rs.get('max_mb')}) | "
              f"{rs.get('slope_mb_per_min')} |")
    print(f"\n{fresh_samples} fresh samples charged, query log {log_bytes / 2**20:.1f} MB; server RSS during warm-up "
          f"{warm_rss}; over all measured phases {overall}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

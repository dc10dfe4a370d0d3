"""Faults of ``stealnb serve`` on localhost (issue 15): what the other keys get while one key
stalls its request bodies, and what a full disk charges.

* ``stall`` -- one key (the staller) holds ``--stall-connections`` connections (default 80, more
  than the server's 64 pending slots), each with the headers and the first 10 bytes of a
  predict body, trickling one more byte per second; a connection the server answers or closes
  is re-opened 1 s later. Two other keys send closed-loop batch-1 requests (``b64``, fresh
  images, 10 s client timeout, a 0.2 s pause after anything but 200). Reported: the other keys'
  success rate, answered requests/s and latency, first without the staller (``baseline``), then
  with it (``stall``, after 2 s in which the staller fills its slots), and what the staller got.
* ``disk_full`` -- a key's query log is a symlink to ``/dev/full`` (every write fails with
  ENOSPC): 5 requests of 4 fresh images; then the link is removed (space freed) and one more
  request is sent; then the server is restarted. Reported: the statuses and the server's
  message, the spending the server reports after each step, and the samples it answered.

The server runs as a subprocess (default settings, per-request fsync) importing ``stealnb`` as
the environment does, so the same script measures any checkout::

    PYTHONPATH=/path/to/checkout python benchmarks/faults.py --label before|after

Results merge by label into ``benchmarks/results/faults.json``; the tables printed cover every
label there. Bounded: baseline + stall + 2 s + three server start-ups (~60 s at the defaults);
nothing leaves 127.0.0.1.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import selectors
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from _provenance import code_version

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

from bench_server import HERE, _body, _free_port, _start

STALLER, OTHERS, FULL = "stall-key-0000", ("other-key-0001", "other-key-0002"), "full-key-00000"
PRED = "/v1/models/secret:predict"


class Staller(threading.Thread):
    """One key holding ``n`` connections with partial predict bodies, trickling 1 byte/s each."""

    def __init__(self, port: int, n: int, body: bytes):
        super().__init__(daemon=True)
        self.port, self.n, self.body = port, n, body
        self.head = (f"POST {PRED} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {STALLER}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        self.answers, self.stop_evt = Counter(), threading.Event()

    def run(self):
        sel, reopen = selectors.DefaultSelector(), [0.0] * self.n
        tick = time.monotonic() + 1.0
        while not self.stop_evt.is_set():
            now = time.monotonic()
            while reopen and reopen[0] <= now:
                reopen.pop(0)
                try:
                    s = socket.create_connection(("127.0.0.1", self.port), timeout=2)
                    s.sendall(self.head + self.body[:10])
                    s.setblocking(False)
                    sel.register(s, selectors.EVENT_READ)
                except OSError:
                    self.answers["connect_error"] += 1
                    reopen.append(now + 1.0)
            for key, _ in sel.select(timeout=0.1):
                s = key.fileobj
                try:
                    data = s.recv(4096)
                except OSError:
                    data = b""
                self.answers[data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else "closed"] += 1
                sel.unregister(s)
                s.close()
                reopen.append(time.monotonic() + 1.0)
            if time.monotonic() >= tick:
                tick += 1.0
                for key in list(sel.get_map().values()):
                    try:
                        key.fileobj.send(b" ")
                    except OSError:
                        pass  # answered: picked up by select
        for key in list(sel.get_map().values()):
            key.fileobj.close()


def _others(url: str, duration: float) -> dict:
    """Closed-loop batch-1 clients, one per key of OTHERS, for ``duration`` seconds."""
    import httpx

    lat, answers, lock = [], Counter(), threading.Lock()
    stop = time.perf_counter() + duration

    def worker(w: int, key: str):
        rng = np.random.default_rng([7, w, int(time.time())])
        with httpx.Client(headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
                          timeout=10) as c:
            while time.perf_counter() < stop:
                body = _body(rng.random((1, 32, 32, 3), dtype=np.float32))
                t = time.perf_counter()
                try:
                    code = str(c.post(url + PRED, content=body).status_code)
                except httpx.TransportError as e:
                    code = type(e).__name__
                dt = time.perf_counter() - t
                with lock:
                    answers[code] += 1
                    if code == "200":
                        lat.append(dt)
                if code != "200":
                    time.sleep(0.2)

    threads = [threading.Thread(target=worker, args=(w, k)) for w, k in enumerate(OTHERS)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms, n = np.asarray(lat) * 1e3, sum(answers.values())
    return {"seconds": round(wall, 1), "requests": n, "answered": len(lat),
            "success_rate": round(len(lat) / n, 4) if n else None, "answered_per_s": round(len(lat) / wall, 2),
            "latency_ms": {k: round(float(np.percentile(ms, q)), 1) for k, q in (("p50", 50), ("p90", 90), ("p99", 99))}
            | {"max": round(float(ms.max()), 1)} if len(ms) else None,
            "answers": dict(answers)}


def stall(model_path: Path, tmp: Path, baseline: float, duration: float, connections: int) -> dict:
    port = _free_port()
    proc, url = _start(model_path, port, tmp / "stall" / "logs", keys={k: {} for k in (*OTHERS, STALLER)})
    try:
        out = {"baseline": _others(url, baseline)}
        staller = Staller(port, connections, _body(np.full((1, 32, 32, 3), 0.5, np.float32)))
        staller.start()
        time.sleep(2.0)
        out["stall"] = _others(url, duration)
        staller.stop_evt.set()
        staller.join(timeout=10)
        out["stall"]["staller_connections"] = connections
        out["stall"]["staller_answers"] = dict(staller.answers)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    return out


def disk_full(model_path: Path, tmp: Path) -> dict:
    import httpx

    from stealnb.serve.server import key_id

    log_dir = tmp / "full" / "logs"
    log = log_dir / "keys" / f"{key_id(FULL)}.jsonl"
    hdr = {"Authorization": f"Bearer {FULL}"}
    rng = np.random.default_rng(5)
    port = _free_port()
    spent = lambda url: httpx.get(f"{url}/v1/models/secret", headers=hdr).json()["stealnb"]["key"]["spent"]  # noqa: E731
    steps, answered = [], 0

    def ask(url, what):
        nonlocal answered
        r = httpx.post(url + PRED, content=_body(rng.random((4, 32, 32, 3), dtype=np.float32)), headers=hdr, timeout=30)
        answered += 4 * (r.status_code == 200)
        steps.append({"step": what, "status": r.status_code, "error": r.json().get("error"), "spent_reported": spent(url)})

    proc, url = _start(model_path, port, log_dir, keys={FULL: {"budget": 100}})
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.symlink_to("/dev/full")
        for i in range(5):
            ask(url, f"disk full {i + 1}")
        log.unlink()
        ask(url, "space freed")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    proc, url = _start(model_path, port, log_dir, keys={FULL: {"budget": 100}})
    try:
        after_restart = spent(url)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    return {"steps": steps, "samples_answered": answered, "spent_after_restart": after_restart}


def _tables(results: dict) -> str:
    rows = ["| code | phase | other keys' requests | success rate | answered/s | p50 ms | p99 ms | other keys got | "
            "staller got |", "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for label, res in results.items():
        for phase in ("baseline", "stall"):
            p = res["stall"][phase]
            lm = p["latency_ms"] or {}
            rows.append(f"| {label} ({res['code']['commit']}) | {phase} | {p['requests']} | {p['success_rate']} | "
                        f"{p['answered_per_s']} | {lm.get('p50')} | {lm.get('p99')} | {p['answers']} | "
                        f"{p.get('staller_answers', '')} |")
    rows += ["", "| code | statuses while full | first message | spent reported while full | then freed: status, "
             "spent | samples answered | spent after restart |", "|---|---|---|---:|---|---:|---:|"]
    for label, res in results.items():
        d = res["disk_full"]
        full, freed = d["steps"][:-1], d["steps"][-1]
        rows.append(f"| {label} | {[s['status'] for s in full]} | {full[0]['error']} | {full[-1]['spent_reported']} | "
                    f"{freed['status']}, {freed['spent_reported']} | {d['samples_answered']} | "
                    f"{d['spent_after_restart']} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", required=True, help="name of the code version measured, e.g. before / after")
    ap.add_argument("--baseline", type=float, default=8.0, help="seconds of the other keys alone")
    ap.add_argument("--stall", type=float, default=20.0, help="seconds of the other keys while the staller stalls")
    ap.add_argument("--stall-connections", type=int, default=80)
    args = ap.parse_args(argv)
    if not (1 <= args.baseline <= 60 and 1 <= args.stall <= 60 and 1 <= args.stall_connections <= 200):
        ap.exit(2, "faults: bounded: --baseline and --stall 1..60 s, --stall-connections 1..200\n")
    if not os.path.exists("/dev/full"):
        ap.exit(2, "faults: needs /dev/full for the disk-full case\n")

    from stealnb.core import models

    tmp = Path(tempfile.mkdtemp(prefix="bench-faults-"))
    model_path = tmp / "model.keras"
    models.build("cnn-small", seed=0).save(model_path)
    res = {"code": code_version(), "stall": stall(model_path, tmp, args.baseline, args.stall, args.stall_connections),
           "disk_full": disk_full(model_path, tmp),
           "setup": {"model": "cnn-small (seeded, untrained)", "other_keys": len(OTHERS), "batch": 1, "encoding": "b64",
                     "server": "stealnb serve defaults (fsync per request)",
                     "machine": {"python": platform.python_version(), "cpus": os.cpu_count()}}}
    out = HERE / "results" / "faults.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    results[args.label] = res
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(res, indent=2))
    print()
    print(_tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

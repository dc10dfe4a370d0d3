"""Memory of training models one after another in one process (the pool study's and the defences' pattern).

The pool-study notebook of ``paper-smoke`` trains one VGG16 substitute per pool x strategy in one
kernel; its memory grew from 1.7 to 9.6 GB during one notebook (2026-12-04 smoke run). This
measures that pattern in a fresh child process per variant: ``--models`` times, build a model,
compile and fit it for one epoch on 60 random images, drop it (``del``, ``keras.backend.clear_session()``,
``gc.collect()``; ``trim`` also calls glibc's ``malloc_trim(0)``), then read the process's RSS.

* ``stealnb-vgg16``: ``stealnb.core.models.build("vgg16")`` and ``stealnb.core.train.fit`` (F1 checkpoint);
* ``plain-keras``: a plain ``keras.Sequential`` (Flatten, Dense 4096, Dense 10; 12.6M weights), ``model.fit``;
* ``plain-keras-trim``: the same with ``malloc_trim(0)`` after each model.

If ``plain-keras`` grows as well, the growth is Keras/TensorFlow's, not stealnb's (upstream:
keras-team/keras#17458, tensorflow/tensorflow#61791, both "clear_session() does not help"). The
remedy in that case is a process per training, as the ``runs/`` tasks of ``stealnb run`` are.

    python benchmarks/bench_fit_memory.py [--models 8] [--json benchmarks/results/fit_memory.json]

No target: the result says how many MB each trained-and-dropped model keeps.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("stealnb-vgg16", "plain-keras", "plain-keras-trim")

CHILD = r"""
import ctypes, gc, json, os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np, psutil, keras
variant, n = sys.argv[1], int(sys.argv[2])
proc = psutil.Process()
rng = np.random.default_rng(0)
x = rng.random((60, 32, 32, 3), dtype=np.float32)
y = rng.integers(0, 10, 60)
rss = []
for i in range(n):
    if variant == "stealnb-vgg16":
        from stealnb.core import models, train
        m = models.build("vgg16", num_classes=10, seed=i)
        train.fit(m, x, y, epochs=1, batch_size=32, validation=(x[:10], y[:10]), monitor="macro_f1", patience=1)
    else:
        m = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(4096, activation="relu"), keras.layers.Dense(10)])
        m.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        m.fit(x, y, epochs=1, batch_size=32, verbose=0)
    del m
    keras.backend.clear_session()
    gc.collect()
    if variant.endswith("-trim"):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    rss.append(proc.memory_info().rss / 2**20)
print(json.dumps(rss))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "fit_memory.json")
    args = ap.parse_args(argv)
    if args.models < 2:
        print("bench_fit_memory: --models must be at least 2 (the growth is a difference)", file=sys.stderr)
        return 2
    out = {"models": args.models, "variants": {},
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}}
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for v in VARIANTS:
        res = subprocess.run([sys.executable, "-c", CHILD, v, str(args.models)], capture_output=True, text=True,
                             env=env, check=True)
        rss = json.loads(res.stdout.strip().splitlines()[-1])
        per_model = (rss[-1] - rss[0]) / (len(rss) - 1)
        out["variants"][v] = {"rss_mb_after_each": [round(r, 1) for r in rss], "mb_kept_per_model": round(per_model, 1)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"{'variant':<18} {'first MB':>9} {'last MB':>9} {'MB kept per model':>18}")
    for v, r in out["variants"].items():
        print(f"{v:<18} {r['rss_mb_after_each'][0]:>9.0f} {r['rss_mb_after_each'][-1]:>9.0f} {r['mb_kept_per_model']:>18.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

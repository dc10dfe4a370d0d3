"""How much of a substitute's training is Keras' per-epoch work rather than optimizer steps.

An extraction seed of the demo spends most of its time training substitutes
(:func:`stealnb.core.train.fit`, the profile's recipe: batch 50, at least 300 steps, so 150 epochs of
2 steps on the 100-image seed set). For each labelled-set size this benchmark times, on random
images and labels (only the time is measured):

* ``fit_s``: :func:`~stealnb.core.train.fit` with the profile's recipe and a validation split of the
  profile's size, as the extraction loop calls it (``steps`` optimizer steps over ``epochs`` epochs);
* ``steps_s``: the same number of optimizer steps as ``model.train_on_batch`` calls on batches of
  the recipe's size (the loss weights included when the recipe weighs classes), no epochs. The
  first call (the trace) is outside the timer, so ``steps - 1`` steps are timed: ``overhead`` is
  biased up by about one step in ``steps`` (0.3 % at 300 steps), far below its spread between
  sizes and repeats;
* ``validation_s``: the checkpoint callback's validation predictions, one per epoch
  (:func:`stealnb.core.models.predict_logits` on the validation split).

``overhead`` is ``1 - (steps_s + validation_s) / fit_s``: the share of ``fit`` that is neither
a step nor a validation pass (per-epoch dataset iterators, callbacks, Keras' loop; also the
checkpoint callback's metrics and copies of the best weights, not timed apart). It is what a
training loop of our own could save at most; such a loop would shuffle differently, so its
results would differ and it would need ``bench_quality.py`` before it could replace ``fit``.

    python benchmarks/bench_fit_overhead.py [--profile demo] [--sizes 100 350 600 850] [--repeats 2]
        [--classes 10] [--machine-note TEXT]

``--classes``: the secret's number of classes (the substitute's output layer). It is 10 for every
dataset of the theses' grids; it is an argument because the dataset's files need not be here.

Writes ``benchmarks/results/fit_overhead_<profile>.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402
from _provenance import write_result  # noqa: E402
from stealnb.core import models, train  # noqa: E402
from stealnb.core.profiles import PROFILES, get_profile  # noqa: E402


def overhead(fit_s: float, steps_s: float, validation_s: float) -> float:
    """The share of ``fit_s`` that is neither optimizer steps nor validation passes."""
    return round(1 - (steps_s + validation_s) / fit_s, 3)


def measure(prof, n: int, seed: int, classes: int) -> dict:
    """``fit``, bare steps and validation passes for ``n`` labelled images of ``prof``'s recipe."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, 32, 32, 3), dtype=np.float32)
    y = rng.integers(0, classes, n)
    xv = rng.random((prof.val_size, 32, 32, 3), dtype=np.float32)
    yv = rng.integers(0, classes, prof.val_size)
    recipe = prof.substitute_fit()

    model = models.build(prof.substitute, num_classes=classes, seed=seed)
    t = time.perf_counter()
    hist = train.fit(model, x, y, validation=(xv, yv), seed=seed, **recipe)
    fit_s = time.perf_counter() - t
    steps, epochs = hist["steps"], len(hist["loss"])

    model = train.compile_model(models.build(prof.substitute, num_classes=classes, seed=seed), recipe["learning_rate"])
    weights = train.balanced_class_weight(y, classes) if recipe["class_weight"] else None
    bs = recipe["batch_size"]
    starts = list(range(0, n, bs))
    model.train_on_batch(x[:bs], y[:bs], class_weight=weights)  # the trace, as fit's first step
    t = time.perf_counter()
    for i in range(steps - 1):  # the other steps; see the module docstring for the bias this leaves
        s = starts[i % len(starts)]
        model.train_on_batch(x[s:s + bs], y[s:s + bs], class_weight=weights)
    steps_s = time.perf_counter() - t

    models.predict_logits(model, xv)  # the trace
    t = time.perf_counter()
    for _ in range(epochs):
        models.predict_logits(model, xv)
    validation_s = time.perf_counter() - t
    return {"n": n, "steps": steps, "epochs": epochs, "fit_s": round(fit_s, 2), "steps_s": round(steps_s, 2),
            "validation_s": round(validation_s, 2), "overhead": overhead(fit_s, steps_s, validation_s)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 350, 600, 850],
                    help="labelled-set sizes (default: the demo's rounds, seed set to the last round)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--classes", type=int, default=10, help="the secret's classes (default: 10, as in every thesis grid)")
    ap.add_argument("--json", type=Path, default=None, help="output (default: benchmarks/results/fit_overhead_<profile>.json)")
    ap.add_argument("--machine-note", default="")
    args = ap.parse_args(argv)
    if args.profile not in PROFILES:
        ap.exit(2, f"bench_fit_overhead: unknown profile {args.profile!r}; profiles: {', '.join(PROFILES)}\n")
    if args.repeats < 1 or any(n < 1 for n in args.sizes):
        ap.exit(2, f"bench_fit_overhead: --repeats and --sizes must be at least 1 (got {args.repeats}, {args.sizes})\n")
    if args.classes < 2:
        ap.exit(2, f"bench_fit_overhead: --classes must be at least 2 (got {args.classes})\n")
    prof = get_profile(args.profile)
    train.enable_determinism(0)  # as every extraction run does
    rows = []
    for r in range(args.repeats):
        for n in args.sizes:
            row = {"repeat": r, **measure(prof, n, seed=r, classes=args.classes)}
            rows.append(row)
            print(f"repeat {r}, n={n}: fit {row['fit_s']:.1f} s ({row['steps']} steps, {row['epochs']} epochs), "
                  f"steps {row['steps_s']:.1f} s, validation {row['validation_s']:.1f} s, overhead {row['overhead']:.0%}",
                  flush=True)
    total = {k: round(sum(x[k] for x in rows), 2) for k in ("fit_s", "steps_s", "validation_s")}
    result = {"profile": prof.name, "substitute": prof.substitute, "classes": args.classes,
              "recipe": prof.substitute_fit(), "val_size": prof.val_size, "sizes": args.sizes,
              "repeats": args.repeats, "runs": rows, **total, "overhead": overhead(**total)}
    out = write_result(args.json or ROOT / "benchmarks" / "results" / f"fit_overhead_{prof.name}.json", result,
                       machine_note=args.machine_note)
    print(f"\nall sizes and repeats: fit {total['fit_s']:.0f} s, steps {total['steps_s']:.0f} s, "
          f"validation {total['validation_s']:.0f} s, overhead {result['overhead']:.0%}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

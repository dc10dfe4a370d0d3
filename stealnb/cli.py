"""The ``stealnb`` command line."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_train_secret(args) -> int:
    from . import data
    from .train import train_secret

    ds = data.load_dataset(args.dataset, root=args.data_root)
    res = train_secret(ds, args.arch, args.profile, seed=args.seed, progress=not args.quiet)
    out = res.save(args.out)
    s = res.summary()
    print(
        f"{args.dataset}/{args.arch} ({args.profile}): best fold {s['best_fold'] + 1}/{s['folds']} "
        f"test accuracy {s['test_accuracy']:.4f} (mean {s['test_accuracy_mean']:.4f} ± "
        f"{s['test_accuracy_std']:.4f}) in {s['seconds']:.0f} s -> {out}/model.keras, {out}/metrics.json"
    )
    return 0


def _cmd_data_list(args) -> int:
    from . import data

    rows = data.list_local(args.data_root)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    print(f"data root: {data.data_root(args.data_root)}")
    for r in rows:
        size = f"{r['size_bytes'] / 1e6:9.1f} MB" if r.get("present") else "   missing   "
        print(f"  {r['name']:<16} {r['kind']:<8} {size}  {r.get('path') or ''}")
    return 0


def _cmd_data_fetch(args) -> int:
    from . import data

    path = data.fetch(args.name, root=args.data_root, progress=not args.quiet)
    print(f"{args.name}: ready at {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stealnb", description=__doc__)
    p.add_argument("--data-root", default=None, help="dataset folder (default: $STEALNB_DATA or ~/.cache/stealnb)")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train-secret", help="train a secret model with the thesis protocol (k-fold CV)")
    t.add_argument("--dataset", required=True)
    t.add_argument("--arch", required=True)
    t.add_argument("--profile", default="demo", choices=["ci", "demo", "paper"])
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True, type=Path)
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=_cmd_train_secret)

    d = sub.add_parser("data", help="list or fetch datasets")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dl = dsub.add_parser("list", help="what is present locally, with sizes")
    dl.add_argument("--json", action="store_true")
    dl.set_defaults(func=_cmd_data_list)
    df = dsub.add_parser("fetch", help="download a dataset from its official source (needs internet)")
    df.add_argument("name")
    df.add_argument("--quiet", action="store_true")
    df.set_defaults(func=_cmd_data_fetch)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
        # Boundary errors (missing data, bad arguments) are for the user, not a traceback.
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"stealnb: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

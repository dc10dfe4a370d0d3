"""The ``stealnb`` command line.

Building the parser imports no TensorFlow (nor scikit-learn): the choices of ``--strategy``,
``--arch``, ``--dataset``, ``--pool`` and ``--profile`` come from registries whose modules load
Keras only in the functions that build or run a model, so ``stealnb --help`` and every
``stealnb SUB --help`` answer at once. A command imports what it runs when it runs.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import importlib.util
import json
import os
import shlex
import sys
import tempfile
import traceback
from pathlib import Path

from .core import data, models, profiles
from .extraction import selectors
from .core._checks import UsageError


def _cmd_train_secret(args) -> int:
    from .core import layout
    from .core.train import train_secret

    layout.check_run_dir(args.out, "secret")  # before the training, not after it
    ds = data.load_dataset(args.dataset, root=args.data_root)
    res = train_secret(ds, args.arch, profiles.get_profile(args.profile), seed=args.seed, progress=not args.quiet)
    out = res.save(args.out)
    s = res.summary()
    print(
        f"{args.dataset}/{args.arch} ({args.profile}): best fold {s['best_fold'] + 1}/{s['folds']} "
        f"test accuracy {s['test_accuracy']:.4f} (mean {s['test_accuracy_mean']:.4f} ± "
        f"{s['test_accuracy_std']:.4f}) in {s['seconds']:.0f} s -> {out}/model.keras, {out}/metrics.json"
    )
    return 0


def _cmd_data_list(args) -> int:
    rows = data.list_local(args.data_root, build=True)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    print(f"data root: {data.data_root(args.data_root)}")
    for r in rows:
        if r.get("source") not in (None, "files"):
            size, where = "   built-in  ", r["source"]
        else:
            size = f"{r['size_bytes'] / 1e6:9.1f} MB" if r.get("present") else "   missing   "
            where = r.get("path") or ""
        print(f"  {r['name']:<16} {r['kind']:<8} {size}  {where}")
        if "duplicates_dropped" in r:
            print(f"  {'':<16} {'':<8} {'':<13}  {r['pool_size']:,} patches (seed 0): "
                  f"{r['duplicates_dropped']:,} near-duplicates dropped")
    print("Every dataset also serves as a thief pool for a secret trained on another one: --pool NAME.")
    return 0


def _cmd_data_fetch(args) -> int:
    path = data.fetch(args.name, root=args.data_root, progress=not args.quiet)
    print(f"{args.name}: ready at {path}")
    return 0


def _budgets(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated query counts like 500,1000,2000, got {text!r}") from None


def check_out(out, kind: str, resume: bool) -> None:
    """Before any work: refuse an ``out`` that a ``kind`` run may not use
    (:func:`stealnb.core.layout.check_run_dir`), and say so when ``--resume`` finds no checkpoint there."""
    from .core import layout

    if resume and layout.checkpointed(out, kind):
        return
    layout.check_run_dir(out, kind, replace=not resume)
    if resume:
        print(f"stealnb: --resume: no checkpoint in {out}; starting a fresh run", file=sys.stderr)


def http_oracle(args, out, budget: int, kind: str):
    """The ``--oracle-url`` client shared by ``stealnb extract`` and ``stealnb copycat`` (``kind``):
    a fresh run (no ``--resume``) replaces ``out`` first (:func:`stealnb.core.layout.new_run_dir`), then
    the :class:`~stealnb.extraction.oracle.HttpOracle` opens its ledger in ``out`` -- so a resumed run, or a
    restarted server, never pays for a query twice."""
    from .core import layout
    from .extraction.oracle import HttpOracle

    out = Path(out)
    if args.resume:
        out.mkdir(parents=True, exist_ok=True)
    else:
        layout.new_run_dir(out, kind)
    return HttpOracle(args.oracle_url, model=args.model_name, api_key=args.api_key,
                      ledger=out / "ledger.bin", budget=budget)


def _cmd_extract(args) -> int:
    from .core import train
    from .extraction import loop

    prof = profiles.get_profile(args.profile)
    overrides = {}
    if args.budgets:
        overrides["budgets"] = args.budgets
    if args.substitute:
        overrides["substitute"] = args.substitute
    for name in ("round_size", "seed_size", "val_size", "epochs"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.pool:
        prof = prof.with_(pool=args.pool)
    if args.pool_size is not None:
        prof = prof.with_(pool_size=args.pool_size)
    if args.pool_transform is not None:
        prof = prof.with_(pool_transform=args.pool_transform)
    if args.secret is None and not (args.dataset and args.arch):
        raise UsageError("extract: give --secret DIR, or --dataset and --arch (trained on demand)")
    dataset, arch = args.dataset, args.arch
    if args.secret is not None:
        _, summary = train.load_secret(args.secret)
        dataset, arch = summary["dataset"], summary["arch"]
    config = loop.configure(prof, args.strategy, seed=args.seed, dataset=dataset,
                                  allow_problem_domain=args.allow_problem_domain_pool, **overrides)
    check_out(args.out, "extraction", args.resume)
    oracle, resume = None, args.resume
    if args.oracle_url:
        oracle = http_oracle(args, args.out, budget=config.budgets[-1], kind="extraction")
        resume = True  # cleared or resumed above; keeps run_extraction from deleting the new ledger
    ex = loop.run_extraction(
        dataset, arch, args.strategy, prof, seed=args.seed, results=args.results,
        out=args.out, data_root=args.data_root, resume=resume, progress=not args.quiet,
        oracle=oracle, secret_dir=args.secret, allow_problem_domain=args.allow_problem_domain_pool, **overrides,
    )
    s = ex.summary()
    print(f"{args.strategy} on {dataset}/{arch} ({prof.name}, seed {args.seed}): {s['oracle_spent']} queries, "
          f"{s['rounds']} rounds, {s['seconds']:.0f} s -> {args.out}/rounds.jsonl, {args.out}/summary.json")
    def rate(v):
        return "n/a" if v is None else f"{v:.3f}"

    for b, r in s["budgets"].items():
        print(f"  budget {b:>6}: agreement {r['agreement']:.4f}  accuracy {r['accuracy']:.4f}  "
              f"adv_agreement {rate(r.get('adv_agreement'))}  transfer_rate {rate(r['transfer_rate'])}  "
              f"secret_error_under_transfer {r['secret_error_under_transfer']:.3f}")
    for line in loop.collapse_warnings(ex.records):
        print(line, file=sys.stderr)
    return 0


def _cmd_copycat(args) -> int:
    from .core import layout, train
    from .extraction import copycat, loop

    prof = profiles.get_profile(args.profile)
    if args.pool_size is not None:
        prof = prof.with_(pool_size=args.pool_size)
    if args.pool_transform is not None:
        prof = prof.with_(pool_transform=args.pool_transform)
    overrides = {k: getattr(args, k) for k in ("budgets", "pdd_size", "round_size", "seed_size", "val_size",
                                               "epochs", "finetune_epochs", "substitute") if getattr(args, k) is not None}
    if args.secret is None and not (args.dataset and args.arch):
        raise UsageError("copycat: give --secret DIR, or --dataset and --arch (trained on demand)")
    dataset, arch = args.dataset, args.arch
    if args.secret is not None:
        _, meta = train.load_secret(args.secret)
        dataset, arch = meta["dataset"], meta["arch"]
    config = copycat.configure(prof, args.variant, pool=args.pool, seed=args.seed, dataset=dataset,
                       allow_problem_domain=args.allow_problem_domain_pool, **overrides)
    out = args.out or layout.copycat_dir(args.results, prof.name, dataset, arch, args.variant, args.seed)
    check_out(out, "copycat", args.resume)
    oracle, resume = None, args.resume
    if args.oracle_url:
        oracle = http_oracle(args, out, budget=config.budgets[-1] + config.pdd_size, kind="copycat")
        resume = True  # cleared or resumed above; keeps run_copycat from deleting the new ledger
    cc = copycat.run_copycat(dataset, arch, args.variant, prof, seed=args.seed, results=args.results, out=out,
                             data_root=args.data_root, resume=resume, progress=not args.quiet,
                             secret_dir=args.secret, pool=args.pool, oracle=oracle,
                             allow_problem_domain=args.allow_problem_domain_pool, **overrides)
    s = cc.summary()
    print(f"copycat {args.variant} of {dataset}/{arch} ({prof.name}, seed {args.seed}): {s['oracle_spent']} queries, "
          f"oracle macro-F1 {s['oracle']['macro_f1']:.4f}, {s['seconds']:.0f} s -> {out}/rounds.jsonl, {out}/summary.json")
    for b, r in s["budgets"].items():
        extra = f"  (before fine-tuning {r['npdd']['relative_f1']:.4f})" if "npdd" in r else ""
        print(f"  budget {b:>6} ({r['queries']} queries): agreement {r['agreement']:.4f}  macro-F1 {r['macro_f1']:.4f}  "
              f"relative F1 {r['relative_f1']:.4f}{extra}")
    for line in loop.collapse_warnings(cc.records):
        print(line, file=sys.stderr)
    return 0


# Modules that add their own subcommands through register_cli(subparsers), when present. Their
# top-level imports must stay light: every one is imported to build the parser.
_PLUGINS = ("stealnb.report.pipeline", "stealnb.serve.server", "stealnb.report.bookcheck")


class _Version(argparse.Action):
    """``--version``: ``stealnb <version>`` of the installed distribution, looked up only when asked."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, help="print the version and exit"):
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        import importlib.metadata

        try:
            version = importlib.metadata.version("stealnb")
        except importlib.metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
            version = "(not installed)"
        print(f"stealnb {version}")
        parser.exit()


def _choice(names, metavar: str = "NAME", **kwargs) -> dict:
    """``add_argument`` keywords for one of ``names`` (a registry), shown as ``metavar`` in the
    usage line; the help lists them through ``%(choices)s``."""
    return dict(choices=list(names), metavar=metavar, **kwargs)


def _attack_options(a, *, what: str, pool_help: str, problem_domain_help: str, budgets_help: str,
                    round_help: str, val_help: str, substitute_help: str, out_help: str | None) -> None:
    """The options ``stealnb extract`` and ``stealnb copycat`` share (``what``: the subcommand), one place."""
    a.add_argument("--dataset", *(["--secret-dataset"] if what == "copycat" else []), dest="dataset", default=None,
                   **_choice(data.DATASETS, help="secret's dataset (with --arch, instead of --secret): one of %(choices)s"))
    a.add_argument("--arch", default=None, **_choice(
        models.REGISTRY, help="secret's architecture (trained on demand under --results): one of %(choices)s"))
    a.add_argument("--secret", type=Path, default=None, help="folder with model.keras + metrics.json")
    a.add_argument("--pool", default=None, **_choice(data.POOLS, help=pool_help))
    a.add_argument("--pool-size", type=int, default=None)
    a.add_argument("--pool-transform", default=None, choices=sorted(data.POOL_TRANSFORMS),
                   help="gray: BT.601 luma in all 3 channels, for a secret trained on grey images (thesis §5.1)")
    a.add_argument("--allow-problem-domain-pool", action="store_true", help=problem_domain_help)
    a.add_argument("--budgets", type=_budgets, default=None, help=budgets_help)
    a.add_argument("--round-size", type=int, default=None, help=round_help)
    a.add_argument("--seed-size", type=int, default=None, help="|S0|, the random initial set (default: the profile's)")
    a.add_argument("--val-size", type=int, default=None, help=val_help)
    a.add_argument("--epochs", type=int, default=None, help="max substitute epochs per round (default: the profile's)")
    a.add_argument("--substitute", default=None, **_choice(models.REGISTRY, help=substitute_help))
    a.add_argument("--profile", **_choice(profiles.PROFILES, "PROFILE", default="demo",
                                          help="one of %(choices)s (default: %(default)s)"))
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--results", type=Path, default=None,
                   help="results root, where secrets trained on demand go (default: $STEALNB_RESULTS, "
                        "else the project's results/)")
    if out_help is None:
        a.add_argument("--out", required=True, type=Path)
    else:
        a.add_argument("--out", type=Path, default=None, help=out_help)
    a.add_argument("--resume", action="store_true", help="continue the run in --out after an interruption")
    a.add_argument("--oracle-url", default=None, help="query a `stealnb serve` endpoint instead of an in-process oracle")
    a.add_argument("--model-name", default="secret", help="model name on the server")
    a.add_argument("--api-key", default=None, help="API key for --oracle-url (default: $STEALNB_API_KEY)")
    a.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    profile = _choice(profiles.PROFILES, "PROFILE", default="demo", help="one of %(choices)s (default: %(default)s)")
    p = argparse.ArgumentParser(prog="stealnb", description="Black-box model extraction of image classifiers.")
    p.add_argument("--version", action=_Version)
    p.add_argument("--data-root", default=None, help="dataset folder (default: $STEALNB_DATA or ~/.cache/stealnb)")
    p.add_argument("--debug", action="store_true",
                   help="print the traceback of an error (an unexpected one is otherwise saved to a file)")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train-secret", help="train a secret model with the thesis protocol (k-fold CV)")
    t.add_argument("--dataset", required=True, **_choice(data.DATASETS, help="one of %(choices)s"))
    t.add_argument("--arch", required=True, **_choice(models.REGISTRY, help="one of %(choices)s"))
    t.add_argument("--profile", **profile)
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

    e = sub.add_parser("extract", help="ActiveThief extraction of a secret model (resumable)")
    e.add_argument("--strategy", required=True, **_choice(selectors.REGISTRY, "STRATEGY", help="one of %(choices)s"))
    _attack_options(e, what="extract", pool_help="thief pool (default: the profile's): one of %(choices)s",
                    problem_domain_help="let the pool be the secret's own dataset (problem-domain data, refused otherwise)",
                    budgets_help="e.g. 500,1000,2000 (default: the profile's)",
                    round_help="k, samples selected per round",
                    val_help="oracle-labelled validation split for early stopping; counts against the budget",
                    substitute_help="substitute architecture (default: the profile's): one of %(choices)s", out_help=None)
    e.set_defaults(func=_cmd_extract)

    # The flags shared with `stealnb extract` are _attack_options. --variant is checked by
    # stealnb.extraction.copycat.configure (one line, exit 2, before any work): the names live with the
    # Copycat protocol, which loads Keras.
    c = sub.add_parser("copycat", help="Copycat CNN attack: hard labels on random natural images (resumable)")
    c.add_argument("--variant", required=True,
                   help="npdd: natural images only; pdd-sl: then fine-tune on oracle-labelled problem-domain "
                        "images; npdd+pdd: train on the union")
    c.add_argument("--pdd-size", type=int, default=None, help="problem-domain images (from the train split) for pdd variants")
    c.add_argument("--finetune-epochs", type=int, default=None)
    _attack_options(c, what="copycat", pool_help="NPDD thief pool (default: the profile's): one of %(choices)s",
                    problem_domain_help="let the NPDD pool be the secret's own dataset (that is PDD: use --pdd-size instead)",
                    budgets_help="NPDD query budgets, e.g. 500,1000,2000",
                    round_help="extra data-curve rounds every k queries (default: budgets only)",
                    val_help="oracle-labelled NPDD validation split (counts against the budget)",
                    substitute_help="copycat architecture (default: the profile's): one of %(choices)s",
                    out_help="run folder (default: results/<profile>/copycat/...)")
    c.set_defaults(func=_cmd_copycat)

    for name in _PLUGINS:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register_cli(sub)
    return p


def _unexpected(e: Exception, argv, debug: bool) -> int:
    """Report an error that is not the user's: one line naming it and the file its traceback was
    saved to (``--debug``: the traceback itself). Returns the exit status 1."""
    if debug:
        traceback.print_exc()
        return 1
    fd, path = tempfile.mkstemp(prefix="stealnb-error-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write(f"stealnb {' '.join(map(shlex.quote, argv))}\n\n")
        traceback.print_exc(file=f)
    what = ": ".join([type(e).__name__, *str(e).splitlines()[:1]])
    print(f"stealnb: unexpected error: {what} (traceback in {path}; --debug prints it)", file=sys.stderr)
    return 1


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The parsed command line; a ``--results`` left out is the results root of
    :func:`stealnb.core.layout.results_root` (the one folder the notebooks use too, wherever run)."""
    args = build_parser().parse_args(argv)
    if "results" in vars(args) and args.results is None:
        from .core.layout import results_root

        args.results = results_root()
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
        # The user's to fix (a UsageError, missing data, a bad argument): one line, exit 2.
        if args.debug:
            traceback.print_exc()
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"stealnb: error: {msg}", file=sys.stderr)
        return 2
    except Exception as e:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return _disk_full(e)
        return _unexpected(e, argv, args.debug)


def _disk_full(e: OSError) -> int:
    """Report a full disk: one line naming what could not be written, and how to go on; no
    traceback file (it would not fit either). Returns the exit status 1. What was saved before is
    kept: ``stealnb run`` resumes from its tasks' stamps, a run from its checkpoints and ledger."""
    what = f"writing {e.filename}" if e.filename else "writing its output"
    try:
        print(f"stealnb: error: no space left on the device ({what}); the work saved before is kept: "
              f"free space and run the same command again to resume", file=sys.stderr)
    except OSError:  # stderr is on the full disk too
        pass
    return 1


if __name__ == "__main__":
    sys.exit(main())

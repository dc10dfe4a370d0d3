"""Where results live: one function per kind of run, so the CLI, the notebooks, the pipeline and
the book agree on paths.

::

    results/<profile>/secrets/<dataset>-<arch>/{model.keras, metrics.json}
    results/<profile>/extraction/<dataset>-<arch>/<strategy>/seed<N>/{rounds.jsonl, summary.json,
                                                                     ledger.bin, checkpoint/}
    results/<profile>/copycat/<dataset>-<arch>/<variant>/seed<N>/{rounds.jsonl, summary.json, ...}
    results/<profile>/defenses/<dataset>-<arch>/...
    results/<profile>/pools/<dataset>-<arch>/<pool>/<strategy>/seed<N>/{rounds.jsonl, summary.json, ...}

The results root is :func:`results_root`: ``$STEALNB_RESULTS`` or the project's ``results/``,
whatever the current directory (JupyterLab runs a notebook's kernel in ``notebooks/``, papermill
and ``stealnb`` in the project folder), so every way of running shares secrets and runs.

Output folders. A new run writes :data:`MARKER` (its kind) into its folder, and replaces a folder
only when everything in it is something stealnb writes there (:data:`RUN_FILES`): a folder that
holds anything else is refused with one line, and nothing in it is touched (:func:`new_run_dir`).
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import time
from pathlib import Path

from ._checks import UsageError

MARKER = ".stealnb-run.json"
RESULTS_ENV = "STEALNB_RESULTS"


def project_root() -> Path:
    """The folder with ``_config.yml``, ``_toc.yml``, ``book/`` and ``notebooks/`` (a source checkout):
    the one this package is imported from, else the current directory. FileNotFoundError if neither."""
    here = Path(__file__).resolve().parents[2]  # stealnb/core/layout.py -> the checkout
    for cand in (here, Path.cwd()):
        if (cand / "_config.yml").is_file() and (cand / "notebooks").is_dir():
            return cand
    raise FileNotFoundError(
        "no source checkout (with _config.yml, _toc.yml, book/ and notebooks/) "
        f"at {here} or the current directory {Path.cwd()}")


def results_root(results=None) -> Path:
    """The results root, absolute: ``results`` when given (a relative path is taken from the
    current directory, as any command-line path), else ``$STEALNB_RESULTS``, else the project's
    ``results/`` (:func:`project_root`; outside a checkout, ``./results``). The notebooks' and the
    CLI's ``results`` defaults (None) resolve here, so a notebook opened in JupyterLab (kernel in
    ``notebooks/``), papermill run from the project folder and ``stealnb run`` use one folder."""
    if results is None or str(results) == "":
        env = os.environ.get(RESULTS_ENV, "").strip()
        if env:
            results = Path(env).expanduser()
        else:
            try:
                results = project_root() / "results"
            except FileNotFoundError:
                results = Path("results")
    results = Path(results)
    return results if results.is_absolute() else Path.cwd() / results


def _files(*names: str) -> dict:
    return dict.fromkeys(names)


# What stealnb writes into each kind of folder: a file-name pattern -> None, or a sub-folder
# pattern -> the kind of that sub-folder. "<name>.tmp" files are left by an interrupted atomic
# write. Any folder may also hold MARKER.
RUN_FILES: dict[str, dict] = {
    "secret": _files("model.keras", "metrics.json", "metrics.json.tmp"),
    "extraction": {**_files("rounds.jsonl", "rounds.jsonl.tmp", "summary.json", "summary.json.tmp", "ledger.bin"),
                   "checkpoint": "extraction checkpoint"},
    "extraction checkpoint": _files("state.json", "state.json.tmp", "substitute.weights.h5",
                                    "substitute.weights.h5.tmp.weights.h5"),
    "copycat": {**_files("rounds.jsonl", "rounds.jsonl.tmp", "summary.json", "summary.json.tmp", "ledger.bin"),
                "checkpoint": "copycat checkpoint", "npdd": "extraction"},
    "copycat checkpoint": _files("copycat.json", "copycat.json.tmp", "copycat.weights.h5", "copycat.tmp.weights.h5"),
    # The folders of `stealnb run` tasks (stealnb.report.pipeline.plan) and the book's copy of the notebooks.
    "extraction seeds": {"seed*": "extraction"},
    "copycat variants": {"*": "copycat seeds"},
    "copycat seeds": {"seed*": "copycat"},
    # The pool chapter (stealnb.experiments.pools): one extraction per pool, strategy and seed; a
    # runs/pool task owns one run's folder (the "best" entry's: each candidate strategy's).
    "pool strategies": {"*": "extraction seeds"},
    "defenses": {**_files("prada.json", "admis.json", "ewe.json"), "server-logs": "server logs"},
    "server logs": {"keys": "server key logs"},
    "server key logs": _files("*.jsonl", "*.head"),  # stealnb.serve.server: a log and its header per key
    "book": {"*": "book chapter"},
    "book chapter": _files("*.ipynb"),
}

# The files a run resumes from, per kind (Copycat's NPDD extraction checkpoints first).
CHECKPOINTS = {"extraction": ("checkpoint/state.json",),
               "copycat": ("checkpoint/copycat.json", "npdd/checkpoint/state.json")}


def _safe(part: str) -> str:
    return str(part).replace("/", "_").replace("+", "+")


def profile_dir(results, profile: str) -> Path:
    """``results/<profile>``; ``results=None`` is :func:`results_root`'s default folder."""
    return (results_root() if results is None else Path(results)) / _safe(profile)


def secret_dir(results, profile: str, dataset: str, arch: str) -> Path:
    return profile_dir(results, profile) / "secrets" / f"{_safe(dataset)}-{_safe(arch)}"


def extraction_dir(results, profile: str, dataset: str, arch: str, strategy: str, seed: int) -> Path:
    return profile_dir(results, profile) / "extraction" / f"{_safe(dataset)}-{_safe(arch)}" / _safe(strategy) / f"seed{int(seed)}"


def copycat_dir(results, profile: str, dataset: str, arch: str, variant: str, seed: int) -> Path:
    return profile_dir(results, profile) / "copycat" / f"{_safe(dataset)}-{_safe(arch)}" / _safe(variant) / f"seed{int(seed)}"


def defenses_dir(results, profile: str, dataset: str, arch: str) -> Path:
    return profile_dir(results, profile) / "defenses" / f"{_safe(dataset)}-{_safe(arch)}"


def pools_dir(results, profile: str, dataset: str, arch: str) -> Path:
    return profile_dir(results, profile) / "pools" / f"{_safe(dataset)}-{_safe(arch)}"


def pool_spec_dir(results, profile: str, dataset: str, arch: str, pool: str) -> Path:
    """The pool chapter's runs on one pool (a ``pool strategies`` folder); ``pool`` is a pool spec
    (``natural-patches+gray``)."""
    return pools_dir(results, profile, dataset, arch) / _safe(pool)


def pool_run_dir(results, profile: str, dataset: str, arch: str, pool: str, strategy: str, seed: int) -> Path:
    """One run of the pool chapter; ``pool`` is a pool spec (``natural-patches+gray``)."""
    return pool_spec_dir(results, profile, dataset, arch, pool) / _safe(strategy) / f"seed{int(seed)}"


def checkpointed(out, kind: str) -> bool:
    """``out`` holds a checkpoint a ``kind`` run (``"extraction"``, ``"copycat"``) resumes from."""
    return any((Path(out) / p).is_file() for p in CHECKPOINTS[kind])


def _marker_kind(path: Path):
    try:
        return json.loads(path.read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def _foreign(folder: Path, kind, rel: str = "") -> list[str]:
    """Entries under ``folder`` (relative paths) that a ``kind`` folder does not hold."""
    spec = RUN_FILES[kind] if isinstance(kind, str) else kind
    found = []
    for p in sorted(folder.iterdir()):
        name = rel + p.name
        if p.is_symlink():  # stealnb writes none
            found.append(name)
        elif p.name == MARKER and p.is_file():
            other = _marker_kind(p)
            if isinstance(kind, str) and other not in (None, kind):
                found.append(f"{name} (kind {other!r})")
        else:
            sub = [k for pat, k in spec.items() if fnmatch.fnmatchcase(p.name, pat) and (k is not None) == p.is_dir()]
            if not sub:
                found.append(name + ("/" if p.is_dir() else ""))
            elif sub[0] is not None:
                found += _foreign(p, sub[0], name + "/")
    return found


def check_run_dir(out, kind, *, replace: bool = True) -> Path:
    """Refuse (:class:`~stealnb.core._checks.UsageError`, one line naming ``out``) a folder stealnb may
    not use for a ``kind`` run: an existing file, a path under a file, or a folder holding anything
    that is not in ``RUN_FILES[kind]`` (``kind`` may also be such a mapping itself), a symlink or
    another kind's marker. Missing and empty folders pass, and so do runs written before the
    marker existed. ``replace`` only words the message. Returns ``Path(out)``."""
    out = Path(out)
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                where = "is a file" if p == out else f"is under the file {p}"
                raise UsageError(f"{out} {where}, not a folder; choose another output folder")
            break
    refusing = f"refusing to {'replace' if replace else 'write into'} {out}"
    other = _marker_kind(out / MARKER) if isinstance(kind, str) else None
    if other not in (None, kind):
        raise UsageError(f"{refusing}: it holds a stealnb {other!r} run, not a {kind!r} one; "
                         "choose another output folder")
    foreign = _foreign(out, kind) if out.is_dir() else []
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UsageError(f"{refusing}: it holds files stealnb did not write ({shown}); "
                         "choose another output folder or remove them")
    return out


def new_run_dir(out, kind, *, replace: bool = True) -> Path:
    """Make ``out`` the folder of a new ``kind`` run: :func:`check_run_dir`, then (``replace``)
    delete what an earlier run left in it, create it and write :data:`MARKER`. Returns ``Path(out)``."""
    out = check_run_dir(out, kind, replace=replace)
    if replace and out.is_dir():
        for p in out.iterdir():  # the contents, not out itself: it may be a symlink
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"kind": kind if isinstance(kind, str) else None,
                                          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
    return out


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb", *, shared: bool = False):
    """Open ``path`` for writing so that a reader (or a crash) sees the old file or the new one,
    never a part: the file handle yielded writes a temporary file ``<name>.tmp`` beside it
    (``<name>.tmp-<pid>`` when ``shared``: a cache that several processes may write at once,
    or a download), which is flushed, fsync-ed and renamed into place when the block ends. If the
    block raises (a failed check, an interrupted download), ``path`` is untouched and the temporary
    file removed. The one place the package writes a file atomically; :func:`atomic_write` is text."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}" if shared else f"{path.name}.tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path, text: str, *, shared: bool = False) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_open`)."""
    with atomic_open(path, "w", shared=shared) as f:
        f.write(text)


def write_json(path, obj) -> None:
    """``obj`` as indented JSON at ``path``, written with :func:`atomic_write`."""
    atomic_write(path, json.dumps(obj, indent=2))

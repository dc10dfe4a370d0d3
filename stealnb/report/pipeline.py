"""``stealnb run``: execute the notebook grid of a profile with papermill, then build the book.

The grid (:func:`plan`) has one task per extraction seed, per Copycat seed and per run of the
pool study (pool, strategy and seed; a ``runs/...`` task: :data:`RUNNERS`, no notebook, a process of its own; on a cluster
they run in parallel), and one executed notebook per

* dataset: ``01_eda``;
* secret (dataset × architecture): ``02_secret``, ``03_extraction`` per strategy, ``05_copycat``
  (these two after their seeds' ``runs/`` tasks, whose finished results they read back and narrate);
* secret: ``08_pools`` (the pool study: after its pools' runs/ tasks, which run after the secret's
  extraction runs/ tasks, whose best strategy they use);
* the profile's first secret: ``06_defenses`` (after the runs/ tasks of the attacks it uses, first seed) and
  ``07_interactive``;
* profile: ``04_results``, which gathers every run's result files (run last).

Secrets come from the profile; with ``--with-optional``, ``optional_secrets`` join when their
dataset is present locally (the demo's Fashion-MNIST secret: 60k images make it the slow part).

**Skipping unchanged work.** Each task has two keys (SHA-256):

* the *results key*: the notebook's cells, its parameters, the profile's settings, the Debian
  wallpaper photos installed (the natural-patches pool's sources), the source of the package
  modules that compute results (everything but :data:`PRESENTATION_MODULES`) and the results
  keys of the tasks it depends on;
* the *notebook key*: the results key plus the presentation modules (plots, tables, book).

A task whose notebook key matches the stamp of its last successful run (and whose executed
notebook still exists) is skipped. When only the notebook key changed, the notebook is executed
again and reads its finished results back (extractions resume, secrets load). When the results
key changed, or the task never finished, the task's result folders are deleted first, so a
notebook never reuses results computed by other code or settings; a folder that holds files
stealnb did not write is refused before any notebook starts, and nothing is deleted. ``--force``
reruns every notebook and deletes every task's results. An interrupted run keeps its partial
results (its stamp records the results key before the notebook starts), so the next run resumes them.

**Where tasks run.** :func:`execute` submits each task to a Dask cluster as a future that
depends on its upstream tasks' futures, with its :func:`critical_path` length as its priority:
a local cluster of ``--jobs`` worker processes, or a running one (``--scheduler``,
``$DASK_SCHEDULER_ADDRESS``; :mod:`stealnb.report.cluster`). A task whose worker dies is rerun on
another worker and resumes from the results its first attempt left (checkpoint, query ledger).

Executed notebooks are build products: they go to ``results/<profile>/notebooks/`` and are
copied into ``book/generated/`` (git-ignored) just before the book is built, with paths relative
to the results root and the run's parameters as one line (:func:`prepare_for_book`); the book
renders them without executing anything (``execute_notebooks: off``).
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..core import layout
from . import cluster
from ..core._checks import UsageError
from ..core.profiles import BEST_STRATEGY, PROFILES, Profile, check_profile, get_profile
from ..core.progress import progress_bar

NOTEBOOKS = {
    "eda": "01_eda.ipynb",
    "secret": "02_secret.ipynb",
    "extraction": "03_extraction.ipynb",
    "results": "04_results.ipynb",
    "copycat": "05_copycat.ipynb",
    "defenses": "06_defenses.ipynb",
    "interactive": "07_interactive.ipynb",
    "pools": "08_pools.ipynb",
}
BOOK_GENERATED = Path("book") / "generated"
# Rough wall seconds per notebook on the demo profile (book/reproduce.md, Timings), used only to order the
# tasks that are ready to start when no earlier run's time is recorded (see ``critical_path``).
_COST_HINT = {"eda": 40, "secret": 60, "extraction": 700, "copycat": 1840, "defenses": 1340,
              "interactive": 60, "results": 15}
# One run of the pool study (a ``runs/pool-...`` task): the demo's pool chapter (1,100 s) over its
# 5 pools x 2 strategies.
_POOL_RUN_HINT = 110
# Of an extraction (Copycat) notebook's hint, the part left to the notebook once its seeds' runs/
# tasks have run: reading the runs back, the figures (Copycat: t-SNE and LRP too).
_READ_BACK_HINT = {"extraction": 30, "copycat": 120, "pools": 60}
_STRATEGY_COST_HINT = {"random": 600, "uncertainty": 710, "kcenter": 570, "dfal": 800, "dfal+kcenter": 910}


# The project folder: stealnb.core.layout.project_root (kept here under its old name).
project_root = layout.project_root

# The notebooks that train models (secrets, substitutes, Copycat copies, the defenses' copies,
# the pool study's substitutes): the tasks that take a GPU when the profile wants one
# (``Profile.gpu``, :mod:`stealnb.report.cluster`).
# The extraction and Copycat notebooks read back what their seeds' runs/ tasks trained.
TRAINING_CHAPTERS = frozenset({"secret", "runs", "defenses", "pools"})


@dataclass
class Task:
    """One notebook execution: ``id`` is ``<chapter>/<name>`` (also its place in the book); or,
    with ``run`` set, one call of :data:`RUNNERS` ``[run]`` with ``params`` (chapter ``runs``,
    ``notebook`` empty: not in the book)."""

    id: str
    notebook: str  # file name under notebooks/ ("" for a runs/ task)
    params: dict
    deps: list[str] = field(default_factory=list)
    # Result folders owned by this task -> what they hold (a stealnb.core.layout.RUN_FILES kind).
    outputs: dict[Path, str | dict] = field(default_factory=dict)
    key: str = ""  # notebook key: rerun the notebook when it changes
    results_key: str = ""  # results key: delete the task's results when it changes
    resources: dict = field(default_factory=dict)  # Dask worker resources it takes (``{"GPU": 1}``)
    run: str | None = None  # a RUNNERS name: this task calls it instead of executing a notebook

    @property
    def is_notebook(self) -> bool:
        return self.run is None

    @property
    def chapter(self) -> str:
        return self.id.split("/", 1)[0]

    @property
    def name(self) -> str:
        return self.id.split("/", 1)[1]


def secrets_of(prof: Profile, data_root=None, optional: bool = True) -> list[tuple[str, str]]:
    """The profile's secrets, plus (``optional=True``) its optional ones whose dataset is present."""
    out = list(prof.secrets)
    if optional and prof.optional_secrets:
        from ..core import data

        present = data.present(data_root)
        out += [s for s in prof.optional_secrets if s[0] in present and s not in out]
    return out


def _run_id(run: str, tag: str, *, seed: int | None = None, strategy: str | None = None,
            pool: str | None = None) -> str:
    """The id of a ``runs/`` task: ``runs/extraction-<tag>-<strategy>-seed<N>``,
    ``runs/copycat-<tag>-seed<N>`` or ``runs/pool-<tag>-<pool spec>-<strategy>-seed<N>`` (``tag`` is
    ``<dataset>-<arch>``; a pool task's strategy is the study's entry, "best" included)."""
    parts = {"extraction": [strategy, f"seed{seed}"], "copycat": [f"seed{seed}"],
             "pool": [pool, strategy, f"seed{seed}"]}[run]
    return "-".join([f"runs/{run}", tag, *parts])


def plan(profile: Profile, results, data_root=None, optional: bool = False) -> list[Task]:
    """The ordered task list (dependencies before dependants) for ``profile``; ``optional``
    adds the profile's optional secrets whose data is present (demo: Fashion-MNIST)."""
    from ..experiments import pools as pool_study

    prof = check_profile(profile)
    results = Path(results).resolve()
    common = {"profile": prof.name, "results_dir": str(results),
              "data_root": None if data_root is None else str(Path(data_root).resolve())}
    # The notebooks with long cells show progress bars when run by hand; not in the book.
    quiet = {"progress": False}
    secrets = secrets_of(prof, data_root, optional)
    tasks: list[Task] = []
    for ds in dict.fromkeys(d for d, _ in secrets):
        tasks.append(Task(f"eda/{ds}", NOTEBOOKS["eda"], {**common, **quiet, "dataset": ds}))
    for ds, arch in secrets:
        tag = f"{ds}-{arch}"
        sec = f"secret/{tag}"
        tasks.append(Task(sec, NOTEBOOKS["secret"], {**common, **quiet, "dataset": ds, "arch": arch},
                          outputs={layout.secret_dir(results, prof.name, ds, arch): "secret"}))
        # One runs/ task per seed computes (and owns) that seed's results; the chapter's notebook
        # runs after them and reads them back.
        run_params = {"profile": prof.name, "results_dir": common["results_dir"], "data_root": common["data_root"],
                      "dataset": ds, "arch": arch}
        for strat in prof.strategies:
            seeds = []
            for seed in prof.seeds:
                seeds.append(Task(_run_id("extraction", tag, seed=seed, strategy=strat), "",
                                  {**run_params, "strategy": strat, "seed": seed},
                                  deps=[sec], run="extraction",
                                  outputs={layout.extraction_dir(results, prof.name, ds, arch, strat, seed): "extraction"}))
            tasks += seeds
            tasks.append(Task(
                f"extraction/{tag}-{strat}", NOTEBOOKS["extraction"],
                {**common, **quiet, "dataset": ds, "arch": arch, "strategy": strat, "seeds": list(prof.seeds)},
                deps=[sec, *(t.id for t in seeds)]))
        from ..extraction.copycat import VARIANTS

        seeds = [Task(_run_id("copycat", tag, seed=seed), "", {**run_params, "seed": seed}, deps=[sec], run="copycat",
                      outputs={layout.copycat_dir(results, prof.name, ds, arch, v, seed): "copycat" for v in VARIANTS})
                 for seed in prof.seeds]
        tasks += seeds
        tasks.append(Task(f"copycat/{tag}", NOTEBOOKS["copycat"],
                          {**common, **quiet, "dataset": ds, "arch": arch, "seeds": list(prof.seeds)},
                          deps=[sec, *(t.id for t in seeds)]))
        # The pool study: one runs/ task per pool, strategy entry and seed trains that run (in a
        # process of its own, like an extraction seed: Keras keeps ~200 MB of every model trained in
        # a process, benchmarks/bench_fit_memory.py), and the chapter's notebook reads them back.
        # The "best" entry's runs use the best strategy of this secret's extraction runs
        # (Profile.best_strategy_candidates, stealnb.experiments.pools.best_strategy): they wait for
        # those runs/ tasks, not for the chapter notebooks, so they start sooner and a change to
        # notebook 03 (a figure, say) does not change their results key and discard them. Which
        # candidate is best is known only then, so the task owns every candidate's folder (and the
        # fallback's) that no named entry owns (stealnb.experiments.pools.study_strategies: a named
        # entry keeps its run).
        best_from = [_run_id("extraction", tag, seed=seed, strategy=s) for s in prof.best_strategy_candidates
                     for seed in prof.seeds]
        named = [e for e in prof.pool_study.strategies if e != BEST_STRATEGY]
        best_owns = [c for c in dict.fromkeys((*prof.best_strategy_candidates, prof.pool_study.fallback_strategy))
                     if c not in named]
        specs = pool_study.pool_specs(prof, ds, data_root)[0]  # the pools installed (a bad study: an error here)
        pool_runs = [
            Task(_run_id("pool", tag, pool=spec, strategy=entry, seed=seed), "",
                 {**run_params, "pool": spec, "strategy": entry, "seed": seed},
                 deps=[sec, *best_from] if entry == BEST_STRATEGY else [sec], run="pool",
                 outputs={layout.pool_run_dir(results, prof.name, ds, arch, spec, s, seed): "extraction"
                          for s in (best_owns if entry == BEST_STRATEGY else [entry])})
            for spec in specs for entry in prof.pool_study.strategies for seed in prof.pool_study.seeds]
        tasks += pool_runs
        tasks.append(Task(f"pools/{tag}", NOTEBOOKS["pools"], {**common, "dataset": ds, "arch": arch},
                          deps=[sec, *(t.id for t in pool_runs)]))
    ds, arch = secrets[0]
    tag = f"{ds}-{arch}"
    # The defenses notebook attacks the secret with the extraction and Copycat runs of the
    # profile's first seed: it waits for those runs/ tasks (not for the chapter notebooks, which
    # only narrate them) and reads their results back.
    attacks = [a for a in prof.defenses.attacks if a == "copycat" or a in prof.strategies]
    prada_only = [a for a in prof.defenses.prada_only if a in prof.strategies]
    seed = prof.seeds[0]
    tasks.append(Task(f"defenses/{tag}", NOTEBOOKS["defenses"], {**common, "dataset": ds, "arch": arch, "seed": seed,
                                                                 "attacks": attacks, "prada_only": prada_only},
                      deps=[f"secret/{tag}", *(_run_id("copycat", tag, seed=seed) if a == "copycat"
                                               else _run_id("extraction", tag, seed=seed, strategy=a)
                                               for a in attacks + prada_only)],
                      outputs={layout.defenses_dir(results, prof.name, ds, arch): "defenses"}))
    tasks.append(Task(f"interactive/{tag}", NOTEBOOKS["interactive"], {**common, **quiet, "dataset": ds, "arch": arch},
                      deps=[f"secret/{tag}"]))
    # The results chapter reads every other task's files, so it depends on all of them.
    tasks.append(Task("results/results", NOTEBOOKS["results"], dict(common), deps=[t.id for t in tasks]))
    if prof.gpu:
        for t in tasks:
            if t.chapter in TRAINING_CHAPTERS:
                t.resources = {"GPU": 1}
    return tasks


def _code_hash(nb_path: Path) -> str:
    """Hash of a notebook's code cells and their tags (narrative edits rerun too: the text is in the book)."""
    nb = json.loads(nb_path.read_text())
    cells = [(c["cell_type"], "".join(c["source"]), sorted(c.get("metadata", {}).get("tags", [])))
             for c in nb["cells"]]
    return hashlib.sha256(json.dumps(cells).encode()).hexdigest()


# Modules that only present results (figures, tables, the book, the CLI, the server), as paths in
# the package: the whole report subpackage and these. Changing them re-executes notebooks but keeps
# their computed results.
PRESENTATION_PACKAGES = ("report",)
PRESENTATION_MODULES = frozenset({"cli.py", "serve/server.py", "core/layout.py"})


def is_presentation(path: str) -> bool:
    """Whether ``path`` (relative to the package, "/"-separated) is presentation-only source."""
    return path in PRESENTATION_MODULES or path.split("/", 1)[0] in PRESENTATION_PACKAGES


def package_hash(presentation: bool = False) -> str:
    """Hash of the ``stealnb`` package's source: the modules that compute results, or (with
    ``presentation=True``) the presentation modules only."""
    h = hashlib.sha256()
    pkg = Path(__file__).resolve().parents[1]
    for p in sorted(pkg.rglob("*")):
        if not (p.is_file() and p.suffix in (".py", ".json") and "__pycache__" not in p.parts):
            continue
        rel = p.relative_to(pkg).as_posix()
        if is_presentation(rel) != presentation:
            continue
        h.update(rel.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _sha(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def assign_keys(tasks: list[Task], prof: Profile, notebooks_dir: Path) -> None:
    """Set each task's ``results_key`` and ``key`` (the notebook key); see the module docstring."""
    nb_missing = sorted({t.notebook for t in tasks if t.is_notebook and not (notebooks_dir / t.notebook).is_file()})
    if nb_missing:
        raise FileNotFoundError(f"notebooks missing from {notebooks_dir}: {', '.join(nb_missing)}")
    from ..core import data

    compute, present = package_hash(False), package_hash(True)
    photos = data.wallpapers_present()[0]
    by_id = {}
    for t in tasks:
        # (The pool chapter's pools are the datasets installed: plan() gives it one runs/ task
        # per pool, so a newly installed one changes its dependencies, hence its key.)
        t.results_key = _sha({
            "notebook": _code_hash(notebooks_dir / t.notebook) if t.is_notebook else f"runner {t.run}",
            "params": t.params,
            "profile": prof.to_dict(),
            "photos": photos,  # the natural-patches pool is cut from whichever wallpapers are installed
            "package": compute,
            "deps": [by_id[d].results_key for d in t.deps],
        })
        # A runs/ task presents nothing: a change of the presentation modules does not rerun it.
        t.key = _sha({"results": t.results_key, "presentation": present, "deps": [by_id[d].key for d in t.deps]}) \
            if t.is_notebook else _sha({"results": t.results_key})
        by_id[t.id] = t


def _stamp_path(run_dir: Path, task: Task) -> Path:
    return run_dir / "stamps" / (task.id.replace("/", "__") + ".json")


def _executed_path(run_dir: Path, task: Task) -> Path:
    return run_dir / "notebooks" / task.chapter / f"{task.name}.ipynb"


def _stamp(run_dir: Path, task: Task) -> dict:
    try:
        return json.loads(_stamp_path(run_dir, task).read_text())
    except (FileNotFoundError, json.JSONDecodeError, OSError):
        return {}


def is_current(run_dir: Path, task: Task) -> bool:
    """The task's notebook ran successfully with the same notebook key (a runs/ task: it finished
    with the same key)."""
    return (not task.is_notebook or _executed_path(run_dir, task).is_file()) and _stamp(run_dir, task).get("key") == task.key


def results_current(run_dir: Path, task: Task) -> bool:
    """The task's results were computed (and finished) with the same results key."""
    return _stamp(run_dir, task).get("results_key") == task.results_key


def _kernel_env() -> dict:
    env = dict(os.environ)
    # The kernel must be this interpreter (the venv's), even when the venv is not activated.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    # TensorFlow's C++ logging (level 3 also hides spurious "NodeDef ... use_unbounded_threadpool"
    # error lines) would otherwise end up in the book's pages; Python exceptions still show.
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    return env


# papermill started through this: on Linux it is SIGKILLed when the worker that started it dies
# (prctl PR_SET_PDEATHSIG), and its kernel follows (ipykernel polls JPY_PARENT_PID). A killed
# worker therefore leaves no orphan notebook still paying queries into the ledger that the
# retried task resumes from.
_DIE_WITH_WORKER = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))\n"
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(70)\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])\n")


def _run_extraction(profile, results_dir, data_root, dataset, arch, strategy, seed):
    from ..extraction.loop import run_extraction

    run_extraction(dataset, arch, strategy, get_profile(profile), seed=seed, results=results_dir, data_root=data_root)


def _run_copycat(profile, results_dir, data_root, dataset, arch, seed):
    from ..extraction.copycat import VARIANTS, run_copycat_variants

    run_copycat_variants(dataset, arch, VARIANTS, get_profile(profile), seed=seed, results=results_dir,
                         data_root=data_root)


def _run_pool(profile, results_dir, data_root, dataset, arch, pool, strategy, seed):
    from ..experiments.pools import run_pool

    run_pool(get_profile(profile), dataset, arch, pool, strategy=strategy, seed=seed, results=results_dir,
             data_root=data_root)


#: What a ``runs/`` task calls with its params (in a subprocess, like a notebook): one extraction
#: seed (:func:`stealnb.extraction.loop.run_extraction`), one Copycat seed, all variants
#: (:func:`stealnb.extraction.copycat.run_copycat_variants`), one run of the pool study: a pool,
#: a strategy entry and a seed (:func:`stealnb.experiments.pools.run_pool`). All resume, so a retried
#: task loses nothing.
RUNNERS = {"extraction": _run_extraction, "copycat": _run_copycat, "pool": _run_pool}


def _runner_main(argv) -> None:
    """``python -c 'from stealnb.report.pipeline import _runner_main; _runner_main(sys.argv[1:])' NAME PARAMS.json``"""
    name, params = argv
    print(f"{name}: {params}", flush=True)
    RUNNERS[name](**json.loads(Path(params).read_text()))
    print("done", flush=True)


class NotebookFailed(RuntimeError):
    """A task's notebook exited with an error; ``log`` is its papermill log."""

    def __init__(self, task_id: str, returncode: int, log: Path, seconds: float):
        super().__init__(task_id, returncode, str(log), seconds)
        self.task_id, self.returncode, self.log, self.seconds = task_id, returncode, Path(log), seconds

    def __str__(self) -> str:
        return f"{self.task_id} failed after {self.seconds:.0f} s (exit {self.returncode}); log: {self.log}"


def run_task(task: Task, root: Path, run_dir: Path, fresh: bool, run_token: str, *upstream) -> dict:
    """Execute one task's notebook with papermill (on a Dask worker; ``upstream`` are the
    results of the tasks it depends on, passed only so that Dask waits for them).

    ``fresh``: the task's results are of other code or settings (or ``--force``): its result
    folders are replaced first -- once per run (``run_token``), so an attempt retried after its
    worker died resumes from the checkpoint and ledger that the killed attempt left. The stamp
    records the results key before the notebook starts (an interrupted run resumes) and the
    notebook key once it succeeded. Raises :class:`NotebookFailed`."""
    stamp = _stamp_path(run_dir, task)
    before = _stamp(run_dir, task)
    if fresh and before.get("run") != run_token:
        for o, kind in task.outputs.items():
            layout.new_run_dir(o, kind)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    started = {"key": None, "results_key": task.results_key, "run": run_token, "started": time.time()}
    if isinstance(before.get("seconds"), (int, float)):
        started["seconds"] = before["seconds"]  # the critical path's estimate, until this run's is known
    stamp.write_text(json.dumps(started))
    out = _executed_path(run_dir, task)
    out.parent.mkdir(parents=True, exist_ok=True)
    params = run_dir / "params" / (task.id.replace("/", "__") + ".json")
    params.parent.mkdir(parents=True, exist_ok=True)
    params.write_text(json.dumps(task.params, indent=2))
    log = _log_path(run_dir, task)
    log.parent.mkdir(parents=True, exist_ok=True)
    if task.is_notebook:
        what = ["-m", "papermill", str(root / "notebooks" / task.notebook), str(out),
                "-f", str(params), "--cwd", str(root / "notebooks"), "-k", "python3", "--no-progress-bar", "--log-output"]
    else:
        what = ["-c", "import sys; from stealnb.report.pipeline import _runner_main; _runner_main(sys.argv[1:])",
                task.run, str(params)]
    cmd = [sys.executable, "-c", _DIE_WITH_WORKER, str(os.getpid()), *what]
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_kernel_env(), cwd=root).returncode
    secs = round(time.perf_counter() - t0, 1)
    if rc != 0:
        raise NotebookFailed(task.id, rc, log, secs)
    stamp.write_text(json.dumps({"key": task.key, "results_key": task.results_key, "seconds": secs,
                                 "params": task.params}, indent=2))
    return {"id": task.id, "seconds": secs, "log": str(log)}


def critical_path(tasks: list[Task], run_dir: Path) -> dict[str, float]:
    """For each task, the estimated seconds from its start to the end of the longest chain of
    tasks that wait for it (its own cost included). A task's cost is its last recorded run time
    (stamp), else a per-notebook hint. ``execute`` starts the ready task with the longest chain
    first, so the long chains (secret -> Copycat seed 0 -> defenses) never wait behind short tasks."""
    def cost(t: Task) -> float:
        secs = _stamp(run_dir, t).get("seconds")
        if isinstance(secs, (int, float)):
            return float(secs)
        if t.run == "pool":
            return _POOL_RUN_HINT
        if t.run is not None:  # one seed of the chapter's notebook hint, without the read-back
            whole = _STRATEGY_COST_HINT.get(t.params.get("strategy"), _COST_HINT[t.run]) if t.run == "extraction" \
                else _COST_HINT[t.run]
            return max(whole - _READ_BACK_HINT[t.run], 0) / 3  # the hints are of the demo's 3 seeds
        if t.chapter in _READ_BACK_HINT:
            return _READ_BACK_HINT[t.chapter]
        return _COST_HINT.get(t.chapter, 60)

    dependants: dict[str, list[str]] = {t.id: [] for t in tasks}
    for t in tasks:
        for d in t.deps:
            if d in dependants:
                dependants[d].append(t.id)
    out: dict[str, float] = {}
    for t in reversed(tasks):  # plan order is topological: dependants come later
        out[t.id] = cost(t) + max((out[d] for d in dependants[t.id]), default=0.0)
    return out


def execute(tasks: list[Task], *, root: Path, run_dir: Path, jobs: int = 1, force: bool = False,
            progress: bool = True, scheduler: str | None = None) -> dict:
    """Run the tasks that are not current on a Dask cluster (:mod:`stealnb.report.cluster`): a local
    one of ``jobs`` worker processes, or the running scheduler at ``scheduler``.

    Each task is a future (:func:`run_task`) that depends on its upstream tasks' futures, with
    its :func:`critical_path` length as its Dask priority: of the tasks ready to start, the one
    heading the longest chain of waiting work goes first. A task whose worker died, or whose
    notebook failed, is run once more (on whichever worker is free; the notebook resumes what the
    first attempt finished); failing twice, it is reported with its log path, its dependants are
    not started, independent tasks still run. Returns ``{"ran": [...], "skipped": [...],
    "failed": [...], "blocked": [...], "seconds": {...}, "logs": {failed id: log}}``.
    Before any starts, a result folder to be cleared that holds files stealnb did not write is
    refused (:func:`stealnb.core.layout.check_run_dir`).
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    report = {"ran": [], "skipped": [], "failed": [], "blocked": [], "seconds": {}, "logs": {}}
    for t in tasks:
        if not force and is_current(run_dir, t):
            report["skipped"].append(t.id)
    chain = critical_path(tasks, run_dir)
    skipped = set(report["skipped"])
    pending = [t for t in tasks if t.id not in skipped]
    # Results of other code or settings are not reused: these tasks' folders are replaced.
    stale = {t.id for t in pending if force or not results_current(run_dir, t)}
    for t in pending:
        if t.id in stale:
            for o, kind in t.outputs.items():
                layout.check_run_dir(o, kind)
    bar = progress_bar(total=len(tasks), initial=len(skipped), desc="tasks", unit="task",
               disable=not progress, file=sys.stdout)
    if progress and skipped:
        bar.write(f"skipping {len(skipped)} unchanged task(s)")
    if not pending:
        bar.close()
        return report
    need = frozenset(r for t in pending for r in t.resources)
    token = f"{os.getpid()}-{time.time_ns()}"  # this run: a retried attempt does not clear results again
    try:
        with cluster.connect(scheduler, jobs, need=need) as client:
            _submit_and_follow(client, pending, root=root, run_dir=run_dir, stale=stale, chain=chain,
                               token=token, report=report, bar=bar)
    finally:
        bar.close()
    return report


def _log_path(run_dir: Path, task: Task) -> Path:
    return run_dir / "logs" / (task.id.replace("/", "__") + ".log")


def _submit_and_follow(client, pending: list[Task], *, root: Path, run_dir: Path, stale: set, chain: dict,
                       token: str, report: dict, bar) -> None:
    """Submit ``pending`` (in plan order) to ``client`` and record each outcome in ``report`` as it
    arrives (see :func:`execute`)."""
    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    futures, task_of = {}, {}
    for t in pending:  # plan order is topological: upstream futures exist already
        upstream = [futures[d] for d in t.deps if d in futures]
        fut = client.submit(run_task, t, root, run_dir, t.id in stale, token, *upstream,
                            key=f"stealnb-{token}-{t.id}", priority=int(round(chain[t.id])),
                            retries=cluster.ALLOWED_FAILURES, resources=dict(t.resources) or None, pure=False)
        futures[t.id], task_of[fut.key] = fut, t
    done: set[str] = set()

    def origin(exc) -> str | None:  # the task whose failure this error is (a dependant's error is its upstream's)
        if isinstance(exc, NotebookFailed):
            return exc.task_id
        if isinstance(exc, KilledWorker):
            return task_of[exc.task].id if exc.task in task_of else None
        return None

    try:
        for fut in as_completed(list(futures.values())):
            t = task_of[fut.key]
            done.add(t.id)
            if fut.status == "finished":
                secs = fut.result()["seconds"]
                report["ran"].append(t.id)
                report["seconds"][t.id] = secs
                bar.write(f"  ran    {t.id} ({secs:.0f} s)")
            else:
                exc = fut.exception()
                src = origin(exc)
                # A dependant of a failed task never started: Dask hands it its upstream's error,
                # whatever that error was (a notebook's, a dead worker's or run_task's own).
                upstream_failed = any(futures[d].status in ("error", "cancelled") for d in t.deps if d in futures)
                if upstream_failed or (src is not None and src != t.id):
                    report["blocked"].append(t.id)
                else:
                    log = _log_path(run_dir, t)
                    report["failed"].append(t.id)
                    report["logs"][t.id] = str(log)
                    if isinstance(exc, NotebookFailed):
                        report["seconds"][t.id] = exc.seconds
                        bar.write(f"  FAILED {t.id} twice (the last attempt: exit {exc.returncode} after "
                                  f"{exc.seconds:.0f} s); log: {log}")
                    else:
                        bar.write(f"  FAILED {t.id}: {type(exc).__name__}: {exc}; log: {log}")
            bar.update(1)
            # Started (this run's stamp, written by run_task on the worker) and not finished: Dask's own
            # "processing" also counts the tasks queued on a busy worker.
            running = [p.id for p in pending if p.id not in done and _stamp(run_dir, p).get("run") == token]
            bar.set_postfix_str(", ".join(running), refresh=True)
    finally:
        # Ctrl-C or an error here: nothing more starts (a local cluster's workers are then
        # stopped, and their notebooks with them; the stamps let the next run resume).
        client.cancel([f for f in futures.values() if not f.done()])


def assemble_book(tasks: list[Task], *, root: Path, run_dir: Path) -> Path:
    """Copy this run's executed notebooks into ``book/generated/`` (replacing any earlier run's;
    a folder holding other files is refused: :func:`stealnb.core.layout.new_run_dir`), made fit to
    read by :func:`prepare_for_book`. ``run_dir`` is ``<results root>/<profile>``."""
    gen = layout.new_run_dir(root / BOOK_GENERATED, "book")
    for t in tasks:
        src = _executed_path(run_dir, t)
        if src.is_file():
            dst = gen / t.chapter / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            nb = json.loads(src.read_text())
            prepare_for_book(nb, t, results_root=Path(run_dir).parent)
            dst.write_text(json.dumps(nb))
    return gen


def prepare_for_book(nb: dict, task: Task, *, results_root: Path) -> dict:
    """Make an executed notebook (its JSON dict, changed in place and returned) read like a
    chapter: a title naming its parameters (:func:`_retitle`), paths under the results root
    written relative to it (:func:`relative_paths`: the page must not show the machine's
    folders), papermill's injected-parameters cell as one "Parameters of this run" line
    (:func:`parameters_line`), the defaults cell collapsed, and no widget state."""
    _retitle(nb, task)
    # Widget state (~10 MB for the interactive panel) cannot render in a static, offline
    # page (its JavaScript would come from a CDN); the notebooks show static figures.
    nb.get("metadata", {}).pop("widgets", None)
    relative_paths(nb, results_root)
    for i, cell in enumerate(nb.get("cells", [])):
        tags = cell.get("metadata", {}).get("tags", [])
        if "injected-parameters" in tags:
            nb["cells"][i] = parameters_line(cell)
        elif "parameters" in tags and "hide-input" not in tags:
            # The notebook's defaults (and what each parameter means), collapsed: this run's
            # values are the line below it.
            cell["metadata"]["tags"] = [*tags, "hide-input"]
    return nb


def _rewrite(text: str, roots: list[str]) -> str:
    for r in roots:
        text = text.replace(r + "/", "")
        text = re.sub(re.escape(r) + r"(?![\w.-])", ".", text)
    return text


def relative_paths(nb: dict, results_root: Path) -> dict:
    """Rewrite the results root in a notebook's outputs (streams, text and HTML results,
    tracebacks) so paths under it read relative to it: ``/home/me/stealnb/results/ci/secrets/x``
    becomes ``ci/secrets/x``. Both the path as given and its resolved form are rewritten."""
    roots = sorted({str(Path(results_root)), str(Path(results_root).resolve())}, key=len, reverse=True)
    roots = [r for r in roots if r not in ("/", ".", "")]

    def fix(value):
        if isinstance(value, str):
            return _rewrite(value, roots)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return [_rewrite(v, roots) for v in value]
        return value

    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            if "text" in out:
                out["text"] = fix(out["text"])
            for mime, value in (out.get("data") or {}).items():
                if mime.startswith("text/"):
                    out["data"][mime] = fix(value)
            if out.get("output_type") == "error":
                out["evalue"] = fix(out.get("evalue", ""))
                out["traceback"] = fix(out.get("traceback", []))
        if "injected-parameters" in cell.get("metadata", {}).get("tags", []):
            cell["source"] = fix(cell.get("source", ""))
    return nb


# Parameters every notebook takes whose value is the run's folders, not a setting of the experiment.
_PLUMBING_PARAMETERS = ("results_dir",)


def parameters_line(cell: dict) -> dict:
    """papermill's injected-parameters code cell as a markdown cell of one line, *Parameters of
    this run:* ``profile = 'ci'``, ``dataset = 'digits'``, ... (``results_dir``, the results
    root every path on the page is relative to, left out)."""
    src = "".join(cell.get("source", []))
    shown = []
    try:
        body = ast.parse(src).body
    except SyntaxError:
        body = []
    for node in body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name not in _PLUMBING_PARAMETERS:
                shown.append(f"`{name} = {ast.get_source_segment(src, node.value)}`")
    tags = cell.get("metadata", {}).get("tags", [])
    line = "*Parameters of this run:* " + (", ".join(shown) if shown else "the notebook's defaults") + "."
    out = {"cell_type": "markdown", "metadata": {"tags": list(tags)}, "source": line}
    if "id" in cell:
        out["id"] = cell["id"]
    return out


def _retitle(nb: dict, task: Task) -> None:
    """Give each executed copy a title naming its parameters (the book lists many copies of the
    same notebook): ``# Extraction`` becomes ``# Extraction: digits / cnn-tiny / kcenter``."""
    label = " / ".join(str(task.params[k]) for k in ("dataset", "arch", "strategy") if task.params.get(k))
    if not label:
        return
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "markdown":
            continue
        src = "".join(cell.get("source", []))
        if src.startswith("# "):
            first, _, rest = src.partition("\n")
            cell["source"] = f"{first}: {label}" + ("\n" + rest if rest else "")
        return


def build_book(root: Path, *, warnings_as_errors: bool = True, log: Path | None = None) -> Path:
    """``jupyter-book build`` (Sphinx, HTML) of ``root``; returns the path of ``index.html``."""
    exe = Path(sys.executable).parent / "jupyter-book"
    cmd = [str(exe) if exe.exists() else "jupyter-book", "build", str(root), "--builder", "html"]
    if warnings_as_errors:
        cmd += ["-W", "-n", "--keep-going"]
    res = subprocess.run(cmd, cwd=root, env=_kernel_env(), capture_output=True, text=True)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(res.stdout + "\n" + res.stderr)
    if res.returncode != 0:
        tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-30:])
        raise RuntimeError(f"jupyter-book build failed (exit {res.returncode}):\n{tail}")
    return root / "_build" / "html" / "index.html"


def run(profile: Profile, *, results=None, data_root=None, jobs: int = 1, force: bool = False,
        book: bool = True, only: str | None = None, progress: bool = True, root=None,
        optional: bool = False, scheduler: str | None = None) -> dict:
    """Execute ``profile``'s grid and build the book; returns the execution report (+ ``book``).

    ``root`` is the project folder (``_config.yml``, ``_toc.yml``, ``book/``, ``notebooks/``);
    default: the source checkout this package is installed from. ``scheduler``: a running Dask
    scheduler's address (default ``$DASK_SCHEDULER_ADDRESS``, else a local cluster of ``jobs``
    workers; :mod:`stealnb.report.cluster`)."""
    scheduler = cluster.scheduler_address(scheduler)  # a malformed address: before any work
    if jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {jobs}")
    root = project_root() if root is None else Path(root).resolve()
    prof = check_profile(profile)
    results = layout.results_root(results)
    run_dir = layout.profile_dir(results, prof.name)
    tasks = plan(prof, results, data_root, optional)
    assign_keys(tasks, prof, root / "notebooks")
    selected = tasks
    if only:
        keep = {t.id for t in tasks if only in t.id}
        if not keep:
            raise ValueError(f"--only {only!r} matches no task; tasks are: {', '.join(t.id for t in tasks)}")
        # A selected task needs its dependencies too.
        by_id = {t.id: t for t in tasks}
        stack = list(keep)
        while stack:
            for d in by_id[stack.pop()].deps:
                if d not in keep:
                    keep.add(d)
                    stack.append(d)
        selected = [t for t in tasks if t.id in keep]
    if book:
        if only:
            raise ValueError("--only runs part of the grid; build the book from a full run "
                             "(drop --only or add --no-book)")
        layout.check_run_dir(root / BOOK_GENERATED, "book")
    if warning := disk_warning(prof, results):
        print(warning, file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    report = execute(selected, root=root, run_dir=run_dir, jobs=jobs, force=force, progress=progress,
                     scheduler=scheduler)
    report["notebook_seconds"] = round(time.perf_counter() - t0, 1)
    report["book"] = None
    if book and not report["failed"] and not report["blocked"]:
        assemble_book(tasks, root=root, run_dir=run_dir)
        t1 = time.perf_counter()
        report["book"] = str(build_book(root, log=run_dir / "logs" / "book.log"))
        report["book_seconds"] = round(time.perf_counter() - t1, 1)
    report["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    (run_dir / "pipeline.json").write_text(json.dumps(report, indent=2))
    return report


def disk_warning(prof: Profile, results, free: int | None = None) -> str | None:
    """One line when the filesystem of ``results`` has less free space (``free`` bytes; default:
    what it has now) than a full run of ``prof`` filled (:attr:`~stealnb.core.profiles.Profile.disk_gb`),
    else ``None``. A warning, not a refusal: a run that resumes needs less, and the need was measured once."""
    if not prof.disk_gb:
        return None
    where = Path(results).resolve()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free if free is None else free
    if free >= prof.disk_gb * 1e9:
        return None
    return (f"stealnb run: warning: {free / 1e9:.1f} GB free under {where}, and a full {prof.name} run filled "
            f"{prof.disk_gb:g} GB (Profile.disk_gb); if the disk fills the run stops: free space and rerun "
            f"the same command to resume (nothing paid is lost)")


def _cmd_run(args) -> int:
    rep = run(get_profile(args.profile), results=args.results, data_root=args.data_root, jobs=args.jobs, force=args.force,
              book=not args.no_book, only=args.only, progress=not args.quiet, optional=args.with_optional,
              scheduler=args.scheduler)
    print(f"{len(rep['ran'])} task(s) run, {len(rep['skipped'])} unchanged and skipped, "
          f"{len(rep['failed'])} failed, {len(rep['blocked'])} blocked; {rep['seconds']['total']:.0f} s")
    if rep["failed"] or rep["blocked"]:
        for t in rep["failed"]:
            print(f"  failed: {t} (log: {rep['logs'].get(t)})")
        for t in rep["blocked"]:
            print(f"  blocked (a dependency failed): {t}")
        return 1
    if rep["book"]:
        print(f"book: {rep['book']}")
    return 0


def register_cli(subparsers) -> None:
    r = subparsers.add_parser("run", help="execute a profile's notebook grid with papermill, then build the book")
    r.add_argument("--profile", default="demo", choices=list(PROFILES), metavar="PROFILE",
                   help="one of %(choices)s (default: %(default)s)")
    r.add_argument("--results", type=Path, default=None,
                   help="results root (default: $STEALNB_RESULTS, else the project's results/)")
    r.add_argument("--jobs", type=int, default=1,
                   help="worker processes of the local Dask cluster: notebooks executed in parallel "
                        "(ignored with --scheduler)")
    r.add_argument("--scheduler", default=None, metavar="tcp://HOST:PORT",
                   help=f"run the notebooks on the Dask cluster of this scheduler (default: "
                        f"${cluster.SCHEDULER_ENV}, else a local cluster of --jobs workers)")
    r.add_argument("--force", action="store_true", help="rerun every notebook, even unchanged ones")
    r.add_argument("--no-book", action="store_true", help="execute the notebooks only")
    r.add_argument("--only", default=None, help="run only tasks whose id contains this text (and their dependencies)")
    r.add_argument("--with-optional", action="store_true",
                   help="add the profile's optional secrets whose data is present (demo: Fashion-MNIST, "
                        "about 35 more minutes on 2 cores)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=_cmd_run)

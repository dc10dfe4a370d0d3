"""stealnb.report.pipeline: the grid, the keys that decide what reruns, and the Dask engine (on tiny notebooks)."""
import json
import shutil
from dataclasses import replace
from pathlib import Path

import nbformat
import pytest

from helpers import tiny_notebook
from stealnb.core import data, layout, train
from stealnb.core._checks import UsageError
from stealnb.experiments import pools
from stealnb.extraction import loop
from stealnb.report import cluster, pipeline
from stealnb.core.profiles import PROFILES


@pytest.fixture(scope="module")
def scheduler():
    """One 2-worker Dask cluster for the tests that run several grids (a local cluster per
    ``execute`` call costs two worker start-ups each; that path has its own tests)."""
    with cluster.local_cluster(2) as c:
        yield c.scheduler_address


def test_plan_covers_the_grid_in_dependency_order(tmp_path):
    prof = PROFILES["ci"]
    tasks = pipeline.plan(prof, tmp_path)
    ids = [t.id for t in tasks]
    assert len(ids) == len(set(ids))
    ds, arch = prof.secrets[0]
    for strat in prof.strategies:
        assert f"extraction/{ds}-{arch}-{strat}" in ids
    for prefix in ("eda/", "secret/", "copycat/", "defenses/", "interactive/", "pools/"):
        assert any(i.startswith(prefix) for i in ids), prefix
    assert ids[-1] == "results/results"
    seen = set()
    for t in tasks:  # every dependency comes earlier
        assert set(t.deps) <= seen, t.id
        seen.add(t.id)
    ex = next(t for t in tasks if t.chapter == "extraction")
    assert ex.params["profile"] == "ci" and ex.params["results_dir"] == str(tmp_path.resolve())
    assert ex.params["seeds"] == list(prof.seeds)
    assert ex.outputs == {}  # the seeds' runs/ tasks own the results; the notebook reads them back
    for t in tasks:  # every notebook the plan names exists
        if t.is_notebook:
            assert (layout.project_root() / "notebooks" / t.notebook).is_file(), t.notebook


def test_every_extraction_and_copycat_seed_is_a_task_of_its_own_before_its_chapter(tmp_path):
    prof = PROFILES["demo"]
    tasks = {t.id: t for t in pipeline.plan(prof, tmp_path)}
    res = tmp_path.resolve()
    ds, arch = prof.secrets[0]
    for strat in prof.strategies:
        seeds = [f"runs/extraction-{ds}-{arch}-{strat}-seed{s}" for s in prof.seeds]
        assert set(seeds) <= set(tasks[f"extraction/{ds}-{arch}-{strat}"].deps)
        for s, tid in zip(prof.seeds, seeds):
            t = tasks[tid]
            assert t.run == "extraction" and not t.is_notebook and t.params["seed"] == s and t.params["strategy"] == strat
            assert t.deps == [f"secret/{ds}-{arch}"]  # the seeds of one strategy can run side by side
            assert t.outputs == {layout.extraction_dir(res, "demo", ds, arch, strat, s): "extraction"}
    seeds = [tasks[f"runs/copycat-{ds}-{arch}-seed{s}"] for s in prof.seeds]
    assert {t.id for t in seeds} <= set(tasks[f"copycat/{ds}-{arch}"].deps)
    assert all(t.run == "copycat" and len(t.outputs) == 3 for t in seeds)
    assert len(prof.seeds) == 3
    assert sum(t.run in ("extraction", "copycat") for t in tasks.values()) == 3 * (len(prof.strategies) + 1)


def test_a_presentation_change_reruns_the_notebooks_but_not_the_seeds_runs(tmp_path, monkeypatch):
    prof = PROFILES["ci"]
    nbs = layout.project_root() / "notebooks"

    def keys():
        tasks = pipeline.plan(prof, tmp_path)
        pipeline.assign_keys(tasks, prof, nbs)
        return {t.id: (t.key, t.results_key, t.is_notebook) for t in tasks}

    before = keys()
    real = pipeline.package_hash
    monkeypatch.setattr(pipeline, "package_hash", lambda presentation=False: real(presentation) + ("p" if presentation else ""))
    after = keys()
    assert all(after[i][1] == before[i][1] for i in before)  # results keys: unchanged
    assert all((after[i][0] != before[i][0]) == before[i][2] for i in before)  # only the notebooks rerun


def test_each_pool_study_run_is_a_task_and_only_the_best_entry_waits_for_the_extraction_runs(tmp_path):
    prof = PROFILES["ci"]
    tasks = {t.id: t for t in pipeline.plan(prof, tmp_path)}
    ds, arch = prof.secrets[0]
    study = prof.pool_study
    specs = pools.pool_specs(prof, ds)[0]
    assert study.strategies == ("random", "best") and len(study.seeds) >= 1
    root = tmp_path.resolve()
    # every seed of every strategy best_strategy compares (random is never "best"); not the notebooks
    best_from = {f"runs/extraction-{ds}-{arch}-{s}-seed{seed}" for s in prof.strategies if s != "random"
                 for seed in prof.seeds}
    runs = []
    for spec in specs:
        for seed in study.seeds:
            random = tasks[f"runs/pool-{ds}-{arch}-{spec}-random-seed{seed}"]
            best = tasks[f"runs/pool-{ds}-{arch}-{spec}-best-seed{seed}"]
            runs += [random, best]
            assert random.run == best.run == "pool"
            assert random.params["pool"] == best.params["pool"] == spec
            assert (random.params["strategy"], best.params["strategy"]) == ("random", "best")
            assert random.params["seed"] == best.params["seed"] == seed
            assert random.deps == [f"secret/{ds}-{arch}"]  # the baseline starts once the secret is trained
            assert set(best.deps) == {f"secret/{ds}-{arch}", *best_from}
            # one run's folder each; the best entry owns every candidate's (which one is best is known only then)
            assert random.outputs == {layout.pool_run_dir(root, "ci", ds, arch, spec, "random", seed): "extraction"}
            assert set(best.outputs) == {layout.pool_run_dir(root, "ci", ds, arch, spec, s, seed)
                                         for s in (*prof.best_strategy_candidates, study.fallback_strategy)}
    assert all(d in tasks for t in runs for d in t.deps)
    owned = [o for t in tasks.values() for o in t.outputs]
    assert len(owned) == len(set(owned))  # no two tasks replace the same folder
    # the chapter reads back what its runs' tasks trained, and owns no folder
    t = tasks[f"pools/{ds}-{arch}"]
    assert t.notebook == "08_pools.ipynb" and t.params["dataset"] == ds and t.outputs == {}
    assert t.deps == [f"secret/{ds}-{arch}", *(r.id for r in runs)]
    # a strategy the study names is that entry's run, even when it is also the best
    named = prof.with_(pool_study=replace(study, strategies=("random", "kcenter", "best")))
    named_tasks = {t.id: t for t in pipeline.plan(named, tmp_path)}
    kc = named_tasks[f"runs/pool-{ds}-{arch}-{specs[0]}-kcenter-seed0"]
    nb = named_tasks[f"runs/pool-{ds}-{arch}-{specs[0]}-best-seed0"]
    assert kc.deps == [f"secret/{ds}-{arch}"] and kc.outputs == {
        layout.pool_run_dir(root, "ci", ds, arch, specs[0], "kcenter", 0): "extraction"}
    assert layout.pool_run_dir(root, "ci", ds, arch, specs[0], "kcenter", 0) not in nb.outputs
    owned = [o for t in named_tasks.values() for o in t.outputs]
    assert len(owned) == len(set(owned))


def test_a_strategy_the_study_names_keeps_its_row_when_it_is_also_the_best(tmp_path):
    prof = PROFILES["ci"]
    study = prof.pool_study
    ds, arch = prof.secrets[0]
    top = str(prof.budgets[-1])
    for strat, agreement in (("kcenter", 0.9), ("uncertainty", 0.5)):  # kcenter is the best
        if strat not in prof.strategies:
            continue
        for seed in prof.seeds:
            out = layout.extraction_dir(tmp_path, prof.name, ds, arch, strat, seed)
            out.mkdir(parents=True)
            (out / "summary.json").write_text(json.dumps({"budgets": {top: {"agreement": agreement}}}))
    assert pools.best_strategy(prof, ds, arch, tmp_path)[0] == "kcenter"
    rows = pools.study_strategies(prof.with_(pool_study=replace(study, strategies=("random", "best", "kcenter"))),
                                  ds, arch, tmp_path)
    assert [(r["strategy"], r["as"]) for r in rows] == [("random", "random"), ("kcenter", "kcenter")]
    assert "also the best strategy" in rows[1]["reason"]
    rows = pools.study_strategies(prof, ds, arch, tmp_path)  # the default ("random", "best")
    assert [(r["strategy"], r["as"]) for r in rows] == [("random", "random"), ("kcenter", "best")]


@pytest.mark.timeout(600)
def test_each_pool_task_trains_its_runs_and_the_chapter_reads_them_back_paying_nothing(secret_dir, tmp_path,
                                                                                      monkeypatch):
    """What a runs/pool task calls trains; the notebook's run_pools afterwards pays and trains nothing."""
    prof = PROFILES["ci"].with_(seed_size=40, val_size=20, substitute_epochs=2, patience=None,
                                pool_study=replace(PROFILES["ci"].pool_study, pools=("natural-patches+gray", "uniform-noise"),
                                                   cross_domain=(), budgets=(60,), seeds=(0,), round_size=30,
                                                   pool_size=300, strategies=("random",)))
    shutil.copytree(secret_dir, layout.secret_dir(tmp_path, prof.name, "digits", "cnn-tiny"))
    for spec in prof.pool_study.pools:  # as the plan's tasks call it: one pool, strategy entry and seed each
        for entry in prof.pool_study.strategies:
            pools.run_pool(prof, "digits", "cnn-tiny", spec, strategy=entry, seed=0, results=tmp_path)
    ledgers = {p: p.read_bytes() for p in tmp_path.rglob("ledger.bin")}
    assert len(ledgers) == 2 and all(ledgers.values())
    fits = []
    monkeypatch.setattr(loop, "fit", lambda *a, **k: fits.append(1) or real_fit(*a, **k))
    real_fit = train.fit
    cmp = pools.run_pools(prof, secrets=[("digits", "cnn-tiny")], results=tmp_path)
    assert fits == [] and {p: p.read_bytes() for p in tmp_path.rglob("ledger.bin")} == ledgers
    assert (cmp.runs.oracle_spent == 60).all() and len(cmp.runs) == 2
    with pytest.raises(UsageError, match="not a pool of the study"):
        pools.run_pool(prof, "digits", "cnn-tiny", "dead-leaves", results=tmp_path)
    with pytest.raises(UsageError, match="not a strategy of the pool study"):
        pools.run_pool(prof, "digits", "cnn-tiny", "uniform-noise", strategy="kcenter", results=tmp_path)
    with pytest.raises(UsageError, match="not a seed of the pool study"):
        pools.run_pool(prof, "digits", "cnn-tiny", "uniform-noise", seed=1, results=tmp_path)


def test_installing_a_dataset_adds_a_pool_task_and_reruns_the_pool_chapter_and_nothing_else(tmp_path, monkeypatch):
    # the pool chapter tries every installed cross-domain dataset (stealnb.experiments.pools.pool_specs)
    prof = PROFILES["demo"]
    keys = {}
    for installed in (set(), {"fashion-mnist"}):
        monkeypatch.setattr(data, "present", lambda root=None, s=installed: set(s))
        tasks = pipeline.plan(prof, tmp_path, optional=False)
        pipeline.assign_keys(tasks, prof, layout.project_root() / "notebooks")
        keys[frozenset(installed)] = {t.id: t.results_key for t in tasks}
    before, after = keys.values()
    ds, arch = prof.secrets[0]
    assert set(after) - set(before) == {f"runs/pool-{ds}-{arch}-fashion-mnist-{entry}-seed{seed}"
                                        for entry in prof.pool_study.strategies for seed in prof.pool_study.seeds}
    changed = {i for i in before if before[i] != after[i]}
    assert changed == {f"pools/{ds}-{arch}", "results/results"}, changed


def test_editing_the_extraction_chapter_keeps_the_results_of_the_chapters_that_read_its_runs(tmp_path):
    # the pool study and the defences read the runs/ tasks' files, not notebook 03: a new figure
    # there re-executes notebook 03 (and the results chapter), but discards no one's results
    prof = PROFILES["demo"]
    edited = tmp_path / "notebooks"
    shutil.copytree(layout.project_root() / "notebooks", edited)
    nb = json.loads((edited / "03_extraction.ipynb").read_text())
    nb["cells"].append({"cell_type": "code", "metadata": {}, "source": ["print('a new figure')"],
                        "outputs": [], "execution_count": None})
    (edited / "03_extraction.ipynb").write_text(json.dumps(nb))
    keys = []
    for nbdir in (layout.project_root() / "notebooks", edited):
        tasks = pipeline.plan(prof, tmp_path / "results")
        pipeline.assign_keys(tasks, prof, nbdir)
        keys.append({t.id: t.results_key for t in tasks})
    before, after = keys
    changed = {i for i in before if before[i] != after[i]}
    assert changed == {*(f"extraction/{d}-{a}-{s}" for d, a in prof.secrets for s in prof.strategies),
                       "results/results"}


def test_optional_secret_joins_only_when_its_data_is_present(tmp_path, monkeypatch):
    prof = PROFILES["demo"]
    assert prof.optional_secrets
    monkeypatch.setattr(data, "present", lambda root=None: set())
    assert pipeline.secrets_of(prof) == list(prof.secrets)
    monkeypatch.setattr(data, "present", lambda root=None: {d for d, _ in prof.optional_secrets})
    assert pipeline.secrets_of(prof) == list(prof.secrets) + list(prof.optional_secrets)
    assert pipeline.secrets_of(prof, optional=False) == list(prof.secrets)
    ids = [t.id for t in pipeline.plan(prof, tmp_path, optional=True)]
    ds, arch = prof.optional_secrets[0]
    assert f"secret/{ds}-{arch}" in ids and f"eda/{ds}" in ids
    assert f"secret/{ds}-{arch}" not in [t.id for t in pipeline.plan(prof, tmp_path)]




@pytest.fixture
def tiny(tmp_path):
    root = tmp_path / "proj"
    nbs = root / "notebooks"
    # "a" writes a file into its output folder (counting its executions), "b" reads it, "bad" fails.
    tiny_notebook(nbs / "a.ipynb", "import pathlib\np = pathlib.Path(out); p.mkdir(parents=True, exist_ok=True)\n"
                               "f = p / 'runs.txt'\nf.write_text(f.read_text() + 'x' if f.exists() else 'x')\n"
                               "print('a ran with x =', x)")
    tiny_notebook(nbs / "b.ipynb", "import pathlib\nassert pathlib.Path(out, 'runs.txt').exists()")
    tiny_notebook(nbs / "bad.ipynb", "raise RuntimeError('boom')")
    out_a = tmp_path / "res" / "a"

    def tasks(x=1):
        ts = [pipeline.Task("one/a", "a.ipynb", {"x": x, "out": str(out_a)}, outputs={out_a: {"runs.txt": None}}),
              pipeline.Task("two/b", "b.ipynb", {"out": str(out_a)}, deps=["one/a"]),
              pipeline.Task("three/bad", "bad.ipynb", {}),
              pipeline.Task("four/after-bad", "b.ipynb", {"out": str(out_a)}, deps=["three/bad"])]
        pipeline.assign_keys(ts, PROFILES["ci"], nbs)
        return ts

    return root, tmp_path / "run", out_a, tasks


@pytest.mark.timeout(900)  # four grids of tiny notebooks (the failing one tried twice each): slow on a loaded runner
def test_execute_runs_in_order_skips_unchanged_and_blocks_dependants_of_failures(tiny, scheduler):
    root, run_dir, out_a, tasks = tiny
    rep = pipeline.execute(tasks(), root=root, run_dir=run_dir, scheduler=scheduler, progress=False)
    assert rep["ran"] == ["one/a", "two/b"] or set(rep["ran"]) == {"one/a", "two/b"}
    assert rep["failed"] == ["three/bad"] and rep["blocked"] == ["four/after-bad"]
    assert (out_a / "runs.txt").read_text() == "x"
    executed = nbformat.read(run_dir / "notebooks" / "one" / "a.ipynb", as_version=4)
    assert any("a ran with x = 1" in o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    assert "boom" in (run_dir / "logs" / "three__bad.log").read_text()

    # Unchanged: nothing reruns (the failed task is retried, and fails again).
    rep = pipeline.execute(tasks(), root=root, run_dir=run_dir, scheduler=scheduler, progress=False)
    assert set(rep["skipped"]) == {"one/a", "two/b"} and rep["ran"] == []
    assert (out_a / "runs.txt").read_text() == "x"

    # A changed parameter changes a's key and its dependant's: both rerun, a's old results are
    # deleted first (runs.txt starts again from one run).
    rep = pipeline.execute(tasks(x=2), root=root, run_dir=run_dir, scheduler=scheduler, progress=False)
    assert set(rep["ran"]) == {"one/a", "two/b"}
    assert (out_a / "runs.txt").read_text() == "x"

    # --force reruns what is current.
    rep = pipeline.execute(tasks(x=2), root=root, run_dir=run_dir, scheduler=scheduler, force=True, progress=False)
    assert set(rep["ran"]) == {"one/a", "two/b"}


def test_run_refuses_to_clear_a_task_folder_holding_user_files_before_running_anything(tiny):
    from stealnb.core._checks import UsageError

    root, run_dir, out_a, tasks = tiny
    out_a.mkdir(parents=True)
    (out_a / "runs.txt").write_text("x")
    (out_a / "important.txt").write_text("the only copy")
    with pytest.raises(UsageError, match=r"did not write \(important.txt\)") as err:
        pipeline.execute(tasks(), root=root, run_dir=run_dir, progress=False)
    assert str(err.value).startswith(f"refusing to replace {out_a}: ")
    assert (out_a / "important.txt").read_text() == "the only copy" and (out_a / "runs.txt").exists()
    assert not (run_dir / "notebooks").exists()  # no notebook started


def test_the_books_generated_folder_is_replaced_only_when_it_holds_executed_notebooks(tmp_path):
    from stealnb.core._checks import UsageError

    gen = tmp_path / pipeline.BOOK_GENERATED
    (gen / "secret").mkdir(parents=True)
    (gen / "secret" / "old.ipynb").write_text("{}")
    (gen / "draft.md").write_text("my chapter")
    with pytest.raises(UsageError, match=r"did not write \(draft.md\)"):
        pipeline.assemble_book([], root=tmp_path, run_dir=tmp_path / "run")
    assert (gen / "draft.md").read_text() == "my chapter" and (gen / "secret" / "old.ipynb").exists()
    (gen / "draft.md").unlink()
    assert pipeline.assemble_book([], root=tmp_path, run_dir=tmp_path / "run") == gen
    assert not (gen / "secret").exists()


def _executed_notebook(results_root: Path) -> dict:
    """An executed notebook as papermill leaves it: defaults cell, injected cell, outputs naming
    folders under the results root."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# 03 · Extraction\nText."),
        nbformat.v4.new_code_cell("profile: str = 'ci'  # the profile", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(f'# Parameters\nprofile = "ci"\nresults_dir = "{results_root}"\nseeds = [0, 1]\n',
                                  metadata={"tags": ["injected-parameters"]}),
        nbformat.v4.new_code_cell("run()", metadata={"tags": ["hide-input"]}, outputs=[
            nbformat.v4.new_output("stream", name="stdout",
                                   text=f"secret -> {results_root}/ci/secrets/digits-cnn-tiny\n{results_root}2/other\n"),
            nbformat.v4.new_output("execute_result", data={"text/plain": f"'{results_root}/ci'",
                                                           "text/html": f"<td>{results_root}/ci/x</td>"}),
            nbformat.v4.new_output("error", ename="OSError", evalue=f"no file {results_root}/ci/a.json",
                                   traceback=[f"OSError: no file {results_root}/ci/a.json"]),
        ]),
    ]
    return json.loads(nbformat.writes(nb))


def test_the_books_copy_shows_paths_relative_to_the_results_root(tmp_path):
    root = tmp_path / "results"
    task = pipeline.Task("extraction/digits-cnn-tiny-kcenter", "03_extraction.ipynb",
                         {"dataset": "digits", "arch": "cnn-tiny", "strategy": "kcenter"})
    nb = pipeline.prepare_for_book(_executed_notebook(root), task, results_root=root)
    out = nb["cells"][3]["outputs"]
    text = lambda v: "".join(v)  # noqa: E731 (nbformat stores multi-line text as a list of lines)
    assert text(out[0]["text"]) == f"secret -> ci/secrets/digits-cnn-tiny\n{root}2/other\n"  # another folder: as it was
    assert {k: text(v) for k, v in out[1]["data"].items()} == {"text/plain": "'ci'", "text/html": "<td>ci/x</td>"}
    assert out[2]["evalue"] == "no file ci/a.json" and out[2]["traceback"] == ["OSError: no file ci/a.json"]
    assert f"{root}/" not in json.dumps(nb)


def test_the_books_copy_shows_the_injected_parameters_as_one_line_and_collapses_the_defaults(tmp_path):
    root = tmp_path / "results"
    task = pipeline.Task("extraction/digits-cnn-tiny-kcenter", "03_extraction.ipynb",
                         {"dataset": "digits", "arch": "cnn-tiny", "strategy": "kcenter"})
    nb = pipeline.prepare_for_book(_executed_notebook(root), task, results_root=root)
    title, defaults, injected, run = nb["cells"]
    assert title["source"].startswith("# 03 · Extraction: digits / cnn-tiny / kcenter\n")
    assert injected["cell_type"] == "markdown" and "outputs" not in injected
    assert injected["source"] == '*Parameters of this run:* `profile = "ci"`, `seeds = [0, 1]`.'
    assert defaults["metadata"]["tags"] == ["parameters", "hide-input"]
    assert run["metadata"]["tags"] == ["hide-input"] and len(run["outputs"]) == 3  # collapsed, outputs kept
    nbformat.validate(nbformat.reads(json.dumps(nb), as_version=4))  # still a valid notebook for the book


def test_key_follows_notebook_code_params_and_dependencies(tiny):
    root, run_dir, out_a, tasks = tiny
    k1 = {t.id: t.key for t in tasks()}
    assert {t.id: t.key for t in tasks()} == k1
    k2 = {t.id: t.key for t in tasks(x=3)}
    assert k2["one/a"] != k1["one/a"] and k2["two/b"] != k1["two/b"] and k2["three/bad"] == k1["three/bad"]
    nb = root / "notebooks" / "bad.ipynb"
    tiny_notebook(nb, "raise RuntimeError('boom!')")
    assert {t.id: t.key for t in tasks()}["three/bad"] != k1["three/bad"]


def test_only_unknown_pattern_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="matches no task"):
        pipeline.run(PROFILES["ci"], results=tmp_path, only="no-such-task", book=False, progress=False)


def test_cli_has_run_command():
    from stealnb.cli import build_parser

    args = build_parser().parse_args(["run", "--profile", "ci", "--jobs", "2", "--no-book"])
    assert args.profile == "ci" and args.jobs == 2 and args.no_book and args.func is pipeline._cmd_run
    assert args.scheduler is None
    args = build_parser().parse_args(["run", "--profile", "paper-smoke", "--scheduler", "tcp://gpu-box:8786"])
    assert args.profile == "paper-smoke" and args.scheduler == "tcp://gpu-box:8786"


def test_paper_smoke_is_the_paper_grid_with_the_least_training(tmp_path):
    paper, smoke = PROFILES["paper"], PROFILES["paper-smoke"]
    for f in ("secrets", "strategies", "substitute", "pool", "pool_transform", "seeds", "gpu", "fgsm_eps"):
        assert getattr(smoke, f) == getattr(paper, f), f
    assert (smoke.folds, smoke.epochs, smoke.substitute_epochs) == (2, 1, 1)  # cross-validation needs 2 folds
    assert smoke.budgets[-1] < smoke.pool_size < paper.pool_size
    ids = lambda prof: [t.id for t in pipeline.plan(prof, tmp_path)]  # noqa: E731
    # every notebook of the paper grid: 3 EDA, per secret (15) one secret, 5 extraction, Copycat and
    # pool notebooks (8 x 15 = 120), the defences, the interactive panel and the results; per
    # secret and seed one runs/ task for each strategy and one for Copycat; per secret one runs/
    # task for each pool of its study, strategy entry and seed
    assert ids(smoke) == ids(paper)
    tasks = pipeline.plan(paper, tmp_path)
    assert sum(t.is_notebook for t in tasks) == 3 + 8 * 15 + 3
    n_pools = sum(len(pools.pool_specs(paper, ds)[0]) for ds, _ in paper.secrets)
    assert n_pools >= 15 * len(paper.pool_study.pools)
    per_pool = len(paper.pool_study.strategies) * len(paper.pool_study.seeds)
    assert sum(not t.is_notebook for t in tasks) == 15 * (5 + 1) * len(paper.seeds) + n_pools * per_pool


def test_only_paper_smoke_skips_the_checks_that_models_learnt():
    # its fixture images are noise and it trains one epoch: the secrets' and the defences' models
    # learn nothing there, so their notebooks skip those checks; every other profile keeps them
    for name, prof in PROFILES.items():
        assert prof.learns == (name != "paper-smoke"), name
        assert prof.secret_over_chance >= 2, name  # the threshold stays; paper-smoke skips the check


@pytest.mark.timeout(600)  # three grids of two tiny notebooks
def test_presentation_change_reruns_notebook_but_keeps_results(tiny, monkeypatch, scheduler):
    root, run_dir, out_a, tasks = tiny
    pipeline.execute(tasks()[:2], root=root, run_dir=run_dir, scheduler=scheduler, progress=False)
    assert (out_a / "runs.txt").read_text() == "x"
    real = pipeline.package_hash
    monkeypatch.setattr(pipeline, "package_hash", lambda presentation=False: real(presentation) + ("p" if presentation else ""))
    ts = tasks()[:2]
    rep = pipeline.execute(ts, root=root, run_dir=run_dir, scheduler=scheduler, progress=False)
    assert set(rep["ran"]) == {"one/a", "two/b"}
    assert (out_a / "runs.txt").read_text() == "xx"  # re-executed on the kept results
    monkeypatch.setattr(pipeline, "package_hash", lambda presentation=False: real(presentation) + "c")
    rep = pipeline.execute(tasks()[:2], root=root, run_dir=run_dir, scheduler=scheduler, progress=False)
    assert (out_a / "runs.txt").read_text() == "x"  # compute code changed: results recomputed


def test_interrupted_task_keeps_partial_results_for_resume(tiny, scheduler):
    root, run_dir, out_a, tasks = tiny
    ts = tasks()[:1]
    # Simulate a run that died mid-notebook: stamp written at start, partial output present.
    stamp = run_dir / "stamps" / "one__a.json"
    stamp.parent.mkdir(parents=True)
    stamp.write_text(json.dumps({"key": None, "results_key": ts[0].results_key, "started": 0}))
    out_a.mkdir(parents=True)
    (out_a / "runs.txt").write_text("partial:")
    rep = pipeline.execute(ts, root=root, run_dir=run_dir, scheduler=scheduler, progress=False)
    assert rep["ran"] == ["one/a"]
    assert (out_a / "runs.txt").read_text() == "partial:x"


def test_defenses_wait_only_for_the_attacks_they_use(tmp_path):
    prof = PROFILES["demo"]
    tasks = {t.id: t for t in pipeline.plan(prof, tmp_path)}
    ds, arch = prof.secrets[0]
    d = tasks[f"defenses/{ds}-{arch}"]
    assert d.params["attacks"] == ["random", "kcenter", "dfal", "copycat"]
    assert d.params["prada_only"] == ["uncertainty"]
    # the runs of the first seed that it reads back, not the chapter notebooks that narrate them
    seed = prof.seeds[0]
    assert d.params["seed"] == seed
    assert set(d.deps) == {f"secret/{ds}-{arch}", f"runs/copycat-{ds}-{arch}-seed{seed}",
                           *(f"runs/extraction-{ds}-{arch}-{s}-seed{seed}"
                             for s in ("random", "kcenter", "dfal", "uncertainty"))}
    assert all(x in tasks for x in d.deps)
    assert f"runs/extraction-{ds}-{arch}-dfal+kcenter-seed{seed}" in tasks  # run for the pool study, not waited for
    # a profile without DFAL or uncertainty: the defenses chapter neither runs them nor waits for them
    no_dfal = prof.with_(strategies=("random", "kcenter"))
    d = next(t for t in pipeline.plan(no_dfal, tmp_path) if t.chapter == "defenses")
    assert d.params["attacks"] == ["random", "kcenter", "copycat"] and d.params["prada_only"] == []
    assert not any("dfal" in x or "uncertainty" in x for x in d.deps)


def test_critical_path_prefers_long_chains_and_learns_recorded_times(tmp_path):
    run_dir = tmp_path / "run"
    prof = PROFILES["demo"]
    tasks = pipeline.plan(prof, tmp_path)
    chain = pipeline.critical_path(tasks, run_dir)
    ds, arch = prof.secrets[0]
    tag = f"{ds}-{arch}"
    # the secret heads everything; the seed-0 runs of Copycat and DFAL (which defenses wait for)
    # outrank DFAL+K-center's (which only the pool study and its chapter wait for), although that
    # one alone takes longer, and seed 0 of an attack the defences use outranks its other seeds
    assert chain[f"secret/{tag}"] == max(chain.values())
    runs = f"runs/extraction-{tag}"
    assert chain[f"runs/copycat-{tag}-seed0"] > chain[f"{runs}-dfal-seed0"] > chain[f"{runs}-dfal+kcenter-seed0"]
    assert chain[f"{runs}-random-seed0"] > chain[f"{runs}-random-seed1"]
    assert chain["results/results"] == pipeline._COST_HINT["results"]
    # a recorded run time replaces the hint
    t = next(t for t in tasks if t.id == f"{runs}-dfal+kcenter-seed0")
    stamp = pipeline._stamp_path(run_dir, t)
    stamp.parent.mkdir(parents=True)
    stamp.write_text(json.dumps({"key": "k", "results_key": "r", "seconds": 5000.0}))
    chain = pipeline.critical_path(tasks, run_dir)
    assert chain[f"pools/{tag}"] == pipeline._READ_BACK_HINT["pools"] + chain["results/results"]
    assert chain[f"runs/pool-{tag}-uniform-noise-best-seed0"] == pipeline._POOL_RUN_HINT + chain[f"pools/{tag}"]
    assert chain[t.id] == 5000.0 + chain[f"runs/pool-{tag}-uniform-noise-best-seed0"]
    assert chain[t.id] > chain[f"runs/copycat-{tag}-seed0"]


@pytest.mark.timeout(600)  # one worker, four tiny notebook runs in a row (the failing one twice)
def test_execute_starts_the_longest_chain_first(tiny):
    root, run_dir, out_a, tasks = tiny
    ts = tasks()
    bad_first = [ts[2], ts[0], ts[1]]  # "bad" is listed first, but a -> b is the longer chain
    rep = pipeline.execute(bad_first, root=root, run_dir=run_dir, jobs=1, progress=False)
    assert rep["ran"] == ["one/a", "two/b"] and rep["failed"] == ["three/bad"]
    assert list(rep["seconds"])[0] == "one/a"


def test_a_run_warns_when_the_disk_has_less_free_than_a_full_run_of_its_profile_filled(tmp_path):
    prof = PROFILES["paper-smoke"]
    w = pipeline.disk_warning(prof, tmp_path / "results" / "not-yet", free=10 * 10**9)  # the nearest existing folder
    assert w.startswith(f"stealnb run: warning: 10.0 GB free under {tmp_path.resolve()}, ") and "filled 57 GB" in w
    assert pipeline.disk_warning(prof, tmp_path, free=60 * 10**9) is None
    assert pipeline.disk_warning(prof.with_(disk_gb=None), tmp_path, free=0) is None  # never measured: no claim

"""End to end, on the one execution of the ci grid per test run: `stealnb run --profile ci`
executes every notebook of the grid with papermill, builds the Jupyter Book with warnings as
errors, and every page opens in headless Chromium without console errors, showing as many
rendered plotly charts as its executed notebook made, with every equation typeset by the MathJax
served from the build folder, no request leaving the machine and no TensorFlow log line in a
page (screenshots of the results page and of the methods page's equations saved under the
build folder).

That papermill run is also the notebook test: papermill stops a notebook at the first cell that
raises -- an error, or one of the assertions the notebooks end their sections with -- and
``test_notebook_runs_without_error[<task>]`` reports that cell. ``make test`` does not run nbval
on notebooks/ as well (it would execute the notebooks a second time, and 04_results needs the
whole grid); ``pytest --nbval-lax notebooks/02_secret.ipynb`` still checks one notebook by hand.

Runs in a copy of the project under tmp_path so a developer's own book and results are untouched.
Without Chromium the browser test is skipped -- a failure under CI=true (tests/strict_ci.py).
"""
import json
import re
import shutil
from pathlib import Path

import pytest

from stealnb.core import layout
from stealnb.report import bookcheck, pipeline
from stealnb.core.profiles import PROFILES

ROOT = Path(__file__).resolve().parents[1]
# The module fixture builds the whole ci grid and the book (8-10 min on 2 cores) inside the first
# test's set-up, which pytest-timeout counts: far above the default for unit tests (pyproject.toml).
pytestmark = pytest.mark.timeout(1800)
TASK_IDS = [t.id for t in pipeline.plan(PROFILES["ci"], ROOT / "results")]
RESULTS_PAGE = "book/generated/results/results.html"
METHODS_PAGE = "book/methods.html"


@pytest.fixture(scope="session")
def chromium():
    path = bookcheck.find_chromium()
    if path is None:
        pytest.skip(bookcheck.chromium_missing_reason())
    return path


@pytest.fixture(scope="module")
def built_book(tmp_path_factory):
    proj = tmp_path_factory.mktemp("book") / "proj"
    proj.mkdir()
    for f in ("_config.yml", "_toc.yml"):
        shutil.copy2(ROOT / f, proj / f)
    shutil.copytree(ROOT / "book", proj / "book", ignore=shutil.ignore_patterns("generated"))
    shutil.copytree(ROOT / "notebooks", proj / "notebooks", ignore=shutil.ignore_patterns("results", ".ipynb_checkpoints"))
    # The Benchmarks page is written from these at build time (stealnb.report.benchpage).
    shutil.copytree(ROOT / "benchmarks" / "results", proj / "benchmarks" / "results")
    report = pipeline.run(PROFILES["ci"], results=proj / "results", root=proj, jobs=2, progress=False)
    return proj, report


def _tasks(proj):
    return pipeline.plan(PROFILES["ci"], proj / "results")


def _executed(proj, task) -> Path:
    return pipeline._executed_path(layout.profile_dir(proj / "results", "ci"), task)


def cell_error(nb_path: Path) -> str:
    """The first cell of an executed notebook whose output is an error: its source and traceback."""
    if not nb_path.is_file():
        return f"no executed notebook at {nb_path}"
    nb = json.loads(nb_path.read_text())
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                tb = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(out.get("traceback", [])))
                src = "".join(cell["source"])
                return (f"cell [{cell.get('execution_count')}] raised {out.get('ename')}: {out.get('evalue')}\n"
                        f"--- cell source ---\n{src}\n--- traceback ---\n{tb[-4000:]}")
    return f"no cell error recorded in {nb_path} (the kernel may have died)"


@pytest.mark.parametrize("task_id", TASK_IDS)
def test_notebook_runs_without_error(built_book, task_id):
    proj, report = built_book
    task = next(t for t in _tasks(proj) if t.id == task_id)
    if task_id in report["failed"]:
        log = layout.profile_dir(proj / "results", "ci") / "logs" / (task_id.replace("/", "__") + ".log")
        why = cell_error(_executed(proj, task)) if task.is_notebook else f"pipeline.RUNNERS[{task.run!r}] failed"
        pytest.fail(f"{task_id} ({task.notebook or task.run}) failed: {why}\nlog: {log}", pytrace=False)
    assert task_id not in report["blocked"], f"{task_id} did not run: a task it depends on failed"
    # a runs/ task (one seed's extraction or Copycat) executes no notebook of its own
    assert task_id in report["ran"] and _executed(proj, task).is_file() == task.is_notebook, report


def test_pipeline_builds_the_book(built_book):
    proj, report = built_book
    assert report["failed"] == [] and report["blocked"] == [], report
    tasks = _tasks(proj)
    assert sorted(report["ran"]) == sorted(t.id for t in tasks)
    html = proj / "_build" / "html"
    assert Path(report["book"]) == html / "index.html"
    for t in tasks:  # one rendered page per executed notebook, none for a runs/ task
        assert (html / "book" / "generated" / t.chapter / f"{t.name}.html").is_file() == t.is_notebook, t.id


def test_no_published_page_shows_the_machine_paths_of_its_results(built_book):
    """Outputs name paths relative to the results root (pipeline.prepare_for_book and the
    notebooks): the folder of the machine that built the book appears on no page."""
    proj, _ = built_book
    html = proj / "_build" / "html"
    roots = {str(proj), str(proj.resolve())}
    hits = sorted({p.relative_to(html).as_posix() for p in (html / "book").rglob("*.html")
                   if any(r in p.read_text(errors="replace") for r in roots)})
    assert not hits, f"{len(hits)} page(s) show {proj}: {hits}"


def test_second_run_skips_everything_unchanged(built_book):
    proj, _ = built_book
    rep = pipeline.run(PROFILES["ci"], results=proj / "results", root=proj, book=False, progress=False)
    assert rep["ran"] == [] and len(rep["skipped"]) == len(_tasks(proj))


def test_every_page_opens_without_errors_and_shows_its_notebooks_plots(chromium, built_book):
    proj, report = built_book
    assert report["book"], report
    html = proj / "_build" / "html"
    # The charts each executed notebook made (papermill's copy, not the book's): every page of
    # an executed notebook must show exactly these, all drawn.
    expected = {f"book/generated/{t.chapter}/{t.name}.html": bookcheck.notebook_plots(_executed(proj, t))
                for t in _tasks(proj) if t.is_notebook}
    assert all(n > 0 for n in expected.values()), expected  # every chapter plots something
    shot = html / "screenshots" / "results.png"
    math_shot = proj / "_build" / "screenshots" / "methods.png"
    reports = bookcheck.check_book(html, screenshots={RESULTS_PAGE: shot, METHODS_PAGE: math_shot},
                                   expected_plots=expected, chromium=chromium)
    assert len(reports) >= 15
    bad = {r.page: r.errors for r in reports if r.errors}
    assert not bad, bad
    by_page = {Path(r.page).relative_to(html).as_posix(): r for r in reports}
    for page, n in expected.items():
        r = by_page[page]
        assert (r.expected_plots, r.plots, r.rendered_plots) == (n, n, n), page
    for r in reports:  # pages that are not notebooks (text chapters) draw whatever they place
        assert r.rendered_plots == r.plots, (r.page, r.plots, r.rendered_plots)
    # The methods page's equations are typeset (check_book already failed any page with TeX left
    # or a request for anything but a local file, MathJax included).
    methods = by_page[METHODS_PAGE]
    assert methods.math >= 10 and methods.rendered_math == methods.math, (methods.math, methods.rendered_math)
    assert (html / "_static" / "mathjax" / "tex-chtml.js").is_file()
    assert shot.is_file() and shot.stat().st_size > 10_000
    assert math_shot.is_file() and math_shot.stat().st_size > 10_000
    # Keep copies where a developer finds them after the temporary folder is gone.
    keep = ROOT / "_build" / "test-screenshots"
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copy2(shot, keep / "results-ci.png")
    shutil.copy2(math_shot, keep / "methods-ci.png")
    print(f"screenshot of the methods page's equations: {keep / 'methods-ci.png'} (built at {math_shot})")

"""End to end: `stealnb run --profile ci` executes the notebook grid with papermill, builds the
Jupyter Book with warnings as errors, and every page opens in headless Chromium without console
errors, with rendered plotly charts on the results page (screenshot saved under the build folder).

Runs in a copy of the project under tmp_path so a developer's own book and results are untouched.
"""
import shutil
from pathlib import Path

import pytest

from stealnb import bookcheck, pipeline

ROOT = Path(__file__).resolve().parents[1]
# The module fixture builds the whole ci grid and the book (8-10 min on 2 cores) inside the first
# test's set-up, which pytest-timeout counts: far above the default for unit tests (pyproject.toml).
pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def built_book(tmp_path_factory):
    proj = tmp_path_factory.mktemp("book") / "proj"
    proj.mkdir()
    for f in ("_config.yml", "_toc.yml"):
        shutil.copy2(ROOT / f, proj / f)
    shutil.copytree(ROOT / "book", proj / "book", ignore=shutil.ignore_patterns("generated"))
    shutil.copytree(ROOT / "notebooks", proj / "notebooks", ignore=shutil.ignore_patterns("results", ".ipynb_checkpoints"))
    report = pipeline.run("ci", results=proj / "results", root=proj, jobs=2, progress=False)
    return proj, report


def test_pipeline_runs_every_notebook_and_builds_the_book(built_book):
    proj, report = built_book
    assert report["failed"] == [] and report["blocked"] == [], report
    tasks = pipeline.plan("ci", proj / "results")
    assert sorted(report["ran"]) == sorted(t.id for t in tasks)
    html = proj / "_build" / "html"
    assert Path(report["book"]) == html / "index.html"
    for t in tasks:  # one rendered page per executed notebook
        assert (html / "book" / "generated" / t.chapter / f"{t.name}.html").is_file(), t.id


def test_second_run_skips_everything_unchanged(built_book):
    proj, _ = built_book
    rep = pipeline.run("ci", results=proj / "results", root=proj, book=False, progress=False)
    assert rep["ran"] == [] and len(rep["skipped"]) == len(pipeline.plan("ci", proj / "results"))


@pytest.mark.skipif(bookcheck.find_chromium() is None, reason="Chromium not installed (Debian: apt-get install chromium)")
def test_every_page_opens_without_errors_and_results_show_plotly(built_book):
    proj, _ = built_book
    html = proj / "_build" / "html"
    results_page = "book/generated/results/results.html"
    shot = html / "screenshots" / "results.png"
    reports = bookcheck.check_book(html, screenshots={results_page: shot})
    assert len(reports) >= 15
    bad = {r.page: r.errors for r in reports if r.errors}
    assert not bad, bad
    res = next(r for r in reports if r.page.endswith(results_page))
    assert res.plots >= 1 and res.rendered_plots == res.plots, (res.plots, res.rendered_plots)
    assert shot.is_file() and shot.stat().st_size > 10_000
    # Keep a copy where a developer finds it after the temporary folder is gone.
    keep = ROOT / "_build" / "test-screenshots" / "results-ci.png"
    keep.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(shot, keep)
    for r in reports:  # every executed notebook page with figures rendered them
        assert r.rendered_plots == r.plots, (r.page, r.plots, r.rendered_plots)

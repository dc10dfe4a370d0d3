"""Under ``CI=true`` a skipped test is a failure (pytest plugin, loaded by tests/conftest.py).

CI must not go green without the tests that need an optional dependency -- the book's browser
check (Chromium), the real Fashion-MNIST (Debian's dataset-fashion-mnist), /dev/full, or any
test added later with ``pytest.skip``/``skipif``/``importorskip``: under ``CI=true`` (set by most
CI services; ``1``/``yes`` also count) each such skip is reported as a failure that names the
missing dependency. Locally a skip stays a skip, with its reason in the ``-ra`` summary.
Expected failures (``xfail``) are left alone.
"""
from __future__ import annotations

import os

import pytest

PREFIX = "CI=true, so a skip is a failure"


def ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _reason(longrepr) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: reason")
        text = str(longrepr[2])
    else:
        text = str(getattr(longrepr, "longrepr", longrepr))
    return text.removeprefix("Skipped: ")


def _fail(rep) -> None:
    rep.outcome = "failed"
    rep.longrepr = f"{PREFIX}: {_reason(rep.longrepr)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and not hasattr(rep, "wasxfail") and ci():
        _fail(rep)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and ci():  # a module-level skip or importorskip
        _fail(rep)

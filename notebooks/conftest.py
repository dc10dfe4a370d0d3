"""nbval runs each notebook here with its `ci` defaults (results_dir="results", relative to this
folder). Start every test session from an empty notebooks/results so no notebook reuses results
computed by older code.

Timeouts: nbval's ``--nbval-cell-timeout`` (pyproject.toml) interrupts a cell that runs too long,
so it fails with its traceback. pytest-timeout's default (``timeout`` in pyproject.toml, sized for
unit tests) would otherwise end a long cell first, from outside, while its kernel kept running;
so every cell item gets that cell timeout plus a minute (nbval's interrupt and output wait) as
its pytest-timeout: a backstop for a kernel that never answers at all."""
import shutil
from pathlib import Path

import pytest
from nbval.plugin import IPyNbCell

BACKSTOP = 60  # seconds beyond nbval's cell timeout


def pytest_sessionstart(session):
    shutil.rmtree(Path(__file__).parent / "results", ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    cell_timeout = float(config.getoption("nbval_cell_timeout"))
    for item in items:
        if isinstance(item, IPyNbCell) and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(cell_timeout + BACKSTOP))

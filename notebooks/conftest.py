"""nbval runs each notebook here with its `ci` defaults (results_dir="results", relative to this
folder). Start every test session from an empty notebooks/results so no notebook reuses results
computed by older code."""
import shutil
from pathlib import Path


def pytest_sessionstart(session):
    shutil.rmtree(Path(__file__).parent / "results", ignore_errors=True)

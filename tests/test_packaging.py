"""Packaging conventions: the licence file matches pyproject.toml, CITATION.cff cites this
version, no extra installs a second TensorFlow distribution over the base one, and the README
stays a short guide."""
import re
import tomllib
from pathlib import Path

import pytest

import stealnb

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_license_file_is_the_one_pyproject_names():
    assert PYPROJECT["license"] == "MIT" and PYPROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n") and "Copyright (c) 2026 the stealnb authors" in text


def test_citation_cites_this_version_and_the_two_theses():
    yaml = pytest.importorskip("yaml")
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software" and cff["title"] == "stealnb"
    assert cff["version"] == stealnb.__version__ and cff["license"] == PYPROJECT["license"]
    assert [(r["type"], r["year"]) for r in cff["references"]] == [("thesis", 2021), ("thesis", 2023)]


def test_one_tensorflow_distribution_with_or_without_the_gpu_extra():
    requirements = pytest.importorskip("packaging.requirements")
    names = lambda reqs: {requirements.Requirement(r).name for r in reqs}  # noqa: E731
    tensorflow = {"tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-intel", "tensorflow-macos"}
    base = names(PYPROJECT["dependencies"]) & tensorflow
    assert base == {"tensorflow"}
    for extra, reqs in PYPROJECT["optional-dependencies"].items():
        assert names(reqs) & tensorflow <= base, f"the {extra!r} extra adds another TensorFlow distribution"


def test_the_readme_is_a_short_guide_with_the_two_commands():
    """Results, per-seed findings and timing histories live in the book (the results chapter,
    the Benchmarks page computed from benchmarks/results/); the README guides."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 150
    assert "make demo" in readme and "make test" in readme
    assert "make lab" in readme and "$STEALNB_RESULTS" in readme
    assert not re.search(r"\b(?:commit|clone of) [0-9a-f]{7,40}\b", readme), "no commit hashes in the README"
    assert not re.search(r"\b\d+ min \d+ s\b", readme), "no session timings in the README"

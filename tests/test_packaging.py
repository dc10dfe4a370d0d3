"""Packaging conventions: the licence file matches pyproject.toml, CITATION.cff cites this
version, and no extra installs a second TensorFlow distribution over the base one."""
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

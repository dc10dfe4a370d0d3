"""Notebooks are committed with outputs stripped, and each has one `parameters` cell whose
defaults are the fast `ci` profile (so nbval and papermill run them as documented)."""
import ast
import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 7, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_stripped(path):
    nb = json.loads(path.read_text())
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        assert cell.get("outputs") == [], f"{path.name} cell {i} has outputs; strip them before committing"
        assert cell.get("execution_count") is None, f"{path.name} cell {i} has an execution count"
    for key in ("widgets", "papermill"):
        assert key not in nb.get("metadata", {}), f"{path.name} has {key!r} metadata from an execution"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_one_parameters_cell_with_ci_defaults(path):
    nb = json.loads(path.read_text())
    params = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, f"{path.name}: expected exactly one cell tagged 'parameters', found {len(params)}"
    tree = ast.parse("".join(params[0]["source"]))
    values = {t.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
              for t in node.targets if isinstance(t, ast.Name)}
    assert values.get("profile") == "ci", f"{path.name}: parameters must default to profile = 'ci'"
    assert "results_dir" in values and "data_root" in values, path.name


_TENSORFLOW = {"tensorflow", "keras", "cleverhans"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stealnb_is_imported_before_tensorflow(path):
    """Importing stealnb first is what keeps TensorFlow's start-up log lines out of the page
    (stealnb._tflog)."""
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        for node in ast.walk(ast.parse("".join(cell["source"]))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            tops = {n.split(".")[0] for n in names}
            if "stealnb" in tops:
                return
            assert not tops & _TENSORFLOW, f"{path.name} imports {sorted(tops & _TENSORFLOW)} before stealnb"

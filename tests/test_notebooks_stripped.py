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
    values = _defaults(params[0])
    assert values.get("profile") == "ci", f"{path.name}: parameters must default to profile = 'ci'"
    assert "results_dir" in values and "data_root" in values, path.name
    # None: the results root of stealnb.core.layout.results_root, wherever the kernel runs.
    assert values["results_dir"] is None, f"{path.name}: results_dir must default to None"


def _parameters_cell(path):
    nb = json.loads(path.read_text())
    return next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))


def _defaults(cell) -> dict:
    tree = ast.parse("".join(cell["source"]))
    out = {}
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = ast.literal_eval(node.value)
        elif isinstance(node, ast.Assign):
            out.update({t.id: ast.literal_eval(node.value) for t in node.targets if isinstance(t, ast.Name)})
    return out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_parameter_has_a_type_papermill_shows(path):
    """`papermill --help-notebook` reads the types from the annotations (no "Unknown type"), and
    stealnb.core.params.coerce applies them to what `-p` passed."""
    from papermill.translators import PythonTranslator

    from stealnb.core import params

    cell = _parameters_cell(path)
    shown = {p.name: p.inferred_type_name for p in PythonTranslator.inspect({"source": "".join(cell["source"])})}
    assert set(shown) == set(_defaults(cell)), f"{path.name}: papermill sees {sorted(shown)}"
    untyped = [n for n, t in shown.items() if t in ("None", "")]
    assert not untyped, f"{path.name}: parameters without a type annotation: {untyped}"
    ns: dict = {}
    exec("".join(cell["source"]), ns)  # the defaults are values of their own declared types
    assert params.coerce(ns) == {n: ns[n] for n in shown}


def test_every_pipeline_parameter_is_a_notebook_parameter():
    """What `stealnb run` passes is declared (and typed) in the notebook it runs."""
    from stealnb.report import pipeline
    from stealnb.core.profiles import PROFILES

    import inspect

    for task in pipeline.plan(PROFILES["ci"], "results"):
        if not task.is_notebook:  # a runs/ task: what it passes, its runner takes
            declared = inspect.signature(pipeline.RUNNERS[task.run]).parameters
            assert set(task.params) == set(declared), task.id
            continue
        declared = _defaults(_parameters_cell(NOTEBOOKS[0].parent / task.notebook))
        assert set(task.params) <= set(declared), (task.id, sorted(set(task.params) - set(declared)))


_TENSORFLOW = {"tensorflow", "keras", "cleverhans"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stealnb_is_imported_before_tensorflow(path):
    """Importing stealnb first is what keeps TensorFlow's start-up log lines out of the page
    (stealnb.core._tflog)."""
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


# The call that carries each chapter's method: its cell stays visible in the book.
_METHOD_CALLS = {
    "02_secret.ipynb": "ensure_secret(", "03_extraction.ipynb": "loop.run_extraction(",
    "05_copycat.ipynb": "copycat.run_copycat_variants(", "06_defenses.ipynb": "defense_experiment.run_defenses(",
    "08_pools.ipynb": "pools.run_pools(",
}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_bookkeeping_cells_are_collapsed_and_the_method_stays_visible(path):
    """``hide-input`` collapses a cell's code in the book (its outputs stay); the tags live in the
    committed notebook's metadata, outputs stripped."""
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    hidden = [c for c in code if "hide-input" in c.get("metadata", {}).get("tags", [])]
    assert hidden, f"{path.name}: no cell is collapsed (tag set-up and plotting cells 'hide-input')"
    call = _METHOD_CALLS.get(path.name)
    if call:
        method = [c for c in code if call in "".join(c["source"])]
        assert method and not any(c in hidden for c in method), f"{path.name}: the cell calling {call} is collapsed"


def test_the_defenses_chapter_calls_then_narrates_in_short_cells():
    """Issue 18: notebook 06 holds no experiment code of its own (run_defenses does the work), so
    no code cell is longer than about 15 lines, and it writes no file itself."""
    nb = json.loads((NOTEBOOKS[0].parent / "06_defenses.ipynb").read_text())
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert max(len(src.splitlines()) for src in code) <= 16
    assert not any(w in src for src in code for w in ("write_text(", "json.dump(", "open(", ".to_csv(", "savefig("))

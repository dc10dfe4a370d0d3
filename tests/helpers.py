"""Helpers shared by several test files (the tests folder is on ``sys.path``, see conftest.py)."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat


def tiny_notebook(path: Path, code: str, param_src: str = "x = 1\nout = None") -> None:
    """Write a three-cell notebook: a title, a ``parameters`` cell of ``param_src``, ``code``."""
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell(param_src)
    p.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# Tiny"), p, nbformat.v4.new_code_cell(code)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


def comparable_run(out: Path):
    """What two extraction runs must share to be the same run: rounds (without timings), the
    validation and labelled indices, per-budget results and the queries paid."""
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    for r in rounds:
        r.pop("seconds")
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    per_budget = {b: {k: v for k, v in row.items() if k != "seconds"} for b, row in summary["budgets"].items()}
    return rounds, state["val_idx"], state["labelled_idx"], per_budget, summary["oracle_spent"]

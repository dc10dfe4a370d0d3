"""The package's import layers (pyproject.toml, [tool.importlinter]) are kept: `lint-imports`
passes on the package, and fails on a copy of it in which a core module imports the command line, a higher
subpackage and a higher module of its own subpackage."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--no-cache", "--config", str(root / "pyproject.toml")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=240)


def test_every_import_contract_of_the_package_is_kept():
    r = lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


def test_a_core_module_importing_the_cli_or_a_higher_layer_breaks_the_contracts(tmp_path):
    shutil.copytree(ROOT / "stealnb", tmp_path / "stealnb", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    metrics = tmp_path / "stealnb" / "core" / "metrics.py"
    metrics.write_text(metrics.read_text() + "\n\ndef _late():\n    from .. import cli  # noqa: F401\n"
                       "    from ..extraction import loop  # noqa: F401\n    from . import train  # noqa: F401\n")
    r = lint(tmp_path)
    assert r.returncode != 0
    assert "nothing imports the command line BROKEN" in r.stdout
    # the subpackages' layers (core -> cli, core -> extraction) and core's own (metrics -> train); the
    # new chains through core also break extraction's and attacks' own contracts
    assert "stealnb.core.metrics -> stealnb.extraction.loop" in r.stdout
    assert "stealnb.core.metrics -> stealnb.core.train" in r.stdout
    assert "Contracts: 3 kept, 5 broken." in r.stdout

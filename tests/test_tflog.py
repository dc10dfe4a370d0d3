"""TensorFlow's C++ start-up lines stay out of every command, server and notebook that imports
stealnb first (stealnb.core._tflog), while warnings and errors at or above TF_CPP_MIN_LOG_LEVEL, and
anything else written to stderr, still show."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ABSL_LINES = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    "I0000 00:00:1796166198.590725    4060 port.cc:153] oneDNN custom operations are on.\n"
    "W0000 00:00:1796166198.590811    4060 op_level_cost_estimator.cc:699] a warning\n"
    "E0000 00:00:1796166198.590902    4060 node_def_util.cc:680] an error\n"
    "not a log line\n"
)


def _run(code, *, pythonpath=(), **env):
    env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([*map(str, pythonpath), str(ROOT)])}
    for name, value in list(env.items()):
        if value is None:
            del env[name]
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture
def fake_tensorflow(tmp_path):
    """A ``tensorflow`` package that writes Abseil-style lines to file descriptor 2 when imported,
    and a ``keras`` that imports it (as the real one does)."""
    (tmp_path / "tensorflow").mkdir()
    (tmp_path / "tensorflow" / "__init__.py").write_text(f"import os\nos.write(2, {ABSL_LINES.encode()!r})\n")
    (tmp_path / "keras").mkdir()
    (tmp_path / "keras" / "__init__.py").write_text("import tensorflow\n")
    return tmp_path


@pytest.mark.parametrize("level, shown", [
    (None, ["E0000", "not a log line"]),  # stealnb's default, 2: errors and up
    ("1", ["W0000", "E0000", "not a log line"]),
    ("3", ["not a log line"]),
    ("0", ["WARNING: All log messages", "I0000", "W0000", "E0000", "not a log line"]),  # nothing filtered
])
@pytest.mark.parametrize("module", ["tensorflow", "keras"])
def test_the_first_tensorflow_import_keeps_the_lines_at_or_above_the_level(fake_tensorflow, level, shown, module):
    p = _run(f"import sys, stealnb, {module}; print('after', file=sys.stderr)", pythonpath=[fake_tensorflow],
             TF_CPP_MIN_LOG_LEVEL=level)
    assert p.returncode == 0, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == len(shown) + 1 and lines[-1] == "after", p.stderr
    assert all(line.startswith(start) for line, start in zip(lines, shown)), p.stderr


def test_an_import_that_fails_still_shows_its_lines_and_error(fake_tensorflow):
    init = fake_tensorflow / "tensorflow" / "__init__.py"
    init.write_text(init.read_text() + "raise ImportError('no TensorFlow here')\n")
    p = _run("import stealnb, tensorflow", pythonpath=[fake_tensorflow], TF_CPP_MIN_LOG_LEVEL=None)
    assert p.returncode == 1
    assert "E0000" in p.stderr and "ImportError: no TensorFlow here" in p.stderr and "I0000" not in p.stderr


def test_the_module_keeps_its_own_loader(fake_tensorflow):
    p = _run("import stealnb, tensorflow, sys; print(type(tensorflow.__loader__).__name__, "
             "tensorflow.__spec__.loader is tensorflow.__loader__, "
             "any('stealnb' in type(f).__module__ for f in sys.meta_path))", pythonpath=[fake_tensorflow])
    assert p.stdout.split() == ["SourceFileLoader", "True", "False"], p.stderr


def test_importing_keras_after_stealnb_prints_nothing():
    """The real TensorFlow, as a notebook's first cell imports it (oneDNN on, no level set)."""
    p = _run("import stealnb, keras", TF_CPP_MIN_LOG_LEVEL=None, TF_ENABLE_ONEDNN_OPTS=None)
    assert p.returncode == 0 and p.stderr == "", p.stderr

"""The command line's boundaries: which output folders a run may replace, user errors as one line
and exit 2 before any work, unexpected errors as one line and a saved traceback."""
import errno
import json
import tempfile

import pytest

from stealnb import cli
from stealnb.core import data

TINY = ["--profile", "ci", "--pool-size", "100", "--budgets", "60", "--seed-size", "40", "--val-size", "20",
        "--epochs", "1", "--quiet"]
NOWHERE = ["--oracle-url", "http://127.0.0.1:9"]  # nothing listens: a run that got as far as asking fails


def _argv(command, secret_dir):
    return {
        "extract": ["extract", "--secret", str(secret_dir), "--strategy", "random", *TINY],
        "copycat": ["copycat", "--secret", str(secret_dir), "--variant", "npdd", *TINY],
        "extract --oracle-url": ["extract", "--secret", str(secret_dir), "--strategy", "random", *TINY, *NOWHERE],
        "copycat --oracle-url": ["copycat", "--secret", str(secret_dir), "--variant", "npdd", *TINY, *NOWHERE],
        "train-secret": ["train-secret", "--dataset", "digits", "--arch", "cnn-tiny", "--profile", "ci", "--quiet"],
    }[command]


@pytest.fixture
def no_work(monkeypatch):
    """Fails a command that trains a model, loads a thief pool or asks an oracle: refusing "up front"
    means before any of these (shown by what the command did not call, not by how fast it was)."""
    from stealnb.core import train
    from stealnb.extraction import copycat, loop, oracle

    def forbidden(what):
        def call(*args, **kwargs):
            raise AssertionError(f"the command {what} before refusing")
        return call

    for module in (train, loop, copycat):
        monkeypatch.setattr(module, "fit", forbidden("trained a model"))
    monkeypatch.setattr(train, "train_secret", forbidden("trained a secret"))
    monkeypatch.setattr(data, "load_pool", forbidden("loaded a thief pool"))
    monkeypatch.setattr(oracle.Oracle, "query", forbidden("asked the oracle"))
    monkeypatch.setattr(oracle.HttpOracle, "__init__", forbidden("opened a connection to the server"))


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def _one_line(err: str) -> str:
    """The one line stealnb printed, besides collapse warnings about a tiny test substitute."""
    lines = [ln for ln in err.strip().splitlines() if "collapsed towards a constant model" not in ln]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("command", ["extract", "copycat", "extract --oracle-url", "copycat --oracle-url",
                                     "train-secret"])
def test_a_fresh_run_refuses_a_folder_holding_user_files_and_deletes_nothing(secret_dir, tmp_path, capsys, command,
                                                                             no_work):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "important.txt").write_bytes(b"the only copy")
    (out / "sub" / "notes.md").write_bytes(b"# notes\n")
    (out / "summary.json").write_bytes(b"{}")  # a name stealnb also writes does not make it stealnb's
    before = _snapshot(out)
    assert cli.main(_argv(command, secret_dir) + ["--out", str(out)]) == 2  # refused up front (no_work)
    assert _snapshot(out) == before
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"stealnb: error: refusing to replace {out}: ") and "important.txt, sub/" in line


@pytest.mark.parametrize("command", ["extract", "copycat", "train-secret"])
def test_out_that_is_a_file_is_one_line_and_exit_2_before_any_work(secret_dir, tmp_path, capsys, command, no_work):
    out = tmp_path / "results.csv"
    out.write_bytes(b"a,b\n1,2\n")
    assert cli.main(_argv(command, secret_dir) + ["--out", str(out)]) == 2
    assert out.read_bytes() == b"a,b\n1,2\n"
    line = _one_line(capsys.readouterr().err)
    assert line == f"stealnb: error: {out} is a file, not a folder; choose another output folder"


@pytest.mark.parametrize("size", ["0", "10000000000", "50"])  # 50: fewer images than the budget of 60
@pytest.mark.parametrize("command", ["extract", "copycat"])
def test_pool_size_out_of_range_is_refused_before_any_work(secret_dir, tmp_path, capsys, command, size):
    out = tmp_path / "out"
    argv = _argv(command, secret_dir)
    argv[argv.index("--pool-size") + 1] = size
    assert cli.main(argv + ["--out", str(out)]) == 2
    assert not out.exists()  # refused before the run folder (or a pool) was made
    assert _one_line(capsys.readouterr().err).startswith("stealnb: error: pool size: ")


@pytest.mark.parametrize("command", ["extract", "copycat"])
def test_the_secrets_own_dataset_as_pool_is_refused_before_any_work(secret_dir, tmp_path, capsys, command):
    out = tmp_path / "out"
    assert cli.main(_argv(command, secret_dir) + ["--pool", "digits", "--out", str(out)]) == 2
    assert not out.exists()
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("stealnb: error: pool 'digits' holds the images of the secret's own dataset 'digits': ")
    assert line.endswith("or, to use it anyway, pass --allow-problem-domain-pool (allow_problem_domain=True)")


def test_extract_takes_a_dataset_pool_when_asked_and_records_its_transform(secret_dir, tmp_path):
    out = tmp_path / "out"
    argv = _argv("extract", secret_dir) + ["--pool", "digits", "--allow-problem-domain-pool", "--pool-transform",
                                           "gray", "--out", str(out)]
    assert cli.main(argv) == 0
    pool = json.loads((out / "summary.json").read_text())["pool"]
    assert pool == {"name": "digits", "size": 100, "transform": "gray", "dataset": "digits", "split": "train",
                    "train_size": 1438, "seed": 0}


def test_resume_without_a_checkpoint_says_it_starts_a_fresh_run(secret_dir, tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    argv = _argv("extract", secret_dir) + ["--out", str(out), "--resume"]
    assert cli.main(argv) == 0
    assert _notes(capsys.readouterr().err) == [f"stealnb: --resume: no checkpoint in {out}; starting a fresh run"]
    assert json.loads((out / "summary.json").read_text())["oracle_spent"] == 60
    assert cli.main(argv) == 0  # a checkpoint now: resumed silently
    assert _notes(capsys.readouterr().err) == []


def _notes(err: str) -> list[str]:
    """stderr lines other than the collapse warnings of :func:`stealnb.extraction.loop.collapse_warnings`
    (whether a one-epoch substitute on 40 images collapses depends on which pool images it drew)."""
    return [line for line in err.splitlines() if not line.startswith("stealnb: warning: round ")]


@pytest.fixture
def train_secret_failing_with(tmp_path, monkeypatch):
    """``train-secret``'s command line, with its data loading raising the error given and temporary
    files (a saved traceback) going to ``tmp_path``."""
    def argv_raising(error: Exception) -> list[str]:
        def failing_load_dataset(*args, **kwargs):
            raise error

        monkeypatch.setattr(data, "load_dataset", failing_load_dataset)
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
        return ["train-secret", "--dataset", "digits", "--arch", "cnn-tiny", "--out", str(tmp_path / "s")]
    return argv_raising


def test_an_unexpected_error_is_one_line_naming_a_saved_traceback(tmp_path, capsys, train_secret_failing_with):
    argv = train_secret_failing_with(OSError("Input/output error\nwhile reading digits"))
    assert cli.main(argv) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("stealnb: unexpected error: OSError: Input/output error (traceback in ")
    saved = next(tmp_path.glob("stealnb-error-*.txt"))
    assert str(saved) in line and "--debug" in line
    text = saved.read_text()
    assert text.startswith("stealnb train-secret --dataset digits")
    assert "Traceback" in text and "failing_load_dataset" in text
    assert cli.main(["--debug", *argv]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_a_full_disk_is_one_line_naming_the_file_and_how_to_resume(tmp_path, capsys, train_secret_failing_with):
    model = tmp_path / "s" / "model.keras"
    argv = train_secret_failing_with(OSError(errno.ENOSPC, "No space left on device", str(model)))
    assert cli.main(argv) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("stealnb: error: no space left on the device (writing ")
    assert str(model) in line and "run the same command again to resume" in line
    assert not list(tmp_path.glob("stealnb-error-*.txt"))  # no traceback file on a full disk


# -- a quiet, fast command line -----------------------------------------------------------------

_HELP_IN_A_FRESH_PROCESS = """
import argparse, contextlib, io, sys
from stealnb import cli
parser = cli.build_parser()
(sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
commands = [[]] + [[name] for name in sub.choices] + [["data", "list"], ["data", "fetch"]]
for argv in commands:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            parser.parse_args(argv + ["--help"])
        except SystemExit as e:
            assert e.code == 0, (argv, e.code)
    assert "usage: stealnb" in out.getvalue(), argv
heavy = sorted(m for m in ("tensorflow", "keras", "sklearn", "scipy.stats", "scipy.special") if m in sys.modules)
assert not heavy, f"building the parser imported {heavy}"
print(len(commands), "helps")
"""


def _python(code_or_args, **env):
    import os
    import subprocess
    import sys
    from pathlib import Path

    args = ["-c", code_or_args] if isinstance(code_or_args, str) else list(code_or_args)
    root = str(Path(cli.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]), **env}
    for name in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS"):  # set by conftest; not in a user's shell
        env.pop(name, None)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)


def test_every_help_imports_no_tensorflow():
    p = _python(_HELP_IN_A_FRESH_PROCESS)
    assert p.returncode == 0, p.stderr
    assert int(p.stdout.split()[0]) >= 9 and p.stderr == ""


@pytest.mark.parametrize("argv", [["--help"], ["extract", "--help"], ["copycat", "--help"], ["data", "list"]])
def test_help_and_data_list_print_nothing_on_stderr(argv):
    p = _python(["-m", "stealnb.cli", *argv])
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert p.stdout.startswith("usage: stealnb") or p.stdout.startswith("data root: ")


def test_version_is_the_installed_distributions(capsys):
    import importlib.metadata

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"stealnb {importlib.metadata.version('stealnb')}\n"


@pytest.mark.parametrize("flag, value", [("--arch", "vgg17"), ("--dataset", "mnist2"), ("--pool", "imagenet"),
                                         ("--strategy", "entropy"), ("--profile", "fast")])
def test_an_unknown_name_is_refused_by_the_parser_with_the_known_ones(capsys, flag, value):
    argv = ["extract", "--strategy", "random", "--dataset", "digits", "--arch", "cnn-tiny", "--out", "x"]
    argv = argv + [flag, value]
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}: invalid choice: '{value}'" in err

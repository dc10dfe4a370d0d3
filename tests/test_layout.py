"""stealnb.core.layout: which folders a new run may replace (marker + the names stealnb writes)."""
import json

import pytest

from stealnb.core import layout
from stealnb.core._checks import UsageError


def _earlier_extraction(out):
    """A finished extraction as written before runs carried a marker, plus an interrupted write."""
    (out / "checkpoint").mkdir(parents=True)
    for name in ("rounds.jsonl", "rounds.jsonl.tmp", "summary.json", "ledger.bin", "checkpoint/state.json",
                 "checkpoint/substitute.weights.h5"):
        (out / name).write_text("x")


def test_a_new_run_replaces_an_earlier_run_even_one_written_before_the_marker(tmp_path):
    out = tmp_path / "run"
    _earlier_extraction(out)
    assert layout.checkpointed(out, "extraction") and not layout.checkpointed(out, "copycat")
    assert layout.new_run_dir(out, "extraction") == out
    assert [p.name for p in out.iterdir()] == [layout.MARKER]
    assert json.loads((out / layout.MARKER).read_text())["kind"] == "extraction"
    # missing and empty folders are new run folders too
    assert layout.new_run_dir(tmp_path / "a" / "b", "copycat").is_dir()


def test_a_new_run_refuses_another_kind_of_run_a_symlink_and_nested_strangers(tmp_path):
    out = tmp_path / "run"
    _earlier_extraction(out)
    layout.new_run_dir(out, "extraction", replace=False)  # marks it, keeps everything
    assert (out / "ledger.bin").exists()
    with pytest.raises(UsageError, match="holds a stealnb 'extraction' run, not a 'copycat' one"):
        layout.new_run_dir(out, "copycat")
    (out / "checkpoint" / "notes.txt").write_text("mine")
    (out / "data").symlink_to(tmp_path)
    with pytest.raises(UsageError, match=r"did not write \(checkpoint/notes.txt, data\)"):
        layout.new_run_dir(out, "extraction")
    assert (out / "checkpoint" / "notes.txt").read_text() == "mine" and (out / "ledger.bin").exists()
    # what a pipeline task folder holds: several runs, each checked against its own kind
    seeds = tmp_path / "random"
    _earlier_extraction(seeds / "seed0")
    layout.check_run_dir(seeds, "extraction seeds")
    (seeds / "seed1").mkdir()
    (seeds / "seed1" / layout.MARKER).write_text(json.dumps({"kind": "secret"}))
    with pytest.raises(UsageError, match=r"seed1/\.stealnb-run\.json \(kind 'secret'\)"):
        layout.check_run_dir(seeds, "extraction seeds")


def test_a_defenses_folder_with_the_servers_key_logs_and_headers_can_be_replaced(tmp_path):
    # what run_defenses leaves: stealnb.serve.server writes <key id>.jsonl and <key id>.head per key
    out = tmp_path / "defenses"
    keys = out / "server-logs" / "keys"
    keys.mkdir(parents=True)
    for name in ("abc.jsonl", "abc.head"):
        (keys / name).write_text("x")
    (out / "prada.json").write_text("{}")
    layout.check_run_dir(out, "defenses")
    assert layout.new_run_dir(out, "defenses") == out and not keys.exists()


# -- the results root: one folder however a notebook or command is started ---------------------

ROOT = layout.project_root()


@pytest.fixture
def no_results_env(monkeypatch):
    monkeypatch.delenv(layout.RESULTS_ENV, raising=False)


def test_results_root_is_the_projects_results_folder_from_the_root_and_from_notebooks(no_results_env, monkeypatch):
    monkeypatch.chdir(ROOT)
    at_root = layout.results_root()
    monkeypatch.chdir(ROOT / "notebooks")  # where JupyterLab starts a notebook's kernel
    assert layout.results_root() == at_root == ROOT / "results"
    assert layout.profile_dir(None, "ci") == ROOT / "results" / "ci"


def test_results_root_follows_the_environment_variable_and_an_explicit_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT / "notebooks")
    monkeypatch.setenv(layout.RESULTS_ENV, str(tmp_path / "shared"))
    assert layout.results_root() == tmp_path / "shared"
    monkeypatch.setenv(layout.RESULTS_ENV, "rel")  # relative: from the current directory
    assert layout.results_root() == ROOT / "notebooks" / "rel"
    # an explicit folder wins; a relative one is taken from the current directory
    assert layout.results_root(tmp_path / "mine") == tmp_path / "mine"
    assert layout.results_root("x") == ROOT / "notebooks" / "x"


def test_the_cli_default_results_folder_is_the_results_root(no_results_env, monkeypatch, tmp_path):
    from stealnb import cli

    monkeypatch.chdir(ROOT / "notebooks")
    argv = ["copycat", "--variant", "npdd", "--dataset", "digits", "--arch", "cnn-tiny"]
    assert cli.parse_args(argv).results == ROOT / "results"
    monkeypatch.setenv(layout.RESULTS_ENV, str(tmp_path))
    assert cli.parse_args(argv).results == tmp_path
    assert cli.parse_args([*argv, "--results", "r"]).results.name == "r"
    ex = cli.parse_args(["extract", "--dataset", "digits", "--arch", "cnn-tiny", "--strategy", "random", "--out", "o"])
    assert ex.results == tmp_path


def test_an_atomic_write_that_raises_leaves_the_old_file_and_no_temporary(tmp_path):
    f = tmp_path / "cache.bin"
    f.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with layout.atomic_open(f, "wb", shared=True) as out:
            out.write(b"half of the new")
            raise RuntimeError("interrupted")
    assert f.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["cache.bin"]
    with layout.atomic_open(f, "wb") as out:
        out.write(b"new")
    assert f.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["cache.bin"]

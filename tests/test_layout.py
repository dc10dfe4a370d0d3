"""stealnb.layout: which folders a new run may replace (marker + the names stealnb writes)."""
import json

import pytest

from stealnb import layout
from stealnb._checks import UsageError


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

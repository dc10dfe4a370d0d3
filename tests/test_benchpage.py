"""stealnb.report.benchpage: the book's Benchmarks page is computed from benchmarks/results/*.json; a
missing folder, a file that is not JSON or one without the expected fields gives a note on the
page instead of a failed build."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stealnb.report import benchpage

ROOT = Path(__file__).resolve().parents[1]

QUALITY = {
    "setup": {"budgets": [250, 500], "seeds": [0, 1], "pool": "natural-patches (2000)", "substitute": "cnn-tiny"},
    "secrets": {"digits-cnn-tiny": {"secret_test_accuracy": 0.95, "runs": {
        "random": [{"seed": 0, "budgets": {"250": 0.4, "500": 0.6}}, {"seed": 1, "budgets": {"250": 0.6, "500": 0.8}}],
        "kcenter": [{"seed": 0, "budgets": {"250": 0.5, "500": 0.7}}],
    }}},
}


def _write(folder: Path, name: str, payload) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return p


def _table_rows(markdown: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith("| ") and not line.startswith("|---")]


def test_a_quality_file_becomes_a_table_of_agreement_mean_and_ci_per_strategy_and_budget(tmp_path):
    section = benchpage.render_file(_write(tmp_path, "quality.json", QUALITY))
    assert section.startswith("## `quality.json`")
    assert "secret test accuracy 0.950" in section
    assert _table_rows(section) == [
        ["strategy", "250", "500"],
        ["random", "0.500 ± 1.271", "0.700 ± 1.271"],  # 95% CI of two seeds: t(0.975, 1) * 0.141 / sqrt(2)
        ["kcenter", "0.500", "0.700"],  # one seed: no spread to show
    ]
    assert "Highest mean agreement per budget: 250: random (0.500); 500: random (0.700)." in section


def test_a_prada_scan_lists_when_each_attack_was_flagged(tmp_path):
    data = {"delta": 0.9, "dataset": "digits", "arch": "cnn-small", "budget": 1000,
            "benign": {"clients": 20, "client_size": 359, "fpr": 0.0, "min_w": 0.918},
            "runs": [{"strategy": "uncertainty", "seed": 0, "queries": 952, "flagged_at": 292, "min_w": 0.797},
                     {"strategy": "random", "seed": 0, "queries": 1000, "flagged_at": None, "min_w": 0.968}]}
    section = benchpage.render_file(_write(tmp_path, "prada_demo.json", data))
    assert "false-positive rate 0.00" in section
    rows = _table_rows(section)
    assert rows[1][:5] == ["uncertainty", "0", "952", "292", "0.797"]
    assert rows[2][:4] == ["random", "0", "1,000", "never"]
    assert "Flagged: uncertainty (seed 0 at query 292). Never flagged: random." in section


def test_an_unknown_file_shows_its_top_level_values(tmp_path):
    section = benchpage.render_file(_write(tmp_path, "new_bench.json", {"n": 1200, "met": True, "trace": [1, 2]}))
    assert _table_rows(section) == [["field", "value"], ["n", "1,200"], ["met", "True"]]
    assert "Nested fields (not shown): `trace`." in section
    assert "Measured" not in section  # it records no provenance


def test_a_benchmarks_result_names_the_commit_machine_and_date_it_was_measured_on(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from _provenance import write_result
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    path = write_result(tmp_path / "results" / "new_bench.json", {"n": 5}, machine_note="idle")
    data = json.loads(path.read_text())
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert list(data)[:2] == ["code", "n"] and data["code"]["commit"] == head
    section = benchpage.render_file(path)
    line = next(x for x in section.splitlines() if x.startswith("*Measured"))
    assert f"at commit `{head}`" in line and f"on {os.cpu_count()} cores (idle), {data['date']} UTC" in line
    assert _table_rows(section) == [["field", "value"], ["n", "5"]]  # the provenance is not repeated below
    assert "Nested fields" not in section
    dirty = benchpage.render_file(_write(tmp_path, "old.json", {"code": {"commit": "abc1234", "dirty": True}, "n": 1}))
    assert "*Measured at commit `abc1234` with uncommitted changes (machine load not recorded).*" in dirty
    older = benchpage.render_file(_write(tmp_path, "older.json", {"machine": {"cpus": 2}, "n": 1}))
    assert "*Measured at a commit not recorded on 2 cores (machine load not recorded).*" in older
    with pytest.raises(ValueError, match=r"result keys \['date'\]: reserved"):  # not silently overwritten
        write_result(tmp_path / "results" / "clash.json", {"date": "the day the data was drawn"})
    assert not (tmp_path / "results" / "clash.json").exists()


def test_a_malformed_file_gives_a_note_not_a_crash(tmp_path):
    broken = benchpage.render_file(_write(tmp_path, "server.json", '{"phases": [1, 2'))
    assert broken.startswith("## `server.json`") and "could not be read as JSON" in broken
    wrong = benchpage.render_file(_write(tmp_path, "quality.json", {"setup": {"budgets": [250]}}))
    assert "does not have the fields of a quality result" in wrong and "KeyError" in wrong
    page = benchpage.render_page(tmp_path)  # one bad file does not hide the others
    assert page.count("## `") == 2


def test_a_missing_or_empty_results_folder_gives_a_note(tmp_path):
    missing = benchpage.render_page(tmp_path / "nowhere", shown_as="benchmarks/results")
    assert missing.startswith("# Benchmarks") and "*No benchmark results: `benchmarks/results` does not exist.*" in missing
    (tmp_path / "empty").mkdir()
    assert "holds no result files" in benchpage.render_page(tmp_path / "empty")


def test_the_page_is_rewritten_only_when_its_content_changes(tmp_path):
    results = tmp_path / "results"
    _write(results, "quality.json", QUALITY)
    out = benchpage.write_page(results, tmp_path / "book" / "benchmarks.md")
    # An mtime Sphinx would see as "unchanged" only if the file is left alone.
    os.utime(out, ns=(1_000_000_000, 1_000_000_000))
    benchpage.write_page(results, out)
    assert out.stat().st_mtime_ns == 1_000_000_000
    _write(results, "quality.json", {**QUALITY, "setup": {**QUALITY["setup"], "seeds": [0, 1, 2]}})
    benchpage.write_page(results, out)
    assert "seeds 0, 1, 2" in out.read_text()


def test_every_committed_result_file_renders_without_a_note():
    page = benchpage.render_page(ROOT / "benchmarks" / "results")
    assert "Not shown" not in page and "No benchmark results" not in page
    assert page.count("## `") == len(list((ROOT / "benchmarks" / "results").glob("*.json")))


POOLS = {
    "setup": {"profile": "demo", "budgets": [250, 1000], "seeds": [0, 1], "substitute": "cnn-small"},
    "pool_build": {"patches": 20000, "seconds": 7.74, "photos": 45, "duplicates_dropped": 808},
    "finished": True,
    "secrets": {"digits-cnn-small": {
        "strategies": [{"dataset": "digits", "arch": "cnn-small", "strategy": "random", "as": "random", "reason": ""},
                       {"dataset": "digits", "arch": "cnn-small", "strategy": "kcenter", "as": "kcenter", "reason": ""}],
        "table": {
            "uniform-noise": {"random": {"250": {"mean": 0.1, "ci95": 0.02, "noise_ratio": 1.0},
                                         "1000": {"mean": 0.12, "ci95": 0.03, "noise_ratio": 1.0}}},
            "natural-patches": {"kcenter": {"250": {"mean": 0.5, "ci95": 0.05, "noise_ratio": 5.0},
                                            "1000": {"mean": 0.75, "ci95": None, "noise_ratio": 6.25,
                                                     "gain_over_noise": 0.63, "gain_low": 0.6, "gain_high": 0.66,
                                                     "gain_significant": True}}}},
        "entropy": {"uniform-noise": {"entropy_bits": 0.5}, "natural-patches": {"entropy_bits": 2.9}},
        "targets": {"best_pool_and_strategy_at_largest_budget": {
            "pool": "natural-patches", "strategy": "kcenter", "budget": 1000, "measured": 0.75, "target": 0.9,
            "met": False}},
    }},
}


def test_a_pools_file_becomes_a_table_per_secret_with_cis_ratios_to_noise_and_the_targets(tmp_path):
    section = benchpage.render_file(_write(tmp_path, "pools_fashion-mnist.json", POOLS))
    assert _table_rows(section) == [
        ["pool", "strategy", "250", "1000", "gain over noise at 1000", "label entropy (bits)"],
        ["uniform-noise", "random", "0.100 ± 0.020 (×1.00)", "0.120 ± 0.030 (×1.00)", "—", "0.50"],
        ["natural-patches", "kcenter", "0.500 ± 0.050 (×5.00)", "0.750 (×6.25)", "+0.630 [+0.600, +0.660]*", "2.90"],
    ]
    assert "**digits-cnn-small** (strategies: random, kcenter):" in section
    assert "natural-patches / kcenter, 0.750 (target 0.900: missed)" in section
    assert "20,000 patches from 45 photos in 7.7 s (808 near-duplicates dropped)" in section
    assert "had not finished" not in section
    assert "had not finished" in benchpage.render_file(_write(tmp_path, "pools.json", {**POOLS, "finished": False}))


def _engine_run(engine, wall, tasks):
    return {"engine": engine, "repeat": 0, "wall_s": wall, "engine_s": wall - 5, "book_s": 5.0,
            "task_seconds_sum": sum(tasks.values()), "ran": len(tasks), "failed": [], "blocked": [],
            "task_seconds": tasks}


def test_an_engine_file_compares_the_engines_wall_time_with_their_task_time_per_job(tmp_path):
    tasks = {"secret/digits-cnn-small": 50.0, "runs/extraction-digits-cnn-small-random-seed0": 200.0,
             "runs/extraction-digits-cnn-small-random-seed1": 150.0, "extraction/digits-cnn-small-random": 20.0}
    payload = {"code": {"commit": "abc1234"}, "profile": "demo", "jobs": 2, "only": None, "book": True,
               "complete": False, "machine": {"note": "idle"},
               "runs": [_engine_run("dask", 300.0, tasks), _engine_run("old", 290.0, dict(tasks, **{"secret/digits-cnn-small": 60.0}))]}
    section = benchpage.render_file(_write(tmp_path, "engine_demo.json", payload))
    assert "had not finished" in section and "abc1234" in section
    rows = _table_rows(section)
    assert rows[0][:3] == ["engine", "repeat", "wall s"]
    assert rows[1] == ["dask", "0", "300", "295", "5", "420", "210", "4", "0"]
    assert rows[2][:7] == ["old", "0", "290", "285", "5", "430", "215"]
    per_kind = {r[0]: r[1:] for r in rows[4:]}
    assert per_kind == {"extraction": ["20", "20"], "runs/extraction": ["350", "350"], "secret": ["50", "60"]}


def test_a_threads_file_lists_each_thread_setting_with_its_wall_time_and_whether_results_agree(tmp_path):
    payload = {"code": {"commit": "abc1234"}, "strategy": "random", "seeds": [0, 1], "jobs": 2, "same_results": False,
               "machine": {"cpus": 2, "note": "idle"},
               "runs": [{"variant": "default", "repeat": 0, "wall_s": 250.04, "seed_seconds": {"0": 240.0, "1": 250.0}},
                        {"variant": "1 thread", "repeat": 0, "wall_s": 200.0, "seed_seconds": {"0": 190.0, "1": 200.0}}]}
    section = benchpage.render_file(_write(tmp_path, "threads_demo.json", payload))
    assert "Same results with both settings: no." in section
    assert _table_rows(section)[1:] == [["default", "0", "250.0", "240, 250"], ["1 thread", "0", "200.0", "190, 200"]]

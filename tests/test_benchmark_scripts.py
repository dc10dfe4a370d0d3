"""The benchmark scripts refuse bad input the way ``stealnb`` does: one line on stderr and exit 2,
before any data is written or model trained (the brief's rule for every command)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BAD_INPUT = [
    ("bench_engine.py", ["--jobs", "0"], "--jobs and --repeats must be at least 1"),
    ("bench_threads.py", ["--jobs", "0"], "--jobs, --threads and --repeats must be at least 1"),
    ("bench_fit_overhead.py", ["--classes", "1"], "--classes must be at least 2"),
    ("bench_fit_memory.py", ["--models", "0"], "--models must be at least 2"),
    ("bench_server.py", ["--duration", "0"], "--duration: expected 1..120 seconds"),
    ("faults.py", ["--label", "x", "--baseline", "0"], "bounded: --baseline and --stall 1..60 s"),
    ("bench_paper_smoke.py", ["--jobs", "0"], "--jobs must be at least 1"),
]


@pytest.mark.parametrize("script, args, message", BAD_INPUT, ids=[b[0] for b in BAD_INPUT])
def test_a_benchmark_given_bad_input_says_so_in_one_line_and_exits_2(tmp_path, script, args, message):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written before the check

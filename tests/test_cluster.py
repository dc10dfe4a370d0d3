"""stealnb run on Dask (stealnb/report/cluster.py, pipeline.execute): scheduler addresses, GPU resources,
a grid on two workers equal to the in-process run, and a worker killed mid-extraction."""
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from helpers import tiny_notebook, comparable_run
from stealnb.core import profiles
from stealnb.extraction import loop, oracle
from stealnb.report import cluster, pipeline
from stealnb.core._checks import UsageError
from stealnb.cli import main


@pytest.mark.parametrize("value", ["localhost:8786", "tcp://host", "http://host:8786", "tcp://host:0", "tcp://a b:1"])
def test_a_malformed_scheduler_address_is_one_line_and_exit_2_before_any_work(value, tmp_path, capsys):
    rc = main(["run", "--profile", "ci", "--results", str(tmp_path / "res"), "--no-book", "--scheduler", value])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "tcp://HOST:8786" in err and repr(value) in err, err
    assert not (tmp_path / "res").exists()


def test_the_scheduler_address_comes_from_the_option_else_the_environment(monkeypatch):
    monkeypatch.delenv(cluster.SCHEDULER_ENV, raising=False)
    assert cluster.scheduler_address(None) is None
    monkeypatch.setenv(cluster.SCHEDULER_ENV, "tcp://10.0.0.7:8786")
    assert cluster.scheduler_address(None) == "tcp://10.0.0.7:8786"
    assert cluster.scheduler_address("tcp://[::1]:9000") == "tcp://[::1]:9000"
    monkeypatch.setenv(cluster.SCHEDULER_ENV, "10.0.0.7")
    with pytest.raises(UsageError, match=r"^\$DASK_SCHEDULER_ADDRESS: expected"):
        cluster.scheduler_address(None)




def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_scheduler_is_refused_before_any_notebook_starts(tmp_path, monkeypatch):
    root = tmp_path / "proj"
    tiny_notebook(root / "notebooks" / "a.ipynb", "print(x)", "x = 1")
    ts = [pipeline.Task("one/a", "a.ipynb", {"x": 2})]
    pipeline.assign_keys(ts, profiles.PROFILES["ci"], root / "notebooks")
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT", 2.0)
    addr = f"tcp://127.0.0.1:{_free_port()}"
    with pytest.raises(UsageError, match=rf"^cannot reach the Dask scheduler at {addr} "):
        pipeline.execute(ts, root=root, run_dir=tmp_path / "run", scheduler=addr, progress=False)
    assert not (tmp_path / "run").exists()


def test_a_task_is_tried_twice_then_reported_with_its_log_and_its_dependants_blocked(tmp_path, capsys):
    root = tmp_path / "proj"
    # "flaky" fails its first attempt only, "bad" every attempt; both count their attempts.
    count = "import pathlib\nf = pathlib.Path(tally); f.write_text(f.read_text() + 'x' if f.exists() else 'x')\n"
    tiny_notebook(root / "notebooks" / "flaky.ipynb", count + "assert len(f.read_text()) > 1, 'first attempt'", "tally = ''")
    tiny_notebook(root / "notebooks" / "bad.ipynb", count + "raise RuntimeError('boom')", "tally = ''")
    tiny_notebook(root / "notebooks" / "ok.ipynb", "print('ok')", "x = 1")
    ts = [pipeline.Task("one/flaky", "flaky.ipynb", {"tally": str(tmp_path / "flaky.txt")}),
          pipeline.Task("two/bad", "bad.ipynb", {"tally": str(tmp_path / "bad.txt")}),
          pipeline.Task("three/after-bad", "ok.ipynb", {}, deps=["two/bad"]),
          pipeline.Task("four/after-flaky", "ok.ipynb", {"x": 2}, deps=["one/flaky"])]
    pipeline.assign_keys(ts, profiles.PROFILES["ci"], root / "notebooks")
    rep = pipeline.execute(ts, root=root, run_dir=tmp_path / "run", jobs=2, progress=True)
    log = tmp_path / "run" / "logs" / "two__bad.log"
    assert set(rep["ran"]) == {"one/flaky", "four/after-flaky"}
    assert rep["failed"] == ["two/bad"] and rep["blocked"] == ["three/after-bad"] and rep["logs"] == {"two/bad": str(log)}
    assert (tmp_path / "flaky.txt").read_text() == "xx" and (tmp_path / "bad.txt").read_text() == "xx"
    assert "boom" in log.read_text()
    out = capsys.readouterr().out
    assert "FAILED two/bad twice (the last attempt: exit 1 after" in out and f"log: {log}" in out and "ran    one/flaky" in out


def test_the_dependants_of_a_task_that_fails_before_its_notebook_runs_are_blocked_not_failed(tmp_path):
    root = tmp_path / "proj"
    tiny_notebook(root / "notebooks" / "ok.ipynb", "print('ok')", "x = 1")
    run = tmp_path / "run"
    run.mkdir()
    (run / "logs").write_text("a file where run_task puts its logs")  # an OSError, not a notebook's failure
    ts = [pipeline.Task("one/broken", "ok.ipynb", {}),
          pipeline.Task("two/after-broken", "ok.ipynb", {"x": 2}, deps=["one/broken"])]
    pipeline.assign_keys(ts, profiles.PROFILES["ci"], root / "notebooks")
    rep = pipeline.execute(ts, root=root, run_dir=run, jobs=1, progress=False)
    assert rep["failed"] == ["one/broken"] and rep["blocked"] == ["two/after-broken"] and not rep["ran"]


def test_training_tasks_take_a_gpu_only_when_the_profile_wants_one(tmp_path):
    paper = pipeline.plan(profiles.PROFILES["paper"], tmp_path)
    assert profiles.PROFILES["paper"].gpu and not profiles.PROFILES["demo"].gpu and not profiles.PROFILES["ci"].gpu
    for t in paper:
        assert t.resources == ({"GPU": 1} if t.chapter in ("secret", "runs", "defenses", "pools") else {}), t.id
    # every extraction and Copycat seed trains on a GPU, and every pool of the pool study
    assert sum(t.run in ("extraction", "copycat") for t in paper) == 90
    assert sum(t.run == "pool" for t in paper) >= 15 * len(profiles.PROFILES["paper"].pool_study.pools)
    assert all(t.resources == {} for t in pipeline.plan(profiles.PROFILES["ci"], tmp_path))


# -- the grid on a 2-worker LocalCluster, and a worker killed mid-extraction ------------------------
# One extraction per task, small enough for the ci budget (the `stealnb extract` kill test's settings;
# K-center in 10 rounds, to be killed in one of them, random in 5).
ROUND_SIZE = {"kcenter": 10, "random": 20}
_EXTRACT = """\
import os
from stealnb.core import profiles
from stealnb.extraction import loop
prof = profiles.get_profile("ci").with_(pool_size=500)
ex = loop.run_extraction("digits", "cnn-tiny", strategy, prof, seed=3, out=out, secret_dir=secret_dir,
                               resume=True, budgets=(90, 130), round_size=round_size, seed_size=40, val_size=20)
print("pid", os.getpid(), "spent", ex.oracle.spent)
"""


def _extraction_grid(tmp_path, secret_dir, strategies):
    root = tmp_path / "proj"
    tiny_notebook(root / "notebooks" / "ex.ipynb", _EXTRACT,
              'strategy = "random"\nround_size = 10\nout = None\nsecret_dir = None')
    tiny_notebook(root / "notebooks" / "gather.ipynb",
              "import json, pathlib\nfor o in outs:\n    assert json.loads(pathlib.Path(o, 'summary.json').read_text())",
              "outs = []")
    outs = {s: tmp_path / "res" / s for s in strategies}
    ts = [pipeline.Task(f"extraction/{s}", "ex.ipynb", {"strategy": s, "round_size": ROUND_SIZE[s], "out": str(o),
                                                       "secret_dir": str(secret_dir)},
                        outputs={o: "extraction"}) for s, o in outs.items()]
    ts.append(pipeline.Task("results/gather", "gather.ipynb", {"outs": [str(o) for o in outs.values()]},
                            deps=[t.id for t in ts]))
    pipeline.assign_keys(ts, profiles.PROFILES["ci"], root / "notebooks")
    return root, ts, outs




@pytest.fixture(scope="module")
def in_process(secret_dir, tmp_path_factory):
    """The extractions of the grid run in this process, without Dask or papermill."""
    base = tmp_path_factory.mktemp("in-process")
    prof = profiles.get_profile("ci").with_(pool_size=500)
    out = {}
    for s in ("kcenter", "random"):
        loop.run_extraction("digits", "cnn-tiny", s, prof, seed=3, out=base / s, secret_dir=secret_dir,
                                  resume=True, budgets=(90, 130), round_size=ROUND_SIZE[s], seed_size=40, val_size=20)
        out[s] = comparable_run(base / s)
    return out


@pytest.fixture
def two_workers():
    with cluster.local_cluster(2) as c:
        yield c


@pytest.mark.timeout(1800)  # 2 in-process extractions, then 2 notebooks on 2 workers: ~3 min, far longer on a loaded runner
def test_a_grid_on_two_workers_gives_the_in_process_results(secret_dir, tmp_path, in_process, two_workers):
    root, ts, outs = _extraction_grid(tmp_path, secret_dir, ("kcenter", "random"))
    rep = pipeline.execute(ts, root=root, run_dir=tmp_path / "run", scheduler=two_workers.scheduler_address,
                           progress=False)
    assert set(rep["ran"]) == {t.id for t in ts} and rep["ran"][-1] == "results/gather"
    assert not rep["failed"] and not rep["blocked"]
    for s, o in outs.items():
        assert comparable_run(o) == in_process[s], s
    pids = {t.id: [ln for ln in (tmp_path / "run" / "logs" / (t.id.replace("/", "__") + ".log")).read_text()
                   .splitlines() if "pid " in ln] for t in ts[:2]}
    assert all(pids.values()), pids
    # and a second run skips them all
    rep = pipeline.execute(ts, root=root, run_dir=tmp_path / "run", scheduler=two_workers.scheduler_address,
                           progress=False)
    assert rep["ran"] == [] and set(rep["skipped"]) == {t.id for t in ts}


@pytest.mark.timeout(1800)  # an extraction killed and resumed on the other worker: ~2 min, far longer on a loaded runner
def test_a_worker_killed_mid_extraction_is_retried_and_resumes_paying_no_query_twice(
        secret_dir, tmp_path, in_process, two_workers):
    from distributed import Client

    root, ts, outs = _extraction_grid(tmp_path, secret_dir, ("kcenter",))
    rounds = outs["kcenter"] / "rounds.jsonl"
    killed = {}

    def killer():  # SIGKILL the worker running the extraction once it has done 3 of its 10 rounds
        with Client(two_workers.scheduler_address) as c:
            deadline = time.time() + 600
            while (not rounds.exists() or len(rounds.read_text().splitlines()) < 3) and time.time() < deadline:
                time.sleep(0.05)
            busy = [w for w, keys in c.processing().items() if any("extraction/kcenter" in str(k) for k in keys)]
            pid = c.run(os.getpid, workers=busy)[busy[0]]
            killed["rounds"] = len(rounds.read_text().splitlines())
            killed["paid"] = len(oracle.read_ledger(outs["kcenter"] / "ledger.bin")[0]) - 1
            os.kill(pid, signal.SIGKILL)
            killed["worker"] = busy[0]

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    rep = pipeline.execute(ts, root=root, run_dir=tmp_path / "run", scheduler=two_workers.scheduler_address,
                           progress=False)
    t.join(timeout=60)
    assert "worker" in killed and 3 <= killed["rounds"] < 8, killed
    assert set(rep["ran"]) == {"extraction/kcenter", "results/gather"} and not rep["failed"], rep
    # the retried task resumed: the uninterrupted run's rounds, sets and summary, and each paid
    # sample in the ledger once (130 in all, the killed attempt's among them)
    assert comparable_run(outs["kcenter"]) == in_process["kcenter"]
    payloads = oracle.read_ledger(outs["kcenter"] / "ledger.bin")[0][1:]
    assert len(payloads) == 130 >= killed["paid"] > 0
    assert len({p[:32] for p in payloads}) == 130  # a record starts with its sample's sha256

"""The ActiveThief loop: budgets, records, checkpoints and resume after kill -9."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import comparable_run
from stealnb.core import data, profiles, train
from stealnb.extraction import loop, oracle
from stealnb.core._checks import UsageError


@pytest.fixture(scope="module")
def setup(secret_dir):
    model, _ = train.load_secret(secret_dir)
    ds = data.load_dataset("digits")
    pool = data.load_pool("natural-patches", n=500, seed=0)
    return model, ds, pool


def _config(**kw):
    base = dict(strategy="kcenter", substitute="cnn-tiny", budgets=(90, 130), seed_size=40, val_size=20,
                round_size=20, epochs=2, patience=None, seed=3)
    base.update(kw)
    return loop.ExtractionConfig(**base)


def test_config_rejects_bad_budgets():
    with pytest.raises(ValueError, match="strictly increasing"):
        _config(budgets=(130, 90))
    with pytest.raises(ValueError, match="must cover the seed set"):
        _config(budgets=(50, 130))


def test_run_spends_exactly_the_budget_and_records_every_round(setup, tmp_path):
    model, ds, pool = setup
    orc = oracle.Oracle(model, budget=130, ledger=tmp_path / "ledger.bin")
    ex = loop.Extraction(orc, pool, ds.x_test, ds.y_test, _config(), secret=model, out=tmp_path)
    summary = ex.run()
    assert orc.spent == 130
    queries = [r["queries"] for r in ex.records]
    assert queries == [60, 80, 90, 110, 130]  # k capped so that each budget is hit exactly
    assert set(summary["budgets"]) == {"90", "130"}
    for b in ("90", "130"):
        row = summary["budgets"][b]
        assert 0.0 <= row["agreement"] <= 1.0
        assert 0.0 <= row["secret_error_under_transfer"] <= 1.0
    # Selected samples are distinct pool indices, disjoint from the validation split.
    picked = np.concatenate([ex.val_idx, ex.labelled_idx])
    assert len(np.unique(picked)) == 130
    lines = (tmp_path / "rounds.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == list(range(5))
    rec = json.loads(lines[-1])
    assert set(rec["seconds"]) == {"query", "train", "eval", "select"}
    assert json.loads((tmp_path / "summary.json").read_text())["budgets"]["130"]["queries"] == 130


def test_oracle_budget_below_largest_budget_is_refused(setup, tmp_path):
    model, ds, pool = setup
    orc = oracle.Oracle(model, budget=100, ledger=tmp_path / "l.bin")
    with pytest.raises(ValueError, match="below the largest requested budget"):
        loop.Extraction(orc, pool, ds.x_test, ds.y_test, _config(), secret=model, out=tmp_path)


def test_resume_with_other_settings_is_refused(setup, tmp_path):
    model, ds, pool = setup
    orc = oracle.Oracle(model, budget=130, ledger=tmp_path / "ledger.bin")
    ex = loop.Extraction(orc, pool, ds.x_test, ds.y_test, _config(), secret=model, out=tmp_path)
    ex.step()
    with pytest.raises(ValueError, match="other settings.*seed"):
        loop.Extraction(orc, pool, ds.x_test, ds.y_test, _config(seed=4), secret=model, out=tmp_path, resume=True)


def test_a_gray_pool_is_what_the_oracle_sees_and_the_summary_records_the_pool(setup, tmp_path):
    model, ds, pool = setup
    gray = data.Pool(pool.name, pool.storage, pool.indices, pool.info, transform="gray")
    orc = oracle.Oracle(model, budget=60, ledger=tmp_path / "ledger.bin")
    ex = loop.Extraction(orc, gray, ds.x_test, ds.y_test, _config(budgets=(60,)), secret=model, out=tmp_path)
    summary = ex.run()
    asked = ex.query_stream()
    assert len(asked) == 60 and (asked[..., 0] == asked[..., 1]).all() and (asked[..., 1] == asked[..., 2]).all()
    assert summary["pool"] == gray.describe() == json.loads((tmp_path / "summary.json").read_text())["pool"]
    assert summary["pool"]["transform"] == "gray" and summary["pool"]["sources"] == pool.info["sources"]
    with pytest.raises(ValueError, match="another thief pool .*transform gray.*this one: .*transform None"):
        loop.Extraction(orc, pool, ds.x_test, ds.y_test, _config(budgets=(60,)), secret=model, out=tmp_path,
                              resume=True)


def test_configure_refuses_the_secrets_own_dataset_as_its_pool():
    prof = profiles.get_profile("ci").with_(pool="digits", pool_size=1000)
    with pytest.raises(UsageError, match="pool 'digits' holds the images of the secret's own dataset 'digits'"):
        loop.configure(prof, "random", dataset="digits")
    assert loop.configure(prof, "random", dataset="digits", allow_problem_domain=True).strategy == "random"
    loop.configure(prof, "random", dataset="fashion-mnist")
    with pytest.raises(UsageError, match="pool transform"):
        loop.configure(prof.with_(pool_transform="sepia"), "random", dataset="fashion-mnist")


def _extract_cmd(secret_dir, out, *extra):
    return [sys.executable, "-m", "stealnb.cli", "extract", "--secret", str(secret_dir), "--strategy", "kcenter",
            "--profile", "ci", "--pool-size", "500", "--budgets", "90,130", "--round-size", "10", "--seed-size", "40", "--val-size", "20",
            "--seed", "3", "--out", str(out), "--quiet", *extra]




@pytest.mark.timeout(900)  # two extraction subprocesses: ~2 min, longer on a loaded 2-core runner
def test_resume_after_kill_equals_uninterrupted_run(secret_dir, tmp_path):
    env = dict(os.environ, PYTHONHASHSEED="0")
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    subprocess.run(_extract_cmd(secret_dir, ref), check=True, env=env, capture_output=True)

    proc = subprocess.Popen(_extract_cmd(secret_dir, cut), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    rounds = cut / "rounds.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if rounds.exists() and len(rounds.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(rounds.read_text().splitlines())
    assert 3 <= killed_at < 8 and not (cut / "summary.json").exists()
    paid_before = len(oracle.read_ledger(cut / "ledger.bin")[0]) - 1  # minus the header record

    subprocess.run(_extract_cmd(secret_dir, cut, "--resume"), check=True, env=env, capture_output=True)
    assert comparable_run(cut) == comparable_run(ref)
    # Zero repeated queries: the ledger holds each paid sample once, 130 in all.
    payloads = oracle.read_ledger(cut / "ledger.bin")[0]
    assert len(payloads) - 1 == 130 >= paid_before
    assert json.loads((cut / "summary.json").read_text())["oracle_spent"] == 130


@pytest.mark.parametrize("runner", ["extraction", "copycat"])
def test_fresh_run_refuses_to_delete_an_external_oracles_ledger(setup, secret_dir, tmp_path, runner):
    from stealnb.extraction import copycat

    model, _, _ = setup
    out = tmp_path / "run"
    out.mkdir()
    orc = oracle.Oracle(model, budget=200, ledger=out / "ledger.bin")
    orc.query(np.zeros((3, 32, 32, 3), np.float32) + np.arange(3, dtype=np.float32)[:, None, None, None] / 4)
    kw = dict(profile=profiles.PROFILES["ci"], out=out, secret_dir=secret_dir, oracle=orc, resume=False)
    run = (lambda: loop.run_extraction("digits", "cnn-tiny", "random", **kw)) if runner == "extraction" else (
        lambda: copycat.run_copycat("digits", "cnn-tiny", "npdd", **kw))
    with pytest.raises(ValueError, match="query ledger"):
        run()
    assert (out / "ledger.bin").exists() and oracle.read_ledger(out / "ledger.bin")[0]  # nothing deleted
    # a ledger kept elsewhere is not protected: the fresh run clears ``out``, an earlier run, as
    # before (the tiny budget then stops the run right after its set-up)
    (out / "rounds.jsonl").write_text("{}\n")
    kw["oracle"] = oracle.Oracle(model, budget=1, ledger=tmp_path / "elsewhere.bin")
    with pytest.raises(ValueError, match="budget") as err:
        run()
    assert "query ledger" not in str(err.value) and not (out / "rounds.jsonl").exists()


def test_query_stream_is_what_the_oracle_was_paid_for_in_order(setup, tmp_path):
    model, ds, pool = setup
    orc = oracle.Oracle(model, budget=130, ledger=tmp_path / "ledger.bin")
    ex = loop.Extraction(orc, pool, ds.x_test, ds.y_test, _config(), secret=model, out=tmp_path)
    ex.run()
    stream = ex.query_stream()
    asked = ex.pool.get(np.concatenate([ex.val_idx, ex.labelled_idx]))
    assert len(stream) == orc.spent == len(set(oracle.fingerprint(asked)))
    np.testing.assert_array_equal(stream[:20], asked[:20])  # the validation split comes first
    x = np.stack([asked[3], asked[1], asked[3], asked[0], asked[1]])
    np.testing.assert_array_equal(oracle.distinct(x), x[[0, 1, 3]])  # first occurrences, in order


def _weights_equal(a, b):
    return all(np.array_equal(u, v) for u, v in zip(a.get_weights(), b.get_weights()))


def test_the_substitute_depends_on_the_labelled_set_not_its_order(setup, tmp_path):
    """Two strategies that pick the same set in different orders must train the same substitute."""
    model, ds, pool = setup
    cfg = _config(strategy="random", epochs=3)
    runs = []
    for name, permute in (("a", False), ("b", True)):
        orc = oracle.Oracle(model, budget=130)
        ex = loop.Extraction(orc, pool, ds.x_test, ds.y_test, cfg, secret=model)
        if permute:
            ex.labelled_idx = ex.labelled_idx[np.random.default_rng(1).permutation(len(ex.labelled_idx))]
        runs.append((ex.step(), ex.substitute))
    (ra, sa), (rb, sb) = runs
    assert _weights_equal(sa, sb)
    for key in ("agreement", "accuracy", "macro_f1", "val_macro_f1", "top_class_share", "best_epoch"):
        assert ra[key] == rb[key]


def test_profile_recipe_reaches_the_substitute(setup):
    from stealnb.core import profiles

    model, ds, pool = setup
    prof = profiles.get_profile("ci").with_(substitute_batch_size=8, substitute_min_steps=25, substitute_epochs=1,
                                            patience=1, substitute_learning_rate=3e-4, substitute_class_weight=True)
    cfg = loop.ExtractionConfig.from_profile(prof, "random", budgets=(90, 130), seed_size=40, val_size=20,
                                                   round_size=20, seed=3)
    assert (cfg.batch_size, cfg.min_steps, cfg.epochs, cfg.patience, cfg.learning_rate, cfg.class_weight,
            cfg.monitor) == (8, 25, 1, 1, 3e-4, True, "macro_f1")
    ex = loop.Extraction(oracle.Oracle(model, budget=130), pool, ds.x_test, ds.y_test, cfg, secret=model)
    rec = ex.step()
    assert rec["steps"] == rec["epochs_trained"] * 5 and rec["steps"] >= 25  # 40 images at batch 8
    assert ex.summary()["config"]["batch_size"] == 8  # recorded in summary.json


def test_round_records_say_how_near_the_substitute_is_to_constant(setup):
    from stealnb.core import metrics

    model, ds, pool = setup
    ex = loop.Extraction(oracle.Oracle(model, budget=130), pool, ds.x_test, ds.y_test, _config(), secret=model)
    rec = ex.step()
    pred = ex.substitute.predict(ds.x_test, verbose=0).argmax(1)
    assert rec["top_class_share"] == pytest.approx(np.bincount(pred).max() / len(pred))
    assert rec["classes_predicted"] == len(np.unique(pred))
    lines = loop.collapse_warnings([{**rec, "top_class_share": metrics.COLLAPSE_SHARE + 0.01},
                                          {**rec, "top_class_share": 0.5}])
    assert len(lines) == 1 and f"round {rec['round']}" in lines[0] and "collapsed" in lines[0]


def test_each_budget_reports_the_transferability_of_its_own_substitute(setup):
    """FGSM crafted on that round's substitute with the true test labels and the configured eps,
    measured on the secret (recomputed here with cleverhans directly: tests/reference.py)."""
    import reference

    model, ds, pool = setup
    ex = loop.Extraction(oracle.Oracle(model, budget=130), pool, ds.x_test, ds.y_test,
                               _config(strategy="random", fgsm_eps=0.1, budgets=(80, 100)), secret=model)
    budgets = []
    while not ex.done:
        rec = ex.step()
        if rec["budget"] is None:
            assert rec["transfer"] is None
            continue
        budgets.append(rec["budget"])
        assert rec["transfer"] == reference.transferability(model, ex.substitute, ds.x_test, ds.y_test, 0.1)
    assert budgets == [80, 100]
    assert ex.summary()["budgets"]["100"]["adv_agreement"] == rec["transfer"]["adv_agreement"]


class _FitSpy:
    """Wraps :func:`stealnb.core.train.fit`, keeping each call's model and its weights before and after."""

    def __init__(self, fit):
        self.fit, self.calls = fit, []

    def __call__(self, model, x, y, **kw):
        call = {"model": model, "start": model.get_weights(), "n": len(x), "kw": kw}
        self.calls.append(call)
        call["hist"] = self.fit(model, x, y, **kw)
        call["end"] = model.get_weights()
        return call["hist"]


def test_warm_start_continues_from_the_previous_rounds_weights_and_cold_start_does_not(setup, monkeypatch):
    from stealnb.core import models

    model, ds, pool = setup
    for warm in (True, False):
        spy = _FitSpy(loop.fit)
        monkeypatch.setattr(loop, "fit", spy)
        cfg = _config(strategy="random", warm_start=warm)
        ex = loop.Extraction(oracle.Oracle(model, budget=130), pool, ds.x_test, ds.y_test, cfg, secret=model)
        ex.step()
        ex.step()
        first, second = spy.calls
        fresh = models.build(cfg.substitute, num_classes=10, seed=cfg.seed * 1000 + 1).get_weights()
        assert not _arrays_equal(first["end"], fresh)
        if warm:  # the same model, continued from where round 0 ended
            assert second["model"] is first["model"] and _arrays_equal(second["start"], first["end"])
        else:  # a new model each round, initialised with that round's seed
            assert second["model"] is not first["model"] and _arrays_equal(second["start"], fresh)
        assert (first["n"], second["n"]) == (40, 60)


def _arrays_equal(a, b):
    return len(a) == len(b) and all(np.array_equal(u, v) for u, v in zip(a, b))


def test_a_resumed_warm_start_run_ends_with_the_weights_and_records_of_an_uninterrupted_one(setup, tmp_path):
    model, ds, pool = setup
    cfg = _config(strategy="random", warm_start=True, budgets=(80, 100))  # rounds at 60, 80, 100 queries

    def make(out, resume=False):
        orc = oracle.Oracle(model, budget=100, ledger=out / "ledger.bin")
        return loop.Extraction(orc, pool, ds.x_test, ds.y_test, cfg, secret=model, out=out, resume=resume)

    full = make(tmp_path / "full")
    full.run()
    part = make(tmp_path / "cut")
    part.step()
    part.step()
    del part  # "killed" after round 1's checkpoint
    resumed = make(tmp_path / "cut", resume=True)
    assert resumed.round == 2 and resumed.substitute is not None  # round 1's weights, from the checkpoint
    resumed.run()
    assert _weights_equal(resumed.substitute, full.substitute)
    drop = lambda recs: [{k: v for k, v in r.items() if k != "seconds"} for r in recs]  # noqa: E731
    assert drop(resumed.records) == drop(full.records) and len(full.records) == 3
    assert resumed.oracle.spent == full.oracle.spent == 100


def test_a_finished_run_is_read_back_without_training_or_querying(secret_dir, tmp_path, monkeypatch):
    """What the extraction notebook relies on after the pipeline's runs/ task of a seed ran it."""
    kw = dict(seed=0, results=tmp_path, secret_dir=secret_dir, budgets=(90, 130), seed_size=40, val_size=20,
              round_size=40, epochs=2)
    prof = profiles.get_profile("ci").with_(pool_size=500)
    first = loop.run_extraction("digits", "cnn-tiny", "random", prof, **kw)
    before = comparable_run(first.out)
    steps = []
    real = loop.Extraction.step
    monkeypatch.setattr(loop.Extraction, "step", lambda self: steps.append(1) or real(self))
    again = loop.run_extraction("digits", "cnn-tiny", "random", prof, **kw)
    assert steps == [] and again.oracle.spent == first.oracle.spent and again.oracle.replayed == 0
    assert again.out == first.out and comparable_run(again.out) == before


def test_a_finished_runs_summary_is_read_back_only_for_its_own_settings_and_pool(setup, tmp_path):
    """What the pool chapter reads instead of rebuilding a run its pool task finished."""
    model, ds, pool = setup
    cfg = _config()
    assert loop.finished_summary(tmp_path, cfg, pool) is None  # nothing ran
    orc = oracle.Oracle(model, budget=130, ledger=tmp_path / "ledger.bin")
    ex = loop.Extraction(orc, pool, ds.x_test, ds.y_test, cfg, secret=model, out=tmp_path)
    ex.step()
    assert loop.finished_summary(tmp_path, cfg, pool) is None  # checkpointed, not finished
    summary = json.loads(json.dumps(ex.run()))
    assert loop.finished_summary(tmp_path, cfg, pool) == summary
    assert loop.finished_summary(tmp_path, _config(seed=4), pool) is None
    gray = data.Pool(pool.name, pool.storage, pool.indices, pool.info, transform="gray")
    assert loop.finished_summary(tmp_path, cfg, gray) is None


def test_functions_below_the_cli_take_a_profile_not_its_name(tmp_path):
    """Names are resolved once, at the command line and in the notebooks (issue 18)."""
    from stealnb.experiments import pools
    from stealnb.extraction import copycat
    from stealnb.report import pipeline, results

    calls = [lambda: loop.run_extraction("digits", "cnn-tiny", "random", "ci", results=tmp_path),
             lambda: copycat.run_copycat("digits", "cnn-tiny", "npdd", "ci", results=tmp_path),
             lambda: results.open_extraction("digits", "cnn-tiny", "random", "ci", results=tmp_path),
             lambda: pools.run_pools("ci", results=tmp_path),
             lambda: train.ensure_secret("digits", "cnn-tiny", "ci", tmp_path),
             lambda: pipeline.plan("ci", tmp_path)]
    for call in calls:
        with pytest.raises(TypeError, match=r"get_profile\('ci'\)"):
            call()
    assert not any(tmp_path.iterdir())

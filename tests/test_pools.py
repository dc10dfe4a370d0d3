"""stealnb.experiments.pools: the "Which thief pool?" study (issue 14, item 5)."""
import json

import numpy as np
import pytest

from stealnb.core import data, layout
from stealnb.experiments import pools
from stealnb.extraction import loop
from stealnb.core._checks import UsageError
from stealnb.core.profiles import PROFILES, PoolStudy


def _tiny(**study):
    """The ci profile at test size: 40 seed + 20 validation queries, 2-epoch substitutes."""
    base = dict(pools=("natural-patches+gray", "uniform-noise"), cross_domain=(), budgets=(60, 90), seeds=(0, 1),
                round_size=30, pool_size=300)
    base.update(study)
    return PROFILES["ci"].with_(seed_size=40, val_size=20, substitute_epochs=2, patience=None,
                                pool_study=PoolStudy(**base))


@pytest.mark.timeout(900)
def test_run_pools_gives_every_pool_strategy_and_budget_with_a_ratio_to_noise(secret_dir, tmp_path):
    prof = _tiny()
    cmp = pools.run_pools(prof, secrets=[("digits", "cnn-tiny")], results=tmp_path, secret_dir=secret_dir)
    # No extraction chapter under tmp_path: "best" falls back to the profile's strategy.
    assert cmp.strategies.strategy.tolist() == ["random", prof.pool_study.fallback_strategy]
    assert "fallback" in cmp.strategies.reason.iloc[1]
    agr = cmp.agreement
    assert len(agr) == 2 * 2 * 2  # pools x strategies x budgets
    assert set(map(tuple, agr[["pool", "strategy", "budget"]].to_numpy())) == {
        (p, s, b) for p in prof.pool_study.pools for s in ("random", "kcenter") for b in (60, 90)}
    assert (agr.n_seeds == 2).all() and agr.agreement_ci95.notna().all() and agr.agreement_mean.between(0, 1).all()
    noise = agr[agr.pool == "uniform-noise"]
    np.testing.assert_allclose(noise.noise_ratio, 1.0)
    np.testing.assert_allclose(noise.gain_over_noise, 0.0)
    gray = agr[agr.pool == "natural-patches+gray"].set_index(["strategy", "budget"])
    base = noise.set_index(["strategy", "budget"])
    np.testing.assert_allclose(gray.noise_ratio, gray.agreement_mean / base.agreement_mean.loc[gray.index])
    # Label distributions: one row per pool and class, each pool's fractions summing to 1.
    assert len(cmp.labels) == 2 * 10
    np.testing.assert_allclose(cmp.labels.groupby("pool").fraction.sum(), 1.0)
    assert (cmp.entropy.entropy_bits <= cmp.entropy.max_bits + 1e-9).all() and (cmp.entropy["size"] == 300).all()
    # Every run paid exactly its budget and went where the layout says.
    assert len(cmp.runs) == 2 * 2 * 2 and (cmp.runs.oracle_spent == 90).all()
    assert cmp.runs.path.tolist()[0] == str(layout.pool_run_dir(tmp_path, "ci", "digits", "cnn-tiny",
                                                               "natural-patches+gray", "random", 0))
    # Run again: everything is read back from the finished runs, the same numbers.
    again = pools.run_pools(prof, secrets=[("digits", "cnn-tiny")], results=tmp_path, secret_dir=secret_dir)
    assert again.agreement.drop(columns="seeds").equals(agr.drop(columns="seeds"))
    best = pools.best_pool_table(agr)
    assert len(best) == 2 * 2 and set(best.best_pool) <= set(prof.pool_study.pools)


@pytest.mark.timeout(600)
def test_paired_seeds_draw_the_same_positions_on_every_pool(secret_dir, tmp_path):
    prof = _tiny(seeds=(0,), budgets=(60,))
    pools.run_pools(prof, secrets=[("digits", "cnn-tiny")], results=tmp_path, secret_dir=secret_dir)
    states = [json.loads((layout.pool_run_dir(tmp_path, "ci", "digits", "cnn-tiny", p, s, 0) / "checkpoint"
                          / "state.json").read_text()) for p in prof.pool_study.pools for s in ("random", "kcenter")]
    assert all(st["val_idx"] == states[0]["val_idx"] and st["labelled_idx"] == states[0]["labelled_idx"]
               for st in states)


def _summary(results, prof, strat, seed, agreement):
    d = layout.extraction_dir(results, prof.name, "digits", "cnn-tiny", strat, seed)
    d.mkdir(parents=True, exist_ok=True)
    (d / "summary.json").write_text(json.dumps({"budgets": {str(prof.budgets[-1]): {"agreement": agreement}}}))


def test_best_strategy_is_read_from_the_extraction_runs_else_the_fallback(tmp_path):
    prof = PROFILES["ci"].with_(seeds=(0, 1))
    strat, why = pools.best_strategy(prof, "digits", "cnn-tiny", tmp_path)
    assert strat == prof.pool_study.fallback_strategy and "fallback" in why
    for s, (a, b) in {"random": (0.99, 0.99), "kcenter": (0.5, 0.7), "dfal": (0.7, 0.6)}.items():
        _summary(tmp_path, prof, s, 0, a)
        _summary(tmp_path, prof, s, 1, b)
    _summary(tmp_path, prof, "uncertainty", 0, 0.95)  # one seed only: not a candidate
    strat, why = pools.best_strategy(prof, "digits", "cnn-tiny", tmp_path)
    assert strat == "dfal" and "0.650" in why  # random is the baseline, never "best"
    rows = pools.study_strategies(prof, "digits", "cnn-tiny", tmp_path)
    assert [r["strategy"] for r in rows] == ["random", "dfal"] and rows[1]["as"] == "best"


def test_pool_specs_add_installed_cross_domain_datasets_but_never_the_secrets_own(monkeypatch):
    present = {"digits", "fashion-mnist", "natural-patches", "uniform-noise", "dead-leaves"}
    monkeypatch.setattr(data, "present", lambda root=None: present)
    prof = _tiny(cross_domain=("fashion-mnist", "digits", "cifar10"))
    specs, skipped = pools.pool_specs(prof, "digits")
    assert specs == ["natural-patches+gray", "uniform-noise", "fashion-mnist"]
    assert "own images" in skipped["digits"] and skipped["cifar10"] == "not installed"
    specs, skipped = pools.pool_specs(prof, "fashion-mnist")
    assert specs[-1] == "digits" and "own images" in skipped["fashion-mnist"]


@pytest.mark.parametrize("study, message", [
    (dict(pools=("natural-patches+sepia", "uniform-noise")), "pool transform"),
    (dict(pools=("natural-patches",)), "baseline pool 'uniform-noise'"),
    (dict(pool_size=80), "cannot supply the 90"),
])
def test_a_bad_study_is_refused_before_any_pool_is_built(study, message, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "load_pool", lambda *a, **k: pytest.fail("a pool was built"))
    with pytest.raises(UsageError, match=message):
        pools.run_pools(_tiny(**study), secrets=[("digits", "cnn-tiny")], results=tmp_path)


def test_parse_pool_spec_splits_off_the_transform():
    assert pools.parse_pool_spec("natural-patches+gray") == ("natural-patches", "gray")
    assert pools.parse_pool_spec("dead-leaves") == ("dead-leaves", None)


def test_agreement_table_ratio_and_paired_gain_on_hand_made_runs():
    rows = [dict(dataset="d", arch="a", pool=p, strategy="random", seed=s, budget=100, agreement=v, accuracy=v,
                 top_class_share=0.2)
            for p, vals in (("photos", (0.6, 0.8)), ("uniform-noise", (0.3, 0.4))) for s, v in enumerate(vals)]
    t = pools.agreement_table(rows, "uniform-noise").set_index("pool")
    assert t.loc["photos", "noise_ratio"] == pytest.approx(0.7 / 0.35)
    assert t.loc["photos", "gain_over_noise"] == pytest.approx(0.35)
    assert t.loc["uniform-noise", "noise_ratio"] == pytest.approx(1.0)
    assert t.loc["photos", "agreement_ci95"] == pytest.approx(12.706 * np.std([0.6, 0.8], ddof=1) / np.sqrt(2), rel=1e-3)


def test_run_extraction_refuses_a_built_pool_that_is_not_the_profiles(tmp_path):
    pool = data.load_pool("uniform-noise", n=300, seed=0)
    with pytest.raises(ValueError, match="thief_pool: expected the profile's pool 'natural-patches'"):
        loop.run_extraction("digits", "cnn-tiny", "random", PROFILES["ci"].with_(pool_size=300),
                                  results=tmp_path, thief_pool=pool, budgets=(150, 200))
    assert not (tmp_path / "ci").exists()  # refused before the secret was trained


def test_every_profile_has_a_pool_study_inside_its_own_checks():
    for prof in PROFILES.values():
        st = prof.pool_study
        assert st.baseline in st.pools and list(st.budgets) == sorted(set(st.budgets))
        assert st.budgets[0] >= prof.seed_size + prof.val_size
        assert st.fallback_strategy in prof.strategies and set(st.strategies) <= {"best", *prof.strategies}
    assert PROFILES["ci"].pool_study.seeds == (0,)  # ci stays tiny: one seed

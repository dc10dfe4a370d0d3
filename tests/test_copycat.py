"""Copycat CNN (stealnb.extraction.copycat): end to end on tiny data, metrics, resume, analyses, comparison."""
import json

import numpy as np
import pytest

from stealnb.core import data, models, profiles, train
from stealnb.extraction import copycat, oracle

BUDGETS = (90, 130)
TINY = dict(budgets=BUDGETS, seed_size=40, val_size=20, epochs=2, patience=None, pdd_size=20, finetune_epochs=2)


@pytest.fixture(scope="module")
def tiny_prof():
    return profiles.get_profile("ci").with_(pool_size=400)


def _tiny(variant):
    kw = dict(TINY)
    if variant == "npdd":
        kw.pop("pdd_size")
    return kw


@pytest.fixture(scope="module")
def runs(secret_dir, tiny_prof, tmp_path_factory):
    """One finished tiny run per variant, laid out like results/ci/copycat/... ."""
    results = tmp_path_factory.mktemp("results")
    out = {}
    for v in copycat.VARIANTS:
        out[v] = copycat.run_copycat("digits", "cnn-tiny", v, tiny_prof, seed=1, results=results,
                                     secret_dir=secret_dir, resume=False, **_tiny(v))
    return results, out


def test_copy_scores_hand_made_case():
    y = np.array([0, 0, 1, 1, 2, 2])
    oracle_pred = np.array([0, 0, 1, 1, 2, 0])  # F1 = 2tp/(2tp+fp+fn): c0 4/5, c1 1, c2 2/3
    copy_pred = np.array([0, 1, 1, 1, 2, 0])  # c0 tp1 fp1 fn1 -> 1/2; c1 tp2 fp1 -> 4/5; c2 -> 2/3
    s = copycat.copy_scores(y, oracle_pred, copy_pred, 3)
    oracle_f1 = (0.8 + 1.0 + 2 / 3) / 3
    copy_f1 = (0.5 + 0.8 + 2 / 3) / 3
    assert s["macro_f1"] == pytest.approx(copy_f1)
    assert s["relative_f1"] == pytest.approx(copy_f1 / oracle_f1)
    assert s["agreement"] == pytest.approx(5 / 6)
    assert s["accuracy"] == pytest.approx(4 / 6)


def test_config_validation(tiny_prof):
    with pytest.raises(ValueError, match="variant"):
        copycat.CopycatConfig.from_profile(tiny_prof, "soft-labels")
    with pytest.raises(ValueError, match="uses no problem-domain data"):
        copycat.CopycatConfig.from_profile(tiny_prof, "npdd", pdd_size=10)
    with pytest.raises(ValueError, match="needs problem-domain images"):
        copycat.CopycatConfig.from_profile(tiny_prof, "pdd-sl", pdd_size=0)
    with pytest.raises(ValueError, match="must cover the seed set"):
        copycat.CopycatConfig.from_profile(tiny_prof, "npdd", budgets=(10, 20))
    cfg = copycat.CopycatConfig.from_profile(tiny_prof, "npdd+pdd")
    assert cfg.pdd_size == tiny_prof.copycat.pdd_size and cfg.budgets == tiny_prof.budgets
    assert cfg.extraction_config().strategy == "random"


def test_end_to_end_all_variants(runs, tiny_prof):
    results, ccs = runs
    for v, cc in ccs.items():
        s = json.loads((cc.out / "summary.json").read_text())
        pdd = 0 if v == "npdd" else TINY["pdd_size"]
        assert s["variant"] == v and set(s["budgets"]) == {"90", "130"}
        # PDD paid once, then replayed; "paid" counts distinct images (a pool may repeat an image).
        assert s["oracle_spent"] == s["budgets"]["130"]["paid"] == cc.oracle.spent
        assert BUDGETS[-1] + pdd - 2 <= s["oracle_spent"] <= BUDGETS[-1] + pdd
        oracle_f1 = s["oracle"]["macro_f1"]
        for b in BUDGETS:
            row = s["budgets"][str(b)]
            assert row["queries"] == b + pdd and row["npdd_queries"] == b and row["pdd_queries"] == pdd
            assert row["paid"] <= row["queries"]
            assert 0 <= row["agreement"] <= 1 and 0 <= row["macro_f1"] <= 1
            assert row["relative_f1"] == pytest.approx(row["macro_f1"] / oracle_f1)
            if v == "npdd":
                assert "npdd" not in row
            else:  # the copy before fine-tuning / without PDD is reported next to the variant's
                assert row["finetune_gain_f1"] == pytest.approx(row["macro_f1"] - row["npdd"]["macro_f1"])
        lines = [json.loads(x) for x in (cc.out / "rounds.jsonl").read_text().splitlines()]
        assert [r["queries"] for r in lines] == ([60, 90, 130] if v == "npdd" else [110, 150])
        assert (cc.out / "npdd" / "summary.json").exists() and (cc.out / "ledger.bin").exists()
    # Same seed -> the same NPDD images and NPDD copy in every variant.
    npdd = {v: cc.summary()["budgets"]["130"] for v, cc in ccs.items()}
    assert npdd["pdd-sl"]["npdd"]["macro_f1"] == pytest.approx(npdd["npdd"]["macro_f1"])
    assert npdd["npdd+pdd"]["npdd"]["agreement"] == pytest.approx(npdd["npdd"]["agreement"])
    # Stolen labels replay from the ledger without new queries.
    spent = ccs["pdd-sl"].oracle.spent
    stolen = ccs["pdd-sl"].stolen_labels()
    assert len(stolen["npdd"]) == 130 and len(stolen["pdd"]) == TINY["pdd_size"]
    assert ccs["pdd-sl"].oracle.spent == spent


def _comparable(summary):
    """A summary without its timings (they differ between any two runs)."""
    drop = ("seconds",)
    out = {k: v for k, v in summary.items() if k not in drop}
    out["budgets"] = {b: {k: v for k, v in r.items() if k not in drop} for b, r in summary["budgets"].items()}
    return out


def test_variants_run_on_one_npdd_extraction_give_the_results_of_separate_runs(runs, secret_dir, tiny_prof, tmp_path,
                                                                               monkeypatch):
    _, separate = runs
    trained = []
    monkeypatch.setattr(copycat.Extraction, "step", _counting(copycat.Extraction.step, trained))
    shared = copycat.run_copycat_variants("digits", "cnn-tiny", copycat.VARIANTS, tiny_prof, seed=1, results=tmp_path,
                                          secret_dir=secret_dir, resume=False, **TINY)
    assert len(trained) == 3  # the NPDD rounds (seed set, 90, 130) once, not once per variant
    for v in copycat.VARIANTS:
        assert _comparable(shared[v].summary()) == _comparable(separate[v].summary()), v
        assert shared[v].oracle.spent == separate[v].oracle.spent  # each variant paid for what it trained on
        assert (shared[v].out / "summary.json").is_file() and (shared[v].out / "ledger.bin").is_file()
    assert (shared["npdd"].out / "npdd" / "summary.json").is_file() and not (shared["pdd-sl"].out / "npdd").exists()
    # resumed: read back, nothing trained again; and pdd-sl alone still finds the shared extraction
    again = copycat.run_copycat_variants("digits", "cnn-tiny", copycat.VARIANTS, tiny_prof, seed=1, results=tmp_path,
                                         secret_dir=secret_dir, **TINY)
    alone = copycat.run_copycat("digits", "cnn-tiny", "pdd-sl", tiny_prof, seed=1, results=tmp_path,
                                secret_dir=secret_dir, **TINY)
    assert len(trained) == 3
    assert _comparable(again["npdd+pdd"].summary()) == _comparable(separate["npdd+pdd"].summary())
    assert _comparable(alone.summary()) == _comparable(separate["pdd-sl"].summary())


def test_pdd_sl_added_after_npdd_ran_alone_gets_its_own_npdd_extraction(runs, secret_dir, tiny_prof, tmp_path):
    _, separate = runs
    copycat.run_copycat("digits", "cnn-tiny", "npdd", tiny_prof, seed=1, results=tmp_path, secret_dir=secret_dir,
                        resume=False, **_tiny("npdd"))
    # npdd's extraction is finished: only its last NPDD copy is on disk, pdd-sl needs the one at 90 too
    later = copycat.run_copycat_variants("digits", "cnn-tiny", ["npdd", "pdd-sl"], tiny_prof, seed=1,
                                         results=tmp_path, secret_dir=secret_dir, **TINY)
    assert (later["pdd-sl"].out / "npdd" / "summary.json").is_file()
    assert _comparable(later["pdd-sl"].summary()) == _comparable(separate["pdd-sl"].summary())


def _counting(step, calls):
    def counted(self, *a, **kw):
        calls.append(self.out)
        return step(self, *a, **kw)
    return counted


def test_resume_after_interrupt_matches_uninterrupted(secret_dir, tiny_prof, tmp_path):
    model, _ = train.load_secret(secret_dir)
    ds = data.load_dataset("digits")
    pool = data.load_pool("natural-patches", n=400, seed=0)
    cfg = copycat.CopycatConfig.from_profile(tiny_prof, "pdd-sl", seed=2, **TINY)
    x_pdd = ds.x_train[copycat.select_pdd(ds.x_train, cfg.pdd_size, 2)]

    def make(out, resume=False):
        orc = oracle.Oracle(model, budget=BUDGETS[-1] + cfg.pdd_size, ledger=out / "ledger.bin")
        return copycat.Copycat(orc, pool, x_pdd, ds.x_test, ds.y_test, cfg, secret=model, out=out, resume=resume)

    full = make(tmp_path / "a").run()
    part = make(tmp_path / "b")
    part.step()  # round 0 (seed + validation set)
    part.ex.step()  # the NPDD round at budget 90 checkpointed, "killed" before its fine-tuning
    del part
    resumed = make(tmp_path / "b", resume=True)
    assert [r["round"] for r in resumed._pending()] == [1]
    again = resumed.run()
    # <= : an image a pool holds twice is paid once.
    assert resumed.oracle.spent == full["oracle_spent"] == full["budgets"]["130"]["paid"] <= BUDGETS[-1] + cfg.pdd_size
    for b in ("90", "130"):
        for k in ("queries", "agreement", "accuracy", "macro_f1", "relative_f1"):
            assert again["budgets"][b][k] == full["budgets"][b][k], (b, k)
        assert again["budgets"][b]["npdd"] == full["budgets"][b]["npdd"]
    # A finished run resumes to the same summary without training or paying anything.
    done = make(tmp_path / "b", resume=True)
    assert done.done and done.run()["budgets"] == again["budgets"]
    with pytest.raises(ValueError, match="other settings"):
        other = copycat.CopycatConfig.from_profile(tiny_prof, "pdd-sl", seed=3, **TINY)
        orc = oracle.Oracle(model, budget=200, ledger=tmp_path / "b" / "ledger.bin")
        copycat.Copycat(orc, pool, x_pdd, ds.x_test, ds.y_test, other, secret=model, out=tmp_path / "b", resume=True)


def test_cli_copycat(secret_dir, tmp_path, capsys):
    from stealnb import cli

    out = tmp_path / "run"
    rc = cli.main(["copycat", "--secret", str(secret_dir), "--variant", "npdd+pdd", "--profile", "ci",
                   "--budgets", "90,130", "--seed-size", "40", "--val-size", "20", "--epochs", "2",
                   "--pool-size", "400", "--pdd-size", "20", "--out", str(out), "--quiet"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["oracle_spent"] == s["budgets"]["130"]["paid"] and s["budgets"]["130"]["queries"] == 150
    assert "relative F1" in capsys.readouterr().out
    args = cli.build_parser().parse_args(["copycat", "--secret-dataset", "digits", "--arch", "cnn-tiny",
                                          "--variant", "npdd", "--resume"])
    assert args.dataset == "digits" and args.resume and args.func is cli._cmd_copycat


def test_label_distribution_and_api_cost():
    df = copycat.label_distribution(np.array([0, 2, 2, 1, 2]), 4)
    assert df["count"].tolist() == [1, 1, 3, 0] and df["fraction"].sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="< 4"):
        copycat.label_distribution(np.array([5]), 4)
    summary = {"budgets": {"1000": {"queries": 1200, "relative_f1": 0.9, "agreement": 0.8},
                           "500": {"queries": 700, "relative_f1": 0.5, "agreement": 0.4}}}
    t = copycat.api_cost_table(summary, {"p": 2.0})
    assert t["budget"].tolist() == [500, 1000] and t["cost: p"].tolist() == [1.4, 2.4]
    with pytest.raises(ValueError, match=r"prices\[.p.\] \(USD per 1,000 calls\): expected a value >= 0"):
        copycat.api_cost_table(summary, {"p": -1})


def test_tsne_and_lrp_helpers(tiny_model, rng):
    x = rng.random((12, 32, 32, 3), dtype=np.float32)
    emb = copycat.tsne_embedding({"a": x[:6], "b": x[6:]}, tiny_model, seed=0, perplexity=3)
    assert emb.shape == (12, 4) and set(emb["group"]) == {"a", "b"}
    assert copycat.oracle_space(tiny_model, x[:3], "penultimate").shape == (3, 64)
    res = copycat.lrp_correlations(tiny_model, tiny_model, x[:4])
    assert res["oracle"].shape == (4, 32, 32)
    np.testing.assert_allclose(res["correlation"], 1.0, atol=1e-6)  # same model -> identical heatmaps
    other = models.build("cnn-tiny", seed=5)
    assert copycat.lrp_correlations(tiny_model, other, x[:4], target="own")["correlation"].shape == (4,)


def test_comparison_table(runs, tmp_path):
    results, ccs = runs
    df = copycat.comparison_table(results, "ci", "digits", "cnn-tiny")
    assert set(df["method"]) == set(copycat.VARIANTS) and len(df) == 6
    row = df[(df.method == "pdd-sl") & (df.budget == 130)].iloc[0]
    s = ccs["pdd-sl"].summary()["budgets"]["130"]
    assert row.n_seeds == 1 and row.relative_f1_mean == pytest.approx(s["relative_f1"]) and np.isnan(row.relative_f1_std)
    assert row.queries_mean == 150
    # Hand-made extraction summaries: mean/std over seeds, relative F1 from the copycat's oracle F1.
    ex = tmp_path / "ci" / "extraction" / "digits-cnn-tiny" / "random"
    for seed, f1 in ((0, 0.4), (1, 0.6)):
        (ex / f"seed{seed}").mkdir(parents=True)
        (ex / f"seed{seed}" / "summary.json").write_text(json.dumps(
            {"budgets": {"100": {"queries": 100, "agreement": f1 + 0.1, "macro_f1": f1}}}))
    df2 = copycat.comparison_table(tmp_path, "ci", "digits", "cnn-tiny")
    r = df2.iloc[0]
    assert (r.family, r.method, r.n_seeds) == ("activethief", "random", 2)
    assert r.macro_f1_mean == pytest.approx(0.5) and r.macro_f1_std == pytest.approx(np.std([0.4, 0.6], ddof=1))
    assert np.isnan(r.relative_f1_mean)  # no secret metrics.json and no copycat summary there
    assert copycat.comparison_table(tmp_path / "none", "ci", "digits", "cnn-tiny").empty


class _FitSpy:
    """Wraps :func:`stealnb.core.train.fit` as the copycat module calls it, keeping each call's
    arguments, its model's starting weights and, at that moment, the NPDD extraction's copy."""

    def __init__(self, fit):
        self.fit, self.calls, self.copycat = fit, [], None

    def __call__(self, model, x, y, **kw):
        npdd = self.copycat.ex.substitute
        call = {"model": model, "start": model.get_weights(), "x": x.copy(), "y": y.copy(), "kw": kw,
                "npdd_model": npdd, "npdd_weights": npdd.get_weights()}
        self.calls.append(call)
        call["hist"] = self.fit(model, x, y, **kw)
        return call["hist"]


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("variant", ["pdd-sl", "npdd+pdd"])
def test_pdd_sl_fine_tunes_a_copy_of_the_npdd_copycat_and_npdd_pdd_trains_a_fresh_one_on_the_union(
        secret_dir, tiny_prof, monkeypatch, variant):
    import reference

    model, _ = train.load_secret(secret_dir)
    ds = data.load_dataset("digits")
    pool = data.load_pool("natural-patches", n=400, seed=0)
    cfg = copycat.CopycatConfig.from_profile(tiny_prof, variant, seed=1, **{**TINY, "budgets": (90,), "finetune_epochs": 3})
    x_pdd = ds.x_train[copycat.select_pdd(ds.x_train, cfg.pdd_size, 1)]
    spy = _FitSpy(copycat.fit)
    monkeypatch.setattr(copycat, "fit", spy)
    cc = spy.copycat = copycat.Copycat(oracle.Oracle(model, budget=90 + cfg.pdd_size), pool, x_pdd, ds.x_test,
                                       ds.y_test, cfg, secret=model)
    assert cc.step() is None  # round 0 (seed + validation set): below the budget, no copycat
    row = cc.step()  # the NPDD round at 90 queries, then the variant's copycat
    assert row["budget"] == 90 and len(spy.calls) == 1
    call = spy.calls[0]
    secret_labels = lambda x: models.predict_labels(model, x)  # noqa: E731
    x_npdd = pool.get(np.sort(cc.ex.labelled_idx))
    fresh = models.build(cfg.substitute, num_classes=10, seed=cfg.seed * 1000 + row["round"]).get_weights()
    assert not _same(call["npdd_weights"], fresh)
    if variant == "pdd-sl":  # from the NPDD copycat's weights, on the PDD-SL only, the fine-tuning recipe
        assert _same(call["start"], call["npdd_weights"]) and call["model"] is not call["npdd_model"]
        np.testing.assert_array_equal(call["x"], x_pdd)
        np.testing.assert_array_equal(call["y"], secret_labels(x_pdd))
        assert {k: call["kw"][k] for k in ("epochs", "learning_rate", "batch_size")} == {
            "epochs": 3, "learning_rate": cfg.finetune_learning_rate, "batch_size": cfg.finetune_batch_size}
        assert call["kw"].get("validation") is None and row["epochs_trained"] == len(call["hist"]["loss"]) == 3
        assert row["labelled"] == len(x_npdd) + len(x_pdd)  # what the copy has seen, NPDD first
    else:  # from a fresh initialisation, on NPDD-SL + PDD-SL, the substitute's recipe
        assert _same(call["start"], fresh)
        np.testing.assert_array_equal(call["x"], np.concatenate([x_npdd, x_pdd]))
        np.testing.assert_array_equal(call["y"], secret_labels(call["x"]))
        assert row["labelled"] == len(call["x"]) == 70 + cfg.pdd_size
        assert call["kw"]["epochs"] == cfg.epochs and row["epochs_trained"] == len(call["hist"]["loss"])
        np.testing.assert_array_equal(call["kw"]["validation"][0], pool.get(cc.ex.val_idx))
    assert _same(call["npdd_model"].get_weights(), call["npdd_weights"])  # the NPDD copycat is left as it was
    assert cc.model is call["model"]
    assert row["transfer"] == reference.transferability(model, cc.model, ds.x_test, ds.y_test, cfg.fgsm_eps)

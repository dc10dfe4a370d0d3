"""stealnb.report.results: result files -> thesis-style tables, on small hand-written result trees."""
import json

import numpy as np
import pandas as pd
import pytest

from stealnb.core import layout, profiles
from stealnb.extraction import oracle
from stealnb.report import plots, results


# -- hand-written result files ------------------------------------------------------------------

def _secret(root, profile, dataset, arch, folds, best_fold=None, **extra):
    d = layout.secret_dir(root, profile, dataset, arch)
    d.mkdir(parents=True)
    best_fold = int(np.argmax(folds)) if best_fold is None else best_fold
    meta = {"dataset": dataset, "arch": arch, "profile": profile, "seed": 0, "folds": len(folds),
            "best_fold": best_fold, "test_accuracy": folds[best_fold], "fold_test_accuracy": folds,
            "params_total": 1234, "params_trainable": 1200, "seconds": 3.5, **extra}
    (d / "metrics.json").write_text(json.dumps(meta))
    return d


def _rec(rnd, queries, labelled, agreement, budget=None, transfer=None, secs=(0.1, 1.0, 0.2, 0.3)):
    return {"round": rnd, "queries": queries, "labelled": labelled, "k": 0, "agreement": agreement,
            "accuracy": agreement - 0.05, "macro_f1": agreement - 0.1, "val_accuracy": 0.5, "epochs_trained": 3,
            "budget": budget, "transfer": transfer, "next_k": 50,
            "seconds": dict(zip(("query", "train", "eval", "select"), secs))}


def _run(root, profile, dataset, arch, strategy, seed, agreements, budgets=(200, 300), complete=True,
         transfers=None, substitute="cnn-tiny"):
    """A run with rounds at 150, 200, 250, 300 queries (seed 100 + val 50, k 50), like the ci profile."""
    d = layout.extraction_dir(root, profile, dataset, arch, strategy, seed)
    d.mkdir(parents=True)
    recs = []
    for i, (q, a) in enumerate(zip((150, 200, 250, 300), agreements)):
        b = q if q in budgets else None
        tr = (transfers or {}).get(q) if b else None
        recs.append(_rec(i, q, q - 50, a, budget=b, transfer=tr))
    (d / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    config = {"strategy": strategy, "substitute": substitute, "budgets": list(budgets), "seed": seed}
    if complete:
        (d / "summary.json").write_text(json.dumps({"config": config, "budgets": {}}))
    else:
        (d / "checkpoint").mkdir()
        (d / "checkpoint" / "state.json").write_text(json.dumps({"config": config, "records": recs}))
    return d


@pytest.fixture
def tree(tmp_path):
    """ci-like results: digits/cnn-tiny secret, kcenter x 2 seeds, random x 2 seeds, dfal x 1 seed
    (incomplete), plus a mnist/vgg16 secret (the thesis' own setting) with one paper-like run."""
    _secret(tmp_path, "ci", "digits", "cnn-tiny", [0.80, 0.90])
    _secret(tmp_path, "ci", "fashion-mnist", "cnn-small", [0.70, 0.72, 0.74])
    tr = {200: {"transfer_rate": 0.5, "secret_error_under_transfer": 0.3, "fooled_substitute": 100},
          300: {"transfer_rate": None, "secret_error_under_transfer": 0.2, "fooled_substitute": 0}}
    _run(tmp_path, "ci", "digits", "cnn-tiny", "kcenter", 0, [0.1, 0.2, 0.3, 0.40], transfers=tr)
    _run(tmp_path, "ci", "digits", "cnn-tiny", "kcenter", 1, [0.1, 0.4, 0.3, 0.60], transfers=tr)
    _run(tmp_path, "ci", "digits", "cnn-tiny", "random", 0, [0.1, 0.1, 0.2, 0.30])
    _run(tmp_path, "ci", "digits", "cnn-tiny", "random", 1, [0.1, 0.3, 0.2, 0.30])
    _run(tmp_path, "ci", "digits", "cnn-tiny", "dfal", 0, [0.1, 0.3, 0.3], complete=False)
    return tmp_path


# -- the thesis mapping ---------------------------------------------------------------------------

def test_thesis_setting_same_and_reference():
    same = results.thesis_setting("mnist", "vgg16", 2500, (2500, 5000, 10000), substitute="vgg16")
    assert same == {"thesis_dataset": "mnist", "thesis_arch": "vgg16", "thesis_budget": 2500,
                    "thesis_match": results.SAME}
    # A different substitute, a non-thesis budget or architecture, or the digits data: reference only.
    assert results.thesis_setting("mnist", "vgg16", 2500, substitute="cnn-small")["thesis_match"] == results.REFERENCE
    ci = results.thesis_setting("digits", "cnn-tiny", 200, (200, 300))
    assert (ci["thesis_dataset"], ci["thesis_arch"], ci["thesis_budget"], ci["thesis_match"]) == \
        ("mnist", "vgg16", 5000, results.REFERENCE)
    assert results.thesis_setting("digits", "cnn-tiny", 300, (200, 300))["thesis_budget"] == 10000
    demo = [results.thesis_setting("digits", "cnn-small", b, (250, 500, 1000))["thesis_budget"] for b in (250, 500, 1000)]
    assert demo == [2500, 5000, 10000]
    assert results.thesis_setting("cifar10", "resnet50", 7000, (7000, 14000))["thesis_match"] == results.REFERENCE
    assert results.thesis_setting("gtsrb43", "alexnet")["thesis_dataset"] == "gtsrb"
    assert results.thesis_setting("uniform-noise", "vgg16") is None
    with pytest.raises(ValueError, match="largest budget"):
        results.thesis_setting("digits", "cnn-tiny", 400, (200, 300))


def test_thesis_table5_reads_the_reference_file():
    t = results.thesis_table5("mnist")
    assert len(t) == 5
    row = t[t.arch == "alexnet"].iloc[0]
    assert row.best == pytest.approx(0.94383) and row["std"] == pytest.approx(0.04947)
    with pytest.raises(KeyError, match="no 'digits'"):
        results.thesis_table5("digits")


# -- secrets --------------------------------------------------------------------------------------

def test_secrets_table(tree):
    df = results.secrets_table(tree, "ci")
    assert list(df.dataset) == ["digits", "fashion-mnist"]  # dashes in the folder name resolved
    d = df[df.dataset == "digits"].iloc[0]
    assert (d.arch, d.folds, d.best_fold) == ("cnn-tiny", 2, 1)
    assert d["mean"] == pytest.approx(0.85) and d["std"] == pytest.approx(0.05)  # population std over folds
    assert d.best == pytest.approx(0.90)
    assert (d.thesis_dataset, d.thesis_arch, d.thesis_match) == ("mnist", "vgg16", results.REFERENCE)
    assert d.thesis_best == pytest.approx(0.99291) and d.thesis_params == 14748170
    exact = results.secrets_table(tree, "ci", reference="exact")
    assert exact.thesis_best.isna().all() and exact.thesis_match.isna().all()
    assert results.secrets_table(tree / "nothing", "ci").empty


def test_secrets_table_same_setting(tmp_path):
    _secret(tmp_path, "paper", "cifar10", "resnet50", [0.7, 0.75, 0.8, 0.78, 0.77])
    r = results.secrets_table(tmp_path, "paper", reference="exact").iloc[0]
    assert r.thesis_match == results.SAME and r.thesis_mean == pytest.approx(0.77052)


def test_split_key(tree):
    assert results.split_key("fashion-mnist-cnn-small") == ("fashion-mnist", "cnn-small")
    assert results.split_key("gtsrb43-vgg16") == ("gtsrb43", "vgg16")
    with pytest.raises(ValueError, match="cannot tell dataset"):
        results.split_key("weird")


# -- runs and rounds --------------------------------------------------------------------------------

def test_load_runs_and_rounds(tree):
    runs = results.load_runs(tree, "ci")
    assert len(runs) == 5
    dfal = runs[runs.strategy == "dfal"].iloc[0]
    assert not dfal.complete and dfal.rounds == 3 and dfal.budgets == (200, 300)  # from the checkpoint config
    assert runs[runs.strategy == "kcenter"].complete.all()
    rounds = results.load_rounds(tree, "ci")
    assert len(rounds) == 4 * 4 + 3
    k0 = rounds[(rounds.strategy == "kcenter") & (rounds.seed == 0)]
    assert list(k0.queries) == [150, 200, 250, 300]
    assert list(k0.budget.isna()) == [True, False, True, False]
    r200 = k0[k0.queries == 200].iloc[0]
    assert r200.transfer_rate == 0.5 and r200.secret_error_under_transfer == 0.3 and r200.fooled_substitute == 100
    assert np.isnan(k0[k0.queries == 300].iloc[0].transfer_rate)  # never fooled -> None -> NaN
    assert r200.t_train == 1.0 and r200.seconds == pytest.approx(1.6) and r200.max_budget == 300
    assert results.load_rounds(tree / "none", "ci").empty


def test_bad_rounds_file_names_the_file(tree):
    p = layout.extraction_dir(tree, "ci", "digits", "cnn-tiny", "random", 0) / "rounds.jsonl"
    p.write_text(p.read_text() + "{not json\n")
    with pytest.raises(ValueError, match="rounds.jsonl, line 5"):
        results.load_rounds(tree, "ci")


def test_curve_stats_and_timings(tree):
    rounds = results.load_rounds(tree, "ci")
    cs = results.curve_stats(rounds)
    k = cs[(cs.strategy == "kcenter") & (cs.queries == 300)].iloc[0]
    assert k["mean"] == pytest.approx(0.5) and k["std"] == pytest.approx(np.std([0.4, 0.6], ddof=1))
    assert (k["min"], k["max"], k["n"]) == (0.4, 0.6, 2)
    d = cs[(cs.strategy == "dfal") & (cs.queries == 250)].iloc[0]
    assert d["n"] == 1 and np.isnan(d["std"])
    assert list(cs.strategy.unique()) == ["random", "kcenter", "dfal"]  # thesis order
    tt = results.timing_table(rounds)
    row = tt[(tt.strategy == "kcenter") & (tt["round"] == 1)].iloc[0]
    assert row.train == pytest.approx(1.0) and row.n == 2 and row.queries == 200
    with pytest.raises(KeyError, match="missing column"):
        results.curve_stats(rounds, metric="nope")


def test_agreement_table_with_thesis_column(tree):
    t = results.agreement_table(results.load_rounds(tree, "ci"))
    assert len(t) == 3 * 2 - 1  # 3 strategies x 2 budgets, but the dfal run stopped before 300
    k = t[(t.strategy == "kcenter") & (t.budget == 300)].iloc[0]
    assert k.n_seeds == 2 and k.seeds == [0, 1]
    assert k.agreement_mean == pytest.approx(0.5) and k.agreement_std == pytest.approx(np.std([0.4, 0.6], ddof=1))
    assert k.accuracy_mean == pytest.approx(0.45)
    # ci digits/cnn-tiny -> closest thesis setting: MNIST, VGG16 secret, 300 of 300 -> 10k queries.
    assert (k.thesis_dataset, k.thesis_arch, k.thesis_budget, k.thesis_match) == \
        ("mnist", "vgg16", 10000, results.REFERENCE)
    assert k.thesis_agreement == pytest.approx(0.8832)
    k200 = t[(t.strategy == "kcenter") & (t.budget == 200)].iloc[0]
    assert k200.thesis_budget == 5000 and k200.thesis_agreement == pytest.approx(0.6588)
    d = t[(t.strategy == "dfal") & (t.budget == 200)].iloc[0]
    assert d.n_seeds == 1 and np.isnan(d.agreement_std)
    # The incomplete dfal run never reached 300 queries: no row, not a zero.
    assert t[(t.strategy == "dfal") & (t.budget == 300)].empty
    assert results.agreement_table(results.load_rounds(tree / "none", "ci")).empty


def test_agreement_table_strategy_outside_the_thesis(tree):
    _run(tree, "ci", "digits", "cnn-tiny", "badge", 0, [0.1, 0.2, 0.3, 0.9])
    t = results.agreement_table(results.load_rounds(tree, "ci"))
    b = t[(t.strategy == "badge") & (t.budget == 300)].iloc[0]
    assert np.isnan(b.thesis_agreement) and b.thesis_match == results.REFERENCE
    assert list(t.strategy.unique())[-1] == "badge"


def test_transferability_table(tree):
    t = results.transferability_table(results.load_rounds(tree, "ci"))
    assert set(t.strategy) == {"kcenter"}  # only kcenter recorded transfer numbers
    t300 = t[t.budget == 300].iloc[0]
    assert np.isnan(t300.transfer_rate_mean) and t300.secret_error_under_transfer_mean == pytest.approx(0.2)
    assert t300.thesis_transferability == pytest.approx(0.4212)  # MNIST, kcenter, VGG16 secret, 10k
    t200 = t[t.budget == 200].iloc[0]
    assert t200.transfer_rate_mean == pytest.approx(0.5) and t200.fooled_substitute_mean == 100
    assert np.isnan(t200.thesis_transferability)  # the thesis reports transferability at 10k only


def test_best_strategy_table(tree):
    t = results.best_strategy_table(results.agreement_table(results.load_rounds(tree, "ci")))
    b200 = t[t.budget == 200].iloc[0]
    # kcenter mean (0.2+0.4)/2 = 0.3 ties dfal's single seed 0.3; random 0.2 is the baseline.
    assert b200.best_strategy == "kcenter = dfal"
    assert b200.agreement_mean == pytest.approx(0.3) and b200.gain_over_random == pytest.approx(0.1)
    assert b200.n_seeds == 1
    assert b200.thesis_best_strategy == "dfal+kcenter" and b200.thesis_best_agreement == pytest.approx(0.7845)
    b300 = t[t.budget == 300].iloc[0]
    assert b300.best_strategy == "kcenter" and b300.n_seeds == 2
    assert b300.random_agreement_mean == pytest.approx(0.3)


def test_thesis_style_grid(tree):
    g = results.thesis_style(results.agreement_table(results.load_rounds(tree, "ci")))
    assert list(g.columns) == ["200 ours", "200 thesis", "300 ours", "300 thesis"]
    # mean ± half-width of the 95% CI: t(0.975, 1) * 14.14 / sqrt(2) = 127.1 for two seeds 40 and 60
    assert g.loc[("digits", "cnn-tiny", "kcenter"), "300 ours"] == "50.0 ± 127.1 (n=2)"
    std = results.thesis_style(results.agreement_table(results.load_rounds(tree, "ci")), spread="std")
    assert std.loc[("digits", "cnn-tiny", "kcenter"), "300 ours"] == "50.0 ± 14.1 (n=2)"
    assert g.loc[("digits", "cnn-tiny", "kcenter"), "300 thesis"] == "88.32 @10,000"
    assert g.loc[("digits", "cnn-tiny", "dfal"), "300 ours"] == "–"
    assert g.loc[("digits", "cnn-tiny", "dfal"), "200 ours"] == "30.0 (n=1)"
    assert [k[2] for k in g.index] == ["random", "kcenter", "dfal"]
    tr = results.thesis_style(results.transferability_table(results.load_rounds(tree, "ci")),
                              metric="secret_error_under_transfer")
    assert tr.loc[("digits", "cnn-tiny", "kcenter"), "300 ours"] == "20.0 ± 0.0 (n=2)"
    assert results.thesis_style(results.agreement_table(results.load_rounds(tree / "none", "ci"))).empty


def test_format_pm():
    assert results.format_pm(0.5, 0.1, 3) == "50.0 ± 10.0 (n=3)"
    assert results.format_pm(float("nan")) == "–"
    assert results.format_pm(0.25, float("nan"), percent=False, digits=2) == "0.25"


# -- selections and the ledger ------------------------------------------------------------------------

def test_round_batches():
    recs = [{"round": 0, "queries": 150, "labelled": 3}, {"round": 1, "queries": 152, "labelled": 5},
            {"round": 2, "queries": 153, "labelled": 6}]
    idx = np.array([10, 11, 12, 40, 41, 7], np.int64)
    b = results.round_batches(recs, idx)
    assert list(b[b["round"] == 0].pool_index) == [10, 11, 12]
    assert list(b[b["round"] == 1].pool_index) == [40, 41] and list(b[b["round"] == 1].order) == [0, 1]
    assert list(b[b["round"] == 2].pool_index) == [7] and b[b["round"] == 2].queries.iloc[0] == 153
    with pytest.raises(ValueError, match="labelled=6"):
        results.round_batches(recs, idx[:5])


def _toy_model(calls):
    def model(x):
        calls.append(len(x))
        return np.stack([x.mean(axis=(1, 2, 3)), 1 - x.mean(axis=(1, 2, 3)), np.zeros(len(x))], -1)
    return model


@pytest.mark.parametrize("output", ["label", "topk", "probs"])
def test_ledger_labels_reads_answers_without_paying(tmp_path, output):
    rng = np.random.default_rng(0)
    x = rng.random((6, 32, 32, 3), dtype=np.float32)
    calls = []
    orc = oracle.Oracle(_toy_model(calls), output=output, top_k=2, num_classes=3, ledger=tmp_path / "l.bin")
    ans = orc.query(x[:4])
    top = ans if output == "label" else (ans[0][:, 0] if output == "topk" else ans.argmax(1))
    got = results.ledger_labels(tmp_path / "l.bin", x[[3, 0, 1]])
    assert got.dtype == np.int64 and list(got) == [top[3], top[0], top[1]]
    assert calls == [4]  # reading the ledger never ran the model
    with pytest.raises(KeyError, match="2 of 3 image"):
        results.ledger_labels(tmp_path / "l.bin", x[[0, 4, 5]])
    assert list(results.ledger_labels(tmp_path / "l.bin", x[[4, 2]], allow_missing=True)) == [-1, top[2]]
    with pytest.raises(FileNotFoundError):
        results.ledger_labels(tmp_path / "none.bin", x)


def test_open_extraction_steps_in_a_scratch_folder(tmp_path):
    prof = profiles.get_profile("ci").with_(epochs=1, pool_size=300, substitute_epochs=1)
    ex = results.open_extraction("digits", "cnn-tiny", "random", prof, seed=2, results=tmp_path,
                                 budgets=(100, 120), seed_size=60, val_size=20, round_size=10)
    scratch = results.scratch_dir(tmp_path, "ci", "digits", "cnn-tiny", "random", 2)
    assert ex.out == scratch and "scratch" in scratch.parts and not ex.records
    r0 = ex.step()
    r1 = ex.step()
    assert (r0["queries"], r1["queries"]) == (80, 90) and ex.oracle.spent == 90
    batches = results.round_batches(ex.records, ex.labelled_idx)
    assert list(batches.groupby("round").size()) == [60, 10]
    idx = batches[batches["round"] == 1].pool_index.to_numpy()
    spent = ex.oracle.spent
    labels = results.ledger_labels(scratch / "ledger.bin", ex.pool.get(idx))
    assert np.array_equal(labels, ex.oracle.query(ex.pool.get(idx))) and ex.oracle.spent == spent
    assert results.load_runs(tmp_path, "ci").empty  # scratch runs are not pipeline runs
    # resume=True continues, resume=False starts over (the old ledger is deleted with the folder).
    again = results.open_extraction("digits", "cnn-tiny", "random", prof, seed=2, results=tmp_path, resume=True,
                                    budgets=(100, 120), seed_size=60, val_size=20, round_size=10)
    assert len(again.records) == 2 and again.oracle.spent == 90
    fresh = results.open_extraction("digits", "cnn-tiny", "random", prof, seed=2, results=tmp_path,
                                    budgets=(100, 120), seed_size=60, val_size=20, round_size=10)
    assert not fresh.records and fresh.oracle.spent == 0


# -- EDA helpers ------------------------------------------------------------------------------------

def test_class_counts():
    df = results.class_counts({"train": np.array([0, 0, 2]), "test": np.array([1])}, ["a", "b", "c"])
    tr = df[df.split == "train"]
    assert list(tr["count"]) == [2, 0, 1] and tr["fraction"].sum() == pytest.approx(1)
    with pytest.raises(ValueError, match="< 3"):
        results.class_counts({"train": np.array([3])}, ["a", "b", "c"])


@pytest.mark.parametrize("method", results.EMBEDDINGS)
def test_embed_2d(method):
    rng = np.random.default_rng(0)
    # Two well separated clusters must stay separated in every embedding.
    x = np.concatenate([rng.random((15, 32, 32, 3)) * 0.2, 0.8 + rng.random((15, 32, 32, 3)) * 0.2]).astype(np.float32)
    e = results.embed_2d(x, method, seed=1)
    assert e.shape == (30, 2) and np.isfinite(e).all()
    a, b = e[:15].mean(0), e[15:].mean(0)
    spread = max(e[:15].std(0).max(), e[15:].std(0).max())
    assert np.linalg.norm(a - b) > 2 * spread
    assert np.allclose(e, results.embed_2d(x, method, seed=1))


def test_embed_2d_validates():
    with pytest.raises(ValueError, match="method"):
        results.embed_2d(np.zeros((10, 4)), "lda")
    with pytest.raises(ValueError, match="at least 5"):
        results.embed_2d(np.zeros((3, 4)), "pca")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        results.embed_2d(np.full((6, 32, 32, 3), 2, np.float32), "pca")


# -- figure builders ------------------------------------------------------------------------------

def test_image_gallery():
    x = np.random.default_rng(0).random((5, 32, 32, 3), dtype=np.float32)
    fig = plots.image_gallery([*x[:3], None, x[3], x[4]], ["cat", "a very long class name", "c", "", "d", "e"], cols=3,
                              row_labels=["round 0", "round 1"])
    assert len(fig.layout.annotations) == 5 + 2
    assert any(a.text.endswith("…") for a in fig.layout.annotations)
    assert fig.data[0].source.startswith("data:image/png;base64,")
    assert len(fig.data[1].x) == 5  # hover points for the non-blank tiles
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        plots.image_gallery(x * 3)
    with pytest.raises(ValueError, match="row_labels"):
        plots.image_gallery(x, cols=5, row_labels=["a", "b"])


def test_confusion_heatmap_normalises_rows():
    fig = plots.confusion_heatmap(np.array([[3, 1], [0, 0]]), ["a", "b"])
    assert np.allclose(np.asarray(fig.data[0].z), [[0.75, 0.25], [0, 0]])
    with pytest.raises(ValueError, match="square"):
        plots.confusion_heatmap(np.zeros((2, 3)))


def test_line_band_draws_bands_only_for_several_seeds(tree):
    cs = results.curve_stats(results.load_rounds(tree, "ci"))
    fig = plots.line_band(cs[cs.dataset == "digits"])
    names = [t.name for t in fig.data]
    # random and kcenter (2 seeds) get a band + a line; dfal (1 seed) only a line.
    assert names.count("dfal") == 1 and names.count("kcenter") == 1 and len(fig.data) == 5
    t = results.timing_table(results.load_rounds(tree, "ci"))
    assert len(plots.timing_bars(t[t.strategy == "kcenter"]).data) == 4
    assert len(plots.fold_box({"a": [0.1, 0.2], "b": [0.3]}).data) == 2


def test_pandas_roundtrip_types(tree):
    """Numbers come out numeric (not object), so the notebooks can format and plot them."""
    t = results.agreement_table(results.load_rounds(tree, "ci"))
    for c in ("agreement_mean", "agreement_std", "thesis_agreement"):
        assert pd.api.types.is_float_dtype(t[c]), c
    assert pd.api.types.is_integer_dtype(t["budget"])


def test_display_helpers_and_caption(tree):
    rounds = results.load_rounds(tree, "ci")
    agree = results.agreement_table(rounds)
    cap = results.thesis_caption(agree)
    assert "200 → 5,000" in cap and "300 → 10,000" in cap and results.REFERENCE in cap and "MNIST" in cap
    assert results.thesis_caption(agree.iloc[0:0]) == "no rows"
    sec = results.display_secrets(results.secrets_table(tree, "ci"))
    row = sec.loc[("digits", "cnn-tiny")]
    assert row["test accuracy %: mean ± std over folds"] == "85.00 ± 5.00" and row["thesis best %"] == "99.29"
    assert row["thesis column is"] == results.REFERENCE
    best = results.display_best(results.best_strategy_table(agree))
    r = best.loc[("digits", "cnn-tiny", 300)]
    assert r["best AL strategy"] == "kcenter" and r["gain over random (points)"] == "+20.0"
    assert r["thesis best"] == "dfal+kcenter" and r["thesis budget"] == "10,000"


def test_show_figure_replaces_what_a_live_output_shows():
    import plotly.graph_objects as go

    x = np.random.default_rng(0).random((6, 32, 32, 3), dtype=np.float32)
    out = plots.figure_output(plots.image_gallery(x[:2], ["a", "b"], cols=2, title="round 0"))
    new = plots.image_gallery(x, list("cdefgh"), cols=3, title="round 1")
    plots.show_figure(out, new)
    assert len(out.outputs) == 1  # replaced, not appended
    shown = plots.shown_figure(out)
    assert shown.data[0].source == new.data[0].source and len(shown.data[1].x) == 6
    assert shown.layout.title.text == "round 1" and len(shown.layout.annotations) == 6
    plots.show_figure(out, go.Figure(go.Bar(y=np.array([1, 2]))))
    assert [t.type for t in plots.shown_figure(out).data] == ["bar"] and not plots.shown_figure(out).layout.annotations


def test_a_live_outputs_synced_state_holds_the_current_figure_for_a_reloaded_page():
    """A page reloaded with the kernel running draws the widget's state from the kernel: its one
    output is the latest figure, as JSON (numpy arrays included), in plotly's mimetype."""
    import base64
    import json

    import plotly.graph_objects as go

    out = plots.figure_output(go.Figure(go.Scatter(x=[1], y=[0.5]), layout=dict(title="round 0")))
    plots.show_figure(out, go.Figure(go.Scatter(x=np.arange(1, 3), y=np.array([0.5, 0.7], np.float32)),
                                     layout=dict(title="round 1")))
    state = json.loads(json.dumps(out.get_state()["outputs"]))
    (o,) = state
    fig = o["data"]["application/vnd.plotly.v1+json"]
    x = fig["data"][0]["x"]  # plotly's typed-array encoding of a numpy array, which plotly.js reads
    assert o["output_type"] == "display_data" and np.frombuffer(base64.b64decode(x["bdata"]), x["dtype"]).tolist() == [1, 2]
    assert fig["layout"]["title"]["text"] == "round 1" and "round 1" in o["data"]["text/plain"]
    assert plots.shown_figure(plots.figure_output()) is None

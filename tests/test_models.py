import json
from pathlib import Path

import numpy as np
import pytest

from stealnb.core import models

REFERENCE = Path(__file__).resolve().parents[1] / "stealnb" / "reference" / "thesis_tables.json"

# Thesis 000, Table 4 (also in stealnb/reference/thesis_tables.json).
TABLE4 = {
    "vgg16": (14_748_170, 14_748_170),
    "vgg19": (20_057_866, 20_057_866),
    "resnet50": (23_719_498, 23_666_378),
    "alexnet": (25_730_506, 25_709_350),
    "resnet101": (42_789_962, 42_684_618),
}


@pytest.mark.parametrize("name", list(TABLE4))
def test_thesis_parameter_counts_exact(name):
    model = models.build(name)
    assert models.count_params(model) == TABLE4[name]
    assert model.output_shape == (None, 10)


def test_table4_matches_the_shipped_reference():
    ref = json.loads(REFERENCE.read_text())["model_parameters_table4"]
    assert {k: (v["total"], v["trainable"]) for k, v in ref.items()} == TABLE4


@pytest.mark.parametrize("name", ["cnn-tiny", "cnn-small", "lenet5"])
def test_cpu_models_output_logits(name):
    model = models.build(name, num_classes=7, seed=1)
    x = np.random.default_rng(0).random((4, 32, 32, 3), dtype=np.float32)
    out = models.predict_logits(model, x)
    assert out.shape == (4, 7) and out.dtype == np.float32
    # Logits, not probabilities: rows do not sum to one and values can be negative.
    assert not np.allclose(out.sum(axis=1), 1.0)


def test_seed_makes_initialisation_reproducible():
    a = models.build("cnn-tiny", seed=3).get_weights()
    b = models.build("cnn-tiny", seed=3).get_weights()
    c = models.build("cnn-tiny", seed=4).get_weights()
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not all(np.array_equal(u, v) for u, v in zip(a, c))


def test_registry_entries_cite_a_source():
    for name in models.REGISTRY:
        assert models.REGISTRY.describe(name)


def test_bad_arguments():
    with pytest.raises(KeyError, match="unknown model 'vgg17'.*vgg16"):
        models.build("vgg17")
    with pytest.raises(ValueError, match="num_classes"):
        models.build("cnn-tiny", num_classes=1)
    with pytest.raises(TypeError, match="float32"):
        models.predict_logits(models.build("cnn-tiny"), np.zeros((1, 32, 32, 3)))


def test_compiled_forward_equals_eager_and_does_not_keep_the_model_alive():
    import gc
    import weakref

    x = np.random.default_rng(0).random((700, 32, 32, 3), dtype=np.float32)
    m = models.build("cnn-tiny", num_classes=10, seed=0)
    eager = np.concatenate([np.asarray(m(x[i : i + 512], training=False)) for i in range(0, 700, 512)])
    np.testing.assert_allclose(models.predict_logits(m, x), eager, rtol=1e-5, atol=1e-6)
    f = models.forward(m)
    assert models.forward(m) is f  # one compiled function per model
    # weights are read at call time: a changed model is seen by the function traced before
    m.set_weights([w * 0.5 for w in m.get_weights()])
    np.testing.assert_allclose(np.asarray(f(x[:5])), np.asarray(m(x[:5], training=False)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="inference only"):
        f(x[:5], training=True)
    assert models.forward(len) is len  # not a Keras model: returned unchanged
    ref = weakref.ref(m)
    del m, f
    gc.collect()
    assert ref() is None


def _tracing_count(model) -> int:
    """Traces of ``model``'s compiled forward function (the ``tf.function`` inside ``forward(model)``)."""
    (compiled,) = [c.cell_contents for c in models.forward(model).__closure__
                   if hasattr(c.cell_contents, "experimental_get_tracing_count")]
    return compiled.experimental_get_tracing_count()


def test_forward_traces_once_per_model_whatever_the_batch_sizes_and_never_warns_of_retracing(tf_warnings):
    x = np.random.default_rng(0).random((100, 32, 32, 3), dtype=np.float32)
    for seed in range(6):  # a new substitute every extraction round
        m = models.build("cnn-tiny", seed=seed)
        for batch_size in (64, 30, 100):  # last batches of 36, 10 and 100 images
            models.predict_logits(m, x, batch_size=batch_size)
        assert _tracing_count(m) == 1
    assert [r.getMessage() for r in tf_warnings if "retracing" in r.getMessage()] == []


def test_predict_logits_rows_by_index_match_the_whole_array():
    m = models.build("cnn-tiny", seed=0)
    x = np.random.default_rng(0).random((20, 32, 32, 3), dtype=np.float32)
    idx = np.array([19, 3, 0, 7], np.int64)
    whole = models.predict_logits(m, x, batch_size=8)
    np.testing.assert_allclose(models.predict_logits(m, x, idx, batch_size=3), whole[idx], rtol=1e-5, atol=1e-6)
    assert models.predict_logits(m, x, np.zeros(0, np.int64)).shape == (0, 10)
    with pytest.raises(ValueError, match="unique"):
        models.predict_logits(m, x, np.array([1, 1]))


def test_softmax_both_routes_are_probabilities_and_chunks_change_nothing():
    z = np.random.default_rng(0).normal(0, 30, (1000, 10)).astype(np.float32)
    for log_space in (False, True):
        p = models.softmax(z, log_space=log_space)
        assert p.dtype == np.float32 and np.allclose(p.sum(axis=1), 1, atol=1e-5)
        np.testing.assert_array_equal(models.softmax(z, log_space=log_space, chunk=7), p)
        assert models.softmax(z, "float64", log_space=log_space).dtype == np.float64
    np.testing.assert_allclose(models.softmax(z, "float64"), models.softmax(z, "float64", log_space=True), rtol=1e-12,
                               atol=1e-300)


def test_clone_copies_architecture_and_weights_and_shares_nothing():
    m = models.build("cnn-tiny", num_classes=10, seed=0)
    c = models.clone(m)
    x = np.random.default_rng(0).random((3, 32, 32, 3), dtype=np.float32)
    np.testing.assert_array_equal(models.predict_logits(c, x), models.predict_logits(m, x))
    c.set_weights([w * 0 for w in c.get_weights()])
    assert np.abs(models.predict_logits(m, x)).sum() > 0

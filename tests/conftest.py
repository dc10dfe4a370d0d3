"""Shared test set-up: quiet TensorFlow, deterministic seeds, small thread pools."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def tiny_model():
    """An untrained-but-seeded cnn-tiny (logits out) shared by tests that only need *a* model."""
    from stealnb.core import models

    return models.build("cnn-tiny", seed=0)


@pytest.fixture(scope="session")
def secret_dir(tmp_path_factory):
    """A quickly trained cnn-tiny digits secret (ci profile, 2 epochs), saved like
    `stealnb train-secret` does; shared by the extraction, Copycat and server tests."""
    from stealnb.core import data, profiles, train

    prof = profiles.get_profile("ci").with_(epochs=2)
    res = train.train_secret(data.load_dataset("digits"), "cnn-tiny", prof, seed=0, progress=False)
    return res.save(tmp_path_factory.mktemp("secret"))


@pytest.fixture
def tf_warnings():
    """The records TensorFlow's Python logger emits during the test (its retracing warning among them)."""
    import logging

    import tensorflow as tf

    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    tf.get_logger().addHandler(handler)
    yield records
    tf.get_logger().removeHandler(handler)


# CI=true turns every skip into a failure (tests/strict_ci.py).
from strict_ci import pytest_make_collect_report, pytest_runtest_makereport  # noqa: E402,F401

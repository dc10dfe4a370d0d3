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
    from stealnb import models

    return models.build("cnn-tiny", seed=0)

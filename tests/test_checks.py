"""stealnb.core._checks.check_real is the one check of a real-valued option: every positive
option of the package refuses zero, NaN, infinity and a bool the same way, naming the option."""
import math

import pytest

from stealnb.core.profiles import get_profile
from stealnb.extraction.copycat import CopycatConfig
from stealnb.extraction.loop import ExtractionConfig
from stealnb.extraction.oracle import HttpOracle
from stealnb.serve.server import KeySpec

PROF = get_profile("ci")

POSITIVE = {
    "learning_rate": lambda v: ExtractionConfig.from_profile(PROF, "random", learning_rate=v),
    "finetune_learning_rate": lambda v: CopycatConfig.from_profile(PROF, "pdd-sl", finetune_learning_rate=v),
    "rate": lambda v: KeySpec(rate=v),
    "timeout": lambda v: HttpOracle("http://srv", timeout=v),
    "max_backoff": lambda v: HttpOracle("http://srv", max_backoff=v),
}


@pytest.mark.parametrize("name", sorted(POSITIVE))
@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf])
def test_a_positive_option_refuses_zero_negative_nan_and_inf_naming_the_option(name, bad):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        POSITIVE[name](bad)


@pytest.mark.parametrize("name", sorted(POSITIVE))
@pytest.mark.parametrize("bad", [True, "0.1", None])
def test_a_positive_option_refuses_a_bool_or_a_string_as_a_type_error(name, bad):
    if name == "rate" and bad is None:
        assert KeySpec(rate=None).rate is None  # None is "unlimited" there
        return
    with pytest.raises(TypeError, match=rf"^{name}\b"):
        POSITIVE[name](bad)


"""stealnb.core.params: a notebook's typed parameters applied to what papermill's -p passed."""
from typing import Optional

import pytest

from stealnb.core import params
from stealnb.core._checks import UsageError


def _ns(src: str, **injected) -> dict:
    """A namespace as a notebook has it: the parameters cell, then papermill's injected values."""
    ns: dict = {}
    exec(src, ns)
    ns.update(injected)
    return ns


CELL = '''from typing import Optional
seeds: Optional[list[int]] = None
variants: list[str] = ["npdd"]
taus: Optional[list[float]] = None
k: Optional[int] = None
fraction: float = 0.1
allow_missing: bool = False
profile: str = "ci"
'''


def test_a_scalar_from_p_becomes_a_one_item_list_and_commas_separate_items():
    ns = _ns(CELL, seeds=0, variants="npdd", taus=0.5)
    params.coerce(ns)
    assert ns["seeds"] == [0] and ns["variants"] == ["npdd"] and ns["taus"] == [0.5]
    ns = _ns(CELL, seeds="0,1", variants="npdd, pdd-sl")
    params.coerce(ns)
    assert ns["seeds"] == [0, 1] and ns["variants"] == ["npdd", "pdd-sl"]
    ns = _ns(CELL, seeds=[2, 3])  # -y "seeds: [2, 3]" keeps working
    assert params.coerce(ns)["seeds"] == [2, 3]


def test_scalars_take_their_declared_type_and_none_stays_none():
    ns = _ns(CELL, fraction=1, allow_missing="true", k="5", profile=7)
    out = params.coerce(ns)
    assert out["fraction"] == 1.0 and isinstance(out["fraction"], float)
    assert out["allow_missing"] is True and out["k"] == 5 and out["profile"] == "7"
    assert out["seeds"] is None and out["taus"] is None and ns["k"] == 5


@pytest.mark.parametrize("name, value", [("seeds", "a"), ("k", 1.5), ("fraction", "lots"), ("allow_missing", 2),
                                         ("profile", None), ("k", True)])
def test_a_value_that_is_not_its_type_is_one_line_naming_the_parameter(name, value):
    with pytest.raises(UsageError, match=f"^parameter {name}: expected") as e:
        params.coerce(_ns(CELL, **{name: value}))
    assert "\n" not in str(e.value)


def test_coerce_needs_the_typed_parameters_cell():
    with pytest.raises(UsageError, match="no typed parameters"):
        params.coerce({"seeds": 0})
    assert params.coerce_value("3", Optional[int]) == 3

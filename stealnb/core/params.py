"""Notebook parameters: the types a notebook's ``parameters`` cell declares, applied to the values
papermill (or a user) put in its place.

Each notebook's parameters cell annotates every parameter (``seeds: Optional[list[int]] = None``),
which is what ``papermill --help-notebook`` shows as its type. ``papermill -p NAME VALUE`` passes
``VALUE`` as a bool, None, int, float or string, so ``-p seeds 0`` arrives as ``seeds = 0``: the
first code cell calls :func:`coerce` on its namespace, which turns each annotated value into its
declared type -- a scalar or a comma-separated string into a one-item (or several-item) list, an
int into a float, ``"true"`` into True -- and stops with one line naming the parameter when a
value cannot be read as its type. ``-y "seeds: [0, 1]"`` keeps working.

Supported annotations: ``str``, ``int``, ``float``, ``bool``, ``list[X]`` of those, and
``Optional[...]`` of any of them.
"""
from __future__ import annotations

import typing

from ._checks import UsageError

_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


def _name(tp) -> str:
    return getattr(tp, "__name__", None) if typing.get_origin(tp) is None else str(tp).replace("typing.", "")


def _scalar(value, tp, name: str):
    bad = UsageError(f"parameter {name}: expected {_name(tp)}, got {value!r}")
    if tp is str:
        if isinstance(value, (list, tuple, dict)) or value is None:
            raise bad
        return str(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise bad from None
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise bad from None
        raise bad
    raise TypeError(f"parameter {name}: unsupported annotation {_name(tp)} (str, int, float, bool, list[...], Optional[...])")


def coerce_value(value, tp, name: str = "value"):
    """``value`` as the annotation ``tp`` says (see the module docstring); UsageError if it cannot be."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or (origin is not None and type(None) in args and len(args) == 2):
        inner = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip() in ("", "None")):
            return None
        if len(inner) != 1:
            raise TypeError(f"parameter {name}: unsupported annotation {_name(tp)}")
        return coerce_value(value, inner[0], name)
    if origin is list:
        (item,) = args or (str,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        try:
            return [_scalar(v, item, name) for v in value]
        except UsageError:
            raise UsageError(f"parameter {name}: expected {_name(tp)} (a list, one value or "
                             f"comma-separated values), got {value!r}") from None
    return _scalar(value, tp, name)


def coerce(namespace: dict) -> dict:
    """Give every annotated parameter in ``namespace`` (a notebook's ``globals()``, after papermill's
    injected cell) its declared type, in place; returns ``{name: value}`` of those parameters.

    The annotations are the parameters cell's (``namespace["__annotations__"]``; papermill's
    injected assignments carry none, so they do not replace them)."""
    ann = namespace.get("__annotations__")
    if not ann:
        raise UsageError("no typed parameters in this namespace: run the notebook's parameters cell "
                         "(`name: type = default` lines) before stealnb.core.params.coerce(globals())")
    out = {}
    for name, tp in ann.items():
        if name in namespace:
            if isinstance(tp, str):  # postponed annotations (from __future__ import annotations)
                tp = eval(tp, {"Optional": typing.Optional, "list": list}, {})  # noqa: S307 -- the cell's own text
            namespace[name] = out[name] = coerce_value(namespace[name], tp, name)
    return out

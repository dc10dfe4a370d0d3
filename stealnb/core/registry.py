"""A tiny name -> constructor registry used for datasets, models and strategies."""
from __future__ import annotations

from typing import Callable, Iterator


class Registry:
    """Maps a name to a constructor. Every entry must carry a docstring citing its source."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable] = {}

    def register(self, name: str):
        def deco(fn: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            if not (fn.__doc__ or "").strip():
                raise ValueError(f"{self.kind} {name!r} needs a docstring citing its source")
            self._entries[name] = fn
            return fn

        return deco

    def __getitem__(self, name: str) -> Callable:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} {name!r}; expected one of: {', '.join(sorted(self._entries))}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def describe(self, name: str) -> str:
        """First line of the entry's docstring."""
        return (self[name].__doc__ or "").strip().splitlines()[0]

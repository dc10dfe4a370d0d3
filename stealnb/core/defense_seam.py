"""The seam where defences attach to an oracle: the :class:`Defense` contract and what an oracle
does with a list of them (:class:`DefenseChain`), the same for the in-process
:class:`stealnb.extraction.oracle.Oracle` and the HTTP :class:`stealnb.serve.server.PredictionService`.

A defence sits between the secret model and the client, as a post-processor attaches to any
estimator (IBM ART, ``art/defences/postprocessor``). It can do one or both of two things:

* **transform answers** -- :meth:`Defense.answer` ``(x, probs, client=) -> probs`` maps the
  class probabilities the oracle is about to answer to other ones (Adaptive Misinformation,
  output perturbations such as rounding or reverse sigmoid);
* **observe the stream** -- :meth:`Defense.observe` ``(x, labels, client=)`` sees every *new*
  (paid) sample of a client with the undefended top-1 label, in order, and returns an alarm
  (``{"at": 1-based index in x, ...details}``) or ``None`` (PRADA). What an alarm does is the
  defence's ``action``, carried out here, identically for every observing defence: ``"log"``
  (only recorded), ``"block"`` (the client's calls are refused from the one that raised it on,
  nothing answered or charged) or ``"poison"`` (every later answer is a deterministic lie: the
  probability vector rolled by a per-sample offset in [1, C), so a repeated sample gets the same
  lie and the top-1 always moves).

The chain applies the answer transforms in list order, then the poisoning. Defences are built
from one spec syntax, ``name:option=value,...`` (``stealnb.defenses.parse_defense``), shared by
the CLI, the server and the notebooks; ``stealnb.defenses.DEFENSES`` is their registry. A
defence in its own module registers itself there and is then usable in-process, over HTTP and
from a CLI spec.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

ACTIONS = ("log", "block", "poison")


class Defense:
    """Base class of a defence at the oracle; a subclass overrides :meth:`answer`, :meth:`observe`
    or both (the defaults change nothing and see nothing).

    ``name`` is the registry name (set by ``stealnb.defenses.DEFENSES.register``); ``action`` is
    what an alarm of an observing defence does (one of :data:`ACTIONS`). :meth:`options` returns
    the settings that :meth:`spec` writes back in the spec syntax (recorded in ledgers and result
    files, so what answered is known from the file).
    """

    name: str = "defense"
    action: str = "log"
    #: the output modes whose answers this defence can transform (``None``: all of them)
    outputs: tuple[str, ...] | None = None

    def answer(self, x: np.ndarray, probs: np.ndarray, *, client) -> np.ndarray:
        """The probabilities to answer instead of ``probs`` (float64 ``N x C``) for the queries ``x``."""
        return probs

    def observe(self, x: np.ndarray, labels: np.ndarray, *, client) -> dict | None:
        """See the new samples ``x`` of ``client`` (with the undefended top-1 ``labels``); an alarm
        ``{"at": i, ...}`` (``i``: 1-based index in ``x`` of the sample that raised it) or ``None``."""
        return None

    def check(self, *, output: str, num_classes: int) -> None:
        """Raise ``ValueError`` if this defence cannot serve an oracle with ``output`` and ``num_classes``."""
        if self.outputs is not None and output not in self.outputs and self.transforms:
            raise ValueError(f"defense {self.name}: applies to output {' or '.join(map(repr, self.outputs))}, "
                             f"not output={output!r}")

    def options(self) -> dict:
        """The settings written by :meth:`spec` (JSON-able values)."""
        return {}

    def spec(self) -> str:
        """This defence in the spec syntax ``name:option=value,...``."""
        import json

        opts = ",".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in self.options().items())
        return f"{self.name}:{opts}" if opts else self.name

    @property
    def transforms(self) -> bool:
        return type(self).answer is not Defense.answer

    @property
    def observes(self) -> bool:
        return type(self).observe is not Defense.observe

    def __repr__(self) -> str:
        return f"<defense {self.spec()}>"


def poison_offsets(fps: Sequence[bytes], num_classes: int) -> np.ndarray:
    """A per-sample class offset in [1, C) from its sha256 fingerprint: deterministic, so a repeated
    sample gets the same lie."""
    return np.array([1 + int.from_bytes(fp[:8], "little") % (num_classes - 1) for fp in fps], np.int64)


class DefenseChain:
    """The defences of one oracle, applied per client (see the module docstring).

    ``defenses`` are :class:`Defense` instances, checked once here against the oracle's ``output``
    and ``num_classes``. The chain remembers each client's alarms (``alarms(client)``: defence
    name -> 1-based index of the client's paid sample that raised it); a server restores them from
    its query log with :meth:`restore`.
    """

    def __init__(self, defenses: Sequence[Defense], *, output: str, num_classes: int | None):
        defenses = list(defenses or ())
        if defenses and num_classes is None:
            raise ValueError("num_classes: cannot be read from the model; pass num_classes= (defenses need it)")
        for d in defenses:
            if not isinstance(d, Defense):
                raise TypeError(f"defenses: expected stealnb.core.defense_seam.Defense instances (build them with "
                                f"stealnb.defenses.parse_defense), got {type(d).__name__}")
            if d.observes and d.action not in ACTIONS:
                raise ValueError(f"defense {d.name}: action expected one of {ACTIONS}, got {d.action!r}")
            d.check(output=output, num_classes=num_classes)
        names = [d.name for d in defenses]
        if len(set(names)) != len(names):
            raise ValueError(f"defenses: each defence at most once, got {names}")
        self.defenses, self.output, self.num_classes = defenses, output, num_classes
        self._alarms: dict[object, dict[str, int]] = {}

    def __bool__(self) -> bool:
        return bool(self.defenses)

    def __iter__(self):
        return iter(self.defenses)

    def specs(self) -> list[str]:
        return [d.spec() for d in self.defenses]

    def alarms(self, client) -> dict[str, int]:
        return dict(self._alarms.get(client, {}))

    def flagged_at(self, client) -> int | None:
        """The first alarm of ``client`` (1-based index of its paid sample), ``None`` without one."""
        at = self._alarms.get(client)
        return min(at.values()) if at else None

    def restore(self, client, name: str, query: int) -> None:
        """Record an alarm read back from a log (kept only if defence ``name`` is in the chain)."""
        if any(d.name == name for d in self.defenses):
            self._alarms.setdefault(client, {}).setdefault(name, int(query))

    def _with_action(self, client, action: str) -> bool:
        at = self._alarms.get(client, {})
        return any(d.action == action and d.name in at for d in self.defenses if d.observes)

    def refuses(self, client) -> bool:
        """Whether ``client`` is blocked (an alarm of a defence whose action is ``"block"``)."""
        return self._with_action(client, "block")

    def poisons(self, client) -> bool:
        return self._with_action(client, "poison")

    def changes_answers(self, client) -> bool:
        """Whether the answers to ``client`` differ from the undefended model's."""
        return any(d.transforms for d in self.defenses) or self.poisons(client)

    def observe(self, client, x: np.ndarray, labels: np.ndarray, start: int) -> list[dict]:
        """Show the new samples ``x`` of ``client`` (its paid samples ``start + 1 ...``) to every
        observing defence; the new alarms as ``{"defense", "query", ...details}``."""
        new = []
        for d in self.defenses:
            if not d.observes:
                continue
            alarm = d.observe(x, labels, client=client)
            if alarm is None or d.name in self._alarms.get(client, {}):
                continue
            details = {k: v for k, v in alarm.items() if k != "at"}
            query = int(start) + int(alarm["at"])
            self._alarms.setdefault(client, {})[d.name] = query
            new.append({"defense": d.name, "query": query, **details})
        return new

    def answer(self, client, x: np.ndarray, probs: np.ndarray, fps: Sequence[bytes]) -> np.ndarray:
        """The defended probabilities (float64) of ``x`` (sha256 fingerprints ``fps``, as the
        oracle's ledger keys them): each transform in order, then the poison."""
        probs = np.asarray(probs, np.float64)
        first = True
        for d in self.defenses:
            if d.transforms:
                if not first:
                    # A transform may answer rows that are no distribution (rounding, top-k without
                    # renormalisation); the next one expects a distribution, so it gets the same
                    # row rescaled to sum 1. The last transform's answer is returned as it is.
                    probs = probs / np.maximum(probs.sum(axis=1, keepdims=True), np.finfo(np.float64).tiny)
                probs = np.asarray(d.answer(x, probs, client=client), np.float64)
                first = False
                if probs.shape != (len(x), self.num_classes):
                    raise ValueError(f"defense {d.name}: answered shape {probs.shape}, expected "
                                     f"{(len(x), self.num_classes)}")
        if self.poisons(client):
            off = poison_offsets(fps, self.num_classes)
            cols = (np.arange(self.num_classes)[None, :] - off[:, None]) % self.num_classes
            probs = np.take_along_axis(probs, cols, axis=1)  # row i rolled right by off[i]
        return probs

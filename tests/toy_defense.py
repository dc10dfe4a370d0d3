"""A toy defence written the way a contributor adds one: this file alone registers it, and
tests/test_defense_seam.py uses it in-process, over HTTP and from a `stealnb serve --defense` spec."""
import numpy as np

from stealnb.core.defense_seam import Defense
from stealnb.defenses import DEFENSES


@DEFENSES.register("toy-swap")
class SwapTwoClasses(Defense):
    """Toy defence for the tests (no paper): answers with the probabilities of classes ``a`` and ``b``
    exchanged, and, given ``alarm_at``, raises an alarm at a client's ``alarm_at``-th paid sample
    (then ``action`` follows: log, block or poison)."""

    name = "toy-swap"

    def __init__(self, a: int = 0, b: int = 1, alarm_at: int | None = None, action: str = "log"):
        self.a, self.b, self.alarm_at, self.action = int(a), int(b), alarm_at, action
        self.seen: dict = {}  # client -> paid samples observed

    def options(self) -> dict:
        return {"a": self.a, "b": self.b, "alarm_at": self.alarm_at, "action": self.action}

    def answer(self, x, probs, *, client):
        out = probs.copy()
        out[:, [self.a, self.b]] = probs[:, [self.b, self.a]]
        return out

    def observe(self, x, labels, *, client):
        before = self.seen.get(client, 0)
        self.seen[client] = before + len(x)
        if self.alarm_at is not None and before < self.alarm_at <= before + len(x):
            return {"at": self.alarm_at - before}
        return None


def swapped(labels: np.ndarray, a: int = 0, b: int = 1) -> np.ndarray:
    """What the toy defence answers in label mode for the undefended ``labels``."""
    out = labels.copy()
    out[labels == a], out[labels == b] = b, a
    return out

"""The secret model as a black box with a query budget (thesis 000 §2.5 and §4.3).

The data owner deploys the secret model as a prediction service, an "oracle" that labels what
it is sent (thesis 000 §2.5, Fig. 26); in the ActiveThief loop it returns only the top-1 label
of every queried sample (§4.3, step 2b). :class:`Oracle` plays that service in-process:

* ``output="label"`` answers top-1 labels (int64), ``"topk"`` top-k classes and probabilities,
  ``"probs"`` the full softmax;
* every *new* sample is paid for; a query that would pass the ``budget`` is refused as a whole;
* an append-only **query ledger** records ``sha256(sample) -> answer``. A sample already in it is
  answered again for free, also by a new ``Oracle`` after a restart, so the budget covers the
  whole attack and a resumed run re-asks its labels at no cost.

Ledger format: a sequence of self-delimiting records ``b"SNL1" | uint32 length | payload |
uint32 crc32(magic, length, payload)`` (little endian). The first payload is a JSON header
(format, version, output, top_k, num_classes); each later one is one answered sample (32-byte
fingerprint followed by its answer, see :func:`record_dtype`). A defended oracle also writes an
*event* record when one of its observing defences raises an alarm: 32 zero bytes (a fingerprint
no image has) followed by JSON ``{"event": "alarm", "client", "defense", "query", ...}``, before
it refuses or poisons anything, so a reopened oracle blocks or poisons the same client again
(:func:`ledger_events`; a detector's own state, e.g. PRADA's growing sets, starts empty after a
restart, as in the server). Every ``query()`` call is
flushed and ``fsync``-ed once. A torn last record (crash mid-write) is dropped with a warning
and cut off the file; a bad record followed by valid ones raises :class:`LedgerCorrupted`, and
so does an intact record whose answer this oracle could not have given (:func:`ledger_answers`).
The ledger has one writer at a time.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np

from ..core._checks import check_images, check_positive_int, check_real
from ..core.defense_seam import DefenseChain
from ..core.models import softmax  # noqa: F401 (stealnb.extraction.oracle.softmax: what the oracle answers in "probs" mode)

OUTPUTS = ("label", "topk", "probs")
LEDGER_FORMAT, LEDGER_VERSION = "stealnb.extraction.oracle-ledger", 1
_MAGIC = b"SNL1"
_HEAD = struct.Struct("<4sI")  # magic, payload length
_CRC = struct.Struct("<I")
_EVENT = bytes(32)  # the "fingerprint" of an event record: sha256 of no image is 32 zero bytes


class QueryRefused(RuntimeError):
    """The oracle's defences block this client (an alarm whose action is ``"block"``); nothing of the
    call was answered or charged."""

    def __init__(self, client, alarms: dict):
        self.client, self.alarms = client, dict(alarms)
        which = ", ".join(f"{k} at query {v}" for k, v in self.alarms.items())
        super().__init__(f"query refused: the oracle's defences block client {client!r} ({which}); nothing was "
                         "answered or charged")


class BudgetExceeded(RuntimeError):
    """A query needs more new samples than the budget has left; nothing of it was answered."""

    def __init__(self, budget: int, spent: int, asked: int):
        self.budget, self.spent, self.asked = budget, spent, asked
        self.remaining = max(budget - spent, 0)
        super().__init__(
            f"query refused: it asks for {asked} new sample(s) but only {self.remaining} of the "
            f"budget of {budget} remain ({spent} spent); nothing was answered or charged"
        )


class LedgerCorrupted(ValueError):
    """A ledger record fails its checks while valid records follow it (not a torn tail), or holds an
    answer outside the ledger's output contract."""


def fingerprint(x: np.ndarray) -> list[str]:
    """Hex sha256 of each image's float32 bytes (C order, 32x32x3), the ledger's sample key.

    ``-0.0`` is normalised to ``+0.0`` first, so numerically equal images share a fingerprint.
    """
    return [d.hex() for d in _digests(check_images(x, "x"))]


def distinct(x: np.ndarray) -> np.ndarray:
    """The first occurrence of every distinct image of ``x``, in order: what a metered oracle is
    paid for (a repeat is answered from the ledger), so the query stream a defender sees."""
    _, first = np.unique(np.asarray(fingerprint(x)), return_index=True)
    return x[np.sort(first)]


def _digests(x: np.ndarray) -> list[bytes]:
    x = np.ascontiguousarray(x, dtype=np.float32) + np.float32(0.0)  # -0.0 -> +0.0
    rows = x.reshape(len(x), int(np.prod(x.shape[1:])))
    return [hashlib.sha256(row).digest() for row in rows]


def _frame(payload: bytes) -> bytes:
    head = _HEAD.pack(_MAGIC, len(payload))
    return head + payload + _CRC.pack(zlib.crc32(head + payload))


def _record_at(buf: bytes, pos: int):
    """``(payload, end)`` of the intact record starting at byte ``pos``, else ``None``."""
    if len(buf) - pos < _HEAD.size:
        return None
    magic, n = _HEAD.unpack_from(buf, pos)
    end = pos + _HEAD.size + n + _CRC.size
    if magic != _MAGIC or end > len(buf):
        return None
    if _CRC.unpack_from(buf, end - _CRC.size)[0] != zlib.crc32(buf[pos : end - _CRC.size]):
        return None
    return buf[pos + _HEAD.size : end - _CRC.size], end


def read_ledger(path) -> tuple[list[bytes], int, int]:
    """Intact record payloads of the ledger at ``path``, the end of the last one and the file size.

    Bytes after the last intact record are a torn tail only if no intact record follows them;
    otherwise the file is corrupted in the middle and :class:`LedgerCorrupted` is raised.
    """
    buf = Path(path).read_bytes()
    payloads, pos = [], 0
    while (rec := _record_at(buf, pos)) is not None:
        payloads.append(rec[0])
        pos = rec[1]
    later = buf.find(_MAGIC, pos + 1)
    while later != -1:
        if _record_at(buf, later) is not None:
            raise LedgerCorrupted(
                f"ledger {path}: record {len(payloads)} at byte {pos} is damaged (bad magic, length or "
                f"crc32) but an intact record follows at byte {later}; refusing to guess - restore or "
                "inspect the file"
            )
        later = buf.find(_MAGIC, later + 1)
    return payloads, pos, len(buf)


def record_dtype(output: str, top_k: int | None, num_classes: int) -> np.dtype:
    """One ledger record per sample: the sha256 fingerprint, then the answer."""
    answer = {
        "label": [("label", "<i8")],
        "topk": [("idx", "<i8", (top_k,)), ("prob", "<f4", (top_k,))],
        "probs": [("prob", "<f4", (num_classes,))],
    }[output]
    return np.dtype([("fp", "V32")] + answer)


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def ledger_header(path, payload: bytes) -> dict:
    """The JSON header record of the ledger at ``path``: its format, version and answer mode checked."""
    try:
        header = json.loads(payload)
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("format") != LEDGER_FORMAT:
        raise ValueError(f"ledger {path}: not a {LEDGER_FORMAT} file (bad header)")
    if header.get("version") != LEDGER_VERSION:
        raise ValueError(f"ledger {path}: expected version {LEDGER_VERSION}, got {header.get('version')!r}")
    out, k, c = header.get("output"), header.get("top_k"), header.get("num_classes")
    k_ok = _is_count(k) and _is_count(c) and k <= c if out == "topk" else k is None
    if out not in OUTPUTS or not _is_count(c) or not k_ok:
        raise ValueError(f"ledger {path}: the header's answer mode output={out!r}, top_k={k!r}, "
                         f"num_classes={c!r} is not valid")
    return header


_SUM_TOL = 1e-3  # a float32 softmax row sums to 1 within ~num_classes * 6e-8


def _bad_answer(rows: np.ndarray, header: dict) -> tuple[int, str] | None:
    """``(row, reason)`` of the first of ``rows`` whose answer breaks the output contract of ``header``
    (else None): labels and top-k classes in [0, num_classes), top-k classes distinct with
    non-increasing probabilities, probabilities finite in [0, 1]. An oracle's own softmax also
    sums to 1 (its top-k to at most 1); a server's (``source: http``) or a defended oracle's
    (``defenses`` in the header) need not, as its defenses may round probabilities or cut them to
    top-k without renormalising (stealnb.defenses)."""
    out, c = header["output"], header["num_classes"]
    if out == "label":
        bad = [((rows["label"] < 0) | (rows["label"] >= c), f"a label outside [0, {c})")]
    else:
        p = rows["prob"].astype(np.float64)
        bad = [(~(np.isfinite(p) & (p >= 0) & (p <= 1)).all(axis=1), "a probability not finite or outside [0, 1]")]
        if out == "topk":
            idx, ordered = rows["idx"], np.sort(rows["idx"], axis=1)
            bad += [(((idx < 0) | (idx >= c)).any(axis=1), f"a class outside [0, {c})"),
                    ((ordered[:, 1:] == ordered[:, :-1]).any(axis=1), "a class listed twice"),
                    ((p[:, 1:] > p[:, :-1]).any(axis=1), "probabilities not in decreasing order")]
        if header.get("source") != "http" and not header.get("defenses"):  # defences may round or cut
            with np.errstate(invalid="ignore"):
                total = p.sum(axis=1)
            bad.append((total > 1 + _SUM_TOL, "probabilities summing to more than 1") if out == "topk"
                       else (~(np.abs(total - 1) <= _SUM_TOL), "probabilities not summing to 1"))
    hits = [(int(np.argmax(mask)), why) for mask, why in bad if mask.any()]
    return min(hits) if hits else None


def _is_event(payload: bytes) -> bool:
    return payload[:32] == _EVENT


def ledger_events(path, payloads: list[bytes]) -> list[dict]:
    """The event records among the records ``payloads`` (after the header) of the ledger at
    ``path``, in order: the alarms of a defended oracle's observing defences."""
    events = []
    for i, p in enumerate(payloads, 1):
        if _is_event(p):
            try:
                ev = json.loads(p[32:])
            except ValueError:
                ev = None
            if not isinstance(ev, dict) or ev.get("event") != "alarm" or not isinstance(ev.get("defense"), str) \
                    or not _is_count(ev.get("query")):
                raise LedgerCorrupted(f"ledger {path}: record {i} is an event record without a valid alarm")
            events.append(ev)
    return events


def ledger_answers(path, header: dict, payloads: list[bytes]) -> np.ndarray:
    """The answer records ``payloads`` of the ledger at ``path`` as rows of :func:`record_dtype`, each
    of the right size and within the output contract of ``header`` (:func:`_bad_answer`). A crc32
    shows that a record is intact, not that an oracle gave its answer: one that it could not have
    given raises :class:`LedgerCorrupted` rather than being replayed."""
    out, c = header["output"], header["num_classes"]
    dtype = record_dtype(out, header.get("top_k"), c)
    payloads = [p for p in payloads if not _is_event(p)]  # alarms: ledger_events
    for i, p in enumerate(payloads, 1):
        if len(p) != dtype.itemsize:
            raise LedgerCorrupted(f"ledger {path}: record {i} holds {len(p)} bytes, expected "
                                  f"{dtype.itemsize} for output={out!r}")
    rows = np.frombuffer(b"".join(payloads), dtype=dtype).copy()
    bad = _bad_answer(rows, header)
    if bad is not None:
        row = rows[bad[0]]
        answer = ", ".join(f"{k}={np.array2string(np.asarray(row[k]), threshold=10)}" for k in dtype.names[1:])
        raise LedgerCorrupted(f"ledger {path}: record {bad[0] + 1} ({answer}) holds {bad[1]}: not an answer of "
                              f"an oracle with output={out!r} and num_classes={c}; the file was altered - "
                              "restore or inspect it")
    return rows


def _client_key(client) -> str:
    """How a client is named in the ledger's event records."""
    return str(client)


def _jsonable(v):
    return v.item() if isinstance(v, np.generic) else str(v)


class Oracle:
    """The secret ``model`` behind a black-box query API (thesis 000 §2.5, §4.3).

    ``model`` is a Keras model (called as ``model(x, training=False)``) or any callable mapping
    float32 ``N x 32 x 32 x 3`` images to ``N x C`` logits. ``output`` selects the answer:
    ``"label"`` (int64 top-1, default), ``"topk"`` (int64 indices and float32 probabilities,
    ``N x top_k`` each) or ``"probs"`` (float32 softmax, ``N x C``). ``budget`` caps the number of
    *paid* (distinct, never seen before) samples; ``None`` means unlimited. ``ledger`` is the path
    of the append-only query ledger (``None``: repeats are remembered in memory only).
    ``num_classes`` is required only when it cannot be read from ``model.output_shape``.

    ``defenses``: :class:`stealnb.core.defense_seam.Defense` instances (``stealnb.defenses.parse_defenses``
    builds them from specs such as ``"prada:delta=0.9,action=block"``) between the model and the
    answers, applied to the paid samples of this oracle's one ``client`` exactly as the server
    applies them per API key (:class:`stealnb.core.defense_seam.DefenseChain`): transforms change what
    is answered (and recorded in the ledger); an alarm with action ``"block"`` makes every later
    call raise :class:`QueryRefused`, answering and charging nothing. A defended ledger records the
    defences' specs in its header and is reopened only with the same defences.
    """

    def __init__(self, model, *, output: str = "label", top_k: int = 3, budget: int | None = None,
                 ledger=None, batch_size: int = 256, num_classes: int | None = None, defenses=(),
                 client="local"):
        if not callable(model):
            raise TypeError(f"model: expected a Keras model or a callable returning logits, got {type(model).__name__}")
        if output not in OUTPUTS:
            raise ValueError(f"output: expected one of {OUTPUTS}, got {output!r}")
        self.model, self.output = model, output
        self.top_k = check_positive_int(top_k, "top_k") if output == "topk" else None
        self.budget = None if budget is None else check_positive_int(budget, "budget", minimum=0)
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.num_classes = self._model_classes(num_classes)
        self.ledger = None if ledger is None else Path(ledger)
        self.replayed = 0
        self.num_queries = 0
        self._rows: dict[bytes, int] = {}  # fingerprint -> row of self._answers
        self._size = 0  # bytes of the ledger file that are known good
        self.client = client
        self.defenses = DefenseChain(defenses, output=output, num_classes=self.num_classes)
        answers = self._open_ledger() if self.ledger is not None else None
        if self.num_classes is None:
            raise ValueError("num_classes: cannot be read from model.output_shape; pass num_classes=")
        if self.top_k is not None and self.top_k > self.num_classes:
            raise ValueError(f"top_k: expected at most num_classes={self.num_classes}, got {self.top_k}")
        self._answers = self._index(answers)

    @classmethod
    def from_path(cls, model_path, **kw) -> "Oracle":
        """An oracle for the Keras model saved at ``model_path`` (``.keras``); ``kw`` as for ``Oracle``."""
        import keras

        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"model_path: expected a saved .keras model file, {path} does not exist")
        return cls(keras.models.load_model(path, compile=False), **kw)

    # -- accounting ------------------------------------------------------------------------------
    @property
    def spent(self) -> int:
        """Samples paid for so far, including those recorded in the ledger by earlier runs."""
        return len(self._rows)

    @property
    def remaining(self) -> int | None:
        """Samples the budget still allows (``None`` for an unlimited budget)."""
        return None if self.budget is None else max(self.budget - self.spent, 0)

    def __repr__(self) -> str:
        return (f"Oracle(output={self.output!r}, spent={self.spent}, budget={self.budget}, "
                f"replayed={self.replayed}, ledger={str(self.ledger) if self.ledger else None!r})")

    # -- the query API -----------------------------------------------------------------------------
    def query(self, x: np.ndarray):
        """Answer float32 images ``x`` (``N x 32 x 32 x 3`` in [0, 1]) in the configured output mode.

        New samples are paid once (duplicates inside ``x`` too), known ones are replayed for free.
        Raises :class:`BudgetExceeded`, answering and charging nothing, if the new samples do not
        fit the remaining budget.
        """
        x = self._check(x)
        fps = _digests(x)
        new: dict[bytes, int] = {}
        for i, fp in enumerate(fps):
            if fp not in self._rows and fp not in new:
                new[fp] = i
        if self.defenses.refuses(self.client):
            raise QueryRefused(self.client, self.defenses.alarms(self.client))
        if self.budget is not None and self.spent + len(new) > self.budget:
            raise BudgetExceeded(self.budget, self.spent, len(new))
        keys, where = list(new), list(new.values())
        step = self._request_size or max(len(keys), 1)
        for s in range(0, len(keys), step):  # each answered request is in the ledger before the next
            fresh = self._answer(x[where[s:s + step]], keys[s:s + step])
            if self.ledger is not None:
                self._append(fresh)
            base = len(self._answers)
            self._answers = np.concatenate([self._answers, fresh])
            self._rows.update((fp, base + j) for j, fp in enumerate(keys[s:s + step]))
        self.replayed += len(x) - len(new)
        self.num_queries += 1
        rows = self._answers[np.fromiter((self._rows[fp] for fp in fps), dtype=np.intp, count=len(fps))]
        if self.output == "label":
            return rows["label"].astype(np.int64)
        if self.output == "topk":
            return rows["idx"].astype(np.int64), rows["prob"].astype(np.float32)
        return rows["prob"].astype(np.float32)

    # -- internals ---------------------------------------------------------------------------------
    _request_size: int | None = None  # new samples answered per call of _answer (None: all at once)

    def _check(self, x) -> np.ndarray:
        return check_images(x, "x")

    def _model_classes(self, num_classes):
        shape = getattr(self.model, "output_shape", None)
        from_model = int(shape[-1]) if isinstance(shape, tuple) and shape and shape[-1] is not None else None
        if num_classes is None:
            return from_model
        num_classes = check_positive_int(num_classes, "num_classes")
        if from_model is not None and from_model != num_classes:
            raise ValueError(f"num_classes: the model outputs {from_model} classes, got num_classes={num_classes}")
        return num_classes

    def _header(self) -> dict:
        head = {"format": LEDGER_FORMAT, "version": LEDGER_VERSION, "output": self.output,
                "top_k": self.top_k, "num_classes": self.num_classes}
        return {**head, "defenses": self.defenses.specs()} if self.defenses else head

    def _record_dtype(self) -> np.dtype:
        return record_dtype(self.output, self.top_k, self.num_classes)

    def _open_ledger(self) -> np.ndarray | None:
        """The answers in the ledger (None if it has no header): a torn tail is dropped, the header
        must match this oracle and every answer its output contract."""
        if not self.ledger.exists():
            return None
        payloads, good, size = read_ledger(self.ledger)
        if good < size:
            warnings.warn(f"query ledger {self.ledger}: dropped {size - good} byte(s) of a torn last "
                          f"record (interrupted write) after byte {good}", stacklevel=3)
            with open(self.ledger, "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())
        self._size = good
        if not payloads:
            return None
        header = ledger_header(self.ledger, payloads[0])
        if self.num_classes is None:
            self.num_classes = header["num_classes"]
        if header.get("source") != "http" and header.get("defenses") != (self.defenses.specs() or None):
            raise ValueError(f"ledger {self.ledger} was answered with defenses={header.get('defenses')!r} but this "
                             f"Oracle has defenses={self.defenses.specs() or None!r}; use a separate ledger per setting")
        for key in ("output", "top_k", "num_classes"):
            if header.get(key) != getattr(self, key):
                raise ValueError(f"ledger {self.ledger} was written with {key}={header.get(key)!r} but this "
                                 f"Oracle has {key}={getattr(self, key)!r}; use a separate ledger per setting")
        for ev in ledger_events(self.ledger, payloads[1:]):
            if ev.get("client") == _client_key(self.client):
                self.defenses.restore(self.client, ev["defense"], ev["query"])
        return ledger_answers(self.ledger, header, payloads[1:])

    def _index(self, answers: np.ndarray | None) -> np.ndarray:
        """The answer table (the ledger's ``answers``, else empty); each fingerprint maps to its first row."""
        answers = np.zeros(0, self._record_dtype()) if answers is None else answers
        for row, fp in enumerate(answers["fp"]):
            self._rows.setdefault(fp.tobytes(), row)
        return answers

    def _logits(self, x: np.ndarray) -> np.ndarray:
        from ..core.models import forward

        keras_like = hasattr(self.model, "predict_on_batch")
        f = forward(self.model)
        out = []
        for i in range(0, len(x), self.batch_size):
            batch = x[i : i + self.batch_size]
            out.append(np.asarray(f(batch, training=False) if keras_like else f(batch)))
        logits = np.concatenate(out)
        if logits.shape != (len(x), self.num_classes):
            raise ValueError(f"model: expected logits of shape ({len(x)}, {self.num_classes}), got {logits.shape}")
        if not np.isfinite(logits).all():
            raise ValueError("model: returned NaN or inf logits; refusing to record them")
        return logits

    def _answer(self, x: np.ndarray, fps: list[bytes]) -> np.ndarray:
        logits = self._logits(x)
        rows = np.zeros(len(x), dtype=self._record_dtype())
        rows["fp"] = np.frombuffer(b"".join(fps), dtype="V32")
        chain, client = self.defenses, self.client
        if chain:
            alarms = chain.observe(client, x, logits.argmax(axis=1), start=self.spent)
            if alarms and self.ledger is not None:  # on disk before anything is refused or poisoned
                self._append(np.zeros(0, self._record_dtype()),
                             [{"event": "alarm", "client": _client_key(client), **a} for a in alarms])
            if chain.refuses(client):
                raise QueryRefused(client, chain.alarms(client))
        if chain and chain.changes_answers(client):
            probs = chain.answer(client, x, softmax(logits, dtype=np.float64), fps)
            if self.output == "label":
                rows["label"] = probs.argmax(axis=1)
            elif self.output == "topk":
                idx = np.argsort(-probs, axis=1, kind="stable")[:, : self.top_k]
                rows["idx"], rows["prob"] = idx, np.take_along_axis(probs, idx, axis=1)
            else:
                rows["prob"] = probs
            return rows
        if self.output == "label":
            rows["label"] = logits.argmax(axis=1)
        elif self.output == "topk":
            idx = np.argsort(-logits, axis=1, kind="stable")[:, : self.top_k]
            rows["idx"], rows["prob"] = idx, np.take_along_axis(softmax(logits), idx, axis=1)
        else:
            rows["prob"] = softmax(logits)
        return rows

    def _append(self, rows: np.ndarray, events: list[dict] = ()) -> None:
        """Append one record per event, then one per row (plus the header on a fresh file); flush
        and fsync once."""
        blob = [] if self._size else [_frame(json.dumps(self._header(), sort_keys=True).encode())]
        blob += [_frame(_EVENT + json.dumps(ev, sort_keys=True, default=_jsonable).encode()) for ev in events]
        raw, size = rows.tobytes(), rows.dtype.itemsize
        blob += [_frame(raw[i * size : (i + 1) * size]) for i in range(len(rows))]
        blob = b"".join(blob)
        created = not self.ledger.exists()
        if created:
            self.ledger.parent.mkdir(parents=True, exist_ok=True)
        with open(self.ledger, "ab") as f:
            if os.fstat(f.fileno()).st_size != self._size:
                raise RuntimeError(f"ledger {self.ledger} changed on disk since it was loaded "
                                   "(another writer?); reopen the Oracle")
            try:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            except BaseException:
                with contextlib.suppress(OSError):
                    f.truncate(self._size)
                raise
        if created:
            with contextlib.suppress(OSError):
                fd = os.open(self.ledger.parent, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        self._size += len(blob)


# ------------------------------------------------------------------------------------------------
# The same oracle behind a network API (``stealnb serve``, stealnb.serve.server)
# ------------------------------------------------------------------------------------------------


class OracleHTTPError(RuntimeError):
    """The prediction server refused a request (a 4xx answer, or retries ran out).

    ``status`` is the HTTP status (``None`` when the server could not be reached), ``code`` the
    server's short error code (e.g. ``"bad_shape"``, ``"unknown_key"``) and ``message`` its text.
    """

    def __init__(self, status: int | None, message: str, code: str | None = None, url: str | None = None):
        self.status, self.code, self.message, self.url = status, code, message, url
        where = f" ({url})" if url else ""
        super().__init__(f"HTTP {status if status is not None else '-'}{where}: {message}")


def _b64_instances(x: np.ndarray) -> list[dict]:
    import base64

    rows = np.ascontiguousarray(x, dtype="<f4").reshape(len(x), -1)
    return [{"b64": base64.b64encode(r.tobytes()).decode("ascii")} for r in rows]


class HttpOracle(Oracle):
    """The attack-side client of a ``stealnb serve`` endpoint with the interface of :class:`Oracle`.

    ``url`` is the server's base URL (``http://host:port``); ``model`` the served model name; the
    API key comes from ``api_key`` or ``$STEALNB_API_KEY`` and is sent as ``Authorization: Bearer``.
    Requests follow the TensorFlow Serving REST predict API (``POST /v1/models/<model>:predict``
    with ``{"instances": [...]}``); images travel as ``{"b64": base64 of float32 bytes}`` by
    default (exact and compact) or as nested lists (``encoding="list"``).

    ``output``, ``top_k``, ``budget`` and ``ledger`` mean what they mean for :class:`Oracle`, and the
    ledger is the same file format: a sample already in it is answered from it without any
    request, so an attack that is interrupted -- or whose server restarts -- resumes without
    paying twice. The server's answer mode must be at least as rich as ``output`` (labels can be
    read from top-k or probabilities, top-k from probabilities; never the other way). Every
    answered request is written to the ledger before the next one is sent (``batch_size``
    samples per request), so an error part-way through a call loses no answered sample.

    Retries: connection errors, timeouts and 429/502/503/504 answers are retried up to
    ``retries`` times, waiting ``backoff * 2**attempt`` seconds (at most ``max_backoff``) or the
    server's ``Retry-After`` if that is longer. Retrying a predict request is safe: the server
    charges each distinct sample once per key. Other 4xx answers raise :class:`OracleHTTPError`
    with the server's message at once; a 402 (the key's budget on the server is spent) raises
    :class:`BudgetExceeded`. ``transport`` is passed to ``httpx.Client`` (tests use it to
    inject failures).
    """

    RETRY_STATUS = (429, 502, 503, 504)

    def __init__(self, url: str, *, model: str = "secret", api_key: str | None = None, output: str = "label",
                 top_k: int | None = None, budget: int | None = None, ledger=None, batch_size: int = 256,
                 encoding: str = "b64", timeout: float = 60.0, retries: int = 8, backoff: float = 0.25,
                 max_backoff: float = 10.0, transport=None, sleep=None):
        import time

        import httpx

        if output not in OUTPUTS:
            raise ValueError(f"output: expected one of {OUTPUTS}, got {output!r}")
        if encoding not in ("b64", "list"):
            raise ValueError(f"encoding: expected 'b64' or 'list', got {encoding!r}")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"url: expected the server's base URL like 'http://127.0.0.1:8500', got {url!r}")
        if not isinstance(model, str) or not model or "/" in model or ":" in model:
            raise ValueError(f"model: expected a model name without '/' or ':', got {model!r}")
        for name, v in (("timeout", timeout), ("backoff", backoff), ("max_backoff", max_backoff)):
            check_real(v, f"{name} (seconds)", 0.0, lo_open=True)
        self.url, self.model_name, self.encoding = url.rstrip("/"), model, encoding
        self.retries = check_positive_int(retries, "retries", minimum=0)
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)
        self._sleep = sleep or time.sleep
        key = api_key if api_key is not None else os.environ.get("STEALNB_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.Client(timeout=timeout, headers=headers, transport=transport)
        self.model = None
        self.output = output
        self.client, self.defenses = None, DefenseChain((), output=output, num_classes=None)  # the server defends
        self.budget = None if budget is None else check_positive_int(budget, "budget", minimum=0)
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.requests = 0  # predict requests answered by the server (retries not counted)
        self.retried = 0  # retries made (connection errors, 429/5xx)
        self.replayed = 0
        self.num_queries = 0
        self.status = self.server_status()
        served = self.status["stealnb"]
        self.server_output, self.server_top_k = served["output"], served.get("top_k")
        self.num_classes = int(served["num_classes"])
        self.input_shape = tuple(served["input_shape"])
        self.max_batch = int(served["max_batch"])
        if self.batch_size > self.max_batch:
            raise ValueError(f"batch_size: the server accepts at most {self.max_batch} instances per request, "
                             f"got batch_size={self.batch_size}")
        rank = {"label": 0, "topk": 1, "probs": 2}
        if rank[output] > rank[self.server_output]:
            raise ValueError(f"output: the server answers {self.server_output!r}, which does not contain {output!r}")
        if output == "topk":
            k = self.server_top_k if top_k is None and self.server_output == "topk" else (3 if top_k is None else top_k)
            self.top_k = check_positive_int(k, "top_k")
            if self.server_output == "topk" and self.top_k > self.server_top_k:
                raise ValueError(f"top_k: the server answers its top {self.server_top_k} classes, got top_k={self.top_k}")
            if self.top_k > self.num_classes:
                raise ValueError(f"top_k: expected at most num_classes={self.num_classes}, got {self.top_k}")
        else:
            self.top_k = None
        self.ledger = None if ledger is None else Path(ledger)
        self._rows = {}
        self._size = 0
        self._answers = self._index(self._open_ledger() if self.ledger is not None else None)

    def __repr__(self) -> str:
        return (f"HttpOracle({self.url!r}, model={self.model_name!r}, output={self.output!r}, spent={self.spent}, "
                f"budget={self.budget}, replayed={self.replayed}, requests={self.requests}, "
                f"ledger={str(self.ledger) if self.ledger else None!r})")

    def _header(self) -> dict:
        return {**super()._header(), "source": "http", "model": self.model_name}

    def close(self) -> None:
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- transport ---------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: bytes | None = None):
        """One request with retries; returns the decoded JSON of a 2xx answer."""
        import httpx

        url = f"{self.url}{path}"
        last = None
        for attempt in range(self.retries + 1):
            wait = min(self.max_backoff, self.backoff * 2**attempt)
            try:
                r = self._client.request(method, url, content=body,
                                         headers={"Content-Type": "application/json"} if body is not None else None)
            except (httpx.TransportError,) as e:  # connection refused/reset, timeouts, protocol errors
                last = OracleHTTPError(None, f"{type(e).__name__}: {e}", "unreachable", url)
            else:
                if r.status_code < 300:
                    try:
                        return r.json()
                    except ValueError:
                        raise OracleHTTPError(r.status_code, "the server's answer is not JSON", "bad_answer", url) from None
                err = self._error(r, url)
                if r.status_code not in self.RETRY_STATUS:
                    raise err
                last = err
                ra = r.headers.get("Retry-After")
                try:
                    wait = max(wait, min(float(ra), 300.0)) if ra is not None else wait
                except ValueError:
                    pass
            if attempt < self.retries:
                self.retried += 1
                self._sleep(wait)
        raise OracleHTTPError(last.status, f"gave up after {self.retries + 1} attempts; last error: {last.message}",
                              last.code, url)

    def _error(self, r, url):
        try:
            body = r.json()
        except ValueError:
            body = {}
        msg = body.get("error") if isinstance(body, dict) else None
        code = body.get("code") if isinstance(body, dict) else None
        if r.status_code == 402 and isinstance(body, dict) and code == "budget_exceeded":
            try:
                return BudgetExceeded(int(body["budget"]), int(body["spent"]), int(body["asked"]))
            except (KeyError, TypeError, ValueError):
                pass
        return OracleHTTPError(r.status_code, msg or r.text[:500] or r.reason_phrase, code, url)

    def server_status(self) -> dict:
        """``GET /v1/models/<model>``: TF Serving's model status plus a ``stealnb`` block (answer mode,
        classes, input shape, batch limit and *this key's* budget: ``budget``, ``spent``, ``remaining``)."""
        return self._request("GET", f"/v1/models/{self.model_name}")

    # -- answers -------------------------------------------------------------------------------------
    def _predict(self, x: np.ndarray) -> list:
        inst = _b64_instances(x) if self.encoding == "b64" else x.tolist()
        body = json.dumps({"instances": inst}).encode()
        out = self._request("POST", f"/v1/models/{self.model_name}:predict", body)
        self.requests += 1
        pred = out.get("predictions") if isinstance(out, dict) else None
        if not isinstance(pred, list) or len(pred) != len(x):
            got = len(pred) if isinstance(pred, list) else type(pred).__name__
            raise OracleHTTPError(200, f"expected {len(x)} predictions, got {got}", "bad_answer", self.url)
        return pred

    def _rows_from(self, pred: list, fps: list[bytes]) -> np.ndarray:
        """Ledger records for the server's answers ``pred`` (validated) in this oracle's mode."""
        c = self.num_classes
        rows = np.zeros(len(pred), dtype=self._record_dtype())
        rows["fp"] = np.frombuffer(b"".join(fps), dtype="V32")
        try:
            if self.server_output == "label":
                labels = np.asarray(pred)
                if labels.dtype.kind not in "iu" or labels.ndim != 1:
                    raise ValueError("expected one integer label per instance")
            elif self.server_output == "topk":
                idx = np.asarray([p["classes"] for p in pred])
                prob = np.asarray([p["probabilities"] for p in pred], dtype=np.float64)
                if idx.dtype.kind not in "iu" or idx.shape != (len(pred), self.server_top_k) or prob.shape != idx.shape:
                    raise ValueError(f"expected top-{self.server_top_k} classes and probabilities per instance")
                labels = idx[:, 0]
            else:
                prob = np.asarray(pred, dtype=np.float64)
                if prob.shape != (len(pred), c):
                    raise ValueError(f"expected {c} probabilities per instance")
                labels = np.argmax(prob, axis=1)
        except (ValueError, TypeError, KeyError) as e:
            raise OracleHTTPError(200, f"malformed predictions: {e}", "bad_answer", self.url) from None
        if self.server_output != "label" and (not np.isfinite(prob).all() or prob.min() < 0 or prob.max() > 1):
            raise OracleHTTPError(200, "predicted probabilities outside [0, 1] or not finite", "bad_answer", self.url)
        if self.output == "label":
            rows["label"] = labels
        elif self.output == "topk":
            if self.server_output == "topk":
                rows["idx"], rows["prob"] = idx[:, : self.top_k], prob[:, : self.top_k]
            else:
                order = np.argsort(-prob, axis=1, kind="stable")[:, : self.top_k]
                rows["idx"], rows["prob"] = order, np.take_along_axis(prob, order, axis=1)
        else:
            rows["prob"] = prob
        bad = _bad_answer(rows, self._header())  # never record what the ledger would refuse to load
        if bad is not None:
            raise OracleHTTPError(200, f"prediction {bad[0]} holds {bad[1]}", "bad_answer", self.url)
        return rows

    @property
    def _request_size(self) -> int:
        return self.batch_size

    def _check(self, x) -> np.ndarray:
        return check_images(x, "x", shape=self.input_shape)

    def _answer(self, x: np.ndarray, fps: list[bytes]) -> np.ndarray:
        """One request to the server (``batch_size`` new samples at most), as ledger rows."""
        return self._rows_from(self._predict(x), fps)

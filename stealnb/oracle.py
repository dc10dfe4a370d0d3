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
fingerprint followed by its answer, see :meth:`Oracle._record_dtype`). Every ``query()`` call is
flushed and ``fsync``-ed once. A torn last record (crash mid-write) is dropped with a warning
and cut off the file; a bad record followed by valid ones raises :class:`LedgerCorrupted`.
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

from ._checks import check_images, check_positive_int

OUTPUTS = ("label", "topk", "probs")
LEDGER_FORMAT, LEDGER_VERSION = "stealnb.oracle-ledger", 1
_MAGIC = b"SNL1"
_HEAD = struct.Struct("<4sI")  # magic, payload length
_CRC = struct.Struct("<I")


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
    """A ledger record fails its checks while valid records follow it (not a torn tail)."""


def fingerprint(x: np.ndarray) -> list[str]:
    """Hex sha256 of each image's float32 bytes (C order, 32x32x3), the ledger's sample key.

    ``-0.0`` is normalised to ``+0.0`` first, so numerically equal images share a fingerprint.
    """
    return [d.hex() for d in _digests(check_images(x, "x"))]


def _digests(x: np.ndarray) -> list[bytes]:
    x = np.ascontiguousarray(x, dtype=np.float32) + np.float32(0.0)  # -0.0 -> +0.0
    rows = x.reshape(len(x), int(np.prod(x.shape[1:])))
    return [hashlib.sha256(row).digest() for row in rows]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax (max-shifted, computed in float64) as float32."""
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


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


class Oracle:
    """The secret ``model`` behind a black-box query API (thesis 000 §2.5, §4.3).

    ``model`` is a Keras model (called as ``model(x, training=False)``) or any callable mapping
    float32 ``N x 32 x 32 x 3`` images to ``N x C`` logits. ``output`` selects the answer:
    ``"label"`` (int64 top-1, default), ``"topk"`` (int64 indices and float32 probabilities,
    ``N x top_k`` each) or ``"probs"`` (float32 softmax, ``N x C``). ``budget`` caps the number of
    *paid* (distinct, never seen before) samples; ``None`` means unlimited. ``ledger`` is the path
    of the append-only query ledger (``None``: repeats are remembered in memory only).
    ``num_classes`` is required only when it cannot be read from ``model.output_shape``.
    """

    def __init__(self, model, *, output: str = "label", top_k: int = 3, budget: int | None = None,
                 ledger=None, batch_size: int = 256, num_classes: int | None = None):
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
        payloads = self._open_ledger() if self.ledger is not None else []
        if self.num_classes is None:
            raise ValueError("num_classes: cannot be read from model.output_shape; pass num_classes=")
        if self.top_k is not None and self.top_k > self.num_classes:
            raise ValueError(f"top_k: expected at most num_classes={self.num_classes}, got {self.top_k}")
        self._answers = self._parse(payloads[1:])

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
        x = check_images(x, "x")
        fps = _digests(x)
        new: dict[bytes, int] = {}
        for i, fp in enumerate(fps):
            if fp not in self._rows and fp not in new:
                new[fp] = i
        if self.budget is not None and self.spent + len(new) > self.budget:
            raise BudgetExceeded(self.budget, self.spent, len(new))
        if new:
            fresh = self._answer(x[list(new.values())], list(new))
            if self.ledger is not None:
                self._append(fresh)
            base = len(self._answers)
            self._answers = np.concatenate([self._answers, fresh])
            self._rows.update((fp, base + j) for j, fp in enumerate(new))
        self.replayed += len(x) - len(new)
        self.num_queries += 1
        rows = self._answers[np.fromiter((self._rows[fp] for fp in fps), dtype=np.intp, count=len(fps))]
        if self.output == "label":
            return rows["label"].astype(np.int64)
        if self.output == "topk":
            return rows["idx"].astype(np.int64), rows["prob"].astype(np.float32)
        return rows["prob"].astype(np.float32)

    # -- internals ---------------------------------------------------------------------------------
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
        return {"format": LEDGER_FORMAT, "version": LEDGER_VERSION, "output": self.output,
                "top_k": self.top_k, "num_classes": self.num_classes}

    def _record_dtype(self) -> np.dtype:
        """One ledger record per sample: the sha256 fingerprint, then the answer."""
        answer = {
            "label": [("label", "<i8")],
            "topk": [("idx", "<i8", (self.top_k,)), ("prob", "<f4", (self.top_k,))],
            "probs": [("prob", "<f4", (self.num_classes,))],
        }[self.output]
        return np.dtype([("fp", "V32")] + answer)

    def _open_ledger(self) -> list[bytes]:
        """Load the ledger (if any), drop a torn tail and check its header against this oracle."""
        if not self.ledger.exists():
            return []
        payloads, good, size = read_ledger(self.ledger)
        if good < size:
            warnings.warn(f"query ledger {self.ledger}: dropped {size - good} byte(s) of a torn last "
                          f"record (interrupted write) after byte {good}", stacklevel=3)
            with open(self.ledger, "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())
        self._size = good
        if not payloads:
            return []
        try:
            header = json.loads(payloads[0])
        except ValueError:
            header = None
        if not isinstance(header, dict) or header.get("format") != LEDGER_FORMAT:
            raise ValueError(f"ledger {self.ledger}: not a {LEDGER_FORMAT} file (bad header)")
        if header.get("version") != LEDGER_VERSION:
            raise ValueError(f"ledger {self.ledger}: expected version {LEDGER_VERSION}, got {header.get('version')!r}")
        if self.num_classes is None:
            self.num_classes = header.get("num_classes")
        for key in ("output", "top_k", "num_classes"):
            if header.get(key) != getattr(self, key):
                raise ValueError(f"ledger {self.ledger} was written with {key}={header.get(key)!r} but this "
                                 f"Oracle has {key}={getattr(self, key)!r}; use a separate ledger per setting")
        return payloads

    def _parse(self, payloads: list[bytes]) -> np.ndarray:
        dtype = self._record_dtype()
        for i, p in enumerate(payloads, 1):
            if len(p) != dtype.itemsize:
                raise LedgerCorrupted(f"ledger {self.ledger}: record {i} holds {len(p)} bytes, expected "
                                      f"{dtype.itemsize} for output={self.output!r}")
        answers = np.frombuffer(b"".join(payloads), dtype=dtype).copy()
        for row, fp in enumerate(answers["fp"]):
            self._rows.setdefault(fp.tobytes(), row)
        return answers

    def _logits(self, x: np.ndarray) -> np.ndarray:
        keras_like = hasattr(self.model, "predict_on_batch")
        out = []
        for i in range(0, len(x), self.batch_size):
            batch = x[i : i + self.batch_size]
            out.append(np.asarray(self.model(batch, training=False) if keras_like else self.model(batch)))
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
        if self.output == "label":
            rows["label"] = logits.argmax(axis=1)
        elif self.output == "topk":
            idx = np.argsort(-logits, axis=1, kind="stable")[:, : self.top_k]
            rows["idx"], rows["prob"] = idx, np.take_along_axis(softmax(logits), idx, axis=1)
        else:
            rows["prob"] = softmax(logits)
        return rows

    def _append(self, rows: np.ndarray) -> None:
        """Append one record per row (plus the header on a fresh file); flush and fsync once."""
        blob = [] if self._size else [_frame(json.dumps(self._header(), sort_keys=True).encode())]
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

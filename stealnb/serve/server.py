"""The secret model as a metered network prediction service: ``stealnb serve`` (thesis 000 §2.5).

Real extraction attacks talk to a web API that authenticates clients, meters and logs their
queries and may watch them for attacks (thesis 002 §3.2). :func:`create_app` builds such a
service as a FastAPI (ASGI) application; ``stealnb serve`` runs it with uvicorn.

API -- the TensorFlow Serving REST shape (https://www.tensorflow.org/tfx/serving/api_rest):

* ``POST /v1/models/<name>:predict`` (also ``/v1/models/<name>/versions/1:predict``) with
  ``{"instances": [...]}`` answers ``{"predictions": [...]}``. An instance is one float32 image
  in [0, 1] with the model's input shape (``H x W x C``), either as a nested list of numbers or
  as ``{"b64": "<base64 of the H*W*C little-endian float32 values>"}`` (TF Serving's binary
  convention; exact and ~4x smaller). Predictions are, by the server's ``output`` mode, top-1
  labels (``[3, 7, ...]``), top-k (``[{"classes": [...], "probabilities": [...]}, ...]``) or
  the full softmax (``[[p0, ..., pC-1], ...]``).
* ``GET /v1/models/<name>``: TF Serving's ``model_version_status`` plus a ``stealnb`` block
  (answer mode, classes, input shape, limits and the *calling key's* budget and spending).

Clients send an API key as ``Authorization: Bearer <key>`` (or ``X-API-Key``). Each key has a
budget (distinct samples it may have answered, like :class:`stealnb.extraction.oracle.Oracle`: a sample the
key has already been charged for is answered again for free, so retrying a request whose
answer was lost costs nothing) and a rate limit (token bucket: ``rate`` requests/s, bursts of
``burst``). A key sees and spends only its own budget: charging, dedupe, rate limits, PRADA
state and the query log are all per key. Keys are stored and logged only as sha256 ids.

Errors are JSON ``{"error": "<what was expected and what arrived>", "code": "<short code>"}``:
400 malformed JSON / wrong fields / wrong shapes / non-numeric, NaN, inf or out-of-range values,
401 missing key, 402 budget exhausted (nothing answered or charged), 403 unknown or blocked key,
404 unknown model, 408 body not received within ``body_timeout``, 413 body or batch too large,
429 rate limited or too many requests of the key in progress, 503 overloaded (both with
``Retry-After``) and 507 query log not writable (nothing answered or charged). Malformed
requests never cause a 500.

Fairness: the key is identified from the headers before the body is read; at most
``max_pending`` predict requests are in progress, at most ``max_pending_per_key`` of one key,
and a body must arrive within ``body_timeout`` seconds, so one key sending slow or partial
bodies holds its own share of the slots for a bounded time, never every key's.

Persistence: ``log_dir/keys/<key id>.jsonl`` is an append-only per-key query log, one JSON line
per record (answered requests: time, instances, newly charged samples with their sha256
fingerprints and top-1 answers; refusals: status and code; PRADA alarms), each with its line
number ``seq``, the key's running ``spent`` and a crc32 ``crc``. A request is written and (by
default) fsync-ed before it is charged and answered; if that fails it is neither. The head file
``<key id>.head`` records ``seq`` and ``spent`` of the last written record (not fsync-ed: after
a power loss it may lag the log, so the last records' truncation can go unnoticed then; with
``--no-fsync`` it may lead the log, which reads as truncation). At start-up the log
is replayed and checked: a damaged or edited line (crc), a deleted, duplicated or moved line
(``seq``), a running total that disagrees with the charged samples, or a log shorter than its
head (truncated) is an error naming the file and line, never a silent budget reset; a torn last
line (crash mid-write) is dropped with a warning. Not detected: deleting a log together with its
head (a reset, like deleting the files), and a forger who recomputes the crc32s (that needs a
secret key, an HMAC). Logs of an older stealnb (no ``crc``) are read with a warning and
continued in the new format; a missing head is written again with the key's next record, with a
warning (deleting the head is how an operator accepts a log as it is).

Defences (optional): a list of :class:`stealnb.core.defense_seam.Defense` objects or specs in the one
spec syntax (``stealnb.defenses.parse_defense``: ``prada:delta=0.9,action=block``,
``admis:misinformation_model=misinfo.keras,tau=0.5``, ``round:decimals=2``, ...; ``stealnb serve
--defense SPEC``, repeatable), applied per key exactly as :class:`stealnb.extraction.oracle.Oracle` applies
them (:class:`stealnb.core.defense_seam.DefenseChain`): answer transforms in the order given, then, for a
key with an alarm of an observing defence (PRADA on the key's new samples, with the undefended
model's top-1 as class), its action -- ``"log"`` (only logged), ``"block"`` (refused with 403 from
the request that raised it on, nothing charged) or ``"poison"`` (for label mode a deterministic
wrong class per sample, for soft modes the probability vector rolled so the top-1 moves). A
detector's state (PRADA's growing sets) is kept in memory; the alarm is logged as a
``<defence>_flag`` record and survives a restart.
"""
# (no `from __future__ import annotations`: FastAPI resolves the endpoint annotations at runtime)

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import math
import os
import socket
import stat
import threading
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core._checks import UsageError, check_positive_int, check_real
from ..core.defense_seam import DefenseChain
from ..defenses import DEFENSES, parse_defenses
from ..core.models import load_model, predict_logits, saved_num_classes, softmax
from ..extraction.oracle import OUTPUTS, _digests

log = logging.getLogger("stealnb.serve.server")

DEFAULT_MAX_BATCH = 256
DEFAULT_MAX_BODY_BYTES = 32 * 2**20  # a 256-image batch as nested lists is ~15 MB
DEFAULT_BODY_TIMEOUT = 10.0  # seconds to receive a whole body (32 MB at 3.2 MB/s)


class ApiError(Exception):
    """An answer other than 200: ``status``, short ``code``, ``message`` and extra JSON fields."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers, self.extra = headers or {}, extra

    def body(self) -> dict:
        return {"error": self.message, "code": self.code, **self.extra}


# ------------------------------------------------------------------------------------------------
# keys
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeySpec:
    """One API key's limits: ``budget`` distinct samples (``None``: unlimited), ``rate`` requests
    per second (``None``: unlimited) with bursts of up to ``burst`` requests (default
    ``max(1, ceil(rate))``), and a ``name`` for the operator."""

    budget: int | None = None
    rate: float | None = None
    burst: int | None = None
    name: str = ""

    def __post_init__(self):
        if self.budget is not None:
            check_positive_int(self.budget, "budget", minimum=0)
        if self.rate is not None:
            check_real(self.rate, "rate (requests per second, or None)", 0.0, lo_open=True)
            if self.burst is None:
                object.__setattr__(self, "burst", max(1, math.ceil(self.rate)))
        if self.burst is not None:
            check_positive_int(self.burst, "burst")


def key_id(key: str) -> str:
    """The id under which a key is stored and logged: the first 16 hex digits of its sha256."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def parse_keys(keys) -> dict[str, KeySpec]:
    """``{key: KeySpec | {"budget", "rate", "burst", "name"} | None}`` -> ``{key: KeySpec}``."""
    if not isinstance(keys, dict) or not keys:
        raise ValueError("keys: expected a non-empty {api_key: {'budget': int|None, 'rate': float|None}} mapping")
    out = {}
    for k, spec in keys.items():
        if not isinstance(k, str) or len(k) < 8 or k != k.strip():
            raise ValueError("keys: every API key must be a string of at least 8 characters without surrounding spaces")
        if spec is None:
            spec = KeySpec()
        elif isinstance(spec, dict):
            unknown = set(spec) - {"budget", "rate", "burst", "name"}
            if unknown:
                raise ValueError(f"keys[{key_id(k)}]: unknown field(s) {sorted(unknown)}; expected budget, rate, burst, name")
            spec = KeySpec(**spec)
        elif not isinstance(spec, KeySpec):
            raise TypeError(f"keys[{key_id(k)}]: expected a dict or KeySpec, got {type(spec).__name__}")
        out[k] = spec
    return out


class QueryLogError(UsageError):
    """A query log (or its head file) that cannot be read or fails its checks, found at start-up;
    the message names the file (and line). The server refuses to guess a key's spending."""


_CRC_FIELD = b',"crc":"'
_HEAD_SLOT = 64  # bytes per slot; a head file holds two


def _seal(rec: dict) -> bytes:
    """``rec`` as one JSON line whose last field ``crc`` is the crc32 of the line without it."""
    body = json.dumps(rec, separators=(",", ":")).encode()
    return body[:-1] + _CRC_FIELD + b'%08x"}\n' % zlib.crc32(body)


def _unseal(line: bytes):
    """The record of a sealed line (no newline); ``None`` if it has no crc field, ``False`` if the
    crc does not match."""
    head, sep, tail = line.rpartition(_CRC_FIELD)
    if not sep or len(tail) != 10 or not tail.endswith(b'"}'):
        return None
    try:
        return json.loads(line) if int(tail[:8], 16) == zlib.crc32(head + b"}") else False
    except ValueError:
        return False


def _read_file(p: Path, what: str) -> bytes | None:
    """The bytes of the regular file ``p`` (``None`` if there is none); anything else is a QueryLogError."""
    try:
        mode = p.stat().st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise QueryLogError(f"{what} {p}: expected a file, found {kind}")
        return p.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise QueryLogError(f"{what} {p}: cannot be read ({e.strerror})") from None


class _KeyState:
    """Everything the server knows about one key; guarded by the service lock (tokens by ``tlock``).

    The query log ``<id>.jsonl`` is append-only, one sealed JSON line per record (:func:`_seal`)
    with ``seq`` (its line number) and ``spent`` (the key's spending after it); the head file
    ``<id>.head`` holds ``seq`` and ``spent`` of the last durable record, in two slots written in
    turn (a torn write leaves the other intact). Start-up checks every line and the log's end
    against the head.
    """

    def __init__(self, key: str, spec: KeySpec, log_path: Path | None, fsync: bool, clock=time.monotonic):
        self.id, self.spec, self.log_path, self.fsync = key_id(key), spec, log_path, fsync
        self.clock = clock  # seconds, monotonic: refills the token bucket
        self.seen: set[bytes] = set()  # sha256 of every sample this key has been charged for
        self.requests = 0  # answered predict requests
        self.pending = 0  # predict requests of this key in progress
        self.alarms: dict[str, int] = {}  # defence -> 1-based index of the key's paid sample that raised its alarm
        self.queued: list[dict] = []  # records (an alarm) to log before the next one
        self.tokens = float(spec.burst or 0)
        self.updated = clock()
        self.tlock = threading.Lock()
        self.seq = self._size = 0  # records and bytes in the log
        self._fd = self._head_fd = None
        self._slot = 0  # the head slot written next
        if log_path is not None:
            self.head_path = log_path.with_suffix(".head")
            self._load()

    @property
    def spent(self) -> int:
        return len(self.seen)

    @property
    def remaining(self) -> int | None:
        return None if self.spec.budget is None else max(self.spec.budget - self.spent, 0)

    def take_token(self) -> float | None:
        """Consume one request token; ``None`` if allowed, else seconds until one is available."""
        if self.spec.rate is None:
            return None
        with self.tlock:
            now = self.clock()
            self.tokens = min(float(self.spec.burst), self.tokens + (now - self.updated) * self.spec.rate)
            self.updated = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return None
            return (1.0 - self.tokens) / self.spec.rate

    # -- start-up: replay and check the log -------------------------------------------------------
    def _load(self) -> None:
        p = self.log_path
        head = self._load_head()
        raw = _read_file(p, "query log") or b""
        good = raw.rfind(b"\n") + 1
        if good < len(raw):
            warnings.warn(f"query log {p}: dropped {len(raw) - good} byte(s) of a torn last line", stacklevel=2)
            try:
                with open(p, "r+b") as f:
                    f.truncate(good)
                    os.fsync(f.fileno())
            except OSError as e:
                raise QueryLogError(f"query log {p}: cannot cut off its torn last line ({e.strerror})") from None
        self._size = good
        head_seq, head_spent = head or (0, 0)
        legacy, spent_at_head = 0, 0  # legacy: leading lines without a crc (an older stealnb's)
        for n, line in enumerate(raw[:good].splitlines(), 1):
            rec, sealed = self._parse(line, n, legacy == n - 1)
            self._apply(rec, n, sealed)
            legacy += not sealed
            self.seq = n
            if n == head_seq:
                spent_at_head = self.spent
        if legacy:
            warnings.warn(f"query log {p}: lines 1-{legacy} have no checksums (written by an older stealnb); "
                          "they are replayed unchecked", stacklevel=2)
        if head is None:
            if self.seq:
                warnings.warn(f"query log {p}: no head file {self.head_path}, so truncation cannot be checked this "
                              "time; the key's next record writes one", stacklevel=2)
        elif self.seq < head_seq:
            raise QueryLogError(f"query log {p}: holds {self.seq} records but {self.head_path} says {head_seq} (spent "
                                f"{head_spent}) were written: lines were deleted or the log was truncated; restore "
                                "it, or delete the head file to accept the log as it is")
        elif spent_at_head != head_spent:
            raise QueryLogError(f"query log {p}, line {head_seq}: spent {spent_at_head}, but {self.head_path} says "
                                f"{head_spent}; restore the log, or delete the head file to accept it as it is")

    def _load_head(self) -> tuple[int, int] | None:
        """``(seq, spent)`` of the newest intact head slot, ``None`` without a head file."""
        raw = _read_file(self.head_path, "query log head")
        if raw is None:
            return None
        slots = []
        for i in range(2):
            rec = _unseal(raw[i * _HEAD_SLOT : (i + 1) * _HEAD_SLOT].rstrip(b" \n"))
            if isinstance(rec, dict) and isinstance(rec.get("seq"), int) and isinstance(rec.get("spent"), int):
                slots.append((rec["seq"], rec["spent"], i))
        if len(raw) != 2 * _HEAD_SLOT or not slots:
            raise QueryLogError(f"query log head {self.head_path}: damaged (expected two sealed {_HEAD_SLOT}-byte "
                                "slots); delete it to accept the query log as it is")
        seq, spent, i = max(slots)
        self._slot = 1 - i
        return seq, spent

    def _parse(self, line: bytes, n: int, legacy_ok: bool) -> tuple[dict, bool]:
        """Line ``n`` as ``(record, sealed)``; unsealed lines are accepted only before any sealed one."""
        where = f"query log {self.log_path}, line {n}"
        rec = _unseal(line)
        if rec is False:
            raise QueryLogError(f"{where}: checksum mismatch (the line was edited or damaged); refusing to guess "
                                "the key's spending")
        sealed = rec is not None
        if not sealed:
            if not legacy_ok:
                raise QueryLogError(f"{where}: has no checksum but lines before it have; refusing to guess the "
                                    "key's spending")
            try:
                rec = json.loads(line)
            except ValueError:
                raise QueryLogError(f"{where}: is not JSON; refusing to guess the key's spending") from None
        if not isinstance(rec, dict):
            raise QueryLogError(f"{where}: expected a JSON object (one record), got a JSON {type(rec).__name__}")
        if sealed and rec.get("seq") != n:
            raise QueryLogError(f"{where}: holds record {rec.get('seq')!r} where record {n} belongs: lines were "
                                "deleted, duplicated or moved; restore the log")
        return rec, sealed

    def _apply(self, rec: dict, n: int, sealed: bool) -> None:
        """Replay loaded record ``n``: its charged samples, answered request or PRADA alarm."""
        where = f"query log {self.log_path}, line {n}"
        fps = rec.get("fp", [])
        if not isinstance(fps, list) or not all(isinstance(f, str) and len(f) == 64 for f in fps):
            raise QueryLogError(f"{where}: 'fp' must be a list of 64-digit hex sha256 fingerprints")
        try:
            self.seen.update(bytes.fromhex(f) for f in fps)
        except ValueError:
            raise QueryLogError(f"{where}: 'fp' holds a fingerprint that is not hex") from None
        if rec.get("status") == 200:
            self.requests += 1
        event = rec.get("event")
        if isinstance(event, str) and event.endswith("_flag"):
            if not isinstance(rec.get("query"), int):
                raise QueryLogError(f"{where}: a {event} record needs an integer 'query'")
            self.alarms.setdefault(event[: -len("_flag")], rec["query"])
        if sealed and rec.get("spent") != self.spent:
            raise QueryLogError(f"{where}: records spent={rec.get('spent')!r}, but the samples charged up to it "
                                f"number {self.spent}; restore the log")

    # -- appending ----------------------------------------------------------------------------------
    def append(self, rec: dict, new=()) -> None:
        """Log the queued records and ``rec`` durably, then charge the samples ``new``.

        If the log cannot be written, what was written is cut off again, nothing is charged, the
        queued records stay queued and :class:`ApiError` 507 is raised."""
        now = round(time.time(), 3)
        recs = [*self.queued, rec]
        data = b"".join(_seal({"seq": self.seq + i, "t": now, **r, "spent": self.spent + (len(new) if r is rec else 0)})
                        for i, r in enumerate(recs, 1))
        if self.log_path is not None:
            try:
                self._write(data)
            except OSError as e:
                self.close()
                log.error("query log %s not written: %s", self.log_path, e)
                raise ApiError(507, "log_write_failed", f"the query log could not be written ({e.strerror or e}); "
                               "nothing was answered or charged, retry later") from None
        self.seen.update(new)
        self.seq += len(recs)
        self.queued.clear()
        if self.log_path is not None:
            try:
                self._write_head()
            except OSError as e:  # the log ahead of its head is accepted at start-up: it holds every charge
                log.warning("query log head %s not updated (%s)", self.head_path, e)

    def _write(self, data: bytes) -> None:
        if self._fd is None:
            self._fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            size = os.fstat(self._fd).st_size
            if size != self._size:
                raise OSError(f"the log holds {size} bytes where {self._size} were written: another writer?")
            if not self.head_path.exists():
                self._create_head()  # also makes the new log's directory entry durable
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            if self.fsync:
                os.fsync(self._fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise
        self._size += len(data)

    def _head_slot(self) -> bytes:
        return _seal({"seq": self.seq, "spent": self.spent})[:-1].ljust(_HEAD_SLOT - 1) + b"\n"

    def _create_head(self) -> None:
        """The head file, written whole: a temporary file, fsync-ed, renamed into place, the folder fsync-ed."""
        tmp = self.head_path.with_suffix(".head.tmp")
        with open(tmp, "wb") as f:
            f.write(self._head_slot() * 2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.head_path)
        fd = os.open(self.head_path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write_head(self) -> None:
        """Not fsync-ed: written after the log's fsync, the head on disk may lag the log, never lead it."""
        if self._head_fd is None:
            self._head_fd = os.open(self.head_path, os.O_WRONLY)
        os.pwrite(self._head_fd, self._head_slot(), self._slot * _HEAD_SLOT)
        self._slot = 1 - self._slot

    def close(self) -> None:
        for fd in (self._fd, self._head_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._head_fd = None


# ------------------------------------------------------------------------------------------------
# the service (transport-independent)
# ------------------------------------------------------------------------------------------------


class _NonFinite(ValueError):
    pass


def _reject_constant(name):
    raise _NonFinite(name)


def _has_non_number(obj) -> str | None:
    """Type name of the first leaf of nested lists that is not an int/float (bools count as
    non-numbers), else ``None``."""
    stack = [obj]
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)
        elif type(v) not in (int, float):
            return type(v).__name__
    return None


class PredictionService:
    """The model, keys, limits, log and defences behind :func:`create_app` (no HTTP in here)."""

    def __init__(self, model_or_dir, *, name: str = "secret", output: str = "label", top_k: int = 3, keys,
                 max_batch: int = DEFAULT_MAX_BATCH, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 log_dir=None, defenses=(), fsync: bool = True, max_pending: int = 64,
                 max_pending_per_key: int | None = None, body_timeout: float = DEFAULT_BODY_TIMEOUT,
                 batch_size: int = 256, clock=None):
        if not isinstance(name, str) or not name or any(c in name for c in "/:?# "):
            raise ValueError(f"name: expected a model name without '/', ':', '?', '#' or spaces, got {name!r}")
        if output not in OUTPUTS:
            raise ValueError(f"output: expected one of {OUTPUTS}, got {output!r}")
        self.model = load_model(model_or_dir) if isinstance(model_or_dir, (str, Path)) else model_or_dir
        if not callable(self.model) or not hasattr(self.model, "output_shape") or not hasattr(self.model, "input_shape"):
            raise TypeError("model_or_dir: expected a Keras model, a .keras file or a secret folder with model.keras")
        self.name, self.output = name, output
        self.num_classes = int(self.model.output_shape[-1])
        self.input_shape = tuple(int(d) for d in self.model.input_shape[1:])
        self.top_k = check_positive_int(top_k, "top_k") if output == "topk" else None
        if self.top_k is not None and self.top_k > self.num_classes:
            raise ValueError(f"top_k: expected at most {self.num_classes} (the number of classes), got {top_k}")
        self.max_batch = check_positive_int(max_batch, "max_batch")
        self.max_body_bytes = check_positive_int(max_body_bytes, "max_body_bytes", minimum=1024)
        self.max_pending = check_positive_int(max_pending, "max_pending")
        self.max_pending_per_key = check_positive_int(
            max(1, max_pending // 4) if max_pending_per_key is None else max_pending_per_key, "max_pending_per_key")
        self.body_timeout = check_real(body_timeout, "body_timeout (seconds)", 0.0, lo_open=True)
        self.batch_size = check_positive_int(batch_size, "batch_size")
        if clock is not None and not callable(clock):
            raise TypeError(f"clock: expected a function returning monotonic seconds (like time.monotonic), got {clock!r}")
        self.clock = time.monotonic if clock is None else clock
        self.log_dir = None if log_dir is None else Path(log_dir)
        if self.log_dir is not None:
            try:
                (self.log_dir / "keys").mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise QueryLogError(f"log_dir {self.log_dir}: cannot create {self.log_dir / 'keys'} ({e.strerror})") from None
        self.defenses = DefenseChain(parse_defenses(defenses), output=output, num_classes=self.num_classes)
        self.pending = 0
        self._lock = threading.Lock()
        self._parsing = threading.BoundedSemaphore(max(1, min(4, os.cpu_count() or 1)))
        self._keys: dict[bytes, _KeyState] = {}
        for k, spec in parse_keys(keys).items():
            path = None if self.log_dir is None else self.log_dir / "keys" / f"{key_id(k)}.jsonl"
            state = self._keys[hashlib.sha256(k.encode()).digest()] = _KeyState(k, spec, path, fsync, self.clock)
            for defense, query in state.alarms.items():
                self.defenses.restore(state.id, defense, query)
        self._pixels = int(np.prod(self.input_shape))
        predict_logits(self.model, np.zeros((1, *self.input_shape), np.float32), batch_size=1)  # warm up

    def close(self) -> None:
        for s in self._keys.values():
            s.close()

    # -- checks before the body is read -----------------------------------------------------------
    def authenticate(self, headers) -> _KeyState:
        key = None
        auth = headers.get("authorization")
        if auth:
            scheme, _, value = auth.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise ApiError(401, "bad_auth", "Authorization header: expected 'Bearer <api key>'",
                               {"WWW-Authenticate": "Bearer"})
            key = value.strip()
        elif headers.get("x-api-key"):
            key = headers.get("x-api-key").strip()
        if not key:
            raise ApiError(401, "missing_key", "missing API key: send 'Authorization: Bearer <api key>' "
                           "(or 'X-API-Key: <api key>')", {"WWW-Authenticate": "Bearer"})
        state = self._keys.get(hashlib.sha256(key.encode()).digest())
        if state is None:
            raise ApiError(403, "unknown_key", "unknown API key")
        return state

    def check_name(self, name: str) -> None:
        if name != self.name:
            raise ApiError(404, "unknown_model", f"no model named {name!r} is served here")

    def check_pending(self, state: _KeyState) -> None:
        """Room for one more request of ``state``: at most ``max_pending_per_key`` of one key and
        ``max_pending`` in all may be in progress (body being read, or predicting)."""
        if state.pending >= self.max_pending_per_key:
            raise ApiError(429, "too_many_pending", f"this API key already has {state.pending} request(s) in progress, "
                           f"the most one key may have; retry when one is answered", {"Retry-After": "1"})
        if self.pending >= self.max_pending:
            raise ApiError(503, "overloaded", f"{self.pending} requests in progress; retry shortly", {"Retry-After": "1"})

    def check_rate(self, state: _KeyState) -> None:
        wait = state.take_token()
        if wait is not None:
            secs = max(1, math.ceil(wait))
            raise ApiError(429, "rate_limited",
                           f"rate limit of {state.spec.rate:g} request(s)/s (bursts of {state.spec.burst}) exceeded; "
                           f"retry in {wait:.2f} s", {"Retry-After": str(secs)}, retry_after=round(wait, 3))

    # -- status --------------------------------------------------------------------------------------
    def status(self, state: _KeyState) -> dict:
        return {
            "model_version_status": [{"version": "1", "state": "AVAILABLE",
                                      "status": {"error_code": "OK", "error_message": ""}}],
            "stealnb": {
                "name": self.name, "output": self.output, "top_k": self.top_k, "num_classes": self.num_classes,
                "input_shape": list(self.input_shape), "dtype": "float32", "value_range": [0.0, 1.0],
                "encodings": ["list", "b64"], "max_batch": self.max_batch, "max_body_bytes": self.max_body_bytes,
                "key": {"id": state.id, "name": state.spec.name, "budget": state.spec.budget, "spent": state.spent,
                        "remaining": state.remaining, "requests": state.requests, "rate": state.spec.rate,
                        "burst": state.spec.burst},
            },
        }

    # -- body parsing ----------------------------------------------------------------------------------
    def parse(self, body: bytes) -> np.ndarray:
        """The request body as float32 images ``N x H x W x C`` in [0, 1], or an :class:`ApiError`."""
        shape_txt = f"({', '.join(map(str, self.input_shape))})"
        try:
            doc = json.loads(body, parse_constant=_reject_constant)
        except _NonFinite as e:
            raise ApiError(400, "non_finite", f"request body contains {e}; pixel values must be finite numbers in [0, 1]") from None
        except RecursionError:
            raise ApiError(400, "bad_json", "request body is nested too deeply to be a predict request") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, "bad_json", f"request body is not valid JSON: {e}") from None
        if not isinstance(doc, dict):
            raise ApiError(400, "bad_request", f'expected a JSON object {{"instances": [...]}}, got a JSON {type(doc).__name__}')
        if "inputs" in doc:
            raise ApiError(400, "bad_request", "the columnar 'inputs' format is not supported; send {\"instances\": [...]}")
        unknown = set(doc) - {"instances", "signature_name"}
        if unknown:
            raise ApiError(400, "bad_request", f"unknown field(s) {sorted(unknown)}; expected 'instances' (and optionally 'signature_name')")
        if doc.get("signature_name", "serving_default") != "serving_default":
            raise ApiError(400, "bad_request", f"signature_name: only 'serving_default' is served, got {doc['signature_name']!r}")
        if "instances" not in doc:
            raise ApiError(400, "bad_request", 'missing "instances": expected {"instances": [image, ...]}')
        inst = doc["instances"]
        if not isinstance(inst, list):
            raise ApiError(400, "bad_request", f'"instances": expected a list of images, got a JSON {type(inst).__name__}')
        if not inst:
            raise ApiError(400, "empty_batch", '"instances": expected at least one image, got an empty list')
        if len(inst) > self.max_batch:
            raise ApiError(413, "batch_too_large", f"batch of {len(inst)} instances exceeds max_batch={self.max_batch}; "
                           "split it into several requests")
        n_dict = sum(isinstance(i, dict) for i in inst)
        if n_dict == len(inst):
            x = self._from_b64(inst)
        elif n_dict:
            raise ApiError(400, "bad_request", "instances: mix of {\"b64\": ...} objects and nested lists; use one form per request")
        else:
            x = self._from_lists(inst, body, shape_txt)
        if not np.isfinite(x).all():
            bad = int(np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))[0])
            raise ApiError(400, "non_finite", f"instance {bad} contains NaN or inf; expected finite values in [0, 1]")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            flat = x.reshape(len(x), -1)
            bad = int(np.flatnonzero((flat < 0).any(axis=1) | (flat > 1).any(axis=1))[0])
            raise ApiError(400, "out_of_range", f"instance {bad}: values must be in [0, 1] (float32 images), got range "
                           f"[{float(flat[bad].min()):.4g}, {float(flat[bad].max()):.4g}]")
        return np.ascontiguousarray(x, dtype=np.float32)

    def _from_b64(self, inst: list) -> np.ndarray:
        nbytes = self._pixels * 4
        out = np.empty((len(inst), self._pixels), np.float32)
        for i, d in enumerate(inst):
            if set(d) != {"b64"} or not isinstance(d["b64"], str):
                raise ApiError(400, "bad_request", f'instance {i}: expected {{"b64": "<base64 string>"}}, got keys {sorted(d)}')
            try:
                raw = base64.b64decode(d["b64"], validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(400, "bad_base64", f"instance {i}: 'b64' is not valid base64") from None
            if len(raw) != nbytes:
                raise ApiError(400, "bad_shape", f"instance {i}: expected {self._pixels} float32 values ({nbytes} bytes, "
                               f"shape {self.input_shape}), got {len(raw)} bytes")
            out[i] = np.frombuffer(raw, dtype="<f4")
        return out.reshape(len(inst), *self.input_shape)

    def _from_lists(self, inst: list, body: bytes, shape_txt: str) -> np.ndarray:
        # true/false/null can only hide among the numbers if their tokens occur in the body
        if b"true" in body or b"false" in body or b"null" in body:
            bad = _has_non_number(inst)
            if bad is not None:
                raise ApiError(400, "not_numeric", f"instances: expected numbers in [0, 1], found a JSON {bad}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                arr = np.asarray(inst)
        except (ValueError, TypeError, OverflowError):
            raise ApiError(400, "bad_shape", f"instances: ragged nesting; expected every image as a {shape_txt} nested "
                           "list of numbers (or {\"b64\": ...})") from None
        if arr.dtype.kind not in "iuf":
            what = "strings" if arr.dtype.kind in "US" else "non-numeric values"
            if arr.dtype.kind == "O" and _has_non_number(inst) is None:
                raise ApiError(400, "out_of_range", "instances: integers too large; expected values in [0, 1]")
            raise ApiError(400, "not_numeric", f"instances: expected numbers in [0, 1], found {what}")
        if arr.shape[1:] != self.input_shape:
            raise ApiError(400, "bad_shape", f"instances: expected images of shape {shape_txt}, got shape "
                           f"{tuple(arr.shape[1:])} per instance")
        if arr.dtype.kind != "f":
            arr = arr.astype(np.float64)
        return arr

    # -- predict -----------------------------------------------------------------------------------
    def predict(self, state: _KeyState, body: bytes) -> tuple[dict, dict]:
        """Parse, charge, answer and log one request of key ``state``; ``(json, headers)``."""
        try:
            with self._parsing:  # bounds the memory of concurrent large (nested-list) bodies
                x = self.parse(body)
        except ApiError as e:
            with self._lock:
                state.append({"status": e.status, "code": e.code})
            raise
        fps = _digests(x)
        chain = self.defenses
        with self._lock:
            if chain.refuses(state.id):
                state.append({"status": 403, "code": "blocked", "n": len(x)})
                raise ApiError(403, "blocked", "this API key has been blocked for suspicious query patterns")
            new: dict[bytes, int] = {}
            for i, fp in enumerate(fps):
                if fp not in state.seen and fp not in new:
                    new[fp] = i
            budget = state.spec.budget
            if budget is not None and state.spent + len(new) > budget:
                state.append({"status": 402, "code": "budget_exceeded", "n": len(x), "new": len(new)})
                raise ApiError(402, "budget_exceeded",
                               f"request refused: it asks for {len(new)} new sample(s) but only "
                               f"{budget - state.spent} of this key's budget of {budget} remain; nothing was "
                               "answered or charged", budget=budget, spent=state.spent, asked=len(new))
            logits = predict_logits(self.model, x, batch_size=self.batch_size)
            if logits.shape != (len(x), self.num_classes) or not np.isfinite(logits).all():
                raise RuntimeError(f"model returned logits of shape {logits.shape} with non-finite values; not answering")
            top1 = logits.argmax(axis=1)
            if chain and new:
                idx = list(new.values())
                for alarm in chain.observe(state.id, x[idx], top1[idx], start=state.spent):
                    event = f"{alarm.pop('defense')}_flag"
                    state.alarms.setdefault(event[: -len("_flag")], alarm["query"])
                    # logged with the request's record (or, if that fails, the next)
                    state.queued.append({"t": round(time.time(), 3), "event": event, **alarm})
                    log.warning("%s alarm for key %s at its query %d", event, state.id, alarm["query"])
                if chain.refuses(state.id):
                    state.append({"status": 403, "code": "blocked", "n": len(x)})
                    raise ApiError(403, "blocked", "this API key has been blocked for suspicious query patterns")
            poison = chain.poisons(state.id)
            preds, answered = self._answer(state, x, logits, fps)
            state.append({"status": 200, "n": len(x), "new": len(new), "fp": [fp.hex() for fp in new],
                          "top1": [int(answered[i]) for i in new.values()], **({"poisoned": True} if poison else {})},
                         new)
            state.requests += 1
            headers = {"X-Budget-Spent": str(state.spent)}
            if budget is not None:
                headers["X-Budget-Remaining"] = str(budget - state.spent)
        return {"predictions": preds}, headers

    def _answer(self, state: _KeyState, x, logits, fps):
        """Predictions in the output mode (and the top-1 of each, for the log)."""
        if not self.defenses.changes_answers(state.id):
            if self.output == "label":
                top1 = logits.argmax(axis=1)
                return top1.tolist(), top1
            if self.output == "topk":
                idx = np.argsort(-logits, axis=1, kind="stable")[:, : self.top_k]
                p = np.take_along_axis(softmax(logits), idx, axis=1)
                return [{"classes": i.tolist(), "probabilities": q.tolist()} for i, q in zip(idx, p)], idx[:, 0]
            p = softmax(logits)
            return p.tolist(), p.argmax(axis=1)
        probs = self.defenses.answer(state.id, x, softmax(logits, dtype=np.float64), fps)
        p32 = probs.astype(np.float32)
        if self.output == "label":
            top1 = probs.argmax(axis=1)
            return top1.tolist(), top1
        if self.output == "topk":
            idx = np.argsort(-probs, axis=1, kind="stable")[:, : self.top_k]
            q = np.take_along_axis(p32, idx, axis=1)
            return [{"classes": i.tolist(), "probabilities": r.tolist()} for i, r in zip(idx, q)], idx[:, 0]
        return p32.tolist(), probs.argmax(axis=1)

    def key_usage(self) -> dict[str, dict]:
        """Operator view (not served over HTTP): ``{key id: {name, budget, spent, requests, flagged_at}}``."""
        with self._lock:
            return {s.id: {"name": s.spec.name, "budget": s.spec.budget, "spent": s.spent, "requests": s.requests,
                           "flagged_at": self.defenses.flagged_at(s.id)} for s in self._keys.values()}


# ------------------------------------------------------------------------------------------------
# HTTP
# ------------------------------------------------------------------------------------------------


def create_app(model_or_dir, *, name: str = "secret", output: str = "label", top_k: int = 3, keys,
               max_batch: int = DEFAULT_MAX_BATCH, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, log_dir=None,
               defenses=(), fsync: bool = True, max_pending: int = 64, max_pending_per_key: int | None = None,
               body_timeout: float = DEFAULT_BODY_TIMEOUT, clock=None):
    """A FastAPI app serving ``model_or_dir`` (Keras model, ``.keras`` file or secret folder) under
    ``name`` with the TF Serving REST predict API (see the module docstring).

    ``output``: ``"label"``, ``"topk"`` (``top_k`` classes) or ``"probs"``; ``keys``: ``{api_key:
    {"budget": int|None, "rate": req/s|None, "burst": int, "name": str}}``; ``max_batch``
    instances and ``max_body_bytes`` per request; ``log_dir``: per-key query logs (``None``: keep
    nothing, spending is forgotten on restart); ``defenses``: :class:`stealnb.core.defense_seam.Defense`
    objects or specs (``"prada:delta=0.9,action=block"``, see the module docstring), applied per key; ``max_pending``: predict requests in progress before new ones get 503, at most
    ``max_pending_per_key`` (default ``max(1, max_pending // 4)``) of one key (then 429);
    ``body_timeout``: seconds to receive a request's whole body (then 408); ``clock``: the
    monotonic seconds the rate limits refill on (default ``time.monotonic``; tests pass a fake).
    The service is ``app.state.service``.
    """
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    svc = PredictionService(model_or_dir, name=name, output=output, top_k=top_k, keys=keys, max_batch=max_batch,
                            max_body_bytes=max_body_bytes, log_dir=log_dir, defenses=defenses, fsync=fsync,
                            max_pending=max_pending, max_pending_per_key=max_pending_per_key,
                            body_timeout=body_timeout, clock=clock)
    app = FastAPI(title="stealnb prediction service", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = svc

    def _json(status: int, body: dict, headers: dict | None = None):
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        headers = exc.headers
        if request.method == "POST" and not getattr(request.state, "body_read", False):
            headers = {**headers, "Connection": "close"}  # else a client trickling the rest keeps it open
        return _json(exc.status, exc.body(), headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        msg = {404: "not found: the API is POST /v1/models/<name>:predict and GET /v1/models/<name>",
               405: "method not allowed: predict is POST /v1/models/<name>:predict, status is GET /v1/models/<name>"}
        return _json(exc.status_code, {"error": msg.get(exc.status_code, str(exc.detail)), "code": f"http_{exc.status_code}"},
                     getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return _json(400, {"error": f"bad request: {exc.errors()}", "code": "bad_request"})

    @app.exception_handler(Exception)
    async def _internal(request, exc):
        log.exception("internal error")
        return _json(500, {"error": f"internal error ({type(exc).__name__}); the request was not charged",
                           "code": "internal"})

    async def _read_body(request) -> bytes:
        limit = svc.max_body_bytes
        cl = request.headers.get("content-length")
        if cl is not None and cl.isdigit() and int(cl) > limit:
            raise ApiError(413, "body_too_large", f"request body of {int(cl)} bytes exceeds the limit of {limit} bytes")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, "body_too_large", f"request body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
        except ClientDisconnect:
            raise ApiError(400, "disconnected", "client disconnected before sending the whole body") from None
        request.state.body_read = True
        return b"".join(chunks)

    @app.get("/v1/models/{model_name}")
    async def model_status(model_name: str, request: Request):
        state = svc.authenticate(request.headers)
        svc.check_name(model_name)
        return svc.status(state)

    async def _predict(model_name: str, request: Request):
        state = svc.authenticate(request.headers)
        svc.check_name(model_name)
        svc.check_pending(state)
        svc.check_rate(state)
        svc.pending += 1
        state.pending += 1
        try:
            try:
                with anyio.fail_after(svc.body_timeout):
                    body = await _read_body(request)
            except TimeoutError:
                raise ApiError(408, "body_timeout",
                               f"the request body did not arrive within {svc.body_timeout:g} s") from None
            out, headers = await anyio.to_thread.run_sync(svc.predict, state, body)
        finally:
            svc.pending -= 1
            state.pending -= 1
        return Response(json.dumps(out, separators=(",", ":")).encode(), media_type="application/json", headers=headers)

    @app.post("/v1/models/{model_name}:predict")
    async def predict(model_name: str, request: Request):
        return await _predict(model_name, request)

    @app.post("/v1/models/{model_name}/versions/{version}:predict")
    async def predict_version(model_name: str, version: str, request: Request):
        if version != "1":
            svc.authenticate(request.headers)
            raise ApiError(404, "unknown_version", f"model {model_name!r} has only version 1, got {version!r}")
        return await _predict(model_name, request)

    return app


class BackgroundServer:
    """Run an ASGI ``app`` with uvicorn in a daemon thread (tests, notebooks, benchmarks)::

        with BackgroundServer(app) as srv:
            HttpOracle(srv.url, api_key=...)

    The listening socket is bound here, before the thread starts: ``port=0`` lets the kernel
    pick a free port, which ``srv.port`` reads back from the socket (no port is probed, closed
    and bound again, which another process could take in between); ``srv.url`` is the base URL."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.host = host
        self.socket = listen_socket(host, port)
        self.port = self.socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout=10)
        self.socket.close()  # uvicorn closes it on shutdown; also when the thread never started

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def listen_socket(host: str = "127.0.0.1", port: int = 0, fd: int | None = None) -> socket.socket:
    """A listening TCP socket: bound to ``host``:``port`` (``port=0``: a free port the kernel picks;
    read it back with ``sock.getsockname()[1]``), or the already bound socket inherited as file
    descriptor ``fd`` (a parent that keeps the port across restarts of the server)."""
    if fd is not None:
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
            sock.detach()
            raise ValueError(f"--fd {fd}: expected a bound TCP socket")
        sock.listen(2048)
        return sock
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        raise OSError(e.errno, f"cannot listen on {host}:{port} ({e.strerror})") from None


# ------------------------------------------------------------------------------------------------
# CLI: stealnb serve
# ------------------------------------------------------------------------------------------------


def _parse_key_arg(text: str) -> tuple[str, dict]:
    parts = text.split(":")
    if not 1 <= len(parts) <= 3 or not parts[0]:
        raise ValueError(f"--key: expected KEY[:BUDGET[:RATE]], got {text!r}")
    spec = {}
    if len(parts) > 1 and parts[1] not in ("", "-"):
        spec["budget"] = int(parts[1])
    if len(parts) > 2 and parts[2] not in ("", "-"):
        spec["rate"] = float(parts[2])
    return parts[0], spec


def app_from_args(args):
    """The app ``stealnb serve`` runs for its parsed arguments ``args`` (keys, defences, limits)."""
    defenses = parse_defenses(args.defense)  # a bad spec is one line and exit 2, before the model loads
    keys = {}
    if args.keys:
        try:
            doc = json.loads(args.keys.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"--keys {args.keys}: cannot be read as JSON ({getattr(e, 'strerror', None) or e})") from None
        if not isinstance(doc, dict):
            raise ValueError(f"--keys {args.keys}: expected a JSON object {{api key: {{budget, rate}}}}, got a JSON "
                             f"{type(doc).__name__}")
        keys.update(doc)
    for k in args.key or []:
        key, spec = _parse_key_arg(k)
        keys[key] = spec
    if not keys:
        raise ValueError("serve: give at least one API key with --keys FILE (JSON {key: {budget, rate}}) or --key KEY[:BUDGET[:RATE]]")
    n = saved_num_classes(args.model)
    if defenses and n is not None:  # the defences' class and output checks, before TensorFlow loads the model
        DefenseChain(defenses, output=args.output, num_classes=n)
    return create_app(args.model, name=args.name, output=args.output, top_k=args.top_k, keys=keys,
                      max_batch=args.max_batch, max_body_bytes=int(args.max_body_mb * 2**20), log_dir=args.log_dir,
                      defenses=defenses, fsync=not args.no_fsync, max_pending=args.max_pending,
                      max_pending_per_key=args.max_pending_per_key, body_timeout=args.body_timeout)


def _cmd_serve(args) -> int:
    import uvicorn

    app = app_from_args(args)
    keys = app.state.service.key_usage()
    svc = app.state.service
    sock = listen_socket(args.host, args.port, args.fd)
    host, port = sock.getsockname()[:2]
    where = f"[{host}]" if ":" in host else host
    # the port actually bound (--port 0 asks the kernel for a free one), for whoever reads this line
    print(f"serving {args.model} as {args.name!r} ({args.output}) on http://{where}:{port}"
          f"/v1/models/{args.name}:predict for {len(keys)} key(s); logs in {args.log_dir}", flush=True)
    for kid, u in svc.key_usage().items():
        print(f"  key {kid} {u['name'] or ''}: budget {u['budget']}, spent {u['spent']}", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, lifespan="off")).run(sockets=[sock])
    svc.close()
    return 0


def register_cli(subparsers) -> None:
    """Add ``stealnb serve``."""
    s = subparsers.add_parser("serve", help="serve a secret model over HTTP (TF Serving REST API, metered keys)")
    s.add_argument("--model", required=True, type=Path, help="secret folder (model.keras) or a .keras file")
    s.add_argument("--name", default="secret", help="model name in the URL /v1/models/<name>:predict")
    s.add_argument("--output", default="label", choices=OUTPUTS, help="answer mode")
    s.add_argument("--top-k", type=int, default=3)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8500, help="0: a free port, printed on start-up")
    s.add_argument("--fd", type=int, default=None,
                   help="serve on this inherited, already bound TCP socket instead of --host/--port")
    s.add_argument("--keys", type=Path, default=None,
                   help='JSON file {"<api key>": {"budget": 1000, "rate": 5, "burst": 10, "name": "alice"}}')
    s.add_argument("--key", action="append", default=None,
                   help="KEY[:BUDGET[:RATE]] (repeatable; visible in the process list, prefer --keys)")
    s.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH)
    s.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_BYTES / 2**20)
    s.add_argument("--log-dir", required=True, type=Path, help="per-key query logs (spending survives restarts)")
    s.add_argument("--no-fsync", action="store_true", help="do not fsync the log after every request (faster, less safe)")
    s.add_argument("--max-pending", type=int, default=64, help="predict requests in progress before new ones get 503")
    s.add_argument("--max-pending-per-key", type=int, default=None,
                   help="of which one key may have at most this many (default max-pending / 4), then 429")
    s.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT,
                   help="seconds to receive a request's whole body, then 408")
    s.add_argument("--defense", action="append", default=None, metavar="NAME[:OPTION=VALUE,...]",
                   help=f"a defence per key, applied in the order given (repeatable); one of {', '.join(DEFENSES.names())}, "
                        "e.g. prada:delta=0.9,action=block, admis:misinformation_model=misinfo.keras,tau=0.5, "
                        "round:decimals=2 (defaults: the defence's own)")
    s.add_argument("--log-level", default="warning")
    s.set_defaults(func=_cmd_serve)

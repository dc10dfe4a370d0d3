"""Hold what ``import tensorflow`` writes to stderr to ``TF_CPP_MIN_LOG_LEVEL``.

TensorFlow 2.21 logs through Abseil, and until a program calls ``absl::InitializeLog()`` (none
of TensorFlow's Python entry points does) Abseil writes every message to stderr whatever
``TF_CPP_MIN_LOG_LEVEL`` says. Each of the two TensorFlow libraries that bundle Abseil prints
"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR" and an
INFO line on oneDNN while ``import tensorflow`` runs: four lines in every command, server and
notebook that loads a model.

:func:`install` makes the first ``import tensorflow`` of the process (wherever it comes from:
``import keras`` imports it too) run with file descriptor 2 sent to a temporary file. Once the
import is done, the Abseil lines below ``TF_CPP_MIN_LOG_LEVEL`` (0 INFO, 1 WARNING, 2 ERROR,
3 FATAL) and Abseil's notice about its own set-up are dropped; every other line goes on to
stderr in its order. ``TF_CPP_MIN_LOG_LEVEL=0`` (or unset) filters nothing: use it to see
everything, e.g. when the import itself crashes (what it wrote is then lost with the process).
"""
from __future__ import annotations

import contextlib
import os
import re
import sys

# An Abseil log line: severity, MMDD and hh:mm:ss.micros (before absl::InitializeLog, 0000 and
# 00:00:<seconds since the epoch>), thread id, file:line]
_RECORD = re.compile(rb"([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^\]\s]+:\d+\] ")
_SEVERITY = {b"I": 0, b"W": 1, b"E": 2, b"F": 3}
_ABSL_NOTICE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


def min_log_level() -> int:
    """``TF_CPP_MIN_LOG_LEVEL`` as TensorFlow reads it (0 when unset or not a number)."""
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def keep(line: bytes, level: int) -> bool:
    """Whether stderr ``line`` passes ``level``: only Abseil's log lines can fall below it."""
    if level <= 0:
        return True
    if line.rstrip(b"\r\n") == _ABSL_NOTICE:
        return False
    m = _RECORD.match(line)
    return m is None or _SEVERITY[m.group(1)] >= level


@contextlib.contextmanager
def filtered_stderr(level: int):
    """Run the block with file descriptor 2 sent to a temporary file, then pass on the lines that
    :func:`keep` keeps. With ``level <= 0``, or no file descriptor 2, the block runs as it is."""
    if level <= 0:
        yield
        return
    import tempfile

    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        _flush_stderr()
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            _flush_stderr()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = b"".join(line for line in tmp if keep(line, level))
            while kept:
                kept = kept[os.write(2, kept):]


def _flush_stderr() -> None:
    with contextlib.suppress(Exception):
        sys.stderr.flush()


class _FilteredLoader:
    """Runs ``loader.exec_module`` under :func:`filtered_stderr`; the module keeps ``loader``."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self.loader
        with filtered_stderr(min_log_level()):
            self.loader.exec_module(module)


class _TensorFlowImport:
    """Meta path finder for the first ``import tensorflow``: finds it with the other finders, hands
    its loading to a :class:`_FilteredLoader`, and leaves ``sys.meta_path``."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _FilteredLoader(spec.loader)
        return spec


def install() -> None:
    """Filter the process's first ``import tensorflow`` (nothing to do once it is imported)."""
    if "tensorflow" not in sys.modules and not any(isinstance(f, _TensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _TensorFlowImport())

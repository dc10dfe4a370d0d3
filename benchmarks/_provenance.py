"""What code a benchmark measured: stored in its JSON so a number can be traced to a commit."""
from __future__ import annotations

import subprocess
from pathlib import Path


def code_version() -> dict:
    """The checkout ``stealnb`` is imported from: its path, short commit, and whether tracked files
    differ from that commit (``dirty``)."""
    import stealnb

    root = Path(stealnb.__file__).resolve().parent.parent
    git = lambda *a: subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    return {"path": str(root), "commit": git("rev-parse", "--short", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}

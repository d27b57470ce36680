"""Where a run came from: commit, date, host; stored in the results JSON for reports and merges."""

from __future__ import annotations

import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path


def git_commit(directory: str | Path) -> str | None:
    """The checkout's HEAD (with '+dirty' when it has changes), None outside git."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(directory), *args], capture_output=True,
                                 text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    if not head:
        return None
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return head + ("+dirty" if dirty else "")


def run_facts(directory: str | Path) -> dict:
    return {
        "commit": git_commit(directory),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node() or None,
        "python": platform.python_version(),
    }

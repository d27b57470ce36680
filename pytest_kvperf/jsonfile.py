"""The one writer of the plugin's JSON files (baselines, results, peaks cache): atomic, locked.

A write goes to ``.<name>.<random>.tmp`` beside the file and is renamed over it, so a
reader sees the old file or the new one, never half. Every writer holds an exclusive
lock (``<name>.lock``, removed again on release) while its temporary file exists, so a
temporary file found under the lock belongs to a writer that was killed: it is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path


def dumps(data) -> str:
    """The file's text: sorted keys, so the same content is always the same bytes."""
    return json.dumps(data, indent=1, sort_keys=True) + "\n"


def _temp_files(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


@contextlib.contextmanager
def locked(path: str | os.PathLike):
    """Hold the exclusive lock of `path` (read-modify-write goes inside)."""
    import fcntl  # POSIX only: imported where a write needs it

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:  # the holder before us may have removed the lock file: then lock the new one
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        for stale in _temp_files(path):
            stale.unlink(missing_ok=True)
        yield
    finally:
        os.unlink(lock_path)  # while still holding it: waiters see it gone and retry
        os.close(fd)


def replace(path: str | os.PathLike, data) -> bool:
    """Write `data` as the new content of `path`, under `locked(path)`.

    Returns False, writing nothing, when the file already holds exactly these bytes.
    """
    path = Path(path)
    text = dumps(data).encode()
    with contextlib.suppress(FileNotFoundError):
        if path.read_bytes() == text:
            return False
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private; these are reviewed, shared files
        os.fchmod(fd, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return True


def write(path: str | os.PathLike, data) -> bool:
    """Replace the whole file under its lock; False when it was already this content."""
    with locked(path):
        return replace(path, data)

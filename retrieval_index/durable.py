"""Crash safety for the build job: durable atomic writes and the exclusive build lock.

`replace_durably(tmp, path)` fsyncs `tmp`, renames it over `path` and fsyncs the folder, so
after a crash (or power loss) `path` holds either the old or the new complete file.
`BuildLock(out_dir)` holds an exclusive `fcntl.flock` on `out_dir/.lock` for one build; the
kernel drops it when the process dies, so a killed build never leaves a stale lock. The
file itself is kept (unlinking a lock file lets two processes lock two different inodes).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Self

LOCK_FILE = ".lock"


class IndexLockedError(RuntimeError):
    """Another process is building an index in the same output directory."""


def fsync_path(path: str | Path) -> None:
    """fsync a file (or a folder: makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: str | Path, path: str | Path) -> None:
    """fsync `tmp`, rename it to `path`, fsync the folder."""
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(Path(path).parent)


class BuildLock:
    """`with BuildLock(out_dir):` one builder per directory; `IndexLockedError` names the holder."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> Self:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise IndexLockedError(
                f"--out {self.path.parent} is being built by another process (pid {holder}, "
                f"lock {self.path}); wait for it to finish, or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

"""One precompute at a time per corpus folder: a lock file naming its holder.

Two runs appending to one manifest and each saving the index would leave the index with only
one run's view; the second run is refused instead, told who holds the lock. The lock is an
flock on the file, so the kernel releases it when its holder exits, even by kill -9: a stale
file never blocks anyone.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path


class CorpusLocked(RuntimeError):
    """Another process is precomputing into this corpus folder."""


class PrecomputeLock:
    def __init__(self, folder: str | Path):
        self.path = Path(folder) / "precompute.lock"
        self._fd: int | None = None

    def holder(self) -> str:
        """Who holds the lock, as written by its holder (pid, host, since when)."""
        try:
            info = json.loads(self.path.read_text() or "{}")
            return f"pid {info['pid']} on {info['host']}, since {info['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "a process that has not written its name yet"

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CorpusLocked(f"another precompute is writing to {self.path.parent} ({self.holder()}): wait for it to "
                               f"finish, then run this one again (stored chunks are not encoded twice)") from None
        since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}).encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, info, 0)
        except OSError:  # a full disk: the lock holds all the same, unnamed
            pass
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # no name left behind once no one holds it
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "PrecomputeLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

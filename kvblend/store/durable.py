"""Files that follow the process's umask and directory entries that survive a crash.

`tempfile.mkstemp` creates files 0600, so a store written through it could not be read by another
user or service account sharing it; kvblend's writes give their temporary files the mode a plain
`open()` would (0666 less the umask) before renaming them into place.
"""
from __future__ import annotations

import os
from pathlib import Path


def _umask() -> int:
    try:  # Linux reports it without changing it
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting it, and put it back at once
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode `open(path, "w")` would give a new file now."""
    return 0o666 & ~_umask()


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new entry in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

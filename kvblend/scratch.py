"""Scratch folders other users can reach (/dev/shm, /tmp): kvblend's own are owner-only.

A folder already there is used only if it is a real directory (not a link), owned by this user
and closed to everyone else: in a world-writable place another user could have made it first,
to read what kvblend writes there (prompts' KV) or to plant files for it to read.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path


def owner_only_dir(path: str | Path) -> Path:
    """`path`, created with mode 0700 when missing; PermissionError when it exists with another
    owner, wider permissions or as a link."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"scratch folder {path} is a link, not a folder: refusing it")
    if st.st_uid != os.geteuid():
        raise PermissionError(f"scratch folder {path} belongs to uid {st.st_uid}, not to this user "
                              f"(uid {os.geteuid()}): refusing it")
    if st.st_mode & 0o077:
        raise PermissionError(f"scratch folder {path} is open to other users (mode {stat.S_IMODE(st.st_mode):o}): "
                              "refusing it (chmod 700 it or remove it)")
    return path

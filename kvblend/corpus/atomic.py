"""Write-then-rename, so a reader (or a kill -9) never sees a half-written file; it is synced before
the rename and gets the mode the umask asks for (not mkstemp's 0600)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from kvblend.store.durable import fsync_dir, new_file_mode


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, new_file_mode())
            f.write(data)
            f.flush()
            os.fsync(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

"""The manifest: one JSON line per stored chunk (id, source, offsets, key, token count, text).

Lines are appended only after a chunk's KV is in the store (see store_chunks). Each line goes in
with one write to a file opened for appending, then fsync, so a line is whole or absent: a write
that fails part way (a full disk) is cut off again before the error is raised. Readers ignore a
torn last line (a crash mid-write); the next writer cuts it off before appending.
"""
from __future__ import annotations

import errno
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from kvblend.store.durable import fsync_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkRecord:
    id: str
    source: str
    start: int
    end: int
    key: str
    tokens: int
    text: str


class Manifest:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: dict[str, ChunkRecord] = self._load()
        self._fd: int | None = None

    def _load(self) -> dict[str, ChunkRecord]:
        """Records by chunk id (a later line wins); a torn last line is ignored (the next append cuts it off)."""
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) < len(data):
            log.warning("%s: ignoring an incomplete last line (an interrupted run)", self.path)
        records: dict[str, ChunkRecord] = {}
        for number, line in enumerate(complete.decode("utf-8").splitlines(), start=1):
            try:
                record = ChunkRecord(**json.loads(line))
            except (json.JSONDecodeError, TypeError) as exc:
                log.warning("%s:%d: unreadable manifest line skipped (%s)", self.path, number, exc)
                continue
            records[record.id] = record
        return records

    def append(self, record: ChunkRecord) -> None:
        """Add the record's line, on disk when this returns; OSError (the file as it was) if it cannot be."""
        if self.records.get(record.id) == record:
            return
        line = (json.dumps(asdict(record), ensure_ascii=False) + "\n").encode()
        fd = self._open()
        start = os.fstat(fd).st_size
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(errno.ENOSPC, f"short write ({written} of {len(line)} bytes)")
            os.fsync(fd)
        except OSError as exc:
            try:
                os.ftruncate(fd, start)  # no torn line left behind
            except OSError:
                log.warning("%s: could not cut off a partial line (the next run will)", self.path)
            raise OSError(exc.errno, f"cannot add chunk {record.id} to the manifest {self.path}: {exc.strerror}") from exc
        self.records[record.id] = record

    def _open(self) -> int:
        """The file for appending (made with the umask's mode), a torn last line cut off first."""
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                size = os.fstat(fd).st_size
                tail = os.pread(fd, min(size, 1 << 16), max(0, size - (1 << 16)))
                if tail and not tail.endswith(b"\n"):
                    cut = tail.rfind(b"\n")
                    if cut < 0 and size > len(tail):  # a line longer than the tail read: find its start
                        whole = os.pread(fd, size, 0)
                        cut, tail = whole.rfind(b"\n"), whole
                    os.ftruncate(fd, size - len(tail) + cut + 1)
                    log.warning("%s: cut off an incomplete last line (an interrupted run)", self.path)
                if created:
                    fsync_dir(self.path.parent)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "Manifest":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

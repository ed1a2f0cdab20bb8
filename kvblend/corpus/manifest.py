"""The manifest: one JSON line per stored chunk (id, source, offsets, key, token count, text).

Lines are appended only after a chunk's KV is in the store, and flushed at once, so a killed run
loses nothing it stored; a line cut short by the kill is dropped on the next open.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

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
        self._file = None

    def _load(self) -> dict[str, ChunkRecord]:
        """Records by chunk id (a later line wins); a torn last line is cut off the file."""
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) < len(data):
            log.warning("%s: dropping an incomplete last line (an interrupted run)", self.path)
            with open(self.path, "r+b") as f:
                f.truncate(len(complete))
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
        if self.records.get(record.id) == record:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(asdict(record), ensure_ascii=False) + "\n")
        self._file.flush()
        self.records[record.id] = record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "Manifest":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

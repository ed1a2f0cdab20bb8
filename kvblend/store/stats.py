"""Per-tier counters, and their running totals kept beside a disk store for `kvblend store stats`."""
from __future__ import annotations

import fcntl
import json
import logging
import threading
from dataclasses import asdict, dataclass, fields
from pathlib import Path

log = logging.getLogger(__name__)
STATS_FILE = "stats.json"


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    corrupt: int = 0  # objects or layers that failed a check: served as misses / recomputed
    errors: int = 0  # tier failures (remote down, I/O error): the request went on without the tier
    evictions: int = 0
    writes: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    read_s: float = 0.0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def add(self, **counts: float) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict:
        d = asdict(self)
        looked = self.hits + self.misses
        d["hit_rate"] = self.hits / looked if looked else None
        d["read_gbps"] = self.bytes_read / self.read_s / 1e9 if self.read_s else None
        return d

    def bandwidth(self) -> float | None:
        """Measured read bandwidth in bytes/s, None before any read."""
        return self.bytes_read / self.read_s if self.read_s > 0 and self.bytes_read else None


COUNTERS = [f.name for f in fields(TierStats)]


def merge_into(directory: Path, per_tier: dict[str, dict]) -> None:
    """Add this process's counters to the directory's running totals (safe across processes)."""
    path = Path(directory) / STATS_FILE
    try:
        with open(path, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            text = f.read()
            totals = json.loads(text) if text.strip() else {}
            for tier, counts in per_tier.items():
                row = totals.setdefault(tier, {})
                for name in COUNTERS:
                    row[name] = row.get(name, 0) + counts.get(name, 0)
            f.seek(0)
            f.truncate()
            json.dump(totals, f, indent=1)
    except (OSError, ValueError) as exc:
        log.warning("could not update store stats in %s: %s", path, exc)


def read_totals(directory: Path) -> dict[str, dict]:
    path = Path(directory) / STATS_FILE
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError) as exc:
        log.warning("unreadable store stats %s: %s", path, exc)
        return {}

"""Reading how much of a process's memory Linux backs with transparent huge pages."""
from __future__ import annotations

import re
from pathlib import Path

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_allowed() -> bool:
    """Whether memory advised with MADV_HUGEPAGE may get 2 MB pages here (mode `always` or `madvise`)."""
    return THP_MODE.exists() and re.search(r"\[(always|madvise)\]", THP_MODE.read_text()) is not None


def huge_bytes(pid: int | str = "self") -> int:
    """Anonymous memory of the process on huge pages."""
    kb = re.search(r"AnonHugePages:\s+(\d+) kB", Path(f"/proc/{pid}/smaps_rollup").read_text())
    return int(kb.group(1)) << 10


def huge_bytes_at(address: int) -> int:
    """Huge-page bytes of this process's mapping that contains `address`."""
    current = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if m := re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line):
            current = int(m.group(1), 16) <= address < int(m.group(2), 16)
        elif current and line.startswith("AnonHugePages:"):
            return int(line.split()[1]) << 10
    raise LookupError(f"no mapping holds address {address:#x}")

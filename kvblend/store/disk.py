"""The disk tier: one object file per chunk in a directory that several processes may share.

Files live at root/<key[:2]>/<key>.kvb. A write goes to a temporary file in the same folder and
is written out (fsync), given the mode the umask asks for and renamed into place (the folder
synced too), so a reader, a process killed mid-write or a crash never sees half an object;
readers keep their open descriptor, so a concurrent replace or eviction cannot change bytes under
them. Recency is the file's access time (touched on every hit), which every process sees: LRU
eviction under `max_bytes` picks the least recently used objects whoever used them. With a cap,
room-making and writing happen under an exclusive lock on root/.lock, so the cap holds across
processes, temporary files included.
"""
from __future__ import annotations

import fcntl
import logging
import mmap
import os
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from kvblend.store.base import ChunkKV
from kvblend.store.durable import fsync_dir, new_file_mode
from kvblend.store.format import CorruptObject, ObjectHeader, check_codec, encode_object, parse_header
from kvblend.store.lazy import LazyChunk
from kvblend.store.stats import TierStats

log = logging.getLogger(__name__)
SUFFIX = ".kvb"
STALE_TMP_S = 60.0  # a temporary file older than this belongs to a writer that died
# Bytes per read: small enough that a piece is still in the CPU cache when it is hashed (a whole
# layer is not: hashing it afterwards reads it from memory a second time).
READ_PIECE = 256 * 2**10
NOWAIT = getattr(os, "RWF_NOWAIT", None)  # a read that fails rather than wait for the device (Linux)


class ObjectTooLarge(ValueError):
    """An object bigger than the whole disk tier's cap: not stored (nothing is evicted for it)."""


class FileReader:
    """Positioned reads from an open object file, or a map of it; the descriptor closes with it."""

    def __init__(self, fd: int, path: Path, can_map: bool = False):
        self.fd, self.path, self.can_map = fd, path, can_map
        self._closer = weakref.finalize(self, os.close, fd)
        self._map: mmap.mmap | None = None
        self._scratch: memoryview | None = None  # will_need's read buffer, made on the first cold layer

    def mapped(self, offset: int, nbytes: int) -> memoryview:
        """Bytes offset..offset+nbytes as a private (copy-on-write) map of the file: the page cache's
        own pages, so a warm read copies nothing. The map outlives the descriptor and survives the
        file's replacement or removal (objects are never rewritten in place; truncating one in place
        under a reader is the one thing a map cannot survive, and kvblend never does it)."""
        self._map = mmap.mmap(self.fd, 0, access=mmap.ACCESS_COPY)
        if len(self._map) < offset + nbytes:
            raise CorruptObject(f"{self.path}: truncated ({len(self._map)} bytes, {offset + nbytes} expected)")
        return memoryview(self._map)[offset : offset + nbytes]

    def will_need(self, offset: int, nbytes: int) -> None:
        """Bring a mapped range into the page cache before it is checksummed. A range not cached yet
        is read like `dd` does, in READ_PIECE reads into one small buffer, which is faster than
        faulting it in page by page. Cached data (probed without blocking) is left to the map."""
        if NOWAIT is None:  # not Linux: page faults will read it
            return
        if self._scratch is None:
            self._scratch = memoryview(bytearray(READ_PIECE))
        probe = self._scratch[: mmap.PAGESIZE]
        try:
            if os.preadv(self.fd, [probe], offset, NOWAIT) == len(probe):
                return
        except BlockingIOError:
            pass
        except OSError:  # no RWF_NOWAIT on this file system: page faults will read it
            return
        for start in range(offset, offset + nbytes, READ_PIECE):
            os.preadv(self.fd, [self._scratch[: min(READ_PIECE, offset + nbytes - start)]], start)

    def read_into(self, offset: int, out: memoryview, landed: Callable[[memoryview], None]) -> None:
        for start in range(0, len(out), READ_PIECE):
            piece = out[start : start + READ_PIECE]
            if os.preadv(self.fd, [piece], offset + start) != len(piece):
                raise CorruptObject(f"{self.path}: truncated (short read at byte {offset + start})")
            landed(piece)

    def close(self) -> None:
        self._closer()
        self._map = None  # the views taken from it keep it mapped


def open_quietly(path: Path) -> int:
    """Open for reading without touching the access time (maintenance must not reorder the LRU)."""
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_NOATIME", 0))
    except PermissionError:  # O_NOATIME needs the file's owner
        return os.open(path, os.O_RDONLY)


@dataclass
class Entry:
    key: str
    path: Path
    size: int
    atime_ns: int


STORE_FILES = {".lock", "stats.json", "corpus"}  # what a store's root holds besides its object folders


@dataclass
class Strays:
    """What a store folder holds that is not an object: other people's files, and temporary files
    (being written now, or left by a writer that died: older than STALE_TMP_S)."""

    foreign: list[Path]
    writing: list[Path]
    leftover: list[Path]
    store_files: int  # .lock, stats.json, corpus/: signs that kvblend made this folder


class DiskStore:
    def __init__(self, root: str | Path, max_bytes: int | None = None, codec: str = "raw", pin: bool = False,
                 mmap: bool = True, read_codec: str | None = None):
        """`codec` is what puts write; `read_codec`, when set, the only codec gets serve (an object in
        another is a miss, see CodecMismatch); None serves any codec (maintenance: ls, verify, recode)."""
        self.root = Path(root).expanduser()
        self.read_codec = read_codec
        self.mmap = mmap  # raw objects read through a map of the file (see FileReader.mapped)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.codec, self.pin, self.name = max_bytes, codec, pin, "disk"
        self.stats = TierStats()
        self._bad: dict[str, int] = {}  # key → mtime of the object found damaged: a miss until it changes

    def path(self, key: str) -> Path:
        if len(key) < 3 or not all(c.isalnum() or c in "-_" for c in key):
            raise ValueError(f"invalid store key {key!r}: expected a hex digest")
        return self.root / key[:2] / f"{key}{SUFFIX}"

    # -- reads --------------------------------------------------------------------------------------
    def _known_bad(self, key: str, path: Path) -> bool:
        if key not in self._bad:
            return False
        try:
            return os.stat(path).st_mtime_ns == self._bad[key]
        except FileNotFoundError:
            return True

    def get(self, key: str) -> LazyChunk | None:
        path = self.path(key)
        if self._known_bad(key, path):
            return None
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("disk tier: cannot open %s (%s): a miss", path, exc)
            self.stats.add(errors=1)
            return None
        try:
            header = self._check(fd, key, path)
            check_codec(header, self.read_codec, str(path))
        except (CorruptObject, OSError) as exc:
            os.close(fd)
            self.discard(key)
            self.stats.add(corrupt=1)
            log.warning("disk tier: %s: treated as a miss", exc)
            return None
        try:
            os.utime(fd, ns=(time.time_ns(), os.fstat(fd).st_mtime_ns))  # LRU recency, seen by every process
        except OSError:  # a read-only store: recency is the kernel's own access time
            pass
        return LazyChunk(header, FileReader(fd, path, self.mmap), self.stats, self.name, self.discard, self.pin)

    @staticmethod
    def _check(fd: int, key: str | None, path: Path) -> ObjectHeader:
        header = parse_header(lambda offset, n: os.pread(fd, n, offset), key, str(path))
        size = os.fstat(fd).st_size
        if size != header.total_nbytes:
            raise CorruptObject(f"{path}: {size} bytes, its header says {header.total_nbytes} (truncated or padded)")
        return header

    def contains(self, key: str) -> bool:
        path = self.path(key)
        return not self._known_bad(key, path) and path.exists()

    def discard(self, key: str, reason: str = "") -> None:
        """Stop trusting this key's object until it changes (it stays for `store verify`; a put replaces it)."""
        try:
            self._bad[key] = os.stat(self.path(key)).st_mtime_ns
        except FileNotFoundError:
            pass

    # -- writes -------------------------------------------------------------------------------------
    def put(self, key: str, kv: ChunkKV) -> None:
        header, blobs = encode_object(kv, self.codec)
        size = header.total_nbytes
        if self.max_bytes is not None and size > self.max_bytes:
            raise ObjectTooLarge(f"an object of {size} bytes exceeds the tier cap of {self.max_bytes} bytes ({self.root})")
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._room_for(size) if self.max_bytes is not None else nullcontext():
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:16]}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    os.fchmod(fd, new_file_mode())
                    f.write(header.to_bytes())
                    for parts in blobs:
                        for part in parts:
                            f.write(part.numpy())
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
                fsync_dir(path.parent)
            except OSError as exc:  # the message names the folder, not the temporary file (one reason for every chunk)
                Path(tmp).unlink(missing_ok=True)
                raise OSError(exc.errno, f"cannot write to {self.root}: {exc.strerror or exc}") from exc
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        self._bad.pop(key, None)
        self.stats.add(writes=1, bytes_written=size)

    @contextmanager
    def _room_for(self, size: int) -> Iterator[None]:
        """Hold the directory lock with at least `size` bytes free under the cap."""
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = self.entries()
            used = sum(e.size for e in entries) + self._temp_bytes(remove_stale=True)
            for e in sorted(entries, key=lambda e: e.atime_ns):
                if used + size <= self.max_bytes:
                    break
                if self._remove(e):
                    used -= e.size
            yield

    def _remove(self, entry: Entry) -> bool:
        try:
            entry.path.unlink()
        except FileNotFoundError:
            return False
        self.stats.add(evictions=1)
        return True

    def _temp_bytes(self, remove_stale: bool) -> int:
        total, now = 0, time.time()
        for tmp in self.root.glob("*/.*.tmp"):
            try:
                st = tmp.stat()
                if remove_stale and now - st.st_mtime > STALE_TMP_S:
                    tmp.unlink()
                else:
                    total += st.st_size
            except FileNotFoundError:
                pass
        return total

    # -- maintenance (CLI) ----------------------------------------------------------------------------
    def entries(self) -> list[Entry]:
        out = []
        for sub in self.root.iterdir():
            if not sub.is_dir() or len(sub.name) != 2:
                continue
            for f in os.scandir(sub):
                if f.name.endswith(SUFFIX) and not f.name.startswith("."):
                    try:
                        st = f.stat()
                    except FileNotFoundError:
                        continue
                    out.append(Entry(f.name[: -len(SUFFIX)], Path(f.path), st.st_size, st.st_atime_ns))
        return out

    def strays(self) -> Strays:
        """Everything in the folder that is not an object, by kind (the corpus folder is not looked into)."""
        out, now = Strays([], [], [], 0), time.time()
        for item in sorted(self.root.iterdir()):
            if item.name in STORE_FILES:
                out.store_files += 1
            elif not (item.is_dir() and len(item.name) == 2):
                out.foreign.append(item)
            else:
                for f in sorted(item.iterdir()):
                    if f.is_file() and f.name.startswith(".") and f.name.endswith(".tmp"):
                        try:
                            old = now - f.stat().st_mtime > STALE_TMP_S
                        except FileNotFoundError:  # renamed into place meanwhile
                            continue
                        (out.leftover if old else out.writing).append(f)
                    elif not (f.is_file() and f.name.endswith(SUFFIX) and not f.name.startswith(".")):
                        out.foreign.append(f)
        return out

    def header(self, entry: Entry) -> ObjectHeader:
        """The entry's checked header (CorruptObject if bad)."""
        fd = open_quietly(entry.path)
        try:
            return self._check(fd, entry.key, entry.path)
        finally:
            os.close(fd)

    def verify(self, entry: Entry) -> str | None:
        """Why the object is unusable (header, size, every layer's checksum), or None if it is sound."""
        try:
            fd = open_quietly(entry.path)
        except OSError as exc:
            return f"unreadable ({exc})"
        try:
            header = self._check(fd, entry.key, entry.path)
            for i in range(header.num_layers):
                blob = os.pread(fd, header.layer_nbytes, header.layer_offset(i))
                if len(blob) != header.layer_nbytes:
                    raise CorruptObject(f"{entry.path}: truncated at layer {i}")
                header.verify_layer(i, blob)
        except (CorruptObject, OSError) as exc:
            return str(exc)
        finally:
            os.close(fd)
        return None

    def evict_to(self, max_bytes: int) -> list[Entry]:
        """Remove least recently used objects (and stale temporary files) until at most max_bytes remain."""
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = sorted(self.entries(), key=lambda e: e.atime_ns)
            used = sum(e.size for e in entries) + self._temp_bytes(remove_stale=True)
            removed = []
            for e in entries:
                if used <= max_bytes:
                    break
                if self._remove(e):
                    used -= e.size
                    removed.append(e)
            return removed

    def summary(self) -> dict:
        entries = self.entries()
        return {"objects": len(entries), "bytes": sum(e.size for e in entries), "max_bytes": self.max_bytes}

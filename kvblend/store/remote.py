"""The remote tier: a Redis/Valkey server shared by every instance that points at it.

Each object is one Redis string holding exactly the bytes of the disk format, so a layer is one
GETRANGE and is verified by its own checksum. The server is a cache, never a dependency: any
failure (down at start, gone mid-run, timeouts) is logged once, counted, and the tier is skipped
for `retry_s` before the next attempt; lookups then miss, and a write raises `RemoteUnavailable`
so the writer counts it as failed (and precompute does not record the chunk as stored). Its byte
cap is the server's own `maxmemory` (with an LRU policy such as allkeys-lru).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from kvblend.store.base import ChunkKV
from kvblend.store.format import HEAD_READ, CorruptObject, check_codec, encode_object, parse_header
from kvblend.store.lazy import LazyChunk
from kvblend.store.stats import TierStats

log = logging.getLogger(__name__)
PREFIX = "kvblend:obj:"


class RemoteUnavailable(ConnectionError):
    """A write the remote tier did not take: the server is down, or was a moment ago (the tier has
    logged the outage itself, once)."""

    logged = True


class RedisReader:
    def __init__(self, store: "RedisStore", name: str):
        self.store, self.name = store, name

    def read_into(self, offset: int, out: memoryview, landed: Callable[[memoryview], None]) -> None:
        try:
            data = self.store.client.getrange(self.name, offset, offset + len(out) - 1)
        except redis.RedisError as exc:
            self.store.failed(exc)
            raise
        if len(data) != len(out):
            raise CorruptObject(f"{self.store.url} {self.name}: truncated (short read at byte {offset})")
        out[:] = data
        landed(out)  # one piece: each GETRANGE is a round trip

    def close(self) -> None:
        pass


class RedisStore:
    def __init__(self, url: str, codec: str = "raw", pin: bool = False, retry_s: float = 2.0, timeout_s: float = 1.0,
                 read_codec: str | None = None):
        """`read_codec`, when set, is the only codec gets serve (see CodecMismatch); None serves any."""
        self.url, self.codec, self.pin, self.retry_s, self.name = url, codec, pin, retry_s, "remote"
        self.read_codec = read_codec
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                           retry=Retry(NoBackoff(), 0), retry_on_timeout=False)
        self.stats = TierStats()
        self._bad: set[str] = set()
        self._down_until = 0.0
        self._down = False
        self._last_error = ""
        self._lock = threading.Lock()

    @staticmethod
    def object_name(key: str) -> str:
        return PREFIX + key

    # -- availability -------------------------------------------------------------------------------
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def failed(self, exc: Exception) -> None:
        """Note a failure: warn once per outage, skip the tier for retry_s."""
        with self._lock:
            if not self._down:
                log.warning("remote tier %s unavailable (%s): serving from local tiers, retrying every %.1fs", self.url, exc, self.retry_s)
            self._down = True
            self._last_error = str(exc)
            self._down_until = time.monotonic() + self.retry_s
        self.stats.add(errors=1)

    def _succeeded(self) -> None:
        if self._down:
            with self._lock:
                if self._down:
                    log.warning("remote tier %s is back", self.url)
                self._down = False

    # -- the tier -----------------------------------------------------------------------------------
    def get(self, key: str) -> LazyChunk | None:
        if key in self._bad or not self.available():
            return None
        name = self.object_name(key)
        try:
            head, size = self.client.pipeline(transaction=False).getrange(name, 0, HEAD_READ - 1).strlen(name).execute()
            self._succeeded()
            if not size:
                return None

            def read_at(offset: int, n: int) -> bytes:
                return head[offset : offset + n] if offset + n <= len(head) else self.client.getrange(name, offset, offset + n - 1)

            header = parse_header(read_at, key, f"{self.url} {name}")
            check_codec(header, self.read_codec, f"{self.url} {name}")
            if size != header.total_nbytes:
                raise CorruptObject(f"{self.url} {name}: {size} bytes, its header says {header.total_nbytes}")
        except CorruptObject as exc:
            self._bad.add(key)
            self.stats.add(corrupt=1)
            log.warning("remote tier: %s: treated as a miss", exc)
            return None
        except redis.RedisError as exc:
            self.failed(exc)
            return None
        return LazyChunk(header, RedisReader(self, name), self.stats, self.name, self.discard, self.pin)

    def put(self, key: str, kv: ChunkKV) -> None:
        """Store the object on the server; RemoteUnavailable if it did not take it."""
        if not self.available():
            raise RemoteUnavailable(f"{self.url} is unavailable ({self._last_error})")
        header, blobs = encode_object(kv, self.codec)
        data = bytearray(header.to_bytes())
        for parts in blobs:
            for part in parts:
                data += part.numpy().data
        try:
            self.client.set(self.object_name(key), memoryview(data))
        except redis.RedisError as exc:
            self.failed(exc)
            raise RemoteUnavailable(f"{self.url} is unavailable ({exc})") from exc
        self._succeeded()
        self._bad.discard(key)
        self.stats.add(writes=1, bytes_written=len(data))

    def contains(self, key: str) -> bool:
        if key in self._bad or not self.available():
            return False
        try:
            found = bool(self.client.exists(self.object_name(key)))
        except redis.RedisError as exc:
            self.failed(exc)
            return False
        self._succeeded()
        return found

    def discard(self, key: str, reason: str = "") -> None:
        self._bad.add(key)

    def summary(self) -> dict:
        """Objects and bytes on the server (a SCAN: meant for the CLI, not the request path)."""
        try:
            names = list(self.client.scan_iter(match=PREFIX + "*", count=1000))
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                pipe.strlen(name)
            total = sum(pipe.execute()) if names else 0
        except redis.RedisError as exc:
            self.failed(exc)
            return {"objects": None, "bytes": None, "max_bytes": None, "error": str(exc)}
        return {"objects": len(names), "bytes": total, "max_bytes": None}

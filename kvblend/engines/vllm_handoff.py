"""The hand-off of a fused KV cache from kvblend (which blends) to the vLLM worker (which decodes).

The blend runs in the process that holds the transformers model; vLLM's worker is another
(spawned) process. One request's fused KV travels as one safetensors file in a folder both can
read, by default a per-user folder in /dev/shm (RAM, no disk I/O):

- tensors `k.<layer>` / `v.<layer>`, each [kv_heads, N, head_dim]: the whole prompt's fused KV
  (keys rotated at absolute positions), the blend's own buffer layout, so the blend writes into
  the mapped file directly (`HandoffDir.filling`) with no buffer of its own and no copy;
- metadata `num_tokens` (the tokens whose KV the file holds) and `digest`, a hash of their ids:
  a hand-off serves a request whose prompt starts with exactly those tokens (never another
  prompt), for at most all its prompt tokens but the last (vLLM computes that one itself).

The file is published atomically (temporary name, then rename). Once the worker has loaded it,
the file becomes a spare (up to `SPARES` per folder) that the next request fills in place, because
fresh shared-memory pages cost several times more to write than pages already in use, most of all
in a process hosting vLLM (docs/dev/performance.md, "Memory pages"). The producer removes
the file again when the request ends, in case the worker never got to it; `clear_spares` frees
the spares when an engine or server starts and stops.
"""
from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import re
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from kvblend.scratch import owner_only_dir

_KEY = re.compile(r"^[0-9a-f]{32}$")
PARAM = "kvblend_handoff"  # the kv_transfer_params field that names a request's hand-off
SPARES = 2  # loaded hand-off files kept per folder for the next write to reuse
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int8: "I8", torch.uint8: "U8"}


def default_handoff_dir() -> Path:
    """A per-user folder in shared memory when the machine has one, else in the temp folder."""
    root = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return root / f"kvblend-handoff-{os.getuid()}"


def blend_salt(key: str) -> str:
    """The `cache_salt` a request carrying hand-off `key` is sent with.

    vLLM mixes a request's salt into its prefix-cache block hashes, so the blocks a hand-off filled
    (approximate, blended KV) can only ever match a request with the same salt: never an exact
    request, never another blend. Prefix caching can then stay on for everything else."""
    return f"kvblend-blend-{key}"


def prompt_digest(ids: Sequence[int]) -> str:
    return hashlib.sha256(json.dumps([int(t) for t in ids]).encode()).hexdigest()


def is_handoff_key(key: object) -> bool:
    """Keys come from request bodies: only our own format is accepted (no paths)."""
    return isinstance(key, str) and bool(_KEY.match(key))


@dataclass(frozen=True)
class HandoffHeader:
    num_tokens: int
    digest: str


class HandoffDir:
    """Writes, reads and removes hand-off files in one folder."""

    def __init__(self, folder: str | Path | None = None):
        self.folder = owner_only_dir(folder or default_handoff_dir())

    def path(self, key: str) -> Path:
        if not is_handoff_key(key):
            raise ValueError(f"not a hand-off key: {key!r}")
        return self.folder / f"{key}.safetensors"

    @contextmanager
    def filling(self, ids: Sequence[int], num_layers: int, kv_heads: int, head_dim: int,
                dtype: torch.dtype) -> Iterator[tuple[str, list[tuple[torch.Tensor, torch.Tensor]]]]:
        """A prompt's hand-off to fill in place: yields (key, per-layer (keys, values) views
        [kv_heads, N, head_dim] into the mapped file), published under key when the block ends.

        The blend writes its fused KV straight into these views: no prompt-sized buffer to allocate
        (fresh pages fault) and no copy. Drop every view before the block ends."""
        n = len(ids)
        if n < 1:
            raise ValueError("hand-off of an empty prompt")
        key = uuid.uuid4().hex
        shape = (kv_heads, n, head_dim)
        names = [f"k.{i}" for i in range(num_layers)] + [f"v.{i}" for i in range(num_layers)]
        with self._mapped(key, HandoffHeader(n, prompt_digest(ids)), [(name, shape, dtype) for name in names]) as views:
            yield key, [(views[f"k.{i}"], views[f"v.{i}"]) for i in range(num_layers)]
            views.clear()

    def save(self, key: str, header: HandoffHeader, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
        """Atomically write per-layer KV [kv_heads, >= header.num_tokens, head_dim] under key."""
        tensors = [(f"k.{i}", k) for i, k in enumerate(keys)] + [(f"v.{i}", v) for i, v in enumerate(values)]
        with self._mapped(key, header, [(name, t.shape, t.dtype) for name, t in tensors]) as views:
            for name, t in tensors:  # torch's copy runs on all its threads
                views[name].copy_(t)
            del views

    @contextmanager
    def _mapped(self, key: str, header: HandoffHeader,
                layout: Sequence[tuple[str, Sequence[int], torch.dtype]]) -> Iterator[dict[str, torch.Tensor]]:
        """A file (a spare when there is one) mapped as named tensors; renamed to key's path on success."""
        head = safetensors_header(layout, {"num_tokens": str(header.num_tokens), "digest": header.digest})
        sizes = [math.prod(shape) * dtype.itemsize for _, shape, dtype in layout]
        size = len(head) + sum(sizes)
        target = self.path(key)
        tmp = self._claim_spare() or self.folder / f"{uuid.uuid4().hex}.tmp"
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.ftruncate(fd, size)
                os.posix_fallocate(fd, 0, size)  # a full /dev/shm is an OSError here, not a SIGBUS in the copy
                mapped = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
            finally:
                os.close(fd)
            mapped[: len(head)] = head
            data = torch.frombuffer(mapped, dtype=torch.uint8)
            views, at = {}, len(head)
            for (name, shape, dtype), nbytes in zip(layout, sizes):
                views[name] = data[at : at + nbytes].view(dtype).view(shape)
                at += nbytes
            del data
            yield views
            del views
            try:
                mapped.close()
            except BufferError:  # a caller still holds a view: the map closes when the last one goes
                pass
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _claim_spare(self) -> Path | None:
        """Take a spare for this write (rename is atomic: two writers never get the same one)."""
        for spare in self.folder.glob("spare-*"):
            claimed = self.folder / f"{uuid.uuid4().hex}.tmp"
            try:
                os.rename(spare, claimed)
                return claimed
            except FileNotFoundError:
                continue
        return None

    def release(self, key: str) -> None:
        """A loaded hand-off: keep it as a spare for the next write, or delete it if there are enough."""
        path = self.path(key)
        if sum(1 for _ in self.folder.glob("spare-*")) < SPARES:
            try:
                os.rename(path, self.folder / f"spare-{key}")
                return
            except FileNotFoundError:
                return
        path.unlink(missing_ok=True)

    def clear_spares(self) -> None:
        """Free the spares (at start and close: a spare is only ever taken by rename, so this is safe)."""
        for spare in self.folder.glob("spare-*"):
            spare.unlink(missing_ok=True)

    def header(self, key: str) -> HandoffHeader | None:
        """The hand-off's header, or None if it is absent or unreadable (a miss, never a crash)."""
        try:
            with safe_open(self.path(key), "pt") as f:
                meta = f.metadata() or {}
            return HandoffHeader(int(meta["num_tokens"]), meta["digest"])
        except Exception:  # OSError, a damaged header (safetensors' own error), missing fields
            return None

    def open(self, key: str):
        """A lazy reader: `layer_kv(reader, i)` reads one layer only."""
        return safe_open(self.path(key), "pt")

    def remove(self, key: str) -> None:
        if is_handoff_key(key):
            self.path(key).unlink(missing_ok=True)


def safetensors_header(layout: Sequence[tuple[str, Sequence[int], torch.dtype]], metadata: dict[str, str]) -> bytes:
    """The safetensors header (length + JSON, padded to 8 bytes) for (name, shape, dtype) laid out in order."""
    entries: dict[str, object] = {"__metadata__": metadata}
    at = 0
    for name, shape, dtype in layout:
        if dtype not in _DTYPES:
            raise ValueError(f"hand-off tensor {name}: dtype {dtype} is not one of {sorted(map(str, _DTYPES))}")
        nbytes = math.prod(shape) * dtype.itemsize
        entries[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [at, at + nbytes]}
        at += nbytes
    body = json.dumps(entries, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body


def layer_kv(reader, i: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens start..end-1 of layer i as vLLM's cache-write ops take them: [tokens, kv_heads, head_dim]."""
    k = reader.get_slice(f"k.{i}")[:, start:end]
    v = reader.get_slice(f"v.{i}")[:, start:end]
    return k.transpose(0, 1), v.transpose(0, 1)

"""A lazily read chunk shared by the prefetch thread (which stages layers) and the blend (which takes them)."""
import contextlib
import sys
import threading
import time

import torch

from kvblend.store import ChunkKV, DiskStore

SHAPE = (64, 1, 4, 4)  # many layers: the consumer walks a long list of staged ones


class FakeCuda:
    """Stands in for the CUDA stream and event calls of staging, so the real code runs on CPU."""

    def record(self, stream=None) -> None: ...

    def wait_event(self, event) -> None: ...


def test_staging_while_the_consumer_takes_layers_never_races(tmp_path, monkeypatch):
    """Stress loop: the prefetch thread stages layers while the consumer takes them (popping its
    layer and dropping the ones it skipped); iterating the staged layers while the other thread
    inserts raised "dictionary changed size during iteration"."""
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Event", FakeCuda)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeCuda())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter allows
    g = torch.Generator().manual_seed(0)
    kv = ChunkKV("ab" * 32, "model-a", torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g))
    disk = DiskStore(tmp_path)
    disk.put(kv.key, kv)
    chunk = disk.get(kv.key)
    chunk.load_through(SHAPE[0] - 1)
    stop, errors = threading.Event(), []

    def stage_forever():
        try:
            while not stop.is_set():
                for i in range(SHAPE[0]):
                    chunk.stage(i, torch.device("cpu"), None)
        except Exception as exc:  # noqa: BLE001  (reported by the main thread)
            errors.append(exc)

    producer = threading.Thread(target=stage_forever)
    producer.start()
    try:
        deadline = time.time() + 3
        while time.time() < deadline and not errors:
            last = SHAPE[0] - 1  # skips every other layer: drops them all from the staged ones
            k, v = chunk.layer(last)
            assert torch.equal(k, kv.keys[last]) and torch.equal(v, kv.values[last])
    finally:
        stop.set()
        producer.join()
        sys.setswitchinterval(interval)
    assert not errors, errors

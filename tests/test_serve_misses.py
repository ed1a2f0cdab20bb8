"""`kvblend serve`'s background encoding of missed chunks: requests go first, one chunk per step, a bounded queue."""
import threading
import time

from kvblend.engines.serve_misses import BlendLock, MissEncoder


class SlowKB:
    """Stands in for KVBlend: each precompute call takes `step_s` and is recorded."""

    def __init__(self, step_s: float):
        self.step_s, self.calls = step_s, []

    def precompute(self, texts):
        time.sleep(self.step_s)
        self.calls.append(list(texts))


def test_a_request_waits_for_one_background_step_not_the_queue():
    kb, lock = SlowKB(0.05), BlendLock(defer_s=0.0)
    encoder = MissEncoder(kb, lock)
    encoder.submit([f"chunk {i}" for i in range(40)] * 2)  # repeats are queued once
    time.sleep(0.12)
    waited = lock.acquire(urgent=True)
    lock.release()
    assert waited < 0.2 and encoder.pending() > 20
    assert encoder.join(timeout=30)
    assert len(kb.calls) == 40 and all(len(c) == 1 for c in kb.calls)


def test_the_queue_is_bounded():
    kb, lock = SlowKB(0.0), BlendLock()
    lock.acquire(urgent=True)  # a long blend: the worker cannot start
    encoder = MissEncoder(kb, lock, max_queued=10)
    encoder.submit([f"chunk {i}" for i in range(100)])
    assert encoder.pending() <= 11 and encoder.dropped >= 89
    lock.release()
    assert encoder.join(timeout=30) and len(kb.calls) <= 11


def test_background_steps_defer_to_requests_in_flight():
    lock = BlendLock(defer_s=5.0)
    lock.arrive()  # a request is being answered (vLLM decodes it)
    threading.Timer(0.3, lock.leave).start()
    t0 = time.perf_counter()
    lock.acquire(urgent=False)
    lock.release()
    assert 0.25 < time.perf_counter() - t0 < 3.0  # until it was answered, not the whole defer_s
    lock.arrive()
    assert lock.acquire(urgent=True) < 0.1  # requests never defer to each other
    lock.release()
    lock.leave()

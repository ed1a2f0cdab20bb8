"""Many instances, one store: two kvblend processes on one real Redis tier, each with a capped CPU tier."""
import json
import os
import subprocess
import sys
import uuid

import pytest

REDIS_URL = os.environ.get("KVBLEND_TEST_REDIS_URL")
needs_redis = pytest.mark.skipif(not REDIS_URL, reason="KVBLEND_TEST_REDIS_URL is unset: scripts/test.sh starts a loopback redis-server and sets it")
CPU_CAP = 1_500_000  # bytes: about two of the tiny model's chunks, fewer than the six asked for
CHUNKS = 6
INSTANCE = """
import json, sys, torch
from kvblend import KVBlend
from kvblend.config import StoreConfig
from kvblend.store import open_store
torch.set_num_threads(1)
model, url, prefix, cap, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
chunks = [f"{prefix} passage {i}: " + "the quick brown fox jumps over the lazy dog. " * 12 for i in range(n)]
with KVBlend(model=model, store=open_store(StoreConfig(remote_url=url, cpu_bytes=cap))) as kb:
    computed, peak = [], 0
    def on_chunk(tokens, was_computed):
        global peak
        computed.append(was_computed)
        peak = max(peak, kb.store.memory[0].used_bytes)
    kb.precompute(chunks, on_chunk=on_chunk)
    pre = kb.prefill(chunks, "What does the fox do?")
    peak = max(peak, kb.store.memory[0].used_bytes)
    stats = kb.store.stats()
    print(json.dumps({"computed": sum(computed), "hits": pre.stats.chunk_hits, "cpu_peak": peak, "codec": kb.store.codec,
                      "remote_hits": stats["remote"]["hits"], "remote_writes": stats["remote"]["writes"]}))
"""


def instance(model, prefix: str) -> dict:
    """Run one kvblend instance in its own process; its summary line."""
    out = subprocess.run([sys.executable, "-c", INSTANCE, str(model), REDIS_URL, prefix, str(CPU_CAP), str(CHUNKS)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_redis
def test_what_one_instance_precomputes_the_other_hits_with_no_recompute(tiny_models):
    prefix = uuid.uuid4().hex  # the test server may be shared
    first = instance(tiny_models["llama"], prefix)
    assert first["computed"] == CHUNKS and first["remote_writes"] == CHUNKS
    second = instance(tiny_models["llama"], prefix)
    assert second["computed"] == 0 and second["remote_writes"] == 0  # nothing encoded again, nothing rewritten
    assert second["hits"] == CHUNKS and second["remote_hits"] >= CHUNKS
    assert first["codec"] == second["codec"] != "raw"  # both on the persistent default
    for one in (first, second):
        assert 0 < one["cpu_peak"] <= CPU_CAP  # each CPU tier stays within its cap (the rest is in Redis)

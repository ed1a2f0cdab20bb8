"""The remote tier against a real Redis: round trips, damage, sharing between processes, outages."""
import os
import shutil
import socket
import subprocess
import time
import uuid
from functools import partial

import pytest
import torch

from kvblend import KVBlend
from kvblend.blend.chunks import encode_chunk
from kvblend.config import StoreConfig
from kvblend.store import ChunkKV, MemoryStore, open_store
from kvblend.store.remote import RedisStore
from servers import RedisServer
from test_store_processes import passage, run_worker

REDIS_URL = os.environ.get("KVBLEND_TEST_REDIS_URL")
needs_redis = pytest.mark.skipif(not REDIS_URL, reason="KVBLEND_TEST_REDIS_URL is unset: scripts/test.sh starts a loopback redis-server and sets it")
needs_server_binary = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed (apt-get install redis-server)")
QUESTION = "What does the fox do?"


def make_kv(seed: int) -> ChunkKV:
    g = torch.Generator().manual_seed(seed)
    key = uuid.uuid4().hex + uuid.uuid4().hex  # unique per run: the test server may be shared
    return ChunkKV(key, "model-a", torch.randn((4, 2, 20, 16), generator=g), torch.randn((4, 2, 20, 16), generator=g))


@pytest.fixture()
def own_redis(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


@needs_redis
def test_round_trip_layer_reads_and_damage():
    tier = RedisStore(REDIS_URL)
    kvs = [make_kv(i) for i in range(3)]
    for kv in kvs:
        tier.put(kv.key, kv)
    lazy = tier.get(kvs[0].key)
    assert torch.equal(lazy.layer(2)[1], kvs[0].values[2]) and tier.stats.bytes_read == 3 * lazy.header.layer_nbytes
    client, name = tier.client, tier.object_name
    client.setrange(name(kvs[1].key), 0, b"JUNK")  # header damage: a miss
    assert tier.get(kvs[1].key) is None and not tier.contains(kvs[1].key) and tier.stats.corrupt == 1
    size = client.strlen(name(kvs[2].key))
    client.setrange(name(kvs[2].key), size - 10, b"\x00\xff")  # data damage: shows on the layer, recomputed
    lazy = tier.get(kvs[2].key)
    lazy.recompute = lambda: kvs[2]
    assert torch.equal(lazy.layer(3)[0], kvs[2].keys[3]) and lazy.failed and tier.stats.corrupt == 2
    client.set(name(kvs[0].key), client.getrange(name(kvs[0].key), 0, 500))  # truncated
    assert RedisStore(REDIS_URL).get(kvs[0].key) is None


@needs_redis
def test_second_process_reuses_what_the_first_precomputed(tiny_models):
    prefix = uuid.uuid4().hex
    proc = run_worker(tiny_models["llama"], REDIS_URL, prefix, 0, 3, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and out.count("chunk True") == 3
    kb = KVBlend(model=str(tiny_models["llama"]), store=open_store(StoreConfig(remote_url=REDIS_URL, cpu_bytes=0)))
    chunks = [passage(prefix, i) for i in range(3)]
    computed = []
    kb.precompute(chunks, on_chunk=lambda n, c: computed.append(c))
    pre = kb.prefill(chunks, QUESTION)
    assert computed == [False] * 3 and pre.stats.chunk_hits == 3
    assert kb.store.stats()["remote"]["hits"] >= 6 and kb.store.stats()["remote"]["bytes_read"] > 0


def test_remote_down_at_start_serves_from_local_tiers(tiny_models, caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{s.getsockname()[1]}/0"  # nothing listens there once closed
    kb = KVBlend(model=str(tiny_models["llama"]), store=open_store(StoreConfig(remote_url=dead, async_writes=False)))
    chunks = [passage("down", i) for i in range(2)]
    kb.precompute(chunks)
    pre = kb.prefill(chunks, QUESTION)
    assert pre.stats.chunk_hits == 2 and kb.store.stats()["remote"]["errors"] >= 1
    assert sum("unavailable" in r.message for r in caplog.records) == 1  # one warning per outage


@needs_server_binary
def test_redis_stopped_mid_run_fails_no_request_and_is_used_again_when_back(tiny_models, own_redis):
    kb = KVBlend(model=str(tiny_models["llama"]),
                 store=open_store(StoreConfig(remote_url=own_redis.url, cpu_bytes=0, remote_retry_s=0.3)))
    chunks = [passage("outage", i) for i in range(3)]
    kb.precompute(chunks)
    kb.store.flush()
    expected = kb.prefill(chunks, QUESTION)
    assert expected.stats.chunk_hits == 3
    remote = kb.store.tiers[0]
    ids = kb.builder.encode(chunks[0])
    in_flight = remote.get(kb.key_for(ids))  # header read, layers not yet: the server dies under it
    in_flight.recompute = partial(encode_chunk, kb.adapter, kb.context_ids, ids, in_flight.key)

    own_redis.kill()
    assert torch.equal(in_flight.layer(2)[0], in_flight.recompute().keys[2]) and in_flight.failed
    during = kb.prefill(chunks, QUESTION)  # every chunk misses and is computed fresh: no error
    assert during.stats.chunk_misses == 3 and remote.stats.errors >= 2
    store, kb.store = kb.store, MemoryStore()
    try:
        assert torch.equal(during.logits, kb.prefill(chunks, QUESTION).logits)
    finally:
        kb.store = store

    own_redis.start()  # empty again (no persistence)
    time.sleep(0.4)
    kb.precompute(chunks)
    kb.store.flush()
    after = kb.prefill(chunks, QUESTION)
    assert after.stats.chunk_hits == 3 and torch.equal(after.logits, expected.logits)

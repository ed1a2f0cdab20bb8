"""The blend inside vLLM's worker under faults (tiny random Llama, fp32, CPU, eager): the store's
Redis tier goes down between planning and the worker's lookup, and comes back; the engine keeps
answering, and a chunk it cannot read is computed as fresh text, never decoded from unwritten blocks.
"""
import shutil
import time

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'kvblend[vllm]', see docs/vllm.md)")

from servers import RedisServer  # noqa: E402
from tiny import make_tiny_model  # noqa: E402

from kvblend import BlendConfig, KVBlend  # noqa: E402
from kvblend.config import KVBlendConfig  # noqa: E402
from kvblend.engines.vllm import VLLMEngine  # noqa: E402
from kvblend.store import StoreConfig  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
TOKENS = 8
BLEND = BlendConfig(recompute_ratio=0.15)
SEEN = ["Alice keeps the spare key under the blue flowerpot by the back door.",
        "The train to Lyon leaves at seven in the morning, the one to Turin at nine."]
UNSEEN = ["Bob's favourite number is forty-two; he writes it on every page he signs.",
          "The lighthouse keeper paints the stairs green in spring and red in autumn."]
LATER = ["The museum opens at ten on weekdays and at noon on Sundays.", "Carol rides a red bicycle to the harbour."]
QUESTION = "Where is the spare key?"


def test_redis_down_at_the_workers_lookup_is_a_miss_and_the_engine_keeps_serving(tmp_path):
    redis = RedisServer(tmp_path)
    redis.start()
    folder = make_tiny_model(tmp_path / "llama", "llama", head_dim=64, heads=4, kv_heads=2)
    # The planning process finds chunks in its CPU tier; the worker's store has a CPU tier of its own,
    # empty for chunks it never read, so with Redis down it finds nothing.
    store = StoreConfig(remote_url=redis.url, cpu_bytes=64 << 20, codec="raw", async_writes=False, remote_retry_s=0.2)
    kb = KVBlend(config=KVBlendConfig(model=str(folder), store=store))
    kb.precompute(SEEN + UNSEEN)
    try:
        with VLLMEngine(kb, kv_cache_bytes=64 << 20, max_model_len=1024, enforce_eager=True) as engine:
            vllm = kb.with_engine(engine)
            up = vllm.generate(SEEN, QUESTION, max_new_tokens=TOKENS, config=BLEND)
            assert up.stats.chunk_hits == 2 and up.stats.tokens_cached > 0  # the worker's own report
            assert up.token_ids == kb.generate(SEEN, QUESTION, max_new_tokens=TOKENS, config=BLEND).token_ids

            redis.kill()
            down = vllm.generate(UNSEEN, QUESTION, max_new_tokens=TOKENS, config=BLEND)
            assert (down.stats.chunk_hits, down.stats.chunk_misses, down.stats.tokens_cached) == (0, 2, 0)
            assert down.stats.engine_cached_tokens == down.stats.tokens_total - 1  # the worker wrote them: fresh text
            assert len(down.token_ids) == TOKENS
            again = vllm.generate(SEEN, QUESTION, max_new_tokens=TOKENS, config=BLEND)  # the worker's CPU tier still has these
            assert again.token_ids == up.token_ids and again.stats.chunk_hits == 2

            redis.start()  # empty: a restarted Redis without persistence
            kb.precompute(LATER)  # written to Redis again, which the worker's store retries after remote_retry_s
            time.sleep(0.5)
            back = vllm.generate(LATER, QUESTION, max_new_tokens=TOKENS, config=BLEND)
            assert back.stats.chunk_hits == 2
            assert back.token_ids == kb.generate(LATER, QUESTION, max_new_tokens=TOKENS, config=BLEND).token_ids
    finally:
        kb.close()
        if redis.proc.poll() is None:
            redis.kill()


def preemptions(engine: VLLMEngine) -> float:
    return sum(m.value for m in engine.llm.get_metrics() if m.name == "vllm:num_preemptions")


def test_a_preempted_blended_request_is_blended_again_when_it_resumes(tmp_path):
    """Two blended prompts fill vLLM's whole KV cache; when both need a block to decode, vLLM preempts
    one and frees its blocks. When it resumes, the connector reports its prompt as external again and
    the worker blends it again: both answers are still the transformers engine's blend."""
    folder = make_tiny_model(tmp_path / "llama", "llama", head_dim=64, heads=4, kv_heads=2)
    kb = KVBlend(config=KVBlendConfig(model=str(folder), store=StoreConfig(disk_dir=str(tmp_path / "store"), async_writes=False)))
    m = kb.adapter
    block = 128  # vLLM's CPU block size
    per_block = block * m.num_layers * 2 * m.num_kv_heads * m.head_dim * 4
    with VLLMEngine(kb, kv_cache_bytes=5 * per_block, max_model_len=4 * block, enforce_eager=True,
                    block_size=block, disable_log_stats=False) as engine:
        blocks = engine.llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
        assert blocks == 5  # one of them vLLM's null block: room for four
        target = 2 * block - 1  # two blocks, the second full once the first answer token is computed
        requests = []
        for chunks in (SEEN, UNSEEN):
            pad = target - len(kb.build_prompt(chunks, QUESTION).ids)
            chunks = [chunks[0], chunks[1] + " " + "x" * (pad - 1)]  # the byte tokenizer: one token a byte
            assert len(kb.build_prompt(chunks, QUESTION).ids) == target
            kb.precompute(chunks)
            requests.append((chunks, QUESTION))
        before = preemptions(engine)
        results = kb.with_engine(engine).generate_many(requests, max_new_tokens=TOKENS, config=BLEND)
        assert preemptions(engine) > before
        for (chunks, question), result in zip(requests, results):
            assert result.token_ids == kb.generate(chunks, question, max_new_tokens=TOKENS, config=BLEND).token_ids
    kb.close()


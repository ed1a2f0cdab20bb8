"""`kvblend serve` on a loopback port, driven with the openai client (tiny random model, fp32, CPU).

One server for the module (blending inside vLLM's worker), eager (no torch.compile at start-up).
Skipped where vLLM is not installed.
"""
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'kvblend[vllm]', see docs/vllm.md)")
openai = pytest.importorskip("openai", reason="the openai client is not installed")

from servers import kvblend_serve  # noqa: E402
from tiny import make_tiny_model  # noqa: E402

from kvblend import KVBlend  # noqa: E402

CHUNKS = [
    "Alice keeps the spare key under the blue flowerpot by the back door of the old house.",
    "The train to Lyon leaves at seven in the morning; the one to Turin leaves at nine.",
    "Bob's favourite number is forty-two, and he writes it on the corner of every page.",
]
QUESTION = "Where is the spare key?"
TOKENS = 10
MODEL = "tiny"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(openai client, transformers KVBlend over the same store); the server is stopped afterwards."""
    root = tmp_path_factory.mktemp("serve")
    folder = make_tiny_model(root / "model", "llama", head_dim=64, heads=4, kv_heads=2)
    kb = KVBlend(model=str(folder), store=str(root / "store"))
    kb.precompute(CHUNKS)
    kb.store.flush()
    args = ["--model", str(folder), "--served-model-name", MODEL, "--store", str(root / "store"), "--kv-cache-bytes", "64MiB",
            "--max-model-len", "1024", "--enforce-eager"]
    with kvblend_serve(args, root, up_within_s=300) as base:
        yield openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=120), kb


def chat(client, question, chunks, **kwargs):
    extra = {"kvblend": {"chunks": chunks}, "return_token_ids": True}
    return client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=TOKENS, temperature=0,
        extra_body=extra, **kwargs)


def test_chat_request_is_blended_and_matches_transformers(server):
    client, kb = server
    raw = chat(client, QUESTION, CHUNKS[::-1])
    assert raw.headers["x-kvblend-blended"] == "true" and raw.headers["x-kvblend-chunk-hits"] == "3"
    body = raw.parse()
    here = kb.generate(CHUNKS[::-1], QUESTION, max_new_tokens=TOKENS)
    assert body.choices[0].token_ids == here.token_ids
    report = body.kv_transfer_params["kvblend_blend"]  # the worker's counts come back in the body
    assert (report["tokens_recomputed"], report["chunk_hits"]) == (here.stats.tokens_recomputed, 3)


def test_completion_request_is_blended_and_streams(server):
    client, kb = server
    expected = kb.generate(CHUNKS, QUESTION, max_new_tokens=TOKENS).token_ids
    done = client.completions.create(model=MODEL, prompt=QUESTION, max_tokens=TOKENS, temperature=0,
                                     extra_body={"kvblend": {"chunks": CHUNKS}, "return_token_ids": True})
    assert done.choices[0].token_ids == expected
    stream = client.completions.create(model=MODEL, prompt=QUESTION, max_tokens=TOKENS, temperature=0, stream=True,
                                       extra_body={"kvblend": {"chunks": CHUNKS}})
    assert "".join(c.choices[0].text for c in stream) == done.choices[0].text


def test_plain_requests_pass_through(server):
    client, _ = server
    raw = client.completions.with_raw_response.create(model=MODEL, prompt="Hello there", max_tokens=4, temperature=0)
    assert "x-kvblend-blended" not in raw.headers and raw.parse().choices[0].text is not None


def test_concurrent_requests_each_get_their_own_cache(server):
    client, _ = server
    questions = [f"Question {i}: {QUESTION}" for i in range(8)]
    orders = [[CHUNKS[(i + j) % 3] for j in range(3)] for i in range(8)]

    def ask(i):
        return chat(client, questions[i], orders[i]).parse().choices[0].token_ids

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8)))
    alone = [ask(i) for i in range(8)]
    assert together == alone and len({tuple(t) for t in alone}) > 1


def test_bad_kvblend_field_is_a_400(server):
    client, _ = server
    with pytest.raises(openai.BadRequestError, match="kvblend.chunks"):
        client.completions.create(model=MODEL, prompt=QUESTION, max_tokens=2, extra_body={"kvblend": {"chunks": []}})


def test_prompt_over_the_kv_cache_gets_vllms_error(server):
    client, _ = server
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL, prompt=QUESTION, max_tokens=2,
                                  extra_body={"kvblend": {"chunks": [c * 8 for c in CHUNKS]}})


def test_load_generator_counts_every_request_at_each_level(server):
    """`kvblend bench load`'s driver against the real server: every streamed request is answered and
    timed at each level, each level sends records of its own, and a request the server refuses is
    counted as failed, not as served."""
    from kvblend.eval.datasets import Record
    from kvblend.eval.load import run_load

    client, _ = server
    base = str(client.base_url)
    records = [Record(CHUNKS, f"Question {i}: {QUESTION}") for i in range(7)]
    rows = run_load(base, records, MODEL, "blend", [1, 3], per_level=3, max_tokens=4)
    assert [(r.concurrency, r.requests, r.failed) for r in rows] == [(1, 3, 0), (3, 3, 0)]
    assert all(0 < r.ttft_p50_s <= r.latency_p50_s and r.requests_per_s > 0 for r in rows)
    too_long = Record([c * 8 for c in CHUNKS], QUESTION)  # over --max-model-len: vLLM answers 400
    [row] = run_load(base, [records[0], records[1], too_long], MODEL, "blend", [1], per_level=2, max_tokens=4)
    assert (row.requests, row.failed) == (2, 1)
    with pytest.raises(ValueError, match="need 7 records; the dataset has 6"):
        run_load(base, records[:6], MODEL, "blend", [1, 3], per_level=3)


def test_a_request_its_client_drops_is_aborted_and_the_server_keeps_serving(server):
    """The client goes away after the first streamed line, its request still decoding (400 tokens
    asked for): vLLM aborts it, and the next requests are answered as before."""
    import httpx

    client, kb = server
    body = {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 400, "temperature": 0,
            "stream": True, "ignore_eos": True, "kvblend": {"chunks": [CHUNKS[1], CHUNKS[2], CHUNKS[0]]}}
    for _ in range(3):
        with httpx.stream("POST", f"{client.base_url}chat/completions", json=body, timeout=120) as response:
            assert response.status_code == 200
            assert next(response.iter_lines()).startswith("data: ")
        # leaving the block closes the connection mid-stream
    tokens = chat(client, QUESTION, CHUNKS).parse().choices[0].token_ids
    assert tokens == kb.generate(CHUNKS, QUESTION, max_new_tokens=TOKENS).token_ids

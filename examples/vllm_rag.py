"""Blend inside vLLM's worker, decode with vLLM: one CacheBlend example, blend vs vLLM's full prefill.

    VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 \
        python examples/vllm_rag.py [--example cacheblend-1]

Needs `pip install -e ".[vllm]"` (docs/vllm.md). The `__main__` guard matters: vLLM spawns processes.
"""
from __future__ import annotations

import argparse

from kvblend import KVBlend
from kvblend.eval.datasets import load_chunks_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--example", default="cacheblend-1",
                        help="a CacheBlend prompt file, or a bundled one's name (cacheblend-1 ... cacheblend-10)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()

    record = load_chunks_file(args.example)
    kb = KVBlend(engine="vllm")
    kb.precompute(record.chunks)
    kb.generate(record.chunks, record.question, max_new_tokens=1)  # warm-up
    for method in ("full", "blend"):
        result = kb.generate(record.chunks, record.question, max_new_tokens=args.max_new_tokens, method=method)
        s = result.stats
        print(f"{method:>5}: TTFT {s.ttft_s:.2f}s, {s.engine_cached_tokens}/{s.tokens_total} prompt tokens "
              f"not computed by vLLM | {result.text!r}")
    kb.close()


if __name__ == "__main__":
    main()

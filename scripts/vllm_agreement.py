"""Does the blend inside vLLM's worker give the transformers engine's greedy tokens? (docs/vllm.md)

On CacheBlend examples 1-3 and the first five MuSiQue dev records (top-6 passages), fp32, the
default model, 16 greedy tokens per request:
  blend (CacheBlend's ranking, r=0.15)  vLLM (blend in its worker)  == transformers engine (blend in this process)
  full          vLLM's prefill              == transformers' full prefill
  blend r=1     vLLM (blend in its worker)  == vLLM's own full prefill (invariant 1)
Prints one row per record and exits 1 if any pair differs.

    .venv/bin/python scripts/vllm_agreement.py [--musique 5] [--tokens 16]
"""
from __future__ import annotations

import argparse
import sys
import tempfile

from kvblend import BlendConfig, KVBlend
from kvblend.config import KVBlendConfig
from kvblend.engines.vllm import VLLMEngine
from kvblend.eval.datasets import load_dataset
from kvblend.store import StoreConfig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--musique", type=int, default=5, help="MuSiQue dev records, from the first")
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    records = [("cacheblend-" + str(i), r) for i in (1, 2, 3) for r in load_dataset(f"cacheblend-{i}")]
    records += [(f"musique-{i}", r) for i, r in enumerate(load_dataset("musique-dev", top_k=6, limit=args.musique))]
    blend, exact = BlendConfig(selection="deviation", recompute_ratio=0.15), BlendConfig(recompute_ratio=1.0)
    with tempfile.TemporaryDirectory() as folder:
        store = StoreConfig(disk_dir=folder, cpu_bytes=0, codec="raw", async_writes=False)
        kb = KVBlend(config=KVBlendConfig(store=store))
        kb.precompute([c for _, r in records for c in r.chunks])
        with VLLMEngine(kb, kv_cache_bytes=1 << 30, max_model_len=8192, enforce_eager=True) as engine:
            vllm = kb.with_engine(engine)
            print("| record | prompt tokens | blend r=0.15: worker = transformers | full: vLLM = transformers "
                  "| r=1 in the worker = vLLM full | tokens recomputed (worker / transformers) |")
            print("|---|---|---|---|---|---|")
            failed = False
            for name, r in records:
                def tokens(kb_, method, config=None):
                    return kb_.generate(r.chunks, r.question, max_new_tokens=args.tokens, method=method, config=config)
                w_blend, h_blend = tokens(vllm, "blend", blend), tokens(kb, "blend", blend)
                w_full, h_full = tokens(vllm, "full"), tokens(kb, "full")
                w_exact = tokens(vllm, "blend", exact)
                same = (w_blend.token_ids == h_blend.token_ids, w_full.token_ids == h_full.token_ids,
                        w_exact.token_ids == w_full.token_ids)
                failed |= not all(same)
                marks = " | ".join("same" if s else "DIFFERENT" for s in same)
                print(f"| {name} | {w_blend.stats.tokens_total} | {marks} "
                      f"| {w_blend.stats.tokens_recomputed} / {h_blend.stats.tokens_recomputed} |", flush=True)
        kb.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

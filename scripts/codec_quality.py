"""Quality cost and size of each store codec: first-token KL of the blend vs full prefill, per codec.

Runs the real default model over a few CacheBlend examples. Every codec blends the same prompts
with the same selection settings; only the stored KV differs (memory tiers hold exactly what a
disk or Redis reader would decode), so the KL gap to "raw" is the codec's cost.

    .venv/bin/python scripts/codec_quality.py --records 2
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kvblend import KVBlend
from kvblend.config import KVBlendConfig, StoreConfig
from kvblend.eval.datasets import load_dataset
from kvblend.eval.metrics import kl_divergence
from kvblend.store import open_store
from kvblend.store.codecs import CODECS

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="cacheblend", help="CacheBlend prompt file or folder, or a bundled dataset's name")
    parser.add_argument("--records", type=int, default=5)
    parser.add_argument("--codecs", default=",".join(CODECS))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    for c in codecs:
        if c not in CODECS:
            parser.error(f"unknown codec {c!r}; choose from {', '.join(CODECS)}")

    kb = KVBlend(config=KVBlendConfig(threads=args.threads))
    records = load_dataset(args.data, limit=args.records)
    kl: dict[str, list[float]] = {c: [] for c in codecs}
    agree: dict[str, list[bool]] = {c: [] for c in codecs}
    for record in records:
        full = kb.prefill(record.chunks, record.question, "full").logits
        for codec in codecs:
            kb.store = open_store(StoreConfig(codec=codec, cpu_bytes=2**34))
            kb.precompute(record.chunks)
            blend = kb.prefill(record.chunks, record.question, "blend").logits
            kl[codec].append(float(kl_divergence(full, blend)))
            agree[codec].append(int(full.argmax()) == int(blend.argmax()))

    m = kb.adapter
    shape = (m.num_kv_heads, 512, m.head_dim)
    raw_bytes = CODECS["raw"].layer_nbytes(shape, m.dtype)
    table = Table(title=f"codecs on {len(records)} records of {Path(args.data).name} ({kb.config.model}, {m.dtype})")
    for col in ("codec", "KL first (mean)", "KL first (median)", "1st-token agree", "size vs raw"):
        table.add_column(col, justify="right")
    for codec in codecs:
        size = CODECS[codec].layer_nbytes(shape, m.dtype) / raw_bytes
        table.add_row(codec, f"{statistics.fmean(kl[codec]):.4f}", f"{statistics.median(kl[codec]):.4f}",
                      f"{statistics.fmean(agree[codec]):.2f}", f"{size:.3f}")
    Console().print(table)


if __name__ == "__main__":
    main()

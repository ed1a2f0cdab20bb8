"""Size, speed and quality cost of each store codec: teacher-forced KL of the blend vs full prefill.

Runs the real default model over records of a dataset (default: the bundled MuSiQue dev set).
Per record: full prefill once (greedy answer = the teacher-forced tokens), chunks encoded once in
raw, then for each codec the same blend over the chunks' KV as a reader of that codec would
decode it (memory tiers hold exactly what a disk or Redis reader decodes). kl_tf is the mean KL
over the first --tf-tokens answer positions, as `kvblend eval` computes it; a codec's cost is its
per-record difference to raw's, with a bootstrap interval. Sizes and GB/s are measured on the
records' real KV; "+zstd" columns compress each encoded layer with zstandard (measured only: the
object format keeps fixed-size layers for layer-wise reads).

    nice -n 5 .venv/bin/python scripts/codec_quality.py --records 40 --json /tmp/codecs.json
    # or split over processes: --skip 0 --records 20 --json a.json, --skip 20 ... --json b.json, then --merge a.json b.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from kvblend import KVBlend
from kvblend.config import KVBlendConfig, StoreConfig
from kvblend.eval.datasets import load_dataset
from kvblend.eval.metrics import bootstrap_interval, kl_divergence
from kvblend.eval.runner import _forced_logits
from kvblend.store import ChunkKV, open_store
from kvblend.store.codecs import CODECS

try:
    import zstandard
except ImportError:  # the zstd columns are left out
    zstandard = None


class Speed:
    """Bytes and seconds of codec work on real KV (bytes counted as the model's dtype, like raw)."""

    def __init__(self) -> None:
        self.raw_bytes = self.stored_bytes = self.zstd_bytes = self.tokens = 0
        self.encode_s = self.decode_s = self.zstd_s = self.unzstd_s = 0.0

    def measure(self, codec: str, kv: ChunkKV) -> None:
        c = CODECS[codec]
        for i in range(kv.num_layers):
            k, v = kv.layer(i)
            t0 = time.perf_counter()
            blob = torch.cat(c.encode(k, v))
            t1 = time.perf_counter()
            c.decode(blob, kv.layer_shape, kv.dtype)
            t2 = time.perf_counter()
            self.encode_s, self.decode_s = self.encode_s + t1 - t0, self.decode_s + t2 - t1
            self.raw_bytes += k.nbytes + v.nbytes
            self.stored_bytes += blob.numel()
            if zstandard is not None and codec != "raw":  # lossless compression of the quantized bytes
                data = blob.numpy().tobytes()
                t3 = time.perf_counter()
                packed = zstandard.ZstdCompressor(level=3).compress(data)
                t4 = time.perf_counter()
                zstandard.ZstdDecompressor().decompress(packed)
                self.zstd_s, self.unzstd_s = self.zstd_s + t4 - t3, self.unzstd_s + time.perf_counter() - t4
                self.zstd_bytes += len(packed)
        self.tokens += kv.num_tokens

    def row(self) -> dict:
        if not self.tokens:
            return {}
        gb = self.raw_bytes / 1e9
        out = {"bytes_per_token": self.stored_bytes / self.tokens, "vs_raw": self.raw_bytes / self.stored_bytes,
               "encode_gbps": gb / self.encode_s, "decode_gbps": gb / self.decode_s}
        if self.zstd_bytes:
            out |= {"zstd_bytes_per_token": self.zstd_bytes / self.tokens, "zstd_gain": self.stored_bytes / self.zstd_bytes,
                    "zstd_gbps": self.stored_bytes / 1e9 / self.zstd_s, "unzstd_gbps": self.stored_bytes / 1e9 / self.unzstd_s}
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="musique-dev", help="a bundled dataset's name, or a CacheBlend/MuSiQue file")
    parser.add_argument("--records", type=int, default=40, help="first N records")
    parser.add_argument("--top-k", type=int, default=None, help="keep each record's first K contexts (as kvblend eval)")
    parser.add_argument("--codecs", default=",".join(CODECS), help="comma list; raw is always measured (the reference)")
    parser.add_argument("--tf-tokens", type=int, default=16, help="teacher-forced answer positions per record")
    parser.add_argument("--speed-records", type=int, default=5, help="records whose KV the size/GB/s columns use")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip", type=int, default=0, help="start at record N (split a run over processes)")
    parser.add_argument("--json", default=None, help="also write every figure and per-record KL here")
    parser.add_argument("--merge", nargs="+", default=None, help="only print the table of these --json files, in order")
    args = parser.parse_args()
    if args.merge:
        runs = [json.load(open(path)) for path in args.merge]
        kl = {c: [x for run in runs for x in run["codecs"][c]["per_record"]] for c in runs[0]["codecs"]}
        rows = {c: next((run["codecs"][c]["speed"] for run in runs if run["codecs"][c]["speed"]), {}) for c in kl}
        first = runs[0]
        print_table(f"{first['data']}, top-k {first['top_k'] or 'all'} ({first['model']}, {first['dtype']})", kl, rows)
        return
    codecs = list(dict.fromkeys(["raw", *(c.strip() for c in args.codecs.split(",") if c.strip())]))
    for c in codecs:
        if c not in CODECS:
            parser.error(f"unknown codec {c!r}; choose from {', '.join(CODECS)}")

    kb = KVBlend(config=KVBlendConfig(threads=args.threads, store=StoreConfig(codec="raw", cpu_bytes=2**36)))
    records = load_dataset(args.data, top_k=args.top_k, limit=args.skip + args.records)[args.skip:]
    kl: dict[str, list[float]] = {c: [] for c in codecs}
    speed = {c: Speed() for c in codecs}
    raw_store = kb.store
    started = time.perf_counter()
    for idx, record in enumerate(records):
        kb.store = raw_store
        keys = kb.precompute(record.chunks)
        kvs = [raw_store.get(key) for key in keys]
        full = kb.generate(record.chunks, record.question, args.tf_tokens, "full", keep_prefill=True)
        forced = full.token_ids[: args.tf_tokens - 1]
        reference = _forced_logits(kb, full.prefill, forced)
        for codec in codecs:
            kb.store = open_store(StoreConfig(codec=codec, cpu_bytes=2**36))
            for kv in kvs:
                kb.store.put(kv.key, kv)  # the memory tier holds what a reader of `codec` decodes
                if idx < args.speed_records:
                    speed[codec].measure(codec, kv)
            logits = _forced_logits(kb, kb.prefill(record.chunks, record.question, "blend"), forced)
            kl[codec].append(float(kl_divergence(reference, logits).mean()))
            kb.store.close()
        raw_store.close()
        raw_store = open_store(StoreConfig(codec="raw", cpu_bytes=2**36))  # one record's KV held at a time
        print(f"record {args.skip + idx}: " + " ".join(f"{c}={kl[c][-1]:.4f}" for c in codecs)
              + f" ({time.perf_counter() - started:.0f}s)", flush=True)

    m = kb.adapter
    rows = {c: speed[c].row() for c in codecs}
    print_table(f"{args.data}, top-k {args.top_k or 'all'} ({kb.config.model}, {m.dtype})", kl, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"data": args.data, "skip": args.skip, "records": len(records), "top_k": args.top_k,
                       "model": kb.config.model, "dtype": str(m.dtype), "tf_tokens": args.tf_tokens,
                       "codecs": {c: {"per_record": kl[c], "speed": rows[c]} for c in codecs}}, f, indent=1)


def print_table(what: str, kl: dict[str, list[float]], rows: dict[str, dict]) -> None:
    """Size, speed and kl_tf (mean, and difference to raw per record) with 95% bootstrap intervals."""
    table = Table(title=f"codecs: kl_tf of blend vs full over {len(kl['raw'])} records of {what}")
    for col in ("codec", "B/token", "vs raw", "enc GB/s", "dec GB/s", "kl_tf mean [95%]", "Δ vs raw [95%]",
                "+zstd B/token", "zstd gain"):
        table.add_column(col, justify="right")
    nan = float("nan")
    for codec in kl:
        diff = [a - b for a, b in zip(kl[codec], kl["raw"])]
        row = {"bytes_per_token": nan, "vs_raw": nan, "encode_gbps": nan, "decode_gbps": nan} | rows[codec] | {"kl_tf": statistics.fmean(kl[codec]), "kl_tf_ci": bootstrap_interval(kl[codec]),
                                    "delta": statistics.fmean(diff), "delta_ci": bootstrap_interval(diff)}
        lo, hi = row["kl_tf_ci"]
        dlo, dhi = row["delta_ci"]
        table.add_row(codec, f"{row['bytes_per_token']:,.0f}", f"{row['vs_raw']:.2f}x", f"{row['encode_gbps']:.2f}",
                      f"{row['decode_gbps']:.2f}", f"{row['kl_tf']:.4f} [{lo:.4f}, {hi:.4f}]",
                      f"{row['delta']:+.4f} [{dlo:+.4f}, {dhi:+.4f}]",
                      f"{row.get('zstd_bytes_per_token', float('nan')):,.0f}", f"{row.get('zstd_gain', float('nan')):.2f}x")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()

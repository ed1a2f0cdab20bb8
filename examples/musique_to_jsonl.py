"""Turn a MuSiQue-style file ([{"question", "answers", "ctxs": [{"title", "text"}]}]) into a JSONL
corpus for `kvblend precompute`, one passage a line, and a questions file for `kvblend ask`.

    python examples/musique_to_jsonl.py musique-dev /tmp/musique [--limit 5]
    kvblend precompute /tmp/musique/passages.jsonl --store /tmp/musique/store --chunk-tokens 1024
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def convert(source: str | Path, out: Path, limit: int | None = None) -> tuple[Path, Path]:
    """`source`: a MuSiQue-style file, or a bundled dataset's name (musique-dev)."""
    from kvblend.eval.datasets import resolve_dataset

    records = json.loads(resolve_dataset(source).read_text(encoding="utf-8"))[:limit]
    out.mkdir(parents=True, exist_ok=True)
    passages, questions = out / "passages.jsonl", out / "questions.jsonl"
    with passages.open("w", encoding="utf-8") as f:
        for i, record in enumerate(records):
            for j, ctx in enumerate(record["ctxs"]):
                text = f"{ctx['title']}\n{ctx['text']}" if ctx.get("title") else ctx["text"]
                f.write(json.dumps({"text": text, "record": i, "passage": j}, ensure_ascii=False) + "\n")
    with questions.open("w", encoding="utf-8") as f:
        for i, record in enumerate(records):
            f.write(json.dumps({"record": i, "question": record["question"], "answers": record["answers"]}, ensure_ascii=False) + "\n")
    return passages, questions


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a MuSiQue-style JSON list, or musique-dev (shipped with kvblend)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--limit", type=int, default=None, help="first N records only")
    args = parser.parse_args()
    for path in convert(args.source, args.out, args.limit):
        print(path)

"""The two RAG formats kvblend evaluates on.

- CacheBlend prompt files: {"0": chunk, ..., "k-1": chunk, "chunk_num": k, "query": question}
- MuSiQue-style lists: [{"question", "answers", "ctxs": [{"title", "text"}]}]
A plain JSON list of strings is accepted as a chunks file too.

Both ship with kvblend (`kvblend/data/datasets/`, sources and licences in its NOTICE.md) and are
addressable by name wherever a dataset path is taken: `musique-dev`, `cacheblend` (the ten
CacheBlend prompts) and `cacheblend-1` ... `cacheblend-10`.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

QA_INSTRUCTION = (
    "Answer the question based on the given passages. Answer the question within 5 words. "
    "Do NOT repeat the question or output any other words. Question: {question}\nAnswer:"
)


def bundled_dir() -> Path:
    """The folder of the evaluation data shipped with kvblend (holds musique_dev.json and cacheblend/)."""
    return Path(str(resources.files("kvblend").joinpath("data", "datasets")))


def _bundled() -> dict[str, str]:
    names = {"musique-dev": "musique_dev.json", "cacheblend": "cacheblend"}
    names.update({f"cacheblend-{i}": f"cacheblend/{i}.json" for i in range(1, 11)})
    return names


BUNDLED: dict[str, str] = _bundled()
"""Name of each bundled dataset -> its path inside `bundled_dir()`."""


def resolve_dataset(name_or_path: str | Path) -> Path:
    """A bundled dataset's name (`musique-dev`, `cacheblend`, `cacheblend-3`) or an existing path.

    An existing file or folder wins over a name, so a local file called `musique-dev` is still read.
    """
    path = Path(name_or_path)
    if path.exists():
        return path
    key = str(name_or_path).strip().lower()
    if key in BUNDLED:
        return bundled_dir() / BUNDLED[key]
    names = ", ".join(["musique-dev", "cacheblend", "cacheblend-1 ... cacheblend-10"])
    raise ValueError(f"{name_or_path}: no such file or folder, and not a bundled dataset ({names})")


@dataclass
class Record:
    chunks: list[str]
    question: str
    answers: list[str] = field(default_factory=list)

    def chunks_in_order(self, index: int, shuffle_seed: int | None) -> list[str]:
        """The chunks as asked: in file order, or (with a seed) shuffled per record, so the `index`-th
        record gets the same order in every run and in every tool (eval, load)."""
        if shuffle_seed is None:
            return list(self.chunks)
        return random.Random(shuffle_seed + index).sample(self.chunks, len(self.chunks))


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON file ({exc})") from exc


def _cacheblend(obj: dict, path: Path) -> Record:
    try:
        n = int(obj["chunk_num"])
        return Record(chunks=[obj[str(i)] for i in range(n)], question=obj["query"])
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path}: not a CacheBlend prompt file (missing {exc})") from exc


def _musique(obj: dict) -> Record:
    ctxs = obj["ctxs"]
    chunks = [f"{c['title']}\n{c['text']}" if c.get("title") else c["text"] for c in ctxs]
    return Record(chunks=chunks, question=QA_INSTRUCTION.format(question=obj["question"]), answers=list(obj["answers"]))


def load_chunks_file(path: str | Path) -> Record:
    """One prompt: a CacheBlend file (or a bundled one's name, e.g. `cacheblend-1`), or a JSON list
    of chunk strings (no question)."""
    path = resolve_dataset(path)
    obj = _read_json(path)
    if isinstance(obj, dict):
        return _cacheblend(obj, path)
    if isinstance(obj, list) and obj and all(isinstance(c, str) for c in obj):
        return Record(chunks=obj, question="")
    raise ValueError(f"{path}: expected a CacheBlend prompt object or a list of chunk strings")


def load_dataset(path: str | Path, top_k: int | None = None, limit: int | None = None) -> list[Record]:
    """A dataset: a CacheBlend file, a folder of them, or a MuSiQue-style list; a path or a bundled
    dataset's name (`musique-dev`, `cacheblend`, `cacheblend-1` ... `cacheblend-10`)."""
    path = resolve_dataset(path)
    if path.is_dir():
        files = sorted(path.glob("*.json"), key=lambda p: (len(p.stem), p.stem))
        if not files:
            raise ValueError(f"{path}: no .json prompt files in this folder")
        records = [_cacheblend(_read_json(f), f) for f in files]
    else:
        obj = _read_json(path)
        if isinstance(obj, dict):
            records = [_cacheblend(obj, path)]
        elif isinstance(obj, list) and obj and isinstance(obj[0], dict) and "ctxs" in obj[0]:
            try:
                records = [_musique(r) for r in obj]
            except (KeyError, TypeError) as exc:
                raise ValueError(f"{path}: a MuSiQue-style record lacks {exc}") from exc
        else:
            raise ValueError(f"{path}: neither a CacheBlend prompt file nor a MuSiQue-style list")
    if top_k:
        records = [Record(r.chunks[:top_k], r.question, r.answers) for r in records]
    return records[:limit] if limit else records

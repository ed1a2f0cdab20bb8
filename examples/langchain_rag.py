"""A LangChain RAG chain whose answers come from blended, precomputed chunk caches.

    python examples/langchain_rag.py [--dataset musique-dev] [--records 3]

MuSiQue passages go into a LangChain in-memory vector store (all-MiniLM-L6-v2, local). The retriever
is wrapped by `KVBlendRetriever` (each retrieved passage's KV is made sure of in the store) and the
answer comes from `KVBlendAnswer`. The second run of the question finds every passage cached.
"""
from __future__ import annotations

import argparse
import json

from langchain_core.runnables import RunnableParallel, RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore

from kvblend import KVBlend
from kvblend.eval.datasets import QA_INSTRUCTION, resolve_dataset
from kvblend.integrations.langchain import KVBlendAnswer, KVBlendRetriever, SentenceTransformerEmbeddings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="musique-dev",
                        help="a MuSiQue-style JSON list, or a bundled dataset's name (default: musique-dev)")
    parser.add_argument("--records", type=int, default=3, help="passages of this many records form the corpus")
    parser.add_argument("--store", default=None, help="KV store directory (default: in memory)")
    args = parser.parse_args()

    records = json.loads(resolve_dataset(args.dataset).read_text(encoding="utf-8"))[: args.records]
    texts = [ctx["text"] for r in records for ctx in r["ctxs"]]
    metadatas = [{"source": f"record {i} passage {j}"} for i, r in enumerate(records) for j in range(len(r["ctxs"]))]
    vectors = InMemoryVectorStore.from_texts(texts, SentenceTransformerEmbeddings(), metadatas=metadatas)

    kb = KVBlend(store=args.store)
    retriever = KVBlendRetriever(retriever=vectors.as_retriever(search_kwargs={"k": 4}), kvblend=kb)
    answer = KVBlendAnswer(kvblend=kb, question_template=QA_INSTRUCTION, max_new_tokens=24)
    chain = RunnableParallel(documents=retriever, question=RunnablePassthrough()).assign(answer=answer)

    question = records[0]["question"]
    print(f"Q: {question}   (gold: {records[0]['answers']})")
    for attempt in ("first run", "second run"):
        out = chain.invoke(question)
        stats = out["answer"].response_metadata["kvblend"]
        print(f"\n[{attempt}] A: {out['answer'].content}")
        for d in out["documents"]:
            status = d.metadata["kvblend"]
            print(f"  {d.metadata['source']:22s} {status['tokens']:4d} tokens  {'hit' if status['hit'] else 'miss (encoded now)'}")
        print(f"  TTFT {stats['ttft_s']:.3f}s, {stats['chunk_hits']} cache hits, {stats['tokens_recomputed']} tokens recomputed")


if __name__ == "__main__":
    main()

"""LangChain adapters.

- `KVBlendRetriever` wraps any retriever: its documents come back with `metadata["kvblend"]`
  (key, hit, tokens), and their KV is in the store before anyone asks a question over them.
- `KVBlendAnswer` answers `{"question", "documents"}` by blending the documents' caches, so

      chain = {"documents": KVBlendRetriever(retriever=r, kvblend=kb), "question": RunnablePassthrough()} | KVBlendAnswer(kvblend=kb)

  is an ordinary LCEL chain (invoke, ainvoke, stream).
- `SentenceTransformerEmbeddings` gives LangChain vector stores the same local embedder as `kvblend precompute`.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnableConfig, RunnableSerializable
from langchain_core.runnables.config import run_in_executor
from pydantic import ConfigDict, Field

from kvblend.api import KVBlend
from kvblend.corpus.embed import Embedder
from kvblend.corpus.precompute import ensure_cached
from kvblend.integrations.streaming import stream_text


class KVBlendRetriever(BaseRetriever):
    """Documents from `retriever`, each annotated with its cache status and cached in kvblend's store."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    retriever: BaseRetriever
    kvblend: KVBlend = Field(exclude=True)

    def _annotate(self, documents: list[Document]) -> list[Document]:
        statuses = ensure_cached(self.kvblend, [d.page_content for d in documents])
        return [d.model_copy(update={"metadata": {**d.metadata, "kvblend": asdict(s)}}) for d, s in zip(documents, statuses)]

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        documents = self.retriever.invoke(query, config={"callbacks": run_manager.get_child()})
        return self._annotate(documents)

    async def _aget_relevant_documents(self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun) -> list[Document]:
        documents = await self.retriever.ainvoke(query, config={"callbacks": run_manager.get_child()})
        return await run_in_executor(None, self._annotate, documents)


class KVBlendAnswer(RunnableSerializable[dict, AIMessage]):
    """Answers `{"question": str, "documents": list[Document]}` over the documents' blended caches.

    The message's `response_metadata` holds the request stats (hits, recomputed tokens, TTFT) and
    the documents' sources; streaming yields `AIMessageChunk`s as tokens are decoded.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    kvblend: KVBlend = Field(exclude=True)
    question_template: str = Field("{question}", description="how the question is put to the model, e.g. asking for a short answer")
    max_new_tokens: int = 64
    method: Literal["blend", "full", "reuse"] = "blend"

    def _unpack(self, input: dict) -> tuple[list[str], str, list[Any]]:
        try:
            question, documents = input["question"], input["documents"]
        except (KeyError, TypeError):
            raise ValueError('KVBlendAnswer expects {"question": str, "documents": list[Document]}') from None
        if not documents:
            raise ValueError("KVBlendAnswer got no documents to answer from")
        return ([d.page_content for d in documents], self.question_template.format(question=question),
                [d.metadata.get("source") for d in documents])

    def _answer(self, input: dict) -> AIMessage:
        chunks, question, sources = self._unpack(input)
        result = self.kvblend.generate(chunks, question, max_new_tokens=self.max_new_tokens, method=self.method)
        return AIMessage(content=result.text, response_metadata={"kvblend": result.stats.as_dict(), "sources": sources})

    def invoke(self, input: dict, config: RunnableConfig | None = None, **kwargs: Any) -> AIMessage:
        return self._call_with_config(self._answer, input, config)

    def _stream_answer(self, inputs: Iterator[dict]) -> Iterator[AIMessageChunk]:
        chunks, question, sources = self._unpack(next(inputs))
        tokens = self.kvblend.stream(chunks, question, max_new_tokens=self.max_new_tokens, method=self.method)
        for piece in stream_text(self.kvblend, tokens):
            yield AIMessageChunk(content=piece)
        yield AIMessageChunk(content="", response_metadata={"sources": sources})

    def stream(self, input: dict, config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[AIMessageChunk]:
        """Token by token (Runnable.transform, used inside chains, gathers the input and calls this)."""
        yield from self._transform_stream_with_config(iter([input]), self._stream_answer, config)


class SentenceTransformerEmbeddings(Embeddings):
    """LangChain embeddings from a local sentence-transformers folder (default: all-MiniLM-L6-v2)."""

    def __init__(self, embedder: Embedder | str | None = None):
        self.embedder = embedder if isinstance(embedder, Embedder) else Embedder(embedder)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.embedder.embed(texts).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embedder.embed([text])[0].tolist()

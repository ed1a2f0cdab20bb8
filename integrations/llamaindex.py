"""LlamaIndex adapters.

- `KVBlendNodePostprocessor` makes sure retrieved nodes' KV is stored, annotates
  `node.metadata["kvblend"]` (key, hit, tokens) and can pin chunks first (standing instructions, a
  glossary: their caches then sit where they were encoded and reuse exactly).
- `KVBlendLLM` is a LlamaIndex LLM backed by kvblend; given `chunks=` it blends their caches.
- `KVBlendSynthesizer` answers from the retrieved nodes through `KVBlendLLM`, one chunk per node:

      llm = KVBlendLLM(kvblend=kb)
      engine = index.as_query_engine(llm=llm, response_synthesizer=KVBlendSynthesizer(llm),
                                     node_postprocessors=[KVBlendNodePostprocessor(kvblend=kb)])
"""
from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import asdict
from typing import Any, Literal

from llama_index.core.base.llms.types import CompletionResponse, CompletionResponseGen, LLMMetadata
from llama_index.core.base.response.schema import RESPONSE_TYPE
from llama_index.core.bridge.pydantic import Field
from llama_index.core.llms import CustomLLM
from llama_index.core.llms.callbacks import llm_completion_callback
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.response_synthesizers import BaseSynthesizer
from llama_index.core.schema import BaseNode, MetadataMode, NodeWithScore, QueryBundle, TextNode
from llama_index.core.types import RESPONSE_TEXT_TYPE

from kvblend.api import KVBlend
from kvblend.corpus.precompute import ensure_cached
from kvblend.integrations.streaming import stream_text

ANNOTATION = "kvblend"


def chunk_text(node: BaseNode) -> str:
    """The text a response synthesizer hands the LLM for this node, hence the text to cache."""
    return node.get_content(metadata_mode=MetadataMode.LLM)


def _copy_for_annotation(node: BaseNode) -> BaseNode:
    """A copy whose LLM and embedding text ignore our annotation; the index's own node stays untouched."""
    return node.model_copy(update={
        "metadata": dict(node.metadata),
        "excluded_llm_metadata_keys": sorted({*node.excluded_llm_metadata_keys, ANNOTATION}),
        "excluded_embed_metadata_keys": sorted({*node.excluded_embed_metadata_keys, ANNOTATION}),
    })


class KVBlendNodePostprocessor(BaseNodePostprocessor):
    """Pinned chunks first, then the retrieved nodes; every node's KV stored and its status annotated."""

    kvblend: KVBlend = Field(exclude=True)
    pinned_texts: list[str] = Field(default_factory=list, description="chunks always placed first, in this order")

    @classmethod
    def class_name(cls) -> str:
        return "KVBlendNodePostprocessor"

    def _pinned(self) -> list[NodeWithScore]:
        return [NodeWithScore(node=TextNode(text=t, id_="kvblend-pinned-" + hashlib.sha256(t.encode()).hexdigest()[:16]))
                for t in self.pinned_texts]

    def _postprocess_nodes(self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None) -> list[NodeWithScore]:
        pinned = set(self.pinned_texts)
        ordered = self._pinned() + [n for n in nodes if n.node.get_content(metadata_mode=MetadataMode.NONE) not in pinned]
        out = [NodeWithScore(node=_copy_for_annotation(n.node), score=n.score) for n in ordered]
        for n, status in zip(out, ensure_cached(self.kvblend, [chunk_text(n.node) for n in out])):
            n.node.metadata[ANNOTATION] = asdict(status)
        return out


class KVBlendLLM(CustomLLM):
    """kvblend as a LlamaIndex LLM. `complete(prompt, chunks=[...])` blends the chunks' caches before
    the prompt; a plain prompt (no chunks) is answered with an ordinary full prefill."""

    kvblend: KVBlend = Field(exclude=True)
    max_new_tokens: int = 64
    method: Literal["blend", "full", "reuse"] = "blend"

    @classmethod
    def class_name(cls) -> str:
        return "KVBlendLLM"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=self.kvblend.adapter.max_positions, num_output=self.max_new_tokens,
                           model_name=self.kvblend.config.model, is_chat_model=False)

    def _request(self, prompt: str, chunks: Sequence[str] | None) -> tuple[list[str], str, str]:
        return (list(chunks), prompt, self.method) if chunks else ([prompt], "", "full")

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, chunks: Sequence[str] | None = None, **kwargs: Any) -> CompletionResponse:
        chunks, question, method = self._request(prompt, chunks)
        result = self.kvblend.generate(chunks, question, max_new_tokens=self.max_new_tokens, method=method)
        return CompletionResponse(text=result.text, additional_kwargs={ANNOTATION: result.stats.as_dict()})

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, chunks: Sequence[str] | None = None,
                        **kwargs: Any) -> CompletionResponseGen:
        chunks, question, method = self._request(prompt, chunks)
        text = ""
        for piece in stream_text(self.kvblend, self.kvblend.stream(chunks, question, self.max_new_tokens, method)):
            text += piece
            yield CompletionResponse(text=text, delta=piece)


_last_stats: ContextVar[dict | None] = ContextVar("kvblend_last_stats", default=None)


class KVBlendSynthesizer(BaseSynthesizer):
    """Answers the query from the nodes as separate cached chunks (no prompt stuffing, no refine
    passes); the response's metadata["kvblend"] holds the request stats (non-streaming)."""

    def __init__(self, llm: KVBlendLLM, question_template: str = "{question}", streaming: bool = False, **kwargs: Any):
        """question_template says how the query is put to the model (e.g. asking for a short answer)."""
        if not isinstance(llm, KVBlendLLM):
            raise TypeError(f"KVBlendSynthesizer needs a KVBlendLLM, got {type(llm).__name__}")
        super().__init__(llm=llm, streaming=streaming, **kwargs)
        self.question_template = question_template

    def _get_prompts(self) -> dict:
        return {}

    def _update_prompts(self, prompts: dict) -> None:
        """No prompt templates: the model's chat template frames the chunks and the question."""

    def get_response(self, query_str: str, text_chunks: Sequence[str], **response_kwargs: Any) -> RESPONSE_TEXT_TYPE:
        question = self.question_template.format(question=query_str)
        if self._streaming:
            return (r.delta for r in self._llm.stream_complete(question, chunks=text_chunks))
        completion = self._llm.complete(question, chunks=text_chunks)
        _last_stats.set(completion.additional_kwargs[ANNOTATION])
        return completion.text

    async def aget_response(self, query_str: str, text_chunks: Sequence[str], **response_kwargs: Any) -> RESPONSE_TEXT_TYPE:
        if self._streaming:
            return self.get_response(query_str, text_chunks)
        question = self.question_template.format(question=query_str)
        completion = await asyncio.to_thread(self._llm.complete, question, chunks=text_chunks)
        _last_stats.set(completion.additional_kwargs[ANNOTATION])
        return completion.text

    def _prepare_response_output(self, response_str: RESPONSE_TEXT_TYPE | None, source_nodes: list[NodeWithScore]) -> RESPONSE_TYPE:
        response = super()._prepare_response_output(response_str, source_nodes)
        stats = _last_stats.get()
        if isinstance(response_str, str) and stats is not None and response.metadata is not None:
            response.metadata[ANNOTATION] = stats
        _last_stats.set(None)
        return response

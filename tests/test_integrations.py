"""LangChain and LlamaIndex over a small corpus with the real model and the real local embedder.

Each question's answer sits in a retrieved chunk that is not the first one; asking again finds
every retrieved chunk's KV already stored.
"""
import asyncio

import pytest

from kvblend.eval.datasets import QA_INSTRUCTION

pytestmark = pytest.mark.real_model

LIGHTHOUSE = [
    "Who is the keeper of the Blue Harbor lighthouse? Visitors ask this on every summer tour of the tower.",
    "Records of the Blue Harbor lighthouse: the current keeper is Marta Olsen, who took over the light in 1998.",
    "The Blue Harbor ferry leaves the pier at noon and returns at six in the evening.",
    "Green Valley bakery sells rye bread and almond cakes. Its oven was built in 1921.",
    "The Red Rock mine closed in 1954 after the silver ran out.",
]
BAKERY = [
    "Town archive of Green Valley. Entries are short and factual.",
    "The Green Valley bakery's head baker is Ivo Brandt, who starts the ovens at four every morning.",
    "Green Valley bakery sells rye bread and almond cakes to the whole valley.",
    "The Red Rock mine closed in 1954 after the silver ran out.",
    "The harbor town holds a fish festival every August with music and boat races.",
]


@pytest.fixture(scope="module")
def embedder():
    from kvblend.corpus import Embedder

    return Embedder()


def test_langchain_chain_answers_from_a_later_chunk_and_hits_the_cache_on_repeat(real_kb, embedder):
    from langchain_core.runnables import RunnableParallel, RunnablePassthrough
    from langchain_core.vectorstores import InMemoryVectorStore

    from kvblend.integrations.langchain import KVBlendAnswer, KVBlendRetriever, SentenceTransformerEmbeddings

    store = InMemoryVectorStore.from_texts(LIGHTHOUSE, SentenceTransformerEmbeddings(embedder),
                                           metadatas=[{"source": f"doc{i}"} for i in range(len(LIGHTHOUSE))])
    retriever = KVBlendRetriever(retriever=store.as_retriever(search_kwargs={"k": 3}), kvblend=real_kb)
    answer = KVBlendAnswer(kvblend=real_kb, question_template=QA_INSTRUCTION, max_new_tokens=16)
    chain = RunnableParallel(documents=retriever, question=RunnablePassthrough()).assign(answer=answer)
    question = "Who is the keeper of the Blue Harbor lighthouse?"

    first = chain.invoke(question)
    sources = [d.metadata["source"] for d in first["documents"]]
    assert sources.index("doc1") > 0, sources  # the answer is not in the top chunk
    assert not any(d.metadata["kvblend"]["hit"] for d in first["documents"])
    assert "Olsen" in first["answer"].content

    second = asyncio.run(chain.ainvoke(question))
    assert all(d.metadata["kvblend"]["hit"] for d in second["documents"])
    assert second["answer"].response_metadata["kvblend"]["chunk_hits"] == 3
    assert second["answer"].response_metadata["sources"] == sources
    assert "Olsen" in second["answer"].content

    streamed = list((RunnableParallel(documents=retriever, question=RunnablePassthrough()) | answer).stream(question))
    assert len(streamed) > 2 and "Olsen" in "".join(c.content for c in streamed)


def test_llamaindex_query_engine_answers_from_a_later_chunk_and_hits_the_cache_on_repeat(real_kb):
    from llama_index.core import VectorStoreIndex
    from llama_index.core.schema import TextNode
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    from kvblend.corpus.embed import resolve_embedder
    from kvblend.integrations.llamaindex import KVBlendLLM, KVBlendNodePostprocessor, KVBlendSynthesizer

    embed = HuggingFaceEmbedding(model_name=str(resolve_embedder(None)), device="cpu")
    index = VectorStoreIndex([TextNode(text=t, id_=f"node{i}") for i, t in enumerate(BAKERY[1:], start=1)], embed_model=embed)
    llm = KVBlendLLM(kvblend=real_kb, max_new_tokens=16)
    postprocessor = KVBlendNodePostprocessor(kvblend=real_kb, pinned_texts=[BAKERY[0]])
    engine = index.as_query_engine(llm=llm, similarity_top_k=2, node_postprocessors=[postprocessor],
                                   response_synthesizer=KVBlendSynthesizer(llm, question_template=QA_INSTRUCTION))
    question = "Who is the head baker of the Green Valley bakery?"

    first = engine.query(question)
    texts = [n.node.get_content() for n in first.source_nodes]
    assert texts[0] == BAKERY[0] and texts.index(BAKERY[1]) > 0
    assert not any(n.node.metadata["kvblend"]["hit"] for n in first.source_nodes)
    assert "Brandt" in str(first)

    second = asyncio.run(engine.aquery(question))
    assert all(n.node.metadata["kvblend"]["hit"] for n in second.source_nodes)
    assert second.metadata["kvblend"]["chunk_hits"] == len(second.source_nodes) == 3
    assert "Brandt" in str(second)
    assert "kvblend" not in index.docstore.get_node("node1").metadata  # the index's own nodes stay clean

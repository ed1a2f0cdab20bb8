"""Primed chunk encoding end to end: the primer a corpus chooses, recorded beside the store and
used by everything that reads it; another encoding is a clear miss, never a wrong answer."""
import json
import logging

import torch

from transformers import AutoTokenizer
from typer.testing import CliRunner

from kvblend import BlendConfig, KVBlend, KVBlendConfig
from kvblend.cli import app
from kvblend.corpus.primer import choose_primer

runner = CliRunner()
RIVERS = [f"The {name} river floods its valley each spring, and the town's bridge over the {name} was rebuilt in {year}."
          for name, year in (("Ouse", 1820), ("Wye", 1871), ("Tay", 1903), ("Exe", 1936), ("Dee", 1952))]
OUTLIER = "def main():\n    return sum(range(10)) ** 2  # nothing about rivers"


def test_the_primer_is_the_most_typical_passage_and_is_cut_to_its_budget(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    texts = [OUTLIER] + RIVERS
    primer = choose_primer(texts, tok)
    assert primer in RIVERS
    assert choose_primer(list(reversed(texts)), tok) in RIVERS
    assert choose_primer(texts, tok) == primer  # deterministic
    cut = choose_primer(texts, tok, max_tokens=8)
    assert len(tok(cut, add_special_tokens=False)["input_ids"]) <= 9 and primer.startswith(cut[:10])


def _corpus(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, text in enumerate(RIVERS + [OUTLIER]):
        (docs / f"{i}.txt").write_text(text)
    return docs


def test_precompute_records_its_primer_and_readers_use_it(tiny_models, tmp_path, caplog):
    model, store = str(tiny_models["llama"]), tmp_path / "store"
    res = runner.invoke(app, ["precompute", str(_corpus(tmp_path)), "--store", str(store), "--model", model, "--no-index"])
    assert res.exit_code == 0, res.output
    info = json.loads((store / "corpus" / "corpus.json").read_text())
    encoding = info["chunk_encoding"]
    assert encoding["chunk_context"] == "primed" and encoding["primer"] in RIVERS

    kb = KVBlend(model=model, store=str(store))  # default settings: the store's encoding is adopted
    assert kb.config.blend.primer == encoding["primer"]
    chunks = RIVERS[:2]
    result = kb.generate(chunks, "Which bridge is oldest?", max_new_tokens=2)
    assert (result.stats.chunk_hits, result.stats.chunk_misses) == (2, 0)
    kb.close()

    with caplog.at_level(logging.WARNING):
        bos = KVBlend(model=model, store=str(store), config=KVBlendConfig(store=str(store), blend=BlendConfig(chunk_context="bos")))
    assert "will be misses" in caplog.text and "chunk_context='primed'" in caplog.text
    result = bos.generate(chunks, "Which bridge is oldest?", max_new_tokens=2)
    assert (result.stats.chunk_hits, result.stats.chunk_misses) == (0, 2)  # a miss, not another encoding's KV
    bos.close()

    again = runner.invoke(app, ["precompute", str(tmp_path / "docs"), "--store", str(store), "--model", model,
                                "--no-index", "--chunk-context", "bos"])
    assert again.exit_code == 2 and "drop --chunk-context" in " ".join(again.output.split())
    assert json.loads((store / "corpus" / "corpus.json").read_text()) == info


def test_a_corpus_recorded_before_encodings_were_reads_as_bos(tiny_models, tmp_path):
    model, store = str(tiny_models["llama"]), tmp_path / "store"
    (store / "corpus").mkdir(parents=True)
    fingerprint = KVBlend(model=model).adapter.fingerprint
    (store / "corpus" / "corpus.json").write_text(json.dumps({"model": model, "fingerprint": fingerprint}))
    kb = KVBlend(model=model, store=str(store))
    assert kb.config.blend.chunk_context == "bos" and kb.context_ids == [kb.tokenizer.bos_token_id]
    kb.close()


def test_the_chunk_context_runs_once_and_chunks_keep_their_one_pass_kv(tiny_models):
    """Chunks after a primer: the primer's forward runs once for all of them, and each chunk's KV is
    the one a single forward over primer + chunk gives."""
    from kvblend.blend import chunks as chunk_encoding

    kb = KVBlend(model=str(tiny_models["llama"]), config=BlendConfig(chunk_context="primed", primer=RIVERS[0]))
    embedded = []
    embed = kb.adapter.embed
    kb.adapter.embed = lambda ids: embedded.append(ids.numel()) or embed(ids)
    ids = [kb.tokenizer(t, add_special_tokens=False)["input_ids"] for t in RIVERS[1:4]]
    encoded = [chunk_encoding.encode_chunk(kb.adapter, kb.context_ids, c, "k") for c in ids]
    assert embedded == [len(kb.context_ids)] + [len(c) for c in ids]
    for c, kv in zip(ids, encoded):
        one_pass = chunk_encoding._forward(kb.adapter, torch.tensor(kb.context_ids + c), 0, None)
        for layer, (k, _, v) in enumerate(one_pass):
            torch.testing.assert_close(kv.keys[layer], k[:, len(kb.context_ids):], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(kv.values[layer], v[:, len(kb.context_ids):], rtol=1e-5, atol=1e-5)

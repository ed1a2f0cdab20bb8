"""`kvblend precompute` over the 750 MuSiQue dev passages, and recall@6 of its index with the real embedder.

The LLM here is a tiny random model that uses SmolLM2's tokenizer, so chunking is exactly the
default model's while encoding stays fast; retrieval does not depend on the LLM.
Gold signal: a passage supports a question when its text contains one of the question's answer
strings (lowercased, punctuation removed); questions with no such passage in the corpus are left out.
"""
import json
import runpy
import string
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvblend.cli import app

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PUNCTUATION = set(string.punctuation) | {"–", "—", "£"}


def normalize(text: str) -> str:
    return " " + " ".join("".join(" " if ch in PUNCTUATION else ch for ch in text.lower()).split()) + " "


@pytest.fixture(scope="module")
def smollm_tokenizer_tiny_model(tmp_path_factory) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from kvblend.models.registry import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=8192,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("smol_tok_tiny")
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_musique_precompute_ask_and_recall_at_6(datasets, smollm_tokenizer_tiny_model, tmp_path):
    from kvblend.corpus import CorpusFolder, Embedder

    convert = runpy.run_path(str(EXAMPLES / "musique_to_jsonl.py"))["convert"]
    passages, questions = convert(datasets / "musique_dev.json", tmp_path / "musique")
    store, model = tmp_path / "store", str(smollm_tokenizer_tiny_model)
    res = CliRunner().invoke(app, ["precompute", str(passages), "--store", str(store), "--model", model, "--chunk-tokens", "1024"])
    out = " ".join(res.output.split())
    assert res.exit_code == 0, res.output
    assert "750 documents → 750 chunks" in out and "encoding KV" in out and "tok/s" in out
    assert "indexed 682 unique chunks" in out  # 68 passages repeat across records

    records = [json.loads(line) for line in questions.read_text().splitlines()]
    ask = CliRunner().invoke(app, ["ask", records[0]["question"], "--store", str(store), "--model", model, "--max-new-tokens", "2"])
    assert ask.exit_code == 0, ask.output
    assert "(6 hits, 0 misses)" in " ".join(ask.output.split())

    folder = CorpusFolder.for_store(str(store))
    index, embedder = folder.load_index(), Embedder()
    texts = [normalize(r.text) for r in index.records]
    found = answerable = 0
    for record in records:
        answers = [normalize(a) for a in record["answers"]]
        if not any(a in t for t in texts for a in answers):
            continue
        answerable += 1
        top = index.search(embedder, record["question"], 6)
        found += any(a in normalize(h.record.text) for h in top for a in answers)
    recall = found / answerable
    print(f"MuSiQue dev recall@6 = {found}/{answerable} = {recall:.3f} (all-MiniLM-L6-v2, 682 unique passages)")
    assert answerable >= 60 and recall >= 0.6

"""Tiny Hugging Face folders (random GPT-2 and Llama) and lm-evaluation-harness driven on
them, for the `tinylm eval` harness tests (tests/test_eval_mc.py, test_eval_perplexity.py)."""

from __future__ import annotations

import json
import os

import tinylm
from tinylm.models import Decoder, GPT2Config, LlamaConfig
from tinylm.tokenizers.bpe import BPETokenizer

from base_helpers import write_jsonl  # noqa: F401 (the eval tests import it from here)
from corpora import SLICE

WORDS = ("the cat dog sat on a mat ran far away quickly red blue green house tree bird "
         "river stone light night").split()


def _tokenizer():
    text = SLICE.read_text(encoding="utf-8")[:20000]
    return BPETokenizer.train([text], 300, special_tokens=["<|endoftext|>", "<s>"])


def tiny_gpt2(path, max_positions: int = 64):
    """A random 2-layer GPT-2 with a 300-token BPE; HF's GPT2Tokenizer gives it
    <|endoftext|> as BOS and EOS (no BOS added to texts)."""
    tok = _tokenizer()
    tinylm.seed(0)
    Decoder(GPT2Config(vocab_size=len(tok), d_model=32, n_layer=2, n_head=4,
                       max_positions=max_positions)).save_pretrained(path)
    tok.save(path / "tokenizer.json")
    return path


def tiny_llama(path, max_positions: int = 64):
    """A random 2-layer GQA Llama whose tokenizer.json puts <s> before every text
    (a TemplateProcessing post-processor, as Llama's), so lm-eval and tinylm add BOS."""
    tok = _tokenizer()
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("<|endoftext|>")
    tinylm.seed(1)
    Decoder(LlamaConfig(vocab_size=len(tok), d_model=32, n_layer=2, n_head=4, n_kv_head=2,
                        d_ff=64, max_positions=max_positions, bos_token_id=bos,
                        eos_token_id=eos)).save_pretrained(path)
    tok.save(path / "tokenizer.json")
    data = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    add_bos = {"type": "TemplateProcessing",
               "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                          {"Sequence": {"id": "A", "type_id": 0}}],
               "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                        {"Sequence": {"id": "A", "type_id": 0}},
                        {"Sequence": {"id": "B", "type_id": 1}}],
               "special_tokens": {"<s>": {"id": "<s>", "ids": [bos], "tokens": ["<s>"]}}}
    data["post_processor"] = {"type": "Sequence",
                              "processors": [data["post_processor"], add_bos]}
    (path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    (path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "<|endoftext|>"}), encoding="utf-8")
    return path


def offline_lm_eval(monkeypatch, cache_dir):
    """lm_eval imported with the Hugging Face libraries offline and their caches in
    ``cache_dir``; ``simple_evaluate``'s environment report (pip freeze in a
    subprocess, a second per run) left out."""
    import pytest

    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", os.fspath(cache_dir))
    lm_eval = pytest.importorskip("lm_eval")
    import lm_eval.evaluator

    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)
    return lm_eval


def hf_model(path):
    """(transformers model, tokenizer) of a local folder, float32, in eval mode."""
    import pytest

    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(os.fspath(path)).eval()
    return model, transformers.AutoTokenizer.from_pretrained(os.fspath(path))


def hflm(hf, batch_size: int = 8):
    """lm-eval's HFLM (``--model hf``) around an already loaded (model, tokenizer) pair
    of a local folder, float32 on the CPU (loading once per test module: from_pretrained
    costs seconds)."""
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = hf
    return HFLM(pretrained=model, tokenizer=tokenizer, dtype="float32", device="cpu",
                batch_size=batch_size)

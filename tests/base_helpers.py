"""Shared by the fine-tuning and alignment tests (tests/ is on sys.path): JSONL record
files, and a tiny pretrained GPT-2 folder (random weights, a BPE tokenizer with
ChatML's special tokens) for the commands to start from."""

from __future__ import annotations

import json

import tinylm
from tinylm.models import Decoder, GPT2Config
from tinylm.tokenizers.bpe import BPETokenizer

TEXT = ("the cat sat on a mat and the dog ran to see what it was, then both went home for "
        "tea.\n") * 20


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def tiny_base(path, vocab: int = 300, d_model: int = 32, n_layer: int = 2,
              dropout: float = 0.0):
    """A model folder at ``path`` (seed 0): GPT-2 with 4 heads and 64 positions, and its
    tokenizer.json of ``vocab`` tokens trained on TEXT."""
    tok = BPETokenizer.train([TEXT], vocab,
                             special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tinylm.seed(0)
    model = Decoder(GPT2Config(vocab_size=len(tok), d_model=d_model, n_layer=n_layer,
                               n_head=4, max_positions=64, dropout=dropout))
    model.save_pretrained(path)
    tok.save(path / "tokenizer.json")
    return path

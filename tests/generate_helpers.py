"""A tiny GPT-2 saved as a Hugging Face folder, for the `tinylm generate` and chat tests."""

from __future__ import annotations

import tinylm
from tinylm.models import Decoder, GPT2Config
from tinylm.tokenizers.bpe import BPETokenizer


def tiny_hf_gpt(path, text: str, max_positions: int = 64):
    """(path, model, tokenizer): a random 2-layer GPT-2 and a 300-token BPE (with
    <|endoftext|>) trained on ``text``, saved into ``path``."""
    tok = BPETokenizer.train([text], 300, special_tokens=["<|endoftext|>"])
    tinylm.seed(0)
    model = Decoder(GPT2Config(vocab_size=len(tok), d_model=32, n_layer=2, n_head=4,
                               max_positions=max_positions))
    model.save_pretrained(path)
    tok.save(path / "tokenizer.json")
    return path, model, tok

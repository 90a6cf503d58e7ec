"""Shared by the preference and reward tests (tests/ is on sys.path): a small chat
corpus and a byte-level BPE tokenizer trained on it with ChatML's special tokens and a
pad token. Import the fixtures by name (``from chat_helpers import tok, tok_file``)."""

from __future__ import annotations

import pytest

TEXT = ("the cat sat on a mat and the dog ran to see what it was, then both went home for "
        "tea. Hello there! How are you? I am fine.\n") * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory):
    from tinylm.tokenizers.bpe import BPETokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    BPETokenizer.train([TEXT], 400, special_tokens=SPECIALS).save(path)
    return path


@pytest.fixture(scope="module")
def tok(tok_file):
    from tinylm.tokenizers import from_file

    return from_file(tok_file)

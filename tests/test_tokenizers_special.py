"""What every tokenizer shares about special tokens: ``special_ids`` and
``decode(ids, skip_special_tokens=True)`` (char, BPE, WordPiece, and the base class a
plugin tokenizer inherits)."""

from __future__ import annotations

import numpy as np
import pytest

from tinylm.tokenizers import (
    BPETokenizer, CharTokenizer, Tokenizer, TokenizerError, WordPieceTokenizer,
)

EOT = "<|endoftext|>"


def _char():
    return CharTokenizer.train("hello world", special_tokens=[EOT, "<pad>"])


def _bpe():
    return BPETokenizer.train("hello world " * 20, vocab_size=270, special_tokens=[EOT, "<pad>"])


def _wordpiece():
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "##s", "!"]
    return WordPieceTokenizer(vocab)


class _Bytes(Tokenizer):
    """A minimal plugin-style subclass: one id per byte, specials after 255, and only
    ``decode_bytes`` of its own (``decode`` is the base class's)."""

    name = "bytes-test"

    def __init__(self):
        self.special_tokens = {EOT: 256}

    def encode(self, text, *, allowed_special=(), disallowed_special="all"):
        return self._encode_with_specials(text, allowed_special, disallowed_special,
                                          lambda t: list(t.encode()))

    def decode_bytes(self, ids, *, skip_special_tokens=False):
        ids = self.without_special_ids(ids) if skip_special_tokens else list(ids)
        return b"".join(EOT.encode() if i == 256 else bytes([i]) for i in ids)

    vocab_size = 257

    def token_to_id(self, token):
        return self.special_tokens.get(token)

    def id_to_token(self, id):
        return None

    def save(self, path, format=None):
        raise NotImplementedError

    @classmethod
    def load(cls, path):
        raise NotImplementedError


MAKERS = {"char": _char, "bpe": _bpe, "wordpiece": _wordpiece, "base": _Bytes}


@pytest.fixture(params=list(MAKERS))
def tok(request):
    return MAKERS[request.param]()


def _specials_text(tok):
    return "" if isinstance(tok, WordPieceTokenizer) else EOT


def test_special_ids_are_the_special_tokens_ids(tok):
    assert isinstance(tok.special_ids, frozenset)
    assert tok.special_ids == frozenset(tok.special_tokens.values())
    assert tok.special_ids  # every tokenizer above has some


def test_skip_special_tokens_drops_exactly_the_special_ids(tok):
    kwargs = {"add_special_tokens": True} if isinstance(tok, WordPieceTokenizer) else {}
    text = "hello world"
    ids = tok.encode(f"{text}{_specials_text(tok)}", allowed_special="all", **kwargs)
    assert set(ids) & tok.special_ids, "the ids must contain a special token for this test"
    kept = tok.decode(ids, skip_special_tokens=True)
    assert kept == text
    assert tok.decode(ids) != text  # by default the special tokens are decoded as text
    assert tok.decode(np.array(ids), skip_special_tokens=True) == text
    assert tok.decode_batch([ids, ids], skip_special_tokens=True) == [text, text]
    if not isinstance(tok, WordPieceTokenizer):
        assert tok.decode_bytes(ids, skip_special_tokens=True) == text.encode()


def test_only_special_ids_decode_to_nothing(tok):
    assert tok.decode(sorted(tok.special_ids), skip_special_tokens=True) == ""


@pytest.mark.parametrize("kind", ["char", "bpe", "wordpiece"])  # the test subclass checks none
def test_out_of_range_ids_are_still_an_error_when_skipping(kind):
    tok = MAKERS[kind]()
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        tok.decode([0, tok.vocab_size + 5], skip_special_tokens=True)


def test_char_unk_token_is_special_and_skipped():
    tok = CharTokenizer.train("abc", unk_token="<unk>")
    ids = tok.encode("azb")
    assert tok.decode(ids) == "a<unk>b"
    assert tok.decode(ids, skip_special_tokens=True) == "ab"

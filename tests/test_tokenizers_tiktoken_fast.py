"""Byte-level BPE with GPT-2's pattern: ids identical to tiktoken built with the split
pattern tiktoken itself ships for GPT-2 (``r50k_pat_str`` in tiktoken_ext/openai_public.py:
possessive, ``\\s++$|\\s+(?!\\S)|\\s`` at the end, the spelling bench/tokenizers.py
measures against), on tinyshakespeare, multilingual text and random text, for a fresh
tokenizer (cold piece cache) and the same one again (warm)."""

from __future__ import annotations

import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinylm.commands.tokenize import default_corpus
from tinylm.tokenizers import BPETokenizer

from corpora import BPE_VOCAB, SHAKESPEARE

MULTILINGUAL = ("Héllo wörld! Ça va? Ελληνικά Русский 中文字符 한국어 ١٢٣ ½ 😀👍🏽 "
                "tabs\tand\nnewlines\r\n\n   spaces   . \t\t  \n  x don't I'M 3.14 $5 ~z  \n")
# Characters tiktoken's Unicode tables know too (see tests/test_tokenizers_bpe.py).
PEER_TEXT = st.text(st.characters(exclude_categories=("Cs", "Cn")), max_size=40)
ASCII_TEXT = (st.text(st.characters(max_codepoint=127), max_size=60)
              | st.text(st.sampled_from(list(" \t\n\r\x0b\x0c'sdtlvmre19aZ.,!")), max_size=30))


def _fast_pattern() -> str:
    return pytest.importorskip("tiktoken_ext.openai_public").r50k_pat_str


@functools.lru_cache(maxsize=4)
def fast_tiktoken(tok: BPETokenizer):
    tiktoken = pytest.importorskip("tiktoken")
    return tiktoken.Encoding("tinylm-fast", pat_str=_fast_pattern(),
                             mergeable_ranks=tok.to_tiktoken_ranks(), special_tokens={})


@pytest.fixture(scope="module")
def shakespeare_text() -> str:
    return SHAKESPEARE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def shakespeare_tok(shakespeare_text) -> BPETokenizer:
    return BPETokenizer.train(shakespeare_text, BPE_VOCAB, pattern="gpt2")


@pytest.fixture(scope="module")
def multi_tok() -> BPETokenizer:
    return BPETokenizer.train(default_corpus() + MULTILINGUAL * 30, 1500, pattern="gpt2")


def fresh(tok: BPETokenizer) -> BPETokenizer:
    """The same vocabulary with an empty piece cache."""
    return BPETokenizer(tok._tokens, tok.merges, tok.special_tokens, pattern=tok.pattern)


def test_the_fast_pattern_is_not_ours_verbatim():
    """The check below would be empty if tinylm's pattern were tiktoken's spelling."""
    assert _fast_pattern() != BPETokenizer.train("ab ab", 257).pattern


def test_whole_tinyshakespeare_cold_and_warm(shakespeare_tok, shakespeare_text):
    enc = fast_tiktoken(shakespeare_tok)
    expected = enc.encode_ordinary(shakespeare_text)
    tok = fresh(shakespeare_tok)
    assert tok.encode_ordinary(shakespeare_text) == expected  # cold: every piece new
    assert tok.encode_ordinary(shakespeare_text) == expected  # warm: every piece cached


def test_multilingual_text(multi_tok):
    enc = fast_tiktoken(multi_tok)
    for text in (MULTILINGUAL, MULTILINGUAL * 3, " " + MULTILINGUAL[::-1], "\n\n\n", "  a",
                 "a  ", " \n", "x\t \t"):
        assert fresh(multi_tok).encode_ordinary(text) == enc.encode_ordinary(text), repr(text)


@settings(max_examples=150)
@given(text=PEER_TEXT | ASCII_TEXT)
def test_random_text(multi_tok, text):
    assert multi_tok.encode_ordinary(text) == fast_tiktoken(multi_tok).encode_ordinary(text)

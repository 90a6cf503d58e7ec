"""Character-level tokenizer: nanoGPT's vocabulary, round trips, unknown characters,
special tokens, its file format and errors."""

from __future__ import annotations


import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinylm import plugins
from tinylm.tokenizers import CharTokenizer, TokenizerError, TokenizerFileError, from_file

from corpora import FULL, IS_FULL, SHAKESPEARE, SLICE, SLICE_LINES  # tinyshakespeare or its slice

TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=50)


def test_nanogpt_vocabulary_on_tinyshakespeare():
    text = SHAKESPEARE.read_text(encoding="utf-8")
    tok = CharTokenizer.train_from_files([SHAKESPEARE])
    chars = sorted(set(text))  # exactly nanoGPT's prepare.py
    assert tok.vocab_size == len(chars) == (65 if IS_FULL else 59)  # the slice lacks 6
    assert tok.encode("\n ") == [0, 1]
    assert tok.encode(text[:1000]) == [chars.index(c) for c in text[:1000]]
    assert tok.decode(tok.encode(text)) == text


def test_the_slice_is_the_head_of_the_corpus():
    head = SLICE.read_bytes()
    assert 0 < len(head) < 100_000 and head.count(b"\n") == SLICE_LINES
    if FULL.exists():  # where the full corpus is, the slice is its first lines
        assert FULL.read_bytes().startswith(head)


@given(text=TEXT)
def test_round_trip_any_text(text):
    tok = CharTokenizer.train(text or "x")
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode_bytes(tok.encode(text)) == text.encode("utf-8")
    assert tok.chars == sorted(set(text or "x"))


def test_unknown_character_is_an_error_unless_there_is_an_unk_token():
    tok = CharTokenizer.train("abc")
    with pytest.raises(TokenizerError, match="'z' \\(at 1\\) is not in the vocabulary"):
        tok.encode("az")
    with_unk = CharTokenizer.train("abc", unk_token="<unk>")
    assert with_unk.encode("az") == [0, 3]
    assert with_unk.decode([0, 3]) == "a<unk>"


def test_vocab_size_keeps_the_most_frequent():
    tok = CharTokenizer.train("aaabbc", vocab_size=3, unk_token="?")
    assert tok.chars == ["a", "b"] and tok.encode("abc") == [0, 1, 2]
    with pytest.raises(TokenizerError, match="unk_token"):
        CharTokenizer.train("aaabbc", vocab_size=2)


def test_special_tokens():
    tok = CharTokenizer.train("hello", special_tokens=["<|endoftext|>"])
    eot = tok.special_tokens["<|endoftext|>"]
    assert eot == 4  # after the characters e, h, l, o
    with pytest.raises(TokenizerError, match="allowed_special"):
        tok.encode("hello<|endoftext|>")
    assert tok.encode("hello<|endoftext|>", allowed_special="all")[-1] == eot
    assert tok.decode([eot]) == "<|endoftext|>"


def test_errors():
    tok = CharTokenizer.train("abc")
    with pytest.raises(TokenizerError, match="lone surrogate"):
        tok.encode("a\ud800")
    with pytest.raises(TokenizerError, match="lone surrogate"):
        CharTokenizer.train("a\udc80")
    with pytest.raises(TokenizerError, match="id 3"):
        tok.decode([0, 3])
    with pytest.raises(TokenizerError, match="id -1"):
        tok.decode([-1])
    with pytest.raises(TokenizerError, match="twice"):
        CharTokenizer("aba")
    with pytest.raises(TokenizerError, match="single characters"):
        CharTokenizer(["ab"])
    with pytest.raises(TokenizerError, match="only in the 'tinylm' format"):
        tok.save("x.json", format="hf")


def test_registered_under_char():
    assert plugins.get_tokenizer_class("char") is CharTokenizer


def test_file_round_trip_and_corruption(tmp_path):
    tok = CharTokenizer.train("hé\n\u2028😀 \"q\"\\", special_tokens=["<s>"], unk_token="<s>")
    tok.save(tmp_path / "c.tok")
    loaded = from_file(tmp_path / "c.tok")
    assert isinstance(loaded, CharTokenizer)
    assert loaded.chars == tok.chars and loaded.special_tokens == tok.special_tokens
    assert loaded.encode("hé😀z") == tok.encode("hé😀z")
    text = (tmp_path / "c.tok").read_text(encoding="utf-8")
    for name, broken in {"cut.tok": text[:-12], "two.tok": text.replace('"h"', '"hh"'),
                         "dup.tok": text.replace('"h"', '"e"' if '"e"' in text else '" "'),
                         "json.tok": text.replace('"h"', "h")}.items():
        (tmp_path / name).write_text(broken, encoding="utf-8")
        with pytest.raises(TokenizerFileError, match=name):
            from_file(tmp_path / name)

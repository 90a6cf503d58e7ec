"""Byte-level BPE: ids identical to tiktoken and Hugging Face ``tokenizers`` on the same
vocabulary, merges identical to ``tokenizers``' trainer, round trips for any text and
any bytes, special tokens, the file formats, and a clear error for every bad input."""

from __future__ import annotations

import functools
import json
import re
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinylm import plugins
from tinylm.commands.tokenize import default_corpus
from tinylm.tokenizers import (
    BPETokenizer, PreTokenizer, TokenizerError, TokenizerFileError, from_file,
)
from tinylm.tokenizers.formats import to_bytelevel
from tinylm.tokenizers.pretokenize import GPT2_PATTERN, GPT4_PATTERN, hf_pattern

from corpora import BPE_VOCAB, SHAKESPEARE  # the full tinyshakespeare, or its slice in tests/data


MULTILINGUAL = (
    "Héllo wörld! Ça va? naïve café — ÆØÅ æøå. Ελληνικά ΟΔΟΣ. Русский текст, ёж. "
    "中文字符测试，日本語のテキスト、한국어 텍스트。 12345 3.14159 1,000,000 ١٢٣ ½ ² ⅷ "
    "emoji 😀👍🏽👨‍👩‍👧 🇫🇷✨ tabs\tand\nnewlines\r\n\n   spaces   . \t\t  \n  x "
    "İstanbul ǅ ß ﬁ e\u0301 a\u0308 zero\u200bwidth\u200d नमस्ते العربية עברית "
    "don't I'm we're they've it's IT'S Y'ALL \"quotes\" (parens) $5 +1 <a> ^_^ ~z  \n"
)

# Characters the peers' Unicode tables know too: a character assigned after the
# Unicode version of tiktoken's and tokenizers' regex engines can be a letter for the
# `regex` module and not for them (docs/tokenizers.md), so random text avoids those.
PEER_TEXT = st.text(st.characters(exclude_categories=("Cs", "Cn")), max_size=40)


def _tokenizers():
    return pytest.importorskip("tokenizers")


def _tiktoken():
    return pytest.importorskip("tiktoken")


@functools.lru_cache(maxsize=8)
def hf_from(tok: BPETokenizer):
    """A Hugging Face tokenizer built from tinylm's export of ``tok``."""
    return _tokenizers().Tokenizer.from_str(json.dumps(tok.to_hf_dict()))


@functools.lru_cache(maxsize=8)
def tiktoken_from(tok: BPETokenizer):
    """A tiktoken Encoding on ``tok``'s vocabulary (its public constructor)."""
    return _tiktoken().Encoding("tinylm-test", pat_str=tok.pattern,
                                mergeable_ranks=tok.to_tiktoken_ranks(),
                                special_tokens=tok.special_tokens)


def hf_trained(vocab_size, *, files=None, texts=None, pattern="gpt2", min_frequency=2,
               special_tokens=()):
    """``tokenizers``' byte-level BPE trainer with the full byte alphabet."""
    tk = _tokenizers()
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

    hf = tk.Tokenizer(models.BPE())
    if pattern == "gpt2":
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(hf_pattern(pattern)), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    if files is not None:
        hf.train([str(f) for f in files], trainer)
    else:
        hf.train_from_iterator(texts, trainer)
    return hf


@pytest.fixture(scope="module")
def corpus() -> str:
    """Training text every machine has, with some of every script MULTILINGUAL uses."""
    return default_corpus() + MULTILINGUAL * 30


@pytest.fixture(scope="module", params=["gpt2", "gpt4"])
def multi_tok(request, corpus) -> BPETokenizer:
    return BPETokenizer.train(corpus, 1500, pattern=request.param,
                              special_tokens=["<|endoftext|>", "<|fim|>"])


@pytest.fixture(scope="module")
def shakespeare_text() -> str:
    return SHAKESPEARE.read_text(encoding="utf-8")


@pytest.fixture(scope="module", params=["gpt2", "gpt4"])
def shakespeare_tok(request, shakespeare_text) -> BPETokenizer:
    return BPETokenizer.train_from_files([SHAKESPEARE], BPE_VOCAB, pattern=request.param)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_merges_on_tinyshakespeare_equal_huggingface_trainer(pattern):
    ours = BPETokenizer.train_from_files([SHAKESPEARE], BPE_VOCAB, min_frequency=2,
                                         pattern=pattern)
    theirs = json.loads(hf_trained(BPE_VOCAB, files=[SHAKESPEARE],
                                   pattern=pattern).to_str())["model"]
    assert len(ours.merges) == BPE_VOCAB - 256
    assert ours.to_hf_dict()["model"]["merges"] == theirs["merges"]
    assert ours.get_vocab() == theirs["vocab"]


def test_training_from_an_iterator_with_special_tokens_equals_huggingface(corpus):
    lines = corpus.splitlines(keepends=True)
    ours = BPETokenizer.train(lines, 700, min_frequency=3, special_tokens=["<pad>", "<|eot|>"])
    hf = hf_trained(700, texts=lines, min_frequency=3, special_tokens=["<pad>", "<|eot|>"])
    theirs = json.loads(hf.to_str())["model"]
    assert ours.to_hf_dict()["model"]["merges"] == theirs["merges"]
    assert ours.get_vocab() == theirs["vocab"]
    assert ours.special_tokens == {"<pad>": 0, "<|eot|>": 1}  # first, as tokenizers does


@settings(max_examples=30)
@given(words=st.lists(st.text("abc ", min_size=1, max_size=9), min_size=1, max_size=20),
       picks=st.lists(st.integers(0, 19), min_size=1, max_size=60),
       vocab_size=st.integers(257, 290), min_frequency=st.integers(0, 3))
def test_merges_on_random_corpora_equal_huggingface_trainer(words, picks, vocab_size,
                                                           min_frequency):
    """Small alphabets make many ties: the tie-breaking rule is what is tested here."""
    texts = [" ".join(words[k % len(words)] for k in picks[i::3]) for i in range(3)]
    ours = BPETokenizer.train(texts, vocab_size, min_frequency=min_frequency)
    theirs = json.loads(hf_trained(vocab_size, texts=texts,
                                   min_frequency=min_frequency).to_str())["model"]
    assert ours.to_hf_dict()["model"]["merges"] == theirs["merges"]
    assert ours.get_vocab() == theirs["vocab"]


def test_min_frequency_stops_training_early():
    tok = BPETokenizer.train("ab ab ab cd", 1000, min_frequency=2)
    assert [tok.id_to_token(i) for i in range(256, tok.vocab_size)] == ["ab", "Ġab"]
    assert len(BPETokenizer.train("ab ab ab cd", 1000, min_frequency=4).merges) == 0


def test_training_never_merges_across_special_tokens():
    tok = BPETokenizer.train("ab<|x|>ab<|x|>" * 20, 300, special_tokens=["<|x|>"])
    assert "<|" not in {tok.id_to_token(i)[:2] for i in range(257, tok.vocab_size)}
    assert tok.encode("ab<|x|>", allowed_special="all") == [tok.token_to_id("ab"), 0]


@pytest.mark.parametrize("bad, message", [
    (dict(vocab_size=100), "too small"),
    (dict(vocab_size="4096"), "vocab_size"),
    (dict(vocab_size=300, min_frequency=-1), "min_frequency"),
    (dict(vocab_size=300, special_tokens="<s>"), "list of strings"),
    (dict(vocab_size=300, special_tokens=[""]), "non-empty"),
    (dict(vocab_size=300, pattern="(unclosed"), "not a valid regular expression"),
])
def test_bad_training_arguments(bad, message):
    with pytest.raises(TokenizerError, match=message):
        BPETokenizer.train("some text", **bad)


def test_training_input_errors(tmp_path):
    with pytest.raises(TokenizerError, match="iterable of str"):
        BPETokenizer.train(b"bytes", 300)
    with pytest.raises(TokenizerError, match="takes a str"):
        BPETokenizer.train(["ok", 3], 300)
    with pytest.raises(TokenizerError, match="surrogate"):
        BPETokenizer.train(["bad \ud800"], 300)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"ok\ncaf\xe9\n")
    with pytest.raises(TokenizerError, match="latin1.txt.*line 2 is not valid UTF-8"):
        BPETokenizer.train_from_files([bad], 300)
    with pytest.raises(TokenizerFileError, match="does not exist"):
        BPETokenizer.train_from_files([tmp_path / "missing.txt"], 300)


# --------------------------------------------------------------------------- parity


def test_whole_tinyshakespeare_ids_equal_tiktoken_and_huggingface(shakespeare_tok,
                                                                  shakespeare_text):
    ids = shakespeare_tok.encode(shakespeare_text)
    assert ids == tiktoken_from(shakespeare_tok).encode_ordinary(shakespeare_text)
    assert ids == hf_from(shakespeare_tok).encode(shakespeare_text).ids
    assert shakespeare_tok.decode(ids) == shakespeare_text
    assert len(ids) < len(shakespeare_text) / 3  # it does compress


def test_huggingface_trained_tokenizer_json_encodes_as_huggingface(tmp_path, shakespeare_text):
    hf = hf_trained(2000, files=[SHAKESPEARE])
    hf.save(str(tmp_path / "tokenizer.json"))
    ours = from_file(tmp_path / "tokenizer.json")
    sample = shakespeare_text[:200_000] + MULTILINGUAL
    assert ours.encode(sample) == hf.encode(sample).ids


def test_multilingual_ids_equal_tiktoken_and_huggingface(multi_tok):
    for text in (MULTILINGUAL, MULTILINGUAL * 3, " " + MULTILINGUAL[::-1], "\n\n\n", "  a"):
        ids = multi_tok.encode(text)
        assert ids == tiktoken_from(multi_tok).encode_ordinary(text), text
        assert ids == hf_from(multi_tok).encode(text).ids, text
        assert multi_tok.decode(ids) == text


@settings(max_examples=150)
@given(text=PEER_TEXT)
def test_random_text_ids_equal_tiktoken_and_huggingface(multi_tok, text):
    ids = multi_tok.encode(text, allowed_special="all")
    assert ids == tiktoken_from(multi_tok).encode(text, allowed_special="all")
    assert ids == hf_from(multi_tok).encode(text).ids


def test_special_tokens_match_tiktoken_and_huggingface(multi_tok):
    text = "<|endoftext|>Hello<|fim|> world<|endoftext|><|endoftext|>x<|fim"
    ids = multi_tok.encode(text, allowed_special="all")
    assert ids == tiktoken_from(multi_tok).encode(text, allowed_special="all")
    assert ids == hf_from(multi_tok).encode(text).ids
    assert ids[0] == multi_tok.special_tokens["<|endoftext|>"]
    assert multi_tok.decode(ids) == text


@settings(max_examples=60)
@given(ids=st.lists(st.integers(0, 1499), max_size=12))
def test_decode_of_any_ids_equals_tiktoken(multi_tok, ids):
    """Partial UTF-8 becomes U+FFFD exactly as tiktoken's decode makes it."""
    enc = tiktoken_from(multi_tok)
    assert multi_tok.decode(ids) == enc.decode(ids)
    assert multi_tok.decode_bytes(ids) == enc.decode_bytes(ids)


def test_decode_of_a_cut_multibyte_character():
    tok = BPETokenizer.train("x", 300)  # no merges: one id per byte
    ids = tok.encode("é😀")  # 2 + 4 bytes
    assert len(ids) == 6
    assert tok.decode(ids[:3]) == "é\ufffd"
    assert tok.decode(ids[1:]) == "\ufffd😀"
    assert tok.decode_bytes(ids[:3]) == "é😀".encode()[:3]


def test_ranks_mode_follows_tiktoken():
    """tiktoken's rules: a piece that is a token is that token even if no merges reach
    it ("xyz" here), and any two tokens that concatenate to a token merge."""
    tiktoken = _tiktoken()
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({b"bc": 256, b"ab": 257, b"abc": 258, b"abcd": 259, b"cd": 260, b"xyz": 261})
    tok = BPETokenizer.from_tiktoken_ranks(ranks, pattern="gpt2")
    enc = tiktoken.Encoding("t", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})
    for text in ["abc", "abcd", "xabcdabcab", "bcd abcd", "dabc", "xyz", "xyzxyz", " xyz"]:
        assert tok.encode(text) == enc.encode_ordinary(text), text
    assert tok.encode("xyz") == [261]
    assert (261,) not in [tuple(m) for m in tok.merges]  # unreachable: no merge makes it


# --------------------------------------------------------------------------- pre-tokenizer


@settings(max_examples=200)
@given(text=st.text(st.characters(max_codepoint=127), max_size=40)
       | st.text(st.sampled_from(list(" \t\n\r\x0b\x0c'sSdDtTlLvVeErRmM1234aZ.,!-")), max_size=20))
def test_ascii_fast_path_splits_like_the_unicode_pattern(text):
    for pattern in ("gpt2", "gpt4"):
        pre = PreTokenizer(pattern)
        assert pre._ascii.findall(text) == pre._regex.findall(text)


def test_patterns_split_as_documented():
    assert PreTokenizer("gpt2").split("I'm 12345 x  \n\n") == ["I", "'m", " 12345", " x",
                                                               "  \n\n"]
    assert PreTokenizer("gpt4").split("I'M 12345 x  \n\n") == ["I", "'M", " ", "123", "45",
                                                               " x", "  \n\n"]
    assert PreTokenizer("cl100k").pattern == GPT4_PATTERN


@given(text=st.text(max_size=30))
def test_a_user_pattern_keeps_what_it_does_not_match(text):
    assert "".join(PreTokenizer(r"\w+").split(text)) == text
    assert "".join(PreTokenizer(r"(a)|(b)|\s").split(text)) == text  # groups are fine


# --------------------------------------------------------------------------- round trips


@given(text=st.text(st.characters(exclude_categories=("Cs",)), max_size=60))
def test_decode_encode_round_trips_any_text(multi_tok, text):
    assert multi_tok.decode(multi_tok.encode(text, allowed_special="all")) == text
    assert multi_tok.decode(multi_tok.encode_ordinary(text)) == text


@given(data=st.binary(max_size=60))
def test_bytes_round_trip_through_the_byte_level_path(multi_tok, data):
    ids = multi_tok.encode_bytes(data)
    assert multi_tok.decode_bytes(ids) == data
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    assert ids == multi_tok.encode_ordinary(text)


def test_empty_and_whitespace_only(multi_tok):
    assert multi_tok.encode("") == [] and multi_tok.decode([]) == ""
    assert multi_tok.decode_bytes([]) == b""
    assert multi_tok.decode(multi_tok.encode(" \t\n\r\x00\x7f")) == " \t\n\r\x00\x7f"


def test_long_pieces_merge_like_short_ones(multi_tok):
    """Pieces of 64+ bytes use a heap instead of a scan; same result, n log n."""
    word = "Hello" * 200 + "中文" * 50
    ids = [multi_tok._byte_ids[b] for b in word.encode()]
    assert multi_tok._merge_long(list(ids)) == multi_tok._merge(list(ids))
    enc = tiktoken_from(multi_tok)
    for text in (" " * 10_000, "a" * 5_000, "x" + "é" * 3000):
        assert multi_tok.encode(text) == enc.encode_ordinary(text)


@settings(max_examples=60)
@given(data=st.binary(min_size=64, max_size=200))
def test_heap_merge_equals_scan_merge(multi_tok, data):
    ids = [multi_tok._byte_ids[b] for b in data]
    assert multi_tok._merge_long(list(ids)) == multi_tok._merge(list(ids))


@settings(max_examples=40)
@given(pieces=st.lists(st.binary(min_size=1, max_size=63), min_size=1, max_size=60))
def test_vectorized_merge_equals_scan_merge(multi_tok, pieces):
    """New pieces are merged all at once with NumPy; same ids as one by one."""
    def scan(tok, piece):
        ids = [tok._byte_ids[b] for b in piece]
        return tuple(tok._merge(ids) if len(ids) > 1 else ids)

    assert multi_tok._merge_batch(pieces) == [scan(multi_tok, p) for p in pieces]
    ranks_mode = BPETokenizer.from_tiktoken_ranks(multi_tok.to_tiktoken_ranks())
    assert ranks_mode._merge_batch(pieces) == [scan(ranks_mode, p) for p in pieces]


def test_cold_and_warm_cache_give_the_same_ids(multi_tok, corpus):
    fresh = BPETokenizer(multi_tok._tokens, multi_tok.merges, multi_tok.special_tokens,
                         pattern=multi_tok.pattern)
    text = corpus[:100_000]
    cold = fresh.encode(text)  # thousands of new pieces: the vectorized path
    assert cold == fresh.encode(text) == multi_tok.encode(text)
    long = "x" * 300 + " " * 500 + "y"  # pieces over 256 characters are not kept
    assert fresh.decode(fresh.encode(long)) == long
    assert not any(len(piece) > 256 for piece in fresh._cache)


def test_pickle_and_threads(multi_tok):
    import pickle
    from concurrent.futures import ThreadPoolExecutor

    again = pickle.loads(pickle.dumps(multi_tok))
    assert again.encode(MULTILINGUAL) == multi_tok.encode(MULTILINGUAL)
    texts = [MULTILINGUAL[k:] + str(k) * 50 for k in range(40)]
    fresh = pickle.loads(pickle.dumps(multi_tok))  # an empty cache, filled by 4 threads
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(fresh.encode, texts)) == [multi_tok.encode(t) for t in texts]


def test_encode_batch(multi_tok):
    texts = ["a b", "", MULTILINGUAL]
    assert multi_tok.encode_batch(texts) == [multi_tok.encode(t) for t in texts]
    with pytest.raises(TokenizerError, match="list of strings"):
        multi_tok.encode_batch("not a list")


# --------------------------------------------------------------------------- special tokens


def test_text_containing_a_special_token_is_refused_unless_allowed(multi_tok):
    eot = multi_tok.special_tokens["<|endoftext|>"]
    with pytest.raises(TokenizerError, match="<\\|endoftext\\|>.*allowed_special"):
        multi_tok.encode("a<|endoftext|>b")
    assert multi_tok.encode("a<|endoftext|>b", allowed_special={"<|endoftext|>"}) == [
        *multi_tok.encode("a"), eot, *multi_tok.encode("b")]
    plain = multi_tok.encode("a<|endoftext|>b", disallowed_special=())
    assert eot not in plain and multi_tok.decode(plain) == "a<|endoftext|>b"
    with pytest.raises(TokenizerError, match="<\\|fim\\|>"):  # allowed one, not the other
        multi_tok.encode("<|endoftext|><|fim|>", allowed_special={"<|endoftext|>"})
    assert multi_tok.encode_ordinary("<|fim|>") == multi_tok.encode("<|fim|>",
                                                                    disallowed_special=())


def test_special_tokens_are_never_split_or_merged(multi_tok):
    eot, fim = multi_tok.special_tokens["<|endoftext|>"], multi_tok.special_tokens["<|fim|>"]
    ids = multi_tok.encode("<|endoftext|><|fim|><|endoftext|>", allowed_special="all")
    assert ids == [eot, fim, eot]
    assert multi_tok.decode([eot]) == "<|endoftext|>"


@pytest.mark.parametrize("kwargs, message", [
    (dict(allowed_special={"<|nope|>"}), "not special tokens of this tokenizer"),
    (dict(allowed_special="everything"), "\"all\" or a collection"),
    (dict(disallowed_special=5), "\"all\" or a collection"),
])
def test_bad_special_arguments(multi_tok, kwargs, message):
    with pytest.raises(TokenizerError, match=message):
        multi_tok.encode("x", **kwargs)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("text", ["\ud800", "ok \udfff then", "\udc80"])
def test_lone_surrogates_are_a_clear_error(multi_tok, text):
    with pytest.raises(TokenizerError, match="lone surrogate .* at character"):
        multi_tok.encode(text)


@pytest.mark.parametrize("ids, message", [
    ([1, 10**9], "id 1000000000 .* not in the vocabulary"),
    ([-1], "id -1"),
    ([1.5], "must be integers"),
    (["3"], "must be integers"),
    ([None], "must be integers"),
    ("123", "sequence of integer ids"),
    (7, "sequence of integer ids"),
])
def test_bad_ids_are_a_clear_error(multi_tok, ids, message):
    with pytest.raises(TokenizerError, match=message):
        multi_tok.decode(ids)


def test_numpy_ids_decode():
    np = pytest.importorskip("numpy")
    tok = BPETokenizer.train("hello hello", 260)
    ids = tok.encode("hello")
    assert tok.decode(np.array(ids)) == "hello"
    assert tok.decode(tuple(ids)) == "hello"
    with pytest.raises(TokenizerError, match="1-D"):
        tok.decode(np.array([ids, ids]))


@pytest.mark.parametrize("value", [b"bytes", None, 3, ["a"]])
def test_encode_takes_only_str(multi_tok, value):
    with pytest.raises(TokenizerError, match="takes a str"):
        multi_tok.encode(value)


def test_encode_bytes_takes_only_bytes(multi_tok):
    with pytest.raises(TokenizerError, match="takes bytes"):
        multi_tok.encode_bytes("text")


def test_constructor_checks():
    with pytest.raises(TokenizerError, match="256 bytes"):
        BPETokenizer({0: b"a"}, [])
    tokens = [bytes([b]) for b in range(256)]
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        BPETokenizer(tokens, [(97, 98)])
    with pytest.raises(TokenizerError, match="not an ordinary token"):
        BPETokenizer(tokens, [(97, 999)])


# --------------------------------------------------------------------------- formats


def test_tinylm_format_round_trip(tmp_path, multi_tok):
    path = tmp_path / "tok.bpe"
    multi_tok.save(path)
    assert path.read_text(encoding="utf-8").startswith("tinylm-tokenizer bpe 1\n")
    for loaded in (BPETokenizer.load(path), from_file(path)):
        assert loaded.get_vocab() == multi_tok.get_vocab()
        assert loaded.merges == multi_tok.merges
        assert loaded.pattern == multi_tok.pattern
        assert loaded.encode(MULTILINGUAL) == multi_tok.encode(MULTILINGUAL)


def test_huggingface_json_round_trip(tmp_path, multi_tok):
    path = tmp_path / "tokenizer.json"
    multi_tok.save(path)  # .json -> Hugging Face format
    hf = _tokenizers().Tokenizer.from_file(str(path))
    assert hf.encode(MULTILINGUAL).ids == multi_tok.encode(MULTILINGUAL)
    assert hf.decode(multi_tok.encode(MULTILINGUAL)) == MULTILINGUAL
    loaded = from_file(path)
    assert isinstance(loaded, BPETokenizer)
    assert loaded.encode(MULTILINGUAL) == multi_tok.encode(MULTILINGUAL)
    assert loaded.special_tokens == multi_tok.special_tokens


def test_add_prefix_space_from_a_tokenizer_json(multi_tok):
    obj = multi_tok.to_hf_dict()
    obj["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": True,
                            "trim_offsets": True, "use_regex": True}
    tok = BPETokenizer.from_hf_json(obj)
    hf = _tokenizers().Tokenizer.from_str(json.dumps(obj))
    for text in ("Hello", " Hello", "a<|fim|>b", "", "\nx"):
        assert tok.encode(text, allowed_special="all") == hf.encode(text).ids, text


def test_gpt2_vocab_and_merges_files(tmp_path, corpus):
    hf = hf_trained(800, texts=[corpus], special_tokens=["<|endoftext|>"])
    hf.model.save(str(tmp_path))  # vocab.json + merges.txt, as GPT-2 ships them
    tok = from_file(tmp_path / "vocab.json")
    assert tok.special_tokens == {"<|endoftext|>": 0}
    assert tok.encode(MULTILINGUAL) == hf.encode(MULTILINGUAL).ids
    out = tmp_path / "again"
    out.mkdir()
    tok.save(out, format="gpt2")
    assert (out / "merges.txt").read_text(encoding="utf-8") == (
        tmp_path / "merges.txt").read_text(encoding="utf-8")
    assert json.loads((out / "vocab.json").read_text(encoding="utf-8")) == json.loads(
        (tmp_path / "vocab.json").read_text(encoding="utf-8"))


def test_tiktoken_ranks_file_round_trip(tmp_path, multi_tok):
    path = tmp_path / "tok.tiktoken"
    multi_tok.save(path, format="tiktoken")
    tok = from_file(path, special_tokens=multi_tok.special_tokens, pattern=multi_tok.pattern)
    assert tok.mode == "ranks" and tok.ignore_merges
    assert tok.encode(MULTILINGUAL) == multi_tok.encode(MULTILINGUAL)
    # the merges a ranks file implies are the ones that were learned
    assert tok.merges == multi_tok.merges
    enc = tiktoken_from(tok)
    assert tok.encode(MULTILINGUAL) == enc.encode_ordinary(MULTILINGUAL)


def test_ranks_mode_saves_and_exports(tmp_path, multi_tok):
    tok = BPETokenizer.from_tiktoken_ranks(multi_tok.to_tiktoken_ranks(),
                                           special_tokens=multi_tok.special_tokens,
                                           pattern=multi_tok.pattern)
    tok.save(tmp_path / "r.bpe")
    again = BPETokenizer.load(tmp_path / "r.bpe")
    assert again.mode == "ranks" and again.encode(MULTILINGUAL) == tok.encode(MULTILINGUAL)
    hf = hf_from(tok)  # ignore_merges + the derived merges
    assert hf.encode(MULTILINGUAL).ids == tok.encode(MULTILINGUAL)


def test_registered_under_bpe():
    assert plugins.get_tokenizer_class("bpe") is BPETokenizer


def _cuts(text: str) -> list:
    n = len(text)
    return sorted({0, 1, 20, n // 3, n // 2, n - 40, n - 6, n - 4, n - 2})  # n - 1: "end"


def test_truncated_file_is_a_clear_error_naming_it(tmp_path):
    tok = BPETokenizer.train("some text to learn from " * 20, 300, special_tokens=["<s>"])
    full = tmp_path / "full.bpe"
    tok.save(full)
    text = full.read_text(encoding="utf-8")
    for cut in _cuts(text):
        path = tmp_path / f"cut{cut}.bpe"
        path.write_text(text[:cut], encoding="utf-8")
        with pytest.raises(TokenizerFileError, match=f"cut{cut}.bpe"):
            from_file(path)


@pytest.mark.parametrize("corrupt", [
    lambda t: re.sub(r"\ntokens (\d+)", r"\ntokens \1x", t),
    lambda t: t.replace('mode "merges"', 'mode "sideways"'),
    lambda t: t.replace("\n0 !\n", "\n0 ! !\n"),
    lambda t: t.replace("\n0 !\n", "\n0 \u2603\n"),
    lambda t: re.sub(r"\nmerges (\d+)", lambda m: f"\nmerges {int(m[1]) - 1}", t),
    lambda t: re.sub(r"\nmerges (\d+)", lambda m: f"\nmerges {int(m[1]) + 1}", t),
    lambda t: t.replace("Ġ t\n", "Ġ nosuch\n"),
    lambda t: t.replace("tinylm-tokenizer bpe 1", "tinylm-tokenizer bpe 9"),
    lambda t: t.replace("tinylm-tokenizer bpe 1", "tinylm-tokenizer nosuch 1"),
    lambda t: t.replace("\nend\n", "\nend\nextra\n"),
    lambda t: t.replace('pattern "', 'pattern "('),
    lambda t: "\x00" + t,
])
def test_corrupted_file_is_a_clear_error_naming_it(tmp_path, corrupt):
    tok = BPETokenizer.train("some text to learn from, the text to test " * 20, 300)
    good = tmp_path / "good.bpe"
    tok.save(good)
    text = good.read_text(encoding="utf-8")
    assert "Ġ t\n" in text and '\nmode "merges"\n' in text
    bad = tmp_path / "bad.bpe"
    bad.write_text(corrupt(text), encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="bad.bpe"):
        from_file(bad)


@pytest.mark.parametrize("content", [
    b"", b"{\"model\": {\"type\": \"BPE\", \"vocab\": ", b"\xff\xfe\x00garbage",
    b"{\"model\": {\"type\": \"Unigram\"}}", b"[1, 2, 3]", b"just some words\nno unk\n",
])
def test_unreadable_files_are_a_clear_error_naming_them(tmp_path, content):
    path = tmp_path / "weird.json"
    path.write_bytes(content)
    with pytest.raises(TokenizerFileError, match="weird.json"):
        from_file(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(TokenizerFileError, match="does not exist"):
        from_file(tmp_path / "nope.json")
    with pytest.raises(TokenizerFileError, match="is a directory"):
        from_file(tmp_path)


def test_corrupted_tokenizer_json(tmp_path, multi_tok):
    obj = multi_tok.to_hf_dict()
    cases = {
        "merge.json": lambda o: o["model"]["merges"].append(["Ġx", "nosuchtoken"]),
        "norm.json": lambda o: o.update(normalizer={"type": "NFKC"}),
        "pre.json": lambda o: o.update(pre_tokenizer={"type": "Whitespace"}),
        "bytes.json": lambda o: o["model"]["vocab"].pop("Ġ"),
        "fallback.json": lambda o: o["model"].update(byte_fallback=True),
    }
    for name, corrupt in cases.items():
        broken = json.loads(json.dumps(obj))
        corrupt(broken)
        path = tmp_path / name
        path.write_text(json.dumps(broken), encoding="utf-8")
        with pytest.raises(TokenizerFileError, match=name):
            from_file(path)


def test_save_errors(tmp_path, multi_tok):
    with pytest.raises(TokenizerError, match="unknown format"):
        multi_tok.save(tmp_path / "x", format="yaml")
    with pytest.raises(TokenizerFileError, match="does not exist"):
        multi_tok.save(tmp_path / "no" / "dir" / "x.bpe")
    with pytest.raises(TokenizerError, match="directory"):
        multi_tok.save(tmp_path / "x.txt", format="gpt2")


def test_save_is_atomic(tmp_path, multi_tok, monkeypatch):
    path = tmp_path / "tok.bpe"
    multi_tok.save(path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(KeyboardInterrupt):
        BPETokenizer.train("other", 300).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["tok.bpe"]


def test_byte_level_spelling():
    tok = BPETokenizer.train("x", 256)
    for b in range(256):
        spelling = to_bytelevel(bytes([b]))
        assert len(spelling) == 1 and not spelling.isspace()
        assert tok.token_bytes(tok.token_to_id(spelling)) == bytes([b])
    assert to_bytelevel(b" hi\n") == "ĠhiĊ"
    assert unicodedata.category(to_bytelevel(b" ")) == "Lu"  # 'Ġ'

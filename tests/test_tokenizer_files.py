"""Every tokenizer file reader: an id that is not a token id (negative, huge, not an
int) is a ``TokenizerFileError`` naming the file and the id, never a MemoryError; a
UTF-8 byte order mark at the start of a file is not text (tokenizer files and the
text files tokenizers train on)."""

from __future__ import annotations

import base64
import json
import re

import pytest

from tinylm.tokenizers import (
    BPETokenizer, CharTokenizer, TokenizerError, TokenizerFileError, WordPieceTokenizer,
    from_file,
)
from tinylm.tokenizers.base import MAX_ID

BOM = b"\xef\xbb\xbf"
HUGE = 10 ** 12
TEXT = "the cat sat on the mat; the dog sat on the log. " * 20
BERT = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "##s", "sat", "."]


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(TEXT, 280, special_tokens=["<|endoftext|>"])


def _error_names(info, path, bad) -> None:
    message = str(info.value)
    assert str(path) in message or path.name in message, message
    assert str(bad)[:20] in message, message


# ---------------------------------------------------------------------- ids


@pytest.mark.parametrize("bad", [HUGE, -1, MAX_ID + 1, 2.5, "7", True])
def test_tokenizer_json_vocab_id(tmp_path, bpe, bad):
    obj = bpe.to_hf_dict()
    obj["model"]["vocab"]["Ġcat"] = bad
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(obj), encoding="utf-8")
    with pytest.raises(TokenizerFileError) as info:
        from_file(path)
    _error_names(info, path, bad)
    assert "'Ġcat'" in str(info.value)


@pytest.mark.parametrize("bad", [HUGE, -3, None])
def test_tokenizer_json_added_token_id(tmp_path, bpe, bad):
    obj = bpe.to_hf_dict()
    obj["added_tokens"][0]["id"] = bad
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(obj), encoding="utf-8")
    with pytest.raises(TokenizerFileError) as info:
        from_file(path)
    _error_names(info, path, bad)


def test_wordpiece_tokenizer_json_id(tmp_path):
    obj = WordPieceTokenizer(BERT).to_hf_dict()
    obj["model"]["vocab"]["cat"] = HUGE
    path = tmp_path / "bert.json"
    path.write_text(json.dumps(obj), encoding="utf-8")
    with pytest.raises(TokenizerFileError) as info:
        from_file(path)
    _error_names(info, path, HUGE)


@pytest.mark.parametrize("make, section", [
    (lambda: BPETokenizer.train(TEXT, 280, special_tokens=["<s>"]), "tokens"),
    (lambda: BPETokenizer.train(TEXT, 280, special_tokens=["<s>"]), "special_tokens"),
    (lambda: WordPieceTokenizer(BERT), "tokens"),
    (lambda: WordPieceTokenizer(BERT), "special_tokens"),
    (lambda: CharTokenizer.train(TEXT, special_tokens=["<s>"]), "special_tokens"),
])
def test_tinylm_format_ids(tmp_path, make, section):
    path = tmp_path / "tok.txt"
    make().save(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    at = next(k for k, line in enumerate(lines) if re.fullmatch(rf"{section} \d+", line))
    assert int(lines[at].split()[1]) > 0
    lines[at + 1] = f"{HUGE} " + lines[at + 1].split(" ", 1)[1]
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(TokenizerFileError) as info:
        from_file(path)
    _error_names(info, path, HUGE)
    assert f"line {at + 2}" in str(info.value)  # the line of the bad row


@pytest.mark.parametrize("bad", [HUGE, -1])
def test_gpt2_vocab_json_id(tmp_path, bpe, bad):
    bpe.save(tmp_path, format="gpt2")
    path = tmp_path / "vocab.json"
    vocab = json.loads(path.read_text(encoding="utf-8"))
    vocab["Ġcat"] = bad
    path.write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(TokenizerFileError) as info:
        from_file(path)
    _error_names(info, path, bad)


@pytest.mark.parametrize("bad", [HUGE, -1])
def test_tiktoken_rank(tmp_path, bpe, bad):
    path = tmp_path / "ranks.tiktoken"
    bpe.save(path, format="tiktoken")
    lines = path.read_text(encoding="ascii").splitlines()
    lines[300 - 280 + 5] = f"{base64.b64encode(b'zzz').decode()} {bad}"
    path.write_text("\n".join(lines) + "\n", encoding="ascii")
    with pytest.raises(TokenizerFileError) as info:
        from_file(path)
    _error_names(info, path, bad)


@pytest.mark.parametrize("build", [
    lambda: BPETokenizer({**{i: bytes([i]) for i in range(256)}, HUGE: b"ab"}),
    lambda: BPETokenizer({i: bytes([i]) for i in range(256)}, None, {"<s>": HUGE}),
    lambda: WordPieceTokenizer({"[UNK]": 0, "a": HUGE}),
    lambda: WordPieceTokenizer(BERT, special_tokens={"[UNK]": HUGE}),
    lambda: CharTokenizer("ab", {"<s>": HUGE}),
])
def test_constructors_refuse_huge_ids(build):
    with pytest.raises(TokenizerError, match=str(HUGE)):
        build()


def test_the_largest_id_is_fine(tmp_path):
    tok = CharTokenizer("ab", {"<s>": 1000})
    assert tok.vocab_size == 1001 and tok.decode([0, 1000]) == "a<s>"


# ---------------------------------------------------------------------- byte order marks


def _save_all(tmp_path, bpe):
    """Each format tinylm reads, as (path, the args from_file needs)."""
    files = []
    for name, fmt in (("tok.bpe", "tinylm"), ("tok.json", "hf"), ("tok.tiktoken", "tiktoken")):
        bpe.save(tmp_path / name, format=fmt)
        files.append((tmp_path / name, {}))
    bpe.save(tmp_path, format="gpt2")
    files.append((tmp_path / "vocab.json", {}))
    files.append((tmp_path / "merges.txt", None))  # read through vocab.json below
    wordpiece = WordPieceTokenizer(BERT)
    wordpiece.save(tmp_path / "vocab.txt", format="vocab-txt")
    files.append((tmp_path / "vocab.txt", {}))
    wordpiece.save(tmp_path / "wp.txt")
    files.append((tmp_path / "wp.txt", {}))
    CharTokenizer.train(TEXT).save(tmp_path / "char.txt")
    files.append((tmp_path / "char.txt", {}))
    return files


def test_tokenizer_files_with_a_byte_order_mark_load_as_without(tmp_path, bpe):
    files = _save_all(tmp_path, bpe)
    before = {path.name: from_file(path).get_vocab() for path, args in files if args is not None}
    for path, _ in files:
        path.write_bytes(BOM + path.read_bytes())
    for path, args in files:
        if args is None:
            continue
        tok = from_file(path)
        assert tok.get_vocab() == before[path.name], path.name
        assert not any("\ufeff" in t for t in tok.get_vocab()), path.name
    assert from_file(tmp_path / "vocab.json").merges == bpe.merges  # merges.txt with a BOM


@pytest.fixture
def corpora(tmp_path):
    plain, marked = tmp_path / "plain.txt", tmp_path / "marked.txt"
    plain.write_bytes(TEXT.encode("utf-8"))
    marked.write_bytes(BOM + TEXT.encode("utf-8"))
    return plain, marked


def test_char_training_drops_a_byte_order_mark(corpora):
    plain, marked = corpora
    tok = CharTokenizer.train_from_files([marked])
    assert "\ufeff" not in tok.chars
    assert tok.chars == CharTokenizer.train_from_files([plain]).chars


def test_bpe_training_drops_a_byte_order_mark(corpora):
    plain, marked = corpora
    with_bom = BPETokenizer.train_from_files([marked], 400, min_frequency=1)
    assert with_bom.merges == BPETokenizer.train_from_files([plain], 400, min_frequency=1).merges
    assert not any(BOM[:2] in with_bom.token_bytes(i) or BOM[1:] in with_bom.token_bytes(i)
                   for i in range(256, with_bom.vocab_size))


def test_a_byte_order_mark_inside_the_text_is_kept(tmp_path):
    path = tmp_path / "inner.txt"
    path.write_bytes(b"ab" + BOM + b"c")
    assert "\ufeff" in CharTokenizer.train_from_files([path]).chars


def test_binary_corpus_is_a_file_error(tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    for train in (CharTokenizer.train_from_files,
                  lambda p: BPETokenizer.train_from_files(p, 300)):
        with pytest.raises(TokenizerFileError, match="image.png.*not valid UTF-8.*binary"):
            train([path])

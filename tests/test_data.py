"""tinylm.data: sources, the token cache and its manifest, the split, batching."""

import json
import os

import numpy as np
import pytest

from tinylm.data import (
    DEFAULT_CORPUS, Batcher, DataError, TokenData, default_corpus_documents, read_documents,
    resolve_sources, token_dtype,
)
from tinylm.tokenizers import CharTokenizer

EOT = "<|endoftext|>"


def char_tok(text):
    return CharTokenizer.train(text, special_tokens=[EOT])


# --------------------------------------------------------------------------- sources


def test_resolve_sources_expands_folders_sorted_skipping_hidden(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / ".git").mkdir()
    for name in ("d/b.txt", "d/a.txt", "d/sub/c.jsonl", "d/.hidden.txt", "d/.git/x"):
        (tmp_path / name).write_text("x")
    files = resolve_sources([tmp_path / "d"])
    assert [os.path.relpath(f, tmp_path) for f in files] == ["d/a.txt", "d/b.txt",
                                                             "d/sub/c.jsonl"]
    assert resolve_sources([]) == [DEFAULT_CORPUS]
    with pytest.raises(DataError, match="does not exist"):
        resolve_sources([tmp_path / "missing.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no files"):
        resolve_sources([tmp_path / "empty"])


def test_sources_that_are_not_regular_files_are_named(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "a.txt").write_text("x")
    os.symlink(tmp_path / "gone.txt", folder / "b.txt")
    with pytest.raises(DataError, match=r"'.*b.txt' in the data folder .* is a broken symbolic "
                                        r"link \(to '.*gone.txt'\)"):
        resolve_sources([folder])
    with pytest.raises(DataError, match="is a character device, not a regular file"):
        resolve_sources([os.devnull])
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe")
        with pytest.raises(DataError, match="'.*pipe' is a FIFO, not a regular file"):
            resolve_sources([tmp_path / "pipe"])
    os.symlink(tmp_path / "d" / "a.txt", tmp_path / "link.txt")  # a good link is a file
    assert resolve_sources([tmp_path / "link.txt"]) == [str(tmp_path / "link.txt")]


def test_excluded_folders_are_left_out_of_a_walk(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "run" / "model.safetensors").write_bytes(b"\0")
    assert resolve_sources([tmp_path], exclude=[tmp_path / "run"]) == [str(tmp_path / "a.txt")]


def test_a_byte_order_mark_is_not_text(tmp_path):
    f = tmp_path / "bom.txt"
    f.write_bytes("\ufeffhello\n".encode("utf-8"))
    assert list(read_documents(str(f))) == ["hello\n"]
    j = tmp_path / "bom.jsonl"
    j.write_bytes('\ufeff{"text": "hi"}\n'.encode("utf-8"))
    assert list(read_documents(str(j))) == ["hi"]
    data = TokenData.prepare([str(f)], char_tok("hello\n"), tmp_path / "cache")
    assert len(data) == len("hello\n")


def test_token_ids_in_hand_become_token_data():
    data = TokenData.from_ids([3, 1, 2, 5])
    assert data.tokens.tolist() == [3, 1, 2, 5] and data.manifest["n_documents"] == 1
    train, val = data.split(0.25)
    assert train.tolist() == [3, 1, 2] and val.tolist() == [5]
    with pytest.raises(DataError, match="1-D sequence of integer ids"):
        TokenData.from_ids([[1, 2]])
    with pytest.raises(DataError, match="1-D sequence of integer ids"):
        TokenData.from_ids([0.5])


def test_default_corpus_is_pydoc_topics():
    docs = default_corpus_documents()
    assert len(docs) > 50 and sum(map(len, docs)) > 300_000
    assert list(read_documents(DEFAULT_CORPUS))[:2] == docs[:2]


def test_jsonl_documents_and_errors(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "first"}\n\n{"text": "second", "id": 2}\n', encoding="utf-8")
    assert list(read_documents(str(f))) == ["first", "second"]
    f.write_text('{"body": "x"}\n', encoding="utf-8")
    assert list(read_documents(str(f), text_field="body")) == ["x"]
    with pytest.raises(DataError, match=r"d.jsonl:1: no 'text' field \(found \['body'\]\); "
                                        r"pass --text-field"):
        list(read_documents(str(f)))
    f.write_text('{"text": "ok"}\n{oops\n', encoding="utf-8")
    with pytest.raises(DataError, match="d.jsonl:2: not a JSON line"):
        list(read_documents(str(f)))
    f.write_text('{"text": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match="not a string"):
        list(read_documents(str(f)))


def test_non_utf8_text_is_an_error_naming_the_file(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt.* is not UTF-8"):
        list(read_documents(str(f)))


# --------------------------------------------------------------------------- token cache


def test_prepare_writes_tokens_and_manifest_then_reuses_them(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("hello", encoding="utf-8")
    b.write_text("world", encoding="utf-8")
    tok = char_tok("helowrd")
    cache = tmp_path / "cache"
    data = TokenData.prepare([str(a), str(b)], tok, cache)
    assert not data.reused
    eot = tok.token_to_id(EOT)
    assert data.tokens.tolist() == tok.encode("hello") + [eot] + tok.encode("world")
    assert data.tokens.dtype == np.uint16 and isinstance(data.tokens, np.memmap)
    manifest = json.loads((cache / os.path.basename(data.path).replace(".bin", ".json"))
                          .read_text())
    assert manifest["n_tokens"] == 11 and manifest["n_documents"] == 2
    assert manifest["dtype"] == "uint16" and manifest["eot_id"] == eot
    assert [s.get("size") for s in manifest["sources"][1:]] == [5, 5]
    assert len(manifest["tokenizer_sha256"]) == 64

    again = TokenData.prepare([str(a), str(b)], tok, cache)
    assert again.reused and again.path == data.path
    assert again.tokens.tolist() == data.tokens.tolist()

    b.write_text("world!", encoding="utf-8")  # a changed source: tokenized again
    changed = TokenData.prepare([str(a), str(b)], char_tok("helowrd!"), cache)
    assert not changed.reused and changed.path != data.path
    other_tok = CharTokenizer.train("helowrd!xyz", special_tokens=[EOT])
    assert not TokenData.prepare([str(a), str(b)], other_tok, cache).reused


def test_a_damaged_cache_file_is_rebuilt(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("abcabc", encoding="utf-8")
    tok = char_tok("abc")
    data = TokenData.prepare([str(f)], tok, tmp_path)
    with open(data.path, "r+b") as fh:
        fh.truncate(4)
    again = TokenData.prepare([str(f)], tok, tmp_path)
    assert not again.reused and again.tokens.tolist() == tok.encode("abcabc")


def test_token_dtype_widens_for_big_vocabularies():
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_empty_data_and_missing_separator(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="holds no text"):
        TokenData.prepare([str(f)], char_tok("a"), tmp_path)
    with pytest.raises(DataError, match="no '<|endoftext|>' token"):
        TokenData.prepare([str(f)], CharTokenizer.train("a"), tmp_path)


def test_split_is_the_first_part_and_the_rest(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("abcdefghij", encoding="utf-8")
    data = TokenData.prepare([str(f)], char_tok("abcdefghij"), tmp_path)
    train, val = data.split(0.1)
    assert len(train) == 9 and len(val) == 1
    assert np.concatenate([train, val]).tolist() == data.tokens.tolist()
    with pytest.raises(DataError, match="val_fraction"):
        data.split(1.0)


# --------------------------------------------------------------------------- batches


def test_random_windows_are_slices_and_deterministic():
    tokens = np.arange(1000, dtype=np.uint16)
    b = Batcher(tokens, window=9, batch_size=5, seed=3)
    x = b.next()
    assert x.shape == (5, 9) and x.dtype == np.int64
    assert (np.diff(x, axis=1) == 1).all()  # consecutive tokens
    assert (x[:, 0] >= 0).all() and (x[:, -1] < 1000).all()
    assert np.array_equal(Batcher(tokens, 9, 5, seed=3).next(), x)
    assert not np.array_equal(Batcher(tokens, 9, 5, seed=4).next(), x)
    # the last window that fits is reachable (nanoGPT draws starts in [0, n - window])
    tiny = Batcher(np.arange(10), window=10, batch_size=3, seed=0)
    assert tiny.next().tolist() == [list(range(10))] * 3


def test_packed_windows_cover_each_window_once_per_epoch():
    tokens = np.arange(100)
    b = Batcher(tokens, window=10, batch_size=3, mode="packed", seed=1)
    starts = [row[0] for _ in range(4) for row in b.next()]  # 12 windows: 1 epoch + 2
    assert sorted(starts[:10]) == list(range(0, 100, 10))
    assert b.epoch == 1
    assert all(s % 10 == 0 for s in starts)


@pytest.mark.parametrize("mode", ["random", "packed"])
def test_batcher_state_resumes_the_same_sequence(mode):
    tokens = np.arange(500)
    b = Batcher(tokens, window=7, batch_size=4, mode=mode, seed=11)
    for _ in range(20):  # packed: 71 windows, so this crosses an epoch boundary
        b.next()
    state = json.loads(json.dumps(b.state_dict()))  # JSON round trip, as in a checkpoint
    expected = [b.next() for _ in range(30)]
    c = Batcher(tokens, window=7, batch_size=4, mode=mode, seed=999)
    c.load_state_dict(state)
    assert all(np.array_equal(x, c.next()) for x in expected)


def test_too_small_corpus_is_a_clear_error():
    with pytest.raises(DataError, match=r"the train split has 10 tokens, fewer than one window "
                                        r"needs \(17\); give more text, or lower --block-size"):
        Batcher(np.arange(10), window=17, batch_size=4)
    with pytest.raises(DataError, match="one batch of 4 back-to-back windows needs \\(68\\)"):
        Batcher(np.arange(40), window=17, batch_size=4, mode="packed")
    with pytest.raises(DataError, match="raise --val-fraction"):
        Batcher(np.arange(3), window=17, batch_size=4, split="validation")
    with pytest.raises(DataError, match="sampling mode"):
        Batcher(np.arange(100), window=17, batch_size=4, mode="shuffled")

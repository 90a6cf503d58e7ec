"""tinylm data tokenize (tinylm.webdata.tokenize_shards) and streaming training from the
shards (tinylm.data_shards, tinylm train --data DIR[:WEIGHT])."""

import json
import os
import signal
import time

import numpy as np
import pytest

from train_helpers import corpus_text, run_cli, tiny_config
from tinylm.data import Batcher, DataError, TokenData, tokenizer_sha256
from tinylm.data_shards import (MixedTokens, ShardedTokenData, ShardedTokens, make_batcher,
                                shard_entries, split_weight)
from tinylm.tokenizers import BPETokenizer, CharTokenizer, from_file
from tinylm.train import Trainer
from tinylm.webdata import tokenize_shards as ts
from tinylm.webdata.readers import WebDataError

EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory):
    """A small byte-level BPE with <|endoftext|>, saved."""
    docs = [corpus_text(300, seed=s) for s in range(4)]
    tok = BPETokenizer.train(docs, 320, special_tokens=[EOT])
    path = tmp_path_factory.mktemp("tok") / "tok.txt"
    tok.save(path)
    return path


def write_jsonl(path, texts, extra_lines=()):
    with open(path, "wb") as f:
        for text in texts:
            f.write(json.dumps({"text": text, "url": "u"}).encode() + b"\n")
        for line in extra_lines:
            f.write(line)
    return path


def corpus_files(folder, n_files=3, docs_per_file=12, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for f in range(n_files):
        texts = [corpus_text(20 + 9 * d, seed=seed + 100 * f + d) for d in range(docs_per_file)]
        files.append(str(write_jsonl(folder / f"part{f}.jsonl", texts)))
    return files


def tokenize(inputs, out, tok, progress=None, overwrite=False, **config):
    return ts.tokenize_corpus(inputs, str(out), str(tok), ts.TokenizeConfig(**config),
                              show_progress=False, progress=progress, overwrite=overwrite)


def shard_stream(out) -> np.ndarray:
    index = json.loads((out / "index.json").read_text())
    dtype = np.dtype(index["dtype"]).newbyteorder("<")
    parts = [np.fromfile(out / s["file"], dtype=dtype) for s in index["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


# ------------------------------------------------------------------- shards and index


def test_shards_hold_the_tokenizers_ids_and_the_index_says_so(tmp_path, tok_file):
    tok = from_file(tok_file)
    good = ["first doc. " * 5, f"a doc that spells {EOT} as text", "third one",
            "x" * 300, "last words"]
    (tmp_path / "in").mkdir()
    bad_lines = [b"{not json\n", b'{"text": ""}\n', b'{"text": "\\ud800 lone"}\n',
                 b'{"text": "caf\xff"}\n', b'{"body": "no text"}\n']
    path = write_jsonl(tmp_path / "in" / "a.jsonl", good[:3], extra_lines=bad_lines)
    write_jsonl(tmp_path / "in" / "b.jsonl", good[3:])
    totals = tokenize([tmp_path / "in"], tmp_path / "out", tok_file, shard_tokens=16)
    index = totals["index"]
    eot = tok.token_to_id(EOT)
    want = []
    for i, text in enumerate(good):
        want += ([eot] if i else []) + tok.encode(text, disallowed_special=())
    assert shard_stream(tmp_path / "out").tolist() == want
    assert index["format"] == "tinylm-token-shards" and index["dtype"] == "uint16"
    assert index["eot_id"] == eot and index["eot"] == EOT
    assert index["tokenizer_sha256"] == tokenizer_sha256(tok)
    assert index["n_tokens"] == len(want) and index["n_documents"] == 5
    assert (index["n_empty"], index["n_untokenizable"]) == (1, 1)
    assert index["bad"] == {"bad_utf8": 1, "invalid_json": 1, "missing_text": 1}
    assert [e["path"] for e in index["inputs"]] == [str(path), str(tmp_path / "in" / "b.jsonl")]
    for unit in (0, 1):  # every shard full but each input's last
        sizes = [s["tokens"] for s in index["shards"] if s["unit"] == unit]
        assert sizes[:-1] == [16] * (len(sizes) - 1) and 0 < sizes[-1] <= 16
    for s in index["shards"]:
        assert os.path.getsize(tmp_path / "out" / s["file"]) == 2 * s["tokens"]
    assert sum(s["documents"] for s in index["shards"]) == 5
    assert from_file(tmp_path / "out" / "tokenizer.txt").encode("the cat") == tok.encode("the cat")
    stats = json.loads((tmp_path / "out" / "tokenize.stats.json").read_text())
    assert stats["units_done"] == 2 and stats["tokens_written"] == len(want)


@pytest.mark.parametrize("eot_id, dtype", [(65535, "uint16"), (70000, "uint32")])
def test_dtype_follows_the_vocabulary(tmp_path, eot_id, dtype):
    tok = BPETokenizer([bytes([b]) for b in range(256)], [], {EOT: eot_id})
    assert tok.vocab_size == eot_id + 1
    tok.save(tmp_path / "tok.txt")
    write_jsonl(tmp_path / "a.jsonl", ["ab", "cd"])
    index = tokenize([tmp_path / "a.jsonl"], tmp_path / "out", tmp_path / "tok.txt",
                     shard_tokens=3)["index"]
    assert index["dtype"] == dtype
    assert os.path.getsize(tmp_path / "out" / index["shards"][0]["file"]) == 3 * (
        2 if dtype == "uint16" else 4)
    assert shard_stream(tmp_path / "out").tolist() == [97, 98, eot_id, 99, 100]


def test_byte_ranges_and_processes_give_the_same_shards(tmp_path, tok_file):
    files = corpus_files(tmp_path / "in", n_files=2, docs_per_file=10)
    whole = tokenize(files, tmp_path / "whole", tok_file, shard_tokens=64, split_bytes=0)
    cut = tokenize(files, tmp_path / "cut", tok_file, shard_tokens=64, split_bytes=700,
                   processes=2)
    assert cut["units"] > 4 > whole["units"] == 2
    assert np.array_equal(shard_stream(tmp_path / "cut"), shard_stream(tmp_path / "whole"))
    assert cut["index"]["n_documents"] == whole["index"]["n_documents"] == 20


def test_the_stream_equals_token_data_and_batches_are_the_same(tmp_path, tok_file):
    files = corpus_files(tmp_path / "in")
    tok = from_file(tok_file)
    tokenize(files, tmp_path / "out", tok_file, shard_tokens=50, split_bytes=900, processes=1)
    ref = TokenData.prepare(files, tok, str(tmp_path / "cache"))
    data = ShardedTokenData.open([str(tmp_path / "out")], tok)
    assert len(data) == len(ref) and data.manifest["n_documents"] == ref.manifest["n_documents"]
    assert np.array_equal(np.asarray(data.tokens), np.asarray(ref.tokens))
    for mode in ("random", "packed"):
        (a, av), (b, bv) = ref.split(0.1), data.split(0.1)
        assert len(av) == len(bv)
        x, y = Batcher(a, 33, 8, mode, seed=5), make_batcher(b, 33, 8, mode, seed=5)
        for _ in range(15):  # windows cross many 50-token shards
            assert np.array_equal(x.next(), y.next())


def test_sharded_tokens_index_like_an_array(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    counts = [7, 1, 30, 12, 5]
    arrays = [rng.integers(0, 60000, n).astype(np.uint16) for n in counts]
    files = []
    for i, a in enumerate(arrays):
        a.tofile(tmp_path / f"{i}.bin")
        files.append(str(tmp_path / f"{i}.bin"))
    monkeypatch.setattr("tinylm.data_shards.MAX_OPEN", 2)  # maps closed and reopened
    whole, tokens = np.concatenate(arrays), ShardedTokens(files, counts, "uint16")
    idx = rng.integers(0, len(whole), (6, 9))
    assert np.array_equal(tokens[idx], whole[idx]) and tokens[idx].shape == (6, 9)
    view = tokens[5:40]
    assert len(view) == 35 and np.array_equal(np.asarray(view), whole[5:40])
    assert view[-1] == whole[39] and view[0] == whole[5]
    assert np.array_equal(view[np.arange(35)], whole[5:40])
    with pytest.raises(IndexError):
        view[np.array([35])]


# ------------------------------------------------------------------- resuming


def test_an_interrupted_run_continues_where_it_stopped(tmp_path, tok_file, monkeypatch):
    files = corpus_files(tmp_path / "in", n_files=2, docs_per_file=12)
    ref = tokenize(files, tmp_path / "ref", tok_file, shard_tokens=40)["index"]
    monkeypatch.setattr(ts, "CHUNK_DOCS", 3)
    calls = []

    def stop_at_the_fifth_chunk(documents, tokens):
        calls.append(tokens)
        if len(calls) == 5:
            raise KeyboardInterrupt  # in the middle of unit 1's shards

    with pytest.raises(KeyboardInterrupt):
        tokenize(files, tmp_path / "out", tok_file, shard_tokens=40,
                 progress=stop_at_the_fifth_chunk)
    out = tmp_path / "out"
    assert not (out / "index.json").exists()
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    state = json.loads((out / ".tokenize" / "unit-00001.json").read_text())
    assert not state["done"] and state["shards"] and state["resume"]["doc"] > 0
    again = []
    totals = tokenize(files, out, tok_file, shard_tokens=40,
                      progress=lambda d, t: again.append(t))
    assert totals["units_skipped"] == 1 and sum(again) < ref["n_tokens"] - sum(calls[:4])
    assert totals["index"]["shards"] == ref["shards"]
    assert np.array_equal(shard_stream(out), shard_stream(tmp_path / "ref"))
    assert totals["index"]["n_documents"] == ref["n_documents"]


def test_killed_workers_lose_only_their_current_shard(tmp_path, tok_file):
    psutil = pytest.importorskip("psutil")
    words = (corpus_text(6000, seed=3) * 3).split("\n")
    (tmp_path / "in").mkdir()
    files = [str(write_jsonl(tmp_path / "in" / f"{i}.jsonl", words[i::2] * 3))
             for i in range(2)]
    ref = tokenize(files, tmp_path / "ref", tok_file, shard_tokens=500)["index"]
    killed = []

    def kill_the_workers(documents, tokens):
        if not killed:
            for child in psutil.Process().children():
                if "resource_tracker" not in " ".join(child.cmdline()):
                    os.kill(child.pid, signal.SIGKILL)
                    killed.append(child.pid)

    with pytest.raises(WebDataError, match="worker died"):
        tokenize(files, tmp_path / "out", tok_file, shard_tokens=500, processes=2,
                 progress=kill_the_workers)
    assert killed
    time.sleep(0.1)
    totals = tokenize(files, tmp_path / "out", tok_file, shard_tokens=500, processes=2)
    assert totals["index"]["shards"] == ref["shards"]
    assert np.array_equal(shard_stream(tmp_path / "out"), shard_stream(tmp_path / "ref"))
    assert not [n for n in os.listdir(tmp_path / "out") if n.endswith(".tmp")]


def test_other_options_are_refused_unless_overwrite(tmp_path, tok_file):
    files = corpus_files(tmp_path / "in", n_files=1, docs_per_file=3)
    tokenize(files, tmp_path / "out", tok_file, shard_tokens=40)
    with pytest.raises(WebDataError, match="--overwrite"):
        tokenize(files, tmp_path / "out", tok_file, shard_tokens=41)
    index = tokenize(files, tmp_path / "out", tok_file, shard_tokens=41, overwrite=True)["index"]
    assert index["shard_tokens"] == 41
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(WebDataError, match="not empty"):
        tokenize(files, tmp_path / "other", tok_file)


# ------------------------------------------------------------------- mixtures


def char_shards(tmp_path, name, letter, n_docs=40):
    tok = CharTokenizer("ab", special_tokens=[EOT])
    tok.save(tmp_path / "char.txt")
    write_jsonl(tmp_path / f"{name}.jsonl", [letter * (30 + i) for i in range(n_docs)])
    tokenize([tmp_path / f"{name}.jsonl"], tmp_path / name, tmp_path / "char.txt",
             shard_tokens=100)
    return str(tmp_path / name), tok


@pytest.mark.parametrize("mode", ["random", "packed"])
def test_mixture_windows_follow_the_weights_and_resume(tmp_path, mode):
    a, tok = char_shards(tmp_path, "a", "a")
    b, _ = char_shards(tmp_path, "b", "b")
    data = ShardedTokenData.open([f"{a}:3", f"{b}:1"], tok)
    train, val = data.split(0.1)
    assert isinstance(train, MixedTokens) and np.allclose(train.weights, [0.75, 0.25])
    batches = make_batcher(train, 8, 16, mode, seed=[1, 2])
    windows = np.concatenate([batches.next() for _ in range(150)])  # 2400 windows
    a_id, b_id = tok.token_to_id("a"), tok.token_to_id("b")
    from_a = (windows == a_id).any(1)
    assert not ((windows == b_id).any(1) & from_a).any()  # each window from one source
    assert abs(from_a.mean() - 0.75) < 0.03  # 2400 draws: 3.5 standard deviations
    state = json.loads(json.dumps(batches.state_dict()))
    following = [batches.next() for _ in range(3)]
    again = make_batcher(train, 8, 16, mode, seed=[1, 2])
    again.load_state_dict(state)
    assert all(np.array_equal(x, again.next()) for x in following)


def test_data_entries_are_checked(tmp_path):
    a, tok = char_shards(tmp_path, "a", "a")
    (tmp_path / "text.txt").write_text("plain text")
    assert split_weight("dir:0.5") == ("dir", 0.5) and split_weight("dir") == ("dir", None)
    assert shard_entries([str(tmp_path / "text.txt")]) is None
    assert shard_entries([a]) == [(a, None)]
    for data, message in [([f"{tmp_path / 'text.txt'}:2"], "needs a folder of token shards"),
                          ([a, str(tmp_path / "text.txt")], "is text"),
                          ([f"{a}:1", a], "every shard folder a weight"),
                          ([f"{a}:-1"], "positive")]:
        with pytest.raises(DataError, match=message):
            shard_entries(data)
    other = BPETokenizer([bytes([b]) for b in range(256)], [], {EOT: 256})
    with pytest.raises(DataError, match="another tokenizer"):
        ShardedTokenData.open([a], other)
    os.unlink(os.path.join(a, "index.json"))
    with pytest.raises(DataError, match="unfinished"):
        shard_entries([a])


# ------------------------------------------------------------------- training


def losses(out_dir):
    rows = [json.loads(x) for x in open(os.path.join(out_dir, "metrics.jsonl"))]
    return [r["loss"] for r in rows if "loss" in r]


def test_training_on_shards_equals_training_on_the_text(tmp_path, tok_file):
    files = corpus_files(tmp_path / "in", n_files=2, docs_per_file=20)
    tokenize(files, tmp_path / "shards", tok_file, shard_tokens=200)
    common = dict(max_steps=4, eval_every=2, block_size=16)
    text = tiny_config(tmp_path / "t", files[0], data=files, tokenizer=str(tok_file), **common)
    shards = tiny_config(tmp_path / "s", files[0], data=[str(tmp_path / "shards")], **common)
    r1 = Trainer(text).fit()
    r2 = Trainer(shards).fit()
    assert losses(text.out_dir) == losses(shards.out_dir) and len(losses(text.out_dir)) == 4
    assert r1["val_loss"] == r2["val_loss"]


def test_a_mixture_run_resumes_bit_exactly_and_the_cli_takes_weights(tmp_path):
    a, _ = char_shards(tmp_path, "a", "a", n_docs=60)
    b, _ = char_shards(tmp_path, "b", "b", n_docs=60)
    from tinylm.checkpoint import load_file

    run = dict(data=[f"{a}:0.7", f"{b}:0.3"], eval_every=3, lr_decay_steps=6)
    straight = tiny_config(tmp_path / "x", a, max_steps=6, **run)
    Trainer(straight).fit()
    Trainer(tiny_config(tmp_path / "y", a, max_steps=3, **run)).fit()
    resumed = tiny_config(tmp_path / "y", a, max_steps=6, **run)
    Trainer(resumed).fit()
    assert losses(straight.out_dir) == losses(resumed.out_dir)
    w1, w2 = (load_file(os.path.join(c.out_dir, "model.safetensors")) for c in (straight, resumed))
    assert all(np.array_equal(w1[k], w2[k]) for k in w1)
    result = run_cli("train", "--data", f"{a}:0.7", "--data", f"{b}:0.3", "--out",
                     tmp_path / "cli", "--max-steps", 1, "--block-size", 8, "--batch-size", 2,
                     "--n-layer", 1, "--n-head", 1, "--d-model", 8, "--eval-iters", 1,
                     "--sample-tokens", 0, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "a mixture" in result.output
    missing = run_cli("train", "--data", f"{tmp_path / 'nope'}:0.5", "--out", tmp_path / "z")
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_the_tokenize_command(tmp_path, tok_file):
    files = corpus_files(tmp_path / "in", n_files=2, docs_per_file=4)
    result = run_cli("data", "tokenize", "--input", files[0], "--input", files[1],
                     "--tokenizer", tok_file, "--out", tmp_path / "out", "--shard-tokens", 64,
                     "--no-progress")
    assert result.exit_code == 0, result.output
    assert "8 documents from 2 file(s)" in result.output
    assert "tinylm train --data" in result.output
    bad = run_cli("data", "tokenize", files[0], "--tokenizer", tmp_path / "none.txt",
                  "--out", tmp_path / "o2")
    assert bad.exit_code == 2 and "no tokenizer file" in bad.output
    assert "Traceback" not in bad.output

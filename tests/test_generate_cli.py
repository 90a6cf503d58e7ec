"""`tinylm generate` on a Hugging Face directory (streaming, --json, --prompt-file,
--stop), and the TextStream that holds back split characters and stop strings."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import tinylm
from tinylm.cli import cli
from tinylm.generate import TextStream, generate
from tinylm.models import Decoder, GPT2Config
from tinylm.tokenizers.bpe import BPETokenizer

TEXT = "the cat sat on the mat. the dog ran to see what it was. café ☕ naïve\n" * 20


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="tinylm")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    tok = BPETokenizer.train([TEXT], 300, special_tokens=["<|endoftext|>"])
    tinylm.seed(0)
    model = Decoder(GPT2Config(vocab_size=len(tok), d_model=32, n_layer=2, n_head=4,
                               max_positions=64))
    model.save_pretrained(path)
    tok.save(path / "tokenizer.json")
    return path, model, tok


def test_text_stream_holds_back_split_characters():
    data = "é☕x".encode()
    stream = TextStream()
    pieces = [stream.feed(data[i:i + 1]) for i in range(len(data))]
    assert pieces == ["", "é", "", "", "☕", "x"]
    assert stream.finish() == ""
    cut = TextStream()
    assert cut.feed(b"a\xe2\x98") == "a" and cut.finish() == "\ufffd"


def test_text_stream_stops_and_holds_back_a_possible_stop():
    stream = TextStream(stop=["END", "\n\n"])
    assert stream.feed(b"hello E") == "hello "
    assert stream.feed(b"N") == ""
    assert stream.feed(b"X ok\n") == "ENX ok"
    assert stream.feed(b"\nmore") == ""
    assert stream.stopped and stream.feed(b"x") == "" and stream.finish() == ""
    assert TextStream(stop=["zz"]).feed(b"abc") == "abc"


def test_generate_streams_the_same_text_as_the_library(hf_dir):
    path, model, tok = hf_dir
    result = run("generate", "-m", path, "-p", "the cat", "-n", 20, "--seed", 3)
    assert result.exit_code == 0, result.output
    ids = tok.encode("the cat")
    out = generate(model, [ids], 20, temperature=0.8, top_k=200, seed=3)
    assert result.output == "the cat" + tok.decode(out.tokens[0]) + "\n"


def test_json_has_per_token_logprobs(hf_dir, tmp_path):
    path, model, tok = hf_dir
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("the dog", encoding="utf-8")
    result = run("generate", "-m", path, "--prompt-file", prompt_file, "-n", 8, "-t", 0,
                 "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["prompt"] == "the dog" and record["finish_reason"] == "length"
    ids = [t["id"] for t in record["tokens"]]
    assert len(ids) == 8 and record["text"] == tok.decode(ids)
    with tinylm.no_grad():
        logits = model(np.array([tok.encode("the dog") + ids])).logits.numpy()[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    P = len(tok.encode("the dog"))
    expect = [logp[P - 1 + i, t] for i, t in enumerate(ids)]
    np.testing.assert_allclose([t["logprob"] for t in record["tokens"]], expect, atol=1e-4)
    assert all(ids[i] == logits[P - 1 + i].argmax() for i in range(len(ids)))


def test_stop_string_cuts_the_output(hf_dir):
    path, model, tok = hf_dir
    full = run("generate", "-m", path, "-p", "the", "-n", 30, "-t", 0, "--json")
    text = json.loads(full.output)["text"]
    stop = text[5:8]
    expect = text[:text.index(stop)]
    streamed = run("generate", "-m", path, "-p", "the", "-n", 30, "-t", 0, "--stop", stop)
    assert streamed.exit_code == 0, streamed.output
    assert streamed.output == "the" + expect + "\n"
    record = json.loads(run("generate", "-m", path, "-p", "the", "-n", 30, "-t", 0,
                            "--stop", stop, "--json").output)
    assert record["text"] == expect and record["finish_reason"] == "stop"


def test_usage_errors(hf_dir, tmp_path):
    path, _, _ = hf_dir
    f = tmp_path / "p.txt"
    f.write_text("x")
    both = run("generate", "-m", path, "-p", "x", "--prompt-file", f)
    assert both.exit_code == 2 and "not both" in both.output
    bad = run("generate", "-m", path, "-p", "x", "--top-p", 0)
    assert bad.exit_code == 2
    (tmp_path / "notok").mkdir()
    (tmp_path / "notok" / "config.json").write_text((path / "config.json").read_text())
    missing = run("generate", "-m", tmp_path / "notok", "-p", "x")
    assert missing.exit_code == 2 and "no tokenizer" in missing.output


def test_beam_search_from_the_cli(hf_dir):
    from tinylm.generate import beam_search

    path, model, tok = hf_dir
    result = run("generate", "-m", path, "-p", "the cat", "-n", 10, "--num-beams", 3)
    assert result.exit_code == 0, result.output
    found = beam_search(model, [tok.encode("the cat")], 10, num_beams=3,
                        eos_id=tok.token_to_id("<|endoftext|>"))
    assert result.output == "the cat" + tok.decode(found.tokens[0]) + "\n"
    record = json.loads(run("generate", "-m", path, "-p", "the cat", "-n", 10,
                            "--num-beams", 3, "--json").output)
    assert [t["id"] for t in record["tokens"]] == found.tokens[0]


def test_speculative_decoding_from_the_cli(hf_dir, tmp_path):
    path, model, tok = hf_dir
    tinylm.seed(5)
    Decoder(GPT2Config(vocab_size=len(tok), d_model=16, n_layer=1, n_head=2,
                       max_positions=64)).save_pretrained(tmp_path / "draft")
    (tmp_path / "draft" / "tokenizer.json").write_bytes((path / "tokenizer.json").read_bytes())
    greedy = run("generate", "-m", path, "-p", "the cat", "-n", 12, "-t", 0)
    fast = run("generate", "-m", path, "-p", "the cat", "-n", 12, "-t", 0,
               "--draft-model", tmp_path / "draft", "--draft-tokens", 3)
    assert fast.exit_code == 0, fast.output
    assert fast.output == greedy.output
    record = json.loads(run("generate", "-m", path, "-p", "the cat", "-n", 12, "-t", 0,
                            "--draft-model", tmp_path / "draft", "--json").output)
    assert 0 <= record["accepted"] <= record["proposed"]
    sampled = [run("generate", "-m", path, "-p", "x", "-n", 8, "--seed", 3, "--draft-model",
                   tmp_path / "draft").output for _ in range(2)]
    assert sampled[0] == sampled[1] and sampled[0].startswith("x")  # seeded speculative sampling

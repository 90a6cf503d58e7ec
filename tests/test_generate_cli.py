"""`tinylm generate` on a Hugging Face directory (streaming, --json, --prompt-file,
--stop), stopping at the model's end-of-text and hiding special tokens, its refusals
(NaN, an empty --stop, a binary prompt file, --half on the CPU, special tokens in the
prompt), and the TextStream that holds back split characters and stop strings."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from generate_helpers import tiny_hf_gpt
from train_helpers import run_cli as run

import tinylm
from tinylm.commands.options import option_group
from tinylm.generate import TextStream, generate
from tinylm.models import Decoder, GPT2Config
from tinylm.sampling import SamplingConfig

TEXT = "the cat sat on the mat. the dog ran to see what it was. café ☕ naïve\n" * 20


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return tiny_hf_gpt(tmp_path_factory.mktemp("hf"), TEXT)


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
    out = generate(model, [ids], 20, sampling=SamplingConfig(temperature=0.8, top_k=200),
                   seed=3, tokenizer=tok)
    assert result.output == "the cat" + tok.decode(out.tokens[0], skip_special_tokens=True) \
        + "\n"


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
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "notok" / name).write_bytes((path / name).read_bytes())
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


# --------------------------------------------------------------------------- end of text

EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def eot_dir(tmp_path_factory, hf_dir):
    """hf_dir's model changed so that every position gives <|endoftext|> logit 3 and
    the rest about 0: sampling ends a few tokens in (p(eot) about 6%)."""
    path, model, tok = hf_dir
    eot = tok.token_to_id(EOT)
    out = tmp_path_factory.mktemp("eot")
    twin = Decoder(model.config)
    twin.load_state_dict({n: p.data.copy() for n, p in model.named_parameters()}, strict=False)
    v = np.random.default_rng(0).normal(size=model.config.d_model).astype(np.float32)
    twin.transformer.norm.weight.data[...] = 0.0  # the last hidden state is v everywhere
    twin.transformer.norm.bias.data[...] = v
    twin.lm_head.weight.data[eot] = 3.0 * v / (v @ v)
    twin.save_pretrained(out)
    tok.save(out / "tokenizer.json")
    return out, eot


def test_sampling_stops_at_end_of_text_and_does_not_print_it(eot_dir):
    path, eot = eot_dir
    record = json.loads(run("generate", "-m", path, "-p", "the", "-n", 200, "--json").output)
    ids = [t["id"] for t in record["tokens"]]
    assert record["finish_reason"] == "eos" and ids[-1] == eot and eot not in ids[:-1]
    assert EOT not in record["text"] and len(ids) < 200  # was: 200 tokens, eot printed
    streamed = run("generate", "-m", path, "-p", "the", "-n", 200)
    assert streamed.exit_code == 0 and streamed.output == "the" + record["text"] + "\n"
    on = json.loads(run("generate", "-m", path, "-p", "the", "-n", 200, "--json",
                        "--ignore-eos").output)
    assert len(on["tokens"]) == 200 and [t["id"] for t in on["tokens"]].count(eot) > 1
    assert on["finish_reason"] == "length" and EOT not in on["text"]
    shown = run("generate", "-m", path, "-p", "the", "-n", 200, "--ignore-eos",
                "--show-special")
    assert shown.output.count(EOT) == [t["id"] for t in on["tokens"]].count(eot)
    assert run("generate", "-m", path, "-p", "the", "-n", 200, "--ignore-eos").output \
        == "the" + on["text"] + "\n"


def test_beam_search_and_speculative_stop_at_end_of_text(eot_dir, tmp_path):
    path, eot = eot_dir
    for extra in (["--num-beams", 2], ["--draft-model", path]):
        record = json.loads(run("generate", "-m", path, "-p", "the", "-n", 40, "--json",
                                *extra).output)
        ids = [t["id"] for t in record["tokens"]]
        assert ids[-1] == eot and eot not in ids[:-1] and record["finish_reason"] == "eos"
        text = run("generate", "-m", path, "-p", "the", "-n", 40, *extra).output
        assert text == "the" + record["text"] + "\n" and EOT not in text


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("option", ["--temperature", "--top-p", "--min-p",
                                    "--repetition-penalty", "--frequency-penalty",
                                    "--presence-penalty", "--length-penalty"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nan_and_inf_are_refused(hf_dir, option, value):
    path, _, _ = hf_dir
    result = run("generate", "-m", path, "-p", "the", "-n", 3, option, value)
    assert result.exit_code == 2 and "not a finite number" in result.output, result.output


def test_an_empty_stop_is_refused(hf_dir):
    path, _, _ = hf_dir
    result = run("generate", "-m", path, "-p", "the", "-n", 3, "--stop", "")
    assert result.exit_code == 2 and "--stop" in result.output and "empty" in result.output


def test_a_binary_prompt_file_is_one_error_line(hf_dir, tmp_path):
    path, _, _ = hf_dir
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)))
    result = run("generate", "-m", path, "--prompt-file", binary)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1
    assert "not valid UTF-8" in result.output and "model.bin" in result.output
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffthe dog".encode("utf-8"))
    record = json.loads(run("generate", "-m", path, "--prompt-file", bom, "-n", 1,
                            "--json").output)
    assert record["prompt"] == "the dog"


def test_half_on_the_cpu_is_refused(hf_dir):
    path, _, _ = hf_dir
    result = run("generate", "-m", path, "-p", "the", "-n", 3, "--half")
    assert result.exit_code == 2 and "--half needs --device cuda" in result.output


def test_special_tokens_in_the_prompt_need_allow_special(hf_dir):
    path, _, tok = hf_dir
    prompt = f"the cat{EOT}the"
    refused = run("generate", "-m", path, "-p", prompt, "-n", 3)
    assert refused.exit_code == 2 and "--allow-special" in refused.output
    assert "allowed_special" not in refused.output and "disallowed_special" not in refused.output
    allowed = run("generate", "-m", path, "-p", prompt, "-n", 3, "-t", 0, "--json",
                  "--allow-special")
    assert allowed.exit_code == 0, allowed.output
    ids = tok.encode(prompt, allowed_special="all")
    assert tok.token_to_id(EOT) in ids
    out = generate(model_of(hf_dir), [ids], 3, temperature=0, tokenizer=tok)
    assert [t["id"] for t in json.loads(allowed.output)["tokens"]] == out.tokens[0]


def model_of(fixture):
    return fixture[1]


def test_a_damaged_run_is_reported_without_a_flag_generate_lacks(tmp_path):
    from train_helpers import train_cli, write_corpus

    out = tmp_path / "run"
    trained = train_cli(tmp_path, write_corpus(tmp_path / "corpus.txt", 400), out)
    assert trained.exit_code == 0, trained.output
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    result = run("generate", "-m", out, "-p", "the")
    assert result.exit_code == 2 and "truncated" in result.output
    assert "start over with --overwrite" not in result.output  # generate has no --overwrite
    assert "tinylm train" in result.output


# --------------------------------------------------------------------------- option groups


def test_option_group_hands_the_command_one_object():
    import click

    @click.command()
    @option_group("sampling", SamplingConfig,
                  click.option("--temperature", type=float, default=1.0),
                  click.option("--top-k", type=int, default=None))
    @click.option("--seed", type=int, default=0)
    def command(sampling, seed):
        click.echo(f"{sampling.temperature} {sampling.top_k} {seed}")

    result = CliRunner().invoke(command, ["--top-k", "5", "--seed", "2"])
    assert result.output == "1.0 5 2\n"
    assert [p.name for p in command.params] == ["temperature", "top_k", "seed"]


def test_help_shows_no_range_for_an_unbounded_float():
    help = run("generate", "--help").output
    block = help.split("--frequency-penalty ", 1)[1].split("\n  -", 1)[0]
    assert block.startswith("FLOAT ") and "RANGE" not in block and "None" not in help
    assert "[default:" in block and "0.0]" in " ".join(block.split())

"""A third sweep of bad inputs, for what the second (test_cli_errors_sweep.py) found and
left: options a model config cannot mean, files of the wrong kind handed to a reader,
damaged compressed inputs, adapter ranks that are no rank, and defaults that do not fit
the model given. Each is one `Error:` line on stderr, exit code 2 and no traceback, or
(where the fix changes a result) checked against what the result should be."""

from __future__ import annotations

import json

import pytest

from cli_helpers import gguf_variants, one_error_line, run
from generate_helpers import tiny_hf_gpt
from train_helpers import corpus_text

LLAMA = """architecture = "llama"
vocab_size = 100
d_model = 16
n_layer = 1
n_head = 2
d_ff = 32
max_positions = 32
"""


@pytest.fixture(scope="module")
def p(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep2")
    (tmp / "corpus.txt").write_text(corpus_text(400), encoding="utf-8")
    hf = tmp / "hf"
    hf.mkdir()
    tiny_hf_gpt(hf, corpus_text(300))
    return {"tmp": tmp, "hf": hf, "corpus.txt": tmp / "corpus.txt"}


# positional_options -> fragments; each was a ValueError traceback (float("x"), int("aa"))
POSITIONAL = {
    '{ base = "x" }': ["base = 'x' is not a number > 0", "positional_options"],
    "{ base = -2.0 }": ["base = -2.0 is not a number > 0"],
    '{ fraction = "a" }': ["fraction = 'a' is not a number > 0 and <= 1"],
    "{ fraction = 2.0 }": ["fraction = 2.0 is not a number"],
    '{ interleaved = "no" }': ["interleaved = 'no' is not true or false"],
}


@pytest.mark.parametrize("options", POSITIONAL)
def test_a_positional_option_of_the_wrong_kind_is_one_error_line(p, options):
    path = p["tmp"] / "model.toml"
    path.write_text(LLAMA + f"positional_options = {options}\n")
    one_error_line(run("info", path), *POSITIONAL[options])


@pytest.mark.parametrize("scheme,options,fragment", [
    ("sinusoidal", '{ base = "x" }', "sinusoidal positional option base"),
    ("t5", "{ num_buckets = 2.5 }", "num_buckets = 2.5 is not an integer"),
    ("t5", "{ num_buckets = 1 }", "leave no log-spaced buckets"),
    ("alibi", '{ bidirectional = "yes" }', "bidirectional = 'yes' is not true or false"),
])
def test_the_other_schemes_check_their_options_too(p, scheme, options, fragment):
    path = p["tmp"] / f"{scheme}.toml"
    path.write_text(LLAMA + f'positional = "{scheme}"\npositional_options = {options}\n')
    one_error_line(run("info", path), fragment)


def test_good_positional_options_still_build(p):
    path = p["tmp"] / "good.toml"
    path.write_text(LLAMA + "positional_options = { base = 500000, fraction = 0.5 }\n")
    result = run("info", path, "--json")
    assert result.exit_code == 0, result.output


def test_info_counts_a_gguf_token_list_of_any_kind():
    """``len(tokens or ())`` asked a NumPy array for its truth value (a ValueError). Only
    a latent bug through a file: loading refuses a token list that is not strings first."""
    import numpy as np

    from tinylm.models.info import _count

    assert _count(np.array([5, 6, 7])) == 3 and _count(["a", "b"]) == 2
    assert _count(None) == 0 and _count([]) == 0


@pytest.fixture(scope="module")
def gguf_variant(p):
    return gguf_variants(p["tmp"], p["hf"])


def test_eval_ignores_a_gguf_bos_id_outside_the_vocabulary(p, gguf_variant):
    """add_bos_token with bos_token_id 99999: the evaluation put 99999 before every
    window, raw, and failed in the embedding; now it is ignored (as llama.cpp and the
    model's import do), and the scores are those of the file that asks for no BOS."""
    from tinylm.formats.gguf import GGUFValue, ValueType as V

    add = {"tokenizer.ggml.add_bos_token": GGUFValue(V.BOOL, True)}
    bad = gguf_variant("bad_bos.gguf", {**add, "tokenizer.ggml.bos_token_id":
                                        GGUFValue(V.UINT32, 99999)})
    none = gguf_variant("no_bos.gguf", {"tokenizer.ggml.add_bos_token": GGUFValue(V.BOOL,
                                                                                  False)})
    good = gguf_variant("bos_7.gguf", {**add, "tokenizer.ggml.bos_token_id":
                                       GGUFValue(V.UINT32, 7)})
    scores = {}
    for name, path in (("bad", bad), ("none", none), ("good", good)):
        result = run("eval", "perplexity", "-m", path, "--data", p["corpus.txt"],
                     "--no-progress", "--json", "--max-length", "32")
        assert result.exit_code == 0, (name, result.output)
        scores[name] = json.loads(result.stdout)["results"][0]
    assert scores["bad"] == scores["none"]
    assert scores["good"] != scores["none"]  # a BOS in range is still used


@pytest.fixture(scope="module")
def cut_gz(p):
    """A .jsonl.gz cut in half (complete lines before the cut) and one cut after 40
    bytes (no complete line), with the records they came from."""
    import gzip

    records = [{"text": f"Document number {i} says a few words about the cat."}
               for i in range(3000)]
    blob = gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode())
    (p["tmp"] / "half.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    (p["tmp"] / "stub.jsonl.gz").write_bytes(blob[:40])
    corrupt = bytearray(blob)
    corrupt[len(blob) // 2] ^= 0xFF
    (p["tmp"] / "corrupt.jsonl.gz").write_bytes(bytes(corrupt))
    return records


@pytest.mark.parametrize("name", ["half", "stub"])
@pytest.mark.parametrize("stage", ["clean", "dedup", "tokenize"])
def test_a_truncated_gz_input_is_one_error_naming_it(p, cut_gz, tmp_path, name, stage):
    """A cut download gave exit 0 and "kept 0 of 0 documents" (the cut counted as one
    bad record, on a line of its own); now it is refused, by name, and no shard is made."""
    path = p["tmp"] / f"{name}.jsonl.gz"
    extra = ["-t", p["hf"] / "tokenizer.json"] if stage == "tokenize" else []
    out = tmp_path / "out"
    line = one_error_line(run("data", stage, path, *extra, "-o", out, "--no-progress"),
                          f"{path} is truncated", "gzip stream ends before its end marker",
                          "get a complete copy")
    assert line.count(str(path)) == 1
    written = [f for f in out.rglob("*") if f.is_file()] if out.exists() else []
    assert not [f for f in written if ".jsonl" in f.name or f.suffix == ".bin"], written


def test_a_corrupt_gz_input_is_one_error(p, cut_gz, tmp_path):
    one_error_line(run("data", "clean", p["tmp"] / "corrupt.jsonl.gz", "-o", tmp_path / "o",
                       "--no-progress"), "corrupt.jsonl.gz is corrupt", "does not decompress")


def test_keep_damaged_reads_what_came_before_the_cut(p, cut_gz):
    """The library can still keep a damaged file's complete records, when asked."""
    from tinylm.webdata.readers import ReadStats, WebDataError, read_documents

    path = p["tmp"] / "half.jsonl.gz"
    with pytest.raises(WebDataError, match="is truncated"):
        list(read_documents(path))
    stats = ReadStats(str(path))
    docs = list(read_documents(path, stats=stats, keep_damaged=True))
    assert 500 < len(docs) < 3000 and stats.bad == {"truncated_stream": 1}
    assert [d.text for d in docs] == [r["text"] for r in cut_gz[: len(docs)]]


def test_an_output_folder_that_cannot_be_made_is_a_clear_error(p, tmp_path):
    """The stages' own os.makedirs (the Python API has no -o check in front of it) was an
    OSError traceback."""
    from tinylm.webdata.clean import clean_corpus
    from tinylm.webdata.dedup import dedup_corpus
    from tinylm.webdata.readers import WebDataError

    (tmp_path / "a_file").write_text("x")
    for stage in (clean_corpus, dedup_corpus):
        with pytest.raises(WebDataError, match="cannot create the folder .*a_file"):
            stage([p["corpus.txt"]], str(tmp_path / "a_file" / "out"), show_progress=False)
        with pytest.raises(WebDataError, match="a file of that name is in the way"):
            stage([p["corpus.txt"]], str(tmp_path / "a_file"), show_progress=False)


def test_a_folder_given_as_a_file_is_said_once(tmp_path):
    """A folder handed to a one-file reader was "is not a regular file, not a regular
    file; give a text file, a JSONL file or a folder of them" (a folder was what it got)."""
    from tinylm.data import DataError, check_regular_file, read_utf8

    for call in (lambda: check_regular_file(str(tmp_path)), lambda: read_utf8(tmp_path)):
        with pytest.raises(DataError) as e:
            call()
        message = str(e.value)
        assert "is a folder, not a file; give a file" in message
        assert message.count("regular file") == 0 and "\n" not in message


def test_read_utf8_of_a_binary_file_says_what_to_give(tmp_path):
    from tinylm.data import DataError, read_utf8

    (tmp_path / "b.bin").write_bytes(b"ok\xff\xfe")
    with pytest.raises(DataError, match=r"b.bin is not UTF-8 text \(byte 2\); give a text "
                                        r"file, saved as UTF-8"):
        read_utf8(tmp_path / "b.bin")


def test_eval_perplexity_of_a_binary_file_says_what_to_give(p):
    """Was "cannot read X as UTF-8 text: 'utf-8' codec can't decode byte 0xff ..."."""
    binary = p["tmp"] / "scores.bin"
    binary.write_bytes(b"ab\xff\xfe\x00\x01")
    one_error_line(run("eval", "perplexity", "-m", p["hf"], "--data", binary),
                   "scores.bin is not UTF-8 text (byte 2)", "saved as UTF-8")


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_a_binary_config_file_says_what_to_give(tmp_path, suffix):
    """A model config that is a binary file said only "cannot parse X: 'utf-8' codec
    can't decode byte 0xff in position 0" (read_config_data is the shared reader)."""
    from tinylm.config_files import read_config_data
    from tinylm.errors import ConfigError

    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\xff\xfe\x00garbage")
    kind = "TOML" if suffix == ".toml" else "JSON"
    with pytest.raises(ConfigError, match=rf"model{suffix} is not a {kind} config: byte 0 is "
                                          rf"not UTF-8 text .*give a .toml or .json config"):
        read_config_data(path)
    path.write_text("a = [" if suffix == ".toml" else "{")
    with pytest.raises(ConfigError, match=rf"cannot parse .*; fix the {kind} there"):
        read_config_data(path)
    path.write_text('vocab_size = 5\n' if suffix == ".toml" else '{"vocab_size": 5}')
    assert read_config_data(path) == {"vocab_size": 5}
    with pytest.raises(ConfigError, match="is a folder; give a .toml or .json"):
        read_config_data(tmp_path)


def test_a_gguf_file_is_a_tokenizer_file(p, gguf_variant):
    """-t model.gguf said "line 1 is not valid UTF-8 (byte 323); the file is corrupted or
    is not a tokenizer file"; it holds the model's tokenizer, which is now read."""
    good = gguf_variant("tok.gguf", {})
    text = "the cat sat on the mat, hello"
    ours = run("tokenize", "encode", "-t", good, text)
    source = run("tokenize", "encode", "-t", p["hf"] / "tokenizer.json", text)
    assert ours.exit_code == 0, ours.output
    assert ours.stdout == source.stdout and len(ours.stdout.split()) > 3


def test_a_json_of_ids_without_merges_says_what_is_expected(p):
    """{"a": 1} said "tokenizer file 'merges.txt' does not exist"."""
    path = p["tmp"] / "ids" / "a.json"
    path.parent.mkdir()
    path.write_text('{"a": 1}')
    one_error_line(run("tokenize", "encode", "-t", path, "hello"),
                   "reads as a GPT-2 vocab.json", "no merges.txt beside it",
                   "give a Hugging Face tokenizer.json or a tinylm tokenizer file")


@pytest.fixture(scope="module")
def lora_dir(p):
    """A LoRA adapter (r = 2) of the tiny model, one step trained."""
    records = [{"prompt": "the cat", "completion": " sat"}] * 4
    (p["tmp"] / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = p["tmp"] / "lora"
    result = run("finetune", "-m", p["hf"], "--data", p["tmp"] / "sft.jsonl", "--peft",
                 "lora", "--lora-r", "2", "-o", out, "--max-steps", "1", "--no-progress")
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("field,value,fragment", [
    ("r", -3, "lora r must be a positive integer, got -3"),
    ("r", 0, "lora r must be a positive integer, got 0"),
    ("r", 2.5, "lora r must be a positive integer, got 2.5"),
    ("r", "two", "lora r must be a positive integer, got 'two'"),
    ("rank_pattern", {"c_attn": -1}, "rank_pattern['c_attn'] must be a positive integer"),
    ("use_dora", "false", "use_dora must be true or false"),
])
def test_an_adapter_config_with_no_rank_is_refused_as_such(p, lora_dir, tmp_path, field,
                                                            value, fragment):
    """r = -3 was accepted and found out as tensor shapes "(-3, 32)"; a string
    use_dora "false" was taken as true."""
    import shutil

    bad = tmp_path / "adapter"
    shutil.copytree(lora_dir, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, field: value}))
    line = one_error_line(run("generate", "-m", p["hf"], "--adapter", bad, "-p", "the",
                              "-n", "1"), "adapter_config.json", fragment)
    assert "shape" not in line
    assert run("generate", "-m", p["hf"], "--adapter", lora_dir, "-p", "the",
               "-n", "1").exit_code == 0


def test_serve_max_tokens_past_the_context_is_refused_at_startup(p):
    """--max-tokens 100 with --context 32 was clamped to 32, silently; now the server
    does not start. (Run as a process with a timeout: before, it started and served.)"""
    import subprocess
    import sys
    from pathlib import Path

    tinylm = Path(sys.executable).with_name("tinylm")
    args = [str(tinylm), "serve", "-m", str(p["hf"]), "--port", "0"]
    for extra, fragment in ((["--context", "32", "--max-tokens", "100"],
                             "--max-tokens 100 does not fit the context of 32 positions"),
                            (["--max-tokens", "65"], "give 1 to 64")):
        done = subprocess.run(args + extra, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, (done.returncode, done.stderr)
        assert "Traceback" not in done.stderr and fragment in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_serve_max_tokens_equal_to_the_context_is_still_allowed(p):
    from tinylm.loading import load_model
    from tinylm.serve.server import ServerConfig

    model, _ = load_model(p["hf"])
    assert ServerConfig(max_tokens=64).check(model) == 64
    assert ServerConfig(max_tokens=32, context=32).check(model) == 32


def test_a_request_past_the_context_is_an_openai_400(p):
    """Per request, max_tokens past the context was already a 400 with an OpenAI error
    body; checked here against a server whose --max-tokens is below the context."""
    import urllib.error
    import urllib.request

    from tinylm.loading import load_model
    from tinylm.serve.server import Server, ServerConfig

    model, tok = load_model(p["hf"])
    server = Server(model, tok, ServerConfig(port=0, context=32, max_tokens=8))
    server.start()
    try:
        def post(body):
            req = urllib.request.Request(f"http://127.0.0.1:{server.port}/v1/completions",
                                         json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        ok = post({"model": "tinylm", "prompt": [5, 6], "max_tokens": 8})
        assert ok[0] == 200 and ok[1]["usage"]["completion_tokens"] <= 8
        for max_tokens, code in ((31, "invalid_value"), (40, "invalid_value")):
            status, body = post({"model": "tinylm", "prompt": [5, 6], "max_tokens": max_tokens})
            assert status == 400, body
            assert body["error"]["param"] == "max_tokens" and body["error"]["code"] == code
            assert body["error"]["type"] == "invalid_request_error"
        status, body = post({"model": "tinylm", "prompt": [5] * 30, "max_tokens": 5})
        assert status == 400 and body["error"]["code"] == "context_length_exceeded", body
    finally:
        server.close()


def test_grpo_with_no_completion_length_picks_what_fits_the_model(p, tmp_path):
    """A fixed max_completion_length of 256 refused every model of a 64-token context
    ("--block-size 64 leaves no room for the prompt"); None (RLConfig's default) is now
    min(256, block size - the longest prompt), recorded as that number."""
    from tinylm.align.rl import DEFAULT_COMPLETION_LENGTH, RLConfig
    from tinylm.align.rl_run import run as rl_run
    from tinylm.finetune import FinetuneSpec
    from tinylm.tokenizers import from_file

    prompts = ["the cat", "the cat sat on the mat and the dog"]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": t, "answer": "x"}) + "\n" for t in prompts))
    longest = max(len(from_file(p["hf"] / "tokenizer.json").encode(t)) for t in prompts)
    assert RLConfig("grpo").max_completion_length is None and DEFAULT_COMPLETION_LENGTH == 256
    said = []
    result = rl_run(FinetuneSpec(str(p["hf"]), "lora", {"r": 2}),
                    {"out_dir": str(tmp_path / "run"), "data": [str(data)], "max_steps": 1,
                     "batch_size": 2}, RLConfig("grpo", num_generations=2),
                    rewards=["exact-match"], log=said.append)
    assert result["step"] == 1
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    assert state["extra"]["rl"]["max_completion_length"] == 64 - longest
    assert any(f"max completion length: {64 - longest} tokens" in s for s in said), said
    # a length given is kept, and one that does not fit is still refused
    from tinylm.errors import ConfigError

    with pytest.raises(ConfigError, match="leaves no room for the prompt"):
        rl_run(FinetuneSpec(str(p["hf"]), "lora", {"r": 2}),
               {"out_dir": str(tmp_path / "run2"), "data": [str(data)], "max_steps": 1},
               RLConfig("grpo", num_generations=2, max_completion_length=256),
               rewards=["exact-match"])

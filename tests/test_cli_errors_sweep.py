"""A second sweep of bad inputs, over what test_cli_errors.py does not cover as closely
(data, plugins new, eval, audit, quantize, finetune, align, tokenize, info, and loading
GGUF files and run folders): an output path that cannot be written, a folder where a
file goes, options that cannot mean anything for the model given, text that is not
UTF-8, damaged metadata. Each is one `Error:` line on stderr, exit code 2, no
traceback, refused before any work is done and with nothing written; the few fixes
that change a result (quantize, info, GGUF special ids) are checked against it."""

from __future__ import annotations

import json
import os

import pytest

from cli_helpers import gguf_variants, one_error_line, run
from generate_helpers import tiny_hf_gpt
from train_helpers import corpus_text

# a folder no one can create anything in, even root (procfs refuses new entries)
UNWRITABLE = "/proc/tinylm-sweep"
needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")


@pytest.fixture(scope="module")
def p(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    (tmp / "corpus.txt").write_text(corpus_text(400), encoding="utf-8")
    (tmp / "a_file").write_text("not a folder\n")
    (tmp / "folder").mkdir()
    hf = tmp / "hf"
    hf.mkdir()
    tiny_hf_gpt(hf, corpus_text(300))
    records = [{"prompt": "the cat", "completion": " sat"}] * 4
    (tmp / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    pairs = [{"prompt": "the", "chosen": " cat", "rejected": " dog"}] * 4
    (tmp / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    mc = [{"question": "the cat", "choices": ["sat", "ran"], "answer": 0}] * 2
    (tmp / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    (tmp / "empty.jsonl").write_text("\n\n")
    names = ("corpus.txt", "a_file", "folder", "hf", "sft.jsonl", "pref.jsonl", "mc.jsonl",
             "empty.jsonl")
    return {n: tmp / n for n in names} | {"tmp": tmp, "missing": tmp / "missing"}


def listing(root) -> list:
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, files in os.walk(root) for f in files + [""])


CANARY = ["--format", "secret {d}{d}{d}"]

# name -> (arguments, fragments the error line must hold); "{x}" is p["x"]
CASES = {
    # output folders that cannot be created: refused before reading anything
    "data clean -o under a file": (["data", "clean", "{corpus.txt}", "-o", "{a_file}/out"],
                                   ["a_file is a file", "pick another -o"]),
    "data dedup -o under a file": (["data", "dedup", "{corpus.txt}", "-o", "{a_file}/out"],
                                   ["is a file"]),
    "data tokenize -o under a file": (["data", "tokenize", "{corpus.txt}", "-t",
                                       "{hf}/tokenizer.json", "-o", "{a_file}/out"],
                                      ["is a file"]),
    "plugins new -o under a file": (["plugins", "new", "demo", "-o", "{a_file}/x"],
                                    ["is a file"]),
    # output files whose folder is missing or a file: refused before the evaluation
    "eval perplexity -o in a missing folder": (["eval", "perplexity", "-m", "{hf}", "--data",
                                                "{corpus.txt}", "-o", "{missing}/r.json"],
                                               ["does not exist", "create it"]),
    "eval mc -o under a file": (["eval", "mc", "-m", "{hf}", "--task", "{mc.jsonl}", "-o",
                                 "{a_file}/r.json"], ["is a file, not a folder"]),
    "eval glue --predictions in a missing folder": (["eval", "glue", "-m", "{hf}", "--task",
                                                     "sst2", "--data", "{corpus.txt}",
                                                     "--predictions", "{missing}/p.tsv"],
                                                    ["--predictions", "does not exist"]),
    "audit canaries insert --manifest in a missing folder": (
        ["audit", "canaries", "insert", "--data", "{corpus.txt}", "--out", "{tmp}/c.txt",
         "--manifest", "{missing}/m.json", *CANARY], ["--manifest", "does not exist"]),
    "audit canaries insert --out in a missing folder": (
        ["audit", "canaries", "insert", "--data", "{corpus.txt}", "--out", "{missing}/c.txt",
         *CANARY], ["--out", "does not exist"]),
    "audit extraction --report under a file": (
        ["audit", "extraction", "-m", "{hf}", "--train", "{corpus.txt}", "--heldout",
         "{corpus.txt}", "--report", "{a_file}/rep"], ["--report", "is a file"]),
    # fine-tuning data is JSONL files: a folder was "not a regular file, not a regular
    # file; give ... a folder of them"
    "finetune --data a folder": (["finetune", "-m", "{hf}", "--data", "{folder}", "-o",
                                  "{tmp}/run"], ["--data", "is a directory"]),
    "finetune --eval-data a folder": (["finetune", "-m", "{hf}", "--data", "{sft.jsonl}",
                                       "--eval-data", "{folder}", "-o", "{tmp}/run"],
                                      ["--eval-data", "is a directory"]),
    "align dpo --data a folder": (["align", "dpo", "-m", "{hf}", "--data", "{folder}", "-o",
                                   "{tmp}/run"], ["--data", "is a directory"]),
    "align reward --eval-data a folder": (["align", "reward", "-m", "{hf}", "--data",
                                           "{pref.jsonl}", "--eval-data", "{folder}", "-o",
                                           "{tmp}/run"], ["--eval-data", "is a directory"]),
    "align grpo --data a folder": (["align", "grpo", "-m", "{hf}", "--data", "{folder}", "-o",
                                    "{tmp}/run"], ["--data", "is a directory"]),
    # windows past the model's positions were scored at clamped positions: numbers, no
    # error; an id past the vocabulary failed in the embedding
    "eval perplexity --max-length past max_positions": (
        ["eval", "perplexity", "-m", "{hf}", "--data", "{corpus.txt}", "--no-progress",
         "--max-length", "65"], ["--max-length 65", "max_positions (64)", "at most 64"]),
    "eval mc --max-length past max_positions": (
        ["eval", "mc", "-m", "{hf}", "--task", "{mc.jsonl}", "--no-progress", "--max-length",
         "1000"], ["--max-length 1000", "at most 64"]),
    "eval perplexity --prefix-token-id past the vocabulary": (
        ["eval", "perplexity", "-m", "{hf}", "--data", "{corpus.txt}", "--no-progress",
         "--prefix-token-id", "300"], ["--prefix-token-id 300", "ids 0 to 299"]),
    # a --skip pattern that matches nothing quantized the layer it meant, silently
    "quantize --skip matching no layer": (["quantize", "{hf}", "--to", "q8_0", "--skip",
                                           "lm_haed", "-o", "{tmp}/q"],
                                          ["--skip 'lm_haed' matches no layer",
                                           "transformer.blocks.0.attn.qkv"]),
    "quantize --skip ''": (["quantize", "{hf}", "--to", "q8_0", "--skip", "", "-o",
                            "{tmp}/q"], ["--skip", "must not be empty"]),
    # a tokenizer file that is not there was looked up as a name: "unknown tokenizer"
    "train --tokenizer a missing file": (["train", "--data", "{corpus.txt}", "--out",
                                          "{tmp}/run", "--tokenizer", "{missing}/tok.json"],
                                         ["no tokenizer file", "tok.json", "char"]),
    # an examples file without examples gave a zero-shot prompt, silently
    "generate --few-shot an empty file": (["generate", "-m", "{hf}", "--few-shot",
                                           "{empty.jsonl}", "-p", "q", "-n", "1"],
                                          ["holds no examples", "leave --few-shot out"]),
    # with --nproc, each rank said it ("Error: rank 1 of 2: ..." twice, then MPI_Abort)
    "train --nproc 2 with a bad setting": (["train", "--data", "{corpus.txt}", "--out",
                                            "{tmp}/run", "--nproc", "2", "-s", "lr=-1"],
                                           ["invalid training config: lr must be > 0"]),
    # a file inside a model folder: say which folder to pass
    "generate -m the folder's model.safetensors": (["generate", "-m",
                                                    "{hf}/model.safetensors", "-p", "a"],
                                                   ["is not a directory",
                                                    "pass the folder that holds it"]),
    # an argument that is not UTF-8 (Python hands it over with lone surrogates) ended in
    # "... or encode its bytes with encode_bytes", a Python call
    "generate -p not UTF-8": (["generate", "-m", "{hf}", "-p", "a\udcffb", "-n", "1"],
                              ["--prompt", "not UTF-8 text", "character 1"]),
    "generate --stop not UTF-8": (["generate", "-m", "{hf}", "-p", "a", "--stop", "\udcff"],
                                  ["--stop", "not UTF-8 text"]),
    "tokenize encode TEXT not UTF-8": (["tokenize", "encode", "-t", "{hf}/tokenizer.json",
                                        "x\udcfe"], ["not UTF-8 text", "character 1"]),
    # past the context, greedy decoding slides its window off the prefix: not the
    # k-extractability the audit reports (it printed numbers, exit 0)
    "audit extraction --prefix + --suffix past the context": (
        ["audit", "extraction", "-m", "{hf}", "--train", "{corpus.txt}", "--heldout",
         "{corpus.txt}", "--prefix", "40", "--suffix", "40", "--no-progress"],
        ["do not fit the model's 64 positions", "at most 65"]),
}

UNWRITABLE_CASES = {
    "data clean -o unwritable": ["data", "clean", "{corpus.txt}", "-o", UNWRITABLE],
    "data dedup -o unwritable": ["data", "dedup", "{corpus.txt}", "-o", UNWRITABLE],
    "data tokenize -o unwritable": ["data", "tokenize", "{corpus.txt}", "-t",
                                    "{hf}/tokenizer.json", "-o", UNWRITABLE],
    "plugins new -o unwritable": ["plugins", "new", "demo", "-o", UNWRITABLE],
    "eval perplexity -o unwritable": ["eval", "perplexity", "-m", "{hf}", "--data",
                                      "{corpus.txt}", "-o", "/proc/r.json"],
    "audit canaries insert --manifest unwritable": ["audit", "canaries", "insert", "--data",
                                                    "{corpus.txt}", "--out", "{tmp}/c.txt",
                                                    "--manifest", "/proc/m.json", *CANARY],
}


def fill(p, args):
    out = []
    for a in args:
        for key, value in p.items():
            a = a.replace("{" + key + "}", str(value))
        out.append(a)
    return out


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_error_line(p, name):
    args, fragments = CASES[name]
    before = listing(p["tmp"])
    one_error_line(run(*fill(p, args)), *fragments)
    assert listing(p["tmp"]) == before  # nothing written, no folder left behind


@needs_proc
@pytest.mark.parametrize("name", UNWRITABLE_CASES)
def test_an_unwritable_output_is_one_error_line(p, name):
    before = listing(p["tmp"])
    one_error_line(run(*fill(p, UNWRITABLE_CASES[name])), "cannot write",
                   "pick a folder you may write to")
    assert listing(p["tmp"]) == before


def test_the_output_checks_leave_a_good_path_as_it_was(p, tmp_path):
    """A folder the check had to create is removed again, and the command still works."""
    out = tmp_path / "a" / "b"
    result = run("data", "clean", p["corpus.txt"], "-o", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert (out / "clean.stats.json").is_file()
    one_error_line(run("data", "clean", p["missing"], "-o", tmp_path / "c" / "d"), "missing")
    assert not (tmp_path / "c").exists()  # the checked (and created) folders are gone
    # a folder name too long to create, below one the check could create: both refused
    # and gone
    one_error_line(run("data", "clean", p["corpus.txt"], "-o", tmp_path / "e" / ("x" * 300)),
                   "cannot write into the folder")
    assert not (tmp_path / "e").exists()


def test_the_largest_window_and_id_the_model_takes_still_work(p):
    """The bounds above are the model's own: --max-length 64 and id 299 are fine."""
    ok = run("eval", "perplexity", "-m", p["hf"], "--data", p["corpus.txt"], "--no-progress",
             "--json", "--max-length", "64", "--prefix-token-id", "299")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["results"][0]["max_length"] == 64


def test_quantizing_a_quantized_model_requantizes_every_layer(p, tmp_path):
    """A q8_0 GGUF quantized to int8 was written with its q8_0 layers kept, under the
    name int8 ("9 layers in int8"); now every layer is int8, from float32 weights."""
    gguf = tmp_path / "m.gguf"
    assert run("quantize", p["hf"], "--to", "q8_0", "-o", gguf).exit_code == 0
    out = tmp_path / "int8"
    result = run("quantize", gguf, "--to", "int8", "-o", out)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "config.json").read_text())["quantization"]
    formats = {t["format"] for t in record["tensors"].values()}
    assert record["scheme"] == "int8" and formats == {"int8"}, formats
    layers = {t["layer"] for t in record["tensors"].values()}
    assert layers == {"linear"}  # int8 leaves the embedding float
    assert f"{len(record['tensors'])} layers in int8" in result.stdout


def test_info_reads_a_quantize_folder_as_its_float_model(p, tmp_path):
    """`tinylm info` of a `tinylm quantize` folder was "unknown GPT2Config field(s)
    ['quantization']"; now it reports the model the folder holds."""
    out = tmp_path / "q"
    assert run("quantize", p["hf"], "--to", "int8", "-o", out).exit_code == 0
    ours, source = run("info", out, "--json"), run("info", p["hf"], "--json")
    assert ours.exit_code == 0, ours.output
    assert "quantized to int8" in ours.stderr
    assert json.loads(ours.stdout)["parameters"] == json.loads(source.stdout)["parameters"]


@pytest.fixture(scope="module")
def gguf_variant(p):
    return gguf_variants(p["tmp"], p["hf"])


def _gguf_cases():
    from tinylm.formats.gguf import GGUFValue, ValueType as V

    # name -> (fields, fragments); each was a ValueError traceback
    return {
        "block_count a string": ({"gpt2.block_count": GGUFValue(V.STRING, "two")},
                                 ["'gpt2.block_count' is 'two', not an integer", "re-export"]),
        "eos id a string": ({"tokenizer.ggml.eos_token_id": GGUFValue(V.STRING, "x")},
                            ["eos_token_id is 'x', not a token id"]),
        "tokens a list of ints": ({"tokenizer.ggml.tokens": GGUFValue(V.ARRAY, [1] * 300,
                                                                      V.INT32)},
                                  ["tokenizer.ggml.tokens is not a list of strings"]),
    }


@pytest.mark.parametrize("case", list(_gguf_cases()))
@pytest.mark.parametrize("command", ["generate", "info", "eval perplexity"])
def test_a_gguf_metadata_value_of_the_wrong_type_is_one_error_line(p, gguf_variant, case,
                                                                    command):
    fields, fragments = _gguf_cases()[case]
    path = gguf_variant(case.replace(" ", "_") + ".gguf", fields)
    args = {"generate": ["generate", "-m", path, "-p", "the", "-n", "1"],
            "info": ["info", path],
            "eval perplexity": ["eval", "perplexity", "-m", path, "--data", p["corpus.txt"]]}
    one_error_line(run(*args[command]), *fragments)


def test_a_gguf_special_token_id_outside_the_vocabulary_is_ignored(gguf_variant):
    """As llama.cpp does ("bad special token ... using default"): the model loads, with
    no BOS id, instead of a config whose bos_token_id 99999 fails in the embedding."""
    from tinylm.formats.gguf import GGUFValue, ValueType as V
    from tinylm.loading import load_model

    path = gguf_variant("bad_bos.gguf", {"tokenizer.ggml.bos_token_id": GGUFValue(V.UINT32,
                                                                                  99999),
                                         "tokenizer.ggml.eos_token_id": GGUFValue(V.UINT32,
                                                                                  7)})
    model, _ = load_model(path)
    assert model.config.bos_token_id is None and model.config.eos_token_id == 7


def test_an_untrainable_tokenizer_type_names_the_ones_that_train(p, tmp_path):
    """--type wordpiece said "load a vocabulary with from_file" (a Python call, not a
    command); now the line lists the types --type can train, each of which trains."""
    line = one_error_line(run("tokenize", "train", p["corpus.txt"], "--type", "wordpiece",
                              "-o", tmp_path / "t.txt"), "not trained by tinylm")
    listed = line.split("--type can train ")[1].split(", ")
    assert "wordpiece" not in listed and {"bpe", "char"} <= set(listed)
    for kind in listed:
        result = run("tokenize", "train", p["corpus.txt"], "--type", kind, "-n", "300",
                     "--no-progress", "-o", tmp_path / f"{kind}.txt")
        assert result.exit_code == 0, (kind, result.output)
    assert not (tmp_path / "t.txt").exists()


def test_a_chat_line_that_is_not_utf8_is_one_error():
    """--chat reads standard input, which Python decodes with surrogateescape."""
    import io

    from tinylm.commands.generate import _user_lines
    from tinylm.errors import TinyLMError

    lines = _user_lines(io.StringIO("hello\n\n\udcff\udcfe\n"))
    assert next(lines) == "hello"
    with pytest.raises(TinyLMError, match="standard input is not UTF-8 text"):
        next(lines)


def test_train_help_states_the_defaults_train_uses():
    """Every "[default: N]" number in `tinylm train --help` is TrainConfig's default (or
    the small model's, for the [model] options), so the two cannot drift apart."""
    import dataclasses
    import re

    from tinylm.commands.train import _MODEL_OPTIONS, train_command
    from tinylm.train import SMALL_MODEL, TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                if f.default is not dataclasses.MISSING}
    checked = 0
    for param in train_command.params:
        found = re.search(r"\[default: ([^\]]+)\]", param.help or "")
        if not found or not re.fullmatch(r"[0-9.e+-]+|cpu|char|random", found.group(1)):
            continue
        text = found.group(1)
        if param.name in _MODEL_OPTIONS:
            expected = SMALL_MODEL[_MODEL_OPTIONS[param.name]]
        else:
            expected = defaults[param.name]
        got = text if isinstance(expected, str) else float(text)
        assert got == expected, (param.name, text, expected)
        checked += 1
    assert checked >= 18


def test_a_run_folder_with_another_runs_tokenizer_is_refused_at_load(p, tmp_path):
    """A run folder (no trainer_state.json: a model folder) whose tokenizer.txt has more
    ids than the model's embedding loaded, then failed in the embedding mid-generation."""
    import shutil

    from train_helpers import TINY_CLI

    run_dir = tmp_path / "run"
    trained = run("train", "--data", p["corpus.txt"], "--out", run_dir, "--cache-dir",
                  tmp_path / "cache", "--max-steps", "1", *TINY_CLI)
    assert trained.exit_code == 0, trained.output
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.txt"):
        shutil.copy(run_dir / name, model_dir / name)
    assert run("generate", "-m", model_dir, "-p", "the", "-n", "2").exit_code == 0
    big = tmp_path / "big.txt"
    assert run("tokenize", "train", p["corpus.txt"], "--type", "bpe", "-n", "300",
               "--no-progress", "--format", "tinylm", "-o", big).exit_code == 0
    shutil.copy(big, model_dir / "tokenizer.txt")
    one_error_line(run("generate", "-m", model_dir, "-p", "the", "-n", "2"),
                   "the tokenizer has 300 ids", "is not the model's")


def test_extraction_at_the_context_limit_runs(p):
    """The bound is exact: prefix + suffix = max_positions + 1 is the longest that fits."""
    ok = run("audit", "extraction", "-m", p["hf"], "--train", p["corpus.txt"], "--heldout",
             p["corpus.txt"], "--prefix", "40", "--suffix", "25", "--samples", "2",
             "--no-progress", "--json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["results"]["train"]["suffix_tokens"] == 25

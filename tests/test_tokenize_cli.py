"""`tinylm tokenize train / encode / decode`: files the peers can read, exact round
trips through the shell, and user errors as one line with exit code 2."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tinylm.cli import cli
from tinylm.tokenizers import BPETokenizer, CharTokenizer, from_file

TEXT = "The quick brown fox jumps over the lazy dog. Ünïcödé 中文 😀\n" * 40


def run(*args, input=None):
    return CliRunner().invoke(cli, list(args), input=input, prog_name="tinylm")


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def test_train_writes_a_huggingface_tokenizer_json(tmp_path, corpus):
    out = tmp_path / "tok.json"
    result = run("tokenize", "train", str(corpus), "--vocab-size", "300", "-o", str(out),
                 "-s", "<|endoftext|>", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "300 tokens" in result.stderr and str(out) in result.stderr
    tok = from_file(out)
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == 300
    assert tok.special_tokens == {"<|endoftext|>": 0}
    expected = BPETokenizer.train_from_files([corpus], 300, special_tokens=["<|endoftext|>"])
    assert tok.merges == expected.merges
    tokenizers = pytest.importorskip("tokenizers")
    assert tokenizers.Tokenizer.from_file(str(out)).encode(TEXT).ids == tok.encode(TEXT)


def test_train_with_progress_and_the_tinylm_format(tmp_path, corpus):
    out = tmp_path / "tok.bpe"
    result = run("tokenize", "train", str(corpus), str(corpus), "-n", "280", "-o", str(out),
                 "--pattern", "gpt4", "--min-frequency", "5")
    assert result.exit_code == 0, result.output
    assert out.read_text(encoding="utf-8").startswith("tinylm-tokenizer bpe 1\n")
    assert from_file(out).pattern == BPETokenizer.train("x", 256, pattern="gpt4").pattern


def test_train_on_the_default_corpus(tmp_path):
    out = tmp_path / "chars.tok"
    result = run("tokenize", "train", "--type", "char", "-o", str(out), "--no-progress")
    assert result.exit_code == 0, result.output
    assert "pydoc topics" in result.stderr
    tok = from_file(out)
    assert isinstance(tok, CharTokenizer) and 60 < tok.vocab_size < 300


def test_encode_then_decode_through_the_shell_is_exact(tmp_path, corpus):
    out = tmp_path / "tok.json"
    assert run("tokenize", "train", str(corpus), "-n", "300", "-o", str(out),
               "--no-progress").exit_code == 0
    encoded = run("tokenize", "encode", "-t", str(out), "--file", str(corpus))
    assert encoded.exit_code == 0, encoded.output
    ids = [int(i) for i in encoded.stdout.split()]
    assert ids == from_file(out).encode(TEXT)
    decoded = run("tokenize", "decode", "-t", str(out), input=encoded.stdout)
    assert decoded.exit_code == 0 and decoded.stdout == TEXT
    stdin = run("tokenize", "encode", "-t", str(out), "--json", input="fox\n")
    assert json.loads(stdin.stdout) == from_file(out).encode("fox\n")
    args = run("tokenize", "decode", "-t", str(out), *map(str, json.loads(stdin.stdout)))
    assert args.stdout == "fox\n"
    tokens = run("tokenize", "encode", "-t", str(out), "--tokens", " fox")
    assert tokens.stdout.split() == [from_file(out).id_to_token(i)
                                     for i in from_file(out).encode(" fox")]


def test_special_tokens_need_allow_special(tmp_path, corpus):
    out = tmp_path / "tok.json"
    run("tokenize", "train", str(corpus), "-n", "300", "-o", str(out), "-s", "<s>",
        "--no-progress")
    refused = run("tokenize", "encode", "-t", str(out), "a<s>b")
    assert refused.exit_code == 2
    assert refused.stderr.startswith("Error: the text contains the special token '<s>'")
    assert refused.stderr.count("\n") == 1
    allowed = run("tokenize", "encode", "-t", str(out), "--allow-special", "a<s>b")
    assert allowed.exit_code == 0 and " 0 " in f" {allowed.stdout} "


@pytest.mark.parametrize("args, message", [
    (["decode", "-t", "{tok}", "1", "x"], "Error: ids are integers; got 'x'"),
    (["decode", "-t", "{tok}", "99999"], "Error: id 99999 (element 0) is not in the vocabulary"),
    (["train", "{corpus}", "-n", "100", "-o", "{out}"], "Error: vocab_size 100 is too small"),
    (["train", "{corpus}", "--type", "nope", "-o", "{out}"], "Error: unknown tokenizer 'nope'"),
    (["train", "{corpus}", "--type", "wordpiece", "-o", "{out}"], "are not trained by tinylm"),
    (["encode", "-t", "{corpus}", "x"], "Error: '"),
])
def test_user_errors_are_one_line_with_exit_code_2(tmp_path, corpus, args, message):
    tok = tmp_path / "tok.json"
    BPETokenizer.train(TEXT, 300).save(tok)
    fill = {"tok": str(tok), "corpus": str(corpus), "out": str(tmp_path / "o.json")}
    result = run("tokenize", *[a.format(**fill) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_usage_errors():
    assert run("tokenize", "encode", "x").exit_code == 2  # no --tokenizer
    result = run("tokenize", "train")
    assert result.exit_code == 2 and "--output" in result.stderr
    assert "train" in run("tokenize", "--help").output


# ---------------------------------------------------------------------- every --type


@pytest.mark.parametrize("kind", ["bpe", "char"])
@pytest.mark.parametrize("with_corpus", [True, False])
def test_train_every_type(tmp_path, corpus, kind, with_corpus):
    out = tmp_path / f"{kind}.tok"
    args = ["tokenize", "train", "--type", kind, "-o", str(out), "--no-progress", "-n", "300"]
    result = run(*args, *([str(corpus)] if with_corpus else []))
    assert result.exit_code == 0, result.output
    tok = from_file(out)
    assert type(tok).name == kind and tok.decode(tok.encode("the fox")) == "the fox"
    if with_corpus and kind == "char":
        assert tok.chars == sorted(set(TEXT))


def test_train_wordpiece_is_a_clear_error(tmp_path, corpus):
    result = run("tokenize", "train", "--type", "wordpiece", str(corpus), "-o",
                 str(tmp_path / "wp.txt"))
    assert result.exit_code == 2 and "not trained by tinylm" in result.stderr


def test_train_a_plugin_type_without_train_from_files(tmp_path, corpus):
    """A plugin tokenizer with only ``train`` (no ``train_from_files``, fewer options)
    gets the files' text and only the options its train takes."""
    from tinylm import hookimpl, plugins

    seen = {}

    class Words(CharTokenizer):
        name = "words"

        @classmethod
        def train(cls, texts, vocab_size, *, special_tokens=()):
            seen.update(texts=list(texts), vocab_size=vocab_size, specials=special_tokens)
            return CharTokenizer.train(seen["texts"], special_tokens=special_tokens)

        train_from_files = None

    class Plugin:
        @staticmethod
        @hookimpl
        def register_tokenizers(register):
            register("words", Words)

    plugins.register_plugin(Plugin)
    marked = tmp_path / "marked.txt"
    marked.write_bytes(b"\xef\xbb\xbf" + TEXT.encode())
    result = run("tokenize", "train", "--type", "words", str(marked), "-s", "<s>", "-o",
                 str(tmp_path / "w.tok"))
    assert result.exit_code == 0, result.output
    assert seen == {"texts": [TEXT], "vocab_size": 4096, "specials": ["<s>"]}
    refused = run("tokenize", "train", "--type", "words", str(corpus), "--min-frequency", "3",
                  "-o", str(tmp_path / "w.tok"))
    assert refused.exit_code == 2 and "--min-frequency does not apply" in refused.stderr


def test_char_vocab_size_and_unk_token(tmp_path, corpus):
    out = tmp_path / "c.tok"
    result = run("tokenize", "train", "--type", "char", str(corpus), "-n", "10", "--unk-token",
                 "<unk>", "-o", str(out))
    assert result.exit_code == 0, result.output
    tok = from_file(out)
    assert tok.vocab_size == 10 and tok.unk_token == "<unk>"
    encoded = run("tokenize", "encode", "-t", str(out), "\u2603")
    assert encoded.stdout.split() == [str(tok.special_tokens["<unk>"])]


# ---------------------------------------------------------------------- BOMs, --skip-special


def test_encode_drops_a_byte_order_mark(tmp_path, corpus):
    out = tmp_path / "c.tok"
    run("tokenize", "train", "--type", "char", str(corpus), "-o", str(out))
    marked = tmp_path / "marked.txt"
    marked.write_bytes(b"\xef\xbb\xbfthe fox")
    expected = from_file(out).encode("the fox")
    from_file_ = run("tokenize", "encode", "-t", str(out), "-f", str(marked))
    assert from_file_.exit_code == 0, from_file_.output
    assert [int(i) for i in from_file_.stdout.split()] == expected
    stdin = run("tokenize", "encode", "-t", str(out), input=marked.read_bytes())
    assert [int(i) for i in stdin.stdout.split()] == expected


def test_decode_skip_special(tmp_path, corpus):
    out = tmp_path / "tok.json"
    run("tokenize", "train", str(corpus), "-n", "300", "-o", str(out), "-s", "<s>")
    ids = from_file(out).encode("fox<s>", allowed_special="all")
    kept = run("tokenize", "decode", "-t", str(out), *map(str, ids))
    skipped = run("tokenize", "decode", "-t", str(out), "--skip-special", *map(str, ids))
    assert kept.stdout == "fox<s>" and skipped.stdout == "fox"

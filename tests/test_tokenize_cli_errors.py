"""Every `tinylm tokenize ...` and `tinylm plugins` subcommand given bad input: one
`Error:` line on stderr and exit code 2, never a traceback; and errors that advise a
keyword argument in the library name the command's flag instead."""

from __future__ import annotations

import pytest

from tinylm import hookimpl, plugins
from cli_helpers import one_error_line, run
from tinylm.tokenizers import BPETokenizer, CharTokenizer, WordPieceTokenizer
from tinylm.tokenizers.base import Tokenizer

TEXT = "hello world, the quick brown fox. " * 10
BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\xff\xfe\xfd"


@pytest.fixture
def files(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    binary = tmp_path / "image.png"
    binary.write_bytes(BINARY)
    bpe = tmp_path / "bpe.json"
    BPETokenizer.train(TEXT, 300, special_tokens=["<|endoftext|>"]).save(bpe)
    char = tmp_path / "char.txt"
    CharTokenizer.train(TEXT, special_tokens=["<|endoftext|>"]).save(char)
    folder = tmp_path / "folder"
    folder.mkdir()
    return {"corpus": corpus, "binary": binary, "bpe": bpe, "char": char, "folder": folder,
            "missing": tmp_path / "missing.txt", "out": tmp_path / "out.txt", "tmp": tmp_path}


# Each case: the arguments after `tinylm tokenize` ({name}: a path of `files`) and what
# the error line must say.
CASES = {
    # train
    "train: missing corpus": (["train", "{missing}", "-o", "{out}"],
                              ["missing.txt", "does not exist"]),
    "train: corpus is a folder": (["train", "{folder}", "-o", "{out}"],
                                  ["folder", "is a directory"]),
    "train: binary corpus": (["train", "{binary}", "-o", "{out}"],
                             ["image.png", "not valid UTF-8"]),
    "train: binary corpus, char": (["train", "--type", "char", "{binary}", "-o", "{out}"],
                                   ["image.png", "not valid UTF-8"]),
    "train: output is a folder": (["train", "{corpus}", "-o", "{folder}"], ["is a directory"]),
    "train: output folder missing": (["train", "{corpus}", "-o", "{tmp}/no/such/tok.json"],
                                     ["does not exist"]),
    "train: vocabulary too small": (["train", "{corpus}", "-n", "100", "-o", "{out}"],
                                    ["vocab_size 100 is too small"]),
    "train: unknown type": (["train", "{corpus}", "--type", "nope", "-o", "{out}"],
                            ["unknown tokenizer 'nope'"]),
    "train: wordpiece": (["train", "{corpus}", "--type", "wordpiece", "-o", "{out}"],
                         ["not trained by tinylm"]),
    "train: option of another type": (["train", "{corpus}", "--type", "char", "--pattern",
                                       "gpt4", "-o", "{out}"], ["--pattern", "'char'"]),
    "train: bad pattern": (["train", "{corpus}", "--pattern", "(", "-o", "{out}"], ["("]),
    "train: char too small, no unk": (["train", "{corpus}", "--type", "char", "-n", "3",
                                       "-o", "{out}"], ["--unk-token", "--vocab-size"]),
    "train: negative vocab": (["train", "{corpus}", "-n", "-5", "-o", "{out}"], ["-5"]),
    "train: no output": (["train", "{corpus}"], ["--output"]),
    # encode
    "encode: missing tokenizer": (["encode", "-t", "{missing}", "x"], ["does not exist"]),
    "encode: tokenizer is a folder": (["encode", "-t", "{folder}", "x"], ["is a directory"]),
    "encode: tokenizer is binary": (["encode", "-t", "{binary}", "x"], ["image.png"]),
    "encode: tokenizer is a text file": (["encode", "-t", "{corpus}", "x"], ["corpus.txt"]),
    "encode: missing file": (["encode", "-t", "{bpe}", "-f", "{missing}"], ["does not exist"]),
    "encode: file is a folder": (["encode", "-t", "{bpe}", "-f", "{folder}"],
                                 ["is a directory"]),
    "encode: binary file": (["encode", "-t", "{bpe}", "-f", "{binary}"],
                            ["image.png", "not valid UTF-8"]),
    "encode: text and file": (["encode", "-t", "{bpe}", "-f", "{corpus}", "x"], ["not both"]),
    "encode: special token": (["encode", "-t", "{bpe}", "a<|endoftext|>"],
                              ["'<|endoftext|>'", "--allow-special"]),
    "encode: unknown character": (["encode", "-t", "{char}", "hello \u2603"],
                                  ["'\u2603'", "--unk-token"]),
    "encode: no tokenizer": (["encode", "x"], ["--tokenizer"]),
    # decode
    "decode: missing tokenizer": (["decode", "-t", "{missing}", "1"], ["does not exist"]),
    "decode: tokenizer is a folder": (["decode", "-t", "{folder}", "1"], ["is a directory"]),
    "decode: not an id": (["decode", "-t", "{bpe}", "1", "x"], ["ids are integers", "'x'"]),
    "decode: a float": (["decode", "-t", "{bpe}", "1.5"], ["'1.5'"]),
    "decode: a superscript digit": (["decode", "-t", "{bpe}", "\u00b2"], ["ids are integers"]),
    "decode: out of range": (["decode", "-t", "{bpe}", "300"], ["id 300", "not in the vocab"]),
    "decode: negative": (["decode", "-t", "{bpe}", "--", "-1"], ["id -1"]),
    "decode: huge": (["decode", "-t", "{bpe}", str(10 ** 30)], [str(10 ** 30)]),
    "decode: skip special, out of range": (["decode", "-t", "{char}", "--skip-special", "999"],
                                           ["id 999"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_error_line(files, case):
    args, fragments = CASES[case]
    result = run("tokenize", *[a.format(**files) for a in args])
    one_error_line(result, *fragments)


def test_library_errors_are_a_single_line(files):
    """tinylm's own errors (not Click's usage errors) are the `Error:` line alone."""
    result = run("tokenize", "encode", "-t", files["bpe"], "a<|endoftext|>")
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error:")
    assert "allowed_special" not in result.stderr  # the keyword, not a flag


@pytest.mark.parametrize("data, fragment", [
    (BINARY, "standard input is not valid UTF-8"),
    (b"1 2 three", "'three'"),
    (b"[1, 2, 99999]", "id 99999"),
])
def test_decode_bad_standard_input(files, data, fragment):
    one_error_line(run("tokenize", "decode", "-t", files["bpe"], input=data), fragment)


def test_encode_binary_standard_input(files):
    one_error_line(run("tokenize", "encode", "-t", files["bpe"], input=BINARY),
                   "standard input is not valid UTF-8")


# ---------------------------------------------------------------------- plugins


class Incomplete:
    """The old plugin guide's tokenizer: encode and decode only."""

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(ids).decode()


class IncompletePlugin:
    @staticmethod
    @hookimpl
    def register_tokenizers(register):
        register("incomplete", Incomplete)


class RaisingPlugin:
    @staticmethod
    @hookimpl
    def register_tokenizers(register):
        raise OSError("vocabulary download failed")


def test_plugins_with_an_unexpected_argument():
    one_error_line(run("plugins", "extra"), "extra")


def test_plugins_listing_an_incomplete_tokenizer():
    plugins.register_plugin(IncompletePlugin, name="incomplete-plugin")
    line = one_error_line(run("plugins"), "'incomplete-plugin'", "Incomplete", "save")
    assert run("plugins", "--json").exit_code == 2, line


def test_plugins_listing_a_plugin_that_raises():
    plugins.register_plugin(RaisingPlugin, name="raising")
    one_error_line(run("plugins"), "'raising'", "vocabulary download failed")


def test_tokenize_train_with_an_incomplete_plugin_tokenizer(files):
    plugins.register_plugin(IncompletePlugin, name="incomplete-plugin")
    one_error_line(run("tokenize", "train", "--type", "incomplete", files["corpus"], "-o",
                       files["out"]), "Incomplete", "lacks")


def test_wordpiece_files_are_fine_to_encode(files):
    """(A control: the error cases above are errors, not a broken command.)"""
    path = files["tmp"] / "bert.txt"
    WordPieceTokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello"]).save(path)
    result = run("tokenize", "encode", "-t", path, "hello")
    assert result.exit_code == 0 and result.stdout.split() == ["5"]


class FilesOnly(CharTokenizer):
    """A plugin tokenizer with ``train_from_files`` and no ``train`` (docs/plugins.md:
    ``tokenize train --type NAME FILE...`` trains it)."""
    name = "filesonly"
    train = Tokenizer.train  # the base class's: "has no train method of its own"

    @classmethod
    def train_from_files(cls, paths, vocab_size=None, *, special_tokens=()):
        text = "".join(open(p, encoding="utf-8").read() for p in paths)
        return CharTokenizer.train([text], special_tokens=special_tokens)


class FilesOnlyPlugin:
    @staticmethod
    @hookimpl
    def register_tokenizers(register):
        register("filesonly", FilesOnly)


def test_a_tokenizer_with_only_train_from_files_trains_from_files(tmp_path):
    plugins.register_plugin(FilesOnlyPlugin)
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\nabc\n", encoding="utf-8")
    out = tmp_path / "tok.txt"
    result = run("tokenize", "train", str(corpus), "--type", "filesonly", "-o", str(out),
                 "--no-progress")
    assert result.exit_code == 0, result.output
    assert "trained a filesonly tokenizer" in result.output and out.exists()
    # Without CORPUS files (the default corpus is text, for train): one line, exit 2.
    result = run("tokenize", "train", "--type", "filesonly", "-o", str(tmp_path / "t2.txt"),
                 "--no-progress")
    assert "train from files only" in one_error_line(result)

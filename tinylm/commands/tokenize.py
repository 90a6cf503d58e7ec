"""``tinylm tokenize``: train a tokenizer, encode text to ids, decode ids to text.

    tinylm tokenize train input.txt --vocab-size 4096 -o tok.json   # Hugging Face format
    tinylm tokenize train a.txt b.txt -n 8000 --pattern gpt4 -o tok.bpe
    tinylm tokenize train --type char -o chars.tok              # default corpus
    tinylm tokenize train --type char -n 80 --unk-token '<unk>' -o chars.tok input.txt
    tinylm tokenize encode -t tok.json "Hello world"            # 15496 995 (ids)
    tinylm tokenize encode -t tok.json --file input.txt > ids.txt
    tinylm tokenize decode -t tok.json 15496 995
    tinylm tokenize decode -t tok.json < ids.txt

Without a CORPUS, training uses the text of Python's bundled ``pydoc_data`` topics,
which every Python install has. The tokenizer file format follows ``-o``: ``.json``
is a Hugging Face ``tokenizer.json`` (loadable by ``tokenizers``), anything else
tinylm's own plain-text format; ``--format`` overrides. Text files and standard
input are read as UTF-8, a leading byte order mark dropped.

Errors from the tokenizers advise keyword arguments (``allowed_special=``,
``unk_token=``); here they are reworded to name this command's flags instead.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import sys
import time

import click

from tinylm import plugins
from tinylm.commands.options import utf8_text
from tinylm.errors import TinyLMError

# TokenizerError.option -> the advice, in flags, that replaces the keyword advice
ENCODE_ADVICE = {
    "allowed_special": "pass --allow-special to encode special tokens as their ids",
    "unk_token": "train the tokenizer on text that has it, or with --unk-token TOKEN "
                 "(tinylm tokenize train --unk-token '<unk>') to map unknown characters to it",
}
TRAIN_ADVICE = {
    "unk_token": "pass --unk-token TOKEN (e.g. --unk-token '<unk>') to map the rarest to "
                 "it, or raise --vocab-size",
}

# train's keyword -> its flag, for options a tokenizer's train does not take
TRAIN_FLAGS = {"vocab_size": "--vocab-size", "min_frequency": "--min-frequency",
               "special_tokens": "--special-token", "pattern": "--pattern",
               "unk_token": "--unk-token"}


def default_corpus() -> str:
    """The text of Python's ``pydoc_data`` topics (about 465 KB, in every install)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@contextlib.contextmanager
def flag_advice(advice: dict):
    """Reword a ``TokenizerError`` whose ``option`` is a key of ``advice``."""
    from tinylm.tokenizers import TokenizerError

    try:
        yield
    except TokenizerError as e:
        if getattr(e, "option", None) in advice:
            raise e.with_advice(advice[e.option]) from None
        raise


@click.group(name="tokenize")
def tokenize_group():
    """Train tokenizers; encode text to ids and decode ids to text."""


# ---------------------------------------------------------------------- train


@tokenize_group.command(name="train")
@click.argument("corpus", nargs=-1, type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(),
              help="Where to save the tokenizer (.json: Hugging Face tokenizer.json).")
@click.option("-n", "--vocab-size", type=click.IntRange(min=1), default=4096,
              help="Vocabulary size, special tokens included (bpe: and the 256 bytes; char: "
                   "at most, the rarest characters go to --unk-token) [default: 4096; char: "
                   "every character].")
@click.option("--type", "kind", default="bpe", show_default=True,
              help="Tokenizer type, by registered name (bpe, char, or a plugin's).")
@click.option("--pattern", default="gpt2", show_default=True,
              help="BPE pre-tokenization: gpt2, gpt4 (cl100k) or a regular expression.")
@click.option("--min-frequency", type=click.IntRange(min=0), default=2, show_default=True,
              help="BPE: stop when the best pair occurs fewer times than this.")
@click.option("-s", "--special-token", "special_tokens", multiple=True,
              help="A special token, e.g. '<|endoftext|>' (repeat for several).")
@click.option("--unk-token", default=None,
              help="char: a special token that stands for every character not in the "
                   "vocabulary (needed when --vocab-size leaves some out).")
@click.option("--format", "fmt", type=click.Choice(["tinylm", "hf"]), default=None,
              help="File format [default: hf for a .json output, else tinylm].")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show progress bars (on stderr).")
@click.pass_context
def train_command(ctx, corpus, output, kind, fmt, **values):
    """Train a tokenizer on CORPUS files (UTF-8 text; default: Python's pydoc topics)."""
    from tinylm.tokenizers.formats import check_file

    cls = plugins.get_tokenizer_class(kind, needs=("train",),
                                      purpose="`tinylm tokenize train`")
    trainable = _trainable_types()
    if kind not in trainable:
        from tinylm.tokenizers.base import TokenizerError

        raise TokenizerError(f"{kind!r} tokenizers are not trained by tinylm "
                             f"({cls.__module__}.{cls.__qualname__} has no train method: it "
                             f"reads a vocabulary made elsewhere, whose file encode and "
                             f"decode take as -t); --type can train {', '.join(trainable)}")
    _check_output(output)
    for path in corpus:
        check_file(path, "text file")
    train = getattr(cls, "train_from_files", None) if corpus else None
    if train is None and not _has_own_train(cls):
        from tinylm.tokenizers.base import TokenizerError

        raise TokenizerError(f"{kind!r} tokenizers train from files only "
                             f"({cls.__module__}.{cls.__qualname__} has train_from_files, no "
                             f"train); give the CORPUS files to train on")
    values["special_tokens"] = list(values["special_tokens"])  # train's keywords (TRAIN_FLAGS)
    options = _train_options(ctx, kind, train or cls.train, cls.train, values)
    size = options.pop("vocab_size", None)
    size_args = () if size is None else (size,)
    start = time.perf_counter()
    with flag_advice(TRAIN_ADVICE):
        if train is not None:
            tok = train(list(corpus), *size_args, **options)
        else:
            from tinylm.tokenizers.formats import read_text_file

            texts = [read_text_file(p) for p in corpus] if corpus else [default_corpus()]
            tok = cls.train(texts, *size_args, **options)
    seconds = time.perf_counter() - start
    if corpus:
        source = (f"{len(corpus)} file{'s' if len(corpus) > 1 else ''} "
                  f"({sum(os.path.getsize(p) for p in corpus) / 1e6:.1f} MB)")
    else:
        source = "Python's pydoc topics (the default corpus)"
    tok.save(output, fmt)
    click.echo(f"trained a {kind} tokenizer with {tok.vocab_size} tokens on {source} in "
               f"{seconds:.1f} s; saved {output}", err=True)


def _has_own_train(cls) -> bool:
    """Whether ``cls`` has a ``train`` of its own (the base class's says there is none)."""
    from tinylm.tokenizers.base import Tokenizer

    return (getattr(getattr(cls, "train", None), "__func__", None)
            is not Tokenizer.train.__func__)


def _trainable_types() -> list:
    """The registered tokenizer names whose class has a ``train`` of its own or a
    ``train_from_files`` (docs/plugins.md: either makes it trainable here)."""
    found = plugins.registry("tokenizers")
    return sorted(name for name, cls in found.items()
                  if _has_own_train(cls) or callable(getattr(cls, "train_from_files", None)))


def _train_options(ctx, kind: str, function, train, values: dict) -> dict:
    """The options of ``values`` that ``function`` (a tokenizer's ``train`` or
    ``train_from_files``; one taking ``**options`` is read through ``train``) accepts.
    An option it lacks is left out if the user did not set it and an error naming the
    flag if they did. ``vocab_size`` is passed when given or when ``train`` has no
    default for it (the char tokenizer keeps every character by default)."""
    from click.core import ParameterSource

    params = _keywords(function)
    if params is None:
        params = _keywords(train)
    given = {key for key in values
             if ctx.get_parameter_source(key) not in (ParameterSource.DEFAULT, None)}
    options = {}
    for key, value in values.items():
        if params is None or key in params:
            if key == "vocab_size" and key not in given and params is not None \
                    and params[key].default is not inspect.Parameter.empty:
                continue
            options[key] = value
        elif key in given and key != "progress":  # progress bars are a nicety
            raise TinyLMError(f"{TRAIN_FLAGS[key]} does not apply to {kind!r} tokenizers "
                              f"(their train takes no {key}); leave it out")
    return options


def _keywords(function):
    """``{name: inspect.Parameter}`` of ``function``, or None if it takes ``**options``."""
    params = inspect.signature(function).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return dict(params)


def _check_output(output) -> None:
    """Fail before training, not after, on an output path that cannot be written."""
    from tinylm.tokenizers import TokenizerFileError

    if os.path.isdir(output):
        raise TokenizerFileError(f"-o {output!r} is a directory; give a file name, e.g. "
                                 f"{os.path.join(output, 'tokenizer.json')!r}")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise TokenizerFileError(f"cannot save to {output!r}: the folder {folder!r} does not "
                                 f"exist")


# ---------------------------------------------------------------------- encode


@tokenize_group.command(name="encode")
@click.option("-t", "--tokenizer", "tokenizer_path", required=True, type=click.Path(),
              help="A tokenizer file.")
@click.argument("text", required=False, callback=utf8_text)
@click.option("-f", "--file", "file", type=click.Path(), help="Encode this file instead of TEXT.")
@click.option("--allow-special", is_flag=True,
              help="Encode special tokens in the text as their ids (default: refuse them).")
@click.option("--tokens", "show_tokens", is_flag=True,
              help="Print the tokens' spellings instead of their ids.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def encode_command(tokenizer_path, text, file, allow_special, show_tokens, as_json):
    """Encode TEXT (or --file, or standard input) to ids, printed on one line."""
    from tinylm.tokenizers import from_file
    from tinylm.tokenizers.formats import read_text_file

    if text is not None and file is not None:
        raise click.UsageError("give TEXT or --file, not both")
    tok = from_file(tokenizer_path)
    if file is not None:
        text = read_text_file(file)
    elif text is None:
        text = _read_stdin()
    kwargs = {"allowed_special": "all"} if allow_special else {}
    if "add_special_tokens" in inspect.signature(tok.encode).parameters:
        kwargs["add_special_tokens"] = False  # the ids of the text itself, nothing added
    with flag_advice(ENCODE_ADVICE):
        ids = tok.encode(text, **kwargs)
    out = [tok.id_to_token(i) for i in ids] if show_tokens else ids
    click.echo(json.dumps(out, ensure_ascii=False) if as_json else " ".join(map(str, out)))


# ---------------------------------------------------------------------- decode


@tokenize_group.command(name="decode")
@click.option("-t", "--tokenizer", "tokenizer_path", required=True, type=click.Path(),
              help="A tokenizer file.")
@click.argument("ids", nargs=-1)
@click.option("--skip-special", is_flag=True,
              help="Leave special tokens (<|endoftext|>, [CLS] ...) out of the text.")
def decode_command(tokenizer_path, ids, skip_special):
    """Decode IDS (or standard input: ids separated by spaces, commas or newlines, or a
    JSON list) to text, written exactly (a newline is added only on a terminal)."""
    from tinylm.tokenizers import from_file

    tok = from_file(tokenizer_path)
    values = parse_ids(" ".join(ids) if ids else _read_stdin())
    text = tok.decode(values, skip_special_tokens=True) if skip_special else tok.decode(values)
    if sys.stdout.isatty() and not text.endswith("\n"):
        text += "\n"
    sys.stdout.flush()
    binary = getattr(sys.stdout, "buffer", None)
    if binary is None:
        sys.stdout.write(text)
    else:  # the exact bytes: no newline translation, no locale encoding
        binary.write(text.encode("utf-8"))
        binary.flush()


def parse_ids(raw: str) -> list:
    """The integers in ``raw``: separated by spaces, commas or newlines, or a JSON list."""
    from tinylm.tokenizers import TokenizerError

    words = raw.replace(",", " ").replace("[", " ").replace("]", " ").split()
    values = []
    for k, word in enumerate(words):
        if not word.isascii() or not word.lstrip("-").isdigit():
            raise TokenizerError(f"ids are integers; got {word[:40]!r} (element {k})")
        values.append(int(word))
    return values


def _read_stdin() -> str:
    """Standard input, exactly (bytes decoded as UTF-8 without a leading byte order
    mark, no newline translation)."""
    from tinylm.tokenizers import TokenizerError
    from tinylm.tokenizers.formats import BOM

    binary = getattr(sys.stdin, "buffer", None)
    if binary is None:
        return sys.stdin.read().removeprefix("\ufeff")
    data = binary.read().removeprefix(BOM)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"standard input is not valid UTF-8 (byte {e.start}); tinylm "
                             f"reads UTF-8 text (is it a binary file?)") from None

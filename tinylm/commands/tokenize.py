"""``tinylm tokenize``: train a tokenizer, encode text to ids, decode ids to text.

    tinylm tokenize train input.txt --vocab-size 4096 -o tok.json   # Hugging Face format
    tinylm tokenize train a.txt b.txt -n 8000 --pattern gpt4 -o tok.bpe
    tinylm tokenize train --type char -o chars.tok              # default corpus
    tinylm tokenize encode -t tok.json "Hello world"            # 15496 995 (ids)
    tinylm tokenize encode -t tok.json --file input.txt > ids.txt
    tinylm tokenize decode -t tok.json 15496 995
    tinylm tokenize decode -t tok.json < ids.txt

Without a CORPUS, training uses the text of Python's bundled ``pydoc_data`` topics,
which every Python install has. The tokenizer file format follows ``-o``: ``.json``
is a Hugging Face ``tokenizer.json`` (loadable by ``tokenizers``), anything else
tinylm's own plain-text format; ``--format`` overrides.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import time

import click

from tinylm import plugins


def default_corpus() -> str:
    """The text of Python's ``pydoc_data`` topics (about 465 KB, in every install)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@click.group(name="tokenize")
def tokenize_group():
    """Train tokenizers; encode text to ids and decode ids to text."""


@tokenize_group.command(name="train")
@click.argument("corpus", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Where to save the tokenizer (.json: Hugging Face tokenizer.json).")
@click.option("-n", "--vocab-size", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Vocabulary size, special tokens and the 256 bytes included.")
@click.option("--type", "kind", default="bpe", show_default=True,
              help="Tokenizer type, by registered name (bpe, char, or a plugin's).")
@click.option("--pattern", default="gpt2", show_default=True,
              help="BPE pre-tokenization: gpt2, gpt4 (cl100k) or a regular expression.")
@click.option("--min-frequency", type=click.IntRange(min=0), default=2, show_default=True,
              help="BPE: stop when the best pair occurs fewer times than this.")
@click.option("-s", "--special-token", "special_tokens", multiple=True,
              help="A special token, e.g. '<|endoftext|>' (repeat for several).")
@click.option("--format", "fmt", type=click.Choice(["tinylm", "hf"]), default=None,
              help="File format [default: hf for a .json output, else tinylm].")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show progress bars (on stderr).")
def train_command(corpus, output, vocab_size, kind, pattern, min_frequency, special_tokens, fmt,
                  progress):
    """Train a tokenizer on CORPUS files (UTF-8 text; default: Python's pydoc topics)."""
    cls = plugins.get_tokenizer_class(kind)
    options = {"min_frequency": min_frequency, "special_tokens": list(special_tokens),
               "pattern": pattern, "progress": progress}
    start = time.perf_counter()
    if corpus:
        train = getattr(cls, "train_from_files", None)
        if train is None:
            texts = [_read_text(path) for path in corpus]
            tok = cls.train(texts, vocab_size, **_accepted(cls.train, options))
        else:
            tok = train(list(corpus), vocab_size, **_accepted(train, options))
        source = (f"{len(corpus)} file{'s' if len(corpus) > 1 else ''} "
                  f"({sum(os.path.getsize(p) for p in corpus) / 1e6:.1f} MB)")
    else:
        tok = cls.train(default_corpus(), vocab_size, **_accepted(cls.train, options))
        source = "Python's pydoc topics (the default corpus)"
    seconds = time.perf_counter() - start
    tok.save(output, fmt)
    click.echo(f"trained a {kind} tokenizer with {tok.vocab_size} tokens on {source} in "
               f"{seconds:.1f} s; saved {output}", err=True)


def _accepted(function, options: dict) -> dict:
    """The options ``function`` takes (a plugin's train may take fewer)."""
    params = inspect.signature(function).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return options
    return {k: v for k, v in options.items() if k in params}


def _read_text(path) -> str:
    from tinylm.tokenizers import TokenizerError

    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path!r} is not valid UTF-8 (byte {e.start})") from None


@tokenize_group.command(name="encode")
@click.option("-t", "--tokenizer", "tokenizer_path", required=True,
              type=click.Path(exists=True, dir_okay=False), help="A tokenizer file.")
@click.argument("text", required=False)
@click.option("-f", "--file", "file", type=click.Path(exists=True, dir_okay=False),
              help="Encode this file instead of TEXT.")
@click.option("--allow-special", is_flag=True,
              help="Encode special tokens in the text as their ids (default: refuse them).")
@click.option("--tokens", "show_tokens", is_flag=True,
              help="Print the tokens' spellings instead of their ids.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def encode_command(tokenizer_path, text, file, allow_special, show_tokens, as_json):
    """Encode TEXT (or --file, or standard input) to ids, printed on one line."""
    from tinylm.tokenizers import from_file

    tok = from_file(tokenizer_path)
    if text is not None and file is not None:
        raise click.UsageError("give TEXT or --file, not both")
    if file is not None:
        text = _read_text(file)
    elif text is None:
        text = _read_stdin()
    kwargs = {"allowed_special": "all"} if allow_special else {}
    if "add_special_tokens" in inspect.signature(tok.encode).parameters:
        kwargs["add_special_tokens"] = False  # the ids of the text itself, nothing added
    ids = tok.encode(text, **kwargs)
    out = [tok.id_to_token(i) for i in ids] if show_tokens else ids
    click.echo(json.dumps(out, ensure_ascii=False) if as_json else " ".join(map(str, out)))


@tokenize_group.command(name="decode")
@click.option("-t", "--tokenizer", "tokenizer_path", required=True,
              type=click.Path(exists=True, dir_okay=False), help="A tokenizer file.")
@click.argument("ids", nargs=-1)
def decode_command(tokenizer_path, ids):
    """Decode IDS (or standard input: ids separated by spaces, commas or newlines, or a
    JSON list) to text, written exactly (a newline is added only on a terminal)."""
    from tinylm.tokenizers import TokenizerError, from_file

    tok = from_file(tokenizer_path)
    raw = " ".join(ids) if ids else _read_stdin()
    words = raw.replace(",", " ").replace("[", " ").replace("]", " ").split()
    try:
        values = [int(w) for w in words]
    except ValueError:
        bad = next(w for w in words if not w.lstrip("-").isdigit())
        raise TokenizerError(f"ids are integers; got {bad!r}") from None
    text = tok.decode(values)
    if sys.stdout.isatty() and not text.endswith("\n"):
        text += "\n"
    sys.stdout.flush()
    binary = getattr(sys.stdout, "buffer", None)
    if binary is None:
        sys.stdout.write(text)
    else:  # the exact bytes: no newline translation, no locale encoding
        binary.write(text.encode("utf-8"))
        binary.flush()


def _read_stdin() -> str:
    """Standard input, exactly (bytes decoded as UTF-8, no newline translation)."""
    from tinylm.tokenizers import TokenizerError

    binary = getattr(sys.stdin, "buffer", None)
    if binary is None:
        return sys.stdin.read()
    data = binary.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"standard input is not valid UTF-8 (byte {e.start})") from None

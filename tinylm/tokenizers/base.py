"""The interface every tinylm tokenizer has, and ``from_file``.

A tokenizer maps text to a list of integer ids and back:

    >>> from tinylm.tokenizers import CharTokenizer
    >>> tok = CharTokenizer.train("hello")      # vocabulary: e h l o
    >>> tok.encode("hole")
    [1, 3, 2, 0]
    >>> tok.decode([1, 3, 2, 0])
    'hole'

Special tokens (``<|endoftext|>``, ``[CLS]`` ...) are never split or merged. Text that
contains one is refused unless the caller allows it, as minbpe and tiktoken do: a
special token appearing in user text is usually an injection, not an intent.

    tok.encode("a<|endoftext|>b")                               # raises TokenizerError
    tok.encode("a<|endoftext|>b", allowed_special="all")        # [.., 4095, ..]
    tok.encode("a<|endoftext|>b", disallowed_special=())        # encoded as plain text

Every tokenizer saves to its own versioned plain-text format, whose first line is
``tinylm-tokenizer <name> <version>``; ``from_file`` reads that line (or recognises an
external format: Hugging Face ``tokenizer.json``, GPT-2 ``vocab.json`` + ``merges.txt``,
a tiktoken ranks file, a BERT ``vocab.txt``) and builds the right class, looked up by
name in the tokenizer registry, so plugin tokenizers load the same way.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from pathlib import Path
from types import MappingProxyType

from tinylm.atomic import write_atomic
from tinylm.errors import TinyLMError


class TokenizerError(TinyLMError, ValueError):
    """Bad input to a tokenizer: unencodable text, unknown ids, wrong arguments.

    ``option``: the keyword argument whose use would fix it ("allowed_special",
    "unk_token"), or None; ``problem``: the message without its advice. A command
    line, whose users pass flags and not keywords, swaps the advice for its own:

        >>> e = TokenizerError("the text contains '<s>'; pass allowed_special=...",
        ...                    option="allowed_special", problem="the text contains '<s>'")
        >>> str(e.with_advice("pass --allow-special"))
        "the text contains '<s>'; pass --allow-special"
    """

    def __init__(self, message: str = "", *, option: str | None = None,
                 problem: str | None = None):
        super().__init__(message)
        self.option = option
        self.problem = message if problem is None else problem

    def with_advice(self, advice: str) -> "TokenizerError":
        """The same error (class, option, problem) with ``advice`` after the problem."""
        return type(self)(f"{self.problem}; {advice}", option=self.option, problem=self.problem)


class TokenizerFileError(TokenizerError):
    """A tokenizer file that is missing, corrupted, truncated or of an unknown format."""


class Tokenizer(ABC):
    """Text <-> ids. Subclasses set ``name`` (their registry name) and
    ``special_tokens`` (``{text: id}``, default none), implement ``encode``,
    ``decode_bytes``, ``vocab_size``, ``token_to_id``, ``id_to_token``, ``save`` and
    ``load``, and may implement ``train`` (and ``train_from_files``); docs/plugins.md
    says which of tinylm's callers use what."""

    name = "tokenizer"
    special_tokens: dict = MappingProxyType({})  # special token text -> id (none by default)

    # ------------------------------------------------------------------ encode / decode

    @abstractmethod
    def encode(self, text: str, *, allowed_special=(), disallowed_special="all") -> list:
        """The ids of ``text``. ``allowed_special``: special tokens (a set of their
        texts, or "all") that the text may contain and that are encoded as their ids;
        ``disallowed_special`` ("all": every special token not allowed): special
        tokens whose presence raises ``TokenizerError``; any other is plain text."""

    @abstractmethod
    def decode_bytes(self, ids, *, skip_special_tokens: bool = False) -> bytes:
        """The exact bytes ``ids`` stand for (special tokens as their UTF-8 text, or
        left out with ``skip_special_tokens=True``)."""

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        """The text of ``ids``; bytes that are not valid UTF-8 (a multi-byte character
        cut between ids) become U+FFFD, as tiktoken and ``tokenizers`` do. With
        ``skip_special_tokens=True`` the ids in ``special_ids`` are left out (ids out
        of range are still an error). Never raises for an id list in range."""
        return self.decode_bytes(ids, skip_special_tokens=skip_special_tokens).decode(
            "utf-8", errors="replace")

    @property
    def special_ids(self) -> frozenset:
        """The ids of the special tokens (what ``skip_special_tokens`` leaves out)."""
        return frozenset(self.special_tokens.values())

    def without_special_ids(self, ids) -> list:
        """``ids`` (any 1-D sequence) as a list of ints without the special ids."""
        ids = as_id_list(ids)
        special = self.special_ids
        if not special:
            return ids
        return [i for i in ids if i not in special]

    def encode_batch(self, texts, **kwargs) -> list:
        """``[encode(t) for t in texts]`` (single-threaded)."""
        if isinstance(texts, (str, bytes)):
            raise TokenizerError("encode_batch takes a list of strings; for one string "
                                 "use encode")
        return [self.encode(text, **kwargs) for text in texts]

    def decode_batch(self, batch, *, skip_special_tokens: bool = False) -> list:
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in batch]

    # ------------------------------------------------------------------ vocabulary

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """One more than the largest id (special tokens included)."""

    @abstractmethod
    def token_to_id(self, token: str):
        """The id of a token's text (its vocabulary spelling), or None."""

    @abstractmethod
    def id_to_token(self, id: int):
        """The vocabulary spelling of an id, or None."""

    def __len__(self) -> int:
        return self.vocab_size

    # ------------------------------------------------------------------ files

    @abstractmethod
    def save(self, path, format: str | None = None) -> None:
        """Write the tokenizer to ``path`` (atomically)."""

    @classmethod
    @abstractmethod
    def load(cls, path) -> "Tokenizer":
        """Read a file this class's ``save`` wrote in tinylm's own format."""

    @classmethod
    def train(cls, texts, vocab_size: int, **options) -> "Tokenizer":
        """A tokenizer learned from ``texts`` (an iterable of str, maybe a generator that
        streams a corpus) with at most ``vocab_size`` ids; options such as
        ``special_tokens=[...]``. Optional: this default says the class has none."""
        raise TokenizerError(f"{cls.name!r} tokenizers are not trained by tinylm "
                             f"({cls.__module__}.{cls.__qualname__} has no train method of its "
                             f"own); load a vocabulary with from_file")

    # ------------------------------------------------------------------ helpers

    def _special_segments(self, text: str, allowed_special, disallowed_special) -> list:
        """``text`` cut at allowed special tokens: a list of str (ordinary text) and
        int (a special token's id). Raises if a disallowed special token occurs."""
        check_text(text)
        specials = self.special_tokens
        if not specials:
            _check_special_args(allowed_special, disallowed_special, specials)
            return [text]
        allowed, disallowed = _check_special_args(allowed_special, disallowed_special, specials)
        if disallowed:
            match = _alternation(disallowed).search(text)
            if match:
                token = match.group()
                problem = (f"the text contains the special token {token!r} (at character "
                           f"{match.start()})")
                raise TokenizerError(
                    f"{problem}; pass allowed_special={{{token!r}}} (or \"all\") to encode it "
                    f"as a special token, or disallowed_special=() to encode it as plain text",
                    option="allowed_special", problem=problem)
        if not allowed:
            return [text]
        segments, end = [], 0
        for match in _alternation(allowed).finditer(text):
            if match.start() > end:
                segments.append(text[end:match.start()])
            segments.append(specials[match.group()])
            end = match.end()
        if end < len(text) or not segments:
            segments.append(text[end:])
        return segments


    def _encode_with_specials(self, text: str, allowed_special, disallowed_special,
                              encode_text) -> list:
        """The ids of ``text``: each allowed special token as its id, the ordinary text
        between them through ``encode_text`` (str -> a new list of ids)."""
        segments = self._special_segments(text, allowed_special, disallowed_special)
        if len(segments) == 1 and isinstance(segments[0], str):
            return encode_text(segments[0])
        ids = []
        for segment in segments:
            if isinstance(segment, int):
                ids.append(segment)
            else:
                ids.extend(encode_text(segment))
        return ids


# ---------------------------------------------------------------------- argument checks


def check_text(text) -> None:
    if not isinstance(text, str):
        raise TokenizerError(f"encode takes a str, not {type(text).__name__}"
                             + ("; decode bytes first, or use encode_bytes" if
                                isinstance(text, (bytes, bytearray)) else ""))


def surrogate_error(text: str) -> TokenizerError:
    """The error for text with a lone surrogate, which UTF-8 cannot encode."""
    for i, ch in enumerate(text):
        if "\ud800" <= ch <= "\udfff":
            return TokenizerError(
                f"the text has a lone surrogate {ch!r} at character {i}, which UTF-8 cannot "
                f"encode (it usually comes from decoding bytes with errors='surrogateescape' "
                f"or from broken JSON); fix the text, or encode its bytes with encode_bytes")
    return TokenizerError("the text cannot be encoded as UTF-8")


def _check_special_args(allowed_special, disallowed_special, specials: dict):
    def as_set(value, what):
        if value == "all":
            return set(specials)
        if isinstance(value, str) or not hasattr(value, "__iter__"):
            raise TokenizerError(f"{what} must be \"all\" or a collection of special-token "
                                 f"strings, not {value!r}")
        value = set(value)
        unknown = sorted(map(repr, value - set(specials)))
        if unknown:
            known = ", ".join(map(repr, specials)) or "none"
            raise TokenizerError(f"{what} names {', '.join(unknown)}, which "
                                 f"{'is' if len(unknown) == 1 else 'are'} not special tokens of "
                                 f"this tokenizer (it has: {known})")
        return value

    allowed = as_set(allowed_special, "allowed_special")
    if disallowed_special == "all":
        disallowed = set(specials) - allowed
    else:
        disallowed = as_set(disallowed_special, "disallowed_special") - allowed
    return allowed, disallowed


_ALTERNATIONS: dict = {}


def _alternation(tokens) -> re.Pattern:
    """A regex matching any of ``tokens``, longest first (so "<|a|>x" beats "<|a|>")."""
    key = frozenset(tokens)
    pattern = _ALTERNATIONS.get(key)
    if pattern is None:
        if len(_ALTERNATIONS) > 64:
            _ALTERNATIONS.clear()
        ordered = sorted(key, key=lambda t: (-len(t), t))
        pattern = _ALTERNATIONS[key] = re.compile("|".join(map(re.escape, ordered)))
    return pattern


def as_id_list(ids) -> list:
    """``ids`` as a list of Python ints (accepts lists, tuples, NumPy arrays)."""
    if isinstance(ids, list):
        return ids
    if isinstance(ids, (str, bytes, bytearray)) or not hasattr(ids, "__iter__"):
        raise TokenizerError(f"decode takes a sequence of integer ids, not {type(ids).__name__}")
    tolist = getattr(ids, "tolist", None)
    if tolist is not None:  # NumPy / CuPy arrays
        if getattr(ids, "ndim", 1) != 1:
            raise TokenizerError(f"decode takes a 1-D sequence of ids, not an array of shape "
                                 f"{ids.shape}; use decode_batch for a batch")
        return tolist()
    return list(ids)


MAX_ID = (1 << 24) - 1  # the largest token id tinylm accepts (16.7M: Gemma has 256k)


def is_token_id(i) -> bool:
    """Whether ``i`` can be a token id: an int (not a bool) from 0 to ``MAX_ID``."""
    return isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= MAX_ID


def token_id_problem(what: str, i) -> str:
    """The message for ``what`` (e.g. "token 'ab'") having the id ``i``, not a valid one."""
    shown = repr(i) if len(repr(i)) <= 40 else f"{repr(i)[:37]}..."
    return f"{what} has the id {shown}; token ids are integers from 0 to {MAX_ID}"


def bad_ids_error(ids: list, vocab_size: int, known=None) -> TokenizerError:
    """The error for an id list with a non-integer or out-of-vocabulary element."""
    for i, x in enumerate(ids):
        if isinstance(x, bool) or not hasattr(x, "__index__"):
            return TokenizerError(f"ids must be integers; element {i} is {x!r}")
        if not 0 <= x < vocab_size or (known is not None and not known(x)):
            return TokenizerError(f"id {int(x)} (element {i}) is not in the vocabulary "
                                  f"(ids run from 0 to {vocab_size - 1})")
    return TokenizerError("ids are not valid for this tokenizer")


# ---------------------------------------------------------------------- files


def atomic_write(path, data) -> None:
    """Write ``data`` (str or bytes) to ``path`` atomically (``tinylm.atomic``); a
    missing folder is a ``TokenizerFileError``."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise TokenizerFileError(f"cannot save to {str(path)!r}: the directory "
                                 f"{str(directory)!r} does not exist")
    write_atomic(path, data, error=TokenizerFileError)


def special_token_rows(items):
    """The rows of a saved ``special_tokens`` section, one per ``(text, id)`` of
    ``items`` in that order: the id, a space, the JSON-quoted text."""
    return (f"{i} {json.dumps(t, ensure_ascii=False)}" for t, i in items)


def read_special_tokens(reader) -> dict:
    """``{text: id}`` from the ``special_tokens`` section that ``special_token_rows``
    wrote (``reader``: a ``formats.PlainReader``)."""
    specials = {}
    for k, row in enumerate(reader.section("special_tokens")):
        i, _, text = row.partition(" ")
        try:
            token = json.loads(text)
            if not i.isdigit() or not isinstance(token, str):
                raise ValueError
        except ValueError:
            reader.row_error(k, f"expected 'ID \"TEXT\"', got {row[:60]!r}")
        reader.check_id(k, f"special token {token!r}", int(i))
        specials[token] = int(i)
    return specials


def hf_added_tokens(obj: dict, fail) -> dict:
    """``{content: id}`` of a Hugging Face ``tokenizer.json``'s ``added_tokens``;
    ``fail(message)`` makes the error for a malformed entry."""
    specials = {}
    added_tokens = obj.get("added_tokens") or []
    if not isinstance(added_tokens, list):
        raise fail("added_tokens must be a list")
    for k, added in enumerate(added_tokens):
        if not isinstance(added, dict) or not isinstance(added.get("content"), str) \
                or "id" not in added:
            raise fail(f"added_tokens[{k}] = {str(added)[:60]} lacks an id or content")
        if not is_token_id(added["id"]):
            raise fail(token_id_problem(f"added_tokens[{k}] ({added['content'][:40]!r})",
                                        added["id"]))
        specials[added["content"]] = added["id"]
    return specials


def from_file(path, *, merges=None, special_tokens=None, pattern=None) -> Tokenizer:
    """Load a tokenizer from any supported file, recognising its format:

    - tinylm's own files (first line ``tinylm-tokenizer <name> <version>``): the class
      registered under ``<name>`` loads it;
    - a Hugging Face ``tokenizer.json`` (a BPE or WordPiece model; another model type,
      such as Unigram, by the registered class whose ``hf_model_type`` names it, through
      its ``from_hf_json(path, parsed=obj)``);
    - a GPT-2 ``vocab.json``: ``merges`` names the merges.txt (default: the
      ``merges.txt`` beside it);
    - a tiktoken ranks file (``<base64 token> <rank>`` lines): ``special_tokens``
      ({text: id}) and ``pattern`` (default "gpt4") complete it, since the file has
      neither;
    - a file a registered class recognises: its classmethod ``sniff_file(path) ->
      bool`` says so, its ``from_file(path)`` reads it (e.g. the Unigram plugin's
      SentencePiece ``.model`` files);
    - a GGUF model file: the tokenizer its metadata holds (the one ``-m model.gguf``
      uses);
    - a BERT ``vocab.txt`` (one token per line): a WordPiece tokenizer; pass
      ``lowercase`` through ``WordPieceTokenizer.from_vocab_file`` if you need to
      choose it (here it is guessed from the vocabulary).
    """
    from tinylm import plugins
    from tinylm.tokenizers import formats

    path = Path(path)
    for cls in plugins.registry("tokenizers").values():  # formats plugins recognise
        sniff = getattr(cls, "sniff_file", None)
        if sniff is not None and sniff(path):
            return cls.from_file(path)
    kind, detail, parsed = formats.sniff(path)
    if kind == "tinylm":
        found = plugins.registry("tokenizers")
        if detail not in found:
            raise TokenizerFileError(
                f"{str(path)!r} is a {detail!r} tokenizer, which no loaded plugin provides "
                f"(tokenizers: {', '.join(sorted(found)) or 'none'}); install the plugin that "
                f"saved it, or the file is corrupted")
        return found[detail].load(path)
    if kind == "hf-json":
        name = {"BPE": "bpe", "WordPiece": "wordpiece"}.get(detail)
        if name is None:  # a plugin's class that says it reads this model type
            readers = [cls for cls in plugins.registry("tokenizers").values()
                       if getattr(cls, "hf_model_type", None) == detail]
            if readers:
                return readers[0].from_hf_json(path, parsed=parsed)
            raise TokenizerFileError(f"{str(path)!r} is a Hugging Face tokenizer with a {detail!r} "
                                     f"model; tinylm reads BPE and WordPiece models, and plugins "
                                     f"more (a class with hf_model_type = {detail!r}; Unigram: "
                                     f"pip install tinylm-unigram)")
        return plugins.get_tokenizer_class(name).from_hf_json(path, parsed=parsed)
    if kind == "gguf":  # a model file: the tokenizer in its metadata, as -m model.gguf uses
        from tinylm.formats.gguf import read_gguf
        from tinylm.formats.gguf_tokenizer import tokenizer_from_gguf

        return tokenizer_from_gguf(read_gguf(path))
    if kind == "gpt2-vocab":
        if merges is None and not path.with_name("merges.txt").is_file():
            raise TokenizerFileError(
                f"{str(path)!r} is a JSON object of token ids, which tinylm reads as a GPT-2 "
                f"vocab.json, but there is no merges.txt beside it; put its merges.txt "
                f"there, or give a Hugging Face tokenizer.json or a tinylm tokenizer file")
        merges = Path(merges) if merges is not None else path.with_name("merges.txt")
        return plugins.get_tokenizer_class("bpe").from_gpt2_files(
            path, merges, special_tokens=special_tokens, pattern=pattern or "gpt2",
            parsed=parsed)
    if kind == "tiktoken":
        return plugins.get_tokenizer_class("bpe").from_tiktoken_file(
            path, special_tokens=special_tokens or {}, pattern=pattern or "gpt4")
    return plugins.get_tokenizer_class("wordpiece").from_vocab_file(path)  # "vocab-txt"

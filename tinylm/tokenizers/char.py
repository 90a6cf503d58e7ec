"""Character-level tokenizer: one id per character, the classic nanoGPT set-up.

The vocabulary is the sorted set of characters of the training text (nanoGPT's
``chars = sorted(set(data))``), so on tinyshakespeare the 65 characters get ids 0-64
with ``"\\n"`` as 0 and ``" "`` as 1. Special tokens, if any, come after them:

    >>> tok = CharTokenizer.train("hello world")
    >>> tok.encode("hello")
    [3, 2, 4, 4, 5]
    >>> tok.decode([7, 5, 6, 4, 1])
    'world'

A character outside the vocabulary is an error naming it, unless the tokenizer has
an ``unk_token`` (a special token that stands for any unknown character).
"""

from __future__ import annotations

import json
from collections import Counter

from tinylm.tokenizers import formats
from tinylm.tokenizers.base import (
    Tokenizer, TokenizerError, as_id_list, atomic_write, bad_ids_error, check_text,
    is_token_id, read_special_tokens, special_token_rows, surrogate_error, token_id_problem,
)


class CharTokenizer(Tokenizer):
    """``chars``: the vocabulary characters in id order (a str or a list of 1-char
    strings). ``special_tokens``: a list of texts (ids after the characters) or
    ``{text: id}``. ``unk_token``: one of the special tokens, used for characters not
    in the vocabulary (default: none, unknown characters raise)."""

    name = "char"
    FORMAT_VERSION = 1

    def __init__(self, chars, special_tokens=(), *, unk_token: str | None = None):
        chars = list(chars)
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise TokenizerError(f"a character vocabulary holds single characters, not {c!r}")
            if "\ud800" <= c <= "\udfff":
                raise TokenizerError(f"{c!r} is a lone surrogate, which cannot be a character "
                                     f"of the vocabulary")
        if len(set(chars)) != len(chars):
            dup = next(c for c, n in Counter(chars).items() if n > 1)
            raise TokenizerError(f"the character {dup!r} is in the vocabulary twice")
        self.chars = chars
        self._stoi = {c: i for i, c in enumerate(chars)}
        if not isinstance(special_tokens, dict):
            unique = dict.fromkeys(special_tokens)
            special_tokens = {t: len(chars) + k for k, t in enumerate(unique)}
        for t, i in special_tokens.items():
            if not is_token_id(i):
                raise TokenizerError(token_id_problem(f"special token {t!r}", i))
            if not isinstance(t, str) or not t or i < len(chars):
                raise TokenizerError(f"special token {t!r} -> {i!r}: special tokens are non-empty "
                                     f"strings with ids after the {len(chars)} characters")
        self.special_tokens = dict(special_tokens)
        if unk_token is not None and unk_token not in self.special_tokens:
            raise TokenizerError(f"unk_token {unk_token!r} must be one of the special tokens")
        self.unk_token = unk_token
        size = max([len(chars) - 1, *self.special_tokens.values()]) + 1
        self._itos = chars + [None] * (size - len(chars))
        self._itos_plain = list(self._itos)  # for skip_special_tokens: specials as ""
        for t, i in self.special_tokens.items():
            self._itos[i] = t
            self._itos_plain[i] = ""

    @classmethod
    def train(cls, texts, vocab_size: int | None = None, *, special_tokens=(),
              unk_token: str | None = None, progress: bool = False) -> "CharTokenizer":
        """The sorted characters of ``texts`` (a str or an iterable of str). With
        ``vocab_size``, only the most frequent characters are kept (ties: the
        smaller character) and ``unk_token`` is required for the rest."""
        if isinstance(texts, str):
            texts = [texts]
        counts = Counter()
        for text in texts:
            check_text(text)
            counts.update(text)
        surrogates = [c for c in counts if "\ud800" <= c <= "\udfff"]
        if surrogates:
            raise surrogate_error(surrogates[0])
        special_tokens = list(dict.fromkeys([*special_tokens, *([unk_token] if unk_token else [])]))
        chars = sorted(counts)
        if vocab_size is not None:
            room = vocab_size - len(special_tokens)
            if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or room < 1:
                raise TokenizerError(f"vocab_size must be an int above the number of special "
                                     f"tokens ({len(special_tokens)}), not {vocab_size!r}")
            if room < len(chars):
                if unk_token is None:
                    problem = (f"the text has {len(chars)} distinct characters but vocab_size "
                               f"leaves room for {room}")
                    raise TokenizerError(f"{problem}; pass unk_token= to map the rarest to it, "
                                         f"or raise vocab_size", option="unk_token",
                                         problem=problem)
                kept = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:room]
                chars = sorted(c for c, _ in kept)
        return cls(chars, special_tokens, unk_token=unk_token)

    @classmethod
    def train_from_files(cls, paths, vocab_size: int | None = None, *, special_tokens=(),
                         unk_token: str | None = None,
                         progress: bool = False) -> "CharTokenizer":
        """``train`` on UTF-8 text files (a leading byte order mark is not text)."""
        if isinstance(paths, (str, bytes)) or not hasattr(paths, "__iter__"):
            paths = [paths]
        texts = [formats.read_text_file(path) for path in paths]
        return cls.train(texts, vocab_size, special_tokens=special_tokens, unk_token=unk_token,
                         progress=progress)

    # ------------------------------------------------------------------ vocabulary

    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    def token_to_id(self, token: str):
        return self.special_tokens.get(token, self._stoi.get(token))

    def id_to_token(self, id: int):
        if isinstance(id, int) and 0 <= id < len(self._itos):
            return self._itos[id]
        return None

    def get_vocab(self) -> dict:
        return {**self._stoi, **self.special_tokens}

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"

    # ------------------------------------------------------------------ encode / decode

    def _encode_text(self, text: str) -> list:
        try:
            return list(map(self._stoi.__getitem__, text))
        except KeyError:
            pass
        if self.unk_token is not None:
            unk = self.special_tokens[self.unk_token]
            get = self._stoi.get
            return [get(c, unk) for c in text]
        for i, c in enumerate(text):
            if c not in self._stoi:
                if "\ud800" <= c <= "\udfff":
                    raise surrogate_error(text)
                problem = (f"the character {c!r} (at {i}) is not in the vocabulary of "
                           f"{len(self.chars)} characters")
                raise TokenizerError(f"{problem}; train the tokenizer on text that has it, or "
                                     f"give it an unk_token", option="unk_token", problem=problem)
        raise AssertionError("unreachable")

    def encode(self, text: str, *, allowed_special=(), disallowed_special="all") -> list:
        return self._encode_with_specials(text, allowed_special, disallowed_special,
                                          self._encode_text)

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        ids = as_id_list(ids)
        table = self._itos_plain if skip_special_tokens else self._itos
        try:
            if ids and min(ids) < 0:
                raise IndexError
            return "".join(map(table.__getitem__, ids))
        except (IndexError, TypeError):
            raise bad_ids_error(ids, self.vocab_size,
                                known=lambda i: self._itos[i] is not None) from None

    def decode_bytes(self, ids, *, skip_special_tokens: bool = False) -> bytes:
        return self.decode(ids, skip_special_tokens=skip_special_tokens).encode("utf-8")

    # ------------------------------------------------------------------ files

    def save(self, path, format: str | None = None) -> None:
        """Save in tinylm's plain-text format (the only one for characters)."""
        if format not in (None, "tinylm"):
            raise TokenizerError(f"a char tokenizer saves only in the 'tinylm' format, not "
                                 f"{format!r}")
        w = formats.PlainWriter(self.name, self.FORMAT_VERSION)
        w.field("unk_token", self.unk_token)
        w.section("special_tokens", special_token_rows(self.special_tokens.items()))
        w.section("chars", (json.dumps(c, ensure_ascii=True) for c in self.chars))
        atomic_write(path, w.text())

    @classmethod
    def load(cls, path) -> "CharTokenizer":
        r = formats.PlainReader(path, cls.name)
        unk_token = r.field("unk_token")
        specials = read_special_tokens(r)
        chars = []
        for k, row in enumerate(r.section("chars")):
            try:
                c = json.loads(row)
            except ValueError:
                c = None
            if not isinstance(c, str) or len(c) != 1:
                r.row_error(k, f"expected one JSON-quoted character, got {row[:60]!r}")
            chars.append(c)
        r.end()
        try:
            return cls(chars, specials, unk_token=unk_token)
        except TokenizerError as e:
            raise formats.file_error(path, f"{e}; the file is corrupted") from None

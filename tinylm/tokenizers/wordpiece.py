"""WordPiece, the BERT tokenizer (cased and uncased), as Hugging Face ``tokenizers``
runs it (BertNormalizer, BertPreTokenizer, WordPiece model, BertProcessing).

Three steps:

1. normalize: drop control characters and U+FFFD, turn every whitespace character
   into a space (``clean_text``); put spaces around CJK ideographs so each is a word
   (``handle_chinese_chars``); when uncased, decompose accents (NFD) and drop the
   combining marks (``strip_accents``, which follows ``lowercase`` unless set) and
   lower-case, character by character;
2. pre-tokenize: split at whitespace, and make every punctuation character a word of
   its own (ASCII punctuation, which includes ``$ + < = > ^ ` |``, and Unicode P*);
3. WordPiece each word, greedy longest match first: the longest prefix in the
   vocabulary, then the longest ``##``-prefixed continuation, and so on; a word with
   a piece that matches nothing, or longer than ``max_chars_per_word`` characters,
   is one ``[UNK]``. With ``un``, ``##aff``, ``##able`` in the vocabulary::

       "unaffable"  ->  un  ##aff  ##able

Then ``[CLS] A [SEP]`` (or ``[CLS] A [SEP] B [SEP]`` for a pair, with token type ids 0
for the first part and 1 for the second).
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import asdict, dataclass, fields, replace

import regex

from tinylm.tokenizers import formats
from tinylm.tokenizers.base import (
    Tokenizer, TokenizerError, as_id_list, atomic_write, bad_ids_error, hf_added_tokens,
    is_token_id, special_token_rows, surrogate_error, token_id_problem,
)

_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
               (0x2B740, 0x2B81F), (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
_CONTROL = frozenset(("Cc", "Cf", "Co", "Cs"))  # tokenizers' is_other, without Cn
_WHITESPACE = regex.compile(r"\s")  # Unicode White_Space, as Rust's char::is_whitespace
_ASCII_PUNCT = r"""!-/:-@\[-`{-~"""
# Words: runs of neither whitespace nor punctuation; or one punctuation character.
_SPLIT = regex.compile(rf"[^\s{_ASCII_PUNCT}\p{{P}}]+|[{_ASCII_PUNCT}\p{{P}}]")
_SPLIT_ASCII = re.compile(rf"[^\s{_ASCII_PUNCT}]+|[{_ASCII_PUNCT}]", re.ASCII)
_WORD_CACHE_MAX = 1 << 17


def _is_cjk(code: int) -> bool:
    return any(lo <= code <= hi for lo, hi in _CJK_RANGES)


def _vocab_dict(vocab) -> dict:
    """``{token: id}`` from a list in id order (a token listed twice keeps its last
    line, as tokenizers does) or a dict, with every id checked."""
    if isinstance(vocab, dict):
        out = dict(vocab)
    else:
        out = {}
        for i, token in enumerate(vocab):
            out[token] = i
    for t, i in out.items():
        if not isinstance(t, str):
            raise TokenizerError(f"a WordPiece vocabulary maps token strings to ids, not {t!r}")
        if not is_token_id(i):
            raise TokenizerError(token_id_problem(f"token {t!r}", i))
    return out


class _LazyTable(dict):
    """A ``str.translate`` table that computes each character's entry on first use."""

    __slots__ = ("compute",)

    def __init__(self, compute):
        super().__init__()
        self.compute = compute

    def __missing__(self, code):
        value = self[code] = self.compute(chr(code))
        return value


@dataclass(frozen=True)
class WordPieceConfig:
    """The options of BERT's pipeline (the defaults are bert-base-uncased's): how text
    is normalized (``lowercase``, ``strip_accents``: None follows ``lowercase``,
    ``clean_text``, ``handle_chinese_chars``) and how words become pieces
    (``unk_token``, ``continuing_prefix``, ``max_chars_per_word``, and the ``cls_token``
    and ``sep_token`` that ``encode`` adds)."""

    lowercase: bool = True
    strip_accents: bool | None = None
    clean_text: bool = True
    handle_chinese_chars: bool = True
    unk_token: str = "[UNK]"
    continuing_prefix: str = "##"
    max_chars_per_word: int = 100
    cls_token: str = "[CLS]"
    sep_token: str = "[SEP]"

    def __post_init__(self):
        for key in ("lowercase", "clean_text", "handle_chinese_chars"):
            object.__setattr__(self, key, bool(getattr(self, key)))
        m = self.max_chars_per_word
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise TokenizerError(f"max_chars_per_word must be a positive int, not {m!r}")

    @classmethod
    def build(cls, config: "WordPieceConfig | None" = None, **options) -> "WordPieceConfig":
        """``config`` (default: the defaults) with ``options`` (its fields) replaced."""
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise TokenizerError(f"unknown WordPiece option(s) {', '.join(unknown)}; the options "
                                 f"are {', '.join(f.name for f in fields(cls))}")
        return replace(config or cls(), **options)


class WordPieceTokenizer(Tokenizer):
    """BERT's WordPiece. ``vocab``: the tokens in id order (a list) or ``{token: id}``;
    ``config``: a ``WordPieceConfig``, or its fields as keywords (``lowercase=False``
    ...); ``special_tokens``: texts of the vocabulary or ``{text: id}`` (default: those
    of [PAD] [UNK] [CLS] [SEP] [MASK] it has).

        >>> vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "##aff", "##able", "!"]
        >>> tok = WordPieceTokenizer(vocab, lowercase=True)
        >>> tok.encode("Unaffable!")
        [2, 5, 6, 7, 8, 3]
        >>> tok.encode("Unaffable!", add_special_tokens=False)
        [5, 6, 7, 8]
        >>> tok.decode([2, 5, 6, 7, 8, 3], skip_special_tokens=True)
        'unaffable!'
    """

    name = "wordpiece"
    FORMAT_VERSION = 1

    def __init__(self, vocab, config: WordPieceConfig | None = None, *, special_tokens=None,
                 **options):
        config = self.config = WordPieceConfig.build(config, **options)
        for f in fields(config):  # tok.lowercase, tok.unk_token ... as attributes
            setattr(self, f.name, getattr(config, f.name))
        self.vocab = _vocab_dict(vocab)
        if config.unk_token not in self.vocab:
            raise TokenizerError(f"the unknown token {config.unk_token!r} is not in the "
                                 f"vocabulary; pass unk_token= with the vocabulary's own")
        self.special_tokens = self._special_dict(special_tokens)
        size = max([*self.vocab.values(), *self.special_tokens.values()], default=-1) + 1
        self._id_to_token = [None] * size
        for token, i in self.vocab.items():
            if self._id_to_token[i] is None:
                self._id_to_token[i] = token
        for token, i in self.special_tokens.items():
            self._id_to_token[i] = token
        self._unk_id = self.vocab[config.unk_token]
        self._strip = config.lowercase if config.strip_accents is None else bool(
            config.strip_accents)
        self._clean_table = _LazyTable(self._clean_char)
        self._case_table = _LazyTable(self._case_char)
        # clean_text on ASCII: \t \n \r become spaces, the other controls go.
        self._ascii_clean = {c: None for c in [*range(32), 127]}
        self._ascii_clean.update({9: " ", 10: " ", 13: " "})
        self._words: dict = {}

    def _special_dict(self, special_tokens) -> dict:
        """``{text: id}`` of the special tokens (see the class docstring)."""
        c = self.config
        if special_tokens is None:  # as BertWordPieceTokenizer: the BERT five it has
            special_tokens = [t for t in ("[PAD]", c.unk_token, c.cls_token, c.sep_token,
                                          "[MASK]") if t in self.vocab]
        if not isinstance(special_tokens, dict):
            missing = [t for t in special_tokens if t not in self.vocab]
            if missing:
                raise TokenizerError(f"special tokens {missing} are not in the vocabulary")
            special_tokens = {t: self.vocab[t] for t in special_tokens}
        for t, i in special_tokens.items():
            if not is_token_id(i):
                raise TokenizerError(token_id_problem(f"special token {t!r}", i))
        return dict(special_tokens)

    # ------------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    def token_to_id(self, token: str):
        return self.special_tokens.get(token, self.vocab.get(token))

    def id_to_token(self, id: int):
        if isinstance(id, int) and 0 <= id < len(self._id_to_token):
            return self._id_to_token[id]
        return None

    def get_vocab(self) -> dict:
        return {**self.vocab, **self.special_tokens}

    def __repr__(self) -> str:
        return (f"WordPieceTokenizer(vocab_size={self.vocab_size}, lowercase={self.lowercase}, "
                f"strip_accents={self._strip})")

    # ------------------------------------------------------------------ normalize

    def _clean_char(self, ch: str):
        code = ord(ch)
        if self.clean_text:
            if code == 0 or code == 0xFFFD:
                return None
            if ch in "\t\n\r":
                return " "
            if unicodedata.category(ch) in _CONTROL:
                return None
            if _WHITESPACE.match(ch):
                return " "
        if self.handle_chinese_chars and _is_cjk(code):
            return f" {ch} "
        return ch

    def _case_char(self, ch: str):
        if self._strip and unicodedata.category(ch) == "Mn":
            return None
        return ch.lower() if self.lowercase else ch

    def normalize(self, text: str) -> str:
        """Step 1 (see the module docstring)."""
        if text.isascii():
            if self.clean_text:
                text = text.translate(self._ascii_clean)
            return text.lower() if self.lowercase else text
        if self.clean_text or self.handle_chinese_chars:
            text = text.translate(self._clean_table)
        if self._strip:
            text = unicodedata.normalize("NFD", text)
        if self._strip or self.lowercase:
            text = text.translate(self._case_table)
        return text

    def pre_tokenize(self, text: str) -> list:
        """Step 2: the words of normalized text."""
        return (_SPLIT_ASCII if text.isascii() else _SPLIT).findall(text)

    def _wordpiece(self, word: str) -> tuple:
        """Step 3 for one word."""
        vocab = self.vocab
        if len(word) > self.max_chars_per_word:
            return (self._unk_id,)
        whole = vocab.get(word)
        if whole is not None:
            return (whole,)
        ids, start, n, prefix = [], 0, len(word), self.continuing_prefix
        while start < n:
            for end in range(n, start, -1):
                piece = word[start:end] if start == 0 else prefix + word[start:end]
                found = vocab.get(piece)
                if found is not None:
                    ids.append(found)
                    start = end
                    break
            else:
                return (self._unk_id,)
        return tuple(ids)

    def _encode_text(self, text: str) -> list:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise surrogate_error(text) from None
        words = self._words
        ids = []
        for word in self.pre_tokenize(self.normalize(text)):
            piece_ids = words.get(word)
            if piece_ids is None:
                piece_ids = self._wordpiece(word)
                if len(words) >= _WORD_CACHE_MAX:
                    words.clear()
                words[word] = piece_ids
            ids.extend(piece_ids)
        return ids

    def tokenize(self, text: str) -> list:
        """The token strings of ``text`` (no [CLS]/[SEP]; special tokens allowed)."""
        return [self._id_to_token[i]
                for i in self.encode(text, add_special_tokens=False, allowed_special="all")]

    # ------------------------------------------------------------------ encode

    def _encode_part(self, text, allowed_special, disallowed_special) -> list:
        return self._encode_with_specials(text, allowed_special, disallowed_special,
                                          self._encode_text)

    def encode_with_types(self, text: str, pair: str | None = None, *,
                          add_special_tokens: bool = True, allowed_special=(),
                          disallowed_special="all") -> tuple:
        """``(ids, token_type_ids)``: ``[CLS] text [SEP] pair [SEP]`` with type ids 0
        up to and including the first ``[SEP]`` and 1 after it."""
        a = self._encode_part(text, allowed_special, disallowed_special)
        b = None if pair is None else self._encode_part(pair, allowed_special, disallowed_special)
        if add_special_tokens:
            cls_id, sep_id = self._special_id(self.cls_token), self._special_id(self.sep_token)
            a = [cls_id, *a, sep_id]
            if b is not None:
                b = [*b, sep_id]
        if b is None:
            return a, [0] * len(a)
        return a + b, [0] * len(a) + [1] * len(b)

    def encode(self, text: str, pair: str | None = None, *, add_special_tokens: bool = True,
               allowed_special=(), disallowed_special="all") -> list:
        """The ids of ``text`` (and ``pair``), with ``[CLS]``/``[SEP]`` unless
        ``add_special_tokens=False``."""
        return self.encode_with_types(text, pair, add_special_tokens=add_special_tokens,
                                      allowed_special=allowed_special,
                                      disallowed_special=disallowed_special)[0]

    def encode_batch(self, texts, **kwargs) -> list:
        if isinstance(texts, (str, bytes)):
            raise TokenizerError("encode_batch takes a list of strings (or of (a, b) pairs)")
        return [self.encode(*t, **kwargs) if isinstance(t, tuple) else self.encode(t, **kwargs)
                for t in texts]

    def _special_id(self, token: str) -> int:
        i = self.token_to_id(token)
        if i is None:
            raise TokenizerError(f"{token!r} is not in the vocabulary, so [CLS]/[SEP] cannot be "
                                 f"added; pass add_special_tokens=False")
        return i

    # ------------------------------------------------------------------ decode

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        """Tokens joined with spaces, ``##`` continuations glued on, and the spaces
        before punctuation removed, as ``tokenizers``' WordPiece decoder does."""
        ids = as_id_list(ids)
        table = self._id_to_token
        try:
            if ids and min(ids) < 0:
                raise IndexError
            tokens = list(map(table.__getitem__, ids))
            if None in tokens:
                raise IndexError
        except (IndexError, TypeError):
            raise bad_ids_error(ids, self.vocab_size,
                                known=lambda i: table[i] is not None) from None
        if skip_special_tokens:
            special = self.special_ids
            tokens = [t for i, t in zip(ids, tokens) if i not in special]
        prefix = self.continuing_prefix
        out = []
        for i, token in enumerate(tokens):
            if i:
                token = token.replace(prefix, "", 1) if token.startswith(prefix) else " " + token
            out.append(_cleanup(token))
        return "".join(out)

    def decode_bytes(self, ids, *, skip_special_tokens: bool = False) -> bytes:
        return self.decode(ids, skip_special_tokens=skip_special_tokens).encode("utf-8")

    # ------------------------------------------------------------------ files

    def _options(self) -> dict:
        return asdict(self.config)

    def save(self, path, format: str | None = None) -> None:
        """Save as "tinylm" (default), "hf" (tokenizer.json; the default for a
        ``.json`` path) or "vocab-txt" (BERT's vocab.txt: the vocabulary only)."""
        from pathlib import Path

        path = Path(path)
        format = format or ("hf" if path.suffix == ".json" else "tinylm")
        if format == "tinylm":
            w = formats.PlainWriter(self.name, self.FORMAT_VERSION)
            for key, value in self._options().items():
                w.field(key, value)
            w.section("special_tokens", special_token_rows(self.special_tokens.items()))
            w.section("tokens", (f"{i} {json.dumps(t, ensure_ascii=False)}"
                                 for t, i in sorted(self.vocab.items(), key=lambda kv: kv[1])))
            atomic_write(path, w.text())
        elif format == "hf":
            atomic_write(path, formats.hf_json_text(self.to_hf_dict()))
        elif format == "vocab-txt":
            tokens = self._id_to_token
            if None in tokens or any("\n" in t or t != t.rstrip() for t in tokens):
                raise TokenizerError("this vocabulary has gaps or tokens with newlines or "
                                     "trailing spaces, which vocab.txt cannot hold; save as "
                                     "'tinylm' or 'hf'")
            atomic_write(path, "".join(f"{t}\n" for t in tokens))
        else:
            raise TokenizerError(f"unknown format {format!r}; expected 'tinylm', 'hf' or "
                                 f"'vocab-txt'")

    @classmethod
    def load(cls, path) -> "WordPieceTokenizer":
        r = formats.PlainReader(path, cls.name)
        options = {f.name: r.field(f.name) for f in fields(WordPieceConfig)}

        def rows(section):
            out = {}
            for k, row in enumerate(r.section(section)):
                i, _, text = row.partition(" ")
                try:
                    token = json.loads(text)
                    if not i.isdigit() or not isinstance(token, str):
                        raise ValueError
                except ValueError:
                    r.row_error(k, f"expected 'ID \"TOKEN\"', got {row[:60]!r}")
                r.check_id(k, f"token {token[:40]!r}", int(i))
                out[token] = int(i)
            return out

        specials = rows("special_tokens")
        vocab = rows("tokens")
        r.end()
        try:
            return cls(vocab, special_tokens=specials, **options)
        except (TokenizerError, TypeError) as e:
            raise formats.file_error(path, f"{e}; the file is corrupted") from None

    @classmethod
    def from_vocab_file(cls, path, *, lowercase: bool | None = None, **options):
        """Load a BERT ``vocab.txt``. ``lowercase`` defaults to a guess: uncased when
        the vocabulary has no token with an upper-case letter."""
        tokens = formats.read_vocab_txt(path)
        if lowercase is None:
            specials = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}
            lowercase = not any(t != t.lower() for t in tokens if t not in specials)
        try:
            return cls(tokens, lowercase=lowercase, **options)
        except TokenizerError as e:
            raise formats.file_error(path, str(e)) from None

    def to_hf_dict(self) -> dict:
        """This tokenizer as a Hugging Face ``tokenizer.json`` object."""
        post = None
        if self.cls_token in self.vocab and self.sep_token in self.vocab:
            post = {"type": "BertProcessing",
                    "sep": [self.sep_token, self.token_to_id(self.sep_token)],
                    "cls": [self.cls_token, self.token_to_id(self.cls_token)]}
        return {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": formats.hf_added_tokens(self.special_tokens),
            "normalizer": {"type": "BertNormalizer", "clean_text": self.clean_text,
                           "handle_chinese_chars": self.handle_chinese_chars,
                           "strip_accents": self.strip_accents, "lowercase": self.lowercase},
            "pre_tokenizer": {"type": "BertPreTokenizer"},
            "post_processor": post,
            "decoder": {"type": "WordPiece", "prefix": self.continuing_prefix, "cleanup": True},
            "model": {"type": "WordPiece", "unk_token": self.unk_token,
                      "continuing_subword_prefix": self.continuing_prefix,
                      "max_input_chars_per_word": self.max_chars_per_word,
                      "vocab": dict(sorted(self.vocab.items(), key=lambda kv: kv[1]))},
        }

    @classmethod
    def from_hf_json(cls, path, *, parsed=None) -> "WordPieceTokenizer":
        """Load a Hugging Face ``tokenizer.json`` with a WordPiece model and the BERT
        normalizer and pre-tokenizer (``path``: the file, or its parsed JSON object)."""
        if isinstance(path, dict):  # the parsed JSON itself
            path, parsed = "tokenizer.json", path
        obj = formats.read_json(path) if parsed is None else parsed
        fail = lambda message: formats.file_error(path, message)  # noqa: E731
        model = obj.get("model") if isinstance(obj, dict) else None
        if not isinstance(model, dict) or model.get("type") != "WordPiece":
            raise fail("not a tokenizer.json with a WordPiece model")
        norm = obj.get("normalizer")
        if norm is None:
            options = {"lowercase": False, "strip_accents": False, "clean_text": False,
                       "handle_chinese_chars": False}
        elif isinstance(norm, dict) and norm.get("type") == "BertNormalizer":
            options = {"lowercase": bool(norm.get("lowercase", True)),
                       "strip_accents": norm.get("strip_accents"),
                       "clean_text": bool(norm.get("clean_text", True)),
                       "handle_chinese_chars": bool(norm.get("handle_chinese_chars", True))}
        else:
            raise fail(f"normalizer {norm.get('type') if isinstance(norm, dict) else norm!r} "
                       f"is not supported; tinylm's WordPiece uses BertNormalizer")
        pre = obj.get("pre_tokenizer")
        if not (isinstance(pre, dict) and pre.get("type") == "BertPreTokenizer"):
            raise fail(f"pre_tokenizer {pre.get('type') if isinstance(pre, dict) else pre!r} is "
                       f"not supported; tinylm's WordPiece uses BertPreTokenizer")
        post = obj.get("post_processor") or {}
        if post.get("type") == "BertProcessing":
            options["cls_token"], options["sep_token"] = post["cls"][0], post["sep"][0]
        vocab = model.get("vocab")
        if not isinstance(vocab, dict):
            raise fail("model.vocab must be an object mapping tokens to ids")
        formats.check_vocab_ids(vocab, path, "model.vocab token")
        specials = hf_added_tokens(obj, fail)
        try:
            return cls(vocab, unk_token=model.get("unk_token", "[UNK]"),
                       continuing_prefix=model.get("continuing_subword_prefix", "##"),
                       max_chars_per_word=model.get("max_input_chars_per_word", 100),
                       special_tokens=specials, **options)
        except TokenizerError as e:
            raise fail(str(e)) from None


def _cleanup(token: str) -> str:
    """``tokenizers``' decoder cleanup: no space before punctuation and contractions."""
    return (token.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",")
            .replace(" ' ", "'").replace(" n't", "n't").replace(" 'm", "'m")
            .replace(" do not", " don't").replace(" 's", "'s").replace(" 've", "'ve")
            .replace(" 're", "'re"))

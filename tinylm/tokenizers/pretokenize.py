"""Pre-tokenization: the regex that cuts text into the pieces BPE merges inside.

Byte-level BPE never merges across a piece boundary, so the split pattern decides
what a token can be ("hello" and " world" can become tokens, "o w" never can).
Two patterns are built in, exactly as their peers spell them:

- ``"gpt2"``: GPT-2's pattern, the one Hugging Face ``tokenizers``' ByteLevel
  pre-tokenizer uses (and, in an equivalent possessive form, tiktoken's r50k/p50k);
- ``"gpt4"`` (alias ``"cl100k"``): tiktoken's cl100k_base pattern: case-insensitive
  contractions, numbers in groups of at most three digits, newlines kept apart.

and the pre-tokenizers GGUF files name in ``tokenizer.ggml.pre``, as llama.cpp spells
them (``llm_tokenizer_bpe`` in its src/llama-vocab.cpp):

- ``"smollm"`` (also StarCoder, Refact, Command-R, CodeShell): every digit a piece of
  its own, then GPT-2's pattern inside the text between digits. llama.cpp (and Hugging
  Face's ``Digits(individual_digits=True)`` + ``ByteLevel``) run the two regexes one
  after the other; ``SMOLLM_PATTERN`` is one regex that cuts the same pieces: a digit
  first, and GPT-2's ``\\s+(?!\\S)`` becomes ``\\s+(?![^\\s\\p{N}])`` because the end of
  a piece between digits is, for the lookahead, the end of the text;
- ``"llama-bpe"`` (Llama 3): llama.cpp's spelling of the first cl100k pattern (the
  contractions as ``'[sS]|...`` rather than ``(?i:...)``, ``\\s*[\\r\\n]+``, no
  ``\\s++$``);
- ``"qwen2"``: the same with single digits (``\\p{N}``, not ``\\p{N}{1,3}``).

Any other string is compiled as a user pattern (``regex`` module syntax, so ``\\p{L}``
works). Text a pattern does not match is kept as pieces of its own, as Hugging Face's
``Split(behavior="isolated")`` does, so no character is ever lost:

    >>> PreTokenizer("gpt2").split("Hello world's  123!")
    ['Hello', ' world', "'s", ' ', ' 123', '!']
    >>> PreTokenizer("gpt4").split("Hello world's  12345!")
    ['Hello', ' world', "'s", ' ', ' ', '123', '45', '!']
    >>> PreTokenizer(r"\\w+").split("a, b")
    ['a', ', ', 'b']

Speed: the ``regex`` module gives the exact Unicode classes; for pure-ASCII text
(``str.isascii()``, checked in C) the built-in patterns switch to an equivalent
stdlib ``re`` pattern with ASCII classes, which runs about 2.5x faster. On ASCII
input the two agree exactly (tests/test_tokenizers_bpe.py checks it with
Hypothesis). Possessive quantifiers never change a match in these patterns: the
twins use them where Python's `re` has them (3.11+) and they help, else drop them.
"""

from __future__ import annotations

import re

import regex

from tinylm.tokenizers.base import TokenizerError

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# tiktoken's cl100k_base (tiktoken_ext/openai_public.py, 0.7+). The older spelling
# with `\s*[\r\n]+` and no `\s++$` differs on whitespace after a newline at the very
# end of a text; this one is what tiktoken's cl100k_base encodes with.
GPT4_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|"""
                r""" ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")

SMOLLM_PATTERN = (r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|"""
                  r"""\s+(?![^\s\p{N}])|\s+""")

_CONTRACTIONS = r"""(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"""
LLAMA3_PATTERN = (_CONTRACTIONS + r"""|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
                  r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")

PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN, "cl100k": GPT4_PATTERN,
            "smollm": SMOLLM_PATTERN, "llama-bpe": LLAMA3_PATTERN, "qwen2": QWEN2_PATTERN}
_NAMES = {GPT2_PATTERN: "gpt2", GPT4_PATTERN: "gpt4", SMOLLM_PATTERN: "smollm",
          LLAMA3_PATTERN: "llama-bpe", QWEN2_PATTERN: "qwen2"}

# The same patterns for ASCII-only text, in stdlib `re` syntax (used with re.ASCII,
# where \s is [ \t\n\r\f\v], exactly the ASCII part of Unicode White_Space).
# GPT-2's twin tries the commonest piece, a word, first (10% faster on English): the
# order of two alternatives matters only where both can match, and here that is only
# the contractions before punctuation (both take "'") and every ` ?X+` before the
# `\s+` fallback (both take a space). Its class runs are possessive, as tiktoken's own
# spelling (r50k_pat_str) has them: nothing after a run can match what the run gave
# up, so no match changes, and Python 3.11's `re` skips the backtracking states
# (another 5-7% on tinyshakespeare).
_ASCII_TWINS = {
    GPT2_PATTERN: (r""" ?[A-Za-z]++|'(?:[std]|re|ve|m|ll)| ?[^\sA-Za-z0-9]++| ?[0-9]++|"""
                   r"""\s+(?!\S)|\s+"""),
    GPT4_PATTERN: (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\nA-Za-z0-9]?[A-Za-z]+|[0-9]{1,3}|"""
                   r""" ?[^\sA-Za-z0-9]+[\r\n]*|\s+$|\s*[\r\n]|\s+(?!\S)|\s"""),
    SMOLLM_PATTERN: (r"""[0-9]|'(?:[std]|re|ve|m|ll)| ?[A-Za-z]+| ?[^\sA-Za-z0-9]+|"""
                     r"""\s+(?![^\s0-9])|\s+"""),
}


# How the built-ins are spelled in a tokenizer.json. Hugging Face compiles Split
# patterns with Oniguruma, where `{1,3}+` means "one or more groups of one to three",
# not a possessive {1,3}; the possessive adds nothing here, so it is left out.
_HF_SPELLINGS = {GPT4_PATTERN: GPT4_PATTERN.replace(r"\p{N}{1,3}+", r"\p{N}{1,3}")}


def hf_pattern(pattern: str, reverse: bool = False) -> str:
    """The spelling of ``pattern`` for a tokenizer.json (``reverse``: read one back)."""
    if reverse:
        back = {hf: ours for ours, hf in _HF_SPELLINGS.items()}
        return back.get(pattern, pattern)
    source = resolve_pattern(pattern)
    return _HF_SPELLINGS.get(source, source)


def resolve_pattern(pattern: str) -> str:
    """The regex source for a pattern name (a key of ``PATTERNS``) or a regex."""
    if not isinstance(pattern, str) or not pattern:
        raise TokenizerError(f"pattern must be 'gpt2', 'gpt4' or a regular expression, "
                             f"not {pattern!r}")
    return PATTERNS.get(pattern, pattern)


def pattern_name(pattern: str) -> str | None:
    """The name of a built-in pattern ("gpt2", "gpt4", "smollm", ...), else None."""
    return _NAMES.get(resolve_pattern(pattern))


def _compile_ascii(twin: str):
    """An ASCII twin compiled by stdlib `re`; before Python 3.11 `re` has no possessive
    quantifiers, and without them (they change no match here) the twin is the same."""
    try:
        return re.compile(twin, re.ASCII)
    except re.error:
        return re.compile(twin.replace("++", "+"), re.ASCII)


class PreTokenizer:
    """Splits text into pieces with one regex; ``"".join(split(t)) == t`` always."""

    def __init__(self, pattern: str = "gpt2"):
        self.pattern = resolve_pattern(pattern)
        try:
            self._regex = regex.compile(self.pattern)
        except (regex.error, TypeError) as e:
            raise TokenizerError(f"the pre-tokenization pattern {self.pattern!r} is not a valid "
                                 f"regular expression: {e}") from e
        twin = _ASCII_TWINS.get(self.pattern)
        self._ascii = _compile_ascii(twin) if twin else None
        # Built-ins match every character and have no groups: findall is exact.
        self._builtin = twin is not None

    def split(self, text: str) -> list:
        """The pieces of ``text`` in order; their concatenation is ``text``."""
        if self._builtin:
            if text.isascii():
                return self._ascii.findall(text)
            return self._regex.findall(text)
        pieces, end = [], 0
        for match in self._regex.finditer(text):
            start, stop = match.span()
            if start > end:
                pieces.append(text[end:start])  # a gap the pattern skipped
            if stop > start:
                pieces.append(text[start:stop])
            end = max(end, stop)
        if end < len(text):
            pieces.append(text[end:])
        return pieces

    def __repr__(self) -> str:
        name = pattern_name(self.pattern)
        return f"PreTokenizer({name or self.pattern!r})"

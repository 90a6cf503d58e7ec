"""Hugging Face ``tokenizer.json`` pipelines around a Unigram model: the normalizer and
the pre-tokenizer, run as ``tokenizers`` 0.2x runs them.

Supported (anything else is refused with a message naming it):

- normalizers: ``Precompiled`` (SentencePiece's charsmap, applied per grapheme
  cluster as the ``spm_precompiled`` crate does: a cluster shorter than 6 bytes is
  replaced whole by the rule of its *shortest* matching prefix, else character by
  character; clusters are ``regex``'s ``\\X``), ``Sequence``, ``Replace`` (string or
  regex pattern), ``Strip``, ``NFC``/``NFD``/``NFKC``/``NFKD`` (Python's
  ``unicodedata``, whose Unicode version may differ from the Rust crate's),
  ``Lowercase``, ``Prepend``;
- pre-tokenizers: ``Metaspace`` (``prepend_scheme`` always / first / never, or the
  older ``add_prefix_space``; ``split``), ``WhitespaceSplit``, ``Sequence``.

``Metaspace`` with ``prepend_scheme: first`` prefixes the split that starts at offset 0
of the *normalized* text (``tokenizers`` looks at the original offset; they differ only
when a normalizer removed leading characters).
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata

import regex

from tinylm_unigram.charsmap import Charsmap, CharsmapError

SPACE = "\u2581"
# Rust's char::is_whitespace (the Unicode White_Space property); str.split() differs
WHITESPACE = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f"
                        "\u205f\u3000]+")
_GRAPHEME = regex.compile(r"\X", regex.S)
# characters after which a grapheme cluster may go on (or \r of \r\n): where the
# per-cluster rule can differ from the per-character one
_EXTENDING = regex.compile(r"[\r\p{Grapheme_Cluster_Break=Extend}\p{Grapheme_Cluster_Break=ZWJ}"
                           r"\p{Grapheme_Cluster_Break=SpacingMark}\p{Grapheme_Cluster_Break=Prepend}"
                           r"\p{Grapheme_Cluster_Break=L}\p{Grapheme_Cluster_Break=V}"
                           r"\p{Grapheme_Cluster_Break=T}\p{Grapheme_Cluster_Break=LV}"
                           r"\p{Grapheme_Cluster_Break=LVT}\p{Grapheme_Cluster_Break=Regional_Indicator}]")


class PipelineError(ValueError):
    """A tokenizer.json component tinylm cannot run."""


# ---------------------------------------------------------------------- normalizers


class Precompiled:
    def __init__(self, blob: bytes):
        self.blob = blob
        self.charsmap = Charsmap(blob)
        self.table = dict(self.charsmap.singles)

    def __call__(self, text: str) -> str:
        if not _EXTENDING.search(text):
            return text.translate(self.table)  # every cluster is one character
        out = []
        for g in _GRAPHEME.findall(text):
            if len(g) == 1:
                out.append(self.table.get(ord(g), g))
                continue
            data = g.encode("utf-8")
            if len(data) < 6:
                first = next(self.charsmap.prefix_matches(data), None)
                if first is not None:
                    out.append(first[1])
                    continue
            out.append(g.translate(self.table))
        return "".join(out)


def _normalizer(spec):
    """A ``str -> str`` for a tokenizer.json ``normalizer`` object (None: identity)."""
    if spec is None:
        return None
    kind = spec.get("type")
    if kind == "Sequence":
        steps = [f for f in map(_normalizer, spec.get("normalizers") or []) if f is not None]
        return lambda text: _chain(steps, text)
    if kind == "Precompiled":
        raw = spec.get("precompiled_charsmap") or ""
        try:
            blob = base64.b64decode(raw) if isinstance(raw, str) else bytes(raw)
            return Precompiled(blob) if blob else None
        except (binascii.Error, CharsmapError, ValueError) as e:
            raise PipelineError(f"the Precompiled normalizer's charsmap is unreadable: {e}") from None
    if kind == "Replace":
        pattern, content = spec.get("pattern") or {}, spec.get("content", "")
        if "Regex" in pattern:
            compiled = regex.compile(pattern["Regex"])
            return lambda text: compiled.sub(lambda m: content, text)
        if "String" in pattern:
            s = pattern["String"]
            return (lambda text: text.replace(s, content)) if s else None
        raise PipelineError(f"a Replace normalizer with pattern {pattern!r}")
    if kind == "Strip":
        left, right = spec.get("strip_left", True), spec.get("strip_right", True)
        return lambda text: _strip(text, left, right)
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return lambda text: unicodedata.normalize(kind, text)
    if kind == "Lowercase":
        return str.lower
    if kind == "Prepend":
        prefix = spec.get("prepend", "")
        return lambda text: prefix + text if text else text
    raise PipelineError(f"the {kind!r} normalizer")


def _chain(steps, text):
    for step in steps:
        text = step(text)
    return text


def _strip(text, left, right):
    if left:
        m = WHITESPACE.match(text)
        text = text[m.end():] if m else text
    if right:
        m = re.search(f"(?:{WHITESPACE.pattern})$", text)
        text = text[:m.start()] if m else text
    return text


# ---------------------------------------------------------------------- pre-tokenizers


def _pre_tokenizer(spec):
    """A ``[(offset, str)] -> [(offset, str)]`` for a ``pre_tokenizer`` object."""
    if spec is None:
        return None
    kind = spec.get("type")
    if kind == "Sequence":
        steps = [f for f in map(_pre_tokenizer, spec.get("pretokenizers") or []) if f is not None]
        return lambda splits: _chain(steps, splits)
    if kind == "WhitespaceSplit":
        return _whitespace_split
    if kind == "Metaspace":
        replacement = spec.get("replacement", SPACE)
        if "prepend_scheme" in spec:
            scheme = spec["prepend_scheme"]
        else:
            scheme = "always" if spec.get("add_prefix_space", True) else "never"
        if scheme not in ("always", "first", "never"):
            raise PipelineError(f"Metaspace prepend_scheme {scheme!r}")
        return Metaspace(replacement, scheme, spec.get("split", True))
    raise PipelineError(f"the {kind!r} pre-tokenizer")


def _whitespace_split(splits):
    out = []
    for offset, text in splits:
        for m in re.finditer(f"(?:(?!{WHITESPACE.pattern}).)+", text, re.S):
            out.append((offset + m.start(), m.group()))
    return out


class Metaspace:
    def __init__(self, replacement: str, scheme: str, split: bool):
        self.replacement, self.scheme, self.split = replacement, scheme, bool(split)

    def __call__(self, splits):
        out = []
        for offset, text in splits:
            text = text.replace(" ", self.replacement)
            if self.scheme == "always" or (self.scheme == "first" and offset == 0):
                if not text.startswith(self.replacement):
                    text = self.replacement + text
            if not self.split:
                out.append((offset, text))
                continue
            starts = [m.start() for m in re.finditer(re.escape(self.replacement), text)]
            cuts = [0] + [s for s in starts if s > 0] + [len(text)]
            out.extend((offset + a, text[a:b]) for a, b in zip(cuts, cuts[1:]) if b > a)
        return out


class Pipeline:
    """What a tokenizer.json does to a text before its model: ``words(text)`` is the
    list of strings the Unigram model segments, one Viterbi each."""

    def __init__(self, normalizer_spec, pre_tokenizer_spec):
        self.normalizer_spec, self.pre_tokenizer_spec = normalizer_spec, pre_tokenizer_spec
        self.normalize = _normalizer(normalizer_spec)
        self.pre_tokenize = _pre_tokenizer(pre_tokenizer_spec)
        self.prefix = _prefix_of(pre_tokenizer_spec)

    def words(self, text: str) -> list:
        if self.normalize is not None:
            text = self.normalize(text)
        if not text:
            return []
        if self.pre_tokenize is None:
            return [text]
        return [w for _, w in self.pre_tokenize([(0, text)]) if w]

    def charsmap_blob(self) -> bytes:
        """The first ``Precompiled`` charsmap of the normalizer (b"" if none)."""
        return _find_charsmap(self.normalizer_spec)


def _prefix_of(spec) -> bool:
    """Whether the pre-tokenizer puts a ``▁`` in front (so decoding drops one space)."""
    if not spec:
        return False
    if spec.get("type") == "Sequence":
        return any(_prefix_of(s) for s in spec.get("pretokenizers") or [])
    if spec.get("type") == "Metaspace":
        scheme = spec.get("prepend_scheme", "always" if spec.get("add_prefix_space", True) else "never")
        return scheme != "never"
    return False


def _find_charsmap(spec) -> bytes:
    if not spec:
        return b""
    if spec.get("type") == "Precompiled":
        return base64.b64decode(spec.get("precompiled_charsmap") or "")
    for sub in spec.get("normalizers") or []:
        blob = _find_charsmap(sub)
        if blob:
            return blob
    return b""


def spm_pipeline_specs(charsmap_blob: bytes, *, add_dummy_prefix=True, remove_extra_whitespaces=True):
    """The normalizer and pre-tokenizer objects transformers' ``SpmConverter`` writes
    for a SentencePiece model: the charsmap, then (with ``remove_extra_whitespaces``)
    runs of spaces collapsed and spaces stripped, then ``Metaspace``."""
    steps = []
    if charsmap_blob:
        steps.append({"type": "Precompiled",
                      "precompiled_charsmap": base64.b64encode(charsmap_blob).decode("ascii")})
    if remove_extra_whitespaces:
        steps += [{"type": "Strip", "strip_left": True, "strip_right": True},
                  {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]
    normalizer = {"type": "Sequence", "normalizers": steps} if steps else None
    pre = {"type": "Metaspace", "replacement": SPACE,
           "prepend_scheme": "always" if add_dummy_prefix else "never", "split": True}
    return normalizer, pre

"""SentencePiece's normaliser (``normalizer.cc``), exactly: the charsmap rules, the
user-defined symbols, and the whitespace rules.

1. Rules. At each position, in order: the longest user-defined symbol that starts
   there is copied as is; else the longest charsmap key that starts there is replaced
   by its normalized string; else one character is copied.
2. Whitespace (``remove_extra_whitespaces``, default on): leading and trailing spaces
   go, and a piece (what one step of 1 produced) loses its leading spaces when the
   output so far ends with a space, so runs of spaces become one.
3. Spaces become ``▁`` (``escape_whitespaces``), and a ``▁`` is put in front
   (``add_dummy_prefix``; behind with ``treat_whitespace_as_suffix``).

    >>> from tinylm_unigram.charsmap import Charsmap
    >>> SpmNormalizer(Charsmap(b"")).normalize("  Hello   world ")
    '▁Hello▁world'

Speed: rules for single characters go through ``str.translate`` (C speed). Keys of
several characters (a letter and combining marks, Hangul jamo ...) can only match
where the text has one of the characters that continue such a key
(``Charsmap.continuations``); only there does a Python loop walk the trie. Step 2 is
a regex over the translated text; it equals the piece-by-piece rule as long as no
normalized string holds two spaces in a row (true of SentencePiece's built-in
rules; checked when loading, else the piece-by-piece rule runs).
"""

from __future__ import annotations

import re

import numpy as np

from tinylm_unigram.charsmap import Charsmap

SPACE = "\u2581"
_RUNS = re.compile(" {2,}")


class SpmNormalizer:
    """``charsmap``: a ``Charsmap`` (empty for the identity rule); ``user_defined``: the
    user-defined symbols (matched before the rules, never normalised)."""

    def __init__(self, charsmap: Charsmap, *, add_dummy_prefix=True, remove_extra_whitespaces=True,
                 escape_whitespaces=True, treat_whitespace_as_suffix=False, user_defined=()):
        self.charsmap = charsmap
        self.add_dummy_prefix = bool(add_dummy_prefix)
        self.remove_extra_whitespaces = bool(remove_extra_whitespaces)
        self.escape_whitespaces = bool(escape_whitespaces)
        self.treat_whitespace_as_suffix = bool(treat_whitespace_as_suffix)
        self.user_defined = tuple(sorted({s for s in user_defined if s}, key=lambda s: (-len(s), s)))
        self._table = dict(charsmap.singles)
        self._continuations = frozenset(charsmap.continuations)
        self._user = (re.compile("|".join(map(re.escape, self.user_defined)))
                      if self.user_defined else None)
        parts = [re.escape(s) for s in self.user_defined]
        if self._continuations:
            cls = "".join(sorted(map(re.escape, self._continuations)))
            parts += [f".(?=[{cls}])", f"[{cls}]"]
        self._trigger = re.compile("|".join(parts), re.S) if parts else None
        values = list(self._table.values())
        self._collapse_ok = not any("  " in v for v in values)
        self.space = SPACE if self.escape_whitespaces else " "
        self._used = None  # the characters the rules read or write (made on first use)

    # ------------------------------------------------------------------ step 1

    def pieces(self, text: str) -> list:
        """``text`` cut for the rules, as ``(text, kind)`` pairs in order: kind "run"
        is a stretch of the input where only single-character rules apply (not yet
        applied), "piece" one rule's or one user-defined symbol's output (the units
        the whitespace rule works on)."""
        out, pos, n = [], 0, len(text)
        trigger = self._trigger
        while pos < n:
            m = trigger.search(text, pos) if trigger is not None else None
            stop = n if m is None else m.start()
            if stop > pos:
                out.append((text[pos:stop], "run"))
            if m is None:
                break
            pos = self._walk(text, stop, out)
        return out

    def _walk(self, text: str, pos: int, out: list) -> int:
        """Apply the rules one step at a time from ``pos`` while a user-defined symbol
        or a key of several characters may start; returns where it stopped."""
        n, cont = len(text), self._continuations
        while pos < n:
            m = self._user.match(text, pos) if self._user is not None else None
            if m is not None:
                out.append((m.group(), "piece"))
                pos = m.end()
                continue
            if not (text[pos] in cont or (pos + 1 < n and text[pos + 1] in cont)):
                break
            chunk = text[pos:pos + 16]
            data = chunk.encode("utf-8")
            best = None
            for length, value in self.charsmap.prefix_matches(data):
                best = (length, value)
            if best is None:
                out.append((self._table.get(ord(text[pos]), text[pos]), "piece"))
                pos += 1
            else:
                out.append((best[1], "piece"))
                pos += len(data[:best[0]].decode("utf-8"))
        return pos

    # ------------------------------------------------------------------ steps 2 and 3

    def normalize(self, text: str) -> str:
        """The normalized text the model segments (``▁`` for spaces)."""
        if not text:
            return ""
        pieces = self.pieces(text)
        if self.remove_extra_whitespaces:
            parts, prev_space = [], True  # the start counts as a space
            for piece, kind in pieces:
                if kind == "run" and self._collapse_ok:
                    piece = _RUNS.sub(" ", piece.translate(self._table))
                    if prev_space:
                        piece = piece.lstrip(" ")
                elif kind == "run":
                    piece = self._piecewise(piece, prev_space)
                elif prev_space:
                    piece = piece.lstrip(" ")
                if piece:
                    parts.append(piece)
                    prev_space = piece.endswith(" ")
            body = "".join(parts)
            if not body:
                return ""
        else:
            body = "".join(p.translate(self._table) if k == "run" else p for p, k in pieces)
        if self.escape_whitespaces:
            body = body.replace(" ", SPACE)
        if self.add_dummy_prefix and not self.treat_whitespace_as_suffix:
            body = self.space + body
        if self.remove_extra_whitespaces:
            body = body.rstrip(self.space)
        if self.add_dummy_prefix and self.treat_whitespace_as_suffix:
            body += self.space
        return body

    def normalize_lines(self, lines: list) -> list:
        """``[self.normalize(line) for line in lines]`` (lines without a newline),
        batched: the lines where no user-defined symbol and no key of several
        characters can start are translated and their spaces collapsed as one string."""
        if not (self.remove_extra_whitespaces and self._collapse_ok
                and not self.treat_whitespace_as_suffix):
            return [self.normalize(t) for t in lines]
        out = [None] * len(lines)
        fast = range(len(lines))
        if self._trigger is not None:  # the lines where a rule of several characters may apply
            sep = self._separator("".join(lines))
            starts = np.cumsum([0] + [len(t) + 1 for t in lines])
            hits = [m.start() for m in self._trigger.finditer(sep.join(lines))]
            slow = set(np.searchsorted(starts, hits, side="right").tolist())
            for k in slow:
                out[k - 1] = self.normalize(lines[k - 1])
            fast = [k for k in fast if k + 1 not in slow]
        sep = self._separator("".join(lines[k] for k in fast))
        text = _RUNS.sub(" ", self._translate(sep.join(lines[k] for k in fast)))
        text = re.sub(f"(^|{sep}) +", r"\1", text)  # each line's leading spaces
        if self.escape_whitespaces:
            text = text.replace(" ", SPACE)
        prefix, space = (self.space if self.add_dummy_prefix else ""), self.space
        for k, body in zip(fast, text.split(sep)):
            out[k] = (prefix + body).rstrip(space) if body else ""
        return out

    def _translate(self, text: str) -> str:
        """``text.translate(self._table)``, by a regex over just the characters of
        ``text`` that some rule changes (few, in most text: a long scan in C)."""
        table = self._table
        changed = sorted(c for c in set(text) if table.get(ord(c), c) != c)
        if not changed:
            return text
        if len(changed) > 200:
            return text.translate(table)
        cls = re.compile("[" + "".join(map(re.escape, changed)) + "]")
        return cls.sub(lambda m: table[ord(m.group())], text)

    def _separator(self, text: str) -> str:
        """A character in neither ``text`` nor any rule (to join lines with)."""
        if self._used is None:
            self._used = set(map(chr, self._table)) | {c for v in self._table.values() for c in v}
        for code in range(0xE000, 0xF900):
            c = chr(code)
            if c not in self._used and c not in text:
                return c
        raise ValueError("no free character to join lines with")

    def _piecewise(self, run: str, prev_space: bool) -> str:
        """The whitespace rule applied character by character to a "run" (for rules
        whose normalized strings hold double spaces)."""
        out = []
        for ch in run:  # each character's rule output is one piece
            piece = self._table.get(ord(ch), ch)
            if prev_space:
                piece = piece.lstrip(" ")
            if piece:
                out.append(piece)
                prev_space = piece.endswith(" ")
        return "".join(out)

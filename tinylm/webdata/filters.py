"""Cleaning filters: C4's heuristics and Gopher's quality rules, each a small step
``lines -> lines | None`` (None: drop the page), composed by name into a ``Pipeline``
that counts what each step removed (documents, lines, characters).

    config = CleanConfig(min_words_per_line=3, min_sentences=5, bad_words="words.txt")
    pipeline = build_pipeline(config)
    kept = pipeline.run([doc_lines_1, doc_lines_2, ...])   # a list of lists of lines
    pipeline.removed["c4_javascript"]                      # Removed(documents, lines, chars)

A page is its text's lines, each stripped, empty ones left out (``page_lines``); the
output joins the kept lines with "\\n". Characters are counted on the stripped lines.
A step that leaves a page with no lines removes the page.

C4 (Raffel et al. 2020, "Exploring the limits of transfer learning ...", section 2.2),
in the order TFDS's ``c4_utils.clean_page`` (which built the released C4) applies them:

- ``c4_citations``: Wikipedia-style markers ``[1]``, ``[edit]``, ``[citation needed]``
  are removed from lines (TFDS's regex);
- ``c4_terminal_punct``: keep lines ending in . ? ! or " (TFDS's ``_END_MARKS``; the
  paper: "a terminal punctuation mark"), and not in "..." (TFDS);
- ``c4_min_words``: drop lines with fewer than ``min_words_per_line`` words. Default 3,
  as the paper's text and the issue say; TFDS uses ``_MIN_WORDS_PER_LINE = 5``;
- ``c4_lorem_ipsum``: drop a page with "lorem ipsum" (any case);
- ``c4_javascript``: drop lines with the word "javascript" (any case);
- ``c4_curly_bracket``: drop a page with a "{" (TFDS checks "{" only, as here);
- ``c4_policy``: drop lines with "terms of use", "privacy policy", "cookie policy",
  "uses cookies", "use of cookies", "use cookies" (paper and TFDS);
- ``c4_bad_words``: drop a page with a word or phrase of a word-list file (C4 used the
  "List of Dirty, Naughty, Obscene or Otherwise Bad Words"), matched lowercased, not
  inside a longer run of letters. TFDS's regex ``[^a-z](word)[^a-z]`` needs a character
  on both sides and so misses a word at the very start or end of a line; this does not;
- ``c4_min_sentences``: drop a page with fewer than ``min_sentences`` sentences. Default
  5, as the paper and the issue; TFDS uses ``_MIN_NUM_SENTENCES = 3``. Sentences come
  from ``split_sentences`` (a regex; TFDS used NLTK's punkt, so "Mr. Smith" is one
  sentence there and two here);
- ``c4_span_dedup``: every three-sentence span seen earlier in the corpus is removed
  (see ``SpanDedup``), then the page is checked against ``min_sentences`` again (TFDS).
  The paper: "we discarded all but one of any three-sentence span occurring more than
  once in the data set". TFDS keeps, per span, the page whose URL has the smallest MD5
  (a global group-by); here the first occurrence in reading order is kept (streaming).

Not done here: C4's langdetect step (see ``langid``: a plugin point), TFDS's URL
deduplication and its 1.9e5-character page limit.

Gopher (Rae et al. 2021, "Scaling language models: methods, analysis & insights from
training Gopher", appendix A.1.1, quality filters and table A1's repetition rules;
RefinedWeb, Penedo et al. 2023, appendix G.1, applies the same), on the whole page,
words being whitespace-separated:

- ``gopher_word_count``: 50 to 100,000 words;
- ``gopher_mean_word_length``: mean word length 3 to 10 characters;
- ``gopher_symbol_ratio``: "#" per word and "..."/"…" per word both at most 0.1;
- ``gopher_bullet_lines``: at most 90% of lines start with a bullet (• ● ◦ ▪ ‣ · - * – —);
- ``gopher_ellipsis_lines``: at most 30% of lines end with "..." or "…";
- ``gopher_alpha_words``: at least 80% of words contain an alphabetic character;
- ``gopher_stop_words``: at least 2 of: the, be, to, of, and, that, have, with (distinct
  words, lowercased, with punctuation but no letter, digit, apostrophe or hyphen next
  to them);
- ``gopher_repetition``: at most 30% of lines are repeats of an earlier line, holding at
  most 20% of the characters (table A1's line rules; its paragraph and n-gram rules are
  not done).

And ``language``: keep a page whose language-ID label (``langid``) is ``language`` with a
score of at least ``min_language_score``; only when ``language`` is set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

import numpy as np

from tinylm.webdata.hashing import text_hash64
from tinylm.webdata.hashset import HashSet64
from tinylm.webdata.langid import get_language_id
from tinylm.webdata.readers import WebDataError

C4_FILTERS = ("c4_citations", "c4_terminal_punct", "c4_min_words", "c4_lorem_ipsum",
              "c4_javascript", "c4_curly_bracket", "c4_policy", "c4_bad_words",
              "c4_min_sentences")
GOPHER_FILTERS = ("gopher_word_count", "gopher_mean_word_length", "gopher_symbol_ratio",
                  "gopher_bullet_lines", "gopher_ellipsis_lines", "gopher_alpha_words",
                  "gopher_stop_words", "gopher_repetition")
GROUPS = {"c4": C4_FILTERS, "gopher": GOPHER_FILTERS}
# language ID first (cheap, and it spares the rest); Gopher's rules read the raw page,
# C4's line rules then clean it; span deduplication last, on what is kept
DEFAULT_FILTERS = ("language",) + GOPHER_FILTERS + C4_FILTERS + ("c4_span_dedup",)
POLICY_SUBSTRINGS = ("terms of use", "privacy policy", "cookie policy", "uses cookies",
                     "use of cookies", "use cookies")
STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
BULLETS = ("•", "●", "◦", "▪", "‣", "·", "-", "*", "–", "—")
_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")
_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)\]]*(?=\s|$)")
_WORD_CHAR = re.compile(r"\w")
_ALPHA_WORD = re.compile(r"\S*[^\W\d_]\S*")
# a stop word as a whole word, punctuation around it allowed ("the," "(with")
_STOP_WORD = re.compile(r"(?<![\w'’-])(" + "|".join(STOP_WORDS) + r")(?![\w'’-])")


@dataclass
class CleanConfig:
    """The filters (names or groups "c4", "gopher", in order) and their thresholds."""

    filters: tuple = DEFAULT_FILTERS
    min_words_per_line: int = 3
    min_sentences: int = 5
    end_marks: tuple = (".", "?", "!", '"')
    policy_substrings: tuple = POLICY_SUBSTRINGS
    bad_words: str | None = None  # a word-list file, one word or phrase a line
    span_size: int = 3
    gopher_min_words: int = 50
    gopher_max_words: int = 100_000
    gopher_min_mean_word_length: float = 3.0
    gopher_max_mean_word_length: float = 10.0
    gopher_max_symbol_ratio: float = 0.1
    gopher_max_bullet_lines: float = 0.9
    gopher_max_ellipsis_lines: float = 0.3
    gopher_min_alpha_words: float = 0.8
    gopher_min_stop_words: int = 2
    gopher_max_duplicate_lines: float = 0.3
    gopher_max_duplicate_line_chars: float = 0.2
    language: str | None = None
    language_id: str = "script"
    min_language_score: float = 0.5

    @classmethod
    def from_dict(cls, values: dict) -> "CleanConfig":
        """From JSON-like values; unknown keys are an error naming the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise WebDataError(f"unknown clean option(s) {', '.join(unknown)}; known: "
                               f"{', '.join(sorted(known))}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**values)

    def names(self) -> list:
        """The filter names, groups expanded; "c4_bad_words" only with a word list and
        "language" only with a language (both are in the defaults)."""
        names = []
        for name in self.filters:
            for item in GROUPS.get(name, (name,)):
                if item == "c4_bad_words" and not self.bad_words:
                    continue
                if item == "language" and not self.language:
                    continue
                if item not in names:
                    names.append(item)
        return names


@dataclass
class Removed:
    """What one step removed: whole documents, lines (those of removed documents too)
    and characters (of the stripped lines)."""

    documents: int = 0
    lines: int = 0
    chars: int = 0

    def add(self, other: "Removed") -> None:
        self.documents += other.documents
        self.lines += other.lines
        self.chars += other.chars


def page_lines(text: str) -> list:
    """The page's lines, stripped, empty ones left out."""
    return [line for line in (raw.strip() for raw in text.splitlines()) if line]


def split_sentences(line: str) -> list:
    """The sentences of one line: pieces ending in . ! ? … (runs of them), optionally
    followed by closing quotes or brackets, then whitespace or the line's end; the
    rest of the line after the last end is a sentence too."""
    pieces, start = [], 0
    for match in _SENTENCE_END.finditer(line):
        piece = line[start:match.end()].strip()
        if piece:
            pieces.append(piece)
        start = match.end()
    rest = line[start:].strip()
    if rest:
        pieces.append(rest)
    return pieces


def count_sentences(lines) -> int:
    """Sentences with a letter or digit in them (a lone "!" is not one)."""
    return sum(1 for line in lines for s in split_sentences(line) if _WORD_CHAR.search(s))


def _chars(lines) -> int:
    return sum(map(len, lines))


# ----------------------------------------------------------------------------- steps


@dataclass
class LineStep:
    """Keep the lines for which ``keep(line)`` is true."""

    name: str
    keep: object

    def __call__(self, lines):
        kept = [line for line in lines if self.keep(line)]
        return lines if len(kept) == len(lines) else kept


@dataclass
class PageStep:
    """Drop the page when ``reject(lines)`` is true."""

    name: str
    reject: object

    def __call__(self, lines):
        return None if self.reject(lines) else lines


@dataclass
class EditStep:
    """Rewrite every line with ``edit(line)``; lines that become empty go."""

    name: str
    edit: object

    def __call__(self, lines):
        new = [e for e in (self.edit(line).strip() for line in lines) if e]
        return lines if new == lines else new


def _bad_words_regex(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            words = [w.strip().lower() for w in f if w.strip() and not w.startswith("#")]
    except (OSError, UnicodeDecodeError) as e:
        raise WebDataError(f"cannot read the word list {path}: {e}; give a UTF-8 file, "
                           f"one word or phrase a line") from None
    if not words:
        raise WebDataError(f"the word list {path} is empty; give one word or phrase a line")
    words.sort(key=len, reverse=True)
    return re.compile(r"(?<![a-z])(?:" + "|".join(map(re.escape, words)) + r")(?![a-z])")


def _c4_steps(c: CleanConfig) -> dict:
    marks = tuple(c.end_marks)
    policy = tuple(c.policy_substrings)
    steps = {
        "c4_citations": EditStep("c4_citations", lambda line: _CITATION.sub("", line)),
        "c4_terminal_punct": LineStep("c4_terminal_punct", lambda line: line.endswith(marks)
                                      and not line.endswith("...")),
        "c4_min_words": LineStep("c4_min_words",
                                 lambda line: len(line.split()) >= c.min_words_per_line),
        "c4_lorem_ipsum": PageStep("c4_lorem_ipsum",
                                   lambda lines: any("lorem ipsum" in x.lower() for x in lines)),
        "c4_javascript": LineStep("c4_javascript", lambda line: "javascript" not in line.lower()),
        "c4_curly_bracket": PageStep("c4_curly_bracket", lambda lines: any("{" in x for x in lines)),
        "c4_policy": LineStep("c4_policy", lambda line: not any(p in line.lower() for p in policy)),
        "c4_min_sentences": PageStep("c4_min_sentences",
                                     lambda lines: count_sentences(lines) < c.min_sentences),
    }
    if c.bad_words:
        regex = _bad_words_regex(c.bad_words)
        steps["c4_bad_words"] = PageStep(
            "c4_bad_words", lambda lines: any(regex.search(x.lower()) for x in lines))
    return steps


class _LastPage:
    """The page the Gopher rules last looked at, its joined text and words: the eight
    rules read the same page one after another, so it is split once, not eight times."""

    lines, text, words = None, "", []


def _page(lines) -> tuple:
    if _LastPage.lines is not lines:  # identity: held here, so never a reused id
        _LastPage.lines, _LastPage.text = lines, "\n".join(lines)
        _LastPage.words = _LastPage.text.split()
    return _LastPage.text, _LastPage.words


def _words(lines) -> list:
    return _page(lines)[1]


def _fraction(count: int, total: int) -> float:
    return count / total if total else 0.0


def _gopher_word_count(c):
    return lambda lines: not c.gopher_min_words <= len(_words(lines)) <= c.gopher_max_words


def _gopher_mean_length(c):
    def reject(lines):
        words = _words(lines)
        mean = _fraction(sum(map(len, words)), len(words))
        return not c.gopher_min_mean_word_length <= mean <= c.gopher_max_mean_word_length
    return reject


def _gopher_symbols(c):
    def reject(lines):
        text, words = _page(lines)
        words = len(words)
        ellipses = text.count("...") + text.count("…")
        return max(_fraction(text.count("#"), words),
                   _fraction(ellipses, words)) > c.gopher_max_symbol_ratio
    return reject


def _gopher_alpha(c):
    def reject(lines):
        text, words = _page(lines)
        alpha = len(_ALPHA_WORD.findall(text))  # whitespace-separated words with a letter
        return _fraction(alpha, len(words)) < c.gopher_min_alpha_words
    return reject


def _gopher_stop_words(c):
    def reject(lines):
        present = set(_STOP_WORD.findall(_page(lines)[0].lower()))
        return len(present) < c.gopher_min_stop_words
    return reject


def _gopher_repetition(c):
    def reject(lines):
        seen, repeats, repeat_chars = set(), 0, 0
        for line in lines:
            if line in seen:
                repeats += 1
                repeat_chars += len(line)
            seen.add(line)
        return (_fraction(repeats, len(lines)) > c.gopher_max_duplicate_lines
                or _fraction(repeat_chars, _chars(lines)) > c.gopher_max_duplicate_line_chars)
    return reject


def _gopher_steps(c: CleanConfig) -> dict:
    def share(test):
        return lambda lines: _fraction(sum(1 for x in lines if test(x)), len(lines))

    bullets, ellipses = share(lambda x: x.startswith(BULLETS)), share(
        lambda x: x.endswith(("...", "…")))
    rules = {
        "gopher_word_count": _gopher_word_count(c),
        "gopher_mean_word_length": _gopher_mean_length(c),
        "gopher_symbol_ratio": _gopher_symbols(c),
        "gopher_bullet_lines": lambda lines: bullets(lines) > c.gopher_max_bullet_lines,
        "gopher_ellipsis_lines": lambda lines: ellipses(lines) > c.gopher_max_ellipsis_lines,
        "gopher_alpha_words": _gopher_alpha(c),
        "gopher_stop_words": _gopher_stop_words(c),
        "gopher_repetition": _gopher_repetition(c),
    }
    return {name: PageStep(name, reject) for name, reject in rules.items()}


def _language_step(c: CleanConfig) -> PageStep:
    identify = get_language_id(c.language_id)

    def reject(lines):
        label, score = identify("\n".join(lines))
        return label != c.language or score < c.min_language_score
    return PageStep("language", reject)


# ------------------------------------------------------------------ span dedup


class SpanDedup:
    """C4's three-sentence-span deduplication, streamed over the corpus in order.

    Each line's sentences (lowercased) are cut into windows of ``size`` consecutive
    sentences (a line with fewer is one window; windows of lone end marks are left out,
    as TFDS does); each window's BLAKE2b-64 goes into ``seen``, a ``HashSet64``. A window
    whose hash was seen before (earlier in the corpus or earlier in the page) loses its
    sentences from the page; the rest of the line is rejoined with spaces. Memory: the
    set, 16-32 bytes per distinct span. ``batch`` is that, in memory; ``clean_corpus``
    instead writes the hashes to disk and finds the repeats there in bounded memory
    (``external.first_occurrences``), then calls ``remove`` with them."""

    name = "c4_span_dedup"

    def __init__(self, size: int = 3, min_sentences: int = 1):
        self.size, self.min_sentences = size, max(1, min_sentences)
        self.seen = HashSet64(1 << 16)

    def _windows(self, lines):
        """[(line index, first sentence, last sentence + 1, hash)], and the sentences."""
        windows, sentences = [], []
        for i, line in enumerate(lines):
            parts = split_sentences(line)
            sentences.append(parts)
            lower = [p.lower() for p in parts]
            width = min(self.size, len(parts))
            for s in range(len(parts) - width + 1):
                window = lower[s:s + width]
                if all(_WORD_CHAR.search(w) is None for w in window):
                    continue
                windows.append((i, s, s + width, text_hash64("\x1f".join(window))))
        return windows, sentences

    def window_hashes(self, found) -> np.ndarray:
        """The hashes of ``_windows`` results (one per page), in order, (m,) uint64."""
        return np.array([w[3] for windows, _ in found for w in windows], dtype=np.uint64)

    def batch(self, pages: list) -> list:
        """The pages (lists of lines) with repeated spans removed; None for a page left
        with fewer than ``min_sentences`` sentences (or none)."""
        found = [self._windows(lines) for lines in pages]
        repeat = self.seen.add_first(self.window_hashes(found))
        out, at = [], 0
        for item, lines in zip(found, pages):
            flags, at = repeat[at:at + len(item[0])], at + len(item[0])
            out.append(self.remove(lines, flags, item))
        return out

    def remove(self, lines, flags: np.ndarray, found=None):
        """One page without the sentences of its windows flagged as repeats: its lines,
        or None when fewer than ``min_sentences`` sentences are left. ``found``: the
        page's ``_windows`` (made again when not given; only needed when a flag is set)."""
        if not flags.any():
            return lines
        windows, sentences = found if found is not None else self._windows(lines)
        drop = [set() for _ in lines]
        for (i, s, e, _), flag in zip(windows, flags):
            if flag:
                drop[i].update(range(s, e))
        new = [" ".join(p for j, p in enumerate(parts) if j not in gone) if gone else line
               for line, parts, gone in zip(lines, sentences, drop)]
        new = [line for line in new if line]
        return new if count_sentences(new) >= self.min_sentences else None


# --------------------------------------------------------------------- pipeline


@dataclass
class Pipeline:
    """Steps applied in order, page by page; the span step (if any) last, in batches.
    ``removed`` maps each step's name to what it removed."""

    steps: list
    span: SpanDedup | None = None
    removed: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in [s.name for s in self.steps] + ([self.span.name] if self.span else []):
            self.removed.setdefault(name, Removed())

    def reset_counts(self) -> None:
        """Every step's ``removed`` back to zero."""
        self.removed = {}
        self.__post_init__()

    def _count(self, name: str, before, after) -> None:
        r = self.removed[name]
        if not after:  # dropped, or left with no lines
            r.documents += 1
            r.lines += len(before)
            r.chars += _chars(before)
        else:
            r.lines += len(before) - len(after)
            r.chars += _chars(before) - _chars(after)

    def page(self, lines):
        """One page through the per-page steps: its lines, or None."""
        for step in self.steps:
            out = step(lines)
            if out is lines:
                continue
            self._count(step.name, lines, out)
            if not out:
                return None
            lines = out
        return lines

    def run(self, pages: list) -> list:
        """A batch of pages (lists of lines) through every step: lines or None each."""
        kept = [self.page(lines) for lines in pages]
        if self.span is None:
            return kept
        alive = [i for i, lines in enumerate(kept) if lines]
        for i, out in zip(alive, self.span.batch([kept[i] for i in alive])):
            if out is not kept[i]:
                self._count(self.span.name, kept[i], out)
            kept[i] = out
        return kept


def build_pipeline(config: CleanConfig) -> Pipeline:
    """The ``Pipeline`` of ``config.names()``, in that order (span dedup always last)."""
    available = {**_c4_steps(config), **_gopher_steps(config)}
    names = config.names()
    if "language" in names:
        available["language"] = _language_step(config)
    known = set(available) | {"c4_span_dedup", "c4_bad_words", "language"}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise WebDataError(f"unknown filter(s) {', '.join(unknown)}; known: c4, gopher, "
                           f"language, c4_span_dedup, {', '.join(C4_FILTERS + GOPHER_FILTERS)}")
    span = None
    if "c4_span_dedup" in names:
        min_sentences = config.min_sentences if "c4_min_sentences" in names else 1
        span = SpanDedup(config.span_size, min_sentences)
    return Pipeline([available[n] for n in names if n != "c4_span_dedup"], span)

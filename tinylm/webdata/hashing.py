"""Stable 64-bit hashes of text pieces, vectorised in NumPy: the same text gives the same
hash in every process and run (Python's ``hash`` of a str is salted per process), so
hashes saved by one run mean the same in the next.

    normalize("Ｔhe  Cat\\n sat")               # 'the cat sat'  (NFKC, lower, spaces)
    text_hash64("the cat sat")                  # one uint64 (BLAKE2b, 8 bytes)
    word_shingles("the cat sat on the mat", 3)  # (4,) uint64: one hash per 3-word window
    char_shingles("abcdef", 5)                  # (2,) uint64

Shingle hashes come from a polynomial rolling hash over the text's code points,
``h(s..e) = sum_j c_j B^(j-s)`` mod 2^64 (prefix sums of ``c_j B^j`` times ``B^-s``; B odd,
so invertible mod 2^64), for every window at once, then SplitMix64's finaliser to
spread the bits. A word n-gram's hash mixes its n word hashes with distinct odd
multipliers. All arithmetic is uint64 and wraps, as modular arithmetic should.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

import numpy as np

_SPACE = re.compile(r"\s+")
BASE = np.uint64(0x100000001B3)  # odd: invertible mod 2^64
BASE_INV = np.uint64(pow(int(BASE), -1, 1 << 64))
NGRAM_MULTIPLIERS = np.array([0x9E3779B97F4A7C15 | 1, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                              0xD6E8FEB86659FD93, 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53,
                              0x2545F4914F6CDD1D, 0x9FB21C651E98DF25], dtype=np.uint64)
# str.split()'s whitespace, as code points (what separates words)
WHITESPACE = np.array([9, 10, 11, 12, 13, 28, 29, 30, 31, 32, 0x85, 0xA0, 0x1680,
                       *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F, 0x3000],
                      dtype=np.uint32)


def normalize(text: str) -> str:
    """NFKC, lowercased, whitespace runs -> one space, stripped: what "the same text"
    means for exact deduplication and shingling."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def text_hash64(text: str) -> int:
    """BLAKE2b-64 of the UTF-8 text (lone surrogates passed through): a stable int."""
    data = text.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, elementwise on uint64 (a bijection that spreads bits)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def codepoints(text: str) -> np.ndarray:
    """The text's code points, (len(text),) uint32."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


def segment_hashes(codes: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The hash of each segment ``codes[s:e]``, (len(starts),) uint64, from one pass of
    prefix sums; the segment's length is mixed in."""
    n = len(codes)
    powers = np.full(n, BASE, dtype=np.uint64)
    powers[0] = 1
    inverse = np.full(n + 1, BASE_INV, dtype=np.uint64)
    inverse[0] = 1
    with np.errstate(over="ignore"):
        powers = np.cumprod(powers)  # B^j
        inverse = np.cumprod(inverse)  # B^-j
        prefix = np.zeros(n + 1, dtype=np.uint64)
        np.cumsum(codes.astype(np.uint64) * powers, out=prefix[1:])
        h = (prefix[ends] - prefix[starts]) * inverse[starts]
        length = (ends - starts).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return mix64(h ^ length)


def word_spans(codes: np.ndarray) -> tuple:
    """(starts, ends) of the whitespace-separated words, as ``str.split()`` finds them."""
    space = np.isin(codes, WHITESPACE)
    edges = np.diff(np.concatenate(([True], space, [True])).astype(np.int8))
    return np.flatnonzero(edges == -1), np.flatnonzero(edges == 1)


def combine(hashes: np.ndarray, n: int) -> np.ndarray:
    """The hash of every run of ``n`` consecutive ``hashes`` (len - n + 1,), uint64."""
    if n > len(NGRAM_MULTIPLIERS):
        raise ValueError(f"at most {len(NGRAM_MULTIPLIERS)} items per n-gram, not {n}")
    m = len(hashes) - n + 1
    out = np.zeros(max(m, 0), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for t in range(n):  # n is small (a shingle's words); vectorised over all windows
            out += hashes[t:t + m] * NGRAM_MULTIPLIERS[t]
    return mix64(out)


def word_shingles(text: str, size: int) -> np.ndarray:
    """Hashes of the ``size``-word windows of ``text`` (already normalised), (m,) uint64;
    a text of 1 to size-1 words is one shingle of all its words; no words: empty."""
    codes = codepoints(text)
    starts, ends = word_spans(codes)
    if len(starts) == 0:
        return np.zeros(0, dtype=np.uint64)
    words = segment_hashes(codes, starts, ends)
    return combine(words, min(size, len(words)))


def char_shingles(text: str, size: int) -> np.ndarray:
    """Hashes of the ``size``-character windows of ``text``, (m,) uint64; a shorter
    non-empty text is one shingle."""
    codes = codepoints(text)
    if len(codes) == 0:
        return np.zeros(0, dtype=np.uint64)
    width = min(size, len(codes))
    starts = np.arange(len(codes) - width + 1)
    return segment_hashes(codes, starts, starts + width)

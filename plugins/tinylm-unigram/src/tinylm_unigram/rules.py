"""Normalisation rules for training, stored in the trained model as a
``precompiled_charsmap`` (so encoding applies exactly these rules, and SentencePiece
reading the saved ``.model`` does too).

- "nmt_nfkc" (the default, as SentencePiece's): per character, Unicode NFKC (Python's
  ``unicodedata``, Unicode 14 on Python 3.11) plus NMT's cleanup: control characters
  removed, tabs, newlines, zero-width and bidi marks, ``▁`` and U+FFFD made spaces.
  NOT identical to SentencePiece's built-in nmt_nfkc table: that one also has rules
  for sequences (a letter followed by combining marks is composed: about 220,000
  keys), and a newer Unicode version. Text in NFC form is unaffected by the first
  difference.
- "nfkc": the same without the NMT cleanup;
- "identity": no rules (whitespace handling still applies).
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache

from tinylm_unigram.charsmap import encode

_REMOVED = [*range(0x01, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, 0x8F, 0x9F]
_SPACES = [0x09, 0x0A, 0x0C, 0x0D, 0x061C, 0x1680, 0x200B, 0x200C, 0x200E, 0x200F, 0x2028,
           0x2029, 0x2581, 0xFEFF, 0xFFFD]
NAMES = ("nmt_nfkc", "nfkc", "identity")


@lru_cache(maxsize=None)
def nfkc_rules() -> dict:
    """``{character: NFKC(character)}`` for every character NFKC changes."""
    out = {}
    for c in range(0x110000):
        if 0xD800 <= c <= 0xDFFF:
            continue
        ch = chr(c)
        if not unicodedata.is_normalized("NFKC", ch):
            out[ch] = unicodedata.normalize("NFKC", ch)
    return out


@lru_cache(maxsize=None)
def charsmap_blob(name: str) -> bytes:
    """The ``precompiled_charsmap`` of the rule set ``name`` (b"" for identity)."""
    if name == "identity":
        return b""
    if name not in NAMES:
        from tinylm.tokenizers import TokenizerError

        raise TokenizerError(f"unknown normalization {name!r}; use one of {', '.join(NAMES)}")
    table = dict(nfkc_rules())
    if name == "nmt_nfkc":
        table.update({chr(c): "" for c in _REMOVED})
        table.update({chr(c): " " for c in _SPACES})
        table.pop("\uff5e", None)  # SentencePiece keeps the fullwidth tilde
    return encode(table)

"""Language identification, as a plugin point: a registry of functions
``text -> (label, score)``; the ``language`` filter keeps a page whose label is the one
asked for with at least the score asked for.

    register_language_id("fasttext", my_lid176)      # e.g. ("en", 0.97)
    get_language_id("fasttext")("Bonjour tout le monde")
    get_language_id("mypkg.lid:detect")               # or any importable function

Built in is only ``script``: the Unicode script most of the page's letters are written
in ("Latin", "Cyrillic", "Greek", "Arabic", "Hebrew", "Devanagari", "Thai", "Hangul",
"Kana", "Han", ...) with the fraction of letters in it as the score. It tells English
from Russian but not English from French; C4 used langdetect (English, probability at
least 0.99), which is not a dependency here: plug in langdetect, fastText's lid.176 or
CLD3 through ``register_language_id`` or a "module:function" name.
"""

from __future__ import annotations

import importlib

import numpy as np

from tinylm.webdata.hashing import codepoints
from tinylm.webdata.readers import WebDataError

LANGUAGE_IDS: dict = {}

# (first code point, script) for letter ranges; code points below the next start belong
# to the range (None: not letters of a script counted here). Sorted by start.
_SCRIPT_RANGES = [
    (0x0000, None), (0x0041, "Latin"), (0x005B, None), (0x0061, "Latin"), (0x007B, None),
    (0x00C0, "Latin"), (0x00D7, None), (0x00D8, "Latin"), (0x00F7, None), (0x00F8, "Latin"),
    (0x0250, None), (0x0370, "Greek"), (0x0400, "Cyrillic"), (0x0530, "Armenian"),
    (0x0590, "Hebrew"), (0x0600, "Arabic"), (0x0700, None), (0x0750, "Arabic"),
    (0x0780, None), (0x0900, "Devanagari"), (0x0980, "Bengali"), (0x0A00, None),
    (0x0B80, "Tamil"), (0x0C00, None), (0x0E00, "Thai"), (0x0E80, None),
    (0x10A0, "Georgian"), (0x1100, "Hangul"), (0x1200, None), (0x1E00, "Latin"),
    (0x1F00, "Greek"), (0x2000, None), (0x3040, "Kana"), (0x3100, None), (0x3400, "Han"),
    (0x4DC0, None), (0x4E00, "Han"), (0xA000, None), (0xAC00, "Hangul"), (0xD7B0, None),
]
_STARTS = np.array([start for start, _ in _SCRIPT_RANGES], dtype=np.uint32)
_NAMES = [name for _, name in _SCRIPT_RANGES]
SAMPLE_CHARS = 20_000  # the script is read from the first 20k characters


def script_language(text: str) -> tuple:
    """("Latin", 0.97): the script of most letters in the text's first SAMPLE_CHARS
    characters, and the fraction of those letters in it; ("", 0.0) without letters."""
    codes = codepoints(text[:SAMPLE_CHARS])
    which = np.searchsorted(_STARTS, codes, side="right") - 1
    counts = np.bincount(which, minlength=len(_NAMES))
    letters = {}
    for index in np.flatnonzero(counts):
        if _NAMES[index]:
            letters[_NAMES[index]] = letters.get(_NAMES[index], 0) + int(counts[index])
    if not letters:
        return "", 0.0
    best = max(letters, key=letters.get)
    return best, letters[best] / sum(letters.values())


def register_language_id(name: str, function) -> None:
    """Make ``function(text) -> (label, score)`` available as ``name``."""
    LANGUAGE_IDS[name] = function


def get_language_id(name: str):
    """A registered language-ID function, or "module:function" imported."""
    if name in LANGUAGE_IDS:
        return LANGUAGE_IDS[name]
    module, colon, attr = name.partition(":")
    if colon:
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise WebDataError(f"cannot load the language-ID function {name}: {e}; give "
                               f"an importable module:function") from None
    raise WebDataError(f"no language-ID function named {name!r}; use one of "
                       f"{', '.join(sorted(LANGUAGE_IDS))} or module:function")


register_language_id("script", script_language)

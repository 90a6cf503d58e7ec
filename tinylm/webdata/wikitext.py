"""A stated subset of MediaWiki markup, removed: what a Wikipedia dump's page text
needs before it reads as prose. Not a wikitext parser; what is not listed stays.

    strip_markup("'''Paris''' is the [[capital city|capital]] of [[France]].{{cn}}")
    # -> "Paris is the capital of France."

Removed, in this order:

1. HTML comments ``<!-- ... -->`` (an unclosed one to the end of the page);
2. references: ``<ref ...>...</ref>`` and ``<ref .../>``;
3. templates ``{{...}}``, nested ones too (innermost first; so ``{{a|{{b}}}}`` goes);
4. tables ``{| ... |}``, nested too;
5. links: ``[[File:...]]``, ``[[Image:...]]``, ``[[Media:...]]`` and ``[[Category:...]]``
   are dropped (with any links inside their captions); ``[[target|text]]`` -> text,
   ``[[target]]`` -> target (so ``[[bus]]es`` -> buses);
6. external links: ``[http://x.org text]`` -> text, ``[http://x.org]`` -> nothing;
7. bold and italic quotes: runs of two or more apostrophes (``''``, ``'''``, ``'''''``);
8. headings: ``== History ==`` -> History (levels 1 to 6);
9. three or more newlines -> two, trailing spaces on lines, and leading/trailing blank
   lines.

Left as they are: other HTML tags (``<br/>``, ``<small>``), character entities written
literally in the wikitext (``&nbsp;``), magic words (``__TOC__``), list markers, unbalanced
``{{`` or ``[[``.
"""

from __future__ import annotations

import re

_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_REF_EMPTY = re.compile(r"<ref\b[^>]*/>", re.I)
_REF = re.compile(r"<ref\b[^>]*>.*?</ref\s*>", re.I | re.S)
_TEMPLATE = re.compile(r"\{\{(?:(?!\{\{|\}\}).)*\}\}", re.S)  # innermost {{...}}
_TABLE = re.compile(r"\{\|(?:(?!\{\||\|\}).)*\|\}", re.S)  # innermost {| ... |}
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")  # innermost [[...]]
_EXTERNAL = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+(?:\s+([^\]]*))?\]")
_QUOTES = re.compile(r"'{2,}")
_HEADING = re.compile(r"^(={1,6})[ \t]*(.*?)[ \t]*\1[ \t]*$", re.M)
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.M)
_BLANK_LINES = re.compile(r"\n{3,}")
DROPPED_NAMESPACES = ("file", "image", "media", "category")


def _innermost(pattern, text: str, replace) -> str:
    """Apply ``pattern.sub(replace, ...)`` until nothing matches: nested constructs go
    from the inside out, one level per pass."""
    while True:
        new = pattern.sub(replace, text)
        if new == text:
            return text
        text = new


def _link(match) -> str:
    target, _, label = match.group(1).partition("|")
    namespace, colon, _ = target.strip().partition(":")
    if colon and namespace.strip().lower() in DROPPED_NAMESPACES:
        return ""
    if label:
        return label.rpartition("|")[2] if "|" in label else label
    return target.lstrip(":")


def strip_markup(wikitext: str) -> str:
    """The page's text with the markup listed in the module docstring removed."""
    text = _COMMENT.sub("", wikitext)
    text = _REF_EMPTY.sub("", text)
    text = _REF.sub("", text)
    text = _innermost(_TEMPLATE, text, "")
    text = _innermost(_TABLE, text, "")
    text = _innermost(_LINK, text, _link)
    text = _EXTERNAL.sub(lambda m: m.group(1) or "", text)
    text = _QUOTES.sub("", text)
    text = _HEADING.sub(r"\2", text)
    text = _TRAILING_SPACE.sub("", text)
    return _BLANK_LINES.sub("\n\n", text).strip("\n")

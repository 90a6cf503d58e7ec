"""Seed pieces for Unigram training: every character, and the frequent substrings that
SentencePiece's suffix-array pass (``MakeSeedSentencePieces``) would find.

SentencePiece builds an enhanced suffix array of the whole corpus and keeps its
internal nodes: the substrings that occur at least twice with at least two different
characters after them (right-maximal repeats), of 2 to ``max_piece_length``
characters, that are valid pieces, scored by ``occurrences x length``. A valid piece
never has ``▁`` after its first character, so every one lies inside one word (a
``▁`` and what follows up to the next ``▁``). The same set is computed here from the
*distinct* words, weighted by their counts, in one vectorised pass per length:

- each window of the words' code points gets a 64-bit polynomial hash (two
  different substrings of one length share one with probability ~1e-7 on a 1 MB
  corpus; the cost would be a merged count, not a wrong piece);
- the character after a window is the next character of the word, or, at the word's
  end, the ``▁`` of the next word or the end of the sentence: a word is counted
  separately for each of the two, since they are different right contexts;
- a window is right-maximal when its (hash, next character) pairs take at least two
  next characters.

Ties in the score are broken by the piece's text (SentencePiece breaks them by
suffix-tree order, which only matters when the seed count is capped).
"""

from __future__ import annotations

import numpy as np

from tinylm_unigram.scripts import script_id

WS = "\u2581"
UNK_CHAR = "\u2585"  # SentencePiece's stand-in for characters outside the coverage
BOUNDARY = "\t"       # where user-defined symbols were cut out
END = "\x00"          # the end of a sentence, as the next character of its last word


def _script_table(cps: np.ndarray) -> np.ndarray:
    uniq, inverse = np.unique(cps, return_inverse=True)
    ids = np.array([script_id(chr(int(c))) if c > 0 else -1 for c in uniq], dtype=np.int64)
    return ids[inverse]


def seed_pieces(words: list, counts, *, max_piece_length=16, seed_size=1_000_000,
                split_by_unicode_script=True) -> list:
    """``[(piece, score)]``: the substrings above (not the single characters) sorted
    by score. ``words``: distinct words each followed by its next character (``▁`` or
    ``END``); ``counts``: how often each occurs."""
    counts = np.asarray(counts, dtype=np.int64)
    text = "".join(words)
    if not text:
        return []
    cps = np.frombuffer(text.encode("utf-32-le"), dtype="<u4").astype(np.int64)
    lengths = np.array([len(w) for w in words], dtype=np.int64)
    word_of = np.repeat(np.arange(len(words)), lengths)
    starts = np.cumsum(lengths) - lengths
    offset = np.arange(len(cps)) - starts[word_of]
    body_len = lengths - 1  # the last character is the next-character marker
    n = len(cps)
    ws, unk, bnd = ord(WS), ord(UNK_CHAR), ord(BOUNDARY)
    # bad[j]: j cannot be inside a piece (a ▁ not at the word's start, the unknown
    # mark, a boundary, or the next-character marker)
    marker = offset == body_len[word_of]
    bad = marker | (cps == unk) | (cps == bnd) | ((cps == ws) & (offset > 0))
    breaks = np.zeros(n, dtype=bool)  # a change of script between j-1 and j
    if split_by_unicode_script:
        sc = _script_table(np.where(marker | (cps == ws), 0, cps))
        breaks[1:] = (sc[1:] != sc[:-1]) & (cps[:-1] != ws) & ~marker[1:] & ~marker[:-1]
    cum_bad = np.concatenate([[0], np.cumsum(bad)])
    cum_break = np.concatenate([[0], np.cumsum(breaks)])
    weight = counts[word_of]
    out_keys, out_scores, out_pos, out_len = [], [], [], []
    h = np.zeros(n, dtype=np.uint64)
    base = np.uint64(0x9E3779B97F4A7C15)
    pos = np.arange(n, dtype=np.int64)
    with np.errstate(over="ignore"):
        for L in range(1, max_piece_length + 1):
            # windows [p, p + L) inside the word's body, with a next character
            room = offset[pos] + L <= body_len[word_of[pos]]
            pos, h = pos[room], h[room]
            if not len(pos):
                break
            h = h * base + cps[pos + L - 1].astype(np.uint64)
            if L == 1:
                continue
            valid = ((cum_bad[pos + L] - cum_bad[pos + 1] == 0) & ~bad[pos]
                     & (cum_break[pos + L] - cum_break[pos + 1] == 0))
            if not valid.any():
                break
            keys, p = h[valid], pos[valid]
            nxt = cps[p + L]
            order = np.lexsort((nxt, keys))
            keys, nxt, p, w = keys[order], nxt[order], p[order], weight[p[order]]
            new_key = np.concatenate([[True], keys[1:] != keys[:-1]])
            new_pair = new_key | np.concatenate([[True], nxt[1:] != nxt[:-1]])
            group = np.cumsum(new_key) - 1
            distinct = np.bincount(group, weights=new_pair)
            total = np.bincount(group, weights=w)
            first = p[new_key]
            keep = distinct >= 2
            # A longer window is valid only where this one is, and repeats only where
            # this one does: follow just the windows seen more than once.
            again = np.empty(len(order), dtype=bool)
            again[order] = total[group] >= 2
            pos, h = pos[valid][again], h[valid][again]
            out_scores.append(total[keep].astype(np.int64) * L)
            out_pos.append(first[keep])
            out_len.append(np.full(int(keep.sum()), L))
    if not out_scores:
        return []
    scores = np.concatenate(out_scores)
    first = np.concatenate(out_pos)
    lens = np.concatenate(out_len)
    top = np.argsort(-scores, kind="stable")[: seed_size * 2]
    pieces = [text[a:a + n] for a, n in zip(first[top].tolist(), lens[top].tolist())]
    top_scores = scores[top]
    order = np.lexsort((np.array(pieces, dtype=str), -top_scores))[:seed_size]  # by score, text
    return list(zip([pieces[k] for k in order.tolist()], top_scores[order].tolist()))

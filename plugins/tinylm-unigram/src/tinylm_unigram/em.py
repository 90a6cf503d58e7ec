"""The lattices of many words at once, for training: forward-backward (the E step)
and Viterbi, vectorised across words.

All words are laid end to end, a separator between them, and one ``PieceIndex.find``
lists every edge. A word's lattice is a chain of positions 0..len; an edge from
position s to e carries a piece's score. Edges are grouped by how far their end lies
from the start of their word (forward) or their start from the end of their word
(backward): all edges in a group depend only on earlier groups, so each group is one
NumPy step over every word at once, and a pass costs as many steps as the longest
word has characters. A position where no one-character piece starts gets an unknown
edge (id -1) scored ``min(score) - 10``, as SentencePiece's lattice does.
"""

from __future__ import annotations

import numpy as np

from tinylm_unigram import lattice

UNK_PENALTY = 10.0


def _lse(values: np.ndarray, cut: np.ndarray, reps: np.ndarray, m: np.ndarray) -> np.ndarray:
    """log-sum-exp of the segments of ``values`` starting at ``cut`` (lengths ``reps``,
    maxima ``m``)."""
    with np.errstate(invalid="ignore"):
        s = np.add.reduceat(np.exp(values - np.repeat(m, reps)), cut)
    out = m + np.log(s)
    out[np.isneginf(m)] = -np.inf
    return out


def _merge_order(starts: np.ndarray, unknown: np.ndarray) -> np.ndarray:
    """The order that interleaves ``unknown`` (sorted positions) into ``starts``
    (sorted), each unknown after the starts equal to it: indices into
    ``concatenate([starts, unknown])``."""
    n = len(starts) + len(unknown)
    slot = np.searchsorted(starts, unknown, side="right") + np.arange(len(unknown))
    order = np.empty(n, np.int64)
    is_unknown = np.zeros(n, dtype=bool)
    is_unknown[slot] = True
    order[slot] = len(starts) + np.arange(len(unknown))
    order[~is_unknown] = np.arange(len(starts))
    return order


def _group_order(key: np.ndarray) -> tuple:
    """A stable sort by the small non-negative ints ``key`` (radix sort in int16):
    ``(order, key[order])``."""
    dtype = np.int16 if (not len(key) or key.max() < 2 ** 15) else np.int64
    order = np.argsort(key.astype(dtype), kind="stable")
    return order, key[order]


class _Text:
    """The words laid end to end and lattice edges over them, with both pass orders.

    The first (the root) holds every edge a vocabulary under the searched one can have:
    each piece occurrence and an unknown candidate at every position (less the
    whole-word edges with ``skip_whole``). ``select`` keeps those of a smaller
    vocabulary, in the same orders: every piece edge kept, and the unknown ones where
    no one-character piece starts. Words, positions and orders never change."""

    def __init__(self, words: list, index: lattice.PieceIndex, skip_whole: bool):
        lengths = np.array([len(w) for w in words], dtype=np.int64)
        self.word_start = np.cumsum(lengths + 1) - (lengths + 1)  # separator after each
        self.word_end = self.word_start + lengths
        cp = lattice.code_points("\0".join(words))
        cp[self.word_end[:-1]] = 0  # the separators: no piece holds code point 0
        self.size = len(cp) + 1
        word_of_pos = np.repeat(np.arange(len(words)), lengths + 1)[: len(cp)]
        starts, lens, rows = index.find(cp)  # sorted by start, then length
        unknown = np.flatnonzero(cp > 0)
        # an unknown candidate comes right after the pieces that start where it does
        order = _merge_order(starts, unknown)
        self.starts = np.concatenate([starts, unknown])[order]
        self.ends = self.starts + np.concatenate([lens, np.ones(len(unknown), np.int64)])[order]
        self.ids = np.concatenate([index.ids[rows], np.full(len(unknown), -1, np.int64)])[order]
        self.word = word_of_pos[self.starts]
        if skip_whole:  # (a one-character word's unknown candidate is whole too)
            whole = ((self.starts == self.word_start[self.word])
                     & (self.ends == self.word_end[self.word]))
            for name in ("starts", "ends", "ids", "word"):
                setattr(self, name, getattr(self, name)[~whole])
        self.one_char = (self.ends - self.starts == 1) & (self.ids >= 0)
        # Each pass visits the edges by group (the end's offset in its word forward,
        # the start's distance to its word's end backward), by target within a group,
        # and among edges of one target in the order above (ties go to the first).
        # The order above is by start, so a stable sort by group alone gives it.
        self.fwd, self.fwd_key = _group_order(self.ends - self.word_start[self.word])
        self.bwd, self.bwd_key = _group_order(self.word_end[self.word] - self.starts)
        self.root = self
        self.root_ids = np.arange(int(index.ids.max()) + 1 if len(index.ids) else 0)
        self.root_words = np.arange(len(words))

    def select(self, piece_map: np.ndarray, word_map: np.ndarray) -> "_Text":
        """The edges of the vocabulary ``piece_map`` (id here -> new id, or -1) over
        the words ``word_map`` (word here -> new word, or -1), renumbered."""
        mapped = _compose(self.ids, piece_map)
        unknown = self.ids < 0
        same_words = len(word_map) == len(self.word_start) and (word_map >= 0).all() and (
            word_map == np.arange(len(word_map))).all()
        alive = (mapped >= 0) | unknown
        if not same_words:
            alive &= word_map[self.word] >= 0
        covered = np.zeros(self.size, dtype=bool)
        covered[self.starts[alive & self.one_char]] = True
        keep = alive & (~unknown | ~covered[self.starts])
        out = object.__new__(_Text)
        out.size = self.size
        if same_words:
            out.word_start, out.word_end, out.word = self.word_start, self.word_end, self.word[keep]
        else:
            kept_words = np.flatnonzero(word_map >= 0)
            first = np.empty(len(kept_words), np.int64)
            first[word_map[kept_words]] = kept_words
            out.word_start, out.word_end = self.word_start[first], self.word_end[first]
            out.word = word_map[self.word[keep]]
        out.starts, out.ends, out.ids = self.starts[keep], self.ends[keep], mapped[keep]
        out.one_char = self.one_char[keep]
        rank = np.cumsum(keep) - 1
        for name in ("fwd", "bwd"):
            order = getattr(self, name)
            sel = keep[order]
            setattr(out, name, rank[order[sel]])
            setattr(out, name + "_key", getattr(self, name + "_key")[sel])
        out.root = self.root
        out.root_ids, out.root_words = _compose(self.root_ids, piece_map), _compose(self.root_words, word_map)
        return out

    def restrict(self, new_id: np.ndarray, words: bool) -> "_Text":
        """The edges of the pieces kept (``new_id[id]``: the new id, or -1); ``words``:
        the words are the pieces, dropped and renumbered the same way. Selected from
        this text unless a one-character piece goes (its unknown edges are only in the
        root)."""
        word_map = new_id if words else np.arange(len(self.word_start))
        if (new_id[self.ids[self.one_char]] < 0).any():
            return self.root.select(_compose(self.root_ids, new_id),
                                    _compose(self.root_words, word_map))
        return self.select(new_id, word_map)


def _compose(ids: np.ndarray, new_id: np.ndarray) -> np.ndarray:
    """``new_id[ids]`` where ``ids >= 0``, else -1."""
    return np.where(ids >= 0, new_id[np.maximum(ids, 0)], -1)


class WordLattices:
    """The lattices of ``words`` (list of str) under the pieces of ``index``
    (``lattice.PieceIndex``; its rows are the piece ids). ``skip_whole``: leave out the
    edge that spans a whole word (to find each piece's best split into others).

    A smaller vocabulary only removes edges (and adds an unknown edge where no
    one-character piece is left), so ``subset`` selects from the edges found once,
    keeping their sorted pass orders: no search and no sort after the first."""

    def __init__(self, words: list, index: lattice.PieceIndex, *, skip_whole=False):
        root = _Text(words, index, skip_whole)
        self._use(root.select(root.root_ids, root.root_words))

    def subset(self, new_id: np.ndarray, *, words=False) -> "WordLattices":
        """The same words under a smaller vocabulary: ``new_id[old id]`` is a kept
        piece's new id, or -1 for a removed one. ``words``: the words are the pieces
        themselves (``skip_whole`` lattices): drop and renumber them the same way."""
        out = object.__new__(WordLattices)
        out._use(self._text.restrict(new_id, words))
        return out

    def _use(self, text: _Text) -> None:
        self._text = text
        self.n_words = len(text.word_start)
        self.word_start, self.word_end, self.size = text.word_start, text.word_end, text.size
        self.starts, self.ends, self.ids, self.word = text.starts, text.ends, text.ids, text.word
        self._fwd = self._plan(text.fwd, text.fwd_key, self.ends)
        self._bwd = self._plan(text.bwd, text.bwd_key, self.starts)

    @staticmethod
    def _plan(edges, key, target) -> list:
        """Per group of ``key`` (``edges`` sorted by it, by target within a group),
        what a pass needs: (edges, segment starts in the group, segment lengths,
        segment targets), a segment being the edges of one target."""
        n = len(edges)
        if not n:
            return []
        tgt = target[edges]
        new_group = np.concatenate([[True], key[1:] != key[:-1]])
        seg = np.flatnonzero(new_group | np.concatenate([[True], tgt[1:] != tgt[:-1]]))
        seg_len = np.diff(np.concatenate([seg, [n]]))
        g_edge = np.concatenate([np.flatnonzero(new_group), [n]])
        g_seg = np.concatenate([np.searchsorted(seg, g_edge[:-1]), [len(seg)]])
        plan = []
        for g in range(len(g_edge) - 1):
            e0, e1, s0, s1 = g_edge[g], g_edge[g + 1], g_seg[g], g_seg[g + 1]
            cut = seg[s0:s1]
            plan.append((edges[e0:e1], cut - e0, seg_len[s0:s1], tgt[cut]))
        return plan

    def edge_scores(self, scores: np.ndarray) -> np.ndarray:
        """float64 score per edge (``scores`` per piece id; unknown: min - 10)."""
        unk = float(scores.min()) - UNK_PENALTY if len(scores) else -UNK_PENALTY
        return np.where(self.ids >= 0, scores[np.maximum(self.ids, 0)], unk)

    # ------------------------------------------------------------------ passes

    def forward(self, w: np.ndarray, *, viterbi=False) -> tuple:
        """alpha per position (log-sum-exp, or max with ``viterbi``) and, with
        ``viterbi``, the best incoming edge per position (-1 none)."""
        alpha = np.full(self.size, -np.inf)
        alpha[self.word_start] = 0.0
        back = np.full(self.size, -1, dtype=np.int64)
        for group, cut, reps, tgt in self._fwd:
            vals = alpha[self.starts[group]] + w[group]
            m = np.maximum.reduceat(vals, cut)
            if viterbi:
                hit = vals == np.repeat(m, reps)
                first = np.minimum.reduceat(np.where(hit, np.arange(len(vals)), len(vals)), cut)
                alpha[tgt] = m
                back[tgt] = np.where(np.isneginf(m), -1, group[np.minimum(first, len(vals) - 1)])
            else:
                alpha[tgt] = _lse(vals, cut, reps, m)
        return alpha, back

    def backward(self, w: np.ndarray) -> np.ndarray:
        beta = np.full(self.size, -np.inf)
        beta[self.word_end] = 0.0
        for group, cut, reps, tgt in self._bwd:
            vals = w[group] + beta[self.ends[group]]
            beta[tgt] = _lse(vals, cut, reps, np.maximum.reduceat(vals, cut))
        return beta

    def expected_counts(self, scores: np.ndarray, freqs: np.ndarray, n_pieces: int) -> tuple:
        """The E step: ``(expected count per piece, objective)`` where each word counts
        ``freqs`` times; objective: minus the mean log-likelihood per word."""
        w = self.edge_scores(scores)
        alpha, _ = self.forward(w)
        beta = self.backward(w)
        z = alpha[self.word_end]
        post = np.exp(alpha[self.starts] + w + beta[self.ends] - z[self.word]) * freqs[self.word]
        known = self.ids >= 0
        expected = np.bincount(self.ids[known], weights=post[known], minlength=n_pieces)
        return expected, float(-(z * freqs).sum() / max(freqs.sum(), 1))

    def best_paths(self, scores: np.ndarray) -> tuple:
        """Viterbi for every word: ``(edges of the best paths, word of each, best score
        per word)``; a word without any path has score -inf and no edges."""
        w = self.edge_scores(scores)
        alpha, back = self.forward(w, viterbi=True)
        best = alpha[self.word_end]
        cur = np.where(np.isfinite(best), back[self.word_end], -1)
        found, owner = [], []
        active = np.flatnonzero(cur >= 0)
        while len(active):
            e = cur[active]
            found.append(e)
            owner.append(active)
            prev = self.starts[e]
            nxt = np.where(prev > self.word_start[active], back[prev], -1)
            cur[active] = nxt
            active = active[nxt >= 0]
        if not found:
            empty = np.zeros(0, np.int64)
            return empty, empty, best
        edges, words = np.concatenate(found), np.concatenate(owner)
        order = np.lexsort((self.starts[edges], words))
        return edges[order], words[order], best

"""The lattice of a Unigram model: which pieces occur where in a text, and the best
path through them (Viterbi), as SentencePiece's ``EncodeOptimized`` and Hugging Face
``tokenizers``' ``encode_optimized`` compute it.

Finding the pieces is vectorised: every window of the text's code points, of every
length up to the longest piece, gets a polynomial hash (one NumPy pass per length,
only over the windows whose shorter prefix is a prefix of some piece), is looked up in
sorted per-length hash tables, and each hit is confirmed by comparing code points.
The result is every lattice edge ``(start, length, id)``, sorted by start then
length: the order in which both libraries visit them.

The best path of one text is a Python loop over those edges (a few hundred
nanoseconds per edge); across many lines (``edges_batch``, ``viterbi_f32_batch``) it is
a loop over start positions with NumPy operations across the lines, the same updates
in the same order. It cannot be vectorised along one text without changing the
answer: each position's best score depends on the earlier ones, and SentencePiece's arithmetic
must be reproduced to the bit: scores are float32, each candidate ``score +
best[start]`` is a float32 sum, a strictly better candidate replaces the best (so on a
tie the earliest start wins). On a long text the sums reach thousands, where float32
steps are ~0.004 apart, so the rounding decides between near-equal segmentations
(measured: double sums give other ids), and whenever the best score at a start
passes +-100000 SentencePiece rebases the scores (see ``viterbi_f32``), which is
reproduced too. Identical to sentencepiece 0.2.3 on every input tested, up to 1.1
million characters in one call. ``tokenizers`` does the same in float64.
"""

from __future__ import annotations

from array import array

import numpy as np

_BASES = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93)


def code_points(text: str) -> np.ndarray:
    """The code points of ``text`` as uint64 (plus one, so that U+0000 hashes)."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4").astype(np.uint64) + 1


class PieceIndex:
    """Hash tables for finding ``pieces`` (a list of str; None or "" for ids that
    must never match) in text."""

    def __init__(self, pieces):
        lengths = np.fromiter(map(len, (p or "" for p in pieces)), dtype=np.int64, count=len(pieces))
        self.ids = np.flatnonzero(lengths > 0)
        self.lengths = lengths[self.ids]
        self.max_len = int(self.lengths.max()) if len(self.ids) else 0
        width = max(self.max_len, 1)
        mat = np.zeros((len(self.ids), width), dtype=np.uint64)
        if len(self.ids):
            flat = code_points("".join([pieces[i] for i in self.ids.tolist()]))
            rows = np.repeat(np.arange(len(self.ids)), self.lengths)
            cols = np.arange(len(flat)) - np.repeat(np.cumsum(self.lengths) - self.lengths, self.lengths)
            mat[rows, cols] = flat
        self.matrix = mat  # (pieces, max_len) code points + 1, 0 padded
        self.by_text = {pieces[i]: i for i in self.ids.tolist()}  # for short texts
        self._prefix_set = None
        for base in _BASES:  # a base under which no two pieces share a hash
            self.base = np.uint64(base)
            if self._build_tables():
                return
        raise ValueError("the pieces collide under every hash base (duplicate pieces?)")

    @property
    def prefix_set(self) -> set:
        """Every proper prefix of a piece (for ``short_table``; made on first use)."""
        if self._prefix_set is None:
            self._prefix_set = {p[:k] for p in self.by_text for k in range(1, len(p))}
        return self._prefix_set

    def _build_tables(self) -> bool:
        """Per length L: the sorted hashes of the pieces' L-character prefixes, the row
        of the piece of exactly that text (-1: none) and whether a longer piece goes
        on from it. False if two pieces share a hash."""
        mat, lengths = self.matrix, self.lengths
        self.keys, self.rows, self.more = [], [], []
        h = np.zeros(len(mat), dtype=np.uint64)
        with np.errstate(over="ignore"):
            for L in range(1, self.max_len + 1):
                h = h * self.base + mat[:, L - 1]
                has = np.flatnonzero(lengths >= L)
                keys, inv = np.unique(h[has], return_inverse=True)
                full = lengths[has] == L
                if len(keys) and np.bincount(inv[full], minlength=len(keys)).max(initial=0) > 1:
                    return False
                rows = np.full(len(keys), -1, dtype=np.int64)
                rows[inv[full]] = has[full]
                more = np.zeros(len(keys), dtype=bool)
                more[inv[~full]] = True
                self.keys.append(keys)
                self.rows.append(rows)
                self.more.append(more)
        return True

    def find(self, cp: np.ndarray) -> tuple:
        """Every occurrence of a piece in the code points ``cp``: ``(starts, lengths,
        rows)`` sorted by start then length; ``rows`` index ``self.ids``. One sorted
        lookup per length, only for the windows whose shorter prefix goes on."""
        n = len(cp)
        found_s, found_l, found_r = [], [], []
        alive = np.arange(n, dtype=np.int64)
        h = np.zeros(n, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for L in range(1, self.max_len + 1):
                inside = alive + L <= n
                alive, h = alive[inside], h[inside]
                keys = self.keys[L - 1]
                if not len(alive) or not len(keys):
                    break
                h = h * self.base + cp[alive + (L - 1)]
                at = np.minimum(np.searchsorted(keys, h), len(keys) - 1)
                found = keys[at] == h
                rows = np.where(found, self.rows[L - 1][at], -1)
                hit = rows >= 0
                if hit.any():
                    starts, rows = alive[hit], rows[hit]
                    window = cp[starts[:, None] + np.arange(L)]
                    same = (window == self.matrix[rows, :L]).all(axis=1)
                    found_s.append(starts[same])
                    found_l.append(np.full(int(same.sum()), L, dtype=np.int64))
                    found_r.append(rows[same])
                more = found & self.more[L - 1][at]
                alive, h = alive[more], h[more]
        if not found_s:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, empty
        starts = np.concatenate(found_s)
        lengths = np.concatenate(found_l)
        rows = np.concatenate(found_r)
        order = np.lexsort((lengths, starts))
        return starts[order], lengths[order], rows[order]


SHORT = 200  # below this many characters, dictionary lookups beat NumPy's overhead


def short_table(index: PieceIndex, scores: np.ndarray) -> dict:
    """``{window: (id or -1, score, is a proper prefix of some piece)}`` for
    ``edges`` on short texts: one dictionary lookup per window."""
    table = {p: (-1, 0.0, True) for p in index.prefix_set}
    for p, i in index.by_text.items():
        table[p] = (i, float(scores[i]), p in index.prefix_set)
    return table


def edges(index: PieceIndex, scores: np.ndarray, text: str, table: dict | None = None) -> list:
    """The lattice of ``text``: ``[(start, end, score, id)]`` in visiting order (by
    start, then length), with an unknown edge (id -1, score 0) of one character
    wherever no piece of one character starts. ``scores``: float64 per id;
    ``table``: ``short_table(index, scores)``, used for texts under ``SHORT``."""
    if table is not None and len(text) < SHORT:
        return _edges_short(table, index.max_len, text)
    cp = code_points(text)
    n = len(cp)
    starts, lengths, rows = index.find(cp)
    ids = index.ids[rows]
    single = np.zeros(n, dtype=bool)
    single[starts[lengths == 1]] = True
    missing = np.nonzero(~single)[0]
    if len(missing):
        # an unknown edge comes after the pieces that start at the same place
        starts = np.concatenate([starts, missing])
        lengths = np.concatenate([lengths, np.ones(len(missing), np.int64)])
        ids = np.concatenate([ids, np.full(len(missing), -1, np.int64)])
        order = np.lexsort((ids < 0, starts))  # stable: keeps length order within a start
        starts, lengths, ids = starts[order], lengths[order], ids[order]
    edge_scores = np.where(ids >= 0, scores[np.maximum(ids, 0)], 0.0)
    return list(zip(starts.tolist(), (starts + lengths).tolist(), edge_scores.tolist(),
                    ids.tolist()))


def _edges_short(table: dict, longest: int, text: str) -> list:
    """``edges`` by dictionary lookups, extending a window while it is a piece's prefix
    (the same edges, in the same order)."""
    out = []
    n = len(text)
    for s in range(n):
        single = False
        for e in range(s + 1, min(n, s + longest) + 1):
            hit = table.get(text[s:e])
            if hit is None:
                break
            if hit[0] >= 0:
                out.append((s, e, hit[1], hit[0]))
                single = single or e == s + 1
            if not hit[2]:
                break
        if not single:
            out.append((s, s + 1, 0.0, -1))
    return out


RESET = 100000.0  # SentencePiece's kScoreResetThreshold (EncodeOptimized)


def viterbi_f32(n: int, lattice: tuple, unk_score: float) -> list:
    """SentencePiece's best path over ``n`` characters: ``[(start, end, id)]`` (id -1:
    unknown). Every candidate ``score + best[start]`` is a float32 sum (computed in
    double and rounded once, which is the correctly rounded float32 sum) compared
    with the float32 best so far; ``array('f')`` does the rounding on assignment.

    SentencePiece's ``EncodeOptimized`` also rebases the scores: when it begins the
    edges of a start whose best score is beyond +-100000 (``kScoreResetThreshold``), it
    subtracts that score (in float32) from the best score of the start and of every
    position reached beyond it, so that the sums stay small. That changes how later
    sums round, and so which of two near-equal paths wins; it is reproduced here
    (once every ~40,000 characters of English text: the check costs one integer
    comparison per edge, one more per best-so-far update)."""
    best = array("f", bytes(4 * (n + 1)))
    back = [-1] * (n + 1)
    which = [0] * (n + 1)
    tmp = array("f", b"\0\0\0\0")
    prev = -1
    frontier = 0  # the furthest position reached by an edge so far
    for s, e, c, i in lattice:
        if s != prev:  # the first edge of a new start: SentencePiece's reset check
            prev = s
            offset = best[s]
            if offset < -RESET or offset > RESET:
                for j in range(s + 1, frontier + 1):
                    if back[j] >= 0:
                        best[j] = best[j] - offset  # float32 difference (correctly rounded)
                best[s] = 0.0
        tmp[0] = (unk_score if i < 0 else c) + best[s]
        c = tmp[0]
        if back[e] < 0 or c > best[e]:
            best[e] = c
            back[e] = s
            which[e] = i
            if e > frontier:  # the first edge to reach e always lands here
                frontier = e
    return _backtrack(n, back, which)


def viterbi_f64(n: int, lattice: tuple, unk_score: float) -> list:
    """``tokenizers``' best path (float64 throughout): ``[(start, end, id)]``."""
    best = [0.0] * (n + 1)
    back = [-1] * (n + 1)
    which = [0] * (n + 1)
    for s, e, c, i in lattice:
        c = (unk_score if i < 0 else c) + best[s]
        if back[e] < 0 or c > best[e]:
            best[e] = c
            back[e] = s
            which[e] = i
    return _backtrack(n, back, which)


def _backtrack(n: int, back: list, which: list) -> list:
    path, e = [], n
    while e > 0:
        s = back[e]
        path.append((s, e, which[e]))
        e = s
    path.reverse()
    return path


def sample(n: int, lattice: tuple, unk_score: float, alpha: float, rng) -> list:
    """A path drawn with probability proportional to ``exp(alpha * score)``
    (SentencePiece's ``SampleEncode``, subword regularisation): forward filtering,
    then backward sampling from the end. ``rng``: a ``numpy.random.Generator``."""
    starts, ends, scores, ids = (np.array(col) for col in zip(*lattice))
    w = alpha * np.where(ids < 0, unk_score, scores)
    log_fwd = np.full(n + 1, -np.inf)
    log_fwd[0] = 0.0
    order = np.argsort(ends, kind="stable")
    by_end = np.split(order, np.searchsorted(ends[order], np.arange(1, n + 1)))[1:]
    for e in range(1, n + 1):  # each position's total over the edges ending there
        k = by_end[e - 1]
        log_fwd[e] = np.logaddexp.reduce(log_fwd[starts[k]] + w[k])
    path, e = [], n
    while e > 0:
        k = by_end[e - 1]
        logp = log_fwd[starts[k]] + w[k]
        p = np.exp(logp - logp.max())
        pick = k[rng.choice(len(k), p=p / p.sum())]
        path.append((int(starts[pick]), e, int(ids[pick])))
        e = int(starts[pick])
    path.reverse()
    return path


# ---------------------------------------------------------------------- many lines at once

BUCKET_CELLS = 1 << 22  # best/back cells (lines x longest line + 1) per batched bucket
# A bucket is batched when it has at least this many edges per start position (its
# longest line): each step costs ~20 edges' worth of the per-edge loop (measured).
MIN_EDGES_PER_STEP = 24


def edges_batch(index: PieceIndex, scores: np.ndarray, texts: list, unk_score: float) -> tuple:
    """The lattices of all ``texts`` from one piece search over their concatenation
    (a 0 between texts, which no piece contains): ``(line, start, end, score, id)``
    arrays, starts and ends within the line, in no particular order (each line's
    pieces by start, then its unknown edges). An unknown edge (id -1, score
    ``unk_score``) wherever no piece of one character starts. Within one start of one
    line all ends differ, so ``viterbi_f32_batch`` only needs them sorted by start."""
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    offsets = np.concatenate([[0], np.cumsum(lengths + 1)])  # where each text begins
    total = int(offsets[-1]) - 1 if len(texts) else 0
    if total <= 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty, np.zeros(0), empty
    cp = code_points("\0".join(texts))
    cp[offsets[1:-1] - 1] = 0
    starts, plen, rows = index.find(cp)
    ids = index.ids[rows]
    single = np.zeros(total, dtype=bool)
    single[starts[plen == 1]] = True
    single[offsets[1:-1] - 1] = True  # the separators get no edge
    missing = np.flatnonzero(~single)
    starts = np.concatenate([starts, missing])
    plen = np.concatenate([plen, np.ones(len(missing), np.int64)])
    ids = np.concatenate([ids, np.full(len(missing), -1, np.int64)])
    line = np.repeat(np.arange(len(texts)), lengths + 1)[starts]
    local = starts - offsets[line]
    edge_scores = np.where(ids >= 0, scores[np.maximum(ids, 0)], unk_score)
    return line, local, local + plen, edge_scores, ids


def viterbi_f32_batch(lengths: np.ndarray, lattice: tuple, unk_score: float) -> tuple:
    """``viterbi_f32`` for many lines at once, bit for bit: ``lattice`` is
    ``edges_batch``'s (``unk_score`` its). Lines are sorted by length and cut into buckets; in a bucket
    the loop runs over start positions p, and the edges starting at p in every line
    of the bucket update their ends in one set of NumPy operations. That is the same
    sequence of updates per position as the edge-by-edge loop: starts in increasing
    order, and within one start of one line the ends are distinct (so no two updates
    of one position are in the same step). Candidates are the float64 sum rounded
    once to float32 (as ``array('f')`` does), compared strictly; the score rebase
    is checked per line per start. A bucket holds lines from its longest down to half
    that length (at most ``BUCKET_CELLS`` cells); one with too few edges per step
    (``MIN_EDGES_PER_STEP``: a few long lines) goes through ``viterbi_f32`` line by
    line.

    Returns the best paths as ``(line, start, end, id)`` arrays sorted by line then
    start."""
    lengths = np.asarray(lengths, dtype=np.int64)
    line, start, end, score, ids = lattice
    nl = len(lengths)
    order = np.argsort(-lengths, kind="stable")  # longest first
    bucket_of = np.empty(nl, dtype=np.int64)
    rank = np.empty(nl, dtype=np.int64)  # the line's row in its bucket
    buckets, k = [], 0
    sorted_lengths = lengths[order]
    while k < nl:  # lines from the longest left down to half its length, as many as fit
        longest = int(sorted_lengths[k])
        half = k + int(np.searchsorted(-sorted_lengths[k:], -((longest + 1) // 2), side="right"))
        size = max(1, min(half - k, BUCKET_CELLS // (longest + 1)))
        members = np.sort(order[k:k + size])  # in line order: paths come out sorted
        bucket_of[members] = len(buckets)
        rank[members] = np.arange(size)
        buckets.append(members)
        k += size
    eb = bucket_of[line]
    # by bucket, then start (any order within one start of one line: the ends differ)
    by = np.argsort(eb * (int(lengths.max(initial=0)) + 1) + start)
    cuts = np.searchsorted(eb[by], np.arange(len(buckets) + 1))
    out = []
    for b, members in enumerate(buckets):
        sel = by[cuts[b]:cuts[b + 1]]
        if not len(sel):
            continue
        if len(sel) < MIN_EDGES_PER_STEP * int(lengths[members].max()):
            sel = sel[np.argsort(line[sel], kind="stable")]  # by line, then start
            cut = np.searchsorted(line[sel], members, side="right").tolist()
            for m, a, z in zip(members.tolist(), [0] + cut[:-1], cut):
                mine = sel[a:z]
                path = viterbi_f32(int(lengths[m]), list(zip(
                    start[mine].tolist(), end[mine].tolist(), score[mine].tolist(),
                    ids[mine].tolist())), unk_score)
                if path:
                    s, e, i = (np.array(c, dtype=np.int64) for c in zip(*path))
                    out.append((np.full(len(s), m, dtype=np.int64), s, e, i))
            continue
        out.append(_bucket(members, lengths[members], rank[line[sel]], start[sel], end[sel],
                           score[sel], ids[sel]))
    if not out:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty, empty
    pl, ps, pe, pi = (np.concatenate(c) for c in zip(*out))
    if len(out) == 1:
        return pl, ps, pe, pi
    o = np.argsort(pl, kind="stable")  # each part is sorted by line, then start
    return pl[o], ps[o], pe[o], pi[o]


def _bucket(members, lengths, row, start, end, score, ids) -> tuple:
    """One bucket of ``viterbi_f32_batch``: lines ``members`` (rows of the bucket, in
    line order), edges sorted by start. Unreached positions hold -inf rather than a
    flag (the first candidate always beats it, a rebase leaves it -inf). The rebase
    check runs over every row, also rows whose text ended at p or before: there it
    can only touch the scores at and after the row's end, which no edge reads."""
    n_rows, width = len(members), int(lengths.max()) + 1
    grid = np.full((n_rows, width), -np.inf, dtype=np.float32)
    grid[:, 0] = 0.0
    grid[np.arange(width) > lengths[:, None]] = 0.0
    best = grid.reshape(-1)
    back = np.full(n_rows * width, -1, dtype=np.int64)
    which = np.zeros(n_rows * width, dtype=np.int64)
    at = row * width
    src, dst = at + start, at + end
    bounds = np.searchsorted(start, np.arange(width)).tolist()
    f32 = np.float32
    for p in range(width - 1):
        a, z = bounds[p], bounds[p + 1]
        here = grid[:, p]
        if here.min() < -RESET or here.max() > RESET:  # SentencePiece's rebase
            r = np.flatnonzero((here < -RESET) | (here > RESET))
            grid[r, p + 1:] -= here[r][:, None]  # float32 differences; -inf stays
            grid[r, p] = 0.0
        cand = (score[a:z] + best[src[a:z]]).astype(f32)
        d = dst[a:z]
        upd = cand > best[d]
        t = d[upd]
        best[t] = cand[upd]
        back[t] = p
        which[t] = ids[a:z][upd]
    # backtrack all rows at once (one piece per step), marking where pieces end
    on = np.zeros(n_rows * width, dtype=bool)
    flat = np.flatnonzero(lengths > 0) * width + lengths[lengths > 0]
    while len(flat):
        on[flat] = True
        s = back[flat]
        flat = (flat - flat % width + s)[s > 0]
    flat = np.flatnonzero(on)  # by row, then position
    r, e = np.divmod(flat, width)
    return members[r], back[flat], e, which[flat]

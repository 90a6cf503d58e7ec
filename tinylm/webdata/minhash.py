"""MinHash signatures and locality-sensitive hashing, vectorised in NumPy.

    hasher = MinHasher(num_perm=128, seed=1)
    sig = hasher.signatures([word_shingles(a, 5), word_shingles(b, 5)])   # (2, 128) uint64
    estimate_jaccard(sig[0], sig[1])              # ~ |A & B| / |A | B|, std sqrt(J(1-J)/128)
    bands, rows = optimal_bands(0.8, 128)         # (9, 13): the S-curve's threshold near 0.8
    keys = band_keys(sig, bands, rows)            # (2, 9) uint64: equal key = same bucket
    pairs = candidate_pairs(keys)                 # (m, 2) document indices sharing a bucket
    first = first_of_components(2, pairs)         # the smallest index in each one's cluster

Permutation i is the universal hash ``h_i(x) = (a_i x + b_i) mod p`` with p = 2^61 - 1
(a Mersenne prime) and a_i in [1, p), b_i in [0, p) drawn from ``seed``, applied to the
64-bit shingle hashes reduced mod p; the signature is each permutation's minimum over a
document's shingles. ``a x`` is done exactly: both split in 31-bit halves, the four
products (each below 2^62) folded with 2^61 = 1 (mod p); no product overflows 64 bits
(datasketch computes ``a x`` in wrapping uint64, which is not mod p).

Two documents whose shingle sets have Jaccard similarity J agree in each signature
position with probability J, so the fraction of agreeing positions estimates J with
standard deviation sqrt(J (1 - J) / num_perm). LSH cuts the signature into ``bands``
bands of ``rows`` rows; two documents land in one bucket of a band when all its rows
agree, which happens for at least one band with probability 1 - (1 - J^rows)^bands.
"""

from __future__ import annotations

import numpy as np

from tinylm.webdata.hashing import mix64

P61 = np.uint64((1 << 61) - 1)
LOW31 = np.uint64((1 << 31) - 1)
LOW30 = np.uint64((1 << 30) - 1)
EMPTY = P61  # the signature value of a document without shingles (no hash reaches p)
CHUNK_VALUES = 1 << 18  # permutations x shingles hashed at once (2 MB per temporary)


def mod61(x: np.ndarray) -> np.ndarray:
    """``x mod (2^61 - 1)`` for uint64 ``x``."""
    x = (x & P61) + (x >> np.uint64(61))  # <= 2^61 + 6
    return np.minimum(x, x - P61)  # x - p wraps to a huge value when x < p


def mulmod61(a: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``(a * x) mod (2^61 - 1)`` exactly, for uint64 arrays below 2^61 (broadcast):
    the plain form of what ``MinHasher.permute`` does in place."""
    a_hi, a_lo = a >> np.uint64(31), a & LOW31  # a_hi < 2^30, a_lo < 2^31
    x_hi, x_lo = x >> np.uint64(31), x & LOW31
    high = a_hi * x_hi  # < 2^60; times 2^62 = 2 (mod p)
    mid = a_hi * x_lo + a_lo * x_hi  # < 2^62; times 2^31
    low = a_lo * x_lo  # < 2^62
    # mid * 2^31 = (mid >> 30) * 2^61 + (mid & (2^30 - 1)) * 2^31 = (mid >> 30) + ... (mod p)
    total = ((high << np.uint64(1)) + (mid >> np.uint64(30)) + ((mid & LOW30) << np.uint64(31))
             + (low & P61) + (low >> np.uint64(61)))  # < 2^63
    return mod61(total)


class MinHasher:
    """``num_perm`` universal hash functions mod 2^61 - 1, drawn from ``seed``."""

    def __init__(self, num_perm: int = 128, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.num_perm = num_perm
        self.a = rng.integers(1, int(P61), size=num_perm, dtype=np.uint64)
        self.b = rng.integers(0, int(P61), size=num_perm, dtype=np.uint64)

    def permute(self, x: np.ndarray) -> np.ndarray:
        """(num_perm, len(x)) uint64: every permutation of every shingle hash,
        ``(a x + b) mod p`` as ``mulmod61`` computes it, in place on two (k, m) arrays."""
        u = np.uint64
        x = mod61(np.asarray(x, dtype=np.uint64))
        x_hi, x_lo = (x >> u(31))[None, :], (x & LOW31)[None, :]
        a_hi, a_lo = (self.a >> u(31))[:, None], (self.a & LOW31)[:, None]
        mid = a_hi * x_lo
        tmp = a_lo * x_hi
        mid += tmp  # < 2^62
        total = a_hi * x_hi
        total <<= u(1)  # high * 2^62 = 2 high
        np.right_shift(mid, u(30), out=tmp)
        total += tmp
        mid &= LOW30
        mid <<= u(31)
        total += mid  # mid * 2^31, folded
        low = np.multiply(a_lo, x_lo, out=mid)  # < 2^62
        np.bitwise_and(low, P61, out=tmp)
        total += tmp
        low >>= u(61)
        total += low  # < 2^63
        for _ in range(2):  # fold to <= 2^61 + 6, add b (< 2^62 + 6), fold again
            np.bitwise_and(total, P61, out=tmp)
            total >>= u(61)
            total += tmp
            if _ == 0:
                total += self.b[:, None]
        np.subtract(total, P61, out=tmp)  # wraps when total < p
        return np.minimum(total, tmp, out=total)

    def signatures(self, shingle_sets: list) -> np.ndarray:
        """(len(shingle_sets), num_perm) uint64: each set's minimum per permutation;
        a row of ``EMPTY`` for an empty set. All the sets' shingles are hashed together
        in chunks of about CHUNK_VALUES values, each set's minimum taken with
        ``np.minimum.reduceat`` over its stretch of the chunk."""
        n, k = len(shingle_sets), self.num_perm
        sig = np.full((n, k), EMPTY, dtype=np.uint64)
        sizes = np.array([len(s) for s in shingle_sets], dtype=np.int64)
        docs = np.flatnonzero(sizes)
        if len(docs) == 0:
            return sig
        values = np.concatenate([shingle_sets[i] for i in docs]).astype(np.uint64)
        ends = np.cumsum(sizes[docs])
        starts = ends - sizes[docs]
        step = max(1, CHUNK_VALUES // k)
        for c0 in range(0, len(values), step):
            c1 = min(c0 + step, len(values))
            lo = np.searchsorted(ends, c0, side="right")  # first set ending after c0
            hi = np.searchsorted(starts, c1, side="left")  # sets starting before c1
            cuts = np.maximum(starts[lo:hi], c0) - c0
            minima = np.minimum.reduceat(self.permute(values[c0:c1]), cuts, axis=1)  # (k, m)
            rows = docs[lo:hi]
            sig[rows] = np.minimum(sig[rows], minima.T)
        return sig


def estimate_jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The fraction of signature positions where ``a`` and ``b`` agree (last axis)."""
    return np.mean(a == b, axis=-1)


def _collision_area(threshold: float, bands: np.ndarray, rows: np.ndarray) -> tuple:
    """(false-positive area, false-negative area) of the S-curve 1 - (1 - s^r)^b, below
    and above the threshold, by the trapezoid rule, for arrays of (bands, rows)."""
    s = np.linspace(0.0, 1.0, 401)[:, None]
    p = 1.0 - (1.0 - s ** rows[None, :]) ** bands[None, :]
    below, above = s[:, 0] <= threshold, s[:, 0] >= threshold
    fp = np.trapezoid(p[below], s[below, 0], axis=0)
    fn = np.trapezoid(1.0 - p[above], s[above, 0], axis=0)
    return fp, fn


def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.5) -> tuple:
    """(bands, rows), bands * rows <= num_perm, minimising the weighted areas of false
    positives and false negatives around ``threshold`` (datasketch's criterion)."""
    pairs = np.array([(b, r) for b in range(1, num_perm + 1)
                      for r in range(1, num_perm // b + 1)])
    fp, fn = _collision_area(threshold, pairs[:, 0].astype(float), pairs[:, 1].astype(float))
    best = int(np.argmin(fp_weight * fp + (1.0 - fp_weight) * fn))
    return int(pairs[best, 0]), int(pairs[best, 1])


def band_keys(sig: np.ndarray, bands: int, rows: int, first: int = 0) -> np.ndarray:
    """(n, bands) uint64: a hash of each band's ``rows`` signature values, for the bands
    ``first`` to ``first + bands - 1`` (band j reads values j * rows to (j + 1) * rows)."""
    n = sig.shape[0]
    keys = np.zeros((n, bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for out, j in enumerate(range(first, first + bands)):
            h = np.full(n, np.uint64(j) + np.uint64(0x51ED2701), dtype=np.uint64)
            for t in range(rows):  # rows is small; vectorised over documents
                h = mix64(h * np.uint64(0x9E3779B97F4A7C15) + sig[:, j * rows + t])
            keys[:, out] = h
    return keys


def bucket_pairs(keys: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(m, 2) int64 pairs within the buckets of one band (``keys`` of documents ``ids``):
    each member with the bucket's first member and with its neighbour in sorted order,
    so a bucket of s documents gives at most 2(s-1) pairs, not s(s-1)/2, and each
    bucket stays connected."""
    order = np.argsort(keys, kind="stable")
    k, members = keys[order], ids[order]
    same = np.concatenate(([False], k[1:] == k[:-1]))
    run_start = np.maximum.accumulate(np.where(same, 0, np.arange(len(k))))
    at = np.flatnonzero(same)
    first = np.stack([members[run_start[at]], members[at]], axis=1)
    neighbour = np.stack([members[at - 1], members[at]], axis=1)
    return np.concatenate([first, neighbour]).astype(np.int64)


def candidate_pairs(keys: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """(m, 2) distinct pairs (i < j) of documents that share a bucket in some band;
    ``valid`` (n,) bool leaves documents out."""
    n = keys.shape[0]
    ids = np.arange(n) if valid is None else np.flatnonzero(valid)
    found = [bucket_pairs(keys[ids, j], ids) for j in range(keys.shape[1])]
    pairs = np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)
    pairs = np.sort(pairs, axis=1)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    return np.unique(pairs, axis=0)


def first_of_components(n: int, pairs: np.ndarray) -> np.ndarray:
    """(n,) int64: the smallest document index in each document's connected component
    of the graph ``pairs`` (union-find by hooking roots to the smaller root, with
    pointer jumping, each round vectorised over all edges)."""
    parent = np.arange(n, dtype=np.int64)
    if len(pairs) == 0:
        return parent
    u, v = pairs[:, 0], pairs[:, 1]
    while True:
        ru, rv = parent[u], parent[v]
        differ = ru != rv
        if not differ.any():
            return parent
        lo, hi = np.minimum(ru[differ], rv[differ]), np.maximum(ru[differ], rv[differ])
        np.minimum.at(parent, hi, lo)  # roots hook to a smaller root: no cycles
        while True:  # pointer jumping: every node points at its root
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped

"""``tinylm data dedup``'s pass 2, the index, in bounded memory: which documents are
exact and near duplicates of which, from the signature files pass 1 wrote.

    decisions = find_duplicates(shards, counts, config, work_dir, memory_bytes=16 << 20)
    kind, of, jaccard = decisions.shard(start, count)   # one shard's slice, for pass 3

- exact: ``external.first_occurrences`` over the exact keys (partitioned on disk): a
  document whose key came earlier is an exact duplicate of the first one; the answer is
  a file of one int64 per document (``exact.first.i64``), read a shard's slice at a time.
- near: each band's key of every document still kept (and with shingles) goes, with the
  document's index, into partition files by a hash of the key, so a bucket lies in one
  partition; each partition in turn gives its buckets' pairs (``bucket_pairs``: each
  member with the bucket's first and with its neighbour), exactly those that sorting the
  whole band at once gives. Pairs whose estimated Jaccard reaches ``threshold`` are
  kept; union-find runs over the documents in those pairs only.

Memory: about ``memory_bytes`` for the partitions and chunks, plus what grows with the
duplicates found (the candidate pairs, 16 bytes each, and the near duplicates' indices),
not with the number of documents. Signatures are read in chunks (``np.fromfile``) and
the rows of candidate pairs through a memory map opened per chunk of pairs, so no page
of a signature file stays mapped.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from tinylm.webdata import external as ext
from tinylm.webdata.minhash import (EMPTY, band_keys, bucket_pairs, estimate_jaccard,
                                    first_of_components)
from tinylm.webdata.readers import WebDataError

KEEP, EXACT, NEAR = 0, 1, 2
PAIR_CHUNK = 1 << 10  # candidate pairs whose signatures are read and compared at once


class SignatureFiles:
    """The shards' ``(n, num_perm)`` uint64 signature files, by global document index."""

    def __init__(self, shards, counts, num_perm: int):
        self.paths = [s.work_file(".minhash.u64") for s in shards]
        self.counts = [int(c) for c in counts]
        self.offsets = np.concatenate(([0], np.cumsum(self.counts))).astype(np.int64)
        self.num_perm = num_perm

    def chunks(self, rows: int):
        """(first global index, (m, num_perm) uint64 signatures), ``rows`` at a time."""
        width = 8 * self.num_perm
        for s, (path, n) in enumerate(zip(self.paths, self.counts)):
            for start in range(0, n, rows):
                m = min(rows, n - start)
                sig = np.fromfile(path, dtype="<u8", count=m * self.num_perm,
                                  offset=start * width).reshape(m, self.num_perm)
                yield int(self.offsets[s]) + start, sig.astype(np.uint64, copy=False)

    def rows(self, index: np.ndarray) -> np.ndarray:
        """(len(index), num_perm) uint64: those documents' signatures."""
        out = np.empty((len(index), self.num_perm), dtype=np.uint64)
        shard = np.searchsorted(self.offsets, index, side="right") - 1
        for s in np.unique(shard):
            at = shard == s
            mapped = np.memmap(self.paths[s], dtype="<u8", mode="r",
                               shape=(self.counts[s], self.num_perm))
            out[at] = mapped[index[at] - self.offsets[s]]
            del mapped  # unmapped: its pages leave this process
        return out


@dataclasses.dataclass
class Decisions:
    """Pass 2's answer: exact firsts on disk, near duplicates as sorted arrays."""

    first_path: str | None  # (N,) int64 exact.first.i64, or None without exact dedup
    near_index: np.ndarray  # sorted global indices of the near duplicates
    near_of: np.ndarray  # the kept document each duplicates
    near_jaccard: np.ndarray  # float32 estimate against it
    stats: dict

    def shard(self, start: int, count: int) -> tuple:
        """(kind int8, of int64, jaccard float32) of documents start .. start+count-1."""
        index = np.arange(start, start + count, dtype=np.int64)
        kind, of = np.zeros(count, dtype=np.int8), index.copy()
        jaccard = np.ones(count, dtype=np.float32)
        if self.first_path is not None and count:
            first = np.fromfile(self.first_path, dtype="<i8", count=count, offset=8 * start)
            dup = first != index
            kind[dup], of[dup] = EXACT, first[dup]
        lo, hi = np.searchsorted(self.near_index, [start, start + count])
        at = self.near_index[lo:hi] - start
        kind[at], of[at], jaccard[at] = NEAR, self.near_of[lo:hi], self.near_jaccard[lo:hi]
        return kind, of, jaccard

    def targets(self, n: int, chunk: int) -> np.ndarray:
        """The distinct documents that dropped ones duplicate (for their ids)."""
        found = [self.near_of]
        if self.first_path is not None:
            for start in range(0, n, chunk):
                first = np.fromfile(self.first_path, dtype="<i8",
                                    count=min(chunk, n - start), offset=8 * start)
                found.append(np.unique(first[first != np.arange(start, start + len(first))]))
        return np.unique(np.concatenate(found))


def _exact_firsts(shards, n: int, work: str, memory_bytes: int) -> str:
    paths = [s.work_file(".exact.u64") for s in shards]
    if sum(os.path.getsize(p) for p in paths) != 8 * n:
        raise WebDataError("the signature files do not match their markers; delete the "
                           "output folder's .dedup and run again")
    out = os.path.join(work, "exact.first.i64")
    ext.first_occurrences(paths, out, os.path.join(work, "exact.tmp"), memory_bytes)
    return out


def _band_pairs(store, first_path, bands: int, rows: int, work: str, memory: int):
    """(m, 2) distinct pairs (i < j) sharing a bucket in some band, among documents that
    are not exact duplicates and have shingles (see the module docstring)."""
    n = int(store.offsets[-1])
    count = ext.partition_count(n, memory)
    group = max(1, ext.MAX_PARTITIONS // count)  # bands partitioned per read of the files
    chunk = max(1, memory // (8 * (3 * store.num_perm + 4 * bands)))
    found = []
    for b0 in range(0, bands, group):
        b1 = min(bands, b0 + group)
        files = (b1 - b0) * count
        parts = ext.Partitions(os.path.join(work, "bands.tmp"), "band", files, ext.ENTRY,
                               ext.buffer_bytes(files, memory))
        try:
            for start, sig in store.chunks(chunk):
                index = np.arange(start, start + len(sig), dtype=np.int64)
                valid = sig[:, 0] != EMPTY  # an EMPTY first value: no shingles
                if first_path is not None:
                    valid &= np.fromfile(first_path, dtype="<i8", count=len(sig),
                                         offset=8 * start) == index
                keys = band_keys(sig[valid], b1 - b0, rows, first=b0)
                entries = np.empty(int(valid.sum()), dtype=ext.ENTRY)
                entries["index"] = index[valid]
                for j in range(b1 - b0):
                    entries["key"] = keys[:, j]
                    parts.add(ext.part_of(keys[:, j], count) + j * count, entries)
            parts.close()
            for p in range(parts.count):
                entries = parts.read(p)
                found.append(bucket_pairs(entries["key"], entries["index"]))
                os.remove(parts.paths[p])
        finally:
            parts.remove()
    pairs = np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)
    pairs = np.sort(pairs, axis=1)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    return np.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2)


def _verified(store, pairs: np.ndarray, threshold: float) -> np.ndarray:
    kept = [pairs[:0]]
    for c in range(0, len(pairs), PAIR_CHUNK):
        chunk = pairs[c:c + PAIR_CHUNK]
        similar = estimate_jaccard(store.rows(chunk[:, 0]), store.rows(chunk[:, 1]))
        kept.append(chunk[similar >= threshold])
    return np.concatenate(kept)


def _near(store, pairs: np.ndarray, threshold: float) -> tuple:
    """(near indices, their kept document, jaccard), stats: union-find over the verified
    pairs' documents only (sorted, so the smallest local index is the smallest global)."""
    verified = _verified(store, pairs, threshold)
    nodes = np.unique(verified)
    rep = nodes[first_of_components(len(nodes), np.searchsorted(nodes, verified))]
    near = rep != nodes
    index, of = nodes[near], rep[near]
    jaccard = np.ones(len(index), dtype=np.float32)
    for c in range(0, len(index), PAIR_CHUNK):
        part = slice(c, c + PAIR_CHUNK)
        jaccard[part] = estimate_jaccard(store.rows(index[part]), store.rows(of[part]))
    stats = {"candidate_pairs": int(len(pairs)), "verified_pairs": int(len(verified)),
             "clusters": int(len(np.unique(of)))}
    return index, of, jaccard, stats


def find_duplicates(shards, counts, config, work: str, memory_bytes: int) -> Decisions:
    """Pass 2 (see the module docstring)."""
    n = int(sum(counts))
    first_path = _exact_firsts(shards, n, work, memory_bytes) if config.exact else None
    empty = np.zeros(0, dtype=np.int64)
    decisions = Decisions(first_path, empty, empty, np.zeros(0, dtype=np.float32),
                          {"candidate_pairs": 0, "verified_pairs": 0, "clusters": 0})
    if config.near and n:
        bands, rows = config.layout()
        store = SignatureFiles(shards, counts, config.num_perm)
        pairs = _band_pairs(store, first_path, bands, rows, work, memory_bytes)
        index, of, jaccard, stats = _near(store, pairs, config.threshold)
        decisions.near_index, decisions.near_of, decisions.near_jaccard = index, of, jaccard
        decisions.stats = {**stats, "bands": bands, "rows": rows}
    return decisions

"""``tinylm data dedup``: exact and near-duplicate documents removed across a corpus,
the first document (in reading order) of each group kept.

    totals = dedup_corpus(["cleaned/"], "deduped/", DedupConfig(threshold=0.8))
    totals["exact_duplicates"], totals["near_duplicates"], totals["documents_out"]

Three passes, the first and last per shard and resumable:

1. signatures: each document's text is normalised (``hashing.normalize``: NFKC,
   lowercased, whitespace collapsed); its BLAKE2b-64 is the exact key, and its shingles
   (``shingle_size`` words or characters) give a MinHash signature of ``num_perm``
   values. Written to ``deduped/.dedup/<stem>.exact.u64`` ((n,) uint64),
   ``<stem>.minhash.u64`` ((n, num_perm) uint64, row-major) and ``<stem>.ids.txt`` (the
   document ids), then the marker ``<stem>.signatures.json``.
2. index, on disk in bounded memory (``dedup_index``): a document whose exact key came
   earlier is an exact duplicate of that first one (``.dedup/exact.first.i64``, one
   int64 per document). The others' signatures, read in chunks, are cut into ``bands``
   x ``rows``; documents sharing a band's bucket are candidates (buckets found through
   hash-partitioned files), kept as a pair when their estimated Jaccard similarity is at
   least ``threshold``; union-find over the kept pairs makes clusters and each
   cluster's first document stays. Memory: about ``memory_bytes`` (``--memory-mb``)
   plus 16 bytes per candidate pair, not growing with the number of documents.
3. write: each shard's kept documents to ``deduped/<stem>.jsonl.gz`` and what was
   dropped to ``deduped/.dedup/<stem>.duplicates.jsonl`` (``{"id", "duplicate_of",
   "kind": "exact" | "near", "jaccard"}``: the estimate against the kept document).
   These depend on the whole corpus, so their markers carry the corpus's fingerprint.

Totals (and per-pass seconds, documents/s) go to ``deduped/dedup.stats.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time

import numpy as np

from tinylm.atomic import atomic_open
from tinylm.webdata import shards as sh
from tinylm.webdata.hashing import NGRAM_MULTIPLIERS, char_shingles, normalize, text_hash64, word_shingles
from tinylm.webdata.dedup_index import EXACT, KEEP, NEAR, find_duplicates
from tinylm.webdata.minhash import MinHasher, optimal_bands
from tinylm.webdata.readers import ReadStats, WebDataError, expand_inputs, read_documents

FORMAT_VERSION = 1
KINDS = {EXACT: "exact", NEAR: "near"}
MEMORY_BYTES = 16 << 20  # the index's default budget (dedup_index)


@dataclasses.dataclass
class DedupConfig:
    """What counts as a duplicate (see the module docstring)."""

    exact: bool = True
    near: bool = True
    shingle: str = "word"  # "word" or "char"
    shingle_size: int = 5
    num_perm: int = 128
    bands: int | None = None  # with rows: the LSH layout; None: chosen for threshold
    rows: int | None = None
    threshold: float = 0.8
    seed: int = 1

    def layout(self) -> tuple:
        """(bands, rows), bands x rows <= num_perm: as given, the missing one filled in
        as num_perm // the other, or ``optimal_bands(threshold, num_perm)``."""
        if self.shingle not in ("word", "char"):
            raise WebDataError(f"shingle must be 'word' or 'char', not {self.shingle!r}")
        if self.shingle == "word" and not 1 <= self.shingle_size <= len(NGRAM_MULTIPLIERS):
            raise WebDataError(f"word shingles are 1 to {len(NGRAM_MULTIPLIERS)} words, not "
                               f"{self.shingle_size}; pick --shingle-size in that range")
        bands, rows = self.bands, self.rows
        if bands is None and rows is None:
            return optimal_bands(self.threshold, self.num_perm)
        bands = bands or self.num_perm // rows
        rows = rows or self.num_perm // bands
        if bands < 1 or rows < 1 or bands * rows > self.num_perm:
            raise WebDataError(f"bands x rows ({bands} x {rows}) must be at least 1 and at "
                               f"most --num-perm ({self.num_perm}); lower one of them")
        return bands, rows


def shingles(text: str, config: DedupConfig) -> np.ndarray:
    """The distinct shingle hashes of normalised ``text``, (m,) uint64."""
    make = word_shingles if config.shingle == "word" else char_shingles
    return np.unique(make(text, config.shingle_size))


# ------------------------------------------------------------------ 1 signatures


def sign_shard(shard, config: DedupConfig, hasher, read_options: dict, bar) -> dict:
    """Pass 1 for one input file: its exact keys, signatures and ids (see above)."""
    read, count = ReadStats(shard.input), 0
    with contextlib.ExitStack() as stack:
        exact_f = stack.enter_context(atomic_open(shard.work_file(".exact.u64"), "wb"))
        sig_f = stack.enter_context(atomic_open(shard.work_file(".minhash.u64"), "wb"))
        ids_f = stack.enter_context(atomic_open(shard.work_file(".ids.txt"), "w"))
        batch_keys, batch_sets, batch_ids = [], [], []

        def flush():
            exact_f.write(np.array(batch_keys, dtype="<u8").tobytes())
            if config.near:
                sig_f.write(hasher.signatures(batch_sets).astype("<u8").tobytes())
            ids_f.write("".join(i.replace("\n", " ") + "\n" for i in batch_ids))
            bar.update(len(batch_keys))
            batch_keys.clear(), batch_sets.clear(), batch_ids.clear()

        for doc in read_documents(shard.input, stats=read, **read_options):
            text = normalize(doc.text)
            batch_keys.append(text_hash64(text))
            if config.near:
                batch_sets.append(shingles(text, config))
            batch_ids.append(doc.id)
            count += 1
            if len(batch_keys) >= 256:
                flush()
        flush()
    return {"documents": count, "read": read.to_dict()}


def _signature_key(config: DedupConfig, read_options: dict) -> str:
    fields = {k: getattr(config, k) for k in ("near", "shingle", "shingle_size", "num_perm",
                                              "seed")}
    return sh.options_key({"version": FORMAT_VERSION, "signatures": fields,
                           "read": read_options})


# ----------------------------------------------------------------------- 2 index
# (dedup_index: on disk, in bounded memory)


# ----------------------------------------------------------------------- 3 write


def _ids_of(shards, offsets, wanted: np.ndarray) -> dict:
    """{global index: document id} for the ``wanted`` indices, read from the ids files."""
    found, wanted = {}, np.unique(wanted)
    shard_of = np.searchsorted(offsets, wanted, side="right") - 1
    for s in np.unique(shard_of):
        local = set((wanted[shard_of == s] - offsets[s]).tolist())
        with open(shards[s].work_file(".ids.txt"), encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i in local:
                    found[int(offsets[s]) + i] = line.rstrip("\n")
    return found


def write_shard(shard, start: int, count: int, decisions, ids: dict, read_options: dict,
                bar) -> dict:
    """Pass 3 for one shard: kept documents out, dropped ones listed; statistics."""
    kind, of, jaccard = decisions.shard(start, count)
    counts = {"documents_in": 0, "documents_out": 0, "exact_duplicates": 0,
              "near_duplicates": 0}
    with sh.jsonl_writer(shard.output) as out, \
            atomic_open(shard.work_file(".duplicates.jsonl"), "w") as dropped:
        for i, doc in enumerate(read_documents(shard.input, **read_options)):
            if i >= count:
                counts["documents_in"] += 1  # more than when signed: _check_count says so
                break
            counts["documents_in"] += 1
            if kind[i] == KEEP:
                out.write(doc.to_record())
                counts["documents_out"] += 1
            else:
                counts[f"{KINDS[kind[i]]}_duplicates"] += 1
                dropped.write(json.dumps({"id": doc.id, "duplicate_of": ids.get(int(of[i])),
                                          "kind": KINDS[kind[i]],
                                          "jaccard": round(float(jaccard[i]), 4)}) + "\n")
            if i % 256 == 255:
                bar.update(256)
        bar.update(counts["documents_in"] % 256)
    return counts


def _check_count(shard, expected: int, got: int) -> None:
    if got != expected:
        raise WebDataError(f"{shard.input} gave {got} documents now and {expected} when "
                           f"signed; it changed during the run: run dedup again")


# ---------------------------------------------------------------------- the run


def _sign_all(shards, config, read_options, show_progress, totals) -> list:
    """Pass 1 over every shard not already signed; the shards' document counts."""
    key = _signature_key(config, read_options)
    hasher = MinHasher(config.num_perm, config.seed) if config.near else None
    counts, start, signed = [], time.perf_counter(), 0
    with sh.progress(show_progress, "dedup: signatures") as bar:
        for shard in shards:
            marker_path = shard.work_file(".signatures.json")
            marker = _read_json(marker_path)
            if (marker and marker.get("key") == key
                    and marker.get("input") == sh.fingerprint(shard.input)):
                totals["shards_skipped"]["signatures"] += 1
            else:
                meta = sign_shard(shard, config, hasher, read_options, bar)
                marker = {"input": sh.fingerprint(shard.input), "key": key, **meta}
                sh.write_json(marker_path, marker)
                signed += marker["documents"]
            counts.append(marker["documents"])
            totals["files"].append(marker["read"])
    _timing(totals, "signatures", start, signed)
    return counts


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _timing(totals: dict, stage: str, start: float, documents: int) -> None:
    elapsed = time.perf_counter() - start
    totals["seconds"][stage] = round(elapsed, 3)
    totals["documents_per_s"][stage] = round(documents / elapsed, 1) if elapsed else 0.0


def dedup_corpus(inputs, out_dir: str, config: DedupConfig | None = None, *,
                 read_options: dict | None = None, compression: str = "gz",
                 show_progress: bool = True, memory_bytes: int = MEMORY_BYTES) -> dict:
    """Deduplicate every file ``expand_inputs(inputs)`` names into ``out_dir`` (see the
    module docstring); returns the totals also written to ``out_dir/dedup.stats.json``.
    ``memory_bytes``: the index's budget (pass 2); it changes no result."""
    config = config or DedupConfig()
    bands_rows = config.layout() if config.near else (0, 0)
    read_options = dict(read_options or {})
    files = expand_inputs(inputs)
    sh.make_folder(out_dir)
    shards = sh.plan(files, out_dir, "dedup", compression)
    totals = {"documents_in": 0, "documents_out": 0, "exact_duplicates": 0,
              "near_duplicates": 0, "config": dataclasses.asdict(config),
              "bands": bands_rows[0], "rows": bands_rows[1], "files": [],
              "shards_skipped": {"signatures": 0, "write": 0}, "seconds": {},
              "documents_per_s": {}}
    counts = _sign_all(shards, config, read_options, show_progress, totals)
    start = time.perf_counter()
    work = os.path.join(out_dir, ".dedup")
    decisions = find_duplicates(shards, counts, config, work, memory_bytes)
    totals.update(decisions.stats)
    n = int(sum(counts))
    totals["memory_budget_bytes"] = int(memory_bytes)
    totals["signature_bytes"] = n * 8 * (config.num_perm if config.near else 0)
    _timing(totals, "index", start, n)
    corpus = [sh.fingerprint(s.input) for s in shards]
    key = sh.options_key({"version": FORMAT_VERSION, "config": dataclasses.asdict(config),
                          "read": read_options, "compression": compression,
                          "corpus": corpus})
    offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    targets = decisions.targets(n, max(1, memory_bytes // 32))
    ids = _ids_of(shards, offsets, targets) if len(targets) else {}
    start, written = time.perf_counter(), 0
    with sh.progress(show_progress, "dedup: write") as bar:
        for s, shard in enumerate(shards):
            marker = sh.finished(shard, key)
            if marker is not None:
                stats = marker["stats"]
                totals["shards_skipped"]["write"] += 1
            else:
                stats = write_shard(shard, int(offsets[s]), counts[s], decisions, ids,
                                    read_options, bar)
                _check_count(shard, counts[s], stats["documents_in"])
                sh.mark_finished(shard, key, stats)
                written += stats["documents_in"]
            for field in ("documents_in", "documents_out", "exact_duplicates",
                          "near_duplicates"):
                totals[field] += stats[field]
    _timing(totals, "write", start, written)
    sh.write_json(sh.stats_path(out_dir, "dedup"), totals)
    return totals

"""The per-shard passes of ``tinylm data clean`` (``clean.clean_corpus`` runs them).

Without span dedup, one pass: ``filter_to_output`` reads a shard, runs the per-page
steps and writes the pages left. With C4's three-sentence-span dedup the answer for a
page depends on every span before it in the corpus, and the set of spans grows with the
corpus, so it is found on disk, in bounded memory, in three steps:

1. ``filter_to_pages`` (per shard, resumable): the per-page steps, then each page left
   to ``.clean/<stem>.pages.jsonl`` (``{"meta", "lines", "windows"}``) and its span
   windows' hashes (``SpanDedup._windows``; a hash of 0 stored as 1, as ``HashSet64``
   does) to ``.clean/<stem>.spans.u64``, raw little-endian uint64 in reading order;
   marker ``.clean/<stem>.filtered.json``.
2. ``external.first_occurrences`` over the shards' span files in order gives
   ``.clean/spans.first.i64``: a window whose first occurrence is an earlier one is a
   repeat, exactly as the in-memory ``HashSet64.add_first`` over the same order says.
3. ``pages_to_output`` (per shard): each page without its repeated windows'
   sentences (``SpanDedup.remove``), to the output shard; the pages file is deleted.

Memory: the budget of step 2, a chunk of flags and one page at a time; not the corpus.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from tinylm.atomic import atomic_open
from tinylm.webdata import shards as sh
from tinylm.webdata.filters import page_lines
from tinylm.webdata.readers import Document, ReadStats, read_documents

FLAG_CHUNK = 1 << 16  # span flags read at once
BAR_EVERY = 256  # documents between progress-bar updates


def empty_stats() -> dict:
    return {"documents_in": 0, "lines_in": 0, "chars_in": 0, "empty_documents": 0,
            "documents_out": 0, "lines_out": 0, "chars_out": 0}


def _filtered(shard, pipeline, read_options: dict, stats: dict, read: ReadStats, bar):
    """(doc, lines) for each page the per-page steps leave; counts what came in."""
    pipeline.reset_counts()
    for doc in read_documents(shard.input, stats=read, **read_options):
        lines = page_lines(doc.text)
        stats["documents_in"] += 1
        stats["lines_in"] += len(lines)
        stats["chars_in"] += sum(map(len, lines))
        if stats["documents_in"] % BAR_EVERY == 0:
            bar.update(BAR_EVERY)
        if not lines:
            stats["empty_documents"] += 1
            continue
        kept = pipeline.page(lines)
        if kept:
            yield doc, kept
    bar.update(stats["documents_in"] % BAR_EVERY)


def _count_out(stats: dict, kept: list) -> None:
    stats["documents_out"] += 1
    stats["lines_out"] += len(kept)
    stats["chars_out"] += sum(map(len, kept))


def _finish(stats: dict, pipeline, read: ReadStats) -> dict:
    stats["removed"] = {name: dataclasses.asdict(r) for name, r in pipeline.removed.items()}
    stats["read"] = read.to_dict()
    return stats


def filter_to_output(shard, pipeline, read_options: dict, bar) -> dict:
    """The one pass without span dedup: ``shard.input`` -> ``shard.output``."""
    stats, read = empty_stats(), ReadStats(shard.input)
    with sh.jsonl_writer(shard.output) as out:
        for doc, kept in _filtered(shard, pipeline, read_options, stats, read, bar):
            doc.text = "\n".join(kept)
            out.write(doc.to_record())
            _count_out(stats, kept)
    return _finish(stats, pipeline, read)


def filter_to_pages(shard, pipeline, read_options: dict, bar) -> dict:
    """Step 1 for one shard (see the module docstring); its statistics so far, with
    ``windows``, the number of span hashes written."""
    stats, read = empty_stats(), ReadStats(shard.input)
    windows = 0
    with atomic_open(shard.work_file(".pages.jsonl"), "wb") as pages, \
            atomic_open(shard.work_file(".spans.u64"), "wb") as spans:
        lines_out, hashes = [], []

        def flush():
            pages.write(b"".join(lines_out))
            keys = np.array(hashes, dtype=np.uint64)
            spans.write(np.where(keys == 0, np.uint64(1), keys).astype("<u8").tobytes())
            lines_out.clear(), hashes.clear()

        for doc, kept in _filtered(shard, pipeline, read_options, stats, read, bar):
            found, _ = pipeline.span._windows(kept)
            hashes.extend(w[3] for w in found)
            windows += len(found)
            record = {"meta": doc.meta, "lines": kept, "windows": len(found)}
            lines_out.append(json.dumps(record, ensure_ascii=False)
                             .encode("utf-8", "surrogatepass") + b"\n")
            if len(lines_out) >= BAR_EVERY:
                flush()
        flush()
    stats["windows"] = windows
    return _finish(stats, pipeline, read)


class _Flags:
    """The repeat flags of one shard's windows, read from the first-occurrence file a
    chunk at a time: ``take(k)`` gives the next k."""

    def __init__(self, path: str, start: int, count: int):
        self.path, self.at, self.end = path, start, start + count
        self.buffer = np.zeros(0, dtype=bool)

    def take(self, k: int) -> np.ndarray:
        while len(self.buffer) < k:
            m = min(max(FLAG_CHUNK, k), self.end - self.at)
            first = np.fromfile(self.path, dtype="<i8", count=m, offset=8 * self.at)
            repeat = first != np.arange(self.at, self.at + m)
            self.buffer, self.at = np.concatenate([self.buffer, repeat]), self.at + m
        taken, self.buffer = self.buffer[:k], self.buffer[k:]
        return taken


def pages_to_output(shard, pipeline, flags_path: str, start: int, filtered: dict,
                    bar) -> dict:
    """Step 3 for one shard: its pages without repeated spans -> ``shard.output``;
    the shard's statistics (``filtered``: step 1's) with the span step's and
    ``span_hashes``, the distinct spans the shard added."""
    stats = {**filtered, **{k: 0 for k in ("documents_out", "lines_out", "chars_out")}}
    pipeline.reset_counts()
    removed = pipeline.removed[pipeline.span.name]
    flags = _Flags(flags_path, start, filtered["windows"])
    repeats = 0
    pages_path = shard.work_file(".pages.jsonl")
    with sh.jsonl_writer(shard.output) as out, open(pages_path, "rb") as pages:
        for line in pages:
            page = json.loads(line.decode("utf-8", "surrogatepass"))
            lines, repeat = page["lines"], flags.take(page["windows"])
            repeats += int(repeat.sum())
            kept = pipeline.span.remove(lines, repeat)
            if kept is not lines:
                pipeline._count(pipeline.span.name, lines, kept)
            if kept:
                out.write(Document("\n".join(kept), page["meta"]).to_record())
                _count_out(stats, kept)
    bar.update(filtered["documents_in"])
    stats["removed"] = {**filtered["removed"], pipeline.span.name: dataclasses.asdict(removed)}
    stats["span_hashes"] = filtered["windows"] - repeats
    os.remove(pages_path)
    return stats

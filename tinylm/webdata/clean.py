"""``tinylm data clean``: every input shard through the filter pipeline, one output
shard each, resumable, with statistics of what each filter removed.

    totals = clean_corpus(["c4/"], "cleaned/", CleanConfig(bad_words="words.txt"))
    totals["removed"]["c4_terminal_punct"]    # {"documents": ..., "lines": ..., "chars": ...}

Output (``shards``): ``cleaned/<stem>.jsonl.gz`` (documents kept: "text" and the input
record's other fields), ``cleaned/.clean/<stem>.json`` (done-marker with the shard's
statistics), ``cleaned/.clean/<stem>.spans.u64`` (the span hashes the shard added, raw
little-endian uint64: what a resumed run reloads), ``cleaned/clean.stats.json`` (totals).

Span deduplication makes a shard depend on the ones before it, so with it a rerun
skips finished shards only up to the first one that is not finished (or whose input or
options changed) and redoes every shard after; without it each shard stands alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time

import numpy as np

from tinylm.atomic import write_atomic
from tinylm.webdata import shards as sh
from tinylm.webdata.filters import CleanConfig, Removed, build_pipeline, page_lines
from tinylm.webdata.readers import ReadStats, WebDataError, expand_inputs, read_documents

FORMAT_VERSION = 1


def _options(config: CleanConfig, read_options: dict, compression: str) -> dict:
    options = {"version": FORMAT_VERSION, "config": dataclasses.asdict(config),
               "read": read_options, "compression": compression}
    if config.bad_words:
        try:
            with open(config.bad_words, "rb") as f:
                options["bad_words_sha256"] = hashlib.sha256(f.read()).hexdigest()
        except OSError as e:
            raise WebDataError(f"cannot read the word list {config.bad_words}: "
                               f"{e.strerror or e}; check the path") from None
    return options


def _empty_stats() -> dict:
    return {"documents_in": 0, "lines_in": 0, "chars_in": 0, "empty_documents": 0,
            "documents_out": 0, "lines_out": 0, "chars_out": 0}


def clean_shard(shard, pipeline, read_options: dict, batch_size: int, bar) -> dict:
    """Clean one input file into ``shard.output``; its statistics."""
    stats, read = _empty_stats(), ReadStats(shard.input)
    pipeline.removed = {name: Removed() for name in pipeline.removed}

    def flush(batch, out):
        for (doc, _), kept in zip(batch, pipeline.run([lines for _, lines in batch])):
            if kept:
                doc.text = "\n".join(kept)
                out.write(doc.to_record())
                stats["documents_out"] += 1
                stats["lines_out"] += len(kept)
                stats["chars_out"] += sum(map(len, kept))
        bar.update(len(batch))

    with sh.jsonl_writer(shard.output) as out:
        batch = []
        for doc in read_documents(shard.input, stats=read, **read_options):
            lines = page_lines(doc.text)
            stats["documents_in"] += 1
            stats["lines_in"] += len(lines)
            stats["chars_in"] += sum(map(len, lines))
            if not lines:
                stats["empty_documents"] += 1
                continue
            batch.append((doc, lines))
            if len(batch) >= batch_size:
                flush(batch, out)
                batch = []
        flush(batch, out)
    stats["removed"] = {name: dataclasses.asdict(r) for name, r in pipeline.removed.items()}
    stats["read"] = read.to_dict()
    return stats


def _add(totals: dict, stats: dict) -> None:
    for key, value in stats.items():
        if key == "removed":
            for name, r in value.items():
                into = totals["removed"].setdefault(name, {"documents": 0, "lines": 0,
                                                           "chars": 0})
                for field in into:
                    into[field] += r[field]
        elif key == "read":
            totals["files"].append(value)
        else:
            totals[key] = totals.get(key, 0) + value


def clean_corpus(inputs, out_dir: str, config: CleanConfig | None = None, *,
                 read_options: dict | None = None, compression: str = "gz",
                 batch_size: int = 256, show_progress: bool = True) -> dict:
    """Clean every file ``expand_inputs(inputs)`` names into ``out_dir`` (see the module
    docstring); returns the totals also written to ``out_dir/clean.stats.json``.
    ``read_options`` go to ``read_documents`` (format, text_field, text_unit)."""
    config = config or CleanConfig()
    read_options = dict(read_options or {})
    files = expand_inputs(inputs)
    os.makedirs(out_dir, exist_ok=True)
    shards = sh.plan(files, out_dir, "clean", compression)
    pipeline = build_pipeline(config)
    key = sh.options_key(_options(config, read_options, compression))
    totals = {**_empty_stats(), "removed": {}, "files": [], "shards_done": 0,
              "shards_skipped": 0, "filters": config.names()}
    start, trusting, processed = time.perf_counter(), True, 0
    with sh.progress(show_progress, "clean") as bar:
        for shard in shards:
            marker = sh.finished(shard, key) if trusting else None
            if marker is not None:
                if pipeline.span is not None:
                    saved = np.fromfile(shard.work_file(".spans.u64"), dtype="<u8")
                    pipeline.span.seen.add(saved.astype(np.uint64))
                _add(totals, marker["stats"])
                totals["shards_skipped"] += 1
                continue
            trusting = pipeline.span is None  # later shards depend on this one's spans
            stats = clean_shard(shard, pipeline, read_options, batch_size, bar)
            if pipeline.span is not None:
                write_atomic(shard.work_file(".spans.u64"),
                             pipeline.span.take_new().astype("<u8").tobytes())
            sh.mark_finished(shard, key, stats)
            _add(totals, stats)
            totals["shards_done"] += 1
            processed += stats["documents_in"]
    elapsed = time.perf_counter() - start
    totals["seconds"] = round(elapsed, 3)
    totals["documents_per_s"] = round(processed / elapsed, 1) if elapsed else 0.0  # this run
    if pipeline.span is not None:
        totals["span_hashes"] = len(pipeline.span.seen)
        totals["span_hashset_bytes"] = pipeline.span.seen.nbytes
    sh.write_json(sh.stats_path(out_dir, "clean"), totals)
    return totals

"""``tinylm data clean``: every input shard through the filter pipeline, one output
shard each, resumable, with statistics of what each filter removed.

    totals = clean_corpus(["c4/"], "cleaned/", CleanConfig(bad_words="words.txt"))
    totals["removed"]["c4_terminal_punct"]    # {"documents": ..., "lines": ..., "chars": ...}

Output (``shards``): ``cleaned/<stem>.jsonl.gz`` (documents kept: "text" and the input
record's other fields), ``cleaned/.clean/<stem>.json`` (done-marker with the shard's
statistics), ``cleaned/clean.stats.json`` (totals).

Span deduplication makes a shard depend on the ones before it: it runs in the steps
``clean_passes`` describes (pages and span hashes to disk, the repeats found there in
about ``memory_bytes`` (``--memory-mb``), whatever the corpus's size, then the output),
and a shard's marker carries the fingerprints of its input and every input before it,
so a rerun redoes a shard when it or an earlier one changed. ``.clean/<stem>.spans.u64``
(the shard's span hashes, raw little-endian uint64) and ``<stem>.filtered.json`` stay,
so a rerun does not filter the unchanged shards again. Without span dedup each shard
stands alone, in one pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import numpy as np

from tinylm.webdata import clean_passes as passes
from tinylm.webdata import shards as sh
from tinylm.webdata.external import first_occurrences
from tinylm.webdata.filters import CleanConfig, build_pipeline
from tinylm.webdata.readers import WebDataError, expand_inputs

FORMAT_VERSION = 2
MEMORY_BYTES = 16 << 20  # span dedup's default budget (external.first_occurrences)


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


def clean_shard(shard, pipeline, read_options: dict, bar, spans=None) -> dict:
    """Write one output shard; its statistics. Without span dedup from the input
    (``spans`` None); with it from the shard's filtered pages and ``spans``: (the
    first-occurrence file, the shard's first window, its step-1 statistics)."""
    if spans is None:
        return passes.filter_to_output(shard, pipeline, read_options, bar)
    return passes.pages_to_output(shard, pipeline, *spans, bar)


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


def _filtered_marker(shard, key: str, need_pages: bool):
    """Step 1's marker of ``shard`` if its files are there for this input and ``key``."""
    try:
        with open(shard.work_file(".filtered.json"), encoding="utf-8") as f:
            marker = json.load(f)
        windows = marker["stats"]["windows"]
        if (marker.get("key") != key or marker.get("input") != sh.fingerprint(shard.input)
                or os.path.getsize(shard.work_file(".spans.u64")) != 8 * windows
                or (need_pages and not os.path.exists(shard.work_file(".pages.jsonl")))):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return marker


def _filter_all(shards, pipeline, key, read_options, todo, show_progress) -> list:
    """Step 1 (``clean_passes``) for the shards up to the last in ``todo``: their
    step-1 statistics (from the markers where still good)."""
    filtered = []
    with sh.progress(show_progress, "clean: filters") as bar:
        for k, shard in enumerate(shards[:max(todo) + 1]):
            marker = _filtered_marker(shard, key, k in todo)
            if marker is None:
                stats = passes.filter_to_pages(shard, pipeline, read_options, bar)
                marker = {"input": sh.fingerprint(shard.input), "key": key, "stats": stats}
                sh.write_json(shard.work_file(".filtered.json"), marker)
            filtered.append(marker["stats"])
    return filtered


def _with_spans(shards, pipeline, key, read_options, memory_bytes, show_progress,
                totals) -> int:
    """Clean with span dedup (``clean_passes``'s three steps); documents processed."""
    prefix = [sh.fingerprint(s.input) for s in shards]
    keys = [sh.options_key({"options": key, "inputs": prefix[:k + 1]})
            for k in range(len(shards))]  # a shard depends on the ones before it
    markers = [sh.finished(s, keys[k]) for k, s in enumerate(shards)]
    todo = [k for k, m in enumerate(markers) if m is None]
    if todo:
        filtered = _filter_all(shards, pipeline, key, read_options, todo, show_progress)
        work = os.path.dirname(shards[0].marker)
        flags = os.path.join(work, "spans.first.i64")
        first_occurrences([s.work_file(".spans.u64") for s in shards[:len(filtered)]], flags,
                          os.path.join(work, "spans.tmp"), memory_bytes)
        starts = np.concatenate(([0], np.cumsum([f["windows"] for f in filtered])))
    processed = 0
    with sh.progress(show_progress, "clean: span dedup") as bar:
        for k, shard in enumerate(shards):
            if markers[k] is not None:
                _add(totals, markers[k]["stats"])
                totals["shards_skipped"] += 1
                continue
            stats = clean_shard(shard, pipeline, read_options, bar,
                                (flags, int(starts[k]), filtered[k]))
            sh.mark_finished(shard, keys[k], stats)
            _add(totals, stats)
            totals["shards_done"] += 1
            processed += stats["documents_in"]
    return processed


def clean_corpus(inputs, out_dir: str, config: CleanConfig | None = None, *,
                 read_options: dict | None = None, compression: str = "gz",
                 show_progress: bool = True, memory_bytes: int = MEMORY_BYTES) -> dict:
    """Clean every file ``expand_inputs(inputs)`` names into ``out_dir`` (see the module
    docstring); returns the totals also written to ``out_dir/clean.stats.json``.
    ``read_options`` go to ``read_documents`` (format, text_field, text_unit)."""
    config = config or CleanConfig()
    read_options = dict(read_options or {})
    files = expand_inputs(inputs)
    sh.make_folder(out_dir)
    shards = sh.plan(files, out_dir, "clean", compression)
    pipeline = build_pipeline(config)
    key = sh.options_key(_options(config, read_options, compression))
    totals = {**passes.empty_stats(), "removed": {}, "files": [], "shards_done": 0,
              "shards_skipped": 0, "filters": config.names()}
    start, processed = time.perf_counter(), 0
    if pipeline.span is not None:
        processed = _with_spans(shards, pipeline, key, read_options, memory_bytes,
                                show_progress, totals)
    else:
        with sh.progress(show_progress, "clean") as bar:
            for shard in shards:
                marker = sh.finished(shard, key)
                if marker is not None:
                    _add(totals, marker["stats"])
                    totals["shards_skipped"] += 1
                    continue
                stats = clean_shard(shard, pipeline, read_options, bar)
                sh.mark_finished(shard, key, stats)
                _add(totals, stats)
                totals["shards_done"] += 1
                processed += stats["documents_in"]
    elapsed = time.perf_counter() - start
    totals["seconds"] = round(elapsed, 3)
    totals["documents_per_s"] = round(processed / elapsed, 1) if elapsed else 0.0  # this run
    if pipeline.span is not None:
        totals["memory_budget_bytes"] = int(memory_bytes)
    sh.write_json(sh.stats_path(out_dir, "clean"), totals)
    return totals

"""What every ``tinylm data`` stage shares: one output shard per input shard, written
atomically, a done-marker per shard, progress bars, statistics files.

A stage writing to ``out/`` makes, for the input ``c4-train.00000-of-01024.json.gz``:

    out/c4-train.00000-of-01024.jsonl.gz     the documents kept (JSONL, gzip by default)
    out/.<stage>/c4-train.00000-of-01024.json  its done-marker: the input's fingerprint
                                             (path, size, mtime), the stage's options'
                                             key, and the shard's statistics
    out/<stage>.stats.json                   the totals, written last (and printed)

The shard file is renamed into place complete (``tinylm.atomic``) and its marker is
written after it, so a shard with a marker is finished: a rerun with the same input and
options skips it, and an interrupted run loses at most the shard it was writing.
Hidden folders and ``*.stats.json`` are not inputs (``readers.expand_inputs``), so one
stage's output folder is the next stage's input.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import sys
from dataclasses import dataclass

from tinylm.atomic import atomic_open, write_atomic
from tinylm.webdata.readers import STATS_SUFFIX, WebDataError, output_stem, zstd_module

COMPRESSIONS = {"gz": ".jsonl.gz", "zst": ".jsonl.zst", "none": ".jsonl"}
FLUSH_BYTES = 1 << 20


@dataclass(frozen=True)
class Shard:
    """One input file and where its outputs go."""

    input: str
    stem: str
    output: str  # the data shard
    work: str  # the stage's hidden folder (markers, state)

    @property
    def marker(self) -> str:
        return os.path.join(self.work, f"{self.stem}.json")

    def work_file(self, suffix: str) -> str:
        return os.path.join(self.work, self.stem + suffix)


def plan(files, out_dir: str, stage: str, compression: str = "gz") -> list:
    """The ``Shard`` of each input file, in order. Two inputs with one name (after their
    suffixes go) would write one output: that is an error, caught here, before work."""
    if compression not in COMPRESSIONS:
        raise WebDataError(f"compression must be one of {', '.join(COMPRESSIONS)}, "
                           f"not {compression!r}")
    if compression == "zst":
        zstd_module()
    work = os.path.join(out_dir, f".{stage}")
    make_folder(work)
    shards, seen = [], {}
    for path in files:
        stem = output_stem(path)
        if stem in seen:
            raise WebDataError(f"{path} and {seen[stem]} would both write {stem}"
                               f"{COMPRESSIONS[compression]}; rename one or run them apart")
        seen[stem] = path
        if os.path.abspath(os.path.dirname(path)) == os.path.abspath(out_dir):
            raise WebDataError(f"{path} is in the output folder {out_dir}; pick another -o")
        shards.append(Shard(path, stem, os.path.join(out_dir, stem + COMPRESSIONS[compression]),
                            work))
    return shards


def make_folder(path: str) -> None:
    """``os.makedirs(path, exist_ok=True)``, with a WebDataError naming the folder when
    it cannot be made (a file in its place or above it, no permission, a read-only disk)
    instead of an OSError traceback."""
    try:
        os.makedirs(path, exist_ok=True)
    except FileExistsError:
        raise WebDataError(f"cannot create the folder {path}: a file of that name is in "
                           f"the way; pick another output folder") from None
    except OSError as e:
        where = f" ({e.filename})" if e.filename and os.fspath(e.filename) != os.fspath(path) else ""
        raise WebDataError(f"cannot create the folder {path}{where}: {e.strerror or e}; "
                           f"pick an output folder you may write to") from None


def fingerprint(path) -> dict:
    """What identifies an input's contents cheaply: absolute path, size, mtime (ns)."""
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def options_key(options: dict) -> str:
    """A short SHA-256 of the stage's options (JSON, sorted keys): a marker made with
    other options is not trusted."""
    blob = json.dumps(options, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def finished(shard: Shard, key: str) -> dict | None:
    """The shard's marker if it says the shard is done for this input and ``key`` and
    the output exists; else None (no marker, unreadable, other input or options)."""
    try:
        with open(shard.marker, encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    if (not isinstance(marker, dict) or marker.get("key") != key
            or marker.get("input") != fingerprint(shard.input)
            or not os.path.exists(shard.output)):
        return None
    return marker


def write_json(path: str, data) -> None:
    """``data`` as indented JSON, atomically."""
    write_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def mark_finished(shard: Shard, key: str, stats: dict) -> None:
    """Write the shard's done-marker (after its output is in place)."""
    write_json(shard.marker, {"input": fingerprint(shard.input), "key": key,
                              "output": shard.output, "stats": stats})


def stats_path(out_dir: str, stage: str) -> str:
    return os.path.join(out_dir, stage + STATS_SUFFIX)


class _JsonlWriter:
    """Writes records as JSON lines into a binary stream, in ~1 MiB blocks."""

    def __init__(self, stream):
        self.stream, self.parts, self.size, self.count = stream, [], 0, 0

    def write(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n"
        self.parts.append(line)
        self.size += len(line)
        self.count += 1
        if self.size >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        self.stream.write(b"".join(self.parts))
        self.parts, self.size = [], 0


@contextlib.contextmanager
def jsonl_writer(path: str):
    """A ``write(record)`` sink for a JSONL file compressed by ``path``'s suffix (.gz,
    .zst, none), replaced atomically when the block ends without an error."""
    with atomic_open(path, "wb") as raw:
        if path.endswith(".gz"):
            stream = gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6,
                                   mtime=0)
        elif path.endswith(".zst"):
            stream = zstd_module().ZstdCompressor(level=3).stream_writer(raw, closefd=False)
        else:
            stream = contextlib.nullcontext(raw)
        with stream as out:
            writer = _JsonlWriter(out)
            yield writer
            writer.flush()


def progress(enabled: bool, desc: str):
    """A tqdm bar on stderr counting documents (it shows documents/s)."""
    from tqdm.auto import tqdm

    return tqdm(desc=desc, unit="doc", unit_scale=True, dynamic_ncols=True, file=sys.stderr,
                disable=not enabled, smoothing=0.1)

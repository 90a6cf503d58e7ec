"""Corpus-wide state on disk in bounded memory: 64-bit keys partitioned by hash into
files small enough to sort in memory, and "which entry came first" over a stream of keys.

    parts = Partitions(work_dir, "bands", count=8, dtype=ENTRY)
    parts.add(part_of(keys, 8), entries)        # appended, each to its partition's file
    parts.close(); parts.read(3)                # one partition's entries, in added order

    first_occurrences(["a.u64", "b.u64"], "first.i64", work_dir, memory_bytes=64 << 20)
    np.fromfile("first.i64", "<i8")             # first[i]: the index of the first key == key i

How memory stays bounded: a key's partition is a hash of the key, so equal keys meet in
one partition; the number of partitions is chosen so that one partition's entries and
the temporaries of sorting them (``BYTES_PER_ENTRY`` each) fit ``memory_bytes``; keys are
read, partitioned and merged back in chunks of that many entries. Memory: about
``memory_bytes`` (with the partition files' buffers), flat in the number of keys up to
``MAX_PARTITIONS`` x ``memory_bytes`` / ``BYTES_PER_ENTRY`` keys (256 partitions:
about 53.7 M keys at 16 MiB, 3.4 M per MiB); past that each partition holds more and
memory grows as keys / 256 x 80 bytes. It assumes keys spread evenly: all entries of
one key share a partition, so a key repeated extremely often (more than the budget's
``memory_bytes`` / 80 entries) makes its partition that large, and it is still sorted
in memory. Files: at most ``MAX_PARTITIONS`` open at once (one set of partitions at a
time). Disk: 32 bytes per key while it runs. Entries are appended in index order, so
within a partition (and within a key) they stay in that order, and the answers are
exactly those of sorting all keys at once. A failing open or write (too many open
files, a full disk) is a ``TinyLMError`` that says what to do.
"""

from __future__ import annotations

import contextlib
import errno
import os

import numpy as np

from tinylm.atomic import atomic_open
from tinylm.errors import TinyLMError
from tinylm.webdata.hashing import mix64

ENTRY = np.dtype([("key", "<u8"), ("index", "<i8")])
FIRST = np.dtype([("index", "<i8"), ("first", "<i8")])
BYTES_PER_ENTRY = 80  # an entry (16), np.unique's sort, order and inverse, the result
MAX_PARTITIONS = 256  # files open at once
MIN_MEMORY = 1 << 16


def partition_count(entries: int, memory_bytes: int) -> int:
    """How many partitions keep one partition's sort within ``memory_bytes``."""
    per_part = max(1, max(MIN_MEMORY, memory_bytes) // BYTES_PER_ENTRY)
    return int(min(MAX_PARTITIONS, max(1, -(-entries // per_part))))


def chunk_entries(memory_bytes: int) -> int:
    """Entries read or merged at once under ``memory_bytes``."""
    return max(1, max(MIN_MEMORY, memory_bytes) // BYTES_PER_ENTRY)


def buffer_bytes(count: int, memory_bytes: int) -> int:
    """Each of ``count`` partition files' write buffer: together a quarter of the budget
    (4 KiB to 64 KiB each)."""
    return int(min(1 << 16, max(1 << 12, memory_bytes // (4 * count))))


def part_of(keys: np.ndarray, count: int) -> np.ndarray:
    """(n,) int64: the partition of each key, a hash of the key mod ``count``."""
    salted = np.asarray(keys, dtype=np.uint64) ^ np.uint64(0x2545F4914F6CDD1D)
    return (mix64(salted) % np.uint64(count)).astype(np.int64)


def disk_error(e: OSError, work_dir: str) -> TinyLMError:
    """The one-line error for an ``OSError`` of the partition files under ``work_dir``."""
    if e.errno in (errno.EMFILE, errno.ENFILE):
        return TinyLMError(f"too many open files for the on-disk index in {work_dir} (up "
                           f"to {MAX_PARTITIONS} at once); raise the open-file limit "
                           f"(ulimit -n) or --memory-mb (fewer partition files)")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return TinyLMError(f"no space left for the on-disk index in {work_dir} (32 bytes "
                           f"per key while it runs); free disk there and run again")
    return TinyLMError(f"the on-disk index in {work_dir} failed: {e.strerror or e}; check "
                       f"that the folder is writable and run again")


class Partitions:
    """``count`` append-only files of ``dtype`` records under ``work_dir`` (all open
    until ``close``). Opening or writing them fails with ``disk_error``'s message."""

    def __init__(self, work_dir: str, name: str, count: int, dtype, buffer: int = 1 << 16):
        self.dtype, self.count, self.work_dir = np.dtype(dtype), count, work_dir
        self.paths = [os.path.join(work_dir, f"{name}.part{p:04d}") for p in range(count)]
        self.files = []
        try:
            os.makedirs(work_dir, exist_ok=True)
            for path in self.paths:
                self.files.append(open(path, "wb", buffering=buffer))
        except OSError as e:
            self.remove()  # closes the files it opened
            raise disk_error(e, work_dir) from None

    def add(self, parts: np.ndarray, entries: np.ndarray) -> None:
        """Append ``entries[i]`` to partition ``parts[i]``, keeping their order."""
        order = np.argsort(parts, kind="stable")
        bounds = np.searchsorted(parts[order], np.arange(self.count + 1))
        try:
            for p in np.flatnonzero(np.diff(bounds)):
                self.files[p].write(entries[order[bounds[p]:bounds[p + 1]]].tobytes())
        except OSError as e:
            raise disk_error(e, self.work_dir) from None

    def close(self) -> None:
        """Close every file (each, even when one fails: its buffer's flush)."""
        failed = None
        for f in self.files:
            try:
                f.close()
            except OSError as e:
                failed = failed or e
        if failed is not None:
            raise disk_error(failed, self.work_dir)

    def read(self, p: int) -> np.ndarray:
        return np.fromfile(self.paths[p], dtype=self.dtype)

    def remove(self) -> None:
        with contextlib.suppress(TinyLMError):  # a failed flush: the files go anyway
            self.close()
        for path in self.paths:
            if os.path.exists(path):
                os.remove(path)
        with contextlib.suppress(OSError):  # the folder, once empty
            os.rmdir(os.path.dirname(self.paths[0]))


def read_chunks(paths, chunk: int, dtype="<u8"):
    """The records of the files ``paths``, in order, ``chunk`` at a time (arrays)."""
    itemsize = np.dtype(dtype).itemsize
    for path in paths:
        size = os.path.getsize(path) // itemsize
        for start in range(0, size, chunk):
            yield np.fromfile(path, dtype=dtype, count=min(chunk, size - start),
                              offset=start * itemsize)


class _SortedReader:
    """A partition's ``FIRST`` records (ascending index), taken up to an index bound."""

    def __init__(self, path: str, block: int):
        self.f, self.block = open(path, "rb"), block
        self.buffer = np.zeros(0, dtype=FIRST)
        self.done = False

    def take(self, end: int) -> np.ndarray:
        """The records with index < ``end`` not taken yet."""
        while not self.done and (len(self.buffer) == 0 or self.buffer["index"][-1] < end):
            more = np.frombuffer(self.f.read(self.block * FIRST.itemsize), dtype=FIRST)
            self.done = len(more) < self.block
            self.buffer = np.concatenate([self.buffer, more])
        cut = int(np.searchsorted(self.buffer["index"], end))
        taken, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return taken

    def close(self) -> None:
        self.f.close()


def _first_in_memory(keys: np.ndarray, index: np.ndarray) -> np.ndarray:
    """For entries in index order: the index of the first entry with each one's key."""
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    return index[first[inverse.ravel()]]


def first_occurrences(paths, out_path: str, work_dir: str, memory_bytes: int) -> int:
    """Write ``out_path``: (n,) little-endian int64, for the keys of the uint64 files
    ``paths`` taken in order as one sequence, the index of each key's first occurrence
    (its own index when it is the first). Returns n. See the module docstring."""
    n = sum(os.path.getsize(p) // 8 for p in paths)
    chunk, count = chunk_entries(memory_bytes), partition_count(n, memory_bytes)
    if count == 1:  # fits: no partition files
        keys = np.concatenate([np.fromfile(p, dtype="<u8") for p in paths] or [np.zeros(0, "<u8")])
        try:
            with atomic_open(out_path, "wb") as out:
                out.write(_first_in_memory(keys, np.arange(n)).astype("<i8").tobytes())
        except OSError as e:
            raise disk_error(e, os.path.dirname(out_path) or ".") from None
        return n
    buffer = buffer_bytes(count, memory_bytes)
    parts = results = None
    try:
        parts = Partitions(work_dir, "keys", count, ENTRY, buffer)
        start = 0
        for keys in read_chunks(paths, chunk):
            entries = np.empty(len(keys), dtype=ENTRY)
            entries["key"], entries["index"] = keys, np.arange(start, start + len(keys))
            parts.add(part_of(keys, count), entries)
            start += len(keys)
        parts.close()
        results = Partitions(work_dir, "first", count, FIRST, buffer)  # parts' are closed
        for p in range(count):
            entries = parts.read(p)
            found = np.empty(len(entries), dtype=FIRST)
            found["index"] = entries["index"]
            found["first"] = _first_in_memory(entries["key"], entries["index"])
            results.files[p].write(found.tobytes())
            del entries, found
            os.remove(parts.paths[p])
        results.close()
        _merge(results.paths, out_path, n, chunk, max(1, 2 * chunk // count))
    except OSError as e:
        raise disk_error(e, work_dir) from None
    finally:
        for opened in (parts, results):
            if opened is not None:
                opened.remove()
    return n


def _merge(paths, out_path: str, n: int, chunk: int, block: int) -> None:
    """The partitions' ``FIRST`` records back into one dense array in index order."""
    readers = [_SortedReader(path, block) for path in paths]
    try:
        with atomic_open(out_path, "wb") as out:
            for start in range(0, n, chunk):
                end = min(n, start + chunk)
                dense = np.full(end - start, -1, dtype="<i8")
                for reader in readers:
                    got = reader.take(end)
                    dense[got["index"] - start] = got["first"]
                out.write(dense.tobytes())
    finally:
        for reader in readers:
            reader.close()

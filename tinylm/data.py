"""Training data: text sources -> one token file on disk -> batches of windows.

    files = resolve_sources(["corpus/", "extra.jsonl"])      # [] -> the default corpus
    data = TokenData.prepare(files, tokenizer, cache_dir)    # tokenized once, then reused
    train, val = data.split(0.1)                             # the first 90% of the tokens
    batches = Batcher(train, window=65, batch_size=12, seed=1337)
    x = batches.next()                                       # (12, 65) int64

Sources are UTF-8 plain text files (one document each; a leading byte-order mark is
dropped, as ``utf-8-sig`` reads it), JSONL files (one document per line,
its text under ``text_field``), folders of such files (every file below, in sorted
order, hidden ones skipped), or nothing: the text of Python's bundled ``pydoc_data``
topics, one document per topic, so a fresh install has something to learn from.

The documents are tokenized once into ``tokens-<key>.bin``, a flat uint16 (uint32 for
vocabularies above 65536) array with the end-of-text token between documents, next to
``tokens-<key>.json``, a small manifest: the sources' paths, sizes and modification
times and the tokenizer's SHA-256. A later run with the same sources and tokenizer
memory-maps the file instead of tokenizing again; a changed source or tokenizer makes
a new one. The manifest is written last, so a file without one is never trusted.

Batches are windows of consecutive tokens, drawn two ways, both deterministic for a
seed and resumable exactly (``state_dict`` / ``load_state_dict``):

- "random": nanoGPT's sampling, each window at a uniformly random offset;
- "packed": the stream cut into back-to-back windows (documents packed across the
  end-of-text separators), visited in a fresh random order each epoch.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from dataclasses import dataclass

import numpy as np

from tinylm.atomic import atomic_open, write_atomic
from tinylm.backend import default_cache_dir  # noqa: F401  (callers import it from here)
from tinylm.errors import TinyLMError

FORMAT = "tinylm-tokens"
FORMAT_VERSION = 1
READER_VERSION = 2  # in the sources' fingerprint: 2 strips a UTF-8 byte-order mark
DEFAULT_CORPUS = "<pydoc_data topics>"  # what resolve_sources([]) stands for
MODES = ("random", "packed")


class DataError(TinyLMError, ValueError):
    """A data source that is missing, unreadable, malformed, or too small."""


# --------------------------------------------------------------------------- sources


def resolve_sources(paths, exclude=()) -> list:
    """The files to read, in order: folders expanded (sorted, hidden entries and the
    folders in ``exclude`` skipped: a run folder inside a data folder is not data),
    ``[]`` -> ``[DEFAULT_CORPUS]``. Anything but a regular file (a broken link, a FIFO,
    a device) is a DataError naming it."""
    paths = [os.fspath(p) for p in (paths or [])]
    if not paths:
        return [DEFAULT_CORPUS]
    skip = {os.path.realpath(p) for p in exclude}
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = []
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                                 and os.path.realpath(os.path.join(root, d)) not in skip)
                found += [os.path.join(root, n) for n in names if not n.startswith(".")]
            if not found:
                raise DataError(f"the folder {path!r} has no files to train on")
            for file in found:
                check_regular_file(file, f"in the data folder {path!r}")
            files += sorted(found)
        else:
            check_regular_file(path)
            files.append(path)
    return files


def read_utf8(path, error=DataError, hint: str = "") -> str:
    """The whole text of a regular UTF-8 file (a leading byte order mark dropped); a file
    that is missing, unreadable or not UTF-8 is one ``error`` line (``hint`` appended to
    the not-UTF-8 one, e.g. "; GLUE files are UTF-8 TSV")."""
    path = os.fspath(path)
    check_regular_file(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}; check its permissions") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        hint = hint or "; give a text file, saved as UTF-8"
        raise error(f"{path} is not UTF-8 text (byte {e.start}){hint}") from None


def check_regular_file(path: str, where: str = "") -> None:
    """A DataError unless ``path`` is (a link to) a regular file."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            raise DataError(f"{path!r} {where + ' ' if where else ''}is a broken symbolic link "
                            f"(to {os.readlink(path)!r}); fix or remove it") from None
        raise DataError(f"data source {path!r} does not exist; give a text file, a "
                        f"JSONL file or a folder of them") from None
    except OSError as e:
        raise DataError(f"cannot read {path!r}: {e.strerror or e}; check the path and its "
                        f"permissions") from None
    if stat.S_ISDIR(mode):  # (data_files walks folders; a reader of one file got one)
        raise DataError(f"{path!r} {where + ' ' if where else ''}is a folder, not a file; "
                        f"give a file")
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode)
                else "a block device" if stat.S_ISBLK(mode) else "a socket"
                if stat.S_ISSOCK(mode) else None)
        # (an unnamed kind said "is not a regular file, not a regular file")
        what = f"is {kind}, not a regular file" if kind else "is not a regular file"
        raise DataError(f"data source {path!r} {where + ' ' if where else ''}{what}; give a "
                        f"text file, a JSONL file or a folder of them")


def make_dirs(path: str, what: str = "folder", error=None) -> None:
    """``os.makedirs(path, exist_ok=True)``, with a TinyLMError (``error``) naming
    ``what`` when ``path`` or a folder above it is a file or may not be written."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise (error or DataError)(f"cannot create the {what} {path}: {e.strerror or e}; "
                                   f"pick a folder you may write to") from None


def default_corpus_documents() -> list:
    """The topics of Python's ``pydoc_data`` (about 465 KB of English about Python)."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def _default_corpus_file() -> str:
    import pydoc_data.topics

    return pydoc_data.topics.__file__


def read_documents(path: str, text_field: str = "text"):
    """Yield the documents of one source file (or of the default corpus)."""
    if path == DEFAULT_CORPUS:
        yield from default_corpus_documents()
        return
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"cannot read {path!r}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark is not text
    except UnicodeDecodeError as e:
        raise DataError(f"{path!r} is not UTF-8 text (byte {e.start}); tinylm trains on "
                        f"UTF-8 text and JSONL files") from None
    if not path.endswith(".jsonl"):
        if text:
            yield text
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path}:{n}: not a JSON line ({e.msg})") from None
        if not isinstance(record, dict) or text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{path}:{n}: no {text_field!r} field (found {keys}); pass "
                            f"--text-field NAME to read another")
        value = record[text_field]
        if not isinstance(value, str):
            raise DataError(f"{path}:{n}: the {text_field!r} field is a "
                            f"{type(value).__name__}, not a string")
        if value:
            yield value


def iter_documents(files, text_field: str = "text"):
    for path in files:
        yield from read_documents(path, text_field)


def source_fingerprint(files, text_field: str = "text") -> list:
    """[{path, size, mtime_ns}] of the files: what decides whether a cache is current."""
    out = []
    for path in files:
        real = _default_corpus_file() if path == DEFAULT_CORPUS else path
        st = os.stat(real)
        out.append({"path": path if path == DEFAULT_CORPUS else os.path.abspath(path),
                    "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return [{"text_field": text_field, "reader": READER_VERSION}] + out


def fingerprint_key(*parts) -> str:
    """A short hex key for JSON-serialisable ``parts``."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def tokenizer_sha256(tokenizer) -> str:
    """SHA-256 of the tokenizer's saved file: equal hashes, equal tokenizers."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tokenizer.txt")
        tokenizer.save(path)
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()


# --------------------------------------------------------------------------- token files


def token_dtype(vocab_size: int):
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


@dataclass
class TokenData:
    """All documents' tokens (a read-only memmap) and the manifest describing them."""

    tokens: np.ndarray
    manifest: dict
    path: str = ""
    reused: bool = False

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def prepare(cls, files, tokenizer, cache_dir, text_field: str = "text",
                eot: str | None = "<|endoftext|>", progress=None) -> "TokenData":
        """Tokenize ``files`` into ``cache_dir`` (or reuse what a previous call made).

        ``eot``: the special token written between documents (None: nothing).
        ``progress``: called as ``progress(done_files, total_files)``."""
        sources = source_fingerprint(files, text_field)
        tok_hash = tokenizer_sha256(tokenizer)
        eot_id = None
        if eot is not None:
            eot_id = tokenizer.token_to_id(eot)
            if eot_id is None:
                raise DataError(f"the tokenizer has no {eot!r} token to separate documents "
                                f"with; add it as a special token")
        key = fingerprint_key(sources, tok_hash, eot_id)
        make_dirs(cache_dir, "cache folder")
        bin_path = os.path.join(cache_dir, f"tokens-{key}.bin")
        manifest_path = os.path.join(cache_dir, f"tokens-{key}.json")
        manifest = _read_manifest(manifest_path)
        dtype = token_dtype(tokenizer.vocab_size)
        if (manifest and manifest.get("sources") == sources
                and manifest.get("tokenizer_sha256") == tok_hash
                and os.path.exists(bin_path)
                and os.path.getsize(bin_path) == manifest["n_tokens"] * dtype.itemsize):
            return cls(_memmap(bin_path, dtype, manifest["n_tokens"]), manifest, bin_path, True)

        n_tokens = n_docs = 0
        with atomic_open(bin_path, "wb", error=DataError) as f:
            for i, path in enumerate(files):
                for doc in read_documents(path, text_field):
                    ids = tokenizer.encode(doc, disallowed_special=())
                    if n_docs and eot_id is not None:
                        f.write(np.array([eot_id], dtype=dtype).tobytes())
                        n_tokens += 1
                    f.write(np.asarray(ids, dtype=dtype).tobytes())
                    n_tokens += len(ids)
                    n_docs += 1
                if progress is not None:
                    progress(i + 1, len(files))
        if n_tokens == 0:
            raise DataError(f"the data ({', '.join(files[:3])}{' ...' if len(files) > 3 else ''})"
                            f" holds no text")
        manifest = {
            "format": FORMAT, "version": FORMAT_VERSION, "sources": sources,
            "tokenizer_sha256": tok_hash, "dtype": dtype.name, "n_tokens": n_tokens,
            "n_documents": n_docs, "eot_id": eot_id, "vocab_size": tokenizer.vocab_size,
        }
        _write_json_atomic(manifest_path, manifest)
        return cls(_memmap(bin_path, dtype, n_tokens), manifest, bin_path, False)

    @classmethod
    def from_ids(cls, ids, n_documents: int = 1) -> "TokenData":
        """Token ids already in hand (a 1-D sequence), for a caller that tokenized its
        own data (``Trainer(config, data=...)``)."""
        tokens = np.asarray(ids)
        if tokens.ndim != 1 or (tokens.size and tokens.dtype.kind not in "iu"):
            raise DataError(f"token data must be a 1-D sequence of integer ids, got shape "
                            f"{tokens.shape} of {tokens.dtype}")
        manifest = {"format": FORMAT, "n_tokens": int(tokens.size),
                    "n_documents": n_documents, "eot_id": None}
        return cls(tokens, manifest)

    def split(self, val_fraction: float) -> tuple:
        """(train, val): the first 1 - val_fraction of the tokens, and the rest."""
        if not 0 <= val_fraction < 1:
            raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
        n_train = int(len(self.tokens) * (1 - val_fraction))
        return self.tokens[:n_train], self.tokens[n_train:]


def _memmap(path, dtype, n):
    if n == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def _read_manifest(path) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    if manifest.get("version") != FORMAT_VERSION:
        return None
    return manifest


def _write_json_atomic(path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1) + "\n", error=DataError)


# --------------------------------------------------------------------------- batches


class Batcher:
    """Batches of ``batch_size`` windows of ``window`` consecutive tokens (int64).

    ``mode`` "random" (a uniformly random offset per window, as nanoGPT) or "packed"
    (back-to-back windows, a new random order each epoch). Its own NumPy generator,
    seeded with ``seed``, makes every choice, so ``state_dict()`` (JSON-ready) taken
    between batches resumes the exact sequence."""

    def __init__(self, tokens, window: int, batch_size: int, mode: str = "random",
                 seed: int = 0, split: str = "train"):
        if mode not in MODES:
            raise DataError(f"sampling mode must be one of {MODES}, got {mode!r}")
        if window < 1 or batch_size < 1:
            raise DataError("window and batch_size must be positive")
        self.tokens, self.window, self.batch_size, self.mode = tokens, window, batch_size, mode
        n = len(tokens)
        need = window if mode == "random" else window * batch_size
        if n < need:
            if mode == "random":
                what, fixes = "one window", ["lower --block-size"]
            else:
                what = f"one batch of {batch_size} back-to-back windows"
                fixes = ["lower --block-size or --batch-size"]
            if split == "validation":
                fixes.append("raise --val-fraction")
            raise DataError(
                f"the {split} split has {n:,} tokens, fewer than {what} needs ({need:,}); "
                f"give more text, or {', or '.join(fixes)}")
        self.rng = np.random.default_rng(seed)
        self.n_windows = n // window  # packed mode
        self.order = EpochOrder(self.n_windows, self.rng)
        self._offsets = np.arange(window)

    def next(self) -> np.ndarray:
        return self.take(self.batch_size)

    def take(self, k: int) -> np.ndarray:
        """The next ``k`` windows, (k, window) int64 (``next`` takes ``batch_size``; a
        mixture takes each source's share of a batch)."""
        if self.mode == "random":
            starts = self.rng.integers(0, len(self.tokens) - self.window + 1, size=k)
        else:
            starts = self.order.take(k) * self.window
        idx = starts[:, None] + self._offsets  # (k, window)
        return np.asarray(self.tokens[idx], dtype=np.int64)

    @property
    def epoch(self) -> int:
        """Packed mode: how many times every window has been handed out."""
        return self.order.epoch

    def state_dict(self) -> dict:
        return {"mode": self.mode, **self.order.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("mode") != self.mode:
            raise DataError(f"the saved data position is for {state.get('mode')!r} sampling, "
                            f"this run samples {self.mode!r}")
        self.order.load_state_dict(state)


class EpochOrder:
    """Indices 0..n-1 in a fresh random order each epoch, handed out ``take(k)`` at a
    time (a batch may run into the next epoch). ``rng`` (a NumPy Generator, maybe
    shared with its owner) draws the orders; ``state_dict()`` (JSON-ready: the
    generator's state, the epoch, the index in it, and the generator's state the
    epoch's order was drawn from) resumes the exact sequence."""

    def __init__(self, n: int, rng: np.random.Generator):
        self.n, self.rng = n, rng
        self.epoch, self.index, self._order, self._epoch_state = 0, 0, None, None

    def take(self, k: int) -> np.ndarray:
        picks = []
        while len(picks) < k:
            if self._order is None or self.index >= self.n:
                if self._order is not None:
                    self.epoch += 1
                self._new_epoch()
            step = min(k - len(picks), self.n - self.index)
            picks.extend(self._order[self.index:self.index + step])
            self.index += step
        return np.asarray(picks, dtype=np.int64)

    def _new_epoch(self) -> None:
        self._epoch_state = self.rng.bit_generator.state
        self._order = self.rng.permutation(self.n)
        self.index = 0

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "epoch": self.epoch, "index": self.index,
                "epoch_rng": self._epoch_state}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._order = int(state["epoch"]), None
        if state.get("epoch_rng") is not None:  # rebuild this epoch's order
            self.rng.bit_generator.state = state["epoch_rng"]
            self._new_epoch()
        self.rng.bit_generator.state = state["rng"]
        self.index = int(state["index"])

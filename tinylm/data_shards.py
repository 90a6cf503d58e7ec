"""Training data from token shards (``tinylm data tokenize``'s output), never loaded whole.

    data = ShardedTokenData.open(["c4-tokens/"], tokenizer)      # one folder, or several
    train, val = data.split(0.1)           # the first 90% of the tokens, as TokenData's
    batches = make_batcher(train, window=65, batch_size=12, seed=1337)
    x = batches.next()                     # (12, 65) int64, gathered from the shards' memmaps

    mixture = ShardedTokenData.open(["web/:0.7", "books/:0.3"], tokenizer)
    make_batcher(mixture.split(0.1)[0], 65, 12, seed=1)   # 70% of the windows from web/

A shard folder holds ``index.json`` (``tinylm.webdata.tokenize_shards`` writes it last:
a folder without one is not finished), ``tokenizer.txt`` and the shards: raw
little-endian token ids (uint16, or uint32 for vocabularies above 65536), documents
separated by the end-of-text id. ``ShardedTokens`` is the shards end to end as one
read-only 1-D array: ``len``, slices (views, no copy) and integer-array indexing, which
opens each shard as an ``np.memmap`` (at most ``MAX_OPEN`` at a time) and gathers from
the ones an index touches. The concatenation of a folder's shards in index order is
exactly the token file ``TokenData.prepare`` writes for the same documents, so a
``Batcher`` over it draws the same windows for the same seed as the in-memory path.

Data entries (``TrainConfig.data``, ``tinylm train --data``) name shard folders, each
maybe with a weight: ``DIR`` (several: their tokens end to end, each weighted by its
size) or ``DIR:WEIGHT`` for every entry (a mixture: each window comes from source i
with probability WEIGHT_i / sum of weights; TOML: ``data = ["web:0.7", "books:0.3"]``).
A mixture is split source by source (each its own first 1 - val_fraction), and its
``MixtureBatcher`` draws the source of every window and then the window from that
source's own ``Batcher``: deterministic for a seed, ``state_dict`` resumes it exactly.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict

import numpy as np

from tinylm.data import Batcher, DataError, fingerprint_key, token_dtype, tokenizer_sha256

SHARDS_FORMAT = "tinylm-token-shards"
SHARDS_VERSION = 1
INDEX_FILE = "index.json"
TOKENIZER_FILE = "tokenizer.txt"
MAX_OPEN = 64  # memory maps kept open at once (each holds a file descriptor)


# --------------------------------------------------------------------------- data entries


def split_weight(entry: str) -> tuple:
    """``"DIR:0.7"`` -> ``("DIR", 0.7)``; ``"DIR"`` (or a path that exists as written,
    colon and all) -> ``("DIR", None)``."""
    entry = os.fspath(entry)
    head, sep, tail = entry.rpartition(":")
    if not sep or not head or os.path.exists(entry):
        return entry, None
    try:
        weight = float(tail)
    except ValueError:
        return entry, None
    return head, weight


def is_shard_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, INDEX_FILE))


def shard_entries(data) -> list | None:
    """``[(folder, weight or None)]`` when ``data`` (a run's data entries) names token
    shard folders; None when it names text (files, folders of text, nothing). A mix
    of the two, or a weight on text, is a DataError."""
    entries = [split_weight(d) for d in data or []]
    shards = [is_shard_folder(path) for path, _ in entries]
    for (path, _), done in zip(entries, shards):
        if not done and os.path.isdir(os.path.join(path, ".tokenize")):
            raise DataError(f"{path} holds unfinished token shards (no {INDEX_FILE}); run "
                            f"tinylm data tokenize again to finish it")
    if not any(shards):
        weighted = [path for path, w in entries if w is not None]
        if weighted:
            raise DataError(f"{weighted[0]}: a weight (PATH:WEIGHT) needs a folder of token "
                            f"shards (tinylm data tokenize writes them); drop the weight")
        return None
    if not all(shards):
        text = entries[shards.index(False)][0]
        raise DataError(f"{text} is text, the other data are token shards; tokenize it "
                        f"with tinylm data tokenize, or train on text alone")
    weights = [w for _, w in entries]
    if any(w is not None for w in weights) and not all(w is not None for w in weights):
        raise DataError("give every shard folder a weight (DIR:WEIGHT) or none; a mixture "
                        "weighs each of its sources")
    if any(w is not None and not (np.isfinite(w) and w > 0) for w in weights):
        raise DataError(f"mixture weights must be positive numbers, got "
                        f"{', '.join(str(w) for w in weights)}")
    return entries


def read_index(folder: str) -> dict:
    """A shard folder's index, checked: its format and every shard's size."""
    path = os.path.join(folder, INDEX_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}; run tinylm data tokenize again") from None
    if not isinstance(index, dict) or index.get("format") != SHARDS_FORMAT:
        raise DataError(f"{path} is not a tinylm token-shard index")
    if index.get("version") != SHARDS_VERSION:
        raise DataError(f"{path} is version {index.get('version')} of the shard format, this "
                        f"tinylm reads {SHARDS_VERSION}; tokenize the data again")
    itemsize = np.dtype(index["dtype"]).itemsize
    for shard in index["shards"]:
        file = os.path.join(folder, shard["file"])
        size = os.path.getsize(file) if os.path.exists(file) else None
        if size != shard["tokens"] * itemsize:
            raise DataError(f"the shard {file} is {'missing' if size is None else f'{size} bytes'}"
                            f", its index says {shard['tokens'] * itemsize}; tokenize the data "
                            f"again (tinylm data tokenize --overwrite)")
    return index


# --------------------------------------------------------------------------- the token array


class _Maps:
    """The shards' memory maps, opened on first use; the least recently used closed
    beyond ``MAX_OPEN`` (a corpus may have more shards than a process may open files)."""

    def __init__(self, files, counts, dtype):
        self.files, self.counts, self.dtype = files, counts, dtype
        self.open = OrderedDict()

    def __call__(self, i: int) -> np.ndarray:
        array = self.open.get(i)
        if array is None:
            array = np.memmap(self.files[i], dtype=self.dtype, mode="r",
                              shape=(self.counts[i],))
            self.open[i] = array
            if len(self.open) > MAX_OPEN:
                self.open.popitem(last=False)
        else:
            self.open.move_to_end(i)
        return array


class ShardedTokens:
    """Shards end to end as one read-only 1-D array of ``stop - start`` tokens.

    ``files``/``counts``: the shards and their token counts, in order; ``start``,
    ``stop``: the part of the whole this view is. ``x[i]`` (an int), ``x[a:b]`` (a
    view, step 1) and ``x[idx]`` (an integer array of any shape, e.g. a Batcher's
    (B, T) window positions: returns an array of that shape) are supported."""

    def __init__(self, files, counts, dtype, start: int = 0, stop: int | None = None,
                 maps: _Maps | None = None):
        self.files, self.dtype = list(files), np.dtype(dtype).newbyteorder("<")
        self.counts = np.asarray(counts, dtype=np.int64)
        self.ends = np.cumsum(self.counts)  # (S,) global end of each shard
        self.begins = self.ends - self.counts
        total = int(self.ends[-1]) if len(self.ends) else 0
        self.start, self.stop = start, total if stop is None else stop
        self.maps = maps or _Maps(self.files, self.counts.tolist(), self.dtype)

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def shape(self) -> tuple:
        return (len(self),)

    def __getitem__(self, key):
        if isinstance(key, slice):
            a, b, step = key.indices(len(self))
            if step != 1:
                raise DataError("token shards are sliced with step 1 only")
            return ShardedTokens(self.files, self.counts, self.dtype, self.start + a,
                                 self.start + max(a, b), self.maps)
        if isinstance(key, (int, np.integer)):
            i = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"index {int(key)} is out of range for {len(self)} tokens")
            return self._gather(np.array([i]))[0]
        return self._gather(np.asarray(key))

    def _gather(self, idx: np.ndarray) -> np.ndarray:
        """The tokens at positions ``idx`` (any shape) of this view."""
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"token positions must be in [0, {len(self)})")
        pos = idx.reshape(-1).astype(np.int64) + self.start  # (N,) global positions
        which = np.searchsorted(self.ends, pos, side="right")  # (N,) the shard of each
        out = np.empty(pos.shape, dtype=self.dtype)
        if pos.size and which[0] == which[-1] and (which == which[0]).all():
            s = int(which[0])  # the common case: every position in one shard
            out[:] = self.maps(s)[pos - self.begins[s]]
            return out.reshape(idx.shape)
        order = np.argsort(which, kind="stable")
        shards, firsts = np.unique(which[order], return_index=True)
        lasts = np.append(firsts[1:], len(order))
        for s, a, b in zip(shards.tolist(), firsts.tolist(), lasts.tolist()):  # per shard
            rows = order[a:b]
            out[rows] = self.maps(s)[pos[rows] - self.begins[s]]
        return out.reshape(idx.shape)

    def __array__(self, dtype=None, copy=None):
        """The whole view read into memory (for small data; training never does this)."""
        out = self._gather(np.arange(len(self)))
        return out if dtype is None else out.astype(dtype)


class MixedTokens:
    """The parts of a mixture (one ``ShardedTokens`` per source) and their weights
    (normalised to sum to 1): what ``make_batcher`` turns into a ``MixtureBatcher``."""

    def __init__(self, parts, weights, names=()):
        self.parts = list(parts)
        w = np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()
        self.names = list(names) or [f"source {i}" for i in range(len(self.parts))]

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)) and 0 <= key < len(self.parts[0]):
            return self.parts[0][key]  # (the first token, for a sample's prompt)
        raise DataError("a mixture is read through its MixtureBatcher, not indexed")


# --------------------------------------------------------------------------- the data set


class ShardedTokenData:
    """Token shards for training, with TokenData's interface: ``split``, ``len``,
    ``tokens``, ``manifest`` (n_tokens, n_documents, eot_id ...), ``path`` (a key of
    the shards' contents and weights: a checkpoint notes it) and ``reused``."""

    reused = True  # (nothing is tokenized when a run opens shards)

    def __init__(self, sources: list, weights, manifest: dict, key: str):
        self.sources, self.weights, self.manifest = sources, weights, manifest
        self.path = f"shards-{key}"
        self.tokens = sources[0][1] if len(sources) == 1 else None

    @classmethod
    def open(cls, data, tokenizer=None) -> "ShardedTokenData":
        """The shard folders ``data`` names (``shard_entries``); ``tokenizer``, when
        given, must be the one the shards were made with (same SHA-256)."""
        entries = shard_entries(data)
        if entries is None:
            raise DataError(f"{', '.join(map(str, data)) or 'no data'}: not token shards "
                            f"(a folder with {INDEX_FILE}); make them with tinylm data tokenize")
        indexes = [read_index(folder) for folder, _ in entries]
        first = indexes[0]
        for (folder, _), index in zip(entries, indexes):
            for field in ("tokenizer_sha256", "dtype", "eot_id"):
                if index.get(field) != first.get(field):
                    raise DataError(f"{folder} and {entries[0][0]} were tokenized differently "
                                    f"({field}); tokenize both with one tokenizer")
        if tokenizer is not None and tokenizer_sha256(tokenizer) != first["tokenizer_sha256"]:
            raise DataError(f"the shards in {entries[0][0]} were made with another tokenizer "
                            f"than this run's; train with --tokenizer "
                            f"{os.path.join(entries[0][0], TOKENIZER_FILE)}")
        if token_dtype(first["vocab_size"]) != np.dtype(first["dtype"]):
            raise DataError(f"{entries[0][0]}: dtype {first['dtype']} cannot hold "
                            f"{first['vocab_size']} ids; tokenize the data again")
        views = [_view(folder, index) for (folder, _), index in zip(entries, indexes)]
        weights = [w for _, w in entries]
        if weights[0] is None:  # one stream: the folders end to end
            files = [f for v in views for f in v.files]
            counts = np.concatenate([v.counts for v in views])
            name = "+".join(f for f, _ in entries)
            sources = [(name, ShardedTokens(files, counts, first["dtype"]))]
            weights = None
        else:
            sources = list(zip([f for f, _ in entries], views))
        manifest = {key: first.get(key) for key in ("format", "dtype", "eot_id", "eot",
                                                    "vocab_size", "tokenizer_sha256")}
        manifest.update(n_tokens=sum(i["n_tokens"] for i in indexes),
                        n_documents=sum(i["n_documents"] for i in indexes),
                        n_shards=sum(len(i["shards"]) for i in indexes),
                        folders=[os.path.abspath(f) for f, _ in entries], weights=weights)
        key = fingerprint_key([[i["n_tokens"], [s["tokens"] for s in i["shards"]],
                                i.get("key")] for i in indexes], weights)
        return cls(sources, weights, manifest, key)

    def __len__(self) -> int:
        return self.manifest["n_tokens"]

    def split(self, val_fraction: float) -> tuple:
        """(train, val): each source's first 1 - val_fraction of its tokens and the
        rest (views, nothing read); a mixture's parts as ``MixedTokens``."""
        if not 0 <= val_fraction < 1:
            raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
        parts = []
        for _, tokens in self.sources:
            n_train = int(len(tokens) * (1 - val_fraction))
            parts.append((tokens[:n_train], tokens[n_train:]))
        if self.weights is None:
            return parts[0]
        names = [name for name, _ in self.sources]
        return (MixedTokens([t for t, _ in parts], self.weights, names),
                MixedTokens([v for _, v in parts], self.weights, names))

    def describe(self) -> str:
        """One line for the run's log."""
        m = self.manifest
        text = (f"{m['n_tokens']:,} tokens in {m['n_documents']:,} document(s), "
                f"{m['n_shards']} {m['dtype']} shard(s)")
        if self.weights is None:
            return f"{text} in {self.sources[0][0]} (streamed)"
        total = sum(self.weights)
        mix = ", ".join(f"{name} {w / total:.3g} ({len(t):,} tokens)"
                        for (name, t), w in zip(self.sources, self.weights))
        return f"{text}, a mixture: {mix} (streamed)"


def _view(folder: str, index: dict) -> ShardedTokens:
    files = [os.path.join(folder, s["file"]) for s in index["shards"]]
    return ShardedTokens(files, [s["tokens"] for s in index["shards"]], index["dtype"])


def load_shard_tokenizer(data, spec: str | None = None):
    """The tokenizer a run on the shard folders ``data`` uses: the first folder's
    ``tokenizer.txt``, or ``spec`` when it is a tokenizer file (checked to be the same
    tokenizer by ``ShardedTokenData.open``)."""
    from tinylm.tokenizers import from_file

    if spec and os.path.isfile(spec):
        return from_file(spec)
    folder = shard_entries(data)[0][0]
    path = os.path.join(folder, TOKENIZER_FILE)
    if not os.path.exists(path):
        raise DataError(f"{folder} has no {TOKENIZER_FILE}; pass the tokenizer the shards "
                        f"were made with: --tokenizer FILE")
    return from_file(path)


# --------------------------------------------------------------------------- batches


def make_batcher(tokens, window: int, batch_size: int, mode: str = "random", seed=0,
                 split: str = "train"):
    """A ``Batcher`` over ``tokens`` (an array, a TokenData part, ``ShardedTokens``),
    or a ``MixtureBatcher`` over a mixture's ``MixedTokens``."""
    if isinstance(tokens, MixedTokens):
        return MixtureBatcher(tokens, window, batch_size, mode, seed, split)
    return Batcher(tokens, window, batch_size, mode, seed=seed, split=split)


class MixtureBatcher:
    """Batches of windows from a mixture: the source of each window drawn with the
    mixture's weights (a generator of its own, seeded with ``seed``), the window from
    that source's ``Batcher`` (seeded with ``seed`` and the source's number). The
    same interface as Batcher: ``next()`` -> (batch_size, window) int64, ``epoch``
    (the least epoch of the sources), ``state_dict``/``load_state_dict``."""

    def __init__(self, mixed: MixedTokens, window: int, batch_size: int,
                 mode: str = "random", seed=0, split: str = "train"):
        base = list(np.atleast_1d(seed).tolist())
        self.mixed, self.window, self.batch_size, self.mode = mixed, window, batch_size, mode
        self.rng = np.random.default_rng(base + [1 << 20])
        self.sources = []
        for i, (part, name) in enumerate(zip(mixed.parts, mixed.names)):
            try:
                self.sources.append(Batcher(part, window, batch_size, mode, seed=base + [i],
                                            split=split))
            except DataError as e:
                raise DataError(f"{name}: {e}") from None

    def next(self) -> np.ndarray:
        which = self.rng.choice(len(self.sources), size=self.batch_size, p=self.mixed.weights)
        out = np.empty((self.batch_size, self.window), dtype=np.int64)
        for i, source in enumerate(self.sources):  # a loop over the sources (a few)
            rows = np.flatnonzero(which == i)
            if rows.size:
                out[rows] = source.take(rows.size)
        return out

    @property
    def epoch(self) -> int:
        return min(source.epoch for source in self.sources)

    def state_dict(self) -> dict:
        return {"mode": self.mode, "mixture": self.rng.bit_generator.state,
                "sources": [source.state_dict() for source in self.sources]}

    def load_state_dict(self, state: dict) -> None:
        if len(state.get("sources", ())) != len(self.sources):
            raise DataError(f"the saved data position is for "
                            f"{len(state.get('sources', ()))} source(s), this mixture has "
                            f"{len(self.sources)}")
        self.rng.bit_generator.state = state["mixture"]
        for source, saved in zip(self.sources, state["sources"]):
            source.load_state_dict(saved)

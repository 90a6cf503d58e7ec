"""The server's KV cache: one row (slot) per sequence, each at its own length.

    cache = SlotCache(max_rows=16, max_length=1024)
    model(prompt_ids, cache=cache.row(i))                 # prefill sequence i alone
    model(padded_ids, cache=cache.prefill(rows, lengths))  # or several new ones at once
    mask, positions = cache.decode_inputs(B)              # (B, S), (B, 1)
    model(next_ids, attention_mask=mask, positions=positions, cache=cache.rows(B))

``tinylm.nn.KVCache`` has one length for all rows, which suits a batch that starts
together. A server's batch does not: sequences join after others have run for a
while and leave when they finish. Here each row keeps its own keys from column 0 and
its own ``length``: row i's positions are 0 .. length[i] - 1 in columns 0 ..
length[i] - 1 (right-padded: the columns past a row's length are stale or empty).

A decode step feeds one new token per row: row i writes its key at column length[i]
(a scatter, one write for all rows), and attention reads columns 0 .. S - 1, S =
max(length) + 1, with a padding mask (B, S) that keeps column c of row i when
c <= length[i] and positions (B, 1) = length. With one token per query there is
nothing for causality to hide, so that mask is the whole story: a row's attention
sees exactly its own keys, as it would alone.

The rows in use are always 0 .. B - 1, so a step reads a plain slice (a view, no
copy); when sequences leave, ``keep`` moves the survivors down (a copy, once per
departure, not per step). Buffers are (max_rows, Hkv, capacity, hs) per layer,
allocated at the first write and doubled along the positions as rows grow (up to
``max_length``).

A batched prefill of sequences that join together (``prefill(rows, lengths)``) feeds
their prompts right-padded to the longest, (J, T), at the default positions 0 .. T - 1,
causal and without a mask: a real token comes before every padding one, so causality
alone keeps the padding out of every real token's attention. Row rows[j] gets all T
columns written and length lengths[j]: the columns past it are stale, as above.

The three views (``row(i)``: a prefill of one sequence, any number of tokens;
``prefill``: of several fresh ones; ``rows(B)``: a decode step of the first B) are what
the model's ``BlockStack`` and attention layers call: ``length``, ``advance`` and
``update``, as on a ``KVCache``.
"""

from __future__ import annotations

import numpy as np

from tinylm import backend
from tinylm.errors import TinyLMError
from tinylm.tensor import Tensor


class SlotCache:
    """Keys and values of up to ``max_rows`` sequences of up to ``max_length``
    positions each. ``lengths[i]``: how many positions row i holds."""

    def __init__(self, max_rows: int, max_length: int):
        self.max_rows, self.max_length = int(max_rows), int(max_length)
        self.lengths = np.zeros(self.max_rows, dtype=np.int64)
        self._k: dict = {}  # id(layer) -> (max_rows, Hkv, capacity, hs)
        self._v: dict = {}

    # ---- views the model writes through

    def row(self, i: int) -> "_RowView":
        """The cache as one sequence (batch of 1) that appends after row ``i``'s
        positions: a prefill of its prompt."""
        return _RowView(self, i)

    def prefill(self, rows, lengths) -> "_PrefillView":
        """Fresh sequences of ``lengths`` (J,) tokens into rows ``rows`` (J,), fed as one
        right-padded (J, max(lengths)) batch."""
        return _PrefillView(self, rows, lengths)

    def rows(self, B: int) -> "_StepView":
        """Rows 0 .. B - 1 each appending one token at its own length: a decode step."""
        return _StepView(self, B)

    def decode_inputs(self, B: int):
        """(attention_mask (B, S), positions (B, 1)) for a decode step of rows 0..B-1:
        S = max(length) + 1; column c of row i is kept when c <= length[i]."""
        lengths = self.lengths[:B]
        S = int(lengths.max()) + 1
        mask = (np.arange(S)[None, :] <= lengths[:, None]).astype(np.int64)  # (B, S)
        return mask, lengths[:, None].copy()  # positions (B, 1)

    # ---- moving rows

    def reset(self, i: int) -> None:
        """Row ``i`` holds nothing (a new sequence takes it)."""
        self.lengths[i] = 0

    def copy_row(self, src: int, dst: int) -> None:
        """Row ``dst`` becomes a copy of row ``src`` (n > 1 choices share one prefill)."""
        n = int(self.lengths[src])
        for bufs in (self._k, self._v):
            for buf in bufs.values():
                buf[dst, :, :n] = buf[src, :, :n]
        self.lengths[dst] = n

    def keep(self, index) -> None:
        """Keep rows ``index`` (in that order) as rows 0 .. len(index) - 1."""
        index = np.asarray(index, dtype=np.int64)
        if np.array_equal(index, np.arange(len(index))):
            return  # the survivors are already at the front
        n = int(self.lengths[index].max()) if len(index) else 0
        for bufs in (self._k, self._v):
            for key, buf in bufs.items():
                xp = backend.get_array_module(buf)
                buf[:len(index), :, :n] = buf[xp.asarray(index), :, :n]
        self.lengths[:len(index)] = self.lengths[index]

    def clear(self) -> None:
        """Forget every row and free the buffers (the server is idle)."""
        self._k.clear()
        self._v.clear()
        self.lengths[:] = 0

    # ---- storage

    def _buffers(self, layer, k, need: int):
        """``layer``'s (k, v) buffers with room for ``need`` positions per row."""
        if need > self.max_length:
            raise TinyLMError(f"a sequence needs {need} positions; the server's cache holds "
                              f"{self.max_length} (lower max_tokens or the prompt)")
        key = id(layer)
        buf = self._k.get(key)
        if buf is None or buf.shape[2] < need:
            cap = buf.shape[2] if buf is not None else 32
            while cap < need:
                cap *= 2
            cap = min(cap, self.max_length)
            xp = k.xp
            shape = (self.max_rows, k.shape[1], cap, k.shape[3])  # (rows, Hkv, cap, hs)
            grown = []
            for old in (buf, self._v.get(key)):
                new = xp.zeros(shape, dtype=k.dtype)
                if old is not None:
                    new[:, :, :old.shape[2]] = old
                grown.append(new)
            self._k[key], self._v[key] = grown
        return self._k[key], self._v[key]

    @property
    def nbytes(self) -> int:
        return sum(int(b.nbytes) for bufs in (self._k, self._v) for b in bufs.values())


class _RowView:
    """Row ``i`` of a ``SlotCache`` as a batch-of-one cache: the forward's T new
    positions go after the row's ``length`` (a prefill, or a chunk of one)."""

    def __init__(self, cache: SlotCache, i: int):
        self.cache, self.i = cache, i
        self.start = int(cache.lengths[i])

    @property
    def length(self) -> int:
        return self.start

    def advance(self, positions):
        """Record the T new positions (T,) or (1, T); returns every key position."""
        xp = backend.get_array_module(positions)
        T = positions.shape[-1]
        self.cache.lengths[self.i] = self.start + T
        return xp.arange(self.start + T)  # (S,)

    def update(self, layer, k, v):
        """k, v (1, Hkv, T, hs) -> the row's keys and values so far (1, Hkv, S, hs)."""
        if k.shape[0] != 1:
            raise TinyLMError("a SlotCache row view takes a batch of one sequence")
        S = self.start + k.shape[2]
        kb, vb = self.cache._buffers(layer, k, S)
        i = self.i
        kb[i, :, self.start:S] = k.data[0]
        vb[i, :, self.start:S] = v.data[0]
        return Tensor(kb[i:i + 1, :, :S]), Tensor(vb[i:i + 1, :, :S])

    def static(self, layer, compute):
        raise TinyLMError("tinylm serve decodes decoder-only models (no cross-attention)")


class _PrefillView:
    """Fresh rows ``rows`` of a ``SlotCache`` taking right-padded prompts (J, T) whose
    real lengths are ``lengths``: nothing cached before, so attention reads the new
    keys themselves."""

    def __init__(self, cache: SlotCache, rows, lengths):
        self.cache = cache
        self.rows = np.asarray(rows, dtype=np.int64)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self._index = None  # the rows on the device, made at the first write

    length = 0  # positions cached before this forward

    def advance(self, positions):
        """positions (T,) = 0 .. T - 1 (the default): every key position."""
        if positions.ndim != 1:
            raise TinyLMError("a SlotCache prefill takes the default positions 0 .. T - 1")
        self.cache.lengths[self.rows] = self.lengths
        return positions

    def update(self, layer, k, v):
        """k, v (J, Hkv, T, hs) -> written to the rows' columns 0 .. T - 1; returned as
        they are (they are every key and value there is)."""
        if k.shape[0] != len(self.rows):
            raise TinyLMError(f"a SlotCache prefill of {len(self.rows)} rows got a batch of "
                              f"{k.shape[0]}")
        T = k.shape[2]
        kb, vb = self.cache._buffers(layer, k, T)
        if self._index is None:
            self._index = k.xp.asarray(self.rows)
        kb[self._index, :, :T] = k.data
        vb[self._index, :, :T] = v.data
        return k, v

    def static(self, layer, compute):
        raise TinyLMError("tinylm serve decodes decoder-only models (no cross-attention)")


class _StepView:
    """Rows 0 .. B - 1 of a ``SlotCache``, each appending ONE token at its own length."""

    def __init__(self, cache: SlotCache, B: int):
        self.cache, self.B = cache, B
        self.at = cache.lengths[:B].copy()  # (B,) the column each row writes
        self.S = int(self.at.max()) + 1
        self._index = None  # (rows, cols) on the device, made at the first write

    @property
    def length(self) -> int:
        return self.S - 1

    def advance(self, positions):
        """positions (B, 1), each row's own (= its length), or (1,) when every row has
        the same length; returns the key positions, (B, S) or (S,): column c is
        position c in every row (masked past a row's length)."""
        xp = backend.get_array_module(positions)
        if positions.shape[-1] != 1 or (positions.ndim == 2 and positions.shape[0] != self.B):
            raise TinyLMError(f"a decode step feeds one token per row: positions must be "
                              f"({self.B}, 1), got {tuple(positions.shape)}")
        self.cache.lengths[:self.B] = self.at + 1
        keys = xp.arange(self.S)
        return keys if positions.ndim == 1 else xp.broadcast_to(keys, (self.B, self.S))

    def update(self, layer, k, v):
        """k, v (B, Hkv, 1, hs) -> keys and values of rows 0..B-1 (B, Hkv, S, hs)."""
        kb, vb = self.cache._buffers(layer, k, self.S)
        if self._index is None:
            self._index = (k.xp.arange(self.B), k.xp.asarray(self.at))
        rows, cols = self._index
        kb[rows, :, cols] = k.data[:, :, 0]  # (B, Hkv, hs) scattered to each row's column
        vb[rows, :, cols] = v.data[:, :, 0]
        return Tensor(kb[:self.B, :, :self.S]), Tensor(vb[:self.B, :, :self.S])

    def static(self, layer, compute):
        raise TinyLMError("tinylm serve decodes decoder-only models (no cross-attention)")

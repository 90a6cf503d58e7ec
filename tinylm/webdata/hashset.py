"""A set of 64-bit hashes in one NumPy array: open addressing with linear probing,
every lookup and insert vectorised over a batch of keys.

    seen = HashSet64()
    seen.add_first(np.array([7, 9, 7], dtype=np.uint64))   # [False, False, True]: repeats
    seen.add_first(np.array([9, 4], dtype=np.uint64))      # [True, False]
    len(seen), seen.nbytes                                  # 3, 8 * capacity

Memory: 8 bytes per slot, kept at most half full (the table doubles when a batch would
pass that), so 16 to 32 bytes per hash: 10^8 three-sentence spans need 1.6-3.2 GB,
where a Python ``set`` of ints needs about 70 bytes each. Key 0 marks an empty slot, so
a hash equal to 0 is stored as 1 (a 2^-64 chance per key of merging the two).
"""

from __future__ import annotations

import numpy as np

from tinylm.webdata.hashing import mix64

EMPTY = np.uint64(0)


class HashSet64:
    """A growable set of uint64 keys (see the module docstring)."""

    def __init__(self, capacity: int = 1 << 12):
        capacity = 1 << max(4, int(capacity - 1).bit_length())
        self.table = np.zeros(capacity, dtype=np.uint64)
        self.size = 0

    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        return self.table.nbytes

    @staticmethod
    def _keys(keys) -> np.ndarray:
        keys = np.asarray(keys, dtype=np.uint64).ravel()
        return np.where(keys == EMPTY, np.uint64(1), keys)

    def _slots(self, keys: np.ndarray) -> np.ndarray:
        return (mix64(keys) & np.uint64(len(self.table) - 1)).astype(np.int64)

    def contains(self, keys) -> np.ndarray:
        """(n,) bool: which keys are in the set."""
        keys = self._keys(keys)
        found = np.zeros(len(keys), dtype=bool)
        pending = np.arange(len(keys))
        slots = self._slots(keys)
        mask = len(self.table) - 1
        while len(pending):
            held = self.table[slots[pending]]
            hit = held == keys[pending]
            found[pending[hit]] = True
            pending = pending[~(hit | (held == EMPTY))]
            slots[pending] = (slots[pending] + 1) & mask
        return found

    def _insert(self, keys: np.ndarray) -> None:
        """Insert distinct keys that are not in the set (the table has room)."""
        pending = np.arange(len(keys))
        slots = self._slots(keys)
        mask = len(self.table) - 1
        while len(pending):
            free = self.table[slots[pending]] == EMPTY
            # of the keys that reach one free slot together, the first takes it
            candidates = pending[free]
            taken, first = np.unique(slots[candidates], return_index=True)
            self.table[taken] = keys[candidates[first]]
            placed = np.zeros(len(keys), dtype=bool)
            placed[candidates[first]] = True
            pending = pending[~placed[pending]]
            slots[pending] = (slots[pending] + 1) & mask

    def _grow(self, extra: int) -> None:
        capacity = len(self.table)
        while 2 * (self.size + extra) > capacity:
            capacity *= 2
        if capacity == len(self.table):
            return
        old = self.table[self.table != EMPTY]
        self.table = np.zeros(capacity, dtype=np.uint64)
        self._insert(old)

    def add(self, keys) -> None:
        """Add ``keys`` (any, repeats allowed)."""
        self.add_first(keys)

    def add_first(self, keys) -> np.ndarray:
        """Add ``keys`` in order; returns (n,) bool, True where the key was already in the
        set or came earlier in ``keys``: the repeats (first occurrences are False)."""
        keys = self._keys(keys)
        unique, first = np.unique(keys, return_index=True)
        new = ~self.contains(unique)
        repeat = np.ones(len(keys), dtype=bool)
        repeat[first[new]] = False
        self._grow(int(new.sum()))
        self._insert(unique[new])
        self.size += int(new.sum())
        return repeat

    def keys(self) -> np.ndarray:
        """The members, (len,) uint64, in table order."""
        return self.table[self.table != EMPTY]

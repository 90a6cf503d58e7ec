"""SentencePiece's ``precompiled_charsmap``: normalisation rules as a darts-clone
double-array trie.

The blob is ``<uint32 little-endian: trie size in bytes> <trie> <normalized strings>``.
The trie maps a UTF-8 key (one or more characters of the input) to an offset into the
normalized strings, each terminated by a NUL byte. SentencePiece's normaliser applies,
at each position of the input, the rule with the *longest* key that is a prefix of
the rest of the input, and copies one character when none matches
(``normalizer.cc``, ``NormalizePrefix``).

Each 32-bit unit of the double array packs (darts-clone's ``DoubleArrayUnit``):

- bit 8: the node has a leaf child (a key ends here);
- bits 0-7 (and bit 31 for a leaf unit): the label, the byte that leads to the node;
- bits 10-31, shifted left by 8 when bit 9 is set: the offset that, XORed with the
  node's position, gives the base of its children: child(byte) = base ^ byte;
- a leaf unit's low 31 bits: the value (here: the offset of the normalized string).

``decode`` lists every rule at once, as ``{key: replacement}``, by walking the trie
breadth-first with NumPy: at each depth, the 255 possible children of every frontier
node are tested in one vectorised step.

    >>> rules = decode(encode({"Ａ": "A", "ｱ": "ア", "½": "1⁄2"}))
    >>> rules == {"Ａ": "A", "ｱ": "ア", "½": "1⁄2"}
    True
"""

from __future__ import annotations

import functools
import struct

import numpy as np


class CharsmapError(ValueError):
    """A ``precompiled_charsmap`` that is not a well-formed darts-clone trie."""


def _split(blob: bytes) -> tuple:
    if len(blob) < 4:
        raise CharsmapError("the charsmap is shorter than its 4-byte header")
    (trie_size,) = struct.unpack("<I", blob[:4])
    if trie_size % 4 or 4 + trie_size > len(blob):
        raise CharsmapError(f"the charsmap announces a {trie_size}-byte trie in {len(blob)} bytes")
    units = np.frombuffer(blob[4:4 + trie_size], dtype="<u4").astype(np.int64)
    return units, blob[4 + trie_size:]


def _offset(u):
    return (u >> 10) << ((u & (1 << 9)) >> 6)


_LABEL_MASK = (1 << 31) | 0xFF
_VALUE_MASK = (1 << 31) - 1


def _char_len(lead: np.ndarray) -> np.ndarray:
    """The UTF-8 length of a character from its lead byte (1 for a stray byte)."""
    return np.select([lead >= 0xF0, lead >= 0xE0, lead >= 0xC0], [4, 3, 2], 1)


class Charsmap:
    """A decoded ``precompiled_charsmap``: the rules for single characters as a
    ``str.translate`` table, and the trie itself for the (rare) rules whose key is
    several characters (a base letter and combining marks, Hangul jamo ...).

    ``singles``: ``{code point: replacement}``; ``firsts``: the characters that start
    a longer key; ``continuations``: the characters that appear after the first one
    in some key. Text without any continuation character can only meet single rules.
    """

    def __init__(self, blob: bytes):
        self.blob = bytes(blob)
        self.units, self.strings = _split(self.blob) if self.blob else (np.zeros(0, np.int64), b"")
        self.singles, self.firsts, self.continuations = {}, set(), set()
        if len(self.units):
            self._index()

    # ------------------------------------------------------------------ building the index

    def _index(self) -> None:
        u = self.units
        n = len(u)
        j = np.arange(n, dtype=np.int64)
        label = u & _LABEL_MASK
        child = np.nonzero((label >= 1) & (label <= 255))[0]  # non-leaf units reached by a byte
        parent_base = j ^ label  # a unit's parent is the node whose base is this
        self._child_pos = child[np.argsort(parent_base[child], kind="stable")]
        self._child_key = parent_base[self._child_pos]
        root = np.array([int(_offset(u[0]))], dtype=np.int64)
        chars, bases, parents = self._expand_chars(root)
        leaf = self._has_leaf(bases)
        for c, b, is_leaf in zip(chars, bases.tolist(), leaf.tolist()):
            if is_leaf:
                self.singles[ord(c)] = self._value(b)
        inner = self._has_children(bases)
        self.firsts = {c for c, more in zip(chars, inner.tolist()) if more}
        seen = set()
        frontier = np.unique(bases[inner])
        while len(frontier):
            seen.update(frontier.tolist())
            chars, next_bases, _ = self._expand_chars(frontier)
            self.continuations.update(chars)
            nxt = np.unique(next_bases[self._has_children(next_bases)])
            frontier = nxt[~np.isin(nxt, np.fromiter(seen, np.int64, len(seen)))]

    def _children(self, bases: np.ndarray) -> tuple:
        """``(index into bases, child unit position)`` of every child of every base."""
        lo = np.searchsorted(self._child_key, bases, "left")
        hi = np.searchsorted(self._child_key, bases, "right")
        counts = hi - lo
        owner = np.repeat(np.arange(len(bases)), counts)
        starts = np.repeat(lo - np.cumsum(counts) + counts, counts)
        pos = self._child_pos[starts + np.arange(int(counts.sum()))] if len(owner) else owner
        return owner, pos

    def _expand_chars(self, bases: np.ndarray) -> tuple:
        """Every character that leads out of a node of ``bases``: ``(chars, the bases
        reached after it, index of the starting base)``."""
        owner, pos = self._children(bases)
        first = self.units[pos] & 0xFF
        need = _char_len(first)
        byte_rows = [first]
        cur_pos, cur_owner, cur_need = pos, owner, need
        done_chars, done_bases, done_owner = [], [], []
        length = 1
        while len(cur_pos):
            new_base = cur_pos ^ _offset(self.units[cur_pos])
            full = cur_need == length
            if full.any():
                rows = np.stack([r[full] for r in byte_rows], axis=1).astype(np.uint8)
                done_chars.extend(bytes(r).decode("utf-8", "replace") for r in rows)
                done_bases.append(new_base[full])
                done_owner.append(cur_owner[full])
            keep = ~full
            if not keep.any() or length >= 4:
                break
            sub_owner, sub_pos = self._children(new_base[keep])
            byte_rows = [r[keep][sub_owner] for r in byte_rows] + [self.units[sub_pos] & 0xFF]
            cur_owner = cur_owner[keep][sub_owner]
            cur_need = cur_need[keep][sub_owner]
            cur_pos = sub_pos
            length += 1
        if not done_bases:
            empty = np.zeros(0, np.int64)
            return [], empty, empty
        return done_chars, np.concatenate(done_bases), np.concatenate(done_owner)

    def _has_leaf(self, bases: np.ndarray) -> np.ndarray:
        n = len(self.units)
        inside = bases < n
        unit = self.units[np.minimum(bases, n - 1)]
        return inside & ((unit >> 31) == 1)

    def _has_children(self, bases: np.ndarray) -> np.ndarray:
        lo = np.searchsorted(self._child_key, bases, "left")
        hi = np.searchsorted(self._child_key, bases, "right")
        return hi > lo

    def _value(self, base: int) -> str:
        return _text(_cstring(self.strings, int(self.units[base]) & _VALUE_MASK))

    # ------------------------------------------------------------------ lookups

    def prefix_matches(self, data: bytes, start: int = 0):
        """Yield ``(length in bytes, replacement)`` for each key that is a prefix of
        ``data[start:]``, shortest first (darts' ``commonPrefixSearch``)."""
        u, n = self.units, len(self.units)
        if not n:
            return
        node = int(_offset(u[0]))
        for i in range(start, len(data)):
            c = data[i]
            node ^= c
            if node >= n:
                return
            unit = int(u[node])
            if unit & _LABEL_MASK != c:
                return
            node ^= (unit >> 10) << ((unit & (1 << 9)) >> 6)
            if (unit >> 8) & 1:
                yield i + 1 - start, self._value(node)

    def rules(self) -> dict:
        """Every rule, ``{key: replacement}``. The DAG-shaped tries SentencePiece
        ships list hundreds of thousands of keys (nmt_nfkc: about 225,000); this walks
        them all (for tests and small tries; normalising never needs it)."""
        return decode(self.blob)


def decode(blob: bytes) -> dict:
    """``{key text: replacement text}`` of every rule in ``blob`` (a bytes
    ``precompiled_charsmap``; empty: no rules), walking the trie breadth-first."""
    if not blob:
        return {}
    units, strings = _split(blob)
    if not len(units):
        return {}
    n = len(units)
    labels = np.arange(1, 256, dtype=np.int64)
    frontier = np.array([int(_offset(units[:1])[0])], dtype=np.int64)  # bases
    prefixes = [b""]
    rules = {}
    for _depth in range(256):
        if not len(frontier):
            break
        child = frontier[:, None] ^ labels[None, :]  # (m, 255) positions of children
        inside = child < n
        unit = np.where(inside, units[np.minimum(child, n - 1)], -1)
        ok = inside & ((unit & _LABEL_MASK) == labels[None, :])
        rows, cols = np.nonzero(ok)
        found = unit[rows, cols]
        bases = child[rows, cols] ^ _offset(found)
        new_prefixes = [prefixes[r] + bytes([c + 1]) for r, c in zip(rows.tolist(), cols.tolist())]
        leaf = (found >> 8) & 1 == 1
        if leaf.any():
            if bases[leaf].max() >= n:
                raise CharsmapError("a leaf of the charsmap trie points outside it")
            values = units[bases[leaf]] & _VALUE_MASK
            for k, v in zip(np.nonzero(leaf)[0].tolist(), values.tolist()):
                rules[_text(new_prefixes[k])] = _text(_cstring(strings, v))
        frontier, prefixes = bases, new_prefixes
    else:
        raise CharsmapError("the charsmap trie is deeper than 256 bytes (a cycle?)")
    return rules


def _cstring(strings: bytes, offset: int) -> bytes:
    end = strings.find(b"\x00", offset)
    if offset >= len(strings) or end < 0:
        raise CharsmapError(f"a rule points at offset {offset} of {len(strings)} bytes of strings")
    return strings[offset:end]


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise CharsmapError(f"a charsmap key or value is not UTF-8: {data[:20]!r}") from None


# ---------------------------------------------------------------------- building


def encode(rules: dict) -> bytes:
    """A ``precompiled_charsmap`` for ``{key text: replacement text}`` (the inverse of
    ``decode``; used to save normalisation rules, e.g. read from a tokenizer.json)."""
    if not rules:
        return b""
    keys = sorted((k.encode("utf-8"), v.encode("utf-8")) for k, v in rules.items())
    strings, offsets = bytearray(), []
    for _, v in keys:
        offsets.append(len(strings))
        strings += v + b"\x00"
    units = _build([k for k, _ in keys], offsets)
    trie = np.asarray(units, dtype="<u4").tobytes()
    return struct.pack("<I", len(trie)) + trie + bytes(strings)


def _build(keys: list, values: list) -> list:
    """A double array for sorted byte ``keys`` (near-first-fit placement with unique
    bases; not darts-clone's layout, but read by the same traversal)."""
    if any(not k or b"\x00" in k for k in keys):
        raise CharsmapError("charsmap keys must be non-empty and free of NUL bytes")
    units = [0] * 1024
    used_pos, used_base = {0}, set()
    free = [1]  # where the search for a free position starts (moves forward only)

    def place(node, labels):
        q = free[0]
        while True:
            while q in used_pos:
                q += 1
            base = q ^ labels[0]
            if base and base not in used_base and all((base ^ lab) not in used_pos for lab in labels):
                break
            q += 1
        if base >= 1 << 21:
            raise CharsmapError("the charsmap is too large for this builder")
        free[0] = max(free[0], q - 64)  # leaves a few holes behind: linear time overall
        top = max(base ^ lab for lab in labels) + 1
        if top > len(units):
            units.extend([0] * (top - len(units) + 1024))
        used_base.add(base)
        used_pos.update(base ^ lab for lab in labels)
        units[node] |= (base ^ node) << 10
        return base

    stack = [(0, 0, len(keys), 0)]
    while stack:
        node, lo, hi, depth = stack.pop()
        group, i = [], lo
        while i < hi:
            lab = keys[i][depth] if depth < len(keys[i]) else 0
            j = i
            while j < hi and (keys[j][depth] if depth < len(keys[j]) else 0) == lab:
                j += 1
            group.append((lab, i, j))
            i = j
        base = place(node, [lab for lab, _, _ in group])
        for lab, a, b in group:
            child = base ^ lab
            if lab == 0:  # a key ends here: the leaf holds the value
                units[child] = (1 << 31) | values[a]
                units[node] |= 1 << 8
            else:
                units[child] |= lab
                stack.append((child, a, b, depth + 1))
    while units and units[-1] == 0:
        units.pop()
    # SentencePiece requires whole darts-clone blocks: 256 units (1024 bytes)
    return units + [0] * (-len(units) % 256)


@functools.lru_cache(maxsize=8)
def cached(blob: bytes) -> Charsmap:
    """``Charsmap(blob)``, decoded once per process for each blob (a trainer and the
    tokenizer it makes share one; a Charsmap is never changed after it is built)."""
    return Charsmap(bytes(blob))

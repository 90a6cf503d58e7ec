"""Byte-level BPE, compatible with GPT-2, tiktoken and Hugging Face ``tokenizers``.

Encoding has two steps. The pre-tokenizer (``pretokenize.py``) cuts the text into
pieces with a regex; each piece is turned into its UTF-8 bytes, one token per byte,
and then adjacent tokens are merged, best-ranked pair first, until no adjacent pair
has a merge. A worked example with the merges ``1: (h, e)``, ``2: (l, l)``,
``3: (he, ll)``::

    "hello"  ->  h e l l o  ->  he l l o  ->  he ll o  ->  hell o

At each step every adjacent pair is looked up and the lowest rank wins, the leftmost
on a tie, exactly as ``tokenizers``' BPE model does. Two rank rules exist:

- ``merges`` mode (GPT-2 ``merges.txt``, ``tokenizer.json``, tinylm's trainer): a pair
  merges if it is listed, with its position in the list as its rank;
- ``ranks`` mode (tiktoken): a pair merges if the concatenation of its bytes is a token,
  with that token's id as its rank; and a piece that is a token as a whole is that
  token (``ignore_merges``, which ``tokenizer.json`` may also switch on).

For a vocabulary learned by BPE the two agree; both are kept so that files from each
peer encode exactly as that peer does.

Speed: natural text repeats its words, so each distinct piece is merged once and its
ids cached (a dict from piece to a tuple of ids); once its pieces are known, encoding a
text is a regex ``findall`` and a C-level ``map`` over the pieces. The pieces a text
brings that the cache lacks are merged all together, vectorized with NumPy
(``_merge_batch``). bench/tokenizers.py measures it against tiktoken.
"""

from __future__ import annotations

import gc
import heapq
import threading
from functools import reduce
from itertools import islice, repeat
from operator import iconcat

from tinylm.tokenizers import formats
from tinylm.tokenizers.base import (
    Tokenizer, TokenizerError, as_id_list, atomic_write, bad_ids_error, check_text,
    hf_added_tokens, is_token_id, read_special_tokens, special_token_rows, surrogate_error,
    token_id_problem,
)
from tinylm.tokenizers.formats import from_bytelevel, to_bytelevel
from tinylm.tokenizers.pretokenize import PreTokenizer, hf_pattern, pattern_name, resolve_pattern

_CACHE_MAX = 1 << 17  # distinct pieces remembered before the cache starts over
_CACHE_PIECE_MAX = 256  # longer pieces (runs of spaces, base64 blobs) are not kept
_LONG_PIECE = 64  # from this many bytes on, merge with a heap (n log n) not a scan (n^2)
_BATCH_MIN = 32  # this many new pieces at once are merged together, vectorized
_CHUNK = 1 << 20  # pieces per round of the cache (bounds its size on huge texts)


class BPETokenizer(Tokenizer):
    """Byte-level BPE.

    ``tokens``: id -> bytes for every ordinary token (a list with None at special or
    unused ids, or a dict); the 256 single bytes must all be there. ``merges``: the
    ``(left id, right id)`` pairs in priority order, or None for tiktoken's ``ranks``
    mode. ``special_tokens``: ``{text: id}``. ``pattern``: the pre-tokenization
    pattern ("gpt2", "gpt4" or a regex).

        >>> tok = BPETokenizer.train("low lower lowest " * 50, vocab_size=262)
        >>> [tok.id_to_token(i) for i in range(256, 262)]   # "Ġ" is the space byte
        ['lo', 'low', 'Ġlow', 'Ġlowe', 'st', 'Ġlower']
        >>> tok.encode(" lowest")
        [259, 260]
        >>> tok.decode([259, 260])
        ' lowest'
    """

    name = "bpe"
    FORMAT_VERSION = 1

    def __init__(self, tokens, merges=None, special_tokens=None, *, pattern: str = "gpt2",
                 ignore_merges: bool | None = None, add_prefix_space: bool = False):
        if isinstance(tokens, dict):
            bad = next((i for i in tokens if not is_token_id(i)), None)
            if bad is not None:
                raise TokenizerError(token_id_problem(f"token {tokens[bad]!r}", bad))
            size = max(tokens, default=-1) + 1
            table = [None] * size
            for i, t in tokens.items():
                table[i] = t
            tokens = table
        special_tokens = dict(special_tokens or {})
        for text, i in special_tokens.items():
            if not isinstance(text, str) or not text:
                raise TokenizerError(f"special tokens are non-empty strings, not {text!r}")
            if not is_token_id(i):
                raise TokenizerError(token_id_problem(f"special token {text!r}", i))
        for i, t in enumerate(tokens):
            if t is not None and not (isinstance(t, bytes) and t):
                raise TokenizerError(f"token {i} is {t!r}; tokens are non-empty bytes (or None "
                                     f"for an unused or special id)")
        size = max(len(tokens), max(special_tokens.values(), default=-1) + 1)
        self._tokens = list(tokens) + [None] * (size - len(tokens))
        for i in special_tokens.values():
            self._tokens[i] = None  # a special id is never an ordinary token
        self.special_tokens = special_tokens
        self._decoder = list(self._tokens)
        self._decoder_plain = list(self._tokens)  # for skip_special_tokens: specials as b""
        for text, i in special_tokens.items():
            self._decoder[i] = text.encode("utf-8", "surrogatepass")
            self._decoder_plain[i] = b""
        self._encoder = {t: i for i, t in enumerate(self._tokens) if t is not None}
        missing = [b for b in range(256) if bytes([b]) not in self._encoder]
        if missing:
            raise TokenizerError(f"a byte-level BPE needs a token for each of the 256 bytes; "
                                 f"{len(missing)} are missing (first: 0x{missing[0]:02x})")
        self._byte_ids = [self._encoder[bytes([b])] for b in range(256)]

        self.pattern = resolve_pattern(pattern)
        self._pretokenizer = PreTokenizer(self.pattern)
        self.add_prefix_space = bool(add_prefix_space)
        self.mode = "ranks" if merges is None else "merges"
        self.ignore_merges = (merges is None) if ignore_merges is None else bool(ignore_merges)
        self._merges = None if merges is None else [tuple(m) for m in merges]
        self._ranks, self._merged = self._merge_table()
        self._reset_cache()

    def _reset_cache(self) -> None:
        self._cache = {}  # piece -> tuple of ids
        self._tables = None  # the merge table as sorted NumPy arrays, for _merge_batch
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # pickling (e.g. to DataLoader workers): no cache
        state = dict(self.__dict__)
        for key in ("_cache", "_tables", "_lock"):
            state.pop(key)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_cache()

    def _merge_table(self) -> tuple:
        """``({(left, right): rank}, merged)`` with ``merged[rank]`` the new id."""
        ranks = {}
        if self._merges is None:  # tiktoken: any split of a token into two tokens
            encoder = self._encoder
            for token, i in encoder.items():
                for k in range(1, len(token)):
                    left, right = encoder.get(token[:k]), encoder.get(token[k:])
                    if left is not None and right is not None:
                        ranks[left, right] = i
            return ranks, range(len(self._tokens))
        merged = []
        for rank, (a, b) in enumerate(self._merges):
            ta = self._tokens[a] if 0 <= a < len(self._tokens) else None
            tb = self._tokens[b] if 0 <= b < len(self._tokens) else None
            if ta is None or tb is None:
                raise TokenizerError(f"merge {rank} ({a}, {b}) names an id that is not an "
                                     f"ordinary token")
            new = self._encoder.get(ta + tb)
            if new is None:
                raise TokenizerError(f"merge {rank} ({to_bytelevel(ta)!r} + {to_bytelevel(tb)!r}) "
                                     f"makes {to_bytelevel(ta + tb)!r}, which is not in the "
                                     f"vocabulary")
            ranks[a, b] = rank  # a pair listed twice keeps its last rank, as tokenizers does
            merged.append(new)
        return ranks, merged

    # ------------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        return len(self._decoder)

    @property
    def merges(self) -> list:
        """The ``(left id, right id)`` merges in rank order (derived from the ranks in
        ``ranks`` mode: the last merge of each token's own bytes)."""
        if self._merges is None:
            self._merges_derived = getattr(self, "_merges_derived", None) or self._derive_merges()
            return list(self._merges_derived)
        return list(self._merges)

    def token_to_id(self, token: str):
        if token in self.special_tokens:
            return self.special_tokens[token]
        data = from_bytelevel(token) if isinstance(token, str) else None
        return None if data is None else self._encoder.get(data)

    def id_to_token(self, id: int):
        if not isinstance(id, int) or not 0 <= id < len(self._decoder):
            return None
        token = self._tokens[id]
        if token is not None:
            return to_bytelevel(token)
        for text, i in self.special_tokens.items():
            if i == id:
                return text
        return None

    def token_bytes(self, id: int) -> bytes:
        """The bytes of one token (the UTF-8 text of a special token)."""
        return self.decode_bytes([id])

    def get_vocab(self) -> dict:
        """``{spelling: id}``: byte-level spellings and the special tokens' texts."""
        vocab = {to_bytelevel(t): i for i, t in enumerate(self._tokens) if t is not None}
        vocab.update(self.special_tokens)
        return vocab

    def __repr__(self) -> str:
        return (f"BPETokenizer(vocab_size={self.vocab_size}, pattern="
                f"{pattern_name(self.pattern) or self.pattern!r}, mode={self.mode!r}, "
                f"special_tokens={len(self.special_tokens)})")

    # ------------------------------------------------------------------ encode

    def encode(self, text: str, *, allowed_special=(), disallowed_special="all") -> list:
        return self._encode_with_specials(text, allowed_special, disallowed_special,
                                          self.encode_ordinary)

    def encode_ordinary(self, text: str) -> list:
        """The ids of ``text`` with special tokens treated as plain text."""
        check_text(text)
        if self.add_prefix_space and text and not text.startswith(" "):
            text = " " + text
        pieces = self._pretokenizer.split(text)
        if len(pieces) <= _CHUNK:
            return self._encode_pieces(pieces, text)
        ids = []
        for k in range(0, len(pieces), _CHUNK):
            ids.extend(self._encode_pieces(pieces[k:k + _CHUNK], text))
        return ids

    def _encode_pieces(self, pieces: list, text: str) -> list:
        lookup = self._cache.__getitem__
        try:  # the fast path: every piece seen before
            return _concat(map(lookup, pieces))
        except KeyError:
            pass
        with self._lock:  # the cache changes only here (threads may share a tokenizer)
            # Learning allocates a tuple per new piece and nothing cyclic: pausing the
            # cyclic garbage collector saves the ~10 collections (12% of a first pass
            # over tinyshakespeare) that would each walk the big young lists.
            collecting = gc.isenabled()
            gc.disable()
            try:
                long = self._learn(pieces)
            except UnicodeEncodeError:
                raise surrogate_error(text) from None
            finally:
                if collecting:
                    gc.enable()
            ids = _concat(map(lookup, pieces))
            for piece in long:
                del self._cache[piece]
        return ids

    def _learn(self, pieces: list) -> list:
        """Put the ids of every piece of ``pieces`` in the cache; returns the long
        pieces among them, which the caller drops after use."""
        cache = self._cache
        new = set(pieces).difference(cache)
        if len(cache) + len(new) > _CACHE_MAX:
            cache.clear()
            new = set(pieces)
        new = list(new)
        data = list(map(str.encode, new))  # UTF-8
        longest = max(map(len, data), default=0)
        if len(new) < _BATCH_MIN:
            cache.update(zip(new, map(self._encode_piece_bytes, data)))
        elif longest < _LONG_PIECE and not self.ignore_merges:
            cache.update(zip(new, self._merge_batch(data)))
        else:  # whole-token pieces and long ones one by one, the others together
            batch, batch_data = [], []
            for piece, raw in zip(new, data):
                if len(raw) >= _LONG_PIECE or (self.ignore_merges and raw in self._encoder):
                    cache[piece] = self._encode_piece_bytes(raw)
                else:
                    batch.append(piece)
                    batch_data.append(raw)
            if batch:
                cache.update(zip(batch, self._merge_batch(batch_data)))
        if longest <= _CACHE_PIECE_MAX:  # a piece has no more characters than bytes
            return []
        return [piece for piece in new if len(piece) > _CACHE_PIECE_MAX]

    def encode_bytes(self, data) -> list:
        """The ids of arbitrary bytes (valid UTF-8 or not; special tokens are plain).

        Valid UTF-8 encodes exactly as ``encode_ordinary(data.decode())``; other bytes
        are pre-tokenized as if each invalid byte were a punctuation character, so
        ``decode_bytes(encode_bytes(b)) == b`` for every ``b``.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TokenizerError(f"encode_bytes takes bytes, not {type(data).__name__}")
        data = bytes(data)
        try:
            return self.encode_ordinary(data.decode("utf-8"))
        except UnicodeDecodeError:
            pass
        text = data.decode("utf-8", "surrogateescape")  # bad bytes -> U+DC80..U+DCFF
        ids = []
        for piece in self._pretokenizer.split(text):
            ids.extend(self._encode_piece_bytes(piece.encode("utf-8", "surrogateescape")))
        return ids

    def _encode_piece_bytes(self, data: bytes) -> tuple:
        """The ids of one piece (this is the cache's miss path: keep it lean)."""
        if self.ignore_merges:
            whole = self._encoder.get(data)
            if whole is not None:
                return (whole,)
        ids = list(map(self._byte_ids.__getitem__, data))
        if len(ids) < 2:
            return tuple(ids)
        if len(ids) >= _LONG_PIECE:
            return tuple(self._merge_long(ids))
        return tuple(self._merge(ids))

    def _merge(self, ids: list) -> list:
        """Apply merges to ``ids`` in place: lowest rank first, leftmost on a tie."""
        get = self._ranks.get
        merged = self._merged
        none = len(merged)  # a rank past every real one: "no merge"
        ranks = list(map(get, zip(ids, ids[1:]), repeat(none)))  # ranks[i]: ids[i], ids[i+1]
        n = len(ranks)
        while True:
            best = min(ranks)
            if best == none:
                return ids
            i = ranks.index(best)
            new = merged[best]
            ids[i] = new
            del ids[i + 1]
            del ranks[i]
            n -= 1
            if not n:
                return ids
            if i:
                ranks[i - 1] = get((ids[i - 1], new), none)
            if i < n:
                ranks[i] = get((new, ids[i + 1]), none)

    def _merge_batch(self, pieces: list) -> list:
        """``_merge`` for many pieces (bytes, each shorter than ``_LONG_PIECE``) at
        once, vectorized with NumPy: all pieces sit end to end in one id array, and each
        round merges, in every piece at the same time, its lowest-ranked (leftmost)
        pair; a piece leaves when it has no pair left. Rounds are as many as the most
        merges any piece needs (15 on tinyshakespeare), and each touches only the
        pairs next to a merge. Returns a tuple of ids per piece."""
        import numpy as np

        if self._tables is None:
            self._tables = self._merge_arrays()
        rank_of, merged, byte_ids, byte_pair_ranks = self._tables
        none = len(merged)

        lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
        data = np.frombuffer(b"".join(pieces), dtype=np.uint8)
        ids = byte_ids[data]  # (N,)
        starts = np.cumsum(lengths) - lengths  # (P,) where each piece begins in ids
        ranks = np.append(byte_pair_ranks[data[:-1], data[1:]], none)  # pair (i, i + 1)
        ranks[starts + lengths - 1] = none  # no pair across two pieces
        which = np.arange(len(pieces))  # the original index of each piece still merging
        positions = np.arange(len(ids))
        done_ids, done_which, done_lengths = [], [], []  # the pieces that left, per round
        while True:
            n = len(ids)
            # Per piece, the lowest rank * n + position: its best pair, leftmost on a tie.
            key = ranks * n
            key += positions[:n]
            rank, pos = np.divmod(np.minimum.reduceat(key, starts), n)
            merging = rank < none
            keep = np.ones(n, dtype=bool)
            if merging.all():
                offset, lengths = pos - starts, lengths - 1
            else:  # finished pieces leave
                done = ~merging
                leaving = np.repeat(done, lengths)
                done_ids.append(ids[leaving])
                done_which.append(which[done])
                done_lengths.append(lengths[done])
                if not merging.any():
                    break
                keep[leaving] = False
                rank, pos = rank[merging], pos[merging]
                offset = pos - starts[merging]
                lengths, which = lengths[merging] - 1, which[merging]
            ids[pos] = merged[rank]
            keep[pos + 1] = False
            ids, ranks = ids[keep], ranks[keep]
            starts = np.cumsum(lengths) - lengths
            at = starts + offset  # where each new token now is
            last = offset == lengths - 1
            right = at[~last]  # the pair (new, next)
            ranks[right] = rank_of(ids[right], ids[right + 1])
            ranks[at[last]] = none
            left = at[offset > 0] - 1  # the pair (previous, new)
            ranks[left] = rank_of(ids[left], ids[left + 1])
        # One tuple per piece, in the order they left (islice takes each piece's ids
        # from one shared iterator), then put back in the pieces' order.
        flat = iter(np.concatenate(done_ids).tolist())
        lengths = np.concatenate(done_lengths).tolist()
        out = list(map(tuple, map(islice, repeat(flat), lengths)))
        return list(map(out.__getitem__, np.argsort(np.concatenate(done_which)).tolist()))

    def _merge_arrays(self) -> tuple:
        """The merge table for ``_merge_batch``: ``rank_of(left, right)`` (the ranks of
        the pairs ``(left[i], right[i])``, ``none`` if absent), rank -> new id, byte ->
        id, and the ranks of all byte pairs as a 256 x 256 table."""
        import numpy as np

        none = len(self._merged)
        pairs = np.array(list(self._ranks), dtype=np.int64).reshape(-1, 2)
        pair_ranks = np.fromiter(self._ranks.values(), dtype=np.int64, count=len(self._ranks))
        rank_of = _PairTable(pairs, pair_ranks, none, size=max(self.vocab_size, 1))
        byte_ids = np.asarray(self._byte_ids, dtype=np.int64)
        # The first lookup, of byte pairs, from a dense 256 x 256 table.
        byte_pair_ranks = np.full((256, 256), none, dtype=np.int64)
        byte_of = {i: b for b, i in enumerate(self._byte_ids)}
        for (left, right), rank in self._ranks.items():
            if left in byte_of and right in byte_of:
                byte_pair_ranks[byte_of[left], byte_of[right]] = rank
        return rank_of, np.asarray(self._merged, dtype=np.int64), byte_ids, byte_pair_ranks

    def _merge_long(self, ids: list) -> list:
        """``_merge`` for long pieces: a heap of (rank, position) over a linked list,
        as ``tokenizers`` does, so a 100,000-byte piece takes n log n, not n^2."""
        get = self._ranks.get
        merged = self._merged
        n = len(ids)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap = [(r, i) for i, r in enumerate(map(get, zip(ids, ids[1:]))) if r is not None]
        heapq.heapify(heap)
        while heap:
            rank, i = heapq.heappop(heap)
            j = nxt[i] if alive[i] else n
            if j >= n or get((ids[i], ids[j])) != rank:
                continue  # stale: a neighbour was merged since this entry was pushed
            new = merged[rank]
            ids[i] = new
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            p = prv[i]
            if p >= 0:
                r = get((ids[p], new))
                if r is not None:
                    heapq.heappush(heap, (r, p))
            if nxt[i] < n:
                r = get((new, ids[nxt[i]]))
                if r is not None:
                    heapq.heappush(heap, (r, i))
        return [t for t, keep in zip(ids, alive) if keep]

    def _derive_merges(self) -> list:
        """In ranks mode: for each token (in rank order), the pair its own bytes end up
        as when merged with lower ranks only; tokens that never come out as one pair
        are unreachable and get no merge."""
        merges = []
        for rank, token in enumerate(self._tokens):
            if token is None or len(token) < 2:
                continue
            ids = [self._byte_ids[b] for b in token]
            while len(ids) > 2:
                ranks = [self._ranks.get(p) for p in zip(ids, ids[1:])]
                usable = [r for r in ranks if r is not None and r < rank]
                if not usable:
                    break
                i = ranks.index(min(usable))
                ids[i:i + 2] = [self._merged[min(usable)]]
            if len(ids) == 2 and self._ranks.get(tuple(ids)) == rank:
                merges.append(tuple(ids))
        return merges

    # ------------------------------------------------------------------ decode

    def decode_bytes(self, ids, *, skip_special_tokens: bool = False) -> bytes:
        ids = as_id_list(ids)
        table = self._decoder_plain if skip_special_tokens else self._decoder
        try:
            if ids and min(ids) < 0:
                raise IndexError
            return b"".join(map(table.__getitem__, ids))
        except (IndexError, TypeError):
            raise bad_ids_error(ids, self.vocab_size,
                                known=lambda i: self._decoder[i] is not None) from None

    # ------------------------------------------------------------------ training

    @classmethod
    def train(cls, texts, vocab_size: int, *, min_frequency: int = 2, special_tokens=(),
              pattern: str = "gpt2", progress: bool = False) -> "BPETokenizer":
        """Learn a byte-level BPE from a str or an iterable of str (each pre-tokenized
        as a whole). ``vocab_size`` counts the 256 bytes and the special tokens;
        training stops earlier when the best pair occurs fewer than
        ``min_frequency`` times. Same merges as ``tokenizers``' BpeTrainer with the
        full byte alphabet (see ``bpe_train``)."""
        from tinylm.tokenizers.bpe_train import count_words

        special_tokens = _check_train_args(vocab_size, min_frequency, special_tokens)
        pretokenizer = PreTokenizer(pattern)
        counts = count_words(texts, pretokenizer, special_tokens)
        return cls._from_counts(counts, vocab_size, min_frequency, special_tokens, pattern,
                                progress)

    @classmethod
    def train_from_files(cls, paths, vocab_size: int, *, min_frequency: int = 2,
                         special_tokens=(), pattern: str = "gpt2",
                         progress: bool = False) -> "BPETokenizer":
        """``train`` on UTF-8 text files, pre-tokenized line by line (each line keeps
        its newline) exactly as ``tokenizers``' ``train(files)`` reads them."""
        from tinylm.tokenizers.bpe_train import count_file_words

        if isinstance(paths, (str, bytes)) or not hasattr(paths, "__iter__"):
            paths = [paths]
        paths = list(paths)
        special_tokens = _check_train_args(vocab_size, min_frequency, special_tokens)
        pretokenizer = PreTokenizer(pattern)
        bar = None
        if progress:
            import os

            from tqdm.auto import tqdm

            total = sum(os.path.getsize(p) for p in paths if os.path.isfile(p))
            bar = tqdm(total=total, desc="reading", unit="B", unit_scale=True, leave=False)
        try:
            counts = count_file_words(paths, pretokenizer, special_tokens, progress=bar)
        finally:
            if bar is not None:
                bar.close()
        return cls._from_counts(counts, vocab_size, min_frequency, special_tokens, pattern,
                                progress)

    @classmethod
    def _from_counts(cls, counts, vocab_size, min_frequency, special_tokens, pattern, progress):
        from tinylm.tokenizers.bpe_train import learn_merges

        tokens, merges, specials = learn_merges(counts, vocab_size, min_frequency=min_frequency,
                                                special_tokens=special_tokens, progress=progress)
        return cls(tokens, merges, specials, pattern=pattern)

    # ------------------------------------------------------------------ files

    def save(self, path, format: str | None = None) -> None:
        """Save as ``format``: "tinylm" (the default; plain text), "hf" (a Hugging Face
        ``tokenizer.json``; the default when ``path`` ends in ``.json``), "tiktoken" (a
        ranks file; special tokens and the pattern are not part of that format) or
        "gpt2" (``path`` is a directory that gets ``vocab.json`` and ``merges.txt``)."""
        from pathlib import Path

        path = Path(path)
        format = format or ("hf" if path.suffix == ".json" else "tinylm")
        if format == "tinylm":
            atomic_write(path, self._tinylm_text())
        elif format == "hf":
            atomic_write(path, formats.hf_json_text(self.to_hf_dict()))
        elif format == "tiktoken":
            ranks = [(t, i) for i, t in enumerate(self._tokens) if t is not None]
            atomic_write(path, formats.tiktoken_text(ranks))
        elif format == "gpt2":
            if not path.is_dir():
                raise TokenizerError(f"format 'gpt2' saves vocab.json and merges.txt into a "
                                     f"directory; {str(path)!r} is not one")
            import json

            atomic_write(path / "vocab.json",
                         json.dumps(self.get_vocab(), ensure_ascii=False) + "\n")
            atomic_write(path / "merges.txt", formats.merges_text(self._spelled_merges()))
        else:
            raise TokenizerError(f"unknown format {format!r}; expected 'tinylm', 'hf', "
                                 f"'tiktoken' or 'gpt2'")

    def _spelled_merges(self) -> list:
        return [(to_bytelevel(self._tokens[a]), to_bytelevel(self._tokens[b]))
                for a, b in self.merges]

    def _tinylm_text(self) -> str:
        w = formats.PlainWriter(self.name, self.FORMAT_VERSION)
        w.field("pattern", self.pattern)
        w.field("mode", self.mode)
        w.field("ignore_merges", self.ignore_merges)
        w.field("add_prefix_space", self.add_prefix_space)
        w.section("special_tokens", special_token_rows(sorted(self.special_tokens.items(),
                                                              key=lambda kv: kv[1])))
        w.section("tokens", (f"{i} {to_bytelevel(t)}" for i, t in enumerate(self._tokens)
                             if t is not None))
        w.section("merges", () if self._merges is None else
                  (f"{a} {b}" for a, b in self._spelled_merges()))
        return w.text()

    @classmethod
    def load(cls, path) -> "BPETokenizer":
        """Read a file ``save`` wrote in tinylm's format."""
        r = formats.PlainReader(path, cls.name)
        pattern = r.field("pattern")
        mode = r.field("mode")
        ignore_merges = r.field("ignore_merges")
        add_prefix_space = r.field("add_prefix_space")
        if mode not in ("merges", "ranks") or not isinstance(pattern, str):
            r.fail(f"mode must be 'merges' or 'ranks', not {mode!r}")
        specials = read_special_tokens(r)
        tokens = {}
        for k, row in enumerate(r.section("tokens")):
            i, _, spelling = row.partition(" ")
            data = from_bytelevel(spelling)
            if not i.isdigit() or data is None or not data:
                r.row_error(k, f"expected 'ID TOKEN' (a byte-level spelling), got {row[:60]!r}")
            r.check_id(k, f"token {spelling[:40]!r}", int(i))
            tokens[int(i)] = data
        encoder = {t: i for i, t in tokens.items()}
        merges = []
        for k, row in enumerate(r.section("merges")):
            a, _, b = row.partition(" ")
            ia, ib = encoder.get(from_bytelevel(a) or b""), encoder.get(from_bytelevel(b) or b"")
            if ia is None or ib is None:
                r.row_error(k, f"merge {row[:60]!r} names a token that is not in the vocabulary")
            merges.append((ia, ib))
        r.end()
        try:
            return cls(tokens, merges if mode == "merges" else None, specials, pattern=pattern,
                       ignore_merges=ignore_merges, add_prefix_space=add_prefix_space)
        except TokenizerError as e:
            raise formats.file_error(path, f"{e}; the file is corrupted") from None

    # ------------------------------------------------------------------ peers' formats

    def to_hf_dict(self) -> dict:
        """This tokenizer as a Hugging Face ``tokenizer.json`` object."""
        name = pattern_name(self.pattern)
        byte_level = {"type": "ByteLevel", "add_prefix_space": self.add_prefix_space,
                      "trim_offsets": True, "use_regex": name == "gpt2"}
        if name == "gpt2":
            pre_tokenizer = byte_level
        else:
            pre_tokenizer = {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": hf_pattern(self.pattern)},
                 "behavior": "Isolated", "invert": False},
                byte_level]}
        ignore_merges = self.ignore_merges
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": formats.hf_added_tokens(self.special_tokens),
            "normalizer": None,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": {"type": "ByteLevel", "add_prefix_space": True,
                               "trim_offsets": False, "use_regex": True},
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                        "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": ignore_merges, "vocab": self.get_vocab(),
                      "merges": [list(m) for m in self._spelled_merges()]},
        }

    @classmethod
    def from_hf_json(cls, path, *, parsed=None) -> "BPETokenizer":
        """Load a Hugging Face ``tokenizer.json`` with a byte-level BPE model (``path``:
        the file, or its parsed JSON object)."""
        if isinstance(path, dict):  # the parsed JSON itself
            path, parsed = "tokenizer.json", path
        obj = formats.read_json(path) if parsed is None else parsed
        fail = lambda message: formats.file_error(path, message)  # noqa: E731
        model = obj.get("model") if isinstance(obj, dict) else None
        if not isinstance(model, dict) or model.get("type", "BPE") != "BPE":
            raise fail("not a tokenizer.json with a BPE model")
        for key, fine in (("byte_fallback", (False, None)), ("dropout", (None, 0, 0.0)),
                          ("continuing_subword_prefix", (None, "")),
                          ("end_of_word_suffix", (None, ""))):
            if model.get(key) not in fine:
                raise fail(f"model.{key} = {model[key]!r} is not supported by tinylm's "
                           f"byte-level BPE")
        if obj.get("normalizer") is not None:
            raise fail(f"normalizer {obj['normalizer'].get('type')!r} is not supported: "
                       f"tinylm's byte-level BPE takes text as it is")
        pattern, add_prefix_space = _hf_pre_tokenizer(obj.get("pre_tokenizer"), fail)
        vocab = model.get("vocab")
        if not isinstance(vocab, dict):
            raise fail("model.vocab must be an object mapping tokens to ids")
        specials = hf_added_tokens(obj, fail)
        formats.check_vocab_ids(vocab, path, "model.vocab token")
        tokens = {}
        for spelling, i in vocab.items():
            data = from_bytelevel(spelling)
            if data is None:
                if spelling in specials:
                    continue
                data = spelling.encode("utf-8")  # decodes as itself, never produced by BPE
            tokens[i] = data
        encoder = {}
        for i, t in tokens.items():
            encoder.setdefault(t, i)
        merges = []
        for a, b in formats.parse_hf_merges(model.get("merges", []), path):
            ia, ib = vocab.get(a), vocab.get(b)
            if ia is None or ib is None:
                raise fail(f"merge ({a!r}, {b!r}) names a token that is not in model.vocab")
            merges.append((ia, ib))
        try:
            return cls(tokens, merges, specials, pattern=pattern,
                       ignore_merges=bool(model.get("ignore_merges", False)),
                       add_prefix_space=add_prefix_space)
        except TokenizerError as e:
            raise fail(str(e)) from None

    @classmethod
    def from_gpt2_files(cls, vocab_path, merges_path, *, special_tokens=None,
                        pattern: str = "gpt2", parsed=None) -> "BPETokenizer":
        """Load GPT-2's ``vocab.json`` + ``merges.txt``. ``special_tokens`` ({text: id})
        defaults to ``<|endoftext|>`` when the vocabulary has it."""
        vocab = formats.read_gpt2_vocab(vocab_path, parsed)
        if special_tokens is None:
            special_tokens = ({"<|endoftext|>": vocab["<|endoftext|>"]}
                              if "<|endoftext|>" in vocab else {})
        tokens = {}
        for spelling, i in vocab.items():
            if spelling in special_tokens:
                continue
            data = from_bytelevel(spelling)
            tokens[i] = data if data is not None else spelling.encode("utf-8")
        merges = []
        for a, b in formats.read_merges_txt(merges_path):
            ia, ib = vocab.get(a), vocab.get(b)
            if ia is None or ib is None:
                raise formats.file_error(merges_path, f"merge {a!r} {b!r} names a token that "
                                                      f"is not in {str(vocab_path)!r}")
            merges.append((ia, ib))
        try:
            return cls(tokens, merges, special_tokens, pattern=pattern)
        except TokenizerError as e:
            raise formats.file_error(vocab_path, str(e)) from None

    @classmethod
    def from_tiktoken_file(cls, path, *, special_tokens=None,
                           pattern: str = "gpt4") -> "BPETokenizer":
        """Load a tiktoken ranks file (``cl100k_base.tiktoken`` ...); the file holds
        neither the special tokens nor the pattern, so pass them."""
        ranks = formats.read_tiktoken(path)
        return cls.from_tiktoken_ranks(ranks, special_tokens=special_tokens, pattern=pattern)

    @classmethod
    def from_tiktoken_ranks(cls, ranks: dict, *, special_tokens=None,
                            pattern: str = "gpt4") -> "BPETokenizer":
        """From ``{token bytes: rank}`` (what ``tiktoken.Encoding`` takes as
        ``mergeable_ranks``); ids are the ranks, encoding follows tiktoken's rules."""
        return cls({r: t for t, r in ranks.items()}, None, special_tokens, pattern=pattern)

    def to_tiktoken_ranks(self) -> dict:
        """``{token bytes: id}`` for ``tiktoken.Encoding(mergeable_ranks=...)``."""
        return {t: i for i, t in enumerate(self._tokens) if t is not None}


def _check_train_args(vocab_size, min_frequency, special_tokens) -> list:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise TokenizerError(f"vocab_size must be a positive int, not {vocab_size!r}")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 0:
        raise TokenizerError(f"min_frequency must be an int >= 0, not {min_frequency!r}")
    if isinstance(special_tokens, str):
        raise TokenizerError("special_tokens is a list of strings, e.g. ['<|endoftext|>']")
    special_tokens = list(special_tokens or ())
    for t in special_tokens:
        if not isinstance(t, str) or not t:
            raise TokenizerError(f"special tokens are non-empty strings, not {t!r}")
    return special_tokens


def _hf_pre_tokenizer(spec, fail) -> tuple:
    """``(pattern, add_prefix_space)`` from a tokenizer.json pre_tokenizer."""
    def byte_level(p):
        return isinstance(p, dict) and p.get("type") == "ByteLevel"

    if byte_level(spec) and spec.get("use_regex", True):
        return "gpt2", bool(spec.get("add_prefix_space", False))
    if isinstance(spec, dict) and spec.get("type") == "Sequence":
        parts = spec.get("pretokenizers") or []
        if (len(parts) == 2 and isinstance(parts[0], dict) and parts[0].get("type") == "Split"
                and byte_level(parts[1]) and not parts[1].get("use_regex", True)
                and str(parts[0].get("behavior", "")).lower() == "isolated"
                and not parts[0].get("invert", False)
                and isinstance(parts[0].get("pattern"), dict)
                and "Regex" in parts[0]["pattern"]):
            return (hf_pattern(parts[0]["pattern"]["Regex"], reverse=True),
                    bool(parts[1].get("add_prefix_space", False)))
    kind = spec.get("type") if isinstance(spec, dict) else spec
    raise fail(f"pre_tokenizer {kind!r} is not supported: tinylm reads byte-level BPE "
               f"tokenizers whose pre-tokenizer is ByteLevel (with its regex) or a Split regex "
               f"(isolated) followed by ByteLevel without regex")


def _concat(tuples) -> list:
    """One list of the items of ``tuples``: ``list(chain.from_iterable(tuples))``, 20%
    faster (``iconcat`` extends the list with each tuple in C, without an iterator)."""
    return reduce(iconcat, tuples, [])


class _PairTable:
    """A hash table from id pairs to merge ranks, looked up a whole array at a time
    (NumPy has no dict; a binary search of the sorted pairs is several times slower).
    Each pair ``left * size + right`` hashes (Fibonacci hashing) to a row, one per
    two pairs or so; ``keys`` holds the pairs row after row, ``starts[row]`` is where a
    row begins, and a lookup compares the 1st, 2nd, ... key of each query's row with
    the query (rows hold at most a handful of keys; past a row's end are other rows'
    keys, which never equal the query)."""

    _GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / golden ratio, odd

    def __init__(self, pairs, ranks, none: int, size: int):
        import numpy as np

        self.none, self.size = none, size  # size: more than any id
        self.bits = max(2 * len(pairs) - 1, 1).bit_length()  # rows: a power of 2 >= 2 * pairs
        key = pairs[:, 0] * size + pairs[:, 1]
        row = self._row(key)
        order = np.argsort(row, kind="stable")
        counts = np.bincount(row, minlength=1 << self.bits)
        self.width = int(counts.max(initial=0))  # the most keys in one row
        self.starts = np.cumsum(counts) - counts
        pad = max(self.width, 1)  # so that a row's start + width stays in the arrays
        self.keys = np.append(key[order], np.full(pad, -1))
        self.ranks = np.append(ranks[order], np.full(pad, none))

    def _row(self, key):
        import numpy as np

        product = key.astype(np.uint64) * np.uint64(self._GOLDEN)  # wraps mod 2**64
        return (product >> np.uint64(64 - self.bits)).astype(np.int64)

    def __call__(self, left, right):
        """The ranks of the pairs ``(left[i], right[i])``; ``none`` where absent."""
        import numpy as np

        key = left * self.size + right
        at = self.starts[self._row(key)]
        out = np.full(len(key), self.none, dtype=np.int64)
        for _ in range(self.width):
            hit = self.keys[at] == key
            out[hit] = self.ranks[at[hit]]
            at += 1
        return out

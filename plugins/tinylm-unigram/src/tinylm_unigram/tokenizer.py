"""``UnigramTokenizer``: a Unigram language-model tokenizer (SentencePiece's default;
T5, ALBERT, XLNet, mBART, XLM-R ...), registered in tinylm as "unigram".

Every piece has a score, the log-probability of a unigram model; a text is encoded as
its most probable segmentation (Viterbi over the lattice of the pieces it contains:
``lattice``). Two flavours reproduce the two reference implementations exactly:

- "spm": a SentencePiece ``.model`` (``from_spm``; ``train`` makes these too): the
  text is normalised as ``normalizer.cc`` does (``normalize.SpmNormalizer``) and
  segmented as one lattice with SentencePiece's float32 arithmetic. User-defined
  pieces are kept out of normalisation and score 0.1 * (length - 1) in the lattice
  (so they nearly always win, but can lose to overlapping pieces); consecutive
  unknown characters become one
  ``<unk>``, or their UTF-8 bytes as ``<0xXX>`` pieces with ``byte_fallback``.
- "hf": a Hugging Face ``tokenizer.json`` (``from_hf_json``): its normalizer and
  pre-tokenizer (``hf.Pipeline``), then one float64 Viterbi per word (cached), as
  ``tokenizers``' ``Unigram`` does; unknown characters fused the same way.

Ids are SentencePiece's: unknown, control (``<s>``, ``</s>``, ``<pad>``) and byte
pieces have ids like any other. ``special_tokens`` are the unknown and control pieces
(and a tokenizer.json's special added tokens): tinylm refuses text containing them
unless allowed, and ``disallowed_special=()`` encodes them as plain text, which is
what SentencePiece always does.

    >>> tok = UnigramTokenizer.train(["the cat sat on the mat"] * 20, vocab_size=30)
    >>> tok.decode(tok.encode("the mat sat"))
    'the mat sat'
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tinylm.tokenizers import Tokenizer, TokenizerError, TokenizerFileError
from tinylm.tokenizers.base import (_alternation, _check_special_args, as_id_list, atomic_write,
                                   bad_ids_error, check_text)
from tinylm.tokenizers.formats import PlainReader, PlainWriter, read_bytes

from tinylm_unigram import charsmap, lattice
from tinylm_unigram.normalize import SPACE, SpmNormalizer
from tinylm_unigram.spm_model import (BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED,
                                      SpmModel)

FLT_MAX = float(np.finfo(np.float32).max)
UNK_PENALTY = 10.0
_TYPE_CODES = {"normal": NORMAL, "unknown": UNKNOWN, "control": CONTROL,
               "user-defined": USER_DEFINED, "unused": UNUSED, "byte": BYTE}


def byte_of(piece: str):
    """The byte a ``<0xXX>`` piece stands for, or None."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return int(piece[3:5], 16)
        except ValueError:
            return None
    return None


class UnigramTokenizer(Tokenizer):
    """``pieces``/``scores``/``types``: per id, the piece text, its score and its
    SentencePiece type (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
    6 byte). ``spm``: the ``spm_model.SpmModel`` of the "spm" flavour (normaliser
    settings, and the fields written back by ``save(format="spm")``); ``hf``: the
    tokenizer.json parts of the "hf" flavour (``hf.Pipeline`` and the objects kept for
    saving)."""

    name = "unigram"
    hf_model_type = "Unigram"  # tinylm.tokenizers.from_file sends Unigram tokenizer.json here
    FORMAT_VERSION = 1

    def __init__(self, pieces, scores, types, *, spm: SpmModel | None = None, hf=None,
                 byte_fallback=None, extra_special=None):
        if not (len(pieces) == len(scores) == len(types)) or not pieces:
            raise TokenizerError(f"a Unigram vocabulary needs as many scores and types as "
                                 f"pieces ({len(pieces)}, {len(scores)}, {len(types)})")
        self.pieces = [str(p) for p in pieces]
        self.scores = [float(s) for s in scores]
        self.types = [int(t) for t in types]
        if any(t not in _TYPE_CODES.values() for t in self.types):
            raise TokenizerError("piece types run from 1 (normal) to 6 (byte)")
        self.flavour = "hf" if hf is not None else "spm"
        self.spm = spm if spm is not None or hf is not None else SpmModel([], [], [])
        self.hf = hf
        unknown = [i for i, t in enumerate(self.types) if t == UNKNOWN]
        self.unk_id = unknown[0] if unknown else None
        if byte_fallback is None:
            byte_fallback = self.spm.byte_fallback if self.spm is not None else False
        self.byte_fallback = bool(byte_fallback)
        self._ids = {}
        for i, p in enumerate(self.pieces):
            if self.flavour == "hf" or p not in self._ids:  # tokenizers: the last one wins
                self._ids[p] = i
        self._bytes = [self._ids.get(f"<0x{b:02X}>") for b in range(256)]
        specials = {p: i for i, (p, t) in enumerate(zip(self.pieces, self.types))
                    if t in (UNKNOWN, CONTROL) and p}
        specials.update(extra_special or {})
        self.special_tokens = specials
        self._decoded = [self._piece_bytes(i) for i in range(len(self.pieces))]
        self._setup_model()

    # ------------------------------------------------------------------ the model

    @property
    def _short(self) -> dict:
        if self._short_cache is None:
            self._short_cache = lattice.short_table(self._index, self._edge_scores)
        return self._short_cache

    @property
    def _sample_short(self) -> dict:
        if self._sample_scores is self._edge_scores:
            return self._short
        if self._sample_short_cache is None:
            self._sample_short_cache = lattice.short_table(self._index, self._sample_scores)
        return self._sample_short_cache

    def _setup_model(self) -> None:
        types = np.array(self.types)
        scores32 = np.array(self.scores, dtype=np.float32)
        if self.flavour == "spm":
            self._check_spm_vocabulary()
            normal = types == NORMAL
            min_score = scores32[normal].min() if normal.any() else np.float32(FLT_MAX)
            self._unk_score = float(np.float32(min_score) - np.float32(UNK_PENALTY))
            # A user-defined piece of length L scores 0.1 * (L - 1), its own score
            # ignored (unigram_model.cc, GetUserDefinedScore): so a path of them scores
            # 0.1 * (its length - its number of pieces) and a longer one beats the
            # shorter ones it spans, yet it still competes with normal pieces (they are
            # not cut out of the text first). L counts UTF-8 bytes in EncodeOptimized
            # (encode) and characters in PopulateNodes (sampling, n-best).
            user = types == USER_DEFINED
            edge = scores32.astype(np.float64)
            nbytes = np.array([len(p.encode("utf-8")) for p in self.pieces], dtype=np.float64)
            edge[user] = (0.1 * (nbytes[user] - 1)).astype(np.float32)
            self._edge_scores = edge
            sample = scores32.astype(np.float64)
            nchars = np.array([len(p) for p in self.pieces], dtype=np.float64)
            sample[user] = (0.1 * (nchars[user] - 1)).astype(np.float32)
            self._sample_scores = sample
            matchable = [p if t in (NORMAL, USER_DEFINED) else None
                         for p, t in zip(self.pieces, self.types)]
            self.normalizer = SpmNormalizer(
                charsmap.cached(self.spm.precompiled_charsmap),
                add_dummy_prefix=self.spm.add_dummy_prefix,
                remove_extra_whitespaces=self.spm.remove_extra_whitespaces,
                escape_whitespaces=self.spm.escape_whitespaces,
                treat_whitespace_as_suffix=self.spm.treat_whitespace_as_suffix,
                user_defined=[p for p, t in zip(self.pieces, self.types) if t == USER_DEFINED])
        else:
            self._edge_scores = np.array(self.scores, dtype=np.float64)
            self._sample_scores = self._edge_scores
            self._unk_score = float(min(self.scores)) - UNK_PENALTY
            last = {p: i for i, p in enumerate(self.pieces)}
            matchable = [p if last[p] == i else None for i, p in enumerate(self.pieces)]
            self.normalizer = None
            self._word_cache = {}
        self._index = lattice.PieceIndex(matchable)
        self._short_cache = None  # lattice.short_table, made on first use
        self._sample_short_cache = None  # the same over _sample_scores

    def _check_spm_vocabulary(self) -> None:
        seen = set()
        for i, (p, t) in enumerate(zip(self.pieces, self.types)):
            if not p:
                raise TokenizerError(f"piece {i} is empty; SentencePiece pieces are non-empty")
            key = (p, t in (NORMAL, USER_DEFINED, UNUSED))
            if key in seen:
                raise TokenizerError(f"piece {p!r} (id {i}) is defined twice")
            seen.add(key)
        if self.unk_id is None:
            raise TokenizerError("the vocabulary has no unknown piece (type 2); SentencePiece "
                                 "models need one")

    # ------------------------------------------------------------------ encode

    def encode(self, text: str, *, allowed_special=(), disallowed_special="all") -> list:
        return self._encode_with_specials(text, allowed_special, disallowed_special,
                                          self.encode_ordinary)

    def encode_ordinary(self, text: str) -> list:
        """The ids of ``text`` (special tokens as plain text)."""
        check_text(text)
        return self._ids_of(self._segments(text))

    def encode_batch(self, texts, *, allowed_special=(), disallowed_special="all") -> list:
        """``[encode(t, ...) for t in texts]``. The "spm" flavour normalises the texts
        together (``SpmNormalizer.normalize_lines``) and finds the best paths of all
        their lattices at once (``lattice.viterbi_f32_batch``: a loop over positions
        with NumPy operations across texts; the same ids, bit for bit)."""
        if isinstance(texts, (str, bytes)):
            raise TokenizerError("encode_batch takes a list of strings; for one string "
                                 "use encode")
        texts = list(texts)
        if self.flavour != "spm":
            return [self.encode(t, allowed_special=allowed_special,
                                disallowed_special=disallowed_special) for t in texts]
        parts = self._special_parts(texts, allowed_special, disallowed_special)
        plain = [seg for segs in parts for seg in segs if isinstance(seg, str)]
        encoded = iter(self._encode_many(plain))
        out = []
        for segs in parts:
            if len(segs) == 1 and isinstance(segs[0], str):
                out.append(next(encoded))
                continue
            ids = []
            for seg in segs:
                if isinstance(seg, int):
                    ids.append(seg)
                else:
                    ids.extend(next(encoded))
            out.append(ids)
        return out

    def _special_parts(self, texts: list, allowed_special, disallowed_special) -> list:
        """``[_special_segments(t, ...) for t in texts]``, the arguments checked once
        and disallowed tokens searched for in all the texts at once."""
        for t in texts:
            check_text(t)
        allowed, disallowed = _check_special_args(allowed_special, disallowed_special,
                                                  self.special_tokens)
        joinable = not any("\n" in token for token in disallowed)
        if not allowed and (not disallowed or (
                joinable and not _alternation(disallowed).search("\n".join(texts)))):
            return [[t] for t in texts]
        return [self._special_segments(t, allowed_special, disallowed_special) for t in texts]

    BATCH_CHARS = 1 << 20  # normalised characters per ``viterbi_f32_batch`` call

    def _encode_many(self, texts: list) -> list:
        """``[encode_ordinary(t) for t in texts]`` ("spm" flavour), batched."""
        flat = [k for k, t in enumerate(texts) if "\n" not in t and "\r" not in t]
        normalized = [None] * len(texts)
        for k, t in zip(flat, self.normalizer.normalize_lines([texts[k] for k in flat])):
            normalized[k] = t
        for k, t in enumerate(texts):
            if normalized[k] is None:
                normalized[k] = self.normalizer.normalize(t)
        out, k = [], 0
        while k < len(normalized):  # chunks of about BATCH_CHARS characters
            size, z = 0, k
            while z < len(normalized) and (z == k or size + len(normalized[z]) <= self.BATCH_CHARS):
                size += len(normalized[z])
                z += 1
            out.extend(self._ids_batch(normalized[k:z]))
            k = z
        return out

    def _ids_batch(self, normalized: list) -> list:
        lengths = np.fromiter(map(len, normalized), dtype=np.int64, count=len(normalized))
        edges = lattice.edges_batch(self._index, self._edge_scores, normalized, self._unk_score)
        line, start, end, ids = lattice.viterbi_f32_batch(lengths, edges, self._unk_score)
        cuts = np.searchsorted(line, np.arange(len(normalized) + 1)).tolist()
        flat = ids.tolist()
        out = [flat[a:b] for a, b in zip(cuts, cuts[1:])]
        if len(ids) and ids.min() < 0:  # unknown stretches: fused, maybe as bytes
            starts, ends = start.tolist(), end.tolist()
            for m in np.unique(line[ids < 0]).tolist():
                text, a, b = normalized[m], cuts[m], cuts[m + 1]
                segments = [(text[s:e], i) for s, e, i in zip(starts[a:b], ends[a:b], flat[a:b])]
                out[m] = self._ids_of(_fuse_unknown(segments))
        return out

    def encode_pieces(self, text: str) -> list:
        """The pieces of ``text`` as strings (an unknown stretch as its own text, or
        as byte pieces with byte fallback), like ``SentencePieceProcessor.encode(text,
        out_type=str)``."""
        check_text(text)
        out = []
        for surface, i in self._segments(text):
            if i < 0 and self.byte_fallback:
                ids = self._ids_of([(surface, i)])
                if ids and ids[0] != self.unk_id:
                    out.extend(self.pieces[b] for b in ids)
                    continue
            out.append(surface)
        return out

    def _segments(self, text: str) -> list:
        """``[(surface, id or -1 for unknown)]``, consecutive unknowns fused."""
        out = []
        if self.flavour == "spm":
            normalized = self.normalizer.normalize(text)
            if normalized:
                path = lattice.viterbi_f32(len(normalized), lattice.edges(
                    self._index, self._edge_scores, normalized, self._short), self._unk_score)
                out = [(normalized[s:e], i) for s, e, i in path]
        else:
            for word in self.hf.pipeline.words(text):
                out.extend(self._word_segments(word))
        return _fuse_unknown(out)

    def _word_segments(self, word: str) -> list:
        cached = self._word_cache.get(word)
        if cached is None:
            path = lattice.viterbi_f64(len(word), lattice.edges(
                self._index, self._edge_scores, word, self._short), self._unk_score)
            cached = [(word[s:e], i) for s, e, i in path]
            if len(self._word_cache) > 100_000:
                self._word_cache.clear()
            self._word_cache[word] = cached
        return cached

    def _ids_of(self, segments) -> list:
        ids = []
        for surface, i in segments:
            if i >= 0:
                ids.append(i)
                continue
            if self.byte_fallback:
                data = surface.encode("utf-8")
                byte_ids = [self._bytes[b] for b in data]
                if all(b is not None for b in byte_ids):
                    ids.extend(byte_ids)
                    continue
            if self.unk_id is None:
                raise TokenizerError(f"{surface!r} has no piece and the vocabulary has no "
                                     f"unknown piece; use a tokenizer with an unk_id")
            ids.append(self.unk_id)
        return ids

    def sample_encode(self, text: str, *, alpha: float = 0.1, seed=None) -> list:
        """Subword regularisation: the ids of one segmentation of ``text`` drawn with
        probability proportional to ``exp(alpha * score)`` (SentencePiece's
        ``encode(..., enable_sampling=True, alpha=..., nbest_size=-1)``; the draws
        differ from SentencePiece's, the distribution is the same). ``seed``: an int
        or a ``numpy.random.Generator``."""
        check_text(text)
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        words = ([self.normalizer.normalize(text)] if self.flavour == "spm"
                 else self.hf.pipeline.words(text))
        segments = []
        for word in words:
            if word:
                path = lattice.sample(len(word), lattice.edges(
                    self._index, self._sample_scores, word, self._sample_short),
                    self._unk_score, alpha, rng)
                segments.extend((word[s:e], i) for s, e, i in path)
        return self._ids_of(_fuse_unknown(segments))

    # ------------------------------------------------------------------ decode

    def _piece_bytes(self, i: int) -> bytes:
        p, t = self.pieces[i], self.types[i]
        if t == BYTE:
            b = byte_of(p)
            return bytes([b]) if b is not None else b""
        if t == UNKNOWN:
            return self.unk_surface.encode("utf-8")
        return p.replace(SPACE, " ").encode("utf-8")

    @property
    def unk_surface(self) -> str:
        return self.spm.unk_surface if self.spm is not None else " \u2047 "

    @property
    def _strips_prefix(self) -> bool:
        if self.flavour == "hf":
            return self.hf.pipeline.prefix
        return self.spm.add_dummy_prefix or self.spm.remove_extra_whitespaces

    def decode_bytes(self, ids, *, skip_special_tokens: bool = False) -> bytes:
        """The text's bytes: pieces with ``▁`` as spaces, byte pieces as their bytes,
        the unknown piece as " ⁇ " (SentencePiece's ``unk_surface``), control pieces as
        their text (left out with ``skip_special_tokens``), and the space the dummy
        prefix added before the first piece dropped, as SentencePiece decodes."""
        ids = as_id_list(ids)
        n = len(self.pieces)
        if any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n for i in ids):
            raise bad_ids_error(ids, n)
        special = self.special_ids
        out, first = [], self._strips_prefix
        for i in ids:
            t = self.types[i]
            if i in special and t != UNKNOWN:
                if not skip_special_tokens:
                    out.append(self.pieces[i].encode("utf-8"))
                continue
            if t == UNKNOWN and skip_special_tokens:
                continue
            piece = self._decoded[i]
            if first and t not in (BYTE, UNKNOWN):
                if piece.startswith(b" "):
                    piece = piece[1:]
                first = False
            elif t == UNKNOWN:
                first = False
            out.append(piece)
        return b"".join(out)

    # ------------------------------------------------------------------ vocabulary

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def token_to_id(self, token: str):
        return self._ids.get(token)

    def id_to_token(self, id: int):
        return self.pieces[id] if isinstance(id, int) and 0 <= id < len(self.pieces) else None

    def __repr__(self) -> str:
        return (f"UnigramTokenizer(vocab_size={self.vocab_size}, flavour={self.flavour!r}, "
                f"byte_fallback={self.byte_fallback})")

    # ------------------------------------------------------------------ files

    def save(self, path, format: str | None = None) -> None:
        """``format``: None or "tinylm" (``tinylm-tokenizer unigram 1``), "spm" (a
        SentencePiece ``.model``) or "hf" (a ``tokenizer.json``)."""
        if format in (None, "tinylm"):
            atomic_write(path, self._tinylm_text())
        elif format == "spm":
            from tinylm_unigram.files import to_spm_model

            atomic_write(path, to_spm_model(self))
        elif format == "hf":
            from tinylm_unigram.files import to_hf_dict

            atomic_write(path, json.dumps(to_hf_dict(self), ensure_ascii=False, indent=2) + "\n")
        else:
            raise TokenizerError(f"a Unigram tokenizer is saved as 'tinylm', 'spm' or 'hf', "
                                 f"not {format!r}")

    def _tinylm_text(self) -> str:
        """tinylm's plain format: the flavour, the normaliser settings (as JSON), then
        one ``type score "piece"`` row per id (scores as Python's exact repr)."""
        from tinylm_unigram.files import settings_of

        w = PlainWriter(self.name, self.FORMAT_VERSION)
        w.field("flavour", self.flavour)
        w.field("settings", settings_of(self))
        w.section("pieces", (f"{t} {s!r} {json.dumps(p, ensure_ascii=False)}"
                             for p, s, t in zip(self.pieces, self.scores, self.types)))
        return w.text()

    @classmethod
    def load(cls, path) -> "UnigramTokenizer":
        """A file ``save`` wrote in tinylm's format; ``from_file`` reads the others."""
        from tinylm_unigram.files import from_settings

        r = PlainReader(path, cls.name, (cls.FORMAT_VERSION,))
        flavour, settings = r.field("flavour"), r.field("settings")
        pieces, scores, types = [], [], []
        for k, row in enumerate(r.section("pieces")):
            try:
                t, s, text = row.split(" ", 2)
                types.append(int(t))
                scores.append(float(s))
                pieces.append(json.loads(text))
            except ValueError:
                r.row_error(k, f"expected 'type score \"piece\"', got {row[:60]!r}")
        r.end()
        try:
            return from_settings(cls, flavour, settings, pieces, scores, types)
        except (TypeError, KeyError, ValueError) as e:
            raise TokenizerFileError(f"{str(path)!r}: the settings are not valid ({e}); the "
                                     f"file is corrupted") from None

    @classmethod
    def from_file(cls, path) -> "UnigramTokenizer":
        """Any Unigram file: a SentencePiece ``.model``, a ``tokenizer.json`` or
        tinylm's own format."""
        from tinylm_unigram.files import load_any

        return load_any(cls, path)

    @classmethod
    def sniff_file(cls, path) -> bool:
        """Whether ``path`` is a SentencePiece unigram ``.model`` (how
        ``tinylm.tokenizers.from_file`` asks plugins about formats it does not know)."""
        from tinylm_unigram.spm_model import looks_like_model

        try:
            with open(path, "rb") as f:
                head = f.read(4096)
        except OSError:
            return False
        return looks_like_model(head)

    @classmethod
    def from_spm(cls, path_or_bytes) -> "UnigramTokenizer":
        """A SentencePiece ``.model`` file (a path, or its bytes)."""
        from tinylm_unigram.files import from_spm_bytes

        if isinstance(path_or_bytes, (bytes, bytearray)):
            return from_spm_bytes(cls, bytes(path_or_bytes), "<bytes>")
        return from_spm_bytes(cls, read_bytes(path_or_bytes, "SentencePiece model"), path_or_bytes)

    @classmethod
    def from_hf_json(cls, path, *, parsed=None) -> "UnigramTokenizer":
        """A Hugging Face ``tokenizer.json`` with a ``Unigram`` model."""
        from tinylm_unigram.files import from_hf_dict
        from tinylm.tokenizers.formats import read_json

        obj = read_json(path) if parsed is None else parsed
        return from_hf_dict(cls, obj, path)

    def to_hf_dict(self) -> dict:
        from tinylm_unigram.files import to_hf_dict

        return to_hf_dict(self)

    @classmethod
    def train(cls, texts, vocab_size: int = 8000, *, special_tokens=(), unk_token=None,
              progress=None, byte_fallback=False, character_coverage=0.9995,
              user_defined_symbols=(), options=None) -> "UnigramTokenizer":
        """Train on ``texts`` (an iterable of str: lines or documents) as SentencePiece's
        unigram trainer does (``trainer``). ``special_tokens``: control pieces after
        ``<unk>``, ``<s>``, ``</s>``; ``unk_token``: the unknown piece's text;
        ``user_defined_symbols``: pieces never normalised, scored so that they
        nearly always win where they occur (``_setup_model``);
        ``options``: SentencePiece's other knobs (``trainer.DEFAULTS``:
        ``max_piece_length``, ``shrinking_factor``, ``num_sub_iterations``,
        ``normalization``, ...). ``progress``: True, or a callable taking a line."""
        from tinylm_unigram.trainer import train

        opts = dict(options or {})
        opts.update(unk_token=unk_token, byte_fallback=byte_fallback,
                    character_coverage=character_coverage,
                    user_defined_symbols=tuple(user_defined_symbols))
        return train(cls, texts, vocab_size, special_tokens=special_tokens, progress=progress,
                     **opts)

    @classmethod
    def train_from_files(cls, paths, vocab_size: int = 8000, *, special_tokens=(),
                         unk_token=None, progress=None, **options) -> "UnigramTokenizer":
        """``train`` on the lines of text files (UTF-8); ``options``: ``train``'s."""
        from tinylm.tokenizers.formats import read_text_file

        def lines():
            for p in ([paths] if isinstance(paths, (str, Path)) else paths):
                yield from read_text_file(p).split("\n")

        return cls.train(lines(), vocab_size, special_tokens=special_tokens,
                         unk_token=unk_token, progress=progress, **options)


def _fuse_unknown(segments: list) -> list:
    """Consecutive unknown segments as one (SentencePiece and ``tokenizers`` both)."""
    if not any(i < 0 for _, i in segments):
        return segments
    out = []
    for surface, i in segments:
        if i < 0 and out and out[-1][1] < 0:
            out[-1] = (out[-1][0] + surface, -1)
        else:
            out.append((surface, i))
    return out

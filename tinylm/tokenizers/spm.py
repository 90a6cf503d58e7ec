"""SentencePiece-style BPE by token scores, as llama.cpp runs the vocabularies GGUF files
call ``tokenizer.ggml.model = "llama"`` (Llama 1/2, Mistral, TinyLlama ...).

There are no merges: every token has a score, and encoding merges, again and again,
the adjacent pair whose concatenation is the best-scored token (the leftmost on a
tie), starting from single characters. Spaces are ``▁`` (U+2581), and a text gets a
``▁`` in front (``add_space_prefix``), so "Hello world" is encoded as "▁Hello▁world".
A character no token covers falls back to its UTF-8 bytes as the ``<0xXX>`` byte
tokens (else the unknown token). A worked example with the tokens ``▁`` (score -1),
``▁h`` (-2), ``hi`` (-3), ``▁hi`` (-4)::

    "hi"  ->  ▁ h i  ->  (▁h: -2 beats hi: -3)  ▁h i  ->  ▁hi

Decoding turns ``▁`` back into spaces, byte tokens into their bytes, and drops the
space the prefix added at the start. Special tokens (control, user-defined, unknown)
are single ids, encoded only when allowed (``Tokenizer.encode``); each stretch of
ordinary text between them gets its own space prefix, as llama.cpp does.
tests/test_gguf_tokenizer.py checks the ids against llama.cpp's (llama-cpp-python).
"""

from __future__ import annotations

import heapq
import json

from tinylm.tokenizers import formats
from tinylm.tokenizers.base import Tokenizer, TokenizerError, check_text

SPACE = "\u2581"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class SentencePieceBPE(Tokenizer):
    """``tokens``: id -> text; ``scores``: id -> float; ``types``: id -> llama.cpp's
    token type (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte)."""

    name = "spm"
    FORMAT_VERSION = 1

    def __init__(self, tokens, scores, types, *, unk_id=None, add_space_prefix=True):
        if not (len(tokens) == len(scores) == len(types)) or not tokens:
            raise TokenizerError(f"a SentencePiece vocabulary needs as many scores and types "
                                 f"as tokens ({len(tokens)}, {len(scores)}, {len(types)})")
        self.tokens, self.scores = [str(t) for t in tokens], [float(s) for s in scores]
        self.types = [int(t) for t in types]
        self.unk_id, self.add_space_prefix = unk_id, bool(add_space_prefix)
        self._ids = {t: i for i, t in enumerate(self.tokens)}
        self.special_tokens = {t: i for i, (t, ty) in enumerate(zip(self.tokens, self.types))
                               if ty in (UNKNOWN, CONTROL, USER_DEFINED) and t}
        self._bytes = [self._ids.get(f"<0x{b:02X}>") for b in range(256)]
        self._pieces = [self._piece(i) for i in range(len(self.tokens))]

    def _piece(self, i: int) -> bytes:
        t, ty = self.tokens[i], self.types[i]
        if ty == BYTE and len(t) == 6 and t.startswith("<0x"):
            return bytes([int(t[3:5], 16)])
        return t.replace(SPACE, " ").encode("utf-8")

    # ------------------------------------------------------------------ encode

    def encode(self, text: str, *, allowed_special=(), disallowed_special="all") -> list:
        return self._encode_with_specials(text, allowed_special, disallowed_special,
                                          self.encode_ordinary)

    def encode_ordinary(self, text: str) -> list:
        """The ids of ``text`` (special tokens as plain text), space prefix included."""
        check_text(text)
        if not text:
            return []
        text = (" " + text if self.add_space_prefix else text).replace(" ", SPACE)
        return self._resegment(self._merge(list(text)))

    def _merge(self, symbols: list) -> list:
        """Merge the best-scored adjacent pair until none is a token (llama.cpp's
        llm_tokenizer_spm_session: a heap of candidate pairs over a linked list)."""
        n = len(symbols)
        nxt, prev = list(range(1, n)) + [-1], list(range(-1, n - 1))
        heap = []

        def push(left, right):
            if left >= 0 and right >= 0:
                i = self._ids.get(symbols[left] + symbols[right])
                if i is not None:  # best score first, then the leftmost
                    heapq.heappush(heap, (-self.scores[i], left, right,
                                          len(symbols[left]) + len(symbols[right])))

        for k in range(n - 1):
            push(k, k + 1)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            if not symbols[left] or not symbols[right] or \
                    len(symbols[left]) + len(symbols[right]) != size:
                continue  # stale: one side has merged since
            symbols[left] += symbols[right]
            symbols[right] = ""
            nxt[left] = nxt[right]
            if nxt[left] >= 0:
                prev[nxt[left]] = left
            push(prev[left], left)
            push(left, nxt[left])
        return [s for s in symbols if s]

    def _resegment(self, symbols: list) -> list:
        ids = []
        for s in symbols:
            i = self._ids.get(s)
            if i is not None:
                ids.append(i)
                continue
            for b in s.encode("utf-8"):  # no token: its bytes as byte tokens
                i = self._bytes[b] if self._bytes[b] is not None else self.unk_id
                if i is None:
                    raise TokenizerError(f"{s!r} has no token, no byte token and the "
                                         f"vocabulary no unknown token")
                ids.append(i)
        return ids

    # ------------------------------------------------------------------ decode

    def decode_bytes(self, ids, *, skip_special_tokens: bool = False) -> bytes:
        from tinylm.tokenizers.base import as_id_list, bad_ids_error

        ids = as_id_list(ids)
        n = len(self.tokens)
        if any(not 0 <= i < n for i in ids):
            raise bad_ids_error(ids, n)
        special = self.special_ids
        out, first = [], True
        for i in ids:
            if i in special:
                if not skip_special_tokens:
                    out.append(self.tokens[i].encode("utf-8"))
                continue
            piece = self._pieces[i]
            if first and self.add_space_prefix and piece.startswith(b" "):
                piece = piece[1:]  # the space the prefix added
            first = False
            out.append(piece)
        return b"".join(out)

    # ------------------------------------------------------------------ vocabulary

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def token_to_id(self, token: str):
        return self._ids.get(token)

    def id_to_token(self, id: int):
        return self.tokens[id] if isinstance(id, int) and 0 <= id < len(self.tokens) else None

    def __repr__(self) -> str:
        return (f"SentencePieceBPE(vocab_size={self.vocab_size}, special_tokens="
                f"{len(self.special_tokens)}, add_space_prefix={self.add_space_prefix})")

    # ------------------------------------------------------------------ files

    def save(self, path, format: str | None = None) -> None:
        """tinylm's plain format: ``tinylm-tokenizer spm 1``, the flags, then one
        ``type score "text"`` row per id."""
        from tinylm.tokenizers.base import atomic_write

        if format not in (None, "tinylm"):
            raise TokenizerError(f"a SentencePieceBPE is saved in tinylm's format only, not "
                                 f"{format!r}")
        w = formats.PlainWriter(self.name, self.FORMAT_VERSION)
        w.field("add_space_prefix", self.add_space_prefix)
        w.field("unk_id", self.unk_id)
        w.section("tokens", (f"{ty} {sc!r} {json.dumps(t, ensure_ascii=False)}"
                             for t, sc, ty in zip(self.tokens, self.scores, self.types)))
        atomic_write(path, w.text())

    @classmethod
    def load(cls, path) -> "SentencePieceBPE":
        r = formats.PlainReader(path, cls.name, (cls.FORMAT_VERSION,))
        prefix, unk = r.field("add_space_prefix"), r.field("unk_id")
        tokens, scores, types = [], [], []
        for k, row in enumerate(r.section("tokens")):
            try:
                ty, sc, text = row.split(" ", 2)
                types.append(int(ty))
                scores.append(float(sc))
                tokens.append(json.loads(text))
            except ValueError:
                r.row_error(k, f"expected 'type score \"text\"', got {row[:60]!r}")
        r.end()
        return cls(tokens, scores, types, unk_id=unk, add_space_prefix=prefix)

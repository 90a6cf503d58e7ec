"""The tokenizer of a GGUF file (``tokenizer.ggml.*``) -> a tinylm tokenizer, and back.

A GGUF file with ``tokenizer.ggml.model = "gpt2"`` holds a byte-level BPE:

    tokenizer.ggml.tokens       [str]   id -> the token's byte-level spelling ("Ġthe")
    tokenizer.ggml.token_type   [i32]   1 normal, 2 unknown, 3 control, 4 user-defined,
                                        5 unused, 6 byte (llama.cpp's llama_token_type)
    tokenizer.ggml.merges       [str]   "Ġ t", in rank order
    tokenizer.ggml.pre          str     the pre-tokenizer ("smollm", "gpt-2", "llama-bpe")
    tokenizer.ggml.bos_token_id ...     bos / eos / unknown / padding ids (u32)

Control and user-defined tokens become the tokenizer's special tokens (``<|im_start|>``
is one id, never spelled out); unused ones are left out (no text encodes to them). A
vocabulary may lack some single bytes (SmolLM2's has no token for 21 of them, 0x04 and
0xff among them): such a byte is dropped from the ids, as llama.cpp drops a byte it has
no token for, after merging (``MissingBytesBPE``).
``pre`` names one of llama.cpp's pre-tokenizers; the ones tinylm has the regex of are
``PRE_TOKENIZERS`` (``tinylm.tokenizers.pretokenize`` cuts the same pieces).
``model = "llama"`` is a SentencePiece vocabulary (scores instead of merges, ``▁`` for
spaces, ``<0xXX>`` byte tokens): a ``tinylm.tokenizers.spm.SentencePieceBPE``. Another
model, a pre-tokenizer tinylm lacks, or a broken vocabulary is one ``GGUFError``
naming the file.

    >>> tok = tokenizer_from_gguf(read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf"))  # doctest: +SKIP
    >>> tok.special_tokens["<|im_start|>"]
    1
"""

from __future__ import annotations

import numpy as np

from tinylm.formats.gguf import GGUFError, GGUFValue, ValueType
from tinylm.tokenizers.base import TokenizerError
from tinylm.tokenizers.bpe import BPETokenizer
from tinylm.tokenizers.formats import from_bytelevel

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# tokenizer.ggml.pre -> tinylm's pattern name (the ones llama.cpp gives these regexes)
PRE_TOKENIZERS = {
    "gpt-2": "gpt2", "phi-2": "gpt2", "mpt": "gpt2", "olmo": "gpt2", "jais": "gpt2",
    "smollm": "smollm", "starcoder": "smollm", "refact": "smollm", "command-r": "smollm",
    "codeshell": "smollm", "exaone": "smollm", "minerva-7b": "smollm",
    "llama-bpe": "llama-bpe", "llama3": "llama-bpe", "llama-v3": "llama-bpe",
    "qwen2": "qwen2", "stablelm2": "qwen2", "deepseek-r1-qwen": "qwen2",
}
_IGNORE_MERGES = {"llama-bpe"}                       # llama.cpp sets ignore_merges for these
_PRE_NAMES = {"gpt2": "gpt-2", "smollm": "smollm", "llama-bpe": "llama-bpe", "qwen2": "qwen2"}
SPECIAL_KEYS = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
                "unk": "tokenizer.ggml.unknown_token_id",
                "pad": "tokenizer.ggml.padding_token_id"}


def _fail(f, problem: str):
    raise GGUFError(f"{f.path}: {problem}")


def special_ids(f) -> dict:
    """{"bos": id, "eos": id, ...} of the ids the metadata names (those it has). An id
    that is not an integer, or a token list that is not a list of strings, is a
    GGUFError; an id outside the token list is left out, as llama.cpp ignores it ("bad
    special token")."""
    m = f.metadata
    tokens = m.get("tokenizer.ggml.tokens")
    if tokens is not None and (not isinstance(tokens, list)
                               or not all(isinstance(t, str) for t in tokens)):
        _fail(f, "tokenizer.ggml.tokens is not a list of strings; the file is damaged or "
                 "was written wrongly (re-export it)")
    out = {}
    for name, key in SPECIAL_KEYS.items():
        if key not in m:
            continue
        value = m[key]
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            _fail(f, f"{key} is {value!r}, not a token id; the file is damaged or was "
                     f"written wrongly (re-export it)")
        if 0 <= value and (tokens is None or value < len(tokens)):
            out[name] = int(value)
    return out


class MissingBytesBPE(BPETokenizer):
    """A byte-level BPE whose vocabulary (``n_vocab`` ids) lacks some single bytes: each
    missing byte has a stand-in id from ``n_vocab`` on while merging (no merge names it,
    so it stays a piece of its own), and ``encode`` leaves the stand-ins out. Saved in
    tinylm's format as "bpe-gguf" (the stand-ins are the trailing single-byte tokens)."""

    name = "bpe-gguf"

    def __init__(self, tokens, merges, special_tokens, *, n_vocab: int | None = None,
                 **options):
        if n_vocab is None:  # loaded from a file: the stand-ins are the last ids
            table = list(tokens.get(i) for i in range(max(tokens) + 1)) \
                if isinstance(tokens, dict) else list(tokens)
            n_vocab = len(table)
            while n_vocab and table[n_vocab - 1] is not None and len(table[n_vocab - 1]) == 1:
                n_vocab -= 1
        self.n_vocab = n_vocab
        super().__init__(tokens, merges, special_tokens, **options)

    def encode_ordinary(self, text: str) -> list:
        return self._drop(super().encode_ordinary(text))

    def encode_bytes(self, data) -> list:
        return self._drop(super().encode_bytes(data))

    def _drop(self, ids: list) -> list:
        if ids and max(ids) >= self.n_vocab:
            return [i for i in ids if i < self.n_vocab]
        return ids


def tokenizer_from_gguf(f):
    """The ``BPETokenizer`` of a read GGUF file (``tinylm.formats.gguf.read_gguf``)."""
    m = f.metadata
    model = m.get("tokenizer.ggml.model")
    if model == "llama":
        return _sentencepiece(f)
    if model != "gpt2":
        what = "no tokenizer.ggml.model" if model is None else f"tokenizer model {model!r}"
        _fail(f, f"{what}: tinylm builds GGUF tokenizers of model 'gpt2' (byte-level BPE) "
                 f"and 'llama' (SentencePiece scores) only")
    tokens, types = _token_list(f)
    pre = m.get("tokenizer.ggml.pre")
    if pre not in PRE_TOKENIZERS:
        _fail(f, f"pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; tinylm has "
                 f"{', '.join(sorted(PRE_TOKENIZERS))}")
    specials = {t: i for i, (t, ty) in enumerate(zip(tokens, types))
                if ty in (CONTROL, USER_DEFINED)}
    table = _byte_tokens(f, tokens, types, specials)
    merges = _merges(f, tokens, specials)
    have = set(table)
    missing = [bytes([b]) for b in range(256) if bytes([b]) not in have]
    options = dict(pattern=PRE_TOKENIZERS[pre], ignore_merges=PRE_TOKENIZERS[pre] in _IGNORE_MERGES)
    try:
        if not missing:
            return BPETokenizer(table, merges, specials, **options)
        return MissingBytesBPE(table + missing, merges, specials, n_vocab=len(table), **options)
    except TokenizerError as e:
        _fail(f, f"its tokenizer cannot be built: {e}")


def _sentencepiece(f):
    """A ``SentencePieceBPE`` from the tokens, their scores and types (llama.cpp's
    defaults: the unknown token 0, a space prefix)."""
    from tinylm.tokenizers.spm import SentencePieceBPE

    m = f.metadata
    tokens, types = _token_list(f)
    scores = m.get("tokenizer.ggml.scores")
    if not isinstance(scores, np.ndarray) or scores.shape != (len(tokens),):
        _fail(f, f"tokenizer.ggml.scores must hold one float per token ({len(tokens)}) for a "
                 f"'llama' (SentencePiece) tokenizer")
    if m.get("tokenizer.ggml.remove_extra_whitespaces"):
        _fail(f, "tokenizer.ggml.remove_extra_whitespaces = true is not supported")
    unk = int(m.get("tokenizer.ggml.unknown_token_id", 0))
    try:
        return SentencePieceBPE(tokens, scores.tolist(), types,
                                unk_id=unk if 0 <= unk < len(tokens) else None,
                                add_space_prefix=bool(m.get("tokenizer.ggml.add_space_prefix",
                                                            True)))
    except TokenizerError as e:
        _fail(f, f"its tokenizer cannot be built: {e}")


def _token_list(f) -> tuple:
    m = f.metadata
    tokens = m.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        _fail(f, "tokenizer.ggml.tokens is missing or not a list of strings")
    types = m.get("tokenizer.ggml.token_type")
    if types is None:
        types = np.full(len(tokens), NORMAL)
    if not isinstance(types, np.ndarray) or types.shape != (len(tokens),):
        _fail(f, f"tokenizer.ggml.token_type must hold one integer per token "
                 f"({len(tokens)})")
    return tokens, [int(t) for t in types]


def _byte_tokens(f, tokens, types, specials) -> list:
    """id -> bytes (None for special and unused ids)."""
    table = [None] * len(tokens)
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty in (CONTROL, USER_DEFINED, UNUSED) or not t:
            continue
        data = from_bytelevel(t)
        table[i] = data if data is not None else t.encode("utf-8")  # never made by BPE
    return table


def _merges(f, tokens, specials) -> list:
    """The merges as (left id, right id); split at the first space after the first
    character, as llama.cpp does ("Ġ Ġ" is "Ġ" + "Ġ")."""
    merges = f.metadata.get("tokenizer.ggml.merges")
    if not isinstance(merges, list) or not all(isinstance(x, str) for x in merges):
        _fail(f, "tokenizer.ggml.merges is missing or not a list of strings (a 'gpt2' "
                 "tokenizer needs its merges)")
    ids = {t: i for i, t in enumerate(tokens) if t not in specials}
    out = []
    for rank, merge in enumerate(merges):
        cut = merge.find(" ", 1)
        left, right = (merge[:cut], merge[cut + 1:]) if cut > 0 else (merge, "")
        if left not in ids or right not in ids:
            _fail(f, f"merge {rank} ({merge!r}) names a token that is not in "
                     f"tokenizer.ggml.tokens")
        out.append((ids[left], ids[right]))
    return out


# ----------------------------------------------------------------------------- export


def tokenizer_metadata(tokenizer, vocab_size: int, config=None) -> dict:
    """The ``tokenizer.ggml.*`` metadata of a byte-level ``BPETokenizer``, its list padded
    with unused ``[PADi]`` tokens to ``vocab_size`` (the model's embedding rows), the
    bos / eos / padding ids from ``config`` (a model config) when it names them."""
    from tinylm.tokenizers.spm import SentencePieceBPE

    if isinstance(tokenizer, SentencePieceBPE):
        return _sentencepiece_metadata(tokenizer, vocab_size, config)
    if not isinstance(tokenizer, BPETokenizer):
        raise GGUFError(f"a GGUF file holds a byte-level BPE or SentencePiece tokenizer; "
                        f"this model's is a {type(tokenizer).__name__}")
    pre = _PRE_NAMES.get(_pattern_name(tokenizer))
    if pre is None:
        raise GGUFError(f"the tokenizer's pre-tokenization pattern {tokenizer.pattern!r} has "
                        f"no llama.cpp name; GGUF files can name {', '.join(_PRE_NAMES)}")
    size = getattr(tokenizer, "n_vocab", tokenizer.vocab_size)
    if size > vocab_size:
        raise GGUFError(f"the tokenizer has {size} ids, more than the model's {vocab_size} "
                        f"embedding rows")
    tokens, types = _spellings(tokenizer, vocab_size)
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": GGUFValue(ValueType.ARRAY, np.asarray(types, np.int32),
                                                   ValueType.INT32),
            "tokenizer.ggml.merges": [f"{tokenizer.id_to_token(a)} {tokenizer.id_to_token(b)}"
                                      for a, b in tokenizer.merges]}
    return {**meta, **_special_metadata(config)}


def _special_metadata(config, unk=None) -> dict:
    meta = {}
    for name, key in SPECIAL_KEYS.items():
        i = getattr(config, f"{name}_token_id", None) if name != "unk" else unk
        if isinstance(i, int):
            meta[key] = GGUFValue(ValueType.UINT32, i)
    meta["tokenizer.ggml.add_bos_token"] = False  # tinylm's encode adds no bos
    return meta


def _sentencepiece_metadata(tok, vocab_size: int, config) -> dict:
    if tok.vocab_size != vocab_size:
        raise GGUFError(f"the SentencePiece tokenizer has {tok.vocab_size} tokens, the model "
                        f"{vocab_size} embedding rows; they must agree")
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": list(tok.tokens),
            "tokenizer.ggml.scores": GGUFValue(ValueType.ARRAY, np.asarray(tok.scores, np.float32),
                                               ValueType.FLOAT32),
            "tokenizer.ggml.token_type": GGUFValue(ValueType.ARRAY, np.asarray(tok.types, np.int32),
                                                   ValueType.INT32),
            "tokenizer.ggml.add_space_prefix": tok.add_space_prefix,
            **_special_metadata(config, tok.unk_id)}


def _pattern_name(tokenizer):
    from tinylm.tokenizers.pretokenize import pattern_name

    return pattern_name(tokenizer.pattern)


def _spellings(tokenizer, vocab_size: int) -> tuple:
    special = tokenizer.special_ids
    real = getattr(tokenizer, "n_vocab", tokenizer.vocab_size)  # MissingBytesBPE's stand-ins
    tokens, types = [], []
    for i in range(vocab_size):
        t = tokenizer.id_to_token(i) if i < real else None
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            tokens.append(t)
            types.append(CONTROL if i in special else NORMAL)
    return tokens, types

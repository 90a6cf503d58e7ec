"""GGUF models in and out: ``llama`` and ``gpt2`` architecture files <-> tinylm Decoders.

    model, tokenizer = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")   # float32 weights
    export_gguf(model, tokenizer, "out.gguf", dtype="q8_0")           # llama.cpp reads it

The metadata maps onto the config (``ARCH`` = the architecture's name)::

    ARCH.context_length               max_positions
    ARCH.embedding_length             d_model
    ARCH.block_count                  n_layer
    ARCH.feed_forward_length          d_ff
    ARCH.attention.head_count(_kv)    n_head, n_kv_head
    ARCH.attention.key_length         head_dim (when not d_model / n_head)
    ARCH.rope.freq_base               positional_options.base (llama)
    ARCH.rope.scaling.type / .factor  positional_options.scaling ("linear" only)
    ARCH.attention.layer_norm_rms_epsilon (llama) / layer_norm_epsilon (gpt2)   norm_eps
    len(tokenizer.ggml.tokens)        vocab_size (the embedding's rows)

and the tensors onto the parameters (``blk.N.`` = ``transformer.blocks.N.``)::

    token_embd / position_embd        tok_emb / transformer.pos
    blk.N.attn_norm, blk.N.ffn_norm   norm1, norm2
    blk.N.attn_q, attn_k, attn_v      attn.qkv (rows concatenated; gpt2: attn_qkv)
    blk.N.attn_output                 attn.out
    blk.N.ffn_gate, ffn_up, ffn_down  mlp.gate, mlp.up, mlp.down
    output_norm, output               transformer.norm, lm_head (none: tied)

The q/k permutation: Hugging Face Llama checkpoints rotate the two halves of each head
(x_i with x_{i+d/2}), llama.cpp rotates neighbours (x_{2i} with x_{2i+1}), so
convert_hf_to_gguf.py permutes the rows of q and k within each head::

    permute(w, n) = w.reshape(n, 2, rows // n // 2, ...).swapaxes(1, 2).reshape(w.shape)

(``n`` = the heads of that projection: n_head for q, n_kv_head for k). Import undoes it
(``unpermute``), so a GGUF model and its Hugging Face original have the same tinylm
weights; export applies it again. It only moves rows, so it works on packed rows too.

A file tinylm cannot map (another architecture, a tensor type it cannot dequantize, a
missing, extra or mis-shaped tensor, RoPE scaling other than linear) is one
``GGUFError`` naming the file and the problem.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from tinylm import backend
from tinylm.errors import TinyLMError
from tinylm.formats.gguf import GGUFError, GGUFTensor, GGUFValue, ValueType, read_gguf, write_gguf
from tinylm.formats.gguf_tokenizer import tokenizer_from_gguf, tokenizer_metadata

ARCHITECTURES = ("llama", "gpt2")
EXPORT_DTYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7}  # -> general.file_type
_QUANT_TYPES = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1"}


class Part(NamedTuple):
    """One GGUF tensor of a tinylm parameter: its name and, for llama's q and k, the head
    count of the row permutation (0: none)."""

    name: str
    heads: int = 0


class Rule(NamedTuple):
    ours: str          # a tinylm parameter
    parts: tuple       # its GGUF tensors, rows concatenated in this order


# ----------------------------------------------------------------------------- permutation


def permute(w, n_head: int):
    """convert_hf_to_gguf.py's ``permute``: Hugging Face row order -> llama.cpp's."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def unpermute(w, n_head: int):
    """The inverse of ``permute``: llama.cpp's row order -> Hugging Face's."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


# ----------------------------------------------------------------------------- names


def tensor_rules(c) -> list:
    """The ``Rule`` of every tinylm parameter of a llama or gpt2 config ``c``."""
    llama = c.architecture == "llama"
    r = [Rule("tok_emb.weight", (Part("token_embd.weight"),))]
    if not llama:
        r.append(Rule("transformer.pos.weight", (Part("position_embd.weight"),)))
    params = ("weight", "bias") if c.bias else ("weight",)
    for i in range(c.n_layer):
        o, t = f"transformer.blocks.{i}.", f"blk.{i}."
        r += _norm_rules(o, t, c)
        for p in params:
            if llama:
                qkv = (Part(f"{t}attn_q.{p}", c.n_head), Part(f"{t}attn_k.{p}", c.kv_heads),
                       Part(f"{t}attn_v.{p}"))
            else:
                qkv = (Part(f"{t}attn_qkv.{p}"),)
            r.append(Rule(f"{o}attn.qkv.{p}", qkv))
            r.append(Rule(f"{o}attn.out.{p}", (Part(f"{t}attn_output.{p}"),)))
            for x in ("gate", "up", "down") if llama else ("up", "down"):
                r.append(Rule(f"{o}mlp.{x}.{p}", (Part(f"{t}ffn_{x}.{p}"),)))
    r += [Rule(f"transformer.norm.{p}", (Part(f"output_norm.{p}"),))
          for p in _norm_params(c)]
    if not c.tie_embeddings:
        r.append(Rule("lm_head.weight", (Part("output.weight"),)))
    return r


def _norm_params(c) -> tuple:
    return ("weight",) if c.norm == "rmsnorm" else ("weight", "bias")


def _norm_rules(o: str, t: str, c) -> list:
    return [Rule(f"{o}{ours}.{p}", (Part(f"{t}{theirs}.{p}"),)) for ours, theirs in
            (("norm1", "attn_norm"), ("norm2", "ffn_norm")) for p in _norm_params(c)]


# ----------------------------------------------------------------------------- config


def _get(f, key: str, default=KeyError, kind=None):
    """Metadata ``key`` (``default`` when absent; KeyError: a GGUFError). ``kind`` int
    or float: a value of another type (a string, a bool, an array) is a GGUFError."""
    m = f.metadata
    if key in m:
        value = m[key]
        number = (np.integer,) + ((int,) if kind is int else (int, float, np.floating))
        if kind is not None and (isinstance(value, (bool, np.bool_))
                                 or not isinstance(value, number)):
            raise GGUFError(f"{f.path}: the metadata {key!r} is {value!r}, not "
                            f"{'an integer' if kind is int else 'a number'}; the file is "
                            f"damaged or was written wrongly (re-export it)")
        return value
    if default is KeyError:
        raise GGUFError(f"{f.path}: the metadata has no {key!r}, which a "
                        f"{m.get('general.architecture')} model needs")
    return default


def architecture(f) -> str:
    arch = f.metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{f.path}: architecture {arch!r} is not supported; tinylm loads GGUF "
                        f"models of architecture {', '.join(ARCHITECTURES)}")
    return arch


def config_from_gguf(f):
    """The tinylm config of a read GGUF file (``read_gguf``)."""
    from tinylm.models.config import GPT2Config, LlamaConfig

    arch = architecture(f)
    a = lambda key, default=KeyError, kind=None: _get(f, f"{arch}.{key}", default,  # noqa: E731
                                                       kind)
    d, n_head = int(a("embedding_length", kind=int)), int(a("attention.head_count", kind=int))
    head_dim = int(a("attention.key_length", d // max(n_head, 1), kind=int))
    common = dict(
        vocab_size=_vocab_size(f), d_model=d, n_layer=int(a("block_count", kind=int)),
        n_head=n_head, d_ff=int(a("feed_forward_length", kind=int)),
        max_positions=int(a("context_length", kind=int)),
        head_dim=None if head_dim * n_head == d else head_dim,
        tie_embeddings=_tied(f), **_token_ids(f))
    try:
        if arch == "gpt2":
            if common["d_ff"] == 4 * d:
                common["d_ff"] = None  # as GPT2Config derives it
            eps = a("attention.layer_norm_epsilon", kind=float)
            return GPT2Config(norm_eps=_f32_value(eps), **common)
        return LlamaConfig(
            n_kv_head=int(a("attention.head_count_kv", n_head, kind=int)),
            norm_eps=_f32_value(a("attention.layer_norm_rms_epsilon", kind=float)),
            positional_options=_rope_options(f, a, head_dim),
            bias="blk.0.attn_q.bias" in f.tensors, **common)
    except TinyLMError as e:
        raise GGUFError(f"{f.path}: its metadata makes no valid tinylm config: {e}") from None


def _f32_value(v) -> float:
    """A float32 metadata value as the shortest decimal that is that float32 (1e-06, not
    9.99999997e-07), so that a config survives export and import unchanged."""
    return float(str(np.float32(v)))


def _vocab_size(f) -> int:
    emb = f.tensors.get("token_embd.weight")
    if emb is None or len(emb.shape) != 2:
        raise GGUFError(f"{f.path}: no 2-D tensor token_embd.weight (the token embedding)")
    return int(emb.shape[0])


def _tied(f) -> bool:
    """No ``output.weight``, or one with the embedding's type and bytes."""
    out, emb = f.tensors.get("output.weight"), f.tensors["token_embd.weight"]
    if out is None:
        return True
    return out.type == emb.type and out.shape == emb.shape and \
        np.array_equal(np.asarray(out.data), np.asarray(emb.data))


def _token_ids(f) -> dict:
    from tinylm.formats.gguf_tokenizer import special_ids

    ids = special_ids(f)
    return {f"{k}_token_id": ids.get(k) for k in ("bos", "eos", "pad")}


def _rope_options(f, a, head_dim: int) -> dict:
    options = {}
    base = _f32_value(a("rope.freq_base", 10000.0, kind=float))
    if base != 10000.0:
        options["base"] = base
    if int(a("rope.dimension_count", head_dim, kind=int)) != head_dim:
        raise GGUFError(f"{f.path}: RoPE on {a('rope.dimension_count')} of {head_dim} "
                        f"features per head (partial rotary) is not supported")
    kind = a("rope.scaling.type", "none")
    if kind == "linear":
        options["scaling"] = {"type": "linear", "factor": _f32_value(a("rope.scaling.factor",
                                                                       kind=float))}
    elif kind != "none":
        raise GGUFError(f"{f.path}: RoPE scaling {kind!r} is not supported (tinylm reads "
                        f"'none' and 'linear')")
    if "rope_freqs.weight" in f.tensors:
        raise GGUFError(f"{f.path}: rope_freqs.weight (Llama 3 frequency factors) is not "
                        f"supported yet")
    return options


# ----------------------------------------------------------------------------- import


def load_gguf(path, dequantize: bool = True, progress: bool = False):
    """(model, tokenizer) of a ``llama`` or ``gpt2`` GGUF file, in eval mode on the CPU.

    ``dequantize=True``: every weight as float32 (dequantized from its GGML type).
    ``dequantize=False``: the quantized weights stay packed, in ``tinylm.quant``'s
    ``QuantLinear`` / ``QuantEmbedding`` (a tied head: ``QuantTiedHead``) over the file's
    bytes (q and k rows un-permuted, q/k/v concatenated: copies of packed rows only);
    F32/F16 weights, norms and biases are float32 as before. The model is built
    without initialising its weights (``nn.skip_init``), so the float32 weights that
    are swapped out never take memory."""
    path = os.fspath(path)
    f = read_gguf(path)
    config = config_from_gguf(f)
    tokenizer = tokenizer_from_gguf(f)
    rules = tensor_rules(config)
    _check_tensors(f, rules)
    model = _build_uninitialised(config, rules)
    packed = [] if dequantize else [r for r in rules if _packable(f, r)]
    params = dict(model.named_parameters())
    for rule in _bar([r for r in rules if r not in packed], progress,
                     f"loading {os.path.basename(path)}"):
        _copy_rule(f, rule, params[rule.ours].data)
    if packed:
        _swap_packed(f, model, packed)
    model.eval()
    return model, tokenizer


def _build_uninitialised(config, rules):
    """The model, its weights left uninitialised when ``nn.skip_init`` exists (the
    rules fill every parameter; untouched pages of a swapped-out float weight then
    never take memory)."""
    from tinylm import nn
    from tinylm.models import build_model

    skip = getattr(nn, "skip_init", None)
    if skip is None:
        return build_model(config)
    with skip():
        model = build_model(config)
    unfilled = set(dict(model.named_parameters())) - {r.ours for r in rules}
    if unfilled:  # a bug, not a bad file: every parameter must have a rule
        raise TinyLMError(f"GGUF import: no tensor for {sorted(unfilled)}")
    return model


def _copy_rule(f, rule: Rule, target) -> None:
    value = np.concatenate([_float_part(f, p) for p in rule.parts], axis=0)
    if value.shape != target.shape:
        raise GGUFError(f"{f.path}: {'+'.join(p.name for p in rule.parts)} has shape "
                        f"{value.shape}; the config needs {tuple(target.shape)}")
    target[...] = value


# ----------------------------------------------------------------------------- packed


def _packable(f, rule: Rule) -> bool:
    """A Linear or embedding weight whose parts share one quantized type."""
    types = {f.tensors[p.name].type for p in rule.parts}
    return rule.ours.endswith(".weight") and len(types) == 1 and \
        types.pop() not in ("F32", "F16", "F64") and ".norm" not in rule.ours and \
        rule.ours != "transformer.pos.weight"


def _packed_rows(f, rule: Rule) -> tuple:
    """(format name, uint8 (rows, row_bytes)) of a rule's parts, rows un-permuted."""
    from tinylm import quant

    parts = []
    for p in rule.parts:
        raw = f.tensors[p.name].data
        parts.append(unpermute(raw, p.heads) if p.heads else raw)
    t = f.tensors[rule.parts[0].name]
    try:
        fmt = quant.format_for_ggml_type(t.type).name
    except quant.QuantError as e:
        raise GGUFError(f"{f.path}: tensor {t.name!r}: {e}") from None
    return fmt, parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def _swap_packed(f, model, rules) -> None:
    """Replace the Linear / Embedding of each rule by its packed twin."""
    from tinylm import nn
    from tinylm.quant.layers import QuantEmbedding, QuantLinear, QuantTiedHead

    modules = dict(model.named_modules())
    record = {"scheme": "gguf", "tensors": {}, "tied": {}, "skipped": {}}
    for rule in rules:
        name = rule.ours.rsplit(".", 1)[0]
        old, (fmt, raw) = modules[name], _packed_rows(f, rule)
        if isinstance(old, nn.Embedding):
            new = QuantEmbedding.from_packed(fmt, raw, old.num_embeddings, old.embedding_dim)
        else:
            new = QuantLinear.from_packed(fmt, raw, old.in_features, old.out_features,
                                          old.bias)
        _set_module(model, name, new)
        record["tensors"][name] = {"format": fmt, "shape": list(new.weight_shape),
                                   "layer": "embedding" if isinstance(old, nn.Embedding)
                                   else "linear"}
    if model.config.tie_embeddings and isinstance(model.tok_emb, QuantEmbedding):
        model.lm_head = QuantTiedHead(model.tok_emb)
        record["tied"]["lm_head"] = "tok_emb"
    object.__setattr__(model, "quantization", record)


def _set_module(model, dotted: str, new) -> None:
    parent, _, last = dotted.rpartition(".")
    owner = model
    for part in parent.split(".") if parent else ():
        owner = owner[int(part)] if part.isdigit() else getattr(owner, part)
    setattr(owner, last, new)


def _bar(items, progress: bool, desc: str):
    if not progress:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="tensor", leave=False, disable=None)  # None: a TTY only


def _check_tensors(f, rules) -> None:
    """Every tensor the rules need is there, and nothing else but a tied output."""
    wanted = {p.name for r in rules for p in r.parts}
    missing = sorted(wanted - set(f.tensors))
    extra = sorted(set(f.tensors) - wanted - {"output.weight"})
    problems = ([f"missing tensors: {', '.join(missing[:8])}"] if missing else []) + \
        ([f"tensors tinylm does not use: {', '.join(extra[:8])}"] if extra else [])
    if problems:
        raise GGUFError(f"{f.path} does not fit the {architecture(f)} model its metadata "
                        f"describes: " + "; ".join(problems))


def _float_part(f, part: Part) -> np.ndarray:
    """One GGUF tensor as float32 in tinylm's layout (q/k rows un-permuted)."""
    w = dequantized(f, f.tensors[part.name])
    if part.heads:
        if w.shape[0] % (2 * part.heads):
            raise GGUFError(f"{f.path}: {part.name} has {w.shape[0]} rows, not a whole "
                            f"number of {part.heads} heads of even size")
        w = unpermute(w, part.heads)
    return w


def dequantized(f, t: GGUFTensor) -> np.ndarray:
    """A GGUF tensor as a float32 array of its NumPy-order shape."""
    from tinylm import quant

    if t.type in ("F32", "F16", "F64"):
        return np.asarray(t.data, dtype=np.float32)
    try:
        return quant.format_for_ggml_type(t.type).dequantize(t.data, t.shape)
    except quant.QuantError as e:
        raise GGUFError(f"{f.path}: tensor {t.name!r}: {e}") from None


# ----------------------------------------------------------------------------- export


def export_gguf(model, tokenizer, path, dtype: str = "f32") -> None:
    """Write ``model`` (a llama or gpt2 family Decoder) and its byte-level BPE
    ``tokenizer`` as a GGUF file llama.cpp loads. ``dtype``: the type of the 2-D weights
    ("f32", "f16", "q8_0", "q4_0", "q4_1"; a weight whose rows are not whole blocks is
    written F16, as convert_hf_to_gguf.py does); norms, biases and the position
    embedding stay F32. Written atomically through ``write_gguf``."""
    c = model.config
    if dtype not in EXPORT_DTYPES:
        raise GGUFError(f"GGUF export dtype {dtype!r}: choose one of {', '.join(EXPORT_DTYPES)}")
    _check_exportable(c)
    meta = {**_general(c, dtype), **_arch_metadata(c),
            **tokenizer_metadata(tokenizer, c.vocab_size, c)}
    write_gguf(path, meta, _export_tensors(model, dtype))


def _check_exportable(c) -> None:
    from tinylm.models.config import GPT2Config, LlamaConfig

    family = {"llama": LlamaConfig, "gpt2": GPT2Config}.get(c.architecture)
    if family is None:
        raise GGUFError(f"GGUF export takes llama or gpt2 family models, not "
                        f"{c.architecture!r}")
    base = family()
    fixed = ("positional", "norm", "norm_position", "gated_mlp", "activation", "n_experts")
    p = [f"{n}={getattr(c, n)!r} (GGUF {c.architecture} has {getattr(base, n)!r})"
         for n in fixed if getattr(c, n) != getattr(base, n)]
    o = c.positional_options
    if set(o) - {"base", "scaling"} or (o.get("scaling") or {}).get("type", "linear") != "linear":
        p.append(f"RoPE options {o} (GGUF export writes base and linear scaling)")
    if c.attn_scale is not None:
        p.append("a custom attn_scale")
    if c.architecture == "gpt2" and (not c.bias or c.kv_heads != c.n_head):
        p.append("a gpt2 model without biases or with grouped-query heads")
    if p:
        raise GGUFError("this model cannot be written as GGUF: " + "; ".join(p))


def _u32(v) -> GGUFValue:
    return GGUFValue(ValueType.UINT32, int(v))


def _f32(v) -> GGUFValue:
    return GGUFValue(ValueType.FLOAT32, float(v))


def _general(c, dtype: str) -> dict:
    meta = {"general.architecture": c.architecture, "general.name": "tinylm",
            "general.file_type": _u32(EXPORT_DTYPES[dtype])}
    if dtype in _QUANT_TYPES:
        meta["general.quantization_version"] = _u32(2)
    return meta


def _arch_metadata(c) -> dict:
    a = c.architecture
    meta = {f"{a}.context_length": _u32(c.max_positions),
            f"{a}.embedding_length": _u32(c.d_model), f"{a}.block_count": _u32(c.n_layer),
            f"{a}.feed_forward_length": _u32(c.ff_size),
            f"{a}.attention.head_count": _u32(c.n_head)}
    if a == "gpt2":
        meta[f"{a}.attention.layer_norm_epsilon"] = _f32(c.norm_eps)
        return meta
    o = c.positional_options
    meta.update({f"{a}.attention.head_count_kv": _u32(c.kv_heads),
                 f"{a}.rope.freq_base": _f32(o.get("base", 10000.0)),
                 f"{a}.attention.layer_norm_rms_epsilon": _f32(c.norm_eps),
                 f"{a}.rope.dimension_count": _u32(c.head_size),
                 f"{a}.vocab_size": _u32(c.vocab_size)})
    if c.head_size * c.n_head != c.d_model:
        meta[f"{a}.attention.key_length"] = meta[f"{a}.attention.value_length"] = \
            _u32(c.head_size)
    if o.get("scaling"):
        meta[f"{a}.rope.scaling.type"] = "linear"
        meta[f"{a}.rope.scaling.factor"] = _f32(o["scaling"]["factor"])
    return meta


def _export_tensors(model, dtype: str) -> list:
    c = model.config
    params = dict(model.named_parameters())
    rules = tensor_rules(c)
    if c.architecture == "gpt2" and c.tie_embeddings:  # llama.cpp's gpt2 wants output.weight
        rules.append(Rule("tok_emb.weight", (Part("output.weight"),)))
    out = []
    for rule in rules:
        a = backend.to_numpy(params[rule.ours].data).astype(np.float32, copy=False)
        sizes = [_rows(c, p) for p in rule.parts] if len(rule.parts) > 1 else [a.shape[0]]
        for part, piece in zip(rule.parts, np.split(a, np.cumsum(sizes)[:-1], axis=0)):
            piece = permute(piece, part.heads) if part.heads else piece
            out.append(_encode(part.name, np.ascontiguousarray(piece), dtype))
    return out


def _rows(c, part: Part) -> int:
    """Rows of one of llama's q, k, v in the fused qkv projection."""
    return (c.n_head if part.name.split(".")[-2] == "attn_q" else c.kv_heads) * c.head_size


def _encode(name: str, a: np.ndarray, dtype: str) -> GGUFTensor:
    """F32 for vectors and the position embedding, else ``dtype`` (F16 when the rows are
    not whole blocks of it)."""
    from tinylm import quant

    if a.ndim < 2 or name.startswith("position_embd") or dtype == "f32":
        return GGUFTensor(name, "F32", a.shape, a)
    fmt = quant.get_format(dtype)
    if dtype == "f16" or a.shape[-1] % fmt.block_size:
        return GGUFTensor(name, "F16", a.shape, a.astype(np.float16))
    return GGUFTensor(name, _QUANT_TYPES[dtype], a.shape, fmt.quantize(a))

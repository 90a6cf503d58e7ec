"""How big a model is and how much memory training it takes, from its config alone.

    counts = parameter_counts(LlamaConfig())         # {"embeddings": ..., "total": 6738415616}
    mem = activation_memory(config, batch_size=8, seq_len=1024)
    print(describe(config, batch_size=8, seq_len=1024))   # what `tinylm info` prints

Nothing is allocated: a 70B config is counted as quickly as a tiny one.

``parameter_counts`` is exact (the tests compare it with ``num_parameters()`` of built
models). ``activation_memory`` estimates the bytes a training forward keeps for
backward, term by term, following what tinylm's ops keep: every intermediate that is
an input of a later op (the graph holds them), plus what a few ops save besides
(LayerNorm's normalised input, GELU's tanh/CDF, softmax probabilities, dropout
masks). A norm run by compiled kernels (the CPU's ``kernels.native``, CUDA's fused
ones) keeps two numbers per row instead of its normalised input, and the estimate
follows the CPU's choice. Per layer that is about

    13 N d + 3 N d_ff + 4 B H T S     bytes / itemsize, N = B T tokens (11 N d with
                                      the compiled norms)

for a GPT-2 block (pre-norm, GELU), plus N V for the logits (cross-entropy keeps only
each row's max and log-sum-exp, and recomputes the log-softmax in backward).
Attention follows the op's own choice: the fused naive op keeps the probabilities
(4 B H T S bytes); the composed one (T5's learned bias, attention dropout) a few more
score-sized arrays; the tiled op (T * S >= ``ops.attention.TILED_MIN_SCORES``) none,
only q, k, v copies and a log-sum-exp. It assumes no padding mask (packed training
batches). The tests hold it within a few percent of what the graph really retains.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from tinylm.models.config import BertConfig, ModelConfig, T5Config

# --------------------------------------------------------------------------- parameters


def _linear(i: int, o: int, bias: bool) -> int:
    return i * o + (o if bias else 0)


def _norm_keeps(N: int, d: int) -> int:
    """Elements a LayerNorm / RMSNorm over N rows of d keeps: its output, and either
    the normalised input and 1/rms per row (the NumPy path) or the mean and 1/rms per
    row (the compiled kernels, which recompute the rest from the input)."""
    from tinylm.kernels import native

    return N * d + 2 * N if native.library() is not None else 2 * N * d + N


def _norm(c: ModelConfig) -> int:
    return c.d_model * (2 if c.norm == "layernorm" and c.bias else 1)


def _positional(c: ModelConfig, bidirectional: bool) -> int:
    """Parameters of the positional scheme (built: they are small, and plugins count too)."""
    from tinylm.models.base import positional_from_config

    if c.positional == "learned":  # skip building a big table just to count it
        return c.max_positions * c.d_model
    return positional_from_config(c, bidirectional).num_parameters()


def _block(c: ModelConfig, cross: bool) -> dict:
    d, nh, nkv, hs, ff, b = c.d_model, c.n_head, c.kv_heads, c.head_size, c.ff_size, c.bias
    attn = _linear(d, (nh + 2 * nkv) * hs, b) + _linear(nh * hs, d, b)
    if cross:
        attn += _linear(d, nh * hs, b) + _linear(d, 2 * nkv * hs, b) + _linear(nh * hs, d, b)
    mlp = _linear(d, ff, b) * (2 if c.gated_mlp else 1) + _linear(ff, d, b)
    router = d * c.n_experts
    return {"attention": attn, "feed_forward": mlp * max(c.n_experts, 1) + router,
            "active_feed_forward": mlp * (c.moe_top_k if c.n_experts else 1) + router,
            "norms": _norm(c) * (3 if cross else 2)}


def parameter_counts(c: ModelConfig) -> dict:
    """{"embeddings", "positional", "attention", "feed_forward", "norms", "heads",
    "total", "active"}: parameters by part (tied weights once). "active" is what one
    token uses (with experts, only its top-k)."""
    d, V = c.d_model, c.vocab_size
    counts = dict(embeddings=V * d, positional=0, attention=0, feed_forward=0, norms=0,
                  heads=0)
    active_ff = 0

    def stack(n_layer, bidirectional, cross=False, final_norm=None):
        nonlocal active_ff
        counts["positional"] += _positional(c, bidirectional)
        blk = _block(c, cross)
        for key in ("attention", "feed_forward", "norms"):
            counts[key] += n_layer * blk[key]
        active_ff += n_layer * blk["active_feed_forward"]
        if c.norm_position == "pre" if final_norm is None else final_norm:
            counts["norms"] += _norm(c)

    if isinstance(c, T5Config):
        stack(c.n_layer, True)
        stack(c.decoder_layers, False, cross=True)
        counts["heads"] = 0 if c.tie_embeddings else V * d
    elif isinstance(c, BertConfig):
        counts["embeddings"] += c.type_vocab_size * d
        if c.embed_norm:
            counts["norms"] += _norm(c)
        stack(c.n_layer, True)
        if c.pooler and c.head != "mlm":
            counts["heads"] += _linear(d, d, True)
        if c.head == "mlm":
            decoder = V if c.tie_embeddings else V * d + V  # its bias (and weight, untied)
            counts["heads"] += _linear(d, d, True) + _norm(c) + decoder
        elif c.head == "classification":
            counts["heads"] += _linear(d, c.num_labels, True)
    else:
        stack(c.n_layer, False)
        counts["heads"] = 0 if c.tie_embeddings else V * d
    counts["total"] = sum(counts.values())
    counts["active"] = counts["total"] - counts["feed_forward"] + active_ff
    return counts


# --------------------------------------------------------------------------- activations


class _Tally:
    """Bytes by part, added as element counts of a given itemsize."""

    def __init__(self, itemsize: int, score_itemsize: int):
        self.itemsize, self.score_itemsize = itemsize, score_itemsize
        self.parts: dict = {}

    def add(self, part: str, elements: float, itemsize: int | None = None):
        self.parts[part] = self.parts.get(part, 0) + int(elements) * (itemsize or self.itemsize)


class _Attn(NamedTuple):
    """The shape of one attention sub-layer: B queries rows of T attending over S keys."""

    B: int
    T: int
    S: int
    rotary: bool = False  # RoPE rotates q and k
    composed: bool = False  # the composed op (T5 bias, attention dropout), not the fused one
    causal: bool = False
    bias: bool = False  # a learned score bias is added
    cross: bool = False  # cross-attention over an encoder's memory


def _attention(t: _Tally, c, part, a: _Attn):
    """One attention sub-layer (norm, projections, scores, output, residual)."""
    B, T, S, rotary, composed, causal, bias, cross = a
    N, d, nh, nkv, hs = B * T, c.d_model, c.n_head, c.kv_heads, c.head_size
    t.add(part, _norm_keeps(N, d))  # norm
    if cross:
        t.add(part, N * nh * hs + B * S * 2 * nkv * hs)  # q, and kv of the memory
    else:
        t.add(part, N * (nh + 2 * nkv) * hs)  # fused qkv
        if rotary:
            t.add(part, N * (nh + nkv) * hs)  # rotated q and k
    scores = B * nh * T * S
    if not composed and T * S >= _tiled_min_scores():  # the tiled op: O(T), no scores
        copies = 1 if rotary and not cross else 2  # k, v made contiguous (RoPE's k is)
        t.add(part + " scores", N * nh * hs + copies * B * S * nkv * hs + B * nh * T,
              t.score_itemsize)  # q * scale, k, v, log-sum-exp
        return _attention_out(t, c, part, N)
    if composed and 1 < nkv < nh:  # (one kv head is repeated as a stride-0 view: no copy;
        t.add(part, 2 * B * nh * S * hs)  # the fused op reads grouped k, v in place)
    if c.positional == "alibi" and not cross:  # the op builds the (H, T, S) bias
        t.add(part, nh * T * S, t.score_itemsize)
    if composed:  # matmul, [causal fill], [bias add], softmax, [dropout mask + output]
        n = 2 + int(causal) + int(bias) + (2 if c.attn_dropout else 0)
        t.add(part, N * nh * hs)  # q * scale
        t.add(part + " scores", n * scores)
    else:
        t.add(part + " scores", scores, t.score_itemsize)  # the probabilities
    _attention_out(t, c, part, N)


def _attention_out(t: _Tally, c, part, N):
    d, nh, hs = c.d_model, c.n_head, c.head_size
    t.add(part, 2 * N * nh * hs + 2 * N * d)  # output, heads merged, out-proj, residual add
    if c.dropout:
        t.add(part, 2 * N * d)


def _tiled_min_scores() -> int:
    """The attention op's own switch to its tiled path (read at call time)."""
    from tinylm.ops import attention

    return getattr(attention, "TILED_MIN_SCORES", float("inf"))


def _feed_forward(t: _Tally, c, part, N):
    d, ff = c.d_model, c.ff_size
    rows = N * c.moe_top_k if c.n_experts else N
    t.add(part, _norm_keeps(N, d))  # norm
    if c.gated_mlp:
        t.add(part, 5 * rows * ff)  # gate, sigmoid/cdf, act, up, product
    elif c.activation == "relu":
        t.add(part, 2 * rows * ff)  # up, output
        t.add(part, rows * ff, 1)  # the boolean mask
    else:
        t.add(part, 3 * rows * ff)  # up, saved tanh/cdf/sigmoid, output
    if c.mlp_dropout:
        t.add(part, 2 * rows * ff)
    if c.n_experts:  # router logits, probs, gate weights; tokens gathered, expert outputs,
        E, k = c.n_experts, c.moe_top_k  # joined, back in token order, weighted; the sum
        t.add(part, 2 * N * E + 3 * N * k + 5 * rows * d + N * d)
        t.add(part, 3 * rows + N, 8)  # int64 dispatch indices
    else:
        t.add(part, N * d)  # down projection
    t.add(part, N * d + (2 * N * d if c.dropout else 0))  # residual add (+ dropout)


def activation_memory(c: ModelConfig, batch_size: int = 1, seq_len: int | None = None,
                      dtype="float32", target_len: int | None = None) -> dict:
    """Estimated bytes a training forward keeps for backward, by part, and "total".

    ``seq_len`` defaults to ``max_positions``; for T5 it is the encoder length and
    ``target_len`` (default: seq_len) the decoder's."""
    B = batch_size
    T = c.max_positions if seq_len is None else seq_len
    dt = np.dtype(dtype)
    t = _Tally(dt.itemsize, np.promote_types(dt, np.float32).itemsize)
    d, V = c.d_model, c.vocab_size
    rotary = c.positional == "rope"
    learned_bias = c.positional == "t5"
    composed = learned_bias or bool(c.attn_dropout)

    def embed(N, T_):
        t.add("embeddings", N * d)  # token embeddings
        if c.positional in ("learned", "sinusoidal"):
            t.add("embeddings", T_ * d + N * d)  # the (T, d) position vectors, the sum
        if c.dropout:
            t.add("embeddings", 2 * N * d)

    def stack(B_, T_, n_layer, causal, memory=None):
        N = B_ * T_
        if learned_bias:
            t.add("attention", T_ * T_ * c.n_head)  # the bias table, once per stack
        for _ in range(n_layer):
            _attention(t, c, "attention", _Attn(B_, T_, T_, rotary, composed, causal,
                                                learned_bias))
            if memory is not None:
                _attention(t, c, "attention", _Attn(B_, T_, memory, cross=True))
            _feed_forward(t, c, "feed_forward", N)
        if c.norm_position == "pre":
            t.add("head", _norm_keeps(N, d))
        return N

    def logits(N):
        t.add("head", N * V)
        t.add("head", 2 * N, t.score_itemsize)  # cross-entropy's row max and log-sum-exp

    if isinstance(c, T5Config):
        Tt = T if target_len is None else target_len
        embed(B * T, T)
        stack(B, T, c.n_layer, False)
        embed(B * Tt, Tt)
        N = stack(B, Tt, c.decoder_layers, True, memory=T)
        if c.dropout:
            t.add("head", 2 * (B * T + N) * d)  # dropout after each final norm
        if c.tie_embeddings and c.scale_decoder_output:
            t.add("head", N * d)
        logits(N)
    elif isinstance(c, BertConfig):
        N = B * T
        embed(N, T)
        if c.type_vocab_size:
            t.add("embeddings", 2 * N * d)
        if c.embed_norm:
            t.add("embeddings", _norm_keeps(N, d))
        stack(B, T, c.n_layer, False)
        if c.head == "mlm":
            t.add("head", 3 * N * d + _norm_keeps(N, d))  # dense, gelu (saved + out), norm
            logits(N)
    else:
        N = B * T
        embed(N, T)
        stack(B, T, c.n_layer, True)
        logits(N)
    parts = dict(t.parts)
    parts["total"] = sum(t.parts.values())
    return parts


# --------------------------------------------------------------------------- fitting in memory


def training_bytes(c: ModelConfig, batch_size: int, seq_len: int, dtype="float32") -> int:
    """Estimated bytes training ``c`` takes: weights, gradients and AdamW's two moment
    estimates (4 copies of the parameters) plus the activations of one micro-batch."""
    itemsize = np.dtype(dtype).itemsize
    params = parameter_counts(c)["total"]
    return 4 * params * itemsize + activation_memory(c, batch_size, seq_len, dtype)["total"]


def available_memory() -> int | None:
    """Bytes of RAM this process could still use (psutil's "available" if psutil is
    installed, else MemAvailable of /proc/meminfo, else the physical size), or None."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


# --------------------------------------------------------------------------- measuring


def retained_bytes(output) -> int:
    """Bytes of the arrays the autograd graph below ``output`` keeps alive: op inputs and
    what ops saved for backward, parameters excluded, each buffer once. What
    ``activation_memory`` estimates, measured on a real forward."""
    from tinylm.nn.module import Parameter

    roots, params, stack, seen = {}, set(), [output.creator], set()

    def root(a):
        while getattr(a, "base", None) is not None:
            a = a.base
        return a

    def visit(a):
        if hasattr(a, "nbytes") and hasattr(a, "dtype"):
            r = root(a)
            roots[id(r)] = r
        elif isinstance(a, (tuple, list)):
            for x in a:
                visit(x)

    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        for x in fn.inputs or ():
            if isinstance(x, Parameter):
                params.add(id(root(x.data)))
            else:
                visit(x.data)
            stack.append(x.creator)
        for name, value in vars(fn).items():
            if name not in ("inputs", "xp", "output_refs", "output_meta"):
                visit(value)
    return sum(int(r.nbytes) for i, r in roots.items() if i not in params)


# --------------------------------------------------------------------------- report


def human_size(n: float, unit: str = "B") -> str:
    """1234567 -> "1.2 MB"; with unit "" counts read 1.2M, 6.7B (billions)."""
    prefixes = ("", "K", "M", "G", "T") if unit else ("", "K", "M", "B", "T")
    for prefix in prefixes:
        if abs(n) < 1000 or prefix == "T":
            if unit:
                return f"{n:.1f} {prefix}{unit}" if prefix else f"{int(n)} {unit}"
            return f"{n:.1f}{prefix}" if prefix else f"{int(n)}"
        n /= 1000


def describe(c: ModelConfig, batch_size: int = 1, seq_len: int | None = None,
             dtype="float32") -> str:
    """The report ``tinylm info`` prints."""
    counts = parameter_counts(c)
    T = c.max_positions if seq_len is None else seq_len
    mem = activation_memory(c, batch_size, T, dtype)
    itemsize = np.dtype(dtype).itemsize
    lines = [f"architecture  {c.architecture} ({type(c).__name__})"]
    shape = (f"d_model={c.d_model} n_layer={c.n_layer} n_head={c.n_head} "
             f"n_kv_head={c.kv_heads} head_dim={c.head_size} d_ff={c.ff_size} "
             f"vocab={c.vocab_size}")
    lines.append(f"shape         {shape}")
    extras = [f"positional={c.positional}", f"norm={c.norm} ({c.norm_position})",
              f"activation={c.activation}{' gated' if c.gated_mlp else ''}",
              f"tied={c.tie_embeddings}"]
    if c.n_experts:
        extras.append(f"experts={c.n_experts} top_k={c.moe_top_k}")
    lines.append("options       " + " ".join(extras))
    lines.append("")
    lines.append(f"parameters    {counts['total']:,} ({human_size(counts['total'], '')})")
    for key in ("embeddings", "positional", "attention", "feed_forward", "norms", "heads"):
        if counts[key]:
            share = 100 * counts[key] / counts["total"]
            lines.append(f"  {key:<12}{counts[key]:>16,}  {share:5.1f}%")
    if counts["active"] != counts["total"]:
        lines.append(f"  active/token{counts['active']:>16,}")
    p_bytes = counts["total"] * itemsize
    lines.append("")
    lines.append(f"memory        batch={batch_size} seq_len={T} dtype={dtype} "
                 f"(training, estimated)")
    lines.append(f"  weights     {human_size(p_bytes):>12}")
    lines.append(f"  gradients   {human_size(p_bytes):>12}")
    lines.append(f"  AdamW state {human_size(2 * p_bytes):>12}")
    lines.append(f"  activations {human_size(mem['total']):>12}")
    for key, value in mem.items():
        if key != "total":
            lines.append(f"    {key:<22}{human_size(value):>12}")
    lines.append(f"  total       {human_size(4 * p_bytes + mem['total']):>12}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- weights files

DAMAGED = ("the weights are damaged or incomplete (an interrupted download or copy, or a "
           "disk that filled up); download or copy the folder again, or save the model again")


def check_weights(folder) -> list:
    """The safetensors files of a run, Hugging Face or ``tinylm quantize`` folder
    (model.safetensors, or each shard model.safetensors.index.json lists), each checked
    by reading its header alone (``tinylm.checkpoint.read_header``: valid JSON, known
    dtypes, every tensor's data_offsets inside the file, spans matching the shapes, no
    gaps, overlaps or truncation) and, for shards, holding the tensors the index puts
    there; no tensor is read. A problem is a CheckpointError naming the file and what to
    do. A folder with neither file (a config alone) has nothing to check: []."""
    from tinylm import checkpoint
    from tinylm.errors import CheckpointError
    from tinylm.models.hf import INDEX, SINGLE, _read_json

    folder = os.fspath(folder)
    index, single = os.path.join(folder, INDEX), os.path.join(folder, SINGLE)
    try:
        if os.path.exists(index):
            data = _read_json(index, "safetensors index")
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(f, str) and f for f in weight_map.values()):
                raise CheckpointError(f"{index}: no 'weight_map' object of tensor name -> "
                                      f"shard file")
            files = {n: os.path.join(folder, f) for n, f in weight_map.items()}
            checked = sorted(set(files.values()))
        elif os.path.exists(single):
            files, checked = {}, [single]
        else:
            return []
        for file in checked:
            held = checkpoint.read_header(file)
            lacking = sorted(n for n, f in files.items() if f == file and n not in held)
            if lacking:
                more = ", ..." if len(lacking) > 3 else ""
                raise CheckpointError(f"{file}: lacks {len(lacking)} tensor(s) the index "
                                      f"{INDEX} puts there ({', '.join(lacking[:3])}{more})")
    except CheckpointError as e:
        raise CheckpointError(f"{e}; {DAMAGED}") from e
    return checked


# --------------------------------------------------------------------------- GGUF files


def _count(tokens) -> int:
    """How many tokens a GGUF token list holds: 0 when there is none. (``len(tokens or
    ())`` asked a NumPy array for its truth value, a ValueError.)"""
    return 0 if tokens is None else len(tokens)


def gguf_summary(path) -> dict:
    """What ``tinylm info model.gguf`` reports: architecture, tensor types (count,
    weights, bytes each), parameters, size and bits per weight (tensor bytes * 8 /
    weights, scales included), the tokenizer and the chat template it names."""
    import math

    from tinylm.formats.gguf import read_gguf
    from tinylm.formats.gguf_model import config_from_gguf
    from tinylm.prompts import ChatTemplate

    f = read_gguf(path)
    m = f.metadata
    types: dict = {}
    for t in f.tensors.values():
        entry = types.setdefault(t.type, {"tensors": 0, "weights": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["weights"] += math.prod(t.shape)
        entry["bytes"] += t.nbytes
    weights = sum(e["weights"] for e in types.values())
    data = sum(e["bytes"] for e in types.values())
    template = ChatTemplate.from_jinja(m.get("tokenizer.chat_template"))
    return {"path": os.fspath(path), "version": f.version,
            "architecture": m.get("general.architecture"), "name": m.get("general.name"),
            "file_bytes": os.path.getsize(path), "tensor_bytes": data, "parameters": weights,
            "bits_per_weight": 8 * data / weights if weights else 0.0, "types": types,
            "config": config_from_gguf(f).to_dict(),
            "tokenizer": {"model": m.get("tokenizer.ggml.model"),
                          "pre": m.get("tokenizer.ggml.pre"),
                          "tokens": _count(m.get("tokenizer.ggml.tokens"))},
            "chat_template": None if "tokenizer.chat_template" not in m else
            template.name if template else "not recognised (generate --chat uses plain)"}


def describe_gguf(path) -> str:
    """The report ``tinylm info model.gguf`` prints."""
    s = gguf_summary(path)
    c = s["config"]
    lines = [f"file          {s['path']} (GGUF v{s['version']}, {human_size(s['file_bytes'])})",
             f"architecture  {s['architecture']}" + (f" ({s['name']})" if s["name"] else ""),
             f"shape         d_model={c['d_model']} n_layer={c['n_layer']} "
             f"n_head={c['n_head']} n_kv_head={c['n_kv_head'] or c['n_head']} "
             f"d_ff={c['d_ff'] or 4 * c['d_model']} vocab={c['vocab_size']} "
             f"context={c['max_positions']} tied={c['tie_embeddings']}",
             f"parameters    {s['parameters']:,} ({human_size(s['parameters'], '')})",
             f"size          {human_size(s['tensor_bytes'])} of tensors, "
             f"{s['bits_per_weight']:.2f} bits per weight", "tensor types"]
    for name, e in sorted(s["types"].items(), key=lambda kv: -kv[1]["bytes"]):
        lines.append(f"  {name:<6}{e['tensors']:>5} tensors {e['weights']:>14,} weights "
                     f"{human_size(e['bytes']):>10}  {8 * e['bytes'] / max(e['weights'], 1):5.2f} bpw")
    tok = s["tokenizer"]
    lines.append(f"tokenizer     {tok['model']} (pre {tok['pre']}), {tok['tokens']:,} tokens")
    lines.append(f"chat template {s['chat_template'] or 'none'}")
    return "\n".join(lines)

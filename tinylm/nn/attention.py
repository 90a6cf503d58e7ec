"""Multi-head attention (MHA, MQA, GQA; self or cross), its masks, and the KV cache.

    attn = MultiHeadAttention(d_model=64, n_head=8, n_kv_head=2)      # GQA: 4 q per kv
    y = attn(x, AttentionSetup(mask=additive_mask(keep, T, S, causal=True, dtype=x.dtype)))

Heads: ``n_kv_head`` = ``n_head`` is classic multi-head attention, 1 is multi-query
attention, anything dividing ``n_head`` is grouped-query attention; the key/value
projections (and the cache) shrink by ``n_head / n_kv_head``.

The attention setup: what every layer of one forward shares (the mask, causality,
RoPE's rotation, the KV cache, ALiBi's slopes, the encoder output for cross-attention,
the padding mask a MoE needs) travels as one ``AttentionSetup``, built once per
forward by the model's ``BlockStack`` and handed down block -> attention -> op.

Masks are additive, broadcastable to (B, H, T, S): 0 where a query may look, -inf
where it may not. ``additive_mask`` builds one from a padding mask (B, S) of
1 (token) / 0 (padding) and causality; a positional scheme's position bias (ALiBi,
T5) is added on top. ("bias" alone means a Linear layer's bias.)

A query that sees no key at all (a padding query of a left-padded causal batch) gets
attention output 0 and passes no gradient, on every path (the naive and composed ops,
the tiled op, the CUDA kernels; ``tinylm.ops.attention``, EMPTY ROWS): no NaN, and
nothing that depends on the padding's values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from tinylm import backend, ops
from tinylm.autograd import is_grad_enabled
from tinylm.errors import ShapeError, TinyLMError
from tinylm.nn.layers import Linear
from tinylm.nn.module import Module
from tinylm.tensor import Tensor

# --------------------------------------------------------------------------- masks


def score_dtype(dtype):
    """Attention scores are at least float32."""
    return np.promote_types(dtype, np.float32)


def additive_mask(keep, T: int, S: int, causal: bool, dtype, xp=np, prefix_length=None):
    """An additive mask (B, 1, T, S) from ``keep`` (B, S), 1 = attend, 0 = padding, or
    None: then only causality, (1, 1, T, S). Queries are the last T of the S positions
    (with a KV cache, the first S - T are in the cache). ``prefix_length`` (B,): a
    prefix LM's causal mask, where the first prefix_length keys are visible to every
    query (the prefix attends bidirectionally)."""
    allowed = xp.ones((1, 1, T, S), dtype=bool)
    if keep is not None:
        keep = keep.data if isinstance(keep, Tensor) else xp.asarray(keep)
        if keep.ndim != 2 or keep.shape[1] != S:
            raise ShapeError(
                f"attention_mask must be (batch, {S}) (1 = token, 0 = padding) for {S} "
                f"key positions, got shape {tuple(keep.shape)}"
            )
        allowed = allowed & keep.astype(bool)[:, None, None, :]  # (B, 1, 1|T, S)
    if causal:
        causal_ok = xp.tril(xp.ones((T, S), dtype=bool), k=S - T)  # (T, S)
        if prefix_length is not None:
            prefix = prefix_length.data if isinstance(prefix_length, Tensor) else prefix_length
            prefix = xp.asarray(prefix).reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)
            causal_ok = causal_ok | (xp.arange(S) < prefix)  # (B, 1, T, S)
        allowed = allowed & causal_ok  # (B, 1, T, S)
    dtype = score_dtype(dtype)
    return xp.where(allowed, dtype.type(0), dtype.type(-np.inf)).astype(dtype)


@dataclass(frozen=True)
class AttentionSetup:
    """What every attention layer of one forward shares, built once (by the model's
    ``BlockStack``) and passed unchanged through the blocks to the attention op.

    ``mask``: additive (B|1, H|1, T, S) scores offset (``additive_mask``, plus any
    position bias), or None. ``is_causal``: hide the keys after each query (cheaper
    than a mask when there is no padding). ``rotate``: RoPE's rotation of q and k.
    ``cache``: a ``KVCache``. ``alibi_slopes`` (H,): ALiBi, added by the op itself.
    ``memory`` (B, S', d) and ``memory_mask`` (additive, (B, 1, T|1, S')): what
    cross-attention reads. ``token_mask`` (B, T) 1 = token, 0 = padding: left out of a
    MoE's load-balancing loss.
    """

    mask: Any = None
    is_causal: bool = False
    rotate: Callable | None = None
    cache: "KVCache | None" = None
    alibi_slopes: Any = None
    memory: Any = None
    memory_mask: Any = None
    token_mask: Any = None


NO_SETUP = AttentionSetup()


# --------------------------------------------------------------------------- KV cache


class _Slot:
    """One layer's keys and values, in a buffer that doubles when it fills up."""

    def __init__(self):
        self.k = self.v = None
        self.length = 0

    def append(self, k, v):
        """Write k, v (B, Hkv, T, hs) after what is stored; return the past arrays."""
        xp, T = k.xp, k.shape[2]
        if self.k is None or self.length + T > self.k.shape[2]:
            capacity = max(2 * (self.k.shape[2] if self.k is not None else 0), self.length + T, 16)
            grown = []
            for old, new in ((self.k, k), (self.v, v)):
                buf = xp.empty(new.shape[:2] + (capacity,) + new.shape[3:], dtype=new.dtype)
                if old is not None:
                    buf[:, :, : self.length] = old[:, :, : self.length]
                grown.append(buf)
            self.k, self.v = grown
        past_k, past_v = self.k[:, :, : self.length], self.v[:, :, : self.length]
        self.k[:, :, self.length : self.length + T] = k.data
        self.v[:, :, self.length : self.length + T] = v.data
        self.length += T
        return past_k, past_v


class KVCache:
    """Keys and values of the positions a model has already seen, so that decoding one
    more token costs one position's work instead of the whole prefix's.

        cache = KVCache()
        logits = model(prompt, cache=cache).logits           # fills the cache
        logits = model(next_ids, cache=cache).logits         # (B, 1) new tokens only

    Each attention layer keeps its own slot (keyed by the layer); cross-attention keys
    and values (from the encoder, fixed during decoding) are computed once. The model
    records the positions it has fed (``advance``): ``length`` is how many there are.
    Past keys are constants: gradients flow into the new positions only.
    """

    def __init__(self):
        self._slots: dict = {}
        self._static: dict = {}
        self.positions = None  # (S,) or (B, S) integer array

    @property
    def length(self) -> int:
        return 0 if self.positions is None else int(self.positions.shape[-1])

    def advance(self, positions):
        """Record the positions of the next queries; returns every key position so far."""
        if self.positions is None:
            self.positions = positions
        else:
            xp = backend.get_array_module(positions)
            old, new = self.positions, positions
            if old.ndim != new.ndim:  # one side per row: broadcast the other
                B = max(old.shape[0] if old.ndim == 2 else 1, new.shape[0] if new.ndim == 2 else 1)
                old = xp.broadcast_to(old, (B, old.shape[-1])) if old.ndim == 1 else old
                new = xp.broadcast_to(new, (B, new.shape[-1])) if new.ndim == 1 else new
            self.positions = xp.concatenate([old, new], axis=-1)
        return self.positions

    def update(self, layer, k, v):
        """Append this step's k, v (B, Hkv, T, hs) to ``layer``'s slot; returns all keys
        and values so far (B, Hkv, S, hs)."""
        slot = self._slots.get(id(layer))
        if slot is None:
            slot = self._slots[id(layer)] = _Slot()
        past_k, past_v = slot.append(k, v)
        if is_grad_enabled() and (k.requires_grad or v.requires_grad):
            return (ops.concat([Tensor(past_k), k], axis=2),  # (B, Hkv, S, hs)
                    ops.concat([Tensor(past_v), v], axis=2))
        S = slot.length
        return Tensor(slot.k[:, :, :S]), Tensor(slot.v[:, :, :S])  # (B, Hkv, S, hs)

    def static(self, layer, compute):
        """``compute()``'s (k, v) the first time ``layer`` asks, the stored pair after."""
        if id(layer) not in self._static:
            self._static[id(layer)] = compute()
        return self._static[id(layer)]

    def crop(self, length: int) -> None:
        """Forget every position after the first ``length`` (e.g. rejected draft tokens
        in speculative decoding); cross-attention keys and values stay."""
        for slot in self._slots.values():
            slot.length = min(slot.length, length)
        if self.positions is not None:
            self.positions = self.positions[..., :length]

    def reorder(self, index) -> None:
        """Keep batch rows ``index`` (in that order), e.g. the surviving beams."""
        for slot in self._slots.values():
            slot.k, slot.v = slot.k[index], slot.v[index]
        self._static = {key: (k[index], v[index]) for key, (k, v) in self._static.items()}
        if self.positions is not None and self.positions.ndim == 2:
            self.positions = self.positions[index]


# --------------------------------------------------------------------------- the layer


class MultiHeadAttention(Module):
    """Self-attention (queries, keys and values from x) or, with ``cross=True``,
    cross-attention (keys and values from ``memory``, e.g. an encoder's output).

    Self-attention projects q, k, v with one fused Linear (d -> (nh + 2 nkv) hs); cross-
    attention has ``q`` (d -> nh hs) and ``kv`` (d_memory -> 2 nkv hs). ``out`` maps
    the heads back to d. ``scale`` defaults to 1/sqrt(head_dim) (T5 uses 1).
    """

    def __init__(self, d_model: int, n_head: int, n_kv_head: int | None = None,
                 head_dim: int | None = None, bias: bool = True, cross: bool = False,
                 d_memory: int | None = None, scale: float | None = None, dropout: float = 0.0):
        super().__init__()
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        head_dim = d_model // n_head if head_dim is None else head_dim
        if n_kv_head < 1 or n_head % n_kv_head:
            raise TinyLMError(f"n_head={n_head} query heads cannot share n_kv_head={n_kv_head} "
                              f"key/value heads: n_kv_head must divide n_head")
        if head_dim <= 0:
            raise TinyLMError(f"head_dim must be positive (d_model={d_model}, n_head={n_head})")
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.cross, self.scale, self.dropout = cross, scale, dropout
        q_dim, kv_dim = n_head * head_dim, n_kv_head * head_dim
        if cross:
            self.q = Linear(d_model, q_dim, bias=bias)
            self.kv = Linear(d_model if d_memory is None else d_memory, 2 * kv_dim, bias=bias)
        else:
            self.qkv = Linear(d_model, q_dim + 2 * kv_dim, bias=bias)
        self.out = Linear(q_dim, d_model, bias=bias)

    def _heads(self, x, n):
        B, T = x.shape[:2]
        return x.reshape(B, T, n, self.head_dim).transpose(0, 2, 1, 3)  # (B, n, T, hs)

    def forward(self, x, setup: AttentionSetup = NO_SETUP):
        """x (B, T, d) -> (B, T, d). Self-attention reads ``setup.mask``, ``is_causal``,
        ``rotate``, ``alibi_slopes`` and ``cache``; cross-attention ``setup.memory``,
        ``memory_mask`` and ``cache`` (its keys and values are computed once)."""
        B, T, _ = x.shape
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_dim
        cache = setup.cache
        if self.cross:
            memory = setup.memory
            if memory is None:
                raise TinyLMError("cross-attention needs AttentionSetup(memory=...) (the "
                                  "encoder's output)")
            q = self._heads(self.q(x), nh)  # (B, nh, T, hs)

            def project():
                k, v = self.kv(memory).split(nkv * hs, axis=-1)  # 2 x (B, S, nkv*hs)
                return self._heads(k, nkv), self._heads(v, nkv)  # 2 x (B, nkv, S, hs)

            k, v = project() if cache is None else cache.static(self, project)
            mask, is_causal, slopes = setup.memory_mask, False, None
        else:
            # the fused projection's features are the q heads, then k's, then v's
            heads = self._heads(self.qkv(x), nh + 2 * nkv)  # (B, nh + 2 nkv, T, hs)
            q, k, v = heads.split([nh, nkv, nkv], axis=1)  # (B, n, T, hs)
            if setup.rotate is not None:
                q, k = setup.rotate(q), setup.rotate(k)
            if cache is not None:
                k, v = cache.update(self, k, v)  # (B, nkv, S, hs)
            mask, is_causal, slopes = setup.mask, setup.is_causal, setup.alibi_slopes
        y = ops.scaled_dot_product_attention(
            q, k, v, mask=mask, is_causal=is_causal, scale=self.scale,
            dropout_p=self.dropout, training=self.training, alibi_slopes=slopes,
        )  # (B, nh, T, hs)
        y = y.transpose(0, 2, 1, 3).reshape(B, T, nh * hs)  # (B, T, nh*hs)
        return self.out(y)

    def extra_repr(self) -> str:
        kind = "cross" if self.cross else "self"
        return (f"{kind}, n_head={self.n_head}, n_kv_head={self.n_kv_head}, "
                f"head_dim={self.head_dim}")

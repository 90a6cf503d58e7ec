"""Scaled dot-product attention, the naive (materialised scores) reference path.

    softmax(q @ k^T * scale + mask) @ v        q: (B, H, T, hs), k, v: (B, Hkv, S, hs)

Composed from matmul, masked_fill and the fused softmax, so its gradient needs no code
of its own. Grouped-query attention: when Hkv divides H, each k/v head serves H / Hkv
query heads (Hkv = 1 is multi-query attention).
"""

from __future__ import annotations

import math

from tinylm.errors import ShapeError
from tinylm.ops.elementwise import add, masked_fill, mul
from tinylm.ops.matmul import matmul
from tinylm.ops.movement import broadcast_to, reshape, swapaxes
from tinylm.ops.nn import dropout, softmax
from tinylm.tensor import Tensor


def causal_mask(xp, T: int, S: int):
    """(T, S) boolean, True where query t may NOT see key s (keys after it).

    With a KV cache S > T and query t sits at absolute position S - T + t."""
    return xp.triu(xp.ones((T, S), dtype=bool), k=S - T + 1)


def repeat_kv(x, n_rep: int):
    """(B, Hkv, S, hs) -> (B, Hkv * n_rep, S, hs), each kv head repeated n_rep times."""
    if n_rep == 1:
        return x
    B, Hkv, S, hs = x.shape
    x = reshape(x, (B, Hkv, 1, S, hs))
    x = broadcast_to(x, (B, Hkv, n_rep, S, hs))
    return reshape(x, (B, Hkv * n_rep, S, hs))


def scaled_dot_product_attention(
    q, k, v, mask=None, is_causal: bool = False, scale=None, dropout_p: float = 0.0,
    training: bool = True,
):
    """``mask``: boolean (True = keep, as torch) or additive float, broadcastable to
    (B, H, T, S)."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ShapeError(f"attention expects (B, H, T, hs) tensors, got {q.shape}, {k.shape}, {v.shape}")
    H, Hkv = q.shape[1], k.shape[1]
    if H % Hkv:
        raise ShapeError(f"{H} query heads cannot share {Hkv} key/value heads evenly")
    k, v = repeat_kv(k, H // Hkv), repeat_kv(v, H // Hkv)
    T, S = q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    att = matmul(mul(q, scale), swapaxes(k, -1, -2))  # (B, H, T, S)
    xp = att.xp
    if is_causal:
        att = masked_fill(att, causal_mask(xp, T, S), -float("inf"))
    if mask is not None:
        m = mask.data if isinstance(mask, Tensor) else xp.asarray(mask)
        if m.dtype == bool:
            att = masked_fill(att, ~m, -float("inf"))
        else:
            att = add(att, mask)
    att = softmax(att, axis=-1)
    if dropout_p:
        att = dropout(att, dropout_p, training)
    return matmul(att, v)  # (B, H, T, hs)

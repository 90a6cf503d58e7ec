"""The engine's forward: logits only at the one position per row a token is picked from.

    logits = pick_logits(model, ids, at, cache=cache.prefill(rows, lengths))  # (B, V)

A prefill of a prompt of T tokens needs the next-token distribution after its last
token only, but ``Decoder.forward`` projects every position onto the vocabulary: for
GPT-2 small and a 170-token prompt that is (170, 768) @ (768, 50257), about 13 of the
prefill's 42 GFLOP, all thrown away but one row. For a plain decoder (token embedding
-> ``BlockStack`` -> ``lm_head``, the class's own ``forward``) this runs those layers
itself and projects only the hidden state at column ``at[b]`` of each row. Any other
model (a subclass with its own ``forward``, an instance-level one) goes through its
``forward`` and the wanted rows are taken from its logits, so nothing it does is
skipped. Adapters on the layers run either way (they hook the modules' calls).

The projection of a few rows (a decode step of B rows, B > 1) onto a big vocabulary
runs in vocabulary tiles (``head_logits``) when the head is a plain float ``Linear``
on the host, on one BLAS thread, outside ``autocast``: ``x @ W.T`` with W (V, d) as
one OpenBLAS SGEMM of 2-16 rows is slow (GPT-2's 50257 x 768, flushed caches: 16 ms
at 2 rows, 3 times one row's ``vecdot``); per tile of ``HEAD_TILE`` weight rows, 2-3
rows take one ``vecdot`` each (the tile is read from memory once, then from cache)
and more rows one SGEMM, about 15% faster than the whole product at 4-16 rows.
"""

from __future__ import annotations

import numpy as np

from tinylm import amp, backend
from tinylm.threads import cpu_threads

HEAD_TILE = 512  # weight rows per tile: 1.5 MiB of float32 at d = 768
VECDOT_ROWS = 3  # up to this many rows: a vecdot per row and tile, beyond: a GEMM per tile


def plain_decoder(model) -> bool:
    """Whether ``model``'s forward is ``Decoder.forward`` itself, so that its layers
    may be called one by one."""
    from tinylm.models.decoder import Decoder

    return (isinstance(model, Decoder) and type(model).forward is Decoder.forward
            and "forward" not in vars(model))


def pick_logits(model, ids: np.ndarray, at: np.ndarray, **kwargs) -> np.ndarray:
    """float64 logits (B, V) of ``model`` on ``ids`` (B, T) at column ``at[b]`` of each
    row b, on the host. ``kwargs``: the forward's ``cache``, ``attention_mask``,
    ``positions``."""
    if plain_decoder(model):
        ids = model.as_ids(ids)
        xp = backend.get_array_module(ids)
        h, _ = model.transformer(model.tok_emb(ids), **kwargs)  # (B, T, d)
        rows, cols = xp.arange(ids.shape[0]), xp.asarray(at)
        logits = head_logits(model.lm_head, h[rows, cols])  # (B, V)
    else:
        logits = model(ids, **kwargs).logits.data  # (B, T, V)
        xp = backend.get_array_module(logits)
        logits = logits[xp.arange(logits.shape[0]), xp.asarray(at)]  # (B, V)
    return backend.to_numpy(logits).astype(np.float64)


def _tiled(head) -> bool:
    """Whether ``head`` is a plain float ``Linear`` on the host that ``head_logits`` may
    run itself (no adapter, no autocast, one BLAS thread)."""
    from tinylm.nn import Linear

    w = head.weight.data if type(head) is Linear else None
    return (w is not None and isinstance(w, np.ndarray) and w.dtype.char in "fd"
            and w.flags.c_contiguous and "peft" not in head._modules
            and amp.compute_dtype() is None and cpu_threads() == 1)


def head_logits(head, x):
    """``head(x)`` for hidden states x (B, d): (B, V), in vocabulary tiles when that
    pays (B > 1, a plain float ``Linear``), else through the module."""
    B = x.shape[0]
    if B == 1 or not _tiled(head) or x.data.dtype != head.weight.data.dtype:
        return head(x[:, None]).data[:, 0]
    w, x = head.weight.data, np.ascontiguousarray(x.data)  # (V, d), (B, d)
    out = np.empty((B, w.shape[0]), dtype=w.dtype)
    for s in range(0, w.shape[0], HEAD_TILE):  # tiles of the vocabulary, ~100 for 50257
        tile, part = w[s:s + HEAD_TILE], out[:, s:s + HEAD_TILE]
        if B <= VECDOT_ROWS:
            np.vecdot(tile[None], x[:, None, :], out=part)  # (B, tile)
        else:
            np.matmul(x, tile.T, out=part)
    if head.bias is not None:
        out += head.bias.data
    return out

"""A 2-layer GPT-2-style model built from tinylm.nn parts, and its torch twin.

Used by tests/test_transformer_block.py (gradient parity with torch) and by
bench/engine.py (speed against torch eager). The real model families live in
tinylm.models; this one only exists to prove the engine end to end.

Both twins use GPT-2's parameter names (``transformer.wte``, ``transformer.h.0.attn.
c_attn`` ...), so ``copy_to_torch`` copies weights by name.
"""

from __future__ import annotations

import numpy as np

import tinylm.ops as F
from tinylm import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(d, 3 * d)  # fused q, k, v
        self.c_proj = nn.Linear(d, d)

    def forward(self, x):
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x).split(C, axis=2)  # 3 x (B, T, C)
        q = q.reshape(B, T, nh, hs).transpose(0, 2, 1, 3)  # (B, nh, T, hs)
        k = k.reshape(B, T, nh, hs).transpose(0, 2, 1, 3)  # (B, nh, T, hs)
        v = v.reshape(B, T, nh, hs).transpose(0, 2, 1, 3)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(0, 2, 1, 3).reshape(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d)
        self.c_proj = nn.Linear(4 * d, d)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, n_head)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = MLP(d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, vocab: int, block_size: int, d: int, n_head: int, n_layer: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block_size, d)
        self.h = nn.ModuleList([Block(d, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(d)


class TinyGPT(nn.Module):
    """ids (B, T) -> logits (B, T, vocab); with targets, (logits, mean cross-entropy)."""

    def __init__(self, vocab=65, block_size=16, d=64, n_head=4, n_layer=2, tie=False):
        super().__init__()
        self.transformer = Transformer(vocab, block_size, d, n_head, n_layer)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(self, ids, targets=None):
        B, T = ids.shape
        tr = self.transformer
        x = tr.wte(ids) + tr.wpe(np.arange(T))  # (B, T, d)
        for block in tr.h:
            x = block(x)
        logits = self.lm_head(tr.ln_f(x))  # (B, T, vocab)
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits, targets)


def torch_twin(model: TinyGPT):
    """A torch module with the same structure, names and weights as ``model``."""
    import torch
    from torch import nn as tnn
    from torch.nn import functional as TF

    tr = model.transformer
    vocab, d = tr.wte.weight.shape
    block_size = tr.wpe.weight.shape[0]
    n_head, n_layer = tr.h[0].attn.n_head, len(tr.h)
    tie = model.lm_head.weight is tr.wte.weight

    class TAttention(tnn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = tnn.Linear(d, 3 * d)
            self.c_proj = tnn.Linear(d, d)

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = self.c_attn(x).split(C, dim=2)
            q = q.view(B, T, n_head, C // n_head).transpose(1, 2)
            k = k.view(B, T, n_head, C // n_head).transpose(1, 2)
            v = v.view(B, T, n_head, C // n_head).transpose(1, 2)
            y = TF.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

    class TMLP(tnn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = tnn.Linear(d, 4 * d)
            self.c_proj = tnn.Linear(4 * d, d)

        def forward(self, x):
            return self.c_proj(TF.gelu(self.c_fc(x)))

    class TBlock(tnn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1 = tnn.LayerNorm(d)
            self.attn = TAttention()
            self.ln_2 = tnn.LayerNorm(d)
            self.mlp = TMLP()

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class TGPT(tnn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = tnn.ModuleDict(dict(
                wte=tnn.Embedding(vocab, d),
                wpe=tnn.Embedding(block_size, d),
                h=tnn.ModuleList([TBlock() for _ in range(n_layer)]),
                ln_f=tnn.LayerNorm(d),
            ))
            self.lm_head = tnn.Linear(d, vocab, bias=False)
            if tie:
                self.lm_head.weight = self.transformer.wte.weight

        def forward(self, ids, targets=None):
            T = ids.shape[1]
            tr = self.transformer
            x = tr.wte(ids) + tr.wpe(torch.arange(T))
            for block in tr.h:
                x = block(x)
            logits = self.lm_head(tr.ln_f(x))
            if targets is None:
                return logits
            return logits, TF.cross_entropy(logits.view(-1, vocab), targets.view(-1))

    twin = TGPT().to(dtype=torch.float64 if tr.wte.weight.dtype == np.float64 else torch.float32)
    copy_to_torch(model, twin)
    return twin


def copy_to_torch(model, twin) -> None:
    """Copy every tinylm parameter into the torch parameter of the same name."""
    import torch

    ours = dict(model.named_parameters())
    theirs = dict(twin.named_parameters())
    if set(ours) != set(theirs):
        raise AssertionError(f"parameter names differ: {sorted(set(ours) ^ set(theirs))}")
    with torch.no_grad():
        for name, p in theirs.items():
            p.copy_(torch.from_numpy(np.array(ours[name].data)))

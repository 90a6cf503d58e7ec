"""nanoGPT's character-level Shakespeare recipe in torch, as one whole process: the
peer that ``bench/train_cli.py`` times ``tinylm train`` against.

    OMP_NUM_THREADS=1 .venv/bin/python bench/nanogpt_torch.py --data input.txt
    .venv/bin/python bench/nanogpt_torch.py --max-iters 50 --eval-iters 1   # quick

karpathy/nanoGPT's train.py is not installable offline (not on PyPI), so this is our
own reimplementation of what its CPU recipe runs (README, "I only have a macbook":
``train.py config/train_shakespeare_char.py --device=cpu --compile=False
--eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4
--n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0``),
written from the description of the model and the loop, not copied:

- data: the characters of the corpus (sorted set = vocabulary), first 90% train, last
  10% validation, as uint16 arrays; a batch is ``batch_size`` random windows drawn with
  ``torch.randint`` (targets shifted by one), the next batch fetched right after the
  forward pass as nanoGPT does (the arrays stay in memory and the windows are gathered
  in one indexing, where nanoGPT opens a memmap of train.bin per batch and stacks the
  rows one by one: if anything, a few microseconds in torch's favour);
- model: GPT with learned token and position embeddings, ``n_layer`` pre-LayerNorm
  blocks (LayerNorm without bias -> causal self-attention through
  ``F.scaled_dot_product_attention(is_causal=True)`` -> residual; LayerNorm -> Linear
  4x -> exact GELU -> Linear -> residual), a final LayerNorm and a head tied to the
  token embedding; weights N(0, 0.02), the residual projections N(0, 0.02/sqrt(2L));
- optimizer: AdamW, weight decay on every parameter with two or more dimensions, none on
  the others, ``fused=False`` (nanoGPT only fuses on CUDA); lr warmup then cosine decay
  to ``min_lr``; gradients clipped to norm ``grad_clip``; float32 (nanoGPT's autocast
  context is a no-op on CPU);
- logging: every ``log_interval`` iterations ``iter N: loss X, time Y ms`` where Y is
  the wall time of that iteration (from the previous iteration's end, as nanoGPT
  measures it), and ``step N: train loss X, val loss Y`` at every evaluation.

Threads: torch's default (``OMP_NUM_THREADS`` decides, as for nanoGPT), or
``--threads N`` (``torch.set_num_threads``). No checkpoint is written (nanoGPT writes
one only when the validation loss improves after step 0; not part of a step's time).
Without ``--data`` (or when the file is missing) a generated corpus is used.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="a UTF-8 text file")
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--bias", action="store_true", help="biases in Linear and LayerNorm")
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--max-iters", type=int, default=2000)
    p.add_argument("--lr-decay-iters", type=int, default=2000)
    p.add_argument("--warmup-iters", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.99)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--eval-interval", type=int, default=250)
    p.add_argument("--eval-iters", type=int, default=20)
    p.add_argument("--log-interval", type=int, default=1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- data


def load_corpus(path: str) -> str:
    file = Path(path)
    if file.is_file():
        return file.read_text(encoding="utf-8")
    print(f"{path} not found: using a generated corpus")
    rng = np.random.default_rng(0)
    words = ["the", "king", "and", "queen", "of", "night", "ROMEO:", "JULIET:", "love",
             "thou", "art", "my", "lord", "sweet", "death", ",", ".", "\n"]
    return " ".join(rng.choice(words, size=200_000).tolist())


def encode_splits(text: str):
    """(train ids, val ids, vocabulary size): characters, first 90% / last 10%."""
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    ids = np.array([lookup[c] for c in text], dtype=np.uint16)
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:], len(chars)


def get_batch(data: np.ndarray, batch_size: int, block_size: int):
    """``batch_size`` random windows (torch.randint starts) and their next characters."""
    starts = torch.randint(len(data) - block_size, (batch_size,)).numpy()
    rows = starts[:, None] + np.arange(block_size + 1)
    window = torch.from_numpy(data[rows].astype(np.int64))
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()


# --------------------------------------------------------------------------- model


class Norm(nn.Module):
    """LayerNorm whose bias is optional (torch's has both or neither)."""

    def __init__(self, width: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class SelfAttention(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.n_head, self.dropout = a.n_head, a.dropout
        self.qkv = nn.Linear(a.n_embd, 3 * a.n_embd, bias=a.bias)
        self.proj = nn.Linear(a.n_embd, a.n_embd, bias=a.bias)
        self.proj.residual = True
        self.out_drop = nn.Dropout(a.dropout)

    def forward(self, x):
        B, T, C = x.shape
        heads = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head)
        q, k, v = heads.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, head dim)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.out_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class FeedForward(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.up = nn.Linear(a.n_embd, 4 * a.n_embd, bias=a.bias)
        self.down = nn.Linear(4 * a.n_embd, a.n_embd, bias=a.bias)
        self.down.residual = True
        self.drop = nn.Dropout(a.dropout)

    def forward(self, x):
        return self.drop(self.down(F.gelu(self.up(x))))


class Block(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.norm1, self.attn = Norm(a.n_embd, a.bias), SelfAttention(a)
        self.norm2, self.mlp = Norm(a.n_embd, a.bias), FeedForward(a)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, a, vocab_size: int):
        super().__init__()
        self.block_size = a.block_size
        self.tokens = nn.Embedding(vocab_size, a.n_embd)
        self.positions = nn.Embedding(a.block_size, a.n_embd)
        self.drop = nn.Dropout(a.dropout)
        self.blocks = nn.ModuleList(Block(a) for _ in range(a.n_layer))
        self.norm = Norm(a.n_embd, a.bias)
        self.head = nn.Linear(a.n_embd, vocab_size, bias=False)
        self.head.weight = self.tokens.weight  # tied
        residual_std = 0.02 / math.sqrt(2 * a.n_layer)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                std = residual_std if getattr(m, "residual", False) else 0.02
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, ids, targets):
        T = ids.shape[1]
        x = self.drop(self.tokens(ids) + self.positions(torch.arange(T)))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1),
                               ignore_index=-1)


def make_optimizer(model: nn.Module, a):
    params = [p for p in model.parameters() if p.requires_grad]  # tied weight once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": a.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=a.learning_rate, betas=(a.beta1, a.beta2),
                             fused=False)


def learning_rate(it: int, a) -> float:
    if it < a.warmup_iters:
        return a.learning_rate * (it + 1) / (a.warmup_iters + 1)
    if it > a.lr_decay_iters:
        return a.min_lr
    ratio = (it - a.warmup_iters) / (a.lr_decay_iters - a.warmup_iters)
    return a.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (a.learning_rate - a.min_lr)


# --------------------------------------------------------------------------- loop


@torch.no_grad()
def estimate_loss(model, splits, a) -> dict:
    model.eval()
    out = {}
    for name, data in splits.items():
        losses = [model(*get_batch(data, a.batch_size, a.block_size)).item()
                  for _ in range(a.eval_iters)]
        out[name] = float(np.mean(losses))
    model.train()
    return out


def train(model, opt, splits, a) -> None:
    x, y = get_batch(splits["train"], a.batch_size, a.block_size)
    t0 = time.time()
    for it in range(a.max_iters + 1):
        for group in opt.param_groups:
            group["lr"] = learning_rate(it, a)
        if it % a.eval_interval == 0:
            losses = estimate_loss(model, splits, a)
            print(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}",
                  flush=True)
        if it == a.max_iters:
            break
        loss = model(x, y)
        x, y = get_batch(splits["train"], a.batch_size, a.block_size)  # while "async"
        loss.backward()
        if a.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t1 = time.time()
        dt, t0 = t1 - t0, t1
        if it % a.log_interval == 0:
            print(f"iter {it}: loss {loss.item():.4f}, time {dt * 1000:.2f}ms", flush=True)


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    train_ids, val_ids, vocab = encode_splits(load_corpus(a.data))
    print(f"vocab {vocab}, {len(train_ids):,} train / {len(val_ids):,} val characters, "
          f"{torch.get_num_threads()} torch threads", flush=True)
    model = GPT(a, vocab)
    opt = make_optimizer(model, a)
    train(model, opt, {"train": train_ids, "val": val_ids}, a)


if __name__ == "__main__":
    main()

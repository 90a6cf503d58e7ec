"""A character-level GPT in one screen of tinylm: model, training loop, sampling.

    python examples/char_gpt.py                       # trains on Python's pydoc topics text
    python examples/char_gpt.py --data input.txt --steps 2000 --device cuda

The default corpus is the text of Python's bundled ``pydoc_data`` topics (about
465 KB), so it runs on any fresh install. It shows the engine with nothing hidden;
``tinylm train`` (tinylm/train.py) is the full trainer. The GPU check
(bench/gpu_train_check.py) reuses this file to compare the loss curve on CPU and GPU.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

import tinylm
from tinylm import amp, backend, nn, ops
from tinylm.optim import AdamW, clip_grad_norm_, cosine_with_warmup, set_lr


def default_corpus() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


class Block(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, axis=-1)  # 3 x (B, T, C)
        heads = lambda t: t.reshape(B, T, self.n_head, C // self.n_head).transpose(0, 2, 1, 3)
        y = ops.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
        x = x + self.proj(y.transpose(0, 2, 1, 3).reshape(B, T, C))  # (B, T, C)
        return x + self.out(ops.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class CharGPT(nn.Module):
    def __init__(self, vocab: int, block: int, d: int = 128, n_layer: int = 4, n_head: int = 4):
        super().__init__()
        self.block = block
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.blocks = nn.ModuleList([Block(d, n_head) for _ in range(n_layer)])
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, ids):  # ids: (B, T) integer array on the model's device
        T = ids.shape[1]
        x = self.tok(ids) + self.pos(self.tok.weight.xp.arange(T))  # (B, T, d)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))  # (B, T, vocab)


def batches(data: np.ndarray, block: int, batch: int, gen: np.random.Generator):
    """Endless random windows (x, y = x shifted by one), drawn on the CPU."""
    while True:
        starts = gen.integers(0, len(data) - block - 1, size=batch)
        idx = starts[:, None] + np.arange(block + 1)  # (B, T + 1)
        w = data[idx]
        yield w[:, :-1], w[:, 1:]


def train(model, data, steps, block, batch, lr, device, seed=0, log_every=50, log=print,
          half=False):
    """AdamW with warmup + cosine decay to lr/10; returns the list of losses.
    ``half``: float16 matrix products with dynamic loss scaling (tinylm.amp)."""
    groups = [
        {"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": 0.1},
        {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0},
    ]
    opt = AdamW(groups, lr=lr, betas=(0.9, 0.99))
    stream = batches(data, block, batch, np.random.default_rng(seed))
    scaler = amp.LossScaler(enabled=half)
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        set_lr(opt, cosine_with_warmup(step, lr, lr / 10, min(100, steps // 10), steps))
        x, y = (backend.to_device(a, device) for a in next(stream))
        with amp.autocast(enabled=half):
            loss = ops.cross_entropy(model(x), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        finite = scaler.unscale(model.parameters())
        if finite:
            clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        scaler.update(finite)
        losses.append(float(loss.item()))
        if log and (step % log_every == 0 or step == steps - 1):
            rate = (step + 1) / (time.perf_counter() - t0)
            log(f"step {step:5d}  loss {losses[-1]:.4f}  ({rate:.1f} steps/s)")
    return losses


def sample(model, ids: list, n: int, temperature=0.8, top_k=None, device="cpu", seed=0) -> list:
    """Autoregressive sampling by full recompute over the last ``block`` tokens."""
    gen = np.random.default_rng(seed)
    ids = list(ids)
    with tinylm.no_grad():
        for _ in range(n):
            x = backend.to_device(np.array([ids[-model.block:]]), device)
            logits = backend.to_numpy(model(x).data[0, -1]).astype(np.float64) / temperature
            if top_k:
                logits[logits < np.sort(logits)[-top_k]] = -np.inf
            p = np.exp(logits - logits.max())
            ids.append(int(gen.choice(len(p), p=p / p.sum())))
    return ids


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="a UTF-8 text file (default: Python's pydoc topics)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--half", action="store_true", help="float16 matmuls + loss scaling")
    ap.add_argument("--prompt", default="The ")
    ap.add_argument("--sample-chars", type=int, default=300)
    args = ap.parse_args(argv)

    text = open(args.data, encoding="utf-8").read() if args.data else default_corpus()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = np.array([stoi[c] for c in text], dtype=np.int64)
    print(f"corpus: {len(text):,} chars, vocab {len(chars)}")

    tinylm.seed(args.seed)
    model = CharGPT(len(chars), args.block, args.d, args.n_layer).to(args.device)
    print(f"model: {model.num_parameters():,} parameters on {args.device}")
    losses = train(model, data, args.steps, args.block, args.batch, args.lr, args.device,
                   seed=args.seed, half=args.half)
    print(f"final loss {np.mean(losses[-20:]):.4f} (uniform would be {math.log(len(chars)):.2f})")
    prompt = [stoi.get(c, 0) for c in args.prompt]
    out = sample(model, prompt, args.sample_chars, device=args.device, seed=args.seed)
    print("-" * 60 + "\n" + "".join(chars[i] for i in out))


if __name__ == "__main__":
    main()

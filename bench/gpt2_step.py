"""One training step of GPT-2 small (124M), tinylm against transformers + torch, on the
CPU, one thread and two, interleaved.

    .venv/bin/python bench/gpt2_step.py                        # 124M, batch 4, T=256
    .venv/bin/python bench/gpt2_step.py --tiny --steps 2       # a smoke test (seconds)

A step is what a training loop runs: zero the gradients, forward of the whole model
(token + position embeddings, 12 pre-LayerNorm blocks with causal attention and the
GELU-tanh MLP, final LayerNorm, the tied head over all positions), mean cross-entropy
over (B*T, vocab) logits, backward, gradient clipping to norm 1.0, AdamW (lr 1e-4,
weight decay 0.1 on every parameter, both sides). tinylm: ``tinylm.models`` GPT2Config
(dropout 0) and ``tinylm.optim``; torch: ``transformers.GPT2LMHeadModel`` with SDPA
attention and dropout 0, ``torch.optim.AdamW(fused=False)``. Random weights (their own
initialisations), the same random batch on both sides; both losses start near
ln(vocab) and are printed, as a check that each side trains.

For each thread count (numpy's BLAS through threadpoolctl, torch.set_num_threads) the
two sides alternate step by step (which goes first alternates too), after a pause
(``--settle``) so that the other side's thread pool has stopped spinning, and after
``--warmup`` untimed steps each. Per step: wall time and this process's CPU time
(``time.process_time``: all its threads), medians and spread over ``--steps``; the
ratio tinylm / torch is the median of the per-pair ratios.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# bench/tokenizers.py would shadow the `tokenizers` package that transformers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from tinylm.models import build_model  # noqa: E402
from tinylm.models.config import GPT2Config  # noqa: E402
from tinylm.ops.movement import reshape  # noqa: E402
from tinylm.ops.nn import cross_entropy  # noqa: E402
from tinylm.optim import AdamW, clip_grad_norm_  # noqa: E402
from tinylm.tensor import Tensor  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=3, help="timed steps per side and thread count")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--settle", type=float, default=0.3, metavar="SECONDS")
    p.add_argument("--tiny", action="store_true",
                   help="2 layers, d=128, vocab 1000, T<=64: a smoke test")
    return p.parse_args(argv)


def shape(args) -> dict:
    if args.tiny:
        args.seq = min(args.seq, 64)
        return dict(vocab_size=1000, d_model=128, n_layer=2, n_head=4, max_positions=128)
    return dict(vocab_size=50257, d_model=768, n_layer=12, n_head=12, max_positions=1024)


def tinylm_step(kw: dict, ids: np.ndarray, targets: np.ndarray):
    model = build_model(GPT2Config(**kw, dropout=0.0))
    params = list({id(p): p for p in model.parameters()}.values())  # the tied weight once
    opt = AdamW(params, lr=1e-4, weight_decay=0.1)
    V, flat = kw["vocab_size"], Tensor(targets.reshape(-1))

    def step() -> float:
        opt.zero_grad()
        logits = model(ids).logits
        loss = cross_entropy(reshape(logits, (-1, V)), flat)
        loss.backward()
        clip_grad_norm_(params, 1.0)
        opt.step()
        return float(loss.item())

    return step, sum(p.data.size for p in params)


def torch_step(kw: dict, ids: np.ndarray, targets: np.ndarray):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=kw["vocab_size"], n_embd=kw["d_model"],
                                  n_layer=kw["n_layer"], n_head=kw["n_head"],
                                  n_positions=kw["max_positions"], resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=kw["vocab_size"] - 1,
                                  eos_token_id=kw["vocab_size"] - 1)
    cfg._attn_implementation = "sdpa"
    model = transformers.GPT2LMHeadModel(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=False)
    tids, flat = torch.from_numpy(ids), torch.from_numpy(targets.reshape(-1))
    V = kw["vocab_size"]

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        logits = model(tids).logits
        loss = torch.nn.functional.cross_entropy(logits.view(-1, V), flat)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss.item())

    return step, sum(p.numel() for p in model.parameters())


def set_threads(n: int) -> None:
    import torch
    from threadpoolctl import threadpool_limits

    threadpool_limits(n, user_api="blas")
    torch.set_num_threads(n)


def timed(step, settle: float) -> tuple:
    if settle:
        time.sleep(settle)
    w0, c0 = time.perf_counter(), time.process_time()
    loss = step()
    return time.perf_counter() - w0, time.process_time() - c0, loss


def run_threads(n: int, sides: dict, args) -> dict:
    set_threads(n)
    rows = {name: {"wall": [], "cpu": [], "loss": []} for name in sides}
    names = list(sides)
    for i in range(args.warmup + args.steps):
        for name in (names if i % 2 == 0 else names[::-1]):
            wall, cpu, loss = timed(sides[name], args.settle)
            if i >= args.warmup:
                rows[name]["wall"].append(wall)
                rows[name]["cpu"].append(cpu)
            rows[name]["loss"].append(loss)
    return rows


def spread(v) -> str:
    return f"{1e3 * statistics.median(v):9.0f} ms (min {1e3 * min(v):.0f}, max {1e3 * max(v):.0f})"


def main(argv=None) -> None:
    args = parse_args(argv)
    kw = shape(args)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, kw["vocab_size"], size=(args.batch, args.seq + 1))
    ids, targets = ids[:, :-1].copy(), ids[:, 1:].copy()
    ours, n_ours = tinylm_step(kw, ids, targets)
    peer, n_peer = torch_step(kw, ids, targets)
    print(f"# GPT-2 step: {kw['n_layer']} layers, d={kw['d_model']}, {kw['n_head']} heads, "
          f"vocab {kw['vocab_size']}; batch {args.batch}, T={args.seq}; parameters "
          f"tinylm {n_ours / 1e6:.1f}M, torch {n_peer / 1e6:.1f}M; {args.steps} timed steps "
          f"each after {args.warmup} warm-up; ln(vocab) = {math.log(kw['vocab_size']):.3f}")
    for n in args.threads:
        rows = run_threads(n, {"tinylm": ours, "torch": peer}, args)
        for name, r in rows.items():
            print(f"threads={n} {name:6s} wall {spread(r['wall'])}  cpu {spread(r['cpu'])}  "
                  f"loss {r['loss'][0]:.3f} -> {r['loss'][-1]:.3f}")
        for key in ("wall", "cpu"):
            pairs = [a / b for a, b in zip(rows["tinylm"][key], rows["torch"][key])]
            print(f"threads={n} tinylm/torch {key}: {statistics.median(pairs):.3f} "
                  f"(min {min(pairs):.3f}, max {max(pairs):.3f})", flush=True)


if __name__ == "__main__":
    main()

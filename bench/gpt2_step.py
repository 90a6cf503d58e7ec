"""One training step of GPT-2 small (124M), tinylm against transformers + torch, on the
CPU, one thread and two, interleaved.

    .venv/bin/python bench/gpt2_step.py                        # 124M, batch 4, T=256
    .venv/bin/python bench/gpt2_step.py --tiny --steps 2 --repeats 1   # a smoke test

A step is what a training loop runs: zero the gradients, forward of the whole model
(token + position embeddings, 12 pre-LayerNorm blocks with causal attention and the
GELU-tanh MLP, final LayerNorm, the tied head over all positions), mean cross-entropy
over (B*T, vocab) logits, backward, gradient clipping to norm 1.0, AdamW (lr 1e-4,
weight decay 0.1 on every parameter, both sides). tinylm: ``tinylm.models`` GPT2Config
(dropout 0) and ``tinylm.optim``; torch: ``transformers.GPT2LMHeadModel`` with SDPA
attention and dropout 0, ``torch.optim.AdamW(fused=False)``. Random weights (their own
initialisations), the same random batch on both sides; both losses start near
ln(vocab) and are printed, as a check that each side trains.

Each side runs in a process of its own (``--worker SIDE``), with OMP_NUM_THREADS and
friends set to the thread count: neither side's imports, OpenMP runtime or thread pools
reach the other (in one process the second to load libgomp gets the first's, with its
wait policy: tinylm's compiled kernels then keep to one thread), and tinylm's process
keeps freed memory as ``tinylm train`` does. For each of ``--repeats`` rounds and each
thread count the two sides' processes alternate (which goes first alternates too);
each builds its model, takes ``--warmup`` untimed steps, then ``--steps`` timed ones.
Per step: wall time and the process's CPU time (``time.process_time``: all its
threads); medians and spread over every timed step; the ratio tinylm / torch is the
median of the per-round ratios of the medians.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
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
    p.add_argument("--steps", type=int, default=3, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2,
                   help="rounds of one process per side and thread count")
    p.add_argument("--tiny", action="store_true",
                   help="2 layers, d=128, vocab 1000, T<=64: a smoke test")
    p.add_argument("--worker", choices=["tinylm", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--worker-threads", type=int, default=1, help=argparse.SUPPRESS)
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


def batch(kw: dict, args):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, kw["vocab_size"], size=(args.batch, args.seq + 1))
    return ids[:, :-1].copy(), ids[:, 1:].copy()


def worker(args) -> None:
    """One side in this process: build, warm up, time; one JSON line on stdout."""
    kw = shape(args)
    ids, targets = batch(kw, args)
    if args.worker == "torch":
        import torch

        torch.set_num_threads(args.worker_threads)
        step, n = torch_step(kw, ids, targets)
    else:
        from tinylm import backend
        from tinylm.kernels import native
        from tinylm.threads import blas_threads

        backend.keep_freed_memory()  # as `tinylm train` does
        limit = blas_threads(args.worker_threads)  # as `tinylm train --threads N` does
        limit.__enter__()
        step, n = tinylm_step(kw, ids, targets)
        kernels = native.summary()
    walls, cpus, losses = [], [], []
    for i in range(args.warmup + args.steps):
        w0, c0 = time.perf_counter(), time.process_time()
        losses.append(step())
        if i >= args.warmup:
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
    out = {"wall": walls, "cpu": cpus, "loss": losses, "parameters": n}
    if args.worker == "tinylm":
        out["kernels"] = kernels
    print("RESULT " + json.dumps(out), flush=True)


def run_process(side: str, n: int, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", side,
           "--worker-threads", str(n), "--batch", str(args.batch), "--seq", str(args.seq),
           "--steps", str(args.steps), "--warmup", str(args.warmup)] + (
               ["--tiny"] if args.tiny else [])
    env = {**os.environ, **{k: str(n) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                "MKL_NUM_THREADS")}}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not lines:
        tail = [ln for ln in done.stderr.strip().splitlines() if ln.strip()] or ["no output"]
        sys.exit(f"{side} worker at {n} threads failed: {tail[-1]}")
    return json.loads(lines[-1][len("RESULT "):])


def spread(v) -> str:
    return f"{1e3 * statistics.median(v):9.0f} ms (min {1e3 * min(v):.0f}, max {1e3 * max(v):.0f})"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    kw = shape(args)
    print(f"# GPT-2 step: {kw['n_layer']} layers, d={kw['d_model']}, {kw['n_head']} heads, "
          f"vocab {kw['vocab_size']}; batch {args.batch}, T={args.seq}; {args.repeats} "
          f"rounds of {args.steps} timed steps per process after {args.warmup} warm-up; "
          f"ln(vocab) = {math.log(kw['vocab_size']):.3f}", flush=True)
    sides = ["tinylm", "torch"]
    rows = {(side, n): [] for side in sides for n in args.threads}
    for r in range(args.repeats):
        for n in args.threads:
            for side in (sides if r % 2 == 0 else sides[::-1]):
                rows[side, n].append(run_process(side, n, args))
    for n in args.threads:
        for side in sides:
            got = rows[side, n]
            wall = [w for g in got for w in g["wall"]]
            cpu = [c for g in got for c in g["cpu"]]
            extra = f"  ({got[0]['kernels']})" if "kernels" in got[0] else ""
            print(f"threads={n} {side:6s} wall {spread(wall)}  cpu {spread(cpu)}  loss "
                  f"{got[0]['loss'][0]:.3f} -> {got[0]['loss'][-1]:.3f}  "
                  f"{got[0]['parameters'] / 1e6:.1f}M parameters{extra}")
        for key in ("wall", "cpu"):
            pairs = [statistics.median(a[key]) / statistics.median(b[key])
                     for a, b in zip(rows["tinylm", n], rows["torch", n])]
            print(f"threads={n} tinylm/torch {key}: {statistics.median(pairs):.3f} "
                  f"(min {min(pairs):.3f}, max {max(pairs):.3f})", flush=True)


if __name__ == "__main__":
    main()

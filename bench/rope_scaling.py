"""RoPE scaling past the training context: a char-level Llama trained here at T = 64,
then evaluated, with no fine-tuning, at 4x that context under each scheme.

    .venv/bin/python -m pip install -e plugins/tinylm-rope-scaling --no-deps
    .venv/bin/python bench/rope_scaling.py                 # ~1.5 min of training on 2 cores
    .venv/bin/python bench/rope_scaling.py --steps 50      # a quick look

The model: characters of tinyshakespeare (first 90% train, last 10% validation), a
Llama (RMSNorm, SwiGLU, RoPE base 10000, tied head) of 2 layers, d 64, 4 heads (head
size 16), trained 300 steps (~1.5 min on the shared 2-core machine): AdamW 2e-3 ->
2e-4 (cosine, warmup 50), weight decay 0.1, batch 32 of 64-character windows, grad
clip 1.0, seed 0. ``--d-model``, ``--layers``, ``--steps`` make it bigger.

The evaluation: ``--windows`` validation windows of 4 x 64 = 256 characters (fixed,
non-overlapping, from a seeded draw) scored with the same weights under

    rope          plain RoPE: positions 64..255 extrapolate
    linear        position interpolation (HF "linear", factor 4; tinylm core)
    dynamic-ntk   dynamic NTK (HF "dynamic", factor 4; the plugin)
    yarn          YaRN (HF "yarn", factor 4, original context 64; the plugin)

reporting bits per character over positions 0..63 (inside the training context), over
64..255 (past it), and over all 256; and, as the reference, plain RoPE on 64-character
windows. Writes bench/results/rope_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

import tinylm
from tinylm import optim, plugins
from tinylm.models import LlamaConfig, build_model

from _common import cpu_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
TRAIN_T, SCALE = 64, 4

SCHEMES = {
    "rope": ("rope", {}),
    "linear": ("rope", {"scaling": {"type": "linear", "factor": float(SCALE)}}),
    "dynamic-ntk": ("dynamic-ntk", {"factor": float(SCALE),
                                    "original_max_position_embeddings": TRAIN_T}),
    "yarn": ("yarn", {"factor": float(SCALE), "original_max_position_embeddings": TRAIN_T}),
}


def load_text(path: Path):
    text = path.read_text(encoding="utf-8")
    chars = sorted(set(text))
    ids = np.searchsorted(np.array(chars), np.array(list(text))).astype(np.int64)
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:], len(chars)


def train(train_ids, vocab: int, args):
    """The model trained at TRAIN_T; returns (model, seconds, losses)."""
    steps, batch, seed = args.steps, args.batch, args.seed
    tinylm.seed(seed)
    config = LlamaConfig(vocab_size=vocab, d_model=args.d_model, n_layer=args.layers, n_head=4,
                         d_ff=args.d_model * 8 // 3 // 8 * 8, max_positions=TRAIN_T,
                         tie_embeddings=True)
    model = build_model(config)
    opt = optim.AdamW(optim.param_groups_for_weight_decay(model, 0.1), lr=2e-3,
                      betas=(0.9, 0.99))
    rng = np.random.default_rng(seed)
    losses, start = [], time.perf_counter()
    for step in range(steps):
        optim.set_lr(opt, optim.cosine_with_warmup(step, 2e-3, 2e-4, min(50, steps), steps))
        starts = rng.integers(0, len(train_ids) - TRAIN_T - 1, batch)
        windows = train_ids[starts[:, None] + np.arange(TRAIN_T + 1)]  # (B, T + 1)
        loss = model(windows[:, :-1], targets=windows[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        optim.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.item()))
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {losses[-1]:.4f}  {time.perf_counter() - start:.0f}s",
                  file=sys.stderr)
    return model, time.perf_counter() - start, losses


def bits_per_char(model, windows) -> np.ndarray:
    """(T - 1,) mean bits for predicting character t + 1 from characters 0..t."""
    out = []
    with tinylm.no_grad():
        for chunk in np.array_split(windows, max(1, len(windows) // 8)):
            logits = model(chunk[:, :-1]).logits.numpy().astype(np.float64)  # (b, T-1, V)
            logits -= logits.max(-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            picked = np.take_along_axis(logp, chunk[:, 1:, None], -1)[..., 0]  # (b, T-1)
            out.append(-picked / math.log(2))
    return np.concatenate(out).mean(0)


def with_scheme(model, positional: str, options: dict):
    """The same weights under another positional scheme (RoPE has no parameters)."""
    config = model.config.replace(positional=positional, positional_options=options,
                                  max_positions=SCALE * TRAIN_T)
    other = build_model(config)
    other.load_state_dict(model.state_dict())
    return other


def evaluate(model, val_ids, n_windows: int, seed: int) -> dict:
    long_t = SCALE * TRAIN_T + 1
    starts = np.random.default_rng(seed + 1).choice(len(val_ids) // long_t, n_windows,
                                                    replace=False) * long_t
    windows = val_ids[starts[:, None] + np.arange(long_t)]  # (N, 257)
    rows = {"rope @64": {"0-63": float(bits_per_char(model, windows[:, :TRAIN_T + 1]).mean())}}
    for label, (positional, options) in SCHEMES.items():
        bits = bits_per_char(with_scheme(model, positional, options), windows)  # (256,)
        rows[f"{label} @256"] = {"0-63": float(bits[:TRAIN_T].mean()),
                                 "64-255": float(bits[TRAIN_T:].mean()),
                                 "all": float(bits.mean())}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=DATA)
    args = ap.parse_args()
    plugins.get_positional("yarn")  # the plugin must be installed (see the docstring)
    train_ids, val_ids, vocab = load_text(args.data)
    model, seconds, losses = train(train_ids, vocab, args)
    rows = evaluate(model, val_ids, args.windows, args.seed)
    print(f"\n{args.steps} steps in {seconds:.0f} s, last-50 train loss "
          f"{np.mean(losses[-50:]):.4f} nats; {args.windows} validation windows; "
          f"bits per character:\n")
    print("| scheme @ context | positions 0-63 | 64-255 | all |\n| --- | --- | --- | --- |")
    for label, r in rows.items():
        print(f"| {label} | {r['0-63']:.3f} | {r.get('64-255', float('nan')):.3f} | "
              f"{r.get('all', float('nan')):.3f} |")
    out = ROOT / "bench" / "results" / "rope_scaling.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({
        "date": date.today().isoformat(), "cpu": cpu_model(), "python": platform.python_version(),
        "args": {k: str(v) for k, v in vars(args).items()}, "train_seconds": seconds,
        "train_loss_last50": float(np.mean(losses[-50:])), "bits_per_char": rows}, indent=2))


if __name__ == "__main__":
    main()

"""Train the same char-level GPT on the CPU and on the GPU and compare the loss curves.

    PYTHONPATH=. python3 bench/gpu_train_check.py --steps 60 [--out results.json]

Same seed, same initial weights (drawn on the CPU), same batches, dropout 0: the two
curves must agree within float32 tolerance for the first steps (they drift apart
slowly afterwards, as any two float32 summation orders do). Also prints GPU ms/step
for the example model and a larger one. Exit code 1 when the curves disagree.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import time

import numpy as np

from tinylm import backend

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_example():
    spec = importlib.util.spec_from_file_location("char_gpt", ROOT / "examples" / "char_gpt.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run(ex, data, vocab, device, steps, d=128, n_layer=4, block=64, batch=12, half=False):
    backend.seed(1337)
    model = ex.CharGPT(vocab, block, d, n_layer).to(device)
    ex.train(model, data, 3, block, batch, 1e-3, device, seed=7, log=None, half=half)  # warm-up
    backend.seed(1337)
    model = ex.CharGPT(vocab, block, d, n_layer).to(device)
    t0 = time.perf_counter()
    losses = ex.train(model, data, steps, block, batch, 1e-3, device, seed=0, log=None,
                      half=half)
    backend.synchronize()
    return losses, (time.perf_counter() - t0) / steps * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out")
    args = ap.parse_args()
    ex = load_example()
    text = ex.default_corpus()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = np.array([stoi[c] for c in text], dtype=np.int64)

    cpu, cpu_ms = run(ex, data, len(chars), "cpu", args.steps)
    gpu, gpu_ms = run(ex, data, len(chars), "cuda", args.steps)
    diff = np.abs(np.array(cpu) - np.array(gpu))
    print("step  cpu_loss  gpu_loss  |diff|")
    for i in list(range(0, min(10, args.steps))) + list(range(10, args.steps, 10)):
        print(f"{i:4d}  {cpu[i]:.5f}  {gpu[i]:.5f}  {diff[i]:.2e}")
    first = float(diff[:10].max())
    ok = first < 1e-3 and abs(cpu[-1] - gpu[-1]) < 0.05
    print(f"max |diff| first 10 steps {first:.2e}, last step {diff[-1]:.2e}: "
          f"{'PASS' if ok else 'FAIL'}")

    half, half_ms = run(ex, data, len(chars), "cuda", args.steps, half=True)
    half_gap = abs(float(np.mean(half[-10:])) - float(np.mean(gpu[-10:])))
    print(f"float16 autocast + loss scaling on the GPU: last-10 mean loss {np.mean(half[-10:]):.4f}"
          f" vs float32 {np.mean(gpu[-10:]):.4f} (|gap| {half_gap:.3f})")
    ok = ok and half_gap < 0.05
    _, big_ms = run(ex, data, len(chars), "cuda", 20, d=384, n_layer=6, block=256, batch=32)
    _, big_half_ms = run(ex, data, len(chars), "cuda", 20, d=384, n_layer=6, block=256,
                         batch=32, half=True)
    print(f"ms/step: cpu {cpu_ms:.1f}, gpu {gpu_ms:.1f}, gpu half {half_ms:.1f} (4x128, T=64, "
          f"B=12); gpu {big_ms:.1f}, gpu half {big_half_ms:.1f} (6x384, T=256, B=32)")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps({
            "cpu_losses": cpu, "gpu_losses": gpu, "max_diff_first10": first, "pass": ok,
            "half_losses": half, "cpu_ms": cpu_ms, "gpu_ms": gpu_ms, "gpu_half_ms": half_ms,
            "gpu_big_ms": big_ms, "gpu_big_half_ms": big_half_ms}, indent=1))
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()

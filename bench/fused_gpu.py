"""The fused training-step kernels (tinylm/kernels/fused.cu) against the composed CuPy
ops they replace, on one GPU: the same op with TINYLM_FUSED_KERNELS=1 and =0.

    python bench/fused_gpu.py [--out results.json] [--budget 60] [--reps 20]

Rows (float32): layer_norm and rms_norm forward+backward on (8192, 768); cross-entropy
forward+backward on (8192, 50257) logits (GPT-2's vocabulary, B*T = 8192); one AdamW
step over ~9.5M parameters in 24 tensors (8 matrices 768 x 1536, 16 vectors of 768);
one training step of the example CharGPT (d=128, 4 layers, T=64, batch 12, the model of
bench/gpu_train_check.py). Times are CUDA-event medians after a warm-up; "x" is the
unfused time over the fused one (> 1: fused is faster); "max |diff|" compares the two
paths' outputs and gradients (or parameters after the step). Rows are skipped once
--budget seconds have passed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import tinylm.ops as F  # noqa: E402
from tinylm import backend, nn, optim  # noqa: E402
from tinylm.tensor import Tensor  # noqa: E402


def time_ms(cp, run, reps):
    """Median milliseconds of run() over reps, CUDA events, after one warm-up call."""
    run()
    cp.cuda.runtime.deviceSynchronize()
    times = []
    start, end = cp.cuda.Event(), cp.cuda.Event()
    for _ in range(reps):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end))
    return statistics.median(times)


def set_fused(on: bool) -> None:
    os.environ["TINYLM_FUSED_KERNELS"] = "1" if on else "0"


def op_case(cp, fn, arrays):
    """run() for fwd+bwd of fn on fresh Tensors of arrays, and outputs() for comparing."""
    def outputs():
        ts = [Tensor(a, requires_grad=a.dtype.kind == "f") for a in arrays]
        y = fn(*ts)
        y.backward(cp.ones(y.shape, dtype=y.dtype) if y.ndim else None)
        return [y.data] + [t.grad for t in ts if t.requires_grad]
    return outputs, outputs


def adamw_case(cp, rng):
    shapes = [(768, 1536)] * 8 + [(768,)] * 16
    start = [cp.asarray(rng.standard_normal(s).astype(np.float32)) for s in shapes]
    grads = [cp.asarray(rng.standard_normal(s).astype(np.float32)) for s in shapes]
    params = [nn.Parameter(a.copy()) for a in start]
    for p, g in zip(params, grads):
        p.grad = g
    opt = optim.AdamW(params, lr=1e-3, weight_decay=0.1)

    def run():
        opt.step()

    def outputs():  # three steps from the same start
        fresh = [nn.Parameter(a.copy()) for a in start]
        o = optim.AdamW(fresh, lr=1e-3, weight_decay=0.1)
        for _ in range(3):
            for p, g in zip(fresh, grads):
                p.grad = g
            o.step()
        return [p.data for p in fresh]
    return run, outputs, sum(int(np.prod(s)) for s in shapes)


def train_case(cp):
    spec = importlib.util.spec_from_file_location("char_gpt", ROOT / "examples" / "char_gpt.py")
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    vocab, block, batch = 65, 64, 12
    data = np.random.default_rng(0).integers(0, vocab, 100_000)
    backend.seed(1337)
    model = ex.CharGPT(vocab, block, 128, 4).to("cuda")
    opt = optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    stream = ex.batches(data, block, batch, np.random.default_rng(0))
    x, y = (cp.asarray(a) for a in next(stream))

    def run():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        optim.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    def outputs():
        backend.seed(1337)
        m = ex.CharGPT(vocab, block, 128, 4).to("cuda")
        o = optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.99))
        losses = []
        for _ in range(3):
            loss = F.cross_entropy(m(x), y)
            o.zero_grad()
            loss.backward()
            o.step()
            losses.append(loss.data)
        return losses
    return run, outputs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--budget", type=float, default=60.0, help="seconds; later rows skipped")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    from tinylm import backend

    if not backend.cuda_available():
        print("fused_gpu: no CuPy/GPU here, nothing to measure")
        return 0
    import cupy as cp

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    N, D, V = 8192, 768, 50257
    x = cp.asarray(rng.standard_normal((N, D)).astype(np.float32))
    w = cp.asarray((1 + 0.1 * rng.standard_normal(D)).astype(np.float32))
    b = cp.asarray(rng.standard_normal(D).astype(np.float32))
    logits = cp.asarray(rng.standard_normal((N, V)).astype(np.float32))
    targets = cp.asarray(rng.integers(0, V, N))

    cases = []
    for name, shape, fn, arrays in (
        ("layer_norm fwd+bwd", (N, D), lambda t, ww, bb: F.layer_norm(t, ww, bb), [x, w, b]),
        ("rms_norm fwd+bwd", (N, D), lambda t, ww: F.rms_norm(t, ww), [x, w]),
        ("cross_entropy fwd+bwd", (N, V), lambda t, tt: F.cross_entropy(t, tt),
         [logits, targets]),
    ):
        run, outputs = op_case(cp, fn, arrays)
        cases.append((name, str(shape), run, outputs))
    run, outputs, n = adamw_case(cp, rng)
    cases.append(("AdamW step", f"{n / 1e6:.1f}M params, 24 tensors", run, outputs))
    run, outputs = train_case(cp)
    cases.append(("CharGPT train step", "d=128 L=4 T=64 B=12", run, outputs))

    rows = []
    print(f"{'op':<22} {'shape':<28} {'unfused ms':>10} {'fused ms':>9} {'x':>6} "
          f"{'max |diff|':>10}")
    for name, shape, run, outputs in cases:
        if time.perf_counter() - t0 > args.budget:
            print(f"{name:<22} {shape:<28} skipped (budget)")
            continue
        res = {}
        for on in (False, True):
            set_fused(on)
            res[on] = (time_ms(cp, run, args.reps), [cp.asnumpy(a) for a in outputs()])
            cp.get_default_memory_pool().free_all_blocks()
        diff = max(float(np.abs(a.astype(np.float64) - c).max())
                   for a, c in zip(res[True][1], res[False][1]))
        ms_off, ms_on = res[False][0], res[True][0]
        rows.append(dict(op=name, shape=shape, unfused_ms=ms_off, fused_ms=ms_on,
                         ratio=ms_off / ms_on, max_abs_diff=diff))
        print(f"{name:<22} {shape:<28} {ms_off:>10.3f} {ms_on:>9.3f} {ms_off / ms_on:>6.2f} "
              f"{diff:>10.2e}")
    set_fused(False)
    if args.out:
        device = cp.cuda.runtime.getDeviceProperties(0)["name"]
        device = device.decode() if isinstance(device, bytes) else device
        Path(args.out).write_text(json.dumps(
            {"date": datetime.date.today().isoformat(), "device": device, "rows": rows},
            indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Attention on one GPU: tinylm's FlashAttention kernels against naive CuPy attention and
torch's scaled_dot_product_attention, forward and forward+backward, causal.

    python bench/attention_gpu.py [--out results.json] [--budget 100] [--quick]
        [--T 1024,4096,16384] [--D 64,128] [--variants v1,v2] [--ms 300]

Cases: B=4, H=16, head dim 64 and 128, T = 1024, 4096, 16384. Rows:
  tinylm   float32 (simt), float16 and bfloat16 (tensor cores, impl="mma"), once per
           kernel variant (v1, v2: see flash_attention.kernel_plan; the "variant"
           column; for float32 v2 changes the backward only)
  naive    CuPy, float32 and float16, materialised (B, H, T, T) scores (skipped past
           ~40 GB)
  torch    F.scaled_dot_product_attention: float16, bfloat16 (flash), float32
Times are CUDA-event medians after a warm-up; reps aim at --ms milliseconds per
measurement (2 to 10 reps), and cases are skipped ("budget") once --budget seconds have
passed: T=4096 (the targets) runs first, then 16384, then 1024, and within a size the
16-bit rows first. FLOP convention (FlashAttention's): forward 4 B H T^2 D, halved
when causal; backward 2.5x forward. Peak memory: CuPy pool high-water mark (pool
emptied before each row) or torch.cuda.max_memory_allocated, inputs included; every
runner holds the same live inputs (q, k, v, do), so the peaks compare like with like.
"vs torch" is torch's fwd+bwd time over ours for the same dtype (> 1: we are faster),
"vs naive" the naive CuPy fwd+bwd time over ours, same dtype (float16 for bfloat16).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from tinylm import backend  # noqa: E402
from tinylm.kernels import flash_attention as fa  # noqa: E402

NAIVE_LIMIT_BYTES = 40e9


def commit() -> str:
    """The checkout's commit (every GPU number is labelled with the code it measured)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def flops(B, H, T, D, causal, with_backward):
    f = 4.0 * B * H * T * T * D * (0.5 if causal else 1.0)
    return f * 3.5 if with_backward else f


def time_ms(run, sync_events, seconds_left, target_ms=300.0):
    """Median milliseconds of run() with events, after one warm-up call."""
    make_event, elapsed = sync_events
    run()  # warm-up: compilation, autotuning, allocator growth
    times = []
    start, end = make_event(), make_event()
    first = None
    reps = 1
    while len(times) < reps:
        start.record()
        run()
        end.record()
        end.synchronize()
        t = elapsed(start, end)
        times.append(t)
        if first is None:
            first = t
            reps = max(2, min(10, int(target_ms / max(t, 1e-3))))
            if first / 1000 * reps > seconds_left():
                reps = 2
    return statistics.median(times)


# --------------------------------------------------------------------------- runners


def cupy_runners(cp, impl_name, dtype, B, H, T, D, causal, variant=None):
    """(fwd, fwd+bwd) callables for tinylm or naive CuPy, plus the inputs they hold."""
    rng = cp.random.default_rng(0)
    bits = False
    shape = (B, H, T, D)

    def make():
        x = rng.standard_normal(shape, dtype=cp.float32)
        if dtype == "float32":
            return x
        if dtype == "float16":
            return x.astype(cp.float16)
        try:  # bfloat16: native if this CuPy has it, else raw bits
            import ml_dtypes

            return x.astype(ml_dtypes.bfloat16)
        except Exception:
            return fa.to_bf16_bits(cp, x)

    q, k, v, do = (make() for _ in range(4))
    bits = dtype == "bfloat16" and q.dtype == np.uint16
    if impl_name == "tinylm":
        impl = "simt" if dtype == "float32" else "mma"
        kw = dict(impl=impl, bf16_bits=bits, variant=variant)

        def fwd():
            return fa.flash_attention_forward(q, k, v, causal, None, **kw)

        def fwd_bwd():
            o, lse = fa.flash_attention_forward(q, k, v, causal, None, **kw)
            return fa.flash_attention_backward(q, k, v, o, lse, do, causal, None, **kw)

        return fwd, fwd_bwd

    scale = 1.0 / math.sqrt(D)
    mask = cp.triu(cp.full((T, T), -cp.inf, dtype=q.dtype), k=1) if causal else None

    def naive_fwd():
        s = cp.matmul(q, k.transpose(0, 1, 3, 2))  # (B, H, T, T)
        s *= scale
        if mask is not None:
            s += mask
        s -= s.max(axis=-1, keepdims=True)
        cp.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        return cp.matmul(s, v), s

    def naive_fwd_bwd():
        o, p = naive_fwd()
        dv = cp.matmul(p.transpose(0, 1, 3, 2), do)
        dp = cp.matmul(do, v.transpose(0, 1, 3, 2))
        dp -= (dp * p).sum(axis=-1, keepdims=True)
        dp *= p
        dq = cp.matmul(dp, k) * scale
        dk = cp.matmul(dp.transpose(0, 1, 3, 2), q) * scale
        return dq, dk, dv

    return naive_fwd, naive_fwd_bwd


def torch_runners(torch, dtype, B, H, T, D, causal):
    F = torch.nn.functional
    tdtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    g = torch.Generator(device="cuda").manual_seed(0)
    # the same live set as tinylm's runner (q, k, v, do: 4 input-sized tensors), so the
    # peak memory compares like with like: the forward reads the same leaves under
    # no_grad (no clones for the backward)
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=tdtype, generator=g)
               .requires_grad_(True) for _ in range(3))
    do = torch.randn(B, H, T, D, device="cuda", dtype=tdtype, generator=g)

    def fwd():
        with torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def fwd_bwd():
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return torch.autograd.grad(o, (q, k, v), do)

    return fwd, fwd_bwd


# --------------------------------------------------------------------------- table


def print_table(path) -> None:
    """The compact table of a results JSON (bench/gpu_check.sh prints it): TFLOP/s of the
    forward and of forward+backward (float16: torch, v1, v2; bfloat16 v2), v2 over torch
    (the issue's target is 0.5), float32 fwd+bwd ms, and naive over ours (fwd+bwd, same
    dtype)."""
    doc = json.loads(Path(path).read_text())
    res = doc["results"]
    get = {(r["impl"], r["dtype"], r.get("variant", ""), r["T"], r["D"]): r for r in res}
    torch16, v1, v2 = ("torch", "float16", ""), ("tinylm", "float16", "v1"), \
        ("tinylm", "float16", "v2")
    bf2, f32v1, f32v2 = ("tinylm", "bfloat16", "v2"), ("tinylm", "float32", "v1"), \
        ("tinylm", "float32", "v2")
    naive32, naive16 = ("naive", "float32", ""), ("naive", "float16", "")
    # (header, row, field, format, divide by (row, field) or None)
    cols = [("f16 fwd torch", torch16, "fwd_tflops", "13.1f", None),
            ("v1", v1, "fwd_tflops", "6.1f", None), ("v2", v2, "fwd_tflops", "6.1f", None),
            ("v2/t", v2, "fwd_tflops", "5.2f", (torch16, "fwd_tflops")),
            ("f16 f+b torch", torch16, "fwd_bwd_tflops", "13.1f", None),
            ("v1", v1, "fwd_bwd_tflops", "6.1f", None), ("v2", v2, "fwd_bwd_tflops", "6.1f", None),
            ("v2/t", v2, "fwd_bwd_tflops", "5.2f", (torch16, "fwd_bwd_tflops")),
            ("bf16 v2", bf2, "fwd_tflops", "7.1f", None), ("f+b", bf2, "fwd_bwd_tflops", "6.1f", None),
            ("f32 f+b ms v1", f32v1, "fwd_bwd_ms", "13.2f", None),
            ("v2", f32v2, "fwd_bwd_ms", "6.2f", None), ("naive", naive32, "fwd_bwd_ms", "6.2f", None),
            ("naive/v2 f32", naive32, "fwd_bwd_ms", "12.1f", (f32v2, "fwd_bwd_ms")),
            ("f16", naive16, "fwd_bwd_ms", "5.1f", (v2, "fwd_bwd_ms"))]

    def val(key, T, D, field):
        r = get.get(key + (T, D))
        return r[field] if r and r.get("status") == "ok" else None

    print(f"# {doc.get('device', '?')}, {doc.get('date', '?')}, commit {doc.get('commit', '?')}")
    width = [len(format(0.0, c[3])) for c in cols]
    print(f"{'D':>4} {'T':>6} " + " ".join(f"{c[0]:>{w}}" for c, w in zip(cols, width)))
    for D in sorted({r["D"] for r in res}):
        for T in sorted({r["T"] for r in res}):
            cells = []
            for (_, key, field, spec, over), w in zip(cols, width):
                x = val(key, T, D, field)
                if over is not None:
                    y = val(over[0], T, D, over[1])
                    x = x / y if x is not None and y else None
                cells.append(format(x, spec) if x is not None else f"{'-':>{w}}")
            print(f"{D:>4} {T:>6} " + " ".join(cells))


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="tinylm FlashAttention vs naive CuPy and torch SDPA")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--budget", type=float, default=100.0, help="seconds before skipping cases")
    ap.add_argument("--quick", action="store_true", help="T=1024 and 4096 only")
    ap.add_argument("--T", default="1024,4096,16384", help="sequence lengths, comma-separated")
    ap.add_argument("--D", default="64,128", help="head dims, comma-separated")
    ap.add_argument("--variants", default="v1,v2", help="tinylm kernel variants to time")
    ap.add_argument("--ms", type=float, default=300.0,
                    help="aim each measurement at this many milliseconds of reps")
    ap.add_argument("--table", metavar="JSON", help="only print the compact table of a results file")
    args = ap.parse_args(argv)

    if args.table:
        print_table(args.table)
        return 0
    if not backend.cuda_available():
        print("attention_gpu: no CuPy/GPU here, nothing to measure")
        return 0
    cp = backend.xp_for("cuda")
    try:
        import torch

        if not torch.cuda.is_available():
            torch = None
    except Exception:
        torch = None

    t_start = time.time()

    def seconds_left():
        return args.budget - (time.time() - t_start)

    props = cp.cuda.runtime.getDeviceProperties(0)
    device = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    pool = cp.get_default_memory_pool()
    cupy_events = (cp.cuda.Event, lambda s, e: cp.cuda.get_elapsed_time(s, e))
    torch_events = None
    if torch is not None:
        torch_events = (lambda: torch.cuda.Event(enable_timing=True),
                        lambda s, e: s.elapsed_time(e))

    B, H, causal = 4, 16, True
    Ts = [int(x) for x in args.T.split(",")]
    if args.quick:
        Ts = [T for T in Ts if T <= 4096]
    Ts.sort(key=lambda T: (T != 4096, -T))  # the targets' size first, then the largest
    Ds = [int(x) for x in args.D.split(",")]
    variants = [x for x in args.variants.split(",") if x]
    # fastest first: when the budget runs out it is the slow rows that go
    tiny = [("tinylm", dt, var) for dt in ("float16", "bfloat16") for var in variants]
    rows = [("torch", "float16", ""), ("torch", "bfloat16", "")] + tiny + [
        ("naive", "float16", ""), ("torch", "float32", "")] + [
        ("tinylm", "float32", var) for var in variants] + [("naive", "float32", "")]
    results = []
    print(f"# attention_gpu on {device}, B={B} H={H} causal, {datetime.date.today()}, "
          f"commit {commit()}")
    for T in Ts:
        for D in Ds:
            for impl, dtype, variant in rows:
                rec = dict(impl=impl, dtype=dtype, variant=variant, B=B, H=H, T=T, D=D,
                           causal=causal)
                results.append(rec)
                if impl == "torch" and torch is None:
                    rec["status"] = "no torch"
                    continue
                itemsize = 2 if dtype != "float32" else 4
                if impl == "naive" and 3 * B * H * T * T * itemsize > NAIVE_LIMIT_BYTES:
                    rec["status"] = "oom/skip"
                    continue
                if seconds_left() <= 0:
                    rec["status"] = "budget"
                    continue
                try:
                    if impl == "torch":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                        fwd, fwd_bwd = torch_runners(torch, dtype, B, H, T, D, causal)
                        events = torch_events
                    else:
                        pool.free_all_blocks()
                        fwd, fwd_bwd = cupy_runners(cp, impl, dtype, B, H, T, D, causal,
                                                    variant or None)
                        events = cupy_events
                    rec["fwd_ms"] = time_ms(fwd, events, seconds_left, args.ms)
                    rec["fwd_bwd_ms"] = time_ms(fwd_bwd, events, seconds_left, args.ms)
                    if impl == "torch":
                        rec["peak_bytes"] = int(torch.cuda.max_memory_allocated())
                    else:
                        rec["peak_bytes"] = int(pool.total_bytes())
                    rec["fwd_tflops"] = flops(B, H, T, D, causal, False) / rec["fwd_ms"] / 1e9
                    f = flops(B, H, T, D, causal, True)
                    rec["fwd_bwd_tflops"] = f / rec["fwd_bwd_ms"] / 1e9
                    rec["status"] = "ok"
                except Exception as e:  # an OOM or a failed kernel: record, go on
                    name = type(e).__name__
                    oom = "memory" in (name + str(e)).lower()
                    rec["status"] = "oom/skip" if oom else f"error: {name}: {e}"
                finally:
                    fwd = fwd_bwd = None
                    pool.free_all_blocks()
                    if torch is not None:
                        torch.cuda.empty_cache()

    by_key = {(r["impl"], r["dtype"], r["T"], r["D"]): r for r in results if r["impl"] != "tinylm"}
    print(f"{'D':>4} {'T':>6} {'impl':>7} {'dtype':>9} {'var':>3} {'fwd ms':>8} {'TFLOP/s':>7} "
          f"{'f+b ms':>8} {'TFLOP/s':>7} {'peak GB':>7} {'vs torch':>8} {'vs naive':>8}")
    for r in sorted(results, key=lambda r: (r["D"], r["T"])):
        head = f"{r['D']:>4} {r['T']:>6} {r['impl']:>7} {r['dtype']:>9} {r['variant']:>3}"
        if r.get("status") != "ok":
            print(f"{head} {r.get('status', '?')}")
            continue
        ratios = []
        for other, dt, key in (("torch", r["dtype"], "torch_over_ours_fwd_bwd"),
                               ("naive", "float16" if r["dtype"] == "bfloat16" else r["dtype"],
                                "naive_over_ours_fwd_bwd")):
            t = by_key.get((other, dt, r["T"], r["D"]))
            if r["impl"] != other and t and t.get("status") == "ok":
                r[key] = t["fwd_bwd_ms"] / r["fwd_bwd_ms"]
                ratios.append(f"{r[key]:8.2f}")
            else:
                ratios.append(f"{'':>8}")
        print(f"{head} {r['fwd_ms']:8.3f} {r['fwd_tflops']:7.1f} {r['fwd_bwd_ms']:8.3f} "
              f"{r['fwd_bwd_tflops']:7.1f} {r['peak_bytes'] / 1e9:7.2f} {' '.join(ratios)}")
    print(f"# {time.time() - t_start:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(
            device=device, date=datetime.datetime.now().isoformat(timespec="seconds"),
            commit=commit(),
            flops_convention="fwd 4BHT^2D (x0.5 causal), fwd+bwd 3.5x fwd",
            results=results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

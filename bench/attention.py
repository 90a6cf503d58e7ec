"""Attention benchmark: forward+backward time and peak memory, naive vs tiled vs torch.

    .venv/bin/python bench/attention.py                  # the table (torch: `bench` extra)
    .venv/bin/python bench/attention.py --seq 1024 4096 --repeat 1
    .venv/bin/python bench/attention.py --tune           # tiled tile sizes at T=4096

One causal self-attention, B=1, H=4, hs=64, float32 on the CPU, for T in {1024, 4096,
8192, 16384, 32768}: tinylm's naive path (``impl="naive"``, materialises the (T, T) scores),
tinylm's tiled path (``impl="tiled"``, online softmax, O(T) memory) and torch's
``scaled_dot_product_attention``. Every (impl, T) case runs in a fresh subprocess, so
its peak RSS (``ru_maxrss``: imports + inputs + the op) is its own; inside it, one
warm-up then timed forward+backward repetitions (median). Memory is compared net of
each process's baseline: its peak RSS after the imports and the inputs (torch's import
alone is about 230 MB of its process) is subtracted from its peak over the op, and
"net / torch" is the ratio of those differences (what the op itself allocates: its
output, the three gradients and its temporaries). ``--repeat`` runs the whole
sweep that many times, interleaved, and the table shows the medians of the runs.

Threads: torch gets as many as numpy's BLAS has (``tinylm.threads.cpu_threads``), and
so does the tiled op (it splits its query tiles over that many Python threads);
``OPENBLAS_NUM_THREADS=1 python bench/attention.py`` compares one core each.

The naive path needs about 3.3 float32 (T, T) arrays per head at its peak (backward):
a case whose predicted peak (scaled as T^2 from the largest naive case measured, or
that rule) exceeds ``--naive-limit-gb`` (default: 80 % of this machine's memory) is
reported as "cannot run here: would need N GB" instead of being run into the OOM
killer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import cpu_model, peak_rss_mib

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tinylm from this checkout (imported lazily: fresh processes)
B, H, HS = 1, 4, 64
IMPLS = ("naive", "tiled", "torch")
NAIVE_SCORE_ARRAYS = 3.3  # float32 (B, H, T, T) arrays alive at the naive path's peak


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, nargs="+", default=[1024, 4096, 8192, 16384, 32768],
                   help="sequence lengths T")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--repeat", type=int, default=3, help="runs of the whole sweep (median)")
    p.add_argument("--naive-limit-gb", type=float, default=None,
                   help="skip naive cases predicted to need more "
                        "(default: 80%% of this machine's memory)")
    p.add_argument("--block", type=int, nargs=2, metavar=("BR", "BC"),
                   help="tiled tile sizes (default: the library's)")
    p.add_argument("--tune", action="store_true",
                   help="time the tiled op for Br, Bc in {64, 128, 256, 512} at --tune-seq")
    p.add_argument("--tune-seq", type=int, default=4096)
    p.add_argument("--child", nargs=2, metavar=("IMPL", "T"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- environment


def numpy_threads() -> int:
    from tinylm.threads import cpu_threads

    return cpu_threads()


def memory_gb() -> float:
    """This machine's physical memory in GB (GiB)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


# --------------------------------------------------------------------------- one case


def timed_reps(T: int) -> int:
    return 3 if T <= 4096 else 1


def child(impl: str, T: int, block) -> dict:
    """Run one case in this (fresh) process; return times and memory."""
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((B, H, T, HS), dtype=np.float32) for _ in range(4)]
    if impl == "torch":
        import torch

        torch.set_num_threads(numpy_threads())
        q, k, v, cot = (torch.from_numpy(a) for a in arrays)

        def step():
            qt, kt, vt = (x.detach().requires_grad_() for x in (q, k, v))
            t0 = time.perf_counter()
            o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
            t1 = time.perf_counter()
            o.backward(cot)
            return t1 - t0, time.perf_counter() - t0
    else:
        import tinylm.ops as F
        from tinylm.tensor import Tensor

        kw = {}
        if impl == "tiled" and block:
            kw = dict(block_q=block[0], block_k=block[1])
            fn = lambda q, k, v: F.tiled_attention(q, k, v, is_causal=True, **kw)  # noqa: E731
        else:
            fn = lambda q, k, v: F.scaled_dot_product_attention(  # noqa: E731
                q, k, v, is_causal=True, impl=impl)
        q, k, v, cot = arrays

        def step():
            qt, kt, vt = (Tensor(x, requires_grad=True) for x in (q, k, v))
            t0 = time.perf_counter()
            o = fn(qt, kt, vt)
            t1 = time.perf_counter()
            o.backward(cot)
            return t1 - t0, time.perf_counter() - t0

    base = peak_rss_mib()  # imports + inputs
    step()  # warm-up
    runs = [step() for _ in range(timed_reps(T))]
    return dict(impl=impl, T=T, fwd_ms=statistics.median(r[0] for r in runs) * 1e3,
                ms=statistics.median(r[1] for r in runs) * 1e3,
                peak_mb=peak_rss_mib(), base_mb=base)


def run_case(impl: str, T: int, block) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, str(T)]
    if block:
        cmd += ["--block", str(block[0]), str(block[1])]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return dict(impl=impl, T=T, error=(out.stderr.strip().splitlines() or ["?"])[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the sweep


def predict_naive_gb(T: int, measured: dict) -> float:
    """Peak RSS of the naive case at T, scaled as T^2 from the largest one measured."""
    done = [r for r in measured.values() if r["impl"] == "naive" and "ms" in r]
    if done:
        ref = max(done, key=lambda r: r["T"])
        return (ref["base_mb"] + (ref["peak_mb"] - ref["base_mb"]) * (T / ref["T"]) ** 2) / 1024
    return NAIVE_SCORE_ARRAYS * B * H * T * T * 4 / 2**30


def header(args) -> str:
    torch_v = "not installed"
    try:
        import importlib.metadata as md

        torch_v = md.version("torch")
    except Exception:  # noqa: BLE001 (metadata lookup only)
        pass
    import numpy as np

    env = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                      "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")
           if k in os.environ}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return "\n".join([
        f"attention bench: causal, B={B}, H={H}, hs={HS}, float32, forward+backward, CPU",
        f"machine: {cpu_model()}, {os.cpu_count()} CPUs; python {platform.python_version()}, "
        f"numpy {np.__version__}, torch {torch_v}; numpy BLAS threads {numpy_threads()} "
        f"(torch set to the same); load average at start {load:.2f}",
        "env: " + (", ".join(f"{k}={v}" for k, v in env.items()) or "no OPENBLAS_*/OMP_* set"),
    ])


def sweep(args) -> None:
    print(header(args), flush=True)
    machine = memory_gb()
    limit = 0.8 * machine if args.naive_limit_gb is None else args.naive_limit_gb
    results: dict = {}  # (impl, T) -> list of runs
    skipped: dict = {}
    for rep in range(args.repeat):
        for T in sorted(args.seq):
            order = args.impls if rep % 2 == 0 else args.impls[::-1]
            for impl in order:
                if impl == "naive":
                    last = {T_: rs[-1] for (i, T_), rs in results.items() if i == "naive"}
                    need = predict_naive_gb(T, {t: r for t, r in last.items()})
                    if need > limit:
                        where = ("cannot run here" if need > machine
                                 else f"skipped (> --naive-limit-gb {limit:g})")
                        skipped[(impl, T)] = (f"{where}: would need ~{need:.1f} GB, this "
                                              f"machine has {machine:.1f} GB")
                        continue
                r = run_case(impl, T, args.block)
                results.setdefault((impl, T), []).append(r)
                shown = (f"{r['ms']:.0f} ms, {r['peak_mb']:.0f} MB" if "ms" in r
                         else r["error"])
                print(f"  run {rep + 1}/{args.repeat}  T={T:<6} {impl:<6} {shown}", flush=True)
    if os.name == "posix":
        print(f"load average at end {os.getloadavg()[0]:.2f}")
    print(f"\nmedian (min-max) of {args.repeat} interleaved runs (each case a fresh process; "
          f"peak = process RSS; ratios of the medians):\n")
    print("| T | impl | fwd ms | fwd+bwd ms | peak RSS MB | net: peak - imports+inputs MB "
          "| time / torch | net / torch | peak / torch |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for T in sorted(args.seq):
        ref = results.get(("torch", T))
        ref = [r for r in ref or [] if "ms" in r]
        t_ms = statistics.median(r["ms"] for r in ref) if ref else None
        t_mb = statistics.median(r["peak_mb"] for r in ref) if ref else None
        t_net = statistics.median(r["peak_mb"] - r["base_mb"] for r in ref) if ref else None
        for impl in args.impls:
            if (impl, T) in skipped:
                print(f"| {T} | {impl} | | | | | {skipped[(impl, T)]} | | |")
                continue
            runs = [r for r in results.get((impl, T), []) if "ms" in r]
            if not runs:
                errs = [r.get("error", "?") for r in results.get((impl, T), [])]
                print(f"| {T} | {impl} | | | | | failed: {errs[:1]} | | |")
                continue
            fwd = statistics.median(r["fwd_ms"] for r in runs)
            ms_all = [r["ms"] for r in runs]
            net_all = [r["peak_mb"] - r["base_mb"] for r in runs]
            ms, over = statistics.median(ms_all), statistics.median(net_all)
            mb = statistics.median(r["peak_mb"] for r in runs)
            rt = f"{ms / t_ms:.2f}x" if t_ms else "-"
            rm = f"{mb / t_mb:.2f}x" if t_mb else "-"
            rn = f"{over / t_net:.2f}x" if t_net else "-"
            print(f"| {T} | {impl} | {fwd:.0f} | {ms:.0f} ({min(ms_all):.0f}-{max(ms_all):.0f}) "
                  f"| {mb:.0f} | {over:.0f} ({min(net_all):.0f}-{max(net_all):.0f}) | {rt} "
                  f"| {rn} | {rm} |")


def tune(args) -> None:
    """Tiled fwd+bwd time per (Br, Bc), each case in a fresh process, interleaved."""
    print(header(args), flush=True)
    sizes = (64, 128, 256, 512)
    times: dict = {}
    for rep in range(args.repeat):
        for br in sizes:
            for bc in sizes:
                r = run_case("tiled", args.tune_seq, (br, bc))
                times.setdefault((br, bc), []).append(r.get("ms", float("nan")))
    print(f"\ntiled fwd+bwd ms at T={args.tune_seq}, median of {args.repeat} runs "
          "(rows Br = query block, columns Bc = key block):\n")
    print("| Br \\ Bc | " + " | ".join(str(s) for s in sizes) + " |")
    print("|---|" + "---:|" * len(sizes))
    for br in sizes:
        print(f"| {br} | " + " | ".join(f"{statistics.median(times[(br, bc)]):.0f}"
                                       for bc in sizes) + " |")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.block)))
    elif args.tune:
        tune(args)
    else:
        sweep(args)


if __name__ == "__main__":
    main()

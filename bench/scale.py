"""Scaling benchmark (issue 19): training step time and tokens/s on 1 and 2 ranks, data
parallel and tensor parallel, with the time spent in communication.

    .venv/bin/python bench/scale.py --bind              # the full run (about 4 minutes)
    .venv/bin/python bench/scale.py --quick             # a tiny model, smoke test (< 1 min)
    .venv/bin/python bench/scale.py --models wide --repeats 5 --steps 12

Two models, both trained by ``tinylm.train.Trainer`` on tinyshakespeare's characters
(block 64, global batch 12, AdamW, clipping, one BLAS thread per rank):

- ``nanogpt``: nanoGPT's CPU recipe (4 layers x 4 heads x 128, no biases, exact GELU;
  0.8M parameters: 3.2 MB of gradients per step);
- ``wide``: the same at d_model 512, 8 heads, 4 layers (12.7M parameters: 51 MB).

Four ways to run each: ``1 rank`` (plain python, no MPI), ``DP 2`` (``mpiexec -n 2``,
data parallel: each rank 6 of the 12 rows, the gradients all-reduced once per step),
``ZeRO 2`` (the same with ``--zero 1``: AdamW's state and update split between the
ranks, a reduce-scatter and an all-gather instead of the all-reduce) and ``TP 2``
(``--tensor-parallel 2``: each rank half of every matrix, four all-reduces per block
forward and backward). A run builds the Trainer, takes ``--warmup`` steps, then times
``--steps`` calls of ``Trainer.train_step`` (the sampling of the batch included).

Per run, each rank's medians over its steps: wall time (the table's step time is
rank 0's), CPU time of the process (``time.process_time``; the table shows rank 0's
and the largest over ranks), and the time inside collectives ("comm": the transfer
*and* any wait for the other rank, so an upper bound on the cost of the network),
of which "waiting" is the time spent in the barrier that a large collective (>= 1 MiB:
the gradient buckets, ZeRO's gathers) first meets the other rank in (the wait of the
small ones, tensor parallel's, stays inside "comm"). tokens/s = the global batch's
tokens (12 x 64) / step time. The runs are interleaved (model by model, mode by mode;
odd repeats in reverse mode order) ``--repeats`` times, and the table shows the median
over repeats, so each configuration sees the same mix of other people's load. "x 1
rank" is tokens/s over the 1-rank run's (the issue's target on this 2-core machine:
>= 1.6x for the wide model on 2 ranks), of the medians; "per repeat" is the median of
each repeat's own ratio (its runs were neighbours in time, under the same load); "CPU"
is the 1-rank run's CPU time per step over the busiest rank's, which a busy machine
disturbs much less than the wall-time ratio (an estimate of the wall-time ratio on an
idle machine: it leaves out the time a rank waits for a core, and the sleeping part of
a wait for the other rank). ``--bind`` pins each rank to its own core
(``mpiexec -bind-to core``; the 1-rank run to the first core).

Writes bench/results/scale.json (``--json`` elsewhere).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
RESULTS = ROOT / "bench" / "results"
NANOGPT = dict(architecture="gpt2", n_layer=4, n_head=4, d_model=128, bias=False,
               activation="gelu", dropout=0.0)
MODELS = {
    "nanogpt": NANOGPT,
    "wide": {**NANOGPT, "n_head": 8, "d_model": 512},
    "tiny": {**NANOGPT, "n_layer": 1, "d_model": 32},  # --quick
}
# name: (ranks, tensor parallel, ZeRO stage)
MODES = {"1 rank": (1, 1, 0), "DP 2": (2, 1, 0), "ZeRO 2": (2, 1, 1), "TP 2": (2, 2, 0)}
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_in_place", "reduce_scatter",
               "broadcast", "barrier")


# --------------------------------------------------------------------------- one run (a rank)


class TimedComm:
    """A Comm whose collectives add their wall time to ``seconds`` (everything else
    passes through)."""

    def __init__(self, comm):
        self._comm, self.seconds = comm, 0.0

    def __getattr__(self, name):
        attr = getattr(self._comm, name)
        if name not in COLLECTIVES:
            return attr

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
        return timed


def worker(args) -> None:
    """Under mpiexec (or alone): build the Trainer, time its steps, rank 0 prints JSON."""
    from tinylm import dist
    from tinylm.dist.grid import parallel_from_config
    from tinylm.threads import blas_threads
    from tinylm.train import TrainConfig, Trainer

    world = dist.world()
    if args.bind and world.size == 1:  # (mpiexec -bind-to core pins the ranks)
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    config = TrainConfig(
        out_dir=args.out, data=[str(args.data)], tokenizer="char", block_size=64,
        batch_size=12, max_steps=args.warmup + args.steps, warmup_steps=10, lr=1e-3,
        eval_every=10_000, sample_tokens=0, threads=1, cache_dir=args.cache,
        model=MODELS[args.model], tensor_parallel=args.tensor_parallel, zero=args.zero)
    ranks = parallel_from_config(config, world)
    timers = [TimedComm(ranks.comm)]
    ranks.comm = timers[0]
    if args.tensor_parallel > 1:
        timers.append(TimedComm(ranks.tp))
        ranks.tp = timers[1]
    transports = [t._comm.transport for t in timers]
    trainer = Trainer(config, dist=ranks).setup(overwrite=True)
    steps, cpu, comm, waited = [], [], [], []
    with blas_threads(1):
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                world.barrier()
            t0, p0 = time.perf_counter(), time.process_time()
            c0, w0 = sum(t.seconds for t in timers), _waited(transports)
            trainer.train_step(trainer.next_batches())
            if i >= args.warmup:
                steps.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - p0)
                comm.append(sum(t.seconds for t in timers) - c0)
                waited.append(_waited(transports) - w0)
    # every rank's medians, to rank 0: (step, CPU, comm, of which waiting in a barrier)
    mine = np.array([statistics.median(v) for v in (steps, cpu, comm, waited)])
    every = world.all_gather(mine[None, :])
    if world.rank == 0:
        print(json.dumps({"step_s": float(every[0, 0]), "cpu_s": float(every[0, 1]),
                          "cpu_s_max": float(every[:, 1].max()), "comm_s": float(every[0, 2]),
                          "waited_s": float(every[0, 3]),
                          "params": _parameters(trainer.model),
                          "tokens": config.batch_size * config.block_size}), flush=True)


def _waited(transports) -> float:
    """Seconds the MPI engines spent in the barriers before large collectives (waiting
    for the other rank to arrive: tinylm.dist.mpi's ``waited_s``)."""
    return sum(getattr(t, "waited_s", 0.0) for t in transports)


def _parameters(model) -> int:
    from tinylm.models.info import parameter_counts

    return parameter_counts(model.config)["total"]


# --------------------------------------------------------------------------- the model of step time

# GPT-2 small (124M, context 1024; nanoGPT's global batch of 491,520 tokens) and a 1.1B
# Llama (TinyLlama's shape: 22 layers x 2048, GQA 32/4, d_ff 5632, context 2048, a
# global batch of 2M tokens)
BIG = {
    "GPT-2 small": (dict(architecture="gpt2"), 1024, 491_520),
    "1.1B Llama": (dict(architecture="llama", vocab_size=32000, d_model=2048, n_layer=22,
                        n_head=32, n_kv_head=4, d_ff=5632, max_positions=2048), 2048,
                   2_097_152),
}
# name: (alpha = latency per message in s, beta = bandwidth in bytes/s), assumed
NETWORKS = {"10 GbE": (50e-6, 1.25e9), "25 GbE": (25e-6, 3.125e9),
            "IB EDR 100 Gb/s": (2e-6, 12.5e9)}
RANKS = (1, 8, 64, 512)
# one H200 running tinylm in float32: the rate measured on a 6 x 384 model (T 256, B 32:
# 54.2 ms/step, bench/RESULTS.md, "GPU: integration"), a lower bound for larger models;
# AdamW there is memory-bound: 7 floats read or written per parameter at 4.8 TB/s
H200_FLOP_PER_S = 6 * 10.6e6 * 32 * 256 / 54.2e-3
H200_ADAMW_S_PER_PARAM = 7 * 4 / 4.8e12
BUCKET_BYTES = 25 * 2**20  # tinylm.dist.data_parallel's gradient bucket


def flops_per_token(fields: dict, context: int) -> float:
    """Training FLOPs per token: 6 N (forward + backward of every weight, the LM head
    included) + 12 L d T (the attention scores and their weighted sum, T = context)."""
    from tinylm.models import config_from_dict
    from tinylm.models.info import parameter_counts

    c = config_from_dict(fields)
    counts = parameter_counts(c)
    # the weights that multiply: not the position table, nor an untied input embedding
    # (a lookup); a tied one is the LM head's matrix
    n = counts["total"] - counts["positional"] - (0 if c.tie_embeddings else counts["embeddings"])
    return 6 * n + 12 * c.n_layer * c.n_head * c.head_size * context


def measure_compute(tokens: int = 256, steps: int = 2) -> dict:
    """GPT-2 small's forward + backward on one sequence of ``tokens``, one thread: s per
    token and the FLOP rate it implies; AdamW's step on its 124M parameters."""
    from tinylm import backend
    from tinylm.models import build_model, config_from_dict
    from tinylm.optim import AdamW
    from tinylm.threads import blas_threads

    backend.seed(0)
    model = build_model(config_from_dict(dict(architecture="gpt2", max_positions=tokens)))
    ids = np.random.default_rng(0).integers(0, 50257, (1, tokens + 1))
    opt = AdamW(list(model.parameters()), lr=1e-4)
    times, adam = [], []
    with blas_threads(1):
        for _ in range(steps + 1):
            t0 = time.perf_counter()
            model(ids[:, :-1], targets=ids[:, 1:]).loss.backward()
            t1 = time.perf_counter()
            opt.step()
            opt.zero_grad()
            times.append(t1 - t0)
            adam.append(time.perf_counter() - t1)
    per_token = statistics.median(times[1:]) / tokens
    flops = flops_per_token(dict(architecture="gpt2", max_positions=tokens), tokens)
    return {"tokens": tokens, "s_per_token": per_token, "flop_per_s": flops / per_token,
            "adamw_s": statistics.median(adam[1:]), "params": model.num_parameters()}


def ring_all_reduce_s(nbytes: float, n: int, alpha: float, beta: float) -> float:
    """One ring all-reduce of ``nbytes`` over ``n`` ranks: a reduce-scatter and an
    all-gather, each n - 1 steps of nbytes / n."""
    return 0.0 if n == 1 else 2 * (n - 1) / n * nbytes / beta + 2 * (n - 1) * alpha


def project(flop_per_s: float, adamw_s_per_param: float) -> list:
    """Data-parallel step time at each N, model and network: the global batch's
    compute split over N ranks (at ``flop_per_s`` per rank) + AdamW + the gradient
    all-reduce in 25 MB buckets (no overlap, as tinylm does it)."""
    from tinylm.models import config_from_dict
    from tinylm.models.info import parameter_counts

    rows = []
    for name, (fields, context, batch) in BIG.items():
        params = parameter_counts(config_from_dict(fields))["total"]
        compute1 = batch * flops_per_token(fields, context) / flop_per_s
        grad_bytes = 4 * params
        buckets = -(-grad_bytes // BUCKET_BYTES)
        for n in RANKS:
            row = {"model": name, "params": params, "ranks": n, "tokens": batch,
                   "compute_s": compute1 / n + adamw_s_per_param * params,
                   "sent_bytes": 2 * (n - 1) / n * grad_bytes, "messages": 2 * (n - 1) * buckets}
            for net, (alpha, beta) in NETWORKS.items():
                comm = (ring_all_reduce_s(grad_bytes, n, 0.0, beta)
                        + (2 * (n - 1) * alpha * buckets if n > 1 else 0.0))
                row[net] = {"comm_s": comm, "step_s": row["compute_s"] + comm}
            rows.append(row)
    return rows


def print_projection(rows: list, rank: str) -> None:
    nets = list(NETWORKS)
    print(f"\nData-parallel step time, one rank = {rank}")
    print("| model | N | compute/rank | sent/rank | " + " | ".join(
        f"{n}: step (comm share)" for n in nets) + " |")
    print("| --- | --- | --- | --- | " + " | ".join("---" for _ in nets) + " |")
    for r in rows:
        cells = [f"{_seconds(r[n]['step_s'])} ({100 * r[n]['comm_s'] / r[n]['step_s']:.0f}%)"
                 for n in nets]
        print(f"| {r['model']} | {r['ranks']} | {_seconds(r['compute_s'])} | "
              f"{r['sent_bytes'] / 1e9:.2f} GB | " + " | ".join(cells) + " |")


def _seconds(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 100:
        return f"{s:.0f} s"
    return f"{s:.3g} s" if s >= 1 else f"{1e3 * s:.3g} ms"


# --------------------------------------------------------------------------- the driver


def run_one(args, model: str, mode: str, workdir: str) -> dict:
    """One configuration in a fresh process (group); returns rank 0's numbers."""
    ranks, tp, zero = MODES[mode]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "TINYLM_LOAD_PLUGINS": ""}
    out = tempfile.mkdtemp(prefix=f"{model}-{ranks}-{tp}-{zero}-", dir=workdir)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model", model,
           "--out", out, "--cache", os.path.join(workdir, "cache"), "--data", str(args.data),
           "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--tensor-parallel", str(tp), "--zero", str(zero)] + (["--bind"] if args.bind else [])
    if ranks > 1:
        from tinylm.dist.launch import find_mpiexec

        bind = ["-bind-to", "core"] if args.bind else []
        cmd = [find_mpiexec(), *bind, "-n", str(ranks)] + cmd
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode or not lines:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def summarise(runs: dict) -> list:
    """Rows of the table: medians over repeats, the speed-up over the model's 1 rank
    (of the medians; and the median of each repeat's own ratio, the two runs of a
    ratio being neighbours in time)."""
    rows = []
    for model, modes in runs.items():
        base = modes.get("1 rank")
        for mode, reps in modes.items():
            med = {k: statistics.median(r[k] for r in reps)
                   for k in ("step_s", "cpu_s", "cpu_s_max", "comm_s", "waited_s")}
            step = med["step_s"]
            ratios = [b["step_s"] / r["step_s"] for b, r in zip(base, reps)] if base else []
            rows.append({"model": model, "mode": mode, "params": reps[0]["params"],
                         "step_ms": 1e3 * step, "comm_ms": 1e3 * med["comm_s"],
                         "waited_ms": 1e3 * med["waited_s"],
                         "comm_share": med["comm_s"] / step,
                         "cpu_ms": 1e3 * med["cpu_s"], "cpu_ms_max": 1e3 * med["cpu_s_max"],
                         "tokens_per_s": reps[0]["tokens"] / step,
                         "speedup": (statistics.median(b["step_s"] for b in base) / step
                                     if base else None),
                         "speedup_per_repeat": statistics.median(ratios) if ratios else None,
                         "speedup_cpu": (statistics.median(b["cpu_s"] for b in base)
                                         / med["cpu_s_max"] if base else None),
                         "step_ms_each": [round(1e3 * r["step_s"], 2) for r in reps]})
    return rows


def print_table(rows: list) -> None:
    print("| model | params | run | step (ms) | comm/step (ms) | of which waiting (ms) "
          "| comm share | CPU/step/rank (ms) | tokens/s | x 1 rank | x 1 rank, per repeat "
          "| x 1 rank, CPU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        speed = f"{r['speedup']:.2f}x" if r["speedup"] else ""
        each = f"{r['speedup_per_repeat']:.2f}x" if r["speedup_per_repeat"] else ""
        cpu = f"{r['speedup_cpu']:.2f}x" if r["speedup_cpu"] else ""
        print(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['mode']} | {r['step_ms']:.1f} "
              f"| {r['comm_ms']:.1f} | {r['waited_ms']:.1f} | {100 * r['comm_share']:.0f}% | "
              f"{r['cpu_ms']:.0f} (max {r['cpu_ms_max']:.0f}) | {r['tokens_per_s']:,.0f} "
              f"| {speed} | {each} | {cpu} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["nanogpt", "wide"], choices=MODELS)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny model, 1 repeat, 3 steps")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--json", type=Path, default=RESULTS / "scale.json")
    # the worker's own options
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="nanogpt", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    p.add_argument("--no-projection", action="store_true",
                   help="skip GPT-2 small's compute measurement and the model of step time")
    p.add_argument("--bind", action="store_true",
                   help="pin each rank to its own core (mpiexec -bind-to core; 1 rank: "
                        "the first core)")
    p.add_argument("--tensor-parallel", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--zero", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.models, args.repeats, args.steps, args.warmup = ["tiny"], 1, 3, 1
    load = os.getloadavg()[0]
    started = time.time()
    runs = {m: {mode: [] for mode in args.modes} for m in args.models}
    with tempfile.TemporaryDirectory(prefix="tinylm-scale-") as workdir:
        for rep in range(args.repeats):
            for model in args.models:
                # odd repeats run the modes in reverse: a drift in the machine's load
                # then favours no mode
                for mode in (args.modes if rep % 2 == 0 else args.modes[::-1]):
                    runs[model][mode].append(run_one(args, model, mode, workdir))
                    r = runs[model][mode][-1]
                    print(f"repeat {rep + 1}/{args.repeats} {model:8s} {mode:7s} "
                          f"{1e3 * r['step_s']:8.1f} ms/step, comm {1e3 * r['comm_s']:.1f} ms "
                          f"(waiting {1e3 * r['waited_s']:.1f}), CPU {1e3 * r['cpu_s']:.0f} ms, "
                          f"load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    rows = summarise(runs)
    print_table(rows)
    compute = None if args.quick or args.no_projection else measure_compute()
    projections = {}
    if compute is not None:
        print(f"\nGPT-2 small forward + backward, one thread: {1e3 * compute['s_per_token']:.2f} "
              f"ms/token = {compute['flop_per_s'] / 1e9:.1f} GFLOP/s; AdamW "
              f"{compute['adamw_s']:.2f} s/step")
        per_param = compute["adamw_s"] / compute["params"]
        projections = {"core": project(compute["flop_per_s"], per_param),
                       "h200": project(H200_FLOP_PER_S, H200_ADAMW_S_PER_PARAM)}
        print_projection(projections["core"], "one core of this machine (measured)")
        print_projection(projections["h200"], f"one H200 at {H200_FLOP_PER_S / 1e12:.1f} "
                         f"TFLOP/s (tinylm float32, measured on a smaller model)")
    meta = {"date": datetime.date.today().isoformat(), "machine": platform.node(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "load_start": load, "load_end": os.getloadavg()[0],
            "wall_s": round(time.time() - started, 1), "steps": args.steps,
            "warmup": args.warmup, "repeats": args.repeats, "bind": args.bind,
            "modes": args.modes}
    print(f"load average {meta['load_start']:.2f} -> {meta['load_end']:.2f}; "
          f"{meta['wall_s']:.0f} s", file=sys.stderr)
    if not args.quick:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows, "compute": compute,
                                         "networks": NETWORKS, "projections": projections},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()

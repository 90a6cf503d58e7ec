"""Engine benchmark: one training step of a 2-layer GPT-2-style model, tinylm vs torch.

    .venv/bin/python bench/engine.py                 # the table (needs the `bench` extra)
    .venv/bin/python bench/engine.py --profile       # + where tinylm's time goes
    .venv/bin/python bench/engine.py --threads 1     # both sides on one thread

A step is what a training loop does before the optimizer: token + position embedding,
2 pre-norm transformer blocks (causal 4-head attention with a fused qkv projection,
GELU MLP 4x), final LayerNorm, LM head, mean cross-entropy, backward. Defaults: batch
12, T=64, d=128, 4 heads, vocab 65, float32 on the CPU. The AdamW step is timed on its
own. Both models hold the same weights (tests/tiny_gpt.py builds the twins) and run in
this one process, interleaved: after warm-up, each repetition times one tinylm step and
one torch step (in alternating order), and the table reports medians.

Each timed step starts after a short pause (``--settle``, 0.2 s). Without it the two
thread pools fight: OpenBLAS's worker threads keep spinning for about 0.1 s after a
numpy GEMM, so on a 2-core machine a torch step that follows a tinylm step gets half
the machine (measured here: torch 31 ms/step interleaved without the pause, 16-17 ms
alone or with it), which would flatter tinylm.

The environment is used as it is (threads, OPENBLAS_*); the header says what it was.
To see numpy's current OpenBLAS kernels on a machine where OPENBLAS_CORETYPE is pinned,
run the same command under ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE`` and label
the result so.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import os
import platform
import pstats
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from _common import cpu_model, peak_rss_mib  # noqa: E402
from tiny_gpt import TinyGPT, torch_twin  # noqa: E402

from tinylm import backend  # noqa: E402
from tinylm.function import Function  # noqa: E402
from tinylm.optim import AdamW  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--seq", type=int, default=64, help="T, the sequence length")
    p.add_argument("--d", type=int, default=128, help="model width")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=65)
    p.add_argument("--steps", type=int, default=30, help="timed repetitions of each")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--settle", type=float, default=0.2, metavar="SECONDS",
                   help="pause before each timed step so that the other side's thread "
                        "pool has gone to sleep (default 0.2; 0 to turn off)")
    p.add_argument("--threads", type=int,
                   help="set both numpy's BLAS threads (threadpoolctl) and torch's to N")
    p.add_argument("--only", choices=("tinylm", "torch"),
                   help="run one side alone (e.g. for its own peak RSS)")
    p.add_argument("--profile", action="store_true",
                   help="after the table, profile tinylm steps: time per op and cProfile")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- the steps


class Runner:
    def __init__(self, name, step, opt_step):
        self.name, self.step, self.opt_step = name, step, opt_step
        self.step_ms, self.opt_ms = [], []
        self.loss = None

    def run(self, record: bool, settle: float = 0.0) -> None:
        if settle:
            time.sleep(settle)  # let the other side's thread pool stop spinning
        t0 = time.perf_counter()
        self.loss = self.step()
        t1 = time.perf_counter()
        self.opt_step()
        t2 = time.perf_counter()
        if record:
            self.step_ms.append((t1 - t0) * 1e3)
            self.opt_ms.append((t2 - t1) * 1e3)


def tinylm_runner(model, ids, targets) -> Runner:
    opt = AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step():
        opt.zero_grad()
        _, loss = model(ids, targets)
        loss.backward()
        return float(loss.item())

    return Runner("tinylm", step, opt.step)


def torch_runner(twin, ids, targets) -> Runner:
    import torch

    opt = torch.optim.AdamW(twin.parameters(), lr=1e-4, weight_decay=0.1)
    tids, ttargets = torch.from_numpy(ids), torch.from_numpy(targets)

    def step():
        opt.zero_grad(set_to_none=True)
        _, loss = twin(tids, ttargets)
        loss.backward()
        return float(loss.item())

    return Runner("torch", step, opt.step)


# --------------------------------------------------------------------------- environment


def blas_info() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "numpy BLAS threads: unknown (pip install threadpoolctl to see them)"
    parts = []
    for lib in threadpool_info():
        if lib.get("user_api") == "blas":
            arch = lib.get("architecture")
            parts.append(f"{lib.get('internal_api')} {lib.get('version')}, "
                         f"{lib.get('num_threads')} threads"
                         + (f", kernel {arch}" if arch else ""))
    return "numpy BLAS: " + ("; ".join(parts) or "none found")


def _cpu_busy_seconds():
    """CPU seconds all processes on the machine have used (Linux; None elsewhere)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system = (int(f) for f in fields[:3])
    irq, softirq = int(fields[5]), int(fields[6])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


class LoadMeter:
    """How much of the machine other processes used while we timed (noise indicator)."""

    def __enter__(self):
        self.t0, self.busy0 = time.perf_counter(), _cpu_busy_seconds()
        self.own0 = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        busy1 = _cpu_busy_seconds()
        own = sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) - self.own0
        self.others = None
        if self.busy0 is not None and busy1 is not None and wall > 0:
            self.others = max(0.0, (busy1 - self.busy0 - own) / (wall * os.cpu_count()))

    def describe(self) -> str:
        if self.others is None:
            return "background load: unknown"
        return (f"background load: other processes used {self.others:.0%} of the "
                f"{os.cpu_count()} CPUs during the timed steps")


def current_rss_mib():
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss / 2**20


# --------------------------------------------------------------------------- profiling


class OpTimer:
    """Wraps every Function subclass's forward and backward with a wall-clock timer.

    Times are summed per op within a step; the report gives each op's median over the
    steps, robust to the odd step that another process on the machine slowed down.
    """

    def __init__(self):
        self.steps = []  # per step: {(op name, "forward" | "backward"): seconds}
        self.calls = collections.Counter()
        self._saved = []

    def new_step(self) -> None:
        self.steps.append(collections.defaultdict(float))

    def __enter__(self):
        for cls in _subclasses(Function):
            for kind in ("forward", "backward"):
                if kind in cls.__dict__:
                    orig = cls.__dict__[kind]
                    self._saved.append((cls, kind, orig))
                    setattr(cls, kind, self._wrap(cls.__name__, kind, orig))
        return self

    def __exit__(self, *exc):
        for cls, kind, orig in self._saved:
            setattr(cls, kind, orig)

    def _wrap(self, name, kind, orig):
        key, calls, steps = (name, kind), self.calls, self.steps

        def timed(fn_self, xp, *args):
            t0 = time.perf_counter()
            out = orig(fn_self, xp, *args)
            steps[-1][key] += time.perf_counter() - t0
            if kind == "forward":
                calls[name] += 1
            return out

        return timed

    def report(self, step_ms: list) -> str:
        n = len(self.steps)

        def med(name, kind):
            return statistics.median(s.get((name, kind), 0.0) for s in self.steps) * 1e3

        names = {name for s in self.steps for name, _ in s}
        rows = sorted(((med(m, "forward"), med(m, "backward"), m) for m in names),
                      key=lambda r: -(r[0] + r[1]))
        total = statistics.median(step_ms)
        lines = [f"{'op':<20}{'calls/step':>11}{'fwd ms':>9}{'bwd ms':>9}{'share':>8}"]
        op_total = 0.0
        for f, b, m in rows:
            op_total += f + b
            lines.append(f"{m:<20}{self.calls[m] / n:>11.0f}{f:>9.2f}{b:>9.2f}"
                         f"{(f + b) / total:>8.0%}")
        lines.append(f"{'(sum of the above)':<20}{'':>11}{op_total:>18.2f}"
                     f"{op_total / total:>8.0%}")
        lines.append(f"{'(median step)':<20}{'':>11}{total:>18.2f}")
        return "\n".join(lines)


def _subclasses(cls):
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_subclasses(sub))
    return out


def profile(runner: Runner, steps: int) -> None:
    step_ms = []
    with OpTimer() as timer:
        for _ in range(steps):
            timer.new_step()
            t0 = time.perf_counter()
            runner.step()
            step_ms.append((time.perf_counter() - t0) * 1e3)
    print(f"\n== tinylm time per op: median of {steps} steps (fwd+bwd, no optimizer) ==")
    print(timer.report(step_ms))

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        runner.step()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
    print(f"\n== tinylm cProfile, {steps} steps, top 25 by tottime ==")
    print("\n".join(out.getvalue().splitlines()[:60]))


# --------------------------------------------------------------------------- main


def main(argv=None) -> None:
    args = parse_args(argv)
    backend.seed(0)
    model = TinyGPT(vocab=args.vocab, block_size=args.seq, d=args.d, n_head=args.heads,
                    n_layer=args.layers)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, args.vocab, size=(args.batch, args.seq))
    targets = rng.integers(0, args.vocab, size=(args.batch, args.seq))

    if args.threads:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            sys.exit("--threads needs threadpoolctl (pip install threadpoolctl)")
        threadpool_limits(args.threads)
    runners = []
    if args.only != "torch":
        runners.append(tinylm_runner(model, ids, targets))
    torch_threads = None
    if args.only != "tinylm":
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        torch_threads = torch.get_num_threads()
        runners.append(torch_runner(torch_twin(model), ids, targets))

    print(f"tinylm engine bench: {args.layers}-layer GPT, batch {args.batch}, T={args.seq}, "
          f"d={args.d}, {args.heads} heads, vocab {args.vocab}, float32, CPU")
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs; python {platform.python_version()}, "
          f"numpy {np.__version__}" + (f", torch {sys.modules['torch'].__version__}"
                                       if "torch" in sys.modules else ""))
    print(blas_info() + (f"; torch threads: {torch_threads}" if torch_threads else ""))
    env = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                      "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")
           if k in os.environ}
    print("env: " + (", ".join(f"{k}={v}" for k, v in env.items()) or "no OPENBLAS_*/OMP_* set"))

    for _ in range(args.warmup):
        for r in runners:
            r.run(record=False)
    with LoadMeter() as load:
        for i in range(args.steps):
            for r in (runners if i % 2 == 0 else runners[::-1]):
                r.run(record=True, settle=args.settle)

    print(f"\nmedian of {args.steps} interleaved steps after {args.warmup} warm-up "
          f"(settle {args.settle:g} s):")
    print(f"{'':<28}" + "".join(f"{r.name:>12}" for r in runners)
          + (f"{'ratio':>12}" if len(runners) == 2 else ""))
    for label, attr in (("fwd+bwd ms/step", "step_ms"), ("AdamW step ms", "opt_ms")):
        meds = [statistics.median(getattr(r, attr)) for r in runners]
        row = f"{label:<28}" + "".join(f"{m:>12.2f}" for m in meds)
        if len(meds) == 2:
            row += f"{meds[0] / meds[1]:>11.2f}x"
        print(row)
    print(f"{'final loss':<28}" + "".join(f"{r.loss:>12.4f}" for r in runners))
    print(load.describe())
    rss = current_rss_mib()
    print(f"peak RSS of this process: {peak_rss_mib():.0f} MiB"
          + (f" (now {rss:.0f} MiB)" if rss is not None else "")
          + ("" if args.only else "; both frameworks together, use --only for each alone"))

    if args.profile and args.only != "torch":
        profile(runners[0], args.steps)


if __name__ == "__main__":
    main()

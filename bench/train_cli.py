"""The real ``tinylm train`` command on the nanoGPT character recipe, as whole processes:
CPU ms and wall ms per step, for one or more source revisions, interleaved.

    .venv/bin/python bench/train_cli.py                              # this checkout
    .venv/bin/python bench/train_cli.py --rev before=369b3cc --rev now=.   # A/B

Each run is ``tinylm train --config examples/shakespeare_char.toml --threads N`` (eval
only at the end, on one batch; log every 10 steps) in a fresh process with
OMP_NUM_THREADS=N. Per step, from the process itself: CPU time as (child CPU of a
``--steps`` run - child CPU of a ``--base-steps`` (20) run just before it) / (steps -
base steps), so that startup, the final eval and the slower first steps (lazy
imports, first allocations) cancel (robust on a loaded machine: other processes'
time is not counted), and wall time from the run's own metrics.jsonl (``elapsed_s``
between step 20 and the last step). Revisions and thread counts alternate within
each repeat; medians over ``--repeats``, with the spread (min-max).

``--torch`` adds the peer: bench/nanogpt_torch.py (our reimplementation of nanoGPT's
train.py on the same recipe; nanoGPT itself is not installable offline) as a whole
process with the same OMP_NUM_THREADS, timed the same way (CPU from rusage, wall
from its own ``iter N: ... time Y ms`` lines, iterations 21 to the last), interleaved
with the tinylm runs; the ratio tinylm / torch is printed per thread count (medians of
the per-repeat ratios, so that a load change between repeats cancels).

    .venv/bin/python bench/train_cli.py --torch --threads 1 2 --steps 150 --repeats 5

A revision is ``label=PATH`` (a source tree holding tinylm/) or ``label=GITREV``
(its tinylm/ is extracted with ``git archive`` into a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "shakespeare_char.toml"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rev", action="append", default=None,
                   help="label=PATH or label=GITREV (repeat); default: now=.")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--base-steps", type=int, default=20,
                   help="steps of the baseline run whose CPU time is subtracted (its "
                        "startup and its first, warm-up steps), < --steps")
    p.add_argument("--torch", action="store_true",
                   help="also time bench/nanogpt_torch.py (the torch peer), interleaved")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "tinyshakespeare.txt",
                   help="the corpus (both sides); missing: a generated one")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def source_tree(spec: str, tmp: Path) -> tuple:
    """(label, folder holding tinylm/) for ``label=PATH`` or ``label=GITREV``."""
    label, _, where = spec.partition("=")
    path = (ROOT / where).resolve()
    if (path / "tinylm").is_dir():
        return label, path
    dest = tmp / label
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", where, "tinylm"],
                             check=True, capture_output=True).stdout
    tar_path = tmp / f"{label}.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as tar:
        tar.extractall(dest, filter="data")
    return label, dest


def tinylm_cmd(src: Path, threads: int, steps: int, out: Path, data: Path) -> list:
    code = (f"import sys; sys.path.insert(0, {str(src)!r}); "
            "from tinylm.cli import main; main(sys.argv[1:])")
    return [sys.executable, "-c", code, "train", "--config", str(CONFIG), "--data",
            str(data), "--threads", str(threads), "--max-steps", str(steps),
            "--eval-every", "1000000", "--eval-iters", "1", "--sample-tokens", "1",
            "--log-every", "10", "--no-progress", "-o", str(out), "--overwrite"]


def torch_cmd(threads: int, steps: int, data: Path) -> list:
    """The peer: eval at iteration 0 on one batch per split (as tinylm's one final
    eval batch), every iteration logged."""
    return [sys.executable, str(ROOT / "bench" / "nanogpt_torch.py"), "--data", str(data),
            "--max-iters", str(steps), "--eval-interval", "1000000", "--eval-iters", "1",
            "--log-interval", "1"]


def tinylm_wall(out: Path):
    """Wall seconds per step from metrics.jsonl: step 20 to the last logged step."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    timed = {r["step"]: r["elapsed_s"] for r in rows if "elapsed_s" in r and "step" in r}
    if 20 in timed and max(timed) > 20:
        last = max(timed)
        return (timed[last] - timed[20]) / (last - 20)
    return None


def torch_wall(stdout: str):
    """Wall seconds per step from nanoGPT-style ``iter N: loss X, time Y ms`` lines,
    iterations 21 to the last (the same span as tinylm's)."""
    times = [float(m.group(2)) for m in re.finditer(r"^iter (\d+): .*time ([\d.]+)ms",
                                                     stdout, re.M) if int(m.group(1)) > 20]
    return statistics.fmean(times) / 1e3 if times else None


def run_once(src, threads: int, steps: int, out: Path, data: Path) -> tuple:
    """One whole training process (``src`` None: the torch peer): (child CPU seconds,
    wall seconds per step or None, the child's peak RSS in MiB). CPU time and peak come
    from ``wait4`` on that child alone (its ru_maxrss: the whole process, imports
    included; Linux starts it from this small stdlib-only process's own at exec)."""
    cmd = torch_cmd(threads, steps, data) if src is None else tinylm_cmd(src, threads, steps,
                                                                        out, data)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=err,
                                text=True)
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise subprocess.CalledProcessError(proc.returncode, cmd, stdout, err.read())
    cpu = usage.ru_utime + usage.ru_stime
    wall = torch_wall(stdout) if src is None else tinylm_wall(out)
    return cpu, wall, usage.ru_maxrss / 1024


def corpus(path: Path, tmp: Path) -> Path:
    if path.is_file():
        return path
    sys.path.insert(0, str(ROOT / "bench"))
    from nanogpt_torch import load_corpus  # the peer's generated corpus, for both sides

    made = tmp / "corpus.txt"
    made.write_text(load_corpus(str(path)), encoding="utf-8")
    return made


def measure(args, trees, data: Path, tmp: Path) -> dict:
    """Each repeat, for each thread count and side (alternating which goes first): a
    ``--base-steps`` run and a ``--steps`` run, back to back; the difference of their
    CPU times is the steady-state steps' (startup, eval and the first steps cancel)."""
    results = {}
    for rep in range(args.repeats):
        order = trees if rep % 2 == 0 else trees[::-1]
        for n in args.threads:
            for label, src in order:
                base = run_once(src, n, args.base_steps, tmp / "run", data)[0]
                cpu, wall, peak = run_once(src, n, args.steps, tmp / "run", data)
                row = results.setdefault(f"{label} threads={n}",
                                         {"cpu_ms": [], "wall_ms": [], "peak_mib": []})
                row["cpu_ms"].append(1e3 * (cpu - base) / (args.steps - args.base_steps))
                row["wall_ms"].append(None if wall is None else 1e3 * wall)
                row["peak_mib"].append(peak)
    return results


def spread(v, digits: int = 1) -> str:
    v = [x for x in v if x is not None]
    if not v:
        return "n/a"
    return (f"{statistics.median(v):.{digits}f} (min {min(v):.{digits}f}, "
            f"max {max(v):.{digits}f}, n={len(v)})")


def report(results: dict, labels: list, threads: list, with_torch: bool) -> dict:
    for name, row in results.items():
        print(f"{name:24s}  cpu_ms {spread(row['cpu_ms'])}  wall_ms {spread(row['wall_ms'])}"
              f"  peak_mib {spread(row['peak_mib'], 0)}")
    ratios = {}
    if not with_torch:
        return ratios
    for label in labels:
        if label == "torch":
            continue
        for n in threads:
            ours, peer = results[f"{label} threads={n}"], results[f"torch threads={n}"]
            for key in ("cpu_ms", "wall_ms", "peak_mib"):
                per_rep = [a / b for a, b in zip(ours[key], peer[key])
                           if a is not None and b is not None]
                ratios[f"{label}/torch threads={n} {key}"] = per_rep
                print(f"{label}/torch threads={n} {key}: {spread(per_rep, 3)}")
    return ratios


def main(argv=None) -> None:
    args = parse_args(argv)
    if not 0 <= args.base_steps < args.steps:
        sys.exit("--base-steps must be at least 0 and below --steps")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trees = [source_tree(s, tmp) for s in (args.rev or ["now=."])]
        if args.torch:
            trees.append(("torch", None))
        data = corpus(args.data, tmp)
        results = measure(args, trees, data, tmp)
    ratios = report(results, [t[0] for t in trees], args.threads, args.torch)
    if args.json:
        args.json.write_text(json.dumps({"runs": results, "ratios": ratios,
                                         "steps": args.steps, "data": str(args.data)},
                                        indent=1))


if __name__ == "__main__":
    main()

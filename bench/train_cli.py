"""The real ``tinylm train`` command on the nanoGPT character recipe, as whole processes:
CPU ms and wall ms per step, for one or more source revisions, interleaved.

    .venv/bin/python bench/train_cli.py                              # this checkout
    .venv/bin/python bench/train_cli.py --rev before=369b3cc --rev now=.   # A/B

Each run is ``tinylm train --config examples/shakespeare_char.toml --threads N`` (eval
only at the end, on one batch; log every 10 steps) in a fresh process with
OMP_NUM_THREADS=N. Per step, from the process itself: CPU time as (child CPU of a
``--steps`` run - child CPU of a 0-step run) / steps (robust on a loaded machine:
other processes' time is not counted), and wall time from the run's own
metrics.jsonl (``elapsed_s`` between step 20 and the last step). Revisions and
thread counts alternate within each repeat; medians over ``--repeats``, with the
spread (min-max). nanoGPT's train.py is not in this repository, so the torch side
of the issue-22 comparison is not run here (bench/train_shakespeare.py times the
same model in torch in-process).

A revision is ``label=PATH`` (a source tree holding tinylm/) or ``label=GITREV``
(its tinylm/ is extracted with ``git archive`` into a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


def run_once(src: Path, threads: int, steps: int, out: Path) -> tuple:
    """One ``tinylm train`` process: (child CPU seconds, wall seconds per step or None)."""
    code = (f"import sys; sys.path.insert(0, {str(src)!r}); "
            "from tinylm.cli import main; main(sys.argv[1:])")
    cmd = [sys.executable, "-c", code, "train", "--config", str(CONFIG), "--threads",
           str(threads), "--max-steps", str(steps), "--eval-every", "1000000",
           "--eval-iters", "1", "--sample-tokens", "1", "--log-every", "10",
           "--no-progress", "-o", str(out), "--overwrite"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    wall = None
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    timed = {r["step"]: r["elapsed_s"] for r in rows if "elapsed_s" in r and "step" in r}
    if 20 in timed and max(timed) > 20:
        last = max(timed)
        wall = (timed[last] - timed[20]) / (last - 20)
    return cpu, wall


def main(argv=None) -> None:
    args = parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trees = [source_tree(s, tmp) for s in (args.rev or ["now=."])]
        base = {}
        for label, src in trees:  # startup + final eval: subtracted from every run
            for n in args.threads:
                base[label, n] = run_once(src, n, 0, tmp / "run")[0]
        for rep in range(args.repeats):
            order = trees if rep % 2 == 0 else trees[::-1]
            for n in args.threads:
                for label, src in order:
                    cpu, wall = run_once(src, n, args.steps, tmp / "run")
                    row = results.setdefault(f"{label} threads={n}", {"cpu_ms": [], "wall_ms": []})
                    row["cpu_ms"].append(1e3 * (cpu - base[label, n]) / args.steps)
                    if wall is not None:
                        row["wall_ms"].append(1e3 * wall)
    for name, row in results.items():
        parts = [f"{name:24s}"]
        for key in ("cpu_ms", "wall_ms"):
            v = row[key]
            if v:
                parts.append(f"{key} median {statistics.median(v):6.1f} "
                             f"(min {min(v):.1f}, max {max(v):.1f}, n={len(v)})")
        print("  ".join(parts))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

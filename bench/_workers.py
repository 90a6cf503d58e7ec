"""Shared by the bench scripts that run each configuration in a fresh process (so that
one's imports, threads and peak memory do not reach the next): the worker's command
line and its one ``RESULT {json}`` line, the checks of ``--quick`` / ``--configs``, and
the machine facts a results file starts with."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from _common import cpu_model

# one thread in every worker: the ratio compares the engines, not their thread pools
THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
PREFIX = "RESULT "


def finish_args(parser, args, configs, quick: dict, default_out: Path):
    """``args`` after parsing: ``--quick`` sets ``quick``'s values (and no --out
    default), else --out defaults to ``default_out``; ``args.configs`` becomes a list,
    each one of ``configs``."""
    if args.quick:
        for k, v in quick.items():
            setattr(args, k, v)
    elif args.out is None:
        args.out = str(default_out)
    args.configs = [c for c in args.configs.split(",") if c]
    unknown = set(args.configs) - set(configs)
    if unknown:
        parser.error(f"unknown configuration(s) {sorted(unknown)}; choose of "
                     f"{', '.join(configs)}")
    return args


def report(result: dict) -> None:
    """The worker's side: its result, as the one line ``run_worker`` reads."""
    print(PREFIX + json.dumps(result))


def run_worker(script, config: str, work: Path, args, keys) -> dict:
    """Run ``script --worker config --work-dir work`` with the ``keys`` of ``args`` as
    options (one thread); its reported dict, or {"error": its last stderr line}."""
    cmd = [sys.executable, str(script), "--worker", config, "--work-dir", str(work)]
    for k in keys:
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    done = subprocess.run(cmd, env={**os.environ, **THREAD_ENV}, capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(PREFIX)]
    if done.returncode or not lines:
        tail = [ln for ln in done.stderr.strip().splitlines() if ln.strip()] or ["no output"]
        return {"error": tail[-1][:300]}
    return json.loads(lines[-1][len(PREFIX):])


def machine(load_before) -> dict:
    """The machine facts of a results file (``load_before``: os.getloadavg() at the
    start), and the command line that made it."""
    return {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                        "python": platform.python_version(), "numpy": np.__version__,
                        "date": time.strftime("%Y-%m-%d %H:%M"), "load_before": load_before,
                        "load_after": os.getloadavg()},
            "command": " ".join([Path(sys.executable).name, *sys.argv])}

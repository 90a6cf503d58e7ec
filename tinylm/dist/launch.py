"""``tinylm train --nproc N``: start N ranks of this same command under ``mpiexec``.

    tinylm train --nproc 2 --config run.toml
      = mpiexec -n 2 PYTHON -c "from tinylm.cli import main; main()" train --config run.toml

``mpiexec`` is looked for next to the running Python (where the ``mpich`` wheel of
the dist extra puts it), then on PATH. Each rank gets ``cores / N`` BLAS threads
(``OMP_NUM_THREADS`` and friends) unless they are set already. While the ranks run,
this process reads mpiexec's output and watches the pids of the ranks on this host
(``TINYLM_DIST_PIDS``): when the job fails because a rank vanished without reporting
an error (SIGKILL, the OOM killer, a segfault), it names that rank, which MPICH's
own message does not (it gives a pid).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

from tinylm.dist.comm import DistError
from tinylm.dist.world import PIDS_VAR

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
ENTRY = "from tinylm.cli import main; main()"


def find_mpiexec() -> str:
    """The path of ``mpiexec`` (the dist extra's, else PATH's), or a DistError."""
    if importlib.util.find_spec("mpi4py") is None:
        raise DistError("--nproc needs the dist extra (mpi4py and an MPI runtime): "
                        "pip install -e '.[dist]'")
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.access(here, os.X_OK):
        return here
    found = shutil.which("mpiexec")
    if found is None:
        raise DistError("--nproc needs mpiexec, which is neither next to this Python nor on "
                        "PATH: pip install -e '.[dist]' (the mpich wheel brings it)")
    return found


def child_args(argv: list) -> list:
    """``argv`` (tinylm's arguments) without ``--nproc N`` / ``--nproc=N``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def rank_env(nproc: int, pids: str, environ=None) -> dict:
    env = dict(os.environ if environ is None else environ)
    threads = str(max(1, (os.cpu_count() or 1) // nproc))
    for name in THREAD_VARS:
        env.setdefault(name, threads)
    env[PIDS_VAR] = pids
    return env


def launch(nproc: int, argv: list | None = None) -> int:
    """Run ``tinylm <argv>`` (default: this process's arguments, --nproc left out) on
    ``nproc`` ranks; returns the exit code to leave with."""
    command = [find_mpiexec(), "-n", str(nproc), sys.executable, "-c", ENTRY,
               *child_args(sys.argv[1:] if argv is None else argv)]
    with tempfile.TemporaryDirectory(prefix="tinylm-ranks-") as own:
        pids = os.environ.get(PIDS_VAR) or own
        process = subprocess.Popen(command, env=rank_env(nproc, pids), stdout=subprocess.PIPE)
        named = []  # what mpiexec says about a rank that ended badly
        copier = threading.Thread(target=_copy_output, args=(process.stdout, named),
                                  daemon=True)
        copier.start()
        try:
            first_gone = _watch(process, pids, nproc)
        except KeyboardInterrupt:
            process.wait()
            return 130
        copier.join(timeout=5)
        code = process.returncode
        if code in (0, 130, 143):
            return code
        culprit = _culprit(pids, nproc, named, first_gone)
        reported = culprit is not None and os.path.exists(
            os.path.join(pids, f"rank-{culprit[0]}.error"))
        if culprit is not None and not reported:
            rank, pid = culprit
            print(f"Error: rank {rank} of {nproc} (pid {pid}) ended without a message (killed, "
                  f"out of memory or crashed), so mpiexec stopped the others; run the same "
                  f"command again to resume from the last checkpoint", file=sys.stderr, flush=True)
        return 2


def _copy_output(stream, named: list) -> None:
    """Copy mpiexec's stdout to ours, noting the pids / ranks it reports as ended
    badly (MPICH: "PID 1234 RUNNING AT host"; Open MPI: "process rank 1 with PID")."""
    for line in iter(stream.readline, b""):
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
        text = line.decode(errors="replace")
        for pattern, kind in ((r"PID (\d+) RUNNING AT", "pid"), (r"process rank (\d+) with PID",
                                                                  "rank")):
            found = re.search(pattern, text)
            if found:
                named.append((kind, int(found.group(1))))


def _culprit(folder: str, nproc: int, named: list, first_gone):
    """(rank, pid) of the rank that ended first: as mpiexec named it, else as seen."""
    pids = {r: _read_pid(os.path.join(folder, f"rank-{r}")) for r in range(nproc)}
    for kind, value in named:
        for rank, pid in pids.items():
            if (kind == "pid" and pid == value) or (kind == "rank" and rank == value):
                return rank, pid
    return first_gone


def _watch(process, folder: str, nproc: int):
    """Wait for ``process``; (rank, pid) of the first rank seen to vanish, or None."""
    known, first = {}, None
    while process.poll() is None:
        for rank in range(nproc):
            if rank not in known:
                pid = _read_pid(os.path.join(folder, f"rank-{rank}"))
                if pid is not None:
                    known[rank] = pid
        if first is None:
            gone = [r for r, pid in sorted(known.items()) if not _alive(pid)]
            if len(gone) == 1:  # (several at once: mpiexec's cleanup, not a first)
                first = (gone[0], known[gone[0]])
        time.sleep(0.05)
    return first


def _read_pid(path: str):
    """The pid in a rank's file, if that rank runs on this host (else None)."""
    try:
        with open(path, encoding="utf-8") as f:
            pid, host = f.read().split()[:2]
        return int(pid) if host == socket.gethostname() else None
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True

"""``tinylm train --nproc N``: start N ranks of this same command under ``mpiexec``.

    tinylm train --nproc 2 --config run.toml
      = mpiexec -n 2 PYTHON -c "from tinylm.cli import main; main()" train --config run.toml

``mpiexec`` is looked for next to the running Python (where the ``mpich`` wheel of
the dist extra puts it), then on PATH. Each rank gets ``cores / N`` BLAS threads
(``OMP_NUM_THREADS`` and friends) unless they are set already. While the ranks run,
this process reads mpiexec's output and watches the pids of the ranks on this host
(``TINYLM_DIST_PIDS``; pidfds where there are): when the job fails because a rank
vanished without reporting an error (SIGKILL, the OOM killer, a segfault), it names
that rank, which MPICH's own message does not (it gives a pid, at times another
rank's), and how it ended when mpiexec says: "rank 1 of 2 (pid P) was killed by
SIGKILL", "rank 1 of 2 (pid P) exited with status 1 without an error message". Files of
an earlier job in that folder are removed first.

How it ended comes from hydra's (MPICH's mpiexec) ``-print-all-exitcodes``, which this
process asks for: after the job, on mpiexec's stdout, a line
``[mpiexec@HOST] Exit codes: [HOST] S,S`` (one ``[HOST] S,S`` per proxy, the later
ones on lines of their own), each S a rank's raw wait status as ``waitpid`` gives it
(hydra 4/5; observed with the mpich wheel's hydra 5.0.2): ``exit(1)`` is 256,
``exit(3)`` 768, SIGKILL 9, SIGSEGV 11 (139 with a core dump), 0 a clean end. Those
lines, and only those, are not shown. Elsewhere (no statuses, ranks on other hosts)
from the signal of mpiexec's "EXIT STRING: Killed (signal 9)".

A rank that fails reports with ``report_and_abort``: one ``Error: rank R ...`` line on
its stderr, and the same line in ``TINYLM_DIST_PIDS/rank-R.error``. That line can be
lost on the way (mpiexec torn down before it forwarded it), so after a failed job
the text of each ``rank-R.error`` is printed here, but only when it was not already
seen: mpiexec's stderr is piped through this process (copied on at once, bytes as they
come, so a progress bar still moves) and its ``Error:`` lines are noted. Knowing that
costs one thread and a set of a few lines, so each rank's message appears once,
whether or not it reached stderr by itself.
"""

from __future__ import annotations

import importlib.util
import os
import re
import select
import shutil
import signal
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
    mpiexec = find_mpiexec()
    # MPICH's hydra: its last line gives each rank's wait status
    # ("[mpiexec@host] Exit codes: [host] 0,256"), read (and not shown) by _copy_output
    statuses = ["-print-all-exitcodes"] if _is_hydra(mpiexec) else []
    command = [mpiexec, *statuses, "-n", str(nproc), sys.executable, "-c", ENTRY,
               *child_args(sys.argv[1:] if argv is None else argv)]
    with tempfile.TemporaryDirectory(prefix="tinylm-ranks-") as own:
        pids = os.environ.get(PIDS_VAR) or own
        _clear(pids, nproc)
        process = subprocess.Popen(command, env=rank_env(nproc, pids), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
        named = []  # what mpiexec says about a rank that ended badly
        said = set()  # the `Error: ...` lines that went through its stderr
        copiers = [threading.Thread(target=_copy_output,
                                    args=(process.stdout, named, bool(statuses)), daemon=True),
                   threading.Thread(target=_copy_errors, args=(process.stderr, said),
                                    daemon=True)]
        for copier in copiers:
            copier.start()
        try:
            first_gone = _watch(process, pids, nproc)
        except KeyboardInterrupt:
            process.wait()
            return 130
        for copier in copiers:
            copier.join(timeout=5)
        code = process.returncode
        if code in (0, 130, 143):
            return code
        reports = _reports(pids, nproc)
        for rank in sorted(reports):  # the messages that did not reach stderr by themselves
            if reports[rank] not in said:
                print(reports[rank], file=sys.stderr, flush=True)
        if reports:  # (they say why; a rank stopped by mpiexec after them needs no line)
            return 2
        culprit, how = _culprit(pids, nproc, named, first_gone)
        if culprit is not None:
            print(_vanished(culprit[0], nproc, culprit[1], how), file=sys.stderr, flush=True)
        else:
            signum = next((value for kind, value in named if kind == "signal"), None)
            if signum is not None:  # (a rank of another host, mpiexec naming it by pid)
                print(_vanished(None, nproc, None, ("signal", signum)), file=sys.stderr,
                      flush=True)
        return 2


def _is_hydra(mpiexec: str) -> bool:
    """Whether ``mpiexec`` is MPICH's hydra (``--version``: "HYDRA build details")."""
    try:
        done = subprocess.run([mpiexec, "--version"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return b"HYDRA" in done.stdout


def _clear(folder: str, nproc: int) -> None:
    """Remove what an earlier job left in ``folder`` (its pids, its error reports), which
    would be taken for this job's."""
    for rank in range(nproc):
        for name in (f"rank-{rank}", f"rank-{rank}.error"):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass


def _reports(folder: str, nproc: int) -> dict:
    """{rank: its one-line ``Error: ...`` report} of the ranks that wrote ``rank-R.error``."""
    found = {}
    for rank in range(nproc):
        try:
            with open(os.path.join(folder, f"rank-{rank}.error"), encoding="utf-8",
                      errors="replace") as f:
                text = " ".join(f.read().split())
        except OSError:
            continue
        if text:
            found[rank] = text
    return found


_CRASHES = {"SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE", "SIGABRT"}


def _ending(status: int):
    """How a rank ended, from its raw wait status (hydra's "Exit codes"): ("signal", N),
    ("exit", N), or None for a clean end (0)."""
    if status & 0x7F:
        return "signal", status & 0x7F
    if status >> 8:
        return "exit", (status >> 8) & 0xFF
    return None


def _vanished(rank, nproc: int, pid, how) -> str:
    """The line for a rank that ended without a report (rank / pid: None when unknown;
    ``how``: ("signal", N), ("exit", N) or None when unknown)."""
    who = "a rank" if rank is None else f"rank {rank}"
    who += f" of {nproc}" + ("" if pid is None else f" (pid {pid})")
    if how is not None and how[0] == "exit":
        return (f"Error: {who} exited with status {how[1]} without an error message (its "
                f"output above may say why); run the same command again to resume from the "
                f"last checkpoint")
    if how is None:
        how = "ended without a message (killed, out of memory or crashed)"
    else:
        signum = how[1]
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        how = f"was killed by {name}"
        if name == "SIGKILL":
            how += (" (by hand or by the out-of-memory killer: dmesg says which; if out of "
                    "memory, lower --batch-size or --nproc)")
        elif name in _CRASHES:
            how += " (a crash in native code)"
    return (f"Error: {who} {how}, so mpiexec stopped the others; run the same command again "
            f"to resume from the last checkpoint")


_NAMING = ((r"PID (\d+) RUNNING AT", "pid"), (r"process rank (\d+) with PID", "rank"),
           (r"\(signal (\d+)\)|exited on signal (\d+)", "signal"))


# hydra's -print-all-exitcodes (its ui/mpich/mpiexec.c): HYDU_dump's "[mpiexec@HOST] "
# and "Exit codes: ", then per proxy "[HOST] S,S,...\n" (the first on that line); a
# rank's unended last line may come before it
_CODES = re.compile(rb"(.*?)\[mpiexec@[^\]\s]+\] Exit codes: (?:\[([^\]\s]+)\] "
                    rb"(-?\d+(?:,-?\d+)*))?\r?\n?", re.S)
_PROXY = re.compile(rb"\[([^\]\s]+)\] (-?\d+(?:,-?\d+)*)\r?\n?")


def _copy_output(stream, named: list, codes: bool = False) -> None:
    """Copy mpiexec's stdout to ours, noting the pids / ranks it reports as ended
    badly and the signal that ended them (MPICH: "PID 1234 RUNNING AT host", "EXIT
    STRING: Killed (signal 9)"; Open MPI: "process rank 1 with PID 1234 on node n
    exited on signal 9"). With ``codes`` (hydra asked for -print-all-exitcodes), its
    "Exit codes" lines (_CODES, then _PROXY lines) are noted as ("codes", [(host,
    [status, ...]), ...]) and not shown; any other line is, "Exit codes" in it or not."""
    hosts = None  # while in hydra's "Exit codes" lines: the ones read
    for line in iter(stream.readline, b""):
        if hosts is not None:
            more = _PROXY.fullmatch(line)
            if more:
                hosts.append((more.group(1).decode(errors="replace"),
                              [int(c) for c in more.group(2).split(b",")]))
                continue
            hosts = None
        found = _CODES.fullmatch(line) if codes else None
        if found:
            hosts = [] if found.group(2) is None else [
                (found.group(2).decode(errors="replace"),
                 [int(c) for c in found.group(3).split(b",")])]
            named.append(("codes", hosts))
            line = found.group(1)  # (a rank's output before it, if any)
            if not line:
                continue
        text = line.decode(errors="replace")
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
        for pattern, kind in _NAMING:
            found = re.search(pattern, text)
            if found:
                named.append((kind, int(next(g for g in found.groups() if g))))


def _copy_errors(stream, said: set, limit: int = 1 << 16) -> None:
    """Copy mpiexec's stderr to ours as it comes (a progress bar's "\\r" included),
    adding to ``said`` each line's ``Error: ...`` (from there on, spaces collapsed as in
    ``_reports``). A line is ended by "\\n" or "\\r"; of a longer one than ``limit``
    bytes only the end is looked at."""
    fd, out, pending = stream.fileno(), getattr(sys.stderr, "buffer", None), b""
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except OSError:
            chunk = b""
        if chunk:
            try:
                if out is None:
                    sys.stderr.write(chunk.decode(errors="replace"))
                else:
                    out.write(chunk)
                sys.stderr.flush()
            except (OSError, ValueError):
                pass  # (our stderr is gone: the lines are still noted)
        *lines, pending = re.split(rb"[\r\n]", pending + chunk)
        if not chunk:
            lines.append(pending)
        for line in lines:
            at = line.find(b"Error: ")
            if at >= 0:
                said.add(" ".join(line[at:].decode(errors="replace").split()))
        if not chunk:
            return
        pending = pending[-limit:]


def _culprit(folder: str, nproc: int, named: list, first_gone):
    """(rank, pid) of the rank that ended first, and how it ended: ("signal", N),
    ("exit", N) or None (unknown).

    With every rank's wait status (hydra's "Exit codes", all on this host): the rank
    that did not end well (the ones hydra stops after it end with 0 or SIGKILL, its
    cleanup: "9,11" for rank 1's segfault, "9,9" for its SIGKILL): the one seen to end
    first among them, else the first that did not end by SIGKILL, else (all SIGKILL, none
    seen first) all of them as "0 or 1"; and how it ended. Else, when every rank runs on this host, the one seen to end first (hydra's
    "PID ... RUNNING AT" at times names one it killed in its cleanup, and on two busy
    cores that one now and then ends before the first has); else (or when none was
    seen first) the one mpiexec names, with the signal it gives for that pid / rank."""
    pids = {r: _read_pid(os.path.join(folder, f"rank-{r}")) for r in range(nproc)}
    said, last = {}, None  # {rank: signal}, as mpiexec's lines give them
    order = []  # the ranks mpiexec names, in its order
    statuses = _statuses(named, nproc)
    if statuses is not None:
        ended = [_ending(status) for status in statuses]
        bad = [r for r, how in enumerate(ended) if how is not None]
        if not bad:
            return None, None
        if first_gone is not None and first_gone[0] in bad:
            rank = first_gone[0]
        elif len(bad) > 1 and all(ended[r] == ("signal", signal.SIGKILL) for r in bad):
            # hydra's cleanup kills with SIGKILL too: when the watcher saw them all end
            # in one wake-up (a loaded machine), nothing tells which went first
            return (" or ".join(map(str, bad)), None), ("signal", signal.SIGKILL)
        else:
            rank = next((r for r in bad if ended[r] != ("signal", signal.SIGKILL)), bad[0])
        return (rank, pids[rank]), ended[rank]
    for kind, value in named:
        if kind == "codes":
            continue
        if kind == "signal":
            if last is not None:
                said.setdefault(last, value)
            continue
        last = next((r for r, pid in pids.items()
                     if (kind == "pid" and pid == value) or (kind == "rank" and r == value)),
                    None)
        if last is not None:
            order.append(last)
    local = all(pid is not None for pid in pids.values())
    if first_gone is not None and (local or not order):
        rank, pid = first_gone
    elif order:
        rank, pid = order[0], pids[order[0]]
    else:
        return None, None
    signum = said.get(rank)
    return (rank, pid), None if signum is None else ("signal", signum)


def _statuses(named: list, nproc: int):
    """Each rank's wait status from hydra's "Exit codes" (one host, ``nproc`` of them),
    else None."""
    hosts = next((value for kind, value in named if kind == "codes"), None)
    if hosts is None or len(hosts) != 1 or len(hosts[0][1]) != nproc \
            or hosts[0][0] != socket.gethostname():
        return None
    return hosts[0][1]


def _watch(process, folder: str, nproc: int):
    """Wait for ``process``; (rank, pid) of the first rank seen to end, or None.

    A rank of this host is watched by a pidfd (Linux), which wakes this process the
    moment that rank has ended: the one that ended first is told from the others that
    mpiexec kills right after it (within milliseconds) as long as they end in separate
    wake-ups. Without pidfds it is polled every 50 ms. Once a rank has ended (or
    several at once: no first) it is decided."""
    known, fds, first, decided = {}, {}, None, False
    try:
        while process.poll() is None:
            for rank in range(nproc):
                if rank not in known:
                    pid = _read_pid(os.path.join(folder, f"rank-{rank}"))
                    if pid is not None:
                        known[rank] = pid
                        fd = _pidfd(pid)
                        if fd is not None:
                            fds[fd] = rank
            if decided or not known:
                time.sleep(0.05)
                continue
            if fds:  # (poll, not select: any fd number)
                waiter = select.poll()
                for fd in fds:
                    waiter.register(fd, select.POLLIN)
                ready = [fd for fd, _ in waiter.poll(50)]
            else:
                ready = []
                time.sleep(0.05)
            watched = set(fds.values())
            gone = sorted({fds[fd] for fd in ready} | {r for r, pid in known.items()
                                                       if r not in watched and not _alive(pid)})
            if gone:
                decided = True
                if len(gone) == 1:  # (several at once: mpiexec's cleanup, not a first)
                    first = (gone[0], known[gone[0]])
    finally:
        for fd in fds:
            os.close(fd)
    return first


def _pidfd(pid: int):
    """A pidfd of ``pid`` (readable once it has ended), None where there is none; a
    pid already gone gets an fd that is readable at once (a pipe's closed end)."""
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    try:
        return opener(pid)
    except ProcessLookupError:
        read, write = os.pipe()
        os.close(write)
        return read
    except OSError:
        return None


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

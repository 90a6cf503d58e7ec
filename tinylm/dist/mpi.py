"""The host engine over MPI (mpi4py): non-blocking collectives polled to a deadline.

NumPy arrays are handed to mpi4py as buffers (``comm.Iallreduce(x, out)``): MPI
reads and writes their memory, nothing is copied or pickled. Each call is started
non-blocking and ``Request.Test()`` is polled (which also drives MPI's progress)
until it completes or its deadline passes: spinning for the first ~200 polls (a
small all-reduce completes in tens of microseconds), then sleeping a little longer
each time, up to 1 ms, so a rank waiting for a slower one leaves it the CPU.

While it waits, a rank answers "where are you?" pings from the others on a
duplicate of the communicator (its own tags, never mixed with the collectives'
messages). When the deadline passes it pings every other rank and waits up to
``PING_GRACE_S`` for the answers: the ranks that do not answer are dead, stopped
(SIGSTOP) or busy outside any collective (hung), and the ``CommTimeout`` names
them; ranks that answer say which collective they wait in.

Large messages (``RENDEZVOUS_BYTES`` and up: the gradient buckets) first meet in a
barrier, waited for as above, and only then start the collective, polled without
sleeping: MPI moves data only while a rank calls into it (no progress thread), so a
rank that arrived first and dozes between polls would slow every chunk of the
transfer, while the barrier's wait for a late rank costs nothing but time.
``waited_s`` and ``moved_s`` add up the seconds spent in those barriers and in the
collectives themselves (the split of "communication" into waiting for another rank
and moving data that ``bench/scale.py`` reports).
"""

from __future__ import annotations

import contextlib
import os
import stat
import struct
import sys
import time

import numpy as np

from tinylm.dist.comm import CommTimeout, DistError

PING, PONG = 0x7A1, 0x7A2  # tags on the control communicator
PING_GRACE_S = 3.0
SPIN_POLLS = 200
NAME_BYTES = 32  # a pong: int64 sequence number + the collective's name
RENDEZVOUS_BYTES = 1 << 20  # from here on: barrier first, then the collective spun
DRAIN_S = 2.0  # at most this long for mpiexec to take a rank's last output before MPI_Abort


def import_mpi():
    """mpi4py's MPI module, or a DistError saying how to install it."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise DistError("this run has several ranks but mpi4py is not installed; install "
                        "the dist extra: pip install -e '.[dist]' (mpi4py + the mpich wheel)") \
            from None
    return MPI


class MpiTransport:
    """Collectives of an ``MPI.Comm`` on NumPy arrays, each with a deadline.

    ``world_ranks``: this group's ranks' places in MPI.COMM_WORLD (for messages);
    None: asked for here (a collective: every rank of ``comm`` must construct it)."""

    def __init__(self, comm, world_ranks: list | None = None):
        self.MPI = import_mpi()
        self.comm, self.ctl = comm, comm.Dup()
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.seq, self.current = 0, "setup"
        self._pending = []  # control sends not known complete
        self.waited_s = self.moved_s = 0.0  # in rendezvous barriers / in collectives
        if world_ranks is None:
            me = np.array([self.MPI.COMM_WORLD.Get_rank()], np.int64)
            every = np.empty(self.size, np.int64)
            self.comm.Allgather(me, every)
            world_ranks = [int(r) for r in every]
        self.world_ranks = world_ranks

    # ------------------------------------------------------------------ the collectives

    def allreduce(self, send, recv, op: str, what: str, timeout: float) -> None:
        mpi_op = {"sum": self.MPI.SUM, "max": self.MPI.MAX, "min": self.MPI.MIN}[op]
        if send is recv:
            self._run(lambda: self.comm.Iallreduce(self.MPI.IN_PLACE, recv, mpi_op), what,
                      timeout, recv.nbytes)
        else:
            self._run(lambda: self.comm.Iallreduce(send, recv, mpi_op), what, timeout,
                      recv.nbytes)

    def reduce_scatter(self, send, recv, what: str, timeout: float) -> None:
        self._run(lambda: self.comm.Ireduce_scatter_block(send, recv, self.MPI.SUM), what,
                  timeout, send.nbytes)

    def allgather(self, send, recv, what: str, timeout: float) -> None:
        self._run(lambda: self.comm.Iallgather(send, recv), what, timeout, recv.nbytes)

    def allgather_in_place(self, buf, what: str, timeout: float) -> None:
        self._run(lambda: self.comm.Iallgather(self.MPI.IN_PLACE, buf), what, timeout,
                  buf.nbytes)

    def alltoall(self, send, recv, what: str, timeout: float) -> None:
        self._run(lambda: self.comm.Ialltoall(send, recv), what, timeout, send.nbytes)

    def bcast(self, buf, root: int, what: str, timeout: float) -> None:
        self._run(lambda: self.comm.Ibcast(buf, root), what, timeout)

    def barrier(self, what: str, timeout: float) -> None:
        self._run(self.comm.Ibarrier, what, timeout)

    def split(self, color: int, key: int) -> "MpiTransport":
        sub = self.comm.Split(color, key)
        members = np.empty(self.size, np.int64)
        self.comm.Allgather(np.array([color], np.int64), members)
        keys = np.empty(self.size, np.int64)
        self.comm.Allgather(np.array([key], np.int64), keys)
        order = sorted((int(keys[r]), r) for r in range(self.size) if members[r] == color)
        mine = [self.world_ranks[r] for _, r in order]
        return MpiTransport(sub, world_ranks=mine)

    def abort(self, code: int) -> None:
        """MPI_Abort (mpiexec stops every rank), then exit: MPICH's may return. What this
        rank wrote last (its error message) is first left to reach mpiexec: see
        ``drain_output``."""
        drain_output()
        self.MPI.COMM_WORLD.Abort(code)
        os._exit(code)

    # ------------------------------------------------------------------ waiting

    def _run(self, start, what: str, timeout: float, nbytes: int = 0) -> None:
        """Start a non-blocking call (``start()`` returns its Request) and wait for it;
        ``nbytes`` >= RENDEZVOUS_BYTES: after a barrier, without sleeping."""
        self.seq += 1
        self.current = what
        try:
            large = nbytes >= RENDEZVOUS_BYTES and self.size > 1
            t0 = time.perf_counter()
            if large:
                self.wait(self.comm.Ibarrier(), what, timeout)
            t1 = time.perf_counter()
            self.wait(start(), what, timeout, spin=large)
            self.waited_s += t1 - t0
            self.moved_s += time.perf_counter() - t1
        except self.MPI.Exception as e:
            raise DistError(f"rank {self.name(self.rank)}: {what} failed in MPI: "
                            f"{e.Get_error_string().strip()}; another rank probably died, "
                            f"see its message") from None
        finally:
            self.current = "idle"

    def wait(self, request, what: str, timeout: float, spin: bool = False) -> None:
        """Poll ``request`` until it completes (``spin``: never sleeping between polls);
        CommTimeout after ``timeout`` seconds."""
        start = time.monotonic()
        deadline, next_ctl, polls = start + timeout, start + 0.05, 0
        while not request.Test():
            polls += 1
            if polls > SPIN_POLLS and not spin:
                time.sleep(min(1e-3, 2e-5 * (polls - SPIN_POLLS)))
            now = time.monotonic()
            if now >= next_ctl:
                self._answer_pings()
                next_ctl = now + 0.05
            if now >= deadline:
                raise self._timed_out(what, timeout)

    def name(self, rank: int) -> str:
        """A rank of this group as messages name it: its world rank."""
        return str(self.world_ranks[rank])

    def _answer_pings(self) -> None:
        status = self.MPI.Status()
        while self.ctl.Iprobe(self.MPI.ANY_SOURCE, PING, status):
            source = status.Get_source()
            self.ctl.Recv(np.empty(1, np.int64), source, PING)
            answer = np.zeros(8 + NAME_BYTES, np.uint8)
            answer[:8] = np.frombuffer(np.int64(self.seq).tobytes(), np.uint8)
            name = self.current.encode()[:NAME_BYTES]
            answer[8:8 + len(name)] = np.frombuffer(name, np.uint8)
            self._pending.append(self.ctl.Isend(answer, source, PONG))

    def _timed_out(self, what: str, timeout: float) -> CommTimeout:
        """Ask every other rank where it is; the error names those that are silent."""
        others = [r for r in range(self.size) if r != self.rank]
        self._pending += [self.ctl.Isend(np.array([self.seq], np.int64), r, PING)
                          for r in others]
        answers, status = {}, self.MPI.Status()
        end = time.monotonic() + PING_GRACE_S
        while len(answers) < len(others) and time.monotonic() < end:
            self._answer_pings()
            while self.ctl.Iprobe(self.MPI.ANY_SOURCE, PONG, status):
                source, buf = status.Get_source(), np.empty(8 + NAME_BYTES, np.uint8)
                self.ctl.Recv(buf, source, PONG)
                seq = int(np.frombuffer(buf[:8].tobytes(), np.int64)[0])
                answers[source] = (seq, buf[8:].tobytes().rstrip(b"\0").decode(errors="replace"))
            time.sleep(1e-3)
        silent = [self.name(r) for r in others if r not in answers]
        me = f"rank {self.name(self.rank)}: {what} (collective #{self.seq}) did not " \
             f"complete within {timeout:g} s"
        if silent:
            waiting = ", ".join(f"rank {self.name(r)} in {w} #{s}"
                                for r, (s, w) in sorted(answers.items()))
            return CommTimeout(
                f"{me}: rank {', '.join(silent)} did not answer (dead, stopped or hung)"
                f"{'; waiting: ' + waiting if waiting else ''}; the run stops: fix or free "
                f"that rank and run the same command again to resume from the last checkpoint")
        where = ", ".join(f"rank {self.name(r)} in {w} #{s}" for r, (s, w) in
                          sorted(answers.items()))
        return CommTimeout(f"{me}, yet every rank answered ({where}): the ranks wait in "
                           f"different collectives (a bug: report it), or the collective is "
                           f"slower than the timeout: raise TINYLM_DIST_TIMEOUT")


def drain_output(timeout: float = DRAIN_S) -> None:
    """Flush stdout and stderr and wait (up to ``timeout`` s) until whoever reads them
    (mpiexec's proxy, for a rank) has taken every byte. MPI_Abort makes mpiexec kill
    the job at once, and under load the proxy may not yet have read the aborting
    rank's last lines (its error message), which were then lost (MPICH's hydra: 9 of 120
    runs of a stopped-rank timeout on two loaded cores, none with this wait). The proxy
    forwards output and the abort over one connection, in order, so what it has read
    arrives first.
    A pipe or socket only (the bytes still unread: FIONREAD / TIOCOUTQ); a file or a
    terminal needs no wait, nor does a system without those (not POSIX)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        import fcntl
        import termios
    except ImportError:
        return
    deadline = time.monotonic() + timeout
    for fd in (1, 2):
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            continue
        request = (termios.FIONREAD if stat.S_ISFIFO(mode) else
                   termios.TIOCOUTQ if stat.S_ISSOCK(mode) else None)
        while request is not None and time.monotonic() < deadline:
            try:
                unread = struct.unpack("i", fcntl.ioctl(fd, request, b"\0" * 4))[0]
            except OSError:
                break
            if unread <= 0:
                break
            time.sleep(0.002)

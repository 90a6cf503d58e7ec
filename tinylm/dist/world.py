"""This process's place in the job: how many ranks it was launched with, and the
world ``Comm`` over all of them.

    comm = world()          # MPI.COMM_WORLD under `mpiexec -n N` (N > 1), else one rank

The launcher says how many ranks there are in the environment (MPICH's and Intel
MPI's ``PMI_SIZE``/``PMI_RANK``, Open MPI's ``OMPI_COMM_WORLD_SIZE``, PMIx's and
MVAPICH's), so a process started without a launcher, or as the one rank of
``mpiexec -n 1``, never imports mpi4py: MPI is needed only when there is someone
to talk to. With more ranks and no mpi4py the error says to install the dist extra.

``TINYLM_DIST_PIDS`` (a folder): each rank writes ``rank-R`` there holding its pid
and host, which ``tinylm train --nproc N`` reads to name a rank that died.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys

from tinylm.atomic import write_atomic
from tinylm.dist.comm import Comm, DistError, ReportedElsewhere
from tinylm.dist.local import LocalTransport
from tinylm.errors import TinyLMError

SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")
RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
PIDS_VAR = "TINYLM_DIST_PIDS"

_world = None


def launched_size(environ=None) -> int:
    """How many ranks the launcher started (1 without a launcher)."""
    environ = os.environ if environ is None else environ
    for name in SIZE_VARS:
        text = environ.get(name, "").strip()
        if text:
            try:
                return max(int(text), 1)
            except ValueError:
                raise DistError(f"the launcher set {name}={text!r}, not a number of ranks") \
                    from None
    return 1


def launched_rank(environ=None) -> int:
    """This process's rank according to the launcher (0 without one)."""
    environ = os.environ if environ is None else environ
    for name in RANK_VARS:
        text = environ.get(name, "").strip()
        if text.isdigit():
            return int(text)
    return 0


def world() -> Comm:
    """The Comm of every rank of the job (made once per process; see the module)."""
    global _world
    if _world is None:
        if launched_size() > 1:
            from tinylm.dist.mpi import MpiTransport, import_mpi

            transport = MpiTransport(import_mpi().COMM_WORLD)
        else:
            transport = LocalTransport()
        _world = Comm(transport)
        _write_pid(_world)
    return _world


def _write_pid(comm: Comm) -> None:
    folder = os.environ.get(PIDS_VAR)
    if folder and comm.size > 1:
        os.makedirs(folder, exist_ok=True)
        write_atomic(os.path.join(folder, f"rank-{comm.rank}"),
                     f"{os.getpid()} {socket.gethostname()}\n")


def report_and_abort(error: BaseException, comm: Comm | None = None) -> None:
    """What a rank of a multi-rank job does with an error no one caught: print it
    with its rank on stderr (and in ``TINYLM_DIST_PIDS``'s ``rank-R.error``), then stop
    every rank (MPI_Abort, exit code 2), so the others never wait for it (an error that
    another rank reports, ``ReportedElsewhere``, is not printed twice). One rank: nothing (the caller reports as usual)."""
    comm = comm or _world
    if comm is None or comm.size == 1:
        return
    if isinstance(error, ReportedElsewhere):
        comm.abort(2)
    text = " ".join(str(error).split()) or type(error).__name__
    if not text.startswith(f"rank {comm.rank}"):
        text = f"rank {comm.rank} of {comm.size}: {text}"
    kind = "" if isinstance(error, TinyLMError) else f"{type(error).__name__}: "
    message = f"Error: {kind}{text}"
    folder = os.environ.get(PIDS_VAR)
    if folder:  # tells `tinylm train --nproc` that this rank reported its end (and what)
        with contextlib.suppress(OSError):
            write_atomic(os.path.join(folder, f"rank-{comm.rank}.error"), message + "\n")
    print(message, file=sys.stderr, flush=True)
    comm.abort(2)  # (MPI: once mpiexec has taken the message, see mpi.drain_output)

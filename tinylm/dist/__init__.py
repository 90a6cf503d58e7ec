"""Training on many processes: MPI between CPUs, NCCL between GPUs.

    mpiexec -n 4 tinylm train --config run.toml          # 4 data-parallel ranks
    tinylm train --nproc 4 --config run.toml             # the same; tinylm runs mpiexec
    tinylm train --nproc 4 --zero 1 ...                  # optimizer state sharded (ZeRO-1)

The parts, one idea per file (imports go down this list):

    comm.py            Comm: all_reduce, reduce_scatter, all_gather, broadcast, barrier,
                       split; fixed reduction order; timeouts (the API the rest uses)
    local.py           the engine of a one-rank group (copies; no MPI)
    mpi.py             the host engine: mpi4py on NumPy buffers, polled to a deadline
    nccl.py            the GPU engine: CuPy's NCCL binding (or staged through the host)
    world.py           the job's ranks from the launcher's environment; world(); aborting
    shared_run.py      the run folder opened by rank 0, its state sent to the others
    data_parallel.py   DataParallel: the Trainer's view of the ranks (batch shards,
                       bucketed gradient all-reduce, rank-0-only files)
    zero.py            ZeRO-1: AdamW's state sharded over the ranks
    launch.py          `tinylm train --nproc N`: finding mpiexec and running it
    tensor_parallel.py (Megatron-LM layers: column/row-parallel Linear, vocab-parallel
                       embedding and cross-entropy; built on comm.py, see that file)

A process started without ``mpiexec`` (or with ``-n 1``) is a world of one rank: every
collective is a copy and mpi4py is never imported. ``pip install -e ".[dist]"``
installs mpi4py and the ``mpich`` wheel, whose ``mpiexec`` lands next to the venv's
python.
"""

from tinylm.dist.comm import Comm, CommTimeout, DistError, ReportedElsewhere, default_timeout
from tinylm.dist.data_parallel import DataParallel
from tinylm.dist.local import LocalTransport
from tinylm.dist.world import launched_rank, launched_size, report_and_abort, world

__all__ = ["Comm", "CommTimeout", "DataParallel", "DistError", "LocalTransport",
           "ReportedElsewhere", "default_timeout",
           "launched_rank", "launched_size", "report_and_abort", "world", "local_comm"]


def local_comm(*, nccl: bool = False, fixed_order: bool = False) -> Comm:
    """A one-rank Comm; ``nccl=True``: CuPy arrays go through a one-rank NCCL
    communicator (to exercise the GPU engine on one GPU)."""
    gpu = None
    if nccl:
        from tinylm.dist.nccl import NcclTransport

        gpu = NcclTransport.single()
    return Comm(LocalTransport(), gpu=gpu, fixed_order=fixed_order)

"""N = D x T ranks: D data-parallel copies of a model split over T tensor-parallel ranks.

    mpiexec -n 4 tinylm train --tensor-parallel 2 ...     # D = 2 copies, each on 2 ranks

World rank w sits at data rank d = w // T and tensor rank t = w % T: the T ranks of
one model copy are neighbours (``mpiexec`` fills a node's slots in rank order, so a
tensor-parallel group stays on one node, where its four all-reduces per block and
step are cheapest, and only the data-parallel gradient all-reduce, once per step,
crosses nodes: Megatron-LM's layout). Two sub-communicators (``Comm.split``):

    tp   the T ranks of one copy (w // T alike): the layers' f and g, the vocab-parallel
         cross-entropy, gathering checkpoints
    dp   the D ranks holding the same shards (w % T alike): batch rows, gradient sums

``TensorDataParallel`` is the Trainer's view of the grid: a ``DataParallel`` over
``dp`` (batch shards by data rank, bucketed gradient all-reduce, dropout seeds per
data rank, so the T ranks of a copy draw the same residual masks), with what
concerns the whole job over every rank (the run folder, the stop vote, the
barriers after checkpoints), the model split over ``tp`` (``split_model``), the
gradient norm of the split model, and checkpoints gathered to the full model's.

ZeRO-1 on the grid (``--zero 1``) shards each rank's AdamW state over its ``dp``
group: the D ranks holding the same tensor shard split that shard's moments D ways
(per-rank optimizer memory 1/(D x T) of one process's), reduce-scatter its
gradient and all-gather its weights over ``dp``; the gradient norm adds each rank's
pieces over ``dp``, then the tensor-sharded part over ``tp``; a checkpoint gathers
over ``dp`` (ZeRO's state) and then over ``tp`` (the full model's layout).
"""

from __future__ import annotations

import contextlib
import os
import socket

import numpy as np

from tinylm.dist.comm import Comm, DistError
from tinylm.dist.data_parallel import DataParallel, _Gathered
from tinylm.dist.shared_run import open_shared_run, setup_timeout


class Grid:
    """The D x T grid of ``world``'s ranks (see the module docstring)."""

    def __init__(self, world: Comm, tensor_parallel: int):
        T = int(tensor_parallel)
        if T < 1 or world.size % T:
            raise DistError(f"--tensor-parallel {T} must divide the {world.size} ranks "
                            f"(N = D x T); launch a multiple of {T} ranks or pick another T")
        self.world, self.tensor_size, self.data_size = world, T, world.size // T
        self.data_rank, self.tensor_rank = divmod(world.rank, T)
        self.tp = world.split(color=self.data_rank, key=self.tensor_rank)
        self.dp = world.split(color=self.tensor_rank, key=self.data_rank)

    def __repr__(self) -> str:
        return (f"Grid(D={self.data_size} x T={self.tensor_size}; rank {self.world.rank}: "
                f"data {self.data_rank}, tensor {self.tensor_rank})")


class TensorDataParallel(DataParallel):
    """The ranks of a run with ``tensor_parallel`` > 1, as the Trainer sees them (see
    the module docstring); ``world``: every rank of the job."""

    def __init__(self, world: Comm, tensor_parallel: int, *, zero: int = 0,
                 fixed_order: bool = False):
        self.grid = Grid(world, tensor_parallel)
        super().__init__(self.grid.dp, zero=zero, fixed_order=fixed_order)
        self.world = world.with_options(fixed_order=fixed_order)
        self.tp = self.grid.tp.with_options(fixed_order=fixed_order)
        self.is_main = world.rank == 0
        self.model = None  # the TensorParallelDecoder, once split_model made it

    @classmethod
    def from_config(cls, config, comm: Comm | None = None) -> "TensorDataParallel":
        if comm is None:
            from tinylm.dist.world import world

            comm = world()
        T = config.tensor_parallel
        if T > comm.size:
            raise DistError(f"--tensor-parallel {T} needs at least {T} ranks, this job has "
                            f"{comm.size}; launch it with mpiexec -n {T} (or --nproc {T})")
        D = comm.size // T if comm.size % T == 0 else 1  # (Grid names the divisibility)
        if config.batch_size < D:
            raise DistError(f"batch_size = {config.batch_size} is the global batch, split over "
                            f"the {D} data-parallel copies: make it at least {D}")
        return cls(comm, T, zero=getattr(config, "zero", 0),
                   fixed_order=getattr(config, "reduce_order", "native") == "fixed")

    def describe(self) -> str:
        g = self.grid
        order = ", sums in rank order" if self.comm.fixed_order else ""
        zero = " (ZeRO-1: AdamW's state sharded over it)" if self.zero and g.data_size > 1 \
            else ""
        return (f"tensor parallel over {g.tensor_size} ranks x data parallel over "
                f"{g.data_size}{zero} ({g.world.size} ranks){order}; rank 0 is pid "
                f"{os.getpid()} on {socket.gethostname()}")

    # ------------------------------------------------------------------ the model

    def split_model(self, model):
        """This rank's shards of ``model`` (a TensorParallelDecoder); the Trainer builds
        its optimizer on it."""
        from tinylm.dist.tp_model import TensorParallelDecoder

        self.model = TensorParallelDecoder(model, self.tp)
        return self.model

    def clip_grad_norm(self, params: list, max_norm: float) -> float:
        """The norm of the whole model's gradient (summed over the data ranks already):
        sharded parameters counted over the tensor ranks, replicated ones once."""
        from tinylm.dist.tp_model import clip_grad_norm_tp

        if self._zero_opt is not None:
            return self._zero_opt.clip_grad_norm(max_norm, norm=self._zero_norm)
        return clip_grad_norm_tp(self.model, params, max_norm)

    def _zero_norm(self) -> float:
        """ZeRO-1: the whole model's gradient norm from every rank's pieces (fixed
        order: from the whole gradient each data rank holds, as without ZeRO)."""
        zero = self._zero_opt
        if self.comm.fixed_order:
            grads = [p for p in zero.params if p.grad is not None]
            return float(np.sqrt(self.model.grad_norm_squares(grads)))
        sharded = self.model._split_of_parameter()
        parts = zero.local_squares(lambda i: 0 if id(zero.params[i]) in sharded else 1, 2)
        parts = self.comm.all_reduce(parts)  # over dp: (tensor-sharded, replicated)
        return float(np.sqrt(self.tp.all_reduce(parts[:1])[0] + parts[1]))

    def full_optimizer(self, optimizer):
        """The optimizer's state in the full model's layout, gathered (every rank)."""
        return _Gathered(self.model.full_optimizer_state(optimizer))

    # ------------------------------------------------------------------ the whole job

    def open_run(self, path, *, overwrite: bool = False, resume="auto"):
        return open_shared_run(self.world, path, overwrite=overwrite, resume=resume)

    @contextlib.contextmanager
    def main_first(self):
        if not self.is_main:
            self.world.barrier(timeout=setup_timeout())
        yield
        if self.is_main:
            self.world.barrier(timeout=setup_timeout())

    def any(self, flag: bool) -> bool:
        return bool(self.world.all_reduce(np.array([1 if flag else 0], np.int64), "max")[0])

    def saved(self) -> None:
        self.world.barrier(timeout=setup_timeout())


def parallel_from_config(config, comm: Comm | None = None) -> DataParallel:
    """The Trainer's view of the ranks for ``config``: a ``TensorDataParallel`` when it
    asks for tensor parallel, else a ``DataParallel`` over every rank."""
    if getattr(config, "tensor_parallel", 1) > 1:
        return TensorDataParallel.from_config(config, comm)
    return DataParallel.from_config(config, comm)

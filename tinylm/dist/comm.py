"""``Comm``: a group of ranks and the five collectives tinylm trains with.

    from tinylm import dist
    comm = dist.world()                    # every rank of `mpiexec -n N`; one rank without it
    g = comm.all_reduce(g)                 # sum over ranks (a new array; out=g: in place)
    shard = comm.reduce_scatter(flat)      # (N*k, ...) -> this rank's (k, ...) block, summed
    full = comm.all_gather(shard)          # (k, ...) on every rank -> (N*k, ...), rank order
    comm.broadcast(weights, root=0)        # in place
    comm.barrier()
    tp = comm.split(color=rank // T)       # sub-groups (tensor parallel inside data parallel)

The arrays' device chooses the engine: NumPy arrays go through MPI (mpi4py, the
arrays handed to it as buffers: no copy, no pickling), CuPy arrays through NCCL
(CuPy's ``cupy.cuda.nccl`` binding, on the current stream; staged through the host
over MPI where CuPy has no NCCL). With one rank every collective is a copy and
nothing needs MPI. Arrays must be C-contiguous (they are made so) and have the same
shape and dtype on every rank; ``axis`` moves the split / gathered axis.

Reduction order. MPI and NCCL sum in an order of their choosing (ring, tree, ...),
so the last bits of a float32 sum depend on the algorithm and the number of ranks.
``fixed_order=True`` makes every sum the left-to-right sum in rank order,
``((x0 + x1) + x2) + ...``, computed on every rank after gathering the terms
(all_reduce: an all-gather, N x the memory of one message; reduce_scatter: an
all-to-all of the blocks, the same volume as a reduce-scatter): the same bits on
every rank, on every run, whatever the network, and equal to adding the ranks'
terms one after another in one process (as gradient accumulation does).

Faults. MPI has no timeouts, so every collective is started non-blocking and
polled until ``timeout`` seconds (``TINYLM_DIST_TIMEOUT``, default 30) have passed;
then the ranks still waiting ask every other rank, over a separate channel, where it
is, and raise ``CommTimeout`` naming the ranks that did not answer (dead, stopped or
hung) — never a hang. ``tinylm.dist.world.report_and_abort`` is what a failing rank
does next: print its error (with its rank) and ``MPI_Abort``, which stops every
rank of the job.
"""

from __future__ import annotations

import os

from tinylm import backend
from tinylm.errors import TinyLMError

DEFAULT_TIMEOUT_S = 30.0
OPS = ("sum", "max", "min")


class DistError(TinyLMError, RuntimeError):
    """A collective failed, or the run cannot be set up across ranks."""


class CommTimeout(DistError):
    """A collective did not complete in time: some rank died, stopped or hung."""


class ReportedElsewhere(DistError):
    """The error another rank met and reports itself (this rank says nothing more)."""


def default_timeout() -> float:
    """``TINYLM_DIST_TIMEOUT`` (seconds), else 30."""
    text = os.environ.get("TINYLM_DIST_TIMEOUT", "")
    try:
        value = float(text) if text.strip() else DEFAULT_TIMEOUT_S
    except ValueError:
        raise DistError(f"TINYLM_DIST_TIMEOUT must be a number of seconds, got {text!r}") \
            from None
    if not value > 0:
        raise DistError(f"TINYLM_DIST_TIMEOUT must be > 0 seconds, got {text!r}")
    return value


class Comm:
    """The ranks of one group; ``rank`` (0..size-1) is this process's place in it.

    ``transport``: the engine for host arrays (``MpiTransport``, or ``LocalTransport``
    for one rank); ``gpu``: the engine for CuPy arrays, or None to make one on first
    use (NCCL when CuPy has it, else staged through ``transport``). ``timeout``:
    seconds a collective may take (None: ``default_timeout()``); every call may pass
    its own. ``fixed_order``: sums in rank order (see the module docstring)."""

    def __init__(self, transport, *, gpu=None, timeout: float | None = None,
                 fixed_order: bool = False):
        self.transport, self._gpu = transport, gpu
        self.rank, self.size = transport.rank, transport.size
        self.timeout = default_timeout() if timeout is None else float(timeout)
        self.fixed_order = bool(fixed_order)

    def __repr__(self) -> str:
        return (f"Comm(rank={self.rank}, size={self.size}, "
                f"{type(self.transport).__name__}, fixed_order={self.fixed_order})")

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files, logs and the progress bar."""
        return self.rank == 0

    def with_options(self, *, fixed_order: bool | None = None,
                     timeout: float | None = None) -> "Comm":
        """The same group (same engines) with other options."""
        return Comm(self.transport, gpu=self._gpu,
                    timeout=self.timeout if timeout is None else timeout,
                    fixed_order=self.fixed_order if fixed_order is None else fixed_order)

    # ------------------------------------------------------------------ collectives

    def all_reduce(self, x, op: str = "sum", *, out=None, timeout: float | None = None):
        """The element-wise ``op`` ("sum", "max", "min") of ``x`` over the ranks, on
        every rank. Returns ``out`` (which may be ``x``: in place) or a new array."""
        if op not in OPS:
            raise DistError(f"all_reduce op must be one of {OPS}, got {op!r}")
        x = _contiguous(x)
        out = _empty_like(x) if out is None else out
        engine, t = self._engine(x), self._timeout(timeout)
        if op == "sum" and self.fixed_order:
            parts = _empty(x, (self.size, *x.shape))
            engine.allgather(x, parts, "all_reduce", t)
            return _sum_in_rank_order(parts, out)
        engine.allreduce(x, out, op, "all_reduce", t)
        return out

    def reduce_scatter(self, x, *, axis: int = 0, out=None, timeout: float | None = None):
        """Sum ``x`` over the ranks and keep this rank's block: ``x``'s ``axis`` (of
        length size * k, the same on every rank) is cut into ``size`` blocks of k;
        rank r gets the sum of every rank's block r, shape ``x.shape`` with k there
        (into ``out``, a C-contiguous array of that shape, when given; axis 0 only)."""
        x, moved = _axis_first(x, axis)
        if x.shape[0] % self.size:
            raise DistError(f"reduce_scatter: axis {axis} has length {x.shape[0]}, not a "
                            f"multiple of the {self.size} ranks; pad it")
        k = x.shape[0] // self.size
        if out is not None and (moved or out.shape != (k, *x.shape[1:])
                                or not _is_contiguous(out)):
            raise DistError(f"reduce_scatter: out= must be a C-contiguous {(k, *x.shape[1:])} "
                            f"array, and axis 0")
        engine, t = self._engine(x), self._timeout(timeout)
        if self.fixed_order:
            parts = _empty(x, x.shape)  # row block r: rank r's terms of my block
            engine.alltoall(x, parts, "reduce_scatter", t)
            out = _sum_in_rank_order(parts.reshape(self.size, k, *x.shape[1:]), out)
        else:
            out = _empty(x, (k, *x.shape[1:])) if out is None else out
            engine.reduce_scatter(x, out, "reduce_scatter", t)
        return _axis_back(out, axis, moved)

    def all_gather_in_place(self, x, *, timeout: float | None = None):
        """``x`` (C-contiguous, axis 0 of length size * k) holds this rank's block at
        block ``rank``; afterwards every block holds its rank's (no other buffer: the
        ZeRO-1 weights gathered where they live)."""
        if not _is_contiguous(x) or x.ndim == 0 or x.shape[0] % self.size:
            raise DistError(f"all_gather_in_place needs a C-contiguous array whose first "
                            f"axis is a multiple of the {self.size} ranks")
        engine, t = self._engine(x), self._timeout(timeout)
        if hasattr(engine, "allgather_in_place"):
            engine.allgather_in_place(x, "all_gather", t)
        else:  # (an engine without it: through a gathered copy)
            k = x.shape[0] // self.size
            x[...] = self.all_gather(x[self.rank * k:(self.rank + 1) * k].copy(), timeout=t)
        return x

    def all_gather(self, x, *, axis: int = 0, timeout: float | None = None):
        """Every rank's ``x`` (the same shape on each), concatenated along ``axis`` in
        rank order, on every rank."""
        x, moved = _axis_first(x, axis)
        out = _empty(x, (self.size * x.shape[0], *x.shape[1:]))
        self._engine(x).allgather(x, out, "all_gather", self._timeout(timeout))
        return _axis_back(out, axis, moved)

    def broadcast(self, x, root: int = 0, *, timeout: float | None = None):
        """Rank ``root``'s ``x`` into every rank's ``x`` (in place; C-contiguous)."""
        if not 0 <= root < self.size:
            raise DistError(f"broadcast root {root} is not a rank of this {self.size}-rank group")
        if not _is_contiguous(x):
            raise DistError("broadcast works in place: pass a C-contiguous array")
        self._engine(x).bcast(x, root, "broadcast", self._timeout(timeout))
        return x

    def barrier(self, *, timeout: float | None = None) -> None:
        """Return once every rank has called it (host engine)."""
        self.transport.barrier("barrier", self._timeout(timeout))

    # ------------------------------------------------------------------ groups, faults

    def split(self, color: int, key: int | None = None) -> "Comm":
        """The sub-group of the ranks that pass the same ``color``, ordered by ``key``
        (default: this rank); every rank of this group must call it. The sub-group
        keeps this group's options; its GPU engine is made on first use."""
        sub = self.transport.split(int(color), self.rank if key is None else int(key))
        return Comm(sub, timeout=self.timeout, fixed_order=self.fixed_order)

    def abort(self, code: int = 2) -> None:
        """Stop every rank of the job now (MPI_Abort); one rank: exit."""
        self.transport.abort(code)

    # ------------------------------------------------------------------ helpers

    def _timeout(self, timeout):
        return self.timeout if timeout is None else float(timeout)

    def _engine(self, x):
        """The transport for ``x``'s device: the host one, or the GPU one (made once;
        a group of one rank uses its copying host engine, unless given a GPU one)."""
        if backend.device_of(x) == "cpu" or (self._gpu is None and self.size == 1):
            return self.transport
        if self._gpu is None:
            from tinylm.dist.nccl import gpu_transport

            self._gpu = gpu_transport(self.transport, self._timeout(None))
        return self._gpu


# --------------------------------------------------------------------------- arrays


def _is_contiguous(x) -> bool:
    return bool(x.flags.c_contiguous)


def _contiguous(x):
    return x if _is_contiguous(x) else backend.get_array_module(x).ascontiguousarray(x)


def _empty(x, shape):
    return backend.get_array_module(x).empty(shape, dtype=x.dtype)


def _empty_like(x):
    return backend.get_array_module(x).empty_like(x)


def _axis_first(x, axis: int):
    """(``x`` with ``axis`` first, C-contiguous; whether it moved)."""
    xp = backend.get_array_module(x)
    if x.ndim == 0:
        raise DistError("reduce_scatter / all_gather need an array with at least one axis")
    axis = axis % x.ndim
    if axis:
        return xp.ascontiguousarray(xp.moveaxis(x, axis, 0)), True
    return _contiguous(x), False


def _axis_back(x, axis: int, moved: bool):
    if not moved:
        return x
    xp = backend.get_array_module(x)
    return xp.ascontiguousarray(xp.moveaxis(x, 0, axis % x.ndim))


def _sum_in_rank_order(parts, out=None):
    """``((parts[0] + parts[1]) + parts[2]) + ...`` (``parts``: (N, ...)), into ``out``.
    A loop over ranks (a handful), each step one vectorised add."""
    if out is None:
        out = parts[0].copy()
    else:
        out[...] = parts[0]
    for r in range(1, parts.shape[0]):
        out += parts[r]
    return out

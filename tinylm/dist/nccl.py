"""The GPU engine: NCCL through CuPy's binding (``cupy.cuda.nccl``), with deadlines.

One NCCL communicator per group, made on the first collective on CuPy arrays: rank
0 draws NCCL's unique id and the host engine (MPI) broadcasts it, then every rank
joins. Each call is queued on CuPy's current stream; an event recorded after it is
polled until it completes or the deadline passes (the host engine meanwhile answers
the other ranks' pings, so a timeout names the silent ranks as on the host), after
which the NCCL communicator is aborted (its kernels would otherwise spin forever).

Where CuPy has no NCCL, ``StagedTransport`` copies the arrays to the host, runs the
host engine's collective and copies the result back.

One rank: ``NcclTransport.single()`` is a one-rank NCCL communicator (needing no
MPI), which is how the GPU check exercises the binding on a one-GPU machine.
"""

from __future__ import annotations

import importlib
import time

import numpy as np

from tinylm import backend
from tinylm.dist.comm import CommTimeout, DistError


def nccl_module():
    """CuPy's NCCL binding, or None where CuPy or NCCL is missing."""
    if not backend.cuda_available():
        return None
    xp = backend.xp_for("cuda")  # (tinylm.backend is the one module importing cupy)
    try:
        nccl = getattr(xp.cuda, "nccl", None) or importlib.import_module(
            xp.__name__ + ".cuda.nccl")
    except ImportError:
        return None
    return nccl if getattr(nccl, "available", True) else None


def gpu_transport(host, timeout: float):
    """The engine for CuPy arrays of the group whose host engine is ``host``."""
    nccl = nccl_module()
    if nccl is None:
        return StagedTransport(host)
    if host.size == 1:
        return NcclTransport.single()
    uid = np.zeros(128, np.int64)
    if host.rank == 0:
        uid[:] = nccl.get_unique_id()
    host.bcast(uid, 0, "nccl setup", timeout)
    return NcclTransport(nccl, tuple(int(v) for v in uid), host.rank, host.size, host)


class NcclTransport:
    """Collectives of one NCCL communicator on CuPy arrays (see the module docstring)."""

    def __init__(self, nccl, unique_id, rank: int, size: int, host=None):
        self.nccl, self.host = nccl, host
        self.rank, self.size = rank, size
        self.xp = backend.xp_for("cuda")
        self.comm = nccl.NcclCommunicator(size, unique_id, rank)
        self._types = {np.dtype(k): getattr(nccl, v) for k, v in (
            ("float32", "NCCL_FLOAT32"), ("float64", "NCCL_FLOAT64"),
            ("float16", "NCCL_FLOAT16"), ("int32", "NCCL_INT32"), ("int64", "NCCL_INT64"),
            ("int8", "NCCL_INT8"), ("uint8", "NCCL_UINT8"))}
        self._ops = {"sum": nccl.NCCL_SUM, "max": nccl.NCCL_MAX, "min": nccl.NCCL_MIN}

    @classmethod
    def single(cls) -> "NcclTransport":
        """A communicator of this one process (rank 0 of 1): no MPI needed."""
        nccl = nccl_module()
        if nccl is None:
            raise DistError("CuPy's NCCL binding is not available: install the cuda extra on "
                            "a machine with NVIDIA's NCCL library")
        return cls(nccl, nccl.get_unique_id(), 0, 1)

    @property
    def world_ranks(self):
        return self.host.world_ranks if self.host is not None else [0]

    def _type(self, x):
        try:
            return self._types[np.dtype(x.dtype)]
        except KeyError:
            raise DistError(f"NCCL has no type for {x.dtype} arrays") from None

    def _stream(self):
        return self.xp.cuda.get_current_stream().ptr

    # ------------------------------------------------------------------ the collectives

    def allreduce(self, send, recv, op, what, timeout) -> None:
        self.comm.allReduce(send.data.ptr, recv.data.ptr, send.size, self._type(send),
                            self._ops[op], self._stream())
        self._wait(what, timeout)

    def reduce_scatter(self, send, recv, what, timeout) -> None:
        self.comm.reduceScatter(send.data.ptr, recv.data.ptr, recv.size, self._type(send),
                                self.nccl.NCCL_SUM, self._stream())
        self._wait(what, timeout)

    def allgather(self, send, recv, what, timeout) -> None:
        self.comm.allGather(send.data.ptr, recv.data.ptr, send.size, self._type(send),
                            self._stream())
        self._wait(what, timeout)

    def allgather_in_place(self, buf, what, timeout) -> None:
        n = buf.size // self.size  # NCCL is in place when send = recv + rank * n
        self.comm.allGather(buf.data.ptr + self.rank * n * buf.itemsize, buf.data.ptr, n,
                            self._type(buf), self._stream())
        self._wait(what, timeout)

    def alltoall(self, send, recv, what, timeout) -> None:
        """Block r of ``send`` to rank r, rank r's block into block r of ``recv``."""
        n, t, stream = send.size // self.size, self._type(send), self._stream()
        step = n * send.itemsize
        self.nccl.groupStart()
        for r in range(self.size):  # one send and one receive per rank
            self.comm.send(send.data.ptr + r * step, n, t, r, stream)
            self.comm.recv(recv.data.ptr + r * step, n, t, r, stream)
        self.nccl.groupEnd()
        self._wait(what, timeout)

    def bcast(self, buf, root, what, timeout) -> None:
        self.comm.bcast(buf.data.ptr, buf.size, self._type(buf), root, self._stream())
        self._wait(what, timeout)

    def barrier(self, what, timeout) -> None:
        one = self.xp.ones(1, np.int32)
        self.allreduce(one, one, "sum", what, timeout)

    def split(self, color, key):
        raise DistError("split the Comm (its host engine), not its NCCL engine")

    def abort(self, code: int) -> None:
        self.comm.abort()
        if self.host is not None:
            self.host.abort(code)

    def _wait(self, what: str, timeout: float) -> None:
        """Until the work queued on the stream is done; CommTimeout at the deadline."""
        event = self.xp.cuda.Event(block=False, disable_timing=True)
        event.record()
        deadline = time.monotonic() + timeout
        polls = 0
        if self.host is not None:
            self.host.current = what
        try:
            while not event.done:
                polls += 1
                if polls > 200:
                    time.sleep(min(1e-3, 2e-5 * (polls - 200)))
                if self.host is not None and polls % 50 == 0:
                    self.host._answer_pings()
                if time.monotonic() >= deadline:
                    error = (self.host._timed_out(what, timeout) if self.host is not None
                             else CommTimeout(f"NCCL {what} did not complete within "
                                              f"{timeout:g} s"))
                    self.comm.abort()
                    raise error
        finally:
            if self.host is not None:
                self.host.current = "idle"


class StagedTransport:
    """CuPy arrays through the host engine: copied to NumPy, reduced, copied back."""

    def __init__(self, host):
        self.host, self.rank, self.size = host, host.rank, host.size
        self.world_ranks = host.world_ranks

    def _through_host(self, call, send, recv, *args) -> None:
        host_send = backend.to_numpy(send)
        host_recv = host_send if recv is send else np.empty(recv.shape, recv.dtype)
        call(host_send, host_recv, *args)
        recv[...] = backend.get_array_module(recv).asarray(host_recv)

    def allreduce(self, send, recv, op, what, timeout) -> None:
        self._through_host(self.host.allreduce, send, recv, op, what, timeout)

    def reduce_scatter(self, send, recv, what, timeout) -> None:
        self._through_host(self.host.reduce_scatter, send, recv, what, timeout)

    def allgather(self, send, recv, what, timeout) -> None:
        self._through_host(self.host.allgather, send, recv, what, timeout)

    def alltoall(self, send, recv, what, timeout) -> None:
        self._through_host(self.host.alltoall, send, recv, what, timeout)

    def bcast(self, buf, root, what, timeout) -> None:
        host = backend.to_numpy(buf).copy()
        self.host.bcast(host, root, what, timeout)
        buf[...] = backend.get_array_module(buf).asarray(host)

    def barrier(self, what, timeout) -> None:
        self.host.barrier(what, timeout)

    def split(self, color, key):
        raise DistError("split the Comm (its host engine), not its GPU engine")

    def abort(self, code: int) -> None:
        self.host.abort(code)

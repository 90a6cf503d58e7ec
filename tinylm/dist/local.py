"""The engine of a group of one rank: every collective is a copy, nothing needs MPI."""

from __future__ import annotations

import sys


class LocalTransport:
    """One rank (rank 0 of 1), on any array module: the sum over one rank is the
    array itself, the gather of one block is that block."""

    rank, size = 0, 1
    world_ranks = [0]

    def allreduce(self, send, recv, op, what, timeout) -> None:
        if recv is not send:
            recv[...] = send

    def reduce_scatter(self, send, recv, what, timeout) -> None:
        recv[...] = send

    def allgather(self, send, recv, what, timeout) -> None:
        recv[...] = send.reshape(recv.shape)

    def allgather_in_place(self, buf, what, timeout) -> None:
        pass

    def alltoall(self, send, recv, what, timeout) -> None:
        recv[...] = send

    def bcast(self, buf, root, what, timeout) -> None:
        pass

    def barrier(self, what, timeout) -> None:
        pass

    def split(self, color, key) -> "LocalTransport":
        return LocalTransport()

    def name(self, rank: int) -> str:
        return str(rank)

    def abort(self, code: int) -> None:
        sys.exit(code)

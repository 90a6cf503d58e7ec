"""Data parallel: what the Trainer asks of the ranks, in one object.

Every rank holds the whole model. Each optimizer step, every rank draws the same
global batch (the samplers and generators are seeded alike, so their states, and a
checkpoint, do not depend on the number of ranks) and keeps its own rows of it:
rank r of N takes rows ``[r*B/N, (r+1)*B/N)`` of each micro-batch (``np.array_split``
when N does not divide B). Each rank's loss on its rows is weighted by its share of
the *global* batch's predicted tokens, so the sum over ranks of the gradients is the
gradient of one process's loss on the whole batch. Gradients are summed over the
ranks once per step, after the last accumulation micro-step's backward (never on the
others), in buckets of about 25 MB: each bucket is one flat buffer, allocated once
and kept from step to step (no allocation, no page faults), into which some
parameters' gradients are concatenated; it is all-reduced in place (mpi4py hands
its memory to MPI: no other copy), and the parameters' gradients become views of
it. The losses are already weighted by each rank's share of the global batch, so
the sum needs no averaging. (Overlapping the all-reduce with the backward pass is
not done: it would need a hook when a parameter's gradient is final, which the
autograd engine does not have; and on one machine MPI's shared-memory copies run on
the same cores as the backward pass, so there is little to overlap.)

So a run on N ranks follows one process on the same global batch: the same losses
within float32 reduction-order rounding (the gradients are sums of N partial sums),
and, with ``reduce_order = "fixed"``, bit for bit the losses of one process that
accumulates the N shards as micro-batches (``batch_size = B/N``, ``grad_accum =
N``, packed sampling): sums are then taken in rank order, as accumulation does.

Rank 0 writes the checkpoints, the metrics and the progress bar; every rank
evaluates its rows of the validation batches (the sums are combined) and decodes
the same sample, so no rank waits long for another. ``zero = 1`` shards AdamW's
state instead (``tinylm.dist.zero``). A world of one rank makes every method here a
no-op, and the Trainer runs exactly as it does without this module.
"""

from __future__ import annotations

import contextlib
import os
import socket

import numpy as np

from tinylm import backend
from tinylm.dist.comm import Comm, DistError
from tinylm.dist.shared_run import open_shared_run, setup_timeout

BUCKET_BYTES = 25 * 2**20  # as torch's DistributedDataParallel
# objectives whose batches are independent rows (split by rows across ranks); a plugin
# objective may instead define shard_batch(batch, rank, size) -> its part of the batch
ROW_OBJECTIVES = ("causal-lm", "prefix-lm", "masked-lm", "span-corruption", "sft",
                  "classify")
REDUCE_ORDERS = ("native", "fixed")


class DataParallel:
    """The ranks of a data-parallel run, as the Trainer sees them.

    ``comm``: the ranks (``tinylm.dist.world()``); ``zero``: 0 (every rank holds
    AdamW's whole state) or 1 (ZeRO-1: sharded); ``fixed_order``: sums in rank order
    (bit-reproducible); ``bucket_bytes``: the size of one gradient all-reduce."""

    def __init__(self, comm: Comm, *, zero: int = 0, fixed_order: bool = False,
                 bucket_bytes: int = BUCKET_BYTES):
        if zero not in (0, 1):
            raise DistError(f"zero must be 0 or 1 (ZeRO stage 1), got {zero!r}")
        self.comm = comm.with_options(fixed_order=fixed_order)
        self.rank, self.size, self.is_main = comm.rank, comm.size, comm.rank == 0
        self.zero, self.bucket_bytes = zero, int(bucket_bytes)
        self._zero_opt, self._objective = None, None
        self._flat = {}  # (dtype, device, size) of a bucket: its buffer, kept between steps

    @classmethod
    def from_config(cls, config, comm: Comm | None = None) -> "DataParallel":
        """For a TrainConfig (its ``zero`` and ``reduce_order``) on ``comm`` (default:
        every rank of the job), checked against it."""
        if comm is None:
            from tinylm.dist.world import world

            comm = world()
        order = getattr(config, "reduce_order", "native")
        if order not in REDUCE_ORDERS:
            raise DistError(f"reduce_order must be one of {REDUCE_ORDERS}, got {order!r}")
        if comm.size > 1:
            if config.batch_size < comm.size:
                raise DistError(f"batch_size = {config.batch_size} is the global batch, split "
                                f"over the {comm.size} ranks: make it at least {comm.size}")
        return cls(comm, zero=getattr(config, "zero", 0), fixed_order=order == "fixed")

    def check_objective(self, objective, name: str) -> None:
        """A DistError when ``objective``'s batches cannot be split by rows."""
        if self.size > 1 and name not in ROW_OBJECTIVES and not hasattr(objective,
                                                                          "shard_batch"):
            raise DistError(f"objective {name!r} pairs or groups the rows of its batches, "
                            f"which data parallel would split; train it on one rank (or give "
                            f"the objective a shard_batch(batch, rank, size) method)")
        self._objective = objective

    def describe(self) -> str:
        """One line for the log: how the ranks train."""
        how = "ZeRO-1 (AdamW's state sharded)" if self.zero else "data parallel"
        order = ", sums in rank order" if self.comm.fixed_order else ""
        return (f"{how} on {self.size} ranks{order}; rank 0 is pid {os.getpid()} on "
                f"{socket.gethostname()}")

    # ------------------------------------------------------------------ setup

    def metrics_log(self, log):
        """``log`` (a MetricsLog) on rank 0; on the others, one that writes nothing."""
        return log if self.is_main else _NoMetrics()

    def open_run(self, path, *, overwrite: bool = False, resume="auto"):
        """The run folder, opened by rank 0 for every rank (``shared_run``)."""
        return open_shared_run(self.comm, path, overwrite=overwrite, resume=resume)

    def lock(self, path):
        """The run's lock for the ``with`` block: rank 0 takes it, the others need none."""
        from tinylm.rundir import RunLock

        return RunLock(path) if self.is_main else contextlib.nullcontext()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (training a tokenizer, tokenizing the data into
        the shared cache), then the others (which find it cached)."""
        if not self.is_main:
            self.comm.barrier(timeout=setup_timeout())
        yield
        if self.is_main and self.size > 1:
            self.comm.barrier(timeout=setup_timeout())

    def prepare(self, model, optimizer):
        """Make every rank start from rank 0's weights; returns the optimizer to train
        with (ZeRO-1: a ``ZeroAdamW`` holding this rank's shard of ``optimizer``'s state)."""
        if self.size == 1:
            return optimizer
        for p in model.parameters():
            self.comm.broadcast(p.data, timeout=setup_timeout())
        if self.zero:
            from tinylm.dist.zero import ZeroAdamW

            self._zero_opt = ZeroAdamW(optimizer, self.comm)
            return self._zero_opt
        return optimizer

    # ------------------------------------------------------------------ a step

    def seed_step(self, seed: int, step: int) -> None:
        """Several ranks: the backend generator (dropout) seeded from (seed, rank, step),
        so ranks draw different masks and a resumed run draws the same ones."""
        if self.size > 1:
            backend.seed(int(np.random.SeedSequence([seed, self.rank, step])
                             .generate_state(1)[0]))

    def shard(self, batch: dict) -> dict:
        """This rank's rows of a global ``batch`` (a dict of arrays, rows first)."""
        if self.size == 1:
            return batch
        custom = getattr(self._objective, "shard_batch", None)
        if custom is not None:
            return custom(batch, self.rank, self.size)
        rows = _batch_rows(batch)
        lo, hi = _rows(rows, self.rank, self.size)
        return {k: (v[lo:hi] if hasattr(v, "shape") and v.ndim and len(v) == rows else v)
                for k, v in batch.items()}

    def combine(self, values: list, metrics=None) -> list:
        """``values`` (floats) summed over the ranks, and ``metrics`` (a MetricsMean:
        its sums and weights) summed in place; one small all-reduce."""
        if self.size == 1:
            return values
        names = sorted(metrics.sums) if metrics is not None else []
        vector = np.array([*values, *(metrics.sums[n] for n in names),
                           *(metrics.weights[n] for n in names)], np.float64)
        out = self.comm.all_reduce(vector)
        k = len(values)
        for i, n in enumerate(names):
            metrics.sums[n], metrics.weights[n] = float(out[k + i]), float(out[k + len(names) + i])
        return [float(v) for v in out[:k]]

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank (a stop request: every rank stops at the
        same step)."""
        if self.size == 1:
            return bool(flag)
        return bool(self.comm.all_reduce(np.array([1 if flag else 0], np.int64), "max")[0])

    def reduce_gradients(self, params: list) -> None:
        """Sum the gradients of ``params`` over the ranks (ZeRO-1: into this rank's
        shard). A parameter no rank has a gradient for keeps none."""
        if self.size == 1:
            return
        if self._zero_opt is not None:
            self._zero_opt.reduce_gradients()
            return
        used = set()
        for bucket in self._buckets(agree_on_gradients(self.comm, params)):
            flat = self._buffer(bucket, used)
            xp = backend.get_array_module(flat)
            xp.concatenate([p.grad.ravel() for p in bucket], out=flat)
            self.comm.all_reduce(flat, out=flat)
            start = 0
            for p in bucket:
                p.grad = flat[start:start + p.grad.size].reshape(p.grad.shape)
                start += p.grad.size

    def _buffer(self, bucket: list, used: set):
        """The flat buffer of ``bucket`` (the one of the previous step, if it had the
        same dtype, device and size: the gradients viewing it then are gone, as
        ``zero_grad`` dropped them); ``used``: the keys this step took already."""
        g = bucket[0].grad
        size = sum(p.grad.size for p in bucket)
        n = 0
        while (g.dtype, backend.device_of(g), size, n) in used:
            n += 1
        key = (g.dtype, backend.device_of(g), size, n)
        used.add(key)
        if key not in self._flat:
            self._flat[key] = backend.get_array_module(g).empty(size, g.dtype)
        return self._flat[key]

    def _buckets(self, params: list) -> list:
        """``params`` (with gradients) in consecutive groups of one dtype and device,
        each at most ``bucket_bytes`` (or one parameter)."""
        buckets, size, kind = [], 0, None
        for p in params:
            this = (p.grad.dtype, backend.device_of(p.grad))
            if not buckets or this != kind or size + p.grad.nbytes > self.bucket_bytes:
                buckets.append([])
                size, kind = 0, this
            buckets[-1].append(p)
            size += p.grad.nbytes
        return buckets

    def unscale(self, scaler, params: list) -> bool:
        """Mixed precision (``scaler``: an ``amp.LossScaler``): the summed gradients
        (ZeRO-1: this rank's shards of them) divided by the loss scale; whether every
        rank found all of them finite (one small all-reduce), so that every rank skips
        or takes the step alike."""
        if not scaler.enabled:
            return True
        finite = (self._zero_opt.unscale(scaler) if self._zero_opt is not None
                  else scaler.unscale(params))
        return not self.any(not finite)  # (tensor parallel: over every rank of the job)

    def clip_grad_norm(self, params: list, max_norm: float) -> float:
        """``clip_grad_norm_`` of the summed gradients (ZeRO-1: of the shards)."""
        if self._zero_opt is not None:
            return self._zero_opt.clip_grad_norm(max_norm)
        from tinylm.optim import clip_grad_norm_

        return clip_grad_norm_(params, max_norm)

    # ------------------------------------------------------------------ checkpoints

    def full_optimizer(self, optimizer):
        """What a checkpoint saves of ``optimizer``: itself, or (ZeRO-1) an object whose
        ``state_dict()`` is the whole state, gathered here from every rank (every rank
        must call this)."""
        if self._zero_opt is None:
            return optimizer
        return _Gathered(self._zero_opt.state_dict())

    def saved(self) -> None:
        """After rank 0 wrote a checkpoint: the ranks go on together."""
        if self.size > 1:
            self.comm.barrier(timeout=setup_timeout())


class _NoMetrics:
    """The metrics log of the ranks other than 0: they write nothing."""

    def append(self, record: dict) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass


class _Gathered:
    """A state dict standing in for the optimizer it was gathered from."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def agree_on_gradients(comm: Comm, params: list) -> list:
    """The ``params`` some rank has a gradient for (one small all-reduce); where this
    rank has none, it gets zeros, so every rank reduces the same arrays."""
    has = np.array([p.grad is not None for p in params], np.int64)
    has = comm.all_reduce(has, "max")
    out = []
    for p, any_grad in zip(params, has):
        if any_grad:
            if p.grad is None:
                p.grad = p.xp.zeros_like(p.data)
            out.append(p)
    return out


def _batch_rows(batch: dict) -> int:
    """How many rows a batch has: its ``ids``' (else its first array's) length."""
    first = batch.get("ids")
    if first is None:
        first = next((v for v in batch.values() if getattr(v, "ndim", 0)), None)
    if first is None:
        raise DistError("a batch without arrays cannot be split over the ranks")
    return len(first)


def _rows(n: int, rank: int, size: int) -> tuple:
    """Rank ``rank``'s rows [lo, hi) of ``n``, as ``np.array_split`` cuts them."""
    base, extra = divmod(n, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)

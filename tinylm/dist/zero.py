"""ZeRO stage 1: AdamW's state sharded over the ranks (Rajbhandari et al., 2020).

The trainable parameters live in one flat buffer (group order, then parameter
order; padded with zeros to a multiple of N), and the model's parameters become
views of it. Rank r owns elements ``[r*S, (r+1)*S)``, ``S = padded / N``: the
pieces of the parameters that fall there. Its AdamW (tinylm's own, unchanged) holds
moments for those pieces only, so each rank's optimizer memory is 1/N of one
process's. A step:

    1. the gradients are copied into a flat buffer and reduce-scattered: rank r gets
       the sum over ranks of its S elements (fixed reduction order: all-reduced in
       rank order instead, every rank holding the whole sum, so the gradient norm is
       computed exactly as one process does);
    2. the global gradient norm: each rank's sum of squares over its pieces, summed
       over the ranks (fixed order: from the whole gradient); clipping scales the
       pieces;
    3. AdamW updates the pieces (views of the flat buffer) in place;
    4. the flat buffer is all-gathered in place, so every rank's model holds the new
       weights.

The buffers (weights, gradients, this rank's summed share) are allocated once;
MPI reads and writes them where they are.

AdamW is element-wise, so a piece of a parameter is updated to the same bits as the
whole parameter would be. ``state_dict()`` gathers the whole state, in the layout
of one process's ``AdamW.state_dict()`` (a checkpoint does not depend on N), and a
``ZeroAdamW`` built from an optimizer holding a loaded state keeps its share of it.
"""

from __future__ import annotations

import math

import numpy as np

from tinylm import backend
from tinylm.dist.comm import Comm, DistError
from tinylm.dist.data_parallel import agree_on_gradients
from tinylm.nn.module import Parameter
from tinylm.optim import AdamW, clip_grad_norm_


class ZeroAdamW:
    """``optimizer`` (an AdamW, possibly holding a loaded state) sharded over ``comm``'s
    ranks; the model's parameters are rebound to views of the flat buffer. Has what
    the Trainer uses of an optimizer: ``param_groups`` (set_lr), ``zero_grad``,
    ``step``, ``state_dict`` / ``load_state_dict``; and ``reduce_gradients``,
    ``clip_grad_norm``, ``state_bytes`` (this rank's moments)."""

    def __init__(self, optimizer: AdamW, comm: Comm):
        if not isinstance(optimizer, AdamW):
            raise DistError(f"ZeRO-1 shards AdamW, not {type(optimizer).__name__}")
        self.comm, self.groups = comm, optimizer.param_groups
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        kinds = {(p.dtype, p.device) for p in self.params}
        if len(kinds) != 1:
            raise DistError(f"ZeRO-1 needs every trainable parameter of one dtype on one "
                            f"device, got {sorted(map(str, kinds))}")
        xp, dtype = self.params[0].xp, self.params[0].dtype
        self.offsets = np.cumsum([0] + [p.size for p in self.params])
        self.shard = -(-int(self.offsets[-1]) // comm.size)
        self.lo, self.hi = comm.rank * self.shard, (comm.rank + 1) * self.shard
        self.flat = xp.zeros(self.shard * comm.size, dtype)
        self.flat_grad = xp.zeros_like(self.flat)
        self.mine = xp.zeros(self.shard, dtype)  # this rank's summed gradient elements
        for p, start in zip(self.params, self.offsets):
            self.flat[start:start + p.size] = p.data.ravel()
            p.data = self.flat[start:start + p.size].reshape(p.shape)
        self.pieces = self._make_pieces()
        self.inner = AdamW(self._piece_groups(), lr=self.groups[0]["lr"])
        self._adopt(optimizer.state)

    def _make_pieces(self) -> list:
        """(index of the parameter, start, end within it, Parameter viewing the flat
        buffer) for every parameter overlapping this rank's elements."""
        pieces = []
        for i, p in enumerate(self.params):
            a, b = max(int(self.offsets[i]), self.lo), min(int(self.offsets[i + 1]), self.hi)
            if a < b:
                start = a - int(self.offsets[i])
                pieces.append((i, start, start + b - a, Parameter(self.flat[a:b])))
        return pieces

    def _piece_groups(self) -> list:
        owner = {id(p): g for g, group in enumerate(self.groups) for p in group["params"]}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": []}
                  for g in self.groups]
        for i, _, _, piece in self.pieces:
            groups[owner[id(self.params[i])]]["params"].append(piece)
        return groups

    @property
    def param_groups(self) -> list:
        return self.inner.param_groups

    @property
    def full_param_groups(self) -> list:
        """The groups of the parameters this optimizer shards (whole parameters, the
        order of ``state_dict()``'s indices)."""
        return self.groups

    # ------------------------------------------------------------------ a step

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        self.inner.zero_grad()

    def reduce_gradients(self) -> None:
        """Step 1: this rank's pieces get the gradients summed over the ranks."""
        with_grad = {id(p) for p in agree_on_gradients(self.comm, self.params)}
        for p, start in zip(self.params, self.offsets):
            if id(p) in with_grad:
                self.flat_grad[start:start + p.size] = p.grad.ravel()
        if self.comm.fixed_order:
            self.comm.all_reduce(self.flat_grad, out=self.flat_grad)
            mine = self.flat_grad[self.lo:self.hi]
            for p, start in zip(self.params, self.offsets):  # the whole sum, for the norm
                if id(p) in with_grad:
                    p.grad = self.flat_grad[start:start + p.size].reshape(p.shape)
        else:
            mine = self.comm.reduce_scatter(self.flat_grad, out=self.mine)
        for i, a, b, piece in self.pieces:
            start = int(self.offsets[i]) + a - self.lo
            piece.grad = mine[start:start + b - a] if id(self.params[i]) in with_grad else None

    def unscale(self, scaler) -> bool:
        """Mixed precision: this rank's summed gradients divided by ``scaler``'s scale
        (fixed order: the whole ones too, which the norm is taken from); whether they
        are all finite, on this rank only (the caller agrees over the ranks)."""
        finite = scaler.unscale([piece for _, _, _, piece in self.pieces])
        if self.comm.fixed_order:
            finite = scaler.unscale(self.params) and finite
        return finite

    def local_squares(self, kind=None, kinds: int = 1) -> np.ndarray:
        """The sums of squares of this rank's pieces' gradients (float64), by
        ``kind(parameter index)`` in ``range(kinds)`` (default: one sum)."""
        out = np.zeros(kinds, np.float64)
        for i, _, _, piece in self.pieces:
            if piece.grad is not None:
                g = piece.grad.astype(np.result_type(piece.dtype, np.float32), copy=False)
                out[0 if kind is None else kind(i)] += float(g @ g)
        return out

    def grad_norm(self) -> float:
        """The global L2 norm of the summed gradients, the same on every rank."""
        if self.comm.fixed_order:
            return clip_grad_norm_(self.params, math.inf)  # exactly one process's norm
        return math.sqrt(float(self.comm.all_reduce(self.local_squares())[0]))

    def clip_grad_norm(self, max_norm: float, norm=None) -> float:
        """Step 2: the global L2 norm of the summed gradients (returned; ``norm()``
        computes it, default ``grad_norm``), and the pieces scaled by max_norm /
        (norm + 1e-6) when that is below 1 (as ``clip_grad_norm_``). A non-finite norm
        is returned and nothing is scaled."""
        total = (norm or self.grad_norm)()
        coef = max_norm / (total + 1e-6)
        if math.isfinite(total) and coef < 1.0:
            for _, _, _, piece in self.pieces:
                if piece.grad is not None:
                    piece.grad = piece.grad * coef
        return total

    def step(self) -> None:
        """Steps 3 and 4: update this rank's pieces, then gather every rank's."""
        self.inner.step()
        self.comm.all_gather_in_place(self.flat)

    # ------------------------------------------------------------------ state

    def state_bytes(self) -> int:
        """The bytes of this rank's AdamW moments."""
        return sum(v.nbytes for s in self.inner.state.values() for v in s.values()
                   if hasattr(v, "nbytes"))

    def state_dict(self) -> dict:
        """The whole optimizer state, gathered (every rank must call it), in the
        layout of ``AdamW.state_dict()`` over the original parameters."""
        names = [n for n in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
                 if any(n in s for s in self.inner.state.values())]
        steps = np.zeros(len(self.params), np.int64)
        shards = {n: np.zeros(self.shard, self.flat.dtype) for n in names}
        for i, a, b, piece in self.pieces:
            s = self.inner.state.get(piece)
            if s is None:
                continue
            steps[i] = s["step"]
            start = int(self.offsets[i]) + a - self.lo
            for n in names:
                shards[n][start:start + b - a] = backend.to_numpy(s[n])
        steps = self.comm.all_reduce(steps, "max")
        full = {n: self.comm.all_gather(shards[n]) for n in names}
        state = {}
        for i, p in enumerate(self.params):
            if steps[i]:
                lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
                state[i] = {"step": int(steps[i]),
                            **{n: full[n][lo:hi].reshape(p.shape).copy() for n in names}}
        index = {id(p): i for i, p in enumerate(self.params)}
        groups = [{**{k: v for k, v in inner.items() if k != "params"},
                   "params": [index[id(p)] for p in g["params"]]}
                  for g, inner in zip(self.groups, self.inner.param_groups)]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Take this rank's share of a whole state (``AdamW.state_dict()`` layout)."""
        full = AdamW([{"params": g["params"]} for g in self.groups])
        full.load_state_dict(state_dict)
        for group, inner in zip(full.param_groups, self.inner.param_groups):
            inner.update({k: v for k, v in group.items() if k != "params"})
        self._adopt(full.state)

    def _adopt(self, state: dict) -> None:
        """This rank's pieces of a whole optimizer's per-parameter ``state``."""
        self.inner.state = {}
        for i, a, b, piece in self.pieces:
            s = state.get(self.params[i])
            if s is not None:
                self.inner.state[piece] = {
                    k: (v if k == "step" else
                        piece.xp.ascontiguousarray(v.reshape(-1)[a:b]).copy())
                    for k, v in s.items()}

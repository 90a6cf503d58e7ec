"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019): one model's matrices split
across the T ranks of a group, each rank computing its slice of every layer.

    comm = dist.world().split(color=rank // T)       # the T ranks of one model copy
    y = ColumnParallelLinear(d, 4 * d // T, comm)(x)  # this rank's 4d/T output features
    z = RowParallelLinear(4 * d // T, d, comm)(act(y))  # summed over the ranks: (.., d)

The two conjugate functions of the paper, and where they go:

    f  copy_to_group      forward: identity          backward: all-reduce (sum)
    g  reduce_from_group  forward: all-reduce (sum)   backward: identity

A column-parallel Linear (weight rows = output features split) reads a replicated
input through f: every rank's input gradient is only its slice's part, and f's
backward sums them. A row-parallel Linear (weight columns = input features split)
reads the column-parallel output as it is and ends with g: each rank's product is a
partial sum of the full one. A transformer block then costs two all-reduces forward
and two backward (one pair per attention, one per MLP), and its activations between
f and g are 1/T of the whole:

    attention  x -> f -> qkv (column: this rank's q, k, v heads) -> attention over
               the local heads -> out (row) -> g
    MLP        x -> f -> gate, up (column) -> act -> down (row) -> g

The vocabulary is split too: the embedding rows (``VocabParallelEmbedding``: each
rank looks up the ids it holds, zeros elsewhere, then g) and the LM head's rows (a
column-parallel Linear: logits (.., V/T)), and the cross-entropy is computed from the
logit slices without ever gathering (B, T, V) (``vocab_parallel_cross_entropy``:
one all-reduce of the row maxima, one of the exp-sums and target logits). A
vocabulary that T does not divide is padded to a multiple of T with rows that no id
reaches and no probability goes to.

How each parameter is cut is a ``Split``, kept beside the layer that holds the
shard, so that the full parameter can be rebuilt from the shards (checkpoints stay
full-model: ``tinylm.dist.tp_model``). Norms, position embeddings and the biases
added after g are replicated: every rank holds the whole, and, because f and g make
their inputs and gradients equal on every rank, gets the same gradient.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from tinylm import amp, backend, ops
from tinylm.errors import TinyLMError
from tinylm.function import Function
from tinylm.nn.attention import NO_SETUP, AttentionSetup, MultiHeadAttention
from tinylm.nn.layers import Linear, skip_init
from tinylm.nn.mlp import MLP
from tinylm.nn.module import Module, Parameter
from tinylm.tensor import Tensor


class TensorParallelError(TinyLMError, ValueError):
    """A model that cannot be split over this many tensor-parallel ranks."""


# --------------------------------------------------------------------------- f, g, gather


class _CopyToGroup(Function):
    """f: the identity forward; the sum of the ranks' gradients backward."""

    def forward(self, xp, x):
        return x

    def backward(self, xp, grad):
        return self.comm.all_reduce(grad)


class _ReduceFromGroup(Function):
    """g: the sum over the ranks forward; the identity backward."""

    def forward(self, xp, x):
        return self.comm.all_reduce(x)

    def backward(self, xp, grad):
        return grad


class _GatherLastAxis(Function):
    """Every rank's (.., k) concatenated into (.., T k) in rank order; backward keeps
    this rank's slice of the gradient (the others' slices are theirs)."""

    def forward(self, xp, x):
        self.k = x.shape[-1]
        return self.comm.all_gather(x, axis=-1)

    def backward(self, xp, grad):
        r, k = self.comm.rank, self.k
        return xp.ascontiguousarray(grad[..., r * k:(r + 1) * k])


def copy_to_group(x, comm):
    """f (see the module docstring); one rank: ``x`` itself."""
    return x if comm.size == 1 else _CopyToGroup.apply(x, comm=comm)


def reduce_from_group(x, comm):
    """g (see the module docstring); one rank: ``x`` itself."""
    return x if comm.size == 1 else _ReduceFromGroup.apply(x, comm=comm)


def gather_last_axis(x, comm):
    """The ranks' last-axis slices, concatenated (differentiable)."""
    return x if comm.size == 1 else _GatherLastAxis.apply(x, comm=comm)


# --------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class Split:
    """How a full parameter is cut over ``size`` ranks: its ``axis`` is made of
    ``sections`` (lengths along it, e.g. the fused qkv's q, k and v rows); each section
    is cut into ``size`` equal blocks (zero-padded to a multiple of ``size`` first) and
    rank r holds block r of every section, in section order.

        Split(0, (6,)).shard(np.arange(6), rank=1, size=2)        # [3, 4, 5]
        Split(0, (4, 2, 2)).shard(np.arange(8), rank=1, size=2)   # [2, 3, 5, 7]
        Split(0, (5,)).shard(np.arange(5), rank=1, size=2)        # [3, 4, 0]: padded
    """

    axis: int
    sections: tuple

    def blocks(self, size: int) -> tuple:
        """Each section's block length per rank."""
        return tuple(-(-s // size) for s in self.sections)

    def shard(self, full, rank: int, size: int):
        """Rank ``rank``'s shard of ``full`` (a new C-contiguous array)."""
        xp = backend.get_array_module(full)
        full = xp.moveaxis(full, self.axis, 0)
        parts, offset = [], 0
        for s, b in zip(self.sections, self.blocks(size)):
            lo, hi = offset + min(rank * b, s), offset + min((rank + 1) * b, s)
            part = full[lo:hi]
            if hi - lo < b:  # the padding of the last blocks
                pad = xp.zeros((b - (hi - lo),) + full.shape[1:], dtype=full.dtype)
                part = xp.concatenate([part, pad])
            parts.append(part)
            offset += s
        return xp.ascontiguousarray(xp.moveaxis(xp.concatenate(parts), 0, self.axis))

    def unshard(self, gathered, size: int):
        """The full array from the ``size`` shards concatenated along ``axis`` in rank
        order (what ``Comm.all_gather(shard, axis=axis)`` returns); padding dropped."""
        xp = backend.get_array_module(gathered)
        g = xp.moveaxis(gathered, self.axis, 0)
        blocks = self.blocks(size)
        per_rank = g.reshape((size, sum(blocks)) + g.shape[1:])  # (size, local, ...)
        parts, offset = [], 0
        for s, b in zip(self.sections, blocks):
            part = per_rank[:, offset:offset + b].reshape((size * b,) + g.shape[1:])
            parts.append(part[:s])
            offset += b
        return xp.ascontiguousarray(xp.moveaxis(xp.concatenate(parts), 0, self.axis))

    def local_length(self, size: int) -> int:
        return sum(self.blocks(size))


def _shard_parameter(param: Parameter, split: Split | None, comm) -> Parameter:
    """A new Parameter with this rank's shard of ``param`` (all of it when ``split`` is
    None: a replicated parameter), on its device, trainable as it was."""
    data = param.data if split is None else split.shard(param.data, comm.rank, comm.size)
    return Parameter(data.copy() if split is None else data, requires_grad=param.requires_grad)


# --------------------------------------------------------------------------- linear layers


class ColumnParallelLinear(Linear):
    """y_r = f(x) @ W_r.T + b_r: this rank's rows (output features) of a Linear, from
    the full ``linear`` and how its rows are cut (``sections``: e.g. a fused qkv's
    (q, k, v) row counts). ``copy_input=False`` leaves f to the caller (when one
    input feeds several column-parallel Linears, one f serves them all)."""

    def __init__(self, linear: Linear, comm, sections: tuple | None = None,
                 copy_input: bool = True):
        split = Split(0, sections or (linear.out_features,))
        with skip_init():
            super().__init__(linear.in_features, split.local_length(comm.size),
                             bias=linear.bias is not None)
        self.tp_splits = {"weight": split, "bias": split}
        self.comm, self.copy_input = comm, copy_input
        self.weight = _shard_parameter(linear.weight, self.tp_splits["weight"], comm)
        if linear.bias is not None:
            self.bias = _shard_parameter(linear.bias, self.tp_splits["bias"], comm)

    def forward(self, x):
        if self.copy_input:
            x = copy_to_group(x, self.comm)
        return ops.linear(x, self.weight, self.bias)  # (.., out / T)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", column-parallel over {self.comm.size}"


class RowParallelLinear(Linear):
    """y = g(x_r @ W_r.T) + b: this rank's columns (input features) of a Linear; x_r is
    this rank's slice of the input (a column-parallel output). The bias is replicated
    and added once, after the sum."""

    def __init__(self, linear: Linear, comm, sections: tuple | None = None):
        split = Split(1, sections or (linear.in_features,))
        with skip_init():
            super().__init__(split.local_length(comm.size), linear.out_features,
                             bias=linear.bias is not None)
        self.tp_splits = {"weight": split}  # the bias: replicated
        self.comm = comm
        self.weight = _shard_parameter(linear.weight, self.tp_splits["weight"], comm)
        if linear.bias is not None:
            self.bias = _shard_parameter(linear.bias, None, comm)

    def forward(self, x):
        y = reduce_from_group(ops.linear(x, self.weight), self.comm)  # (.., out)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return super().extra_repr() + f", row-parallel over {self.comm.size}"


# --------------------------------------------------------------------------- attention, MLP


def _divides(what: str, n: int, size: int, fix: str) -> None:
    if n % size:
        raise TensorParallelError(f"{what} = {n} cannot be split over {size} tensor-parallel "
                                  f"ranks (it must be a multiple of {size}); {fix}")


class ParallelAttention(MultiHeadAttention):
    """Self-attention over this rank's heads: the fused qkv is column-parallel, cut by
    heads (this rank's q heads, then its k heads, then its v heads: the layout a
    MultiHeadAttention with n_head / T and n_kv_head / T heads expects), ``out`` is
    row-parallel. Grouped-query attention stays right because the kv heads are cut
    the same way: q head i reads kv head i // (n_head / n_kv_head) on every rank."""

    def __init__(self, attn: MultiHeadAttention, comm):
        T, nh, nkv, hs = comm.size, attn.n_head, attn.n_kv_head, attn.head_dim
        if attn.cross:
            raise TensorParallelError("tensor parallel splits self-attention only; "
                                      "cross-attention (encoder-decoder models) is not split")
        _divides("n_head", nh, T, "pick a --tensor-parallel that divides the heads")
        _divides("n_kv_head", nkv, T, "pick a --tensor-parallel that divides the key/value "
                 "heads (multi-query attention has one: it cannot be split)")
        with skip_init():
            super().__init__(attn.qkv.in_features, nh // T, nkv // T, head_dim=hs,
                             bias=attn.qkv.bias is not None, scale=attn.scale,
                             dropout=attn.dropout)
        self.comm, self.full_heads = comm, nh
        self.qkv = ColumnParallelLinear(attn.qkv, comm, (nh * hs, nkv * hs, nkv * hs),
                                        copy_input=False)
        self.out = RowParallelLinear(attn.out, comm)

    def forward(self, x, setup: AttentionSetup = NO_SETUP):
        return super().forward(copy_to_group(x, self.comm), self._local(setup))

    def _local(self, setup: AttentionSetup) -> AttentionSetup:
        """The setup with per-head parts (ALiBi's slopes, a position bias in the mask)
        cut to this rank's heads; masks shared by the heads pass unchanged."""
        if self.comm.size == 1:
            return setup
        lo, hi = self.comm.rank * self.n_head, (self.comm.rank + 1) * self.n_head
        changes = {}
        if setup.alibi_slopes is not None:
            changes["alibi_slopes"] = setup.alibi_slopes[lo:hi]
        mask = setup.mask
        if mask is not None and mask.ndim == 4 and mask.shape[1] == self.full_heads > 1:
            if isinstance(mask, Tensor) and mask.requires_grad:
                raise TensorParallelError("a learned position bias (T5's) is not split by "
                                          "tensor parallel; use learned, rope or alibi")
            changes["mask"] = mask[:, lo:hi]  # (B|1, H/T, T, S)
        return dataclasses.replace(setup, **changes) if changes else setup


class ParallelMLP(MLP):
    """The feed-forward with its hidden layer split: up (and gate) column-parallel,
    down row-parallel; one f for both input projections."""

    def __init__(self, mlp: MLP, comm):
        d_ff = mlp.up.out_features
        _divides("d_ff", d_ff, comm.size, "pick a --tensor-parallel that divides d_ff "
                 "(or set d_ff)")
        with skip_init():
            super().__init__(mlp.up.in_features, d_ff // comm.size, mlp.act_name, mlp.gated,
                             bias=mlp.up.bias is not None, dropout=mlp.drop.p)
        self.comm = comm
        if mlp.gated:
            self.gate = ColumnParallelLinear(mlp.gate, comm, copy_input=False)
        self.up = ColumnParallelLinear(mlp.up, comm, copy_input=False)
        self.down = RowParallelLinear(mlp.down, comm)

    def forward(self, x):
        return super().forward(copy_to_group(x, self.comm))


# --------------------------------------------------------------------------- vocabulary


class _LocalRows(Function):
    """weight_r[ids - start] for the ids this rank holds, 0 for the others; backward
    scatter-adds the rows this rank holds."""

    def forward(self, xp, ids, weight):
        local = ids - self.start
        own = (local >= 0) & (local < self.n_valid)  # (ids.shape)
        out = weight[xp.where(own, local, 0)]  # (*ids.shape, D), fresh
        out[~own] = 0
        self.local, self.own, self.shape, self.dtype = local, own, weight.shape, weight.dtype
        return out

    def backward(self, xp, grad):
        gw = xp.zeros(self.shape, dtype=self.dtype)
        own = self.own.ravel()
        rows = grad.reshape(-1, self.shape[1])[own]
        backend.scatter_add(gw, self.local.ravel()[own], rows)
        return None, gw


class VocabParallelEmbedding(Module):
    """Token embedding with its rows (the vocabulary) split: rank r holds ids
    [r k, (r + 1) k), k = ceil(V / T); each rank looks up its own ids (zeros for the
    rest) and g sums the ranks' lookups into the full (.., d)."""

    def __init__(self, embedding, comm):
        super().__init__()
        V = embedding.num_embeddings
        self.tp_splits = {"weight": Split(0, (V,))}
        self.num_embeddings, self.embedding_dim, self.comm = V, embedding.embedding_dim, comm
        self.rows = self.tp_splits["weight"].local_length(comm.size)
        self.start = comm.rank * self.rows
        self.n_valid = max(0, min(self.rows, V - self.start))  # < rows on a padded rank
        self.weight = _shard_parameter(embedding.weight, self.tp_splits["weight"], comm)

    def forward(self, ids):
        xp = self.weight.xp
        ids = xp.asarray(ids.data if isinstance(ids, Tensor) else ids)
        if ids.dtype.kind not in "iu":
            raise TinyLMError(f"embedding ids must be integers, got {ids.dtype}")
        if ids.size and bool(((ids < 0) | (ids >= self.num_embeddings)).any()):
            raise TinyLMError(f"embedding: an id is outside [0, {self.num_embeddings}), the "
                              f"table's rows; check the tokenizer's vocabulary size against "
                              f"the model's")
        mine = _LocalRows.apply(ids, self.weight, start=self.start, n_valid=self.n_valid)
        return reduce_from_group(mine, self.comm)  # (*ids.shape, d)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, rows {self.start}.."
                f"{self.start + self.n_valid - 1} of {self.comm.size} ranks")


class VocabParallelHead(ColumnParallelLinear):
    """The LM head with its rows (the vocabulary) split: f(h) @ W_r.T -> this rank's
    logits (.., k); ``gather`` makes the full (.., V), ``loss`` the cross-entropy
    without gathering. Tied to a ``VocabParallelEmbedding``: the same shard."""

    def __init__(self, linear: Linear, comm):
        super().__init__(linear, comm)
        V, k = linear.out_features, self.out_features
        self.vocab_size, self.start = V, comm.rank * k
        self.n_valid = max(0, min(k, V - self.start))

    def gather(self, logits):
        """(.., k) on each rank -> (.., V) on every rank (padding dropped)."""
        full = gather_last_axis(logits, self.comm)
        if full.shape[-1] == self.vocab_size:
            return full
        return full[..., :self.vocab_size]

    def loss(self, logits, targets, ignore_index: int = -100):
        """The mean cross-entropy over the targets that are not ``ignore_index``."""
        return vocab_parallel_cross_entropy(logits, targets, self.comm, self.start,
                                            self.n_valid, self.vocab_size, ignore_index)


class _VocabParallelCrossEntropy(Function):
    """Softmax cross-entropy of logits split along the vocabulary.

    Rank r holds x_r (N, k), the logits of ids start .. start + n_valid - 1 (columns
    past n_valid are padding). With m = max over all ranks and S = sum over all
    ranks of sum(exp(x_r - m)), the loss of row i is log S + m - x[i, t_i], where the
    target's logit comes from the one rank that holds t_i (the others add 0): two
    all-reduces, a max and one sum of (S_r, target logit) stacked. The gradient,
    softmax - one-hot, is this rank's slice alone: backward needs no communication
    (the LM head's f sums the hidden state's gradient)."""

    def forward(self, xp, logits, targets):
        k = logits.shape[-1]
        x = logits.reshape(-1, k)[:, :self.n_valid]  # (N, n_valid)
        t = targets.reshape(-1)
        local_max = x.max(axis=-1) if self.n_valid else xp.full(t.shape, -np.inf, x.dtype)
        m = self.comm.all_reduce(xp.ascontiguousarray(local_max), "max")  # (N,)
        e = xp.exp(x - m[:, None])  # (N, n_valid)
        valid = t != self.ignore_index
        local_t = t - self.start
        own = valid & (local_t >= 0) & (local_t < self.n_valid)
        rows = xp.arange(t.shape[0])
        picked = x[rows, xp.where(own, local_t, 0)] if self.n_valid else xp.zeros_like(m)
        sums = xp.stack([e.sum(axis=-1), xp.where(own, picked, 0)])  # (2, N)
        total, target_logit = self.comm.all_reduce(sums)
        e /= total[:, None]  # this rank's softmax slice
        nll = (xp.log(total) + m - target_logit) * valid
        self.p, self.own, self.local_t, self.valid, self.k = e, own, local_t, valid, k
        self.count = valid.sum().astype(nll.dtype)
        self.logits_shape = logits.shape
        return nll.sum() / self.count

    def backward(self, xp, grad):
        g = xp.zeros((self.p.shape[0], self.k), dtype=self.p.dtype)  # padding: 0
        g[:, :self.p.shape[1]] = self.p
        rows = xp.flatnonzero(self.own)
        g[rows, self.local_t[rows]] -= 1
        g *= ((grad / self.count) * self.valid[:, None]).astype(g.dtype, copy=False)
        return g.reshape(self.logits_shape), None


def vocab_parallel_cross_entropy(logits, targets, comm, start: int, n_valid: int,
                                 vocab_size: int, ignore_index: int = -100):
    """The mean cross-entropy (as ``ops.cross_entropy``) of logits (.., k) that are
    this rank's slice [start, start + n_valid) of a ``vocab_size`` vocabulary (columns
    past n_valid are padding) against the full-vocabulary ``targets`` (..); targets
    equal to ``ignore_index`` are left out."""
    logits = amp.float32_if_half(logits)
    xp = logits.xp
    targets = xp.asarray(targets.data if isinstance(targets, Tensor) else targets)
    if targets.shape != logits.shape[:-1]:
        raise TinyLMError(f"cross_entropy: targets {targets.shape} must equal logits "
                          f"{logits.shape} without the last (class) axis")
    safe = xp.where(targets == ignore_index, 0, targets)
    if bool(((safe < 0) | (safe >= vocab_size)).any()):
        raise TinyLMError(f"cross_entropy: a target is outside [0, {vocab_size}) and not "
                          f"ignore_index")
    return _VocabParallelCrossEntropy.apply(logits, targets, comm=comm, start=start,
                                            n_valid=n_valid, ignore_index=ignore_index)


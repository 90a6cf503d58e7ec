"""Mixture-of-Experts feed-forward: a router sends each token to its top-k experts.

    moe = MoE(MoEConfig(d_model=64, d_ff=128, n_experts=8, top_k=2))   # SwiGLU experts
    y, aux = moe(x)                      # x, y: (B, T, d); aux: the load-balancing loss

Routing (Mixtral; Switch Transformer when k = 1): p = softmax(router(x)) over the E
experts; each token goes to its k most probable experts and its output is the sum of
their outputs weighted by p (renormalised over the chosen k when ``renormalize``, as
Mixtral does; Switch uses the raw p).

Dispatch without a loop over tokens: the N*k (token, expert) assignments are sorted by
expert, the tokens gathered in that order with one indexing op, cut into one
contiguous chunk per expert (``split``), each chunk run through its expert (a loop
over the E experts, not the tokens), and the outputs put back in token order with one
more gather before the weighted sum. Gradients flow through the gathers (scatter-adds
backward) and through the gate weights into the router.

Load balancing (Switch Transformer, Fedus et al. 2021, eq. 4; Hugging Face's
``load_balancing_loss_func`` for k > 1):

    aux = E * sum_e f_e * P_e
    f_e = (number of assignments to expert e) / N     (k per token; not differentiable)
    P_e = mean over tokens of p_e                     (differentiable)

It is k when routing is perfectly uniform (1 for Switch) and grows as the router
favours some experts. A padding mask leaves padded tokens out of both averages.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tinylm import ops
from tinylm.errors import TinyLMError
from tinylm.nn.layers import Linear, ModuleList
from tinylm.nn.mlp import ACTIVATIONS, MLP
from tinylm.nn.module import Module
from tinylm.tensor import Tensor


def load_balancing_loss(probs, selected, n_experts: int, mask=None):
    """E * sum_e f_e * P_e for router probabilities ``probs`` (N, E) (a Tensor) and the
    chosen experts ``selected`` (N, k) (integers); ``mask`` (N,) of 1/0 drops tokens.

        >>> p = Tensor(np.array([[0.7, 0.3], [0.6, 0.4]], np.float32))
        >>> round(load_balancing_loss(p, np.array([[0], [0]]), 2).item(), 6)  # 2*(1*.65 + 0*.35)
        1.3
    """
    xp = probs.xp
    selected = xp.asarray(selected)
    N, k = selected.shape
    if mask is None:
        weights, total = None, N
        P = ops.mean(probs, axis=0)  # (E,)
    else:
        m = xp.asarray(mask, dtype=probs.dtype).reshape(N)  # (N,)
        weights, total = xp.repeat(m, k), float(m.sum())
        if total == 0:
            raise TinyLMError("load_balancing_loss: the mask leaves no token")
        P = ops.sum(probs * m[:, None], axis=0) / total  # (E,)
    f = xp.bincount(selected.reshape(-1), weights=weights, minlength=n_experts) / total  # (E,)
    return (P * f.astype(probs.dtype)).sum() * n_experts


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """A mixture of ``n_experts`` MLPs (d_model -> d_ff -> d_model), ``top_k`` per token.
    ``dropout`` acts inside each expert (as ``MLP``'s); ``renormalize``: the chosen
    experts' gate weights sum to 1 (Mixtral), else they are the raw router probabilities
    (Switch)."""

    d_model: int
    d_ff: int
    n_experts: int
    top_k: int = 2
    activation: str = "silu"
    gated: bool = True
    bias: bool = False
    renormalize: bool = True
    dropout: float = 0.0

    def __post_init__(self):
        if not 1 <= self.top_k <= self.n_experts:
            raise TinyLMError(f"MoE: top_k={self.top_k} must be between 1 and "
                              f"n_experts={self.n_experts}")
        if self.activation not in ACTIVATIONS:
            raise TinyLMError(f"MoE: unknown activation {self.activation!r}; expected one "
                              f"of {ACTIVATIONS}")


class MoE(Module):
    """A router (d -> E, no bias) and E expert MLPs; forward returns (y, aux_loss)."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        c = self.config = config
        self.n_experts, self.top_k, self.renormalize = c.n_experts, c.top_k, c.renormalize
        self.router = Linear(c.d_model, c.n_experts, bias=False)
        self.experts = ModuleList(
            MLP(c.d_model, c.d_ff, c.activation, gated=c.gated, bias=c.bias, dropout=c.dropout)
            for _ in range(c.n_experts)
        )

    def forward(self, x, mask=None):
        """x (B, T, d) -> (y (B, T, d), aux); ``mask`` (B, T) 1 = token, 0 = padding
        (padding is still routed, but does not count in the load-balancing loss)."""
        B, T, C = x.shape
        N, E, k = B * T, self.n_experts, self.top_k
        xf = x.reshape(N, C)  # (N, C)
        probs = ops.softmax(self.router(xf), axis=-1)  # (N, E)
        xp = probs.xp
        top = xp.argsort(-probs.data, axis=-1, kind="stable")[:, :k]  # (N, k) best first
        w = probs[xp.arange(N)[:, None], top]  # (N, k) gate weights
        if self.renormalize and k > 1:
            w = w / w.sum(axis=-1, keepdims=True)
        # Dispatch: assignments sorted by expert, tokens gathered in that order.
        order = xp.argsort(top.reshape(-1), kind="stable")  # (N*k,) assignment ids
        counts = xp.bincount(top.reshape(-1), minlength=E).tolist()  # tokens per expert
        chunks = xf[order // k].split(counts, axis=0)  # E x (n_e, C)
        outs = [expert(chunk) for expert, chunk, n in zip(self.experts, chunks, counts) if n]
        y = ops.concat(outs, axis=0) if len(outs) > 1 else outs[0]  # (N*k, C) by expert
        inverse = xp.empty_like(order)
        inverse[order] = xp.arange(N * k)
        y = y[inverse].reshape(N, k, C)  # (N, k, C) back in token order
        y = (y * w.reshape(N, k, 1)).sum(axis=1)  # (N, C)
        aux = load_balancing_loss(probs, top, E, None if mask is None else _flat(mask, N))
        return y.reshape(B, T, C), aux  # (B, T, C), scalar

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, top_k={self.top_k}"


def _flat(mask, N):
    data = mask.data if isinstance(mask, Tensor) else mask
    return data.reshape(N)  # (N,)

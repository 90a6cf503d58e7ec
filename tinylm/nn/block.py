"""The transformer block: attention, optional cross-attention, feed-forward, each with a
residual connection and a norm, before (pre-norm) or after (post-norm) it.

    pre-norm  (GPT-2, Llama, T5):  x = x + drop(attn(norm1(x)));  x = x + drop(mlp(norm2(x)))
    post-norm (BERT, the original): x = norm1(x + drop(attn(x)));  x = norm2(x + drop(mlp(x)))

A decoder block of an encoder-decoder model (``cross=True``) has a cross-attention
sub-layer between the two. The feed-forward is an ``MLP`` or, with ``n_experts`` > 0,
a ``MoE``; ``forward`` returns (x, aux) where aux is the MoE's load-balancing loss
(None for a dense block).
"""

from __future__ import annotations

from tinylm.errors import TinyLMError
from tinylm.nn.attention import MultiHeadAttention
from tinylm.nn.layers import Dropout, LayerNorm, RMSNorm
from tinylm.nn.mlp import MLP
from tinylm.nn.moe import MoE
from tinylm.nn.module import Module

NORMS = ("layernorm", "rmsnorm")


def make_norm(kind: str, dim: int, eps: float, bias: bool = True) -> Module:
    """LayerNorm (with or without bias) or RMSNorm (T5's "T5LayerNorm": no mean, no bias)."""
    if kind == "layernorm":
        return LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise TinyLMError(f"unknown norm {kind!r}; expected one of {NORMS}")


class TransformerBlock(Module):
    def __init__(self, d_model: int, n_head: int, d_ff: int, *, n_kv_head: int | None = None,
                 head_dim: int | None = None, activation: str = "gelu", gated: bool = False,
                 bias: bool = True, norm: str = "layernorm", norm_eps: float = 1e-5,
                 norm_position: str = "pre", dropout: float = 0.0, attn_dropout: float = 0.0,
                 attn_scale: float | None = None, cross: bool = False, n_experts: int = 0,
                 top_k: int = 2, renormalize: bool = True, mlp_dropout: float = 0.0):
        super().__init__()
        if norm_position not in ("pre", "post"):
            raise TinyLMError(f"norm_position must be 'pre' or 'post', got {norm_position!r}")
        self.pre = norm_position == "pre"
        heads = dict(n_kv_head=n_kv_head, head_dim=head_dim, bias=bias, scale=attn_scale,
                     dropout=attn_dropout)
        self.norm1 = make_norm(norm, d_model, norm_eps, bias)
        self.attn = MultiHeadAttention(d_model, n_head, **heads)
        self.cross = cross
        if cross:
            self.norm_cross = make_norm(norm, d_model, norm_eps, bias)
            self.cross_attn = MultiHeadAttention(d_model, n_head, cross=True, **heads)
        self.norm2 = make_norm(norm, d_model, norm_eps, bias)
        if n_experts:
            self.mlp = MoE(d_model, d_ff, n_experts, top_k, activation, gated, bias,
                           renormalize, mlp_dropout)
        else:
            self.mlp = MLP(d_model, d_ff, activation, gated, bias, mlp_dropout)
        self.drop = Dropout(dropout)

    def _residual(self, x, norm, fn):
        """x + drop(fn(norm(x))) (pre-norm) or norm(x + drop(fn(x))) (post-norm)."""
        if self.pre:
            return x + self.drop(fn(norm(x)))
        return norm(x + self.drop(fn(x)))

    def forward(self, x, bias=None, is_causal: bool = False, rotate=None, cache=None,
                memory=None, memory_bias=None, token_mask=None, alibi_slopes=None):
        """x (B, T, d) -> (x (B, T, d), aux or None). ``bias``/``is_causal``/``rotate``/
        ``cache``/``alibi_slopes`` go to self-attention; ``memory`` (B, S, d) and
        ``memory_bias`` to cross-attention; ``token_mask`` (B, T) to a MoE's
        load-balancing loss."""
        x = self._residual(x, self.norm1, lambda h: self.attn(
            h, bias=bias, is_causal=is_causal, rotate=rotate, cache=cache,
            alibi_slopes=alibi_slopes))
        if self.cross:
            x = self._residual(x, self.norm_cross, lambda h: self.cross_attn(
                h, memory=memory, bias=memory_bias, cache=cache))
        aux = None
        if isinstance(self.mlp, MoE):
            def moe(h):
                nonlocal aux
                y, aux = self.mlp(h, mask=token_mask)
                return y
            x = self._residual(x, self.norm2, moe)
        else:
            x = self._residual(x, self.norm2, self.mlp)
        return x, aux

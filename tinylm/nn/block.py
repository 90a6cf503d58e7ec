"""The transformer block: attention, optional cross-attention, feed-forward, each with a
residual connection and a norm, before (pre-norm) or after (post-norm) it.

    pre-norm  (GPT-2, Llama, T5):  x = x + drop(attn(norm1(x)));  x = x + drop(mlp(norm2(x)))
    post-norm (BERT, the original): x = norm1(x + drop(attn(x)));  x = norm2(x + drop(mlp(x)))

    block = TransformerBlock(BlockConfig(d_model=64, n_head=4, d_ff=256))

A decoder block of an encoder-decoder model (``cross=True``) has a cross-attention
sub-layer between the two. The feed-forward is an ``MLP`` or, with ``n_experts`` > 0,
a ``MoE``; ``forward`` returns (x, aux) where aux is the MoE's load-balancing loss
(None for a dense block).
"""

from __future__ import annotations

from dataclasses import dataclass

from tinylm.errors import TinyLMError
from tinylm.nn.attention import NO_SETUP, AttentionSetup, MultiHeadAttention
from tinylm.nn.layers import Dropout, LayerNorm, RMSNorm
from tinylm.nn.mlp import ACTIVATIONS, MLP
from tinylm.nn.moe import MoE, MoEConfig
from tinylm.nn.module import Module

# The one list of norms and of their places: model configs check against these too.
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")


def make_norm(kind: str, dim: int, eps: float, bias: bool = True) -> Module:
    """LayerNorm (with or without bias) or RMSNorm (T5's "T5LayerNorm": no mean, no bias)."""
    if kind == "layernorm":
        return LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise TinyLMError(f"unknown norm {kind!r}; expected one of {NORMS}")


@dataclass(frozen=True, kw_only=True)
class BlockConfig:
    """Everything one ``TransformerBlock`` is built from (``tinylm.models.base`` makes it
    from a model config once per stack). A new switch is a field here and a line in
    the block that reads it.

    ``n_kv_head`` / ``head_dim`` None: n_head and d_model / n_head. ``attn_scale`` None:
    1 / sqrt(head_dim). ``dropout`` acts on the residual branches, ``attn_dropout`` on
    the attention probabilities, ``mlp_dropout`` inside the feed-forward. ``cross``
    adds cross-attention (a decoder block of an encoder-decoder). ``n_experts`` > 0
    makes the feed-forward a mixture of experts (``moe``).
    """

    d_model: int
    n_head: int
    d_ff: int
    n_kv_head: int | None = None
    head_dim: int | None = None
    activation: str = "gelu"
    gated: bool = False
    bias: bool = True
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_position: str = "pre"
    dropout: float = 0.0
    attn_dropout: float = 0.0
    mlp_dropout: float = 0.0
    attn_scale: float | None = None
    cross: bool = False
    n_experts: int = 0
    moe_top_k: int = 2
    moe_renormalize: bool = True

    def __post_init__(self):
        problems = []
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.norm not in NORMS:
            problems.append(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.norm_position not in NORM_POSITIONS:
            problems.append(f"norm_position must be one of {NORM_POSITIONS}, got "
                            f"{self.norm_position!r}")
        if self.n_experts < 0 or (self.n_experts and not 1 <= self.moe_top_k <= self.n_experts):
            problems.append(f"moe_top_k={self.moe_top_k} must be between 1 and n_experts="
                            f"{self.n_experts}")
        if problems:
            raise TinyLMError("invalid BlockConfig: " + "; ".join(problems))

    @property
    def moe(self) -> MoEConfig | None:
        """The feed-forward's MoEConfig, or None for a dense MLP."""
        if not self.n_experts:
            return None
        return MoEConfig(d_model=self.d_model, d_ff=self.d_ff, n_experts=self.n_experts,
                         top_k=self.moe_top_k, activation=self.activation, gated=self.gated,
                         bias=self.bias, renormalize=self.moe_renormalize,
                         dropout=self.mlp_dropout)


class TransformerBlock(Module):
    def __init__(self, config: BlockConfig):
        super().__init__()
        c = self.config = config
        self.pre = c.norm_position == "pre"
        heads = dict(n_kv_head=c.n_kv_head, head_dim=c.head_dim, bias=c.bias,
                     scale=c.attn_scale, dropout=c.attn_dropout)
        self.norm1 = make_norm(c.norm, c.d_model, c.norm_eps, c.bias)
        self.attn = MultiHeadAttention(c.d_model, c.n_head, **heads)
        self.cross = c.cross
        if c.cross:
            self.norm_cross = make_norm(c.norm, c.d_model, c.norm_eps, c.bias)
            self.cross_attn = MultiHeadAttention(c.d_model, c.n_head, cross=True, **heads)
        self.norm2 = make_norm(c.norm, c.d_model, c.norm_eps, c.bias)
        if c.moe is not None:
            self.mlp = MoE(c.moe)
        else:
            self.mlp = MLP(c.d_model, c.d_ff, c.activation, c.gated, c.bias, c.mlp_dropout)
        self.drop = Dropout(c.dropout)

    def _residual(self, x, norm, fn):
        """x + drop(fn(norm(x))) (pre-norm) or norm(x + drop(fn(x))) (post-norm)."""
        if self.pre:
            return x + self.drop(fn(norm(x)))
        return norm(x + self.drop(fn(x)))

    def forward(self, x, setup: AttentionSetup = NO_SETUP):
        """x (B, T, d) -> (x (B, T, d), aux or None). ``setup`` (one per forward, shared
        by every block): the attention setup, and ``setup.token_mask`` for a MoE's
        load-balancing loss."""
        x = self._residual(x, self.norm1, lambda h: self.attn(h, setup))
        if self.cross:
            x = self._residual(x, self.norm_cross, lambda h: self.cross_attn(h, setup))
        aux = None
        if isinstance(self.mlp, MoE):
            def moe(h):
                nonlocal aux
                y, aux = self.mlp(h, mask=setup.token_mask)
                return y
            x = self._residual(x, self.norm2, moe)
        else:
            x = self._residual(x, self.norm2, self.mlp)
        return x, aux

"""The feed-forward half of a transformer block: a plain MLP or a gated one (GLU).

    MLP(d, 4 * d, activation="gelu_tanh")              # GPT-2: down(gelu(up(x)))
    MLP(d, ff, activation="silu", gated=True)          # Llama's SwiGLU: down(silu(gate(x)) * up(x))

Activations by name: "gelu" (exact, erf: BERT), "gelu_tanh" (the tanh approximation:
GPT-2's gelu_new, T5 v1.1's gated-gelu), "relu" (T5), "silu" (Llama's SwiGLU).
"""

from __future__ import annotations

from tinylm import ops
from tinylm.errors import TinyLMError
from tinylm.nn.layers import Dropout, Linear
from tinylm.nn.module import Module

_FUNCTIONS = {
    "gelu": lambda x: ops.gelu(x),
    "gelu_tanh": lambda x: ops.gelu(x, approximate="tanh"),
    "relu": ops.relu,
    "silu": ops.silu,
}
# The one list of activation names: model configs and block configs check against it.
ACTIVATIONS = tuple(_FUNCTIONS)


def get_activation(name: str):
    """The activation function called ``name``."""
    if name not in _FUNCTIONS:
        raise TinyLMError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")
    return _FUNCTIONS[name]


class MLP(Module):
    """x (.., d) -> (.., d) through a hidden layer of ``d_ff``; ``gated`` adds a second
    input projection whose activation multiplies the first (GLU variants: SwiGLU,
    GeGLU). ``dropout`` acts on the hidden layer (T5 does; GPT-2 and BERT do not)."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", gated: bool = False,
                 bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.act_name, self.act = activation, get_activation(activation)
        self.gated = gated
        if gated:
            self.gate = Linear(d_model, d_ff, bias=bias)
        self.up = Linear(d_model, d_ff, bias=bias)
        self.down = Linear(d_ff, d_model, bias=bias)
        self.drop = Dropout(dropout)

    def forward(self, x):
        if self.gated:
            h = self.act(self.gate(x)) * self.up(x)  # (.., d_ff)
        else:
            h = self.act(self.up(x))  # (.., d_ff)
        return self.down(self.drop(h))

    def extra_repr(self) -> str:
        return f"activation={self.act_name!r}" + (", gated" if self.gated else "")

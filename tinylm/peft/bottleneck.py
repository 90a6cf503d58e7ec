"""Bottleneck adapters (Houlsby et al., 2019): a small residual MLP after the attention
and after the feed-forward of each transformer block, the base frozen.

    model = peft.apply(model, "bottleneck", bottleneck_size=16, non_linearity="relu")

Each adapter maps the sub-layer's output h (B, T, d) to

    h + scaling * up(act(down(dropout(h))))       down: d -> bottleneck, up: bottleneck -> d

with ``up`` (weight and bias) initialised to zero, so a fresh adapter is the identity
and the adapted model starts exactly as the base one. Houlsby places it on the
sub-layer's output, before the residual add (and, post-norm, before the norm): here
its hosts are the block's ``attn`` (self-attention) and ``mlp`` (an MLP or a MoE,
whose (y, aux) output keeps its aux loss) modules, which is exactly that place.

``placement`` picks the sub-layers ("attn", "mlp"), ``layers_to_transform`` the block
indices (every stack's blocks are numbered from 0: T5's encoder and decoder both).
A bottleneck adapter is a nonlinear function of the activations: it cannot be merged
into the weights (``merge`` says so).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from tinylm import nn, ops
from tinylm.errors import ConfigError, TinyLMError
from tinylm.peft.base import Adapter, PeftConfig, PeftMethod, install
from tinylm.peft.hosts import cast as _cast
from tinylm.peft.targets import candidate_modules

PLACEMENTS = ("attn", "mlp")
NON_LINEARITIES = {
    "relu": ops.relu, "gelu": ops.gelu, "gelu_tanh": lambda x: ops.gelu(x, approximate="tanh"),
    "silu": ops.silu, "tanh": ops.tanh,
}


@dataclasses.dataclass(frozen=True)
class BottleneckConfig(PeftConfig):
    """``bottleneck_size`` >= 1 hidden units; ``non_linearity`` one of NON_LINEARITIES;
    ``placement`` a subset of ("attn", "mlp"); ``layers_to_transform`` block indices
    (None: every block); ``adapter_dropout`` on the adapter's input; ``scaling`` of its
    output; ``init_weights`` False draws ``up`` at random too (tests: a non-identity
    adapter)."""

    bottleneck_size: int = 64
    non_linearity: str = "relu"
    placement: tuple = PLACEMENTS
    layers_to_transform: tuple | None = None
    adapter_dropout: float = 0.0
    scaling: float = 1.0
    init_weights: bool = True

    aliases = {"r": "bottleneck_size", "layers": "layers_to_transform"}

    def __post_init__(self):
        placement = (self.placement,) if isinstance(self.placement, str) else self.placement
        object.__setattr__(self, "placement", tuple(placement))
        layers = self.layers_to_transform
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = (layers,)
        if layers is not None:
            object.__setattr__(self, "layers_to_transform", tuple(layers))
        problems = _problems(self)
        if problems:
            raise ConfigError("invalid BottleneckConfig: " + "; ".join(problems))


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _problems(c: BottleneckConfig) -> list:
    problems = []
    if not _is_int(c.bottleneck_size) or c.bottleneck_size < 1:
        problems.append(f"bottleneck_size must be an integer >= 1, got {c.bottleneck_size!r}")
    if c.non_linearity not in NON_LINEARITIES:
        problems.append(f"non_linearity must be one of {', '.join(NON_LINEARITIES)}, got "
                        f"{c.non_linearity!r}")
    if not c.placement or any(p not in PLACEMENTS for p in c.placement):
        problems.append(f"placement must be a non-empty subset of {PLACEMENTS}, got "
                        f"{c.placement!r}")
    if c.layers_to_transform is not None and (
            not c.layers_to_transform or any(not _is_int(i) or i < 0
                                             for i in c.layers_to_transform)):
        problems.append(f"layers_to_transform must be block indices >= 0, got "
                        f"{c.layers_to_transform!r}")
    if not 0.0 <= c.adapter_dropout < 1.0:
        problems.append(f"adapter_dropout must be in [0, 1), got {c.adapter_dropout!r}")
    if not np.isfinite(c.scaling):
        problems.append(f"scaling must be a finite number, got {c.scaling!r}")
    return problems


def adapter_dtype(module):
    """(dtype, device) for an adapter on (or in) ``module``: float64 when its first
    floating parameter is, else float32 (as LoRA's weights: PEFT's
    autocast_adapter_dtype), on that parameter's device (CPU when it has none)."""
    for p in module.parameters():
        if p.dtype.kind == "f":
            return np.dtype(np.float64 if p.dtype == np.float64 else np.float32), p.device
    return np.dtype(np.float32), "cpu"


class BottleneckAdapter(Adapter):
    """h -> h + scaling * up(act(down(dropout(h)))) on the host's output (B, T, d)."""

    method = "bottleneck"

    def __init__(self, name: str, d_model: int, config: BottleneckConfig, dtype, device):
        super().__init__(name)
        size = config.bottleneck_size
        self.down = nn.Linear(d_model, size, dtype=dtype, device=device)
        self.up = nn.Linear(size, d_model, dtype=dtype, device=device)
        if config.init_weights:
            self.up.weight.data[...] = 0
            self.up.bias.data[...] = 0
        self.drop = nn.Dropout(config.adapter_dropout)
        self.act_name, self.act = config.non_linearity, NON_LINEARITIES[config.non_linearity]
        self.scaling = float(config.scaling)

    def adapt(self, h):
        """(B, T, d) -> (B, T, d)."""
        x = _cast(h, self.down.weight.dtype)
        delta = self.up(self.act(self.down(self.drop(x))))  # (B, T, d)
        return h + _cast(delta if self.scaling == 1.0 else delta * self.scaling, h.dtype)

    def after(self, host, args, kwargs, y):
        if isinstance(y, tuple):  # a MoE's (y, aux)
            return (self.adapt(y[0]),) + tuple(y[1:])
        return self.adapt(y)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.act_name}, scaling={self.scaling}"


class Bottleneck(PeftMethod):
    name = "bottleneck"
    config_class = BottleneckConfig

    def attach(self, model, config: BottleneckConfig, adapter_name: str) -> list:
        blocks = candidate_modules(model, kinds=("block",))
        if not blocks:
            raise TinyLMError(f"{type(model).__name__} has no transformer blocks for "
                              f"bottleneck adapters")
        chosen = {n: b for n, b in blocks.items()
                  if config.layers_to_transform is None
                  or _block_index(n) in config.layers_to_transform}
        if not chosen:
            have = sorted({_block_index(n) for n in blocks})
            raise TinyLMError(f"layers_to_transform {list(config.layers_to_transform)} names "
                              f"no block; the model's blocks are {have}")
        hosts = []
        for block_name, block in chosen.items():
            d_model = block.config.d_model
            for part in config.placement:
                host = getattr(block, part)
                dtype, device = adapter_dtype(host)
                install(host, BottleneckAdapter(adapter_name, d_model, config, dtype, device))
                hosts.append(f"{block_name}.{part}")
        return hosts


def _block_index(name: str) -> int:
    """The block's number in its stack (``transformer.blocks.3`` -> 3)."""
    m = re.search(r"(\d+)$", name)
    return int(m.group(1)) if m else 0

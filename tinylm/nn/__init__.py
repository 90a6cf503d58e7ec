"""Modules: parameters with names, and the layers models are built from.

    from tinylm import nn
    layer = nn.Linear(16, 32)
    [name for name, _ in layer.named_parameters()]   # ['weight', 'bias']
"""

from tinylm.nn.layers import (  # noqa: F401
    Dropout, Embedding, LayerNorm, Linear, ModuleList, RMSNorm, Sequential, initialising,
    skip_init,
)
from tinylm.nn.module import LoadResult, Module, Parameter  # noqa: F401
from tinylm.nn.attention import (  # noqa: F401
    AttentionSetup, KVCache, MultiHeadAttention, additive_mask,
)
from tinylm.nn.mlp import ACTIVATIONS, MLP  # noqa: F401
from tinylm.nn.moe import MoE, MoEConfig, load_balancing_loss  # noqa: F401
from tinylm.nn.block import (  # noqa: F401
    NORM_POSITIONS, NORMS, BlockConfig, TransformerBlock, make_norm,
)

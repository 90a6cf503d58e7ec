"""The functional API: every differentiable op, one file per family.

    import tinylm.ops as F
    y = F.gelu(F.linear(x, w, b))

Only primitives and a few fused ops (linear, softmax, cross-entropy, layer/RMS norm,
embedding, attention) carry backward code; the rest is composed from them.
"""

from tinylm.ops.elementwise import (  # noqa: F401
    abs, add, cast, div, equal, erf, exp, gelu, greater, greater_equal, less, less_equal,
    log, log_sigmoid, masked_fill, mul, neg, pow, relu, sigmoid, silu, sqrt, sub, tanh,
    to_device, where,
)
from tinylm.ops.reduce import argmax, logsumexp, max, mean, min, sum, var  # noqa: F401
from tinylm.ops.movement import (  # noqa: F401
    broadcast_to, concat, getitem, reshape, split, squeeze, stack, swapaxes, transpose,
    unsqueeze,
)
from tinylm.ops.matmul import linear, matmul  # noqa: F401
from tinylm.ops.nn import (  # noqa: F401
    cross_entropy, dropout, embedding, layer_norm, log_softmax, rms_norm, softmax,
)
from tinylm.ops.attention import scaled_dot_product_attention  # noqa: F401
from tinylm.ops.rotary import rotary  # noqa: F401
from tinylm.ops.tiled import tiled_attention  # noqa: F401

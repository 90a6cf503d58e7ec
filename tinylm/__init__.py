"""tinylm: a small, readable language-model engine on NumPy (CPU) and CuPy (GPU).

    >>> import tinylm
    >>> x = tinylm.tensor([1.0, 2.0, 3.0], requires_grad=True)
    >>> (x * x).sum().backward()
    >>> x.grad.tolist()
    [2.0, 4.0, 6.0]
"""

from tinylm.version import __version__

from tinylm.errors import (
    CheckpointError, ConfigError, DeviceError, GraphError, PluginError, ShapeError, TinyLMError,
)
from tinylm.backend import cuda_available, seed
from tinylm.autograd import enable_grad, is_grad_enabled, no_grad
from tinylm.tensor import Tensor, arange, full, ones, rand, randn, tensor, zeros
from tinylm.hookspecs import hookimpl
from tinylm import checkpoint, nn, ops, optim
from tinylm.models.hf import save_pretrained
from tinylm.loading import load_pretrained  # a run folder or a Hugging Face folder

__all__ = [
    "__version__", "TinyLMError", "ShapeError", "DeviceError", "GraphError",
    "CheckpointError", "ConfigError", "PluginError", "Tensor", "tensor", "zeros", "ones", "full", "arange",
    "randn", "rand", "no_grad", "enable_grad", "is_grad_enabled", "seed", "cuda_available",
    "hookimpl", "ops", "nn", "optim", "checkpoint", "load_pretrained", "save_pretrained",
]


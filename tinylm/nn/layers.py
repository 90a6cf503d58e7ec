"""The basic layers: Linear, Embedding, LayerNorm, RMSNorm, Dropout, containers.

Initial weights follow torch's defaults and are drawn on the CPU from the seeded
``backend.rng(np)`` stream, then moved to ``device``: one seed gives the same weights
on every device. Parameters are float32 unless ``dtype=`` says otherwise.

Inside ``with skip_init():`` (for loaders that overwrite every weight) Linear and
Embedding weights are left uninitialised (``np.empty``: the operating system hands out
their pages only when they are first written, so a weight that a loader replaces by a
quantized layer never costs memory) and models skip ``init_weights``; nothing is drawn
from the RNG.
"""

from __future__ import annotations

import contextlib
import math
import threading

import numpy as np

from tinylm import backend, ops
from tinylm.errors import TinyLMError
from tinylm.nn.module import Module, Parameter
from tinylm.tensor import as_dtype


_STATE = threading.local()


@contextlib.contextmanager
def skip_init():
    """Build modules without initialising their weights (see the module docstring)."""
    previous = initialising()
    _STATE.skip = True
    try:
        yield
    finally:
        _STATE.skip = not previous


def initialising() -> bool:
    """False inside ``skip_init()``."""
    return not getattr(_STATE, "skip", False)


def initial_weights(draw, shape) -> np.ndarray:
    """``draw(shape)`` from the init RNG, or uninitialised memory inside ``skip_init``."""
    return draw(shape) if initialising() else np.empty(shape, dtype=np.float32)


def _parameter(array: np.ndarray, dtype, device) -> Parameter:
    """A Parameter holding ``array`` cast to ``dtype`` on ``device``."""
    array = array.astype(as_dtype(dtype), copy=False)
    return Parameter(backend.to_device(array, backend.normalize_device(device)))


# --------------------------------------------------------------------------- linear


class Linear(Module):
    """y = x @ weight.T + bias, weight of shape (out_features, in_features) as in torch.

    Init as torch: weight and bias ~ U(-1/sqrt(in_features), 1/sqrt(in_features)).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype="float32", device="cpu"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        bound = 1.0 / math.sqrt(in_features) if in_features > 0 else 0.0
        gen = backend.rng(np)
        uniform = lambda shape: gen.uniform(-bound, bound, shape)  # noqa: E731
        self.weight = _parameter(initial_weights(uniform, (out_features, in_features)), dtype,
                                 device)
        self.bias = (_parameter(initial_weights(uniform, (out_features,)), dtype, device)
                     if bias else None)

    def forward(self, x):
        return ops.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class Embedding(Module):
    """Row lookup: ids (any shape, integers) -> vectors (ids.shape + (embedding_dim,)).

    Init as torch: weight ~ N(0, 1).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype="float32", device="cpu"):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = _parameter(
            initial_weights(backend.rng(np).standard_normal, (num_embeddings, embedding_dim)),
            dtype, device)

    def forward(self, ids):
        return ops.embedding(ids, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


# --------------------------------------------------------------------------- normalization


class LayerNorm(Module):
    """Normalize the last axis to zero mean and unit variance, then scale (and shift)."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True,
                 dtype="float32", device="cpu"):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = _parameter(np.ones(dim), dtype, device)
        self.bias = _parameter(np.zeros(dim), dtype, device) if bias else None

    def forward(self, x):
        return ops.layer_norm(x, self.weight, self.bias, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, bias={self.bias is not None}"


class RMSNorm(Module):
    """Scale the last axis by 1/sqrt(mean(x^2) + eps), then by a learned weight."""

    def __init__(self, dim: int, eps: float = 1e-6, dtype="float32", device="cpu"):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = _parameter(np.ones(dim), dtype, device)

    def forward(self, x):
        return ops.rms_norm(x, self.weight, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


# --------------------------------------------------------------------------- regularization


class Dropout(Module):
    """Zero each element with probability p while training (scaling the rest by
    1/(1-p)); the identity in eval mode."""

    def __init__(self, p: float = 0.1):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise TinyLMError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        return ops.dropout(x, self.p, training=True)

    def extra_repr(self) -> str:
        return f"p={self.p}"


# --------------------------------------------------------------------------- containers


class ModuleList(Module):
    """A list of modules whose parameters are named "0.weight", "1.weight", ..."""

    def __init__(self, modules=()):
        super().__init__()
        self.extend(modules)

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, index):
        items = list(self._modules.values())
        if isinstance(index, slice):
            return ModuleList(items[index])
        return items[index]

    def __setitem__(self, index: int, module: Module) -> None:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"ModuleList index {index} out of range for length {n}")
        setattr(self, str(index % n), module)

    def append(self, module: Module) -> "ModuleList":
        if not isinstance(module, Module):
            raise TinyLMError(f"ModuleList holds Modules, got {type(module).__name__}")
        setattr(self, str(len(self)), module)
        return self

    def extend(self, modules) -> "ModuleList":
        for m in modules:
            self.append(m)
        return self


class Sequential(ModuleList):
    """Modules applied one after another: Sequential(a, b)(x) == b(a(x))."""

    def __init__(self, *modules):
        super().__init__(modules)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Sequential(*list(self._modules.values())[index])
        return super().__getitem__(index)

    def forward(self, x):
        for m in self:
            x = m(x)
        return x

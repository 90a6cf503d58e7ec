"""Quantized layers: ``QuantLinear``, ``QuantEmbedding`` and the tied ``QuantTiedHead``.

They hold packed weights (``tinylm.quant.kernels``' layouts: the GGUF bytes, int8
codes and scales, NF4 codes and absmax) as buffers, never a float32 copy, and compute
from them tile by tile::

    q = QuantLinear.from_linear(linear, "q4_1")          # quantize a float layer
    q = QuantLinear.from_packed("q4_1", raw, 576, 1536)  # the bytes of a GGUF tensor
    y = q(x)                                             # x @ dequantize(W).T + bias
    linear = q.dequantize()                              # back to a float nn.Linear

The weights are frozen (no Parameter, no weight gradient); gradients flow to the input
(``dx = dy @ W``, also tile by tile), so adapters (LoRA, QLoRA) can train on top. The
bias, if any, is a float Parameter with ``requires_grad=False``.

Buffer names: ``qweight`` (the raw bytes or the codes) and, by format, ``scale``
(int8), ``absmax`` (nf4), ``qabsmax``/``absmax2``/``offset`` (nf4-dq); the format
itself is the ``fmt`` attribute. A tied LM head (GPT-2's, Llama's with tied
embeddings) is a ``QuantTiedHead`` that multiplies by its embedding's packed rows:
no buffers of its own, no second copy.

On NumPy the packed layouts decode with NumPy's gather and cast loops; with CuPy
buffers or inputs (``model.to("cuda")``), q8_0 / q4_0 / q4_1 / nf4 / nf4-dq run the
CUDA kernels of tinylm/kernels/quant_matmul.cu (other formats: a TinyLMError).
"""

from __future__ import annotations

import numpy as np

from tinylm import backend, nn
from tinylm.errors import TinyLMError
from tinylm.function import Function
from tinylm.nn.module import Parameter
from tinylm.quant import kernels
from tinylm.quant.kernels import LAYOUTS, Packed
from tinylm.quant.registry import get_format
from tinylm.tensor import Tensor

_BUFFER = {"raw": "qweight", "codes": "qweight"}  # the array -> its buffer name


class QuantMatmul(Function):
    """y = x @ W.T (+ bias) with W packed (``self.packed``); backward: dx = dy @ W."""

    def forward(self, xp, x, *bias):
        # CuPy x or buffers: kernels.matmul runs the CUDA kernels (q8_0 q4_0 q4_1 nf4 nf4-dq)
        self.in_shape = x.shape
        x2 = x.reshape(-1, x.shape[-1])                                      # (N, in)
        y = kernels.matmul(xp.ascontiguousarray(x2), self.packed)           # (N, out)
        if bias:
            y += bias[0]
        return y.reshape(x.shape[:-1] + (self.packed.shape[0],))            # (..., out)

    def backward(self, xp, grad):
        g2 = xp.ascontiguousarray(grad.reshape(-1, grad.shape[-1]))         # (N, out)
        gx = None
        if self.needs_input_grad[0]:
            gx = kernels.matmul_t(g2, self.packed).reshape(self.in_shape)   # (..., in)
        if len(self.needs_input_grad) == 2:
            return gx, (g2.sum(axis=0) if self.needs_input_grad[1] else None)
        return gx


class _Packed(nn.Module):
    """What QuantLinear and QuantEmbedding share: the packed buffers and their format."""

    def _store(self, packed: Packed) -> None:
        self.fmt = packed.fmt
        for name in LAYOUTS[packed.fmt]:
            self.register_buffer(_BUFFER.get(name, name), packed.arrays[name])
        self._kernel_cache, self._cache_source = {}, ()

    def state_loaded(self) -> None:
        self._kernel_cache = {}  # load_state_dict wrote new bytes into the buffers

    @property
    def packed(self) -> Packed:
        """The buffers as a ``Packed``, with the cache of what the kernels derive from
        them once (``kernels.block_scales``); emptied when a buffer is replaced or
        ``load_state_dict`` writes into it (a write by hand into a buffer is not seen:
        call ``state_loaded()`` after one)."""
        arrays = {name: self._buffers[_BUFFER.get(name, name)] for name in LAYOUTS[self.fmt]}
        source = tuple(arrays.values())
        if len(source) != len(self._cache_source) or any(
                a is not b for a, b in zip(source, self._cache_source)):
            self._kernel_cache, self._cache_source = {}, source
        return Packed(self.fmt, self.weight_shape, arrays, self._kernel_cache)

    @property
    def packed_nbytes(self) -> int:
        """Bytes of the packed weight (the buffers; the bias not counted)."""
        return self.packed.nbytes

    def packed_bytes(self) -> np.ndarray:
        """The weight in its format's byte layout (``get_format(fmt).quantize(w)``'s)."""
        return kernels.to_raw(self.packed)

    def dequantized_weight(self) -> np.ndarray:
        """The float32 weight (a new array: the float copy these layers avoid)."""
        return kernels.dequantize(self.packed)


class QuantLinear(_Packed):
    """A Linear whose weight (out, in) is packed in a ``tinylm.quant`` format."""

    def __init__(self, packed: Packed, bias=None):
        super().__init__()
        self.out_features, self.in_features = packed.shape
        self.weight_shape = packed.shape
        self._store(packed)
        if bias is not None:
            bias = np.asarray(bias.data if isinstance(bias, Tensor) else bias, np.float32)
            if bias.shape != (self.out_features,):
                raise TinyLMError(f"QuantLinear: bias of shape {bias.shape} for "
                                  f"{self.out_features} outputs; give ({self.out_features},)")
            self.bias = Parameter(bias.copy(), requires_grad=False)
        else:
            self.bias = None

    @classmethod
    def from_packed(cls, fmt_name: str, raw, in_features: int, out_features: int,
                    bias=None) -> "QuantLinear":
        """A layer over ``raw``, the packed bytes of a weight (out_features, in_features)
        (uint8 (out, row_bytes) as a GGUF file holds them, or what
        ``get_format(fmt_name).quantize(w)`` returns); kept without a copy when
        contiguous. ``bias``: (out_features,) floats or None."""
        return cls(kernels.pack(fmt_name, raw, (out_features, in_features)), bias)

    @classmethod
    def from_linear(cls, linear, fmt_name: str) -> "QuantLinear":
        """``linear`` (an ``nn.Linear``) with its weight quantized to ``fmt_name``."""
        w = np.asarray(linear.weight.numpy(), np.float32)
        raw = get_format(fmt_name).quantize(w)
        bias = None if linear.bias is None else linear.bias.numpy()
        return cls.from_packed(fmt_name, raw, w.shape[1], w.shape[0], bias)

    def forward(self, x):
        if self.bias is None:
            return QuantMatmul.apply(x, packed=self.packed)
        return QuantMatmul.apply(x, self.bias, packed=self.packed)

    def matmul(self, x2):
        """x2 (n, in) @ W.T -> (n, out): no bias, no graph (``ops.linear_cross_entropy``
        multiplies a frozen head by itself, chunk by chunk)."""
        return kernels.matmul(backend.get_array_module(x2).ascontiguousarray(x2), self.packed)

    def matmul_t(self, g2):
        """g2 (n, out) @ W -> (n, in): the input's gradient of ``matmul``, no graph."""
        return kernels.matmul_t(backend.get_array_module(g2).ascontiguousarray(g2), self.packed)

    def dequantize(self) -> nn.Linear:
        """A float32 ``nn.Linear`` with the dequantized weight (and the bias)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight.data = self.dequantized_weight()
        if self.bias is not None:
            linear.bias.data = self.bias.data.astype(np.float32, copy=True)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, fmt={self.fmt}")


class QuantEmbedding(_Packed):
    """An Embedding whose table (num, dim) is packed: a lookup gathers the ids' packed
    rows and dequantizes only those."""

    def __init__(self, packed: Packed):
        super().__init__()
        self.num_embeddings, self.embedding_dim = packed.shape
        self.weight_shape = packed.shape
        self._store(packed)

    @classmethod
    def from_packed(cls, fmt_name: str, raw, num_embeddings: int,
                    embedding_dim: int) -> "QuantEmbedding":
        """A table over ``raw``, the packed bytes of a (num_embeddings, embedding_dim)
        weight (a GGUF ``token_embd.weight``: uint8 (num, row_bytes))."""
        return cls(kernels.pack(fmt_name, raw, (num_embeddings, embedding_dim)))

    @classmethod
    def from_embedding(cls, embedding, fmt_name: str) -> "QuantEmbedding":
        w = np.asarray(embedding.weight.numpy(), np.float32)
        raw = get_format(fmt_name).quantize(w)
        return cls.from_packed(fmt_name, raw, *w.shape)

    def forward(self, ids):
        ids = ids.data if isinstance(ids, Tensor) else ids
        xp = backend.get_array_module(self.qweight, ids)
        ids = xp.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise TinyLMError(f"embedding ids must be integers, got {ids.dtype}")
        flat = ids.reshape(-1)
        if flat.size and bool(((flat < 0) | (flat >= self.num_embeddings)).any()):
            raise TinyLMError(f"embedding: an id is outside [0, {self.num_embeddings}), the "
                              f"table's rows; check the tokenizer's vocabulary size against "
                              f"the model's")
        if xp is not np:  # the CUDA row decoder (tinylm/kernels/quant_matmul.cu)
            from tinylm.kernels import quant_matmul
            rows = quant_matmul.dequantize_rows(self.packed, flat)
        else:
            rows = kernels.dequantize(kernels.select_rows(self.packed, flat))  # (n, dim)
        return Tensor(rows.reshape(ids.shape + (self.embedding_dim,)))

    def dequantize(self) -> nn.Embedding:
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim)
        emb.weight.data = self.dequantized_weight()
        return emb

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, fmt={self.fmt}"


class QuantTiedHead(nn.Module):
    """An LM head tied to a ``QuantEmbedding``: logits = h @ table.T from the
    embedding's own packed rows (the embedding is referenced, not a child: its buffers
    are saved and moved once, under the embedding's name)."""

    def __init__(self, embedding: QuantEmbedding):
        super().__init__()
        object.__setattr__(self, "embedding", embedding)
        self.out_features, self.in_features = embedding.weight_shape
        self.bias = None

    @property
    def fmt(self) -> str:
        return self.embedding.fmt

    def forward(self, x):
        return QuantMatmul.apply(x, packed=self.embedding.packed)

    def matmul(self, x2):
        """x2 (n, dim) @ table.T -> (n, num) logits, no graph (see QuantLinear.matmul)."""
        return kernels.matmul(backend.get_array_module(x2).ascontiguousarray(x2),
                              self.embedding.packed)

    def matmul_t(self, g2):
        """g2 (n, num) @ table -> (n, dim): the input's gradient, no graph."""
        return kernels.matmul_t(backend.get_array_module(g2).ascontiguousarray(g2),
                                self.embedding.packed)

    def dequantize(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=False)
        linear.weight.data = self.embedding.dequantized_weight()
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"tied to the embedding, fmt={self.fmt}")

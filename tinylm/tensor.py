"""Tensor: an array (NumPy or CuPy), its gradient, and the Function that made it.

    >>> x = Tensor([1.0, 2.0, 3.0], requires_grad=True)
    >>> (x * x).sum().backward()
    >>> x.grad.tolist()
    [2.0, 4.0, 6.0]

Operators and methods are thin calls into ``tinylm.ops`` (imported at the bottom of
this file: ops are built on Tensor, and Tensor's methods call them by name at run
time). The arithmetic lives in one place, the op files.
"""

from __future__ import annotations

import numpy as np

from tinylm import backend
from tinylm.autograd import run_backward
from tinylm.errors import GraphError, TinyLMError

_DTYPES = {
    "float16": np.float16,
    "float32": np.float32,
    "float64": np.float64,
    "int8": np.int8,
    "uint8": np.uint8,
    "int32": np.int32,
    "int64": np.int64,
    "bool": np.bool_,
}


def as_dtype(dtype):
    """np.dtype from a dtype, a type or a name such as "float32"."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise TinyLMError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype]
    return np.dtype(dtype)


def _as_array(data, dtype, device):
    """``data`` (a Tensor, an array of either backend, a scalar, nested lists) as an
    array on ``device`` (default: where it is) of ``dtype`` (default: its own; Python
    floats become float32, as in torch)."""
    if isinstance(data, Tensor):
        data = data.data
    xp = backend.xp_for(device) if device is not None else backend.get_array_module(data)
    if dtype is not None:
        return xp.asarray(data, dtype=as_dtype(dtype))
    if not hasattr(data, "dtype"):
        data = xp.asarray(data)
        return data.astype(np.float32) if data.dtype == np.float64 else data
    return xp.asarray(data)


class Tensor:
    __slots__ = (
        "data",
        "grad",
        "creator",
        "output_index",
        "requires_grad",
        "retains_grad",
        "__weakref__",
    )
    __array_priority__ = 1000  # numpy_array + tensor -> Tensor.__radd__

    def __init__(self, data, requires_grad: bool = False, dtype=None, device=None):
        # A NumPy array is kept as it is (every op's output: the fast path)
        if type(data) is not np.ndarray or dtype is not None or device is not None:
            data = _as_array(data, dtype, device)
        self.data = data
        self.grad = None
        self.creator = None
        self.output_index = 0
        self.requires_grad = bool(requires_grad)
        self.retains_grad = False

    # ------------------------------------------------------------------ properties

    @property
    def shape(self) -> tuple:
        return self.data.shape

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return self.data.size

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def xp(self):
        return backend.get_array_module(self.data)

    @property
    def device(self) -> str:
        return backend.device_of(self.data)

    @property
    def is_leaf(self) -> bool:
        return self.creator is None

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        dev = ", device='cuda'" if self.device == "cuda" else ""
        body = np.array2string(backend.to_numpy(self.data), precision=4, threshold=20)
        return f"Tensor({body}, dtype={self.dtype}{dev}{grad})"

    # ------------------------------------------------------------------ conversion

    def numpy(self) -> np.ndarray:
        return backend.to_numpy(self.data)

    def item(self):
        return self.data.item()

    def tolist(self):
        return self.numpy().tolist()

    def to(self, device: str) -> "Tensor":
        """A copy on ``device`` (self when already there); gradients flow through."""
        if backend.normalize_device(device) == self.device:
            return self
        return ops.to_device(self, device)

    def astype(self, dtype) -> "Tensor":
        dtype = as_dtype(dtype)
        return self if dtype == self.dtype else ops.cast(self, dtype)

    def float(self) -> "Tensor":
        return self.astype(np.float32)

    def detach(self) -> "Tensor":
        """The same data, cut from the graph."""
        return Tensor(self.data)

    def requires_grad_(self, flag: bool = True) -> "Tensor":
        self.requires_grad = flag
        return self

    def retain_grad(self) -> None:
        """Keep ``.grad`` on this non-leaf tensor after backward."""
        self.retains_grad = True

    # ------------------------------------------------------------------ autograd

    def backward(self, grad=None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) into every leaf's ``.grad``."""
        if not self.requires_grad:
            raise GraphError(
                "backward() on a tensor that does not require grad: no input of the "
                "computation had requires_grad=True, or it ran under no_grad()"
            )
        if grad is None:
            if self.size != 1:
                raise GraphError(
                    f"backward() without a gradient needs a scalar, got shape {self.shape}; "
                    "reduce it (e.g. .sum()) or pass grad="
                )
            grad = self.xp.ones(self.shape, dtype=self.dtype)
        elif isinstance(grad, Tensor):
            grad = grad.data
        run_backward(self, grad, retain_graph=retain_graph)

    # ------------------------------------------------------------------ arithmetic

    def __add__(self, other):
        return ops.add(self, other)

    def __radd__(self, other):
        return ops.add(other, self)

    def __sub__(self, other):
        return ops.sub(self, other)

    def __rsub__(self, other):
        return ops.sub(other, self)

    def __mul__(self, other):
        return ops.mul(self, other)

    def __rmul__(self, other):
        return ops.mul(other, self)

    def __truediv__(self, other):
        return ops.div(self, other)

    def __rtruediv__(self, other):
        return ops.div(other, self)

    def __pow__(self, other):
        return ops.pow(self, other)

    def __rpow__(self, other):
        return ops.pow(other, self)

    def __neg__(self):
        return ops.neg(self)

    def __matmul__(self, other):
        return ops.matmul(self, other)

    def __rmatmul__(self, other):
        return ops.matmul(other, self)

    # comparisons give boolean tensors outside the graph
    def __lt__(self, other):
        return ops.less(self, other)

    def __le__(self, other):
        return ops.less_equal(self, other)

    def __gt__(self, other):
        return ops.greater(self, other)

    def __ge__(self, other):
        return ops.greater_equal(self, other)

    def eq(self, other):
        return ops.equal(self, other)

    __hash__ = object.__hash__

    def __getitem__(self, index):
        return ops.getitem(self, index)

    # ------------------------------------------------------------------ unary math

    def exp(self):
        return ops.exp(self)

    def log(self):
        return ops.log(self)

    def sqrt(self):
        return ops.sqrt(self)

    def tanh(self):
        return ops.tanh(self)

    def sigmoid(self):
        return ops.sigmoid(self)

    def relu(self):
        return ops.relu(self)

    def gelu(self, approximate: str = "none"):
        return ops.gelu(self, approximate=approximate)

    def silu(self):
        return ops.silu(self)

    def abs(self):
        return ops.abs(self)

    # ------------------------------------------------------------------ reductions

    def sum(self, axis=None, keepdims: bool = False):
        return ops.sum(self, axis=axis, keepdims=keepdims)

    def mean(self, axis=None, keepdims: bool = False):
        return ops.mean(self, axis=axis, keepdims=keepdims)

    def max(self, axis=None, keepdims: bool = False):
        return ops.max(self, axis=axis, keepdims=keepdims)

    def min(self, axis=None, keepdims: bool = False):
        return ops.min(self, axis=axis, keepdims=keepdims)

    def var(self, axis=None, keepdims: bool = False, ddof: int = 0):
        return ops.var(self, axis=axis, keepdims=keepdims, ddof=ddof)

    def logsumexp(self, axis=None, keepdims: bool = False):
        return ops.logsumexp(self, axis=axis, keepdims=keepdims)

    def argmax(self, axis=None):
        return ops.argmax(self, axis=axis)

    def softmax(self, axis: int = -1):
        return ops.softmax(self, axis=axis)

    def log_softmax(self, axis: int = -1):
        return ops.log_softmax(self, axis=axis)

    # ------------------------------------------------------------------ movement

    def reshape(self, *shape):
        return ops.reshape(self, _shape_arg(shape))

    view = reshape

    def flatten(self, start: int = 0):
        return ops.reshape(self, self.shape[:start] + (-1,))

    def transpose(self, *axes):
        return ops.transpose(self, _shape_arg(axes) or None)

    def permute(self, *axes):
        return ops.transpose(self, _shape_arg(axes))

    def swapaxes(self, a: int, b: int):
        return ops.swapaxes(self, a, b)

    @property
    def T(self):
        return ops.transpose(self, None)

    def unsqueeze(self, axis: int):
        return ops.unsqueeze(self, axis)

    def squeeze(self, axis=None):
        return ops.squeeze(self, axis)

    def expand(self, *shape):
        return ops.broadcast_to(self, _shape_arg(shape))

    def split(self, sections, axis: int = -1):
        return ops.split(self, sections, axis=axis)

    def masked_fill(self, mask, value):
        return ops.masked_fill(self, mask, value)

    def matmul(self, other):
        return ops.matmul(self, other)


def _shape_arg(args: tuple) -> tuple:
    """Accept both f(2, 3) and f((2, 3))."""
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        return tuple(args[0])
    return tuple(args)


# --------------------------------------------------------------------------- factories


def tensor(data, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    return Tensor(data, requires_grad=requires_grad, dtype=dtype, device=device)


def zeros(*shape, dtype="float32", device="cpu", requires_grad: bool = False) -> Tensor:
    xp = backend.xp_for(device)
    return Tensor(xp.zeros(_shape_arg(shape), dtype=as_dtype(dtype)), requires_grad)


def ones(*shape, dtype="float32", device="cpu", requires_grad: bool = False) -> Tensor:
    xp = backend.xp_for(device)
    return Tensor(xp.ones(_shape_arg(shape), dtype=as_dtype(dtype)), requires_grad)


def full(shape, value, dtype="float32", device="cpu", requires_grad: bool = False) -> Tensor:
    xp = backend.xp_for(device)
    return Tensor(xp.full(tuple(shape), value, dtype=as_dtype(dtype)), requires_grad)


def arange(*args, dtype="int64", device="cpu") -> Tensor:
    xp = backend.xp_for(device)
    return Tensor(xp.arange(*args, dtype=as_dtype(dtype)))


def randn(*shape, dtype="float32", device="cpu", requires_grad: bool = False) -> Tensor:
    """Standard normal samples from the backend's seeded generator."""
    xp = backend.xp_for(device)
    dtype = as_dtype(dtype)
    gen_dtype = np.float64 if dtype == np.float64 else np.float32
    data = backend.rng(xp).standard_normal(_shape_arg(shape), dtype=gen_dtype)
    return Tensor(data.astype(dtype, copy=False), requires_grad)


def rand(*shape, dtype="float32", device="cpu", requires_grad: bool = False) -> Tensor:
    xp = backend.xp_for(device)
    dtype = as_dtype(dtype)
    gen_dtype = np.float64 if dtype == np.float64 else np.float32
    data = backend.rng(xp).random(_shape_arg(shape), dtype=gen_dtype)
    return Tensor(data.astype(dtype, copy=False), requires_grad)


from tinylm import ops  # noqa: E402  (ops build on Tensor; see the module docstring)

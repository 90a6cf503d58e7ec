"""Movement ops: reshape, transpose, indexing, concat/stack/split, broadcast.

They move or copy elements without arithmetic; each backward is the inverse movement.
"""

from __future__ import annotations

import numpy as np

from tinylm import backend
from tinylm.errors import ShapeError
from tinylm.function import Function
from tinylm.kernels import native
from tinylm.kernels.native import address
from tinylm.tensor import Tensor

# --------------------------------------------------------------------------- shape


class Reshape(Function):
    def forward(self, xp, x):
        self.in_shape = x.shape
        try:
            return x.reshape(self.shape)
        except ValueError as e:
            raise ShapeError(f"cannot reshape {x.shape} into {self.shape}: {e}") from None

    def backward(self, xp, grad):
        return grad.reshape(self.in_shape)


class Transpose(Function):
    def forward(self, xp, x):
        self.axes = tuple(reversed(range(x.ndim))) if self.axes is None else self.axes
        if sorted(a % max(x.ndim, 1) for a in self.axes) != list(range(x.ndim)):
            raise ShapeError(f"axes {self.axes} are not a permutation of {x.ndim} dims")
        return x.transpose(self.axes)

    def backward(self, xp, grad):
        inverse = [0] * len(self.axes)
        for i, a in enumerate(self.axes):
            inverse[a % len(self.axes)] = i
        return grad.transpose(inverse)


class BroadcastTo(Function):
    def forward(self, xp, x):
        try:
            return xp.broadcast_to(x, self.shape)
        except ValueError as e:
            raise ShapeError(f"cannot broadcast shape {x.shape} to {self.shape}: {e}") from None

    def backward(self, xp, grad):
        return grad  # the engine sums it back to the input's shape


def reshape(x, shape):
    return Reshape.apply(x, shape=tuple(shape))


def transpose(x, axes=None):
    return Transpose.apply(x, axes=None if axes is None else tuple(axes))


def _check_axis(axis: int, ndim: int) -> int:
    """``axis`` as a non-negative int, or a ShapeError when ``ndim`` dims have no such axis."""
    if not -ndim <= axis < ndim:
        raise ShapeError(f"axis {axis} is out of range for a tensor with {ndim} dims")
    return axis % ndim


def swapaxes(x, a: int, b: int):
    a, b = _check_axis(a, x.ndim), _check_axis(b, x.ndim)
    axes = list(range(x.ndim))
    axes[a], axes[b] = axes[b], axes[a]
    return transpose(x, axes)


def broadcast_to(x, shape):
    return BroadcastTo.apply(x, shape=tuple(shape))


def unsqueeze(x, axis: int):
    axis = _check_axis(axis, x.ndim + 1)
    return reshape(x, x.shape[:axis] + (1,) + x.shape[axis:])


def squeeze(x, axis=None):
    if axis is None:
        return reshape(x, [n for n in x.shape if n != 1])
    axis = _check_axis(axis, x.ndim)
    if x.shape[axis] != 1:
        raise ShapeError(f"cannot squeeze axis {axis} of size {x.shape[axis]}")
    return reshape(x, x.shape[:axis] + x.shape[axis + 1 :])


# --------------------------------------------------------------------------- indexing


def _is_basic(index) -> bool:
    """True for indices made only of ints, slices, None and Ellipsis (no gather)."""
    parts = index if isinstance(index, tuple) else (index,)
    return all(p is None or p is Ellipsis or isinstance(p, (int, slice)) for p in parts)


def _unwrap_index(index):
    if isinstance(index, Tensor):
        return index.data
    if isinstance(index, tuple):
        return tuple(p.data if isinstance(p, Tensor) else p for p in index)
    return index


class GetItem(Function):
    """x[index]: slices, ints, None, Ellipsis, and integer/boolean array gathers."""

    def forward(self, xp, x):
        self.in_shape, self.dtype = x.shape, x.dtype
        return x[self.index]

    def backward(self, xp, grad):
        out = xp.zeros(self.in_shape, dtype=self.dtype)
        if _is_basic(self.index):
            out[self.index] = grad  # a basic index selects each element at most once
        else:
            backend.scatter_add(out, self.index, grad)
        return out


def getitem(x, index):
    return GetItem.apply(x, index=_unwrap_index(index))


# --------------------------------------------------------------------------- join, split


class Concat(Function):
    def forward(self, xp, *arrays):
        try:
            out = xp.concatenate(arrays, axis=self.axis)
            self.sizes = [a.shape[self.axis] for a in arrays]
            return out
        except ValueError as e:
            shapes = [a.shape for a in arrays]
            raise ShapeError(f"cannot concatenate shapes {shapes} on axis {self.axis}: {e}") from None

    def backward(self, xp, grad):
        return _split_at(xp, grad, self.sizes, self.axis)


class Stack(Function):
    def forward(self, xp, *arrays):
        try:
            return xp.stack(arrays, axis=self.axis)
        except ValueError as e:
            shapes = [a.shape for a in arrays]
            raise ShapeError(f"cannot stack shapes {shapes}: {e}") from None

    def backward(self, xp, grad):
        axis = self.axis % grad.ndim
        return tuple(grad[(slice(None),) * axis + (i,)] for i in range(grad.shape[axis]))


class Split(Function):
    """Several outputs: pieces of ``sizes`` along ``axis`` (views, no copy)."""

    def forward(self, xp, x):
        return tuple(_split_at(xp, x, self.sizes, self.axis))

    def backward(self, xp, *grads):
        x = self.inputs[0].data
        if xp is np:
            whole = _joined(x, grads, self.sizes, self.axis)
            if whole is not None:  # (made by ``empty_views_like``: no copy)
                return whole
        if xp is np and not x.flags.c_contiguous:
            # In x's memory order (empty_like keeps it): the heads split of a fused qkv
            # projection, (B, T, 3n, hs) seen as (B, 3n, T, hs), then gets a gradient
            # that the transpose and reshape back hand on as views, not a second copy.
            return np.concatenate(grads, axis=self.axis, out=np.empty_like(x))
        return xp.concatenate(grads, axis=self.axis)


def _root(a):
    """The array whose memory ``a`` views (``a`` itself when it owns it)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def empty_views_like(*arrays):
    """Uninitialised arrays of ``arrays``' shapes and strides, each at its array's place in
    one new buffer laid out as the buffer they all view (q, k and v: the heads of one
    fused projection), or fresh C-contiguous arrays when they do not all view one
    C-contiguous array; None entries stay None. Gradients made this way let ``Split``
    hand on its input's gradient as a view of that buffer instead of concatenating."""
    present = [a for a in arrays if a is not None]
    if not present:
        return arrays
    root = _root(present[0])
    if not (root.flags.c_contiguous and all(_root(a) is root and a.dtype == root.dtype
                                            and native.disjoint(a) for a in present)
            and not _overlap(present)):
        return tuple(None if a is None else np.empty(a.shape, a.dtype) for a in arrays)
    buffer, start = np.empty(root.size, root.dtype), address(root)
    return tuple(None if a is None else np.ndarray(a.shape, a.dtype, buffer, address(a) - start,
                                                   a.strides) for a in arrays)


def _overlap(arrays) -> bool:
    """Whether two of ``arrays`` share an element (or NumPy cannot tell cheaply): then
    their gradients cannot sit in their places (q is k: each needs its own sum)."""
    for i, a in enumerate(arrays):
        for b in arrays[i + 1:]:
            try:
                if np.shares_memory(a, b, max_work=1000):
                    return True
            except np.exceptions.TooHardError:
                return True
    return False


def _joined(x, grads, sizes, axis):
    """``concatenate(grads, axis)`` as a view, when the gradients are the pieces of one
    C-contiguous buffer laid out as x's pieces are in x (``empty_views_like``), else
    None."""
    first = grads[0]
    if not all(isinstance(g, np.ndarray) for g in grads) or first.dtype != x.dtype:
        return None
    root = _root(first)
    if not root.flags.c_contiguous:
        return None
    axis %= x.ndim
    start, step = address(first), x.strides[axis]
    offset = 0
    for g, n in zip(grads, sizes):
        if (g.strides != x.strides or g.shape != x.shape[:axis] + (n,) + x.shape[axis + 1:]
                or _root(g) is not root or address(g) != start + offset):
            return None
        offset += n * step
    try:  # (NumPy checks that x's layout from ``start`` lies inside root's memory)
        return np.ndarray(x.shape, x.dtype, root, start - address(root), x.strides)
    except (ValueError, TypeError):
        return None


def _split_at(xp, a, sizes, axis):
    bounds, start = [], 0
    for n in sizes[:-1]:
        start += n
        bounds.append(start)
    return tuple(xp.split(a, bounds, axis=axis))


def concat(tensors, axis: int = 0):
    return Concat.apply(*tensors, axis=axis)


def stack(tensors, axis: int = 0):
    return Stack.apply(*tensors, axis=axis)


def split(x, split_size_or_sections, axis: int = -1):
    """Split like ``torch.split``: an int is the size of each piece (the last may be
    smaller), a list gives every piece's size."""
    n = x.shape[_check_axis(axis, x.ndim)]
    if isinstance(split_size_or_sections, int):
        size = split_size_or_sections
        if size <= 0:
            raise ShapeError(f"split size must be positive, got {size}")
        sizes = [size] * (n // size) + ([n % size] if n % size else [])
    else:
        sizes = list(split_size_or_sections)
        if sum(sizes) != n:
            raise ShapeError(f"split sizes {sizes} do not add up to {n} (axis {axis})")
    return Split.apply(x, sizes=sizes, axis=axis)

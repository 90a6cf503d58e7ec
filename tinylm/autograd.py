"""Reverse-mode differentiation over the graph of Functions that Tensors record.

A Tensor made by an op remembers its ``creator`` (a Function instance), which holds its
input Tensors. ``run_backward`` walks those creators once in reverse topological order,
hands each Function the gradients of its outputs and routes the input gradients it
returns to the producers of those inputs, accumulating where a tensor was used twice.
Leaves (tensors with ``requires_grad`` and no creator) collect ``.grad``.

By default each Function is released as soon as its backward has run, so the saved
activations go away while backward proceeds and a training loop does not grow memory.
"""

from __future__ import annotations

import contextlib
import threading

from tinylm.errors import GraphError

# --------------------------------------------------------------------------- grad mode

_state = threading.local()


def is_grad_enabled() -> bool:
    return getattr(_state, "enabled", True)


@contextlib.contextmanager
def _grad_mode(enabled: bool):
    previous = is_grad_enabled()
    _state.enabled = enabled
    try:
        yield
    finally:
        _state.enabled = previous


def no_grad():
    """Context manager: ops inside record no graph (inference, optimizer updates)."""
    return _grad_mode(False)


def enable_grad():
    """Context manager: turn recording back on inside a ``no_grad`` block."""
    return _grad_mode(True)


# --------------------------------------------------------------------------- broadcasting


def unbroadcast(grad, shape: tuple):
    """Sum ``grad`` down to ``shape``: the adjoint of NumPy broadcasting.

    >>> import numpy as np
    >>> unbroadcast(np.ones((2, 3, 4)), (3, 1)).tolist()
    [[8.0], [8.0], [8.0]]
    """
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    ones = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if ones:
        grad = grad.sum(axis=ones, keepdims=True)
    return grad.reshape(shape)


# --------------------------------------------------------------------------- backward


_FREED = (
    "backward through a graph that was already freed; call "
    "backward(retain_graph=True) the first time to go through it twice"
)


def _topological_order(root_fn) -> list:
    """Functions reachable from ``root_fn``, each after every Function that consumes it."""
    order, visited = [], set()
    stack = [(root_fn, False)]
    while stack:
        fn, expanded = stack.pop()
        if expanded:
            order.append(fn)
            continue
        if id(fn) in visited:
            continue
        visited.add(id(fn))
        if fn.inputs is None:  # released by an earlier backward
            raise GraphError(_FREED)
        stack.append((fn, True))
        for t in fn.inputs:
            parent = t.creator
            if parent is not None and id(parent) not in visited:
                stack.append((parent, False))
    order.reverse()  # consumers first
    return order


def _accumulate(old, new):
    # Never in place: an incoming gradient array may be shared with another tensor.
    return new if old is None else old + new


def run_backward(root, grad, retain_graph: bool = False) -> None:
    """Back-propagate ``grad`` (same shape as ``root``) through the graph below root."""
    fn = root.creator
    if fn is None:
        if root.requires_grad:
            root.grad = _accumulate(root.grad, grad)
        return
    if fn.inputs is None:
        raise GraphError(_FREED)
    pending = {id(fn): [None] * fn.n_outputs}
    pending[id(fn)][root.output_index] = grad
    handed_out = set()  # ids of arrays already stored as some leaf's .grad
    for fn in _topological_order(fn):
        grads = pending.pop(id(fn), None)
        if grads is None:  # unreachable from root's gradient (e.g. a detached branch)
            continue
        xp = fn.xp
        if len(grads) != 1 or grads[0] is None:  # outputs nobody used: zero gradients
            grads = [xp.zeros(shape, dtype) if g is None else g
                     for g, (shape, dtype) in zip(grads, fn.output_meta)]
        for ref, g in zip(fn.output_refs, grads):
            out = ref()
            if out is not None and out.retains_grad:
                out.grad = _accumulate(out.grad, g)
        if not retain_graph:
            fn.final_backward = True  # (released below)
        input_grads = fn.backward(xp, *grads)
        if not isinstance(input_grads, tuple):
            input_grads = (input_grads,)
        for t, g, needed in zip(fn.inputs, input_grads, fn.needs_input_grad):
            if not needed or g is None:
                continue
            data = t.data
            if g.shape != data.shape:
                g = unbroadcast(g, data.shape)
            if g.dtype != data.dtype:
                g = g.astype(data.dtype)
            creator = t.creator
            if creator is None:
                if t.grad is None and (g.base is not None or id(g) in handed_out):
                    g = g.copy()  # a leaf's .grad owns its memory: in-place edits are safe
                handed_out.add(id(g))
                t.grad = _accumulate(t.grad, g)
            else:
                slot = pending.get(id(creator))
                if slot is None:
                    slot = pending[id(creator)] = [None] * creator.n_outputs
                i = t.output_index
                slot[i] = g if slot[i] is None else slot[i] + g
        if not retain_graph:
            fn.release()

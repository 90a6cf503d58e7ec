"""Function: the one way to add a differentiable primitive.

A subclass writes two array-level methods and nothing else::

    class Exp(Function):
        def forward(self, xp, x):
            self.y = xp.exp(x)          # keep what backward needs on self
            return self.y

        def backward(self, xp, grad):
            return grad * self.y        # one gradient per input (None: no gradient)

    y = Exp.apply(x)                    # Tensor in, Tensor out, graph recorded

``xp`` is numpy or cupy, picked from the inputs, so one body runs on CPU and GPU.
Keyword arguments of ``apply`` become attributes before ``forward`` runs
(``Sum.apply(x, axis=1)`` -> ``self.axis``). Python scalars among the inputs become
constants of the first tensor's dtype. Gradients that ``backward`` returns in a
broadcast shape are summed back to the input's shape by the engine, so binary ops
never write that code. ``forward`` may return a tuple for several outputs; then
``backward`` receives one gradient per output (zeros where an output was unused).

Rules: never modify an incoming array or gradient in place (they may be shared), and
return arrays of the input's dtype.
"""

from __future__ import annotations

import weakref

import numpy as np

from tinylm.autograd import is_grad_enabled
from tinylm import backend
from tinylm.backend import get_array_module
from tinylm.errors import DeviceError
from tinylm.tensor import Tensor


class Function:
    differentiable = True  # False for ops like comparisons that never record a graph
    # True while ``backward`` runs for the last time (the engine releases the node right
    # after: no retain_graph); a backward may then reuse arrays it saved itself (never
    # an incoming one) as its output
    final_backward = False

    def forward(self, xp, *arrays):
        raise NotImplementedError

    def backward(self, xp, *grads):
        raise NotImplementedError

    # ------------------------------------------------------------------ graph plumbing

    @classmethod
    def apply(cls, *inputs, **params):
        fn = cls()
        if params:
            fn.__dict__.update(params)
        tensors = _as_tensors(inputs)
        arrays = [t.data for t in tensors]
        xp = np
        if backend.has_cupy():  # (without CuPy every array is a NumPy one)
            xp = get_array_module(*arrays)
            if xp is not np and any(get_array_module(a) is not xp for a in arrays):
                raise DeviceError(
                    f"{cls.__name__}: inputs live on different devices; move them with "
                    ".to(device)"
                )
        # grad mode first: under no_grad (decoding) the inputs are not even looked at
        record = cls.differentiable and is_grad_enabled()
        if record:
            needs = tuple(t.requires_grad for t in tensors)
            record = True in needs
        fn.needs_grad = record
        outputs = fn.forward(xp, *arrays)
        if not isinstance(outputs, tuple):
            result = Tensor(outputs, requires_grad=record)
            if record:
                fn._connect(xp, tensors, needs, (result,))
            return result
        results = tuple(Tensor(o, requires_grad=record) for o in outputs)
        if record:
            fn._connect(xp, tensors, needs, results)
        return results

    def _connect(self, xp, tensors, needs, results) -> None:
        """Record this call in the graph: the inputs it read (and which need a
        gradient), what backward needs to know about the outputs, and itself as the
        outputs' creator (the outputs hold the Function; it holds only weak references
        back)."""
        self.xp = xp
        self.inputs = tensors
        self.needs_input_grad = needs
        self.n_outputs = len(results)
        self.output_meta = tuple((r.data.shape, r.data.dtype) for r in results)
        self.output_refs = tuple(weakref.ref(r) for r in results)
        for i, r in enumerate(results):
            r.creator = self
            r.output_index = i

    def release(self) -> None:
        """Drop inputs and saved arrays once backward has used them."""
        self.__dict__.clear()
        self.inputs = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"


def _as_tensors(inputs):
    """The inputs as Tensors (as they are when they all are: the common case)."""
    for x in inputs:
        if not isinstance(x, Tensor):
            break
    else:
        return inputs
    ref = next((x for x in inputs if isinstance(x, Tensor)), None)
    out = []
    for x in inputs:
        if isinstance(x, Tensor):
            out.append(x)
        elif ref is not None and isinstance(x, (int, float)) and not isinstance(x, bool):
            dtype = ref.dtype if ref.dtype.kind == "f" else None
            out.append(Tensor(ref.xp.asarray(x, dtype=dtype)))
        else:
            xp = ref.xp if ref is not None else get_array_module(x)
            out.append(Tensor(xp.asarray(x)))
    return out

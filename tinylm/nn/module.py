"""Module and Parameter: how a model names, finds, saves and moves its weights.

A Module registers what is assigned to it: a ``Parameter`` becomes a trainable
weight, a ``Module`` a child, and ``register_buffer`` adds a non-trainable array (a
cached mask, running statistics). Names are dotted paths, as in torch::

    class Block(Module):
        def __init__(self):
            super().__init__()
            self.ln = LayerNorm(8)
            self.layers = ModuleList([Linear(8, 8), Linear(8, 8)])

    [n for n, _ in Block().named_parameters()]
    # ['ln.weight', 'ln.bias', 'layers.0.weight', 'layers.0.bias', ...]

Order: a module's own parameters first (in assignment order), then each child's,
depth first, so ``state_dict`` keys come out in the order torch would give them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from tinylm import backend
from tinylm.errors import CheckpointError, TinyLMError
from tinylm.tensor import Tensor, as_dtype


class Parameter(Tensor):
    """A Tensor that a Module registers as a trainable weight (requires_grad=True)."""

    __slots__ = ()

    def __init__(self, data, requires_grad: bool = True, dtype=None, device=None):
        super().__init__(data, requires_grad=requires_grad, dtype=dtype, device=device)

    def __repr__(self) -> str:
        return "Parameter" + super().__repr__()[len("Tensor"):]


class LoadResult(NamedTuple):
    """What ``load_state_dict(strict=False)`` skipped."""

    missing_keys: list
    unexpected_keys: list


class Module:
    """Base class of every layer and model: subclasses set attributes and write forward."""

    def __init__(self):
        # object.__setattr__: our own __setattr__ needs these dicts to exist already.
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_buffers", {})
        object.__setattr__(self, "_non_persistent", set())
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "training", True)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args, **kwargs):
        # PEFT adapters (tinylm.peft) live in a child named "peft" and wrap forward.
        adapters = self._modules.get("peft")
        if adapters is not None and getattr(adapters, "is_adapter_set", False):
            return adapters.run(self, args, kwargs)
        return self.forward(*args, **kwargs)

    # ------------------------------------------------------------------ registration

    def __setattr__(self, name: str, value) -> None:
        if "_parameters" not in self.__dict__:
            raise TinyLMError(
                f"{type(self).__name__}: call super().__init__() before assigning attributes"
            )
        params, buffers, modules = self._parameters, self._buffers, self._modules
        if isinstance(value, Parameter):
            if name not in params:  # replacing keeps the position (and the order)
                self._forget(name)
            params[name] = value
        elif isinstance(value, Module):
            if name not in modules:
                self._forget(name)
            modules[name] = value
        elif name in params:
            if value is not None:
                raise TinyLMError(
                    f"{type(self).__name__}.{name} is a Parameter; assign a Parameter "
                    f"(or None), not {type(value).__name__}"
                )
            params[name] = None
        elif name in buffers:
            buffers[name] = _buffer_array(value)
        elif name in modules:
            if value is not None:
                raise TinyLMError(
                    f"{type(self).__name__}.{name} is a sub-module; assign a Module (or None)"
                )
            modules[name] = None
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str):
        # Only called when normal lookup fails: look in the registries.
        d = self.__dict__
        for registry in ("_parameters", "_buffers", "_modules"):
            if name in d.get(registry, ()):
                return d[registry][name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __delattr__(self, name: str) -> None:
        if not self._forget(name):
            object.__delattr__(self, name)

    def _forget(self, name: str) -> bool:
        found = False
        for registry in (self._parameters, self._buffers, self._modules):
            if name in registry:
                del registry[name]
                found = True
        self._non_persistent.discard(name)
        if name in self.__dict__:
            object.__delattr__(self, name)
        return found

    def register_buffer(self, name: str, array, persistent: bool = True) -> None:
        """A non-trainable array kept with the module: moved by ``to``, saved by
        ``state_dict`` unless ``persistent=False`` (e.g. a cache rebuilt on load)."""
        self._forget(name)
        self._buffers[name] = _buffer_array(array)
        if not persistent:
            self._non_persistent.add(name)

    def register_parameter(self, name: str, param) -> None:
        setattr(self, name, param)

    # ------------------------------------------------------------------ traversal

    def named_modules(self, prefix: str = "", _seen=None):
        """(dotted name, module) for self and every descendant, each module once."""
        seen = set() if _seen is None else _seen
        if id(self) in seen:
            return
        seen.add(id(self))
        yield prefix, self
        for name, child in self._modules.items():
            if child is not None:
                yield from child.named_modules(_join(prefix, name), seen)

    def modules(self):
        for _, m in self.named_modules():
            yield m

    def named_children(self):
        for name, child in self._modules.items():
            if child is not None:
                yield name, child

    def children(self):
        for _, child in self.named_children():
            yield child

    def named_parameters(self, prefix: str = "", recurse: bool = True):
        """(dotted name, Parameter), each Parameter once (a tied weight under its first name)."""
        seen = set()
        modules = self.named_modules(prefix) if recurse else [(prefix, self)]
        for mod_prefix, module in modules:
            for name, p in module._parameters.items():
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    yield _join(mod_prefix, name), p

    def parameters(self, recurse: bool = True):
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    def named_buffers(self, prefix: str = ""):
        for mod_prefix, module in self.named_modules(prefix):
            for name, b in module._buffers.items():
                if b is not None:
                    yield _join(mod_prefix, name), b

    def buffers(self):
        for _, b in self.named_buffers():
            yield b

    def num_parameters(self, trainable_only: bool = False) -> int:
        """How many numbers the model learns (tied weights counted once)."""
        return sum(p.size for p in self.parameters() if p.requires_grad or not trainable_only)

    def apply(self, fn) -> "Module":
        """Call ``fn(module)`` on every descendant and self (children first), e.g. to init."""
        for child in self.children():
            child.apply(fn)
        fn(self)
        return self

    # ------------------------------------------------------------------ modes

    def train(self, mode: bool = True) -> "Module":
        """Set ``training`` on self and every descendant (Dropout reads it)."""
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def requires_grad_(self, flag: bool = True) -> "Module":
        """Freeze (False) or unfreeze every parameter."""
        for p in self.parameters():
            p.requires_grad = flag
        return self

    def zero_grad(self) -> None:
        """Forget every parameter's gradient (``grad = None``: nothing allocated)."""
        for p in self.parameters():
            p.grad = None

    # ------------------------------------------------------------------ device, dtype

    def to(self, device=None, dtype=None) -> "Module":
        """Move parameters and buffers to ``device`` and/or cast floating ones to ``dtype``,
        in place: each Parameter stays the same object, so an optimizer built earlier
        keeps working. Returns self."""
        if device is not None:
            device = backend.normalize_device(device)
            backend.xp_for(device)  # fail early, with a clear message, if cuda is missing
        dtype = as_dtype(dtype) if dtype is not None else None

        def convert(a):
            if device is not None:
                a = backend.to_device(a, device)
            if dtype is not None and a.dtype.kind == "f":
                a = a.astype(dtype, copy=False)
            return a

        for p in self.parameters():
            p.data = convert(p.data)
            if p.grad is not None:
                p.grad = convert(p.grad)
        for m in self.modules():
            for name, b in m._buffers.items():
                if b is not None:
                    m._buffers[name] = convert(b)
        return self

    def cpu(self) -> "Module":
        return self.to("cpu")

    def cuda(self) -> "Module":
        return self.to("cuda")

    # ------------------------------------------------------------------ state dict

    def state_dict(self) -> dict:
        """{dotted name: array} of every parameter and persistent buffer.

        The arrays are the live storage on their device (no copy, as in torch): copy
        them (or save them) before training on if you keep them. A tied weight appears
        under each of its names.
        """
        out = {}
        for mod_prefix, module in self.named_modules():
            for name, p in module._parameters.items():
                if p is not None:
                    out[_join(mod_prefix, name)] = p.data
            for name, b in module._buffers.items():
                if b is not None and name not in module._non_persistent:
                    out[_join(mod_prefix, name)] = b
        return out

    def load_state_dict(self, state: dict, strict: bool = True) -> LoadResult:
        """Copy ``state`` (name -> array, NumPy or CuPy) into the parameters, in place.

        Everything is checked before anything is copied, and every problem is reported
        at once in one ``CheckpointError``: missing keys and unexpected keys (only when
        ``strict``), shape mismatches and dtype mismatches (always). Floating arrays of
        another precision are cast, as torch does (a float16 checkpoint loads into a
        float32 model); any other dtype difference (int vs float) is an error.
        """
        targets = self._state_targets()
        missing = [k for k in targets if k not in state]
        unexpected = [k for k in state if k not in targets]
        bad_shape, bad_dtype = [], []
        for name, (get, _) in targets.items():
            if name not in state:
                continue
            have, want = state[name], get()
            if tuple(have.shape) != tuple(want.shape):
                bad_shape.append(
                    f"{name}: checkpoint {tuple(have.shape)}, model {tuple(want.shape)}"
                )
            elif have.dtype != want.dtype and not have.dtype.kind == want.dtype.kind == "f":
                bad_dtype.append(f"{name}: checkpoint {have.dtype}, model {want.dtype}")
        problems = []
        if strict and missing:
            problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if strict and unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if bad_shape:
            problems.append(f"shape mismatches ({len(bad_shape)}): {'; '.join(bad_shape)}")
        if bad_dtype:
            problems.append(f"dtype mismatches ({len(bad_dtype)}): {'; '.join(bad_dtype)}")
        if problems:
            raise CheckpointError(
                f"state dict does not fit {type(self).__name__}:\n  "
                + "\n  ".join(problems)
                + "\n(check that the checkpoint was saved from the same model config)"
            )
        for name, (get, put) in targets.items():
            if name in state:
                put(state[name])
        for module in self.modules():
            module.state_loaded()
        return LoadResult(missing, unexpected)

    def state_loaded(self) -> None:
        """Called on every module after ``load_state_dict`` wrote new values in place: a
        module that derives something from its arrays (a quantized layer's block
        scales) drops it here. Nothing by default."""

    def _state_targets(self) -> dict:
        """{name: (get current array, copy a new value in)} for every state_dict entry."""
        targets = {}
        for mod_prefix, module in self.named_modules():
            for name, p in module._parameters.items():
                if p is not None:
                    targets[_join(mod_prefix, name)] = (
                        lambda p=p: p.data,
                        lambda v, p=p: _copy_into(p.data, v),
                    )
            for name, b in module._buffers.items():
                if b is not None and name not in module._non_persistent:
                    targets[_join(mod_prefix, name)] = (
                        lambda m=module, n=name: m._buffers[n],
                        lambda v, m=module, n=name: _copy_into(m._buffers[n], v),
                    )
        return targets

    # ------------------------------------------------------------------ repr

    def extra_repr(self) -> str:
        """One line of settings shown after the class name (layers override it)."""
        return ""

    def __repr__(self) -> str:
        lines = [f"({name}): {_indent(repr(child))}" for name, child in self.named_children()]
        head = f"{type(self).__name__}({self.extra_repr()}"
        if not lines:
            return head + ")"
        return head + "\n  " + "\n  ".join(lines) + "\n)"


# --------------------------------------------------------------------------- helpers


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _indent(text: str) -> str:
    return text.replace("\n", "\n  ")


def _buffer_array(value):
    """Buffers are plain arrays (or None): a Tensor contributes its data."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        return value.data
    if not hasattr(value, "dtype"):
        value = np.asarray(value)
    return value


def _copy_into(target, value) -> None:
    """target[...] = value, across devices and float precisions, in place."""
    if isinstance(value, Tensor):
        value = value.data
    value = backend.to_device(value, backend.device_of(target))
    target[...] = value.astype(target.dtype, copy=False)

"""The layers adapters sit on (their hosts), as the weight-based methods (LoRA, IA3)
see them: float or quantized, their sizes, dtype and device, whether their weight is
tied to another module, and attaching one adapter to each host of a resolved target
list, so that nothing is half-installed when building one of them fails."""

from __future__ import annotations

import numpy as np

from tinylm import backend, ops
from tinylm.nn.module import Parameter
from tinylm.peft.base import install


def is_float_linear(host) -> bool:
    """Whether ``host`` holds a float weight Parameter (not a quantized one)."""
    w = getattr(host, "weight", None)
    return isinstance(w, Parameter) and w.dtype.kind == "f"


def packed_weight(host):
    """The packed weight of a quantized host (QuantLinear, QuantTiedHead)."""
    if hasattr(host, "packed"):
        return host.packed
    return host.embedding.packed


def host_dims(host) -> tuple:
    """(out_features, in_features, dtype, device) for the adapter's weights: the host's
    float dtype when it is float64, else float32 (adapters train in float32 on float16
    and quantized bases, as PEFT's autocast_adapter_dtype does)."""
    out, inp = host.out_features, host.in_features
    if is_float_linear(host):
        w = host.weight.data
        dtype = np.float64 if w.dtype == np.float64 else np.float32
        return out, inp, dtype, backend.device_of(w)
    packed = packed_weight(host)  # a quantized host: the device of its packed buffers
    return out, inp, np.float32, backend.device_of(next(iter(packed.arrays.values())))


def cast(t, dtype):
    """``t`` in ``dtype`` (itself when it is already)."""
    return t if t.dtype == dtype else ops.cast(t, dtype)


def tied_weights(model) -> set:
    """ids of the weights that more than one module holds (a tied lm_head)."""
    seen, tied = set(), set()
    for _, m in model.named_modules():
        w = m._parameters.get("weight")
        if w is not None:
            (tied if id(w) in seen else seen).add(id(w))
    return tied


def attach_per_host(model, targets: list, build) -> list:
    """One adapter on each host of ``targets`` (``tinylm.peft.targets.resolve``'s, in
    order): ``build(host, its targets)`` makes it, ``adapter.tied`` says whether the
    host's weight is tied to another module; they are installed once every one is
    built. Returns the hosts' names."""
    by_host: dict = {}
    for t in targets:
        by_host.setdefault(t.host_name, []).append(t)
    tied = tied_weights(model)
    built = []
    for ts in by_host.values():
        host = ts[0].host
        adapter = build(host, ts)
        adapter.tied = id(getattr(host, "weight", None)) in tied
        built.append((host, adapter))
    for host, adapter in built:  # everything built: nothing half-installed on errors
        install(host, adapter)
    return list(by_host)

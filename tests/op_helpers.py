"""Shared plumbing of the op tests (tests/ is on sys.path): run an op through tinylm
and through torch with the same inputs and output cotangent, and run it on a device.

Not an oracle itself: each test file writes its own NumPy reference.
"""

from __future__ import annotations

import numpy as np

from tinylm import backend, testing
from tinylm.tensor import Tensor


def is_float(a) -> bool:
    return isinstance(a, np.ndarray) and a.dtype.kind == "f"


def cotangent(shape, dtype, seed: int = 0) -> np.ndarray:
    return np.asarray(np.random.default_rng(seed).standard_normal(shape)).astype(dtype)


def tinylm_run(fn, *arrays, seed: int = 0, device: str = "cpu"):
    """(output, [grad of each float input], cotangent), all NumPy: forward, then backward
    from a seeded random cotangent. Float arrays become Tensors that require grad,
    other arrays constant Tensors, anything else is passed as is."""
    tensors = []
    for a in arrays:
        if isinstance(a, np.ndarray):
            tensors.append(Tensor(backend.to_device(a, device), requires_grad=is_float(a)))
        else:
            tensors.append(a)
    out = fn(*tensors)
    cot = cotangent(out.shape, out.dtype, seed)
    out.backward(backend.to_device(cot, device))
    grads = []
    for t, a in zip(tensors, arrays):
        if is_float(a):
            grads.append(np.zeros_like(a) if t.grad is None else backend.to_numpy(t.grad))
    return out.numpy(), grads, cot


def torch_run(torch, fn, *arrays, cot):
    """The same as ``tinylm_run`` through torch autograd, with the given cotangent."""
    tensors = []
    for a in arrays:
        if isinstance(a, np.ndarray):
            t = torch.tensor(a)
            tensors.append(t.requires_grad_(True) if is_float(a) else t)
        else:
            tensors.append(a)
    out = fn(*tensors)
    out.backward(torch.tensor(cot))
    grads = []
    for t, a in zip(tensors, arrays):
        if is_float(a):
            grads.append(np.zeros_like(a) if t.grad is None else t.grad.numpy())
    return out.detach().numpy(), grads


def check_torch(torch, fn, torch_fn, *arrays, rtol=None, atol=None, grad_rtol=None, grad_atol=None):
    """Value and gradients of ``fn`` (tinylm) and ``torch_fn`` agree on the same inputs."""
    out, grads, cot = tinylm_run(fn, *arrays)
    t_out, t_grads = torch_run(torch, torch_fn, *arrays, cot=cot)
    assert out.dtype == t_out.dtype, f"dtype {out.dtype} vs torch {t_out.dtype}"
    testing.assert_close(out, t_out, rtol=rtol, atol=atol, msg="value vs torch")
    grad_rtol = rtol if grad_rtol is None else grad_rtol
    grad_atol = atol if grad_atol is None else grad_atol
    for i, (g, tg) in enumerate(zip(grads, t_grads)):
        assert g.dtype == tg.dtype, f"grad {i} dtype {g.dtype} vs torch {tg.dtype}"
        testing.assert_close(g, tg, rtol=grad_rtol, atol=grad_atol, msg=f"grad of input {i} vs torch")


def check_device(device, fn, *arrays, rtol=1e-10, atol=1e-12, gradcheck: bool = True):
    """On ``device``: value and gradients equal the NumPy backend's, and gradcheck passes
    with the device's arrays. On "cpu" this is a cheap consistency rerun."""
    out, grads, _ = tinylm_run(fn, *arrays)
    d_out, d_grads, _ = tinylm_run(fn, *arrays, device=device)
    testing.assert_close(d_out, out, rtol=rtol, atol=atol, msg=f"value on {device} vs numpy")
    for i, (g, dg) in enumerate(zip(grads, d_grads)):
        testing.assert_close(dg, g, rtol=rtol, atol=atol, msg=f"grad {i} on {device} vs numpy")
    if gradcheck and any(is_float(a) and a.dtype == np.float64 for a in arrays):
        moved = [backend.to_device(a, device) if isinstance(a, np.ndarray) else a for a in arrays]
        testing.gradcheck(fn, *moved)

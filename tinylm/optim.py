"""Optimizers (SGD, AdamW), gradient clipping and learning-rate schedules.

Optimizers follow torch.optim: parameter groups with their own hyper-parameters,
``zero_grad()``, ``step()``, ``state_dict()``. Updates happen in place on ``p.data``
so a Parameter keeps its identity (and its array); ``p.grad`` is only ever read.

    opt = AdamW(param_groups_for_weight_decay(model, 0.1), lr=3e-4)
    for step in range(max_steps):
        set_lr(opt, cosine_with_warmup(step, 3e-4, 3e-5, 100, max_steps))
        loss = model(x, y); loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); opt.zero_grad()

Schedules are pure functions of the step (nanoGPT style), so resuming needs no
scheduler state.
"""

from __future__ import annotations

import math

import numpy as np

from tinylm import backend
from tinylm.autograd import no_grad
from tinylm.errors import CheckpointError, TinyLMError
from tinylm.kernels import fused, native
from tinylm.tensor import Tensor

# --------------------------------------------------------------------------- base


class Optimizer:
    """Holds ``param_groups`` (list of dicts: "params" + hyper-parameters) and
    per-parameter ``state``; subclasses write ``_update(p, grad, group, state)``."""

    def __init__(self, params, defaults: dict):
        self.defaults = defaults
        self.param_groups: list = []
        self.state: dict = {}  # Parameter -> {"step": int, arrays...}
        params = [params] if isinstance(params, Tensor) else list(params)
        if not params:
            raise TinyLMError("optimizer got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        for group in groups:
            self.add_param_group(group)

    def add_param_group(self, group: dict) -> None:
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        for p in params:
            if not isinstance(p, Tensor):
                raise TinyLMError(f"optimizer params must be Tensors, got {type(p).__name__}")
            if id(p) in seen:
                raise TinyLMError("a parameter appears in more than one parameter group")
            seen.add(id(p))
        unknown = set(group) - set(self.defaults) - {"params"}
        if unknown:
            raise TinyLMError(
                f"unknown hyper-parameters {sorted(unknown)} for {type(self).__name__}; "
                f"known: {sorted(self.defaults)}"
            )
        self.param_groups.append({**self.defaults, **group, "params": params})

    def zero_grad(self) -> None:
        """Set every parameter's gradient to None."""
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def step(self) -> None:
        """Update every parameter that has a gradient, once."""
        with no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state.setdefault(p, {"step": 0})
                    state["step"] += 1
                    self._update(p, p.grad, group, state)

    def _update(self, p, grad, group: dict, state: dict) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ state dict

    def _all_params(self) -> list:
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> dict:
        """A snapshot of plain data: {"state": {index: {"step": int, name: np.ndarray}},
        "param_groups": [{hyper-parameters..., "params": [index, ...]}]}.

        Parameters are numbered in group order, as in torch; the arrays are NumPy
        copies, so the snapshot does not change as training goes on.
        """
        index = {id(p): i for i, p in enumerate(self._all_params())}
        state = {}
        for p, s in self.state.items():
            state[index[id(p)]] = {
                k: (v if k == "step" else _snapshot(v)) for k, v in s.items()
            }
        groups = []
        for g in self.param_groups:
            groups.append({
                **{k: v for k, v in g.items() if k != "params"},
                "params": [index[id(p)] for p in g["params"]],
            })
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore hyper-parameters and state saved by ``state_dict`` into the same
        parameter layout; arrays go to each parameter's device and dtype."""
        saved_groups = state_dict["param_groups"]
        sizes = [len(g["params"]) for g in self.param_groups]
        saved_sizes = [len(g["params"]) for g in saved_groups]
        if sizes != saved_sizes:
            raise CheckpointError(
                f"optimizer state has parameter groups of sizes {saved_sizes} but this "
                f"optimizer has {sizes}; build the optimizer the same way it was saved"
            )
        params = self._all_params()
        new_state, problems = {}, []
        for key, saved in state_dict["state"].items():
            i = int(key)
            if not 0 <= i < len(params):
                problems.append(f"state for parameter {i}, which does not exist")
                continue
            p = params[i]
            entry = {}
            for name, value in saved.items():
                if name == "step":
                    entry[name] = int(value)
                    continue
                if tuple(value.shape) != p.shape:
                    problems.append(
                        f"state.{i}.{name}: shape {tuple(value.shape)}, parameter {p.shape}"
                    )
                    continue
                array = backend.to_device(np.asarray(value) if isinstance(value, list)
                                          else value, p.device)
                entry[name] = array.astype(p.dtype, copy=True)
            new_state[p] = entry
        if problems:
            raise CheckpointError("optimizer state does not fit: " + "; ".join(problems))
        for group, saved in zip(self.param_groups, saved_groups):
            for k, v in saved.items():
                if k != "params":
                    group[k] = tuple(v) if isinstance(v, list) else v
        self.state = new_state


def _snapshot(array) -> np.ndarray:
    """A NumPy copy of ``array`` (one copy only, also from the GPU)."""
    out = backend.to_numpy(array)
    return out.copy() if out is array else out


def flatten_state_dict(state_dict: dict) -> tuple:
    """Split an optimizer state dict into (arrays, meta) for safetensors + JSON.

    arrays: {"state.{i}.{name}": np.ndarray}; meta: everything else, JSON-ready
    ({"param_groups": [...], "steps": {"i": step}}). ``unflatten_state_dict`` inverts it.
    """
    arrays, steps = {}, {}
    for i, entry in state_dict["state"].items():
        for name, value in entry.items():
            if name == "step":
                steps[str(i)] = int(value)
            else:
                arrays[f"state.{i}.{name}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
              for g in state_dict["param_groups"]]
    return arrays, {"param_groups": groups, "steps": steps}


def unflatten_state_dict(arrays: dict, meta: dict) -> dict:
    """The inverse of ``flatten_state_dict``."""
    state: dict = {int(i): {"step": step} for i, step in meta["steps"].items()}
    for key, value in arrays.items():
        _, i, name = key.split(".", 2)
        state.setdefault(int(i), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


# --------------------------------------------------------------------------- SGD


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, exactly as torch.optim.SGD:

        g = grad + weight_decay * p
        buf = g (first step) or momentum * buf + (1 - dampening) * g
        g = g + momentum * buf (nesterov) or buf
        p -= lr * g
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0):
        _check_nonnegative(lr=lr, momentum=momentum, weight_decay=weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise TinyLMError("nesterov momentum needs momentum > 0 and dampening = 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      nesterov=nesterov, weight_decay=weight_decay))

    def _update(self, p, grad, group, state) -> None:
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        if wd != 0:
            grad = grad + wd * p.data  # a new array: p.grad is never written
        if momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = grad.copy()
            else:
                buf *= momentum
                buf += (1 - group["dampening"]) * grad
            grad = grad + momentum * buf if group["nesterov"] else buf
        p.data -= lr * grad


# --------------------------------------------------------------------------- AdamW


class AdamW(Optimizer):
    """Adam with decoupled weight decay, exactly as torch.optim.AdamW:

        p *= 1 - lr * weight_decay
        m += (1 - beta1) * (g - m);   v = beta2 * v + (1 - beta2) * g * g
        p -= lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

    (amsgrad uses the running maximum of v.) In place on the state arrays, with one
    temporary the size of the parameter (NumPy: of one L2-sized block, the update
    running block by block). On float32 CuPy
    arrays with TINYLM_FUSED_KERNELS=1 the step is one fused kernel per parameter
    (``tinylm.kernels.fused.adamw_step``), with no temporary.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, amsgrad: bool = False):
        _check_nonnegative(lr=lr, eps=eps, weight_decay=weight_decay)
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise TinyLMError(f"AdamW betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay, amsgrad=amsgrad))

    def _update(self, p, grad, group, state) -> None:
        xp = p.xp
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        if "exp_avg" not in state:
            state["exp_avg"] = xp.zeros_like(p.data)
            state["exp_avg_sq"] = xp.zeros_like(p.data)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = xp.zeros_like(p.data)
        m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
        vmax = state["max_exp_avg_sq"] if group["amsgrad"] else None
        if fused.usable(p.data, grad, m, v, vmax):
            fused.adamw_step(p.data, grad, m, v, vmax, lr=lr, beta1=beta1, beta2=beta2,
                             eps=eps, weight_decay=group["weight_decay"], step=t)
            return
        if (xp is np and p.data.size and native.usable(p.data, grad, m, v, vmax)
                and all(a.shape == p.data.shape for a in (grad, m, v, vmax) if a is not None)
                and p.data.flags.writeable):
            native.adamw_step(p.data, grad, m, v, vmax, lr=lr, beta1=beta1, beta2=beta2,
                              eps=eps, weight_decay=group["weight_decay"], step=t)
            return
        if _adamw_blocks(xp, p.data, grad, m, v, vmax):
            _adamw_blocked(p.data, grad, m, v, vmax, lr, beta1, beta2, eps,
                           group["weight_decay"], t)
            return
        if group["weight_decay"] != 0:
            p.data *= 1 - lr * group["weight_decay"]
        tmp = xp.subtract(grad, m)          # m <- lerp(m, g, 1 - beta1)
        tmp *= 1 - beta1
        m += tmp
        v *= beta2                          # v <- beta2 * v + (1 - beta2) * g^2
        xp.multiply(grad, grad, out=tmp)
        tmp *= 1 - beta2
        v += tmp
        if group["amsgrad"]:
            v = xp.maximum(state["max_exp_avg_sq"], v, out=state["max_exp_avg_sq"])

        step_size = lr / (1 - beta1**t)
        xp.sqrt(v, out=tmp)                 # denom = sqrt(v) / sqrt(1 - beta2^t) + eps
        tmp /= (1 - beta2**t) ** 0.5
        tmp += eps
        xp.divide(m, tmp, out=tmp)
        tmp *= step_size
        p.data -= tmp


# Elements per block of the NumPy AdamW update: five arrays of a block (p, grad, m, v,
# the temporary) take 1.25 MiB of float32, L2-resident on a 2 MiB-L2 core, so the
# update's ~13 passes read memory about 4 times instead of 13 (GPT-2 small, 124M
# parameters, one thread, 2-core SPR VM: 630 -> 350 ms a step).
ADAMW_BLOCK = 65536


def _adamw_blocks(xp, *arrays) -> bool:
    """Whether the blocked update runs: NumPy float32/float64 arrays of one dtype, all
    C-contiguous (flat views), large enough for blocks to matter."""
    arrays = [a for a in arrays if a is not None]
    first = arrays[0]
    return (xp is np and first.dtype.char in "fd" and first.size > ADAMW_BLOCK
            and all(type(a) is np.ndarray and a.dtype == first.dtype
                    and a.shape == first.shape and a.flags.c_contiguous for a in arrays))


def _adamw_blocked(p, grad, m, v, vmax, lr, beta1, beta2, eps, weight_decay, t) -> None:
    """AdamW._update's NumPy operations, in its order, per block of ADAMW_BLOCK
    elements: each is elementwise and correctly rounded, so the same bits."""
    flat = [a.reshape(-1) for a in (p, grad, m, v)]
    vmax_flat = vmax.reshape(-1) if vmax is not None else None
    decay = 1 - lr * weight_decay
    step_size = lr / (1 - beta1**t)
    bias2 = (1 - beta2**t) ** 0.5
    buf = np.empty(min(ADAMW_BLOCK, p.size), p.dtype)
    n = p.size
    for s in range(0, n, ADAMW_BLOCK):
        e = min(s + ADAMW_BLOCK, n)
        pb, gb, mb, vb = (a[s:e] for a in flat)
        tmp = buf[:e - s]
        if weight_decay != 0:
            pb *= decay
        np.subtract(gb, mb, out=tmp)
        tmp *= 1 - beta1
        mb += tmp
        vb *= beta2
        np.multiply(gb, gb, out=tmp)
        tmp *= 1 - beta2
        vb += tmp
        if vmax_flat is not None:
            vb = np.maximum(vmax_flat[s:e], vb, out=vmax_flat[s:e])
        np.sqrt(vb, out=tmp)
        tmp /= bias2
        tmp += eps
        np.divide(mb, tmp, out=tmp)
        tmp *= step_size
        pb -= tmp


def _check_nonnegative(**values) -> None:
    for name, value in values.items():
        if not value >= 0:
            raise TinyLMError(f"optimizer {name} must be >= 0, got {value}")


# --------------------------------------------------------------------------- groups


def param_groups_for_weight_decay(model, weight_decay: float) -> list:
    """Two groups, as nanoGPT does: parameters with ndim >= 2 (matmul weights AND
    embeddings) are decayed; ndim < 2 (biases, norm weights) are not. Frozen
    parameters (requires_grad=False) are left out. Both groups are always present,
    so the optimizer's state layout does not depend on the model."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


# --------------------------------------------------------------------------- clipping


def clip_grad_norm_(params, max_norm: float) -> float:
    """Scale all gradients together so their global L2 norm is at most ``max_norm``.

    Returns the norm before clipping (a float), as torch.nn.utils.clip_grad_norm_ does,
    and scales by max_norm / (norm + 1e-6) when that is below 1. Gradients are
    replaced by new arrays, never scaled in place. The norm is accumulated on the
    device in float32 (float64 for float64 gradients): one reduction per parameter and
    one transfer for the total. A non-finite norm is returned and nothing is scaled.
    """
    params = [params] if isinstance(params, Tensor) else list(params)
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    squares = []
    for p in grads:
        g = p.grad.ravel()
        g = g.astype(np.result_type(g.dtype, np.float32), copy=False)
        squares.append(g @ g)  # one BLAS reduction, no g*g temporary
    xp = grads[0].xp
    total = float(xp.sqrt(xp.stack([s.astype(np.float64) for s in squares]).sum()))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for p in grads:
            p.grad = p.grad * coef
    return total


# --------------------------------------------------------------------------- schedules


def cosine_with_warmup(step: int, max_lr: float, min_lr: float, warmup_steps: int,
                       decay_steps: int) -> float:
    """nanoGPT's learning rate at ``step`` (counted from 0).

    Linear warmup max_lr * (step + 1) / (warmup_steps + 1) for step < warmup_steps
    (as karpathy/nanoGPT's train.py get_lr), then a cosine from max_lr down to min_lr
    at step decay_steps, and min_lr after.

    >>> cosine_with_warmup(0, 1.0, 0.1, 9, 109), cosine_with_warmup(59, 1.0, 0.1, 9, 109)
    (0.1, 0.55)
    """
    if decay_steps < warmup_steps:
        raise TinyLMError(
            f"decay_steps ({decay_steps}) must be >= warmup_steps ({warmup_steps})"
        )
    if step < warmup_steps:
        return max_lr * (step + 1) / (warmup_steps + 1)
    if step >= decay_steps:  # (== decay_steps gives min_lr in the cosine too)
        return min_lr
    ratio = (step - warmup_steps) / (decay_steps - warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return min_lr + coeff * (max_lr - min_lr)


def linear_warmup_constant(step: int, max_lr: float, warmup_steps: int) -> float:
    """max_lr * (step + 1) / (warmup_steps + 1) during warmup, then max_lr."""
    if step < warmup_steps:
        return max_lr * (step + 1) / (warmup_steps + 1)
    return max_lr


def set_lr(optimizer: Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr

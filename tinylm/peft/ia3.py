"""IA3 (Liu et al., 2022, "(IA)^3"): learned vectors that rescale the keys, the values
and the feed-forward's inner activations of a frozen model, as PEFT defines them.

    model = peft.apply(model, "ia3")        # PEFT's defaults for the family
    model = peft.apply(model, "ia3", target_modules=["k_proj", "v_proj", "down_proj"],
                       feedforward_modules=["down_proj"])

On a target Linear y = W x + b:

    output target        y' = l * (W x + b)        l: ``ia3_l`` (out, 1), one per output row
    feedforward target   y' = W (l * x) + b        l: ``ia3_l`` (1, in), one per input column

(PEFT's shapes, so the HF adapter files carry them unchanged.) A feedforward target is
one the ``feedforward_modules`` patterns name (PEFT: a subset of the targets): the
MLP's down projection (GPT-2 ``mlp.c_proj``, Llama ``down_proj``), whose input is the
MLP's hidden activation. Defaults: PEFT's per-family ``target_modules`` and
``feedforward_modules`` (``tinylm.peft.targets``).

Fused hosts: tinylm's ``attn.qkv`` holds HF's q_proj, k_proj and v_proj as row slices;
IA3 on k_proj and v_proj scales those rows only (one ``ia3_l`` (rows, 1) per piece, in
a child named after the HF module: ``...attn.qkv.peft.default.k_proj.ia3_l``), the q
rows by 1. GPT-2's ``c_attn`` is all of qkv: every row has its scale, as in PEFT.

``init_ia3_weights`` True: ones (the adapted model starts as the base); False: N(0, 1)
(PEFT's torch.randn; for tests).

Merge folds l into the weight: output targets scale the rows of W and b, feedforward
targets the columns of W. ``unmerge`` restores the weights bit for bit: it divides
when the division gives every original element back exactly (all-ones vectors), and
otherwise puts back the copy that ``merge`` kept.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from tinylm import backend, ops
from tinylm.errors import ConfigError, TinyLMError
from tinylm.nn.module import Module, Parameter
from tinylm.peft.base import Adapter, PeftConfig, PeftMethod
from tinylm.peft.hosts import attach_per_host, cast, host_dims, is_float_linear
from tinylm.peft.targets import default_feedforward, default_targets, matches, resolve
from tinylm.tensor import Tensor


@dataclasses.dataclass(frozen=True)
class IA3Config(PeftConfig):
    """``target_modules`` / ``exclude_modules``: as LoRA's (None: PEFT's default for the
    family). ``feedforward_modules``: the targets whose input is scaled (None: PEFT's
    default for the family, or none for a model of no HF family); a list must be a
    subset of a list ``target_modules`` (PEFT's rule). ``fan_in_fan_out``: how HF
    stores the weight (None: from the target); it matters for the HF files only.
    ``init_ia3_weights``: True ones, False random. ``modules_to_save``: must be None."""

    target_modules: object = None
    feedforward_modules: object = None
    exclude_modules: object = None
    fan_in_fan_out: bool | None = None
    init_ia3_weights: bool = True
    modules_to_save: object = None

    def __post_init__(self):
        for what in ("target_modules", "feedforward_modules", "exclude_modules"):
            value = getattr(self, what)
            if isinstance(value, (list, set, frozenset)):
                object.__setattr__(self, what, tuple(value))
        targets, ff = self.target_modules, self.feedforward_modules
        if isinstance(targets, tuple) and isinstance(ff, tuple) and not set(ff) <= set(targets):
            raise ConfigError(f"ia3 feedforward_modules {sorted(set(ff) - set(targets))} are "
                              f"not in target_modules; list each feedforward module among "
                              f"the targets too (PEFT's rule)")
        if not isinstance(self.init_ia3_weights, bool):
            raise ConfigError(f"init_ia3_weights must be true or false, got "
                              f"{self.init_ia3_weights!r}")
        if self.fan_in_fan_out not in (None, True, False):
            raise ConfigError(f"fan_in_fan_out must be None, true or false, got "
                              f"{self.fan_in_fan_out!r}")
        if self.modules_to_save:
            raise ConfigError("modules_to_save is not supported by tinylm's IA3; to train a "
                              "whole module too, set requires_grad on its parameters")


def _float_weight(host):
    return host.weight if is_float_linear(host) else None


def _vector(shape, ones: bool, dtype, device) -> Parameter:
    data = np.ones(shape) if ones else backend.rng(np).standard_normal(shape)
    return Parameter(backend.to_device(data.astype(dtype), device))


class IA3Piece(Module):
    """The ``ia3_l`` (rows, 1) of one row slice of a fused host (HF's k_proj)."""


class IA3Adapter(Adapter):
    """IA3 on one host: its output rows (all, or row pieces) or its input columns."""

    method = "ia3"
    tied: ClassVar[bool] = False

    def __init__(self, name: str, host, targets: list, feedforward: bool, ones: bool):
        super().__init__(name)
        object.__setattr__(self, "_host", host)  # a reference, not a child
        out, inp, dtype, device = host_dims(host)
        self.out_features, self.in_features, self.feedforward = out, inp, feedforward
        self.pieces = []  # [(rows slice | None, holder of ia3_l)]
        if feedforward:
            self.ia3_l = _vector((1, inp), ones, dtype, device)
            self.pieces.append((None, self))
        for t in targets if not feedforward else ():
            holder = self if t.rows is None else IA3Piece()
            rows = out if t.rows is None else t.rows.stop - t.rows.start
            holder.ia3_l = _vector((rows, 1), ones, dtype, device)
            if t.rows is not None:
                self._modules[t.hf_name.rpartition(".")[2]] = holder  # "k_proj"
            self.pieces.append((t.rows, holder))
        self._saved = None  # merge: (weight, bias) as they were, when division is not exact

    def scale(self):
        """The (out,) output scale (ones between pieces), or the (in,) input scale."""
        if len(self.pieces) == 1 and self.pieces[0][0] is None:
            return ops.reshape(self.pieces[0][1].ia3_l, (-1,))
        dtype = self.pieces[0][1].ia3_l.dtype
        xp = self.pieces[0][1].ia3_l.xp
        parts, at = [], 0
        for rows, holder in self.pieces:
            if rows.start > at:
                parts.append(Tensor(xp.ones(rows.start - at, dtype)))
            parts.append(ops.reshape(holder.ia3_l, (-1,)))
            at = rows.stop
        if at < self.out_features:
            parts.append(Tensor(xp.ones(self.out_features - at, dtype)))
        return ops.concat(parts, axis=0)  # (out,)

    def before(self, host, args, kwargs):
        if not self.feedforward:
            return args, kwargs
        x, rest = (args[0], args[1:]) if args else (kwargs.pop("x"), ())
        l = self.scale()  # (in,)
        return (cast(cast(x, l.dtype) * l, x.dtype),) + tuple(rest), kwargs

    def after(self, host, args, kwargs, y):
        if self.feedforward:
            return y
        l = self.scale()  # (out,)
        return cast(cast(y, l.dtype) * l, y.dtype)

    # ---------------------------------------------------------------- merge

    def merge(self) -> None:
        """Scale the host's weight rows and bias (output targets) or weight columns
        (feedforward) by l, in place."""
        w = _float_weight(self._host)
        if w is None:
            raise TinyLMError(f"cannot merge IA3 into the quantized layer "
                              f"{type(self._host).__name__}; dequantize the model first "
                              f"(tinylm.quant.model.dequantize_model) and apply IA3 to that")
        if self.tied:
            raise TinyLMError(f"cannot merge IA3 into {type(self._host).__name__}: its weight is "
                              f"tied to another module (the embedding), which would change too")
        bias = getattr(self._host, "bias", None)
        b = None if bias is None or self.feedforward else bias.data
        l = self.scale().data  # (out,) or (in,), on the host's device
        xp = backend.get_array_module(w.data)
        old_w, old_b = w.data.copy(), None if b is None else b.copy()
        w.data[...] = old_w * (l[None, :] if self.feedforward else l[:, None]).astype(w.dtype)
        if b is not None:
            b[...] = old_b * l.astype(b.dtype)
        back_w, back_b = self._divided(l)
        exact = bool(xp.array_equal(back_w, old_w)) and (
            old_b is None or bool(xp.array_equal(back_b, old_b)))
        self._saved = None if exact else (old_w, old_b)
        self._merged = True

    def _divided(self, l):
        """(weight, bias) with l divided out again, or None where that is not exact."""
        w = _float_weight(self._host).data
        with np.errstate(divide="ignore", invalid="ignore"):
            back_w = w / (l[None, :] if self.feedforward else l[:, None]).astype(w.dtype)
            bias = getattr(self._host, "bias", None)
            back_b = None if bias is None or self.feedforward else bias.data / l.astype(
                bias.dtype)
        return back_w, back_b

    def unmerge(self) -> None:
        if not self._merged:
            return
        host, w = self._host, _float_weight(self._host)
        if self._saved is not None:
            old_w, old_b = self._saved
        else:
            old_w, old_b = self._divided(self.scale().data)
        w.data[...] = old_w
        if old_b is not None:
            host.bias.data[...] = old_b
        self._saved = None
        self._merged = False

    def forget_merge(self) -> None:
        """Keep the merged weights for good (merge_and_unload)."""
        self._saved = None

    def extra_repr(self) -> str:
        where = "input" if self.feedforward else ", ".join(
            "all rows" if r is None else f"rows {r.start}:{r.stop}" for r, _ in self.pieces)
        return f"{super().extra_repr()}, {where}"


class IA3(PeftMethod):
    """The "ia3" method."""

    name = "ia3"
    config_class = IA3Config

    def attach(self, model, config: IA3Config, adapter_name: str) -> list:
        patterns = config.target_modules
        ff = config.feedforward_modules
        if patterns is None:
            patterns = default_targets(model, "ia3")
        if ff is None:
            ff = _default_ff(model)
        targets = resolve(model, patterns, kinds=("linear",),
                          exclude_modules=config.exclude_modules)
        return attach_per_host(model, targets, lambda host, ts: IA3Adapter(
            adapter_name, host, ts, _is_feedforward(ff, ts), config.init_ia3_weights))


def _default_ff(model) -> tuple:
    """PEFT's feedforward default for the family; none for a model of no HF family."""
    from tinylm.peft.targets import family_of

    return tuple(default_feedforward(model, "ia3")) if family_of(model) else ()


def _is_feedforward(ff, targets: list) -> bool:
    """Whether the host of ``targets`` (one host's) scales its input."""
    if not ff:
        return False
    hits = [t for t in targets if matches(ff, t.host_name) or
            (t.hf_name is not None and matches(ff, t.hf_name))]
    if hits and any(t.rows is not None for t in targets):
        raise ConfigError(f"ia3: feedforward module {hits[0].hf_name} is rows of the fused "
                          f"{targets[0].host_name}, whose input its other rows share; scale "
                          f"its output (leave it out of feedforward_modules)")
    return bool(hits)

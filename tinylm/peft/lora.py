"""LoRA, rsLoRA and DoRA (as Hugging Face PEFT defines them) on Linear and quantized hosts.

LoRA adds a low-rank update to a frozen linear layer y = W x + b:

    y = W x + b + s * B (A dropout(x))       A (r, in), B (out, r), s = alpha / r
                                             (rsLoRA: s = alpha / sqrt(r))

DoRA (``use_dora``) also learns a magnitude per output row, m, initialised to
||W + s B A|| (row norms) so that the adapted layer starts where LoRA would:

    y = W x + b + (m / n - 1) * W x' + (m / n) * s * B (A x')
    n = ||W + s B A||_row, DETACHED (no gradient through it: the DoRA paper's section
    4.3, PEFT's ``weight_norm.detach()``); x' = dropout(x) (x itself without dropout,
    where PEFT reuses the base output W x).

Row-sliced hosts: tinylm fuses q, k, v into one ``attn.qkv``; LoRA on HF's q_proj and
v_proj are two PIECES on that host, each on its rows (its own A, B, r, alpha, m). The
pieces are computed together: h = x @ [A_q; A_v].T (one matmul), then one matmul with
B laid out block-wise on the host's rows (zero rows where no piece is), so the cost does
not grow with the number of pieces. The pieces of one host share a dropout mask.

Quantized hosts (``QuantLinear``, QLoRA): the base output comes from the packed weight
(``QuantMatmul``, whose backward gives dx = dy @ W tile by tile), the LoRA weights are
float32, and no float copy of W is kept. DoRA's row norms there come from
||W_r||^2 (computed once) + 2 s <B_r, (A W^T)_r> + s^2 ||(B A)_r||^2, A W^T by the
quantized matmul. Quantized hosts cannot merge (dequantize the model first).

Parameter names: a whole host holds ``lora_A``, ``lora_B`` (and ``lora_magnitude``)
under ``<host>.peft.<adapter>.``; a sliced host holds one child per piece named after
the HF module (``...attn.qkv.peft.default.q_proj.lora_A``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import ClassVar

import numpy as np

from tinylm import backend, ops
from tinylm.errors import ConfigError, TinyLMError
from tinylm.nn.module import Module, Parameter
from tinylm.peft.base import Adapter, PeftConfig, PeftMethod
from tinylm.peft.hosts import attach_per_host, cast, host_dims, is_float_linear, packed_weight
from tinylm.peft.targets import default_targets, resolve
from tinylm.tensor import Tensor

BIAS_OPTIONS = ("none", "all", "lora_only")


@dataclasses.dataclass(frozen=True)
class LoraConfig(PeftConfig):
    """LoRA's options, with PEFT's meanings (``lora_alpha`` and ``lora_dropout`` are
    accepted as aliases of ``alpha`` and ``dropout``).

    ``target_modules``: None (PEFT's default for the family), a regex (fullmatch) or
    a list of names / name suffixes, in tinylm's or HF's names (tinylm.peft.targets).
    ``rank_pattern`` / ``alpha_pattern``: {pattern: r / alpha} for the modules whose
    name matches ``(.*\\.)?(pattern)$`` (PEFT's rule; the first pattern that matches).
    ``bias``: also train every bias ("all") or the adapted layers' biases
    ("lora_only"). ``init_lora_weights``: True (A kaiming-uniform, B = 0: the adapter
    starts as the identity), "gaussian" (A ~ N(0, 1/r), B = 0) or False (A and B
    random: for tests). ``fan_in_fan_out``: how HF stores the weight (None: from the
    target, True for GPT-2's Conv1D); tinylm computes the same either way, it matters
    for the HF adapter files. ``modules_to_save`` is not supported (must be None)."""

    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    target_modules: object = None
    exclude_modules: object = None
    use_rslora: bool = False
    use_dora: bool = False
    bias: str = "none"
    init_lora_weights: object = True
    fan_in_fan_out: bool | None = None
    rank_pattern: dict = dataclasses.field(default_factory=dict)
    alpha_pattern: dict = dataclasses.field(default_factory=dict)
    modules_to_save: object = None
    aliases: ClassVar[dict] = {"lora_alpha": "alpha", "lora_dropout": "dropout"}

    def __post_init__(self):
        _positive_int(self.r, "r")
        if not _number(self.alpha):
            raise ConfigError(f"lora alpha must be a number, got {self.alpha!r}")
        if not _number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        if self.bias not in BIAS_OPTIONS:
            raise ConfigError(f"lora bias must be one of {', '.join(BIAS_OPTIONS)}, got "
                              f"{self.bias!r}")
        init = self.init_lora_weights
        if not (isinstance(init, bool) or (isinstance(init, str) and init == "gaussian")):
            raise ConfigError(f"init_lora_weights must be True, False or 'gaussian', got "
                              f"{self.init_lora_weights!r} (PEFT's other inits are not "
                              f"supported)")
        if self.fan_in_fan_out not in (None, True, False):
            raise ConfigError(f"fan_in_fan_out must be None, true or false, got "
                              f"{self.fan_in_fan_out!r}")
        if self.modules_to_save:
            raise ConfigError("modules_to_save is not supported by tinylm's LoRA; to train "
                              "a whole module too, set requires_grad on its parameters")
        for what, pattern, check in (("rank_pattern", self.rank_pattern, _positive_int),
                                     ("alpha_pattern", self.alpha_pattern, _number_value)):
            if not isinstance(pattern, dict):
                raise ConfigError(f"{what} must be a dict {{pattern: value}}, got {pattern!r}")
            for key, value in pattern.items():
                check(value, f"{what}[{key!r}]")
        for what in ("target_modules", "exclude_modules"):
            value = getattr(self, what)
            if isinstance(value, (list, set, frozenset)):
                object.__setattr__(self, what, tuple(value))
        for k, v in (("use_rslora", self.use_rslora), ("use_dora", self.use_dora)):
            if not isinstance(v, bool):
                raise ConfigError(f"{k} must be true or false, got {v!r}")

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _number_value(v, what) -> None:
    if not _number(v):
        raise ConfigError(f"{what} must be a number, got {v!r}")


def _positive_int(v, what) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ConfigError(f"lora {what} must be a positive integer, got {v!r}")


def pattern_value(pattern: dict, names, default):
    """PEFT's ``get_pattern_key``: the value of the first key that matches one of
    ``names`` as ``(.*\\.)?(key)$``, else ``default``."""
    for key, value in pattern.items():
        if any(n is not None and re.match(rf"(.*\.)?({key})$", n) for n in names):
            return value
    return default


# --------------------------------------------------------------------------- the weights


class _Piece:
    """The plain facts of one piece: where its weights live (``holder``: the adapter
    itself or a child), its rows, rank, alpha, scaling and HF target."""

    def __init__(self, holder, target, r, alpha, scaling, fan_in_fan_out):
        self.holder, self.target, self.rows = holder, target, target.rows
        self.r, self.alpha, self.scaling = r, alpha, scaling
        self.fan_in_fan_out = fan_in_fan_out

    @property
    def name(self) -> str:
        """The piece's child name ("q_proj"), "" for a whole host."""
        return "" if self.rows is None else self.target.hf_name.rpartition(".")[2]


class LoraPiece(Module):
    """The weights of one row slice of a host: lora_A (r, in), lora_B (rows, r), and
    lora_magnitude (rows,) with DoRA."""


def _init_weights(holder, config, r, inp, rows, dtype, device) -> None:
    """PEFT's init (``reset_lora_parameters``): kaiming-uniform with a = sqrt(5) is
    U(-1/sqrt(in), 1/sqrt(in)), what nn.Linear draws; B zeros, or (init False) B drawn
    as nn.Linear(r, rows) would."""
    gen = backend.rng(np)
    init = config.init_lora_weights
    if init == "gaussian":
        a = gen.normal(0.0, 1.0 / r, (r, inp))
    else:
        a = gen.uniform(-1.0 / math.sqrt(inp), 1.0 / math.sqrt(inp), (r, inp))
    if init is False:
        b = gen.uniform(-1.0 / math.sqrt(r), 1.0 / math.sqrt(r), (rows, r))
    else:
        b = np.zeros((rows, r))
    holder.lora_A = Parameter(backend.to_device(a.astype(dtype), device))
    holder.lora_B = Parameter(backend.to_device(b.astype(dtype), device))


# --------------------------------------------------------------------------- the adapter


class LoraAdapter(Adapter):
    """LoRA / DoRA on one host (all of it, or several row pieces of it)."""

    method = "lora"

    def __init__(self, name: str, host, targets: list, config: LoraConfig):
        super().__init__(name)
        object.__setattr__(self, "_host", host)  # a reference, not a child
        self.dropout, self.use_dora = float(config.dropout), config.use_dora
        self.out_features, self.in_features, dtype, device = host_dims(host)
        self._saved = None  # merge: [(rows, the rows as they were)]
        self._wnorm2 = None  # quantized DoRA: ||W_r||^2 of each piece's rows
        pieces = []
        for t in targets:
            names = (t.hf_name, t.host_name)
            r = pattern_value(config.rank_pattern, names, config.r)
            alpha = pattern_value(config.alpha_pattern, names, config.alpha)
            ff = t.fan_in_fan_out if config.fan_in_fan_out is None else config.fan_in_fan_out
            holder = self if t.rows is None else LoraPiece()
            piece = _Piece(holder, t, r, alpha, config.scaling(r, alpha), ff)
            rows = self.out_features if t.rows is None else t.rows.stop - t.rows.start
            _init_weights(holder, config, r, self.in_features, rows, dtype, device)
            if t.rows is not None:
                self._modules[piece.name] = holder  # any name is safe as a key
            pieces.append(piece)
        self.pieces = pieces
        if self.use_dora:
            for p in pieces:
                norm = self._weight_norm(p, p.holder.lora_A.data, p.holder.lora_B.data)
                p.holder.lora_magnitude = Parameter(norm.astype(dtype))

    @property
    def host(self):
        return self._host

    # ---------------------------------------------------------------- forward

    def after(self, host, args, kwargs, y):
        x = args[0] if args else next(iter(kwargs.values()))
        a0 = self.pieces[0].holder.lora_A
        xa = x if x.dtype == a0.dtype else ops.cast(x, a0.dtype)
        drop = self.training and self.dropout > 0.0
        xd = ops.dropout(xa, self.dropout, training=True) if drop else xa
        if len(self.pieces) == 1 and self.pieces[0].rows is None:
            p = self.pieces[0].holder
            lora = ops.linear(ops.linear(xd, p.lora_A), p.lora_B)  # (..., out)
            scale = self.pieces[0].scaling
        else:
            lora, scale = self._sliced_lora(xd)  # (..., out), the rows of each piece
        if not self.use_dora:
            return y + cast(lora * scale, y.dtype)
        ms = self._magnitude_scale(xd.xp)  # (out,) m / n, 1 where no piece is
        base = self._base_without_bias(host, y, xd if drop else None)  # (..., out)
        dora = (ms - 1.0) * cast(base, ms.dtype) + ms * lora * scale
        return y + cast(dora, y.dtype)

    def _sliced_lora(self, xd):
        """(x @ A_all.T) @ B_full.T: every piece's B (x A.T) on its rows, zero elsewhere
        (the scalings folded into h when they differ)."""
        xp, dtype = xd.xp, xd.dtype
        a_all = ops.concat([p.holder.lora_A for p in self.pieces], axis=0)  # (R, in)
        h = ops.linear(xd, a_all)  # (..., R)
        scales = [p.scaling for p in self.pieces]
        scale = scales[0]
        if any(s != scale for s in scales):
            h = h * Tensor(xp.asarray(np.concatenate(
                [np.full(p.r, p.scaling) for p in self.pieces]), dtype=dtype))
            scale = 1.0
        cols = []
        for p in self.pieces:
            parts, start, stop = [], p.rows.start, p.rows.stop
            if start > 0:
                parts.append(Tensor(xp.zeros((start, p.r), dtype)))
            parts.append(p.holder.lora_B)
            if stop < self.out_features:
                parts.append(Tensor(xp.zeros((self.out_features - stop, p.r), dtype)))
            cols.append(ops.concat(parts, axis=0) if len(parts) > 1 else parts[0])
        b_full = ops.concat(cols, axis=1) if len(cols) > 1 else cols[0]  # (out, R)
        return ops.linear(h, b_full), scale

    def _magnitude_scale(self, xp):
        """m / ||W + s B A||_row over the host's rows (norm detached), ones between pieces."""
        parts, at = [], 0
        dtype = self.pieces[0].holder.lora_A.dtype
        for p in self.pieces:
            rows = p.rows or slice(0, self.out_features)
            if rows.start > at:
                parts.append(Tensor(xp.ones(rows.start - at, dtype)))
            norm = self._weight_norm(p, p.holder.lora_A.data, p.holder.lora_B.data)
            parts.append(p.holder.lora_magnitude / Tensor(norm.astype(dtype)))
            at = rows.stop
        if at < self.out_features:
            parts.append(Tensor(xp.ones(self.out_features - at, dtype)))
        return ops.concat(parts, axis=0) if len(parts) > 1 else parts[0]

    def _base_without_bias(self, host, y, xd):
        """W x (PEFT's ``base_result - bias``), or W dropout(x) when dropout acts."""
        base = y if xd is None else host.forward(cast(xd, y.dtype))
        bias = getattr(host, "bias", None)
        return base if bias is None else base - bias

    def _weight_norm(self, p: _Piece, a, b):
        """||W_rows + s B A|| per row (an array: no gradient), W as the host holds it now."""
        rows = p.rows or slice(0, self.out_features)
        host = self._host
        if is_float_linear(host):
            w = host.weight.data[rows]
            xp = backend.get_array_module(w)
            full = w.astype(a.dtype) + p.scaling * (b @ a)
            return xp.sqrt((full * full).sum(axis=1))
        return self._quant_weight_norm(p, rows, a, b)

    def _quant_weight_norm(self, p: _Piece, rows, a, b):
        """The row norms from the packed weight, without a float copy of it:
        ||W_r||^2 + 2 s (B (A W^T)^T)_r... expanded (see the module docstring)."""
        from tinylm.quant import kernels

        packed = packed_weight(self._host)
        if self._wnorm2 is None:
            self._wnorm2 = {}
        key = (rows.start, rows.stop)
        if key not in self._wnorm2:
            w_rows = kernels.dequantize(kernels.select_rows(packed, np.arange(*key)))
            self._wnorm2[key] = (w_rows.astype(np.float64) ** 2).sum(axis=1)
        aw = kernels.matmul(np.ascontiguousarray(a, np.float32), packed)[:, rows]  # (r, rows)
        a64, b64, s = a.astype(np.float64), b.astype(np.float64), p.scaling
        cross = (b64 * aw.T.astype(np.float64)).sum(axis=1)
        ba = b64 @ a64
        sq = self._wnorm2[key] + 2.0 * s * cross + s * s * (ba * ba).sum(axis=1)
        return np.sqrt(np.maximum(sq, 0.0))

    # ---------------------------------------------------------------- merge

    def merge(self) -> None:
        """Add s B A (DoRA: rescale the rows to m) into the host's weight rows, keeping
        the rows as they were so that ``unmerge`` restores them bit for bit."""
        host = self._host
        if not is_float_linear(host):
            raise TinyLMError(f"cannot merge LoRA into the quantized layer {self._host_label()}"
                              f"; dequantize the model first (tinylm.quant.model."
                              f"dequantize_model) and apply the adapter to that")
        if getattr(self, "tied", False):
            raise TinyLMError(f"cannot merge LoRA into {self._host_label()}: its weight is "
                              f"tied to another module (the embedding), which would change too")
        w = host.weight.data
        saved = []
        for p in self.pieces:
            rows = p.rows or slice(0, self.out_features)
            a, b = p.holder.lora_A.data, p.holder.lora_B.data
            old = w[rows].copy()
            new = old + (p.scaling * (b @ a)).astype(w.dtype)
            if self.use_dora:
                norm = self._weight_norm(p, a, b)
                new = (p.holder.lora_magnitude.data / norm)[:, None] * new
            saved.append((rows, old))
            w[rows] = new.astype(w.dtype)
        self._saved = saved
        self._merged = True

    def unmerge(self) -> None:
        if not self._merged:
            return
        w = self._host.weight.data
        for rows, old in reversed(self._saved):
            w[rows] = old
        self._saved = None
        self._merged = False

    def forget_merge(self) -> None:
        """Keep the merged weights for good (merge_and_unload)."""
        self._saved = None

    def _host_label(self) -> str:
        return f"{type(self._host).__name__}({self.in_features} -> {self.out_features})"

    def extra_repr(self) -> str:
        ps = ", ".join(f"{p.name or 'all'}: r={p.r}, s={p.scaling:g}" for p in self.pieces)
        return f"{self.name!r}, {ps}" + (", dora" if self.use_dora else "") + \
            (", merged" if self.merged else "")


# --------------------------------------------------------------------------- the method


class LoRA(PeftMethod):
    """The "lora" method (DoRA with ``use_dora=True``, rsLoRA with ``use_rslora``)."""

    name = "lora"
    config_class = LoraConfig

    def attach(self, model, config: LoraConfig, adapter_name: str) -> list:
        patterns = config.target_modules
        if patterns is None:
            patterns = default_targets(model, "lora")
        targets = resolve(model, patterns, kinds=("linear",),
                          exclude_modules=config.exclude_modules)
        return attach_per_host(model, targets,
                               lambda host, ts: LoraAdapter(adapter_name, host, ts, config))

    def trainable_base(self, model, config: LoraConfig, hosts: list) -> list:
        """PEFT's ``bias``: "all" trains every bias, "lora_only" the adapted hosts'."""
        if config.bias == "none":
            return []
        if config.bias == "all":
            return [n for n, _ in model.named_parameters()
                    if n.rpartition(".")[2] == "bias" and ".peft." not in f".{n}"]
        modules = dict(model.named_modules())
        return [f"{h}.bias" for h in hosts if getattr(modules[h], "bias", None) is not None]

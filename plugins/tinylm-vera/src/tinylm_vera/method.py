"""VeRA (Kopiczko et al. 2023, arXiv:2310.11454) as Hugging Face PEFT computes it.

One pair of FROZEN random matrices is shared by every adapted layer of an adapter,
and each layer trains two vectors only:

    y = W x + b + lambda_b * (B[:out] (lambda_d * (A[:, :in] dropout(x))))

    A (r, max_in), B (max_out, r)   drawn once from projection_prng_key (kaiming
                                     uniform, tinylm_vera.projection), sized by the
                                     largest in / out features among the targets;
                                     a layer uses the top-left corner it needs
    lambda_d (r,)                   trained, starts at d_initial (PEFT: 0.1)
    lambda_b (out,)                 trained, starts at 0 (the adapter starts as the identity)

Where it lives: the shared pair is a persistent buffer of a ``VeraProjection`` adapter
on the model itself (``peft.<adapter>.vera_A`` / ``vera_B``: one copy, saved with the
model; it does nothing in the forward). Each adapted host holds its vectors,
``<host>.peft.<adapter>.vera_lambda_b`` / ``vera_lambda_d``; on tinylm's fused
``attn.qkv`` an HF row slice (Llama's ``q_proj``, ``k_proj``) is a PIECE with its own
vectors under a child named after the HF module (``...qkv.peft.default.q_proj.``),
and, as in PEFT where ``k_proj`` is its own module, each piece uses B from row 0:
B[:rows of the piece]. The pieces of a host share h = A[:, :in] x (one matmul, the
same in_features) and one dropout mask (PEFT draws one per module), and their outputs
come from one matmul with a block matrix laid out on the host's rows.

Merging adds (lambda_b B) (lambda_d A) into the host's weight rows and keeps the rows
it replaced, so ``unmerge`` restores them bit for bit (float hosts only).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import numpy as np

import tinylm
from tinylm import ConfigError, TinyLMError, nn, ops, peft

from tinylm_vera.projection import projections


@dataclasses.dataclass(frozen=True)
class VeraConfig(peft.PeftConfig):
    """VeRA's options, PEFT's ``VeraConfig`` with its meanings (``vera_dropout`` is
    accepted for ``dropout``).

    ``r``: the shared projections' rank (PEFT's default 256: VeRA trains r + out numbers
    per layer, so r can be large). ``target_modules``: None (PEFT's default for the
    family, LoRA's), a regex (fullmatch) or a list of names / name suffixes, tinylm's
    or HF's (``tinylm.peft.resolve``); linear layers only. ``projection_prng_key``: the
    seed A and B are drawn from (the same numbers as PEFT's torch generator).
    ``save_projection``: write A and B into PEFT folders (else they are redrawn from
    the key on load). ``d_initial``: lambda_d's start. ``init_weights`` False starts
    lambda_b at ones and lambda_d random (PEFT's: for tests; the adapter then changes
    the model from the start)."""

    r: int = 256
    target_modules: object = None
    projection_prng_key: int = 0
    save_projection: bool = True
    dropout: float = 0.0
    d_initial: float = 0.1
    init_weights: bool = True
    aliases: ClassVar[dict] = {"vera_dropout": "dropout"}

    def __post_init__(self):
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"vera r must be a positive integer, got {self.r!r}")
        key = self.projection_prng_key
        if not isinstance(key, int) or isinstance(key, bool):
            raise ConfigError(f"projection_prng_key must be an integer, got {key!r}")
        if not _number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"vera dropout must be in [0, 1), got {self.dropout!r}")
        if not _number(self.d_initial):
            raise ConfigError(f"d_initial must be a number, got {self.d_initial!r}")
        for what in ("save_projection", "init_weights"):
            if not isinstance(getattr(self, what), bool):
                raise ConfigError(f"{what} must be true or false, got {getattr(self, what)!r}")
        if isinstance(self.target_modules, (list, set, frozenset)):
            value = self.target_modules
            object.__setattr__(self, "target_modules",
                               tuple(sorted(value) if not isinstance(value, list) else value))


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# --------------------------------------------------------------------------- adapters


class VeraProjection(peft.Adapter):
    """The shared frozen pair of one VeRA adapter, on the model itself: buffers
    ``vera_A`` (r, max_in) and ``vera_B`` (max_out, r), float32. It changes nothing in
    the forward (and merges as a no-op); the ``VeraAdapter``s read it."""

    method = "vera"

    def __init__(self, name: str, a: np.ndarray, b: np.ndarray, device: str):
        super().__init__(name)
        self.register_buffer("vera_A", tinylm.tensor(a, device=device).data)
        self.register_buffer("vera_B", tinylm.tensor(b, device=device).data)

    def merge(self) -> None:
        self._merged = True

    def unmerge(self) -> None:
        self._merged = False

    def extra_repr(self) -> str:
        return f"{self.name!r}, A {tuple(self.vera_A.shape)}, B {tuple(self.vera_B.shape)}"


class VeraPiece(nn.Module):
    """The vectors of one HF row slice of a host: vera_lambda_b (rows,), vera_lambda_d (r,)."""


class _Piece:
    """Where a piece's vectors live (the adapter or a child), its rows and HF module."""

    def __init__(self, holder, target, n_rows: int):
        self.holder, self.target, self.rows, self.n_rows = holder, target, target.rows, n_rows

    @property
    def name(self) -> str:
        """The child name ("q_proj"), "" for a whole host."""
        return "" if self.rows is None else self.target.hf_name.rpartition(".")[2]


def _host_dtype_device(host) -> tuple:
    """The vectors' dtype (float64 on a float64 host, else float32, as LoRA) and device."""
    w = getattr(host, "weight", None)
    if isinstance(w, nn.Parameter) and w.dtype.kind == "f":
        return (np.float64 if w.dtype == np.float64 else np.float32), w.device
    return np.float32, "cpu"  # a quantized host: the adapter trains in float32


def _is_float_host(host) -> bool:
    w = getattr(host, "weight", None)
    return isinstance(w, nn.Parameter) and w.dtype.kind == "f"


class VeraAdapter(peft.Adapter):
    """VeRA on one host: all of it, or several HF row pieces of it."""

    method = "vera"

    def __init__(self, name: str, host, targets: list, config: VeraConfig, shared):
        super().__init__(name)
        object.__setattr__(self, "_host", host)  # references, not children
        object.__setattr__(self, "_shared", shared)
        self.dropout = float(config.dropout)
        self.in_features, self.out_features = host.in_features, host.out_features
        dtype, device = _host_dtype_device(host)
        self.r = config.r
        self.pieces = []
        for t in targets:
            n = self.out_features if t.rows is None else t.rows.stop - t.rows.start
            holder = self if t.rows is None else VeraPiece()
            if config.init_weights:
                b, d = np.zeros(n), np.full(config.r, float(config.d_initial))
            else:
                b, d = np.ones(n), tinylm.randn(config.r).data
            holder.vera_lambda_b = nn.Parameter(b.astype(dtype), device=device)
            holder.vera_lambda_d = nn.Parameter(np.asarray(d).astype(dtype), device=device)
            piece = _Piece(holder, t, n)
            if t.rows is not None:
                self._modules[piece.name] = holder  # any name is safe as a key
            self.pieces.append(piece)
        self._saved = None  # merge: [(rows, the rows as they were)]
        self.tied = False

    def _a_b(self, dtype):
        """A[:, :in] (r, in) and B (max_out, r) as arrays of ``dtype`` (no gradient)."""
        a = self._shared.vera_A[:, : self.in_features]
        b = self._shared.vera_B
        return (a if a.dtype == dtype else a.astype(dtype)), (b if b.dtype == dtype else
                                                            b.astype(dtype))

    # ---------------------------------------------------------------- forward

    def after(self, host, args, kwargs, y):
        x = args[0] if args else next(iter(kwargs.values()))
        lb0 = self.pieces[0].holder.vera_lambda_b
        xa = x if x.dtype == lb0.dtype else ops.cast(x, lb0.dtype)
        if self.training and self.dropout > 0.0:
            xa = ops.dropout(xa, self.dropout, training=True)
        a, b = self._a_b(lb0.dtype)
        h = ops.linear(xa, tinylm.Tensor(a))  # (..., r)
        if len(self.pieces) == 1 and self.pieces[0].rows is None:
            p = self.pieces[0]
            delta = ops.linear(h * p.holder.vera_lambda_d,
                               tinylm.Tensor(b[: self.out_features])) * p.holder.vera_lambda_b
        else:
            hd = ops.concat([h * p.holder.vera_lambda_d for p in self.pieces], axis=-1)
            delta = ops.linear(hd, self._block_b(b, xa.xp))  # (..., out)
        return y + (delta if delta.dtype == y.dtype else ops.cast(delta, y.dtype))

    def _block_b(self, b, xp):
        """(out, P r): piece p's column block is lambda_b_p[:, None] * B[:rows_p] on its
        rows, zero elsewhere, so one matmul gives every piece's output on its rows."""
        cols, dtype = [], b.dtype
        for p in self.pieces:
            scaled = ops.reshape(p.holder.vera_lambda_b, (p.n_rows, 1)) * \
                tinylm.Tensor(b[: p.n_rows])  # (rows, r)
            parts, start, stop = [], p.rows.start, p.rows.stop
            if start > 0:
                parts.append(tinylm.Tensor(xp.zeros((start, self.r), dtype)))
            parts.append(scaled)
            if stop < self.out_features:
                parts.append(tinylm.Tensor(xp.zeros((self.out_features - stop, self.r), dtype)))
            cols.append(ops.concat(parts, axis=0) if len(parts) > 1 else parts[0])
        return ops.concat(cols, axis=1) if len(cols) > 1 else cols[0]

    # ---------------------------------------------------------------- merge

    def delta_weight(self, p: _Piece):
        """(lambda_b B[:rows]) (lambda_d A[:, :in]): piece ``p``'s (rows, in) update (an array)."""
        lb, ld = p.holder.vera_lambda_b.data, p.holder.vera_lambda_d.data
        a, b = self._a_b(lb.dtype)
        return (lb[:, None] * b[: p.n_rows]) @ (ld[:, None] * a)

    def merge(self) -> None:
        """Add every piece's update into the host's weight rows, keeping the rows as
        they were for ``unmerge``."""
        host = self._host
        label = f"{type(host).__name__}({self.in_features} -> {self.out_features})"
        if not _is_float_host(host):
            raise TinyLMError(f"cannot merge VeRA into the quantized layer {label}; dequantize "
                              f"the model first and apply the adapter to that")
        if self.tied:
            raise TinyLMError(f"cannot merge VeRA into {label}: its weight is tied to another "
                              f"module (the embedding), which would change too")
        w = host.weight.data
        saved = []
        for p in self.pieces:
            rows = p.rows or slice(0, self.out_features)
            old = w[rows].copy()
            w[rows] = old + self.delta_weight(p).astype(w.dtype)
            saved.append((rows, old))
        self._saved, self._merged = saved, True

    def unmerge(self) -> None:
        if not self._merged:
            return
        w = self._host.weight.data
        for rows, old in reversed(self._saved):
            w[rows] = old
        self._saved, self._merged = None, False

    def forget_merge(self) -> None:
        """Keep the merged weights for good (merge_and_unload)."""
        self._saved = None

    def extra_repr(self) -> str:
        ps = ", ".join(p.name or "all" for p in self.pieces)
        return f"{self.name!r}, r={self.r}, {ps}" + (", merged" if self.merged else "")


# --------------------------------------------------------------------------- the method


class Vera(peft.PeftMethod):
    """The "vera" method; PEFT's folder format through ``tinylm_vera.hf_format``."""

    name = "vera"
    config_class = VeraConfig
    peft_type = "VERA"

    def attach(self, model, config: VeraConfig, adapter_name: str) -> list:
        patterns = config.target_modules
        if patterns is None:
            patterns = peft.default_targets(model, "lora")  # PEFT: VeRA's are LoRA's
        targets = peft.resolve(model, patterns, kinds=("linear",))
        by_host: dict = {}
        for t in targets:
            by_host.setdefault(t.host_name, []).append(t)
        max_in = max(t.host.in_features for t in targets)
        max_out = max(t.host.out_features if t.rows is None else t.rows.stop - t.rows.start
                      for t in targets)
        a, b = projections(config.projection_prng_key, config.r, max_in, max_out)
        shared = VeraProjection(adapter_name, a, b, _host_dtype_device(targets[0].host)[1])
        tied = _tied_weights(model)
        built = []
        for ts in by_host.values():
            adapter = VeraAdapter(adapter_name, ts[0].host, ts, config, shared)
            adapter.tied = id(getattr(ts[0].host, "weight", None)) in tied
            built.append((ts[0].host, adapter))
        peft.install(model, shared)  # everything built: nothing half-installed on errors
        for host, adapter in built:
            peft.install(host, adapter)
        return list(by_host)

    def to_peft_state(self, model, adapter_name, config):
        from tinylm_vera.hf_format import to_peft_state

        return to_peft_state(model, adapter_name, config)

    def from_peft_state(self, model, fields, tensors, adapter_name, path):
        from tinylm_vera.hf_format import from_peft_state

        return from_peft_state(model, fields, tensors, adapter_name, path)


def _tied_weights(model) -> set:
    """ids of the weights that more than one module holds (a tied lm_head)."""
    seen, tied = set(), set()
    for _, m in model.named_modules():
        w = dict(m.named_parameters(recurse=False)).get("weight")
        if w is not None:
            (tied if id(w) in seen else seen).add(id(w))
    return tied

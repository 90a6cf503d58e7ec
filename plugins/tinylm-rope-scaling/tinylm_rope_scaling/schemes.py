"""The positional schemes: RoPE subclasses for dynamic NTK and YaRN, and how each reads
and writes Hugging Face's ``rope_parameters`` / ``rope_scaling`` (``hf_rope_type``,
``from_hf_rope``, ``to_hf_rope``: the hooks ``tinylm.models.hf`` calls for a rope_type
a positional scheme claims).

In a model config:

    positional = "yarn"
    positional_options = {factor = 4.0, original_max_position_embeddings = 256}

    positional = "dynamic-ntk"
    positional_options = {factor = 4.0}        # L: the model's max_positions

``base``, ``fraction`` and ``interleaved`` are RoPE's own options and mean what they mean
there.
"""

from __future__ import annotations

import dataclasses

from tinylm import backend
from tinylm.errors import TinyLMError
from tinylm.positional import RoPE, Rotation

from tinylm_rope_scaling.frequencies import (
    F32, YarnParams, dynamic_ntk_inv_freq, yarn_attention_factor, yarn_inv_freq,
)


def _rotation(positions, inv_freq, interleaved: bool, scale: float = 1.0) -> Rotation:
    """RoPE's rotation at ``positions`` (T,) or (B, T) with these frequencies, cos and
    sin multiplied by ``scale`` (in float32, as transformers multiplies them)."""
    xp = backend.get_array_module(positions)
    freqs = xp.asarray(positions).astype(F32)[..., None] * xp.asarray(inv_freq)  # (.., T, rot/2)
    angle = xp.repeat(freqs, 2, axis=-1) if interleaved else xp.concatenate([freqs, freqs], -1)
    if angle.ndim == 3:
        angle = angle[:, None]  # (B, 1, T, rot): one table for every head
    cos, sin = xp.cos(angle), xp.sin(angle)
    if scale != 1.0:
        cos, sin = cos * F32(scale), sin * F32(scale)
    return Rotation(cos, sin, interleaved)


def _check_factor(factor, what: str) -> float:
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 1:
        raise TinyLMError(f"{what} needs factor >= 1 (the context stretch), got {factor!r}")
    return float(factor)


# --------------------------------------------------------------------------- dynamic NTK


class DynamicNTKRoPE(RoPE):
    """RoPE whose base grows with the sequence once it passes the original context L
    (``frequencies.dynamic_ntk_inv_freq``); up to L it is plain RoPE, so a model keeps
    its short-context behaviour exactly. Hugging Face's rope_type "dynamic".

    The frequencies follow the longest position of each forward (``max(positions) +
    1``), as transformers' ``dynamic_rope_update`` does; with a KV cache, keys keep the
    rotation they were cached with, as there. (transformers also keeps the largest
    frequencies it has grown to until a call falls back under L; tinylm computes them
    afresh each forward, which is the same for a single pass or a growing generation.)
    """

    hf_rope_type = "dynamic"

    def __init__(self, head_dim: int, factor: float, original_max_position_embeddings: int,
                 base: float = 10000.0, fraction: float = 1.0, interleaved: bool = False):
        super().__init__(head_dim, base, fraction, interleaved)
        self.factor = _check_factor(factor, "dynamic NTK RoPE")
        self.original = int(original_max_position_embeddings)
        self.inv_freq = dynamic_ntk_inv_freq(self.base, self.rot_dim, self.factor, self.original)

    @classmethod
    def from_dims(cls, dims, **options):
        options.setdefault("original_max_position_embeddings", dims.max_positions)
        return cls(dims.head_dim, **options)

    def inv_freq_at(self, seq_len: int):
        """(rot/2,) float32: the frequencies for a forward whose last position is seq_len - 1."""
        if seq_len <= self.original:
            return self.inv_freq
        return dynamic_ntk_inv_freq(self.base, self.rot_dim, self.factor, self.original, seq_len)

    def rotation(self, positions):
        seq_len = int(positions.max()) + 1 if positions.size else 0
        return _rotation(positions, self.inv_freq_at(seq_len), self.interleaved)

    @classmethod
    def from_hf_rope(cls, rope: dict, hf: dict) -> dict:
        """HF's "dynamic" reads L from max_position_embeddings; it is kept as an option,
        so that raising max_positions (to generate further) leaves L alone."""
        return {"factor": rope["factor"],
                "original_max_position_embeddings": hf.get("max_position_embeddings", 2048)}

    @classmethod
    def to_hf_rope(cls, options: dict, hf: dict) -> dict:
        """HF's "dynamic" takes L from max_position_embeddings, so L goes there."""
        _only(options, {"factor", "original_max_position_embeddings"}, "dynamic")
        if "original_max_position_embeddings" in options:
            hf["max_position_embeddings"] = options["original_max_position_embeddings"]
        return {"rope_type": "dynamic", "factor": options["factor"]}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", dynamic NTK factor={self.factor:g}, L={self.original}"


# --------------------------------------------------------------------------- YaRN

_YARN_OPTIONS = [f.name for f in dataclasses.fields(YarnParams)]
_YARN_OPTIONAL = _YARN_OPTIONS[2:]  # beta_fast ... truncate: written only when set


class YaRNRoPE(RoPE):
    """YaRN (Peng et al. 2023): NTK-by-parts frequencies (``frequencies.yarn_inv_freq``)
    and cos / sin multiplied by the attention factor (0.1 ln s + 1 by default), so that
    attention logits sharpen by its square. Hugging Face's rope_type "yarn"."""

    hf_rope_type = "yarn"

    def __init__(self, head_dim: int, base: float = 10000.0, fraction: float = 1.0,
                 interleaved: bool = False, max_positions: int | None = None, **yarn):
        super().__init__(head_dim, base, fraction, interleaved)
        unknown = sorted(set(yarn) - set(_YARN_OPTIONS))
        if unknown or "original_max_position_embeddings" not in yarn:
            raise TinyLMError(f"yarn RoPE takes original_max_position_embeddings (the context "
                              f"trained at; required) and {', '.join(_YARN_OPTIONS[1:])}; "
                              f"got {sorted(yarn)}")
        self.params = YarnParams(**yarn)
        original = int(self.params.original_max_position_embeddings)
        factor = self.params.factor
        if factor is None and max_positions:
            factor = max_positions / original  # as transformers, from the two contexts
        self.factor = _check_factor(factor, "yarn RoPE")
        self.inv_freq = yarn_inv_freq(self.base, self.rot_dim, self.factor, self.params)
        p = self.params
        self.attention_factor = yarn_attention_factor(self.factor, p.mscale, p.mscale_all_dim,
                                                      p.attention_factor)

    @classmethod
    def from_dims(cls, dims, **options):
        return cls(dims.head_dim, max_positions=dims.max_positions, **options)

    def rotation(self, positions):
        return _rotation(positions, self.inv_freq, self.interleaved, self.attention_factor)

    @classmethod
    def from_hf_rope(cls, rope: dict, hf: dict) -> dict:
        """transformers' reading: a top-level original_max_position_embeddings wins over
        the rope dict's, else max_position_embeddings; factor None is their ratio."""
        original = hf.get("original_max_position_embeddings", rope.get(
            "original_max_position_embeddings", hf.get("max_position_embeddings", 2048)))
        factor = rope.get("factor")
        if factor is None:
            factor = hf.get("max_position_embeddings", 2048) / original
        options = {"factor": factor, "original_max_position_embeddings": original}
        options.update({k: rope[k] for k in _YARN_OPTIONAL if rope.get(k) is not None})
        return options

    @classmethod
    def to_hf_rope(cls, options: dict, hf: dict) -> dict:
        _only(options, set(_YARN_OPTIONS), "yarn")
        if "factor" not in options or "original_max_position_embeddings" not in options:
            raise TinyLMError("yarn RoPE needs factor and original_max_position_embeddings "
                              "in positional_options to be written for transformers")
        return {"rope_type": "yarn", **{k: options[k] for k in _YARN_OPTIONS if k in options}}

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", yarn factor={self.factor:g}, "
                f"L={self.params.original_max_position_embeddings}, "
                f"attention_factor={self.attention_factor:.6g}")


def _only(options: dict, allowed: set, rope_type: str) -> None:
    """Refuse options (beyond RoPE's base and fraction) that HF's ``rope_type`` lacks."""
    extra = sorted(set(options) - allowed - {"base", "fraction"})
    if extra:
        raise TinyLMError(f"HF rope_type {rope_type!r} cannot express the options {extra}"
                          + ("; HF's Llama rotates halves, not interleaved pairs"
                             if "interleaved" in extra else ""))


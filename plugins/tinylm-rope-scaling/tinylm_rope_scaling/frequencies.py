"""The formulas: RoPE inverse frequencies for dynamic NTK and YaRN, and YaRN's
attention factor, as transformers' ``modeling_rope_utils.py`` computes them.

Every array step is float32, in the order transformers takes it (its tensors are
float32; a Python float meeting one is rounded to float32 first), so the results agree
with it bit for bit except where float32 ``pow`` itself rounds differently (NumPy's and
PyTorch's differ by at most 1 ulp). Scalars that transformers keeps as Python floats
(YaRN's correction range, the attention factor) are Python floats here too.

Notation: ``dim`` is the rotary dimension (head_dim * partial_rotary_factor), ``base``
RoPE's theta, ``L`` the context the model was trained at, ``s`` the factor by which it
is stretched. Plain RoPE turns pair i by ``p * base^(-2i/dim)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

F32 = np.float32


def powf(base, exponent):
    """float32 ``base ** exponent`` for a float32 base, correctly rounded: computed in
    float64 (exact for these inputs) and rounded once. An ``exponent`` array is float32;
    a Python float exponent stays a double, as PyTorch keeps a scalar exponent (its
    ``tensor ** 1.0159`` is exactly this). PyTorch's float32 ``tensor ** tensor`` is
    within 1 ulp of it; NumPy's float32 power is not always (off by 1 ulp in ~20% of
    cases here), which would stack up over dynamic NTK's two pows."""
    base = np.asarray(base, F32).astype(np.float64)
    return (base ** np.asarray(exponent).astype(np.float64)).astype(F32)


def _exponents(dim: int) -> np.ndarray:
    """(dim/2,) float32: 2i / dim, as ``torch.arange(0, dim, 2).float() / dim``."""
    return np.arange(0, dim, 2, dtype=np.int64).astype(F32) / F32(dim)


# --------------------------------------------------------------------------- dynamic NTK


def dynamic_ntk_inv_freq(base: float, dim: int, factor: float, original: int,
                         seq_len: int | None = None) -> np.ndarray:
    """(dim/2,) float32: "dynamic NTK-aware" scaling (bloc97, emozilla). For a sequence
    of ``seq_len`` > L tokens the base grows to

        base' = base * (s * seq_len / L - (s - 1)) ^ (dim / (dim - 2))

    so the lowest frequency stretches to cover seq_len while the highest barely moves;
    at seq_len <= L it is plain RoPE. transformers computes base' from a float32 tensor
    at run time (``seq_len = max(position_ids) + 1``) and from Python floats at init
    (``seq_len=None``: L); both are followed here."""
    if seq_len is None or seq_len <= original:  # the init path, in Python floats
        grown = base * ((factor * original / original) - (factor - 1)) ** (dim / (dim - 2))
        scaled_base = F32(grown)
    else:  # the run-time path: a 0-d float32 tensor
        ratio = F32(factor) * F32(seq_len) / F32(original) - F32(factor - 1)
        scaled_base = F32(base) * powf(ratio, dim / (dim - 2))
    return (F32(1.0) / powf(scaled_base, _exponents(dim))).astype(F32)


# --------------------------------------------------------------------------- YaRN


@dataclass(frozen=True)
class YarnParams:
    """YaRN's options, with transformers' names and defaults. ``factor`` None: the
    model's max_positions / ``original_max_position_embeddings``. ``beta_fast`` /
    ``beta_slow``: the rotations over L (per pair) above which a pair keeps its
    frequency and below which it is interpolated (0 or None reads as 32 / 1, as
    transformers reads them). ``attention_factor`` None: from ``factor``, ``mscale``
    and ``mscale_all_dim``. ``truncate``: round the ramp's ends outward to whole pairs."""

    original_max_position_embeddings: int
    factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """``0.1 * mscale * ln(scale) + 1`` (1 for scale <= 1): YaRN's "attention
    temperature" sqrt(1/t), applied to cos and sin so that q.k scales by its square."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(factor: float, mscale=None, mscale_all_dim=None,
                          attention_factor=None) -> float:
    """The number cos and sin are multiplied by: ``attention_factor`` if given, else
    ``0.1 ln s + 1``, or with both ``mscale`` and ``mscale_all_dim`` (DeepSeek's)
    ``yarn_mscale(s, mscale) / yarn_mscale(s, mscale_all_dim)``."""
    if attention_factor is not None:
        return attention_factor
    if mscale and mscale_all_dim:
        return float(yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim))
    return yarn_mscale(factor)


def yarn_correction_range(beta_fast: float, beta_slow: float, dim: int, base: float,
                          original: int, truncate: bool = True) -> tuple:
    """(low, high): the pairs between which the ramp runs. Pair i turns
    L * base^(-2i/dim) / (2 pi) times over the original context; solving that for i at
    ``beta_fast`` and ``beta_slow`` rotations gives the ends (clipped to [0, dim-1])."""
    def pair_at(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = pair_at(beta_fast), pair_at(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def yarn_inv_freq(base: float, dim: int, factor: float, p: YarnParams) -> np.ndarray:
    """(dim/2,) float32: YaRN's "NTK-by-parts" frequencies (Peng et al. 2023). Pairs
    that turn more than ``beta_fast`` times over L keep their frequency (extrapolate),
    those turning fewer than ``beta_slow`` times are divided by s (interpolate, as
    position interpolation does), and in between a linear ramp over the pair index
    blends the two:

        ramp_i = clip((i - low) / (high - low), 0, 1),   keep_i = 1 - ramp_i
        f_i    = f_i / s * (1 - keep_i) + f_i * keep_i
    """
    low, high = yarn_correction_range(p.beta_fast or 32, p.beta_slow or 1, dim, base,
                                      p.original_max_position_embeddings, p.truncate)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    pos_freqs = powf(base, _exponents(dim))  # (dim/2,)
    extrapolated = F32(1.0) / pos_freqs
    interpolated = F32(1.0) / (F32(factor) * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=F32) - F32(low)) / F32(high - low), 0, 1)
    keep = F32(1) - ramp.astype(F32)
    return (interpolated * (F32(1) - keep) + extrapolated * keep).astype(F32)

"""Positional schemes: how a transformer learns where each token is.

A scheme acts at one (or more) of three places, and is a no-op at the others:

    embed(x, positions)      absolute schemes add a vector per position to the token
                             embeddings x (B, T, d): learned (GPT-2, BERT), sinusoidal
    rotation(positions)      rotary schemes turn queries and keys: RoPE (Llama, NeoX)
    position_bias(q_pos, k_pos)
                             relative schemes add to the attention scores (.., H, T, S):
                             ALiBi, T5's bucketed relative bias
    alibi_slopes()           ALiBi only: per-head slopes that attention turns into its
                             bias itself, tile by tile, so long sequences never hold
                             (H, T, S); used whenever positions are the default 0..S-1

``positions`` are integer arrays, (T,) for the whole batch or (B, T) per row; with a KV
cache the queries sit at positions past .. past+T-1 and the keys at 0 .. past+T-1. A
model builds its scheme once (``build_positional``) and calls the three hooks once per
forward; every layer shares the result.

Schemes are plugins: ``tinylm.default_plugins.positional`` registers these under
"none", "learned", "sinusoidal", "rope", "alibi" and "t5" through the
``register_positional_encodings`` hook, exactly as a third-party package registers its
own subclass of ``PositionalEncoding``. A model config names one (``positional =
"rope"``) and passes it options (``positional_options = {base = 500000.0}``).
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import NamedTuple

import numpy as np

from tinylm import backend, ops
from tinylm.errors import TinyLMError
from tinylm.nn.layers import initial_weights
from tinylm.nn.module import Module, Parameter


def _normal(std: float):
    """A draw of N(0, std) weights from the init RNG, for ``initial_weights``."""
    return lambda shape: backend.rng(np).normal(0.0, std, shape)


def _number(scheme: str, name: str, value, low: float = 0.0, high: float | None = None,
            integer: bool = False):
    """``value`` of option ``name`` checked to be a finite number (an integer when
    ``integer``) above ``low`` and at most ``high``; a TinyLMError saying what to write
    in ``positional_options`` otherwise (float("x") was a ValueError traceback)."""
    kinds = numbers.Integral if integer else numbers.Real
    what = "an integer" if integer else "a number"
    bound = f" > {low:g}" + (f" and <= {high:g}" if high is not None else "")
    ok = (isinstance(value, kinds) and not isinstance(value, (bool, np.bool_))
          and math.isfinite(value)
          and value > low and (high is None or value <= high))
    if not ok:
        raise TinyLMError(f"{scheme} positional option {name} = {value!r} is not {what}{bound}; "
                          f"fix positional_options in the model config (e.g. {{{name} = "
                          f"{_EXAMPLES.get(name, 1)}}})")
    return value


def _flag(scheme: str, name: str, value) -> bool:
    """A true/false option; anything else (a string "false" was true) is refused."""
    if not isinstance(value, (bool, np.bool_)):
        raise TinyLMError(f"{scheme} positional option {name} = {value!r} is not true or "
                          f"false; fix positional_options in the model config")
    return bool(value)


_EXAMPLES = {"base": "10000.0", "fraction": "0.5", "num_buckets": "32", "max_distance": "128"}


class PositionalDims(NamedTuple):
    """What a scheme may need to know about the model it serves."""

    d_model: int
    n_head: int
    head_dim: int
    max_positions: int
    bidirectional: bool  # True in encoders: queries see keys on both sides


class PositionalEncoding(Module):
    """Base class of every scheme: each hook does nothing until a subclass overrides it.

    ``from_dims`` builds a scheme from the model's dimensions and the user's options;
    override it to take what the scheme needs from ``dims``.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if callable(cls.__dict__.get("bias")):  # the hook's old name: it would go unused
            raise TinyLMError(f"{cls.__name__}.bias: the positional hook is called "
                              f"position_bias(q_pos, k_pos); rename the method")

    @classmethod
    def from_dims(cls, dims: PositionalDims, **options) -> "PositionalEncoding":
        return cls(**options)

    def embed(self, x, positions):
        """Token embeddings (B, T, d) -> the same with positions mixed in."""
        return x

    def rotation(self, positions):
        """A callable that rotates queries or keys (B, H, T, hs) at ``positions``, or None."""
        return None

    def position_bias(self, q_pos, k_pos):
        """What the scheme adds to the attention scores (1 or B, H, T, S), or None."""
        return None

    def alibi_slopes(self):
        """Per-head slopes m_h (H,) when ``position_bias`` is -m_h * |q - k|: attention
        then adds that bias itself (see ``ops.scaled_dot_product_attention``). None
        otherwise."""
        return None


class NoPositional(PositionalEncoding):
    """No positional information at all (a causal mask alone still leaks some order)."""


# --------------------------------------------------------------------------- absolute


def _check_max(positions, max_positions: int) -> None:
    if positions.size and int(positions.max()) >= max_positions:
        raise TinyLMError(
            f"position {int(positions.max())} is beyond the model's max_positions="
            f"{max_positions}; feed shorter sequences or raise max_positions in the config"
        )


class LearnedPositional(PositionalEncoding):
    """A learned vector per absolute position (GPT-2's wpe, BERT's position_embeddings)."""

    def __init__(self, max_positions: int, d_model: int):
        super().__init__()
        self.max_positions = max_positions
        self.weight = Parameter(initial_weights(_normal(0.02), (max_positions, d_model))
                                .astype(np.float32))

    @classmethod
    def from_dims(cls, dims, **options):
        return cls(dims.max_positions, dims.d_model, **options)

    def embed(self, x, positions):
        _check_max(positions, self.max_positions)
        return x + ops.embedding(positions, self.weight)  # (B, T, d)

    def extra_repr(self) -> str:
        return f"{self.max_positions}, {self.weight.shape[1]}"


def sinusoidal_table(positions, d: int, base: float = 10000.0, xp=np):
    """(*positions.shape, d) float64: PE[p, 2i] = sin(p / base^(2i/d)),
    PE[p, 2i+1] = cos(p / base^(2i/d)), as in "Attention Is All You Need"."""
    pos = xp.asarray(positions, dtype=np.float64)[..., None]  # (..., 1)
    inv = base ** (-xp.arange(0, d, 2, dtype=np.float64) / d)  # (ceil(d/2),)
    angle = pos * inv  # (..., ceil(d/2))
    table = xp.empty(angle.shape[:-1] + (2 * angle.shape[-1],), dtype=np.float64)
    table[..., 0::2] = xp.sin(angle)
    table[..., 1::2] = xp.cos(angle)
    return table[..., :d]


class SinusoidalPositional(PositionalEncoding):
    """Fixed sine/cosine waves added to the token embeddings; nothing to learn, and
    defined for any position."""

    def __init__(self, d_model: int, base: float = 10000.0):
        super().__init__()
        self.d_model, self.base = d_model, float(_number("sinusoidal", "base", base))

    @classmethod
    def from_dims(cls, dims, **options):
        return cls(dims.d_model, **options)

    def embed(self, x, positions):
        table = sinusoidal_table(positions, self.d_model, self.base, xp=x.xp)  # (.., T, d)
        return x + table.astype(x.dtype)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, base={self.base:g}"


# --------------------------------------------------------------------------- rotary


class Rotation:
    """Queries or keys (B, H, T, hs) -> the same turned by the angles of their positions."""

    def __init__(self, cos, sin, interleaved: bool):
        self.cos, self.sin, self.interleaved = cos, sin, interleaved

    def __call__(self, x):
        return ops.rotary(x, self.cos, self.sin, interleaved=self.interleaved)


def linear_scaling(inv_freq, factor: float):
    """Position interpolation (kaiokendev; Chen et al.): every frequency divided by
    ``factor``, as if the positions were ``p / factor``. Hugging Face's "linear"."""
    return inv_freq / np.float32(factor)


def llama3_scaling(inv_freq, factor: float, low_freq_factor: float, high_freq_factor: float,
                   original_max_position_embeddings: int):
    """Llama 3.1's frequency-dependent interpolation. With L the original context:
    frequencies whose wavelength 2 pi / f is shorter than L / high_freq_factor stay,
    those longer than L / low_freq_factor are divided by ``factor``, and those in
    between blend the two with s = (L / wavelength - low) / (high - low):
    f' = (1 - s) f / factor + s f. Hugging Face's "llama3", computed in float32 as it does."""
    if not 0 < low_freq_factor < high_freq_factor:
        raise TinyLMError(f"llama3 RoPE scaling needs 0 < low_freq_factor < high_freq_factor, "
                          f"got {low_freq_factor} and {high_freq_factor}")
    context = np.float32(original_max_position_embeddings)
    factor = np.float32(factor)
    low, high = np.float32(low_freq_factor), np.float32(high_freq_factor)
    wavelength = np.float32(2 * math.pi) / inv_freq
    smooth = (context / wavelength - low) / (high - low)  # < 0 long, > 1 short waves
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    is_long, is_short = wavelength > context / low, wavelength < context / high
    return np.where(is_long, inv_freq / factor, np.where(is_short, inv_freq, blended))


# RoPE's ``scaling = {type = ..., **parameters}``: the static rescalings of the inverse
# frequencies, each a function (inv_freq (rot/2,) float32, **parameters) -> the same.
ROPE_SCALINGS = {"linear": linear_scaling, "llama3": llama3_scaling}


def scale_frequencies(inv_freq, scaling: dict):
    """``inv_freq`` rescaled as ``scaling`` ({"type": "linear", "factor": 4.0}, ...) says."""
    if not isinstance(scaling, dict):
        raise TinyLMError(f"RoPE scaling must be a table like {{type = \"linear\", factor = "
                          f"4.0}}, got {scaling!r}")
    params = dict(scaling)
    kind = params.pop("type", None)
    if kind not in ROPE_SCALINGS:
        raise TinyLMError(f"RoPE scaling type {kind!r} is not supported; tinylm has "
                          f"{sorted(ROPE_SCALINGS)} (give scaling = {{type = ..., ...}})")
    fn = ROPE_SCALINGS[kind]
    wanted = [n for n in inspect.signature(fn).parameters if n != "inv_freq"]
    if sorted(params) != sorted(wanted):
        raise TinyLMError(f"{kind} RoPE scaling takes exactly {wanted}, got {sorted(params)}")
    if not params["factor"] > 0:
        raise TinyLMError(f"RoPE scaling factor must be positive, got {params['factor']}")
    return fn(inv_freq, **params).astype(np.float32)


class RoPE(PositionalEncoding):
    """Rotary position embedding (Su et al., RoFormer): feature pair i of a query or key
    at position p turns by the angle p * base^(-2i/rot_dim). Then q_m . k_n depends on
    the positions only through m - n. ``fraction`` < 1 rotates only the first
    ``int(head_dim * fraction)`` features, as GPT-NeoX's ``rotary_pct``. ``interleaved``
    picks GPT-J's pairing (2i, 2i+1) over NeoX/Llama's (i, i + rot_dim/2). ``scaling``
    rescales the frequencies to stretch a model's context (see ``ROPE_SCALINGS``), e.g.
    ``{"type": "linear", "factor": 4.0}`` or Llama 3.1's ``{"type": "llama3", "factor":
    8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192}``.

    Angles are computed in float32, as Hugging Face does, so long positions round the
    same way in both.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, fraction: float = 1.0,
                 interleaved: bool = False, scaling: dict | None = None):
        super().__init__()
        base = _number("rope", "base", base)
        fraction = _number("rope", "fraction", fraction, high=1.0)
        interleaved = _flag("rope", "interleaved", interleaved)
        rot_dim = int(head_dim * fraction)
        if rot_dim % 2 or rot_dim <= 0:
            raise TinyLMError(
                f"RoPE rotates feature pairs: head_dim {head_dim} * fraction {fraction} = "
                f"{rot_dim} must be a positive even number"
            )
        self.head_dim, self.rot_dim = head_dim, rot_dim
        self.base, self.fraction, self.interleaved = float(base), fraction, bool(interleaved)
        exponent = np.arange(0, rot_dim, 2, dtype=np.int64).astype(np.float32) / rot_dim
        self.inv_freq = (1.0 / (np.float32(base) ** exponent)).astype(np.float32)  # (rot/2,)
        self.scaling = scaling or None
        if self.scaling:
            self.inv_freq = scale_frequencies(self.inv_freq, self.scaling)
            self.scaling = dict(self.scaling)

    @classmethod
    def from_dims(cls, dims, **options):
        return cls(dims.head_dim, **options)

    def angles(self, positions, xp=np):
        """(*positions.shape, rot_dim) float32: each pair's angle in both of its slots."""
        freqs = xp.asarray(positions).astype(np.float32)[..., None] * xp.asarray(self.inv_freq)
        if self.interleaved:
            return xp.repeat(freqs, 2, axis=-1)  # (..., rot_dim): f0 f0 f1 f1 ...
        return xp.concatenate([freqs, freqs], axis=-1)  # (..., rot_dim): f0 f1 .. f0 f1 ..

    def rotation(self, positions):
        xp = backend.get_array_module(positions)
        angle = self.angles(positions, xp)  # (T, rot) or (B, T, rot)
        if angle.ndim == 3:
            angle = angle[:, None]  # (B, 1, T, rot): one table for every head
        return Rotation(xp.cos(angle), xp.sin(angle), self.interleaved)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, rot_dim={self.rot_dim}, base={self.base:g}"
                + (", interleaved" if self.interleaved else "")
                + (f", scaling={self.scaling['type']}" if self.scaling else ""))


# --------------------------------------------------------------------------- relative bias


def _relative(q_pos, k_pos):
    """k - q: (T, S) for 1-D positions, (B, T, S) for per-row positions."""
    return k_pos[..., None, :] - q_pos[..., :, None]


def _per_head(values):
    """(T, S, H) or (B, T, S, H) -> (1 or B, H, T, S)."""
    if values.ndim == 3:
        return ops.unsqueeze(ops.transpose(values, (2, 0, 1)), 0)  # (1, H, T, S)
    return ops.transpose(values, (0, 3, 1, 2))  # (B, H, T, S)


def alibi_slopes(n_head: int) -> np.ndarray:
    """The ALiBi head slopes (Press et al.): for n a power of two, the geometric sequence
    2^(-8/n), 2^(-16/n), ..., 2^(-8); otherwise those of the power of two below n, then
    every other slope of the power of two above it (as the paper's code does).

        >>> alibi_slopes(4).tolist()
        [0.25, 0.0625, 0.015625, 0.00390625]
    """
    def power_of_two(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if n_head & (n_head - 1) == 0:
        slopes = power_of_two(n_head)
    else:
        low = 2 ** int(math.floor(math.log2(n_head)))
        slopes = power_of_two(low) + power_of_two(2 * low)[0::2][: n_head - low]
    return np.asarray(slopes, dtype=np.float64)


class ALiBi(PositionalEncoding):
    """Attention with linear biases: head h adds -slope_h * |q - k| to every score, so a
    key's weight decays with its distance. Nothing learned, no position limit. (A causal
    model only ever sees k <= q, where this is slope_h * (k - q).)"""

    def __init__(self, n_head: int, bidirectional: bool = False):
        super().__init__()
        self.n_head, self.bidirectional = n_head, _flag("alibi", "bidirectional", bidirectional)
        self.slopes = alibi_slopes(n_head)

    @classmethod
    def from_dims(cls, dims, **options):
        return cls(dims.n_head, **{"bidirectional": dims.bidirectional, **options})

    def position_bias(self, q_pos, k_pos):
        xp = backend.get_array_module(q_pos)
        distance = -xp.abs(_relative(q_pos, k_pos)).astype(np.float32)  # (.., T, S), <= 0
        slopes = xp.asarray(self.slopes, dtype=np.float32)
        if distance.ndim == 2:
            return (slopes[:, None, None] * distance)[None]  # (1, H, T, S)
        return slopes[None, :, None, None] * distance[:, None]  # (B, H, T, S)

    def alibi_slopes(self):
        return self.slopes

    def extra_repr(self) -> str:
        return f"n_head={self.n_head}" + (", bidirectional" if self.bidirectional else "")


def relative_position_bucket(relative, bidirectional: bool = True, num_buckets: int = 32,
                             max_distance: int = 128):
    """T5's bucket of each relative position ``k - q`` (an integer array, any shape).

    Half the buckets (a quarter each way when bidirectional) hold the small distances
    exactly; the rest cover distances up to ``max_distance`` on a log scale, and anything
    farther shares the last bucket. Causal (bidirectional=False) models only bucket
    keys at or before the query; later keys fall into bucket 0 (they are masked).
    The log is taken in float32, as Mesh TensorFlow and Hugging Face do, so distances on
    a bucket boundary land on the same side.

        >>> rel = np.array([-3, -1, 0, 1, 3])
        >>> relative_position_bucket(rel, num_buckets=8, max_distance=16).tolist()
        [2, 1, 0, 5, 6]
    """
    xp = backend.get_array_module(relative)
    relative = xp.asarray(relative).astype(np.int64)
    buckets = xp.zeros(relative.shape, dtype=np.int64)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0) * num_buckets
        distance = xp.abs(relative)
    else:
        distance = -xp.minimum(relative, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    scaled = (xp.log(xp.maximum(distance, 1).astype(np.float32) / np.float32(max_exact))
              / np.float32(math.log(max_distance / max_exact))
              * np.float32(num_buckets - max_exact))
    large = xp.minimum(max_exact + scaled.astype(np.int64), num_buckets - 1)
    return buckets + xp.where(is_small, distance, large)


class T5RelativeBias(PositionalEncoding):
    """T5's learned relative bias: one scalar per (bucket of k - q, head), added to the
    scores of every layer. Bidirectional in the encoder, causal in the decoder."""

    def __init__(self, n_head: int, num_buckets: int = 32, max_distance: int = 128,
                 bidirectional: bool = True):
        super().__init__()
        self.bidirectional = _flag("t5", "bidirectional", bidirectional)
        num_buckets = _number("t5", "num_buckets", num_buckets, low=0, integer=True)
        max_distance = _number("t5", "max_distance", max_distance, low=0, integer=True)
        exact = (num_buckets // 2 if self.bidirectional else num_buckets) // 2
        if exact < 1 or max_distance <= exact:
            raise TinyLMError(f"t5 positional options num_buckets = {num_buckets} and "
                              f"max_distance = {max_distance} leave no log-spaced buckets; "
                              f"give num_buckets >= {4 if self.bidirectional else 2} and "
                              f"max_distance above num_buckets / "
                              f"{4 if self.bidirectional else 2} (T5: 32 and 128)")
        self.n_head, self.num_buckets, self.max_distance = n_head, num_buckets, max_distance
        self.weight = Parameter(initial_weights(_normal(0.02), (num_buckets, n_head))
                                .astype(np.float32))

    @classmethod
    def from_dims(cls, dims, **options):
        return cls(dims.n_head, **{"bidirectional": dims.bidirectional, **options})

    def position_bias(self, q_pos, k_pos):
        buckets = relative_position_bucket(_relative(q_pos, k_pos), self.bidirectional,
                                           self.num_buckets, self.max_distance)  # (.., T, S)
        return _per_head(ops.embedding(buckets, self.weight))  # (1 or B, H, T, S)

    def extra_repr(self) -> str:
        return (f"n_head={self.n_head}, num_buckets={self.num_buckets}, "
                f"max_distance={self.max_distance}"
                + (", bidirectional" if self.bidirectional else ""))


# --------------------------------------------------------------------------- lookup


def build_positional(name: str, dims: PositionalDims, options: dict | None = None):
    """The scheme registered as ``name``, built for a model of ``dims`` with ``options``."""
    from tinylm import plugins

    cls = plugins.get_positional(name)
    options = dict(options or {})
    try:
        scheme = cls.from_dims(dims, **options)
    except TypeError as e:
        try:
            accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        except (TypeError, ValueError):
            accepted = []
        raise TinyLMError(
            f"positional scheme {name!r} does not accept the options {sorted(options)} "
            f"({e}); its constructor takes {accepted}"
        ) from e
    if not isinstance(scheme, PositionalEncoding):
        raise TinyLMError(f"positional scheme {name!r} built a {type(scheme).__name__}, "
                          f"not a tinylm.positional.PositionalEncoding")
    return scheme

"""VeRA's shared frozen projections, drawn exactly as PEFT draws them.

PEFT (``peft.tuners.vera.model``) makes one pair per adapter from
``projection_prng_key``::

    generator = torch.Generator(device="cpu").manual_seed(projection_prng_key)
    vera_A = _kaiming_init((r, max_in), generator)    # drawn first
    vera_B = _kaiming_init((max_out, r), generator)   # then, from the same stream

``_kaiming_init`` is ``uniform_(-bound, bound)`` with ``bound = sqrt(3) * sqrt(2) /
sqrt(fan_in)`` (fan_in = the shape's second side: max_in for A, r for B). torch's CPU
generator is MT19937 seeded like ``init_genrand(seed mod 2**32)``, the same stream as
NumPy's legacy ``RandomState(seed)`` (whose stream NumPy keeps fixed, NEP 19); each
float32 takes one 32-bit draw ``u`` and is

    x = (u & (2**24 - 1)) * 2**-24;   value = fma(x, to - from, from)   in float32

(torch's ``uniform_real_distribution``; its CPU kernel fuses the multiply-add, which we
get exactly by computing in float64, where ``x * (to - from) + from`` is exact, and
rounding once). So tinylm reproduces PEFT's projections bit for bit from the key
alone, without torch: checked against torch in the tests. PEFT saves them in the file
by default (``save_projection``) anyway.
"""

from __future__ import annotations

import math

import numpy as np

_MASK24 = (1 << 24) - 1


def _kaiming_uniform(state: np.random.RandomState, shape: tuple) -> np.ndarray:
    """One ``_kaiming_init(shape)`` draw from ``state`` (float32, row-major order)."""
    n = int(np.prod(shape))
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))  # PEFT's order of ops
    lo, hi = np.float32(-bound), np.float32(bound)
    raw = state.randint(0, 2**32, size=n, dtype=np.uint64)  # one 32-bit draw each
    x = (raw & _MASK24).astype(np.float64) * 2.0**-24
    span = np.float64(hi - lo)  # float32 subtraction, as torch does it
    return (x * span + np.float64(lo)).astype(np.float32).reshape(shape)


def projections(key: int, r: int, max_in: int, max_out: int) -> tuple:
    """(vera_A (r, max_in), vera_B (max_out, r)), float32 NumPy arrays, as PEFT draws
    them from ``projection_prng_key = key``."""
    state = np.random.RandomState(int(key) % 2**32)
    a = _kaiming_uniform(state, (r, max_in))
    b = _kaiming_uniform(state, (max_out, r))
    return a, b

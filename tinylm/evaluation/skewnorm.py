"""The skew-normal distribution in NumPy: a moment fit and a log CDF that holds in the
far tails. The Secret Sharer (Carlini et al. 2019, section 4.3) estimates a canary's
exposure from a sample of the secret space this way: the log-perplexities of random
secrets are close to skew-normal, so

    exposure ~= -log2 Pr[Px(random secret) <= Px(canary)] = -log2 CDF(Px(canary)),

with the CDF of the distribution fitted to the sample (``tinylm.evaluation.memorization``).

    xi, omega, alpha = fit_moments(sample)
    logcdf(x, xi, omega, alpha)        # natural log of P(X <= x)

The density is 2/omega phi(z) Phi(alpha z), z = (x - xi) / omega. ``fit_moments`` is
the method of moments: the sample skewness gives delta = alpha / sqrt(1 + alpha^2)
(the skewness is capped at 0.99, inside the family's limit of 0.9953), then the
standard deviation gives omega and the mean xi. ``logcdf`` integrates the density in
log space (Simpson's rule on a grid adapted to how fast it falls off), so a canary
30 standard deviations below the sample still gets a finite, accurate exposure where
1 - CDF or Owen's T would cancel to 0. SciPy's ``skewnorm`` is the test oracle; the
library does not need SciPy.
"""

from __future__ import annotations

import math

import numpy as np

from tinylm.errors import TinyLMError

MAX_SKEW = 0.99  # a skew-normal's skewness is below 0.9953 in absolute value
_GRID = 20001  # points of the integration grid (odd: Simpson's rule; see logcdf)
_SIMPSON = np.tile([2.0, 4.0], _GRID // 2 + 1)[:_GRID]  # weights 1 4 2 4 ... 2 4 1
_SIMPSON[0] = _SIMPSON[-1] = 1.0
_erfc = np.frompyfunc(math.erfc, 1, 1)


def log_ndtr(x) -> np.ndarray:
    """log Phi(x) of the standard normal, elementwise, accurate for x far below 0
    (there an asymptotic series; Phi itself underflows near x = -38)."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    far = x < -20
    near = ~far
    out[near] = np.log(0.5 * _erfc(-x[near] / math.sqrt(2.0)).astype(np.float64))
    t = x[far]
    inv2 = 1.0 / (t * t)
    series = 1.0 - inv2 + 3.0 * inv2**2 - 15.0 * inv2**3 + 105.0 * inv2**4
    out[far] = -0.5 * t * t - np.log(-t) - 0.5 * math.log(2 * math.pi) + np.log(series)
    return out


def _log_phi(x):
    return -0.5 * x * x - 0.5 * math.log(2 * math.pi)


def log_pdf(x, xi: float, omega: float, alpha: float) -> np.ndarray:
    """log of the skew-normal density at ``x``."""
    z = (np.asarray(x, dtype=np.float64) - xi) / omega
    return math.log(2.0 / omega) + _log_phi(z) + log_ndtr(alpha * z)


def fit_moments(sample) -> tuple:
    """(xi, omega, alpha) of the skew-normal with ``sample``'s mean, standard deviation
    and skewness (capped at +-MAX_SKEW). A sample of fewer than 3 values, or one whose
    values are all equal, has no such fit: a TinyLMError."""
    x = np.asarray(sample, dtype=np.float64).ravel()
    if x.size < 3 or not np.isfinite(x).all():
        raise TinyLMError(f"a skew-normal fit needs at least 3 finite values, got "
                          f"{x.size}; sample more secrets")
    mean, sd = float(x.mean()), float(x.std())
    if not sd > 0:
        raise TinyLMError("every sampled secret has the same log-perplexity, so no "
                          "distribution can be fitted; sample more secrets or use a larger "
                          "secret space")
    skew = float(np.mean(((x - mean) / sd) ** 3))
    skew = max(-MAX_SKEW, min(MAX_SKEW, skew))
    a = abs(skew) ** (2.0 / 3.0)
    delta = math.copysign(math.sqrt(math.pi / 2 * a / (a + ((4 - math.pi) / 2) ** (2 / 3))),
                          skew)
    alpha = delta / math.sqrt(1 - delta * delta)
    omega = sd / math.sqrt(1 - 2 * delta * delta / math.pi)
    xi = mean - omega * delta * math.sqrt(2 / math.pi)
    return xi, omega, alpha


def _slope(z: float, alpha: float) -> float:
    """d/dz of the standard (xi = 0, omega = 1) log density at z."""
    ratio = math.exp(float(_log_phi(alpha * z) - log_ndtr(alpha * z)))  # phi / Phi
    return -z + alpha * ratio


def _log_tail(z: float, alpha: float, direction: int) -> float:
    """log of the standard density's mass beyond z: below it (direction -1) or above
    it (+1). The log density g is concave with curvature >= 1, so the integrand falls at
    least as exp(-r s - s^2 / 2) at distance s from z, r = the slope away from z (>= 0
    here): 50 / max(r, 1) covers everything but e^-50 of it."""
    rate = max(-direction * _slope(z, alpha), 1.0)
    s = np.linspace(0.0, 50.0 / rate, _GRID)  # (G,)
    g = _log_phi(z + direction * s) + log_ndtr(alpha * (z + direction * s))  # (G,)
    top = g[0]
    w = np.exp(g - top) * _SIMPSON  # (G,)
    integral = w.sum() * (s[1] - s[0]) / 3.0
    return math.log(2.0) + float(top) + math.log(integral)


def logcdf(x, xi: float, omega: float, alpha: float) -> np.ndarray:
    """The natural log of the skew-normal CDF at each ``x``. Left of the mode the
    lower tail is integrated; right of it the upper tail, and log(1 - it)."""
    if not omega > 0:
        raise TinyLMError(f"a skew-normal's scale must be > 0, got {omega}")
    z = (np.asarray(x, dtype=np.float64) - xi) / omega
    out = np.empty(z.shape)
    for i, zi in np.ndenumerate(z):  # one grid per point: a handful of canaries
        if _slope(float(zi), alpha) >= 0:
            out[i] = _log_tail(float(zi), alpha, -1)
        else:
            upper = min(_log_tail(float(zi), alpha, +1), 0.0)
            out[i] = math.log1p(-math.exp(upper)) if upper < 0 else -math.inf
    return out

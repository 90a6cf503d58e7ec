"""The engine's forward: host float64 logits at the one position per row a token is
picked from.

    logits = pick_logits(model, ids, at, cache=cache.prefill(rows, lengths))  # (B, V)

Only each row's picked position goes through the vocabulary projection
(``tinylm.models.logits_at``); a decode step's few rows are multiplied by the weights
in tiles by the ``Linear`` op itself (tinylm/ops/matmul.py).
"""

from __future__ import annotations

import numpy as np

from tinylm import backend
from tinylm.models.logits_at import logits_at


def pick_logits(model, ids: np.ndarray, at: np.ndarray, **kwargs) -> np.ndarray:
    """float64 logits (B, V) of ``model`` on ``ids`` (B, T) at column ``at[b]`` of each
    row b, on the host. ``kwargs``: the forward's ``cache``, ``attention_mask``,
    ``positions``."""
    return backend.to_numpy(logits_at(model, ids, at, **kwargs)).astype(np.float64)

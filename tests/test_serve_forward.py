"""The decode step's vocabulary projection in tiles (tinylm/serve/forward.head_logits)
equals torch's linear for 1-16 rows, a vocabulary of several tiles and a partial last
one, with and without a bias, float32 and float64; the rows of a batch of 2-3 (a
vecdot per row) equal each row projected alone bit for bit (as a lone decode step
does); outside one BLAS thread it goes through the module."""

from __future__ import annotations

import numpy as np
import pytest

from tinylm import nn
from tinylm.serve import forward
from tinylm.tensor import Tensor
from tinylm.threads import blas_threads

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("B", [1, 2, 3, 4, 16])
@pytest.mark.parametrize("dtype,bias", [("float32", False), ("float64", True)])
def test_tiles_equal_torch(B, dtype, bias):
    V = 2 * forward.HEAD_TILE + 37
    head = nn.Linear(48, V, bias=bias, dtype=dtype)
    x = np.random.default_rng(B).standard_normal((B, 48)).astype(dtype)
    with blas_threads(1):
        got = forward.head_logits(head, Tensor(x))
    want = torch.nn.functional.linear(
        torch.from_numpy(x), torch.from_numpy(head.weight.data),
        None if head.bias is None else torch.from_numpy(head.bias.data)).numpy()
    assert got.shape == (B, V) and got.dtype == np.dtype(dtype)
    tol = 1e-4 if dtype == "float32" else 1e-10
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("B", [2, 3])
def test_few_rows_equal_each_row_alone(B):
    head = nn.Linear(64, 3 * forward.HEAD_TILE + 5, bias=False)
    x = np.random.default_rng(0).standard_normal((B, 64)).astype(np.float32)
    with blas_threads(1):
        together = forward.head_logits(head, Tensor(x))
        alone = np.concatenate([forward.head_logits(head, Tensor(x[i:i + 1])) for i in range(B)])
    assert np.array_equal(together, alone)


def test_more_threads_go_through_the_module(monkeypatch):
    head = nn.Linear(16, forward.HEAD_TILE + 1)
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    with blas_threads(1):
        assert forward._tiled(head)
    monkeypatch.setattr(forward, "cpu_threads", lambda: 2)
    assert not forward._tiled(head)
    out = forward.head_logits(head, Tensor(x))
    np.testing.assert_array_equal(out, head(Tensor(x[:, None])).data[:, 0])

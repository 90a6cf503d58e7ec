"""Mixed precision: autocast policy and dynamic loss scaling."""

import numpy as np
import pytest

import tinylm
from tinylm import amp, nn, ops
from tinylm.errors import TinyLMError
from tinylm.optim import SGD


def _model(device):
    tinylm.seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 5)).to(device)


def _batch(device):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 8)).astype(np.float32)
    y = rng.integers(0, 5, 6)
    return (tinylm.backend.to_device(a, device) for a in (x, y))


def test_autocast_runs_linear_in_half_and_keeps_float32_master_grads(device):
    model = _model(device)
    x, y = _batch(device)
    with amp.autocast("float16"):
        h = model[0](tinylm.Tensor(x))
        assert h.dtype == np.float16
        assert model[1](h).dtype == np.float32  # norms compute in float32
        loss = ops.cross_entropy(model(tinylm.Tensor(x)), y)
    assert loss.dtype == np.float32
    loss.backward()
    for p in model.parameters():
        assert p.dtype == np.float32 and p.grad.dtype == np.float32


def test_autocast_loss_and_grads_close_to_float32(device):
    model = _model(device)
    x, y = _batch(device)
    loss32 = ops.cross_entropy(model(tinylm.Tensor(x)), y)
    loss32.backward()
    g32 = [tinylm.backend.to_numpy(p.grad) for p in model.parameters()]
    model.zero_grad()
    with amp.autocast():
        loss16 = ops.cross_entropy(model(tinylm.Tensor(x)), y)
    loss16.backward()
    assert abs(loss16.item() - loss32.item()) < 1e-2 * abs(loss32.item())
    for p, g in zip(model.parameters(), g32):
        err = np.linalg.norm(tinylm.backend.to_numpy(p.grad) - g) / np.linalg.norm(g)
        assert err < 1e-2


def test_autocast_outside_changes_nothing():
    model = _model("cpu")
    x, _ = _batch("cpu")
    assert model(tinylm.Tensor(x)).dtype == np.float32
    with amp.autocast(enabled=False):
        assert model(tinylm.Tensor(x)).dtype == np.float32
    with pytest.raises(TinyLMError):
        with amp.autocast("bfloat16"):
            pass


def test_loss_scaler_skips_overflow_and_backs_off():
    p = nn.Parameter(np.ones(3, dtype=np.float32))
    opt = SGD([p], lr=0.1)
    scaler = amp.LossScaler(init_scale=1024.0, growth_interval=2)
    p.grad = np.array([1.0, np.inf, 0.0], dtype=np.float32)
    assert scaler.step(opt, [p]) is False
    assert scaler.scale_value == 512.0
    np.testing.assert_array_equal(p.data, np.ones(3))  # step skipped
    for _ in range(2):
        p.grad = np.full(3, 512.0, dtype=np.float32)  # true gradient 1 at scale 512
        assert scaler.step(opt, [p]) is True
    np.testing.assert_allclose(p.data, np.ones(3) - 0.2)
    assert scaler.scale_value == 1024.0  # grew after growth_interval good steps
    state = scaler.state_dict()
    other = amp.LossScaler()
    other.load_state_dict(state)
    assert other.state_dict() == state


def test_loss_scaler_scales_the_loss():
    scaler = amp.LossScaler(init_scale=8.0)
    x = tinylm.tensor([1.0, 2.0], requires_grad=True)
    scaler.scale((x * x).sum()).backward()
    np.testing.assert_allclose(x.grad, [16.0, 32.0])
    assert amp.LossScaler(enabled=False).scale(x) is x

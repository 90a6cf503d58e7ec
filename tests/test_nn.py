"""Module bookkeeping (names, state dicts, modes, devices) and the basic layers."""

import numpy as np
import pytest

from tinylm import backend, nn
from tinylm.errors import CheckpointError, TinyLMError
from tinylm.tensor import Tensor, randn


class Block(nn.Module):
    def __init__(self, dim=4):
        super().__init__()
        self.scale = nn.Parameter(np.ones(dim, dtype=np.float32))
        self.ln = nn.LayerNorm(dim)
        self.layers = nn.ModuleList([nn.Linear(dim, dim), nn.Linear(dim, dim, bias=False)])
        self.drop = nn.Dropout(0.5)
        self.register_buffer("mask", np.tril(np.ones((dim, dim), dtype=bool)))
        self.register_buffer("cache", np.zeros(dim, dtype=np.float32), persistent=False)

    def forward(self, x):
        x = self.ln(x) * self.scale
        for layer in self.layers:
            x = layer(x).tanh()
        return self.drop(x)


class Model(nn.Module):
    def __init__(self, dim=4, vocab=10):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([Block(dim), Block(dim)])
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def make_model(seed=0, **kw):
    backend.seed(seed)
    return Model(**kw)


# --------------------------------------------------------------------------- names


def test_named_parameters_order_and_names():
    names = [n for n, _ in make_model().named_parameters()]
    block = ["scale", "ln.weight", "ln.bias", "layers.0.weight", "layers.0.bias",
             "layers.1.weight"]
    assert names == (["embed.weight"] + [f"blocks.0.{n}" for n in block]
                     + [f"blocks.1.{n}" for n in block] + ["head.weight", "head.bias"])


def test_own_parameters_come_before_children_like_torch():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.child = nn.Linear(2, 2)
            self.w = nn.Parameter(np.zeros(2, dtype=np.float32))

    assert [n for n, _ in M().named_parameters()] == ["w", "child.weight", "child.bias"]


def test_named_parameters_prefix_and_non_recursive():
    m = make_model()
    assert next(m.named_parameters("model"))[0] == "model.embed.weight"
    assert list(m.named_parameters(recurse=False)) == []
    assert [n for n, _ in m.blocks[0].named_parameters(recurse=False)] == ["scale"]


def test_modules_and_children():
    m = make_model()
    assert [n for n, _ in m.named_children()] == ["embed", "blocks", "head"]
    assert list(m.children())[0] is m.embed
    names = [n for n, _ in m.named_modules()]
    assert names[:4] == ["", "embed", "blocks", "blocks.0"]
    assert "blocks.1.layers.1" in names
    assert len(list(m.modules())) == len(names)


def test_tied_weights_counted_once_but_saved_under_each_name():
    m = make_model()
    m.head.weight = m.embed.weight  # (vocab, dim) both: tie them
    params = list(m.parameters())
    assert sum(p is m.embed.weight for p in params) == 1
    assert "head.weight" not in dict(m.named_parameters())
    sd = m.state_dict()
    assert sd["head.weight"] is sd["embed.weight"]
    assert m.num_parameters() == sum(p.size for p in params)


def test_num_parameters():
    lin = nn.Linear(3, 5)
    assert lin.num_parameters() == 3 * 5 + 5
    lin.bias.requires_grad = False
    assert lin.num_parameters(trainable_only=True) == 15


def test_attribute_rules():
    m = nn.Linear(2, 3)
    with pytest.raises(TinyLMError, match="Parameter"):
        m.weight = np.zeros((3, 2))
    m.bias = None  # allowed: no bias any more
    assert [n for n, _ in m.named_parameters()] == ["weight"]
    m.note = "plain attributes are plain"
    assert m.note == "plain attributes are plain"
    del m.weight
    assert list(m.parameters()) == []
    with pytest.raises(AttributeError):
        m.weight  # noqa: B018

    class Forgot(nn.Module):
        def __init__(self):
            self.w = nn.Parameter(np.zeros(1))

    with pytest.raises(TinyLMError, match="super"):
        Forgot()


def test_parameter_is_a_tensor_that_requires_grad():
    p = nn.Parameter(np.zeros(3, dtype=np.float32))
    assert isinstance(p, Tensor) and p.requires_grad and p.is_leaf
    assert repr(p).startswith("Parameter(")
    assert not nn.Parameter(np.zeros(1), requires_grad=False).requires_grad


# --------------------------------------------------------------------------- buffers


def test_buffers_in_state_dict_unless_non_persistent():
    m = make_model()
    sd = m.state_dict()
    assert "blocks.0.mask" in sd and "blocks.0.cache" not in sd
    assert [n for n, _ in m.named_buffers()] == [
        "blocks.0.mask", "blocks.0.cache", "blocks.1.mask", "blocks.1.cache"]
    assert m.blocks[0].mask.dtype == bool
    m.blocks[0].mask = np.zeros((4, 4), dtype=bool)  # reassigning keeps it a buffer
    assert not m.state_dict()["blocks.0.mask"].any()


# --------------------------------------------------------------------------- state dict


def test_state_dict_round_trip():
    a, b = make_model(0), make_model(1)
    ids = np.array([[1, 2, 3], [4, 5, 6]])
    a.eval(), b.eval()
    assert not np.allclose(a(ids).numpy(), b(ids).numpy())
    b_params = list(b.parameters())
    b_arrays = [p.data for p in b_params]
    result = b.load_state_dict(a.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    np.testing.assert_array_equal(a(ids).numpy(), b(ids).numpy())
    # copied in place: same Parameters, same arrays, and no aliasing with `a`
    assert all(p is q for p, q in zip(b_params, b.parameters()))
    assert all(p.data is arr for p, arr in zip(b_params, b_arrays))
    a.head.bias.data += 1
    assert not np.array_equal(a.head.bias.data, b.head.bias.data)


def test_state_dict_keys_in_order():
    keys = list(make_model().state_dict())
    assert keys[:3] == ["embed.weight", "blocks.0.scale", "blocks.0.mask"]
    assert keys[-2:] == ["head.weight", "head.bias"]


def test_load_state_dict_reports_every_problem_at_once():
    m = make_model()
    before = {k: v.copy() for k, v in m.state_dict().items()}
    sd = dict(make_model(1).state_dict())
    del sd["head.bias"], sd["blocks.1.scale"]
    sd["extra.weight"] = np.zeros(3, dtype=np.float32)
    sd["blocks.0.ln.weight"] = np.ones(7, dtype=np.float32)
    sd["blocks.0.layers.0.weight"] = np.ones((5, 4), dtype=np.float32)
    sd["embed.weight"] = np.ones((10, 4), dtype=np.int64)
    with pytest.raises(CheckpointError) as info:
        m.load_state_dict(sd)
    msg = str(info.value)
    for needle in ["missing keys (2)", "head.bias", "blocks.1.scale",
                   "unexpected keys (1)", "extra.weight",
                   "shape mismatches (2)", "blocks.0.ln.weight: checkpoint (7,), model (4,)",
                   "blocks.0.layers.0.weight", "dtype mismatches (1)", "embed.weight"]:
        assert needle in msg
    # nothing was copied: the model is untouched
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_load_state_dict_non_strict():
    m = make_model()
    sd = dict(make_model(1).state_dict())
    del sd["head.bias"]
    sd["extra"] = np.zeros(2)
    result = m.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["head.bias"] and result.unexpected_keys == ["extra"]
    np.testing.assert_array_equal(m.head.weight.data, sd["head.weight"])
    sd["head.weight"] = np.zeros((3, 3), dtype=np.float32)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        m.load_state_dict(sd, strict=False)  # shapes are checked even when not strict


def test_load_state_dict_casts_float_precision():
    m = nn.Linear(2, 3)
    sd = {k: v.astype(np.float64) + 1 for k, v in m.state_dict().items()}
    m.load_state_dict(sd)
    assert m.weight.dtype == np.float32
    np.testing.assert_allclose(m.weight.data, sd["weight"], rtol=1e-6)


# --------------------------------------------------------------------------- modes, device


def test_train_eval_propagates():
    m = make_model()
    assert all(mod.training for mod in m.modules())
    assert m.eval() is m
    assert not any(mod.training for mod in m.modules())
    m.train()
    assert m.blocks[1].drop.training


def test_dropout_follows_training_flag():
    backend.seed(0)
    drop = nn.Dropout(0.5)
    x = Tensor(np.ones((64, 64), dtype=np.float32))
    y = drop(x).numpy()
    assert 0.4 < (y == 0).mean() < 0.6 and set(np.unique(y)) == {0.0, 2.0}
    drop.eval()
    assert drop(x) is x
    with pytest.raises(TinyLMError):
        nn.Dropout(1.0)


def test_to_cpu_keeps_identity_and_casts_in_place():
    m = make_model()
    params = list(m.parameters())
    assert m.to("cpu") is m
    assert all(p is q for p, q in zip(params, m.parameters()))
    m.to(dtype="float64")
    assert all(p is q for p, q in zip(params, m.parameters()))
    assert all(p.dtype == np.float64 for p in m.parameters())
    assert m.blocks[0].mask.dtype == bool  # non-float buffers keep their dtype
    assert m.blocks[0].cache.dtype == np.float64


@pytest.mark.gpu
@pytest.mark.skipif(not backend.cuda_available(), reason="needs CuPy and a GPU")
def test_to_cuda_keeps_identity():
    m = make_model()
    params = list(m.parameters())
    m.to("cuda")
    assert all(p is q and p.device == "cuda" for p, q in zip(params, m.parameters()))
    assert backend.device_of(m.blocks[0].mask) == "cuda"
    out = m.eval()(np.array([[1, 2]]))
    assert out.device == "cuda"
    m.to("cpu")
    assert all(p.device == "cpu" for p in params)


def test_zero_grad():
    m = make_model()
    m.eval()(np.array([[1, 2, 3]])).sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    m.zero_grad()
    assert all(p.grad is None for p in m.parameters())


def test_requires_grad_and_apply():
    m = make_model()
    m.requires_grad_(False)
    assert not any(p.requires_grad for p in m.parameters())
    seen = []
    m.apply(lambda mod: seen.append(type(mod).__name__))
    assert seen[-1] == "Model" and seen.count("Linear") == 5


def test_repr_tree():
    text = repr(make_model())
    assert text.startswith("Model(\n  (embed): Embedding(10, 4)\n  (blocks): ModuleList(\n")
    assert "    (0): Block(\n      (ln): LayerNorm(4, eps=1e-05, bias=True)" in text
    assert "(1): Linear(in_features=4, out_features=4, bias=False)" in text
    assert "(drop): Dropout(p=0.5)" in text
    assert text.endswith("  (head): Linear(in_features=4, out_features=10, bias=True)\n)")


# --------------------------------------------------------------------------- containers


def test_module_list():
    backend.seed(0)
    items = nn.ModuleList([nn.Linear(1, 1), nn.Linear(1, 2)])
    items.append(nn.Linear(1, 3)).extend([nn.Linear(1, 4)])
    assert len(items) == 4
    assert [layer.out_features for layer in items] == [1, 2, 3, 4]
    assert items[-1].out_features == 4
    assert [layer.out_features for layer in items[1:3]] == [2, 3]
    items[0] = nn.Linear(1, 9)
    assert items[0].out_features == 9
    assert [n for n, _ in items.named_parameters()][:2] == ["0.weight", "0.bias"]
    with pytest.raises(IndexError):
        items[4] = nn.Linear(1, 1)
    with pytest.raises(TinyLMError):
        items.append("not a module")


def test_sequential():
    backend.seed(0)
    seq = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    x = randn(5, 3)
    expected = seq[2](seq[1](seq[0](x)))
    np.testing.assert_array_equal(seq(x).numpy(), expected.numpy())
    assert isinstance(seq[:2], nn.Sequential) and len(seq[:2]) == 2


# --------------------------------------------------------------------------- layers


def test_init_is_seeded_and_follows_torch_defaults():
    backend.seed(3)
    a = nn.Linear(100, 50)
    backend.seed(3)
    b = nn.Linear(100, 50)
    np.testing.assert_array_equal(a.weight.data, b.weight.data)
    assert a.weight.shape == (50, 100) and a.weight.dtype == np.float32
    assert np.abs(a.weight.data).max() <= 0.1 and np.abs(a.weight.data).max() > 0.09
    assert np.abs(a.bias.data).max() <= 0.1
    e = nn.Embedding(1000, 64, dtype="float64")
    assert e.weight.dtype == np.float64 and abs(e.weight.data.std() - 1) < 0.02
    ln = nn.LayerNorm(8, bias=False)
    assert ln.bias is None and (ln.weight.data == 1).all()


def _torch():
    return pytest.importorskip("torch")


def _compare(ours, theirs, x, x_t, rtol=1e-5, atol=1e-6):
    """Forward and backward (input and parameter gradients) of a layer vs torch."""
    torch = _torch()
    y = ours(x)
    y_t = theirs(x_t)
    np.testing.assert_allclose(y.numpy(), y_t.detach().numpy(), rtol=rtol, atol=atol)
    g = np.random.default_rng(1).standard_normal(y.shape).astype(np.float32)
    y.backward(g)
    y_t.backward(torch.from_numpy(g))
    for (name, p), (name_t, p_t) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert name == name_t
        np.testing.assert_allclose(p.grad, p_t.grad.numpy(), rtol=rtol, atol=atol)
    if x.requires_grad:
        np.testing.assert_allclose(x.grad, x_t.grad.numpy(), rtol=rtol, atol=atol)


def _inputs(shape):
    torch = _torch()
    data = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 3 + 1
    return Tensor(data, requires_grad=True), torch.tensor(data, requires_grad=True)


def _copy_weights(ours, theirs):
    torch = _torch()
    theirs.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in ours.state_dict().items()})


@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_torch(bias):
    torch = _torch()
    backend.seed(0)
    ours, theirs = nn.Linear(6, 5, bias=bias), torch.nn.Linear(6, 5, bias=bias)
    _copy_weights(ours, theirs)
    _compare(ours, theirs, *_inputs((2, 3, 6)))


@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_matches_torch(bias):
    torch = _torch()
    ours, theirs = nn.LayerNorm(7, bias=bias), torch.nn.LayerNorm(7, bias=bias)
    rng = np.random.default_rng(2)
    for p in ours.parameters():
        p.data[...] = rng.standard_normal(p.shape)
    _copy_weights(ours, theirs)
    _compare(ours, theirs, *_inputs((3, 4, 7)))


def test_rms_norm_matches_torch():
    torch = _torch()
    ours, theirs = nn.RMSNorm(7, eps=1e-6), torch.nn.RMSNorm(7, eps=1e-6)
    ours.weight.data[...] = np.random.default_rng(2).standard_normal(7)
    _copy_weights(ours, theirs)
    _compare(ours, theirs, *_inputs((3, 4, 7)))


def test_embedding_matches_torch():
    torch = _torch()
    backend.seed(0)
    ours, theirs = nn.Embedding(11, 5), torch.nn.Embedding(11, 5)
    _copy_weights(ours, theirs)
    ids = np.array([[1, 2, 2, 10], [0, 1, 1, 1]])  # repeated ids accumulate
    _compare(ours, theirs, Tensor(ids), torch.from_numpy(ids))


def test_skip_init_leaves_weights_unwritten_and_draws_nothing():
    import resource

    from tinylm import backend
    from tinylm.models import Decoder, GPT2Config

    config = GPT2Config(vocab_size=50, d_model=16, n_layer=1, n_head=2, max_positions=8)
    backend.seed(3)
    before = backend.rng(np).bit_generator.state
    with nn.skip_init():
        assert not nn.initialising()
        Decoder(config)
    assert nn.initialising()
    assert backend.rng(np).bit_generator.state == before  # nothing drawn
    # a big Linear built inside skip_init costs no resident memory until written
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with nn.skip_init():
        big = nn.Linear(8192, 8192, bias=False)  # 256 MiB if its pages were touched
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss
    assert big.weight.shape == (8192, 8192) and grown_kib < 64 * 1024
    backend.seed(3)
    a = Decoder(config)  # outside: initialised as always, the same weights for one seed
    backend.seed(3)
    b = Decoder(config)
    assert all(np.array_equal(x.data, y.data) for x, y in zip(a.parameters(), b.parameters()))

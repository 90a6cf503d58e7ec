"""Positional schemes: each one's defining identity, the fused rotary op, the plugin
registry, and a model with each scheme training a step."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinylm
from tinylm import ops, plugins, testing
from tinylm.errors import TinyLMError
from tinylm.models import GPT2Config, build_model
from tinylm.optim import AdamW
from tinylm.positional import (
    ALiBi, LearnedPositional, PositionalDims, RoPE, SinusoidalPositional, T5RelativeBias,
    alibi_slopes, build_positional, relative_position_bucket, sinusoidal_table,
)

SCHEMES = ["none", "learned", "sinusoidal", "rope", "alibi", "t5"]


def test_every_scheme_is_registered_by_the_builtin_plugin():
    assert sorted(plugins.registry("positional_encodings")) == sorted(SCHEMES)
    owners = set(plugins.registered_by("positional_encodings").values())
    assert owners == {"tinylm.default_plugins.positional"}


def test_build_positional_reports_bad_names_and_options():
    dims = PositionalDims(32, 4, 8, 64, False)
    assert isinstance(build_positional("rope", dims, {"base": 500000.0}), RoPE)
    with pytest.raises(TinyLMError, match="unknown positional encoding 'ropee'.*'rope'"):
        build_positional("ropee", dims)
    with pytest.raises(TinyLMError, match="does not accept the options \\['theta'\\]"):
        build_positional("rope", dims, {"theta": 1.0})


# --------------------------------------------------------------------------- sinusoidal


@given(st.integers(1, 40), st.integers(1, 17), st.sampled_from([100.0, 10000.0]))
def test_sinusoidal_matches_the_formula(n, d, base):
    table = sinusoidal_table(np.arange(n), d, base)
    for pos in range(n):
        for i in range(d):
            angle = pos / base ** (2 * (i // 2) / d)
            want = math.sin(angle) if i % 2 == 0 else math.cos(angle)
            assert table[pos, i] == pytest.approx(want, abs=1e-12)


def test_sinusoidal_and_learned_add_to_the_embeddings():
    x = tinylm.randn(2, 5, 6)
    pos = np.arange(3, 8)
    y = SinusoidalPositional(6).embed(x, pos)
    testing.assert_close(y, x.numpy() + sinusoidal_table(pos, 6).astype(np.float32))
    learned = LearnedPositional(16, 6)
    testing.assert_close(learned.embed(x, pos), x.numpy() + learned.weight.numpy()[3:8])
    with pytest.raises(TinyLMError, match="max_positions=16"):
        learned.embed(x, np.arange(14, 19))


# --------------------------------------------------------------------------- RoPE


def _rope_reference(x, pos, base, rot, interleaved):
    """Hugging Face's rotate_half (or GPT-J's interleaved) RoPE, in float64 NumPy."""
    inv = 1.0 / base ** (np.arange(0, rot, 2) / rot)
    f = pos[:, None] * inv  # (T, rot/2)
    xr, rest = x[..., :rot], x[..., rot:]
    if interleaved:
        a, b = xr[..., 0::2], xr[..., 1::2]
        out = np.empty_like(xr)
        out[..., 0::2] = a * np.cos(f) - b * np.sin(f)
        out[..., 1::2] = b * np.cos(f) + a * np.sin(f)
    else:
        emb = np.concatenate([f, f], -1)
        half = np.concatenate([-xr[..., rot // 2:], xr[..., : rot // 2]], -1)
        out = xr * np.cos(emb) + half * np.sin(emb)
    return np.concatenate([out, rest], -1)


@pytest.mark.parametrize("fraction, interleaved", [(1.0, False), (0.25, False), (0.5, True)])
def test_rope_matches_the_reference(fraction, interleaved):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 16))  # (B, H, T, hs)
    rope = RoPE(16, base=500.0, fraction=fraction, interleaved=interleaved)
    pos = np.arange(5, 12)
    got = rope.rotation(pos)(tinylm.tensor(x))
    want = _rope_reference(x, pos.astype(np.float64), 500.0, rope.rot_dim, interleaved)
    testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # the tables are float32


@given(st.integers(0, 60), st.integers(0, 60), st.integers(-30, 30),
       st.sampled_from([(8, 1.0, False), (16, 0.5, False), (12, 1.0, True)]))
def test_rope_scores_depend_only_on_the_relative_offset(m, n, shift, case):
    """<R(m) q, R(n) k> = <R(m + s) q, R(n + s) k>: only m - n matters."""
    hs, fraction, interleaved = case
    rng = np.random.default_rng(m * 61 + n)
    q, k = rng.standard_normal((2, 1, 1, 1, hs))
    rope = RoPE(hs, base=10000.0, fraction=fraction, interleaved=interleaved)

    def score(a, b):
        qa = rope.rotation(np.array([a]))(tinylm.tensor(q)).numpy()
        kb = rope.rotation(np.array([b]))(tinylm.tensor(k)).numpy()
        return float((qa * kb).sum())

    s = max(shift, -min(m, n))
    assert score(m, n) == pytest.approx(score(m + s, n + s), abs=1e-4 * (1 + abs(m + n + s)))


def test_rope_per_row_positions_broadcast_over_heads():
    x = tinylm.randn(2, 3, 4, 8)
    rope = RoPE(8)
    pos = np.array([[0, 1, 2, 3], [5, 6, 7, 8]])
    got = rope.rotation(pos)(x).numpy()
    for b in range(2):
        testing.assert_close(got[b:b + 1], rope.rotation(pos[b])(x[b:b + 1]))


@pytest.mark.parametrize("interleaved, rot", [(False, 8), (False, 4), (True, 6)])
def test_rotary_op_gradcheck(interleaved, rot):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 2, 3, 8))
    angle = rng.standard_normal((3, rot))
    testing.gradcheck(lambda t: ops.rotary(t, np.cos(angle), np.sin(angle), interleaved), x)


def test_rope_rejects_odd_rotary_dims():
    with pytest.raises(TinyLMError, match="even"):
        RoPE(10, fraction=0.3)


# Llama 3.1's real parameters, and a tiny original context (head_dim 16, 32 positions) that
# puts one frequency in each band: kept, blended, divided.
LLAMA31 = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}
SMALL_LLAMA3 = {**LLAMA31, "original_max_position_embeddings": 32}


@pytest.mark.parametrize("head_dim, base, fraction, scaling", [
    (128, 500000.0, 1.0, LLAMA31),
    (64, 500000.0, 1.0, {**LLAMA31, "factor": 32.0}),  # Llama 3.2
    (16, 10000.0, 1.0, SMALL_LLAMA3),
    (32, 10000.0, 0.5, {**SMALL_LLAMA3, "factor": 3.0, "low_freq_factor": 0.5,
                        "high_freq_factor": 3.0, "original_max_position_embeddings": 100}),
    (16, 10000.0, 1.0, {"type": "linear", "factor": 4.0}),
    (24, 1e6, 0.5, {"type": "linear", "factor": 2.5}),
], ids=lambda v: v["type"] if isinstance(v, dict) else None)
def test_rope_scaling_frequencies_are_transformers(head_dim, base, fraction, scaling):
    """Against transformers' _compute_{linear_scaling,llama3}_rope_parameters."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {k: v for k, v in scaling.items() if k != "type"}
    config = transformers.LlamaConfig(
        hidden_size=4 * head_dim, num_attention_heads=4, max_position_embeddings=131072,
        rope_parameters={"rope_type": scaling["type"], "rope_theta": base,
                         "partial_rotary_factor": fraction, **params})
    theirs, attention_factor = ROPE_INIT_FUNCTIONS[scaling["type"]](config)
    assert attention_factor == 1.0  # nothing to scale cos/sin by: tinylm applies none
    rope = RoPE(head_dim, base=base, fraction=fraction, scaling=scaling)
    assert rope.inv_freq.dtype == np.float32 and rope.inv_freq.shape == tuple(theirs.shape)
    # float32 both; 5e-7 allows the 1-2 ulp by which NumPy's and torch's float32 pow differ
    # in the unscaled frequencies already
    np.testing.assert_allclose(rope.inv_freq.astype(np.float64),
                               theirs.numpy().astype(np.float64), rtol=5e-7, atol=0)
    assert not np.allclose(rope.inv_freq, RoPE(head_dim, base=base, fraction=fraction).inv_freq)


def test_llama3_scaling_keeps_short_waves_divides_long_ones_and_blends_between():
    rope, plain = RoPE(16, scaling=SMALL_LLAMA3), RoPE(16)
    ratio = (plain.inv_freq / rope.inv_freq).astype(np.float64)  # 1 .. factor
    wavelength = 2 * np.pi / plain.inv_freq  # 6.3, 20, 63, ...: bands < 8, 8..32, > 32
    np.testing.assert_allclose(ratio[wavelength < 8], 1.0)
    np.testing.assert_allclose(ratio[wavelength > 32], 8.0, rtol=1e-6)
    blended = ratio[(wavelength >= 8) & (wavelength <= 32)]
    assert blended.size == 1 and 1.0 < blended[0] < 8.0
    np.testing.assert_allclose(RoPE(16, scaling={"type": "linear", "factor": 4.0}).inv_freq,
                               plain.inv_freq / 4)
    assert "scaling=llama3" in repr(rope)


def test_rope_scaling_options_reach_rope_from_a_config():
    dims = PositionalDims(d_model=32, n_head=2, head_dim=16, max_positions=64,
                          bidirectional=False)
    rope = build_positional("rope", dims, {"base": 500.0, "scaling": SMALL_LLAMA3})
    np.testing.assert_array_equal(rope.inv_freq, RoPE(16, 500.0, scaling=SMALL_LLAMA3).inv_freq)


@pytest.mark.parametrize("scaling, message", [
    ({"type": "yarn", "factor": 4.0},
     r"'yarn' is not supported; tinylm has \['linear', 'llama3'\]"),
    ({"factor": 4.0}, "None is not supported"),
    ({"type": "linear", "factor": 4.0, "low_freq_factor": 1.0},
     r"linear RoPE scaling takes exactly \['factor'\]"),
    ({"type": "llama3", "factor": 8.0}, "llama3 RoPE scaling takes exactly"),
    ({"type": "linear", "factor": 0.0}, "factor must be positive"),
    ("linear", "must be a table like"),
    ({**LLAMA31, "low_freq_factor": 4.0}, "0 < low_freq_factor < high_freq_factor"),
])
def test_rope_rejects_unknown_or_malformed_scaling(scaling, message):
    with pytest.raises(TinyLMError, match=message):
        RoPE(16, scaling=scaling)


# --------------------------------------------------------------------------- ALiBi


def test_alibi_slopes_follow_the_paper():
    assert alibi_slopes(8).tolist() == [2.0 ** -(i + 1) for i in range(8)]
    # not a power of two: the 4-head slopes, then every other one of the 8-head slopes
    assert alibi_slopes(6).tolist() == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]


@given(st.integers(1, 12), st.integers(1, 20), st.integers(0, 30), st.booleans())
def test_alibi_bias_is_linear_in_distance(n_head, T, past, bidirectional):
    alibi = ALiBi(n_head, bidirectional=bidirectional)
    q, k = np.arange(past, past + T), np.arange(past + T)
    bias = alibi.position_bias(q, k)[0]  # (H, T, S)
    distance = np.abs(q[:, None] - k[None, :])
    want = -alibi.slopes[:, None, None] * distance
    np.testing.assert_allclose(bias, want, rtol=1e-6, atol=1e-6)
    # one more step away costs exactly one slope more, in every head
    if past + T > 1:
        steps = np.diff(bias[:, -1, : past + T], axis=-1)  # last query, keys left of it
        np.testing.assert_allclose(steps, np.broadcast_to(alibi.slopes[:, None], steps.shape),
                                   rtol=1e-5)


# --------------------------------------------------------------------------- T5 relative bias


def test_t5_buckets_match_transformers():
    pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-300, 301)
    for bidirectional in (True, False):
        for buckets, dist in [(32, 128), (8, 16), (16, 200)]:
            want = T5Attention._relative_position_bucket(
                torch.from_numpy(rel), bidirectional, buckets, dist).numpy()
            got = relative_position_bucket(rel, bidirectional, buckets, dist)
            np.testing.assert_array_equal(got, want)


def test_t5_bias_depends_only_on_the_offset_and_learns():
    t5 = T5RelativeBias(4, num_buckets=8, max_distance=16, bidirectional=False)
    t5.to(dtype="float64")
    q, k = np.arange(3, 9), np.arange(9)
    bias = t5.position_bias(q, k).numpy()[0]  # (H, T, S)
    for h in range(4):
        for i, qi in enumerate(q):
            for j, kj in enumerate(k):
                b = relative_position_bucket(np.array(kj - qi), False, 8, 16)
                assert bias[h, i, j] == t5.weight.numpy()[b, h]
    # the gradient of each table entry sums the scores of the offsets in its bucket
    c = np.random.default_rng(0).standard_normal(bias.shape)
    (t5.position_bias(q, k) * c[None]).sum().backward()
    buckets = relative_position_bucket(k[None, :] - q[:, None], False, 8, 16)  # (T, S)
    want = np.zeros((8, 4))
    np.add.at(want, buckets, c.transpose(1, 2, 0))
    testing.assert_close(t5.weight.grad, want)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_model_with_each_scheme_trains(scheme):
    tinylm.seed(0)
    options = {"num_buckets": 8, "max_distance": 16} if scheme == "t5" else {}
    config = GPT2Config(vocab_size=50, d_model=32, n_layer=2, n_head=4, max_positions=32,
                        positional=scheme, positional_options=options)
    model = build_model(config)
    opt = AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, (4, 16))
    targets = np.roll(ids, -1, axis=1)
    losses = []
    for _ in range(3):
        loss = model(ids, targets=targets).loss
        opt.zero_grad()
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and np.isfinite(p.grad).all(), name
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_alibi_slopes_path_equals_the_explicit_bias_path():
    """Default positions hand attention the slopes (the tiled op builds the bias tile by
    tile); explicit positions spell the bias out. Same logits, cached or not."""
    tinylm.seed(0)
    model = build_model(GPT2Config(vocab_size=50, d_model=32, n_layer=2, n_head=4,
                                   max_positions=32, positional="alibi")).eval()
    ids = np.random.default_rng(0).integers(0, 50, (2, 10))
    mask = np.array([[1] * 10, [0] * 3 + [1] * 7])
    with tinylm.no_grad():
        slopes = model(ids, attention_mask=mask).logits.numpy()
        explicit = model(ids, attention_mask=mask, positions=np.arange(10)).logits.numpy()
        cache = tinylm.nn.KVCache()
        model(ids[:, :6], attention_mask=mask[:, :6], cache=cache)
        step = model(ids[:, 6:], attention_mask=mask, cache=cache).logits.numpy()
    testing.assert_close(slopes, explicit, rtol=1e-5, atol=1e-6)
    testing.assert_close(step, explicit[:, 6:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("module", ["tinylm.positional", "tinylm.ops.rotary", "tinylm.nn.moe"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.failed == 0 and result.attempted > 0

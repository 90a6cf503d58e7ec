"""A Hugging Face Llama with rope_scaling "yarn" or "dynamic" (random weights, built
locally) loaded by tinylm through this plugin: logits equal transformers' past the
original context, also step by step through a KV cache; tinylm writes the config back
and transformers loads it to the same logits."""

import json

import numpy as np
import pytest

import tinylm
from tinylm import plugins
from tinylm.errors import CheckpointError
from tinylm.models import build_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, L = 61, 32  # L: the original context
TOL = 3e-6  # relative; both in float64, but transformers' RMSNorm statistics are float32
VARIANTS = {
    "yarn": dict(max_position_embeddings=4 * L, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L,
        "rope_theta": 10000.0}),
    # the pre-v5 spelling, DeepSeek's mscale pair, other betas and an untruncated ramp
    "yarn-mscale": dict(max_position_embeddings=8 * L, rope_theta=50000.0, rope_scaling={
        "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": L,
        "beta_fast": 16.0, "beta_slow": 2.0, "mscale": 1.0, "mscale_all_dim": 0.5,
        "truncate": False}),
    "dynamic": dict(max_position_embeddings=L, rope_parameters={
        "rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}),
}
SCHEMES = {"yarn": "yarn", "yarn-mscale": "yarn", "dynamic": "dynamic-ntk"}


def build_hf(variant):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
        rms_norm_eps=1e-3, bos_token_id=0, eos_token_id=0, **VARIANTS[variant])
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()


def hf_cache(out) -> dict:
    """The keyword that feeds a forward's cache to the next: transformers >= 5.24 calls
    it ``cache``, earlier versions ``past_key_values``."""
    if "cache" in getattr(out, "__dataclass_fields__", {}):
        return {"cache": out.cache}
    return {"past_key_values": out.past_key_values}


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def folder(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    build_hf(request.param).save_pretrained(path)
    return request.param, path


def loaded(folder):
    """A fresh transformers model (dynamic RoPE keeps state across calls) and tinylm's,
    both in float64 with the same weights."""
    variant, path = folder
    hf = transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    return variant, hf.double().eval(), tinylm.load_pretrained(path).to(dtype="float64")


def test_config_names_the_plugin_scheme(folder):
    variant, hf, model = loaded(folder)
    c = model.config
    assert c.positional == SCHEMES[variant]
    assert plugins.registered_by("positional_encodings")[c.positional] == "rope-scaling"
    if variant == "yarn-mscale":
        assert c.positional_options == {
            "base": 50000.0, "factor": 8.0, "original_max_position_embeddings": L,
            "beta_fast": 16.0, "beta_slow": 2.0, "mscale": 1.0, "mscale_all_dim": 0.5,
            "truncate": False}
    rotary = hf.model.rotary_emb
    assert getattr(model.transformer.pos, "attention_factor", 1.0) == rotary.attention_scaling
    if variant != "dynamic":
        assert rotary.attention_scaling != 1.0  # so the factor is exercised


def test_logits_past_the_original_context(folder):
    """A 3.5 L sequence: transformers' logits at every position, those past L included,
    and different there from plain RoPE's (the scaling is what makes them equal)."""
    variant, hf, model = loaded(folder)
    ids = np.random.default_rng(1).integers(1, VOCAB, (2, int(3.5 * L)))
    with torch.no_grad():
        want = hf(torch.from_numpy(ids)).logits.numpy()
    with tinylm.no_grad():
        got = model(ids).logits.numpy()
    assert rel_err(got, want) < TOL
    assert rel_err(got[:, L:], want[:, L:]) < TOL
    base = model.config.positional_options.get("base", 10000.0)
    plain = build_model(model.config.replace(positional="rope", positional_options={"base": base}))
    plain.to(dtype="float64").load_state_dict(model.state_dict())
    with tinylm.no_grad():
        unscaled = plain(ids).logits.numpy()
    assert rel_err(unscaled[:, L:], want[:, L:]) > 1e-3


def test_kv_cache_steps_match_transformers(folder):
    """A prefix past L, then one token at a time: dynamic NTK regrows its base at every
    step in both (cached keys keep their rotation), YaRN does not change."""
    variant, hf, model = loaded(folder)
    ids = np.random.default_rng(2).integers(1, VOCAB, (1, 2 * L + 8))
    prefix = L + 4
    with torch.no_grad():
        out = hf(torch.from_numpy(ids[:, :prefix]), use_cache=True)
        want = [out.logits.numpy()]
        for t in range(prefix, ids.shape[1]):
            out = hf(torch.from_numpy(ids[:, t:t + 1]), use_cache=True, **hf_cache(out))
            want.append(out.logits.numpy())
    cache = tinylm.nn.KVCache()
    with tinylm.no_grad():
        got = [model(ids[:, :prefix], cache=cache).logits.numpy()]
        for t in range(prefix, ids.shape[1]):
            got.append(model(ids[:, t:t + 1], cache=cache).logits.numpy())
    assert rel_err(np.concatenate(got, 1), np.concatenate(want, 1)) < TOL


def test_written_back_for_transformers(folder, tmp_path):
    variant, hf, model = loaded(folder)
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    expected = dict(VARIANTS[variant].get("rope_parameters") or VARIANTS[variant]["rope_scaling"])
    assert written["rope_parameters"]["rope_type"] == expected["rope_type"]
    assert written["rope_scaling"] == {k: v for k, v in expected.items() if k != "rope_theta"}
    back = tinylm.load_pretrained(tmp_path)
    assert back.config == tinylm.load_pretrained(folder[1]).config
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert theirs.model.rotary_emb.rope_type == expected["rope_type"]
    ids = np.random.default_rng(3).integers(1, VOCAB, (1, 3 * L))
    with torch.no_grad():
        want = theirs.double()(torch.from_numpy(ids)).logits.numpy()
    with tinylm.no_grad():
        got = model(ids).logits.numpy()
    assert rel_err(got, want) < TOL


def test_without_the_plugin_the_rope_type_is_refused(folder):
    plugins.reset()  # the built-ins only
    with pytest.raises(CheckpointError, match=r"rope_type='(yarn|dynamic)' .*tinylm-rope-scaling"):
        tinylm.load_pretrained(folder[1])

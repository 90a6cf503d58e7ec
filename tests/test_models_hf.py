"""Hugging Face directories beyond the happy path: shards both ways, base-model files,
bf16 weights, tie detection, the errors (unsupported type, missing, mis-shaped and
unexpected tensors, pickles, configs HF cannot express), and config files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import tinylm
from tinylm import checkpoint
from tinylm.errors import CheckpointError
from tinylm.models import (
    BertConfig, ConfigError, GPT2Config, LlamaConfig, T5Config, build_model, config_from_dict,
    load_config,
)
from tinylm.models.hf import hf_state_dict

GPT2 = GPT2Config(vocab_size=50, d_model=16, n_layer=2, n_head=2, max_positions=16)
LLAMA3_SCALING = {"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def saved(tmp_path, config=GPT2, **kwargs):
    tinylm.seed(0)
    model = build_model(config)
    model.save_pretrained(tmp_path, **kwargs)
    return model


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- tinylm <-> tinylm


@pytest.mark.parametrize("config", [
    GPT2,
    LlamaConfig(vocab_size=50, d_model=16, n_layer=2, n_head=4, n_kv_head=2, d_ff=40),
    BertConfig(vocab_size=50, d_model=16, n_layer=2, n_head=2, d_ff=32, max_positions=16,
               head="classification", num_labels=4),
    T5Config(vocab_size=50, d_model=16, n_layer=1, n_decoder_layer=2, n_head=2, head_dim=8,
             d_ff=32, activation="silu", gated_mlp=True),
], ids=lambda c: c.architecture)
def test_save_then_load_is_exact(tmp_path, config):
    model = saved(tmp_path, config)
    back = tinylm.load_pretrained(tmp_path)
    assert type(back) is type(model) and back.config == model.config
    assert same_weights(model, back)
    assert not back.training  # loaded for inference, as transformers does


def test_sharded_save_writes_an_index_and_loads(tmp_path):
    model = saved(tmp_path, max_shard_size="10KB")
    files = sorted(os.listdir(tmp_path))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors" not in files
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in hf_state_dict(model).values())
    assert checkpoint.read_metadata(tmp_path / shards[0]) == {"format": "pt"}
    assert same_weights(model, tinylm.load_pretrained(tmp_path))
    model.save_pretrained(tmp_path)  # one file now: the old shards and index go
    assert sorted(f for f in os.listdir(tmp_path) if "safetensors" in f) == ["model.safetensors"]


def test_config_json_is_what_transformers_expects(tmp_path):
    saved(tmp_path, LlamaConfig(vocab_size=50, d_model=16, n_layer=1, n_head=4, n_kv_head=1,
                                d_ff=40, positional_options={"base": 5e5}))
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["model_type"] == "llama" and hf["architectures"] == ["LlamaForCausalLM"]
    assert hf["num_key_value_heads"] == 1 and hf["rope_parameters"]["rope_theta"] == 5e5
    assert hf["dtype"] == "float32"


@pytest.mark.parametrize("scaling", [LLAMA3_SCALING, {"type": "linear", "factor": 4.0}],
                         ids=lambda s: s["type"])
def test_rope_scaling_is_written_and_read_back(tmp_path, scaling):
    config = LlamaConfig(vocab_size=50, d_model=16, n_layer=1, n_head=2, n_kv_head=1, d_ff=40,
                         positional_options={"base": 5e5, "scaling": scaling})
    model = saved(tmp_path, config)
    hf = json.loads((tmp_path / "config.json").read_text())
    params = {k: v for k, v in scaling.items() if k != "type"}
    expected = {"rope_type": scaling["type"], **params}
    assert hf["rope_parameters"] == {"rope_theta": 5e5, **expected}
    assert hf["rope_scaling"] == expected  # for transformers < 5
    back = tinylm.load_pretrained(tmp_path)
    assert back.config == config and same_weights(model, back)


def test_pre_v5_rope_scaling_configs_are_read(tmp_path):
    """transformers < 5 wrote "rope_scaling" (with "type" in older files) and a top-level
    "rope_theta"; llama3 without original_max_position_embeddings takes the model's."""
    saved(tmp_path, LlamaConfig(vocab_size=50, d_model=16, n_layer=1, n_head=2, d_ff=40))
    hf = json.loads((tmp_path / "config.json").read_text())
    del hf["rope_parameters"]
    hf.update(rope_theta=5e5, max_position_embeddings=128,
              rope_scaling={"type": "linear", "factor": 2.0})
    (tmp_path / "config.json").write_text(json.dumps(hf))
    options = tinylm.load_pretrained(tmp_path).config.positional_options
    assert options == {"base": 5e5, "scaling": {"type": "linear", "factor": 2.0}}
    hf["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    scaling = tinylm.load_pretrained(tmp_path).config.positional_options["scaling"]
    assert scaling["type"] == "llama3" and scaling["original_max_position_embeddings"] == 128


@pytest.mark.parametrize("key, rope", [
    ("rope_scaling", {"rope_type": "dynamic", "factor": 2.0}),
    ("rope_scaling", {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}),
    ("rope_parameters", {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0],
                         "long_factor": [1.0]}),
])
def test_unsupported_rope_types_are_refused(tmp_path, key, rope):
    saved(tmp_path, LlamaConfig(vocab_size=50, d_model=16, n_layer=1, n_head=2, d_ff=40))
    hf = json.loads((tmp_path / "config.json").read_text())
    hf[key] = rope
    (tmp_path / "config.json").write_text(json.dumps(hf))
    kind = rope.get("rope_type", rope.get("type"))
    with pytest.raises(CheckpointError, match=rf"does not support: rope_type='{kind}' "
                                              r"\(only 'default', 'linear', 'llama3'\)"):
        tinylm.load_pretrained(tmp_path)


# --------------------------------------------------------------------------- transformers files


def test_sharded_transformers_checkpoint_loads(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=0)).eval()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = tinylm.load_pretrained(tmp_path)
    ids = np.random.default_rng(0).integers(0, 60, (2, 5))
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids)).logits.numpy()
    with tinylm.no_grad():
        ours = model(ids).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_base_model_file_without_prefix_loads(tmp_path):
    """GPT2Model files name tensors "h.0.attn..." (no "transformer." prefix)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    base = transformers.GPT2Model(transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1,
                                                          n_head=2, n_positions=16))
    base.save_pretrained(tmp_path)
    assert "wte.weight" in checkpoint.read_header(tmp_path / "model.safetensors")
    model = tinylm.load_pretrained(tmp_path)
    np.testing.assert_array_equal(model.tok_emb.weight.numpy(), base.wte.weight.detach().numpy())


def test_bf16_weights_load_as_float32(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16)).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    model = tinylm.load_pretrained(tmp_path)
    assert model.tok_emb.weight.dtype == np.float32
    np.testing.assert_array_equal(model.tok_emb.weight.numpy(),
                                  hf.transformer.wte.weight.float().detach().numpy())


def test_a_tied_config_with_a_different_lm_head_loads_untied(tmp_path):
    model = saved(tmp_path, GPT2.replace(tie_embeddings=False))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    back = tinylm.load_pretrained(tmp_path)
    assert not back.config.tie_embeddings and same_weights(model, back)


# --------------------------------------------------------------------------- errors


def test_unsupported_model_type_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(CheckpointError, match="'mistral' is not supported.*bert, gpt2, llama, t5"):
        tinylm.load_pretrained(tmp_path)


def edit_weights(tmp_path, fn):
    file = tmp_path / "model.safetensors"
    tensors = checkpoint.load_file(file)
    fn(tensors)
    checkpoint.save_file(tensors, file, metadata={"format": "pt"})


def test_shape_mismatch_reports_expected_shapes(tmp_path):
    saved(tmp_path)
    wrong = np.zeros((8, 16), np.float32)
    edit_weights(tmp_path, lambda t: t.update({"transformer.wpe.weight": wrong}))
    with pytest.raises(CheckpointError, match=r"transformer\.wpe\.weight: file \(8, 16\), "
                                              r"expected \(16, 16\)"):
        tinylm.load_pretrained(tmp_path)


def test_missing_and_unexpected_tensors_are_listed(tmp_path):
    saved(tmp_path)

    def edit(t):
        del t["transformer.h.1.ln_2.bias"]
        t["transformer.h.9.mystery.weight"] = np.zeros(3, np.float32)

    edit_weights(tmp_path, edit)
    with pytest.raises(CheckpointError) as info:
        tinylm.load_pretrained(tmp_path)
    message = str(info.value)
    assert "missing tensors (1): transformer.h.1.ln_2.bias (16,)" in message
    assert "unexpected tensors (1): transformer.h.9.mystery.weight" in message


def test_unexpected_tensors_may_be_allowed(tmp_path):
    model = saved(tmp_path)
    edit_weights(tmp_path, lambda t: t.update({"extra.weight": np.zeros(3, np.float32)}))
    assert same_weights(model, tinylm.load_pretrained(tmp_path, strict=False))


def test_pickles_are_refused_and_bad_paths_reported(tmp_path):
    saved(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match="never unpickles"):
        tinylm.load_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        tinylm.load_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    with pytest.raises(CheckpointError, match="needs the key 'vocab_size'"):
        tinylm.load_pretrained(tmp_path)


def test_configs_transformers_cannot_express_are_refused(tmp_path):
    odd = LlamaConfig(vocab_size=50, d_model=16, n_layer=1, n_head=4, d_ff=40,
                      positional="alibi", n_experts=2)
    with pytest.raises(CheckpointError, match="positional='alibi'.*n_experts=2"):
        build_model(odd).save_pretrained(tmp_path)
    assert not os.listdir(tmp_path)


# --------------------------------------------------------------------------- config files


@pytest.mark.parametrize("suffix", [".toml", ".json"])
@pytest.mark.parametrize("config", [
    GPT2, LlamaConfig(n_kv_head=8, positional_options={"base": 5e5, "fraction": 0.5,
                                                        "scaling": dict(LLAMA3_SCALING)}),
    BertConfig(head="none"), T5Config(n_decoder_layer=3, gated_mlp=True),
], ids=lambda c: getattr(c, "architecture", c))
def test_configs_round_trip_through_files(tmp_path, config, suffix):
    path = tmp_path / f"model{suffix}"
    config.save(path)
    assert load_config(path) == config


def test_config_file_errors_name_the_problem(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('architecture = "llama"\nd_model = 64\nn_head = 4\nn_kv_head = 3\n')
    with pytest.raises(ConfigError, match="n_kv_head=3 must divide n_head=4"):
        load_config(path)
    path.write_text('architecture = "llama"\nd_modle = 64\n')
    with pytest.raises(ConfigError, match=r"unknown LlamaConfig field\(s\) \['d_modle'\]"):
        load_config(path)
    path.write_text('[model]\narchitecture = "gpt2"\nd_model = "big"\n[train]\nlr = 1e-3\n')
    with pytest.raises(ConfigError, match="d_model must be int, got 'big'"):
        load_config(path)
    path.write_text('[model]\narchitecture = "gpt2"\nn_layer = 3\n[train]\nlr = 1e-3\n')
    assert load_config(path) == GPT2Config(n_layer=3)
    with pytest.raises(ConfigError, match="needs an 'architecture' key"):
        config_from_dict({"d_model": 3})
    with pytest.raises(tinylm.TinyLMError, match="unknown architecture 'gtp2'.*'gpt2'"):
        config_from_dict({"architecture": "gtp2"})
    with pytest.raises(ConfigError, match="save this config as .json"):
        T5Config(attn_scale=None).save(tmp_path / "t5.toml")

"""The schemes inside tinylm: built from model configs, plain RoPE up to the original
context (dynamic NTK), their options and errors, what Hugging Face cannot express, and
the installed entry point."""

import importlib.metadata

import numpy as np
import pytest
from click.testing import CliRunner

import tinylm
from tinylm import hookimpl, plugins
from tinylm.errors import CheckpointError, PluginError, TinyLMError
from tinylm.models import LlamaConfig, build_model, config_from_dict
from tinylm.positional import RoPE

from tinylm_rope_scaling import DynamicNTKRoPE, YaRNRoPE, yarn_attention_factor

SMALL = dict(vocab_size=40, d_model=32, n_layer=1, n_head=2, d_ff=64, max_positions=64)


def llama(positional, **options):
    tinylm.seed(0)
    return build_model(LlamaConfig(**SMALL, positional=positional, positional_options=options))


def logits(model, ids):
    with tinylm.no_grad():
        return model(ids).logits.numpy()


def test_models_build_the_schemes_from_their_configs(tmp_path):
    yarn = llama("yarn", factor=4.0, original_max_position_embeddings=16, beta_fast=16,
                 truncate=False)
    assert isinstance(yarn.transformer.pos, YaRNRoPE)
    assert yarn.transformer.pos.attention_factor == yarn_attention_factor(4.0)
    assert "yarn factor=4, L=16" in repr(yarn.transformer.pos)
    path = tmp_path / "model.toml"
    yarn.config.save(path)  # TOML: the options survive a file
    from tinylm.models import load_config

    assert load_config(path) == yarn.config
    dynamic = llama("dynamic-ntk", factor=2.0)
    assert isinstance(dynamic.transformer.pos, DynamicNTKRoPE)
    assert dynamic.transformer.pos.original == SMALL["max_positions"]  # L defaults to it
    assert config_from_dict({"architecture": "llama", **SMALL, "positional": "yarn",
                             "positional_options": {"factor": 2.0,
                                                    "original_max_position_embeddings": 8}})


def test_dynamic_ntk_is_plain_rope_up_to_the_original_context():
    rope, dynamic = llama("rope"), llama("dynamic-ntk", factor=4.0,
                                          original_max_position_embeddings=24)
    ids = np.random.default_rng(0).integers(0, 40, (1, 40))
    near = np.abs(logits(dynamic, ids[:, :24]) - logits(rope, ids[:, :24])).max()
    far = np.abs(logits(dynamic, ids) - logits(rope, ids))[0, :24].max()
    assert near < 1e-7 and far > 1e-5  # past L the whole sequence is rotated anew
    short, plain = (scheme.transformer.pos.rotation(np.arange(24)).cos for scheme in (dynamic, rope))
    np.testing.assert_allclose(short, plain, atol=1e-5)  # float32 angles: 1-ulp frequencies
    longer = dynamic.transformer.pos.rotation(np.arange(40)).cos
    assert np.abs(longer[:24] - plain).max() > 0.1
    pos = dynamic.transformer.pos
    np.testing.assert_allclose(pos.inv_freq_at(24), RoPE(16).inv_freq, rtol=2e-7)
    assert (pos.inv_freq_at(48)[1:] < pos.inv_freq_at(24)[1:]).all()


def test_yarn_at_factor_one_is_rope():
    yarn = YaRNRoPE(16, factor=1.0, original_max_position_embeddings=32)
    np.testing.assert_allclose(yarn.inv_freq, RoPE(16).inv_freq, rtol=2e-7)
    assert yarn.attention_factor == 1.0


@pytest.mark.parametrize("positional, options, message", [
    ("yarn", {"factor": 4.0}, "original_max_position_embeddings .*required"),
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": 8, "beta": 3},
     r"got \['beta', 'factor', 'original_max_position_embeddings'\]"),
    ("yarn", {"factor": 0.5, "original_max_position_embeddings": 8}, "factor >= 1"),
    ("dynamic-ntk", {"factor": "big"}, "factor >= 1"),
])
def test_bad_options_are_one_line_errors(positional, options, message):
    with pytest.raises(TinyLMError, match=message):
        llama(positional, **options)


@pytest.mark.parametrize("positional, options, message", [
    ("yarn", {"factor": 2.0, "original_max_position_embeddings": 16, "interleaved": True},
     "HF's Llama rotates halves"),
    ("dynamic-ntk", {"factor": 2.0, "interleaved": True}, "HF's Llama rotates halves"),
])
def test_what_transformers_cannot_express_is_refused(tmp_path, positional, options, message):
    with pytest.raises(CheckpointError, match=f"positional='{positional}': .*{message}"):
        llama(positional, **options).save_pretrained(tmp_path)


def test_dynamic_ntk_writes_its_context_where_transformers_reads_it(tmp_path):
    """HF's "dynamic" takes L from max_position_embeddings: a model with L = 16 and
    max_positions 64 is written with 16 there, and reads back with L = 16."""
    import json

    llama("dynamic-ntk", factor=2.0, original_max_position_embeddings=16).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["max_position_embeddings"] == 16
    assert written["rope_scaling"] == {"rope_type": "dynamic", "factor": 2.0}
    back = tinylm.load_pretrained(tmp_path)
    assert back.config.positional_options == {"factor": 2.0,
                                              "original_max_position_embeddings": 16}


def test_two_schemes_claiming_one_rope_type_are_an_error(tmp_path):
    class OtherYaRN(RoPE):
        hf_rope_type = "yarn"

    class Other:
        @staticmethod
        @hookimpl
        def register_positional_encodings(register):
            register("other-yarn", OtherYaRN)

    llama("yarn", factor=2.0, original_max_position_embeddings=16).save_pretrained(tmp_path)
    plugins.register_plugin(Other)
    with pytest.raises(PluginError, match="rope_type 'yarn' is claimed by positional scheme"):
        tinylm.load_pretrained(tmp_path)


def test_the_installed_entry_point(monkeypatch):
    """Once installed (pip install plugins/tinylm-rope-scaling), tinylm finds it alone."""
    if not any(ep.name == "rope-scaling" for ep in importlib.metadata.entry_points(group="tinylm")):
        pytest.skip("tinylm-rope-scaling is not installed: pip install plugins/tinylm-rope-scaling")
    from tinylm.cli import cli

    monkeypatch.setenv(plugins.ALLOW_ENV, "rope-scaling")
    plugins.reset()
    assert plugins.get_positional("yarn") is YaRNRoPE
    listed = CliRunner().invoke(cli, ["plugins"])
    assert listed.exit_code == 0
    row = [line for line in listed.output.splitlines() if line.startswith("rope-scaling")]
    assert row and row[0].split()[1:] == ["0.1.0", "positional_encodings:", "dynamic-ntk,", "yarn"]

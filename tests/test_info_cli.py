"""Parameter counts and activation-memory estimates from configs, and `tinylm info`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import tinylm
from tinylm.cli import cli
from tinylm.models import BertConfig, GPT2Config, LlamaConfig, T5Config, build_model
from tinylm.models.info import activation_memory, parameter_counts, retained_bytes

SMALL = dict(vocab_size=61, d_model=32, n_layer=2, n_head=4, max_positions=24)
CONFIGS = [
    GPT2Config(**SMALL),
    GPT2Config(**SMALL, tie_embeddings=False, dropout=0.1, d_ff=40),
    GPT2Config(**SMALL, positional="sinusoidal", activation="relu", attn_dropout=0.1),
    LlamaConfig(**SMALL, n_kv_head=2, d_ff=48),
    LlamaConfig(**SMALL, n_kv_head=1, d_ff=48, positional="alibi", bias=True),
    LlamaConfig(**SMALL, d_ff=40, n_experts=4, moe_top_k=2),
    LlamaConfig(**SMALL, d_ff=40, head_dim=4, positional="t5", norm="layernorm", bias=False),
    BertConfig(**SMALL, d_ff=64),
    BertConfig(**SMALL, d_ff=64, head="classification", num_labels=3, dropout=0.1),
    BertConfig(**SMALL, d_ff=64, head="none", tie_embeddings=False),
    T5Config(**SMALL, head_dim=8, d_ff=64, dropout=0.0, attn_dropout=0.0, mlp_dropout=0.0),
    T5Config(**SMALL, head_dim=8, d_ff=64, n_decoder_layer=3, activation="gelu_tanh",
             gated_mlp=True, tie_embeddings=False, dropout=0.1, mlp_dropout=0.1),
]
IDS = [f"{c.architecture}-{i}" for i, c in enumerate(CONFIGS)]


def run(*args):
    return CliRunner().invoke(cli, list(args), prog_name="tinylm")


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_parameter_counts_are_exact(config):
    counts = parameter_counts(config)
    assert counts["total"] == build_model(config).num_parameters()
    parts = ("embeddings", "positional", "attention", "feed_forward", "norms", "heads")
    assert sum(counts[k] for k in parts) == counts["total"]


def test_well_known_sizes():
    assert parameter_counts(GPT2Config())["total"] == 124_439_808  # GPT-2 small
    assert parameter_counts(LlamaConfig())["total"] == 6_738_415_616  # Llama-2 7B
    assert parameter_counts(BertConfig(head="none"))["total"] == 109_482_240  # bert-base
    assert parameter_counts(T5Config())["total"] == 60_506_624  # t5-small
    moe = parameter_counts(LlamaConfig(n_experts=8, moe_top_k=2, n_kv_head=8, d_ff=14336,
                                       vocab_size=32000, max_positions=32768))
    assert moe["total"] == 46_702_792_704  # Mixtral 8x7B
    per_expert = 3 * 4096 * 14336
    assert moe["total"] - moe["active"] == 32 * 6 * per_expert  # 6 of 8 experts idle per token


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_activation_estimate_is_close_to_what_the_graph_keeps(config):
    tinylm.seed(0)
    model = build_model(config)
    ids = np.random.default_rng(0).integers(0, 61, (3, 12))
    if config.architecture == "t5":
        loss = model(ids, targets=ids[:, :7]).loss
        estimate = activation_memory(config, 3, 12, target_len=7)
    elif config.architecture == "bert" and config.head != "mlm":
        out = model(ids, targets=np.array([0, 1, 2]) if config.head == "classification" else None)
        loss = out.loss if out.loss is not None else out.hidden_states.sum()
        estimate = activation_memory(config, 3, 12)
    else:
        loss = model(ids, targets=ids).loss
        estimate = activation_memory(config, 3, 12)
    measured = retained_bytes(loss)
    assert estimate["total"] == sum(v for k, v in estimate.items() if k != "total")
    assert abs(estimate["total"] - measured) <= 0.05 * measured, (estimate, measured)


@pytest.mark.parametrize("config", [
    GPT2Config(vocab_size=61, d_model=16, n_layer=1, n_head=2, max_positions=768),
    LlamaConfig(vocab_size=61, d_model=16, n_layer=1, n_head=4, n_kv_head=2, d_ff=24,
                positional="alibi"),
    LlamaConfig(vocab_size=61, d_model=16, n_layer=1, n_head=4, n_kv_head=2, d_ff=24),
], ids=["gpt2", "llama-alibi", "llama-rope"])
def test_long_sequences_follow_the_tiled_attention_op(config):
    """Past ops.attention.TILED_MIN_SCORES the op keeps O(T), not (B, H, T, S) scores."""
    from tinylm.ops import attention

    T = 768
    assert T * T >= attention.TILED_MIN_SCORES
    ids = np.random.default_rng(0).integers(0, 61, (1, T))
    measured = retained_bytes(build_model(config)(ids, targets=ids).loss)
    estimate = activation_memory(config, 1, T)
    assert abs(estimate["total"] - measured) <= 0.05 * measured, (estimate, measured)
    assert estimate["attention scores"] < 4 * T * T  # nowhere near one head's scores


def test_estimate_scales_with_batch_and_quadratically_in_scores():
    c = GPT2Config(attn_dropout=0.1)  # the composed op: scores at any length
    a, b = activation_memory(c, 1, 512), activation_memory(c, 2, 1024)
    assert b["attention scores"] == 8 * a["attention scores"]
    assert b["feed_forward"] == 4 * a["feed_forward"]
    assert activation_memory(c, 1, 512, "float16")["feed_forward"] == a["feed_forward"] // 2


# --------------------------------------------------------------------------- the command


def test_info_for_an_architecture_name():
    result = run("info", "gpt2")
    assert result.exit_code == 0, result.output
    assert "124,439,808" in result.output and "activations" in result.output
    assert "batch=1 seq_len=1024" in result.output


def test_info_for_a_config_file_and_json(tmp_path):
    path = tmp_path / "tiny.toml"
    CONFIGS[5].save(path)
    result = run("info", str(path), "--batch-size", "4", "--seq-len", "16", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["parameters"]["total"] == parameter_counts(CONFIGS[5])["total"]
    assert record["activation_bytes"] == activation_memory(CONFIGS[5], 4, 16)
    assert record["config"]["n_experts"] == 4
    text = run("info", str(path)).output
    assert "active/token" in text and "experts=4 top_k=2" in text


def test_info_for_a_checkpoint_directory(tmp_path):
    build_model(CONFIGS[3]).save_pretrained(tmp_path)
    result = run("info", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert f"{parameter_counts(CONFIGS[3])['total']:,}" in result.output
    assert "n_kv_head=2" in result.output
    assert run("info", str(tmp_path / "config.json")).output == result.output


def test_info_errors_are_one_line():
    result = run("info", "no-such-thing")
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: 'no-such-thing' is neither a config file")
    assert len(result.stderr.splitlines()) == 1

"""Hugging Face PEFT adapter folders both ways, with the ``peft`` package as the oracle.

Tiny random HF GPT-2 (Conv1D, fan_in_fan_out) and Llama (grouped-query heads: 4 query
heads, 2 key/value heads, so q_proj and k_proj/v_proj differ in rows) with sizes none
of which is a default. Every adapter gets random weights (LoRA B non-zero, IA3 vectors
not ones, DoRA magnitudes not the weight norms), then:

    (a) PEFT builds + saves  -> tinylm loads base + adapter -> logits == PeftModel's
    (b) tinylm applies + saves -> PeftModel.from_pretrained   -> logits == tinylm's

within 1e-5 relative (float32 both sides). Also rank/alpha patterns, LoRA biases, the
tinylm-only folder (bottleneck, prefix), and the bad inputs (another base, unknown
peft_type, missing files, a corrupt tensor), which leave the model as it was."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest

hf_peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tinylm  # noqa: E402
from tinylm import checkpoint, peft  # noqa: E402
from tinylm.errors import TinyLMError  # noqa: E402
from tinylm.models import LlamaConfig  # noqa: E402
from tinylm.models.decoder import Decoder  # noqa: E402

IDS = np.random.default_rng(0).integers(0, 50, (2, 7))
TOL = 1e-5


def _hf_config(family):
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=50, n_embd=24, n_layer=2, n_head=3,
                                       n_inner=40, n_positions=32, bos_token_id=0,
                                       eos_token_id=0)
    return transformers.LlamaConfig(vocab_size=50, hidden_size=24, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=40, max_position_embeddings=32,
                                    bos_token_id=0, eos_token_id=0)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """{family: folder of a random HF base model}."""
    out = {}
    for family, cls in (("gpt2", transformers.GPT2LMHeadModel),
                        ("llama", transformers.LlamaForCausalLM)):
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(family)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cls(_hf_config(family)).save_pretrained(folder)
        out[family] = str(folder)
    return out


def hf_model(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def peft_save(model, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tied lm_head target: PEFT saves the embedding too
        model.save_pretrained(folder)


def hf_logits(model):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # prefix tuning: transformers' past_key_values notice
        return model(torch.tensor(IDS)).logits.numpy()


def tinylm_logits(model):
    return model(IDS).logits.numpy()


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def randomize_peft(model, seed=1):
    """Move every trainable (adapter) parameter of a PeftModel off its init."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p += 0.2 * torch.randn_like(p)


def randomize_tinylm(model, seed=2):
    rng = np.random.default_rng(seed)
    for _, p in peft.adapter_state_dict(model).items():
        p[...] += (0.2 * rng.standard_normal(p.shape)).astype(p.dtype)


# (family, HF PEFT config, the same adapter as tinylm options)
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {
    "gpt2-lora": ("gpt2", dict(method="LORA", r=4, lora_alpha=8,
                               target_modules=["c_attn", "c_fc", "mlp.c_proj"]),
                  dict(method="lora", r=4, alpha=8,
                       target_modules=["c_attn", "c_fc", "mlp.c_proj"])),
    "llama-lora": ("llama", dict(method="LORA", r=4, lora_alpha=8, target_modules=LLAMA_ALL),
                   dict(method="lora", r=4, alpha=8, target_modules=LLAMA_ALL)),
    "gpt2-rslora": ("gpt2", dict(method="LORA", r=4, lora_alpha=6, use_rslora=True),
                    dict(method="lora", r=4, alpha=6, use_rslora=True)),
    "llama-rslora": ("llama", dict(method="LORA", r=3, lora_alpha=5, use_rslora=True,
                                   target_modules=["q_proj", "v_proj", "down_proj"]),
                     dict(method="lora", r=3, alpha=5, use_rslora=True,
                          target_modules=["q_proj", "v_proj", "down_proj"])),
    "gpt2-dora": ("gpt2", dict(method="LORA", r=4, lora_alpha=8, use_dora=True,
                               target_modules=["c_attn", "attn.c_proj"]),
                  dict(method="lora", r=4, alpha=8, use_dora=True,
                       target_modules=["c_attn", "attn.c_proj"])),
    "llama-dora": ("llama", dict(method="LORA", r=4, lora_alpha=8, use_dora=True,
                                 target_modules=["q_proj", "k_proj", "o_proj", "up_proj"]),
                   dict(method="lora", r=4, alpha=8, use_dora=True,
                        target_modules=["q_proj", "k_proj", "o_proj", "up_proj"])),
    "llama-patterns": ("llama", dict(method="LORA", r=4, lora_alpha=8, target_modules=LLAMA_ALL,
                                     rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6},
                                     alpha_pattern={"k_proj": 3, "down_proj": 11}),
                       dict(method="lora", r=4, alpha=8, target_modules=LLAMA_ALL,
                            rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6},
                            alpha_pattern={"k_proj": 3, "down_proj": 11})),
    "gpt2-patterns-bias": ("gpt2", dict(method="LORA", r=2, lora_alpha=4, bias="lora_only",
                                        target_modules=["c_attn", "c_fc"],
                                        rank_pattern={"c_fc": 5},
                                        alpha_pattern={"h.0.attn.c_attn": 7}),
                           dict(method="lora", r=2, alpha=4, bias="lora_only",
                                target_modules=["c_attn", "c_fc"],
                                rank_pattern={"c_fc": 5}, alpha_pattern={"h.0.attn.c_attn": 7})),
    "gpt2-ia3": ("gpt2", dict(method="IA3"), dict(method="ia3")),
    "llama-ia3": ("llama", dict(method="IA3", target_modules=["k_proj", "v_proj", "down_proj",
                                                              "up_proj"],
                                feedforward_modules=["down_proj"]),
                  dict(method="ia3", target_modules=["k_proj", "v_proj", "down_proj", "up_proj"],
                       feedforward_modules=["down_proj"])),
    "gpt2-prompt": ("gpt2", dict(method="PROMPT_TUNING", num_virtual_tokens=3),
                    dict(method="prompt_tuning", num_virtual_tokens=3)),
    "llama-prompt": ("llama", dict(method="PROMPT_TUNING", num_virtual_tokens=4),
                     dict(method="prompt_tuning", num_virtual_tokens=4)),
    "gpt2-tied-lm_head": ("gpt2", dict(method="LORA", r=2, lora_alpha=3,
                                       target_modules=["lm_head", "c_attn"]),
                          dict(method="lora", r=2, alpha=3, target_modules=["lm_head", "c_attn"])),
    "gpt2-prefix": ("gpt2", dict(method="PREFIX_TUNING", num_virtual_tokens=3),
                    dict(method="prefix_tuning", num_virtual_tokens=3)),
    "llama-prefix-mlp": ("llama", dict(method="PREFIX_TUNING", num_virtual_tokens=3,
                                       prefix_projection=True, encoder_hidden_size=10),
                         dict(method="prefix_tuning", num_virtual_tokens=3,
                              prefix_projection=True, encoder_hidden_size=10)),
}


def peft_config(options):
    options = dict(options)
    method = options.pop("method")
    if method == "LORA":
        return hf_peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **options)
    if method == "IA3":
        return hf_peft.IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False, **options)
    if method == "PREFIX_TUNING":
        return hf_peft.PrefixTuningConfig(task_type="CAUSAL_LM", **options)
    return hf_peft.PromptTuningConfig(task_type="CAUSAL_LM", **options)


def peft_model(base, options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hf_peft.get_peft_model(hf_model(base), peft_config(options))
    randomize_peft(model)
    return model.eval()


def compare(ours, theirs, options):
    """Prompt tuning: PEFT returns the P virtual positions too; tinylm does not."""
    P = options.get("num_virtual_tokens")
    if options["method"] == "PROMPT_TUNING":
        assert theirs.shape[1] == ours.shape[1] + P
        theirs = theirs[:, P:]
    assert ours.shape == theirs.shape
    return rel(ours, theirs)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_into_tinylm(bases, tmp_path, case):
    family, theirs, _ = CASES[case]
    pm = peft_model(bases[family], theirs)
    peft_save(pm, tmp_path)
    want = hf_logits(pm)
    model = tinylm.load_pretrained(bases[family])
    base_logits = tinylm_logits(model)
    peft.load_adapter(model, tmp_path)
    got = tinylm_logits(model)
    assert compare(got, want, theirs) < TOL
    assert compare(base_logits, want, theirs) > 1e-3  # the adapter does change the model
    if theirs.get("bias", "none") == "none":  # trained biases are the base's own
        with peft.disable_adapters(model):
            np.testing.assert_array_equal(tinylm_logits(model), base_logits)


@pytest.mark.parametrize("case", list(CASES))
def test_tinylm_adapter_loads_into_peft(bases, tmp_path, case):
    family, theirs, ours = CASES[case]
    ours = dict(ours)
    model = tinylm.load_pretrained(bases[family])
    peft.apply(model, ours.pop("method"), **ours)
    randomize_tinylm(model)
    assert peft.save_adapter(model, tmp_path, base=bases[family]) == "hf"
    got = tinylm_logits(model)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == bases[family]
    assert config["task_type"] == "CAUSAL_LM"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = hf_peft.PeftModel.from_pretrained(hf_model(bases[family]), tmp_path).eval()
    assert compare(got, hf_logits(pm), theirs) < TOL
    # and back into tinylm: the same adapter
    again = tinylm.load_pretrained(bases[family])
    peft.load_adapter(again, tmp_path)
    np.testing.assert_allclose(tinylm_logits(again), got, rtol=0, atol=1e-6)


def test_lora_on_tinylm_fused_qkv_saves_as_q_k_v(bases, tmp_path):
    """LoRA on the whole fused qkv of a Llama (a tinylm name) is three HF LoRAs that
    share A and split B and DoRA's magnitude by rows."""
    model = tinylm.load_pretrained(bases["llama"])
    peft.apply(model, "lora", r=3, alpha=4, use_dora=True, target_modules=["qkv"])
    randomize_tinylm(model)
    peft.save_adapter(model, tmp_path)
    tensors = checkpoint.load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.{}_proj.{}"
    assert tensors[key.format("q", "lora_B.weight")].shape == (24, 3)
    assert tensors[key.format("k", "lora_B.weight")].shape == (12, 3)
    assert tensors[key.format("v", "lora_magnitude_vector")].shape == (12,)
    np.testing.assert_array_equal(tensors[key.format("q", "lora_A.weight")],
                                  tensors[key.format("v", "lora_A.weight")])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["k_proj", "q_proj", "v_proj"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = hf_peft.PeftModel.from_pretrained(hf_model(bases["llama"]), tmp_path).eval()
    assert rel(tinylm_logits(model), hf_logits(pm)) < TOL


def test_saved_config_is_peft_s(bases, tmp_path):
    """The adapter_config.json PEFT reads: its fields, HF module names, fan_in_fan_out."""
    model = tinylm.load_pretrained(bases["gpt2"])
    peft.apply(model, "lora", r=4, alpha=8, target_modules=["transformer.blocks.1.mlp.up"],
               rank_pattern={"mlp.up": 2})
    peft.save_adapter(model, tmp_path, base="org/base")
    config = hf_peft.PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(config, hf_peft.LoraConfig)
    assert config.target_modules == {"h.1.mlp.c_fc"} and config.fan_in_fan_out
    assert config.rank_pattern == {"transformer\\.h\\.1\\.mlp\\.c_fc": 2}
    assert config.base_model_name_or_path == "org/base"
    keys = sorted(checkpoint.load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == ["base_model.model.transformer.h.1.mlp.c_fc.lora_A.weight",
                    "base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight"]


# --------------------------------------------------------------------------- tinylm-only


class MiniConfig(LlamaConfig):
    """A decoder of no Hugging Face family: no HF module names at all."""

    architecture = "mini-llama"


def _mini(_bases):
    tinylm.seed(0)
    return Decoder(MiniConfig(vocab_size=50, d_model=24, n_layer=2, n_head=4, n_kv_head=2,
                              d_ff=40)).eval()


@pytest.mark.parametrize("build, method, options", [
    ("gpt2", "bottleneck", {}),
    ("llama", "bottleneck", {"bottleneck_size": 5}),
    (_mini, "prefix_tuning", {"num_virtual_tokens": 3, "prefix_projection": True,
                              "encoder_hidden_size": 10}),
    (_mini, "lora", {"r": 2, "target_modules": ["qkv", "mlp.down"], "use_dora": True}),
], ids=["gpt2-bottleneck", "llama-bottleneck", "mini-prefix", "mini-dora"])
def test_tinylm_only_adapter_round_trips(bases, tmp_path, build, method, options):
    def make():
        return tinylm.load_pretrained(bases[build]) if isinstance(build, str) else build(bases)

    model = make()
    peft.apply(model, method, adapter_name="mine", **options)
    randomize_tinylm(model)
    assert peft.save_adapter(model, tmp_path) == "tinylm"
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "TINYLM" and config["tinylm_method"] == method
    keys = checkpoint.load_file(tmp_path / "adapter_model.safetensors")
    assert keys and all(".mine." not in k for k in keys)
    with pytest.raises(Exception):  # Hugging Face PEFT has no such peft_type
        hf_peft.PeftConfig.from_pretrained(str(tmp_path))
    again = make()
    peft.load_adapter(again, tmp_path, name="other")
    assert peft.adapter_names(again) == ["other"]
    np.testing.assert_array_equal(tinylm_logits(again), tinylm_logits(model))


# --------------------------------------------------------------------------- bad input


def untouched(model, before):
    assert peft.adapter_names(model) == []
    assert not [n for n, _ in model.named_parameters() if ".peft." in n]
    assert all(p.requires_grad for p in model.parameters())
    np.testing.assert_array_equal(tinylm_logits(model), before)


def one_line_error(excinfo, *parts):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for p in parts:
        assert p in msg, msg


def test_adapter_for_another_base_names_the_tensor_and_both_shapes(bases, tmp_path):
    pm = peft_model(bases["llama"], CASES["llama-lora"][1])
    peft_save(pm, tmp_path)
    other = tinylm.load_pretrained(_other_llama(tmp_path / "other"))
    before = tinylm_logits(other)
    with pytest.raises(TinyLMError) as e:
        peft.load_adapter(other, tmp_path)
    one_line_error(e, "tensor base_model.model.model.layers.0.mlp.down_proj.lora_A.weight has "
                   "shape (4, 40), this model needs (4, 48)", "more")
    untouched(other, before)


def _other_llama(folder):
    config = _hf_config("llama")
    config.hidden_size, config.intermediate_size = 32, 48
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_adapter_for_another_architecture(bases, tmp_path):
    pm = peft_model(bases["gpt2"], CASES["gpt2-lora"][1])
    peft_save(pm, tmp_path)
    model = tinylm.load_pretrained(bases["llama"])
    before = tinylm_logits(model)
    with pytest.raises(TinyLMError) as e:
        peft.load_adapter(model, tmp_path)
    one_line_error(e, "transformer.h.0.attn.c_attn", "does not have")
    untouched(model, before)


def test_prompt_for_another_width(bases, tmp_path):
    pm = peft_model(bases["llama"], CASES["llama-prompt"][1])
    peft_save(pm, tmp_path)
    other = tinylm.load_pretrained(_other_llama(tmp_path / "other"))
    with pytest.raises(TinyLMError) as e:
        peft.load_adapter(other, tmp_path)
    one_line_error(e, "prompt_embeddings", "(4, 24)", "(4, 32)")


def test_bad_folders(bases, tmp_path):
    model = tinylm.load_pretrained(bases["llama"])
    before = tinylm_logits(model)
    with pytest.raises(TinyLMError) as e:
        peft.load_adapter(model, tmp_path / "nowhere")
    one_line_error(e, "not a folder")
    with pytest.raises(TinyLMError) as e:
        peft.load_adapter(model, tmp_path)
    one_line_error(e, "adapter_config.json")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(TinyLMError) as e:
        peft.load_adapter(model, tmp_path)
    one_line_error(e, "adapter_model.safetensors", "never unpickles")
    checkpoint.save_file({"x": np.zeros(2, np.float32)}, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA"}))
    with pytest.raises(TinyLMError) as e:
        peft.load_adapter(model, tmp_path)
    one_line_error(e, "'LOHA'", "LORA", "IA3", "PROMPT_TUNING")
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(TinyLMError) as e:
        peft.load_adapter(model, tmp_path)
    one_line_error(e, "adapter_config.json")
    untouched(model, before)


def test_config_and_tensors_that_disagree(bases, tmp_path):
    """A rank the config does not say, an option tinylm lacks, DoRA without magnitudes."""
    pm = peft_model(bases["llama"], CASES["llama-lora"][1])
    peft_save(pm, tmp_path)
    model = tinylm.load_pretrained(bases["llama"])
    before = tinylm_logits(model)
    file = tmp_path / "adapter_config.json"
    fields = json.loads(file.read_text())
    for change, parts in [({"r": 5}, ["lora_A.weight", "(4, 24)", "(5, 24)"]),
                          ({"use_dora": True}, ["lora_magnitude_vector", "missing"]),
                          ({"layers_to_transform": [0]}, ["layers_to_transform"])]:
        file.write_text(json.dumps({**fields, **change}))
        with pytest.raises(TinyLMError) as e:
            peft.load_adapter(model, tmp_path)
        one_line_error(e, *parts)
    untouched(model, before)


def test_corrupt_tinylm_folder_is_detached_again(bases, tmp_path):
    """A tinylm-only folder is checked after attaching (its shapes come from the
    method): a mismatch detaches the adapter and restores the trainable flags."""
    model = tinylm.load_pretrained(bases["gpt2"])
    peft.apply(model, "bottleneck")
    peft.save_adapter(model, tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = checkpoint.load_file(file)
    key = sorted(tensors)[0]
    tensors[key] = np.zeros(tensors[key].shape[::-1] + (1,), np.float32)
    checkpoint.save_file(tensors, file)
    fresh = tinylm.load_pretrained(bases["gpt2"])
    before = tinylm_logits(fresh)
    with pytest.raises(TinyLMError) as e:
        peft.load_adapter(fresh, tmp_path)
    one_line_error(e, key, "another base model")
    untouched(fresh, before)


def test_second_adapter_beside_the_first(bases, tmp_path):
    """load_adapter with a new name adds beside an existing adapter (PEFT's
    load_adapter); a taken name is refused before anything is read."""
    pm = peft_model(bases["gpt2"], CASES["gpt2-ia3"][1])
    peft_save(pm, tmp_path)
    model = tinylm.load_pretrained(bases["gpt2"])
    peft.apply(model, "lora", r=2)
    peft.load_adapter(model, tmp_path, name="ia3")
    assert peft.adapter_names(model) == ["default", "ia3"]
    peft.set_adapter(model, "ia3")
    assert rel(tinylm_logits(model), hf_logits(pm)) < TOL
    with pytest.raises(TinyLMError) as e:
        peft.load_adapter(model, tmp_path, name="ia3")
    one_line_error(e, "'ia3' already")
    assert peft.adapter_names(model) == ["default", "ia3"]
    assert os.path.exists(tmp_path / "adapter_model.safetensors")

"""tinylm.peft's mechanism: adapters on hosts, freezing, the report, several named
adapters, disable_adapters, targets in both name spaces, defaults, bad input, and a
third-party method plugged in through register_peft_methods."""

import numpy as np
import pytest

from tinylm import hookimpl, nn, ops, peft, plugins
from tinylm.errors import TinyLMError
from tinylm.models import BertConfig, GPT2Config, LlamaConfig, T5Config, build_model
from tinylm.peft import targets

V = 61


def llama(**kw):
    c = dict(vocab_size=V, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=40,
             max_positions=32)
    return build_model(LlamaConfig(**{**c, **kw})).eval()


def gpt2(**kw):
    c = dict(vocab_size=V, d_model=24, n_layer=2, n_head=3, max_positions=32)
    return build_model(GPT2Config(**{**c, **kw})).eval()


def ids(B=2, T=6, seed=0):
    return np.random.default_rng(seed).integers(0, V, (B, T))


def logits(model, x):
    return model(x).logits.numpy()


# --------------------------------------------------------------------------- freezing


def test_only_adapter_parameters_train_and_base_grads_stay_none():
    model = llama()
    base_names = {n for n, _ in model.named_parameters()}
    peft.apply(model, "lora", r=4, init_lora_weights=False)
    model(ids()).logits.sum().backward()
    for name, p in model.named_parameters():
        if name in base_names:
            assert not p.requires_grad and p.grad is None, name
        else:
            assert ".peft.default." in name and p.requires_grad and p.grad is not None, name
            assert np.isfinite(p.grad).all() and np.abs(p.grad).max() > 0, name


def test_base_state_dict_keys_are_unchanged():
    model = gpt2()
    before = list(model.state_dict())
    peft.apply(model, "lora")
    after = list(model.state_dict())
    assert [k for k in after if ".peft." not in k] == before
    extra = [k for k in after if ".peft." in k]
    assert extra and all(k.startswith("transformer.blocks.") for k in extra)


def test_trainable_report_counts_like_peft():
    model = gpt2()
    total = sum(p.size for p in model.parameters())
    peft.apply(model, "lora", r=2)
    report = peft.trainable_parameters(model)
    d, L = 24, 2
    lora = L * (2 * d + 3 * d * 2)  # per block: A (2, 24) + B (72, 2) on c_attn
    assert report.trainable == lora and report.total == total + lora
    assert str(report) == (f"trainable params: {lora:,d} || all params: {total + lora:,d} || "
                           f"trainable%: {100 * lora / (total + lora):.4f}")


# --------------------------------------------------------------------------- adapters


def test_disable_adapters_gives_the_base_logits_exactly_and_nests():
    model, x = llama(), ids()
    base = logits(model, x)
    peft.apply(model, "lora", init_lora_weights=False)
    adapted = logits(model, x)
    assert np.abs(adapted - base).max() > 1e-3
    with peft.disable_adapters(model):
        assert np.array_equal(logits(model, x), base)
        with peft.disable_adapters(model):
            assert np.array_equal(logits(model, x), base)
        assert np.array_equal(logits(model, x), base)  # still disabled: the outer one
    assert np.array_equal(logits(model, x), adapted)
    with pytest.raises(RuntimeError, match="boom"):
        with peft.disable_adapters(model):
            raise RuntimeError("boom")
    assert np.array_equal(logits(model, x), adapted)


def test_several_named_adapters_and_switching():
    model, x = llama(), ids()
    peft.apply(model, "lora", init_lora_weights=False)
    out_a = logits(model, x)
    peft.apply(model, "lora", adapter_name="second", r=2, target_modules=["o_proj", "up"],
               init_lora_weights=False)
    assert peft.adapter_names(model) == ["default", "second"]
    assert model.active_adapter == "default"  # as PEFT's add_adapter: not activated
    assert np.array_equal(logits(model, x), out_a)
    peft.set_adapter(model, "second")
    out_b = logits(model, x)
    assert np.abs(out_b - out_a).max() > 1e-3
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".peft.second." in n for n in trainable)
    model(x).logits.sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (".peft.second." in n), n
    peft.set_adapter(model, "default")
    assert np.array_equal(logits(model, x), out_a)
    assert set(peft.adapter_state_dict(model, "second")) == {
        n for n, _ in model.named_parameters() if ".peft.second." in n}
    peft.delete_adapter(model, "default")
    assert peft.adapter_names(model) == ["second"] and model.active_adapter == "second"
    assert np.array_equal(logits(model, x), out_b)


def test_merge_and_unload_gives_a_plain_model_with_the_same_logits():
    model, x = gpt2(), ids()
    peft.apply(model, "lora", init_lora_weights=False)
    adapted = logits(model, x)
    plain = peft.merge_and_unload(model)
    assert plain is model and not hasattr(model, "peft_config")
    assert not [n for n, _ in model.named_modules() if "peft" in n]
    assert all(p.requires_grad for p in model.parameters())
    np.testing.assert_allclose(logits(model, x), adapted, rtol=1e-5, atol=1e-5)


def test_disable_adapters_refuses_merged_adapters():
    model = gpt2()
    peft.apply(model, "lora", init_lora_weights=False)
    peft.merge(model)
    with pytest.raises(TinyLMError, match="merged into the weights; call tinylm.peft.unmerge"):
        with peft.disable_adapters(model):
            pass


# --------------------------------------------------------------------------- targets


def test_hf_names_of_llama_are_row_slices_of_qkv():
    model = llama()
    names = peft.hf_module_names(model)
    q, kv = 4 * 8, 2 * 8
    assert names["model.layers.1.self_attn.q_proj"] == (
        "transformer.blocks.1.attn.qkv", slice(0, q), False)
    assert names["model.layers.1.self_attn.k_proj"][1] == slice(q, q + kv)
    assert names["model.layers.1.self_attn.v_proj"][1] == slice(q + kv, q + 2 * kv)
    assert names["model.layers.0.mlp.gate_proj"] == ("transformer.blocks.0.mlp.gate", None,
                                                     False)
    assert names["lm_head"] == ("lm_head", None, False)


def test_targets_by_hf_and_tinylm_names_gpt2():
    model = gpt2()
    by_hf = targets.resolve(model, ["c_attn"])
    by_ours = targets.resolve(model, ["attn.qkv"])
    assert [t.host_name for t in by_hf] == [t.host_name for t in by_ours] == [
        "transformer.blocks.0.attn.qkv", "transformer.blocks.1.attn.qkv"]
    assert all(t.rows is None and t.fan_in_fan_out for t in by_hf + by_ours)
    assert by_ours[1].hf_name == "transformer.h.1.attn.c_attn"
    both_c_proj = targets.resolve(model, ["c_proj"])  # attn.c_proj and mlp.c_proj, as PEFT
    assert [t.host_name.split(".", 3)[3] for t in both_c_proj] == ["attn.out", "mlp.down"] * 2
    regex = targets.resolve(model, r"transformer\.h\.1\.mlp\.c_(fc|proj)")
    assert [t.host_name for t in regex] == ["transformer.blocks.1.mlp.up",
                                            "transformer.blocks.1.mlp.down"]


def test_targets_llama_slices_regex_and_all_linear():
    model = llama()
    ts = targets.resolve(model, ["q_proj", "v_proj"])
    assert [(t.host_name, t.rows, t.hf_name.rpartition(".")[2]) for t in ts[:2]] == [
        ("transformer.blocks.0.attn.qkv", slice(0, 32), "q_proj"),
        ("transformer.blocks.0.attn.qkv", slice(48, 64), "v_proj")]
    assert len(ts) == 4
    whole = targets.resolve(model, r".*\.qkv")
    assert [t.rows for t in whole] == [None, None] and whole[0].hf_name is None
    every = targets.resolve(model, "all-linear")
    assert "lm_head" not in {t.host_name for t in every} and len(every) == 2 * 5
    with pytest.raises(TinyLMError, match="both whole and by HF row slices"):
        targets.resolve(model, ["qkv", "q_proj"])


def test_default_targets_per_family():
    t5 = build_model(T5Config(vocab_size=V, d_model=16, n_layer=1, n_head=2, head_dim=8,
                              d_ff=24))
    bert = build_model(BertConfig(vocab_size=V, d_model=16, n_layer=1, n_head=2, d_ff=24,
                                  max_positions=16))
    assert targets.default_targets(gpt2(), "lora") == ["c_attn"]
    assert targets.default_targets(llama(), "lora") == ["q_proj", "v_proj"]
    assert targets.default_targets(bert, "lora") == ["query", "value"]
    assert targets.default_targets(t5, "lora") == ["q", "v"]
    assert targets.default_targets(llama(), "ia3") == ["k_proj", "v_proj", "down_proj"]
    assert targets.default_feedforward(bert, "ia3") == ["output.dense"]
    bert_ts = targets.resolve(bert, targets.default_targets(bert, "lora"))
    assert [t.hf_name.rpartition(".")[2] for t in bert_ts] == ["query", "value"]
    t5_ts = targets.resolve(t5, ["q", "v"])  # self-attention q, v and cross q (whole), v
    got = [(t.host_name.split(".", 3)[3], t.rows is None) for t in t5_ts]
    assert got == [("attn.qkv", False), ("attn.qkv", False),  # encoder
                   ("attn.qkv", False), ("attn.qkv", False),  # decoder self
                   ("cross_attn.q", True), ("cross_attn.kv", False)]
    peft.apply(t5, "lora")  # an encoder-decoder runs with the defaults
    out = t5(ids(), decoder_ids=ids(T=3))
    assert out.logits.shape == (2, 3, V)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("call, message", [
    (lambda m: peft.apply(m, "lorra"), r"unknown PEFT method 'lorra'; available: .*lora"),
    (lambda m: peft.apply(m, "lora", target_modules=["nope"]),
     r"matches no linear module; tinylm names: transformer\.blocks\.\*\.attn\.qkv, .*; "
     r"HF names: model\.layers\.\*\.self_attn\.q_proj, "),
    (lambda m: peft.apply(m, "lora", rank=4), r"lora has no option 'rank'; its options: "),
    (lambda m: peft.apply(m, "lora", r=0), r"r must be a positive integer"),
    (lambda m: peft.apply(m, "lora", bias="some"), r"bias must be one of none, all, lora_only"),
    (lambda m: peft.apply(m, "lora", alpha=2, lora_alpha=3), r"given twice"),
    (lambda m: peft.apply(m, "lora", target_modules="(unclosed"), r"not a valid regex"),
    (lambda m: peft.apply(m, "lora", init_lora_weights="pissa"), r"init_lora_weights must"),
    (lambda m: peft.apply(m, "lora", modules_to_save=["lm_head"]), r"not supported"),
    (lambda m: peft.set_adapter(m, "x"), r"the model has no adapters"),
    (lambda m: peft.merge(m), r"the model has no adapters"),
])
def test_bad_input_is_one_line(call, message):
    model = llama()
    with pytest.raises(TinyLMError, match=message) as info:
        call(model)
    assert "\n" not in str(info.value)
    assert not [n for n, _ in model.named_modules() if "peft" in n]  # nothing half-installed


def test_used_adapter_name_and_unknown_adapter():
    model = llama()
    peft.apply(model, "lora")
    with pytest.raises(TinyLMError, match="adapter named 'default' already"):
        peft.apply(model, "lora")
    with pytest.raises(TinyLMError, match="no adapter named 'x'; the model has default"):
        peft.set_adapter(model, "x")
    with pytest.raises(TinyLMError, match="non-empty string without '.'"):
        peft.apply(model, "lora", adapter_name="a.b")


def test_no_default_for_a_family_without_one():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(TinyLMError, match="no default target_modules .* give target_modules"):
        peft.apply(model, "lora")
    peft.apply(model, "lora", target_modules=["0"], init_lora_weights=False)
    assert peft.adapter_names(model) == ["default"]


# --------------------------------------------------------------------------- a plugin


class Scale(peft.Adapter):
    """Multiplies its host's output by a learned vector (IA3-like), for the test."""

    method = "scale"

    def __init__(self, name, n):
        super().__init__(name)
        self.s = nn.Parameter(np.full(n, 2.0, np.float32))

    def after(self, host, args, kwargs, y):
        return y * self.s


class ScaleMethod(peft.PeftMethod):
    name = "scale"

    def attach(self, model, config, adapter_name):
        hosts = []
        for t in targets.resolve(model, config.target_modules):
            peft.install(t.host, Scale(adapter_name, t.host.out_features))
            hosts.append(t.host_name)
        return hosts


import dataclasses  # noqa: E402


@dataclasses.dataclass(frozen=True)
class ScaleConfig(peft.PeftConfig):
    target_modules: tuple = ("lm_head",)


ScaleMethod.config_class = ScaleConfig


class ScalePlugin:
    @staticmethod
    @hookimpl
    def register_peft_methods(register):
        register("scale", ScaleMethod)


def test_a_third_party_method_plugs_in():
    plugins.register_plugin(ScalePlugin, name="scale-plugin")
    model, x = gpt2(), ids()
    base = logits(model, x)
    peft.apply(model, "scale")
    assert model.peft_config["default"].method == "scale"
    np.testing.assert_allclose(logits(model, x), 2 * base, rtol=1e-6)
    with pytest.raises(TinyLMError, match="scale adapters cannot be merged"):
        peft.merge(model)
    assert peft.trainable_parameters(model).trainable == V
    ops.sum(model(x).logits).backward()
    assert model.lm_head.peft.default.s.grad is not None
    assert model.tok_emb.weight.grad is None

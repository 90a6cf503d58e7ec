"""tinylm-vera against Hugging Face PEFT's VeRA (the oracle), on tiny random HF models.

GPT-2 (Conv1D: fan_in_fan_out, c_attn is one module) and a grouped-query Llama (4
query heads, 2 key/value heads: q_proj has 24 rows, k_proj and v_proj 12, so the
pieces of tinylm's fused qkv slice B differently), sizes none of which is a default.
The adapters are moved off their init (lambda_b = 0 would make every check pass), then

    (a) PEFT builds + saves  -> tinylm loads base + adapter -> logits == PeftModel's
    (b) tinylm applies + saves -> PeftModel.from_pretrained   -> logits == tinylm's

within 1e-5 relative, with and without the projections in the file. Also: the
projections equal torch's draws bit for bit, the gradients of lambda_b / lambda_d equal
PEFT's, merge / unmerge, the trainable count, tinylm-only folders, bad folders."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

import tinylm
from tinylm import peft, plugins, testing

import tinylm_vera
from tinylm_vera.projection import projections

hf_peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

IDS = np.random.default_rng(0).integers(0, 50, (2, 7))
TOL = 1e-5
GPT2_TARGETS = ["c_attn", "c_fc", "mlp.c_proj"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "down_proj", "up_proj"]


@pytest.fixture(autouse=True)
def vera_plugin(monkeypatch):
    """Only the built-ins and this plugin, registered explicitly (as docs/plugins.md)."""
    monkeypatch.setenv("TINYLM_LOAD_PLUGINS", "")
    plugins.reset()
    plugins.register_plugin(tinylm_vera, "vera")
    yield
    plugins.reset()


def _hf_config(family):
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=50, n_embd=24, n_layer=2, n_head=3,
                                       n_inner=40, n_positions=32)
    return transformers.LlamaConfig(vocab_size=50, hidden_size=24, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=40, max_position_embeddings=32)


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


def peft_vera(folder, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # save_projection=False, Conv1D fan_in_fan_out
        config = hf_peft.VeraConfig(task_type="CAUSAL_LM", **options)
        model = hf_peft.get_peft_model(hf_model(folder), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p += 0.3 * torch.randn_like(p)
    return model.eval()


def hf_logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def randomize(model, seed=2):
    rng = np.random.default_rng(seed)
    for p in peft.adapter_state_dict(model).values():
        p[...] += (0.3 * rng.standard_normal(p.shape)).astype(p.dtype)


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


CASES = [("gpt2", GPT2_TARGETS, 6, 3, True), ("llama", LLAMA_TARGETS, 5, 11, True),
         ("llama", ["q_proj", "v_proj", "o_proj"], 4, 0, False),
         ("gpt2", ["c_attn"], 7, 9, False)]
IDS_OF = [f"{f}-r{r}-{'saved' if s else 'from-key'}" for f, _, r, _, s in CASES]


def test_projections_are_torchs_draws():
    """The key alone gives PEFT's vera_A, vera_B bit for bit (torch's MT19937 +
    uniform_), for a few keys and shapes (one above 2**32)."""
    from peft.tuners.vera.model import _kaiming_init

    for key, r, max_in, max_out in ((0, 5, 40, 24), (7, 64, 96, 288), (2**33 + 5, 3, 8, 130)):
        g = torch.Generator().manual_seed(key)
        want_a = _kaiming_init((r, max_in), generator=g).numpy()
        want_b = _kaiming_init((max_out, r), generator=g).numpy()
        a, b = projections(key, r, max_in, max_out)
        np.testing.assert_array_equal(a, want_a)
        np.testing.assert_array_equal(b, want_b)


@pytest.mark.parametrize("family,targets,r,key,save", CASES, ids=IDS_OF)
def test_peft_vera_loads_into_tinylm(bases, tmp_path, family, targets, r, key, save):
    pm = peft_vera(bases[family], r=r, target_modules=targets, projection_prng_key=key,
                   save_projection=save)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path)
    model = tinylm.load_pretrained(bases[family])
    base_logits = model(IDS).logits.numpy()
    peft.load_adapter(model, tmp_path)
    got, want = model(IDS).logits.numpy(), hf_logits(pm)
    assert rel(got, want) < TOL
    assert rel(base_logits, want) > 1e-3  # the adapter does change the model
    config = model.peft_config["default"]
    assert (config.r, config.projection_prng_key, config.save_projection) == (r, key, save)
    shared = pm.base_model.vera_A["default"].numpy()
    np.testing.assert_array_equal(model.peft.default.vera_A, shared)
    with peft.disable_adapters(model):
        np.testing.assert_array_equal(model(IDS).logits.numpy(), base_logits)


@pytest.mark.parametrize("family,targets,r,key,save", CASES, ids=IDS_OF)
def test_tinylm_vera_loads_into_peft(bases, tmp_path, family, targets, r, key, save):
    model = tinylm.load_pretrained(bases[family])
    peft.apply(model, "vera", r=r, target_modules=targets, projection_prng_key=key,
               save_projection=save)
    randomize(model)
    assert peft.save_adapter(model, tmp_path, base=bases[family]) == "hf"
    fields = json.loads((tmp_path / "adapter_config.json").read_text())
    assert fields["peft_type"] == "VERA" and fields["save_projection"] == save
    assert fields["fan_in_fan_out"] == (family == "gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = hf_peft.PeftModel.from_pretrained(hf_model(bases[family]), tmp_path).eval()
    got = model(IDS).logits.numpy()
    assert rel(got, hf_logits(pm)) < TOL
    again = tinylm.load_pretrained(bases[family])  # and back: the same adapter
    peft.load_adapter(again, tmp_path)
    testing.assert_close(again(IDS).logits, got, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family,targets", [("gpt2", GPT2_TARGETS), ("llama", LLAMA_TARGETS)])
def test_fresh_adapter_is_peft_s_and_gradients_match(bases, tmp_path, family, targets):
    """A fresh adapter is PEFT's (projections, vectors: lambda_b = 0, lambda_d =
    d_initial; the trainable count), and with the same non-trivial lambdas the
    gradients of every lambda_b and lambda_d equal PEFT's (the sliced qkv path too)."""
    options = dict(r=6, target_modules=targets, projection_prng_key=3, d_initial=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = hf_peft.get_peft_model(hf_model(bases[family]), hf_peft.VeraConfig(**options))
    model = tinylm.load_pretrained(bases[family])
    peft.apply(model, "vera", **options)
    np.testing.assert_array_equal(model.peft.default.vera_A, pm.base_model.vera_A["default"])
    np.testing.assert_array_equal(model.peft.default.vera_B, pm.base_model.vera_B["default"])
    ours = peft.adapter_state_dict(model)
    theirs = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert sum(v.size for v in ours.values()) == sum(p.numel() for p in theirs.values())
    assert peft.trainable_parameters(model).trainable == sum(p.numel() for p in theirs.values())
    assert {float(v[0]) for v in ours.values()} == {0.0, np.float32(0.2)}
    assert rel(model(IDS).logits.numpy(), hf_logits(pm)) < TOL  # both the identity
    # the same random lambdas on both sides (through a PEFT folder), one backward each
    torch.manual_seed(5)
    with torch.no_grad():
        for p in theirs.values():
            p += 0.3 * torch.randn_like(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path)
    model = tinylm.load_pretrained(bases[family])
    peft.load_adapter(model, tmp_path)
    x, y = IDS[:, :-1], IDS[:, 1:]
    model(x, targets=y).loss.backward()
    logits = pm(torch.tensor(x)).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, 50),
                                      torch.tensor(y).reshape(-1)).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == len(theirs)
    modules = peft.hf_module_names(model)
    for key, p in theirs.items():
        module, _, vector = key[len("base_model.model."):-len(".default")].rpartition(".")
        host, rows, _ = modules[module]
        piece = "" if rows is None else module.rpartition(".")[2] + "."
        testing.assert_close(grads[f"{host}.peft.default.{piece}{vector}"], p.grad.numpy(),
                             rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for n, p in model.named_parameters() if ".peft." not in n)


def test_merge_unmerge_and_unload(bases):
    model = tinylm.load_pretrained(bases["llama"])
    base = {k: v.copy() for k, v in model.state_dict().items()}
    peft.apply(model, "vera", r=4, target_modules=LLAMA_TARGETS + ["o_proj"])
    randomize(model)
    want = model(IDS).logits.numpy()
    peft.merge(model)
    testing.assert_close(model(IDS).logits, want, rtol=1e-5, atol=1e-6)
    peft.unmerge(model)
    for k, v in base.items():
        np.testing.assert_array_equal(model.state_dict()[k], v)  # bit for bit
    merged = peft.merge_and_unload(model)
    assert not [n for n in merged.state_dict() if "peft" in n]
    testing.assert_close(merged(IDS).logits, want, rtol=1e-5, atol=1e-6)


def test_whole_fused_qkv_is_a_tinylm_folder(bases, tmp_path):
    """VeRA on Llama's fused qkv named the tinylm way (one piece over all rows) has no
    PEFT form; it is saved as a tinylm folder and loads back the same."""
    model = tinylm.load_pretrained(bases["llama"])
    peft.apply(model, "vera", r=4, target_modules=["attn.qkv"], projection_prng_key=9)
    randomize(model)
    assert peft.save_adapter(model, tmp_path) == "tinylm"
    fields = json.loads((tmp_path / "adapter_config.json").read_text())
    assert fields["peft_type"] == "TINYLM" and "fused" in fields["tinylm_note"]
    again = tinylm.load_pretrained(bases["llama"])
    peft.load_adapter(again, tmp_path)
    np.testing.assert_array_equal(again(IDS).logits.numpy(), model(IDS).logits.numpy())


def test_bad_folders_leave_the_model_as_it_was(bases, tmp_path):
    pm = peft_vera(bases["gpt2"], r=4, target_modules=["c_attn"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path)
    model = tinylm.load_pretrained(bases["llama"])  # another base: no c_attn
    before = model(IDS).logits.numpy()
    with pytest.raises(tinylm.CheckpointError, match="c_attn"):
        peft.load_adapter(model, tmp_path)
    assert not peft.adapter_names(model)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["bias"] = "all"
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    gpt2 = tinylm.load_pretrained(bases["gpt2"])
    with pytest.raises(tinylm.CheckpointError, match="bias='all'"):
        peft.load_adapter(gpt2, tmp_path)
    assert not peft.adapter_names(gpt2)
    np.testing.assert_array_equal(model(IDS).logits.numpy(), before)
    with pytest.raises(tinylm.ConfigError, match="positive integer"):
        peft.apply(gpt2, "vera", r=0)


def test_the_entry_point_registers_vera(monkeypatch):
    """Installed (pip install -e plugins/tinylm-vera), the plugin loads by entry point."""
    monkeypatch.setenv("TINYLM_LOAD_PLUGINS", "vera")
    plugins.reset()
    assert plugins.get_peft_method("vera") is tinylm_vera.method.Vera
    assert plugins.registered_by("peft_methods")["vera"] == "vera"

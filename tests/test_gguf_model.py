"""GGUF models in and out (tinylm.formats.gguf_model), against the gguf package and
transformers: a tiny transformers Llama / GPT-2 (random weights, built locally) exported
by tinylm is read by gguf.GGUFReader with llama.cpp's metadata and the tensors
convert_hf_to_gguf.py would write (q/k permuted as the test spells it, quantized bytes as
gguf.quants gives); a file gguf.GGUFWriter writes from the transformers weights loads into
tinylm with transformers' logits; import(export(model)) gives identical logits; bad files
are one error naming the file."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tinylm  # noqa: E402
from model_helpers import build_hf  # noqa: E402
from tinylm.errors import CheckpointError  # noqa: E402
from tinylm.formats.gguf import GGUFError, read_gguf, write_gguf  # noqa: E402
from tinylm.formats.gguf_model import export_gguf, load_gguf  # noqa: E402
from tinylm.loading import load_model  # noqa: E402
from tinylm.tokenizers import BPETokenizer  # noqa: E402

VOCAB, TOL = 300, 2e-5
Q = gguf.GGMLQuantizationType
TEXT = "the lowest tower, the lower road; 42 towers " * 20


def hf_permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute, spelled as there (the test's oracle)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


@pytest.fixture(scope="module")
def tokenizer():
    return BPETokenizer.train(TEXT, vocab_size=VOCAB - 4, special_tokens=["<|endoftext|>"])


@pytest.fixture(scope="module")
def hf_llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rope_theta=50000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    return build_hf(transformers.LlamaForCausalLM, config).eval()


@pytest.fixture(scope="module")
def hf_gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                     n_positions=128, activation_function="gelu_new",
                                     # GPT2Config's default 50256 is outside this small
                                     # vocabulary: GGUF import drops such ids, as llama.cpp
                                     bos_token_id=VOCAB - 5, eos_token_id=VOCAB - 5)
    return build_hf(transformers.GPT2LMHeadModel, config).eval()


def in_tinylm(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path / "hf")
    return tinylm.load_pretrained(tmp_path / "hf")


def hf_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(torch.tensor(ids)).logits.numpy()


def rel(a, b):
    """max |a - b| / max |b|: the error relative to the largest logit."""
    return float(np.abs(a - b).max() / np.abs(b).max())


IDS = np.array([[5, 17, 99, 3, 250, 41, 7, 8, 120]])


def llama_state(hf_model):
    return {k: v.numpy() for k, v in hf_model.state_dict().items()}


# ----------------------------------------------------------------------------- export


def test_llama_export_is_what_convert_hf_to_gguf_writes(hf_llama, tokenizer, tmp_path):
    path = tmp_path / "m.gguf"
    export_gguf(in_tinylm(hf_llama, tmp_path), tokenizer, path)
    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == 0
    assert {k: meta[f"llama.{k}"] for k in (
        "context_length", "embedding_length", "block_count", "feed_forward_length",
        "attention.head_count", "attention.head_count_kv", "rope.dimension_count")} == {
        "context_length": 128, "embedding_length": 64, "block_count": 2,
        "feed_forward_length": 96, "attention.head_count": 4, "attention.head_count_kv": 2,
        "rope.dimension_count": 16}
    assert meta["llama.rope.freq_base"] == 50000.0
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert len(meta["tokenizer.ggml.tokens"]) == VOCAB
    assert meta["tokenizer.ggml.tokens"][:tokenizer.vocab_size] == \
        [tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)]
    hf = llama_state(hf_llama)
    want = {"token_embd.weight": hf["model.embed_tokens.weight"], "output.weight":
            hf["lm_head.weight"], "output_norm.weight": hf["model.norm.weight"]}
    for i in range(2):
        t, h = f"blk.{i}.", f"model.layers.{i}."
        want[t + "attn_q.weight"] = hf_permute(hf[h + "self_attn.q_proj.weight"], 4)
        want[t + "attn_k.weight"] = hf_permute(hf[h + "self_attn.k_proj.weight"], 2)
        for ours, theirs in [("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                             ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
                             ("ffn_down", "mlp.down_proj"), ("attn_norm", "input_layernorm"),
                             ("ffn_norm", "post_attention_layernorm")]:
            want[f"{t}{ours}.weight"] = hf[f"{h}{theirs}.weight"]
    got = {t.name: t for t in r.tensors}
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        assert got[name].tensor_type == Q.F32
        np.testing.assert_array_equal(np.asarray(got[name].data).reshape(w.shape), w, name)


@pytest.mark.parametrize("dtype, qtype", [("q8_0", Q.Q8_0), ("q4_0", Q.Q4_0),
                                          ("q4_1", Q.Q4_1), ("f16", Q.F16)])
def test_quantized_tensors_have_the_bytes_gguf_quants_gives(hf_llama, tokenizer, tmp_path,
                                                           dtype, qtype):
    model = in_tinylm(hf_llama, tmp_path)
    export_gguf(model, tokenizer, tmp_path / "q.gguf", dtype=dtype)
    r = gguf.GGUFReader(tmp_path / "q.gguf")
    ref = gguf.GGUFReader(_exported(model, tokenizer, tmp_path / "f.gguf"))
    floats = {t.name: np.asarray(t.data) for t in ref.tensors}
    for t in r.tensors:
        if floats[t.name].ndim == 1:
            assert t.tensor_type == Q.F32, t.name                  # norms stay F32
            continue
        assert t.tensor_type == qtype, t.name
        np.testing.assert_array_equal(np.asarray(t.data),
                                      gguf.quants.quantize(floats[t.name], qtype), t.name)
    assert r.fields["general.file_type"].contents() == {"q8_0": 7, "q4_0": 2, "q4_1": 3,
                                                        "f16": 1}[dtype]


def _exported(model, tokenizer, path):
    export_gguf(model, tokenizer, path, dtype="f32")
    return path


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_import_of_export_gives_identical_logits(family, hf_llama, hf_gpt2, tokenizer, tmp_path):
    model = in_tinylm(hf_llama if family == "llama" else hf_gpt2, tmp_path)
    export_gguf(model, tokenizer, tmp_path / "m.gguf")
    back, tok = load_gguf(tmp_path / "m.gguf")
    assert back.config == model.config.replace(dropout=0.0, attn_dropout=0.0)  # not in GGUF
    np.testing.assert_array_equal(back(IDS).logits.data, model(IDS).logits.data)
    assert tok.encode(TEXT[:80]) == tokenizer.encode(TEXT[:80])


def test_gpt2_export_loads_back_tied_with_transformers_logits(hf_gpt2, tokenizer, tmp_path):
    export_gguf(in_tinylm(hf_gpt2, tmp_path), tokenizer, tmp_path / "g.gguf", dtype="q8_0")
    names = {t.name for t in gguf.GGUFReader(tmp_path / "g.gguf").tensors}
    assert {"position_embd.weight", "output.weight", "blk.1.attn_qkv.bias"} <= names
    model, _ = load_model(tmp_path / "g.gguf")
    assert model.config.tie_embeddings
    assert 1e-4 < rel(model(IDS).logits.data, hf_logits(hf_gpt2, IDS)) < 3e-2  # Q8_0 error


# ----------------------------------------------------------------------------- import


def write_with_gguf_writer(hf_model, tokenizer, path, qtype=Q.F32):
    """A llama GGUF file written by gguf.GGUFWriter from transformers' weights, tensors
    permuted and named as convert_hf_to_gguf.py does (the test's own conversion)."""
    c = hf_model.config
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list([tokenizer.id_to_token(i) or f"[PAD{i}]" for i in range(VOCAB)])
    w.add_token_merges([f"{tokenizer.id_to_token(a)} {tokenizer.id_to_token(b)}"
                        for a, b in tokenizer.merges])
    hf = llama_state(hf_model)
    for name, a in _gguf_names(hf, c).items():
        a = np.ascontiguousarray(a, np.float32)
        if a.ndim == 2 and qtype != Q.F32:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _gguf_names(hf, c) -> dict:
    out = {"token_embd.weight": hf["model.embed_tokens.weight"],
           "output_norm.weight": hf["model.norm.weight"], "output.weight": hf["lm_head.weight"]}
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(c.num_hidden_layers):
        for theirs, ours in names.items():
            a = hf[f"model.layers.{i}.{theirs}.weight"]
            if ours in ("attn_q", "attn_k"):
                heads = c.num_attention_heads if ours == "attn_q" else c.num_key_value_heads
                a = hf_permute(a, heads)
            out[f"blk.{i}.{ours}.weight"] = a
    return out


def test_a_gguf_writer_file_loads_with_transformers_logits(hf_llama, tokenizer, tmp_path):
    write_with_gguf_writer(hf_llama, tokenizer, tmp_path / "w.gguf")
    model, tok = load_model(tmp_path / "w.gguf")
    assert (model.config.n_kv_head, model.config.tie_embeddings) == (2, False)
    assert model.config.positional_options == {"base": 50000.0}
    assert rel(model(IDS).logits.data, hf_logits(hf_llama, IDS)) < TOL
    assert tok.encode(TEXT[:60]) == tokenizer.encode(TEXT[:60])


def test_a_q4_1_file_dequantizes_as_gguf_quants(hf_llama, tokenizer, tmp_path):
    write_with_gguf_writer(hf_llama, tokenizer, tmp_path / "q.gguf", Q.Q4_1)
    model = tinylm.load_pretrained(tmp_path / "q.gguf", dequantize=True)
    r = gguf.GGUFReader(tmp_path / "q.gguf")
    t = next(t for t in r.tensors if t.name == "blk.0.attn_k.weight")
    k = gguf.quants.dequantize(t.data, t.tensor_type)
    qkv = model.transformer.blocks[0].attn.qkv.weight.data
    np.testing.assert_array_equal(hf_permute(qkv[64:96], 2)[:, :], k)  # rows 64..96 are k


# ----------------------------------------------------------------------------- bad files


def rewrite(path, out, meta=None, drop=(), **changes):
    f = read_gguf(path)
    fields = {**{k: v for k, v in f.fields.items() if k not in drop}, **(meta or {})}
    write_gguf(out, fields, [t for n, t in f.tensors.items() if n not in drop])
    return out


@pytest.mark.parametrize("meta, drop, message", [
    ({"general.architecture": "mamba"}, (), "architecture 'mamba' is not supported"),
    ({"tokenizer.ggml.model": "rwkv"}, (), "tokenizer model 'rwkv'"),
    ({"tokenizer.ggml.pre": "falcon"}, (), "pre-tokenizer 'falcon'"),
    (None, ("blk.1.ffn_up.weight",), "missing tensors: blk.1.ffn_up.weight"),
    (None, ("llama.block_count",), "no 'llama.block_count'"),
    ({"llama.rope.scaling.type": "yarn"}, (), "RoPE scaling 'yarn' is not supported"),
])
def test_a_file_tinylm_cannot_map_is_one_error_naming_it(hf_llama, tokenizer, tmp_path,
                                                         meta, drop, message):
    good = tmp_path / "good.gguf"
    write_with_gguf_writer(hf_llama, tokenizer, good)
    bad = rewrite(good, tmp_path / "bad.gguf", meta, drop)
    with pytest.raises(GGUFError, match=message) as e:
        load_gguf(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match=f"is a GGUF file tinylm cannot load: .*{message}"):
        load_model(bad)


def test_a_truncated_file_is_a_checkpoint_error(hf_llama, tokenizer, tmp_path):
    good = tmp_path / "good.gguf"
    write_with_gguf_writer(hf_llama, tokenizer, good)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="cut.gguf is a GGUF file .*truncated"):
        load_model(cut)


def test_export_refuses_what_gguf_cannot_hold(tokenizer, tmp_path):
    from tinylm.models import LlamaConfig, build_model

    model = build_model(LlamaConfig(vocab_size=VOCAB, d_model=32, n_layer=1, n_head=2,
                                    d_ff=64, norm="layernorm"))
    with pytest.raises(GGUFError, match="norm='layernorm'"):
        export_gguf(model, tokenizer, tmp_path / "x.gguf")
    with pytest.raises(GGUFError, match="dtype 'q5_0'"):
        export_gguf(model, tokenizer, tmp_path / "x.gguf", dtype="q5_0")
    assert not (tmp_path / "x.gguf").exists()


# ----------------------------------------------------------------------------- the CLI


def test_tinylm_info_reports_a_gguf_file(hf_llama, tokenizer, tmp_path):
    from train_helpers import run_cli

    export_gguf(in_tinylm(hf_llama, tmp_path), tokenizer, tmp_path / "m.gguf", dtype="q8_0")
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    counts = {}
    for t in r.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    out = run_cli("info", tmp_path / "m.gguf")
    assert out.exit_code == 0, out.output
    assert "architecture  llama" in out.output
    for name, n in counts.items():
        assert f"{name:<6}{n:>5} tensors" in out.output
    weights = sum(int(np.prod(t.shape)) for t in r.tensors)
    bits = 8 * sum(int(t.n_bytes) for t in r.tensors) / weights
    assert f"parameters    {weights:,}" in out.output and f"{bits:.2f} bits per weight" in out.output
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00")
    out = run_cli("info", bad)
    assert out.exit_code == 2 and out.output.count("\n") == 1 and "Error:" in out.output


def test_tinylm_generate_chat_on_a_gguf_file_uses_its_template(hf_llama, tmp_path):
    from train_helpers import run_cli

    tok = BPETokenizer.train(TEXT, vocab_size=VOCAB - 4,
                             special_tokens=["<|im_start|>", "<|im_end|>"])
    export_gguf(in_tinylm(hf_llama, tmp_path), tok, tmp_path / "m.gguf")
    f = read_gguf(tmp_path / "m.gguf")
    template = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                "'<|im_end|>\\n'}}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|im_start|>assistant\\n' }}{% endif %}")
    write_gguf(tmp_path / "c.gguf", {**f.fields, "tokenizer.chat_template": template},
               list(f.tensors.values()))
    for name, said in (("c.gguf", ""), ("m.gguf", "plain template")):
        out = run_cli("generate", "-m", tmp_path / name, "--chat", "--max-new-tokens", 3,
                      "--temperature", 0)
        assert out.exit_code == 0, out.output
        assert said in out.output


def test_the_one_loader_takes_a_quantized_folder_of_a_gguf_model(hf_llama, tokenizer,
                                                                  tmp_path):
    from tinylm.quant.model import save_quantized

    export_gguf(in_tinylm(hf_llama, tmp_path), tokenizer, tmp_path / "m.gguf", dtype="q4_1")
    packed, tok = load_gguf(tmp_path / "m.gguf", dequantize=False)
    assert packed.quantization["tensors"]["transformer.blocks.0.attn.qkv"]["format"] == "q4_1"
    save_quantized(packed, tok, tmp_path / "folder")
    model, tok2 = load_model(tmp_path / "folder")
    np.testing.assert_array_equal(model(IDS).logits.data, packed(IDS).logits.data)
    floats = tinylm.load_pretrained(tmp_path / "m.gguf", dequantize=True)  # float32
    assert rel(packed(IDS).logits.data, floats(IDS).logits.data) < 1e-5
    assert tok2.encode(TEXT[:50]) == tokenizer.encode(TEXT[:50])

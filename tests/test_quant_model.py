"""quantize(model) on GPT-2 and Llama: logits close to the float model's (and equal, to
float32 rounding, to the float model on the dequantized weights), generation runs,
skip patterns and block sizes, dequantize_model, and the quantized folder round trip."""

import copy
import json

import numpy as np
import pytest

from tinylm import backend, checkpoint, nn
from tinylm.autograd import no_grad
from tinylm.errors import CheckpointError
from tinylm.generate import generate
from tinylm.models import build_model
from tinylm.models.config import GPT2Config, LlamaConfig
from tinylm.quant import QuantEmbedding, QuantLinear, QuantTiedHead, QuantError
from tinylm.quant.model import (
    dequantize_model, load_quantized_folder, quantize, save_quantized,
)
from tinylm.tokenizers import CharTokenizer

# init_std 0.05 (the default 0.02 leaves logits ~0.1): O(1) logits, where quantization
# error shows. Random 2-layer models amplify weight error a few times (measured here:
# q8_0 0.8-1.3e-2 relative, 4-bit 0.1-0.27; at init 0.2 both double or triple).
WIDE = 0.05


def tiny(arch, vocab=40, **extra):
    backend.seed(0)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=vocab, d_model=64, n_layer=2, n_head=4, max_positions=32,
                            init_std=WIDE, **extra)
    else:
        config = LlamaConfig(**{**dict(vocab_size=vocab, d_model=64, n_layer=2, n_head=4,
                                       n_kv_head=2, d_ff=128, max_positions=32,
                                       init_std=WIDE), **extra})
    return build_model(config).eval()


def logits(model, ids):
    with no_grad():
        return model(ids).logits.numpy().astype(np.float64)


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


IDS = np.random.default_rng(0).integers(0, 40, (2, 9))
LIMITS = {"q8_0": 2e-2, "int8": 2e-2, "q4_0": 0.4, "q4_1": 0.4, "nf4": 0.4}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("scheme", list(LIMITS))
def test_quantized_logits_are_close_to_float_and_equal_the_dequantized_model(arch, scheme):
    model = tiny(arch)
    ref = logits(model, IDS)
    quantize(model, scheme)
    got = logits(model, IDS)
    assert rel(got, ref) < LIMITS[scheme]
    floats = dequantize_model(copy.deepcopy(model))
    assert not any(isinstance(m, (QuantLinear, QuantEmbedding, QuantTiedHead))
                   for m in floats.modules())
    assert rel(got, logits(floats, IDS)) < 1e-5
    out = generate(model, [[1, 2, 3]], max_new_tokens=5, eos_id=(), temperature=0)
    assert len(out.tokens[0]) == 5


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_eight_bits_are_several_times_closer_than_four(arch):
    ref = logits(tiny(arch), IDS)
    err = {s: rel(logits(quantize(tiny(arch), s), IDS), ref) for s in ("q8_0", "q4_0")}
    assert 4 * err["q8_0"] < err["q4_0"]


def test_every_linear_is_quantized_and_a_tied_head_follows_the_embedding():
    model = quantize(tiny("gpt2"), "q4_1")
    assert isinstance(model.tok_emb, QuantEmbedding)
    assert isinstance(model.lm_head, QuantTiedHead) and model.lm_head.embedding is model.tok_emb
    assert not [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert model.quantization["tied"] == {"lm_head": "tok_emb"}
    assert not [k for k in model.state_dict() if k.startswith("lm_head")]
    assert all(p.data.size < 64 * 64 for p in model.parameters())  # norms, biases, positions


def test_int8_and_nf4_leave_embeddings_float_unless_asked():
    model = quantize(tiny("gpt2"), "nf4")
    assert type(model.tok_emb) is nn.Embedding and model.lm_head.weight is model.tok_emb.weight
    model = quantize(tiny("gpt2"), "int8", embeddings=True)
    assert isinstance(model.tok_emb, QuantEmbedding) and isinstance(model.lm_head, QuantTiedHead)


def test_skip_patterns_and_rows_off_the_block():
    model = quantize(tiny("llama"), "q8_0", skip=["lm_head", "*.attn.*"])
    assert type(model.lm_head) is nn.Linear
    assert all(type(b.attn.qkv) is nn.Linear and isinstance(b.mlp.up, QuantLinear)
               for b in model.transformer.blocks)
    with pytest.warns(UserWarning, match="not a multiple"):
        model = quantize(tiny("llama", d_ff=96), "nf4")            # down has 96 inputs
    assert set(model.quantization["skipped"]) == {f"transformer.blocks.{i}.mlp.down"
                                                  for i in range(2)}
    assert type(model.transformer.blocks[0].mlp.down) is nn.Linear
    with pytest.raises(QuantError, match="unknown quantization scheme"):
        quantize(tiny("gpt2"), "q3")


@pytest.mark.parametrize("arch,scheme", [("gpt2", "q4_0"), ("llama", "q8_0"),
                                         ("llama", "nf4-dq"), ("gpt2", "int8")])
def test_folder_round_trip_gives_identical_logits(tmp_path, arch, scheme):
    tok = CharTokenizer.train(["abcdefghijklmnopqrstuvwxyz ,.!?"], vocab_size=40)
    model = quantize(tiny(arch, vocab=tok.vocab_size), scheme)
    ids = IDS % tok.vocab_size
    save_quantized(model, tok, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"]["scheme"] == scheme
    assert set(config["quantization"]["tensors"]) == set(model.quantization["tensors"])
    header = checkpoint.read_header(tmp_path / "q" / "model.safetensors")
    assert all(header[f"{name}.qweight"]["dtype"] in ("U8", "I8")
               for name in config["quantization"]["tensors"])
    loaded, tok2 = load_quantized_folder(tmp_path / "q")
    np.testing.assert_array_equal(logits(loaded, ids), logits(model, ids))
    assert tok2.encode("abc") == tok.encode("abc")
    with pytest.raises(CheckpointError, match="not empty"):
        save_quantized(model, tok, tmp_path / "q")
    save_quantized(model, tok, tmp_path / "q", overwrite=True)


def test_a_damaged_folder_is_one_checkpoint_error(tmp_path):
    tok = CharTokenizer.train(["abcdefghijklmnopqrstuvwxyz ,.!?"], vocab_size=40)
    model = quantize(tiny("llama", vocab=tok.vocab_size), "q4_1")
    save_quantized(model, tok, tmp_path / "q")
    state = checkpoint.load_file(tmp_path / "q" / "model.safetensors")
    state["lm_head.qweight"] = state["lm_head.qweight"][:, :-2].copy()
    checkpoint.save_file(state, tmp_path / "q" / "model.safetensors")
    with pytest.raises(CheckpointError, match="lm_head"):
        load_quantized_folder(tmp_path / "q")
    del state["lm_head.qweight"]
    checkpoint.save_file(state, tmp_path / "q" / "model.safetensors")
    with pytest.raises(CheckpointError, match="lm_head"):
        load_quantized_folder(tmp_path / "q")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_quantized_folder(tmp_path)
    with pytest.raises(QuantError, match="no quantized layers"):
        save_quantized(tiny("gpt2"), tok, tmp_path / "plain")


def test_a_model_of_packed_layers_without_a_record_saves_too(tmp_path):
    """A model built from packed GGUF tensors (no quantize() record) describes itself."""
    tok = CharTokenizer.train(["abcdefghijklmnopqrstuvwxyz ,.!?"], vocab_size=40)
    model = tiny("llama", vocab=tok.vocab_size)
    block = model.transformer.blocks[0]
    block.mlp.up = QuantLinear.from_linear(block.mlp.up, "q4_1")
    model.tok_emb = QuantEmbedding.from_embedding(model.tok_emb, "q8_0")
    save_quantized(model, tok, tmp_path / "q")
    loaded, _ = load_quantized_folder(tmp_path / "q")
    assert loaded.quantization["tensors"] == {
        "transformer.blocks.0.mlp.up": {"format": "q4_1", "shape": [128, 64], "layer": "linear"},
        "tok_emb": {"format": "q8_0", "shape": [tok.vocab_size, 64], "layer": "embedding"}}
    ids = IDS % tok.vocab_size
    np.testing.assert_array_equal(logits(loaded, ids), logits(model, ids))


def test_nf4_with_a_bf16_embedding_is_nf4_on_the_bf16_rounded_table(tmp_path):
    """QLoRA's bfloat16 storage of what is not quantized: quantize(..., embeddings="bf16")
    keeps the tied embedding/head as bfloat16 bits; torch's float32 -> bfloat16 rounding
    of the same table, put in a float NF4 model, gives the same logits."""
    torch = pytest.importorskip("torch")
    ours = quantize(tiny("gpt2"), "nf4", embeddings="bf16")
    assert isinstance(ours.tok_emb, QuantEmbedding) and ours.tok_emb.fmt == "bf16"
    assert isinstance(ours.lm_head, QuantTiedHead) and ours.lm_head.embedding is ours.tok_emb
    assert ours.quantization["tensors"]["tok_emb"]["format"] == "bf16"
    assert ours.quantization["tensors"]["transformer.blocks.0.attn.qkv"]["format"] == "nf4"
    ref = quantize(tiny("gpt2"), "nf4")  # the float32 table
    full = logits(ref, IDS)
    table = torch.from_numpy(ref.tok_emb.weight.numpy().copy())
    ref.tok_emb.weight.data[...] = table.to(torch.bfloat16).to(torch.float32).numpy()
    assert rel(logits(ours, IDS), logits(ref, IDS)) < 1e-6
    assert 0 < rel(logits(ours, IDS), full) < 1e-2  # bf16's 8 bits of mantissa
    tok = CharTokenizer.train(["abcdefghijklmnopqrstuvwxyz ,.!?"], vocab_size=40)
    save_quantized(ours, tok, tmp_path / "q")
    loaded, _ = load_quantized_folder(tmp_path / "q")
    assert loaded.tok_emb.fmt == "bf16" and isinstance(loaded.lm_head, QuantTiedHead)
    np.testing.assert_array_equal(logits(loaded, IDS), logits(ours, IDS))


def test_loading_a_quantized_folder_reads_one_layer_at_a_time(tmp_path, monkeypatch):
    tok = CharTokenizer.train(["abcdefghijklmnopqrstuvwxyz ,.!?"], vocab_size=40)
    model = quantize(tiny("gpt2", vocab=tok.vocab_size), "nf4")  # float32 embedding
    save_quantized(model, tok, tmp_path / "q")
    reads, load_file = [], checkpoint.load_file

    def spy(path, *args, names=None, **kw):
        reads.append(names)
        return load_file(path, *args, names=names, **kw)

    monkeypatch.setattr(checkpoint, "load_file", spy)
    loaded, _ = load_quantized_folder(tmp_path / "q")
    assert reads and all(names is not None and len(names) <= 3 for names in reads)
    read = [n for names in reads for n in names]
    header = checkpoint.read_header(tmp_path / "q" / "model.safetensors")
    assert len(read) == len(set(read)) and len(set(header) - set(read)) == 1
    assert (set(header) - set(read)) < {"lm_head.weight", "tok_emb.weight"}
    assert loaded.lm_head.weight is loaded.tok_emb.weight  # the tie kept, read once
    ids = IDS % tok.vocab_size
    np.testing.assert_array_equal(logits(loaded, ids), logits(model, ids))

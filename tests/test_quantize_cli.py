"""`tinylm quantize`: a folder that loads back with the logits of quantize() in-process,
a .gguf through the GGUF exporter that gguf.GGUFReader reads, and every bad input one
`Error:` line (exit 2, nothing written)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tinylm.autograd import no_grad
from cli_helpers import one_error_line, run
from tinylm.loading import load_model
from tinylm.quant.model import load_quantized_folder, quantize
from generate_helpers import tiny_hf_gpt
from train_helpers import corpus_text


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("quantize_cli") / "gpt"
    path.mkdir()
    return tiny_hf_gpt(path, corpus_text(400))[0]


def logits(model, ids):
    with no_grad():
        return model(ids).logits.numpy()


@pytest.mark.parametrize("scheme,skip", [("q8_0", []), ("q4_1", ["lm_head"]),
                                         ("int8", ["*.mlp.*"])])
def test_a_quantized_folder_loads_with_the_in_process_logits(hf, tmp_path, scheme, skip):
    out = tmp_path / "q"
    result = run("quantize", hf, "--to", scheme.upper(), *[a for p in skip for a in
                                                          ("--skip", p)], "-o", out)
    assert result.exit_code == 0, result.output
    assert f"in {scheme}" in result.stdout
    model, tok = load_quantized_folder(out)
    ref = quantize(load_model(hf)[0], scheme, skip=skip)
    ids = np.array([tok.encode("the king")])
    np.testing.assert_array_equal(logits(model, ids), logits(ref, ids))
    assert model.quantization["skip"] == skip
    assert set(model.quantization["tensors"]) == set(ref.quantization["tensors"])


def test_a_gguf_output_goes_through_the_exporter(hf, tmp_path):
    gguf = pytest.importorskip("gguf")
    out = tmp_path / "m.gguf"
    result = run("quantize", hf, "--to", "q8_0", "-o", out)
    assert result.exit_code == 0, result.output
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert "Q8_0" in types.values()


def test_bad_input_is_one_error_line_and_writes_nothing(hf, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "file.gguf").write_text("x")
    cases = [
        (("--to", "q3", "-o", tmp_path / "a"), ["q3"]),
        (("--to", "q8_0", "-o", tmp_path / "full"), ["not empty", "--overwrite"]),
        (("--to", "q8_0", "-o", tmp_path / "file.gguf"), ["exists", "--overwrite"]),
        (("--to", "int8", "-o", tmp_path / "b.gguf"), ["GGUF has no int8"]),
        (("--to", "nf4", "-o", tmp_path / "b.gguf"), ["GGUF has no nf4"]),
        (("--to", "q4_0", "--skip", "lm_head", "-o", tmp_path / "b.gguf"), ["--skip"]),
        (("--to", "q4_0", "-o", tmp_path / "no" / "b.gguf"), ["does not exist"]),
        (("--to", "q8_0", "-o", tmp_path / "full" / "x"), ["not a folder"]),
        (("--to", "nf4", "--skip", "*.down", "-o", tmp_path / "c"), ["no layer"]),  # 32 < 64
        (("--to", "q8_0", "--skip", "*", "-o", tmp_path / "c"), ["no layer"]),
    ]
    for args, fragments in cases:
        one_error_line(run("quantize", hf, *args), *fragments)
    one_error_line(run("quantize", tmp_path / "missing", "--to", "q8_0", "-o", tmp_path / "d"),
                   "missing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.gguf", "full"]
    assert (tmp_path / "file.gguf").read_text() == "x"


def test_overwrite_replaces_an_output(hf, tmp_path):
    out = tmp_path / "q"
    assert run("quantize", hf, "--to", "q8_0", "-o", out).exit_code == 0
    assert run("quantize", hf, "--to", "q4_0", "-o", out, "--overwrite").exit_code == 0
    assert load_quantized_folder(out)[0].quantization["scheme"] == "q4_0"


def test_a_model_that_is_not_a_decoder_cannot_become_gguf(tmp_path):
    from tinylm.commands.quantize import export_to_gguf
    from tinylm.errors import TinyLMError
    from tinylm.models import build_model
    from tinylm.models.config import BertConfig

    bert = build_model(BertConfig(vocab_size=50, d_model=32, n_layer=1, n_head=2, d_ff=64,
                                  max_positions=16))
    with pytest.raises(TinyLMError, match="decoder-only"):
        export_to_gguf(bert, None, str(tmp_path / "b.gguf"), "q8_0")


def greedy(model, ids, n):
    """n tokens picked by argmax over full recomputes: the oracle of `generate -t 0`."""
    ids = list(ids)
    for _ in range(n):
        ids.append(int(logits(model, np.array([ids]))[0, -1].argmax()))
    return ids


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_embeddings_bf16_writes_a_bf16_table_that_loads_as_bf16(hf, tmp_path, scheme):
    from tinylm import checkpoint
    from tinylm.quant.layers import QuantEmbedding, QuantTiedHead

    out = tmp_path / "q"
    result = run("quantize", hf, "--to", scheme, "--embeddings", "bf16", "-o", out)
    assert result.exit_code == 0, result.output
    assert "1 in bf16" in result.stdout
    ref = quantize(load_model(hf)[0], scheme, embeddings="bf16")
    vocab, dim = ref.tok_emb.weight_shape
    header = checkpoint.read_header(out / "model.safetensors")
    assert header["tok_emb.qweight"] == {"dtype": "BF16", "shape": [vocab, dim]}
    assert not any(k.startswith(("tok_emb.", "lm_head.")) for k in header
                   if k != "tok_emb.qweight")  # the tied head: no second copy
    # the file's bits are the in-memory quantize()'s, exactly
    bits = checkpoint.load_file(out / "model.safetensors", bf16="raw",
                                names=["tok_emb.qweight"])["tok_emb.qweight"]
    np.testing.assert_array_equal(bits.view(np.uint8), ref.tok_emb.qweight)
    for model in (load_quantized_folder(out)[0], load_model(out)[0]):  # generate's loader
        assert isinstance(model.tok_emb, QuantEmbedding) and model.tok_emb.fmt == "bf16"
        assert isinstance(model.lm_head, QuantTiedHead) and model.lm_head.embedding is model.tok_emb
        table = model.tok_emb.qweight  # bf16 bits in memory, not a float32 table
        assert table.dtype == np.uint8 and table.nbytes == vocab * dim * 2
        assert not any(p.shape == (vocab, dim) for p in model.parameters())
        assert model.quantization["tensors"]["tok_emb"]["format"] == "bf16"
        tok = load_model(hf)[1]
        ids = np.array([tok.encode("the king and the queen")])
        np.testing.assert_array_equal(logits(model, ids), logits(ref, ids))
    tok = load_model(hf)[1]
    prompt = tok.encode("the king")
    gen = run("generate", "--model", out, "-p", "the king", "-n", 4, "-t", 0, "--json")
    assert gen.exit_code == 0, gen.output
    got = [t["id"] for t in json.loads(gen.stdout)["tokens"]]
    assert got == greedy(ref, prompt, 4)[len(prompt):]
    info = run("info", out)
    assert info.exit_code == 0, info.output
    assert "quantized to " + scheme in info.output


def test_embeddings_float32_is_the_default_float32_table(hf, tmp_path):
    from tinylm import checkpoint, nn

    for args, name in [((), "default"), (("--embeddings", "FLOAT32"), "float32")]:
        out = tmp_path / name
        assert run("quantize", hf, "--to", "nf4", *args, "-o", out).exit_code == 0
        header = checkpoint.read_header(out / "model.safetensors")
        assert header["tok_emb.weight"]["dtype"] == "F32" and "tok_emb.qweight" not in header
        model = load_quantized_folder(out)[0]
        assert type(model.tok_emb) is nn.Embedding
        assert "tok_emb" not in model.quantization["tensors"]


def test_embeddings_is_refused_where_the_scheme_quantizes_the_embedding(hf, tmp_path):
    for scheme in ("q8_0", "q4_0", "q4_1"):
        for value in ("bf16", "float32"):
            one_error_line(run("quantize", hf, "--to", scheme, "--embeddings", value,
                               "-o", tmp_path / "a"), "int8 and nf4", scheme, "--skip")
    one_error_line(run("quantize", hf, "--to", "q4_0", "--embeddings", "bf16", "-o",
                       tmp_path / "a.gguf"), "int8 and nf4")
    one_error_line(run("quantize", hf, "--to", "nf4", "--embeddings", "f8", "-o",
                       tmp_path / "a"), "--embeddings", "f8")
    assert list(tmp_path.iterdir()) == []


def test_help_documents_embeddings():
    result = run("quantize", "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "--embeddings [float32|bf16]" in text
    assert "bf16" in text and "Refused for q8_0, q4_0 and q4_1" in text


def test_a_folder_with_the_bf16_table_as_u8_bytes_still_loads(hf, tmp_path):
    """Folders written before the table was typed BF16 hold its bytes as U8; a typed
    table whose dtype is not its layer's format is a CheckpointError."""
    from tinylm import checkpoint
    from tinylm.errors import CheckpointError

    out = tmp_path / "q"
    assert run("quantize", hf, "--to", "nf4", "--embeddings", "bf16", "-o", out).exit_code == 0
    file = out / "model.safetensors"
    state = checkpoint.load_file(file, bf16="raw")
    bits = state["tok_emb.qweight"]
    model, tok = load_quantized_folder(out)
    ids = np.array([tok.encode("the king")])
    want = logits(model, ids)
    state["tok_emb.qweight"] = bits.view(np.uint8)
    checkpoint.save_file(state, file)
    assert checkpoint.read_header(file)["tok_emb.qweight"]["dtype"] == "U8"
    np.testing.assert_array_equal(logits(load_quantized_folder(out)[0], ids), want)
    state["tok_emb.qweight"] = bits.view(np.float16)
    checkpoint.save_file(state, file)
    with pytest.raises(CheckpointError, match="tok_emb"):
        load_quantized_folder(out)

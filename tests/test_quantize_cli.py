"""`tinylm quantize`: a folder that loads back with the logits of quantize() in-process,
a .gguf through the GGUF exporter that gguf.GGUFReader reads, and every bad input one
`Error:` line (exit 2, nothing written)."""

from __future__ import annotations

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

"""tinylm.loading: one loader for run folders and Hugging Face folders."""

import json

import numpy as np
import pytest

import tinylm
from tinylm.errors import CheckpointError
from tinylm.loading import load_model, load_pretrained
from tinylm.models import Decoder, GPT2Config
from tinylm.tokenizers.bpe import BPETokenizer
from tinylm.train import Trainer
from train_helpers import corpus_text, tiny_config, write_corpus


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loading")
    corpus = write_corpus(tmp / "corpus.txt")
    cfg = tiny_config(tmp, corpus, max_steps=2, model={"n_layer": 1, "n_head": 2,
                                                     "d_model": 16, "dropout": 0.1})
    Trainer(cfg).fit()
    return tmp / "run"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    tok = BPETokenizer.train([corpus_text(500)], 280, special_tokens=["<|endoftext|>"])
    tinylm.seed(0)
    Decoder(GPT2Config(vocab_size=len(tok), d_model=16, n_layer=1, n_head=2,
                       max_positions=32)).save_pretrained(path)
    tok.save(path / "tokenizer.json")
    return path


def test_a_run_folder_loads_with_its_tokenizer(run_dir):
    model, tok = load_model(run_dir)
    assert model.config.vocab_size == tok.vocab_size and not model.training
    assert tok.decode(tok.encode("the cat")) == "the cat"
    alone = tinylm.load_pretrained(run_dir)  # the package-level name reads runs too
    for (name, a), (_, b) in zip(model.named_parameters(), alone.named_parameters()):
        assert np.array_equal(a.data, b.data), name


def test_a_hugging_face_folder_loads_with_its_tokenizer(hf_dir):
    model, tok = load_model(hf_dir, "cpu")
    assert type(tok).__name__ == "BPETokenizer" and not model.training
    assert model.config.vocab_size == len(tok)
    same = load_pretrained(hf_dir)
    assert np.array_equal(same.tok_emb.weight.data, model.tok_emb.weight.data)


@pytest.mark.parametrize("make, message", [
    (lambda p: p, r"is not a directory \(it does not exist\)"),
    (lambda p: (p.write_text("x"), p)[1], "is not a directory"),
    (lambda p: (p.write_bytes(b"GGUF"), p)[1], "is a GGUF file"),
    (lambda p: (p.mkdir(), p)[1], "has no config.json"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text("{}"), p)[2],
     "names neither an 'architecture'"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text("{oops"), p)[2], "cannot read"),
], ids=["missing", "file", "gguf", "empty", "neither", "bad-json"])
def test_every_wrong_path_is_a_checkpoint_error(tmp_path, make, message):
    path = make(tmp_path / "m.gguf" if message.startswith("is a GGUF") else tmp_path / "m")
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


def test_a_hugging_face_folder_without_a_tokenizer(tmp_path, hf_dir):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((hf_dir / name).read_bytes())
    with pytest.raises(CheckpointError, match="has a config.json but no tokenizer"):
        load_model(tmp_path)
    assert load_pretrained(tmp_path).config.vocab_size > 0  # the model alone loads


def test_a_run_folder_missing_its_weights(tmp_path, run_dir):
    for name in ("config.json", "tokenizer.txt"):
        (tmp_path / name).write_bytes((run_dir / name).read_bytes())
    assert "architecture" in json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        load_model(tmp_path)


@pytest.mark.filterwarnings("ignore:quantize:UserWarning")  # 16-wide layers stay float
@pytest.mark.parametrize("source", ["gguf", "quantized folder"])
def test_quantized_sources_load_packed_unless_dequantized(tmp_path, hf_dir, source):
    from tinylm.formats.gguf_model import export_gguf
    from tinylm.nn import Linear
    from tinylm.quant.layers import QuantLinear
    from tinylm.quant.model import quantize, save_quantized

    model, tokenizer = load_model(hf_dir)
    ids = np.array([[5, 9, 2, 7, 1, 3]])
    if source == "gguf":
        path = tmp_path / "m.gguf"
        export_gguf(model, tokenizer, path, dtype="q8_0")
    else:
        path = tmp_path / "q8"
        save_quantized(quantize(model, "q8_0"), tokenizer, path)
    packed, _ = load_model(path)
    floats, _ = load_model(path, dequantize=True)
    kinds = lambda m: {type(x) for x in m.modules()}  # noqa: E731
    assert QuantLinear in kinds(packed) and QuantLinear not in kinds(floats)
    assert Linear in kinds(floats)
    with tinylm.no_grad():
        a, b = packed(ids).logits.data, floats(ids).logits.data
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()
    assert isinstance(load_pretrained(path), type(packed))

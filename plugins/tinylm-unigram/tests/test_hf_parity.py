"""Ids identical to `tokenizers`' Unigram on the same tokenizer.json, and the
tokenizer.json files tinylm writes."""

import json

import pytest

from conftest import TRICKY, head_lines, multilingual_lines

tokenizers = pytest.importorskip("tokenizers")
spm = pytest.importorskip("sentencepiece")
from tinylm import plugins  # noqa: E402
from tinylm.tokenizers import TokenizerFileError, from_file  # noqa: E402

import tinylm_unigram  # noqa: E402
from tinylm_unigram import UnigramTokenizer  # noqa: E402

TEXTS = head_lines()[-300:] + multilingual_lines(80, seed=5) + TRICKY + [
    "A\u0300\u0301 ½\u0301 \r\n x", "a\u0308\u0301b ae\u0301", "Citizen<sep>x"]


def hf_ids(path, texts):
    """`tokenizers` ids (its added tokens split out, as tinylm does with
    allowed_special="all")."""
    tok = tokenizers.Tokenizer.from_file(str(path))
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spm")
    corpus = folder / "train.txt"
    corpus.write_text("\n".join(head_lines()[:-300] + multilingual_lines(300)), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "m"),
                                   vocab_size=900, model_type="unigram", num_threads=1,
                                   minloglevel=2, byte_fallback=True)
    return folder / "m.model"


def t5_style(obj: dict) -> dict:
    """The layout of the T5 checkpoints' tokenizer.json (t5-small): the charsmap alone
    as normalizer, WhitespaceSplit then Metaspace with the older add_prefix_space."""
    out = dict(obj)
    out["normalizer"] = {"type": "Precompiled", "precompiled_charsmap":
                         obj["normalizer"]["normalizers"][0]["precompiled_charsmap"]}
    out["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "WhitespaceSplit"},
        {"type": "Metaspace", "replacement": "\u2581", "add_prefix_space": True}]}
    return out


@pytest.mark.parametrize("layout", ["converter", "t5"])
def test_ids_equal_tokenizers_on_a_converted_model(spm_model, tmp_path, layout):
    path = tmp_path / "tokenizer.json"
    UnigramTokenizer.from_spm(spm_model).save(path, format="hf")
    if layout == "t5":
        path.write_text(json.dumps(t5_style(json.loads(path.read_text("utf-8"))),
                                   ensure_ascii=False), encoding="utf-8")
    tok = UnigramTokenizer.from_hf_json(path)
    assert tok.flavour == "hf"
    assert [tok.encode(t, allowed_special="all") for t in TEXTS] == hf_ids(path, TEXTS)


def test_ids_equal_tokenizers_on_a_model_tokenizers_trained(tmp_path):
    """A tokenizer.json written by `tokenizers` itself (its UnigramTrainer, NFKC,
    Metaspace), read by tinylm; then tinylm's own save read back by `tokenizers`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    hf = Tokenizer(models.Unigram())
    hf.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=600, unk_token="<unk>",
                                      special_tokens=["<pad>", "<unk>", "</s>"])
    hf.train_from_iterator(head_lines()[:-300] + multilingual_lines(200), trainer=trainer)
    path = tmp_path / "trained.json"
    hf.save(str(path))
    tok = UnigramTokenizer.from_hf_json(path)
    expected = [e.ids for e in hf.encode_batch(TEXTS, add_special_tokens=False)]
    assert [tok.encode(t, allowed_special="all") for t in TEXTS] == expected
    again = tmp_path / "again.json"
    tok.save(again, format="hf")
    assert hf_ids(again, TEXTS) == expected
    assert tok.special_tokens == {"<pad>": 0, "<unk>": 1, "</s>": 2}


def test_from_file_reads_unigram_tokenizer_json_through_the_plugin(spm_model, tmp_path):
    path = tmp_path / "tokenizer.json"
    UnigramTokenizer.from_spm(spm_model).save(path, format="hf")
    with pytest.raises(TokenizerFileError, match="Unigram"):
        from_file(path)  # the plugin is not loaded: a clear error
    plugins.register_plugin(tinylm_unigram)
    tok = from_file(path)
    assert isinstance(tok, UnigramTokenizer)
    assert [tok.encode(t, allowed_special="all") for t in TEXTS[:50]] == hf_ids(path, TEXTS[:50])


def test_unsupported_pipeline_is_a_clear_error(spm_model, tmp_path):
    path = tmp_path / "tokenizer.json"
    UnigramTokenizer.from_spm(spm_model).save(path, format="hf")
    obj = json.loads(path.read_text("utf-8"))
    obj["pre_tokenizer"] = {"type": "Digits", "individual_digits": True}
    path.write_text(json.dumps(obj), encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="'Digits' pre-tokenizer"):
        UnigramTokenizer.from_hf_json(path)

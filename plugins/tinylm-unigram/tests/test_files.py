"""Files: the hand-made protobuf reader/writer, the charsmap trie, tinylm's format,
registration, and broken files as one clear error."""

import pytest
from click.testing import CliRunner
from hypothesis import given, strategies as st

from conftest import head_lines

from tinylm import plugins
from tinylm.tokenizers import TokenizerFileError, from_file

import tinylm_unigram
from tinylm_unigram import UnigramTokenizer, charsmap, protobuf, spm_model

spm = pytest.importorskip("sentencepiece")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("m")
    corpus = folder / "train.txt"
    corpus.write_text("\n".join(head_lines()), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "m"),
                                   vocab_size=500, model_type="unigram", num_threads=1,
                                   minloglevel=2, user_defined_symbols=["<sep>"],
                                   control_symbols=["<ctl>"], byte_fallback=True)
    return folder / "m.model"


def test_model_proto_fields_match_sentencepiece(model_path):
    model = spm_model.decode_model(model_path.read_bytes())
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    assert model.pieces == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert model.scores == [sp.get_score(i) for i in range(sp.get_piece_size())]
    kinds = [spm_model.UNKNOWN if sp.is_unknown(i) else spm_model.CONTROL if sp.is_control(i)
             else spm_model.BYTE if sp.is_byte(i) else spm_model.USER_DEFINED
             if model.pieces[i] == "<sep>" else spm_model.NORMAL for i in range(len(model.pieces))]
    assert model.types == kinds
    assert model.byte_fallback and model.normalizer_name == "nmt_nfkc"
    assert model.add_dummy_prefix and model.remove_extra_whitespaces and model.escape_whitespaces


def test_model_proto_round_trip_is_read_by_sentencepiece(model_path, tmp_path):
    model = spm_model.decode_model(model_path.read_bytes())
    again = tmp_path / "again.model"
    again.write_bytes(spm_model.encode_model(model))
    assert spm_model.decode_model(again.read_bytes()) == model
    sp, sp2 = (spm.SentencePieceProcessor(model_file=str(p)) for p in (model_path, again))
    texts = head_lines()[:50]
    assert sp2.encode(texts) == sp.encode(texts)


def test_varints():
    for v in (0, 1, 127, 128, 300, 2**31 - 1, 2**62, -1, -2**31):
        data = protobuf.varint(v)
        got, end = protobuf.read_varint(data, 0)
        assert end == len(data) and protobuf.as_int32(got) == v
    with pytest.raises(protobuf.WireError):
        protobuf.parse(b"\x0a\x05ab")


KEYS = st.text(st.characters(min_codepoint=1, max_codepoint=0x2FFFF,
                             blacklist_categories=("Cs",)), min_size=1, max_size=3)


@given(st.dictionaries(KEYS, st.text(max_size=4).filter(lambda v: "\0" not in v), max_size=40))
def test_charsmap_round_trip(rules):
    blob = charsmap.encode(rules)
    assert charsmap.decode(blob) == rules
    cm = charsmap.Charsmap(blob)
    assert cm.singles == {ord(k): v for k, v in rules.items() if len(k) == 1}
    for key, value in rules.items():
        assert (len(key.encode()), value) in list(cm.prefix_matches(key.encode()))


def test_sentencepiece_charsmap_is_read_whole(model_path):
    blob = spm_model.decode_model(model_path.read_bytes()).precompiled_charsmap
    cm = charsmap.Charsmap(blob)
    assert cm.singles[ord("Ａ")] == "A" and cm.singles[ord("\t")] == " "
    assert ("\u0301" in cm.continuations) and ("A" in cm.firsts)
    assert list(cm.prefix_matches("A\u0300".encode())) == [(3, "À")]


def test_tinylm_format_round_trip(model_path, tmp_path):
    tok = UnigramTokenizer.from_spm(model_path)
    hf_path = tmp_path / "tokenizer.json"
    tok.save(hf_path, format="hf")
    for source in (tok, UnigramTokenizer.from_hf_json(hf_path)):
        path = tmp_path / "tok.txt"
        source.save(path)
        assert path.read_text("utf-8").startswith("tinylm-tokenizer unigram 1\n")
        again = UnigramTokenizer.load(path)
        texts = head_lines()[:80] + ["Citizen<sep>ün"]
        assert [again.encode(t) for t in texts] == [source.encode(t) for t in texts]
        assert again.pieces == source.pieces and again.scores == source.scores


def test_registered_plugin_loads_its_files_through_from_file(model_path, tmp_path):
    plugins.register_plugin(tinylm_unigram)
    assert plugins.get_tokenizer_class("unigram") is UnigramTokenizer
    tok = UnigramTokenizer.from_spm(model_path)
    path = tmp_path / "tok.txt"
    tok.save(path)
    assert isinstance(from_file(path), UnigramTokenizer)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "bpe"])
def test_broken_model_files_are_one_clear_error(model_path, tmp_path, damage):
    path = tmp_path / "bad.model"
    data = model_path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 3])
    elif damage == "garbage":
        path.write_bytes(b"\x0a\xff\xff\xff\xff\x0f nonsense")
    else:
        model = spm_model.decode_model(data)
        model.model_type = 2
        path.write_bytes(spm_model.encode_model(model))
    with pytest.raises(TokenizerFileError, match="bad.model"):
        UnigramTokenizer.from_spm(path)


def test_tokenize_train_command_trains_a_unigram_tokenizer(tmp_path, monkeypatch):
    from tinylm.cli import cli

    monkeypatch.setenv(plugins.ALLOW_ENV, "unigram")
    plugins.reset()
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(head_lines()[:400]), encoding="utf-8")
    out = tmp_path / "tok.txt"
    result = CliRunner().invoke(cli, ["tokenize", "train", "--type", "unigram", "--vocab-size",
                                      "300", "--no-progress", "-o", str(out), str(corpus)])
    assert result.exit_code == 0, result.output
    tok = from_file(out)
    assert isinstance(tok, UnigramTokenizer) and tok.vocab_size == 300

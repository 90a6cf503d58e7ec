"""Round-trip properties (Hypothesis), subword regularisation, and a T5 checkpoint
loading with its real (Unigram) tokenizer."""

import json

import numpy as np
import pytest
from hypothesis import given, strategies as st

from conftest import head_lines, multilingual_lines

from tinylm import plugins

import tinylm_unigram
from tinylm_unigram import UnigramTokenizer
from tinylm_unigram.spm_model import BYTE


@pytest.fixture(scope="module")
def toks():
    lines = head_lines()[:800] + multilingual_lines(200)
    plain = UnigramTokenizer.train(lines, 600)
    raw = UnigramTokenizer.train(lines, 700, byte_fallback=True,
                                 options={"normalization": "identity"})
    return plain, raw


# any text but lone surrogates (not UTF-8) and the meta symbol itself
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"),
               max_size=40)


@given(TEXT)
def test_byte_fallback_round_trips_any_text_up_to_whitespace(toks, text):
    """Identity rules + byte fallback: nothing is lost but runs of spaces."""
    _, tok = toks
    ids = tok.encode(text, disallowed_special=())
    assert tok.unk_id not in ids
    assert tok.decode(ids) == " ".join(p for p in text.split(" ") if p)


@given(TEXT)
def test_pieces_spell_the_normalized_text(toks, text):
    tok, _ = toks
    normalized = tok.normalizer.normalize(text)
    ids = tok.encode(text, disallowed_special=())
    assert "".join(tok.encode_pieces(text)) == normalized
    surfaces = [tok.pieces[i] if tok.types[i] != BYTE else "" for i in ids]
    if tok.unk_id not in ids:
        assert "".join(surfaces) == normalized
        assert tok.decode(ids) == normalized[1:].replace("\u2581", " ")


@given(st.lists(st.sampled_from(head_lines()[:200]), min_size=1, max_size=4))
def test_encoding_is_the_best_segmentation(toks, lines):
    """No other segmentation scores higher: a sampled one never beats Viterbi."""
    tok, _ = toks
    text = " ".join(lines)
    best = tok.encode(text, disallowed_special=())
    score = lambda ids: sum(np.float32(tok.scores[i]) for i in ids)  # noqa: E731
    for seed in range(3):
        sampled = tok.sample_encode(text, alpha=0.5, seed=seed)
        assert tok.decode(sampled) == tok.decode(best)
        assert score(sampled) <= score(best) + 1e-3


def test_sampling_follows_the_scores(toks):
    """With alpha -> large, sampling concentrates on the Viterbi path; with alpha small
    it spreads."""
    tok, _ = toks
    text = "Before we proceed any further, hear me speak."
    best = tok.encode(text)
    sharp = {tuple(tok.sample_encode(text, alpha=50.0, seed=s)) for s in range(20)}
    flat = {tuple(tok.sample_encode(text, alpha=0.05, seed=s)) for s in range(20)}
    assert sharp == {tuple(best)}
    assert len(flat) > 10


def test_t5_checkpoint_loads_with_its_unigram_tokenizer(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    tokenizers = pytest.importorskip("tokenizers")
    import tinylm
    from tinylm.loading import load_model
    from tinylm.models import build_model
    from tinylm.models.config import T5Config

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(head_lines()), encoding="utf-8")
    # T5's spiece.model layout: <pad> 0, </s> 1, <unk> 2, no <s>
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "spiece"),
                                   vocab_size=400, model_type="unigram", num_threads=1,
                                   minloglevel=2, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    tok = UnigramTokenizer.from_spm(tmp_path / "spiece.model")
    folder = tmp_path / "t5"
    model = build_model(T5Config(vocab_size=tok.vocab_size, d_model=16, n_layer=1, n_head=2,
                                 head_dim=8, d_ff=32))
    tinylm.save_pretrained(model, folder)
    obj = tok.to_hf_dict()
    obj["post_processor"] = {"type": "TemplateProcessing",
                             "single": [{"Sequence": {"id": "A", "type_id": 0}},
                                        {"SpecialToken": {"id": "</s>", "type_id": 0}}],
                             "pair": [], "special_tokens": {"</s>": {"id": "</s>", "ids": [1],
                                                                     "tokens": ["</s>"]}}}
    (folder / "tokenizer.json").write_text(json.dumps(obj, ensure_ascii=False), "utf-8")
    plugins.register_plugin(tinylm_unigram)
    loaded, tokenizer = load_model(folder)
    assert isinstance(tokenizer, UnigramTokenizer)
    assert tokenizer.token_to_id("</s>") == loaded.config.eos_token_id == 1
    hf = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    texts = head_lines()[-100:]
    assert [tokenizer.encode(t) for t in texts] == [
        e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]


def test_spiece_model_folder_and_from_file(tmp_path):
    """A Hugging Face folder with only spiece.model (older T5/ALBERT uploads), and
    from_file on a .model, once the plugin is loaded."""
    spm = pytest.importorskip("sentencepiece")
    from tinylm.loading import hf_tokenizer
    from tinylm.tokenizers import from_file

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(head_lines()), encoding="utf-8")
    folder = tmp_path / "t5"
    folder.mkdir()
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "spiece"),
                                   vocab_size=300, model_type="unigram", num_threads=1,
                                   minloglevel=2)
    (tmp_path / "blank.txt").write_text("\n" * 40 + "[UNK]\n", encoding="utf-8")
    plugins.register_plugin(tinylm_unigram)
    assert not UnigramTokenizer.sniff_file(tmp_path / "blank.txt")
    tok = hf_tokenizer(str(folder))
    sp = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    texts = head_lines()[-50:]
    assert isinstance(tok, UnigramTokenizer)
    assert [tok.encode(t) for t in texts] == sp.encode(texts)
    assert isinstance(from_file(folder / "spiece.model"), UnigramTokenizer)


LINE_CHARS = st.sampled_from(list("ab Zé \t\u3000\u00a0½¨\u0301\u0300A가ㄱㅏﾊﾟ日ж,.\u2581\u200b") +
                             ["<sep>", "Citizen", "  ", "\ue000"])


@pytest.mark.parametrize("rule, options", [("nmt_nfkc", {}), ("nmt_nfkc", {"user_defined": ["<sep>"]}),
                                           ("identity", {"add_dummy_prefix": False}),
                                           ("nfkc", {"remove_extra_whitespaces": False})])
@given(lines=st.lists(st.lists(LINE_CHARS, max_size=12).map("".join), max_size=12))
def test_training_normalises_lines_as_one_string_as_one_by_one(rule, options, lines):
    """The trainer normalises its corpus in one pass (``normalize_lines``); it must
    equal the per-line normaliser that encoding uses (and that the sentencepiece
    parity tests check)."""
    from tinylm_unigram import charsmap, rules
    from tinylm_unigram.normalize import SpmNormalizer

    normalizer = SpmNormalizer(charsmap.cached(rules.charsmap_blob(rule)), **options)
    assert normalizer.normalize_lines(lines) == [normalizer.normalize(t) for t in lines]

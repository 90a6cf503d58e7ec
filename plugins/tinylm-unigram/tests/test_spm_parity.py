"""Ids identical to the `sentencepiece` package (the oracle) on models it trains."""

import pytest
from hypothesis import given, strategies as st

from conftest import (TRICKY, generated_text, head_lines, multilingual_generated,
                      multilingual_lines)

spm = pytest.importorskip("sentencepiece")
from tinylm_unigram import UnigramTokenizer  # noqa: E402

MODELS = {
    "head-1000": (head_lines, 1000, {}),
    "generated-8000": (lambda: generated_text(9000), 8000, {}),
    "multilingual-1000": (lambda: multilingual_lines() + multilingual_generated(3000), 1000, {}),
    "multilingual-8000": (lambda: multilingual_generated(12000, seed=1), 8000, {}),
    "bytes-user-defined": (head_lines, 700, {"byte_fallback": True, "control_symbols": ["<ctl>"],
                                            "user_defined_symbols": ["<sep>", "Citizen"]}),
    "identity-no-prefix": (head_lines, 800, {"normalization_rule_name": "identity",
                                             "add_dummy_prefix": False,
                                             "remove_extra_whitespaces": False}),
}


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request, tmp_path_factory):
    make, size, options = MODELS[request.param]
    lines = make()
    folder = tmp_path_factory.mktemp(request.param)
    corpus = folder / "train.txt"
    corpus.write_text("\n".join(lines[: int(len(lines) * 0.9)]), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "m"),
                                   vocab_size=size, model_type="unigram", num_threads=1,
                                   minloglevel=2, **options)
    path = folder / "m.model"
    held = lines[int(len(lines) * 0.9):]
    return UnigramTokenizer.from_spm(path), spm.SentencePieceProcessor(model_file=str(path)), held


def test_ids_equal_sentencepiece_line_by_line(pair):
    tok, sp, held = pair
    texts = held[:600] + multilingual_lines(60, seed=3) + TRICKY
    mine = [tok.encode(t, disallowed_special=()) for t in texts]
    assert mine == sp.encode(texts)
    assert [tok.encode_pieces(t) for t in texts] == sp.encode(texts, out_type=str)


def test_ids_equal_sentencepiece_on_long_texts(pair):
    """One lattice over thousands of characters: float32 ties must fall the same way."""
    tok, sp, held = pair
    for text in (" ".join(held[:400]), "\n".join(held[:300]), "".join(TRICKY) * 3):
        assert tok.encode(text, disallowed_special=()) == sp.encode(text)


def test_decode_equals_sentencepiece(pair):
    tok, sp, held = pair
    control = {i for i in range(sp.get_piece_size()) if sp.is_control(i)}
    for ids in sp.encode(held[:200] + TRICKY):
        ids = [i for i in ids if i not in control]  # tinylm prints control pieces
        assert tok.decode(ids) == sp.decode(ids)


def test_vocabulary_equals_sentencepiece(pair):
    tok, sp, _ = pair
    assert tok.vocab_size == sp.get_piece_size()
    for i in range(0, sp.get_piece_size(), 7):
        assert tok.id_to_token(i) == sp.id_to_piece(i)
        assert tok.token_to_id(sp.id_to_piece(i)) == i
    assert tok.unk_id == sp.unk_id()


ALPHABET = st.sampled_from(list("ab Zé ▁\t\n\u3000\u00a0½¨\u0301\u0300A가ㄱㅏﾊﾟ日ж,.") +
                           ["<sep>", "Citizen", "<s>", "  "])


@given(st.lists(ALPHABET, max_size=14).map("".join))
def test_normalisation_and_ids_on_random_text(pair, text):
    tok, sp, _ = pair
    assert tok.normalizer.normalize(text) == sp.normalize(text)
    assert tok.encode(text, disallowed_special=()) == sp.encode(text)


# ---------------------------------------------------------------- encode_batch

def _batched_everywhere(fn, cells=None):
    """Run ``fn`` with every bucket batched (no per-line fallback), and optionally
    small buckets (so that lines of very different lengths land in several)."""
    from tinylm_unigram import lattice

    saved = lattice.MIN_EDGES_PER_STEP, lattice.BUCKET_CELLS
    lattice.MIN_EDGES_PER_STEP = 0
    if cells is not None:
        lattice.BUCKET_CELLS = cells
    try:
        return fn()
    finally:
        lattice.MIN_EDGES_PER_STEP, lattice.BUCKET_CELLS = saved


def test_encode_batch_equals_sentencepiece(pair):
    tok, sp, held = pair
    texts = held[:600] + multilingual_lines(60, seed=3) + TRICKY + ["", "\n", "ab\ncd"]
    expected = sp.encode(texts)
    assert tok.encode_batch(texts, disallowed_special=()) == expected
    assert _batched_everywhere(lambda: tok.encode_batch(texts, disallowed_special=()),
                               cells=5000) == expected


LINE = st.one_of(st.lists(ALPHABET, max_size=14).map("".join),
                 st.tuples(st.lists(ALPHABET, min_size=1, max_size=8).map("".join),
                           st.integers(1, 60)).map(lambda t: t[0] * t[1]))


@given(st.lists(LINE, max_size=24), st.sampled_from([None, 64, 600]))
def test_encode_batch_on_random_lines(pair, texts, cells):
    """Random lines (unknown characters, empty lines, lengths from 0 to hundreds) in
    one batch: the ids of encoding each line alone, and of sentencepiece."""
    tok, sp, _ = pair
    expected = sp.encode(texts)
    assert [tok.encode(t, disallowed_special=()) for t in texts] == expected
    assert tok.encode_batch(texts, disallowed_special=()) == expected
    assert _batched_everywhere(lambda: tok.encode_batch(texts, disallowed_special=()),
                               cells=cells) == expected

"""The trainer: as good as SentencePiece's at the same size, and its models are
SentencePiece models (sentencepiece reads them and gives the same ids)."""

import math
from itertools import product

import numpy as np
import pytest

from conftest import TRICKY, head_lines, multilingual_generated, multilingual_lines

from tinylm.tokenizers import TokenizerError
from tinylm_unigram import UnigramTokenizer
from tinylm_unigram.seeds import END, seed_pieces
from tinylm_unigram.trainer import digamma

spm = pytest.importorskip("sentencepiece")


@pytest.fixture(scope="module")
def split():
    lines = head_lines()
    cut = int(len(lines) * 0.8)
    return lines[:cut], lines[cut:]


@pytest.fixture(scope="module")
def trained(split):
    return UnigramTokenizer.train(split[0], 1000)


@pytest.mark.parametrize("corpus", ["tinyshakespeare-head", "multilingual"])
def test_encoded_length_within_one_percent_of_sentencepiece(split, trained, tmp_path, corpus):
    """Measured: head 3908 vs 3920 tokens; multilingual 13382 vs 13382."""
    if corpus == "multilingual":
        lines = multilingual_lines() + multilingual_generated(3000)
        cut = int(len(lines) * 0.9)
        train, held = lines[:cut], lines[cut:]
        trained = UnigramTokenizer.train(train, 1000)
    else:
        train, held = split
    corpus = tmp_path / "train.txt"
    corpus.write_text("\n".join(train), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "ref"),
                                   vocab_size=1000, model_type="unigram", num_threads=1,
                                   minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "ref.model"))
    ours = sum(len(trained.encode(t, disallowed_special=())) for t in held)
    theirs = sum(len(ids) for ids in sp.encode(held))
    assert trained.vocab_size == sp.get_piece_size() == 1000
    assert abs(ours / theirs - 1) <= 0.01, (ours, theirs)


def test_trained_model_is_a_sentencepiece_model(split, trained, tmp_path):
    path = tmp_path / "ours.model"
    trained.save(path, format="spm")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    texts = split[1][:300] + multilingual_lines(40) + TRICKY
    assert [trained.encode(t, disallowed_special=()) for t in texts] == sp.encode(texts)
    assert [sp.id_to_piece(i) for i in range(sp.get_piece_size())] == trained.pieces
    again = UnigramTokenizer.from_spm(path)
    assert [again.encode(t, disallowed_special=()) for t in texts] == sp.encode(texts)


def test_meta_pieces_user_defined_symbols_and_byte_fallback():
    lines = multilingual_lines(300)
    tok = UnigramTokenizer.train(lines, 550, special_tokens=["<pad>"], byte_fallback=True,
                                 user_defined_symbols=["<sep>"], character_coverage=0.98)
    assert tok.pieces[:5] == ["<unk>", "<s>", "</s>", "<pad>", "<sep>"]
    assert tok.pieces[5:261] == [f"<0x{b:02X}>" for b in range(256)]
    assert tok.vocab_size == 550
    ids = tok.encode("fox<sep>fox")
    assert ids.count(4) == 1
    text = "never seen: \u16a0\u16a1 \U0001f600"
    ids = tok.encode(text)
    assert tok.unk_id not in ids and tok.decode(ids) == text  # bytes, not <unk>
    assert tok.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}


def test_options_are_checked():
    with pytest.raises(TokenizerError, match="too small"):
        UnigramTokenizer.train(["abcdefghij klmnop"], 10)
    with pytest.raises(TokenizerError, match="unknown Unigram training option"):
        UnigramTokenizer.train(["abc"], 100, options={"shrinking": 0.5})
    with pytest.raises(TokenizerError, match="no text"):
        UnigramTokenizer.train(["", "   "], 100)


def test_digamma_is_sentencepieces():
    x = np.array([0.5, 1.0, 2.5, 7.0, 30.0, 1e4])
    euler = 0.5772156649015329
    assert abs(digamma(np.array([1.0]))[0] + euler) < 1e-9
    np.testing.assert_allclose(digamma(x + 1) - digamma(x), 1 / x, rtol=1e-9)


def _brute_force_seeds(words, counts, max_len):
    """Right-maximal repeats by definition: every substring of the words (not crossing
    a ▁ after its start), its occurrences and the characters after them."""
    occ, after = {}, {}
    for w, c in zip(words, counts):
        for i, j in product(range(len(w) - 1), range(2, max_len + 1)):
            s = w[i:i + j]
            if i + j > len(w) - 1 or "\u2581" in s[1:]:
                continue
            occ[s] = occ.get(s, 0) + c
            after.setdefault(s, set()).add(w[i + j])
    return {s: n * len(s) for s, n in occ.items() if len(after[s]) >= 2}


def test_seeds_are_the_right_maximal_repeats():
    words = ["\u2581abab" + END, "\u2581abc\u2581", "\u2581ab" + END, "\u2581babab\u2581",
             "\u2581cab" + END]
    counts = [3, 2, 1, 1, 4]
    got = dict(seed_pieces(words, counts, max_piece_length=4, split_by_unicode_script=False))
    assert got == _brute_force_seeds(words, counts, 4)


def test_trained_tokenizer_saves_and_loads_in_every_format(trained, tmp_path):
    texts = ["Before we proceed any further, hear me speak.", "  odd   spacing ", "ünï"]
    expected = [trained.encode(t) for t in texts]
    for fmt in ("tinylm", "spm"):
        path = tmp_path / f"tok.{fmt}"
        trained.save(path, format=fmt)
        again = UnigramTokenizer.from_file(path)
        assert [again.encode(t) for t in texts] == expected
    assert math.isclose(trained.scores[10], float(np.float32(trained.scores[10])))


def _lattice_state(lat):
    """A WordLattices as plain data, positions counted from each word's start (a
    narrowed lattice keeps the first one's layout): its edges in order and the edge
    order, segments and targets of its passes."""
    ws = lat.word_start[lat.word]
    edges = list(zip(lat.word.tolist(), (lat.starts - ws).tolist(), (lat.ends - ws).tolist(),
                     lat.ids.tolist()))
    plans = [[(g.tolist(), c.tolist(), r.tolist(), (t - ws[g[c]]).tolist()) for g, c, r, t in p]
             for p in (lat._fwd, lat._bwd)]
    return edges, plans, (lat.word_end - lat.word_start).tolist()


@pytest.mark.parametrize("skip_whole", [False, True])
def test_lattice_subset_equals_a_fresh_lattice(skip_whole):
    """The trainer narrows its lattices instead of searching the text again: the
    narrowed lattice (one-character pieces removed too, so unknown edges come back) has
    the same edges in the same order as one built for the smaller vocabulary, and the
    E step and Viterbi give the same numbers to the bit (pieces renumbered in a new
    order too)."""
    from tinylm_unigram import em, lattice

    words = sorted({w for line in head_lines()[:300] for w in line.split()})
    pieces = sorted({w[i:i + n] for w in words[:400] for n in (1, 2, 3) for i in range(len(w))})
    rng = np.random.default_rng(0)
    if skip_whole:  # the pieces' own lattices: the words are the pieces
        words = pieces
    lat = em.WordLattices(words, lattice.PieceIndex(pieces), skip_whole=skip_whole)
    for rounds in range(3):
        keep = np.flatnonzero(rng.random(len(pieces)) < 0.8)
        keep = keep[rng.permutation(len(keep))] if rounds == 2 else keep  # a new order too
        assert any(len(pieces[i]) == 1 for i in set(range(len(pieces))) - set(keep.tolist()))
        new_id = np.full(len(pieces), -1)
        new_id[keep] = np.arange(len(keep))
        pieces = [pieces[i] for i in keep.tolist()]
        lat = lat.subset(new_id, words=skip_whole)
        if skip_whole:
            words = pieces
        fresh = em.WordLattices(words, lattice.PieceIndex(pieces), skip_whole=skip_whole)
        if rounds != 2:  # (words in a new order are laid out in the old one)
            assert _lattice_state(lat) == _lattice_state(fresh)
        scores = np.log(rng.random(len(pieces)))
        freqs = rng.integers(1, 9, len(words)).astype(np.float64)
        got, want = lat.expected_counts(scores, freqs, len(pieces)), fresh.expected_counts(
            scores, freqs, len(pieces))
        assert got[1] == want[1]
        if rounds != 2:
            assert np.array_equal(got[0], want[0])
        else:  # a piece's counts summed over the words in another order
            np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
        mine, theirs = lat.best_paths(scores), fresh.best_paths(scores)
        assert np.array_equal(mine[2], theirs[2]) and np.array_equal(mine[1], theirs[1])
        assert np.array_equal(lat.ids[mine[0]], fresh.ids[theirs[0]])

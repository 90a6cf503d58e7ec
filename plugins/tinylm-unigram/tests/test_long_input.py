"""One input of hundreds of thousands of characters: ids identical to `sentencepiece`.

SentencePiece's ``EncodeOptimized`` rebases its float32 path scores whenever the best
score at a start passes +-100000 (``kScoreResetThreshold``); the rounding after each
rebase decides near-ties, so a Viterbi without it drifts from sentencepiece past ~45,000
characters of English-like text."""

import numpy as np
import pytest

from conftest import generated_text

spm = pytest.importorskip("sentencepiece")
from tinylm_unigram import UnigramTokenizer, lattice  # noqa: E402


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("long")
    corpus = folder / "train.txt"
    corpus.write_text("\n".join(generated_text(3000, seed=5)), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "m"),
                                   vocab_size=1000, model_type="unigram", num_threads=1,
                                   minloglevel=2)
    path = folder / "m.model"
    return UnigramTokenizer.from_spm(path), spm.SentencePieceProcessor(model_file=str(path))


@pytest.mark.parametrize("seed,lines,sep", [(10, 2500, " "), (13, 1000, "\n"), (14, 1200, " ")])
def test_ids_equal_sentencepiece_on_one_long_input(pair, seed, lines, sep):
    tok, sp = pair
    text = sep.join(generated_text(lines, seed=seed))
    assert len(text) >= 60_000
    expected = sp.encode(text)
    # the input is long enough for several rebases (the path score passes -2e5)
    assert sum(sp.get_score(i) for i in expected) < -2 * lattice.RESET
    assert tok.encode(text, disallowed_special=()) == expected
    assert tok.encode_pieces(text) == sp.encode(text, out_type=str)


def test_rebase_decides_a_near_tie():
    """Built so that only the rebase decides. After the first edge the best score is
    -100000.5; from there "a" + "b" (-0.3, -0.4) and "ab" (their float32 sum) tie when
    rebased to 0, so "ab" (the first to reach the end) stays; without the rebase the
    two-edge path rounds to -100001.195 against -100001.203 and would win."""
    big, a, b = (float(np.float32(x)) for x in (-100000.5, -0.3, -0.4))
    ab = float(np.float32(a) + np.float32(b))
    edges = [(0, 1, big, 0), (1, 2, a, 1), (1, 3, ab, 2), (2, 3, b, 3)]
    assert lattice.viterbi_f32(3, edges, -20.0) == [(0, 1, 0), (1, 3, 2)]


def test_rebase_covers_positions_already_reached():
    """An edge from before the rebase reaches past it: its best score is rebased too
    (-100001.1 becomes -0.6, which beats -0.7 from the rebased start)."""
    big, a, b = (float(np.float32(x)) for x in (-100000.5, -0.3, -0.4))
    ab = float(np.float32(a) + np.float32(b))
    far = float(np.float32(np.float32(big) + np.float32(-0.6)))
    edges = [(0, 1, big, 0), (0, 3, far, 4), (1, 2, a, 1), (1, 3, ab, 2), (2, 3, b, 3)]
    assert lattice.viterbi_f32(3, edges, -20.0) == [(0, 3, 4)]


def test_batch_of_long_and_short_lines_crosses_the_rebase(pair, monkeypatch):
    """Long lines batched with short ones (``viterbi_f32_batch``, no per-line
    fallback): each long line passes the rebase threshold at its own positions."""
    tok, sp = pair
    monkeypatch.setattr(lattice, "MIN_EDGES_PER_STEP", 0)
    long_lines = [" ".join(generated_text(n, seed=20 + n)) for n in (1000, 700, 1300)]
    texts = generated_text(40, seed=3) + long_lines + ["", "x"] + generated_text(9, seed=4)
    expected = sp.encode(texts)
    for ids in (expected[40], expected[42]):
        assert sum(sp.get_score(i) for i in ids) < -lattice.RESET
    assert tok.encode_batch(texts, disallowed_special=()) == expected


def _as_batch(lattices):
    """``edges_batch``-style arrays from per-line edge lists ``[(s, e, score, id)]``."""
    rows = [(k, s, e, c, i) for k, edges in enumerate(lattices) for s, e, c, i in edges]
    line, s, e, c, i = (np.array(col) for col in zip(*rows))
    return line, s, e, c.astype(np.float64), i


@pytest.mark.parametrize("min_edges", [0, 10**9])  # all batched, none batched
def test_batched_viterbi_rebases_as_viterbi_f32(monkeypatch, min_edges):
    """The two hand-made rebase lattices above, many times over in one batch (with
    shifted copies so that the rebase happens at different positions per line)."""
    monkeypatch.setattr(lattice, "MIN_EDGES_PER_STEP", min_edges)
    big, a, b = (float(np.float32(x)) for x in (-100000.5, -0.3, -0.4))
    ab = float(np.float32(a) + np.float32(b))
    far = float(np.float32(np.float32(big) + np.float32(-0.6)))
    tie = [(0, 1, big, 0), (1, 2, a, 1), (1, 3, ab, 2), (2, 3, b, 3)]
    cover = [(0, 1, big, 0), (0, 3, far, 4), (1, 2, a, 1), (1, 3, ab, 2), (2, 3, b, 3)]
    lattices, lengths = [], []
    for k in range(12):
        base = tie if k % 2 else cover
        pad = [(j, j + 1, -1.0, 5) for j in range(k)]  # k one-character pieces first
        lattices.append(pad + [(s + k, e + k, c, i) for s, e, c, i in base])
        lengths.append(3 + k)
    line, s, e, i = lattice.viterbi_f32_batch(np.array(lengths), _as_batch(lattices), -20.0)
    for k, edges in enumerate(lattices):
        mine = [(int(x), int(y), int(z)) for x, y, z in zip(s[line == k], e[line == k], i[line == k])]
        assert mine == lattice.viterbi_f32(lengths[k], edges, -20.0)

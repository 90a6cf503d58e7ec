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

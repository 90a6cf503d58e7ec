"""User-defined pieces competing with normal ones: ids identical to `sentencepiece`.

SentencePiece 0.2.3 (unigram_model.cc) scores a user-defined piece of length L as
``0.1 * (L - 1)`` whatever its own score, with L in UTF-8 bytes in ``EncodeOptimized``
(what ``encode`` runs) and in characters in ``PopulateNodes`` (the lattice that n-best
and sampling use). The normaliser only keeps user-defined symbols out of the
normalisation rules; it does not cut them out, so they compete in the lattice with
every normal piece that overlaps them. A trained model rarely has near-ties where the
formula matters, so the first model here is written by hand with scores that make each
variant of the formula (the older ``length * max_score - 0.1``, bytes or characters)
choose another path; the second is one sentencepiece trains with user-defined symbols
that overlap frequent pieces and are prefixes of one another.
"""

import random
import struct

import pytest

spm = pytest.importorskip("sentencepiece")
from conftest import head_lines, multilingual_lines  # noqa: E402
from tinylm_unigram import UnigramTokenizer  # noqa: E402

NORMAL, UNKNOWN, USER = 1, 2, 4


# ---------------------------------------------------------------- a .model by hand
# (an independent writer: the file sentencepiece reads is not made by the plugin)

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload) -> bytes:
    if isinstance(payload, float):
        return _varint(number << 3 | 5) + struct.pack("<f", payload)
    if isinstance(payload, int):
        return _varint(number << 3) + _varint(payload)
    data = payload.encode("utf-8") if isinstance(payload, str) else payload
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def model_bytes(pieces) -> bytes:
    """A unigram ``ModelProto``: ``pieces`` as ``(text, score, type)``; identity
    normalisation, no dummy prefix, whitespace kept (spaces become ``▁``)."""
    out = b"".join(_field(1, _field(1, p) + _field(2, float(s)) + _field(3, t))
                   for p, s, t in pieces)
    out += _field(2, _field(3, 1) + _field(4, len(pieces)))  # model_type UNIGRAM
    out += _field(3, _field(1, "identity") + _field(3, 0) + _field(4, 0))
    return out


def _read_fields(data: bytes):
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire == 5:
            value, pos = struct.unpack("<f", data[pos:pos + 4])[0], pos + 4
        elif wire == 2:
            n, pos = _read_varint(data, pos)
            value, pos = data[pos:pos + n], pos + n
        else:
            raise ValueError(f"wire type {wire}")
        yield number, value


def _read_varint(data: bytes, pos: int):
    n = shift = 0
    while True:
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, pos


def nbest_scores(sp, text: str, n: int) -> list:
    """SentencePiece's n-best (``PopulateNodes`` lattice): ``[(ids, path score)]``."""
    out = []
    raw = sp.nbest_encode(text, nbest_size=n, out_type="serialized_proto")
    for number, spt in _read_fields(raw):
        if number != 1:
            continue
        ids, score = [], 0.0
        for k, value in _read_fields(spt):
            if k == 2:
                ids.append(dict(_read_fields(value)).get(2, 0))  # SentencePiece.id
            elif k == 3:
                score = value
        out.append((ids, score))
    return out


# ---------------------------------------------------------------- the hand-made model
# On "xyz": [xy][z] scores 0.1 - 1.05 and [x][yz] 0 - 1.0 (sentencepiece picks [xy][z]);
# with every user-defined piece at -0.1 the other path wins.
# On "öüw": [öü][w] = 0.3 - 1.15 (bytes) or 0.1 - 1.15 (characters), [ö][üw] = 0.1 - 1.0
# or 0 - 1.0: encode picks [öü][w], the sampling lattice [ö][üw]. "日本語" likewise.
HAND = [
    ("<unk>", 0.0, UNKNOWN), ("\u2581", -2.0, NORMAL),
    ("x", 0.0, USER), ("xy", -7.0, USER), ("yz", -1.0, NORMAL), ("z", -1.05, NORMAL),
    ("y", -3.0, NORMAL),
    ("ö", 0.0, USER), ("öü", 0.0, USER), ("üw", -1.0, NORMAL), ("w", -1.15, NORMAL),
    ("ü", -3.0, NORMAL),
    ("日", 5.0, USER), ("日本", 0.0, USER), ("本語", -1.0, NORMAL), ("語", -1.2, NORMAL),
    ("本", -3.0, NORMAL),
    ("the", 0.0, USER), ("th", 0.0, USER), ("he", -0.5, NORMAL), ("e", -0.61, NORMAL),
    ("t", -2.0, NORMAL), ("h", -2.0, NORMAL), ("q", -4.0, NORMAL),
]
HAND_ALPHABET = ["x", "y", "z", "ö", "ü", "w", "日", "本", "語", "t", "h", "e", " ", "q",
                 "xyz", "öüw", "日本語", "the", "he"]


@pytest.fixture(scope="module")
def hand(tmp_path_factory):
    path = tmp_path_factory.mktemp("hand") / "hand.model"
    path.write_bytes(model_bytes(HAND))
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert sp.get_piece_size() == len(HAND) and sp.is_unknown(0)
    return UnigramTokenizer.from_spm(path), sp


def random_texts(alphabet, n: int, seed: int, longest: int = 10) -> list:
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, longest)))
            for _ in range(n)]


def test_hand_model_encode_picks_what_sentencepiece_picks(hand):
    tok, sp = hand
    assert sp.encode("xyz", out_type=str) == ["xy", "z"]
    assert sp.encode("öüw", out_type=str) == ["öü", "w"]
    assert sp.encode("日本語", out_type=str) == ["日本", "語"]
    texts = ["xyz", "öüw", "日本語", "the", "thee", "xyzöüw日本語 the"] + random_texts(
        HAND_ALPHABET, 1500, seed=0)
    assert [tok.encode(t, disallowed_special=()) for t in texts] == sp.encode(texts)
    assert [tok.encode_pieces(t) for t in texts] == sp.encode(texts, out_type=str)


def _check_sampling_mode(tok, sp, texts, min_gap=0.02):
    """Sampling at a large ``alpha`` draws the best path of the sampling lattice:
    it must be SentencePiece's n-best first path (where no other path is near)."""
    checked = 0
    for k, text in enumerate(texts):
        best = nbest_scores(sp, text, 2)
        if len(best) == 2 and best[0][1] - best[1][1] < min_gap:
            continue
        drawn = tok.sample_encode(text, alpha=1000.0, seed=k)
        assert drawn == best[0][0], (text, drawn, best)
        checked += 1
    return checked


def test_hand_model_sampling_lattice_counts_characters(hand):
    tok, sp = hand
    assert sp.nbest_encode("öüw", nbest_size=2, out_type=str)[0] == ["ö", "üw"]
    assert sp.nbest_encode("日本語", nbest_size=2, out_type=str)[0] == ["日", "本語"]
    spm.set_random_generator_seed(1)
    assert sp.encode("öüw", out_type=str, enable_sampling=True, alpha=1000.0,
                     nbest_size=-1) == ["ö", "üw"]
    texts = ["xyz", "öüw", "日本語", "xyzöüw日本語 the"] + random_texts(HAND_ALPHABET, 300, seed=1)
    assert _check_sampling_mode(tok, sp, texts) > 200


# ---------------------------------------------------------------- a trained model

USER_SYMBOLS = ["the", "th", "t", "ing", "in", "and", "an", "▁the", "er", "ou", "que", "qu",
                "é", "éa", "ée", "日本", "日本語", "ab", "abc", "bcd", "<sep>"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trained")
    corpus = folder / "train.txt"
    corpus.write_text("\n".join(head_lines() + multilingual_lines(200)), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "m"),
                                   vocab_size=800, model_type="unigram", num_threads=1,
                                   minloglevel=2, user_defined_symbols=USER_SYMBOLS)
    path = folder / "m.model"
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert all(sp.id_to_piece(i) == s for i, s in enumerate(USER_SYMBOLS, start=3))
    return UnigramTokenizer.from_spm(path), sp


TRAINED_ALPHABET = USER_SYMBOLS + list("thengiadbcqué日本語 ,") + [
    "the ", "thing", "another", "bands", "queen", "there", "abcd", "éée", "  "]


def test_trained_model_with_overlapping_user_symbols(trained):
    tok, sp = trained
    texts = random_texts(TRAINED_ALPHABET, 2500, seed=2) + head_lines()[::7]
    texts.append(" ".join(texts[:300]))  # one long lattice
    assert [tok.encode(t, disallowed_special=()) for t in texts] == sp.encode(texts)
    assert [tok.encode_pieces(t) for t in texts[:500]] == sp.encode(texts[:500], out_type=str)


def test_trained_model_sampling_mode(trained):
    tok, sp = trained
    assert _check_sampling_mode(tok, sp, random_texts(TRAINED_ALPHABET, 200, seed=3, longest=6)) > 100


def test_encode_batch_on_the_hand_and_trained_models(hand, trained):
    """User-defined pieces (0.1 * (bytes - 1)) in the batched Viterbi."""
    from tinylm_unigram import lattice

    cases = [(hand, ["xyz", "öüw", "日本語", "", "xyzöüw日本語 the"] + random_texts(
        HAND_ALPHABET, 600, seed=4, longest=40)),
             (trained, random_texts(TRAINED_ALPHABET, 800, seed=5, longest=30) + [""])]
    for (tok, sp), texts in cases:
        expected = sp.encode(texts)
        assert tok.encode_batch(texts, disallowed_special=()) == expected
        saved = lattice.BUCKET_CELLS
        lattice.BUCKET_CELLS = 2000  # many buckets
        try:
            assert tok.encode_batch(texts, disallowed_special=()) == expected
        finally:
            lattice.BUCKET_CELLS = saved

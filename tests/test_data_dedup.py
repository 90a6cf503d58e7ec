"""tinylm data dedup: exact mod-p arithmetic, MinHash estimates against exact Jaccard,
LSH and union-find against plain Python, near-duplicates found and distinct documents
left alone, resuming, the CLI."""

import gzip
import json
import random

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from tinylm.cli import cli
from tinylm.errors import TinyLMError
from tinylm.webdata.dedup import DedupConfig, dedup_corpus, shingles
from tinylm.webdata.hashing import (char_shingles, combine, mix64, normalize, segment_hashes,
                                    word_shingles, word_spans, codepoints)
from tinylm.webdata.minhash import (EMPTY, MinHasher, band_keys, candidate_pairs,
                                    estimate_jaccard, first_of_components, mod61, mulmod61,
                                    optimal_bands)

P = (1 << 61) - 1
u64 = st.integers(0, 2**64 - 1)


# ------------------------------------------------------------------- arithmetic


@given(st.lists(st.tuples(st.integers(0, P - 1), st.integers(0, P - 1)), min_size=1,
                max_size=20))
def test_mulmod61_is_exact(pairs):
    a = np.array([p[0] for p in pairs], dtype=np.uint64)
    x = np.array([p[1] for p in pairs], dtype=np.uint64)
    assert mulmod61(a, x).tolist() == [(i * j) % P for i, j in pairs]


@given(st.lists(u64, min_size=1, max_size=20))
def test_permutations_are_a_x_plus_b_mod_p(values):
    hasher = MinHasher(num_perm=16, seed=3)
    x = np.array(values, dtype=np.uint64)
    assert mod61(x).tolist() == [v % P for v in values]
    got = hasher.permute(x)
    for i in range(16):
        a, b = int(hasher.a[i]), int(hasher.b[i])
        assert got[i].tolist() == [(a * (v % P) + b) % P for v in values]


def test_word_and_char_shingles():
    text = normalize("  The CAT\u00a0sat on\tthe ｍａｔ ")
    assert text == "the cat sat on the mat"
    codes = codepoints(text)
    starts, ends = word_spans(codes)
    assert [text[s:e] for s, e in zip(starts, ends)] == text.split()
    words = segment_hashes(codes, starts, ends)
    assert words[0] == words[4]  # "the" twice, one hash
    three = word_shingles(text, 3)
    assert len(three) == 4 and len(set(three.tolist())) == 4
    assert np.array_equal(three, combine(words, 3))
    assert word_shingles("x the cat sat", 3)[1] == three[0]  # position does not matter
    assert len(word_shingles("two words", 5)) == 1 and len(word_shingles("", 5)) == 0
    chars = char_shingles("abcabc", 3)
    assert len(chars) == 4 and chars[0] == chars[3]
    assert mix64(np.arange(4, dtype=np.uint64)).dtype == np.uint64


# ---------------------------------------------------------------- estimates


def random_pair(rng, union: int, jaccard: float):
    """Two sets of 64-bit hashes with |A | B| = union and |A & B| = round(J union)."""
    values = mix64(rng.integers(0, 2**63, union, dtype=np.uint64))
    both = int(round(jaccard * union))
    rest = union - both
    a = np.concatenate([values[:both], values[both:both + rest // 2]])
    b = np.concatenate([values[:both], values[both + rest // 2:]])
    return a, b, both / union


@given(st.integers(0, 2**32), st.integers(20, 600), st.floats(0.0, 1.0))
@settings(max_examples=25)
def test_minhash_estimates_agree_with_exact_jaccard(seed, union, jaccard):
    rng = np.random.default_rng(seed)
    a, b, exact = random_pair(rng, union, jaccard)
    k = 256
    sig = MinHasher(k, seed=seed % 1000).signatures([a, b])
    std = np.sqrt(exact * (1 - exact) / k)
    assert abs(estimate_jaccard(sig[0], sig[1]) - exact) <= 5 * std + 1.5 / k


def test_minhash_error_has_the_expected_spread():
    """Over 300 random pairs at J = 0.5, the estimates' mean is J and their standard
    deviation sqrt(J(1-J)/k), each within sampling error."""
    rng, k, errors = np.random.default_rng(7), 128, []
    for trial in range(300):
        a, b, exact = random_pair(rng, 400, 0.5)
        sig = MinHasher(k, seed=trial).signatures([a, b])
        errors.append(estimate_jaccard(sig[0], sig[1]) - exact)
    std = np.sqrt(0.25 / k)
    assert abs(np.mean(errors)) < 4 * std / np.sqrt(300)
    assert 0.8 * std < np.std(errors) < 1.2 * std


def test_signatures_batch_equals_one_by_one_and_empty_sets():
    rng = np.random.default_rng(1)
    sets = [mix64(rng.integers(0, 2**63, n, dtype=np.uint64)) for n in (5, 0, 300, 1, 70)]
    hasher = MinHasher(64, seed=2)
    import tinylm.webdata.minhash as minhash

    together = hasher.signatures(sets)
    old = minhash.CHUNK_VALUES
    try:
        minhash.CHUNK_VALUES = 64 * 7  # chunks of 7 shingles: sets cross chunk edges
        chunked = hasher.signatures(sets)
    finally:
        minhash.CHUNK_VALUES = old
    alone = np.concatenate([hasher.signatures([s]) for s in sets])
    assert np.array_equal(together, alone) and np.array_equal(chunked, alone)
    assert (together[1] == EMPTY).all()
    assert np.array_equal(together[2], hasher.permute(sets[2]).min(axis=1))


# --------------------------------------------------------------------- LSH


def test_optimal_bands():
    for threshold, k in [(0.8, 128), (0.5, 128), (0.9, 256)]:
        bands, rows = optimal_bands(threshold, k)
        assert bands * rows <= k
        assert abs((1 / bands) ** (1 / rows) - threshold) < 0.1  # the S-curve's middle
    assert DedupConfig(bands=16).layout() == (16, 8)
    with pytest.raises(TinyLMError, match="bands x rows"):
        DedupConfig(bands=20, rows=10).layout()


def python_components(n, pairs):
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = [find(i) for i in range(n)]
    smallest = {}
    for i, r in enumerate(roots):
        smallest.setdefault(r, i)
    return [smallest[r] for r in roots]


@given(st.integers(1, 40), st.lists(st.tuples(st.integers(0, 39), st.integers(0, 39)),
                                    max_size=60))
def test_union_find_keeps_the_first_of_each_component(n, edges):
    pairs = np.array([(a % n, b % n) for a, b in edges], dtype=np.int64).reshape(-1, 2)
    assert first_of_components(n, pairs).tolist() == python_components(n, pairs.tolist())


@given(st.lists(st.integers(0, 5), min_size=1, max_size=30), st.integers(1, 3))
def test_candidate_pairs_connect_each_bucket(values, bands):
    keys = np.array([[v * (j + 1) for j in range(bands)] for v in values], dtype=np.uint64)
    pairs = candidate_pairs(keys)
    assert (pairs[:, 0] < pairs[:, 1]).all() if len(pairs) else True
    same = [[i for i, v in enumerate(values) if v == w] for w in set(values)]
    expected = list(range(len(values)))
    for group in same:
        for i in group:
            expected[i] = group[0]
    assert first_of_components(len(values), pairs).tolist() == expected


# ------------------------------------------------------------- documents


VOCAB = [f"{w}{i}" for i, w in enumerate(["river", "stone", "cloud", "apple", "market",
                                          "window", "garden", "letter"] * 400)]


def random_doc(rng, n=300):
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def edit(rng, text, changes):
    words = text.split()
    for _ in range(changes):
        op, at = rng.randrange(3), rng.randrange(len(words))
        if op == 0:
            words[at] = "changed"
        elif op == 1:
            words.insert(at, "inserted")
        else:
            del words[at]
    return " ".join(words)


def write_jsonl(path, texts):
    path.write_bytes(gzip.compress(b"".join(
        json.dumps({"text": t, "n": i}).encode() + b"\n" for i, t in enumerate(texts))))


def read_jsonl(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def corpus(tmp_path, seed=0):
    """Two shards: 40 distinct documents; near-duplicates (1-3 small edits) of the first
    8 and an exact (normalised) copy of doc 12 in the second shard."""
    rng = random.Random(seed)
    base = [random_doc(rng) for _ in range(40)]
    near = [edit(rng, base[i], 1 + i % 3) for i in range(8)]
    exact = "  " + base[12].upper().replace(" ", "\n ") + " "
    folder = tmp_path / "in"
    folder.mkdir(exist_ok=True)
    write_jsonl(folder / "a.jsonl.gz", base[:25])
    write_jsonl(folder / "b.jsonl.gz", base[25:] + near + [exact])
    return folder, base


def test_near_duplicates_found_distinct_documents_kept(tmp_path):
    folder, base = corpus(tmp_path)
    out = tmp_path / "out"
    totals = dedup_corpus([folder], str(out), show_progress=False)
    kept = read_jsonl(out / "a.jsonl.gz") + read_jsonl(out / "b.jsonl.gz")
    assert [d["text"] for d in kept] == base  # every distinct one, each once, in order
    assert (totals["exact_duplicates"], totals["near_duplicates"]) == (1, 8)
    assert totals["documents_in"] == 49 and totals["documents_out"] == 40
    dropped = [json.loads(x) for x in (out / ".dedup" / "b.duplicates.jsonl").open()]
    assert [d["duplicate_of"] for d in dropped] == [f"a.jsonl.gz:{i + 1}" for i in range(8)] + [
        "a.jsonl.gz:13"]
    assert [d["kind"] for d in dropped] == ["near"] * 8 + ["exact"]
    assert all(0.8 <= d["jaccard"] < 1.0 for d in dropped[:8])
    assert json.loads((out / "dedup.stats.json").read_text()) == totals


def test_exact_only_and_char_shingles(tmp_path):
    folder, base = corpus(tmp_path)
    totals = dedup_corpus([folder], str(tmp_path / "o1"), DedupConfig(near=False),
                          show_progress=False)
    assert (totals["exact_duplicates"], totals["near_duplicates"]) == (1, 0)
    totals = dedup_corpus([folder], str(tmp_path / "o2"),
                          DedupConfig(shingle="char", shingle_size=8, num_perm=64),
                          show_progress=False)
    assert (totals["exact_duplicates"], totals["near_duplicates"]) == (1, 8)


def test_shingle_sets_of_a_small_edit_stay_similar():
    rng = random.Random(3)
    a = random_doc(rng)
    b = edit(rng, a, 2)
    sa, sb = shingles(normalize(a), DedupConfig()), shingles(normalize(b), DedupConfig())
    jaccard = len(np.intersect1d(sa, sb)) / len(np.union1d(sa, sb))
    assert 0.9 < jaccard < 1.0
    c = random_doc(rng)
    sc = shingles(normalize(c), DedupConfig())
    assert len(np.intersect1d(sa, sc)) == 0


def test_dedup_resumes(tmp_path):
    folder, base = corpus(tmp_path)
    out = tmp_path / "out"
    first = dedup_corpus([folder], str(out), show_progress=False)
    again = dedup_corpus([folder], str(out), show_progress=False)
    assert again["shards_skipped"] == {"signatures": 2, "write": 2}
    assert again["documents_out"] == first["documents_out"]
    # shard b changes: only its signatures are made again, but every shard is rewritten
    rng = random.Random(9)
    write_jsonl(folder / "b.jsonl.gz", [random_doc(rng), base[3]])
    again = dedup_corpus([folder], str(out), show_progress=False)
    assert again["shards_skipped"] == {"signatures": 1, "write": 0}
    assert (again["exact_duplicates"], again["documents_out"]) == (1, 26)


def test_cli_dedup(tmp_path):
    folder, _ = corpus(tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["data", "dedup", str(folder), "-o", str(out),
                                      "--no-progress", "--num-perm", "64", "--bands", "16",
                                      "--threshold", "0.7"])
    assert result.exit_code == 0, result.output
    assert "kept 40 of 49 documents: 1 exact and 8 near duplicates" in result.output
    assert "16 bands x 4 rows" in result.output
    result = CliRunner().invoke(cli, ["data", "dedup", str(folder), "-o", str(out),
                                      "--bands", "30", "--rows", "30"])
    assert result.exit_code == 2 and "at most --num-perm" in result.output
    result = CliRunner().invoke(cli, ["data", "dedup", str(tmp_path / "missing"), "-o",
                                      str(out)])
    assert result.exit_code == 2 and "no such file or folder" in result.output


def test_the_on_disk_index_in_a_tiny_budget_gives_the_same_answer(tmp_path, monkeypatch):
    """Exact keys and LSH bands through many partition files (a budget of a few dozen
    entries) against an in-memory oracle: np.unique for the exact firsts, every band's
    buckets at once (``candidate_pairs``), union-find over all documents."""
    import tinylm.webdata.external as ext
    from tinylm.webdata.readers import read_documents

    folder, base = corpus(tmp_path)
    config = DedupConfig()
    texts = [normalize(d.text) for f in ("a", "b")
             for d in read_documents(str(folder / f"{f}.jsonl.gz"))]
    keys = np.array([hash(t) & (2**63 - 1) for t in texts], dtype=np.uint64)
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    exact_first = first[inverse.ravel()]
    sig = MinHasher(config.num_perm, config.seed).signatures([shingles(t, config) for t in texts])
    pairs = candidate_pairs(band_keys(sig, *config.layout()), exact_first == np.arange(len(texts)))
    pairs = pairs[estimate_jaccard(sig[pairs[:, 0]], sig[pairs[:, 1]]) >= config.threshold]
    rep = first_of_components(len(texts), pairs)
    keep = (exact_first == np.arange(len(texts))) & (rep == np.arange(len(texts)))
    expected = [t for t, k in zip(texts, keep) if k]

    monkeypatch.setattr(ext, "MIN_MEMORY", 8 * ext.BYTES_PER_ENTRY)  # 8-entry partitions
    big = dedup_corpus([folder], str(tmp_path / "big"), config, show_progress=False)
    tiny = dedup_corpus([folder], str(tmp_path / "tiny"), config, show_progress=False,
                        memory_bytes=1)
    kept = read_jsonl(tmp_path / "tiny" / "a.jsonl.gz") + read_jsonl(tmp_path / "tiny" /
                                                                     "b.jsonl.gz")
    assert [normalize(d["text"]) for d in kept] == expected
    for f in ("a", "b"):
        assert read_jsonl(tmp_path / "tiny" / f"{f}.jsonl.gz") == read_jsonl(
            tmp_path / "big" / f"{f}.jsonl.gz")
        assert (tmp_path / "tiny" / ".dedup" / f"{f}.duplicates.jsonl").read_text() == (
            tmp_path / "big" / ".dedup" / f"{f}.duplicates.jsonl").read_text()
    for field in ("exact_duplicates", "near_duplicates", "candidate_pairs", "verified_pairs",
                  "clusters"):
        assert tiny[field] == big[field]
    assert ext.partition_count(49, 1) == 7 and tiny["candidate_pairs"] >= 8

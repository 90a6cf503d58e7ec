"""tinylm data clean: C4's and Gopher's rules on pages the tests write, the span dedup,
the hash set under it, the stats, resuming, the CLI."""

import contextlib
import gzip
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from tinylm.cli import cli
from tinylm.webdata.clean import clean_corpus
from tinylm.webdata.filters import (CleanConfig, build_pipeline, count_sentences,
                                    page_lines, split_sentences)
from tinylm.webdata.hashset import HashSet64
from tinylm.webdata.langid import register_language_id, script_language

# Prose that passes every rule: 6 sentences, 60 words, stop words, terminal punctuation.
GOOD = ("The river runs past the old mill and the children play on its banks. "
        "In the summer the water is warm enough to swim in for hours. "
        "Farmers bring their cattle down to drink in the cool of the evening. "
        "A small bridge of grey stone crosses it near the church. "
        "Nobody remembers who built it or when the work was done. "
        "Visitors often stop there to take pictures of the quiet valley.")

OTHER = ("My grandmother kept a garden of roses behind the house for many years. "
         "Every morning she walked between the rows with a watering can. "
         "She knew the name of each flower and where it had come from. "
         "Neighbours came by to ask her advice about pests and pruning. "
         "When she grew old the garden slowly went wild again. "
         "Now only a few of the oldest bushes still bloom in June.")


def run(filters, pages, **config):
    """Pages (texts) through the named filters: (kept texts or None, removed counts)."""
    pipeline = build_pipeline(CleanConfig(filters=tuple(filters), **config))
    kept = pipeline.run([page_lines(p) for p in pages])
    return ["\n".join(k) if k else None for k in kept], pipeline.removed


# ------------------------------------------------------------------- C4's rules


def test_terminal_punctuation_keeps_only_finished_lines():
    page = ('Home | About us | Contact\nThe shop opens at nine.\nIs it open on Sunday?\n'
            '"We love it here," she said."\nRead more...\nBuy now!\nPosted in News')
    kept, removed = run(["c4_terminal_punct"], [page])
    assert kept == ['The shop opens at nine.\nIs it open on Sunday?\n'
                    '"We love it here," she said."\nBuy now!']
    assert removed["c4_terminal_punct"].lines == 3
    assert removed["c4_terminal_punct"].chars == len("Home | About us | Contact") + len(
        "Read more...") + len("Posted in News")


def test_min_words_per_line_issue_default_and_tfds_value():
    page = "Thanks!\nYes, I agree.\nThe meeting starts at noon today."
    kept, _ = run(["c4_min_words"], [page])
    assert kept == ["Yes, I agree.\nThe meeting starts at noon today."]
    kept, _ = run(["c4_min_words"], [page], min_words_per_line=5)  # TFDS's C4
    assert kept == ["The meeting starts at noon today."]


def test_javascript_lines_policy_lines_and_citations():
    page = ("Please enable JavaScript to view the comments powered by Disqus.\n"
            "This website uses cookies to improve your experience.\n"
            "By using this site you agree to the Terms of Use.\n"
            "Paris is the capital of France.[1] It is large.[citation needed][edit]")
    kept, removed = run(["c4_citations", "c4_javascript", "c4_policy"], [page])
    assert kept == ["Paris is the capital of France. It is large."]
    assert removed["c4_javascript"].lines == 1 and removed["c4_policy"].lines == 2
    assert removed["c4_citations"].lines == 0
    assert removed["c4_citations"].chars == len("[1][citation needed][edit]")


def test_pages_with_lorem_ipsum_or_curly_brackets_are_dropped():
    lorem = GOOD + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit."
    code = GOOD + "\nfunction show() { return document.title; }."
    kept, removed = run(["c4_lorem_ipsum", "c4_curly_bracket"], [lorem, code, GOOD])
    assert kept == [None, None, GOOD]
    assert (removed["c4_lorem_ipsum"].documents, removed["c4_lorem_ipsum"].lines) == (1, 2)
    assert removed["c4_curly_bracket"].documents == 1
    assert removed["c4_curly_bracket"].chars == len(GOOD) + len(
        "function show() { return document.title; }.")


def test_bad_words_file(tmp_path):
    (tmp_path / "words.txt").write_text("# a word list\nbadword\nrude phrase\n")
    pages = ["Badword starts this line, which TFDS's regex would miss.",
             "A badwordly thing is not the word itself.",
             "It has a rude phrase in it.", "It has a rude word in it."]
    kept, removed = run(["c4_bad_words"], pages, bad_words=str(tmp_path / "words.txt"))
    assert kept == [None, pages[1], None, pages[3]]
    assert removed["c4_bad_words"].documents == 2
    assert "c4_bad_words" not in CleanConfig(filters=("c4",)).names()  # needs a list


def test_min_sentences_issue_default_and_tfds_value():
    four = "One is here. Two is here. Three is here. Four is here."
    assert count_sentences([four]) == 4 and count_sentences(["! ! !"]) == 0
    kept, _ = run(["c4_min_sentences"], [four, four + " Five is here."])
    assert kept == [None, four + " Five is here."]
    kept, _ = run(["c4_min_sentences"], [four], min_sentences=3)  # TFDS's C4
    assert kept == [four]


def test_split_sentences():
    assert split_sentences('He left. "Why?" she asked! (Fine.) And then') == [
        "He left.", '"Why?"', "she asked!", "(Fine.)", "And then"]
    assert split_sentences("Version 2.5 is out... Really.") == ["Version 2.5 is out...",
                                                                "Really."]


def test_c4_group_on_a_page_like_the_papers_examples():
    page = ("Skip to main content\n" + GOOD + "\nPlease enable JavaScript in your browser.\n"
            "Our privacy policy has changed. Read it now.\nShare:\nThanks!")
    kept, removed = run(["c4"], [page])
    assert kept == [GOOD]
    assert removed["c4_terminal_punct"].lines == 2  # "Skip to main content", "Share:"
    assert removed["c4_min_words"].lines == 1  # "Thanks!"
    assert removed["c4_javascript"].lines == 1 and removed["c4_policy"].lines == 1


# ------------------------------------------------------------------- span dedup


def test_three_sentence_spans_seen_before_are_removed():
    shared = "The red fox ran home. It was late at night. The moon was full and bright."
    first = GOOD + " " + shared
    second = "A different start is here today. " + shared + " Some new words end it. " \
        "One more sentence comes. And the last one ends the page."
    kept, removed = run(["c4_span_dedup"], [first, second], min_sentences=5)
    assert kept[0] == first
    assert kept[1] == ("A different start is here today. Some new words end it. "
                       "One more sentence comes. And the last one ends the page.")
    assert removed["c4_span_dedup"].chars == len(shared) + 1  # and one space
    assert removed["c4_span_dedup"].documents == 0


def test_span_dedup_drops_a_page_left_too_short_and_repeats_within_a_page():
    pipeline = build_pipeline(CleanConfig(filters=("c4_min_sentences", "c4_span_dedup")))
    kept = pipeline.run([page_lines(GOOD), page_lines(GOOD + " Yet one more here.")])
    assert kept[0] == page_lines(GOOD) and kept[1] is None
    assert pipeline.removed["c4_span_dedup"].documents == 1
    lines = ["One fish swims. Two fish swim. Red fish swim.", "Blue fish hide. Fish eat.",
             "One fish swims. Two fish swim. Red fish swim."]
    pipeline = build_pipeline(CleanConfig(filters=("c4_span_dedup",)))
    assert pipeline.run([lines]) == [lines[:2]]  # the later repeat goes, the first stays


@given(st.lists(st.lists(st.integers(0, 60), max_size=40), max_size=12))
@settings(max_examples=25)
def test_hashset_matches_a_python_set(batches):
    seen, reference = HashSet64(16), set()
    for batch in batches:
        keys = np.array(batch, dtype=np.uint64)
        expected = []
        for k in batch:
            expected.append(max(k, 1) in reference)
            reference.add(max(k, 1))  # 0 is stored as 1 (the empty slot's mark)
        assert seen.add_first(keys).tolist() == expected
    assert len(seen) == len(reference)
    assert sorted(seen.keys().tolist()) == sorted(reference)
    assert seen.contains(np.arange(70, dtype=np.uint64)).tolist() == [
        max(k, 1) in reference for k in range(70)]


def test_hashset_grows_and_stays_half_empty():
    seen = HashSet64(16)
    keys = np.random.default_rng(0).integers(1, 2**63, 50_000, dtype=np.uint64)
    assert not seen.add_first(keys).any()
    assert seen.add_first(keys[::7]).all()
    assert len(seen) == 50_000 and seen.nbytes == 8 * len(seen.table)
    assert 2 * len(seen) <= len(seen.table) <= 4 * len(seen)


# ----------------------------------------------------------------------- Gopher


def test_gopher_rules_each_remove_their_page():
    words = GOOD.split()
    cases = {
        "gopher_word_count": "Too short to keep, with the words of it.",
        "gopher_mean_word_length": " ".join(["the"] + ["extraordinarily"] * 60),
        "gopher_symbol_ratio": GOOD + " " + "#tag " * 12,
        "gopher_bullet_lines": GOOD.replace(". ", ".\n- ").replace("The river", "- The river"),
        "gopher_ellipsis_lines": GOOD.replace(". ", "...\n"),
        "gopher_alpha_words": GOOD + " " + " ".join(["12", "--", "3.5", "%"] * 5),
        "gopher_stop_words": " ".join(w for w in words
                                      if w.lower().strip(".") not in ("the", "and", "to", "of",
                                                                      "in", "with", "that")),
        "gopher_repetition": "\n".join([GOOD] + ["Click here to read the whole story."] * 4),
    }
    for name, page in cases.items():
        kept, removed = run([name], [page, GOOD])
        assert kept == [None, GOOD], name
        assert removed[name].documents == 1, name
    kept, _ = run(["gopher"], [GOOD])
    assert kept == [GOOD]


# --------------------------------------------------------------------- language


def test_script_language_id_and_plugins(monkeypatch):
    assert script_language("Hello world") == ("Latin", 1.0)
    assert script_language("Привет, мир!")[0] == "Cyrillic"
    assert script_language("12345 !?") == ("", 0.0)
    russian = "Это хорошая страница. " * 10
    kept, removed = run(["language"], [GOOD, russian], language="Latin")
    assert kept == [GOOD, None] and removed["language"].documents == 1
    register_language_id("always-fr", lambda text: ("fr", 0.99))
    kept, _ = run(["language"], [GOOD], language="fr", language_id="always-fr")
    assert kept == [GOOD]
    kept, _ = run(["language"], [GOOD], language="Latin",
                  language_id="tinylm.webdata.langid:script_language")
    assert kept == [GOOD]
    assert "language" not in CleanConfig().names()  # only when a language is asked for


# ------------------------------------------------------------------ the corpus


def write_jsonl(path, texts, extra=b""):
    body = b"".join(json.dumps({"text": t, "url": f"u{i}"}).encode() + b"\n"
                    for i, t in enumerate(texts))
    path.write_bytes(gzip.compress(body + extra) if str(path).endswith(".gz") else body + extra)


def read_jsonl(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


SHARED = "The red fox ran home. It was late at night. The moon was full and bright."


def corpus(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_jsonl(inputs / "c4-train.00000-of-00002.json.gz",
                [GOOD + " " + SHARED, "Short junk\nPlease enable JavaScript.", GOOD + " {x}."],
                extra=b"{broken json\n")
    write_jsonl(inputs / "c4-train.00001-of-00002.json.gz",
                [SHARED + " " + OTHER, ""])
    return inputs


def test_clean_corpus_stats_and_resume(tmp_path):
    inputs, out = corpus(tmp_path), tmp_path / "out"
    totals = clean_corpus([inputs], str(out), show_progress=False)
    first = read_jsonl(out / "c4-train.00000-of-00002.jsonl.gz")
    second = read_jsonl(out / "c4-train.00001-of-00002.jsonl.gz")
    assert [d["url"] for d in first] == ["u0"] and first[0]["text"] == GOOD + " " + SHARED
    assert second[0]["text"] == OTHER  # the shared span went
    assert totals["documents_in"] == 5 and totals["documents_out"] == 2
    assert totals["empty_documents"] == 1
    assert totals["removed"]["c4_curly_bracket"]["documents"] == 1
    assert totals["removed"]["gopher_word_count"]["documents"] == 1
    assert totals["removed"]["c4_span_dedup"]["chars"] == len(SHARED) + 1
    assert totals["files"][0]["bad"] == {"invalid_json": 1}
    assert json.loads((out / "clean.stats.json").read_text()) == totals
    assert totals["shards_done"] == 2 and totals["span_hashes"] > 0

    again = clean_corpus([inputs], str(out), show_progress=False)
    assert (again["shards_done"], again["shards_skipped"]) == (0, 2)
    assert again["removed"] == totals["removed"] and again["span_hashes"] == totals["span_hashes"]

    # the second shard changes: the first is skipped, its spans reloaded for the second
    write_jsonl(inputs / "c4-train.00001-of-00002.json.gz",
                [SHARED + " " + OTHER.replace("roses", "tulips")])
    again = clean_corpus([inputs], str(out), show_progress=False)
    assert (again["shards_done"], again["shards_skipped"]) == (1, 1)
    assert read_jsonl(out / "c4-train.00001-of-00002.jsonl.gz")[0]["text"] == \
        OTHER.replace("roses", "tulips")

    # other options: nothing is trusted
    again = clean_corpus([inputs], str(out), CleanConfig(min_sentences=3), show_progress=False)
    assert again["shards_done"] == 2


def test_an_interrupted_run_leaves_no_partial_shard(tmp_path, monkeypatch):
    inputs, out = corpus(tmp_path), tmp_path / "out"
    import tinylm.webdata.clean as clean_module

    calls = []
    real = clean_module.clean_shard

    def fail_on_second(shard, *args):
        calls.append(shard.stem)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(shard, *args)

    monkeypatch.setattr(clean_module, "clean_shard", fail_on_second)
    with pytest.raises(KeyboardInterrupt):
        clean_corpus([inputs], str(out), show_progress=False)
    assert sorted(os.listdir(out)) == [".clean", "c4-train.00000-of-00002.jsonl.gz"]
    monkeypatch.setattr(clean_module, "clean_shard", real)
    totals = clean_corpus([inputs], str(out), show_progress=False)
    assert (totals["shards_done"], totals["shards_skipped"]) == (1, 1)


def test_cli_clean(tmp_path):
    inputs, out = corpus(tmp_path), tmp_path / "out"
    (tmp_path / "cfg.json").write_text(json.dumps({"gopher_min_words": 10}))
    result = CliRunner().invoke(cli, ["data", "clean", str(inputs), "-o", str(out),
                                      "--no-progress", "--config", str(tmp_path / "cfg.json"),
                                      "--skip", "gopher_repetition", "--min-sentences", "5"])
    assert result.exit_code == 0, result.output
    assert "c4_span_dedup" in result.output and "kept 2 of 5 documents" in result.output
    assert "bad records in" in result.output and "1 invalid_json" in result.output
    stats = json.loads((out / "clean.stats.json").read_text())
    assert "gopher_repetition" not in stats["filters"]
    result = CliRunner().invoke(cli, ["data", "clean", str(inputs), "-o", str(out),
                                      "--filters", "c4,nonsense"])
    assert result.exit_code == 2 and "unknown filter(s) nonsense" in result.output
    (tmp_path / "bad.json").write_text(json.dumps({"min_wrods": 3}))
    result = CliRunner().invoke(cli, ["data", "clean", str(inputs), "-o", str(out),
                                      "--config", str(tmp_path / "bad.json")])
    assert result.exit_code == 2 and "unknown clean option(s) min_wrods" in result.output


# ------------------------------------------- span dedup on disk, in bounded memory


def test_first_occurrences_on_disk_match_a_python_dict(tmp_path, monkeypatch):
    import tinylm.webdata.external as ext

    monkeypatch.setattr(ext, "MIN_MEMORY", 40 * ext.BYTES_PER_ENTRY)  # 40-key chunks
    rng = np.random.default_rng(5)
    parts = [rng.integers(0, 300, size=n).astype("<u8") for n in (700, 0, 333)]
    paths = []
    for i, keys in enumerate(parts):
        paths.append(str(tmp_path / f"{i}.u64"))
        keys.tofile(paths[-1])
    first, expected = {}, []
    for i, key in enumerate(np.concatenate(parts).tolist()):
        expected.append(first.setdefault(key, i))
    assert ext.partition_count(1033, 1) == 26  # many partitions: the spill path
    assert ext.first_occurrences(paths, str(tmp_path / "out"), str(tmp_path / "w"), 1) == 1033
    assert np.fromfile(tmp_path / "out", dtype="<i8").tolist() == expected
    assert not (tmp_path / "w").exists()  # its partition files are gone


def _keys_for_256_partitions(tmp_path, monkeypatch):
    """A key file that takes ``MAX_PARTITIONS`` partitions (tiny budget), its oracle."""
    import tinylm.webdata.external as ext

    monkeypatch.setattr(ext, "MIN_MEMORY", 4 * ext.BYTES_PER_ENTRY)  # 4 keys a partition
    keys = np.random.default_rng(3).integers(0, 900, size=2000).astype("<u8")
    keys.tofile(tmp_path / "k.u64")
    assert ext.partition_count(len(keys), 1) == ext.MAX_PARTITIONS == 256
    first = {}
    return [str(tmp_path / "k.u64")], [first.setdefault(k, i) for i, k in
                                       enumerate(keys.tolist())]


@contextlib.contextmanager
def _open_files_limit(extra: int):
    """The soft open-file limit set to the files open now plus ``extra``."""
    resource = pytest.importorskip("resource")
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to count open files")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + extra,
                                                hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_first_occurrences_keeps_at_most_max_partitions_files_open(tmp_path, monkeypatch):
    """256 partitions run under a limit of 256 + a few more open files (the key and
    result partitions are never open together), and give the dict's answer."""
    import tinylm.webdata.external as ext

    paths, expected = _keys_for_256_partitions(tmp_path, monkeypatch)
    with _open_files_limit(ext.MAX_PARTITIONS + 16):
        ext.first_occurrences(paths, str(tmp_path / "out"), str(tmp_path / "w"), 1)
    assert np.fromfile(tmp_path / "out", dtype="<i8").tolist() == expected


def test_too_many_open_files_is_one_line_and_leaks_none(tmp_path, monkeypatch):
    import tinylm.webdata.external as ext
    from tinylm.errors import TinyLMError

    paths, _ = _keys_for_256_partitions(tmp_path, monkeypatch)
    with _open_files_limit(100):
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(TinyLMError, match="too many open files") as e:
            ext.first_occurrences(paths, str(tmp_path / "out"), str(tmp_path / "w"), 1)
        assert len(os.listdir("/proc/self/fd")) == before  # the partitions opened: closed
    assert "ulimit -n" in str(e.value) and "--memory-mb" in str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "w").exists()


def test_a_full_disk_is_one_line(tmp_path, monkeypatch):
    import builtins

    import tinylm.webdata.external as ext
    from tinylm.errors import TinyLMError

    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (writes fail with ENOSPC)")
    paths, _ = _keys_for_256_partitions(tmp_path, monkeypatch)
    monkeypatch.setattr(ext, "open", lambda path, mode="r", **kw: builtins.open(
        "/dev/full" if "w" in mode else path, mode, **kw), raising=False)
    with pytest.raises(TinyLMError, match="no space left") as e:
        ext.first_occurrences(paths, str(tmp_path / "out"), str(tmp_path / "w"), 1)
    assert "free disk" in str(e.value) and "\n" not in str(e.value)


def spanny_corpus(tmp_path, docs=120):
    """Pages of sentences from a small pool, so three-sentence spans repeat often."""
    rng = np.random.default_rng(11)
    pool = [f"Sentence number {i} talks about the {w} of the town." for i, w in
            enumerate(["river", "mill", "bridge", "church", "market", "school"] * 5)]
    texts = []
    for d in range(docs):
        picks = rng.choice(len(pool), size=int(rng.integers(3, 14)))
        lines = [" ".join(pool[j] for j in picks[k:k + 3]) for k in range(0, len(picks), 3)]
        texts.append("\n".join(lines) + ("\nok" if d % 7 == 0 else ""))
    inputs = tmp_path / "in"
    inputs.mkdir()
    for s in range(3):
        write_jsonl(inputs / f"part-{s}.json.gz", texts[s::3])
    return inputs


def test_span_dedup_on_disk_equals_the_in_memory_set(tmp_path, monkeypatch):
    """A budget so small the span hashes go through dozens of partition files: the
    same pages as the in-memory ``HashSet64`` pipeline over the corpus in order."""
    import tinylm.webdata.external as ext
    from tinylm.webdata.readers import read_documents

    inputs = spanny_corpus(tmp_path)
    config = CleanConfig(filters=("c4_terminal_punct", "c4_min_sentences", "c4_span_dedup"),
                         min_sentences=3)
    pipeline, expected = build_pipeline(config), []  # the oracle: all in memory
    for s in range(3):
        for doc in read_documents(str(inputs / f"part-{s}.json.gz")):
            lines = page_lines(doc.text)
            kept = pipeline.run([lines])[0] if lines else None
            if kept:
                expected.append("\n".join(kept))
    assert pipeline.removed["c4_span_dedup"].lines > 0 and len(pipeline.span.seen) > 200

    monkeypatch.setattr(ext, "MIN_MEMORY", 16 * ext.BYTES_PER_ENTRY)
    totals = clean_corpus([inputs], str(tmp_path / "out"), config, show_progress=False,
                          memory_bytes=1)
    got = [d["text"] for s in range(3) for d in read_jsonl(tmp_path / "out" /
                                                             f"part-{s}.jsonl.gz")]
    assert got == expected
    assert totals["span_hashes"] == len(pipeline.span.seen)
    removed = {k: v for k, v in totals["removed"].items()}
    assert removed == {k: {"documents": r.documents, "lines": r.lines, "chars": r.chars}
                       for k, r in pipeline.removed.items()}
    assert sorted(os.listdir(tmp_path / "out" / ".clean")) == sorted(
        [f"part-{s}{x}" for s in range(3) for x in (".json", ".filtered.json", ".spans.u64")]
        + ["spans.first.i64"])  # the pages files and partition files are gone

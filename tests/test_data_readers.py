"""tinylm.webdata.readers / wikitext: streamed documents from files the tests write."""

import bz2
import gzip
import io
import json
import random
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinylm.errors import TinyLMError
from tinylm.webdata import readers
from tinylm.webdata.readers import (ReadStats, WebDataError, c4_shard_info, detect_format,
                                    expand_inputs, iter_corpus, output_stem, read_documents)
from tinylm.webdata.wikitext import strip_markup


def read(path, **options):
    stats = ReadStats(str(path))
    docs = list(read_documents(path, stats=stats, **options))
    return docs, stats


def random_records(n, seed=0):
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    return [{"text": " ".join(rng.choice(words) + str(rng.randrange(10**6))
                              for _ in range(rng.randrange(5, 40))),
             "url": f"https://example.com/{i}", "timestamp": "2019-04-25T12:57:54Z"}
            for i in range(n)]


def jsonl_bytes(records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


# ---------------------------------------------------------------------------- names


def test_formats_and_c4_names():
    assert detect_format("c4-train.00000-of-01024.json.gz") == "jsonl"
    assert detect_format("a.jsonl.zst") == "jsonl"
    assert detect_format("CC-MAIN-2019-18-00000.warc.wet.gz") == "wet"
    assert detect_format("enwiki-pages-articles.xml.bz2") == "wiki"
    assert detect_format("notes.txt") == detect_format("README") == "text"
    assert detect_format("table.parquet") is None
    assert c4_shard_info("c4-train.00017-of-01024.json.gz") == {
        "split": "train", "index": 17, "total": 1024}
    assert c4_shard_info("c4-validation.00000-of-00008.json") == {
        "split": "validation", "index": 0, "total": 8}
    assert c4_shard_info("c4-train.17-of-1024.json.gz") is None
    assert output_stem("c4-train.00017-of-01024.json.gz") == "c4-train.00017-of-01024"
    assert output_stem("CC-MAIN-x-00001.warc.wet.gz") == "CC-MAIN-x-00001"


def test_expand_inputs_sorts_folders_and_skips_hidden(tmp_path):
    for name in ["c4-train.00002-of-01024.json.gz", "c4-train.00000-of-01024.json.gz",
                 ".hidden.jsonl", "skip.parquet"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("x")
    names = [p.rsplit("/", 1)[-1] for p in expand_inputs([tmp_path])]
    assert names == ["c4-train.00000-of-01024.json.gz", "c4-train.00002-of-01024.json.gz",
                     "b.txt"]
    with pytest.raises(WebDataError, match="no such file"):
        expand_inputs([tmp_path / "missing.jsonl"])
    with pytest.raises(TinyLMError, match="cannot tell the format"):
        list(read_documents(tmp_path / "skip.parquet"))


# ---------------------------------------------------------------------------- JSONL


def test_c4_shard_streams_text_and_metadata(tmp_path):
    records = random_records(50)
    path = tmp_path / "c4-train.00000-of-01024.json.gz"
    path.write_bytes(gzip.compress(jsonl_bytes(records)))
    docs, stats = read(path)
    assert [d.text for d in docs] == [r["text"] for r in records]
    assert docs[3].meta == {"url": "https://example.com/3",
                            "timestamp": "2019-04-25T12:57:54Z"}
    assert docs[3].id == "c4-train.00000-of-01024.json.gz:4"
    assert docs[3].to_record() == records[3]
    assert stats.documents == 50 and stats.bad == {}


def test_bad_jsonl_records_are_counted_and_reading_goes_on(tmp_path):
    good = random_records(3)
    body = (jsonl_bytes(good[:1]) + b"{not json\n" + b'{"text": "caf\xe9"}\n' + b"[1, 2]\n"
            + b'{"title": "no text"}\n' + b'{"text": 5}\n' + b"\n" + jsonl_bytes(good[1:]))
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(body)
    docs, stats = read(path)
    assert [d.text for d in docs] == [r["text"] for r in good]
    assert [d.id for d in docs] == ["mixed.jsonl:1", "mixed.jsonl:8", "mixed.jsonl:9"]
    assert stats.bad == {"invalid_json": 1, "bad_utf8": 1, "not_an_object": 1,
                         "missing_text": 2}
    docs, stats = read(path, text_field="title")
    assert [d.text for d in docs] == ["no text"]


def test_truncated_and_corrupt_gzip_keep_what_was_read_when_asked(tmp_path):
    records = random_records(4000, seed=1)
    blob = gzip.compress(jsonl_bytes(records))
    (tmp_path / "a.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    corrupt = bytearray(blob)
    corrupt[len(blob) // 2] ^= 0xFF
    (tmp_path / "b.jsonl.gz").write_bytes(bytes(corrupt))
    (tmp_path / "c.jsonl.gz").write_bytes(blob + blob)  # two gzip members: both read
    stats = []
    docs = list(iter_corpus([tmp_path], stats=stats, keep_damaged=True))
    truncated, corrupted, whole = stats
    assert truncated.bad == {"truncated_stream": 1}
    assert 1000 < truncated.documents < 3000  # the complete lines before the cut
    assert corrupted.bad_total >= 1 and corrupted.documents < 4000
    assert whole.documents == 8000 and whole.bad == {}
    assert len(docs) == sum(s.documents for s in stats)
    texts = [d.text for d in docs[:truncated.documents]]
    assert texts == [r["text"] for r in records[:truncated.documents]]


def test_bz2_and_zstd(tmp_path):
    records = random_records(2000, seed=2)
    (tmp_path / "a.jsonl.bz2").write_bytes(bz2.compress(jsonl_bytes(records)))
    docs, stats = read(tmp_path / "a.jsonl.bz2")
    assert len(docs) == 2000 and stats.bad == {}
    zstandard = pytest.importorskip("zstandard")
    blob = zstandard.ZstdCompressor().compress(jsonl_bytes(records))
    (tmp_path / "a.jsonl.zst").write_bytes(blob + blob)  # two frames
    docs, stats = read(tmp_path / "a.jsonl.zst")
    assert [d.text for d in docs] == [r["text"] for r in records] * 2
    (tmp_path / "b.jsonl.zst").write_bytes(blob[: len(blob) * 3 // 4])
    docs, stats = read(tmp_path / "b.jsonl.zst", keep_damaged=True)
    assert stats.bad == {"truncated_stream": 1} and len(docs) < 2000
    assert [d.text for d in docs] == [r["text"] for r in records[: len(docs)]]


def test_zst_without_zstandard_is_one_clear_error(tmp_path, monkeypatch):
    (tmp_path / "a.jsonl.zst").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(WebDataError, match=r"pip install 'tinylm\[data\]'"):
        list(read_documents(tmp_path / "a.jsonl.zst"))


@given(st.lists(st.fixed_dictionaries({"text": st.text(), "n": st.integers()}), max_size=8))
@settings(max_examples=10)
def test_jsonl_round_trip(tmp_path_factory, records):
    path = tmp_path_factory.mktemp("rt") / "r.jsonl"
    path.write_bytes(jsonl_bytes(records))
    docs, stats = read(path)
    assert [d.to_record() for d in docs] == records and stats.bad == {}


# ----------------------------------------------------------------------------- text


def test_text_units(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("\ufeffFirst line.\r\nsecond line\n\n\nThird block.\n\xff\xfe\nlast\n"
                     .encode("utf-8").replace("\xff\xfe".encode(), b"\xff\xfe"))
    docs, stats = read(path)
    assert [d.text for d in docs] == ["First line.\nsecond line\n\n\nThird block.\nlast"]
    assert stats.bad == {"bad_utf8": 1}
    docs, _ = read(path, text_unit="blank")
    assert [d.text for d in docs] == ["First line.\nsecond line", "Third block.\nlast"]
    docs, _ = read(path, text_unit="line")
    assert [d.text for d in docs] == ["First line.", "second line", "Third block.", "last"]
    assert [d.id for d in docs] == ["t.txt:1", "t.txt:2", "t.txt:3", "t.txt:4"]


def test_a_long_text_file_is_cut_at_line_boundaries(tmp_path):
    lines = [f"line {i} " + "x" * 50 + "\n" for i in range(1000)]
    (tmp_path / "big.txt").write_text("".join(lines))
    docs, stats = read(tmp_path / "big.txt", max_chars=10_000)
    assert all(len(d.text) <= 10_000 for d in docs) and len(docs) > 5
    assert "\n".join(d.text for d in docs) + "\n" == "".join(lines)
    assert stats.skipped["long_file_cut"] == len(docs) - 1


# ------------------------------------------------------------------------------ WET


def warc(kind, body: bytes, url="https://a.example/", length=None, version=b"WARC/1.0"):
    headers = (f"WARC-Type: {kind}\r\nWARC-Target-URI: {url}\r\n"
               f"WARC-Date: 2019-04-18T10:00:00Z\r\nWARC-Record-ID: <urn:uuid:{url}>\r\n"
               f"WARC-Identified-Content-Language: eng\r\nContent-Type: text/plain\r\n")
    if length != "none":
        headers += f"Content-Length: {len(body) if length is None else length}\r\n"
    return version + b"\r\n" + headers.encode() + b"\r\n" + body + b"\r\n\r\n"


def test_wet_conversion_records(tmp_path):
    data = (warc("warcinfo", b"software: Nutch") + warc("conversion", "Une page. é\nTwo.".encode(),
                                                        "https://fr.example/")
            + warc("conversion", b"Second page.", "https://b.example/"))
    (tmp_path / "CC-MAIN-1-00000.warc.wet.gz").write_bytes(gzip.compress(data))
    docs, stats = read(tmp_path / "CC-MAIN-1-00000.warc.wet.gz")
    assert [d.text for d in docs] == ["Une page. é\nTwo.", "Second page."]
    assert docs[0].meta == {"url": "https://fr.example/", "timestamp": "2019-04-18T10:00:00Z",
                            "warc_record_id": "<urn:uuid:https://fr.example/>",
                            "language": "eng"}
    assert stats.skipped == {"warc_warcinfo": 1} and stats.bad == {}


def test_wet_records_with_bad_lengths_are_counted_and_skipped(tmp_path):
    data = (warc("conversion", b"Good one.", "https://1/")
            + warc("conversion", b"Length too short here.", "https://2/", length=4)
            + warc("conversion", b"Good two.", "https://3/")
            + warc("conversion", b"No length.", "https://4/", length="none")
            + b"garbage between records\r\n"
            + warc("conversion", b"Length too long.", "https://5/", length=60)
            + warc("conversion", b"Good three.", "https://6/")
            + warc("conversion", b"bad \xff utf-8", "https://7/")
            + warc("conversion", b"Good four.", "https://8/")
            + warc("conversion", b"Cut off at the end", "https://9/", length=500))
    (tmp_path / "x.wet").write_bytes(data)
    docs, stats = read(tmp_path / "x.wet")
    assert [d.text for d in docs] == ["Good one.", "Good two.", "Good three.", "Good four."]
    # short, no length (the skip to the next WARC/ line passes the garbage), long, cut
    assert stats.bad == {"bad_warc_record": 4, "bad_utf8": 1}


# ----------------------------------------------------------------------------- wiki


def test_wikitext_markup_subset():
    page = ("'''Paris''' is the [[capital city|capital]] of [[France]].<ref name=a>Atlas, "
            "p. 3</ref> It has [[bus]]es.<ref name=b/>{{citation needed|date={{date}}}}\n"
            "<!-- a hidden\ncomment -->\n== History ==\n"
            "[[File:Paris.jpg|thumb|The [[Seine]] at night]]\n"
            "{| class=\"wikitable\"\n|-\n| a || {|\n|nested\n|}\n|}\n"
            "See [https://paris.fr the city site] or [https://x.org].\n\n\n\n"
            "[[Category:Capitals]]\n''Italic'' and '''''both'''''.")
    assert strip_markup(page) == (
        "Paris is the capital of France. It has buses.\n\nHistory\n\n\n"
        "See the city site or .\n\nItalic and both.").replace("\n\n\n", "\n\n")


def wiki_xml(pages, tail="</mediawiki>"):
    redirect = '<redirect title="X"/>'
    body = "".join(
        f"<page><title>{t}</title><ns>{ns}</ns><id>{i}</id>{redirect if r else ''}"
        f"<revision><id>9</id><text xml:space=\"preserve\">{text}</text></revision></page>"
        for i, (t, ns, r, text) in enumerate(pages, 1))
    return ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">'
            "<siteinfo><sitename>Wikipedia</sitename></siteinfo>" + body + tail)


def test_wiki_dump_articles(tmp_path):
    pages = [("Paris", 0, False, "'''Paris''' is a [[city]]."),
             ("Lutetia", 0, True, "#REDIRECT [[Paris]]"),
             ("Talk:Paris", 1, False, "A talk page."),
             ("Empty", 0, False, "{{stub}}")]
    pages += [(f"Page {i}", 0, False, f"Text of page {i}.") for i in range(300)]
    (tmp_path / "w.xml.bz2").write_bytes(bz2.compress(wiki_xml(pages).encode()))
    docs, stats = read(tmp_path / "w.xml.bz2")
    assert docs[0].text == "Paris is a city." and docs[0].meta == {"title": "Paris",
                                                                   "page_id": "1"}
    assert len(docs) == 301 and docs[-1].text == "Text of page 299."
    assert stats.skipped == {"wiki_redirect": 1, "wiki_other_namespace": 1, "wiki_empty": 1}
    raw, _ = read(tmp_path / "w.xml.bz2", strip_wiki_markup=False)
    assert raw[0].text == "'''Paris''' is a [[city]]."


def test_truncated_wiki_dump_counts_bad_xml(tmp_path):
    xml = wiki_xml([("A", 0, False, "First."), ("B", 0, False, "Second.")], tail="")
    (tmp_path / "w.xml").write_text(xml + "<page><title>C</title><ns>0</ns><rev")
    docs, stats = read(tmp_path / "w.xml")
    assert [d.text for d in docs] == ["First.", "Second."] and stats.bad == {"bad_xml": 1}


def test_unreadable_file_is_an_error_or_counted_when_asked(tmp_path, monkeypatch):
    def refuse(path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(readers, "open_binary", refuse)
    docs, stats = read(tmp_path / "a.jsonl", keep_damaged=True)
    assert docs == [] and stats.bad == {"unreadable": 1}
    with pytest.raises(readers.WebDataError, match="cannot read .*a.jsonl: Permission denied"):
        read(tmp_path / "a.jsonl")


# ------------------------------------------- damage and padding after complete members


THREE = random_records(3, seed=7)


def zstd_compress(data: bytes) -> bytes:
    return pytest.importorskip("zstandard").ZstdCompressor().compress(data)


COMPRESS = {"gz": gzip.compress, "bz2": bz2.compress, "zst": zstd_compress}
# what follows the complete members: bytes the format's own tool refuses (gzip -d: "unknown
# method"; bzip2 -d: "data integrity error" for what starts as a stream; zstd -d: any)
DAMAGE = {"gz": b"\x1f\x8bGARBAGE", "bz2": b"BZh9GARBAGEGARBAGE", "zst": b"\x1f\x8bGARBAGE"}


def hex_records(n, seed):
    """Records whose text barely compresses, so their members pass 64 KiB chunks."""
    rng = random.Random(seed)
    return [{"text": rng.randbytes(60).hex()} for _ in range(n)]


@pytest.mark.parametrize("ext", ["gz", "bz2", "zst"])
def test_damage_after_complete_members_in_the_same_chunk_keeps_them(tmp_path, ext):
    path = tmp_path / f"d.jsonl.{ext}"
    path.write_bytes(COMPRESS[ext](jsonl_bytes(THREE)) + DAMAGE[ext])
    docs, stats = read(path, keep_damaged=True)
    assert [d.text for d in docs] == [r["text"] for r in THREE]
    assert stats.documents == 3 and stats.bad == {"truncated_stream": 1}
    with pytest.raises(WebDataError, match=r"d\.jsonl\.\w+ is corrupt: .*after 3 documents"):
        read(path)


@pytest.mark.parametrize("ext", ["gz", "bz2", "zst"])
@pytest.mark.parametrize("members", ["one", "many"])
def test_damage_after_a_chunk_boundary_keeps_every_document_before_it(tmp_path, ext,
                                                                      members):
    records = hex_records(3000, seed=3)  # > 128 KiB compressed
    compress = COMPRESS[ext]
    if members == "one":
        blob = compress(jsonl_bytes(records))
    else:  # a member per 10 records: the chunk that breaks also holds complete members
        blob = b"".join(compress(jsonl_bytes(records[i:i + 10]))
                        for i in range(0, len(records), 10))
    assert len(blob) > 1 << 17
    path = tmp_path / f"d.jsonl.{ext}"
    path.write_bytes(blob + DAMAGE[ext])
    docs, stats = read(path, keep_damaged=True)
    assert [d.text for d in docs] == [r["text"] for r in records]
    assert stats.bad == {"truncated_stream": 1}
    with pytest.raises(WebDataError, match=r"is corrupt: .*after 3000 documents"):
        read(path)


@pytest.mark.parametrize("big", [False, True])
def test_gzip_zero_padding_is_the_end_of_the_stream_as_gzip_reads_it(tmp_path, big):
    records = hex_records(1500, seed=4) if big else THREE
    blob = gzip.compress(jsonl_bytes(records))
    # padding that straddles a 64 KiB chunk boundary when the member is big
    pad = (-len(blob)) % (1 << 16) + 700 if big else 512
    data = blob + b"\0" * pad
    assert gzip.decompress(data) == jsonl_bytes(records)  # the oracle
    (tmp_path / "pad.jsonl.gz").write_bytes(data)
    docs, stats = read(tmp_path / "pad.jsonl.gz")
    assert [d.text for d in docs] == [r["text"] for r in records] and stats.bad == {}
    # zeros between members are skipped, as Python's gzip module does
    (tmp_path / "two.jsonl.gz").write_bytes(data + blob + b"\0" * 3)
    docs, stats = read(tmp_path / "two.jsonl.gz")
    assert [d.text for d in docs] == [r["text"] for r in records] * 2 and stats.bad == {}
    # zeros, then bytes that are no gzip member: damage, after the documents
    (tmp_path / "junk.jsonl.gz").write_bytes(data + b"xx")
    with pytest.raises(WebDataError, match=rf"is corrupt: .*after {len(records)} documents"):
        read(tmp_path / "junk.jsonl.gz")


@pytest.mark.parametrize("tail", [b"\0" * 512, b"\x1f\x8bGARBAGE", b"BZh0", b"xBZh9"])
def test_bz2_trailing_garbage_is_ignored_as_bzip2_does(tmp_path, tail):
    data = bz2.compress(jsonl_bytes(THREE)) + tail
    assert bz2.decompress(data) == jsonl_bytes(THREE)  # the oracle (bzip2 -d agrees)
    (tmp_path / "t.jsonl.bz2").write_bytes(data)
    docs, stats = read(tmp_path / "t.jsonl.bz2")
    assert [d.text for d in docs] == [r["text"] for r in THREE] and stats.bad == {}


@pytest.mark.parametrize("tail", [b"B", b"BZ", b"BZh", b"BZh9"])
def test_bz2_cut_in_the_next_stream_header_is_truncated(tmp_path, tail):
    path = tmp_path / "t.jsonl.bz2"
    path.write_bytes(bz2.compress(jsonl_bytes(THREE)) + tail)
    with pytest.raises(WebDataError, match=r"is truncated: .*after 3 documents"):
        read(path)


def test_zstd_trailing_zeros_are_damage_as_zstd_reads_them(tmp_path):
    path = tmp_path / "t.jsonl.zst"
    path.write_bytes(zstd_compress(jsonl_bytes(THREE)) + b"\0" * 512)
    docs, stats = read(path, keep_damaged=True)
    assert len(docs) == 3 and stats.bad == {"truncated_stream": 1}


class _FailingRaw(io.RawIOBase):
    """A raw file that gives ``data`` and then fails with EIO."""

    def __init__(self, data):
        self.data = data

    def readable(self):
        return True

    def readinto(self, buffer):
        if not self.data:
            raise OSError(5, "Input/output error")
        n = min(len(buffer), len(self.data))
        buffer[:n], self.data = self.data[:n], self.data[n:]
        return n


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz"])
def test_an_io_error_while_reading_names_it_not_a_broken_stream(tmp_path, monkeypatch, name):
    body = jsonl_bytes(THREE)
    data = gzip.compress(body) if name.endswith(".gz") else body
    def failing_open(path, mode="r", buffering=-1):
        return _FailingRaw(data) if buffering == 0 else io.BufferedReader(_FailingRaw(data))

    monkeypatch.setattr(readers, "open", failing_open, raising=False)  # shadows the builtin
    path = tmp_path / name
    with pytest.raises(WebDataError) as info:
        read(path)
    message = str(info.value)
    assert f"cannot read {path}: Input/output error (after 3 documents)" in message
    assert "decompress" not in message and "corrupt" not in message
    docs, stats = read(path, keep_damaged=True)
    assert [d.text for d in docs] == [r["text"] for r in THREE]
    assert stats.bad == {"unreadable": 1}

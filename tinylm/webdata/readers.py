"""Streaming readers: files of web text -> ``Document`` records, one at a time.

    stats = ReadStats("c4-train.00000-of-01024.json.gz")
    for doc in read_documents(stats.path, stats=stats):       # never the whole file
        doc.text        # str
        doc.meta        # the record's other fields: {"url": ..., "timestamp": ...}
        doc.id          # "c4-train.00000-of-01024.json.gz:17" (file name : record number)
    stats.documents, stats.bad     # 356_317, {"invalid_json": 2, "truncated_stream": 1}

Formats (``detect_format`` reads them from the name; ``format=`` overrides):

- ``jsonl``: one JSON object per line (``.jsonl``, ``.json``, ``.ndjson``; C4's shards are
  ``c4-train.NNNNN-of-01024.json.gz``). The text is under ``text_field`` ("text"); every
  other field is kept in ``meta`` (C4: ``url``, ``timestamp``). Blank lines are skipped.
- ``text``: UTF-8 plain text (``.txt``, ``.text``, ``.md``, no suffix). ``text_unit``
  says what a document is: "file" (the whole file, as ``tinylm/data.py`` reads it, but cut
  at a line boundary every ``max_chars`` characters so memory stays bounded), "blank"
  (blocks separated by blank lines) or "line". A leading byte-order mark is dropped.
- ``wet``: Common Crawl WET files (``*.warc.wet``, ``.wet``): WARC/1.0 records framed by
  their ``Content-Length``; the ``conversion`` records are the documents, with ``url``
  (WARC-Target-URI), ``timestamp`` (WARC-Date), ``warc_record_id`` and, where the file
  has it, ``language`` (WARC-Identified-Content-Language) in ``meta``.
- ``wiki``: a MediaWiki XML export (``.xml``; Wikipedia's ``pages-articles`` dumps),
  streamed with ``xml.etree.ElementTree.iterparse`` and each ``<page>`` cleared once read.
  Articles (namespace 0, not redirects) become documents with ``title`` and ``page_id``;
  ``tinylm.webdata.wikitext.strip_markup`` removes the stated subset of wikitext.

Each may be compressed: ``.gz`` (gzip), ``.bz2`` (bz2; Wikipedia's dumps) from the
standard library, ``.zst`` / ``.zstd`` with the ``zstandard`` package
(``pip install 'tinylm[data]'``).

Concatenated members/frames are all read. What follows a complete one is judged as the
format's own tool does: for gzip, zero bytes are padding, skipped (``gzip -d`` ignores
trailing zeros; Python's ``gzip`` also reads a member after them); for bz2, bytes that do
not start another stream ("BZh1".."BZh9") are trailing garbage, ignored (``bzip2 -d`` and
Python's ``bz2`` do); for zstd, anything that is not a frame is damage (``zstd -d``).

Bad records never stop a run: each is counted in ``ReadStats.bad`` under its reason
(``BAD_REASONS``) and reading goes on with the next record. A damaged file is another
matter: a truncated or corrupt gzip/zstd/bz2 stream (trailing bytes that are no member,
by the rules above, included), or a file that cannot be opened or read, is a
``WebDataError`` naming it and the documents read before the damage (a cut download read
as a short file, exit 0, was silently wrong), unless ``keep_damaged=True``: then it is
counted ("truncated_stream", "unreadable") and the documents before the damage are kept
(every complete line before it; of the damaged member itself, what its 64 KiB of input
around the damage decompressed to may be lost). XML that stops parsing ends
that file, keeping what was read, and is counted as "bad_xml". Records that are fine but
are not documents (a WET file's ``warcinfo`` record, a wiki redirect) are counted in
``ReadStats.skipped``.
"""

from __future__ import annotations

import bz2
import io
import json
import os
import re
import sys
import zlib
from dataclasses import dataclass, field

from tinylm.errors import TinyLMError

FORMATS = ("jsonl", "text", "wet", "wiki")
TEXT_UNITS = ("file", "blank", "line")
COMPRESSED = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".zstd": "zstd"}
SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".txt": "text",
            ".text": "text", ".md": "text", "": "text", ".wet": "wet", ".xml": "wiki"}
BAD_REASONS = {
    "invalid_json": "a JSONL line that is not JSON",
    "not_an_object": "a JSONL line that is JSON but not an object",
    "missing_text": "a JSONL object without a string under the text field",
    "bad_utf8": "a record (JSONL line, text line, WET record) that is not valid UTF-8",
    "truncated_stream": "a gzip/bz2/zstd stream that ends early or is corrupt (file ends)",
    "bad_warc_record": "a WARC record without a version line, a Content-Length, or whose "
                       "Content-Length does not frame it (skipped to the next WARC/ line)",
    "bad_xml": "XML that stops parsing (the file ends there)",
    "unreadable": "a file that cannot be opened or read (an I/O error; the file ends)",
}
C4_SHARD = re.compile(r"^c4-(?P<split>[A-Za-z]+)\.(?P<index>\d{5})-of-(?P<total>\d{5})"
                      r"\.json(?:\.gz)?$")
MAX_RECORD_BYTES = 1 << 28  # a WARC Content-Length above 256 MiB is taken as corrupt
DEFAULT_MAX_CHARS = 1 << 22  # text_unit="file": a document is cut every ~4M characters
STATS_SUFFIX = ".stats.json"  # a stage's statistics (clean.stats.json): never an input


class WebDataError(TinyLMError, ValueError):
    """Input files that are missing or whose format cannot be told; options that clash."""


@dataclass
class Document:
    """One document: its ``text``, the record's other fields (``meta``), and ``id``,
    "<file name>:<record number>" (1-based; the line for JSONL), stable across runs."""

    text: str
    meta: dict = field(default_factory=dict)
    id: str = ""

    def to_record(self, text_field: str = "text") -> dict:
        """The JSON object a stage writes: the text first, then the metadata."""
        record = {text_field: self.text}
        record.update((k, v) for k, v in self.meta.items() if k != text_field)
        return record


@dataclass
class ReadStats:
    """What reading one file found: documents, decompressed bytes of the records read,
    bad records by reason (``BAD_REASONS``), and fine records that are not documents."""

    path: str
    documents: int = 0
    bytes: int = 0
    bad: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)

    def count_bad(self, reason: str) -> None:
        self.bad[reason] = self.bad.get(reason, 0) + 1

    def count_skipped(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    @property
    def bad_total(self) -> int:
        return sum(self.bad.values())

    def to_dict(self) -> dict:
        return {"path": self.path, "documents": self.documents, "bytes": self.bytes,
                "bad": dict(sorted(self.bad.items())),
                "skipped": dict(sorted(self.skipped.items()))}


# ----------------------------------------------------------------------------- files


def _split_name(path) -> tuple:
    """(stem without compression and format suffixes, format suffix, compression)."""
    name = os.path.basename(os.fspath(path))
    stem, ext = os.path.splitext(name)
    compression = COMPRESSED.get(ext.lower())
    if compression:
        name = stem
    stem, ext = os.path.splitext(name)
    ext = ext.lower()
    if ext == ".wet" and stem.lower().endswith(".warc"):
        stem = stem[:-5]
    if ext not in SUFFIXES:  # "notes.v2" is a text file named with a dot, not format "v2"
        return name, "", compression
    return stem, ext, compression


def detect_format(path) -> str | None:
    """The format ("jsonl", "text", "wet", "wiki") the file's name says, or None."""
    name, ext, _ = _split_name(path)
    if not ext and "." in name:
        return None  # an unknown suffix: a .parquet, .csv, .pdf ... is not text
    return SUFFIXES.get(ext)


def output_stem(path) -> str:
    """The input's name without its compression and format suffixes: the name its
    outputs in every stage are built from (c4-train.00000-of-01024.json.gz ->
    c4-train.00000-of-01024)."""
    return _split_name(path)[0]


def c4_shard_info(path) -> dict | None:
    """``{"split": "train", "index": 0, "total": 1024}`` for a name in C4's shard scheme
    (``c4-train.00000-of-01024.json.gz``, also ``c4-validation.*``), else None."""
    match = C4_SHARD.match(os.path.basename(os.fspath(path)))
    if not match:
        return None
    return {"split": match["split"], "index": int(match["index"]),
            "total": int(match["total"])}


def expand_inputs(paths) -> list:
    """The files to read, in order: files as given; folders expanded to every file below
    whose format ``detect_format`` knows, sorted by path, hidden entries and a stage's
    ``*.stats.json`` skipped (so a stage's output folder is the next stage's input; C4's
    shard names sort in shard order). A missing path or an empty result is an error."""
    files = []
    for path in paths:
        path = os.fspath(path)
        if os.path.isdir(path):
            found = []
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [os.path.join(root, n) for n in names
                          if not n.startswith(".") and not n.endswith(STATS_SUFFIX)
                          and detect_format(n)]
            files += sorted(found)
        elif os.path.exists(path):
            files.append(path)
        else:
            raise WebDataError(f"no such file or folder: {path}; check the path")
    if not files:
        raise WebDataError(f"no input files in {', '.join(map(str, paths)) or '(nothing)'}; "
                           f"name .jsonl/.json/.txt/.wet/.xml files (optionally .gz/.zst/.bz2)")
    return files


def zstd_module():
    """The ``zstandard`` package, or a WebDataError saying how to install it."""
    try:
        import zstandard
    except ImportError:
        raise WebDataError("reading or writing .zst files needs the zstandard package: "
                           "pip install 'tinylm[data]' (or pip install zstandard)") from None
    return zstandard


class _CorruptStream(OSError):
    """A compressed stream that does not decompress (the decompressor's own message)."""


def _decompress_errors() -> tuple:
    """What a decompressor (zlib's, bz2's, zstandard's) raises for data it cannot read."""
    errors = (zlib.error, OSError)
    zstandard = sys.modules.get("zstandard")
    return errors + (zstandard.ZstdError,) if zstandard is not None else errors


def _after_gzip_member(data: bytes, at_end: bool):
    """Zero bytes after a complete gzip member are padding, skipped (gzip -d ignores
    trailing zeros; Python's gzip module also reads a member after them); anything else
    is read as the next member, so bytes that are none are damage (gzip -d: an error)."""
    data = data.lstrip(b"\0")
    if data:
        return "member", data
    return ("end" if at_end else "wait"), b""


_BZ2_MAGIC = re.compile(rb"B(Z(h[1-9]?)?)?")


def _after_bz2_stream(data: bytes, at_end: bool):
    """After a complete bz2 stream, bytes that do not start another ("BZh1".."BZh9") are
    trailing garbage, ignored, as bzip2 -d and Python's bz2 module do; a next stream is
    read (damage in it, or a cut in its header, is damage, as bzip2 -d says)."""
    if not data:
        return ("end" if at_end else "wait"), b""
    head = data[:4]
    if not _BZ2_MAGIC.fullmatch(head):
        return "end", b""
    return ("member" if len(head) == 4 or at_end else "wait"), data


def _after_frame(data: bytes, at_end: bool):
    """After a complete zstd frame, any bytes are read as the next frame (skippable frames
    included), so trailing zeros or garbage are damage, as zstd -d says."""
    if data:
        return "member", data
    return ("end" if at_end else "wait"), b""


class _Decompressing(io.RawIOBase):
    """A raw stream of the decompressed bytes of ``raw`` (a binary file), through
    decompressors ``make()`` builds (``decompress``, ``eof``, ``unused_data``: zlib's,
    bz2's, zstandard's). Concatenated members/frames are read on; what follows a complete
    member is judged by ``after(data, at_end)`` -> ("member", data) to read on, ("end", _)
    when the stream ends there, ("wait", data) to keep until more is read (the format's
    rules for padding and trailing garbage: ``_after_gzip_member``, ...).

    A stream that breaks raises, but only once every byte decompressed before the break
    was returned: EOFError for one that ends before its last member does (a truncated
    file gives all its complete lines), ``_CorruptStream`` for data that does not
    decompress (the complete members before it, in the same 64 KiB chunk or not, are
    returned first; what the failing call itself decompressed of the damaged member is
    lost with it). An OSError reading ``raw`` is raised as it is."""

    def __init__(self, raw, make, after=_after_frame):
        self.raw, self.make, self.after, self.dec = raw, make, after, make()
        self.pending, self.pos = b"", 0
        self.carry = b""  # bytes after a complete member that ``after`` waits on
        self.error, self.ended, self.started = None, False, False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.pos >= len(self.pending):
            if self.error is not None:
                raise self.error
            if self.ended:
                return 0
            self.pending, self.pos = self._decompress(self.raw.read(1 << 16)), 0
        n = min(len(buffer), len(self.pending) - self.pos)
        buffer[:n] = memoryview(self.pending)[self.pos:self.pos + n]
        self.pos += n
        return n

    def _decompress(self, chunk: bytes) -> bytes:
        """The bytes ``chunk`` (b"": the file's end) decompresses to; a break or the end
        of the stream is noted in ``error`` / ``ended`` for after they are returned."""
        out, data, at_end = [], chunk, not chunk
        while True:
            if self.dec.eof:  # between members: what follows decides
                kind, data = self.after(self.carry + data, at_end)
                self.carry = b""
                if kind == "wait":
                    self.carry = data
                    break
                if kind == "end":
                    self.ended = True
                    break
                self.dec = self.make()
            elif at_end:
                if self.started:
                    self.error = EOFError("compressed stream ended before its end marker")
                self.ended = True
                break
            self.started = True
            try:
                out.append(self.dec.decompress(data))
            except _decompress_errors() as e:
                self.error = _CorruptStream(str(e) or type(e).__name__)
                self.ended = True
                break
            if not self.dec.eof and not at_end:
                break
            data = self.dec.unused_data if self.dec.eof else b""
        return b"".join(out)

    def close(self) -> None:
        self.raw.close()
        super().close()


def _decompressor(compression: str):
    """(make a decompressor, what follows a complete member) for ``compression``."""
    if compression == "gzip":
        return lambda: zlib.decompressobj(16 + zlib.MAX_WBITS), _after_gzip_member
    if compression == "bz2":
        return bz2.BZ2Decompressor, _after_bz2_stream
    zstandard = zstd_module()
    return lambda: zstandard.ZstdDecompressor().decompressobj(), _after_frame


def open_binary(path):
    """``path`` opened for reading as a buffered binary stream, decompressed by its
    suffix (.gz, .bz2, .zst/.zstd); the caller closes it."""
    compression = _split_name(path)[2]
    if compression is None:
        return open(path, "rb", buffering=1 << 20)
    make, after = _decompressor(compression)
    return io.BufferedReader(_Decompressing(open(path, "rb", buffering=0), make, after),
                             buffer_size=1 << 16)


# --------------------------------------------------------------------------- reading


def read_documents(path, format: str | None = None, *, stats: ReadStats | None = None,
                   text_field: str = "text", text_unit: str = "file",
                   max_chars: int = DEFAULT_MAX_CHARS, strip_wiki_markup: bool = True,
                   keep_damaged: bool = False):
    """Yield the ``Document`` records of one file, streamed (see the module docstring).
    ``stats`` (a ``ReadStats``, made if None) counts documents, bytes and bad records as
    they go; read it after the loop. Raises WebDataError for an unknown format, and for
    a file that cannot be opened or whose compressed stream is truncated or corrupt
    (after yielding the documents before the damage) unless ``keep_damaged``."""
    format = format or detect_format(path)
    if format not in FORMATS:
        raise WebDataError(f"cannot tell the format of {path}; pass --format "
                           f"({', '.join(FORMATS)})")
    if text_unit not in TEXT_UNITS:
        raise WebDataError(f"text_unit must be one of {', '.join(TEXT_UNITS)}, "
                           f"not {text_unit!r}")
    stats = stats if stats is not None else ReadStats(os.fspath(path))
    name = os.path.basename(os.fspath(path))
    try:
        stream = open_binary(path)
    except OSError as e:
        if not keep_damaged:
            raise WebDataError(f"cannot read {path}: {e.strerror or e}; check that it is a "
                               f"file you may read, or leave it out of the inputs") from None
        stats.count_bad("unreadable")
        return
    records = {"jsonl": lambda: _jsonl(stream, name, stats, text_field),
               "text": lambda: _text(stream, name, stats, text_unit, max_chars),
               "wet": lambda: _wet(stream, name, stats),
               "wiki": lambda: _wiki(stream, name, stats, strip_wiki_markup)}[format]
    with stream:
        try:
            for doc in records():
                stats.documents += 1
                yield doc
        except (EOFError, OSError) as e:  # _Decompressing's breaks, or a read that fails
            if not keep_damaged:
                raise _damaged(path, e, stats.documents) from None
            stats.count_bad("truncated_stream" if isinstance(e, (EOFError, _CorruptStream))
                            else "unreadable")


def _damaged(path, error, documents: int) -> WebDataError:
    """The error for a file whose reading broke off after ``documents``: a compressed
    stream that ends early or does not decompress, or a read that fails (an I/O error)."""
    kind = _split_name(path)[2] or "compressed"
    after = f"after {documents} document{'' if documents == 1 else 's'}"
    if isinstance(error, EOFError):
        what = f"is truncated: its {kind} stream ends before its end marker ("
    elif isinstance(error, _CorruptStream):
        what = f"is corrupt: its {kind} stream does not decompress ({error}; "
    else:
        return WebDataError(f"cannot read {path}: {error.strerror or error} ("
                            f"{after}); check the disk or the file, or leave "
                            f"it out of the inputs")
    return WebDataError(f"{path} {what}{after}); "
                        f"get a complete copy of it, or leave it out of the inputs")


def iter_corpus(paths, format: str | None = None, *, stats: list | None = None, **options):
    """Yield the documents of every file ``expand_inputs(paths)`` names, in order;
    each file's ``ReadStats`` is appended to ``stats`` (a list) when that file starts.
    ``options`` go to ``read_documents``."""
    for path in expand_inputs(paths):
        file_stats = ReadStats(path)
        if stats is not None:
            stats.append(file_stats)
        yield from read_documents(path, format, stats=file_stats, **options)


def _jsonl(stream, name, stats, text_field):
    for lineno, raw in enumerate(stream, 1):
        stats.bytes += len(raw)
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            stats.count_bad("bad_utf8")
            continue
        try:
            record = json.loads(line)
        except ValueError:
            stats.count_bad("invalid_json")
            continue
        if not isinstance(record, dict):
            stats.count_bad("not_an_object")
            continue
        text = record.pop(text_field, None)
        if not isinstance(text, str):
            stats.count_bad("missing_text")
            continue
        yield Document(text, record, f"{name}:{lineno}")


def _text_lines(stream, stats):
    """The file's lines, decoded, "\\r\\n" -> "\\n", the first line's BOM dropped; a line
    that is not UTF-8 is counted and left out."""
    for lineno, raw in enumerate(stream):
        stats.bytes += len(raw)
        try:
            line = raw.decode("utf-8-sig" if lineno == 0 else "utf-8")
        except UnicodeDecodeError:
            stats.count_bad("bad_utf8")
            continue
        yield line[:-2] + "\n" if line.endswith("\r\n") else line


def _text(stream, name, stats, unit, max_chars):
    """Documents of a plain-text file: the whole file (cut every ``max_chars``), blocks
    between blank lines, or single lines (``unit``)."""
    number, block, size = 0, [], 0
    for line in _text_lines(stream, stats):
        if unit == "line":
            if line.strip():
                number += 1
                yield Document(line.rstrip("\n"), {}, f"{name}:{number}")
            continue
        end = not line.strip() if unit == "blank" else size + len(line) > max_chars > 0
        if end and block:
            if unit == "file":
                stats.count_skipped("long_file_cut")
            number += 1
            yield Document("".join(block).strip("\n"), {}, f"{name}:{number}")
            block, size = [], 0
        if line.strip() or unit == "file":
            block.append(line)
            size += len(line)
    text = "".join(block).strip("\n")
    if text.strip():
        yield Document(text, {}, f"{name}:{number + 1}")


# ---------------------------------------------------------------------- WARC / WET


class _Pushback:
    """A binary stream with ``readline``, ``read`` and ``unread`` (bytes put back in
    front), so a WARC record whose length was wrong can be re-scanned line by line."""

    def __init__(self, stream):
        self.stream, self.buf, self.pos = stream, b"", 0

    def readline(self) -> bytes:
        if self.pos < len(self.buf):
            end = self.buf.find(b"\n", self.pos)
            if end >= 0:
                line, self.pos = self.buf[self.pos:end + 1], end + 1
                return line
            line = self.buf[self.pos:] + self.stream.readline()
            self.buf, self.pos = b"", 0
            return line
        return self.stream.readline()

    def read(self, n: int) -> bytes:
        out = self.buf[self.pos:self.pos + n]
        self.pos += len(out)
        if len(out) < n:
            out += self.stream.read(n - len(out))
        return out

    def unread(self, data: bytes) -> None:
        self.buf, self.pos = data + self.buf[self.pos:], 0


def _warc_headers(lines):
    """The header block after a WARC/ version line, as {lowercased name: value}; None
    when the stream ends before the blank line that closes it."""
    headers = {}
    while True:
        line = lines.readline()
        if not line:
            return None
        if not line.strip():
            return headers
        key, sep, value = line.decode("utf-8", "replace").partition(":")
        if sep:
            headers[key.strip().lower()] = value.strip()


def _resync(lines) -> None:
    """Skip to the next line that starts a WARC record (put back for the caller)."""
    while True:
        line = lines.readline()
        if not line or line.startswith(b"WARC/"):
            lines.unread(line)
            return


def _warc_records(stream, stats):
    """(headers, content bytes) of each well-framed WARC record; the others counted as
    ``bad_warc_record`` and skipped to the next ``WARC/`` line."""
    lines = _Pushback(stream)
    while True:
        line = lines.readline()
        if not line:
            return
        if not line.strip():
            continue
        if not line.startswith(b"WARC/"):
            stats.count_bad("bad_warc_record")
            _resync(lines)
            continue
        headers = _warc_headers(lines)
        if headers is None:
            stats.count_bad("bad_warc_record")
            return
        length = headers.get("content-length", "")
        if not length.isdigit() or int(length) > MAX_RECORD_BYTES:
            stats.count_bad("bad_warc_record")
            _resync(lines)
            continue
        content = lines.read(int(length))
        trailer = lines.read(4)
        if len(content) == int(length) and trailer in (b"", b"\r\n\r\n"):
            stats.bytes += len(content)
            yield headers, content
            continue
        if len(content) == int(length) and trailer[:2] == b"\n\n":  # "\n\n"-framed files
            lines.unread(trailer[2:])
            stats.bytes += len(content)
            yield headers, content
            continue
        stats.count_bad("bad_warc_record")  # the length does not frame the record
        lines.unread(content + trailer)
        _resync(lines)


def _wet(stream, name, stats):
    """The ``conversion`` records of a WET file as documents."""
    for number, (headers, content) in enumerate(_warc_records(stream, stats), 1):
        kind = headers.get("warc-type", "")
        if kind != "conversion":
            stats.count_skipped(f"warc_{kind or 'untyped'}")
            continue
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError:
            stats.count_bad("bad_utf8")
            continue
        meta = {"url": headers.get("warc-target-uri", ""),
                "timestamp": headers.get("warc-date", ""),
                "warc_record_id": headers.get("warc-record-id", "")}
        if "warc-identified-content-language" in headers:
            meta["language"] = headers["warc-identified-content-language"]
        yield Document(text.strip("\r\n"), meta, f"{name}:{number}")


# ------------------------------------------------------------------------ wiki XML


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _page_fields(page) -> dict:
    """title, ns, id, redirect and the revision's text of a ``<page>`` element."""
    fields = {"redirect": False, "text": ""}
    for child in page:
        tag = _local(child.tag)
        if tag in ("title", "ns", "id"):
            fields[tag] = (child.text or "").strip()
        elif tag == "redirect":
            fields["redirect"] = True
        elif tag == "revision":
            for part in child:
                if _local(part.tag) == "text":
                    fields["text"] = part.text or ""
    return fields


def _wiki(stream, name, stats, strip):
    """Articles of a MediaWiki XML export: namespace 0, not redirects, markup stripped.
    Every page is cleared from the tree once read, so memory holds one page."""
    import xml.etree.ElementTree as ET

    from tinylm.webdata.wikitext import strip_markup

    root = None
    try:
        for event, elem in ET.iterparse(stream, events=("start", "end")):
            if root is None:
                root = elem
            if event != "end" or _local(elem.tag) != "page":
                continue
            page = _page_fields(elem)
            root.clear()  # the page and everything before it
            stats.bytes += len(page["text"])
            if page.get("ns", "0") != "0":
                stats.count_skipped("wiki_other_namespace")
            elif page["redirect"]:
                stats.count_skipped("wiki_redirect")
            else:
                text = strip_markup(page["text"]) if strip else page["text"]
                if not text.strip():
                    stats.count_skipped("wiki_empty")
                    continue
                meta = {"title": page.get("title", ""), "page_id": page.get("id", "")}
                yield Document(text, meta, f"{name}:{meta['page_id'] or stats.documents + 1}")
    except ET.ParseError:
        stats.count_bad("bad_xml")

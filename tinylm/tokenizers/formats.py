"""Tokenizer files: tinylm's own plain-text format and the peers' formats.

tinylm's format is versioned plain text, one item per line, with counts so that a
truncated file is caught (and an ``end`` line after the last section)::

    tinylm-tokenizer bpe 1
    pattern "'s|'t|'re|..."
    mode merges
    ...
    tokens 4096
    0 !
    1 "
    ...
    merges 3840
    Ġ t
    ...
    end

The peers' formats, read (R) and written (W):

- Hugging Face ``tokenizer.json`` (RW): a BPE model with a ByteLevel pre-tokenizer (or
  a Split regex followed by a non-regex ByteLevel), or a WordPiece model with the BERT
  normalizer and pre-tokenizer;
- GPT-2 ``vocab.json`` + ``merges.txt`` (RW);
- tiktoken ranks files, ``<base64 of the token's bytes> <rank>`` per line (RW);
- BERT ``vocab.txt``, one token per line, the line number is the id (RW).

Byte-level BPE vocabularies spell each byte as a printable character (GPT-2's
``bytes_to_unicode``: space is ``Ġ``, newline ``Ċ``), so that every token is a
readable string without spaces:

    >>> to_bytelevel(b" hello\\n")
    'ĠhelloĊ'
    >>> from_bytelevel('ĠhelloĊ')
    b' hello\\n'
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path

from tinylm.tokenizers.base import TokenizerFileError, is_token_id, token_id_problem

# ---------------------------------------------------------------------- byte-level alphabet


def _bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes map to
    themselves, the other 68 to U+0100 onwards, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}
# The 256 bytes in the order of their characters: GPT-2's vocab.json order, and the
# order Hugging Face's trainer gives the byte alphabet (it sorts it by character).
BYTE_ORDER = sorted(range(256), key=lambda b: BYTE_TO_CHAR[b])


def to_bytelevel(data: bytes) -> str:
    """The byte-level spelling of ``data`` (one character per byte)."""
    return data.decode("latin-1").translate(BYTE_TO_CHAR)  # byte value == code point


def from_bytelevel(token: str):
    """The bytes a byte-level spelling stands for, or None if it has other characters."""
    try:
        return bytes([CHAR_TO_BYTE[c] for c in token])
    except KeyError:
        return None


# ---------------------------------------------------------------------- reading


def file_error(path, message: str) -> TokenizerFileError:
    return TokenizerFileError(f"{str(path)!r}: {message}")


BOM = b"\xef\xbb\xbf"  # the UTF-8 byte order mark some editors put first


def read_bytes(path, what: str = "tokenizer file") -> bytes:
    """The bytes of ``path``; a missing file, a directory or an unreadable file is a
    ``TokenizerFileError`` (``what``: the file's role, for the message)."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        check_file(path, what)
        raise TokenizerFileError(f"cannot read {what} {str(path)!r}: {e.strerror or e}") from None


def check_file(path, what: str = "tokenizer file") -> None:
    """Raise a ``TokenizerFileError`` if ``path`` is missing or a directory (before a
    long job, so that it fails at once)."""
    if not os.path.exists(path):
        raise TokenizerFileError(f"{what} {str(path)!r} does not exist")
    if os.path.isdir(path):
        raise TokenizerFileError(f"{str(path)!r} is a directory, not a {what}")


def decode_text(data: bytes, path, hint: str) -> str:
    """UTF-8 ``data`` (of the file ``path``) as text without a leading byte order mark,
    as Python's "utf-8-sig" reads it; bytes that are not UTF-8 are a
    ``TokenizerFileError`` naming the line and byte, followed by ``hint``."""
    start = len(BOM) if data.startswith(BOM) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = start + e.start
        line = data[:at].count(b"\n") + 1
        raise file_error(path, f"line {line} is not valid UTF-8 (byte {at}); {hint}") from None


def read_text(path) -> str:
    """A tokenizer file's text (UTF-8, a leading byte order mark dropped)."""
    return decode_text(read_bytes(path), path, "the file is corrupted or is not a tokenizer "
                                               "file")


TEXT_FILE_HINT = "tinylm reads UTF-8 text files (is it a binary file?)"


def read_text_file(path) -> str:
    """A text file to train on or encode (UTF-8, a leading byte order mark dropped)."""
    return decode_text(read_bytes(path, "text file"), path, TEXT_FILE_HINT)


def read_json(path, text: str | None = None):
    text = read_text(path) if text is None else text
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        truncated = " or truncated" if e.pos >= len(text.rstrip()) else ""
        raise file_error(path, f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}; "
                               f"the file is corrupted{truncated}") from None


def sniff(path) -> tuple:
    """``(kind, detail, parsed)``: what a tokenizer file is. Kinds: "tinylm" (detail:
    the tokenizer name), "hf-json" (detail: the model type), "gpt2-vocab", "tiktoken",
    "vocab-txt", "gguf" (a GGUF model file, which holds its tokenizer; only its magic is
    read here); ``parsed`` is the JSON object for the JSON kinds (read once), else None."""
    if _magic(path) == b"GGUF":
        return "gguf", None, None
    data = read_bytes(path)
    if data.startswith(BOM):
        data = data[len(BOM):]
    if not data.strip():
        raise file_error(path, "the file is empty")
    if data.startswith(b"tinylm-tokenizer "):
        first = data.split(b"\n", 1)[0].decode("utf-8", "replace").split()
        if len(first) != 3:
            raise file_error(path, f"line 1 should be 'tinylm-tokenizer NAME VERSION', not "
                                   f"{' '.join(first)!r}; the file is corrupted")
        return "tinylm", first[1], None
    if data.lstrip()[:1] == b"{":
        obj = read_json(path)
        if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
            model = obj["model"]
            kind = model.get("type", "BPE" if "merges" in model else "WordPiece")
            return "hf-json", kind, obj
        if isinstance(obj, dict) and obj and all(isinstance(v, int) for v in obj.values()):
            return "gpt2-vocab", None, obj
        raise file_error(path, "a JSON file that is neither a Hugging Face tokenizer.json "
                               "nor a GPT-2 vocab.json")
    text = read_text(path)
    first = text.split("\n", 1)[0].strip()
    parts = first.split()
    if len(parts) == 2 and parts[1].isdigit() and _is_base64(parts[0]):
        return "tiktoken", None, None
    if first.startswith("#version") or len(parts) == 2:
        raise file_error(path, "this looks like a merges.txt; load the vocab.json beside it "
                               "(from_file(vocab_json, merges=this_file))")
    if "\n[UNK]\n" in f"\n{text}\n".replace("\r\n", "\n"):
        return "vocab-txt", None, None
    raise file_error(path, "unrecognised tokenizer format: expected a tinylm tokenizer file, "
                           "a Hugging Face tokenizer.json, a GPT-2 vocab.json, a tiktoken ranks "
                           "file or a BERT vocab.txt (with an [UNK] line)")


def _magic(path) -> bytes:
    """The first 4 bytes of ``path`` (b"" when it cannot be read: ``read_bytes`` then
    says why)."""
    try:
        with open(path, "rb") as f:
            return f.read(4)
    except OSError:
        return b""


def _is_base64(token: str) -> bool:
    try:
        base64.b64decode(token, validate=True)
        return True
    except (binascii.Error, ValueError):
        return False


def read_gpt2_vocab(path, parsed=None) -> dict:
    """``{token spelling: id}`` from a GPT-2 ``vocab.json`` (``parsed``: its JSON, if
    already read)."""
    vocab = read_json(path) if parsed is None else parsed
    if not isinstance(vocab, dict):
        raise file_error(path, "a vocab.json must be one JSON object mapping token strings to "
                               "integer ids")
    check_vocab_ids(vocab, path, "token")
    return vocab


def check_vocab_ids(vocab: dict, path, what: str) -> None:
    """Raise a ``TokenizerFileError`` naming ``path`` and the first entry of ``{token:
    id}`` whose id is not a token id (``what``: how an entry is named, e.g. "token")."""
    for token, i in vocab.items():
        if not is_token_id(i):
            raise file_error(path, f"{token_id_problem(f'{what} {token[:40]!r}', i)}; the "
                                   f"file is corrupted")


def read_merges_txt(path) -> list:
    """``[(left, right)]`` from a GPT-2 ``merges.txt`` (a ``#version`` line first, optional)."""
    merges = []
    for number, line in enumerate(read_text(path).split("\n"), 1):
        line = line.rstrip("\r")
        if not line or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise file_error(path, f"line {number}: a merge is two tokens separated by one "
                                   f"space, not {line!r}; the file is corrupted")
        merges.append((parts[0], parts[1]))
    return merges


def parse_hf_merges(merges, path) -> list:
    """A tokenizer.json's merges, either ``"a b"`` strings (before tokenizers 0.20) or
    ``["a", "b"]`` pairs, as ``[(a, b)]``."""
    if not isinstance(merges, list):
        raise file_error(path, "model.merges must be a list")
    out = []
    for i, merge in enumerate(merges):
        if isinstance(merge, str):
            parts = merge.split(" ")
        elif isinstance(merge, list):
            parts = merge
        else:
            parts = None
        if not parts or len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
            raise file_error(path, f"model.merges[{i}] is {merge!r}, not a pair of tokens")
        out.append((parts[0], parts[1]))
    return out


def read_tiktoken(path) -> dict:
    """``{token bytes: rank}`` from a tiktoken ranks file."""
    ranks = {}
    for number, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, binascii.Error):
            raise file_error(path, f"line {number}: expected '<base64 token> <rank>', got "
                                   f"{line[:60]!r}; the file is corrupted") from None
        if token in ranks:
            raise file_error(path, f"line {number}: token {token!r} appears twice")
        if not is_token_id(rank):
            raise file_error(path, f"line {number}: {token_id_problem(f'token {token!r}', rank)}")
        ranks[token] = rank
    if not ranks:
        raise file_error(path, "no ranks in the file")
    return ranks


def read_vocab_txt(path) -> list:
    """The tokens of a BERT ``vocab.txt``, in id order (trailing whitespace trimmed, as
    ``tokenizers`` does)."""
    lines = read_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip() for line in lines]


# ---------------------------------------------------------------------- writing


def tiktoken_text(ranks) -> str:
    """A tiktoken ranks file for ``[(token bytes, rank)]``."""
    return "".join(f"{base64.b64encode(token).decode('ascii')} {rank}\n"
                   for token, rank in ranks)


def merges_text(merges) -> str:
    """A GPT-2 ``merges.txt`` for ``[(left spelling, right spelling)]``."""
    return "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)


def hf_added_tokens(special_tokens: dict) -> list:
    return [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for t, i in sorted(special_tokens.items(), key=lambda kv: kv[1])]


def hf_json_text(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False, indent=2) + "\n"


# ---------------------------------------------------------------------- tinylm's format


class PlainWriter:
    """Builds a tinylm tokenizer file: a header, ``key value`` lines, counted sections."""

    def __init__(self, name: str, version: int):
        self.lines = [f"tinylm-tokenizer {name} {version}"]

    def field(self, key: str, value) -> None:
        """``key <value as JSON>`` (strings quoted, so any text survives)."""
        self.lines.append(f"{key} {json.dumps(value, ensure_ascii=False)}")

    def section(self, key: str, rows) -> None:
        rows = list(rows)
        self.lines.append(f"{key} {len(rows)}")
        self.lines.extend(rows)

    def text(self) -> str:
        return "\n".join([*self.lines, "end"]) + "\n"


class PlainReader:
    """Reads what ``PlainWriter`` wrote, with errors that name the file and line."""

    def __init__(self, path, name: str, versions=(1,)):
        self.path = path
        self.lines = read_text(path).split("\n")
        self.i = 0
        header = self.next().split(" ")
        if len(header) != 3 or header[0] != "tinylm-tokenizer":
            self.fail(f"expected the header 'tinylm-tokenizer {name} VERSION'")
        if header[1] != name:
            self.fail(f"this is a {header[1]!r} tokenizer file, not {name!r}; load it with "
                      f"tinylm.tokenizers.from_file")
        if not header[2].isdigit() or int(header[2]) not in versions:
            self.fail(f"format version {header[2]!r} is not one this tinylm reads "
                      f"({', '.join(map(str, versions))}); upgrade tinylm")
        self.version = int(header[2])

    def fail(self, message: str):
        raise file_error(self.path, f"line {self.i}: {message}; the file is corrupted or "
                                    f"truncated (save or train it again)")

    def next(self) -> str:
        if self.i >= len(self.lines) or (self.i == len(self.lines) - 1 and not self.lines[-1]):
            self.i += 1
            self.fail("unexpected end of file")
        line = self.lines[self.i]
        self.i += 1
        return line

    def field(self, key: str):
        line = self.next()
        if not line.startswith(key + " "):
            self.fail(f"expected '{key} ...', got {line[:60]!r}")
        try:
            return json.loads(line[len(key) + 1:])
        except json.JSONDecodeError:
            self.fail(f"the value of {key!r} is not valid")

    def section(self, key: str) -> list:
        line = self.next()
        parts = line.split(" ")
        if len(parts) != 2 or parts[0] != key or not parts[1].isdigit():
            self.fail(f"expected '{key} COUNT', got {line[:60]!r}")
        count = int(parts[1])
        start = self.section_start = self.i
        if start + count > len(self.lines) - 1:
            self.i = len(self.lines)
            self.fail(f"the {key} section announces {count} lines but the file ends after "
                      f"{max(0, len(self.lines) - 1 - start)}")
        self.i += count
        return self.lines[start:start + count]

    def end(self) -> None:
        if self.next() != "end":
            self.fail("expected 'end'")
        if any(line.strip() for line in self.lines[self.i:]):
            self.i += 1
            self.fail("unexpected text after 'end'")

    def check_id(self, offset: int, what: str, i) -> None:
        """Fail on row ``offset`` of the section read last unless ``i`` is a token id."""
        if not is_token_id(i):
            self.row_error(offset, token_id_problem(what, i))

    def row_error(self, offset: int, message: str):
        """Fail on row ``offset`` of the section read last."""
        self.i = self.section_start + offset + 1
        self.fail(message)

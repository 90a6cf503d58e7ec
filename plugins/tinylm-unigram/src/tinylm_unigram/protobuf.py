"""The protobuf wire format, read and written by hand (no protobuf dependency).

A message is a sequence of fields, each a varint key ``(field_number << 3) |
wire_type`` followed by its value: a varint (type 0: ints, bools, enums), 8 bytes
(type 1: double), a length-prefixed byte string (type 2: strings, bytes, nested
messages, packed repeated fields) or 4 bytes (type 5: float). Types 3/4 (groups)
are obsolete and refused.

    >>> fields = parse(b"\\x0a\\x03abc\\x15\\x00\\x00\\x80\\x3f\\x18\\x04")
    >>> fields[1], as_float(fields[2][0]), fields[3]
    ([b'abc'], 1.0, [4])

``parse`` keeps every field (repeated ones in order) as raw values, so a reader takes
what it knows and ``encode`` can write the rest back unchanged.
"""

from __future__ import annotations

import struct

VARINT, FIXED64, BYTES, FIXED32 = 0, 1, 2, 5


class WireError(ValueError):
    """Bytes that are not a well-formed protobuf message."""


def read_varint(data: bytes, pos: int) -> tuple:
    """``(value, next position)`` of the varint at ``data[pos:]``."""
    result = shift = 0
    while True:
        if pos >= len(data):
            raise WireError("the message ends inside a varint")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError("a varint longer than 10 bytes")


def fields_of(data: bytes):
    """Yield ``(field number, wire type, raw value)`` for each field of ``data``:
    an int for varints, bytes for the other types."""
    pos, n = 0, len(data)
    while pos < n:
        key, pos = read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        if wire == VARINT:
            value, pos = read_varint(data, pos)
        elif wire == FIXED64:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == FIXED32:
            value, pos = data[pos:pos + 4], pos + 4
        elif wire == BYTES:
            size, pos = read_varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
        else:
            raise WireError(f"wire type {wire} (field {number}) is not supported")
        if pos > n:
            raise WireError(f"field {number} runs past the end of the message")
        yield number, wire, value


def parse(data: bytes) -> dict:
    """``{field number: [raw values in order]}`` of one message."""
    out: dict = {}
    for number, _, value in fields_of(data):
        out.setdefault(number, []).append(value)
    return out


def as_float(raw: bytes) -> float:
    return struct.unpack("<f", raw)[0]


def as_int32(value: int) -> int:
    """A varint read as a (possibly negative) int32/int64."""
    return value - (1 << 64) if value >= 1 << 63 else value


def as_str(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise WireError(f"a string field is not UTF-8 ({e.reason} at byte {e.start})") from None


# ---------------------------------------------------------------------- writing


def varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # negative int32/int64: ten bytes, two's complement
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def key(number: int, wire: int) -> bytes:
    return varint((number << 3) | wire)


def field_bytes(number: int, value: bytes) -> bytes:
    return key(number, BYTES) + varint(len(value)) + value


def field_varint(number: int, value: int) -> bytes:
    return key(number, VARINT) + varint(int(value))


def field_float(number: int, value: float) -> bytes:
    return key(number, FIXED32) + struct.pack("<f", value)


def encode_raw(number: int, wire: int, value) -> bytes:
    """One field from what ``fields_of`` yielded for it (to copy unknown fields)."""
    if wire == VARINT:
        return field_varint(number, value)
    if wire == BYTES:
        return field_bytes(number, value)
    return key(number, wire) + value

"""SentencePiece ``.model`` files: a ``ModelProto`` message (sentencepiece_model.proto),
read and written with the hand-made wire-format code in ``protobuf``.

The fields tinylm uses (proto2: a field left out takes its default):

- ``pieces`` (1, repeated ``SentencePiece``): ``piece`` (1, string), ``score`` (2,
  float), ``type`` (3, enum: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
  6 byte; default normal);
- ``trainer_spec`` (2): ``model_type`` (3; 1 = unigram), ``vocab_size`` (4),
  ``treat_whitespace_as_suffix`` (24), ``byte_fallback`` (35), ``unk_surface`` (44,
  default " ⁇ "), the ids of <unk>/<s>/</s>/<pad> (40-43);
- ``normalizer_spec`` (3): ``name`` (1), ``precompiled_charsmap`` (2, bytes),
  ``add_dummy_prefix`` (3), ``remove_extra_whitespaces`` (4), ``escape_whitespaces``
  (5), all three true by default.

Every other field (the rest of the trainer spec, self-test data, a denormalizer) is
kept as raw bytes and written back unchanged by ``encode_model``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tinylm_unigram import protobuf as pb

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
TYPE_NAMES = {NORMAL: "normal", UNKNOWN: "unknown", CONTROL: "control",
              USER_DEFINED: "user-defined", UNUSED: "unused", BYTE: "byte"}
UNIGRAM = 1
MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


@dataclass
class SpmModel:
    """What a ``.model`` file says. ``trainer_raw`` / ``normalizer_raw`` /
    ``extra_raw``: the fields read into nothing here, as ``(number, wire, value)``."""

    pieces: list
    scores: list
    types: list
    model_type: int = UNIGRAM
    byte_fallback: bool = False
    treat_whitespace_as_suffix: bool = False
    unk_surface: str = " \u2047 "
    normalizer_name: str = ""
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True
    trainer_raw: list = field(default_factory=list)
    normalizer_raw: list = field(default_factory=list)
    extra_raw: list = field(default_factory=list)


_TRAINER_KNOWN = {3: "model_type", 24: "treat_whitespace_as_suffix", 35: "byte_fallback",
                  44: "unk_surface"}
_NORMALIZER_KNOWN = {1: "normalizer_name", 2: "precompiled_charsmap", 3: "add_dummy_prefix",
                     4: "remove_extra_whitespaces", 5: "escape_whitespaces"}


def decode_model(data: bytes) -> SpmModel:
    """Parse a ``.model`` file's bytes (raises ``protobuf.WireError`` if malformed)."""
    pieces, scores, types = [], [], []
    model = SpmModel(pieces, scores, types)
    for number, wire, value in pb.fields_of(data):
        if number == 1 and wire == pb.BYTES:
            piece, score, kind = "", 0.0, NORMAL
            for n, w, v in pb.fields_of(value):
                if n == 1 and w == pb.BYTES:
                    piece = pb.as_str(v)
                elif n == 2 and w == pb.FIXED32:
                    score = pb.as_float(v)
                elif n == 3 and w == pb.VARINT:
                    kind = v
            pieces.append(piece)
            scores.append(score)
            types.append(kind)
        elif number == 2 and wire == pb.BYTES:
            _read_spec(value, _TRAINER_KNOWN, model, model.trainer_raw)
        elif number == 3 and wire == pb.BYTES:
            _read_spec(value, _NORMALIZER_KNOWN, model, model.normalizer_raw)
        else:
            model.extra_raw.append((number, wire, value))
    return model


def _read_spec(data: bytes, known: dict, model: SpmModel, raw: list) -> None:
    for number, wire, value in pb.fields_of(data):
        name = known.get(number)
        if name is None:
            raw.append((number, wire, value))
            continue
        current = getattr(model, name)
        if isinstance(current, bool):
            value = bool(value)
        elif isinstance(current, str):
            value = pb.as_str(value)
        setattr(model, name, value)


def encode_model(model: SpmModel) -> bytes:
    """The ``.model`` bytes for ``model`` (the inverse of ``decode_model``)."""
    out = bytearray()
    for piece, score, kind in zip(model.pieces, model.scores, model.types):
        body = pb.field_bytes(1, piece.encode("utf-8")) + pb.field_float(2, score)
        if kind != NORMAL:
            body += pb.field_varint(3, kind)
        out += pb.field_bytes(1, body)
    trainer = bytearray()
    trainer += pb.field_varint(3, model.model_type)
    if model.treat_whitespace_as_suffix:
        trainer += pb.field_varint(24, 1)
    if model.byte_fallback:
        trainer += pb.field_varint(35, 1)
    if model.unk_surface != " \u2047 ":
        trainer += pb.field_bytes(44, model.unk_surface.encode("utf-8"))
    for number, wire, value in model.trainer_raw:
        trainer += pb.encode_raw(number, wire, value)
    out += pb.field_bytes(2, bytes(trainer))
    normalizer = bytearray()
    if model.normalizer_name:
        normalizer += pb.field_bytes(1, model.normalizer_name.encode("utf-8"))
    if model.precompiled_charsmap:
        normalizer += pb.field_bytes(2, model.precompiled_charsmap)
    for number, name in ((3, "add_dummy_prefix"), (4, "remove_extra_whitespaces"),
                         (5, "escape_whitespaces")):
        normalizer += pb.field_varint(number, getattr(model, name))
    for number, wire, value in model.normalizer_raw:
        normalizer += pb.encode_raw(number, wire, value)
    out += pb.field_bytes(3, bytes(normalizer))
    for number, wire, value in model.extra_raw:
        out += pb.encode_raw(number, wire, value)
    return bytes(out)


def looks_like_model(data: bytes) -> bool:
    """Whether ``data`` starts like a ``ModelProto``: a first field 1 (a piece) that is
    a whole message holding a UTF-8 piece string and nothing of another wire type
    than the ``SentencePiece`` fields have. Cheap enough to sniff a file with."""
    try:
        number, wire, value = next(pb.fields_of(data[:4096]))
        if number != 1 or wire != pb.BYTES:
            return False
        inner = list(pb.fields_of(value))
    except (pb.WireError, StopIteration):
        return False
    wires = {1: pb.BYTES, 2: pb.FIXED32, 3: pb.VARINT}
    if not inner or inner[0][0] != 1 or any(wires.get(n, w) != w for n, w, _ in inner):
        return False
    try:
        return bool(pb.as_str(inner[0][2]))
    except pb.WireError:
        return False

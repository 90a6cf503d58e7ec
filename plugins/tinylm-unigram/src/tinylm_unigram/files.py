"""Reading and writing Unigram tokenizers: SentencePiece ``.model`` files, Hugging Face
``tokenizer.json`` (a ``Unigram`` model), and the settings line of tinylm's own format.

A ``.model`` converted to a tokenizer.json gets what transformers' ``SpmConverter``
writes: the charsmap as a ``Precompiled`` normalizer, spaces stripped and collapsed,
a ``Metaspace`` pre-tokenizer and decoder, the unknown and control pieces as special
added tokens. (The two then agree on ordinary text; ``tokenizers`` computes in float64
and splits words first, so ties can fall differently from SentencePiece.)
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

from tinylm.tokenizers import TokenizerError, TokenizerFileError
from tinylm.tokenizers.base import hf_added_tokens, is_token_id
from tinylm.tokenizers.formats import read_bytes, sniff

from tinylm_unigram import hf as hfp
from tinylm_unigram.charsmap import CharsmapError
from tinylm_unigram.protobuf import WireError
from tinylm_unigram.spm_model import (BYTE, CONTROL, NORMAL, UNIGRAM, UNKNOWN, MODEL_TYPES,
                                      SpmModel, decode_model, encode_model, looks_like_model)


@dataclass
class HfParts:
    """The tokenizer.json of the "hf" flavour: its pipeline, and every top-level
    object besides the model, kept to be written back."""

    pipeline: hfp.Pipeline
    objects: dict = field(default_factory=dict)


# ---------------------------------------------------------------------- SentencePiece


def from_spm_bytes(cls, data: bytes, where):
    try:
        model = decode_model(data)
    except WireError as e:
        raise TokenizerFileError(f"{str(where)!r} is not a SentencePiece model ({e}); the file "
                                 f"is corrupted or of another kind") from None
    if model.model_type != UNIGRAM:
        kind = MODEL_TYPES.get(model.model_type, str(model.model_type))
        raise TokenizerFileError(f"{str(where)!r} is a SentencePiece {kind} model, not unigram; "
                                 f"load BPE models through tinylm's own tokenizers")
    if not model.pieces:
        raise TokenizerFileError(f"{str(where)!r} has no pieces; the file is corrupted")
    try:
        return cls(model.pieces, model.scores, model.types, spm=model)
    except (TokenizerError, CharsmapError) as e:
        raise TokenizerFileError(f"{str(where)!r}: {e}") from None


def to_spm_model(tok) -> bytes:
    """The ``.model`` bytes of ``tok`` (an "hf" tokenizer gets a fresh spec: its
    first charsmap, the dummy prefix if its Metaspace prepends)."""
    if tok.flavour == "spm":
        model = tok.spm
    else:
        model = SpmModel([], [], [], byte_fallback=tok.byte_fallback,
                         precompiled_charsmap=tok.hf.pipeline.charsmap_blob(),
                         add_dummy_prefix=tok.hf.pipeline.prefix)
    model.pieces, model.scores, model.types = list(tok.pieces), list(tok.scores), list(tok.types)
    model.byte_fallback = tok.byte_fallback
    return encode_model(model)


# ---------------------------------------------------------------------- tokenizer.json


def from_hf_dict(cls, obj, where):
    def fail(message):
        return TokenizerFileError(f"{str(where)!r}: {message}; the file is corrupted or not "
                                  f"a Unigram tokenizer.json")

    model = obj.get("model") if isinstance(obj, dict) else None
    if not isinstance(model, dict) or model.get("type", "Unigram") != "Unigram":
        raise fail("model.type is not 'Unigram'")
    vocab = model.get("vocab")
    if not isinstance(vocab, list) or not vocab:
        raise fail("model.vocab must be a non-empty list of [piece, score] pairs")
    pieces, scores = [], []
    for k, row in enumerate(vocab):
        if (not isinstance(row, (list, tuple)) or len(row) != 2 or not isinstance(row[0], str)
                or not isinstance(row[1], (int, float)) or isinstance(row[1], bool)):
            raise fail(f"model.vocab[{k}] is {str(row)[:60]}, not [piece, score]")
        pieces.append(row[0])
        scores.append(float(row[1]))
    unk_id = model.get("unk_id")
    if unk_id is not None and (not is_token_id(unk_id) or unk_id >= len(pieces)):
        raise fail(f"model.unk_id {unk_id!r} is not an id of the vocabulary")
    byte_fallback = bool(model.get("byte_fallback", False))
    specials = hf_added_tokens(obj, fail)
    special_flags = {a.get("content"): a.get("special", True) for a in obj.get("added_tokens") or []}
    extra = {t: i for t, i in specials.items() if special_flags.get(t, True)}
    types = [NORMAL] * len(pieces)
    for i, p in enumerate(pieces):
        if byte_fallback and p.startswith("<0x") and len(p) == 6:
            types[i] = BYTE
    for t, i in extra.items():
        if i < len(pieces) and pieces[i] == t:
            types[i] = CONTROL
    if unk_id is not None:
        types[unk_id] = UNKNOWN
    try:
        pipeline = hfp.Pipeline(obj.get("normalizer"), obj.get("pre_tokenizer"))
    except hfp.PipelineError as e:
        raise TokenizerFileError(f"{str(where)!r} uses {e}, which tinylm's Unigram tokenizer "
                                 f"does not run (supported: see tinylm_unigram.hf)") from None
    objects = {k: v for k, v in obj.items() if k != "model"}
    parts = HfParts(pipeline, objects)
    return cls(pieces, scores, types, hf=parts, byte_fallback=byte_fallback,
               extra_special={t: i for t, i in extra.items() if i >= len(pieces) or pieces[i] == t})


def to_hf_dict(tok) -> dict:
    model = {"type": "Unigram", "unk_id": tok.unk_id,
             "vocab": [[p, s] for p, s in zip(tok.pieces, tok.scores)],
             "byte_fallback": tok.byte_fallback}
    if tok.flavour == "hf":
        obj = dict(tok.hf.objects)
        obj["model"] = model
        return obj
    spm = tok.spm
    normalizer, pre = hfp.spm_pipeline_specs(spm.precompiled_charsmap,
                                             add_dummy_prefix=spm.add_dummy_prefix,
                                             remove_extra_whitespaces=spm.remove_extra_whitespaces)
    added = [{"id": i, "content": p, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for i, (p, t) in enumerate(zip(tok.pieces, tok.types)) if t in (UNKNOWN, CONTROL)]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": normalizer, "pre_tokenizer": pre, "post_processor": None,
            "decoder": dict(pre), "model": model}


# ---------------------------------------------------------------------- tinylm's format


_SPM_FIELDS = ("byte_fallback", "treat_whitespace_as_suffix", "unk_surface", "normalizer_name",
               "add_dummy_prefix", "remove_extra_whitespaces", "escape_whitespaces")


def settings_of(tok) -> dict:
    """What tinylm's format stores besides the pieces (JSON-able)."""
    if tok.flavour == "spm":
        out = {k: getattr(tok.spm, k) for k in _SPM_FIELDS}
        out["precompiled_charsmap"] = base64.b64encode(tok.spm.precompiled_charsmap).decode("ascii")
        return out
    return {"byte_fallback": tok.byte_fallback, "objects": tok.hf.objects}


def from_settings(cls, flavour, settings, pieces, scores, types):
    if flavour == "spm":
        spm = SpmModel([], [], [], **{k: settings[k] for k in _SPM_FIELDS})
        try:
            spm.precompiled_charsmap = base64.b64decode(settings["precompiled_charsmap"])
        except binascii.Error as e:
            raise ValueError(f"precompiled_charsmap: {e}") from None
        spm.pieces, spm.scores, spm.types = pieces, scores, types
        return cls(pieces, scores, types, spm=spm)
    if flavour == "hf":
        obj = dict(settings["objects"])
        obj["model"] = {"type": "Unigram", "vocab": [[p, s] for p, s in zip(pieces, scores)],
                        "unk_id": types.index(UNKNOWN) if UNKNOWN in types else None,
                        "byte_fallback": settings["byte_fallback"]}
        return from_hf_dict(cls, obj, "<tinylm file>")
    raise ValueError(f"flavour {flavour!r}")


def load_any(cls, path):
    data = read_bytes(path)
    if looks_like_model(data):
        return from_spm_bytes(cls, data, path)
    kind, detail, parsed = sniff(path)
    if kind == "hf-json":
        return from_hf_dict(cls, parsed, path)
    if kind == "tinylm" and detail == cls.name:
        return cls.load(path)
    raise TokenizerFileError(f"{str(path)!r} is not a Unigram tokenizer (a SentencePiece "
                             f".model, a Unigram tokenizer.json or a tinylm unigram file)")

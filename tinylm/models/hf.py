"""Hugging Face checkpoint directories: import (``load_pretrained``) and export
(``save_pretrained``) for GPT-2, Llama (GQA and "linear" / "llama3" RoPE scaling
included), BERT and T5.

    model = tinylm.load_pretrained("path/to/llama")     # config.json + *.safetensors
    model.save_pretrained("out/")                       # transformers.AutoModel... loads it

A directory holds ``config.json`` and either ``model.safetensors`` or shards listed in
``model.safetensors.index.json`` ({"weight_map": {tensor name: shard file}}). Nothing
is ever unpickled: a directory with only ``pytorch_model.bin`` is refused.

Each family is a table of ``Rule``s, one per tinylm parameter, naming the Hugging
Face tensor(s) it corresponds to and how:

    copy       the same array                          (norms, embeddings, Llama's Linears)
    transpose  GPT-2's Conv1D stores Linear weights as (in, out)
    concat     tinylm fuses q, k, v into one projection; HF keeps them apart (Llama,
               BERT, T5), so import concatenates their rows and export splits them

The same table drives both directions, and the validation before loading: every
tensor the table expects is looked for, with its expected shape, and everything
missing, mis-shaped or unexpected is reported in one ``CheckpointError``.

Tied weights: GPT-2's lm_head, BERT's MLM decoder and T5's lm_head/embed_tokens are
the input embedding; files may or may not repeat them (ignored on import, not written
on export, as ``transformers`` does). A config that says "tied" but a file whose
lm_head differs from its embedding loads untied, as ``transformers`` does.
"""

from __future__ import annotations

import json
import os
import re
from typing import NamedTuple

import numpy as np

from tinylm import backend, checkpoint
from tinylm.errors import CheckpointError, TinyLMError
from tinylm.models.config import (
    BertConfig, GPT2Config, LlamaConfig, ModelConfig, T5Config, write_text_atomic,
)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class Rule(NamedTuple):
    ours: str  # a tinylm parameter name
    theirs: tuple  # the Hugging Face tensor name(s)
    op: str = "copy"  # "copy" | "transpose" | "concat" (rows, in the order of `theirs`)
    sizes: tuple = ()  # concat: the rows each HF tensor contributes


def _copy(ours, theirs):
    return Rule(ours, (theirs,))


# --------------------------------------------------------------------------- activations

_ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "relu": "relu", "silu": "silu", "swish": "silu"}
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}


def _activation(name, where):
    if name not in _ACT_FROM_HF:
        raise CheckpointError(f"{where}: activation {name!r} is not supported; tinylm has "
                              f"{sorted(_ACT_FROM_HF)}")
    return _ACT_FROM_HF[name]


def _head_dim(head_dim, d_model, n_head):
    """None (derived) when it is d_model / n_head, as the config would derive it."""
    return None if head_dim in (None, d_model // n_head) and d_model % n_head == 0 else head_dim


def _non_default(options: dict, defaults: dict) -> dict:
    """The options that differ from the scheme's defaults (configs stay canonical)."""
    return {k: v for k, v in options.items() if v != defaults[k]}


def _unsupported(model_type: str, problems: list) -> None:
    if problems:
        raise CheckpointError(f"this {model_type} config uses what tinylm does not support: "
                              + "; ".join(problems))


# --------------------------------------------------------------------------- families


class Family:
    """How one Hugging Face ``model_type`` maps onto a tinylm config and parameters."""

    model_type = ""
    config_class: type = ModelConfig
    prefix = ""  # HF's base_model_prefix: files may carry names with or without it
    lm_head = "lm_head.weight"  # HF name of a tied output weight, when files repeat it

    def from_hf(self, hf: dict) -> ModelConfig:
        raise NotImplementedError

    def to_hf(self, c: ModelConfig) -> dict:
        raise NotImplementedError

    fixed = ("positional", "norm", "norm_position", "gated_mlp", "n_experts")

    def exportable(self, c: ModelConfig) -> list:
        """What in ``c`` the Hugging Face family cannot express (empty: all is well)."""
        base = self.config_class()
        p = [f"{n}={getattr(c, n)!r} (HF {self.model_type} has {getattr(base, n)!r})"
             for n in self.fixed if getattr(c, n) != getattr(base, n)]
        if c.activation not in _ACT_TO_HF:
            p.append(f"activation={c.activation!r}")
        return p

    def rules(self, c: ModelConfig) -> list:
        raise NotImplementedError

    def ignored(self, c: ModelConfig) -> tuple:
        """Regexes of HF tensor names that may be in a file but carry nothing we load."""
        return ()

    def fit_to_tensors(self, c: ModelConfig, hf: dict, names) -> ModelConfig:
        """``c`` with what config.json cannot say but the file's tensor ``names`` do
        (e.g. an optional module that is absent)."""
        return c


def _qkv(c: ModelConfig):
    q, kv = c.n_head * c.head_size, c.kv_heads * c.head_size
    return (q, kv, kv)


class GPT2(Family):
    model_type, config_class, prefix = "gpt2", GPT2Config, "transformer"

    def from_hf(self, hf):
        _unsupported("gpt2", [f"{k}=true" for k in ("add_cross_attention",
                                                    "scale_attn_by_inverse_layer_idx")
                              if hf.get(k) is True])
        return GPT2Config(
            vocab_size=hf["vocab_size"], d_model=hf["n_embd"], n_layer=hf["n_layer"],
            n_head=hf["n_head"], d_ff=hf.get("n_inner"), max_positions=hf["n_positions"],
            activation=_activation(hf.get("activation_function", "gelu_new"), "gpt2"),
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), dropout=hf.get("resid_pdrop", 0.0),
            attn_dropout=hf.get("attn_pdrop", 0.0),
            attn_scale=None if hf.get("scale_attn_weights", True) else 1.0,
            tie_embeddings=hf.get("tie_word_embeddings", True),
            bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )

    def exportable(self, c):
        p = super().exportable(c)
        if c.kv_heads != c.n_head or c.head_size * c.n_head != c.d_model:
            p.append("grouped-query heads or a head_dim other than d_model / n_head")
        if not c.bias or c.mlp_dropout or c.attn_scale not in (None, 1.0):
            p.append("bias=false, mlp_dropout or a custom attn_scale")
        return p

    def to_hf(self, c):
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": c.vocab_size, "n_embd": c.d_model, "n_layer": c.n_layer,
            "n_head": c.n_head, "n_inner": c.d_ff, "n_positions": c.max_positions,
            "activation_function": _ACT_TO_HF[c.activation], "layer_norm_epsilon": c.norm_eps,
            "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.attn_dropout,
            "scale_attn_weights": c.attn_scale is None, "tie_word_embeddings": c.tie_embeddings,
            "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
            "pad_token_id": c.pad_token_id,
        }

    def rules(self, c):
        r = [_copy("tok_emb.weight", "transformer.wte.weight"),
             _copy("transformer.pos.weight", "transformer.wpe.weight")]
        for i in range(c.n_layer):
            o, t = f"transformer.blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs, op in [
                    ("norm1", "ln_1", "copy"), ("attn.qkv", "attn.c_attn", "transpose"),
                    ("attn.out", "attn.c_proj", "transpose"), ("norm2", "ln_2", "copy"),
                    ("mlp.up", "mlp.c_fc", "transpose"), ("mlp.down", "mlp.c_proj", "transpose")]:
                r.append(Rule(o + ours + ".weight", (t + theirs + ".weight",), op))
                r.append(_copy(o + ours + ".bias", t + theirs + ".bias"))
        r += [_copy("transformer.norm.weight", "transformer.ln_f.weight"),
              _copy("transformer.norm.bias", "transformer.ln_f.bias")]
        if not c.tie_embeddings:
            r.append(_copy("lm_head.weight", "lm_head.weight"))
        return r

    def ignored(self, c):
        return (r"\.attn\.(masked_)?bias$",) + ((r"^lm_head\.weight$",) if c.tie_embeddings else ())


# Hugging Face's rope_type -> the keys of its parameters, for the static rescalings of
# the RoPE frequencies that tinylm's RoPE implements (tinylm.positional.ROPE_SCALINGS).
_ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
}
_ROPE_TYPES = ("default",) + tuple(_ROPE_SCALING_KEYS)


# --------------------------------------------------------------------------- rope types from plugins
#
# A positional plugin claims a Hugging Face rope_type with three attributes of its
# scheme class (a RoPE subclass, registered through register_positional_encodings):
#
#     hf_rope_type = "yarn"                  the rope_type it reads and writes
#     from_hf_rope(rope, hf) -> dict         classmethod: its positional_options, from HF's
#                                            rope dict (rope_parameters / rope_scaling, with
#                                            rope_theta in it) and the whole config.json
#     to_hf_rope(options, hf) -> dict        classmethod: the rope dict to write ({"rope_type":
#                                            "yarn", "factor": ...}); TinyLMError if HF cannot
#                                            express the options. It may set top-level entries
#                                            of ``hf`` (the config.json being written) that its
#                                            rope type reads, e.g. "dynamic"'s context in
#                                            max_position_embeddings
#
# "base" and "fraction" stay tinylm's (rope_theta, partial_rotary_factor). docs/plugins.md
# ("Positional schemes and Hugging Face rope types") says more.


def claimed_rope_types() -> dict:
    """``{HF rope_type: (positional name, scheme class)}`` for the registered schemes
    that claim one (``hf_rope_type``); two claiming the same type is a PluginError."""
    from tinylm import plugins
    from tinylm.errors import PluginError

    claimed = {}
    for name, cls in sorted(plugins.registry("positional_encodings").items()):
        kind = getattr(cls, "hf_rope_type", None)
        if kind is None:
            continue
        if kind in claimed or kind in _ROPE_TYPES:
            owners = plugins.registered_by("positional_encodings")
            other = f"scheme {claimed[kind][0]!r}" if kind in claimed else "tinylm's RoPE"
            raise PluginError(f"HF rope_type {kind!r} is claimed by positional scheme {name!r} "
                              f"(plugin {owners[name]!r}) and by {other}; uninstall one")
        claimed[kind] = (name, cls)
    return claimed


def _rope_plugin_scheme(c: ModelConfig):
    """The scheme class of ``c.positional`` when it is not "rope" but claims a rope_type."""
    if c.positional == "rope":
        return None
    from tinylm import plugins

    cls = plugins.registry("positional_encodings").get(c.positional)
    return cls if getattr(cls, "hf_rope_type", None) is not None else None


def _rope_scaling_from_hf(kind: str, rope: dict, hf: dict) -> dict:
    """RoPE's ``scaling`` option from an HF rope dict (KeyError names a missing key)."""
    rope = dict(rope)
    if kind == "llama3":  # transformers' fallbacks: a top-level value, else the model's
        rope["original_max_position_embeddings"] = hf.get(
            "original_max_position_embeddings",
            rope.get("original_max_position_embeddings", hf.get("max_position_embeddings", 2048)))
    return {"type": kind, **{k: rope[k] for k in _ROPE_SCALING_KEYS[kind]}}


def _rope_scaling_to_hf(scaling: dict) -> dict:
    return {"rope_type": scaling["type"], **{k: v for k, v in scaling.items() if k != "type"}}


class Llama(Family):
    model_type, config_class, prefix = "llama", LlamaConfig, "model"

    def from_hf(self, hf):
        # transformers >= 5 writes "rope_parameters"; older configs "rope_scaling" and a
        # top-level "rope_theta". As transformers does, "rope_scaling" wins when present.
        rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
        rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
        kind = rope.get("rope_type", rope.get("type", "default"))
        claimed = {} if kind in _ROPE_TYPES else claimed_rope_types()
        problems = [] if kind in _ROPE_TYPES or kind in claimed else [
            f"rope_type={kind!r} (only {', '.join(map(repr, _ROPE_TYPES + tuple(claimed)))}); "
            f"positional plugins add more, e.g. tinylm-rope-scaling reads 'dynamic' and 'yarn'"]
        if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
            problems.append("attention_bias != mlp_bias (tinylm has one bias switch)")
        _unsupported("llama", problems)
        fraction = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
        options = _non_default({"base": float(rope["rope_theta"]), "fraction": fraction},
                               {"base": 10000.0, "fraction": 1.0})
        positional = "rope"
        if kind in claimed:
            positional, scheme = claimed[kind]
            options.update(scheme.from_hf_rope(rope, hf))
        elif kind != "default":
            options["scaling"] = _rope_scaling_from_hf(kind, rope, hf)
        return LlamaConfig(
            positional=positional,
            vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
            n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
            n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=_head_dim(hf.get("head_dim"), hf["hidden_size"], hf["num_attention_heads"]),
            d_ff=hf["intermediate_size"],
            max_positions=hf.get("max_position_embeddings", 2048), positional_options=options,
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            activation=_activation(hf.get("hidden_act", "silu"), "llama"),
            bias=bool(hf.get("attention_bias", False)),
            attn_dropout=float(hf.get("attention_dropout", 0.0) or 0.0),
            tie_embeddings=hf.get("tie_word_embeddings", False),
            bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )

    fixed = tuple(n for n in Family.fixed if n != "positional")  # checked below

    def exportable(self, c):
        p, scheme = [], _rope_plugin_scheme(c)
        if scheme is not None:
            try:
                scheme.to_hf_rope(c.positional_options, {"max_position_embeddings": c.max_positions})
            except TinyLMError as e:
                p.append(f"positional={c.positional!r}: {e}")
        elif c.positional != "rope":
            p.append(f"positional={c.positional!r} (HF llama has 'rope', or a rope_type "
                     f"that a positional plugin claims)")
        p += super().exportable(c)
        extra = set(c.positional_options) - {"base", "fraction", "scaling"}
        if extra and scheme is None:
            p.append(f"RoPE options {sorted(extra)}")
        if c.dropout or c.mlp_dropout or c.attn_scale is not None:
            p.append("dropout, mlp_dropout or a custom attn_scale")
        return p

    def to_hf(self, c):
        rope = {"rope_type": "default",
                "rope_theta": float(c.positional_options.get("base", 10000.0))}
        hf = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": c.vocab_size, "hidden_size": c.d_model,
            "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
            "num_key_value_heads": c.kv_heads, "head_dim": c.head_size,
            "intermediate_size": c.ff_size, "max_position_embeddings": c.max_positions,
            "rms_norm_eps": c.norm_eps, "hidden_act": _ACT_TO_HF[c.activation],
            "attention_bias": c.bias, "mlp_bias": c.bias, "attention_dropout": c.attn_dropout,
            "tie_word_embeddings": c.tie_embeddings, "rope_parameters": rope,
            "rope_theta": rope["rope_theta"],
            "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
            "pad_token_id": c.pad_token_id,
        }
        if c.positional_options.get("fraction", 1.0) != 1.0:
            fraction = c.positional_options["fraction"]
            rope["partial_rotary_factor"] = hf["partial_rotary_factor"] = fraction
        scheme = _rope_plugin_scheme(c)
        scaling = (scheme.to_hf_rope(c.positional_options, hf) if scheme is not None else
                   _rope_scaling_to_hf(c.positional_options["scaling"])
                   if c.positional_options.get("scaling") else None)
        if scaling:
            rope.update(scaling)
            hf["rope_scaling"] = scaling  # what transformers < 5 reads
        return hf

    def rules(self, c):
        r = [_copy("tok_emb.weight", "model.embed_tokens.weight")]
        params = ("weight", "bias") if c.bias else ("weight",)
        for i in range(c.n_layer):
            o, t = f"transformer.blocks.{i}.", f"model.layers.{i}."
            r += [_copy(o + "norm1.weight", t + "input_layernorm.weight"),
                  _copy(o + "norm2.weight", t + "post_attention_layernorm.weight")]
            for p in params:
                qkv = tuple(f"{t}self_attn.{x}_proj.{p}" for x in "qkv")
                r.append(Rule(o + "attn.qkv." + p, qkv, "concat", _qkv(c)))
                r.append(_copy(o + "attn.out." + p, t + "self_attn.o_proj." + p))
                for x in ("gate", "up", "down"):
                    r.append(_copy(o + f"mlp.{x}.{p}", t + f"mlp.{x}_proj.{p}"))
        r.append(_copy("transformer.norm.weight", "model.norm.weight"))
        if not c.tie_embeddings:
            r.append(_copy("lm_head.weight", "lm_head.weight"))
        return r

    def ignored(self, c):
        return (r"rotary_emb\.inv_freq$",) + ((r"^lm_head\.weight$",) if c.tie_embeddings else ())


_BERT_HEADS = {"BertForMaskedLM": "mlm", "BertForPreTraining": "mlm",
               "BertForSequenceClassification": "classification", "BertModel": "none"}
_BERT_ARCH = {"mlm": "BertForMaskedLM", "classification": "BertForSequenceClassification",
              "none": "BertModel"}


class Bert(Family):
    model_type, config_class, prefix = "bert", BertConfig, "bert"
    lm_head = "cls.predictions.decoder.weight"

    def from_hf(self, hf):
        problems = []
        if hf.get("position_embedding_type", "absolute") != "absolute":
            problems.append(f"position_embedding_type={hf['position_embedding_type']!r}")
        if hf.get("is_decoder") or hf.get("add_cross_attention"):
            problems.append("is_decoder / add_cross_attention (BERT as a decoder)")
        arch = (hf.get("architectures") or ["BertModel"])[0]
        if arch not in _BERT_HEADS:
            problems.append(f"architecture {arch!r} (tinylm has {sorted(_BERT_HEADS)})")
        _unsupported("bert", problems)
        head = _BERT_HEADS[arch]
        labels = len(hf["id2label"]) if hf.get("id2label") else hf.get("num_labels", 2)
        return BertConfig(
            vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
            n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
            d_ff=hf["intermediate_size"], max_positions=hf.get("max_position_embeddings", 512),
            activation=_activation(hf.get("hidden_act", "gelu"), "bert"),
            norm_eps=hf.get("layer_norm_eps", 1e-12), dropout=hf.get("hidden_dropout_prob", 0.1),
            attn_dropout=hf.get("attention_probs_dropout_prob", 0.1),
            type_vocab_size=hf.get("type_vocab_size", 2), head=head, num_labels=labels,
            tie_embeddings=hf.get("tie_word_embeddings", True),
            pad_token_id=hf.get("pad_token_id", 0),
        )

    def exportable(self, c):
        p = super().exportable(c)
        if not c.bias or not c.embed_norm or c.mlp_dropout or c.attn_scale is not None:
            p.append("bias=false, embed_norm=false, mlp_dropout or a custom attn_scale")
        if c.kv_heads != c.n_head or c.head_size * c.n_head != c.d_model:
            p.append("grouped-query heads or a head_dim other than d_model / n_head")
        if c.type_vocab_size < 1:
            p.append("type_vocab_size=0")
        return p

    def to_hf(self, c):
        hf = {
            "architectures": [_BERT_ARCH[c.head]], "model_type": "bert",
            "vocab_size": c.vocab_size, "hidden_size": c.d_model,
            "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
            "intermediate_size": c.ff_size, "max_position_embeddings": c.max_positions,
            "hidden_act": _ACT_TO_HF[c.activation], "layer_norm_eps": c.norm_eps,
            "hidden_dropout_prob": c.dropout, "attention_probs_dropout_prob": c.attn_dropout,
            "type_vocab_size": c.type_vocab_size, "position_embedding_type": "absolute",
            "tie_word_embeddings": c.tie_embeddings, "pad_token_id": c.pad_token_id,
        }
        if c.head == "classification":
            hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(c.num_labels)}
            hf["label2id"] = {f"LABEL_{i}": i for i in range(c.num_labels)}
        return hf

    def rules(self, c):
        b = "" if c.head == "none" else "bert."
        e = b + "embeddings."
        r = [_copy("tok_emb.weight", e + "word_embeddings.weight"),
             _copy("encoder.pos.weight", e + "position_embeddings.weight"),
             _copy("encoder.embed_norm.weight", e + "LayerNorm.weight"),
             _copy("encoder.embed_norm.bias", e + "LayerNorm.bias")]
        if c.type_vocab_size:
            r.append(_copy("type_emb.weight", e + "token_type_embeddings.weight"))
        for i in range(c.n_layer):
            o, t = f"encoder.blocks.{i}.", f"{b}encoder.layer.{i}."
            for p in ("weight", "bias"):
                r += [Rule(o + "attn.qkv." + p, tuple(f"{t}attention.self.{x}.{p}"
                                                      for x in ("query", "key", "value")),
                           "concat", _qkv(c)),
                      _copy(o + "attn.out." + p, t + "attention.output.dense." + p),
                      _copy(o + "norm1." + p, t + "attention.output.LayerNorm." + p),
                      _copy(o + "mlp.up." + p, t + "intermediate.dense." + p),
                      _copy(o + "mlp.down." + p, t + "output.dense." + p),
                      _copy(o + "norm2." + p, t + "output.LayerNorm." + p)]
        for p in ("weight", "bias"):
            if c.head != "mlm" and c.pooler:
                r.append(_copy("pooler." + p, b + "pooler.dense." + p))
            if c.head == "mlm":
                r += [_copy("head.dense." + p, "cls.predictions.transform.dense." + p),
                      _copy("head.norm." + p, "cls.predictions.transform.LayerNorm." + p)]
            if c.head == "classification":
                r.append(_copy("head.1." + p, "classifier." + p))
        if c.head == "mlm":
            r.append(_copy("head.decoder.bias", "cls.predictions.bias"))
            if not c.tie_embeddings:
                r.append(_copy("head.decoder.weight", "cls.predictions.decoder.weight"))
        return r

    def fit_to_tensors(self, c, hf, names):
        """A config.json without ``architectures`` (a BertModel by default) takes its
        head from the weights; a bare encoder saved without its pooler
        (``BertModel(add_pooling_layer=False)``) loads without one (pooled is None)."""
        names = set(names)
        if not hf.get("architectures"):
            if any(n.startswith("cls.predictions.") for n in names):
                c = c.replace(head="mlm")
            elif "classifier.weight" in names:
                c = c.replace(head="classification")
        if c.head == "none" and c.pooler and not names & {"pooler.dense.weight",
                                                         "bert.pooler.dense.weight"}:
            c = c.replace(pooler=False)
        return c

    def ignored(self, c):
        skip = [r"embeddings\.position_ids$", r"^cls\.predictions\.decoder\.bias$",
                r"^cls\.seq_relationship\."]
        if c.tie_embeddings:
            skip.append(r"^cls\.predictions\.decoder\.weight$")
        if c.head == "mlm":
            skip.append(r"pooler\.dense\.")  # BertForPreTraining has one; the MLM head does not
        return tuple(skip)


_T5_FF = {("relu", False): "relu", ("gelu_tanh", True): "gated-gelu", ("gelu", False): "gelu",
          ("gelu_tanh", False): "gelu_new", ("silu", True): "gated-silu", ("silu", False): "silu",
          ("relu", True): "gated-relu"}


class T5(Family):
    model_type, config_class = "t5", T5Config
    fixed = ("positional", "norm", "norm_position", "n_experts")

    def from_hf(self, hf):
        proj = hf.get("feed_forward_proj", "relu")
        gated = proj.startswith("gated-")
        act = "gelu_new" if proj == "gated-gelu" else proj.split("-")[-1]
        tie = hf.get("tie_word_embeddings", True) is not False
        return T5Config(
            vocab_size=hf["vocab_size"], d_model=hf["d_model"], head_dim=hf["d_kv"],
            d_ff=hf["d_ff"], n_layer=hf["num_layers"], n_decoder_layer=hf.get("num_decoder_layers"),
            n_head=hf["num_heads"], activation=_activation(act, "t5"), gated_mlp=gated,
            positional_options=_non_default(
                {"num_buckets": hf.get("relative_attention_num_buckets", 32),
                 "max_distance": hf.get("relative_attention_max_distance", 128)},
                {"num_buckets": 32, "max_distance": 128}),
            dropout=hf.get("dropout_rate", 0.1), attn_dropout=hf.get("dropout_rate", 0.1),
            mlp_dropout=hf.get("dropout_rate", 0.1), norm_eps=hf.get("layer_norm_epsilon", 1e-6),
            tie_embeddings=tie, scale_decoder_output=hf.get("scale_decoder_outputs", tie),
            pad_token_id=hf.get("pad_token_id", 0), eos_token_id=hf.get("eos_token_id", 1),
            decoder_start_token_id=hf.get("decoder_start_token_id", hf.get("pad_token_id", 0) or 0),
        )

    def exportable(self, c):
        p = super().exportable(c)
        if (c.activation, c.gated_mlp) not in _T5_FF:
            p.append(f"feed-forward {c.activation} gated={c.gated_mlp}")
        if c.bias or c.attn_scale != 1.0 or c.kv_heads != c.n_head:
            p.append("biases, an attn_scale other than 1 or grouped-query heads")
        if set(c.positional_options) - {"num_buckets", "max_distance"}:
            p.append(f"relative-bias options {sorted(c.positional_options)}")
        return p

    def to_hf(self, c):
        o = c.positional_options
        return {
            "architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
            "is_encoder_decoder": True, "vocab_size": c.vocab_size, "d_model": c.d_model,
            "d_kv": c.head_size, "d_ff": c.ff_size, "num_layers": c.n_layer,
            "num_decoder_layers": c.decoder_layers, "num_heads": c.n_head,
            "relative_attention_num_buckets": o.get("num_buckets", 32),
            "relative_attention_max_distance": o.get("max_distance", 128),
            "dropout_rate": c.dropout, "layer_norm_epsilon": c.norm_eps,
            "feed_forward_proj": _T5_FF[(c.activation, c.gated_mlp)],
            "tie_word_embeddings": c.tie_embeddings,
            "scale_decoder_outputs": c.scale_decoder_output,
            "pad_token_id": c.pad_token_id, "eos_token_id": c.eos_token_id,
            "decoder_start_token_id": c.decoder_start_token_id,
        }

    def rules(self, c):
        r = [_copy("shared.weight", "shared.weight")]
        ff = ("gate", "up", "down") if c.gated_mlp else ("up", "down")
        names = {"gate": "wi_0", "up": "wi_1" if c.gated_mlp else "wi", "down": "wo"}
        for stack, n_layer in (("encoder", c.n_layer), ("decoder", c.decoder_layers)):
            attn = f"{stack}.block.0.layer.0.SelfAttention."
            r.append(_copy(f"{stack}.pos.weight", attn + "relative_attention_bias.weight"))
            for i in range(n_layer):
                o, t = f"{stack}.blocks.{i}.", f"{stack}.block.{i}.layer."
                f = 2 if stack == "decoder" else 1  # the feed-forward sub-layer's index
                r += [_copy(o + "norm1.weight", t + "0.layer_norm.weight"),
                      Rule(o + "attn.qkv.weight",
                           tuple(f"{t}0.SelfAttention.{x}.weight" for x in "qkv"), "concat", _qkv(c)),
                      _copy(o + "attn.out.weight", t + "0.SelfAttention.o.weight"),
                      _copy(o + "norm2.weight", f"{t}{f}.layer_norm.weight")]
                r += [_copy(f"{o}mlp.{x}.weight", f"{t}{f}.DenseReluDense.{names[x]}.weight")
                      for x in ff]
                if stack == "decoder":
                    r += [_copy(o + "norm_cross.weight", t + "1.layer_norm.weight"),
                          _copy(o + "cross_attn.q.weight", t + "1.EncDecAttention.q.weight"),
                          Rule(o + "cross_attn.kv.weight", (t + "1.EncDecAttention.k.weight",
                                                            t + "1.EncDecAttention.v.weight"),
                               "concat", _qkv(c)[1:]),
                          _copy(o + "cross_attn.out.weight", t + "1.EncDecAttention.o.weight")]
            r.append(_copy(f"{stack}.norm.weight", f"{stack}.final_layer_norm.weight"))
        if not c.tie_embeddings:
            r.append(_copy("lm_head.weight", "lm_head.weight"))
        return r

    def ignored(self, c):
        skip = [r"^(encoder|decoder)\.embed_tokens\.weight$",
                r"EncDecAttention\.relative_attention_bias\.weight$"]
        if c.tie_embeddings:
            skip.append(r"^lm_head\.weight$")
        return tuple(skip)


HF_FAMILIES = {f.model_type: f for f in (GPT2(), Llama(), Bert(), T5())}


def _family(model_type, where) -> Family:
    if model_type not in HF_FAMILIES:
        raise CheckpointError(f"{where}: model_type {model_type!r} is not supported; tinylm "
                              f"reads and writes {', '.join(sorted(HF_FAMILIES))}")
    return HF_FAMILIES[model_type]


# --------------------------------------------------------------------------- the directory


def _read_json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise CheckpointError(f"{what} not found: {path}") from e
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {what} {path}: {e}") from e


def read_hf_config(path) -> ModelConfig:
    """The tinylm config of a Hugging Face directory (or its config.json); with the
    weights beside it, fitted to the tensors they hold (``Family.fit_to_tensors``)."""
    path = os.fspath(path)
    family, config, hf = _read_hf_config(path)
    if os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in (INDEX, SINGLE)):
        config = family.fit_to_tensors(config, hf, _weight_files(path))
    return config


def _read_hf_config(path) -> tuple:
    """(family, config, the config.json dict)."""
    path = os.fspath(path)
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    hf = _read_json(file, "Hugging Face config")
    family = _family(hf.get("model_type"), file)
    try:
        return family, family.from_hf(hf), hf
    except KeyError as e:
        raise CheckpointError(f"{file}: a {family.model_type} config needs the key {e}") from e


def _weight_files(path) -> dict:
    """{tensor name: file} for the directory's safetensors (one file or an index)."""
    index = os.path.join(path, INDEX)
    if os.path.exists(index):
        weight_map = _read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        return {name: os.path.join(path, f) for name, f in weight_map.items()}
    single = os.path.join(path, SINGLE)
    if not os.path.exists(single):
        present = sorted(os.listdir(path))
        hint = (" (pickled PyTorch weights: tinylm never unpickles; convert them with "
                "transformers' save_pretrained(safe_serialization=True))"
                if any(f.endswith(".bin") for f in present) else "")
        raise CheckpointError(f"{path}: neither {SINGLE} nor {INDEX}; found {present}{hint}")
    return {name: single for name in checkpoint.read_header(single)}


def _shapes(files: dict) -> dict:
    shapes = {}
    for file in sorted(set(files.values())):
        for name, info in checkpoint.read_header(file).items():
            if files.get(name) == file:
                shapes[name] = tuple(info["shape"])
    missing = sorted(set(files) - set(shapes))
    if missing:
        raise CheckpointError(f"the index lists tensors its shards lack: {missing[:10]}")
    return shapes


def _expected(rules, params) -> dict:
    """{HF name: shape} that the rules expect, from our parameters' shapes."""
    out = {}
    for rule in rules:
        shape = tuple(params[rule.ours].shape)
        if rule.op == "transpose":
            out[rule.theirs[0]] = shape[::-1]
        elif rule.op == "concat":
            for name, rows in zip(rule.theirs, rule.sizes):
                out[name] = (rows,) + shape[1:]
        else:
            out[rule.theirs[0]] = shape
    return out


def _resolve(expected: dict, available, prefix: str) -> dict:
    """{expected name: name in the file}: files of a base model drop the prefix
    ("h.0.attn..." for "transformer.h.0.attn..."), files of a head model add it."""
    out = {}
    for name in expected:
        if name in available:
            out[name] = name
        elif prefix and name.startswith(prefix + ".") and name[len(prefix) + 1:] in available:
            out[name] = name[len(prefix) + 1:]
        elif prefix and f"{prefix}.{name}" in available:
            out[name] = f"{prefix}.{name}"
    return out


def _load_arrays(files: dict, names) -> dict:
    by_file: dict = {}
    for n in names:
        by_file.setdefault(files[n], []).append(n)
    arrays = {}
    for file, group in by_file.items():
        arrays.update(checkpoint.load_file(file, names=group))
    return arrays


def load_pretrained(path, strict: bool = True, overrides: dict | None = None):
    """A tinylm model with the weights of a Hugging Face checkpoint directory.

    Every tensor is checked before any is copied: what is missing, has the wrong shape
    or (with ``strict``) is not expected is reported in one ``CheckpointError`` with the
    shapes tinylm expected. ``overrides``: config fields to set after reading it (a
    *ForSequenceClassification folder has no lm_head: tie_embeddings=True)."""
    from tinylm.models import build_model

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory (expected config.json + "
                              f"{SINGLE} or {INDEX})")
    family, config, hf = _read_hf_config(path)
    files = _weight_files(path)
    shapes = _shapes(files)
    config = family.fit_to_tensors(config, hf, shapes)
    if overrides:
        config = config.replace(**overrides)
    if config.tie_embeddings and family.lm_head in shapes:
        emb = family.rules(config)[0]  # every family's first rule is the word embedding
        tied_pair = _resolve({emb.theirs[0]: 0}, shapes, family.prefix)
        if tied_pair:
            a = _load_arrays(files, [family.lm_head, *tied_pair.values()])
            if not np.array_equal(a[family.lm_head], a[next(iter(tied_pair.values()))]):
                config = config.replace(tie_embeddings=False)  # as transformers: do not tie
    rules = family.rules(config)
    model = _build_for_loading(build_model, config, rules)
    params = dict(model.named_parameters())
    expected = _expected(rules, params)
    where = _resolve(expected, shapes, family.prefix)
    missing = [f"{n} {expected[n]}" for n in expected if n not in where]
    wrong = [f"{n}: file {shapes[where[n]]}, expected {expected[n]}"
             for n in where if shapes[where[n]] != expected[n]]
    skip = [re.compile(p) for p in family.ignored(config)]
    used = set(where.values())
    unexpected = [n for n in shapes if n not in used and not any(p.search(n) for p in skip)]
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): " + ", ".join(missing))
    if wrong:
        problems.append(f"shape mismatches ({len(wrong)}): " + "; ".join(wrong))
    if unexpected and strict:
        problems.append(f"unexpected tensors ({len(unexpected)}): " + ", ".join(sorted(unexpected)))
    if problems:
        raise CheckpointError(f"{path} does not fit the {family.model_type} model its "
                              f"config.json describes:\n  " + "\n  ".join(problems))
    for rule in rules:  # one parameter at a time: never a second copy of every weight
        arrays = _load_arrays(files, [where[n] for n in rule.theirs])
        parts = [arrays.pop(where[n]) for n in rule.theirs]
        if rule.op == "transpose":
            value = parts[0].T
        elif rule.op == "concat":
            value = np.concatenate(parts, axis=0)
        else:
            value = parts[0]
        del parts, arrays
        # tied aliases share the loaded Parameter
        model.load_state_dict({rule.ours: value}, strict=False)
    model.eval()
    return model


def _build_for_loading(build_model, config, rules):
    """The model, its weights left unwritten (``nn.skip_init``: no page of them is
    resident until the file's values are copied in, so loading never holds two copies)
    when the rules fill every parameter; else built and initialised as usual."""
    from tinylm import nn

    with nn.skip_init():
        model = build_model(config)
    ours = {r.ours for r in rules}
    filled = {id(p) for name, p in model.named_parameters() if name in ours}
    if all(id(p) in filled for p in model.parameters()):
        return model
    return build_model(config)


# --------------------------------------------------------------------------- writing


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise CheckpointError(f"max_shard_size {size!r}: give bytes or e.g. '5GB', '500MB'")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)


def hf_state_dict(model, grads: bool = False) -> dict:
    """{HF name: NumPy array} of ``model``'s weights (or, with ``grads``, of their
    gradients: the mapping is linear) in its Hugging Face family's layout."""
    c = model.config
    family = _family(c.architecture, f"{type(model).__name__} (architecture {c.architecture!r})")
    params = dict(model.named_parameters())
    out = {}
    for rule in family.rules(c):
        p = params[rule.ours]
        a = backend.to_numpy(p.grad if grads else p.data)
        if rule.op == "transpose":
            out[rule.theirs[0]] = np.ascontiguousarray(a.T)
        elif rule.op == "concat":
            for name, piece in zip(rule.theirs, np.split(a, np.cumsum(rule.sizes)[:-1], axis=0)):
                out[name] = np.ascontiguousarray(piece)
        else:
            out[rule.theirs[0]] = a
    return out


def save_pretrained(model, path, max_shard_size="5GB") -> None:
    """Write ``model`` as a Hugging Face checkpoint directory that ``transformers``
    loads (``AutoModelFor...from_pretrained(path)``): config.json and model.safetensors,
    or shards of at most ``max_shard_size`` plus model.safetensors.index.json."""
    c = model.config
    family = _family(c.architecture, f"cannot export architecture {c.architecture!r}")
    problems = family.exportable(c)
    if problems:
        raise CheckpointError(f"this model cannot be written as a Hugging Face "
                              f"{family.model_type} checkpoint: " + "; ".join(problems))
    tensors = hf_state_dict(model)
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    limit = _parse_size(max_shard_size)
    shards, size = [[]], 0
    for name in tensors:
        n = tensors[name].nbytes
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    written = []
    if len(shards) == 1:
        written.append(SINGLE)
        checkpoint.save_file(tensors, os.path.join(path, SINGLE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, names in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            checkpoint.save_file({n: tensors[n] for n in names}, os.path.join(path, file),
                                 metadata={"format": "pt"})
            weight_map.update({n: file for n in names})
            written.append(file)
        total = sum(a.nbytes for a in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_text_atomic(os.path.join(path, INDEX), json.dumps(index, indent=2) + "\n")
        written.append(INDEX)
    for stale in os.listdir(path):  # weights of an earlier save that this one replaces
        if stale not in written and re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors"
                                                 r"(\.index\.json)?", stale):
            os.remove(os.path.join(path, stale))
    hf = {**family.to_hf(c), "dtype": "float32", "tinylm_version": _version()}
    write_text_atomic(os.path.join(path, "config.json"), json.dumps(hf, indent=2) + "\n")


def _version() -> str:
    from tinylm.version import __version__

    return __version__

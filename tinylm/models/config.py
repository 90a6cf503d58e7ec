"""Model configs: one dataclass per family, saved and loaded as TOML or JSON.

    # llama-tiny.toml
    architecture = "llama"
    vocab_size = 1000
    d_model = 128
    n_layer = 4
    n_head = 8
    n_kv_head = 2                       # grouped-query attention
    d_ff = 344
    positional_options = { base = 500000.0 }

    config = load_config("llama-tiny.toml")     # LlamaConfig(...), every field checked
    model = build_model(config)

``architecture`` picks the family (registered through the ``register_architectures``
hook: "gpt2", "llama", "bert", "t5" built in); the other keys are the dataclass's
fields, and any left out take the family's defaults, which are those of the original
model (GPT-2 small, Llama-2 7B, BERT-base, T5-small). A TOML file may also keep the
model under a ``[model]`` table next to other sections (a training config).

One set of switches describes every family: ``norm`` ("layernorm" | "rmsnorm"),
``norm_position`` ("pre" | "post"), ``activation`` ("gelu" | "gelu_tanh" | "relu" |
"silu"), ``gated_mlp`` (SwiGLU/GeGLU), ``positional`` (a registered scheme, with
``positional_options``), ``n_kv_head`` (GQA/MQA), ``n_experts`` > 0 (MoE), ``bias``,
``tie_embeddings``, dropouts.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Callable, ClassVar, NamedTuple

from tinylm.config_files import field_type_problems, non_finite_problems, toml_module
from tinylm.atomic import write_atomic
from tinylm.errors import ConfigError, TinyLMError
from tinylm.nn.block import NORMS as _NORMS
from tinylm.nn.mlp import ACTIVATIONS as _ACTIVATIONS


class Architecture(NamedTuple):
    """What ``register_architectures`` registers: the config class and a callable that
    builds the model from a config (usually the model class)."""

    config: type
    model: Callable


_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "dict": (dict,)}


@dataclass
class ModelConfig:
    """The fields every family shares. ``None`` sizes are derived: ``head_dim`` =
    d_model / n_head, ``n_kv_head`` = n_head, ``d_ff`` = 4 d_model."""

    architecture: ClassVar[str] = ""

    vocab_size: int = 50257
    d_model: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None
    head_dim: int | None = None
    d_ff: int | None = None
    max_positions: int = 1024
    positional: str = "learned"
    positional_options: dict = field(default_factory=dict)
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_position: str = "pre"
    activation: str = "gelu_tanh"
    gated_mlp: bool = False
    bias: bool = True
    attn_scale: float | None = None  # None: 1/sqrt(head_dim)
    dropout: float = 0.0  # embeddings and residual branches
    attn_dropout: float = 0.0
    mlp_dropout: float = 0.0  # inside the feed-forward (T5)
    tie_embeddings: bool = True
    n_experts: int = 0  # > 0: every feed-forward is a mixture of experts
    moe_top_k: int = 2
    moe_renormalize: bool = True
    moe_aux_coef: float = 0.01  # weight of the load-balancing loss in the total loss
    init_std: float = 0.02
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    # ------------------------------------------------------------------ derived sizes

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_size(self) -> int:
        return self.d_model // self.n_head if self.head_dim is None else self.head_dim

    @property
    def ff_size(self) -> int:
        return 4 * self.d_model if self.d_ff is None else self.d_ff

    # ------------------------------------------------------------------ checks

    def __post_init__(self):
        problems = field_type_problems(self, _TYPES) or non_finite_problems(self)
        if not problems:
            problems = self._check()
        if problems:
            raise ConfigError(f"invalid {type(self).__name__}: " + "; ".join(problems))

    def _check(self) -> list:
        p = []
        for name in ("vocab_size", "d_model", "n_layer", "n_head", "max_positions"):
            if getattr(self, name) <= 0:
                p.append(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("n_kv_head", "head_dim", "d_ff"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                p.append(f"{name} must be positive (or unset), got {getattr(self, name)}")
        if p:
            return p
        if not self.norm_eps > 0:
            p.append(f"norm_eps must be > 0 (it keeps the norm's division finite), got "
                     f"{self.norm_eps}")
        if self.init_std < 0:
            p.append(f"init_std must be >= 0, got {self.init_std}")
        if self.attn_scale is not None and not self.attn_scale > 0:
            p.append(f"attn_scale must be > 0 (or unset: 1/sqrt(head_dim)), got "
                     f"{self.attn_scale}")
        if self.moe_aux_coef < 0:
            p.append(f"moe_aux_coef must be >= 0, got {self.moe_aux_coef}")
        if self.head_dim is None and self.d_model % self.n_head:
            p.append(f"d_model={self.d_model} is not divisible by n_head={self.n_head} "
                     f"(or set head_dim)")
        if self.kv_heads <= 0 or self.n_head % self.kv_heads:
            p.append(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if self.norm not in _NORMS:
            p.append(f"norm must be one of {_NORMS}, got {self.norm!r}")
        if self.norm_position not in ("pre", "post"):
            p.append(f"norm_position must be 'pre' or 'post', got {self.norm_position!r}")
        if self.activation not in _ACTIVATIONS:
            p.append(f"activation must be one of {_ACTIVATIONS}, got {self.activation!r}")
        for name in ("dropout", "attn_dropout", "mlp_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                p.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.n_experts < 0 or (self.n_experts and not 1 <= self.moe_top_k <= self.n_experts):
            p.append(f"moe_top_k={self.moe_top_k} must be between 1 and n_experts="
                     f"{self.n_experts}")
        return p

    # ------------------------------------------------------------------ (de)serialisation

    def to_dict(self) -> dict:
        """{"architecture": ..., field: value, ...}: what ``save`` writes."""
        return {"architecture": self.architecture, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        data = dict(data)
        arch = data.pop("architecture", cls.architecture)
        if arch != cls.architecture:
            raise ConfigError(f"{cls.__name__} is architecture {cls.architecture!r}, "
                              f"the config says {arch!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} field(s) {unknown}; the fields are "
                              f"{', '.join(names)}")
        return cls(**data)

    def replace(self, **changes) -> "ModelConfig":
        """A copy with some fields changed (checked like a new config)."""
        return dataclasses.replace(self, **changes)

    def save(self, path) -> None:
        """Write to ``path``: TOML when it ends in .toml, JSON otherwise (atomically)."""
        path = os.fspath(path)
        data = self.to_dict()
        if path.endswith(".toml"):
            defaults = type(self)()
            lost = [k for k, v in data.items()
                    if v is None and getattr(defaults, k, None) is not None]
            if lost:
                raise ConfigError(f"TOML has no null, and {lost} default to something else: "
                                  f"save this config as .json")
        text = _toml(data) if path.endswith(".toml") else json.dumps(data, indent=2) + "\n"
        write_text_atomic(path, text)


# --------------------------------------------------------------------------- families


@dataclass
class GPT2Config(ModelConfig):
    """GPT-2: learned positions, pre-LayerNorm, GELU (tanh) MLP, biases, tied head."""

    architecture: ClassVar[str] = "gpt2"


@dataclass
class LlamaConfig(ModelConfig):
    """Llama: RoPE, pre-RMSNorm, SwiGLU, no biases, GQA through n_kv_head (defaults:
    Llama-2 7B)."""

    architecture: ClassVar[str] = "llama"
    vocab_size: int = 32000
    d_model: int = 4096
    n_layer: int = 32
    n_head: int = 32
    d_ff: int | None = 11008
    max_positions: int = 2048
    positional: str = "rope"
    norm: str = "rmsnorm"
    norm_eps: float = 1e-6
    activation: str = "silu"
    gated_mlp: bool = True
    bias: bool = False
    tie_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2


@dataclass
class BertConfig(ModelConfig):
    """BERT: learned absolute + token-type embeddings with a LayerNorm, post-norm
    blocks, exact GELU; ``head`` = "mlm" (masked-LM logits), "classification"
    (``num_labels`` logits from the pooled [CLS]) or "none" (hidden states + pooled)."""

    architecture: ClassVar[str] = "bert"
    vocab_size: int = 30522
    d_ff: int | None = 3072
    max_positions: int = 512
    norm_eps: float = 1e-12
    norm_position: str = "post"
    activation: str = "gelu"
    pad_token_id: int | None = 0
    type_vocab_size: int = 2
    embed_norm: bool = True
    head: str = "mlm"
    num_labels: int = 2
    pooler: bool = True

    def _check(self) -> list:
        p = super()._check()
        if self.head not in ("mlm", "classification", "none"):
            p.append(f"head must be 'mlm', 'classification' or 'none', got {self.head!r}")
        if self.head == "classification" and (not self.pooler or self.num_labels < 1):
            p.append("a classification head needs pooler = true and num_labels >= 1")
        if self.type_vocab_size < 0:
            p.append(f"type_vocab_size must be >= 0, got {self.type_vocab_size}")
        return p


@dataclass
class T5Config(ModelConfig):
    """T5: encoder-decoder, relative position bias, pre-RMSNorm, no biases, unscaled
    attention scores, ReLU (or gated-GELU for v1.1) feed-forward; a tied LM head reads
    the decoder output scaled by d_model**-0.5 (``scale_decoder_output``)."""

    architecture: ClassVar[str] = "t5"
    vocab_size: int = 32128
    d_model: int = 512
    n_layer: int = 6
    n_head: int = 8
    head_dim: int | None = 64
    d_ff: int | None = 2048
    max_positions: int = 512  # nominal: the relative bias has no limit
    positional: str = "t5"
    norm: str = "rmsnorm"
    norm_eps: float = 1e-6
    activation: str = "relu"
    bias: bool = False
    attn_scale: float | None = 1.0
    pad_token_id: int | None = 0
    eos_token_id: int | None = 1
    n_decoder_layer: int | None = None  # None: n_layer
    decoder_start_token_id: int = 0
    scale_decoder_output: bool = True

    def _check(self) -> list:
        p = super()._check()
        if self.n_decoder_layer is not None and self.n_decoder_layer <= 0:
            p.append(f"n_decoder_layer must be positive (or unset), got {self.n_decoder_layer}")
        if self.decoder_start_token_id < 0:
            p.append(f"decoder_start_token_id must be >= 0, got {self.decoder_start_token_id}")
        return p

    @property
    def decoder_layers(self) -> int:
        return self.n_layer if self.n_decoder_layer is None else self.n_decoder_layer


# --------------------------------------------------------------------------- loading


def config_from_dict(data: dict) -> ModelConfig:
    """The config of the family named by ``data["architecture"]``."""
    from tinylm import plugins

    if not isinstance(data, dict) or "architecture" not in data:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ConfigError(f"a model config needs an 'architecture' key naming its family "
                          f"(gpt2, llama, bert, t5, ...); got {keys}")
    arch = plugins.get_architecture(data["architecture"])
    return arch.config.from_dict(data)


def read_config_file(path) -> dict:
    """The dict in a TOML or JSON file (the ``[model]`` table if the file has one)."""
    from tinylm.config_files import read_config_data

    data = read_config_data(path)
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    return data


def load_config(path) -> ModelConfig:
    """A model config from a .toml or .json file."""
    return config_from_dict(read_config_file(path))


# --------------------------------------------------------------------------- writing


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (``tinylm.atomic``)."""
    write_atomic(path, text, error=ConfigError)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}"
                                for k, x in v.items() if x is not None) + " }"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise ConfigError(f"cannot write {v!r} to TOML")


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)


def _toml(data: dict) -> str:
    """Flat TOML (TOML has no null: None fields are left out, and read back as None)."""
    return "".join(f"{_toml_key(k)} = {_toml_value(v)}\n" for k, v in data.items() if v is not None)

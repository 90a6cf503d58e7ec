"""What every model family shares: the ``BlockStack`` of blocks, the output record, init.

A family is an embedding, one or two ``BlockStack``s and a head:

    Decoder (GPT-2, Llama)  tok_emb -> BlockStack(causal)                    -> lm_head
    Encoder (BERT)          tok_emb + type_emb -> BlockStack(bidirectional)  -> MLM / classifier
    EncoderDecoder (T5)     shared -> BlockStack(bidirectional) ... BlockStack(causal, cross)
                                                                              -> lm_head

A ``BlockStack`` owns the positional scheme, the blocks and the final norm; once per
forward it turns a padding mask, causality and the scheme's position bias into one
additive attention mask, and its rotation (RoPE) into one table, and hands both (with
the cache, the encoder output, ...) to every block as one ``nn.AttentionSetup``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from tinylm import amp, backend, nn, ops
from tinylm.models.config import ModelConfig
from tinylm.nn.attention import additive_mask
from tinylm.nn.block import BlockConfig, TransformerBlock, make_norm
from tinylm.nn.recompute import recompute
from tinylm.ops.linear_cross_entropy import linear_cross_entropy
from tinylm.errors import TinyLMError
from tinylm.positional import PositionalDims, PositionalEncoding, build_positional
from tinylm.tensor import Tensor


@dataclass
class ModelOutput:
    """What a model's forward returns; fields a family does not produce stay None.

    ``loss`` includes ``moe_aux_coef * aux_loss`` when the model has experts."""

    logits: Tensor | None = None  # (B, T, vocab) or (B, num_labels)
    loss: Tensor | None = None
    aux_loss: Tensor | None = None  # MoE load balancing, summed over layers
    hidden_states: Tensor | None = None  # (B, T, d): the last stack's output
    pooled: Tensor | None = None  # (B, d): BERT's pooler output
    encoder_hidden_states: Tensor | None = None  # (B, S, d): T5's encoder output


def block_config(c: ModelConfig, cross: bool = False) -> BlockConfig:
    """The BlockConfig every block of a stack is built from."""
    return BlockConfig(
        d_model=c.d_model, n_head=c.n_head, d_ff=c.ff_size, n_kv_head=c.kv_heads,
        head_dim=c.head_size, activation=c.activation, gated=c.gated_mlp, bias=c.bias,
        norm=c.norm, norm_eps=c.norm_eps, norm_position=c.norm_position, dropout=c.dropout,
        attn_dropout=c.attn_dropout, mlp_dropout=c.mlp_dropout, attn_scale=c.attn_scale,
        cross=cross, n_experts=c.n_experts, moe_top_k=c.moe_top_k,
        moe_renormalize=c.moe_renormalize,
    )


def positional_from_config(c: ModelConfig, bidirectional: bool):
    dims = PositionalDims(c.d_model, c.n_head, c.head_size, c.max_positions, bidirectional)
    return build_positional(c.positional, dims, c.positional_options)


class BlockStack(nn.Module):
    """Positional scheme, ``n_layer`` blocks, final norm (pre-norm models only)."""

    def __init__(self, c: ModelConfig, n_layer: int, causal: bool, cross: bool = False,
                 embed_norm: bool = False, final_dropout: bool = False):
        super().__init__()
        self.causal, self.final_dropout = causal, final_dropout
        self.pos = positional_from_config(c, bidirectional=not causal)
        self.embed_norm = make_norm(c.norm, c.d_model, c.norm_eps, c.bias) if embed_norm else None
        self.drop = nn.Dropout(c.dropout)
        block = block_config(c, cross)
        self.blocks = nn.ModuleList(TransformerBlock(block) for _ in range(n_layer))
        pre = c.norm_position == "pre"
        self.norm = make_norm(c.norm, c.d_model, c.norm_eps, c.bias) if pre else None
        self.checkpoint_blocks = False  # Model.gradient_checkpointing() switches it

    def forward(self, x, attention_mask=None, cache=None, memory=None, memory_mask=None,
                positions=None, prefix_length=None):
        """x (B, T, d) token embeddings -> (hidden (B, T, d), MoE aux loss or None).

        ``attention_mask`` (B, S): 1 = token, 0 = padding, over every key position (the
        cached ones too); ``positions`` (T,) or (B, T): defaults to past .. past+T-1;
        ``memory`` (B, S', d) and ``memory_mask`` (B, S'): what cross-attention reads;
        ``prefix_length`` (B,): a prefix LM's bidirectional prefix (see ``additive_mask``)."""
        T, xp = x.shape[1], x.xp
        past = cache.length if cache is not None else 0
        q_pos = xp.arange(past, past + T) if positions is None else _array(positions, xp)
        k_pos = cache.advance(q_pos) if cache is not None else q_pos  # (S,) or (B, S)
        x = self.pos.embed(x, q_pos)  # (B, T, d)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.drop(x)
        keep = _padding(attention_mask, xp)
        memory_keep = _padding(memory_mask, xp)
        setup = nn.AttentionSetup(
            **self._self_attention(q_pos, k_pos, keep, prefix_length, x.dtype),
            rotate=self.pos.rotation(q_pos), cache=cache, memory=memory,
            memory_mask=None if memory_keep is None else additive_mask(
                memory_keep, T, memory.shape[1], False, x.dtype, xp),  # (B, 1, T, S')
            token_mask=None if keep is None else keep[:, -T:],  # (B, T)
        )
        aux = None
        checkpoint = self.checkpoint_blocks and cache is None  # a cache is state: see recompute
        for block in self.blocks:
            x, a = recompute(block, x, setup) if checkpoint else block(x, setup)
            aux = a if aux is None else (aux if a is None else aux + a)
        if self.norm is not None:
            x = self.norm(x)
        if self.final_dropout:
            x = self.drop(x)
        return x, aux

    def _self_attention(self, q_pos, k_pos, keep, prefix_length, dtype) -> dict:
        """The self-attention part of the setup: ``mask`` (the padding / prefix-LM mask
        plus the scheme's position bias), ``is_causal`` and ``alibi_slopes``. ALiBi
        goes as slopes when keys sit at the default positions 0..S-1 (the attention op
        assumes them), else as a position bias spelled out."""
        xp = backend.get_array_module(k_pos)
        slopes = self.pos.alibi_slopes()
        if slopes is not None and (k_pos.ndim != 1 or
                                   not bool((k_pos == xp.arange(len(k_pos))).all())):
            slopes = None
        # (1|B, H, T, S): ALiBi's or T5's bias, or None
        mask = None if slopes is not None else self.pos.position_bias(q_pos, k_pos)
        is_causal = self.causal
        if keep is not None or prefix_length is not None:  # the mask folds causality in
            pad = additive_mask(keep, q_pos.shape[-1], k_pos.shape[-1], self.causal, dtype, xp,
                                prefix_length=prefix_length)  # (B, 1, T, S)
            mask, is_causal = (pad if mask is None else mask + pad), False
        return dict(mask=mask, is_causal=is_causal, alibi_slopes=slopes)


def head_loss(head, h, targets):
    """The mean cross-entropy of ``head(h)`` against ``targets`` without making all
    the logits at once (``ops.linear_cross_entropy``), or None when the head is not
    one it takes (a trained head that is not a plain Linear: an adapter on it; a
    bias; autocast): the caller then makes the logits."""
    if amp.compute_dtype() is not None or getattr(head, "bias", None) is not None:
        return None
    targets = _array(targets, h.xp)
    if type(head) is nn.Linear and all(p is head.weight for p in head.parameters()):
        return linear_cross_entropy(h, targets, weight=head.weight)  # no adapter inside
    vocab = getattr(head, "out_features", None)
    if vocab and not any(p.requires_grad for p in head.parameters()):  # a frozen (packed) head
        return linear_cross_entropy(h, targets, head=head, vocab_size=vocab)
    return None


def one_of(value, alias, name: str, alias_name: str):
    """``value`` or its Hugging Face spelling ``alias`` (``ids`` / ``input_ids``), the one
    that is given; both given is an error."""
    if alias is None:
        return value
    if value is not None:
        raise TinyLMError(f"give {name} or {alias_name}, not both: they are the same argument "
                          f"({alias_name} is the Hugging Face name)")
    return alias


def _array(a, xp):
    return xp.asarray(a.data if isinstance(a, Tensor) else a)


def _padding(mask, xp):
    """The padding mask as an array, or None when there is none (or it keeps everything)."""
    if mask is None:
        return None
    mask = _array(mask, xp)
    return None if bool(mask.all()) else mask


class Model(nn.Module):
    """Base of the model families: a ``config``, weight init, the output record, and
    ``save_pretrained`` (Hugging Face format, see ``tinylm.models.hf``).

    ``kind`` says which objectives and decoding a family supports: "decoder",
    "encoder" or "encoder-decoder" (``tinylm.objectives.model_kind`` reads it)."""

    config_class: ClassVar[type] = ModelConfig
    kind: ClassVar[str | None] = None

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config

    def init_weights(self) -> None:
        """GPT-2's init: Linear and embedding weights ~ N(0, init_std), biases 0, norms 1;
        the projections that write into the residual stream (attention ``out``, MLP
        ``down``) get init_std / sqrt(2 n_layers) so the stream's variance stays put."""
        if not nn.initialising():  # inside nn.skip_init(): a loader fills every weight
            return
        std = self.config.init_std
        n_layers = sum(len(m.blocks) for m in self.modules() if isinstance(m, BlockStack))
        gen = backend.rng(np)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                residual = name.endswith((".out", ".down"))
                s = std / math.sqrt(2 * max(n_layers, 1)) if residual else std
                m.weight.data[...] = gen.normal(0.0, s, m.weight.shape)
                if m.bias is not None:
                    m.bias.data[...] = 0
            elif isinstance(m, (nn.Embedding, PositionalEncoding)) and "weight" in m._parameters:
                m.weight.data[...] = gen.normal(0.0, std, m.weight.shape)

    def gradient_checkpointing(self, enabled: bool = True) -> "Model":
        """Activation checkpointing on (or off) for every block of every stack: a block
        keeps only its input for backward and runs again when backward reaches it
        (``tinylm.nn.recompute``): far less memory for about one more forward's work.
        Gradients are the same; blocks that read a KV cache run as usual."""
        for m in self.modules():
            if isinstance(m, BlockStack):
                m.checkpoint_blocks = bool(enabled)
        return self

    def gradient_checkpointing_enable(self) -> "Model":
        """Hugging Face's name for ``gradient_checkpointing(True)``."""
        return self.gradient_checkpointing(True)

    def gradient_checkpointing_disable(self) -> "Model":
        """Hugging Face's name for ``gradient_checkpointing(False)``."""
        return self.gradient_checkpointing(False)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(m.checkpoint_blocks for m in self.modules() if isinstance(m, BlockStack))

    def as_ids(self, ids):
        """Token ids as an integer array on the model's device."""
        xp = next(iter(self.parameters())).xp
        ids = xp.asarray(ids.data if isinstance(ids, Tensor) else ids)
        if ids.ndim != 2:
            raise TinyLMError(f"token ids must be (batch, time), got shape {ids.shape}")
        return ids

    def output(self, logits, targets=None, aux=None, loss=None, **fields) -> ModelOutput:
        """The ModelOutput, with the loss when ``targets`` are given (-100 = ignore):
        cross-entropy of ``logits``, or ``loss`` when the caller computed it already."""
        if targets is not None:
            if loss is None:
                loss = ops.cross_entropy(logits, _array(targets, logits.xp))
            if aux is not None and self.config.moe_aux_coef:
                loss = loss + aux * self.config.moe_aux_coef
        return ModelOutput(logits=logits, loss=loss, aux_loss=aux, **fields)

    def save_pretrained(self, path, **kwargs) -> None:
        """Write a Hugging Face checkpoint directory (config.json + safetensors)."""
        from tinylm.models.hf import save_pretrained

        save_pretrained(self, path, **kwargs)

"""Prefix tuning (Li & Liang, 2021): every self-attention layer of a frozen decoder
attends to ``num_virtual_tokens`` P learned keys and values in front of the real ones.

    model = peft.apply(model, "prefix_tuning", num_virtual_tokens=10)
    model = peft.apply(model, "prefix_tuning", num_virtual_tokens=10,
                       prefix_projection=True, encoder_hidden_size=128)   # reparametrised

The numbers that learn are PEFT's ``PrefixEncoder``: ``embedding`` (P, 2 L kv) holding
every layer's keys and values directly, or, with ``prefix_projection``, ``embedding``
(P, kv) through an MLP ``transform_out(tanh(transform_in(.)))`` (kv -> hidden -> 2 L kv)
that reparametrises them (more stable training, as the paper says). kv = n_kv_head x
head_dim (PEFT's ``token_dim`` for GQA models), L = the number of layers. Row p, split
as PEFT splits it, is (2 L, n_kv_head, head_dim): layer i's key is slot 2i, its value
slot 2i + 1.

The prefixes go through the attention's KV-cache path, as PEFT feeds them to a Hugging
Face model as ``past_key_values``: the adapter's host is the decoder's ``BlockStack``;
without a cache (training) it runs the forward with a ``PrefixCache`` holding the
prefixes as Tensors, so gradients reach them; given an empty ``KVCache``
(``tinylm.generate``) it writes the prefixes into it first (as constants) and marks it,
so later steps find them there. The P prefix positions come first: the real tokens
sit at positions P.. (RoPE rotates them there; the prefix keys, stored as they are,
are not rotated: PEFT's behaviour), an ``attention_mask`` over the real tokens gets P
ones in front, given ``positions`` and ``prefix_length`` grow by P. Logits are the
real tokens' only (B, T, V). To decode with the prefixes in the graph, start from
``adapter.new_cache(model.transformer, batch)``. As with prompt tuning, the prefix
positions count against ``max_positions`` (generate keeps max_positions - P tokens of
context); speculative decoding takes them on either model.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tinylm import backend, nn, ops
from tinylm.autograd import no_grad
from tinylm.errors import ConfigError
from tinylm.nn.attention import KVCache
from tinylm.nn.module import Parameter
from tinylm.peft.base import Adapter, PeftConfig, PeftMethod, install
from tinylm.peft.bottleneck import adapter_dtype
from tinylm.peft.prompt import VIRTUAL, bind, cache_state, decoder_stack, shift_inputs

INIT_WEIGHTS = (None, "zero")


@dataclasses.dataclass(frozen=True)
class PrefixTuningConfig(PeftConfig):
    """``num_virtual_tokens`` P >= 1; ``prefix_projection``: reparametrise through an MLP
    of ``encoder_hidden_size`` (None: kv, as PEFT) hidden units; ``init_weights``
    None (random, as PEFT: N(0, 1) embeddings, torch-initialised Linears) or "zero"
    (the keys and values start at 0)."""

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    init_weights: str | None = None

    def __post_init__(self):
        problems = []
        P, hidden = self.num_virtual_tokens, self.encoder_hidden_size
        if isinstance(P, bool) or not isinstance(P, (int, np.integer)) or P < 1:
            problems.append(f"num_virtual_tokens must be an integer >= 1, got {P!r}")
        if not isinstance(self.prefix_projection, bool):
            problems.append(f"prefix_projection must be True or False, got "
                            f"{self.prefix_projection!r}")
        if hidden is not None and (isinstance(hidden, bool) or
                                   not isinstance(hidden, (int, np.integer)) or hidden < 1):
            problems.append(f"encoder_hidden_size must be an integer >= 1 or None, got "
                            f"{hidden!r}")
        if self.init_weights not in INIT_WEIGHTS:
            problems.append(f"init_weights must be None or 'zero', got {self.init_weights!r}")
        if problems:
            raise ConfigError("invalid PrefixTuningConfig: " + "; ".join(problems))


# --------------------------------------------------------------------------- the cache


class PrefixCache(KVCache):
    """A KVCache whose every self-attention layer starts with a prefix: ``prefixes``
    {id(attention layer): (k, v)} of (B, Hkv, P, hs) Tensors, in front of whatever the
    layer adds. Unlike the past of a plain KVCache, the prefixes stay in the graph:
    gradients flow into them. ``keep`` False: a one-forward cache (training) that
    stores nothing it is given."""

    def __init__(self, prefixes: dict, length: int, xp=np, keep: bool = True):
        super().__init__()
        self.prefixes, self.num_prefix, self.keep = prefixes, int(length), keep
        self.positions = xp.arange(self.num_prefix)  # the prefix's positions 0..P-1

    def update(self, layer, k, v):
        """(B, Hkv, P + S, hs) keys and values: the prefix, the stored past (``keep``), k, v."""
        pk, pv = self.prefixes[id(layer)]
        if self.keep:
            k, v = super().update(layer, k, v)  # (B, Hkv, S, hs)
        if pk.dtype != k.dtype:
            pk, pv = ops.cast(pk, k.dtype), ops.cast(pv, v.dtype)
        return ops.concat([pk, k], axis=2), ops.concat([pv, v], axis=2)

    def crop(self, length: int) -> None:
        """Forget every position after the first ``length`` (the prefix counts)."""
        length = max(int(length), self.num_prefix)
        for slot in self._slots.values():
            slot.length = min(slot.length, length - self.num_prefix)
        self.positions = self.positions[..., :length]

    def reorder(self, index) -> None:
        super().reorder(index)
        self.prefixes = {key: (k[index], v[index]) for key, (k, v) in self.prefixes.items()}


# --------------------------------------------------------------------------- the adapter


class PrefixAdapter(Adapter):
    """PEFT's PrefixEncoder on a BlockStack: per-layer key/value prefixes."""

    method = "prefix_tuning"

    def __init__(self, name: str, config: PrefixTuningConfig, n_layer: int, n_kv_head: int,
                 head_dim: int, dtype, device):
        super().__init__(name)
        P, kv = config.num_virtual_tokens, n_kv_head * head_dim
        self.num_virtual_tokens, self.n_layer = P, n_layer
        self.n_kv_head, self.head_dim = n_kv_head, head_dim
        self.projection = config.prefix_projection
        gen = backend.rng(np)
        width = kv if self.projection else 2 * n_layer * kv
        table = gen.standard_normal((P, width))
        if config.init_weights == "zero" and not self.projection:
            table[...] = 0
        self.embedding = Parameter(table, dtype=dtype, device=device)
        if self.projection:
            hidden = config.encoder_hidden_size or kv
            self.transform_in = nn.Linear(kv, hidden, dtype=dtype, device=device)
            self.transform_out = nn.Linear(hidden, 2 * n_layer * kv, dtype=dtype, device=device)
            if config.init_weights == "zero":
                self.transform_out.weight.data[...] = 0
                self.transform_out.bias.data[...] = 0

    def virtual_kv(self):
        """(P, 2 L kv): every layer's prefix keys and values, PEFT's ``prompt_embeddings``."""
        if not self.projection:
            return self.embedding
        return self.transform_out(ops.tanh(self.transform_in(self.embedding)))

    def layer_prefixes(self, stack, batch: int) -> dict:
        """{id(block.attn): (k, v)}, each (batch, Hkv, P, hs), for every block of ``stack``."""
        P, L, H, hs = self.num_virtual_tokens, self.n_layer, self.n_kv_head, self.head_dim
        table = self.virtual_kv().reshape(P, 2 * L, H, hs).transpose(1, 2, 0, 3)  # (2L, H, P, hs)
        out = {}
        for i, block in enumerate(stack.blocks):
            k, v = (ops.broadcast_to(ops.unsqueeze(table[j], 0), (batch, H, P, hs))
                    for j in (2 * i, 2 * i + 1))  # (B, H, P, hs)
            out[id(block.attn)] = (k, v)
        return out

    def new_cache(self, stack, batch: int) -> PrefixCache:
        """A PrefixCache for ``batch`` rows that keeps what it is given: decoding step by
        step with the prefixes in the graph (a plain KVCache holds them as constants)."""
        cache = PrefixCache(self.layer_prefixes(stack, batch), self.num_virtual_tokens,
                            self.embedding.xp)
        setattr(cache, VIRTUAL, (self.name, self.num_virtual_tokens))
        return cache

    def before(self, host, args, kwargs):
        a = bind(host, args, kwargs)
        x, P, cache = a["x"], self.num_virtual_tokens, a["cache"]
        state = cache_state(cache, self.name, P)
        if state == "none":  # training: the prefixes stay in the graph
            a["cache"] = PrefixCache(self.layer_prefixes(host, x.shape[0]), P, x.xp, keep=False)
        elif state == "fresh":  # a caller's cache (generation): write the prefixes in
            with no_grad():
                prefixes = self.layer_prefixes(host, x.shape[0])
                for block in host.blocks:
                    k, v = prefixes[id(block.attn)]
                    if k.dtype != x.dtype:
                        k, v = ops.cast(k, x.dtype), ops.cast(v, x.dtype)
                    cache.update(block.attn, k, v)
            cache.advance(x.xp.arange(P))
            setattr(cache, VIRTUAL, (self.name, P))
        shift_inputs(a, P, x.xp, virtual_queries=False)
        return (), a

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, num_virtual_tokens={self.num_virtual_tokens}"
                + (", projection" if self.projection else ""))


class PrefixTuning(PeftMethod):
    name = "prefix_tuning"
    config_class = PrefixTuningConfig

    def attach(self, model, config: PrefixTuningConfig, adapter_name: str) -> list:
        stack = decoder_stack(model, "prefix tuning")
        attn = stack.blocks[0].attn
        dtype, device = adapter_dtype(stack)
        install(stack, PrefixAdapter(adapter_name, config, len(stack.blocks), attn.n_kv_head,
                                     attn.head_dim, dtype, device))
        return ["transformer"]

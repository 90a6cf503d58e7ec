"""Prompt tuning (Lester et al., 2021): ``num_virtual_tokens`` learned embeddings put in
front of the input embeddings of a frozen decoder; only those P x d numbers learn.

    model = peft.apply(model, "prompt_tuning", num_virtual_tokens=8)
    out = model(ids, targets=targets, attention_mask=mask)   # logits (B, T, V), as ids

Where it acts: the adapter's host is the decoder's ``BlockStack`` (``transformer``), so
the virtual embeddings (P, d) join the token embeddings (B, T, d) where PEFT joins them
to ``inputs_embeds``: before the positional scheme, which then sees P + T positions.

Positions: the virtual tokens take positions 0..P-1 and the real tokens P.., as PEFT's
``PeftModelForCausalLM`` gives a Hugging Face model (learned positions add ``wpe`` to
the virtual tokens too; RoPE rotates them), so logits match PEFT's for GPT-2 and
Llama. Positions the caller gives (left-padded generation) are shifted by P.

Logits: NOT returned for the virtual positions. PEFT returns (B, P + T, V) and pads
the labels with -100; tinylm drops the first P hidden states, so ``logits[:, t]`` is
still the prediction after ``ids[:, t]``, ``targets`` need no padding, and everything
that reads logits (objectives, generate, eval) works unchanged. The loss equals PEFT's
(its -100 labels ignore exactly those positions). ``hidden_states`` are cut the same way.

Masks: an ``attention_mask`` (B, S) over the real tokens gets P ones in front (the
virtual tokens are never padding); ``prefix_length`` grows by P.

KV cache: the virtual tokens go in on the first forward only, when the cache is empty;
the cache is marked (``VIRTUAL``) so later steps, whose masks and positions count real
tokens only, are shifted by P too; a cache filled without this adapter is refused.
``tinylm.generate`` and beam search work unchanged. Limits: the P virtual positions
count against ``max_positions``: generate and beam search keep up to max_positions - P
tokens of context, and speculative decoding (the adapter on the target, the draft or
both) needs prompt + max_new_tokens + k + P to fit.

Init (``prompt_tuning_init``, as PEFT's ``PromptTuningInit``): "RANDOM" N(0, 1) (torch's
Embedding init, as PEFT), "SAMPLE_VOCAB" rows of the token embedding at random ids,
"TEXT" the embeddings of ``prompt_tuning_init_text`` tokenized (repeated or cut to P).
"""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np

from tinylm import backend, ops
from tinylm.errors import ConfigError, TinyLMError
from tinylm.nn.module import Parameter
from tinylm.peft.base import Adapter, PeftConfig, PeftMethod, install
from tinylm.tensor import Tensor

# the attribute a KVCache gets when its first positions are virtual: (adapter name, P)
VIRTUAL = "peft_virtual_tokens"

INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


# --------------------------------------------------------------------------- shared with prefix


def decoder_stack(model, method: str):
    """The BlockStack a virtual-token method hosts on: a decoder's ``transformer``."""
    from tinylm.models.base import BlockStack

    stack = getattr(model, "transformer", None)
    if getattr(model, "kind", None) != "decoder" or not isinstance(stack, BlockStack):
        raise TinyLMError(f"{method} needs a decoder-only model (gpt2, llama), got "
                          f"{type(model).__name__}; use lora, ia3 or bottleneck adapters")
    return stack


def bind(host, args, kwargs) -> dict:
    """The host's forward arguments by name (BlockStack.forward's), defaults filled in."""
    bound = inspect.signature(host.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def cache_state(cache, name: str, P: int) -> str:
    """"none" (no cache), "fresh" (an empty cache: the virtual tokens go in now) or
    "filled" (this adapter's virtual tokens are already cached)."""
    if cache is None:
        return "none"
    if cache.length == 0:
        return "fresh"
    mark = getattr(cache, VIRTUAL, None)
    if mark != (name, P):
        have = "no virtual tokens" if mark is None else f"adapter {mark[0]!r}'s {mark[1]}"
        raise TinyLMError(f"this KVCache holds {have}, not adapter {name!r}'s {P} virtual "
                          f"tokens; start a new KVCache after switching adapters")
    return "filled"


def shift_inputs(a: dict, P: int, xp, virtual_queries: bool) -> None:
    """Make the caller's mask / positions / prefix_length (which count real tokens only)
    cover the P virtual positions in front, in place. ``virtual_queries``: the P
    virtual tokens are among this forward's queries (prompt tuning's first forward),
    so ``positions`` gets 0..P-1 in front; otherwise only the keys have them."""
    mask = a.get("attention_mask")
    if mask is not None:
        mask = xp.asarray(mask.data if isinstance(mask, Tensor) else mask)
        if mask.ndim != 2:
            raise TinyLMError(f"attention_mask must be (batch, positions), got shape "
                              f"{tuple(mask.shape)}")
        ones = xp.ones((mask.shape[0], P), dtype=mask.dtype)
        a["attention_mask"] = xp.concatenate([ones, mask], axis=1)  # (B, P + S)
    pos = a.get("positions")
    if pos is not None:
        pos = xp.asarray(pos.data if isinstance(pos, Tensor) else pos) + P
        if virtual_queries:
            front = xp.arange(P, dtype=pos.dtype)
            if pos.ndim == 2:
                front = xp.broadcast_to(front, (pos.shape[0], P))
            pos = xp.concatenate([front, pos], axis=-1)  # (P + T,) or (B, P + T)
        a["positions"] = pos
    if a.get("prefix_length") is not None:
        pl = a["prefix_length"]
        a["prefix_length"] = xp.asarray(pl.data if isinstance(pl, Tensor) else pl) + P


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class PromptTuningConfig(PeftConfig):
    """``num_virtual_tokens`` P >= 1. ``prompt_tuning_init``: "RANDOM", "SAMPLE_VOCAB"
    or "TEXT" (then ``prompt_tuning_init_text`` and ``tokenizer_name_or_path``: a
    tokenizer file or a Hugging Face folder that tinylm reads)."""

    num_virtual_tokens: int = 20
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None

    def __post_init__(self):
        problems = []
        P = self.num_virtual_tokens
        if isinstance(P, bool) or not isinstance(P, int) or P < 1:
            problems.append(f"num_virtual_tokens must be an integer >= 1, got {P!r}")
        if self.prompt_tuning_init not in INITS:
            problems.append(f"prompt_tuning_init must be one of {INITS}, got "
                            f"{self.prompt_tuning_init!r}")
        if self.prompt_tuning_init == "TEXT" and not (self.prompt_tuning_init_text
                                                      and self.tokenizer_name_or_path):
            problems.append("prompt_tuning_init='TEXT' needs prompt_tuning_init_text and "
                            "tokenizer_name_or_path")
        if problems:
            raise ConfigError("invalid PromptTuningConfig: " + "; ".join(problems))


def init_text_ids(text: str, tokenizer, P: int) -> list:
    """PEFT's TEXT init ids: the text's tokens, cut to P or repeated until P."""
    ids = list(tokenizer.encode(text))
    if not ids:
        raise TinyLMError(f"prompt_tuning_init_text {text!r} has no tokens; give some text")
    reps = -(-P // len(ids))
    return (ids * reps)[:P]


def load_tokenizer(path):
    """A tokenizer file, or the tokenizer of a Hugging Face folder."""
    import os

    if os.path.isdir(path):
        from tinylm.loading import hf_tokenizer

        return hf_tokenizer(path)
    from tinylm.tokenizers import from_file

    return from_file(path)


def initial_prompt(config: PromptTuningConfig, model):
    """The (P, d) starting embeddings the config asks for, as a (float32 NumPy array,
    dtype, device) of the model's token embedding."""
    from tinylm.autograd import no_grad

    P, vocab = config.num_virtual_tokens, model.config.vocab_size
    gen = backend.rng(np)
    if config.prompt_tuning_init == "RANDOM":
        ids = np.zeros(1, dtype=np.int64)
    elif config.prompt_tuning_init == "SAMPLE_VOCAB":
        ids = gen.integers(0, vocab, P)
    else:
        tokenizer = load_tokenizer(config.tokenizer_name_or_path)
        ids = np.asarray(init_text_ids(config.prompt_tuning_init_text, tokenizer, P))
        if int(ids.max()) >= vocab:
            raise TinyLMError(f"the tokenizer gives id {int(ids.max())} but the model has "
                              f"{vocab} embeddings; use the model's own tokenizer")
    with no_grad():
        rows = model.tok_emb(model.as_ids(ids[None]))[0]  # (P | 1, d)
    dtype = np.dtype(np.float64 if rows.dtype == np.float64 else np.float32)  # as LoRA's
    if config.prompt_tuning_init == "RANDOM":  # torch's Embedding init, as PEFT
        return gen.standard_normal((P, rows.shape[-1])).astype(np.float32), dtype, rows.device
    return backend.to_numpy(rows.data).astype(np.float32), dtype, rows.device


# --------------------------------------------------------------------------- adapter


class PromptAdapter(Adapter):
    """``prompt_embeddings`` (P, d), PEFT's ``prompt_encoder.<name>.embedding.weight``,
    put in front of the BlockStack's input x (B, T, d) while the cache is empty."""

    method = "prompt_tuning"

    def __init__(self, name: str, prompt: np.ndarray, dtype, device):
        super().__init__(name)
        self.num_virtual_tokens = int(prompt.shape[0])
        self.prompt_embeddings = Parameter(prompt, dtype=dtype, device=device)
        self._fresh = False  # this call put the virtual tokens in: after() cuts them

    def before(self, host, args, kwargs):
        a = bind(host, args, kwargs)
        x, P = a["x"], self.num_virtual_tokens
        state = cache_state(a["cache"], self.name, P)
        fresh = state != "filled"
        if fresh:
            prompt = self.prompt_embeddings
            if prompt.dtype != x.dtype:
                prompt = ops.cast(prompt, x.dtype)
            B, d = x.shape[0], x.shape[2]
            prompt = ops.broadcast_to(ops.unsqueeze(prompt, 0), (B, P, d))  # (B, P, d)
            a["x"] = ops.concat([prompt, x], axis=1)  # (B, P + T, d)
            if state == "fresh":
                setattr(a["cache"], VIRTUAL, (self.name, P))
        shift_inputs(a, P, x.xp, virtual_queries=fresh)
        self._fresh = fresh  # not re-entered: a BlockStack does not run inside itself
        return (), a

    def after(self, host, args, kwargs, y):
        if not self._fresh:
            return y
        h, aux = y
        return h[:, self.num_virtual_tokens:], aux  # (B, T, d): the real tokens

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_virtual_tokens={self.num_virtual_tokens}"


class PromptTuning(PeftMethod):
    name = "prompt_tuning"
    config_class = PromptTuningConfig

    def attach(self, model, config: PromptTuningConfig, adapter_name: str) -> list:
        stack = decoder_stack(model, "prompt tuning")
        prompt, dtype, device = initial_prompt(config, model)
        install(stack, PromptAdapter(adapter_name, prompt, dtype, device))
        return ["transformer"]

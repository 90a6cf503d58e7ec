"""Decoder-only language models: GPT-2 and Llama from one class and config switches.

    GPT2Config:  learned positions, LayerNorm, GELU (tanh) MLP, biases, tied lm_head
    LlamaConfig: RoPE, RMSNorm, SwiGLU, no biases, GQA (n_kv_head), separate lm_head

    config = LlamaConfig(vocab_size=100, d_model=64, n_layer=2, n_head=4, n_kv_head=2, d_ff=172)
    model = Decoder(config)
    out = model(ids, targets=ids_shifted)           # out.logits (B, T, 100), out.loss
"""

from __future__ import annotations

from typing import ClassVar

from tinylm import nn
from tinylm.errors import TinyLMError
from tinylm.models.base import BlockStack, Model, head_loss, one_of
from tinylm.models.config import ModelConfig


class Decoder(Model):
    kind: ClassVar[str] = "decoder"

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.transformer = BlockStack(c, c.n_layer, causal=True)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.init_weights()

    # False: a forward with targets computes the loss straight from the hidden states
    # (``ops.linear_cross_entropy``: no (B, T, vocab) logits) and returns logits=None
    # (``tinylm finetune`` sets it; forward's ``return_logits=`` decides per call)
    return_logits: bool = True

    def forward(self, ids=None, targets=None, attention_mask=None, cache=None, positions=None,
                prefix_length=None, *, input_ids=None, return_logits=None):
        """ids (B, T) (or ``input_ids=``, its Hugging Face name) -> ModelOutput with
        logits (B, T, vocab).

        ``targets`` (B, T) are the next tokens, already shifted (targets[:, t] follows
        ids[:, t]); -100 is ignored. ``attention_mask`` (B, S): 1 = token, 0 = padding,
        S = cached + new positions. ``cache``: a ``tinylm.nn.KVCache`` to decode with
        (feed only the new tokens). ``positions``: (T,) or (B, T) position ids, e.g.
        for left-padded batches; default past .. past+T-1. ``prefix_length`` (B,): a
        prefix LM, whose first prefix_length positions attend bidirectionally.
        ``return_logits=False`` with ``targets``: the loss only, in chunks of rows
        without the whole (B, T, vocab) logits (``logits`` is None); default: the
        model's ``return_logits`` attribute (True)."""
        ids = one_of(ids, input_ids, "ids", "input_ids")
        if ids is None:
            raise TinyLMError("Decoder needs the token ids (ids= or input_ids=)")
        ids = self.as_ids(ids)
        x = self.tok_emb(ids)  # (B, T, d)
        h, aux = self.transformer(x, attention_mask, cache=cache, positions=positions,
                                  prefix_length=prefix_length)  # (B, T, d)
        if targets is not None and not (self.return_logits if return_logits is None
                                        else return_logits):
            loss = head_loss(self.lm_head, h, targets)
            if loss is not None:
                return self.output(None, targets, aux, loss=loss, hidden_states=h)
        logits = self.lm_head(h)  # (B, T, vocab)
        return self.output(logits, targets, aux, hidden_states=h)

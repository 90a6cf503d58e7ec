"""Encoder-only models: BERT, with a masked-LM head or a sequence-classification head.

    model = Encoder(BertConfig(vocab_size=100, d_model=64, n_layer=2, n_head=4, d_ff=128))
    out = model(ids, attention_mask=mask, token_type_ids=types)
    out.logits           # (B, T, vocab) masked-LM logits ("mlm" head)
    out.hidden_states    # (B, T, d) the encoder's output

``config.head``: "mlm" (BertForMaskedLM), "classification" (BertForSequence-
Classification: logits (B, num_labels) from the pooled [CLS] vector), "none"
(BertModel: hidden states and the pooled vector).
"""

from __future__ import annotations

from typing import ClassVar

from tinylm import nn, ops
from tinylm.errors import TinyLMError
from tinylm.models.base import BlockStack, Model, one_of
from tinylm.models.config import BertConfig
from tinylm.nn.block import make_norm
from tinylm.nn.mlp import get_activation


class MaskedLMHead(nn.Module):
    """dense -> activation -> LayerNorm -> decoder (tied to the word embeddings) + bias."""

    def __init__(self, c: BertConfig, embedding: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(c.d_model, c.d_model)
        self.act = get_activation(c.activation)
        self.norm = make_norm(c.norm, c.d_model, c.norm_eps, c.bias)
        self.decoder = nn.Linear(c.d_model, c.vocab_size)
        if c.tie_embeddings:
            self.decoder.weight = embedding.weight

    def forward(self, h):
        return self.decoder(self.norm(self.act(self.dense(h))))  # (B, T, vocab)


class Encoder(Model):
    kind: ClassVar[str] = "encoder"
    config_class = BertConfig

    def __init__(self, config: BertConfig):
        super().__init__(config)
        c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.type_emb = nn.Embedding(c.type_vocab_size, c.d_model) if c.type_vocab_size else None
        self.encoder = BlockStack(c, c.n_layer, causal=False, embed_norm=c.embed_norm)
        self.pooler = nn.Linear(c.d_model, c.d_model) if c.pooler and c.head != "mlm" else None
        if c.head == "mlm":
            self.head = MaskedLMHead(c, self.tok_emb)
        elif c.head == "classification":
            self.head = nn.Sequential(nn.Dropout(c.dropout), nn.Linear(c.d_model, c.num_labels))
        self.init_weights()

    def forward(self, ids=None, targets=None, attention_mask=None, token_type_ids=None, *,
                input_ids=None):
        """ids (B, T) (or ``input_ids=``, its Hugging Face name) -> ModelOutput.
        ``targets``: (B, T) token ids to predict (-100 elsewhere) for "mlm"; (B,) labels
        for "classification" (float scores and a squared-error loss when num_labels = 1,
        as Hugging Face does)."""
        ids = one_of(ids, input_ids, "ids", "input_ids")
        if ids is None:
            raise TinyLMError("Encoder needs the token ids (ids= or input_ids=)")
        ids = self.as_ids(ids)
        x = self.tok_emb(ids)  # (B, T, d)
        if self.type_emb is not None:
            types = ids * 0 if token_type_ids is None else self.as_ids(token_type_ids)
            x = x + self.type_emb(types)  # (B, T, d)
        h, aux = self.encoder(x, attention_mask)  # (B, T, d)
        pooled = None if self.pooler is None else ops.tanh(self.pooler(h[:, 0]))  # (B, d)
        head = self.config.head
        if head == "none":
            return self.output(None, None, aux, hidden_states=h, pooled=pooled)
        logits = self.head(h if head == "mlm" else pooled)  # (B, T, vocab) or (B, labels)
        if head == "classification" and self.config.num_labels == 1 and targets is not None:
            diff = logits.reshape(-1) - _floats(targets, logits)  # (B,)
            out = self.output(logits, None, aux, hidden_states=h, pooled=pooled)
            out.loss = (diff * diff).mean()
            return out
        return self.output(logits, targets, aux, hidden_states=h, pooled=pooled)


def _floats(targets, like):
    data = targets.data if hasattr(targets, "data") else targets
    return like.xp.asarray(data, dtype=like.dtype).reshape(-1)  # (B,)

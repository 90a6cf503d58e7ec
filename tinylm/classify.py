"""Sequence classification: a head on an encoder (BERT's pooled [CLS]) or a decoder
(its last token), sentences and sentence pairs encoded into batches, the training
objective, and predictions.

    model, fresh = with_head(model, num_labels=2)        # BertForSequenceClassification
    enc = Encoding.for_model(model, tokenizer, max_length=128)
    data = ClassifyData.from_rows(glue.read_tsv("train.tsv", "sst2"), enc)
    Trainer(config, model=model, tokenizer=tokenizer, data=data, objective=Classify()).fit()
    logits = predict(model, enc.sentences(rows))          # (n, num_labels) float64

The heads are Hugging Face's *ForSequenceClassification ones:

- an encoder (tinylm's BERT) becomes ``head = "classification"``: the pooler
  (tanh(dense(h[:, 0])), the [CLS] vector) -> dropout -> a linear ``num_labels``
  layer, BertForSequenceClassification exactly (``save_pretrained`` writes that
  folder). A masked-LM BERT has no pooler: it is drawn fresh, with the classifier;
  the encoder's weights are kept.
- a decoder (GPT-2, Llama) gets ``score``, a linear (num_labels, d) layer without
  bias ~ N(0, init_std), read at each row's last token that is not the pad id (Hugging
  Face's rule, ``tinylm.align.reward.last_tokens``, shared with the reward models):
  GPT2ForSequenceClassification / LlamaForSequenceClassification. The hidden states
  are the decoder's (final norm on, lm_head skipped: no (B, T, vocab) logits); right
  padding needs no attention mask, as a causal decoder's real tokens never see it.

``num_labels = 1`` is regression (STS-B): the score itself, a squared-error loss,
as Hugging Face does for one label. Inputs, as Hugging Face's tokenizers build them:
an encoder reads ``[CLS] a [SEP]`` or ``[CLS] a [SEP] b [SEP]`` with token type ids 0
up to the first [SEP] and 1 after it (a tokenizer without [CLS] / [SEP] leaves them
out: [SEP] falls back to <|endoftext|>); a decoder reads ``a`` or ``a <eos> b`` (no
token types). A pair longer than ``max_length`` is cut as the ``tokenizers``
library's "longest_first" truncation cuts it (see ``truncate_pair``); special tokens
in the text are plain text.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tinylm import backend, ops
from tinylm.align.reward import last_tokens
from tinylm.autograd import no_grad
from tinylm.instruct import ExampleData
from tinylm.objectives import EOT, Objective, ObjectiveError, model_kind

KINDS = ("encoder", "decoder")


class ClassifyError(ObjectiveError):
    """A model, tokenizer or data set that sequence classification cannot use."""


# --------------------------------------------------------------------------- the head


def num_labels(model) -> int | None:
    """The classes of ``model``'s head (1: regression), None when it has none."""
    if model_kind(model) == "encoder":
        c = model.config
        return c.num_labels if getattr(c, "head", None) == "classification" else None
    score = getattr(model, "_modules", {}).get("score")
    return None if score is None else int(score.weight.shape[0])


def with_head(model, n_labels: int) -> tuple:
    """(model, names of the parameters drawn fresh): ``model`` with a classification
    head of ``n_labels`` classes (the module docstring's), one it has kept as it is.
    An encoder is rebuilt as head = "classification" (the new model is returned; its
    weights but the old head copied over); a decoder gets ``score`` in place. The
    fresh weights come from the backend's generator (``backend.seed`` first)."""
    if n_labels < 1:
        raise ClassifyError(f"a classifier needs at least one label, got {n_labels}")
    kind, arch = model_kind(model), getattr(model.config, "architecture", "this model")
    if kind not in KINDS:
        raise ClassifyError(f"sequence classification takes an encoder (BERT) or a decoder "
                            f"(GPT-2, Llama); {arch} is {kind or 'of unknown kind'}")
    if num_labels(model) == n_labels:
        return model, set()
    device = next(iter(model.parameters())).device
    if kind == "decoder":
        from tinylm import nn

        c = model.config
        with nn.skip_init():
            score = nn.Linear(c.d_model, n_labels, bias=False)
        score.weight.data[...] = backend.rng(np).normal(0.0, getattr(c, "init_std", 0.02),
                                                        score.weight.shape)
        model.score = score.to(device)
        return model, {"score.weight"}
    return _encoder_with_head(model, n_labels, device)


def _encoder_with_head(model, n_labels: int, device) -> tuple:
    from tinylm.models.encoder import Encoder

    if not isinstance(model, Encoder):
        raise ClassifyError(f"{type(model).__name__} has no classification head; "
                            f"sequence classification takes tinylm's BERT encoder")
    config = model.config.replace(head="classification", num_labels=n_labels, pooler=True)
    new = Encoder(config)
    old = {k: backend.to_numpy(v) for k, v in model.state_dict().items()}
    want = new.state_dict()
    keep = {k: v for k, v in old.items() if k in want and not k.startswith("head.")
            and tuple(v.shape) == tuple(want[k].shape)}
    new.load_state_dict(keep, strict=False)
    return new.to(device).train(model.training), set(want) - set(keep)


def head_names(model) -> list:
    """The names of the head's parameters (pooler, classifier / score): what trains
    beside a PEFT adapter, and what a PEFT classifier saves beside its adapter."""
    prefixes = ("head.", "pooler.") if model_kind(model) == "encoder" else ("score.",)
    return [n for n, _ in model.named_parameters() if n.startswith(prefixes)]


def classify_logits(model, batch: dict):
    """(B, num_labels) logits of a batch (``Sentences.batch``'s layout)."""
    if model_kind(model) == "encoder":
        return model(batch["ids"], attention_mask=batch["attention_mask"],
                     token_type_ids=batch["token_type_ids"]).logits  # (B, C)
    from tinylm.models.decoder import Decoder

    ids = batch["ids"]
    if type(model) is Decoder:  # the lm_head skipped: no (B, T, vocab) logits
        h, _ = model.transformer(model.tok_emb(model.as_ids(ids)))  # (B, T, d)
    else:
        h = model(ids).hidden_states
    xp = h.xp
    picked = h[xp.arange(ids.shape[0]), xp.asarray(batch["last"])]  # (B, d)
    return model.score(picked)  # (B, C)


# --------------------------------------------------------------------------- encoding


def truncate_pair(a: int, b: int, budget: int) -> tuple:
    """(kept of a, kept of b): the ``tokenizers`` library's "longest_first" cut of two
    sequences of a and b tokens to ``budget`` in all: when only the longer one must
    lose tokens it keeps budget - shorter; when both must, the first keeps budget // 2
    and the second the rest (the longer one the odd token, when they are not equal)."""
    if a + b <= budget:
        return a, b
    short, long_ = min(a, b), max(a, b)
    long_ = short if short > budget else max(short, budget - short)
    if short + long_ > budget:
        short, long_ = budget // 2, budget // 2 + budget % 2
    return (short, long_) if a <= b else (long_, short)


@dataclass(frozen=True)
class Encoding:
    """How sentences become ids for a model: its ``kind``, the ``tokenizer``,
    ``max_length`` tokens in all, the [CLS] / separator / pad ids (None: none)."""

    tokenizer: object
    kind: str
    max_length: int
    cls_id: int | None
    sep_id: int | None
    pad_id: int

    @classmethod
    def for_model(cls, model, tokenizer, max_length: int) -> "Encoding":
        """An encoder's [CLS] and [SEP] (else <|endoftext|>) and pad id ([PAD] or the
        config's, else 0); a decoder's end-of-sequence id as the pair separator and
        its pad id (the config's, else the end of sequence, as TRL pads)."""
        from tinylm.finetune import eos_id

        kind = model_kind(model)
        c, find = model.config, tokenizer.token_to_id
        if kind == "encoder":
            cls_id = find(getattr(tokenizer, "cls_token", "[CLS]"))
            sep_id = find(getattr(tokenizer, "sep_token", "[SEP]"))
            sep_id = find(EOT) if sep_id is None else sep_id
            pad = c.pad_token_id if c.pad_token_id is not None else find("[PAD]")
        else:
            cls_id, sep_id = None, eos_id(model, tokenizer)
            pad = c.pad_token_id if c.pad_token_id is not None else sep_id
        if max_length < 4:
            raise ClassifyError(f"--block-size {max_length} leaves no room for a sentence; "
                                f"give at least 4 tokens")
        return cls(tokenizer, kind, int(max_length), _int(cls_id), _int(sep_id),
                   int(pad or 0))

    def tokens(self, text: str) -> list:
        from tinylm.tokenizers.wordpiece import WordPieceTokenizer

        if isinstance(self.tokenizer, WordPieceTokenizer):
            return self.tokenizer.encode(text, add_special_tokens=False, disallowed_special=())
        return self.tokenizer.encode(text, disallowed_special=())

    def encode(self, a: str, b: str | None = None) -> tuple:
        """(ids, token type ids) of a sentence or a pair (the module docstring's layout)."""
        x, y = self.tokens(a), None if b is None else self.tokens(b)
        head = [] if self.cls_id is None or self.kind == "decoder" else [self.cls_id]
        sep = [] if self.sep_id is None else [self.sep_id]
        if self.kind == "decoder":  # a, or a <eos> b
            if y is None:
                ids = x[:self.max_length]
            else:
                na, nb = truncate_pair(len(x), len(y), self.max_length - len(sep))
                ids = x[:na] + sep + y[:nb]
            return ids, [0] * len(ids)
        if y is None:  # [CLS] a [SEP]
            ids = head + x[:self.max_length - len(head) - len(sep)] + sep
            return ids, [0] * len(ids)
        na, nb = truncate_pair(len(x), len(y), self.max_length - len(head) - 2 * len(sep))
        first, second = head + x[:na] + sep, y[:nb] + sep  # [CLS] a [SEP] | b [SEP]
        return first + second, [0] * len(first) + [1] * len(second)

    def sentences(self, rows, labels=None) -> "Sentences":
        """The rows of a ``glue.GlueRows`` (or anything with ``text_a``, ``text_b``,
        ``labels``, ``ids``) encoded; a row of no tokens is a ClassifyError."""
        b = rows.text_b if rows.text_b is not None else [None] * len(rows.text_a)
        pairs = [self.encode(x, y) for x, y in zip(rows.text_a, b)]
        empty = [i for i, (ids, _) in enumerate(pairs) if not ids]
        if empty:
            raise ClassifyError(f"row {rows.ids[empty[0]]} encodes to no tokens; give it some "
                                f"text, or leave it out")
        lengths = np.array([len(ids) for ids, _ in pairs], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = np.fromiter((t for ids, _ in pairs for t in ids), np.int64, int(offsets[-1]))
        types = np.fromiter((t for _, tt in pairs for t in tt), np.int64, int(offsets[-1]))
        labels = rows.labels if labels is None else labels
        return Sentences(tokens, types, offsets, None if labels is None else np.asarray(labels))

    def key(self) -> list:
        from tinylm.data import tokenizer_sha256

        return [tokenizer_sha256(self.tokenizer), self.kind, self.max_length, self.cls_id,
                self.sep_id, self.pad_id]


def _int(value):
    return None if value is None else int(value)


@dataclass
class Sentences:
    """n encoded examples in flat arrays: example i is ``tokens[offsets[i]:offsets[i+1]]``
    with its token types, and ``labels[i]`` (int64 classes, float64 scores, or None).
    Has what the example batcher needs (``len``, ``take``, ``batch``, ``packed``)."""

    tokens: np.ndarray  # (N,) int64
    types: np.ndarray  # (N,) int64
    offsets: np.ndarray  # (n + 1,) int64
    labels: np.ndarray | None  # (n,)
    packed = False  # examples are never packed

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def take(self, index) -> "Sentences":
        """The examples at ``index``, in that order."""
        index = np.asarray(index, dtype=np.int64)
        lengths = self.lengths[index]
        starts = np.repeat(self.offsets[index] - (np.cumsum(lengths) - lengths), lengths)
        src = starts + np.arange(int(lengths.sum()), dtype=np.int64)  # (N',)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return Sentences(self.tokens[src], self.types[src], offsets,
                         None if self.labels is None else self.labels[index])

    def batch(self, index, pad_id: int) -> dict:
        """The examples at ``index`` right-padded to the longest, T:

            ids             (B, T) int64   tokens, ``pad_id`` after each example
            attention_mask  (B, T) int64   1 = token, 0 = padding
            token_type_ids  (B, T) int64   0 first sentence, 1 second (0 on padding)
            last            (B,)   int64   each row's last id that is not ``pad_id``
            labels          (B,)           classes (int64) or scores (float64), if any
            n_tokens        int            tokens that are not padding
        """
        index = np.asarray(index, dtype=np.int64)
        starts, lengths = self.offsets[index], self.lengths[index]  # (B,)
        j = np.arange(int(lengths.max()))  # (T,)
        real = j[None, :] < lengths[:, None]  # (B, T)
        src = np.where(real, starts[:, None] + j, 0)  # (B, T)
        ids = np.where(real, self.tokens[src], pad_id)
        batch = {"ids": ids, "attention_mask": real.astype(np.int64),
                 "token_type_ids": np.where(real, self.types[src], 0),
                 "last": last_tokens(ids, pad_id), "n_tokens": int(real.sum())}
        if self.labels is not None:
            batch["labels"] = self.labels[index]
        return batch


@dataclass
class ClassifyData(ExampleData):
    """The examples of a classification run, split and batched as fine-tuning examples
    are (``ExampleData``: a seeded ``split``, the resumable ``ExampleBatcher``, one
    evaluation pass with ``in_order``), so ``Trainer(data=...)`` takes it as it is.
    ``examples`` and ``validation`` are ``Sentences``; ``formatting`` the Encoding."""

    pad: int = 0

    @classmethod
    def from_rows(cls, rows, enc: Encoding, *, eval_rows=None, seed: int = 0,
                  key: str = "rows") -> "ClassifyData":
        """``rows`` (and ``eval_rows``, the validation examples) encoded; ``key``: a
        fingerprint of their sources (a resumed run says so when it changed)."""
        from tinylm.data import fingerprint_key

        examples = enc.sentences(rows)
        validation = enc.sentences(eval_rows) if eval_rows is not None else None
        path = f"classify-{fingerprint_key(key, enc.key())}"
        return cls(examples, enc, False, validation, seed, path, 0, None, enc.pad_id)

    @property
    def pad_id(self) -> int:
        return self.pad

    def sample_prompt(self, part: Sentences) -> list:
        """The first example's first token (a classifier writes no samples)."""
        return part.tokens[:1].tolist()


# --------------------------------------------------------------------------- the objective


class Classify(Objective):
    """Cross-entropy over the classes (mean over the examples), or with one label the
    squared error of the score: Hugging Face's *ForSequenceClassification losses. The
    metrics hook gets ``accuracy`` (classes) or ``mse`` (scores); micro-batches are
    weighted by their examples."""

    name = "classify"
    kinds = KINDS
    examples = True
    perplexity = False  # a loss over classes (or a squared error), not over tokens
    progress_metrics = ("accuracy",)

    def __init__(self, tokenizer=None, **options):
        super().__init__(tokenizer, **options)
        self.metrics = {}

    def check_model(self, model) -> None:
        super().check_model(model)
        if num_labels(model) is None:
            raise ClassifyError(f"{type(model).__name__} has no classification head; "
                                f"put one on with tinylm.classify.with_head")

    def make_batch(self, rows, rng) -> dict:
        if not isinstance(rows, dict) or "labels" not in rows:
            raise ClassifyError("objective 'classify' trains on labelled sentences: use "
                                "`tinylm finetune --task classify --data train.tsv`")
        return rows

    def n_targets(self, batch: dict) -> int:
        return len(batch["labels"])

    def loss(self, model, batch):
        logits = classify_logits(model, batch)  # (B, C)
        xp = logits.xp
        if logits.shape[1] == 1:
            diff = logits.reshape((-1,)) - xp.asarray(batch["labels"], dtype=logits.dtype)
            loss = (diff * diff).mean()
            self.metrics = {"mse": float(loss.item())}
            return loss
        labels = np.asarray(batch["labels"])
        if labels.dtype.kind != "i":
            raise ClassifyError(f"a classifier of {logits.shape[1]} classes needs class "
                                f"labels, got {labels.dtype} scores; use one label for "
                                f"regression")
        guess = backend.to_numpy(logits.data).argmax(axis=1)
        self.metrics = {"accuracy": float(np.mean(guess == labels))}
        return ops.cross_entropy(logits, xp.asarray(labels))


# --------------------------------------------------------------------------- predictions


def predict(model, sentences: Sentences, pad_id: int, batch_size: int = 32,
            progress: bool = False) -> np.ndarray:
    """(n, num_labels) float64 logits of every example, in eval mode without gradients.
    Batches are drawn longest first (little padding) and put back in order."""
    n = len(sentences)
    order = np.argsort(-sentences.lengths, kind="stable")
    out = None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, unit="example", desc="classify", dynamic_ncols=True)
    was = model.training
    model.eval()
    try:
        with no_grad():
            for start in range(0, n, batch_size):
                index = order[start:start + batch_size]
                logits = classify_logits(model, sentences.batch(index, pad_id))
                rows = backend.to_numpy(logits.data).astype(np.float64)  # (B, C)
                if out is None:
                    out = np.zeros((n, rows.shape[1]), dtype=np.float64)
                out[index] = rows
                if bar is not None:
                    bar.update(len(index))
    finally:
        model.train(was)
        if bar is not None:
            bar.close()
    return out

"""Instruction data for fine-tuning: JSONL records -> token ids with label masks ->
padded or packed batches.

    fmt = Formatting(tokenizer, eos_id=0, max_length=256, template=ChatTemplate.builtin("chatml"))
    data = ExampleData.read(["train.jsonl"], fmt)           # every record tokenized once
    train, val = data.split(0.1)                            # Examples (packed if asked)
    batcher = ExampleBatcher(train, batch_size=8, seed=1)
    batch = batcher.next()    # {"ids": (B, T), "targets": (B, T)[, "positions": (B, T)]}

A record (one JSON object per line) is one of three kinds, as TRL's SFTTrainer reads
them, and the labels follow TRL 1.16's masks exactly (``tests/test_instruct.py``
holds them equal to SFTTrainer's own):

- ``{"prompt": ..., "completion": ...}``: the end-of-sequence token is appended to the
  completion (unless it ends with one), the ids are those of prompt + completion, and
  only the completion is trained on: the label of every token the prompt's own
  encoding shares with it (their common prefix, TRL's ``common_prefix_length``) is
  -100 (ignored).
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: the conversation rendered
  with the model's chat template (``tinylm.prompts.ChatTemplate``), the loss on the
  assistant turns only: each reply's content and the suffix that ends it (ChatML's
  ``<|im_end|>\\n``), not the prefix that opens it (the generation prompt the model is
  given at inference), as TRL's ``assistant_only_loss`` with ``{% generation %}``
  around content and suffix. A conversation without an assistant turn is an error.
- ``{"text": ...}`` (``text_field``): plain text, the end-of-sequence token appended,
  every token trained on.

Labels are aligned with the ids (``labels[t]`` is what ``ids[t]`` should be; the
first label is never predicted): a batch feeds ``ids[:-1]`` and predicts
``labels[1:]``, the shift a Hugging Face model does inside its loss. An example
longer than ``max_length`` tokens is cut to its first ``max_length`` (TRL's
``keep_start``); one whose prompt leaves no trained token inside that length is an
error naming its line (nothing is written before every record has been read).

Packing (``packing=True``) puts whole examples into rows of ``max_length`` tokens by
best-fit decreasing (TRL's ``bfd``: the longest first, each into the fullest row it
fits), positions restarting at 0 for each example and the first token of each
example not predicted (TRL's padding-free collator: ``labels[position_ids == 0] =
-100``). Attention is not separated between the examples of a row: tinylm's attention
takes padding masks, not per-example blocks, as TRL's packing with an attention
implementation other than a variable-length kernel.
"""

from __future__ import annotations

import bisect
import json
import os
from collections import deque
from dataclasses import dataclass

import numpy as np

from tinylm.data import DataError, EpochOrder, fingerprint_key, read_utf8
from tinylm.data import source_fingerprint, tokenizer_sha256
from tinylm.objectives import IGNORE
from tinylm.prompts import message_turns
from tinylm.tokenizers.base import TokenizerError

KINDS = ("prompt-completion", "messages", "text")


class InstructError(DataError):
    """An instruction record that cannot be trained on (bad field, no assistant turn,
    a prompt as long as the context ...)."""


# --------------------------------------------------------------------------- one example


@dataclass(frozen=True)
class Formatting:
    """How records become ids: the tokenizer, the end-of-sequence id appended to
    completions and texts, the longest example in tokens, the chat template for
    ``messages`` records (None: they are refused), the JSONL field of plain text."""

    tokenizer: object
    eos_id: int | None
    max_length: int
    template: object = None
    text_field: str = "text"

    def encode(self, text: str) -> list:
        """Special tokens in the text are encoded as such, as a Hugging Face tokenizer
        (and so TRL) does."""
        return self.tokenizer.encode(text, allowed_special="all")

    def key(self) -> list:
        """What decides the ids: for the data's fingerprint."""
        template = None if self.template is None else self.template.to_dict()
        return [tokenizer_sha256(self.tokenizer), self.eos_id, self.max_length, template,
                self.text_field]


def common_prefix_length(a, b) -> int:
    """How many leading ids ``a`` and ``b`` share (TRL's ``common_prefix_length``)."""
    a, b = np.asarray(a), np.asarray(b)
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def _with_eos(ids: list, fmt: Formatting, where: str) -> list:
    if fmt.eos_id is None:
        raise InstructError(f"{where}: the model has no end-of-sequence token to end the "
                            f"text with; give the model config an eos_token_id")
    return ids if ids and ids[-1] == fmt.eos_id else ids + [fmt.eos_id]


def prompt_completion(prompt: str, completion: str, fmt: Formatting, where: str = "record"):
    """(ids, labels) of a prompt + completion: the completion's tokens trained on."""
    ids = _with_eos(fmt.encode(prompt + completion), fmt, where)
    start = common_prefix_length(fmt.encode(prompt), ids)
    labels = np.array(ids, dtype=np.int64)
    labels[:start] = IGNORE
    return np.array(ids, dtype=np.int64), labels


def plain_text(text: str, fmt: Formatting, where: str = "record"):
    """(ids, labels) of a text: every token trained on."""
    ids = np.array(_with_eos(fmt.encode(text), fmt, where), dtype=np.int64)
    return ids, ids.copy()


def conversation(messages, fmt: Formatting, where: str = "record"):
    """(ids, labels) of a chat: the assistant turns' content and suffix trained on.

    The whole conversation is rendered and encoded once; an assistant turn covering
    characters [start, end) of the text covers ids [s, e): s is where the encoding of
    text[:start] stops agreeing with the whole (so a token across the boundary is
    trained on, as Hugging Face's char_to_token mask does), e likewise for text[:end],
    one further when a token crosses that boundary."""
    template = fmt.template
    if template is None:
        raise InstructError(f"{where}: a 'messages' record needs a chat template")
    turns = _check_messages(messages, where)
    if template.default_system is not None and turns[0][0] != "system":
        turns.insert(0, ("system", template.default_system))
    text = template.render(turns, add_generation_prompt=False)
    ids = np.array(fmt.encode(text), dtype=np.int64)
    trained = np.zeros(len(ids), dtype=bool)
    for i, (role, _) in enumerate(turns):
        if role != "assistant":
            continue
        before = template.render(turns[:i], add_generation_prompt=False)
        start = len(before) + len(template.assistant_prefix)
        end = len(template.render(turns[:i + 1], add_generation_prompt=False))
        s = common_prefix_length(fmt.encode(text[:start]), ids)
        head = fmt.encode(text[:end])
        e = common_prefix_length(head, ids)
        e = e if e == len(head) else e + 1
        trained[s:e] = True
    return ids, np.where(trained, ids, IGNORE)


def _check_messages(messages, where: str) -> list:
    """[(role, content)] of a 'messages' field, or an InstructError saying what is off."""
    turns = message_turns(messages, "messages", where, error=InstructError)
    if not any(role == "assistant" for role, _ in turns):
        raise InstructError(f"{where}: the conversation has no assistant turn, so nothing to "
                            f"train on; add the assistant's reply, or leave the record out")
    return turns


def record_kind(record: dict, text_field: str = "text") -> str:
    """"messages", "prompt-completion" or "text" for a record, else an InstructError."""
    if "messages" in record:
        return "messages"
    if "prompt" in record or "completion" in record:
        return "prompt-completion"
    if text_field in record:
        return "text"
    raise InstructError(f"no 'prompt' + 'completion', 'messages' or {text_field!r} field "
                        f"(found {sorted(record)})")


def tokenize_record(record: dict, fmt: Formatting, where: str = "record"):
    """(ids, labels) of one record (any of the three kinds), not yet cut to length."""
    kind = record_kind(record, fmt.text_field)
    if kind == "messages":
        return conversation(record["messages"], fmt, where)
    if kind == "text":
        _check_strings(record, (fmt.text_field,), where)
        return plain_text(record[fmt.text_field], fmt, where)
    _check_strings(record, ("prompt", "completion"), where)
    return prompt_completion(record["prompt"], record["completion"], fmt, where)


def _check_strings(record: dict, names, where: str) -> None:
    for name in names:
        if name not in record:
            raise InstructError(f"{where}: a prompt-completion record needs both 'prompt' "
                                f"and 'completion'; {name!r} is missing")
        if not isinstance(record[name], str):
            raise InstructError(f"{where}: the {name!r} field is a "
                                f"{type(record[name]).__name__}, not a string")


def fit_length(ids, labels, max_length: int, where: str = "record"):
    """(ids, labels, cut) cut to ``max_length`` tokens (keep the start); an error when no
    trained label is left after the first token (the prompt fills the context)."""
    trained = np.flatnonzero(labels[1:] != IGNORE) + 1
    if not len(trained):
        raise InstructError(f"{where}: the record has no token to train on")
    if trained[0] >= max_length:
        raise InstructError(f"{where}: the prompt takes {int(trained[0])} tokens, and the "
                            f"context is {max_length} (--block-size): no token of the reply "
                            f"would be trained on; shorten the prompt or raise --block-size")
    return ids[:max_length], labels[:max_length], len(ids) > max_length


# --------------------------------------------------------------------------- many examples


@dataclass
class Examples:
    """Variable-length items in flat arrays: item i is ``tokens[offsets[i]:offsets[i+1]]``
    with its ``labels`` and ``positions`` (0.. for an example; restarting at each
    example of a packed row)."""

    tokens: np.ndarray  # (N,) int64
    labels: np.ndarray  # (N,) int64, IGNORE where not trained on
    positions: np.ndarray  # (N,) int64
    offsets: np.ndarray  # (n + 1,) int64
    packed: bool = False

    @classmethod
    def from_lists(cls, pairs) -> "Examples":
        pairs = list(pairs)
        lengths = np.array([len(ids) for ids, _ in pairs], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        cat = (lambda k: np.concatenate([p[k] for p in pairs]).astype(np.int64)
               if pairs else np.zeros(0, np.int64))
        return cls(cat(0), cat(1), _ranges(lengths), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def item(self, i: int) -> tuple:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.tokens[a:b], self.labels[a:b]

    def take(self, index) -> "Examples":
        """The items at ``index``, in that order."""
        index = np.asarray(index, dtype=np.int64)
        lengths = self.lengths[index]
        src = np.repeat(self.offsets[index], lengths) + _ranges(lengths)  # (N',)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return Examples(self.tokens[src], self.labels[src], self.positions[src], offsets,
                        self.packed)

    def batch(self, index, pad_id: int) -> dict:
        """The items at ``index`` as one right-padded batch: ``ids`` (B, T) = each
        item's tokens but its last, ``targets`` (B, T) = its labels but the first
        (IGNORE on the padding), T = the longest item - 1; ``positions`` (B, T) for
        packed rows; ``n_tokens``: how many of the ids are not padding."""
        index = np.asarray(index, dtype=np.int64)
        starts, lengths = self.offsets[index], self.lengths[index]  # (B,)
        T = max(int(lengths.max()) - 1, 1)
        j = np.arange(T)  # (T,)
        real = j[None, :] < (lengths[:, None] - 1)  # (B, T)
        src = np.where(real, starts[:, None] + j, 0)  # (B, T)
        batch = {"ids": np.where(real, self.tokens[src], pad_id),
                 "targets": np.where(real, self.labels[np.where(real, src + 1, 0)], IGNORE),
                 "n_tokens": int(real.sum())}
        if self.packed:
            batch["positions"] = np.where(real, self.positions[src], j)
        return batch

    def n_trained(self) -> int:
        """Labels a batch predicts (every item's first label is never a target)."""
        return int((self.labels != IGNORE).sum() - (self.labels[self.offsets[:-1]]
                                                    != IGNORE).sum()) if len(self) else 0


def _ranges(lengths) -> np.ndarray:
    """0..l-1 for each l in ``lengths``, concatenated."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.arange(total, dtype=np.int64) - starts


def pack(examples: Examples, max_length: int) -> Examples:
    """Examples packed into rows of at most ``max_length`` tokens by best-fit decreasing
    (TRL's ``_pack_bfd``: the longest first, stable on ties; each into the row whose
    free space is the smallest that fits it, the row that reached that space first;
    rows in the order they were opened). Each row's positions restart at each example
    and each example's first label is IGNORE (it would be predicted from the example
    before it)."""
    lengths = examples.lengths
    order = np.argsort(-lengths, kind="stable")
    spaces, by_space, rows = [], {}, []  # sorted free spaces; space -> deque of rows
    for i in order:
        n = int(lengths[i])
        k = bisect.bisect_left(spaces, n)
        if k < len(spaces):
            space = spaces[k]
            row = by_space[space].popleft()
            if not by_space[space]:
                spaces.pop(k)
        else:
            space, row = max_length, []
            rows.append(row)
        row.append(int(i))
        left = space - n
        if left > 0:
            if left not in by_space or not by_space[left]:
                by_space[left] = deque()
                bisect.insort(spaces, left)
            by_space[left].append(row)
    flat = examples.take([i for row in rows for i in row])
    labels = flat.labels.copy()
    labels[flat.offsets[:-1]] = IGNORE  # no prediction across an example boundary
    row_lengths = np.array([int(lengths[row].sum()) for row in rows], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(row_lengths)]).astype(np.int64)
    return Examples(flat.tokens, labels, flat.positions, offsets, packed=True)


# --------------------------------------------------------------------------- the data set


@dataclass
class ExampleData:
    """The examples of a fine-tuning run and how they are split and batched (what
    ``Trainer(data=...)`` takes instead of a token stream). ``validation``: examples of
    their own (an --eval-data file) instead of a split of these. ``path``: a key of
    the sources and the formatting (in the checkpoint: a resumed run says so when the
    data changed)."""

    examples: Examples
    formatting: Formatting
    packing: bool = False
    validation: Examples | None = None
    seed: int = 0
    path: str = "examples"
    n_cut: int = 0
    counts: dict | None = None

    @classmethod
    def read(cls, files, fmt: Formatting, *, eval_files=(), packing: bool = False,
             seed: int = 0) -> "ExampleData":
        """Every record of ``files`` (and of ``eval_files``, the validation examples)
        tokenized; the first bad record is an InstructError naming file and line."""
        examples, cut, counts = read_examples(files, fmt)
        validation = read_examples(eval_files, fmt)[0] if eval_files else None
        key = fingerprint_key(source_fingerprint(list(files) + list(eval_files), "instruct"),
                              fmt.key(), packing)
        return cls(examples, fmt, packing, validation, seed, f"examples-{key}", cut, counts)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def manifest(self) -> dict:
        return {"n_documents": len(self.examples)}

    @property
    def pad_id(self) -> int:
        return int(self.formatting.eos_id or 0)

    def split(self, val_fraction: float) -> tuple:
        """(train, validation) Examples, packed if asked: the validation examples are a
        seeded random ``val_fraction`` of the records (at least one when it is > 0), or
        ``validation`` when given."""
        if self.validation is not None:
            train, val = self.examples, self.validation
        else:
            n = len(self.examples)
            n_val = int(np.ceil(n * val_fraction)) if val_fraction > 0 else 0
            if n_val and n - n_val < 1:
                raise InstructError(f"{n} example(s) cannot be split into training and "
                                    f"validation; give more, or --val-fraction 0")
            order = np.random.default_rng([self.seed, 6]).permutation(n)
            train, val = (self.examples.take(np.sort(order[n_val:])),
                          self.examples.take(np.sort(order[:n_val])))
        if self.packing:
            train, val = (pack(part, self.formatting.max_length) for part in (train, val))
        return train, val

    def sample_prompt(self, part: Examples) -> list:
        """The untrained start of the first item of ``part`` (its prompt), at least one
        token: what the trainer's samples continue."""
        ids, labels = part.item(0)
        trained = np.flatnonzero(labels[1:] != IGNORE)
        end = int(trained[0]) + 1 if len(trained) else 1
        return ids[:end].tolist()


def read_examples(files, fmt: Formatting) -> tuple:
    """(Examples, how many were cut to max_length, {kind: count}) of JSONL ``files``."""
    pairs, cut, counts = [], 0, {}
    for path in files:
        for n, record in _records(path):
            where = f"{path}:{n}"
            try:
                kind = record_kind(record, fmt.text_field)
            except InstructError as e:
                raise InstructError(f"{where}: {e}") from None
            try:
                ids, labels = tokenize_record(record, fmt, where)
            except TokenizerError as e:
                raise InstructError(f"{where}: {e}") from None
            ids, labels, was_cut = fit_length(ids, labels, fmt.max_length, where)
            pairs.append((ids, labels))
            cut += was_cut
            counts[kind] = counts.get(kind, 0) + 1
    if not pairs:
        raise InstructError(f"no records in {', '.join(map(str, files))}; give a JSONL file "
                            f"with one {{\"prompt\": ..., \"completion\": ...}}, "
                            f"{{\"messages\": [...]}} or {{\"text\": ...}} object per line")
    return Examples.from_lists(pairs), cut, counts


def _records(path):
    """(line number, dict) of each non-blank line of a JSONL file."""
    path = os.fspath(path)
    text = read_utf8(path, InstructError)
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise InstructError(f"{path}:{n}: not a JSON line ({e.msg}); fine-tuning data is "
                                f"JSONL, one object per line") from None
        if not isinstance(record, dict):
            raise InstructError(f"{path}:{n}: expected a JSON object, got "
                                f"{type(record).__name__}")
        yield n, record


# --------------------------------------------------------------------------- batches


class ExampleBatcher:
    """Batches of ``batch_size`` items of ``examples``, drawn in a fresh random order
    each epoch (a batch may run into the next epoch), as dicts of NumPy arrays
    (``Examples.batch``). Its own generator, seeded with ``seed``, makes every choice,
    so ``state_dict()`` taken between batches resumes the exact sequence."""

    mode = "examples"

    def __init__(self, examples: Examples, batch_size: int, pad_id: int = 0, seed=0,
                 split: str = "train"):
        if len(examples) == 0:
            fix = "raise --val-fraction" if split == "validation" else "lower --val-fraction"
            raise InstructError(f"the {split} split has no examples; give more, or {fix}")
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self.order = EpochOrder(len(examples), np.random.default_rng(seed))

    def next(self) -> dict:
        return self.examples.batch(self.order.take(self.batch_size), self.pad_id)

    def state_dict(self) -> dict:
        return {"mode": self.mode, "packed": self.examples.packed, **self.order.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("mode") != self.mode or state.get("packed") != self.examples.packed:
            raise InstructError("the saved data position is not one of this run's examples "
                                "(packed or not); resume with the same data options")
        self.order.load_state_dict(state)


def in_order(examples: Examples, batch_size: int, pad_id: int = 0):
    """Every item once, in order, in batches of ``batch_size`` (the last maybe smaller):
    an evaluation pass."""
    for start in range(0, len(examples), batch_size):
        yield examples.batch(np.arange(start, min(start + batch_size, len(examples))), pad_id)

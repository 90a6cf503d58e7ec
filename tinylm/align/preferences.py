"""Preference pairs for reward models and DPO: JSONL records -> token ids -> batches of
chosen and rejected rows.

    fmt = Formatting(tokenizer, eos_id=0, max_length=256, template=ChatTemplate.builtin("chatml"))
    data = read_preferences(["prefs.jsonl"], fmt)      # every record tokenized once
    train, val = data.split(0.1)                        # Pairs
    batcher = ExampleBatcher(train, batch_size=4, pad_id=data.pad_id, seed=1)
    batch = batcher.next()    # {"ids": (2B, T), "targets", "attention_mask", "last", ...}

A record (one JSON object per line) is one of TRL's preference forms:

- ``{"prompt": str, "chosen": str, "rejected": str}``: the standard form;
- ``{"chosen": str, "rejected": str}``: the prompt implicit, their common start (TRL's
  ``extract_prompt``: the longest common prefix, less a space just before it);
- ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}`` or, the
  prompt implicit, ``{"chosen": [messages], "rejected": [messages]}`` whose shared
  leading turns are the prompt: rendered with the chat template (``Formatting.template``).

and may carry ``"margin"`` (a number, on every record or on none): the Bradley-Terry
margin of TRL's reward trainer (``tinylm.align.reward``).

Each row is the whole sequence, as both TRL trainers build it: the text of prompt +
completion with the end-of-sequence token appended (unless it ends with one; not for
conversations, whose template ends each turn), or the rendered conversation prompt +
completion, encoded once. The completion starts where the prompt's own encoding (for
a conversation: rendered with the generation prompt) stops agreeing with *both* rows
(TRL's DPO: the minimum of the two common prefix lengths), so a token merged across
the boundary is the completion's.

Bad input is an error naming file:line, before anything is trained: a malformed record
(not JSON, a missing or mistyped field, a bad message), identical chosen and
rejected (nothing to learn), an empty completion, a row longer than ``max_length``
tokens (TRL's reward trainer drops those; tinylm says so, unless ``truncate``: cut
to the first ``max_length`` as TRL's DPO does, an error only when the prompt leaves
no completion token).

A batch of B pairs (``Pairs.batch``) has 2B rows, the chosen rows 0..B-1 then the
rejected rows B..2B-1 (TRL's concatenated order), right-padded with ``pad_id`` to the
longest row T:

    ids             (2B, T) int64   the whole rows (not shifted: the last token is fed)
    targets         (2B, T) int64   targets[:, t] = ids[:, t + 1] where that token is a
                                    completion token, else IGNORE (prompt, padding, and
                                    the last column): what logits[:, t] predict
    attention_mask  (2B, T) int64   1 = token, 0 = padding
    last            (2B,)   int64   the index of each row's last token whose id is not
                                    ``pad_id`` (Hugging Face's *ForSequenceClassification
                                    rule, which TRL's reward model scores at: with
                                    pad = eos, the appended eos is not the one scored)
    lengths         (2B,)   int64   tokens in each row
    margin          (B,)    float64 only when the records carry margins
    n_tokens        int             tokens that are not padding
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from tinylm.data import fingerprint_key, source_fingerprint
from tinylm.instruct import ExampleData, Examples, Formatting, InstructError, _records
from tinylm.instruct import common_prefix_length
from tinylm.objectives import IGNORE
from tinylm.prompts import message_turns
from tinylm.tokenizers.base import TokenizerError

FIELDS = ("prompt", "chosen", "rejected")


class PreferenceError(InstructError):
    """A preference record that cannot be trained on."""


# --------------------------------------------------------------------------- one record


def is_conversational(record: dict) -> bool:
    """Whether a record's chosen reply is a list of messages (TRL's ``is_conversational``)."""
    value = record.get("chosen")
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) \
        and "role" in value[0]


def extract_prompt(chosen, rejected) -> tuple:
    """(prompt, chosen, rejected) of a record without a prompt: the longest common
    prefix of the two (characters of texts, turns of conversations) is the prompt,
    less a space just before the point where they differ (TRL's ``extract_prompt``)."""
    n = min(len(chosen), len(rejected))
    same = np.array([chosen[i] == rejected[i] for i in range(n)], dtype=bool) \
        if isinstance(chosen, list) else \
        np.frombuffer(chosen[:n].encode("utf-32-le"), np.uint32) == \
        np.frombuffer(rejected[:n].encode("utf-32-le"), np.uint32)
    differ = np.flatnonzero(~same)
    if len(differ):
        idx = int(differ[0])
        if idx > 0 and chosen[idx - 1] == " ":
            idx -= 1
    else:  # one is a prefix of the other: TRL's loop ends on its last index
        idx = max(n - 1, 0)
    return chosen[:idx], chosen[idx:], rejected[idx:]


def split_record(record: dict, where: str) -> tuple:
    """(prompt, chosen, rejected, conversational) of a record, checked: strings, or
    lists of (role, content) turns; the prompt extracted when implicit."""
    missing = [k for k in ("chosen", "rejected") if k not in record]
    if missing:
        raise PreferenceError(f"{where}: a preference record needs 'chosen' and 'rejected' "
                              f"(and optionally 'prompt'); {missing[0]!r} is missing "
                              f"(found {sorted(record)})"[:300])
    chat = isinstance(record["chosen"], list)
    values = {}
    for k in (k for k in FIELDS if k in record):
        if chat and isinstance(record[k], list):
            values[k] = message_turns(record[k], k, where, error=PreferenceError,
                                      allow_empty=True)
        elif not chat and isinstance(record[k], str):
            values[k] = record[k]
        else:
            raise PreferenceError(f"{where}: the {k!r} field is a {type(record[k]).__name__}; "
                                  f"give strings, or lists of messages in every field")
    chosen, rejected = values["chosen"], values["rejected"]
    prompt = values.get("prompt")
    if "prompt" not in record:
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
    if chosen == rejected:
        raise PreferenceError(f"{where}: 'chosen' and 'rejected' are identical, so there is "
                              f"no preference to learn; fix or remove the record")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        empty = not value or (all(not c.strip() for _, c in value) if chat
                              else not value.strip())
        if empty:
            raise PreferenceError(f"{where}: the {name} completion is empty; every pair needs "
                                  f"two non-empty replies to compare")
    return prompt, chosen, rejected, chat


def record_margin(record: dict, where: str):
    """The record's "margin" as a float, None when it has none."""
    if "margin" not in record:
        return None
    m = record["margin"]
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
        raise PreferenceError(f"{where}: 'margin' must be a finite number, got {m!r}"[:200])
    return float(m)


def tokenize_pair(record: dict, fmt: Formatting, where: str = "record", *,
                  truncate: bool = False) -> tuple:
    """(chosen ids, rejected ids, prompt length) of one record: the whole rows and how
    many leading ids of both are the prompt's; checked against ``fmt.max_length``."""
    return _tokenize_pair(record, fmt, where, truncate)[:3]


def _tokenize_pair(record: dict, fmt: Formatting, where: str, truncate: bool) -> tuple:
    """tokenize_pair's result and whether a row was cut to max_length."""
    prompt, chosen, rejected, chat = split_record(record, where)
    try:
        if chat:
            template = fmt.template
            if template is None:
                raise PreferenceError(f"{where}: a conversational record needs a chat "
                                      f"template (--chat-template)")
            prompt_ids = fmt.encode(template.render(prompt, add_generation_prompt=True))
            rows = [fmt.encode(template.render(prompt + c, add_generation_prompt=False))
                    for c in (chosen, rejected)]
        else:
            if fmt.eos_id is None:
                raise PreferenceError(f"{where}: the model has no end-of-sequence token to "
                                      f"end the replies with; give the model config an "
                                      f"eos_token_id")
            prompt_ids = fmt.encode(prompt)
            rows = [fmt.encode(prompt + c) for c in (chosen, rejected)]
            rows = [r if r and r[-1] == fmt.eos_id else r + [fmt.eos_id] for r in rows]
    except TokenizerError as e:
        raise PreferenceError(f"{where}: {e}") from None
    start = min(common_prefix_length(prompt_ids, r) for r in rows)
    if rows[0] == rows[1]:
        raise PreferenceError(f"{where}: 'chosen' and 'rejected' encode to the same tokens, "
                              f"so there is no preference to learn; fix or remove the record")
    if any(len(r) <= start for r in rows):
        raise PreferenceError(f"{where}: a completion adds no token after the prompt; every "
                              f"pair needs two non-empty replies to compare")
    return _fit(rows, start, fmt.max_length, where, truncate)


def _fit(rows, start: int, max_length: int, where: str, truncate: bool) -> tuple:
    longest = max(len(r) for r in rows)
    if longest <= max_length:
        return rows[0], rows[1], start, False
    if not truncate:
        raise PreferenceError(f"{where}: the pair takes {longest} tokens, more than the "
                              f"{max_length} of --block-size; shorten it, raise "
                              f"--block-size, or leave the record out")
    if start >= max_length:
        raise PreferenceError(f"{where}: the prompt takes {start} tokens, and the context "
                              f"is {max_length} (--block-size): no token of the replies "
                              f"would be left; shorten the prompt or raise --block-size")
    return rows[0][:max_length], rows[1][:max_length], start, True


# --------------------------------------------------------------------------- many pairs


@dataclass
class Pairs:
    """n preference pairs as 2n rows in one ``Examples``: rows 0..n-1 chosen, n..2n-1
    rejected (each row's labels: its ids on the completion, IGNORE on the prompt);
    ``margins`` (n,) or None. Has what the example batcher needs (``len``,
    ``batch``, ``packed``)."""

    rows: Examples
    margins: np.ndarray | None = None
    packed = False  # pairs are never packed

    def __len__(self) -> int:
        return len(self.rows) // 2

    def take(self, index) -> "Pairs":
        """The pairs at ``index``, in that order."""
        index = np.asarray(index, dtype=np.int64)
        rows = self.rows.take(np.concatenate([index, index + len(self)]))
        return Pairs(rows, None if self.margins is None else self.margins[index])

    def batch(self, index, pad_id: int) -> dict:
        """The pairs at ``index`` as one batch (the module docstring's layout)."""
        index = np.asarray(index, dtype=np.int64)
        both = np.concatenate([index, index + len(self)])  # (2B,)
        starts, lengths = self.rows.offsets[both], self.rows.lengths[both]  # (2B,)
        T = int(lengths.max())
        j = np.arange(T)  # (T,)
        real = j[None, :] < lengths[:, None]  # (2B, T)
        src = np.where(real, starts[:, None] + j, 0)  # (2B, T)
        ids = np.where(real, self.rows.tokens[src], pad_id)
        following = j[None, :] + 1 < lengths[:, None]  # (2B, T) a token follows t
        targets = np.where(following, self.rows.labels[np.where(following, src + 1, 0)],
                           IGNORE)
        last = np.argmax(j[None, :] * (ids != pad_id), axis=1)  # rightmost non-pad (HF)
        batch = {"ids": ids, "targets": targets, "attention_mask": real.astype(np.int64),
                 "last": last.astype(np.int64), "lengths": lengths.astype(np.int64),
                 "n_tokens": int(real.sum())}
        if self.margins is not None:
            batch["margin"] = self.margins[index]
        return batch

    def prompt(self, i: int) -> list:
        """The prompt ids of pair ``i`` (at least one token)."""
        ids, labels = self.rows.item(i)
        trained = np.flatnonzero(labels != IGNORE)
        end = int(trained[0]) if len(trained) else 1
        return ids[:max(end, 1)].tolist()


def read_pairs(files, fmt: Formatting, *, truncate: bool = False) -> tuple:
    """(Pairs, how many were cut, {kind: count}) of JSONL ``files``; the first bad
    record is a PreferenceError naming file and line."""
    chosen, rejected, margins, counts, cut = [], [], [], {}, 0
    first_margin = None
    for path in files:
        for n, record in _records(path):
            where = f"{path}:{n}"
            c, r, start, was_cut = _tokenize_pair(record, fmt, where, truncate)
            margin = record_margin(record, where)
            if first_margin is None:
                first_margin = (margin is not None, where)
            elif first_margin[0] != (margin is not None):
                raise PreferenceError(f"{where}: {'a' if margin is not None else 'no'} 'margin' "
                                      f"here, but {'none' if margin is not None else 'one'} at "
                                      f"{first_margin[1]}; give a margin on every record or "
                                      f"on none")
            for rows, ids in ((chosen, c), (rejected, r)):
                ids = np.asarray(ids, dtype=np.int64)
                rows.append((ids, np.where(np.arange(len(ids)) >= start, ids, IGNORE)))
            margins.append(margin)
            kind = ("conversational" if is_conversational(record) else "text") + \
                ("" if "prompt" in record else ", implicit prompt")
            counts[kind] = counts.get(kind, 0) + 1
            cut += was_cut
    if not chosen:
        raise PreferenceError(f"no records in {', '.join(map(str, files))}; give a JSONL file "
                              f"with one {{\"prompt\": ..., \"chosen\": ..., \"rejected\": ...}} "
                              f"object per line")
    has_margin = first_margin[0]
    return (Pairs(Examples.from_lists(chosen + rejected),
                  np.array(margins, dtype=np.float64) if has_margin else None), cut, counts)


@dataclass
class PreferenceData(ExampleData):
    """The pairs of an alignment run, split and batched as fine-tuning examples are
    (``ExampleData``: a seeded ``split``, the resumable ``ExampleBatcher``, one
    evaluation pass with ``in_order``), so ``Trainer(data=...)`` takes it as it is.
    ``examples`` and ``validation`` are ``Pairs``; ``pad`` pads the rows."""

    pad: int = 0

    @classmethod
    def read(cls, files, fmt: Formatting, *, eval_files=(), seed: int = 0,
             pad_id: int | None = None, truncate: bool = False) -> "PreferenceData":
        pairs, cut, counts = read_pairs(files, fmt, truncate=truncate)
        validation = read_pairs(eval_files, fmt, truncate=truncate)[0] if eval_files else None
        key = fingerprint_key(source_fingerprint(list(files) + list(eval_files), "preferences"),
                              fmt.key(), truncate)
        pad = fmt.eos_id if pad_id is None else pad_id
        return cls(pairs, fmt, False, validation, seed, f"preferences-{key}", cut, counts,
                   int(pad or 0))

    @property
    def pad_id(self) -> int:
        return self.pad

    @property
    def has_margin(self) -> bool:
        return self.examples.margins is not None

    def sample_prompt(self, part: Pairs) -> list:
        """The prompt of the first pair of ``part``: what the trainer's samples continue."""
        return part.prompt(0)


def read_preferences(paths, fmt: Formatting, *, eval_paths=(), seed: int = 0,
                     pad_id: int | None = None, truncate: bool = False) -> PreferenceData:
    """Every preference record of the JSONL ``paths`` tokenized (``eval_paths``: the
    validation pairs, instead of a split); ``pad_id``: the padding id (default: the
    end-of-sequence id, as TRL pads a tokenizer without a pad token); ``truncate``:
    cut long rows instead of refusing them."""
    paths = [os.fspath(p) for p in ([paths] if isinstance(paths, (str, os.PathLike))
                                     else paths)]
    return PreferenceData.read(paths, fmt, eval_files=[os.fspath(p) for p in eval_paths],
                               seed=seed, pad_id=pad_id, truncate=truncate)

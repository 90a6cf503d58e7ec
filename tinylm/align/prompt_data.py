"""The prompts of an RL run (GRPO, RLOO): JSONL records -> token ids -> batches of prompts.

    fmt = Formatting(tokenizer, eos_id, max_length=448, template=ChatTemplate.builtin("chatml"))
    data = PromptData.read(["prompts.jsonl"], fmt)
    train, _ = data.split(0.0)                               # Prompts
    batcher = ExampleBatcher(train, batch_size=4, pad_id=data.pad_id, seed=1)
    batch = batcher.next()      # {"prompt_ids": [[...], ...], "prompts", "fields", "n_tokens"}

A record is TRL's prompt-only form: ``{"prompt": "text"}`` or a conversational
``{"prompt": [{"role": "user", "content": ...}, ...]}`` (rendered with the chat
template, ending with the generation prompt, as TRL's ``apply_chat_template`` with
``add_generation_prompt=True``). Every other field (``"answer": "42"``) is handed to
the reward functions, TRL's way: ``f(..., answer=[...])``, one value per completion.
The text is encoded with special tokens recognised (as a Hugging Face tokenizer does);
no end-of-sequence token is appended (the model writes the completion).

Bad input is an error naming file:line before anything is trained: a record without
a "prompt", a prompt that is neither text nor a list of messages, an empty prompt, or
one longer than ``max_length`` tokens (``--block-size`` less
``--max-completion-length``: the room the completion needs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from tinylm.data import fingerprint_key, source_fingerprint
from tinylm.instruct import ExampleData, Examples, Formatting, InstructError, _records
from tinylm.prompts import message_turns
from tinylm.tokenizers.base import TokenizerError


class PromptError(InstructError):
    """A prompt record that cannot be trained on."""


def prompt_ids(prompt, fmt: Formatting, where: str = "record") -> list:
    """The token ids of a record's prompt: text encoded, or messages rendered with the
    chat template and its generation prompt, then encoded."""
    if isinstance(prompt, str):
        text = prompt
    elif isinstance(prompt, list):
        if fmt.template is None:
            raise PromptError(f"{where}: a conversational prompt needs a chat template")
        turns = message_turns(prompt, "prompt", where, error=PromptError)
        text = fmt.template.render(turns, add_generation_prompt=True)
    else:
        raise PromptError(f"{where}: 'prompt' must be text or a list of messages, not "
                          f"{type(prompt).__name__}")
    try:
        ids = fmt.encode(text)
    except TokenizerError as e:
        raise PromptError(f"{where}: {e}") from None
    if not ids:
        raise PromptError(f"{where}: the prompt is empty; the model needs at least one "
                          f"token to continue from")
    if len(ids) > fmt.max_length:
        raise PromptError(f"{where}: the prompt takes {len(ids)} tokens, more than the "
                          f"{fmt.max_length} left for it (--block-size less "
                          f"--max-completion-length); shorten it or raise --block-size")
    return ids


@dataclass
class Prompts:
    """n prompts: their ids (an ``Examples``), the prompt as given (text or messages)
    and the record's other fields. Has what the example batcher needs (``len``,
    ``take``, ``batch``, ``packed``)."""

    ids: Examples
    prompts: list
    fields: list
    packed = False  # prompts are never packed

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, index) -> "Prompts":
        index = np.asarray(index, dtype=np.int64)
        return Prompts(self.ids.take(index), [self.prompts[i] for i in index],
                       [self.fields[i] for i in index])

    def batch(self, index, pad_id: int) -> dict:
        """The prompts at ``index``: ``prompt_ids`` (lists of ids), ``prompts`` (as
        given), ``fields`` (dicts), ``n_tokens`` (prompt tokens in all)."""
        index = np.asarray(index, dtype=np.int64)
        rows = [self.ids.item(int(i))[0].tolist() for i in index]
        return {"prompt_ids": rows, "prompts": [self.prompts[i] for i in index],
                "fields": [self.fields[i] for i in index],
                "n_tokens": int(sum(len(r) for r in rows))}


def read_prompts(files, fmt: Formatting) -> Prompts:
    """The ``Prompts`` of JSONL ``files``; the first bad record is a PromptError naming
    file and line."""
    pairs, prompts, fields = [], [], []
    for path in files:
        for n, record in _records(path):
            where = f"{path}:{n}"
            if "prompt" not in record:
                raise PromptError(f"{where}: an RL prompt record needs a 'prompt' (text or "
                                  f"messages); found {sorted(record)}"[:300])
            ids = np.asarray(prompt_ids(record["prompt"], fmt, where), dtype=np.int64)
            pairs.append((ids, ids))
            prompts.append(record["prompt"])
            fields.append({k: v for k, v in record.items() if k != "prompt"})
    if not pairs:
        raise PromptError(f"no records in {', '.join(map(str, files))}; give a JSONL file "
                          f"with one {{\"prompt\": ...}} object per line")
    names = set(fields[0])
    for other in fields:
        if set(other) != names:
            raise PromptError(f"the prompt records do not all have the same fields "
                              f"({sorted(names)} and {sorted(other)}); the reward "
                              f"functions get each field for every completion: give every "
                              f"record the same ones")
    return Prompts(Examples.from_lists(pairs), prompts, fields)


@dataclass
class PromptData(ExampleData):
    """The prompts of an RL run, split and batched as fine-tuning examples are
    (``ExampleData``: a seeded ``split``, the resumable ``ExampleBatcher``), so
    ``Trainer(data=...)`` takes it as it is. ``examples`` is a ``Prompts``."""

    pad: int = 0

    @classmethod
    def read(cls, files, fmt: Formatting, *, seed: int = 0,
             pad_id: int | None = None) -> "PromptData":
        files = [os.fspath(p) for p in ([files] if isinstance(files, (str, os.PathLike))
                                         else files)]
        prompts = read_prompts(files, fmt)
        key = fingerprint_key(source_fingerprint(files, "prompts"), fmt.key())
        pad = fmt.eos_id if pad_id is None else pad_id
        return cls(prompts, fmt, False, None, seed, f"prompts-{key}", 0,
                   {"prompt": len(prompts)}, int(pad or 0))

    @property
    def pad_id(self) -> int:
        return self.pad

    def sample_prompt(self, part: Prompts) -> list:
        return part.batch([0], self.pad)["prompt_ids"][0]

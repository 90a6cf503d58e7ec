"""Prompts as lm-evaluation-harness 0.4 builds them: few-shot examples, delimiters, contexts.

    sampler = FewshotSampler(task, seed=1234)
    prompt = build_prompt(task, doc, sampler.sample(2, doc))
    prompt.contexts, prompt.continuations    # one (context, continuation) per choice

Plain text, no chat template (lm-eval's default), for a document q with few-shot
examples (q_i, a_i):

    description + q_1 + target_delimiter + a_1 + fewshot_delimiter + ... + q

and each choice c is scored as the continuation ``target_delimiter + c`` (" " and
"\\n\\n" by default). An example's answer is its choice at the target index, or the
target text itself (the first of a list of targets). ``gen_prefix`` (lm-eval's) goes
after q (with target_delimiter between them when neither side has a space there) and
before each example's answer. A multiple-input task (doc_to_text gives the gold
index, as Winogrande's) has one context per choice and the target as continuation.

Few-shot examples are drawn as lm-eval's ``ContextSampler`` draws them: one
``random.Random(seed)`` for the whole run (default seed 1234, lm-eval's
``fewshot_random_seed``), ``rnd.sample(pool, k)`` per document in document order; when
the pool is the evaluation split, ``k + 1`` are drawn and the document itself removed.
The ``first_n`` sampler (MMLU's) takes the first k.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tinylm.evaluation.tasks import Task, TaskError


class FewshotSampler:
    """Few-shot examples for each document of ``task``, reproducibly from ``seed``."""

    def __init__(self, task: Task, seed: int | None = 1234):
        self.task = task
        self.rnd = random.Random(seed)

    def sample(self, k: int, doc) -> list:
        if k == 0:
            return []
        pool = self.task.fewshot_docs if self.task.fewshot_docs is not None else (
            self.task.docs if self.task.exclude_eval_doc else None)
        if not pool:
            raise TaskError(f"task {self.task.name!r} has no documents to draw {k} few-shot "
                            f"examples from; pass --fewshot FILE or --shots 0")
        exclude = self.task.exclude_eval_doc
        if self.task.sampler == "first_n":
            pool = [d for d in pool if d != doc] if exclude else pool
            _check(k, len(pool), self.task)
            return pool[:k]
        if self.task.sampler != "default":
            raise TaskError(f"task {self.task.name!r}: few-shot sampler "
                            f"{self.task.sampler!r} is not supported (default, first_n)")
        if not exclude:
            _check(k, len(pool), self.task)
            return self.rnd.sample(list(pool), k)
        _check(k + 1, len(pool), self.task, k)
        drawn = [d for d in self.rnd.sample(list(pool), k + 1) if d != doc][:k]
        if len(drawn) < k:  # the document is in the pool more than once
            others = [d for d in pool if d != doc]
            _check(k, len(others), self.task)
            drawn = self.rnd.sample(others, k)
        return drawn


def _check(need, have, task, k=None):
    if need > have:
        k = need if k is None else k
        raise TaskError(f"task {task.name!r}: {k} few-shot examples asked, but the pool "
                        f"has only {have} documents to draw {need} from; lower --shots")


@dataclass
class Prompt:
    """One document's requests: ``contexts[i]`` + ``continuations[i]`` per choice i,
    ``choices`` (their texts, for acc_norm / acc_bytes) and ``gold`` (an index, a list
    of indices, or -100 when the target is not among the choices)."""

    contexts: list
    continuations: list
    choices: list
    gold: object


def build_prompt(task: Task, doc, examples) -> Prompt:
    """The requests of ``doc`` with few-shot ``examples`` (lm-eval's ``fewshot_context``
    + ``construct_requests`` for a multiple-choice task)."""
    head = (task.resolve(doc, task.description) or "") + fewshot_prefix(task, examples)
    gen_prefix = task.resolve(doc, task.gen_prefix)
    q, choices = task.text(doc), task.choices(doc)
    if isinstance(q, int):  # multiple input: one context per choice, the target continues
        contexts = [head + _question_turn(c, gen_prefix, "") for c in choices]
        continuations = [f"{task.target_delimiter}{task.target(doc)}"] * len(choices)
        gold = q
    else:
        context = head + _question_turn(q, gen_prefix, task.target_delimiter)
        contexts = [context] * len(choices)
        continuations = [f"{task.target_delimiter}{c}" for c in choices]
        gold = task.target(doc)
    return Prompt(contexts, continuations, list(choices), gold_index(gold, choices))


def fewshot_prefix(task: Task, examples) -> str:
    """The solved examples, each ended by the few-shot delimiter."""
    fs = task.fewshot
    tgt = fs.get("target_delimiter", task.target_delimiter)
    sep = fs.get("fewshot_delimiter", task.fewshot_delimiter)
    parts = []
    for ex in examples:
        q = task.text(ex, fs.get("doc_to_text"))
        c = task.choices(ex, fs.get("doc_to_choice")) if task.doc_to_choice is not None else None
        a = task.target(ex, fs.get("doc_to_target"))
        prefix = task.resolve(ex, task.gen_prefix)
        if isinstance(q, int):
            q, c = c[q], None
        answer = c[a] if (c and isinstance(a, int)) else a[0] if isinstance(a, list) else a
        has_answer = a is not None and a != ""
        parts.append(q + (tgt if has_answer and not prefix else
                          tgt if prefix and requires_delimiter(q, prefix) else ""))
        if has_answer:
            parts.append(maybe_delimit(prefix, str(answer)) + sep)
        elif prefix:
            parts.append(prefix)
    return "".join(parts)


def _question_turn(q: str, gen_prefix, tgt: str) -> str:
    if not gen_prefix:
        return q
    return q + (tgt if requires_delimiter(q, gen_prefix) else "") + gen_prefix


def gold_index(gold, choices):
    """lm-eval's gold: an int index (-100 when out of range), a choice's text as its
    index (-100 when it is none of them), or a list of such indices."""
    if isinstance(gold, list):
        return [g if isinstance(g, int) and g < len(choices) else -100 for g in gold]
    if isinstance(gold, bool):
        return -100
    if isinstance(gold, int):
        return gold if gold < len(choices) else -100
    if isinstance(gold, str):
        return choices.index(gold) if gold in choices else -100
    return -100


def maybe_delimit(prefix, suffix, delimiter: str = " ") -> str:
    """lm-eval's: prefix + delimiter + suffix unless either side has a space there."""
    if not prefix:
        return suffix or ""
    if not suffix:
        return prefix or ""
    return prefix + suffix if prefix[-1].isspace() or suffix[0].isspace() \
        else prefix + delimiter + suffix


def requires_delimiter(prefix: str, suffix: str) -> bool:
    if prefix == "":
        return False
    return not (prefix[-1].isspace() or suffix[0].isspace())

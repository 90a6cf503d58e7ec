"""Generation tasks: ask, let the model answer greedily, extract the answer, exact match.

    report = evaluate_generation(model, encoder, task, GenOptions(shots=3, chat_template="chatml"))
    report["results"]["exact_match"]

Two kinds of task:

- An lm-eval task with ``output_type: generate_until``: the prompt is lm-eval's (the
  few-shot context of ``fewshot.py``), generation stops at its ``generation_kwargs``
  ``until`` strings or ``max_gen_toks`` (default 256), the answer goes through its
  ``filter_list`` (``regex``, ``take_first``) and is compared with the target (the
  target choice when the task has choices) with its ``exact_match`` options
  (ignore_case, ignore_punctuation, regexes_to_ignore).
- A multiple-choice task asked as a question: the question and its lettered choices
  ("A. ...") are the query of a ``tinylm.prompts`` prompt (zero-shot, few-shot with
  ``shots`` solved examples whose output is the gold letter, or zero-shot chain of
  thought with ``cot``), the answer is the first match of ``answer_regex`` (the last
  with ``cot``: the reasoning comes first) and must be the gold letter.

``chat_template`` (a built-in name or file, ``tinylm.prompts.ChatTemplate``) wraps the
prompt as one user message and adds the template's stop strings. Extraction follows
lm-eval's ``RegexFilter``: ``re.findall``, the chosen match (a tuple gives its first
non-empty group), stripped; no match is "[invalid]".
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

import numpy as np

from tinylm.errors import TinyLMError
from tinylm.evaluation.fewshot import FewshotSampler, fewshot_prefix, gold_index
from tinylm.evaluation.harness import aggregate, shots_of, task_documents
from tinylm.evaluation.tasks import LETTERS

DEFAULT_ANSWER_REGEX = r"\b([A-Z])\b"
INSTRUCTION = "Answer with the letter of the correct choice."
INVALID = "[invalid]"


@dataclass(frozen=True)
class GenOptions:
    """``shots`` / ``seed`` / ``limit`` as for multiple choice; ``cot``: zero-shot chain
    of thought; ``chat_template``: wrap each prompt as a user message;
    ``answer_regex``: what the answer looks like in the reply; ``max_new_tokens``
    (None: the task's max_gen_toks, else 256); ``batch_size``: prompts decoded
    together."""

    shots: int | None = None
    seed: int | None = 1234
    limit: int | None = None
    cot: bool = False
    chat_template: str | None = None
    model_dir: str | None = None
    answer_regex: str | None = None
    max_new_tokens: int | None = None
    batch_size: int = 8
    progress: bool = False


def evaluate_generation(model, encoder, task, options: GenOptions = GenOptions()) -> dict:
    """{"task", "shots", "n", "results": {exact_match, exact_match_stderr}, "samples"}."""
    if options.cot and options.shots:
        raise TinyLMError("--cot asks zero-shot (the model writes its own reasoning); drop "
                          "--shots")
    items = _items(task, options)
    template, stop = _template(options)
    until = list(task.generation_kwargs.get("until", [])) if task.output_type == \
        "generate_until" else []
    prompts = [template.render([{"role": "user", "content": p}]) if template else p
               for p, _ in items]
    max_new = options.max_new_tokens or int(task.generation_kwargs.get("max_gen_toks", 256))
    outputs = _generate(model, encoder, prompts, max_new, until + stop, options)
    samples = []
    for i, ((_, target), prompt, out) in enumerate(zip(items, prompts, outputs)):
        extracted = _extract(task, out, options)
        hit = _exact_match(extracted, target, task.exact_match)
        samples.append({"doc_id": i, "prompt": prompt, "output": out, "extracted": extracted,
                        "target": target, "exact_match": hit})
    return {"task": task.name, "shots": 0 if options.cot else shots_of(task, options),
            "n": len(samples), "results": aggregate(samples, ("exact_match",)),
            "samples": samples}


def _items(task, options):
    """[(prompt text, target text)] of the documents evaluated."""
    sampler = FewshotSampler(task, options.seed)
    shots = 0 if options.cot else shots_of(task, options)
    items = []
    for doc in task_documents(task, options.limit):
        examples = sampler.sample(shots, doc)
        if task.output_type == "generate_until":
            items.append((_lmeval_prompt(task, doc, examples), _lmeval_target(task, doc)))
            continue
        query, answer = question_and_letter(task, doc)
        pairs = [question_and_letter(task, ex) for ex in examples]
        items.append((_prompt(query, pairs, options.cot), answer))
    return items


def question_and_letter(task, doc):
    """(the question with its lettered choices, the gold letter) of a multiple-choice
    document; choices that are letters already (MMLU's) are not listed again."""
    choices = task.choices(doc)
    gold = gold_index(task.target(doc), choices)
    gold = gold[0] if isinstance(gold, list) else gold
    if gold == -100:
        raise TinyLMError(f"task {task.name!r}: a document's target is none of its choices")
    question = doc.get("question") or doc.get("query") or task.text(doc)
    if doc.get("context"):
        question = f"{doc['context']}\n{question}"
    if all(isinstance(c, str) and len(c) == 1 and c in LETTERS for c in choices):
        return str(task.text(doc)), choices[gold]
    listed = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{question}\n{listed}", LETTERS[gold]


def _prompt(query, pairs, cot) -> str:
    from tinylm.prompts import chain_of_thought, few_shot, zero_shot

    if cot:
        return chain_of_thought(query)
    return few_shot(INSTRUCTION, pairs, query) if pairs else zero_shot(INSTRUCTION, query)


def _lmeval_prompt(task, doc, examples) -> str:
    """lm-eval's context for a generate_until document: description, examples, q, and
    the gen_prefix when there is one."""
    q = task.text(doc)
    prefix = task.resolve(doc, task.gen_prefix)
    head = (task.resolve(doc, task.description) or "") + fewshot_prefix(task, examples)
    if prefix:
        from tinylm.evaluation.fewshot import requires_delimiter

        q = q + (task.target_delimiter if requires_delimiter(q, prefix) else "") + prefix
    return head + q


def _lmeval_target(task, doc) -> str:
    target = task.target(doc)
    if task.doc_to_choice is not None:
        choices = task.choices(doc)
        target = choices[target] if isinstance(target, int) else target
    return str(target[0] if isinstance(target, list) else target)


def _template(options):
    if options.chat_template is None:
        return None, []
    from tinylm.prompts import ChatTemplate

    template = ChatTemplate.resolve(options.chat_template, options.model_dir)
    return template, list(template.stop)


def _generate(model, encoder, prompts, max_new, stop, options) -> list:
    """The greedy continuation text of each prompt, cut at the first stop string."""
    from tinylm.generate import cut_at_stop, generate

    tok = encoder.tokenizer
    outputs = []
    bar = None
    if options.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), unit="doc", desc="generating", dynamic_ncols=True)
    for start in range(0, len(prompts), max(1, options.batch_size)):
        chunk = [encoder.encode(p) for p in prompts[start: start + options.batch_size]]
        result = generate(model, chunk, max_new, temperature=0.0, tokenizer=tok,
                          stop=stop)
        for tokens in result.tokens:
            text = tok.decode(tokens, skip_special_tokens=True)
            outputs.append(cut_at_stop(text, stop) if stop else text)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return outputs


def _extract(task, text, options) -> str:
    if task.output_type == "generate_until" and options.answer_regex is None:
        for fn, kwargs in task.filters:
            if fn == "regex":
                text = regex_extract(text, kwargs.get("regex_pattern", r"#### (\-?[0-9\.\,]+)"),
                                     int(kwargs.get("group_select", 0)),
                                     kwargs.get("fallback", INVALID))
        return text
    pattern = options.answer_regex or DEFAULT_ANSWER_REGEX
    return regex_extract(text, pattern, -1 if options.cot else 0)


def regex_extract(text: str, pattern: str, group_select: int = 0, fallback: str = INVALID):
    """lm-eval's ``RegexFilter`` on one reply."""
    try:
        matches = re.findall(pattern, text)
    except re.error as e:
        raise TinyLMError(f"answer regex {pattern!r} is not a valid regular expression: "
                          f"{e}") from None
    if not matches:
        return fallback
    match = matches[group_select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), None)
        if match is None:
            return fallback
    return match.strip()


def _exact_match(prediction: str, reference: str, opts: dict) -> float:
    """lm-eval's ``exact_match`` of one pair, with its options."""
    for pattern in opts.get("regexes_to_ignore") or ():
        prediction, reference = re.sub(pattern, "", prediction), re.sub(pattern, "", reference)
    if opts.get("ignore_case"):
        prediction, reference = prediction.lower(), reference.lower()
    if opts.get("ignore_punctuation"):
        table = str.maketrans("", "", string.punctuation)
        prediction, reference = prediction.translate(table), reference.translate(table)
    return float(np.asarray(prediction == reference))

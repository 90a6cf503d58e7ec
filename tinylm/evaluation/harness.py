"""Multiple choice by log-likelihood, scored as lm-evaluation-harness scores it.

    task = read_task("arc_easy_test.jsonl")
    enc = TextEncoder.for_model("hf/gpt2", model, tokenizer)
    report = evaluate_mc(model, enc, task, MCOptions(shots=2))
    report["results"]["acc"], report["results"]["acc_norm_stderr"]
    print(format_table(report))

Each document becomes one (context, " " + choice) request per choice (``fewshot.py``),
encoded with lm-eval's context/continuation split (``encoding.py``) and scored by
``loglik.continuation_logprobs``: the choices of a document share their context, which
runs through the model once. Per document, with ll_i the log-likelihood of choice i:

    acc        argmax_i ll_i is the gold choice
    acc_norm   argmax_i ll_i / len(choice_i) (characters), the gold
    acc_bytes  argmax_i ll_i / len(choice_i in UTF-8 bytes), the gold

(ties go to the first choice, as ``numpy.argmax``; a list of gold choices counts a hit
on any). Each metric is the mean over documents with its standard error
sqrt(sample variance / n), lm-eval's ``mean_stderr``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tinylm.errors import TinyLMError
from tinylm.evaluation.fewshot import FewshotSampler, build_prompt
from tinylm.evaluation.loglik import continuation_logprobs

METRICS = ("acc", "acc_norm", "acc_bytes")


@dataclass(frozen=True)
class MCOptions:
    """``shots``: few-shot examples per document (None: the task's num_fewshot, else 0);
    ``seed``: the few-shot sampler's (lm-eval's default 1234); ``limit``: the first N
    documents only; ``batch_size``: requests per forward; ``max_length``: the model's
    window (default its max_positions)."""

    shots: int | None = None
    seed: int | None = 1234
    limit: int | None = None
    batch_size: int = 32
    progress: bool = False
    max_length: int | None = None


def task_documents(task, limit):
    docs = task.docs if limit is None else task.docs[: max(0, int(limit))]
    if not docs:
        raise TinyLMError(f"task {task.name!r}: --limit {limit} leaves no documents")
    return docs


def shots_of(task, options) -> int:
    shots = options.shots if options.shots is not None else (task.num_fewshot or 0)
    if shots < 0:
        raise TinyLMError(f"--shots must be 0 or more, got {shots}")
    return int(shots)


def build_prompts(task, options):
    """[(doc, Prompt)] for the documents evaluated, few-shot examples drawn in order."""
    sampler = FewshotSampler(task, options.seed)
    shots = shots_of(task, options)
    out = []
    for doc in task_documents(task, options.limit):
        prompt = build_prompt(task, doc, sampler.sample(shots, doc))
        if not prompt.choices:
            raise TinyLMError(f"task {task.name!r}: a document has no choices")
        out.append((doc, prompt))
    return out


def evaluate_mc(model, encoder, task, options: MCOptions = MCOptions()) -> dict:
    """{"task", "shots", "n", "results": {metric, metric_stderr}, "samples": [...]}: the
    task scored on ``model``; each sample has the document's prompts, its per-choice
    log-likelihoods and is_greedy flags, the gold and the metrics."""
    prompts = build_prompts(task, options)
    requests = [encoder.pair(ctx, cont) for _, p in prompts
                for ctx, cont in zip(p.contexts, p.continuations)]
    scores = continuation_logprobs(model, requests, batch_size=options.batch_size,
                                   progress=options.progress, max_length=options.max_length)
    samples, at = [], 0
    for i, (doc, p) in enumerate(prompts):
        mine = scores[at: at + len(p.choices)]
        at += len(p.choices)
        lls = [ll for ll, _ in mine]
        samples.append({"doc_id": i, "context": p.contexts[0], "continuations": p.continuations,
                        "loglikelihoods": lls, "is_greedy": [g for _, g in mine],
                        "gold": p.gold, **doc_metrics(lls, p.choices, p.gold)})
    return {"task": task.name, "shots": shots_of(task, options), "n": len(samples),
            "results": aggregate(samples, METRICS), "samples": samples}


def doc_metrics(lls, choices, gold) -> dict:
    """acc, acc_norm, acc_bytes of one document (lm-eval's ``process_results``)."""
    lls = np.asarray(lls, dtype=np.float64)
    chars = np.array([float(len(c)) for c in choices])
    nbytes = np.array([float(len(c.encode("utf-8"))) for c in choices])
    preds = {"acc": int(np.argmax(lls)), "acc_norm": int(np.argmax(lls / chars)),
             "acc_bytes": int(np.argmax(lls / nbytes))}
    golds = gold if isinstance(gold, list) else [gold]
    return {name: 1.0 if pred in golds else 0.0 for name, pred in preds.items()}


def aggregate(samples, metrics) -> dict:
    """{metric: mean, metric_stderr: standard error of the mean (None for one document)}."""
    out = {}
    for name in metrics:
        values = np.array([s[name] for s in samples], dtype=np.float64)
        out[name] = float(values.mean())
        n = len(values)
        out[f"{name}_stderr"] = (float(math.sqrt(values.var(ddof=1) / n)) if n > 1 else None)
    return out


def format_table(report: dict, metrics=None) -> str:
    """The report's metrics as a small text table (metric, value, ± stderr)."""
    results = report["results"]
    metrics = metrics or [k for k in results if not k.endswith("_stderr")]
    head = f"{report['task']} ({report['n']} documents, {report['shots']}-shot)"
    rows = [head, f"{'metric':<12} {'value':>8}   {'stderr':>8}"]
    for name in metrics:
        err = results.get(f"{name}_stderr")
        err = "" if err is None else f"± {err:.4f}"
        rows.append(f"{name:<12} {results[name]:>8.4f}   {err:>8}")
    return "\n".join(rows)

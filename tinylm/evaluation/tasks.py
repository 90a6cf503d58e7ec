"""Multiple-choice (and generation) tasks: the files benchmarks come in, read into one ``Task``.

    task = read_task("arc_easy_test.jsonl")             # the format is recognised
    task = read_task("mmlu/test/anatomy_test.csv")      # few-shot docs: ../dev/anatomy_dev.csv
    task = read_task("my_task.yaml")                    # lm-eval's own task format
    task.text(doc), task.choices(doc), task.target(doc)

Formats (``fmt=`` or recognised from the file):

    simple     JSONL: question, choices (list), answer (index, choice text or letter),
               optional context; prompt "{context}\\nQuestion: {question}\\nAnswer:"
    mmlu       CSV rows question, A, B, C, D, answer letter (Hendrycks' data/test/*.csv);
               prompt, choices A-D and description as lm-eval's mmlu task, few-shot
               the first K rows of the subject's dev file (data/dev/{subject}_dev.csv)
    hellaswag  JSONL ctx_a / ctx_b (or ctx) / activity_label / endings / label, as
               lm-eval's hellaswag task preprocesses them
    arc        JSONL question.stem / question.choices[text, label] / answerKey (AI2's
               files) or the Hugging Face rows question / choices.text|label / answerKey;
               prompt "Question: {question}\\nAnswer:" as lm-eval's arc tasks
    lm-eval    a YAML (needs PyYAML) or JSON task description in lm-eval's format:
               doc_to_text / doc_to_choice / doc_to_target (a field name, a {{ }}
               template, a list, an index), description, target_delimiter,
               fewshot_delimiter, num_fewshot, fewshot_split / fewshot_config
               (sampler default | first_n, samples), splits, include, generation_kwargs,
               filter_list (regex, take_first), metric_list (exact_match options). Its
               data are local files: dataset_path json | csv with dataset_kwargs.data_files.

A ``Task`` resolves doc_to_text / doc_to_choice / doc_to_target on a document exactly as
lm-eval's ``ConfigurableTask`` does (a field name gives the field; a template is rendered;
a rendered number becomes an int when the task has choices; "[...]" a list). A YAML's
``!function`` (Python code beside the task file) is refused: tinylm runs no code from a
task file.
"""

from __future__ import annotations

import ast
import csv
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from tinylm.errors import TinyLMError
from tinylm.evaluation.template import render

FORMATS = ("simple", "mmlu", "hellaswag", "arc", "lm-eval")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class TaskError(TinyLMError):
    """A task file that cannot be read or does not describe a task."""


@dataclass
class Task:
    """A task: its evaluation documents, the pool few-shot examples come from, and how
    a document becomes a prompt (lm-eval's ``TaskConfig`` fields of the same names).

    ``exclude_eval_doc``: few-shot examples are drawn from the evaluation documents, so
    the document being asked is left out of its own examples (lm-eval does this only
    when ``fewshot_split`` is the test split). ``fewshot``: overrides of doc_to_text /
    doc_to_choice / doc_to_target / target_delimiter / fewshot_delimiter for the
    examples (lm-eval's ``fewshot_config``)."""

    name: str
    docs: list
    fewshot_docs: list | None = None
    doc_to_text: Any = None
    doc_to_choice: Any = None
    doc_to_target: Any = None
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    num_fewshot: int | None = None
    sampler: str = "default"
    exclude_eval_doc: bool = False
    fewshot: dict = field(default_factory=dict)
    output_type: str = "multiple_choice"
    generation_kwargs: dict = field(default_factory=dict)
    filters: list = field(default_factory=list)
    exact_match: dict = field(default_factory=dict)
    gen_prefix: str | None = None

    def __post_init__(self):
        if not self.docs:
            raise TaskError(f"task {self.name!r} has no documents to evaluate; check its file")
        self.features = list(dict.fromkeys(k for doc in self.docs for k in doc))

    def resolve(self, doc, value):
        """lm-eval's ``resolve_field``: a field of ``doc``, else a template on it."""
        if not value:
            return None
        return doc[value] if value in doc else render(value, doc)

    # lm-eval's ConfigurableTask.doc_to_text / doc_to_target / doc_to_choice
    def text(self, doc, how=None):
        how = self.doc_to_text if how is None else how
        if isinstance(how, int) or callable(how):
            return how if isinstance(how, int) else how(doc)
        if not isinstance(how, str):
            raise TaskError(f"task {self.name!r}: doc_to_text must be a field name or a "
                            f"template, got {how!r}")
        if how in self.features:
            return doc[how]
        text = render(how, doc)
        return ast.literal_eval(text) if text.isdigit() and self.doc_to_choice is not None else text

    def target(self, doc, how=None):
        how = self.doc_to_target if how is None else how
        if isinstance(how, (int, list)) or callable(how):
            return how(doc) if callable(how) else how
        if not isinstance(how, str):
            raise TaskError(f"task {self.name!r}: doc_to_target must be a field name or a "
                            f"template, got {how!r}")
        if how in self.features:
            return doc[how]
        text = render(how, doc)
        if text.isdigit() and self.doc_to_choice is not None:
            return ast.literal_eval(text)
        if len(text) >= 2 and text[0] == "[" and text[-1] == "]":
            try:
                return ast.literal_eval(text)
            except (SyntaxError, ValueError):
                return text
        return text

    def choices(self, doc, how=None) -> list:
        how = self.doc_to_choice if how is None else how
        if how is None:
            raise TaskError(f"task {self.name!r} has no doc_to_choice; a multiple-choice "
                            f"task needs one")
        if isinstance(how, str):
            if how in self.features:
                return doc[how]
            text = render(how, doc)
            try:
                return ast.literal_eval(text)
            except (SyntaxError, ValueError):
                raise TaskError(f"task {self.name!r}: doc_to_choice {how!r} rendered "
                                f"{text[:80]!r}, not a list") from None
        if isinstance(how, list):
            return how
        if isinstance(how, dict):
            return list(how.values())
        if callable(how):
            return how(doc)
        raise TaskError(f"task {self.name!r}: doc_to_choice must be a field, a template, a "
                        f"list or a mapping, got {how!r}")


# --------------------------------------------------------------------------- reading


def read_task(path, fmt: str = "auto", fewshot_path=None) -> Task:
    """The ``Task`` in ``path`` (format ``fmt``, or recognised from the file; see the
    module docstring). ``fewshot_path``: a file of the same format whose documents are
    the few-shot examples (default: the format's own rule, else the evaluation
    documents, each left out of its own examples)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TaskError(f"task file {path} does not exist; pass a .jsonl, .csv, .yaml or "
                        f".json task file")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise TaskError(f"unknown task format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "lm-eval":
        from tinylm.evaluation.lmeval_yaml import read_lmeval_task

        return read_lmeval_task(path)
    reader = {"simple": simple_task, "mmlu": mmlu_task, "hellaswag": hellaswag_task,
              "arc": arc_task}[fmt]
    return reader(path, fewshot_path)


def detect_format(path: str) -> str:
    """The format of ``path`` from its suffix and (for JSONL) its first record's keys."""
    lower = path.lower()
    if lower.endswith((".yaml", ".yml")):
        return "lm-eval"
    if lower.endswith(".csv"):
        return "mmlu"
    if lower.endswith(".json"):
        return "lm-eval"
    if not lower.endswith(".jsonl"):
        raise TaskError(f"{path}: cannot tell the task format from the file name (.jsonl, "
                        f".csv, .yaml or .json); pass --format {' | '.join(FORMATS)}")
    records = read_jsonl(path, limit=1)
    first = records[0] if records else {}
    if "endings" in first:
        return "hellaswag"
    if "answerKey" in first:
        return "arc"
    if "question" in first and "choices" in first:
        return "simple"
    raise TaskError(f"{path}: cannot tell the task format from its first record (keys "
                    f"{sorted(first)}); pass --format {' | '.join(FORMATS)}")


def read_jsonl(path, limit: int | None = None) -> list:
    """The JSON objects of a JSON Lines file (blank lines skipped); a bad line is an
    error naming file:line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise TaskError(f"{path}:{n}: not a JSON object ({e}); one JSON object per "
                                f"line") from None
            if not isinstance(record, dict):
                raise TaskError(f"{path}:{n}: a JSON Lines task has one JSON object per line, "
                                f"got {type(record).__name__}")
            records.append(record)
            if limit is not None and len(records) >= limit:
                break
    return records


def _fewshot(path, fewshot_path, reader):
    """(few-shot pool, exclude_eval_doc) of a built-in format."""
    if fewshot_path is not None:
        return reader(os.fspath(fewshot_path)), False
    return None, True


def _need(record, keys, where):
    missing = [k for k in keys if k not in record]
    if missing:
        raise TaskError(f"{where}: missing {', '.join(map(repr, missing))} (has "
                        f"{sorted(record)})")


# --------------------------------------------------------------------------- simple JSONL


def _simple_docs(path) -> list:
    docs = []
    for n, r in enumerate(read_jsonl(path), 1):
        where = f"{path}:{n}"
        _need(r, ("question", "choices", "answer"), where)
        choices = r["choices"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(
                isinstance(c, str) for c in choices):
            raise TaskError(f"{where}: choices must be a list of at least two strings")
        docs.append({"context": str(r.get("context") or ""), "question": str(r["question"]),
                     "choices": choices, "answer": _answer_index(r["answer"], choices, where)})
    return docs


def _answer_index(answer, choices, where) -> int:
    """An answer given as an index, a choice's text or a letter, as an index."""
    if isinstance(answer, bool):
        answer = None
    if isinstance(answer, int) and 0 <= answer < len(choices):
        return answer
    if isinstance(answer, str) and answer in choices:
        return choices.index(answer)
    if isinstance(answer, str) and len(answer) == 1 and answer in LETTERS[: len(choices)]:
        return LETTERS.index(answer)
    raise TaskError(f"{where}: answer {answer!r} is not an index into the {len(choices)} "
                    f"choices, one of their texts, or a letter A-{LETTERS[len(choices) - 1]}")


def _simple_text(doc) -> str:
    context = f"{doc['context']}\n" if doc["context"] else ""
    return f"{context}Question: {doc['question']}\nAnswer:"


def simple_task(path, fewshot_path=None) -> Task:
    pool, exclude = _fewshot(path, fewshot_path, _simple_docs)
    return Task(name=_stem(path), docs=_simple_docs(path), fewshot_docs=pool,
                exclude_eval_doc=exclude, doc_to_text=_simple_text, doc_to_choice="choices",
                doc_to_target="answer")


def _stem(path) -> str:
    name = os.path.basename(path)
    return name.split(".")[0] or name


# --------------------------------------------------------------------------- MMLU CSV


def _mmlu_docs(path) -> list:
    docs = []
    with open(path, encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row or (n == 1 and [c.strip().lower() for c in row[:6]] ==
                           ["question", "a", "b", "c", "d", "answer"]):
                continue
            if len(row) != 6:
                raise TaskError(f"{path}:{n}: an MMLU row has 6 columns (question, A, B, C, D, "
                                f"answer), this one {len(row)}")
            docs.append({"question": row[0], "choices": row[1:5],
                         "answer": _answer_index(row[5].strip(), row[1:5], f"{path}:{n}")})
    return docs


def _mmlu_text(doc) -> str:
    # lm-eval's mmlu/default template, spelled out (no Jinja needed)
    c = doc["choices"]
    return (f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\n"
            f"Answer:")


def mmlu_subject(path) -> str:
    """"college_biology" from ``.../college_biology_test.csv`` (Hendrycks' names)."""
    stem = _stem(path)
    return re.sub(r"_(test|dev|val|validation|auxiliary_train)$", "", stem)


def _mmlu_dev_file(path):
    """The subject's dev file next to the test file, in Hendrycks' layout (data/test/X_test.csv
    -> data/dev/X_dev.csv) or in the same folder; None when there is none."""
    subject, folder = mmlu_subject(path), os.path.dirname(os.path.abspath(path))
    for candidate in (os.path.join(os.path.dirname(folder), "dev", f"{subject}_dev.csv"),
                      os.path.join(folder, f"{subject}_dev.csv")):
        if os.path.isfile(candidate) and os.path.abspath(candidate) != os.path.abspath(path):
            return candidate
    return None


def mmlu_task(path, fewshot_path=None) -> Task:
    fewshot_path = _mmlu_dev_file(path) if fewshot_path is None else fewshot_path
    pool, exclude = _fewshot(path, fewshot_path, _mmlu_docs)
    subject = mmlu_subject(path)
    return Task(name=f"mmlu_{subject}", docs=_mmlu_docs(path), fewshot_docs=pool,
                exclude_eval_doc=exclude, doc_to_text=_mmlu_text,
                doc_to_choice=["A", "B", "C", "D"], doc_to_target="answer",
                description=(f"The following are multiple choice questions (with answers) "
                             f"about {subject.replace('_', ' ')}.\n\n"),
                sampler="first_n")


# --------------------------------------------------------------------------- HellaSwag


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag ``preprocess``: WikiHow's bracketed artifacts removed."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_docs(path) -> list:
    docs = []
    for n, r in enumerate(read_jsonl(path), 1):
        where = f"{path}:{n}"
        _need(r, ("endings", "label"), where)
        if "ctx_a" in r and "ctx_b" in r:
            ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
        elif "ctx" in r:
            ctx = r["ctx"]
        else:
            raise TaskError(f"{where}: a HellaSwag record has ctx_a and ctx_b (or ctx)")
        label = r["label"]
        try:
            label = int(label)
        except (TypeError, ValueError):
            raise TaskError(f"{where}: label {label!r} is not an ending's index") from None
        prefix = f"{r['activity_label']}: " if r.get("activity_label") else ""
        choices = [hellaswag_preprocess(e) for e in r["endings"]]
        docs.append({"query": hellaswag_preprocess(prefix + ctx), "choices": choices,
                     "gold": _answer_index(label, choices, where)})
    return docs


def hellaswag_task(path, fewshot_path=None) -> Task:
    pool, exclude = _fewshot(path, fewshot_path, _hellaswag_docs)
    return Task(name="hellaswag", docs=_hellaswag_docs(path), fewshot_docs=pool,
                exclude_eval_doc=exclude, doc_to_text="query", doc_to_choice="choices",
                doc_to_target="gold")


# --------------------------------------------------------------------------- ARC


def _arc_docs(path) -> list:
    docs = []
    for n, r in enumerate(read_jsonl(path), 1):
        where = f"{path}:{n}"
        _need(r, ("question", "answerKey"), where)
        q = r["question"]
        if isinstance(q, dict):  # AI2's files: question.stem, question.choices
            _need(q, ("stem", "choices"), f"{where}: question")
            text, labels = q["stem"], [str(c.get("label")) for c in q["choices"]]
            texts = [c.get("text") for c in q["choices"]]
        else:  # the Hugging Face rows: question, choices.text, choices.label
            _need(r, ("choices",), where)
            text, texts, labels = q, r["choices"].get("text"), r["choices"].get("label")
        key = str(r["answerKey"])
        if not texts or key not in labels:
            raise TaskError(f"{where}: answerKey {key!r} is not one of the choice labels "
                            f"{labels}")
        docs.append({"id": r.get("id"), "question": text,
                     "choices": {"text": texts, "label": labels}, "answerKey": key})
    return docs


def arc_task(path, fewshot_path=None) -> Task:
    pool, exclude = _fewshot(path, fewshot_path, _arc_docs)
    name = "arc_challenge" if "challenge" in os.path.basename(path).lower() else "arc_easy"
    return Task(name=name, docs=_arc_docs(path), fewshot_docs=pool, exclude_eval_doc=exclude,
                doc_to_text=lambda d: f"Question: {d['question']}\nAnswer:",
                doc_to_choice=lambda d: d["choices"]["text"],
                doc_to_target=lambda d: d["choices"]["label"].index(d["answerKey"]))

"""GLUE-style classification data and metrics: the TSV files the GLUE benchmark is
published in, read as its tasks lay them out, and the metrics it scores them by.

    task = TASKS["mrpc"]
    rows = read_tsv("glue_data/MRPC/dev.tsv", task)    # GlueRows: text_a, text_b, labels
    scores = task_metrics(task, predictions, rows.labels)  # {"accuracy": ..., "f1": ...}

The files (what GLUE's download script writes, and the TSVs of the old Hugging Face
processors) are tab-separated with no quoting at all (a `"` is an ordinary
character: ``csv.reader(delimiter="\\t", quotechar=None)``). Columns are found by
their header names, so a file whose columns come in another order (MNLI's dev files
have four more label columns than its train file) reads the same:

    task   text columns             label column   labels                       metrics
    cola   4th column (no header)   2nd column     0, 1                         matthews_correlation
    sst2   sentence                 label          0, 1                         accuracy
    mrpc   #1 String, #2 String     Quality        0, 1                         accuracy, f1
    qqp    question1, question2     is_duplicate   0, 1                         accuracy, f1
    stsb   sentence1, sentence2     score          (a number: regression)       pearson, spearmanr
    mnli   sentence1, sentence2     gold_label     entailment, neutral,         accuracy
                                                   contradiction
    qnli   question, sentence       label          entailment, not_entailment   accuracy
    rte    sentence1, sentence2     label          entailment, not_entailment   accuracy
    wnli   sentence1, sentence2     label          0, 1                         accuracy
    tsv    sentence, or sentence1   label          the values found             accuracy, f1,
           and sentence2                           (sorted)                     matthews_correlation

CoLA's train and dev files have no header (source, label, the original mark,
sentence); its test file does (``index\\tsentence``). A test split (no label column)
reads with ``labels`` None: predictions, no metrics. Label names are in Hugging Face
``datasets``' order (MNLI: entailment 0, neutral 1, contradiction 2). "tsv" is a
task of one's own: a header naming ``sentence`` (or ``sentence1`` and
``sentence2``) and ``label``. QQP's train file has a few rows with missing fields;
they are skipped and counted, as Hugging Face's ``QqpProcessor`` skips them; in any
other task a short row is an error naming file and line. Metrics with
``combined_score`` (their mean, where a task has two) are named as the ``evaluate``
library's GLUE metric names them, and follow scikit-learn's and SciPy's definitions
(``tests/test_eval_glue.py`` holds them equal on the same predictions).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

from tinylm.data import DataError, read_utf8


class GlueError(DataError):
    """A GLUE-style file that cannot be read as its task lays it out."""


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class GlueTask:
    """One task's layout: ``text`` (one or two column names; for a file without a
    header, ``positions`` gives the text and label columns by number instead),
    ``label`` (the label column's name), ``labels`` (the class names in label order;
    None: found in the data, or ``regression``), ``metrics`` (the names
    ``task_metrics`` reports), ``ids`` (columns naming a row, for predictions),
    ``skip_short`` (skip rows with missing fields instead of refusing them)."""

    name: str
    text: tuple
    label: str | None
    labels: tuple | None
    metrics: tuple
    regression: bool = False
    positions: tuple | None = None  # (text column(s)..., label column): no header
    test_header: tuple | None = None  # the header of a test split of a headerless task
    ids: tuple = ("index", "id")
    skip_short: bool = False

    @property
    def pair(self) -> bool:
        return len(self.text) == 2


_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")
TASKS = {t.name: t for t in (
    GlueTask("cola", ("sentence",), "label", _BINARY, ("matthews_correlation",),
             positions=(3, 1), test_header=("index", "sentence")),
    GlueTask("sst2", ("sentence",), "label", _BINARY, ("accuracy",)),
    GlueTask("mrpc", ("#1 String", "#2 String"), "Quality", _BINARY, ("accuracy", "f1")),
    GlueTask("qqp", ("question1", "question2"), "is_duplicate", _BINARY, ("accuracy", "f1"),
             skip_short=True),
    GlueTask("stsb", ("sentence1", "sentence2"), "score", None, ("pearson", "spearmanr"),
             regression=True),
    GlueTask("mnli", ("sentence1", "sentence2"), "gold_label",
             ("entailment", "neutral", "contradiction"), ("accuracy",)),
    GlueTask("qnli", ("question", "sentence"), "label", _NLI2, ("accuracy",)),
    GlueTask("rte", ("sentence1", "sentence2"), "label", _NLI2, ("accuracy",)),
    GlueTask("wnli", ("sentence1", "sentence2"), "label", _BINARY, ("accuracy",)),
    GlueTask("tsv", ("sentence",), "label", None, ("accuracy", "f1", "matthews_correlation")),
)}
ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mnli-mm": "mnli",
           "mnli_matched": "mnli", "mnli_mismatched": "mnli"}


def get_task(name: str) -> GlueTask:
    """The task called ``name`` (case-insensitive; SST-2, STS-B, mnli-mm spellings too)."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in TASKS:
        raise GlueError(f"unknown GLUE task {name!r}; pick one of {', '.join(TASKS)}")
    return TASKS[key]


# --------------------------------------------------------------------------- reading


@dataclass
class GlueRows:
    """The rows of one file: ``text_a`` (and ``text_b`` for a pair task), ``labels``
    ((n,) int64 class indices, float64 scores for regression, or None for a test
    split), ``label_names`` (the class names the indices stand for; None for
    regression), ``ids`` (each row's index column, or its line number), ``skipped``
    (short rows skipped, QQP only)."""

    text_a: list
    text_b: list | None
    labels: np.ndarray | None
    label_names: tuple | None
    ids: list = field(default_factory=list)
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.text_a)

    def head(self, n: int) -> "GlueRows":
        """The first ``n`` rows."""
        return GlueRows(self.text_a[:n], None if self.text_b is None else self.text_b[:n],
                        None if self.labels is None else self.labels[:n], self.label_names,
                        self.ids[:n], self.skipped)


def read_lines(path) -> list:
    """The lines of a UTF-8 TSV file (BOM dropped, "\\r\\n" or "\\n" endings; only
    "\\n" ends a line: GLUE's text may hold other line-break characters)."""
    text = read_utf8(path, GlueError, "; GLUE files are UTF-8 TSV")
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def _layout(path: str, task: GlueTask, first: list) -> tuple:
    """(text column numbers, label column number or None, id column or None, whether
    the first line is a header) of a file whose first line is ``first``."""
    if task.positions is not None:
        if task.test_header is None or tuple(first[:2]) != task.test_header:
            return task.positions[:-1], task.positions[-1], None, False
    missing = [n for n in task.text if n not in first]
    if missing:
        raise GlueError(f"{path}: no {' or '.join(repr(n) for n in missing)} column in the "
                        f"header ({', '.join(repr(c) for c in first[:12])}); is it a "
                        f"{task.name} file? (pick the task with --task)")
    ids = next((first.index(n) for n in task.ids if n in first), None)
    label = first.index(task.label) if task.label in first else None
    return tuple(first.index(n) for n in task.text), label, ids, True


def read_tsv(path, task: GlueTask | str, label_names=None) -> GlueRows:
    """The rows of a GLUE-style TSV file laid out as ``task`` says. ``label_names``:
    the classes of a "tsv" task (default: the sorted values found in this file). A
    label outside the task's classes, a score that is not a finite number, a short
    row (but in QQP) or a file without rows is a GlueError naming file and line."""
    task = get_task(task) if isinstance(task, str) else task
    path = os.fspath(path)
    lines = read_lines(path)
    if not any(line.strip() for line in lines):
        raise GlueError(f"{path} has no rows; give a {task.name} TSV file")
    first = next(line for line in lines if line.strip()).split("\t")
    text_cols, label_col, id_col, header = _layout(path, task, first)
    need = max((*text_cols, -1 if label_col is None else label_col,
                -1 if id_col is None else id_col)) + 1
    rows, numbers, skipped, seen_header = [], [], 0, False
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if header and not seen_header:
            seen_header = True
            continue
        fields = line.split("\t")
        if len(fields) < need:
            if task.skip_short:
                skipped += 1
                continue
            raise GlueError(f"{path}:{n}: {len(fields)} tab-separated field(s), a {task.name} "
                            f"row has at least {need}; fix the row (fields are separated by "
                            f"tabs, with no quoting)")
        rows.append(fields)
        numbers.append(n)
    if not rows:
        raise GlueError(f"{path} has a header and no rows; give a {task.name} TSV file")
    text_a = [r[text_cols[0]] for r in rows]
    text_b = [r[text_cols[1]] for r in rows] if len(text_cols) == 2 else None
    ids = [r[id_col] for r in rows] if id_col is not None else [str(n) for n in numbers]
    labels, names = None, None if task.regression else (task.labels or label_names)
    if label_col is not None:
        raw = [r[label_col].strip() for r in rows]
        labels, names = _labels(path, task, raw, numbers, names)
    return GlueRows(text_a, text_b, labels, names, ids, skipped)


def read_files(paths, task: GlueTask, label_names=None) -> GlueRows:
    """The labelled rows of several files, one after another. The classes of a "tsv"
    task are ``label_names``, else the sorted labels found in all of them. A file
    without labels (a test split) is a GlueError."""
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise GlueError("no data files given")
    if label_names is None and task.labels is None and not task.regression:
        found = set()
        for path in paths:
            found |= set(_labelled(read_tsv(path, task), path).label_names)
        label_names = tuple(sorted(found))
    parts = [_labelled(read_tsv(path, task, label_names), path) for path in paths]
    if len(parts) == 1:
        return parts[0]
    return GlueRows([t for p in parts for t in p.text_a],
                    None if not task.pair else [t for p in parts for t in p.text_b],
                    np.concatenate([p.labels for p in parts]), parts[0].label_names,
                    [i for p in parts for i in p.ids], sum(p.skipped for p in parts))


def _labelled(rows: GlueRows, path: str) -> GlueRows:
    if rows.labels is None:
        raise GlueError(f"{path} has no label column (a test split?); train and validate "
                        f"on labelled files (train.tsv, dev.tsv)")
    return rows


def _labels(path: str, task: GlueTask, raw: list, numbers: list, names) -> tuple:
    """(labels array, class names) of the label column's values ``raw``."""
    if task.regression:
        try:
            values = np.array([float(v) for v in raw], dtype=np.float64)
        except ValueError:
            bad = next(i for i, v in enumerate(raw) if not _is_float(v))
            raise GlueError(f"{path}:{numbers[bad]}: the {task.name} score {raw[bad]!r} is not "
                            f"a number") from None
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise GlueError(f"{path}:{numbers[bad[0]]}: the score {raw[bad[0]]!r} is not a "
                            f"finite number")
        return values, None
    names = tuple(names) if names is not None else tuple(sorted(set(raw)))
    index = {name: i for i, name in enumerate(names)}
    try:
        return np.array([index[v] for v in raw], dtype=np.int64), names
    except KeyError:
        bad = next(i for i, v in enumerate(raw) if v not in index)
        raise GlueError(f"{path}:{numbers[bad]}: label {raw[bad]!r} is not one of the "
                        f"{task.name} labels ({', '.join(names)})") from None


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def tsv_task(path) -> GlueTask:
    """The "tsv" task for a file of one's own: a pair task when its header names
    ``sentence1`` and ``sentence2``."""
    first = _first_fields(path)
    if "sentence1" in first and "sentence2" in first:
        return GlueTask("tsv", ("sentence1", "sentence2"), "label", None, TASKS["tsv"].metrics)
    return TASKS["tsv"]


def _first_fields(path) -> list:
    return next((line for line in read_lines(path) if line.strip()), "").split("\t")


# the header columns that tell each task's files apart (checked in this order)
_SIGNS = (("mrpc", {"Quality", "#1 String", "#2 String"}),
          ("qqp", {"question1", "question2", "is_duplicate"}),
          ("stsb", {"sentence1", "sentence2", "score"}), ("mnli", {"gold_label"}),
          ("qnli", {"question", "sentence", "label"}),
          ("rte", {"sentence1", "sentence2", "label"}), ("sst2", {"sentence", "label"}))


def resolve_task(name, path) -> GlueTask:
    """The task of ``path``: ``name`` (a GLUE task, or "tsv"), or when None the one
    its header says (CoLA: no header, four columns, a 0/1 second one); RTE and WNLI
    share a header and are told apart by their labels, SST-2 and a "tsv" file too."""
    if name is not None:
        task = get_task(name)
        return tsv_task(path) if task.name == "tsv" else task
    first = set(_first_fields(path))
    for task_name, sign in _SIGNS:
        if sign <= first:
            task = TASKS[task_name]
            break
    else:
        fields = _first_fields(path)
        if len(fields) == 4 and fields[1] in _BINARY:
            return TASKS["cola"]
        raise GlueError(f"{path}: the header ({', '.join(repr(c) for c in fields[:8])}) is "
                        f"none of the GLUE tasks'; name the task (cola, sst2, mrpc, qqp, "
                        f"stsb, mnli, qnli, rte, wnli, or tsv: a 'sentence' (or 'sentence1' "
                        f"and 'sentence2') column and a 'label' column)")
    if task.name in ("rte", "sst2"):
        labels = set(read_tsv(path, tsv_task(path)).label_names)
        if task.name == "rte" and labels <= set(_BINARY):
            return TASKS["wnli"]
        if not labels <= set(task.labels):
            return tsv_task(path)
    return task


# --------------------------------------------------------------------------- metrics


def _pair(y_true, y_pred, dtype=None) -> tuple:
    t, p = np.asarray(y_true, dtype=dtype), np.asarray(y_pred, dtype=dtype)
    if t.shape != p.shape or t.ndim != 1:
        raise GlueError(f"labels and predictions must be two 1-D arrays of one length, got "
                        f"shapes {t.shape} and {p.shape}")
    if not len(t):
        raise GlueError("no predictions to score")
    return t, p


def accuracy(y_true, y_pred) -> float:
    """The fraction of predictions equal to the labels."""
    t, p = _pair(y_true, y_pred)
    return float(np.mean(t == p))


def confusion_matrix(y_true, y_pred, n_classes: int | None = None) -> np.ndarray:
    """(C, C) int64 counts: row = true class, column = predicted class (scikit-learn's
    layout), for class indices 0..C-1."""
    t, p = _pair(y_true, y_pred)
    t, p = t.astype(np.int64), p.astype(np.int64)
    if t.min() < 0 or p.min() < 0:
        raise GlueError("class indices must be >= 0")
    C = int(max(t.max(), p.max()) + 1) if n_classes is None else int(n_classes)
    return np.bincount(t * C + p, minlength=C * C).reshape(C, C)


def f1(y_true, y_pred, average: str = "binary", pos_label: int = 1) -> float:
    """F1 = 2 TP / (2 TP + FP + FN), 0 where there is no positive at all (scikit-learn's
    ``zero_division`` default). ``average``: "binary" (of ``pos_label``), "macro" (the
    unweighted mean over the classes that occur in the labels or predictions) or
    "micro" (from the counts pooled over classes)."""
    if average not in ("binary", "macro", "micro"):
        raise GlueError(f"average must be 'binary', 'macro' or 'micro', got {average!r}")
    t, p = _pair(y_true, y_pred)
    if average == "binary":
        tp = np.sum((t == pos_label) & (p == pos_label))
        denominator = np.sum(t == pos_label) + np.sum(p == pos_label)  # 2TP + FP + FN
        return float(2 * tp / denominator) if denominator else 0.0
    m = confusion_matrix(t, p)
    tp, true, pred = np.diag(m), m.sum(axis=1), m.sum(axis=0)  # (C,) each
    if average == "micro":
        return float(2 * tp.sum() / (true.sum() + pred.sum()))
    present = (true + pred) > 0
    per_class = np.divide(2 * tp, true + pred, out=np.zeros(len(tp)), where=present)
    return float(per_class[present].mean())


def matthews_corrcoef(y_true, y_pred) -> float:
    """Matthews correlation, the multi-class form scikit-learn computes:
    (c s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)) from the confusion matrix (c correct of
    s, t and p the per-class true and predicted counts); 0 when either side is
    constant."""
    m = confusion_matrix(y_true, y_pred).astype(np.float64)
    t_sum, p_sum = m.sum(axis=1), m.sum(axis=0)  # (C,)
    correct, s = np.trace(m), m.sum()
    cov_tp = correct * s - np.dot(t_sum, p_sum)
    cov_pp = s * s - np.dot(p_sum, p_sum)
    cov_tt = s * s - np.dot(t_sum, t_sum)
    if cov_pp * cov_tt == 0:
        return 0.0
    return float(cov_tp / np.sqrt(cov_tt * cov_pp))


def pearson(x, y) -> float:
    """Pearson's r (``scipy.stats.pearsonr``'s statistic); NaN when either side is
    constant, has fewer than two values, or holds a NaN or infinity."""
    x, y = _pair(x, y, np.float64)
    if len(x) < 2 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return math.nan
    xm, ym = x - x.mean(), y - y.mean()  # (n,)
    nx, ny = np.linalg.norm(xm), np.linalg.norm(ym)
    if nx == 0 or ny == 0:
        return math.nan
    return float(np.clip(np.dot(xm / nx, ym / ny), -1.0, 1.0))


def rankdata(a) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of their ranks (``scipy.stats.rankdata``
    with method="average"), by one sort: a tie group spanning sorted positions
    s..s+k-1 gets rank s + (k + 1) / 2."""
    a = np.asarray(a)
    order = np.argsort(a, kind="mergesort")
    s = a[order]
    new = np.concatenate([[True], s[1:] != s[:-1]])  # (n,) a tie group starts
    starts = np.flatnonzero(new)
    counts = np.diff(np.concatenate([starts, [len(a)]]))
    ranks = np.empty(len(a), dtype=np.float64)
    ranks[order] = (starts + (counts + 1) / 2.0)[np.cumsum(new) - 1]
    return ranks


def spearman(x, y) -> float:
    """Spearman's rho: Pearson's r of the average ranks (``scipy.stats.spearmanr``);
    NaN as for ``pearson``."""
    x, y = _pair(x, y, np.float64)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return math.nan
    return pearson(rankdata(x), rankdata(y))


def task_metrics(task: GlueTask, predictions, labels, n_classes: int | None = None) -> dict:
    """{metric name: value} for ``task``: its metrics, and ``combined_score`` (their
    mean) where it has two (``run_glue``'s). ``predictions``: class indices, or scores
    for regression. A "tsv" task with more than two classes reports macro F1."""
    out = {}
    for name in task.metrics:
        if name == "accuracy":
            out[name] = accuracy(labels, predictions)
        elif name == "f1":
            binary = (n_classes or int(max(np.max(labels), np.max(predictions)) + 1)) <= 2
            out[name] = f1(labels, predictions, "binary" if binary else "macro")
        elif name == "matthews_correlation":
            out[name] = matthews_corrcoef(labels, predictions)
        elif name == "pearson":
            out[name] = pearson(predictions, labels)
        elif name == "spearmanr":
            out[name] = spearman(predictions, labels)
    if len(task.metrics) == 2 and task.name != "tsv":
        out["combined_score"] = float(np.mean(list(out.values())))
    return out


# --------------------------------------------------------------------------- a classifier on a file


def label_map(model_labels, task_labels) -> np.ndarray | None:
    """(C,) the task's class index of each of the model's classes: by name when the
    model's labels are the task's (in any order), else in order (a model whose labels
    are LABEL_0, LABEL_1 ...); None when the counts differ."""
    if model_labels is None or task_labels is None or len(model_labels) != len(task_labels):
        return None
    if set(model_labels) == set(task_labels):
        return np.array([list(task_labels).index(n) for n in model_labels], dtype=np.int64)
    return np.arange(len(task_labels), dtype=np.int64)


def evaluate(model, tokenizer, info, task, path, *, batch_size: int = 32,
             max_length: int | None = None, limit: int | None = None,
             progress: bool = False) -> dict:
    """Classify every row of ``path`` (a ``task`` TSV: a GlueTask or its name) with
    ``model`` (a classifier and its ``tinylm.classify_run.ClassifierInfo``) and score
    the predictions when the file has labels. Returns {"task", "data", "examples",
    "metrics" ({} for a test split), "ids", "predictions" (class indices of the
    task's labels, or scores), "label_names"}."""
    from tinylm.classify import Encoding, predict

    task = resolve_task(task if isinstance(task, str) else task.name, path)
    if task.regression != (info.num_labels == 1):
        raise GlueError(f"{task.name} is {'regression' if task.regression else 'classification'}"
                        f" but the model has {info.num_labels} label(s); evaluate a "
                        f"{'one-label' if task.regression else 'classes'} model on it")
    rows = read_tsv(path, task, info.labels if task.name == "tsv" else None)
    rows = rows.head(limit) if limit else rows
    mapping = None if task.regression else label_map(info.labels or tuple(
        str(i) for i in range(info.num_labels)), rows.label_names)
    if not task.regression and mapping is None:
        raise GlueError(f"the model has {info.num_labels} labels "
                        f"({', '.join(map(str, info.labels or ()))}), {task.name} has "
                        f"{len(rows.label_names)} ({', '.join(rows.label_names)}); evaluate "
                        f"it on a task with its labels")
    enc = Encoding.for_model(model, tokenizer, max_length or info.max_length)
    logits = predict(model, enc.sentences(rows), enc.pad_id, batch_size, progress)  # (n, C)
    predictions = logits[:, 0] if task.regression else mapping[logits.argmax(axis=1)]
    metrics = {} if rows.labels is None else task_metrics(
        task, predictions, rows.labels, None if task.regression else len(rows.label_names))
    return {"task": task.name, "data": os.fspath(path), "examples": len(rows),
            "metrics": metrics, "ids": rows.ids, "predictions": predictions,
            "label_names": rows.label_names}


def write_predictions(path, result: dict) -> None:
    """GLUE's submission format: ``index\tprediction`` lines under that header, the
    label names (scores with three decimals for regression), written atomically."""
    from tinylm.atomic import write_atomic

    names = result["label_names"]
    values = [f"{v:.3f}" for v in result["predictions"]] if names is None else \
        [names[int(i)] for i in result["predictions"]]
    lines = ["index\tprediction"] + [f"{i}\t{v}" for i, v in zip(result["ids"], values)]
    write_atomic(path, "\n".join(lines) + "\n", error=GlueError)


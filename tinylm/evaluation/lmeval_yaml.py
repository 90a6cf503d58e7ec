"""lm-evaluation-harness task files (YAML or JSON) on local data, read into a ``Task``.

    task: my_qa
    dataset_path: json
    dataset_kwargs:
      data_files: {train: train.jsonl, test: test.jsonl}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "Question: {{question}}\\nAnswer:"
    doc_to_choice: choices
    doc_to_target: answer

The splits follow lm-eval: evaluation documents are the test split, else the validation
split; few-shot examples come from ``fewshot_split`` (or ``fewshot_config.split``), else
``fewshot_config.samples``, else the training, validation or test split, in that order
of preference; the document being asked is left out of its own examples only when the
few-shot split is the test split (lm-eval's rule). ``include: base.yaml`` (a file beside
this one) is read first and overridden key by key.

Data files: ``dataset_path`` ``json`` (JSON Lines, a JSON array, or an object whose
``dataset_kwargs.field`` holds the rows) or ``csv`` (a header row), with
``dataset_kwargs.data_files`` a path, a list, or ``{split: path or list}`` (a lone path
or list is the "train" split, as in ``datasets.load_dataset``). A relative path is
taken from the task file's folder, else the working directory. Rows missing a column
get None for it, as the ``datasets`` library fills them. A Hub dataset name (such as
``cais/mmlu``) is an error saying to point at local files: nothing is downloaded.
"""

from __future__ import annotations

import csv
import json
import os

from tinylm.evaluation.tasks import Task, TaskError, read_jsonl

KNOWN_OUTPUT = ("multiple_choice", "generate_until")


def read_lmeval_task(path) -> Task:
    """The ``Task`` described by the lm-eval YAML or JSON file ``path``."""
    path = os.fspath(path)
    config = _load_config(path)
    name = str(config.get("task") or os.path.splitext(os.path.basename(path))[0])
    output = config.get("output_type", "generate_until")
    if output not in KNOWN_OUTPUT:
        raise TaskError(f"{path}: output_type {output!r}; tinylm eval mc runs "
                        f"{' and '.join(KNOWN_OUTPUT)} tasks")
    for key in ("process_docs", "process_results", "use_prompt", "custom_dataset"):
        if config.get(key) is not None:
            raise TaskError(f"{path}: {key} is not supported (it runs code or needs the Hub); "
                            f"remove it and preprocess the data file instead")
    splits = _read_splits(path, config)
    fs_cfg = dict(config.get("fewshot_config") or {})
    eval_split = config.get("test_split") or config.get("validation_split")
    if eval_split is None or eval_split not in splits:
        raise TaskError(f"{path}: the evaluation split {eval_split!r} (test_split, else "
                        f"validation_split) is not among the data splits {sorted(splits)}")
    fewshot_split = fs_cfg.get("split", config.get("fewshot_split"))
    return Task(
        name=name, docs=splits[eval_split],
        fewshot_docs=_fewshot_pool(path, config, fs_cfg, fewshot_split, splits),
        doc_to_text=config.get("doc_to_text"), doc_to_choice=config.get("doc_to_choice"),
        doc_to_target=config.get("doc_to_target"), description=config.get("description") or "",
        target_delimiter=config.get("target_delimiter", " "),
        fewshot_delimiter=config.get("fewshot_delimiter", "\n\n"),
        num_fewshot=config.get("num_fewshot"), sampler=fs_cfg.get("sampler", "default"),
        exclude_eval_doc=(fewshot_split is not None
                          and fewshot_split == config.get("test_split")),
        fewshot={k: fs_cfg[k] for k in ("doc_to_text", "doc_to_choice", "doc_to_target",
                                        "target_delimiter", "fewshot_delimiter")
                 if fs_cfg.get(k) is not None},
        output_type=output, generation_kwargs=_generation_kwargs(config),
        filters=_filters(path, config), exact_match=_exact_match_options(config),
        gen_prefix=config.get("gen_prefix"),
    )


def _fewshot_pool(path, config, fs_cfg, fewshot_split, splits):
    if fewshot_split is not None:
        if fewshot_split not in splits:
            raise TaskError(f"{path}: fewshot split {fewshot_split!r} is not among the data "
                            f"splits {sorted(splits)}")
        return splits[fewshot_split]
    if isinstance(fs_cfg.get("samples"), list):
        return fs_cfg["samples"]
    for key in ("training_split", "validation_split", "test_split"):
        if config.get(key) is not None and config[key] in splits:
            return splits[config[key]]
    return None


def _generation_kwargs(config) -> dict:
    """lm-eval's defaults: until the few-shot delimiter, greedy."""
    kwargs = dict(config.get("generation_kwargs") or {})
    kwargs.setdefault("until", [config.get("fewshot_delimiter", "\n\n")])
    if isinstance(kwargs["until"], str):
        kwargs["until"] = [kwargs["until"]]
    return kwargs


def _filters(path, config) -> list:
    """The first filter pipeline's steps as (function, options) (regex, take_first)."""
    pipelines = config.get("filter_list") or []
    if not pipelines:
        return []
    steps = []
    for step in pipelines[0].get("filter", []):
        fn = step.get("function")
        if fn not in ("regex", "take_first"):
            raise TaskError(f"{path}: filter function {fn!r} is not supported (regex and "
                            f"take_first are)")
        steps.append((fn, {k: v for k, v in step.items() if k != "function"}))
    return steps


def _exact_match_options(config) -> dict:
    for metric in config.get("metric_list") or []:
        if isinstance(metric, dict) and metric.get("metric") == "exact_match":
            return {k: metric[k] for k in ("ignore_case", "ignore_punctuation",
                                           "regexes_to_ignore") if k in metric}
    return {}


# --------------------------------------------------------------------------- the file


def _load_config(path, depth: int = 0) -> dict:
    if depth > 8:
        raise TaskError(f"{path}: include nests more than 8 files deep")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise TaskError(f"cannot read task file {path}: {e}") from None
    data = json.loads(text) if path.lower().endswith(".json") else _yaml(text, path)
    if not isinstance(data, dict):
        raise TaskError(f"{path}: a task file is a mapping of lm-eval's TaskConfig fields")
    include = data.pop("include", None)
    if include is None:
        return data
    base = os.path.join(os.path.dirname(path), str(include))
    if not os.path.isfile(base):
        raise TaskError(f"{path}: include {include!r} is not a file beside it (tinylm "
                        f"reads lm-eval's bundled task files only from disk)")
    return {**_load_config(base, depth + 1), **data}


def _yaml(text, path):
    try:
        import yaml
    except ImportError:
        raise TaskError(f"{path}: reading YAML needs `pip install pyyaml` (or write the "
                        f"task as JSON)") from None

    class Loader(yaml.SafeLoader):
        pass

    def refuse(loader, node):
        raise TaskError(f"{path}: '!function {node.value}' runs Python from the task folder, "
                        f"which tinylm does not; replace it with a template or the data")

    Loader.add_constructor("!function", refuse)
    try:
        return yaml.load(text, Loader=Loader)
    except yaml.YAMLError as e:
        raise TaskError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None


# --------------------------------------------------------------------------- the data


def _read_splits(path, config) -> dict:
    """{split: [doc]} of the task's local data files."""
    builder = config.get("dataset_path")
    kwargs = dict(config.get("dataset_kwargs") or {})
    if builder not in ("json", "csv") or "data_files" not in kwargs:
        raise TaskError(f"{path}: dataset_path {builder!r} is not local data; tinylm downloads "
                        f"nothing: use dataset_path: json (or csv) and dataset_kwargs.data_files "
                        f"pointing at your files")
    files = kwargs["data_files"]
    if isinstance(files, (str, list)):
        files = {"train": files}
    if not isinstance(files, dict):
        raise TaskError(f"{path}: data_files is a path, a list of paths or {{split: path}}")
    splits = {}
    for split, names in files.items():
        rows = []
        for name in [names] if isinstance(names, str) else list(names):
            rows += _read_rows(_locate(path, str(name)), builder, kwargs.get("field"))
        splits[str(split)] = _fill_columns(rows)
    return splits


def _locate(task_path, name):
    if os.path.isabs(name):
        found = name
    else:
        beside = os.path.join(os.path.dirname(os.path.abspath(task_path)), name)
        found = beside if os.path.exists(beside) else name
    if not os.path.isfile(found):
        raise TaskError(f"{task_path}: data file {name} does not exist (looked beside the task "
                        f"file and in the working directory)")
    return found


def _read_rows(file, builder, field):
    if builder == "csv":
        with open(file, encoding="utf-8", newline="") as f:
            return [dict(row) for row in csv.DictReader(f)]
    with open(file, encoding="utf-8") as f:
        text = f.read()
    try:
        whole = json.loads(text)
    except ValueError:
        return read_jsonl(file)
    if field is not None:
        whole = whole.get(field) if isinstance(whole, dict) else None
    if isinstance(whole, dict):
        return [whole]  # a one-line JSON Lines file
    if not isinstance(whole, list) or not all(isinstance(r, dict) for r in whole):
        raise TaskError(f"{file}: the rows must be JSON objects (JSON Lines, an array, or "
                        f"dataset_kwargs.field naming the array)")
    return whole


def _fill_columns(rows):
    """Every row with every column (None where missing), as ``datasets`` reads them."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return [{c: row.get(c) for c in columns} for row in rows]

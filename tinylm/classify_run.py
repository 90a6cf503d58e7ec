"""A sequence classifier's run and its folder: trained by `tinylm finetune --task
classify` (the Trainer, as every fine-tune), read back by `tinylm eval glue`.

    spec = FinetuneSpec("hf/bert-tiny", "full")                 # what tinylm.finetune takes
    result = run(spec, {"out_dir": "runs/sst2", "data": ["train.tsv"]}, task="sst2")
    model, tokenizer, info = load_classifier("runs/sst2")       # info.labels, info.task ...

OUT holds the Trainer's run folder (metrics.jsonl with ``eval_accuracy``, checkpoints
that resume bit for bit) and:

    classifier.json          the task, its label names in head order (None: regression),
                             the pooling ("cls" or "last"), --block-size, the base and
                             the method; written before training starts
    --full                   the checkpoint is the whole classifier: an encoder's
                             config.json is a BERT with head = "classification"
                             (`tinylm.loading` reads it alone), a decoder's is the base's,
                             its model.safetensors holding score.weight beside
    PEFT (lora ...)          adapter_config.json + adapter_model.safetensors (PEFT's
                             files, pointing at the base) and classifier.safetensors (the
                             head: pooler + classifier, or score), written at the end

The head trains in full beside an adapter (PEFT's ``modules_to_save`` for sequence
classification), with a freshly drawn pooler (a masked-LM base has none). A Hugging
Face BertForSequenceClassification, GPT2ForSequenceClassification or
LlamaForSequenceClassification folder loads as a classifier too (its ``id2label``
names the classes).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np

from tinylm import backend, checkpoint
from tinylm.classify import (
    Classify, ClassifyData, ClassifyError, Encoding, head_names, num_labels, with_head,
)
from tinylm.errors import CheckpointError, ConfigError

INFO_FILE = "classifier.json"
HEAD_FILE = "classifier.safetensors"
TASK = "classify"
FORMAT_VERSION = 1
DEFAULT_LENGTH = 128  # --block-size: run_glue's max_seq_length
_DECODER_CLASSES = {"GPT2ForSequenceClassification", "LlamaForSequenceClassification"}


@dataclass(frozen=True)
class ClassifierInfo:
    """What ``classifier.json`` says (the module docstring)."""

    task: str | None
    labels: tuple | None  # class names in head order; None: regression
    pooling: str  # "cls" (encoder) or "last" (decoder)
    num_labels: int
    max_length: int
    base: str | None = None
    method: str = "full"
    dequantize: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["labels"] = None if self.labels is None else list(self.labels)
        return {"format": "tinylm-classifier", "version": FORMAT_VERSION, **d}

    @classmethod
    def read(cls, folder) -> "ClassifierInfo":
        path = os.path.join(os.fspath(folder), INFO_FILE)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if data.pop("format") != "tinylm-classifier" or data.pop("version") != FORMAT_VERSION:
                raise ValueError("not a tinylm classifier file of this version")
            labels = data.pop("labels")
            return cls(labels=None if labels is None else tuple(labels), **data)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{path} is damaged or of another version ({e}); fine-tune "
                                  f"the classifier again") from None

    def save(self, folder) -> None:
        from tinylm.atomic import write_atomic

        write_atomic(os.path.join(os.fspath(folder), INFO_FILE),
                     json.dumps(self.to_dict(), indent=1) + "\n", error=CheckpointError)


# --------------------------------------------------------------------------- training


def run(spec, settings: dict, *, task=None, epochs: float | None = None,
        overwrite: bool = False, log=None, progress: bool = False) -> dict:
    """Fine-tune a classifier as ``spec`` says (a ``tinylm.finetune.FinetuneSpec``: base,
    PEFT method or "full", ``eval_data``: validation TSVs) on the TSV files in
    ``settings["data"]`` (TrainConfig fields, out_dir among them), laid out as the GLUE
    ``task`` (a name; None: the one the first file's header says). Every row is read
    and checked before anything is written; a checkpoint in out_dir is resumed unless
    ``overwrite``. Returns the Trainer's summary with "written" and "task"."""
    from tinylm import finetune, peft
    from tinylm.evaluation import glue
    from tinylm.rundir import open_run
    from tinylm.train import TrainConfig, Trainer

    log = log or (lambda msg: None)
    task = glue.resolve_task(task, settings["data"][0])
    rows = glue.read_files(settings["data"], task)
    eval_rows = glue.read_files(spec.eval_data, task, rows.label_names) \
        if spec.eval_data else None
    with open_run(settings["out_dir"], overwrite=overwrite) as folder:
        if overwrite:
            remove_outputs(folder.path)
        base, tokenizer = finetune.load_base(spec, settings.get("device", "cpu"), Classify)
        config = finetune.train_config(spec, base_settings(settings), base)
        info = _info(spec, base, task, rows, config.block_size)
        if folder.state is not None:
            check_resume(spec, info, folder.state, folder.path)
        backend.seed(config.seed)  # the head's draw
        model, _ = with_head(base, info.num_labels)
        finetune.adapt(model, spec, seed=config.seed)
        train_head(model)
        enc = Encoding.for_model(model, tokenizer, config.block_size)
        data = ClassifyData.from_rows(rows, enc, eval_rows=eval_rows, seed=config.seed,
                                      key=_sources_key(config.data, spec.eval_data, task))
        log(describe_data(data, task, rows))
        if "max_steps" not in settings:
            config = finetune.with_epochs(config, data, 1.0 if epochs is None else epochs)
        if folder.state is not None:
            saved = TrainConfig.from_dict(folder.state["config"])
            config = config.for_resume(saved, set(settings) | {"max_steps"})
        log(str(peft.trainable_parameters(model)))
        estimate = finetune.memory_estimate(model, config.batch_size, config.block_size)
        log(finetune.describe_memory(estimate))
        finetune.check_fits(estimate)
        info.save(folder.path)
        trainer = Trainer(config, model=model, tokenizer=tokenizer, data=data,
                          objective=Classify(tokenizer), log=log, progress=progress,
                          weights=spec.weights, extra_state=record(spec, model, info))
        result = trainer.fit(folder)
        result["written"] = [] if result["interrupted"] else \
            save_outputs(trainer.model, spec, folder.path)
    result["task"] = task.name
    return result


def base_settings(settings: dict) -> dict:
    """The TrainConfig settings of a classifier run: no samples, the classify objective,
    run_glue's 128 tokens unless --block-size says otherwise."""
    return {"objective": TASK, "sample_tokens": 0, "block_size": DEFAULT_LENGTH, **settings}


def _info(spec, model, task, rows, max_length: int) -> ClassifierInfo:
    from tinylm.objectives import model_kind

    labels = None if task.regression else tuple(rows.label_names)
    if labels is not None and len(labels) < 2:
        raise ClassifyError(f"the training rows have one label ({labels[0]!r}): nothing to "
                            f"tell apart; give rows of at least two classes")
    return ClassifierInfo(task.name, labels,
                          "cls" if model_kind(model) == "encoder" else "last",
                          1 if labels is None else len(labels), int(max_length), spec.base,
                          spec.method, bool(spec.dequantize))


def _sources_key(files, eval_files, task) -> str:
    from tinylm.data import fingerprint_key, source_fingerprint

    return fingerprint_key(source_fingerprint(list(files) + list(eval_files), "glue"), task.name)


def train_head(model) -> None:
    """The head's parameters trainable (beside an adapter, PEFT's modules_to_save)."""
    names = set(head_names(model))
    for name, p in model.named_parameters():
        if name in names:
            p.requires_grad = True


def record(spec, model, info: ClassifierInfo) -> dict:
    """The run record kept with every checkpoint (``Trainer(extra_state=...)``): the
    fine-tune's, with the classifier's task, labels and pooling."""
    return {**spec.record(model), "task": TASK, "classifier": info.to_dict()}


def check_resume(spec, info: ClassifierInfo, state: dict, out_dir: str) -> None:
    """A ConfigError unless ``out_dir``'s checkpoint is a classifier fine-tune of the
    same base, method, adapter, task and labels."""
    from tinylm import finetune

    finetune.check_resume(spec, state, out_dir)
    saved = (state.get("extra") or {}).get("classifier")
    if state["extra"].get("task") != TASK or not isinstance(saved, dict):
        raise ConfigError(f"{out_dir} holds a fine-tune that is not a classifier's; pick "
                          f"another --out, or pass --overwrite to start over")
    mine = info.to_dict()
    differs = [f"{k} = {mine[k]!r} (the checkpoint has {saved.get(k)!r})"
               for k in ("task", "labels", "pooling", "num_labels") if mine[k] != saved.get(k)]
    if differs:
        raise ConfigError(f"{out_dir} holds a classifier of another task: {'; '.join(differs)}; "
                          f"resume with the same data, pick another --out, or pass --overwrite")


def describe_data(data, task, rows) -> str:
    what = "scores (regression)" if task.regression else \
        f"{len(rows.label_names)} labels: {', '.join(rows.label_names)}"
    line = f"data: {len(data)} {task.name} examples ({what})"
    if rows.skipped:
        line += f", {rows.skipped} short rows skipped"
    if data.validation is not None:
        line += f", {len(data.validation)} validation examples"
    return line


def save_outputs(model, spec, out_dir) -> list:
    """What a finished PEFT run writes beside its checkpoint: the adapter files and
    the head. A full run's checkpoint is the whole classifier already."""
    from tinylm import peft
    from tinylm.finetune import FULL

    if spec.method == FULL:
        return []
    peft.save_adapter(model, out_dir, base=spec.base)
    params = dict(model.named_parameters())
    head = {n: np.ascontiguousarray(backend.to_numpy(params[n].data)) for n in head_names(model)}
    checkpoint.save_file(head, os.path.join(out_dir, HEAD_FILE), metadata={"format": "np"})
    return [out_dir]


def remove_outputs(out_dir) -> None:
    """What a run writes besides its checkpoint (for --overwrite)."""
    from tinylm.finetune import remove_outputs as remove_finetune_outputs

    remove_finetune_outputs(out_dir)
    for name in (INFO_FILE, HEAD_FILE):
        if os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))


# --------------------------------------------------------------------------- reading back


def load_classifier(path, device: str = "cpu") -> tuple:
    """(model, tokenizer, ClassifierInfo) of a classifier, in eval mode on ``device``:
    the --out folder of `tinylm finetune --task classify`, or a Hugging Face
    *ForSequenceClassification folder (BERT, GPT-2, Llama)."""
    path = os.fspath(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, INFO_FILE)):
        info = ClassifierInfo.read(path)
        model, tokenizer = (_load_whole(path, info) if info.method == "full"
                            else _load_adapted(path, info))
    else:
        model, tokenizer, info = _load_plain(path)
    return model.to(device).eval(), tokenizer, info


def _load_whole(path: str, info: ClassifierInfo) -> tuple:
    """A --full run folder: its config, the head, every weight of its checkpoint."""
    from tinylm import nn
    from tinylm.models import build_model, config_from_dict
    from tinylm.models.config import read_config_file
    from tinylm.rundir import CONFIG_FILE, MODEL_FILE, STATE_FILE, TOKENIZER_FILE
    from tinylm.rundir import read_checkpoint_state
    from tinylm.tokenizers import from_file

    if not os.path.exists(os.path.join(path, STATE_FILE)):
        raise CheckpointError(f"{path} has {INFO_FILE} but no checkpoint yet; run the same "
                              f"`tinylm finetune --task classify` command to train it")
    read_checkpoint_state(path)  # every file checked against its recorded size and hash
    with nn.skip_init():
        model = build_model(config_from_dict(read_config_file(os.path.join(path, CONFIG_FILE))))
        model, _ = with_head(model, info.num_labels)
    model.load_state_dict(checkpoint.load_file(os.path.join(path, MODEL_FILE)))
    return model, from_file(os.path.join(path, TOKENIZER_FILE))


def _load_adapted(path: str, info: ClassifierInfo) -> tuple:
    """A PEFT run folder: the base, the head from classifier.safetensors, the adapter."""
    from tinylm import nn
    from tinylm.finetune import attach_adapter
    from tinylm.loading import load_model

    if not os.path.isfile(os.path.join(path, HEAD_FILE)):
        raise CheckpointError(f"{path} holds no finished classifier ({HEAD_FILE} is missing); "
                              f"run the same `tinylm finetune --task classify` command to "
                              f"finish it")
    model, tokenizer = load_model(info.base, dequantize=info.dequantize or None)
    with nn.skip_init():
        model, _ = with_head(model, info.num_labels)
    head = checkpoint.load_file(os.path.join(path, HEAD_FILE))
    if set(head) != set(head_names(model)):
        raise CheckpointError(f"{path}/{HEAD_FILE} does not hold this model's head (it has "
                              f"{sorted(head)[:4]}); restore the folder, or fine-tune again")
    model.load_state_dict(head, strict=False)
    return attach_adapter(model, path), tokenizer


def _load_plain(path: str) -> tuple:
    """A Hugging Face sequence classifier (or any model `tinylm.loading` reads that
    has a classification head): its labels from config.json's id2label."""
    from tinylm.loading import load_model, source_kind

    hf = _hf_config(path) if source_kind(path) == "hf" else {}
    arch = (hf.get("architectures") or [""])[0]
    if arch in _DECODER_CLASSES:
        model, tokenizer = _load_hf_decoder(path, hf)
    else:
        model, tokenizer = load_model(path)
    n = num_labels(model)
    if n is None:
        raise CheckpointError(f"{path} is not a sequence classifier (no classification head); "
                              f"fine-tune one with `tinylm finetune --task classify`, or give a "
                              f"Hugging Face *ForSequenceClassification folder")
    names = hf.get("id2label") or {}
    labels = tuple(str(names.get(str(i), i)) for i in range(n)) if n > 1 else None
    limit = getattr(model.config, "max_positions", None) or 512
    info = ClassifierInfo(None, labels, "cls" if arch not in _DECODER_CLASSES else "last", n,
                          min(limit, 512), path)
    return model, tokenizer, info


def _hf_config(path: str) -> dict:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}/config.json: {e}") from None
    return data if isinstance(data, dict) else {}


def _load_hf_decoder(path: str, hf: dict) -> tuple:
    """A GPT2/LlamaForSequenceClassification folder: the decoder (its lm_head, absent
    there, tied to the embedding: a classifier never reads it) and score.weight."""
    from tinylm import nn
    from tinylm.loading import hf_tokenizer
    from tinylm.models.hf import _weight_files, load_pretrained

    files = _weight_files(path)
    tie = {} if "lm_head.weight" in files else {"tie_embeddings": True}
    model = load_pretrained(path, strict=False, overrides=tie)
    if "score.weight" not in files:
        raise CheckpointError(f"{path} names {hf['architectures'][0]} but has no score.weight")
    score = checkpoint.load_file(files["score.weight"], names=["score.weight"])["score.weight"]
    with nn.skip_init():
        model, _ = with_head(model, int(score.shape[0]))
    model.load_state_dict({"score.weight": score}, strict=False)
    if hf.get("pad_token_id") is not None:
        model.config = model.config.replace(pad_token_id=int(hf["pad_token_id"]))
    return model, hf_tokenizer(path)

"""A `tinylm align dpo` run: a base loaded and adapted as ``tinylm.finetune`` does (any
source ``tinylm.loading`` reads; a PEFT adapter, QLoRA on a packed base, or every
weight), preference pairs (``tinylm.align.preferences``), a reference and the DPO
objective (``tinylm.align.dpo``), trained by the one ``tinylm.train.Trainer``.

    spec = FinetuneSpec("hf/gpt2", "lora", {"r": 8})
    result = run(spec, DPOOptions(beta=0.1, loss_type="sigmoid"),
                 {"out_dir": "runs/dpo", "data": ["prefs.jsonl"]})

The reference, as TRL's DPOTrainer picks it: with an adapter, the base itself with
the adapters switched off (no second copy); with --full, a frozen copy of the base
loaded again; ``ref_model``: another model (it must have the base's vocabulary).
``precompute_ref``: the reference's log-probs of every pair computed once, before
training (TRL's ``precompute_ref_log_probs``), and kept in OUT/ref_logps.safetensors
(a resumed run reads them back; no reference model stays in memory); ``ref_logps``:
such a file from an earlier run on the same data.

OUT is a fine-tune's run folder (``tinylm.finetune``): metrics.jsonl (the loss and
TRL's rewards/*, logps/*, logits/* metrics; ``eval_`` ones at each evaluation),
checkpoints that resume bit for bit, and at the end the adapter in PEFT's files (or
with --full a whole model): `tinylm generate --model BASE --adapter OUT` loads it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from tinylm import checkpoint
from tinylm.align.dpo import (
    DPO, AdapterReference, ModelReference, PrecomputedReference, WithReference,
    check_options, check_same_vocabulary, disable_dropout, reference_logps,
)
from tinylm.errors import ConfigError, TinyLMError

REF_FILE = "ref_logps.safetensors"
REF_FORMAT = "tinylm-dpo-ref-logps-1"
# TrainConfig settings a DPO run starts from (TRL's DPOConfig where it has one)
DEFAULTS = {"batch_size": 8, "lr": 1e-5, "warmup_steps": 0, "weight_decay": 0.0,
            "eval_every": 100, "log_every": 10, "sample_tokens": 0, "val_fraction": 0.1,
            "objective": "dpo"}
FULL_LR = 1e-6  # TRL's DPOConfig learning_rate (a full fine-tune); adapters take 10x


@dataclass(frozen=True)
class DPOOptions:
    """What makes a run DPO: ``beta``, ``loss_type``, ``label_smoothing`` (the loss),
    ``ref_model`` (None: the base), ``precompute_ref``, ``ref_logps`` (a file of
    precomputed log-probs) and ``truncate`` (cut rows longer than --block-size, as
    TRL's DPO does, instead of refusing them)."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    ref_model: str | None = None
    precompute_ref: bool = False
    ref_logps: str | None = None
    truncate: bool = False

    def __post_init__(self):
        check_options(self.beta, self.loss_type, self.label_smoothing)
        for name in ("ref_model", "ref_logps"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, os.path.abspath(os.fspath(getattr(self, name))))
        if self.ref_logps is not None and (self.ref_model is not None or self.precompute_ref):
            raise ConfigError("--ref-logps gives the reference's log-probs: leave out "
                              "--ref-model and --precompute-ref")

    def objective_options(self) -> dict:
        return {"beta": self.beta, "loss_type": self.loss_type,
                "label_smoothing": self.label_smoothing}

    def record(self) -> dict:
        return dataclasses.asdict(self)


def check_resume(spec, options: DPOOptions, state: dict, out_dir: str) -> None:
    """A ConfigError unless ``out_dir``'s checkpoint is a DPO run of the same base,
    adapter and DPO options (``tinylm.finetune.check_resume`` for the first two)."""
    from tinylm.finetune import check_resume as check_finetune

    check_finetune(spec, state, out_dir)
    saved = (state.get("extra") or {}).get("dpo")
    if not isinstance(saved, dict):
        raise ConfigError(f"{out_dir} holds a fine-tune, not a DPO run; pick another --out, "
                          f"or pass --overwrite to start over")
    mine = options.record()
    differs = [f"{k} = {mine[k]!r} (the checkpoint has {saved.get(k)!r})"
               for k in mine if mine[k] != saved.get(k)]
    if differs:
        raise ConfigError(f"{out_dir} holds a DPO run with other settings: {'; '.join(differs)}; "
                          f"resume with the same ones, pick another --out, or pass --overwrite")


# --------------------------------------------------------------------------- the reference


def load_reference(model, spec, options: DPOOptions, device: str = "cpu") -> tuple:
    """(reference, bytes it holds): the adapters switched off, or a frozen model."""
    from tinylm.finetune import FULL, FinetuneSpec, load_base

    if options.ref_model is None and spec.method != FULL:
        return AdapterReference(), 0
    path = options.ref_model or spec.base
    ref, _ = load_base(FinetuneSpec(path, FULL, dequantize=spec.dequantize), device)
    check_same_vocabulary(model, ref, path)
    size = sum(int(a.nbytes) for a in ref.state_dict().values())
    return ModelReference(disable_dropout(ref), path), size


def describe_reference(spec, options: DPOOptions) -> str:
    """What the precomputed log-probs were computed with (kept with them)."""
    from tinylm.finetune import FULL

    if options.ref_model is None and spec.method != FULL:
        return f"{spec.base} (adapters disabled)"
    return f"{options.ref_model or spec.base} (dequantize={spec.dequantize})"


def read_ref_file(path: str, data, reference: str | None = None) -> dict:
    """The tables of a ref_logps file ({"train": (n, 2), "validation": (m, 2)}),
    checked against ``data`` (and, for the run's own file, the ``reference``)."""
    try:
        meta = checkpoint.read_metadata(path)
        arrays = checkpoint.load_file(path)
    except (TinyLMError, OSError):  # a damaged or foreign file
        meta, arrays = {}, {}
    if meta.get("format") != REF_FORMAT or "train" not in arrays:
        raise ConfigError(f"{path} is not a file of reference log-probs written by "
                          f"`tinylm align dpo --precompute-ref` (its {REF_FILE})")
    if meta.get("data") != data.path:
        raise ConfigError(f"the reference log-probs in {path} were computed for other data (or "
                          f"another tokenizer, template or --block-size); compute them again "
                          f"with --precompute-ref")
    if reference is not None and meta.get("reference") != reference:
        raise ConfigError(f"the reference log-probs in {path} come from "
                          f"{meta.get('reference')}, not {reference}; pass --overwrite")
    return arrays


def precomputed(model, spec, options: DPOOptions, data, config, folder: str, log) -> tuple:
    """(data with each pair's reference log-probs, how it got them): read from
    ``options.ref_logps`` or the run's own REF_FILE, else computed now and saved."""
    description = describe_reference(spec, options)
    own = os.path.join(folder, REF_FILE)
    if options.ref_logps is not None:
        tables, how = read_ref_file(options.ref_logps, data), f"read from {options.ref_logps}"
    elif os.path.exists(own):
        tables, how = read_ref_file(own, data, description), f"read from {own}"
    else:
        reference, _ = load_reference(model, spec, options, config.device)
        parts = {"train": data.examples, "validation": data.validation}
        tables = {name: reference_logps(reference, model, part, config.batch_size, data.pad_id)
                  for name, part in parts.items() if part is not None}
        checkpoint.save_file(tables, own, metadata={"format": REF_FORMAT, "data": data.path,
                                                    "reference": description})
        how = f"computed with {description}, saved in {own}"
    log(f"reference log-probs of {len(data)} pairs {how}")
    validation = data.validation
    if validation is not None:
        if "validation" not in tables:
            raise ConfigError(f"the reference log-probs hold no --eval-data pairs; compute "
                              f"them with the same --eval-data")
        validation = WithReference(validation, tables["validation"])
    return dataclasses.replace(data, examples=WithReference(data.examples, tables["train"]),
                               validation=validation)


# --------------------------------------------------------------------------- the run


def run(spec, options: DPOOptions, settings: dict, *, epochs: float | None = None,
        overwrite: bool = False, merge: bool = False, log=None, progress: bool = False):
    """DPO as ``spec`` (base, adapter) and ``options`` say: ``settings`` are TrainConfig
    fields given by the user (``out_dir`` and ``data`` among them); ``epochs`` sets
    max_steps from the number of pairs unless max_steps is given. Resumes a checkpoint
    in out_dir (same spec, options and settings) unless ``overwrite``. Returns the
    Trainer's summary, with "written" (the outputs)."""
    from tinylm import peft
    from tinylm.finetune import (
        _with_epochs, adapt, check_fits, describe_memory, formatting, load_base,
        memory_estimate, remove_outputs, save_outputs,
    )
    from tinylm.rundir import open_run
    from tinylm.train import TrainConfig, Trainer

    log = log or (lambda msg: None)
    settings = {**settings, "objective_options": options.objective_options()}
    with open_run(settings["out_dir"], overwrite=overwrite) as folder:
        if overwrite:
            remove_outputs(folder.path)
            if os.path.exists(os.path.join(folder.path, REF_FILE)):
                os.remove(os.path.join(folder.path, REF_FILE))
        if folder.state is not None:
            check_resume(spec, options, folder.state, folder.path)
        model, tokenizer = load_base(spec, settings.get("device", "cpu"))
        config = _config(spec, settings, model)
        disable_dropout(adapt(model, spec, seed=config.seed))
        fmt = formatting(model, tokenizer, spec, config.block_size, config.text_field, log)
        data = _read_data(config, fmt, spec, options, log)
        if "max_steps" not in settings:
            config = _with_epochs(config, data, 1.0 if epochs is None else epochs)
        if folder.state is not None:
            saved = TrainConfig.from_dict(folder.state["config"])
            config = config.for_resume(saved, set(settings) | {"max_steps"})
        log(str(peft.trainable_parameters(model)))
        if options.precompute_ref or options.ref_logps is not None:
            reference, ref_bytes = PrecomputedReference(), 0
        else:
            reference, ref_bytes = load_reference(model, spec, options, config.device)
        estimate = memory_estimate(model, 2 * config.batch_size, config.block_size)
        estimate = {**estimate, "weights": estimate["weights"] + ref_bytes,
                    "total": estimate["total"] + ref_bytes}
        log(describe_memory(estimate) + (" (with the reference's weights)" if ref_bytes else ""))
        check_fits(estimate)
        if isinstance(reference, PrecomputedReference):
            data = precomputed(model, spec, options, data, config, folder.path, log)
        trainer = Trainer(config, model=model, tokenizer=tokenizer, data=data,
                          objective=DPO(tokenizer, reference, **options.objective_options()),
                          log=log, progress=progress, weights=spec.weights,
                          extra_state={**spec.record(model), "dpo": options.record()})
        result = trainer.fit(folder)
        result["written"] = [] if result["interrupted"] else save_outputs(
            trainer.model, tokenizer, spec, folder.path, merge=merge, template=fmt.template)
    return result


def _config(spec, settings: dict, model):
    """The run's TrainConfig: DEFAULTS, the context (1024 tokens, TRL's max_length, or
    the model's if shorter), then ``settings``."""
    from tinylm.finetune import FULL
    from tinylm.train import TrainConfig

    context = min(1024, getattr(model.config, "max_positions", None) or 1024)
    data = {**DEFAULTS, "lr": FULL_LR if spec.method == FULL else DEFAULTS["lr"],
            "block_size": context, **settings}
    return TrainConfig.from_dict(data)


def _read_data(config, fmt, spec, options: DPOOptions, log):
    from tinylm.align.preferences import read_preferences

    data = read_preferences(config.data, fmt, eval_paths=spec.eval_data, seed=config.seed,
                            truncate=options.truncate)
    kinds = ", ".join(f"{n} {k}" for k, n in sorted((data.counts or {}).items()))
    line = f"data: {len(data)} preference pairs ({kinds})"
    if data.validation is not None:
        line += f", {len(data.validation)} validation pairs"
    if data.n_cut:
        line += f"; {data.n_cut} cut to --block-size {config.block_size} tokens"
    log(line)
    return data

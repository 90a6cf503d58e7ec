"""Training: a run's config and the Trainer loop, with checkpoints that resume exactly.

    config = TrainConfig(out_dir="runs/demo", data=["input.txt"], max_steps=2000)
    result = Trainer(config).fit()          # resumes if runs/demo holds a checkpoint
    Trainer(config, model=pretrained, tokenizer=tok).fit()   # a model built elsewhere

One optimizer step: ``grad_accum`` micro-batches of ``batch_size`` windows, each turned
into a batch and a loss by the objective (``tinylm.objectives``); the losses are
weighted by how many tokens each predicts (so accumulating 2 x 4 equals one batch of
8), back-propagated, the gradients clipped to ``grad_clip``, and AdamW steps with
nanoGPT's warmup + cosine learning rate. Every ``eval_every`` steps (and at the end)
the validation loss and perplexity are measured on ``eval_iters`` fixed batches, and
a decoder writes a sample. A NaN or infinite loss stops the run with a message; the
last checkpoint, written before it, stays as it was. Every setting is checked when
the TrainConfig is made, and the model's memory before it is allocated.

The metrics hook: an objective's ``loss()`` may set ``self.metrics = {name: float}``
(DPO's ``rewards/margins`` ...); the Trainer averages them over a step's micro-batches,
weighted as the losses, into that step's metrics.jsonl record (and the progress bar:
the names in the objective's ``progress_metrics``, else the first two), and over the
validation batches into the evaluation's record, named with TRL's ``eval_`` prefix.
An objective whose loss is not a mean cross-entropy sets ``perplexity = False``: its
evaluations report no perplexity (val_ppl).

The run folder (its files, the checkpoint set, the lock) is ``tinylm.rundir``'s.
Resuming restores the weights, AdamW's state, the step, the data sampler's position,
the objective's and the backend's random generators and the loss scaler: a run
interrupted (even by SIGKILL) and resumed from its last checkpoint continues with
bit-identical losses and ends with bit-identical weights. Ctrl-C or SIGTERM finishes
the step, saves a checkpoint and stops; a second one stops at once.

Under ``mpiexec -n N`` the Trainer trains data parallel through its ``dist`` object
(``tinylm.dist.DataParallel``): the global batch's rows split over the ranks, the
gradients summed once per step, rank 0 alone writing; with one rank it changes
nothing. ``tensor_parallel`` = T > 1 splits each model copy over T ranks
(``tinylm.dist.grid.TensorDataParallel``: N = D x T; the model becomes a
``tinylm.dist.tp_model.TensorParallelDecoder`` once built). The checkpoint does not
depend on N or T: it is always the full model's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from tinylm import amp, backend, checkpoint, plugins
from tinylm.autograd import no_grad
from tinylm.config_files import field_type_problems, non_finite_problems, toml_module
from tinylm.data import TokenData, default_cache_dir, fingerprint_key, make_dirs
from tinylm.data import iter_documents, resolve_sources, source_fingerprint
from tinylm.data_shards import ShardedTokenData, load_shard_tokenizer, make_batcher
from tinylm.data_shards import shard_entries, split_weight
from tinylm.dist.grid import TensorDataParallel, parallel_from_config
from tinylm.dist.tp_model import TensorParallelDecoder
from tinylm.errors import ConfigError, TinyLMError
from tinylm.instruct import ExampleBatcher, ExampleData, in_order
from tinylm.models import build_model, config_from_dict
from tinylm.objectives import DEFAULT_FOR_KIND, EOT, model_kind
from tinylm.optim import (
    AdamW, cosine_with_warmup, param_groups_for_weight_decay, set_lr,
    unflatten_state_dict,
)
from tinylm.rundir import (
    CONFIG_FILE, METRICS_FILE, MODEL_FILE, OPTIMIZER_FILE, TOKENIZER_FILE, MetricsLog, Run,
    save_checkpoint,
)
from tinylm.rundir import load_model_dir, read_metrics  # noqa: F401  (old imports of them)
from tinylm.threads import blas_threads, cores

# --family takes these short names as well as any registered architecture
FAMILY_ALIASES = {"gpt": "gpt2", "gpt2": "gpt2", "llama": "llama", "bert": "bert", "t5": "t5"}
# The model a run gets unless it says otherwise: small enough for a laptop CPU. The
# families' own defaults are the published sizes (GPT-2 small, Llama-2 7B ...).
SMALL_MODEL = {"n_layer": 4, "n_head": 4, "d_model": 128, "d_ff": None, "head_dim": None,
               "n_kv_head": None, "dropout": 0.0}


class TrainingDiverged(TinyLMError, RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""


# --------------------------------------------------------------------------- config


_FIELD_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,),
                "list": (list, tuple), "dict": (dict,)}


@dataclass
class TrainConfig:
    """Everything a run needs; a TOML file sets these at top level and the model's
    fields (``architecture``, ``n_layer`` ...) in a ``[model]`` table, objective
    options in an ``[objective_options]`` table. Unset (None) values are derived."""

    out_dir: str = "runs/demo"
    # data
    data: list = field(default_factory=list)  # files / folders; [] = pydoc topics
    text_field: str = "text"  # JSONL
    val_fraction: float = 0.1
    sampling: str = "random"  # or "packed"
    cache_dir: str | None = None  # None: $TINYLM_CACHE or ~/.cache/tinylm
    # tokenizer and model
    tokenizer: str = "char"  # "char", "bpe", another registered name, or a file
    vocab_size: int = 2048  # for a tokenizer trained here (not char)
    family: str = "gpt"  # gpt | llama | bert | t5 | a registered architecture
    model: dict = field(default_factory=dict)  # model-config fields ([model] table)
    objective: str | None = None  # None: the family's usual one
    objective_options: dict = field(default_factory=dict)
    block_size: int = 64
    # optimisation
    batch_size: int = 12
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr: float | None = None  # None: lr / 10
    warmup_steps: int = 100
    lr_decay_steps: int | None = None  # None: max_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: no clipping
    # evaluation, logging, checkpoints
    eval_every: int = 250
    eval_iters: int = 20
    log_every: int = 10
    checkpoint_every: int | None = None  # None: eval_every
    sample_tokens: int = 200  # decoders print a sample this long at each eval (0: none)
    temperature: float = 0.8
    seed: int = 1337
    device: str = "cpu"
    half: bool = False  # float16 matrix products + loss scaling (tinylm.amp)
    threads: int | None = None  # BLAS threads on the CPU; None: 1 for small models; 0: as is
    # several ranks (mpiexec -n N; tinylm.dist): batch_size is the global batch
    zero: int = 0  # 1: AdamW's state sharded over the ranks (ZeRO-1)
    reduce_order: str = "native"  # "fixed": sums over ranks in rank order (bit-reproducible)
    tensor_parallel: int = 1  # T > 1: each model copy split over T ranks (N = D x T ranks)

    # fields a resumed run may change; the rest must match the checkpoint's
    RESUMABLE = ("out_dir", "cache_dir", "max_steps", "eval_every", "eval_iters", "log_every",
                 "checkpoint_every", "sample_tokens", "temperature", "device", "threads",
                 "zero", "reduce_order", "tensor_parallel")

    def __post_init__(self):
        if isinstance(self.data, (str, os.PathLike)):
            self.data = [self.data]
        problems = field_type_problems(self, _FIELD_TYPES)
        if not problems:
            problems = self._check()
        if problems:
            raise ConfigError("invalid training config: " + "; ".join(problems))
        self.data = [os.fspath(p) for p in self.data]

    def _check(self) -> list:
        """Every field, so that a bad value fails now, not at the first evaluation."""
        p = non_finite_problems(self)
        if p:
            return p
        for name in ("block_size", "batch_size", "grad_accum", "eval_every", "eval_iters",
                     "log_every", "vocab_size", "tensor_parallel"):
            if getattr(self, name) < 1:
                p.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "sample_tokens", "seed"):
            if getattr(self, name) < 0:
                p.append(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("threads", "lr_decay_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                p.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            p.append(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.lr_decay_steps is not None and self.warmup_steps > self.lr_decay_steps:
            p.append(f"warmup_steps = {self.warmup_steps} is more than lr_decay_steps = "
                     f"{self.lr_decay_steps}; the decay starts after the warmup")
        return p + self._check_optimizer() + self._check_names()

    def _check_optimizer(self) -> list:
        p = []
        if not self.lr > 0:
            p.append(f"lr must be > 0, got {self.lr}")
        elif self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            p.append(f"min_lr must be in [0, lr = {self.lr}], got {self.min_lr}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                p.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.eps > 0:
            p.append(f"eps must be > 0, got {self.eps}")
        for name in ("grad_clip", "weight_decay", "temperature"):
            if getattr(self, name) < 0:
                p.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.val_fraction < 1:
            p.append(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        return p

    def _check_names(self) -> list:
        p = []
        for name in ("out_dir", "text_field", "tokenizer", "family"):
            if not getattr(self, name).strip():
                p.append(f"{name} must not be empty")
        if self.cache_dir is not None and not self.cache_dir.strip():
            p.append("cache_dir must not be empty (leave it unset for the default)")
        if self.objective is not None and not self.objective.strip():
            p.append("objective must not be empty (leave it unset for the family's)")
        bad = [d for d in self.data if not isinstance(d, (str, os.PathLike)) or not str(d)]
        if bad:
            p.append(f"data must be a list of paths, got {bad[0]!r}")
        elif self.out_dir.strip():
            p += self._check_data_outside_run()
        if self.sampling not in ("random", "packed"):
            p.append(f"sampling must be 'random' or 'packed', got {self.sampling!r}")
        if self.zero not in (0, 1) or self.reduce_order not in ("native", "fixed"):
            p.append(f"zero must be 0 or 1 and reduce_order 'native' or 'fixed', got "
                     f"{self.zero!r} and {self.reduce_order!r}")
        if not all(isinstance(k, str) for k in (*self.model, *self.objective_options)):
            p.append("the [model] and [objective_options] keys must be strings")
        try:
            device = backend.normalize_device(self.device)
        except TinyLMError as e:
            return p + [str(e)]
        if self.half and device == "cpu":
            p.append("half = true needs device = 'cuda': on the CPU NumPy's float16 matrix "
                     "products have no BLAS and run many times slower than float32; drop "
                     "--half, or train with --device cuda")
        return p

    def _check_data_outside_run(self) -> list:
        """Data inside the run folder would be the run's own checkpoints."""
        out = os.path.realpath(self.out_dir)
        for path in self.data:
            real = os.path.realpath(split_weight(path)[0])
            if real == out or real.startswith(out.rstrip(os.sep) + os.sep):
                return [f"the data {os.fspath(path)} is inside the run folder {self.out_dir}, "
                        f"where tinylm writes its checkpoints; put the data elsewhere or pick "
                        f"another --out"]
        return []

    # ------------------------------------------------------------------ derived

    @property
    def architecture(self) -> str:
        return self.model.get("architecture") or FAMILY_ALIASES.get(self.family, self.family)

    @property
    def decay_steps(self) -> int:
        return self.max_steps if self.lr_decay_steps is None else self.lr_decay_steps

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    @property
    def save_every(self) -> int:
        return self.eval_every if self.checkpoint_every is None else self.checkpoint_every

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (counted from 0)."""
        return cosine_with_warmup(step, self.lr, self.final_lr,
                                  min(self.warmup_steps, self.decay_steps), self.decay_steps)

    # ------------------------------------------------------------------ files

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"unknown training setting(s) {unknown}; the settings are "
                              f"{', '.join(names)} (model fields go in the [model] table)")
        return cls(**data)

    @classmethod
    def from_toml(cls, path, **overrides) -> "TrainConfig":
        """Read a run's TOML file (top-level settings, ``[model]``, ``[objective_options]``);
        relative data paths are taken from the file's folder."""
        data = read_toml(path)
        base = os.path.dirname(os.path.abspath(path))
        if "data" in data:
            paths = data["data"] if isinstance(data["data"], list) else [data["data"]]
            data["data"] = [p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p))
                            for p in paths]
        data.update(overrides)
        return cls.from_dict(data)

    def for_resume(self, saved: "TrainConfig", explicit: set) -> "TrainConfig":
        """The config of a resumed run: the checkpoint's, with the ``explicit`` settings
        (those given on the command line or in --config) that may change taken from
        self. One that may not change and differs is an error naming it."""
        merged = saved.to_dict()
        # how this launch splits the model, not the run's: a checkpoint is full-model
        merged["tensor_parallel"] = self.tensor_parallel
        clashes = []
        for name in explicit:
            mine, theirs = getattr(self, name), merged.get(name)
            if name == "data":
                mine = [os.path.abspath(p) for p in mine]
            if name in self.RESUMABLE:
                merged[name] = mine
            elif mine != theirs:
                clashes.append(f"{name} = {mine!r} (the checkpoint has {theirs!r})")
        if clashes:
            raise ConfigError(
                f"{self.out_dir} holds a run trained with other settings: "
                f"{'; '.join(sorted(clashes))}; resume without changing them, pick another "
                f"--out, or pass --overwrite to start over")
        return TrainConfig.from_dict(merged)


def read_toml(path) -> dict:
    """A train config: TOML whatever the file's name."""
    from tinylm.config_files import read_config_data

    return read_config_data(path, kind="TOML")


# --------------------------------------------------------------------------- building blocks


def data_cache_dir(config: TrainConfig, files) -> str:
    """The cache folder of these sources: tokenizers trained on them, their token files."""
    root = config.cache_dir or os.path.join(default_cache_dir(), "data")
    return os.path.join(root, fingerprint_key(source_fingerprint(files, config.text_field)))


def data_files(config: TrainConfig) -> list | None:
    """The run's source files (``resolve_sources``), a run folder inside a data folder
    left out (data inside the run folder is refused by the config); None when the data
    are token shards (``tinylm.data_shards``: read as they are, tokenizer included)."""
    if shard_entries(config.data) is not None:
        return None
    return resolve_sources(config.data, exclude=[config.out_dir])


def build_tokenizer(config: TrainConfig, files, special_tokens: list, log=None,
                    objective: str = "the objective"):
    """The run's tokenizer: loaded from a file, or trained on the data (and cached
    beside its token files, so the next run with the same data reuses it); token
    shards (``files`` None): theirs, or the --tokenizer file (checked against them)."""
    from tinylm.tokenizers import from_file

    spec = config.tokenizer
    if files is None or os.path.exists(spec):
        tok = load_shard_tokenizer(config.data, spec) if files is None else from_file(spec)
        missing = [t for t in special_tokens if tok.token_to_id(t) is None]
        if missing:
            raise ConfigError(f"the tokenizer {spec} lacks the special token(s) "
                              f"{', '.join(missing)} that {objective!r} needs; train "
                              f"one with them, or let "
                              f"tinylm train one (--tokenizer char or bpe)")
        return tok
    cls = plugins.get_tokenizer_class(spec, needs=("train",),
                                      purpose="tinylm train --tokenizer NAME")
    vocab = None if spec == "char" else config.vocab_size
    cache = data_cache_dir(config, files)
    path = os.path.join(cache, f"tokenizer-{fingerprint_key(spec, vocab, special_tokens)}.txt")
    if os.path.exists(path):
        try:
            return from_file(path)
        except TinyLMError:
            pass  # a damaged cache entry: train again
    make_dirs(cache, "cache folder")
    if log:
        log(f"training a {spec} tokenizer on the data"
            + (f" (vocab_size {vocab})" if vocab else ""))
    docs = iter_documents(files, config.text_field)  # streamed, not held in memory
    if vocab is None:
        tok = cls.train(docs, special_tokens=special_tokens)
    else:
        tok = cls.train(docs, vocab, special_tokens=special_tokens)
    tok.save(path)
    return tok


def build_model_config(config: TrainConfig, tokenizer, objective):
    """The model config: the family's defaults, made small (SMALL_MODEL), then the
    run's [model] fields; vocab_size from the tokenizer, max_positions = block_size,
    special-token ids the objective needs."""
    arch = plugins.get_architecture(config.architecture)
    fields = {f.name for f in dataclasses.fields(arch.config)}
    data = {k: v for k, v in SMALL_MODEL.items() if k in fields}
    data.update({k: v for k, v in config.model.items() if k != "architecture"})
    if data.get("vocab_size", 0) < tokenizer.vocab_size:
        if "vocab_size" in config.model:
            raise ConfigError(f"[model] vocab_size = {config.model['vocab_size']} is smaller than "
                              f"the tokenizer's {tokenizer.vocab_size} ids")
        data["vocab_size"] = tokenizer.vocab_size
    data.setdefault("max_positions", config.block_size)
    if model_kind(arch.model) == "decoder":
        eot = tokenizer.token_to_id(EOT)
        data.update(eos_token_id=eot, bos_token_id=None)
    data.update({k: v for k, v in objective.config_overrides().items() if k in fields})
    model_config = config_from_dict({"architecture": config.architecture, **data})
    if model_config.positional == "learned" and model_config.max_positions < config.block_size:
        raise ConfigError(f"[model] max_positions = {model_config.max_positions} is below "
                          f"block_size = {config.block_size}; learned positions stop there")
    return model_config


def resolve_objective(config: TrainConfig, model=None):
    """(objective class, its name), checked against the family (or the caller's
    ``model``) before anything is built."""
    arch = config.architecture
    kind = model_kind(plugins.get_architecture(arch).model if model is None else model)
    if model is not None:
        arch = getattr(model.config, "architecture", "this model")
    name = config.objective or DEFAULT_FOR_KIND.get(kind)
    if name is None:
        raise ConfigError(f"family {arch!r} has no default objective; pass --objective")
    cls = plugins.get_objective(name)
    cls.check_kind(kind, arch)
    return cls, name


def tokenizer_and_objective(config: TrainConfig, files, *, tokenizer=None, objective=None,
                            model=None, log=None) -> tuple:
    """(tokenizer, objective, objective name) of a run: those handed in kept, the
    others built from the config (the tokenizer trained on ``files`` if need be)."""
    if objective is not None:
        cls, name = type(objective), objective.name or type(objective).__name__
        options = {k: getattr(objective, k) for k in objective.options}
    else:
        cls, name = resolve_objective(config, model)
        options = config.objective_options
    if tokenizer is None:
        special = cls.special_tokens(config.block_size, **options)
        tokenizer = build_tokenizer(config, files, special, log, name)
    if objective is None:
        objective = cls(tokenizer, **options)
    return tokenizer, objective, name


def model_config_for(config: TrainConfig, log=None):
    """The model config ``tinylm train`` builds for a fresh run of ``config`` (with the
    tokenizer it would build: a char tokenizer's vocabulary comes from the data).
    ``tinylm info RUN.toml`` reports this."""
    tokenizer, objective, _ = tokenizer_and_objective(config, data_files(config), log=log)
    return build_model_config(config, tokenizer, objective)


def check_memory(model_config, config: TrainConfig) -> None:
    """A ConfigError, before anything is allocated, when training ``model_config``
    needs more memory than the machine has available."""
    from tinylm.models.info import available_memory, human_size, parameter_counts
    from tinylm.models.info import training_bytes

    n = parameter_counts(model_config)["total"]
    if backend.normalize_device(config.device) == "cpu":
        need = training_bytes(model_config, config.batch_size, config.block_size)
        what = "to train (weights, gradients, AdamW's state and the activations)"
    else:
        need, what = 4 * n, "for its weights in RAM, where it is built before the GPU"
    have = available_memory()
    if have is not None and need > have:
        raise ConfigError(
            f"the model has {n:,} parameters and needs about {human_size(need)} {what}, but "
            f"this machine has {human_size(have)} available; make it smaller (--n-layer, "
            f"--d-model, --batch-size, --block-size)")


# --------------------------------------------------------------------------- CPU threads

SMALL_MODEL_PARAMETERS = 20_000_000


def auto_threads(model, device: str = "cpu") -> int | None:
    """1 for a small model on the CPU, else None (as configured): small models' matrix
    products gain little from more BLAS threads, which on a busy machine slow down many
    times over (see ``tinylm.threads``)."""
    small = model.num_parameters() < SMALL_MODEL_PARAMETERS
    return 1 if small and backend.normalize_device(device) == "cpu" else None


# --------------------------------------------------------------------------- the metrics hook

EVAL_PREFIX = "eval_"  # an objective's metric measured on the validation data (TRL's prefix)


class MetricsMean:
    """The weighted mean of the metrics an objective reports batch by batch (the
    metrics hook: ``objective.metrics``, a dict {name: float} its ``loss()`` sets).
    Each name is averaged over the batches that reported it, with the weights the
    losses get (a step: each micro-batch's share of the predicted tokens; evaluation:
    the tokens), so accumulating 2 x 4 reports what one batch of 8 would."""

    def __init__(self):
        self.sums, self.weights = {}, {}

    def add(self, metrics, weight: float) -> None:
        for name, value in (metrics or {}).items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value) * weight
            self.weights[name] = self.weights.get(name, 0.0) + weight

    def mean(self) -> dict:
        return {n: self.sums[n] / self.weights[n] if self.weights[n] else self.sums[n]
                for n in self.sums}


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """Runs a TrainConfig: ``fit()`` trains to ``max_steps`` (resuming from
    ``out_dir``'s checkpoint when there is one and ``resume`` allows), evaluating,
    sampling, logging and checkpointing on the way; returns a summary dict.

    The parts are built from the config unless the caller hands them in (fine-tuning
    hands in a pretrained or PEFT-wrapped model): ``model`` (frozen parameters stay
    frozen; a resumed run loads the checkpoint's weights into it), ``tokenizer``,
    ``data`` (a ``TokenData``, a 1-D array of token ids, or the examples of a
    fine-tuning run: ``tinylm.instruct.ExampleData``, batched whole, padded or packed,
    and evaluated in one pass over its validation examples) and ``objective`` (an
    ``Objective``). ``log``: where messages go (default: nowhere); ``progress``: a
    tqdm bar on stderr. ``weights``: what a
    checkpoint's model file holds: "all" of the state dict, or only the "trainable"
    parameters (a PEFT run: the adapters; the caller rebuilds the frozen base before
    resuming, from what it keeps in ``extra_state``, a JSON-ready dict saved with every
    checkpoint's trainer state under "extra"). ``dist``: the ranks of a data-parallel
    run (``tinylm.dist.DataParallel``, or a ``TensorDataParallel`` for tensor_parallel
    > 1; default: every rank this process was launched with, one without mpiexec);
    only rank 0 logs, shows progress and writes files. How ``out_dir`` is opened
    (resume or start over) is said where it is opened: ``setup`` and ``fit``."""

    def __init__(self, config: TrainConfig, *, model=None, tokenizer=None, data=None,
                 objective=None, log=None, progress: bool = False, weights: str = "all",
                 extra_state=None, dist=None):
        if weights not in ("all", "trainable"):
            raise ConfigError(f"weights must be 'all' or 'trainable', got {weights!r}")
        self.dist = dist if dist is not None else parallel_from_config(config)
        if config.tensor_parallel > 1 and not isinstance(self.dist, TensorDataParallel):
            raise ConfigError("tensor_parallel > 1 needs dist= a tinylm.dist.grid."
                              "TensorDataParallel (or leave dist unset)")
        if not self.dist.is_main:
            log, progress = None, False
        self.config = config
        self.model, self.tokenizer, self.data, self.objective = model, tokenizer, data, objective
        self.weights, self.extra_state = weights, extra_state
        self.log = log or (lambda msg: None)
        self.progress = progress
        self.step = 0
        self.step_metrics, self.eval_metrics = {}, {}  # the objective's (the metrics hook)
        self.best_val = None
        self.last_saved_step = None
        self.last_eval_step = None
        self._stop_requested, self._stop_signal = False, None
        self._stop_agreed = False  # (every rank's vote: see _stopping)
        self._ready = False

    @classmethod
    def from_config(cls, config: TrainConfig, **options) -> "Trainer":
        """A Trainer that builds every part from ``config`` (``options``: log,
        progress, dist)."""
        return cls(config, **options)

    # ------------------------------------------------------------------ setup

    def setup(self, run: Run | None = None, *, resume="auto",
              overwrite: bool = False) -> "Trainer":
        """Build everything (and restore the checkpoint) without training. ``run``: the
        run folder, opened (locked, its checkpoint verified) by the caller; None: it is
        opened here, for the time of the setup, as ``resume`` and ``overwrite`` say:
        ``resume`` "auto" (resume if there is a checkpoint), True (there must be one) or
        False (there must be none); ``overwrite``: start over, removing the files a run
        writes (``tinylm.rundir``)."""
        if not self._ready:
            with self._hold(run, resume, overwrite) as run:
                self._setup(run)
        return self

    @contextlib.contextmanager
    def _hold(self, run: Run | None, resume="auto", overwrite: bool = False):
        """The run folder, locked for the ``with`` block (``run``: the caller holds it;
        None: opened here as ``resume`` and ``overwrite`` say, see ``setup``)."""
        if run is not None and (resume != "auto" or overwrite):
            raise ConfigError("resume= and overwrite= are for a run folder the trainer "
                              "opens; pass them to open_run for the run you hand in")
        if self._ready:
            with contextlib.nullcontext() if run is not None else self.dist.lock(
                    self.config.out_dir):
                yield run
            return
        backend.xp_for(self.config.device)  # no GPU: say so before tokenizing anything
        if run is not None:
            yield run
        else:
            with self.dist.open_run(self.config.out_dir, overwrite=overwrite,
                                    resume=resume) as run:
                yield run

    def _setup(self, run: Run) -> None:
        cfg, state = self.config, run.state
        if state is not None:
            self._check_resumable(state)
        self.metrics = self.dist.metrics_log(MetricsLog(os.path.join(run.path, METRICS_FILE)))
        with self.dist.main_first():  # (the others find the tokenizer and data cached)
            model_config = self._build_parts(run)
        self.dist.check_objective(self.objective, self.objective_name)
        if getattr(self.objective, "examples", False) != self.examples:
            raise ConfigError(
                f"objective {self.objective_name!r} trains on instruction examples: use "
                f"`tinylm finetune --data FILE.jsonl`" if self.examples is False else
                f"instruction examples train with objective 'sft', not {self.objective_name!r}")
        self.train_tokens, self.val_tokens = self.data.split(cfg.val_fraction)
        self.window = self.objective.window_length(cfg.block_size)
        self.batcher = self._batcher(self.train_tokens, [cfg.seed, 1], "train")
        if self.has_validation:  # fail now, not at the first evaluation
            self._batcher(self.val_tokens, [cfg.seed, 3], "validation")
        self.objective_rng = np.random.default_rng([cfg.seed, 2])
        backend.seed(cfg.seed)
        if self.model is None:
            self.model = build_model(model_config)
        self.model.to(cfg.device)
        self.objective.check_model(self.model)
        if cfg.tensor_parallel > 1:  # this rank's shards; checkpoints stay full-model
            self.model = self.dist.split_model(self.model)
        self.optimizer = AdamW(param_groups_for_weight_decay(self.model, cfg.weight_decay),
                               lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                               weight_decay=cfg.weight_decay)
        self.scaler = amp.LossScaler(enabled=cfg.half)
        if state is not None:
            self._restore(run)
            self.log(f"resuming from step {self.step} of {run.path}")
        else:
            self.metrics.truncate_after(-1)
        self.optimizer = self.dist.prepare(self.model, self.optimizer)
        if self.dist.size > 1 or cfg.tensor_parallel > 1:
            self.log(self.dist.describe())
        c, n = self.model.config, self.model.num_parameters()
        self.log(f"model: {c.architecture}, {n / 1e6:.2f}M parameters, {c.n_layer} layers x "
                 f"{c.d_model}, vocab {c.vocab_size}; objective {self.objective_name}; "
                 f"device {cfg.device}{self._kernels_note()}")
        self._ready = True

    def _kernels_note(self) -> str:
        """On the CPU, whether the compiled kernels run (a user should know when the
        slower NumPy paths do, and why)."""
        if backend.normalize_device(self.config.device) != "cpu":
            return ""
        from tinylm.kernels import native

        return f" ({native.summary()})"

    def _build_parts(self, run: Run):
        """Tokenizer, objective and data (each unless handed in), and the model config
        when the model is to be built (checked to fit in memory first)."""
        from tinylm.models.config import read_config_file
        from tinylm.tokenizers import from_file

        cfg, state = self.config, run.state
        if self.tokenizer is None and state is not None:
            self.tokenizer = from_file(os.path.join(run.path, TOKENIZER_FILE))
        files = data_files(cfg) if self.tokenizer is None or self.data is None else None
        self.tokenizer, self.objective, self.objective_name = tokenizer_and_objective(
            cfg, files, tokenizer=self.tokenizer, objective=self.objective, model=self.model,
            log=self.log)
        model_config = None
        if self.model is None:
            model_config = (config_from_dict(read_config_file(os.path.join(run.path, CONFIG_FILE)))
                            if state is not None
                            else build_model_config(cfg, self.tokenizer, self.objective))
            check_memory(model_config, cfg)
        if self.data is None and files is None:  # token shards, streamed
            self.data = ShardedTokenData.open(cfg.data, self.tokenizer)
            self.log(f"data: {self.data.describe()}")
        elif self.data is None:
            self.data = TokenData.prepare(files, self.tokenizer, data_cache_dir(cfg, files),
                                          cfg.text_field, eot=EOT)
            self.log(f"data: {len(self.data):,} tokens in "
                     f"{self.data.manifest['n_documents']:,} document(s) from "
                     f"{_describe(files)}{' (cached)' if self.data.reused else ''}")
        elif not isinstance(self.data, (TokenData, ExampleData)):
            self.data = TokenData.from_ids(self.data)
        return model_config

    @property
    def examples(self) -> bool:
        """Whether the run trains on whole examples (fine-tuning) or on token windows."""
        return isinstance(self.data, ExampleData)

    @property
    def has_validation(self) -> bool:
        if self.examples and self.data.validation is not None:
            return True
        return self.config.val_fraction > 0

    def _batcher(self, part, seed, split: str):
        """The sampler of ``part`` of the data: windows of a token stream, or examples."""
        cfg = self.config
        if self.examples:
            return ExampleBatcher(part, cfg.batch_size, self.data.pad_id, seed=seed, split=split)
        return make_batcher(part, self.window, cfg.batch_size, cfg.sampling, seed=seed,
                            split=split)

    def _check_resumable(self, state: dict) -> None:
        saved = TrainConfig.from_dict(state["config"])
        mine = {**self.config.to_dict(), "data": [os.path.abspath(p) for p in self.config.data]}
        differs = [n for n, v in saved.to_dict().items()
                   if n not in TrainConfig.RESUMABLE and v != mine[n]]
        if differs:
            raise ConfigError(f"{self.config.out_dir} holds a run with other settings "
                              f"({', '.join(differs)}); resume with the same ones, or "
                              f"pass --overwrite")

    def _state(self) -> dict:
        return {
            "step": self.step,
            "config": {**self.config.to_dict(),
                       "data": [os.path.abspath(p) for p in self.config.data]},
            "objective": self.objective_name,
            "rng": {"backend": backend.get_rng_state(),
                    "objective": self.objective_rng.bit_generator.state},
            "data": {"position": self.batcher.state_dict(),
                     "tokens_key": os.path.basename(self.data.path)},
            "scaler": self.scaler.state_dict(),
            "best_val_loss": self.best_val,
            "last_eval_step": self.last_eval_step,
            "weights": self.weights,
            **({"extra": self.extra_state} if self.extra_state is not None else {}),
        }

    def _weights(self) -> dict:
        """What the checkpoint's model file holds (``weights``)."""
        if self.weights == "all":
            if isinstance(self.model, TensorParallelDecoder):  # gathered: every rank calls
                return self.model.full_state_dict()
            return self.model.state_dict()
        return {n: p.data for n, p in self.model.named_parameters() if p.requires_grad}

    def _restore(self, run: Run) -> None:
        """Load the checkpoint ``run`` verified: weights, optimizer, positions, RNGs."""
        state = run.state
        weights = checkpoint.load_file(os.path.join(run.path, MODEL_FILE))
        if state.get("weights", "all") != self.weights:
            raise ConfigError(f"{run.path} holds a checkpoint of {state.get('weights', 'all')} "
                              f"the weights, this run saves {self.weights}; resume it the way "
                              f"it was trained, or pass --overwrite")
        if self.weights == "trainable":
            want = {n for n, p in self.model.named_parameters() if p.requires_grad}
            if set(weights) != want:
                raise ConfigError(f"the checkpoint in {run.path} holds other trainable "
                                  f"parameters than this model has (e.g. "
                                  f"{sorted(set(weights) ^ want)[0]}); resume with the same "
                                  f"model and adapter settings, or pass --overwrite")
        self.model.load_state_dict(weights, strict=self.weights == "all")
        arrays = checkpoint.load_file(os.path.join(run.path, OPTIMIZER_FILE))
        optimizer_state = unflatten_state_dict(arrays, state["optimizer"])
        if isinstance(self.model, TensorParallelDecoder):  # a full checkpoint: this rank's part
            optimizer_state = self.model.shard_optimizer_state(self.optimizer, optimizer_state)
        self.optimizer.load_state_dict(optimizer_state)
        self.step = int(state["step"])
        if state["data"].get("tokens_key") != os.path.basename(self.data.path):
            self.log("warning: the data or tokenizer changed since the checkpoint; resuming "
                     "at the same step, but not on the same batches")
        self.batcher.load_state_dict(state["data"]["position"])
        self.objective_rng.bit_generator.state = state["rng"]["objective"]
        backend.set_rng_state(state["rng"]["backend"])
        self.scaler.load_state_dict(state["scaler"])
        self.best_val = state.get("best_val_loss")
        self.last_eval_step = state.get("last_eval_step")
        self.last_saved_step = self.step
        self.metrics.truncate_after(self.step)

    # ------------------------------------------------------------------ one step

    def next_batches(self) -> list:
        """The next optimizer step's micro-batches."""
        return [self.objective.make_batch(self.batcher.next(), self.objective_rng)
                for _ in range(self.config.grad_accum)]

    def train_step(self, batches: list) -> tuple:
        """One optimizer step on ``batches`` (micro-batches whose losses are weighted by
        their share of the predicted tokens); returns (loss, gradient norm).
        Raises TrainingDiverged on a NaN/inf loss or gradient, before any update."""
        cfg, model, opt = self.config, self.model, self.optimizer
        set_lr(opt, cfg.lr_at(self.step))
        self.dist.seed_step(cfg.seed, self.step)
        counts = [max(self.objective.n_targets(b), 1) for b in batches]
        total_count = sum(counts)  # of the global batch: a rank's share weighs count / total
        total = 0.0
        metrics = MetricsMean()
        opt.zero_grad()
        for batch, count in zip(batches, counts):
            if self.dist.size > 1:  # this rank's rows
                batch = self.dist.shard(batch)
                count = self.objective.n_targets(batch)
                if count == 0:
                    continue
            with amp.autocast("float16", enabled=cfg.half):
                loss = self._loss(model, batch)
            value = float(loss.item())
            if not math.isfinite(value):
                raise self._diverged("loss", value)
            weight = count / total_count
            metrics.add(self.objective.metrics, weight)
            if weight != 1.0:
                loss = loss * weight
            self.scaler.scale(loss).backward()
            total += value * weight
        (total,) = self.dist.combine([total], metrics)  # summed over the ranks
        self.step_metrics = metrics.mean()
        params = [p for p in model.parameters() if p.requires_grad]
        self.dist.reduce_gradients(params)
        finite = self.dist.unscale(self.scaler, params)  # (ranks: agreed over them)
        norm = float("nan")
        if finite:
            norm = self.dist.clip_grad_norm(params,
                                            cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            if not math.isfinite(norm):
                if not cfg.half:
                    raise self._diverged("gradient norm", norm)
                finite = False
            else:
                opt.step()
        self.scaler.update(finite)  # (half: an overflowing step is skipped, scale halved)
        opt.zero_grad()
        return total, norm

    def _loss(self, model, batch):
        """The objective's loss on ``batch``; what it puts in ``self.metrics`` during
        the call (the metrics hook) is read by the caller, never left from a previous
        batch."""
        self.objective.metrics = {}
        return self.objective.loss(model, batch)

    def _diverged(self, what: str, value: float) -> TrainingDiverged:
        saved = (f"the last good checkpoint (step {self.last_saved_step}) is in "
                 f"{self.config.out_dir}, untouched" if self.last_saved_step is not None
                 else "no checkpoint had been saved yet")
        self.metrics.append({"step": self.step + 1, "event": "diverged", "what": what,
                             "value": str(value)})
        return TrainingDiverged(
            f"training diverged: the {what} is {value} at step {self.step + 1}; {saved}. "
            f"Lower --lr (it is {self.config.lr_at(self.step):.3g}), raise --warmup-steps, "
            f"or keep --grad-clip on")

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> float:
        """Mean validation loss over ``eval_iters`` batches, the same ones every time
        (fine-tuning examples: over every validation example, once)."""
        cfg = self.config
        if self.examples:  # every validation example once
            rows = in_order(self.val_tokens, cfg.batch_size, self.data.pad_id)
        else:
            batcher = make_batcher(self.val_tokens, self.window, cfg.batch_size, cfg.sampling,
                                   seed=[cfg.seed, 3], split="validation")
            rows = (batcher.next() for _ in range(cfg.eval_iters))
        rng = np.random.default_rng([cfg.seed, 4])
        total = weight = 0.0
        metrics = MetricsMean()
        self.model.eval()
        try:
            with no_grad(), amp.autocast("float16", enabled=cfg.half):
                for row in rows:
                    batch = self.dist.shard(self.objective.make_batch(row, rng))
                    n = self.objective.n_targets(batch)
                    if n == 0 and self.dist.size > 1:
                        continue
                    total += float(self._loss(self.model, batch).item()) * n
                    metrics.add(self.objective.metrics, n)
                    weight += n
        finally:
            self.model.train()
        total, weight = self.dist.combine([total, weight], metrics)  # over the ranks' rows
        self.eval_metrics = metrics.mean()
        return total / max(weight, 1)

    def sample_text(self, n_tokens: int | None = None) -> str | None:
        """A sample from a decoder, from the start of a document, up to the end of the
        text (None for other models). Special tokens are not shown."""
        from tinylm.generate import sample

        n = self.config.sample_tokens if n_tokens is None else n_tokens
        if n <= 0 or model_kind(self.model) != "decoder":
            return None
        if self.examples:  # the first validation (else training) example's prompt
            prompt = self.data.sample_prompt(self.val_tokens if len(self.val_tokens)
                                             else self.train_tokens)
            eot = self.data.formatting.eos_id
        else:
            eot = self.tokenizer.token_to_id(EOT)
            documents = self.data.manifest.get("n_documents", 1)
            prompt = [eot] if eot is not None and documents > 1 else [int(self.train_tokens[0])]
        ids = sample(self.model, prompt, n, temperature=self.config.temperature, top_k=200,
                     eos_id=eot, rng=np.random.default_rng([self.config.seed, 5]))
        return self.tokenizer.decode(prompt + list(ids), skip_special_tokens=True)

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> None:
        """Write a checkpoint (rank 0; every rank takes part in gathering ZeRO's state)."""
        optimizer = self.dist.full_optimizer(self.optimizer)
        weights = self._weights()  # (tensor parallel: gathered from every rank)
        if self.dist.is_main:
            save_checkpoint(self.config.out_dir, self.model, optimizer, self.tokenizer,
                            self._state(), weights=weights)
        self.dist.saved()
        self.last_saved_step = self.step

    # ------------------------------------------------------------------ the loop

    def threads(self) -> int | None:
        """The BLAS thread limit fit() trains under (see ``blas_threads``): the config's,
        else one for a small model on the CPU and every core for a larger one (on the
        compiled kernels' pool of threads where they can own them)."""
        n = self.config.threads
        if n is not None:
            return n or None
        auto = auto_threads(self.model, self.config.device)
        if auto is None and backend.normalize_device(self.config.device) == "cpu":
            return cores()
        return auto

    def fit(self, run: Run | None = None, *, resume="auto", overwrite: bool = False) -> dict:
        """Train to ``max_steps``; ``run``, ``resume``, ``overwrite``: as for ``setup``
        (the folder is held for the whole run; a trainer already set up keeps the run
        it restored)."""
        with self._hold(run, resume, overwrite) as run:
            if not self._ready:
                self._setup(run)
            with blas_threads(self.threads()):
                return self._fit()

    def _fit(self) -> dict:
        cfg = self.config
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                       file=sys.stderr, desc="train", smoothing=0.1)
        say = (lambda msg: bar.write(msg, file=sys.stderr)) if bar is not None else self.log
        previous = self._install_signals()
        self._clock = {"start": time.perf_counter(), "busy": 0.0, "steps": 0, "tokens": 0}
        last_loss, interrupted, val = None, False, None
        try:
            while self.step < cfg.max_steps and not self._stopping():
                t0 = time.perf_counter()
                batches = self.next_batches()
                if self.examples:  # whole examples: count the tokens fed, padding left out
                    self._clock["tokens"] += sum(b["n_tokens"] for b in batches)
                loss, norm = self.train_step(batches)
                self._clock["busy"] += time.perf_counter() - t0
                self._clock["steps"] += 1
                self.step += 1
                last_loss = loss
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    self._log_step(loss, norm, bar)
                if bar is not None:
                    bar.update(1)
                if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                    val = self._evaluate_and_report(say)
                if self.step % cfg.save_every == 0 or self.step == cfg.max_steps:
                    self.save()
            if self._stop_agreed and self.step < cfg.max_steps:
                interrupted = True
                if self.last_saved_step != self.step:
                    self.save()
                say(f"interrupted{self._signal_name()} at step {self.step}: checkpoint saved "
                    f"in {cfg.out_dir}; run the same command again to resume")
        finally:
            if bar is not None:
                bar.close()
            self._restore_signals(previous)
        if not interrupted and self.step >= cfg.max_steps:
            if self.last_eval_step != self.step and self.has_validation:
                val = self._evaluate_and_report(self.log)
            if self.last_saved_step != self.step:
                self.save()
        return {"step": self.step, "train_loss": last_loss, "val_loss": val,
                "best_val_loss": self.best_val, "interrupted": interrupted,
                "signal": self._stop_signal if interrupted else None, "out_dir": cfg.out_dir,
                "elapsed_s": time.perf_counter() - self._clock["start"]}

    def _log_step(self, loss: float, norm: float, bar) -> None:
        """A metrics record (and a line, without a progress bar) for this step."""
        cfg, clock = self.config, self._clock
        tokens = (clock["tokens"] if self.examples
                  else clock["steps"] * cfg.batch_size * cfg.block_size * cfg.grad_accum)
        rate = tokens / max(clock["busy"], 1e-9)
        clock["busy"], clock["steps"], clock["tokens"] = 0.0, 0, 0
        lr = cfg.lr_at(self.step - 1)
        self.metrics.append({"step": self.step, "loss": loss, "lr": lr, "grad_norm": norm,
                             **self.step_metrics, "tokens_per_s": round(rate, 1),
                             "elapsed_s": round(time.perf_counter() - clock["start"], 3)})
        shown = self._shown_metrics(self.step_metrics)
        if bar is not None:
            bar.set_postfix_str(f"loss {loss:.4f}{shown}, {rate:,.0f} tok/s", refresh=False)
        else:
            self.log(f"step {self.step}/{cfg.max_steps}: loss {loss:.4f}{shown}, lr {lr:.3g}, "
                     f"grad norm {norm:.3g}, {rate:,.0f} tokens/s")

    def _shown_metrics(self, values: dict) -> str:
        """", name value" for the objective's metrics worth a place on the progress bar:
        those it lists in ``progress_metrics``, else the first two it reported."""
        names = getattr(self.objective, "progress_metrics", None) or list(values)[:2]
        return "".join(f", {n} {values[n]:.4g}" for n in names if n in values)

    def _evaluate_and_report(self, say) -> float | None:
        if not self.has_validation:
            return None
        val = self.evaluate()
        self.last_eval_step = self.step
        if self.best_val is None or val < self.best_val:
            self.best_val = val
        record, line = {"step": self.step, "val_loss": val}, f"step {self.step}: val loss {val:.4f}"
        if getattr(self.objective, "perplexity", True):  # (a DPO or reward loss has none)
            record["val_ppl"] = ppl = math.exp(min(val, 50.0))
            line += f", perplexity {ppl:.2f}"
        self.metrics.append({**record,
                             **{EVAL_PREFIX + k: v for k, v in self.eval_metrics.items()}})
        say(line + self._shown_metrics(self.eval_metrics))
        text = self.sample_text()
        if text is not None:
            say("-" * 20 + " sample " + "-" * 20 + "\n" + text.strip("\n") + "\n" + "-" * 48)
        return val

    # ------------------------------------------------------------------ Ctrl-C, SIGTERM

    STOP_SIGNALS = ("SIGINT", "SIGTERM")

    def _install_signals(self) -> dict:
        """First Ctrl-C or SIGTERM: finish the step, save, stop. A second one: stop at
        once. Returns the handlers replaced."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested, self._stop_signal = True, signum

        previous = {}
        for name in self.STOP_SIGNALS:
            number = getattr(signal, name, None)
            if number is None:
                continue
            try:
                previous[number] = signal.signal(number, handler)
            except (ValueError, OSError):
                pass
        return previous

    def _restore_signals(self, previous: dict) -> None:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)

    def _signal_name(self) -> str:
        if self._stop_signal is None:
            return ""
        return f" ({signal.Signals(self._stop_signal).name})"

    def _stopping(self) -> bool:
        """Whether to stop before the next step: a stop was requested (on any rank:
        they all stop at the same step)."""
        self._stop_agreed = self.dist.any(self._stop_requested)
        return self._stop_agreed

    def request_stop(self) -> None:
        """Stop after the current step, saving a checkpoint (what Ctrl-C does)."""
        self._stop_requested = True


def _describe(files) -> str:
    if len(files) == 1:
        return files[0]
    return f"{len(files)} files ({files[0]}, ...)"

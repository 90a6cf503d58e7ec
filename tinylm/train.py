"""Training: a run's config, the Trainer loop, and checkpoints that resume exactly.

    config = TrainConfig(out_dir="runs/demo", data=["input.txt"], max_steps=2000)
    result = Trainer(config).fit()          # resumes if runs/demo holds a checkpoint

One optimizer step: ``grad_accum`` micro-batches of ``batch_size`` windows, each turned
into a batch and a loss by the objective (``tinylm.objectives``); the losses are
weighted by how many tokens each predicts (so accumulating 2 x 4 equals one batch of
8), back-propagated, the gradients clipped to ``grad_clip``, and AdamW steps with
nanoGPT's warmup + cosine learning rate. Every ``eval_every`` steps (and at the end)
the validation loss and perplexity are measured on ``eval_iters`` fixed batches, and
a decoder writes a sample. A NaN or infinite loss stops the run with a message; the
last checkpoint, written before it, stays as it was.

A run directory holds::

    config.json             the model config          (tinylm generate --model DIR
    tokenizer.txt           the tokenizer               loads these two and the weights)
    model.safetensors       the weights
    optimizer.safetensors   AdamW's moment estimates
    trainer_state.json      step, RNG states, data position, optimizer hyper-parameters,
                            the run's TrainConfig, and each file's size and SHA-256
    metrics.jsonl           one JSON record per log line / evaluation (appended)

A checkpoint is written as a set: into ``DIR/ckpt.tmp-XXXX/`` first, then renamed to
``DIR/ckpt.new/`` (one atomic rename: the set is now complete), then each file moved
over its old copy, ``trainer_state.json`` last, and ``ckpt.new`` removed. A crash
before the rename leaves the previous checkpoint untouched; a crash after it is
rolled forward the next time the directory is opened. Loading checks every file's
size and SHA-256 against ``trainer_state.json``, so a truncated or damaged file is a
``CheckpointError`` naming it, never silently wrong weights.

Resuming restores the weights, AdamW's state, the step, the data sampler's position,
the objective's and the backend's random generators and the loss scaler: a run
interrupted (even by SIGKILL) and resumed from its last checkpoint continues with
bit-identical losses and ends with bit-identical weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from tinylm import amp, backend, checkpoint, plugins
from tinylm.atomic import write_atomic
from tinylm.autograd import no_grad
from tinylm.config_files import field_type_problems, toml_module
from tinylm.data import Batcher, TokenData, default_cache_dir, fingerprint_key
from tinylm.data import iter_documents, resolve_sources, source_fingerprint
from tinylm.errors import CheckpointError, ConfigError, TinyLMError
from tinylm.models import build_model, config_from_dict
from tinylm.objectives import DEFAULT_FOR_KIND, EOT, model_kind
from tinylm.optim import (
    AdamW, clip_grad_norm_, cosine_with_warmup, flatten_state_dict,
    param_groups_for_weight_decay, set_lr, unflatten_state_dict,
)
from tinylm.threads import blas_threads

# --family takes these short names as well as any registered architecture
FAMILIES = {"gpt": "gpt2", "gpt2": "gpt2", "llama": "llama", "bert": "bert", "t5": "t5"}
# The model a run gets unless it says otherwise: small enough for a laptop CPU. The
# families' own defaults are the published sizes (GPT-2 small, Llama-2 7B ...).
SMALL_MODEL = {"n_layer": 4, "n_head": 4, "d_model": 128, "d_ff": None, "head_dim": None,
               "n_kv_head": None, "dropout": 0.0}

MODEL_FILE, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "optimizer.safetensors", \
    "trainer_state.json"
CONFIG_FILE, TOKENIZER_FILE, METRICS_FILE = "config.json", "tokenizer.txt", "metrics.jsonl"
CHECKPOINT_FILES = (CONFIG_FILE, TOKENIZER_FILE, MODEL_FILE, OPTIMIZER_FILE)  # + STATE_FILE
STATE_VERSION = 1


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

    # fields a resumed run may change; the rest must match the checkpoint's
    RESUMABLE = ("out_dir", "cache_dir", "max_steps", "eval_every", "eval_iters", "log_every",
                 "checkpoint_every", "sample_tokens", "temperature", "device", "threads")

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
        p = []
        for name in ("block_size", "batch_size", "grad_accum", "eval_every", "eval_iters",
                     "log_every"):
            if getattr(self, name) < 1:
                p.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "sample_tokens"):
            if getattr(self, name) < 0:
                p.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 0:
            p.append(f"threads must be >= 0, got {self.threads}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            p.append(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if not self.lr > 0:
            p.append(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.val_fraction < 1:
            p.append(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.sampling not in ("random", "packed"):
            p.append(f"sampling must be 'random' or 'packed', got {self.sampling!r}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            p.append("grad_clip and weight_decay must be >= 0")
        return p

    # ------------------------------------------------------------------ derived

    @property
    def architecture(self) -> str:
        return self.model.get("architecture") or FAMILIES.get(self.family, self.family)

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
    path = os.fspath(path)
    tomllib = toml_module()
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (ValueError, OSError) as e:
        raise ConfigError(f"cannot parse {path}: {e}") from None


# --------------------------------------------------------------------------- building blocks


def data_cache_dir(config: TrainConfig, files) -> str:
    """The cache folder of these sources: tokenizers trained on them, their token files."""
    root = config.cache_dir or os.path.join(default_cache_dir(), "data")
    return os.path.join(root, fingerprint_key(source_fingerprint(files, config.text_field)))


def build_tokenizer(config: TrainConfig, files, special_tokens: list, log=None,
                    objective: str = "the objective"):
    """The run's tokenizer: loaded from a file, or trained on the data (and cached
    beside its token files, so the next run with the same data reuses it)."""
    from tinylm.tokenizers import from_file

    spec = config.tokenizer
    if os.path.exists(spec):
        tok = from_file(spec)
        missing = [t for t in special_tokens if tok.token_to_id(t) is None]
        if missing:
            raise ConfigError(f"the tokenizer {spec} lacks the special token(s) "
                              f"{', '.join(missing)} that {objective!r} needs; train "
                              f"one with them, or let "
                              f"tinylm train one (--tokenizer char or bpe)")
        return tok
    cls = plugins.get_tokenizer_class(spec)
    vocab = None if spec == "char" else config.vocab_size
    cache = data_cache_dir(config, files)
    path = os.path.join(cache, f"tokenizer-{fingerprint_key(spec, vocab, special_tokens)}.txt")
    if os.path.exists(path):
        try:
            return from_file(path)
        except TinyLMError:
            pass  # a damaged cache entry: train again
    if log:
        log(f"training a {spec} tokenizer on the data"
            + (f" (vocab_size {vocab})" if vocab else ""))
    docs = iter_documents(files, config.text_field)  # streamed, not held in memory
    if vocab is None:
        tok = cls.train(docs, special_tokens=special_tokens)
    else:
        tok = cls.train(docs, vocab, special_tokens=special_tokens)
    os.makedirs(cache, exist_ok=True)
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


def resolve_objective(config: TrainConfig):
    """(objective class, its name), checked against the family before anything is built."""
    arch = plugins.get_architecture(config.architecture)
    kind = model_kind(arch.model)
    name = config.objective or DEFAULT_FOR_KIND.get(kind)
    if name is None:
        raise ConfigError(f"family {config.architecture!r} has no default objective; "
                          f"pass --objective")
    cls = plugins.get_objective(name)
    cls.check_kind(kind, config.architecture)
    return cls, name


# --------------------------------------------------------------------------- checkpoints


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def has_checkpoint(out_dir) -> bool:
    recover_checkpoint(out_dir)
    return os.path.exists(os.path.join(out_dir, STATE_FILE))


def recover_checkpoint(out_dir) -> None:
    """Finish a checkpoint whose commit was interrupted (roll ``ckpt.new`` forward) and
    remove temporary folders of saves that never completed."""
    if not os.path.isdir(out_dir):
        return
    new = os.path.join(out_dir, "ckpt.new")
    if os.path.isdir(new):
        if os.path.exists(os.path.join(new, STATE_FILE)):
            _commit(new, out_dir)
        else:  # cannot happen with our saves; never trust a set without its state
            shutil.rmtree(new, ignore_errors=True)
    for name in os.listdir(out_dir):
        if name.startswith("ckpt.tmp-"):
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)


def _commit(new: str, out_dir: str) -> None:
    for name in sorted(os.listdir(new), key=lambda n: n == STATE_FILE):  # state last
        os.replace(os.path.join(new, name), os.path.join(out_dir, name))
    os.rmdir(new)


def save_checkpoint(out_dir, model, optimizer, tokenizer, state: dict) -> None:
    """Write a checkpoint set atomically (see the module docstring); ``state`` is the
    JSON-ready trainer state, completed here with the optimizer's hyper-parameters and
    every file's size and SHA-256."""
    os.makedirs(out_dir, exist_ok=True)
    recover_checkpoint(out_dir)
    tmp = tempfile.mkdtemp(prefix="ckpt.tmp-", dir=out_dir)
    try:
        model.config.save(os.path.join(tmp, CONFIG_FILE))
        tokenizer.save(os.path.join(tmp, TOKENIZER_FILE))
        weights = {k: np.ascontiguousarray(backend.to_numpy(v))
                   for k, v in model.state_dict().items()}
        checkpoint.save_file(weights, os.path.join(tmp, MODEL_FILE), metadata={"format": "np"})
        arrays, meta = flatten_state_dict(optimizer.state_dict())
        checkpoint.save_file(arrays, os.path.join(tmp, OPTIMIZER_FILE))
        files = {}
        for name in CHECKPOINT_FILES:
            path = os.path.join(tmp, name)
            files[name] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
        state = {**state, "optimizer": meta, "files": files, "version": STATE_VERSION}
        write_atomic(os.path.join(tmp, STATE_FILE), json.dumps(state, indent=1) + "\n",
                     error=CheckpointError)
        new = os.path.join(out_dir, "ckpt.new")
        os.replace(tmp, new)  # the set is complete from here on
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _commit(new, out_dir)


def read_checkpoint_state(out_dir, verify: bool = True) -> dict:
    """The trainer state of ``out_dir``'s checkpoint, after checking that every file
    it lists is there with its recorded size and SHA-256."""
    recover_checkpoint(out_dir)
    path = os.path.join(out_dir, STATE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{out_dir} has no checkpoint ({STATE_FILE} is missing)") from None
    except ValueError as e:
        raise CheckpointError(f"checkpoint file {path} is damaged or truncated ({e}); "
                              f"restore it, or start over with --overwrite") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path} is not a tinylm trainer state (version "
                              f"{STATE_VERSION})")
    if verify:
        for name, want in state.get("files", {}).items():
            verify_file(os.path.join(out_dir, name), want)
    return state


def verify_file(path, want: dict) -> None:
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file {path} is missing; restore it, or start "
                              f"over with --overwrite")
    size = os.path.getsize(path)
    if size != want["bytes"]:
        what = "truncated" if size < want["bytes"] else "longer than it was saved"
        raise CheckpointError(f"checkpoint file {path} is {what}: {size} bytes, the "
                              f"checkpoint recorded {want['bytes']}; the save was interrupted "
                              f"or the file damaged: restore it, or start over with --overwrite")
    if _sha256(path) != want["sha256"]:
        raise CheckpointError(f"checkpoint file {path} is damaged: its SHA-256 differs from "
                              f"the one recorded when it was saved; restore it, or start over "
                              f"with --overwrite")


def load_model_dir(path, device: str = "cpu"):
    """(model, tokenizer) of a run directory (or any folder with config.json,
    tokenizer.txt and model.safetensors), checked against its trainer state if any."""
    from tinylm.tokenizers import from_file

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory; pass the --out folder of a "
                              f"`tinylm train` run")
    recover_checkpoint(path)
    if os.path.exists(os.path.join(path, STATE_FILE)):
        state = read_checkpoint_state(path, verify=False)
        for name in (CONFIG_FILE, TOKENIZER_FILE, MODEL_FILE):
            if name in state.get("files", {}):
                verify_file(os.path.join(path, name), state["files"][name])
    for name in (CONFIG_FILE, TOKENIZER_FILE, MODEL_FILE):
        if not os.path.exists(os.path.join(path, name)):
            raise CheckpointError(f"{path} has no {name}; is it the --out folder of a "
                                  f"`tinylm train` run?")
    from tinylm.models.config import read_config_file

    config = config_from_dict(read_config_file(os.path.join(path, CONFIG_FILE)))
    model = build_model(config)
    model.load_state_dict(checkpoint.load_file(os.path.join(path, MODEL_FILE)))
    tokenizer = from_file(os.path.join(path, TOKENIZER_FILE))
    return model.to(device), tokenizer


# --------------------------------------------------------------------------- CPU threads

SMALL_MODEL_PARAMETERS = 20_000_000


def auto_threads(model, device: str = "cpu") -> int | None:
    """1 for a small model on the CPU, else None (as configured): small models' matrix
    products gain little from more BLAS threads, which on a busy machine slow down many
    times over (see ``tinylm.threads``)."""
    small = model.num_parameters() < SMALL_MODEL_PARAMETERS
    return 1 if small and backend.normalize_device(device) == "cpu" else None


# --------------------------------------------------------------------------- metrics


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, appended as training goes."""

    def __init__(self, path):
        self.path = path

    def append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (a resumed run writes them again)."""
        if not os.path.exists(self.path):
            return
        keep = [line for line in read_metrics(self.path, raw=True) if line[0]["step"] <= step]
        checkpoint_text = "".join(text for _, text in keep)
        write_atomic(self.path, checkpoint_text, error=CheckpointError)


def read_metrics(path, raw: bool = False) -> list:
    """The records of a metrics.jsonl (a torn last line, from a kill, is skipped)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "step" in record:
                out.append((record, line) if raw else record)
    return out


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """Runs a TrainConfig: ``fit()`` trains to ``max_steps`` (resuming from
    ``out_dir``'s checkpoint when there is one and ``resume`` allows), evaluating,
    sampling, logging and checkpointing on the way; returns a summary dict.

    ``log``: where messages go (default: nowhere); ``progress``: show a tqdm bar on
    stderr. ``resume``: "auto" (resume if there is a checkpoint), True (there must
    be one) or False (there must be none: pass ``overwrite=True`` to start over)."""

    def __init__(self, config: TrainConfig, *, log=None, progress: bool = False,
                 resume="auto", overwrite: bool = False):
        self.config = config
        self.log = log or (lambda msg: None)
        self.progress = progress
        self.resume, self.overwrite = resume, overwrite
        self.step = 0
        self.best_val = None
        self.last_saved_step = None
        self.last_eval_step = None
        self._stop_requested = False
        self._ready = False

    # ------------------------------------------------------------------ setup

    def setup(self) -> "Trainer":
        if self._ready:
            return self
        cfg, out = self.config, self.config.out_dir
        backend.xp_for(cfg.device)  # no GPU: say so before tokenizing anything
        os.makedirs(out, exist_ok=True)
        self.metrics = MetricsLog(os.path.join(out, METRICS_FILE))
        state = None
        if self.overwrite:
            self._clear(out)
        elif has_checkpoint(out):
            if self.resume is False:
                raise CheckpointError(f"{out} already holds a checkpoint; resume it, pick "
                                      f"another --out, or pass --overwrite to start over")
            state = read_checkpoint_state(out)
            saved = TrainConfig.from_dict(state["config"])
            mine = {**cfg.to_dict(), "data": [os.path.abspath(p) for p in cfg.data]}
            differs = [n for n, v in saved.to_dict().items()
                       if n not in TrainConfig.RESUMABLE and v != mine[n]]
            if differs:
                raise ConfigError(f"{out} holds a run with other settings "
                                  f"({', '.join(differs)}); resume with the same ones, or "
                                  f"pass --overwrite")
        elif self.resume is True:
            raise CheckpointError(f"{out} has no checkpoint to resume")

        objective_cls, self.objective_name = resolve_objective(cfg)
        files = resolve_sources(cfg.data)
        special = objective_cls.special_tokens(cfg.block_size, **cfg.objective_options)
        if state is not None:
            from tinylm.tokenizers import from_file

            self.tokenizer = from_file(os.path.join(out, TOKENIZER_FILE))
        else:
            self.tokenizer = build_tokenizer(cfg, files, special, self.log, self.objective_name)
        self.objective = objective_cls(self.tokenizer, **cfg.objective_options)
        self.data = TokenData.prepare(files, self.tokenizer, data_cache_dir(cfg, files),
                                      cfg.text_field, eot=EOT)
        self.log(f"data: {len(self.data):,} tokens in {self.data.manifest['n_documents']:,} "
                 f"document(s) from {_describe(files)}"
                 f"{' (cached)' if self.data.reused else ''}")
        self.train_tokens, self.val_tokens = self.data.split(cfg.val_fraction)
        self.window = self.objective.window_length(cfg.block_size)
        seed = cfg.seed
        self.batcher = Batcher(self.train_tokens, self.window, cfg.batch_size, cfg.sampling,
                               seed=[seed, 1], split="train")
        if cfg.val_fraction > 0:  # fail now, not at the first evaluation
            Batcher(self.val_tokens, self.window, cfg.batch_size, cfg.sampling, seed=[seed, 3],
                    split="validation")
        self.objective_rng = np.random.default_rng([seed, 2])

        backend.seed(seed)
        if state is not None:
            from tinylm.models.config import read_config_file

            model_config = config_from_dict(read_config_file(os.path.join(out, CONFIG_FILE)))
        else:
            model_config = build_model_config(cfg, self.tokenizer, self.objective)
        self.model = build_model(model_config).to(cfg.device)
        self.objective.check_model(self.model)
        self.optimizer = AdamW(param_groups_for_weight_decay(self.model, cfg.weight_decay),
                               lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                               weight_decay=cfg.weight_decay)
        self.scaler = amp.LossScaler(enabled=cfg.half)
        if state is not None:
            self._restore(state)
            self.log(f"resuming from step {self.step} of {out}")
        else:
            self.metrics.truncate_after(-1)
        n = self.model.num_parameters()
        self.log(f"model: {model_config.architecture}, {n / 1e6:.2f}M parameters, "
                 f"{model_config.n_layer} layers x {model_config.d_model}, vocab "
                 f"{model_config.vocab_size}; objective {self.objective_name}; device {cfg.device}")
        self._ready = True
        return self

    def _clear(self, out) -> None:
        recover_checkpoint(out)
        for name in (*CHECKPOINT_FILES, STATE_FILE, METRICS_FILE):
            path = os.path.join(out, name)
            if os.path.exists(path):
                os.remove(path)

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
        }

    def _restore(self, state: dict) -> None:
        out = self.config.out_dir
        self.model.load_state_dict(checkpoint.load_file(os.path.join(out, MODEL_FILE)))
        arrays = checkpoint.load_file(os.path.join(out, OPTIMIZER_FILE))
        self.optimizer.load_state_dict(unflatten_state_dict(arrays, state["optimizer"]))
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
        counts = [max(self.objective.n_targets(b), 1) for b in batches]
        total_count = sum(counts)
        total = 0.0
        opt.zero_grad()
        for batch, count in zip(batches, counts):
            with amp.autocast("float16", enabled=cfg.half):
                loss = self.objective.loss(model, batch)
            value = float(loss.item())
            if not math.isfinite(value):
                raise self._diverged("loss", value)
            weight = count / total_count
            if weight != 1.0:
                loss = loss * weight
            self.scaler.scale(loss).backward()
            total += value * weight
        params = [p for p in model.parameters() if p.requires_grad]
        finite = self.scaler.unscale(params)
        norm = float("nan")
        if finite:
            norm = clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            if not math.isfinite(norm):
                if not cfg.half:
                    raise self._diverged("gradient norm", norm)
                finite = False
            else:
                opt.step()
        self.scaler.update(finite)  # (half: an overflowing step is skipped, scale halved)
        opt.zero_grad()
        return total, norm

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
        """Mean validation loss over ``eval_iters`` batches, the same ones every time."""
        cfg = self.config
        batcher = Batcher(self.val_tokens, self.window, cfg.batch_size, cfg.sampling,
                          seed=[cfg.seed, 3], split="validation")
        rng = np.random.default_rng([cfg.seed, 4])
        total = weight = 0.0
        self.model.eval()
        try:
            with no_grad(), amp.autocast("float16", enabled=cfg.half):
                for _ in range(cfg.eval_iters):
                    batch = self.objective.make_batch(batcher.next(), rng)
                    n = self.objective.n_targets(batch)
                    total += float(self.objective.loss(self.model, batch).item()) * n
                    weight += n
        finally:
            self.model.train()
        return total / max(weight, 1)

    def sample_text(self, n_tokens: int | None = None) -> str | None:
        """A sample from a decoder, from the start of a document (None otherwise)."""
        from tinylm.generate import sample

        n = self.config.sample_tokens if n_tokens is None else n_tokens
        if n <= 0 or model_kind(self.model) != "decoder":
            return None
        eot = self.tokenizer.token_to_id(EOT)
        prompt = [eot] if self.data.manifest["n_documents"] > 1 else [int(self.train_tokens[0])]
        ids = sample(self.model, prompt, n, temperature=self.config.temperature, top_k=200,
                     rng=np.random.default_rng([self.config.seed, 5]))
        ids = prompt[1:] + ids if prompt == [eot] else prompt + ids
        return self.tokenizer.decode(ids)

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> None:
        save_checkpoint(self.config.out_dir, self.model, self.optimizer, self.tokenizer,
                        self._state())
        self.last_saved_step = self.step

    # ------------------------------------------------------------------ the loop

    def threads(self) -> int | None:
        """The BLAS thread limit fit() trains under (see ``blas_threads``)."""
        n = self.config.threads
        return auto_threads(self.model, self.config.device) if n is None else (n or None)

    def fit(self) -> dict:
        self.setup()
        with blas_threads(self.threads()):
            return self._fit()

    def _fit(self) -> dict:
        cfg = self.config
        tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                       file=sys.stderr, desc="train", smoothing=0.1)
        say = (lambda msg: bar.write(msg, file=sys.stderr)) if bar is not None else self.log
        previous = self._install_sigint()
        start = time.perf_counter()
        busy, steps_log = 0.0, 0  # time spent in training steps since the last log line
        last_loss, interrupted, val = None, False, None
        try:
            while self.step < cfg.max_steps and not self._stop_requested:
                t0 = time.perf_counter()
                loss, norm = self.train_step(self.next_batches())
                busy += time.perf_counter() - t0
                self.step += 1
                steps_log += 1
                last_loss = loss
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    rate = steps_log * tokens_per_step / max(busy, 1e-9)
                    busy, steps_log = 0.0, 0
                    self.metrics.append({"step": self.step, "loss": loss,
                                         "lr": cfg.lr_at(self.step - 1), "grad_norm": norm,
                                         "tokens_per_s": round(rate, 1),
                                         "elapsed_s": round(time.perf_counter() - start, 3)})
                    if bar is not None:
                        bar.set_postfix_str(f"loss {loss:.4f}, {rate:,.0f} tok/s", refresh=False)
                if bar is not None:
                    bar.update(1)
                if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                    val = self._evaluate_and_report(say)
                if self.step % cfg.save_every == 0 or self.step == cfg.max_steps:
                    self.save()
            if self._stop_requested and self.step < cfg.max_steps:
                interrupted = True
                if self.last_saved_step != self.step:
                    self.save()
                say(f"interrupted at step {self.step}: checkpoint saved in {cfg.out_dir}; "
                    f"run the same command again to resume")
        finally:
            if bar is not None:
                bar.close()
            self._restore_sigint(previous)
        if not interrupted and self.step >= cfg.max_steps:
            if self.last_eval_step != self.step and cfg.val_fraction > 0:
                val = self._evaluate_and_report(self.log)
            if self.last_saved_step != self.step:
                self.save()
        return {"step": self.step, "train_loss": last_loss, "val_loss": val,
                "best_val_loss": self.best_val, "interrupted": interrupted,
                "out_dir": cfg.out_dir, "elapsed_s": time.perf_counter() - start}

    def _evaluate_and_report(self, say) -> float | None:
        if self.config.val_fraction <= 0:
            return None
        val = self.evaluate()
        self.last_eval_step = self.step
        if self.best_val is None or val < self.best_val:
            self.best_val = val
        ppl = math.exp(min(val, 50.0))
        self.metrics.append({"step": self.step, "val_loss": val, "val_ppl": ppl})
        say(f"step {self.step}: val loss {val:.4f}, perplexity {ppl:.2f}")
        text = self.sample_text()
        if text is not None:
            say("-" * 20 + " sample " + "-" * 20 + "\n" + text.strip("\n") + "\n" + "-" * 48)
        return val

    # ------------------------------------------------------------------ Ctrl-C

    def _install_sigint(self):
        """First Ctrl-C: finish the step, save, stop. A second one: stop at once."""
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True

        try:
            return signal.signal(signal.SIGINT, handler)
        except ValueError:
            return None

    def _restore_sigint(self, previous) -> None:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)

    def request_stop(self) -> None:
        """Stop after the current step, saving a checkpoint (what Ctrl-C does)."""
        self._stop_requested = True


def _describe(files) -> str:
    if len(files) == 1:
        return files[0]
    return f"{len(files)} files ({files[0]}, ...)"

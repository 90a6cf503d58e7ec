"""Fine-tuning a pretrained model on instruction data: the parts `tinylm finetune` puts
together (the training itself is ``tinylm.train.Trainer``'s, as for `tinylm train`).

    spec = FinetuneSpec("runs/demo", "lora", {"r": 8, "alpha": 16, "target_modules": ["qkv"]})
    model, tokenizer = load_base(spec)                 # any source tinylm.loading reads
    adapt(model, spec)                                 # adapters on, the rest frozen
    fmt = formatting(model, tokenizer, spec, max_length=256)
    data = ExampleData.read(["train.jsonl"], fmt)
    Trainer(config, model=model, tokenizer=tokenizer, data=data, objective=SFT(tokenizer),
            weights=spec.weights, extra_state=spec.record(model)).fit()
    save_outputs(model, tokenizer, spec, config.out_dir, merge=False, template=fmt.template)

``spec.method`` is a registered PEFT method ("lora" ...: the checkpoints hold the
adapters alone, the run's trainer state records the base and the adapter's config so
a resumed run rebuilds base + adapter before loading them) or "full" (every weight
trains; the run folder is a whole model, as `tinylm train` writes). A quantized base
(a GGUF file, a `tinylm quantize` folder) keeps its packed weights unless
``dequantize``: LoRA on it is QLoRA.

At the end the adapter goes into OUT itself in Hugging Face PEFT's files
(adapter_config.json + adapter_model.safetensors, ``peft.save_adapter``, pointing at
the base): `tinylm generate --model BASE --adapter OUT` loads it. ``merge`` writes
OUT/merged too: the base with the adapter folded into its weights, in the base's own
kind of folder (a Hugging Face folder for a Hugging Face base, else tinylm's
config.json + tokenizer.txt + model.safetensors), loadable alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field

import numpy as np

from tinylm import checkpoint
from tinylm.errors import CheckpointError, ConfigError

FULL = "full"
KIND = "finetune"
MERGED_DIR = "merged"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class FinetuneSpec:
    """What a fine-tuning run adapts: ``base`` (a path tinylm.loading reads), ``method``
    (a registered PEFT method or "full") and its ``peft_options`` (the method config's
    fields: r, alpha, dropout, target_modules ...), ``dequantize`` (float32 weights for
    a quantized base), ``chat_template`` (a built-in name or file; None: the base's),
    ``packing`` and ``eval_data`` (files of validation examples);
    ``gradient_checkpointing``: recompute each block in backward instead of keeping its
    activations (``Model.gradient_checkpointing``), None: on for a quantized base
    (QLoRA, where memory is the point, as Hugging Face's ``prepare_model_for_kbit_training``
    does), off otherwise (it costs about one more forward per step). Not part of the
    run's record: it changes memory and time, not one bit of the gradients.
    ``qlora``: a ``tinylm.quant`` scheme (nf4, nf4-dq, int8, q4_0 ...) to quantize a
    float base to after loading it, so that LoRA trains on the packed weights (QLoRA
    without a `tinylm quantize` folder first); ``qlora_embeddings``: how the token
    embedding and a head tied to it are stored then, None: "bf16" for the schemes that
    leave embeddings alone (nf4, nf4-dq, int8), as QLoRA with ``torch_dtype=bfloat16``
    keeps every weight it does not quantize in bfloat16 (float32 on a GPU, whose
    kernels decode no bf16), else the scheme itself; "float32" keeps them float32;
    another scheme name packs them in that one."""

    base: str
    method: str = "lora"
    peft_options: dict = field(default_factory=dict)
    dequantize: bool = False
    chat_template: str | None = None
    packing: bool = False
    eval_data: tuple = ()
    gradient_checkpointing: bool | None = None
    qlora: str | None = None
    qlora_embeddings: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "base", os.path.abspath(os.fspath(self.base)))
        object.__setattr__(self, "eval_data",
                           tuple(os.path.abspath(os.fspath(p)) for p in self.eval_data))
        if self.method == FULL and self.peft_options:
            raise ConfigError(f"a full fine-tune trains every weight: the adapter options "
                              f"{sorted(self.peft_options)} go with --peft")
        if self.qlora is not None:
            self._check_qlora()
        elif self.qlora_embeddings is not None:
            raise ConfigError("--qlora-embeddings goes with --qlora SCHEME; add it or leave "
                              "the option out")

    def _check_qlora(self) -> None:
        from tinylm.quant.model import check_scheme

        object.__setattr__(self, "qlora", check_scheme(self.qlora))
        if self.method == FULL or self.dequantize:
            raise ConfigError(f"--qlora {self.qlora} packs the base's weights, which then "
                              f"cannot train in full nor be dequantized; use it with --peft "
                              f"lora and without --full / --dequantize")
        if self.qlora_embeddings not in (None, "float32"):
            object.__setattr__(self, "qlora_embeddings", check_scheme(self.qlora_embeddings))

    @property
    def embeddings(self):
        """``quantize``'s ``embeddings`` argument for ``qlora`` (see the class docstring)."""
        from tinylm.quant.model import EMBEDDING_SCHEMES

        if self.qlora_embeddings is None:
            return None if self.qlora in EMBEDDING_SCHEMES else "bf16"
        return False if self.qlora_embeddings == "float32" else self.qlora_embeddings

    @property
    def weights(self) -> str:
        """What each checkpoint's model file holds (``Trainer(weights=...)``)."""
        return "all" if self.method == FULL else "trainable"

    def record(self, model=None) -> dict:
        """The JSON-ready record a run keeps with every checkpoint: this spec, with the
        adapter's whole config as the model carries it, and the base's shape."""
        peft = None
        if self.method != FULL and model is not None:
            config = model.peft_config[model.active_adapter]
            peft = json.loads(json.dumps(dataclasses.asdict(config)))
        return {"kind": KIND, "base": self.base, "method": self.method, "peft": peft,
                "peft_options": json.loads(json.dumps(self.peft_options)),
                "dequantize": self.dequantize, "chat_template": self.chat_template,
                "packing": self.packing, "eval_data": list(self.eval_data),
                "qlora": self.qlora, "qlora_embeddings": self.qlora_embeddings,
                "base_shape": base_shape(model) if model is not None else None}


def base_shape(model) -> dict:
    """The base's architecture and sizes: what an adapter must have been trained on."""
    c = model.config
    return {k: getattr(c, k, None) for k in ("architecture", "vocab_size", "d_model",
                                             "n_layer", "n_head", "n_kv_head", "d_ff")}


def check_resume(spec: FinetuneSpec, state: dict, out_dir: str) -> None:
    """A ConfigError unless the checkpoint in ``out_dir`` is a fine-tune of the same
    base with the same method, adapter options and data options."""
    saved = state.get("extra")
    if not isinstance(saved, dict) or saved.get("kind") != KIND:
        raise ConfigError(f"{out_dir} holds a run that is not a fine-tune; pick "
                          f"another --out, or pass --overwrite to start over")
    mine = spec.record()
    names = ("base", "method", "peft_options", "dequantize", "chat_template", "packing",
             "eval_data", "qlora", "qlora_embeddings")
    differs = [f"{n} = {mine[n]!r} (the checkpoint has {saved.get(n)!r})"
               for n in names if mine[n] != saved.get(n)]
    if differs:
        raise ConfigError(f"{out_dir} holds a fine-tune with other settings: "
                          f"{'; '.join(differs)}; resume with the same ones, pick another "
                          f"--out, or pass --overwrite")


# --------------------------------------------------------------------------- the model


def load_base(spec: FinetuneSpec, device: str = "cpu", objective=None):
    """(model, tokenizer) of the base, in training mode; quantized sources stay packed
    unless ``spec.dequantize`` (or a GPU); with ``spec.qlora`` a float base is quantized
    to that scheme on the CPU (then moved to ``device``). ``objective``: the objective
    class whose model kinds the base must be of (default SFT's: decoders)."""
    from tinylm.loading import load_model
    from tinylm.objectives import SFT

    where = "cpu" if spec.qlora else device
    model, tokenizer = load_model(spec.base, where, dequantize=spec.dequantize or None)
    (objective or SFT).check_kind(getattr(model, "kind", None),
                                  getattr(model.config, "architecture", "this model"))
    if spec.qlora:
        from tinylm.quant.model import quantize

        if is_quantized(model):
            raise ConfigError(f"{spec.base} is quantized already; leave out --qlora (LoRA "
                              f"on its packed weights is QLoRA)")
        embeddings = spec.embeddings
        if str(device) != "cpu" and spec.qlora_embeddings is None and embeddings == "bf16":
            embeddings = False  # the GPU kernels decode no bf16 tables: float32 there
        quantize(model, spec.qlora, embeddings=embeddings)
        if str(device) != "cpu":
            model.to(device)
    return model.train(), tokenizer


def is_quantized(model) -> bool:
    """Whether any layer of ``model`` holds packed (quantized) weights."""
    from tinylm.quant.layers import QuantEmbedding, QuantLinear, QuantTiedHead

    return any(isinstance(m, (QuantLinear, QuantEmbedding, QuantTiedHead))
               for m in model.modules())


def adapt(model, spec: FinetuneSpec, seed: int = 0):
    """Make ``model`` trainable as ``spec`` says, in place: adapters on (drawn with
    ``seed``) and the rest frozen, or every weight trainable ("full"). A target
    pattern that matches nothing is peft's error listing the modules there are."""
    from tinylm import backend, peft

    if spec.method == FULL:
        if is_quantized(model):
            raise ConfigError(f"{spec.base} has quantized (packed) weights, which cannot be "
                              f"trained; fine-tune it with --peft lora (QLoRA), or load it "
                              f"with --dequantize for --full")
        return model.requires_grad_(True)
    backend.seed(seed)
    return peft.apply(model, spec.method, **spec.peft_options)


def save_memory(model, spec: FinetuneSpec) -> bool:
    """Set ``model`` up to train in less memory, in place: the loss straight from the
    hidden states in row chunks (``return_logits = False``: the SFT loss never reads the
    (B, T, vocab) logits; same products, same gradients up to rounding), and gradient
    checkpointing as ``spec.gradient_checkpointing`` says (None: on for a quantized
    base). Returns whether checkpointing is on."""
    on = spec.gradient_checkpointing
    on = is_quantized(model) if on is None else on
    if hasattr(model, "gradient_checkpointing"):
        model.gradient_checkpointing(bool(on))
    if hasattr(model, "return_logits"):
        model.return_logits = False
    return bool(on) and hasattr(model, "gradient_checkpointing")


def memory_settings(model) -> tuple:
    """(return_logits, gradient checkpointing) as ``model`` has them now (None: absent)."""
    return (getattr(model, "return_logits", None), getattr(model, "is_gradient_checkpointing", None))


def restore_memory_settings(model, settings: tuple) -> None:
    """Undo ``save_memory``: put back what ``memory_settings`` read."""
    logits, checkpointing = settings
    if logits is not None:
        model.return_logits = logits
    if checkpointing is not None:
        model.gradient_checkpointing(bool(checkpointing))


def attach_adapter(model, path):
    """Put the adapter in ``path`` on ``model`` (a base loaded by tinylm.loading), for
    generation: a Hugging Face PEFT folder (adapter_config.json, what `tinylm
    finetune` writes into its OUT), or a fine-tune run folder whose run stopped before
    writing one (its last checkpoint's adapters). An adapter trained on a base of
    another shape is a CheckpointError saying which."""
    from tinylm import peft
    from tinylm.rundir import MODEL_FILE, STATE_FILE, read_checkpoint_state

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"--adapter {path} is not a folder; give the --out folder of "
                              f"`tinylm finetune` or a PEFT adapter folder")
    state = None
    if os.path.exists(os.path.join(path, STATE_FILE)):
        state = read_checkpoint_state(path)
        extra = state.get("extra") or {}
        if extra.get("kind") != KIND or state.get("weights") != "trainable":
            raise CheckpointError(f"{path} is not a fine-tuned adapter (it is a whole model: "
                                  f"load it with --model {path})")
        _check_base(model, extra, path)
    if os.path.exists(os.path.join(path, ADAPTER_FILES[0])):
        return peft.load_adapter(model, path)
    if state is None:
        raise CheckpointError(f"{path} holds no adapter ({ADAPTER_FILES[0]}); give the --out "
                              f"folder of `tinylm finetune --peft ...`")
    config = dict(extra["peft"])
    method = config.pop("method")
    peft.apply(model, method, **config)
    weights = checkpoint.load_file(os.path.join(path, MODEL_FILE))
    want = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != want:
        raise CheckpointError(f"{path}/{MODEL_FILE} does not hold the adapter its trainer "
                              f"state describes; restore the folder, or fine-tune again")
    model.load_state_dict(weights, strict=False)
    return model


def _check_base(model, extra: dict, path: str) -> None:
    want, have = extra.get("base_shape") or {}, base_shape(model)
    differs = [f"{k} {want[k]} (this model: {have[k]})" for k in want if want[k] != have.get(k)]
    if differs:
        raise CheckpointError(f"{path} is an adapter for another base ({extra.get('base')}: "
                              f"{', '.join(differs)}); load it on that model")


# --------------------------------------------------------------------------- data


def eos_id(model, tokenizer) -> int | None:
    """The id TRL appends to completions: the model's end-of-sequence token (the first
    when the config lists several), else the tokenizer's end-of-text token."""
    from tinylm.generate import END_OF_TEXT

    eos = getattr(model.config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is not None:
        return int(eos)
    for text in END_OF_TEXT:
        i = tokenizer.token_to_id(text)
        if i is not None:
            return int(i)
    return None


def formatting(model, tokenizer, spec: FinetuneSpec, max_length: int, text_field="text",
               log=None):
    """The ``instruct.Formatting`` of a run: the base's chat template (or
    ``spec.chat_template``), its end-of-sequence id, ``max_length`` tokens."""
    from tinylm.instruct import Formatting
    from tinylm.prompts import ChatTemplate

    limit = getattr(model.config, "max_positions", None)
    if limit is not None and max_length > limit:
        raise ConfigError(f"--block-size {max_length} is longer than the model's context "
                          f"({limit} positions); lower it")
    template = ChatTemplate.resolve(spec.chat_template, spec.base, log=log)
    return Formatting(tokenizer, eos_id(model, tokenizer), max_length, template, text_field)


# --------------------------------------------------------------------------- memory


def memory_estimate(model, batch_size: int, seq_len: int) -> dict:
    """Estimated peak bytes of training ``model``: its arrays as they are (packed
    weights at their packed size), a gradient and AdamW's two moment estimates per
    trainable number, and the activations a forward of ``batch_size`` x ``seq_len``
    keeps for backward (``models.info.activation_memory`` of the base; adapters add
    their small low-rank intermediates), as ``save_memory`` left the model: with
    gradient checkpointing one layer's activations plus every layer's input, with the
    chunked loss one chunk of logits instead of all of them."""
    from tinylm.models.info import activation_memory

    seen, weights = set(), 0
    for _, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            weights += p.data.nbytes
    weights += sum(int(b.nbytes) for _, b in model.named_buffers())
    trainable = [p for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad]
    grads = sum(p.data.nbytes for p in trainable)
    acts = _activations(model, activation_memory(model.config, batch_size, seq_len),
                        batch_size * seq_len)
    return {"weights": int(weights), "gradients": int(grads), "optimizer": int(2 * grads),
            "activations": acts, "total": int(weights + 3 * grads + acts)}


def _activations(model, parts: dict, N: int) -> int:
    """The activation bytes of ``parts`` (activation_memory's) under the model's memory
    settings, N = batch x tokens."""
    from tinylm.ops.linear_cross_entropy import rows_per_chunk

    c = model.config
    total = int(parts["total"])
    if getattr(model, "is_gradient_checkpointing", False) and c.n_layer:
        layers = parts.get("attention", 0) + parts.get("feed_forward", 0)
        total += int(-layers + layers / c.n_layer + c.n_layer * N * c.d_model * 4)
    if getattr(model, "return_logits", True) is False and "head" in parts:
        rows = min(N, rows_per_chunk(c.vocab_size, 4))
        # (the whole logits, N V, give way to one chunk of them and of their gradient)
        total += int(-N * c.vocab_size * 4 + 2 * rows * c.vocab_size * 4 + N * c.d_model * 4)
    return max(total, 0)


def describe_memory(estimate: dict) -> str:
    from tinylm.models.info import human_size

    parts = ", ".join(f"{k} {human_size(estimate[k])}"
                      for k in ("weights", "gradients", "optimizer", "activations"))
    return f"peak memory (estimate): {human_size(estimate['total'])} = {parts}"


def check_fits(estimate: dict) -> None:
    """A ConfigError, before training, when the estimate exceeds the free memory."""
    from tinylm.models.info import available_memory, human_size

    have = available_memory()
    if have is not None and estimate["total"] > have:
        raise ConfigError(f"fine-tuning needs about {human_size(estimate['total'])} but this "
                          f"machine has {human_size(have)} available; lower --batch-size or "
                          f"--block-size, or use --peft lora on a quantized model")


# --------------------------------------------------------------------------- outputs


def save_outputs(model, tokenizer, spec: FinetuneSpec, out_dir, *, merge: bool = False,
                 template=None) -> list:
    """Write what a finished run leaves besides its checkpoint: the adapter files in
    ``out_dir`` (a PEFT run), ``out_dir/merged`` with ``merge``, and the chat template
    beside a whole model. Returns the paths written."""
    from tinylm import peft

    out_dir = os.fspath(out_dir)
    written = []
    if spec.method == FULL:
        if template is not None:
            written.append(template.save(out_dir))
        return written
    peft.save_adapter(model, out_dir, base=spec.base)
    written.append(out_dir)
    if merge:
        written.append(write_merged(model, tokenizer, spec, out_dir, template))
    return written


def merged_model(model, spec: FinetuneSpec):
    """A plain model with the active adapter folded into float weights. A quantized
    base is loaded again in float32 and the adapter put on it first (packed weights
    cannot take a merge); ``model`` is left as it was then."""
    from tinylm import peft
    from tinylm.loading import load_model

    if is_quantized(model):
        weights = {k: np.array(v) for k, v in peft.adapter_state_dict(model).items()}
        config = model.peft_config[model.active_adapter]
        model = load_model(spec.base, dequantize=True)[0]
        peft.apply(model, config)
        model.load_state_dict(weights, strict=False)
    return peft.merge_and_unload(model)


def write_merged(model, tokenizer, spec: FinetuneSpec, out_dir, template=None) -> str:
    """``out_dir/merged``: the merged model in the base's kind of folder, written into a
    temporary folder first and renamed into place."""
    from tinylm.loading import source_kind
    from tinylm.rundir import CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE

    from tinylm.atomic import atomic_folder

    merged = merged_model(model, spec)
    target = os.path.join(out_dir, MERGED_DIR)
    with atomic_folder(target) as tmp:
        if source_kind(spec.base) == "hf":
            merged.save_pretrained(tmp)
            tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        else:
            merged.config.save(os.path.join(tmp, CONFIG_FILE))
            tokenizer.save(os.path.join(tmp, TOKENIZER_FILE))
            from tinylm import backend

            state = {k: np.ascontiguousarray(backend.to_numpy(v))
                     for k, v in merged.state_dict().items()}
            checkpoint.save_file(state, os.path.join(tmp, MODEL_FILE),
                                 metadata={"format": "np"})
        if template is not None:
            template.save(tmp)
    return target


def remove_outputs(out_dir) -> None:
    """Remove what ``save_outputs`` writes (for --overwrite): the adapter files, the
    merged folder, the chat template."""
    from tinylm.prompts import CHAT_TEMPLATE_FILE

    for name in (*ADAPTER_FILES, CHAT_TEMPLATE_FILE):
        path = os.path.join(out_dir, name)
        if os.path.isfile(path):
            os.remove(path)
    if os.path.isdir(os.path.join(out_dir, MERGED_DIR)):
        shutil.rmtree(os.path.join(out_dir, MERGED_DIR))



# --------------------------------------------------------------------------- the run


# TrainConfig settings a fine-tune starts from (TRL's SFTConfig where it has one)
DEFAULTS = {"batch_size": 4, "lr": 2e-4, "warmup_steps": 0, "weight_decay": 0.0,
            "eval_every": 100, "log_every": 10, "sample_tokens": 0, "val_fraction": 0.1,
            "objective": "sft"}
FULL_LR = 2e-5  # a full fine-tune's default learning rate (TRL's)


def run(spec: FinetuneSpec, settings: dict, *, epochs: float | None = None,
        overwrite: bool = False, merge: bool = False, log=None, progress: bool = False):
    """Fine-tune as ``spec`` says: ``settings`` are TrainConfig fields given by the user
    (``out_dir`` and ``data`` among them); ``epochs`` sets max_steps from the number of
    training items unless max_steps is given. Resumes a checkpoint in out_dir (same
    spec and settings) unless ``overwrite``. Every input is read and checked before
    anything is written. Returns the Trainer's summary, with "written" (the outputs)."""
    from tinylm.instruct import ExampleData
    from tinylm.objectives import SFT
    from tinylm.rundir import open_run
    from tinylm.train import TrainConfig, Trainer

    log = log or (lambda msg: None)
    with open_run(settings["out_dir"], overwrite=overwrite) as folder:
        if overwrite:
            remove_outputs(folder.path)
        if folder.state is not None:
            check_resume(spec, folder.state, folder.path)
        model, tokenizer = load_base(spec, settings.get("device", "cpu"))
        config = train_config(spec, settings, model)
        adapt(model, spec, seed=config.seed)
        fmt = formatting(model, tokenizer, spec, config.block_size, config.text_field, log)
        data = ExampleData.read(config.data, fmt, eval_files=spec.eval_data,
                                packing=spec.packing, seed=config.seed)
        log(_describe_data(data, config))
        if "max_steps" not in settings:
            config = with_epochs(config, data, 1.0 if epochs is None else epochs)
        if folder.state is not None:
            saved = TrainConfig.from_dict(folder.state["config"])
            config = config.for_resume(saved, set(settings) | {"max_steps"})
        from tinylm import peft

        log(str(peft.trainable_parameters(model)))
        before = memory_settings(model)
        if save_memory(model, spec):
            log("gradient checkpointing: on (each block runs again in backward)")
        estimate = memory_estimate(model, config.batch_size, config.block_size)
        log(describe_memory(estimate))
        check_fits(estimate)
        trainer = Trainer(config, model=model, tokenizer=tokenizer, data=data,
                          objective=SFT(tokenizer), log=log, progress=progress,
                          weights=spec.weights, extra_state=spec.record(model))
        try:
            result = trainer.fit(folder)
        finally:  # the caller's model answers with logits again, as before
            restore_memory_settings(model, before)
        result["written"] = [] if result["interrupted"] else save_outputs(
            trainer.model, tokenizer, spec, folder.path, merge=merge, template=fmt.template)
    return result


def train_config(spec: FinetuneSpec, settings: dict, model):
    """The run's TrainConfig: DEFAULTS, the context (1024 tokens or the model's, if
    shorter), then ``settings``."""
    from tinylm.train import TrainConfig

    context = min(1024, getattr(model.config, "max_positions", None) or 1024)
    data = {**DEFAULTS, "lr": FULL_LR if spec.method == FULL else DEFAULTS["lr"],
            "sampling": "packed" if spec.packing else "random", "block_size": context,
            **settings}
    return TrainConfig.from_dict(data)


def with_epochs(config, data, epochs: float):
    """``config`` with max_steps = the steps ``epochs`` passes over the training items
    take (at least one)."""
    train = data.split(config.val_fraction)[0]
    per_step = config.batch_size * config.grad_accum
    steps = max(int(np.ceil(epochs * len(train) / per_step)), 1)
    values = config.to_dict()
    values["max_steps"] = steps
    if values["warmup_steps"] > steps:
        values["warmup_steps"] = steps
    return type(config).from_dict(values)


# the names the align runs (reward, RL) import them by
_config, _with_epochs = train_config, with_epochs


def _describe_data(data, config) -> str:
    kinds = ", ".join(f"{n} {k}" for k, n in sorted((data.counts or {}).items()))
    line = f"data: {len(data)} examples ({kinds})"
    if data.validation is not None:
        line += f", {len(data.validation)} validation examples"
    if data.n_cut:
        line += (f"; {data.n_cut} cut to --block-size {config.block_size} tokens (their ends "
                 f"are not trained on)")
    return line + ("; packed" if data.packing else "")

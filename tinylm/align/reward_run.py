"""A reward model's run: trained by the Trainer from a base and preference pairs, read
back from its run folder, written as a Hugging Face *ForSequenceClassification folder.

    spec = FinetuneSpec("hf/gpt2", "lora", {"r": 8})          # what tinylm.finetune takes
    result = run(spec, {"out_dir": "runs/rm", "data": ["prefs.jsonl"]}, center=0.01)
    rm = load_reward_model("runs/rm")                          # -> tinylm.align.reward.RewardModel
    export_hf(rm, "runs/rm/hf", spec)                          # transformers loads it

The run folder is the Trainer's (metrics.jsonl, checkpoints that resume bit for bit).
Its checkpoint's model file holds, as for ``tinylm finetune``, every weight (--full:
the decoder's names plus ``score.weight``) or the trainable ones (PEFT: the adapters
plus ``score.weight``, the base rebuilt from the trainer state's record, whose kind is
"reward" and which also keeps the pad id the scored token is found with).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from tinylm import backend, checkpoint
from tinylm.align.reward import KIND, RewardModel, RewardObjective, disable_dropout
from tinylm.atomic import atomic_folder
from tinylm.errors import CheckpointError, ConfigError

HF_DIR = "hf"  # OUT/hf: the Hugging Face export
# TrainConfig settings a reward run starts from (TRL's RewardConfig: lr 1e-4)
DEFAULTS = {"lr": 1e-4, "objective": "reward"}


def pad_id(model, fmt) -> int:
    """The id rows are padded with: the model config's pad token, else the end of
    sequence (TRL: the tokenizer's pad token, else its eos)."""
    pad = getattr(model.config, "pad_token_id", None)
    if pad is None:
        pad = fmt.eos_id
    if pad is None:
        raise ConfigError("the model has neither a pad nor an end-of-sequence token id to pad "
                          "rows with; give its config a pad_token_id or eos_token_id")
    return int(pad)


def record(spec, model, pad: int, center) -> dict:
    """The run record kept with every checkpoint (``Trainer(extra_state=...)``)."""
    return {**spec.record(model), "kind": KIND, "pad_id": pad,
            "center_rewards_coefficient": center}


def check_resume(spec, state: dict, out_dir: str, center) -> None:
    """A ConfigError unless ``out_dir``'s checkpoint is a reward run of the same base,
    method, adapter, data options and centering."""
    from tinylm import finetune

    extra = state.get("extra")
    if not isinstance(extra, dict) or extra.get("kind") != KIND:
        raise ConfigError(f"{out_dir} holds a run that is not a reward model's; pick another "
                          f"--out, or pass --overwrite to start over")
    if extra.get("center_rewards_coefficient") != center:
        raise ConfigError(f"{out_dir} holds a reward run with center_rewards_coefficient = "
                          f"{extra.get('center_rewards_coefficient')!r}, not {center!r}; resume "
                          f"with the same one, pick another --out, or pass --overwrite")
    finetune.check_resume(spec, {**state, "extra": {**extra, "kind": finetune.KIND}}, out_dir)


# --------------------------------------------------------------------------- training


def run(spec, settings: dict, *, epochs: float | None = None, overwrite: bool = False,
        center: float | None = None, export: bool = False, log=None, progress: bool = False):
    """Train a reward model as ``spec`` says (a ``tinylm.finetune.FinetuneSpec``: base,
    PEFT method or "full", chat template, eval data) on the preference files in
    ``settings["data"]`` (TrainConfig fields, out_dir among them). Every record is read
    and checked before anything is written; a checkpoint in out_dir is resumed unless
    ``overwrite``. ``export``: also write OUT/hf. Returns the Trainer's summary with
    "written"."""
    from tinylm import finetune, peft
    from tinylm.align.preferences import PreferenceData
    from tinylm.rundir import open_run
    from tinylm.train import TrainConfig, Trainer

    log = log or (lambda msg: None)
    with open_run(settings["out_dir"], overwrite=overwrite) as folder:
        if overwrite:
            remove_outputs(folder.path)
        if folder.state is not None:
            check_resume(spec, folder.state, folder.path, center)
        base, tokenizer = finetune.load_base(spec, settings.get("device", "cpu"))
        config = finetune._config(spec, base_settings(settings), base)
        finetune.adapt(base, spec, seed=config.seed)
        disable_dropout(base)  # TRL's disable_dropout=True
        fmt = finetune.formatting(base, tokenizer, spec, config.block_size, log=log)
        pad = pad_id(base, fmt)
        data = PreferenceData.read(config.data, fmt, eval_files=spec.eval_data,
                                   seed=config.seed, pad_id=pad)
        log(describe_data(data))
        if "max_steps" not in settings:
            config = finetune._with_epochs(config, data, 1.0 if epochs is None else epochs)
        if folder.state is not None:
            saved = TrainConfig.from_dict(folder.state["config"])
            config = config.for_resume(saved, set(settings) | {"max_steps"})
        backend.seed(config.seed)  # the score head's draw
        model = RewardModel(base, pad_id=pad, tokenizer=tokenizer, template=fmt.template,
                            eos_id=fmt.eos_id)
        log(str(peft.trainable_parameters(model)))
        estimate = finetune.memory_estimate(model, 2 * config.batch_size, config.block_size)
        log(finetune.describe_memory(estimate))
        finetune.check_fits(estimate)
        trainer = Trainer(config, model=model, tokenizer=tokenizer, data=data,
                          objective=RewardObjective(tokenizer, center_rewards_coefficient=center),
                          log=log, progress=progress, weights=spec.weights,
                          extra_state=record(spec, base, pad, center))
        result = trainer.fit(folder)
        written = []
        if not result["interrupted"]:
            if fmt.template is not None:
                written.append(fmt.template.save(folder.path))
            if export:
                written.append(export_hf(model, os.path.join(folder.path, HF_DIR), spec))
        result["written"] = written
    return result


def base_settings(settings: dict) -> dict:
    """``settings`` over the reward run's defaults."""
    return {**DEFAULTS, **settings}


def describe_data(data) -> str:
    kinds = ", ".join(f"{n} {k}" for k, n in sorted((data.counts or {}).items()))
    line = f"data: {len(data)} preference pairs ({kinds})"
    if data.validation is not None:
        line += f", {len(data.validation)} validation pairs"
    return line + ("; with margins" if data.has_margin else "")


def remove_outputs(out_dir) -> None:
    """What a finished run wrote besides its checkpoint (for --overwrite)."""
    from tinylm.finetune import remove_outputs as remove_finetune_outputs

    remove_finetune_outputs(out_dir)
    if os.path.isdir(os.path.join(out_dir, HF_DIR)):
        shutil.rmtree(os.path.join(out_dir, HF_DIR))


# --------------------------------------------------------------------------- reading back


def load_reward_model(path, device: str = "cpu") -> RewardModel:
    """The reward model of a `tinylm align reward` run folder (its last checkpoint),
    in eval mode, with its tokenizer, chat template and pad id: ready to ``rewards()``
    texts or be a reward function."""
    from tinylm import peft
    from tinylm.finetune import _check_base, eos_id
    from tinylm.loading import load_model
    from tinylm.models import build_model, config_from_dict
    from tinylm.models.config import read_config_file
    from tinylm.prompts import ChatTemplate
    from tinylm.rundir import CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE, read_checkpoint_state
    from tinylm.tokenizers import from_file

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a folder; give the --out folder of `tinylm "
                              f"align reward`")
    state = read_checkpoint_state(path)
    extra = state.get("extra") or {}
    if extra.get("kind") != KIND:
        raise CheckpointError(f"{path} is not a reward model's run folder; give the --out "
                              f"folder of `tinylm align reward`")
    weights = checkpoint.load_file(os.path.join(path, MODEL_FILE))
    score = weights.pop("score.weight", None)
    if score is None:
        raise CheckpointError(f"{path}/{MODEL_FILE} has no score.weight; restore the folder, "
                              f"or train the reward model again")
    if state.get("weights") == "trainable":
        base = load_model(extra["base"], dequantize=extra.get("dequantize") or None)[0]
        _check_base(base, extra, path)
        config = dict(extra["peft"])
        peft.apply(base, config.pop("method"), **config)
        want = {n for n, p in base.named_parameters() if p.requires_grad}
        if set(weights) != want:
            raise CheckpointError(f"{path}/{MODEL_FILE} does not hold the adapter its trainer "
                                  f"state describes; restore the folder, or train again")
        base.load_state_dict(weights, strict=False)
    else:
        base = build_model(config_from_dict(read_config_file(os.path.join(path, CONFIG_FILE))))
        base.load_state_dict(weights)
    tokenizer = from_file(os.path.join(path, TOKENIZER_FILE))
    template = ChatTemplate.resolve(None, path) if os.path.exists(
        os.path.join(path, "chat_template.json")) else \
        ChatTemplate.resolve(extra.get("chat_template"), extra.get("base"))
    model = RewardModel(base, pad_id=extra["pad_id"], tokenizer=tokenizer, template=template,
                        eos_id=eos_id(base, tokenizer), score=score)
    return model.to(device).eval()


# --------------------------------------------------------------------------- Hugging Face


SEQUENCE_CLASSIFICATION = {"gpt2": "GPT2ForSequenceClassification",
                           "llama": "LlamaForSequenceClassification"}


def export_hf(model: RewardModel, path, spec=None) -> str:
    """Write ``model`` as a Hugging Face folder that ``transformers``'
    AutoModelForSequenceClassification loads (num_labels 1, pad_token_id the model's
    pad id): the decoder's tensors in transformers' names, adapters folded in, without
    the lm_head (a *ForSequenceClassification has none), plus ``score.weight``.
    Written into a temporary folder, then renamed into place. ``spec``: the run's
    (needed for a quantized base, which is reloaded in float32 to fold adapters in)."""
    from tinylm import peft
    from tinylm.finetune import is_quantized, merged_model

    base = model.base
    arch = getattr(base.config, "architecture", None)
    if arch not in SEQUENCE_CLASSIFICATION:
        raise CheckpointError(f"a {arch} reward model has no Hugging Face sequence-"
                              f"classification class; export gpt2 or llama ones")
    path = os.fspath(path)
    with atomic_folder(path) as tmp:
        adapted = bool(peft.adapter_names(base)) if hasattr(base, "peft_config") else False
        if adapted and is_quantized(base):
            if spec is None:
                raise CheckpointError("exporting a quantized base with adapters needs the run's "
                                      "spec (its base is reloaded in float32)")
            _save_base(merged_model(base, spec), tmp)
        elif adapted:
            peft.merge(base)
            try:
                _save_base(base, tmp)
            finally:
                peft.unmerge(base)
        else:
            _save_base(base, tmp)
        _add_score(model, tmp, SEQUENCE_CLASSIFICATION[arch])
        if model.tokenizer is not None:
            model.tokenizer.save(os.path.join(tmp, "tokenizer.json"))
    return path


def _save_base(base, folder: str) -> None:
    from tinylm.models.hf import save_pretrained

    save_pretrained(base, folder, max_shard_size=2 ** 62)  # one file


def _add_score(model: RewardModel, folder: str, architecture: str) -> None:
    """The base's folder made a *ForSequenceClassification one: lm_head out, score in,
    the config's class, labels and pad id."""
    from tinylm.models.config import write_text_atomic
    from tinylm.models.hf import SINGLE

    file = os.path.join(folder, SINGLE)
    tensors = checkpoint.load_file(file)
    tensors.pop("lm_head.weight", None)
    tensors["score.weight"] = np.ascontiguousarray(
        backend.to_numpy(model.score.weight.data).astype(np.float32))
    checkpoint.save_file(tensors, file, metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        hf = json.load(f)
    hf.update(architectures=[architecture], id2label={"0": "LABEL_0"},
              label2id={"LABEL_0": 0}, pad_token_id=model.pad_id)
    write_text_atomic(os.path.join(folder, "config.json"), json.dumps(hf, indent=2) + "\n")


def load_hf_reward_model(path, device: str = "cpu") -> RewardModel:
    """A reward model from a Hugging Face *ForSequenceClassification folder with one
    label (``export_hf``'s, or TRL's): the decoder by ``tinylm.models.hf``, the score
    weight from its files; the pad id from its config (else its eos). Without an
    lm_head in the files the decoder's is tied to the embedding (unused here)."""
    from tinylm.finetune import eos_id
    from tinylm.loading import hf_tokenizer
    from tinylm.models.hf import _weight_files, load_pretrained

    path = os.fspath(path)
    files = _weight_files(path)
    # a *ForSequenceClassification has no lm_head: tie it (a reward model never uses it)
    untied_ok = any(name.endswith("lm_head.weight") for name in files)
    base = load_pretrained(path, strict=False,
                           overrides=None if untied_ok else {"tie_embeddings": True})
    if "score.weight" not in files:
        raise CheckpointError(f"{path} has no score.weight: it is not a sequence-"
                              f"classification (reward) model")
    score = checkpoint.load_file(files["score.weight"], names=["score.weight"])["score.weight"]
    if score.shape != (1, base.config.d_model):
        raise CheckpointError(f"{path}: score.weight is {tuple(score.shape)}, a reward model's "
                              f"is (1, {base.config.d_model}) (num_labels = 1)")
    try:
        tokenizer = hf_tokenizer(path)
    except CheckpointError:
        tokenizer = None
    eos = eos_id(base, tokenizer) if tokenizer is not None else base.config.eos_token_id
    pad = base.config.pad_token_id if base.config.pad_token_id is not None else eos
    if pad is None:
        raise CheckpointError(f"{path}/config.json has neither pad_token_id nor eos_token_id")
    model = RewardModel(base, pad_id=int(pad), tokenizer=tokenizer, eos_id=eos, score=score)
    return model.to(device).eval()

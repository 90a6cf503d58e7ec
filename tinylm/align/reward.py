"""Reward models: a scalar head on a decoder, trained on preference pairs with the
Bradley-Terry loss, as TRL 1.16's ``RewardTrainer`` trains ``*ForSequenceClassification``.

    rm = RewardModel(decoder, pad_id=eos)          # decoder: any tinylm decoder (PEFT or not)
    r = rm(batch["ids"], last=batch["last"])       # (2B,) rewards, differentiable
    obj = RewardObjective(tokenizer, center_rewards_coefficient=0.01)
    Trainer(config, model=rm, data=read_preferences(...), objective=obj, ...).fit()
    rm = reward_run.load_reward_model("runs/rm")   # a trained one, from its run folder
    rm.rewards(["prompt + reply", ...])            # (n,) float64 rewards (or rows of ids)
    rm(prompts, completions) -> list[float]        # TRL's reward-function signature

The model: the decoder's hidden states (B, T, d) (its final norm applied, its lm_head
not: the vocabulary logits are never computed) at each row's ``last`` token, times a
linear ``score`` (1, d) without bias: Hugging Face's ``score`` weight, read at the
last token whose id is not the pad id (its rule; see ``tinylm.align.preferences``).
The RewardModel shares the decoder's sub-modules as its own (tok_emb, transformer,
lm_head ...) beside ``score``, so its state dict is the decoder's names plus
``score.weight``: a GPT-2 reward model's checkpoint holds what
``GPT2ForSequenceClassification``'s does, in tinylm's names, and
``reward_run.export_hf`` writes that folder (transformers' names, ``architectures`` =
*ForSequenceClassification; ``load_hf_reward_model`` reads one back, TRL's too).

The loss of B pairs with rewards r_c (chosen) and r_r (rejected), TRL's compute_loss:

    loss = mean(-log sigmoid(r_c - r_r - margin))  +  c * mean((r_c + r_r) ** 2)

``margin`` the records' (0 without), c = ``center_rewards_coefficient`` (None: no
term; Eisenstein et al. 2023's reward centering). Metrics, TRL's names and values:
``accuracy`` mean(r_c > r_r), ``margin`` mean(r_c - r_r), ``min_reward``,
``mean_reward``, ``max_reward`` over all 2B rewards; through the Trainer's metrics
hook they go into metrics.jsonl (``eval_`` prefixed for validation).
"""

from __future__ import annotations

import numpy as np

from tinylm import backend
from tinylm.autograd import no_grad
from tinylm.nn import Module, Parameter
from tinylm.objectives import Objective, ObjectiveError
from tinylm.ops import log_sigmoid
from tinylm.tensor import Tensor

KIND = "reward"  # the run record's kind (trainer_state.json "extra")
METRICS = ("accuracy", "margin", "min_reward", "mean_reward", "max_reward")


def last_tokens(ids, pad_id: int):
    """(B,) index of each row's rightmost id that is not ``pad_id`` (0 for a row of
    padding alone): Hugging Face's *ForSequenceClassification pooling. NumPy or CuPy."""
    xp = backend.get_array_module(ids)
    j = xp.arange(ids.shape[1])
    return xp.argmax(j[None, :] * (ids != pad_id), axis=1).astype(xp.int64)


# --------------------------------------------------------------------------- the model


class RewardModel(Module):
    """A scalar head on ``base`` (a decoder). ``pad_id``: the id that pads rows (the
    scored token is the last that is not it); ``tokenizer`` and ``template`` (a
    ``ChatTemplate``): for scoring texts and conversations; ``eos_id``: appended to
    texts as in training (TRL's reward rows end with it)."""

    kind = "decoder"

    def __init__(self, base, *, pad_id: int, tokenizer=None, template=None, eos_id=None,
                 score=None):
        super().__init__()
        if getattr(base, "kind", None) != "decoder":
            raise ObjectiveError(f"a reward model needs a decoder (gpt2, llama ...), got "
                                 f"{type(base).__name__}")
        if base._buffers:
            raise ObjectiveError(f"{type(base).__name__} keeps buffers of its own; a reward "
                                 f"model shares sub-modules and parameters only")
        object.__setattr__(self, "base", base)  # not a child: its children are ours
        for name, child in base._modules.items():
            setattr(self, name, child)
        for name, p in base._parameters.items():
            setattr(self, name, p)
        self.score = _head(base, score)
        self.pad_id, self.tokenizer, self.template = int(pad_id), tokenizer, template
        self.eos_id = eos_id

    @property
    def config(self):
        return self.base.config

    def train(self, mode: bool = True) -> "RewardModel":
        object.__setattr__(self.base, "training", bool(mode))
        return super().train(mode)

    def hidden_states(self, ids, positions=None):
        """(B, T, d) final hidden states of the decoder for ids (B, T)."""
        from tinylm.models.decoder import Decoder

        base = self.base
        if type(base) is Decoder:  # skip the lm_head: (B, T, vocab) logits are not needed
            h, _ = base.transformer(base.tok_emb(base.as_ids(ids)), positions=positions)
            return h
        return base(ids, positions=positions).hidden_states

    def forward(self, ids, last=None, positions=None):
        """ids (B, T) -> rewards (B,): the score of row b's token ``last[b]`` (default:
        its last id that is not ``pad_id``). Right padding needs no attention mask: a
        causal decoder's real tokens never see the padding after them."""
        ids = self.base.as_ids(ids.data if isinstance(ids, Tensor) else ids)  # on its device
        last = last_tokens(ids, self.pad_id) if last is None else last
        h = self.hidden_states(ids, positions)  # (B, T, d)
        xp = h.xp
        picked = h[xp.arange(ids.shape[0]), xp.asarray(last)]  # (B, d)
        return self.score(picked).reshape((ids.shape[0],))  # (B,)

    # ------------------------------------------------------------------ scoring

    def score_ids(self, rows, batch_size: int = 8) -> np.ndarray:
        """(n,) float64 rewards of ``rows`` (lists of ids, any lengths), in eval mode
        without gradients, in right-padded batches of ``batch_size``."""
        rows = [list(map(int, r)) for r in rows]
        if any(not r for r in rows):
            raise ObjectiveError("a row to score has no tokens")
        out = np.zeros(len(rows), dtype=np.float64)
        was = self.training
        self.eval()
        try:
            with no_grad():
                for start in range(0, len(rows), batch_size):
                    part = rows[start:start + batch_size]
                    T = max(len(r) for r in part)
                    ids = np.full((len(part), T), self.pad_id, dtype=np.int64)
                    lengths = np.array([len(r) for r in part])
                    ids[np.arange(T)[None, :] < lengths[:, None]] = np.concatenate(part)
                    r = self(ids).data
                    out[start:start + len(part)] = backend.to_numpy(r).astype(np.float64)
        finally:
            self.train(was)
        return out

    def encode(self, text, completion=None) -> list:
        """The ids a text (or a prompt + completion; a conversation: lists of messages,
        rendered with the template) is scored on, as the training rows were made."""
        if self.tokenizer is None:
            raise ObjectiveError("this reward model has no tokenizer to encode texts with; "
                                 "score token ids with score_ids(), or load it with "
                                 "load_reward_model")
        if isinstance(text, list) or isinstance(completion, list):
            if self.template is None:
                raise ObjectiveError("scoring a conversation needs the reward model's chat "
                                     "template")
            turns = list(text) + (_as_turns(completion) if completion is not None else [])
            return self.tokenizer.encode(self.template.render(turns, add_generation_prompt=False),
                                         allowed_special="all")
        ids = self.tokenizer.encode(text + (completion or ""), allowed_special="all")
        if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids = ids + [int(self.eos_id)]
        return ids

    def rewards(self, items, batch_size: int = 8) -> np.ndarray:
        """(n,) float64 rewards of ``items``: whole texts, conversations (lists of
        messages) or rows of token ids."""
        items = list(items)
        rows = [self.encode(t) for t in items] if _texts(items) else items
        return self.score_ids(rows, batch_size)

    def __call__(self, *args, **kwargs):
        """``rm(ids, last=...)``: the forward (rewards Tensor); ``rm(prompts,
        completions, **record_fields)`` with lists of texts or conversations: a list
        of floats, TRL's reward-function signature (``tinylm align grpo``)."""
        if _texts(args[0] if args else kwargs.get("prompts")):
            prompts = args[0] if args else kwargs.pop("prompts")
            completions = args[1] if len(args) > 1 else kwargs.pop("completions")
            if len(prompts) != len(completions):
                raise ObjectiveError(f"{len(prompts)} prompts but {len(completions)} "
                                     f"completions to score")
            rows = [self.encode(p, c) for p, c in zip(prompts, completions)]
            return self.score_ids(rows).tolist()
        return super().__call__(*args, **kwargs)


def _head(base, score):
    """The ``score`` weight (1, d): ``score`` given (an array), else drawn ~ N(0,
    init_std) from the backend's generator (Hugging Face inits its score that way)."""
    from tinylm.nn import Linear

    c = base.config
    ref = next(iter(base.parameters()))
    head = Linear(c.d_model, 1, bias=False)
    if score is None:
        score = backend.rng(np).normal(0.0, getattr(c, "init_std", 0.02), (1, c.d_model))
    score = np.asarray(backend.to_numpy(score)).reshape(1, c.d_model)
    head.weight = Parameter(backend.to_device(score.astype(ref.data.dtype), ref.device))
    return head


def _texts(x) -> bool:
    """Whether ``x`` is a list of texts or of conversations (not of token ids)."""
    if not isinstance(x, (list, tuple)) or not x:
        return False
    first = x[0]
    return isinstance(first, str) or (isinstance(first, list) and bool(first)
                                      and isinstance(first[0], dict))


def _as_turns(completion) -> list:
    if isinstance(completion, str):
        return [{"role": "assistant", "content": completion}]
    return list(completion)


def disable_dropout(model) -> None:
    """Every dropout of ``model`` off (TRL's ``disable_dropout=True`` default)."""
    from tinylm.nn import Dropout

    for m in model.modules():
        if isinstance(m, Dropout):
            m.p = 0.0


# --------------------------------------------------------------------------- the loss


def bradley_terry(rewards, margin=None, center: float | None = None):
    """TRL's reward loss of rewards (2B,) (chosen rows first): mean over the pairs of
    -log sigmoid(r_c - r_r - margin), plus ``center`` * mean((r_c + r_r)^2)."""
    B = rewards.shape[0] // 2
    chosen, rejected = rewards[:B], rewards[B:]
    diff = chosen - rejected
    if margin is not None:
        diff = diff - rewards.xp.asarray(margin, dtype=rewards.data.dtype)
    loss = -log_sigmoid(diff).mean()
    if center is not None:
        loss = loss + ((chosen + rejected) ** 2).mean() * float(center)
    return loss


def reward_metrics(rewards) -> dict:
    """TRL's reward metrics of rewards (2B,) (chosen rows first), as floats."""
    r = np.asarray(backend.to_numpy(rewards), dtype=np.float64)
    B = len(r) // 2
    chosen, rejected = r[:B], r[B:]
    return {"accuracy": float((chosen > rejected).mean()),
            "margin": float((chosen - rejected).mean()),
            "min_reward": float(r.min()), "mean_reward": float(r.mean()),
            "max_reward": float(r.max())}


class RewardObjective(Objective):
    """Bradley-Terry on preference batches (``tinylm.align.preferences``), for a
    ``RewardModel``. A step's micro-batches are weighted by their pairs; the metrics
    hook gets TRL's reward metrics."""

    name = "reward"
    kinds = ("decoder",)
    examples = True
    options = {"center_rewards_coefficient": None}
    progress_metrics = ("accuracy", "margin")

    def __init__(self, tokenizer=None, **options):
        super().__init__(tokenizer, **options)
        c = self.center_rewards_coefficient
        if c is not None and not (isinstance(c, (int, float)) and np.isfinite(c) and c >= 0):
            raise ObjectiveError(f"center_rewards_coefficient must be a number >= 0, got {c!r}")
        self.metrics = {}

    def check_model(self, model) -> None:
        super().check_model(model)
        if not isinstance(model, RewardModel):
            raise ObjectiveError(f"objective 'reward' trains a RewardModel (a decoder with a "
                                 f"score head), got {type(model).__name__}")

    def make_batch(self, rows, rng) -> dict:
        if not isinstance(rows, dict) or "last" not in rows:
            raise ObjectiveError("objective 'reward' trains on preference pairs: use `tinylm "
                                 "align reward --data prefs.jsonl`")
        return rows

    def n_targets(self, batch: dict) -> int:
        return len(batch["last"]) // 2  # pairs: TRL's loss is a mean over them

    def loss(self, model, batch):
        rewards = model(batch["ids"], last=batch["last"], positions=batch.get("positions"))
        self.metrics = reward_metrics(rewards.data)
        return bradley_terry(rewards, batch.get("margin"), self.center_rewards_coefficient)


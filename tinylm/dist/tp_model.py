"""A decoder split over the ranks of a tensor-parallel group, and back.

    tp = TensorParallelDecoder(model, comm)     # rank r keeps only its shards of model
    out = tp(ids, targets=targets)              # out.loss: vocab-parallel cross-entropy
    tp(ids).logits                              # (B, T, V): gathered, on every rank
    full = tp.full_state_dict()                 # a collective: the whole model's weights

``TensorParallelDecoder`` is a ``Decoder`` (GPT-2, Llama and every config switch
between them) whose embedding, attention, MLP and LM head are the Megatron-LM layers
of ``tinylm.dist.tensor_parallel``; its parameters keep the full model's names and
order, each holding this rank's shard (or the whole, when replicated). So an
optimizer built on it has the full model's state layout, and checkpoints stay
full-model and rank-independent: ``full_state_dict`` and ``full_optimizer_state``
gather the shards (every rank of the group calls them), ``load_state_dict`` and
``load_full_optimizer_state`` take a full checkpoint and keep this rank's part.

Gradient clipping needs the norm of the whole gradient: ``grad_norm_squares``
counts a sharded parameter's squares on every rank (summed over the group) and a
replicated one's once (every rank holds the same gradient).

With dropout, the attention's and MLP's hidden dropout masks are drawn per rank for
its own heads and features, so a dropout run is the same model in distribution, not
in bits, as one process; without dropout the losses equal one process's to float32
rounding (the all-reduces sum in another order).
"""

from __future__ import annotations

import numpy as np

from tinylm.dist.tensor_parallel import (
    ParallelAttention, ParallelMLP, TensorParallelError, VocabParallelEmbedding,
    VocabParallelHead,
)
from tinylm.models.base import ModelOutput
from tinylm.models.decoder import Decoder
from tinylm.nn.layers import Linear, skip_init
from tinylm.nn.mlp import MLP


def check_splittable(model, size: int) -> None:
    """A TensorParallelError saying why ``model`` cannot be split over ``size`` ranks
    (the divisibility of heads and d_ff is checked by the layers themselves)."""
    c = getattr(model, "config", None)
    if not isinstance(model, Decoder):
        raise TensorParallelError(f"tensor parallel splits decoder models (GPT-2, Llama); "
                                  f"{type(model).__name__} is not one: train it without "
                                  f"--tensor-parallel")
    if c.n_experts:
        raise TensorParallelError("tensor parallel does not split mixture-of-experts "
                                  "layers; set n_experts = 0 or train without "
                                  "--tensor-parallel")
    if c.positional == "t5":
        raise TensorParallelError("T5's learned position bias is not split by tensor "
                                  "parallel; use positional learned, rope or alibi")
    for name, m in model.named_modules():
        if "peft" in m._modules:
            raise TensorParallelError("tensor parallel does not split models with PEFT "
                                      "adapters; train the adapters on one rank")
        if name.endswith(("attn.qkv", "attn.out", "mlp.up", "mlp.gate", "mlp.down",
                          "lm_head")) and type(m) is not Linear:
            raise TensorParallelError(f"{name} is a {type(m).__name__}, not a plain Linear "
                                      f"(quantized or with adapters): tensor parallel "
                                      f"splits float weights only")
    if size < 1:
        raise TensorParallelError(f"the tensor-parallel size must be >= 1, got {size}")


class TensorParallelDecoder(Decoder):
    """``model`` (a built ``Decoder``, unchanged) split over the ranks of ``comm``:
    this rank's shards (see the module docstring), on ``model``'s device."""

    def __init__(self, model: Decoder, comm):
        check_splittable(model, comm.size)
        with skip_init():  # full-size placeholders: never written, never drawn
            super().__init__(model.config)
        self.comm = comm
        self.tok_emb = VocabParallelEmbedding(model.tok_emb, comm)
        for mine, full in zip(self.transformer.blocks, model.transformer.blocks):
            mine.attn = ParallelAttention(full.attn, comm)
            mine.mlp = ParallelMLP(full.mlp, comm) if isinstance(full.mlp, MLP) else full.mlp
        self.lm_head = VocabParallelHead(model.lm_head, comm)
        if model.config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.to(model.tok_emb.weight.device)
        self.load_state_dict(model.state_dict())  # the replicated ones (norms, positions)

    # ------------------------------------------------------------------ forward

    def output(self, logits, targets=None, aux=None, **fields) -> ModelOutput:
        """With ``targets``: the loss, from this rank's logit slice (no gathering), and
        ``logits`` None; without: the full logits (B, T, V), gathered on every rank."""
        if targets is None:
            return ModelOutput(logits=self.lm_head.gather(logits), aux_loss=aux, **fields)
        loss = self.lm_head.loss(logits, targets)
        return ModelOutput(logits=None, loss=loss, aux_loss=aux, **fields)

    # ------------------------------------------------------------------ shards

    def splits(self) -> dict:
        """{parameter name: Split} of the sharded parameters (the rest are replicated)."""
        out = {}
        for prefix, m in self.named_modules():
            for name, split in getattr(m, "tp_splits", {}).items():
                if m._parameters.get(name) is not None:
                    out[f"{prefix}.{name}" if prefix else name] = split
        return out  # (a tied lm_head.weight: its own entry, the embedding's split)

    def _split_of_parameter(self) -> dict:
        """{id(Parameter): Split} of the sharded parameters."""
        splits, params = self.splits(), dict(self.named_parameters())
        return {id(params[n]): s for n, s in splits.items() if n in params}

    def shard_state(self, full: dict) -> dict:
        """This rank's part of a full state dict (a checkpoint): sharded entries cut,
        replicated ones as they are."""
        splits, r, T = self.splits(), self.comm.rank, self.comm.size
        return {k: splits[k].shard(v, r, T) if k in splits else v for k, v in full.items()}

    def load_state_dict(self, state: dict, strict: bool = True):
        """Load a FULL model's state dict (as ``Decoder.state_dict`` or a checkpoint
        holds it), keeping this rank's shards."""
        return super().load_state_dict(self.shard_state(state), strict=strict)

    def full_state_dict(self) -> dict:
        """The full model's state dict, the same on every rank (a collective: every
        rank of the group calls it). NumPy or CuPy arrays as the parameters are."""
        splits, done, out = self.splits(), {}, {}
        for name, array in self.state_dict().items():
            if name not in splits:
                out[name] = array.copy()
            elif id(array) in done:  # a tied weight: gathered once
                out[name] = done[id(array)]
            else:
                s = splits[name]
                gathered = self.comm.all_gather(array, axis=s.axis)
                out[name] = done[id(array)] = s.unshard(gathered, self.comm.size)
        return out

    def full_model(self) -> Decoder:
        """A one-process ``Decoder`` with the full weights (a collective)."""
        with skip_init():
            model = Decoder(self.config)
        model.to(self.tok_emb.weight.device)
        model.load_state_dict(self.full_state_dict())
        return model

    def save_pretrained(self, path, **kwargs) -> None:
        """The full model in Hugging Face format (a collective; rank 0 writes)."""
        model = self.full_model()
        if self.comm.rank == 0:
            model.save_pretrained(path, **kwargs)

    # ------------------------------------------------------------------ optimizer state

    def full_optimizer_state(self, optimizer) -> dict:
        """``optimizer.state_dict()`` as the full model's optimizer would hold it: every
        sharded state array (AdamW's moments) gathered (a collective)."""
        state = optimizer.state_dict()
        splits = self._optimizer_splits(optimizer)
        for i, entry in state["state"].items():
            s = splits.get(int(i))
            if s is None:
                continue
            for k, v in entry.items():
                if k != "step":
                    gathered = self.comm.all_gather(np.ascontiguousarray(v), axis=s.axis)
                    entry[k] = s.unshard(gathered, self.comm.size)
        return state

    def shard_optimizer_state(self, optimizer, full: dict) -> dict:
        """This rank's part of a full optimizer state dict (what
        ``full_optimizer_state`` returns), for ``optimizer.load_state_dict``."""
        splits, r, T = self._optimizer_splits(optimizer), self.comm.rank, self.comm.size
        state = {}
        for i, entry in full["state"].items():
            s = splits.get(int(i))
            state[i] = {k: v if k == "step" or s is None else s.shard(v, r, T)
                        for k, v in entry.items()}
        return {**full, "state": state}

    def _optimizer_splits(self, optimizer) -> dict:
        """{parameter index in the optimizer's state dict: Split}."""
        by_id = self._split_of_parameter()
        groups = getattr(optimizer, "full_param_groups", optimizer.param_groups)  # ZeRO-1
        params = [p for g in groups for p in g["params"]]
        return {i: by_id[id(p)] for i, p in enumerate(params) if id(p) in by_id}

    # ------------------------------------------------------------------ gradients

    def grad_norm_squares(self, params) -> float:
        """The sum of squares of the whole model's gradient (every rank gets the same):
        sharded parameters' squares summed over the group, replicated ones once."""
        sharded = self._split_of_parameter()
        parts = np.zeros(2, np.float64)  # (sharded, replicated)
        for p in params:
            if p.grad is None:
                continue
            g = p.grad.ravel()
            g = g.astype(np.result_type(g.dtype, np.float32), copy=False)
            parts[0 if id(p) in sharded else 1] += float(g @ g)
        sharded_total = self.comm.all_reduce(parts[:1])[0] if self.comm.size > 1 else parts[0]
        return float(sharded_total + parts[1])


def clip_grad_norm_tp(model: TensorParallelDecoder, params, max_norm: float) -> float:
    """``tinylm.optim.clip_grad_norm_`` for a tensor-parallel model: the norm of the
    whole model's gradient (``grad_norm_squares``), the same scale on every rank."""
    params = [p for p in params if p.grad is not None]
    total = float(np.sqrt(model.grad_norm_squares(params)))
    coef = max_norm / (total + 1e-6)
    if np.isfinite(total) and coef < 1.0:
        for p in params:
            p.grad = p.grad * coef
    return total

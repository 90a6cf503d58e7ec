"""Activation (gradient) checkpointing: run a block without keeping its activations,
and run it again, with the graph, when backward reaches it.

    y, aux = recompute(block, x, setup)      # as block(x, setup), saving only x

A transformer block keeps for backward every intermediate it computed: the attention
probabilities, the MLP's hidden activations, the norms' statistics (tens of MB per
layer at GPT-2-small size and 4 x 128 tokens). Through ``recompute`` a block keeps
only its input: the forward runs under ``no_grad`` (no graph, nothing saved), and its
backward runs the block forward a second time, now recording, then back-propagates
through that fresh graph at once and lets it go. One block's activations live at a
time, for about one more forward's work (Chen et al. 2016, "Training deep nets with
sublinear memory cost"; torch's ``torch.utils.checkpoint``; Hugging Face's
``gradient_checkpointing_enable()``).

What keeps the second forward identical to the first:

- Dropout draws from the backend's seeded generator (``backend.rng``): its state is
  saved before the first forward, put back for the second and restored afterwards,
  so the masks are the same and the rest of the run draws what it would have drawn
  without checkpointing (a seed still gives the same run, bit for bit).
- Tensors the block reads that carry gradient but are not its parameters (the input,
  and any ``AttentionSetup`` field such as T5's learned position bias or the
  encoder output that cross-attention reads) become inputs of the checkpoint: the
  second forward reads detached copies and their gradients are handed back to the
  outer graph, so the inner backward never walks into it.
- The block's trainable parameters (LoRA, adapters, or every weight) are inputs too,
  so the checkpoint is recorded even when ``x`` needs no gradient (block 0 of a
  frozen model); the inner backward accumulates their ``.grad`` directly, as the
  outer one would have.

Blocks that read a KV cache (decoding; prefix tuning, whose prefixes come through a
cache) are not checkpointed by ``BlockStack``: the cache is state the two forwards
would both write.
"""

from __future__ import annotations

import contextlib
import dataclasses

from tinylm import amp, backend
from tinylm.autograd import enable_grad, is_grad_enabled, no_grad
from tinylm.function import Function
from tinylm.tensor import Tensor


def can_restore_rng(xp) -> bool:
    """Whether the backend's generator state can be saved and put back (NumPy's can)."""
    return hasattr(backend.rng(xp), "bit_generator") and hasattr(
        backend.rng(xp).bit_generator, "state")


@contextlib.contextmanager
def _rng_at(xp, state):
    """Inside: the generator at ``state``; after: where it was before entering."""
    bits = backend.rng(xp).bit_generator
    now = bits.state
    bits.state = state
    try:
        yield
    finally:
        bits.state = now


def _autocast_as(dtype):
    """Inside: autocast to ``dtype`` (None: off), whatever is in force outside."""
    return amp.autocast(dtype if dtype is not None else "float16", enabled=dtype is not None)


class Recompute(Function):
    """The checkpoint as one graph node: inputs (x, *setup tensors, *params), outputs
    y (and the MoE aux loss when the block returns one). ``run(x, setup)`` is the
    block; ``setup_fields`` names the setup fields that arrive as inputs."""

    def forward(self, xp, x, *rest):
        self.x, self.fields = x, rest[:len(self.setup_fields)]
        self.rng_state = backend.rng(xp).bit_generator.state
        self.compute_dtype = amp.compute_dtype()  # the re-run autocasts as this one did
        with no_grad():
            y, aux = self.run(Tensor(x), self._setup(self.fields, lambda a: Tensor(a)))
        self.has_aux = aux is not None
        return (y.data, aux.data) if self.has_aux else y.data

    def _setup(self, arrays, as_tensor):
        changes = {f: as_tensor(a) for f, a in zip(self.setup_fields, arrays)}
        return dataclasses.replace(self.setup, **changes) if changes else self.setup

    def backward(self, xp, *grads):
        need = self.needs_input_grad
        x = Tensor(self.x, requires_grad=need[0])
        leaves = [Tensor(a, requires_grad=n) for a, n in zip(self.fields, need[1:])]
        it = iter(leaves)
        with _rng_at(xp, self.rng_state), _autocast_as(self.compute_dtype), enable_grad():
            y, aux = self.run(x, self._setup(self.fields, lambda a: next(it)))
            root = y if not self.has_aux else (y * Tensor(grads[0])).sum() + (
                aux * Tensor(grads[1])).sum()
        if root.requires_grad:  # False: nothing inside needs a gradient
            root.backward(grads[0] if not self.has_aux else None)
        n_params = len(need) - 1 - len(leaves)
        return (x.grad, *(t.grad for t in leaves)) + (None,) * n_params


def recompute(block, x, setup):
    """``block(x, setup)`` -> (y, aux) through a checkpoint (see the module doc); the
    plain call when no graph is being recorded or the backend's generator state
    cannot be put back."""
    if not is_grad_enabled() or not can_restore_rng(x.xp):
        return block(x, setup)
    fields = [f.name for f in dataclasses.fields(setup)
              if isinstance(getattr(setup, f.name), Tensor)
              and getattr(setup, f.name).requires_grad]
    params = [p for p in block.parameters() if p.requires_grad]
    out = Recompute.apply(x, *(getattr(setup, f) for f in fields), *params,
                          run=block, setup=setup, setup_fields=fields)
    return out if isinstance(out, tuple) else (out, None)

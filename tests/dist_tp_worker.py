"""What tests/test_dist_tp.py runs on every rank under ``mpiexec -n 2``.

    mpiexec -n 2 python tests/dist_tp_worker.py OUT.json

Each rank builds the same small models (one seed), runs them whole and split over
the two ranks (TensorParallelDecoder), and rank 0 writes the largest differences
(logits, loss, every parameter's gradient gathered back, the gathered weights and
optimizer state against the originals) to OUT.json; the test judges them.
"""

import json
import sys

import numpy as np

from tinylm import backend, dist
from tinylm.dist.tp_model import TensorParallelDecoder, clip_grad_norm_tp
from tinylm.models import build_model, config_from_dict
from tinylm.optim import AdamW, clip_grad_norm_, param_groups_for_weight_decay

CASES = {
    # GPT-2: learned positions, biases, tied head; 33 ids: the vocabulary is padded
    "gpt2": dict(architecture="gpt2", vocab_size=33, d_model=16, n_layer=2, n_head=4),
    # Llama: RoPE, SwiGLU, GQA (4 q heads over 2 kv heads), an untied head
    "llama-gqa": dict(architecture="llama", vocab_size=40, d_model=16, n_layer=2, n_head=4,
                      n_kv_head=2, d_ff=24),
    # ALiBi (per-head slopes), a left-padded batch
    "alibi": dict(architecture="gpt2", vocab_size=31, d_model=16, n_layer=1, n_head=4,
                  positional="alibi"),
}


def gathered_grads(tp, comm) -> dict:
    splits, out = tp.splits(), {}
    for name, p in tp.named_parameters():
        g = p.grad
        if name in splits:
            g = splits[name].unshard(comm.all_gather(g, axis=splits[name].axis), comm.size)
        out[name] = g
    return out


def case(name: str, fields: dict, comm) -> dict:
    backend.seed(7)
    model = build_model(config_from_dict(dict(max_positions=16, **fields)))
    rng = np.random.default_rng(1)
    V = model.config.vocab_size
    ids, targets = rng.integers(0, V, (3, 9)), rng.integers(0, V, (3, 9))
    targets[0, :3] = -100
    mask = np.ones((3, 9), np.int64)
    mask[1, :4] = 0  # left padding
    tp = TensorParallelDecoder(model, comm)  # before the reference runs: model is unchanged

    ref_logits = model(ids, attention_mask=mask).logits.data
    ref = model(ids, targets=targets, attention_mask=mask).loss
    ref.backward()
    logits = tp(ids, attention_mask=mask).logits.data
    loss = tp(ids, targets=targets, attention_mask=mask).loss
    loss.backward()
    grads, want = gathered_grads(tp, comm), dict(model.named_parameters())
    grad_error = max(float(np.abs(grads[n] - want[n].grad).max()) for n in want)
    full, before = tp.full_state_dict(), model.state_dict()
    weights_equal = sorted(full) == sorted(before) and all(
        np.array_equal(full[k], v) for k, v in before.items())

    # one AdamW step on each, clipped; the gathered optimizer state equals one process's
    opt_ref = AdamW(param_groups_for_weight_decay(model, 0.1), lr=1e-2)
    opt_tp = AdamW(param_groups_for_weight_decay(tp, 0.1), lr=1e-2)
    norm_ref = clip_grad_norm_(list(model.parameters()), 0.05)
    norm_tp = clip_grad_norm_tp(tp, list(tp.parameters()), 0.05)
    opt_ref.step()
    opt_tp.step()
    state_ref, state_tp = opt_ref.state_dict(), tp.full_optimizer_state(opt_tp)
    moments = max(float(np.abs(state_ref["state"][i][k] - state_tp["state"][i][k]).max())
                  for i in state_ref["state"] for k in ("exp_avg", "exp_avg_sq")
                  if k in state_ref["state"][i])
    stepped = tp.full_state_dict()
    # sharding the gathered state back gives this rank's optimizer its own state again
    back = tp.shard_optimizer_state(opt_tp, state_tp)
    same_back = all(np.array_equal(back["state"][i][k], opt_tp.state_dict()["state"][i][k])
                    for i in back["state"] for k in back["state"][i] if k != "step")
    return {
        "logits_shape": list(logits.shape), "ref_shape": list(ref_logits.shape),
        "logits": float(np.abs(logits - ref_logits).max()),
        "loss": abs(float(loss.item()) - float(ref.item())),
        "grads": grad_error, "weights_equal": weights_equal,
        "norm": abs(norm_tp - norm_ref) / norm_ref,
        "moments": moments,
        "stepped": max(float(np.abs(stepped[k] - v).max())
                       for k, v in model.state_dict().items()),
        "optimizer_round_trip": same_back,
        "local_params": tp.num_parameters(), "full_params": model.num_parameters(),
    }


def main(out_path: str) -> None:
    comm = dist.world()
    results = {name: case(name, fields, comm) for name, fields in CASES.items()}
    if comm.rank == 0:
        with open(out_path, "w") as f:
            json.dump({"size": comm.size, **results}, f)


if __name__ == "__main__":
    main(sys.argv[1])

"""nanoGPT's char-level Shakespeare CPU recipe: tinylm's loss at step 2000 and its speed
against the same model in torch, in one run.

    .venv/bin/python bench/train_shakespeare.py                    # the full benchmark
    .venv/bin/python bench/train_shakespeare.py --steps 200 --no-torch-train   # quick look

The recipe (karpathy/nanoGPT README, "I only have a macbook"): characters of
tinyshakespeare, first 90% train / last 10% val, 4 layers, 4 heads, n_embd 128, block
64, batch 12, dropout 0, no biases, AdamW lr 1e-3 -> 1e-4 (warmup 100, cosine over
2000 steps), betas (0.9, 0.99), weight decay 0.1 on matrices and embeddings, grad
clip 1.0; validation loss at step 2000 (nanoGPT with torch 2.13 reaches 1.886 on this
machine; the target is <= 1.89). tinylm trains through ``tinylm.train.Trainer`` with
``examples/shakespeare_char.toml``.

Four phases:

1. parity + timing: a torch twin of the model (the same weights, copied by name) and
   tinylm take the same batches; their first losses must agree (float32 tolerance);
   then ``--timing-steps`` steps of each, interleaved (one tinylm step, one torch step,
   alternating which goes first), for each ``--threads`` count (numpy's BLAS through
   tinylm.threads.blas_threads, torch.set_num_threads): median ms/step and the ratio.
2. tinylm trains the recipe for ``--steps`` steps (validation every 250 steps on
   ``--eval-iters`` fixed batches).
   Extra ``--seeds`` train again with other seeds. Each run's final model is also
   evaluated on the whole validation split (every token once: no sampling noise).
3. (--torch-train) torch trains the same recipe on the same batches, evaluated on the
   same validation batches: the reference curve on this machine.
4. (--nanogpt-replay) nanoGPT's own run, step for step: torch.manual_seed(1337), its
   model.py's initial weights, its torch.randint batches and estimate_loss's 20 val
   batches every 250 steps; nanoGPT's model and tinylm (same initial weights, same
   batches) train in lockstep. nanoGPT's number (1.886) is this run's last estimate.

Writes bench/results/train_shakespeare.json and the loss-curve PNG (matplotlib).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tinylm.threads import blas_threads  # noqa: E402
from tinylm.train import TrainConfig, Trainer, read_metrics  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
RESULTS = ROOT / "bench" / "results"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--eval-iters", type=int, default=200)
    p.add_argument("--timing-steps", type=int, default=30)
    p.add_argument("--threads", default="1", help="comma-separated thread counts to time")
    p.add_argument("--nanogpt-replay", action=argparse.BooleanOptionalAction, default=True,
                   help="also replay nanoGPT's own run (its seed, init and batches)")
    p.add_argument("--seeds", default="1337",
                   help="comma-separated seeds to train tinylm with (torch: the first)")
    p.add_argument("--torch-train", action=argparse.BooleanOptionalAction, default=True,
                   help="also train the torch twin on the same batches (reference curve)")
    p.add_argument("--train-threads", type=int, default=1,
                   help="BLAS / torch threads while training")
    p.add_argument("--out", default=str(RESULTS / "train_shakespeare.json"))
    p.add_argument("--png", default=str(RESULTS / "train_shakespeare.png"))
    return p.parse_args(argv)


def recipe(data: str, out_dir: str, steps: int, eval_iters: int, threads: int) -> TrainConfig:
    return TrainConfig.from_toml(ROOT / "examples" / "shakespeare_char.toml", out_dir=out_dir,
                                 data=[data], cache_dir=os.path.join(out_dir, "cache"),
                                 max_steps=steps, eval_iters=eval_iters, threads=threads,
                                 sample_tokens=0)


# --------------------------------------------------------------------------- torch twin


def torch_twin(model):
    """nanoGPT's GPT (bias=False, exact GELU, tied head) with tinylm's parameter names,
    holding a copy of ``model``'s weights."""
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F

    c = model.config

    class Attention(tnn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = tnn.Linear(c.d_model, 3 * c.d_model, bias=False)
            self.out = tnn.Linear(c.d_model, c.d_model, bias=False)

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = self.qkv(x).split(C, dim=2)
            heads = lambda t: t.view(B, T, c.n_head, C // c.n_head).transpose(1, 2)  # noqa
            y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
            return self.out(y.transpose(1, 2).contiguous().view(B, T, C))  # (B, T, C)

    class MLP(tnn.Module):
        def __init__(self):
            super().__init__()
            self.up = tnn.Linear(c.d_model, 4 * c.d_model, bias=False)
            self.down = tnn.Linear(4 * c.d_model, c.d_model, bias=False)

        def forward(self, x):
            return self.down(F.gelu(self.up(x)))

    class Block(tnn.Module):
        def __init__(self):
            super().__init__()
            self.norm1 = tnn.LayerNorm(c.d_model, bias=False)
            self.attn = Attention()
            self.norm2 = tnn.LayerNorm(c.d_model, bias=False)
            self.mlp = MLP()

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class Stack(tnn.Module):
        def __init__(self):
            super().__init__()
            self.pos = tnn.Embedding(c.max_positions, c.d_model)
            self.blocks = tnn.ModuleList(Block() for _ in range(c.n_layer))
            self.norm = tnn.LayerNorm(c.d_model, bias=False)

    class GPT(tnn.Module):
        def __init__(self):
            super().__init__()
            self.tok_emb = tnn.Embedding(c.vocab_size, c.d_model)
            self.transformer = Stack()
            self.lm_head = tnn.Linear(c.d_model, c.vocab_size, bias=False)
            self.lm_head.weight = self.tok_emb.weight  # tied, as nanoGPT

        def forward(self, ids, targets):
            T = ids.shape[1]
            x = self.tok_emb(ids) + self.transformer.pos(torch.arange(T))
            for block in self.transformer.blocks:
                x = block(x)
            logits = self.lm_head(self.transformer.norm(x))
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    twin = GPT()
    state = {k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()}
    missing = twin.load_state_dict(state, strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    return twin


def torch_optimizer(twin, cfg: TrainConfig):
    import torch

    params = [p for p in twin.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def torch_step(twin, opt, batch, lr, clip):
    import torch

    for g in opt.param_groups:
        g["lr"] = lr
    ids = torch.from_numpy(batch["ids"])
    targets = torch.from_numpy(batch["targets"])
    loss = twin(ids, targets)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(twin.parameters(), clip)
    opt.step()
    return loss.item()


def torch_eval(twin, batches):
    import torch

    with torch.no_grad():
        return float(np.mean([twin(torch.from_numpy(b["ids"]),
                                   torch.from_numpy(b["targets"])).item() for b in batches]))


def eval_batches(trainer, n):
    """The batches Trainer.evaluate uses (same seeds), for the torch twin."""
    from tinylm.data import Batcher

    cfg = trainer.config
    batcher = Batcher(trainer.val_tokens, trainer.window, cfg.batch_size, cfg.sampling,
                      seed=[cfg.seed, 3], split="validation")
    rng = np.random.default_rng([cfg.seed, 4])
    return [trainer.objective.make_batch(batcher.next(), rng) for _ in range(n)]


def full_split_batches(trainer):
    """The whole validation split as back-to-back windows (every token predicted once),
    batch_size windows at a time: a val loss with no sampling noise."""
    cfg, val, T = trainer.config, np.asarray(trainer.val_tokens, dtype=np.int64), \
        trainer.config.block_size
    n = (len(val) - 1) // T
    starts = np.arange(n) * T
    windows = val[starts[:, None] + np.arange(T + 1)]  # (n, T + 1)
    return [trainer.objective.make_batch(windows[i:i + cfg.batch_size], None)
            for i in range(0, n, cfg.batch_size)]


def tinylm_eval(trainer, batches):
    """Token-weighted mean loss of the tinylm model on ``batches``."""
    from tinylm.autograd import no_grad

    total = count = 0.0
    trainer.model.eval()
    with no_grad():
        for b in batches:
            n = b["targets"].size
            total += float(trainer.objective.loss(trainer.model, b).item()) * n
            count += n
    trainer.model.train()
    return total / count


def torch_eval_weighted(twin, batches):
    import torch

    total = count = 0.0
    with torch.no_grad():
        for b in batches:
            n = b["targets"].size
            total += twin(torch.from_numpy(b["ids"]), torch.from_numpy(b["targets"])).item() * n
            count += n
    return total / count


# --------------------------------------------------------------------------- nanoGPT replay


def nanogpt_model(vocab_size, block_size, n_layer, n_head, n_embd):
    """karpathy/nanoGPT's model.py GPT (bias=False, dropout 0), module for module in its
    order, so that after torch.manual_seed(1337) it draws the same initial weights."""
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F

    class LayerNorm(tnn.Module):
        def __init__(self, ndim):
            super().__init__()
            self.weight = tnn.Parameter(torch.ones(ndim))

        def forward(self, x):
            return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)

    class CausalSelfAttention(tnn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = tnn.Linear(n_embd, 3 * n_embd, bias=False)
            self.c_proj = tnn.Linear(n_embd, n_embd, bias=False)

        def forward(self, x):
            B, T, C = x.size()
            q, k, v = self.c_attn(x).split(n_embd, dim=2)
            k = k.view(B, T, n_head, C // n_head).transpose(1, 2)
            q = q.view(B, T, n_head, C // n_head).transpose(1, 2)
            v = v.view(B, T, n_head, C // n_head).transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0,
                                               is_causal=True)
            return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))

    class MLP(tnn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = tnn.Linear(n_embd, 4 * n_embd, bias=False)
            self.gelu = tnn.GELU()
            self.c_proj = tnn.Linear(4 * n_embd, n_embd, bias=False)

        def forward(self, x):
            return self.c_proj(self.gelu(self.c_fc(x)))

    class Block(tnn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1 = LayerNorm(n_embd)
            self.attn = CausalSelfAttention()
            self.ln_2 = LayerNorm(n_embd)
            self.mlp = MLP()

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT(tnn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = tnn.ModuleDict(dict(
                wte=tnn.Embedding(vocab_size, n_embd), wpe=tnn.Embedding(block_size, n_embd),
                drop=tnn.Dropout(0.0), h=tnn.ModuleList([Block() for _ in range(n_layer)]),
                ln_f=LayerNorm(n_embd)))
            self.lm_head = tnn.Linear(n_embd, vocab_size, bias=False)
            self.transformer.wte.weight = self.lm_head.weight
            self.apply(self._init_weights)
            for pn, p in self.named_parameters():
                if pn.endswith("c_proj.weight"):
                    torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

        def _init_weights(self, module):
            if isinstance(module, tnn.Linear):
                torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, tnn.Embedding):
                torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

        def forward(self, idx, targets):
            t = idx.size(1)
            x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(t))
            for block in self.transformer.h:
                x = block(x)
            logits = self.lm_head(self.transformer.ln_f(x))
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    return GPT()


_NANOGPT_NAMES = {  # nanoGPT parameter -> tinylm parameter
    "transformer.wte.weight": "tok_emb.weight", "transformer.wpe.weight": "transformer.pos.weight",
    "transformer.ln_f.weight": "transformer.norm.weight",
    "ln_1.weight": "norm1.weight", "attn.c_attn.weight": "attn.qkv.weight",
    "attn.c_proj.weight": "attn.out.weight", "ln_2.weight": "norm2.weight",
    "mlp.c_fc.weight": "mlp.up.weight", "mlp.c_proj.weight": "mlp.down.weight",
}


def _tinylm_name(name):
    if name in _NANOGPT_NAMES:
        return _NANOGPT_NAMES[name]
    _, _, i, rest = name.split(".", 3)  # transformer.h.{i}.{rest}
    return f"transformer.blocks.{i}.{_NANOGPT_NAMES[rest]}"


def nanogpt_replay(args, workdir, eval_iters=20):
    """nanoGPT's train.py loop on the CPU recipe, step for step: torch.manual_seed(1337),
    its model's initial weights, its torch.randint batches (the first fetched before the
    loop, estimate_loss drawing eval_iters train and val batches every 250 steps). tinylm
    (Trainer.train_step, weights copied from nanoGPT's init) and nanoGPT's torch model
    train in lockstep on those batches; both are evaluated on estimate_loss's batches."""
    import torch

    from tinylm.models import build_model
    from tinylm.optim import AdamW, param_groups_for_weight_decay

    cfg = recipe(args.data, os.path.join(workdir, "replay"), args.steps, eval_iters, 1)
    trainer = Trainer(cfg).setup()  # the run's config, objective and step code
    text = Path(args.data).read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = len(data)
    splits = {"train": data[: int(n * 0.9)], "val": data[int(n * 0.9):]}
    T, B = cfg.block_size, cfg.batch_size

    torch.set_num_threads(1)
    torch.manual_seed(1337)
    ref = nanogpt_model(len(chars), T, cfg.model["n_layer"], cfg.model["n_head"],
                        cfg.model["d_model"])
    model = build_model(trainer.model.config.replace(vocab_size=len(chars)))
    weights = {_tinylm_name(k): v.detach().numpy() for k, v in ref.named_parameters()}
    weights["lm_head.weight"] = weights["tok_emb.weight"]  # tied (listed once by torch)
    model.load_state_dict(weights)
    trainer.model = model
    trainer.optimizer = AdamW(param_groups_for_weight_decay(model, cfg.weight_decay),
                              lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                              weight_decay=cfg.weight_decay)
    opt = torch_optimizer(ref, cfg)

    def get_batch(split):
        d = splits[split]
        ix = torch.randint(len(d) - T, (B,)).numpy()
        w = d[ix[:, None] + np.arange(T + 1)].astype(np.int64)
        return {"ids": w[:, :-1], "targets": w[:, 1:]}

    X = get_batch("train")
    curves = {"tinylm": [], "nanogpt": []}
    t0 = time.perf_counter()
    with blas_threads(1):
        for it in range(args.steps + 1):
            if it % cfg.eval_every == 0 or it == args.steps:
                batches = {s: [get_batch(s) for _ in range(eval_iters)] for s in ("train", "val")}
                ref.eval()
                with torch.no_grad():
                    ref_val = float(np.mean([ref(torch.from_numpy(b["ids"]),
                                                 torch.from_numpy(b["targets"])).item()
                                             for b in batches["val"]]))
                ref.train()
                tl_val = tinylm_eval(trainer, batches["val"])
                curves["tinylm"].append((it, tl_val))
                curves["nanogpt"].append((it, ref_val))
                print(f"  replay step {it}: val loss nanoGPT (torch) {ref_val:.4f}, "
                      f"tinylm {tl_val:.4f}", flush=True)
            if it == args.steps:
                break  # nanoGPT's last step happens after its last evaluation
            trainer.step = it
            trainer.train_step([X])
            torch_step(ref, opt, X, cfg.lr_at(it), cfg.grad_clip)
            X = get_batch("train")
    seconds = time.perf_counter() - t0
    tl, ng = curves["tinylm"][-1][1], curves["nanogpt"][-1][1]
    print(f"nanoGPT replay: val loss at step {args.steps} ({eval_iters} batches): nanoGPT "
          f"(torch) {ng:.4f}, tinylm {tl:.4f} ({seconds:.0f} s)", flush=True)
    return {"val_loss_nanogpt": ng, "val_loss_tinylm": tl, "eval_iters": eval_iters,
            "curves": curves, "seconds": seconds}


# --------------------------------------------------------------------------- phases


def timing(args, workdir):
    """Loss parity on the first steps, then interleaved ms/step per thread count."""
    import torch

    rows = []
    for n_threads in [int(t) for t in args.threads.split(",")]:
        cfg = recipe(args.data, os.path.join(workdir, f"timing-{n_threads}"), args.steps,
                     args.eval_iters, n_threads)
        trainer = Trainer(cfg).setup()
        twin = torch_twin(trainer.model)
        opt = torch_optimizer(twin, cfg)
        torch.set_num_threads(n_threads)
        n = args.timing_steps + 5
        batches = [trainer.next_batches() for _ in range(n)]
        tl_ms, pt_ms, diffs = [], [], []
        with blas_threads(n_threads):
            for i, micro in enumerate(batches):
                lr = cfg.lr_at(trainer.step)
                order = ("tinylm", "torch") if i % 2 == 0 else ("torch", "tinylm")
                for who in order:
                    t0 = time.perf_counter()
                    if who == "tinylm":
                        tl_loss, _ = trainer.train_step(micro)
                        trainer.step += 1
                        tl_ms.append((time.perf_counter() - t0) * 1e3)
                    else:
                        pt_loss = torch_step(twin, opt, micro[0], lr, cfg.grad_clip)
                        pt_ms.append((time.perf_counter() - t0) * 1e3)
                diffs.append(abs(tl_loss - pt_loss))
        tl, pt = statistics.median(tl_ms[5:]), statistics.median(pt_ms[5:])
        rows.append({"threads": n_threads, "tinylm_ms": tl, "torch_ms": pt, "ratio": tl / pt,
                     "max_loss_diff_first5": max(diffs[:5]), "loss_diff_last": diffs[-1],
                     "steps": args.timing_steps})
        print(f"threads {n_threads}: tinylm {tl:.1f} ms/step, torch {pt:.1f} ms/step, "
              f"tinylm/torch {tl / pt:.2f}; |loss diff| first 5 steps {max(diffs[:5]):.1e}, "
              f"after {n} steps {diffs[-1]:.1e}", flush=True)
    return rows


def train_tinylm(args, workdir, seed):
    cfg = recipe(args.data, os.path.join(workdir, f"tinylm-{seed}"), args.steps,
                 args.eval_iters, args.train_threads)
    cfg.seed = seed
    t0 = time.perf_counter()
    trainer = Trainer(cfg, log=lambda m: print("  " + m, flush=True))
    result = trainer.fit()
    seconds = time.perf_counter() - t0
    full = tinylm_eval(trainer, full_split_batches(trainer))
    records = read_metrics(os.path.join(cfg.out_dir, "metrics.jsonl"))
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    print(f"tinylm seed {seed}: val loss {result['val_loss']:.4f} at step {result['step']} "
          f"({cfg.eval_iters} batches), {full:.4f} on the whole val split ({seconds:.0f} s)",
          flush=True)
    return trainer, {"seed": seed, "val_loss": result["val_loss"], "val_loss_full": full,
                     "seconds": seconds, "train": train, "val": val}


def train_torch(args, trainer):
    """The torch twin on the same batches as tinylm's run (a fresh trainer replays them)."""
    import torch

    cfg = trainer.config
    again = recipe(args.data, trainer.config.out_dir + "-replay", args.steps, args.eval_iters,
                   args.train_threads)
    again.seed = cfg.seed
    replay = Trainer(again).setup()  # the same initial weights and batches
    twin = torch_twin(replay.model)
    opt = torch_optimizer(twin, cfg)
    torch.set_num_threads(args.train_threads)
    val_batches = eval_batches(replay, cfg.eval_iters)
    train, val, t0 = [], [], time.perf_counter()
    for step in range(1, cfg.max_steps + 1):
        batch = replay.next_batches()[0]
        loss = torch_step(twin, opt, batch, cfg.lr_at(step - 1), cfg.grad_clip)
        if step % cfg.log_every == 0:
            train.append((step, loss))
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            twin.eval()
            val.append((step, torch_eval(twin, val_batches)))
            twin.train()
            print(f"  torch step {step}: val loss {val[-1][1]:.4f}", flush=True)
    seconds = time.perf_counter() - t0
    twin.eval()
    full = torch_eval_weighted(twin, full_split_batches(replay))
    print(f"torch seed {cfg.seed}: val loss {val[-1][1]:.4f} at step {cfg.max_steps}, "
          f"{full:.4f} on the whole val split ({seconds:.0f} s)", flush=True)
    return {"seed": cfg.seed, "val_loss": val[-1][1], "val_loss_full": full,
            "seconds": seconds, "train": train, "val": val}


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG")
        return None
    replay = results.get("nanogpt_replay")
    fig, axes = plt.subplots(1, 2 if replay else 1, figsize=(14 if replay else 8, 5),
                             squeeze=False)
    ax = axes[0][0]
    seed = results["tinylm"]["seed"]
    for name, color, style in (("torch", "C1", "-"), ("tinylm", "C0", "--")):
        run = results.get(name)
        if not run:
            continue
        ax.plot(*zip(*run["train"]), color=color, alpha=0.35, linewidth=1, linestyle=style,
                label=f"{name} train (seed {seed})")
        ax.plot(*zip(*run["val"]), color=color, marker="o" if name == "torch" else "x",
                linewidth=2, linestyle=style,
                label=f"{name} val (seed {seed}: {run['val_loss']:.3f} at the end)")
    for run in results.get("tinylm_seeds", [])[1:]:
        ax.plot(*zip(*run["val"]), color="C2", alpha=0.6, linewidth=1, marker=".",
                label=f"tinylm val, seed {run['seed']} ({run['val_loss']:.3f})")
    ax.set_title("tinylm's pipeline; torch twin on the same batches")
    if replay:
        bx = axes[0][1]
        for name, color, style, marker in (("nanogpt", "C1", "-", "o"),
                                           ("tinylm", "C0", "--", "x")):
            label = "nanoGPT's model (torch)" if name == "nanogpt" else "tinylm"
            bx.plot(*zip(*replay["curves"][name]), color=color, linestyle=style, marker=marker,
                    linewidth=2, label=f"{label} val ({replay['curves'][name][-1][1]:.3f})")
        bx.set_title("nanoGPT's run replayed: its seed, init and batches")
    for a in axes[0]:
        a.axhline(1.89, color="gray", linestyle="--", linewidth=1, label="target 1.89")
        a.set_xlabel("step")
        a.set_ylabel("cross-entropy (nats/char)")
        a.set_ylim(1.0, 4.5)
        a.grid(True, alpha=0.3)
        a.legend()
    fig.suptitle("char-level Shakespeare, nanoGPT CPU recipe (4 x 128, block 64, batch 12)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    args = parse_args(argv)
    import torch

    if not os.path.exists(args.data):
        sys.exit(f"no data at {args.data}; pass --data tinyshakespeare.txt")
    load0 = os.getloadavg()
    header = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.node(),
              "cpus": os.cpu_count(), "python": platform.python_version(),
              "numpy": np.__version__, "torch": torch.__version__,
              "load_start": [round(x, 2) for x in load0]}
    print(" ".join(f"{k}={v}" for k, v in header.items()), flush=True)
    results = {"header": header}
    with tempfile.TemporaryDirectory(prefix="tinylm-shakespeare-") as workdir:
        results["timing"] = timing(args, workdir)
        seeds = [int(x) for x in args.seeds.split(",")]
        runs = []
        for i, seed in enumerate(seeds):
            trainer, run = train_tinylm(args, workdir, seed)
            runs.append(run)
            if i == 0 and args.torch_train:
                results["torch"] = train_torch(args, trainer)
        results["tinylm"], results["tinylm_seeds"] = runs[0], runs
        if args.nanogpt_replay:
            results["nanogpt_replay"] = nanogpt_replay(args, workdir)
    header["load_end"] = [round(x, 2) for x in os.getloadavg()]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    png = plot(results, args.png)

    print()
    print("| | tinylm | torch | target |")
    print("| --- | --- | --- | --- |")
    tv = results["tinylm"]["val_loss"]
    pv = results.get("torch", {}).get("val_loss", math.nan)
    tf = results["tinylm"]["val_loss_full"]
    pf = results.get("torch", {}).get("val_loss_full", math.nan)
    print(f"| val loss at step {args.steps}, seed {seeds[0]}, {args.eval_iters} random batches "
          f"| {tv:.4f} | {pv:.4f} | <= 1.89 ({'PASS' if tv <= 1.89 else 'FAIL'}) |")
    print(f"| the same, whole val split | {tf:.4f} | {pf:.4f} | |")
    if len(runs) > 1:
        both = [r["val_loss"] for r in runs]
        full = [r["val_loss_full"] for r in runs]
        print(f"| tinylm over seeds {args.seeds}: mean (min-max), {args.eval_iters} batches | "
              f"{np.mean(both):.4f} ({min(both):.4f}-{max(both):.4f}) | | |")
        print(f"| the same, whole val split | {np.mean(full):.4f} ({min(full):.4f}-"
              f"{max(full):.4f}) | | |")
    for row in results["timing"]:
        print(f"| ms/step, {row['threads']} thread(s), median of {row['steps']} | "
              f"{row['tinylm_ms']:.1f} | {row['torch_ms']:.1f} | tinylm/torch = "
              f"{row['ratio']:.2f} (target <= 1) |")
    if "nanogpt_replay" in results:
        r = results["nanogpt_replay"]
        print(f"| nanoGPT's own run replayed (seed 1337, its init and batches), val loss "
              f"at step {args.steps}, {r['eval_iters']} batches | {r['val_loss_tinylm']:.4f} | "
              f"{r['val_loss_nanogpt']:.4f} (nanoGPT's model) | <= 1.89 "
              f"({'PASS' if r['val_loss_tinylm'] <= 1.89 else 'FAIL'}) |")
    print(f"| wall time of the {args.steps}-step run | {results['tinylm']['seconds']:.0f} s | "
          f"{results.get('torch', {}).get('seconds', math.nan):.0f} s | |")
    print(f"\nload average: {header['load_start']} at start, {header['load_end']} at end; "
          f"wrote {args.out}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()

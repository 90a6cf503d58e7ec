"""DPO step time: tinylm's DPO objective against TRL 1.16's DPOTrainer (torch) on the same
GPT-2 weights, adapter and preference batch, one thread each.

    .venv/bin/python bench/align_dpo_speed.py                 # GPT-2-small shape, LoRA and full
    .venv/bin/python bench/align_dpo_speed.py --quick         # a tiny model: a smoke test
    .venv/bin/python bench/align_dpo_speed.py --configs tinylm-lora,trl-lora --steps 3

The model: a randomly initialised Hugging Face ``GPT2LMHeadModel`` (``--n-layer`` 12,
``--d-model`` 768, ``--n-head`` 12, ``--vocab`` 50257, dropout 0), saved once with
``save_pretrained`` and loaded by both sides from that folder. The batch: ``--pairs``
preference pairs of a ``--prompt`` token prompt and chosen / rejected completions of
random lengths up to ``--completion`` tokens (random ids, eos last), right-padded: TRL's
collated layout (input_ids, attention_mask, completion_mask; chosen rows first), and
the same arrays in tinylm's (ids, targets). LoRA: r=``--lora-r``, alpha 2r, on
``attn.c_attn`` and ``attn.c_proj``, drawn once by PEFT (B random, so the policy and
its base differ from the first step) and saved; TRL gets a fresh adapter from its
``peft_config`` with those weights copied in (so its reference is the base with the
adapter disabled, as tinylm's), tinylm ``peft.load_adapter``. Full: every weight
trains; the reference is a second, frozen copy on both sides.

A step: the policy's forward and backward, the reference's forward (no gradient), the
sigmoid DPO loss (beta 0.1) with TRL's metrics, AdamW (lr ``--lr`` for LoRA,
``--full-lr`` for full: TRL's DPOConfig default 1e-6; a full step at 1e-4 drives this
random batch's loss to 1e-6 at once, where comparing the two sides' losses says
nothing) and zero_grad. TRL's is its own ``DPOTrainer._compute_loss`` (fused LM head, bf16 off) plus torch's AdamW;
tinylm's ``tinylm.align.dpo.DPO.loss`` plus tinylm's AdamW. ``--warmup`` steps first,
then the median of ``--steps``. Each configuration runs in its own process, on one
thread (OMP/OPENBLAS/MKL_NUM_THREADS=1, ``torch.set_num_threads(1)``,
``tinylm.threads.blas_threads(1)``). The losses of every step are compared. With
``--repeats`` N every configuration runs N times, interleaved (tinylm-lora, trl-lora,
tinylm-full, trl-full, then again), so that a change in the machine's load hits both
sides of a pair alike: a configuration's time is the median of its runs' medians, a
pair's ratio the median of its per-round ratios. Time it on a quiet machine; quote
ratios (bench/RESULTS.md), not lone times.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _workers import finish_args, machine, report, run_worker  # noqa: E402

# bench/tokenizers.py would shadow the tokenizers package transformers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
RESULTS = ROOT / "bench" / "results"
TARGETS = ["attn.c_attn", "attn.c_proj"]
CONFIGS = {"tinylm-lora": ("tinylm", "lora"), "trl-lora": ("trl", "lora"),
           "tinylm-full": ("tinylm", "full"), "trl-full": ("trl", "full")}
PAIRS = (("tinylm-lora", "trl-lora"), ("tinylm-full", "trl-full"))
QUICK = dict(n_layer=2, d_model=64, n_head=4, vocab=512, pairs=2, prompt=8, completion=8,
             warmup=1, steps=2)
TARGET_X = 1.2  # the step-time bar: tinylm at most 1.2x TRL + torch
BETA = 0.1
WORKER_KEYS = ("n_layer", "d_model", "n_head", "vocab", "pairs", "prompt", "completion",
               "lora_r", "lr", "full_lr", "warmup", "steps", "seed")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny model and batch, 1+2 steps")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma-separated, of {', '.join(CONFIGS)}")
    for name, default in (("n-layer", 12), ("d-model", 768), ("n-head", 12), ("vocab", 50257),
                          ("pairs", 2), ("prompt", 64), ("completion", 64), ("lora-r", 8),
                          ("warmup", 2), ("steps", 5), ("seed", 0), ("repeats", 1)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of LoRA")
    p.add_argument("--full-lr", type=float, default=1e-6,
                   help="AdamW learning rate of full fine-tuning")
    p.add_argument("--work-dir", help="where the model, adapter and batch go [default: a "
                   "temporary folder]")
    p.add_argument("--out", help="JSON results [default: bench/results/align_dpo_speed.json; "
                   "with --quick none]")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # one configuration (internal)
    return finish_args(p, p.parse_args(argv), CONFIGS, QUICK, RESULTS / "align_dpo_speed.json")


# --------------------------------------------------------------------------- the inputs


def prepare(args, work: Path) -> dict:
    """The base folder, PEFT's adapter folder and the batch (batch.npz, TRL's layout)
    in ``work``."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(args.seed)
    cfg = transformers.GPT2Config(n_layer=args.n_layer, n_embd=args.d_model, n_head=args.n_head,
                                  vocab_size=args.vocab, n_positions=1024, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                  eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(cfg)
    hf.save_pretrained(work / "base")
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                      target_modules=TARGETS, fan_in_fan_out=True, init_lora_weights=False)
    get_peft_model(hf, lora).save_pretrained(work / "adapter")
    np.savez(work / "batch.npz", **preference_batch(args))
    return {"parameters": sum(p.numel() for p in hf.parameters())}


def preference_batch(args) -> dict:
    """TRL's collated arrays of ``args.pairs`` random pairs (chosen rows first)."""
    rng = np.random.default_rng(args.seed)
    B, P, C = args.pairs, args.prompt, args.completion
    lengths = rng.integers(max(C // 2, 1), C + 1, size=2 * B)  # (2B,) completion tokens
    T = P + int(lengths.max())
    ids = np.zeros((2 * B, T), np.int64)
    prompts = rng.integers(1, args.vocab, (B, P))
    ids[:, :P] = np.concatenate([prompts, prompts])
    j = np.arange(T)
    completion = (j >= P) & (j < P + lengths[:, None])  # (2B, T)
    ids[completion] = rng.integers(1, args.vocab, int(completion.sum()))
    ids[np.arange(2 * B), P + lengths - 1] = 0  # eos ends each completion
    return {"input_ids": ids, "attention_mask": (j < P + lengths[:, None]).astype(np.int64),
            "completion_mask": completion.astype(np.int64)}


def tinylm_layout(arrays: dict) -> dict:
    ids, completion = arrays["input_ids"], arrays["completion_mask"].astype(bool)
    targets = np.full_like(ids, -100)
    targets[:, :-1] = np.where(completion[:, 1:], ids[:, 1:], -100)
    return {"ids": ids, "targets": targets, "attention_mask": arrays["attention_mask"],
            "n_tokens": int(arrays["attention_mask"].sum())}


# --------------------------------------------------------------------------- one side


def learning_rate(args, trained: str) -> float:
    return args.lr if trained == "lora" else args.full_lr


def timed_steps(step, n_warmup: int, n_steps: int) -> dict:
    losses, seconds = [], []
    for i in range(n_warmup + n_steps):
        t = time.perf_counter()
        losses.append(step())
        if i >= n_warmup:
            seconds.append(time.perf_counter() - t)
    return {"losses": losses, "step_s": seconds, "median_step_s": float(np.median(seconds))}


def tinylm_side(args, trained: str, work: Path) -> dict:
    from tinylm import load_pretrained, optim, peft
    from tinylm.align.dpo import DPO, AdapterReference, ModelReference
    from tinylm.threads import blas_threads

    batch = tinylm_layout(dict(np.load(work / "batch.npz")))
    with blas_threads(1):
        model = load_pretrained(work / "base").train()
        if trained == "lora":
            peft.load_adapter(model, work / "adapter")
            reference = AdapterReference()
        else:
            model.requires_grad_(True)
            reference = ModelReference(load_pretrained(work / "base"))
        objective = DPO(None, reference, beta=BETA)
        opt = optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate(args, trained),
                          weight_decay=0.01)

        def step():
            loss = objective.loss(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return float(loss.item())

        return timed_steps(step, args.warmup, args.steps)


def trl_side(args, trained: str, work: Path) -> dict:
    import datasets
    import torch
    import transformers
    import trl

    torch.set_num_threads(1)
    inputs = {k: torch.from_numpy(v) for k, v in np.load(work / "batch.npz").items()}
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=_tiny_tokenizer(),
                                               eos_token="<eos>")
    model = transformers.GPT2LMHeadModel.from_pretrained(work / "base")
    ref, peft_config = None, None
    if trained == "lora":
        from peft import LoraConfig

        saved = json.loads((work / "adapter" / "adapter_config.json").read_text())
        peft_config = LoraConfig(r=saved["r"], lora_alpha=saved["lora_alpha"], lora_dropout=0.0,
                                 target_modules=TARGETS, fan_in_fan_out=True)
    else:
        ref = transformers.GPT2LMHeadModel.from_pretrained(work / "base")
    config = trl.DPOConfig(output_dir=str(work / "trl"), report_to=[], use_cpu=True,
                           bf16=False, fp16=False, beta=BETA, max_length=None)
    trainer = trl.DPOTrainer(model=model, ref_model=ref, args=config, processing_class=tok,
                             peft_config=peft_config, train_dataset=datasets.Dataset.from_list(
                                 [{"prompt": "a", "chosen": "b", "rejected": "c"}]))
    if trained == "lora":
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(trainer.model,
                                  load_file(work / "adapter" / "adapter_model.safetensors"))
    policy = trainer.model.train()
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=learning_rate(args, trained),
                            weight_decay=0.01)

    def step():
        loss = trainer._compute_loss(policy, inputs, False)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.item())

    return {**timed_steps(step, args.warmup, args.steps), "torch": torch.__version__,
            "trl": trl.__version__}


def _tiny_tokenizer():
    """A three-token word-level tokenizer: TRL's constructor needs one; the bench feeds ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel({"<eos>": 0, "a": 1, "b": 2, "c": 3}, unk_token="<eos>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return t


def worker(args) -> None:
    side, trained = CONFIGS[args.worker]
    run = tinylm_side if side == "tinylm" else trl_side
    report(run(args, trained, Path(args.work_dir)))


# --------------------------------------------------------------------------- the table


def merge(results: list) -> dict:
    """One configuration's runs as one row: the first run's losses (every run's must be
    the same), the median of the runs' median step times, each run's."""
    if any("error" in r for r in results):
        return next(r for r in results if "error" in r)
    if any(r["losses"] != results[0]["losses"] for r in results):
        return {"error": "the runs' losses differ: the step is not deterministic"}
    rounds = [r["median_step_s"] for r in results]
    return {**results[0], "median_step_s": float(np.median(rounds)), "round_step_s": rounds}


def compare(rows: dict) -> list:
    out = []
    for ours, theirs in PAIRS:
        a, b = rows.get(ours), rows.get(theirs)
        if not a or not b or "error" in a or "error" in b:
            continue
        la, lb = np.array(a["losses"]), np.array(b["losses"])
        rounds = np.array(a["round_step_s"]) / np.array(b["round_step_s"])  # (repeats,)
        out.append({"pair": f"{ours} / {theirs}", "step_x": float(np.median(rounds)),
                    "round_step_x": rounds.tolist(),
                    "max_loss_rel_diff": float(np.max(np.abs(la - lb) / np.abs(lb)))})
    return out


def table(result: dict) -> str:
    a = result["args"]
    lines = [f"\nGPT-2-shaped model, {result['parameters'] / 1e6:.1f}M parameters "
             f"({a['n_layer']} layers, d={a['d_model']}, vocab {a['vocab']}), {a['pairs']} "
             f"pairs of a {a['prompt']}-token prompt + up to {a['completion']} tokens, LoRA "
             f"r={a['lora_r']}; one thread; median of {a['steps']} steps after {a['warmup']}"
             + ("" if a["repeats"] == 1 else f", median of {a['repeats']} interleaved runs"),
             "| config | step s (median) | first loss |", "|---|---|---|"]
    for name, r in result["rows"].items():
        lines.append(f"| {name} | skipped: {r['error']} |" if "error" in r else
                     f"| {name} | {r['median_step_s']:.4f} | {r['losses'][0]:.6f} |")
    lines += ["", "| tinylm / TRL | step time x | target | max loss rel diff |",
              "|---|---|---|---|"]
    for p in result["pairs"]:
        met = "met" if p["step_x"] <= TARGET_X else "NOT met"
        lines.append(f"| {p['pair']} | {p['step_x']:.2f} | <= {TARGET_X} ({met}) | "
                     f"{p['max_loss_rel_diff']:.1e} |")
    return "\n".join(lines)


def run_all(args, work: Path) -> dict:
    load_before = os.getloadavg()
    print(f"preparing the model, adapter and batch in {work}", file=sys.stderr)
    facts = prepare(args, work)
    runs = {config: [] for config in args.configs}
    for r in range(args.repeats):
        for config in args.configs:
            print(f"running {config} ({r + 1}/{args.repeats})", file=sys.stderr, flush=True)
            runs[config].append(run_worker(__file__, config, work, args, WORKER_KEYS))
    rows = {config: merge(results) for config, results in runs.items()}
    keys = (*WORKER_KEYS, "repeats")
    return {**machine(load_before), "args": {k: getattr(args, k) for k in keys}, **facts, "rows": rows,
            "pairs": compare(rows)}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if args.work_dir:
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
        result = run_all(args, Path(args.work_dir))
    else:
        with tempfile.TemporaryDirectory(prefix="tinylm-bench-dpo-") as tmp:
            result = run_all(args, Path(tmp))
    print(table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        from tinylm.atomic import write_atomic

        write_atomic(args.out, (json.dumps(result, indent=2) + "\n").encode())
        print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Fine-tuning benchmark: one training step of LoRA, full fine-tuning and QLoRA in tinylm
against torch + Hugging Face PEFT (+ bitsandbytes for QLoRA) on the same weights and batch.

    .venv/bin/python bench/finetune.py                 # GPT-2-small shape, every configuration
    .venv/bin/python bench/finetune.py --quick         # a tiny model, a smoke test (seconds)
    .venv/bin/python bench/finetune.py --configs tinylm-lora,torch-lora --steps 3
    .venv/bin/python bench/finetune.py --configs tinylm-lora-gc,tinylm-qlora-nf4-gc,tinylm-qlora-nf4-bf16-gc,tinylm-qlora-q4_0-gc

The model: a randomly initialised Hugging Face ``GPT2LMHeadModel`` (``--n-layer`` 12,
``--d-model`` 768, ``--n-head`` 12, ``--vocab`` 50257: GPT-2 small, 124M parameters,
dropout 0), saved once with ``save_pretrained`` and loaded by both sides from that folder
(tinylm through ``tinylm.load_pretrained``). The batch: ``--batch`` x (``--block`` + 1)
random token ids (inputs the first ``--block``, targets the same shifted by one), the
same array on both sides. The LoRA adapter (r=``--lora-r``, alpha 2r, dropout 0, on the
attention projections ``attn.c_attn`` and ``attn.c_proj``, PEFT's init: A random, B zero)
is made once by PEFT and saved in its folder format; torch loads it with
``PeftModel.from_pretrained(..., is_trainable=True)``, tinylm with ``peft.load_adapter``,
so the two start from identical adapters and the losses of every step can be compared,
not only the first. Full fine-tuning trains every weight (the tied embedding/head once).
QLoRA: the same adapter on a frozen 4-bit base: tinylm's NF4 (the Linear layers; the
tied embedding/head stay float32), NF4 with the tied embedding/head in bfloat16 storage
("nf4-bf16": ``quantize(model, "nf4", embeddings="bf16")``, what QLoRA with
``torch_dtype=bfloat16`` keeps; its losses are checked against the float32-embedding
run's, max relative difference <= ``LOSS_TOLERANCE``) and Q4_0 (every Linear and the
tied embedding/head), each quantized once by ``tinylm.quant.quantize`` and saved with
``save_quantized``, so the worker loads the packed weights and never holds a float32
copy; torch's with bitsandbytes NF4 (``BitsAndBytesConfig(load_in_4bit=True)``,
compute float32) when bitsandbytes works on this CPU (else that row says why).

The "-gc" rows train in less memory, as QLoRA users do: tinylm with
``model.gradient_checkpointing(True)`` (each block recomputed in backward) and
``return_logits = False`` (the loss from the hidden states in row chunks, no (B, T, V)
logits), which is how ``tinylm finetune`` trains; torch with
``gradient_checkpointing_enable(use_reentrant=False)``. QLoRA against LoRA with the same
settings is the fair memory comparison; the table gives it both ways.

A step is forward + cross-entropy + backward + AdamW step (lr ``--lr``, weight decay
0.01) + zero_grad, timed with ``time.perf_counter``; ``--warmup`` steps first, then the
median of ``--steps`` (wall time, and the process's CPU time, which other work on the
machine inflates less: one thread, so it is the step's compute). Each configuration
runs in its own process (so the peak RSS is its own), on one thread:
OMP/OPENBLAS/MKL_NUM_THREADS=1 for both, ``torch.set_num_threads(1)`` for torch,
``tinylm.threads.blas_threads(1)`` for tinylm. Two peak RSS figures, both the kernel's
high-water mark (VmHWM; not ``ru_maxrss``, which a child inherits from the parent it
was forked from): over the whole process (imports and loading included) and
over the training steps alone (the mark reset after loading: ``/proc/self/clear_refs``).
Results: a table on stdout and ``--out`` (bench/results/finetune.json). Time it on a
quiet machine: anything else running shares the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import cpu_model  # noqa: E402

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

RESULTS = ROOT / "bench" / "results"
THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TARGETS = ["attn.c_attn", "attn.c_proj"]  # GPT-2's attention projections (qkv and output)
# (config, side, base weights, trained): every row of the table, in order
# "-gc": gradient checkpointing on (tinylm: Model.gradient_checkpointing(True) and the
# chunked head loss, return_logits=False, as ``tinylm finetune`` trains; torch:
# gradient_checkpointing_enable(use_reentrant=False), its loss on the full logits)
CONFIGS = {"tinylm-lora": ("tinylm", "float32", "lora"), "torch-lora": ("torch", "float32", "lora"),
           "tinylm-full": ("tinylm", "float32", "full"), "torch-full": ("torch", "float32", "full"),
           "tinylm-qlora-nf4": ("tinylm", "nf4", "lora"),
           "tinylm-qlora-q4_0": ("tinylm", "q4_0", "lora"),
           "torch-qlora-nf4": ("torch", "nf4", "lora"),
           "tinylm-lora-gc": ("tinylm", "float32", "lora"),
           "torch-lora-gc": ("torch", "float32", "lora"),
           "tinylm-qlora-nf4-gc": ("tinylm", "nf4", "lora"),
           "tinylm-qlora-q4_0-gc": ("tinylm", "q4_0", "lora"),
           "tinylm-qlora-nf4-bf16": ("tinylm", "nf4-bf16", "lora"),
           "tinylm-qlora-nf4-bf16-gc": ("tinylm", "nf4-bf16", "lora")}
# base -> (quantize's scheme, its embeddings argument): "nf4-bf16" is NF4 Linear layers
# with the tied embedding/head in bfloat16 storage (QLoRA with torch_dtype=bfloat16)
QUANTIZED = {"nf4": ("nf4", None), "nf4-bf16": ("nf4", "bf16"), "q4_0": ("q4_0", None)}
# (row, reference row): the bf16-embedding run's losses against the float32-embedding one's
LOSS_TOLERANCE = 1e-3
SAME_LOSS = (("tinylm-qlora-nf4-bf16", "tinylm-qlora-nf4"),
             ("tinylm-qlora-nf4-bf16-gc", "tinylm-qlora-nf4-gc"))
PAIRS = (("tinylm-lora", "torch-lora"), ("tinylm-full", "torch-full"),
         ("tinylm-qlora-nf4", "torch-qlora-nf4"), ("tinylm-lora-gc", "torch-lora-gc"))
QUICK = dict(n_layer=2, d_model=64, n_head=4, vocab=512, batch=2, block=32, warmup=1, steps=2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a tiny model (2 layers x 64, vocab 512, batch 2 x 32), 1+2 steps")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--n-head", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--block", type=int, default=128, help="tokens per row")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (alpha = 2r)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", help="where the model, adapter and batch go "
                   "[default: a temporary folder, removed at the end]")
    p.add_argument("--out", help="JSON results [default: bench/results/finetune.json; "
                   "with --quick none]")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # one configuration (internal)
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    elif args.out is None:
        args.out = str(RESULTS / "finetune.json")
    args.configs = [c for c in args.configs.split(",") if c]
    unknown = set(args.configs) - set(CONFIGS)
    if unknown:
        p.error(f"unknown configuration(s) {sorted(unknown)}; choose of {', '.join(CONFIGS)}")
    return args


# --------------------------------------------------------------------------- memory


def reset_high_water() -> bool:
    """Reset the kernel's resident high-water mark (VmHWM) to the current RSS, so that
    ``high_water_mib`` reports the peak of what follows (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def high_water_mib() -> float:
    return _status_mib("VmHWM")


# --------------------------------------------------------------------------- preparing


def prepare(args, work: Path) -> dict:
    """The shared inputs in ``work``: the HF base folder, PEFT's adapter folder, tinylm's
    quantized folders and the batch (.npy). Returns facts for the results."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(args.seed)
    cfg = transformers.GPT2Config(n_layer=args.n_layer, n_embd=args.d_model, n_head=args.n_head,
                                  vocab_size=args.vocab, n_positions=max(1024, args.block),
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(cfg)
    n_params = sum(p.numel() for p in hf.parameters())
    hf.save_pretrained(work / "base")
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                      target_modules=TARGETS, fan_in_fan_out=True)
    get_peft_model(hf, lora).save_pretrained(work / "adapter")
    del hf
    rng = np.random.default_rng(args.seed)
    np.save(work / "batch.npy", rng.integers(0, args.vocab, (args.batch, args.block + 1)))
    for base in QUANTIZED:
        if any(CONFIGS[c][1] == base and CONFIGS[c][0] == "tinylm" for c in args.configs):
            save_tinylm_quantized(work / "base", work / f"base-{base}", *QUANTIZED[base])
    return {"parameters": n_params, "hf_config": cfg.to_diff_dict()}


def save_tinylm_quantized(src: Path, dst: Path, scheme: str, embeddings=None) -> None:
    """``src`` (HF folder) loaded by tinylm, quantized to ``scheme`` (``embeddings``:
    quantize's) and saved as a quantized folder (with a placeholder tokenizer: the bench
    feeds token ids)."""
    import warnings

    from tinylm import load_pretrained
    from tinylm.quant.model import quantize, save_quantized
    from tinylm.tokenizers.char import CharTokenizer

    model = load_pretrained(src)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize(model, scheme, embeddings=embeddings)
    for w in caught:
        print(f"  {scheme}: {w.message}", file=sys.stderr)
    save_quantized(model, CharTokenizer("ab"), dst)


# --------------------------------------------------------------------------- one side


def timed_steps(step, n_warmup: int, n_steps: int) -> dict:
    """Run ``step()`` (-> loss float) n_warmup + n_steps times; the losses of all, the
    seconds of the timed ones, the peak RSS before (imports, loading) and over them."""
    before = high_water_mib()
    hwm_ok = reset_high_water()
    losses, seconds, cpu = [], [], []
    for i in range(n_warmup + n_steps):
        t, c = time.perf_counter(), time.process_time()
        losses.append(step())
        if i >= n_warmup:
            seconds.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    train = high_water_mib()
    return {"losses": losses, "step_s": seconds, "median_step_s": float(np.median(seconds)),
            "cpu_s": cpu, "median_cpu_s": float(np.median(cpu)),
            "load_peak_rss_mib": before, "train_peak_rss_mib": train if hwm_ok else None,
            "peak_rss_mib": max(before, train)}


def tinylm_side(args, base: str, trained: str, work: Path, checkpointing: bool) -> dict:
    from tinylm import load_pretrained, optim, peft
    from tinylm.threads import blas_threads

    batch = np.load(work / "batch.npy")
    x, y = batch[:, :-1], batch[:, 1:]
    with blas_threads(1):
        folder = work / ("base" if base == "float32" else f"base-{base}")
        model = load_pretrained(folder)
        if trained == "lora":
            peft.load_adapter(model, work / "adapter")
            report = peft.trainable_parameters(model)
            trainable, total = report.trainable, report.total
        else:
            model.requires_grad_(True)
            trainable = total = sum(p.size for p in model.parameters())
        model.train()
        if checkpointing:
            model.gradient_checkpointing(True)
            model.return_logits = False  # the loss in row chunks, no (B, T, V) logits
        params = [p for p in model.parameters() if p.requires_grad]
        opt = optim.AdamW(params, lr=args.lr, weight_decay=0.01)
        loaded_rss = _status_mib("VmRSS")

        def step():
            loss = model(x, targets=y).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            return float(loss.item())

        r = timed_steps(step, args.warmup, args.steps)
        base_grads = [n for n, p in model.named_parameters() if not p.requires_grad
                      and p.grad is not None]
    return {**r, "trainable": int(trainable), "total": int(total), "loaded_rss_mib": loaded_rss,
            "frozen_with_grad": len(base_grads)}


def torch_side(args, base: str, trained: str, work: Path, checkpointing: bool) -> dict:
    import torch
    import transformers

    torch.set_num_threads(1)
    batch = torch.from_numpy(np.load(work / "batch.npy"))
    x, y = batch[:, :-1], batch[:, 1:]
    kwargs = {}
    if base == "nf4":
        kwargs = dict(device_map="cpu", quantization_config=transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    model = transformers.GPT2LMHeadModel.from_pretrained(work / "base", **kwargs)
    if trained == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, work / "adapter", is_trainable=True)
        trainable, total = model.get_nb_trainable_parameters()
    else:
        model.requires_grad_(True)
        trainable = total = sum(p.numel() for p in model.parameters())
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    loaded_rss = _status_mib("VmRSS")

    def step():
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.item())

    r = timed_steps(step, args.warmup, args.steps)
    return {**r, "trainable": int(trainable), "total": int(total), "loaded_rss_mib": loaded_rss,
            "attn_implementation": model.config._attn_implementation,
            "torch": torch.__version__, "transformers": transformers.__version__}


def worker(args) -> None:
    """One configuration (in its own process, started by ``run_worker``)."""
    side, base, trained = CONFIGS[args.worker]
    work = Path(args.work_dir)
    run = tinylm_side if side == "tinylm" else torch_side
    r = run(args, base, trained, work, args.worker.endswith("-gc"))
    print("RESULT " + json.dumps(r))


def bnb_problem() -> str | None:
    """Why bitsandbytes' 4-bit layers cannot train here (None: they can): a tiny
    Linear4bit forward and backward on the CPU, in a subprocess (its import is heavy)."""
    code = ("import torch, bitsandbytes as bnb\n"
            "m = bnb.nn.Linear4bit(64, 8, compute_dtype=torch.float32, quant_type='nf4')\n"
            "m.load_state_dict(torch.nn.Linear(64, 8).state_dict()); m = m.to('cpu')\n"
            "assert m.weight.dtype == torch.uint8, m.weight.dtype\n"
            "x = torch.randn(2, 64, requires_grad=True); m(x).sum().backward()\n"
            "print('ok', bnb.__version__)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **THREAD_ENV})
    if done.returncode == 0 and "ok" in done.stdout:
        return None
    return (done.stderr.strip().splitlines() or ["no output"])[-1]


def run_worker(args, config: str, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", config, "--work-dir", str(work)]
    for k in ("n_layer", "d_model", "n_head", "vocab", "batch", "block", "lora_r", "lr",
              "warmup", "steps", "seed"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    done = subprocess.run(cmd, env={**os.environ, **THREAD_ENV}, capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not lines:
        tail = [ln for ln in done.stderr.strip().splitlines() if ln.strip()] or ["no output"]
        return {"error": tail[-1][:300]}
    return json.loads(lines[-1][len("RESULT "):])


# --------------------------------------------------------------------------- the table


def compare(rows: dict) -> list:
    """tinylm / torch ratios and the loss agreement of each pair that ran."""
    out = []
    for ours, theirs in PAIRS:
        a, b = rows.get(ours), rows.get(theirs)
        if not a or not b or "error" in a or "error" in b:
            continue
        la, lb = np.array(a["losses"]), np.array(b["losses"])
        out.append({"pair": f"{ours} / {theirs}",
                    "step_x": a["median_step_s"] / b["median_step_s"],
                    "cpu_x": a["median_cpu_s"] / b["median_cpu_s"],
                    "peak_rss_x": a["peak_rss_mib"] / b["peak_rss_mib"],
                    "train_rss_x": (a["train_peak_rss_mib"] / b["train_peak_rss_mib"]
                                    if a["train_peak_rss_mib"] and b["train_peak_rss_mib"]
                                    else None),
                    "first_loss": [float(la[0]), float(lb[0])],
                    "first_loss_rel_diff": float(abs(la[0] - lb[0]) / abs(lb[0])),
                    "max_loss_rel_diff": float(np.max(np.abs(la - lb) / np.abs(lb)))})
    return out


def targets(rows: dict, pairs: list) -> list:
    """(target, value, met) of issue 14's bars that the rows measured."""
    out, by = [], {p["pair"].split(" / ")[0]: p for p in pairs}
    if "tinylm-lora" in by:
        out.append(("LoRA step time <= 1.2x torch+PEFT", by["tinylm-lora"]["step_x"], 1.2))
        out.append(("LoRA step CPU time <= 1.2x torch+PEFT", by["tinylm-lora"]["cpu_x"], 1.2))
        out.append(("LoRA peak RSS <= 1.0x torch+PEFT", by["tinylm-lora"]["peak_rss_x"], 1.0))
        out.append(("first-step losses agree (rel diff <= 1e-4)",
                    by["tinylm-lora"]["first_loss_rel_diff"], 1e-4))
    lora = rows.get("tinylm-lora")
    if lora and "error" not in lora:
        out.append(("trainable parameters < 1% (tinylm LoRA)",
                    100 * lora["trainable"] / lora["total"], 1.0))
    for q, ref in (("tinylm-qlora-nf4", "tinylm-lora"), ("tinylm-qlora-q4_0", "tinylm-lora"),
                   ("tinylm-qlora-nf4-gc", "tinylm-lora-gc"),
                   ("tinylm-qlora-q4_0-gc", "tinylm-lora-gc"),
                   ("tinylm-qlora-nf4-gc", "tinylm-lora"), ("tinylm-qlora-q4_0-gc", "tinylm-lora"),
                   ("tinylm-qlora-nf4-bf16", "tinylm-lora"),
                   ("tinylm-qlora-nf4-bf16-gc", "tinylm-lora-gc")):
        a, b = rows.get(q), rows.get(ref)
        if a and b and "error" not in a and "error" not in b:
            out.append((f"{q} peak RSS <= 0.5x {ref}", a["peak_rss_mib"] / b["peak_rss_mib"], 0.5))
            if a["train_peak_rss_mib"] and b["train_peak_rss_mib"]:
                out.append((f"{q} training-steps peak RSS <= 0.5x {ref}'s",
                            a["train_peak_rss_mib"] / b["train_peak_rss_mib"], 0.5))
    for q, ref in SAME_LOSS:
        a, b = rows.get(q), rows.get(ref)
        if a and b and "error" not in a and "error" not in b:
            la, lb = np.array(a["losses"]), np.array(b["losses"])
            out.append((f"{q} losses vs {ref}'s (float32 embedding): max rel diff",
                        float(np.max(np.abs(la - lb) / np.abs(lb))), LOSS_TOLERANCE))
    return [{"target": t, "value": v, "bar": bar, "met": bool(v <= bar)} for t, v, bar in out]


def table(result: dict) -> str:
    a = result["args"]
    lines = [f"\nGPT-2-shaped model, {result['parameters'] / 1e6:.1f}M parameters "
             f"({a['n_layer']} layers, d={a['d_model']}, {a['n_head']} heads, vocab "
             f"{a['vocab']}), batch {a['batch']} x {a['block']}, LoRA r={a['lora_r']} on "
             f"{', '.join(TARGETS)}, one thread; median of {a['steps']} steps after "
             f"{a['warmup']} warm-up",
             "| config | step s (median) | CPU s/step (median) | peak RSS MiB | train-steps "
             "peak RSS MiB | trainable | trainable % | first loss |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        if "error" in r:
            lines.append(f"| {name} | skipped: {r['error']} |")
            continue
        train_rss = f"{r['train_peak_rss_mib']:.0f}" if r["train_peak_rss_mib"] else "n/a"
        lines.append(f"| {name} | {r['median_step_s']:.3f} | {r['median_cpu_s']:.3f} | "
                     f"{r['peak_rss_mib']:.0f} | "
                     f"{train_rss} | {r['trainable']:,} | {100 * r['trainable'] / r['total']:.3f}"
                     f" | {r['losses'][0]:.6f} |")
    lines += ["", "| tinylm / torch | step time x | CPU time x | peak RSS x | train-steps RSS x | "
              "first-loss rel diff | max loss rel diff (all steps) |",
              "|---|---|---|---|---|---|---|"]
    for p in result["pairs"]:
        tr = f"{p['train_rss_x']:.2f}" if p["train_rss_x"] else "n/a"
        lines.append(f"| {p['pair']} | {p['step_x']:.2f} | {p['cpu_x']:.2f} | "
                     f"{p['peak_rss_x']:.2f} | {tr} | "
                     f"{p['first_loss_rel_diff']:.1e} | {p['max_loss_rel_diff']:.1e} |")
    lines += ["", "| target | value | met |", "|---|---|---|"]
    for t in result["targets"]:
        lines.append(f"| {t['target']} | {t['value']:.4g} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines)


def run_all(args, work: Path) -> dict:
    load_before = os.getloadavg()
    print(f"preparing the model, adapter and batch in {work}", file=sys.stderr)
    facts = prepare(args, work)
    problem = bnb_problem() if "torch-qlora-nf4" in args.configs else None
    rows = {}
    for config in args.configs:
        if config == "torch-qlora-nf4" and problem:
            rows[config] = {"error": f"bitsandbytes 4-bit does not train on this CPU: {problem}"}
            continue
        print(f"running {config}", file=sys.stderr, flush=True)
        rows[config] = run_worker(args, config, work)
    pairs = compare(rows)
    keys = ("n_layer", "d_model", "n_head", "vocab", "batch", "block", "lora_r", "lr", "warmup",
            "steps", "seed")
    return {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                        "python": platform.python_version(), "numpy": np.__version__,
                        "date": time.strftime("%Y-%m-%d %H:%M"),
                        "load_before": load_before},
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "args": {k: getattr(args, k) for k in keys}, **facts, "targets_modules": TARGETS,
            "rows": rows, "pairs": pairs, "targets": targets(rows, pairs)}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if args.work_dir:
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
        result = run_all(args, Path(args.work_dir))
    else:
        with tempfile.TemporaryDirectory(prefix="tinylm-bench-finetune-") as tmp:
            result = run_all(args, Path(tmp))
    result["machine"]["load_after"] = os.getloadavg()
    print(f"# bench/finetune.py on {result['machine']['cpu']}, {result['machine']['date']}")
    print(table(result), flush=True)
    if args.out:
        from tinylm.atomic import write_atomic

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out, (json.dumps(result, indent=1) + "\n").encode())
    failed = [c for c, r in result["rows"].items() if "error" in r and c != "torch-qlora-nf4"]
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()

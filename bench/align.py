"""Alignment, measured: a small model SFT-tuned by `tinylm finetune`, then aligned by
`tinylm align dpo` (pairs of its own samples, judged by a checker) and by `tinylm align
grpo` (the built-in exact-match reward), each scored on held-out prompts.

    .venv/bin/python bench/align.py            # ~6-10 minutes on 2 shared cores
    .venv/bin/python bench/align.py --quick    # a smoke test (a minute; files in a temp dir)

The task (made here, seeded): two-digit addition, "What is 37 + 48?" -> " 85". Every
pair (a, b) with 0 <= a, b <= 99 once: --test of them are the held-out prompts, --val
the SFT validation prompts, the rest the training pool (SFT, DPO and GRPO prompts are
drawn from it; none is a test prompt).

Why the SFT model has something to learn from a reward: its demonstrations come from a
flawed demonstrator, who on a problem with a carry out of the units (7 + 8 = 15) forgets
the carry --forget of the time (37 + 48 -> " 75"; right otherwise). Imitation learns that
mistake: the best an SFT model can do is the demonstrator's distribution (on carry
problems right only 1 - forget of the time, and wrong more often than right, so greedy
decoding is wrong there), and more SFT steps do not change it. A checker that knows the
sum can: DPO on pairs of the SFT model's own samples (chosen: a right one; rejected: a
wrong one, both drawn at temperature 1 for the same training prompt) and GRPO with the
exact-match reward (`--reward exact-match`: the completion's number equals the record's
"answer") both learn to carry.

The model: a GPT-2-shaped tinylm decoder, --n-layer x --d-model (2 x 128, 4 heads,
0.4M parameters), char tokenizer (20 ids: the task's characters and <|endoftext|>),
initialised at random by `tinylm train --max-steps 0` and then trained from scratch by
`tinylm finetune --full` on the demonstrator's prompt/completion records (loss on the
completion and its end-of-text). DPO and GRPO start from the SFT model and train every
weight (--full); the reference of both is the SFT model (DPO: a frozen copy; GRPO:
--beta 0.04, so the k3 KL term is in the loss and logged).

Scores on the --test held-out prompts, for the SFT, DPO and GRPO models:

    accuracy   greedy decoding (up to 6 new tokens), exact match of the answer
    reward     the mean exact-match reward of --samples completions per prompt drawn at
               temperature 1 (what GRPO maximises; the same seed for every model)
    KL         KL(model || SFT) on those samples: the mean over completions of
               sum_t log p_model(y_t) - log p_SFT(y_t), nats per completion (>= 0 in
               expectation)

each also split into carry / no-carry prompts, with binomial standard errors. Plots:
--plot-dir/align_stages.png (accuracy and reward per stage) and align_curves.png (from
the runs' metrics.jsonl: GRPO's reward and KL per step, DPO's reward margin and
accuracy; `tinylm plot RUN` draws a run's own). Numbers: --out (bench/results/align.json). Each stage is
one tinylm command in its own process, on --threads BLAS threads (1: a tiny model).
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
MAX_NEW = 6  # new tokens per answer: " 198" and <|endoftext|> take 5
BLOCK = 32  # the longest record, "What is 99 + 99? 198" + eos, is 21 characters
STAGES = ("sft", "dpo", "grpo")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a smoke test: a few steps of each stage, 16 test prompts, files in "
                        "a temporary folder")
    p.add_argument("--forget", type=float, default=0.6,
                   help="how often the demonstrator forgets a carry")
    p.add_argument("--test", type=int, default=400, help="held-out prompts")
    p.add_argument("--val", type=int, default=200, help="SFT validation prompts (loss only)")
    p.add_argument("--samples", type=int, default=8, help="sampled completions per prompt")
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--sft-steps", type=int, default=1500)
    p.add_argument("--sft-lr", type=float, default=2e-3)
    p.add_argument("--dpo-prompts", type=int, default=1200,
                   help="training prompts sampled for DPO pairs (one pair per prompt with a "
                        "right and a wrong sample)")
    p.add_argument("--dpo-epochs", type=float, default=2.0)
    p.add_argument("--dpo-lr", type=float, default=2e-5)
    p.add_argument("--dpo-beta", type=float, default=0.1)
    p.add_argument("--grpo-steps", type=int, default=150)
    p.add_argument("--grpo-lr", type=float, default=2e-4)
    p.add_argument("--grpo-beta", type=float, default=0.04)
    p.add_argument("--threads", type=int, default=1, help="BLAS threads of every stage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-dir", help="the runs' folder [default: a temporary one]; a run "
                                     "already there resumes (or is reused when finished)")
    p.add_argument("--out", default=str(RESULTS / "align.json"), help="JSON results")
    p.add_argument("--plot-dir", default=str(ROOT / "bench"), help="where the PNGs go")
    args = p.parse_args(argv)
    if args.quick:
        args.test, args.val, args.sft_steps, args.dpo_prompts = 16, 16, 20, 64
        args.dpo_epochs, args.grpo_steps = 0.5, 3
        args.out = args.plot_dir = None
    return args


# --------------------------------------------------------------------------- the task


def carries(a: int, b: int) -> bool:
    return a % 10 + b % 10 >= 10


def demonstration(a: int, b: int, rng: np.random.Generator, forget: float) -> int:
    """The flawed demonstrator's answer: the sum, or with the units' carry forgotten."""
    if carries(a, b) and rng.random() < forget:
        return (a // 10 + b // 10) * 10 + (a % 10 + b % 10) % 10
    return a + b


def problem(a: int, b: int) -> dict:
    return {"prompt": f"What is {a} + {b}?", "answer": str(a + b), "carry": carries(a, b)}


def make_splits(args) -> dict:
    """{"test", "val", "pool"}: disjoint lists of problems (dicts with "prompt",
    "answer", "carry"), in a seeded order."""
    rng = np.random.default_rng(args.seed)
    pairs = [(int(a), int(b)) for a, b in rng.permutation(
        np.stack(np.meshgrid(np.arange(100), np.arange(100)), -1).reshape(-1, 2))]
    test, val = pairs[:args.test], pairs[args.test:args.test + args.val]
    pool = pairs[args.test + args.val:]
    assert not set(test) & set(pool) and not set(test) & set(val) and not set(val) & set(pool)
    return {name: [problem(a, b) for a, b in part]
            for name, part in (("test", test), ("val", val), ("pool", pool))}


def sft_records(problems: list, args, seed: int) -> list:
    """The demonstrator's prompt/completion records of ``problems``."""
    rng = np.random.default_rng(seed)
    out = []
    for p in problems:
        a, b = (int(x) for x in p["prompt"][len("What is "):-1].split(" + "))
        out.append({"prompt": p["prompt"],
                    "completion": f" {demonstration(a, b, rng, args.forget)}"})
    return out


def sft_loss_floor(problems: list, forget: float) -> float:
    """The least validation loss (nats per completion token) an SFT model can reach on
    the demonstrator's answers to ``problems``: the entropy of its right-or-forgotten
    choice on each carry problem (the two answers part at one character), over the
    expected number of completion tokens (" 85" and <|endoftext|>: 4)."""
    entropy = -(forget * np.log(forget) + (1 - forget) * np.log(1 - forget)) \
        if 0 < forget < 1 else 0.0
    tokens = bits = 0.0
    for p in problems:
        a, b = (int(x) for x in p["prompt"][len("What is "):-1].split(" + "))
        right = len(str(a + b)) + 2
        if p["carry"]:
            wrong = len(str((a // 10 + b // 10) * 10 + (a % 10 + b % 10) % 10)) + 2
            tokens += (1 - forget) * right + forget * wrong
            bits += entropy
        else:
            tokens += right
    return bits / tokens


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- the stages


def tinylm(*argv) -> float:
    """Run one tinylm command in its own process; its wall seconds."""
    cmd = [sys.executable, "-c", "from tinylm.cli import main; main()", *map(str, argv)]
    print("$ tinylm " + " ".join(map(str, argv)), file=sys.stderr, flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t


def common(args) -> list:
    return ["--threads", args.threads, "--seed", args.seed, "--block-size", BLOCK,
            "--no-progress"]


def run_sft(args, runs: Path, splits: dict) -> float:
    """Random init (0 training steps: only the char tokenizer is built, from the
    records' text) then SFT of every weight on the demonstrations."""
    records = sft_records(splits["pool"], args, args.seed)
    train = write_jsonl(runs / "sft_train.jsonl", records)
    val = write_jsonl(runs / "sft_val.jsonl", sft_records(splits["val"], args, args.seed + 1))
    text = write_jsonl(runs / "init_text.jsonl",
                       [{"text": r["prompt"] + r["completion"]} for r in records])
    seconds = tinylm("train", "--data", text, "--out", runs / "init", "--family", "gpt",
                     "--tokenizer", "char", "--n-layer", args.n_layer, "--n-head", 4,
                     "--d-model", args.d_model, "--block-size", BLOCK, "--max-steps", 0,
                     "--seed", args.seed, "--no-progress")
    return seconds + tinylm(
        "finetune", "-m", runs / "init", "--full", "--data", train, "--eval-data", val,
        "-o", runs / "sft", "--max-steps", args.sft_steps, "--batch-size", 64, "--lr",
        args.sft_lr, "--warmup-steps", 50, "--eval-every", max(args.sft_steps // 5, 1),
        "--log-every", max(args.sft_steps // 30, 1), *common(args))


def dpo_pairs(args, sft: Path, prompts: list) -> tuple:
    """(records, stats): one {"prompt", "chosen", "rejected"} per prompt whose
    --samples completions by the SFT model hold a right one and a wrong (non-empty)
    one; each picked at random among them."""
    from tinylm.align.rewards import answers_match

    rng = np.random.default_rng(args.seed + 2)
    texts = sample(load(sft), prompts, args.samples, args.seed + 3, args.threads)[0]
    records, right_share = [], []
    for i, p in enumerate(prompts):
        group = texts[i * args.samples:(i + 1) * args.samples]
        right = [t for t in group if answers_match(t, p["answer"])]
        wrong = [t for t in group if not answers_match(t, p["answer"]) and t.strip()]
        right_share.append(len(right) / len(group))
        if right and wrong:
            records.append({"prompt": p["prompt"], "chosen": str(rng.choice(right)),
                            "rejected": str(rng.choice(wrong))})
    return records, {"prompts": len(prompts), "pairs": len(records),
                     "mean_right_share": float(np.mean(right_share))}


def run_dpo(args, runs: Path, splits: dict) -> tuple:
    t = time.perf_counter()
    records, stats = dpo_pairs(args, runs / "sft", splits["pool"][:args.dpo_prompts])
    stats["sampling_seconds"] = time.perf_counter() - t
    data = write_jsonl(runs / "dpo_pairs.jsonl", records)
    batch = 32
    steps = max(int(np.ceil(args.dpo_epochs * len(records) * 0.9 / batch)), 1)
    seconds = tinylm("align", "dpo", "-m", runs / "sft", "--full", "--data", data, "-o",
                     runs / "dpo", "--beta", args.dpo_beta, "--epochs", args.dpo_epochs,
                     "--batch-size", batch, "--lr", args.dpo_lr, "--warmup-steps", 5,
                     "--val-fraction", 0.1, "--eval-every", max(steps // 6, 1),
                     "--log-every", 1, *common(args))
    return seconds + stats["sampling_seconds"], stats


def run_grpo(args, runs: Path, splits: dict) -> float:
    pool = splits["pool"][args.dpo_prompts:] or splits["pool"]
    data = write_jsonl(runs / "grpo_prompts.jsonl",
                       [{"prompt": p["prompt"], "answer": p["answer"]} for p in pool])
    return tinylm("align", "grpo", "-m", runs / "sft", "--full", "--data", data, "-o",
                  runs / "grpo", "--reward", "exact-match", "--beta", args.grpo_beta,
                  "--num-generations", args.samples, "--max-completion-length", MAX_NEW,
                  "--batch-size", 16, "--lr", args.grpo_lr, "--warmup-steps", 10,
                  "--max-steps", args.grpo_steps, "--log-every", 1, *common(args))


# --------------------------------------------------------------------------- scoring


def load(path: Path):
    from tinylm.loading import load_model

    return load_model(str(path))


def sample(loaded, problems: list, n: int, seed, threads: int) -> tuple:
    """(texts, completions, prompt ids) of ``n`` completions per problem (greedy when
    ``n`` is 0: one each), rows prompt by prompt."""
    from tinylm.generate import generate
    from tinylm.threads import blas_threads

    model, tok = loaded
    prompts = [tok.encode(p["prompt"]) for p in problems]
    rows = prompts if n == 0 else [q for q in prompts for _ in range(n)]
    with blas_threads(threads):
        out = generate(model, rows, MAX_NEW, temperature=0 if n == 0 else 1.0, seed=seed)
    texts = [tok.decode(ids, skip_special_tokens=True) for ids in out.tokens]
    return texts, out.tokens, rows


def share(right: np.ndarray) -> dict:
    """Mean of 0/1 outcomes, (N,) one per prompt or (N, n) n per prompt, and its
    standard error over the N prompts (binomial for one per prompt; from the spread of
    the prompts' means for several, as samples of one prompt are not independent)."""
    if right.size == 0:
        return {"mean": float("nan"), "se": float("nan")}
    per_prompt = right.reshape(len(right), -1).mean(axis=1)
    p = float(per_prompt.mean())
    if right.ndim == 1:
        return {"mean": p, "se": float(np.sqrt(p * (1 - p) / len(right)))}
    return {"mean": p, "se": float(per_prompt.std(ddof=1) / np.sqrt(len(right)))
            if len(right) > 1 else float("nan")}


def split_scores(right: np.ndarray, carry: np.ndarray) -> dict:
    """``share`` of all, the carry and the no-carry problems; ``right`` (N,) or (N, n)."""
    return {"all": share(right), "carry": share(right[carry]), "no_carry": share(right[~carry])}


def kl_to(model, reference, rows: list, completions: list, threads: int) -> float:
    """Mean over the sampled completions of sum_t log p_model - log p_reference."""
    from tinylm.align.rollouts import layout, token_logps_array
    from tinylm.threads import blas_threads

    batch = layout(rows, [list(c) for c in completions], pad_id=0)
    with blas_threads(threads):
        diff = token_logps_array(model, batch) - token_logps_array(reference, batch)
    return float(diff.sum(axis=1).mean())


def score(args, path: Path, reference, problems: list) -> dict:
    """Greedy accuracy, sampled reward and KL to ``reference`` (loaded) on ``problems``."""
    from tinylm.align.rewards import answers_match

    t = time.perf_counter()
    loaded = load(path)
    carry = np.array([p["carry"] for p in problems])
    greedy = sample(loaded, problems, 0, None, args.threads)[0]
    right = np.array([answers_match(t, p["answer"]) for t, p in zip(greedy, problems)])
    texts, completions, rows = sample(loaded, problems, args.samples, args.seed + 4,
                                      args.threads)
    rewards = np.array([answers_match(t, problems[i // args.samples]["answer"])
                        for i, t in enumerate(texts)]).reshape(len(problems), args.samples)
    return {"accuracy": split_scores(right, carry), "reward": split_scores(rewards, carry),
            "kl_to_sft": kl_to(loaded[0], reference, rows, completions, args.threads),
            "mean_length": float(np.mean([len(c) for c in completions])),
            "examples": [{"prompt": p["prompt"], "greedy": g, "answer": p["answer"]}
                         for p, g in list(zip(problems, greedy))[:6]],
            "seconds": time.perf_counter() - t}


def curves(path: Path, keys) -> dict:
    """{key: [(step, value), ...]} of a run's training records."""
    from tinylm.train import read_metrics

    records = [r for r in read_metrics(path / "metrics.jsonl") if "loss" in r]
    return {k: [(r["step"], r[k]) for r in records if k in r] for k in keys}


def last_val_loss(path: Path) -> float:
    from tinylm.train import read_metrics

    return [r["val_loss"] for r in read_metrics(path / "metrics.jsonl") if "val_loss" in r][-1]


# --------------------------------------------------------------------------- plots and report


def plot_stages(path: Path, scores: dict, demonstrator: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=90)
    bars = (("accuracy", "all", "greedy accuracy"), ("accuracy", "carry", "greedy, carry only"),
            ("reward", "all", "reward (T=1 samples)"))
    x = np.arange(len(STAGES))
    for k, (what, part, label) in enumerate(bars):
        means = [scores[s][what][part]["mean"] for s in STAGES]
        errs = [scores[s][what][part]["se"] for s in STAGES]
        ax.bar(x + (k - 1) * 0.27, means, 0.27, yerr=errs, capsize=2, label=label)
    ax.axhline(demonstrator, color="k", ls="--", lw=1, label="the SFT data's accuracy")
    ax.set_xticks(x, [f"{s.upper()}\nKL {scores[s]['kl_to_sft']:.2f}" for s in STAGES])
    ax.set_ylim(0, 1)
    ax.set_ylabel("exact match, held-out prompts")
    ax.set_title("2-digit addition, flawed demonstrator: SFT, then DPO / GRPO", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def smooth(values, width: int = 10) -> np.ndarray:
    """The running mean of the last ``width`` values (fewer at the start)."""
    c = np.cumsum(np.concatenate([[0.0], values]))
    n = np.minimum(np.arange(1, len(values) + 1), width)
    return (c[1:] - c[np.arange(1, len(values) + 1) - n]) / n


def plot_curves(path: Path, grpo: dict, dpo: dict) -> None:
    """GRPO's reward and KL per step, DPO's reward margin and accuracy per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(9.6, 3.0), dpi=80)
    for ax, key, label in ((axes[0], "reward", "GRPO reward (train samples)"),
                           (axes[1], "kl", "GRPO KL to SFT (k3, per token)")):
        steps, values = zip(*grpo[key]) if grpo[key] else ((), ())
        ax.plot(steps, values, lw=0.6, alpha=0.4)
        ax.plot(steps, smooth(np.array(values)), lw=1.5, label="mean of 10 steps")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    for key, label in (("rewards/margins", "margin"), ("rewards/accuracies", "accuracy")):
        if dpo[key]:
            steps, values = zip(*dpo[key])
            axes[2].plot(steps, smooth(np.array(values), 5), lw=1.5, label=label)
    axes[2].set_title("DPO rewards/* (train pairs, mean of 5)", fontsize=9)
    axes[2].set_xlabel("step")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(scores: dict) -> str:
    def cell(s):
        return f"{100 * s['mean']:.1f} ± {100 * s['se']:.1f}"

    lines = ["| stage | accuracy (greedy) | carry | no carry | reward (T=1) | carry | KL to SFT |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for s in STAGES:
        a, r = scores[s]["accuracy"], scores[s]["reward"]
        lines.append(f"| {s.upper()} | {cell(a['all'])} | {cell(a['carry'])} | "
                     f"{cell(a['no_carry'])} | {cell(r['all'])} | {cell(r['carry'])} | "
                     f"{scores[s]['kl_to_sft']:.3f} |")
    return "\n".join(lines)


def stages(args, runs: Path, splits: dict) -> tuple:
    """Run (or reuse) the three stages and score each; (seconds, scores, dpo stats)."""
    seconds = {"sft": run_sft(args, runs, splits)}
    seconds["dpo"], dpo_stats = run_dpo(args, runs, splits)
    seconds["grpo"] = run_grpo(args, runs, splits)
    reference = load(runs / "sft")[0]
    scores = {s: score(args, runs / s, reference, splits["test"]) for s in STAGES}
    for s in STAGES:
        print(f"{s}: accuracy {scores[s]['accuracy']['all']['mean']:.3f}, reward "
              f"{scores[s]['reward']['all']['mean']:.3f}, KL {scores[s]['kl_to_sft']:.3f}",
              file=sys.stderr)
    return seconds, scores, dpo_stats


def main(argv=None) -> None:
    args = parse_args(argv)
    splits = make_splits(args)
    with tempfile.TemporaryDirectory(prefix="tinylm-bench-align-") as tmp:
        runs = Path(args.run_dir or Path(tmp) / "runs")
        runs.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        seconds, scores, dpo_stats = stages(args, runs, splits)
        total = time.perf_counter() - t
        grpo = curves(runs / "grpo", ("reward", "reward_std", "kl", "completions/mean_length"))
        dpo = curves(runs / "dpo", ("rewards/accuracies", "rewards/margins", "loss"))
        sft_val_loss = last_val_loss(runs / "sft")
        plot_dir = Path(args.plot_dir or tmp)
        plot_dir.mkdir(parents=True, exist_ok=True)
        carry_share = float(np.mean([p["carry"] for p in splits["test"]]))
        demonstrator = 1 - args.forget * carry_share
        plot_stages(plot_dir / "align_stages.png", scores, demonstrator)
        plot_curves(plot_dir / "align_curves.png", grpo, dpo)
    result = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                          "python": platform.python_version(), "numpy": np.__version__,
                          "date": time.strftime("%Y-%m-%d %H:%M"), "load": os.getloadavg()},
              "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "args": {k: v for k, v in vars(args).items() if k not in ("out", "plot_dir")},
              "sizes": {k: len(v) for k, v in splits.items()},
              "test_carry_share": carry_share, "demonstrator_accuracy": demonstrator,
              "sft_val_loss": sft_val_loss,
              "sft_val_loss_floor": sft_loss_floor(splits["val"], args.forget),
              "seconds": {**seconds, "total": total}, "dpo_pairs": dpo_stats,
              "scores": scores, "grpo_curves": grpo, "dpo_curves": dpo}
    print("\n" + table(scores))
    print(f"SFT validation loss {sft_val_loss:.4f} (the demonstrator's floor "
          f"{result['sft_val_loss_floor']:.4f}); DPO pairs: {dpo_stats}; seconds: "
          f"{json.dumps(result['seconds'])}")
    if args.out:
        from tinylm.atomic import write_atomic

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out, (json.dumps(result, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()

"""Tokenizer benchmark: byte-level BPE training and encoding, tinylm vs its peers.

    .venv/bin/python bench/tokenizers.py                  # the table (needs the `bench` extra)
    .venv/bin/python bench/tokenizers.py --markdown       # the same, as a bench/RESULTS.md section
    .venv/bin/python bench/tokenizers.py --corpus my.txt --vocab-size 8000 --pattern gpt4

One run measures, on one corpus (default: ../shared/data/tinyshakespeare.txt when it
is there, else Python's pydoc topics text):

- training a byte-level BPE with ``--vocab-size`` tokens (min_frequency 2, full byte
  alphabet) from the file: tinylm against Hugging Face ``tokenizers``' BpeTrainer, with
  its default parallelism (all cores) and on one thread (TOKENIZERS_PARALLELISM=false);
  the learned merges are compared too;
- encoding the whole corpus, single-threaded, with the vocabulary tinylm learned:
  tinylm (a fresh tokenizer, so its piece cache starts empty: "cold"; and the same
  tokenizer again: "warm") against tiktoken (``encode_ordinary``, built on the same
  ranks with its public constructor) and ``tokenizers`` (``encode``, built from tinylm's
  tokenizer.json); the ids are compared too;
- decoding the ids back to text, tinylm against tiktoken.

Each measurement is repeated ``--repeats`` times, the tools interleaved within each
repetition, and the table shows medians; ratios are tinylm's time over the peer's
(below 1: tinylm is faster). Timings on shared machines are noisy: compare ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# This file is named like the peer it measures: keep bench/ off the import path so
# that `import tokenizers` finds Hugging Face's package, not this script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from tinylm.tokenizers import BPETokenizer  # noqa: E402

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, help="a UTF-8 text file (default: tinyshakespeare "
                                               "if present, else Python's pydoc topics)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--pattern", default="gpt2", choices=["gpt2", "gpt4"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--markdown", action="store_true", help="print a RESULTS.md section")
    return p.parse_args(argv)


def corpus_path(args, tmp: Path) -> Path:
    if args.corpus:
        return args.corpus
    if SHAKESPEARE.exists():
        return SHAKESPEARE
    from tinylm.commands.tokenize import default_corpus

    path = tmp / "pydoc_topics.txt"
    path.write_text(default_corpus(), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- the peers


def hf_trainer_run(path: Path, vocab_size: int, pattern: str, parallel: bool):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    from tinylm.tokenizers.pretokenize import hf_pattern

    os.environ["TOKENIZERS_PARALLELISM"] = "true" if parallel else "false"
    hf = Tokenizer(models.BPE())
    if pattern == "gpt2":
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(hf_pattern(pattern)), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train([str(path)], trainer)
    return hf


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench(args) -> dict:
    import tempfile

    import tiktoken
    import tokenizers

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = corpus_path(args, Path(tmp))
        text = path.read_text(encoding="utf-8")
        nbytes = len(text.encode("utf-8"))
        results["corpus"] = (path.name, nbytes)

        # ---------------------------------------------------------------- training
        times = {"tinylm": [], "tokenizers": [], "tokenizers (1 thread)": []}
        for _ in range(args.repeats):
            t, ours = timed(lambda: BPETokenizer.train_from_files(
                [path], args.vocab_size, min_frequency=2, pattern=args.pattern))
            times["tinylm"].append(t)
            t, hf = timed(lambda: hf_trainer_run(path, args.vocab_size, args.pattern, True))
            times["tokenizers"].append(t)
            t, _ = timed(lambda: hf_trainer_run(path, args.vocab_size, args.pattern, False))
            times["tokenizers (1 thread)"].append(t)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # single-threaded from here on
        theirs = json.loads(hf.to_str())["model"]
        results["merges_identical"] = (ours.to_hf_dict()["model"]["merges"] == theirs["merges"]
                                       and ours.get_vocab() == theirs["vocab"])
        results["train"] = {k: statistics.median(v) for k, v in times.items()}
        results["n_merges"] = len(ours.merges)

        # ---------------------------------------------------------------- encoding
        enc = tiktoken.Encoding("bench", pat_str=ours.pattern,
                                mergeable_ranks=ours.to_tiktoken_ranks(), special_tokens={})
        hf_tok = tokenizers.Tokenizer.from_str(json.dumps(ours.to_hf_dict()))
        state = (ours._tokens, ours.merges, ours.special_tokens)
        times = {"tinylm (cold cache)": [], "tinylm (warm cache)": [], "tiktoken": [],
                 "tokenizers": []}
        same = True
        for _ in range(args.repeats):
            fresh = BPETokenizer(*state, pattern=ours.pattern)
            t, ids = timed(lambda: fresh.encode(text))
            times["tinylm (cold cache)"].append(t)
            t, ids_warm = timed(lambda: fresh.encode(text))
            times["tinylm (warm cache)"].append(t)
            t, ids_tt = timed(lambda: enc.encode_ordinary(text))
            times["tiktoken"].append(t)
            t, ids_hf = timed(lambda: hf_tok.encode(text).ids)
            times["tokenizers"].append(t)
            same = same and ids == ids_warm == ids_tt == ids_hf
        results["ids_identical"] = same
        results["n_ids"] = len(ids)
        results["encode"] = {k: statistics.median(v) for k, v in times.items()}

        # ---------------------------------------------------------------- decoding
        times = {"tinylm": [], "tiktoken": []}
        for _ in range(args.repeats):
            t, back = timed(lambda: ours.decode(ids))
            times["tinylm"].append(t)
            t, back_tt = timed(lambda: enc.decode(ids))
            times["tiktoken"].append(t)
            same = same and back == back_tt == text
        results["decode"] = {k: statistics.median(v) for k, v in times.items()}
        results["decode_identical"] = same
    results["versions"] = {"python": platform.python_version(),
                           "tokenizers": tokenizers.__version__,
                           "tiktoken": getattr(tiktoken, "__version__", "?")}
    return results


# --------------------------------------------------------------------------- report


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Linux" if sys.platform == "linux" else cpu


def report(args, r: dict) -> str:
    name, nbytes = r["corpus"]
    mb = nbytes / 1e6
    v = r["versions"]
    lines = [
        f"corpus: {name} ({nbytes:,} bytes); vocab {args.vocab_size} ({r['n_merges']} merges), "
        f"pattern {args.pattern}; medians of {args.repeats}",
        f"machine: {machine()}; Python {v['python']}, tokenizers {v['tokenizers']}, "
        f"tiktoken {v['tiktoken']}",
        "",
        "| training (vocab {}) | seconds | tinylm / peer |".format(args.vocab_size),
        "|---|---:|---:|",
    ]
    ours = r["train"]["tinylm"]
    for tool, t in r["train"].items():
        ratio = "" if tool == "tinylm" else f"{ours / t:.2f}x"
        lines.append(f"| {tool} | {t:.3f} | {ratio} |")
    lines.append(f"\nmerges and vocabulary identical to tokenizers': "
                 f"{'yes' if r['merges_identical'] else 'NO'}")
    lines += ["", "| encoding (1 thread) | seconds | MB/s | tinylm cold / peer | "
                  "tinylm warm / peer |", "|---|---:|---:|---:|---:|"]
    cold, warm = r["encode"]["tinylm (cold cache)"], r["encode"]["tinylm (warm cache)"]
    for tool, t in r["encode"].items():
        ratios = ("", "") if tool.startswith("tinylm") else (f"{cold / t:.2f}x", f"{warm / t:.2f}x")
        lines.append(f"| {tool} | {t:.3f} | {mb / t:.1f} | {ratios[0]} | {ratios[1]} |")
    lines.append(f"\nids identical ({r['n_ids']:,} tokens): "
                 f"{'yes' if r['ids_identical'] else 'NO'}")
    lines += ["", "| decoding | seconds | MB/s | tinylm / peer |", "|---|---:|---:|---:|"]
    ours_d = r["decode"]["tinylm"]
    for tool, t in r["decode"].items():
        ratio = "" if tool == "tinylm" else f"{ours_d / t:.2f}x"
        lines.append(f"| {tool} | {t:.4f} | {mb / t:.0f} | {ratio} |")
    train_ratio = ours / r["train"]["tokenizers"]
    enc_ratio = r["encode"]["tiktoken"] / cold
    lines += ["", "targets: training <= 2x tokenizers' time: "
                  f"{train_ratio:.2f}x ({'met' if train_ratio <= 2 else 'NOT met'}); "
                  f"encoding >= 0.5x tiktoken's throughput (cold cache): {enc_ratio:.2f}x "
                  f"({'met' if enc_ratio >= 0.5 else 'NOT met'})"]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    r = bench(args)
    text = report(args, r)
    if args.markdown:
        print(f"## Tokenizers ({time.strftime('%Y-%m-%d')})\n\n"
              f"`.venv/bin/python bench/tokenizers.py`\n\n{text}")
    else:
        print(text)


if __name__ == "__main__":
    main()

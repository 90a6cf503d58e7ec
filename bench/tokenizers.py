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
  tinylm (``encode_ordinary``, as for tiktoken; a fresh tokenizer, so its piece cache
  starts empty: "cold"; and the same tokenizer again: "warm") against tiktoken
  (``encode_ordinary``, built on the same ranks with its public constructor and the
  split pattern spelled as tiktoken itself ships it in ``tiktoken_ext/openai_public.py``:
  for GPT-2 the fast possessive ``r50k_pat_str``, same pieces, faster than the original
  spelling, which is timed too) and ``tokenizers`` (``encode``, built from tinylm's
  tokenizer.json); the ids are compared too;
- decoding the ids back to text, tinylm against tiktoken.

Each measurement is repeated ``--repeats`` times, the tools interleaved within each
repetition; the tables show the median and the min-max of the times, and each ratio
(tinylm's time over the peer's, below 1: tinylm is faster) is the ratio of the medians
with the min-max of the per-repetition ratios. Timings on shared machines are noisy.
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


def tiktoken_pattern(pattern: str) -> str:
    """The split pattern as tiktoken ships it (``tiktoken_ext/openai_public.py``): for
    GPT-2 its possessive ``r50k_pat_str`` (the same pieces as GPT-2's original spelling,
    faster in tiktoken's regex engine); for cl100k tinylm's GPT4_PATTERN, which is
    already that file's ``cl100k_base`` literal (read from there it would need the
    ranks download)."""
    from tiktoken_ext import openai_public

    from tinylm.tokenizers.pretokenize import resolve_pattern

    return openai_public.r50k_pat_str if pattern == "gpt2" else resolve_pattern(pattern)


def spread(values) -> tuple:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


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
        results["train"] = times
        results["n_merges"] = len(ours.merges)

        # ---------------------------------------------------------------- encoding
        ranks = ours.to_tiktoken_ranks()
        tt_pattern = tiktoken_pattern(args.pattern)
        enc = tiktoken.Encoding("bench", pat_str=tt_pattern,
                                mergeable_ranks=ranks, special_tokens={})
        # The original spelling too, where tiktoken ships a faster one (same ids).
        enc_orig = (tiktoken.Encoding("bench-orig", pat_str=ours.pattern,
                                      mergeable_ranks=ranks, special_tokens={})
                    if tt_pattern != ours.pattern else None)
        hf_tok = tokenizers.Tokenizer.from_str(json.dumps(ours.to_hf_dict()))
        state = (ours._tokens, ours.merges, ours.special_tokens)
        times = {"tinylm (cold cache)": [], "tinylm (warm cache)": [], "tiktoken": []}
        if enc_orig is not None:
            times["tiktoken (original pattern)"] = []
        times["tokenizers"] = []
        same = True
        for _ in range(args.repeats):
            fresh = BPETokenizer(*state, pattern=ours.pattern)
            t, ids = timed(lambda: fresh.encode_ordinary(text))
            times["tinylm (cold cache)"].append(t)
            t, ids_warm = timed(lambda: fresh.encode_ordinary(text))
            times["tinylm (warm cache)"].append(t)
            t, ids_tt = timed(lambda: enc.encode_ordinary(text))
            times["tiktoken"].append(t)
            if enc_orig is not None:
                t, ids_orig = timed(lambda: enc_orig.encode_ordinary(text))
                times["tiktoken (original pattern)"].append(t)
                same = same and ids_orig == ids_tt
            t, ids_hf = timed(lambda: hf_tok.encode(text).ids)
            times["tokenizers"].append(t)
            same = same and ids == ids_warm == ids_tt == ids_hf
        results["tiktoken_pattern"] = tt_pattern
        results["ids_identical"] = same
        results["n_ids"] = len(ids)
        results["encode"] = times

        # ---------------------------------------------------------------- decoding
        times = {"tinylm": [], "tiktoken": []}
        for _ in range(args.repeats):
            t, back = timed(lambda: ours.decode(ids))
            times["tinylm"].append(t)
            t, back_tt = timed(lambda: enc.decode(ids))
            times["tiktoken"].append(t)
            same = same and back == back_tt == text
        results["decode"] = times
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


def _ratio(ours: list, peer: list) -> str:
    """Median of tinylm's times over the peer's median, (min-max of the per-repetition
    ratios: the tools are interleaved, so repetition k of each ran side by side)."""
    per = [a / b for a, b in zip(ours, peer)]
    return (f"{statistics.median(ours) / statistics.median(peer):.2f}x "
            f"({min(per):.2f}-{max(per):.2f})")


def _times(values: list, digits: int = 3) -> str:
    med, lo, hi = spread(values)
    return f"{med:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def report(args, r: dict) -> str:
    name, nbytes = r["corpus"]
    mb = nbytes / 1e6
    v = r["versions"]
    lines = [
        f"corpus: {name} ({nbytes:,} bytes); vocab {args.vocab_size} ({r['n_merges']} merges), "
        f"pattern {args.pattern}; {args.repeats} interleaved repetitions: median (min-max)",
        f"machine: {machine()}; Python {v['python']}, tokenizers {v['tokenizers']}, "
        f"tiktoken {v['tiktoken']}",
        f"tiktoken's pattern: `{r['tiktoken_pattern']}`",
        "",
        "| training (vocab {}) | seconds | tinylm / peer |".format(args.vocab_size),
        "|---|---:|---:|",
    ]
    ours = r["train"]["tinylm"]
    for tool, t in r["train"].items():
        ratio = "" if tool == "tinylm" else _ratio(ours, t)
        lines.append(f"| {tool} | {_times(t)} | {ratio} |")
    lines.append(f"\nmerges and vocabulary identical to tokenizers': "
                 f"{'yes' if r['merges_identical'] else 'NO'}")
    lines += ["", "| encoding (1 thread) | seconds | MB/s | tinylm cold / peer | "
                  "tinylm warm / peer |", "|---|---:|---:|---:|---:|"]
    cold, warm = r["encode"]["tinylm (cold cache)"], r["encode"]["tinylm (warm cache)"]
    for tool, t in r["encode"].items():
        ratios = ("", "") if tool.startswith("tinylm") else (_ratio(cold, t), _ratio(warm, t))
        lines.append(f"| {tool} | {_times(t)} | {mb / statistics.median(t):.1f} | "
                     f"{ratios[0]} | {ratios[1]} |")
    lines.append(f"\nids identical, tinylm = tiktoken = tokenizers ({r['n_ids']:,} tokens): "
                 f"{'yes' if r['ids_identical'] else 'NO'}")
    lines += ["", "| decoding | seconds | MB/s | tinylm / peer |", "|---|---:|---:|---:|"]
    ours_d = r["decode"]["tinylm"]
    for tool, t in r["decode"].items():
        ratio = "" if tool == "tinylm" else _ratio(ours_d, t)
        lines.append(f"| {tool} | {_times(t, 4)} | {mb / statistics.median(t):.0f} | {ratio} |")
    med = statistics.median
    train_ratio = med(ours) / med(r["train"]["tokenizers"])
    enc_ratio = med(r["encode"]["tiktoken"]) / med(cold)
    per = [b / a for a, b in zip(cold, r["encode"]["tiktoken"])]
    lines += ["", "targets: training <= 2x tokenizers' time: "
                  f"{train_ratio:.2f}x ({'met' if train_ratio <= 2 else 'NOT met'}); "
                  f"encoding >= 0.5x tiktoken's throughput (cold cache): {enc_ratio:.2f}x "
                  f"({min(per):.2f}-{max(per):.2f}) ({'met' if enc_ratio >= 0.5 else 'NOT met'})"]
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

"""Unigram tokenizer benchmark (plugins/tinylm-unigram, issue 18): training time,
encoded length and encode throughput, tinylm-unigram against `sentencepiece`.

    .venv/bin/python bench/unigram.py                  # tinyshakespeare, vocab 1000 and 8000
    .venv/bin/python bench/unigram.py --quick          # smoke size: the 50 KB head, vocab 1000
    .venv/bin/python bench/unigram.py --markdown       # the table as a RESULTS.md section

One run, on one corpus (default: ../shared/data/tinyshakespeare.txt, else the repo's
tests/data/tinyshakespeare_head.txt), split into its first 90% of lines (training) and
the rest (held out):

- training a Unigram model of each ``--vocab-size`` with default settings: tinylm
  (``UnigramTokenizer.train``; its normalisation rules are built once per process,
  measured apart as "rules") against ``SentencePieceTrainer.train`` with
  ``num_threads=1`` and with 2 threads (the cores here);
- the held-out text's encoded length, in tokens, under each trained vocabulary (the
  trainer's quality: tinylm / sentencepiece, 1.0 = equal);
- encoding the held-out lines one call per line, and the held-out text as one
  string, with sentencepiece's model: tinylm (``from_spm``) against
  ``SentencePieceProcessor.encode``; the ids are compared (line by line they must be
  equal; the held-out text as one string is ~110,000 characters, past the length
  where float32 near-ties can fall differently: see the plugin's README).

Each training time is the median of ``--repeats`` runs, tinylm, sentencepiece with 1
and with 2 threads taking turns in every round; wall and CPU time (of this process:
tinylm and sentencepiece's trainer both run in it, on one thread) are both reported.
Shared machines are noisy: compare ratios (CPU time is the steadier one under load),
and see the load average printed with the table. ``--train-only`` skips the encoding
measurements (the training comparison, about a minute on an idle 2-core machine).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "plugins" / "tinylm-unigram" / "src"))
SHARED = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
HEAD = ROOT / "tests" / "data" / "tinyshakespeare_head.txt"


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def interleaved(fns: dict, repeats: int) -> tuple:
    """Each of ``fns`` run once per round, in turn, ``repeats`` rounds: ``(median wall
    s, median CPU s (this process), last result)`` per name. Interleaving spreads a
    shared machine's load over all of them alike; CPU time (one thread each) is the
    less noisy measure there."""
    runs = {name: ([], [], None) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            result = fn()
            walls, cpus, _ = runs[name]
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
            runs[name] = (walls, cpus, result)
    return {name: (statistics.median(w), statistics.median(c), r) for name, (w, c, r) in runs.items()}


def train_spm(corpus: Path, prefix: Path, vocab: int, threads: int):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(prefix), vocab_size=vocab,
                                   model_type="unigram", num_threads=threads, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=f"{prefix}.model")


def measure(lines, vocab: int, repeats: int, folder: Path, train_only=False) -> dict:
    from tinylm_unigram import UnigramTokenizer

    cut = int(len(lines) * 0.9)
    train, held = lines[:cut], lines[cut:]
    corpus = folder / "train.txt"
    corpus.write_text("\n".join(train), encoding="utf-8")
    row = {"vocab": vocab, "train_chars": len("\n".join(train)), "held_chars": len("\n".join(held))}
    runs = interleaved({
        "tinylm": lambda: UnigramTokenizer.train(train, vocab),
        "spm_1": lambda: train_spm(corpus, folder / f"s{vocab}", vocab, 1),
        "spm_2": lambda: train_spm(corpus, folder / f"t{vocab}", vocab, 2),
    }, repeats)
    row["tinylm_train"], row["tinylm_train_cpu"], ours = runs["tinylm"]
    row["spm_train_1"], row["spm_train_1_cpu"], sp = runs["spm_1"]
    row["spm_train_2"], _, _ = runs["spm_2"]
    row["tinylm_tokens"] = sum(len(ours.encode(t, disallowed_special=())) for t in held)
    row["spm_tokens"] = sum(len(ids) for ids in sp.encode(held))
    if train_only:
        return row
    tok = UnigramTokenizer.from_spm(folder / f"s{vocab}.model")
    whole = "\n".join(held)
    # both sides one call over the list, on one thread (sentencepiece's list encode
    # otherwise spreads the lines over a thread pool)
    row["tinylm_lines"], mine = timed(lambda: tok.encode_batch(held, disallowed_special=()),
                                      repeats)
    row["spm_lines"], ref = timed(lambda: sp.encode(held, num_threads=1), repeats)
    row["tinylm_text"], mine_text = timed(lambda: tok.encode(whole, disallowed_special=()), repeats)
    row["spm_text"], ref_text = timed(lambda: sp.encode(whole), repeats)
    row["ids_equal"] = (mine == ref, mine_text == ref_text)
    return row


def table(rows, rules_time: float, markdown: bool, repeats: int) -> str:
    out = []
    if markdown:
        out.append("## CPU: Unigram plugin (issue 18), tinylm-unigram vs sentencepiece\n")
    out.append(f"load average: {os.getloadavg()[0]:.2f}; medians of {repeats} interleaved runs; "
               f"tinylm's normalisation rules (built once per process): {rules_time:.2f} s\n")
    out.append("| vocab | train wall: tinylm | spm 1 thread | spm 2 threads | tinylm / spm(1) wall "
               "| train CPU: tinylm, spm(1) | tinylm / spm(1) CPU "
               "| held-out tokens tinylm / spm | encode lines: tinylm, spm (MB/s) "
               "| encode one text: tinylm, spm (MB/s) | ids equal: lines, one text |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mb = r["held_chars"] / 1e6
        encode = ("| - | - | - |" if "tinylm_lines" not in r else
                  f"| {mb / r['tinylm_lines']:.2f}, {mb / r['spm_lines']:.1f} | "
                  f"{mb / r['tinylm_text']:.2f}, {mb / r['spm_text']:.1f} | "
                  f"{r['ids_equal'][0]}, {r['ids_equal'][1]} |")
        out.append(
            f"| {r['vocab']} | {r['tinylm_train']:.2f} s | {r['spm_train_1']:.2f} s | "
            f"{r['spm_train_2']:.2f} s | {r['tinylm_train'] / r['spm_train_1']:.2f}x | "
            f"{r['tinylm_train_cpu']:.2f} s, {r['spm_train_1_cpu']:.2f} s | "
            f"{r['tinylm_train_cpu'] / r['spm_train_1_cpu']:.2f}x | "
            f"{r['tinylm_tokens']} / {r['spm_tokens']} = "
            f"{r['tinylm_tokens'] / r['spm_tokens']:.4f} " + encode)
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path)
    ap.add_argument("--vocab-size", type=int, action="append")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="the 50 KB head, vocab 1000, 1 repeat")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--train-only", action="store_true",
                    help="the training comparison (and held-out lengths) only, no encoding")
    args = ap.parse_args(argv)
    corpus = args.corpus or (HEAD if args.quick or not SHARED.exists() else SHARED)
    vocabs = args.vocab_size or ([1000] if args.quick else [1000, 8000])
    repeats = 1 if args.quick else args.repeats
    lines = corpus.read_text(encoding="utf-8").split("\n")
    from tinylm_unigram import rules

    t = time.perf_counter()
    rules.charsmap_blob("nmt_nfkc")
    rules_time = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(lines, v, repeats, Path(tmp), args.train_only) for v in vocabs]
    print(f"corpus: {corpus} ({len(lines)} lines)")
    print(table(rows, rules_time, args.markdown, repeats))


if __name__ == "__main__":
    main()

"""Evaluation benchmark: multiple-choice documents/s and perplexity tokens/s, tinylm vs the peers.

    .venv/bin/python bench/eval.py                    # GPT-2 small shape (124M), CPU
    .venv/bin/python bench/eval.py --device cuda      # tinylm on CuPy, torch on CUDA
    .venv/bin/python bench/eval.py --quick            # a small model, smoke test (< 1 min)
    .venv/bin/python bench/eval.py --docs 200 --shots 2 --out bench/results/eval.json

Model: GPT-2 small's shape (12 layers, d=768, 12 heads, vocab 50257, 1024 positions),
random weights, float32, written once as a Hugging Face folder that both sides load;
its tokenizer is a byte-level BPE of ``--tok-vocab`` tokens trained on the Shakespeare
text (``../shared/data`` or the tests' slice), so the documents are real text and the
vocabulary projection is GPT-2's full 50257 rows.

Multiple choice: a HellaSwag-shaped task generated from the text (``--docs`` documents,
a context of ``--ctx-words`` words, 4 endings of ``--ending-words`` words: the true
continuation and three from elsewhere), in lm-eval's YAML format on local JSONL files,
``--shots`` few-shot examples from a train split. Rows:

- tinylm: ``tinylm.evaluation.harness.evaluate_mc`` (prompts, encoding, shared-context
  KV cache, metrics), ``--batch-size`` requests per forward.
- lm-eval + transformers: ``lm_eval.simple_evaluate`` with its HFLM (``--model hf``) on
  the same folder and task, ``--batch-size`` the same, ``log_samples=True``,
  ``bootstrap_iters=0``; its environment report (a pip freeze in a subprocess) is left
  out of the timing. Documents/s = documents / wall time of the whole evaluation (task
  building and tokenization included on both sides).

The two must agree: the table gives the largest per-choice log-likelihood difference
and whether acc / acc_norm are identical. Target: tinylm at least 1.5x lm-eval's
documents/s (its contexts run once per document, lm-eval's once per choice).

Perplexity: Hugging Face's strided recipe (``--ppl-length`` 1024, ``--stride`` 512) over
``--ppl-tokens`` tokens of the text: ``tinylm.evaluation.perplexity.strided_perplexity``
against the transformers docs' loop on the same model; tokens/s = scored tokens / wall
time; the perplexities are compared.

Each timed run is repeated ``--reps`` times (median) after a ``--settle`` pause.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import cpu_model, peak_rss_mib  # noqa: E402

# bench/tokenizers.py (a bench script) would shadow the `tokenizers` package that
# transformers imports: take this folder off the path once _common is imported.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

FULL_TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
SLICE_TEXT = ROOT / "tests" / "data" / "tinyshakespeare_head.txt"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a 2-layer d=64 model, few docs")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--docs", type=int, default=None, help="[100; quick 6]")
    p.add_argument("--shots", type=int, default=0)
    p.add_argument("--ctx-words", type=int, default=40)
    p.add_argument("--ending-words", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--tok-vocab", type=int, default=None, help="[2048; quick 300]")
    p.add_argument("--ppl-tokens", type=int, default=None, help="[8192; quick 300]")
    p.add_argument("--ppl-length", type=int, default=None, help="[1024; quick 64]")
    p.add_argument("--stride", type=int, default=None, help="[ppl-length / 2]")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--settle", type=float, default=0.2, metavar="SECONDS")
    p.add_argument("--threads", type=int,
                   help="set numpy's BLAS threads (threadpoolctl) and torch's to N")
    p.add_argument("--workdir", default=None, help="where the model and task go [a temp dir]")
    p.add_argument("--skip-peers", action="store_true", help="time tinylm only")
    p.add_argument("--out", default=None, help="write the results here as JSON")
    args = p.parse_args(argv)
    q = args.quick
    args.docs = args.docs or (6 if q else 100)
    args.tok_vocab = args.tok_vocab or (300 if q else 2048)
    args.ppl_tokens = args.ppl_tokens or (300 if q else 8192)
    args.ppl_length = args.ppl_length or (64 if q else 1024)
    args.stride = args.stride or args.ppl_length // 2
    if q:
        args.reps = min(args.reps, 1)
    return args


def timed(fn, reps, settle):
    times, out = [], None
    for _ in range(reps):
        if settle:
            time.sleep(settle)
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


# --------------------------------------------------------------------------- set-up


def corpus() -> str:
    return (FULL_TEXT if FULL_TEXT.exists() else SLICE_TEXT).read_text(encoding="utf-8")


def write_model(folder: Path, args, text: str):
    """A random GPT-2 (small shape, or tiny with --quick) and its BPE, as a HF folder."""
    import tinylm
    from tinylm.models import Decoder, GPT2Config
    from tinylm.tokenizers.bpe import BPETokenizer

    tok = BPETokenizer.train([text[:300_000]], args.tok_vocab, special_tokens=["<|endoftext|>"])
    shape = (dict(vocab_size=512, d_model=64, n_layer=2, n_head=4, max_positions=128)
             if args.quick else dict(vocab_size=50257, d_model=768, n_layer=12, n_head=12,
                                     max_positions=1024))
    shape["vocab_size"] = max(shape["vocab_size"], len(tok))
    tinylm.seed(0)
    Decoder(GPT2Config(**shape)).save_pretrained(folder)
    tok.save(folder / "tokenizer.json")
    return shape


def write_task(folder: Path, args, text: str) -> str:
    """A HellaSwag-shaped lm-eval task on local files; returns its name."""
    rnd = random.Random(0)
    words = text.split()
    n_ctx, n_end = args.ctx_words, args.ending_words

    def doc():
        start = rnd.randrange(0, len(words) - n_ctx - n_end)
        ctx = " ".join(words[start: start + n_ctx])
        endings = [" ".join(words[start + n_ctx: start + n_ctx + n_end])]
        for _ in range(3):
            s = rnd.randrange(0, len(words) - n_end)
            endings.append(" ".join(words[s: s + n_end]))
        order = list(range(4))
        rnd.shuffle(order)
        return {"ctx": ctx, "endings": [endings[i] for i in order], "label": order.index(0)}

    for split, n in (("train", max(8, args.shots + 1)), ("test", args.docs)):
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(doc()) + "\n" for _ in range(n))
    (folder / "bench_mc.yaml").write_text(
        f"task: bench_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    train: {folder / 'train.jsonl'}\n    test: {folder / 'test.jsonl'}\n"
        f"training_split: train\ntest_split: test\noutput_type: multiple_choice\n"
        f"doc_to_text: \"{{{{ctx}}}}\"\ndoc_to_choice: endings\ndoc_to_target: label\n"
        f"metric_list:\n  - metric: acc\n  - metric: acc_norm\n", encoding="utf-8")
    return "bench_mc"


# --------------------------------------------------------------------------- the rows


def run_tinylm_mc(folder, args):
    from tinylm.evaluation.encoding import TextEncoder
    from tinylm.evaluation.harness import MCOptions, evaluate_mc
    from tinylm.evaluation.tasks import read_task
    from tinylm.loading import load_model

    model, tok = load_model(folder / "model", args.device)
    enc = TextEncoder.for_model(folder / "model", model, tok)

    def once():
        task = read_task(folder / "bench_mc.yaml")
        return evaluate_mc(model, enc, task, MCOptions(shots=args.shots,
                                                       batch_size=args.batch_size))

    once()  # warm-up (CuPy kernels, BLAS pools)
    return timed(once, args.reps, args.settle), (model, enc)


def run_lm_eval_mc(folder, name, args):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_CACHE", str(folder / "hf_cache"))
    import lm_eval
    import lm_eval.evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm_eval.evaluator.add_env_info = lambda results: None  # pip freeze: not evaluation
    lm = HFLM(pretrained=str(folder / "model"), dtype="float32", device=args.device,
              batch_size=args.batch_size)
    manager = TaskManager(include_path=str(folder), include_defaults=False)

    def once():
        return lm_eval.simple_evaluate(model=lm, tasks=[name], num_fewshot=args.shots,
                                       task_manager=manager, log_samples=True,
                                       bootstrap_iters=0)

    once()
    return timed(once, args.reps, args.settle), lm


def compare_mc(mine, theirs, name):
    ref = sorted(theirs["samples"][name], key=lambda s: s["doc_id"])
    diff = max(abs(a - float(r[0][0])) for m, s in zip(mine["samples"], ref)
               for a, r in zip(m["loglikelihoods"], s["resps"]))
    same = all((m["acc"], m["acc_norm"]) == (s["acc"], s["acc_norm"])
               for m, s in zip(mine["samples"], ref))
    return diff, same


def ppl_text_ids(enc, text, n):
    ids = enc.encode(text[: n * 8])
    return ids[:n]


def run_tinylm_ppl(model, enc, text, args):
    from tinylm.evaluation.perplexity import strided_perplexity

    ids = ppl_text_ids(enc, text, args.ppl_tokens)
    doc = enc.tokenizer.decode(ids)

    def once():
        return strided_perplexity(model, enc, [doc], args.ppl_length, args.stride,
                                  batch_size=4)

    once()
    return timed(once, args.reps, args.settle), doc


def run_hf_ppl(lm, doc, args):
    import torch

    model, tok = lm.model, lm.tokenizer
    input_ids = tok(doc, return_tensors="pt").input_ids.to(model.device)

    def once():
        seq_len = input_ids.size(1)
        nll_sum, n_tokens, prev_end = 0.0, 0, 0
        for begin in range(0, seq_len, args.stride):
            end = min(begin + args.ppl_length, seq_len)
            trg_len = end - prev_end
            ids = input_ids[:, begin:end]
            target = ids.clone()
            target[:, :-trg_len] = -100
            with torch.no_grad():
                loss = model(ids, labels=target).loss
            n_loss = (target != -100).sum().item() - target.size(0)
            nll_sum += loss * n_loss
            n_tokens += n_loss
            prev_end = end
            if end == seq_len:
                break
        return torch.exp(nll_sum / n_tokens).item(), n_tokens

    once()
    return timed(once, args.reps, args.settle)


# --------------------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads, user_api="blas")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tinylm_bench_eval_"))
    (work / "model").mkdir(parents=True, exist_ok=True)
    text = corpus()
    shape = write_model(work / "model", args, text)
    name = write_task(work, args, text)
    print(f"# {cpu_model()}, device {args.device}; model {shape}; {args.docs} docs x 4 "
          f"choices, {args.shots}-shot, batch {args.batch_size}; median of {args.reps}")
    results = {"device": args.device, "shape": shape, "docs": args.docs, "shots": args.shots,
               "batch_size": args.batch_size}
    (t_mine, mine), (model, enc) = run_tinylm_mc(work, args)
    results["tinylm_mc_docs_per_s"] = args.docs / t_mine
    (t_ppl, ppl), doc = run_tinylm_ppl(model, enc, text, args)
    results["tinylm_ppl_tokens_per_s"] = ppl.tokens / t_ppl
    results["tinylm_ppl"] = ppl.perplexity
    if not args.skip_peers:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        (t_theirs, theirs), lm = run_lm_eval_mc(work, name, args)
        diff, same = compare_mc(mine, theirs, name)
        results.update(lm_eval_mc_docs_per_s=args.docs / t_theirs, max_ll_diff=diff,
                       same_acc=same, mc_speedup=t_theirs / t_mine)
        t_hf, (hf_ppl, hf_tokens) = run_hf_ppl(lm, doc, args)
        results.update(hf_ppl_tokens_per_s=hf_tokens / t_hf, hf_ppl=hf_ppl,
                       ppl_speedup=(ppl.tokens / t_ppl) / (hf_tokens / t_hf))
    results["peak_rss_mib"] = peak_rss_mib()
    print_table(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


def _num(value, fmt):
    return "-" if value is None else format(value, fmt)


def print_table(r):
    print("| measurement | tinylm | peer | tinylm / peer |\n| --- | --- | --- | --- |")
    print(f"| multiple choice, docs/s (peer: lm-eval + transformers) | "
          f"{_num(r['tinylm_mc_docs_per_s'], '.2f')} | "
          f"{_num(r.get('lm_eval_mc_docs_per_s'), '.2f')} | "
          f"{_num(r.get('mc_speedup'), '.2f')}x |")
    print(f"| perplexity (strided), tokens/s (peer: transformers recipe) | "
          f"{_num(r['tinylm_ppl_tokens_per_s'], '.1f')} | "
          f"{_num(r.get('hf_ppl_tokens_per_s'), '.1f')} | "
          f"{_num(r.get('ppl_speedup'), '.2f')}x |")
    if "max_ll_diff" in r:
        print(f"agreement: max per-choice log-likelihood difference {r['max_ll_diff']:.2e}, "
              f"acc/acc_norm identical: {r['same_acc']}; perplexity {r['tinylm_ppl']:.6g} "
              f"vs {r['hf_ppl']:.6g}")
    print(f"peak RSS {r['peak_rss_mib']:.0f} MiB")


if __name__ == "__main__":
    main()

"""Generation benchmark: greedy tokens/s, tinylm (KV cache, full recompute) vs transformers.

    .venv/bin/python bench/generate.py                  # GPT-2 small shape (124M), the table
    .venv/bin/python bench/generate.py --quick          # a small model, smoke test (< 1 min)
    .venv/bin/python bench/generate.py --batch 1 --new-tokens 64

Model: GPT-2 small's shape (12 layers, d=768, 12 heads, vocab 50257, 1024 positions),
random weights, float32, on the CPU; a prompt of ``--prompt`` (128) random tokens per
row and ``--new-tokens`` (128) new tokens, greedy, for each ``--batch`` (1 and 8). Rows,
all in one process:

- tinylm, KV cache: ``tinylm.generate.generate(temperature=0)`` (prefill + one token per
  step). Tokens/s = batch x new tokens / wall time, prefill included.
- tinylm, full recompute: what decoding without a cache does, one full forward of the
  model over the whole growing sequence per new token (``model(ids)``, all positions'
  logits, argmax of the last). ``generate()`` has no switch to turn the cache off, so
  this is a loop of full forwards. It is slow, so it times only the first
  ``--recompute-tokens`` (default 8) new tokens, from the 128-token prompt: that
  flatters recompute (its later steps, over longer sequences, cost more).
- transformers + torch (CPU): ``GPT2LMHeadModel(GPT2Config())`` random init,
  ``generate(do_sample=False, max_new_tokens=N, min_new_tokens=N)`` with its KV cache,
  torch on the same number of threads as numpy's BLAS (``--threads``, or torch's default).
- speculative decoding (batch 1): ``speculative_greedy`` with a 2-layer draft of the same
  width, ``k`` = ``--spec-k`` (4), against plain cached greedy decoding of the same
  tokens. With random weights the draft rarely agrees with the target, so the
  acceptance rate is low and it is expected to be a slow-down; the row reports it.

Each timed run is preceded by a pause (``--settle``) so that the other side's thread
pool has gone to sleep (see bench/engine.py), and repeated ``--reps`` times (median).
Peak RSS is the process's peak (ru_maxrss) after the row: it only grows, so a row's
number includes every earlier row's; both models' weights are held all along.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import cpu_model, peak_rss_mib  # noqa: E402

# bench/tokenizers.py (a bench script) would shadow the `tokenizers` package that
# transformers imports: take this folder off the path once _common is imported.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from tinylm import backend  # noqa: E402
from tinylm.autograd import no_grad  # noqa: E402
from tinylm.generate import generate, speculative_greedy  # noqa: E402
from tinylm.models import build_model  # noqa: E402
from tinylm.models.config import GPT2Config  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt", type=int, default=128, help="prompt length in tokens")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--recompute-tokens", type=int, default=8,
                   help="new tokens timed for the full-recompute row (default 8)")
    p.add_argument("--spec-k", type=int, default=4, help="draft tokens per speculative step")
    p.add_argument("--spec-tokens", type=int,
                   help="new tokens for the speculative row (default: --new-tokens)")
    p.add_argument("--reps", type=int, default=1, help="timed repetitions (median)")
    p.add_argument("--settle", type=float, default=0.2, metavar="SECONDS")
    p.add_argument("--threads", type=int,
                   help="set numpy's BLAS threads (threadpoolctl) and torch's to N")
    p.add_argument("--no-torch", action="store_true", help="skip the transformers row")
    p.add_argument("--quick", action="store_true",
                   help="a small model (2 layers, d=128, vocab 1000) and 16+16 tokens")
    return p.parse_args(argv)


def configs(args):
    if args.quick:
        kw = dict(vocab_size=1000, d_model=128, n_layer=2, n_head=4, max_positions=256)
    else:
        kw = dict(vocab_size=50257, d_model=768, n_layer=12, n_head=12, max_positions=1024)
    target = GPT2Config(**kw)
    draft = GPT2Config(**{**kw, "n_layer": 1 if args.quick else 2})
    return target, draft


def timed(fn, reps, settle):
    times, out = [], None
    for _ in range(reps):
        if settle:
            time.sleep(settle)
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def recompute_greedy(model, prompts: np.ndarray, n_new: int):
    """Greedy decoding without a cache: a full forward over the whole sequence per token."""
    ids = prompts
    V = model.config.vocab_size
    was = model.training
    model.eval()
    try:
        with no_grad():
            for _ in range(n_new):
                logits = backend.to_numpy(model(ids).logits.data[:, -1, :V])
                ids = np.concatenate([ids, logits.argmax(-1)[:, None]], axis=1)
    finally:
        model.train(was)
    return ids[:, prompts.shape[1]:]


def main(argv=None):
    args = parse_args(argv)
    if args.quick:
        args.new_tokens = min(args.new_tokens, 16)
        args.prompt = min(args.prompt, 16)
        args.recompute_tokens = min(args.recompute_tokens, 8)
    if args.threads:
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads, user_api="blas")
    torch = None
    if not args.no_torch:
        import torch
        import transformers
        if args.threads:
            torch.set_num_threads(args.threads)
    N, P, R = args.new_tokens, args.prompt, min(args.recompute_tokens, args.new_tokens)
    S = args.spec_tokens or N
    tcfg, dcfg = configs(args)
    np.random.seed(0)
    model, draft = build_model(tcfg), build_model(dcfg)
    n_params = sum(p.data.size for p in {id(p): p for p in model.parameters()}.values())
    hf = None
    if torch is not None:
        torch.manual_seed(0)
        hcfg = transformers.GPT2Config(vocab_size=tcfg.vocab_size, n_embd=tcfg.d_model,
                                       n_layer=tcfg.n_layer, n_head=tcfg.n_head,
                                       n_positions=tcfg.max_positions,
                                       bos_token_id=tcfg.vocab_size - 1,
                                       eos_token_id=tcfg.vocab_size - 1)
        hf = transformers.GPT2LMHeadModel(hcfg).eval()

    print(f"# generation bench: {cpu_model()}, {os.cpu_count()} CPUs")
    print(f"# model: {tcfg.n_layer} layers, d={tcfg.d_model}, {tcfg.n_head} heads, vocab "
          f"{tcfg.vocab_size}, {n_params / 1e6:.1f}M params (tied head), float32, random "
          f"weights; prompt {P}, new {N} tokens, greedy; reps {args.reps} (median)")
    if torch is not None:
        print(f"# torch {torch.__version__} ({torch.get_num_threads()} threads), "
              f"transformers {transformers.__version__}")
    rng = np.random.default_rng(0)
    rows = []
    for B in args.batch:
        prompts = rng.integers(0, tcfg.vocab_size, size=(B, P))
        generate(model, prompts[:, :8].tolist(), 2, temperature=0)  # warm-up
        t_cache, out = timed(lambda: generate(model, prompts.tolist(), N, temperature=0),
                             args.reps, args.settle)
        assert all(len(t) == N for t in out.tokens)
        rows.append((B, "tinylm, KV cache", N, B * N / t_cache, t_cache, peak_rss_mib()))
        cached_first = np.array([t[:R] for t in out.tokens])
        t_rec, rec = timed(lambda: recompute_greedy(model, prompts, R), args.reps, args.settle)
        same = np.array_equal(rec, cached_first)
        rows.append((B, f"tinylm, full recompute ({R} new)", R, B * R / t_rec, t_rec,
                     peak_rss_mib()))
        t_hf = None
        if hf is not None:
            ids = torch.as_tensor(prompts)
            mask = torch.ones_like(ids)

            def run_hf():
                with torch.no_grad():
                    return hf.generate(ids, attention_mask=mask, do_sample=False,
                                       max_new_tokens=N, min_new_tokens=N, pad_token_id=0)
            with torch.no_grad():  # warm-up
                hf.generate(ids[:, :8], attention_mask=mask[:, :8], do_sample=False,
                            max_new_tokens=2, min_new_tokens=2, pad_token_id=0)
            t_hf, hout = timed(run_hf, args.reps, args.settle)
            assert hout.shape == (B, P + N)
            rows.append((B, "transformers + torch, KV cache", N, B * N / t_hf, t_hf,
                         peak_rss_mib()))
        tps = {name: tps for b, name, _, tps, _, _ in rows if b == B}
        print(f"batch {B}: cache/recompute {tps['tinylm, KV cache'] / (B * R / t_rec):.1f}x"
              + (f", tinylm/transformers {t_hf / t_cache:.2f}" if t_hf else "")
              + f"; recompute tokens == cached tokens: {same}", flush=True)

    print()
    print("| batch | run | new tokens | tokens/s | wall s | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for B, name, n, tps, t, rss in rows:
        print(f"| {B} | {name} | {n} | {tps:.1f} | {t:.2f} | {rss:.0f} |")
    print()
    for B in args.batch:
        tps = {name.split(" (")[0]: v for b, name, _, v, _, _ in rows if b == B}
        line = (f"batch {B}: KV cache / full recompute = "
                f"{tps['tinylm, KV cache'] / tps['tinylm, full recompute']:.1f}x")
        if "transformers + torch, KV cache" in tps:
            line += (f"; tinylm / transformers = "
                     f"{tps['tinylm, KV cache'] / tps['transformers + torch, KV cache']:.2f}")
        print(line)

    # speculative decoding, batch 1
    prompt = rng.integers(0, tcfg.vocab_size, size=P).tolist()
    t_plain, plain = timed(lambda: generate(model, [prompt], S, temperature=0),
                           args.reps, args.settle)
    t_spec, spec = timed(lambda: speculative_greedy(model, draft, prompt, S, k=args.spec_k),
                         args.reps, args.settle)
    rate = spec.accepted / max(spec.proposed, 1)
    print(f"speculative (batch 1, {S} new, draft {dcfg.n_layer} layers d={dcfg.d_model}, "
          f"k={args.spec_k}): plain {S / t_plain:.1f} tok/s, speculative {S / t_spec:.1f} "
          f"tok/s, speed-up {t_plain / t_spec:.2f}x; acceptance {spec.accepted}/"
          f"{spec.proposed} = {rate:.1%}; same tokens as plain greedy: "
          f"{spec.tokens == plain.tokens[0]}")
    print(f"peak RSS {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()

"""Quantization benchmark: perplexity, size and speed of tinylm's weight formats.

    .venv/bin/python bench/quant.py                       # everything, one table per part
    .venv/bin/python bench/quant.py --skip speed          # perplexity and size only
    .venv/bin/python bench/quant.py --skip shakespeare,smollm2 --decode 16   # speed only

Parts (``--skip`` any of them, comma-separated):

- ``shakespeare``: a GPT-2-family model with a byte-level BPE (vocab 1024), 4 layers x
  128, block 128, trained here by ``tinylm train`` on ../shared/data/tinyshakespeare.txt
  (first 90% of the tokens; cached in ``--run-dir``, so a rerun reuses it). Perplexity
  on the held-out last 10% (every token scored once, strided windows of the block size)
  for float32 and each scheme, and each model's size and bits per weight.
- ``smollm2``: SmolLM2-135M-Instruct from its Q4_1 GGUF file, dequantized to float32
  (the baseline), then requantized from that float to each scheme; perplexity on
  Python's ``pydoc_data.topics`` text (English technical prose the model was not
  trained on; its first ``--smollm2-tokens`` tokens), strided windows of ``--window``
  (512) moving by ``--stride`` (256).
- ``llamacpp-ppl``: the same SmolLM2 perplexity in llama.cpp, on files its own quantizer
  requantized from the Q4_1 file (float32 q8_0 q4_0 q4_1 of ``--schemes``): what the
  requantization costs in llama.cpp, as a cross-check of tinylm's numbers.
- ``speed``: SmolLM2 prefill tokens/s (``--prefill`` 128 tokens, one forward with a KV
  cache), decode tokens/s (``--decode`` 64 greedy tokens, one forward each) and peak
  RSS, each configuration in its own process (so its RSS is its own), one thread
  (OMP/OPENBLAS/MKL_NUM_THREADS=1 and ``blas_threads(1)``; llama.cpp ``n_threads=1``):
  tinylm packed Q4_1 (the file's own tensors), tinylm dequantized float32, llama.cpp on
  that file; tinylm packed Q8_0 and llama.cpp on a Q8_0 file tinylm exports
  (``export_gguf``). ``--profile`` prints cProfile's top functions of tinylm's decode.

Schemes: ``--schemes`` (float32 int8 q8_0 q4_0 q4_1 nf4 q4_0-linear), quantized by
``tinylm.quant.model.quantize`` with its defaults (the GGUF schemes also quantize the
token embedding and the tied head; int8 and nf4 the Linear layers only; a ``-linear``
suffix: the Linear layers only, for any scheme). The quantized models compute from
their packed weights (``--fake-quant``: dequantize them first, the same weights in
float32, faster). Results: a table per part on stdout and
``--out`` (bench/results/quant.json). Time the speed part on a quiet machine: it runs
one configuration at a time, but anything else running shares the cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import cpu_model, peak_rss_mib  # noqa: E402

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
RESULTS = ROOT / "bench" / "results"
CACHE = Path(os.environ.get("TINYLM_TEST_CACHE") or Path.home() / ".cache" / "tinylm")
SMOLLM2 = CACHE / "downloads" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SCHEMES = ("float32", "int8", "q8_0", "q4_0", "q4_1", "nf4", "q4_0-linear")
PARTS = ("shakespeare", "smollm2", "llamacpp-ppl", "speed")
THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TRAIN_ARGS = ["--family", "gpt", "--tokenizer", "bpe", "--vocab-size", "1024", "--n-layer", "4",
              "--n-head", "4", "--d-model", "128", "--block-size", "128", "--batch-size", "16",
              "--max-steps", "2000", "--lr", "1e-3", "--min-lr", "1e-4", "--warmup-steps",
              "100", "--eval-every", "500", "--eval-iters", "50", "--sample-tokens", "0",
              "--val-fraction", "0.1", "--seed", "1337", "--threads", "1"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip", default="", help=f"parts to leave out, comma-separated: "
                   f"{', '.join(PARTS)}")
    p.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated")
    p.add_argument("--data", default=str(DATA), help="tinyshakespeare.txt")
    p.add_argument("--run-dir", default=str(CACHE / "bench" / "quant-shakespeare-bpe"),
                   help="where the Shakespeare model is trained (reused when it is there)")
    p.add_argument("--gguf", default=str(SMOLLM2), help="the SmolLM2 Q4_1 file")
    p.add_argument("--smollm2-tokens", type=int, default=4096,
                   help="SmolLM2 perplexity: the first N tokens of the text")
    p.add_argument("--window", type=int, default=512, help="SmolLM2 perplexity window")
    p.add_argument("--stride", type=int, default=256, help="SmolLM2 perplexity stride")
    p.add_argument("--fake-quant", action="store_true",
                   help="perplexity with the quantized weights dequantized (faster)")
    p.add_argument("--prefill", type=int, default=128, help="speed: prompt tokens")
    p.add_argument("--decode", type=int, default=64, help="speed: greedy tokens decoded")
    p.add_argument("--reps", type=int, default=3, help="prefill repetitions (median)")
    p.add_argument("--profile", action="store_true", help="cProfile tinylm's decode")
    p.add_argument("--out", default=str(RESULTS / "quant.json"),
                   help="JSON results (the parts run now replace theirs; others are kept)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # one speed configuration (internal)
    args = p.parse_args(argv)
    args.skip = {s for s in args.skip.split(",") if s}
    unknown = args.skip - set(PARTS)
    if unknown:
        p.error(f"unknown part(s) {sorted(unknown)}; the parts are {', '.join(PARTS)}")
    args.schemes = [s for s in args.schemes.split(",") if s]
    return args


# --------------------------------------------------------------------------- models


def train_shakespeare(run_dir: str, data: str) -> dict:
    """The cached Shakespeare run (trained with `tinylm train` when it is not there)."""
    done = os.path.join(run_dir, "model.safetensors")
    if not os.path.exists(done):
        print(f"training the Shakespeare BPE model into {run_dir} (a few minutes)",
              file=sys.stderr)
        tinylm = [sys.executable, "-c", "from tinylm.cli import main; main()"]
        subprocess.run(tinylm + ["train", "--data", data, "-o", run_dir, *TRAIN_ARGS],
                       check=True, env={**os.environ, **THREAD_ENV})
    from tinylm.train import read_metrics

    evals = [m for m in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if "val_loss" in m]
    return {"run_dir": run_dir, "train_args": TRAIN_ARGS, "val_loss": evals[-1]["val_loss"],
            "steps": evals[-1].get("step")}


def load_smollm2(path: str, dequantize: bool = True):
    """(model, tokenizer) of the GGUF file: float32 weights, or the file's packed ones."""
    from tinylm.formats.gguf_model import load_gguf

    out = load_gguf(path, dequantize=dequantize)
    return out if isinstance(out, tuple) else (out, None)


def quantized(model, scheme: str):
    """``model`` (float32) quantized in place to ``scheme`` ("float32": as it is; a
    "-linear" suffix: the Linear layers only, the embedding and tied head left float)."""
    if scheme == "float32":
        return model
    import warnings

    from tinylm.quant.model import quantize

    name, linear_only = scheme.removesuffix("-linear"), scheme.endswith("-linear")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize(model, name, embeddings=False if linear_only else None)
    for w in caught:
        print(f"  {scheme}: {w.message}", file=sys.stderr)
    return model


def model_size(model) -> dict:
    """Bytes held (parameters and buffers, each array once), and bits per weight of the
    quantized layers' packed weights and of the whole model."""
    from tinylm.quant.layers import QuantEmbedding, QuantLinear

    arrays = {}
    for _, p in model.named_parameters():
        arrays[id(p)] = p.data.nbytes
    for _, b in model.named_buffers():
        arrays[id(b)] = b.nbytes
    q_bytes = q_weights = 0
    for _, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)):
            q_bytes += m.packed_nbytes
            q_weights += math.prod(m.weight_shape)
    floats = sum(p.data.size for _, p in model.named_parameters())
    total = sum(arrays.values())
    return {"bytes": total, "weights": floats + q_weights,
            "bpw_model": 8 * total / (floats + q_weights),
            "bpw_quantized": 8 * q_bytes / q_weights if q_weights else 32.0,
            "quantized_weights": q_weights}


def windows(n: int, window: int, stride: int) -> list:
    """(start, first scored target) of strided windows over ``n`` tokens: each target
    (token 1 .. n-1) is scored once, in the first window that reaches it, with as much
    context before it as that window has (Hugging Face's perplexity recipe; the last
    window ends at the last token)."""
    starts = list(range(0, max(n - 1 - window, 0) + 1, stride))
    if starts[-1] + window < n - 1:
        starts.append(n - 1 - window)
    out, done = [], 0          # done: targets [0, done) of the shifted sequence scored
    for s in starts:
        out.append((s, max(done, s)))
        done = s + window
    return out


def nll_sum(logits_of, ids: np.ndarray, window: int, stride: int, vocab: int) -> tuple:
    """(summed negative log-likelihood in nats, tokens scored) of ``ids`` (1-D);
    ``logits_of(x)``: (b, W) ids -> (b, W, vocab) logits. A few windows per call (about
    20M logits at a time)."""
    window = min(window, len(ids) - 1)
    batch = max(1, min(16, 20_000_000 // (window * vocab)))
    spans = windows(len(ids), window, stride)
    x = np.stack([ids[s:s + window] for s, _ in spans])                  # (K, W)
    y = np.stack([ids[s + 1:s + 1 + window] for s, _ in spans])          # (K, W)
    keep = np.arange(window)[None, :] >= np.array([f - s for s, f in spans])[:, None]
    total = 0.0
    for i in range(0, len(x), batch):
        logits = np.asarray(logits_of(x[i:i + batch]), np.float64)       # (b, W, V)
        top = logits.max(axis=-1, keepdims=True)
        lse = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]    # (b, W)
        picked = np.take_along_axis(logits, y[i:i + batch, :, None], -1)[..., 0]
        total += float(((lse - picked) * keep[i:i + batch]).sum())
    return total, int(keep.sum())


def model_nll(model, ids, window: int, stride: int) -> tuple:
    from tinylm.generate import inference

    with inference(model):
        return nll_sum(lambda x: model(x).logits.numpy(), ids, window, stride,
                       model.config.vocab_size)


def perplexity_rows(fresh, ids, args, window: int, stride: int, label: str) -> list:
    """One row per scheme: perplexity of a fresh float model quantized to it, and its size."""
    from tqdm import tqdm

    rows, base = [], None
    for scheme in tqdm(args.schemes, desc=f"{label} perplexity", unit="scheme", file=sys.stderr):
        model = fresh()
        t = time.perf_counter()
        model = quantized(model, scheme)
        size = model_size(model)
        if args.fake_quant and scheme != "float32":
            from tinylm.quant.model import dequantize_model

            dequantize_model(model)
        nll, n = model_nll(model, ids, window, stride)
        ppl = math.exp(nll / n)
        base = ppl if scheme == "float32" else base
        rows.append({"scheme": scheme, "ppl": ppl, "tokens": n, "seconds": time.perf_counter() - t,
                     "delta_pct": None if base is None else 100 * (ppl / base - 1), **size})
    return rows


def shakespeare_part(args) -> dict:
    from tinylm.loading import load_model

    run = train_shakespeare(args.run_dir, args.data)
    _, tokenizer = load_model(args.run_dir)
    ids = np.asarray(tokenizer.encode(Path(args.data).read_text(encoding="utf-8"),
                                      disallowed_special=()), np.int64)
    held = ids[int(len(ids) * 0.9):]                       # the split tinylm train made
    block = load_model(args.run_dir)[0].config.max_positions
    rows = perplexity_rows(lambda: load_model(args.run_dir)[0], held, args, block, block // 2,
                           "shakespeare")
    return {"model": run, "heldout_tokens": int(len(held)), "window": block,
            "stride": block // 2, "rows": rows}


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def smollm2_part(args) -> dict:
    _, tokenizer = load_smollm2(args.gguf, dequantize=False)
    ids = np.asarray(tokenizer.encode(pydoc_text(), disallowed_special=()), np.int64)
    ids = ids[:args.smollm2_tokens]
    rows = perplexity_rows(lambda: load_smollm2(args.gguf)[0], ids, args, args.window,
                           args.stride, "smollm2")
    return {"file": args.gguf, "text": "pydoc_data.topics (sorted keys, joined by blank lines)",
            "tokens": int(len(ids)), "window": args.window, "stride": args.stride,
            "fake_quant": args.fake_quant, "rows": rows}


LLAMA_FTYPES = {"float32": 0, "q8_0": 7, "q4_0": 2, "q4_1": 3}   # llama_ftype


def llamacpp_requantized(src: str, scheme: str) -> str:
    """SmolLM2 requantized by llama.cpp's own quantizer (allow_requantize: dequantize,
    then quantize with its per-tensor rules), cached."""
    import ctypes

    import llama_cpp

    path = CACHE / "bench" / f"SmolLM2-135M-Instruct.{scheme}-llamacpp-from-q4_1.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize, params.nthread = LLAMA_FTYPES[scheme], True, 1
        tmp = str(path) + ".part"
        if llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(params)):
            raise RuntimeError(f"llama.cpp could not quantize {src} to {scheme}")
        os.replace(tmp, path)
    return str(path)


def llamacpp_part(args) -> dict:
    """The same perplexity in llama.cpp, on files its own quantizer requantized: tells
    what the requantization costs apart from tinylm's arithmetic."""
    import collections

    import llama_cpp

    from tinylm.formats.gguf import read_gguf

    _, tokenizer = load_smollm2(args.gguf, dequantize=False)
    ids = np.asarray(tokenizer.encode(pydoc_text(), disallowed_special=()), np.int64)
    ids, window, rows = ids[:args.smollm2_tokens], min(args.window, args.smollm2_tokens - 1), []
    for scheme in [s for s in args.schemes if s in LLAMA_FTYPES]:
        path = llamacpp_requantized(args.gguf, scheme)
        llm = llama_cpp.Llama(model_path=path, n_ctx=window, n_batch=window, n_ubatch=window,
                              n_threads=2, logits_all=True, verbose=False)

        def logits_of(x):
            out = []
            for row in x:
                llm.reset()
                llm.eval(row.tolist())
                out.append(np.array(llm.scores[:len(row)]))
            return np.stack(out)

        nll, n = nll_sum(logits_of, ids, window, args.stride, llm.n_vocab())
        types = collections.Counter(t.type for t in read_gguf(path).tensors.values())
        rows.append({"scheme": scheme, "ppl": math.exp(nll / n), "tokens": n,
                     "tensor_types": dict(types), "file_bytes": os.path.getsize(path)})
        del llm
    base = next((r["ppl"] for r in rows if r["scheme"] == "float32"), None)
    for r in rows:
        r["delta_pct"] = None if base is None else 100 * (r["ppl"] / base - 1)
    return {"tokens": int(len(ids)), "window": window, "stride": args.stride, "rows": rows}


def llamacpp_table(part: dict) -> str:
    lines = ["\nllama.cpp's own requantization of the Q4_1 file, same text and windows",
             "| scheme | perplexity | vs float32 | file MB | tensor types |",
             "|---|---|---|---|---|"]
    for r in part["rows"]:
        delta = "" if r["delta_pct"] is None else f"{r['delta_pct']:+.2f}%"
        types = ", ".join(f"{k} x{v}" for k, v in sorted(r["tensor_types"].items()))
        lines.append(f"| {r['scheme']} | {r['ppl']:.4f} | {delta} | {r['file_bytes'] / 1e6:.1f} "
                     f"| {types} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- speed

SPEED = (("tinylm packed Q4_1", "q4_1", "tinylm-packed"),
         ("tinylm float32 (dequantized Q4_1)", "q4_1", "tinylm-float32"),
         ("llama.cpp Q4_1", "q4_1", "llama.cpp"),
         ("tinylm packed Q8_0", "q8_0", "tinylm-packed"),
         ("llama.cpp Q8_0", "q8_0", "llama.cpp"))


def q8_0_file(args) -> str:
    """SmolLM2 requantized to Q8_0 by tinylm's exporter (from the dequantized Q4_1), cached."""
    path = CACHE / "bench" / "SmolLM2-135M-Instruct.q8_0-from-q4_1.gguf"
    if not path.exists():
        from tinylm.formats.gguf_model import export_gguf

        path.parent.mkdir(parents=True, exist_ok=True)
        model, tokenizer = load_smollm2(args.gguf)
        export_gguf(model, tokenizer, path, dtype="q8_0")
    return str(path)


def timed_tinylm(args, ids) -> dict:
    """Load, prefill ``ids`` (median of --reps) and decode --decode greedy tokens in tinylm."""
    import cProfile
    import pstats

    from tinylm.generate import inference
    from tinylm.nn import KVCache
    from tinylm.threads import blas_threads

    t = time.perf_counter()
    model, _ = load_smollm2(args.gguf, dequantize=args.worker == "tinylm-float32")
    load = time.perf_counter() - t
    prefill, tokens = [], []
    with blas_threads(1), inference(model):
        for _ in range(args.reps):
            cache, t = KVCache(), time.perf_counter()
            out = model(ids[None], cache=cache)
            prefill.append(time.perf_counter() - t)
        prof = cProfile.Profile() if args.profile else None
        t = time.perf_counter()
        prof and prof.enable()
        for _ in range(args.decode):
            tokens.append(int(np.argmax(out.logits.numpy()[0, -1])))
            out = model(np.array([[tokens[-1]]]), cache=cache)
        prof and prof.disable()
        decode = time.perf_counter() - t
    if prof:
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(14)
    return {"load_s": load, "prefill_s": prefill, "decode_s": decode, "tokens": tokens}


def timed_llamacpp(args, ids) -> dict:
    """The same in llama.cpp (llama-cpp-python), one thread."""
    import llama_cpp

    t = time.perf_counter()
    llm = llama_cpp.Llama(model_path=args.gguf, n_ctx=len(ids) + args.decode + 8,
                          n_batch=len(ids), n_ubatch=len(ids), n_threads=1,
                          n_threads_batch=1, verbose=False)
    load, prefill, tokens = time.perf_counter() - t, [], []
    n_vocab = llm.n_vocab()

    def last_logits():
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))

    for _ in range(args.reps):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids.tolist())
        prefill.append(time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(args.decode):
        tokens.append(int(np.argmax(last_logits())))
        llm.eval([tokens[-1]])
    return {"load_s": load, "prefill_s": prefill, "decode_s": time.perf_counter() - t,
            "tokens": tokens}


def worker(args) -> None:
    """One speed configuration (run in its own process by ``speed_part``)."""
    ids = np.asarray([int(i) for i in os.environ["BENCH_QUANT_IDS"].split(",")], np.int64)
    timed = timed_llamacpp if args.worker == "llama.cpp" else timed_tinylm
    r = timed(args, ids)
    med = float(np.median(r["prefill_s"]))
    r.update(prefill_tok_s=len(ids) / med, decode_tok_s=args.decode / r["decode_s"],
             peak_rss_mib=peak_rss_mib())
    print("RESULT " + json.dumps(r))


def run_worker(args, kind: str, path: str, ids) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--gguf", path, "--decode",
           str(args.decode), "--reps", str(args.reps)] + (["--profile"] * args.profile)
    env = {**os.environ, **THREAD_ENV, "BENCH_QUANT_IDS": ",".join(map(str, ids))}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if args.profile and kind != "llama.cpp":
        print(done.stderr, file=sys.stderr)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1][len("RESULT "):])


def speed_part(args) -> dict:
    _, tokenizer = load_smollm2(args.gguf, dequantize=False)
    ids = tokenizer.encode(pydoc_text(), disallowed_special=())[:args.prefill]
    files = {"q4_1": args.gguf, "q8_0": q8_0_file(args)}
    rows = []
    for label, fmt, kind in SPEED:
        print(f"timing {label}", file=sys.stderr)
        rows.append({"config": label, "file": fmt, "kind": kind,
                     **run_worker(args, kind, files[fmt], ids)})
    for r in rows:
        ref = next(x for x in rows if x["file"] == r["file"] and x["kind"] == "llama.cpp")
        if "error" not in r and "error" not in ref:
            r["decode_x_llamacpp"] = r["decode_tok_s"] / ref["decode_tok_s"]
            r["prefill_x_llamacpp"] = r["prefill_tok_s"] / ref["prefill_tok_s"]
            r["rss_x_llamacpp"] = r["peak_rss_mib"] / ref["peak_rss_mib"]
            r["same_greedy_tokens"] = _common_prefix(r["tokens"], ref["tokens"])
    return {"prefill_tokens": len(ids), "decode_tokens": args.decode, "files": files,
            "rows": rows}


def _common_prefix(a, b) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# --------------------------------------------------------------------------- tables


def ppl_table(title: str, part: dict) -> str:
    lines = [f"\n{title}", "| scheme | perplexity | vs float32 | size MB | bits/weight "
             "(quantized layers) | bits/weight (model) |", "|---|---|---|---|---|---|"]
    for r in part["rows"]:
        delta = "" if r["delta_pct"] is None else f"{r['delta_pct']:+.2f}%"
        lines.append(f"| {r['scheme']} | {r['ppl']:.4f} | {delta} | {r['bytes'] / 1e6:.2f} | "
                     f"{r['bpw_quantized']:.2f} | {r['bpw_model']:.2f} |")
    return "\n".join(lines)


def speed_table(part: dict) -> str:
    lines = [f"\nSmolLM2 speed, one thread: prefill {part['prefill_tokens']} tokens, decode "
             f"{part['decode_tokens']}", "| config | prefill tok/s | decode tok/s | peak RSS MiB "
             "| decode x llama.cpp | RSS x llama.cpp | same greedy tokens |",
             "|---|---|---|---|---|---|---|"]
    for r in part["rows"]:
        if "error" in r:
            lines.append(f"| {r['config']} | error: {r['error']} |")
            continue
        lines.append(f"| {r['config']} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | "
                     f"{r['peak_rss_mib']:.0f} | {r.get('decode_x_llamacpp', 0):.3f} | "
                     f"{r.get('rss_x_llamacpp', 0):.2f} | {r.get('same_greedy_tokens', '')} |")
    return "\n".join(lines)


def _previous(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    out = _previous(args.out)  # a run of some parts keeps the other parts' results
    out["machine"] = {"cpu": cpu_model(), "python": platform.python_version(),
                      "numpy": np.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}
    print(f"# bench/quant.py on {out['machine']['cpu']}, {out['machine']['date']}")
    for name, part, show in (("shakespeare", shakespeare_part,
                              lambda p: ppl_table(f"Shakespeare BPE model (val loss "
                                                  f"{p['model']['val_loss']:.4f}), held-out "
                                                  f"{p['heldout_tokens']} tokens", p)),
                             ("smollm2", smollm2_part,
                              lambda p: ppl_table(f"SmolLM2-135M, {p['tokens']} tokens of "
                                                  f"pydoc_data.topics", p)),
                             ("llamacpp-ppl", llamacpp_part, llamacpp_table),
                             ("speed", speed_part, speed_table)):
        if name in args.skip:
            continue
        out[name] = part(args)
        out[name]["date"] = time.strftime("%Y-%m-%d %H:%M")
        print(show(out[name]), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        from tinylm.atomic import write_atomic

        write_atomic(args.out, (json.dumps(out, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()

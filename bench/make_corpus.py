"""A synthetic C4-like corpus for ``tinylm data`` (issue 20): JSONL.gz shards named as C4's,
with exact duplicates, near-duplicates, boilerplate lines, pages C4's rules drop, and bad
records, all from one seed.

    .venv/bin/python bench/make_corpus.py /tmp/c4like --size 1G --shards 16 --processes 2
    # /tmp/c4like/c4-train.00000-of-00016.json.gz ... (1 GB of JSONL before gzip)

Every document is a function of (seed, its number), so shards are made in parallel and
the same arguments give the same bytes. A document is "text" (lines of sentences of
Zipf-distributed pseudo-words, the stop words most frequent; about 1.7 KB, C4's pages
average 2.2), "url" and "timestamp", as C4's records. Of the documents:

- 3% repeat an earlier document's text exactly (another URL), 3% are near-duplicates of
  one (2% of the words replaced, a sentence dropped): what ``tinylm data dedup`` finds;
- 35% carry 1-3 boilerplate lines (menus without punctuation, "enable JavaScript",
  cookie notices, "Click here." ...) that C4's line rules remove, some that survive
  ("Copyright (c) 2019 ... All rights reserved.");
- 2% are too short (C4's 5-sentence rule), 0.3% lorem ipsum, 0.5% hold code in braces;
- one record in 5000 is bad: a cut JSON line, invalid UTF-8, no "text", a number as text;
  and the last shard's gzip stream is cut short (``--no-bad-records``: none of these,
  for tools that stop at a bad record, such as ``datasets``' JSON loader).

Sizes: ``--size`` counts the uncompressed JSONL (gzip level 3 makes it about a third).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time

import numpy as np

STRIDE = 10**7  # document numbers: shard * STRIDE + position in the shard
STOP_WORDS = ("the", "of", "and", "to", "a", "in", "is", "that", "for", "it", "with", "as",
              "was", "on", "be", "have", "by", "this", "are", "from", "at", "or", "an", "but")
BOILERPLATE = (
    "Home | About Us | Contact | Blog | Shop",
    "Please enable JavaScript to view the comments powered by Disqus.",
    "This website uses cookies to improve your experience.",
    "Click here.",
    "Share this: Facebook Twitter Pinterest",
    "Posted by admin",
    "Read more",
    "Copyright (c) 2019 Example Media. All rights reserved.",
    "Sign up for our newsletter and never miss an update!",
    "Terms of Use and Privacy Policy apply to this site.",
)
LOREM = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
         "incididunt ut labore et dolore magna aliqua.")
CODE = "function init() { var x = document.getElementById('main'); return x; }"
DOMAINS = ("example.com", "news.example.org", "blog.example.net", "shop.example.io",
           "forum.example.co.uk", "wiki.example.edu")


class Vocabulary:
    """``n`` pseudo-words (syllables from ``seed``), the stop words first, and the
    Zipf (s = 1) cumulative distribution over them."""

    def __init__(self, n: int = 30000, seed: int = 0):
        rng = np.random.default_rng([seed, 0])
        onsets = np.array(list("bcdfghjklmnprstvwz") + ["ch", "sh", "th", "st", "tr", "pl"])
        vowels = np.array(list("aeiou") + ["ai", "ea", "ou", "io"])
        codas = np.array(["", "", "", "n", "r", "s", "t", "l", "nd", "st"])
        words, seen = list(STOP_WORDS), set(STOP_WORDS)
        while len(words) < n:
            k = int(rng.integers(1, 4))
            word = "".join(str(onsets[rng.integers(len(onsets))]) + str(vowels[rng.integers(
                len(vowels))]) for _ in range(k)) + str(codas[rng.integers(len(codas))])
            if word not in seen:
                seen.add(word)
                words.append(word)
        self.words = np.array(words, dtype=object)
        p = 1.0 / (np.arange(n) + 2.0)
        self.cdf = np.cumsum(p / p.sum())

    def sample(self, rng, k: int) -> list:
        return self.words[np.minimum(np.searchsorted(self.cdf, rng.random(k)),
                                     len(self.words) - 1)].tolist()


def sentences(vocab: Vocabulary, rng, n: int) -> list:
    """``n`` sentences: 5-25 words, capitalised, ending in . (90%), ? or !."""
    lengths = 5 + rng.poisson(9, n)
    words = vocab.sample(rng, int(lengths.sum()))
    marks = rng.choice([".", "?", "!"], n, p=[0.9, 0.06, 0.04])
    out, at = [], 0
    for length, mark in zip(lengths.tolist(), marks.tolist()):  # one per sentence
        chunk = words[at:at + length]
        at += length
        out.append(chunk[0].capitalize() + " " + " ".join(chunk[1:]) + mark)
    return out


def base_text(vocab: Vocabulary, seed: int, number: int) -> str:
    """The fresh text of document ``number``: its lines, and what C4 may remove."""
    rng = np.random.default_rng([seed, number, 0])
    kind = rng.random()
    if kind < 0.02:  # too short for C4's 5-sentence rule
        return " ".join(sentences(vocab, rng, int(rng.integers(1, 3))))
    n_lines = 2 + int(rng.poisson(4))
    per_line = 1 + rng.poisson(1.6, n_lines)
    flat = sentences(vocab, rng, int(per_line.sum()))
    bounds = np.concatenate([[0], np.cumsum(per_line)]).tolist()
    lines = [" ".join(flat[a:b]) for a, b in zip(bounds, bounds[1:])]
    if kind < 0.023:
        lines.insert(int(rng.integers(len(lines))), LOREM)
    elif kind < 0.028:
        lines.append(CODE)
    if rng.random() < 0.35:
        for _ in range(int(rng.integers(1, 4))):
            line = BOILERPLATE[int(rng.integers(len(BOILERPLATE)))]
            lines.insert(0 if rng.random() < 0.5 else len(lines), line)
    return "\n".join(lines)


def near_duplicate(vocab: Vocabulary, text: str, rng) -> str:
    """``text`` with 2% of its words replaced and one sentence-ending word dropped."""
    words = text.split(" ")
    swap = np.flatnonzero(rng.random(len(words)) < 0.02)
    for i, word in zip(swap.tolist(), vocab.sample(rng, len(swap))):
        words[i] = word
    ends = [i for i, w in enumerate(words) if w.endswith((".", "?", "!"))]
    if len(ends) > 2:
        del words[ends[int(rng.integers(len(ends)))]]
    return " ".join(words)


def record(vocab: Vocabulary, seed: int, shard: int, k: int, per_shard: int,
           bad_records: bool = True) -> bytes:
    """The JSONL line of document k of ``shard`` (a bad one now and then)."""
    number = shard * STRIDE + k
    rng = np.random.default_rng([seed, number, 1])
    u = rng.random()
    if u < 0.06:  # a copy of an earlier document (maybe of an earlier shard)
        src_shard = int(rng.integers(0, shard + 1))
        limit = k if src_shard == shard else per_shard
        source = src_shard * STRIDE + int(rng.integers(0, max(limit, 1)))
        text = base_text(vocab, seed, source)
        if u >= 0.03:
            text = near_duplicate(vocab, text, rng)
    else:
        text = base_text(vocab, seed, number)
    rec = {"text": text,
           "timestamp": f"2019-04-{1 + number % 28:02d}T{number % 24:02d}:{number % 60:02d}:"
                        f"{(number // 60) % 60:02d}Z",
           "url": f"https://{DOMAINS[number % len(DOMAINS)]}/p/{number:x}"}
    line = json.dumps(rec).encode() + b"\n"
    bad = rng.random() if bad_records else 1.0
    if bad < 0.00005:
        return line[:len(line) // 2] + b"\n"  # a cut line: invalid JSON
    if bad < 0.0001:
        return line[:-3] + b"\xff\xfe" + line[-3:]  # invalid UTF-8
    if bad < 0.00015:
        return json.dumps({"url": rec["url"]}).encode() + b"\n"  # no text
    if bad < 0.0002:
        return json.dumps({"text": 12345, "url": rec["url"]}).encode() + b"\n"
    return line


def write_shard(args) -> dict:
    """Shard ``shard`` of ``n_shards``: documents until ``target`` bytes of JSONL."""
    out_dir, seed, shard, n_shards, target, truncate, bad_records = args
    vocab = Vocabulary(seed=seed)
    per_shard = max(target // 1800, 1)  # about how many documents a shard holds
    path = os.path.join(out_dir, f"c4-train.{shard:05d}-of-{n_shards:05d}.json.gz")
    tmp = path + ".part"
    size = docs = 0
    with open(tmp, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=3, mtime=0) as gz:
            block = []
            while size < target:
                line = record(vocab, seed, shard, docs, per_shard, bad_records)
                block.append(line)
                size += len(line)
                docs += 1
                if len(block) >= 2000:
                    gz.write(b"".join(block))
                    block = []
            gz.write(b"".join(block))
    if truncate:  # the stream cut 4 KB before its end (a download that stopped)
        with open(tmp, "r+b") as f:
            f.truncate(max(os.path.getsize(tmp) - 4096, 0))
    os.replace(tmp, path)
    return {"path": path, "documents": docs, "bytes": size, "gz_bytes": os.path.getsize(path)}


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().rstrip("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def make_corpus(out_dir: str, size: int, shards: int, seed: int = 0, processes: int = 1,
                bad_records: bool = True) -> list:
    """Write the corpus; returns each shard's path, documents and bytes. Without
    ``bad_records``: no bad record and no cut stream (for tools that stop at them)."""
    os.makedirs(out_dir, exist_ok=True)
    jobs = [(out_dir, seed, s, shards, size // shards, bad_records and s == shards - 1,
             bad_records) for s in range(shards)]
    if processes == 1:
        return [write_shard(job) for job in jobs]
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(processes) as pool:
        return pool.map(write_shard, jobs)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--size", default="1G", help="uncompressed JSONL bytes (1G, 200M)")
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--no-bad-records", action="store_true",
                        help="no bad records and the last gzip stream whole")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    shards = make_corpus(args.out_dir, parse_size(args.size), args.shards, args.seed,
                         args.processes, not args.no_bad_records)
    docs, size = sum(s["documents"] for s in shards), sum(s["bytes"] for s in shards)
    gz = sum(s["gz_bytes"] for s in shards)
    print(f"{len(shards)} shards, {docs:,} documents, {size / 1e6:,.1f} MB of JSONL "
          f"({gz / 1e6:,.1f} MB gzip) in {args.out_dir}, {time.perf_counter() - start:.1f} s",
          file=sys.stderr)


if __name__ == "__main__":
    main()

"""``tinylm data tokenize``: documents -> fixed-size shards of token ids, in parallel
processes, resumable, with an index a trainer streams from (``tinylm.data_shards``).

    totals = tokenize_corpus(["deduped/"], "tokens/", "tokenizer.txt",
                             TokenizeConfig(processes=2, shard_tokens=1 << 26))
    totals["index"]["n_tokens"], totals["index"]["shards"][0]
    # {"file": "shard-00000-00000.bin", "tokens": 67108864, "documents": 131072, ...}

Work is cut into *units*: one per input file, or one per ``split_bytes`` byte range of
an uncompressed JSONL file (a line belongs to the range its first byte is in; a
compressed stream cannot be entered in the middle). ``processes`` spawned workers
(``processes=1``: this process) take units from a queue, each loading the tokenizer
once. A unit writes its own shards, ``shard-UUUUU-KKKKK.bin``: ``shard_tokens``
little-endian ids each (uint16 for vocabularies up to 65536 ids, else uint32), its
last one shorter, streamed to disk through ``tinylm.atomic`` (a worker holds one
chunk of documents, never a shard).

The token stream: each document's ids (special tokens' text encoded as plain text, as
``TokenData.prepare`` does) after the end-of-text id, except the corpus's first
document; empty documents are left out. In index order the shards are exactly the
token file ``TokenData.prepare`` writes for the same documents (were every document of
the first unit dropped, the stream would start with one end-of-text id).

Files in ``out/``: the shards; ``tokenizer.txt`` (the tokenizer, saved in its own
format: its SHA-256 is the index's ``tokenizer_sha256``); ``.tokenize/plan.json`` (the
inputs and options this folder is for: a rerun with others is refused, or starts over
with ``overwrite``); ``.tokenize/unit-UUUUU.json`` (a unit's progress, rewritten after
each of its shards is in place: the shards done and where the next one begins, as a
document number and an offset in that document's ids); ``index.json`` (written last,
when every unit is done: shard files, token and document counts, dtype, eot id,
tokenizer hash, per-input statistics) and ``tokenize.stats.json`` (this run's numbers).

Resuming: a rerun skips finished units; an unfinished one is read again from its
start, the documents before its resume point skipped untokenized, and continues with
its next shard. An interrupted run (Ctrl-C, a killed worker) loses at most the shard
each worker was writing. Bad records are the readers' (``BAD_REASONS``, per input);
documents the tokenizer refuses (a lone surrogate from a JSON ``\\ud800`` escape) are
counted as ``untokenizable`` and left out: nothing stops the run but a dead worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import queue
import shutil
import signal
import sys
import time

import numpy as np

from tinylm.atomic import atomic_open
from tinylm.data import token_dtype, tokenizer_sha256
from tinylm.data_shards import INDEX_FILE, SHARDS_FORMAT, SHARDS_VERSION, TOKENIZER_FILE
from tinylm.errors import TinyLMError
from tinylm.webdata import readers
from tinylm.webdata.readers import ReadStats, WebDataError, expand_inputs
from tinylm.webdata.shards import fingerprint, make_folder, options_key, stats_path, write_json

STAGE = "tokenize"
PLAN_VERSION = 1
DEFAULT_SHARD_TOKENS = 1 << 26  # 64M ids: 128 MiB of uint16
DEFAULT_SPLIT_BYTES = 1 << 28  # uncompressed JSONL above 256 MiB is cut into ranges
CHUNK_CHARS = 1 << 20  # a worker tokenizes about this much text at a time
CHUNK_DOCS = 4096
EOT_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "[SEP]")
COUNTERS = ("documents", "empty", "untokenizable")  # what each document ends up as


# --------------------------------------------------------------------------- planning


def plan_units(files, fmt: str | None, split_bytes: int) -> list:
    """``[(path, start, stop)]``: whole files (``start`` None), uncompressed JSONL
    above ``split_bytes`` as byte ranges."""
    units = []
    for path in files:
        kind = fmt or readers.detect_format(path)
        compressed = os.path.splitext(path)[1].lower() in readers.COMPRESSED
        size = os.path.getsize(path) if os.path.isfile(path) else 0
        if kind != "jsonl" or compressed or split_bytes <= 0 or size <= split_bytes:
            units.append((path, None, None))
            continue
        for start in range(0, size, split_bytes):
            units.append((path, start, min(start + split_bytes, size)))
    return units


def find_eot(tokenizer, eot: str | None) -> tuple:
    """(id, text) of the separator: ``eot``'s, or with "auto" the first of
    ``EOT_CANDIDATES`` the tokenizer has; ``eot`` None or "none": (None, None)."""
    if eot is None or eot == "none":
        return None, None
    names = EOT_CANDIDATES if eot == "auto" else (eot,)
    for name in names:
        i = tokenizer.token_to_id(name)
        if i is not None:
            return int(i), name
    raise WebDataError(f"the tokenizer has no {' or '.join(names)} token to separate "
                       f"documents with; pass --eot TOKEN (or --eot none)")


def _claim(out_dir: str, key: str, options: dict, overwrite: bool) -> None:
    """Make ``out_dir`` this run's: new, empty, or a tokenize run of the same key, to
    continue (``overwrite``: any tokenize run, its files removed first)."""
    work = os.path.join(out_dir, f".{STAGE}")
    plan = os.path.join(work, "plan.json")
    saved = None
    if os.path.exists(plan):
        saved = {}  # (unreadable: as if of another key)
        with contextlib.suppress(OSError, ValueError):
            with open(plan, encoding="utf-8") as f:
                saved = json.load(f)
        if overwrite:
            _remove_outputs(out_dir)
            saved = None
        elif not isinstance(saved, dict) or saved.get("key") != key:
            raise WebDataError(f"{out_dir} holds shards of other inputs, tokenizer or options; "
                               f"pick another --out, or pass --overwrite to start over")
    elif os.path.isdir(out_dir) and os.listdir(out_dir):
        raise WebDataError(f"{out_dir} is not empty and holds no tokenize run; pick a new or "
                           f"empty --out folder")
    make_folder(work)
    if saved is None:
        write_json(plan, {"key": key, "options": options})
    for tmp in glob.glob(os.path.join(out_dir, ".shard-*.tmp")):  # a killed worker's
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _remove_outputs(out_dir: str) -> None:
    """The files a tokenize run writes (nothing else in ``out_dir``)."""
    for path in glob.glob(os.path.join(out_dir, "shard-*.bin")):
        os.unlink(path)
    for name in (INDEX_FILE, TOKENIZER_FILE, f"{STAGE}.stats.json"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(out_dir, name))
    shutil.rmtree(os.path.join(out_dir, f".{STAGE}"), ignore_errors=True)


# --------------------------------------------------------------------------- one unit


def _unit_documents(job: dict, stats: ReadStats):
    """The documents of a unit: a whole file through ``readers.read_documents``, or
    the JSONL lines whose first byte is in [start, stop)."""
    if job["start"] is None:
        yield from readers.read_documents(job["path"], job["format"], stats=stats,
                                          **job["read"])
        return
    with open(job["path"], "rb", buffering=1 << 20) as f:
        pos = job["start"]
        if pos > 0:  # the line holding byte start - 1 is the previous range's
            f.seek(pos - 1)
            pos += len(f.readline()) - 1

        def lines(pos=pos):
            while pos < job["stop"]:
                line = f.readline()
                if not line:
                    return
                pos += len(line)
                yield line

        name = os.path.basename(job["path"])
        for doc in readers._jsonl(lines(), name, stats, job["read"].get("text_field", "text")):
            stats.documents += 1
            yield doc


def _encoder(tokenizer):
    """text -> ids with special tokens' text as plain text (``TokenData.prepare``'s)."""
    ordinary = getattr(tokenizer, "encode_ordinary", None)
    if ordinary is not None:
        return ordinary
    return lambda text: tokenizer.encode(text, disallowed_special=())


def encode_chunk(texts, encode, eot_id, started: bool, dtype) -> tuple:
    """The ids of ``texts`` end to end, each after ``eot_id`` once a document came
    before (``started``): (tokens (N,) ``dtype``, lengths (D,), kinds (D,): 0 a
    document, 1 empty, 2 refused by the tokenizer, started after the chunk)."""
    flat, lengths = [], np.zeros(len(texts), dtype=np.int64)
    kinds = np.zeros(len(texts), dtype=np.int8)
    for j, text in enumerate(texts):  # one encode call per document
        if not text:
            kinds[j] = 1
            continue
        try:
            ids = encode(text)
        except (TinyLMError, ValueError, UnicodeError):
            kinds[j] = 2
            continue
        if started and eot_id is not None:
            flat.append(eot_id)
        lengths[j] = len(ids) + (started and eot_id is not None)
        flat.extend(ids)
        started = True
    return np.array(flat, dtype=dtype), lengths, kinds, started


class _UnitWriter:
    """A unit's shards: chunks of tokens go into the open shard (an ``atomic_open``
    file); a full one is closed (renamed into place) and the unit's state, with where
    the next shard begins, rewritten. ``position``: the unit-stream position of the
    next chunk's first token; tokens before ``written`` (a resumed unit's finished
    shards) are dropped."""

    def __init__(self, job: dict, state: dict):
        self.job, self.state = job, state
        self.dtype = np.dtype(job["dtype"]).newbyteorder("<")
        resume = state["resume"]
        self.written = resume["tokens"]
        self.position = resume["tokens"] - resume["offset"]
        self.counters = {k: resume[k] for k in COUNTERS}
        self.stack, self.file, self.in_file, self.docs_in_file = None, None, 0, 0

    def add(self, tokens, lengths, kinds, first_doc: int) -> int:
        """Write a chunk (``encode_chunk``'s) whose first document is ``first_doc``;
        returns how many of its tokens were written (not dropped)."""
        before = self.written
        ends = self.position + np.cumsum(lengths)  # (D,) stream position after each
        starts = (ends - lengths)[lengths > 0]  # where each document begins
        i = max(self.written - self.position, 0)
        while i < len(tokens):
            if self.file is None:
                self._open()
            take = min(self.job["shard_tokens"] - self.in_file, len(tokens) - i)
            self.file.write(tokens[i:i + take].astype(self.dtype, copy=False).tobytes())
            a, b = self.position + i, self.position + i + take
            self.docs_in_file += int(np.searchsorted(starts, b) - np.searchsorted(starts, a))
            i, self.written, self.in_file = i + take, self.written + take, self.in_file + take
            if self.in_file == self.job["shard_tokens"]:
                self._close(self._resume_point(ends, lengths, kinds, first_doc))
        for name, kind in zip(COUNTERS, range(3)):
            self.counters[name] += int(np.count_nonzero(kinds == kind))
        self.position += len(tokens)
        return self.written - before

    def _resume_point(self, ends, lengths, kinds, first_doc: int) -> dict:
        """Where a shard ending at ``written`` leaves off: the document holding the
        next token, the offset in its ids, the counters of the documents before it."""
        k = int(np.searchsorted(ends, self.written, side="right"))
        offset = int(self.written - (ends[k] - lengths[k])) if k < len(ends) else 0
        counters = {name: self.counters[name] + int(np.count_nonzero(kinds[:k] == kind))
                    for name, kind in zip(COUNTERS, range(3))}
        return {"doc": first_doc + k, "offset": offset, "tokens": self.written, **counters}

    def _open(self) -> None:
        k = len(self.state["shards"])
        name = f"shard-{self.job['unit']:05d}-{k:05d}.bin"
        self.stack = contextlib.ExitStack()
        self.file = self.stack.enter_context(
            atomic_open(os.path.join(self.job["out_dir"], name), "wb", error=WebDataError))
        self.name, self.in_file, self.docs_in_file = name, 0, 0

    def _close(self, resume: dict) -> None:
        self.stack.close()  # the shard is in place
        self.state["shards"].append({"file": self.name, "tokens": self.in_file,
                                     "documents": self.docs_in_file})
        self.state["resume"] = resume
        self.file = self.stack = None
        write_json(self.job["state"], self.state)

    def finish(self, first_doc: int) -> None:
        if self.file is not None:
            self._close({"doc": first_doc, "offset": 0, "tokens": self.written,
                         **self.counters})

    def abort(self) -> None:
        if self.stack is not None:
            self.stack.__exit__(*sys.exc_info())  # the partial shard's file removed


def _new_state(job: dict) -> dict:
    return {"unit": job["unit"], "done": False, "shards": [],
            "resume": {"doc": 0, "offset": 0, "tokens": 0, **dict.fromkeys(COUNTERS, 0)}}


def read_state(job: dict) -> dict:
    """The unit's saved state, or a fresh one (none, unreadable, or of other shards)."""
    try:
        with open(job["state"], encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return _new_state(job)
    if not isinstance(state, dict) or state.get("unit") != job["unit"] or not all(
            os.path.exists(os.path.join(job["out_dir"], s["file"])) for s in state["shards"]):
        return _new_state(job)
    return state


def tokenize_unit(job: dict, tokenizer, report=None) -> dict:
    """Tokenize one unit into its shards (continuing from its saved state); its final
    state. ``report(documents, tokens)`` is called after each chunk."""
    state = read_state(job)
    if state["done"]:
        return state
    writer, stats = _UnitWriter(job, state), ReadStats(job["path"])
    encode, eot_id, dtype = _encoder(tokenizer), job["eot_id"], writer.dtype
    first = state["resume"]["doc"]
    started = job["unit"] > 0 or writer.counters["documents"] > 0
    texts, size, n = [], 0, 0
    try:
        for n, doc in enumerate(_unit_documents(job, stats), 1):
            if n <= first:  # before the resume point: read, not tokenized
                continue
            texts.append(doc.text)
            size += len(doc.text)
            if size >= CHUNK_CHARS or len(texts) >= CHUNK_DOCS:
                started = _add_chunk(writer, texts, encode, eot_id, started, dtype, n, report)
                texts, size = [], 0
        _add_chunk(writer, texts, encode, eot_id, started, dtype, max(n, first), report)
        writer.finish(max(n, first))
    except BaseException:
        writer.abort()
        raise
    state.update(done=True, stats={**stats.to_dict(), **writer.counters,
                                   "tokens": writer.written})
    write_json(job["state"], state)
    return state


def _add_chunk(writer, texts, encode, eot_id, started, dtype, end_doc: int, report) -> bool:
    if not texts:
        return started
    tokens, lengths, kinds, started = encode_chunk(texts, encode, eot_id, started, dtype)
    written = writer.add(tokens, lengths, kinds, end_doc - len(texts))
    if report is not None:
        report(len(texts), written)
    return started


# --------------------------------------------------------------------------- workers


def _worker_main(tokenizer_path: str, tasks, events) -> None:
    """A spawned worker: units from ``tasks`` until None, progress and results to
    ``events``. It ignores Ctrl-C: the parent stops it with SIGTERM, which removes the
    shard it was writing (a later run redoes it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    from tinylm.tokenizers import from_file

    tokenizer = from_file(tokenizer_path)
    try:
        while True:
            job = tasks.get()
            if job is None:
                break
            try:
                state = tokenize_unit(job, tokenizer,
                                      lambda d, t: events.put(("progress", d, t)))
            except Exception as e:  # a bug or a full disk: say it in the parent
                message = str(e) if isinstance(e, TinyLMError) else f"{type(e).__name__}: {e}"
                if not message.startswith(job["path"]):  # (the reader's errors name it)
                    message = f"{job['path']}: {message}"
                events.put(("error", job["unit"], message))
                break
            events.put(("done", job["unit"], state))
    except SystemExit:
        return  # stopped by the parent: quietly (the shard in progress was removed)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # done: nothing left to clean up


def _run_pool(jobs: list, processes: int, tokenizer_path: str, on_event) -> None:
    """Run ``jobs`` on ``processes`` spawned workers; ``on_event(kind, *data)`` for
    each progress and done event. A worker that fails or dies stops them all."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # (no fork: safe with threads, the same on every OS)
    tasks, events = ctx.Queue(), ctx.Queue()
    for job in jobs:
        tasks.put(job)
    procs = [ctx.Process(target=_worker_main, args=(tokenizer_path, tasks, events),
                         daemon=True) for _ in range(min(processes, len(jobs)))]
    for p in procs:
        tasks.put(None)
        p.start()
    left = len(jobs)
    try:
        while left:
            try:
                kind, *data = events.get(timeout=0.25)
            except queue.Empty:
                _check_workers(procs)
                continue
            if kind == "error":
                raise WebDataError(f"{data[1]}; finished shards are kept: fix it and run "
                                   f"the same command again")
            left -= kind == "done"
            on_event(kind, *data)
    finally:
        if not left:  # every unit done: the workers are exiting on their own
            for p in procs:
                p.join(timeout=30)
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join()


def _check_workers(procs) -> None:
    dead = [p for p in procs if p.exitcode not in (None, 0)]
    if dead or all(p.exitcode is not None for p in procs):
        how = (f"died (exit code {dead[0].exitcode}, pid {dead[0].pid})" if dead
               else "stopped with work left")
        raise WebDataError(f"a tokenize worker {how}; run the same command again to "
                           f"continue (finished shards are kept)")


# --------------------------------------------------------------------------- the corpus


def _load_tokenizer(spec):
    """(tokenizer, its SHA-256): a Tokenizer, or a tokenizer file ``from_file`` reads."""
    from tinylm.tokenizers import Tokenizer, from_file

    if isinstance(spec, Tokenizer):
        return spec, tokenizer_sha256(spec)
    if not os.path.isfile(os.fspath(spec)):
        raise WebDataError(f"no tokenizer file {spec}; train one with tinylm tokenize train, "
                           f"or give a tokenizer.json / tinylm tokenizer file")
    tokenizer = from_file(os.fspath(spec))
    return tokenizer, tokenizer_sha256(tokenizer)


@dataclasses.dataclass
class TokenizeConfig:
    """How ``tokenize_corpus`` cuts and separates (all but ``processes`` are part of
    the output folder's plan: a rerun with others is refused or starts over)."""

    processes: int = 1
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    split_bytes: int = DEFAULT_SPLIT_BYTES  # 0: never cut a file
    eot: str | None = "auto"  # a special token's text, "auto", or None/"none"


def tokenize_corpus(inputs, out_dir: str, tokenizer, config: TokenizeConfig | None = None,
                    *, read_options: dict | None = None, show_progress: bool = True,
                    progress=None, overwrite: bool = False) -> dict:
    """Tokenize every file ``expand_inputs(inputs)`` names into shards in ``out_dir``
    (see the module docstring); returns this run's totals (``totals["index"]``: the
    index). ``tokenizer``: a file or a Tokenizer; ``progress(documents, tokens)``: a
    callback after each chunk (in this process); ``read_options``: format,
    text_field, text_unit for the readers."""
    config = config or TokenizeConfig()
    tok, jobs, options, key = _plan(inputs, out_dir, tokenizer, config, read_options, overwrite)
    states = {job["unit"]: read_state(job) for job in jobs}
    todo = [job for job in jobs if not states[job["unit"]]["done"]]
    run = _Progress(show_progress, len(jobs), len(jobs) - len(todo), progress)
    with run:
        if config.processes == 1 or len(todo) <= 1:
            for job in todo:
                states[job["unit"]] = tokenize_unit(job, tok, run.chunk)
                run.unit_done()
        else:
            def on_event(kind, *data):
                if kind == "progress":
                    run.chunk(*data)
                else:
                    states[data[0]] = data[1]
                    run.unit_done()

            _run_pool(todo, config.processes, os.path.join(out_dir, TOKENIZER_FILE), on_event)
    index = build_index(jobs, states, options, key, tok)
    write_json(os.path.join(out_dir, INDEX_FILE), index)
    totals = {**run.totals(), "units": len(jobs), "units_done": len(todo),
              "units_skipped": len(jobs) - len(todo), "index": index}
    write_json(stats_path(out_dir, STAGE), {k: v for k, v in totals.items() if k != "index"})
    return totals


def _plan(inputs, out_dir, tokenizer, config, read_options, overwrite) -> tuple:
    """(tokenizer, the units' jobs, the plan's options, their key), ``out_dir`` claimed
    and the tokenizer saved in it."""
    if config.processes < 1 or config.shard_tokens < 1:
        raise WebDataError("processes and shard_tokens must be >= 1")
    read_options = dict(read_options or {})
    fmt = read_options.pop("format", None)
    files = expand_inputs(inputs)
    for path in files:
        if os.path.abspath(os.path.dirname(path)) == os.path.abspath(out_dir):
            raise WebDataError(f"{path} is in the output folder {out_dir}; pick another --out")
    tok, tok_hash = _load_tokenizer(tokenizer)
    eot_id, eot_text = find_eot(tok, config.eot)
    dtype = token_dtype(tok.vocab_size)
    units = plan_units(files, fmt, config.split_bytes)
    options = {"version": PLAN_VERSION, "tokenizer_sha256": tok_hash, "eot_id": eot_id,
               "eot": eot_text, "dtype": dtype.name, "shard_tokens": config.shard_tokens,
               "split_bytes": config.split_bytes, "format": fmt, "read": read_options,
               "units": [[fingerprint(p), a, b] for p, a, b in units]}
    key = options_key(options)
    make_folder(out_dir)
    _claim(out_dir, key, options, overwrite)
    tok_path = os.path.join(out_dir, TOKENIZER_FILE)
    tok.save(tok_path)
    if config.processes > 1 and _load_tokenizer(tok_path)[1] != tok_hash:  # workers load it
        raise WebDataError(f"the tokenizer does not survive saving as {TOKENIZER_FILE}; "
                           f"tokenize with --processes 1")
    jobs = [{"unit": i, "path": p, "start": a, "stop": b, "format": fmt, "read": read_options,
             "out_dir": out_dir, "shard_tokens": config.shard_tokens, "dtype": dtype.name,
             "eot_id": eot_id, "state": os.path.join(out_dir, f".{STAGE}", f"unit-{i:05d}.json")}
            for i, (p, a, b) in enumerate(units)]
    return tok, jobs, options, key


def build_index(jobs, states, options, key, tokenizer) -> dict:
    """index.json: the shards in order, counts, dtype, tokenizer hash, per-input stats."""
    shards, inputs = [], {}
    for job in jobs:
        state = states[job["unit"]]
        shards += [{**s, "unit": job["unit"]} for s in state["shards"]]
        entry = inputs.setdefault(job["path"], {"path": job["path"], "units": 0, "bytes": 0,
                                                "tokens": 0, "bad": {}, "skipped": {},
                                                **dict.fromkeys(COUNTERS, 0)})
        stats = state["stats"]
        entry["units"] += 1
        for name in ("bytes", "tokens", *COUNTERS):
            entry[name] += stats[name]
        for field in ("bad", "skipped"):
            for reason, n in stats[field].items():
                entry[field][reason] = entry[field].get(reason, 0) + n
    bad = {}
    for entry in inputs.values():
        for reason, n in entry["bad"].items():
            bad[reason] = bad.get(reason, 0) + n
    files = list(inputs.values())
    return {"format": SHARDS_FORMAT, "version": SHARDS_VERSION, "key": key,
            "dtype": options["dtype"], "byte_order": "little", "vocab_size": tokenizer.vocab_size,
            "eot_id": options["eot_id"], "eot": options["eot"],
            "tokenizer_sha256": options["tokenizer_sha256"], "tokenizer_file": TOKENIZER_FILE,
            "shard_tokens": options["shard_tokens"],
            "n_tokens": sum(s["tokens"] for s in shards),
            "n_documents": sum(e["documents"] for e in files),
            "n_empty": sum(e["empty"] for e in files),
            "n_untokenizable": sum(e["untokenizable"] for e in files),
            "bad": dict(sorted(bad.items())), "shards": shards, "inputs": files}


class _Progress:
    """The bar (documents, documents/s; tokens/s and units done beside it) and this
    run's counts; ``callback`` is told of each chunk too."""

    def __init__(self, enabled: bool, units: int, done: int, callback=None):
        from tqdm.auto import tqdm

        self.bar = tqdm(desc=STAGE, unit="doc", unit_scale=True, dynamic_ncols=True,
                        file=sys.stderr, disable=not enabled, smoothing=0.1)
        self.units, self.done, self.callback = units, done, callback
        self.documents = self.tokens = 0
        self.start = time.perf_counter()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()

    def chunk(self, documents: int, tokens: int) -> None:
        self.documents += documents
        self.tokens += tokens
        self.bar.update(documents)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens / elapsed:,.0f} tokens/s, "
                                 f"units {self.done}/{self.units}", refresh=False)
        if self.callback is not None:
            self.callback(documents, tokens)

    def unit_done(self) -> None:
        self.done += 1

    def totals(self) -> dict:
        elapsed = time.perf_counter() - self.start
        return {"seconds": round(elapsed, 3), "documents_read": self.documents,
                "tokens_written": self.tokens,
                "documents_per_s": round(self.documents / elapsed, 1) if elapsed else 0.0,
                "tokens_per_s": round(self.tokens / elapsed, 1) if elapsed else 0.0}

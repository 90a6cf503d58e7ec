"""The batching scheduler: one thread that runs the model for every request at once.

    engine = Engine(model, tokenizer, max_rows=16, max_length=1024)
    engine.start()
    engine.submit([Job(prompt_ids, 64, SamplingConfig(temperature=0), sink=print)])
    engine.close()

Continuous batching. Each request is a ``Job``: a prompt and its ``n`` choices, each
choice a row of the ``SlotCache``. The thread loops:

1. admit: take the waiting jobs from the head of the queue while they fit in the free
   rows (and ``PREFILL_TOKENS``), prefill their prompts together (ONE forward of the
   prompts right-padded to the longest, one row per job; a job's other n - 1 rows copy
   its row) and pick every choice's first token. Only the hidden state at each
   prompt's last token goes through the vocabulary projection (``forward.pick_logits``);
2. step: ONE forward of the last token of every active row (B = active rows, T = 1,
   each row at its own length: the cache's padding mask and per-row positions), then
   pick each row's next token;
3. every row that ended (eos, a stop string, max_tokens) or whose client went away
   leaves; its row is freed and the survivors move down.

So a request that arrives while others decode joins them between two steps, and one
forward serves them all: the weights are read once per step for B tokens, which is
where batching's speed comes from (``bench/serve.py``).

Picking follows ``tinylm.generate.generate`` exactly, so a request decodes as it
would there: each job's ``SamplingConfig`` through ``process_logits`` (rows that share
a config are processed together), the penalties over each row's generated tokens,
then argmax, or the inverse-CDF draw ``tinylm.sampling.pick`` makes, with the job's own
generator drawing ``n`` uniforms per step (``pick`` draws from one generator for the
whole batch, so the draw is ``pick_rows`` here). A seed therefore gives the same text
whatever else is in the batch, and the same as ``generate(..., seed=seed)``.

Exactness across batch sizes: a row's attention sees exactly its own keys, but BLAS
computes a (B, d) @ (d, k) product with other kernels for other B, so logits agree
with the row decoded alone to float rounding (about 1e-7), not bit for bit: greedy
text is the same unless two tokens tie within that.

The asyncio side talks to this thread through ``submit`` (a thread-safe queue) and
each job's ``sink``, called from this thread with the job's events of a step (the
server's sink hands them to the event loop with ``call_soon_threadsafe``); setting
``job.cancelled`` drops the job at the next step.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from tinylm.generate import inference
from tinylm.ops.nn import log_softmax_array, softmax_array
from tinylm.sampling import SamplingConfig, process_logits
from tinylm.serve.cache import SlotCache
from tinylm.serve.forward import pick_logits
from tinylm.serve.text import ChoiceText

log = logging.getLogger("tinylm.serve")

_STOP = object()  # the queue's last item: the thread ends
PREFILL_TOKENS = 4096  # most padded prompt tokens (jobs x longest) one prefill batch takes


@dataclass(eq=False)  # a job is itself: hashable, compared by identity
class Job:
    """One prompt to continue ``n`` times. ``eos``: ids that end a choice (kept out of
    the text); ``stop``: strings that end it (cut from the text); ``logprobs``: None,
    or how many of the most likely tokens to report beside each chosen one's
    log-probability; ``seed``: None draws a fresh one. ``sink(events)`` gets each
    step's events from the engine thread."""

    prompt: list
    max_tokens: int
    sampling: SamplingConfig = SamplingConfig()
    n: int = 1
    stop: tuple = ()
    eos: frozenset = frozenset()
    seed: int | None = None
    logprobs: int | None = None
    sink: Callable = print
    cancelled: bool = False
    rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)


@dataclass
class Delta:
    """A choice's new token: the text it makes safe to send (maybe ""), its
    log-probability and the ``top`` [(id, log-probability)] when asked for, and
    ``finish`` ("stop", "length") when it is the last."""

    choice: int
    token: int
    text: str
    logprob: float | None = None
    top: list | None = None
    finish: str | None = None


@dataclass
class Failure:
    """The job cannot go on: the model failed (the server's log has the traceback)
    or the server is shutting down."""

    message: str
    status: int = 503


class Busy(Exception):
    """The queue of waiting jobs is full."""


class _Row:
    """One choice being decoded."""

    __slots__ = ("job", "choice", "tokens", "text")

    def __init__(self, job: Job, choice: int, tokenizer):
        self.job, self.choice, self.tokens = job, choice, []
        self.text = ChoiceText(tokenizer, job.prompt, job.stop)


class Engine:
    """The model, its ``SlotCache`` of ``max_rows`` rows of ``max_length`` positions,
    and the scheduler thread. ``precision``: a context the model runs in (half
    precision); ``threads``: the BLAS thread limit inside the thread (None: as set)."""

    def __init__(self, model, tokenizer, max_rows: int = 16, max_length: int = 1024, *,
                 precision=None, threads: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.max_rows, self.max_length = int(max_rows), int(max_length)
        self.V = model.config.vocab_size
        self.cache = SlotCache(self.max_rows, self.max_length)
        self.rows: list = []  # _Row per active cache row, in row order
        self.last = np.zeros(self.max_rows, dtype=np.int64)  # each row's last token
        self.counts = None  # (max_rows, V) generated-token counts, for the penalties
        self.precision, self.threads = precision, threads
        self._inbox: queue.Queue = queue.Queue()
        self._head = None  # the job waiting for rows to free
        self._lock = threading.Lock()
        self._waiting = 0  # jobs submitted, not yet admitted
        self._reserved = 0  # rows in use or being prefilled
        self._prefilling = 0  # jobs in the prefill running now
        self._thread = None
        self._stopping = threading.Event()  # close() was called: end at the next step
        self.failed = None  # why the thread died, if it did
        self.stats = Counter()  # prefills, prompt_tokens, tokens, jobs, cancelled, errors
        self.batch_sizes = Counter()  # decode step batch size -> how many steps

    # ---- the asyncio side

    def start(self) -> "Engine":
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="tinylm-serve-engine",
                                        daemon=True)
        self._thread.start()
        return self

    def submit(self, jobs, max_waiting: int | None = None) -> None:
        """Queue ``jobs`` (all or none). ``Busy`` when more than ``max_waiting`` jobs
        would wait for rows: jobs the free rows can take at once do not count."""
        for job in jobs:
            if job.n > self.max_rows:
                raise ValueError(f"a job of {job.n} choices cannot fit {self.max_rows} rows")
        with self._lock:
            free = max(0, self.max_rows - self._reserved)
            if max_waiting is not None and self._waiting + len(jobs) > max_waiting + free:
                raise Busy(max(0, self._waiting - free))
            self._waiting += len(jobs)
        for job in jobs:
            self._inbox.put(job)

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def prefilling(self) -> int:
        """Jobs whose prompts the engine is running now (taken off the queue)."""
        return self._prefilling

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def metrics(self) -> dict:
        """Counters for /metrics: decode steps by batch size, tokens, jobs."""
        with self._lock:
            sizes, stats = dict(sorted(self.batch_sizes.items())), dict(self.stats)
        return {"active_rows": len(self.rows), "waiting_jobs": self._waiting,
                "decode_steps": sum(sizes.values()), "batch_size_steps": sizes,
                "max_batch_size": max(sizes, default=0), **stats}

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread; every job still waiting or decoding gets a ``Failure``."""
        if self._thread is None:
            return
        # _STOP wakes a thread blocked on an empty queue; _stopping ends it at the next
        # step even while the queue's head waits for rows (put first: its drain takes it)
        self._inbox.put(_STOP)
        self._stopping.set()
        self._thread.join(timeout)
        self._thread = None

    # ---- the thread

    def _run(self) -> None:
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(inference(self.model))
                if self.precision is not None:
                    stack.enter_context(self.precision)
                if self.threads:
                    from tinylm.threads import blas_threads

                    stack.enter_context(blas_threads(self.threads))
                while not self._stopping.is_set() and self._admit(block=not self.rows):
                    if self.rows and not self._stopping.is_set():
                        self._guarded(self._step)
        except BaseException as e:  # noqa: BLE001 - the thread must report why it ended
            self.failed = f"{type(e).__name__}: {e}"
            log.exception("the engine thread stopped")
        finally:
            self._fail_all("the server is shutting down", 503, queued=True)

    def _admit(self, block: bool) -> bool:
        """Prefill the waiting jobs that fit, a batch at a time; False when told to stop."""
        while True:
            batch = None if self._stopping.is_set() else self._take(block)
            if batch is None:
                return False
            if not batch:
                return True
            self._prefilling = len(batch)
            try:
                self._guarded(self._prefill, *batch)
            finally:
                self._prefilling = 0
            block = False

    def _take(self, block: bool):
        """The jobs at the head of the queue that fit the free rows and one prefill
        (``PREFILL_TOKENS``), off the queue ([] if none); None when told to stop."""
        batch, rows, width = [], len(self.rows), 0
        while True:
            if self._head is None:
                try:
                    self._head = self._inbox.get(block=block and not batch)
                except queue.Empty:
                    return batch
            job = self._head
            if job is _STOP:
                for waiting in batch:  # taken off the queue, never to be prefilled
                    waiting.sink([Failure("the server is shutting down", 503)])
                return None
            if not job.cancelled:
                wider = max(width, len(job.prompt))
                if rows + job.n > self.max_rows:
                    return batch  # it waits for rows to free
                if batch and wider * (len(batch) + 1) > PREFILL_TOKENS:
                    return batch  # it goes in the next prefill
            self._head = None
            with self._lock:
                self._waiting -= 1
                self._reserved = rows + (0 if job.cancelled else job.n)
            if job.cancelled:
                self._count("cancelled")
                continue
            batch.append(job)
            rows, width = rows + job.n, wider

    def _guarded(self, fn, *args) -> None:
        """Run ``fn``; if the model fails, fail every job in flight (and ``args``')."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - a failed forward must not kill the server
            log.exception("decoding failed")
            self._count("errors")
            self._fail_all(f"decoding failed: {type(e).__name__}: {e}", 500, args)

    def _count(self, name: str, k: int = 1) -> None:
        with self._lock:
            self.stats[name] += k

    def _fail_all(self, message: str, status: int = 503, jobs=(), queued=False) -> None:
        """Every job decoding (and ``jobs``; and with ``queued`` those waiting) gets a
        ``Failure``; the rows are freed."""
        for job in dict.fromkeys([r.job for r in self.rows] + list(jobs)):
            job.sink([Failure(message, status)])
        self.rows, self._reserved = [], 0
        self.cache.clear()
        if queued:
            pending = [self._head] if self._head not in (None, _STOP) else []
            self._head = None
            while True:
                try:
                    pending.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for job in pending:
                if job is not _STOP:
                    job.sink([Failure(message, 503)])

    def _prefill(self, *jobs: Job) -> None:
        """Run the ``jobs``' prompts into fresh rows, as one right-padded batch (one row
        per job; its other n - 1 choices copy it), and pick every choice's first token."""
        r0 = len(self.rows)
        ns = np.array([job.n for job in jobs])
        lengths = np.array([len(job.prompt) for job in jobs])
        first = r0 + np.cumsum(ns) - ns  # (J,) each job's first row
        ids = np.zeros((len(jobs), int(lengths.max())), dtype=np.int64)  # (J, T), 0-padded
        ids[np.arange(ids.shape[1]) < lengths[:, None]] = np.concatenate(
            [job.prompt for job in jobs])
        logits = pick_logits(self.model, ids, lengths - 1,
                             cache=self.cache.prefill(first, lengths))  # (J, V)
        for job, row in zip(jobs, first.tolist()):
            for j in range(1, job.n):
                self.cache.copy_row(row, row + j)
        self.rows += [_Row(job, j, self.tokenizer) for job in jobs for j in range(job.n)]
        if any(job.sampling.frequency_penalty or job.sampling.presence_penalty for job in jobs):
            if self.counts is None:
                self.counts = np.zeros((self.max_rows, self.V), dtype=np.int32)
        new = np.arange(r0, len(self.rows))
        if self.counts is not None:
            self.counts[new] = 0
        self._count("prefills", len(jobs))
        self._count("prefill_batches")
        self._count("prompt_tokens", int(lengths.sum()))
        self._advance(new, np.repeat(logits, ns, axis=0))

    def _step(self) -> None:
        """One forward of every active row's last token, then the next picks."""
        self._drop([i for i, r in enumerate(self.rows) if not r.job.cancelled], "cancelled")
        B = len(self.rows)
        if not B:
            return
        tokens = self.last[:B, None].copy()  # (B, 1)
        mask, positions = self.cache.decode_inputs(B)
        padded = not mask.all()  # all rows as long: no mask, default positions
        logits = pick_logits(self.model, tokens, np.zeros(B, dtype=np.int64),
                             attention_mask=mask if padded else None,
                             positions=positions if padded else None,
                             cache=self.cache.rows(B))  # (B, V)
        with self._lock:
            self.batch_sizes[B] += 1
        self._advance(np.arange(B), logits)

    def _advance(self, index, logits) -> None:
        """Pick the next token of rows ``index`` from their ``logits`` (n, V), record it,
        tell the jobs, and let the rows that ended go."""
        rows = [self.rows[i] for i in index]
        logits = logits[:, :self.V]
        tokens = self._pick(rows, index, logits)
        logp, top = self._logprobs(rows, logits, tokens)
        self.last[index] = tokens
        if self.counts is not None:
            self.counts[index, tokens] += 1
        events: dict = {}
        ended = set()
        for k, (row, token) in enumerate(zip(rows, tokens.tolist())):
            delta = self._record(row, token)
            if logp is not None and row.job.logprobs is not None:
                delta.logprob = float(logp[k])
                delta.top = top[k][:row.job.logprobs] if row.job.logprobs else []
            events.setdefault(row.job, []).append(delta)
            if delta.finish:
                ended.add(int(index[k]))
        for job, deltas in events.items():
            job.sink(deltas)
        self._count("tokens", len(rows))
        if ended:
            self._drop([i for i in range(len(self.rows)) if i not in ended], "jobs")

    def _record(self, row: _Row, token: int) -> Delta:
        row.tokens.append(token)
        text = row.text.push(token)
        finish = None
        if token in row.job.eos or row.text.stopped:
            finish = "stop"
        elif len(row.tokens) >= row.job.max_tokens:
            finish = "length"
        if finish and not row.text.stopped:
            text += row.text.finish()
        return Delta(row.choice, token, text, finish=finish)

    def _drop(self, keep: list, why: str) -> None:
        """Keep rows ``keep`` (indices into ``self.rows``), moved to the front; the jobs
        that lose their last row are counted under ``why`` ("jobs": done, "cancelled")."""
        if len(keep) == len(self.rows):
            return
        kept = set(keep)
        gone = {r.job for i, r in enumerate(self.rows) if i not in kept}
        self.cache.keep(keep)
        self.last[:len(keep)] = self.last[keep]
        if self.counts is not None:
            self.counts[:len(keep)] = self.counts[keep]
        self.rows = [self.rows[i] for i in keep]
        self._reserved = len(self.rows)
        self._count(why, len(gone - {r.job for r in self.rows}))
        if not self.rows:
            self.cache.clear()

    # ---- picking

    def _pick(self, rows, index, logits) -> np.ndarray:
        """(n,) next tokens: each row's config's processors, then argmax or a draw."""
        uniforms = _uniforms(rows)
        tokens = np.empty(len(rows), dtype=np.int64)
        groups: dict = {}
        for k, row in enumerate(rows):
            groups.setdefault(row.job.sampling, []).append(k)
        for cfg, ks in groups.items():
            ks = np.asarray(ks)
            counts = None
            if cfg.frequency_penalty or cfg.presence_penalty:
                counts = self.counts[np.asarray(index)[ks]]
            processed = process_logits(logits[ks], cfg, None, counts)
            tokens[ks] = (processed.argmax(axis=-1) if cfg.greedy
                          else pick_rows(processed, uniforms[ks]))
        return tokens

    def _logprobs(self, rows, logits, tokens):
        """(log-probabilities of ``tokens`` (n,), top [(id, lp)] per row) for the rows
        that asked; (None, None) when none did. Under the model, before any
        sampling transform (as ``generate`` reports them)."""
        ks = [k for k, r in enumerate(rows) if r.job.logprobs is not None]
        if not ks:
            return None, None
        logp = np.zeros(len(rows))
        top = [[] for _ in rows]
        lp = log_softmax_array(logits[ks])  # (m, V)
        logp[ks] = lp[np.arange(len(ks)), tokens[ks]]
        k_top = max(rows[k].job.logprobs for k in ks)
        if k_top:
            k_top = min(k_top, lp.shape[1])
            part = np.argpartition(-lp, k_top - 1, axis=-1)[:, :k_top]  # (m, k)
            vals = np.take_along_axis(lp, part, axis=-1)
            order = np.argsort(-vals, axis=-1, kind="stable")
            ids, vals = np.take_along_axis(part, order, -1), np.take_along_axis(vals, order, -1)
            for j, k in enumerate(ks):
                top[k] = list(zip(ids[j].tolist(), vals[j].tolist()))
        return logp, top


def _uniforms(rows) -> np.ndarray:
    """One uniform per row for the sampled rows (NaN for greedy ones): each job's
    generator draws (n, 1) per step, as ``generate`` draws for a batch of n."""
    draws = {}
    u = np.full(len(rows), np.nan)
    for k, row in enumerate(rows):
        job = row.job
        if job.sampling.greedy:
            continue
        if job not in draws:
            draws[job] = job.rng.random((job.n, 1))[:, 0]
        u[k] = draws[job][row.choice]
    return u


def pick_rows(logits: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """``tinylm.sampling.pick``'s draw with the uniforms given, one per row (B,): the
    inverse CDF of each row's softmax, as ``pick`` computes it (which draws them from
    one generator for the whole batch)."""
    probs = softmax_array(logits)  # (B, V)
    cdf = np.cumsum(probs, axis=-1)
    u = uniforms[:, None] * cdf[:, -1:]  # (B, 1)
    return np.minimum((cdf <= u).sum(axis=-1), logits.shape[-1] - 1)



"""CPU threads: the BLAS library's thread pool, and splitting work over Python threads.

NumPy can use several cores in two ways. The BLAS library (OpenBLAS, MKL) splits each
matrix product over its own threads: right for a few large products. For thousands of
small ones (tiled attention, small models) those threads synchronise on every call,
and on a machine whose cores are busy with other work one late thread stalls them all:
up to 10x slower, measured (bench/RESULTS.md). The other way is to split the work
ourselves and run single-threaded BLAS calls in Python threads: NumPy releases the GIL
inside BLAS calls and ufunc loops, so the threads run in parallel and meet only once,
at the end.

One knob controls both: the BLAS library's thread limit (``OPENBLAS_NUM_THREADS``,
``MKL_NUM_THREADS``, threadpoolctl, or ``blas_threads`` below). Ops that split work
themselves use that many threads (``cpu_threads``), each with single-threaded BLAS.

A third way, when tinylm's compiled CPU kernels can (``kernels.native``: built, and
NumPy's BLAS is the OpenBLAS whose sgemm they can call): inside ``blas_threads(n)``
with n > 1 they *own* the threads. The BLAS library is held at one thread, and the
kernels run the linear layers' and attention's products (single-threaded sgemm calls
on row blocks) and their own loops on one OpenMP pool of n threads (``owned_threads``).
Two pools of spinning threads on the same cores take them from each other (the nanoGPT
recipe at two threads: 240 ms a step), and a pool that sleeps between calls pays
~0.1 ms to wake (in a VM) on every one; one pool that spins briefly pays ~1 us. Other
NumPy products inside the block run on one thread.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait

try:
    from threadpoolctl import ThreadpoolController
except ImportError:  # a declared dependency; without it the limits are left alone
    ThreadpoolController = None

_controller = None
_lock = threading.Lock()  # guards everything below
_pool = None  # worker threads, kept between calls (starting them costs ~0.5 ms a call)
_active = 0  # run_parts calls in flight, in any thread
_limiter = None  # the BLAS limit of 1 they share, set by the first, lifted by the last
_outside = 1  # the BLAS thread count from before that limit
_local = threading.local()  # .in_part: this thread is running a part
_owned = 0  # inside blas_threads(n > 1) where the compiled kernels own the threads: n


def _after_fork_in_child():
    """A forked child has none of the parent's pool threads (nor its calls in flight):
    start afresh, with the BLAS limit from before any of them."""
    global _lock, _pool, _active, _limiter
    if _limiter is not None:
        _limiter.restore_original_limits()
    _lock, _pool, _active, _limiter = threading.Lock(), None, 0, None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _blas():
    """threadpoolctl's view of the BLAS libraries loaded in this process (or None)."""
    global _controller
    if ThreadpoolController is None:
        return None
    if _controller is None:
        import numpy  # noqa: F401  (loads numpy's BLAS before the scan)

        _controller = ThreadpoolController().select(user_api="blas")
    return _controller


def cores() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_threads() -> int:
    """How many threads an op that splits its own work should use: the BLAS library's
    thread limit (so ``OPENBLAS_NUM_THREADS=1`` or ``blas_threads(1)`` keeps everything
    on one core), at most the cores this process may use; 1 inside a part of
    ``run_parts`` (no nested splitting)."""
    if getattr(_local, "in_part", False):
        return 1
    if _owned > 1:
        return _owned
    with _lock:
        if _active:  # another thread's parts hold BLAS at 1: the count from before
            return _outside
    return _blas_limit()


def owned_threads() -> int:
    """The threads the compiled kernels may use: n inside ``blas_threads(n)`` when they
    own the threads (see above), else 1; 1 inside a part of ``run_parts``."""
    if _owned <= 1 or getattr(_local, "in_part", False):
        return 1
    return _owned


def _blas_limit() -> int:
    blas = _blas()
    if blas is None or not blas.lib_controllers:
        return cores()
    n = max(lib.num_threads for lib in blas.lib_controllers)
    return max(1, min(n, cores()))


@contextlib.contextmanager
def blas_threads(n: int | None):
    """Limit the BLAS library to ``n`` threads inside the block (None or 0: leave it
    as it is); with n > 1, when the compiled kernels can own the threads, the BLAS
    library gets one and the kernels n (see above). The limit is process-wide: use it
    from one thread at a time."""
    global _owned
    blas = _blas()
    if not n or blas is None:
        yield
        return
    previous = _owned
    own = n > 1 and _kernels_can_own()
    with blas.limit(limits=1 if own else n):
        # (at most the cores, counted here once; a nested blas_threads(1) keeps the
        # kernels to one)
        _owned = min(n, cores()) if own else 0
        try:
            yield
        finally:
            _owned = previous


def _kernels_can_own() -> bool:
    from tinylm.kernels import native  # (imported late: native asks this file back)

    return native.can_own_threads()


def run_parts(fn, parts: list, limit_blas: bool = True) -> list:
    """``[fn(part) for part in parts]``, one thread per part, each part's BLAS calls
    single-threaded; results come back in the order of ``parts``, and an exception in
    any part is re-raised here once the parts have stopped (Ctrl-C cancels the parts
    not yet started).

    ``limit_blas=False`` leaves the BLAS thread limit as it is, for parts whose
    products are all too small for the BLAS library to split (it runs those on the
    calling thread by itself): changing the limit costs the next large products dearly
    (OpenBLAS's pool, measured on the nanoGPT recipe at two threads: 50 -> 76 ms a
    step when attention's parts set and lifted it on every call).

    Every part runs on a pool thread while the calling thread waits: measured, a part
    run on the main thread took 1.4x as long as the same part on a pool thread. Raising
    glibc's malloc trim/mmap thresholds evens them out, so the likely cause is the
    main thread's heap returning freed memory to the OS: its large temporaries
    page-fault afresh each time, where a pool thread's arena keeps them.

    Safe to call from several threads at once: the calls share one BLAS limit, lifted
    when the last one ends. Called from inside a part, it runs the parts in turn."""
    if len(parts) <= 1 or getattr(_local, "in_part", False):
        return [fn(part) for part in parts]

    def run(part):
        _local.in_part = True
        try:
            return fn(part)
        finally:
            _local.in_part = False

    if limit_blas:
        _enter()
    try:
        with _lock:  # submitted under the lock: the pool cannot be swapped meanwhile
            pool = _workers(len(parts))
            futures = [pool.submit(run, part) for part in parts]
        try:
            wait(futures)
        except BaseException:  # Ctrl-C: drop what has not started, let the rest end
            for f in futures:
                f.cancel()
            wait(futures)
            raise
        return [f.result() for f in futures]
    finally:
        if limit_blas:
            _leave()


def _enter():
    """Hold BLAS at one thread (the first call in flight sets the limit)."""
    global _active, _limiter, _outside
    with _lock:
        if _active == 0:
            _outside = _blas_limit()
            blas = _blas()
            _limiter = blas.limit(limits=1) if blas is not None else None
        _active += 1


def _leave():
    """The last call in flight lifts the limit."""
    global _active, _limiter
    with _lock:
        _active -= 1
        if _active == 0 and _limiter is not None:
            _limiter.restore_original_limits()
            _limiter = None


def _workers(n: int) -> ThreadPoolExecutor:
    """The shared pool, with at least ``n`` threads (call with ``_lock`` held)."""
    global _pool
    if _pool is None or _pool._max_workers < n:
        old, _pool = _pool, ThreadPoolExecutor(max(n, cores() - 1),
                                              thread_name_prefix="tinylm")
        if old is not None:
            old.shutdown(wait=False)  # its queued work still runs
    return _pool


def balance(costs: list, n: int) -> list:
    """Split item indices into at most ``n`` lists of near-equal total cost (longest
    first, each to the least loaded list; deterministic). Each list comes back sorted."""
    n = max(1, min(n, len(costs)))
    loads, parts = [0.0] * n, [[] for _ in range(n)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        w = min(range(n), key=lambda w: (loads[w], w))
        loads[w] += costs[i]
        parts[w].append(i)
    return [sorted(p) for p in parts if p]

"""tinylm/threads.py: the BLAS thread limit and splitting work over threads."""

import os
import threading
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinylm import threads


@given(st.lists(st.integers(0, 100), max_size=30), st.integers(1, 5))
def test_balance_partitions_every_item_once_and_evenly(costs, n):
    parts = threads.balance(costs, n)
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(len(costs)))
    assert len(parts) <= n and all(p == sorted(p) for p in parts)
    if parts:  # longest-processing-time bound: no part exceeds the mean by a largest item
        loads = [sum(costs[i] for i in p) for p in parts]
        assert max(loads) <= sum(costs) / len(parts) + max(costs)
    assert threads.balance(costs, n) == parts  # deterministic


def test_run_parts_keeps_order_runs_in_threads_and_limits_blas():
    seen, limits = set(), []
    together = threading.Barrier(3, timeout=30)  # passes only if all 3 parts run at once

    def fn(part):
        seen.add(threading.get_ident())
        limits.append(threads.cpu_threads())
        together.wait()
        return part * 2

    assert threads.run_parts(fn, [1, 2, 3]) == [2, 4, 6]
    assert len(seen) == 3
    assert set(limits) == {1}  # BLAS is single-threaded inside the parts
    assert threads.run_parts(lambda part: part, []) == []


def test_run_parts_reraises_a_workers_exception():
    def fn(part):
        if part == 2:
            raise ValueError("part 2")
        return part

    with pytest.raises(ValueError, match="part 2"):
        threads.run_parts(fn, [1, 2])


def test_blas_threads_limits_and_restores():
    before = threads.cpu_threads()
    with threads.blas_threads(1):
        assert threads.cpu_threads() == 1
        np.ones((64, 64)) @ np.ones((64, 64))
    assert threads.cpu_threads() == before
    with threads.blas_threads(None):
        assert threads.cpu_threads() == before
    assert 1 <= before <= threads.cores()


def test_overlapping_calls_share_one_limit_and_restore_it():
    """Two user threads in run_parts at once: BLAS stays at 1 while either runs, both
    see the outside thread count, and the limit is lifted only when the last ends."""
    before = threads.cpu_threads()
    a_started, b_done = threading.Event(), threading.Event()
    seen = {}

    def a_part(part):
        a_started.set()
        b_done.wait(30)
        return part

    def b_part(part):
        return part

    def user_a():
        threads.run_parts(a_part, [1, 2])

    t = threading.Thread(target=user_a)
    t.start()
    a_started.wait(30)
    seen["during"] = threads.cpu_threads()  # another thread's parts hold BLAS at 1
    threads.run_parts(b_part, [1, 2])
    b_done.set()
    t.join(30)
    assert seen["during"] == before
    assert threads.cpu_threads() == before  # restored by the last call, not stuck at 1


def test_run_parts_inside_a_part_runs_inline():
    inner = threads.run_parts(lambda part: threads.run_parts(lambda x: x * part, [1, 2]),
                              [10, 20, 30])
    assert inner == [[10, 20], [20, 40], [30, 60]]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_gets_a_fresh_pool():
    threads.run_parts(lambda part: part, [1, 2, 3])  # the pool exists, threads started
    pid = os.fork()
    if pid == 0:  # the child: must not hang on the parent's (absent) threads
        try:
            ok = threads.run_parts(lambda part: part + 1, [1, 2]) == [2, 3]
        finally:
            os._exit(0 if ok else 1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    pytest.fail("run_parts hung in a forked child")

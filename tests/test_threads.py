"""tinylm/threads.py: the BLAS thread limit and splitting work over threads."""

import threading

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

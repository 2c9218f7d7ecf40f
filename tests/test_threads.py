"""Pools that last for the process, and the align stage's ordered results."""

import threading
import time

import pytest

import otfuse.threads
from otfuse.stages import results_in_order
from otfuse.threads import lasting_pool


def test_a_pool_is_made_once_per_name_size_and_process(monkeypatch):
    pool = lasting_pool("test", 2)
    assert lasting_pool("test", 2) is pool
    assert lasting_pool("test", 3) is not pool
    names = pool.submit(lambda: threading.current_thread().name).result()
    assert names.startswith("otfuse-test")
    monkeypatch.setattr(otfuse.threads.os, "getpid", lambda: -1)  # as in a forked child
    child = lasting_pool("test", 2)
    assert child is not pool and child.submit(lambda: 7).result() == 7


def test_results_come_in_order_and_a_failure_waits_for_the_rest():
    pool = lasting_pool("test-order", 2)
    finished = []

    def task(i: int) -> int:
        time.sleep(0.05 * (3 - i))  # the later ones finish first
        if i == 1:
            raise ValueError("task 1")
        finished.append(i)
        return i

    assert list(results_in_order([pool.submit(task, i) for i in (0, 2)])) == [0, 2]
    finished.clear()
    futures = [pool.submit(task, i) for i in range(4)]
    with pytest.raises(ValueError, match="task 1"):
        list(results_in_order(futures))
    assert all(f.done() for f in futures)  # nothing left running after the error
    assert 0 in finished

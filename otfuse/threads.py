"""Thread pools that last for the process: made on first use, remade in a forked child.

A pool made per call costs its threads' start-up every call, and more than that with PyTorch: each
new thread that runs a parallel operator starts a team of intra-op threads of its own. Six VGG11
fused warm (the align stage's pool), interleaved medians of three runs: 0.72 / 0.77 / 0.84 s with a
pool per call, 0.63 / 0.67 / 0.76 s with one pool kept (README, speed). A child process made by ``fork`` inherits the pool but not its threads, so
each pool is keyed by the process id as well.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

_POOLS: dict[tuple[str, int, int], ThreadPoolExecutor] = {}
_LOCK = threading.Lock()


def lasting_pool(name: str, workers: int) -> ThreadPoolExecutor:
    """The process's pool of ``workers`` threads named ``otfuse-<name>``, made on first use.

    Tasks on it must not wait on other tasks of the same pool (they could hold every thread)."""
    key = (name, workers, os.getpid())
    with _LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = _POOLS[key] = ThreadPoolExecutor(workers, thread_name_prefix=f"otfuse-{name}")
        return pool

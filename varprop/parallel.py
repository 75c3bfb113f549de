"""Threads that cannot change a result.

Work is cut into chunks whose bounds depend only on the shape of the problem,
never on the number of threads; each chunk is computed the same way whichever
thread runs it (BLAS itself on one thread), random draws come from each
chunk's own node of the seed tree, and chunk results are combined in chunk
order. So a run gives bit-identical numbers on 1 thread or 64. NumPy and BLAS
release the GIL, so Python threads do run in parallel here.

>>> pool = Pool(2)
>>> [s.start for s in row_chunks(1000, 1024)]
[0, 256, 512, 768]
>>> pool.map(lambda s: s.stop - s.start, row_chunks(1000, 1024))[-1]
232
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Elements per chunk: big enough that a chunk's work dwarfs the cost of handing
# it to a thread and that one-thread BLAS products on chunks come within ~10%
# of multi-threaded BLAS on the whole (benchmarks/). Changing it changes which
# random numbers each weight gets, and so every result.
CHUNK_ELEMENTS = 2**18
_EXECUTORS: dict[int, ThreadPoolExecutor] = {}
_LOCK = threading.Lock()
# A forked child inherits the executors but not their threads: it must make its own.
os.register_at_fork(after_in_child=_EXECUTORS.clear)


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def row_chunks(n_rows: int, n_cols: int, elements: int = CHUNK_ELEMENTS) -> list[slice]:
    """Fixed slices of ``n_rows`` rows, about ``elements`` entries each."""
    step = max(1, math.ceil(elements / max(n_cols, 1)))
    return [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)] or [slice(0, 0)]


class Pool:
    """``map`` over chunks on ``threads`` threads (in the caller's thread when 1)."""

    def __init__(self, threads: int | None = None):
        self.threads = available_cores() if threads is None else threads

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """``[fn(x) for x in items]``, in order, computed in parallel."""
        items = list(items)
        if self.threads == 1 or len(items) < 2:
            return [fn(x) for x in items]
        with _LOCK:
            if self.threads not in _EXECUTORS:
                _EXECUTORS[self.threads] = ThreadPoolExecutor(self.threads, thread_name_prefix="varprop")
            executor = _EXECUTORS[self.threads]
        return list(executor.map(fn, items))

    def sized(self, elements: int) -> "Pool":
        """This pool for work on about ``elements`` values, or the caller's
        thread alone when that is under one chunk: handing so little to
        threads costs more than it saves (a width-100 layer runs 1.5x slower).
        Blocks are fixed by the shapes either way, so the numbers are the same."""
        return self if elements >= CHUNK_ELEMENTS else SERIAL


SERIAL = Pool(1)

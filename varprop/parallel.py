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

import contextvars
import itertools
import math
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Callable, Iterable, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Elements per chunk: big enough that a chunk's work dwarfs the cost of handing
# it to a thread and that one-thread BLAS products on chunks come within ~10%
# of multi-threaded BLAS on the whole (benchmarks/). Changing it changes which
# random numbers each weight gets, and so every result.
CHUNK_ELEMENTS = 2**18
_EXECUTORS: dict[int, ThreadPoolExecutor] = {}
_LOCK = threading.Lock()
_RUNNING = 0  # maps under way (for shutdown), under _LOCK
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

    def map(self, fn: Callable[[T], R], items: Iterable[T], caller: bool = True) -> list[R]:
        """``[fn(x) for x in items]``, in order, computed in parallel.

        With ``caller`` the caller's thread takes items too, beside
        ``threads - 1`` pool threads, each taking the next item not yet
        taken: a future per thread rather than per item (a map of a few
        small blocks cost 70 us in futures, the caller idle). A pool thread
        that has not started when the caller runs out of items is cancelled,
        so a map inside a map cannot wait on itself. Without ``caller``,
        ``threads`` pool threads take the items and the caller waits: for
        long items that allocate large arrays, which in the main thread come
        from glibc's main arena, returned to the system and faulted back in
        on every layer (the seed case ran 6% slower); a map inside a pool
        thread's item always takes items in its caller.

        The exception of the first failing item (in item order, as a loop
        would raise it) is raised once every started item has finished; no
        item is started after a failure. An interrupt of the caller (Ctrl-C,
        or varprop's SIGTERM handler: signals reach the main thread) stops
        the map at once: it is raised without waiting for the items running
        on pool threads, which a long item ends early by checking
        :func:`stopped`. Items run in a copy of the caller's context
        (``np.errstate`` included)."""
        items = list(items)
        if self.threads == 1 or len(items) < 2:
            return [fn(x) for x in items]
        global _RUNNING
        with _LOCK:
            if self.threads not in _EXECUTORS:
                _EXECUTORS[self.threads] = ThreadPoolExecutor(self.threads, thread_name_prefix="varprop")
            executor = _EXECUTORS[self.threads]
            _RUNNING += 1
        try:
            return self._map(executor, fn, items, caller)
        finally:
            with _LOCK:
                _RUNNING -= 1

    def _map(self, executor: ThreadPoolExecutor, fn: Callable[[T], R], items: list[T], caller: bool) -> list[R]:
        caller = caller or getattr(_ITEM, "stop", None) is not None  # a pool thread never waits on the pool
        n = len(items)
        results: list[Any] = [None] * n
        failed: dict[int, BaseException] = {}
        order = itertools.count()  # next() on a count is atomic under the GIL
        stop = threading.Event()  # set on the first failure, or when the caller is interrupted

        def drain() -> None:
            outer, _ITEM.stop = getattr(_ITEM, "stop", None), stop
            try:
                while not stop.is_set():
                    i = next(order)
                    if i >= n:
                        return
                    try:
                        results[i] = fn(items[i])
                    except Stopped:
                        return
                    except Exception as e:  # re-raised by the caller, in item order
                        failed[i] = e
                        stop.set()
                    except BaseException:
                        stop.set()
                        raise
            finally:
                _ITEM.stop = outer
        helpers: list[Any] = []
        try:
            for _ in range(min(self.threads, n) - caller):  # in the caller's context: NumPy's errstate is in it
                helpers.append(executor.submit(contextvars.copy_context().run, drain))
            if caller:
                drain()
            else:
                _wait(helpers)
        except BaseException:  # an interrupt, raised at once: the running items see stopped() and end early
            stop.set()
            for future in helpers:
                future.cancel()
            raise
        _wait([f for f in helpers if not f.cancel()])  # the running items, before the map's result stands
        if failed:
            raise failed[min(failed)]
        return results

    def sized(self, elements: int) -> "Pool":
        """This pool for work on about ``elements`` values, or the caller's
        thread alone when that is under one chunk: handing so little to
        threads costs more than it saves (a width-100 layer runs 1.5x slower).
        Blocks are fixed by the shapes either way, so the numbers are the same."""
        return self if elements >= CHUNK_ELEMENTS else SERIAL


def _wait(futures: list[Future]) -> None:
    """Wait for ``futures`` and raise the first one's exception, waking every 50 ms: a signal (Ctrl-C,
    SIGTERM) delivered to another thread, a native one of BLAS or torch, only sets Python's flag, and its
    handler runs when the main thread next runs Python, which a wait without a timeout would put off
    until the futures end (a replicate group's whole depth)."""
    pending = futures
    while pending:
        _, pending = wait(pending, timeout=0.05)
    for future in futures:
        future.result()


def shutdown() -> bool:
    """Stop the pools' threads, unless a map is running (in another thread): whether they were stopped.
    A later map starts them again. For a process about to fork, which must not copy threads whose locks
    its child could never see released."""
    with _LOCK:
        if _RUNNING:
            return False
        executors = list(_EXECUTORS.values())
        _EXECUTORS.clear()
    for executor in executors:  # outside the lock, which a map's nested map may be waiting for
        executor.shutdown(wait=True)
    return True


SERIAL = Pool(1)
_ITEM = threading.local()  # .stop: the stop event of the map whose item this thread runs


class Stopped(Exception):
    """Raised by :func:`check_stopped` in an item of a map that has stopped: the item ends early."""


def stopped() -> bool:
    """Whether the map whose item this thread runs has stopped (a failure, or an interrupt of its
    caller): a long item checks it between steps and ends early."""
    stop = getattr(_ITEM, "stop", None)
    return stop is not None and stop.is_set()


def check_stopped() -> None:
    """Raise :class:`Stopped` when :func:`stopped`: the item's result will not be read."""
    if stopped():
        raise Stopped

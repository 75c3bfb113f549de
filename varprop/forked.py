"""Work shared out to forked child processes, for Python-heavy work that threads cannot share.

Threads divide NumPy's and BLAS's work well while each call runs long: the
call releases the GIL. Work made of many short calls holds the GIL between
them, and two threads then mostly wait for each other: matplotlib's drawing,
and the engine's stacked small layers (the seed case's 50 replicates of
width 100 ran 1.37x faster on two threads than on one, 2.1x in two
processes). A forked child starts with the parent's memory, so it needs
nothing but its share; it hands back its result, pickled, through a pipe.

Rules, which make a fork safe and invisible:

- fork only where it is safe (:func:`forkable`): Linux (where a child can
  be made to die with its parent; macOS's system libraries are not all
  fork-safe), torch, jax and tensorflow not loaded (their thread pools live
  outside Python's sight), no other Python thread once varprop's pools have
  stopped their idle threads;
- signals stay blocked across the forks until the child has its default
  handlers (one caught by the parent's Python handler in the child would
  unwind the parent's stack there, and discard its staging directory) and
  the parent has recorded every child (which it kills on an interrupt);
- the child dies with its parent (Linux's PR_SET_PDEATHSIG: a killed run
  leaves no child behind) and leaves by ``os._exit``, never unwinding the
  parent's stack, whatever happens;
- a child that hands back no result (it failed, was killed, or no process
  could be had) leaves its share to the parent, which does it here: the
  result is the same either way, only slower.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import selectors
import signal
import struct
import sys
import threading
import warnings
from typing import Any, Callable, Sequence, TypeVar

from . import parallel

S = TypeVar("S")
R = TypeVar("R")
Progress = Callable[[int], None]

_FRAME = struct.Struct("!cQ")  # a message's kind (b"p": progress, b"r": the result) and its length
_PROGRESS = struct.Struct("!q")
_READ = 1 << 20
# Libraries whose native thread pools live outside Python's sight (a child could inherit a lock that one of
# their threads held, and wait on it for ever).
_UNSAFE = ("torch", "jax", "tensorflow")


def forkable() -> bool:
    """Whether a fork is safe here: Linux, no torch (nor jax, nor tensorflow) loaded, and no Python thread
    but this one once varprop's pools have stopped their idle threads (they start again at the next map)."""
    if not sys.platform.startswith("linux") or any(name in sys.modules for name in _UNSAFE):
        return False
    return parallel.shutdown() and threading.active_count() == 1


def share_out(fn: Callable[[S, Progress | None], R], shares: Sequence[S], progress: Progress | None = None
              ) -> list[R]:
    """``[fn(share, progress) for share in shares]``: the first share here, each other one in a forked
    child at the same time (call only where :func:`forkable`). A child's ``progress(k)`` calls reach
    ``progress`` here, in this thread, as they come. A share whose child hands back nothing is done
    here after all, its progress counted once.

    >>> if forkable():
    ...     assert share_out(lambda share, progress: (os.getpid(), share * 2), [1, 2])[1][1] == 4
    """
    parent = os.getpid()
    for stream in (sys.stdout, sys.stderr):  # what is buffered is written once, not once more by a child
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.flush()
    children: dict[int, _Child] = {}
    results: list[Any] = [None] * len(shares)
    done = [False] * len(shares)
    reported = [0] * len(shares)
    selector = selectors.DefaultSelector()
    try:
        # Every signal waits until the children are forked and recorded: one raised here mid-loop would
        # leave a child unknown to the clean-up below.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            for i, share in enumerate(shares[1:], 1):
                child = _fork(fn, share, parent, mask, progress is not None,
                              [selector.fileno(), *(c.fd for c in children.values())])
                if child is not None:
                    children[i] = child
                    selector.register(child.fd, selectors.EVENT_READ, i)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a pending signal is raised here, in the try

        def pump(timeout: float | None) -> None:
            """Read what the children have said, waiting up to ``timeout`` seconds for the first word."""
            for key, _ in selector.select(timeout):
                i = key.data
                child = children[i]
                data = os.read(child.fd, _READ)
                if not data:  # the child has ended: its result, if any, is in
                    selector.unregister(child.fd)
                    continue
                for kind, payload in child.frames(data):
                    if kind == b"p":
                        k = _PROGRESS.unpack(payload)[0]
                        reported[i] += k
                        if progress is not None:
                            progress(k)
                    else:
                        results[i], done[i] = pickle.loads(payload), True

        def mine(k: int) -> None:
            assert progress is not None
            progress(k)
            pump(0)
        results[0], done[0] = fn(shares[0], mine if progress is not None and children else progress), True
        while selector.get_map():
            pump(0.05)  # a timeout, so that a signal's handler runs here soon
    except BaseException:
        for child in children.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)
        raise
    finally:
        selector.close()
        for child in children.values():
            os.close(child.fd)
            with contextlib.suppress(ChildProcessError):  # SIGCHLD ignored: the kernel reaped it
                os.waitpid(child.pid, 0)
    for i, share in enumerate(shares):
        if not done[i]:
            results[i] = fn(share, _skipping(progress, reported[i]))
    return results


def share_items(fn: Callable[[S, Progress | None], R], items: Sequence[S], shares: Sequence[Sequence[int]],
                progress: Progress | None = None) -> list[R]:
    """``[fn(item, progress) for item in items]``, in that order, the items of ``shares[k]`` (indices
    into ``items``, every one in one share) done by process k of :func:`share_out`.

    >>> if forkable():
    ...     assert share_items(lambda x, progress: x * x, [1, 2, 3], contiguous(3, 2)) == [1, 4, 9]
    """
    done = share_out(lambda share, report: [fn(items[i], report) for i in share], shares, progress)
    results: list[Any] = [None] * len(items)
    for share, out in zip(shares, done):
        for i, value in zip(share, out):
            results[i] = value
    return results


def contiguous(count: int, n: int) -> list[list[int]]:
    """``range(count)`` cut into ``n`` runs of consecutive indices, as equal as they come.

    >>> contiguous(5, 2)
    [[0, 1], [2, 3, 4]]
    """
    return [list(range(k * count // n, (k + 1) * count // n)) for k in range(n)]


class _Child:
    """A forked child: its pid, the read end of its pipe, and what has been read of a message."""

    def __init__(self, pid: int, fd: int):
        self.pid, self.fd = pid, fd
        self.buffer = bytearray()  # grown in place: a result of tens of MB arrives in many reads

    def frames(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """The whole messages that ``data`` completes."""
        self.buffer += data
        out, start = [], 0
        while len(self.buffer) - start >= _FRAME.size:
            kind, size = _FRAME.unpack_from(self.buffer, start)
            end = start + _FRAME.size + size
            if len(self.buffer) < end:
                break
            with memoryview(self.buffer) as view:  # one copy of the payload
                out.append((kind, bytes(view[start + _FRAME.size:end])))
            start = end
        if start:
            del self.buffer[:start]
        return out


def _fork(fn: Callable[[Any, Progress | None], Any], share: Any, parent: int, mask: Any, reports: bool,
          others: list[int]) -> _Child | None:
    """A child doing ``fn(share, ...)`` (sending progress if ``reports``), or None when no process can be
    had (EAGAIN, ENOMEM). ``others``: this process's descriptors of the work (the selector, the read ends
    of the children forked before), which the child closes."""
    read, write = os.pipe()
    try:
        with warnings.catch_warnings():
            # Python 3.12+ warns of any other thread, native ones included: OpenBLAS's, which fork with their
            # own at-fork handlers; varprop's are stopped (forkable) and torch is not loaded.
            warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)
            pid = os.fork()
    except OSError:
        os.close(read)
        os.close(write)
        return None
    if pid == 0:
        for fd in (read, *others):
            os.close(fd)
        _child(fn, share, write, parent, mask, reports)
    os.close(write)
    return _Child(pid, read)


def _child(fn: Callable[[Any, Progress | None], Any], share: Any, fd: int, parent: int, mask: Any,
           reports: bool) -> None:
    """The forked child's life: default signal handlers, death with the parent, its share, its result
    through the pipe, and an exit that never unwinds the parent's stack."""
    code = 1
    try:
        for sig in signal.valid_signals():  # the parent's Python handlers are not the child's
            with contextlib.suppress(OSError, ValueError):
                if callable(signal.getsignal(sig)):  # (ignored stays ignored: nohup, a background job)
                    signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        _die_with_parent(parent)
        result = fn(share, (lambda k: _send(fd, b"p", _PROGRESS.pack(k))) if reports else None)
        _send(fd, b"r", pickle.dumps(result, pickle.HIGHEST_PROTOCOL))
        code = 0
    finally:
        os._exit(code)


def _send(fd: int, kind: bytes, payload: bytes) -> None:
    data = memoryview(_FRAME.pack(kind, len(payload)) + payload)
    while data:
        data = data[os.write(fd, data):]


def _skipping(progress: Progress | None, skip: int) -> Progress | None:
    """``progress``, less the first ``skip`` steps (a failed child's, already counted)."""
    if progress is None or skip == 0:
        return progress
    left = skip

    def report(k: int) -> None:
        nonlocal left
        passed = min(left, k)
        left -= passed
        if k > passed:
            progress(k - passed)
    return report


def _die_with_parent(parent: int) -> None:
    """On Linux, have the kernel kill this process when its parent dies (a killed run leaves no child
    working for it); leave at once if it died before that was asked."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)

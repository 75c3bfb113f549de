"""The machine a benchmark ran on, as every results file names it: a ratio against a peer travels only
with its machine (the same training step measured 1.03x PyTorch's on an AMD EPYC and 1.26x on an Intel
Xeon with AVX-512, where PyTorch's products run in oneDNN/MKL and NumPy's in OpenBLAS)."""

from __future__ import annotations

import os
import platform
import time


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def describe() -> str:
    """One line: the platform, the CPU model, the CPU count and Python's version."""
    return f"{platform.platform()}, {cpu_model()}, {os.cpu_count()} CPUs; Python {platform.python_version()}"


SETTLE_SECONDS = 0.2


def settle() -> None:
    """Sleep long enough for the previous contender's worker threads to stop spinning, before the next is timed.

    After a threaded call OpenBLAS's workers spin on a core for about 0.1 s
    (measured here: one core fully busy for 0.1 s after a 1024^3 sgemm on two
    threads; PyTorch's OpenMP threads for about 5 ms). On a two-core machine
    the contender timed next would lose one of its cores meanwhile: an epoch
    of varprop's trainer on two threads measured 0.102 s right after a
    threaded NumPy product, 0.072-0.078 s after a pause."""
    time.sleep(SETTLE_SECONDS)

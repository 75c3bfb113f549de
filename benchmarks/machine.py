"""The machine a benchmark ran on, as every results file names it: a ratio against a peer travels only
with its machine (the same training step measured 1.03x PyTorch's on an AMD EPYC and 1.26x on an Intel
Xeon with AVX-512, where PyTorch's products run in oneDNN/MKL and NumPy's in OpenBLAS)."""

from __future__ import annotations

import os
import platform


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

"""Numbers carried as ``x * exp(log_factor)``: the one place that decides when
such a number leaves float64's range (ARCHITECTURE.md, "Numerical rules").

Every column a run reports from a log-scale value goes through
:func:`exp_times`, so two columns of one layer overflow at the same point
(``inf`` exactly where float64 ends, never a warning), while the ``log10_``
columns beside them stay exact.

>>> exp_times(-2.0, 1000.0), exp_times(3.0, 0.0), exp_times(1.0, -1000.0)
(-inf, 3.0, 0.0)
"""

from __future__ import annotations

import math
from typing import Any


def exp_times(x: float, log_factor: float) -> float:
    """``x * exp(log_factor)``: ``±inf`` past float64's largest value, 0 below its smallest."""
    if x == 0 or not math.isfinite(x):
        return x
    if abs(log_factor) < 700:  # exp is a normal float: one rounded product, overflowing to inf by itself
        return x * math.exp(log_factor)
    try:  # x itself may bring the product back into range: add the logs
        return math.copysign(math.exp(math.log(abs(x)) + log_factor), x)
    except OverflowError:
        return math.copysign(math.inf, x)


def exp_of(log_values: Any) -> Any:
    """``exp`` of an array of logs with :func:`exp_times`' rule: ``inf`` exactly
    where float64 ends, 0 below it, NaN kept, never a warning (a theory
    column beside a measured one overflows where it does).

    >>> exp_of([0.0, 710.0, -750.0, float("nan")]).tolist()
    [1.0, inf, 0.0, nan]
    """
    import numpy as np  # here: importing varprop loads no third-party module

    with np.errstate(over="ignore", under="ignore"):
        return np.exp(np.asarray(log_values, dtype=float))

"""Values carried as ``h = exp(log_s) * u`` with ``u`` of moderate size, so
nothing overflows at any depth (ARCHITECTURE.md, "Numerical rules").

Each product is scaled, block by block while in cache, by a factor set from
its input's exact mean square, which keeps mean squares near 1 after a
product and within 2^+-60 always; renormalising moves a factor between u
and log_s, never changing the value.

>>> import numpy as np
>>> u, log_s = renorm(np.array([[3.0, 4.0]]), 0.0)
>>> round(float((u * u).mean()), 12), round(float(np.exp(2 * log_s)), 9)  # the mean square moved to log_s
(1.0, 12.5)
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from ..parallel import SERIAL, Pool, row_chunks
from ..stats import side_stats_ms

def sum_squares(x: np.ndarray) -> float:
    """Sum of squares of ``x`` in x's own dtype, or in float64 where that
    overflows or underflows. einsum, not BLAS: BLAS splits a dot product
    across its threads, which changes the last bits."""
    flat = x.reshape(-1)
    total = float(np.einsum("i,i->", flat, flat))
    if total < np.finfo(x.dtype).tiny * 2**24 or not math.isfinite(total):
        total = float(np.einsum("i,i->", flat, flat, dtype=np.float64))
    return total


def renorm(u: np.ndarray, log_s: float, pool: Pool = SERIAL) -> tuple[np.ndarray, float]:
    """Rescale u in place to unit RMS, moving the factor into log_s.

    The factor only moves between u and log_s, so its own rounding is
    harmless: a dot product in u's dtype is accurate enough.
    """
    chunks = row_chunks(u.shape[0], u.size // max(u.shape[0], 1))
    ms = math.fsum(pool.map(lambda rows: sum_squares(u[rows]), chunks)) / u.size
    if ms > 0 and math.isfinite(ms):
        f = u.dtype.type(1 / math.sqrt(ms))
        if not math.isfinite(f):  # all entries subnormal: scale through float64
            u = (u.astype(np.float64) / math.sqrt(ms)).astype(u.dtype)
            return u, log_s + 0.5 * math.log(ms)
        pool.map(lambda rows: np.multiply(u[rows], f, out=u[rows]), chunks)
        log_s -= math.log(float(f))  # the factor applied, rounding included
    return u, log_s


def narrow(v: np.ndarray, log_s: float, dtype: type, pool: Pool = SERIAL) -> tuple[np.ndarray, float]:
    """A float64 pair renormalised in float64 and only then cast to ``dtype``,
    so entries far below the largest keep their value rather than flushing."""
    v, log_s = renorm(v, log_s, pool)
    return v.astype(dtype, copy=False), log_s


def bias_terms(log_z: float, b: np.ndarray) -> tuple[float, np.ndarray | None]:
    """How ``exp(log_z) * z + b`` is carried: the log-scale of the sum and
    the bias in its units (None for a zero bias), whichever term dominates."""
    peak = float(np.max(np.abs(b)))
    if peak == 0:
        return log_z, None
    rms_b = peak * math.sqrt(float(np.mean((b / peak) ** 2)))
    top = max(log_z, math.log(rms_b))
    return top, b * math.exp(-top)


def prescale(n: int, ms_in: float, ms_w: float, dtype: type) -> Any:
    """The factor c, in the compute dtype, that brings ``c * (u @ W0)`` to a
    mean square near 1: E ms(u @ W0) = n ms(u) ms(W0) over the draw of W0.
    Applied to each block of the product while it is in cache, it replaces
    a renormalising pass; the next layer's factor uses this layer's exact
    mean square, so the small miss never compounds (and :func:`in_band`
    catches a large one)."""
    expected = n * ms_in * ms_w
    if not (expected > 0 and math.isfinite(expected)):
        return dtype(1)
    c = dtype(1 / math.sqrt(expected))
    return c if math.isfinite(c) and c > 0 else dtype(1)


# Mean squares kept within 2^+-60, so that any factor prescale picks is a
# normal float32 and no square under- or overflows.
MS_BAND = (2.0**-60, 2.0**60)


class Values(NamedTuple):
    """A layer's values ``exp(log_s) * u`` and the float64 mean square of u."""

    u: np.ndarray
    log_s: float
    ms: float


def values(u: np.ndarray, log_s: float, pool: Pool = SERIAL) -> Values:
    """``(u, log_s)`` with u's mean square attached."""
    return Values(u, log_s, side_stats_ms(u, log_s, pool=pool)[1])


def in_band(v: Values, pool: Pool) -> Values:
    """``v`` itself, or renormalised to unit RMS when its mean square left the
    band (saturated activations or gradients, where the prescale, set from the
    input's mean square, overshoots)."""
    if MS_BAND[0] <= v.ms <= MS_BAND[1] or v.ms == 0 or not math.isfinite(v.ms):
        return v
    u, log_s = renorm(v.u, v.log_s, pool)
    return values(u, log_s, pool)

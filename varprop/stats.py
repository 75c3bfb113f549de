"""Per-layer statistics of a log-scaled layer, and their summary over replicates.

A layer's values are ``x = exp(log_s) * u`` (montecarlo/scaled.py); every statistic
is computed from ``u`` in float64 and then scaled, so none overflows: values
beyond float64 show as ``inf`` while ``log10_std`` stays exact.

>>> import numpy as np
>>> s = side_stats(np.array([[1.0, -1.0], [1.0, -1.0]]), log_s=np.log(10.0))
>>> [round(s[k], 12) for k in ("std", "log10_std", "cos_sim")]
[10.0, 1.0, 1.0]
"""

from __future__ import annotations

import math
import threading
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import pandas as pd
from scipy import special

from .logscale import exp_times
from .parallel import SERIAL, Pool, row_chunks

STATS = ("mean", "std", "log10_std", "log10_abs_mean", "second_moment", "sq_unit_mean", "unit_var", "frac_zero",
         "frac_saturated", "cos_sim", "abs_cos_sim", "log10_sq_unit_mean", "log10_unit_var")
# The channel statistics' log10 (exact at any magnitude, as log10_std: the plain ones are inf beyond float64),
# whose summary over replicates is log10 of their mean, as the mean network's std is.
LOG10_CHANNELS = ("log10_sq_unit_mean", "log10_unit_var")
ABS_COS_SAMPLES = 128  # |cos| is averaged over the pairs of the first 128 live samples
SATURATION = 1e-3  # |phi'(z)| below this counts as saturated
LN10 = math.log(10.0)


# Float64 work is done on pieces of about this many entries, in a per-thread
# buffer: every pass over a piece then runs in the core's own cache.
_PIECE_ELEMENTS = 2**17
_SCRATCH = threading.local()


def _scratch(n: int) -> np.ndarray:
    """This thread's float64 buffer of at least n entries, 64-byte aligned on
    every thread: a vectorised kernel that peels to alignment then groups a
    sum the same way whichever thread runs a block."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.size < n:
        raw = np.empty(n + 8)
        start = (-raw.ctypes.data % 64) // 8
        buf = _SCRATCH.buf = raw[start:start + n]
    return buf[:n]


class Sums(NamedTuple):
    """Float64 sums over a block of rows: its row count, column sums, column
    sums of squares about the block's own column means, row sums of squares,
    the sum of its unit-normalised rows, and its count of exact zeros."""

    rows: int
    col_sum: np.ndarray
    col_m2: np.ndarray
    row_sq: np.ndarray
    unit_sum: np.ndarray
    zeros: int


def _pooled(counts: np.ndarray, col_sums: np.ndarray, col_m2s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column sums and sums of squares about the joint means of several
    blocks (one per row of the inputs): the between/within split, each
    block's squares about its own means plus its means' offsets from the
    joint mean, so no E[x^2] - E[x]^2 cancellation anywhere."""
    col_sum = col_sums.sum(axis=0)
    k = counts[:, None]
    offsets = col_sums / np.maximum(k, 1) - col_sum / max(int(counts.sum()), 1)
    return col_sum, col_m2s.sum(axis=0) + (k * offsets * offsets).sum(axis=0)


def block_sums(u: np.ndarray) -> Sums:
    """The :class:`Sums` of a block of rows of ``u``, computed in float64."""
    rows, n = u.shape
    step = max(1, _PIECE_ELEMENTS // max(n, 1))
    starts = range(0, rows, step)
    counts = np.array([min(step, rows - i) for i in starts])
    col_sums, col_m2s = np.empty((len(counts), n)), np.empty((len(counts), n))
    row_sq, unit_sum, nonzero = np.empty(rows), np.zeros(n), 0
    for p, i in enumerate(starts):
        piece = u[i:i + step]
        r = counts[p]
        x = _scratch(r * n).reshape(r, n)
        np.copyto(x, piece)
        sq = row_sq[i:i + r]
        np.vecdot(x, x, out=sq)
        inv_norm = np.zeros(r)
        np.divide(1.0, np.sqrt(sq), out=inv_norm, where=sq > 0)
        unit_sum += inv_norm @ x
        ones = np.ones(r)
        np.matmul(ones, x, out=col_sums[p])
        x -= col_sums[p] / r
        np.multiply(x, x, out=x)
        np.matmul(ones, x, out=col_m2s[p])
        nonzero += int(np.count_nonzero(piece != 0))  # faster on a mask than on floats
    col_sum, col_m2 = _pooled(counts, col_sums, col_m2s)
    return Sums(rows, col_sum, col_m2, row_sq, unit_sum, u.size - nonzero)


def row_squares(u: np.ndarray) -> np.ndarray:
    """The float64 sum of squares of each row of ``u``: :func:`block_sums`' ``row_sq``, bit for bit (the same
    pieces, copied into the same aligned buffer), without its other sums."""
    rows, n = u.shape
    step = max(1, _PIECE_ELEMENTS // max(n, 1))
    row_sq = np.empty(rows)
    for i in range(0, rows, step):
        r = min(step, rows - i)
        x = _scratch(r * n).reshape(r, n)
        np.copyto(x, u[i:i + r])
        np.vecdot(x, x, out=row_sq[i:i + r])
    return row_sq


def mean_square(u: np.ndarray, pool: Pool = SERIAL) -> float:
    """The float64 mean square of ``u``: the second value of :func:`side_stats_ms`, bit for bit, in one
    pass of sums of squares (for a layer whose mean square sets a scale but whose statistics are not
    reported).

    >>> mean_square(np.array([[3.0, 4.0]]))
    12.5
    """
    return mean_of_row_squares(pool.sized(u.size).map(lambda rows: row_squares(u[rows]), row_chunks(*u.shape)),
                               u.size)


def mean_of_row_squares(parts: Sequence[np.ndarray], size: int) -> float:
    """The mean square of ``size`` values from their rows' sums of squares, in blocks of rows (in order):
    :func:`mean_square`'s and :func:`from_sums`' sum, bit for bit."""
    return float(np.concatenate(parts).sum()) / size


def side_stats_stacked(u: np.ndarray, log_s: Sequence[float], saturated: Sequence[float]
                       ) -> list[tuple[dict[str, float], float]]:
    """:func:`side_stats_ms` of each block ``u[k]`` of a stack (blocks x rows x n)
    of small blocks (one piece of float64 work each), the same numbers, each
    pass made once over the whole stack: a small block's per-call overhead is
    paid once for all of them."""
    blocks, rows, n = u.shape
    if blocks < 2 or rows * n > _PIECE_ELEMENTS:  # (then one chunk, one piece: side_stats_ms' one block_sums)
        return [side_stats_ms(b, ls, sat) for b, ls, sat in zip(u, log_s, saturated)]
    # Each block's copy starts on a 64-byte boundary, as block_sums' own does: the same kernels, the same sums.
    stride = -(-rows * n // 8) * 8
    x = _scratch(blocks * stride).reshape(blocks, stride)[:, :rows * n].reshape(blocks, rows, n)
    np.copyto(x, u)
    row_sq = np.vecdot(x, x)
    inv_norm = np.zeros((blocks, rows))
    np.divide(1.0, np.sqrt(row_sq), out=inv_norm, where=row_sq > 0)
    unit_sum = np.zeros(n) + np.matmul(inv_norm[:, None, :], x)[:, 0]
    ones = np.ones(rows)
    col_sum = np.matmul(ones, x)
    x -= col_sum[:, None, :] / rows
    np.multiply(x, x, out=x)
    col_m2 = np.matmul(ones, x)
    offsets = col_sum / rows - col_sum / rows  # _pooled's, for one piece: zero where finite
    col_m2 += rows * offsets * offsets
    zeros = [np.count_nonzero(z) for z in u == 0]  # count_nonzero with an axis is 3x slower
    # from_sums, a reduction at a time over the stack
    col_mean = col_sum / rows
    mean = col_mean.mean(axis=1)
    m2_sum = col_m2.sum(axis=1)
    sq_mean = np.vecdot(col_mean, col_mean)
    spread = np.mean((col_mean - mean[:, None]) ** 2, axis=1)
    second = row_sq.sum(axis=1) / (rows * n)
    live = np.count_nonzero(row_sq > 0, axis=1)
    unit_sq = np.vecdot(unit_sum, unit_sum)
    heads = abs_cos_of_rows(u[:, :ABS_COS_SAMPLES], row_sq[:, :ABS_COS_SAMPLES])
    size = rows * n
    out = []
    for k in range(blocks):
        unit_var = float(m2_sum[k]) / size
        var = unit_var + float(spread[k])
        m, ls, kk = float(mean[k]), log_s[k], int(live[k])
        if kk >= 2:
            cos_sim = (float(unit_sq[k]) - kk) / (kk * (kk - 1))
            abs_cos = float(heads[k]) if not math.isnan(heads[k]) else _live_head_cos(u[k], row_sq[k])
        else:
            cos_sim = abs_cos = math.nan
        out.append((_stats(ls, m, var, float(second[k]), float(sq_mean[k]) / n, unit_var, int(zeros[k]) / size,
                           saturated[k], cos_sim, abs_cos), float(second[k])))
    return out


class Later:
    """The statistics rows of small layers, taken several at a time.

    A 64 x 64 layer's statistics cost 120 us one at a time, nearly all of it
    the Python and call overhead of some thirty NumPy passes; taken with 31
    others by :func:`side_stats_stacked`, 21 us. :meth:`stats` copies a
    layer's values into a stack of its shape and returns the dict its row
    will be, empty until the stack holds one piece of float64 work (or
    :meth:`flush`) and its statistics are taken: :func:`side_stats_ms`'
    numbers, bit for bit. Whatever reads a row waits for it with
    :meth:`then`, run in the order asked once every row asked before it is
    in (when a stack's filling leaves none waiting, or at the flush). The
    stacks are reused, and hold at most :data:`LATER_ELEMENTS` values however
    many shapes wait; at most :data:`LATER_CALLS` calls wait.

    >>> later = Later()
    >>> u = np.array([[1.0, -1.0], [1.0, -1.0]], np.float32)
    >>> row = later.stats(u, log_s=0.0)
    >>> later.then(lambda: print(row["std"]))
    >>> later.flush()
    1.0
    """

    def __init__(self) -> None:
        self._stacks: dict[tuple[tuple[int, ...], Any], _Stack] = {}
        self._after: list[Callable[[], None]] = []

    @staticmethod
    def takes(u: np.ndarray) -> bool:
        """Whether ``u`` is small enough to wait: at least four such layers to a stack, each of one block
        of rows (so that side_stats_ms takes it in one block_sums, as the stack does)."""
        return u.ndim == 2 and u.size * 4 <= _PIECE_ELEMENTS and len(row_chunks(*u.shape)) == 1

    def stats(self, u: np.ndarray, log_s: float, saturated: float = math.nan) -> dict[str, float]:
        """The statistics row of ``exp(log_s) * u`` (which :meth:`takes`), filled in later."""
        key = (u.shape, u.dtype)
        stack = self._stacks.get(key)
        if stack is None:
            slots = _PIECE_ELEMENTS // u.size
            if self.held + slots * u.size > LATER_ELEMENTS:
                self._fill(drop=True)  # many shapes: take what waits and free their stacks
            stack = self._stacks[key] = _Stack(np.empty((slots, *u.shape), u.dtype), [])
        row: dict[str, float] = {}
        stack.values[len(stack.rows)] = u
        stack.rows.append((row, log_s, saturated))
        if len(stack.rows) == len(stack.values):
            stack.fill()
            if not self._waiting():
                self._run_after()  # every row is in: what waited need not wait for the pass's end
        return row

    @property
    def held(self) -> int:
        """How many values the stacks hold room for (their memory, in values)."""
        return sum(stack.values.size for stack in self._stacks.values())

    def then(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` once every row asked for so far is in (at once when none waits)."""
        if self._after or self._waiting():
            self._after.append(fn)
            if len(self._after) >= LATER_CALLS:  # shapes that never all fill at once: what waits is bounded
                self.flush()
        else:
            fn()

    def flush(self) -> None:
        """Take every waiting row's statistics, then run what waited for them."""
        self._fill(drop=False)
        self._run_after()

    def _waiting(self) -> bool:
        return any(stack.rows for stack in self._stacks.values())

    def _run_after(self) -> None:
        after, self._after = self._after, []
        for fn in after:
            fn()

    def _fill(self, drop: bool) -> None:
        for stack in self._stacks.values():
            stack.fill()
        if drop:
            self._stacks.clear()


LATER_ELEMENTS = 4 * _PIECE_ELEMENTS
LATER_CALLS = 1024  # calls waiting for rows, at most (each holds a row or two)


class _Stack(NamedTuple):
    values: np.ndarray  # slots x rows x n
    rows: list[tuple[dict[str, float], float, float]]  # each filled slot's row, log_s and saturated fraction

    def fill(self) -> None:
        if self.rows:
            k = len(self.rows)
            done = side_stats_stacked(self.values[:k], [r[1] for r in self.rows], [r[2] for r in self.rows])
            for (row, _, _), (stats, _) in zip(self.rows, done):
                row.update(stats)
            self.rows.clear()


def abs_cos_of_rows(u: np.ndarray, row_sq: np.ndarray) -> np.ndarray:
    """Mean |cos| over the pairs of rows of each matrix of a stack ``u``
    (blocks x m x n), given each row's float64 sum of squares ``row_sq``
    (blocks x m): :func:`abs_cos_of_gram` of their Gram matrices, taken in u's
    own precision. A float32 run's cosines are then off by at most
    (fan + 2) 2**-24 (about 1e-7 typically), far below the sampling error of a
    mean over 128 samples."""
    with np.errstate(over="ignore", under="ignore"):  # such matrices are redone just below
        gram = np.matmul(u, u.transpose(0, 2, 1))
    outside = ~gram_in_range(row_sq, u.shape[2], u.dtype)
    if outside.any():  # rows so large or small that their products leave the dtype's range: unit rows
        row_sq = row_sq.copy()
        for k in np.flatnonzero(outside):
            with np.errstate(divide="ignore", invalid="ignore"):  # a dead row: NaN, as abs_cos_of_gram says
                unit = (u[k].astype(np.float64) / np.sqrt(row_sq[k])[:, None]).astype(u.dtype)
            gram[k] = unit @ unit.T
            row_sq[k] = np.where((row_sq[k] > 0) & np.isfinite(row_sq[k]), 1.0, 0.0)  # else NaN
    return abs_cos_of_gram(gram, row_sq)


def gram_in_range(row_sq: np.ndarray, n: int, dtype: Any) -> np.ndarray:
    """Per matrix of rows (of ``n`` entries each, float64 sums of squares ``row_sq``, matrices x rows),
    whether their Gram matrix in ``dtype`` keeps its precision: no sum beyond a quarter of the largest
    number, no typical product within 2**24 of the smallest normal one (all-zero rows aside)."""
    info = np.finfo(dtype)
    ok = (row_sq == 0) | ((row_sq <= float(info.max) / 4) & (row_sq >= float(info.tiny) * 2.0**24 * n))
    return np.all(ok, axis=-1)


def abs_cos_of_gram(gram: np.ndarray, row_sq: np.ndarray) -> np.ndarray:
    """Mean |cos| over the pairs of m rows, from each stacked m x m Gram matrix
    ``gram`` (overwritten) and the rows' float64 sums of squares ``row_sq``
    (blocks x m); NaN where a row is all zeros or m < 2. The signed mean cos
    hides a collapse onto +-v (a deep linear stack); |cos| shows it.

    The Gram matrix is never normalised: the sum over pairs is
    ``inv' |G| inv``, with ``inv`` the float64 inverse norms, one product a
    matrix (a normalised copy of the rows cost as much as their Gram matrix).

    >>> x = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, -2.0]])
    >>> round(float(abs_cos_of_gram((x @ x.T)[None], (x * x).sum(1)[None])[0]), 6)  # (1/sqrt2 + 0 + 1/sqrt2) / 3
    0.471405
    """
    blocks, m, _ = gram.shape
    if m < 2:
        return np.full(blocks, math.nan)
    np.abs(gram, out=gram)
    inv = np.zeros_like(row_sq)
    np.divide(1.0, np.sqrt(row_sq), out=inv, where=row_sq > 0)
    total = np.vecdot(inv, np.matmul(gram.astype(np.float64), inv[:, :, None])[:, :, 0])
    trace = np.vecdot(np.diagonal(gram, axis1=1, axis2=2) * inv, inv)  # (diag inv) inv: no inv^2 to overflow
    return np.where(np.all(row_sq > 0, axis=1), (total - trace) / (m * (m - 1)), math.nan)


def head_cos(u: np.ndarray) -> float:
    """The |cos| of the first samples of ``u`` (NaN if one of them is all zeros, or fewer than two)."""
    head = u[:ABS_COS_SAMPLES]
    return float(abs_cos_of_rows(head[None], row_squares(head)[None])[0])


def _live_head_cos(u: np.ndarray, row_sq: np.ndarray) -> float:
    """The |cos| of the first live samples of ``u`` (live by ``row_sq``, every row's sum of squares; the
    head's own squares are taken from ``u``: a caller may pass a stand-in)."""
    return head_cos(u[np.flatnonzero(row_sq > 0)[:ABS_COS_SAMPLES]])


def from_sums(u: np.ndarray, parts: Sequence[Sums], log_s: float, saturated: float = math.nan,
              head: float = math.nan) -> tuple[dict[str, float], float]:
    """The statistics of ``exp(log_s) * u`` from its blocks' sums (in block
    order) and :func:`head_cos`; also the mean square of ``u`` itself."""
    n_rows, n_cols = u.shape
    size = u.size
    col_sum, col_m2 = _pooled(np.array([p.rows for p in parts]), np.array([p.col_sum for p in parts]),
                              np.array([p.col_m2 for p in parts]))
    row_sq = np.concatenate([p.row_sq for p in parts])
    unit_sum = sum(p.unit_sum for p in parts)
    col_mean = col_sum / n_rows
    mean = float(col_mean.mean())
    unit_var = float(col_m2.sum()) / size
    sq_unit_mean = float(col_mean @ col_mean) / n_cols
    # Law of total variance (exact for ddof=0).
    var = unit_var + float(np.mean((col_mean - mean) ** 2))
    second = float(row_sq.sum()) / size
    live = row_sq > 0
    k = int(np.count_nonzero(live))
    if k >= 2:
        cos_sim = (float(unit_sum @ unit_sum) - k) / (k * (k - 1))
        # |cos| is redone over the first live samples in the rare case that a first one is dead.
        abs_cos = head if not math.isnan(head) else _live_head_cos(u, row_sq)
    else:
        cos_sim = abs_cos = math.nan
    return _stats(log_s, mean, var, second, sq_unit_mean, unit_var, sum(p.zeros for p in parts) / size, saturated,
                  cos_sim, abs_cos), second


def _stats(log_s: float, mean: float, var: float, second: float, sq_unit_mean: float, unit_var: float,
           frac_zero: float, saturated: float, cos_sim: float, abs_cos: float) -> dict[str, float]:
    """The statistics row of ``exp(log_s) * u`` from u's moments."""
    std = math.sqrt(var)
    return {
        "mean": exp_times(mean, log_s),
        "std": exp_times(std, log_s),
        "log10_std": float(math.log(std) + log_s) / LN10 if std > 0 else -math.inf,
        # The mean's magnitude at any scale (its sign is the sign of "mean", which keeps it as +-inf).
        "log10_abs_mean": float(math.log(abs(mean)) + log_s) / LN10 if mean != 0 else -math.inf,
        "second_moment": exp_times(second, 2 * log_s),
        "sq_unit_mean": exp_times(sq_unit_mean, 2 * log_s),
        "unit_var": exp_times(unit_var, 2 * log_s),
        "frac_zero": frac_zero,
        "frac_saturated": saturated,
        "cos_sim": cos_sim,
        "abs_cos_sim": abs_cos,
        "log10_sq_unit_mean": _log10_scaled(sq_unit_mean, 2 * log_s),
        "log10_unit_var": _log10_scaled(unit_var, 2 * log_s),
    }


def _log10_scaled(x: float, log_scale: float) -> float:
    """log10(exp(log_scale) x) for x >= 0, at any magnitude (-inf for 0, NaN for NaN)."""
    return (math.log(x) + log_scale) / LN10 if x > 0 else -math.inf if x == 0 else math.nan


def side_stats(u: np.ndarray, log_s: float, saturated: float = math.nan, pool: Pool = SERIAL) -> dict[str, float]:
    """The statistics (ARCHITECTURE.md, "Definitions") of ``exp(log_s) * u`` (N samples x n units).

    ``saturated`` is the fraction of units with |phi'(z)| < 1e-3, computed by
    the caller, who knows the activation. Sums run in float64 over fixed
    blocks of rows (in parallel on ``pool``) and are combined in block order.
    """
    return side_stats_ms(u, log_s, saturated, pool)[0]


def side_stats_ms(u: np.ndarray, log_s: float, saturated: float = math.nan, pool: Pool = SERIAL
                  ) -> tuple[dict[str, float], float]:
    """:func:`side_stats` and the mean square of ``u``."""
    *parts, head = pool.sized(u.size).map(lambda rows: block_sums(u[rows]) if rows is not None else head_cos(u),
                            [*row_chunks(*u.shape), None])
    return from_sums(u, parts, log_s, saturated, head)


def empty_stats() -> dict[str, float]:
    """The row of a side that does not exist (the input has no pre-activation)."""
    return dict.fromkeys(STATS, math.nan)


def log10_mean_pow10(log10_values: np.ndarray, power: float = 1.0) -> float:
    """``log10(mean(10 ** (power * v)))``, stable for any magnitude of v."""
    v = power * np.asarray(log10_values, dtype=float)
    v = v[~np.isnan(v)]
    if not np.isfinite(v).any():
        return -math.inf
    m = v[np.isfinite(v)].max()
    return float(m + np.log10(np.mean(10.0 ** (v - m))))


def _log10_abs_signed_mean(sign: pd.Series, log10_abs: pd.Series, by: list[pd.Series]) -> pd.Series:
    """Per group, log10 |mean of sign * 10 ** log10_abs|, at any magnitude (the
    mean over replicates of layer means that may lie beyond float64)."""
    peak = log10_abs.replace(-np.inf, np.nan).groupby(by, sort=False).transform("max")
    with np.errstate(invalid="ignore", over="ignore", under="ignore", divide="ignore"):
        term = (sign * 10.0 ** (log10_abs - peak)).where(log10_abs != -np.inf, 0.0)  # a zero mean adds 0
        rel = term.groupby(by, sort=False).mean()  # NaN only where every replicate's value is NaN
        top = peak.groupby(by, sort=False).first()
        return (top + np.log10(np.abs(rel))).where(rel != 0, -np.inf)


def t_half_width(sd: Any, n: Any, level: float = 0.95) -> Any:
    """Half-width of the Student-t ``level`` interval of a mean of ``n`` values
    whose sample std is ``sd``: scalars, arrays, Series or frames alike (NaN where n < 2).

    >>> round(float(t_half_width(1.0, 4)), 6)  # t_{0.975, 3} = 3.1824 (tables), over sqrt(4)
    1.591223
    """
    n_ = np.asarray(n, dtype=float)
    # scipy.stats.t.ppf is this function; scipy.special alone loads in half the time of scipy.stats
    t = special.stdtrit(np.where(n_ > 1, n_ - 1, np.nan), 0.5 + level / 2)
    return sd / np.sqrt(n) * (t if t.ndim else float(t))


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean of the finite ``values`` and its Student-t ``level`` interval (NaN bounds for fewer than 2).

    >>> [round(v, 3) for v in mean_interval([1.0, 2.0, 3.0])]
    [2.0, -0.484, 4.484]
    """
    v = np.asarray([x for x in values if math.isfinite(x)], float)
    if len(v) == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    half = float(t_half_width(v.std(ddof=1), len(v), level)) if len(v) > 1 else math.nan
    return mean, mean - half, mean + half


def summarize(layers: pd.DataFrame) -> pd.DataFrame:
    """One row per (config, layer): the mean over replicates of each statistic,
    its standard error and 95% t interval (``_se``, ``_lo``, ``_hi``), and for
    the std both the mean network (``{side}_log10_rms_std``: log10 of the
    square root of the mean variance, what mean-field theory predicts) and the
    typical network (``{side}_log10_typical_std``: the mean of log10 std, i.e.
    the geometric mean) and the median network (``{side}_log10_median_std``,
    which one dead network, of std 0, does not drag to 0 as it does the
    geometric mean).
    """
    sides = [s for s in ("pre", "post", "grad", "delta") if f"{s}_log10_std" in layers]
    cols = [f"{side}_{stat}" for side in sides for stat in STATS
            if f"{side}_{stat}" in layers and stat != "log10_abs_mean" and stat not in LOG10_CHANNELS]
    cols += [c for c in ("weight_grad_norm", "weight_grad_log10_norm") if c in layers]
    theory_cols = [c for c in layers if c.startswith("theory_")]
    keys = ["config", "layer"]
    g = layers.groupby(keys, sort=False)
    mean, n = g[cols].mean(), g[cols].count()
    with np.errstate(invalid="ignore"):
        sd = g[cols].std(ddof=1)
        se, half = sd / np.sqrt(n), t_half_width(sd, n)
    out = pd.concat([mean, se.add_suffix("_se"), (mean - half).add_suffix("_lo"), (mean + half).add_suffix("_hi")],
                    axis=1)
    extra: dict[str, pd.Series] = {"replicates": g.size()}
    if theory_cols:  # the same on every replicate's row
        extra.update({c: g[c].first() for c in theory_cols})
    by = [layers[k] for k in keys]
    for side in sides:
        logs = layers[f"{side}_log10_std"]
        peak = logs.replace(-np.inf, np.nan).groupby(by, sort=False).transform("max")
        with np.errstate(invalid="ignore", over="ignore"):
            rel = (10.0 ** (2 * (logs - peak))).groupby(by, sort=False).mean()
        extra[f"{side}_log10_rms_std"] = peak.groupby(by, sort=False).first() + 0.5 * np.log10(rel)
        extra[f"{side}_log10_typical_std"] = g[f"{side}_log10_std"].mean()
        extra[f"{side}_log10_median_std"] = g[f"{side}_log10_std"].median()
        if f"{side}_log10_abs_mean" in layers:
            extra[f"{side}_log10_abs_mean"] = _log10_abs_signed_mean(
                np.sign(layers[f"{side}_mean"]), layers[f"{side}_log10_abs_mean"], by)
        for stat in LOG10_CHANNELS:
            if f"{side}_{stat}" in layers:
                extra[f"{side}_{stat}"] = _log10_abs_signed_mean(pd.Series(1.0, index=layers.index),
                                                                 layers[f"{side}_{stat}"], by)
    out = pd.concat([pd.DataFrame(extra), out], axis=1).copy()  # copy: one consolidated block per dtype
    return out.reset_index()

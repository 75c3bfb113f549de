"""The statistics of one tensor, as simulate's ``layers.csv`` names them.

Sums run in float64 over a reused work buffer and are combined by
:func:`varprop.stats.from_sums`, so the definitions are simulate's; the cosines'
products are taken in the tensor's own precision.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from ..nn import activations
from ..stats import (ABS_COS_SAMPLES, SATURATION, Sums, abs_cos_of_gram, abs_cos_of_rows, empty_stats, from_sums,
                     gram_in_range)
from . import load_torch

if TYPE_CHECKING:
    import torch


class Buffer:
    """A float64 work buffer reused across tensors: a fresh large allocation per tensor costs its page
    faults, more than the statistics themselves."""

    def __init__(self) -> None:
        self.t: Any = None

    def get(self, n: int, device: Any) -> Any:
        torch = load_torch()
        if self.t is None or self.t.numel() < n or self.t.device != device:
            self.t = torch.empty(max(n, 1), dtype=torch.float64, device=device)
        return self.t[:n]


def tensor_stats(x: "torch.Tensor", sample_axis: int = 0, channel_axis: int | None = 1,
                 saturated: float = math.nan, buffer: Buffer | None = None, complete: bool = True
                 ) -> dict[str, float]:
    """The statistics of simulate's ``layers.csv`` for one tensor (any float dtype and device).

    Samples lie along ``sample_axis`` (cosine similarity between them, over
    every other axis flattened), channels along ``channel_axis`` (the average
    squared channel mean and average channel variance are taken over every
    other axis: [N, C, H, W], [N, C, L], [N, T, C] with axis 2, [N, C]). Sums
    run in float64 and are combined by :func:`varprop.stats.from_sums`, so the
    definitions are simulate's; for a 2-D tensor the result is
    :func:`varprop.stats.side_stats` of it (the cosines to float32 rounding:
    their products are taken in the tensor's precision). ``complete=False``
    skips what only a row reports, for values read by the residual table and
    the theory alone: ``frac_zero`` and ``abs_cos_sim`` are then NaN (no count
    of zeros, no Gram matrix: the Gram is most of the cost of a small batch).

    >>> import torch
    >>> s = tensor_stats(torch.tensor([[1.0, -1.0], [1.0, -1.0]]))
    >>> [round(s[k], 6) for k in ("std", "sq_unit_mean", "unit_var", "cos_sim")]
    [1.0, 1.0, 0.0, 1.0]
    """
    torch = load_torch()
    if x.dim() == 0 or x.numel() == 0:
        return empty_stats()
    if x.dim() == 1:  # one number per sample: one channel
        x, channel_axis = x.reshape(-1, 1), 1
    shape = tuple(x.shape)
    sample_axis %= len(shape)
    channel_axis = sample_axis if channel_axis is None else channel_axis % len(shape)
    n, ns, c = x.numel(), shape[sample_axis], shape[channel_axis]
    a, b = math.prod(shape[:channel_axis]), math.prod(shape[channel_axis + 1:])
    f64 = torch.float64
    own = x.detach()
    own = own if own.dtype in (torch.float32, f64) else own.float()  # half precisions: exactly, in float32
    cpu = own.device.type == "cpu"
    # Sums run over a float64 copy in a reused buffer (a reduction with dtype=float64 converts into a fresh
    # allocation, slower); the cosines' products read the tensor itself. Counting zeros is NumPy's job on
    # CPU (several times faster than torch.count_nonzero), and small vectors (one number per sample or
    # channel) are finished in NumPy: a torch call on them costs more than the arithmetic.
    zeros = (int(np.count_nonzero(own.numpy() == 0)) if cpu else int((own == 0).sum())) if complete else 0
    y = (buffer or Buffer()).get(n, own.device).view(shape)
    y.copy_(own)
    rows = own.movedim(sample_axis, 0).reshape(ns, -1)
    # Sums and squares per block, pooled below: per (leading index, channel) over the positions of
    # [N, C, positions], per (sample, channel) over the positions of [N, positions, C], per channel over
    # the samples of [N, C] (one block: the squares are taken in place, and the rows' squares summed from
    # them, a pass fewer than a norm and two passes about the channel means).
    blocks, per_sample, scratched, row_sq = None, False, False, None
    if b > 1:
        v = y.view(a, c, b)
        blocks = (_np(v.sum(2)), _np(torch.linalg.vector_norm(v, dim=2)) ** 2, b)
        per_sample = sample_axis == 0 and channel_axis == 1
    elif len(shape) >= 3 and sample_axis == 0 and n > ns * c:
        w = y.view(ns, n // (ns * c), c)
        block_sum = _np(w.sum(1))
        blocks = (block_sum, _np(w.square_().sum(1)), n // (ns * c))  # a middle-axis norm is 10x slower
        per_sample = scratched = True
    elif len(shape) == 2 and sample_axis == 0:
        col_sum = _np(y.sum(0))[None, :]
        y.square_()
        row_sq = _np(y.sum(1))
        blocks, scratched = (col_sum, _np(y.sum(0))[None, :], ns), True
    if per_sample:
        row_sq = blocks[1].sum(1)
    if row_sq is not None:
        norms = np.sqrt(row_sq)
    else:
        norms = _np(torch.linalg.vector_norm(y.movedim(sample_axis, 0).reshape(ns, -1), dim=1))
        row_sq = norms * norms
    if not math.isfinite(float(norms.sum())):
        return {**empty_stats(), "frac_zero": zeros / n, "frac_saturated": saturated, "nonfinite": True}
    live = norms > 0
    inv = np.zeros(ns)
    np.divide(1.0, norms, out=inv, where=live)
    # The sum of the unit-normalised samples in the tensor's precision: each of its entries adds ns terms,
    # whose rounding moves the mean cosine by at most 2 (ns + 1) 2^-24 / (ns - 1).
    unit_sum = _np(torch.from_numpy(inv).to(own.device, own.dtype) @ rows).astype(np.float64)
    # |cos| over the first 128 live samples, from their Gram matrix in the tensor's precision (float32's
    # product costs a third of float64's; its rounding, at most fan * 2^-24 in a cosine and typically
    # sqrt(fan) * 2^-24, is far below the sampling error of a mean over pairs) and the float64 norms.
    first = np.flatnonzero(live)[:ABS_COS_SAMPLES] if complete else live[:0]
    m = len(first)
    head = math.nan
    if m >= 2:
        head_rows = rows[:m] if first[-1] == m - 1 else rows[torch.from_numpy(first).to(own.device)]
        head_sq = row_sq[first][None]
        if gram_in_range(head_sq, rows.shape[1], np.float32 if own.dtype == torch.float32 else np.float64)[0]:
            head = float(abs_cos_of_gram(_np(head_rows @ head_rows.T)[None], head_sq)[0])
        else:  # products beyond the dtype's range: varprop.stats takes the unit rows' Gram matrix
            head = float(abs_cos_of_rows(_np(head_rows)[None], head_sq)[0])
    m_rows = a * b
    col = _pooled_blocks(*blocks) if blocks is not None else None
    if col is None:
        # Channel sums, then squares about the channel means (two passes: no E[x^2] - E[x]^2 cancellation),
        # in the float64 copy, free once the rows' sums are taken.
        if scratched:
            y.copy_(own)
        y = y.view(a, c, b)
        col_sum = y.sum(2).sum(0) if b > 1 else y.view(a, c).sum(0)
        y.sub_((col_sum / m_rows).view(1, c, 1)).square_()
        col_m2 = y.sum(2).sum(0) if b > 1 else y.view(a, c).sum(0)
        col = (_np(col_sum), _np(col_m2))
    sums = Sums(m_rows, col[0], col[1], row_sq, unit_sum, zeros)
    # from_sums reads the shape of its first argument (rows x channels) and, for |cos| only when no head
    # value is given, its rows: a head is given here (or |cos| is not wanted), so a zero-strided stand-in
    # suffices.
    stats = from_sums(_stand_in(m_rows, c), [sums], 0.0, saturated, head if complete else 0.0)[0]
    if not complete:
        stats["frac_zero"] = stats["abs_cos_sim"] = math.nan
    return stats


def _np(t: Any) -> np.ndarray:
    """A small tensor's values as a NumPy array (a view on CPU)."""
    return t.numpy() if t.device.type == "cpu" else t.cpu().numpy()


@functools.lru_cache(maxsize=256)
def _stand_in(rows: int, cols: int) -> np.ndarray:
    return np.broadcast_to(np.float64(0.0), (rows, cols))


def _pooled_blocks(block_sum: np.ndarray, block_sq: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Channel sums and squares about the channel means from blocks of ``size`` entries (rows: blocks,
    columns: channels): each block's squares about its own mean, plus its mean's offset from the channel's
    (between and within, as varprop.stats pools blocks). A block's float64 sum of squares less its squared
    sum over ``size`` keeps all but 2^-52 mean^2 / var of its variance; None where that could exceed 1e-10
    (a block almost constant, or far off zero): the caller then takes two passes."""
    within = block_sq - block_sum * block_sum / size
    if np.any(block_sum * block_sum / size > 1e6 * within):
        return None
    total = block_sum.sum(0)
    offsets = block_sum / size - total / (size * len(block_sum))
    return total, within.sum(0) + size * (offsets * offsets).sum(0)


def zero_when_saturated(act: activations.Activation) -> bool:
    """relu: phi'(z) = 0 exactly where phi(z) = 0 (z <= 0), so the output's zeros are the saturated inputs."""
    return act.homogeneous and act.slope_neg == 0 and act.phi0 == 0 and act.slope_pos >= SATURATION


def saturation(act: activations.Activation, z: "torch.Tensor") -> float:
    """The fraction of ``z`` where |phi'(z)| < 1e-3 (simulate's ``frac_saturated``)."""
    torch = load_torch()
    n = z.numel()
    if n == 0:
        return math.nan
    if act.homogeneous:  # phi' is slope_pos above 0 and slope_neg at or below it
        z = z.detach()
        below = int(np.count_nonzero(z.numpy() <= 0)) if z.device.type == "cpu" and z.dtype in (
            torch.float32, torch.float64) else int(torch.count_nonzero(z <= 0))
        return ((below if abs(act.slope_neg) < SATURATION else 0)
                + (n - below if abs(act.slope_pos) < SATURATION else 0)) / n
    d = act.dphi(z.detach().to("cpu", torch.float32).numpy())
    return float(np.count_nonzero(np.abs(d) < SATURATION)) / n


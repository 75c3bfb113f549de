"""Batch normalization in training mode (batch statistics), on log-scaled values.

Keras' defaults: epsilon 1e-3, gamma 1, beta 0, biased batch variance. A layer
``x = exp(log_s) * u`` (N x n, N/B consecutive batches of B samples) maps to
``y = (x - mean_b) / sqrt(var_b + eps)`` per unit and batch. Everything is
computed from ``u`` with ``eps`` moved into u's units (``eps / s**2``) in log
form, so neither a huge nor a tiny ``s`` can overflow or lose the signal.

``eps = 0`` is the batch norm of mean-field theory (Yang et al. 2019), and
exact here: the output has unit variance per batch channel to rounding and
the backward pass is the exact projection, with no leak term. It needs every
batch channel to vary: a channel whose B values are all equal (a batch of
identical samples, or a unit its activation zeroes for the whole batch, as
relu before a post-activation batch norm does with probability 2^-B) has no
normalization, and is refused (SpecError) when it is met. With B = 2 every
output is +-1 and the gradient through batch norm is exactly 0.

>>> import numpy as np
>>> y, log_y, _ = forward(np.array([[1.0], [3.0]]), 0.0, batch=2, eps=1e-3)
>>> [round(float(v), 6) for v in (y * np.exp(log_y)).ravel()]  # (x - 2) / sqrt(1 + 0.001)
[-0.9995, 0.9995]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import SpecError

KERAS_EPS = 1e-3


@dataclass
class Cache:
    """What the backward pass needs, free of any scale: per (batch, unit) the
    standardized input d = (x - mean) / sd (so y = c d with c^2 = var / (var +
    eps)), log(1 / sigma) and log(eps / (var + eps)) = log(1 - c^2)."""

    d: np.ndarray  # (N/B, B, n)
    log_inv_sigma: np.ndarray  # (N/B, 1, n), float64
    log_leak: np.ndarray  # (N/B, 1, n), float64


def _log_inv_sigma(var_u: np.ndarray, log_s: float, eps: float) -> np.ndarray:
    """log(1 / sqrt(s^2 var_u + eps)) for every (batch, unit), at any s."""
    with np.errstate(divide="ignore"):
        log_var = np.log(var_u)
    return -0.5 * np.logaddexp(2 * log_s + log_var, math.log(eps) if eps > 0 else -math.inf)


def _scaled_pair(x: np.ndarray, log_factor: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, float]:
    """``x * exp(log_factor)`` as ``(v, log_s)`` with max |v| = 1, at any
    magnitude of the factors (units whose x is all zero cannot set the scale)."""
    live = np.any(x != 0, axis=1, keepdims=True) & np.isfinite(log_factor)
    if not live.any():
        return np.zeros(x.shape, dtype), 0.0
    top = float(np.max(log_factor[np.broadcast_to(live, log_factor.shape)]))
    v = x * np.exp(np.where(live, log_factor - top, -np.inf))
    m = float(np.max(np.abs(v)))
    if m == 0:
        return np.zeros(x.shape, dtype), 0.0
    return (v / m).astype(dtype), top + math.log(m)


def forward(u: np.ndarray, log_s: float, batch: int, eps: float = KERAS_EPS, where: str | None = None
            ) -> tuple[np.ndarray, float, Cache]:
    """Normalize ``exp(log_s) * u`` per batch and unit: ``(y_u, log_y, cache)``
    with ``y = exp(log_y) * y_u`` (y_u in u's dtype). With ``eps = 0`` a batch
    channel that does not vary raises SpecError (``where`` names the layer there: "layer 3")."""
    n_rows, n = u.shape
    x = u.reshape(n_rows // batch, batch, n)
    mean = x.mean(axis=1, keepdims=True, dtype=np.float64)
    centered = x - mean
    var = np.mean(centered * centered, axis=1, keepdims=True)
    if eps == 0 and not np.all(var > 0):
        b, _, unit = np.argwhere(~(var > 0))[0]
        at = "" if where is None else f"{where}, "
        raise SpecError("bn_eps", f"0 divides by each batch channel's standard deviation, which is exactly 0 at "
                        f"{at}unit {unit + 1}, batch {b + 1} (all {batch} samples equal there: identical samples, "
                        "or a unit the activation zeroes for the whole batch, as relu before --bn-position post "
                        "does with probability 2^-B); give --bn-eps > 0 (Keras 0.001, PyTorch 1e-5) or larger "
                        "batches")
    log_inv = _log_inv_sigma(var, log_s, eps)
    log_factor = log_s + log_inv  # y = (u - mean) * exp(log_factor), and exp(log_factor) <= 1/sqrt(var)
    y, log_y = _scaled_pair(centered, log_factor, u.dtype)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(var > 0, centered / np.sqrt(var), 0.0)
        log_leak = math.log(eps) + 2 * log_inv if eps > 0 else np.full_like(log_inv, -np.inf)
    return y.reshape(n_rows, n), log_y, Cache(d.astype(u.dtype), log_inv, log_leak)


def backward(v: np.ndarray, log_g: float, cache: Cache) -> tuple[np.ndarray, float]:
    """Gradient through BN with its full batch Jacobian: for g = exp(log_g) v
    w.r.t. y, returns the gradient w.r.t. x,
    ``(g - mean_b(g) - y * mean_b(g * y)) / sigma``, as a (v, log) pair with
    v in float64.

    With y = c d, that is ``[(g - mean g - d mean(g d)) + (1 - c^2) d mean(g d)] / sigma``:
    the exact projection plus eps's leak, kept apart so that the leak survives
    where the projection vanishes (B = 2, or eps << var at huge scales).
    """
    n_rows, n = v.shape
    if cache.d.shape[1] == 2 and np.all(cache.log_leak == -np.inf):
        # eps = 0, B = 2: y = +-1 whatever x is, so the gradient is 0, not the rounding left by the projection.
        return np.zeros((n_rows, n)), 0.0
    d = cache.d.astype(np.float64)
    g = v.reshape(d.shape).astype(np.float64)
    along = d * np.mean(g * d, axis=1, keepdims=True)
    projected = g - g.mean(axis=1, keepdims=True) - along
    # Per (batch, unit): the projection carries the value unless it is exactly zero.
    empty = ~np.any(projected != 0, axis=1, keepdims=True)
    with np.errstate(under="ignore"):
        # eps = 0 leaks nothing (log_leak = -inf): the projection alone, exactly.
        leak = np.where(cache.log_leak == -np.inf, 0.0, np.exp(np.maximum(cache.log_leak, -745.0)))
        values = np.where(empty, along, projected + along * leak)
    factors = cache.log_inv_sigma + np.where(empty, cache.log_leak, 0.0)
    # float64 out: components 1e-44 apart (units dead in a batch get 1/sqrt(eps),
    # live ones 1/sigma) must survive until the activation's mask picks them.
    out, log_out = _scaled_pair(values, factors, np.float64)
    return out.reshape(n_rows, n), log_g + log_out

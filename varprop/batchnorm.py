"""Batch normalization in training mode (batch statistics), on log-scaled values.

Keras' defaults: epsilon 1e-3, gamma 1, beta 0, biased batch variance. A layer
``x = exp(log_s) * u`` (N x n, N/B consecutive batches of B samples) maps to
``y = (x - mean_b) / sqrt(var_b + eps)`` per unit and batch. Everything is
computed from ``u`` with ``eps`` moved into u's units (``eps / s**2``) in log
form, so neither a huge nor a tiny ``s`` can overflow or lose the signal.

>>> import numpy as np
>>> y, log_y, _ = forward(np.array([[1.0], [3.0]]), 0.0, batch=2, eps=0.0)
>>> (y * np.exp(log_y)).ravel().tolist()
[-1.0, 1.0]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

KERAS_EPS = 1e-3


@dataclass
class Cache:
    """What the backward pass needs: the normalized output and 1/sigma per
    (batch, unit), in log form (sigma can be any magnitude)."""

    xhat: np.ndarray  # (N/B, B, n), the true normalized values y
    log_inv_sigma: np.ndarray  # (N/B, 1, n), float64


def _log_inv_sigma(var_u: np.ndarray, log_s: float, eps: float) -> np.ndarray:
    """log(1 / sqrt(s^2 var_u + eps)) for every (batch, unit), at any s."""
    with np.errstate(divide="ignore"):
        log_var = np.log(var_u)
    return -0.5 * np.logaddexp(2 * log_s + log_var, math.log(eps) if eps > 0 else -math.inf)


def forward(u: np.ndarray, log_s: float, batch: int, eps: float = KERAS_EPS) -> tuple[np.ndarray, float, Cache]:
    """Normalize ``exp(log_s) * u`` per batch and unit: ``(y_u, log_y, cache)``
    with ``y = exp(log_y) * y_u`` (y_u in u's dtype)."""
    n_rows, n = u.shape
    x = u.reshape(n_rows // batch, batch, n)
    mean = x.mean(axis=1, keepdims=True, dtype=np.float64)
    centered = x - mean
    var = np.mean(centered * centered, axis=1, keepdims=True)
    log_inv = _log_inv_sigma(var, log_s, eps)
    log_factor = log_s + log_inv  # y = (u - mean) * exp(log_factor)
    # s / sqrt(s^2 var + eps) <= 1 / sqrt(var): the factor itself never overflows.
    top = float(np.max(log_factor))
    y = (centered * np.exp(log_factor - top)).astype(u.dtype)
    xhat = (centered * np.exp(log_factor)).astype(u.dtype)
    return y.reshape(n_rows, n), top, Cache(xhat, log_inv)


def backward(v: np.ndarray, log_g: float, cache: Cache) -> tuple[np.ndarray, float]:
    """Gradient through BN with its full batch Jacobian: for g = exp(log_g) v
    w.r.t. y, returns the gradient w.r.t. x,
    ``(g - mean_b(g) - y * mean_b(g * y)) / sigma``, as a (v, log) pair."""
    n_rows, n = v.shape
    xhat = cache.xhat
    g = v.reshape(xhat.shape).astype(np.float64)
    coupled = g - g.mean(axis=1, keepdims=True) - xhat * np.mean(g * xhat, axis=1, keepdims=True)
    top = float(np.max(cache.log_inv_sigma))
    out = coupled * np.exp(cache.log_inv_sigma - top)
    return out.astype(v.dtype).reshape(n_rows, n), log_g + top

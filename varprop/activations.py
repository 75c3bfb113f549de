"""Activation registry: phi, phi', and evaluation at scales beyond float range.

The engine carries a layer's values as ``h = exp(log_s) * u`` with ``u`` of
order one (DESIGN.md, "Never let a value overflow"). :func:`apply_scaled`
evaluates ``phi`` on such a pair without ever forming ``exp(log_s) * u`` when
that would overflow or underflow: every activation here is, far from zero,
``slope * x + offset`` on each side, and near zero ``phi(0) + phi'(0±) x``;
those limits are part of each activation's metadata.

>>> import numpy as np
>>> u, log_s = apply_scaled(get("tanh"), np.array([-1.0, 2.0]), 5000.0)
>>> u.tolist(), log_s
([-1.0, 1.0], 0.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import special

Array = np.ndarray

# Beyond |log_s| > _LOG_DIRECT (nats) the limits take over; below it phi is
# evaluated directly in float64 (|x| <= ~1e130 * max|u|, squares stay finite).
_LOG_DIRECT = 300.0
# For float32 compute, phi is evaluated in float32 while s is in this range.
LOG_DIRECT_F32 = 20.0

SELU_LAMBDA = 1.0507009873554804934193349852946
SELU_ALPHA = 1.6732632423543772848170429916717


@dataclass(frozen=True)
class Activation:
    """One activation function with the metadata the engine and theory need.

    ``phi(x) -> slope_pos * x + offset_pos`` as x -> +inf (likewise ``_neg``);
    ``phi(x) ~ phi0 + d0_pos * x`` for tiny x > 0 (``d0_neg`` for x < 0).
    ``homogeneous`` means ``phi(s x) = s phi(x)`` for every s > 0.
    """

    name: str
    phi: Callable[[Array], Array]
    dphi: Callable[[Array], Array]
    homogeneous: bool
    slope_pos: float
    offset_pos: float
    slope_neg: float
    offset_neg: float
    phi0: float
    d0_pos: float
    d0_neg: float


def _leaky(slope: float) -> Activation:
    return Activation(
        "leaky_relu" if slope else "relu",
        lambda x: np.where(x > 0, x, x * x.dtype.type(slope)) if slope else np.maximum(x, 0),
        lambda x: np.where(x > 0, 1.0, slope).astype(x.dtype),
        True, 1.0, 0.0, slope, 0.0, 0.0, 1.0, slope,
    )


def _tanh_d(x: Array) -> Array:
    with np.errstate(over="ignore"):  # cosh overflows to inf far out: the derivative is 0 there
        return 1 / np.cosh(x) ** 2


def _sigmoid_d(x: Array) -> Array:
    return special.expit(x) * special.expit(-x)  # no cancellation in 1 - s for large x


def _silu_d(x: Array) -> Array:
    s = special.expit(x)
    return s * (1 + x * (1 - s))


def _gelu(x: Array) -> Array:
    return x * special.ndtr(x)


def _gelu_d(x: Array) -> Array:
    return special.ndtr(x) + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _elu_d(x: Array) -> Array:
    return np.where(x > 0, 1.0, np.exp(np.minimum(x, 0))).astype(x.dtype)


_REGISTRY: dict[str, Activation] = {
    "linear": Activation("linear", lambda x: x, np.ones_like, True, 1, 0, 1, 0, 0, 1, 1),
    "relu": _leaky(0.0),
    "tanh": Activation("tanh", np.tanh, _tanh_d, False, 0, 1, 0, -1, 0, 1, 1),
    "sigmoid": Activation("sigmoid", special.expit, _sigmoid_d, False, 0, 1, 0, 0, 0.5, 0.25, 0.25),
    "selu": Activation(
        "selu",
        lambda x: SELU_LAMBDA * _elu_alpha(x, SELU_ALPHA),
        lambda x: SELU_LAMBDA * np.where(x > 0, 1.0, SELU_ALPHA * np.exp(np.minimum(x, 0))).astype(x.dtype),
        False, SELU_LAMBDA, 0, 0, -SELU_LAMBDA * SELU_ALPHA, 0, SELU_LAMBDA, SELU_LAMBDA * SELU_ALPHA,
    ),
    "elu": Activation("elu", lambda x: _elu_alpha(x, 1.0), _elu_d, False, 1, 0, 0, -1, 0, 1, 1),
    "gelu": Activation("gelu", _gelu, _gelu_d, False, 1, 0, 0, 0, 0, 0.5, 0.5),
    "silu": Activation("silu", lambda x: x * special.expit(x), _silu_d, False, 1, 0, 0, 0, 0, 0.5, 0.5),
    "softplus": Activation(
        "softplus", lambda x: np.logaddexp(0, x), special.expit, False, 1, 0, 0, 0, math.log(2), 0.5, 0.5
    ),
}


def _elu_alpha(x: Array, alpha: float) -> Array:
    return np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0)))


NAMES: tuple[str, ...] = tuple(_REGISTRY) + ("leaky_relu",)


def get(name: str, leaky_slope: float = 0.01) -> Activation:
    """The activation called ``name`` (one of :data:`NAMES`).

    >>> get("relu").phi(np.array([-1.0, 2.0])).tolist()
    [0.0, 2.0]
    """
    if name == "leaky_relu":
        return _leaky(float(leaky_slope))
    return _REGISTRY[name]


def _limits(act: Activation, u: Array, slope: bool, offset: bool) -> Array:
    """Side-wise slope (or offset) of ``act`` for the sign of each entry of u."""
    pos, neg = (act.slope_pos, act.slope_neg) if slope else (act.offset_pos, act.offset_neg)
    out = np.where(u > 0, pos, neg)
    if offset:
        out = np.where(u == 0, act.phi0, out)
    return out


def apply_scaled(act: Activation, u: Array, log_s: float) -> tuple[Array, float]:
    """Evaluate ``phi(exp(log_s) * u)`` as a pair ``(u_out, log_s_out)``.

    The result means ``phi(exp(log_s) * u) = exp(log_s_out) * u_out``; ``u_out``
    has the dtype of ``u`` and is not renormalised: its entries are of order
    one at most, except in the float32 branch (|log_s| < 20, phi(0) = 0),
    which returns phi's own values (at most e^20 times u's).
    """
    if act.homogeneous:
        return act.phi(u), log_s
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        # float32 arithmetic only where phi(0) = 0: sigmoid's 0.5 + x/4 would
        # quantise the small-scale signal away.
        if u.dtype == np.float32 and abs(log_s) < LOG_DIRECT_F32 and act.phi0 == 0:
            return act.phi(u * np.float32(math.exp(log_s))), 0.0
        if abs(log_s) <= _LOG_DIRECT:
            h = act.phi(u.astype(np.float64) * math.exp(log_s))
            m = float(np.max(np.abs(h), initial=0.0))
            if m == 0:
                return h.astype(u.dtype), 0.0
            return (h / m).astype(u.dtype), math.log(m)
        u64 = u.astype(np.float64)
        if log_s > 0:
            # Far from zero on both sides: phi(s u) = s * slope * u + offset.
            linear = _limits(act, u64, slope=True, offset=False) * u64
            const = _limits(act, u64, slope=False, offset=True)
            if np.any(linear):
                return (linear + const * math.exp(-log_s)).astype(u.dtype), log_s
            return const.astype(u.dtype), 0.0
        # Tiny scale: phi(s u) = phi0 + s * phi'(0±) u (higher orders are lost
        # below float64 resolution either way).
        if act.phi0 != 0.0:
            return np.full_like(u, act.phi0), 0.0
        return (np.where(u64 > 0, act.d0_pos, act.d0_neg) * u64).astype(u.dtype), log_s


def dphi_scaled(act: Activation, u: Array, log_s: float) -> Array:
    """``phi'(exp(log_s) * u)`` for every entry, finite at any scale.

    A homogeneous activation's phi' does not depend on the scale. Otherwise
    clipping x at +-1e6 keeps each entry on its side's asymptote, where phi'
    is constant to float64 precision for every registered activation, and
    at tiny scales x ~ 1e-304 u keeps each entry's sign (phi' differs across
    zero for selu) where the true x would underflow to 0.

    >>> dphi_scaled(get("relu"), np.array([-1.0, 2.0]), -5000.0).tolist()
    [0.0, 1.0]
    """
    if act.homogeneous:
        return act.dphi(u)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        if u.dtype == np.float32 and abs(log_s) < LOG_DIRECT_F32:
            return act.dphi(u * np.float32(math.exp(log_s)))
        x = np.clip(u.astype(np.float64) * math.exp(min(max(log_s, -700.0), 600.0)), -1e6, 1e6)
        return act.dphi(x)

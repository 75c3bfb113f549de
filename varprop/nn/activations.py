"""Activation registry: phi, phi', and evaluation at scales beyond float range.

The engine carries a layer's values as ``h = exp(log_s) * u`` with ``u`` of
order one (ARCHITECTURE.md, "Numerical rules"). :func:`apply_scaled`
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
from typing import Any, Callable

import numpy as np
from scipy import special

from .inits import name_key
from .inits import suggestion as _suggestion

Array = np.ndarray

# Beyond |log_s| > LOG_DIRECT (nats) the limits take over; below it phi is
# evaluated directly in float64 (|x| <= ~1e130 * max|u|, squares stay finite).
LOG_DIRECT = 300.0
# For float32 compute, phi is evaluated in float32 while s is in this range.
LOG_DIRECT_F32 = 20.0

SELU_LAMBDA = 1.0507009873554804934193349852946
SELU_ALPHA = 1.6732632423543772848170429916717


@dataclass(frozen=True, kw_only=True)
class Activation:
    """One activation function with the metadata the engine and theory need.

    ``phi(x) -> slope_pos * x + offset_pos`` as x -> +inf (likewise ``_neg``);
    ``phi(x) ~ phi0 + d0_pos * x`` for tiny x > 0 (``d0_neg`` for x < 0).
    ``homogeneous`` means ``phi(s x) = s phi(x)`` for every s > 0.
    ``both``, where phi and phi' share costly work, gives the two at once,
    equal to ``(phi(x), dphi(x))`` bit for bit.
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
    both: Callable[[Array], tuple[Array, Array]] | None = None


def _leaky(slope: float) -> Activation:
    def dphi(x: Array) -> Array:
        if slope == 0:
            return (x > 0).astype(x.dtype)  # 8x faster than np.where
        return np.where(x > 0, x.dtype.type(1), x.dtype.type(slope))

    return Activation(
        name="leaky_relu" if slope else "relu",
        phi=lambda x: np.where(x > 0, x, x * x.dtype.type(slope)) if slope else np.maximum(x, 0),
        dphi=dphi, homogeneous=True, slope_pos=1.0, offset_pos=0.0, slope_neg=slope, offset_neg=0.0,
        phi0=0.0, d0_pos=1.0, d0_neg=slope,
    )


# Derivatives are written with the functions NumPy vectorises (exp, tanh, the
# four operations), not cosh or expm1, which run an element at a time in
# float32: 15-19 ns an element on the benchmark machine against 0.2-2.5. Each form
# keeps its relative accuracy to a few ulps everywhere, tails included, where
# the backward pass needs phi' of saturated units (tests/test_activations.py).
def _bell(x: Array, k: int) -> Array:
    """``e / (1 + e)^2`` with ``e = exp(-k |x|)``: sigmoid' (k = 1) and a
    quarter of tanh' (k = 2), without overflow or cancellation."""
    e = np.exp(np.abs(x) * -k)
    d = 1 + e
    return e / (d * d)


def _tanh_d(x: Array) -> Array:
    return 4 * _bell(x, 2)


def _sigmoid_d(x: Array) -> Array:
    return _bell(x, 1)


def _silu_d_given(x: Array, s: Array) -> Array:
    return s * (1 + x * (1 - s))


def _silu_both(x: Array) -> tuple[Array, Array]:
    s = special.expit(x)  # shared
    return x * s, _silu_d_given(x, s)


def _gelu_d_given(x: Array, cdf: Array) -> Array:
    return cdf + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _gelu_both(x: Array) -> tuple[Array, Array]:
    cdf = special.ndtr(x)  # the costly part, shared
    return x * cdf, _gelu_d_given(x, cdf)


def _expm1_neg(m: Array) -> Array:
    """``exp(m) - 1`` for m <= 0. In float32 as ``2t / (1 - t)``, t = tanh(m/2)
    (an identity; 1 - t >= 1 cannot cancel), since NumPy's float32 expm1 is
    not vectorised; float64 (the theory) keeps expm1."""
    if m.dtype != np.float32:
        return np.expm1(m)
    t = np.tanh(m * np.float32(0.5))
    return 2 * t / (1 - t)


_REGISTRY: dict[str, Activation] = {
    "linear": Activation(name="linear", phi=lambda x: x, dphi=np.ones_like, homogeneous=True,
                         slope_pos=1, offset_pos=0, slope_neg=1, offset_neg=0, phi0=0, d0_pos=1, d0_neg=1),
    "relu": _leaky(0.0),
    "tanh": Activation(name="tanh", phi=np.tanh, dphi=_tanh_d, homogeneous=False,
                       slope_pos=0, offset_pos=1, slope_neg=0, offset_neg=-1, phi0=0, d0_pos=1, d0_neg=1),
    "sigmoid": Activation(name="sigmoid", phi=special.expit, dphi=_sigmoid_d, homogeneous=False,
                          slope_pos=0, offset_pos=1, slope_neg=0, offset_neg=0, phi0=0.5, d0_pos=0.25, d0_neg=0.25),
    "selu": Activation(name="selu", phi=lambda x: SELU_LAMBDA * _elu_alpha(x, SELU_ALPHA),
                       dphi=lambda x: _elu_d(x, SELU_ALPHA, SELU_LAMBDA), homogeneous=False,
                       slope_pos=SELU_LAMBDA, offset_pos=0, slope_neg=0, offset_neg=-SELU_LAMBDA * SELU_ALPHA,
                       phi0=0, d0_pos=SELU_LAMBDA, d0_neg=SELU_LAMBDA * SELU_ALPHA),
    "elu": Activation(name="elu", phi=lambda x: _elu_alpha(x, 1.0), dphi=lambda x: _elu_d(x, 1.0, 1.0),
                      homogeneous=False, slope_pos=1, offset_pos=0, slope_neg=0, offset_neg=-1,
                      phi0=0, d0_pos=1, d0_neg=1),
    "gelu": Activation(name="gelu", phi=lambda x: x * special.ndtr(x),
                       dphi=lambda x: _gelu_d_given(x, special.ndtr(x)), both=_gelu_both, homogeneous=False,
                       slope_pos=1, offset_pos=0, slope_neg=0, offset_neg=0, phi0=0, d0_pos=0.5, d0_neg=0.5),
    "silu": Activation(name="silu", phi=lambda x: x * special.expit(x),
                       dphi=lambda x: _silu_d_given(x, special.expit(x)), both=_silu_both, homogeneous=False,
                       slope_pos=1, offset_pos=0, slope_neg=0, offset_neg=0, phi0=0, d0_pos=0.5, d0_neg=0.5),
    "softplus": Activation(name="softplus", phi=lambda x: np.logaddexp(0, x), dphi=special.expit, homogeneous=False,
                           slope_pos=1, offset_pos=0, slope_neg=0, offset_neg=0, phi0=math.log(2),
                           d0_pos=0.5, d0_neg=0.5),
}


def _elu_alpha(x: Array, alpha: float) -> Array:
    # max(x, 0) + alpha expm1(min(x, 0)) is exactly x for x > 0, and cheaper than np.where
    return np.maximum(x, 0) + alpha * _expm1_neg(np.minimum(x, 0))


def _elu_d(x: Array, alpha: float, scale: float) -> Array:
    """``scale`` for x > 0, ``scale alpha exp(x)`` below (selu; elu is alpha = scale = 1)."""
    d = np.exp(np.minimum(x, 0))  # exp(0) = 1 is already elu's right side
    if alpha != 1 or scale != 1:
        d = np.asarray(d * (scale * alpha))  # an array even for 0-d x, for copyto
        np.copyto(d, d.dtype.type(scale), where=x > 0)
    return d


NAMES: tuple[str, ...] = tuple(_REGISTRY) + ("leaky_relu",)

# Names as PyTorch, Keras and JAX spell them resolve in any case and with or
# without ``_`` / ``-`` (``ReLU``, ``LeakyReLU``, ``GELU``, ``SiLU``,
# ``leaky-relu``); these are the names that differ beyond that. Checked
# against torch/nn/modules/activation.py, keras/src/activations/activations.py
# and jax/_src/nn/functions.py: ``swish`` is ``silu`` in Keras and JAX, and
# Keras' ``linear`` is PyTorch's ``Identity``. Where a framework's default
# differs from varprop's function, the name still resolves and the
# difference is documented here rather than hidden:
#   - gelu is the exact x * Phi(x), as torch.nn.GELU() (approximate='none')
#     and keras.activations.gelu (approximate=False); jax.nn.gelu defaults to
#     the tanh approximation, within 5e-4 of it everywhere (not modelled).
#   - leaky_relu's slope is --leaky-slope, default 0.01 as torch.nn.LeakyReLU
#     and jax.nn.leaky_relu; Keras' LeakyReLU layer uses 0.3 and
#     keras.activations.leaky_relu 0.2: give --leaky-slope for those.
#   - softplus is log(1 + e^x); torch.nn.Softplus returns x itself above
#     x = 20 (a difference below 2.1e-9).
ALIASES: dict[str, str] = {"swish": "silu", "identity": "linear"}


_BY_KEY: dict[str, str] = {name_key(n): ALIASES.get(n, n) for n in (*NAMES, *ALIASES)}
_SPELLING: dict[str, str] = {name_key(n): n for n in (*NAMES, *ALIASES)}


def suggestion(name: Any) -> str:
    """`` (did you mean X?)`` for the activation name closest to ``name``, or ``""``."""
    return _suggestion(name, _SPELLING)


def canonical_name(name: str) -> str:
    """The registered name of ``name`` (one of :data:`NAMES` or a framework's
    spelling, any case); ValueError, with the closest name, for others.

    >>> canonical_name("ReLU"), canonical_name("swish"), canonical_name("LeakyReLU")
    ('relu', 'silu', 'leaky_relu')
    """
    found = _BY_KEY.get(name_key(name)) if isinstance(name, str) else None
    if found is None:
        raise ValueError(f"unknown activation {name!r}{suggestion(name)}")
    return found


def get(name: str, leaky_slope: float = 0.01) -> Activation:
    """The activation called ``name`` (one of :data:`NAMES`, or a framework's
    spelling of one: :func:`canonical_name`).

    >>> get("relu").phi(np.array([-1.0, 2.0])).tolist()
    [0.0, 2.0]
    """
    found = _REGISTRY.get(name)  # the engine's and the theory's calls, with registered names
    if found is not None:
        return found
    name = canonical_name(name)
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
    one at most, except in the float32 branch (|log_s| < 20), which returns
    phi's own values (at most |phi(0)| + e^20 times u's) with ``log_s_out = 0``,
    so a block of u can be evaluated alone; there values of phi below
    float32's range flush to zero (the engine checks the layer's mean square
    and evaluates it from float64 values, scaled by their maximum, instead).
    """
    if act.homogeneous:
        return act.phi(u), log_s
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        if u.dtype == np.float32 and abs(log_s) < LOG_DIRECT_F32:
            if act.phi0 == 0:
                return act.phi(u * np.float32(math.exp(log_s))), 0.0
            # Around phi(0) != 0 float32 arithmetic rounds a small-scale signal away (sigmoid's
            # 0.5 + x/4 at x ~ 1e-5: its std 1e-3 off); float64, rounded once, keeps it.
            return act.phi(u.astype(np.float64) * math.exp(log_s)).astype(np.float32), 0.0
        if abs(log_s) <= LOG_DIRECT:
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


def phi_dphi_scaled(act: Activation, u: Array, log_s: float) -> tuple[Array, float, Array]:
    """``(*apply_scaled(act, u, log_s), dphi_scaled(act, u, log_s))``, the
    same numbers, with the work phi and phi' share done once where it can be
    (``Activation.both``: gelu's normal CDF, silu's sigmoid).

    >>> h, log_h, d = phi_dphi_scaled(get("gelu"), np.array([0.0, 1.0], np.float32), 0.0)
    >>> [round(v, 6) for v in h.tolist()], log_h, d.tolist()[0]
    ([0.0, 0.841345], 0.0, 0.5)
    """
    if act.both is not None and u.dtype == np.float32 and abs(log_s) < LOG_DIRECT_F32 and act.phi0 == 0:
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            h, d = act.both(u * np.float32(math.exp(log_s)))
        return h, 0.0, d
    return (*apply_scaled(act, u, log_s), dphi_scaled(act, u, log_s))


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

"""Mean-field predictions: Gaussian expectations, the q- and c-maps, fixed
points, chi_1, depth scales, gradients and gains (DESIGN.md "Definitions").

Every expectation is over z ~ N(0, q) and is computed by a fixed quadrature:
composite Gauss-Legendre panels on each half-line, graded geometrically
toward the kink at 0, so relu-type kinks cost nothing in accuracy and tanh's
transition is resolved at any q. The c-map (two correlated inputs) uses a
48 x 48 Gauss-Hermite rule where phi is smooth on that rule's scale, and
elsewhere Mehler's series in phi's Hermite coefficients (:class:`_Series`),
which bounds its own error and keeps the predicted cosine within [-1, 1].
Activations are evaluated through :func:`varprop.activations.apply_scaled`,
so q may be any magnitude (10,000 layers of unit init give q ~ 1e10000):
predictions are carried as logs.

>>> round(gains("relu")["variance_gain"], 6)
1.712859
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import pandas as pd
from scipy import special

from . import activations, inits
from .activations import Activation
from .spec import NetworkSpec, RunSpec

_LN10 = math.log(10.0)

# Published gain tables, shown beside ours (never in place of them).
TORCH_GAIN = {"linear": 1.0, "sigmoid": 1.0, "tanh": 5 / 3, "relu": math.sqrt(2.0), "selu": 3 / 4}
NFNET_GAMMA = {  # nfnets' _nonlin_gamma, estimated by sampling
    "linear": 1.0, "relu": 1.7139588594436646, "gelu": 1.7015043497085571, "silu": 1.7881293296813965,
    "tanh": 1.5939117670059204, "sigmoid": 4.803835391998291, "elu": 1.2716004848480225,
    "selu": 1.0008515119552612, "softplus": 1.9203323125839233, "leaky_relu": 1.70590341091156,
}


@lru_cache(maxsize=None)
def nodes(points: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Quadrature nodes and weights for E[f(x)], x ~ N(0, 1), exact to float64
    for smooth f on each half-line (the weights sum to 1)."""
    edges = [0.0] + [10.0**k for k in range(-8, 1)] + [2.0, 3.0, 4.5, 6.5, 9.0, 13.0]
    t, w = np.polynomial.legendre.leggauss(points)
    xs, ws = [], []
    for a, b in zip(edges[:-1], edges[1:]):
        x = (b - a) / 2 * t + (a + b) / 2
        xs.append(x)
        ws.append((b - a) / 2 * w * np.exp(-x * x / 2) / math.sqrt(2 * math.pi))
    x, w = np.concatenate(xs), np.concatenate(ws)
    return np.concatenate([-x[::-1], x]), np.concatenate([w[::-1], w])


def expect(f: Callable[[np.ndarray], np.ndarray], q: float = 1.0) -> float:
    """E[f(z)] for z ~ N(0, q).

    >>> round(expect(lambda z: z**2, 3.0), 12)
    3.0
    """
    x, w = nodes()
    return float(w @ f(math.sqrt(q) * x))


@dataclass(frozen=True)
class Moments:
    """Moments of phi(z), z ~ N(0, q), in a form that cannot overflow."""

    mean: float  # E[phi(z)], +-inf when beyond float64
    log_sd: float  # log sd(phi(z))
    log_m2: float  # log E[phi(z)^2]
    dphi2: float  # E[phi'(z)^2]
    log_abs_mean: float  # log |E[phi(z)]| at any magnitude (-inf for a zero mean)


def _limit_slopes(act: Activation, log_q: float) -> tuple[float, float] | None:
    """(a+, a-) when phi(z) is, to float64 precision, a+ z (z > 0), a- z (z < 0)."""
    if act.homogeneous:
        return act.slope_pos, act.slope_neg
    if 0.5 * log_q > activations._LOG_DIRECT and (act.slope_pos or act.slope_neg):
        return act.slope_pos, act.slope_neg
    # Tiny q: apply_scaled takes phi(z) = phi'(0) z there, so the closed forms hold. Not across a kink at 0
    # (selu's): the 2-D rule used there so far differs from the arc-cosine kernel, and predictions would move.
    if 0.5 * log_q < -activations._LOG_DIRECT and act.phi0 == 0 and act.d0_pos == act.d0_neg:
        return act.d0_pos, act.d0_neg
    return None


def moments(act: Activation, log_q: float) -> Moments:
    """The moments of ``act`` under z ~ N(0, exp(log_q))."""
    return _AtQ(act, log_q).moments


@lru_cache(maxsize=None)
def _hermite(n: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Hermite nodes and weights for E[f(x)], x ~ N(0, 1) (symmetric, as numpy makes them)."""
    x, w = np.polynomial.hermite_e.hermegauss(n)
    return x, w / w.sum()


@lru_cache(maxsize=None)
def _nodes2d(n: int = 48) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, w = _hermite(n)
    return x[:, None], x[None, :], np.outer(w, w)


@lru_cache(maxsize=None)
def _first_nodes() -> np.ndarray:
    """The 1-D rule's nodes, then the 2-D rule's first coordinates (phi(z1) depends on them alone)."""
    return np.concatenate([nodes()[0], _hermite()[0]])


@lru_cache(maxsize=None)
def _pairs() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The 2-D rule's node pairs (first index i, x_i, y_j) and weights W_i W_j, less the pairs whose weight
    is below 1e-20 of the largest. Those weigh 1e-20 in all, and phi grows at most linearly (the nodes stay
    within |z| < 18), so leaving them out moves E[phi(z1) phi(z2)] by less than rounding does, and saves
    almost half the evaluations of phi (tests/test_theory.py compares with the full rule)."""
    x, w = _hermite()
    ww = np.outer(w, w)
    i, j = np.nonzero(ww >= 1e-20 * ww.max())
    return i, x[i], x[j], ww[i, j]


# Below this |c| the c-map is E[phi]^2 / E[phi^2] to within 1e-17 (at every node of the 2-D rule, s = 1 and
# |c x| < 2^-54 |y|, under half an ulp of y, so c x + s y rounds to y).
_NEGLIGIBLE_C = 2.0**-54 * np.abs(_hermite()[0]).min() / np.abs(_hermite()[0]).max()
# The 2-D Gauss-Hermite rule is used for the c-map where the 1-D one integrates phi against 1, x, x^2 and
# phi^2 as the graded rule does to this (relative) accuracy: phi is then smooth on the rule's scale (gelu at
# q = 0.5: 2e-16). Elsewhere (tanh at q = 4: 6e-4, and the 2-D rule's c-map was off by as much; any kink)
# the Mehler series takes over.
_GH_TRUSTED = 1e-12
# The Mehler series keeps the terms k = 0..K of this K.
_SERIES_TERMS = 128


@lru_cache(maxsize=None)
def _fine_nodes() -> tuple[np.ndarray, np.ndarray]:
    """A rule for E[f(x)], x ~ N(0, 1), that resolves phi's kink or steep step at 0 (Gauss-Legendre panels
    graded by factors of 2 toward it, 8 points each) and the oscillations of the Hermite polynomials of the
    series (panels of width 1/2 out to 13, 12 points each; e^(-13^2/4) bounds what phi h_k carries beyond).
    Finer panels (1/4) or more points (16) move no c-map value of tests/test_theory.py by more than 1e-13."""
    xs, ws = [], []
    for edges, points in ((np.concatenate([[0.0], 2.0 ** np.arange(-27, 1)]), 8),
                          (np.arange(1.0, 13.0 + 1e-9, 0.5), 12)):
        t, w = np.polynomial.legendre.leggauss(points)
        half = (edges[1:] - edges[:-1])[:, None] / 2
        x = half * t + (edges[1:] + edges[:-1])[:, None] / 2
        xs.append(x.ravel())
        ws.append((half * w * np.exp(-x * x / 2)).ravel() / math.sqrt(2 * math.pi))
    x, w = np.concatenate(xs), np.concatenate(ws)
    return np.concatenate([-x[::-1], x]), np.concatenate([w[::-1], w])


@lru_cache(maxsize=None)
def _hermite_rows(terms: int = _SERIES_TERMS) -> np.ndarray:
    """Row k: the fine rule's weights times h_k at its nodes, h_k = He_k / sqrt(k!) (orthonormal), so that
    row k @ f(x) = E[f(x) h_k(x)]. The recurrence runs on h_k exp(-x^2/4), which stays of order one."""
    x, w = _fine_nodes()
    psi = np.empty((terms + 1, len(x)))
    psi[0] = np.exp(-x * x / 4)
    psi[1] = x * psi[0]
    for k in range(1, terms):
        psi[k + 1] = (x * psi[k] - math.sqrt(k) * psi[k - 1]) / math.sqrt(k + 1)
    return psi * (w / psi[0])


@lru_cache(maxsize=None)
def _tail_fit(top: int, parity: int, fit: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The last ``fit`` indices k <= top of a parity, and the least-squares maps from their log a_k^2 to
    (log A, p, b) of A k^-p exp(-b sqrt(k)) and to (log A, p) of A k^-p."""
    k = np.arange(parity, top + 1, 2)[-fit:]
    design = np.column_stack([np.ones(k.size), -np.log(k), -np.sqrt(k)])
    return k, np.linalg.pinv(design), np.linalg.pinv(design[:, :2])


@lru_cache(maxsize=None)
def _tail_grid(top: int, parity: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Nodes for sums over k > top of one parity: the first 64 terms one by one, then a trapezoid rule in
    log k out to 2^40 (the sum of a smooth function at steps of 2 is half its integral); their log k,
    sqrt k, log weights, and where the grid stops."""
    first = top + 1 + (top + 1 + parity) % 2
    terms = np.arange(first, first + 128, 2, dtype=float)
    t = np.linspace(math.log(terms[-1] + 2), 40 * math.log(2), 240)
    far = np.exp(t)
    trap = np.full(t.size, (t[1] - t[0]) / 2)
    trap[[0, -1]] /= 2
    trap[0] += 0.5 / far[0]  # Euler-Maclaurin: the sum from k0 on is half the integral plus f(k0) / 2
    k = np.concatenate([terms, far])
    return k, np.log(k), np.sqrt(k), np.log(np.concatenate([np.ones(terms.size), trap * far])), float(far[-1])


class _Series:
    """The c-map by Mehler's formula: with a_k = E[phi(sqrt(q) x) h_k(x)],
    E[phi(z1) phi(z2)] = sum_k a_k^2 c^k for every |c| <= 1; for several q
    at once, a row each.

    The terms k <= K = ``_SERIES_TERMS`` are summed. Of the rest only their
    total T = E[phi^2] - sum a_k^2 is known (for each parity of k), so they
    move the sum by at most |c|^(K+1) T (:meth:`bound`), by between 0 and
    that for c >= 0. They are spread over k > K as the last coefficients of
    their parity decay (:func:`_series`), which keeps the value within the
    bound, so |cos| <= 1 (up to rounding, which the result is clamped for).
    """

    def __init__(self, a2: np.ndarray, m2: np.ndarray, rest: np.ndarray, tail_k: np.ndarray,
                 tail_odd: np.ndarray, tail_w: np.ndarray):
        # One sum sum_k w_k c^k over the terms k = 0..K (w_k = a_k^2) and the nodes tail_k > K the rest is
        # spread over (weights tail_w, summing to the rest T; the far nodes are not integers, so their
        # parity is given: tail_odd), a row of weights per q.
        self.kept = a2.shape[1]
        self.nodes = np.concatenate([np.arange(self.kept, dtype=float), tail_k])
        self.odd = np.concatenate([np.arange(self.kept) % 2 == 1, tail_odd])
        self.weights, self.m2, self.rest = np.concatenate([a2, tail_w], axis=1), m2, rest

    def __getitem__(self, rows: Any) -> "_Series":
        """The rows ``rows`` (an index array or slice) alone."""
        out = object.__new__(_Series)
        out.kept, out.nodes, out.odd = self.kept, self.nodes, self.odd
        out.weights, out.m2, out.rest = self.weights[rows], self.m2[rows], self.rest[rows]
        return out

    def bound(self, c: np.ndarray | float) -> np.ndarray:
        """The most the terms beyond the series can move cos at c (a value per row, or one for all)."""
        return np.abs(c) ** self.kept * self.rest / self.m2

    def _sum(self, c: np.ndarray, derivative: bool) -> np.ndarray:
        """sum_k w_k c^k, or its derivative sum_k w_k k c^(k-1), a value per row."""
        nodes, odd, weights = (self.nodes[1:], ~self.odd[1:], self.weights[:, 1:]) if derivative else (
            self.nodes, self.odd, self.weights)
        log_c = np.log(np.maximum(np.abs(c), 1e-300))  # c = 0: every power but c^0 is 0 (underflow is silent)
        powers = np.exp((nodes - derivative) * log_c[:, None])
        if derivative:
            powers *= nodes
        negative = c < 0
        if negative.any():  # c^j = -|c|^j at odd j
            powers[:, odd] *= np.where(negative, -1.0, 1.0)[:, None]
        return (weights * powers).sum(axis=1)

    def cos(self, c: np.ndarray) -> np.ndarray:
        """The c-map at c, a value per row."""
        return np.minimum(np.maximum(self._sum(c, False) / self.m2, -1.0), 1.0)

    def slope(self, c: np.ndarray) -> np.ndarray:
        """d cos / dc at |c| < 1, a value per row: the sum differentiated term by term."""
        return self._sum(c, True) / self.m2


def _series(act: Activation, log_qs: Sequence[float]) -> _Series:
    """The :class:`_Series` of ``act`` at ``log_qs``, a row each, computed together (a deep stack meets a
    new q at every layer, and per q this is a few small array operations).

    The terms left out are spread over k > K of each parity as A k^-p exp(-b sqrt(k)). The power is how a
    kink or a jump at 0 decays; exp(-b sqrt(k)) how a function analytic in a strip of half-width d does
    (b ~ 2 sqrt(2) d: tanh(sqrt(q) x) looks like a jump only up to k ~ q). p and b >= 0 come from least
    squares on the last coefficients' logs (p = b = 0 if they are not all positive: the rest then lies
    mostly at k beyond any |c| < 1's reach, the low end of its bound)."""
    x, w = _fine_nodes()
    half = 0.5 * np.asarray(log_qs, dtype=float)
    if np.all(np.abs(half) <= activations._LOG_DIRECT):
        u = act.phi(np.exp(half)[:, None] * x)
    else:
        u = np.array([_phi_scaled(act, x, h)[0] for h in half])
    top = np.abs(u).max(axis=1, keepdims=True)
    u = u / np.where(top > 0, top, 1.0)  # only ratios matter: keep squares far from under- and overflow
    a2 = (u @ _hermite_rows().T) ** 2
    m2 = (u * u) @ w
    flip = ((u * w) * u[:, ::-1]).sum(axis=1)  # E[phi(x) phi(-x)]: the rule is symmetric
    terms = a2.shape[1] - 1
    rests, nodes_k, tails = [], [], []
    for parity in (0, 1):
        # E[phi_even^2] or E[phi_odd^2], (E[phi^2] +- E[phi(x) phi(-x)]) / 2, less the terms kept; none
        # where that is rounding.
        rest = (m2 + (flip if parity == 0 else -flip)) / 2 - a2[:, parity::2].sum(axis=1)
        rests.append(np.where(rest > 1e-17 * m2, rest, 0.0))
        fit_k, with_cutoff, power_only = _tail_fit(terms, parity)
        v = a2[:, fit_k]
        ok = np.all(v > 0, axis=1)
        log_v = np.log(np.where(v > 0, v, 1.0)).T
        _, p, b = with_cutoff @ log_v
        _, p_power = power_only @ log_v
        p = np.where(b < 0, np.maximum(p_power, 0.0), p)  # no sign of a cutoff: the power law alone
        b = np.maximum(b, 0.0)
        p, b = np.where(ok, p, 0.0), np.where(ok, b, 0.0)
        k, log_k, sqrt_k, log_base, beyond = _tail_grid(terms, parity)
        log_w = log_base - p[:, None] * log_k - b[:, None] * sqrt_k
        peak = log_w.max(axis=1, keepdims=True)
        weights = np.exp(log_w - peak)
        total = weights.sum(axis=1)
        # What a pure power law puts beyond the grid, which no |c| < 1 reaches.
        far = (b == 0) & (p > 1)
        total[far] += np.exp((1 - p[far]) * math.log(beyond) - np.log(2 * (p[far] - 1)) - peak[far, 0])
        nodes_k.append(k)
        tails.append(weights * (rests[parity] / total)[:, None])
    tail_k, tail_w, rest = np.concatenate(nodes_k), np.concatenate(tails, axis=1), rests[0] + rests[1]
    tail_odd = np.arange(tail_k.size) >= nodes_k[0].size
    return _Series(a2, m2, rest, tail_k, tail_odd, tail_w)


def cos_post(act: Activation, log_q: float, c: float) -> float:
    """E[phi(z1) phi(z2)] / E[phi(z)^2] for z1, z2 ~ N(0, q) with correlation c:
    the predicted mean cosine similarity of two samples after the activation."""
    return _AtQ(act, log_q, with_dphi2=False).cos(c)


def _phi_scaled(act: Activation, u: np.ndarray, log_s: float, renormalise: bool = False
                ) -> tuple[np.ndarray, float]:
    """:func:`activations.apply_scaled` (u float64) minus its per-call costs where it evaluates phi
    directly. There phi(exp(log_s) u) stays far inside float64, and so do squares and products of two, so
    scaling it to max |phi| = 1 as apply_scaled does is only done when asked."""
    if abs(log_s) > activations._LOG_DIRECT:
        return activations.apply_scaled(act, u, log_s)
    h = act.phi(u * math.exp(log_s))
    top = float(np.abs(h).max()) if renormalise else 0.0
    return (h / top, math.log(top)) if top > 0 else (h, 0.0)


@lru_cache(maxsize=None)
def _moment_gap() -> np.ndarray:
    """The row that takes phi at :func:`_first_nodes` to the Gauss-Hermite rule's E[phi (1 + x + x^2)] less
    the graded rule's (one product: the three moments' gaps would have to cancel to hide)."""
    (xg, wg), (x, w) = _hermite(), nodes()
    return np.concatenate([-w * (1 + x + x * x), wg * (1 + xg + xg * xg)])


class _AtQ:
    """An activation's expectations at one q: its moments, and its c-map
    ``cos`` (cos_post at any c) with everything that does not depend on c
    done once, as a deep stack calls it at many c for one q. phi is
    evaluated at the 1-D rule's nodes and the 2-D rule's first coordinates
    in one pass; E[phi'(z)^2], which only gradients need, is nan without
    ``with_dphi2``."""

    def __init__(self, act: Activation, log_q: float, with_dphi2: bool = True):
        self.act, self.log_q = act, log_q
        self.slopes = _limit_slopes(act, log_q)
        self._series: _Series | None = None  # made when cos first needs it (or in a batch by _forward)
        if self.slopes is not None:  # closed forms for a+ z / a- z: no quadrature, any q
            a, b = self.slopes
            m1 = (a - b) / math.sqrt(2 * math.pi)
            m2 = (a * a + b * b) / 2
            mean = m1 * math.exp(0.5 * log_q) if 0.5 * log_q < 709 else math.copysign(math.inf, m1) if m1 else 0.0
            var = m2 - m1 * m1
            self.moments = Moments(mean, 0.5 * log_q + 0.5 * math.log(var) if var > 0 else -math.inf,
                                   log_q + math.log(m2) if m2 > 0 else -math.inf, m2,
                                   math.log(abs(m1)) + 0.5 * log_q if m1 else -math.inf)
            return
        x, w = nodes()
        # Scaled to max |phi| = 1 as apply_scaled does: where phi(z) departs from phi(0) by a few ulps only
        # (sigmoid at tiny q), the variance is rounding, and it stays that of apply_scaled's values.
        h, log_s = _phi_scaled(act, _first_nodes(), 0.5 * log_q, renormalise=True)
        u, self._l1 = h[:len(x)], log_s
        self._u1 = h[len(x):].copy()  # not a view: a deep stack keeps one _AtQ per layer, and h is 16x larger
        m = float(w @ u)
        m2 = float(w @ (u * u))
        # E[u^2] - E[u]^2 loses at most a bit when E[u]^2 <= E[u^2] / 2; else the sum about the mean.
        var = m2 - m * m if 2 * m * m <= m2 else float(w @ (u - m) ** 2)
        self._m = (m, m2)  # what cos needs at c ~ 0
        # How well the 48-point Gauss-Hermite rule integrates phi against 1 + x + x^2 and phi^2, against the
        # graded rule, relative to what those can be (E[(1 + x + x^2)^2] = 7). E[phi] and E[phi^2] alone can
        # be exact by symmetry: sign(x).
        self._gh_error = math.inf
        if m2 > 0:
            gap = abs(float(_moment_gap() @ h)) / math.sqrt(7 * m2)
            self._gh_error = max(gap, abs(float(_hermite()[1] @ (self._u1 * self._u1)) - m2) / m2)
        dphi2 = math.nan
        if with_dphi2:
            d = activations.dphi_scaled(act, x, 0.5 * log_q)
            dphi2 = float(w @ (d * d))
        mean = m * math.exp(log_s) if log_s < 700 else math.copysign(math.inf, m) if m else 0.0
        self.moments = Moments(mean, log_s + 0.5 * math.log(var) if var > 0 else -math.inf,
                               2 * log_s + math.log(m2) if m2 > 0 else -math.inf, dphi2,
                               math.log(abs(m)) + log_s if m else -math.inf)

    def series(self) -> _Series:
        """The Mehler series at this q (made on first use unless _forward batched it in)."""
        if self._series is None:
            self._series = _series(self.act, [self.log_q])
        return self._series

    def needs_series(self) -> bool:
        """Whether :meth:`cos` takes Mehler's series (at c other than +-1 and ~0)."""
        return bool(self.slopes is None and math.isfinite(self.moments.log_m2) and self._gh_error > _GH_TRUSTED)

    def cos(self, c: float) -> float:
        """cos_post(act, log_q, c)."""
        c = min(max(c, -1.0), 1.0)
        if self.slopes is not None:  # the arc-cosine kernel (leaky: slopes a+, a-)
            a, b = self.slopes
            return ((a * a + b * b) * _arccos(c) - 2 * a * b * _arccos(-c)) / ((a * a + b * b) / 2)
        if not math.isfinite(self.moments.log_m2):
            return math.nan
        # c = +-1 and c ~ 0 need no 2-D rule: the graded 1-D one's E[phi(z) phi(+-z)] and E[phi]^2.
        m, m2 = self._m
        if c == 1:
            return 1.0
        if c == -1:  # E[phi(z) phi(-z)] by the graded rule (symmetric), phi as at init (rare: not kept)
            x, w = nodes()
            u = _phi_scaled(self.act, _first_nodes(), 0.5 * self.log_q, renormalise=True)[0][:len(x)]
            return float(w @ (u * u[::-1])) / m2
        if abs(c) < _NEGLIGIBLE_C:
            return m * m / m2
        if self.needs_series():
            return float(self.series().cos(np.array([c]))[0])
        # E[phi(z1) phi(z2)] by the 2-D rule: phi(z1) at node x_i, phi(z2) at c x_i + s y_j.
        s = math.sqrt(1 - c * c)
        i, xi, yj, wij = _pairs()
        u2, l2 = _phi_scaled(self.act, c * xi + s * yj, 0.5 * self.log_q)
        cross = float((wij * self._u1[i]) @ u2) * math.exp(l2 - self._l1)
        return min(max(cross / m2, -1.0), 1.0)


def _arccos(r: float) -> float:
    return (math.sqrt(max(0.0, 1 - r * r)) + (math.pi - math.acos(r)) * r) / (2 * math.pi)


def _logaddexp(a: float, b: float) -> float:
    """numpy.logaddexp's algorithm on Python floats (a numpy scalar call costs more than the arithmetic)."""
    if a == b:  # also both infinite
        return a + math.log(2.0)
    d = a - b
    return a + math.log1p(math.exp(-d)) if d > 0 else b + math.log1p(math.exp(d))


def bias_log_variance(scheme: inits.Scheme, bias_std: float | None, fan_in: int) -> float:
    """log Var(b_i) of a layer (``bias_std**2``, or the scheme's own for
    torch-default); -inf without a bias."""
    if not inits.has_bias(scheme, bias_std):
        return -math.inf
    return 2 * math.log(bias_std) if bias_std is not None else -math.log(3 * fan_in)


def predict(spec: RunSpec) -> pd.DataFrame:
    """Mean-field predictions for every layer of ``spec``'s network.

    Columns ``theory_{side}_{stat}`` for side pre/post (and grad/delta), stats
    mean, std, log10_std, second_moment, cos_sim. Gradients are predicted
    down to the first batch-norm layer met going backward (mean-field BN
    gradient theory is not modelled); empty for user init callables, whose
    variance is unknown to the theory.
    """
    net = spec.network
    scheme = net.init.resolve()
    depth = net.depth
    if scheme.user is not None:
        return pd.DataFrame({"layer": range(depth + 1)})
    if spec.input_file is not None:
        from .engine import make_inputs  # the file's own moments seed the recursion
        from .stats import side_stats

        s0 = side_stats(*make_inputs(spec, 0))  # a file is never all zeros (spec.load_input)
        log_m2, cos = math.log(s0["second_moment"]), s0["cos_sim"]
        first = (math.nan, math.nan, s0["mean"], s0["log10_std"] * _LN10, log_m2, cos, math.nan,
                 s0["log10_abs_mean"] * _LN10)
    else:
        log_m2, cos = 2 * math.log(spec.input_std), 0.0
        first = (math.nan, math.nan, 0.0, 0.5 * log_m2, log_m2, 0.0, math.nan, -math.inf)
    steps = np.array([first, *_forward(spec, scheme, log_m2, cos)]).T
    log_q, c_pre, mean, log_sd, log_m2s, coss, dphi2, log_abs_mean = steps
    pre_mean = np.zeros(depth + 1)
    pre_mean[0] = math.nan  # layer 0 is the input: it has no pre-activation
    df = pd.DataFrame({"layer": range(depth + 1), **_columns("post", mean, log_sd, log_m2s, coss, log_abs_mean),
                       **_columns("pre", pre_mean, 0.5 * log_q, log_q, c_pre, np.where(np.isnan(pre_mean), np.nan, -np.inf))})
    if spec.backward:
        _fill_dphi2(dphi2, log_q, net)
        _predict_backward(df, spec, scheme, dphi2)
    _finite_width_band(df, spec, scheme)
    return df


def _fill_dphi2(dphi2: np.ndarray, log_q: np.ndarray, net: NetworkSpec) -> None:
    """Fill in E[phi'(z)^2] where :func:`_forward` left it out (nan): it does
    not feed the recursion, so it is computed for all layers at once."""
    names = np.array([""] + [net.activation_at(layer) for layer in range(1, net.depth + 1)])
    for name in set(names[1:]):
        todo = (names == name) & np.isnan(dphi2)
        if todo.any():
            log_qs, where = np.unique(log_q[todo], return_inverse=True)
            dphi2[todo] = _dphi2(activations.get(name, net.leaky_slope), log_qs)[where]


def _dphi2(act: Activation, log_q: np.ndarray, chunk: int = 64) -> np.ndarray:
    """E[phi'(z)^2] at each of many q: ``moments(act, log_q).dphi2``, vectorised over q (in chunks that stay
    in cache)."""
    x, w = nodes()
    out = np.empty(len(log_q))
    for i in range(0, len(log_q), chunk):
        # As dphi_scaled(act, x, log_s) computes it: x times exp(log_s), exp capped at 600.
        scale = np.exp(np.minimum(0.5 * log_q[i:i + chunk], 600.0))
        d = activations.dphi_scaled(act, scale[:, None] * x, 0.0)
        out[i:i + chunk] = (d * d) @ w
    return out


# One layer of the forward recursion: log q and c entering the activation, then the post-activation
# mean, log sd, log E[h^2], cos, E[phi'(z)^2] (nan where it takes quadrature: see _fill_dphi2) and log |mean|.
_Step = tuple[float, float, float, float, float, float, float, float]


class _QStep(NamedTuple):
    """One layer of the q recursion."""

    log_q: float
    ratio_b: float  # Var(b) over the weights' share of q
    at_q: _AtQ | None  # the c-map (None where batch norm leaves no c)
    mean: float  # the post-activation mean, log sd and log E[h^2]
    log_sd: float
    log_m2: float
    dphi2: float  # E[phi'(z)^2] (nan: see _fill_dphi2)
    log_abs_mean: float  # log |the post-activation mean|


def _forward(spec: RunSpec, scheme: inits.Scheme, log_m2: float, cos: float, reuse: bool = True) -> list[_Step]:
    """The recursion from the input's log E[h^2] and cos through layers 1..L.

    q does not depend on c, so q runs through all layers first, then c,
    which computes Mehler's series (where it needs them) for many layers'
    q at a time. A layer's q-step is a deterministic
    function of its shape, activation and BN and of log_m2 from the layer
    below, and its c-step of its q and of cos from below; deep stacks
    revisit those inputs (q and c reach a fixed point or a cycle in the last
    bits, or q settles while c still moves). With ``reuse`` a step whose
    inputs are bitwise those of an earlier one is copied, as are the moments
    and c-map of a log q met before. That is exact, not a tolerance-based
    stop: the same inputs give bitwise the same outputs (tested against
    ``reuse=False``, which computes every layer afresh, but for Mehler's
    series: those are shared by value in both modes, so that both make the
    same batches).
    """
    net = spec.network
    names = {net.activation_at(1), net.activation_at(net.depth)}
    acts = {name: activations.get(name, net.leaky_slope) for name in names}
    bn_layers = set(net.bn_layers)
    log_eps = math.log(net.bn_eps) if net.bn_eps > 0 else -math.inf  # eps = 0: BN's q is exactly 1
    levels: dict[tuple[str, float], _AtQ] = {}

    def level(name: str, log_q: float) -> _AtQ:
        found = levels.get((name, log_q)) if reuse else None
        if found is None:
            found = _AtQ(acts[name], log_q, with_dphi2=False)
            if reuse:
                levels[name, log_q] = found
        return found

    @lru_cache(maxsize=None)
    def log_variances(n_in: int, n_out: int) -> tuple[float, float]:
        """log(n_in Var W_ij) and log Var b_i."""
        return math.log(n_in * inits.variance(scheme, n_in, n_out)), bias_log_variance(scheme, net.bias_std, n_in)

    def q_step(n_in: int, n_out: int, name: str, bn: bool, log_m2: float) -> _QStep:
        log_nv, log_vb = log_variances(n_in, n_out)
        log_sig = log_nv + log_m2
        log_q = _logaddexp(log_sig, log_vb)
        ratio_b = math.exp(min(log_vb - log_sig, 700.0))
        if bn and net.bn_position == "pre":
            log_q = log_q - _logaddexp(log_q, log_eps)
        at_q = level(name, log_q)
        mo = at_q.moments
        mean, log_sd, log_m2_post, log_abs_mean = mo.mean, mo.log_sd, mo.log_m2, mo.log_abs_mean
        if bn and net.bn_position == "post":
            log_var = 2 * log_sd
            log_m2_post = log_var - _logaddexp(log_var, log_eps)
            mean, log_sd, log_abs_mean = 0.0, 0.5 * log_m2_post, -math.inf
        return _QStep(log_q, ratio_b, None if bn else at_q, mean, log_sd, log_m2_post, mo.dphi2, log_abs_mean)

    q_steps: list[_QStep] = []
    found_q: dict[tuple[Any, ...], _QStep] = {}
    for layer in range(1, net.depth + 1):
        key = (net.widths[layer - 1], net.widths[layer], net.activation_at(layer), layer in bn_layers, log_m2)
        found = found_q.get(key) if reuse else None
        if found is None:
            found = q_step(*key)
            if reuse:
                found_q[key] = found
        q_steps.append(found)
        log_m2 = found.log_m2

    # The c-maps that the 2-D rule cannot take, by (activation, log q) in layer order: the first one c
    # needs gets its series together with the next ones (which c needs too, unless it lands on exactly 0
    # or 1 first). Keyed by value, with or without ``reuse``, so that both make the same batches.
    queue = list(dict.fromkeys((st.at_q.act.name, st.at_q.log_q) for st in q_steps
                               if st.at_q is not None and st.at_q.needs_series()))
    first = {key: i for i, key in enumerate(queue)}
    made: dict[tuple[str, float], _Series] = {}

    def with_series(at_q: _AtQ, batch: int = 64) -> None:
        key = (at_q.act.name, at_q.log_q)
        if key not in made:
            todo = [k for k in queue[first[key]:first[key] + batch] if k not in made]
            for name in acts:
                mine = [log_q for n, log_q in todo if n == name]
                if mine:
                    batch_series = _series(acts[name], mine)
                    made.update({(name, log_q): batch_series[i:i + 1] for i, log_q in enumerate(mine)})
        at_q._series = made[key]

    out: list[_Step] = []
    found_c: dict[tuple[int, float], float] = {}
    for log_q, ratio_b, at_q, mean, log_sd, log_m2_post, dphi2, log_abs_mean in q_steps:
        bn_pre = at_q is None and net.bn_position == "pre"
        c_pre = math.nan if bn_pre else (cos + ratio_b) / (1 + ratio_b)
        if at_q is None or math.isnan(c_pre):
            cos = math.nan
        else:
            key = (id(at_q), c_pre)
            if reuse and key in found_c:
                cos = found_c[key]
            else:
                if _NEGLIGIBLE_C <= abs(c_pre) < 1 and at_q._series is None and at_q.needs_series():
                    with_series(at_q)
                cos = at_q.cos(c_pre)
                if reuse:
                    found_c[key] = cos
        out.append((log_q, c_pre, mean, log_sd, log_m2_post, cos, dphi2, log_abs_mean))
    return out


def _log_chi2_moments(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """E and Var of log(chi2_k / k)."""
    return special.digamma(k / 2) - np.log(k / 2), special.polygamma(1, k / 2)


def _finite_width_band(df: pd.DataFrame, spec: RunSpec, scheme: inits.Scheme) -> None:
    """The typical network's log10 std and its 95% band, for Gaussian linear and
    relu stacks without bias or BN (``theory_post_log10_std_typical``, ``_lo``,
    ``_hi``).

    For one sample the law is exact: each layer multiplies |h|^2 by fan_in v
    times chi2_{n}/n (linear) or chi2_K/n with K ~ Binomial(n, 1/2) active
    units (relu), independently, so log std is a sum of independent terms with
    known mean and variance. For many samples it holds once the stack has
    collapsed to rank one (deep layers); before that the band is too wide.
    """
    net = spec.network
    acts = {net.activation_at(l) for l in range(1, net.depth + 1)}
    if (scheme.user is not None or scheme.orthogonal or scheme.distribution != "normal" or net.bn_layers
            or inits.has_bias(scheme, net.bias_std) or not acts <= {"linear", "relu"} or len(acts) != 1):
        return
    n = np.array(net.widths[1:], dtype=float)
    if acts == {"linear"}:
        mean, var = _log_chi2_moments(n)
    else:  # relu: K ~ Binomial(n, 1/2) units are active; chi2_K / n relative to its mean-field value n/2
        widths, layer_of = np.unique(n.astype(int), return_inverse=True)  # once per distinct width
        mean, var = np.empty(len(widths)), np.empty(len(widths))
        for i, width in enumerate(widths):
            k = np.arange(1, width + 1)
            p = stats_binom_pmf(k, width)
            m_k = special.digamma(k / 2) + math.log(2) - math.log(width / 2)
            mean[i] = p @ m_k
            var[i] = p @ (special.polygamma(1, k / 2) + m_k**2) - mean[i] ** 2
        mean, var = mean[layer_of], var[layer_of]
    # log std = 0.5 log m2; the std is also taken about the sample mean, a negligible difference here.
    shift = np.concatenate([[0.0], np.cumsum(0.5 * mean) / _LN10])
    sd = np.concatenate([[0.0], np.sqrt(np.cumsum(0.25 * var)) / _LN10])
    # The law moves |h|^2; the std keeps its mean-field ratio to the RMS (sqrt(1 - 1/pi) for relu), so the
    # same shifts apply to the mean-field std line.
    base = df["theory_post_log10_std"].to_numpy()
    df["theory_post_log10_std_typical"] = base + shift
    df["theory_post_log10_std_lo"] = base + shift - 1.96 * sd
    df["theory_post_log10_std_hi"] = base + shift + 1.96 * sd


def stats_binom_pmf(k: np.ndarray, n: int) -> np.ndarray:
    """P(K = k) for K ~ Binomial(n, 1/2), computed in logs (n may be large)."""
    logp = special.gammaln(n + 1) - special.gammaln(k + 1) - special.gammaln(n - k + 1) - n * math.log(2)
    return np.exp(logp)


def _predict_backward(df: pd.DataFrame, spec: RunSpec, scheme: inits.Scheme, dphi2: np.ndarray) -> None:
    net = spec.network
    depth = net.depth
    log_g = [math.nan] * (depth + 1)
    log_d = [math.nan] * (depth + 1)
    log_g[depth] = 0.0  # g_L ~ N(0, 1)
    for layer in range(depth, 0, -1):
        if layer in net.bn_layers:
            break  # BN's gradient is not modelled by mean-field theory here
        n_in, n_out = net.widths[layer - 1], net.widths[layer]
        log_d[layer] = log_g[layer] + math.log(dphi2[layer]) if dphi2[layer] > 0 else -math.inf
        log_g[layer - 1] = log_d[layer] + math.log(n_out * inits.variance(scheme, n_in, n_out))
    for side, logs in (("grad", log_g), ("delta", log_d)):
        logs = np.array(logs)
        df[f"theory_{side}_second_moment"] = np.exp(np.minimum(logs, 700)) * np.where(logs > 700, np.inf, 1)
        df[f"theory_{side}_log10_std"] = 0.5 * logs / _LN10
        df[f"theory_{side}_std"] = np.exp(np.minimum(0.5 * logs, 700)) * np.where(0.5 * logs > 700, np.inf, 1)
        df[f"theory_{side}_mean"] = np.where(np.isnan(logs), np.nan, 0.0)
        df[f"theory_{side}_log10_abs_mean"] = np.where(np.isnan(logs), np.nan, -np.inf)


def _columns(side: str, mean: np.ndarray, log_sd: np.ndarray, log_m2: np.ndarray, cos: np.ndarray,
             log_abs_mean: np.ndarray) -> dict[str, np.ndarray]:
    return {f"theory_{side}_mean": mean, f"theory_{side}_std": _big(log_sd),
            f"theory_{side}_log10_std": log_sd / _LN10, f"theory_{side}_log10_abs_mean": log_abs_mean / _LN10,
            f"theory_{side}_second_moment": _big(log_m2), f"theory_{side}_cos_sim": cos}


def _big(log_v: np.ndarray) -> np.ndarray:
    """exp(log_v), inf where beyond float64 (nan stays nan)."""
    return np.where(log_v >= 709.7, np.inf, np.exp(np.minimum(log_v, 709.7)))


# --- the (sigma_w, sigma_b) picture of the mean-field papers ---------------

def q_map(act: Activation, sigma_w: float, sigma_b: float, q: float) -> float:
    """q' = sigma_w^2 E[phi(z)^2] + sigma_b^2, z ~ N(0, q)."""
    return sigma_w**2 * math.exp(moments(act, math.log(q)).log_m2) + sigma_b**2 if q > 0 else sigma_b**2


def fixed_point(act: Activation, sigma_w: float, sigma_b: float, q0: float = 1.0, tol: float = 1e-13,
                max_iter: int = 20_000) -> float:
    """q* by iterating the q-map from q0 (0 or inf when it runs away).

    At sigma_b = 0 the iteration can creep toward 0 like 1/l (tanh at
    sigma_w = 1); still falling after ``max_iter`` steps from q0 means q* = 0.
    """
    q = q0
    for _ in range(max_iter):
        new = q_map(act, sigma_w, sigma_b, q)
        if not math.isfinite(new) or new > 1e200:
            return math.inf
        if abs(new - q) <= tol * max(q, 1e-300) or new < 1e-300:
            return new if new >= 1e-300 else 0.0
        q = new
    return 0.0 if sigma_b == 0 and q < 1e-3 * q0 else q


def mean_field(act: Activation | str, sigma_w: float, sigma_b: float = 0.0) -> dict[str, Any]:
    """q*, chi_1, the phase and the depth scales xi_q, xi_c (Schoenholz et al. 2017)."""
    if isinstance(act, str):
        act = activations.get(act)
    q_star = fixed_point(act, sigma_w, sigma_b)
    log_q = math.log(q_star) if 0 < q_star < math.inf else (-700.0 if q_star == 0 else 700.0)
    chi_1 = sigma_w**2 * moments(act, log_q).dphi2
    phase = "critical" if abs(chi_1 - 1) < 1e-3 else "ordered" if chi_1 < 1 else "chaotic"
    xi_q = math.nan
    if 0 < q_star < math.inf:
        h = 1e-4
        slope = (q_map(act, sigma_w, sigma_b, q_star * (1 + h)) - q_map(act, sigma_w, sigma_b, q_star * (1 - h))) / (
            2 * h * q_star)
        xi_q = -1 / math.log(slope) if 0 < slope < 1 - 1e-9 else math.inf  # ~1: critical, no finite scale
    c_star, slope_c = 1.0, chi_1
    if chi_1 > 1 and 0 < q_star < math.inf:
        at_q = _AtQ(act, log_q)
        c_star = _c_fixed_point(at_q, sigma_w, sigma_b)
        slope_c = sigma_w**2 * _dphi_cross(at_q, c_star)
    xi_c = -1 / math.log(slope_c) if 0 < slope_c < 1 else math.inf
    return {"activation": act.name, "sigma_w": sigma_w, "sigma_b": sigma_b, "q_star": q_star, "chi_1": chi_1,
            "phase": phase, "c_star": c_star, "xi_q": xi_q, "xi_c": xi_c}


def _c_fixed_point(at_q: _AtQ, sigma_w: float, sigma_b: float) -> float:
    """c* of the c-map at q*: c = (sigma_w^2 E[phi(z1) phi(z2)] + sigma_b^2) / q*, iterated from 1/2."""
    m2_over_q = math.exp(at_q.moments.log_m2 - at_q.log_q)
    b_over_q = sigma_b**2 * math.exp(-at_q.log_q)
    c = 0.5
    for _ in range(10_000):
        new = sigma_w**2 * m2_over_q * at_q.cos(c) + b_over_q
        if abs(new - c) < 1e-13:
            return new
        c = new
    return c


def _dphi_cross(at_q: _AtQ, c: float) -> float:
    """E[phi'(z1) phi'(z2)] at correlation c: where the c-map takes Mehler's series, its derivative
    (Price's theorem: d/dc E[phi(z1) phi(z2)] = q E[phi'(z1) phi'(z2)]), else the 2-D rule."""
    act, log_q = at_q.act, at_q.log_q
    if c >= 1:
        return at_q.moments.dphi2
    if at_q.needs_series():
        return float(at_q.series().slope(np.array([c]))[0]) * math.exp(at_q.moments.log_m2 - log_q)
    x, y, w = _nodes2d()
    s = math.sqrt(max(0.0, 1 - c * c))
    d1 = activations.dphi_scaled(act, np.broadcast_to(x, w.shape).copy(), 0.5 * log_q)
    d2 = activations.dphi_scaled(act, c * x + s * y, 0.5 * log_q)
    return float(np.sum(w * d1 * d2))


def gains(act: Activation | str | Callable[[np.ndarray], np.ndarray], leaky_slope: float = 0.01) -> dict[str, Any]:
    """Both gains of DESIGN.md for z ~ N(0, 1), with the published tables beside.

    second_moment_gain = 1/sqrt(E[phi(z)^2]) (PyTorch's convention);
    variance_gain = 1/sqrt(Var phi(z)) (NFNets' gamma). ``act`` may be any
    callable on numpy arrays.
    """
    if isinstance(act, str):
        act = activations.get(act, leaky_slope)
    name, phi = (act.name, act.phi) if isinstance(act, Activation) else (getattr(act, "__name__", "custom"), act)
    m = expect(phi)
    m2 = expect(lambda z: phi(z) ** 2)
    var = expect(lambda z: (phi(z) - m) ** 2)
    torch = TORCH_GAIN.get(name)
    if name == "leaky_relu":
        torch = math.sqrt(2 / (1 + leaky_slope**2))
    return {"activation": name, "second_moment_gain": 1 / math.sqrt(m2), "variance_gain": 1 / math.sqrt(var),
            "mean": m, "second_moment": m2, "variance": var, "torch_calculate_gain": torch,
            "nfnets_gamma": NFNET_GAMMA.get(name) if name != "leaky_relu" or leaky_slope == 0.01 else None}


def phase_grid(act: Activation | str, sigma_w2: np.ndarray, sigma_b2: np.ndarray, iters: int = 2_000
               ) -> pd.DataFrame:
    """q*, chi_1, c* and the correlation depth scale xi_c on a grid of
    (sigma_w^2, sigma_b^2), all points iterated at once.

    One row per grid point. Phases: ordered (chi_1 < 1: inputs converge, c* = 1),
    chaotic (chi_1 > 1: c* < 1). xi_c = -1 / log(dC/dc at c*), infinite on the
    critical line chi_1 = 1.
    """
    if isinstance(act, str):
        act = activations.get(act)
    sw2, sb2 = np.meshgrid(np.asarray(sigma_w2, float), np.asarray(sigma_b2, float), indexing="ij")
    sw2, sb2 = sw2.ravel(), sb2.ravel()
    x, w = nodes(8)
    q = np.ones_like(sw2)
    live, step = np.arange(q.size), np.zeros_like(sw2)
    # The q-map, vectorized over the points still moving (moderate q: phi is evaluated directly). Near
    # the critical line it contracts by little a step (selu at sigma_w^2 = 1.8: q* ~ 3600 is ~900 after
    # 400 steps), so every 20th step extrapolates a geometric approach to its limit (Aitken), which the
    # plain steps after it then settle. Points running to q* = inf or 0 stop past 1e200 or 1e-100, or
    # after ``iters`` steps. On the line itself the approach is slower than geometric and q* is left
    # unsettled (gelu, elu, silu at sigma_w^2 = 2: chi_1 within 0.6% of mean_field's).
    for k in range(iters):
        i = live
        new = np.clip(sw2[i] * (act.phi(np.sqrt(q[i])[:, None] * x[None, :]) ** 2 @ w) + sb2[i], 1e-300, 1e300)
        d = new - q[i]
        if k % 20 == 19:
            with np.errstate(divide="ignore", invalid="ignore"):
                r = d / step[i]
            jump = (r > 0) & (r < 1 - 1e-9)
            # at most a factor of 10 at a time: early on the approach need not be geometric yet
            new[jump] = np.clip(new[jump] + d[jump] * r[jump] / (1 - r[jump]), new[jump] / 10, new[jump] * 10)
        step[i] = d
        moving = (np.abs(d) > 1e-13 * q[i]) & (new > 1e-100) & (new < 1e200)
        q[i] = new
        live = i[moving]
        if not live.size:
            break
    z = np.sqrt(q)[:, None] * x[None, :]
    chi1 = sw2 * (act.dphi(z) ** 2 @ w)
    # The c-map from c = 0.5 toward c*, C(c) = (sw2 E[phi(z1) phi(z2)] + sb2) / q*, and its slope at c*,
    # sw2 E[phi'(z1) phi'(z2)] (Price's theorem), by Mehler's series, all chaotic points at once. In the
    # ordered phase c* = 1 and the slope is chi_1.
    c, chi_c = np.ones_like(q), chi1.copy()
    chaotic = np.flatnonzero(chi1 >= 1)
    if chaotic.size:
        series = _series(act, np.log(q[chaotic]))
        m2 = act.phi(z[chaotic]) ** 2 @ w  # E[phi^2] at q*, as the q-map has it
        cc = np.full(chaotic.size, 0.5)
        live = np.arange(chaotic.size)
        # Near chi_1 = 1 the map contracts by only ~1 - 1/xi_c a step: 2,000 steps settle c* to 1e-10 for
        # xi_c up to ~90 (mean_field, one point at a time, takes up to 10,000).
        for _ in range(2_000):
            i = chaotic[live]
            new = np.clip((sw2[i] * series[live].cos(cc[live]) * m2[live] + sb2[i]) / q[i], -1, 1)
            moving = np.abs(new - cc[live]) > 1e-10
            cc[live] = new
            live = live[moving]
            if not live.size:
                break
        c[chaotic] = cc
        chi_c[chaotic] = sw2[chaotic] * series.slope(cc) * m2 / q[chaotic]
    with np.errstate(divide="ignore"):
        xi_c = np.where((chi_c > 0) & (chi_c < 1), -1 / np.log(np.clip(chi_c, 1e-300, 1 - 1e-16)), np.inf)
    return pd.DataFrame({"sigma_w2": sw2, "sigma_b2": sb2, "q_star": q, "chi_1": chi1, "c_star": c,
                         "xi_c": xi_c, "phase": np.where(chi1 < 1, "ordered", "chaotic")})

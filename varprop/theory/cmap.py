"""An activation's Gaussian expectations at one q: its moments and its c-map
(the correlation of two outputs given the correlation of two inputs).

The c-map uses the 2-D Gauss-Hermite rule where phi is smooth on that rule's
scale, and elsewhere Mehler's series in phi's Hermite coefficients
(:class:`Series`), which bounds its own error and keeps the predicted cosine
within [-1, 1]. Activations are evaluated through
:func:`varprop.nn.activations.apply_scaled`, so q may be any magnitude.

>>> from varprop.nn.activations import get
>>> round(cos_post(get("relu"), 0.0, 0.0), 6)  # 1/pi: the arc-cosine kernel at c = 0
0.31831
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import numpy as np

from ..logscale import exp_times
from ..nn import activations
from ..nn.activations import Activation
from .quadrature import (arccos, first_nodes, fine_nodes, hermite, hermite_rows, moment_gap, nodes,
                         pairs)

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
    if 0.5 * log_q > activations.LOG_DIRECT and (act.slope_pos or act.slope_neg):
        return act.slope_pos, act.slope_neg
    # Tiny q: apply_scaled takes phi(z) = phi'(0) z there, so the closed forms hold. Not across a kink at 0
    # (selu's): the 2-D rule used there so far differs from the arc-cosine kernel, and predictions would move.
    if 0.5 * log_q < -activations.LOG_DIRECT and act.phi0 == 0 and act.d0_pos == act.d0_neg:
        return act.d0_pos, act.d0_neg
    return None


def moments(act: Activation, log_q: float) -> Moments:
    """The moments of ``act`` under z ~ N(0, exp(log_q))."""
    return AtQ(act, log_q).moments


# Below this |c| the c-map is E[phi]^2 / E[phi^2] to within 1e-17 (at every node of the 2-D rule, s = 1 and
# |c x| < 2^-54 |y|, under half an ulp of y, so c x + s y rounds to y).
NEGLIGIBLE_C = 2.0**-54 * np.abs(hermite()[0]).min() / np.abs(hermite()[0]).max()


# The 2-D Gauss-Hermite rule is used for the c-map where the 1-D one integrates phi against 1, x, x^2 and
# phi^2 as the graded rule does to this (relative) accuracy: phi is then smooth on the rule's scale (gelu at
# q = 0.5: 2e-16). Elsewhere (tanh at q = 4: 6e-4, and the 2-D rule's c-map was off by as much; any kink)
# the Mehler series takes over.
GH_TRUSTED = 1e-12


# The Mehler series keeps the terms k = 0..K of this K.


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


class Series:
    """The c-map by Mehler's formula: with a_k = E[phi(sqrt(q) x) h_k(x)],
    E[phi(z1) phi(z2)] = sum_k a_k^2 c^k for every |c| <= 1; for several q
    at once, a row each.

    The terms k <= K = ``SERIES_TERMS`` are summed. Of the rest only their
    total T = E[phi^2] - sum a_k^2 is known (for each parity of k), so they
    move the sum by at most |c|^(K+1) T (:meth:`bound`), by between 0 and
    that for c >= 0. They are spread over k > K as the last coefficients of
    their parity decay (:func:`series`), which keeps the value within the
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

    def __getitem__(self, rows: Any) -> "Series":
        """The rows ``rows`` (an index array or slice) alone."""
        out = object.__new__(Series)
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


def series(act: Activation, log_qs: Sequence[float]) -> Series:
    """The :class:`Series` of ``act`` at ``log_qs``, a row each, computed together (a deep stack meets a
    new q at every layer, and per q this is a few small array operations).

    The terms left out are spread over k > K of each parity as A k^-p exp(-b sqrt(k)). The power is how a
    kink or a jump at 0 decays; exp(-b sqrt(k)) how a function analytic in a strip of half-width d does
    (b ~ 2 sqrt(2) d: tanh(sqrt(q) x) looks like a jump only up to k ~ q). p and b >= 0 come from least
    squares on the last coefficients' logs (p = b = 0 if they are not all positive: the rest then lies
    mostly at k beyond any |c| < 1's reach, the low end of its bound)."""
    x, w = fine_nodes()
    half = 0.5 * np.asarray(log_qs, dtype=float)
    if np.all(np.abs(half) <= activations.LOG_DIRECT):
        u = act.phi(np.exp(half)[:, None] * x)
    else:
        u = np.array([phi_scaled(act, x, h)[0] for h in half])
    top = np.abs(u).max(axis=1, keepdims=True)
    u = u / np.where(top > 0, top, 1.0)  # only ratios matter: keep squares far from under- and overflow
    a2 = (u @ hermite_rows().T) ** 2
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
    return Series(a2, m2, rest, tail_k, tail_odd, tail_w)


def cos_post(act: Activation, log_q: float, c: float) -> float:
    """E[phi(z1) phi(z2)] / E[phi(z)^2] for z1, z2 ~ N(0, q) with correlation c:
    the predicted mean cosine similarity of two samples after the activation."""
    return AtQ(act, log_q, with_dphi2=False).cos(c)


def phi_scaled(act: Activation, u: np.ndarray, log_s: float, renormalise: bool = False
                ) -> tuple[np.ndarray, float]:
    """:func:`activations.apply_scaled` (u float64) minus its per-call costs where it evaluates phi
    directly. There phi(exp(log_s) u) stays far inside float64, and so do squares and products of two, so
    scaling it to max |phi| = 1 as apply_scaled does is only done when asked."""
    if abs(log_s) > activations.LOG_DIRECT:
        return activations.apply_scaled(act, u, log_s)
    h = act.phi(u * math.exp(log_s))
    top = float(np.abs(h).max()) if renormalise else 0.0
    return (h / top, math.log(top)) if top > 0 else (h, 0.0)


class AtQ:
    """An activation's expectations at one q: its moments, and its c-map
    ``cos`` (cos_post at any c) with everything that does not depend on c
    done once, as a deep stack calls it at many c for one q. phi is
    evaluated at the 1-D rule's nodes and the 2-D rule's first coordinates
    in one pass; E[phi'(z)^2], which only gradients need, is nan without
    ``with_dphi2``."""

    def __init__(self, act: Activation, log_q: float, with_dphi2: bool = True):
        self.act, self.log_q = act, log_q
        self.slopes = _limit_slopes(act, log_q)
        self._series: Series | None = None  # made when cos first needs it (or in a batch by forward)
        if self.slopes is not None:  # closed forms for a+ z / a- z: no quadrature, any q
            a, b = self.slopes
            m1 = (a - b) / math.sqrt(2 * math.pi)
            m2 = (a * a + b * b) / 2
            mean = exp_times(m1, 0.5 * log_q)
            var = m2 - m1 * m1
            self.moments = Moments(mean, 0.5 * log_q + 0.5 * math.log(var) if var > 0 else -math.inf,
                                   log_q + math.log(m2) if m2 > 0 else -math.inf, m2,
                                   math.log(abs(m1)) + 0.5 * log_q if m1 else -math.inf)
            return
        x, w = nodes()
        # Scaled to max |phi| = 1 as apply_scaled does: where phi(z) departs from phi(0) by a few ulps only
        # (sigmoid at tiny q), the variance is rounding, and it stays that of apply_scaled's values.
        h, log_s = phi_scaled(act, first_nodes(), 0.5 * log_q, renormalise=True)
        u, self._l1 = h[:len(x)], log_s
        self._u1 = h[len(x):].copy()  # not a view: a deep stack keeps one AtQ per layer, and h is 16x larger
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
            gap = abs(float(moment_gap() @ h)) / math.sqrt(7 * m2)
            self._gh_error = max(gap, abs(float(hermite()[1] @ (self._u1 * self._u1)) - m2) / m2)
        dphi2 = math.nan
        if with_dphi2:
            d = activations.dphi_scaled(act, x, 0.5 * log_q)
            dphi2 = float(w @ (d * d))
        mean = exp_times(m, log_s)
        self.moments = Moments(mean, log_s + 0.5 * math.log(var) if var > 0 else -math.inf,
                               2 * log_s + math.log(m2) if m2 > 0 else -math.inf, dphi2,
                               math.log(abs(m)) + log_s if m else -math.inf)

    def series(self) -> Series:
        """The Mehler series at this q (made on first use unless forward batched it in)."""
        if self._series is None:
            self._series = series(self.act, [self.log_q])
        return self._series

    def needs_series(self) -> bool:
        """Whether :meth:`cos` takes Mehler's series (at c other than +-1 and ~0)."""
        return bool(self.slopes is None and math.isfinite(self.moments.log_m2) and self._gh_error > GH_TRUSTED)

    def cos(self, c: float) -> float:
        """cos_post(act, log_q, c)."""
        c = min(max(c, -1.0), 1.0)
        if self.slopes is not None:  # the arc-cosine kernel (leaky: slopes a+, a-)
            a, b = self.slopes
            return ((a * a + b * b) * arccos(c) - 2 * a * b * arccos(-c)) / ((a * a + b * b) / 2)
        if not math.isfinite(self.moments.log_m2):
            return math.nan
        # c = +-1 and c ~ 0 need no 2-D rule: the graded 1-D one's E[phi(z) phi(+-z)] and E[phi]^2.
        m, m2 = self._m
        if c == 1:
            return 1.0
        if c == -1:  # E[phi(z) phi(-z)] by the graded rule (symmetric), phi as at init (rare: not kept)
            x, w = nodes()
            u = phi_scaled(self.act, first_nodes(), 0.5 * self.log_q, renormalise=True)[0][:len(x)]
            return float(w @ (u * u[::-1])) / m2
        if abs(c) < NEGLIGIBLE_C:
            return m * m / m2
        if self.needs_series():
            return float(self.series().cos(np.array([c]))[0])
        # E[phi(z1) phi(z2)] by the 2-D rule: phi(z1) at node x_i, phi(z2) at c x_i + s y_j.
        s = math.sqrt(1 - c * c)
        i, xi, yj, wij = pairs()
        u2, l2 = phi_scaled(self.act, c * xi + s * yj, 0.5 * self.log_q)
        cross = float((wij * self._u1[i]) @ u2) * math.exp(l2 - self._l1)
        return min(max(cross / m2, -1.0), 1.0)

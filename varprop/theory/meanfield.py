"""The (sigma_w, sigma_b) picture of the mean-field papers (Poole et al.
2016; Schoenholz et al. 2017): the q-map and its fixed point q*, chi_1, the
phase, the depth scales xi_q and xi_c, and the phase diagram over a grid.

>>> mean_field("tanh", 1.0)["phase"]
'critical'
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from ..nn import activations
from ..nn.activations import Activation
from .cmap import AtQ, moments, series
from .quadrature import nodes, nodes2d

def q_map(act: Activation, sigma_w: float, sigma_b: float, q: float) -> float:
    """q' = sigma_w^2 E[phi(z)^2] + sigma_b^2, z ~ N(0, q)."""
    return sigma_w**2 * math.exp(moments(act, math.log(q)).log_m2) + sigma_b**2 if q > 0 else sigma_b**2


def fixed_point(act: Activation, sigma_w: float, sigma_b: float, q0: float = 1.0, tol: float = 1e-13,
                max_iter: int = 20_000) -> float:
    """q* by iterating the q-map from q0 (0 or inf when it runs away); where
    the iteration has not settled after ``max_iter`` steps (near chi_1 = 1 the
    map moves by little a step), the root of q_map(q) - q bracketed from where
    it stands (:func:`settle`)."""
    q = q0
    for _ in range(max_iter):
        new = q_map(act, sigma_w, sigma_b, q)
        if not math.isfinite(new) or new > 1e200:
            return math.inf
        if abs(new - q) <= tol * max(q, 1e-300) or new < 1e-300:
            return new if new >= 1e-300 else 0.0
        q = new
    root = settle(act, sigma_w, sigma_b, q, tol)
    # Without a bias the q-map's curvature near 0 is O(q^2): a root below 1e-12 is its rounding (tanh at
    # sigma_w = 1 crosses 0 near 1e-15), q* = 0.
    return 0.0 if sigma_b == 0 and root < 1e-12 else root


def settle(act: Activation, sigma_w: float, sigma_b: float, q: float, tol: float = 1e-13) -> float:
    """The fixed point the q-map approaches from ``q``: the root of q_map(q) - q, bracketed by doubling (or
    halving) from ``q`` (relu at sigma_w^2 = 2 - 1e-8 with sigma_b = 0.1 creeps up 0.01 a step toward
    q* = 1.7e6; tanh at sigma_w^2 = 1.001 down toward 5e-4, at sigma_w = 1 toward 0 like 1/l); inf or 0
    when none is found before 1e200 or 1e-300."""
    from scipy.optimize import brentq  # rarely needed: not worth its import on every run

    def gap(v: float) -> float:
        return q_map(act, sigma_w, sigma_b, v) - v

    step = 2.0 if gap(q) > 0 else 0.5
    far = q * step
    while (gap(far) > 0) == (step > 1):
        q, far = far, far * step
        if not 1e-300 < far < 1e200:
            return math.inf if step > 1 else 0.0
    return float(brentq(gap, min(q, far), max(q, far), xtol=1e-300, rtol=4 * tol))


# Where the fixed-point picture is computed accurately: sigma_w^2 a normal float64 well away from the limits,
# and q* (at most sigma_w^2 + sigma_b^2 for bounded phi) small enough that the graded rule, whose finest
# panel ends 1e-8 from 0, still resolves phi' of a saturating phi near 0 (tanh' at q = 1e20 is a spike of
# width 1e-10 there): sigma^2 up to 1e12.
SIGMA_W_RANGE = (1e-100, 1e6)


SIGMA_B_MAX = 1e6
LOG_Q_FAR = 600.0  # log q where phi's growth at infinity is read (relu-like phi: E[phi^2] / q is its limit there)


Q_EDGE = 1e6  # where the q-map's own addition is read on the edge growth = 1


def edge_excess(act: Activation, sigma_w: float, sigma_b: float) -> float:
    """(q'(Q) - Q) / Q at Q = :data:`Q_EDGE`: what the q-map adds to q of its own on the edge growth = 1."""
    return (q_map(act, sigma_w, sigma_b, Q_EDGE) - Q_EDGE) / Q_EDGE


def runs_away(growth: Any, sigma_b2: Any, excess: Any = 0.0) -> Any:
    """Whether the q-map has no finite fixed point, from its growth q'/q as q -> inf: above 1 (with 1e-9 for
    rounding: relu at sigma_w = sqrt(2), rounded, keeps every q), or within 1e-9 of 1 where the map still adds
    to q: a bias (sigma_b^2 a layer, to a q whose fixed point, if any, is 1e9 sigma_b^2 or more, 1e9 layers
    away) or the activation itself (elu, selu, softplus at their edge: q' - q tends to a positive constant or
    more), ``excess`` = (q'(Q) - Q) / Q at Q = :data:`Q_EDGE` above 1e-9."""
    edge = growth > 1 - 1e-9
    return (growth > 1 + 1e-9) | (edge & ((np.asarray(sigma_b2) > 0) | (np.asarray(excess) > 1e-9)))


def check_sigmas(sigma_w: float, sigma_b: float = 0.0) -> None:
    """ValueError unless ``sigma_w`` and ``sigma_b`` lie where :func:`mean_field` is accurate.

    >>> check_sigmas(1e-308)
    Traceback (most recent call last):
    ...
    ValueError: sigma_w = 1e-308 is outside 1e-100..1e+06, where the fixed point and chi_1 are computed accurately
    """
    lo, hi = SIGMA_W_RANGE
    if not lo <= sigma_w <= hi:
        raise ValueError(f"sigma_w = {sigma_w:g} is outside {lo:g}..{hi:g}, where the fixed point and chi_1 are "
                         "computed accurately")
    if not 0 <= sigma_b <= SIGMA_B_MAX:
        raise ValueError(f"sigma_b = {sigma_b:g} is outside 0..{SIGMA_B_MAX:g}, where the fixed point and chi_1 "
                         "are computed accurately")


def mean_field(act: Activation | str, sigma_w: float, sigma_b: float = 0.0) -> dict[str, Any]:
    """q*, chi_1, the phase and the depth scales xi_q, xi_c (Schoenholz et al. 2017).

    Phases: ordered (chi_1 < 1: inputs converge, c* = 1), chaotic (chi_1 > 1
    at a finite q*: c* < 1), critical (chi_1 = 1), exploding (no finite q*:
    the variance grows without bound, as relu's beyond sigma_w^2 = 2).

    >>> mean_field("relu", 1.5)["phase"], mean_field("tanh", 1.5)["phase"]
    ('exploding', 'chaotic')

    ValueError for ``sigma_w``, ``sigma_b`` outside :data:`SIGMA_W_RANGE`, :data:`SIGMA_B_MAX`.
    """
    if isinstance(act, str):
        act = activations.get(act)
    check_sigmas(sigma_w, sigma_b)
    # q' / q as q -> inf: sigma_w^2 E[phi(z)^2] / q, 1/2 sigma_w^2 for relu. Above 1 the q-map has no finite
    # fixed point, however slowly it runs away (relu at sigma_w^2 = 2.002 grows 0.1% a layer).
    growth = sigma_w**2 * math.exp(moments(act, LOG_Q_FAR).log_m2 - LOG_Q_FAR)
    excess = edge_excess(act, sigma_w, sigma_b) if growth > 1 - 1e-9 else 0.0
    q_star = math.inf if runs_away(growth, sigma_b**2, excess) else fixed_point(act, sigma_w, sigma_b)
    log_q = math.log(q_star) if 0 < q_star < math.inf else (-700.0 if q_star == 0 else 700.0)
    chi_1 = sigma_w**2 * moments(act, log_q).dphi2
    # With q* infinite (relu-like, sigma_w^2 E[phi'^2] > 1) the variance grows without bound and chi_1 > 1
    # says nothing about correlations: relu's c-map keeps c* = 1 at every scale, so there is no chaos to name.
    phase = ("critical" if abs(chi_1 - 1) < 1e-3 else "ordered" if chi_1 < 1
             else "exploding" if q_star == math.inf else "chaotic")
    xi_q = math.nan
    if 0 < q_star < math.inf:
        h = 1e-4
        slope = (q_map(act, sigma_w, sigma_b, q_star * (1 + h)) - q_map(act, sigma_w, sigma_b, q_star * (1 - h))) / (
            2 * h * q_star)
        xi_q = -1 / math.log(slope) if 0 < slope < 1 - 1e-9 else math.inf  # ~1: critical, no finite scale
    elif q_star == 0:  # q' = sigma_w^2 E[phi(z)^2] ~ sigma_w^2 (phi'(0+)^2 + phi'(0-)^2) / 2 q as q -> 0
        log_slope = 2 * math.log(sigma_w) + math.log((act.d0_pos**2 + act.d0_neg**2) / 2)
        xi_q = -1 / log_slope if log_slope < -1e-9 else math.inf
    c_star, slope_c = 1.0, chi_1
    if chi_1 > 1 and 0 < q_star < math.inf:
        at_q = AtQ(act, log_q)
        c_star = _c_fixed_point(at_q, sigma_w, sigma_b)
        slope_c = sigma_w**2 * dphi_cross(at_q, c_star)
    xi_c = -1 / math.log(slope_c) if 0 < slope_c < 1 else math.inf
    return {"activation": act.name, "sigma_w": sigma_w, "sigma_b": sigma_b, "q_star": q_star, "chi_1": chi_1,
            "phase": phase, "c_star": c_star, "xi_q": xi_q, "xi_c": xi_c}


def _c_fixed_point(at_q: AtQ, sigma_w: float, sigma_b: float) -> float:
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


def dphi_cross(at_q: AtQ, c: float) -> float:
    """E[phi'(z1) phi'(z2)] at correlation c: where the c-map takes Mehler's series, its derivative
    (Price's theorem: d/dc E[phi(z1) phi(z2)] = q E[phi'(z1) phi'(z2)]), else the 2-D rule."""
    act, log_q = at_q.act, at_q.log_q
    if c >= 1:
        return at_q.moments.dphi2
    if at_q.needs_series():
        return float(at_q.series().slope(np.array([c]))[0]) * math.exp(at_q.moments.log_m2 - log_q)
    x, y, w = nodes2d()
    s = math.sqrt(max(0.0, 1 - c * c))
    d1 = activations.dphi_scaled(act, np.broadcast_to(x, w.shape).copy(), 0.5 * log_q)
    d2 = activations.dphi_scaled(act, c * x + s * y, 0.5 * log_q)
    return float(np.sum(w * d1 * d2))


def phase_grid(act: Activation | str, sigma_w2: np.ndarray, sigma_b2: np.ndarray, iters: int = 2_000
               ) -> pd.DataFrame:
    """q*, chi_1, c* and the correlation depth scale xi_c on a grid of
    (sigma_w^2, sigma_b^2), all points iterated at once.

    One row per grid point. Phases: ordered (chi_1 < 1: inputs converge, c* = 1),
    chaotic (chi_1 > 1: c* < 1), exploding (q runs away: no fixed point). xi_c =
    -1 / log(dC/dc at c*), infinite on the critical line chi_1 = 1.
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
    # plain steps after it then settle. Points running to q* = inf or 0 stop past 1e200 or 1e-100. On the
    # line itself the approach is slower than geometric: a point still moving after ``iters`` steps is
    # settled as mean_field settles it (:func:`settle`).
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
    # no finite q* (mean_field's test): the variance runs away; chi_1 is then read at infinity, as mean_field
    # reads it, and there is no c* to find
    far = moments(act, LOG_Q_FAR)
    growth = sw2 * math.exp(far.log_m2 - LOG_Q_FAR)
    excess = np.zeros_like(sw2)
    for j in np.flatnonzero(growth > 1 - 1e-9):  # the edge's few points, with mean_field's accurate q-map
        excess[j] = edge_excess(act, math.sqrt(sw2[j]), math.sqrt(sb2[j]))
    exploding = runs_away(growth, sb2, excess)
    for j in live[~exploding[live]]:  # not settled after iters steps: mean_field's root from where it stands
        q[j] = settle(act, math.sqrt(sw2[j]), math.sqrt(sb2[j]), q[j])
        exploding[j] = q[j] == math.inf
    z = np.sqrt(np.where(np.isfinite(q), q, 1.0))[:, None] * x[None, :]
    chi1 = np.where(exploding, sw2 * far.dphi2, sw2 * (act.dphi(z) ** 2 @ w))
    # The c-map from c = 0.5 toward c*, C(c) = (sw2 E[phi(z1) phi(z2)] + sb2) / q*, and its slope at c*,
    # sw2 E[phi'(z1) phi'(z2)] (Price's theorem), by Mehler's series, all chaotic points at once. In the
    # ordered phase c* = 1 and the slope is chi_1.
    c, chi_c = np.ones_like(q), chi1.copy()
    chaotic = np.flatnonzero((chi1 >= 1) & ~exploding)
    if chaotic.size:
        by_series = series(act, np.log(q[chaotic]))
        m2 = act.phi(z[chaotic]) ** 2 @ w  # E[phi^2] at q*, as the q-map has it
        cc = np.full(chaotic.size, 0.5)
        live = np.arange(chaotic.size)
        # Near chi_1 = 1 the map contracts by only ~1 - 1/xi_c a step: 2,000 steps settle c* to 1e-10 for
        # xi_c up to ~90 (mean_field, one point at a time, takes up to 10,000).
        for _ in range(2_000):
            i = chaotic[live]
            new = np.clip((sw2[i] * by_series[live].cos(cc[live]) * m2[live] + sb2[i]) / q[i], -1, 1)
            moving = np.abs(new - cc[live]) > 1e-10
            cc[live] = new
            live = live[moving]
            if not live.size:
                break
        c[chaotic] = cc
        chi_c[chaotic] = sw2[chaotic] * by_series.slope(cc) * m2 / q[chaotic]
    with np.errstate(divide="ignore"):
        xi_c = np.where((chi_c > 0) & (chi_c < 1), -1 / np.log(np.clip(chi_c, 1e-300, 1 - 1e-16)), np.inf)
    return pd.DataFrame({"sigma_w2": sw2, "sigma_b2": sb2, "q_star": np.where(exploding, np.inf, q), "chi_1": chi1,
                         "c_star": c, "xi_c": xi_c,
                         "phase": np.where(exploding, "exploding", np.where(chi1 < 1, "ordered", "chaotic"))})

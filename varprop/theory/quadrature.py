"""Quadrature rules for Gaussian expectations E[f(x)], x ~ N(0, 1).

A graded composite Gauss-Legendre rule on each half-line (kinks at 0 cost
nothing in accuracy), a 48-point Gauss-Hermite rule and its 2-D product for
correlated pairs, and a fine rule for the Hermite coefficients of Mehler's
series (cmap.py).

>>> round(expect(lambda z: z**2, 3.0), 12)
3.0
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable

import numpy as np

LN10 = math.log(10.0)
# The Mehler series of the c-map keeps the terms k = 0..SERIES_TERMS (cmap.py).
SERIES_TERMS = 128


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


@lru_cache(maxsize=None)
def hermite(n: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Hermite nodes and weights for E[f(x)], x ~ N(0, 1) (symmetric, as numpy makes them)."""
    x, w = np.polynomial.hermite_e.hermegauss(n)
    return x, w / w.sum()


@lru_cache(maxsize=None)
def nodes2d(n: int = 48) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, w = hermite(n)
    return x[:, None], x[None, :], np.outer(w, w)


@lru_cache(maxsize=None)
def first_nodes() -> np.ndarray:
    """The 1-D rule's nodes, then the 2-D rule's first coordinates (phi(z1) depends on them alone)."""
    return np.concatenate([nodes()[0], hermite()[0]])


@lru_cache(maxsize=None)
def pairs() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The 2-D rule's node pairs (first index i, x_i, y_j) and weights W_i W_j, less the pairs whose weight
    is below 1e-20 of the largest. Those weigh 1e-20 in all, and phi grows at most linearly (the nodes stay
    within |z| < 18), so leaving them out moves E[phi(z1) phi(z2)] by less than rounding does, and saves
    almost half the evaluations of phi (tests/test_theory.py compares with the full rule)."""
    x, w = hermite()
    ww = np.outer(w, w)
    i, j = np.nonzero(ww >= 1e-20 * ww.max())
    return i, x[i], x[j], ww[i, j]


@lru_cache(maxsize=None)
def fine_nodes() -> tuple[np.ndarray, np.ndarray]:
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
def hermite_rows(terms: int = SERIES_TERMS) -> np.ndarray:
    """Row k: the fine rule's weights times h_k at its nodes, h_k = He_k / sqrt(k!) (orthonormal), so that
    row k @ f(x) = E[f(x) h_k(x)]. The recurrence runs on h_k exp(-x^2/4), which stays of order one."""
    x, w = fine_nodes()
    psi = np.empty((terms + 1, len(x)))
    psi[0] = np.exp(-x * x / 4)
    psi[1] = x * psi[0]
    for k in range(1, terms):
        psi[k + 1] = (x * psi[k] - math.sqrt(k) * psi[k - 1]) / math.sqrt(k + 1)
    return psi * (w / psi[0])


@lru_cache(maxsize=None)
def moment_gap() -> np.ndarray:
    """The row that takes phi at :func:`first_nodes` to the Gauss-Hermite rule's E[phi (1 + x + x^2)] less
    the graded rule's (one product: the three moments' gaps would have to cancel to hide)."""
    (xg, wg), (x, w) = hermite(), nodes()
    return np.concatenate([-w * (1 + x + x * x), wg * (1 + xg + xg * xg)])


def logaddexp(a: float, b: float) -> float:
    """numpy.logaddexp's algorithm on Python floats (a numpy scalar call costs more than the arithmetic)."""
    if a == b:  # also both infinite
        return a + math.log(2.0)
    d = a - b
    return a + math.log1p(math.exp(-d)) if d > 0 else b + math.log1p(math.exp(d))


def arccos(r: float) -> float:
    return (math.sqrt(max(0.0, 1 - r * r)) + (math.pi - math.acos(r)) * r) / (2 * math.pi)

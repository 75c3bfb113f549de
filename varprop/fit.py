"""Fits of named laws, with honest uncertainty.

- :func:`fan_in_law`: one layer's output std against fan_in on log-log axes,
  ``log10 std = a + b log10 fan_in`` by least squares; b = 0.5 for N(0, 1)
  weights (the sqrt(fan_in) law), 0 for fan_in-scaled ones. Its interval
  comes from the spread of per-replicate slopes (t with R - 1 dof).
- :func:`depth_growth`: log10 std gained per layer. log std performs a random
  walk over depth, so layer-by-layer residuals are correlated and a regression
  over layers would understate the error; the slope is instead measured once
  per replicate (independent networks) and its interval comes from the spread
  over replicates.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import numpy as np
import pandas as pd

from .spec import RunSpec, from_options, to_options
from .stats import t_half_width


@dataclass(frozen=True)
class LineFit:
    """``y = intercept + slope * x`` with the slope's standard error, 95% t
    interval (``dof`` degrees of freedom), R^2 and residuals."""

    slope: float
    slope_se: float
    slope_lo: float
    slope_hi: float
    intercept: float
    intercept_se: float
    r2: float
    dof: int
    residuals: list[float]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def line_fit(x: np.ndarray, y: np.ndarray, level: float = 0.95) -> LineFit:
    """Ordinary least squares with the textbook standard errors.

    >>> f = line_fit(np.array([0.0, 1, 2, 3]), np.array([1.0, 3, 5, 7]))
    >>> round(f.slope, 12), round(f.intercept, 12), f.r2
    (2.0, 1.0, 1.0)
    """
    from scipy import stats as sps  # here: every command imports this module, few fit a line (0.2 s saved)

    x, y = np.asarray(x, float), np.asarray(y, float)
    res = sps.linregress(x, y)
    resid = y - (res.intercept + res.slope * x)
    dof = len(x) - 2
    tq = float(sps.t.ppf(0.5 + level / 2, dof)) if dof > 0 else math.nan
    return LineFit(float(res.slope), float(res.stderr), float(res.slope - tq * res.stderr),
                   float(res.slope + tq * res.stderr), float(res.intercept), float(res.intercept_stderr),
                   float(res.rvalue**2), dof, resid.tolist())


def fan_in_law(base: RunSpec, fan_ins: Iterable[int], fan_out: int = 100, progress: Any = None
               ) -> tuple[pd.DataFrame, LineFit]:
    """Measure one layer's output std for each fan_in (every replicate a point)
    and fit log10 std on log10 fan_in. Returns the points (with the theory's
    prediction per fan_in) and the fit."""
    from .montecarlo import simulate  # engine imports this module's neighbours; keep the cycle out

    # One layer, no batch norm: the layer itself is what is measured.
    opts = {k: v for k, v in to_options(base).items() if k not in ("widths", "bn_layers", "bn_position", "bn_eps")}
    points = []
    for n in fan_ins:
        spec = from_options({**opts, "widths": (n, fan_out)})
        df = simulate(spec, progress=progress)
        last = df[df["layer"] == 1]
        for _, row in last.iterrows():
            points.append({"fan_in": n, "replicate": int(row["replicate"]), "log10_std": row["post_log10_std"],
                           "theory_log10_std": row.get("theory_post_log10_std", math.nan)})
    pts = pd.DataFrame(points)
    pooled = line_fit(np.log10(pts["fan_in"]), pts["log10_std"])
    reps = sorted(pts["replicate"].unique())
    if len(reps) < 2:
        return pts, pooled  # one replicate: the regression's own standard errors
    # Points of one replicate share its random draws across fan-ins (common
    # random numbers) and are not independent; replicates are. So the error
    # comes from the spread of the per-replicate slopes (the pooled slope is
    # their mean: every replicate has the same x's).
    per = [line_fit(np.log10(g["fan_in"]), g["log10_std"]) for _, g in pts.groupby("replicate")]
    slopes = np.array([f.slope for f in per])
    icpts = np.array([f.intercept for f in per])
    n = len(per)
    se, ise = slopes.std(ddof=1) / math.sqrt(n), icpts.std(ddof=1) / math.sqrt(n)
    half = t_half_width(slopes.std(ddof=1), n)
    return pts, LineFit(pooled.slope, float(se), pooled.slope - half, pooled.slope + half,
                        pooled.intercept, float(ise), pooled.r2, n - 1, pooled.residuals)


def depth_growth(layers: pd.DataFrame, side: str = "post", burn_in: int | None = None) -> pd.DataFrame:
    """Per configuration: log10 std gained per layer between layer b (the
    burn-in, default max(1, L // 10)) and L, mean over replicates with a 95% t
    interval, beside the theory's slope over the same layers."""
    rows = []
    for config, g in layers.groupby("config", sort=False):
        depth = int(g["layer"].max())
        b = burn_in if burn_in is not None else max(1, depth // 10)
        b = min(b, depth - 1) if depth > 1 else 0
        wide = g.pivot(index="replicate", columns="layer", values=f"{side}_log10_std")
        per_rep = (wide[depth] - wide[b]) / (depth - b) if depth > b else pd.Series([math.nan])
        mean, n = float(per_rep.mean()), int(per_rep.notna().sum())
        se = float(per_rep.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
        half = float(t_half_width(per_rep.std(ddof=1), n)) if n > 1 else math.nan
        th = math.nan
        tcol = f"theory_{side}_log10_std"
        if tcol in g and depth > b:
            t = g[g["replicate"] == g["replicate"].iloc[0]].set_index("layer")[tcol]
            rise = float(t[depth] - t[b])
            # A flat mean field (relu under He) differs between layers only by the q-map's float64 rounding
            # (4.8e-17 a layer over 50 layers): that is 0, not a slope.
            th = (0.0 if abs(rise) <= 1e-12 * max(1.0, abs(float(t[depth])), abs(float(t[b]))) else rise) / (depth - b)
        rows.append({"config": config, "burn_in": b, "depth": depth, "slope": mean, "slope_se": se,
                     "slope_lo": mean - half, "slope_hi": mean + half, "replicates": n, "theory_slope": th})
    return pd.DataFrame(rows)


def correlation_decay(activation: str, sigma_w2: Iterable[float], sigma_b2: float, seed: int = 0,
                      layers: int = 30, width: int = 300) -> pd.DataFrame:
    """Measured mean cosine similarity of z between samples per layer, beside
    the c-map's prediction, at a few (sigma_w^2, sigma_b^2) points."""
    from .montecarlo import simulate

    frames = []
    for sw2 in sigma_w2:
        spec = from_options({"layers": layers, "width": width, "activation": activation, "init": "fan_in",
                             "gain": math.sqrt(sw2), "bias_std": math.sqrt(sigma_b2), "samples": 40,
                             "replicates": 2, "seed": seed})
        m = simulate(spec).groupby("layer")[["pre_cos_sim", "theory_pre_cos_sim"]].mean().reset_index()
        m["point"] = f"sigma_w^2={sw2:.2f}, sigma_b^2={sigma_b2:.2f}"
        m["sigma_w2"], m["sigma_b2"] = sw2, sigma_b2
        frames.append(m)
    return pd.concat(frames, ignore_index=True)


__all__ = ["LineFit", "line_fit", "fan_in_law", "depth_growth", "correlation_decay"]

"""Diagnosis as data: one :class:`Assessment` per configuration, its verdict
(healthy, or the worst problem found) and every problem under it.

The checks, worst first (:data:`PROBLEMS`): the std leaves [1e-3, 1e3] x
the input's (the signal explodes: the mean network's std rises above 1e3 x
the input's; or dies: the median network's falls below 1e-3 x); the input
signal is lost (the variance across samples falls below 1e-6 of the
layer's); the input gradient's std leaves [1e-3, 1e3] x the output's; over
half the last layer's units are saturated (|phi'| < 1e-3); the inputs
collapse onto one direction (mean |cos| between samples above 0.9 at the
last layer).

The mean network (the root of the mean variance over replicates, what
mean-field theory predicts) is carried by its largest networks: with a
spread of networks (a deep ordered stack) a few survivors keep it within the
band while most networks die. So a signal dies when the median network's std
falls below the band, or the mean network's does (then the median one is
nearly there: half the networks have a variance at least the median's, so
the mean variance is at least half of it); it explodes when the mean
network's rises above it. The report words them (report/markdown.py); tests
and tools read them here.

>>> from varprop.spec import expand
>>> from varprop.montecarlo.run import run_configs
>>> run = run_configs(expand({"layers": 20, "width": 32, "samples": 32, "init": ["unit", "fan_in"]}))
>>> [(a.label, a.verdict) for a in assess(run)]
[('unit', 'explodes'), ('fan_in', 'healthy')]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .run import Run

# The problems a configuration can have, worst first (its verdict is the first it has).
PROBLEMS = ("explodes", "dies", "signal lost", "gradients explode", "gradients vanish", "saturated", "collapse")
STD_BAND = 3.0  # decades: the std (or the input gradient's) leaves [1e-3, 1e3] x where it starts
SIGNAL_LOST = -6.0  # decades: variance across samples below 1e-6 of the layer's variance
SATURATED = 0.5  # fraction of the last layer's units with |phi'| < 1e-3
COLLAPSE = 0.9  # mean |cos| between samples at the last layer


@dataclass(frozen=True)
class Assessment:
    """What the findings say about one configuration."""

    label: str
    varied: dict[str, Any]
    depth: int
    rel: float  # log10 of the last layer's std over the input's (the mean network)
    median_rel: float  # the same for the median network (the median of log10 std over replicates)
    growth: float  # std factor per layer, geometric mean
    explodes_at: int | None  # the first layer whose mean network's std is above 1e3 x the input's
    dies_at: int | None  # the first layer whose median (or mean) network's std is below 1e-3 x the input's
    saturated: float  # fraction of saturated units at the last layer, nan when not a problem
    collapse: float  # mean |cos| between samples at the last layer
    collapse_from: int | None  # the layer from which on every layer's mean |cos| exceeds COLLAPSE
    grad: float | None  # log10 of the input gradient's std over the output's (None: no backward pass)
    signal_lost: int | None  # the first layer whose variance across samples is below 1e-6 of its variance
    signal_frac: float  # log10 of that fraction at the last layer
    problems: tuple[str, ...]  # of PROBLEMS, worst first

    @property
    def verdict(self) -> str:
        """``"healthy"``, or the worst problem found."""
        return self.problems[0] if self.problems else "healthy"


def growth(s: pd.DataFrame, col: str) -> float:
    """Geometric-mean factor per layer between the first and the last row of ``s``."""
    first, last = s[col].iloc[0], s[col].iloc[-1]
    depth = s["layer"].iloc[-1] - s["layer"].iloc[0]
    return 10 ** ((last - first) / depth) if depth and math.isfinite(last - first) else math.nan


def assess_one(label: str, varied: dict[str, Any], summary: pd.DataFrame) -> Assessment:
    """The :class:`Assessment` of configuration ``label`` from the summary over replicates."""
    s = summary[summary["config"] == label].reset_index(drop=True)
    rel = s["post_log10_rms_std"] - s["post_log10_rms_std"].iloc[0]
    median = s["post_log10_median_std"] - s["post_log10_median_std"].iloc[0]
    explodes, dies = s["layer"][rel > STD_BAND], s["layer"][(median < -STD_BAND) | (rel < -STD_BAND)]
    sat = float(s["post_frac_saturated"].iloc[-1])
    grad = None
    if "grad_log10_rms_std" in s:
        grad = float(s["grad_log10_rms_std"].iloc[0] - s["grad_log10_rms_std"].iloc[-1])
    with np.errstate(divide="ignore", invalid="ignore"):  # a zero or overflowed unit var: no verdict
        frac = np.log10(s["post_unit_var"].to_numpy(float)) - 2 * s["post_log10_rms_std"].to_numpy(float)
    lost = np.flatnonzero(np.isfinite(frac) & (frac < SIGNAL_LOST) & (s["layer"].to_numpy() > 0))
    saturated = sat if sat > SATURATED and s["post_frac_zero"].iloc[-1] < 0.5 * sat else math.nan
    collapse = float(s["post_abs_cos_sim"].iloc[-1])
    below = np.flatnonzero(~(s["post_abs_cos_sim"].to_numpy(float) > COLLAPSE))
    collapse_from = (int(s["layer"].iloc[below[-1] + 1] if below.size else s["layer"].iloc[0])
                     if collapse > COLLAPSE else None)
    found = [kind for kind, layers in (("explodes", explodes), ("dies", dies)) if not layers.empty]
    if lost.size:
        found.append("signal lost")
    if grad is not None and abs(grad) > STD_BAND:
        found.append("gradients explode" if grad > 0 else "gradients vanish")
    if not math.isnan(saturated):
        found.append("saturated")
    if collapse > COLLAPSE:
        found.append("collapse")
    return Assessment(label, dict(varied), int(s["layer"].iloc[-1]), float(rel.iloc[-1]), float(median.iloc[-1]),
                      growth(s, "post_log10_rms_std"), None if explodes.empty else int(explodes.iloc[0]),
                      None if dies.empty else int(dies.iloc[0]), saturated, collapse, collapse_from, grad,
                      int(s["layer"].iloc[lost[0]]) if lost.size else None, float(frac[-1]),
                      tuple(sorted(found, key=PROBLEMS.index)))


def assess(run: Run) -> list[Assessment]:
    """One :class:`Assessment` per configuration of ``run``, in its order."""
    return [assess_one(c.label, c.varied, run.summary) for c in run.configs]

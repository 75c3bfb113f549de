"""Mean-field theory of residual stacks: the variance recursion through skip
and branch, forward and backward, and the correlation map of a block, on the
rows the engine measures (one per block).

Forward, a block adds a branch whose output is uncorrelated with its input
(its last dense layer has zero-mean weights drawn afresh), so second moments
add: ``q_l = q_(l-1) + alpha_l^2 E[f^2]``, where ``E[f^2]`` runs the branch's
input ``q_(l-1) / beta_l^2`` through the branch's q-map (the plain stack's:
``q' = n v E[phi(z)^2] + sigma_b^2``; batch norm makes it ``var / (var + eps)``;
weight standardisation ``Var phi(z)``). The cosine between two samples mixes
likewise: ``c_l = ((1 - w) c_(l-1) + w c_f)`` with ``w`` the branch's share of
``q_l`` and ``c_f`` the branch's c-map. Backward, with the usual gradient
independence, ``G_(l-1) = G_l (1 + alpha_l^2 chi_f)``, chi_f the branch's
product of ``n v E[phi'(z)^2]`` (gamma^2 included, 1 / beta^2 for NF). A
projection shortcut P (where the width changes) replaces the skip's
``q_(l-1)``, ``c_(l-1)`` and 1 by those of a dense layer on the lead's output
(or the block's input): ``n_in v q_h``, its c, and ``n_out v`` times the
lead's chi.

These are infinite-width limits: one network of finite width fluctuates
about them (its log-variance drifts below the mean's, as in a plain stack),
so the engine's replicate mean is what they predict. Gradients through batch
norm are not modelled (as in the plain stack): none are predicted below it.

>>> from varprop.spec import from_options
>>> spec = from_options({"residual": "bn-end", "blocks": 4, "width": 64, "init": "he", "activation": "relu",
...                      "bn_eps": 0.0})
>>> [round(float(v), 6) for v in predict(spec)["theory_post_second_moment"]]
[1.0, 2.0, 3.0, 4.0, 5.0]
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import pandas as pd

from ..nn import inits, layers
from ..spec import RunSpec
from .cmap import AtQ
from .perlayer import gradient_columns
from .quadrature import LN10, logaddexp


def _nan_stats(n: int) -> dict[str, np.ndarray]:
    return {k: np.full(n, np.nan) for k in ("log_m2", "cos")}


def predict(spec: RunSpec, inputs: Mapping[str, float] | None = None) -> pd.DataFrame:
    """Predictions for every block of a residual ``spec``: columns
    ``theory_{side}_{stat}`` for pre (alpha f), post (the stream), branch (f)
    and, with the backward pass, grad and delta (the branch's share of the
    input gradient)."""
    from .perlayer import _columns, bias_log_variance

    net = spec.network
    scheme = net.init.resolve()
    stack = layers.build(net)
    blocks = len(stack)
    if scheme.user is not None:
        return pd.DataFrame({"layer": range(blocks + 1)})
    if spec.input_file is not None:
        if inputs is None:
            raise ValueError("predict needs the statistics of the --input-file's inputs (inputs=)")
        mean0 = inputs["mean"]
        log_m = float(np.logaddexp(2 * inputs["log10_std"] * LN10, 2 * inputs["log10_abs_mean"] * LN10))
        cos = inputs["cos_sim"]
    else:
        mean0, log_m, cos = 0.0, 2 * math.log(spec.input_std), 0.0
    levels: dict[tuple[str, float, float], AtQ] = {}

    def level(act: layers.Activation, log_q: float) -> AtQ:
        key = (act.name, act.gain, log_q)
        if key not in levels:
            levels[key] = AtQ(act.fn, log_q)
        return levels[key]

    def activation(act: layers.Activation, bn: layers.BatchNorm | None, log_q: float, c: float
                   ) -> tuple[float, float, float, float, float]:
        """[BN ->] gain phi: (mean, log E[h^2], log Var h, cos, log gain^2 E[phi'^2]) of the output."""
        if bn is not None:
            log_q = log_q - logaddexp(log_q, math.log(bn.eps) if bn.eps > 0 else -math.inf)
            c = math.nan  # batch norm's c-map is not modelled (as in the plain stack)
        at_q = level(act, log_q)
        mo = at_q.moments
        lg = 2 * act.log_gain
        c_out = at_q.cos(c) if not math.isnan(c) else math.nan
        log_chi = math.log(mo.dphi2) + lg if mo.dphi2 > 0 else -math.inf
        return mo.mean * act.gain, mo.log_m2 + lg, 2 * mo.log_sd + lg, c_out, log_chi

    def dense(d: layers.Dense, mean: float, log_m2: float, log_var: float, c: float
              ) -> tuple[float, float, float]:
        """(log q, c, log n_out v) of a dense layer's output from its input's moments."""
        if d.standardized:  # centred unit-norm columns: q = Var h, and the covariance is centred too
            log_nv, log_in = 0.0, log_var
            c_in = (c * math.exp(log_m2 - log_var) - mean * mean * math.exp(-log_var)) if log_var > -math.inf else c
        else:
            log_nv = math.log(d.fan_in * inits.variance(scheme, d.fan_in, d.fan_out)) + 2 * math.log(d.factor)
            log_in, c_in = log_m2, c
        log_vb = bias_log_variance(scheme, net.bias_std, d.fan_in)
        log_sig = log_nv + log_in
        log_q = logaddexp(log_sig, log_vb)
        ratio_b = math.exp(min(log_vb - log_sig, 700.0))
        # backward: E[(g W^T)^2] = n_out v E[g^2] (unit-norm columns: n_out / n_in)
        log_back = log_nv + math.log(d.fan_out / d.fan_in)
        return log_q, (c_in + ratio_b) / (1 + ratio_b), log_back

    def normed(log_q: float, bn: layers.BatchNorm | None) -> float:
        return log_q if bn is None else log_q - logaddexp(log_q, math.log(bn.eps) if bn.eps > 0 else -math.inf)

    rows = {side: _nan_stats(blocks + 1) for side in ("pre", "post", "branch")}
    rows["post"]["log_m2"][0], rows["post"]["cos"][0] = log_m, cos
    log_chis = np.full(blocks + 1, np.nan)
    log_skip_chis = np.zeros(blocks + 1)  # the skip's gradient factor: 1, or the projection's (and lead's)
    stream_mean = np.full(blocks + 1, mean0)  # the skip carries the input's mean until a projection
    for kind in stack:
        assert isinstance(kind, layers.Residual)
        log_x = log_m - 2 * math.log(kind.beta)
        mean, log_h, log_var, c, log_chi = 0.0, log_x, log_x, cos, -2 * math.log(kind.beta)
        if kind.lead is not None:
            mean, log_h, log_var, c, lc = activation(kind.lead.activation, kind.lead.bn, log_x, c)
            log_chi += lc if kind.lead.bn is None else math.nan
        # the skip: the stream itself, or its projection (of the lead's output in the pre-activation order)
        log_skip, c_skip = log_m, cos
        if kind.projection is not None:
            if kind.projects_lead:
                src = (mean, log_h, log_var, c, log_chi)
            else:  # the block's input, whose mean the skip has carried from the input (its variance: -inf if 0)
                x_mean = float(stream_mean[kind.index - 1])
                with np.errstate(divide="ignore"):
                    log_x_var = log_m + float(np.log1p(-min(x_mean * x_mean * math.exp(-min(log_m, 700.0)), 1.0)))
                src = (x_mean, log_m, log_x_var, cos, 0.0)
            log_q, c_p, lb = dense(kind.projection.dense, *src[:4])
            log_skip, c_skip = normed(log_q, kind.projection.bn), c_p if kind.projection.bn is None else math.nan
            log_skip_chis[kind.index] = src[4] + lb if kind.projection.bn is None else math.nan
            stream_mean[kind.index:] = 0.0  # zero-mean weights: the projection drops the input's mean
        log_f, c_f = -math.inf, math.nan
        for layer in kind.branch:
            if layer.dense.factor == 0:
                log_f, log_chi = -math.inf, -math.inf
                break
            log_q, c, lb = dense(layer.dense, mean, log_h, log_var, c)
            log_chi += lb
            if layer.activation.linear:
                log_f, c_f = normed(log_q, layer.bn), c
                if layer.bn is not None:
                    c_f, log_chi = math.nan, math.nan
                mean, log_h, log_var, c = 0.0, log_f, log_f, c_f  # what a next (hidden, linear) layer reads
            else:
                mean, log_h, log_var, c, lc = activation(layer.activation, layer.bn if layer.bn_pre else None,
                                                         log_q, c)
                log_chi += lc if layer.bn is None else math.nan
        la2 = 2 * math.log(kind.alpha) if kind.alpha > 0 else -math.inf
        log_add = la2 + log_f
        log_m_new = logaddexp(log_skip, log_add)
        if log_add == -math.inf:
            cos_new = c_skip
        else:
            w = math.exp(log_add - log_m_new)
            cos_new = (1 - w) * c_skip + w * c_f
        l = kind.index
        rows["branch"]["log_m2"][l], rows["branch"]["cos"][l] = log_f, c_f
        # a branch scaled to zero adds a zero vector, whose cosine to another is undefined (as measured)
        rows["pre"]["log_m2"][l], rows["pre"]["cos"][l] = log_add, c_f if log_add > -math.inf else math.nan
        rows["post"]["log_m2"][l], rows["post"]["cos"][l] = log_m_new, cos_new
        log_chis[l] = la2 + log_chi
        log_m, cos = log_m_new, cos_new
    columns: dict[str, np.ndarray] = {}
    for side, r in rows.items():
        mean = np.where(np.isnan(r["log_m2"]), np.nan, 0.0)
        log_abs_mean = np.where(np.isnan(r["log_m2"]), np.nan, -np.inf)
        if side == "post":  # the skip carries the input's mean (to a projection); the branches add zero-mean terms
            mean[:] = stream_mean
            with np.errstate(divide="ignore"):
                log_abs_mean[:] = np.log(np.abs(stream_mean))
        log_m2 = r["log_m2"]
        with np.errstate(invalid="ignore", divide="ignore"):  # no variance: log 0 = -inf
            log_var = log_m2 + np.log1p(-np.minimum(mean * mean * np.exp(-np.minimum(log_m2, 700)), 1.0))
        columns.update(_columns(side, mean, 0.5 * log_var, log_m2, r["cos"], log_abs_mean))
    df = pd.DataFrame({"layer": range(blocks + 1), **columns})
    if spec.backward:
        _backward(df, log_chis, log_skip_chis)
    return df


def _backward(df: pd.DataFrame, log_chis: np.ndarray, log_skip_chis: np.ndarray) -> None:
    """G_(l-1) = G_l (chi_skip + alpha^2 chi_f), from G_L = 1 (the N(0, 1) upstream gradient); chi_skip is 1
    but through a projection; the branch's share alpha^2 chi_f G_l is delta. Stops at a branch (or
    projection) whose chi is not modelled (batch norm)."""
    blocks = len(log_chis) - 1
    log_g = np.full(blocks + 1, np.nan)
    log_d = np.full(blocks + 1, np.nan)
    log_g[blocks] = 0.0
    for l in range(blocks, 0, -1):
        if np.isnan(log_chis[l]) or np.isnan(log_skip_chis[l]):
            break
        log_d[l] = log_g[l] + log_chis[l]
        log_g[l - 1] = logaddexp(log_g[l] + log_skip_chis[l], log_d[l])
    gradient_columns(df, log_g, log_d)

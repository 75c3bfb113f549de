"""Per-layer predictions for a network: the q recursion through every layer,
then the c-map, and the gradients backward, on the same rows as the
measurement (``theory_{side}_{stat}`` columns); the finite-width band of
single networks where an exact law is known.

>>> from varprop.spec import RunSpec, NetworkSpec
>>> df = predict(RunSpec(NetworkSpec.square(layers=3, width=64, init="he", activation="relu")))
>>> round(float(df["theory_post_second_moment"].iloc[-1]), 9)
1.0
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Mapping, NamedTuple

import numpy as np
import pandas as pd
from scipy import special

from ..nn import activations, inits, layers
from ..logscale import exp_of
from ..nn.activations import Activation
from ..spec import NetworkSpec, RunSpec
from .cmap import NEGLIGIBLE_C, AtQ, Series, series
from .quadrature import LN10, logaddexp, nodes

def bias_log_variance(scheme: inits.Scheme, bias_std: float | None, fan_in: int) -> float:
    """log Var(b_i) of a layer (``bias_std**2``, or the scheme's own for
    torch-default); -inf without a bias."""
    if not inits.has_bias(scheme, bias_std):
        return -math.inf
    return 2 * math.log(bias_std) if bias_std is not None else -math.log(3 * fan_in)


def predict(spec: RunSpec, inputs: Mapping[str, float] | None = None) -> pd.DataFrame:
    """Mean-field predictions for every layer of ``spec``'s network.

    Columns ``theory_{side}_{stat}`` for side pre/post (and grad/delta), stats
    mean, std, log10_std, log10_abs_mean, second_moment, cos_sim. Gradients
    are predicted down to the first batch-norm layer met going backward
    (mean-field BN gradient theory is not modelled); empty for user init
    callables, whose variance is unknown to the theory. ``inputs`` are the
    statistics of the input layer (varprop.stats' names) where they are not
    the Gaussian inputs' (an ``--input-file``: the engine measures them).
    """
    net = spec.network
    if net.residual is not None:
        from . import residual

        return residual.predict(spec, inputs)
    scheme = net.init.resolve()
    depth = net.depth
    if scheme.user is not None:
        return pd.DataFrame({"layer": range(depth + 1)})
    if spec.input_file is not None:
        if inputs is None:
            raise ValueError("predict needs the statistics of the --input-file's inputs (inputs=)")
        s0 = inputs
        # log E[x^2] = log(Var x + mean^2) from the logs, which hold at any magnitude (1e308, 1e-310)
        log_m2 = float(np.logaddexp(2 * s0["log10_std"] * LN10, 2 * s0["log10_abs_mean"] * LN10))
        cos = s0["cos_sim"]
        first = (math.nan, math.nan, s0["mean"], s0["log10_std"] * LN10, log_m2, cos, math.nan,
                 s0["log10_abs_mean"] * LN10)
    else:
        log_m2, cos = 2 * math.log(spec.input_std), 0.0
        first = (math.nan, math.nan, 0.0, 0.5 * log_m2, log_m2, 0.0, math.nan, -math.inf)
    steps = np.array([first, *forward(spec, scheme, log_m2, cos)]).T
    log_q, c_pre, mean, log_sd, log_m2s, coss, dphi2, log_abs_mean = steps
    pre_mean = np.zeros(depth + 1)
    pre_mean[0] = math.nan  # layer 0 is the input: it has no pre-activation
    df = pd.DataFrame({"layer": range(depth + 1), **_columns("post", mean, log_sd, log_m2s, coss, log_abs_mean),
                       **_columns("pre", pre_mean, 0.5 * log_q, log_q, c_pre,
                                  np.where(np.isnan(pre_mean), np.nan, -np.inf))})
    if spec.backward:
        _fill_dphi2(dphi2, log_q, net)
        _predict_backward(df, spec, scheme, dphi2)
    _finite_width_band(df, spec, scheme)
    return df


def _fill_dphi2(dphi2: np.ndarray, log_q: np.ndarray, net: NetworkSpec) -> None:
    """Fill in E[phi'(z)^2] where :func:`forward` left it out (nan): it does
    not feed the recursion, so it is computed for all layers at once."""
    stack = layers.build(net)
    names = np.array([""] + [kind.activation.name for kind in stack])
    fns = {kind.activation.name: kind.activation.fn for kind in stack}
    for name in set(names[1:]):
        todo = (names == name) & np.isnan(dphi2)
        if todo.any():
            log_qs, where = np.unique(log_q[todo], return_inverse=True)
            dphi2[todo] = dphi2_at(fns[name], log_qs)[where]


def dphi2_at(act: Activation, log_q: np.ndarray, chunk: int = 64) -> np.ndarray:
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
    at_q: AtQ | None  # the c-map (None where batch norm leaves no c)
    bn_pre: bool  # batch norm on z: no c before the activation either
    mean: float  # the post-activation mean, log sd and log E[h^2]
    log_sd: float
    log_m2: float
    dphi2: float  # E[phi'(z)^2] (nan: see _fill_dphi2)
    log_abs_mean: float  # log |the post-activation mean|


def forward(spec: RunSpec, scheme: inits.Scheme, log_m2: float, cos: float, reuse: bool = True) -> list[_Step]:
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
    stack = layers.build(net)
    acts = {kind.activation.name: kind.activation.fn for kind in (stack[0], stack[-1])}
    levels: dict[tuple[str, float], AtQ] = {}

    def level(name: str, log_q: float) -> AtQ:
        found = levels.get((name, log_q)) if reuse else None
        if found is None:
            found = AtQ(acts[name], log_q, with_dphi2=False)
            if reuse:
                levels[name, log_q] = found
        return found

    @lru_cache(maxsize=None)
    def log_variances(n_in: int, n_out: int) -> tuple[float, float]:
        """log(n_in Var W_ij) and log Var b_i."""
        return math.log(n_in * inits.variance(scheme, n_in, n_out)), bias_log_variance(scheme, net.bias_std, n_in)

    def q_step(kind: layers.Layer, log_m2: float) -> _QStep:
        log_nv, log_vb = log_variances(kind.dense.fan_in, kind.dense.fan_out)
        log_sig = log_nv + log_m2
        log_q = logaddexp(log_sig, log_vb)
        ratio_b = math.exp(min(log_vb - log_sig, 700.0))
        # eps = 0: BN's q is exactly 1
        log_eps = math.log(kind.bn.eps) if kind.bn is not None and kind.bn.eps > 0 else -math.inf
        if kind.bn_pre:
            log_q = log_q - logaddexp(log_q, log_eps)
        at_q = level(kind.activation.name, log_q)
        mo = at_q.moments
        mean, log_sd, log_m2_post, log_abs_mean = mo.mean, mo.log_sd, mo.log_m2, mo.log_abs_mean
        if kind.bn_post:
            log_var = 2 * log_sd
            log_m2_post = log_var - logaddexp(log_var, log_eps)
            mean, log_sd, log_abs_mean = 0.0, 0.5 * log_m2_post, -math.inf
        return _QStep(log_q, ratio_b, None if kind.bn else at_q, kind.bn_pre, mean, log_sd, log_m2_post, mo.dphi2,
                      log_abs_mean)

    q_steps: list[_QStep] = []
    found_q: dict[tuple[Any, ...], _QStep] = {}
    for kind in stack:
        # A step depends on the layer's parts, not on its index (the Activation compares by name).
        key = (kind.dense, kind.activation, kind.bn, kind.bn_position, log_m2)
        found = found_q.get(key) if reuse else None
        if found is None:
            found = q_step(kind, log_m2)
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
    made: dict[tuple[str, float], Series] = {}

    def with_series(at_q: AtQ, batch: int = 64) -> None:
        key = (at_q.act.name, at_q.log_q)
        if key not in made:
            todo = [k for k in queue[first[key]:first[key] + batch] if k not in made]
            for name in acts:
                mine = [log_q for n, log_q in todo if n == name]
                if mine:
                    batch_series = series(acts[name], mine)
                    made.update({(name, log_q): batch_series[i:i + 1] for i, log_q in enumerate(mine)})
        at_q._series = made[key]

    out: list[_Step] = []
    found_c: dict[tuple[int, float], float] = {}
    for log_q, ratio_b, at_q, bn_pre, mean, log_sd, log_m2_post, dphi2, log_abs_mean in q_steps:
        c_pre = math.nan if bn_pre else (cos + ratio_b) / (1 + ratio_b)
        if at_q is None or math.isnan(c_pre):
            cos = math.nan
        else:
            key = (id(at_q), c_pre)
            if reuse and key in found_c:
                cos = found_c[key]
            else:
                if NEGLIGIBLE_C <= abs(c_pre) < 1 and at_q._series is None and at_q.needs_series():
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
    stack = layers.build(net)
    acts = {kind.activation.name for kind in stack}
    if (scheme.user is not None or scheme.orthogonal or scheme.distribution != "normal"
            or any(kind.bn is not None for kind in stack) or inits.has_bias(scheme, net.bias_std)
            or not acts <= {"linear", "relu"} or len(acts) != 1):
        return
    n = np.array([kind.dense.fan_out for kind in stack], dtype=float)
    if acts == {"linear"}:
        mean, var = _log_chi2_moments(n)
    else:  # relu: K ~ Binomial(n, 1/2) units are active; chi2_K / n relative to its mean-field value n/2
        widths, layer_of = np.unique(n.astype(int), return_inverse=True)  # once per distinct width
        mean, var = np.empty(len(widths)), np.empty(len(widths))
        for i, width in enumerate(widths):
            k = np.arange(1, width + 1)
            # Binomial(width, 1/2) probabilities (scipy.stats.binom.pmf; scipy.stats alone costs 0.2 s to import)
            p = np.exp(special.gammaln(width + 1) - special.gammaln(k + 1) - special.gammaln(width - k + 1)
                       - width * math.log(2))
            m_k = special.digamma(k / 2) + math.log(2) - math.log(width / 2)
            mean[i] = p @ m_k
            var[i] = p @ (special.polygamma(1, k / 2) + m_k**2) - mean[i] ** 2
        mean, var = mean[layer_of], var[layer_of]
    # log std = 0.5 log m2; the std is also taken about the sample mean, a negligible difference here.
    shift = np.concatenate([[0.0], np.cumsum(0.5 * mean) / LN10])
    sd = np.concatenate([[0.0], np.sqrt(np.cumsum(0.25 * var)) / LN10])
    # The law moves |h|^2; the std keeps its mean-field ratio to the RMS (sqrt(1 - 1/pi) for relu), so the
    # same shifts apply to the mean-field std line.
    base = df["theory_post_log10_std"].to_numpy()
    df["theory_post_log10_std_typical"] = base + shift
    df["theory_post_log10_std_lo"] = base + shift - 1.96 * sd
    df["theory_post_log10_std_hi"] = base + shift + 1.96 * sd


def _predict_backward(df: pd.DataFrame, spec: RunSpec, scheme: inits.Scheme, dphi2: np.ndarray) -> None:
    net = spec.network
    depth = net.depth
    log_g = [math.nan] * (depth + 1)
    log_d = [math.nan] * (depth + 1)
    log_g[depth] = 0.0  # g_L ~ N(0, 1)
    for kind in reversed(layers.build(net)):
        layer = kind.index
        if kind.bn is not None:
            break  # BN's gradient is not modelled by mean-field theory here
        n_in, n_out = kind.dense.fan_in, kind.dense.fan_out
        log_d[layer] = log_g[layer] + math.log(dphi2[layer]) if dphi2[layer] > 0 else -math.inf
        log_g[layer - 1] = log_d[layer] + math.log(n_out * inits.variance(scheme, n_in, n_out))
    gradient_columns(df, np.array(log_g), np.array(log_d))


def gradient_columns(df: pd.DataFrame, log_g: np.ndarray, log_d: np.ndarray) -> None:
    """The backward theory columns of ``df`` from the log second moments of the gradient w.r.t. each
    row's output (``log_g``) and of delta (``log_d``): zero mean, NaN where not predicted."""
    for side, logs in (("grad", log_g), ("delta", log_d)):
        df[f"theory_{side}_second_moment"] = exp_of(logs)
        df[f"theory_{side}_log10_std"] = 0.5 * logs / LN10
        df[f"theory_{side}_std"] = exp_of(0.5 * logs)
        df[f"theory_{side}_mean"] = np.where(np.isnan(logs), np.nan, 0.0)
        df[f"theory_{side}_log10_abs_mean"] = np.where(np.isnan(logs), np.nan, -np.inf)


def _columns(side: str, mean: np.ndarray, log_sd: np.ndarray, log_m2: np.ndarray, cos: np.ndarray,
             log_abs_mean: np.ndarray) -> dict[str, np.ndarray]:
    return {f"theory_{side}_mean": mean, f"theory_{side}_std": exp_of(log_sd),
            f"theory_{side}_log10_std": log_sd / LN10, f"theory_{side}_log10_abs_mean": log_abs_mean / LN10,
            f"theory_{side}_second_moment": exp_of(log_m2), f"theory_{side}_cos_sim": cos}

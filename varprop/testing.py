"""Assertions for users' own test suites: is an initializer healthy?

Each assertion draws its own data from a fixed seed, decides with a stated
false-alarm rate (default 1e-6: a correct init essentially never fails), and
on failure raises AssertionError with the first bad layer, the measured and
predicted values and the command that reproduces it.

>>> from varprop.testing import assert_weight_variance, assert_preserves_variance
>>> m2 = assert_weight_variance("he", 300, 200)  # the rule's own variance, 2 / 300
>>> r = assert_preserves_variance("he", "relu", depth=10, width=128)
>>> r.passed
True
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from . import inits
from .engine import generator, simulate
from .spec import InitSpec, NetworkSpec, RunSpec, SpecError

__all__ = ["CheckResult", "assert_weight_variance", "assert_preserves_variance", "assert_matches_theory",
           "check_preserves_variance"]

DEFAULT_FALSE_ALARM = 1e-6
Init = Any  # a scheme name, "module:function", or a callable (rng, fan_in, fan_out) -> array


def _z(false_alarm: float) -> float:
    return float(sps.norm.isf(false_alarm / 2))


def _t(false_alarm: float, dof: int) -> float:
    return float(sps.t.isf(false_alarm / 2, dof))


def _name(init: Init) -> str:
    return init if isinstance(init, str) else f"{getattr(init, '__module__', '?')}:{getattr(init, '__qualname__', init)}"


def assert_weight_variance(init: Init, fan_in: int, fan_out: int, expected: float | None = None, *,
                           distribution: str | None = None, mode: str | None = None, gain: float | None = None,
                           scale: float = 1.0, min_draws: int = 40_000, seed: int = 0,
                           false_alarm: float = DEFAULT_FALSE_ALARM) -> float:
    """Assert that weights drawn by ``init`` for a (fan_in x fan_out) layer have
    second moment ``expected`` (default: the named scheme's own variance).

    The layer is drawn repeatedly (independent generators of ``seed``'s tree)
    until ``min_draws`` weights are in hand; the mean of w^2 is compared with
    ``expected`` using its standard error from the sample's own fourth moment
    (after checking that the weights are centred: a nonzero mean fails)
    (exact for any distribution as the count grows, so uniform, truncated or
    heavy-tailed inits are judged fairly). With the defaults a 10% variance
    error is caught with certainty for layers of any size. Returns the
    measured second moment.
    """
    scheme = inits.resolve(init, distribution, mode, gain, scale)
    if expected is None:
        if scheme.user is not None:
            raise ValueError("expected= is required for a user init (its variance is not known to varprop)")
        expected = inits.variance(scheme, fan_in, fan_out)
    chunks, count, k = [], 0, 0
    while count < min_draws:
        w0, s = inits.draw_weights(scheme, generator(seed, k, 1, "weights"), fan_in, fan_out, np.float64)
        chunks.append((np.asarray(w0, np.float64) * s).ravel())
        count += chunks[-1].size
        k += 1
    w = np.concatenate(chunks)
    mean, sd = float(w.mean()), float(w.std(ddof=1))
    if sd > 0 and abs(mean) > _z(false_alarm) * sd / math.sqrt(w.size) or sd == 0:
        raise AssertionError(
            f"weights of {_name(init)} ({fan_in} x {fan_out}) are not centred: mean {mean:.4g}, sd {sd:.4g} over "
            f"{w.size} draws (|z| > {_z(false_alarm):.2f} at false-alarm rate {false_alarm:g}); a nonzero mean "
            "adds a rank-one signal that a variance alone does not describe")
    sq = w * w
    m2 = float(sq.mean())
    se = float(sq.std(ddof=1) / math.sqrt(sq.size))
    z = (m2 - expected) / se if se > 0 else (0.0 if m2 == expected else math.inf)
    if abs(z) > _z(false_alarm):
        raise AssertionError(
            f"weight variance of {_name(init)} ({fan_in} x {fan_out}): measured {m2:.6g} +- {se:.2g} over {w.size} "
            f"draws, expected {expected:.6g} (ratio {m2 / expected:.4f}, z = {z:+.1f}; |z| > {_z(false_alarm):.2f} "
            f"at false-alarm rate {false_alarm:g})")
    return m2


@dataclass
class CheckResult:
    """Outcome of :func:`check_preserves_variance`: per-layer table, verdict, message."""

    passed: bool
    message: str
    table: pd.DataFrame = field(repr=False)
    command: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "message": self.message, "command": self.command,
                "layers": self.table.to_dict(orient="records")}


MIN_REPLICATES = 8
_INIT_KW = ("distribution", "mode", "gain", "scale")
_NET_KW = ("bias_std", "leaky_slope")


def _split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Init overrides and network options; anything else is a mistake, not silently ignored."""
    unknown = set(options) - set(_INIT_KW) - set(_NET_KW)
    if unknown:
        raise TypeError(f"unexpected option(s) {sorted(unknown)}; accepted: {', '.join(_INIT_KW + _NET_KW)}")
    return ({k: v for k, v in options.items() if k in _INIT_KW},
            {k: v for k, v in options.items() if k in _NET_KW})


def _command(init: Init, activation: str, depth: int, width: int, samples: int, replicates: int, seed: int,
             backward: bool, extra: dict[str, Any]) -> str:
    words = ["varprop", "simulate", "--init", _name(init), "--activation", activation, "--layers", str(depth),
             "--width", str(width), "--samples", str(samples), "--replicates", str(replicates), "--seed", str(seed)]
    for k, v in extra.items():
        words += ["--" + k.replace("_", "-"), str(v)]
    return shlex.join(words + (["--backward"] if backward else []))


def check_preserves_variance(init: Init, activation: str = "linear", depth: int = 20, width: int = 256, *,
                             direction: str = "forward", band: float = 2.0, samples: int = 128,
                             replicates: int = 16, seed: int = 0, false_alarm: float = DEFAULT_FALSE_ALARM,
                             **options: Any) -> CheckResult:
    """Measure whether the std stays within a factor ``band`` of where it
    starts (forward: the input; backward: the output gradient) at every layer.

    Per layer, the statistic is log10(std_l / std_start) averaged over
    ``replicates`` independent networks (the typical network), with a t
    interval at ``false_alarm`` shared over the layers (Bonferroni). A layer
    fails only when its whole interval lies outside [-log10 band, +log10 band],
    so Monte-Carlo noise never fails a correct init; a layer whose interval
    straddles the edge is reported as undecided, not failed.
    """
    init_kw, net_kw = _split_options(options)
    if direction not in ("forward", "backward", "both"):
        raise SpecError("direction", f"expected forward, backward or both, got {direction!r}")
    if not band > 1:
        raise SpecError("band", f"expected a factor > 1, got {band!r}")
    if replicates < MIN_REPLICATES:
        raise SpecError("replicates", f"at least {MIN_REPLICATES} replicates are needed: with fewer, the interval "
                        "at this false-alarm rate is too wide to ever fail")
    backward = direction in ("backward", "both")
    spec = RunSpec(NetworkSpec.square(depth, width, activation=activation, init=InitSpec(init, **init_kw),
                                      **net_kw),
                   samples=samples, replicates=replicates, seed=seed, backward=backward)
    df = simulate(spec)
    extra = {**init_kw, **net_kw}
    command = _command(init, activation, depth, width, samples, replicates, seed, backward, extra)
    sides = (["post"] if direction != "backward" else []) + (["grad"] if backward else [])
    limit = math.log10(band)
    n_tests = depth * len(sides)
    tq = _t(false_alarm / n_tests, replicates - 1)
    rows = []
    for side in sides:
        wide = df.pivot(index="replicate", columns="layer", values=f"{side}_log10_std")
        start = wide[0] if side == "post" else wide[depth]
        for layer in range(1, depth + 1) if side == "post" else range(depth - 1, -1, -1):
            d = (wide[layer] - start).to_numpy()
            mean, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))
            lo, hi = mean - tq * se, mean + tq * se
            theory_col = f"theory_{side}_log10_std"
            th = df[theory_col].iloc[layer] - df[theory_col].iloc[0 if side == "post" else depth] \
                if theory_col in df else math.nan
            verdict = "fail" if (lo > limit or hi < -limit) else "pass" if (-limit <= lo and hi <= limit) else "undecided"
            rows.append({"direction": "forward" if side == "post" else "backward", "layer": layer,
                         "log10_ratio": mean, "lo": lo, "hi": hi, "theory_log10_ratio": th, "verdict": verdict})
    table = pd.DataFrame(rows)
    bad = table[table["verdict"] == "fail"]
    if bad.empty:
        undecided = int((table["verdict"] == "undecided").sum())
        msg = (f"{_name(init)} with {activation}: std stays within a factor {band:g} over {depth} layers "
               f"({direction})" + (f"; {undecided} layers undecided at this noise level" if undecided else ""))
        return CheckResult(True, msg, table, command)
    first = bad.iloc[0]
    factor = 10 ** first["log10_ratio"]
    where = "of the input's" if first["direction"] == "forward" else "of the output gradient's"
    th = first["theory_log10_ratio"]
    msg = (f"{_name(init)} with {activation}, width {width}: {first['direction']} std leaves the band "
           f"[1/{band:g}, {band:g}] {where} at layer {int(first['layer'])}: measured x{factor:.3g} "
           f"(interval x{10 ** first['lo']:.3g} .. x{10 ** first['hi']:.3g} over {replicates} networks)"
           + (f", mean-field predicts x{10 ** th:.3g}" if not math.isnan(th) else "")
           + f". Reproduce: {command}")
    return CheckResult(False, msg, table, command)


def assert_preserves_variance(init: Init, activation: str = "linear", depth: int = 20, width: int = 256,
                              **kwargs: Any) -> CheckResult:
    """:func:`check_preserves_variance`, raising AssertionError with its message on failure."""
    result = check_preserves_variance(init, activation, depth, width, **kwargs)
    if not result.passed:
        raise AssertionError(result.message)
    return result


def assert_matches_theory(init: Init, activation: str = "linear", depth: int = 10, width: int = 512, *,
                          samples: int = 128, replicates: int = 16, seed: int = 0,
                          false_alarm: float = DEFAULT_FALSE_ALARM, backward: bool = False,
                          **options: Any) -> pd.DataFrame:
    """Assert that the measured mean second moment of every layer (and of the
    gradients with ``backward``) agrees with mean-field theory within its t
    interval over replicates (Bonferroni over layers). Mean-field theory is
    the infinite-width limit: use widths of a few hundred or more, where its
    O(1/width) error is below the interval. Returns the comparison table."""
    init_kw, net_kw = _split_options(options)
    spec = RunSpec(NetworkSpec.square(depth, width, activation=activation, init=InitSpec(init, **init_kw),
                                      **net_kw),
                   samples=samples, replicates=replicates, seed=seed, backward=backward)
    df = simulate(spec)
    sides = ["post"] + (["grad"] if backward else [])
    rows = []
    tq = _t(false_alarm / (depth * len(sides)), replicates - 1)
    for side in sides:
        col, th = f"{side}_second_moment", f"theory_{side}_second_moment"
        if th not in df:
            raise ValueError(f"no mean-field prediction for {side} (user init or batch norm)")
        for layer, g in df.groupby("layer"):
            v = np.log(g[col].to_numpy())  # log: the second moment is positive and right-skewed
            pred = float(np.log(g[th].iloc[0]))
            mean, se = float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v)))
            # E[log m2] sits below log E[m2] by about Var(log m2) / 2 (delta method); allow for it.
            jensen = float(v.var(ddof=1)) / 2
            rows.append({"side": side, "layer": layer, "log_measured": mean, "log_theory": pred, "se": se,
                         "ok": abs(mean + jensen - pred) <= tq * se + 1e-12})
    table = pd.DataFrame(rows)
    bad = table[~table["ok"]]
    if not bad.empty:
        b = bad.iloc[0]
        raise AssertionError(
            f"{_name(init)} with {activation}, width {width}: {b['side']} second moment at layer {int(b['layer'])} "
            f"is x{math.exp(b['log_measured'] - b['log_theory']):.4g} the mean-field prediction (typical network; "
            f"{replicates} replicates, t interval at false-alarm rate {false_alarm:g}). Reproduce: "
            + _command(init, activation, depth, width, samples, replicates, seed, backward, {**init_kw, **net_kw}))
    return table

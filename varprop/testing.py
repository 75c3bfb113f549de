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
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import numpy as np
import pandas as pd
from scipy import stats as sps

from . import options as option_table
from . import theory
from .montecarlo import generator, simulate
from .nn import inits
from .errors import SpecError
from .spec import InitSpec, NetworkSpec, RunSpec

__all__ = ["CheckResult", "assert_weight_variance", "assert_preserves_variance", "assert_matches_theory",
           "check_preserves_variance"]

DEFAULT_FALSE_ALARM = 1e-6
Init = Any  # a scheme name, "module:function", or a callable (rng, fan_in, fan_out) -> array
WeightVariance = Union[float, Callable[[int, int], float]]


def _z(false_alarm: float) -> float:
    return float(sps.norm.isf(false_alarm / 2))


def _t(false_alarm: float, dof: int) -> float:
    return float(sps.t.isf(false_alarm / 2, dof))


def _name(init: Init) -> str:
    if isinstance(init, str):
        return init
    return f"{getattr(init, '__module__', '?')}:{getattr(init, '__qualname__', init)}"


def _false_alarm(value: Any) -> float:
    """A false-alarm rate strictly between 0 and 1: at 0 nothing could fail, at 1 or more everything would."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"false_alarm: expected a probability strictly between 0 and 1, got {value!r}")
    return float(value)


def _count(value: Any, name: str, least: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise ValueError(f"{name}: expected an integer >= {least}, got {value!r}")
    return int(value)


def _variance(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: expected a positive finite variance, got {value!r}")
    return float(value)


def assert_weight_variance(init: Init, fan_in: int, fan_out: int, expected: float | None = None, *,
                           distribution: str | None = None, mode: str | None = None, gain: float | None = None,
                           scale: float = 1.0, min_draws: int = 40_000, seed: int = 0,
                           false_alarm: float = DEFAULT_FALSE_ALARM) -> float:
    """Assert that weights drawn by ``init`` for a (fan_in x fan_out) layer have
    second moment ``expected`` (default: the named scheme's own variance).

    The layer is drawn repeatedly (independent generators of ``seed``'s tree)
    until ``min_draws`` weights are in hand, and never fewer than 32 z^2 (z
    the two-sided normal quantile at ``false_alarm``), so that a factor-2
    error in a normal init always fails; the mean of w^2 is compared with
    ``expected`` using its standard error from the sample's own fourth moment
    (after checking that the weights are centred: a nonzero mean fails)
    (exact for any distribution as the count grows, so uniform, truncated or
    heavy-tailed inits are judged fairly). With the defaults a 10% variance
    error is caught with certainty for layers of any size. Returns the
    measured second moment. Bad arguments (a fan of 0, ``expected`` not a
    positive finite number, ``false_alarm`` outside (0, 1)) raise ValueError.
    """
    fan_in, fan_out = _count(fan_in, "fan_in"), _count(fan_out, "fan_out")
    min_draws, seed = _count(min_draws, "min_draws"), _count(seed, "seed", 0)
    false_alarm = _false_alarm(false_alarm)
    scheme = inits.resolve(init, distribution, mode, gain, scale)
    if expected is None:
        if scheme.user is not None:
            raise TypeError("expected= is required for a user init (its variance is not known to varprop)")
        expected = inits.variance(scheme, fan_in, fan_out)
    expected = _variance(expected, "expected")
    # Normal draws: Var(w^2) = 2 v^2, so a factor-2 error stands sqrt(n / 8) = 2 z standard errors out
    # (and two draws at least, for a standard deviation).
    needed = max(min_draws, math.ceil(32 * _z(false_alarm) ** 2), 2)
    chunks, count, k = [], 0, 0
    while count < needed:
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
    """Outcome of :func:`check_preserves_variance`: per-layer table, verdict,
    message, the replicates it used and, when layers were left undecided, about
    how many replicates would decide them (None: none undecided, or not
    decidable: a layer's mean sits on the band's edge)."""

    passed: bool
    message: str
    table: pd.DataFrame = field(repr=False)
    command: str = ""
    replicates: int = 0
    replicates_to_decide: int | None = None
    undecided_outside: int = 0  # undecided layers whose estimate lies outside the band

    @property
    def verdict(self) -> str:
        """The verdict: pass; fail; or undecided, not shown to fail but with a layer's estimate outside the band."""
        return "fail" if not self.passed else "undecided" if self.undecided_outside else "pass"

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "verdict": self.verdict, "message": self.message, "command": self.command,
                "replicates": self.replicates, "replicates_to_decide": self.replicates_to_decide,
                "layers": self.table.to_dict(orient="records")}


MIN_REPLICATES = 8
MAX_AUTO_REPLICATES = 512
_INIT_KW = ("distribution", "mode", "gain", "scale")
_NET_KW = ("bias_std", "leaky_slope", "bn_layers", "bn_position", "bn_eps")
_RUN_KW = ("batch_size",)


def _split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Init overrides, network options and run options; anything else is a mistake, not silently ignored."""
    known = _INIT_KW + _NET_KW + _RUN_KW
    unknown = set(options) - set(known)
    if unknown:
        raise TypeError(f"unexpected option(s) {sorted(unknown)}; accepted: {', '.join(known)}")
    return tuple({k: v for k, v in options.items() if k in group}  # type: ignore[return-value]
                 for group in (_INIT_KW, _NET_KW, _RUN_KW))


def _spec(init: Init, activation: str, depth: int, width: int, samples: int, replicates: int, seed: int,
          backward: bool, options: dict[str, Any]) -> RunSpec:
    init_kw, net_kw, run_kw = _split_options(options)
    return RunSpec(NetworkSpec.square(depth, width, activation=activation, init=InitSpec(init, **init_kw), **net_kw),
                   samples=samples, replicates=replicates, seed=seed, backward=backward, **run_kw)


def _command(spec: RunSpec, init: Init, options: dict[str, Any]) -> str:
    """The ``varprop simulate`` command of ``spec`` (init as the user named it)."""
    net = spec.network
    values = {"init": _name(init), "activation": net.activation, "layers": net.depth, "width": net.widths[0],
              "samples": spec.samples, "replicates": spec.replicates, "seed": spec.seed, "backward": spec.backward,
              **{k: v for k, v in options.items() if v is not None and k != "bn_layers"}}
    if net.bn_layers:
        values.update({"bn": "all"} if net.bn_layers == tuple(range(1, net.depth)) else {"bn_layers": net.bn_layers})
    return option_table.command_line("simulate", values)


def _replicates_to_decide(sd: float, distance: float, false_alarm: float, cap: int = 10**7) -> int | None:
    """The fewest replicates R whose t interval (at ``false_alarm``, already
    shared over the layers) has a half-width t sd / sqrt(R) below
    ``distance``: those decide a layer whose mean over replicates stays
    where it is. None when no R up to ``cap`` does (the mean on the edge)."""
    if not distance > 0:
        return None
    if sd == 0:
        return MIN_REPLICATES

    def decides(r: int) -> bool:
        return _t(false_alarm, r - 1) * sd / math.sqrt(r) < distance

    if not decides(cap):
        return None
    lo, hi = 1, cap  # decides(lo) is False (one replicate has no interval), decides(hi) is True
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if decides(mid) else (mid, hi)
    return max(hi, MIN_REPLICATES)


def _layer_table(df: pd.DataFrame, sides: list[str], depth: int, limit: float, false_alarm: float) -> pd.DataFrame:
    """Per layer and direction: the mean of log10(std_l / std_start) over
    replicates, its t interval (Bonferroni over the layers) and verdict."""
    replicates = int(df["replicate"].nunique())
    shared = false_alarm / (depth * len(sides))
    tq = _t(shared, replicates - 1)
    rows = []
    for side in sides:
        wide = df.pivot(index="replicate", columns="layer", values=f"{side}_log10_std")
        start = wide[0] if side == "post" else wide[depth]
        for layer in range(1, depth + 1) if side == "post" else range(depth - 1, -1, -1):
            with np.errstate(invalid="ignore"):  # a std of 0 (log10 -inf) in some network
                d = (wide[layer] - start).to_numpy()
            if np.isfinite(d).all():
                mean, sd = float(d.mean()), float(d.std(ddof=1))
                lo, hi = mean - tq * sd / math.sqrt(len(d)), mean + tq * sd / math.sqrt(len(d))
            else:  # the std died (or overflowed) in some network: out of any band, whatever the others do
                mean, sd = float(np.nanmean(np.where(np.isnan(d), -np.inf, d))), math.nan
                lo = hi = math.inf if (d[~np.isfinite(d)] > 0).all() else -math.inf
            theory_col = f"theory_{side}_log10_std"
            th = df[theory_col].iloc[layer] - df[theory_col].iloc[0 if side == "post" else depth] \
                if theory_col in df else math.nan
            verdict = ("fail" if (lo > limit or hi < -limit) else "pass" if (-limit <= lo and hi <= limit)
                       else "undecided")
            needed = _replicates_to_decide(sd, min(abs(mean - limit), abs(mean + limit)), shared) \
                if verdict == "undecided" else None
            rows.append({"direction": "forward" if side == "post" else "backward", "layer": layer,
                         "log10_ratio": mean, "sd": sd, "lo": lo, "hi": hi, "theory_log10_ratio": th,
                         "verdict": verdict, "replicates_to_decide": needed})
    return pd.DataFrame(rows)


def outside_the_band(table: pd.DataFrame, limit: float, place: Callable[[pd.Series], str]) -> tuple[int, str]:
    """How many undecided rows of a check's table have their estimate outside the band (+-``limit`` in log10):
    not "stays within", though none is shown to fail; and the words that say so ('' for none), naming the
    farthest row's direction and ``place``."""
    outside = table[(table["verdict"] == "undecided") & (table["log10_ratio"].abs() > limit)] if len(table) else table
    if not len(outside):
        return 0, ""
    far = outside.loc[outside["log10_ratio"].abs().idxmax()]
    return len(outside), (f"; {len(outside)} of them measured outside the band (as far as "
                          f"x{10 ** far['log10_ratio']:.3g}, {far['direction']} at {place(far)})")


def _to_decide(table: pd.DataFrame) -> tuple[int, int | None]:
    """(undecided layers, replicates that would decide them all; None if some cannot be)."""
    undecided = table[table["verdict"] == "undecided"]
    if undecided.empty:
        return 0, None
    needed = undecided["replicates_to_decide"]
    return len(undecided), None if needed.isna().any() else int(needed.max())


def check_preserves_variance(init: Init, activation: str = "linear", depth: int = 20, width: int = 256, *,
                             direction: str = "forward", band: float = 2.0, samples: int = 128,
                             replicates: int | str = 16, seed: int = 0, false_alarm: float = DEFAULT_FALSE_ALARM,
                             **options: Any) -> CheckResult:
    """Measure whether the std stays within a factor ``band`` of where it
    starts (forward: the input; backward: the output gradient) at every layer.

    Per layer, the statistic is log10(std_l / std_start) averaged over
    ``replicates`` independent networks (the typical network), with a t
    interval at ``false_alarm`` shared over the layers (Bonferroni). A layer
    fails only when its whole interval lies outside [-log10 band, +log10 band],
    so Monte-Carlo noise never fails a correct init; a layer whose interval
    straddles the edge is reported as undecided, not failed, with the
    replicates that would decide it: those whose interval half-width, at the
    spread measured here, falls below the layer's distance to the band's edge.

    ``replicates="auto"`` decides with more: a first run of 16 networks, then,
    if layers are undecided, one run with the replicates that decide them at
    the 90% upper confidence bound of each layer's spread (at most
    :data:`MAX_AUTO_REPLICATES`); each run gets half of ``false_alarm``, so the
    two looks together keep the stated rate. ``options``: ``distribution``,
    ``mode``, ``gain``, ``scale``, ``bias_std``, ``leaky_slope``,
    ``bn_layers``, ``bn_position``, ``bn_eps``, ``batch_size``.
    """
    if direction not in ("forward", "backward", "both"):
        raise SpecError("direction", f"expected forward, backward or both, got {direction!r}")
    if isinstance(band, bool) or not isinstance(band, (int, float)) or not (math.isfinite(band) and band > 1):
        raise SpecError("band", f"expected a finite factor > 1, got {band!r}")
    false_alarm = _false_alarm(false_alarm)
    auto = replicates == "auto"
    if not auto and (isinstance(replicates, bool) or not isinstance(replicates, (int, np.integer))
                     or replicates < MIN_REPLICATES):
        raise SpecError("replicates", f"expected 'auto' or an integer >= {MIN_REPLICATES} (with fewer, the interval "
                        f"at this false-alarm rate is too wide to ever fail), got {replicates!r}")
    backward = direction in ("backward", "both")
    sides = (["post"] if direction != "backward" else []) + (["grad"] if backward else [])
    limit = math.log10(band)
    stage_alarm = false_alarm / 2 if auto else false_alarm
    spec = _spec(init, activation, depth, width, samples, 16 if auto else int(replicates), seed, backward, options)
    table = _layer_table(simulate(spec), sides, depth, limit, stage_alarm)
    if auto and (table["verdict"] == "undecided").any() and not (table["verdict"] == "fail").any():
        undecided = table[table["verdict"] == "undecided"]
        upper = math.sqrt((spec.replicates - 1) / sps.chi2.ppf(0.1, spec.replicates - 1))
        shared = stage_alarm / (depth * len(sides))
        wanted = [_replicates_to_decide(r.sd * upper, min(abs(r.log10_ratio - limit), abs(r.log10_ratio + limit)),
                                        shared, MAX_AUTO_REPLICATES) for r in undecided.itertuples()]
        more = MAX_AUTO_REPLICATES if None in wanted else max(wanted)
        spec = _spec(init, activation, depth, width, samples, max(more, spec.replicates + 1), seed, backward, options)
        table = _layer_table(simulate(spec), sides, depth, limit, stage_alarm)
    command = _command(spec, init, options)
    n_rep = spec.replicates
    bad = table[table["verdict"] == "fail"]
    if bad.empty:
        undecided, needed = _to_decide(table)
        if not undecided:
            msg = f"{_name(init)} with {activation}: std stays within a factor {band:g} over {depth} layers"
            return CheckResult(True, f"{msg} ({direction})", table, command, n_rep, needed)
        noun = "layer check" if direction == "both" else "layer"  # both: a layer is checked each way
        what = f"{undecided} {noun} is" if undecided == 1 else f"{undecided} {noun}s are"
        msg = (f"{_name(init)} with {activation}: no layer's std shown to leave a factor {band:g} over {depth} "
               f"layers ({direction}), but {what} undecided at this noise level ({n_rep} networks)")
        outside, words = outside_the_band(table, limit, lambda r: f"layer {int(r['layer'])}")
        msg += words
        if needed is None:
            how = "a layer's mean sits on the band's edge, so no number of replicates decides them all"
        else:
            how = (f"about {needed} replicates would decide them all (from the spread measured here; "
                   + ("replicates='auto' runs them)" if needed <= MAX_AUTO_REPLICATES else
                      f"beyond the {MAX_AUTO_REPLICATES} that replicates='auto' runs at most: a layer sits near "
                      "the band's edge)"))
        return CheckResult(True, f"{msg}; {how}", table, command, n_rep, needed, undecided_outside=outside)
    first = bad.iloc[0]
    factor = 10 ** first["log10_ratio"]
    where = "of the input's" if first["direction"] == "forward" else "of the output gradient's"
    th = first["theory_log10_ratio"]
    measured = (("std 0" if first["hi"] < 0 else "std beyond float64") + f" in some of {n_rep} networks"
                if math.isinf(first["lo"]) else
                f"x{factor:.3g} (interval x{10 ** first['lo']:.3g} .. x{10 ** first['hi']:.3g} over {n_rep} networks)")
    msg = (f"{_name(init)} with {activation}, width {width}: {first['direction']} std leaves the band "
           f"[1/{band:g}, {band:g}] {where} at layer {int(first['layer'])}: measured {measured}"
           + (f", mean-field predicts x{10 ** th:.3g}" if not math.isnan(th) else "")
           + f". Reproduce: {command}")
    return CheckResult(False, msg, table, command, n_rep)


def assert_preserves_variance(init: Init, activation: str = "linear", depth: int = 20, width: int = 256,
                              **kwargs: Any) -> CheckResult:
    """:func:`check_preserves_variance`, raising AssertionError with its message on failure."""
    result = check_preserves_variance(init, activation, depth, width, **kwargs)
    if not result.passed:
        raise AssertionError(result.message)
    if result.verdict == "undecided":  # not shown to fail, but not shown to hold either: pytest shows it
        warnings.warn(result.message, UndecidedWarning, stacklevel=2)
    return result


class UndecidedWarning(UserWarning):
    """A check that no layer failed, with undecided layers measured outside the band (more replicates decide)."""


def _theory_spec(spec: RunSpec, weight_variance: WeightVariance | None) -> RunSpec:
    """The spec whose mean-field prediction the measurement is held to: ``spec``
    itself, or, with ``weight_variance`` stated, the same network with normal
    weights of that variance (and the scheme's own bias, if it has one)."""
    if weight_variance is None:
        if spec.network.init.resolve().user is not None:
            raise TypeError("assert_matches_theory() needs weight_variance= for a user init: the variance its "
                            "weights are meant to have (a number, or a function (fan_in, fan_out) -> variance)")
        return spec
    net = spec.network
    n = net.widths[0]  # a square stack: every layer is n x n
    if callable(weight_variance):
        try:
            value = weight_variance(n, n)
        except Exception as exc:  # the user's function: its failure, named
            raise ValueError(f"weight_variance({n}, {n}) raised {type(exc).__name__}: {exc}") from None
        v = _variance(value, f"weight_variance({n}, {n})")
    else:
        v = _variance(weight_variance, "weight_variance")
    scheme = net.init.resolve()
    log_vb = theory.bias_log_variance(scheme, net.bias_std, n)
    bias_std = math.exp(0.5 * log_vb) if log_vb > -math.inf else net.bias_std
    network = NetworkSpec(net.widths, net.activation, net.output_activation, net.leaky_slope,
                          InitSpec("unit", gain=math.sqrt(v)), bias_std, net.bn_layers, net.bn_position, net.bn_eps)
    return RunSpec(network, spec.samples, spec.input, spec.input_std, spec.input_file, spec.replicates, spec.seed,
                   spec.dtype, spec.batch_size, spec.backward)


def assert_matches_theory(init: Init, activation: str = "linear", depth: int = 10, width: int = 512, *,
                          weight_variance: WeightVariance | None = None, samples: int = 128, replicates: int = 16,
                          seed: int = 0, false_alarm: float = DEFAULT_FALSE_ALARM, backward: bool = False,
                          **options: Any) -> pd.DataFrame:
    """Assert that the measured mean second moment of every layer (and of the
    gradients with ``backward``) agrees with mean-field theory within its t
    interval over replicates (Bonferroni over layers). Mean-field theory is
    the infinite-width limit: use widths of a few hundred or more, where its
    O(1/width) error is below the interval. Returns the comparison table.

    ``weight_variance`` is the variance the weights are meant to have (a
    number, or a function ``(fan_in, fan_out) -> variance``): the theory is
    computed from it rather than from the scheme, so a user init, whose
    variance varprop cannot know, is held to the one its author states, and a
    named scheme to a stated one. Required for a user init (TypeError
    without it).

    >>> import numpy as np
    >>> def mine(rng, fan_in, fan_out):
    ...     return rng.standard_normal((fan_in, fan_out)) * np.sqrt(2 / fan_in)
    >>> table = assert_matches_theory(mine, "relu", depth=4, width=256, weight_variance=lambda i, o: 2 / i)
    >>> bool(table["ok"].all())
    True
    """
    false_alarm = _false_alarm(false_alarm)
    if isinstance(replicates, bool) or not isinstance(replicates, (int, np.integer)) or replicates < MIN_REPLICATES:
        raise ValueError(f"replicates: expected an integer >= {MIN_REPLICATES} (with fewer, the interval at this "
                         f"false-alarm rate is too wide to ever fail), got {replicates!r}")
    spec = _spec(init, activation, depth, width, samples, replicates, seed, backward, options)
    predicted = theory.predict(_theory_spec(spec, weight_variance))
    df = simulate(spec)
    sides = ["post"] + (["grad"] if backward else [])
    rows = []
    tq = _t(false_alarm / ((depth + 1) * len(sides)), replicates - 1)
    for side in sides:
        col, th = f"{side}_second_moment", f"theory_{side}_second_moment"
        if th not in predicted or predicted[th].isna().all():
            raise ValueError(f"no mean-field prediction for {side}: gradients through batch norm are not modelled")
        for layer, g in df.groupby("layer"):
            v = np.log(g[col].to_numpy())  # log: the second moment is positive and right-skewed
            pred = float(np.log(predicted.loc[predicted["layer"] == layer, th].iloc[0]))
            if math.isnan(pred):
                continue  # a layer the theory does not model (below a batch-norm layer, going backward)
            mean, se = float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v)))
            # E[log m2] sits below log E[m2] by about Var(log m2) / 2 (delta method); allow for it.
            jensen = float(v.var(ddof=1)) / 2
            rows.append({"side": side, "layer": layer, "log_measured": mean, "log_theory": pred, "se": se,
                         "ok": abs(mean + jensen - pred) <= tq * se + 1e-12})
    table = pd.DataFrame(rows)
    bad = table[~table["ok"]]
    if not bad.empty:
        b = bad.iloc[0]
        stated = "" if weight_variance is None else " computed from the stated weight variance"
        raise AssertionError(
            f"{_name(init)} with {activation}, width {width}: {b['side']} second moment at layer {int(b['layer'])} "
            f"is x{math.exp(b['log_measured'] - b['log_theory']):.4g} the mean-field prediction{stated} (typical "
            f"network; {replicates} replicates, t interval at false-alarm rate {false_alarm:g}). Reproduce: "
            + _command(spec, init, options))
    return table

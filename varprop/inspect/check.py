"""Assertions for a test suite: every module's std within a band of the input's (and of the output
gradient's), decided over re-initialisations."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .. import options as option_table
from ..errors import SpecError
from .model import callable_name
from .run import inspect


def check_preserves_variance(model: Any, input_shape: Sequence[int] | str | None = None, *, band: float = 2.0,
                             direction: str = "forward", replicates: int = 16, seed: int = 0,
                             false_alarm: float = 1e-6, command: str | None = None, label: str | None = None,
                             **options: Any) -> Any:
    """Measure whether every module's output std stays within a factor ``band`` of the input's (forward),
    and every gradient's within ``band`` of the output gradient's (backward).

    Per module, log10(std / reference std) is averaged over ``replicates``
    re-initialisations with a t interval at ``false_alarm`` shared over the
    modules (Bonferroni); a module fails only when its whole interval lies
    outside [1/band, band], so sampling noise does not fail a healthy model,
    and one whose interval straddles the edge is undecided. Returns
    :class:`varprop.testing.CheckResult`, whose message names the first
    failing module and ``command`` (how to reproduce it); other options go
    to :func:`inspect`.
    """
    from scipy import stats as sps

    from ..testing import MIN_REPLICATES, CheckResult, outside_the_band

    if direction not in ("forward", "backward", "both"):
        raise SpecError("direction", f"expected forward, backward or both, got {direction!r}")
    if not band > 1:
        raise SpecError("band", f"expected a factor > 1, got {band!r}")
    if replicates < MIN_REPLICATES:
        raise SpecError("replicates", f"at least {MIN_REPLICATES} replicates are needed: with fewer, the interval "
                        "at this false-alarm rate is too wide to ever fail")
    backward = direction in ("backward", "both")
    table = inspect(model, input_shape, replicates=replicates, backward=backward, seed=seed, **options)
    limit = math.log10(band)
    layers = sorted(table["layer"].unique())
    sides = (["post"] if direction != "backward" else []) + (["grad"] if backward else [])
    wide = {side: table.pivot(index="replicate", columns="layer", values=f"{side}_log10_std") for side in sides}
    # inf or NaN values (their statistics are NaN) fail; a NaN otherwise is a gradient that never arrives
    broken = {side: table.pivot(index="replicate", columns="layer", values="nonfinite" if side == "post"
                                else "grad_nonfinite").astype(bool).any() for side in sides}
    names = table.groupby("layer")["name"].first()
    ref_layer = {"post": 0, "grad": int(table.loc[table["grad_log10_std"].notna(), "layer"].max())
                 if backward else 0}
    # The input is the forward reference; its gradient updates no weight (and grows with fan_out / fan_in
    # at the first layer under a fan_in init), so it is not checked backward either.
    tests = [(side, layer) for side in sides for layer in layers if layer not in (0, ref_layer[side])
             and (wide[side][layer].notna().all() or broken[side][layer])]
    tq = float(sps.t.isf(false_alarm / 2 / max(len(tests), 1), replicates - 1))
    rows = []
    for side, layer in tests:
        d = (wide[side][layer] - wide[side][ref_layer[side]]).to_numpy(float)
        if broken[side][layer]:
            mean = lo = hi = math.nan
        elif not np.isfinite(d).all():
            mean, lo, hi = float(np.mean(d)), -math.inf, -math.inf
        else:
            mean, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))
            lo, hi = mean - tq * se, mean + tq * se
        th_col = f"theory_{side}_log10_std"
        th = math.nan
        if th_col in table:
            per = table.groupby("layer")[th_col].first()
            th = float(per.get(layer, math.nan) - per.get(ref_layer[side], math.nan))
        verdict = "fail" if (broken[side][layer] or lo > limit or hi < -limit) else "pass" if (
            -limit <= lo and hi <= limit) else "undecided"
        rows.append({"direction": "forward" if side == "post" else "backward", "layer": int(layer),
                     "name": names[layer], "log10_ratio": mean, "lo": lo, "hi": hi, "theory_log10_ratio": th,
                     "verdict": verdict})
    result = pd.DataFrame(rows)
    label = label or (model if isinstance(model, str) else callable_name(model))
    if command is None:
        command = _reproduce(model, label, tuple(table.attrs["inspect"]["input_shape"]), band, direction,
                             replicates, seed, options)
    bad = result[result["verdict"] == "fail"] if len(result) else result
    if bad.empty:
        undecided = int((result["verdict"] == "undecided").sum()) if len(result) else 0
        of = ("input's" if direction == "forward" else "input's and the output gradient's"
              if direction == "both" else "output gradient's")
        checks = f"({len(result)} checks, {replicates} re-initialisations)"
        if not undecided:
            return CheckResult(True, f"{label}: every module's std stays within a factor {band:g} of the {of} "
                               + checks, result, command)
        msg = (f"{label}: no module's std shown to leave a factor {band:g} of the {of} {checks}, but {undecided} "
               f"{'check is' if undecided == 1 else 'checks are'} undecided at this noise level")
        outside, words = outside_the_band(result, limit, lambda r: r["name"])
        msg += words + (": more re-initialisations decide them" if outside else "")
        return CheckResult(True, msg, result, command, undecided_outside=outside)
    first = bad.iloc[0]
    where = "the input's" if first["direction"] == "forward" else "the output gradient's"
    if math.isnan(first["lo"]):
        measured = "inf or NaN values in some re-initialisation"
    elif math.isinf(first["lo"]):
        measured = "std 0 in some re-initialisation"
    else:
        measured = (f"x{10 ** first['log10_ratio']:.3g} (interval x{10 ** first['lo']:.3g} .. "
                    f"x{10 ** first['hi']:.3g} over {replicates} re-initialisations)")
    th = first["theory_log10_ratio"]
    msg = (f"{label}: the {first['direction']} std of {first['name']} leaves the band [1/{band:g}, {band:g}] "
           f"of {where}: measured {measured}" + (f", mean-field predicts x{10 ** th:.3g}" if math.isfinite(th)
                                                 else "") + f". Reproduce: {command}")
    return CheckResult(False, msg, result, command)


# check_preserves_variance's options that varprop check --model takes, by the name it gives them there
_CLI_NAMES = {"mode": "model_mode", "modules": "modules", "types": "types", "device": "device"}


def _reproduce(model: Any, label: str, shape: tuple[int, ...], band: float, direction: str, replicates: int,
               seed: int, options: dict[str, Any]) -> str:
    """The command that reruns a check: ``varprop check --model`` where it can say everything (a model named
    by a string, no input array, both directions or forward alone: its --backward checks both), else the
    Python call, every option spelled out."""
    given = {k: v for k, v in options.items() if v is not None}
    if isinstance(model, str) and direction != "backward" and set(given) <= set(_CLI_NAMES):
        values = {"input_shape": shape, "band": band, "replicates": replicates, "seed": seed,
                  "backward": direction == "both",  # a list of modules or types is one comma-separated value
                  **{_CLI_NAMES[k]: ",".join(v) if k in ("modules", "types") and not isinstance(v, str) else v
                     for k, v in given.items()}}
        return option_table.command_line("check", values, lead=("--model", model))
    spelled = "".join(f", {k}={_shown(v)}" for k, v in given.items())
    return (f"varprop.torch.check_preserves_variance({repr(model) if isinstance(model, str) else label}, {shape}, "
            f"band={band:g}, direction={direction!r}, replicates={replicates}, seed={seed}{spelled})")


def _shown(value: Any) -> str:
    """An option's value as the reproduce call writes it (an array by its shape and dtype)."""
    return f"<{value.dtype} array of shape {value.shape}>" if isinstance(value, np.ndarray) else repr(value)


def assert_preserves_variance(model: Any, input_shape: Sequence[int] | str | None = None, *, band: float = 2.0,
                              **options: Any) -> Any:
    """:func:`check_preserves_variance`, raising AssertionError with its message when a module fails.

    >>> import torch.nn as nn
    >>> make = lambda: nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 256))
    >>> assert_preserves_variance(make, input_shape=(64, 256), band=4).passed
    True
    """
    result = check_preserves_variance(model, input_shape, band=band, **options)
    if not result.passed:
        raise AssertionError(result.message)
    return result

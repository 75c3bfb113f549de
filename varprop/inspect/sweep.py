"""``width_sweep()``: an automated coord check: every module's std fitted against width."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..errors import SpecError
from ..options import parse_width_sweep
from ..fit import line_fit
from ..stats import t_half_width
from .modules import INPUT
from .run import inspect


@dataclass
class SweepResult:
    """:func:`width_sweep`'s outcome: every width's table, the exponents and the verdict."""

    table: pd.DataFrame  # inspect()'s rows of every width, with a ``width`` column (config "width=64", ...)
    exponents: pd.DataFrame  # per module and side: the exponent of the std against width, its interval, verdict
    passed: bool | None  # True: every exponent within the tolerance; False: one outside it; None: undecided
    message: str
    tolerance: float

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "message": self.message, "tolerance": self.tolerance,
                "exponents": self.exponents.to_dict(orient="records")}


def width_sweep(factory: Any, widths: Sequence[int] | str, input_shape: Sequence[int] | str | None = None, *,
                replicates: int = 4, backward: bool = False, tolerance: float = 0.1, level: float = 0.95,
                **options: Any) -> SweepResult:
    """Inspect ``factory(width)`` at each width and fit, per module, ``log10 std = a + b log10 width``.

    The exponent b says how a module's output (and, with ``backward``, its
    gradient) scales with width: 0 for a correctly scaled model, 0.5 per
    layer for N(0, 1) weights. The fit is made on each replicate (replicate r
    of every width is drawn from the same seed; replicates are independent),
    and the interval at ``level`` comes from the spread of those slopes
    (t with R - 1 degrees of freedom; with one replicate, the regression's
    own). A module passes when its whole interval lies within
    [-tolerance, +tolerance], fails when it lies wholly outside, and is
    undecided otherwise; the sweep fails if a module fails, passes if all
    pass. Other options go to :func:`inspect`.
    """
    ws = parse_width_sweep(widths)
    if not tolerance > 0:
        raise SpecError("tolerance", f"expected a positive exponent tolerance, got {tolerance!r}")
    frames, residual = [], []
    for w in ws:
        t = inspect(factory, input_shape, replicates=replicates, backward=backward, factory_args=(w,),
                    config=f"width={w}", **options)
        t.insert(1, "width", w)
        attrs, t.attrs = dict(t.attrs), {}
        residual += attrs["residual"]
        frames.append(t)
    table = pd.concat(frames, ignore_index=True)
    table.attrs = {**attrs, "residual": residual, "inspect": {**attrs["inspect"], "widths": list(ws)}}
    # The input's own statistics do not depend on the model, and its gradient updates no weight: not fitted.
    names = [n for n in frames[0]["name"].unique() if n != INPUT and all(n in set(f["name"]) for f in frames[1:])]
    rows = []
    sides = ["post"] + (["grad"] if backward else [])
    for name in names:
        sub = table[table["name"] == name]
        for side in sides:
            col = f"{side}_log10_std"
            pts = sub[["width", "replicate", col]].dropna()
            pts = pts[np.isfinite(pts[col])]
            if pts["width"].nunique() < 2:
                continue
            x = np.log10(pts["width"].to_numpy(float))
            pooled = line_fit(x, pts[col].to_numpy(float), level)
            per = [line_fit(np.log10(g["width"].to_numpy(float)), g[col].to_numpy(float)).slope
                   for _, g in pts.groupby("replicate") if g["width"].nunique() >= 2]
            if len(per) >= 2:
                sd = float(np.std(per, ddof=1))
                se, half = sd / math.sqrt(len(per)), float(t_half_width(sd, len(per), level))
                slope = float(np.mean(per))
            else:
                slope, se = pooled.slope, pooled.slope_se
                half = pooled.slope_hi - pooled.slope
            lo, hi = slope - half, slope + half
            verdict = ("pass" if -tolerance <= lo and hi <= tolerance else
                       "fail" if (lo > tolerance or hi < -tolerance) else "undecided")
            first = sub[sub["width"] == ws[0]].iloc[0]
            rows.append({"name": name, "type": first["type"], "layer": int(first["layer"]),
                         "side": "output" if side == "post" else "gradient", "exponent": slope, "se": se,
                         "lo": lo, "hi": hi, "r2": pooled.r2, "replicates": len(per) or 1, "verdict": verdict})
    exponents = pd.DataFrame(rows)
    if exponents.empty:
        raise SpecError("width_sweep", "no module's std could be fitted against width (every std is 0 or "
                        "not finite)")
    bad = exponents[exponents["verdict"] == "fail"]
    undecided = exponents[exponents["verdict"] == "undecided"]
    span = f"widths {ws[0]}..{ws[-1]}"
    if len(bad):
        b = bad.iloc[np.argmax(np.abs(bad["exponent"].to_numpy()))]
        passed: bool | None = False
        message = (f"FAIL: {len(bad)} of {len(exponents)} exponents lie outside +-{tolerance:g} ({span}); the "
                   f"largest: {b['name']} ({b['side']}) std ~ width^{b['exponent']:.3f} "
                   f"[{b['lo']:.3f}, {b['hi']:.3f}]")
        if (bad["exponent"] < 0).all():  # e.g. muP's readout, initialised to vanish as width grows
            message += ("; " + ("it shrinks" if len(bad) == 1 else "every one of them shrinks") + " with width (a "
                        "layer initialised to vanish, as muP's readout is, fails this rule by design: nothing here "
                        "blows up)")
    elif len(undecided):
        u = undecided.iloc[0]
        passed = None
        what = "1 exponent's interval straddles" if len(undecided) == 1 else \
            f"{len(undecided)} exponents' intervals straddle"
        message = (f"UNDECIDED: {what} +-{tolerance:g} ({span}), e.g. {u['name']} ({u['side']}): "
                   f"{u['exponent']:.3f} [{u['lo']:.3f}, {u['hi']:.3f}]; more replicates or widths narrow "
                   "the intervals")
    else:
        passed = True
        message = (f"PASS: every exponent lies within +-{tolerance:g} ({len(exponents)} fits, {span}): "
                   "the statistics do not scale with width")
    return SweepResult(table, exponents, passed, message, tolerance)

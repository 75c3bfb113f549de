"""The Markdown report and the terminal table, from the per-layer data.

Every string that comes from the user or from a run directory (labels, option
names and values, titles, versions) enters the document through
:func:`~varprop.report.document.lit`, so each output format escapes it.
"""

from __future__ import annotations

import itertools
import math
import re
import shlex
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..findings import PROBLEMS, STD_BAND, Assessment, assess, growth
from ..fit import depth_growth, line_fit
from ..run import Run
from ..spec import label_part
from ..stats import log10_mean_pow10, t_half_width
from .document import Document, Item, lit, lit_code, visible

MAX_FULL_LAYERS = 30  # tables show every layer up to this depth, then a subsample
SUBSAMPLE = 20


def row_unit(layers: pd.DataFrame) -> str:
    """What one row of ``layers`` is: a residual stack's "block", else a "layer"."""
    return "block" if "branch_second_moment" in layers else "layer"


def as_rows(text: str, unit: str) -> str:
    """``text``, whose every "layer" means a row of the table, with ``unit`` in its place (a residual
    stack's "block"); ``layers.csv`` keeps its name.

    >>> as_rows("Std per layer: the last layer's (layers.csv)", "block")
    "Std per block: the last block's (layers.csv)"
    """
    if unit == "layer":
        return text
    return re.sub(r"\b([Ll])ayer(?!s\.csv)", lambda m: unit.capitalize() if m.group(1) == "L" else unit, text)


def shown_layers(depth: int) -> list[int]:
    """Layers a table shows: all up to 30, else ~20 evenly spaced incl. 0, 1 and L.

    >>> shown_layers(100)[:4], shown_layers(100)[-1]
    ([0, 1, 5, 10], 100)
    """
    if depth <= MAX_FULL_LAYERS:
        return list(range(depth + 1))
    picks = np.round(np.linspace(0, depth, SUBSAMPLE + 1)).astype(int)
    return sorted({0, 1, depth, *picks.tolist()})


def fmt(x: Any, digits: int = 4) -> str:
    """A number for a table; overflowed values say so instead of printing inf.
    Exponents as :func:`fmt_pow10` writes them (``1.2e-5``, not ``1.2e-05``).

    >>> fmt(0.0000123456), fmt(123456789.0), fmt(0.5)
    ('1.235e-5', '1.235e+8', '0.5')
    """
    if x is None or x is pd.NA:
        return ""
    x = float(x)
    if math.isnan(x):
        return ""
    if math.isinf(x):
        return "overflow" if x > 0 else "-overflow"
    return re.sub(r"e([+-])0+(?=\d)", r"e\1", f"{x:.{digits}g}")


def fmt_pow10(log10: float, digits: int = 3) -> str:
    """``10 ** log10`` in scientific notation, even far beyond float64.

    >>> fmt_pow10(9978.2888)
    '1.94e+9978'
    """
    if not math.isfinite(log10):
        return "0" if log10 == -math.inf else ""
    exp = math.floor(log10)
    mant = 10 ** (log10 - exp)
    if round(mant, digits - 1) >= 10:
        mant, exp = mant / 10, exp + 1
    return f"{mant:.{digits - 1}f}e{exp:+d}"


def fmt_std(log10: float) -> str:
    """A std given by its log10: plain when moderate, else via :func:`fmt_pow10`; empty when unknown (NaN).

    >>> fmt_std(0.5), fmt_std(-12.0), fmt_std(-math.inf), fmt_std(math.nan)
    ('3.162', '1.000e-12', '0', '')
    """
    if math.isnan(log10):
        return ""
    return fmt_pow10(log10, 4) if math.isfinite(log10) and abs(log10) >= 5 else fmt(
        10.0**log10 if math.isfinite(log10) else 0.0)


def fmt_signed(sign: float, log10_abs: float) -> str:
    """A value given by its sign and log10 of its magnitude (a mean beyond
    float64 included): plain when moderate, else scientific; empty when unknown.

    >>> fmt_signed(-1, 412.505), fmt_signed(1, -0.30103), fmt_signed(0, -math.inf), fmt_signed(math.nan, 1.0)
    ('-3.199e+412', '0.5', '0', '')
    """
    if math.isnan(sign) or math.isnan(log10_abs):
        return ""
    if sign == 0 or log10_abs == -math.inf:
        return "0"
    return ("-" if sign < 0 else "") + fmt_std(log10_abs)


def mean_columns(frame: pd.DataFrame, side: str) -> tuple[np.ndarray, np.ndarray]:
    """The sign and log10 |value| of ``{side}_mean`` row by row: from its
    ``_log10_abs_mean`` column (exact at any magnitude), or, in a run written
    before that column existed, from the mean itself."""
    mean = frame[f"{side}_mean"].to_numpy(float)
    if f"{side}_log10_abs_mean" in frame:
        log10_abs = frame[f"{side}_log10_abs_mean"].to_numpy(float)
    else:
        with np.errstate(divide="ignore"):  # a mean of 0: -inf
            log10_abs = np.log10(np.abs(mean))
    return np.sign(mean), log10_abs


def signed_means(layers: pd.DataFrame, keys: Sequence[str], side: str = "post") -> pd.DataFrame:
    """Per group of ``keys``, the mean of ``{side}_mean`` over the group's rows
    as ``sign`` and ``log10_abs`` (log10 of its magnitude), taken stably at any
    magnitude: each value is scaled by the group's largest before summing, so
    means of +-1e400 average without overflow, and the sign survives where
    plain floats would give inf - inf = NaN.

    >>> d = pd.DataFrame({"config": ["a", "a"], "post_mean": [np.inf, -np.inf],
    ...                   "post_log10_abs_mean": [400.0, 399.0]})
    >>> r = signed_means(d, ["config"]).iloc[0]
    >>> float(r["sign"]), round(float(r["log10_abs"]), 6)
    (1.0, 399.653213)
    """
    sign, log10_abs = mean_columns(layers, side)
    frame = layers[list(keys)].copy()
    frame["la"] = np.where(np.isnan(sign), np.nan, log10_abs)
    by = [frame[k] for k in keys]
    peak = frame["la"].replace(-np.inf, np.nan).groupby(by, sort=False).transform("max")
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        frame["term"] = np.where(frame["la"] == -np.inf, 0.0, sign * 10.0 ** (frame["la"] - peak))
    frame["peak"] = peak
    g = frame.groupby(keys, sort=False)
    rel, top = g["term"].mean(), g["peak"].first()
    out = pd.DataFrame({"sign": np.sign(rel)})
    with np.errstate(divide="ignore"):
        out["log10_abs"] = np.where(rel == 0, -np.inf, top + np.log10(np.abs(rel)))
    return out.reset_index()


_LN10 = math.log(10.0)


def _log10_second_moment(frame: pd.DataFrame, side: str) -> np.ndarray:
    """log10 E[x^2] = log10(std^2 + mean^2) per row, from the log10 columns (exact at any magnitude)."""
    _, log10_abs_mean = mean_columns(frame, side)
    with np.errstate(invalid="ignore"):  # NaN where a side or a theory has no value: NaN, silently
        return np.logaddexp(2 * _LN10 * frame[f"{side}_log10_std"].to_numpy(float), 2 * _LN10 * log10_abs_mean) / _LN10


def log_scale_stats(layers: pd.DataFrame) -> pd.DataFrame:
    """Per config and layer, what the tables print in log scale, exact at any
    magnitude: the mean over replicates of the layer output's mean
    (``sign``, ``log10_abs``: :func:`signed_means`), of its second moment
    (``m2_log10``) with the 95% t interval over replicates (``lo_sign``,
    ``lo_log10``, ``hi_log10``: the lower end may be negative) and the range
    of single networks (``min_log10``, ``max_log10``), and the theory's
    second moment (``theory_m2_log10``). Each group is scaled by its
    largest value before summing, as summarize() does in float64 where the
    values fit (the two agree there to rounding)."""
    keys = ["config", "layer"]
    frame = layers[keys].copy()
    frame["l2"] = _log10_second_moment(layers, "post")
    peak = frame["l2"].replace(-np.inf, np.nan).groupby([frame[k] for k in keys], sort=False).transform("max")
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        frame["y"] = np.where(frame["l2"] == -np.inf, 0.0, 10.0 ** (frame["l2"] - peak))
    frame["peak"] = peak
    if "theory_post_log10_std" in layers:
        frame["theory"] = _log10_second_moment(layers, "theory_post")
    g = frame.groupby(keys, sort=False)
    mean, n, top = g["y"].mean(), g["y"].count(), g["peak"].first()
    low, high = g["l2"].min(), g["l2"].max()
    with np.errstate(invalid="ignore", divide="ignore"):
        half = t_half_width(g["y"].std(ddof=1), n)
        out = pd.DataFrame({"m2_log10": np.where(mean == 0, -np.inf, top + np.log10(mean)),
                            "lo_sign": np.sign(mean - half), "lo_log10": top + np.log10(np.abs(mean - half)),
                            "hi_log10": top + np.log10(mean + half), "min_log10": low, "max_log10": high})
    out["theory_m2_log10"] = g["theory"].first() if "theory" in frame else math.nan
    return signed_means(layers, keys).merge(out.reset_index(), on=keys)


def varied_values(configs: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The options each configuration varies, by name (config.json's
    ``configs[i]["varied"]``): one row per configuration (index: its label),
    one column per varied option, in label order; a list value as a tuple, an
    option a configuration does not vary as None.

    >>> varied_values([{"label": "a", "varied": {"width": 64}}, {"label": "b", "varied": {"width": 128}}])
      width
    a    64
    b   128
    """
    keys = list(dict.fromkeys(k for c in configs for k in c.get("varied") or {}))
    rows = {c["label"]: [_hashable((c.get("varied") or {}).get(k)) for k in keys] for c in configs}
    return pd.DataFrame.from_dict(rows, orient="index", columns=keys, dtype=object)


def shell_visible(command: str) -> str:
    r"""``command`` with every argument that holds a control character (a
    newline, an escape sequence that would clear the terminal of whoever
    prints the report) written in bash's ANSI-C quoting, which reproduces it
    exactly; a command without one, as it is.

    >>> shell_visible("varprop simulate --title 'a\x1b[2J\nb'")
    "varprop simulate --title $'a\\x1b[2J\\nb'"
    """
    if command.isprintable():
        return command
    try:
        words = shlex.split(command)
    except ValueError:  # not a shell command: shown, at least, on one line
        return visible(command)
    return " ".join(shlex.quote(w) if w.isprintable() else _ansi_c(w) for w in words)


def _ansi_c(word: str) -> str:
    """``word`` as a bash ANSI-C quoted string, ``$'...'``."""
    named = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\t": "\\t"}

    def one(c: str) -> str:
        if c in named:
            return named[c]
        if c.isprintable():
            return c
        code = ord(c)
        return f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
    return "$'" + "".join(map(one, word)) + "'"


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def seed_line(layers: pd.DataFrame) -> dict[str, tuple[float, float, float]]:
    """Per config, the seed answer's summary over layers 1..L (pooled over
    replicates): the mean of the layer means (its sign and log10 |value|) and
    log10 of the square root of the mean of the layer variances."""
    inner = layers[layers["layer"] > 0]
    means = signed_means(inner, ["config"]).set_index("config")
    out = {}
    for config, g in inner.groupby("config", sort=False):
        log10_rms = 0.5 * log10_mean_pow10(g["post_log10_std"].to_numpy(), 2.0)
        out[config] = (float(means.at[config, "sign"]), float(means.at[config, "log10_abs"]), log10_rms)
    return out


HISTOGRAM_CONFIGS = 6  # rows of the histograms figure


def histogram_configs(hist: pd.DataFrame, most: int = HISTOGRAM_CONFIGS) -> tuple[list[str], int]:
    """The configurations the histograms figure shows, and how many distinct ones there are. Beyond
    ``most`` configurations, ``most`` spread evenly over them in order, first and last included (six inits x
    six activations give one of each); a pick whose histograms equal one already shown (batch sizes
    without batch norm, by common random numbers) gives way to the next configuration that differs.

    >>> h = pd.DataFrame({"config": list("abcde"), "layer": 1, "density": [1.0, 1.0, 2.0, 3.0, 4.0]})
    >>> histogram_configs(h, 2), histogram_configs(h, 3), histogram_configs(h, 9)
    ((['a', 'e'], 4), (['a', 'c', 'e'], 4), (['a', 'c', 'd', 'e'], 4))
    """
    keys = {str(config): rows[["layer", "density"]].to_numpy().tobytes()
            for config, rows in hist.groupby("config", sort=False)}
    names = list(keys)
    picks: list[int] = []
    for i in np.round(np.linspace(0, len(names) - 1, min(most, len(names)))).astype(int):
        shown = {keys[names[j]] for j in picks}
        picks += [j for j in [*range(i, len(names)), *range(i)] if keys[names[j]] not in shown][:1]
    return [names[j] for j in sorted(set(picks))], len(set(keys.values()))


def _histograms_shown(hist: pd.DataFrame, configs: int) -> str:
    """The end of the histograms' caption: which configurations :func:`histogram_configs` shows."""
    shown, distinct = histogram_configs(hist)
    same = configs - distinct
    alike = (f" ({same} configuration{'s' if same > 1 else ''} with the same histograms as another "
             f"{'are' if same > 1 else 'is'} shown once)" if same else "")
    if len(shown) < distinct:
        return f"; {len(shown)} of the {distinct} different configurations, spread evenly over them{alike}."
    return f"{alike}."


def layer_table(summary: pd.DataFrame, config: str, replicates: int, logs: pd.DataFrame) -> pd.DataFrame:
    """The per-layer table of one configuration (its subsample of layers);
    ``logs`` is :func:`log_scale_stats` of the run."""
    s = summary[summary["config"] == config].set_index("layer")
    s = s.loc[[layer for layer in shown_layers(int(s.index.max())) if layer in s.index]]
    m = logs[logs["config"] == config].set_index("layer").reindex(s.index)
    table = pd.DataFrame({"layer": s.index})
    table["pre std"] = [fmt_std(v) for v in s["pre_log10_rms_std"]]
    table["post mean"] = [fmt_signed(sg, la) for sg, la in zip(m["sign"], m["log10_abs"])]
    table["post std"] = [fmt_std(v) for v in s["post_log10_rms_std"]]
    if replicates > 1:
        table["typical post std"] = [fmt_std(v) for v in s["post_log10_typical_std"]]
        table["post second moment [95% CI]"] = [
            f"{fmt_std(m2)} [{fmt_signed(sign, lo)}, {fmt_std(hi)}]" if not math.isnan(lo) else fmt_std(m2)
            for m2, sign, lo, hi in zip(m["m2_log10"], m["lo_sign"], m["lo_log10"], m["hi_log10"])]
    if "theory_post_log10_std" in s:
        table["theory post std"] = [fmt_std(v) for v in s["theory_post_log10_std"]]
        table["measured / theory"] = [fmt_std(a - t) for a, t in
                                      zip(s["post_log10_rms_std"], s["theory_post_log10_std"])]
        if replicates > 1:
            table["theory in 95% CI"] = [_inside(*row, replicates) for row in zip(
                m["theory_m2_log10"], m["lo_sign"], m["lo_log10"], m["hi_log10"], m["min_log10"], m["max_log10"])]
    if "grad_log10_std" in s:
        table["grad std"] = [fmt_std(v) for v in s["grad_log10_rms_std"]]
        table["weight grad norm"] = [fmt_std(v) for v in s["weight_grad_log10_norm"]]
    table["zeros"] = [fmt(v, 3) for v in s["post_frac_zero"]]
    table["saturated"] = [fmt(v, 3) for v in s["post_frac_saturated"]]
    table["cos sim"] = [fmt(v, 3) for v in s["post_cos_sim"]]
    table["abs cos sim"] = [fmt(v, 3) for v in s["post_abs_cos_sim"]]
    return table


# From this many replicates on, a prediction below every network is a no whatever the interval: were it the mean
# they are drawn from, all k would lie above it with chance 2^-k or less, under 2.5% from 6 on. That needs the
# median network at or below the mean one, as a spread skewed upwards has it (second moments of random networks;
# not guaranteed near a bounded activation's saturation).
BELOW_ALL_REPLICATES = 6


def _inside(log10_value: float, lo_sign: float, lo_log10: float, hi_log10: float, low: float, high: float,
            replicates: int) -> str:
    """'yes' / '**no**' for a positive prediction of the mean against its 95%
    interval over replicates, all given in log10 (the lower end by its sign
    too); from :data:`BELOW_ALL_REPLICATES` replicates on, a prediction below
    every single network (``low``, ``high``: their range) is a no whatever the
    interval (one network far above the others widens it): '**no** (below all
    6)'. Above every network is no such sign: a few networks far above the
    rest carry the mean. '' if undefined.

    >>> _inside(-11.9, -1, -1.95, -1.74, -9.8, -1.99, 6), _inside(-11.9, -1, -1.95, -1.74, -9.8, -1.99, 3)
    ('**no** (below all 6)', 'yes')
    >>> _inside(0.0, 1, -0.1, 0.1, -0.05, 0.05, 3), _inside(0.0, 1, -0.1, -0.02, -0.05, -0.03, 3)
    ('yes', '**no**')
    """
    if any(map(math.isnan, (log10_value, lo_sign, lo_log10, hi_log10))) or not math.isfinite(log10_value):
        return ""
    if replicates >= BELOW_ALL_REPLICATES and log10_value < low:
        return f"**no** (below all {replicates})"
    return "yes" if (lo_sign <= 0 or lo_log10 <= log10_value) and log10_value <= hi_log10 else "**no**"


def _or(values: Sequence[Any]) -> str:
    """``[10, 20, 40]`` -> ``'10, 20 or 40'``."""
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def terminal_table(run: Run) -> str:
    """A compact per-layer table for the terminal: mean and std of the layer
    output for one configuration, the std of each for a comparison (of depths
    too: a layer a configuration does not have is left blank)."""
    layers, summary = run.layers, run.summary
    configs = list(summary["config"].unique())
    reps = int(layers["replicate"].nunique())
    logs = log_scale_stats(layers)
    unit = row_unit(layers)
    tables = {c: layer_table(summary, c, reps, logs).set_index("layer") for c in configs}
    depths = {c: int(t.index.max()) for c, t in tables.items()}
    if len(configs) == 1:
        cols = ["post mean", "post std"] + (["typical post std"] if reps > 1 else [])
        t = tables[configs[0]][cols].reset_index()
        title = visible(configs[0])
    elif len(configs) <= 4:
        shown = sorted(set(shown_layers(max(depths.values()))) | set(depths.values()))
        t = pd.DataFrame({"layer": shown})
        for config in configs:
            t[visible(config)] = tables[config]["post std"].reindex(shown, fill_value="").to_numpy()
        title = "std of each layer's output" + (" (mean network)" if reps > 1 else "")
    else:  # many configurations: one row each, a few layers as columns
        shown = shown_layers(max(depths.values()))
        keep = [shown[i] for i in sorted({round(j) for j in np.linspace(0, len(shown) - 1, min(8, len(shown)))})]
        rows = []
        for config in configs:
            std = tables[config]["post std"]
            rows.append({"configuration": visible(config), **{f"{unit} {layer}": std.get(layer, "") for layer in keep}})
            if len(set(depths.values())) > 1:  # each one's own output too
                rows[-1]["output"] = f"{std.iloc[-1]} ({unit} {depths[config]})"
        t = pd.DataFrame(rows)
        title = "std of layer outputs" + (" (mean network)" if reps > 1 else "")
    t = t.rename(columns={"layer": unit})
    return f"{as_rows(title, unit)}\n" + t.to_markdown(index=False, tablefmt="simple", disable_numparse=True)


def _as_shapes(options: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Square stacks' ``widths`` as ``layers`` and ``width``, as a user gives
    them (all configurations, or none when one is not square)."""
    if not all(len(set(o.get("widths", ()))) == 1 for o in options):
        return [dict(o) for o in options]
    return [{"blocks" if "residual" in o else "layers": len(o["widths"]) - 1, "width": o["widths"][0],
             **{k: v for k, v in o.items() if k != "widths"}} for o in options]


def _value(v: Any) -> str:
    """An option's value as config.json writes it (a user init as module:function)."""
    if callable(v):
        return f"{v.__module__}:{v.__qualname__}"
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


NOT_APPLICABLE = "–"  # a derived option that does not apply to a configuration (no BN: no BN layers)


def _options_tables(meta: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame | None, list[str]]:
    """The options every configuration shares (one row each), the table of
    what differs between configurations (the varied options, then any option
    that follows from them, e.g. ``bn_layers`` from ``bn_count``, per
    configuration), and the names of those derived options."""
    configs = meta["configs"]
    options = _as_shapes([c["options"] for c in configs])
    varied = varied_values(configs)
    keys = list(dict.fromkeys(k for o in options for k in o))
    common, derived = [], []
    for k in keys:
        if k in varied.columns:
            continue
        present = [_value(o[k]) for o in options if k in o]
        if len(set(present)) == 1:
            common.append((k, present[0] + (" (where it applies)" if len(present) < len(options) else "")))
        else:
            derived.append(k)
    table = pd.DataFrame([(lit_code(f"--{k.replace('_', '-')}"), lit(v)) for k, v in common],
                         columns=["option", "value"])
    if varied.empty and not derived:
        return table, None, []
    compared = pd.DataFrame({"configuration": [lit(c["label"]) for c in configs]})
    for k in varied.columns:
        compared[lit(k)] = [lit(_value(v) if v is not None else _value(o[k]) if o.get(k) is not None
                                else NOT_APPLICABLE) for v, o in zip(varied[k], options)]
    for k in derived:
        compared[lit(k)] = [lit(_value(o[k]) if k in o else NOT_APPLICABLE) for o in options]
    return table, compared, derived


def _shape(configs: Sequence[dict[str, Any]]) -> str:
    """The network's shape in words, across configurations that compare depths or widths."""
    shapes = [tuple(c["options"].get("widths", ())) for c in configs]
    if not all(shapes):
        return "a network"
    if all(len(set(s)) == 1 for s in shapes):
        depths = list(dict.fromkeys(len(s) - 1 for s in shapes))
        widths = list(dict.fromkeys(s[0] for s in shapes))
        unit = "residual blocks" if any("residual" in c["options"] for c in configs) else "layers"
        return f"{_or(depths)} {unit} of width {_or(widths)}"
    if len(set(shapes)) == 1:
        if any("residual" in c["options"] for c in configs):  # stages: widths and their blocks
            stages = [(w, sum(1 for _ in g)) for w, g in itertools.groupby(shapes[0][1:])]
            return "residual blocks in stages " + ", ".join(f"{b} x width {w}" for w, b in stages)
        return f"a {'-'.join(map(str, shapes[0]))} network"
    return "networks of several shapes"


def default_title(meta: dict[str, Any]) -> str:
    """What was run, in one sentence (user strings in literal spans)."""
    configs = meta["configs"]
    shape = _shape(configs)
    if len(configs) == 1:
        return f"varprop: {shape}, {lit(configs[0]['label'])}"
    keys = list(dict.fromkeys(k for c in configs for k in c["varied"]))
    if len(configs) <= 3:
        return f"varprop: {shape}, {' vs '.join(lit(c['label']) for c in configs)}"
    return f"varprop: {shape}, {len(configs)} configurations ({' x '.join(lit(k.replace('_', ' ')) for k in keys)})"


def theory_gaps(layers: pd.DataFrame, summary: pd.DataFrame, labels: Sequence[str], unit: str = "layer"
                ) -> list[str]:
    """Configurations whose mean-field output std lies outside the range of
    their single networks (replicates), each with the theory, its ratio to
    the mean network and that range, the farthest first."""
    if "theory_post_log10_std" not in summary:
        return []
    out = []
    for config in labels:
        s = summary[summary["config"] == config]
        last = s["layer"].iloc[-1]
        theory, mean = float(s["theory_post_log10_std"].iloc[-1]), float(s["post_log10_rms_std"].iloc[-1])
        reps = layers.loc[(layers["config"] == config) & (layers["layer"] == last), "post_log10_std"]
        lo, hi = float(reps.min()), float(reps.max())
        if not math.isfinite(theory) or not (theory < lo or theory > hi):
            continue
        out.append((-abs(mean - theory), f"**{lit(config)}**: theory {fmt_std(theory)}, x{fmt_std(theory - mean)} "
                                         f"the mean network ({fmt_std(mean)}); single networks {fmt_std(lo)} to "
                                         f"{fmt_std(hi)} at {unit} {last}"))
    return [line for _, line in sorted(out, key=lambda t: t[0])]  # the farthest first


def build_document(run: Run, figure: str, histograms: str | None = None) -> Document:
    """The simulate report of ``run`` as a :class:`Document` (rendered to Markdown and HTML)."""
    layers, summary, meta = run.layers, run.summary, run.meta
    configs = meta["configs"]
    reps = int(layers["replicate"].nunique())
    labels = [c["label"] for c in configs]
    unit = row_unit(layers)
    title = lit(meta["title"]) if meta.get("title") else default_title(meta)
    doc = Document(title)
    if meta.get("command"):
        doc.p("Reproduce with:")
        doc.code(shell_visible(meta["command"]))
    v = meta["versions"]
    doc.p(f"varprop {lit(v['varprop'])}, numpy {lit(v['numpy'])}, Python {lit(v['python'])}; seed {lit(meta['seed'])}"
          + (f"; simulation time {meta['elapsed_s']:.1f} s." if meta.get("elapsed_s") is not None else "."))

    doc.h2("Findings")
    found = findings(run)
    if "branch_second_moment" in layers:  # residual stacks: branches switched off, under their verdict
        from . import residual

        grouped: dict[str, list[str]] = {}  # verdicts grouped over many configurations: a line per finding
        for config, text in residual.findings(run):
            head = f"**{lit(config)}**"
            at = next((i for i, item in enumerate(found) if (item if isinstance(item, str) else item[0])
                       .startswith(head + ":")), None)
            if at is None:
                grouped.setdefault(text, []).append(head)
            else:
                item = found[at]
                found[at] = (item, [text]) if isinstance(item, str) else (item[0], [*item[1], text])
        for text, heads in grouped.items():
            names = (f"In all {len(heads)} configurations" if len(heads) == len(labels) else ", ".join(heads)
                     if len(heads) <= 4 else f"{len(heads)} configurations ({', '.join(heads[:3])}, ...)")
            found.append(f"{names}: {text}.")
    doc.items(found)
    doc.p(as_rows(FINDINGS_RULES, unit))

    doc.h2("Summary")
    lines = seed_line(layers)
    slopes = depth_growth(layers).set_index("config")
    spans = {(int(slopes.at[c, "burn_in"]), int(slopes.at[c, "depth"])) for c in labels}
    slope_head = as_rows("log10 std per layer" + (" (layers {}..{})".format(*next(iter(spans))) if len(spans) == 1
                                                  else ""), unit)
    rows = []
    for config in labels:
        s = summary[summary["config"] == config]
        sign, log10_mean, log10_rms = lines[config]
        rows.append({
            "configuration": lit(config),
            "mean of layer means": fmt_signed(sign, log10_mean),
            "sqrt(mean layer variance)": fmt_std(log10_rms),
            "output std (last layer)": fmt_std(s["post_log10_rms_std"].iloc[-1]),
        })
        if reps > 1:
            last = layers.loc[(layers["config"] == config) & (layers["layer"] == s["layer"].iloc[-1]), "post_log10_std"]
            rows[-1][f"single networks (range over {reps})"] = f"{fmt_std(last.min())} to {fmt_std(last.max())}"
        rows[-1]["std factor per layer"] = fmt(growth(s, "post_log10_rms_std"))
        if "theory_post_log10_std" in s:
            rows[-1]["mean-field output std"] = fmt_std(s["theory_post_log10_std"].iloc[-1])
        g = slopes.loc[config]
        ci = f" ± {fmt(g['slope_hi'] - g['slope'], 3)}" if not math.isnan(g["slope_hi"]) else ""
        where = "" if len(spans) == 1 else f" ({unit}s {int(g['burn_in'])}..{int(g['depth'])})"
        rows[-1][slope_head] = f"{fmt(g['slope'])}{ci}{where}"
        rows[-1]["mean-field log10 std per layer"] = fmt(g["theory_slope"])
        if "grad_log10_rms_std" in s:
            rows[-1]["input gradient std"] = fmt_std(s["grad_log10_rms_std"].iloc[0])
            rows[-1]["gradient factor per layer (backward)"] = fmt(1 / growth(s, "grad_log10_rms_std"))
    doc.table(pd.DataFrame(rows).rename(columns=lambda c: as_rows(c, unit)))
    explain = [
        "*mean of layer means*, *sqrt(mean layer variance)*: the seed answer's summary of a stack: the mean over "
        "layers 1..L of each layer's output mean, and the square root of the mean over layers of each layer's "
        "output variance" + (f" (pooled over {reps} replicates);" if reps > 1 else ";"),
        "*output std (last layer)*: the std of the network's output, the mean network over replicates"
        + ("; *single networks*: the lowest and highest output std of the replicates, each one network;"
           if reps > 1 else ";"),
        "*std factor per layer*: (output std / input std) ** (1 / L), the geometric-mean growth per layer;",
        *(["*mean-field output std*: the theory's prediction of the output std, the limit of infinite width at "
           "this depth;"] if "theory_post_log10_std" in summary else []),
        "*log10 std per layer*: measured on each replicate between the stated layers (the first layers are a "
        "burn-in) and averaged" + (", ± the half-width of its 95% t interval over replicates" if reps > 1 else
                                   "; one replicate gives no interval (use `--replicates`)")
        + "; *mean-field log10 std per layer*: the theory's over the same layers;",
    ]
    if "grad_log10_std" in layers:
        explain += ["*input gradient std*: the std of the gradient that reaches the input, for a unit-variance "
                    "random gradient at the output;",
                    "*gradient factor per layer*: its geometric-mean growth per layer going backward."]
    doc.items([as_rows(e, unit) for e in explain])
    gaps = theory_gaps(layers, summary, labels, unit) if reps > 1 else []
    if gaps:
        doc.p(f"Mean-field theory is the limit of infinite width at fixed depth (for a linear stack it is also the "
              "exact mean of the variance over all networks, a mean that a deep stack owes to networks too rare to "
              f"draw). At the output it lies outside the range of the {reps} single networks drawn in {len(gaps)} "
              f"configuration{'s' if len(gaps) > 1 else ''}, below, the farthest first. There the theory does not "
              "describe networks of this width at this depth (finite-width fluctuations compound over depth, and "
              "the theory leaves out what it does not model, such as batch statistics or orthogonal weights): the "
              "range of single networks (the shaded band of the std figure) is what to read, not the theory line. "
              "A value at the median of single "
              f"networks falls outside the range of {reps} of them with probability 2^(1 - {reps}) = "
              f"{2.0 ** (1 - reps):.2g}, so with few replicates a theory just outside the range can be chance; "
              "one far outside it is not.")
        doc.items(gaps)

    doc.h2("Configuration")
    common, compared, derived = _options_tables(meta)
    doc.table(common)
    if compared is not None:
        doc.p("Compared:")
        doc.table(compared)
        if derived:
            doc.p(f"{' and '.join(lit(k) for k in derived)} follow{'s' if len(derived) == 1 else ''} from the "
                  f"compared options, so {'it differs' if len(derived) == 1 else 'they differ'} per configuration "
                  f"({NOT_APPLICABLE}: does not apply).")

    doc.h2(as_rows("Std per layer", unit))
    doc.figure(figure, as_rows("Std of each layer's output" + (" and gradient" if "grad_log10_std" in layers else "")
                               + " per layer, one line per configuration; dotted: mean-field theory", unit))
    if unit == "block":
        doc.p("The dotted line is the residual recursion's prediction (section Residual blocks: where it is exact "
              "at any width and where it is an infinite-width limit)"
              + (": the shaded range of the replicates is the finite-width band to read against it."
                 if reps > 1 else "; with one replicate there is no range to read it against (use "
                 "`--replicates`)."))
    else:
        doc.p("The dotted line is the mean-field prediction: z = h W + b is Gaussian given the previous layer, with "
              "variance q_l = fan_in Var(W) E[h_{l-1}^2] + Var(b), and h_l = phi(z). It is the limit of infinite "
              "width at fixed depth. For linear stacks it is also the mean over networks of the variance (the "
              "solid line) at any width. Otherwise each layer's finite width adds a fluctuation of relative size "
              "about 1/sqrt(width) and a bias of order 1/width, and over depth they compound (by a random factor "
              "per layer)"
              + (": where the shaded range of the replicates leaves the dotted line, networks of this width no "
                 "longer follow the theory at that depth, and that range is the finite-width band to read."
                 if reps > 1 else
                 "; with one replicate there is no range to read the difference against (use `--replicates`)."))
    if "theory_post_log10_std_lo" in layers and layers["theory_post_log10_std_lo"].notna().any():
        doc.p("For Gaussian linear and relu stacks without bias, the sparse dotted pair bounds 95% of single "
              "networks by the exact finite-width law: each layer multiplies |h|^2 by fan_in Var(W) chi2_n / n "
              "(relu: chi2_K / n with K ~ Binomial(n, 1/2) active units), independently. Exact for one sample "
              "and for a stack collapsed to rank one (deep layers); too wide in the first layers when many "
              "samples keep the layer full rank.")
    if any(c["options"].get("bn_layers") for c in configs):
        doc.p("With batch norm the forward prediction uses the normalized variance q / (q + eps) on BN layers; "
              "mean-field theory of gradients through BN (and of correlations after BN) is not modelled, so "
              "those theory columns are empty below the first BN layer met.")
    if reps > 1:
        doc.p(as_rows("Two summaries of the same replicates. The **mean network** (solid line, `post std` below) is "
                      "the square root of the variance averaged over replicates: what mean-field theory predicts. The "
                      "**typical network** (dashed, `typical post std`) is the geometric mean, 10 to the mean of "
                      "log10 std: what one network drawn at random looks like. At finite width each layer "
                      "multiplies the variance by a random factor, so log std performs a random walk: the spread "
                      "grows with depth/width and, by Jensen's inequality, the typical network sits below the mean "
                      "one even when the mean is preserved exactly. Where the spread covers decades, the mean "
                      "network is set by the largest replicates alone.", unit))

    doc.h2("Means, channels and correlations")
    if unit == "block":  # the channel statistics are the signal-propagation plot's, in "Residual blocks"
        doc.figure("means_per_layer.png", "Mean of the stream per block (its average squared channel mean and "
                   "average channel variance: the signal-propagation plot, under Residual blocks)")
        doc.p("A mean that reaches far beyond 1 is drawn on a scale linear within ±1 and logarithmic beyond, so "
              "that its sign and size both show beside means near 0.")
    else:
        doc.figure("means_per_layer.png", "Mean of the layer outputs (dotted: the theory's), average squared unit "
                   "mean and average unit variance per layer")
        doc.p("A layer whose units carry a mean (relu, sigmoid, softplus) shows it in the average squared unit "
              "mean; the average unit variance is what is left for the signal to vary with across samples. A mean "
              "that reaches far beyond 1 is drawn on a scale linear within ±1 and logarithmic beyond, so that "
              "its sign and size both show beside means near 0.")
    doc.figure("correlation_per_layer.png", as_rows("Cosine similarity between samples per layer, with the c-map's "
                                                    "prediction of the signed mean (dotted; the mean |cos| has none)",
                                                    unit))
    widths = sorted({int(w) for w in layers.loc[layers["layer"] == 0, "width"].dropna()})[:3]
    doc.p("When the cosine similarity climbs to 1 every input is mapped to the same direction and the network can "
          "no longer tell its inputs apart (correlation collapse, the ordered phase); the dotted line is the "
          "mean-field c-map. The signed mean can average a collapse onto +-v away; the mean |cos| cannot. For "
          "independent random directions in n dimensions it is about sqrt(2 / (pi n)) (the input's: "
          + ", ".join(f"{math.sqrt(2 / (math.pi * n)):.3f} at n = {n}" for n in widths) + "). An activation whose "
          "output has a mean (relu, sigmoid, softplus) lifts it at once to about E[phi]^2 / E[phi^2] (relu: 1/pi = "
          "0.32), and its c-map then draws correlations towards 1 with depth. Where the c-map holds them (linear, "
          "tanh, selu), the mean |cos| of a deep stack still climbs at finite width: a product of many random "
          "matrices stretches a few directions far more than the others, and the inputs drift towards them "
          "(infinite width, the theory's limit, keeps them apart). The findings call it a collapse from 0.9.")

    if histograms:
        doc.figure(histograms, as_rows("Histograms of the layer outputs at the first, middle and last layer", unit))
        doc.p(as_rows("The shape of each layer's output distribution, in units of its RMS: a spike at 0 is dead relu "
                      "units, mass piling at the edges is saturation, and a Gaussian bell is a healthy linear regime. "
                      "Replicate 0 only" + _histograms_shown(run.histograms, len(configs)), unit))

    doc.h2(as_rows("Per-layer statistics", unit))
    depths = summary.groupby("config", sort=False)["layer"].max()
    if depths.max() > MAX_FULL_LAYERS:
        doc.p(as_rows(f"A subsample of the {int(depths.max()) + 1} layers; `layers.csv` has every layer and replicate."
                      if depths.nunique() == 1 else
                      "Configurations deeper than 30 layers show a subsample of their layers; `layers.csv` has every "
                      "layer and replicate.", unit))
    logs = log_scale_stats(layers)
    for config in labels:
        if len(labels) > 1:
            doc.h3(lit(config))
        doc.table(layer_table(summary, config, reps, logs).rename(columns={"layer": unit}))
    notes = [
        "`pre std`: the std of z = h W + b entering the activation; `post`: the layer's output h (layer 0 is the "
        "input); `post mean`: its mean over samples and units (over replicates too), exact at any magnitude;"
        if unit == "layer" else
        "`pre std`: the std of alpha f, what the block's branch adds; `post`: the block's output, the stream x_l "
        "(block 0 is the input); `post mean`: its mean over samples and units (over replicates too), exact at any "
        "magnitude;",
        "`zeros`: the fraction of exact zeros of h; `saturated`: the fraction of units with |phi'(z)| < 1e-3 "
        "(for relu the units with z < 0, the zeros of h unless batch norm after the activation shifts them);",
        "`cos sim`: the mean cosine similarity between pairs of samples (1: every input maps to the same "
        "direction); `abs cos sim`: the mean of its absolute value over pairs of the first 128 samples, which also "
        "shows a collapse onto +-one direction that the signed mean averages away;",
        "`theory post std`: the mean-field prediction of `post std` (infinite width)" + (
            "; `theory in 95% CI`: whether "
            "the predicted second moment lies in the 95% t interval of the measured one over replicates"
            + (f"; with {BELOW_ALL_REPLICATES} replicates or more, a prediction below every single network is a "
               "**no** whatever the interval, which one network far above the others widens (all k networks lie "
               "above the mean they are drawn from with chance 2^-k or less when, as usual, their spread is skewed "
               "upwards)" if reps >= BELOW_ALL_REPLICATES else "")
            + ". A **no** says the two differ beyond sampling error at that layer: one in twenty layers is "
            "expected by chance, a run of them is a real difference (finite width compounding over depth, or what "
            "the theory does not model, such as orthogonal weights or batch statistics);"
            if reps > 1 else " (one replicate: no interval to hold it to);"),
        "every column is exact at any magnitude: values beyond float64 are carried by their log10.",
    ]
    if "grad_log10_std" in layers:
        notes.insert(0, "backward pass: a random gradient g_L ~ N(0, 1) enters at the output and is propagated "
                     "down through the activations, batch norm (with its full batch Jacobian) and W^T; `grad std` "
                     "is the std of the gradient with respect to layer l's output (layer 0: the input); `weight "
                     "grad norm` is the Frobenius norm of h_{l-1}^T delta_l, the gradient of layer l's weights "
                     "summed over all samples;" if unit == "layer" else
                     "backward pass: a random gradient g_L ~ N(0, 1) enters at the output and is propagated "
                     "down through the skips and the branches (activations, batch norm with its full batch "
                     "Jacobian, W^T); `grad std` is the std of the gradient with respect to block l's output "
                     "(block 0: the input); `weight grad norm` is the Frobenius norm of the gradient of all block "
                     "l's weights, summed over all samples;")
    doc.items([as_rows(n, unit) for n in notes])
    return doc


# Up to this many configurations get a finding each; beyond, findings are grouped (as the figures turn
# into small multiples).
FINDINGS_PER_CONFIG = 8

FINDINGS_RULES = (
    "One verdict per configuration: *healthy* when every check passes, else the worst problem found, with any "
    "others under it and then the std's (and the gradient's) own numbers. The checks, worst first: the std "
    "leaves [1e-3, 1e3] x the input's (the signal explodes: the mean network's std rises above 1e3 x the "
    "input's; or dies: the median network's falls below 1e-3 x); the input signal is lost (the variance across "
    "samples falls below 1e-6 of the layer's: every input gives nearly the same output); the input gradient's "
    "std leaves [1e-3, 1e3] x the output's "
    "(gradients explode or vanish); over half the last layer's units are saturated (|phi'| < 1e-3); the "
    "inputs collapse onto one direction (mean |cos| between samples above 0.9 at the last layer).")


def _problems(a: Assessment, unit: str = "layer") -> list[tuple[str, str]]:
    """(kind, sentence) of each problem ``a`` has, worst first; ``unit``: what a row is (:func:`as_rows`)."""
    sentences = {
        "explodes": lambda: f"the signal explodes at layer {a.explodes_at}: its std rises above 1e3 x the input's "
                            f"(x{fmt_std(a.rel)} at layer {a.depth}; x{fmt(a.growth, 3)} per layer)",
        "dies": lambda: _dies(a),
        "signal lost": lambda: f"the input signal is lost from layer {a.signal_lost}: the variance across samples is "
                               f"x{fmt_std(a.signal_frac)} the layer's variance at layer {a.depth} (every input gives "
                               "nearly the same output; the std left is each unit's fixed offset)",
        "gradients explode": lambda: f"gradients explode: the input gradient is x{fmt_std(a.grad)} the output's "
                                     "(beyond [1e-3, 1e3])",
        "saturated": lambda: f"{a.saturated:.0%} of the last layer's units are saturated (|phi'| < 1e-3)",
        "collapse": lambda: ("the inputs collapse onto one direction"
                             + (f" from layer {a.collapse_from}" if a.collapse_from not in (None, a.depth) else "")
                             + f" (mean |cos| between samples {a.collapse:.3f} at layer {a.depth})"),
    }
    sentences["gradients vanish"] = lambda: sentences["gradients explode"]().replace("explode", "vanish", 2)
    return [(kind, as_rows(sentences[kind](), unit)) for kind in a.problems]


def _dies(a: Assessment) -> str:
    """The "dies" sentence: the median network's numbers (the mean network's when only it fell below), and
    the mean network's too where a few networks keep it more than a decade above the median one."""
    median = a.median_rel < -STD_BAND
    rel = a.median_rel if median else a.rel
    per = f"; x{fmt(10 ** (rel / a.depth), 3)} per layer" if math.isfinite(rel) else ""
    spread = (f"; the mean network's is x{fmt_std(a.rel)}: a few networks keep far more"
              if median and a.rel - a.median_rel > 1 else "")
    return (f"the signal dies at layer {a.dies_at}: the {'median' if median else 'mean'} network's std falls below "
            f"1e-3 x the input's (x{fmt_std(rel)} at layer {a.depth}{per}{spread})")


def _std_fact(f: Assessment, unit: str = "layer") -> str:
    return f"output std x{fmt(10 ** f.rel, 3)} the input's, x{fmt(f.growth, 4)} per {unit}"  # 4: 1.005 is not 1


def _grad_fact(f: Assessment) -> str | None:
    return None if f.grad is None else f"the input gradient is x{fmt_std(f.grad)} the output's"


def findings(run: Run) -> list[Item]:
    """One verdict per configuration: healthy, or the worst problem found
    (the std leaves [1e-3, 1e3] x the input's, the input signal is lost,
    gradients explode or vanish, saturation, collapse onto one direction),
    with its other problems as sub-items; or, beyond
    :data:`FINDINGS_PER_CONFIG` configurations, one line per verdict naming
    the configurations that have it."""
    facts = assess(run)
    unit = row_unit(run.layers)
    if len(facts) > FINDINGS_PER_CONFIG:
        return _grouped_findings(facts, unit)
    out: list[Item] = []
    for f in facts:
        problems = _problems(f, unit)
        grad = _grad_fact(f)
        if not problems:
            out.append(f"**{lit(f.label)}**: healthy through {f.depth} {unit}s ({_std_fact(f, unit)}"
                       + (f"; {grad}" if grad else "") + ").")
            continue
        subs = [p for _, p in problems[1:]]
        if problems[0][0] not in ("explodes", "dies"):
            subs.append(f"the std stays within [1e-3, 1e3] x the input's: {_std_fact(f, unit)}")
        if grad and not any(k.startswith("gradients") for k, _ in problems):
            subs.append(grad)
        out.append((f"**{lit(f.label)}**: {problems[0][1]}.", subs))
    return out


def _part(key: str, value: Any) -> str:
    """:func:`label_part`, with "none" for an empty list (``bn_layers=none``)."""
    text = label_part(key, value)
    return text + "none" if text.endswith("=") else text


def describe(subset: list[Assessment], every: list[Assessment], most: int = 6) -> str:
    """The configurations of ``subset`` in few words, given all of them: an option along which the subset
    holds every configuration there is (two at least) is written "any <option>", the rest as
    ``label_part`` values, those of the option that varies most joined by "/" ("sigmoid,
    bn_count=0/1/2/3 (any batch_size)"); configurations without the same varied options, by label.
    Labels and values are literal spans (:func:`~varprop.report.document.plain` reads them)."""
    count = f"{len(subset)} configuration{'s' if len(subset) != 1 else ''}"
    if len(subset) == len(every):
        return f"all {len(every)} configurations"
    keys = list(dict.fromkeys(k for f in every for k in f.varied))
    if not keys or any(set(f.varied) != set(keys) for f in every):
        labels = [lit(f.label) for f in subset]
        more = f"; and {len(labels) - most} more" if len(labels) > most else ""
        return f"{count}: {'; '.join(labels[:most])}{more}"
    present = {tuple(_hashable(f.varied[k]) for k in keys) for f in subset}
    existing = {tuple(_hashable(f.varied[k]) for k in keys) for f in every}
    free = []
    for i, key in enumerate(keys):
        def siblings(p: tuple[Any, ...]) -> list[tuple[Any, ...]]:
            return [t for t in existing if t[:i] + t[i + 1:] == p[:i] + p[i + 1:]]
        if all(len(siblings(p)) >= 2 and all(t in present for t in siblings(p)) for p in present):
            free.append(key)
    rest = [k for k in keys if k not in free]
    if rest:  # join the values of the option that varies most within the subset
        spread = {k: len({repr(f.varied[k]) for f in subset}) for k in rest}
        last = max(reversed(rest), key=spread.__getitem__)
        rest = [k for k in rest if k != last] + [last]
    groups: dict[tuple[Any, ...], list[Any]] = {}
    for f in subset:
        head = tuple(_hashable(f.varied[k]) for k in rest[:-1])
        value = _hashable(f.varied[rest[-1]]) if rest else None
        if value not in groups.setdefault(head, []):
            groups[head].append(value)
    parts = []
    for head, values in groups.items():
        words = [lit(_part(k, v)) for k, v in zip(rest[:-1], head)]
        if rest:
            tail = [_part(rest[-1], v) for v in values]
            prefix = f"{rest[-1]}=" if all(t.startswith(f"{rest[-1]}=") for t in tail) else ""
            words.append(lit(prefix + "/".join(t[len(prefix):] for t in tail)))
        parts.append(", ".join(words))
    text = "; ".join(parts[:most]) + (f"; and {len(parts) - most} more such groups" if len(parts) > most else "")
    return f"{count}: {text}" + (f" (any {', '.join(lit(k) for k in free)})" if free else "")


def _span(facts: list[Assessment], value: Any, show: Any) -> str | None:
    """"x<low> (<its configuration>) to x<high> (<its>)", or one value when they agree to 3 digits; None
    when no configuration has a finite value."""
    ordered = sorted((f for f in facts if math.isfinite(value(f))), key=value)
    if not ordered:
        return None
    low, high = show(value(ordered[0])), show(value(ordered[-1]))
    if low == high:
        return f"x{low}"
    return f"x{low} ({lit(ordered[0].label)}) to x{high} ({lit(ordered[-1].label)})"


# How a verdict, and the same problem under another verdict, read in grouped findings.
_VERDICT = {
    "explodes": "**The signal explodes** (its std rises above 1e3 x the input's)",
    "dies": "**The signal dies** (the median network's std falls below 1e-3 x the input's)",
    "signal lost": "**The input signal is lost** (the variance across samples falls below 1e-6 of the layer's: "
                   "every input gives nearly the same output)",
    "gradients explode": "**Gradients explode** (the input gradient's std beyond 1e3 x the output's)",
    "gradients vanish": "**Gradients vanish** (the input gradient's std below 1e-3 x the output's)",
    "saturated": "**Saturated** (over half the last layer's units with |phi'| < 1e-3)",
    "collapse": "**The inputs collapse onto one direction** (mean |cos| between samples above 0.9 at the last "
                "layer)",
}
_ALSO = {"explodes": "the signal also explodes", "dies": "the signal also dies",
         "signal lost": "the input signal is also lost", "gradients explode": "gradients also explode",
         "gradients vanish": "gradients also vanish", "saturated": "also saturated",
         "collapse": "the inputs also collapse onto one direction"}


def _collapse_from(group: list[Assessment], unit: str) -> str:
    """`` from layer 17`` (``s 12 to 17``): where the collapse of ``group``'s configurations sets in."""
    at = sorted(f.collapse_from for f in group if f.collapse_from is not None and f.collapse_from < f.depth)
    if not at:
        return ""
    last_only = len(group) - len(at)  # above 0.9 at their last layer alone
    return (f" from {unit} {at[0]}" if at[0] == at[-1] else f" from {unit}s {at[0]} to {at[-1]}") + (
        f" (in {last_only} at the last {unit} only)" if last_only else "")


def _grouped_findings(facts: list[Assessment], unit: str = "layer") -> list[Item]:
    out: list[Item] = []
    depths = {f.depth for f in facts}
    through = f"through {depths.pop()} {unit}s" if len(depths) == 1 else f"through their last {unit}"
    problems = {f.label: _problems(f, unit) for f in facts}
    healthy = [f for f in facts if not problems[f.label]]
    if healthy:
        span = _span(healthy, lambda f: f.rel, lambda v: fmt(10 ** v, 3))
        out.append(f"**Healthy** {through} in {describe(healthy, facts)}."
                   + (f" Their output std is {span} the input's." if span else ""))
    for kind in PROBLEMS:
        group = [f for f in facts if problems[f.label] and problems[f.label][0][0] == kind]
        if not group:
            continue
        line = as_rows(_VERDICT[kind], unit)
        if kind in ("explodes", "dies", "signal lost"):
            at = sorted({"explodes": f.explodes_at, "dies": f.dies_at, "signal lost": f.signal_lost}[kind]
                        for f in group)
            line += (" at" if kind != "signal lost" else " from") + (
                f" {unit} {at[0]}" if at[0] == at[-1] else f" {unit}s {at[0]} to {at[-1]}")
        elif kind == "collapse":
            line += _collapse_from(group, unit)
        subs = []
        for other in PROBLEMS:
            also = [f for f in group if other in [k for k, _ in problems[f.label][1:]]]
            if also:
                subs.append(f"of these, {_ALSO[other]}{_collapse_from(also, unit) if other == 'collapse' else ''} "
                            f"in {describe(also, facts)}")
        out.append((f"{line} in {describe(group, facts)}.", subs))
    span = _span(facts, lambda f: f.growth, lambda v: fmt(v, 3))
    if span:
        out.append(f"**Std per {unit}** {span}.")
    span = _span([f for f in facts if f.grad is not None], lambda f: f.grad, fmt_std)
    if span:
        out.append(f"**The input gradient** is {span} the output's.")
    return out


def fit_document(points: pd.DataFrame, result: Any, command: str, figure: str) -> Document:
    """The report of a ``varprop fit`` run."""
    per = points.groupby("fan_in").agg(mean=("log10_std", "mean"), sd=("log10_std", "std"),
                                       theory=("theory_log10_std", "first")).reset_index()
    table = pd.DataFrame({
        "fan_in": per["fan_in"].astype(str),
        "measured std (geometric mean)": [fmt(10**v) for v in per["mean"]],
        "sd of log10 std": [fmt(v, 3) for v in per["sd"]],
        "mean-field std": [fmt(10**v) for v in per["theory"]],
    })
    ok = per["theory"].notna()
    slope_theory = line_fit(np.log10(per["fan_in"][ok]), per["theory"][ok]).slope if ok.sum() >= 2 else math.nan
    doc = Document("varprop: the sqrt(fan_in) law")
    doc.p("Reproduce with:")
    doc.code(command)
    doc.p("One layer y = x W is measured for each fan_in; every replicate (an independent W and input) is a point "
          "of the least-squares fit `log10 std = a + b log10 fan_in`.")
    doc.h2("Fit")
    doc.items([
        f"**b = {result.slope:.4f} ± {result.slope_se:.4f}** (standard error), 95% interval "
        f"[{result.slope_lo:.4f}, {result.slope_hi:.4f}] from Student's t with {result.dof} degrees of freedom "
        "(the spread of the slopes fitted to each replicate: points of one replicate share its random draws);",
        f"a = {result.intercept:.4f} ± {result.intercept_se:.4f}; R² = {result.r2:.5f};",
        f"the mean-field prediction's slope over the same fan-ins is {slope_theory:.4f} (0.5 for N(0, 1) weights: "
        "a sum of fan_in unit-variance products has std sqrt(fan_in); 0 for weights scaled by 1/sqrt(fan_in)).",
    ])
    doc.figure(figure, "One layer's output std against fan_in (log-log): points, fitted line, mean-field line")
    doc.h2("Points")
    doc.table(table)
    doc.p("Residuals of the fit (log10): " + ", ".join(f"{r:+.4f}" for r in result.residuals[:60])
          + (" ..." if len(result.residuals) > 60 else ""))
    return doc

"""The Markdown report and the terminal table, from the per-layer data."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..fit import depth_growth, line_fit
from ..spec import label_part
from ..stats import log10_mean_pow10
from .document import Document

MAX_FULL_LAYERS = 30  # tables show every layer up to this depth, then a subsample
SUBSAMPLE = 20


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
    """A number for a table; overflowed values say so instead of printing inf."""
    if x is None or x is pd.NA:
        return ""
    x = float(x)
    if math.isnan(x):
        return ""
    if math.isinf(x):
        return "overflow" if x > 0 else "-overflow"
    return f"{x:.{digits}g}"


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
    """A std given by its log10: plain when moderate, else via :func:`fmt_pow10`."""
    return fmt_pow10(log10, 4) if math.isfinite(log10) and abs(log10) >= 5 else fmt(10.0**log10 if math.isfinite(log10) else 0.0)


def seed_line(layers: pd.DataFrame) -> dict[str, tuple[float, float]]:
    """Per config, the seed answer's summary over layers 1..L (pooled over
    replicates): the mean of the layer means and log10 of the square root of
    the mean of the layer variances."""
    out = {}
    for config, g in layers[layers["layer"] > 0].groupby("config", sort=False):
        mean = float(g["post_mean"].mean())
        log10_rms = 0.5 * log10_mean_pow10(g["post_log10_std"].to_numpy(), 2.0)
        out[config] = (mean, log10_rms)
    return out


def _growth(s: pd.DataFrame, col: str) -> float:
    """Geometric-mean factor per layer between the input and the last layer."""
    first, last = s[col].iloc[0], s[col].iloc[-1]
    depth = s["layer"].iloc[-1] - s["layer"].iloc[0]
    return 10 ** ((last - first) / depth) if depth and math.isfinite(last - first) else math.nan


def layer_table(summary: pd.DataFrame, config: str, replicates: int) -> pd.DataFrame:
    s = summary[summary["config"] == config].set_index("layer")
    s = s.loc[[layer for layer in shown_layers(int(s.index.max())) if layer in s.index]]
    table = pd.DataFrame({"layer": s.index})
    table["pre std"] = [fmt_std(v) if not math.isnan(v) else "" for v in s["pre_log10_rms_std"]]
    table["post mean"] = [fmt(v) for v in s["post_mean"]]
    table["post std"] = [fmt_std(v) for v in s["post_log10_rms_std"]]
    if replicates > 1:
        table["typical post std"] = [fmt_std(v) for v in s["post_log10_typical_std"]]
        table["post second moment [95% CI]"] = [
            f"{fmt(m)} [{fmt(lo)}, {fmt(hi)}]" if not math.isnan(lo) else fmt(m)
            for m, lo, hi in zip(s["post_second_moment"], s["post_second_moment_lo"], s["post_second_moment_hi"])]
    if "theory_post_log10_std" in s:
        table["theory post std"] = [fmt_std(v) for v in s["theory_post_log10_std"]]
        table["measured / theory"] = [fmt(10 ** (m - t), 3) for m, t in
                                      zip(s["post_log10_rms_std"], s["theory_post_log10_std"])]
        if replicates > 1:
            table["theory in 95% CI"] = [_inside(t, lo, hi) for t, lo, hi in zip(
                s["theory_post_second_moment"], s["post_second_moment_lo"], s["post_second_moment_hi"])]
    if "grad_log10_std" in s:
        table["grad std"] = [fmt_std(v) for v in s["grad_log10_rms_std"]]
        table["weight grad norm"] = [fmt_std(v) if not math.isnan(v) else "" for v in
                                     s["weight_grad_log10_norm"]]
    table["zeros"] = [fmt(v, 3) for v in s["post_frac_zero"]]
    table["saturated"] = [fmt(v, 3) for v in s["post_frac_saturated"]]
    table["cos sim"] = [fmt(v, 3) for v in s["post_cos_sim"]]
    table["abs cos sim"] = [fmt(v, 3) for v in s["post_abs_cos_sim"]]
    return table


def _inside(value: float, lo: float, hi: float) -> str:
    """'yes' / '**no**' for a prediction against a replicate interval ('' if undefined)."""
    if any(map(math.isnan, (value, lo, hi))) or math.isinf(value):
        return ""
    return "yes" if lo <= value <= hi else "**no**"


def terminal_table(layers: pd.DataFrame, summary: pd.DataFrame) -> str:
    """A compact per-layer table for the terminal: mean and std of the layer
    output for one configuration, the std of each for a comparison."""
    configs = list(summary["config"].unique())
    reps = int(layers["replicate"].nunique())
    if len(configs) == 1:
        cols = ["layer", "post mean", "post std"] + (["typical post std"] if reps > 1 else [])
        t = layer_table(summary, configs[0], reps)[cols]
        title = configs[0]
    elif len(configs) <= 4:
        t = pd.DataFrame({"layer": layer_table(summary, configs[0], reps)["layer"]})
        for config in configs:
            t[config] = layer_table(summary, config, reps)["post std"].to_numpy()
        title = "std of each layer's output" + (" (mean network)" if reps > 1 else "")
    else:  # many configurations: one row each, a few layers as columns
        layers = layer_table(summary, configs[0], reps)["layer"].tolist()
        keep = [layers[i] for i in sorted({round(j) for j in np.linspace(0, len(layers) - 1, min(8, len(layers)))})]
        rows = []
        for config in configs:
            t = layer_table(summary, config, reps).set_index("layer")["post std"]
            rows.append({"configuration": config, **{f"layer {layer}": t[layer] for layer in keep}})
        t = pd.DataFrame(rows)
        title = "std of layer outputs" + (" (mean network)" if reps > 1 else "")
    return f"{title}\n" + t.to_markdown(index=False, tablefmt="simple", disable_numparse=True)


def _options_table(meta: dict[str, Any]) -> pd.DataFrame:
    configs = meta["configs"]
    varied = {k for c in configs for k in c["varied"]}
    common: dict[str, Any] = {}
    for c in configs:  # every option that applies to any configuration and is not varied
        for k, v in c["options"].items():
            if k not in varied:
                common.setdefault(k, v)
    partial = {k for k in common if any(k not in c["options"] for c in configs)}
    if "widths" in common and len(set(common["widths"])) == 1:
        common = {"layers": len(common["widths"]) - 1, "width": common["widths"][0],
                  **{k: v for k, v in common.items() if k != "widths"}}
    rows = [(f"`--{k.replace('_', '-')}`", (",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v))
             + (" (where it applies)" if k in partial else "")) for k, v in common.items()]
    return pd.DataFrame(rows, columns=["option", "value"])


def build_document(layers: pd.DataFrame, summary: pd.DataFrame, meta: dict[str, Any], figure: str,
                   histograms: str | None = None) -> Document:
    """The simulate report as a :class:`Document` (rendered to Markdown and HTML)."""
    configs = meta["configs"]
    reps = int(layers["replicate"].nunique())
    labels = [c["label"] for c in configs]
    title = meta.get("title") or default_title(meta)
    doc = Document(title)
    if meta.get("command"):
        doc.p("Reproduce with:")
        doc.code(meta["command"])
    v = meta["versions"]
    doc.p(f"varprop {v['varprop']}, numpy {v['numpy']}, Python {v['python']}; seed {meta['seed']}"
          + (f"; run time {meta['elapsed_s']:.1f} s." if meta.get("elapsed_s") is not None else "."))

    doc.h2("Findings")
    doc.items(findings(summary, configs))

    doc.h2("Summary")
    lines = seed_line(layers)
    growth = depth_growth(layers)
    rows = []
    for config in labels:
        s = summary[summary["config"] == config]
        mean, log10_rms = lines[config]
        rows.append({
            "configuration": config,
            "mean of layer means": fmt(mean),
            "sqrt(mean layer variance)": fmt_std(log10_rms),
            "output std (last layer)": fmt_std(s["post_log10_rms_std"].iloc[-1]),
            "std factor per layer": fmt(_growth(s, "post_log10_rms_std")),
        })
        if "theory_post_log10_std" in s:
            rows[-1]["mean-field output std"] = fmt_std(s["theory_post_log10_std"].iloc[-1])
        g = growth[growth["config"] == config].iloc[0]
        ci = f" ± {g['slope_hi'] - g['slope']:.3g}" if not math.isnan(g["slope_hi"]) else ""
        rows[-1][f"log10 std per layer (layers {g['burn_in']}..{g['depth']})"] = f"{g['slope']:.4g}{ci}"
        rows[-1]["mean-field log10 std per layer"] = fmt(g["theory_slope"])
        if "grad_log10_rms_std" in s:
            rows[-1]["input gradient std"] = fmt_std(s["grad_log10_rms_std"].iloc[0])
            rows[-1]["gradient factor per layer (backward)"] = fmt(1 / _growth(s, "grad_log10_rms_std"))
    doc.table(pd.DataFrame(rows))
    explain = [
        "*mean of layer means*, *sqrt(mean layer variance)*: the seed answer's summary of a stack: the mean over "
        "layers 1..L of each layer's output mean, and the square root of the mean over layers of each layer's "
        "output variance" + (f" (pooled over {reps} replicates);" if reps > 1 else ";"),
        "*output std (last layer)*: the std of the network's output, the mean network over replicates;",
        "*std factor per layer*: (output std / input std) ** (1 / L), the geometric-mean growth per layer;",
        "*mean-field output std*: the theory's prediction of the output std;",
        "*log10 std per layer*: measured on each replicate between the stated layers (the first layers are a "
        "burn-in) and averaged" + (", ± the half-width of its 95% t interval over replicates" if reps > 1 else
                                   "; one replicate gives no interval (use `--replicates`)")
        + "; *mean-field log10 std per layer*: the theory's over the same layers;",
    ]
    if "grad_log10_std" in layers:
        explain += ["*input gradient std*: the std of the gradient that reaches the input, for a unit-variance "
                    "random gradient at the output;",
                    "*gradient factor per layer*: its geometric-mean growth per layer going backward."]
    doc.items(explain)

    doc.h2("Configuration")
    doc.table(_options_table(meta))
    if any(c["varied"] for c in configs):
        doc.p("Compared:")
        doc.table(pd.DataFrame([{"configuration": c["label"], **c["varied"]} for c in configs]).astype(str))

    doc.h2("Std per layer")
    doc.figure(figure, "Std of each layer's output" + (" and gradient" if "grad_log10_std" in layers else "")
               + " per layer, one line per configuration; dotted: mean-field theory")
    doc.p("The dotted line is the mean-field prediction: z = h W + b is Gaussian given the previous layer, with "
          "variance q_l = fan_in Var(W) E[h_{l-1}^2] + Var(b), and h_l = phi(z). It predicts the mean over "
          "networks of the variance (the solid line), exactly for linear stacks and to O(1/width) otherwise.")
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
        doc.p("Two summaries of the same replicates. The **mean network** (solid line, `post std` below) is the "
              "square root of the variance averaged over replicates: what mean-field theory predicts. The "
              "**typical network** (dashed, `typical post std`) is the geometric mean, 10 to the mean of "
              "log10 std: what one network drawn at random looks like. At finite width each layer multiplies "
              "the variance by a random factor, so log std performs a random walk: the spread grows with "
              "depth/width and, by Jensen's inequality, the typical network sits below the mean one even when "
              "the mean is preserved exactly.")

    doc.h2("Means, channels and correlations")
    doc.figure("means_per_layer.png", "Mean of the layer outputs, average squared unit mean and average unit "
               "variance per layer")
    doc.p("A layer whose units carry a mean (relu, sigmoid, softplus) shows it in the average squared unit mean; "
          "the average unit variance is what is left for the signal to vary with across samples.")
    doc.figure("correlation_per_layer.png", "Cosine similarity between samples per layer, with the c-map "
               "prediction")
    doc.p("When the cosine similarity climbs to 1 every input is mapped to the same direction and the network can "
          "no longer tell its inputs apart (correlation collapse, the ordered phase); the dotted line is the "
          "mean-field c-map. The signed mean can average a collapse onto +-v away; the mean |cos| cannot (for "
          "independent random directions in n dimensions it is about sqrt(2 / (pi n)), 0.08 at n = 100).")

    if histograms:
        doc.figure(histograms, "Histograms of the layer outputs at the first, middle and last layer")
        doc.p("The shape of each layer's output distribution, in units of its RMS: a spike at 0 is dead relu "
              "units, mass piling at the edges is saturation, and a Gaussian bell is a healthy linear regime. "
              "Replicate 0 only" + (" and the first 6 configurations." if len(meta["configs"]) > 6 else "."))

    doc.h2("Per-layer statistics")
    depth = int(summary["layer"].max())
    if depth > MAX_FULL_LAYERS:
        doc.p(f"A subsample of the {depth + 1} layers; `layers.csv` has every layer and replicate.")
    for config in labels:
        if len(labels) > 1:
            doc.h3(config)
        doc.table(layer_table(summary, config, reps))
    notes = [
        "`pre std`: the std of z = h W + b entering the activation; `post`: the layer's output h (layer 0 is the "
        "input);",
        "`zeros`: the fraction of exact zeros of h; `saturated`: the fraction of units with |phi'(z)| < 1e-3 "
        "(for relu the same units as the zeros);",
        "`cos sim`: the mean cosine similarity between pairs of samples (1: every input maps to the same "
        "direction); `abs cos sim`: the mean of its absolute value over pairs of the first 128 samples, which also "
        "shows a collapse onto +-one direction that the signed mean averages away;",
        "`theory post std`: the mean-field prediction of `post std`; `theory in 95% CI`: whether the predicted "
        "second moment lies in the 95% t interval of the measured one over replicates (a **no** at depth, where "
        "log std wanders, usually means too few replicates);",
        "\"overflow\" marks a value beyond float64; the std columns are exact at any magnitude.",
    ]
    if "grad_log10_std" in layers:
        notes.insert(0, "backward pass: a random gradient g_L ~ N(0, 1) enters at the output and is propagated "
                     "down through the activations, batch norm (with its full batch Jacobian) and W^T; `grad std` "
                     "is the std of the gradient with respect to layer l's output (layer 0: the input); `weight "
                     "grad norm` is the Frobenius norm of h_{l-1}^T delta_l, the gradient of layer l's weights "
                     "summed over all samples;")
    doc.items(notes)
    return doc


def default_title(meta: dict[str, Any]) -> str:
    """What was run, in one sentence."""
    configs = meta["configs"]
    o = configs[0]["options"]
    widths = o.get("widths", [])
    shape = (f"{len(widths) - 1} layers of width {widths[0]}" if len(set(widths)) == 1
             else f"a {'-'.join(map(str, widths))} network") if widths else "a network"
    if len(configs) == 1:
        return f"varprop: {shape}, {configs[0]['label']}"
    keys = list(dict.fromkeys(k for c in configs for k in c["varied"]))
    if len(configs) <= 3:
        return f"varprop: {shape}, {' vs '.join(c['label'] for c in configs)}"
    return f"varprop: {shape}, {len(configs)} configurations ({' x '.join(k.replace('_', ' ') for k in keys)})"


# Up to this many configurations get a finding each; beyond, findings are grouped (as the figures turn
# into small multiples).
FINDINGS_PER_CONFIG = 8


@dataclass(frozen=True)
class _Facts:
    """What the findings say about one configuration."""

    label: str
    varied: dict[str, Any]
    depth: int
    rel: float  # log10 of the last layer's std over the input's
    first_bad: int | None  # the first layer whose std leaves [1e-3, 1e3] x the input's
    growth: float  # std factor per layer
    saturated: float  # fraction of saturated units at the last layer (nan: not reported)
    collapse: float  # mean |cos| between samples at the last layer
    grad: float | None  # log10 of the input gradient's std over the output's
    # The first layer whose variance across samples (unit var) is below 1e-6 of its variance, the std ratio
    # of the [1e-3, 1e3] rule: every input then gives nearly the same output, whatever the std; and the
    # log10 of that fraction at the last layer.
    signal_lost: int | None = None
    signal_frac: float = math.nan


def _facts(config: dict[str, Any], summary: pd.DataFrame) -> _Facts:
    s = summary[summary["config"] == config["label"]].reset_index(drop=True)
    rel = s["post_log10_rms_std"] - s["post_log10_rms_std"].iloc[0]
    bad = s[rel.abs() > 3]
    sat = s["post_frac_saturated"].iloc[-1]
    grad = None
    if "grad_log10_rms_std" in s:
        grad = s["grad_log10_rms_std"].iloc[0] - s["grad_log10_rms_std"].iloc[-1]
    with np.errstate(divide="ignore", invalid="ignore"):  # a zero or overflowed unit var: no verdict
        frac = np.log10(s["post_unit_var"].to_numpy(float)) - 2 * s["post_log10_rms_std"].to_numpy(float)
    lost = np.flatnonzero(np.isfinite(frac) & (frac < -6) & (s["layer"].to_numpy() > 0))
    return _Facts(config["label"], config.get("varied", {}), int(s["layer"].iloc[-1]), float(rel.iloc[-1]),
                  None if bad.empty else int(bad["layer"].iloc[0]), _growth(s, "post_log10_rms_std"),
                  sat if sat > 0.5 and s["post_frac_zero"].iloc[-1] < 0.5 * sat else math.nan,
                  float(s["post_abs_cos_sim"].iloc[-1]), grad,
                  int(s["layer"].iloc[lost[0]]) if lost.size else None, float(frac[-1]))


def findings(summary: pd.DataFrame, configs: list[dict[str, Any]]) -> list[str]:
    """Where the signal dies or explodes (leaves [1e-3, 1e3] x the input's
    std), its growth per layer, saturation, collapse onto one direction and
    the gradients': a line per configuration, or per finding across them
    when there are more than :data:`FINDINGS_PER_CONFIG`."""
    facts = [_facts(c, summary) for c in configs]
    if len(facts) > FINDINGS_PER_CONFIG:
        return _grouped_findings(facts)
    out = []
    for f in facts:
        line = f"**{f.label}**: "
        if f.first_bad is None:
            line += f"stable through {f.depth} layers (output std x{fmt(10 ** f.rel, 3)} the input's)"
        else:
            verb = "explodes" if f.rel > 0 else "dies"
            line += (f"the signal {verb} at layer {f.first_bad} (std leaves [1e-3, 1e3] x the input's; "
                     f"x{fmt_std(f.rel)} at layer {f.depth})")
        line += f"; std x{fmt(f.growth, 3)} per layer"
        if f.signal_lost is not None:
            line += (f"; but the input signal is lost from layer {f.signal_lost}: the variance across samples is "
                     f"x{fmt_std(f.signal_frac)} the layer's variance at layer {f.depth} (every input gives nearly "
                     "the same output; the std left is each unit's fixed offset)")
        if not math.isnan(f.saturated):
            line += f"; {f.saturated:.0%} of the last layer's units are saturated (|phi'| < 1e-3)"
        if f.collapse > 0.9:
            line += (f"; the inputs collapse onto one direction (mean |cos| between samples {f.collapse:.3f} at "
                     f"layer {f.depth})")
        if f.grad is not None:
            line += f"; the input gradient is x{fmt_std(f.grad)} the output's"
            if abs(f.grad) > 3:
                line += f": gradients {'explode' if f.grad > 0 else 'vanish'} (beyond [1e-3, 1e3])"
        out.append(line + ".")
    return out


def _part(key: str, value: Any) -> str:
    """:func:`label_part`, with "none" for an empty list (``bn_layers=none``)."""
    text = label_part(key, value)
    return text + "none" if text.endswith("=") else text


def describe(subset: list[_Facts], every: list[_Facts], most: int = 6) -> str:
    """The configurations of ``subset`` in few words, given all of them: an option along which the subset
    holds every configuration there is (two at least) is written "any <option>", the rest as
    ``label_part`` values, those of the option that varies most joined by "/" ("sigmoid,
    bn_count=0/1/2/3 (any batch_size)"); configurations without the same varied options, by label."""
    count = f"{len(subset)} configuration{'s' if len(subset) != 1 else ''}"
    if len(subset) == len(every):
        return f"all {len(every)} configurations"
    keys = list(dict.fromkeys(k for f in every for k in f.varied))
    if not keys or any(set(f.varied) != set(keys) for f in every):
        labels = [f.label for f in subset]
        more = f"; and {len(labels) - most} more" if len(labels) > most else ""
        return f"{count}: {'; '.join(labels[:most])}{more}"
    present = {tuple(f.varied[k] for k in keys) for f in subset}
    existing = {tuple(f.varied[k] for k in keys) for f in every}
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
        head = tuple(f.varied[k] for k in rest[:-1])
        value = f.varied[rest[-1]] if rest else None
        if value not in groups.setdefault(head, []):
            groups[head].append(value)
    parts = []
    for head, values in groups.items():
        words = [_part(k, v) for k, v in zip(rest[:-1], head)]
        if rest:
            tail = [_part(rest[-1], v) for v in values]
            prefix = f"{rest[-1]}=" if all(t.startswith(f"{rest[-1]}=") for t in tail) else ""
            words.append(prefix + "/".join(t[len(prefix):] for t in tail))
        parts.append(", ".join(words))
    text = "; ".join(parts[:most]) + (f"; and {len(parts) - most} more such groups" if len(parts) > most else "")
    return f"{count}: {text}" + (f" (any {', '.join(free)})" if free else "")


def _span(facts: list[_Facts], value: Any, show: Any) -> str | None:
    """"x<low> (<its configuration>) to x<high> (<its>)", or one value when they agree to 3 digits; None
    when no configuration has a finite value."""
    ordered = sorted((f for f in facts if math.isfinite(value(f))), key=value)
    if not ordered:
        return None
    low, high = show(value(ordered[0])), show(value(ordered[-1]))
    if low == high:
        return f"x{low}"
    return f"x{low} ({ordered[0].label}) to x{high} ({ordered[-1].label})"


def _grouped_findings(facts: list[_Facts]) -> list[str]:
    out = []
    depths = {f.depth for f in facts}
    through = f"through {depths.pop()} layers" if len(depths) == 1 else "through their last layer"
    stable = [f for f in facts if f.first_bad is None]
    if stable:
        span = _span(stable, lambda f: f.rel, lambda v: fmt(10 ** v, 3))
        out.append(f"**Stable** {through} in {describe(stable, facts)}."
                   + (f" Their output std is {span} the input's." if span else ""))
    for verb, group in (("explodes", [f for f in facts if f.first_bad is not None and f.rel > 0]),
                        ("dies", [f for f in facts if f.first_bad is not None and not f.rel > 0])):
        if group:
            layers = sorted(f.first_bad for f in group)
            at = f"layer {layers[0]}" if layers[0] == layers[-1] else f"layers {layers[0]} to {layers[-1]}"
            out.append(f"**The signal {verb}** (its std leaves [1e-3, 1e3] x the input's) at {at} in "
                       f"{describe(group, facts)}.")
    span = _span(facts, lambda f: f.growth, lambda v: fmt(v, 3))
    if span:
        out.append(f"**Std per layer** {span}.")
    saturated = [f for f in facts if not math.isnan(f.saturated)]
    if saturated:
        out.append(f"**Saturated** (over half the last layer's units with |phi'| < 1e-3) in "
                   f"{describe(saturated, facts)}.")
    collapsed = [f for f in facts if f.collapse > 0.9]
    if collapsed:
        out.append(f"**The inputs collapse onto one direction** (mean |cos| between samples above 0.9 at the last "
                   f"layer) in {describe(collapsed, facts)}.")
    lost = [f for f in facts if f.signal_lost is not None]
    if lost:
        out.append(f"**The input signal is lost** (variance across samples below 1e-6 of the layer's variance: "
                   f"every input gives nearly the same output) in {describe(lost, facts)}.")
    span = _span([f for f in facts if f.grad is not None], lambda f: f.grad, fmt_std)
    if span:
        out.append(f"**The input gradient** is {span} the output's.")
    for verb, group in (("explode", [f for f in facts if f.grad is not None and f.grad > 3]),
                        ("vanish", [f for f in facts if f.grad is not None and f.grad < -3])):
        if group:
            out.append(f"**Gradients {verb}** (the input gradient's std beyond [1e-3, 1e3] x the output's) in "
                       f"{describe(group, facts)}.")
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

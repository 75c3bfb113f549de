"""The files of a ``varprop inspect`` run: the per-module table, its summary, figures and the report.

Findings first, then figures, then tables, rendered to Markdown and HTML by
:mod:`varprop.report.document`, as simulate's report is.
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .. import __version__
from ..run import ends_mid_row, json_default
from ..stats import summarize
from . import document
from .document import Document, lit, lit_code
from .figures import log_scale, rounding_zeros, save, tight

FORMATS = ("md", "html", "csv", "json")
MAX_TABLE_ROWS = 300  # per-module tables list every module up to this many, then a subsample
CATEGORY = {  # module type -> how the figures colour it
    "Linear": "weight layer", "Conv1d": "weight layer", "Conv2d": "weight layer", "Conv3d": "weight layer",
    "Embedding": "weight layer", "BatchNorm1d": "normalisation", "BatchNorm2d": "normalisation",
    "BatchNorm3d": "normalisation", "LayerNorm": "normalisation", "GroupNorm": "normalisation",
    "RMSNorm": "normalisation", "add()": "residual addition",
}
COLOURS = {"weight layer": "#1f77b4", "normalisation": "#2ca02c", "activation": "#d62728",
           "residual addition": "#9467bd", "other": "#7f7f7f", "input": "#000000"}


ACTIVATIONS = {"ReLU", "LeakyReLU", "Tanh", "Sigmoid", "GELU", "SiLU", "SELU", "ELU", "Softplus", "ReLU6",
               "Hardtanh", "Mish", "Hardswish"}


def _category(type_name: str) -> str:
    """How the figures colour a module: weight layer, normalisation, activation, residual addition, ..."""
    if type_name == "input":
        return "input"
    if type_name in CATEGORY:
        return CATEGORY[type_name]
    base = type_name.removesuffix("()").rstrip("_")
    if type_name in ACTIVATIONS or (type_name.endswith("()") and base in {
            "relu", "leaky_relu", "gelu", "silu", "tanh", "sigmoid", "elu", "selu", "softplus"}):
        return "activation"
    return "other"


def fmt(x: Any, digits: int = 4) -> str:
    """A number for a table ('' for a missing one)."""
    if x is None:
        return ""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(x):
        return ""
    if math.isinf(x):
        return "overflow" if x > 0 else "-overflow"
    return f"{x:.{digits}g}"


def _pow10(log10: float, digits: int = 4) -> str:
    return fmt(10.0**log10, digits) if math.isfinite(log10) else ("0" if log10 == -math.inf else "")


def module_summary(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`varprop.stats.summarize` of the table, with each layer's module name, type and shape."""
    summary = summarize(table)
    by = table.groupby(["config", "layer"], sort=False)
    info = by[[c for c in ("name", "type", "shape", "theory", "theory_grad", "fan_in", "fan_out")
               if c in table]].first()
    if "nonfinite" in table:  # inf or NaN in any re-initialisation (the summary's statistics skip those)
        info["nonfinite"] = by["nonfinite"].any()
    return summary.merge(info.reset_index(), on=["config", "layer"], how="left")


# --- findings -----------------------------------------------------------------------------------------------

def _module(row: Any) -> str:
    """A module as findings name it: its qualified name as code (a Sequential's child "5" is no layer
    number), its type, and its row of the per-module table."""
    return f"{lit_code(row['name'])} ({lit(row['type'])}, row {int(row['layer'])})"


def findings(summary: pd.DataFrame, residual: pd.DataFrame, meta: dict[str, Any],
             sweep: Any = None) -> list[str]:
    """What a reader should know first, as sentences."""
    out: list[str] = []
    s = summary[summary["config"] == summary["config"].iloc[0]].sort_values("layer")
    reps = int(s["replicates"].iloc[0])
    first, rest = s.iloc[0], s.iloc[1:]
    ids = bool(meta.get("token_ids"))
    if ids and len(rest) == 1:  # token ids are no signal, and no second module to compare the first with
        out.append(f"The input is token ids, no signal to take ratios to: {_module(rest.iloc[0])} has std "
                   f"{_pow10(rest.iloc[0]['post_log10_rms_std'])}.")
        rest = rest.iloc[:0]
    elif ids:  # the first module's output (an embedding) is the reference
        first, rest = rest.iloc[0], rest.iloc[1:]
    short = "the first module's" if ids else "the input's"
    if sweep is not None:
        out.append(f"Width sweep: **{lit(sweep.message)}**.")
    if len(rest):
        # The model's output where it is a measured row (the last, of several), else the last row measured.
        returned = rest[rest["layer"].isin(meta.get("outputs") or [])]
        last = returned.iloc[-1] if len(returned) else rest.iloc[-1]
        ratio = last["post_log10_rms_std"] - first["post_log10_rms_std"]
        what = ("the last module measured" if not len(returned) else "the output" if len(returned) == 1 else
                f"the last of the model's {len(returned)} outputs")
        if bool(last.get("nonfinite", False)) or math.isnan(last["post_log10_rms_std"]):
            out.append(f"Forward: {what} {_module(last)} **holds inf or NaN values** in some re-initialisation: "
                       "its std is not given.")
        else:
            out.append(f"Forward: {what} {_module(last)} has std {_pow10(last['post_log10_rms_std'])}, "
                       + (f"x{_pow10(ratio, 3)} that of the first module {_module(first)}, "
                          f"{_pow10(first['post_log10_rms_std'])} (the input is token ids)" if ids else
                          f"x{_pow10(ratio, 3)} the input's ({_pow10(first['post_log10_rms_std'])})")
                       + (f" (mean network over {reps} re-initialisations)." if reps > 1 else "."))
        logs = rest["post_log10_rms_std"].to_numpy(float) - first["post_log10_rms_std"]
        finite = np.isfinite(logs)
        if finite.any():
            hi, lo = int(np.nanargmax(np.where(finite, logs, -np.inf))), int(np.nanargmin(np.where(finite, logs,
                                                                                                    np.inf)))
            if logs[hi] > 1 or logs[lo] < -1:
                out.append(f"The std spans x{_pow10(logs[lo], 3)} {_module(rest.iloc[lo])} to "
                           f"x{_pow10(logs[hi], 3)} {_module(rest.iloc[hi])} of {short}: **more than a "
                           "factor 10 away** somewhere in the model.")
            else:
                broken = int(rest["nonfinite"].sum()) if "nonfinite" in rest else 0
                out.append(f"Every module's output std lies within x{_pow10(logs[lo], 3)} .. "
                           f"x{_pow10(logs[hi], 3)} of {short}"
                           + (f", but for {broken} holding inf or NaN values." if broken else "."))
        zero = rest[rest["post_log10_rms_std"] == -np.inf]
        if len(zero):
            out.append(f"{len(zero)} module(s) output exactly 0 (e.g. {_module(zero.iloc[0])}): a zero-initialised "
                       "layer (Fixup, SkipInit) or a dead path.")
    if "grad_log10_rms_std" in s and s["grad_log10_rms_std"].notna().any():
        g = s.dropna(subset=["grad_log10_rms_std"])
        top = g.iloc[-1]
        low = g[g["layer"] > 0]
        if len(low):
            bottom = low.iloc[0]
            ratio = bottom["grad_log10_rms_std"] - top["grad_log10_rms_std"]
            out.append(f"Backward: the gradient reaching {_module(bottom)} has std x{_pow10(ratio, 3)} that at the "
                       f"output {_module(top)}" + (": **vanishing**" if ratio < -3 else ": **exploding**"
                                                    if ratio > 3 else "") + ".")
    dead = s[(s["layer"] > 0) & (s["post_frac_zero"] > 0.9)]
    if len(dead):
        out.append(f"{len(dead)} module(s) output more than 90% exact zeros (dead units), e.g. "
                   f"{_module(dead.iloc[0])} ({fmt(dead.iloc[0]['post_frac_zero'], 3)}).")
    sat = s[(s["layer"] > 0) & (s["post_frac_saturated"] > 0.5) & ~s["type"].isin(["ReLU", "relu()"])]
    if len(sat):
        out.append(f"{len(sat)} activation(s) have most units saturated (|phi'| < 1e-3), e.g. "
                   f"{_module(sat.iloc[0])} ({fmt(sat.iloc[0]['post_frac_saturated'], 3)}).")
    collapsed = s[(s["layer"] > 0) & (s["post_abs_cos_sim"] > 0.95)]
    if len(collapsed):
        # "from X on" only where every module after X keeps above the threshold
        held = s[s["layer"] > 0]["post_abs_cos_sim"].to_numpy(float) > 0.95
        start = len(held) - int(np.argmin(held[::-1])) if not held.all() else 0
        where = (f"every module from {_module(s[s['layer'] > 0].iloc[start])} on" if start < len(held) else
                 f"the first {_module(collapsed.iloc[0])}")
        out.append(f"Correlation collapse: {len(collapsed)} module(s) map every input to nearly one direction (mean "
                   f"|cos| between samples above 0.95), {where}.")
    if "theory_post_second_moment" in s:
        th = s[(s["layer"] > 0) & s["theory_post_second_moment"].notna()]
        if len(th):
            ratio = th["post_second_moment"] / th["theory_post_second_moment"]
            worst = th.iloc[int(np.nanargmax(np.abs(np.log(ratio.to_numpy(float)))))] if ratio.notna().any() else None
            text = (f"Mean-field theory applies to {len(th)} of {len(s) - 1} modules"
                    + (f"; measured / predicted second moment spans {fmt(ratio.min(), 3)} .. {fmt(ratio.max(), 3)}"
                       if ratio.notna().any() else ""))
            if reps > 1:
                agree = sum(_inside(t_, m, lo, hi) in ("yes",) or _inside(t_, m, lo, hi).startswith("no, by")
                            for t_, m, lo, hi in zip(th["theory_post_second_moment"], th["post_second_moment"],
                                                     th["post_second_moment_lo"], th["post_second_moment_hi"]))
                text += (f"; the prediction lies in the 95% interval over re-initialisations (or within 0.1% of "
                         f"the measurement) for {agree}")
            if worst is not None and abs(math.log(worst["post_second_moment"] / worst["theory_post_second_moment"])) \
                    > math.log(1.2):
                off = worst["post_second_moment"] / worst["theory_post_second_moment"]
                text += f"; furthest: {lit(worst['name'])} (x{fmt(off, 3)})"
            out.append(text + ".")
    if len(residual):
        r = residual.groupby("block", sort=False)[["skip_second_moment", "branch_second_moment",
                                                    "sum_second_moment"]].mean()
        ratio = r["branch_second_moment"] / r["skip_second_moment"]
        off = ratio[ratio < 0.01]
        text = (f"{len(r)} residual addition(s): branch / skip second moment from {fmt(ratio.min(), 3)} to "
                f"{fmt(ratio.max(), 3)}")
        if len(off):
            text += f"; {len(off)} branch(es) nearly switched off (below 1%: the skip carries the signal)"
        first_sum, last_sum = r["sum_second_moment"].iloc[0], r["sum_second_moment"].iloc[-1]
        if len(r) > 1 and first_sum > 0:
            text += f"; the sum's second moment goes from {fmt(first_sum, 3)} to {fmt(last_sum, 3)}"
        out.append(text + ".")
    for note in meta.get("notes", []):  # they quote the user's names and messages: shown as plain text
        out.append(lit(note[0].upper() + note[1:] + "."))
    return out


# --- figures -------------------------------------------------------------------------------------------------

def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _text(name: Any, width: int) -> str:
    """A user's name as figure text: its last ``width`` characters, a $ escaped (it would open mathtext)."""
    return str(name)[-width:].replace("$", r"\$")


def _module_axis(ax: Any, s: pd.DataFrame, show_labels: bool, bottom: bool = True) -> None:
    """Module names under the axis when they fit (up to 40 shown), else the axis' meaning."""
    x = s["layer"].to_numpy()
    if not bottom:
        ax.tick_params(labelbottom=False)
    elif show_labels:
        step = max(1, math.ceil(len(x) / 40))
        ax.set_xticks(x[::step])
        ax.set_xticklabels([_text(n, 28) for n in s["name"].iloc[::step]], rotation=70, ha="right", fontsize=6.5)
    else:
        ax.set_xlabel("module, in order of execution (0 = input)")
    ax.grid(True, alpha=0.3)


def _dots(ax: Any, s: pd.DataFrame, y: np.ndarray, label_types: bool) -> None:
    cats = np.array([_category(str(t)) for t in s["type"]])
    for cat, colour in COLOURS.items():
        mask = cats == cat
        if mask.any():
            ax.scatter(s["layer"].to_numpy()[mask], y[mask], s=14, color=colour, zorder=3,
                       label=cat if label_types else None)


def std_figure(table: pd.DataFrame, summary: pd.DataFrame, path: Path) -> Path:
    """Std of every module's output (and gradient) in order of execution: mean network, typical network,
    range over re-initialisations, mean-field theory; dots coloured by kind of module."""
    plt = _plt()
    sides = [("post", "std of module output")] + (
        [("grad", "std of gradient w.r.t. output")] if "grad_log10_rms_std" in summary else [])
    s = summary.sort_values("layer")
    labels = len(s) <= 80
    fig, axes = plt.subplots(len(sides), 1, figsize=(max(7.0, min(16.0, 0.16 * len(s) + 4)), 3.6 * len(sides)
                                                       + (1.2 if labels else 0.3)), dpi=110, squeeze=False,
                             sharex=True)
    reps = table["replicate"].nunique()
    for i, (ax, (side, label)) in enumerate(zip(axes[:, 0], sides)):
        x = s["layer"].to_numpy()
        ax.plot(x, 10.0 ** s[f"{side}_log10_rms_std"], color="#444444", lw=1.2, label="mean network")
        if reps > 1:
            ax.plot(x, 10.0 ** s[f"{side}_log10_typical_std"], color="#444444", lw=1.0, ls="--",
                    label="typical network")
            g = table.groupby("layer")[f"{side}_log10_std"]
            ax.fill_between(g.min().index, 10.0 ** g.min(), 10.0 ** g.max(), color="#888888", alpha=0.18, lw=0,
                            label=f"range over {reps} re-initialisations")
        _dots(ax, s, 10.0 ** s[f"{side}_log10_rms_std"].to_numpy(float), i == 0)
        th = f"theory_{side}_log10_std"
        if th in s and s[th].notna().any():
            ax.plot(x, 10.0 ** s[th], color="black", ls=":", lw=1.3, marker="_", ms=9, label="mean-field theory")
        log_scale(ax)
        ax.set_ylabel(label, fontsize=9)
        _module_axis(ax, s, labels, bottom=i == len(sides) - 1)
    # The legend above the panels, where it hides no module.
    handles, names = axes[0, 0].get_legend_handles_labels()
    width, height = fig.get_size_inches()
    top = 1 - 0.75 / height
    fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, top + 0.4 / height), ncol=4, fontsize=7,
               frameon=False)
    fig.suptitle("Std per module" + (" and per gradient" if len(sides) > 1 else ""), fontsize=10)
    tight(fig, rect=(0, 0, 1, top - 0.1 / height))
    return save(fig, path)


def channels_figure(summary: pd.DataFrame, path: Path) -> Path:
    """The signal-propagation plot: average squared channel mean and average channel variance per module,
    and the cosine similarity between samples."""
    plt = _plt()
    s = summary.sort_values("layer")
    labels = len(s) <= 80
    fig, axes = plt.subplots(1, 2, figsize=(max(10.0, min(18.0, 0.2 * len(s) + 6)), 4.2 + (1.2 if labels else 0)),
                             dpi=110)
    x = s["layer"].to_numpy()
    ax = axes[0]
    sq, var = s["post_sq_unit_mean"].to_numpy(float), s["post_unit_var"].to_numpy(float)
    # Channel means that are 0 but for rounding (batch norm's, ~1e-15 of the variance) would stretch the log
    # axis over ten decades of nothing: they are marked at the foot of the panel instead.
    zero = rounding_zeros(sq, var)
    line = ax.plot(x, np.where(zero, np.nan, sq), lw=1.4, label="average squared channel mean")[0]
    ax.plot(x, var, lw=1.4, label="average channel variance")
    if zero.any():
        ax.plot(x[zero], np.full(int(zero.sum()), 0.03), "v", color=line.get_color(), ms=5,
                transform=ax.get_xaxis_transform(), label="squared channel mean 0 (to rounding)")
    log_scale(ax)
    ax.set_title("Signal propagation (averaged over re-initialisations)", fontsize=9, pad=30)
    # above the panel: inside, it hid the marks at its foot
    ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    _module_axis(ax, s, labels)
    ax = axes[1]
    ax.plot(x, s["post_cos_sim"], lw=1.4, label="mean cosine between samples")
    ax.plot(x, s["post_abs_cos_sim"], lw=1.4, label="mean |cosine|")
    if "theory_post_cos_sim" in s and s["theory_post_cos_sim"].notna().any():
        ax.plot(x, s["theory_post_cos_sim"], color="black", ls=":", lw=1.2, label="mean-field c-map")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Correlation between samples (1: every input maps to one direction)", fontsize=9, pad=30)
    ax.legend(fontsize=7)
    _module_axis(ax, s, labels)
    tight(fig)
    return save(fig, path)


def residual_figure(residual: pd.DataFrame, path: Path) -> Path:
    """Per residual addition: the second moments of skip, branch and sum (mean over re-initialisations)."""
    plt = _plt()
    r = residual.groupby("block", sort=False)[["skip_second_moment", "branch_second_moment",
                                               "sum_second_moment"]].mean()
    fig, ax = plt.subplots(figsize=(max(6.5, min(16.0, 0.35 * len(r) + 4)), 4.6), dpi=110)
    x = np.arange(len(r))
    for col, label, marker in (("skip_second_moment", "skip", "o"), ("branch_second_moment", "branch", "s"),
                               ("sum_second_moment", "sum", "^")):
        ax.plot(x, r[col], marker=marker, lw=1.3, label=label)
    if "theory_sum_second_moment" in residual and residual["theory_sum_second_moment"].notna().any():
        th = residual.groupby("block", sort=False)["theory_sum_second_moment"].first()
        ax.plot(x, th, color="black", ls=":", marker="_", ms=10, label="sum, mean-field theory")
    log_scale(ax)
    ax.set_xticks(x)
    ax.set_xticklabels([_text(b, 30) for b in r.index], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("second moment E[x^2]")
    ax.set_title("Residual additions: skip, branch and their sum", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    tight(fig)
    return save(fig, path)


def sweep_figure(sweep: Any, path: Path) -> Path:
    """Left: each module's output std against width (log-log), coloured by depth; right: the fitted
    exponents with their intervals and the tolerance band."""
    plt = _plt()
    table, ex = sweep.table, sweep.exponents
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), dpi=110)
    ax = axes[0]
    out = ex[ex["side"] == "output"]
    cmap = plt.get_cmap("viridis")
    n = max(len(out) - 1, 1)
    for i, (_, e) in enumerate(out.iterrows()):
        g = table[table["name"] == e["name"]].groupby("width")["post_log10_std"].mean()
        ax.plot(g.index, 10.0 ** g, marker="o", ms=3, lw=1.1, color=cmap(i / n))
        if len(out) <= 16:  # few enough to name each line at its right end
            ax.annotate(_text(e["name"], 18), (g.index[-1], 10.0 ** g.iloc[-1]), xytext=(4, 0),
                        textcoords="offset points", fontsize=6.5, va="center", color=cmap(i / n))
    ax.margins(x=0.18)
    log_scale(ax, "x", base=2)
    log_scale(ax)
    ax.set_xlabel("width")
    ax.set_ylabel("output std (typical network)")
    ax.set_title("Each module's output std against width (colour: depth)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax = axes[1]
    tol = sweep.tolerance
    y = np.arange(len(ex))
    colours = {"pass": "#2ca02c", "fail": "#d62728", "undecided": "#ff7f0e"}
    ax.axvspan(-tol, tol, color="#2ca02c", alpha=0.12, lw=0, label=f"tolerance +-{tol:g}")
    ax.axvline(0, color="black", lw=0.8)
    for verdict, colour in colours.items():
        m = (ex["verdict"] == verdict).to_numpy()
        if m.any():
            err = [ex["exponent"][m] - ex["lo"][m], ex["hi"][m] - ex["exponent"][m]]
            ax.errorbar(ex["exponent"][m], y[m], xerr=err, fmt="o", ms=4, color=colour, label=verdict, capsize=2)
    ax.set_yticks(y)
    ax.set_yticklabels([_text(f"{nm} ({sd[0]})", 34) for nm, sd in zip(ex["name"], ex["side"])], fontsize=6.5)
    ax.invert_yaxis()
    ax.set_xlabel("exponent b in std ~ width^b (95% interval)")
    ax.set_title("Exponents (o: output, g: gradient)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(True, axis="x", alpha=0.3)
    tight(fig)
    return save(fig, path)


# --- tables and the document --------------------------------------------------------------------------------

def module_table(summary: pd.DataFrame, reps: int) -> pd.DataFrame:
    """The per-module table of the report."""
    s = summary.sort_values("layer")
    if len(s) > MAX_TABLE_ROWS:
        keep = np.unique(np.round(np.linspace(0, len(s) - 1, MAX_TABLE_ROWS)).astype(int))
        s = s.iloc[keep]
    t = pd.DataFrame({"layer": s["layer"].astype(int), "module": s["name"].map(lit), "type": s["type"].map(lit),
                      "shape": s["shape"]})
    t["std"] = [_pow10(v) for v in s["post_log10_rms_std"]]
    if reps > 1:
        t["typical std"] = [_pow10(v) for v in s["post_log10_typical_std"]]
        t["second moment [95% CI]"] = [f"{fmt(m)} [{fmt(lo)}, {fmt(hi)}]" for m, lo, hi in
                                       zip(s["post_second_moment"], s["post_second_moment_lo"],
                                           s["post_second_moment_hi"])]
    if "theory_post_second_moment" in s:
        t["theory second moment"] = [fmt(v) for v in s["theory_post_second_moment"]]
        t["measured / theory"] = [fmt(m / th, 3) if th and th == th else "" for m, th in
                                  zip(s["post_second_moment"], s["theory_post_second_moment"])]
        if reps > 1:
            t["theory in 95% CI"] = [_inside(th, m, lo, hi) for th, m, lo, hi in
                                     zip(s["theory_post_second_moment"], s["post_second_moment"],
                                         s["post_second_moment_lo"], s["post_second_moment_hi"])]
    t["mean"] = [fmt(v, 3) for v in s["post_mean"]]
    t["avg sq channel mean"] = [fmt(v, 3) for v in s["post_sq_unit_mean"]]
    t["avg channel var"] = [fmt(v, 3) for v in s["post_unit_var"]]
    if "grad_log10_rms_std" in s:
        t["grad std"] = [_pow10(v) for v in s["grad_log10_rms_std"]]
        if "theory_grad_log10_std" in s:
            t["theory grad std"] = [_pow10(v) if v == v else "" for v in s["theory_grad_log10_std"]]
        if "weight_grad_norm" in s:
            t["weight grad norm"] = [fmt(v, 3) for v in s["weight_grad_norm"]]
    t["zeros"] = [fmt(v, 3) for v in s["post_frac_zero"]]
    t["saturated"] = [fmt(v, 3) for v in s["post_frac_saturated"]]
    t["cos sim"] = [fmt(v, 3) for v in s["post_cos_sim"]]
    t["abs cos sim"] = [fmt(v, 3) for v in s["post_abs_cos_sim"]]
    if "theory" in s:
        t["theory"] = s["theory"].fillna("").map(lit)  # it quotes module names
    return t


def _inside(theory: float, measured: float, lo: float, hi: float) -> str:
    """'yes' / '**no**' for a prediction against the interval over re-initialisations; 'no, by 3e-05' when it
    misses by less than 0.1% (batch norm's var / (var + eps) varies so little between re-initialisations
    that the infinite-width value misses its interval in the fifth digit)."""
    if any(v != v for v in (theory, lo, hi)):
        return ""
    if lo <= theory <= hi:
        return "yes"
    rel = abs(measured / theory - 1) if theory else math.inf
    return f"no, by {rel:.1g}" if rel < 1e-3 else "**no**"


def residual_summary(residual: pd.DataFrame) -> pd.DataFrame:
    g = residual.groupby("block", sort=False)
    m = g[[c for c in residual.columns if c.endswith(("_second_moment", "_unit_var", "_sq_unit_mean"))]].mean()
    first = g[["skip", "branch"]].first()
    t = pd.DataFrame({"block": [lit(b) for b in m.index], "skip (from)": first["skip"].replace("", "-").map(lit),
                      "branch (from)": first["branch"].replace("", "-").map(lit)})
    for part in ("skip", "branch", "sum"):
        t[f"{part} E[x^2]"] = [fmt(v) for v in m[f"{part}_second_moment"]]
    t["branch / skip"] = [fmt(b / s_, 3) if s_ > 0 else "" for b, s_ in
                          zip(m["branch_second_moment"], m["skip_second_moment"])]
    t["sum / (skip + branch)"] = [fmt(su / (s_ + b), 3) if s_ + b > 0 else "" for su, s_, b in
                                  zip(m["sum_second_moment"], m["skip_second_moment"], m["branch_second_moment"])]
    t["branch avg channel var"] = [fmt(v, 3) for v in m["branch_unit_var"]]
    if "theory_sum_second_moment" in m:
        t["theory sum E[x^2]"] = [fmt(v) for v in m["theory_sum_second_moment"]]
    return t.reset_index(drop=True)


def build_document(table: pd.DataFrame, summary: pd.DataFrame, residual: pd.DataFrame, meta: dict[str, Any],
                   sweep: Any = None, summary_json: bool = True) -> Document:
    """The inspect report as a :class:`Document`."""
    info = meta["inspect"]
    reps = int(info["replicates"])
    title = lit(meta["title"]) if meta.get("title") else "varprop inspect: " + lit(info["model"])
    doc = Document(title)
    if meta.get("command"):
        doc.p("Reproduce with:")
        doc.code(meta["command"])
    v = meta["versions"]
    shape = "x".join(map(str, info["input_shape"]))
    doc.p(f"varprop {v['varprop']}, PyTorch {v['torch']}, numpy {v['numpy']}, Python {v['python']}; seed "
          f"{info['seed']}; {reps} re-initialisation{'s' if reps > 1 else ''}; input {shape} "
          f"({'N(0, 1)' if info['inputs'] == 'gaussian' else 'from a file'}); mode {info['mode']}; "
          f"device {lit(info['device'])}"
          + (f"; run time {info['elapsed_s']:.1f} s." if info.get("elapsed_s") else "."))
    doc.h2("Findings")
    doc.items(findings(summary, residual, info, sweep))

    if sweep is not None:
        doc.h2("Width sweep")
        doc.p(f"`make_model(width)` at widths {', '.join(map(str, info['widths']))}, {reps} re-initialisations "
              "each. Per module, log10 std = a + b log10 width is fitted on each re-initialisation (replicate r of "
              "every width comes from the same seed) and b's 95% interval comes from the spread of those slopes. "
              f"A module passes when its whole interval lies within +-{sweep.tolerance:g}, fails when it lies "
              "wholly outside, and is undecided otherwise. b = 0: the statistic does not depend on width (a "
              "correct parametrisation); b = 0.5 per layer: N(0, 1) weights.")
        doc.p(f"**{lit(sweep.message)}**")
        doc.figure("width_sweep.png", "Output std against width per module, and the fitted exponents")
        ex = sweep.exponents
        doc.table(pd.DataFrame({"module": ex["name"].map(lit), "type": ex["type"].map(lit), "of": ex["side"],
                                "exponent": [fmt(v, 3) for v in ex["exponent"]],
                                "95% interval": [f"[{fmt(lo, 3)}, {fmt(hi, 3)}]" for lo, hi in zip(ex["lo"], ex["hi"])],
                                "R^2": [fmt(v, 3) for v in ex["r2"]], "verdict": ex["verdict"]}))
        doc.p(f"The sections below describe the narrowest width, {info['widths'][0]}; `layers.csv` has every "
              "width.")

    doc.h2("Std per module")
    doc.figure("std_per_module.png", "Std of each module's output" + (" and gradient" if info["backward"] else "")
               + " in order of execution; dotted: mean-field theory")
    text = ("Modules in the order they ran (0 is the input); a module called twice appears twice (`name#2`). "
            "Dots are coloured by kind of module.")
    if reps > 1:
        text += (" The solid line is the **mean network** (the square root of the variance averaged over "
                 "re-initialisations, what mean-field theory predicts), the dashed line the **typical network** "
                 "(the geometric mean: what one initialisation looks like) and the band the range over "
                 "re-initialisations.")
    doc.p(text)
    if info["backward"]:
        doc.p("Backward: a N(0, 1) gradient enters the model's output (the gradient of sum(g * output)) and "
              "tensor hooks record the gradient with respect to each module's output (a hook registered before an "
              "in-place activation sees the gradient with respect to the value before it). `weight grad norm` "
              "is the Frobenius norm of the gradient of the module's weight.")
    doc.p("Mean-field theory: along the data flow the hooks saw, each Linear/Conv output is predicted as a "
          "zero-mean Gaussian with second moment fan_in_eff x mean(w^2) x E[x^2] + mean(b^2), using the "
          "weights each layer actually has (averaged over re-initialisations) and its real fan-in (a padded "
          "convolution's border sees fewer taps: predictions are carried per position); elementwise "
          "activations, batch/layer norm, dropout and residual additions follow their exact Gaussian "
          "expectations. The `theory` column says where a chain starts (`input`, or `restart at` a layer whose "
          "input is measured because what fed it is not modelled) and why it does not apply elsewhere (`n/a`). "
          "It is the infinite-width limit: it predicts the mean network, exactly for linear and relu chains and "
          "to O(1/width) otherwise.")

    doc.h2("Channels and correlations")
    doc.figure("channels_per_module.png", "Average squared channel mean, average channel variance and cosine "
               "similarity between samples per module")
    doc.p("The signal-propagation plot (Brock et al. 2021): per channel, the mean and the variance over samples "
          "and positions, averaged over channels ([N, C, H, W] and [N, C, L]: channel axis 1; [N, T, C]: the last "
          "axis; [N, C]: each unit). A growing squared channel mean is a mean shift the next layers carry; a "
          "shrinking channel variance is signal lost. The cosine similarity between samples rising to 1 means "
          "the model maps every input to the same direction.")

    if len(residual):
        doc.h2("Residual additions")
        doc.figure("residual.png", "Second moments of skip, branch and their sum per residual addition")
        doc.p("Each addition's operands, measured as they are added. The **skip** is the operand with fewer "
              "weighted modules of its own since the two paths split (the identity path has none), the "
              "**branch** the other; `from` names the module whose output the operand is. `branch / skip` is "
              "the ratio of their second moments; `sum / (skip + branch)` is 1 when they are uncorrelated. "
              "`branch avg channel var` is the average channel variance of the residual branch (NFNets' "
              "`res_avg_var`).")
        doc.table(residual_summary(residual))

    doc.h2("Per-module statistics")
    if len(summary) > MAX_TABLE_ROWS:
        doc.p(f"A subsample of the {len(summary)} rows; `layers.csv` has every module and replicate.")
    first_config = summary["config"].iloc[0]
    doc.table(module_table(summary[summary["config"] == first_config], reps))
    notes = [
        "`std`: the std of the module's output over all its entries; `second moment`: E[x^2], with its 95% t "
        "interval over re-initialisations; `theory in 95% CI`: whether the prediction falls inside it;",
        "`avg sq channel mean`, `avg channel var`: the signal-propagation statistics above;",
        "`zeros`: fraction of exact zeros; `saturated`: for activations, the fraction of inputs where "
        "|phi'(z)| < 1e-3 (for relu the negative inputs);",
        "`cos sim`: mean cosine similarity between pairs of samples; `abs cos sim`: the mean of its absolute "
        "value over the first 128 samples;",
        "`layers.csv` has one row per module call and re-initialisation with simulate's column names (`post_*` "
        "for the output, `grad_*` for the gradient, `theory_*` for the predictions)"
        + ("; `summary.json` the means, standard errors and intervals over re-initialisations." if summary_json
           else "."),
    ]
    doc.items(notes)
    return doc


def write(table: pd.DataFrame, directory: Path, command: str | None = None, title: str | None = None,
          formats: Sequence[str] = FORMATS, sweep: Any = None) -> dict[str, Any]:
    """Write every file of an inspect run into ``directory``; return their paths (and the summary).

    layers.csv and config.json (with residual.csv and exponents.csv when there are additions or a width
    sweep) are the run's data, from which :func:`render` redraws the report."""
    directory = Path(directory)
    info = dict(table.attrs.get("inspect", {}))
    residual = pd.DataFrame(table.attrs.get("residual", []))
    meta = {"title": title, "command": command, "inspect": info,
            "versions": {"varprop": __version__, "torch": info.get("torch"), "numpy": np.__version__,
                         "pandas": pd.__version__, "python": platform.python_version()}}
    if sweep is not None:
        meta["sweep"] = {"passed": sweep.passed, "message": sweep.message, "tolerance": sweep.tolerance}
    (directory / "config.json").write_text(json.dumps(meta, indent=2, default=json_default) + "\n")
    table.to_csv(directory / "layers.csv", index=False)
    if len(residual):
        residual.to_csv(directory / "residual.csv", index=False)
    if sweep is not None:
        sweep.exponents.to_csv(directory / "exponents.csv", index=False)
    return render(directory, formats, table, meta, residual, sweep)


DATA_FILES = ("config.json", "layers.csv", "residual.csv", "exponents.csv")  # a run's data; render() reads them


def rerender_into(run_dir: Path, staged: Path, formats: Sequence[str]) -> dict[str, Any]:
    """Redraw an inspect run into ``staged``, the staging directory that is to replace ``run_dir``
    (varprop.outdir.staging): its data files linked in, figures and reports drawn, and its other files
    that varprop wrote and this render does not redraw carried over. ``run_dir`` itself is only read."""
    from . import redraw_into

    kept = (run_dir / "summary.json").is_file()  # carried over when not redrawn: the report still names it
    return redraw_into(run_dir, staged, DATA_FILES, lambda directory: render(directory, formats, summary_json=kept))


def is_inspect_run(directory: Path) -> bool:
    """Whether ``directory`` holds an inspect run (its config.json says so)."""
    try:
        return "inspect" in json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return False


def render(directory: Path, formats: Sequence[str] = FORMATS, table: pd.DataFrame | None = None,
           meta: dict[str, Any] | None = None, residual: pd.DataFrame | None = None,
           sweep: Any = None, summary_json: bool = False) -> dict[str, Any]:
    """(Re)draw an inspect run's figures and reports, from its files when not given; the report names
    summary.json when it is written (the json format) or ``summary_json`` says it is there."""
    directory = Path(directory)
    if meta is None:
        meta = json.loads((directory / "config.json").read_text())
    names = {c: str for c in ("name", "module", "type", "block", "skip", "branch", "theory", "theory_grad")}
    if table is None:
        if ends_mid_row(directory / "layers.csv"):
            raise ValueError("layers.csv ends in the middle of a row: it was cut short")
        table = pd.read_csv(directory / "layers.csv", dtype=names)  # module "0" stays a name, not a number
        rows = table.groupby(["config", "replicate"]).size() if {"config", "replicate"} <= set(table) else None
        if rows is not None and rows.groupby(level=0).nunique().max() > 1:  # a lost row would skew a mean
            raise ValueError("layers.csv lacks rows: the replicates of a configuration have different modules")
    if residual is None:
        path = directory / "residual.csv"
        residual = pd.read_csv(path, dtype=names).fillna({"skip": "", "branch": ""}) if path.is_file() \
            else pd.DataFrame()
    if sweep is None and "sweep" in meta:
        from ..inspect.sweep import SweepResult

        sweep = SweepResult(table, pd.read_csv(directory / "exponents.csv", dtype=names), meta["sweep"]["passed"],
                            meta["sweep"]["message"], meta["sweep"]["tolerance"])
    shown = table[table["width"] == table["width"].min()] if sweep is not None else table
    paths: dict[str, Any] = {"config": directory / "config.json", "layers": directory / "layers.csv"}
    if len(residual):
        paths["residual"] = directory / "residual.csv"
    if sweep is not None:
        paths["exponents"] = directory / "exponents.csv"
    summary = module_summary(shown)
    paths["summary"] = summary
    if "json" in formats:
        paths["json"] = directory / "summary.json"
        paths["json"].write_text(summary.to_json(orient="records", indent=1))
    if "md" in formats or "html" in formats:
        shown_residual = residual[residual["config"] == shown["config"].iloc[0]] if len(residual) else residual
        paths["figure"] = std_figure(shown, summary, directory / "std_per_module.png")
        channels_figure(summary, directory / "channels_per_module.png")
        if len(shown_residual):
            residual_figure(shown_residual, directory / "residual.png")
        if sweep is not None:
            sweep_figure(sweep, directory / "width_sweep.png")
        doc = build_document(shown, summary, shown_residual, meta, sweep,
                             summary_json=summary_json or "json" in formats)
        paths.update(document.write(doc, directory, formats))
    return paths

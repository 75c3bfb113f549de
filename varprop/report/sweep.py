"""The report of a sweep: findings, heatmaps over two options, the measured
order-to-chaos diagram with the theory's critical line, fitted exponents.

Everything is drawn from the sweep directory's Parquet results and manifest
into ``DIR/_report/`` (report.md, report.html, figures, summary.csv,
fits.csv), written beside and swapped in whole, so a failed redraw keeps the
previous report.
"""

from __future__ import annotations

import functools
import math
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from .. import theory
from ..findings import assess
from ..fit import line_fit
from ..nn import inits
from ..run import Configuration, Run
from ..spec import expand, label_part
from ..stats import t_half_width
from . import document
from .document import Document, Item, lit
from .markdown import findings as markdown_findings
from .markdown import fmt, fmt_pow10

# name -> (column, layer: "last" or "input", what it is)
METRICS = {
    "out_log10_std": ("post_log10_std", "last", "log10 std of the last layer's output"),
    "grad_log10_std": ("grad_log10_std", "input", "log10 std of the gradient at the input"),
    "abs_cos": ("post_abs_cos_sim", "last", "mean |cos| between samples at the last layer"),
    "cos": ("pre_cos_sim", "last", "mean cosine of z between samples at the last layer"),
    "abs_cos_pre": ("pre_abs_cos_sim", "last", "mean |cos| of z between samples at the last layer"),
    "theory_out_log10_std": ("theory_post_log10_std", "last", "mean-field log10 std of the last layer's output"),
    "theory_cos": ("theory_pre_cos_sim", "last", "mean-field cosine of z at the last layer"),
}
HEATMAP_METRICS = ("out_log10_std", "grad_log10_std", "abs_cos")
# A train sweep's maps: history.csv's column at each run's last epoch -> title, cell format.
TRAIN_METRICS = {"test_accuracy": ("final test accuracy", lambda v: f"{100 * v:.1f}%"),
                 "train_loss_keras": ("final training loss (Keras' epoch mean)", lambda v: f"{v:.3g}")}
TRAIN_SHORT = {"test_accuracy": "test accuracy", "train_loss_keras": "training loss"}  # colour bar labels
MAX_PANELS = 12  # small multiples per figure; beyond, the first ones (the rest are in summary.csv)
MAX_ROWS = 40  # rows of a table in the report (the CSV beside it has all)
# What varprop.findings.assess reads of the table, beside METRICS' columns.
ASSESSED = ("post_log10_std", "post_unit_var", "post_frac_saturated", "post_frac_zero", "post_abs_cos_sim",
            "grad_log10_std")


def _read(directory: Path, manifest: dict[str, Any]) -> pd.DataFrame:
    """The columns the report needs from every finished task."""
    from ..sweeps.store import result_path

    keys = manifest["keys"]
    want = list(dict.fromkeys(["config", *keys, "replicate", "layer", *ASSESSED]
                              + [col for col, _, _ in METRICS.values()]
                              + ["branch_second_moment"]))  # a residual grid's: its findings speak of blocks
    have = [c for c in want if c in {col[0] for col in manifest["columns"]} | {"config", *keys}]
    frames = []
    for task in manifest["tasks"]:
        path = result_path(directory, task["key"])
        if path.exists():
            frames.append(pd.read_parquet(path, columns=have))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["config", *keys])


def as_run(results: pd.DataFrame, manifest: dict[str, Any]) -> Run:
    """The finished configurations as a :class:`~varprop.run.Run` (what a
    simulate report is made from): each configuration's ``varied`` options
    are the grid keys' values it has."""
    labels = set(results["config"])
    configs = {t["label"]: Configuration(t["label"], {k: v for k, v in t["values"].items() if v is not None},
                                         t["options"]) for t in manifest["tasks"] if t["label"] in labels}
    return Run(results, list(configs.values()), versions=manifest["versions"])


def per_replicate(results: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """One row per (configuration, replicate): each metric of :data:`METRICS`
    at its layer (the last layer, or the input for the gradient)."""
    if results.empty:
        return pd.DataFrame(columns=["config", *keys, "replicate"])
    depth = results.groupby("config", sort=False)["layer"].transform("max")
    last = results[results["layer"] == depth].set_index(["config", "replicate"])
    first = results[results["layer"] == 0].set_index(["config", "replicate"])
    out = last[list(keys)].copy()
    for name, (col, where, _) in METRICS.items():
        if col in results:
            out[name] = (last if where == "last" else first)[col]
    return out.reset_index()


def per_config(reps: pd.DataFrame, manifest: dict[str, Any], run: Run) -> pd.DataFrame:
    """One row per configuration: the mean over replicates of each metric
    (log10 std: the typical network), ``out_log10_rms_std`` (the mean
    network, from the run's summary), its verdict (:func:`varprop.findings.assess`),
    the replicate count, and sigma_w^2, sigma_b^2 of the last layer."""
    keys = manifest["keys"]
    metrics = [m for m in METRICS if m in reps]
    g = reps.groupby("config", sort=False)
    out = g[list(keys)].first() if keys else pd.DataFrame(index=g.size().index)
    out = out.join(g[metrics].mean())
    out["replicates"] = g.size()
    summary = run.summary
    last = summary.loc[summary.groupby("config", sort=False)["layer"].idxmax()].set_index("config")
    out["out_log10_rms_std"] = last["post_log10_rms_std"]
    out["verdict"] = pd.Series({a.label: a.verdict for a in assess(run)})
    sigmas = {t["label"]: _sigmas(t["options"]) for t in manifest["tasks"]}
    out["sigma_w2"] = [sigmas.get(c, (math.nan, math.nan))[0] for c in out.index]
    out["sigma_b2"] = [sigmas.get(c, (math.nan, math.nan))[1] for c in out.index]
    return out.reset_index()


def _sigmas(options: dict[str, Any]) -> tuple[float, float]:
    """sigma_w^2 = fan_in Var(W) and sigma_b^2 = Var(b) of the last hidden
    layer (NaN for orthogonal and user inits, whose variance is not a rule)."""
    try:
        (config,) = expand(dict(options))
    except Exception:  # a configuration this varprop no longer accepts: no sigmas, not no report
        return math.nan, math.nan
    net = config.spec.network
    scheme = net.init.resolve()
    layer = max(1, net.depth - 1)
    n_in, n_out = net.widths[layer - 1], net.widths[layer]
    if scheme.user is not None or scheme.orthogonal:
        return math.nan, math.exp(theory.bias_log_variance(scheme, net.bias_std, n_in))
    return n_in * inits.variance(scheme, n_in, n_out), math.exp(theory.bias_log_variance(scheme, net.bias_std, n_in))


# --- fits -------------------------------------------------------------------------

def fits(reps: pd.DataFrame, keys: Sequence[str], metric: str = "out_log10_std") -> pd.DataFrame:
    """Along each numeric option, within each group of the other options'
    values: log10 std on log10 of the option (an exponent: 0.5 for the
    sqrt(fan_in) law), or on the option itself for ``layers`` (log10 std
    gained per layer) and options with values <= 0.

    Replicate r of every configuration shares its random draws (common
    random numbers), so the points of one replicate are not independent
    but replicates are: the slope is fitted per replicate and its 95%
    interval is a t interval over replicates. With one replicate, the
    regression's own interval (needs three values or more).
    """
    rows = []
    if metric not in reps:
        return pd.DataFrame(rows)
    for key in keys:
        x_all = pd.to_numeric(reps[key], errors="coerce")
        if key == "seed" or x_all.isna().any() or x_all.nunique() < 2:
            continue
        log_x = key != "layers" and bool((x_all > 0).all())
        others = [k for k in keys if k != key]
        groups = reps.groupby(others, sort=False, dropna=False) if others else [((), reps)]
        for values, g in groups:
            g = g[np.isfinite(g[metric].to_numpy(float))]
            x = pd.to_numeric(g[key]).to_numpy(float)
            if len(set(x)) < 2:
                continue
            xt = np.log10(x) if log_x else x
            per = np.array([line_fit(r["_x"], r[metric]).slope for _, r in g.assign(_x=xt).groupby("replicate")
                            if r["_x"].nunique() >= 2])
            if len(per) >= 2:
                slope, half = per.mean(), float(t_half_width(per.std(ddof=1), len(per)))
            else:  # one replicate: the regression's own interval over the option's values
                res = line_fit(xt, g[metric].to_numpy(float))
                slope, half = res.slope, (res.slope_hi - res.slope) if res.dof > 0 else math.nan
            values = values if isinstance(values, tuple) else (values,)
            rows.append({"option": key, "fit": f"per log10 {key}" if log_x else f"per unit of {key}",
                         "metric": metric, "group": ", ".join(label_part(k, v) for k, v in zip(others, values)
                                                              if v is not None and v == v) or "all",
                         "slope": slope, "lo": slope - half, "hi": slope + half, "values": len(set(x)),
                         "replicates": max(len(per), 1)})
    return pd.DataFrame(rows)


# --- findings ------------------------------------------------------------------------

def findings(run: Run | None, summary: pd.DataFrame, fit_table: pd.DataFrame, manifest: dict[str, Any],
             failures: dict[str, Any], phase_notes: list[str]) -> list[Item]:
    """What the sweep shows: the verdicts of a simulate report's findings
    (:func:`varprop.report.markdown.findings`, grouped by verdict beyond a few
    configurations), then the fitted exponents and the order-to-chaos notes."""
    out: list[Item] = []
    n_tasks = len(manifest["tasks"])
    finished = n_tasks - len(failures)
    if failures:
        out.append(f"**{len(failures)} of {n_tasks} tasks failed** (see *Failed tasks*); the maps below show the "
                   "configurations that finished.")
    if run is None or summary.empty:
        return out + ["No task has finished yet."]
    out += markdown_findings(run)
    for (metric, key), g in fit_table.groupby(["metric", "option"], sort=False) if not fit_table.empty else []:
        if metric != "out_log10_std":  # the gradient's fits are in the table
            continue
        big = g.loc[g["slope"].abs().idxmax()]
        std = "the last layer's std"
        what = (f"exponent b of {std} ~ {key}^b" if big["fit"].startswith("per log10") else
                f"log10 of {std} gained per layer" if key == "layers" else
                f"change of log10 of {std} per unit of {key}")
        ci = f" [{big['lo']:.3g}, {big['hi']:.3g}]" if np.isfinite(big["lo"]) else ""
        out.append(f"Along {key}: the {what} runs from "
                   f"{g['slope'].min():.3g} to {g['slope'].max():.3g} over {len(g)} groups; the largest is "
                   f"{big['slope']:.3g}{ci} ({lit(big['group'])}).")
    out += phase_notes
    if finished < n_tasks and not failures:
        out.append(f"{finished} of {n_tasks} tasks have finished; rerun the sweep to finish the others.")
    return out


# --- figures ----------------------------------------------------------------------------

def _plt() -> Any:
    from . import figures  # noqa: F401  (sets the Agg backend)
    import matplotlib.pyplot as plt

    return plt


NOT_APPLICABLE = "n/a"  # an option that does nothing in a configuration (momentum under Adam, relu's slope)


def _order(values: pd.Series) -> list[Any]:
    """An axis' values: n/a first, then the others sorted as numbers where they are numbers."""
    uniq = [v for v in dict.fromkeys(values) if v != NOT_APPLICABLE]
    try:
        uniq = sorted(uniq, key=float)
    except (TypeError, ValueError):
        pass
    return ([NOT_APPLICABLE] if (values == NOT_APPLICABLE).any() else []) + uniq


def heatmap(summary: pd.DataFrame, x: str, y: str | None, metric: str, keys: Sequence[str],
            path: Path) -> Path | None:
    """``metric`` over options x (columns) and y (rows; None: one row), a
    panel per combination of the other options' values (the first
    MAX_PANELS). A train sweep's metrics (:data:`TRAIN_METRICS`) are medians
    over replicates, and each cell also shows the replicates' range
    (``<metric>_lo`` .. ``<metric>_hi``)."""
    if metric not in summary or summary[metric].isna().all():
        return None
    summary = summary.copy()
    for axis in (x, y):  # a configuration the option does not apply to has a cell of its own
        if axis is not None:
            summary[axis] = summary[axis].astype(object).where(summary[axis].notna(), NOT_APPLICABLE)
    plt = _plt()
    from .figures import _text, save

    # a panel per value of the options the axes leave free (not of a zipped partner: half-empty maps)
    others = [k for k in keys if k not in (x, y) and not _fixes(summary, [x] + ([y] if y else []), k)]
    panels = list(summary.groupby(others, sort=False, dropna=False)) if others else [((), summary)]
    shown = panels[:MAX_PANELS]
    cols = min(len(shown), 4)
    rows = math.ceil(len(shown) / cols)
    xs, ys = _order(summary[x]), _order(summary[y]) if y else [None]
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 + 3.1 * cols, 0.9 + (2.9 if y else 1.3) * rows), dpi=110,
                             squeeze=False, layout="constrained")
    values = summary[metric].replace([np.inf, -np.inf], np.nan)
    title, fmt_cell = (TRAIN_METRICS[metric][0], TRAIN_METRICS[metric][1]) if metric in TRAIN_METRICS else \
        (METRICS[metric][2], lambda v: f"{v:.2g}")
    ranged = f"{metric}_lo" in summary
    from matplotlib.colors import LogNorm, Normalize

    if metric == "abs_cos":
        cmap, vmin, vmax = "viridis", 0.0, 1.0
    elif metric in TRAIN_METRICS:  # yellow: better (higher accuracy, lower loss)
        cmap = "viridis" if metric == "test_accuracy" else "viridis_r"
        vmin, vmax = float(np.nanmin(values)), float(np.nanmax(values))
        if vmax - vmin < 1e-12:
            vmin, vmax = vmin - 0.5 * abs(vmin) - 1e-3, vmax + 0.5 * abs(vmax) + 1e-3
    else:
        m = max(float(np.nanmax(np.abs(values))), 0.5)
        cmap, vmin, vmax = "RdBu_r", -m, m
    # losses spanning more than a decade (a run that barely trains beside ones that do): a log scale
    norm = LogNorm(vmin, vmax) if metric == "train_loss_keras" and vmin > 0 and vmax > 10 * vmin else \
        Normalize(vmin, vmax)
    mesh = None
    for n, (ax, (vals, g)) in enumerate(zip(axes.flat, shown)):
        grid = np.full((len(ys), len(xs)), np.nan)
        text = {}
        for _, r in g.iterrows():
            if r[x] in xs and (y is None or r[y] in ys):
                at = (ys.index(r[y]) if y else 0, xs.index(r[x]))
                grid[at] = r[metric]
                if metric in TRAIN_METRICS and not np.isfinite(r[metric]):
                    text[at] = f"diverged\n{r['diverged']} of {r['replicates']}"
                elif np.isfinite(r[metric]):
                    lo, hi = (fmt_cell(r[f"{metric}_lo"]), fmt_cell(r[f"{metric}_hi"])) if ranged else ("", "")
                    text[at] = fmt_cell(r[metric]) + (f"\n{lo} to {hi}" if lo != hi else "")
        mesh = ax.pcolormesh(np.arange(len(xs) + 1), np.arange(len(ys) + 1), grid, cmap=cmap, norm=norm)
        if len(xs) * len(ys) <= 64:
            for (i, j), words in text.items():
                if not np.isfinite(grid[i, j]):
                    ax.text(j + 0.5, i + 0.5, words, ha="center", va="center", fontsize=7, color="black")
                    continue
                if cmap == "RdBu_r":
                    dark = abs(grid[i, j]) > 0.6 * vmax
                else:  # viridis: dark at its low end (the high end of viridis_r)
                    share = float(norm(grid[i, j]))
                    dark = (share if cmap == "viridis" else 1 - share) < 0.5
                ax.text(j + 0.5, i + 0.5, words, ha="center", va="center", fontsize=7 if not ranged else 6.5,
                        color="white" if dark else "black")
        ax.set_xticks(np.arange(len(xs)) + 0.5, [_text(v) for v in xs], fontsize=7)
        ax.set_xlabel(x, fontsize=8)
        if y:
            ax.set_yticks(np.arange(len(ys)) + 0.5, [_text(v) for v in ys], fontsize=7)
            if n % cols == 0:
                ax.set_ylabel(y, fontsize=8)
        else:
            ax.set_yticks([])
        vals = vals if isinstance(vals, tuple) else (vals,)
        ax.set_title(_text(", ".join(label_part(k, v) for k, v in zip(others, vals) if v is not None and v == v)),
                     fontsize=8)
    for ax in axes.flat[len(shown):]:
        ax.set_visible(False)
    bar = fig.colorbar(mesh, ax=axes, shrink=0.9, label=TRAIN_SHORT.get(metric, title))
    if metric == "test_accuracy":  # as the cells write it
        from matplotlib.ticker import PercentFormatter

        bar.ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    more = f" (first {MAX_PANELS} of {len(panels)} panels; summary.csv has all)" if len(panels) > MAX_PANELS else ""
    spread = "\nmedian over replicates; below it, their range" if ranged else ""
    fig.suptitle(f"{title}{more}{spread}", fontsize=10 if not ranged else 9)
    save(fig, path)
    plt.close(fig)
    return path


def _activation(options: dict[str, Any]) -> str:
    return str(options.get("activation", "linear"))


def phase(summary: pd.DataFrame, manifest: dict[str, Any], path: Path) -> tuple[Path | None, list[str]]:
    """The measured order-to-chaos diagram over (sigma_w^2, sigma_b^2), one
    row per activation and depth: the mean |cos| of z between samples at the
    last layer beside the |c*| that mean-field theory says correlations
    settle to (varprop.theory.phase_grid), each with the critical line
    chi_1 = 1. Drawn when the sweep varies sigma_w^2 or sigma_b^2 (gain,
    bias_std) of a built-in non-orthogonal init."""
    if "abs_cos_pre" not in summary or summary["sigma_w2"].isna().all():
        return None, []
    acts = {t["label"]: _activation(t["options"]) for t in manifest["tasks"]}
    depths = {t["label"]: t["depth"] for t in manifest["tasks"]}
    s = summary.assign(activation=summary["config"].map(acts), depth=summary["config"].map(depths))
    s = s.dropna(subset=["sigma_w2", "abs_cos_pre"])
    # a diagram needs a few points: three values of sigma_w^2, or two of each
    panels = [(k, g) for k, g in s.groupby(["activation", "depth"], sort=False)
              if g["sigma_w2"].nunique() >= 2 and g["sigma_w2"].nunique() * g["sigma_b2"].nunique() >= 3]
    if not panels:
        return None, []
    plt = _plt()
    from .figures import _text, save

    shown = panels[:MAX_PANELS // 2]
    fig, axes = plt.subplots(len(shown), 2, figsize=(10, 0.6 + 3.3 * len(shown)), dpi=110, squeeze=False,
                             layout="constrained")
    notes = []
    mesh = None
    for row, ((act, depth), g) in zip(axes, shown):
        sw, sb = tuple(sorted(g["sigma_w2"].unique())), tuple(sorted(g["sigma_b2"].unique()))
        crit = _critical(act, sw, sb)
        measured = g.groupby(["sigma_b2", "sigma_w2"])["abs_cos_pre"].mean().unstack().reindex(index=sb, columns=sw)
        try:
            th = theory.phase_grid(act, np.array(sw), np.array(sb))
        except (KeyError, ValueError):  # an activation the theory does not know
            th = None
        for ax, grid, title in ((row[0], measured.to_numpy(float), f"measured at layer {depth}"),
                                (row[1], None if th is None else np.abs(th["c_star"].to_numpy()).reshape(
                                    len(sw), len(sb)).T, "mean-field |c*| (infinite depth)")):
            if grid is not None:
                mesh = ax.pcolormesh(_edges(sw), _edges(sb), grid, cmap="magma", vmin=0, vmax=1)
            if crit is not None:
                ax.plot(*crit, color="cyan", lw=1.8, label="chi_1 = 1 (theory)")
            ax.set_xlim(_edges(sw)[0], _edges(sw)[-1])
            ax.set_ylim(_edges(sb)[0], _edges(sb)[-1])
            ax.set_xlabel("sigma_w^2 = fan_in Var(W)", fontsize=8)
            ax.set_ylabel("sigma_b^2 = Var(b)", fontsize=8)
            ax.set_title(f"{_text(act)}: {title}", fontsize=9)
            ax.tick_params(labelsize=7)
        if crit is not None:
            row[0].legend(fontsize=7, loc="upper left")
        if th is not None:
            phase = pd.Series(th["phase"].to_numpy(), index=pd.MultiIndex.from_arrays([th["sigma_w2"], th["sigma_b2"]]))
            at = np.array([phase.get((w, b), "") for w, b in zip(g["sigma_w2"], g["sigma_b2"])])
            parts = []
            for name, mask in (("ordered (chi_1 < 1)", at == "ordered"), ("chaotic", at == "chaotic"),
                               ("exploding (no finite q*)", at == "exploding")):
                if mask.any():
                    v = g["abs_cos_pre"].to_numpy(float)[mask]
                    span = f"{np.nanmin(v):.2f}" if np.nanmin(v) == np.nanmax(v) else \
                        f"{np.nanmin(v):.2f} to {np.nanmax(v):.2f}"
                    parts.append(f"{span} at its {mask.sum()} {name} point{'s' if mask.sum() > 1 else ''}")
            notes.append(f"Order to chaos, {lit(act)} at {depth} layers: the mean |cos| of z between samples at the "
                         "last layer (1: every input on one direction) is " + "; ".join(parts) + ".")
    fig.colorbar(mesh, ax=axes, shrink=0.8, label="mean |cos| of z between samples")
    more = (f" (first {len(shown)} of {len(panels)} activation x depth panels; summary.csv has all)"
            if len(panels) > len(shown) else "")
    fig.suptitle("Order to chaos: how far inputs collapse onto one direction" + more, fontsize=10)
    save(fig, path)
    plt.close(fig)
    return path, notes


def _edges(v: Sequence[float]) -> np.ndarray:
    """Cell edges around sorted centres (a single value gets a cell of its own size)."""
    v = np.asarray(v, float)
    if len(v) == 1:
        half = max(abs(v[0]) * 0.1, 0.05)
        edges = np.array([v[0] - half, v[0] + half])
    else:
        mid = (v[1:] + v[:-1]) / 2
        edges = np.concatenate([[2 * v[0] - mid[0]], mid, [2 * v[-1] - mid[-1]]])
    if v[0] >= 0:  # variances: no negative axis
        edges[0] = max(edges[0], 0.0)
    return edges


@functools.lru_cache(maxsize=32)
def _critical(act: str, sw: tuple[float, ...], sb: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    """The critical line chi_1 = 1 as (sigma_w^2, sigma_b^2) points over the
    plotted range (one sigma_b^2: a vertical stroke through its cells)."""
    ew, eb = _edges(sw), _edges(sb)
    fine_w = np.linspace(max(ew[0], 1e-3), ew[-1], 60)
    fine_b = np.linspace(max(eb[0], 0.0), eb[-1], 12) if len(sb) > 1 else np.array([sb[0]])
    try:
        grid = theory.phase_grid(act, fine_w, fine_b)
    except (KeyError, ValueError):  # an activation the theory does not know (a user's)
        return None
    chi = grid["chi_1"].to_numpy().reshape(len(fine_w), len(fine_b))
    xs, ys = [], []
    for j, b in enumerate(fine_b):  # where chi_1 crosses 1 along sigma_w^2, at each sigma_b^2
        d = chi[:, j] - 1
        k = np.flatnonzero(np.sign(d[:-1]) != np.sign(d[1:]))
        if k.size:
            i = k[0]
            xs.append(fine_w[i] - d[i] * (fine_w[i + 1] - fine_w[i]) / (d[i + 1] - d[i]))
            ys.append(b)
    if len(sb) == 1 and xs:
        return np.array([xs[0], xs[0]]), eb
    return (np.array(xs), np.array(ys)) if xs else None


# --- the document ----------------------------------------------------------------------

def _fixes(summary: pd.DataFrame, by: list[str], key: str) -> bool:
    """Whether the values of the options ``by`` fix ``key``'s (a zip of the grid, or an option that
    applies to one value of another)."""
    return bool((summary.groupby(by, dropna=False)[key].nunique(dropna=False) <= 1).all())


def pairs(keys: Sequence[str], summary: pd.DataFrame, most: int = 3) -> list[tuple[str, str]]:
    """The option pairs the heatmaps show: depth x width first when the sweep varies both."""
    varied: list[str] = []
    for k in keys:  # an option zipped with one kept before it (samples with width) draws the same maps
        if summary[k].nunique(dropna=False) > 1 and k != "seed" and not any(
                _fixes(summary, [j], k) and _fixes(summary, [k], j) for j in varied):
            varied.append(k)
    out = []
    if "layers" in varied and ("width" in varied or "widths" in varied):
        out.append(("width" if "width" in varied else "widths", "layers"))
    for i, a in enumerate(varied):
        for b in varied[i + 1:]:
            if (a, b) not in out and (b, a) not in out:
                out.append((a, b))
    return out[:most]


def write_report(directory: Path | str, manifest: dict[str, Any] | None = None,
                 heatmaps: Sequence[tuple[str, str]] | None = None) -> Path:
    """(Re)draw ``directory/_report/``; return the HTML page's path.

    ``heatmaps`` names the (x, y) option pairs to map (default: depth x
    width when both vary, then other pairs, three at most).
    """
    from ..sweeps.store import FAILURES, REPORT, TMP, command_of, read_manifest

    directory = Path(directory)
    manifest = manifest or read_manifest(directory)
    if manifest is None:
        raise ValueError(f"{directory} holds no varprop sweep")
    failures = {}
    if (directory / FAILURES).is_file():
        import json

        failures = {k: v for k, v in json.loads((directory / FAILURES).read_text()).items()
                    if k in {t["key"] for t in manifest["tasks"]}}
    keys = manifest["keys"]
    for (a, b) in heatmaps or []:
        for k in (a, b):
            if k not in keys:
                raise ValueError(f"{k!r} is not an option the sweep varies ({', '.join(keys) or 'none'})")
    train = command_of(manifest) == "train"
    n_configs, sections = (_train_sections if train else _simulate_sections)(directory, manifest, failures, heatmaps)

    tmp = directory / f"{TMP}report.{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        doc = Document(_title(manifest))
        doc.p("Rerun or continue with:")
        grids = sorted(p.name for p in directory.glob("_grid*.toml"))
        doc.code(f"varprop sweep {directory / grids[0] if grids else 'GRID.toml'} --out {directory}"
                 + (f"\n# then, for the grids added with --extend: {', '.join(grids[1:])}" if len(grids) > 1 else ""))
        v = manifest["versions"]
        doc.p(f"varprop {v['varprop']}, dask {v.get('dask', '?')}, numpy {v['numpy']}, Python {v['python']}; "
              f"{len(manifest['tasks'])} tasks, {n_configs} configurations with results, {len(failures)} "
              "failed.")
        sections(doc, tmp)
        if failures:
            doc.h2("Failed tasks")
            doc.table(pd.DataFrame([{"configuration": lit(f["label"]), "replicates": f"{f['replicates'][0]}.."
                                     f"{f['replicates'][1] - 1}", "error": lit(f["error"])}
                                    for f in failures.values()]).head(MAX_ROWS))
            doc.p(f"Tracebacks in `{FAILURES}`. Rerunning the sweep retries these tasks.")
        doc.h2("The results")
        if train:
            doc.p("Two tables, each one Parquet file per task in its own folder, every file of a table with the same "
                  f"columns: `config` (the label), one column per option the grid varies "
                  f"({', '.join(f'`{k}`' for k in keys) or 'none'}), then `varprop train`'s own columns: `history/` "
                  "holds history.csv's (one row per configuration x replicate x record point), `layers/` "
                  "layers_over_training.csv's (the same x layer). Each file's `varprop_train` metadata holds the "
                  "run's options and data. Read them with:")
            doc.code(f"import pandas\nhistory = pandas.read_parquet({str(directory / 'history')!r})\n"
                     f"layers = pandas.read_parquet({str(directory / 'layers')!r})")
        else:
            doc.p("One Parquet file per task; every file has the same columns: `config` (the label), one column per "
                  f"option the grid varies ({', '.join(f'`{k}`' for k in keys) or 'none'}), then the per-layer table "
                  "of `varprop simulate` (`layers.csv`'s columns: replicate, layer, width, fan_in, fan_out, the "
                  "statistics of each side and the theory's predictions). Read them all with:")
            doc.code(f"import pandas\ndf = pandas.read_parquet({str(directory)!r})")
        document.write(doc, tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        target = directory / REPORT
        if target.exists():
            old = directory / f"{TMP}report-old.{secrets.token_hex(4)}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory / REPORT / "report.html"


# A report's own part: the number of configurations with results, and what adds its sections to the
# document and writes their figures and tables into the report's folder.
Sections = tuple[int, Callable[[Document, Path], None]]


def _simulate_sections(directory: Path, manifest: dict[str, Any], failures: dict[str, Any],
                       heatmaps: Sequence[tuple[str, str]] | None) -> Sections:
    keys = manifest["keys"]
    results = _read(directory, manifest)
    reps = per_replicate(results, keys)
    run = as_run(results, manifest) if not reps.empty else None
    summary = per_config(reps, manifest, run) if run is not None else pd.DataFrame(columns=["config", *keys])
    fit_table = pd.concat([fits(reps, keys, m) for m in ("out_log10_std", "grad_log10_std") if m in reps],
                          ignore_index=True) if not reps.empty else pd.DataFrame()

    def sections(doc: Document, tmp: Path) -> None:
        figures_done: list[tuple[str, str]] = []
        if not summary.empty:
            for x, y in (heatmaps or pairs(keys, summary)):
                for metric in HEATMAP_METRICS:
                    name = f"heatmap_{metric}_{y}_by_{x}.png"
                    if heatmap(summary, x, y, metric, keys, tmp / name):
                        figures_done.append((name, f"{METRICS[metric][2]} over {x} and {y}"))
            phase_path, phase_notes = phase(summary, manifest, tmp / "order_to_chaos.png")
        else:
            phase_path, phase_notes = None, []
        doc.h2("Findings")
        doc.items(findings(run, summary, fit_table, manifest, failures, phase_notes))
        if figures_done:
            doc.h2("Maps over two options")
            doc.p("Each cell is one configuration, averaged over its replicates (log10 std: the mean of log10 std, "
                  "the typical network). Red: the signal grows through the stack; blue: it shrinks. Panels hold "
                  "the other options fixed.")
            for name, alt in figures_done:
                doc.figure(name, alt)
        if phase_path is not None:
            doc.h2("Order to chaos")
            doc.p("sigma_w^2 and sigma_b^2 are simulate's options as mean-field theory names them: with `init = "
                  "\"fan_in\"` and normal weights, Var W = gain^2 / fan_in, so sigma_w^2 = gain^2; sigma_b = "
                  "`bias_std`. The inputs start independent (cosine near 0). Left: the mean |cos| of z between "
                  "pairs of samples at the last layer, measured; right: |c*|, the correlation mean-field theory says "
                  "inputs settle to at infinite depth (varprop.theory.phase_grid). The cyan line is chi_1 = "
                  "sigma_w^2 E[phi'(z)^2] at the fixed point q* = 1: on its ordered side (chi_1 < 1) every input "
                  "ends up on one direction (|c*| = 1), on its chaotic side inputs stay apart. Near the line the "
                  "correlation depth scale xi_c diverges, so a network of finite depth has not reached c* there. "
                  "The absolute value matters: for odd activations without bias (tanh), collapsing pairs go to +1 "
                  "or -1 and the signed mean stays near 0. At sigma_b^2 = 0 on the ordered side q* = 0: the signal "
                  "dies away and tanh acts as a linear map, which keeps correlations as they were, so |c*| = 1 "
                  "(the limit of small sigma_b) is not what a network shows there.")
            doc.figure(phase_path.name, "Measured mean |cos| at the last layer and mean-field |c*| over "
                       "(sigma_w^2, sigma_b^2), with the critical line")
        if not fit_table.empty:
            doc.h2("Fitted exponents")
            doc.p("Along each numeric option, with the other options fixed (`group`): the slope of the last layer's "
                  "log10 std (or, for `grad_log10_std`, the input gradient's) on log10 of the option, i.e. the "
                  "exponent b of std ~ option^b (0.5 for one layer of N(0, 1) weights across widths: the "
                  "sqrt(fan_in) law); along `layers`, and options that take 0 or less, on the option itself (log10 "
                  "std gained per layer). Replicate r of every configuration shares its random draws, so the slope "
                  "is fitted on each replicate and the 95% interval is a t interval over replicates.")
            shown = fit_table.head(MAX_ROWS)
            doc.table(pd.DataFrame({
                "option": shown["option"], "metric": shown["metric"], "group": shown["group"].map(lit),
                "slope": shown["slope"].map(lambda x: fmt(x, 4)),
                "95% interval": [f"[{fmt(lo, 4)}, {fmt(hi, 4)}]" if np.isfinite(lo) else "" for lo, hi in
                                 zip(shown["lo"], shown["hi"])],
                "values": shown["values"], "replicates": shown["replicates"]}))
            if len(fit_table) > MAX_ROWS:
                doc.p(f"The first {MAX_ROWS} of {len(fit_table)} fits; `fits.csv` beside this report has all.")
        if not summary.empty:
            doc.h2("Configurations")
            doc.table(_summary_table(summary.head(MAX_ROWS), keys))
            if len(summary) > MAX_ROWS:
                doc.p(f"The first {MAX_ROWS} of {len(summary)} configurations; `summary.csv` has all.")
        summary.to_csv(tmp / "summary.csv", index=False)
        fit_table.to_csv(tmp / "fits.csv", index=False)

    return len(summary), sections


# --- a train sweep ---------------------------------------------------------------------

def read_train(directory: Path, manifest: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """A train sweep's finished tasks: history and per-layer rows in grid
    order, and per configuration the run's facts its tasks recorded (the
    ``varprop_train`` metadata: options, data, steps per epoch)."""
    import json

    import pyarrow.parquet as pq

    from ..sweeps.store import result_path

    history, layers, facts = [], [], {}
    for task in manifest["tasks"]:
        h, l = (result_path(directory, task["key"], table) for table in ("history", "layers"))
        if h.exists() and l.exists():
            history.append(pd.read_parquet(h))
            layers.append(pd.read_parquet(l))
            facts.setdefault(task["label"], json.loads(pq.read_schema(h).metadata[b"varprop_train"]))
    if not history:
        return pd.DataFrame(), pd.DataFrame(), {}
    return pd.concat(history, ignore_index=True), pd.concat(layers, ignore_index=True), facts


def train_meta(manifest: dict[str, Any], history: pd.DataFrame, facts: dict[str, Any]) -> dict[str, Any]:
    """What :mod:`varprop.report.training` reads of a run (config.json's
    shape), for the configurations with results: each one's options (its
    seed too, where the grid varies it: configurations of two seeds are not
    each other's pairs), the grid keys' values as what it varies, steps per
    epoch, and the most replicates any configuration has finished."""
    values = {t["label"]: t["values"] for t in manifest["tasks"]}
    configs = [{"label": label, "varied": {k: v for k, v in values[label].items() if v is not None},
                "options": {**f["options"], **({"seed": f["run"]["seed"]} if "seed" in values[label] else {})}}
               for label, f in facts.items()]
    first = next(iter(facts.values()))
    return {"configs": configs,
            "run": {**first["run"], "replicates": int(history.groupby("config")["replicate"].nunique().max())},
            "data": {**first["data"], "probe_samples": {label: f["probe_samples"] for label, f in facts.items()}},
            "steps_per_epoch": {label: f["steps_per_epoch"] for label, f in facts.items()}}


def train_summary(history: pd.DataFrame, manifest: dict[str, Any], labels: Sequence[str]) -> pd.DataFrame:
    """One row per configuration: the grid keys' values and, per
    :data:`TRAIN_METRICS`, the median over replicates of the last epoch's
    value and the replicates' range (``_lo``, ``_hi``); NaN where a
    replicate diverged (``diverged``: how many)."""
    from .training import final_rows

    keys = manifest["keys"]
    values = {t["label"]: t["values"] for t in manifest["tasks"]}
    runs = history[["config", "replicate"]].drop_duplicates()
    final = runs.merge(final_rows(history)[["config", "replicate", *TRAIN_METRICS]], how="left")
    bad = history[history["train_loss_keras"].isna() & (history["step"] > 0)][["config", "replicate"]]
    diverged = final.set_index(["config", "replicate"]).index.isin(bad.set_index(["config", "replicate"]).index)
    final.loc[diverged, list(TRAIN_METRICS)] = np.nan
    final["diverged"] = diverged
    rows = []
    for label in labels:
        f = final[final["config"] == label]
        row = {"config": label, **{k: values[label].get(k) for k in keys}, "replicates": len(f),
               "diverged": int(f["diverged"].sum())}
        for metric in TRAIN_METRICS:
            v = f[metric].to_numpy(float)
            row[metric] = float(np.median(v)) if len(v) else math.nan  # NaN when any replicate diverged
            row[f"{metric}_lo"], row[f"{metric}_hi"] = (float(v.min()), float(v.max())) if len(v) else (math.nan,) * 2
        rows.append(row)
    return pd.DataFrame(rows)


def _train_findings(history: pd.DataFrame, layers: pd.DataFrame, meta: dict[str, Any], summary: pd.DataFrame,
                    manifest: dict[str, Any], failures: dict[str, Any]) -> list[Item]:
    """The range of the final test accuracy and training loss over the grid,
    then a training report's own findings (varprop.report.training)."""
    from . import training

    out: list[Item] = []
    n_tasks = len(manifest["tasks"])
    if failures:
        out.append(f"**{len(failures)} of {n_tasks} tasks failed** (see *Failed tasks*); the maps below show the "
                   "configurations that finished.")
    if summary.empty:
        return out + ["No task has finished yet."]
    ok = summary.dropna(subset=["test_accuracy"])
    if len(ok) > 1:
        parts = []
        for metric, (title, fmt_cell) in TRAIN_METRICS.items():
            better = ok[metric].idxmax() if metric == "test_accuracy" else ok[metric].idxmin()
            worse = ok[metric].idxmin() if metric == "test_accuracy" else ok[metric].idxmax()
            b, w = ok.loc[better], ok.loc[worse]
            if fmt_cell(b[metric]) == fmt_cell(w[metric]):
                parts.append(f"the {title} is {fmt_cell(b[metric])} in every configuration")
            else:
                parts.append(f"the {title} runs from {fmt_cell(w[metric])} ({lit(w['config'])}) to "
                             f"**{fmt_cell(b[metric])}** (**{lit(b['config'])}**)")
        n = sorted(set(ok["replicates"]))
        out.append(f"Over the grid, {parts[0]}; {parts[1]}. Medians over {n[0]}{f' to {n[-1]}' if len(n) > 1 else ''} "
                   f"replicate{'s' if n[-1] > 1 else ''}; the maps show each configuration with its replicates' "
                   "range.")
    out += training.findings(history, meta, layers)
    done = sum(1 for t in manifest["tasks"] if t["label"] in set(summary["config"]))
    if done < n_tasks and not failures:
        out.append(f"{done} of {n_tasks} tasks have finished; rerun the sweep to finish the others.")
    return out


def _train_pairs(keys: Sequence[str], summary: pd.DataFrame) -> list[tuple[str, str | None]]:
    """The option pairs a train sweep maps (:func:`pairs`), or the one option it varies, as a single row."""
    found: list[tuple[str, str | None]] = list(pairs(keys, summary))
    if not found:
        found = [(k, None) for k in keys if k != "seed" and summary[k].nunique(dropna=False) > 1][:1]
    return found


def _train_sections(directory: Path, manifest: dict[str, Any], failures: dict[str, Any],
                    heatmaps: Sequence[tuple[str, str]] | None) -> Sections:
    from . import training

    keys = manifest["keys"]
    history, layers, facts = read_train(directory, manifest)
    meta = train_meta(manifest, history, facts) if facts else None
    summary = train_summary(history, manifest, list(facts)) if facts else pd.DataFrame(columns=["config", *keys])

    def sections(doc: Document, tmp: Path) -> None:
        doc.h2("Findings")
        doc.items(_train_findings(history, layers, meta or {}, summary, manifest, failures))
        if meta is None:
            summary.to_csv(tmp / "summary.csv", index=False)
            return
        run, data = meta["run"], meta["data"]
        # one run's settings stand for the grid's unless the grid varies them (an --extend can)
        gridded = "as the grid sets it"
        epochs = f"epochs {gridded}" if "epochs" in keys else training.epochs(run["epochs"])
        doc.p(f"**Data**: {gridded if 'data' in keys else lit(data['name'])}. **Training**: {epochs}, up to "
              f"{run['replicates']} replicate{'s' if run['replicates'] > 1 else ''} per configuration (seed tree "
              f"{gridded if 'seed' in keys else run['seed']}: replicate r of every configuration starts from the "
              f"same kernels and sees the same batches), {gridded if 'dtype' in keys else run['dtype']}; every "
              "task is one `varprop train` run of its configuration, the same numbers.")
        maps: list[tuple[str, str]] = []
        for x, y in (heatmaps or _train_pairs(keys, summary)):
            for metric, (title, _) in TRAIN_METRICS.items():
                name = f"heatmap_{metric}_{y}_by_{x}.png" if y else f"heatmap_{metric}_by_{x}.png"
                if heatmap(summary, x, y, metric, keys, tmp / name):
                    maps.append((name, f"{title} over {x}" + (f" and {y}" if y else "")))
        if maps:
            doc.h2("Maps over the grid's options")
            doc.p("Each cell is one configuration: the median over its replicates of the value at the last epoch, "
                  "and below it the replicates' range, the band `varprop train`'s loss curves draw (the table "
                  "further down gives the test accuracy's mean with its 95% t interval, as its report does). "
                  "Yellow is better. A configuration with a diverged replicate shows *diverged*. Panels hold the "
                  "other options fixed.")
            for name, alt in maps:
                doc.figure(name, alt)
        labels = [c["label"] for c in meta["configs"]]
        shown = {**meta, "configs": meta["configs"][:MAX_PANELS]}
        keep = set(labels[:MAX_PANELS])
        h, lay = history[history["config"].isin(keep)], layers[layers["config"].isin(keep)]
        more = (f" The first {MAX_PANELS} of {len(labels)} configurations (the data has all)."
                if len(labels) > MAX_PANELS else "")
        doc.h2("Loss curves")
        doc.figure(training.loss_curves(h, shown, tmp / "loss_curves.png").name,
                   "Training loss (Keras' definition: mean of the batch losses over the epoch), test loss and test "
                   "error per epoch; BN dashed, no BN solid; median over replicates, band: their range.")
        if more:
            doc.p(more.strip())
        doc.h2("Configurations")
        target = training.target_loss(history)
        doc.p("Medians over replicates at the last epoch, as `varprop train`'s report gives them; the test accuracy "
              "is the mean with its 95% t interval. " + training.epochs_to_note(target))
        table = training.summary_table(history, meta, target)
        table["configuration"] = table["configuration"].map(lit)
        doc.table(table.head(MAX_ROWS))
        if len(table) > MAX_ROWS:
            doc.p(f"The first {MAX_ROWS} of {len(table)} configurations; `summary.csv` has all.")
        doc.h2("Per-layer statistics over training")
        doc.p("Per layer and record point, the median over replicates on each run's fixed probe of training images "
              "(`varprop train`'s figures; `layers/` holds every number)." + more)
        for key, title, log in training.HEATMAPS:
            if key == "frac_saturated" and not lay[key].fillna(0).gt(0).any():
                continue  # nothing saturates: a blank figure says nothing
            doc.figure(training.layer_heatmap(lay, shown, key, title, log, tmp / f"layers_{key}.png").name, title)
        summary.to_csv(tmp / "summary.csv", index=False)

    return len(summary), sections


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _title(manifest: dict[str, Any]) -> str:
    keys = manifest["keys"]
    n = len({t["config_key"] for t in manifest["tasks"]})
    what = "training runs" if manifest.get("command") == "train" else "configurations"
    return f"varprop sweep: {n} {what}" + (f" over {' x '.join(keys)}" if keys else "")


def _summary_table(summary: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    out = pd.DataFrame({"configuration": summary["config"].map(lit)})
    out["replicates"] = summary["replicates"].astype(int)
    out["verdict"] = summary["verdict"]
    if "out_log10_std" in summary:
        out["output std (typical)"] = summary["out_log10_std"].map(fmt_pow10)
        out["output std (mean network)"] = summary["out_log10_rms_std"].map(fmt_pow10)
    if "theory_out_log10_std" in summary:
        out["mean-field output std"] = summary["theory_out_log10_std"].map(fmt_pow10)
    if "grad_log10_std" in summary and summary["grad_log10_std"].notna().any():
        out["input gradient std"] = summary["grad_log10_std"].map(fmt_pow10)
    if "abs_cos" in summary:
        out["mean abs cos (last layer)"] = summary["abs_cos"].map(lambda x: fmt(x, 3))
    if summary["sigma_w2"].notna().any():
        out["sigma_w^2"] = summary["sigma_w2"].map(lambda x: fmt(x, 4))
        out["sigma_b^2"] = summary["sigma_b2"].map(lambda x: fmt(x, 4))
    return out

"""Matplotlib figures of a run (Agg backend: files only, no display)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

# Beyond this, 10 ** log10_std does not fit a float64 axis: plot log10 itself.
_MAX_LOG10 = 300.0


def std_per_layer(layers: pd.DataFrame, summary: pd.DataFrame, path: Path) -> Path:
    """Std of each layer's output (and, with a backward pass, of the gradient),
    one line per configuration, on a log axis.

    Solid: the mean network (sqrt of the mean variance over replicates);
    dashed: the typical network (geometric mean); band: the range over
    replicates.
    """
    sides = [("post", "std of layer output")]
    if "grad_log10_std" in layers:
        sides.append(("grad", "std of gradient w.r.t. layer output"))
    n_configs = summary["config"].nunique()
    legend_rows = math.ceil(n_configs / 3)
    fig, axes = plt.subplots(1, len(sides), figsize=(6.5 * len(sides), 4.2 + 0.22 * legend_rows), dpi=120,
                             squeeze=False)
    for ax, (side, label) in zip(axes[0], sides):
        _panel(ax, layers, summary, side, label)
    n_rep = int(layers["replicate"].nunique())
    title = "Std per layer (dotted: mean-field theory)"
    if n_rep > 1:
        title += f": mean network (solid), typical network (dashed), range over {n_rep} replicates"
    fig.suptitle(title, fontsize=10)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * legend_rows * 4.2 / (4.2 + 0.22 * legend_rows), 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def _panel(ax: plt.Axes, layers: pd.DataFrame, summary: pd.DataFrame, side: str, label: str) -> None:
    col = f"{side}_log10_std"
    finite = layers[col].replace([np.inf, -np.inf], np.nan).dropna()
    as_log10 = finite.abs().max() > _MAX_LOG10 if len(finite) else False
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "-.", ":"]
    for i, (config, s) in enumerate(summary.groupby("config", sort=False)):
        color = colors[i % len(colors)]
        style = styles[(i // len(colors)) % len(styles)]
        y = lambda v: np.asarray(v, dtype=float) if as_log10 else 10.0 ** np.asarray(v, dtype=float)  # noqa: E731
        ax.plot(s["layer"], y(s[f"{side}_log10_rms_std"]), color=color, ls=style, lw=1.8, label=f"{config}")
        if f"theory_{side}_log10_std" in s and s[f"theory_{side}_log10_std"].notna().any():
            ax.plot(s["layer"], y(s[f"theory_{side}_log10_std"]), color="black", ls=":", lw=1.1,
                    label="mean-field theory" if i == 0 else None)
        reps = layers[layers["config"] == config]
        if reps["replicate"].nunique() > 1:
            ax.plot(s["layer"], y(s[f"{side}_log10_typical_std"]), color=color, lw=1.2, ls="--")
            g = reps.groupby("layer")[col]
            ax.fill_between(g.min().index, y(g.min()), y(g.max()), color=color, alpha=0.15, lw=0)
    if not as_log10:
        ax.set_yscale("log")
    ax.set_xlabel("layer l (0 = input)")
    ax.set_ylabel(f"log10 {label}" if as_log10 else f"{label} (log scale)")
    ax.grid(True, which="major", alpha=0.3)


def fan_in_law(points: pd.DataFrame, result: object, path: Path) -> Path:
    """Log-log plot of one layer's output std against fan_in: the points, the
    fitted line and the mean-field line."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=120)
    ax.scatter(points["fan_in"], 10.0 ** points["log10_std"], s=14, alpha=0.6, label="measured (one per replicate)")
    grid = np.geomspace(points["fan_in"].min(), points["fan_in"].max(), 100)
    fit_line = 10.0 ** (result.intercept + result.slope * np.log10(grid))
    ax.plot(grid, fit_line, lw=1.8, label=f"fit: b = {result.slope:.3f} ± {result.slope_se:.3f}")
    th = points.groupby("fan_in")["theory_log10_std"].first()
    if th.notna().all():
        ax.plot(th.index, 10.0 ** th.to_numpy(), "k:", lw=1.5, label="mean-field theory")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("fan_in (inputs per unit)")
    ax.set_ylabel("std of the layer's output")
    ax.set_title("One layer's output std against fan_in", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

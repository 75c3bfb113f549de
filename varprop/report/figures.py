"""Matplotlib figures of a run (Agg backend: files only, no display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

# Beyond this, 10 ** log10_std does not fit a float64 axis: plot log10 itself.
_MAX_LOG10 = 300.0


def std_per_layer(layers: pd.DataFrame, summary: pd.DataFrame, path: Path, side: str = "post") -> Path:
    """Std of each layer's output, one line per configuration, on a log axis.

    Solid: the mean network (sqrt of the mean variance over replicates);
    dashed: the typical network (geometric mean); band: the range over
    replicates.
    """
    col = f"{side}_log10_std"
    finite = layers[col].replace([np.inf, -np.inf], np.nan).dropna()
    as_log10 = finite.abs().max() > _MAX_LOG10 if len(finite) else False
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (config, s) in enumerate(summary.groupby("config", sort=False)):
        color = colors[i % len(colors)]
        y = lambda v: np.asarray(v, dtype=float) if as_log10 else 10.0 ** np.asarray(v, dtype=float)  # noqa: E731
        ax.plot(s["layer"], y(s[f"{side}_log10_rms_std"]), color=color, lw=1.8, label=f"{config}")
        reps = layers[layers["config"] == config]
        if reps["replicate"].nunique() > 1:
            ax.plot(s["layer"], y(s[f"{side}_log10_typical_std"]), color=color, lw=1.2, ls="--")
            g = reps.groupby("layer")[col]
            ax.fill_between(g.min().index, y(g.min()), y(g.max()), color=color, alpha=0.15, lw=0)
    if not as_log10:
        ax.set_yscale("log")
    ax.set_xlabel("layer l (0 = input)")
    ax.set_ylabel("log10 std of layer output" if as_log10 else "std of layer output (log scale)")
    n_rep = int(layers["replicate"].nunique())
    title = "Output std per layer"
    if n_rep > 1:
        title += f": mean network (solid), typical network (dashed), range over {n_rep} replicates"
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(title="configuration", fontsize=8, title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

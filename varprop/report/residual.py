"""The residual part of a simulate report: per block the skip's and the
branch's variance and their ratio, the signal-propagation plot (NFNets'
average squared channel mean and average channel variance, and res_avg_var),
and the findings particular to residual stacks (branches switched off,
correlation collapse).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..run import Run  # noqa: E402
from .document import Document, lit  # noqa: E402
from .figures import ZOOM_DECADES, _text, hidden_notes, legend_below_and_save, rounding_zeros  # noqa: E402
from .markdown import _log10_second_moment, fmt_pow10, shown_layers  # noqa: E402

# A branch adding less than this share of the stream's second moment is "switched off": the skip alone
# carries the signal.
OFF_RATIO = 1e-6


def is_residual(run: Run) -> bool:
    return "branch_second_moment" in run.layers


# Branch activations whose E[phi(z)^2] is proportional to E[z^2] when z is symmetric: the q-map is linear in q.
_PROPORTIONAL = ("linear", "relu", "leaky_relu")


def theory_scope(options: dict[str, Any]) -> str:
    """Where the residual recursion is exact for networks of any width and where it is the infinite-width
    limit, for one configuration (its resolved options, as config.json holds them)."""
    scheme = options.get("residual")
    stages = bool(options.get("projection"))
    restart = " (restarting from 1 + alpha^2 after each projection shortcut)" if stages else ""
    if scheme in ("skipinit", "fixup") and not stages:
        return ("exact at any width: the block is the identity at init (a zero branch), forward and backward, "
                "bit for bit")
    try:
        from ..spec import from_options

        distribution = from_options(options).network.init.resolve().distribution
    except Exception:  # a user's init, which this reading cannot import: nothing is claimed for it
        distribution = None
    if scheme == "nf":
        return ("an infinite-width limit: weight standardisation centres each unit's weights, so Var z is the "
                "input's variance over units (n/(n-1) of the theory's), and gamma is exact only for a unit "
                f"Gaussian input; the stream's expected variance 1 + l alpha^2{restart} holds within O(1/width)")
    if scheme == "bn-end" and options.get("bn") != "all":
        return ("forward: exact at any width up to eps (batch norm gives every branch channel unit variance over "
                f"the batch, so alpha^2 E[f^2] = alpha^2 and q_l = q_0 + l alpha^2{restart} in the mean); backward: "
                "through batch norm, not modelled")
    if options.get("bn") == "all":
        return ("an infinite-width limit: batch norm inside the branch normalises by the batch's own statistics, "
                "which the q-map reads as q / (q + eps); backward through batch norm is not modelled")
    zero = ("the branches are zero at init, and the projection shortcuts carry the signal: "
            if scheme in ("skipinit", "fixup") else "")
    act = options.get("activation")
    # The lead activation reads the stream only where a branch adds to it: zero branches (skipinit, fixup) keep
    # the stream a projection's Gaussian output, symmetric, as in the original order.
    if act in _PROPORTIONAL and distribution == "normal" and (
            act == "linear" or options.get("branch_order") == "original" or zero):
        return (zero + "forward second moments: the exact mean over networks at any width (each unit of h W "
                "is Gaussian given the layer below and E[phi(z)^2] is proportional to E[z^2], so the recursion is "
                "linear and commutes with the mean); one network fluctuates about it and, deep enough, the typical "
                "network falls below the mean (the band); the backward recursion (gradient independence) and the "
                "correlations are infinite-width limits")
    if act in _PROPORTIONAL and distribution == "normal":
        return (zero + "an infinite-width limit: the branch's leading activation reads the stream itself, whose "
                "units are not symmetric about 0 at finite width after the first block (the skip plus "
                f"{act}-fed branches), so E[phi(x)^2] is not the fixed share of E[x^2] the recursion takes: the "
                "mean runs above it by O(1/width) per block, compounding (in the original order, dense -> "
                "activation, the recursion is exact at any width); the backward recursion and the correlations are "
                "infinite-width limits too")
    return (zero + "an infinite-width limit: E[phi(z)^2] is not linear in the layer's variance (or the weights are "
            "not Gaussian), so finite width biases the mean by O(1/width) per dense layer, compounding over blocks")


def block_table(layers: pd.DataFrame) -> pd.DataFrame:
    """Per configuration and block, over replicates (log10 means: the typical network): the skip's second
    moment (the block's input), alpha^2 E[f^2], their ratio, res_avg_var and the theory's ratio."""
    rows = []
    for (config, rep), df in layers.groupby(["config", "replicate"], sort=False):
        df = df.sort_values("layer")
        post = _log10_second_moment(df, "post")
        pre = _log10_second_moment(df, "pre")
        theory_post = np.log10(df["theory_post_second_moment"].to_numpy(float)) if "theory_post_second_moment" \
            in df else np.full(len(df), np.nan)
        with np.errstate(divide="ignore"):
            theory_pre = np.log10(df["theory_pre_second_moment"].to_numpy(float)) if "theory_pre_second_moment" \
                in df else np.full(len(df), np.nan)
            res_var = np.log10(df["branch_unit_var"].to_numpy(float))
        for i in range(1, len(df)):
            rows.append({"config": config, "replicate": rep, "block": int(df["layer"].iloc[i]),
                         "skip": post[i - 1], "added": pre[i], "ratio": pre[i] - post[i - 1], "res_avg_var": res_var[i],
                         "theory_ratio": theory_pre[i] - theory_post[i - 1], "stream": post[i]})
    per_rep = pd.DataFrame(rows)
    with np.errstate(invalid="ignore"):
        return per_rep.groupby(["config", "block"], sort=False).mean(numeric_only=True).reset_index()


def spp_figure(run: Run, path: Path) -> Path:
    """The signal-propagation plot per block (Brock et al. 2021, figure 1): average squared channel mean and
    average channel variance of the stream, and the branch's average channel variance (res_avg_var); log10 of
    the replicate means (a line stops where its mean leaves float64)."""
    layers = run.layers
    reps = run.replicates
    panels = [("post_sq_unit_mean", "avg squared channel mean"), ("post_unit_var", "avg channel variance"),
              ("branch_unit_var", "res_avg_var (branch, before alpha)")]
    lines: dict[tuple[str, str], tuple[pd.Series, pd.Series, pd.Series]] = {}  # log10 of mean, min, max per block
    with np.errstate(divide="ignore"):
        for col, _ in panels:
            for config, df in layers.groupby("config", sort=False):
                by_block = df.groupby("layer")[col]
                m = by_block.mean()
                if col == "post_sq_unit_mean":  # 0 but for rounding (behind batch norm): left out
                    m = m[~rounding_zeros(m, df.groupby("layer")["post_unit_var"].mean())]
                m = m[(m > 0) & np.isfinite(m)]  # beyond float64 (2^1000 blocks of alpha = 1) the line stops
                lo, hi = by_block.min().reindex(m.index), by_block.max().reindex(m.index)
                lines[col, config] = (np.log10(m), np.log10(lo.where(lo > 0)), np.log10(hi.where(np.isfinite(hi))))
    # An exploding stack (hundreds of decades) flattens every other line: a second row then zooms on the
    # configurations that stay within ZOOM_DECADES.
    tame = [c for c in dict.fromkeys(c for _, c in lines)
            if all(lines[col, c][0].abs().max() <= ZOOM_DECADES for col, _ in panels)]
    rows = [list(dict.fromkeys(c for _, c in lines))]
    if tame and len(tame) < len(rows[0]):
        rows.append(tame)
    fig, axes = plt.subplots(len(rows), 3, figsize=(12, 3.4 * len(rows) + 0.4), squeeze=False)
    drawn = []  # each panel, its quantity, and the configurations whose hidden lines it names
    for r, shown in enumerate(rows):
        for ax, (col, title) in zip(axes[r], panels):
            for i, config in enumerate(rows[0]):
                if config not in shown:
                    continue
                mean, lo, hi = lines[col, config]
                color = f"C{i % 10}"
                ax.plot(mean.index, mean.to_numpy(), label=_text(config), color=color,
                        linestyle=("-", "--", ":")[i // 10 % 3])  # more configurations than colours
                if reps > 1:  # single networks: the finite-width band about the mean
                    keep = np.isfinite(lo) & np.isfinite(hi)
                    ax.fill_between(mean.index[keep], lo[keep].to_numpy(), hi[keep].to_numpy(), color=color,
                                    alpha=0.15, lw=0)
            ax.set_ylabel("log10")
            ax.set_xlabel("block")
            ax.set_title(title + (" (zoom)" if r else ""), fontsize=10)
            ax.grid(alpha=0.3)
            # The zoom row shows the tame configurations: above it, only the others' lines can hide.
            names = {_text(c) for c in shown if len(rows) == 1 or r or c not in rows[1]}
            drawn.append((ax, title + (" (zoom)" if r else ""), "", names))
    fig.suptitle("Signal propagation per block: log10 of the mean over replicates"
                 + (f"; shaded: the range of the {reps} single networks" if reps > 1 else "")
                 + (f"\nsecond row: the configurations that stay within 1e±{ZOOM_DECADES}" if len(rows) > 1 else ""),
                 fontsize=10)
    handles, labels = axes[0][0].get_legend_handles_labels()
    return legend_below_and_save(fig, handles, labels, path, hidden_notes(drawn, len(drawn)))


def findings(run: Run) -> list[tuple[str, str]]:
    """(configuration, finding) where branches are switched off (the skip alone carries the signal); a
    collapse is the verdict's."""
    out: list[tuple[str, str]] = []
    table = block_table(run.layers)
    for config, df in table.groupby("config", sort=False):
        off = df[df["ratio"] < math.log10(OFF_RATIO)]
        if len(off) == len(df):
            out.append((config, f"every branch is switched off at init (it adds less than {OFF_RATIO:g} of the "
                                "stream's second moment): the skip alone carries the signal, forward and backward; "
                                "the network is the identity until training moves the branches"))
        elif len(off):
            out.append((config, f"branches switched off from block {int(off['block'].iloc[0])} ({len(off)} of "
                                f"{len(df)} blocks add less than {OFF_RATIO:g} of the stream): the skip alone "
                                "carries the signal there"))
    return out


def section(doc: Document, run: Run, figure: str) -> None:
    """The "Residual blocks" section: the signal-propagation plot and the per-block table."""
    doc.h2("Residual blocks")
    doc.p("Each block is x_l = x_(l-1) + alpha f(x_(l-1) / beta): the skip carries x_(l-1), the branch adds "
          "alpha f. In the tables and figures of this report a row is a block: `post` is the stream x_l, `pre` "
          "is alpha f (what the block adds), and `branch_*` in layers.csv is f before alpha (its average channel "
          "variance is NFNets' res_avg_var). Backward, `delta` is the branch's share of the gradient reaching the "
          "block's input and `weight grad norm` covers all the block's weights.")
    if any(c.options.get("projection") for c in run.configs):
        doc.p("Where the width changes (a stage's first block) the skip is a projection shortcut, a dense layer P: "
              "x_l = P h + alpha f, h being the branch's input after its lead ([BN ->] activation, as in He et al. "
              "2016's pre-activation blocks and NF-ResNets' transition blocks, whose expected variance starts "
              "again from 1 + alpha^2) or, in the original order, x_(l-1). The theory carries the skip's second "
              "moment, cosine and gradient through P; the per-block table's skip column, and the branch/skip "
              "ratio, still read the block's input there.")
    doc.figure(figure, "Signal propagation per block: average squared channel mean and average channel variance "
               "of the stream, and the branch's average channel variance (a squared channel mean of 0 but for "
               "rounding, behind batch norm, is not drawn; a channel of zero mean still shows the mean of its N "
               "samples, whose square averages its variance / N: the floor of that line)")
    doc.p("Second moments add through a block (the branch's last dense layer has zero-mean weights, so skip and "
          "branch are uncorrelated): q_l = q_(l-1) + alpha^2 E[f^2]. With alpha = 1 and a variance-preserving "
          "branch q doubles per block (2^L); alpha = 1/sqrt(L) multiplies it by 1 + 1/L per block, (1 + 1/L)^L ~ e in "
          "all; batch norm at the end of the "
          "branch makes E[f^2] = 1 and q_l = q_0 + l alpha^2 (De & Smith 2020); SkipInit (alpha = 0) and Fixup "
          "(a zero last layer) are the identity at init; NF-ResNets divide the branch's input by beta_l = "
          "sqrt(1 + sum_(i<l) alpha_i^2) and keep Var f = 1 (Brock et al. 2021). The theory columns follow "
          "this recursion with the branch's mean-field q-map. One network's log-variance drifts below the mean's "
          "by a random walk (the typical network): the shaded range of single networks in the std figure and in "
          "the signal-propagation plot is that finite-width band. Where the theory is exact at any width, and "
          "where it is the infinite-width limit:")
    scopes: dict[str, list[str]] = {}
    for c in run.meta["configs"]:
        scopes.setdefault(theory_scope(c["options"]), []).append(lit(c["label"]))
    doc.items([f"{'; '.join(labels)}: {scope}." for scope, labels in scopes.items()])
    table = block_table(run.layers)
    for config, df in table.groupby("config", sort=False):
        shown = set(shown_layers(int(df["block"].max())))
        df = df[df["block"].isin(shown)]
        if table["config"].nunique() > 1:
            doc.h3(lit(config))
        doc.table(pd.DataFrame({
            "block": df["block"],
            "skip E[x^2]": [fmt_pow10(v) for v in df["skip"]],
            "alpha^2 E[f^2]": [fmt_pow10(v) for v in df["added"]],
            "branch / skip": [fmt_pow10(v) for v in df["ratio"]],
            "theory branch / skip": [fmt_pow10(v) for v in df["theory_ratio"]],
            "res_avg_var": [fmt_pow10(v) for v in df["res_avg_var"]],
        }))
    doc.items([
        "*skip E[x^2]*: the second moment of the block's input, carried unchanged by the skip (where a "
        "projection shortcut changes the width, still the block's input, before the projection); *alpha^2 E[f^2]*: "
        "that of what the branch adds; *branch / skip*: their ratio (10 to the mean of its log10 over "
        "replicates), and the theory's;",
        "*res_avg_var*: the branch's output f (before alpha), its variance per unit over samples, averaged over "
        "units (NFNets' measure).",
    ])

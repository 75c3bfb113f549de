"""Matplotlib figures of a run (Agg backend: files only, no display)."""

from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path
from typing import Any, Callable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.layout_engine import TightLayoutEngine  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, LogFormatterSciNotation, MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .. import forked  # noqa: E402
from ..run import Run  # noqa: E402
from ..spec import label_part  # noqa: E402
from .document import visible  # noqa: E402
from .markdown import (as_rows, histogram_configs, mean_columns, row_unit, signed_means,  # noqa: E402
                       varied_values)

# Beyond this, 10 ** log10_std does not fit a float64 axis: plot log10 itself.
_MAX_LOG10 = 300.0


# A squared channel mean below this share of the channel variance is 0 but for float rounding (batch norm's
# output, 1e-17): drawn on a log axis it would stretch the axis over ten decades of nothing.
ROUNDING_ZERO = 1e-12


def rounding_zeros(sq_mean: Any, var: Any) -> Any:
    """Where a squared mean is 0 to rounding of its variance (:data:`ROUNDING_ZERO`)."""
    return np.asarray(sq_mean, float) < ROUNDING_ZERO * np.asarray(var, float)


def tight(fig: plt.Figure, rect: tuple[float, float, float, float] | None = None) -> None:
    """``fig.tight_layout(rect=rect)``, leaving the figure without a layout engine: after
    ``tight_layout`` matplotlib keeps a placeholder engine, for which savefig draws the whole figure
    once more before drawing it into the file (a third of a report's drawing time)."""
    TightLayoutEngine(rect=rect).execute(fig)


def save(fig: plt.Figure, path: Path) -> Path:
    """The figure as PNG at ``path``, then closed; ``path``. Every report's figures are saved by it
    (simulate's, train's, inspect's, a sweep's): report.md links the PNG and report.html embeds it, so
    each figure is drawn once (an SVG beside it cost a second draw, a third of a report's time)."""
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path


def draw(jobs: Sequence[tuple[Callable[[Path], Any], Path]], workers: int = 1) -> None:
    """Draw each job, ``fn(path)``. With ``workers`` > 1, every second job is drawn at once in a forked
    child process (:func:`varprop.forked.share_out`): matplotlib draws in Python, one core per process,
    and a report's figures are independent (a 25-block residual report's five took 1.1 s, 0.6 s in two
    processes). The child hands back nothing but its files; should it fail, its figures are drawn here
    after all.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> draw([(lambda p: p.write_text("a"), d / "a.txt"), (lambda p: p.write_text("b"), d / "b.txt")], workers=2)
    >>> sorted(p.read_text() for p in d.iterdir())
    ['a', 'b']
    """
    def run(share: Sequence[tuple[Callable[[Path], Any], Path]], _: Any) -> None:
        for fn, path in share:
            fn(path)
    if workers < 2 or len(jobs) < 2 or not forked.forkable():
        run(jobs, None)
    else:
        forked.share_out(run, [jobs[0::2], jobs[1::2]])


_SUPERSCRIPT = str.maketrans("-0123456789", "\u207b\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079")


class _PlainLogFormatter(LogFormatterSciNotation):
    """matplotlib's log-axis labels (10^-5, 2 x 10^3) as plain Unicode text (10\u207b\u2075, 2\u00d710\u00b3):
    parsing them as mathtext took a fifth of a report's drawing time."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        label = super().__call__(x, pos)
        math_text = re.fullmatch(r"\$\\mathdefault\{(.*)\}\$", label)
        if math_text is None:
            return label
        # 0.998, 1, 1.0005 and 2 rather than 9.98 x 10^-1, 10^0; and every label plain on an axis within
        # [0.001, 10^4] (3, 10, 20 rather than 3, 10^1, 2 x 10^1)
        view = sorted(abs(v) for v in self.axis.get_view_interval()) if self.axis is not None else [0.0, math.inf]
        if self._base == 10 and (0.1 < abs(x) < 10 or (view[0] >= 1e-3 and view[1] < 1e4)):
            return f"{x:.6g}".replace("-", "\u2212")
        body = math_text.group(1).replace(r"\times", "\u00d7").replace("-", "\u2212")
        return re.sub(r"\^\{([^}]*)\}", lambda m: m.group(1).replace("\u2212", "-").translate(_SUPERSCRIPT), body)


def log_scale(ax: plt.Axes, axis: str = "y", base: float = 10) -> None:
    """``ax``'s ``axis`` ("x" or "y") on a log scale labelled like matplotlib's own, without mathtext."""
    getattr(ax, f"set_{axis}scale")("log", base=base)
    scale = getattr(ax, f"{axis}axis")
    scale.set_major_formatter(_PlainLogFormatter(base))
    scale.set_minor_formatter(_PlainLogFormatter(base, labelOnlyBase=False))


def _text(s: Any) -> str:
    """A user's string as matplotlib text: on one line, no mathtext ($), and
    never read as "leave out of the legend" (a leading underscore)."""
    text = visible(s).replace("$", r"\$")
    return " " + text if text.startswith("_") else text


Configs = Sequence[dict[str, Any]]  # config.json's "configs": label, varied, options


def std_per_layer(run: Run, path: Path) -> Path:
    """Std of each layer's output (and, with a backward pass, of the gradient),
    on a log axis (laid out as :func:`_figure` says, by the run's varied options).

    Solid: the mean network (sqrt of the mean variance over replicates);
    dashed: the typical network (geometric mean); band: the range over
    replicates. Configurations within 1e+-ZOOM_DECADES of their input, beside
    others beyond it, get a second panel of their own (:func:`_tame`).
    """
    layers, summary, configs = run.layers, run.summary, run.meta["configs"]
    sides = [("post", "std of layer output")]
    if "grad_log10_std" in layers:
        sides.append(("grad", "std of gradient w.r.t. output"))
    as_log10 = {side: _beyond_float64(layers[f"{side}_log10_std"]) for side, _ in sides}
    tame = _tame(summary)
    metrics = ["post"] + (["post zoom"] if tame else []) + [side for side, _ in sides[1:]]

    def draw(ax: plt.Axes, chosen: pd.DataFrame, metric: str, looks: Looks) -> set[str] | None:
        side, zoom = metric.split()[0], metric.endswith("zoom")
        if zoom:
            chosen = chosen[chosen["config"].isin(tame)]
            ax.set_title(f"zoom: the configurations within 1e±{ZOOM_DECADES} of their input", fontsize=9)
        _panel(ax, layers, chosen, side, looks, as_log10[side] and not zoom)
        label = dict(sides)[side]
        ax.set_ylabel(f"log10 {label}" if as_log10[side] and not zoom else f"{label} (log scale)")
        if tame and side == "post":  # each of the two panels speaks for its own configurations' lines
            mine = chosen["config"].isin(tame) == zoom
            return {looks[c][2] for c in chosen["config"][mine].unique()}
        return None

    n_rep = int(layers["replicate"].nunique())
    title = ("Std per layer: outputs and gradients" if len(sides) > 1 else "Std per layer") + (
        "; dotted: mean-field theory")
    if n_rep > 1:
        title += f"\nmean network (solid), typical network (dashed), range over {n_rep} replicates (shaded)"
    return _figure(layers, summary, metrics, draw, title, path, (6.5, 4.2), dpi=120, configs=configs)


ZOOM_DECADES = 10  # beside configurations beyond 1e+-10 x their input, the others get a panel of their own


def _tame(summary: pd.DataFrame) -> list[str]:
    """The configurations whose std stays within 1e+-ZOOM_DECADES of its input's, when others leave it (their
    lines, flattened on an axis of a hundred decades, get a panel of their own), and they share one panel
    (up to :data:`_MAX_LINES` configurations); else none."""
    rel = summary.groupby("config", sort=False)["post_log10_rms_std"].agg(lambda v: (v - v.iloc[0]).abs().max())
    tame = [str(c) for c in rel.index[rel <= ZOOM_DECADES]]
    return tame if 0 < len(tame) < len(rel) <= _MAX_LINES else []


Looks = dict[str, tuple[str, Any, str]]  # configuration -> colour, line style, legend label


def _figure(layers: pd.DataFrame, summary: pd.DataFrame, metrics: list[str],
            draw: Callable[[plt.Axes, pd.DataFrame, str, Looks], set[str] | None], title: str, path: Path,
            panel: tuple[float, float], dpi: int = 110, configs: Configs | None = None,
            notes: Sequence[str] = ()) -> Path:
    """One panel per metric holding every configuration (up to 8), or small
    multiples: more configurations varying two or more options (found by name
    in ``configs``) get a column per value of the next-to-last option, a row
    per metric and value of the others, and a colour per value of the last,
    so each panel holds a few lines (one row of many panels is wrapped, each
    panel with its own y axis). Every panel shares the layer axis, so stacks
    of several depths line up. ``draw(ax, summary_rows, metric, looks)``
    draws a panel and may return the legend labels whose lines it speaks for
    (None: every one it was given). A line hidden under a later one
    (identical, or within half a line's width on the page) is named in a
    note under the legend, after ``notes``."""
    configs_drawn = list(dict.fromkeys(summary["config"]))
    unit = row_unit(layers)
    title, notes = as_rows(title, unit), [as_rows(n, unit) for n in notes]
    values = varied_values([c for c in configs or [] if c["label"] in set(configs_drawn)])
    keys = [k for k in values.columns if values[k].notna().all()] if len(values) == len(configs_drawn) else []
    configs = configs_drawn
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    facets = len(configs) > _MAX_LINES and len(keys) >= 2
    if facets and values[keys[-1]].nunique() > len(colors):  # colour by the other of the last two, if it can
        keys[-2:] = keys[-1], keys[-2]
    facets = facets and values[keys[-1]].nunique() <= len(colors)
    if facets:
        color_key, col_key, row_keys = keys[-1], keys[-2], keys[:-2]
        shades = {v: colors[i] for i, v in enumerate(dict.fromkeys(values[color_key]))}
        looks = {c: (shades[values.at[c, color_key]], "-", _named(color_key, values.at[c, color_key]))
                 for c in configs}
        # an option only some configurations set (the gallery's alpha of one plain stack among the schemes)
        # splits their column, so two stacks never share a panel under one legend label
        partial = [k for k in values.columns if k not in keys and values[k].notna().any()]
        column = {c: (values.at[c, col_key], *(values.at[c, k] if pd.notna(values.at[c, k]) else None
                                                for k in partial)) for c in configs}
        cols = list(dict.fromkeys(column.values()))
        groups = list(dict.fromkeys(tuple(r) for r in values[row_keys].itertuples(index=False))) or [()]
        panels = [(metric, dict(zip(row_keys, g)), col) for metric in metrics for g in groups for col in cols]
        wrap = len(metrics) * len(groups) == 1 and len(cols) > 4
        n_cols = 3 if wrap else len(cols)
        size = (2.9, 2.4)
    else:
        wrap = True
        looks = {c: (colors[i % len(colors)], ["-", "-.", ":"][(i // len(colors)) % 3], _text(c))
                 for i, c in enumerate(configs)}
        panels = [(metric, {}, None) for metric in metrics]
        n_cols = len(panels)
        size = panel
    n_rows = math.ceil(len(panels) / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(size[0] * n_cols, size[1] * n_rows + 0.6), dpi=dpi,
                             squeeze=False, sharex=True)
    drawn: list[tuple[plt.Axes, str, str, set[str]]] = []  # each panel, its quantity, title, configurations
    for ax, (metric, where, col) in zip(axes.flat, panels):
        chosen = [c for c in configs if (col is None or column[c] == col)
                  and all(values.at[c, k] == v for k, v in where.items())]
        speaks_for = draw(ax, summary[summary["config"].isin(chosen)], metric, looks)
        _least_log_span(ax)
        ax.set_xlabel(as_rows(ax.get_xlabel(), unit))  # a residual stack's rows are blocks
        ax.set_ylabel(as_rows(ax.get_ylabel(), unit))
        if facets:
            named = [*where.items(), (col_key, col[0]), *((k, v) for k, v in zip(partial, col[1:]) if v is not None)]
            ax.set_title(", ".join(_named(k, v) for k, v in named), fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(5, integer=True))  # a small panel's labels stay apart
            ax.tick_params(which="both", labelsize=7)
            ax.xaxis.label.set_size(8)
            ax.yaxis.label.set_size(8)
        if n_rows > 1:  # a label taller than its row runs into the next row's
            _wrap_ylabel(ax, fig.get_size_inches()[1] / n_rows)
        quantity = re.sub(r" \((log scale|log|symlog)\)$", "", ax.get_ylabel().replace("\n", " "))
        drawn.append((ax, quantity, ax.get_title(),
                      {looks[c][2] for c in chosen} if speaks_for is None else speaks_for))
    for i, ax in enumerate(axes.flat[:len(panels)]):
        if i + n_cols < len(panels):  # the panel below carries this column's x axis
            ax.set_xlabel("")
        else:
            ax.tick_params(labelbottom=True)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    if facets and not wrap:
        for row in axes:
            _share_y(row)
    hidden = hidden_notes(drawn, len(metrics))  # now that every panel has its final y range
    fig.suptitle(title, fontsize=10)
    entries: dict[str, Any] = {}
    for ax in axes.flat:  # one entry per label, whichever panel drew it (a line rather than dots)
        for handle, text in zip(*ax.get_legend_handles_labels()):
            if text not in entries or getattr(entries[text], "get_linestyle", lambda: "-")() == "None":
                entries[text] = handle
    order = sorted(entries, key=lambda text: text not in {look[2] for look in looks.values()})
    return legend_below_and_save(fig, [entries[t] for t in order], order, path, [*notes, *hidden])


Panels = list[tuple[plt.Axes, str, str, set[str]]]  # each panel, its quantity, its title, the labels it speaks for


def hidden_notes(drawn: Panels, n_quantities: int) -> list[str]:
    """A note (:func:`_hidden_note`) for each group of lines in ``drawn``'s panels that a later line
    covers (:func:`hidden_lines`), gathered over the panels where it does; ``n_quantities``: how many
    quantities the panels show."""
    # (lines drawn over, the line on top, how they agree) -> the panels, as (quantity, title)
    hidden: dict[tuple[tuple[str, ...], str, str], list[tuple[str, str]]] = {}
    for ax, quantity, name, labels in drawn:
        for key in hidden_lines(ax, labels):
            hidden.setdefault(key, []).append((quantity, name))
    return [_hidden_note(key, where, drawn, n_quantities) for key, where in hidden.items()]


def _hidden_note(key: tuple[tuple[str, ...], str, str], where: list[tuple[str, str]],
                 drawn: Panels, n_quantities: int) -> str:
    """"A and B are drawn behind C: identical (in <panels>)", the panels left
    out when it holds in every panel that draws all three, the quantities
    named when it holds for some of them only."""
    under, top, how = key
    quantities = list(dict.fromkeys(q for q, _ in where))
    titles = list(dict.fromkeys(t for _, t in where if t))
    if len(where) == sum({*under, top} <= labels for _, _, _, labels in drawn):
        places = ""
    elif titles:  # small multiples: the panels' titles
        places = "; ".join(titles[:3]) + (f" and {len(titles) - 3} more panels" if len(titles) > 3 else "")
    else:  # one panel per quantity
        places, quantities = " and ".join(quantities), []
    prefix = " and ".join(quantities) + ": " if 0 < len(quantities) < n_quantities else ""
    lines = ", ".join(under[:-1]) + (" and " if len(under) > 1 else "") + under[-1]
    return (f"{prefix}{lines} {'is' if len(under) == 1 else 'are'} drawn behind {top}: {how}"
            + (f" (in {places})" if places else ""))


def hidden_lines(ax: plt.Axes, labels: set[str]) -> list[tuple[tuple[str, ...], str, str]]:
    """The configurations' lines in ``ax`` (by legend label) that a line drawn
    later covers: at each of its points the later line has a point closer
    than half its line width on the page (a shallower stack that agrees with
    a deeper one on its layers included). Grouped by the covering line:
    (covered labels, covering label, how: "identical" when equal to the bit,
    else "indistinguishable at this scale"; "where both are drawn" when the
    covering line is longer)."""
    lines = []
    for line in ax.get_lines():
        if line.get_label() in labels:
            x, y = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
            with np.errstate(invalid="ignore", divide="ignore"):
                page = ax.transData.transform(np.column_stack([x, np.where(np.isfinite(y), y, np.nan)]))[:, 1]
            lines.append((line.get_label(), dict(zip(x.tolist(), zip(y.tolist(), page.tolist()))),
                          0.5 * line.get_linewidth() * ax.figure.dpi / 72))
    groups: dict[str, tuple[list[str], bool, bool]] = {}
    for i, (label, points, _) in enumerate(lines):
        covering = []
        for other, over, tolerance in lines[i + 1:]:
            if points.keys() <= over.keys() and all(
                    (math.isnan(p) and math.isnan(over[x][1])) or abs(p - over[x][1]) <= tolerance
                    for x, (_, p) in points.items()):
                exact = all(np.float64(v).tobytes() == np.float64(over[x][0]).tobytes() for x, (v, _) in points.items())
                covering.append((other, exact, len(points) == len(over)))
        if covering:  # the last of them is drawn on top of all
            top, exact, whole = covering[-1]
            under, was_exact, was_whole = groups.get(top, ([], True, True))
            groups[top] = ([*under, label], was_exact and exact, was_whole and whole)
    return [(tuple(under), top, ("identical" if exact else "indistinguishable at this scale")
             + ("" if whole else " where both are drawn")) for top, (under, exact, whole) in groups.items()]


def _wrap_ylabel(ax: plt.Axes, height_in: float) -> None:
    """A y label longer than its panel is tall, on two lines rather than running into the next panel."""
    label = ax.yaxis.label
    fits = int(height_in * 0.8 * 72 / (0.6 * label.get_size()))  # characters: about 0.6 em each
    text = label.get_text()
    if len(text) > fits:
        ax.set_ylabel(textwrap.fill(text, max(len(text) // 2 + 6, 10)))


def _named(key: str, value: Any) -> str:
    """``key=value`` as configuration labels write the value."""
    part = label_part(key, list(value) if isinstance(value, tuple) else value)
    return _text(part if part.startswith(f"{key}=") else f"{key}={part}")


LEAST_LOG_SPAN = math.log10(2)  # decades: a log axis spans at least a factor of 2


def _least_log_span(ax: plt.Axes) -> None:
    """Widen a log y axis to :data:`LEAST_LOG_SPAN` about its centre: matplotlib fits its range to the
    data, which blows a std of 1.003 beside a theory of 1 up to the whole panel's height."""
    if ax.get_yscale() != "log" or not ax.has_data():
        return
    low, high = ax.get_ylim()
    if 0 < low < high and math.log10(high / low) < LEAST_LOG_SPAN:
        centre = math.sqrt(low * high)
        ax.set_ylim(centre * 10 ** (-LEAST_LOG_SPAN / 2), centre * 10 ** (LEAST_LOG_SPAN / 2))


def _share_y(row: np.ndarray) -> None:
    """One y range for a row of panels (the first keeps the labels), unless it
    would squash a panel's own range below half its height (a mean that
    reaches 1e50 in one panel and stays near 0 in the others; a variance
    over 136 decades beside one over 34, whose panel, without tick labels of
    its own, could no longer be read)."""
    row = [ax for ax in row if ax.has_data()]
    if len(row) < 2:
        return
    log = row[0].get_yscale() == "log"
    lims = np.array([ax.get_ylim() for ax in row])
    spans = np.log10(lims[:, 1] / lims[:, 0]) if log else lims[:, 1] - lims[:, 0]
    low, high = lims[:, 0].min(), lims[:, 1].max()
    union = math.log10(high / low) if log else high - low
    if spans.min() < 0.5 * union:
        return
    for i, ax in enumerate(row):
        ax.set_ylim(low, high)
        if i:
            ax.set_ylabel("")
            ax.tick_params(labelleft=False)


_MAX_LINES = 8  # configurations one panel shows before _figure turns to small multiples


def _beyond_float64(log10_values: pd.Series, limit: float = _MAX_LOG10) -> bool:
    """Whether 10 ** values overflows a float64 axis (then log10 itself is plotted)."""
    finite = log10_values.replace([np.inf, -np.inf], np.nan).dropna()
    return bool(len(finite) and finite.abs().max() > limit)


def _panel(ax: plt.Axes, layers: pd.DataFrame, summary: pd.DataFrame, side: str, looks: Looks,
           as_log10: bool) -> None:
    """One side's lines for the configurations of ``summary``; ``looks`` maps
    a configuration to its colour, line style and legend label."""
    col = f"{side}_log10_std"
    banded = False
    first = True
    for config, s in summary.groupby("config", sort=False):
        color, style, label = looks[config]
        y = lambda v: np.asarray(v, dtype=float) if as_log10 else 10.0 ** np.asarray(v, dtype=float)  # noqa: E731
        ax.plot(s["layer"], y(s[f"{side}_log10_rms_std"]), color=color, ls=style, lw=1.8, label=label)
        if f"theory_{side}_log10_std" in s and s[f"theory_{side}_log10_std"].notna().any():
            ax.plot(s["layer"], y(s[f"theory_{side}_log10_std"]), color="black", ls=":", lw=1.1,
                    label="mean-field theory" if first else None)
            first = False
        if side == "post" and "theory_post_log10_std_lo" in s and s["theory_post_log10_std_lo"].notna().any():
            for edge in ("theory_post_log10_std_lo", "theory_post_log10_std_hi"):
                ax.plot(s["layer"], y(s[edge]), color=color, ls=(0, (1, 3)), lw=1.0)
            if not banded:  # one legend entry for every configuration's band, in grey when several draw one
                lo = layers["theory_post_log10_std_lo"] if "theory_post_log10_std_lo" in layers else None
                several = lo is not None and layers.loc[lo.notna(), "config"].nunique() > 1
                ax.plot([], [], color="0.4" if several else color, ls=(0, (1, 3)), lw=1.0,
                        label="95% of single networks (finite-width law)"
                        + (", each in its line's colour" if several else ""))
            banded = True
        reps = layers[layers["config"] == config]
        if reps["replicate"].nunique() > 1:
            ax.plot(s["layer"], y(s[f"{side}_log10_typical_std"]), color=color, lw=1.2, ls="--")
            g = reps.groupby("layer")[col]
            ax.fill_between(g.min().index, y(g.min()), y(g.max()), color=color, alpha=0.15, lw=0)
    if not as_log10:
        log_scale(ax)
    ax.set_xlabel("layer l (0 = input)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
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
    log_scale(ax, "x")
    log_scale(ax)
    ax.set_xlabel("fan_in (inputs per unit)")
    ax.set_ylabel("std of the layer's output")
    ax.set_title("One layer's output std against fan_in", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    tight(fig)
    return save(fig, path)


def phase_diagram(grid: pd.DataFrame, activation: str, path: Path, measured: pd.DataFrame | None = None) -> Path:
    """chi_1 and the correlation depth scale over (sigma_w^2, sigma_b^2), with
    the order-to-chaos line chi_1 = 1; with ``measured``, the engine's
    correlation per layer at a few grid points beside the c-map's prediction."""
    sw = np.sort(grid["sigma_w2"].unique())
    sb = np.sort(grid["sigma_b2"].unique())
    chi = grid.pivot(index="sigma_b2", columns="sigma_w2", values="chi_1").loc[sb, sw].to_numpy()
    xi = grid.pivot(index="sigma_b2", columns="sigma_w2", values="xi_c").loc[sb, sw].to_numpy()
    panels = 3 if measured is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.6 * panels, 4.6), dpi=120)
    im = axes[0].pcolormesh(sw, sb, np.log10(chi), shading="nearest", cmap="RdBu_r",
                            vmin=-max(abs(np.log10(chi)).max(), 1e-3), vmax=max(abs(np.log10(chi)).max(), 1e-3))
    fig.colorbar(im, ax=axes[0], label="log10 chi_1")
    im2 = axes[1].pcolormesh(sw, sb, np.log10(np.clip(xi, 1e-2, 1e4)), shading="nearest", cmap="viridis")
    fig.colorbar(im2, ax=axes[1], label="log10 xi_c (layers; clipped at 1e4)")
    for ax, title in zip(axes[:2], ("chi_1 = sigma_w^2 E[phi'(z)^2] at q*", "correlation depth scale xi_c")):
        ax.contour(sw, sb, chi, levels=[1.0], colors="black", linewidths=1.5)
        ax.set_xlabel("sigma_w^2 (fan_in x Var W)")
        ax.set_ylabel("sigma_b^2 (Var b)")
        ax.set_title(f"{activation}: {title}", fontsize=9)
        if measured is not None:
            pts = measured.groupby("point", sort=False)[["sigma_w2", "sigma_b2"]].first()
            # White crosses vanished on the white (chi_1 = 1) band: a black edge shows on any colour, and the
            # face has the colour of the point's line in the right panel.
            colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
            ax.scatter(pts["sigma_w2"], pts["sigma_b2"], marker="X", edgecolor="black", linewidths=0.8, s=70,
                       zorder=3, facecolor=[colors[i % len(colors)] for i in range(len(pts))])
    axes[0].text(0.03, 0.95, "black line: chi_1 = 1 (order | chaos)", transform=axes[0].transAxes, fontsize=7,
                 va="top")
    if measured is not None:
        ax = axes[2]
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, (point, m) in enumerate(measured.groupby("point", sort=False)):
            color = colors[i % len(colors)]
            ax.plot(m["layer"], m["pre_cos_sim"], "o", ms=3, color=color, label=point)
            ax.plot(m["layer"], m["theory_pre_cos_sim"], "-", lw=1, color=color)
        ax.set_xlabel("layer l")
        ax.set_ylabel("mean cosine similarity of z between samples")
        ax.set_title("measured (points) vs c-map (lines)", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    tight(fig)
    return save(fig, path)


def _config_lines(ax: plt.Axes, summary: pd.DataFrame, col: str, looks: Looks, theory_col: str | None = None,
                  points: bool = False) -> None:
    """One line per configuration, and the theory's dotted line. With
    ``points``, a series that reaches both sides of +-1 is drawn as dots: a
    mean whose sign flips from layer to layer at 1e90 is a solid band as a
    line."""
    first = True
    for config, s in summary.groupby("config", sort=False):
        color, style, label = looks[config]
        if points and (s[col] > 1).any() and (s[col] < -1).any():
            ax.plot(s["layer"], s[col], color=color, ls="none", marker="o", ms=2.2, mew=0, label=label)
        else:
            ax.plot(s["layer"], s[col], color=color, ls=style, lw=1.6, label=label)
            # a value between two gaps (values not drawn) has no line to show it: a dot does
            y = s[col].to_numpy(float)
            ok = np.isfinite(y)
            alone = ok & ~np.r_[False, ok[:-1]] & ~np.r_[ok[1:], False]
            if alone.any():
                ax.plot(s["layer"].to_numpy()[alone], y[alone], color=color, ls="none", marker="o", ms=3, mew=0)
        if theory_col and theory_col in s and s[theory_col].notna().any():
            ax.plot(s["layer"], s[theory_col], color="black", ls=":", lw=1.0,
                    label="mean-field theory" if first else None)
            first = False
    ax.set_xlabel("layer l (0 = input)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)


_MAX_NOTES = 6  # notes under a figure's legend (identical lines), then "and k more"


def legend_below_and_save(fig: plt.Figure, handles: list[Any], labels: list[str], path: Path,
                           notes: Sequence[str] = ()) -> Path:
    """One shared legend under the panels, and under it ``notes`` (8-pt
    lines, wrapped to the width), then write the file. The figure grows by
    their height, so the panels keep theirs and the legend never covers their
    axis labels, however many configurations."""
    width, height = fig.get_size_inches()
    # Up to 4 columns, as many as fit the width (8-pt text: about 0.065 in a character, 0.6 in for the line).
    ncol = max(1, min(4, len(labels), int(width // (0.6 + 0.065 * max(map(len, labels), default=0)))))
    legend_in = 0.2 + 0.17 * math.ceil(len(labels) / ncol)  # 8-pt rows, in inches
    if len(notes) > _MAX_NOTES:
        notes = [*notes[:_MAX_NOTES - 1], f"and {len(notes) - _MAX_NOTES + 1} more such notes"]
    text = "\n".join(textwrap.fill(n, int(width / 0.065), subsequent_indent="   ") for n in notes)
    notes_in = 0.17 * (text.count("\n") + 1) + 0.05 if notes else 0.0
    fig.set_size_inches(width, height + legend_in + notes_in)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, notes_in / (height + legend_in + notes_in)))
    if notes:
        fig.text(0.5, 0.02 / (height + legend_in + notes_in), text, ha="center", va="bottom", fontsize=8,
                 color="#444444")
    total = height + legend_in + notes_in
    if fig.get_suptitle():  # hung from the top edge: at its default height it overlaps the panels of a tall figure
        fig.suptitle(fig.get_suptitle(), fontsize=10, y=1 - 0.06 / total, va="top")
    tight(fig, rect=(0, (legend_in + notes_in) / total, 1, 1))
    return save(fig, path)


# Means up to this size are drawn on a linear axis; beyond, on a scale linear within +-1 and logarithmic beyond
# (a mean of 1e98 on a linear axis flattens every other line to 0).
_LINEAR_MEANS = 10.0


def mean_axis(summary: pd.DataFrame, layers: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """``summary`` with the plotted mean (``mean_y``, and ``theory_mean_y``)
    and the axis it is drawn on: "linear" (the mean itself) or "symlog": the
    mean within +-1, ``sign * (1 + log10 |mean|)`` beyond, computed from
    log10 |mean| so that it holds means beyond float64 too."""
    means = signed_means(layers, ["config", "layer"])
    out = summary.merge(means, on=["config", "layer"], how="left")
    pairs = [(out["sign"].to_numpy(float), out["log10_abs"].to_numpy(float))]
    if "theory_post_mean" in out:
        pairs.append(mean_columns(out, "theory_post"))
    peak = max((float(np.nanmax(np.where(np.isfinite(la), la, np.nan), initial=-np.inf)) for _, la in pairs))
    axis = "linear" if peak <= math.log10(_LINEAR_MEANS) else "symlog"
    with np.errstate(over="ignore", invalid="ignore"):
        for name, (sign, la) in zip(("mean_y", "theory_mean_y"), pairs):
            out[name] = (sign * 10.0 ** la if axis == "linear" else
                         np.where(la > 0, sign * (1 + la), sign * 10.0 ** np.minimum(la, 0)))
    return out.drop(columns=["sign", "log10_abs"]), axis


def _symlog_ticks(ax: plt.Axes) -> bool:
    """Ticks of a "symlog" mean axis: 0 and +-10^k at a few round k (+-1 too
    when ten decades or fewer are shown), labelled as the means they stand for; False
    (and plain ticks) for a panel whose means all lie within +-1, where the
    axis is linear."""
    low, high = ax.dataLim.intervaly
    decades = max(abs(low), abs(high)) - 1
    if decades <= 0:
        return False
    steps = [k for k in MaxNLocator(nbins=5, integer=True, steps=[1, 2, 5, 10]).tick_values(0, decades)
             if 0 < k <= decades + 0.5]
    ks = ([0] if decades <= 10 else []) + [int(k) for k in steps]
    ticks = [0.0] + [1.0 + k for k in ks if high > 0.5] + [-1.0 - k for k in ks if low < -0.5]
    ax.yaxis.set_major_locator(FixedLocator(sorted(ticks)))
    ax.yaxis.set_major_formatter(FuncFormatter(
        lambda y, _: "0" if y == 0 else ("-" if y < 0 else "") + ("1" if abs(y) == 1 else f"1e{abs(y) - 1:g}")))
    return True


def means_and_channels(run: Run, path: Path) -> Path:
    """Mean of the layer outputs, and the channel statistics: the average over
    units of the squared unit mean and of the unit variance (a residual
    stack's mean alone: its signal-propagation plot has the channels). The
    mean is taken over replicates in log scale (exact beyond float64) and
    drawn on a linear axis while it stays within +-10, else on a symmetric
    log axis."""
    layers, summary, configs = run.layers, run.summary, run.meta["configs"]
    plotted, axis = mean_axis(summary, layers)
    if row_unit(layers) == "block":
        return _means_only(run, plotted, axis, path)
    notes = []
    channels = ["post_sq_unit_mean", "post_unit_var"]
    logged = [f"post_log10_{c.removeprefix('post_')}" for c in channels]
    if set(logged) <= set(plotted):  # exact at any magnitude
        log10_channels = plotted[logged].set_axis(channels, axis=1)
    else:  # a run saved before the log10 columns: beyond float64 its channel statistics are inf, not drawn
        with np.errstate(divide="ignore"):  # 0 is -inf; inf (beyond float64) NaN
            log10_channels = np.log10(plotted[channels].where(np.isfinite(plotted[channels])))
        beyond = plotted[np.isinf(plotted[channels]).any(axis=1)]
        if len(beyond):
            first = beyond.groupby("config", sort=False)["layer"].min()
            notes.append("channel statistics beyond float64 are not drawn: "
                         + "; ".join(f"{_text(c)} from layer {layer}" for c, layer in first.items()))
    zero = log10_channels["post_sq_unit_mean"] < math.log10(ROUNDING_ZERO) + log10_channels["post_unit_var"]
    if zero.any():
        log10_channels.loc[zero, "post_sq_unit_mean"] = math.nan
        notes.append(f"average squared unit means below {ROUNDING_ZERO:g} of the unit variance (0 but for "
                     "rounding, as batch norm's) are not drawn")
    # Beyond float64, or near it (a log axis cannot place its ticks there), log10 itself is drawn on a
    # linear axis, as for the std; else the values on a log axis.
    channels_log10 = _beyond_float64(log10_channels.replace(-np.inf, np.nan).stack(), limit=250.0)
    plotted[channels] = log10_channels if channels_log10 else plotted[channels].mask(log10_channels.isna())
    mean_label = "mean of the layer output"
    channel_label = "log10 {}" if channels_log10 else "{} (log)"
    metrics = {"mean_y": (mean_label, "theory_mean_y", False),
               "post_sq_unit_mean": (channel_label.format("average squared unit mean"), None, not channels_log10),
               "post_unit_var": (channel_label.format("average unit variance"), None, not channels_log10)}
    for column in channels:  # 0 at every layer (one sample: a unit has no variance): nothing on a log axis
        name = metrics[column][0].removeprefix("log10 ").removesuffix(" (log)")
        shown = np.isfinite(plotted[column]) & (True if channels_log10 else plotted[column] > 0)
        zero = [c for c, ok in shown.groupby(plotted["config"], sort=False).any().items() if not ok]
        if not zero:
            continue
        why = " (one sample: a unit has no variance)" if column == "post_unit_var" else ""
        if len(zero) == plotted["config"].nunique() and not channels_log10:  # drawn as the 0 it is
            metrics[column] = (name, None, False)
            notes.append(f"the {name} is 0 at every layer{why}")
        else:
            notes.append(f"the {name} is 0 at every layer, so not drawn, for " + "; ".join(map(_text, zero)) + why)

    def draw(ax: plt.Axes, chosen: pd.DataFrame, metric: str, looks: Looks) -> None:
        label, theory_col, log = metrics[metric]
        _config_lines(ax, chosen, metric, looks, theory_col, points=metric == "mean_y" and axis != "linear")
        ax.set_ylabel(label)
        if log:
            log_scale(ax)
        elif metric == "mean_y" and axis == "symlog" and _symlog_ticks(ax):
            ax.set_ylabel(f"{label} (symlog)")

    return _figure(layers, plotted, list(metrics), draw,
                   "Mean per layer and channel statistics (averaged over replicates)", path, (5.3, 4.4),
                   configs=configs, notes=notes)


def _means_only(run: Run, plotted: pd.DataFrame, axis: str, path: Path) -> Path:
    label = "mean of the stream"

    def draw(ax: plt.Axes, chosen: pd.DataFrame, metric: str, looks: Looks) -> None:
        _config_lines(ax, chosen, metric, looks, "theory_mean_y", points=axis != "linear")
        ax.set_ylabel(label)
        if axis == "symlog" and _symlog_ticks(ax):
            ax.set_ylabel(f"{label} (symlog)")

    return _figure(run.layers, plotted, ["mean_y"], draw, "Mean per block (averaged over replicates)", path,
                   (6.5, 4.2), configs=run.meta["configs"])


def correlation(run: Run, path: Path) -> Path:
    """Mean pairwise cosine similarity between samples per layer (and its
    absolute value) with the c-map's prediction."""
    layers, summary, configs = run.layers, run.summary, run.meta["configs"]
    metrics = {"pre_cos_sim": ("mean cos(z) between samples", "theory_pre_cos_sim"),
               "post_abs_cos_sim": ("mean |cos| between outputs", None)}

    def draw(ax: plt.Axes, chosen: pd.DataFrame, metric: str, looks: Looks) -> None:
        label, theory_col = metrics[metric]
        _config_lines(ax, chosen, metric, looks, theory_col)
        ax.set_ylabel(label)
        ax.set_ylim(-0.05, 1.05)

    mapped = "theory_pre_cos_sim" in summary and summary["theory_pre_cos_sim"].notna().any()
    return _figure(layers, summary, list(metrics), draw,
                   "Correlation between samples per layer (1: all inputs map to one direction)"
                   + ("; dotted: the c-map" if mapped else ""), path, (6.5, 4.4), configs=configs)


def histograms(run: Run, path: Path) -> Path:
    """Post-activation histograms at the first, middle and last layer, one row
    per configuration (those :func:`histogram_configs` picks), x in units of the layer's RMS."""
    hist = run.histograms
    unit = row_unit(run.layers)
    configs, _ = histogram_configs(hist)
    layers_by = {c: sorted(hist[hist["config"] == c]["layer"].unique()) for c in configs}
    cols = max(len(v) for v in layers_by.values())
    fig, axes = plt.subplots(len(configs), cols, figsize=(3.6 * cols, 1.9 * len(configs) + 0.8), dpi=110,
                             squeeze=False, sharex=True)
    for i, c in enumerate(configs):
        for j, layer in enumerate(layers_by[c]):
            h = hist[(hist["config"] == c) & (hist["layer"] == layer)]
            ax = axes[i][j]
            ax.stairs(h["density"].to_numpy(), np.append(h["bin_lo"].to_numpy(), h["bin_hi"].iloc[-1]),
                      fill=True, alpha=0.6)
            ax.set_title(f"{_text(c)}: {unit} {layer}", fontsize=8)
            ax.tick_params(labelsize=7)
        for j in range(len(layers_by[c]), cols):
            axes[i][j].axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("h / rms(h)", fontsize=8)
    fig.suptitle("Post-activation histograms (replicate 0; density; x in units of the layer's RMS)" if unit == "layer"
                 else "Histograms of the stream x_l (replicate 0; density; x in units of its RMS)", fontsize=10)
    tight(fig)
    return save(fig, path)

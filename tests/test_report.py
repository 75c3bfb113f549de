"""The report: formatting, comparisons of depths and widths, means in log
scale, one verdict per configuration, what it says about the theory, and
the figures' layout."""

import json
import math
import re

import matplotlib
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import varprop
from varprop import stats
from varprop.cli import main
from varprop.montecarlo import configs_for, run_configs
from varprop.run import Configuration, Run
from varprop.report import figures
from varprop.report.document import plain
from varprop.report.markdown import fmt, fmt_pow10, fmt_signed, shown_layers, signed_means

matplotlib.use("Agg")


def run(args):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return result


def section(report: str, title: str) -> str:
    return report.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def tables(text: str) -> list[list[list[str]]]:
    """The Markdown tables of ``text``: rows of cells, header first (separator row left out)."""
    out, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            if not re.fullmatch(r"\|(:?-+:?\|)+", line.replace(" ", "")):
                current.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
        elif current:
            out.append(current)
            current = []
    return out


def simulate_run(spec, vary, **options):
    """The Run of ``varprop.simulate(spec, vary=vary, **options)``."""
    return run_configs(configs_for(spec, vary, **options))


@pytest.mark.parametrize("depth", [1, 7, 30, 31, 100, 10_000])
def test_shown_layers(depth):
    layers = shown_layers(depth)
    assert layers[0] == 0 and layers[-1] == depth and 1 in layers
    assert layers == sorted(set(layers))
    assert len(layers) == depth + 1 if depth <= 30 else len(layers) <= 23


def test_fmt_pow10():
    assert fmt_pow10(9978.2888) == "1.94e+9978"
    assert fmt_pow10(-0.5) == "3.16e-1"
    assert fmt_pow10(2.9999999) == "1.00e+3"
    assert fmt_pow10(-math.inf) == "0"


def test_fmt_marks_overflow():
    assert fmt(math.inf) == "overflow" and fmt(-math.inf) == "-overflow"
    assert fmt(float("nan")) == "" and fmt(0.000123456) == "0.0001235"


def test_signed_means_agree_with_float64_and_carry_any_magnitude():
    """Where float64 holds the values, the mean is the plain mean; scaled by 10^k (k = 1000, far beyond
    float64) it is the same mean shifted by k decades, sign kept, where plain floats give inf - inf = NaN."""
    rng = np.random.default_rng(0)
    values = rng.standard_normal(40) * 10.0 ** rng.uniform(-3, 3, 40)
    frame = pd.DataFrame({"config": np.repeat(["a", "b"], 20), "post_mean": values,
                          "post_log10_abs_mean": np.log10(np.abs(values))})
    got = signed_means(frame, ["config"]).set_index("config")
    want = frame.groupby("config")["post_mean"].mean()
    for c in ("a", "b"):
        assert got.at[c, "sign"] == np.sign(want[c])
        # Both are float64 sums of 20 terms: equal to a few ulps of the largest term, relative to the mean.
        scale = np.abs(frame.loc[frame["config"] == c, "post_mean"]).max() / abs(want[c])
        assert abs(got.at[c, "log10_abs"] - np.log10(abs(want[c]))) <= 1e-13 * scale
    far = frame.assign(post_mean=np.sign(values) * np.inf, post_log10_abs_mean=frame["post_log10_abs_mean"] + 1000)
    moved = signed_means(far, ["config"]).set_index("config")
    assert (moved["sign"] == got["sign"]).all()
    assert np.allclose(moved["log10_abs"] - got["log10_abs"], 1000, rtol=0, atol=1e-9)
    assert fmt_signed(-1.0, 412.5051499783199) == "-3.200e+412" and fmt_signed(1.0, -0.30103) == "0.5"


def test_means_beyond_float64_print_in_log_scale(tmp_path):
    """N(0, 1) weights of width 64 grow the std ~8x a layer: past float64 (1e308) near layer 340. Every
    mean cell then prints as sign and power of ten, as the summary's own log-scale mean says."""
    out = tmp_path / "deep"
    run(["simulate", "--layers", "400", "--width", "64", "--samples", "16", "--init", "unit", "--replicates", "2",
         "--format", "md", "--out", str(out)])
    layers = pd.read_csv(out / "layers.csv")
    assert np.isinf(layers["post_mean"]).any()
    report = (out / "report.md").read_text()
    per_layer = tables(section(report, "Per-layer statistics"))[0]
    col = per_layer[0].index("post mean")
    summary = stats.summarize(layers).set_index("layer")
    for row in per_layer[1:]:
        cell, layer = row[col], int(row[0])
        assert cell and "overflow" not in cell, row
        if layer >= 50:
            mant, exp = re.fullmatch(r"-?(\d\.\d{3})e\+(\d+)", cell).groups()
            # The summary's log10 |mean| (stats.summarize, its own code): the same to the 4 digits shown.
            assert abs(math.log10(float(mant)) + int(exp) - summary.at[layer, "post_log10_abs_mean"]) < 2e-4
    assert "overflow" not in report  # second moments and their intervals too: carried by their log10
    summary_table = tables(section(report, "Summary"))[0]
    assert re.fullmatch(r"-?\d\.\d{3}e\+\d+", summary_table[1][summary_table[0].index("mean of layer means")])
    plotted, axis = figures.mean_axis(stats.summarize(layers), layers)
    means = signed_means(layers, ["config", "layer"])
    # Beyond +-1 the figure draws sign * (1 + log10 |mean|), from the log-scale mean.
    assert axis == "symlog" and plotted["mean_y"].iloc[-1] == pytest.approx(
        means["sign"].iloc[-1] * (1 + means["log10_abs"].iloc[-1]), rel=1e-12)


def test_channel_statistics_carry_their_log10_beyond_float64():
    """The channel statistics' log10 columns are exact at any magnitude: where the plain ones fit they agree
    to rounding, beyond float64 (inf there) they go on; their summary is log10 of the mean over replicates.
    For zero-mean linear outputs the average unit variance is the variance less the spread of the unit
    means, a 1/samples share of it: its log10 sits just below 2 log10 std."""
    layers = simulate_run(varprop.NetworkSpec.square(250, 64, init="unit"), None, samples=64, replicates=2).layers
    fits = np.isfinite(layers["post_unit_var"]) & (layers["post_unit_var"] > 0)
    np.testing.assert_allclose(layers.loc[fits, "post_log10_unit_var"], np.log10(layers.loc[fits, "post_unit_var"]),
                               rtol=1e-12)
    np.testing.assert_allclose(layers.loc[fits, "post_log10_sq_unit_mean"],
                               np.log10(layers.loc[fits, "post_sq_unit_mean"]), rtol=1e-12)
    beyond = layers[np.isinf(layers["post_unit_var"])]
    assert len(beyond) and np.isfinite(beyond["post_log10_unit_var"]).all()
    gap = 2 * beyond["post_log10_std"] - beyond["post_log10_unit_var"]
    assert ((gap >= 0) & (gap < 0.2)).all()
    summary = stats.summarize(layers).set_index("layer")
    by_layer = layers.groupby("layer")["post_log10_unit_var"]
    # log10 of the mean of two values lies between their log10s' mean and their maximum
    assert (summary["post_log10_unit_var"] >= by_layer.mean() - 1e-12).all()
    assert (summary["post_log10_unit_var"] <= by_layer.max() + 1e-12).all()
    few = layers[layers["layer"] == 10]
    assert summary.at[10, "post_log10_unit_var"] == pytest.approx(math.log10(few["post_unit_var"].mean()), rel=1e-12)


def test_log_scale_second_moments_agree_with_the_summary():
    """Where float64 holds them, the log-scale second moment and its 95% t interval over replicates are
    summarize()'s (computed from other columns: log10 std and log10 |mean| against the plain second
    moment), to float64 rounding of sums of a few terms, on the scale of the moment itself."""
    from varprop.report.markdown import log_scale_stats

    layers = varprop.simulate(varprop.NetworkSpec.square(6, 16, activation="relu", init="he"), samples=32,
                              replicates=4, vary={"bias_std": [0.0, 0.5]})
    got = log_scale_stats(layers)
    want = stats.summarize(layers)
    assert list(got["config"]) == list(want["config"]) and list(got["layer"]) == list(want["layer"])
    m2 = want["post_second_moment"].to_numpy()
    assert np.allclose(10 ** got["m2_log10"], m2, rtol=1e-12, atol=0)
    lo = got["lo_sign"] * 10 ** got["lo_log10"]
    assert np.allclose(lo, want["post_second_moment_lo"], rtol=0, atol=1e-12 * m2.max())
    assert np.allclose(10 ** got["hi_log10"], want["post_second_moment_hi"], rtol=1e-12, atol=0)
    assert np.allclose(10 ** got["theory_m2_log10"], want["theory_post_second_moment"], rtol=1e-12, atol=0)
    spread = layers.groupby(["config", "layer"], sort=False)["post_second_moment"].agg(["min", "max"])
    assert np.allclose(10 ** got["min_log10"], spread["min"], rtol=1e-12, atol=0)
    assert np.allclose(10 ** got["max_log10"], spread["max"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("peak, axis", [(0.5, "linear"), (1e96, "symlog")])
def test_means_axis(peak, axis):
    """Means within +-10 keep a linear axis; a mean of 1e96 beside means near 0 gets a symmetric log axis
    (on a linear one every other line is flat)."""
    layers = pd.DataFrame({"config": ["a"] * 3 + ["b"] * 3, "replicate": 0, "layer": [0, 1, 2] * 2,
                           "post_mean": [0.0, 0.01, -0.02, 0.0, -peak / 10, peak]})
    with np.errstate(divide="ignore"):  # a mean of exactly 0 has log10 |mean| = -inf, as the engine writes it
        layers["post_log10_abs_mean"] = np.log10(np.abs(layers["post_mean"]))
    summary = layers.groupby(["config", "layer"], as_index=False)["post_mean"].mean()
    plotted, got = figures.mean_axis(summary, layers)
    want = layers["post_mean"] if axis == "linear" else np.where(
        np.abs(layers["post_mean"]) > 1, np.sign(layers["post_mean"]) * (1 + layers["post_log10_abs_mean"]),
        layers["post_mean"])
    assert got == axis and np.allclose(plotted["mean_y"], want, rtol=1e-12, atol=0)


def panels_drawn(monkeypatch, draw) -> list:
    """The panels (axes with their axis on) of the figure ``draw()`` saves, and the figure."""
    saved = []
    real = figures.save

    def keep(fig, path):
        saved.append(fig)
        return real(fig, path)
    monkeypatch.setattr(figures, "save", keep)
    draw()
    return [ax for ax in saved[-1].axes if ax.axison]


def test_many_configurations_become_small_multiples_by_option_name(tmp_path, monkeypatch):
    """Up to 8 configurations share one panel; 9 varying two options get a panel per value of one, a colour
    per value of the other -- found by name (config.json's "varied"), also for a varied width, which has no
    column of its own in layers.csv (the per-layer width column holds it)."""
    for vary, panels in [({"init": ["unit", "fan_in"], "activation": ["linear", "relu", "tanh"]}, 1),
                         ({"init": ["unit", "fan_in", "he"], "activation": ["linear", "relu", "tanh"]}, 3),
                         ({"width": [8, 12, 16], "activation": ["linear", "relu", "tanh"]}, 3)]:
        sim = simulate_run(varprop.NetworkSpec.square(2, 10), vary, samples=20)
        drawn = panels_drawn(monkeypatch, lambda: figures.std_per_layer(sim, tmp_path / "std.png"))
        assert len(drawn) == panels, vary
        # Without the configurations' varied options, one panel holds every line.
        bare = Run(sim.layers, [Configuration(c.label, {}, c.options) for c in sim.configs])
        assert len(panels_drawn(monkeypatch, lambda: figures.std_per_layer(bare, tmp_path / "std.png"))) == 1


def test_configurations_beside_an_explosion_get_a_zoomed_panel(tmp_path, monkeypatch):
    """N(0, 1) weights of width 16 grow the std 4x a layer, 1e18 by layer 30, and flatten fan_in's line at 1
    (the seed entry's point, a typical network drifting below, was invisible): fan_in gets a second panel of
    its own; with no explosion, one panel holds both."""
    for depth, panels in [(30, 2), (4, 1)]:
        sim = simulate_run(varprop.NetworkSpec.square(depth, 16), {"init": ["unit", "fan_in"]}, samples=16)
        drawn = panels_drawn(monkeypatch, lambda: figures.std_per_layer(sim, tmp_path / "std.png"))
        assert len(drawn) == panels, depth
    sim = simulate_run(varprop.NetworkSpec.square(30, 16), {"init": ["unit", "fan_in"]}, samples=16)
    zoom = panels_drawn(monkeypatch, lambda: figures.std_per_layer(sim, tmp_path / "std.png"))[1]
    assert "zoom" in zoom.get_title() and {line.get_label() for line in zoom.get_lines()} >= {"fan_in"}
    assert "unit" not in {line.get_label() for line in zoom.get_lines()} and zoom.get_ylim()[1] < 100


def test_every_panel_of_small_multiples_is_searched_for_hidden_lines(tmp_path, monkeypatch):
    """Each panel's hidden lines are looked for among the configurations it draws (a name clash once left
    the small multiples' panels searching among none, and their notes vanished)."""
    searched = []
    real = figures.hidden_lines
    monkeypatch.setattr(figures, "hidden_lines", lambda ax, labels: searched.append(labels) or real(ax, labels))
    sim = simulate_run(varprop.NetworkSpec.square(2, 10), {"init": ["unit", "fan_in", "he"],
                                                          "activation": ["linear", "relu", "tanh"]}, samples=20)
    figures.std_per_layer(sim, tmp_path / "std.png")
    # three panels (one per value of one option), each drawing the three values of the other in colour
    assert len(searched) == 3 and all(len(labels) == 3 for labels in searched)
    assert len(set(map(frozenset, searched))) == 1


def test_the_band_legend_is_grey_only_when_several_configurations_draw_a_band(tmp_path, monkeypatch):
    """The finite-width band exists for linear and relu stacks (not tanh): one band keeps its line's colour in
    the legend, several share one grey entry."""
    def band_entry(vary):
        sim = simulate_run(varprop.NetworkSpec.square(4, 16), vary, samples=32, replicates=2)
        fig = panels_drawn(monkeypatch, lambda: figures.std_per_layer(sim, tmp_path / "std.png"))[0].figure
        legend = fig.legends[0]
        found = [(t.get_text(), h) for t, h in zip(legend.get_texts(), legend.legend_handles)
                 if t.get_text().startswith("95% of single networks")]
        assert len(found) == 1, [t.get_text() for t in legend.get_texts()]
        return found[0][0], matplotlib.colors.to_hex(found[0][1].get_color())
    label, colour = band_entry({"activation": ["relu", "tanh"]})
    assert "each in its line's colour" not in label and colour != "#666666"
    label, colour = band_entry({"activation": ["relu", "linear"]})
    assert label.endswith("each in its line's colour") and colour == "#666666"


def test_a_log_axis_within_a_few_decades_is_labelled_plainly():
    fig = matplotlib.figure.Figure()
    ax = fig.add_subplot()
    ax.plot([10, 3000], [3, 60])
    figures.log_scale(ax, "x")
    figures.log_scale(ax, "y")
    fig.canvas.draw()
    shown = [t.get_text() for minor in (False, True) for t in ax.get_yticklabels(minor=minor)
             + ax.get_xticklabels(minor=minor) if t.get_text()]
    assert {"10", "100", "1000", "3", "20"} <= set(shown) and not [t for t in shown if "\u00d7" in t or "\u00b9" in t]
    ax.set_yscale("linear")
    ax.plot([1, 2], [1e-9, 1e9])
    figures.log_scale(ax, "y")
    fig.canvas.draw()
    assert "10\u207b\u2078" in [t.get_text() for t in ax.get_yticklabels()]  # far beyond: powers of ten again


def test_a_nearly_flat_log_axis_spans_a_factor_of_two():
    """A std of 1.003 beside a theory of 1 filled a panel's height as if it departed from it: a log axis spans
    at least LEAST_LOG_SPAN decades about its centre; a wider one is left as matplotlib fits it."""
    fig = matplotlib.figure.Figure()
    flat, wide = fig.add_subplot(121), fig.add_subplot(122)
    flat.plot([0, 10], [1.0, 1.003])
    wide.plot([0, 10], [1.0, 100.0])
    for ax in (flat, wide):
        figures.log_scale(ax)
    before = wide.get_ylim()
    figures._least_log_span(flat)
    figures._least_log_span(wide)
    low, high = flat.get_ylim()
    assert math.log10(high / low) == pytest.approx(figures.LEAST_LOG_SPAN)
    assert low < 1.0 and 1.003 < high and wide.get_ylim() == before


def test_a_row_shares_its_y_axis_only_where_no_panel_shrinks_below_half():
    """The unit init's variance over 136 decades beside fan_in's over 34 squashed fan_in's panel, which has no
    tick labels of its own once shared: that row keeps a range per panel; two like ranges share one."""
    fig = matplotlib.figure.Figure()
    row = np.array([fig.add_subplot(1, 3, i + 1) for i in range(3)])
    for ax, top in zip(row, (1e105, 1e3, 1e2)):
        ax.plot([0, 50], [1e-31, top])
        figures.log_scale(ax)
    figures._share_y(row)
    assert len({ax.get_ylim() for ax in row}) == 3
    figures._share_y(row[1:])
    assert row[1].get_ylim() == row[2].get_ylim() and not row[2].yaxis.get_tick_params()["labelleft"]


def test_hidden_lines_are_found():
    """A line drawn under an identical one, or under a longer one that agrees with it on all its points (a
    shallower stack seeing the same draws as a deeper one), is named with the line on top, and so is one
    within half a line's width of it on the page (unit and gelu inits at depth 50: relu-like, equal to 4
    digits); lines that differ visibly anywhere, or are drawn on top, are not."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3), dpi=100)
    ax.plot([0, 1, 2], [1.0, 2.0, np.nan], label="unit")
    ax.plot([0, 1, 2], [1.0, 2.0, np.nan], label="fan_in")
    ax.plot([0, 1], [5.0, 6.0], label="layers=1")
    ax.plot([0, 1, 2, 3], [5.0, 6.0, 7.0, 8.0], label="layers=3")
    ax.plot([0, 1, 2], [1.0, 2.0, 3.0], label="he")  # differs from unit at layer 2
    ax.plot([0, 1], [1.0, 2.0], label="drawn last")  # on top of unit's start: visible
    ax.plot([0, 1, 2, 3], [4.0, 4.0, 4.0, 4.0], label="relu")
    ax.plot([0, 1, 2, 3], [4.0, 4.0, 4.001, 4.0], label="gelu")  # 1e-3 of an 8-unit axis 2 in tall: 0.02 pt
    ax.plot([0, 1, 2, 3], [3.0, 3.0, 3.0, 3.0], label="selu")
    ax.plot([0, 1, 2, 3], [3.0, 3.0, 3.2, 3.0], label="elu")  # 0.2 of 8 units: 3.6 pt, past half of 1.5 pt
    got = figures.hidden_lines(ax, {"unit", "fan_in", "layers=1", "layers=3", "he", "drawn last", "relu", "gelu",
                                     "selu", "elu"})
    plt.close(fig)
    assert sorted(got) == [(("layers=1",), "layers=3", "identical where both are drawn"),
                           (("relu",), "gelu", "indistinguishable at this scale"),
                           (("unit",), "fan_in", "identical")]


def test_depths_compare_everywhere(tmp_path):
    """--layers 4 --layers 9 crashed after writing the report (a terminal table of 10 rows given 5 values);
    its summary split the growth column in two, each half NaN; its title and Configuration table said 4
    layers for both."""
    out = tmp_path / "depths"
    result = run(["simulate", "--layers", "4", "--layers", "9", "--width", "16", "--samples", "16",
                  "--replicates", "2", "--out", str(out)])
    lines = result.output.splitlines()
    rows = {int(line.split()[0]): line.split()[1:] for line in lines if re.match(r"\d+ ", line)}
    assert sorted(rows) == list(range(10)) and len(rows[4]) == 2 and len(rows[5]) == 1
    report = (out / "report.md").read_text()
    assert report.startswith("# varprop: 4 or 9 layers of width 16, layers=4 vs layers=9\n")
    summary = tables(section(report, "Summary"))[0]
    assert "nan" not in str(summary) and all(len(row) == len(summary[0]) for row in summary)
    assert sum(h.startswith("log10 std per layer") for h in summary[0]) == 1
    common, compared = tables(section(report, "Configuration"))
    assert "`--layers`" not in [row[0] for row in common] and ["`--width`", "16"] in common
    assert compared == [["configuration", "layers"], ["layers=4", "4"], ["layers=9", "9"]]


def test_widths_compare_everywhere(tmp_path):
    out = tmp_path / "widths"
    run(["simulate", "--layers", "3", "--width", "8", "--width", "24", "--samples", "16", "--out", str(out)])
    report = (out / "report.md").read_text()
    assert report.startswith("# varprop: 3 layers of width 8 or 24, width=8 vs width=24\n")
    common, compared = tables(section(report, "Configuration"))
    assert ["`--layers`", "3"] in common and "`--width`" not in [row[0] for row in common]
    assert compared == [["configuration", "width"], ["width=8", "8"], ["width=24", "24"]]
    layers = pd.read_csv(out / "layers.csv")
    assert sorted(layers.groupby("config")["width"].first()) == [8, 24]


def test_an_option_derived_per_configuration_shows_per_configuration(tmp_path):
    """--bn-count 0 --bn-count 1 --bn-count 3 used BN on no layer, layer 1 and layers 1-3; the table said
    `--bn-layers 1 (where it applies)` for all."""
    out = tmp_path / "bn"
    run(["simulate", "--layers", "4", "--width", "8", "--samples", "16", "--bn-count", "0", "--bn-count", "1",
         "--bn-count", "3", "--out", str(out)])
    common, compared = tables(section((out / "report.md").read_text(), "Configuration"))
    assert "`--bn-layers`" not in [row[0] for row in common]
    assert compared == [["configuration", "bn_count", "bn_layers"], ["bn_count=0", "0", "–"],
                        ["bn_count=1", "1", "1"], ["bn_count=3", "3", "1,2,3"]]


def _verdict_counts(lines):
    """Per top-level grouped finding that is a verdict, the number of configurations it names."""
    counts = []
    for item in lines:
        line = plain(item if isinstance(item, str) else item[0])
        if re.match(r"\*\*(Healthy|The signal|The input signal|Gradients|Saturated|The inputs collapse)", line):
            counts.append(int(re.search(r"in (?:all )?(\d+) configuration", line).group(1)))
    return counts


def test_findings_give_each_configuration_one_verdict():
    """9 configurations: each is in exactly one verdict line (healthy or its worst problem), so no line
    calls a configuration stable that another says lost its signal. The sub-items of a verdict name only
    configurations under it."""
    from varprop.report.markdown import findings

    vary = {"init": ["unit", "fan_in", "he"], "activation": ["linear", "relu", "sigmoid"]}
    spec = varprop.NetworkSpec.square(12, 20)
    lines = findings(simulate_run(spec, vary, samples=40, seed=2))
    counts = _verdict_counts(lines)
    assert sum(counts) == 9 and len(counts) >= 2
    # unit init with a linear or relu stack of width 20 grows ~sqrt(20) or ~sqrt(10) per layer: past 1e3 by layer 12
    explodes = next(item for item in lines if not isinstance(item, str) and "explodes" in item[0])
    assert "unit, linear/relu" in plain(explodes[0])
    for item in lines:
        if not isinstance(item, str):
            for sub in item[1]:
                n = int(re.search(r"in (?:all )?(\d+) configuration", plain(sub)).group(1))
                assert n <= int(re.search(r"in (?:all )?(\d+) configuration", plain(item[0])).group(1))


def test_describe_names_a_subset_by_its_options():
    from varprop.findings import Assessment
    from varprop.report.markdown import describe

    def facts(label, varied):
        return Assessment(label, varied, 5, 0.0, 0.0, 1.0, None, None, math.nan, 0.0, None, None, None, math.nan,
                          ())

    every = [facts(f"{a}, bn={n}, b={b}", {"activation": a, "bn_count": n, "batch_size": b})
             for a in ("sigmoid", "relu") for n in (0, 1, 2) for b in (4, 64)]
    sigmoid_low = [f for f in every if f.varied["activation"] == "sigmoid" and f.varied["bn_count"] < 2]
    assert plain(describe(sigmoid_low, every)) == "4 configurations: sigmoid, bn_count=0/1 (any batch_size)"
    assert describe(every, every) == "all 12 configurations"
    odd = [every[0], every[7]]  # no option is free: each is named
    assert plain(describe(odd, every)) == ("2 configurations: sigmoid, bn_count=0, batch_size=4; "
                                           "relu, bn_count=0, batch_size=64")
    # Along an option with one configuration only, "any" would say nothing: named instead.
    diagonal = [facts(str(t), {"x": t[0], "y": t[1]}) for t in [(0, 0), (1, 1), (0, 1)]]
    assert plain(describe(diagonal[:1], diagonal)) == "1 configuration: x=0, y=0"
    # Configurations that do not vary the same options are named by their labels.
    mixed = [facts(label, varied) for label, varied in [("a", {"x": 0}), ("b", {"x": 1}), ("c", {"y": 2})]]
    assert plain(describe(mixed[:2], mixed)) == "2 configurations: a; b"


def test_a_configuration_that_loses_its_signal_is_not_called_healthy():
    """sigmoid with fan_in init (sigma_w^2 = 1) has chi_1 = E[sigmoid'(z)^2] < 1/16: distances between inputs
    and the gradient's variance shrink by 16x or more a layer, so after 12 layers the variance across samples
    is far below 1e-6 of the layer's (its std is each unit's fixed offset) and the input gradient's std is
    below 4^-12 = 6e-8 of the output's, though the std stays near 0.1 (it read "stable" beside "lost the input
    signal"). relu with He init keeps both (chi_1 = 1)."""
    from varprop.report.markdown import findings

    vary = {"activation": ["sigmoid", "relu", "linear"], "init": ["fan_in", "he", "orthogonal"]}
    spec = varprop.NetworkSpec.square(12, 64)
    runs = [c for c in configs_for(spec, vary, samples=64, backward=True, seed=3)
            if c.label in ("sigmoid, fan_in", "relu, he", "linear, orthogonal")]
    sigmoid, relu, linear = findings(run_configs(runs))
    head, subs = sigmoid
    assert "the input signal is lost from layer" in head and "healthy" not in head
    assert any("gradients vanish" in s for s in subs) and any("stays within [1e-3, 1e3]" in s for s in subs)
    assert "signal is lost" not in str(relu) and "gradients" not in str(relu).replace("the input gradient is", "")
    # Orthogonal weights preserve every inner product: a linear stack of them keeps std, correlations and
    # gradients exactly.
    assert isinstance(linear, str) and "healthy through 12 layers" in linear


def _assessment(log_std: np.ndarray):
    """:func:`assess_one` of networks x layers log10 stds (the summary's columns computed here by definition)."""
    from varprop.findings import assess_one

    layer = np.arange(log_std.shape[1])
    with np.errstate(divide="ignore"):
        summary = pd.DataFrame({
            "config": "c", "layer": layer,
            "post_log10_rms_std": 0.5 * np.log10((10.0 ** (2 * log_std)).mean(axis=0)),
            "post_log10_median_std": np.median(log_std, axis=0),
            "post_frac_saturated": 0.0, "post_frac_zero": 0.0, "post_abs_cos_sim": 0.1,
            "post_unit_var": 10.0 ** (2 * log_std.max(axis=0))})
    return assess_one("c", {}, summary)


def test_a_signal_that_dies_in_most_networks_is_not_called_healthy():
    """Three networks of 10 layers: one keeps its std, two lose a decade a layer. The mean network (the root
    of the mean variance, 1/sqrt(3) of the survivor's) stays within the band; the median one falls below 1e-3
    x the input's at layer 4. The verdict is "dies", not "healthy" (he with gelu at depth 50 read healthy while
    two of its three networks had died)."""
    from varprop.report.markdown import _problems

    layer = np.arange(11)
    a = _assessment(np.stack([0.0 * layer, -1.0 * layer, -1.0 * layer]))
    assert a.verdict == "dies" and a.dies_at == 4 and a.explodes_at is None
    assert a.rel > -1 and a.median_rel == -10
    (kind, sentence), = _problems(a)
    assert "the signal dies at layer 4: the median network's std" in sentence and "a few networks keep" in sentence


def test_one_dead_network_among_many_does_not_kill_the_signal():
    """A network whose std is exactly 0 (every relu unit dead) has log10 std -inf: the geometric mean of all
    of them is 0 too, but the median network, and so the verdict, stays with the other 49."""
    layer = np.arange(11)
    log_std = np.tile(-0.1 * layer, (50, 1))
    log_std[:2, 5:] = -np.inf
    a = _assessment(log_std)
    assert a.verdict == "healthy" and a.median_rel == -1.0
    # Most of them dead: it dies, and the sentence has no "x0 per layer".
    log_std[:30, 5:] = -np.inf
    from varprop.report.markdown import _problems

    a = _assessment(log_std)
    (kind, sentence), = _problems(a)
    assert a.verdict == "dies" and a.dies_at == 5 and "per layer" not in sentence


def test_theory_outside_the_single_networks_is_said():
    """The report names a configuration whose mean-field output std lies outside the range of its
    replicates, with that range, and not one whose range holds it."""
    from varprop.report.markdown import theory_gaps

    layers = pd.DataFrame({"config": ["far"] * 6 + ["near"] * 6, "replicate": [0, 0, 1, 1, 2, 2] * 2,
                           "layer": [0, 1] * 6,
                           "post_log10_std": [0, -1.0, 0, -4.9, 0, -4.9, 0, -0.1, 0, 0.1, 0, 0.0],
                           "theory_post_log10_std": [0, -5.95] * 3 + [0, 0.0] * 3})
    summary = layers.groupby(["config", "layer"], as_index=False).agg(
        post_log10_rms_std=("post_log10_std", lambda v: 0.5 * np.log10(np.mean(10 ** (2 * v)))),
        theory_post_log10_std=("theory_post_log10_std", "first"))
    gaps = [plain(g) for g in theory_gaps(layers, summary, ["far", "near"])]
    assert gaps == ["**far**: theory 1.122e-6, x1.943e-5 the mean network (0.05774); single networks 1.259e-5 "
                    "to 0.1 at layer 1"]


def test_no_claim_that_theory_matches_to_order_one_over_width(tmp_path):
    out = tmp_path / "r"
    run(["simulate", "--layers", "3", "--width", "8", "--samples", "16", "--activation", "tanh",
         "--replicates", "2", "--format", "md", "--out", str(out)])
    report = (out / "report.md").read_text()
    assert "O(1/width) otherwise" not in report and "limit of infinite width at fixed depth" in report


def test_config_json_order_does_not_matter_to_the_figures(tmp_path, monkeypatch):
    """Figures find the varied options by name: a layers.csv whose varied columns were moved after
    `replicate` (another tool's rewrite) draws the same small multiples."""
    sim = simulate_run(varprop.NetworkSpec.square(2, 10),
                       {"init": ["unit", "fan_in", "he"], "activation": ["linear", "relu", "tanh"]}, samples=20)
    layers = sim.layers
    moved = Run(layers[[c for c in layers if c not in ("init", "activation")] + ["init", "activation"]], sim.configs)
    assert len(panels_drawn(monkeypatch, lambda: figures.correlation(moved, tmp_path / "c.png"))) == 6
    assert json.dumps(moved.meta)  # what config.json holds


def test_an_option_only_some_configurations_set_splits_their_panels(tmp_path, monkeypatch):
    """The residual gallery's list: alpha is set for one plain stack only, so the two plain stacks
    (alpha 1 and 1/sqrt(L)) get a panel each rather than sharing one under the same legend label."""
    from varprop.spec import Config, expand, label_part

    base = {"blocks": [2, 3], "width": 8, "samples": 8, "activation": "relu", "seed": 0}
    schemes = [{"residual": "plain"}, {"residual": "plain", "alpha": "1/sqrt(L)"}, {"residual": "bn-end"},
               {"residual": "skipinit"}, {"residual": "fixup"}]
    configs = []
    for scheme in schemes:
        for c in expand({**base, **scheme}):
            varied = {**scheme, **c.varied}
            configs.append(Config(", ".join(label_part(k, v) for k, v in varied.items()), varied, c.spec))
    drawn = panels_drawn(monkeypatch, lambda: figures.correlation(run_configs(configs), tmp_path / "c.png"))
    assert len(drawn) == 2 * len(schemes)  # two metrics a column
    assert "residual=plain, alpha=1/sqrt(L)" in {ax.get_title() for ax in drawn}


def test_log_axis_labels_are_plain_text():
    """Log axes are labelled like matplotlib's own (which ticks, which powers) without mathtext."""
    fig, ax = matplotlib.pyplot.subplots()
    ax.plot([1e-5, 1e3], [1, 1.002])
    figures.log_scale(ax, "x")
    figures.log_scale(ax)
    fig.canvas.draw()

    def shown(axis):  # the labels of the ticks within the view, major and minor
        low, high = sorted(axis.get_view_interval())
        return [label.get_text() for minor in (False, True)
                for loc, label in zip(axis.get_ticklocs(minor=minor), axis.get_ticklabels(minor=minor))
                if low <= loc <= high and label.get_text()]
    xs, ys = shown(ax.xaxis), shown(ax.yaxis)
    matplotlib.pyplot.close(fig)
    assert "10\u207b\u2075" in xs and "10\u00b3" in xs and "1" in ys  # 10^-5, 10^3; 10^0 is 1
    assert not any("$" in t for t in xs + ys) and all(float(t) == pytest.approx(1, abs=0.01) for t in ys)


def test_one_sample_draws_its_zero_unit_variance_without_a_log_axis(tmp_path):
    # With one sample a unit has no variance: the channel panel is 0 everywhere, which a log axis cannot show
    # (matplotlib warned, and drew an empty panel).
    import warnings

    from click.testing import CliRunner

    from varprop.cli import main

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = CliRunner().invoke(main, ["simulate", "--samples", "1", "--layers", "3", "--width", "8", "--threads", "1",
                                      "--out", str(tmp_path / "one")])
    assert r.exit_code == 0, r.output
    assert not [w for w in caught if "log-scaled" in str(w.message)]
    assert (tmp_path / "one" / "means_per_layer.png").stat().st_size > 0


def test_a_residual_configurations_switched_off_branches_sit_under_its_verdict(tmp_path):
    # SkipInit is healthy and its branches are switched off: one finding for it, the second a sub-item.
    from click.testing import CliRunner

    from varprop.cli import main

    r = CliRunner().invoke(main, ["simulate", "--residual", "plain", "--residual", "skipinit", "--blocks", "6",
                                  "--width", "16", "--samples", "32", "--init", "he", "--activation", "relu",
                                  "--format", "md", "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    text = (tmp_path / "r" / "report.md").read_text()
    findings = text.split("## Findings", 1)[1].split("\n\n", 2)[1].splitlines()
    assert [line.split("**")[1] for line in findings if line.startswith("- ")] == ["residual=plain",
                                                                                  "residual=skipinit"]
    skip = findings.index(next(line for line in findings if line.startswith("- **residual=skipinit**")))
    assert findings[skip + 1].startswith("  - every branch is switched off at init")
    assert not any("switched off" in line for line in findings[:skip])


def test_switched_off_branches_of_grouped_verdicts_are_one_line(tmp_path):
    # Beyond FINDINGS_PER_CONFIG configurations the verdicts are grouped: the finding is one line, not one each.
    from click.testing import CliRunner

    from varprop.cli import main

    r = CliRunner().invoke(main, ["simulate", "--residual", "skipinit", "--blocks", "3", "--width", "8", "--samples",
                                  "16", "--init", "he", "--init", "xavier", "--init", "fan_in", "--activation", "relu",
                                  "--activation", "tanh", "--activation", "selu", "--format", "md",
                                  "--out", str(tmp_path / "g")])
    assert r.exit_code == 0, r.output
    text = (tmp_path / "g" / "report.md").read_text().split("## Findings", 1)[1].split("\n\n", 2)[1]
    assert text.count("switched off") == 1 and "- In all 9 configurations: every branch is switched off" in text


@pytest.mark.parametrize("samples, expected", [([1], "is 0 at every layer (one sample"),
                                               ([1, 8], "so not drawn, for samples=1")])
def test_a_unit_variance_of_zero_is_named_in_the_means_figure(tmp_path, monkeypatch, samples, expected):
    # One configuration with a single sample (no unit variance) drawn alone or beside another: a note says so,
    # rather than an empty panel or a silently missing line.
    from varprop.montecarlo.run import configs_for, run_configs
    from varprop.report import figures
    from varprop.spec import NetworkSpec

    run = run_configs(configs_for(NetworkSpec.square(3, 8), vary={"samples": samples}), threads=1)
    seen = {}
    monkeypatch.setattr(figures, "_figure", lambda *a, notes=(), **k: seen.setdefault("notes", list(notes)))
    figures.means_and_channels(run, tmp_path / "m.png")
    assert any(expected in n for n in seen["notes"]), seen

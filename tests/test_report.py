"""The report's formatting and layer subsampling."""

import math

import pytest

from varprop.report.markdown import fmt, fmt_pow10, shown_layers


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


@pytest.mark.parametrize("inits, panels", [(["unit", "fan_in"], 1), (["unit", "fan_in", "he"], 3)])
def test_many_configurations_become_small_multiples(tmp_path, inits, panels):
    """Up to 8 configurations share one panel; 9 (3 inits x 3 activations)
    get a panel per init, each with one colour per activation."""
    import re

    import varprop
    from varprop import stats
    from varprop.report import figures

    layers = varprop.simulate(varprop.NetworkSpec.square(2, 10), samples=20,
                              vary={"init": inits, "activation": ["linear", "relu", "tanh"]})
    path = figures.std_per_layer(layers, stats.summarize(layers), tmp_path / "std.png")
    svg = path.with_suffix(".svg").read_text()
    assert len(set(re.findall(r'<g id="axes_(\d+)">', svg))) == panels
    titles = re.findall(r"init=(unit|fan_in|he)", svg)
    assert (len(set(titles)) == 3) == (panels == 3)

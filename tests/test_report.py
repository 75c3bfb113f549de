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


@pytest.mark.parametrize("inits, grouped", [(["unit", "fan_in"], False), (["unit", "fan_in", "he"], True)])
def test_many_configurations_get_grouped_findings(inits, grouped):
    """Up to 8 configurations get a finding each; beyond, a finding names the configurations it holds for,
    and every configuration is in exactly one verdict (stable, explodes, dies)."""
    import re

    import varprop
    from varprop import stats
    from varprop.montecarlo import configs_for
    from varprop.report.markdown import findings

    vary = {"init": inits, "activation": ["linear", "relu", "tanh"]}
    spec = varprop.NetworkSpec.square(12, 20)
    configs = [{"label": c.label, "varied": c.varied} for c in configs_for(spec, vary)]
    summary = stats.summarize(varprop.simulate(spec, samples=40, vary=vary, seed=2))
    lines = findings(summary, configs)
    if not grouped:
        assert [line.split("**")[1] for line in lines] == [c["label"] for c in configs]
        return
    verdicts = [line for line in lines if re.match(r"\*\*(Stable|The signal explodes|The signal dies)\*\*", line)]
    counts = [int(re.search(r"in (\d+|all \d+) configuration", line).group(1).replace("all ", "")) for line in verdicts]
    assert sum(counts) == len(configs) == 9 and len(lines) < len(configs)
    # unit init with a linear or relu stack of width 20 grows ~sqrt(20) or ~sqrt(10) per layer: past 1e3 by layer 12
    explodes = next(line for line in lines if line.startswith("**The signal explodes**"))
    assert "unit, linear/relu" in explodes


def test_describe_names_a_subset_by_its_options():
    from varprop.report.markdown import _Facts, describe

    every = [_Facts(f"{a}, bn={n}, b={b}", {"activation": a, "bn_count": n, "batch_size": b}, 5, 0.0, None, 1.0,
                    math.nan, 0.0, None)
             for a in ("sigmoid", "relu") for n in (0, 1, 2) for b in (4, 64)]
    sigmoid_low = [f for f in every if f.varied["activation"] == "sigmoid" and f.varied["bn_count"] < 2]
    assert describe(sigmoid_low, every) == "4 configurations: sigmoid, bn_count=0/1 (any batch_size)"
    assert describe(every, every) == "all 12 configurations"
    odd = [every[0], every[7]]  # no option is free: each is named
    assert describe(odd, every) == ("2 configurations: sigmoid, bn_count=0, batch_size=4; "
                                    "relu, bn_count=0, batch_size=64")
    # Along an option with one configuration only, "any" would say nothing: named instead.
    diagonal = [_Facts(str(t), {"x": t[0], "y": t[1]}, 5, 0.0, None, 1.0, math.nan, 0.0, None)
                for t in [(0, 0), (1, 1), (0, 1)]]
    assert describe(diagonal[:1], diagonal) == "1 configuration: x=0, y=0"
    # Configurations that do not vary the same options are named by their labels.
    mixed = [_Facts(label, varied, 5, 0.0, None, 1.0, math.nan, 0.0, None)
             for label, varied in [("a", {"x": 0}), ("b", {"x": 1}), ("c", {"y": 2})]]
    assert describe(mixed[:2], mixed) == "2 configurations: a; b"


def test_findings_flag_a_lost_input_signal_and_vanishing_gradients():
    """sigmoid with fan_in init (sigma_w^2 = 1) has chi_1 = E[sigmoid'(z)^2] < 1/16: distances between inputs
    and the gradient's variance shrink by 16x or more a layer, so after 12 layers the variance across samples
    is far below 1e-6 of the layer's (its std is each unit's fixed offset) and the input gradient's std is
    below 4^-12 = 6e-8 of the output's, though the std stays near 0.1 ("stable"). relu with He init keeps
    both (chi_1 = 1)."""
    import varprop
    from varprop import stats
    from varprop.montecarlo import configs_for
    from varprop.report.markdown import findings

    vary = {"activation": ["sigmoid", "relu"], "init": ["fan_in", "he"]}
    spec = varprop.NetworkSpec.square(12, 64)
    runs = [c for c in configs_for(spec, vary, samples=64, backward=True, seed=3)
            if c.label in ("sigmoid, fan_in", "relu, he")]
    layers = varprop.simulate(runs)
    sigmoid, relu = findings(stats.summarize(layers), [{"label": c.label, "varied": c.varied} for c in runs])
    assert "stable through 12 layers" in sigmoid and "input signal is lost from layer" in sigmoid
    assert "gradients vanish" in sigmoid
    assert "signal is lost" not in relu and "gradients" not in relu

"""varprop.testing: false alarms are rare, real errors are caught, messages point at the problem."""

import math
import subprocess
import sys
import json
import textwrap

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy import stats

import varprop
from varprop import testing
from varprop.cli import main
from varprop.errors import SpecError
from varprop.spec import InitSpec, NetworkSpec, RunSpec


@pytest.mark.parametrize("name", ["he", "fan_in", "xavier", "torch-default", "keras-default"])
def test_correct_inits_pass_weight_variance_for_many_seeds(name):
    for seed in range(15):
        testing.assert_weight_variance(name, 300, 200, seed=seed)


def scaled_normal(factor):
    def init(rng, fan_in, fan_out):
        return rng.standard_normal((fan_in, fan_out)) * math.sqrt(factor / fan_in)
    return init


@pytest.mark.parametrize("shape", [(300, 200), (16, 16), (2048, 64)])
def test_ten_percent_variance_error_is_caught(shape):
    for seed in range(10):
        with pytest.raises(AssertionError, match=r"ratio 1\.0|ratio 1\.1"):
            testing.assert_weight_variance(scaled_normal(1.1), *shape, expected=1 / shape[0], seed=seed)
        testing.assert_weight_variance(scaled_normal(1.0), *shape, expected=1 / shape[0], seed=seed)


def test_heavy_tailed_init_is_judged_by_its_own_fourth_moment():
    def student(rng, fan_in, fan_out):  # t with 5 dof, variance 5/3, scaled to 1/fan_in
        return rng.standard_t(5, (fan_in, fan_out)) * math.sqrt(3 / 5 / fan_in)
    for seed in range(10):
        testing.assert_weight_variance(student, 300, 200, expected=1 / 300, seed=seed)


def test_correct_init_keeps_variance_across_seeds():
    for seed in range(8):
        r = testing.assert_preserves_variance("he", "relu", depth=20, width=128, seed=seed, direction="both")
        assert r.passed


@pytest.mark.parametrize("init,activation", [("fan_in", "relu"), ("unit", "linear"), ("torch-default", "relu")])
def test_init_off_by_sqrt2_or_worse_is_caught_within_depth_20(init, activation):
    with pytest.raises(AssertionError) as err:
        testing.assert_preserves_variance(init, activation, depth=20, width=128)
    msg = str(err.value)
    assert "at layer" in msg and "mean-field predicts" in msg and "Reproduce: varprop simulate" in msg


def test_he_times_sqrt2_is_caught():
    with pytest.raises(AssertionError, match="leaves the band"):
        testing.assert_preserves_variance(scaled_normal(4.0), "relu", depth=20, width=128)


def test_user_init_through_module_string(tmp_path, monkeypatch):
    (tmp_path / "user_inits_mod.py").write_text(textwrap.dedent("""
        import numpy as np
        def good(rng, fan_in, fan_out):
            return rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)
        def subtle(rng, fan_in, fan_out):
            return rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_out)  # fan_out by mistake
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    testing.assert_preserves_variance("user_inits_mod:good", "relu", depth=20, width=128)
    with pytest.raises(AssertionError, match="user_inits_mod:subtle"):
        testing.assert_weight_variance("user_inits_mod:subtle", 256, 64, expected=2 / 256)
    sys.modules.pop("user_inits_mod", None)


def test_matches_theory_for_wide_layers():
    table = testing.assert_matches_theory("xavier", "tanh", depth=8, width=512, backward=True)
    assert table["ok"].all() and len(table) == 2 * 9


def variance_over_fan_in(factor):
    return lambda fan_in, fan_out: factor / fan_in


@pytest.mark.parametrize("weight_variance", [1 / 512, variance_over_fan_in(1.0)])
def test_matches_theory_holds_a_user_init_to_its_stated_variance(weight_variance):
    table = testing.assert_matches_theory(scaled_normal(1.0), "tanh", depth=6, width=512,
                                          weight_variance=weight_variance, backward=True)
    assert table["ok"].all()
    with pytest.raises(AssertionError, match="stated weight variance"):  # 1.5x the stated variance
        testing.assert_matches_theory(scaled_normal(1.5), "tanh", depth=6, width=512, weight_variance=weight_variance)


def test_matches_theory_holds_a_named_init_to_a_stated_variance():
    testing.assert_matches_theory("he", "relu", depth=6, width=512, weight_variance=variance_over_fan_in(2.0))
    with pytest.raises(AssertionError, match="layer 1 is x2.0"):  # he's 2/fan_in against a stated 1/fan_in
        testing.assert_matches_theory("he", "relu", depth=6, width=512, weight_variance=variance_over_fan_in(1.0))
    # torch-default keeps its own bias in the stated theory: its weight variance 1/(3 fan_in) passes
    testing.assert_matches_theory("torch-default", "tanh", depth=6, width=512,
                                  weight_variance=variance_over_fan_in(1 / 3))


@pytest.mark.parametrize("init,options", [("he", {"gain": 2.0}), ("fan_in", {}), (scaled_normal(4.0), {})],
                         ids=["he-gain-2", "fan_in", "user-4-over-fan_in"])
def test_every_assertion_fails_on_a_wrong_init(init, options):
    """relu wants He's 2/fan_in; each init here is off by a factor 2 or more."""
    with pytest.raises(AssertionError, match="weight variance of"):
        testing.assert_weight_variance(init, 256, 256, expected=2 / 256, **options)
    with pytest.raises(AssertionError, match="leaves the band"):
        testing.assert_preserves_variance(init, "relu", depth=6, width=256, samples=64, band=1.5, **options)
    with pytest.raises(AssertionError, match="stated weight variance"):
        testing.assert_matches_theory(init, "relu", depth=6, width=256, weight_variance=2 / 256, **options)


def test_few_draws_are_topped_up_so_a_factor_two_error_fails():
    """min_draws=1 on a 3 x 3 layer: 9 draws could not tell a factor 2; the
    assertion draws 32 z^2 (766 at 1e-6) and catches it, and still passes a correct init."""
    for seed in range(10):
        testing.assert_weight_variance(scaled_normal(1.0), 3, 3, expected=1 / 3, min_draws=1, seed=seed)
        with pytest.raises(AssertionError, match=r"ratio (1\.[89]|2\.)"):
            testing.assert_weight_variance(scaled_normal(2.0), 3, 3, expected=1 / 3, min_draws=1, seed=seed)


def user_init(rng, fan_in, fan_out):
    return rng.standard_normal((fan_in, fan_out)) / math.sqrt(fan_in)


NAN, INF = float("nan"), float("inf")
BAD_CALLS = [  # (call, exception, what the message names)
    (lambda: testing.assert_weight_variance("he", 0, 10), ValueError, "fan_in"),
    (lambda: testing.assert_weight_variance("he", 10, -3), ValueError, "fan_out"),
    (lambda: testing.assert_weight_variance("he", 2.5, 10), ValueError, "fan_in"),
    (lambda: testing.assert_weight_variance("he", True, 10), ValueError, "fan_in"),
    (lambda: testing.assert_weight_variance("he", 10, 10, expected=NAN), ValueError, "expected"),
    (lambda: testing.assert_weight_variance("he", 10, 10, expected=INF), ValueError, "expected"),
    (lambda: testing.assert_weight_variance("he", 10, 10, expected=0.0), ValueError, "expected"),
    (lambda: testing.assert_weight_variance("he", 10, 10, expected=-0.1), ValueError, "expected"),
    (lambda: testing.assert_weight_variance("he", 10, 10, expected="0.1"), ValueError, "expected"),
    (lambda: testing.assert_weight_variance("he", 10, 10, false_alarm=0), ValueError, "false_alarm"),
    (lambda: testing.assert_weight_variance("he", 10, 10, false_alarm=1), ValueError, "false_alarm"),
    (lambda: testing.assert_weight_variance("he", 10, 10, false_alarm=2), ValueError, "false_alarm"),
    (lambda: testing.assert_weight_variance("he", 10, 10, false_alarm=NAN), ValueError, "false_alarm"),
    (lambda: testing.assert_weight_variance("he", 10, 10, min_draws=0), ValueError, "min_draws"),
    (lambda: testing.assert_weight_variance(user_init, 10, 10), TypeError, "expected= is required"),
    (lambda: testing.assert_weight_variance("kaimng", 10, 10), ValueError, "did you mean kaiming"),
    (lambda: testing.check_preserves_variance("he", "relu", 5, 32, false_alarm=0), ValueError, "false_alarm"),
    (lambda: testing.check_preserves_variance("he", "relu", 5, 32, false_alarm=2), ValueError, "false_alarm"),
    (lambda: testing.check_preserves_variance("he", "relu", 5, 32, band=INF), ValueError, "--band"),
    (lambda: testing.check_preserves_variance("he", "relu", 5, 32, band=NAN), ValueError, "--band"),
    (lambda: testing.check_preserves_variance("he", "relu", 5, 32, band=1.0), ValueError, "--band"),
    (lambda: testing.check_preserves_variance("he", "relu", 5, 32, replicates=4), ValueError, "--replicates"),
    (lambda: testing.check_preserves_variance("he", "relu", 5, 32, replicates="many"), ValueError, "--replicates"),
    (lambda: testing.check_preserves_variance("he", "relu", 5, 32, bogus=1), TypeError, "bogus"),
    (lambda: testing.assert_matches_theory(user_init, "tanh", 4, 64), TypeError, "weight_variance="),
    (lambda: testing.assert_matches_theory(user_init, "tanh", 4, 64, weight_variance=NAN), ValueError,
     "weight_variance"),
    (lambda: testing.assert_matches_theory(user_init, "tanh", 4, 64, weight_variance=0), ValueError,
     "weight_variance"),
    (lambda: testing.assert_matches_theory(user_init, "tanh", 4, 64, weight_variance=lambda i, o: -1.0), ValueError,
     r"weight_variance\(64, 64\)"),
    (lambda: testing.assert_matches_theory(user_init, "tanh", 4, 64, weight_variance=lambda i: 1 / i), ValueError,
     "raised TypeError"),
    (lambda: testing.assert_matches_theory("he", "tanh", 4, 64, false_alarm=0), ValueError, "false_alarm"),
    (lambda: testing.assert_matches_theory("he", "tanh", 4, 64, replicates=2), ValueError, "replicates"),
    (lambda: NetworkSpec(widths=(4, 4), init=123), SpecError, "--init"),
    (lambda: NetworkSpec.square(3, 8, init=None), SpecError, "--init"),
    (lambda: InitSpec(123), SpecError, "--init"),
    (lambda: InitSpec("he", distribution="cauchy"), SpecError, "--distribution"),
    (lambda: InitSpec("he", gain=0), SpecError, "--gain"),
    (lambda: InitSpec("he_uniform", distribution="normal"), SpecError, "--distribution: normal contradicts"),
]


@pytest.mark.parametrize("call,exception,names", BAD_CALLS)
def test_bad_api_calls_raise_a_clear_exception_of_the_right_type(call, exception, names):
    with pytest.raises(exception, match=names):
        call()


def test_simulate_takes_an_input_file(tmp_path):
    x = np.random.default_rng(0).standard_normal((40, 12))
    np.save(tmp_path / "x.npy", x)
    spec = NetworkSpec.square(3, 12)
    given = varprop.simulate(spec, input_file=tmp_path / "x.npy")
    built = varprop.simulate(RunSpec(spec, input_file=str(tmp_path / "x.npy")))
    pd.testing.assert_frame_equal(given, built)
    # computed from the file's values rounded to float32: each square within 2^-23 relative
    assert given["post_second_moment"].iloc[0] == pytest.approx(np.mean(x * x), rel=2.0**-23)
    back = varprop.simulate(RunSpec(spec, input_file=str(tmp_path / "x.npy")), input="uniform", samples=40)
    assert back["post_second_moment"].iloc[0] != given["post_second_moment"].iloc[0]  # the file was replaced


def test_undecided_layers_come_with_the_replicates_that_decide_them():
    """The number is the fewest R whose t half-width, at the spread measured,
    falls below the layer's distance to the band's edge; auto runs it."""
    kw = dict(depth=12, width=64, samples=64, seed=1)
    first = testing.check_preserves_variance("he", "relu", **kw)
    undecided = first.table[first.table["verdict"] == "undecided"]
    assert first.passed and len(undecided) and first.replicates_to_decide > first.replicates
    assert f"about {first.replicates_to_decide} replicates would decide them all" in first.message
    assert "replicates='auto' runs them" in first.message
    shared = testing.DEFAULT_FALSE_ALARM / kw["depth"]
    limit = math.log10(2)
    for row in undecided.itertuples():
        r = int(row.replicates_to_decide)
        distance = min(abs(row.log10_ratio - limit), abs(row.log10_ratio + limit))
        half = lambda n: stats.t.isf(shared / 2, n - 1) * row.sd / math.sqrt(n)  # noqa: E731
        assert half(r) < distance <= half(r - 1)
    assert first.replicates_to_decide == int(undecided["replicates_to_decide"].max())
    auto = testing.check_preserves_variance("he", "relu", replicates="auto", **kw)
    assert auto.passed and auto.replicates > 16 and (auto.table["verdict"] == "pass").all()
    assert auto.replicates_to_decide is None and "undecided" not in auto.message


def test_check_command_exit_codes(tmp_path):
    ok = CliRunner().invoke(main, ["check", "--init", "he", "--activation", "relu", "--layers", "10", "--width", "64"])
    assert ok.exit_code == 0 and ok.output.startswith("PASS")
    bad = CliRunner().invoke(main, ["check", "--init", "torch-default", "--activation", "relu", "--layers", "30",
                                    "--width", "64"])
    assert bad.exit_code == 1 and "FAIL" in bad.output and "layer" in bad.output
    wrong = CliRunner().invoke(main, ["check", "--band", "0.5"])
    assert wrong.exit_code == 2 and "--band" in wrong.stderr
    auto = CliRunner().invoke(main, ["check", "--init", "he", "--activation", "relu", "--layers", "10", "--width", "64",
                                     "--samples", "32", "--replicates", "auto", "--json"])
    chose = json.loads(auto.output)
    said = f"{chose['replicates']} replicates, as --replicates auto chose"
    assert chose["replicates"] >= 16 and said in chose["message"]


def test_pytest_plugin_fixture(tmp_path):
    (tmp_path / "test_user.py").write_text(textwrap.dedent("""
        def test_he(varprop_check):
            varprop_check.assert_preserves_variance("he", "relu", depth=8, width=64)
    """))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "import pytest" not in open(testing.__file__).read()


def test_uncentred_or_constant_weights_fail():
    with pytest.raises(AssertionError, match="not centred"):
        testing.assert_weight_variance(lambda rng, a, b: np.abs(rng.standard_normal((a, b))) / math.sqrt(a),
                                       300, 200, expected=1 / 300)
    with pytest.raises(AssertionError, match="not centred"):
        testing.assert_weight_variance(lambda rng, a, b: np.full((a, b), math.sqrt(2 / a)), 300, 200,
                                       expected=2 / 300)


def test_options_are_used_or_refused():
    with pytest.raises(AssertionError, match="leaves the band"):  # he's gain x 10: not silently dropped
        testing.assert_preserves_variance("he", "relu", depth=10, width=64, gain=10.0)
    with pytest.raises(TypeError, match="bogus"):
        testing.check_preserves_variance("he", "relu", depth=5, width=32, bogus=1)
    with pytest.raises(Exception, match="replicates"):
        testing.check_preserves_variance("unit", "linear", depth=5, width=32, replicates=2)


def test_undecided_layers_measured_outside_the_band_make_the_verdict_undecided(tmp_path):
    # A narrow he/relu stack's typical network leaves the band, but 8 networks' intervals still reach inside:
    # not "stays within" (exit 0 all the same: no layer is shown to fail).
    kw = dict(depth=40, width=16, samples=32, seed=0)
    first = testing.check_preserves_variance("he", "relu", replicates=8, **kw)
    outside = first.table[(first.table["verdict"] == "undecided") & (first.table["log10_ratio"].abs() > math.log10(2))]
    assert first.passed and first.verdict == "undecided" and first.undecided_outside == len(outside) > 0
    assert "stays within" not in first.message and f"{len(outside)} of them measured outside" in first.message
    out = CliRunner().invoke(main, ["check", "--init", "he", "--activation", "relu", "--layers", "40", "--width", "16",
                                    "--samples", "32", "--replicates", "8"])
    assert out.exit_code == 0 and out.output.startswith("UNDECIDED: ")


def test_a_std_of_zero_in_some_network_fails_the_check():
    # Width 4 relu: some network's layer is all zeros (log10 std -inf). That is out of any band, not an
    # undecided layer "on the band's edge" (it read so, with a RuntimeWarning).
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        result = testing.check_preserves_variance("he", "relu", depth=6, width=4, samples=16, replicates=32)
    assert not result.passed and "std 0 in some of 32 networks" in result.message


def test_assert_preserves_variance_warns_when_undecided():
    with pytest.warns(testing.UndecidedWarning, match="measured outside the band"):
        testing.assert_preserves_variance("he", "relu", depth=40, width=16, samples=32, replicates=8, seed=0)

"""varprop.testing: false alarms are rare, real errors are caught, messages point at the problem."""

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

from varprop import testing
from varprop.cli import main


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
    assert table["ok"].all()
    with pytest.raises(ValueError, match="no mean-field prediction"):  # a user init's variance is unknown
        testing.assert_matches_theory(scaled_normal(1.5), "tanh", depth=8, width=512)


def test_check_command_exit_codes(tmp_path):
    ok = CliRunner().invoke(main, ["check", "--init", "he", "--activation", "relu", "--layers", "10", "--width", "64"])
    assert ok.exit_code == 0 and ok.output.startswith("PASS")
    bad = CliRunner().invoke(main, ["check", "--init", "torch-default", "--activation", "relu", "--layers", "30",
                                    "--width", "64"])
    assert bad.exit_code == 1 and "FAIL" in bad.output and "layer" in bad.output
    wrong = CliRunner().invoke(main, ["check", "--band", "0.5"])
    assert wrong.exit_code == 2 and "--band" in wrong.stderr


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

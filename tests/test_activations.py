"""Activations: derivatives, and evaluation at scales beyond float range."""

import math

import numpy as np
import pytest

from varprop.nn import activations as A

NAMES = A.NAMES


@pytest.mark.parametrize("name", NAMES)
def test_derivative_matches_central_difference(name):
    act = A.get(name)
    x = np.linspace(-6, 6, 1001)
    x = x[np.abs(x) > 1e-3]  # kinks at 0
    h = 1e-6
    numeric = (act.phi(x + h) - act.phi(x - h)) / (2 * h)
    np.testing.assert_allclose(act.dphi(x), numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", NAMES)
def test_metadata_limits_match_phi(name):
    act = A.get(name)
    big = 1e3
    assert act.phi(np.array([big]))[0] == pytest.approx(act.slope_pos * big + act.offset_pos, abs=1e-9)
    assert act.phi(np.array([-big]))[0] == pytest.approx(-act.slope_neg * big + act.offset_neg, abs=1e-9)
    assert act.phi(np.array([0.0]))[0] == act.phi0
    tiny = 1e-12
    assert (act.phi(np.array([tiny]))[0] - act.phi0) / tiny == pytest.approx(act.d0_pos, rel=1e-3)
    assert (act.phi(np.array([-tiny]))[0] - act.phi0) / -tiny == pytest.approx(act.d0_neg, rel=1e-3)


def shape(act, u, log_s):
    """phi(exp(log_s) u) up to a positive factor: u_out / max |u_out|."""
    out, _ = A.apply_scaled(act, u, log_s)
    out = out.astype(np.float64)
    return out / np.max(np.abs(out))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("threshold", [A.LOG_DIRECT, -A.LOG_DIRECT])
def test_scaled_evaluation_is_continuous_across_regimes(name, threshold):
    """Just inside the threshold phi is evaluated directly, just outside from its
    limits; at s = e^+-300 both are exact to float64, so the shapes must agree."""
    act = A.get(name)
    u = np.random.default_rng(0).standard_normal((50, 40))
    inside, outside = shape(act, u, threshold * (1 - 1e-5)), shape(act, u, threshold * (1 + 1e-5))
    np.testing.assert_allclose(inside, outside, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_float32_fast_path_agrees_with_float64(name):
    act = A.get(name)
    u = np.random.default_rng(1).standard_normal((30, 30)).astype(np.float32)
    for log_s in (-5.0, 0.0, 3.0):
        fast, l32 = A.apply_scaled(act, u, log_s)
        exact = act.phi(u.astype(np.float64) * math.exp(log_s))
        np.testing.assert_allclose(fast * math.exp(l32), exact, rtol=2e-6, atol=2e-6 * np.max(np.abs(exact)))


def test_float32_keeps_a_small_signal_around_phi0():
    """At x ~ 1e-5 sigmoid is 0.5 + x/4: the signal is a few float32 ulps of
    phi(0). Rounding each value once adds an error e of variance at most
    ulp(0.5)^2/12, independent of x, so the output's std comes out high by
    var(e) / (2 var) on average, give or take sqrt(var(e) / var / n) (the
    sample covariance of x and e); the bound is that bias plus 4 of those.
    Float32 arithmetic inside sigmoid errs by several roundings, correlated
    with x: 1.3e-3, 11 times the bound. (softplus, ln 2 + x/2, is evaluated
    the same way, but its float32 arithmetic errs by only 2.6e-5 here, too
    little for this test to tell apart.)"""
    act = A.get("sigmoid")
    n = 100_000
    u = np.random.default_rng(3).standard_normal(n).astype(np.float32)
    out, l32 = A.apply_scaled(act, u, math.log(1e-5))
    got = np.std(out.astype(np.float64) * math.exp(l32))
    exact = np.std(act.phi(u.astype(np.float64) * 1e-5))
    noise = np.spacing(np.float32(act.phi0)) ** 2 / 12 / exact**2  # var(e) / var
    assert abs(got / exact - 1) < noise / 2 + 4 * math.sqrt(noise / n)


def test_huge_scales():
    u = np.array([-2.0, -0.5, 0.0, 0.5, 3.0])
    tanh, l = A.apply_scaled(A.get("tanh"), u, 1e4)
    assert l == 0 and tanh.tolist() == [-1, -1, 0, 1, 1]
    sig, l = A.apply_scaled(A.get("sigmoid"), u, 1e4)
    assert l == 0 and sig.tolist() == [0, 0, 0.5, 1, 1]
    gelu, l = A.apply_scaled(A.get("gelu"), u, 1e4)
    assert l == 1e4 and gelu.tolist() == [0, 0, 0, 0.5, 3.0]
    selu, l = A.apply_scaled(A.get("selu"), u, 1e4)
    assert l == 1e4 and selu[3] == pytest.approx(0.5 * A.SELU_LAMBDA) and selu[0] == 0
    tiny_sig, l = A.apply_scaled(A.get("sigmoid"), u, -1e4)
    assert l == 0 and (tiny_sig == 0.5).all()
    tiny_elu, l = A.apply_scaled(A.get("elu"), u, -1e4)
    assert l == -1e4 and tiny_elu.tolist() == u.tolist()
    d = A.dphi_scaled(A.get("tanh"), u, 1e4)
    assert d.tolist() == [0, 0, 1, 0, 0]


@pytest.mark.parametrize("name", A.NAMES)
@pytest.mark.parametrize("log_s", [-800.0, -5000.0])
def test_derivative_keeps_the_side_at_scales_below_float64(name, log_s):
    """Where exp(log_s) * u underflows to 0, phi' still takes each entry's
    side: the metadata's phi'(0+) and phi'(0-) (relu's gradient must not die,
    selu's positive side must not get its negative slope)."""
    act = A.get(name)
    for dtype in (np.float32, np.float64):
        got = A.dphi_scaled(act, np.array([-1.5, 2.0], dtype), log_s)
        assert got.tolist() == pytest.approx([act.d0_neg, act.d0_pos], rel=1e-6)


def _float32_grid() -> np.ndarray:
    """Dense over [-90, 90] (past where every phi' here leaves float32's normal
    range, about 44 for tanh' and 87 for the others), and logarithmic down
    to 1e-30 on both sides of 0."""
    tiny = np.logspace(-30, 0, 3001)
    return np.concatenate([np.linspace(-90, 90, 360_001), tiny, -tiny]).astype(np.float32)


# Float64 references in closed forms that are accurate to a few float64 ulps on the grid.
_REFERENCES = {
    "tanh": lambda x: 1 / np.cosh(x) ** 2,
    "sigmoid": lambda x: np.exp(-np.abs(x)) / (1 + np.exp(-np.abs(x))) ** 2,
    "elu": lambda x: np.where(x > 0, 1.0, np.exp(np.minimum(x, 0))),
    "selu": lambda x: A.SELU_LAMBDA * np.where(x > 0, 1.0, A.SELU_ALPHA * np.exp(np.minimum(x, 0))),
}


@pytest.mark.parametrize("name", sorted(_REFERENCES))
def test_vectorised_derivatives_keep_relative_accuracy_in_float32(name):
    """phi' in float32, tails included (the backward pass multiplies gradients
    by phi' of saturated units, so its relative accuracy matters there too),
    is within 8 float32 ulps of the exact value: NumPy's float32 exp is within
    a few ulps, and the three or four operations after it add half an ulp
    each. That is checked wherever the exact value is a normal float32; below
    (subnormals, which keep no relative accuracy), the result must be as small."""
    x = _float32_grid()
    with np.errstate(over="ignore"):
        exact = _REFERENCES[name](x.astype(np.float64))
    got = A.get(name).dphi(x)
    assert got.dtype == np.float32
    normal = exact > np.finfo(np.float32).tiny
    ulp = np.spacing(exact[normal].astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(got[normal] - exact[normal]) / ulp) <= 8
    assert np.all(got[~normal] <= np.finfo(np.float32).tiny)


@pytest.mark.parametrize("name", ["elu", "selu"])
def test_float32_exponential_side_keeps_relative_accuracy(name):
    """elu's negative side in float32, alpha (e^x - 1) by the identity
    e^x - 1 = 2t / (1 - t) with t = tanh(x/2), is within 8 ulps of the exact
    value everywhere on the grid, down to x = -1e-30, where e^x - 1 ~ x would
    lose every digit to cancellation if taken as exp(x) - 1."""
    act = A.get(name)
    x = _float32_grid()
    x = x[x < 0]
    exact = act.phi(x.astype(np.float64))  # float64 keeps np.expm1
    got = act.phi(x)
    assert got.dtype == np.float32
    ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(got - exact) / ulp) <= 8


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_phi_and_derivative_together_equal_them_apart(name, dtype):
    """phi_dphi_scaled shares work between phi and phi' but must not change a
    bit (signs of zero and NaNs included), on a strided view too."""
    act = A.get(name)
    u = np.random.default_rng(2).standard_normal((20, 30)).astype(dtype)
    u[0, :5] = [0.0, -0.0, np.inf, -np.inf, np.nan]
    bits = np.uint32 if dtype == np.float32 else np.uint64
    for view in (u, u[:, ::3]):
        for log_s in (-30.0, -5.0, 0.0, 3.0, 30.0, 800.0):
            with np.errstate(invalid="ignore"):
                h, log_h, d = A.phi_dphi_scaled(act, view, log_s)
                h_apart, log_apart = A.apply_scaled(act, view, log_s)
                d_apart = A.dphi_scaled(act, view, log_s)
            np.testing.assert_equal(log_h, log_apart)  # NaN where an input is NaN
            assert np.array_equal(np.asarray(h).view(bits), np.asarray(h_apart).view(bits))
            assert np.array_equal(np.asarray(d).view(bits), np.asarray(d_apart).view(bits))


def test_derivatives_take_zero_dimensional_input():
    for name in NAMES:
        assert np.isfinite(A.get(name).dphi(np.array(-0.5)))


# --- framework names ----------------------------------------------------------
# The functions as PyTorch, Keras and JAX define them (torch/nn/modules/activation.py,
# keras/src/activations/activations.py, jax/_src/nn/functions.py), written here independently.
def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


FRAMEWORK_ACTIVATIONS = [
    ("ReLU", lambda x: np.maximum(x, 0)),
    ("Relu", lambda x: np.maximum(x, 0)),
    ("Tanh", np.tanh),
    ("Sigmoid", _sigmoid),
    ("SiLU", lambda x: x * _sigmoid(x)),
    ("swish", lambda x: x * _sigmoid(x)),  # keras.activations.swish, jax.nn.swish: aliases of silu
    ("GELU", lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))),  # torch approximate='none'
    ("ELU", lambda x: np.where(x > 0, x, np.exp(x) - 1)),  # alpha = 1 in all three
    ("SELU", lambda x: 1.0507009873554804934193349852946 * np.where(x > 0, x, 1.6732632423543772848170429916717
                                                                       * (np.exp(x) - 1))),
    ("Softplus", lambda x: np.log1p(np.exp(x))),
    ("LeakyReLU", lambda x: np.where(x >= 0, x, 0.01 * x)),  # torch and jax default negative_slope 0.01
    ("leaky-relu", lambda x: np.where(x >= 0, x, 0.01 * x)),
    ("Identity", lambda x: x),  # torch.nn.Identity; keras' "linear"
]


@pytest.mark.parametrize("name,reference", FRAMEWORK_ACTIVATIONS)
def test_framework_names_are_the_framework_functions(name, reference):
    x = np.linspace(-8, 8, 3201)
    np.testing.assert_allclose(A.get(name).phi(x), reference(x), rtol=1e-13, atol=1e-15)
    assert A.canonical_name(name) in NAMES


@pytest.mark.parametrize("typed,suggested", [("rleu", "relu"), ("Sigmod", "sigmoid"), ("gleu", "gelu"),
                                             ("swihs", "swish"), ("leakyrelu6", "leaky_relu")])
def test_a_misspelled_activation_gets_the_closest_name_in_any_case(typed, suggested):
    with pytest.raises(ValueError, match=rf"\(did you mean {suggested}\?\)"):
        A.canonical_name(typed)


def test_relu_in_another_case_is_relu_not_a_suggestion_of_elu():
    from varprop.options import parse_activation

    assert parse_activation("Relu") == parse_activation("RELU") == "relu"

"""Init schemes: realised variances, bounds and orthogonality, with tolerances
from the sampling distribution of each statistic (false-alarm rate 1e-6 per
check, fixed seeds)."""

import math
import sys
import textwrap

import numpy as np
import pytest
from scipy import stats

from varprop.nn import inits
from varprop.montecarlo import generator

from statcheck import z_two_sided

FAN_IN, FAN_OUT = 300, 200
ALPHA = 1e-6
FANS = {"fan_in": FAN_IN, "fan_out": FAN_OUT, "fan_avg": (FAN_IN + FAN_OUT) / 2}
# Kurtosis of each standard draw: the variance of a mean of squares is (kurt - 1) sd^4 / n.
KURTOSIS = {
    "normal": 3.0,
    "uniform": 1.8,
    "truncated_normal": float(stats.truncnorm(-2, 2).stats(moments="k")) + 3.0,
}


def expected_variance(name: str, mode: str) -> float:
    """The variance each scheme should realise, written from its definition."""
    return {
        "unit": 1.0,
        "fan_in": 1.0 / FANS[mode],
        "he": 2.0 / FANS[mode],
        "xavier": 1.0 / FANS[mode],  # xavier's own mode is fan_avg: 2 / (fan_in + fan_out)
        "torch-default": 1.0 / (3 * FANS[mode]),
        "keras-default": 1.0 / FANS[mode],
    }[name]


def realised(w: np.ndarray) -> float:
    """Second moment about the known mean 0 (n s^2 / v is chi-square(n) for normals)."""
    w = w.astype(np.float64)
    return float(np.mean(w * w))


def assert_variance(w: np.ndarray, v: float, distribution: str) -> None:
    n = w.size
    m2 = realised(w)
    if distribution == "normal":
        lo, hi = stats.chi2.ppf([ALPHA / 2, 1 - ALPHA / 2], n) / n
    else:
        half = z_two_sided(ALPHA) * math.sqrt((KURTOSIS[distribution] - 1) / n)
        lo, hi = 1 - half, 1 + half
    assert lo <= m2 / v <= hi, f"realised/expected variance {m2 / v:.5f} outside [{lo:.5f}, {hi:.5f}]"


@pytest.mark.parametrize("distribution", inits.DISTRIBUTIONS)
@pytest.mark.parametrize("mode", inits.MODES)
@pytest.mark.parametrize("name", ["unit", "fan_in", "he", "xavier", "torch-default", "keras-default"])
def test_realised_variance_matches_rule(name, mode, distribution):
    scheme = inits.resolve(name, distribution=distribution, mode=mode)
    w0, scale = inits.draw_weights(scheme, generator(7, 0, 1, "weights"), FAN_IN, FAN_OUT, np.float32)
    assert w0.shape == (FAN_IN, FAN_OUT)
    assert_variance(w0 * scale, expected_variance(name, mode), distribution)


@pytest.mark.parametrize("name,mode", [("xavier", "fan_avg"), ("keras-default", "fan_avg"), ("he", "fan_in"),
                                       ("torch-default", "fan_in"), ("fan_in", "fan_in")])
def test_presets_use_their_own_mode_and_distribution(name, mode):
    scheme = inits.resolve(name)
    assert scheme.mode == mode
    w0, scale = inits.draw_weights(scheme, generator(8, 0, 1, "weights"), FAN_IN, FAN_OUT)
    assert_variance(w0 * scale, expected_variance(name, mode), scheme.distribution)


def test_framework_defaults():
    # torch.nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
    torch = inits.resolve("torch-default")
    assert torch.distribution == "uniform"
    w0, scale = inits.draw_weights(torch, generator(1, 0, 1, "weights"), FAN_IN, FAN_OUT)
    assert np.max(np.abs(w0 * scale)) <= 1 / math.sqrt(FAN_IN) * (1 + 1e-6)
    bias = inits.draw_bias(torch, None, np.random.default_rng(2), FAN_IN, 200_000)
    assert np.max(np.abs(bias)) <= 1 / math.sqrt(FAN_IN)
    assert_variance(bias, 1 / (3 * FAN_IN), "uniform")
    # keras Dense: glorot_uniform, limit sqrt(6 / (fan_in + fan_out)), zero bias.
    keras = inits.resolve("keras-default")
    w0, scale = inits.draw_weights(keras, generator(1, 0, 1, "weights"), FAN_IN, FAN_OUT)
    limit = math.sqrt(6 / (FAN_IN + FAN_OUT))
    assert np.max(np.abs(w0 * scale)) <= limit * (1 + 1e-6)
    assert not inits.has_bias(keras, None)
    assert inits.has_bias(keras, 0.1) and not inits.has_bias(torch, 0.0)


@pytest.mark.parametrize("name", ["fan_in", "he", "xavier"])
def test_uniform_bound_is_sqrt_3v_and_reached(name):
    v = inits.variance(inits.resolve(name), FAN_IN, FAN_OUT)
    w0, scale = inits.draw_weights(inits.resolve(name, distribution="uniform"), generator(3, 0, 1, "weights"),
                                   FAN_IN, FAN_OUT)
    peak = np.max(np.abs(w0 * scale))
    bound = math.sqrt(3 * v)
    # P(max |w| < 0.999 bound) = 0.999 ** 60000 ~ 1e-26.
    assert 0.999 * bound <= peak <= bound * (1 + 1e-6)


def test_truncated_normal_constant_and_bound():
    assert inits.TRUNC_SD == pytest.approx(stats.truncnorm(-2, 2).std(), rel=1e-15)
    scheme = inits.resolve("he", distribution="truncated_normal")
    v = inits.variance(scheme, FAN_IN, FAN_OUT)
    w0, scale = inits.draw_weights(scheme, generator(4, 0, 1, "weights"), FAN_IN, FAN_OUT)
    pre_truncation_sd = math.sqrt(v) / inits.TRUNC_SD
    assert np.max(np.abs(w0 * scale)) <= 2 * pre_truncation_sd * (1 + 1e-6)
    assert np.max(np.abs(w0)) > 1.99  # draws do reach the truncation points
    assert_variance(w0 * scale, v, "truncated_normal")


@pytest.mark.parametrize("shape", [(300, 200), (200, 300), (128, 128)])
@pytest.mark.parametrize("gain", [1.0, 2.0])
def test_orthogonal_is_orthogonal(shape, gain):
    scheme = inits.resolve("orthogonal", gain=gain)
    w0, scale = inits.draw_weights(scheme, generator(5, 0, 1, "weights"), *shape)
    w = (w0 * scale).astype(np.float64)
    gram = w.T @ w if shape[0] >= shape[1] else w @ w.T
    eps = np.finfo(np.float32).eps
    np.testing.assert_allclose(gram, gain**2 * np.eye(gram.shape[0]), atol=gain**2 * 50 * eps)
    assert inits.variance(scheme, *shape) == pytest.approx(gain**2 / max(shape))


def test_schemes_share_underlying_draws():
    """Common random numbers: same generator, same distribution, same W0."""
    a, sa = inits.draw_weights(inits.resolve("unit"), generator(9, 2, 3, "weights"), 50, 40)
    b, sb = inits.draw_weights(inits.resolve("he"), generator(9, 2, 3, "weights"), 50, 40)
    np.testing.assert_array_equal(a, b)
    assert sb / sa == pytest.approx(math.sqrt(2 / 50))


def test_gain_and_scale_override():
    scheme = inits.resolve("he", gain=1.0, scale=4.0)
    assert inits.variance(scheme, 100, 10) == pytest.approx(4.0 / 100)


def _user_init(rng, fan_in, fan_out):
    return rng.standard_normal((fan_in, fan_out)) * 0.5 / math.sqrt(fan_in)


def test_user_callable_and_module_string(tmp_path, monkeypatch):
    w, scale = inits.draw_weights(inits.resolve(_user_init), np.random.default_rng(0), 300, 200)
    assert scale == 1.0
    assert_variance(w, 0.25 / 300, "normal")
    (tmp_path / "my_inits.py").write_text(textwrap.dedent("""
        import numpy as np
        def tiny(rng, fan_in, fan_out):
            return rng.standard_normal((fan_in, fan_out)) * 1e-3
        def wrong_shape(rng, fan_in, fan_out):
            return np.zeros((fan_out, fan_in))
        def refuses(rng, fan_in, fan_out):
            raise ValueError("fan_in must be even")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    scheme = inits.resolve("my_inits:tiny")
    w, _ = inits.draw_weights(scheme, np.random.default_rng(0), 300, 200)
    assert_variance(w, 1e-6, "normal")
    with pytest.raises(ValueError, match="shape"):
        inits.draw_weights(inits.resolve("my_inits:wrong_shape"), np.random.default_rng(0), 30, 20)
    with pytest.raises(ValueError, match="^my_inits:refuses raised ValueError: fan_in must be even$"):
        inits.draw_weights(inits.resolve("my_inits:refuses"), np.random.default_rng(0), 30, 20)
    with pytest.raises(ValueError, match="no callable"):
        inits.resolve("my_inits:nothing")
    with pytest.raises(ValueError, match="cannot import"):
        inits.resolve("no_such_module_xyz:f")
    sys.modules.pop("my_inits", None)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_normal_is_standard_normal(dtype):
    """The Box-Muller draws: mean, variance, fourth moment (kurtosis 3), tail
    masses beyond 3 and 4 sd, the whole CDF (KS), and the independence of
    each pair's two values; every check at false-alarm rate 1e-6."""
    n = 2**22
    z = inits.standard_normal(generator(11, 0, 1, "weights"), (n,), dtype).astype(np.float64)
    assert z.dtype == np.float64 and z.shape == (n,)
    zc = z_two_sided(ALPHA)
    assert abs(z.mean()) <= zc / math.sqrt(n)
    lo, hi = stats.chi2.ppf([ALPHA / 2, 1 - ALPHA / 2], n) / n
    assert lo <= np.mean(z**2) <= hi
    # E z^4 = 3 and Var z^4 = E z^8 - 9 = 105 - 9 = 96 for a standard normal.
    assert abs(np.mean(z**4) - 3.0) <= zc * math.sqrt(96 / n)
    for t in (3.0, 4.0):
        k = int(np.count_nonzero(np.abs(z) > t))
        assert stats.binomtest(k, n, 2 * stats.norm.sf(t)).pvalue > ALPHA, (t, k)
    assert stats.kstest(z, "norm").pvalue > ALPHA
    a, b = z[0::2], z[1::2]  # each pair r cos t, r sin t shares r
    for x, y in ((a, b), (a**2, b**2)):
        assert abs(np.corrcoef(x, y)[0, 1]) <= zc / math.sqrt(n // 2)


def test_fast_normal_is_the_documented_transform_of_the_generators_words():
    """standard_normal's float32 pairs are r cos t, r sin t of the generator's 64-bit words, in order
    (the halves a, b of each word: u = (a + 1/2) 2^-32, r = sqrt(-2 ln u), t = 2 pi b 2^-32), computed
    here in float64 from random_raw: equal to float32's rounding of each step (a few ulp of r, and t's
    error times r), so any other stream, order or pairing is caught."""
    n = 300_001
    z = inits.standard_normal(generator(5, 1, 2, "weights"), (n,), np.float32).astype(np.float64)
    words = generator(5, 1, 2, "weights").bit_generator.random_raw((n + 1) // 2)
    a, b = (words & 0xFFFFFFFF).astype(np.float64), (words >> np.uint64(32)).astype(np.float64)
    r = np.sqrt(-2 * np.log(np.minimum((a + 0.5) * 2.0**-32, 1 - 2.0**-24)))
    t = 2 * np.pi * b * 2.0**-32
    want = np.column_stack([r * np.cos(t), r * np.sin(t)]).ravel()[:n]
    # float32 rounding: u to 2 2^-24 relative, so ln u to 4 2^-24 absolute and r = sqrt(-2 ln u) to that over
    # r (large where u -> 1 and r -> 0); ln u, sqrt and the products a few 2^-24 relative; t to 2 pi 2^-24
    # absolute, scaled by r.
    rr = np.repeat(r, 2)[:n]
    tol = 2.0**-24 * (16 * np.abs(want) + 4 / rr + 8 * rr * (2 * np.pi + 1))
    assert np.all(np.abs(z - want) <= tol)


def test_fast_normal_odd_sizes_and_shapes():
    rng = generator(2, 0, 0, "inputs")
    assert inits.standard_normal(rng, (3, 5), np.float32).shape == (3, 5)
    assert inits.standard_normal(rng, (7,), np.float32).dtype == np.float32
    assert inits.standard_normal(rng, (0, 4), np.float32).shape == (0, 4)
    assert inits.standard_normal(rng, (0, 4)).shape == (0, 4)
    for dtype in (np.float32, np.float64):
        a = inits.standard_normal(generator(2, 1, 1, "weights"), (1001,), dtype)
        b = inits.standard_normal(generator(2, 1, 1, "weights"), (1001,), dtype)
        assert np.array_equal(a, b)  # same node of the seed tree, same draws
        c = inits.standard_normal(generator(2, 1, 1, "weights"), (600,), dtype)
        assert np.array_equal(a[:600], c)  # a prefix of a longer draw: common random numbers across sizes


# --- framework names ---------------------------------------------------------
# Each row is written from the framework's own source (torch/nn/init.py,
# keras/src/initializers/random_initializers.py, jax/_src/nn/initializers.py),
# not from varprop: the variance it targets for a (FAN_IN x FAN_OUT) kernel
# and the distribution it draws from.
FAN_AVG = (FAN_IN + FAN_OUT) / 2
FRAMEWORK_NAMES = [
    # torch: kaiming_normal_(a=0, mode='fan_in', nonlinearity='leaky_relu'): std = sqrt(2 / (1 + 0)) / sqrt(fan_in)
    ("kaiming_normal", {}, 2 / FAN_IN, "normal"),
    ("kaiming_normal_", {}, 2 / FAN_IN, "normal"),  # the function's own spelling
    ("kaiming", {}, 2 / FAN_IN, "normal"),
    # torch: kaiming_uniform_: bound = sqrt(3) * std
    ("kaiming_uniform", {}, 2 / FAN_IN, "uniform"),
    ("kaiming_normal", {"mode": "fan_out"}, 2 / FAN_OUT, "normal"),  # torch's mode='fan_out'
    # torch: xavier_normal_ / xavier_uniform_: std = sqrt(2 / (fan_in + fan_out)), a = sqrt(3) std
    ("xavier_normal", {}, 1 / FAN_AVG, "normal"),
    ("xavier_uniform", {}, 1 / FAN_AVG, "uniform"),
    # Keras / JAX: VarianceScaling(2.0, fan_in, truncated_normal) and (2.0, fan_in, uniform)
    ("he_normal", {}, 2 / FAN_IN, "truncated_normal"),
    ("HeNormal", {}, 2 / FAN_IN, "truncated_normal"),
    ("he_uniform", {}, 2 / FAN_IN, "uniform"),
    # Keras / JAX: glorot = VarianceScaling(1.0, fan_avg, truncated_normal | uniform)
    ("glorot_normal", {}, 1 / FAN_AVG, "truncated_normal"),
    ("GlorotUniform", {}, 1 / FAN_AVG, "uniform"),
    ("glorot", {}, 1 / FAN_AVG, "normal"),
    # Keras / JAX: lecun = VarianceScaling(1.0, fan_in, truncated_normal | uniform)
    ("lecun_normal", {}, 1 / FAN_IN, "truncated_normal"),
    ("lecun_uniform", {}, 1 / FAN_IN, "uniform"),
    # Keras: VarianceScaling() defaults scale=1, mode="fan_in", distribution="truncated_normal"
    ("variance_scaling", {}, 1 / FAN_IN, "truncated_normal"),
    ("VarianceScaling", {"scale": 2.0, "mode": "fan_avg", "distribution": "uniform"}, 2 / FAN_AVG, "uniform"),
    # torch.nn.Linear: kaiming_uniform_(a=sqrt(5)): bound 1 / sqrt(fan_in)
    ("pytorch", {}, 1 / (3 * FAN_IN), "uniform"),
    # keras Dense: glorot_uniform
    ("keras", {}, 1 / FAN_AVG, "uniform"),
]


def bound(v: float, distribution: str) -> float:
    """Largest |w| the framework can draw: a = sqrt(3 v) for uniform; 2 sd of
    the pre-truncation normal, sd = sqrt(v) / 0.87962566103423978, for the truncated one."""
    return {"uniform": math.sqrt(3 * v), "truncated_normal": 2 * math.sqrt(v) / 0.87962566103423978,
            "normal": math.inf}[distribution]


@pytest.mark.parametrize("name,options,variance,distribution", FRAMEWORK_NAMES)
def test_framework_names_draw_the_framework_variance_and_distribution(name, options, variance, distribution):
    scheme = inits.resolve(name, **options)
    assert scheme.distribution == distribution
    assert inits.variance(scheme, FAN_IN, FAN_OUT) == pytest.approx(variance, rel=1e-12)
    w0, scale = inits.draw_weights(scheme, generator(12, 0, 1, "weights"), FAN_IN, FAN_OUT)
    w = (w0 * scale).astype(np.float64)
    assert_variance(w, variance, distribution)
    peak = float(np.max(np.abs(w)))
    if distribution == "normal":  # 60,000 normal draws pass 4 sd with probability 1 - (1 - 6.3e-5)^60000 > 0.97
        assert peak > 3.5 * math.sqrt(variance)
    else:  # reached: P(max < 0.999 bound) is below 1e-20 for either
        assert 0.999 * bound(variance, distribution) <= peak <= bound(variance, distribution) * (1 + 1e-6)


def test_framework_names_give_the_numbers_of_their_canonical_spelling():
    """kaiming_uniform is he + uniform: the same scheme, so the same draws."""
    a = inits.draw_weights(inits.resolve("kaiming_uniform"), generator(1, 0, 1, "weights"), 30, 20)
    b = inits.draw_weights(inits.resolve("he", distribution="uniform"), generator(1, 0, 1, "weights"), 30, 20)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]


@pytest.mark.parametrize("typed,canonical", [
    ("he", "he"), ("Kaiming", "he"), ("KAIMING_UNIFORM", "he_uniform"), ("kaiming-uniform", "he_uniform"),
    ("he_normal", "he_truncated_normal"), ("glorot_uniform", "xavier_uniform"), ("Xavier_Uniform", "xavier_uniform"),
    ("glorot_normal", "xavier_truncated_normal"), ("lecun", "fan_in"), ("LecunNormal", "fan_in_truncated_normal"),
    ("torch_default", "torch-default"), ("Keras-Default", "keras-default"), ("Orthogonal", "orthogonal"),
    ("fan_in_uniform", "fan_in_uniform"),
])
def test_names_compare_without_case_or_separators(typed, canonical):
    assert inits.canonical_name(typed) == canonical


@pytest.mark.parametrize("typed,suggested", [("kaimng", "kaiming"), ("glorot_unifrom", "glorot_uniform"),
                                             ("Xavir", "xavier"), ("lecun_norml", "lecun_normal")])
def test_a_misspelled_name_gets_the_closest_name_or_alias(typed, suggested):
    with pytest.raises(ValueError, match=rf"\(did you mean {suggested}\?\)"):
        inits.canonical_name(typed)


@pytest.mark.parametrize("name,distribution", [("he_uniform", "normal"), ("kaiming_normal", "truncated_normal"),
                                               ("glorot_normal", "uniform")])
def test_a_name_that_says_its_distribution_refuses_another(name, distribution):
    with pytest.raises(ValueError, match=rf"{distribution} contradicts --init {name}"):
        inits.resolve(name, distribution=distribution)
    own = inits.resolve(name).distribution
    assert inits.resolve(name, distribution=own).distribution == own  # saying it again is fine


@pytest.mark.parametrize("size", [2 * inits.PAIRS_PER_PIECE + 2, 5 * 2 * inits.PAIRS_PER_PIECE + 6])
def test_a_draw_in_pieces_is_the_draw_whole_in_any_order_on_any_threads(size):
    # Each piece reads the stream from its own start (a copy of the generator advanced there): the tasks,
    # run backwards or on two threads, fill exactly the numbers of one sequential draw.
    from varprop.parallel import Pool

    whole = inits.standard_normal(generator(7, 1, 2, "weights", 0), (size,), np.float32)
    backwards, threaded = np.empty(size, np.float32), np.empty(size, np.float32)
    tasks = inits.standard_normal_tasks(generator(7, 1, 2, "weights", 0), backwards)
    assert len(tasks) == -(-size // (2 * inits.PAIRS_PER_PIECE))
    for task in reversed(tasks):
        task()
    Pool(2).map(lambda task: task(), inits.standard_normal_tasks(generator(7, 1, 2, "weights", 0), threaded))
    assert np.array_equal(backwards, whole) and np.array_equal(threaded, whole)

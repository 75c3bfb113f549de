"""Propagation laws the engine must reproduce, each tested with a tolerance
from the sampling distribution and a fixed seed.

The exact finite-width facts used: with zero-mean weights of variance v and
any fixed input h, E[m2(h W)] = fan_in * v * m2(h) (m2 = second moment), so
per-layer ratios of second moments are martingale differences with known
mean, whatever the depth. Their average over layers and replicates is tested
against a t interval; single deep networks are never held to a tight band.
"""

import math

import numpy as np
import pytest
from scipy import special

import varprop
from statcheck import t_two_sided

ALPHA = 1e-5


def pivot(df, col):
    return df.pivot(index="replicate", columns="layer", values=col).to_numpy(dtype=float)


def assert_mean(values, expected, alpha=ALPHA, what=""):
    v = np.asarray(values, dtype=float).ravel()
    mean, se = v.mean(), v.std(ddof=1) / math.sqrt(v.size)
    tq = t_two_sided(alpha, v.size - 1)
    assert abs(mean - expected) <= tq * se, f"{what}: mean {mean:.5g} vs {expected:.5g} (se {se:.3g}, t {tq:.2f})"


@pytest.fixture(scope="module")
def fan_in_stack():
    # The ratio m2_l / m2_0 is right-skewed at depth (lognormal-like, log sd ~0.75 at layer 100); with 300
    # replicates the t statistic's skew (~skew / sqrt(R) < 0.1) leaves the stated false-alarm rate meaningful.
    spec = varprop.NetworkSpec.square(layers=100, width=100, init="fan_in")
    return varprop.simulate(spec, samples=32, replicates=300, seed=11)


def test_fan_in_linear_keeps_mean_variance_at_every_layer(fan_in_stack):
    m2 = pivot(fan_in_stack, "post_second_moment")
    ratio = m2 / m2[:, :1]  # E[ratio] = 1 exactly at every layer
    for layer in range(1, 101):
        # Bonferroni over the 100 layers.
        assert_mean(ratio[:, layer], 1.0, alpha=ALPHA / 100, what=f"layer {layer}")


def test_fan_in_linear_typical_network_drifts_below(fan_in_stack):
    logs = pivot(fan_in_stack, "post_log10_std")
    drift = logs[:, 100] - logs[:, 0]
    upper = drift.mean() + t_two_sided(ALPHA, drift.size - 1) * drift.std(ddof=1) / math.sqrt(drift.size)
    assert upper < 0, "the geometric mean over networks should fall below the preserved mean"


@pytest.mark.parametrize("distribution", ["normal", "uniform"])
def test_unit_init_grows_variance_by_fan_in_per_layer(distribution):
    widths = (40, 90, 60, 120, 30, 70, 50, 100, 80, 60, 90)
    spec = varprop.NetworkSpec(widths=widths, init=varprop.InitSpec("unit", distribution=distribution))
    df = varprop.simulate(spec, samples=50, replicates=60, seed=2)
    m2 = pivot(df, "post_second_moment")
    growth = m2[:, 1:] / m2[:, :-1] / np.array(widths[:-1])  # E = 1: variance x fan_in per layer
    assert_mean(growth, 1.0, what="variance growth / fan_in")


@pytest.mark.parametrize("distribution", ["normal", "uniform", "truncated_normal"])
def test_he_keeps_second_moment_of_relu_stack(distribution):
    widths = (64, 128, 96, 128, 80, 64, 128, 100, 90, 110, 64)
    spec = varprop.NetworkSpec(widths=widths, activation="relu",
                               init=varprop.InitSpec("he", distribution=distribution))
    df = varprop.simulate(spec, samples=64, replicates=60, seed=4)
    m2 = pivot(df, "post_second_moment")
    assert_mean(m2[:, 1:] / m2[:, :-1], 1.0, what="He relu second-moment ratio")


def test_bias_adds_its_variance_per_layer():
    sigma_b = 0.5
    spec = varprop.NetworkSpec.square(layers=20, width=60, init="fan_in", bias_std=sigma_b)
    df = varprop.simulate(spec, samples=40, replicates=60, seed=5)
    m2 = pivot(df, "post_second_moment")
    assert_mean(np.diff(m2, axis=1), sigma_b**2, what="second-moment increase per layer")


def rank_one_log10_slope(n: int) -> float:
    """log10 std gained per layer by a deep unit-init linear stack of width n.

    Deep in a product of Gaussian matrices the signal is effectively rank one,
    so each layer multiplies the variance by n * chi2_n / n, and E log(chi2_n / n)
    = digamma(n/2) - log(n/2).
    """
    return 0.5 * (math.log10(n) + (special.digamma(n / 2) - math.log(n / 2)) / math.log(10))


@pytest.mark.slow
def test_ten_thousand_layers_no_overflow():
    n, depth = 100, 10_000
    spec = varprop.NetworkSpec.square(layers=depth, width=n, init="unit")
    df = varprop.simulate(spec, samples=100, seed=0, dtype="float32")
    last = df["post_log10_std"].iloc[-1]
    assert abs(last / (depth * math.log10(math.sqrt(n))) - 1) < 0.01
    # Sharper: the finite-width law, with sd 0.5/ln(10) * sqrt(depth * trigamma(n/2)).
    sd = 0.5 / math.log(10) * math.sqrt(depth * special.polygamma(1, n / 2))
    assert abs(last - depth * rank_one_log10_slope(n)) < 5 * sd
    assert np.isinf(df["post_std"].iloc[-1]) and np.isfinite(df["post_log10_std"]).all()


@pytest.mark.slow
@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
def test_ten_thousand_nonlinear_layers_stay_finite(activation):
    spec = varprop.NetworkSpec.square(layers=10_000, width=100, init="unit", activation=activation)
    df = varprop.simulate(spec, samples=50, seed=0)
    assert np.isfinite(df["post_log10_std"]).all()
    assert np.isfinite(df["pre_log10_std"].iloc[1:]).all()  # layer 0 has no pre-activation
    assert df["post_frac_zero"].between(0, 1).all()


def test_common_random_numbers_across_inits():
    vary = {"init": ["unit", "fan_in"]}
    df = varprop.simulate(varprop.NetworkSpec.square(30, 50), vary=vary, samples=40, seed=9, dtype="float64")
    unit = df[df["init"] == "unit"]["post_log10_std"].to_numpy()
    fan_in = df[df["init"] == "fan_in"]["post_log10_std"].to_numpy()
    np.testing.assert_allclose(unit - fan_in, np.arange(31) * 0.5 * math.log10(50), atol=1e-9)


def test_same_seed_same_numbers_other_seed_other_numbers():
    spec = varprop.NetworkSpec.square(5, 30, activation="tanh", bias_std=0.1)
    a = varprop.simulate(spec, samples=20, replicates=2, seed=1)
    b = varprop.simulate(spec, samples=20, replicates=2, seed=1)
    c = varprop.simulate(spec, samples=20, replicates=2, seed=2)
    cols = [c_ for c_ in a if c_.startswith("post_")]
    assert a[cols].equals(b[cols])
    assert not np.allclose(a["post_std"].iloc[1:], c["post_std"].iloc[1:])


def test_single_sample_and_uniform_input():
    df = varprop.simulate(varprop.NetworkSpec.square(3, 2000), samples=1, input="uniform", input_std=2.0, seed=0)
    assert np.isnan(df["post_cos_sim"]).all()
    assert (df["post_unit_var"] == 0).all()
    # Uniform input with sd 2: the sample second moment of 2000 draws; sd of m2 is 4*sqrt(0.8/2000).
    assert abs(df["post_second_moment"].iloc[0] - 4.0) < 5 * 4.0 * math.sqrt(0.8 / 2000)
    assert df["post_frac_zero"].iloc[0] == 0


def test_blas_runs_on_one_thread_inside_the_engine_workers():
    """Bit-identical results rest on BLAS using one thread in every varprop
    worker while simulate runs (the limit is process-wide for the OpenBLAS
    NumPy ships; a thread-local one would break this)."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from varprop.parallel import Pool

    with threadpool_limits(1, user_api="blas"):
        seen = Pool(2).map(lambda _: [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"],
                           range(4))
    assert all(counts and set(counts) == {1} for counts in seen)


def _small_run(_=None):
    import varprop

    return float(varprop.simulate(varprop.NetworkSpec.square(2, 300), samples=600, threads=2)["post_std"].iloc[-1])


def test_threads_work_in_a_forked_child():
    """A child forked after a threaded run inherits dead executors; it must
    start its own rather than wait forever (multiprocessing's fork default)."""
    import multiprocessing

    parent = _small_run()
    with multiprocessing.get_context("fork").Pool(1) as workers:
        assert workers.apply_async(_small_run).get(timeout=60) == parent


@pytest.mark.parametrize("activation,width", [("tanh", 2048), ("gelu", 2048), ("relu", 2048), ("linear", 2048),
                                              ("sigmoid", 2048), ("softplus", 2048), ("tanh", 2560)])
def test_block_path_matches_phased_path(monkeypatch, activation, width):
    """A layer computed block by block (product, activation and sums while a
    block is in cache) gives the statistics of the phase-after-phase path
    that batch norm and extreme scales take, to float32 rounding: both
    evaluate the same formulas, and only the order of roundings differs.
    Several blocks, a bias and the backward pass are exercised; at width 2560
    the first block holds fewer than the 128 samples of |cos|."""
    from varprop.montecarlo.stepper import Network
    from varprop.nn import activations

    spec = varprop.NetworkSpec.square(4, width, init="he", activation=activation, bias_std=0.1)
    evaluated = []
    monkeypatch.setattr(activations, "phi_dphi_scaled",
                        lambda *a, f=activations.phi_dphi_scaled: evaluated.append(1) or f(*a))
    blocks = varprop.simulate(spec, samples=300, seed=5, dtype="float32", backward=True)
    assert bool(evaluated) == (activation != "linear")  # the block path ran
    monkeypatch.setattr(Network, "_blockwise", lambda self, layer, log_z: False)
    phased = varprop.simulate(spec, samples=300, seed=5, dtype="float32", backward=True)
    stats = ("mean", "std", "second_moment", "unit_var", "cos_sim", "abs_cos_sim", "frac_zero", "frac_saturated")
    cols = [f"{side}_{k}" for side in ("pre", "post", "grad", "delta") for k in stats] + ["weight_grad_norm"]
    # float32 rounding (6e-8 per operation) compounds over 4 layers and 2048-term sums to ~1e-5 at most;
    # a count (zeros, saturated units) may move by an entry or two (1.6e-6 each) when a value sits on
    # the edge, e.g. gelu' crossing zero at x = -0.75.
    np.testing.assert_allclose(blocks[cols].to_numpy(float), phased[cols].to_numpy(float), rtol=1e-4, atol=4e-6)


@pytest.mark.parametrize("activation", ["sigmoid", "softplus"])
def test_layer_far_below_phi0_scale_keeps_its_values(activation):
    """phi(0) != 0 is evaluated block by block at scale 1; a layer whose every
    pre-activation x is below -100 (positive weights, negative inputs) has all
    its values near e^x, which float32 cannot hold at that scale: they must
    come back scaled, not flushed to zero, equal to phi of the float64 product
    but for the float32 product's rounding, which moves x by at most
    (n + 2) 2^-24 |x| (n terms of one sign, the scale factor, the input's
    cast) and so e^x by that much relative."""
    from varprop.montecarlo.scaled import Values
    from varprop.montecarlo.stepper import Network

    spec = varprop.RunSpec(varprop.NetworkSpec.square(1, 64, activation=activation, init="fan_in"), samples=300)
    net = Network(spec, 0)
    w0, w_scale = net.weights(1)
    np.abs(w0, out=w0)
    u = np.broadcast_to(np.linspace(-1.1, -1.0, 64, dtype=np.float32), (300, 64)).copy()
    ms = float(np.mean(u.astype(np.float64) ** 2))
    log_s = math.log(190 / (np.abs(u) @ np.abs(w0.astype(np.float64))).mean() / w_scale)
    out, _, _ = net.step(1, Values(u, log_s, ms), stats=True, keep=False)
    x = math.exp(log_s) * w_scale * (u.astype(np.float64) @ w0.astype(np.float64))
    assert x.max() < -100  # phi < e^-100, below float32's normal range
    exact = special.expit(x) if activation == "sigmoid" else np.logaddexp(0, x)
    got = np.exp(out.log_s) * out.u.astype(np.float64)
    np.testing.assert_allclose(got, exact, rtol=(64 + 2) * 2.0**-24 * np.abs(x).max())


def test_options_with_a_list_of_configurations_are_refused():
    """simulate(configs, backward=True) would run the configurations as they are, without the backward pass."""
    from varprop.montecarlo import configs_for

    configs = configs_for(varprop.NetworkSpec.square(2, 8), samples=10)
    with pytest.raises(TypeError, match="configs_for"):
        varprop.simulate(configs, backward=True)
    assert len(varprop.simulate(configs)) == 3


def test_the_mean_is_carried_in_log_scale_beyond_float64():
    """A unit-init relu stack's layer mean passes 1e308 near layer 520; its log10 |mean| stays exact, as the
    std's does. Measured: the mean over units of E[h] is at least 0 for relu, and within a decade of the std
    (relu's mean/sd is 0.68 per unit; the spread of unit means over a layer shrinks it at most to ~1/sqrt(n)
    of that). Theory: relu's E[phi(z)] / sd(phi(z)) = (1 / sqrt(2 pi)) / sqrt(1/2 - 1/(2 pi)) exactly."""
    spec = varprop.NetworkSpec.square(layers=700, width=32, init="unit", activation="relu")
    df = varprop.simulate(spec, samples=64, seed=0)
    last = df.iloc[-1]
    assert last["post_mean"] == math.inf and math.isfinite(last["post_log10_abs_mean"])
    assert last["post_log10_std"] - 1.5 < last["post_log10_abs_mean"] < last["post_log10_std"] + 1
    ratio = (1 / math.sqrt(2 * math.pi)) / math.sqrt(0.5 - 1 / (2 * math.pi))
    gap = df["theory_post_log10_abs_mean"] - df["theory_post_log10_std"]
    assert np.allclose(gap.iloc[1:], math.log10(ratio), rtol=0, atol=1e-9)
    shallow = df[(df["layer"] > 0) & (df["layer"] < 50)]  # within float64: the plain mean agrees
    assert np.allclose(shallow["post_log10_abs_mean"], np.log10(shallow["post_mean"].abs()), rtol=0, atol=1e-9)

"""Batch norm at eps = 0 (the mean-field theory's batch norm): exact unit
variance, exact gradients, and a clear refusal where a batch channel does not
vary."""

import math

import numpy as np
import pytest
from click.testing import CliRunner

import varprop
from varprop.nn import batchnorm
from varprop.cli import main
from varprop.errors import SpecError

BATCH, N_BATCHES, UNITS = 16, 4, 6


def inputs(dtype, seed=0):
    # Units of very different spreads and offsets: eps = 0 must not care.
    scales = np.array([1.0, 1e-3, 30.0, 1e-6, 1.0, 2.0])
    u = np.random.default_rng(seed).standard_normal((BATCH * N_BATCHES, UNITS)) * scales + np.arange(UNITS)
    return u.astype(dtype)


def rounding_bound(dtype, u, log_s, batch):
    """How far from exact a batch channel's mean and variance of y may be.

    y rounds once to the compute dtype (relative u each, so the variance
    moves by <= 2u); in float64 before that, y passes through a few roundings
    (<= 8 eps on the variance, 16 more for its sum of squares) and through
    the log-scale factor, whose exponent carries an absolute error of about
    |log_s| eps (the scale added and removed), i.e. 4 |log_s| eps on the
    variance; the batch mean's own rounding, eps |mean| / sd relative to the
    spread, shifts every y alike: the mean by that, the variance only by its
    square."""
    unit = float(np.finfo(dtype).eps) / 2
    eps = float(np.finfo(np.float64).eps)
    x = u.astype(np.float64).reshape(-1, batch, u.shape[1])
    shift = eps * np.abs(x.mean(axis=1)) / x.std(axis=1)
    return 2 * unit + (24 + 4 * abs(log_s)) * eps + shift


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("log_s", [0.0, 800.0, -800.0])  # s = e^+-800 is far outside float64
def test_output_has_unit_variance_per_batch_channel(dtype, log_s):
    """y = (x - mean) / sd exactly: each batch channel's mean is 0 and its
    variance 1, up to rounding (:func:`rounding_bound`)."""
    u = inputs(dtype)
    y, log_y, _ = batchnorm.forward(u, log_s, BATCH, eps=0.0)
    assert y.dtype == dtype
    yb = (y.astype(np.float64) * math.exp(log_y)).reshape(N_BATCHES, BATCH, UNITS)
    bound = rounding_bound(dtype, u, log_s, BATCH)
    np.testing.assert_array_less(np.abs(yb.var(axis=1) - 1), bound)
    np.testing.assert_array_less(np.abs(yb.mean(axis=1)), bound)


def loss(u, g, batch, log_s):
    y, log_y, _ = batchnorm.forward(u, log_s, batch, eps=0.0)
    return float(np.sum(g * y) * math.exp(log_y))


@pytest.mark.parametrize("batch", [3, 16])
@pytest.mark.parametrize("log_s", [0.0, 600.0])
def test_backward_matches_finite_differences(batch, log_s):
    """d/du of sum(g * BN(e^log_s u)) at eps = 0, against central differences
    in float64, each step a fraction h of its channel's spread. The tolerance
    is the differences' own error: central differences err by O(h^2), so the
    gap between steps h and h/2 (3/4 of the error at h) bounds the error at
    h/2, plus the rounding of the two loss values over the step."""
    u = inputs(np.float64, seed=batch)[: 2 * batch]
    g = np.random.default_rng(7).standard_normal(u.shape)
    _, _, cache = batchnorm.forward(u, log_s, batch, eps=0.0)
    v, log_v = batchnorm.backward(g, 0.0, cache)
    analytic = v * math.exp(log_v + log_s)  # the gradient w.r.t. x = e^log_s u, times dx/du = e^log_s
    spread = np.repeat(u.reshape(-1, batch, UNITS).std(axis=1), batch, axis=0)

    def central(h):
        out = np.empty_like(u)
        for idx in np.ndindex(*u.shape):
            up, um = u.copy(), u.copy()
            up[idx] += h * spread[idx]
            um[idx] -= h * spread[idx]
            out[idx] = (loss(up, g, batch, log_s) - loss(um, g, batch, log_s)) / (2 * h * spread[idx])
        return out

    coarse, fine = central(1e-4), central(5e-5)
    # A step changes one channel's outputs, each computed to about eps (1 + |mean| / sd + 2 |log_s|)
    # relative (the batch mean's rounding against the spread; the scale's exponent added and removed),
    # and the loss's final sum rounds once more.
    eps = np.finfo(np.float64).eps
    channels = u.reshape(-1, batch, UNITS)
    condition = np.repeat(1 + np.abs(channels.mean(axis=1)) / channels.std(axis=1), batch, axis=0) + 2 * abs(log_s)
    per_channel = np.repeat(np.abs(g).reshape(-1, batch, UNITS).sum(axis=1), batch, axis=0)
    rounding = (8 * eps * condition * per_channel + 4 * eps * np.abs(g).sum()) / (5e-5 * spread)
    tolerance = 2 * np.abs(coarse - fine) + rounding
    assert np.all(np.abs(analytic - fine) <= tolerance), np.max(np.abs(analytic - fine) / tolerance)
    assert np.median(np.abs(analytic) / tolerance) > 100  # a real gradient, far above the test's resolution


def test_batch_of_two_gives_plus_minus_one_and_no_gradient():
    """B = 2 at eps = 0: (x1 - x2) / |x1 - x2| is +-1 whatever x is, so its
    gradient is exactly zero (the eps > 0 leak, its only gradient, is gone)."""
    u = inputs(np.float64)[:8]
    y, log_y, cache = batchnorm.forward(u, 0.0, 2, eps=0.0)
    bound = np.repeat(rounding_bound(np.float64, u, 0.0, 2), 2, axis=0)
    np.testing.assert_array_less(np.abs(np.abs(y * math.exp(log_y)) - 1), bound)
    v, _ = batchnorm.backward(np.random.default_rng(1).standard_normal(u.shape), 0.0, cache)
    np.testing.assert_array_equal(v, 0.0)


def test_a_channel_that_does_not_vary_is_refused():
    u = inputs(np.float32)
    u[BATCH:2 * BATCH, 3] = 0.25  # unit 4 of batch 2 is constant
    with pytest.raises(SpecError, match=r"--bn-eps: .*layer 5, unit 4, batch 2 \(all 16 samples equal"):
        batchnorm.forward(u, 0.0, BATCH, eps=0.0, where="layer 5")
    y, _, _ = batchnorm.forward(u, 0.0, BATCH, eps=1e-3)  # with eps > 0 it is simply 0 there
    assert np.all(y.reshape(N_BATCHES, BATCH, UNITS)[1, :, 3] == 0)


def test_engine_at_eps_0_keeps_the_pre_activation_second_moment_exactly_one():
    """With BN before the activation, every batch channel of what enters the
    activation has mean 0 and variance 1, so the layer's second moment is 1 to
    float32 rounding; the theory gives exactly 1 at eps = 0."""
    spec = varprop.NetworkSpec.square(6, 32, activation="relu", init="he", bn_layers=(1, 2, 3, 4, 5), bn_eps=0.0)
    df = varprop.simulate(spec, samples=64, batch_size=16, seed=3, backward=True)
    bn = df[df["layer"].between(1, 5)]
    np.testing.assert_allclose(bn["pre_second_moment"], 1.0, rtol=4 * 2.0**-24)
    np.testing.assert_array_equal(bn["theory_pre_second_moment"], 1.0)
    assert np.isfinite(df["grad_log10_std"]).all()


@pytest.fixture
def repeated_rows(tmp_path):
    x = np.random.default_rng(0).standard_normal((64, 16))
    x[16:32] = x[16]  # the second batch of 16 is one sample repeated
    path = tmp_path / "repeated.npy"
    np.save(path, x)
    return path


def test_identical_samples_refused_before_anything_is_written(tmp_path, repeated_rows):
    out = tmp_path / "out"
    args = ["simulate", "--layers", "3", "--width", "16", "--input-file", str(repeated_rows), "--bn", "all",
            "--batch-size", "16", "--out", str(out)]
    result = CliRunner().invoke(main, [*args, "--bn-eps", "0"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("varprop: error: --bn-eps: ") and "batch 2" in lines[0]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert CliRunner().invoke(main, [*args, "--bn-eps", "1e-5"]).exit_code == 0  # eps > 0: a valid run


@pytest.mark.parametrize("order,where", [("preact", "block 1, before its branch"),
                                         ("original", "block 1, branch layer 1")])
def test_a_residual_stack_names_the_block(tmp_path, repeated_rows, order, where):
    """A residual run reports blocks, so the refusal names the block (and where in it), not the
    engine's internal count of dense layers."""
    args = ["simulate", "--residual", "plain", "--blocks", "3", "--branch-order", order, "--width", "16",
            "--input-file", str(repeated_rows), "--bn", "all", "--batch-size", "16", "--bn-eps", "0",
            "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert f"at {where}, unit " in result.stderr and "batch 2" in result.stderr, result.stderr


def test_relu_before_post_batch_norm_in_batches_of_two_is_refused():
    """A relu unit is 0 for both samples of a batch with probability 1/4: at
    width 32 some unit of some batch is all but certain to be."""
    spec = varprop.NetworkSpec.square(3, 32, activation="relu", init="he", bn_layers=(1, 2), bn_position="post",
                                      bn_eps=0.0)
    with pytest.raises(SpecError, match="--bn-eps: .*layer 1"):
        varprop.simulate(spec, samples=32, batch_size=2)


@pytest.mark.parametrize("value,ok", [(0, True), ("0", True), (0.0, True), (1e-5, True), (-1e-9, False),
                                      (float("nan"), False), (float("inf"), False), ("none", False)])
def test_bn_eps_accepts_zero_and_refuses_the_rest(value, ok):
    make = lambda: varprop.NetworkSpec.square(3, 8, bn_layers=(1,), bn_eps=value)  # noqa: E731
    if ok:
        assert make().bn_eps == float(value)
    else:
        with pytest.raises(SpecError, match="--bn-eps"):
            make()

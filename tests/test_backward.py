"""Backward pass and batch norm: finite differences, the batch Jacobian, the
exact gradient-variance laws, memory refusal and checkpointing."""

import math

import numpy as np
import pytest

import varprop
from varprop.montecarlo import memory
from varprop.montecarlo import configs_for, make_inputs, upstream
from varprop.montecarlo.scaled import renorm, values
from varprop.montecarlo.stepper import Network
from varprop.nn import batchnorm
from varprop.nn.activations import NAMES
from varprop.errors import SpecError

from test_propagation import assert_mean, pivot, rank_one_log10_slope

WIDTHS = (6, 7, 5, 4)


def small_spec(activation, bn_position=None, batch_size=4):
    net = varprop.NetworkSpec(widths=WIDTHS, activation=activation, init="he", bias_std=0.3,
                              bn_layers=(1, 2) if bn_position else (), bn_position=bn_position or "pre")
    return varprop.RunSpec(net, samples=8, seed=3, dtype="float64", batch_size=batch_size if bn_position else None)


def objective(spec, x):
    """sum(g_L * h_L) for inputs x: the scalar the backward pass differentiates."""
    net = Network(spec, 0)
    h = values(*renorm(x.copy(), 0.0))
    for layer in range(1, spec.network.depth + 1):
        h, _, _ = net.step(layer, h, stats=False, keep=False)
    return float(np.sum(upstream(spec, 0) * h.u * math.exp(h.log_s)))


def input_gradient(spec, x):
    net = Network(spec, 0)
    h = values(*renorm(x.copy(), 0.0))
    tapes = {}
    for layer in range(1, spec.network.depth + 1):
        h, _, tapes[layer] = net.step(layer, h, stats=False, keep=True)
    g = values(upstream(spec, 0), 0.0)
    for layer in range(spec.network.depth, 0, -1):
        g, _ = net.back(layer, tapes[layer], g, {})
    return g.u * math.exp(g.log_s)


def max_fd_error(spec):
    x = np.random.default_rng(0).standard_normal((8, WIDTHS[0]))
    grad = input_gradient(spec, x)
    eps = 1e-6
    fd = np.empty_like(x)
    for idx in np.ndindex(*x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        fd[idx] = (objective(spec, xp) - objective(spec, xm)) / (2 * eps)
    return float(np.max(np.abs(grad - fd)) / np.max(np.abs(fd)))


@pytest.mark.parametrize("bn_position", [None, "pre", "post"])
@pytest.mark.parametrize("activation", NAMES)
def test_backward_matches_finite_differences(activation, bn_position):
    assert max_fd_error(small_spec(activation, bn_position)) < 1e-6


@pytest.mark.parametrize("bn_position", [None, "pre", "post"])
def test_weight_gradient_norm_matches_finite_differences(monkeypatch, bn_position):
    spec = small_spec("gelu", bn_position)
    layer = 2
    rows = varprop.simulate(spec, backward=True)
    # The engine's run draws its own inputs; redo the FD with those same inputs.
    x, log_x = make_inputs(spec, 0)
    x = x * math.exp(log_x)
    w0, scale = Network(spec, 0).weights(layer)
    original = Network.weights
    eps = 1e-6
    grad = np.empty_like(w0)
    for idx in np.ndindex(*w0.shape):
        values = []
        for sign in (1, -1):
            w = w0.copy()
            w[idx] += sign * eps / scale

            def weights(self, l, w=w):
                return (w, scale) if l == layer else original(self, l)

            monkeypatch.setattr(Network, "weights", weights)
            values.append(objective(spec, x))
        grad[idx] = (values[0] - values[1]) / (2 * eps)
    monkeypatch.setattr(Network, "weights", original)
    measured = rows[rows["layer"] == layer]["weight_grad_norm"].iloc[0]
    assert measured == pytest.approx(np.linalg.norm(grad), rel=1e-6)


def test_per_sample_bn_derivative_fails_the_check(monkeypatch):
    """The check must see BN's batch coupling: dropping it (treating the batch
    mean and variance as constants) gives a wrong gradient."""
    def per_sample(v, log_g, cache):
        top = float(np.max(cache.log_inv_sigma))
        g = v.reshape(cache.d.shape) * np.exp(cache.log_inv_sigma - top)
        return g.reshape(v.shape).astype(v.dtype), log_g + top

    spec = small_spec("tanh", "pre")
    assert max_fd_error(spec) < 1e-6
    monkeypatch.setattr(batchnorm, "backward", per_sample)
    assert max_fd_error(spec) > 1e-2


@pytest.mark.parametrize("batch", [2, 4, 16])
@pytest.mark.parametrize("log_s", [0.0, 3.0, 2000.0, -2000.0])
def test_bn_forward_moments(batch, log_s):
    eps = 1e-3
    u = np.random.default_rng(batch).standard_normal((64, 5)) * np.array([1, 0.1, 3, 0.03, 1])
    y, log_y, cache = batchnorm.forward(u, log_s, batch, eps)
    yb = (y * math.exp(log_y)).reshape(64 // batch, batch, 5) if abs(log_y) < 700 else None
    var_x = u.reshape(64 // batch, batch, 5).var(axis=1) * math.exp(2 * log_s) if abs(log_s) < 300 else None
    if yb is not None and var_x is not None:
        np.testing.assert_allclose(yb.mean(axis=1), 0, atol=1e-12)
        np.testing.assert_allclose(yb.var(axis=1), 1 / (1 + eps / var_x), rtol=1e-12)
    elif log_s > 0:  # eps is negligible: y = d exactly, unit variance per batch and unit
        yb = (y.reshape(64 // batch, batch, 5) * math.exp(log_y))
        np.testing.assert_allclose(yb, cache.d, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(cache.d.var(axis=1), 1, rtol=1e-12)
    else:  # a signal far below sqrt(eps): y = (x - mean) / sqrt(eps) exactly, at its own tiny scale
        x = u.reshape(64 // batch, batch, 5)
        want = (x - x.mean(axis=1, keepdims=True)) / math.sqrt(eps)
        got = y.reshape(x.shape)
        log_ratio = log_y - log_s  # y = exp(log_y) got, want is in units of exp(log_s)
        np.testing.assert_allclose(got * math.exp(log_ratio), want, rtol=1e-12, atol=1e-12)


def test_bn_constant_unit_and_huge_scale():
    """A unit constant within its batch (dead relu) must not set the scale."""
    u = np.random.default_rng(0).standard_normal((8, 4))
    u[:4, 1] = 0.0  # constant in batch 0
    for log_s in (0.0, 800.0, 3000.0):
        y, log_y, cache = batchnorm.forward(u, log_s, 4, 1e-3)
        assert np.isfinite(y).all() and np.isfinite(log_y)
        assert (y.reshape(2, 4, 4)[0, :, 1] == 0).all()
        var_u = u.reshape(2, 4, 4).var(axis=1)[1]
        expected = 1 / (1 + 1e-3 * math.exp(-2 * log_s) / var_u)
        np.testing.assert_allclose((y.reshape(2, 4, 4) * math.exp(log_y)).var(axis=1)[1], expected, rtol=1e-6)
        g, log_g = batchnorm.backward(np.ones((8, 4)) + u, 0.0, cache)
        assert np.isfinite(g).all() and np.isfinite(log_g)


def test_bn_batch_of_two_keeps_the_eps_leak():
    """With B = 2 the exact projection removes the whole gradient; what remains
    is eps / (var + eps) of it, which must not be rounded to zero."""
    u = np.array([[1.0], [3.0]])
    for log_s in (0.0, 50.0):
        _, _, cache = batchnorm.forward(u, log_s, 2, 1e-3)
        g = np.array([[1.0], [-1.0]])
        out, log_out = batchnorm.backward(g, 0.0, cache)
        var = math.exp(2 * log_s)  # batch variance of s * u
        # d y_a / d x_a = (1/sigma)(1 - 1/2 - c^2/2), with c^2 = var / (var + eps)
        expected = (1 / math.sqrt(var + 1e-3)) * (1 - (1 + var / (var + 1e-3)) / 2) * 2
        assert out[0, 0] * math.exp(log_out) == pytest.approx(expected, rel=1e-9)


def test_bn_in_the_engine_pre_and_post():
    base = dict(widths=(50, 60, 60, 40), activation="relu", init="he", bn_layers=(1, 2))
    for position, side in (("pre", "pre"), ("post", "post")):
        spec = varprop.NetworkSpec(**base, bn_position=position)
        df = varprop.simulate(spec, samples=64, batch_size=16, seed=0, dtype="float64")
        bn_rows = df[df["layer"].isin([1, 2])]
        np.testing.assert_allclose(bn_rows[f"{side}_mean"], 0, atol=1e-12)
        np.testing.assert_allclose(bn_rows[f"{side}_sq_unit_mean"], 0, atol=1e-20)
        # Every batch and unit has variance var / (var + eps) < 1 after BN.
        assert np.all(bn_rows[f"{side}_unit_var"] < 1)
    post = df[df["layer"] == 1]  # post placement: relu sees an un-normalized z, its output is centred
    assert post["pre_frac_zero"].iloc[0] == 0 and post["post_mean"].iloc[0] == pytest.approx(0, abs=1e-12)


def test_linear_fan_in_gradient_scales_by_fan_out_over_fan_in():
    widths = (80, 40, 120, 60, 100, 50, 90)
    df = varprop.simulate(varprop.NetworkSpec(widths=widths, init="fan_in"), samples=40, replicates=80,
                          seed=1, backward=True)
    g = pivot(df, "grad_second_moment")
    expected = np.array(widths[1:]) / np.array(widths[:-1])  # g_{l-1} vs g_l: fan_out / fan_in of layer l
    assert_mean(g[:, :-1] / g[:, 1:] / expected, 1.0, what="gradient ratio / (fan_out/fan_in)")


def test_xavier_balances_forward_and_backward():
    widths = (60, 120, 60, 120, 60)
    df = varprop.simulate(varprop.NetworkSpec(widths=widths, init="xavier"), samples=40, replicates=80, seed=2,
                          backward=True)
    n_in, n_out = np.array(widths[:-1]), np.array(widths[1:])
    fwd = pivot(df, "post_second_moment")
    bwd = pivot(df, "grad_second_moment")
    assert_mean(fwd[:, 1:] / fwd[:, :-1] / (2 * n_in / (n_in + n_out)), 1.0, what="forward ratio")
    assert_mean(bwd[:, :-1] / bwd[:, 1:] / (2 * n_out / (n_in + n_out)), 1.0, what="backward ratio")
    # Over a palindromic stack the forward and backward gains are the same (1 here).
    assert_mean(np.log(fwd[:, -1] / fwd[:, 0]) - np.log(bwd[:, 0] / bwd[:, -1]), 0.0, what="log gain gap")


def test_he_fan_out_preserves_relu_gradients():
    """Mean-field (gradient-independence) law: each W^T step multiplies the
    gradient's second moment by fan_out * v = 2 and the relu mask halves it.
    Exact at the top layer (column sign flips); below it delta_l depends on W_l
    only at O(1/width), far below this test's resolution at width 512."""
    spec = varprop.NetworkSpec.square(12, 512, activation="relu", init=varprop.InitSpec("he", mode="fan_out"))
    df = varprop.simulate(spec, samples=32, replicates=20, seed=3, backward=True)
    g, d = pivot(df, "grad_second_moment"), pivot(df, "delta_second_moment")
    assert_mean(g[:, :-1] / d[:, 1:], 2.0, what="W^T step")
    assert_mean(d[:, 1:] / g[:, 1:], 0.5, what="relu mask")
    assert_mean(g[:, :-1] / g[:, 1:], 1.0, what="gradient second moment per layer")


@pytest.mark.slow
def test_ten_thousand_layers_backward_with_checkpointing():
    n, depth = 100, 10_000
    spec = varprop.NetworkSpec.square(depth, n, init="unit")
    df = varprop.simulate(spec, samples=32, seed=0, backward=True, max_memory="128M")
    assert memory.backward_plan(configs_for(spec, samples=32, backward=True, max_memory="128M")[0].spec) == 100
    logs = df["grad_log10_std"].to_numpy()
    assert np.isfinite(logs).all() and np.isfinite(df["delta_log10_std"].iloc[1:]).all()
    sd = 0.5 / math.log(10) * math.sqrt(depth * __import__("scipy").special.polygamma(1, n / 2))
    assert abs(logs[0] - logs[-1] - depth * rank_one_log10_slope(n)) < 5 * sd
    assert np.isfinite(df["weight_grad_log10_norm"].iloc[1:]).all()


def test_checkpointing_gives_identical_numbers():
    spec = varprop.NetworkSpec.square(30, 40, activation="tanh", bn_layers=(3, 7), bias_std=0.1)
    kept = varprop.simulate(spec, samples=16, batch_size=8, seed=4, backward=True)
    small = memory.tape_bytes(varprop.RunSpec(spec, samples=16, backward=True))
    budget = (sum(small) // 2 + memory.working_bytes(varprop.RunSpec(spec, samples=16))
              + memory.REPORT_BYTES + memory.run_bytes(varprop.RunSpec(spec, samples=16)))
    run = varprop.RunSpec(spec, samples=16, batch_size=8, seed=4, backward=True, max_memory=budget)
    assert 1 < memory.backward_plan(run) < spec.depth  # checkpointing is really used
    checkpointed = varprop.simulate(run)
    assert kept.equals(checkpointed)


def test_memory_refusal_names_the_option():
    spec = varprop.NetworkSpec.square(100, 1000)
    with pytest.raises(SpecError, match="--max-memory"):
        varprop.simulate(spec, samples=1000, backward=True, max_memory="1M")


@pytest.mark.parametrize("init", ["fan_in", "orthogonal"])
def test_kept_and_redrawn_weights_give_identical_numbers(init, monkeypatch):
    """Weights drawn again for the backward pass (beside the layer above's
    work, by blocks of the pool) are the forward pass's: the same numbers as
    keeping them, on one thread or two. Width 512 x 512 samples: big enough
    for the blocks to go to the pool."""
    spec = varprop.NetworkSpec.square(3, 512, activation="tanh", init=init)
    runs = []
    for keep in (True, False):
        monkeypatch.setattr(memory, "keeps_weights", lambda s, keep=keep: keep)
        runs += [varprop.simulate(spec, samples=512, seed=2, backward=True, threads=t) for t in (1, 2)]
    for other in runs[1:]:
        assert runs[0].equals(other)

"""The trainer's numerics: every layer's backward against finite differences
(float64), one step of each optimizer against the formulas computed by hand,
and BN's moving statistics against their closed form.

Finite differences: central, step 1e-5, in float64. Their error is the
truncation h^2 f'''/6 (about 1e-11 here) plus rounding, eps |f| / h (about
1e-11 |f|): far below the 1e-6 of the gradient's scale the checks allow,
while a wrong or missing term errs by a sizeable fraction of the gradient.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from varprop.nn import activations
from varprop.train import model as M
from varprop.train import optim

STEP = 1e-5
TOL = 1e-6  # of the gradient's largest entry (see the module docstring)


def numeric_grad(f, x: np.ndarray) -> np.ndarray:
    """Central differences of the scalar f() w.r.t. every entry of x (changed in place, then restored)."""
    g = np.zeros_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        keep = flat[i]
        flat[i] = keep + STEP
        up = f()
        flat[i] = keep - STEP
        down = f()
        flat[i] = keep
        gflat[i] = (up - down) / (2 * STEP)
    return g


def close(analytic: np.ndarray, numeric: np.ndarray) -> None:
    scale = max(np.abs(numeric).max(), 1e-300)
    assert np.abs(analytic - numeric).max() <= TOL * scale, (analytic, numeric)


@pytest.fixture
def rng():
    return np.random.default_rng(17)


def test_dense_backward(rng):
    """A Dense layer's backward, as the model runs it (a one-layer model: its logits are the Dense output)."""
    m = M.Model(M.Architecture((5, 4)), np.float64)
    h, r = rng.normal(size=(6, 5)), rng.normal(size=(6, 4))  # objective sum(r * out): its gradient w.r.t. out is r
    m.W[1][...], m.b[1][...] = rng.normal(size=(5, 4)), rng.normal(size=4)
    f = lambda: float(np.sum(r * m.forward(h, training=True)[0]))  # noqa: E731
    _, tape = m.forward(h, training=True)
    dh = m.backward(tape, r, need_input_grad=True)
    close(dh, numeric_grad(f, h))
    close(m.dW[1].copy(), numeric_grad(f, m.W[1]))
    close(m.db[1].copy(), numeric_grad(f, m.b[1]))


@pytest.mark.parametrize("widths", [(784, 512, 256, 128, 64, 10), (3, 2), (5, 300, 1, 7)])
def test_weight_pieces_cover_every_parameter_once(widths):
    """The pieces the weight gradients and the optimizer's update run in tile the parameter vector."""
    m = M.Model(M.Architecture(widths, bn_layers=(1,)), np.float64)
    covered = np.zeros(m.n_params, int)
    for l, rows, flat, last in m.pieces:
        covered[flat] += 1
        assert m.W[l][rows].size <= flat.stop - flat.start
    assert covered.tolist() == [1] * m.n_params


def test_blocked_products_equal_plain_ones(rng):
    """Thin products, cut into fixed blocks for OpenBLAS's small kernel, compute a @ b, and the layer
    adds the bias and applies the activation once."""
    for shape in [(4, 784, 512), (16, 300, 200), (600, 300, 400), (3, 5, 7), (128, 784, 512)]:
        m, k, n = shape
        a, b, bias = rng.normal(size=(m, k)), rng.normal(size=(k, n)), rng.normal(size=n)
        got = M.product(a, b)
        assert np.abs(got - a @ b).max() <= 1e-12 * np.abs(a @ b).max() * math.sqrt(k)
        z, phi, dphi = M.dense_forward(a, b, bias, act=M.sigmoid_both)
        np.testing.assert_array_equal(z, got + bias)
        np.testing.assert_allclose(phi, 1 / (1 + np.exp(-z)), rtol=1e-14, atol=0)


@pytest.mark.parametrize("name", activations.NAMES)
def test_activation_derivative(rng, name):
    """The trainer's phi' (the registry's, or its own fused evaluation) against differences of its phi."""
    m = M.Model(M.Architecture((3, 40, 2), name), np.float64)
    x = rng.normal(scale=3.0, size=40)
    x = x[np.abs(x) > 1e-3]  # away from relu-type kinks, where phi' jumps

    def both(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = np.empty_like(v), np.empty_like(v)
        m.both(v, *out)
        return out
    phi, dphi = both(x)
    numeric = (both(x + STEP)[0] - both(x - STEP)[0]) / (2 * STEP)
    assert np.abs(dphi - numeric).max() <= TOL * max(1.0, np.abs(numeric).max())
    ref = activations.get(name)
    np.testing.assert_allclose(phi, ref.phi(x), rtol=1e-13, atol=1e-300)


def test_fused_sigmoid_matches_registry_in_float32():
    x = np.linspace(-90, 90, 100_001, dtype=np.float32)
    s, d = np.empty_like(x), np.empty_like(x)
    M.sigmoid_both(x, s, d)
    ref = activations.get("sigmoid")
    x64 = x.astype(np.float64)
    # float32 exp of up to 90 in magnitude errs by a few ulps; 2^-20 ~ 1e-6 relative bounds it with room
    assert np.max(np.abs(s - ref.phi(x64)) / ref.phi(x64)) < 2.0**-20
    assert np.max(np.abs(d - ref.dphi(x64)) / ref.dphi(x64)) < 2.0**-20


@pytest.mark.parametrize("batch", [None, 3])
def test_batchnorm_training_backward(rng, batch):
    """Training mode, with the full batch Jacobian (the batch mean and variance depend on x), one batch or
    several of 3 rows."""
    x, gamma, beta = rng.normal(size=(6, 4)) * 2 + 1, rng.normal(size=4), rng.normal(size=4)
    r = rng.normal(size=(6, 4))
    f = lambda: float(np.sum(r * M.bn_train_forward(x, gamma, beta, 1e-3, batch)[0]))  # noqa: E731
    _, xhat, scale, _, _ = M.bn_train_forward(x, gamma, beta, 1e-3, batch)
    dgamma, dbeta = np.zeros(4), np.zeros(4)
    dx = M.bn_train_backward(r, xhat, scale, dgamma, dbeta)
    close(dx, numeric_grad(f, x))
    close(dgamma, numeric_grad(f, gamma))
    close(dbeta, numeric_grad(f, beta))


def test_batchnorm_inference_backward(rng):
    bn = M.BatchNorm(rng.normal(size=4), rng.normal(size=4), rng.normal(size=4), rng.uniform(0.5, 2, 4),
                     np.zeros(4), np.zeros(4))
    x, r = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    f = lambda: float(np.sum(r * M.bn_infer_forward(x, bn, 1e-3)[0]))  # noqa: E731
    _, xhat, scale = M.bn_infer_forward(x, bn, 1e-3)
    dgamma, dbeta = np.zeros(4), np.zeros(4)
    dx = M.bn_infer_backward(r, xhat, scale, dgamma, dbeta)
    close(dx, numeric_grad(f, x))
    close(dgamma, numeric_grad(f, bn.gamma))
    close(dbeta, numeric_grad(f, bn.beta))


def test_softmax_cross_entropy_backward(rng):
    z, y = rng.normal(size=(5, 4)) * 3, np.array([0, 3, 1, 1, 2])
    f = lambda: float(np.sum(M.softmax_xent(z, y)[0]))  # noqa: E731
    _, p = M.softmax_xent(z, y)
    close(M.softmax_xent_backward(p, y, 1.0), numeric_grad(f, z))
    big = np.array([[1000.0, 0.0], [-1000.0, 0.0]])  # no overflow: log-sum-exp after the row maximum
    loss, _ = M.softmax_xent(big, np.array([1, 1]))
    assert loss.tolist() == [1000.0, 0.0]


@pytest.mark.parametrize("position", ["pre", "post"])
@pytest.mark.parametrize("training", [True, False])
def test_whole_model_gradient(rng, position, training):
    """Every parameter of a small model with BN on both hidden layers, in both modes."""
    m = M.Model(M.Architecture((5, 4, 3, 3), "tanh", bn_layers=(1, 2), bn_position=position), np.float64)
    m.initialize(seed=3, replicate=0, init="he")
    m.params[...] += rng.normal(scale=0.1, size=m.n_params)  # gamma, beta away from 1, 0
    for bn in m.bn.values():
        bn.moving_mean[...] = rng.normal(size=bn.moving_mean.size)
        bn.moving_var[...] = rng.uniform(0.5, 2.0, bn.moving_var.size)
    x, y = rng.normal(size=(6, 5)), np.array([0, 1, 2, 2, 1, 0])

    def loss() -> float:
        logits, _ = m.forward(x, training=training)
        return float(np.mean(M.softmax_xent(logits, y)[0]))

    logits, tape = m.forward(x, training=training)
    _, p = M.softmax_xent(logits, y)
    m.backward(tape, M.softmax_xent_backward(p, y, 1 / len(y)))
    close(m.grads.copy(), numeric_grad(loss, m.params))


def test_loss_and_grad_moves_only_the_moving_statistics(rng):
    m = M.Model(M.Architecture((5, 4, 3), "relu", bn_layers=(1,)), np.float64)
    m.initialize(seed=0, replicate=0)
    before = m.params.copy()
    m.loss_and_grad(rng.normal(size=(8, 5)), np.arange(8) % 3)
    assert np.array_equal(before, m.params)
    assert not np.array_equal(m.bn[1].moving_mean, np.zeros(4))


# --- optimizers: one (or two) steps against the formulas, computed by hand -------------------------

W0 = np.array([0.5, -1.0, 2.0])
G1 = np.array([0.2, -0.4, 1e-6])
G2 = np.array([-0.1, 0.3, 2e-6])


def two_steps(name: str, lr: float = 0.1, momentum: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    w = W0.copy()
    opt = optim.make(name, lr, 3, np.float64, momentum)
    opt.step(w, G1.copy())
    first = w.copy()
    opt.step(w, G2.copy())
    return first, w


def test_sgd_plain():
    first, second = two_steps("sgd", momentum=0.0)
    np.testing.assert_allclose(first, W0 - 0.1 * G1, rtol=1e-15)
    np.testing.assert_allclose(second, W0 - 0.1 * G1 - 0.1 * G2, rtol=1e-15)


def test_sgd_momentum():
    first, second = two_steps("sgd")
    v1 = -0.1 * G1
    v2 = 0.9 * v1 - 0.1 * G2
    np.testing.assert_allclose(first, W0 + v1, rtol=1e-15)
    np.testing.assert_allclose(second, W0 + v1 + v2, rtol=1e-15)


def test_sgd_nesterov():
    first, second = two_steps("sgd-nesterov")
    v1 = -0.1 * G1
    w1 = W0 + 0.9 * v1 - 0.1 * G1
    v2 = 0.9 * v1 - 0.1 * G2
    np.testing.assert_allclose(first, w1, rtol=1e-15)
    np.testing.assert_allclose(second, w1 + 0.9 * v2 - 0.1 * G2, rtol=1e-15)


def test_adam_keras_epsilon_outside_the_bias_correction():
    first, second = two_steps("adam", lr=0.01)
    m1, v1 = 0.1 * G1, 0.001 * G1**2
    a1 = 0.01 * math.sqrt(1 - 0.999) / (1 - 0.9)
    w1 = W0 - a1 * m1 / (np.sqrt(v1) + 1e-7)
    m2, v2 = m1 + 0.1 * (G2 - m1), v1 + 0.001 * (G2**2 - v1)
    a2 = 0.01 * math.sqrt(1 - 0.999**2) / (1 - 0.9**2)
    np.testing.assert_allclose(first, w1, rtol=1e-14)
    np.testing.assert_allclose(second, w1 - a2 * m2 / (np.sqrt(v2) + 1e-7), rtol=1e-14)
    # PyTorch's Adam divides by sqrt(v / (1 - b2^t)) + eps: for the tiny third gradient that moves the
    # weight by about a fifth as much again, a difference the Keras rule must show
    torch_style = W0 - 0.01 * (m1 / 0.1) / (np.sqrt(v1 / 0.001) + 1e-7)
    assert abs((first[2] - W0[2]) / (torch_style[2] - W0[2]) - 1) > 0.1


def test_float32_steps_match_float64_to_rounding():
    for name in optim.NAMES:
        w32, w64 = W0.astype(np.float32), W0.copy()
        o32, o64 = optim.make(name, 0.01, 3, np.float32), optim.make(name, 0.01, 3, np.float64)
        for g in (G1, G2, G1):
            o32.step(w32, g.astype(np.float32))
            o64.step(w64, g)
        # a few float32 roundings of each O(1) quantity, and of Adam's normalised step
        np.testing.assert_allclose(w32, w64, rtol=0, atol=1e-6 * np.abs(W0).max())


def test_pieces_do_not_change_updates(rng, monkeypatch):
    size = 3 * optim.PIECE + 7
    g = rng.normal(size=size).astype(np.float32)
    results = []
    for piece in (optim.PIECE, 1000, size):
        monkeypatch.setattr(optim, "PIECE", piece)
        for name in optim.NAMES:
            w = np.ones(size, np.float32)
            opt = optim.make(name, 0.01, size, np.float32)
            opt.step(w, g)
            opt.step(w, g * 0.5)
            results.append((name, w))
    for name in optim.NAMES:
        same = [w for n, w in results if n == name]
        assert all(np.array_equal(same[0], w) for w in same[1:])


def test_cosine_schedule():
    lr = optim.cosine(0.1, 100)
    assert lr(0) == 0.1 and abs(lr(50) - 0.05) < 1e-15 and lr(100) == 0.0 and lr(150) == 0.0


# --- BN's moving statistics after k steps -------------------------------------------------------------

def test_moving_statistics_closed_form(rng):
    """After k training steps on batches whose BN input has batch means m_i and biased variances s_i:
    moving_mean = sum_i 0.01 * 0.99^(k-i) m_i (from 0), moving_var = 0.99^k + sum_i 0.01 * 0.99^(k-i) s_i.
    The learning rate is 0 so the Dense layer before BN, and hence its output, is known."""
    arch = M.Architecture((3, 4, 2), "relu", bn_layers=(1,), bn_position="pre")
    m = M.Model(arch, np.float64)
    m.initialize(seed=1, replicate=0)
    opt = optim.make("sgd", 0.0, m.n_params, np.float64, momentum=0.0)
    k, expect_mean, expect_var = 40, np.zeros(4), np.ones(4)
    for i in range(k):
        x = rng.normal(loc=i / 10, size=(5, 3))
        z = x @ m.W[1] + m.b[1]
        expect_mean = 0.99 * expect_mean + 0.01 * z.mean(axis=0)
        expect_var = 0.99 * expect_var + 0.01 * z.var(axis=0)  # biased (ddof 0), as Keras
        m.loss_and_grad(x, rng.integers(0, 2, 5))
        opt.step(m.params, m.grads)
    np.testing.assert_allclose(m.bn[1].moving_mean, expect_mean, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(m.bn[1].moving_var, expect_var, rtol=1e-12)
    # inference uses them: gamma (z - moving_mean) / sqrt(moving_var + eps) + beta, then the activation
    x = rng.normal(size=(3, 3))
    _, tape = m.forward(x, training=False)
    z = x @ m.W[1] + m.b[1]
    np.testing.assert_allclose(tape[0]["pre"], (z - expect_mean) / np.sqrt(expect_var + 1e-3), rtol=1e-12)

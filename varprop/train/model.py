"""The study's MLP in NumPy with Keras' semantics, and its exact backward pass.

Layers, each with a forward and an exact backward (tests/test_train_grad.py
checks every one against finite differences in float64):

- Dense ``z = h W + b`` (the kernel from varprop's inits; ``keras-default``
  is Keras' glorot_uniform with a zero bias);
- an activation from :mod:`varprop.nn.activations` on every hidden layer;
- BatchNormalization as ``keras.layers.BatchNormalization()``: epsilon 1e-3,
  momentum 0.99, gamma 1 and beta 0 learned. Training mode normalises by the
  batch mean and the biased batch variance and then sets
  ``moving = 0.99 moving + 0.01 batch statistic``; inference mode uses the
  moving statistics (initially mean 0, variance 1). ``post`` puts BN on a
  hidden layer's activation output, as the study's ``Dense(act)`` then
  ``BatchNormalization()`` does; ``pre`` puts it between the product and the
  activation;
- softmax with categorical cross-entropy computed from the logits (Keras'
  TensorFlow backend does the same when the last Dense has a softmax).

All parameters live in one flat vector (and their gradients in another), so
an optimizer step is a few vectorised passes. A step runs on a
:class:`varprop.parallel.Pool` in pieces fixed by the shapes, each on
one-thread BLAS, so the numbers do not depend on the thread count: the
forward pass, the loss and the backward pass to each layer's delta run
on two fixed parts of the batch's rows, as one map (rows are independent
there); training-mode BN, whose statistics need every row, runs whole in
between; then the weight gradients run in fixed pieces of the parameter
vector, each updated by the optimizer as soon as its gradient is in. So a
step is two fork-joins (plus two per BN layer), not one per product: on
these virtual machines a thread's wake-up costs tens of microseconds.

>>> import numpy as np
>>> m = Model(Architecture((4, 3, 2), "relu", bn_layers=(1,)), np.float64)
>>> m.initialize(seed=0, replicate=0)
>>> x, y = np.random.default_rng(0).random((5, 4)), np.array([0, 1, 1, 0, 1])
>>> loss = m.loss_and_grad(x, y)
>>> bool(np.isclose(loss, m.evaluate(x, y, training=True)[0])), m.n_params
(True, 29)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..nn import activations, inits
from ..montecarlo.seeds import generator
from ..parallel import SERIAL, Pool, row_chunks
from .optim import Optimizer

KERAS_BN_EPS = 1e-3
KERAS_BN_MOMENTUM = 0.99
SATURATION = 1e-3  # |phi'(z)| below this counts as saturated (ARCHITECTURE.md, "Definitions")
ROW_PARTS = 2  # parts of a large batch's rows, each on a thread (fixed: see Model._row_parts)
MIN_PART_ROWS = 16
WEIGHT_PIECES = 4  # the weight gradients are cut into about this many pieces of equal work
SMALL_MACS = 1_000_000  # OpenBLAS's small-matrix kernel takes products up to 100^3 multiply-adds
EVAL_BLOCK = 2048  # rows per block of an inference-mode evaluation
_PARALLEL_MACS = 1 << 22  # work smaller than this runs in the caller's thread (the same pieces, the same numbers)


@dataclass(frozen=True)
class Architecture:
    """Widths ``n_0, ..., n_L``; the activation of hidden layers; BN on the
    hidden layers ``bn_layers`` (1-based), ``pre`` or ``post`` the activation."""

    widths: tuple[int, ...]
    activation: str = "sigmoid"
    bn_layers: tuple[int, ...] = ()
    bn_position: str = "post"
    leaky_slope: float = 0.01
    bn_momentum: float = KERAS_BN_MOMENTUM
    bn_eps: float = KERAS_BN_EPS

    @property
    def depth(self) -> int:
        return len(self.widths) - 1

    @property
    def macs_per_row(self) -> int:
        """Multiply-adds of one row's forward pass through the dense layers."""
        return sum(a * b for a, b in zip(self.widths[:-1], self.widths[1:]))

    @property
    def dense_params(self) -> int:
        """The dense layers' weights and biases (BN's scales and shifts aside)."""
        return self.macs_per_row + sum(self.widths[1:])


@dataclass
class BatchNorm:
    """One BN layer's learned parameters (views into the model's vector) and moving statistics."""

    gamma: np.ndarray
    beta: np.ndarray
    moving_mean: np.ndarray
    moving_var: np.ndarray
    dgamma: np.ndarray
    dbeta: np.ndarray


@dataclass
class _BNRecord:
    """One BN layer's record of a forward pass, for the backward one."""

    x: np.ndarray  # BN's input
    xhat: np.ndarray  # its normalised input
    scale: np.ndarray  # gamma / sqrt(var + eps), per unit (and batch, in training mode)
    training: bool


# --- the layers, each a forward and an exact backward --------------------------------------------

def dense_forward(h: np.ndarray, w: np.ndarray, b: np.ndarray,
                  act: Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None = None,
                  out: tuple[np.ndarray, np.ndarray | None, np.ndarray | None] | None = None
                  ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``z = h w + b`` and, with ``act`` (which fills ``phi(z)`` and
    ``phi'(z)`` into its second and third arguments), the activation and its
    derivative: ``(z, phi(z), phi'(z))``, into ``out`` when given."""
    if out is None:
        shape, dtype = (h.shape[0], w.shape[1]), np.result_type(h, w)
        out = (np.empty(shape, dtype), *((np.empty(shape, dtype), np.empty(shape, dtype)) if act else (None, None)))
    z, phi, dphi = out
    product(h, w, out=z)
    z += b
    if act:
        act(z, phi, dphi)
    return z, phi, dphi


def bn_train_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float, batch: int | None = None,
                     out: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Training mode: ``(y, xhat, scale, batch mean, biased batch variance)``
    with ``xhat = (x - mean) / sqrt(var + eps)``, ``y = gamma xhat + beta``
    and ``scale = gamma / sqrt(var + eps)``, per unit and per batch of
    ``batch`` consecutive rows (default: all rows are one batch). The
    statistics are summed in float64 and returned in float64 (the first
    batch's when there are several). ``y`` goes into ``out`` when given."""
    n = x.shape[0]
    groups = x.reshape(n // (batch or n), batch or n, -1)
    mean = groups.mean(axis=1, keepdims=True, dtype=np.float64)
    centered = groups - mean.astype(x.dtype)
    var = np.mean(np.square(centered, dtype=np.float64), axis=1, keepdims=True)
    inv = (1.0 / np.sqrt(var + eps)).astype(x.dtype)
    centered *= inv
    y = np.multiply(centered, gamma, out=None if out is None else out.reshape(centered.shape))
    y += beta
    return y.reshape(x.shape), centered.reshape(x.shape), inv * gamma, mean[0, 0], var[0, 0]


def bn_train_backward(dy: np.ndarray, xhat: np.ndarray, scale: np.ndarray, dgamma: np.ndarray, dbeta: np.ndarray,
                      out: np.ndarray | None = None) -> np.ndarray:
    """The gradient through training-mode BN with its full batch Jacobian:
    ``dx = gamma / sigma (dy - mean(dy) - xhat mean(dy xhat))`` per batch, with
    ``sigma = sqrt(var + eps)`` (eps is inside xhat, so this is exact);
    fills ``dgamma = sum(dy xhat)`` and ``dbeta = sum(dy)``. ``scale`` is
    ``(batches, 1, units)`` as :func:`bn_train_forward` returns it. ``dx`` goes
    into ``out`` when given."""
    shape = dy.shape
    g = dy.reshape(scale.shape[0], -1, shape[1])
    xh = xhat.reshape(g.shape)
    sum_dy = g.sum(axis=1, keepdims=True)
    sum_dyx = (g * xh).sum(axis=1, keepdims=True)
    np.sum(sum_dy, axis=(0, 1), out=dbeta)
    np.sum(sum_dyx, axis=(0, 1), out=dgamma)
    n = dy.dtype.type(g.shape[1])
    dx = np.subtract(g, sum_dy / n, out=None if out is None else out.reshape(g.shape))
    dx -= xh * (sum_dyx / n)
    dx *= scale
    return dx.reshape(shape)


def bn_infer_forward(x: np.ndarray, bn: BatchNorm, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inference mode, with the moving statistics: ``(y, xhat, scale)``."""
    inv = (1.0 / np.sqrt(bn.moving_var.astype(np.float64) + eps)).astype(x.dtype)
    xhat = (x - bn.moving_mean) * inv
    y = xhat * bn.gamma
    y += bn.beta
    return y, xhat, inv * bn.gamma


def bn_infer_backward(dy: np.ndarray, xhat: np.ndarray, scale: np.ndarray, dgamma: np.ndarray, dbeta: np.ndarray,
                      out: np.ndarray | None = None) -> np.ndarray:
    """Inference-mode BN is affine per unit: ``dx = dy gamma / sqrt(moving_var + eps)``."""
    np.sum(dy, axis=0, out=dbeta)
    np.sum(dy * xhat, axis=0, out=dgamma)
    return np.multiply(dy, scale, out=out)


def sigmoid_both(x: np.ndarray, phi: np.ndarray, dphi: np.ndarray) -> None:
    """sigmoid and sigmoid' into ``phi`` and ``dphi``: with ``e = exp(-|x|)``
    (never overflows), ``exp(min(x, 0)) / (1 + e)`` and ``e / (1 + e)^2``, each
    accurate to 1e-6 relative in float32 at both tails. A second exp instead
    of selecting between ``1 / (1 + e)`` and ``e / (1 + e)``: NumPy's masked
    copy costs about 4 ns an element, several times the rest. SciPy's expit,
    which the registry's sigmoid uses, is not vectorised (3.6 ns an element)."""
    e = np.abs(x)
    np.negative(e, out=e)
    np.exp(e, out=e)
    r = np.add(e, 1, out=dphi)
    np.reciprocal(r, out=r)  # 1 / (1 + e)
    np.minimum(x, 0, out=phi)
    np.exp(phi, out=phi)
    phi *= r
    e *= r
    r *= e  # e / (1 + e)^2, in dphi


def _registry_both(act: activations.Activation) -> Callable[[np.ndarray, np.ndarray, np.ndarray], None]:
    def both(x: np.ndarray, phi: np.ndarray, dphi: np.ndarray) -> None:
        if act.both is not None:
            phi[...], dphi[...] = act.both(x)
        else:
            phi[...], dphi[...] = act.phi(x), act.dphi(x)
    return both


# Activations whose phi and phi' the trainer evaluates its own way, faster than the registry's
# (tests/test_train_grad.py checks them against the registry).
_FAST = {"sigmoid": sigmoid_both}


def softmax_xent(logits: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample cross-entropy of softmax(logits) against labels ``y``, and
    softmax(logits); log-sum-exp in the logits' dtype after subtracting the
    row maximum (no overflow).

    >>> loss, p = softmax_xent(np.log(np.array([[0.5, 0.25, 0.25]])), np.array([1]))
    >>> round(float(loss[0]), 6), p.round(3).tolist()
    (1.386294, [[0.5, 0.25, 0.25]])
    """
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    total = e.sum(axis=1, keepdims=True)
    p = e / total
    loss = np.log(total[:, 0]) - shifted[np.arange(len(y)), y]
    return loss, p


def softmax_xent_backward(p: np.ndarray, y: np.ndarray, scale: float) -> np.ndarray:
    """``scale (p - onehot(y))``: the gradient of ``scale * sum(loss)`` w.r.t. the logits."""
    d = p.copy()
    d[np.arange(len(y)), y] -= 1
    if scale != 1:
        d *= d.dtype.type(scale)
    return d


def splits_rows(n: int, macs_per_row: int) -> bool:
    """Whether a step on a batch of ``n`` rows of ``macs_per_row`` multiply-adds shares out over threads
    (:meth:`Model._row_parts`)."""
    return n >= ROW_PARTS * MIN_PART_ROWS and n * macs_per_row >= ROW_PARTS * _PARALLEL_MACS


def _blocks(n: int, parts: int) -> list[slice]:
    return [slice(i * n // parts, (i + 1) * n // parts) for i in range(parts)]


def product(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``a @ b`` (into ``out`` if given) on one-thread BLAS in the caller's thread.

    A thin product (a dimension of 16 or less: the small batches' products
    and weight gradients) is cut into blocks of at most ``SMALL_MACS``
    multiply-adds, fixed by the shapes: OpenBLAS (0.3.x on AVX-512 CPUs)
    then runs its small-matrix kernel, measured 2 to 3 times faster here
    than its general path on the same product (4 x 784 by 784 x 512: 35 us
    against 106)."""
    m, k = a.shape
    n = b.shape[1]
    if out is None:
        out = np.empty((m, n), np.result_type(a, b))
    macs = m * k * n
    if macs <= SMALL_MACS or min(m, k, n) > 16:
        return np.matmul(a, b, out=out)
    along_rows = m >= n
    length = m if along_rows else n
    for s in _blocks(length, min(length, -(-macs // SMALL_MACS))):
        idx = (s, slice(None)) if along_rows else (slice(None), s)
        np.matmul(a[idx[0]], b[:, idx[1]], out=out[idx])
    return out


def _times_rows(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> Callable[[slice], None]:
    def rows(s: slice) -> None:
        np.multiply(a[s], b[s], out=out[s])
    return rows


def _product_rows(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> Callable[[slice], None]:
    def rows(s: slice) -> None:
        product(a[s], b, out=out[s])
    return rows


Stage = tuple[bool, Callable[..., None]]  # (whole batch?, the stage: fn() if whole, else fn(rows))


# --- the model ---------------------------------------------------------------------------------

class Model:
    """Dense layers 1..L with the hidden activation, BN where the architecture
    says, and a softmax output; parameters in ``params``, gradients in ``grads``."""

    def __init__(self, arch: Architecture, dtype: Any = np.float32, pool: Pool = SERIAL):
        self.arch, self.dtype, self.pool = arch, np.dtype(dtype), pool
        self.act = activations.get(arch.activation, arch.leaky_slope)
        self.both = _FAST.get(self.act.name) or _registry_both(self.act)  # both(x, phi_out, dphi_out)
        shapes: list[tuple[str, int, tuple[int, ...]]] = []
        for l in range(1, arch.depth + 1):
            n_in, n_out = arch.widths[l - 1], arch.widths[l]
            shapes += [("W", l, (n_in, n_out)), ("b", l, (n_out,))]
            if l in arch.bn_layers:
                shapes += [("gamma", l, (n_out,)), ("beta", l, (n_out,))]
        total = sum(math.prod(s) for _, _, s in shapes)
        self.params = np.zeros(total, self.dtype)
        self.grads = np.zeros(total, self.dtype)
        views: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        starts: dict[tuple[str, int], int] = {}
        start = 0
        for name, l, shape in shapes:
            size = math.prod(shape)
            views[name, l] = (self.params[start:start + size].reshape(shape),
                              self.grads[start:start + size].reshape(shape))
            starts[name, l] = start
            start += size
        self._macs_per_row = arch.macs_per_row
        self.pieces = self._weight_pieces(starts, total)  # (layer, rows of W, flat slice, last piece of W?)
        self.W = {l: views["W", l][0] for l in self.layers}
        self.b = {l: views["b", l][0] for l in self.layers}
        self.dW = {l: views["W", l][1] for l in self.layers}
        self.db = {l: views["b", l][1] for l in self.layers}
        self.bn: dict[int, BatchNorm] = {}
        for l in arch.bn_layers:
            n = arch.widths[l]
            views["gamma", l][0][...] = 1
            self.bn[l] = BatchNorm(views["gamma", l][0], views["beta", l][0], np.zeros(n, self.dtype),
                                   np.ones(n, self.dtype), views["gamma", l][1], views["beta", l][1])

    def _weight_pieces(self, starts: dict[tuple[str, int], int], total: int) -> list[tuple[int, slice, slice, bool]]:
        """The weight gradients' pieces, fixed by the widths: ``(layer, rows of W, the slice of the
        parameter vector they cover, whether it is the layer's last)``. A layer takes pieces in
        proportion to its work; its last piece also covers its bias and BN parameters, which follow
        its W in the vector. The largest pieces come first, so that threads finish together."""
        pieces = []
        for l in self.layers:
            n_in, n_out = self.arch.widths[l - 1], self.arch.widths[l]
            w0 = starts["W", l]
            end = starts.get(("W", l + 1), total)
            parts = max(1, round(WEIGHT_PIECES * n_in * n_out / self._macs_per_row))
            for i, rows in enumerate(_blocks(n_in, parts)):
                last = i == parts - 1
                flat = slice(w0 + rows.start * n_out, end if last else w0 + rows.stop * n_out)
                pieces.append(((rows.stop - rows.start) * n_out, l, rows, flat, last))
        pieces.sort(key=lambda p: -p[0])
        return [p[1:] for p in pieces]

    @property
    def layers(self) -> range:
        return range(1, self.arch.depth + 1)

    @property
    def n_params(self) -> int:
        return int(self.params.size)

    def initialize(self, seed: int, replicate: int, init: Any = "keras-default") -> None:
        """Draw every Dense layer's kernel and bias from the seed tree, as
        ``varprop simulate --seed seed`` draws replicate ``replicate``'s (the
        same generators and blocks, so the trained network at step 0 is the
        one the at-init analysis measures); BN starts at gamma 1, beta 0,
        moving mean 0, moving variance 1. ``init``: a preset name, ``module:function``,
        a callable ``(rng, fan_in, fan_out) -> array`` or a resolved scheme."""
        scheme = init if isinstance(init, inits.Scheme) else inits.resolve(init)
        for l in self.layers:
            n_in, n_out = self.arch.widths[l - 1], self.arch.widths[l]
            w = self.W[l]
            if scheme.user is None and not scheme.orthogonal:
                for block, rows in enumerate(row_chunks(n_in, n_out)):
                    rng = generator(seed, replicate, l, "weights", block)
                    w[rows] = inits.standard_draw(scheme.distribution, rng, (rows.stop - rows.start, n_out), self.dtype)
                w *= self.dtype.type(inits.weight_scale(scheme, n_in, n_out))
            else:
                w0, scale = inits.draw_weights(scheme, generator(seed, replicate, l, "weights"), n_in, n_out,
                                               self.dtype)
                w[...] = w0 * self.dtype.type(scale)
            if inits.has_bias(scheme, None):  # torch-default's U(+-1/sqrt(fan_in)); the others' zeros
                self.b[l][...] = inits.draw_bias(scheme, None, generator(seed, replicate, l, "bias"), n_in, n_out)
            else:
                self.b[l][...] = 0
        for bn in self.bn.values():
            bn.gamma[...], bn.beta[...], bn.moving_mean[...], bn.moving_var[...] = 1, 0, 0, 1

    # forward and backward

    # forward and backward, as stages: each runs on parts of the batch's rows (on the pool's threads) or,
    # where a batch statistic needs every row (training-mode BN), on the whole batch in the caller's thread

    def _row_parts(self, n: int) -> list[slice]:
        """The fixed parts of a batch of ``n`` rows: two when each part's products are worth a thread.
        Two, not more, whatever the thread count (which never changes a number): a part's products
        run as whole one-thread BLAS calls, and thinner parts cost more than they gain (four parts
        of a 128-row batch made an epoch 13% slower on one thread and 17% slower on two)."""
        return _blocks(n, ROW_PARTS if splits_rows(n, self._macs_per_row) else 1)

    def _run(self, stages: list[Stage], n: int) -> None:
        """Run ``(whole, fn)`` stages in order: consecutive row stages as one map over the row parts
        (each part runs them all, one fork-join for the lot), a whole stage as ``fn()``."""
        parts = self._row_parts(n)
        pool = self.pool if len(parts) > 1 else SERIAL
        group: list[Callable[[slice], None]] = []

        def flush() -> None:
            if group:
                fns = tuple(group)
                group.clear()
                pool.map(lambda s: [fn(s) for fn in fns], parts)
        for whole, fn in stages:
            if whole:
                flush()
                fn()
            else:
                group.append(fn)
        flush()

    def _forward_stages(self, x: np.ndarray, training: bool, update_stats: bool, batch: int | None
                        ) -> tuple[list[Stage], list[dict[str, Any]]]:
        n, stages, tape = x.shape[0], [], []
        h = x
        for l in self.layers:
            z = np.empty((n, self.arch.widths[l]), self.dtype)
            rec: dict[str, Any] = {"h_in": h}
            tape.append(rec)
            if l == self.arch.depth:
                stages.append((False, self._dense_rows(l, h, z)))
                rec["pre"] = rec["post"] = z
                break
            a, d = np.empty_like(z), np.empty_like(z)
            pre = post = None
            if l in self.bn and self.arch.bn_position == "pre":
                pre = np.empty_like(z)
                stages += [(False, self._dense_rows(l, h, z)), self._bn_stage(l, z, pre, rec, training, update_stats,
                                                                               batch),
                           (False, self._act_rows(pre, a, d))]
            else:
                stages.append((False, self._dense_rows(l, h, z, a, d)))
                if l in self.bn:
                    post = np.empty_like(z)
                    stages.append(self._bn_stage(l, a, post, rec, training, update_stats, batch))
            rec.update(pre=z if pre is None else pre, dphi=d, act_out=a, post=a if post is None else post)
            h = rec["post"]
        return stages, tape

    def _dense_rows(self, l: int, h: np.ndarray, z: np.ndarray, a: np.ndarray | None = None,
                    d: np.ndarray | None = None) -> Callable[[slice], None]:
        act = self.both if a is not None else None

        def rows(s: slice) -> None:
            dense_forward(h[s], self.W[l], self.b[l], act, (z[s], None if a is None else a[s],
                                                          None if d is None else d[s]))
        return rows

    def _act_rows(self, x: np.ndarray, a: np.ndarray, d: np.ndarray) -> Callable[[slice], None]:
        def rows(s: slice) -> None:
            self.both(x[s], a[s], d[s])
        return rows

    def _bn_stage(self, l: int, x: np.ndarray, y: np.ndarray, rec: dict[str, Any], training: bool, update: bool,
                  batch: int | None) -> Stage:
        bn, eps = self.bn[l], self.arch.bn_eps

        def whole() -> None:
            if not training:
                y[...], xhat, scale = bn_infer_forward(x, bn, eps)
                rec["bn"] = _BNRecord(x, xhat, scale, False)
                return
            _, xhat, scale, mean, var = bn_train_forward(x, bn.gamma, bn.beta, eps, batch, out=y)
            if update:  # Keras: moving * momentum + batch statistic * (1 - momentum), in the variable's dtype
                m = self.dtype.type(self.arch.bn_momentum)
                one_minus = self.dtype.type(1.0 - self.arch.bn_momentum)
                bn.moving_mean[...] = bn.moving_mean * m + mean.astype(self.dtype) * one_minus
                bn.moving_var[...] = bn.moving_var * m + var.astype(self.dtype) * one_minus
            rec["bn"] = _BNRecord(x, xhat, scale, True)
        return True, whole

    def _backward_stages(self, tape: list[dict[str, Any]], g: np.ndarray, need_input_grad: bool,
                         record: dict[int, dict[str, np.ndarray]] | None
                         ) -> tuple[list[Stage], dict[int, np.ndarray], np.ndarray | None]:
        n, stages, deltas = g.shape[0], [], {}
        for l in reversed(self.layers):
            rec = tape[l - 1]
            delta = g
            if l < self.arch.depth:
                if record is not None:
                    record.setdefault(l, {})["grad"] = g
                post_bn = l in self.bn and self.arch.bn_position == "post"
                if post_bn:
                    delta = np.empty_like(g)
                    stages.append(self._bn_back_stage(l, rec, g, delta))
                scaled = np.empty_like(g)
                stages.append((False, _times_rows(delta, rec["dphi"], scaled)))
                delta = scaled
                if l in self.bn and not post_bn:
                    delta = np.empty_like(g)
                    stages.append(self._bn_back_stage(l, rec, scaled, delta))
            if record is not None:
                record.setdefault(l, {})["delta"] = delta
            deltas[l] = delta
            if l == 1 and not need_input_grad:
                return stages, deltas, None
            g = np.empty((n, self.arch.widths[l - 1]), self.dtype)
            stages.append((False, _product_rows(delta, self.W[l].T, g)))
        return stages, deltas, g

    def _bn_back_stage(self, l: int, rec: dict[str, Any], dy: np.ndarray, dx: np.ndarray
                       ) -> Stage:
        def whole() -> None:  # BN's record is the forward pass's, made when it ran
            r, bn = rec["bn"], self.bn[l]
            (bn_train_backward if r.training else bn_infer_backward)(dy, r.xhat, r.scale, bn.dgamma, bn.dbeta, dx)
        return True, whole

    def _weight_gradients(self, tape: list[dict[str, Any]], deltas: dict[int, np.ndarray],
                          opt: Optimizer | None = None) -> None:
        """``dW = h^T delta`` and ``db = sum(delta)``, and ``opt``'s update of the parameters. A small
        batch's run layer by layer in the caller's thread, the update last; a larger batch's in the fixed
        pieces of :meth:`_weight_pieces` on the pool, each piece's parameters updated as soon as their
        gradient is in (on the piece's thread, in cache). Either way by the batch's shape alone."""
        n = deltas[1].shape[0]
        if n * self._macs_per_row < _PARALLEL_MACS:  # one update of the whole vector: by pieces, 4% slower
            for l in self.layers:
                product(tape[l - 1]["h_in"].T, deltas[l], out=self.dW[l])
                np.sum(deltas[l], axis=0, out=self.db[l])
            if opt is not None:
                opt.update(self.params, self.grads, slice(0, self.n_params))
            return

        def piece(item: tuple[int, slice, slice, bool]) -> None:
            l, rows, flat, last = item
            product(tape[l - 1]["h_in"][:, rows].T, deltas[l], out=self.dW[l][rows])
            if last:
                np.sum(deltas[l], axis=0, out=self.db[l])
            if opt is not None:
                opt.update(self.params, self.grads, flat)
        self.pool.map(piece, self.pieces)

    def forward(self, x: np.ndarray, training: bool, update_stats: bool = False, batch: int | None = None
                ) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Logits of ``x``, and each layer's record (for :meth:`backward` and the statistics):
        ``h_in`` (the Dense input), ``pre`` (the activation's input), ``post`` (the layer's output),
        ``bn`` (BN's record). In training mode BN normalises each ``batch``
        consecutive rows (default: all of them) with their own statistics;
        ``update_stats`` moves the moving statistics (by the one batch's)."""
        x = np.asarray(x, self.dtype)
        stages, tape = self._forward_stages(x, training, update_stats, batch)
        self._run(stages, x.shape[0])
        return tape[-1]["post"], tape

    def backward(self, tape: list[dict[str, Any]], dlogits: np.ndarray, need_input_grad: bool = False,
                 record: dict[int, dict[str, np.ndarray]] | None = None) -> np.ndarray | None:
        """Fill ``grads`` from the gradient w.r.t. the logits; return the one w.r.t. the input
        if ``need_input_grad``. ``record`` (if given) receives per layer the gradients w.r.t. its
        output (``grad``) and its Dense output (``delta``)."""
        dlogits = np.asarray(dlogits, self.dtype)
        stages, deltas, g = self._backward_stages(tape, dlogits, need_input_grad, record)
        self._run(stages, dlogits.shape[0])
        self._weight_gradients(tape, deltas)
        return g

    def loss_and_grad(self, x: np.ndarray, y: np.ndarray, update_stats: bool = True, opt: Optimizer | None = None
                      ) -> float:
        """One training-mode pass on a batch: the mean loss (what Keras reports
        for the batch), ``grads`` filled with its gradient, and (by default)
        the BN moving statistics moved. With ``opt``, also the optimizer's
        step, unless the loss is not finite: a diverged network is left as
        it is, and ``grads`` is then not this batch's (only BN's part of it
        is computed). The forward pass, the loss and the backward pass up to the
        weight gradients run as one map over the row parts when no BN
        needs the whole batch between them."""
        x = np.asarray(x, self.dtype)
        n = x.shape[0]
        stages, tape = self._forward_stages(x, True, update_stats, None)
        logits = tape[-1]["post"]
        losses, dlogits = np.empty(n, self.dtype), np.empty_like(logits)

        def loss_rows(s: slice) -> None:
            losses[s], p = softmax_xent(logits[s], y[s])
            dlogits[s] = softmax_xent_backward(p, y[s], 1.0 / n)
        back, deltas, _ = self._backward_stages(tape, dlogits, False, None)
        self._run([*stages, (False, loss_rows), *back], n)
        loss = float(np.mean(losses, dtype=np.float64))
        if opt is not None:
            if not math.isfinite(loss):
                return loss
            opt.begin()
        self._weight_gradients(tape, deltas, opt)
        return loss

    def evaluate(self, x: np.ndarray, y: np.ndarray, training: bool = False, block: int = EVAL_BLOCK
                 ) -> tuple[float, float]:
        """Mean loss and accuracy over ``x`` (inference mode unless ``training``;
        in blocks of rows when inferring, as Keras' evaluate does with batches)."""
        if training:
            logits, _ = self.forward(x, training=True)
            loss, p = softmax_xent(logits, y)
            return float(np.mean(loss, dtype=np.float64)), float(np.mean(p.argmax(axis=1) == y))
        total, correct = 0.0, 0
        for start in range(0, len(y), block):
            rows = slice(start, start + block)
            logits, _ = self.forward(x[rows], training=False)
            loss, _ = softmax_xent(logits, y[rows])
            total += float(np.sum(loss, dtype=np.float64))
            correct += int(np.count_nonzero(logits.argmax(axis=1) == y[rows]))
        return total / len(y), correct / len(y)

    def layer_statistics(self, x: np.ndarray, y: np.ndarray, batch: int) -> list[dict[str, float]]:
        """Per layer, on a probe ``x`` cut into batches of ``batch`` rows, in
        training mode as a training step sees them (BN with each batch's
        statistics; the moving ones left alone): what enters the activation
        (``pre``) and the layer's output (``post``, after BN when BN is post;
        the softmax probabilities on the last layer, whose ``pre`` are the
        logits), their mean and std, saturated and zero fractions and dead
        units, and the std of the per-sample loss's gradient w.r.t. the output
        (``grad``) and the Dense output (``delta``); BN's moving statistics
        against the probe's own (how far inference's normalisation is from
        the data's)."""
        logits, tape = self.forward(x, training=True, batch=batch)
        _, p = softmax_xent(logits, y)
        grads: dict[int, dict[str, np.ndarray]] = {}
        saved = self.grads.copy()  # the training gradient stays what the last step used
        self.backward(tape, softmax_xent_backward(p, y, 1.0), record=grads)
        self.grads[...] = saved
        rows = []
        for l in self.layers:
            rec, last = tape[l - 1], l == self.arch.depth
            post = p if last else rec["post"]
            row = {"layer": l, "width": self.arch.widths[l], "bn": l in self.bn,
                   **_moments("pre", rec["pre"]), **_moments("post", post)}
            if last:
                row.update(frac_saturated=math.nan, frac_zero=math.nan, frac_dead_units=math.nan, grad_std=math.nan)
            else:
                flat = np.abs(rec["dphi"]) < SATURATION
                row.update(frac_saturated=float(np.mean(flat)),
                           frac_zero=float(np.mean(rec["act_out"] == 0)),
                           frac_dead_units=float(np.mean(flat.all(axis=0))),
                           grad_std=_std(grads[l]["grad"]))
            row["delta_std"] = _std(grads[l]["delta"])
            row.update(self._bn_row(l, rec))
            rows.append(row)
        return rows

    def _bn_row(self, l: int, rec: dict[str, Any]) -> dict[str, float]:
        if l not in self.bn:
            return dict.fromkeys(("bn_moving_mean", "bn_moving_var", "bn_var_ratio", "bn_mean_shift"), math.nan)
        bn = self.bn[l]
        x = rec["bn"].x.astype(np.float64)  # BN's input on the probe
        mean, var = x.mean(axis=0), x.var(axis=0)
        mm, mv = bn.moving_mean.astype(np.float64), bn.moving_var.astype(np.float64)
        eps = self.arch.bn_eps
        return {"bn_moving_mean": float(mm.mean()), "bn_moving_var": float(mv.mean()),
                # geometric mean over units of (moving var + eps) / (probe var + eps): 1 when inference
                # normalises as the data's own statistics would
                "bn_var_ratio": float(np.exp(np.mean(np.log((mv + eps) / (var + eps))))),
                "bn_mean_shift": float(np.sqrt(np.mean((mm - mean) ** 2 / (var + eps))))}

    def weight_norms(self) -> dict[int, tuple[float, float]]:
        """Per layer: the Frobenius norms of W and of the last training gradient dW."""
        return {l: (_norm(self.W[l]), _norm(self.dW[l])) for l in self.layers}


def _moments(side: str, v: np.ndarray) -> dict[str, float]:
    v64 = v.astype(np.float64)
    return {f"{side}_mean": float(v64.mean()), f"{side}_std": float(v64.std())}


def _std(v: np.ndarray) -> float:
    return float(v.astype(np.float64).std())


def _norm(v: np.ndarray) -> float:
    flat = v.reshape(-1).astype(np.float64)
    return float(math.sqrt(np.dot(flat, flat)))


__all__ = ["Architecture", "BatchNorm", "Model", "SATURATION", "bn_infer_backward", "bn_infer_forward",
           "bn_train_backward", "bn_train_forward", "dense_forward", "softmax_xent",
           "softmax_xent_backward"]

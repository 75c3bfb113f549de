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
an optimizer step is a few vectorised passes. Products run over blocks of
rows fixed by the shapes, on one-thread BLAS, spread over a
:class:`varprop.parallel.Pool`: the numbers do not depend on the thread
count. Reductions over the batch (BN statistics, bias and BN gradients) run
whole, in one thread.

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

KERAS_BN_EPS = 1e-3
KERAS_BN_MOMENTUM = 0.99
SATURATION = 1e-3  # |phi'(z)| below this counts as saturated (ARCHITECTURE.md, "Definitions")
BLOCK = 128  # rows or columns per block of a large product (fixed by the shapes, never by the thread count)
SMALL_MACS = 1_000_000  # OpenBLAS's small-matrix kernel takes products up to 100^3 multiply-adds
EVAL_BLOCK = 2048  # rows per block of an inference-mode evaluation
_PARALLEL_MACS = 1 << 22  # products smaller than this run in the caller's thread (same blocks, same numbers)


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

def dense_forward(h: np.ndarray, w: np.ndarray, b: np.ndarray, pool: Pool = SERIAL,
                  act: Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None = None
                  ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``z = h w + b`` over blocks fixed by the shapes, and with ``act`` (which
    fills ``phi(z)`` and ``phi'(z)`` into its second and third arguments) the
    activation and its derivative, each block's while it is in cache (and on
    the block's thread): ``(z, phi(z), phi'(z))``."""
    m, n = h.shape[0], w.shape[1]
    phi = np.empty((m, n), np.result_type(h, w)) if act else None
    dphi = np.empty_like(phi) if act else None

    def after(z: np.ndarray, idx: tuple[slice, slice]) -> None:
        block = z[idx]
        block += b[idx[1]]
        if act:
            act(block, phi[idx], dphi[idx])
    return product(h, w, pool, after=after), phi, dphi


def dense_backward(h: np.ndarray, w: np.ndarray, delta: np.ndarray, dw: np.ndarray, db: np.ndarray,
                   pool: Pool = SERIAL, need_input_grad: bool = True) -> np.ndarray | None:
    """Fill ``dw = h^T delta`` and ``db = sum(delta)``; return ``delta w^T``."""
    product(h.T, delta, pool, out=dw)
    np.sum(delta, axis=0, out=db)
    return product(delta, w.T, pool) if need_input_grad else None


def bn_train_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float, batch: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Training mode: ``(y, xhat, scale, batch mean, biased batch variance)``
    with ``xhat = (x - mean) / sqrt(var + eps)``, ``y = gamma xhat + beta``
    and ``scale = gamma / sqrt(var + eps)``, per unit and per batch of
    ``batch`` consecutive rows (default: all rows are one batch). The
    statistics are summed in float64 and returned in float64 (the first
    batch's when there are several)."""
    n = x.shape[0]
    groups = x.reshape(n // (batch or n), batch or n, -1)
    mean = groups.mean(axis=1, keepdims=True, dtype=np.float64)
    centered = groups - mean.astype(x.dtype)
    var = np.mean(np.square(centered, dtype=np.float64), axis=1, keepdims=True)
    inv = (1.0 / np.sqrt(var + eps)).astype(x.dtype)
    centered *= inv
    y = centered * gamma
    y += beta
    return y.reshape(x.shape), centered.reshape(x.shape), inv * gamma, mean[0, 0], var[0, 0]


def bn_train_backward(dy: np.ndarray, xhat: np.ndarray, scale: np.ndarray, dgamma: np.ndarray, dbeta: np.ndarray
                      ) -> np.ndarray:
    """The gradient through training-mode BN with its full batch Jacobian:
    ``dx = gamma / sigma (dy - mean(dy) - xhat mean(dy xhat))`` per batch, with
    ``sigma = sqrt(var + eps)`` (eps is inside xhat, so this is exact);
    fills ``dgamma = sum(dy xhat)`` and ``dbeta = sum(dy)``. ``scale`` is
    ``(batches, 1, units)`` as :func:`bn_train_forward` returns it."""
    shape = dy.shape
    g = dy.reshape(scale.shape[0], -1, shape[1])
    xh = xhat.reshape(g.shape)
    sum_dy = g.sum(axis=1, keepdims=True)
    sum_dyx = (g * xh).sum(axis=1, keepdims=True)
    np.sum(sum_dy, axis=(0, 1), out=dbeta)
    np.sum(sum_dyx, axis=(0, 1), out=dgamma)
    n = dy.dtype.type(g.shape[1])
    dx = g - sum_dy / n
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


def bn_infer_backward(dy: np.ndarray, xhat: np.ndarray, scale: np.ndarray, dgamma: np.ndarray, dbeta: np.ndarray
                      ) -> np.ndarray:
    """Inference-mode BN is affine per unit: ``dx = dy gamma / sqrt(moving_var + eps)``."""
    np.sum(dy, axis=0, out=dbeta)
    np.sum(dy * xhat, axis=0, out=dgamma)
    return dy * scale


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


def _blocks(n: int, parts: int) -> list[slice]:
    return [slice(i * n // parts, (i + 1) * n // parts) for i in range(parts)]


def product(a: np.ndarray, b: np.ndarray, pool: Pool = SERIAL, out: np.ndarray | None = None,
            after: Callable[[np.ndarray, tuple[slice, slice]], None] | None = None) -> np.ndarray:
    """``a @ b`` (into ``out`` if given), over blocks of the output's longer
    dimension whose number depends only on the shapes: on any thread count
    each block is the same one-thread BLAS call, so the result is too.
    ``after(out, index)`` runs on each block as soon as it is computed.

    A thin product (a dimension of 16 or less: the small batches' products
    and weight gradients) is cut into blocks of at most ``SMALL_MACS``
    multiply-adds: OpenBLAS (0.3.x on AVX-512 CPUs) then runs its
    small-matrix kernel, measured 2 to 3 times faster here than its general
    path on the same product (4 x 784 by 784 x 512: 35 us against 106).
    Otherwise blocks of about ``BLOCK`` rows or columns feed the threads."""
    m, k = a.shape
    n = b.shape[1]
    if out is None:
        out = np.empty((m, n), np.result_type(a, b))
    macs = m * k * n
    along_rows = m >= n
    length = m if along_rows else n
    if macs <= SMALL_MACS:
        parts = 1
    elif min(m, k, n) <= 16:
        parts = min(length, -(-macs // SMALL_MACS))
    else:
        parts = max(1, min(length, round(length / BLOCK)))

    def fill(s: slice) -> None:
        idx = (s, slice(None)) if along_rows else (slice(None), s)
        np.matmul(a[idx[0]], b[:, idx[1]], out=out[idx])
        if after is not None:
            after(out, idx)
    blocks = _blocks(length, parts)
    if len(blocks) > 1 and macs >= _PARALLEL_MACS:
        pool.map(fill, blocks)
    else:
        for s in blocks:
            fill(s)
    return out


# --- the model ---------------------------------------------------------------------------------

class Model:
    """Dense layers 1..L with the hidden activation, BN where the architecture
    says, and a softmax output; parameters in ``params``, gradients in ``grads``."""

    def __init__(self, arch: Architecture, dtype: Any = np.float32, pool: Pool = SERIAL):
        self.arch, self.dtype, self.pool = arch, np.dtype(dtype), pool
        self.act = activations.get(arch.activation, arch.leaky_slope)
        self._both = _FAST.get(self.act.name) or _registry_both(self.act)
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
        start = 0
        for name, l, shape in shapes:
            size = math.prod(shape)
            views[name, l] = (self.params[start:start + size].reshape(shape),
                              self.grads[start:start + size].reshape(shape))
            start += size
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

    def _bn_forward(self, l: int, x: np.ndarray, training: bool, update: bool, batch: int | None
                    ) -> tuple[np.ndarray, _BNRecord]:
        bn, eps = self.bn[l], self.arch.bn_eps
        if training:
            y, xhat, scale, mean, var = bn_train_forward(x, bn.gamma, bn.beta, eps, batch)
            if update:  # Keras: moving * momentum + batch statistic * (1 - momentum), in the variable's dtype
                m = self.dtype.type(self.arch.bn_momentum)
                one_minus = self.dtype.type(1.0 - self.arch.bn_momentum)
                bn.moving_mean[...] = bn.moving_mean * m + mean.astype(self.dtype) * one_minus
                bn.moving_var[...] = bn.moving_var * m + var.astype(self.dtype) * one_minus
        else:
            y, xhat, scale = bn_infer_forward(x, bn, eps)
        return y, _BNRecord(x, xhat, scale, training)

    def forward(self, x: np.ndarray, training: bool, update_stats: bool = False, keep: bool = True,
                batch: int | None = None) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Logits of ``x``, and each layer's record (for :meth:`backward` and the statistics):
        ``h_in`` (the Dense input), ``pre`` (the activation's input), ``post`` (the layer's output),
        ``bn`` (BN's record). In training mode BN normalises each ``batch``
        consecutive rows (default: all of them) with their own statistics;
        ``update_stats`` moves the moving statistics (by the one batch's)."""
        h = np.asarray(x, self.dtype)
        tape: list[dict[str, Any]] = []
        for l in self.layers:
            rec: dict[str, Any] = {"h_in": h}
            last = l == self.arch.depth
            bn_pre = l in self.bn and self.arch.bn_position == "pre"
            z, a, d = dense_forward(h, self.W[l], self.b[l], self.pool, None if last or bn_pre else self._both)
            if last:
                rec["pre"] = rec["post"] = z
                tape.append(rec)
                return z, tape
            if bn_pre:
                z, rec["bn"] = self._bn_forward(l, z, training, update_stats, batch)
                a, d = np.empty_like(z), np.empty_like(z)
                self._both(z, a, d)
            rec["pre"], rec["dphi"], rec["act_out"] = z, d, a
            if l in self.bn and self.arch.bn_position == "post":
                a, rec["bn"] = self._bn_forward(l, a, training, update_stats, batch)
            rec["post"] = a
            if keep:
                tape.append(rec)
            h = a
        raise AssertionError("unreachable: the last layer returns")

    def backward(self, tape: list[dict[str, Any]], dlogits: np.ndarray, need_input_grad: bool = False,
                 record: dict[int, dict[str, np.ndarray]] | None = None) -> np.ndarray | None:
        """Fill ``grads`` from the gradient w.r.t. the logits. ``record`` (if
        given) receives per layer the gradients w.r.t. its output (``grad``)
        and its Dense output (``delta``)."""
        g = dlogits
        for l in reversed(self.layers):
            rec = tape[l - 1]
            if l < self.arch.depth:
                if record is not None:
                    record.setdefault(l, {})["grad"] = g
                bn = rec.get("bn")
                post_bn = bn is not None and self.arch.bn_position == "post"
                if post_bn:
                    g = self._bn_backward(l, bn, g)
                g = g * rec["dphi"]
                if bn is not None and not post_bn:
                    g = self._bn_backward(l, bn, g)
            if record is not None:
                record.setdefault(l, {})["delta"] = g
            g = dense_backward(rec["h_in"], self.W[l], g, self.dW[l], self.db[l], self.pool,
                               need_input_grad=need_input_grad or l > 1)
        return g

    def _bn_backward(self, l: int, rec: _BNRecord, g: np.ndarray) -> np.ndarray:
        bn = self.bn[l]
        back = bn_train_backward if rec.training else bn_infer_backward
        return back(g, rec.xhat, rec.scale, bn.dgamma, bn.dbeta)

    def loss_and_grad(self, x: np.ndarray, y: np.ndarray, update_stats: bool = True) -> float:
        """One training-mode pass on a batch: the mean loss (what Keras reports
        for the batch), ``grads`` filled with its gradient, and (by default)
        the BN moving statistics moved."""
        logits, tape = self.forward(x, training=True, update_stats=update_stats)
        loss, p = softmax_xent(logits, y)
        self.backward(tape, softmax_xent_backward(p, y, 1.0 / len(y)))
        return float(np.mean(loss, dtype=np.float64))

    def evaluate(self, x: np.ndarray, y: np.ndarray, training: bool = False, block: int = EVAL_BLOCK
                 ) -> tuple[float, float]:
        """Mean loss and accuracy over ``x`` (inference mode unless ``training``;
        in blocks of rows when inferring, as Keras' evaluate does with batches)."""
        if training:
            logits, _ = self.forward(x, training=True, keep=False)
            loss, p = softmax_xent(logits, y)
            return float(np.mean(loss, dtype=np.float64)), float(np.mean(p.argmax(axis=1) == y))
        total, correct = 0.0, 0
        for start in range(0, len(y), block):
            rows = slice(start, start + block)
            logits, _ = self.forward(x[rows], training=False, keep=False)
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
           "bn_train_backward", "bn_train_forward", "dense_backward", "dense_forward", "softmax_xent",
           "softmax_xent_backward"]

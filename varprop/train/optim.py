"""Optimizers with Keras' exact update rules (keras/src/optimizers/sgd.py and
adam.py), on the model's flat parameter vector.

- SGD(lr, momentum mu, nesterov): ``v <- mu v - lr g``, then ``w <- w + v``,
  or with Nesterov ``w <- w + mu v - lr g``; with mu = 0, ``w <- w - lr g``.
- Adam(lr, beta1 0.9, beta2 0.999, epsilon 1e-7): ``m += (1 - b1)(g - m)``,
  ``v += (1 - b2)(g^2 - v)``, ``a = lr sqrt(1 - b2^t) / (1 - b1^t)`` at step
  t = 1, 2, ..., ``w -= a m / (sqrt(v) + eps)``: epsilon outside the bias
  correction (PyTorch puts it inside).

Updates are element by element, so splitting the vector over threads never
changes a number.

>>> import numpy as np
>>> w, g = np.array([1.0, -2.0]), np.array([0.5, 0.5])
>>> opt = make("sgd-nesterov", lr=0.1, momentum=0.9, size=2, dtype=np.float64)
>>> opt.step(w, g); w.round(6).tolist()  # v = -0.05; w += 0.9 v - 0.1 g = -0.095
[0.905, -2.095]
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from ..parallel import SERIAL, Pool

NAMES = ("sgd", "sgd-nesterov", "adam")
SCHEDULES = ("constant", "cosine")
ADAM_BETA1, ADAM_BETA2, ADAM_EPS = 0.9, 0.999, 1e-7
PIECE = 16384  # elements updated together: a few arrays of them stay in a core's L2 cache


def constant(lr: float) -> Callable[[int], float]:
    return lambda step: lr


def cosine(lr: float, total_steps: int) -> Callable[[int], float]:
    """Keras' ``CosineDecay(lr, decay_steps=total_steps)`` (alpha 0, no warm-up):
    ``lr (1 + cos(pi min(step, total) / total)) / 2`` at optimizer step ``step`` (0-based)."""
    return lambda step: lr * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


class Optimizer:
    """Base: ``step(w, g)`` updates ``w`` in place; ``iterations`` counts steps
    (Keras' ``optimizer.iterations``, which a schedule reads before the step)."""

    def __init__(self, lr: Callable[[int], float], size: int, dtype: Any, pool: Pool = SERIAL):
        self.lr, self.dtype, self.pool = lr, np.dtype(dtype), pool
        self.iterations = 0
        # One part per thread, each updated piece by piece: every pass over a piece runs in the core's
        # cache (the vector, its gradient and state do not fit). Element-wise updates give the same
        # numbers however the vector is cut.
        parts = max(1, min(pool.threads, size // PIECE))
        self.parts = [slice(i * size // parts, (i + 1) * size // parts) for i in range(parts)]

    def step(self, w: np.ndarray, g: np.ndarray) -> None:
        lr = self.lr(self.iterations)
        self._prepare()
        self.iterations += 1

        def run(part: slice) -> None:
            for start in range(part.start, part.stop, PIECE):
                piece = slice(start, min(start + PIECE, part.stop))
                self._update(piece, w[piece], g[piece], lr)
        if len(self.parts) > 1:
            self.pool.map(run, self.parts)
        else:
            run(self.parts[0])

    def _prepare(self) -> None:
        """Per-step constants, before ``iterations`` moves."""

    def _update(self, piece: slice, w: np.ndarray, g: np.ndarray, lr: float) -> None:
        raise NotImplementedError


class SGD(Optimizer):
    def __init__(self, lr: Callable[[int], float], size: int, dtype: Any, momentum: float = 0.0,
                 nesterov: bool = False, pool: Pool = SERIAL):
        super().__init__(lr, size, dtype, pool)
        self.momentum, self.nesterov = momentum, nesterov
        self.velocity = np.zeros(size, self.dtype) if momentum else None

    def _update(self, piece: slice, w: np.ndarray, g: np.ndarray, lr: float) -> None:
        t = self.dtype.type
        step = g * t(lr)  # lr g
        if self.velocity is None:
            w -= step
            return
        v = self.velocity[piece]
        v *= t(self.momentum)
        v -= step  # v = mu v - lr g
        if self.nesterov:
            step *= t(-1)
            step += v * t(self.momentum)  # mu v - lr g
            w += step
        else:
            w += v


class Adam(Optimizer):
    def __init__(self, lr: Callable[[int], float], size: int, dtype: Any, beta1: float = ADAM_BETA1,
                 beta2: float = ADAM_BETA2, eps: float = ADAM_EPS, pool: Pool = SERIAL):
        super().__init__(lr, size, dtype, pool)
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.m = np.zeros(size, self.dtype)
        self.v = np.zeros(size, self.dtype)
        self._alpha = self.dtype.type(0)

    def _prepare(self) -> None:
        # Keras computes the step size in the variable's dtype: lr sqrt(1 - b2^t) / (1 - b1^t).
        t = self.dtype.type
        k = t(self.iterations + 1)
        b1_power, b2_power = np.power(t(self.beta1), k), np.power(t(self.beta2), k)
        self._alpha = t(self.lr(self.iterations)) * np.sqrt(t(1) - b2_power) / (t(1) - b1_power)

    def _update(self, piece: slice, w: np.ndarray, g: np.ndarray, lr: float) -> None:
        t = self.dtype.type
        m, v = self.m[piece], self.v[piece]
        tmp = g - m
        tmp *= t(1 - self.beta1)
        m += tmp  # m += (1 - b1)(g - m)
        np.square(g, out=tmp)
        tmp -= v
        tmp *= t(1 - self.beta2)
        v += tmp  # v += (1 - b2)(g^2 - v)
        denom = np.sqrt(v)
        denom += t(self.eps)
        np.multiply(m, self._alpha, out=tmp)
        tmp /= denom
        w -= tmp  # w -= a m / (sqrt(v) + eps), in Keras' order of operations


def make(name: str, lr: float | Callable[[int], float], size: int, dtype: Any, momentum: float = 0.9,
         pool: Pool = SERIAL) -> Optimizer:
    """An optimizer by name: ``sgd`` (momentum ``momentum``; 0 is plain SGD),
    ``sgd-nesterov`` or ``adam`` (Keras' defaults but the learning rate)."""
    schedule = lr if callable(lr) else constant(float(lr))
    if name == "adam":
        return Adam(schedule, size, dtype, pool=pool)
    if name in ("sgd", "sgd-nesterov"):
        return SGD(schedule, size, dtype, momentum=momentum, nesterov=name == "sgd-nesterov", pool=pool)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(NAMES)}")


__all__ = ["Adam", "NAMES", "Optimizer", "SCHEDULES", "SGD", "constant", "cosine", "make"]

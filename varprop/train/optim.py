"""Optimizers with Keras' exact update rules (keras/src/optimizers/sgd.py and
adam.py), on the model's flat parameter vector.

- SGD(lr, momentum mu, nesterov): ``v <- mu v - lr g``, then ``w <- w + v``,
  or with Nesterov ``w <- w + mu v - lr g``; with mu = 0, ``w <- w - lr g``.
- Adam(lr, beta1 0.9, beta2 0.999, epsilon 1e-7): ``m += (1 - b1)(g - m)``,
  ``v += (1 - b2)(g^2 - v)``, ``a = lr sqrt(1 - b2^t) / (1 - b1^t)`` at step
  t = 1, 2, ..., ``w -= a m / (sqrt(v) + eps)``: epsilon outside the bias
  correction (PyTorch puts it inside).

Updates are element by element, so the pieces they run in never change a number.

>>> import numpy as np
>>> w, g = np.array([1.0, -2.0]), np.array([0.5, 0.5])
>>> opt = make("sgd-nesterov", lr=0.1, momentum=0.9, size=2, dtype=np.float64)
>>> opt.step(w, g); w.round(6).tolist()  # v = -0.05; w += 0.9 v - 0.1 g = -0.095
[0.905, -2.095]
"""

from __future__ import annotations

import math
import threading
from typing import Any, Callable

import numpy as np

from ..options import LR_SCHEDULES, OPTIMIZERS

NAMES, SCHEDULES = OPTIMIZERS, LR_SCHEDULES  # the option table's choices
ADAM_BETA1, ADAM_BETA2, ADAM_EPS = 0.9, 0.999, 1e-7
PIECE = 1 << 16  # elements updated together: the piece's five arrays stay in a core's L2 (1 << 18 was 1.5x slower)


def constant(lr: float) -> Callable[[int], float]:
    return lambda step: lr


def cosine(lr: float, total_steps: int) -> Callable[[int], float]:
    """Keras' ``CosineDecay(lr, decay_steps=total_steps)`` (alpha 0, no warm-up):
    ``lr (1 + cos(pi min(step, total) / total)) / 2`` at optimizer step ``step`` (0-based)."""
    return lambda step: lr * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


class Optimizer:
    """Base: ``step(w, g)`` updates ``w`` in place; ``iterations`` counts steps
    (Keras' ``optimizer.iterations``, which a schedule reads before the step).
    A step may also come as :meth:`begin` and then :meth:`update` on pieces
    of the vector, from any threads: each element's update is the same."""

    def __init__(self, lr: Callable[[int], float], size: int, dtype: Any):
        self.lr, self.dtype, self.size = lr, np.dtype(dtype), size
        self.iterations = 0
        self._lr = 0.0
        # Pieces are updated into preallocated scratch, one pair per thread (fresh megabyte temporaries cost
        # page faults on every step).
        self._local = threading.local()

    def step(self, w: np.ndarray, g: np.ndarray) -> None:
        self.begin()
        self.update(w, g, slice(0, self.size))

    def begin(self) -> None:
        """Start a step: its learning rate and per-step constants, before ``iterations`` moves."""
        self._lr = self.lr(self.iterations)
        self._prepare()
        self.iterations += 1

    def update(self, w: np.ndarray, g: np.ndarray, piece: slice) -> None:
        """This step's update of ``w[piece]`` from ``g[piece]``."""
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            n = min(PIECE, self.size)
            scratch = self._local.scratch = (np.empty(n, self.dtype), np.empty(n, self.dtype))
        s1, s2 = scratch
        for start in range(piece.start, piece.stop, PIECE):
            part = slice(start, min(start + PIECE, piece.stop))
            n = part.stop - part.start
            self._update(part, w[part], g[part], self._lr, s1[:n], s2[:n])

    def _prepare(self) -> None:
        """Per-step constants, before ``iterations`` moves."""

    def _update(self, piece: slice, w: np.ndarray, g: np.ndarray, lr: float, s1: np.ndarray, s2: np.ndarray
                ) -> None:
        raise NotImplementedError


class SGD(Optimizer):
    def __init__(self, lr: Callable[[int], float], size: int, dtype: Any, momentum: float = 0.0,
                 nesterov: bool = False):
        super().__init__(lr, size, dtype)
        self.momentum, self.nesterov = momentum, nesterov
        self.velocity = np.zeros(size, self.dtype) if momentum else None

    def _update(self, piece: slice, w: np.ndarray, g: np.ndarray, lr: float, s1: np.ndarray, s2: np.ndarray
                ) -> None:
        t = self.dtype.type
        np.multiply(g, t(lr), out=s1)  # lr g
        if self.velocity is None:
            w -= s1
            return
        v = self.velocity[piece]
        v *= t(self.momentum)
        v -= s1  # v = mu v - lr g
        if self.nesterov:
            np.multiply(v, t(self.momentum), out=s2)
            s2 -= s1
            w += s2  # w + (mu v - lr g), in Keras' order
        else:
            w += v


class Adam(Optimizer):
    def __init__(self, lr: Callable[[int], float], size: int, dtype: Any, beta1: float = ADAM_BETA1,
                 beta2: float = ADAM_BETA2, eps: float = ADAM_EPS):
        super().__init__(lr, size, dtype)
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

    def _update(self, piece: slice, w: np.ndarray, g: np.ndarray, lr: float, s1: np.ndarray, s2: np.ndarray
                ) -> None:
        t = self.dtype.type
        m, v = self.m[piece], self.v[piece]
        np.subtract(g, m, out=s1)
        s1 *= t(1 - self.beta1)
        m += s1  # m += (1 - b1)(g - m)
        np.square(g, out=s1)
        s1 -= v
        s1 *= t(1 - self.beta2)
        v += s1  # v += (1 - b2)(g^2 - v)
        np.sqrt(v, out=s2)
        s2 += t(self.eps)
        np.multiply(m, self._alpha, out=s1)
        s1 /= s2
        w -= s1  # w -= a m / (sqrt(v) + eps), in Keras' order of operations


def make(name: str, lr: float | Callable[[int], float], size: int, dtype: Any, momentum: float = 0.9
         ) -> Optimizer:
    """An optimizer by name: ``sgd`` (momentum ``momentum``; 0 is plain SGD),
    ``sgd-nesterov`` or ``adam`` (Keras' defaults but the learning rate)."""
    schedule = lr if callable(lr) else constant(float(lr))
    if name == "adam":
        return Adam(schedule, size, dtype)
    if name in ("sgd", "sgd-nesterov"):
        return SGD(schedule, size, dtype, momentum=momentum, nesterov=name == "sgd-nesterov")
    raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(NAMES)}")


__all__ = ["Adam", "NAMES", "Optimizer", "SCHEDULES", "SGD", "constant", "cosine", "make"]

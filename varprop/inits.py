"""Init schemes: a variance rule x a distribution (x a bias rule).

Weights are returned as ``(W0, scale)`` with ``W = scale * W0``: ``W0`` holds
draws of unit-order size in the compute dtype and the engine folds ``scale``
into its log-scale, so no gain or variance, however extreme, can overflow.
Draws use only standard shapes (standard normal, U(-1, 1), a standard normal
truncated to +-2), so two schemes with the same distribution see the same
underlying numbers for the same generator (common random numbers).

Framework presets, checked against their sources:

- ``torch-default``: ``torch.nn.Linear.reset_parameters`` calls
  ``kaiming_uniform_(weight, a=sqrt(5))``: gain sqrt(2 / (1 + 5)), bound
  ``gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in)``, variance ``1 / (3 fan_in)``;
  the bias is ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.
- ``keras-default``: ``keras.layers.Dense`` uses ``glorot_uniform`` (=
  ``VarianceScaling(1.0, "fan_avg", "uniform")``, limit ``sqrt(3 / fan_avg)``)
  and ``zeros`` for the bias.
- ``truncated_normal``: Keras' ``VarianceScaling`` draws a normal truncated at
  +-2 sd and divides the target sd by 0.87962566103423978, the sd of a unit
  normal truncated to (-2, 2), so the realised variance is the target.
- ``orthogonal``: as ``torch.nn.init.orthogonal_``: QR of a Gaussian matrix
  with the signs of R's diagonal folded into Q, times ``gain``.

>>> import numpy as np
>>> w0, scale = draw_weights(resolve("he"), np.random.default_rng(0), 300, 200)
>>> round(scale ** 2 * 300, 12)
2.0
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable, Union

import numpy as np

Array = np.ndarray
UserInit = Callable[[np.random.Generator, int, int], Array]

TRUNC_SD = 0.87962566103423978  # sd of N(0, 1) truncated to (-2, 2)
DISTRIBUTIONS = ("normal", "uniform", "truncated_normal")
MODES = ("fan_in", "fan_out", "fan_avg")


@dataclass(frozen=True)
class Scheme:
    """A resolved init: ``Var W_ij = scale * gain**2 / fan(mode)``.

    ``mode=None`` means no fan division (the naive unit init). ``bias`` is
    ``"zeros"`` or ``"torch"`` (U(+-1/sqrt(fan_in))); a user ``--bias-std``
    replaces it. ``user`` holds a user callable, which then draws everything.
    """

    name: str
    distribution: str = "normal"
    mode: str | None = "fan_in"
    gain: float = 1.0
    scale: float = 1.0
    orthogonal: bool = False
    bias: str = "zeros"
    user: UserInit | None = None


PRESETS: dict[str, Scheme] = {
    "unit": Scheme(name="unit", mode=None),
    "fan_in": Scheme(name="fan_in"),
    "he": Scheme(name="he", gain=math.sqrt(2.0)),
    "xavier": Scheme(name="xavier", mode="fan_avg"),
    "orthogonal": Scheme(name="orthogonal", mode=None, orthogonal=True),
    "torch-default": Scheme(name="torch-default", distribution="uniform", gain=math.sqrt(1 / 3), bias="torch"),
    "keras-default": Scheme(name="keras-default", distribution="uniform", mode="fan_avg"),
}


def load_callable(ref: str) -> UserInit:
    """Import ``"package.module:function"``; raises ValueError with the reason."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{ref!r} is not of the form module:function")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: modules beside the user are found
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import failure is the user's to see, in one line
        raise ValueError(f"cannot import module {module_name!r} ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"module {module_name!r} has no callable {attr!r}")
    return fn


def resolve(
    init: Union[str, UserInit],
    distribution: str | None = None,
    mode: str | None = None,
    gain: float | None = None,
    scale: float = 1.0,
) -> Scheme:
    """A :class:`Scheme` from a preset name, a ``module:function`` string or a callable.

    ``distribution``, ``mode`` and ``gain`` override the preset's own when given.
    Raises ValueError for unknown names.
    """
    if callable(init):
        return Scheme(name=getattr(init, "__name__", "custom"), user=init)
    if init not in PRESETS:
        if ":" in init:
            return Scheme(name=init, user=load_callable(init))
        raise ValueError(f"unknown init {init!r}")
    base = PRESETS[init]
    return Scheme(
        name=base.name,
        distribution=distribution or base.distribution,
        mode=(mode or base.mode) if base.mode else None,
        gain=base.gain if gain is None else float(gain),
        scale=float(scale),
        orthogonal=base.orthogonal,
        bias=base.bias,
    )


def fan(mode: str | None, fan_in: int, fan_out: int) -> float:
    """The fan a variance is divided by (1 for ``mode=None``)."""
    return {None: 1.0, "fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]


def variance(s: Scheme, fan_in: int, fan_out: int) -> float:
    """The variance of one weight entry under scheme ``s`` (not for user callables).

    >>> variance(resolve("xavier"), 300, 200)
    0.004
    """
    if s.orthogonal:
        return s.scale * s.gain**2 / max(fan_in, fan_out)
    return s.scale * s.gain**2 / fan(s.mode, fan_in, fan_out)


def standard_normal(rng: np.random.Generator, shape: tuple[int, ...], dtype: type = np.float64) -> Array:
    """N(0, 1) draws; in float32 by the Box-Muller transform of the generator's raw words.

    About twice as fast as ``Generator.standard_normal`` (the ziggurat, used
    for float64, where sin and cos are no longer cheap), and exact in
    distribution but for its resolution: each 64-bit word, split into 32-bit
    halves a and b, gives the pair ``r cos(t)``, ``r sin(t)`` with
    ``r = sqrt(-2 ln u)``, ``u = (a + 1/2) / 2**32`` and ``t = 2 pi b / 2**32``.
    So r stops at sqrt(66 ln 2) = 6.76 (a larger radius has probability
    2**-33), and at the other end u is kept below 1 - 2**-24 (where float32
    would round it to 1), so r is never below 3.5e-4 (a smaller one has
    probability 2**-24): both far below any sampling error of a run.
    tests/test_inits.py checks the moments, the kurtosis, the tail mass and
    the pairs' independence. The pairs are interleaved, so the first k draws
    are the same whatever the total (common random numbers across sizes).
    NumPy's float32 log, sin and cos are vectorised per CPU: their last bits,
    like BLAS products', can differ between CPUs with different instruction
    sets, never between runs or thread counts on one machine.

    >>> z = standard_normal(np.random.default_rng(0), (100_000,), np.float32)
    >>> bool(abs(z.mean()) < 0.02 and abs(z.var() - 1) < 0.02)
    True
    """
    dtype = np.dtype(dtype)
    if dtype != np.float32:  # float64 sin and cos cost more than NumPy's ziggurat
        return rng.standard_normal(shape, dtype=dtype)
    count = math.prod(shape)
    out = np.empty(count + count % 2, dtype)
    pairs = out.reshape(-1, 2)
    # Pieces of the stream that keep every temporary in the core's cache; the
    # stream is read in order, so the numbers do not depend on the piece size.
    for start in range(0, len(pairs), _PAIRS_PER_PIECE):
        piece = pairs[start:start + _PAIRS_PER_PIECE]
        words = rng.bit_generator.random_raw(len(piece)).view(np.uint32)
        r = np.add(words[0::2], 0.5, dtype=dtype)
        r *= dtype.type(2.0**-32)
        np.minimum(r, dtype.type(1 - 2.0**-24), out=r)
        np.log(r, out=r)
        r *= dtype.type(-2.0)
        np.sqrt(r, out=r)
        angle = np.multiply(words[1::2], 2 * math.pi * 2.0**-32, dtype=dtype)
        trig = np.cos(angle)
        np.multiply(trig, r, out=piece[:, 0])
        np.multiply(np.sin(angle, out=trig), r, out=piece[:, 1])
    return out[:count].reshape(shape)


_PAIRS_PER_PIECE = 2**16


def standard_draw(distribution: str, rng: np.random.Generator, shape: tuple[int, ...], dtype: type) -> Array:
    """Standard draws: N(0, 1), U(-1, 1), or N(0, 1) truncated to +-2.

    :func:`unit_sd` gives their standard deviation, which the caller's scale
    divides out.
    """
    if distribution == "normal":
        return standard_normal(rng, shape, dtype)
    if distribution == "uniform":
        out = rng.random(shape, dtype=dtype)
        out *= 2
        out -= 1
        return out
    if distribution == "truncated_normal":
        out = standard_normal(rng, shape, dtype).ravel()
        bad = np.flatnonzero(np.abs(out) > 2)
        while bad.size:  # redraw, as Keras does; about 4.6% per round
            out[bad] = standard_normal(rng, (bad.size,), dtype)
            bad = bad[np.abs(out[bad]) > 2]
        return out.reshape(shape)
    raise ValueError(f"unknown distribution {distribution!r}")


def unit_sd(distribution: str) -> float:
    """Standard deviation of :func:`standard_draw`'s draws."""
    return {"normal": 1.0, "uniform": 1 / math.sqrt(3.0), "truncated_normal": TRUNC_SD}[distribution]


def draw_weights(s: Scheme, rng: np.random.Generator, fan_in: int, fan_out: int, dtype: type = np.float32) -> tuple[Array, float]:
    """Weights of a (fan_in x fan_out) layer as ``(W0, scale)``, ``W = scale * W0``."""
    if s.user is not None:
        w = np.asarray(s.user(rng, fan_in, fan_out))
        if w.shape != (fan_in, fan_out):
            raise ValueError(f"init {s.name!r} returned shape {w.shape}, expected ({fan_in}, {fan_out})")
        if not np.all(np.isfinite(w)):
            raise ValueError(f"init {s.name!r} returned non-finite weights")
        return w.astype(dtype), 1.0
    if s.orthogonal:
        return orthogonal(rng, fan_in, fan_out, dtype), s.gain * math.sqrt(s.scale)
    return standard_draw(s.distribution, rng, (fan_in, fan_out), dtype), weight_scale(s, fan_in, fan_out)


def weight_scale(s: Scheme, fan_in: int, fan_out: int) -> float:
    """The factor ``scale`` of a built-in, non-orthogonal scheme's ``W = scale * W0``."""
    return math.sqrt(variance(s, fan_in, fan_out)) / unit_sd(s.distribution)


def orthogonal(rng: np.random.Generator, fan_in: int, fan_out: int, dtype: type = np.float32) -> Array:
    """A (fan_in x fan_out) matrix with orthonormal columns (or rows if wider).

    Computed in float64 (QR in float32 loses orthogonality at width 1000s).
    """
    tall = fan_in >= fan_out
    a = rng.standard_normal((fan_in, fan_out) if tall else (fan_out, fan_in))
    q, r = np.linalg.qr(a)
    q *= np.sign(np.diag(r))  # Haar-distributed, as torch.nn.init.orthogonal_
    return (q if tall else q.T).astype(dtype)


def has_bias(s: Scheme, bias_std: float | None) -> bool:
    """Whether layers get a nonzero bias (``--bias-std`` beats the scheme's own)."""
    return bias_std > 0 if bias_std is not None else s.bias == "torch"


def draw_bias(s: Scheme, bias_std: float | None, rng: np.random.Generator, fan_in: int, fan_out: int) -> Array:
    """The bias vector (float64) of a layer; only for :func:`has_bias` schemes."""
    if bias_std is not None:
        return rng.standard_normal(fan_out) * bias_std
    bound = 1 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, fan_out)

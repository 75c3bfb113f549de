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

Names users of PyTorch, Keras and JAX type are accepted, in any case and with
``_``, ``-`` or nothing between words (``kaiming_uniform``, ``HeNormal``,
``glorot-uniform``); each resolves to the canonical name that draws the same
variance from the same distribution as that framework's initializer (checked
against ``torch/nn/init.py``, ``keras/src/initializers/random_initializers.py``
and ``jax/_src/nn/initializers.py``). The canonical name is what labels,
config.json and the report show. A name that says its distribution fixes it:
``--init he_uniform --distribution normal`` is refused, not silently changed.

Canonical name: its weight variance and distribution; the names that resolve to it (and where
they come from):

- ``he``: 2/fan_in, normal; ``kaiming``, ``kaiming_normal`` (torch ``kaiming_normal_``: a=0,
  mode fan_in, so gain sqrt(2)).
- ``he_uniform``: 2/fan_in, uniform; ``kaiming_uniform`` (torch ``kaiming_uniform_``), ``he_uniform``
  (Keras ``HeUniform``; JAX ``he_uniform`` = ``kaiming_uniform``).
- ``he_truncated_normal``: 2/fan_in, truncated normal; ``he_normal`` (Keras ``HeNormal``, JAX ``he_normal``).
- ``xavier``: 2/(fan_in + fan_out), normal; ``glorot``, ``xavier_normal`` (torch ``xavier_normal_``).
- ``xavier_uniform``: 2/(fan_in + fan_out), uniform; ``xavier_uniform`` (torch ``xavier_uniform_``),
  ``glorot_uniform`` (Keras ``GlorotUniform``, JAX ``glorot_uniform`` = ``xavier_uniform``).
- ``xavier_truncated_normal``: 2/(fan_in + fan_out), truncated normal; ``glorot_normal`` (Keras
  ``GlorotNormal``, JAX ``glorot_normal``).
- ``fan_in``: 1/fan_in, normal; ``lecun``.
- ``fan_in_uniform``: 1/fan_in, uniform; ``lecun_uniform`` (Keras ``LecunUniform``, JAX).
- ``fan_in_truncated_normal``: 1/fan_in, truncated normal; ``lecun_normal`` (Keras ``LecunNormal``, JAX).
- ``variance_scaling``: scale/fan(mode), truncated normal: Keras ``VarianceScaling()``'s defaults
  (scale 1, mode fan_in, truncated normal); ``--scale``, ``--mode`` and ``--distribution`` are its
  arguments (JAX's ``variance_scaling`` has no defaults: give all three).
- ``orthogonal``: gain^2/max(fan_in, fan_out), exactly orthogonal; ``orthogonal_initializer``
  (Keras ``Orthogonal``, torch ``orthogonal_``, JAX ``orthogonal``).
- ``torch-default``: 1/(3 fan_in), uniform, with its bias; ``torch``, ``pytorch``, ``pytorch_default``.
- ``keras-default``: 2/(fan_in + fan_out), uniform, zero bias; ``keras``, ``keras_default``.

Two framework names disagree across frameworks, and the PyTorch meaning is
taken: JAX's ``kaiming_normal`` and ``xavier_normal`` are its ``he_normal``
and ``glorot_normal`` (truncated normals), PyTorch's draw an untruncated
normal. JAX users: type ``he_normal`` or ``glorot_normal``. Keras'
``VarianceScaling(distribution="normal")`` also means a truncated normal;
varprop's ``--distribution normal`` never does. The variance is the same
either way; the truncated normal's tails stop at 2 sd (of the pre-truncation
normal), which changes fourth moments and the finite-width spread, never
the mean-field theory.

>>> import numpy as np
>>> w0, scale = draw_weights(resolve("he"), np.random.default_rng(0), 300, 200)
>>> round(scale ** 2 * 300, 12)
2.0
"""

from __future__ import annotations

import difflib
import importlib
import math
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Union

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


# canonical name -> (preset, distribution, whether the name fixes it). A
# preset's own distribution is None here: --distribution may change it.
CANONICAL: dict[str, tuple[str, str | None, bool]] = {
    **{name: (name, None, False) for name in PRESETS},
    "he_uniform": ("he", "uniform", True),
    "he_truncated_normal": ("he", "truncated_normal", True),
    "xavier_uniform": ("xavier", "uniform", True),
    "xavier_truncated_normal": ("xavier", "truncated_normal", True),
    "fan_in_uniform": ("fan_in", "uniform", True),
    "fan_in_truncated_normal": ("fan_in", "truncated_normal", True),
    "variance_scaling": ("fan_in", "truncated_normal", False),  # Keras' defaults; its arguments are options
}

# Framework names -> canonical name (see the module docstring for the sources).
ALIASES: dict[str, str] = {
    "kaiming": "he", "kaiming_normal": "he", "kaiming_uniform": "he_uniform", "he_normal": "he_truncated_normal",
    "glorot": "xavier", "xavier_normal": "xavier", "glorot_uniform": "xavier_uniform",
    "glorot_normal": "xavier_truncated_normal",
    "lecun": "fan_in", "lecun_uniform": "fan_in_uniform", "lecun_normal": "fan_in_truncated_normal",
    "orthogonal_initializer": "orthogonal",
    "torch": "torch-default", "pytorch": "torch-default", "pytorch-default": "torch-default",
    "keras": "keras-default",
}


def name_key(name: str) -> str:
    """How names compare: case, ``_``, ``-`` and spaces do not matter."""
    return "".join(ch for ch in name.lower() if ch not in "_- ")


# Aliases of a normal-drawing preset whose name says "normal": no other distribution.
_SAYS_NORMAL = {name_key(n) for n in ("kaiming_normal", "xavier_normal")}
_BY_KEY: dict[str, str] = {name_key(n): ALIASES.get(n, n) for n in (*CANONICAL, *ALIASES)}
_SPELLING: dict[str, str] = {name_key(n): n for n in (*CANONICAL, *ALIASES)}


def suggestion(name: Any, spellings: dict[str, str] | None = None) -> str:
    """`` (did you mean X?)`` for the name closest to ``name`` among
    ``spellings`` (:func:`name_key` -> how it is written; default: the init
    names), compared as :func:`name_key` compares, or ``""``."""
    spellings = _SPELLING if spellings is None else spellings
    close = difflib.get_close_matches(name_key(str(name)), list(spellings), n=1)
    return f" (did you mean {spellings[close[0]]}?)" if close else ""


def canonical_name(name: str) -> str:
    """The canonical name of a preset or framework name (any case).

    >>> canonical_name("Kaiming_Uniform"), canonical_name("HeNormal"), canonical_name("glorot")
    ('he_uniform', 'he_truncated_normal', 'xavier')
    """
    found = _BY_KEY.get(name_key(name))
    if found is None:
        raise ValueError(f"unknown init {name!r}{suggestion(name)}")
    return found


def canonical(name: str, distribution: str | None = None) -> tuple[str, str | None]:
    """``(preset, distribution)`` that ``name`` draws from, given an explicit
    ``distribution`` (None: the name's own). A name that says its
    distribution refuses another (ValueError).

    >>> canonical("kaiming_uniform"), canonical("he"), canonical("variance_scaling", "uniform")
    (('he', 'uniform'), ('he', None), ('fan_in', 'uniform'))
    """
    preset, own, fixed = CANONICAL[canonical_name(name)]
    says = own if fixed else "normal" if name_key(name) in _SAYS_NORMAL else None
    if says is not None and distribution is not None and distribution != says:
        raise ValueError(f"{distribution} contradicts --init {name}, which draws from a {says.replace('_', ' ')} "
                         f"distribution; for that variance with a {distribution.replace('_', ' ')} distribution "
                         f"use --init {preset} --distribution {distribution}")
    return preset, distribution or own


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
    """A :class:`Scheme` from a preset or framework name (:func:`canonical`), a
    ``module:function`` string or a callable.

    ``distribution``, ``mode`` and ``gain`` override the preset's own when given.
    Raises ValueError for unknown names.
    """
    if callable(init):
        return Scheme(name=getattr(init, "__name__", "custom"), user=init)
    if not isinstance(init, str):
        raise ValueError(f"expected a scheme name, module:function or a callable, got {init!r}")
    if ":" in init:
        return Scheme(name=init, user=load_callable(init))
    preset, distribution = canonical(init, distribution)
    base = PRESETS[preset]
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
    for start in range(0, len(pairs), PAIRS_PER_PIECE):
        piece = pairs[start:start + PAIRS_PER_PIECE]
        _box_muller(rng.bit_generator.random_raw(len(piece)), piece)
    return out[:count].reshape(shape)


PAIRS_PER_PIECE = 2**16


_WORK = threading.local()


def _box_muller(words: np.ndarray, pairs: np.ndarray) -> None:
    """:func:`standard_normal`'s pairs (float32, pairs x 2) from as many 64-bit words.

    Its three work arrays are this thread's own, reused: fresh ones (256 KiB
    each for a whole piece) cost their page faults, 450 against 280 us a
    piece. NumPy's float32 kernels give the same bits wherever they lie
    (checked at each 4-byte offset within a 64-byte line), so the numbers
    are those of fresh arrays."""
    n = len(pairs)
    work = getattr(_WORK, "arrays", None)
    if work is None or work.shape[1] < n:
        work = _WORK.arrays = np.empty((3, max(n, PAIRS_PER_PIECE)), np.float32)
    r, angle, trig = work[0, :n], work[1, :n], work[2, :n]
    halves = words.view(np.uint32)
    f32 = np.float32
    np.add(halves[0::2], 0.5, dtype=f32, out=r)
    r *= f32(2.0**-32)
    np.minimum(r, f32(1 - 2.0**-24), out=r)
    np.log(r, out=r)
    r *= f32(-2.0)
    np.sqrt(r, out=r)
    np.multiply(halves[1::2], 2 * math.pi * 2.0**-32, dtype=f32, out=angle)
    np.cos(angle, out=trig)
    np.multiply(trig, r, out=pairs[:, 0])
    np.multiply(np.sin(angle, out=trig), r, out=pairs[:, 1])


def standard_normal_tasks(rng: np.random.Generator, out: np.ndarray) -> list[Callable[[], None]]:
    """Tasks that fill ``out`` (a contiguous float32 array of an even size) with
    ``standard_normal(rng, out.shape, np.float32)``, one piece of the stream each: a piece reads the
    generator's words from its own start on (a copy of the generator advanced there), so the tasks give
    the same numbers in any order, on any threads. A weight matrix's draw then spreads over threads
    beside a layer's products instead of making one of them wait (``rng`` itself is used by the first).

    >>> a = np.empty(300_000, np.float32)
    >>> for task in standard_normal_tasks(np.random.default_rng(1), a)[::-1]:
    ...     task()
    >>> bool((a == standard_normal(np.random.default_rng(1), (300_000,), np.float32)).all())
    True
    """
    pairs = out.reshape(-1, 2)
    bits = rng.bit_generator
    state = bits.state

    def piece(start: int) -> Callable[[], None]:
        def fill() -> None:
            own = bits
            if start:
                own = type(bits)()
                own.state = state
                own.advance(start)
            chunk = pairs[start:start + PAIRS_PER_PIECE]
            _box_muller(own.random_raw(len(chunk)), chunk)
        return fill
    return [piece(start) for start in range(0, len(pairs), PAIRS_PER_PIECE)]


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


def draw_weights(s: Scheme, rng: np.random.Generator, fan_in: int, fan_out: int,
                 dtype: type = np.float32) -> tuple[Array, float]:
    """Weights of a (fan_in x fan_out) layer as ``(W0, scale)``, ``W = scale * W0``."""
    if s.user is not None:
        try:
            w = np.asarray(s.user(rng, fan_in, fan_out))
        except Exception as exc:  # the user's own error, in one line with its type (a ValueError reads alike)
            raise ValueError(f"{s.name} raised {type(exc).__name__}: {exc}") from exc
        if w.shape != (fan_in, fan_out):
            raise ValueError(f"init {s.name!r} returned shape {w.shape}, expected ({fan_in}, {fan_out})")
        if not np.issubdtype(w.dtype, np.floating) and not np.issubdtype(w.dtype, np.integer):
            raise ValueError(f"init {s.name!r} returned {w.dtype} weights; expected real numbers")
        if not np.all(np.isfinite(w)):
            raise ValueError(f"init {s.name!r} returned non-finite weights")
        return power_of_two_scaled(w.astype(np.float64, copy=False), dtype)
    if s.orthogonal:
        return orthogonal(rng, fan_in, fan_out, dtype), s.gain * math.sqrt(s.scale)
    return standard_draw(s.distribution, rng, (fan_in, fan_out), dtype), weight_scale(s, fan_in, fan_out)


def power_of_two_scaled(x: Array, dtype: type) -> tuple[Array, float]:
    """``(x0, scale)`` with ``x = scale * x0`` and ``x0`` in ``dtype``: ``x``
    itself where its largest entry lies within 2^+-60, else divided by a power
    of two (exact) that brings it near 1, so 1e300 (or 1e-300) survives the
    cast to float32 rather than becoming inf (or 0).

    >>> x0, scale = power_of_two_scaled(np.array([1e300, -3e299]), np.float32)
    >>> scale == 2.0 ** 996, abs(float(x0[0]) * scale / 1e300 - 1) < 2.0 ** -24
    (True, True)
    """
    peak = float(np.max(np.abs(x), initial=0.0))
    if peak == 0 or 2.0**-60 <= peak <= 2.0**60:
        return x.astype(dtype), 1.0
    exponent = math.frexp(peak)[1] - 1  # peak / 2^exponent in [1, 2); 2^exponent itself finite up to 1e308
    return np.ldexp(x, -exponent).astype(dtype), math.ldexp(1.0, exponent)


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

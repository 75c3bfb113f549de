"""Monte-Carlo forward propagation with streaming per-layer statistics.

Values are carried as ``h = exp(log_s) * u`` with ``u`` renormalised to unit
RMS after every step, so nothing overflows at any depth (DESIGN.md). Only one
layer is held in memory. Every random draw comes from its own generator keyed
by (seed; replicate, layer, role), so results do not depend on the order of
work or the thread count, and replicate r of every configuration sees the same
underlying draws (common random numbers).

>>> from varprop.spec import NetworkSpec
>>> df = simulate(NetworkSpec.square(layers=3, width=50, init="fan_in"), samples=200, seed=1)
>>> list(df["layer"])
[0, 1, 2, 3]
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from . import activations, inits
from .spec import Config, NetworkSpec, RunSpec, SpecError, expand, load_input, to_options
from .stats import SATURATION, empty_stats, side_stats

ROLES = {"inputs": 0, "weights": 1, "bias": 2, "upstream": 3}
Progress = Callable[[int], None]


def generator(seed: int, replicate: int, layer: int, role: str) -> np.random.Generator:
    """The generator of one (replicate, layer, role) node of the seed's tree."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(replicate, layer, ROLES[role]))))


def make_inputs(spec: RunSpec, replicate: int) -> np.ndarray:
    """The N x n_0 inputs of one replicate, in the compute dtype."""
    dtype = np.dtype(spec.dtype)
    n0 = spec.network.widths[0]
    if spec.input_file is not None:
        return load_input(spec.input_file, n0).astype(dtype)
    rng = generator(spec.seed, replicate, 0, "inputs")
    if spec.input == "gaussian":
        x = rng.standard_normal((spec.samples, n0), dtype=dtype)
    else:
        x = inits.standard_draw("uniform", rng, (spec.samples, n0), dtype) * dtype.type(math.sqrt(3.0))
    x *= dtype.type(spec.input_std)
    return x


def _renorm(u: np.ndarray, log_s: float) -> tuple[np.ndarray, float]:
    """Rescale u in place to unit RMS, moving the factor into log_s."""
    ms = float(np.einsum("ij,ij->", u, u, dtype=np.float64)) / u.size
    if ms > 0 and math.isfinite(ms):
        r = math.sqrt(ms)
        u *= u.dtype.type(1 / r)
        log_s += math.log(r)
    return u, log_s


def _add_bias(z: np.ndarray, log_z: float, b: np.ndarray) -> tuple[np.ndarray, float]:
    """``exp(log_z) * z + b`` as a (u, log_s) pair, whichever term dominates."""
    rms_b = math.sqrt(float(np.mean(b * b)))
    if rms_b == 0:
        return z, log_z
    top = max(log_z, math.log(rms_b))
    if log_z < top:
        z *= z.dtype.type(math.exp(log_z - top))
    z += (b * math.exp(-top)).astype(z.dtype)
    return z, top


def _saturated(act: activations.Activation, z: np.ndarray, log_z: float) -> float:
    if act.name == "linear":
        return 0.0
    return float(np.mean(np.abs(activations.dphi_scaled(act, z, log_z)) < SATURATION))


def run_replicate(spec: RunSpec, replicate: int, progress: Progress | None = None) -> list[dict[str, Any]]:
    """Forward pass of one network; one dict of statistics per layer 0..L."""
    net = spec.network
    scheme = net.init.resolve()
    dtype = np.dtype(spec.dtype).type
    with_bias = inits.has_bias(scheme, net.bias_std)
    u, log_h = _renorm(make_inputs(spec, replicate), 0.0)
    rows = [{"replicate": replicate, "layer": 0, "width": net.widths[0], "fan_in": pd.NA, "fan_out": pd.NA,
             **_prefix("pre", empty_stats()), **_prefix("post", side_stats(u, log_h))}]
    for layer in range(1, net.depth + 1):
        n_in, n_out = net.widths[layer - 1], net.widths[layer]
        try:
            w0, w_scale = inits.draw_weights(scheme, generator(spec.seed, replicate, layer, "weights"), n_in, n_out, dtype)
        except ValueError as exc:  # a user init returned something unusable
            raise SpecError("init", str(exc)) from None
        z = u @ w0
        del u
        log_z = log_h + math.log(w_scale)
        if with_bias:
            bias = inits.draw_bias(scheme, net.bias_std, generator(spec.seed, replicate, layer, "bias"), n_in, n_out)
            z, log_z = _add_bias(z, log_z, bias)
        z, log_z = _renorm(z, log_z)
        act = activations.get(net.activation_at(layer), net.leaky_slope)
        sat = _saturated(act, z, log_z)
        pre = side_stats(z, log_z, sat)
        u, log_h = _renorm(*activations.apply_scaled(act, z, log_z))
        del z
        rows.append({"replicate": replicate, "layer": layer, "width": n_out, "fan_in": n_in, "fan_out": n_out,
                     **_prefix("pre", pre), **_prefix("post", side_stats(u, log_h, sat))})
        if progress is not None:
            progress(1)
    return rows


def _prefix(side: str, stats: Mapping[str, float]) -> dict[str, float]:
    return {f"{side}_{k}": v for k, v in stats.items()}


def configs_for(spec: RunSpec | NetworkSpec | Sequence[Config], vary: Mapping[str, Iterable[Any]] | None = None,
                **options: Any) -> list[Config]:
    """The configurations a :func:`simulate` call runs (see there)."""
    if isinstance(spec, (list, tuple)):
        return list(spec)
    if isinstance(spec, NetworkSpec):
        spec = RunSpec(spec)
    changes = {**options, **{k: list(v) for k, v in (vary or {}).items()}}
    opts = to_options(spec)
    if {"layers", "width"} & set(changes):
        opts.pop("widths")
    if "input_file" in changes:
        opts.pop("samples", None)
    return expand({**opts, **changes})


def simulate(spec: RunSpec | NetworkSpec | Sequence[Config], *, vary: Mapping[str, Iterable[Any]] | None = None,
             progress: Progress | None = None, **options: Any) -> pd.DataFrame:
    """Run every configuration; one row per (config, replicate, layer).

    ``options`` are flat run options (``samples=``, ``replicates=``, ``seed=``,
    any option of :data:`varprop.spec.OPTIONS`) applied to ``spec``; ``vary``
    maps option names to lists of values, and every combination is run.
    ``progress(k)`` is called as layers complete.

    >>> from varprop.spec import NetworkSpec
    >>> df = simulate(NetworkSpec.square(2, 20), vary={"init": ["unit", "fan_in"]}, samples=50)
    >>> sorted(set(df["config"]))
    ['fan_in', 'unit']
    """
    configs = configs_for(spec, vary, **options)
    start = time.perf_counter()
    frames = []
    for c in configs:
        # Multi-threaded BLAS splits products differently for each thread
        # count, which changes the last bits; one thread keeps runs identical.
        with threadpool_limits(1, user_api="blas"):
            rows = [r for rep in range(c.spec.replicates) for r in run_replicate(c.spec, rep, progress)]
        frame = pd.DataFrame(rows)
        for key, value in reversed(list(c.varied.items())):
            frame.insert(0, key, value if isinstance(value, (str, int, float)) else str(value))
        frame.insert(0, "config", c.label)
        frames.append(frame)
    df = pd.concat(frames, ignore_index=True)
    df["fan_in"] = df["fan_in"].astype("Int64")
    df["fan_out"] = df["fan_out"].astype("Int64")
    df.attrs["configs"] = configs
    df.attrs["elapsed_s"] = time.perf_counter() - start
    return df


def total_steps(configs: Sequence[Config]) -> int:
    """How many layer steps :func:`simulate` reports to ``progress``."""
    return sum(c.spec.replicates * c.spec.network.depth for c in configs)

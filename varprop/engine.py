"""Monte-Carlo forward and backward propagation with streaming per-layer statistics.

Values are carried as ``h = exp(log_s) * u`` with ``u`` renormalised to unit
RMS after every step, so nothing overflows at any depth (DESIGN.md); the
backward pass carries gradients the same way. The forward pass holds one
layer at a time. The backward pass needs each layer's input and activation
derivative: it keeps them for every layer when that fits in ``max_memory``,
else keeps only every k-th layer's output (k ~ sqrt(L)) and recomputes each
segment, bit for bit, on the way down; the weights are kept too when
everything fits, else redrawn from their seeds. Every random draw comes from
its own generator keyed by (seed; replicate, layer, role[, block]), and work
is split into blocks fixed by the shapes (parallel.py), so results do not
depend on the order of work or the thread count, and replicate r of every
configuration sees the same underlying draws (common random numbers).

>>> from varprop.spec import NetworkSpec
>>> df = simulate(NetworkSpec.square(layers=3, width=50, init="fan_in"), samples=200, seed=1)
>>> list(df["layer"])
[0, 1, 2, 3]
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from . import activations, batchnorm, inits, theory
from .spec import Config, NetworkSpec, RunSpec, SpecError, expand, load_input, parse_threads, to_options
from .parallel import SERIAL, Pool, row_chunks
from .stats import SATURATION, STATS, empty_stats, side_stats

ROLES = {"inputs": 0, "weights": 1, "bias": 2, "upstream": 3}
# Histograms of h / rms(h) at the first, middle and last layer of replicate 0.
HIST_EDGES = np.linspace(-4.0, 4.0, 81)
Progress = Callable[[int], None]


def generator(seed: int, replicate: int, layer: int, role: str, block: int | None = None) -> np.random.Generator:
    """The generator of one (replicate, layer, role[, block]) node of the seed's tree."""
    key = (replicate, layer, ROLES[role]) + (() if block is None else (block,))
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


def make_inputs(spec: RunSpec, replicate: int) -> tuple[np.ndarray, float]:
    """The N x n_0 inputs of one replicate as ``(u, log_s)``, u in the compute dtype."""
    dtype = np.dtype(spec.dtype)
    n0 = spec.network.widths[0]
    if spec.input_file is not None:
        x = load_input(spec.input_file, n0).astype(np.float64)
        return _narrow(x, 0.0, dtype.type)
    rng = generator(spec.seed, replicate, 0, "inputs")
    if spec.input == "gaussian":
        x = inits.standard_normal(rng, (spec.samples, n0), dtype)
        return x, math.log(spec.input_std)
    x = inits.standard_draw("uniform", rng, (spec.samples, n0), dtype)
    return x, math.log(spec.input_std * math.sqrt(3.0))


def _sum_squares(x: np.ndarray) -> float:
    """Sum of squares of ``x`` in x's own dtype, or in float64 where that
    overflows or underflows. einsum, not BLAS: BLAS splits a dot product
    across its threads, which changes the last bits."""
    flat = x.reshape(-1)
    total = float(np.einsum("i,i->", flat, flat))
    if total == 0 or not math.isfinite(total):
        total = float(np.einsum("i,i->", flat, flat, dtype=np.float64))
    return total


def upstream(spec: RunSpec, replicate: int) -> np.ndarray:
    """The N(0, 1) gradient the backward pass starts from: the output's
    gradient of the objective sum(upstream * h_L)."""
    rng = generator(spec.seed, replicate, spec.network.depth, "upstream")
    return inits.standard_normal(rng, (spec.samples, spec.network.widths[-1]), np.dtype(spec.dtype).type)


def _renorm(u: np.ndarray, log_s: float, pool: Pool = SERIAL) -> tuple[np.ndarray, float]:
    """Rescale u in place to unit RMS, moving the factor into log_s.

    The factor only moves between u and log_s, so its own rounding is
    harmless: a dot product in u's dtype is accurate enough.
    """
    chunks = row_chunks(u.shape[0], u.size // max(u.shape[0], 1))
    ms = math.fsum(pool.map(lambda rows: _sum_squares(u[rows]), chunks)) / u.size
    if ms > 0 and math.isfinite(ms):
        f = u.dtype.type(1 / math.sqrt(ms))
        if not math.isfinite(f):  # all entries subnormal: scale through float64
            u = (u.astype(np.float64) / math.sqrt(ms)).astype(u.dtype)
            return u, log_s + 0.5 * math.log(ms)
        pool.map(lambda rows: np.multiply(u[rows], f, out=u[rows]), chunks)
        log_s -= math.log(float(f))  # the factor applied, rounding included
    return u, log_s


def _matmul(a: np.ndarray, b: np.ndarray, pool: Pool) -> np.ndarray:
    """``a @ b`` computed in fixed blocks of a's rows."""
    out = np.empty((a.shape[0], b.shape[1]), np.result_type(a, b))
    pool.map(lambda rows: np.matmul(a[rows], b, out=out[rows]), row_chunks(a.shape[0], b.shape[1]))
    return out


def _narrow(v: np.ndarray, log_s: float, dtype: type, pool: Pool = SERIAL) -> tuple[np.ndarray, float]:
    """A float64 pair renormalised in float64 and only then cast to ``dtype``,
    so entries far below the largest keep their value rather than flushing."""
    v, log_s = _renorm(v, log_s, pool)
    return v.astype(dtype, copy=False), log_s


def _add_bias(z: np.ndarray, log_z: float, b: np.ndarray) -> tuple[np.ndarray, float]:
    """``exp(log_z) * z + b`` as a (u, log_s) pair, whichever term dominates."""
    peak = float(np.max(np.abs(b)))
    if peak == 0:
        return z, log_z
    rms_b = peak * math.sqrt(float(np.mean((b / peak) ** 2)))
    top = max(log_z, math.log(rms_b))
    if log_z < top:
        z *= z.dtype.type(math.exp(log_z - top))
    z += (b * math.exp(-top)).astype(z.dtype)
    return z, top


def _prefix(side: str, stats: Mapping[str, float]) -> dict[str, float]:
    return {f"{side}_{k}": v for k, v in stats.items()}


@dataclass
class _Tape:
    """One layer's record for the backward pass."""

    u_in: np.ndarray  # the layer's input h_{l-1} = exp(log_in) * u_in
    log_in: float
    dphi: np.ndarray | None  # phi' at the activation's input (bool for relu-type, None for linear)
    bn: batchnorm.Cache | None


class _Network:
    """A RunSpec resolved for one replicate: draws weights, steps layers."""

    def __init__(self, spec: RunSpec, replicate: int, pool: Pool = SERIAL, keep_weights: bool = False):
        self.spec, self.net, self.rep, self.pool = spec, spec.network, replicate, pool
        # Weights kept from the forward pass for the backward one, when they fit.
        self.kept: dict[int, tuple[np.ndarray, float]] | None = {} if keep_weights else None
        self.scheme = spec.network.init.resolve()
        self.dtype = np.dtype(spec.dtype).type
        self.with_bias = inits.has_bias(self.scheme, self.net.bias_std)
        self.acts = [None] + [activations.get(self.net.activation_at(l), self.net.leaky_slope)
                              for l in range(1, self.net.depth + 1)]

    def weights(self, layer: int) -> tuple[np.ndarray, float]:
        if self.kept is not None and layer in self.kept:
            return self.kept.pop(layer)
        w = self._draw_weights(layer)
        if self.kept is not None:
            self.kept[layer] = w
        return w

    def _draw_weights(self, layer: int) -> tuple[np.ndarray, float]:
        n_in, n_out = self.net.widths[layer - 1], self.net.widths[layer]
        s = self.scheme
        if s.user is None and not s.orthogonal:
            # Fixed blocks of rows, each from its own node of the seed tree:
            # drawn in parallel, the same numbers on any number of threads.
            w0 = np.empty((n_in, n_out), self.dtype)

            def fill(block: tuple[int, slice]) -> None:
                rng = generator(self.spec.seed, self.rep, layer, "weights", block[0])
                rows = block[1]
                w0[rows] = inits.standard_draw(s.distribution, rng, (rows.stop - rows.start, n_out), self.dtype)
            self.pool.map(fill, enumerate(row_chunks(n_in, n_out)))
            return w0, inits.weight_scale(s, n_in, n_out)
        try:
            return inits.draw_weights(self.scheme, generator(self.spec.seed, self.rep, layer, "weights"), n_in, n_out,
                                      self.dtype)
        except ValueError as exc:  # a user init returned something unusable
            raise SpecError("init", str(exc)) from None
        except Exception as exc:  # or failed: the user's to see, in one line
            raise SpecError("init", f"{self.scheme.name} raised {type(exc).__name__}: {exc}") from None

    def _bn(self, u: np.ndarray, log_s: float) -> tuple[np.ndarray, float, batchnorm.Cache]:
        y, log_y, cache = batchnorm.forward(u, log_s, self.spec.batch, self.net.bn_eps)
        y, log_y = _renorm(y, log_y, self.pool)
        return y, log_y, cache

    def step(self, layer: int, u: np.ndarray, log_h: float, stats: bool, keep: bool
             ) -> tuple[np.ndarray, float, dict[str, Any] | None, _Tape | None]:
        """Layer ``layer`` forward: its output, its statistics row, its tape."""
        net, act = self.net, self.acts[layer]
        w0, w_scale = self.weights(layer)
        z = _matmul(u, w0, self.pool)
        del w0
        log_z = log_h + math.log(w_scale)
        if self.with_bias:
            n_in, n_out = net.widths[layer - 1], net.widths[layer]
            bias = inits.draw_bias(self.scheme, net.bias_std, generator(self.spec.seed, self.rep, layer, "bias"),
                                   n_in, n_out)
            z, log_z = _add_bias(z, log_z, bias)
        z, log_z = _renorm(z, log_z, self.pool)
        bn_here = layer in net.bn_layers
        cache = None
        if bn_here and net.bn_position == "pre":
            z, log_z, cache = self._bn(z, log_z)
        dphi = None if act.name == "linear" else activations.dphi_scaled(act, z, log_z)
        row = None
        if stats:
            sat = 0.0 if dphi is None else float(np.mean(np.abs(dphi) < SATURATION))
            row = {"width": net.widths[layer], "fan_in": net.widths[layer - 1], "fan_out": net.widths[layer],
                   **_prefix("pre", side_stats(z, log_z, sat, self.pool))}
        bn_post = bn_here and net.bn_position == "post"
        if act.name == "linear" and not bn_post:  # h is z: same numbers, same statistics
            h, log_out = z, log_z
            if stats:
                row.update({f"post_{k}": row[f"pre_{k}"] for k in STATS})
        else:
            h, log_out = _renorm(*activations.apply_scaled(act, z, log_z), self.pool)
            del z
            if bn_post:
                h, log_out, cache = self._bn(h, log_out)
            if stats:
                row.update(_prefix("post", side_stats(h, log_out, row["pre_frac_saturated"], self.pool)))
        tape = None
        if keep:
            if dphi is not None and act.homogeneous:
                dphi = dphi == act.slope_pos  # relu-type: phi' takes two values, one byte per entry
            elif dphi is not None:
                dphi = dphi.astype(self.dtype, copy=False)
            tape = _Tape(u, log_h, dphi, cache)
        return h, log_out, row, tape

    def back(self, layer: int, tape: _Tape, v: np.ndarray, log_g: float, row: dict[str, Any]
             ) -> tuple[np.ndarray, float]:
        """Layer ``layer`` backward: from the gradient w.r.t. its output to the
        gradient w.r.t. its input; fills the row's delta and weight-gradient."""
        net, act = self.net, self.acts[layer]
        bn_here = layer in net.bn_layers
        if bn_here and net.bn_position == "post":
            v, log_g = batchnorm.backward(v, log_g, tape.bn)  # float64 until the mask below
        if tape.dphi is None and not bn_here and "grad_std" in row:
            # A linear layer's delta is the gradient that came in, whose statistics the row has.
            row.update({f"delta_{k}": row[f"grad_{k}"] for k in STATS})
        else:
            if tape.dphi is not None:
                if tape.dphi.dtype == bool:
                    v = v * np.where(tape.dphi, v.dtype.type(act.slope_pos), v.dtype.type(act.slope_neg))
                else:
                    v = v * tape.dphi
            v, log_g = _narrow(v, log_g, self.dtype, self.pool)
            if bn_here and net.bn_position == "pre":
                v, log_g = _narrow(*batchnorm.backward(v, log_g, tape.bn), self.dtype, self.pool)
            row.update(_prefix("delta", side_stats(v, log_g, pool=self.pool)))
        # ||u_in^T v||_F by fixed blocks of the weight gradient's rows, none of it kept. Squares
        # summed in the compute dtype: the product's own rounding is already that large.
        u_t = tape.u_in.T
        norm = math.sqrt(math.fsum(self.pool.map(lambda rows: _sum_squares(u_t[rows] @ v),
                                           row_chunks(u_t.shape[0], v.shape[1]))))
        log_norm = math.log(norm) + tape.log_in + log_g if norm > 0 else -math.inf
        row["weight_grad_log10_norm"] = log_norm / math.log(10)
        row["weight_grad_norm"] = math.exp(log_norm) if log_norm < 709.7 else math.inf
        w0, w_scale = self.weights(layer)
        g = _matmul(v, w0.T, self.pool)
        return _renorm(g, log_g + math.log(w_scale), self.pool)


def tape_bytes(spec: RunSpec) -> list[int]:
    """Bytes the backward pass keeps per layer (index l for layer l >= 1)."""
    net, n, item = spec.network, spec.samples, np.dtype(spec.dtype).itemsize
    out = [0]
    for layer in range(1, net.depth + 1):
        act = activations.get(net.activation_at(layer), net.leaky_slope)
        dphi = 0 if act.name == "linear" else 1 if act.homogeneous else item
        bn = item if layer in net.bn_layers else 0
        out.append(n * (net.widths[layer - 1] * item + net.widths[layer] * (dphi + bn)))
    return out


def working_bytes(spec: RunSpec) -> int:
    """Memory of the forward pass: one weight matrix and a few layer-sized
    float64 temporaries (statistics), at the widest layer."""
    w = spec.network.widths
    weights = max(a * b for a, b in zip(w[:-1], w[1:])) * (8 if spec.network.init.resolve().orthogonal else 4)
    return weights * np.dtype(spec.dtype).itemsize // 4 + 6 * spec.samples * max(w) * 8


def weight_bytes(spec: RunSpec) -> int:
    """Bytes of all the weight matrices of one network."""
    w = spec.network.widths
    return sum(a * b for a, b in zip(w[:-1], w[1:])) * np.dtype(spec.dtype).itemsize


def keeps_weights(spec: RunSpec) -> bool:
    """Whether the backward pass keeps the forward pass's weights (when
    everything fits in ``max_memory``) rather than drawing them again."""
    budget = spec.max_memory or default_max_memory()
    return spec.backward and sum(tape_bytes(spec)) + weight_bytes(spec) + working_bytes(spec) <= budget


def backward_plan(spec: RunSpec) -> int:
    """The checkpoint spacing k of the backward pass (k = L: every layer kept;
    0 without a backward pass).

    Raises SpecError naming ``--max-memory`` when the run cannot fit, not even
    with checkpointing.
    """
    budget = spec.max_memory or default_max_memory()
    working = working_bytes(spec)
    if not spec.backward:
        if working > budget:
            raise SpecError("max_memory", f"one layer needs about {_gib(working)}, more than {_gib(budget)}; "
                            "raise --max-memory or use fewer --samples or a narrower --width")
        return 0
    per_layer = tape_bytes(spec)
    depth = spec.network.depth
    if sum(per_layer) + working <= budget:
        return depth
    k = max(1, math.isqrt(depth))
    checkpoints = (depth // k + 1) * spec.samples * max(spec.network.widths) * np.dtype(spec.dtype).itemsize
    segment = max(sum(per_layer[i:i + k]) for i in range(1, depth + 1, k))
    need = checkpoints + segment + working
    if need > budget:
        raise SpecError("max_memory", f"the backward pass needs about {_gib(need)} even with checkpointing "
                        f"({_gib(sum(per_layer) + working)} without), more than {_gib(budget)}; raise --max-memory "
                        "or use fewer --samples, --layers or a narrower --width")
    return k


def _gib(n: float) -> str:
    """Bytes in the largest binary unit that keeps a number >= 1."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} bytes"


def default_max_memory() -> int:
    """Half of the memory available now (MemAvailable), or of physical memory."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


def run_replicate(spec: RunSpec, replicate: int, progress: Progress | None = None, pool: Pool = SERIAL
                  ) -> list[dict[str, Any]]:
    """Forward (and with ``spec.backward``, backward) pass of one network; one
    dict of statistics per layer 0..L."""
    depth = spec.network.depth
    k = backward_plan(spec)
    net = _Network(spec, replicate, pool, keep_weights=k == depth and keeps_weights(spec))
    u, log_h = _renorm(*make_inputs(spec, replicate), pool)
    rows = [{"width": spec.network.widths[0], "fan_in": pd.NA, "fan_out": pd.NA,
             **_prefix("pre", empty_stats()), **_prefix("post", side_stats(u, log_h, pool=pool))}]
    tapes: dict[int, _Tape] = {}
    checkpoints = {0: (u, log_h)}
    hist_layers = {1, (depth + 1) // 2, depth} if replicate == 0 else set()
    for layer in range(1, depth + 1):
        u, log_h, row, tape = net.step(layer, u, log_h, stats=True, keep=spec.backward and k == depth)
        if layer in hist_layers:  # u has unit RMS: the shape of h at any scale
            # Equal bins given as a count and range take NumPy's fast path (no sort); counts add exactly.
            row["_hist"] = sum(pool.map(lambda r: np.histogram(u[r], bins=len(HIST_EDGES) - 1, range=(
                HIST_EDGES[0], HIST_EDGES[-1]))[0], row_chunks(*u.shape)))
        rows.append(row)
        if tape is not None:
            tapes[layer] = tape
        if spec.backward and k < depth and layer % k == 0:
            checkpoints[layer] = (u, log_h)
        if progress is not None:
            progress(1)
    if spec.backward:
        _backward(net, spec, replicate, rows, tapes, checkpoints, k, progress)
    for layer, row in enumerate(rows):
        row["replicate"], row["layer"] = replicate, layer
    return rows


def _backward(net: _Network, spec: RunSpec, replicate: int, rows: list[dict[str, Any]], tapes: dict[int, _Tape],
              checkpoints: dict[int, tuple[np.ndarray, float]], k: int, progress: Progress | None) -> None:
    depth = spec.network.depth
    g, log_g = _renorm(upstream(spec, replicate), 0.0, net.pool)
    rows[depth].update(_prefix("grad", side_stats(g, log_g, pool=net.pool)))
    for layer in range(depth, 0, -1):
        if layer not in tapes:  # recompute the segment above the nearest checkpoint
            start = max(c for c in checkpoints if c < layer)
            u, log_h = checkpoints[start]
            for l in range(start + 1, layer + 1):
                u, log_h, _, tapes[l] = net.step(l, u, log_h, stats=False, keep=True)
        g, log_g = net.back(layer, tapes.pop(layer), g, log_g, rows[layer])
        rows[layer - 1].update(_prefix("grad", side_stats(g, log_g, pool=net.pool)))
        if progress is not None:
            progress(1)
    rows[0].update(_prefix("delta", empty_stats()))
    rows[0]["weight_grad_norm"] = rows[0]["weight_grad_log10_norm"] = math.nan


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
    if {"bn", "bn_count", "bn_layers"} & set(changes):
        opts.pop("bn_layers", None)
    if "input_file" in changes or "batch_size" in changes:
        opts.pop("samples", None)
    return expand({**opts, **changes})


def simulate(spec: RunSpec | NetworkSpec | Sequence[Config], *, vary: Mapping[str, Iterable[Any]] | None = None,
             progress: Progress | None = None, threads: int | None = None, **options: Any) -> pd.DataFrame:
    """Run every configuration; one row per (config, replicate, layer).

    ``options`` are flat run options (``samples=``, ``replicates=``, ``seed=``,
    ``backward=``, any option of :data:`varprop.spec.OPTIONS`) applied to
    ``spec``; ``vary`` maps option names to lists of values, and every
    combination is run. ``progress(k)`` is called as layers complete.
    ``threads`` (default: every core this process may use) changes the speed,
    never the numbers.

    >>> from varprop.spec import NetworkSpec
    >>> df = simulate(NetworkSpec.square(2, 20), vary={"init": ["unit", "fan_in"]}, samples=50)
    >>> sorted(set(df["config"]))
    ['fan_in', 'unit']
    """
    configs = configs_for(spec, vary, **options)
    pool = Pool(parse_threads(threads))
    for c in configs:  # refuse before any work when a run cannot fit
        backward_plan(c.spec)
    start = time.perf_counter()
    frames, hists = [], []
    for c in configs:
        # Multi-threaded BLAS splits products differently for each thread
        # count, which changes the last bits: BLAS runs on one thread (for
        # the theory's use of the input file's statistics too) and varprop's
        # own threads work on fixed blocks (parallel.py).
        with threadpool_limits(1, user_api="blas"):
            rows = [r for rep in range(c.spec.replicates) for r in run_replicate(c.spec, rep, progress, pool)]
            predicted = theory.predict(c.spec)
        for r in rows:
            if "_hist" in r:
                counts = r.pop("_hist")
                hists.append(pd.DataFrame({"config": c.label, "layer": r["layer"], "bin_lo": HIST_EDGES[:-1],
                                           "bin_hi": HIST_EDGES[1:],
                                           "density": counts / max(counts.sum(), 1) / np.diff(HIST_EDGES)}))
        frame = pd.DataFrame(rows)
        lead = ["replicate", "layer", "width", "fan_in", "fan_out"]
        frame = frame[lead + [col for col in frame if col not in lead]]
        frame = frame.merge(predicted, on="layer", how="left")
        for key, value in reversed(list(c.varied.items())):
            frame.insert(0, key, value if isinstance(value, (str, int, float)) else str(value))
        frame.insert(0, "config", c.label)
        frames.append(frame)
    df = pd.concat(frames, ignore_index=True)
    df["fan_in"] = df["fan_in"].astype("Int64")
    df["fan_out"] = df["fan_out"].astype("Int64")
    df.attrs["configs"] = configs
    df.attrs["elapsed_s"] = time.perf_counter() - start
    # Plain lists: pandas compares attrs when combining frames, which a DataFrame here would break.
    df.attrs["histograms"] = pd.concat(hists, ignore_index=True).to_dict(orient="list") if hists else None
    return df


def total_steps(configs: Sequence[Config]) -> int:
    """How many layer steps :func:`simulate` reports to ``progress``."""
    return sum(c.spec.replicates * c.spec.network.depth * (2 if c.spec.backward else 1) for c in configs)

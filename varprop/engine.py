"""Monte-Carlo forward and backward propagation with streaming per-layer statistics.

Values are carried as ``h = exp(log_s) * u`` with ``u`` of moderate size:
each product is scaled, block by block while in cache, by a factor set from
its input's exact mean square (mean squares near 1 after a product, within
2^+-60 always), so nothing overflows at any depth (DESIGN.md); the backward
pass carries gradients the same way. A layer is one map over fixed blocks of
samples (product, bias, activation and float64 sums of both sides), with the
next layer's weights drawn in the same map. The forward pass holds one layer
and two weight matrices at a time. The backward pass needs each layer's
input and activation derivative: it keeps them for every layer when that fits
in ``max_memory``, else keeps only every k-th layer's output (k ~ sqrt(L)) and
recomputes each segment, bit for bit, on the way down; the weights are kept
too when everything fits, else redrawn from their seeds. Every random draw
comes from its own generator keyed by (seed; replicate, layer, role[, block]),
and work is split into blocks fixed by the shapes (parallel.py), so results
do not depend on the order of work or the thread count, and replicate r of
every configuration sees the same underlying draws (common random numbers).

>>> from varprop.spec import NetworkSpec
>>> df = simulate(NetworkSpec.square(layers=3, width=50, init="fan_in"), samples=200, seed=1)
>>> list(df["layer"])
[0, 1, 2, 3]
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from . import activations, batchnorm, inits, memory, theory
from .spec import Config, NetworkSpec, RunSpec, SpecError, expand, load_input, parse_threads, to_options
from .parallel import SERIAL, Pool, row_chunks
from .stats import (ABS_COS_SAMPLES, SATURATION, STATS, Sums, block_sums, empty_stats, from_sums, head_cos,
                    side_stats_ms)

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
    if total < np.finfo(x.dtype).tiny * 2**24 or not math.isfinite(total):
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


def _narrow(v: np.ndarray, log_s: float, dtype: type, pool: Pool = SERIAL) -> tuple[np.ndarray, float]:
    """A float64 pair renormalised in float64 and only then cast to ``dtype``,
    so entries far below the largest keep their value rather than flushing."""
    v, log_s = _renorm(v, log_s, pool)
    return v.astype(dtype, copy=False), log_s


def _bias_terms(log_z: float, b: np.ndarray) -> tuple[float, np.ndarray | None]:
    """How ``exp(log_z) * z + b`` is carried: the log-scale of the sum and
    the bias in its units (None for a zero bias), whichever term dominates."""
    peak = float(np.max(np.abs(b)))
    if peak == 0:
        return log_z, None
    rms_b = peak * math.sqrt(float(np.mean((b / peak) ** 2)))
    top = max(log_z, math.log(rms_b))
    return top, b * math.exp(-top)


def _prefix(side: str, stats: Mapping[str, float]) -> dict[str, float]:
    return {f"{side}_{k}": v for k, v in stats.items()}


def _prescale(n: int, ms_in: float, ms_w: float, dtype: type) -> Any:
    """The factor c, in the compute dtype, that brings ``c * (u @ W0)`` to a
    mean square near 1: E ms(u @ W0) = n ms(u) ms(W0) over the draw of W0.
    Applied to each block of the product while it is in cache, it replaces
    a renormalising pass; the next layer's factor uses this layer's exact
    mean square, so the small miss never compounds (and :func:`_in_band`
    catches a large one)."""
    expected = n * ms_in * ms_w
    if not (expected > 0 and math.isfinite(expected)):
        return dtype(1)
    c = dtype(1 / math.sqrt(expected))
    return c if math.isfinite(c) and c > 0 else dtype(1)


# Mean squares kept within 2^+-60, so that any factor _prescale picks is a
# normal float32 and no square under- or overflows.
_MS_BAND = (2.0**-60, 2.0**60)


def _in_band(v: Values, pool: Pool) -> Values:
    """``v`` itself, or renormalised to unit RMS when its mean square left the
    band (saturated activations or gradients, where the prescale, set from the
    input's mean square, overshoots)."""
    if _MS_BAND[0] <= v.ms <= _MS_BAND[1] or v.ms == 0 or not math.isfinite(v.ms):
        return v
    u, log_s = _renorm(v.u, v.log_s, pool)
    return values(u, log_s, pool)


class Values(NamedTuple):
    """A layer's values ``exp(log_s) * u`` and the float64 mean square of u."""

    u: np.ndarray
    log_s: float
    ms: float


def values(u: np.ndarray, log_s: float, pool: Pool = SERIAL) -> Values:
    """``(u, log_s)`` with u's mean square attached."""
    return Values(u, log_s, side_stats_ms(u, log_s, pool=pool)[1])


def _times_dphi(v: np.ndarray, dphi: np.ndarray, act: activations.Activation, out: np.ndarray | None = None
                ) -> np.ndarray:
    """``v * phi'`` from a tape's phi' (a bool per entry for relu-type: which slope)."""
    if dphi.dtype == bool and not (act.slope_pos == 1 and act.slope_neg == 0):
        dphi = np.where(dphi, v.dtype.type(act.slope_pos), v.dtype.type(act.slope_neg))
    return np.multiply(v, dphi, out=out)


_NOTHING_PENDING: tuple[list[Callable[[], float]], Callable[[list[float]], None]] = ([], lambda squares: None)


@dataclass
class _Tape:
    """One layer's record for the backward pass."""

    u_in: np.ndarray  # the layer's input h_{l-1} = exp(log_in) * u_in
    log_in: float
    dphi: np.ndarray | None  # phi' at the activation's input (bool for relu-type, None for linear)
    bn: batchnorm.Cache | None


class _Network:
    """A RunSpec resolved for one replicate: draws weights, steps layers.

    A layer's work is one map over fixed blocks of samples (product, bias,
    activation and both sides' float64 sums, while the block is in cache),
    with the next layer's weights drawn in the same map; batch-norm layers,
    and activations whose evaluation needs the whole layer's scale (float64
    compute, extreme scales, phi(0) != 0 with every phi far below 1), take a
    phased path instead.
    """

    def __init__(self, spec: RunSpec, replicate: int, pool: Pool = SERIAL, keep_weights: bool = False):
        self.spec, self.net, self.rep, self.pool = spec, spec.network, replicate, pool
        # Weights kept from the forward pass for the backward one, when they fit.
        self.kept: dict[int, tuple[np.ndarray, float]] | None = {} if keep_weights else None
        self.ready: dict[int, tuple[np.ndarray, float]] = {}  # drawn ahead, during the previous layer
        self.last: tuple[int, tuple[np.ndarray, float]] | None = None
        self._pending_grad: tuple[list[Callable[[], float]], Callable[[list[float]], None]] = _NOTHING_PENDING
        self.scheme = spec.network.init.resolve()
        self.dtype = np.dtype(spec.dtype).type
        self.with_bias = inits.has_bias(self.scheme, self.net.bias_std)
        self.acts = [None] + [activations.get(self.net.activation_at(l), self.net.leaky_slope)
                              for l in range(1, self.net.depth + 1)]

    def weights(self, layer: int) -> tuple[np.ndarray, float]:
        """``(W0, scale)`` of a layer: the last one asked for (the top layer's,
        or a recomputed segment's, going backward), kept, drawn ahead, or drawn now."""
        if self.last is not None and self.last[0] == layer:
            if self.kept is not None:  # going backward: it is not needed again
                self.kept.pop(layer, None)
            return self.last[1]
        if self.kept is not None and layer in self.kept:
            w = self.kept.pop(layer)
        else:
            if layer in self.ready:
                w = self.ready.pop(layer)
            else:
                self.last = None  # freed before a draw that was not made ahead
                w = self._draw_now(layer)
            if self.kept is not None:
                self.kept[layer] = w
        self.last = (layer, w)
        return w

    def _by_blocks(self) -> bool:
        return self.scheme.user is None and not self.scheme.orthogonal

    def weight_ms(self, layer: int, w0: np.ndarray) -> float:
        """The mean square of W0's entries: expected for built-in draws, else measured."""
        s = self.scheme
        if self._by_blocks():
            return inits.unit_sd(s.distribution) ** 2
        if s.orthogonal:
            return 1 / max(self.net.widths[layer - 1], self.net.widths[layer])
        return _sum_squares(w0) / max(w0.size, 1) or 1.0

    def draw_tasks(self, layer: int) -> list[Callable[[], None]]:
        """Tasks that draw a layer's weights into ``ready``, in fixed blocks of
        rows, each from its own node of the seed tree: the same numbers on any
        number of threads. Empty when the layer's weights are not drawn by blocks."""
        if (not self._by_blocks() or layer in self.ready or (self.kept is not None and layer in self.kept)
                or (self.last is not None and self.last[0] == layer)):
            return []
        n_in, n_out = self.net.widths[layer - 1], self.net.widths[layer]
        w0 = np.empty((n_in, n_out), self.dtype)
        self.ready[layer] = (w0, inits.weight_scale(self.scheme, n_in, n_out))

        def fill(block: int, rows: slice) -> None:
            rng = generator(self.spec.seed, self.rep, layer, "weights", block)
            w0[rows] = inits.standard_draw(self.scheme.distribution, rng, (rows.stop - rows.start, n_out), self.dtype)
        return [lambda b=b, rows=rows: fill(b, rows) for b, rows in enumerate(row_chunks(n_in, n_out))]

    def _draw_now(self, layer: int) -> tuple[np.ndarray, float]:
        tasks = self.draw_tasks(layer)
        if tasks:
            self.pool.map(lambda task: task(), tasks)
            return self.ready.pop(layer)
        n_in, n_out = self.net.widths[layer - 1], self.net.widths[layer]
        try:
            return inits.draw_weights(self.scheme, generator(self.spec.seed, self.rep, layer, "weights"), n_in, n_out,
                                      self.dtype)
        except ValueError as exc:  # a user init returned something unusable
            raise SpecError("init", str(exc)) from None
        except Exception as exc:  # or failed: the user's to see, in one line
            raise SpecError("init", f"{self.scheme.name} raised {type(exc).__name__}: {exc}") from None

    def _bn(self, u: np.ndarray, log_s: float, layer: int) -> tuple[np.ndarray, float, batchnorm.Cache]:
        y, log_y, cache = batchnorm.forward(u, log_s, self.spec.batch, self.net.bn_eps, layer)
        y, log_y = _renorm(y, log_y, self.pool)
        return y, log_y, cache

    def _blockwise(self, layer: int, log_z: float) -> bool:
        """Whether phi can be evaluated block by block at this scale, with a
        result scale that does not depend on the values (activations.apply_scaled)."""
        act = self.acts[layer]
        if layer in self.net.bn_layers:
            return False
        return act.homogeneous or (self.dtype is np.float32 and abs(log_z) < activations.LOG_DIRECT_F32)

    def step(self, layer: int, x: Values, stats: bool, keep: bool, ahead: int | None = None
             ) -> tuple[Values, dict[str, Any] | None, _Tape | None]:
        """Layer ``layer`` forward: its output, its statistics row, its tape.
        ``ahead`` names a layer whose weights are drawn meanwhile."""
        net, act, dtype = self.net, self.acts[layer], self.dtype
        n_in, n_out, n = net.widths[layer - 1], net.widths[layer], x.u.shape[0]
        pool = self.pool.sized(n * max(n_in, n_out))
        w0, w_scale = self.weights(layer)
        c = _prescale(n_in, x.ms, self.weight_ms(layer, w0), dtype)
        log_z = x.log_s + math.log(w_scale) - math.log(float(c))
        bias = None
        if self.with_bias:
            b = inits.draw_bias(self.scheme, net.bias_std, generator(self.spec.seed, self.rep, layer, "bias"),
                                n_in, n_out)
            top, bias = _bias_terms(log_z, b)
            if bias is not None:
                c = dtype(float(c) * math.exp(log_z - top))
                if c > 0:  # book the factor as rounded; the bias carries its own rounding, as always
                    log_z = x.log_s + math.log(w_scale) - math.log(float(c))
                    bias = b * math.exp(-log_z)
                else:  # the product is below the bias's resolution
                    log_z = top
                bias = bias.astype(dtype)
        blockwise = self._blockwise(layer, log_z)
        linear = act.name == "linear"
        z = np.empty((n, n_out), dtype)
        h = z if linear or not blockwise else np.empty_like(z)
        log_h = log_z if act.homogeneous else 0.0
        dphi = None if linear or not blockwise or not keep else np.empty(z.shape, bool if act.homogeneous else dtype)
        chunks = row_chunks(n, n_out)
        head_rows = min(ABS_COS_SAMPLES, n)

        def block(rows: slice) -> tuple[Sums | None, Sums | None, int, float, float]:
            zb = z[rows]
            np.matmul(x.u[rows], w0, out=zb)
            zb *= c
            if bias is not None:
                zb += bias
            if not blockwise:
                return None, None, 0, math.nan, math.nan
            with_head = rows.start == 0 and rows.stop >= head_rows
            pre = block_sums(zb)
            head_pre = head_cos(zb) if with_head else math.nan
            if linear:
                return pre, pre, 0, head_pre, head_pre
            hb = h[rows]
            hb[...], _, d = activations.phi_dphi_scaled(act, zb, log_z)
            saturated = int(np.count_nonzero(np.abs(d) < SATURATION))
            if dphi is not None:  # kept for the backward pass
                dphi[rows] = d == act.slope_pos if act.homogeneous else d
            return pre, block_sums(hb), saturated, head_pre, head_cos(hb) if with_head else math.nan

        draws = self.draw_tasks(ahead) if ahead is not None else []
        done = pool.map(lambda task: task(), [lambda rows=rows: block(rows) for rows in chunks] + draws)
        parts = done[:len(chunks)]
        cache = None
        if blockwise:
            sat = sum(p[2] for p in parts) / z.size
            heads = (parts[0][3], parts[0][4]) if chunks[0].stop >= head_rows else (head_cos(z), head_cos(h))
            pre, ms_z = from_sums(z, [p[0] for p in parts], log_z, 0.0 if linear else sat, heads[0])
            if linear:
                post, ms_h = pre, ms_z
            else:
                post, ms_h = from_sums(h, [p[1] for p in parts], log_h, sat, heads[1])
            # phi(0) != 0 but every phi far below 1 (sigmoid of a layer of large negative values): float32
            # values at scale 1 lose them to underflow, the phased path scales them up first.
            blockwise = act.phi0 == 0 or ms_h >= _MS_BAND[0]
        if not blockwise:  # the whole layer's scale is needed: one phase after another
            h = dphi = None  # a block pass's, if one ran: freed before this path's temporaries
            z, log_z = _renorm(z, log_z, pool)
            if layer in net.bn_layers and net.bn_position == "pre":
                z, log_z, cache = self._bn(z, log_z, layer)
            d = None if linear else activations.dphi_scaled(act, z, log_z)
            sat = 0.0 if d is None else float(np.mean(np.abs(d) < SATURATION))
            pre, ms_z = side_stats_ms(z, log_z, sat, pool)
            if linear:
                h, log_h = z, log_z
            else:  # phi(0) != 0 from float64 values: apply_scaled then scales phi by its maximum, not 1
                h, log_h = _narrow(*activations.apply_scaled(
                    act, z.astype(np.float64, copy=False) if act.phi0 else z, log_z), dtype, pool)
            if layer in net.bn_layers and net.bn_position == "post":
                h, log_h, cache = self._bn(h, log_h, layer)
            post, ms_h = (pre, ms_z) if h is z else side_stats_ms(h, log_h, sat, pool)
            if d is not None:
                dphi = d == act.slope_pos if act.homogeneous else d.astype(dtype, copy=False)
        row = None
        if stats:
            row = {"width": n_out, "fan_in": n_in, "fan_out": n_out, **_prefix("pre", pre), **_prefix("post", post)}
        tape = _Tape(x.u, x.log_s, dphi, cache) if keep else None
        return _in_band(Values(h, log_h, ms_h), pool), row, tape

    def back(self, layer: int, tape: _Tape, g: Values, row: "_Row", ahead: int | None = None
             ) -> tuple[Values, dict[str, float]]:
        """Layer ``layer`` backward: from the gradient w.r.t. its output to the
        gradient w.r.t. its input and that gradient's statistics; fills the
        row's delta and weight-gradient. ``ahead`` names a layer whose weights
        are drawn meanwhile."""
        net, act, dtype = self.net, self.acts[layer], self.dtype
        n_in, n_out, n = net.widths[layer - 1], net.widths[layer], g.u.shape[0]
        pool = self.pool.sized(n * max(n_in, n_out))
        bn_here = layer in net.bn_layers
        w0, w_scale = self.weights(layer)
        w_ms = self.weight_ms(layer, w0)
        if bn_here:  # the batch Jacobian couples the samples: phase after phase
            v, log_v = g.u, g.log_s
            if net.bn_position == "post":
                v, log_v = batchnorm.backward(v, log_v, tape.bn)  # float64 until the mask below
            if tape.dphi is not None:
                v = _times_dphi(v, tape.dphi, act)
            v, log_v = _narrow(v, log_v, dtype, pool)
            if net.bn_position == "pre":
                v, log_v = _narrow(*batchnorm.backward(v, log_v, tape.bn), dtype, pool)
            delta, ms_v = side_stats_ms(v, log_v, pool=pool)
        else:
            v, log_v = (g.u, g.log_s) if tape.dphi is None else (np.empty_like(g.u), g.log_s)
            ms_v = g.ms
        # delta's mean square is not known before the map: g's sets the scale, an overestimate by
        # E[phi'^2] (1/2 for relu); a saturated layer's far smaller delta is caught by _in_band.
        c = _prescale(n_out, g.ms if not bn_here else ms_v, w_ms, dtype)
        out = np.empty((n, n_in), dtype)
        chunks = row_chunks(n, max(n_in, n_out))
        head_rows = min(ABS_COS_SAMPLES, n)
        w0_t = w0.T

        def block(rows: slice) -> tuple[Sums | None, Sums, float, float]:
            with_head = rows.start == 0 and rows.stop >= head_rows
            delta_sums, head_delta = None, math.nan
            if not bn_here and tape.dphi is not None:
                vb = _times_dphi(g.u[rows], tape.dphi[rows], act, out=v[rows])
                delta_sums = block_sums(vb)
                head_delta = head_cos(vb) if with_head else math.nan
            ob = out[rows]
            np.matmul(v[rows], w0_t, out=ob)
            ob *= c
            return delta_sums, block_sums(ob), head_delta, head_cos(ob) if with_head else math.nan

        # The previous layer's weight-gradient products share this map: one barrier fewer per layer.
        earlier, finish_earlier = self._pending_grad
        draws = self.draw_tasks(ahead) if ahead is not None else []
        done = pool.map(lambda task: task(), earlier + [lambda rows=rows: block(rows) for rows in chunks] + draws)
        finish_earlier(done[:len(earlier)])
        parts = done[len(earlier):len(earlier) + len(chunks)]
        heads_ok = chunks[0].stop >= head_rows
        if not bn_here:
            if tape.dphi is None:
                # A linear layer's delta is the gradient that came in, whose statistics the row has.
                delta = ({k: row[f"grad_{k}"] for k in STATS} if "grad_std" in row
                         else side_stats_ms(v, log_v, pool=pool)[0])
            else:
                delta, _ = from_sums(v, [p[0] for p in parts], log_v, head=parts[0][2] if heads_ok else head_cos(v))
        row.update(_prefix("delta", delta))
        log_out = log_v + math.log(w_scale) - math.log(float(c))
        grad, ms_out = from_sums(out, [p[1] for p in parts], log_out, head=parts[0][3] if heads_ok else head_cos(out))
        # ||u_in^T v||_F by fixed blocks of the weight gradient's rows, none of it kept, computed
        # in the next layer's map (or by flush_grad). Squares summed in the compute dtype: the
        # product's own rounding is already that large.
        u_t, log_uv = tape.u_in.T, tape.log_in + log_v

        def finish(squares: list[float]) -> None:
            norm = math.sqrt(math.fsum(squares))
            log_norm = math.log(norm) + log_uv if norm > 0 else -math.inf
            row["weight_grad_log10_norm"] = log_norm / math.log(10)
            row["weight_grad_norm"] = math.exp(log_norm) if log_norm < 709.7 else math.inf
        self._pending_grad = ([lambda rows=rows: _sum_squares(u_t[rows] @ v)
                               for rows in row_chunks(u_t.shape[0], v.shape[1])], finish)
        return _in_band(Values(out, log_out, ms_out), pool), grad

    def flush_grad(self) -> None:
        """Compute the weight-gradient norm that :meth:`back` left pending."""
        tasks, finish = self._pending_grad
        finish(self.pool.map(lambda task: task(), tasks))
        self._pending_grad = _NOTHING_PENDING


class Table:
    """One replicate's per-layer statistics: a float64 row per layer 0..L in
    the column order of ``layers.csv`` (a dict per layer took 7 kB, so 40,000
    layers took 300 MB; a row here takes 8 bytes a column). ``row(l)`` gives
    a dict-like view that the forward and backward passes fill."""

    def __init__(self, depth: int, backward: bool):
        sides = ("pre", "post") + (("grad", "delta") if backward else ())
        self.columns = (["width", "fan_in", "fan_out"] + [f"{s}_{k}" for s in sides for k in STATS]
                        + (["weight_grad_norm", "weight_grad_log10_norm"] if backward else []))
        self.at = {c: i for i, c in enumerate(self.columns)}
        self.values = np.full((depth + 1, len(self.columns)), np.nan)
        self.hist: dict[int, np.ndarray] = {}  # layer -> histogram counts (replicate 0)

    @staticmethod
    def bytes_per_layer(backward: bool) -> int:
        return 8 * (3 + len(STATS) * (4 if backward else 2) + (2 if backward else 0))

    def row(self, layer: int) -> "_Row":
        return _Row(self, layer)

    def frame(self, replicate: int) -> pd.DataFrame:
        """The rows as a DataFrame with ``replicate`` and ``layer`` leading."""
        df = pd.DataFrame(self.values, columns=self.columns)
        df.insert(0, "layer", np.arange(len(df)))
        df.insert(0, "replicate", replicate)
        df["width"] = df["width"].astype(int)
        return df


class _Row:
    """A view of one row of a :class:`Table`: ``row[key] = value``, ``row.update(stats)``."""

    __slots__ = ("table", "layer")

    def __init__(self, table: Table, layer: int):
        self.table, self.layer = table, layer

    def __setitem__(self, key: str, value: float) -> None:
        self.table.values[self.layer, self.table.at[key]] = value

    def __getitem__(self, key: str) -> float:
        return float(self.table.values[self.layer, self.table.at[key]])

    def __contains__(self, key: str) -> bool:
        """Whether ``key`` has been filled in."""
        return key in self.table.at and not math.isnan(self[key])

    def update(self, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self[key] = value


def run_replicate(spec: RunSpec, replicate: int, progress: Progress | None = None, pool: Pool = SERIAL,
                  plan: int | None = None) -> Table:
    """Forward (and with ``spec.backward``, backward) pass of one network: the
    statistics of every layer 0..L. ``plan`` is the backward pass's checkpoint
    spacing (:func:`varprop.memory.backward_plan`; it changes the memory
    used, never the numbers)."""
    depth = spec.network.depth
    k = memory.backward_plan(spec) if plan is None else plan
    net = _Network(spec, replicate, pool, keep_weights=k == depth and memory.keeps_weights(spec))
    u, log_h = make_inputs(spec, replicate)
    post, ms = side_stats_ms(u, log_h, pool=pool)
    x = Values(u, log_h, ms)
    table = Table(depth, spec.backward)
    table.row(0).update({"width": spec.network.widths[0], **_prefix("pre", empty_stats()), **_prefix("post", post)})
    tapes: dict[int, _Tape] = {}
    checkpoints = {0: x}
    hist_layers = {1, (depth + 1) // 2, depth} if replicate == 0 else set()
    for layer in range(1, depth + 1):
        x, row, tape = net.step(layer, x, stats=True, keep=spec.backward and k == depth,
                                ahead=layer + 1 if layer < depth else None)
        if layer in hist_layers:  # h / rms(h): the shape of h at any scale (a dead layer: a spike at 0)
            f = x.u.dtype.type(1 / math.sqrt(x.ms) if x.ms > 0 else 1)
            # Equal bins given as a count and range take NumPy's fast path (no sort); counts add exactly.
            table.hist[layer] = sum(pool.map(lambda r: np.histogram(x.u[r] * f, bins=len(HIST_EDGES) - 1, range=(
                HIST_EDGES[0], HIST_EDGES[-1]))[0], row_chunks(*x.u.shape)))
        table.row(layer).update(row)
        if tape is not None:
            tapes[layer] = tape
        if spec.backward and k < depth and layer % k == 0:
            checkpoints[layer] = x
        if progress is not None:
            progress(1)
    if spec.backward:
        _backward(net, spec, replicate, table, tapes, checkpoints, k, progress)
    return table


def _backward(net: _Network, spec: RunSpec, replicate: int, table: Table, tapes: dict[int, _Tape],
              checkpoints: dict[int, Values], k: int, progress: Progress | None) -> None:
    depth = spec.network.depth
    u = upstream(spec, replicate)
    grad, ms = side_stats_ms(u, 0.0, pool=net.pool)
    g = Values(u, 0.0, ms)
    table.row(depth).update(_prefix("grad", grad))
    for layer in range(depth, 0, -1):
        if layer not in tapes:  # recompute the segment above the nearest checkpoint
            start = max(c for c in checkpoints if c < layer)
            x = checkpoints[start]
            for l in range(start + 1, layer + 1):
                x, _, tapes[l] = net.step(l, x, stats=False, keep=True, ahead=l + 1 if l < layer else None)
        # The next layer down's weights are drawn in this layer's map when they are not kept and no
        # segment recomputation will draw them first.
        g, grad = net.back(layer, tapes.pop(layer), g, table.row(layer),
                           ahead=layer - 1 if layer - 1 in tapes else None)
        table.row(layer - 1).update(_prefix("grad", grad))
        if progress is not None:
            progress(1)
    net.flush_grad()


def configs_for(spec: RunSpec | NetworkSpec | Sequence[Config], vary: Mapping[str, Iterable[Any]] | None = None,
                **options: Any) -> list[Config]:
    """The configurations a :func:`simulate` call runs (see there)."""
    if isinstance(spec, (list, tuple)):
        if vary or options:  # they would be dropped without a word
            raise TypeError("vary= and options apply to a spec; a list of configurations runs as given "
                            "(pass them to configs_for instead)")
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
    # The inputs given here replace the spec's: a file replaces its Gaussian inputs and the reverse
    # (both kept would be refused as contradicting each other).
    if "input_file" in changes:
        opts.pop("input", None)
        opts.pop("input_std", None)
    elif {"input", "input_std"} & set(changes):
        opts.pop("input_file", None)
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
    plans = memory.check(configs)  # refuse before any work when a run cannot fit
    start = time.perf_counter()
    frames, hists = [], []
    for c, plan in zip(configs, plans):
        # Multi-threaded BLAS splits products differently for each thread
        # count, which changes the last bits: BLAS runs on one thread (for
        # the theory's use of the input file's statistics too) and varprop's
        # own threads work on fixed blocks (parallel.py).
        with threadpool_limits(1, user_api="blas"):
            tables = [run_replicate(c.spec, rep, progress, pool, plan) for rep in range(c.spec.replicates)]
            predicted = theory.predict(c.spec)
        for layer, counts in tables[0].hist.items():
            hists.append(pd.DataFrame({"config": c.label, "layer": layer, "bin_lo": HIST_EDGES[:-1],
                                       "bin_hi": HIST_EDGES[1:],
                                       "density": counts / max(counts.sum(), 1) / np.diff(HIST_EDGES)}))
        frame = pd.concat([table.frame(rep) for rep, table in enumerate(tables)], ignore_index=True)
        del tables
        frame = frame.merge(predicted, on="layer", how="left")
        for key, value in reversed(list(c.varied.items())):
            if key in frame:  # a varied --width: the per-layer width column already holds it
                continue
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

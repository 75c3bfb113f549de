"""One layer forward and backward: the product, bias, batch norm and
activation of a layer, with streaming float64 statistics of both sides.

A layer is one map over fixed blocks of samples (product, bias, activation
and float64 sums of both sides, while the block is in cache; a small layer's
statistics are taken later with other layers', stats.Later), with the next
layer's weights drawn in the same map. Batch-norm layers, and activations
whose evaluation needs the whole layer's scale, take a phased path. The
backward pass needs each layer's input and activation derivative (its
:class:`Tape`); weights are kept or drawn again from their seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, MutableMapping

import numpy as np

from ..errors import SpecError
from ..logscale import exp_times
from ..nn import activations, batchnorm, inits, layers
from ..parallel import SERIAL, Pool, row_chunks
from ..spec import RunSpec
from ..stats import (ABS_COS_SAMPLES, SATURATION, STATS, Later, Sums, block_sums, from_sums, head_cos,
                     mean_of_row_squares, mean_square, row_squares, side_stats_ms)
from .scaled import MS_BAND, Values, bias_terms, in_band, narrow, prescale, renorm, sum_squares
from .seeds import generator

def prefixed(side: str, stats: Mapping[str, float]) -> dict[str, float]:
    return {f"{side}_{k}": v for k, v in stats.items()}


def _times_dphi(v: np.ndarray, dphi: np.ndarray, act: activations.Activation, out: np.ndarray | None = None
                ) -> np.ndarray:
    """``v * phi'`` from a tape's phi' (a bool per entry for relu-type: which slope)."""
    if dphi.dtype == bool and not (act.slope_pos == 1 and act.slope_neg == 0):
        dphi = np.where(dphi, v.dtype.type(act.slope_pos), v.dtype.type(act.slope_neg))
    return np.multiply(v, dphi, out=out)


_NOTHING_PENDING: tuple[list[Callable[[], float]], Callable[[list[float]], None]] = ([], lambda squares: None)


@dataclass
class Tape:
    """One layer's record for the backward pass."""

    u_in: np.ndarray  # the layer's input h_{l-1} = exp(log_in) * u_in
    log_in: float
    dphi: np.ndarray | None  # phi' at the activation's input (bool for relu-type, None for linear)
    bn: batchnorm.Cache | None


class Network:
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
        # Small layers' statistics rows, taken several at a time: a row is filled in, and whatever reads
        # it runs, once its stack is taken (later.then); the caller flushes at the end of a pass.
        self.later = Later()
        self.labels: dict[int, str] = {}  # a dense layer's name in messages where "layer N" is not the user's
        self.scheme = spec.network.init.resolve()
        self.dtype = np.dtype(spec.dtype).type
        self.with_bias = inits.has_bias(self.scheme, self.net.bias_std)
        self.kinds = layers.build(self.net)
        self.layers = layers.dense_layers(self.kinds)  # by dense index (a residual block's branch has several)

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
            w = self._as_dense(layer, w)
            if self.kept is not None:
                self.kept[layer] = w
        self.last = (layer, w)
        return w

    def _as_dense(self, layer: int, w: tuple[np.ndarray, float]) -> tuple[np.ndarray, float]:
        """The init's draw as the layer's Dense asks: times its factor, or standardized."""
        dense = self.layers[layer - 1].dense
        if dense.standardized:  # columns centred and of unit norm, in float64 (per column: any thread count)
            w0 = w[0].astype(np.float64)
            w0 -= w0.mean(axis=0)
            norms = np.sqrt(np.einsum("ij,ij->j", w0, w0))
            return (w0 / np.where(norms > 0, norms, 1.0)).astype(self.dtype), dense.factor
        return w if dense.factor == 1 else (w[0], w[1] * dense.factor)

    def _by_blocks(self) -> bool:
        return self.scheme.user is None and not self.scheme.orthogonal

    def weight_ms(self, layer: int, w0: np.ndarray) -> float:
        """The mean square of W0's entries: expected for built-in draws, else measured."""
        s = self.scheme
        if self.layers[layer - 1].dense.standardized:
            return 1 / self.layers[layer - 1].dense.fan_in
        if self._by_blocks():
            return inits.unit_sd(s.distribution) ** 2
        if s.orthogonal:
            dense = self.layers[layer - 1].dense
            return 1 / max(dense.fan_in, dense.fan_out)
        return sum_squares(w0) / max(w0.size, 1) or 1.0

    def draw_tasks(self, layer: int) -> list[Callable[[], None]]:
        """Tasks that draw a layer's weights into ``ready``, in fixed blocks of
        rows, each from its own node of the seed tree: the same numbers on any
        number of threads. Empty when the layer's weights are not drawn by blocks."""
        if (not self._by_blocks() or layer in self.ready or (self.kept is not None and layer in self.kept)
                or (self.last is not None and self.last[0] == layer)):
            return []
        n_in, n_out = self.layers[layer - 1].dense.fan_in, self.layers[layer - 1].dense.fan_out
        w0 = np.empty((n_in, n_out), self.dtype)
        self.ready[layer] = (w0, inits.weight_scale(self.scheme, n_in, n_out))

        def fill(block: int, rows: slice) -> None:
            rng = generator(self.spec.seed, self.rep, layer, "weights", block)
            w0[rows] = inits.standard_draw(self.scheme.distribution, rng, (rows.stop - rows.start, n_out), self.dtype)
        tasks: list[Callable[[], None]] = []
        for b, rows in enumerate(row_chunks(n_in, n_out)):
            piece = w0[rows].reshape(-1)
            if (self.scheme.distribution == "normal" and self.dtype is np.float32 and piece.size % 2 == 0
                    and piece.size > 2 * inits.PAIRS_PER_PIECE):
                # A block of several pieces of the stream: a task per piece, the same numbers. Drawn whole, it
                # kept one thread busy while the other, its share of the layer's products done, waited.
                tasks += inits.standard_normal_tasks(generator(self.spec.seed, self.rep, layer, "weights", b), piece)
            else:
                tasks.append(lambda b=b, rows=rows: fill(b, rows))
        return tasks

    def _draw_now(self, layer: int) -> tuple[np.ndarray, float]:
        tasks = self.draw_tasks(layer)
        if tasks:
            self.pool.map(lambda task: task(), tasks)
            return self.ready.pop(layer)
        n_in, n_out = self.layers[layer - 1].dense.fan_in, self.layers[layer - 1].dense.fan_out
        try:
            return inits.draw_weights(self.scheme, generator(self.spec.seed, self.rep, layer, "weights"), n_in, n_out,
                                      self.dtype)
        except ValueError as exc:  # a user init failed or returned something unusable: the user's to see
            raise SpecError("init", str(exc)) from exc

    def _name(self, layer: int) -> str:
        return self.labels.get(layer, f"layer {layer}")

    def _bn(self, u: np.ndarray, log_s: float, bn: layers.BatchNorm, where: str
            ) -> tuple[np.ndarray, float, batchnorm.Cache]:
        y, log_y, cache = batchnorm.forward(u, log_s, self.spec.batch, bn.eps, where)
        y, log_y = renorm(y, log_y, self.pool)
        return y, log_y, cache

    def _blockwise(self, kind: layers.Layer, log_z: float) -> bool:
        """Whether phi can be evaluated block by block at this scale, with a
        result scale that does not depend on the values (activations.apply_scaled)."""
        act = kind.activation.fn
        if kind.bn is not None:
            return False
        return act.homogeneous or (self.dtype is np.float32 and abs(log_z) < activations.LOG_DIRECT_F32)

    def phased(self, kind: layers.Layer, z: np.ndarray, log_z: float, pool: Pool
               ) -> tuple[np.ndarray, float, float, dict[str, float], dict[str, float], np.ndarray | None,
                          batchnorm.Cache | None]:
        """The rest of a layer from its scaled product ``exp(log_z) * z`` (renormalised
        in place), one phase after another, for when the whole layer's scale is needed:
        ``(h, log_h, ms_h, pre, post, dphi, cache)``."""
        act, linear, dtype, cache = kind.activation.fn, kind.activation.linear, self.dtype, None
        z, log_z = renorm(z, log_z, pool)
        if kind.bn is not None and kind.bn_pre:
            z, log_z, cache = self._bn(z, log_z, kind.bn, self._name(kind.index))
        d = None if linear else activations.dphi_scaled(act, z, log_z)
        sat = 0.0 if d is None else float(np.mean(np.abs(d) < SATURATION))
        pre, ms_z = side_stats_ms(z, log_z, sat, pool)
        if linear:
            h, log_h = z, log_z
        else:  # phi(0) != 0 from float64 values: apply_scaled then scales phi by its maximum, not 1
            h, log_h = narrow(*activations.apply_scaled(
                act, z.astype(np.float64, copy=False) if act.phi0 else z, log_z), dtype, pool)
            log_h += kind.activation.log_gain
        if kind.bn is not None and kind.bn_post:
            h, log_h, cache = self._bn(h, log_h, kind.bn, self._name(kind.index))
        post, ms_h = (pre, ms_z) if h is z else side_stats_ms(h, log_h, sat, pool)
        dphi = None
        if d is not None:
            dphi = d == act.slope_pos if act.homogeneous else d.astype(dtype, copy=False)
        return h, log_h, ms_h, pre, post, dphi, cache

    def step(self, layer: int, x: Values, stats: bool, keep: bool, ahead: int | None = None
             ) -> tuple[Values, dict[str, Any] | None, Tape | None]:
        """Layer ``layer`` forward: its output, its statistics row, its tape.
        ``ahead`` names a layer whose weights are drawn meanwhile."""
        kind, dtype = self.layers[layer - 1], self.dtype
        act = kind.activation.fn
        n_in, n_out, n = kind.dense.fan_in, kind.dense.fan_out, x.u.shape[0]
        pool = self.pool.sized(n * max(n_in, n_out))
        w0, w_scale = self.weights(layer)
        c = prescale(n_in, x.ms, self.weight_ms(layer, w0), dtype)
        log_z = x.log_s + math.log(w_scale) - math.log(float(c))
        bias = None
        if self.with_bias:
            b = inits.draw_bias(self.scheme, self.net.bias_std, generator(self.spec.seed, self.rep, layer, "bias"),
                                n_in, n_out)
            top, bias = bias_terms(log_z, b)
            if bias is not None:
                c = dtype(float(c) * math.exp(log_z - top))
                if c > 0:  # book the factor as rounded; the bias carries its own rounding, as always
                    log_z = x.log_s + math.log(w_scale) - math.log(float(c))
                    bias = b * math.exp(-log_z)
                else:  # the product is below the bias's resolution
                    log_z = top
                bias = bias.astype(dtype)
        blockwise = self._blockwise(kind, log_z)
        linear = kind.activation.linear
        z = np.empty((n, n_out), dtype)
        h = z if linear or not blockwise else np.empty_like(z)
        log_h = (log_z if act.homogeneous else 0.0) + kind.activation.log_gain
        dphi = None if linear or not blockwise or not keep else np.empty(z.shape, bool if act.homogeneous else dtype)
        chunks = row_chunks(n, n_out)
        head_rows = min(ABS_COS_SAMPLES, n)
        later = stats and Later.takes(z)  # the statistics are taken with other small layers'

        def block(rows: slice) -> tuple[Sums | None, Sums | np.ndarray | None, int, float, float]:
            zb = z[rows]
            np.matmul(x.u[rows], w0, out=zb)
            zb *= c
            if bias is not None:
                zb += bias
            if not blockwise:
                return None, None, 0, math.nan, math.nan
            hb, d = zb, None
            if not linear:
                hb = h[rows]
                hb[...], _, d = activations.phi_dphi_scaled(act, zb, log_z)
                if dphi is not None:  # kept for the backward pass
                    dphi[rows] = d == act.slope_pos if act.homogeneous else d
            if not stats or later:  # the output's mean square, which sets the next scale: block_sums' row squares
                saturated = int(np.count_nonzero(np.abs(d) < SATURATION)) if later and d is not None else 0
                return None, row_squares(hb), saturated, math.nan, math.nan
            with_head = rows.start == 0 and rows.stop >= head_rows
            pre = block_sums(zb)
            head_pre = head_cos(zb) if with_head else math.nan
            if d is None:
                return pre, pre, 0, head_pre, head_pre
            saturated = int(np.count_nonzero(np.abs(d) < SATURATION))
            return pre, block_sums(hb), saturated, head_pre, head_cos(hb) if with_head else math.nan

        draws = self.draw_tasks(ahead) if ahead is not None else []
        done = pool.map(lambda task: task(), [lambda rows=rows: block(rows) for rows in chunks] + draws)
        parts = done[:len(chunks)]
        cache = None
        if blockwise:
            if not stats or later:
                ms_h = mean_of_row_squares([p[1] for p in parts], h.size)
            else:
                sat = sum(p[2] for p in parts) / z.size
                heads = (parts[0][3], parts[0][4]) if chunks[0].stop >= head_rows else (head_cos(z), head_cos(h))
                pre, ms_z = from_sums(z, [p[0] for p in parts], log_z, 0.0 if linear else sat, heads[0])
                if linear:
                    post, ms_h = pre, ms_z
                else:
                    post, ms_h = from_sums(h, [p[1] for p in parts], log_h, sat, heads[1])
            # phi(0) != 0 but every phi far below 1 (sigmoid of a layer of large negative values): float32
            # values at scale 1 lose them to underflow, the phased path scales them up first.
            blockwise = act.phi0 == 0 or ms_h >= MS_BAND[0]
            if blockwise and later:
                sat = sum(p[2] for p in parts) / z.size
                pre = self.later.stats(z, log_z, 0.0 if linear else sat)
                post = pre if linear else self.later.stats(h, log_h, sat)
        if not blockwise:  # the whole layer's scale is needed: one phase after another
            h = dphi = None  # a block pass's, if one ran: freed before this path's temporaries
            h, log_h, ms_h, pre, post, dphi, cache = self.phased(kind, z, log_z, pool)
        row = None
        if stats:
            row = {"width": n_out, "fan_in": n_in, "fan_out": n_out}
            self.later.then(lambda: row.update({**prefixed("pre", pre), **prefixed("post", post)}))
        tape = Tape(x.u, x.log_s, dphi, cache) if keep else None
        return in_band(Values(h, log_h, ms_h), pool), row, tape

    def back(self, layer: int, tape: Tape, g: Values, row: MutableMapping[str, float], ahead: int | None = None,
             stats: bool = True) -> tuple[Values, dict[str, float] | None]:
        """Layer ``layer`` backward: from the gradient w.r.t. its output to the
        gradient w.r.t. its input and that gradient's statistics; fills the
        row's delta and weight-gradient. ``ahead`` names a layer whose weights
        are drawn meanwhile. With ``stats=False`` (a layer inside a residual
        branch, which reports none of it) only the weight-gradient norm is
        filled and None returned for the statistics; the values are the same."""
        kind, dtype = self.layers[layer - 1], self.dtype
        act = kind.activation.fn
        n_in, n_out, n = kind.dense.fan_in, kind.dense.fan_out, g.u.shape[0]
        pool = self.pool.sized(n * max(n_in, n_out))
        bn_here = kind.bn is not None
        w0, w_scale = self.weights(layer)
        w_ms = self.weight_ms(layer, w0)
        if bn_here:  # the batch Jacobian couples the samples: phase after phase
            v, log_v = g.u, g.log_s
            if kind.bn_post:
                v, log_v = batchnorm.backward(v, log_v, tape.bn)  # float64 until the mask below
            if tape.dphi is not None:
                v = _times_dphi(v, tape.dphi, act)
                log_v += kind.activation.log_gain
            v, log_v = narrow(v, log_v, dtype, pool)
            if kind.bn_pre:
                v, log_v = narrow(*batchnorm.backward(v, log_v, tape.bn), dtype, pool)
            delta, ms_v = side_stats_ms(v, log_v, pool=pool) if stats else (None, mean_square(v, pool))
        else:
            v, log_v = (g.u, g.log_s) if tape.dphi is None else (np.empty_like(g.u), g.log_s + kind.activation.log_gain)
            ms_v = g.ms
        # delta's mean square is not known before the map: g's sets the scale, an overestimate by
        # E[phi'^2] (1/2 for relu); a saturated layer's far smaller delta is caught by in_band.
        c = prescale(n_out, g.ms if not bn_here else ms_v, w_ms, dtype)
        out = np.empty((n, n_in), dtype)
        chunks = row_chunks(n, max(n_in, n_out))
        head_rows = min(ABS_COS_SAMPLES, n)
        w0_t = w0.T
        # Small layers' statistics are taken with others' (Network.later); the sums here serve a large one.
        later = stats and not bn_here and Later.takes(out) and Later.takes(v)
        sums = stats and not later

        def block(rows: slice) -> tuple[Sums | None, Sums | np.ndarray | None, float, float]:
            with_head = sums and rows.start == 0 and rows.stop >= head_rows
            delta_sums, head_delta = None, math.nan
            if not bn_here and tape.dphi is not None:
                vb = _times_dphi(g.u[rows], tape.dphi[rows], act, out=v[rows])
                delta_sums = block_sums(vb) if sums else None
                head_delta = head_cos(vb) if with_head else math.nan
            ob = out[rows]
            np.matmul(v[rows], w0_t, out=ob)
            ob *= c
            return (delta_sums, block_sums(ob) if sums else row_squares(ob) if later else None, head_delta,
                    head_cos(ob) if with_head else math.nan)

        # The previous layer's weight-gradient products share this map: one barrier fewer per layer.
        earlier, finish_earlier = self._pending_grad
        draws = self.draw_tasks(ahead) if ahead is not None else []
        done = pool.map(lambda task: task(), earlier + [lambda rows=rows: block(rows) for rows in chunks] + draws)
        finish_earlier(done[:len(earlier)])
        parts = done[len(earlier):len(earlier) + len(chunks)]
        heads_ok = chunks[0].stop >= head_rows
        log_out = log_v + math.log(w_scale) - math.log(float(c))
        if not stats:
            # The mean square alone (it sets the next scale): block_sums' row squares, bit for bit.
            self._finish_back(tape, v, log_v, row)
            return in_band(Values(out, log_out, mean_square(out, pool)), pool), None
        # A linear layer's delta is the gradient that came in, whose statistics a table row gets from the
        # layer above (run._backward, perhaps once Later has them); a scratch row (a projection's) has none.
        came_in = tape.dphi is None and not bn_here and (not isinstance(row, dict) or "grad_std" in row)
        if came_in:
            self.later.then(lambda: row.update({f"delta_{k}": row[f"grad_{k}"] for k in STATS}))
        if later:
            if not came_in:
                delta = self.later.stats(v, log_v)
                self.later.then(lambda: row.update(prefixed("delta", delta)))
            grad = self.later.stats(out, log_out)
            self._finish_back(tape, v, log_v, row)
            return in_band(Values(out, log_out, mean_of_row_squares([p[1] for p in parts], out.size)), pool), grad
        if not bn_here and not came_in:
            delta = (side_stats_ms(v, log_v, pool=pool)[0] if tape.dphi is None else
                     from_sums(v, [p[0] for p in parts], log_v, head=parts[0][2] if heads_ok else head_cos(v))[0])
        if not came_in:
            row.update(prefixed("delta", delta))
        grad, ms_out = from_sums(out, [p[1] for p in parts], log_out, head=parts[0][3] if heads_ok else head_cos(out))
        self._finish_back(tape, v, log_v, row)
        return in_band(Values(out, log_out, ms_out), pool), grad

    def _finish_back(self, tape: Tape, v: np.ndarray, log_v: float, row: MutableMapping[str, float]) -> None:
        """Leave the weight-gradient norm ||u_in^T v|| pending, for the next layer's map (or flush_grad)."""
        # ||u_in^T v||_F by fixed blocks of the weight gradient's rows, none of it kept, computed
        # in the next layer's map (or by flush_grad). Squares summed in the compute dtype: the
        # product's own rounding is already that large.
        u_t, log_uv = tape.u_in.T, tape.log_in + log_v

        def finish(squares: list[float]) -> None:
            norm = math.sqrt(math.fsum(squares))
            log_norm = math.log(norm) + log_uv if norm > 0 else -math.inf
            row["weight_grad_log10_norm"] = log_norm / math.log(10)
            row["weight_grad_norm"] = exp_times(1.0, log_norm)
        self._pending_grad = ([lambda rows=rows: sum_squares(u_t[rows] @ v)
                               for rows in row_chunks(u_t.shape[0], v.shape[1])], finish)

    def after_grad(self, then: Callable[[], None]) -> None:
        """Call ``then`` once the weight-gradient norm :meth:`back` left pending is in (at once if none
        is): in the map that computes it, the next layer's (or :meth:`flush_grad`'s). So a caller that
        needs the norm need not flush it in a map of its own, one product the other threads wait out."""
        tasks, finish = self._pending_grad
        if not tasks:
            then()
            return

        def finished(squares: list[float]) -> None:
            finish(squares)
            then()
        self._pending_grad = (tasks, finished)

    def flush_grad(self) -> None:
        """Compute the weight-gradient norm that :meth:`back` left pending."""
        tasks, finish = self._pending_grad
        finish(self.pool.map(lambda task: task(), tasks))
        self._pending_grad = _NOTHING_PENDING

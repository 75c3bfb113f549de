"""Residual blocks forward and backward: ``x_l = x_(l-1) + alpha f(x_(l-1) / beta)``.

A block is one row of the table. Its branch f is the pre-activation lead
([batch norm ->] activation on the block's input) and then dense layers,
which the plain stack's :class:`~varprop.montecarlo.stepper.Network` steps
as it steps any layer (their seeds are their places among all dense
layers); this module adds the lead, the skip and the sum. Values stay in
``(u, log s)`` form throughout, so 10,000 blocks of alpha = 1 (a variance of
2^10000) never overflow.

A branch that is exactly zero at init (alpha = 0, SkipInit; a zero last
layer, Fixup) leaves the block's input untouched, bit for bit, forward and
backward; its statistics are still measured. Where the width changes, the
skip is a projection shortcut, a dense layer stepped like the branch's, on
the lead's output (pre-activation order) or the block's input: the block is
then ``P h + alpha f``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, MutableMapping

import numpy as np

from ..nn import activations, batchnorm, layers
from ..parallel import row_chunks
from ..logscale import exp_times
from ..stats import (ABS_COS_SAMPLES, LN10, STATS, Later, block_sums, from_sums, head_cos, mean_of_row_squares,
                     mean_square, side_stats_ms)
from .scaled import Values, in_band, narrow, sum_squares
from .stepper import Network, Tape, _times_dphi, prefixed

# The sides a residual row has beyond pre (alpha f, what the block adds) and post (the stream x_l).
BRANCH_SIDE = "branch"  # f before alpha: NFNets' res_avg_var is its unit_var


@dataclass
class BlockTape:
    """One block's record for the backward pass."""

    lead_dphi: np.ndarray | None = None  # the lead activation's phi' (bool for relu-type)
    lead_bn: batchnorm.Cache | None = None
    branch: list[Tape] = field(default_factory=list)  # the branch's nonzero dense layers, in order
    zero_in: Values | None = None  # the input of a zero-initialised last layer (for its weight gradient)
    projection: Tape | None = None  # the projection shortcut's


def _alpha_stats(branch: dict[str, float], alpha: float) -> dict[str, float]:
    """The statistics of ``alpha f`` from those of f (alpha >= 0)."""
    if alpha == 0:
        out = {k: 0.0 for k in STATS}
        out.update(log10_std=-math.inf, log10_abs_mean=-math.inf, log10_sq_unit_mean=-math.inf,
                   log10_unit_var=-math.inf, frac_zero=1.0, cos_sim=math.nan, abs_cos_sim=math.nan,
                   frac_saturated=branch["frac_saturated"])
        return out
    la = math.log(alpha)
    out = dict(branch)
    out.update(mean=exp_times(branch["mean"], la), std=exp_times(branch["std"], la),
               log10_std=branch["log10_std"] + la / LN10, log10_abs_mean=branch["log10_abs_mean"] + la / LN10,
               **{k: exp_times(branch[k], 2 * la) for k in ("second_moment", "sq_unit_mean", "unit_var")},
               **{k: branch[k] + 2 * la / LN10 for k in ("log10_sq_unit_mean", "log10_unit_var")})
    return out


def _zero_stats() -> dict[str, float]:
    return _alpha_stats({"frac_saturated": 0.0}, 0.0)


class Blocks:
    """A residual stack for one replicate, stepping blocks with the
    interface of :class:`~varprop.montecarlo.stepper.Network` (``step``,
    ``back``, ``flush_grad``), one block per row.

    A block costs its branch's layers plus one addition: the sum's
    statistics are taken in the addition's own pass (a small block's with
    other layers', stats.Later), the branch's come from its last dense
    layer's, and values whose statistics are not
    reported get a mean square only (their scale): forward, and backward
    inside the branch, where only the weight-gradient norms are kept."""

    def __init__(self, net: Network):
        self.net, self.pool, self.later = net, net.pool, net.later
        self.kinds: tuple[layers.Residual, ...] = net.kinds  # type: ignore[assignment]
        for b, kind in enumerate(self.kinds, 1):  # a residual run reports blocks: messages name them
            net.labels.update({layer.index: f"block {b}, branch layer {i}" for i, layer in enumerate(kind.branch, 1)})
            if kind.projection is not None:
                net.labels[kind.projection.index] = f"block {b}, projection"
        # The last block's output and its statistics: a zero branch passes it on unchanged.
        self._stream: tuple[Values, dict[str, float]] | None = None

    def _live(self, block: int) -> tuple[layers.Layer, ...]:
        """The dense layers of a block's branch that are not zero."""
        return tuple(layer for layer in self.kinds[block - 1].branch if layer.dense.factor != 0)

    def _first(self, block: int | None) -> int | None:
        live = self._live(block) if block is not None else ()
        return live[0].index if live else None

    def _last(self, block: int | None) -> int | None:
        live = self._live(block) if block is not None else ()
        return live[-1].index if live else None

    def _add(self, x: Values, f: Values, log_alpha: float, stats: bool) -> tuple[Values, dict[str, float] | None]:
        """``x + exp(log_alpha) f`` in the scale of the larger term, in band, and
        with ``stats`` its statistics, summed in the addition's pass."""
        net = self.net
        pool = net.pool.sized(x.u.size)
        log_f = log_alpha + f.log_s
        top = max(x.log_s, log_f)
        cx, cf = net.dtype(math.exp(x.log_s - top)), net.dtype(math.exp(log_f - top))
        u = np.empty_like(x.u)
        head_rows = min(ABS_COS_SAMPLES, u.shape[0])
        later = stats and Later.takes(u)  # the statistics are taken with other small layers' (Network.later)

        def add(rows: slice) -> tuple[Any, float]:
            np.multiply(x.u[rows], cx, out=u[rows])
            u[rows] += f.u[rows] * cf
            if not stats or later:
                return None, math.nan
            head = head_cos(u[rows]) if rows.start == 0 and rows.stop >= head_rows else math.nan
            return block_sums(u[rows]), head
        chunks = row_chunks(*u.shape)
        parts = pool.map(add, chunks)
        if not stats or later:
            v = in_band(Values(u, top, mean_square(u, pool)), pool)
            return v, self.later.stats(v.u, v.log_s) if later else None
        head = parts[0][1] if chunks[0].stop >= head_rows else head_cos(u)
        row, ms = from_sums(u, [p[0] for p in parts], top, head=head)
        summed = Values(u, top, ms)
        v = in_band(summed, pool)  # renormalised (a new Values) only where the sum's mean square left the band
        return v, row if v is summed else side_stats_ms(v.u, v.log_s, pool=pool)[0]

    def _stats(self, v: Values) -> dict[str, float]:
        """The statistics of ``v``, reused when ``v`` is the last block's output."""
        if self._stream is not None and self._stream[0] is v:
            return self._stream[1]
        return side_stats_ms(v.u, v.log_s, pool=self.net.pool)[0]

    def step(self, block: int, x: Values, stats: bool, keep: bool, ahead: int | None = None
             ) -> tuple[Values, dict[str, Any] | None, BlockTape | None]:
        """Block ``block`` forward: its output, its statistics row, its tape.
        ``ahead`` names a block whose first weights are drawn meanwhile."""
        kind, net = self.kinds[block - 1], self.net
        tape = BlockTape() if keep else None
        b = x if kind.beta == 1 else Values(x.u, x.log_s - math.log(kind.beta), x.ms)
        if kind.lead is not None:
            b, dphi, cache = self._lead(kind.lead, b, block, keep)
            if tape is not None:
                tape.lead_dphi, tape.lead_bn = dphi, cache
        skip_in = b if kind.projects_lead else x
        live = self._live(block)
        branch = _zero_stats()
        for i, layer in enumerate(live):
            nxt = (live[i + 1].index if i + 1 < len(live)
                   else kind.projection.index if kind.projection is not None else self._first(ahead))
            last = stats and i + 1 == len(live) and not kind.zero_branch
            b, layer_row, t = net.step(layer.index, b, stats=last, keep=keep, ahead=nxt)
            if last:
                # f is the last dense layer's output, whose statistics its own pass summed. That output is
                # prescaled to a mean square near 1 (or batch-normed), so in_band leaves it as summed.
                # f ends in a dense layer (or BN), not an activation: no saturated fraction.
                self.later.then(lambda layer_row=layer_row: branch.update(
                    {**{k: layer_row[f"post_{k}"] for k in STATS}, "frac_saturated": math.nan}))
            if tape is not None and t is not None:
                tape.branch.append(t)
        if kind.zero_branch and tape is not None:
            tape.zero_in = b
        skip = x
        if kind.projection is not None:
            skip, _, t = net.step(kind.projection.index, skip_in, stats=False, keep=keep, ahead=self._first(ahead))
            if tape is not None:
                tape.projection = t
        if kind.zero_branch or kind.alpha == 0:
            out, post = skip, self._stats(skip) if stats else None
        else:
            out, post = self._add(skip, b, math.log(kind.alpha), stats)
        row = None
        if stats:
            assert post is not None
            self._stream = (out, post)
            row = {"width": kind.width, "fan_in": kind.width_in, "fan_out": kind.width}
            alpha = 0.0 if kind.zero_branch else kind.alpha
            self.later.then(lambda: row.update({**prefixed("pre", _alpha_stats(branch, alpha)),
                                                **prefixed("post", post), **prefixed(BRANCH_SIDE, branch)}))
        return out, row, tape

    def _lead(self, lead: layers.Lead, b: Values, block: int, keep: bool
              ) -> tuple[Values, np.ndarray | None, batchnorm.Cache | None]:
        """[batch norm ->] activation on the branch's input (the pre-activation order); phi' with ``keep``."""
        net = self.net
        pool = net.pool.sized(b.u.size)
        u, log_s, cache = b.u, b.log_s, None
        if lead.bn is not None:
            u, log_s, cache = net._bn(u, log_s, lead.bn, f"block {block}, before its branch")
        act = lead.activation.fn
        if lead.activation.linear:  # the input itself, or batch norm's new values
            return Values(u, log_s, b.ms if cache is None else mean_square(u, pool)), None, cache
        h, log_h = narrow(*activations.apply_scaled(act, u.astype(np.float64, copy=False) if act.phi0 else u, log_s),
                          net.dtype, pool)
        log_h += lead.activation.log_gain
        dphi = None
        if keep:  # for the backward pass
            d = activations.dphi_scaled(act, u, log_s)
            dphi = d == act.slope_pos if act.homogeneous else d.astype(net.dtype, copy=False)
        return in_band(Values(h, log_h, mean_square(h, pool)), pool), dphi, cache

    def back(self, block: int, tape: BlockTape, g: Values, row: MutableMapping[str, float], ahead: int | None = None
             ) -> tuple[Values, dict[str, float]]:
        """Block ``block`` backward: the gradient w.r.t. its input (the skip's
        g plus the branch's) and that gradient's statistics; fills the row's
        delta (the branch's share of the input gradient) and, once the next
        map (or :meth:`flush_grad`) has computed the branch's last pending
        product, its weight-gradient norm (all the block's weights)."""
        kind, net = self.kinds[block - 1], self.net
        pool = net.pool.sized(g.u.size)
        log_alpha = math.log(kind.alpha) if kind.alpha > 0 else -math.inf
        log_squares: list[float] = []  # log ||dL/dW||_F^2 of each dense layer with a nonzero gradient
        norms: list[dict[str, float]] = []  # each branch layer's weight-gradient norm, once in
        if kind.zero_branch and kind.alpha > 0 and tape.zero_in is not None:  # a^T (alpha g) of the zero layer
            a_t = tape.zero_in.u.T
            total = math.fsum(pool.map(lambda rows: sum_squares(a_t[rows] @ g.u),
                                       row_chunks(a_t.shape[0], g.u.shape[1])))
            if total > 0:
                log_squares.append(math.log(total) + 2 * (tape.zero_in.log_s + g.log_s + log_alpha))
        g_stats: dict[str, float] = {}  # g's, which the block above (or the start) reports to the row first
        self.later.then(lambda: g_stats.update({k: row[f"grad_{k}"] for k in STATS}))
        skip, skip_stats = g, g_stats  # the skip's share of the gradient reaching the block's input
        if kind.projection is not None:
            assert tape.projection is not None
            scratch_p: dict[str, float] = {}
            skip, skip_stats = net.back(kind.projection.index, tape.projection, g, scratch_p)
            net.flush_grad()
            if scratch_p["weight_grad_log10_norm"] > -math.inf:
                log_squares.append(2 * LN10 * scratch_p["weight_grad_log10_norm"])
            if kind.projects_lead:  # through the lead (and beta) the branch shares
                u, log_s = self._lead_back(kind.lead, tape, skip)
                skip = in_band(Values(u, log_s - math.log(kind.beta), mean_square(u, pool)), pool)
                skip_stats = side_stats_ms(skip.u, skip.log_s, pool=pool)[0]
        if kind.zero_branch or kind.alpha == 0:
            out, delta, grad = skip, _zero_stats(), skip_stats
        else:
            v = Values(g.u, g.log_s + log_alpha, g.ms)
            live = self._live(block)
            # Inside the branch only the weight gradients are reported: no statistics are taken there.
            norms += [{} for _ in live]
            for i in range(len(live) - 1, -1, -1):
                nxt = live[i - 1].index if i > 0 else self._last(ahead)
                v, _ = net.back(live[i].index, tape.branch[i], v, norms[i], ahead=nxt, stats=False)
            u, log_s = v.u, v.log_s
            if kind.lead is not None:
                u, log_s = self._lead_back(kind.lead, tape, v)
            # The branch's gradient, summed once: its scale (the mean square, before beta) and delta (after); a
            # small one's statistics are taken with other small layers'.
            later = Later.takes(u)
            if later:
                summed = Values(u, log_s, mean_square(u, pool))
            else:
                *parts, head = pool.map(lambda rows: block_sums(u[rows]) if rows is not None else head_cos(u),
                                        [*row_chunks(*u.shape), None])
                summed = Values(u, log_s, mean_of_row_squares([p.row_sq for p in parts], u.size))
            v = in_band(summed, pool)
            renormed = v is not summed
            if kind.beta != 1:
                v = Values(v.u, v.log_s - math.log(kind.beta), v.ms)
            delta = (self.later.stats(v.u, v.log_s) if later else side_stats_ms(v.u, v.log_s, pool=pool)[0]
                     if renormed else from_sums(u, parts, v.log_s, head=head)[0])
            out, grad = self._add(skip, v, 0.0, True)
        self.later.then(lambda: row.update(prefixed("delta", delta)))

        def weight_norm() -> None:
            squares = log_squares + [2 * LN10 * s["weight_grad_log10_norm"] for s in reversed(norms)
                                     if s["weight_grad_log10_norm"] > -math.inf]
            log_norm = 0.5 * float(np.logaddexp.reduce(squares)) if squares else -math.inf
            row["weight_grad_log10_norm"] = log_norm / LN10
            row["weight_grad_norm"] = exp_times(1.0, log_norm)
        # The branch's first layer's norm is computed in the next map (the next block's), not flushed here.
        net.after_grad(weight_norm)
        assert grad is not None
        return out, grad

    def _lead_back(self, lead: layers.Lead, tape: BlockTape, v: Values) -> tuple[np.ndarray, float]:
        """The gradient through the lead: times gain phi', then batch norm's backward."""
        net = self.net
        pool = net.pool.sized(v.u.size)
        u, log_s = v.u, v.log_s
        if tape.lead_dphi is not None:
            u = _times_dphi(u, tape.lead_dphi, lead.activation.fn)
            log_s += lead.activation.log_gain
        if tape.lead_bn is not None:
            u, log_s = narrow(*batchnorm.backward(u, log_s, tape.lead_bn), net.dtype, pool)
        return u, log_s

    def flush_grad(self) -> None:
        """As :meth:`Network.flush_grad`: the last block's weight-gradient norm, which no later map took."""
        self.net.flush_grad()

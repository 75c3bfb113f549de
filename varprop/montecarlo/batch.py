"""Replicates of small layers stepped together: the forward pass of several
replicates of one configuration, layer by layer, each pass over their
stacked values made once.

A width-100 layer of 500 samples is a 0.1 ms product; stepped one replicate
at a time, the Python around it (the scaled product, the activation, both
sides' float64 sums and cosines, the row) costs four times that. Stacked,
that cost is paid once per layer for a group of replicates. Every replicate
keeps its own numbers, bit for bit: its weights and inputs come from its own
nodes of the seed tree, its scale factors are its own, and each stacked
operation runs the kernel the one-replicate step runs on the same shapes
(``np.matmul`` over a stack calls the same BLAS routine once per matrix;
the float64 sums copy each block to a 64-byte boundary as
:func:`varprop.stats.block_sums` does). tests/test_batch.py compares the two
paths.

Only what is small and plain is stacked: forward passes without bias, batch
norm or an input file, built-in non-orthogonal inits, layers of one block
(:data:`varprop.parallel.CHUNK_ELEMENTS`), in groups of at most
:data:`GROUP_ELEMENTS` values so memory stays that of one large layer. A
replicate whose layer needs the whole layer's scale takes the phased path
(:meth:`Network.phased`) for that layer alone.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from ..nn import activations, inits, layers
from ..parallel import CHUNK_ELEMENTS, SERIAL, available_cores, row_chunks
from ..spec import RunSpec
from ..stats import SATURATION, side_stats_stacked
from .scaled import MS_BAND, Values, in_band, prescale
from .seeds import generator
from .stepper import Network, prefixed

# A group's stacked layer holds at most this many values: one block of a large layer (its float64 copies
# stay in a core's cache; larger groups ran slower).
GROUP_ELEMENTS = CHUNK_ELEMENTS


def group_size(spec: RunSpec) -> int:
    """How many replicates of ``spec`` step together: 1 when its layers are
    not all small and plain (then each replicate runs alone, as before)."""
    net, scheme = spec.network, spec.network.init.resolve()
    if (spec.backward or spec.input_file is not None or net.residual is not None or net.bn_layers
            or scheme.user is not None or scheme.orthogonal or inits.has_bias(scheme, net.bias_std)):
        return 1
    kinds = layers.build(net)
    if any(kind.dense.factor != 1 or kind.dense.standardized or kind.activation.gain != 1 for kind in kinds):
        return 1
    if spec.dtype != "float32" and not all(kind.activation.fn.homogeneous for kind in kinds):
        return 1  # every such layer takes the phased path: nothing to stack
    n = spec.samples
    widest = max(net.widths)
    for n_in, n_out in zip(net.widths[:-1], net.widths[1:]):
        if n * max(n_in, n_out) >= CHUNK_ELEMENTS or len(row_chunks(n_in, n_out)) > 1:
            return 1
    return max(1, min(spec.replicates, GROUP_ELEMENTS // (n * widest)))


def working_bytes(spec: RunSpec) -> int:
    """Memory of the stacked forward pass: on each core a group's input,
    product, output and phi' (compute dtype), weights, and the float64 copy
    of the statistics; 0 when replicates run alone."""
    size = group_size(spec)
    if size < 2:
        return 0
    item = 8 if spec.dtype == "float64" else 4
    widths = spec.network.widths
    values = size * spec.samples * max(widths)
    weights = size * max(a * b for a, b in zip(widths[:-1], widths[1:]))
    return min(available_cores(), spec.replicates) * (values * (4 * item + 8) + weights * item)


def forward(spec: RunSpec, replicates: Sequence[int], xs: list[Values],
            on_layer: Callable[[int, list[Values], list[dict[str, float]]], None]) -> None:
    """The forward pass of ``replicates`` (a group that :func:`group_size`
    allows) from their inputs ``xs``; ``on_layer(layer, values, rows)``
    receives each layer's output and statistics row, per replicate."""
    nets = [Network(spec, r, SERIAL) for r in replicates]
    net0, dtype = nets[0], nets[0].dtype
    scheme = net0.scheme
    u = np.stack([x.u for x in xs])
    w_ms = inits.unit_sd(scheme.distribution) ** 2  # Network.weight_ms for draws by blocks
    for kind in net0.layers:
        layer, act, linear = kind.index, kind.activation.fn, kind.activation.linear
        n_in, n_out = kind.dense.fan_in, kind.dense.fan_out
        w = np.empty((len(nets), n_in, n_out), dtype)
        for k, net in enumerate(nets):  # Network.draw_tasks' one block
            w[k] = inits.standard_draw(scheme.distribution, generator(spec.seed, net.rep, layer, "weights", 0),
                                       (n_in, n_out), dtype)
        w_scale = inits.weight_scale(scheme, n_in, n_out)
        cs = [prescale(n_in, x.ms, w_ms, dtype) for x in xs]
        log_z = [x.log_s + math.log(w_scale) - math.log(float(c)) for x, c in zip(xs, cs)]
        z = np.matmul(u, w)
        del w
        z *= np.array(cs, dtype)[:, None, None]
        gain = kind.activation.log_gain
        log_h = [(lz if act.homogeneous else 0.0) + gain for lz in log_z]  # as Network.step books them
        if linear:
            h, d = z, None
        elif act.homogeneous and act.both is None:  # phi and phi' do not depend on the scale
            h, _, d = activations.phi_dphi_scaled(act, z, 0.0)
        else:
            h, d = np.empty_like(z), np.empty_like(z)
            for k in range(len(nets)):
                h[k], _, d[k] = activations.phi_dphi_scaled(act, z[k], log_z[k])
        sat = ([0.0] * len(nets) if d is None else
               (np.count_nonzero(np.abs(d) < SATURATION, axis=(1, 2)) / (z.shape[1] * z.shape[2])).tolist())
        pre = side_stats_stacked(z, log_z, [0.0] * len(nets) if linear else sat)
        post = pre if linear else side_stats_stacked(h, log_h, sat)
        views = list(h)
        values, rows = [], []
        for k, net in enumerate(nets):
            (pre_k, _), (post_k, ms_h) = pre[k], post[k]
            blockwise = act.homogeneous or (dtype is np.float32 and abs(log_z[k]) < activations.LOG_DIRECT_F32)
            # As Network.step decides: phi(0) != 0 with every phi far below 1 takes the phased path too.
            if blockwise and (act.phi0 == 0 or ms_h >= MS_BAND[0]):
                hk, log_hk = views[k], log_h[k]
            else:
                hk, log_hk, ms_h, pre_k, post_k, _, _ = net.phased(kind, z[k], log_z[k], SERIAL)
            values.append(in_band(Values(hk, log_hk, ms_h), SERIAL))
            rows.append({"width": n_out, "fan_in": n_in, "fan_out": n_out, **prefixed("pre", pre_k),
                         **prefixed("post", post_k)})
        on_layer(layer, values, rows)
        xs = values
        # The stack is the next layer's input unless a replicate's values moved (phased, or renormalised anew).
        u = h if all(v.u is view for v, view in zip(values, views)) else np.stack([v.u for v in values])

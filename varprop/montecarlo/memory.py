"""How much memory a run needs, decided before anything large is allocated.

One budget, ``--max-memory`` (default: half of the memory available now),
holds everything a run allocates: the forward pass's working set (one layer
and two weight matrices), the backward pass's tape (or its checkpoints), and
what grows with the number of layers and replicates: the per-layer table,
the theory's per-layer state and the report made from them. The Python
interpreter and the libraries (about 170 MB) are not counted.

Every size-like option of every command passes through :func:`refuse_beyond`
(directly, or through :func:`check` for simulate), so a run that cannot fit
is refused in one line naming ``--max-memory`` before it starts, and a
mistyped size (``--layers 1e9``) never builds a billion-entry tuple first.

>>> need = table_bytes(layers=100, replicates=10)
>>> 1 << 20 < need < 64 << 20
True
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Sequence

from ..errors import SpecError

from ..nn import layers

if TYPE_CHECKING:
    from ..spec import Config, RunSpec

# Bytes per (replicate, layer) row carried from the engine to the written report: the float64 row itself
# (50-100 columns), its copies in the DataFrame, the merge with theory, the summary over replicates and
# the CSV writer's buffers. Measured peak (tracemalloc) 2-3 kB a row for 10,000 to 40,000 layers;
# tests/test_memory.py checks that the estimate bounds the measured peak.
ROW_BYTES = 4096
# Bytes per layer of the theory's recursion, once per configuration: its moments and, where the c-map takes
# Mehler's series, the series of a new q at each layer (He/elu: 8.6 kB a layer alone, 17.4 kB a layer for the
# whole command at 10,000 layers); closed forms (linear, relu, leaky relu) keep about 1 kB a layer.
THEORY_LAYER_BYTES = 16 * 1024
THEORY_CLOSED_FORM_LAYER_BYTES = 1536


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


def budget(max_memory: int | None) -> int:
    """The byte budget: ``max_memory``, or half of what is available now."""
    return max_memory or default_max_memory()


def human(n: float) -> str:
    """Bytes in the largest binary unit that keeps a number >= 1.

    >>> human(3 * 2**30), human(1536), human(12)
    ('3.00 GiB', '1.50 KiB', '12 bytes')
    """
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} bytes"


def refuse_beyond(need: float, max_memory: int | None, what: str, fix: str, option: str = "max_memory") -> None:
    """Raise SpecError when ``need`` bytes exceed the budget: ``what`` names
    what needs them, ``fix`` what to change."""
    limit = budget(max_memory)
    if need > limit:
        source = "--max-memory" if max_memory else "half of the memory available now"
        raise SpecError(option, f"{what} needs about {human(need)}, more than the {human(limit)} allowed "
                        f"({source}); {fix}")


# The report's figures: canvases and their PNG renderings (measured 8.5 MB for one configuration),
# and each configuration's lines, legends and tables (measured 1.4 MB each for 12 configurations).
REPORT_BYTES = 16 * 2**20
REPORT_CONFIG_BYTES = 2 * 2**20
# Bytes per point of a phase diagram's grid: the q-map at 240 nodes, and Mehler's series of each chaotic
# point's q* (measured 15-16 kB a point, tanh, 1,200 to 10,800 points).
PHASE_POINT_BYTES = 24 * 1024


def table_bytes(layers: int, replicates: int, closed_form: bool = False) -> int:
    """The per-layer table, theory and report of one configuration
    (``closed_form``: the theory of homogeneous activations, which keeps less)."""
    theory = THEORY_CLOSED_FORM_LAYER_BYTES if closed_form else THEORY_LAYER_BYTES
    return (layers + 1) * (replicates * ROW_BYTES + theory)


def precheck(layers: int, widths_max: int, samples: int, replicates: int, max_memory: int | None,
             option: str = "max_memory", fix: str | None = None) -> None:
    """Refuse sizes that cannot fit, from the numbers alone (before a spec,
    whose widths tuple alone is 8 bytes a layer, is built); the refusal names
    ``option`` and says ``fix``. A lower bound (the theory's smallest
    footprint): :func:`check` decides on the whole configuration later."""
    need = (table_bytes(layers, replicates, closed_form=True) + 2 * widths_max * widths_max * 4
            + 6 * samples * widths_max * 8)
    what = (f"a run of {layers:,} layer{'s' if layers > 1 else ''} of width {widths_max:,}"
            + (f", {samples:,} samples" if samples > 1 else "")
            + (f" and {replicates:,} replicates" if replicates > 1 else ""))
    refuse_beyond(need, max_memory, what, fix or "use fewer --layers, --replicates or --samples, or a narrower "
                  "--width, or raise --max-memory", option)


def tape_bytes(spec: RunSpec) -> list[int]:
    """Bytes the backward pass keeps per layer (index l for layer l >= 1)."""
    import numpy as np

    n, item = spec.samples, np.dtype(spec.dtype).itemsize
    return [0] + [layer_tape_bytes(kind, n, item) for kind in layers.build(spec.network)]


def layer_tape_bytes(kind: layers.Kind, samples: int, item: int) -> int:
    """Bytes one layer's tape keeps: its input, its activation derivative
    (a bool per entry for relu-type, none for linear) and batch norm's
    standardized values; a residual block's, its lead's and its branch's."""
    if isinstance(kind, layers.Residual):
        n = samples * kind.width_in
        lead = 0
        if kind.lead is not None:
            act = kind.lead.activation
            lead = n * ((0 if act.linear else 1 if act.fn.homogeneous else item) + (item if kind.lead.bn else 0))
        zero_in = samples * kind.width * item if kind.zero_branch else 0
        dense = [layer for layer in kind.branch if layer.dense.factor != 0] + (
            [kind.projection] if kind.projection is not None else [])
        return lead + zero_in + sum(layer_tape_bytes(layer, samples, item) for layer in dense)
    act = kind.activation
    dphi = 0 if act.linear else 1 if act.fn.homogeneous else item
    bn = item if kind.bn is not None else 0
    return samples * (kind.dense.fan_in * item + kind.dense.fan_out * (dphi + bn))


def working_bytes(spec: RunSpec) -> int:
    """Memory of the forward pass at the widest layer: two weight matrices
    (this layer's and the next, drawn meanwhile), a few layer-sized float64
    temporaries (the phased path of batch norm and of extreme scales) and the
    stacks of small layers waiting for their statistics (stats.Later); or, when
    small layers step several replicates together, their groups' stacks."""
    w = spec.network.widths
    item = 8 if spec.dtype == "float64" else 4
    weights = max(_weight_sizes(spec)) * item * (2 if spec.network.init.resolve().orthogonal else 1)
    from ..stats import LATER_ELEMENTS  # (as batch below: pandas and scipy, which this module's readers need not load)
    from . import batch  # (batch imports the stepper)

    return max(2 * weights + 6 * spec.samples * max(w) * 8 + LATER_ELEMENTS * item, batch.working_bytes(spec))


def weight_bytes(spec: RunSpec) -> int:
    """Bytes of all the weight matrices of one network."""
    return sum(_weight_sizes(spec)) * (8 if spec.dtype == "float64" else 4)


def _weight_sizes(spec: RunSpec) -> list[int]:
    """Entries of each dense layer's weights: a plain stack's one per pair of widths; a residual stack's
    branch layers (n_out x n_out beyond the first) and projection shortcuts too."""
    net = spec.network
    if net.residual is None:
        return [a * b for a, b in zip(net.widths[:-1], net.widths[1:])]
    return [layer.dense.fan_in * layer.dense.fan_out for layer in layers.dense_layers(layers.build(net))]


def run_bytes(spec: RunSpec) -> int:
    """What one configuration adds to the run: its table, theory and report."""
    from ..nn import activations

    net = spec.network
    closed = all(activations.get(net.activation_at(l), net.leaky_slope).homogeneous
                 for l in {1, net.depth})
    return table_bytes(net.depth, spec.replicates, closed_form=closed) + REPORT_CONFIG_BYTES


def keeps_weights(spec: RunSpec, reserved: int = 0) -> bool:
    """Whether the backward pass keeps the forward pass's weights rather than
    drawing them again: only orthogonal and user-drawn ones (a QR or a user
    call per layer), and only when everything fits in ``max_memory``. Weights
    drawn by blocks are drawn again beside the layer above's backward work,
    which costs no more time than first touching that much fresh memory does
    (benchmarks/) and halves the backward pass's memory."""
    scheme = spec.network.init.resolve()
    return (spec.backward and (scheme.orthogonal or scheme.user is not None)
            and reserved + sum(tape_bytes(spec)) + weight_bytes(spec) + working_bytes(spec) <= budget(spec.max_memory))


def backward_plan(spec: RunSpec, reserved: int | None = None) -> int:
    """The checkpoint spacing k of the backward pass (k = L: every layer kept;
    0 without a backward pass), within the budget less ``reserved`` bytes
    (default: this configuration's table, theory and report, and the figures).

    Raises SpecError naming ``--max-memory`` when the run cannot fit, not even
    with checkpointing.
    """
    reserved = REPORT_BYTES + run_bytes(spec) if reserved is None else reserved
    working = working_bytes(spec) + reserved
    fix = "use fewer --samples, --layers or --replicates, or a narrower --width, or raise --max-memory"
    if not spec.backward:
        refuse_beyond(working, spec.max_memory, "the run", fix)
        return 0
    per_layer = tape_bytes(spec)
    depth = spec.network.depth
    if sum(per_layer) + working <= budget(spec.max_memory):
        return depth
    k = max(1, math.isqrt(depth))
    checkpoints = (depth // k + 1) * spec.samples * max(spec.network.widths) * (8 if spec.dtype == "float64" else 4)
    segment = max(sum(per_layer[i:i + k]) for i in range(1, depth + 1, k))
    refuse_beyond(checkpoints + segment + working, spec.max_memory,
                  f"the backward pass (with checkpointing; {human(sum(per_layer) + working)} without)", fix)
    return k


def estimate(configs: Sequence[Config]) -> int:
    """The bytes a comparison may use at its peak, as :func:`check` counts
    them: every configuration's table, theory and report, and the largest
    forward (and backward) working set."""
    plans = check(configs)
    return reserved_bytes(configs) + max(replicate_bytes(c.spec, k) for c, k in zip(configs, plans))


def reserved_bytes(configs: Sequence[Config]) -> int:
    """What a comparison holds beside its passes: every configuration's table, theory and report, and the
    figures."""
    return REPORT_BYTES + sum(run_bytes(c.spec) for c in configs)


def replicate_bytes(spec: RunSpec, plan: int) -> int:
    """The peak of one replicate's forward (and backward) pass with checkpoint spacing ``plan``: the
    working set and the tape it keeps."""
    tape = tape_bytes(spec)
    depth = spec.network.depth
    if plan == depth:
        kept = sum(tape)
    elif plan:
        item = 8 if spec.dtype == "float64" else 4
        kept = ((depth // plan + 1) * spec.samples * max(spec.network.widths) * item
                + max(sum(tape[i:i + plan]) for i in range(1, depth + 1, plan)))
    else:
        kept = 0
    return working_bytes(spec) + kept


def check(configs: Sequence[Config]) -> list[int]:
    """Each configuration's :func:`backward_plan`, refusing a comparison that
    cannot fit: the tables of every configuration are held until the report
    is written, and each configuration's forward and backward passes run in
    what is left."""
    reserved = reserved_bytes(configs)
    return [backward_plan(c.spec, reserved) for c in configs]

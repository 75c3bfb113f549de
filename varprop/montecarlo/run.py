"""simulate(): configurations -> the per-layer table, one replicate at a time.

The forward pass holds one layer and two weight matrices at a time. The
backward pass keeps each layer's input and activation derivative when that
fits in ``max_memory`` (memory.py), else keeps only every k-th layer's output
(k ~ sqrt(L)) and recomputes each segment, bit for bit, on the way down.
Every random draw comes from the seed tree (seeds.py) and work is split into
blocks fixed by the shapes (parallel.py), so results do not depend on the
order of work or the thread count.

>>> from varprop.spec import NetworkSpec
>>> df = simulate(NetworkSpec.square(layers=3, width=50, init="fan_in"), samples=200, seed=1)
>>> list(df["layer"])
[0, 1, 2, 3]
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from .. import forked, theory
from ..nn import inits
from ..parallel import CHUNK_ELEMENTS, SERIAL, Pool, check_stopped, row_chunks
from ..run import Configuration, Run
from ..options import parse_threads
from ..spec import Config, NetworkSpec, RunSpec, expand, load_input, to_options
from ..stats import STATS, empty_stats, side_stats, side_stats_ms
from . import batch, memory
from .scaled import Values, narrow
from .residual import BRANCH_SIDE, Blocks, BlockTape
from .seeds import generator
from .stepper import Network, Tape, prefixed

# Histograms of h / rms(h) at the first, middle and last layer of replicate 0.
HIST_EDGES = np.linspace(-4.0, 4.0, 81)


Progress = Callable[[int], None]


def make_inputs(spec: RunSpec, replicate: int) -> tuple[np.ndarray, float]:
    """The N x n_0 inputs of one replicate as ``(u, log_s)``, u in the compute dtype."""
    dtype = np.dtype(spec.dtype)
    n0 = spec.network.widths[0]
    if spec.input_file is not None:
        # Entries near float64's limits (1e308, 1e-300) are first brought near 1 by a power of two (exact).
        x, scale = inits.power_of_two_scaled(load_input(spec.input_file, n0), np.float64)
        return narrow(x, math.log(scale), dtype.type)
    rng = generator(spec.seed, replicate, 0, "inputs")
    if spec.input == "gaussian":
        x = inits.standard_normal(rng, (spec.samples, n0), dtype)
        return x, math.log(spec.input_std)
    x = inits.standard_draw("uniform", rng, (spec.samples, n0), dtype)
    return x, math.log(spec.input_std * math.sqrt(3.0))


def upstream(spec: RunSpec, replicate: int) -> np.ndarray:
    """The N(0, 1) gradient the backward pass starts from: the output's
    gradient of the objective sum(upstream * h_L)."""
    rng = generator(spec.seed, replicate, spec.network.depth, "upstream")
    return inits.standard_normal(rng, (spec.samples, spec.network.widths[-1]), np.dtype(spec.dtype).type)


class Table:
    """One replicate's per-layer statistics: a float64 row per layer 0..L in
    the column order of ``layers.csv`` (a dict per layer took 7 kB, so 40,000
    layers took 300 MB; a row here takes 8 bytes a column). ``row(l)`` gives
    a dict-like view that the forward and backward passes fill."""

    def __init__(self, depth: int, backward: bool, residual: bool = False):
        sides = ("pre", "post") + ((BRANCH_SIDE,) if residual else ()) + (("grad", "delta") if backward else ())
        self.columns = (["width", "fan_in", "fan_out"] + [f"{s}_{k}" for s in sides for k in STATS]
                        + (["weight_grad_norm", "weight_grad_log10_norm"] if backward else []))
        self.at = {c: i for i, c in enumerate(self.columns)}
        self._places: dict[tuple[str, ...], list[int]] = {}  # a row's keys -> their columns
        self.values = np.full((depth + 1, len(self.columns)), np.nan)
        self.hist: dict[int, np.ndarray] = {}  # layer -> histogram counts (replicate 0)

    @staticmethod
    def bytes_per_layer(backward: bool, residual: bool = False) -> int:
        return 8 * (3 + len(STATS) * ((4 if backward else 2) + residual) + (2 if backward else 0))

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
        # One assignment for every key: a row's values set one at a time took 5% of a small network's run.
        table, keys = self.table, tuple(values)
        places = table._places.get(keys)
        if places is None:
            places = table._places[keys] = [table.at[k] for k in keys]
        table.values[self.layer, places] = list(values.values())


def run_replicates(spec: RunSpec, replicates: Iterable[int], progress: Progress | None = None, pool: Pool = SERIAL,
                   plan: int | None = None, reserved: int | None = None) -> list[Table]:
    """:func:`run_replicate` of each of ``replicates``, the same numbers; small
    plain layers step several replicates together (batch.py), in groups that
    run on ``pool``'s threads or in forked processes; other small layers'
    replicates run in forked processes (:func:`replicate_processes`, with
    ``reserved`` bytes held elsewhere)."""
    replicates = list(replicates)
    size = batch.group_size(spec)
    if size < 2 or len(replicates) < 2:
        n = replicate_processes(spec, len(replicates), pool, plan, reserved)
        if n > 1 and forked.forkable():  # small layers, whose steps run in the caller's thread alone
            return forked.share_items(lambda rep, report: run_replicate(spec, rep, report, SERIAL, plan), replicates,
                                      forked.contiguous(len(replicates), n), progress)
        return [run_replicate(spec, rep, progress, pool, plan) for rep in replicates]
    # Groups of equal size, as many as the threads or a multiple: small layers run on every core
    # (one replicate at a time, they ran on one). Groups change the speed, never the numbers.
    n_groups = -(-math.ceil(len(replicates) / size) // pool.threads) * pool.threads
    size = math.ceil(len(replicates) / n_groups)
    groups = [replicates[i:i + size] for i in range(0, len(replicates), size)]
    if pool.threads > 1 and len(groups) > 1 and forked.forkable():
        # A group's layers are short NumPy calls: two threads wait on each other's GIL (1.37x one thread's
        # speed on the seed case), two processes do not (2.1x).
        shares = forked.contiguous(len(groups), min(pool.threads, len(groups)))
        return [t for tables in forked.share_items(lambda g, report: _run_group(spec, g, report), groups, shares,
                                                   progress) for t in tables]
    if progress is not None and pool.threads > 1:  # a progress bar is not made for two threads at once
        lock, report = threading.Lock(), progress

        def progress(k: int) -> None:
            with lock:
                report(k)
    # Pool threads alone run the groups (caller=False): each allocates its layers' arrays, which the main
    # thread would fault in anew every layer (Pool.map).
    return [t for tables in pool.map(lambda g: _run_group(spec, g, progress), groups, caller=False) for t in tables]


def replicate_processes(spec: RunSpec, replicates: int, pool: Pool, plan: int | None = None,
                        reserved: int | None = None) -> int:
    """How many processes share ``replicates`` replicates of ``spec`` that run one at a time (forked
    children beside this process, :mod:`varprop.forked`): as many as ``pool`` has threads when every
    layer is too small to share out over threads (under one chunk, :meth:`Pool.sized`: they would run
    on one core) and that many replicates' passes fit in memory at once; else 1 (the threads share each
    replicate's layers). ``plan``: the backward pass's checkpoint spacing (None: its default);
    ``reserved``: the bytes held beside the passes (None: this configuration's table, theory and report,
    and the figures; a comparison holds every configuration's, :func:`memory.check`)."""
    if replicates < 2 or pool.threads < 2 or spec.samples * max(spec.network.widths) >= CHUNK_ELEMENTS:
        return 1
    k = memory.backward_plan(spec) if plan is None else plan
    each = memory.replicate_bytes(spec, k)
    if reserved is None:
        reserved = memory.REPORT_BYTES + memory.run_bytes(spec)
    spare = memory.budget(spec.max_memory) - reserved
    return max(1, min(pool.threads, replicates, spare // max(each, 1)))


def _run_group(spec: RunSpec, replicates: list[int], progress: Progress | None) -> list[Table]:
    depth = spec.network.depth
    tables, xs = [], []
    for rep in replicates:
        u, log_h = make_inputs(spec, rep)
        post, ms = side_stats_ms(u, log_h)
        xs.append(Values(u, log_h, ms))
        table = Table(depth, spec.backward)
        table.row(0).update({"width": spec.network.widths[0], **prefixed("pre", empty_stats()),
                             **prefixed("post", post)})
        tables.append(table)
    hist_layers = {1, (depth + 1) // 2, depth} if replicates[0] == 0 else set()

    def on_layer(layer: int, values: list[Values], rows: list[dict[str, float]]) -> None:
        check_stopped()  # a group runs the whole depth: an interrupted run ends within a layer
        if layer in hist_layers:
            tables[0].hist[layer] = _histogram(values[0], SERIAL)
        for table, row in zip(tables, rows):
            table.row(layer).update(row)
        if progress is not None:
            progress(len(replicates))

    batch.forward(spec, replicates, xs, on_layer)
    return tables


def _histogram(x: Values, pool: Pool) -> np.ndarray:
    """Counts of h / rms(h) in HIST_EDGES' bins (a dead layer: a spike at 0)."""
    f = x.u.dtype.type(1 / math.sqrt(x.ms) if x.ms > 0 else 1)
    # Equal bins given as a count and range take NumPy's fast path (no sort); counts add exactly.
    return sum(pool.map(lambda r: np.histogram(x.u[r] * f, bins=len(HIST_EDGES) - 1, range=(
        HIST_EDGES[0], HIST_EDGES[-1]))[0], row_chunks(*x.u.shape)))


def run_replicate(spec: RunSpec, replicate: int, progress: Progress | None = None, pool: Pool = SERIAL,
                  plan: int | None = None) -> Table:
    """Forward (and with ``spec.backward``, backward) pass of one network: the
    statistics of every layer 0..L. ``plan`` is the backward pass's checkpoint
    spacing (:func:`varprop.montecarlo.memory.backward_plan`; it changes the memory
    used, never the numbers)."""
    depth = spec.network.depth
    k = memory.backward_plan(spec) if plan is None else plan
    net: Network | Blocks = Network(spec, replicate, pool, keep_weights=k == depth and memory.keeps_weights(spec))
    if spec.network.residual is not None:
        net = Blocks(net)
    u, log_h = make_inputs(spec, replicate)
    post, ms = side_stats_ms(u, log_h, pool=pool)
    x = Values(u, log_h, ms)
    table = Table(depth, spec.backward, spec.network.residual is not None)
    table.row(0).update({"width": spec.network.widths[0], **prefixed("pre", empty_stats()), **prefixed("post", post)})
    tapes: dict[int, Tape | BlockTape] = {}
    checkpoints = {0: x}
    hist_layers = {1, (depth + 1) // 2, depth} if replicate == 0 else set()
    for layer in range(1, depth + 1):
        x, row, tape = net.step(layer, x, stats=True, keep=spec.backward and k == depth,
                                ahead=layer + 1 if layer < depth else None)
        if layer in hist_layers:  # h / rms(h): the shape of h at any scale
            table.hist[layer] = _histogram(x, pool)
        net.later.then(lambda layer=layer, row=row: table.row(layer).update(row))
        if tape is not None:
            tapes[layer] = tape
        if spec.backward and k < depth and layer % k == 0:
            checkpoints[layer] = x
        if progress is not None:
            progress(1)
    net.later.flush()
    if spec.backward:
        _backward(net, spec, replicate, table, tapes, checkpoints, k, progress)
    return table


def _backward(net: Network | Blocks, spec: RunSpec, replicate: int, table: Table, tapes: dict[int, Any],
              checkpoints: dict[int, Values], k: int, progress: Progress | None) -> None:
    depth = spec.network.depth
    u = upstream(spec, replicate)
    grad, ms = side_stats_ms(u, 0.0, pool=net.pool)
    g = Values(u, 0.0, ms)
    table.row(depth).update(prefixed("grad", grad))
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
        net.later.then(lambda layer=layer, grad=grad: table.row(layer - 1).update(prefixed("grad", grad)))
        if progress is not None:
            progress(1)
    net.flush_grad()
    net.later.flush()


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
    """Run every configuration; one row per (config, replicate, layer): the
    ``layers.csv`` table.

    ``options`` are flat run options (``samples=``, ``replicates=``, ``seed=``,
    ``backward=``, any simulate option of :data:`varprop.options.OPTIONS`) applied to
    ``spec``; ``vary`` maps option names to lists of values, and every
    combination is run. ``progress(k)`` is called as layers complete.
    ``threads`` (default: every core this process may use) changes the speed,
    never the numbers. :func:`run_configs` gives the whole :class:`~varprop.run.Run`.

    >>> from varprop.spec import NetworkSpec
    >>> df = simulate(NetworkSpec.square(2, 20), vary={"init": ["unit", "fan_in"]}, samples=50)
    >>> sorted(set(df["config"]))
    ['fan_in', 'unit']
    """
    return run_configs(configs_for(spec, vary, **options), progress, threads).layers


def replicate_rows(spec: RunSpec, replicates: Sequence[int], plan: int, progress: Progress | None = None,
                   pool: Pool = SERIAL, reserved: int | None = None) -> tuple[pd.DataFrame, dict[int, np.ndarray]]:
    """Replicates ``replicates`` of one configuration: their rows of the
    ``layers.csv`` table (without the label columns), the theory's
    predictions on every row, and replicate 0's histograms (empty when it is
    not among them). ``varprop sweep`` runs a configuration's replicates in
    blocks through this too, so its numbers are simulate's."""
    # Multi-threaded BLAS splits products differently for each thread
    # count, which changes the last bits: BLAS runs on one thread (for
    # the theory's use of the input file's statistics too) and varprop's
    # own threads work on fixed blocks (parallel.py).
    with threadpool_limits(1, user_api="blas"):
        tables = run_replicates(spec, replicates, progress, pool, plan, reserved)
        inputs = side_stats(*make_inputs(spec, 0)) if spec.input_file is not None else None
        predicted = theory.predict(spec, inputs)
    hist = tables[0].hist if tables else {}
    frame = pd.concat([table.frame(rep) for rep, table in zip(replicates, tables)], ignore_index=True)
    del tables
    return frame.merge(predicted, on="layer", how="left"), hist


def run_configs(configs: Sequence[Config], progress: Progress | None = None, threads: int | None = None) -> Run:
    """Run every configuration of a comparison: the :class:`~varprop.run.Run`
    that reports are made from (its table, histograms and configurations)."""
    pool = Pool(parse_threads(threads))
    plans = memory.check(configs)  # refuse before any work when a run cannot fit
    reserved = memory.reserved_bytes(configs)
    start = time.perf_counter()
    frames, hists = [], []
    for c, plan in zip(configs, plans):
        frame, hist = replicate_rows(c.spec, range(c.spec.replicates), plan, progress, pool, reserved)
        for layer, counts in hist.items():
            hists.append(pd.DataFrame({"config": c.label, "layer": layer, "bin_lo": HIST_EDGES[:-1],
                                       "bin_hi": HIST_EDGES[1:],
                                       "density": counts / max(counts.sum(), 1) / np.diff(HIST_EDGES)}))
        for key, value in reversed(list(c.varied.items())):
            if key in frame:  # a varied --width: the per-layer width column already holds it
                continue
            frame.insert(0, key, value if isinstance(value, (str, int, float)) else str(value))
        frame.insert(0, "config", c.label)
        frames.append(frame)
    df = pd.concat(frames, ignore_index=True)
    df["fan_in"] = df["fan_in"].astype("Int64")
    df["fan_out"] = df["fan_out"].astype("Int64")
    return Run(df, [Configuration(c.label, c.varied, to_options(c.spec)) for c in configs],
               pd.concat(hists, ignore_index=True) if hists else None, seed=configs[0].spec.seed if configs else None,
               elapsed_s=time.perf_counter() - start)


def total_steps(configs: Sequence[Config]) -> int:
    """How many layer steps :func:`simulate` reports to ``progress``."""
    return sum(c.spec.replicates * c.spec.network.depth * (2 if c.spec.backward else 1) for c in configs)

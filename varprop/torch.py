"""Measure a PyTorch model of your own at initialization, over re-initialisations.

:func:`inspect` runs a model (or a factory that makes one) on seeded random
inputs, once per replicate, each replicate a fresh initialisation drawn under
a torch generator seeded from varprop's seed tree; forward hooks record every
module's output and, with ``backward=True``, tensor hooks the gradient with
respect to it (safe with in-place activations, unlike
``register_full_backward_hook``). The table has one row per module call and
replicate, with the statistic names of simulate's ``layers.csv``, the
mean-field prediction beside them where it is derivable
(:mod:`varprop.inspect_theory`), and the residual additions' skip and branch
(:mod:`varprop.inspect_graph`) in :func:`residual_table`.
:func:`width_sweep` fits each module's statistics against width (an automated
coord check) and :func:`check_preserves_variance` /
:func:`assert_preserves_variance` decide a band for a test suite.

PyTorch is optional (``pip install 'varprop[torch]'``): it is imported by the
functions here, never by ``import varprop``.

>>> import torch.nn as nn
>>> table = inspect(lambda: nn.Sequential(nn.Linear(64, 64), nn.ReLU()), input_shape=(32, 64), replicates=2)
>>> list(table["name"].unique())
['(input)', '0', '1']
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import math
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd

from .montecarlo.seeds import generator
from .nn import activations, inits
from .errors import SpecError
from .stats import ABS_COS_SAMPLES, SATURATION, STATS, Sums, empty_stats, from_sums

if TYPE_CHECKING:
    import torch

__all__ = ["inspect", "residual_table", "width_sweep", "check_preserves_variance", "assert_preserves_variance",
           "load_model", "tensor_stats", "TORCH_MISSING", "SweepResult"]

TORCH_MISSING = "PyTorch is not installed; install it with: pip install 'varprop[torch]'"
INPUT = "(input)"
ROOT = "(model)"
MODES = ("train", "eval")


def _torch() -> Any:
    """The torch module, or ImportError naming the extra that installs it."""
    try:
        import torch
    except ImportError:
        raise ImportError(TORCH_MISSING) from None
    return torch


# --- statistics of one tensor ---------------------------------------------------------------------------

class _Buffer:
    """A float64 work buffer reused across tensors: a fresh large allocation per tensor costs its page
    faults, more than the statistics themselves."""

    def __init__(self) -> None:
        self.t: Any = None

    def get(self, n: int, device: Any) -> Any:
        torch = _torch()
        if self.t is None or self.t.numel() < n or self.t.device != device:
            self.t = torch.empty(max(n, 1), dtype=torch.float64, device=device)
        return self.t[:n]


def tensor_stats(x: "torch.Tensor", sample_axis: int = 0, channel_axis: int | None = 1,
                 saturated: float = math.nan, buffer: _Buffer | None = None) -> dict[str, float]:
    """The statistics of simulate's ``layers.csv`` for one tensor (any float dtype and device).

    Samples lie along ``sample_axis`` (cosine similarity between them, over
    every other axis flattened), channels along ``channel_axis`` (the average
    squared channel mean and average channel variance are taken over every
    other axis: [N, C, H, W], [N, C, L], [N, T, C] with axis 2, [N, C]). Sums
    run in float64 and are combined by :func:`varprop.stats.from_sums`, so the
    definitions are simulate's; for a 2-D tensor the result is
    :func:`varprop.stats.side_stats` of it (the cosines to float32 rounding:
    their products are taken in the tensor's precision).

    >>> import torch
    >>> s = tensor_stats(torch.tensor([[1.0, -1.0], [1.0, -1.0]]))
    >>> [round(s[k], 6) for k in ("std", "sq_unit_mean", "unit_var", "cos_sim")]
    [1.0, 1.0, 0.0, 1.0]
    """
    torch = _torch()
    if x.dim() == 0 or x.numel() == 0:
        return empty_stats()
    if x.dim() == 1:  # one number per sample: one channel
        x, channel_axis = x.reshape(-1, 1), 1
    shape = tuple(x.shape)
    sample_axis %= len(shape)
    channel_axis = sample_axis if channel_axis is None else channel_axis % len(shape)
    n, ns, c = x.numel(), shape[sample_axis], shape[channel_axis]
    a, b = math.prod(shape[:channel_axis]), math.prod(shape[channel_axis + 1:])
    f64 = torch.float64
    own = x.detach()
    own = own if own.dtype in (torch.float32, f64) else own.float()  # half precisions: exactly, in float32
    cpu = own.device.type == "cpu"
    # Sums run over a float64 copy in a reused buffer (a reduction with dtype=float64 converts into a fresh
    # allocation, slower); the cosines' products read the tensor itself. Counting zeros is NumPy's job on
    # CPU (several times faster than torch.count_nonzero), and small vectors (one number per sample or
    # channel) are finished in NumPy: a torch call on them costs more than the arithmetic.
    zeros = int(np.count_nonzero(own.numpy() == 0)) if cpu else int((own == 0).sum())
    y = (buffer or _Buffer()).get(n, own.device).view(shape)
    y.copy_(own)
    rows = own.movedim(sample_axis, 0).reshape(ns, -1)
    # Sums and squares per block, pooled below: per (leading index, channel) over the positions of
    # [N, C, positions], per (sample, channel) over the positions of [N, positions, C].
    blocks, per_sample, scratched = None, False, False
    if b > 1:
        v = y.view(a, c, b)
        blocks = (_np(v.sum(2)), _np(torch.linalg.vector_norm(v, dim=2)) ** 2, b)
        per_sample = sample_axis == 0 and channel_axis == 1
    elif len(shape) >= 3 and sample_axis == 0 and n > ns * c:
        w = y.view(ns, n // (ns * c), c)
        block_sum = _np(w.sum(1))
        blocks = (block_sum, _np(w.square_().sum(1)), n // (ns * c))  # a middle-axis norm is 10x slower
        per_sample = scratched = True
    norms = np.sqrt(blocks[1].sum(1)) if per_sample else _np(
        torch.linalg.vector_norm(y.movedim(sample_axis, 0).reshape(ns, -1), dim=1))
    if not math.isfinite(float(norms.sum())):
        return {**empty_stats(), "frac_zero": zeros / n, "frac_saturated": saturated, "nonfinite": True}
    live = norms > 0
    inv = np.zeros(ns)
    np.divide(1.0, norms, out=inv, where=live)
    # The sum of the unit-normalised samples in the tensor's precision: each of its entries adds ns terms,
    # whose rounding moves the mean cosine by at most 2 (ns + 1) 2^-24 / (ns - 1).
    unit_sum = _np(torch.from_numpy(inv).to(own.device, own.dtype) @ rows).astype(np.float64)
    # |cos| over the first 128 live samples, from their Gram matrix in the tensor's precision (float32's
    # product costs a third of float64's; its rounding, at most fan * 2^-24 in a cosine and typically
    # sqrt(fan) * 2^-24, is far below the sampling error of a mean over pairs), scaled by the float64 norms.
    first = np.flatnonzero(live)[:ABS_COS_SAMPLES]
    m = len(first)
    head = math.nan
    if m >= 2:
        head_rows = rows[:m] if first[-1] == m - 1 else rows[torch.from_numpy(first).to(own.device)]
        gram = _np(head_rows @ head_rows.T).astype(np.float64)
        gram = np.abs(gram * inv[first][:, None] * inv[first][None, :])
        head = float((gram.sum() - np.trace(gram)) / (m * (m - 1)))
    m_rows = a * b
    col = _pooled_blocks(*blocks) if blocks is not None else None
    if col is None:
        # Channel sums, then squares about the channel means (two passes: no E[x^2] - E[x]^2 cancellation),
        # in the float64 copy, free once the rows' sums are taken.
        if scratched:
            y.copy_(own)
        y = y.view(a, c, b)
        col_sum = y.sum(2).sum(0) if b > 1 else y.view(a, c).sum(0)
        y.sub_((col_sum / m_rows).view(1, c, 1)).square_()
        col_m2 = y.sum(2).sum(0) if b > 1 else y.view(a, c).sum(0)
        col = (_np(col_sum), _np(col_m2))
    sums = Sums(m_rows, col[0], col[1], norms * norms, unit_sum, zeros)
    # from_sums reads the shape of its first argument (rows x channels) and, for |cos| only when no head
    # value is given, its rows: the head is always given here, so a zero-strided stand-in suffices.
    return from_sums(_stand_in(m_rows, c), [sums], 0.0, saturated, head)[0]


def _np(t: Any) -> np.ndarray:
    """A small tensor's values as a NumPy array (a view on CPU)."""
    return t.numpy() if t.device.type == "cpu" else t.cpu().numpy()


@functools.lru_cache(maxsize=256)
def _stand_in(rows: int, cols: int) -> np.ndarray:
    return np.broadcast_to(np.float64(0.0), (rows, cols))


def _pooled_blocks(block_sum: np.ndarray, block_sq: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Channel sums and squares about the channel means from blocks of ``size`` entries (rows: blocks,
    columns: channels): each block's squares about its own mean, plus its mean's offset from the channel's
    (between and within, as varprop.stats pools blocks). A block's float64 sum of squares less its squared
    sum over ``size`` keeps all but 2^-52 mean^2 / var of its variance; None where that could exceed 1e-10
    (a block almost constant, or far off zero): the caller then takes two passes."""
    within = block_sq - block_sum * block_sum / size
    if np.any(block_sum * block_sum / size > 1e6 * within):
        return None
    total = block_sum.sum(0)
    offsets = block_sum / size - total / (size * len(block_sum))
    return total, within.sum(0) + size * (offsets * offsets).sum(0)


def _zero_when_saturated(act: activations.Activation) -> bool:
    """relu: phi'(z) = 0 exactly where phi(z) = 0 (z <= 0), so the output's zeros are the saturated inputs."""
    return act.homogeneous and act.slope_neg == 0 and act.phi0 == 0 and act.slope_pos >= SATURATION


def _saturation(act: activations.Activation, z: "torch.Tensor") -> float:
    """The fraction of ``z`` where |phi'(z)| < 1e-3 (simulate's ``frac_saturated``)."""
    torch = _torch()
    n = z.numel()
    if n == 0:
        return math.nan
    if act.homogeneous:  # phi' is slope_pos above 0 and slope_neg at or below it
        z = z.detach()
        below = int(np.count_nonzero(z.numpy() <= 0)) if z.device.type == "cpu" and z.dtype in (
            torch.float32, torch.float64) else int(torch.count_nonzero(z <= 0))
        return ((below if abs(act.slope_neg) < SATURATION else 0)
                + (n - below if abs(act.slope_pos) < SATURATION else 0)) / n
    d = act.dphi(z.detach().to("cpu", torch.float32).numpy())
    return float(np.count_nonzero(np.abs(d) < SATURATION)) / n


# --- which modules, which activations -------------------------------------------------------------------

def _torch_nn(module: Any) -> bool:
    return type(module).__module__.startswith("torch.nn.")


def activation_of(module: Any) -> activations.Activation | None:
    """varprop's Activation for a torch.nn activation module (or a traced functional one with its default
    arguments), else None."""
    from .inspect_graph import ACTIVATION_FUNCTIONS

    if getattr(module, "fname", None) in ACTIVATION_FUNCTIONS:  # a traced F.relu(x) etc.
        return functional_activation(module.fname)
    if not _torch_nn(module):
        return None
    name = type(module).__name__
    simple = {"ReLU": "relu", "Tanh": "tanh", "Sigmoid": "sigmoid", "SELU": "selu", "SiLU": "silu"}
    if name in simple:
        return activations.get(simple[name])
    if name == "LeakyReLU":
        return activations.get("leaky_relu", float(module.negative_slope))
    if name == "ELU" and float(module.alpha) == 1.0:
        return activations.get("elu")
    if name == "GELU" and module.approximate == "none":
        return activations.get("gelu")
    if name == "Softplus" and float(module.beta) == 1.0 and float(module.threshold) >= 20:
        return activations.get("softplus")  # beyond 20 torch switches to x, within e^-20 of softplus
    return None


def functional_activation(fname: str, args: tuple = (), kwargs: dict | None = None) -> activations.Activation | None:
    """varprop's Activation for a call ``torch.relu(x)``, ``F.leaky_relu(x, 0.2)``, ``x.tanh_()`` ... with
    these arguments (after the input), else None (gelu's tanh approximation, elu with alpha != 1, ...)."""
    kwargs = kwargs or {}

    def arg(key: str, default: Any) -> Any:
        return kwargs.get(key, args[1] if len(args) > 1 else default)

    name = fname.rstrip("_")
    if name in ("relu", "tanh", "sigmoid", "selu", "silu"):
        return activations.get(name)
    if name == "leaky_relu":
        return activations.get("leaky_relu", float(arg("negative_slope", 0.01)))
    if name == "gelu":
        return activations.get("gelu") if arg("approximate", "none") == "none" else None
    if name == "elu":
        return activations.get("elu") if float(arg("alpha", 1.0)) == 1.0 else None
    if name == "softplus":
        threshold = kwargs.get("threshold", args[2] if len(args) > 2 else 20.0)
        return activations.get("softplus") if float(arg("beta", 1.0)) == 1.0 and float(threshold) >= 20 else None
    return None


# Module kinds whose 3-D outputs are [N, C, L] (channel axis 1); other 3-D outputs are [N, T, C].
_CHANNEL_FIRST = ("Conv", "BatchNorm", "InstanceNorm", "Pool", "Upsample", "PixelShuffle", "GroupNorm",
                  "LocalResponseNorm", "Dropout1d", "Dropout2d", "Dropout3d", "ReflectionPad", "ReplicationPad",
                  "ZeroPad", "ConstantPad", "CircularPad")


def _axes(module: Any, ndim: int, inherited: tuple[int, int] | None) -> tuple[int, int]:
    """(sample axis, channel axis) of a module's output of ``ndim`` dimensions."""
    if ndim != 3:
        return 0, 1
    name = type(module).__name__
    if _torch_nn(module) and any(k in name for k in _CHANNEL_FIRST):
        return 0, 1
    if getattr(module, "batch_first", True) is False:  # [T, N, C]: nn.MultiheadAttention, Transformer*, RNNs
        return 1, 2
    if inherited is not None:  # elementwise modules, norms over the last axis, ... keep their input's layout
        return inherited
    return 0, 2


def _selected(name: str, type_name: str, patterns: Sequence[str] | None, types: Sequence[str] | None) -> bool:
    if patterns and not any(fnmatch.fnmatchcase(name, p) for p in patterns):
        return False
    if types and type_name not in types and type_name.removesuffix("()") not in types:
        return False
    return True


def _tensors(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """The tensors of a module's output, with their place in it ("", "[0]", "['logits']", ...)."""
    torch = _torch()
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, (tuple, list)):
        for i, item in enumerate(obj):
            yield from _tensors(item, f"{path}[{i}]")
    elif isinstance(obj, dict):
        for key, item in obj.items():
            yield from _tensors(item, f"{path}[{key!r}]")


# --- one pass of one replicate ----------------------------------------------------------------------------

@dataclass
class _Target:
    """A module whose calls become rows."""

    name: str  # qualified name ("(model)" for the root; an Op's display name without "()")
    display: str
    type_name: str
    act: activations.Activation | None
    weight: Any = None  # the module's weight Parameter, if any (for weight_grad_norm)
    row: bool = True  # False: hooked only for the residual table (an addition outside the selection)


@dataclass
class _Row:
    layer: int
    name: str
    module: str
    call: int
    type_name: str
    shape: tuple[int, ...]
    axes: tuple[int, int]
    sources: list[int | None]
    post: dict[str, float]
    grad: dict[str, float] | None = None
    target: _Target | None = None
    node: dict[str, Any] = field(default_factory=dict)  # what the theory needs (inspect_theory.describe)
    call_info: tuple | None = None  # (module, call information, output shape) until described


def _one_thread(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run with one PyTorch thread, the model's count restored afterwards (a quarter of a
    microsecond each way). The statistics' float64 sums are then the same whatever the thread count, and a
    busy machine cannot stall them: a reduction split over threads waits for the slowest, and with another
    process on the core a 0.1 ms sum took 18 ms on two threads here."""
    def run(*args: Any, **kwargs: Any) -> Any:
        torch = _torch()
        threads = torch.get_num_threads()
        if threads == 1:
            return fn(*args, **kwargs)
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return run


class _Pass:
    """The hooks of one forward (and backward) pass: registered on entry, every one removed on exit
    (module hooks and tensor hooks alike), whether the pass succeeded or raised."""

    def __init__(self, runner: Any, targets: dict[Any, _Target], backward: bool, residuals: dict[Any, Any],
                 blocks: list[tuple[str, Any, Any]], theory: bool):
        self.runner, self.targets, self.backward, self.theory = runner, targets, backward, theory
        self.residuals, self.blocks = residuals, blocks
        self.handles: list[Any] = []
        self.rows: list[_Row] = []
        self.residual_rows: list[dict[str, Any]] = []
        self.buffer = _Buffer()
        self._producers: dict[int, tuple[int, Any, int]] = {}  # id(tensor) -> (row, weak ref, version)
        self._by_ptr: dict[tuple[int, int, Any], tuple[int, int, Any]] = {}  # (data_ptr, numel, dtype) -> same
        self._calls: dict[Any, int] = {}
        self._pending: dict[Any, list[dict[str, Any]]] = {}
        self._captured: dict[Any, dict[str, Any]] = {}

    # registration -----------------------------------------------------------------------------------------
    def __enter__(self) -> "_Pass":
        try:
            for module in self.targets:
                self.handles.append(module.register_forward_pre_hook(_one_thread(self._pre), with_kwargs=True))
                self.handles.append(module.register_forward_hook(_one_thread(self._post), with_kwargs=True))
            for name, block, spec in self.blocks:
                self._watch_block(name, block, spec)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        while self.handles:
            self.handles.pop().remove()
        self._producers.clear()
        self._by_ptr.clear()
        self._pending.clear()
        self._captured.clear()

    # provenance -------------------------------------------------------------------------------------------
    def _producer(self, t: Any) -> tuple[int, int] | None:
        """(row, version when recorded) of the row whose output ``t`` is: the same tensor, or a view of its
        storage. References are weak (a pass does not keep activations alive); a live producer's memory
        cannot be reused, so a storage match with a live one is a genuine view."""
        found = self._producers.get(id(t))
        if found is not None and found[1]() is t:
            return found[0], found[2]
        by_ptr = self._by_ptr.get(self._ptr_key(t))
        if by_ptr is not None and by_ptr[2]() is not None:
            return by_ptr[0], by_ptr[1]
        return None

    def source_of(self, t: Any) -> int | None:
        """The row whose output ``t`` is, else None."""
        found = self._producer(t)
        return None if found is None else found[0]

    @staticmethod
    def _ptr_key(t: Any) -> tuple[int, int, Any]:
        return (t.data_ptr(), t.numel(), t.dtype)

    def add_input(self, x: Any, axes: tuple[int, int]) -> None:
        stats = _one_thread(tensor_stats)(x, *axes, buffer=self.buffer)
        row = _Row(0, INPUT, "", 1, "input", tuple(x.shape), axes, [], stats)
        self.rows.append(row)
        self._remember(x, 0)
        if self.backward and x.requires_grad:
            self.handles.append(x.register_hook(_one_thread(self._grad_hook(row))))

    def _remember(self, t: Any, layer: int) -> None:
        ref = weakref.ref(t)
        self._producers[id(t)] = (layer, ref, t._version)
        self._by_ptr[self._ptr_key(t)] = (layer, t._version, ref)

    def _duplicate(self, t: Any) -> bool:
        """Whether ``t`` holds the values of a row already taken: the same tensor, or a view of its storage,
        not modified in place since (a view shares its base's version counter)."""
        found = self._producer(t)
        return found is not None and found[1] == t._version

    # hooks ------------------------------------------------------------------------------------------------
    def _pre(self, module: Any, args: tuple, kwargs: dict) -> None:
        inputs = [t for _, t in _tensors((args, kwargs)) if t.is_floating_point()]
        info: dict[str, Any] = {"sources": [self.source_of(t) for t in inputs],
                                "in_shape": tuple(inputs[0].shape) if inputs else None}
        target = self.targets[module]
        act = target.act
        if act is not None and getattr(module, "fname", None):  # a traced call: its own arguments decide
            act = functional_activation(module.fname, args, kwargs)
        info["act"] = act
        if act is not None and inputs and not _zero_when_saturated(act):
            info["saturated"] = _saturation(act, inputs[0])  # before the call: an in-place one overwrites it
        if inputs and info["sources"][0] is None and self.theory:
            # A layer fed by something the hooks do not see: the theory restarts from its measured input.
            s = tensor_stats(inputs[0], *_axes(module, inputs[0].dim(), None), buffer=self.buffer)
            info.update(input_second_moment=s["second_moment"], input_cos_sim=s["cos_sim"], input_mean=s["mean"])
        if module in self.residuals and len(inputs) >= 2 and inputs[0].shape == inputs[1].shape:
            info["operands"] = self._operand_stats(module, inputs[:2])
        self._pending.setdefault(module, []).append(info)

    def _post(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        info = self._pending[module].pop()
        target = self.targets[module]
        if not target.row:
            if "operands" in info:
                self._residual_row(module, -1, info["operands"], total=self._sum_stats(output, info))
            return
        call = self._calls[module] = self._calls.get(module, 0) + 1
        inherited = None
        if info["sources"] and info["sources"][0] is not None:
            inherited = self.rows[info["sources"][0]].axes
        for path, t in _tensors(output):
            if not t.is_floating_point() or t.dim() == 0 or t.numel() == 0:
                continue
            if self._duplicate(t):
                continue  # the tensor (or a view of it) a module inside this one returned: already a row
            axes = _axes(module, t.dim(), inherited)
            layer = len(self.rows)
            name = target.display + (f"#{call}" if call > 1 else "") + path
            stats = tensor_stats(t, *axes, saturated=info.get("saturated", math.nan), buffer=self.buffer)
            if info["act"] is not None and _zero_when_saturated(info["act"]):
                stats["frac_saturated"] = stats["frac_zero"]
            row = _Row(layer, name, target.name, call, target.type_name, tuple(t.shape), axes,
                       list(info["sources"]), stats, target=target)
            row.call_info = (module, info, tuple(t.shape))
            if "operands" in info:
                self._residual_row(module, layer, info["operands"])
            self.rows.append(row)
            self._remember(t, layer)
            if self.backward and t.requires_grad:
                self.handles.append(t.register_hook(_one_thread(self._grad_hook(row))))

    def _sum_stats(self, output: Any, info: dict[str, Any]) -> dict[str, float] | None:
        t = next((t for _, t in _tensors(output) if t.is_floating_point()), None)
        return None if t is None else tensor_stats(t, *info["operands"]["axes"], buffer=self.buffer)

    def _grad_hook(self, row: _Row) -> Callable[[Any], None]:
        def hook(grad: Any) -> None:
            row.grad = tensor_stats(grad, *row.axes, buffer=self.buffer)
        return hook

    # residual additions -------------------------------------------------------------------------------------
    def _operand_stats(self, module: Any, operands: list[Any]) -> dict[str, Any]:
        res = self.residuals[module]
        skip, branch = operands[res.skip_index], operands[1 - res.skip_index]
        sources = self.source_of(skip), self.source_of(branch)
        axes = _axes(module, skip.dim(), self.rows[sources[0]].axes if sources[0] is not None else None)
        return {"skip": self._stats_of(skip, axes), "branch": self._stats_of(branch, axes),
                "skip_source": sources[0], "branch_source": sources[1], "ambiguous": res.ambiguous, "axes": axes}

    def _stats_of(self, t: Any, axes: tuple[int, int]) -> dict[str, float]:
        """``t``'s statistics: a row's own when ``t`` is that row's output, unchanged since and laid out
        alike (an addition's operands usually are), else computed."""
        found = self._producer(t)
        if found is not None and found[1] == t._version:
            row = self.rows[found[0]]
            if row.axes == axes and row.shape == tuple(t.shape):
                return row.post
        return tensor_stats(t, *axes, buffer=self.buffer)

    def _residual_row(self, module: Any, layer: int, ops: dict[str, Any], name: str | None = None,
                      total: dict[str, float] | None = None) -> None:
        self.residual_rows.append({"name": name or self.targets[module].display, "layer": layer,
                                   "skip_source": ops["skip_source"], "branch_source": ops["branch_source"],
                                   "ambiguous": ops["ambiguous"], "skip": ops["skip"], "branch": ops["branch"],
                                   "total": total})

    def _watch_block(self, name: str, block: Any, spec: Any) -> None:
        """Hooks that capture a known block's operands (copies: torchvision adds in place) and measure
        each addition when the block returns."""
        from .inspect_graph import module_names

        def pre(module: Any, args: tuple, kwargs: dict) -> None:
            x = next((t for _, t in _tensors((args, kwargs)) if t.is_floating_point()), None)
            self._captured[block] = {"input": None if x is None else (x.detach().clone(), self.source_of(x))}

        def grab(sub: str) -> Callable[..., None]:
            def hook(module: Any, args: tuple, output: Any) -> None:
                t = next((t for _, t in _tensors(output) if t.is_floating_point()), None)
                if t is not None and block in self._captured:
                    self._captured[block][sub] = (t.detach().clone(), self.source_of(t))
            return hook

        def post(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            got = self._captured.pop(block, {})
            sums: list[Any] = []
            for k, (skip_key, branch_key) in enumerate(spec.adds):
                pair = [sums[int(key[4:])] if key.startswith("sum:") else got.get(key)
                        for key in (skip_key, branch_key)]
                if any(p is None for p in pair):
                    return
                (skip, s_src), (branch, b_src) = pair
                if skip.shape != branch.shape:
                    return
                total = skip + branch
                sums.append((total, None))
                axes = _axes(block, skip.dim(), self.rows[s_src].axes if s_src is not None else None)
                ops = {"skip": tensor_stats(skip, *axes, buffer=self.buffer),
                       "branch": tensor_stats(branch, *axes, buffer=self.buffer),
                       "skip_source": s_src, "branch_source": b_src, "ambiguous": False}
                self._residual_row(block, -1, ops, name=f"{name}+{k + 1}",
                                   total=tensor_stats(total, *axes, buffer=self.buffer))

        self.handles.append(block.register_forward_pre_hook(_one_thread(pre), with_kwargs=True))
        for sub in module_names(spec):
            sub_module = block.get_submodule(sub) if sub != "downsample" or block.downsample is not None else None
            if sub_module is not None:
                self.handles.append(sub_module.register_forward_hook(_one_thread(grab(sub))))
        self.handles.append(block.register_forward_hook(_one_thread(post), with_kwargs=True))


# --- models, inputs and replicates ------------------------------------------------------------------------

def load_model(ref: str, option: str = "model") -> Callable[..., Any]:
    """The callable ``"package.module:attribute"`` names (found from the working directory too)."""
    try:
        return inits.load_callable(ref)
    except ValueError as exc:
        raise SpecError(option, str(exc)) from None


def _seed_of(seed: int, replicate: int, block: int) -> int:
    """A torch seed from varprop's tree: block 0 draws the model, block 1 the forward pass (dropout)."""
    return int(generator(seed, replicate, 0, "weights", block).integers(2**63))


def _fork_rng(torch: Any, device: Any) -> Any:
    devices = [device.index or 0] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def _message(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _build(model: Any, replicate: int, seed: int, device: Any, args: tuple = ()) -> Any:
    """Replicate r's model: the factory called (or the instance copied and every module's
    reset_parameters() called) under torch's generators seeded from the tree, restored afterwards."""
    torch = _torch()
    with _fork_rng(torch, device):
        torch.manual_seed(_seed_of(seed, replicate, 0))
        if isinstance(model, torch.nn.Module):
            try:
                built = copy.deepcopy(model)
            except Exception as exc:
                raise SpecError("model", f"cannot copy the model to re-initialise it ({_message(exc)}); "
                                "pass a factory that makes it instead") from exc
            for m in built.modules():
                if callable(getattr(m, "reset_parameters", None)):
                    m.reset_parameters()
        else:
            try:
                built = model(*args)
            except Exception as exc:  # the user's code: one line with its message
                raise SpecError("model", f"{_callable_name(model)}({', '.join(map(repr, args))}) raised "
                                f"{_message(exc)}") from exc
    if not isinstance(built, torch.nn.Module):
        raise SpecError("model", f"{_callable_name(model)} returned {type(built).__name__}, not a torch.nn.Module")
    try:
        return built.to(device)
    except Exception as exc:
        raise SpecError("device", f"cannot move the model to {device} ({_message(exc)})") from exc


def _callable_name(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', type(fn).__name__)}"


def _not_reset(model: Any) -> list[str]:
    """Parameters of an instance that no reset_parameters() re-draws (the same in every replicate)."""
    covered = set()
    for m in model.modules():
        if callable(getattr(m, "reset_parameters", None)):
            covered.update(id(p) for p in m.parameters())
    return [n for n, p in model.named_parameters() if id(p) not in covered]


def _device(device: Any) -> Any:
    torch = _torch()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise SpecError("device", f"expected cpu, cuda or cuda:N, got {device!r} ({_message(exc)})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SpecError("device", f"CUDA was requested but this PyTorch ({torch.__version__}) sees no GPU; "
                        "use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise SpecError("device", "MPS was requested but is not available; use --device cpu")
    return dev


def _input_shape(shape: Any) -> tuple[int, ...]:
    parts = shape.split(",") if isinstance(shape, str) else shape
    try:
        dims = tuple(int(str(p).strip()) for p in parts)
    except (TypeError, ValueError):
        raise SpecError("input_shape", f"expected comma-separated positive integers such as 8,3,32,32 "
                        f"(samples first), got {shape!r}") from None
    if not dims or any(d < 1 for d in dims):
        raise SpecError("input_shape", f"expected comma-separated positive integers such as 8,3,32,32 "
                        f"(samples first), got {shape!r}")
    return dims


def _make_input(torch: Any, shape: tuple[int, ...], inputs: np.ndarray | None, seed: int, replicate: int,
                dtype: Any, device: Any) -> Any:
    if inputs is not None:
        x = torch.from_numpy(np.ascontiguousarray(inputs))
        return x.to(device, dtype if x.is_floating_point() else torch.int64)
    x = inits.standard_normal(generator(seed, replicate, 0, "inputs"), shape, np.float32)
    return torch.from_numpy(x).to(device, dtype)


def _upstream(torch: Any, out: Any, seed: int, replicate: int, k: int) -> Any:
    """The N(0, 1) gradient entering the k-th floating output (simulate's g_L)."""
    g = inits.standard_normal(generator(seed, replicate, 0, "upstream", k), tuple(out.shape), np.float32)
    return torch.from_numpy(g).to(out.device, out.dtype)


def _first_dtype(model: Any, torch: Any) -> Any:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())


@dataclass
class _Replicate:
    rows: list[_Row]
    residual: list[dict[str, Any]]
    weight_grads: dict[int, float]
    outputs: set[int] | None  # the rows whose outputs are the model's (None: one is not a measured module's)


@dataclass
class _Prepared:
    """A replicate's model ready to run: the rewritten runner and the modules whose calls become rows."""

    graph: Any  # inspect_graph.Prepared
    targets: dict[Any, _Target]


def _prepare(model: Any, patterns: Sequence[str] | None, types: Sequence[str] | None, trace: bool,
             notes: list[str] | None = None) -> _Prepared:
    """Trace and rewrite the model where fx can (inspect_graph.prepare) and choose the modules to hook."""
    from . import inspect_graph

    torch = _torch()
    prepared = inspect_graph.prepare(model, trace)
    if notes is not None:
        if not trace:
            notes.append("not traced (--no-trace): additions and functional activations are not seen, only modules")
        if prepared.traced:
            where = "the whole model" if prepared.traced == [""] else ", ".join(prepared.traced)
            notes.append(f"traced with torch.fx: {where} (additions and functional activations measured)")
        for name, why in prepared.untraced[:3]:
            notes.append(f"not traced: {name or 'the model'} ({why}); its modules are measured by hooks")
    filtered = bool(patterns or types)
    targets: dict[Any, _Target] = {}
    for name, module in prepared.runner.named_modules():
        if module in prepared.ops:
            qual, type_name = module.display.removesuffix("()"), f"{module.fname}()"
            chosen = _selected(qual, type_name, patterns, types)
            if chosen or module in prepared.residuals:
                targets[module] = _Target(qual, module.display, type_name, activation_of(module), row=chosen)
            continue
        if name == "" and filtered:
            continue  # the model's own output is measured unless a selection is made
        if name and not _selected(name, type(module).__name__, patterns, types):
            continue
        weight = getattr(module, "weight", None)
        targets[module] = _Target(name or ROOT, name or ROOT, type(module).__name__, activation_of(module),
                                  weight if isinstance(weight, torch.nn.Parameter) else None)
    if not any(t.row for t in targets.values()):
        raise _no_match(prepared, patterns, types)
    if len(targets) == 1 and prepared.runner in targets and not _torch_nn(model):
        raise SpecError("model", f"{type(model).__name__} has no submodules: varprop measures the output of each "
                        "module (nn.Linear, nn.Conv2d, activations, ...), and there is only the model itself")
    return _Prepared(prepared, targets)


_BLAS: list[Any] = []  # threadpoolctl's controller, made once: it reads the process's loaded libraries


def _one_blas_thread() -> Any:
    """One thread for NumPy's BLAS: varprop.stats' sums the same whatever the thread count, and no wait on a
    BLAS thread the machine has descheduled. PyTorch's own kernels are not affected."""
    if not _BLAS:
        from threadpoolctl import ThreadpoolController

        _BLAS.append(ThreadpoolController())
    return _BLAS[0].limit(limits=1, user_api="blas")


def _no_match(prepared: Any, patterns: Sequence[str] | None, types: Sequence[str] | None) -> SpecError:
    """The refusal of a selection that matches nothing, listing what there is (and the nearest type)."""
    import difflib

    torch = _torch()
    found = [(n, f"{m.fname}()" if m in prepared.ops else type(m).__name__)
             for n, m in prepared.runner.named_modules() if n and type(m) is not torch.nn.Module]
    if types:
        kinds = list(dict.fromkeys(t for _, t in found))
        close = [c[0] for t in types for c in [difflib.get_close_matches(t, kinds, n=1)] if c]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        return SpecError("types", f"no module of type {', '.join(types)}{hint}; the model's types are "
                         + ", ".join(kinds[:20]) + (" ..." if len(kinds) > 20 else ""))
    names = [n for n, _ in found]
    there = ("the model's modules are " + ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")) if names \
        else "the model has no submodules"
    return SpecError("modules", f"no module name matches {', '.join(patterns or [])}; {there}")


def _pass(prep: _Prepared, x: Any, seed: int, replicate: int, backward: bool, theory: bool,
          input_option: str = "input_shape") -> _Replicate:
    """One forward (and backward) pass with every hook in place; the hooks are gone when it returns."""
    torch = _torch()
    runner = prep.graph.runner
    first = next((m for n, m in runner.named_modules() if n and not list(m.children())), runner)
    axes = _axes(first, x.dim(), None)
    with _fork_rng(torch, x.device), _Pass(runner, prep.targets, backward, prep.graph.residuals,
                                         prep.graph.blocks, theory) as p, _one_blas_thread():
        # The forward's own draws (dropout) from the tree; torch.manual_seed would also seed every lazy
        # accelerator, formatting a stack trace for each, a millisecond per pass.
        (torch.cuda.manual_seed if x.device.type == "cuda" else torch.default_generator.manual_seed)(
            _seed_of(seed, replicate, 1))
        with torch.set_grad_enabled(backward):
            if backward and x.is_floating_point():
                x.requires_grad_(True)
            p.add_input(x, axes)
            try:
                out = runner(x)
            except SpecError:
                raise
            except Exception as exc:
                hint = ("; token ids go in with --input-file (an integer array)" if x.is_floating_point() and any(
                    isinstance(m, torch.nn.Embedding) for m in runner.modules()) else "")
                raise SpecError(input_option,
                                f"the model's forward failed on an input of shape {'x'.join(map(str, x.shape))}: "
                                f"{_message(exc)}{hint}") from exc
            outs = [t for _, t in _tensors(out) if t.is_floating_point()]
            if not outs:
                kinds = sorted({str(t.dtype).removeprefix("torch.") for _, t in _tensors(out)}) or [
                    type(out).__name__]
                raise SpecError("model", f"the model's output holds no floating-point tensor (got "
                                f"{', '.join(kinds)}): nothing to measure at the output")
            sources = [p.source_of(t) for t in outs]
            out_rows = None if any(s is None for s in sources) else set(sources)
            if backward:
                live = [o for o in outs if o.requires_grad]
                if not live:
                    raise SpecError("model", "no output depends on a parameter or on the input: no gradient "
                                    "to propagate (drop --backward)")
                loss = sum((o * _upstream(torch, o, seed, replicate, k)).sum() for k, o in enumerate(live))
                try:
                    loss.backward()
                except Exception as exc:
                    raise SpecError("backward", f"the model's backward pass failed: {_message(exc)}") from exc
        grads: dict[int, float] = {}
        seen: set[int] = set()
        for row in p.rows:
            w = row.target.weight if row.target is not None else None
            if w is not None and id(w) not in seen and w.grad is not None:
                seen.add(id(w))
                grads[row.layer] = float(torch.linalg.vector_norm(w.grad.detach().double()))
        return _Replicate(p.rows, p.residual_rows, grads, out_rows)


def _describe(rep: _Replicate) -> _Replicate:
    """Each row's module as the theory needs it (its parameters as this replicate drew them), read after
    the pass."""
    from . import inspect_theory

    for row in rep.rows:
        if row.call_info is not None:
            row.node = inspect_theory.describe(*row.call_info)
            row.call_info = None
    return rep


def _frame(config: str, replicate: int, rep: _Replicate, backward: bool) -> pd.DataFrame:
    records = []
    for row in rep.rows:
        nonfinite = bool(row.post.pop("nonfinite", False))
        rec: dict[str, Any] = {
            "config": config, "replicate": replicate, "layer": row.layer, "name": row.name, "module": row.module,
            "call": row.call, "type": row.type_name, "shape": "x".join(map(str, row.shape)),
            "channel_axis": row.axes[1], "fan_in": row.node.get("fan_in", math.nan),
            "fan_out": row.node.get("fan_out", math.nan), "weight_ms": row.node.get("weight_ms", math.nan),
            "nonfinite": nonfinite,
            **{f"post_{k}": row.post.get(k, math.nan) for k in STATS}}
        if backward:
            grad = row.grad or empty_stats()
            grad.pop("nonfinite", None)
            rec.update({f"grad_{k}": grad.get(k, math.nan) for k in STATS})
            norm = rep.weight_grads.get(row.layer, math.nan)
            rec["weight_grad_norm"] = norm
            rec["weight_grad_log10_norm"] = math.log10(norm) if norm > 0 else (-math.inf if norm == 0 else math.nan)
        records.append(rec)
    return pd.DataFrame(records)


def _residual_frame(config: str, replicate: int, rep: _Replicate) -> pd.DataFrame:
    names = {row.layer: row.name for row in rep.rows}
    records = []
    for r in rep.residual:
        rec = {"config": config, "replicate": replicate, "block": r["name"], "layer": r["layer"],
               "skip": names.get(r["skip_source"], "") if r["skip_source"] is not None else "",
               "branch": names.get(r["branch_source"], "") if r["branch_source"] is not None else "",
               "skip_layer": r["skip_source"], "branch_layer": r["branch_source"], "ambiguous": r["ambiguous"]}
        total = r["total"]
        if total is None and r["layer"] in names:
            total = next(row.post for row in rep.rows if row.layer == r["layer"])
        for part, stats in (("skip", r["skip"]), ("branch", r["branch"]), ("sum", total or empty_stats())):
            for k in ("mean", "std", "second_moment", "sq_unit_mean", "unit_var", "cos_sim"):
                rec[f"{part}_{k}"] = stats.get(k, math.nan)
        records.append(rec)
    return pd.DataFrame(records)


def inspect(model_or_factory: Any, input_shape: Sequence[int] | str | None = None, *, replicates: int = 1,
            backward: bool = False, modules: str | Sequence[str] | None = None,
            types: str | Sequence[str] | None = None, mode: str = "train", inputs: np.ndarray | None = None,
            seed: int = 0, device: str = "cpu", trace: bool = True, theory: bool = True,
            factory_args: tuple = (), config: str = "model") -> pd.DataFrame:
    """Measure every module of a model at initialization, over ``replicates`` re-initialisations.

    ``model_or_factory``: a callable returning a fresh ``torch.nn.Module``
    (a class, a function, ``"pkg.module:make_model"``; called with
    ``factory_args``), or a module, which is deep-copied and re-initialised
    by ``reset_parameters()`` (PyTorch's default init: a custom init done in
    ``__init__`` is lost; pass a factory to measure yours). Replicate r is
    drawn under torch's generator seeded from ``seed``'s tree, so it is the
    same model whatever else runs; the global torch generator is restored.

    Inputs are N(0, 1) of ``input_shape`` (samples first) from the seed tree,
    or ``inputs`` (the same array every replicate; integer arrays go in as
    token ids). ``modules`` (glob patterns on qualified names, comma-separated)
    and ``types`` (class names) select what is measured; by default every
    module, every traced addition and activation, and the model's output.
    ``mode``: "train" (batch statistics, dropout on) or "eval".

    Returns one row per module call and replicate: ``config``,
    ``replicate``, ``layer`` (order of execution; 0 is the input), ``name``
    (qualified name, ``#k`` for a module's k-th call, ``[i]`` for a tuple
    output's i-th tensor), ``module``, ``call``, ``type``, ``shape``,
    ``channel_axis``, ``fan_in``, ``fan_out``, ``weight_ms`` (the mean
    square of the weights), simulate's ``post_*`` statistics of the output
    and, with ``backward``, ``grad_*`` of the gradient with respect to it
    (for a N(0, 1) gradient entering the output) and ``weight_grad_norm``;
    ``theory`` and ``theory_post_*`` / ``theory_grad_*`` where mean-field
    theory applies. :func:`residual_table` gives the residual additions'
    skip, branch and sum statistics; ``table.attrs["inspect"]`` holds the
    run's settings and notes.
    """
    torch = _torch()
    if mode not in MODES:
        raise SpecError("mode", f"expected train or eval, got {mode!r}")
    try:
        replicates = int(replicates)
    except (TypeError, ValueError):
        replicates = 0
    if replicates < 1:
        raise SpecError("replicates", f"expected a positive integer, got {replicates!r}")
    dev = _device(device)
    if isinstance(model_or_factory, str):
        model_or_factory = load_model(model_or_factory)
    if not callable(model_or_factory):
        raise SpecError("model", f"expected a torch.nn.Module or a callable that returns one, got "
                        f"{type(model_or_factory).__name__}")
    if inputs is not None:
        inputs = np.asarray(inputs)
        if inputs.ndim < 1 or inputs.size == 0 or not (np.issubdtype(inputs.dtype, np.floating)
                                                      or np.issubdtype(inputs.dtype, np.integer)):
            raise SpecError("input_file", f"expected a non-empty numeric array, got {inputs.dtype} of shape "
                            f"{inputs.shape}")
        if np.issubdtype(inputs.dtype, np.floating) and not np.isfinite(inputs).all():
            raise SpecError("input_file", "the inputs contain NaN or inf")
        shape = tuple(inputs.shape)
    elif input_shape is None:
        raise SpecError("input_shape", "give the input's shape, samples first (such as 8,3,32,32), or inputs")
    else:
        shape = _input_shape(input_shape)
    patterns = [p.strip() for p in modules.split(",")] if isinstance(modules, str) else modules
    type_list = [t.strip() for t in types.split(",")] if isinstance(types, str) else types
    notes: list[str] = []
    instance = isinstance(model_or_factory, torch.nn.Module)
    if instance:
        fixed = _not_reset(model_or_factory)
        notes.append("an instance was given: each replicate is a copy re-initialised by reset_parameters() "
                     "(PyTorch's default init; a custom init from __init__ is not reproduced: pass a factory)")
        if fixed:
            notes.append(f"{len(fixed)} parameter(s) no reset_parameters() re-draws keep the instance's values in "
                         f"every replicate: {', '.join(fixed[:5])}{' ...' if len(fixed) > 5 else ''}")
    start = time.perf_counter()
    frames, residual_frames, reps = [], [], []
    for r in range(replicates):
        model = _build(model_or_factory, r, seed, dev, tuple(factory_args))
        model.train(mode == "train")
        x = _make_input(torch, shape, inputs, seed, r, _first_dtype(model, torch), dev)
        rep = _describe(_pass(_prepare(model, patterns, type_list, trace, notes if r == 0 else None), x, seed, r,
                              backward, theory, "input_file" if inputs is not None else "input_shape"))
        if reps and [row.name for row in rep.rows] != [row.name for row in reps[0].rows]:
            raise SpecError("model", f"replicate {r} ran a different sequence of modules from replicate 0; "
                            "varprop compares replicates module by module")
        reps.append(rep)
        frames.append(_frame(config, r, rep, backward))
        residual_frames.append(_residual_frame(config, r, rep))
    table = pd.concat(frames, ignore_index=True)
    if theory:
        from .inspect_theory import predict

        table = predict(table, [rep.rows for rep in reps], backward, inputs is None, reps[0].outputs)
    residual = pd.concat(residual_frames, ignore_index=True)
    if theory and len(residual):
        from .inspect_theory import residual_theory

        residual = residual_theory(residual, table)
    if table["nonfinite"].any():
        bad = table.loc[table["nonfinite"], "name"].iloc[0]
        notes.append(f"{bad} produced inf or NaN: its statistics are left empty")
    table.attrs["residual"] = residual.to_dict(orient="records")  # plain records: pandas copies attrs often
    table.attrs["inspect"] = {
        "model": _callable_name(model_or_factory) if not instance else type(model_or_factory).__name__,
        "instance": instance, "input_shape": list(shape), "inputs": "given" if inputs is not None else "gaussian",
        "replicates": replicates, "seed": seed, "mode": mode, "backward": backward, "device": str(dev),
        "modules": patterns, "types": type_list, "trace": trace, "notes": notes,
        "elapsed_s": time.perf_counter() - start, "torch": torch.__version__,
    }
    return table


# --- width sweep: an automated coord check ------------------------------------------------------------------

@dataclass
class SweepResult:
    """:func:`width_sweep`'s outcome: every width's table, the exponents and the verdict."""

    table: pd.DataFrame  # inspect()'s rows of every width, with a ``width`` column (config "width=64", ...)
    exponents: pd.DataFrame  # per module and side: the exponent of the std against width, its interval, verdict
    passed: bool | None  # True: every exponent within the tolerance; False: one outside it; None: undecided
    message: str
    tolerance: float

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "message": self.message, "tolerance": self.tolerance,
                "exponents": self.exponents.to_dict(orient="records")}


def width_sweep(factory: Any, widths: Sequence[int] | str, input_shape: Sequence[int] | str | None = None, *,
                replicates: int = 4, backward: bool = False, tolerance: float = 0.1, level: float = 0.95,
                **options: Any) -> SweepResult:
    """Inspect ``factory(width)`` at each width and fit, per module, ``log10 std = a + b log10 width``.

    The exponent b says how a module's output (and, with ``backward``, its
    gradient) scales with width: 0 for a correctly scaled model, 0.5 per
    layer for N(0, 1) weights. The fit is made on each replicate (replicate r
    of every width is drawn from the same seed; replicates are independent),
    and the interval at ``level`` comes from the spread of those slopes
    (t with R - 1 degrees of freedom; with one replicate, the regression's
    own). A module passes when its whole interval lies within
    [-tolerance, +tolerance], fails when it lies wholly outside, and is
    undecided otherwise; the sweep fails if a module fails, passes if all
    pass. Other options go to :func:`inspect`.
    """
    from scipy import stats as sps

    from .fit import line_fit

    ws = _widths(widths)
    if not tolerance > 0:
        raise SpecError("tolerance", f"expected a positive exponent tolerance, got {tolerance!r}")
    frames, residual = [], []
    for w in ws:
        t = inspect(factory, input_shape, replicates=replicates, backward=backward, factory_args=(w,),
                    config=f"width={w}", **options)
        t.insert(1, "width", w)
        attrs, t.attrs = dict(t.attrs), {}
        residual += attrs["residual"]
        frames.append(t)
    table = pd.concat(frames, ignore_index=True)
    table.attrs = {**attrs, "residual": residual, "inspect": {**attrs["inspect"], "widths": list(ws)}}
    # The input's own statistics do not depend on the model, and its gradient updates no weight: not fitted.
    names = [n for n in frames[0]["name"].unique() if n != INPUT and all(n in set(f["name"]) for f in frames[1:])]
    rows = []
    sides = ["post"] + (["grad"] if backward else [])
    for name in names:
        sub = table[table["name"] == name]
        for side in sides:
            col = f"{side}_log10_std"
            pts = sub[["width", "replicate", col]].dropna()
            pts = pts[np.isfinite(pts[col])]
            if pts["width"].nunique() < 2:
                continue
            x = np.log10(pts["width"].to_numpy(float))
            pooled = line_fit(x, pts[col].to_numpy(float), level)
            per = [line_fit(np.log10(g["width"].to_numpy(float)), g[col].to_numpy(float)).slope
                   for _, g in pts.groupby("replicate") if g["width"].nunique() >= 2]
            if len(per) >= 2:
                se = float(np.std(per, ddof=1) / math.sqrt(len(per)))
                half = float(sps.t.ppf(0.5 + level / 2, len(per) - 1)) * se
                slope = float(np.mean(per))
            else:
                slope, se = pooled.slope, pooled.slope_se
                half = pooled.slope_hi - pooled.slope
            lo, hi = slope - half, slope + half
            verdict = ("pass" if -tolerance <= lo and hi <= tolerance else
                       "fail" if (lo > tolerance or hi < -tolerance) else "undecided")
            first = sub[sub["width"] == ws[0]].iloc[0]
            rows.append({"name": name, "type": first["type"], "layer": int(first["layer"]),
                         "side": "output" if side == "post" else "gradient", "exponent": slope, "se": se,
                         "lo": lo, "hi": hi, "r2": pooled.r2, "replicates": len(per) or 1, "verdict": verdict})
    exponents = pd.DataFrame(rows)
    if exponents.empty:
        raise SpecError("width_sweep", "no module's std could be fitted against width (every std is 0 or "
                        "not finite)")
    bad = exponents[exponents["verdict"] == "fail"]
    undecided = exponents[exponents["verdict"] == "undecided"]
    span = f"widths {ws[0]}..{ws[-1]}"
    if len(bad):
        b = bad.iloc[np.argmax(np.abs(bad["exponent"].to_numpy()))]
        passed: bool | None = False
        message = (f"FAIL: {len(bad)} of {len(exponents)} exponents lie outside +-{tolerance:g} ({span}); the "
                   f"largest: {b['name']} ({b['side']}) std ~ width^{b['exponent']:.3f} "
                   f"[{b['lo']:.3f}, {b['hi']:.3f}]")
    elif len(undecided):
        u = undecided.iloc[0]
        passed = None
        what = "1 exponent's interval straddles" if len(undecided) == 1 else \
            f"{len(undecided)} exponents' intervals straddle"
        message = (f"UNDECIDED: {what} +-{tolerance:g} ({span}), e.g. {u['name']} ({u['side']}): "
                   f"{u['exponent']:.3f} [{u['lo']:.3f}, {u['hi']:.3f}]; more replicates or widths narrow "
                   "the intervals")
    else:
        passed = True
        message = (f"PASS: every exponent lies within +-{tolerance:g} ({len(exponents)} fits, {span}): "
                   "the statistics do not scale with width")
    return SweepResult(table, exponents, passed, message, tolerance)


def residual_table(table: pd.DataFrame) -> pd.DataFrame:
    """The residual additions of an :func:`inspect` table: per block and replicate, the skip's, the branch's
    and the sum's statistics (``skip_second_moment``, ``branch_unit_var``, ...) and their predictions."""
    return pd.DataFrame(table.attrs.get("residual", []))


def _widths(widths: Sequence[int] | str) -> tuple[int, ...]:
    parts = widths.split(",") if isinstance(widths, str) else widths
    try:
        ws = tuple(sorted({int(str(p).strip()) for p in parts}))
    except (TypeError, ValueError):
        ws = ()
    if len(ws) < 2 or ws[0] < 1:
        raise SpecError("width_sweep", f"expected at least two comma-separated positive widths such as "
                        f"64,128,256,512, got {widths!r}")
    return ws


# --- assertions for a test suite --------------------------------------------------------------------------

def check_preserves_variance(model: Any, input_shape: Sequence[int] | str | None = None, *, band: float = 2.0,
                             direction: str = "forward", replicates: int = 16, seed: int = 0,
                             false_alarm: float = 1e-6, command: str | None = None, label: str | None = None,
                             **options: Any) -> Any:
    """Measure whether every module's output std stays within a factor ``band`` of the input's (forward),
    and every gradient's within ``band`` of the output gradient's (backward).

    Per module, log10(std / reference std) is averaged over ``replicates``
    re-initialisations with a t interval at ``false_alarm`` shared over the
    modules (Bonferroni); a module fails only when its whole interval lies
    outside [1/band, band], so sampling noise does not fail a healthy model,
    and one whose interval straddles the edge is undecided. Returns
    :class:`varprop.testing.CheckResult`, whose message names the first
    failing module and ``command`` (how to reproduce it); other options go
    to :func:`inspect`.
    """
    from scipy import stats as sps

    from .testing import MIN_REPLICATES, CheckResult

    if direction not in ("forward", "backward", "both"):
        raise SpecError("direction", f"expected forward, backward or both, got {direction!r}")
    if not band > 1:
        raise SpecError("band", f"expected a factor > 1, got {band!r}")
    if replicates < MIN_REPLICATES:
        raise SpecError("replicates", f"at least {MIN_REPLICATES} replicates are needed: with fewer, the interval "
                        "at this false-alarm rate is too wide to ever fail")
    backward = direction in ("backward", "both")
    table = inspect(model, input_shape, replicates=replicates, backward=backward, seed=seed, **options)
    limit = math.log10(band)
    layers = sorted(table["layer"].unique())
    sides = (["post"] if direction != "backward" else []) + (["grad"] if backward else [])
    wide = {side: table.pivot(index="replicate", columns="layer", values=f"{side}_log10_std") for side in sides}
    names = table.groupby("layer")["name"].first()
    ref_layer = {"post": 0, "grad": int(table.loc[table["grad_log10_std"].notna(), "layer"].max())
                 if backward else 0}
    # The input is the forward reference; its gradient updates no weight (and grows with fan_out / fan_in
    # at the first layer under a fan_in init), so it is not checked backward either.
    tests = [(side, layer) for side in sides for layer in layers if layer not in (0, ref_layer[side])
             and wide[side][layer].notna().all()]
    tq = float(sps.t.isf(false_alarm / 2 / max(len(tests), 1), replicates - 1))
    rows = []
    for side, layer in tests:
        d = (wide[side][layer] - wide[side][ref_layer[side]]).to_numpy(float)
        if not np.isfinite(d).all():
            mean, lo, hi = float(np.mean(d)), -math.inf, -math.inf
        else:
            mean, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))
            lo, hi = mean - tq * se, mean + tq * se
        th_col = f"theory_{side}_log10_std"
        th = math.nan
        if th_col in table:
            per = table.groupby("layer")[th_col].first()
            th = float(per.get(layer, math.nan) - per.get(ref_layer[side], math.nan))
        verdict = "fail" if (lo > limit or hi < -limit) else "pass" if (-limit <= lo and hi <= limit) else \
            "undecided"
        rows.append({"direction": "forward" if side == "post" else "backward", "layer": int(layer),
                     "name": names[layer], "log10_ratio": mean, "lo": lo, "hi": hi, "theory_log10_ratio": th,
                     "verdict": verdict})
    result = pd.DataFrame(rows)
    label = label or (model if isinstance(model, str) else _callable_name(model))
    if command is None:
        shape = ",".join(map(str, table.attrs["inspect"]["input_shape"]))
        command = (f"varprop check --model {model} --input-shape {shape} --band {band:g} --replicates {replicates} "
                   f"--seed {seed}" + (" --backward" if backward else "") if isinstance(model, str) else
                   f"varprop.torch.check_preserves_variance({label}, {tuple(table.attrs['inspect']['input_shape'])}, "
                   f"band={band:g}, direction={direction!r}, replicates={replicates}, seed={seed})")
    bad = result[result["verdict"] == "fail"] if len(result) else result
    if bad.empty:
        undecided = int((result["verdict"] == "undecided").sum()) if len(result) else 0
        msg = (f"{label}: every module's std stays within a factor {band:g} of the "
               + ("input's" if direction == "forward" else "input's and the output gradient's"
                  if direction == "both" else "output gradient's")
               + f" ({len(result)} checks, {replicates} re-initialisations)"
               + (f"; {undecided} undecided at this noise level" if undecided else ""))
        return CheckResult(True, msg, result, command)
    first = bad.iloc[0]
    where = "the input's" if first["direction"] == "forward" else "the output gradient's"
    if math.isinf(first["lo"]):
        measured = "std 0 in some re-initialisation"
    else:
        measured = (f"x{10 ** first['log10_ratio']:.3g} (interval x{10 ** first['lo']:.3g} .. "
                    f"x{10 ** first['hi']:.3g} over {replicates} re-initialisations)")
    th = first["theory_log10_ratio"]
    msg = (f"{label}: the {first['direction']} std of {first['name']} leaves the band [1/{band:g}, {band:g}] "
           f"of {where}: measured {measured}" + (f", mean-field predicts x{10 ** th:.3g}" if math.isfinite(th)
                                                 else "") + f". Reproduce: {command}")
    return CheckResult(False, msg, result, command)


def assert_preserves_variance(model: Any, input_shape: Sequence[int] | str | None = None, *, band: float = 2.0,
                              **options: Any) -> Any:
    """:func:`check_preserves_variance`, raising AssertionError with its message when a module fails.

    >>> import torch.nn as nn
    >>> make = lambda: nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 256))
    >>> assert_preserves_variance(make, input_shape=(64, 256), band=4).passed
    True
    """
    result = check_preserves_variance(model, input_shape, band=band, **options)
    if not result.passed:
        raise AssertionError(result.message)
    return result

"""The hooks of one forward (and backward) pass: one row per module call, with its output's statistics,
where its inputs came from (the data flow the theory follows), the gradient with respect to it, and the
operands of each residual addition."""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

from ..nn import activations
from . import load_torch
from .graph import module_names
from .modules import INPUT, axes_of, functional_activation, outer_layouts, rnn_state, states_layout, tensors
from .tensorstats import Buffer, saturation, tensor_stats, zero_when_saturated


@dataclass
class Target:
    """A module whose calls become rows."""

    name: str  # qualified name ("(model)" for the root; an Op's display name without "()")
    display: str
    type_name: str
    act: activations.Activation | None
    weight: Any = None  # the module's weight Parameter, if any (for weight_grad_norm)
    row: bool = True  # False: hooked only for the residual table (an addition outside the selection)


@dataclass
class Row:
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
    target: Target | None = None
    node: dict[str, Any] = field(default_factory=dict)  # what the theory needs (inspect_theory.describe)
    call_info: tuple | None = None  # (module, call information, output shape) until described


def one_thread(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run with one PyTorch thread, the model's count restored afterwards (a quarter of a
    microsecond each way). The statistics' float64 sums are then the same whatever the thread count, and a
    busy machine cannot stall them: a reduction split over threads waits for the slowest, and with another
    process on the core a 0.1 ms sum took 18 ms on two threads here."""
    def run(*args: Any, **kwargs: Any) -> Any:
        torch = load_torch()
        threads = torch.get_num_threads()
        if threads == 1:
            return fn(*args, **kwargs)
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return run


class Pass:
    """The hooks of one forward (and backward) pass: registered on entry, every one removed on exit
    (module hooks and tensor hooks alike), whether the pass succeeded or raised."""

    def __init__(self, runner: Any, targets: dict[Any, Target], backward: bool, residuals: dict[Any, Any],
                 blocks: list[tuple[str, Any, Any]], theory: bool):
        self.runner, self.targets, self.backward, self.theory = runner, targets, backward, theory
        self.residuals, self.blocks = residuals, blocks
        self.handles: list[Any] = []
        self.rows: list[Row] = []
        self.residual_rows: list[dict[str, Any]] = []
        self.buffer = Buffer()
        self._producers: dict[int, tuple[int, Any, int]] = {}  # id(tensor) -> (row, weak ref, version)
        self._by_ptr: dict[tuple[int, int, Any], tuple[int, int, Any]] = {}  # (data_ptr, numel, dtype) -> same
        self._calls: dict[Any, int] = {}
        self._pending: dict[Any, list[dict[str, Any]]] = {}
        self._captured: dict[Any, dict[str, Any]] = {}
        self.outer = outer_layouts(runner)  # the layouts torch's modules state for those inside them
        self._feed: Any = None  # the copy of the input the model runs on
        self._reader: Any = None  # the first measured module without children that received it

    def axes(self, module: Any, ndim: int, inherited: tuple[int, int] | None) -> tuple[int, int]:
        """:func:`axes_of` ``module``'s output, in the layout its enclosing modules state."""
        return axes_of(module, ndim, inherited, self.outer.get(id(module)))

    # registration -----------------------------------------------------------------------------------------
    def __enter__(self) -> "Pass":
        try:
            for module in self.targets:
                self.handles.append(module.register_forward_pre_hook(one_thread(self._pre), with_kwargs=True))
                self.handles.append(module.register_forward_hook(one_thread(self._post), with_kwargs=True))
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
        """The row whose output ``t`` is, not modified in place since (by an operation the hooks do not see:
        ``F.relu_``, ``+=`` in an untraced model, a module left out by ``modules``/``types``), else None:
        a tensor changed unseen is no row's output, and the theory restarts from it as measured."""
        found = self._producer(t)
        return found[0] if found is not None and found[1] == t._version else None

    @staticmethod
    def _ptr_key(t: Any) -> tuple[int, int, Any]:
        return (t.data_ptr(), t.numel(), t.dtype)

    def add_input(self, x: Any, axes: tuple[int, int]) -> Any:
        """The input's row; returns the tensor to run the model on: a copy of ``x``, which the model may
        change in place (``F.relu_(x)``) without touching ``x`` (a user's array that every replicate reads;
        with a gradient wanted a leaf, on which autograd refuses it), the gradient still read on ``x``."""
        stats = one_thread(tensor_stats)(x, *axes, buffer=self.buffer)
        row = Row(0, INPUT, "", 1, "input", tuple(x.shape), axes, [], stats)
        self.rows.append(row)
        if self.backward and x.requires_grad:
            self.handles.append(x.register_hook(one_thread(self._grad_hook(row))))
        feed = self._feed = x.clone()
        self._remember(feed, 0)
        return feed

    def relayout_input(self, x: Any) -> None:
        """After the forward pass: the input's row laid out as the first measured module that received the
        input itself says, if its kind says (an untraced model's reader, which no graph names), its
        statistics taken again from ``x`` (the model ran on a copy) where that changes its axes."""
        if self._reader is None or x.dim() != 3 or not states_layout(self._reader, self.outer.get(id(self._reader))):
            return
        row, axes = self.rows[0], self.axes(self._reader, 3, None)
        if axes != row.axes:
            row.axes = axes
            row.post = one_thread(tensor_stats)(x.detach(), *axes, buffer=self.buffer)

    def _remember(self, t: Any, layer: int) -> None:
        ref = weakref.ref(t)
        self._producers[id(t)] = (layer, ref, t._version)
        self._by_ptr[self._ptr_key(t)] = (layer, t._version, ref)

    def _layout(self, t: Any) -> tuple[int, int] | None:
        """The axes of the row whose output ``t`` is, changed in place since or not (its layout is ``t``'s);
        None if no row's."""
        found = self._producer(t)
        return None if found is None else self.rows[found[0]].axes

    # hooks ------------------------------------------------------------------------------------------------
    def _pre(self, module: Any, args: tuple, kwargs: dict) -> None:
        inputs = [t for _, t in tensors((args, kwargs)) if t.is_floating_point()]
        if self._reader is None and inputs and inputs[0] is self._feed and next(module.children(), None) is None:
            self._reader = module  # the first module without children to receive the input itself
        info: dict[str, Any] = {"sources": [self.source_of(t) for t in inputs],
                                "in_shape": tuple(inputs[0].shape) if inputs else None,
                                "layout": self._layout(inputs[0]) if inputs else None}
        target = self.targets[module]
        act = target.act
        if act is not None and getattr(module, "fname", None):  # a traced call: its own arguments decide
            act = functional_activation(module.fname, args, kwargs)
        info["act"] = act
        if act is not None and inputs and not zero_when_saturated(act):
            info["saturated"] = saturation(act, inputs[0])  # before the call: an in-place one overwrites it
        if inputs and info["sources"][0] is None and self.theory:
            # A layer fed by something the hooks do not see: the theory restarts from its measured input.
            s = tensor_stats(inputs[0], *self.axes(module, inputs[0].dim(), info["layout"]), buffer=self.buffer,
                             complete=False)
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
        inherited = info["layout"]
        for path, t in tensors(output):
            if not t.is_floating_point() or t.dim() == 0 or t.numel() == 0:
                continue
            if self.source_of(t) is not None and next(module.children(), None) is not None:
                # The tensor (or a view of it) a module inside this one returned: already a row. A module
                # without children returning its input (Identity, Dropout in eval mode) or a view of it
                # (Flatten: its channels differ) is a row of its own.
                continue
            axes = self.axes(module, t.dim(), inherited) if not rnn_state(module, path) else (1, 2)
            layer = len(self.rows)
            name = target.display + (f"#{call}" if call > 1 else "") + path
            stats = tensor_stats(t, *axes, saturated=info.get("saturated", math.nan), buffer=self.buffer)
            if info["act"] is not None and zero_when_saturated(info["act"]):
                stats["frac_saturated"] = stats["frac_zero"]
            row = Row(layer, name, target.name, call, target.type_name, tuple(t.shape), axes,
                       list(info["sources"]), stats, target=target)
            row.call_info = (module, info, tuple(t.shape))
            if "operands" in info:
                self._residual_row(module, layer, info["operands"])
            self.rows.append(row)
            self._remember(t, layer)
            if self.backward and t.requires_grad:
                self.handles.append(t.register_hook(one_thread(self._grad_hook(row))))

    def _sum_stats(self, output: Any, info: dict[str, Any]) -> dict[str, float] | None:
        t = next((t for _, t in tensors(output) if t.is_floating_point()), None)
        return None if t is None else tensor_stats(t, *info["operands"]["axes"], buffer=self.buffer, complete=False)

    def _grad_hook(self, row: Row) -> Callable[[Any], None]:
        def hook(grad: Any) -> None:
            row.grad = tensor_stats(grad, *row.axes, buffer=self.buffer)
        return hook

    # residual additions -------------------------------------------------------------------------------------
    def _operand_stats(self, module: Any, operands: list[Any]) -> dict[str, Any]:
        res = self.residuals[module]
        skip, branch = operands[res.skip_index], operands[1 - res.skip_index]
        sources = self.source_of(skip), self.source_of(branch)
        axes = self.axes(module, skip.dim(), self._layout(skip))
        return {"skip": self._stats_of(skip, axes), "branch": self._stats_of(branch, axes),
                "skip_source": sources[0], "branch_source": sources[1], "ambiguous": res.ambiguous, "axes": axes}

    def _stats_of(self, t: Any, axes: tuple[int, int]) -> dict[str, float]:
        """``t``'s statistics for the residual table: a row's own when ``t`` is that row's output, unchanged
        since and laid out alike (an addition's operands usually are), else computed (those the table
        reads)."""
        own = self._row_post(self.source_of(t), axes, t.shape)
        return own if own is not None else tensor_stats(t, *axes, buffer=self.buffer, complete=False)

    def _row_post(self, layer: int | None, axes: tuple[int, int], shape: Any) -> dict[str, float] | None:
        """Row ``layer``'s statistics when its output is laid out as ``axes`` and ``shape``, else None."""
        if layer is None:
            return None
        row = self.rows[layer]
        return row.post if row.axes == axes and row.shape == tuple(shape) else None

    def _residual_row(self, module: Any, layer: int, ops: dict[str, Any], name: str | None = None,
                      total: dict[str, float] | None = None) -> None:
        self.residual_rows.append({"name": name or self.targets[module].display, "layer": layer,
                                   "skip_source": ops["skip_source"], "branch_source": ops["branch_source"],
                                   "ambiguous": ops["ambiguous"], "skip": ops["skip"], "branch": ops["branch"],
                                   "total": total})

    def _watch_block(self, name: str, block: Any, spec: Any) -> None:
        """Hooks that capture a known block's operands (copies: torchvision adds in place) and measure
        each addition when the block returns. An operand that is a row's output, unchanged when captured,
        takes that row's statistics; the others and the sums are measured for the residual table."""
        def capture(t: Any) -> tuple[Any, int | None, tuple[int, int] | None]:  # (copy, source row, its layout)
            return t.detach().clone(), self.source_of(t), self._layout(t)

        def pre(module: Any, args: tuple, kwargs: dict) -> None:
            x = next((t for _, t in tensors((args, kwargs)) if t.is_floating_point()), None)
            self._captured[block] = {"input": None if x is None else capture(x)}

        def grab(sub: str) -> Callable[..., None]:
            def hook(module: Any, args: tuple, output: Any) -> None:
                t = next((t for _, t in tensors(output) if t.is_floating_point()), None)
                if t is not None and block in self._captured:
                    self._captured[block][sub] = capture(t)
            return hook

        def stats(operand: tuple[Any, int | None, Any], axes: tuple[int, int]) -> dict[str, float]:
            own = self._row_post(operand[1], axes, operand[0].shape)
            return own if own is not None else tensor_stats(operand[0], *axes, buffer=self.buffer, complete=False)

        def post(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            got = self._captured.pop(block, {})
            sums: list[Any] = []
            for k, (skip_key, branch_key) in enumerate(spec.adds):
                pair = [sums[int(key[4:])] if key.startswith("sum:") else got.get(key)
                        for key in (skip_key, branch_key)]
                if any(p is None for p in pair):
                    return
                skip, branch = pair
                if skip[0].shape != branch[0].shape:
                    return
                total = skip[0] + branch[0]
                sums.append((total, None, None))
                axes = self.axes(block, total.dim(), skip[2])
                ops = {"skip": stats(skip, axes), "branch": stats(branch, axes), "skip_source": skip[1],
                       "branch_source": branch[1], "ambiguous": False}
                self._residual_row(block, -1, ops, name=f"{name}+{k + 1}",
                                   total=tensor_stats(total, *axes, buffer=self.buffer, complete=False))

        self.handles.append(block.register_forward_pre_hook(one_thread(pre), with_kwargs=True))
        for sub in module_names(spec):
            sub_module = block.get_submodule(sub) if sub != "downsample" or block.downsample is not None else None
            if sub_module is not None:
                self.handles.append(sub_module.register_forward_hook(one_thread(grab(sub))))
        self.handles.append(block.register_forward_hook(one_thread(post), with_kwargs=True))


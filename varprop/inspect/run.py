"""``inspect()``: a model's replicates -> the per-module table (and the residual additions' table).

Each replicate is a fresh model (:mod:`.model`), traced where fx can (:mod:`.graph`), run once with
every hook in place (:mod:`.hooks`); the rows become a DataFrame with simulate's column names and the
mean-field prediction beside them (:mod:`.theory`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..errors import SpecError
from ..options import parse_input_shape
from ..montecarlo import memory
from ..stats import STATS, empty_stats
from . import graph, load_torch
from . import theory as inspect_theory
from .hooks import Pass, Row, Target
from .model import (build, callable_name, error_line, first_dtype, fork_rng, load_model, make_input, not_reset,
                    parse_device, seed_of, upstream)
from .modules import ROOT, activation_of, input_axes, selected, tensors, torch_nn

MODES = ("train", "eval")


@dataclass
class _Replicate:
    rows: list[Row]
    residual: list[dict[str, Any]]
    weight_grads: dict[int, float]
    outputs: set[int] | None  # the rows whose outputs are the model's (None: one is not a measured module's)


@dataclass
class _Prepared:
    """A replicate's model ready to run: the rewritten runner and the modules whose calls become rows."""

    graph: Any  # graph.Prepared
    targets: dict[Any, Target]


def _prepare(model: Any, patterns: Sequence[str] | None, types: Sequence[str] | None, trace: bool,
             notes: list[str] | None = None) -> _Prepared:
    """Trace and rewrite the model where fx can (graph.prepare) and choose the modules to hook."""
    torch = load_torch()
    prepared = graph.prepare(model, trace)
    if notes is not None:
        if not trace:
            notes.append("not traced (--no-trace): additions and functional activations are not seen, only modules")
        if prepared.traced:
            where = "the whole model" if prepared.traced == [""] else ", ".join(prepared.traced)
            notes.append(f"traced with torch.fx: {where} (additions and functional activations measured)")
        for name, why in prepared.untraced[:3]:
            notes.append(f"not traced: {name or 'the model'} ({why}); its modules are measured by hooks")
    filtered = bool(patterns or types)
    targets: dict[Any, Target] = {}
    for name, module in prepared.runner.named_modules():
        if module in prepared.ops:
            qual, type_name = module.display.removesuffix("()"), f"{module.fname}()"
            chosen = selected(qual, type_name, patterns, types)
            if chosen or module in prepared.residuals:
                targets[module] = Target(qual, module.display, type_name, activation_of(module), row=chosen)
            continue
        if name == "" and filtered:
            continue  # the model's own output is measured unless a selection is made
        if name and not selected(name, type(module).__name__, patterns, types):
            continue
        weight = getattr(module, "weight", None)
        targets[module] = Target(name or ROOT, name or ROOT, type(module).__name__, activation_of(module),
                                  weight if isinstance(weight, torch.nn.Parameter) else None)
    if not any(t.row for t in targets.values()):
        raise _no_match(prepared, patterns, types)
    if len(targets) == 1 and prepared.runner in targets and not torch_nn(model):
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

    torch = load_torch()
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
    torch = load_torch()
    runner = prep.graph.runner
    with fork_rng(torch, x.device), Pass(runner, prep.targets, backward, prep.graph.residuals,
                                         prep.graph.blocks, theory) as p, _one_blas_thread():
        axes, settled = input_axes(runner, x.dim(), p.outer, prep.graph.input_reader, prep.graph.original)
        # The forward's own draws (dropout) from the tree; torch.manual_seed would also seed every lazy
        # accelerator, formatting a stack trace for each, a millisecond per pass.
        (torch.cuda.manual_seed if x.device.type == "cuda" else torch.default_generator.manual_seed)(
            seed_of(seed, replicate, 1))
        with torch.set_grad_enabled(backward):
            if backward and x.is_floating_point():
                x.requires_grad_(True)
            feed = p.add_input(x, axes)
            try:
                out = runner(feed)
            except SpecError:
                raise
            except Exception as exc:
                if isinstance(exc, NotImplementedError) and '"forward"' in str(exc):  # the model is at fault
                    raise SpecError("model", error_line(exc)) from exc
                hint = ("; token ids go in with --input-file (an integer array)" if x.is_floating_point() and any(
                    isinstance(m, torch.nn.Embedding) for m in runner.modules()) else "")
                raise SpecError(input_option,
                                f"the model's forward failed on an input of shape {'x'.join(map(str, x.shape))}: "
                                f"{error_line(exc)}{hint}") from exc
            if not settled:
                p.relayout_input(x)
            outs = [t for _, t in tensors(out) if t.is_floating_point()]
            if not outs:
                kinds = sorted({str(t.dtype).removeprefix("torch.") for _, t in tensors(out)}) or [
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
                loss = sum((o * upstream(torch, o, seed, replicate, k)).sum() for k, o in enumerate(live))
                try:
                    loss.backward()
                except Exception as exc:
                    raise SpecError("backward", f"the model's backward pass failed: {error_line(exc)}") from exc
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
            "sample_axis": row.axes[0], "channel_axis": row.axes[1], "fan_in": row.node.get("fan_in", math.nan),
            "fan_out": row.node.get("fan_out", math.nan), "weight_ms": row.node.get("weight_ms", math.nan),
            "nonfinite": nonfinite,
            **{f"post_{k}": row.post.get(k, math.nan) for k in STATS}}
        if backward:
            grad = row.grad or empty_stats()
            rec["grad_nonfinite"] = bool(grad.pop("nonfinite", False))
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
    ``sample_axis``, ``channel_axis``, ``fan_in``, ``fan_out``, ``weight_ms`` (the mean
    square of the weights), simulate's ``post_*`` statistics of the output
    and, with ``backward``, ``grad_*`` of the gradient with respect to it
    (for a N(0, 1) gradient entering the output) and ``weight_grad_norm``
    (the norm of the weight's whole gradient, on the first row of the module
    that owns it: a module called twice or a weight shared by two modules
    is counted once, NaN on its other rows);
    ``theory`` and ``theory_post_*`` / ``theory_grad_*`` where mean-field
    theory applies. :func:`residual_table` gives the residual additions'
    skip, branch and sum statistics; ``table.attrs["inspect"]`` holds the
    run's settings and notes.
    """
    torch = load_torch()
    if mode not in MODES:
        raise SpecError("mode", f"expected train or eval, got {mode!r}")
    try:
        replicates = int(replicates)
    except (TypeError, ValueError):
        replicates = 0
    if replicates < 1:
        raise SpecError("replicates", f"expected a positive integer, got {replicates!r}")
    dev = parse_device(device)
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
        shape = parse_input_shape(input_shape)
        # the input (float32) and the statistics' float64 work buffer of its size: a floor of what a pass holds,
        # checked before either is allocated (the model's own activations come on top)
        memory.refuse_beyond(12 * math.prod(shape), None, f"an input of shape {','.join(map(str, shape))}",
                             "use a smaller --input-shape", "input_shape")
    patterns, type_list = _names("modules", modules), _names("types", types)
    notes: list[str] = []
    instance = isinstance(model_or_factory, torch.nn.Module)
    if instance:
        fixed = not_reset(model_or_factory)
        notes.append("an instance was given: each replicate is a copy re-initialised by reset_parameters() "
                     "(PyTorch's default init; a custom init from __init__ is not reproduced: pass a factory)")
        if fixed:
            notes.append(f"{len(fixed)} parameter(s) no reset_parameters() re-draws keep the instance's values in "
                         f"every replicate: {', '.join(fixed[:5])}{' ...' if len(fixed) > 5 else ''}")
    start = time.perf_counter()
    frames, residual_frames, reps = [], [], []
    for r in range(replicates):
        model = build(model_or_factory, r, seed, dev, tuple(factory_args))
        model.train(mode == "train")
        x = make_input(torch, shape, inputs, seed, r, first_dtype(model, torch), dev)
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
        table = inspect_theory.predict(table, [rep.rows for rep in reps], backward, inputs is None, reps[0].outputs)
    residual = pd.concat(residual_frames, ignore_index=True)
    if theory and len(residual):
        residual = inspect_theory.residual_theory(residual, table)
    if table["nonfinite"].any():
        bad = table.loc[table["nonfinite"], "name"].iloc[0]
        notes.append(f"{bad} produced inf or NaN: its statistics are left empty")
    table.attrs["residual"] = residual.to_dict(orient="records")  # plain records: pandas copies attrs often
    table.attrs["inspect"] = {
        "model": callable_name(model_or_factory) if not instance else type(model_or_factory).__name__,
        "instance": instance, "input_shape": list(shape), "inputs": "given" if inputs is not None else "gaussian",
        "token_ids": inputs is not None and bool(np.issubdtype(inputs.dtype, np.integer)),
        "replicates": replicates, "seed": seed, "mode": mode, "backward": backward, "device": str(dev),
        "modules": patterns, "types": type_list, "trace": trace, "notes": notes,
        # the rows whose tensors the model returns (None: one is not a measured module's output)
        "outputs": None if reps[0].outputs is None else sorted(reps[0].outputs),
        "elapsed_s": time.perf_counter() - start, "torch": torch.__version__,
    }
    return table


def _names(option: str, value: str | Sequence[str] | None) -> list[str] | None:
    """``modules`` or ``types``: comma-separated (or a list), empty entries dropped; none at all refused."""
    if value is None:
        return None
    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else value) if str(n).strip()]
    if not names:
        raise SpecError(option, f"expected comma-separated names, got {value!r}")
    return names


def residual_table(table: pd.DataFrame) -> pd.DataFrame:
    """The residual additions of an :func:`inspect` table: per block and replicate, the skip's, the branch's
    and the sum's statistics (``skip_second_moment``, ``branch_unit_var``, ...) and their predictions."""
    return pd.DataFrame(table.attrs.get("residual", []))


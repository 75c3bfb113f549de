"""What ``varprop inspect`` sees of a model: its residual additions and functional activations.

Module hooks see modules only; ``out = block(x) + x`` and ``F.relu(x)`` are
invisible to them. Where the model traces with ``torch.fx.symbolic_trace``
(no Python control flow on tensor values), every tensor-plus-tensor
addition and every functional activation is moved into a small module of its
own (:class:`Op`) in the traced copy, so hooks see them like any module, and
each addition's operands are told apart from the graph: the **skip** is the
operand with fewer weighted modules of its own since the two paths split (the
identity path has none), the **branch** the other. A model that does not
trace is tried child by child, so its traceable blocks still show their
additions. Leaf modules with known residual structure that fx cannot enter
(``nn.TransformerEncoderLayer``, torchvision's ``BasicBlock`` and
``Bottleneck`` in an untraceable model) are described by :data:`KNOWN_BLOCKS`
and measured with hooks on their submodules instead.

The model this module rewrites is always varprop's own copy (a factory's
fresh model, or a deep copy of an instance): a user's model is never changed.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field
from typing import Any

# Functional activations, by the name of the function (torch.relu, F.relu, ...) or tensor method (x.relu()).
ACTIVATION_FUNCTIONS = {"relu", "relu_", "leaky_relu", "leaky_relu_", "gelu", "silu", "tanh", "tanh_", "sigmoid",
                        "sigmoid_", "elu", "elu_", "selu", "selu_", "softplus"}


@dataclass
class Residual:
    """One residual addition: where its operands come from, as names for the report."""

    name: str  # the addition's display name (an Op's, or block + "+1", "+2" for a known block)
    skip: str  # display names of the producers of each operand ("" when not a measured module)
    branch: str
    skip_index: int  # which argument of the addition is the skip (0 or 1)
    ambiguous: bool = False  # both paths equally deep: "skip" and "branch" are the two arguments in order


@dataclass
class Prepared:
    """The model to run and what the rewrite found."""

    runner: Any  # torch.nn.Module
    ops: dict[Any, "Op"] = field(default_factory=dict)  # Op module -> itself (for lookup by identity)
    residuals: dict[Any, Residual] = field(default_factory=dict)  # Op module of an addition -> Residual
    traced: list[str] = field(default_factory=list)  # qualified names traced ("" = the whole model)
    untraced: list[tuple[str, str]] = field(default_factory=list)  # (name, reason) of what did not trace
    blocks: list[tuple[str, Any, "BlockSpec"]] = field(default_factory=list)  # known blocks measured by hooks
    input_reader: str | None = None  # qualified name of the module that reads the model's input, where it traces
    original: Any = None  # the model as built (a rewritten copy drops its plain attributes, batch_first among them)


@functools.lru_cache(maxsize=1)
def _op_class() -> type:
    import torch

    class _Op(torch.nn.Module):
        """A function call of the traced graph as a module, so that hooks see it.

        ``kind`` is "function" (``target(*args)``) or "method" (``args[0].target(*args[1:])``);
        the call itself is exactly the one the model made.
        """

        def __init__(self, target: Any, kind: str, display: str, fname: str):
            super().__init__()
            self.target, self.kind, self.display, self.fname = target, kind, display, fname

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            if self.kind == "method":
                return getattr(args[0], self.target)(*args[1:], **kwargs)
            return self.target(*args, **kwargs)

        def extra_repr(self) -> str:
            return self.display

    return _Op


Op = Any  # an instance of the class _op_class() makes


def function_name(target: Any, kind: str) -> str:
    """``relu`` for torch.relu, F.relu and x.relu(); ``add`` for +, torch.add and x.add()."""
    name = target if kind == "method" else getattr(target, "__name__", str(target))
    return "add" if name in ("iadd", "add_") else name


def _wanted(node: Any) -> str | None:
    """'add' or 'activation' when ``node`` is a call to measure, else None."""
    if node.op not in ("call_function", "call_method"):
        return None
    name = function_name(node.target, "method" if node.op == "call_method" else "function")
    if node.op == "call_function" and not (getattr(node.target, "__module__", "") or "").startswith(
            ("torch", "_operator")) and node.target not in (operator.add, operator.iadd):
        return None  # a user's function named like one of these: not ours to interpret
    if name == "add":  # a plain sum of two tensors (torch.add's alpha would scale the second operand)
        tensors = [a for a in node.args[:2] if _is_node(a)]
        plain = len(node.args) == 2 and not node.kwargs
        return "add" if plain and len(tensors) == 2 and all(_from_input(a) for a in tensors) else None
    return "activation" if name in ACTIVATION_FUNCTIONS else None


def _is_node(x: Any) -> bool:
    from torch import fx

    return isinstance(x, fx.Node)


def _from_input(node: Any) -> bool:
    """Whether a node's value depends on a placeholder (the model's input), not only on constants."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            return True
        stack.extend(n.all_input_nodes)
    return False


def _ancestors(node: Any) -> set:
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _weighted(nodes: set, root: Any) -> int:
    """How many of ``nodes`` call a module with parameters of its own."""
    count = 0
    for n in nodes:
        if n.op == "call_module":
            try:
                sub = root.get_submodule(n.target)
            except AttributeError:
                continue
            if any(True for _ in sub.parameters(recurse=True)):
                count += 1
    return count


def _scope(node: Any) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    return str(list(stack.values())[-1][0])


@functools.lru_cache(maxsize=1)
def _tracer_class() -> type:
    from torch import fx

    class _Proxy(fx.Proxy):
        """fx's Proxy has no ``__iadd__``, so ``out += identity`` is recorded as ``out + identity``: a copy the
        model does not make (a fresh allocation per block, a tenth of a ResNet's forward here). Recorded as
        written, the traced model adds in place as the model does."""

        def __iadd__(self, other: Any) -> Any:
            return self.tracer.create_proxy("call_function", operator.iadd, (self, other), {})

    class _Tracer(fx.Tracer):
        def proxy(self, node: Any) -> Any:
            return _Proxy(node, self)

    return _Tracer


def _trace(module: Any) -> Any:
    """``module`` traced by torch.fx (raises on Python control flow over tensors), ``+=`` kept in place."""
    from torch import fx

    tracer = _tracer_class()()
    graph = tracer.trace(module)
    return fx.GraphModule(tracer.root, graph, module.__class__.__name__)


def _rewrite(gm: Any, prefix: str, prepared: Prepared) -> int:
    """Move the additions and activations of ``gm``'s graph into Op modules; return how many."""
    Op_ = _op_class()
    graph = gm.graph
    used: dict[str, int] = {}
    count = 0
    for node in list(graph.nodes):
        what = _wanted(node)
        if what is None:
            continue
        kind = "method" if node.op == "call_method" else "function"
        fname = function_name(node.target, kind)
        scope = ".".join(p for p in (prefix, _scope(node)) if p)
        base = f"{scope}.{fname}" if scope else fname
        used[base] = used.get(base, 0) + 1
        display = (base if used[base] == 1 else f"{base}_{used[base]}") + "()"
        op = Op_(node.target, kind, display, fname)
        attr = f"_varprop_op_{count}"
        gm.add_submodule(attr, op)
        with graph.inserting_after(node):
            new = graph.call_module(attr, node.args, node.kwargs)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        prepared.ops[op] = op
        if what == "add":
            a, b = new.args[0], new.args[1]
            anc_a, anc_b = _ancestors(a), _ancestors(b)
            own_a, own_b = _weighted(anc_a - anc_b, gm), _weighted(anc_b - anc_a, gm)
            skip = 0 if own_a < own_b else 1
            prepared.residuals[op] = Residual(display, "", "", skip, ambiguous=own_a == own_b)
        count += 1
    graph.lint()
    gm.recompile()
    return count


def _input_reader(graph: Any) -> str | None:
    """The target of the first module called on the graph's first input itself, if any."""
    placeholder = next((n for n in graph.nodes if n.op == "placeholder"), None)
    return next((n.target for n in graph.nodes if n.op == "call_module" and placeholder in n.all_input_nodes), None)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip().rstrip(":")


def prepare(model: Any, trace: bool = True) -> Prepared:
    """The model to run: traced and rewritten where fx can, else ``model`` itself
    with its traceable children rewritten in place (``model`` is varprop's own copy)."""
    prepared = Prepared(model, original=model)
    if trace:
        _prepare_module(model, "", None, prepared)
    for name, module in prepared.runner.named_modules():
        spec = known_block(module)
        if spec is not None:
            prepared.blocks.append((name, module, spec))
    return prepared


def _leaf(module: Any) -> bool:
    import torch

    mod = type(module).__module__
    return (mod.startswith("torch.nn") or mod.startswith("torch.ao.nn")) and not isinstance(
        module, (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict))


def _prepare_module(module: Any, name: str, parent: Any, prepared: Prepared) -> None:
    """Trace ``module``; on success put the rewritten copy in its place, else try its children."""
    if _leaf(module):
        return
    try:
        gm = _trace(module)
    except Exception as exc:  # fx raises many kinds; any of them means "does not trace"
        prepared.untraced.append((name, _reason(exc)))
        for child_name, child in list(module.named_children()):
            _prepare_module(child, f"{name}.{child_name}" if name else child_name, module, prepared)
        return
    if parent is None:
        prepared.input_reader = _input_reader(gm.graph)
    if _rewrite(gm, name, prepared) == 0:
        return  # nothing to measure that hooks do not already see: run the module as it is
    gm.train(module.training)
    prepared.traced.append(name)
    if parent is None:
        prepared.runner = gm
    else:
        setattr(parent, name.rsplit(".", 1)[-1], gm)


# --- leaf blocks whose additions fx cannot see ---------------------------------------------------------

@dataclass(frozen=True)
class BlockSpec:
    """The residual additions of a known block: per addition (skip, branch), each ``"input"`` (the block's
    first argument), ``"sum:k"`` (the k-th addition's result) or a submodule's name (its output)."""

    adds: tuple[tuple[str, str], ...]


def known_block(module: Any) -> BlockSpec | None:
    """The :class:`BlockSpec` of a block type varprop knows, else None."""
    import torch

    if isinstance(module, torch.nn.TransformerEncoderLayer):
        second = "sum:0" if module.norm_first else "norm1"
        return BlockSpec((("input", "dropout1"), (second, "dropout2")))
    cls = type(module)
    if cls.__module__ == "torchvision.models.resnet" and cls.__name__ in ("BasicBlock", "Bottleneck"):
        skip = "downsample" if getattr(module, "downsample", None) is not None else "input"
        return BlockSpec(((skip, "bn2" if cls.__name__ == "BasicBlock" else "bn3"),))
    return None


def module_names(spec: BlockSpec) -> set[str]:
    """The submodules whose outputs a block's additions need."""
    return {s for pair in spec.adds for s in pair if s != "input" and not s.startswith("sum:")}


"""Which modules a run measures, what activation each one is, and how its output is laid out
(sample and channel axes)."""

from __future__ import annotations

import fnmatch
from typing import Any, Iterator, Sequence

from ..nn import activations
from . import load_torch
from .graph import ACTIVATION_FUNCTIONS

INPUT = "(input)"  # the row of the model's input
ROOT = "(model)"  # the row of the model's own output


def torch_nn(module: Any) -> bool:
    return type(module).__module__.startswith("torch.nn.")


def activation_of(module: Any) -> activations.Activation | None:
    """varprop's Activation for a torch.nn activation module (or a traced functional one with its default
    arguments), else None."""
    if getattr(module, "fname", None) in ACTIVATION_FUNCTIONS:  # a traced F.relu(x) etc.
        return functional_activation(module.fname)
    if not torch_nn(module):
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
CHANNEL_FIRST = ("Conv", "BatchNorm", "InstanceNorm", "Pool", "Upsample", "PixelShuffle", "GroupNorm",
                  "LocalResponseNorm", "Dropout1d", "Dropout2d", "Dropout3d", "ReflectionPad", "ReplicationPad",
                  "ZeroPad", "ConstantPad", "CircularPad")


def _kind_in(module: Any, kinds: Sequence[str]) -> bool:
    """Whether ``module`` is one of torch's own of these kinds (a substring of its class name)."""
    return torch_nn(module) and any(k in type(module).__name__ for k in kinds)


def axes_of(module: Any, ndim: int, inherited: tuple[int, int] | None,
            outer: tuple[int, int] | None = None) -> tuple[int, int]:
    """(sample axis, channel axis) of a module's output of ``ndim`` dimensions: a 3-D output is [N, C, L]
    for the channel-first kinds, [T, N, C] for a module with ``batch_first=False``, else laid out as its
    input (``inherited``), else as the enclosing module says (``outer``, :func:`outer_layouts`), else
    [N, T, C]."""
    if ndim != 3 or _kind_in(module, CHANNEL_FIRST):
        return 0, 1
    if batch_first(module) is False:  # [T, N, C]: nn.MultiheadAttention, Transformer*, RNNs
        return 1, 2
    if inherited is not None:  # elementwise modules, norms over the last axis, ... keep their input's layout
        return inherited
    return outer if outer is not None else (0, 2)


def batch_first(module: Any) -> bool | None:
    """The module's ``batch_first``, if it states one: its own attribute, or for torch's transformer
    layers (which keep it on their attention only) their ``self_attn``'s."""
    own = getattr(module, "batch_first", None)
    if isinstance(own, bool):
        return own
    attention = getattr(module, "self_attn", None)
    own = getattr(attention, "batch_first", None) if torch_nn(module) else None
    return own if isinstance(own, bool) else None


# Module kinds that read their 3-D input's last axis as channels (its layout's other half is [N, T] or [T, N]).
CHANNEL_LAST = ("Linear", "LayerNorm", "RMSNorm")


def states_layout(module: Any, outer: tuple[int, int] | None) -> bool:
    """Whether ``module``'s kind, its ``batch_first`` or the torch module around it (``outer``) says how
    a 3-D input it reads is laid out (an elementwise module says nothing)."""
    return outer is not None or _kind_in(module, CHANNEL_FIRST + CHANNEL_LAST) or batch_first(module) is not None


def rnn_state(module: Any, path: str) -> bool:
    """Whether ``path`` in a torch RNN's output is its final state (h_n, and c_n for an LSTM): [layers x
    directions, N, H] whatever ``batch_first`` says of the sequence output."""
    return torch_nn(module) and type(module).__name__ in ("RNN", "LSTM", "GRU") and path.startswith("[1]")


def outer_layouts(root: Any) -> dict[int, tuple[int, int]]:
    """id(module) -> the 3-D layout that the nearest torch module enclosing it states with ``batch_first``:
    the Linear, LayerNorm and Dropout inside ``nn.TransformerEncoderLayer(batch_first=False)`` see
    [T, N, C], though none of them says so (modules under no such statement are left out)."""
    out: dict[int, tuple[int, int]] = {}

    def walk(module: Any, layout: tuple[int, int] | None) -> None:
        # torch's own modules only: a user's module stating batch_first may transpose inside it
        own = batch_first(module) if torch_nn(module) else None
        if own is not None:
            layout = (0, 2) if own else (1, 2)
        for child in module.children():
            if layout is not None:
                out[id(child)] = layout
            walk(child, layout)

    walk(root, None)
    return out


def input_axes(runner: Any, ndim: int, outer: dict[int, tuple[int, int]], reader: str | None = None,
               model: Any = None) -> tuple[tuple[int, int], bool]:
    """(sample axis, channel axis) of the model's input, and whether that is settled: as the model itself
    (``model``, as built, else ``runner``) states it (a channel-first kind, ``batch_first``), or as the module
    that reads it (``reader``, found on the traced graph); else, unsettled, as the first module declared
    (the pass then reads the module that receives the input: :meth:`Pass.relayout_input`)."""
    if ndim != 3:
        return (0, 1), True
    model = runner if model is None else model
    if states_layout(model, None):
        return axes_of(model, ndim, None), True
    if reader is not None:
        first = runner.get_submodule(reader)
        return axes_of(first, ndim, None, outer.get(id(first))), True
    first = next((m for n, m in runner.named_modules() if n and not list(m.children())), runner)
    return axes_of(first, ndim, None, outer.get(id(first))), False


def selected(name: str, type_name: str, patterns: Sequence[str] | None, types: Sequence[str] | None) -> bool:
    if patterns and not any(fnmatch.fnmatchcase(name, p) for p in patterns):
        return False
    if types and type_name not in types and type_name.removesuffix("()") not in types:
        return False
    return True


def tensors(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """The tensors of a module's output, with their place in it ("", "[0]", "['logits']", ...)."""
    torch = load_torch()
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, (tuple, list)):
        for i, item in enumerate(obj):
            yield from tensors(item, f"{path}[{i}]")
    elif isinstance(obj, dict):
        for key, item in obj.items():
            yield from tensors(item, f"{path}[{key!r}]")


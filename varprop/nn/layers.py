"""The typed layer sequence: what a network is made of, built once from its
spec and read by the Monte-Carlo stepper, the backward pass, the memory
plan and the theory alike.

A plain stack is a sequence of :class:`Layer` s, one per weight layer (one
row of ``layers.csv``): a :class:`Dense` product, then a :class:`BatchNorm`
and an :class:`Activation` in the order the network puts them. A new kind
of layer is a new frozen dataclass here, the stepper's and the theory's
step for it, and a branch in :func:`build`.

>>> from varprop.spec import NetworkSpec
>>> stack = build(NetworkSpec.square(3, 8, activation="relu", bn_layers=(1,), bn_position="post"))
>>> [type(p).__name__ for p in stack[0].parts]
['Dense', 'Activation', 'BatchNorm']
>>> stack[1].bn is None, stack[2].activation.name
(True, 'relu')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

from . import activations

if TYPE_CHECKING:
    from ..spec import NetworkSpec


@dataclass(frozen=True)
class Dense:
    """``z = h W + b``: a fan_in x fan_out product and the init's bias."""

    fan_in: int
    fan_out: int


@dataclass(frozen=True)
class Activation:
    """``h = phi(z)``; ``fn`` is the registry's function with its metadata."""

    name: str
    fn: activations.Activation = field(compare=False, repr=False)

    @property
    def linear(self) -> bool:
        return self.name == "linear"


@dataclass(frozen=True)
class BatchNorm:
    """Batch norm with batch statistics (gamma 1, beta 0) and epsilon ``eps``."""

    eps: float


@dataclass(frozen=True)
class Layer:
    """One weight layer: Dense, then BatchNorm before (``pre``) or after
    (``post``) the Activation, or no BatchNorm."""

    index: int
    dense: Dense
    activation: Activation
    bn: BatchNorm | None = None
    bn_position: str = "pre"

    @property
    def bn_pre(self) -> bool:
        """Batch norm on z, before the activation."""
        return self.bn is not None and self.bn_position == "pre"

    @property
    def bn_post(self) -> bool:
        """Batch norm on the activation's output."""
        return self.bn is not None and self.bn_position == "post"

    @property
    def parts(self) -> tuple[Dense | Activation | BatchNorm, ...]:
        """The parts in the order the values pass through them."""
        if self.bn is None:
            return (self.dense, self.activation)
        if self.bn_pre:
            return (self.dense, self.bn, self.activation)
        return (self.dense, self.activation, self.bn)


Kind = Union[Layer]


def build(net: NetworkSpec) -> tuple[Kind, ...]:
    """The layer sequence of ``net``: entry ``l - 1`` is weight layer ``l``."""
    fns: dict[str, activations.Activation] = {}
    bn_layers = set(net.bn_layers)
    bn = BatchNorm(net.bn_eps)
    out: list[Kind] = []
    for layer in range(1, net.depth + 1):
        name = net.activation_at(layer)
        if name not in fns:
            fns[name] = activations.get(name, net.leaky_slope)
        out.append(Layer(layer, Dense(net.widths[layer - 1], net.widths[layer]), Activation(name, fns[name]),
                         bn if layer in bn_layers else None, net.bn_position))
    return tuple(out)


__all__ = ["Activation", "BatchNorm", "Dense", "Kind", "Layer", "build"]

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

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

from . import activations

if TYPE_CHECKING:
    from ..spec import NetworkSpec


@dataclass(frozen=True)
class Dense:
    """``z = h W + b``: a fan_in x fan_out product and the init's bias.

    ``factor`` multiplies the init's weights (Fixup's depth scaling; 0 for a
    zero-initialised layer); ``standardized`` replaces them by scaled weight
    standardisation (NF-ResNets): each unit's incoming weights centred and
    scaled to unit norm, ``W_ij = (w_ij - mean_i w) / ||w_. - mean||``, so
    ``Var z = Var h`` whatever the init's scale.
    """

    fan_in: int
    fan_out: int
    factor: float = 1.0
    standardized: bool = False


@dataclass(frozen=True)
class Activation:
    """``h = gain * phi(z)``; ``fn`` is the registry's function with its
    metadata; ``gain`` is NF-ResNets' gamma (1 elsewhere)."""

    name: str
    fn: activations.Activation = field(compare=False, repr=False)
    gain: float = 1.0

    @property
    def linear(self) -> bool:
        return self.name == "linear"

    @property
    def log_gain(self) -> float:
        return math.log(self.gain)


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


@dataclass(frozen=True)
class Lead:
    """The pre-activation order's start of a branch: [BatchNorm ->] Activation
    on the block's input, before the branch's first dense layer."""

    bn: BatchNorm | None
    activation: Activation


@dataclass(frozen=True)
class Residual:
    """One residual block (one row of ``layers.csv``):
    ``x_l = x_(l-1) + alpha f(x_(l-1) / beta)``, the branch f being ``lead``
    (pre-activation order) then ``branch``, dense layers whose ``index`` is
    their place among all the network's dense layers (their seed)."""

    index: int
    width: int
    alpha: float
    beta: float
    lead: Lead | None
    branch: tuple[Layer, ...]
    projection: Layer | None = None  # a dense layer on the skip where the width changes (a stage's first block)

    @property
    def width_in(self) -> int:
        """The block's input width (the branch's first fan_in)."""
        return self.branch[0].dense.fan_in

    @property
    def projects_lead(self) -> bool:
        """Whether the projection reads the lead's output, as the branch does (the pre-activation order:
        He et al. 2016's projection after the first BN-ReLU, NF-ResNets' after the scaled activation), rather
        than the block's input."""
        return self.projection is not None and self.lead is not None

    @property
    def zero_branch(self) -> bool:
        """Whether f is exactly 0 at init (a zero-initialised last layer, Fixup's)."""
        return self.branch[-1].dense.factor == 0


Kind = Union[Layer, Residual]


def dense_layers(stack: tuple[Kind, ...]) -> tuple[Layer, ...]:
    """Every dense layer of ``stack`` in order: entry ``d - 1`` has index ``d``."""
    out: list[Layer] = []
    for kind in stack:
        if isinstance(kind, Residual):
            out.extend(kind.branch + ((kind.projection,) if kind.projection is not None else ()))
        else:
            out.append(kind)
    return tuple(out)


def build(net: NetworkSpec) -> tuple[Kind, ...]:
    """The layer sequence of ``net``: entry ``l - 1`` is weight layer ``l``
    (residual block ``l`` for a residual stack: :func:`residual_blocks`)."""
    if net.residual is not None:
        return residual_blocks(net)
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


def residual_blocks(net: NetworkSpec) -> tuple[Residual, ...]:
    """The blocks of a residual stack, scheme by scheme.

    - plain: identity skip, the branch scaled by alpha (1: the variance
      doubles per block with a variance-preserving branch; 1/sqrt(L): the
      depth-scaled branch of Stable ResNet, Hayou et al. 2021, and depth-muP,
      Yang et al. 2023);
    - bn-end: batch norm ends each branch (De & Smith 2020, arXiv
      2002.10444): Var f = 1, so q_l = 1 + l alpha^2;
    - skipinit: alpha = 0 at init (SkipInit, De & Smith 2020; ReZero,
      Bachlechner et al. 2020, arXiv 2003.04887): the identity;
    - fixup: the last dense layer of each branch zero, the others' weights
      times L^(-1/(2m-2)) for m layers per branch (Zhang et al. 2019, arXiv
      1901.09321; its scalar biases start at 0 and its multiplier at 1, so
      they change nothing at init);
    - nf: ``x_l = x_(l-1) + alpha f(x_(l-1) / beta_l)`` with beta_l the
      square root of the expected variance 1 + sum_(i<l) alpha_i^2, reset
      to 1 + alpha^2 after a transition block (where the width changes: its
      skip projects gamma phi(x / beta)), scaled weight standardisation,
      and the activation times gamma = 1 / sqrt(Var phi(z)), z ~ N(0, 1),
      computed by quadrature (Brock et al. 2021, arXiv 2101.08692).

    Branch order: preact ([BN ->] act -> dense, ..., dense: He et al. 2016,
    arXiv 1603.05027) or original (dense -> [BN ->] act, ..., dense [-> BN]:
    He et al. 2015 without the ReLU after the addition, so that every block
    is x + alpha f(x)).

    Where ``widths`` change, a block's skip is a projection shortcut: a dense
    layer (drawn as the branch's; batch norm after it where the branch
    ends in one, He et al. 2015's option B) on the lead's output in the
    pre-activation order (He et al. 2016; NF-ResNets' transition blocks),
    else on the block's input.
    """
    r, blocks = net.residual, net.depth
    assert r is not None
    m = r.branch_depth
    fn = activations.get(net.activation, net.leaky_slope)
    gamma = 1.0
    if r.scheme == "nf" and net.activation != "linear":
        from ..theory.gain import gains  # quadrature: the exact variance gain

        gamma = gains(fn)["variance_gain"]
    act = Activation(net.activation, fn, gamma)
    linear = Activation("linear", activations.get("linear"))
    bn = BatchNorm(net.bn_eps) if r.bn else None
    end_bn = BatchNorm(net.bn_eps) if r.scheme == "bn-end" or (r.bn and r.order == "original") else None
    inner = blocks ** (-1 / (2 * m - 2)) if r.scheme == "fixup" and m > 1 else 1.0
    ws = r.scheme == "nf"
    out: list[Residual] = []
    expected_var = 1.0
    first = 0  # dense layers before this block's (their seeds are their places)
    for block in range(1, blocks + 1):
        alpha = r.alpha_at(block, blocks)
        n_in, n = net.widths[block - 1], net.widths[block]
        fans = [(n_in, n)] + [(n, n)] * (m - 1)
        branch = [Layer(first + j, Dense(*fans[j - 1], inner, ws), act, bn, "pre") for j in range(1, m)]
        last = Dense(*fans[m - 1], 0.0 if r.scheme == "fixup" else 1.0, ws)
        branch.append(Layer(first + m, last, linear, end_bn, "post"))
        first += m
        projection = None
        if n_in != n and r.projection:  # a stage's first block: a dense layer on the skip (ResNet's 1x1 conv)
            first += 1
            projection = Layer(first, Dense(n_in, n, 1.0, ws), linear, end_bn, "post")
        lead = Lead(bn, act) if r.order == "preact" else None
        beta = math.sqrt(expected_var) if r.scheme == "nf" else 1.0
        out.append(Residual(block, n, alpha, beta, lead, tuple(branch), projection))
        # NF-ResNets' transition block: its skip is the projected gamma phi(x / beta), of variance 1, so the
        # expected variance starts again from 1
        expected_var = (1.0 if out[-1].projects_lead else expected_var) + alpha * alpha
    return tuple(out)


__all__ = ["Activation", "BatchNorm", "Dense", "Kind", "Layer", "Lead", "Residual", "build", "dense_layers",
           "residual_blocks"]

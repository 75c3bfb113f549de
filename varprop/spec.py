"""Run specifications: the network, what goes through it, and the
configurations of a comparison.

Every value passes through the parsers of the option table (options.py),
whichever way it came (CLI, TOML, Python), so a bad value gets the same
one-line error. Options are flat (the CLI's names with underscores);
:func:`expand` turns lists of values into one :class:`Config` per combination.

>>> spec = from_options({"layers": 3, "width": 8, "init": "he", "activation": "relu"})
>>> spec.network.widths, spec.network.init.scheme
((8, 8, 8, 8), 'he')
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from .errors import SpecError
from .montecarlo import memory
from .nn import inits
from .options import (default, parse, parse_activation, parse_init, parse_int_list, parse_one, parse_pos_int,
                      parse_widths)

RESIDUAL_OPTIONS = ("alpha", "blocks", "branch_depth", "branch_order", "projection")
# Each scheme's alpha when --alpha is not given: NF-ResNets use 0.2 (Brock et al. 2021, section 4).
DEFAULT_ALPHA = {"plain": 1.0, "bn-end": 1.0, "skipinit": 0.0, "fixup": 1.0, "nf": 0.2}


@dataclass(frozen=True)
class InitSpec:
    """How weights are drawn: a scheme (preset name, ``module:function`` or a
    callable ``(rng, fan_in, fan_out) -> array``) and its overrides."""

    scheme: Any = default("init")
    distribution: str | None = None
    mode: str | None = None
    gain: float | None = None
    scale: float = default("scale")

    def __post_init__(self) -> None:
        # A framework's name is kept as its canonical preset and distribution
        # (InitSpec("kaiming_uniform") == InitSpec("he", "uniform")), so
        # config.json and the reproduce-command carry one spelling.
        for name in ("distribution", "mode", "gain"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, parse_one(name, value))
        object.__setattr__(self, "scale", parse_one("scale", self.scale))
        scheme = parse_init(self.scheme)
        if isinstance(scheme, str) and ":" not in scheme:
            try:
                scheme, distribution = inits.canonical(self.scheme, self.distribution)
            except ValueError as exc:
                raise SpecError("distribution", str(exc)) from None
            object.__setattr__(self, "distribution", distribution)
        object.__setattr__(self, "scheme", scheme)

    def resolve(self) -> inits.Scheme:
        return inits.resolve(self.scheme, self.distribution, self.mode, self.gain, self.scale)


@dataclass(frozen=True)
class ResidualSpec:
    """A residual stack's blocks ``x_l = x_(l-1) + alpha_l f(x_(l-1))``:
    the scheme (varprop.nn.layers.build says what each one builds), the
    branch scale ``alpha`` (a number, or ``1/sqrt(L)``, ``1/sqrt(l)``), the
    dense layers per branch, their order, and batch norm inside the branch.

    >>> ResidualSpec("nf").alpha, ResidualSpec("plain", "1/sqrt(L)").alpha_at(block=3, blocks=100)
    (0.2, 0.1)
    """

    scheme: str = "plain"
    alpha: float | str | None = None
    branch_depth: int = default("branch_depth")
    order: str = default("branch_order")
    bn: bool = False
    projection: bool = False  # a projection shortcut where the width changes

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheme", parse_one("residual", self.scheme))
        object.__setattr__(self, "branch_depth", parse_one("branch_depth", self.branch_depth))
        object.__setattr__(self, "order", parse_one("branch_order", self.order))
        if self.alpha is None:
            object.__setattr__(self, "alpha", DEFAULT_ALPHA[self.scheme])
        else:
            object.__setattr__(self, "alpha", parse_one("alpha", self.alpha))
            if self.scheme == "skipinit" and self.alpha != 0:
                raise SpecError("alpha", f"skipinit sets alpha = 0 at init, got {self.alpha}; use --residual plain "
                                "for another alpha")
        if self.scheme == "nf" and self.order != "preact":
            raise SpecError("branch_order", "NF-ResNets' branches are pre-activation (act -> dense); drop "
                            "--branch-order original")
        if self.bn and self.scheme in ("fixup", "nf"):
            raise SpecError("bn", f"--residual {self.scheme} is a network without normalization; drop --bn")

    def alpha_at(self, block: int, blocks: int) -> float:
        """alpha of block ``block`` (1-based) of ``blocks``."""
        if self.alpha == "1/sqrt(L)":
            return 1 / math.sqrt(blocks)
        if self.alpha == "1/sqrt(l)":
            return 1 / math.sqrt(block)
        return float(self.alpha)  # type: ignore[arg-type]


@dataclass(frozen=True)
class NetworkSpec:
    """A fully connected stack: ``widths = (n_0, n_1, ..., n_L)``.

    >>> NetworkSpec.square(layers=2, width=5, activation="tanh").widths
    (5, 5, 5)
    """

    widths: tuple[int, ...]
    activation: str = default("activation")
    output_activation: str | None = None
    leaky_slope: float = default("leaky_slope")
    init: InitSpec = field(default_factory=InitSpec)
    bias_std: float | None = None
    bn_layers: tuple[int, ...] = ()
    bn_position: str = default("bn_position")
    bn_eps: float = default("bn_eps")
    residual: ResidualSpec | None = None  # a residual stack: one weight layer of widths per block

    def __post_init__(self) -> None:
        if not isinstance(self.init, InitSpec):
            object.__setattr__(self, "init", InitSpec(self.init))
        object.__setattr__(self, "widths", parse_widths(self.widths))
        bn = tuple(sorted(set(parse_int_list(self.bn_layers, "bn_layers")))) if self.bn_layers else ()
        if bn and not 1 <= bn[0] <= bn[-1] <= self.depth - 1:
            raise SpecError("bn_layers", f"batch norm goes on hidden layers 1..{self.depth - 1}, got {bn}")
        object.__setattr__(self, "bn_layers", bn)
        object.__setattr__(self, "bn_position", parse_one("bn_position", self.bn_position))
        object.__setattr__(self, "bn_eps", parse_one("bn_eps", self.bn_eps))
        for name in ("activation", "output_activation"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, parse_activation(value, name))
        try:
            self.init.resolve()
        except ValueError as exc:
            raise SpecError("init", str(exc)) from None
        if self.residual is not None:
            if len(set(self.widths)) == 1 and self.residual.projection:
                raise SpecError("projection", "does nothing when every width is the same; give --widths that change "
                                "(such as 64,64,128,128)")
            if len(set(self.widths)) > 1 and not self.residual.projection:
                widths = ",".join(map(str, self.widths))
                raise SpecError("widths", "a residual block adds its input to its branch's output, so widths must "
                                f"be equal unless --projection puts a projection shortcut where they change; got "
                                f"{widths}")
            if self.output_activation is not None:
                raise SpecError("output_activation", "does not apply to a residual stack (every branch ends alike)")
            if self.bn_layers:
                raise SpecError("bn_layers", "a residual stack takes --bn all (batch norm in every branch layer)")

    @classmethod
    def square(cls, layers: int, width: int, **kw: Any) -> "NetworkSpec":
        """``layers`` weight layers of ``width`` units, fed ``width`` inputs."""
        layers, width = parse_pos_int(layers, "layers"), parse_pos_int(width, "width")
        memory.precheck(layers, width, 1, 1, None, "layers", "use fewer --layers or a narrower --width")
        return cls(widths=(width,) * (layers + 1), **kw)

    @property
    def depth(self) -> int:
        return len(self.widths) - 1

    def activation_at(self, layer: int) -> str:
        """The activation of weight layer ``layer`` (1-based)."""
        if layer == self.depth and self.output_activation is not None:
            return self.output_activation
        return self.activation


@dataclass(frozen=True)
class RunSpec:
    """A network plus what goes through it: inputs, replicates, seed, dtype."""

    network: NetworkSpec
    samples: int | None = None  # None: 500, or the rows of input_file
    input: str = default("input")
    input_std: float = default("input_std")
    input_file: str | None = None
    replicates: int = default("replicates")
    seed: int = default("seed")
    dtype: str = default("dtype")
    batch_size: int | None = None  # None: one batch of all samples
    backward: bool = default("backward")
    max_memory: int | None = None  # bytes; None: half the memory available now

    def __post_init__(self) -> None:
        for name in ("samples", "input", "input_std", "input_file", "replicates", "seed", "dtype", "batch_size",
                     "backward", "max_memory"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, parse_one(name, value))
        if self.input_file is not None:
            rows = load_input(self.input_file, self.network.widths[0]).shape[0]
            if self.samples is not None and self.samples != rows:
                raise SpecError("samples", f"{self.samples} differs from the {rows} rows of --input-file")
            object.__setattr__(self, "samples", rows)
        elif self.samples is None:
            object.__setattr__(self, "samples", DEFAULT_SAMPLES)
        if self.batch_size is not None and self.samples % self.batch_size:
            raise SpecError("batch_size", f"{self.batch_size} does not divide --samples {self.samples} "
                            "(the samples form samples/batch-size independent batches)")

    @property
    def batch(self) -> int:
        """Samples per batch-norm batch."""
        return self.batch_size or self.samples


DEFAULT_SAMPLES = 500


def load_input(path: str, width: int) -> np.ndarray:
    """The N x n_0 array of an ``--input-file`` (.npy), checked for shape, NaN
    and all-zero rows (read once per file version, read-only)."""
    stat = os.stat(path)
    return _load_input(os.path.abspath(path), width, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _load_input(path: str, width: int, mtime_ns: int, size: int) -> np.ndarray:
    try:
        x = np.load(path, allow_pickle=False, mmap_mode="r")  # the header first: no copy of a huge file yet
    except Exception as exc:  # unreadable or not .npy: one line for the user
        raise SpecError("input_file", f"cannot read {path} as a .npy array ({exc})") from None
    if not isinstance(x, np.ndarray):  # an .npz archive
        x.close()
        raise SpecError("input_file", f"{path} is an .npz archive; save the N x {width} array alone with "
                        "numpy.save (.npy)")
    if x.ndim != 2 or x.shape[0] < 1:
        raise SpecError("input_file", f"{path} holds an array of shape {x.shape}; expected N x {width}")
    if x.shape[1] != width:
        raise SpecError("input_file", f"{path} has {x.shape[1]} columns but the network's input width is {width}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise SpecError("input_file", f"{path} holds {x.dtype} values; expected real numbers (integers or floats"
                        + (": a complex array would lose its imaginary part)" if np.iscomplexobj(x) else ")"))
    x = np.array(x)
    if not np.isfinite(x).all():
        raise SpecError("input_file", f"{path} contains NaN or inf")
    x = x.astype(np.float64)
    if not np.any(x):
        raise SpecError("input_file", f"{path} is all zeros: no signal to propagate")
    x.setflags(write=False)
    return x


def from_options(options: Mapping[str, Any]) -> RunSpec:
    """One RunSpec from flat scalar options; missing ones take their defaults."""
    o = parse(options)
    if "widths" in o and ("layers" in o or "width" in o):
        raise SpecError("widths", "cannot be combined with --layers or --width")
    get = lambda k: o.get(k, default(k))  # noqa: E731
    residual = _residual(o)
    rows = "blocks" if residual else "layers"
    if "widths" not in o:  # before a tuple of --layers entries is built
        per_row = residual.branch_depth if residual else 1
        memory.precheck(get(rows) * per_row, get("width"), get("samples") or 1, get("replicates"), get("max_memory"))
    widths = o.get("widths") or (get("width"),) * (get(rows) + 1)
    init = InitSpec(get("init"), get("distribution"), get("mode"), get("gain"), get("scale"))
    net = NetworkSpec(widths, get("activation"), get("output_activation"), get("leaky_slope"), init, get("bias_std"),
                      () if residual else _bn_layers(o, len(widths) - 1), get("bn_position"), get("bn_eps"), residual)
    return RunSpec(net, get("samples"), get("input"), get("input_std"), get("input_file"),
                   get("replicates"), get("seed"), get("dtype"), get("batch_size"), get("backward"),
                   get("max_memory"))


def _residual(o: Mapping[str, Any]) -> ResidualSpec | None:
    """The residual stack the options ask for, refusing plain-stack options that would not apply."""
    if "residual" not in o:
        for key in RESIDUAL_OPTIONS:
            if key in o:
                raise SpecError(key, "applies only with --residual")
        return None
    for key in ("layers", "bn_layers", "bn_count", "bn_position"):
        if key in o:
            fix = {"layers": "give --blocks", "bn_position": "--branch-order places it"}.get(key, "use --bn all")
            raise SpecError(key, f"does not apply to a residual stack ({fix})")
    if "blocks" in o and "widths" in o:
        raise SpecError("blocks", "cannot be combined with --widths (one block per width after the first)")
    return ResidualSpec(o["residual"], o.get("alpha"), o.get("branch_depth", default("branch_depth")),
                        o.get("branch_order", default("branch_order")), o.get("bn") == "all",
                        bool(o.get("projection", False)))


def _bn_layers(o: Mapping[str, Any], depth: int) -> tuple[int, ...]:
    given = [k for k in ("bn", "bn_layers", "bn_count") if k in o]
    if len(given) > 1:
        raise SpecError(given[1], "give only one of --bn, --bn-layers, --bn-count")
    if "bn_count" in o:
        if o["bn_count"] > depth - 1:
            raise SpecError("bn_count", f"{o['bn_count']} exceeds the {depth - 1} hidden layers")
        return tuple(range(1, o["bn_count"] + 1))
    if o.get("bn") == "all":
        return tuple(range(1, depth))
    return o.get("bn_layers", ())


def to_options(spec: RunSpec) -> dict[str, Any]:
    """The flat options that rebuild ``spec`` (a callable init stays a callable)."""
    n, i = spec.network, spec.network.init
    scheme = i.scheme
    out = {
        "widths": list(n.widths), "activation": n.activation, "output_activation": n.output_activation,
        "leaky_slope": n.leaky_slope, "init": scheme, "distribution": i.distribution, "mode": i.mode,
        "gain": i.gain, "scale": i.scale, "bias_std": n.bias_std,
        "samples": None if spec.input_file else spec.samples,
        "input": spec.input, "input_std": spec.input_std, "input_file": spec.input_file,
        "replicates": spec.replicates, "seed": spec.seed, "dtype": spec.dtype,
        "bn_layers": ",".join(map(str, n.bn_layers)) or None,
        "bn_position": n.bn_position if n.bn_layers else None, "bn_eps": n.bn_eps if n.bn_layers else None,
        "batch_size": spec.batch_size, "backward": spec.backward or None, "max_memory": spec.max_memory,
    }
    if n.residual is not None:
        r = n.residual
        out.update({"residual": r.scheme, "alpha": r.alpha, "branch_depth": r.branch_depth,
                    "branch_order": r.order, "bn": "all" if r.bn else None, "projection": r.projection or None,
                    "bn_eps": n.bn_eps if r.bn or r.scheme == "bn-end" else None})
    if "leaky_relu" not in (n.activation, n.output_activation):
        del out["leaky_slope"]
    if spec.input_file is not None:
        del out["input"], out["input_std"]
    return {k: v for k, v in out.items() if v is not None}


@dataclass(frozen=True)
class Config:
    """One configuration of a comparison: its label, varied values and spec."""

    label: str
    varied: dict[str, Any]
    spec: RunSpec


def label_part(key: str, value: Any) -> str:
    """How an option's value reads in a configuration's label (``gain=0.7``; a bare name for init and activation)."""
    if key in ("init", "activation", "distribution", "mode", "input", "dtype"):
        return str(value if isinstance(value, str) else getattr(value, "__name__", value))
    if key in ("widths", "bn_layers"):
        return f"{key}={','.join(map(str, value))}"
    if key == "bn":
        return f"bn={value}"
    return f"{key}={number_label(value)}" if isinstance(value, float) else f"{key}={value}"


def number_label(x: float) -> str:
    """A float as a label shows it: ``%g`` (0.7, 1e-05) when that reads back as ``x``, else the shortest
    repr that does, so two values never share a label.

    >>> number_label(0.1), number_label(0.1000001), number_label(1e-5)
    ('0.1', '0.1000001', '1e-05')
    """
    short = f"{x:g}"
    return short if float(short) == x else repr(x)


def _values(o: Mapping[str, Any], key: str) -> list[Any]:
    v = o.get(key, default(key))
    return v if isinstance(v, list) else [v]


def _check_relevance(o: Mapping[str, Any]) -> None:
    """Refuse options that would silently do nothing in every configuration."""
    if "input_file" in o:
        for key in ("input", "input_std"):
            if key in o:
                raise SpecError(key, "does not apply with --input-file (the file is the input)")
    acts = set(_values(o, "activation")) | set(_values(o, "output_activation"))
    if "leaky_slope" in o and "leaky_relu" not in acts:
        raise SpecError("leaky_slope", "applies only to --activation leaky_relu")
    has_bn = any(k in o and (k != "bn" or "all" in _values(o, "bn")) and (k != "bn_count" or any(
        _values(o, "bn_count"))) for k in ("bn", "bn_layers", "bn_count"))
    if "residual" in o and "bn-end" in _values(o, "residual"):
        has_bn = True
    for key in ("batch_size", "bn_position", "bn_eps"):
        if key in o and not has_bn:
            raise SpecError(key, "applies only with batch norm (--bn, --bn-layers or --bn-count)")


def shared_samples(batch_sizes: Iterable[int]) -> int:
    """The samples configurations that differ in batch size share when none
    is given: the smallest multiple of every batch size that is at least 500.

    >>> shared_samples([64, 100])
    1600
    """
    lcm = math.lcm(*batch_sizes)
    return lcm * math.ceil(DEFAULT_SAMPLES / lcm)


def expand(options: Mapping[str, Any]) -> list[Config]:
    """Every combination of the options given as lists, in the order given.

    >>> [c.label for c in expand({"init": ["unit", "fan_in"], "layers": 2})]
    ['unit', 'fan_in']
    """
    o = parse(options)
    if "batch_size" in o and "samples" not in o and "input_file" not in o:
        o["samples"] = shared_samples(o["batch_size"] if isinstance(o["batch_size"], list) else [o["batch_size"]])
    _check_relevance(o)
    varied = {k: v for k, v in o.items() if isinstance(v, list) and len(v) > 1}
    fixed = {k: (v[0] if isinstance(v, list) else v) for k, v in o.items() if k not in varied}
    configs = []
    for combo in itertools.product(*varied.values()):
        values = dict(zip(varied, combo))
        spec = from_options({**fixed, **values})
        if values:
            label = ", ".join(label_part(k, v) for k, v in values.items())
        else:
            label = f"{label_part('init', spec.network.init.scheme)} {spec.network.activation}"
        configs.append(Config(label, values, spec))
    return configs


__all__ = ["InitSpec", "NetworkSpec", "ResidualSpec", "RunSpec", "Config", "from_options", "to_options", "expand",
           "load_input", "label_part", "shared_samples", "DEFAULT_SAMPLES"]

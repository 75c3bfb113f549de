"""A finished simulate run: what every report and figure is made from.

A :class:`Run` holds the per-layer table, the histograms, the
configurations (each with its label, the options it varies, by name, and
all its resolved options) and the run's metadata. The engine makes one
(:func:`varprop.montecarlo.run.run_configs`); :meth:`Run.save` writes its
data files (config.json, layers.csv, histograms.csv) and :meth:`Run.load`
reads them back, checked, for ``varprop report``.

>>> from varprop.spec import expand
>>> from varprop.montecarlo.run import run_configs
>>> run = run_configs(expand({"layers": 2, "width": 8, "samples": 8, "init": ["he", "xavier"]}))
>>> run.labels, run.varied, run.replicates
(['he', 'xavier'], ['init'], 1)
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from . import __version__
from .errors import SpecError
from .stats import summarize

DATA_FILES = ("config.json", "layers.csv", "histograms.csv")  # a run's data; reports read, never write them


@dataclass(frozen=True)
class Configuration:
    """One configuration of a run as config.json records it."""

    label: str
    varied: dict[str, Any]  # the options this configuration varies, by name, in the order given
    options: dict[str, Any]  # every resolved option (spec.to_options)


def json_default(value: Any) -> Any:
    """JSON for callables (module:name), numpy scalars and anything else (str)."""
    if callable(value):
        return f"{value.__module__}:{value.__qualname__}"
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def versions() -> dict[str, str]:
    """The versions a run records."""
    return {"varprop": __version__, "numpy": np.__version__, "pandas": pd.__version__,
            "python": platform.python_version()}


@dataclass
class Run:
    """The per-layer table of a run and everything needed to read it."""

    layers: pd.DataFrame
    configs: list[Configuration]
    histograms: pd.DataFrame | None = None
    seed: int | None = None
    title: str | None = None
    command: str | None = None
    elapsed_s: float | None = None
    versions: dict[str, str] = field(default_factory=versions)

    @cached_property
    def summary(self) -> pd.DataFrame:
        """Per (configuration, layer): means, standard errors and intervals over replicates (:func:`summarize`)."""
        return summarize(self.layers)

    @property
    def labels(self) -> list[str]:
        return [c.label for c in self.configs]

    @property
    def varied(self) -> list[str]:
        """The options the configurations vary, by name, in the order given."""
        return list(dict.fromkeys(k for c in self.configs for k in c.varied))

    @property
    def replicates(self) -> int:
        return int(self.layers["replicate"].nunique())

    @property
    def meta(self) -> dict[str, Any]:
        """What config.json holds."""
        return {"title": self.title, "command": self.command, "seed": self.seed, "elapsed_s": self.elapsed_s,
                "versions": self.versions,
                "configs": [{"label": c.label, "varied": c.varied, "options": c.options} for c in self.configs]}

    def save(self, directory: str | Path) -> None:
        """Write the run's data files into ``directory``."""
        directory = Path(directory)
        (directory / "config.json").write_text(json.dumps(self.meta, indent=2, default=json_default) + "\n")
        self.layers.to_csv(directory / "layers.csv", index=False)
        if self.histograms is not None:
            self.histograms.to_csv(directory / "histograms.csv", index=False)

    @classmethod
    def load(cls, directory: str | Path, shown: str | None = None) -> "Run":
        """A saved run, checked before anything is drawn from it: every
        problem is a SpecError naming the file (``shown`` is how the user
        named the directory)."""
        from .outdir import show

        path = Path(directory)

        def fail(message: str) -> SpecError:
            return SpecError("RUN_DIR", message)

        for name in ("config.json", "layers.csv"):
            if not os.path.lexists(path / name):
                raise fail(f"{show(shown or path)} holds no {name}: not the directory of a varprop run")
            if (path / name).exists() and not ((path / name).is_file() or (path / name).is_dir()):
                raise fail(f"{show(path / name)} is not a regular file")  # a FIFO would block the read forever
        config = path / "config.json"
        try:
            meta = json.loads(config.read_text(encoding="utf-8"))
        except OSError as exc:
            raise fail(f"cannot read {show(config)} ({exc.strerror})") from None
        except ValueError as exc:
            raise fail(f"{show(config)} is not valid JSON ({exc})") from None
        configs = meta.get("configs") if isinstance(meta, dict) else None
        if not (isinstance(configs, list) and configs and all(
                isinstance(c, dict) and isinstance(c.get("label"), str) and isinstance(c.get("varied"), dict)
                and isinstance(c.get("options"), dict) for c in configs)):
            raise fail(f"{show(config)} has no list of configurations (each with a label, varied and options) "
                       "under 'configs'; it was not written by varprop simulate, or was edited")
        if not isinstance(meta.get("versions"), dict):
            raise fail(f"{show(config)} has no 'versions'; it was not written by varprop simulate, or was edited")
        layers = _read_table(path / "layers.csv", fail, ("config", "replicate", "layer", "post_log10_std"))
        labels = [c["label"] for c in configs]
        found = list(dict.fromkeys(layers["config"].astype(str)))
        if set(found) != set(labels):
            odd = next(iter([f for f in found if f not in labels] + [f for f in labels if f not in found]))
            raise fail(f"{show(path / 'layers.csv')} and {show(config)} disagree on the configurations ({odd!r} is "
                       "in one only)")
        _check_complete(layers, path / "layers.csv", configs, fail)
        histograms = None
        if (path / "histograms.csv").is_file():
            histograms = _read_table(path / "histograms.csv", fail, ("config", "layer", "bin_lo", "bin_hi", "density"))
        return cls(layers, [Configuration(c["label"], c["varied"], c["options"]) for c in configs], histograms,
                   meta.get("seed"), meta.get("title"), meta.get("command"), meta.get("elapsed_s"), meta["versions"])


def ends_mid_row(csv: Path) -> bool:
    """Whether a table varprop wrote (every row ends with a newline) was cut short: a full disk or an
    interrupted copy leaves a last row that pandas would read, padded with NaN."""
    with open(csv, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        if fh.tell() == 0:
            return False
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) != b"\n"


def _check_complete(layers: pd.DataFrame, csv: Path, configs: Sequence[dict[str, Any]], fail: Any) -> None:
    """A run's table holds every layer 0..L of every replicate 0..R-1 of each
    configuration (L and R as config.json gives them), once, and ends with a
    whole line: a file cut short (a full disk, an interrupted copy) or missing
    rows would otherwise draw a report of other numbers than the run's."""
    from .outdir import show

    redo = "; rerun the command in config.json"
    if ends_mid_row(csv):
        raise fail(f"{show(csv)} ends in the middle of a row: it was cut short{redo}")
    rows = layers.groupby(layers["config"].astype(str), sort=False)
    for c in configs:
        o = c["options"]
        widths, replicates = o.get("widths"), o.get("replicates")
        if not (isinstance(widths, list) and isinstance(replicates, int)):
            continue  # not simulate's options: the label check above is all there is
        expected = pd.MultiIndex.from_product([range(replicates), range(len(widths))])
        got = rows.get_group(c["label"])
        found = pd.MultiIndex.from_frame(got[["replicate", "layer"]])
        if len(found) != len(expected) or not found.sort_values().equals(expected):
            reps = f"{replicates} replicate{'s' if replicates > 1 else ''}"
            raise fail(f"{show(csv)} lacks rows or repeats them: configuration {c['label']!r} has {len(found)} rows "
                       f"where its {reps} of layers 0..{len(widths) - 1} make {len(expected)}{redo}")


def _read_table(csv: Path, fail: Any, columns: Sequence[str]) -> pd.DataFrame:
    from .outdir import show

    try:
        table = pd.read_csv(csv, low_memory=False)  # one dtype a column, however long the file
    except OSError as exc:
        raise fail(f"cannot read {show(csv)} ({exc.strerror})") from None
    except (ValueError, pd.errors.ParserError) as exc:  # EmptyDataError is a ValueError
        raise fail(f"{show(csv)} is not a varprop table ({str(exc).splitlines()[0]})") from None
    missing = [c for c in columns if c not in table]
    if missing:
        raise fail(f"{show(csv)} lacks the column {missing[0]!r}; it was not written by varprop simulate, or was "
                   "edited")
    if table.empty:
        raise fail(f"{show(csv)} holds a header and no rows")
    return table

"""Everything a run writes: config.json, layers.csv, report.md and figures.

Written into a staging directory that replaces the target only when complete
(:func:`varprop.outdir.staging`), so an interrupted or failed run leaves no
half-written output directory and never a file varprop did not write touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from .. import __version__
from ..outdir import owned_files, staging
from ..run import DATA_FILES, Run, json_default
from ..spec import Config, to_options
from ..stats import summarize
from . import document
from .document import Document
from .markdown import build_document, fit_document, fmt_pow10, shown_layers, terminal_table

__all__ = ["staging", "write", "render", "rerender_into", "redraw_into", "write_fit", "write_phase", "run_name",
           "dir_name", "terminal_table", "fmt_pow10", "summarize", "FORMATS"]


def run_name(configs: Sequence[Config]) -> str:
    """A descriptive directory name, e.g. ``linear-unit-vs-fan_in-L100-w100-N500-seed0``."""
    def values(key: str, get: Any) -> str:
        seen = list(dict.fromkeys(str(get(c.spec)) for c in configs))
        return "-vs-".join(seen)

    net = lambda s: s.network  # noqa: E731
    widths = {c.spec.network.widths for c in configs}
    shape = (f"L{configs[0].spec.network.depth}-w{configs[0].spec.network.widths[0]}"
             if len(widths) == 1 and len(set(next(iter(widths)))) == 1 else "custom")
    init = values("init", lambda s: s.network.init.scheme if isinstance(s.network.init.scheme, str) else "custom")
    parts = [values("activation", lambda s: net(s).activation), init, shape,
             f"N{values('samples', lambda s: s.samples)}", f"seed{configs[0].spec.seed}"]
    # A hash of every option keeps runs that differ elsewhere (replicates, BN, ...) apart.
    return dir_name("-".join(parts), json.dumps([to_options(c.spec) for c in configs], sort_keys=True,
                                                 default=json_default))


def dir_name(name: str, key: str) -> str:
    """``name`` made safe as a directory name, then a short hash of ``key`` (what makes the run this run)."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)[:110]
    return safe + "-" + hashlib.sha1(key.encode()).hexdigest()[:6]


FORMATS = ("md", "html", "csv", "json")


def write(run: Run, directory: Path, formats: tuple[str, ...] = FORMATS, workers: int = 1) -> dict[str, Any]:
    """Write every output file of ``run`` into ``directory``; return their paths.

    config.json, layers.csv (and histograms.csv) are always written: they are
    the run's data, from which :func:`render` can redraw the report at any time.
    """
    return render(run, directory, formats, workers, save=True)


def render(run: Run, directory: Path, formats: tuple[str, ...] = FORMATS, workers: int = 1,
           save: bool = False) -> dict[str, Any]:
    """Draw ``run``'s figures and reports into ``directory``, the figures in up to ``workers``
    processes (:func:`varprop.report.figures.draw`); with ``save``, write its data files too, beside
    the figures' drawing."""
    directory = Path(directory)
    paths: dict[str, Any] = {"config": directory / "config.json", "layers": directory / "layers.csv"}
    if "json" in formats:
        paths["json"] = directory / "summary.json"
        paths["json"].write_text(shown_summary(run.summary).to_json(orient="records", indent=1))
    if not {"md", "html"} & set(formats):  # no report, so no figures to show in one (nor matplotlib loaded)
        if save:
            run.save(directory)
        return paths
    from . import figures, residual  # matplotlib, loaded only to draw

    jobs = {"figure": (figures.std_per_layer, "std_per_layer.png"),
            "spp_figure": (residual.spp_figure, "signal_propagation.png"),
            "correlation_figure": (figures.correlation, "correlation_per_layer.png"),
            "histogram_figure": (figures.histograms, "histograms.png"),
            "means_figure": (figures.means_and_channels, "means_per_layer.png")}
    if not residual.is_residual(run):
        del jobs["spp_figure"]
    if run.histograms is None:
        del jobs["histogram_figure"]
    paths.update({key: directory / name for key, (_, name) in jobs.items()})
    drawn = [(lambda path, fn=fn: fn(run, path), directory / name) for fn, name in jobs.values()]
    if save:
        # Writing the data files costs about a figure: done beside the drawing rather than before it. Every
        # second job goes to a forked child: the data and the means figure (the longest, now second to last).
        drawn[-1], drawn[-2] = drawn[-2], drawn[-1]
        drawn.insert(1, (lambda path: run.save(directory), directory / "layers.csv"))
    figures.draw(drawn, workers)  # in this order every second job is about half the work
    doc = build_document(run, figure=paths["figure"].name,
                         histograms="histograms.png" if "histogram_figure" in paths else None)
    if "spp_figure" in paths:  # the blocks' own section, after the per-layer figures
        residual.section(doc, run, paths["spp_figure"].name)
    return {**paths, **document.write(doc, directory, formats)}


def shown_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary's rows for the layers the report's tables show (per
    configuration, :func:`shown_layers` of its depth): summary.json stays a
    few hundred kB at any depth; layers.csv has every layer."""
    depth = summary.groupby("config", sort=False)["layer"].transform("max")
    keep = [layer in shown for layer, shown in zip(summary["layer"], depth.map(lambda d: set(shown_layers(int(d)))))]
    return summary[keep]


def rerender_into(run_dir: Path, staged: Path, formats: tuple[str, ...], run: Run, workers: int = 1
                  ) -> dict[str, Any]:
    """Redraw a saved simulate run into ``staged`` (:func:`redraw_into`)."""
    return redraw_into(run_dir, staged, DATA_FILES, lambda directory: render(run, directory, formats, workers))


def redraw_into(run_dir: Path, staged: Path, data_files: Sequence[str],
                draw: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Redraw a saved run of any command into ``staged``, the staging directory
    that is to replace ``run_dir`` (:func:`varprop.outdir.staging`): its
    ``data_files`` are linked in, ``draw(staged)`` draws the figures and
    reports, and the run's other outputs that this render does not redraw
    (report.html when only md is asked, a gallery's reading.md) are carried
    over. A render that draws figures draws them all, so a figure it did not
    draw (an older version's SVG, a panel it no longer makes) is left behind.
    ``run_dir`` itself is only read."""
    run_dir, staged = Path(run_dir), Path(staged)
    for name in data_files:
        if (run_dir / name).is_file():
            _link(run_dir / name, staged / name)
    paths = draw(staged)
    drew_figures = any(p.suffix in _FIGURES for p in staged.iterdir())
    for name in owned_files(run_dir):
        if drew_figures and Path(name).suffix in _FIGURES:
            continue
        if not (staged / name).exists():
            (staged / name).parent.mkdir(parents=True, exist_ok=True)
            _link(run_dir / name, staged / name)
    return paths


_FIGURES = (".png", ".svg", ".pdf")


def _link(src: Path, dst: Path) -> None:
    """A hard link (no copy of a large layers.csv), or a copy where links are not supported."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_fit(points: pd.DataFrame, result: Any, directory: Path, command: str) -> dict[str, Path]:
    """Files of a ``varprop fit`` run: points.csv, fit.json, fan_in_law.png, report.md and report.html."""
    directory = Path(directory)
    paths = {"points": directory / "points.csv", "fit": directory / "fit.json",
             "figure": directory / "fan_in_law.png", "report": directory / "report.md",
             "html": directory / "report.html"}
    points.to_csv(paths["points"], index=False)
    meta = {"command": command, "fit": result.as_dict(),
            "versions": {"varprop": __version__, "numpy": np.__version__, "python": platform.python_version()}}
    paths["fit"].write_text(json.dumps(meta, indent=2, default=json_default) + "\n")
    from . import figures

    figures.fan_in_law(points, result, paths["figure"])
    return {**paths, **document.write(fit_document(points, result, command, paths["figure"].name), directory)}


def write_phase(grid: pd.DataFrame, activation: str, directory: Path, measured: pd.DataFrame | None,
                command: str) -> dict[str, Path]:
    """Files of a ``varprop phase`` run: phase.csv, phase.png, report.md, report.html (and measured.csv)."""
    directory = Path(directory)
    paths = {"grid": directory / "phase.csv", "figure": directory / "phase.png", "report": directory / "report.md",
             "html": directory / "report.html"}
    grid.to_csv(paths["grid"], index=False)
    if measured is not None:
        paths["measured"] = directory / "measured.csv"
        measured.to_csv(paths["measured"], index=False)
    from . import figures

    figures.phase_diagram(grid, activation, paths["figure"], measured)
    doc = Document(f"varprop: the phase diagram of {activation}")
    doc.p("Reproduce with:")
    doc.code(command)
    doc.p("Mean-field theory of a deep network with weights of variance sigma_w^2 / fan_in and biases of variance "
          "sigma_b^2 (Poole et al. 2016; Schoenholz et al. 2017). The length q converges to its fixed point q*; "
          "chi_1 = sigma_w^2 E[phi'(z)^2] at q* decides the fate of correlations between inputs: below 1 (ordered) "
          "all inputs collapse onto one direction (c* = 1), above 1 (chaotic) nearby inputs decorrelate to c* < 1, "
          "unless q has no fixed point (exploding: relu-like activations beyond sigma_w^2 E[phi^2] / q = 1 at large "
          "q, sigma_w^2 = 2 for relu, whose correlations stay ordered). "
          "The black line chi_1 = 1 separates the phases; there the correlation depth scale xi_c, the number of "
          "layers over which correlations relax, diverges: signals (and gradients) travel deepest near it.")
    doc.figure(paths["figure"].name, f"{activation}: chi_1 and xi_c over (sigma_w^2, sigma_b^2)"
               + ("; measured correlations at the marked points" if measured is not None else ""))
    if measured is not None:
        doc.p("The right panel runs the Monte-Carlo engine (30 layers of width 300, 40 Gaussian samples, 2 "
              "replicates) at the marked grid points and sets the measured mean cosine similarity of z between "
              "samples beside the c-map's prediction.")
    doc.p("`phase.csv` holds every grid point: q*, chi_1, c*, xi_c and the phase. In the chaotic phase c* and "
          "xi_c come from Mehler's series for the c-map and agree with `varprop theory`'s to 1e-5, except within "
          "a few per cent of chi_1 = 1, where c* converges so slowly that the grid stops after 2,000 steps.")
    return {**paths, **document.write(doc, directory)}

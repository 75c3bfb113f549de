"""``varprop report`` (redraw a saved run) and ``varprop gallery``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from ..errors import SpecError
from ..parallel import available_cores
from ..run import Run
from .common import force_option, in_staging, parse_formats


# The outputs a redraw writes (the data files are the run's own and are kept as they are), and the runs of
# commands whose report is written with its data, by the file that marks them.
REDRAWN = ("md", "html", "json")
NOT_REDRAWN = {"fit.json": "fit", "phase.csv": "phase"}


@click.command("report")
@click.argument("run_dir")
@click.option("--format", "formats", default="md,html", metavar="LIST", help="outputs among md, html, json "
              "[default: md,html]")
@force_option
def report_cmd(run_dir: str, formats: str, force: bool) -> None:
    """Redraw RUN_DIR's figures and reports from its layers.csv and config.json, without rerunning.

    Everything is drawn first and replaces the old figures and reports only
    when complete; the data and every file varprop did not write are kept.
    """
    from .. import report
    from ..outdir import OutDirError, check_target

    if (Path(run_dir) / "_sweep.json").is_file():  # a varprop sweep directory: its own report, whatever --format
        from .sweep import redraw

        click.echo(f"rewrote {redraw(Path(run_dir))} (report.md and figures beside it)")
        return
    if "csv" in (f.strip() for f in formats.split(",")):
        raise SpecError("format", "csv: a run's data files (layers.csv, history.csv) are kept as they are; "
                        f"expected a comma-separated list of {', '.join(REDRAWN)}")
    fmts = parse_formats(formats, REDRAWN)
    for marker, command in NOT_REDRAWN.items():
        if (Path(run_dir) / marker).is_file() and not (Path(run_dir) / "config.json").exists():
            raise SpecError("RUN_DIR", f"{run_dir} is a varprop {command} run, which is not redrawn: its report is "
                            f"written with its data; run varprop {command} again to change it")
    try:
        check_target(run_dir)
    except OutDirError as exc:
        raise SpecError("RUN_DIR", str(exc)) from None
    path = Path(run_dir)
    if not path.is_dir():
        raise SpecError("RUN_DIR", f"{run_dir} does not exist")
    from ..report import inspect as inspect_report
    from ..report import training

    # Which command made the run decides how it redraws: inspect and train runs say so in their files.
    inspected, trained = inspect_report.is_inspect_run(path), training.is_training_run(path)
    if trained and "json" in fmts:
        raise SpecError("format", "a training run's data is its history.csv; expected md or html")
    run = None if inspected or trained else Run.load(path, run_dir)

    def work(tmp: Path) -> dict[str, Any]:
        try:
            if inspected:
                return inspect_report.rerender_into(path, tmp, fmts)
            if trained:
                saved = training.load(path)
                return report.redraw_into(path, tmp, training.DATA_FILES,
                                          lambda directory: training.render(*saved, directory, fmts,
                                                                            workers=available_cores()))
            return report.rerender_into(path, tmp, fmts, run, available_cores())
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            raise SpecError("RUN_DIR", f"cannot draw the run in {run_dir} ({type(exc).__name__}: {exc}); "
                            "nothing was changed") from None

    started = time.time() - 1  # file times round to the file system's resolution
    paths = in_staging(run_dir, work, force=force, option="RUN_DIR")
    # the figures drawn now (what is carried over keeps its time): renders name their figures differently
    figures = [p for p in path.glob("*.png") if p.stat().st_mtime >= started]
    shown = [str(path / Path(paths[k]).name) for k in ("report", "html", "json") if k in paths]
    click.echo("rewrote " + ", ".join(shown) + (f" and {len(figures)} figure{'s' if len(figures) > 1 else ''}"
                                                if figures else "") + f" in {path}")


@click.command("gallery")
@click.option("--out", default="reports", help="gallery root [default: reports]")
@click.option("--only", multiple=True, metavar="NAME", help="regenerate only this entry (repeatable)")
@force_option
def gallery_cmd(out: str, only: tuple[str, ...], force: bool) -> None:
    """Regenerate the committed reports/ gallery (deterministic)."""
    from .. import gallery
    from ..outdir import OutDirError

    for name in only:
        if name not in gallery.ENTRIES:
            raise SpecError("only", f"expected one of {', '.join(gallery.ENTRIES)}, got {name!r}")
    if out == "":
        raise SpecError("out", "expected a directory path, got ''")
    try:
        paths = gallery.build(Path(out), list(only) or None, force=force)
    except OutDirError as exc:
        raise SpecError("out", str(exc)) from None
    except OSError as exc:
        raise SpecError("out", f"cannot write to {out} ({exc.strerror or exc})") from None
    for p in paths:
        click.echo(f"wrote {p}")

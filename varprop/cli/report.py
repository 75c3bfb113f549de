"""``varprop report`` (redraw a saved run) and ``varprop gallery``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from ..spec import SpecError
from .common import force_option, in_staging, parse_formats


def _load_run(path: Path, shown: str) -> tuple[Any, dict[str, Any]]:
    """The run's layers.csv and config.json, checked before anything is drawn:
    every problem is one line naming the file, and nothing is touched."""
    import pandas as pd

    from ..outdir import show

    def fail(message: str) -> SpecError:
        return SpecError("RUN_DIR", message)

    for name in ("config.json", "layers.csv"):
        if not os.path.lexists(path / name):
            raise fail(f"{show(shown)} holds no {name}: not the directory of a varprop simulate run")
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
        raise fail(f"{show(config)} has no list of configurations (each with a label, varied and options) under "
                   "'configs'; it was not written by varprop simulate, or was edited")
    if not isinstance(meta.get("versions"), dict):
        raise fail(f"{show(config)} has no 'versions'; it was not written by varprop simulate, or was edited")
    csv = path / "layers.csv"
    try:
        layers = pd.read_csv(csv)
    except OSError as exc:
        raise fail(f"cannot read {show(csv)} ({exc.strerror})") from None
    except (ValueError, pd.errors.ParserError) as exc:  # EmptyDataError is a ValueError
        raise fail(f"{show(csv)} is not a varprop table ({str(exc).splitlines()[0]})") from None
    missing = [c for c in ("config", "replicate", "layer", "post_log10_std") if c not in layers]
    if missing:
        raise fail(f"{show(csv)} lacks the column {missing[0]!r}; it was not written by varprop simulate, or was edited")
    if layers.empty:
        raise fail(f"{show(csv)} holds a header and no rows")
    labels = [c["label"] for c in configs]
    found = list(dict.fromkeys(layers["config"].astype(str)))
    if set(found) != set(labels):
        odd = next(iter([f for f in found if f not in labels] + [f for f in labels if f not in found]))
        raise fail(f"{show(csv)} and {show(config)} disagree on the configurations ({odd!r} is in one only)")
    return layers, meta


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

    fmts = parse_formats(formats)
    if (Path(run_dir) / "_sweep.json").is_file():  # a varprop sweep directory: its own report
        from .sweep import redraw

        click.echo(f"rewrote {redraw(Path(run_dir))} (report.md and figures beside it)")
        return
    if "csv" in fmts:
        raise SpecError("format", "layers.csv is the run's data and is kept as it is; expected md, html or json")
    try:
        check_target(run_dir)
    except OutDirError as exc:
        raise SpecError("RUN_DIR", str(exc)) from None
    path = Path(run_dir)
    if not path.is_dir():
        raise SpecError("RUN_DIR", f"{run_dir} does not exist")
    layers, meta = _load_run(path, run_dir)

    def work(tmp: Path) -> dict[str, Any]:
        try:
            return report.rerender_into(path, tmp, fmts, layers, meta)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            raise SpecError("RUN_DIR", f"cannot draw the run in {run_dir} ({type(exc).__name__}: {exc}); "
                            "nothing was changed") from None

    paths = in_staging(run_dir, work, force=force, option="RUN_DIR")
    click.echo("rewrote " + ", ".join(str(path / Path(p).name) for k, p in paths.items()
                                      if k in ("report", "html", "json", "figure")))


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

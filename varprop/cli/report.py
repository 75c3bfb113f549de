"""``varprop report`` (redraw a saved run) and ``varprop gallery``."""

from __future__ import annotations

from pathlib import Path

import click

from .. import report
from ..spec import SpecError
from .common import parse_formats


@click.command("report")
@click.argument("run_dir")
@click.option("--format", "formats", default="md,html", metavar="LIST", help="outputs among md, html, json "
              "[default: md,html]")
def report_cmd(run_dir: str, formats: str) -> None:
    """Redraw RUN_DIR's figures and reports from its layers.csv and config.json, without rerunning."""
    fmts = parse_formats(formats)
    path = Path(run_dir)
    if (path / "_sweep.json").is_file():  # a varprop sweep directory: its own report
        from .sweep import redraw

        click.echo(f"rewrote {redraw(path)} (report.md and figures beside it)")
        return
    if not (path / "layers.csv").is_file() or not (path / "config.json").is_file():
        raise SpecError("RUN_DIR", f"{run_dir} holds no layers.csv and config.json of a varprop simulate run")
    try:
        paths = report.render(path, fmts)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SpecError("RUN_DIR", f"cannot read the run in {run_dir} ({type(exc).__name__}: {exc})") from None
    click.echo("rewrote " + ", ".join(str(p) for k, p in paths.items() if k in ("report", "html", "json", "figure")))


@click.command("gallery")
@click.option("--out", default="reports", help="gallery root [default: reports]")
@click.option("--only", multiple=True, metavar="NAME", help="regenerate only this entry (repeatable)")
def gallery_cmd(out: str, only: tuple[str, ...]) -> None:
    """Regenerate the committed reports/ gallery (deterministic)."""
    from .. import gallery

    for name in only:
        if name not in gallery.ENTRIES:
            raise SpecError("only", f"expected one of {', '.join(gallery.ENTRIES)}, got {name!r}")
    try:
        paths = gallery.build(Path(out), list(only) or None)
    except OSError as exc:
        raise SpecError("out", f"cannot write to {out} ({exc.strerror or exc})") from None
    for p in paths:
        click.echo(f"wrote {p}")

"""``varprop simulate``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .. import options, report
from ..montecarlo import run_configs, total_steps
from ..options import parse_threads
from ..parallel import available_cores
from ..spec import expand
from .common import (DEFAULT_RUNS_DIR, LazyBar, echo_written, force_option, given, in_staging, parse_formats,
                     read_config, table_options, threads_option)


@click.command()
@click.option("--config", "config_file", default=None, help="TOML file of options (CLI options override it)")
@table_options("simulate")
@click.option("--title", default=None, help="report title [default: what was run, in one sentence]")
@click.option("--format", "formats", default="md,html,csv,json", metavar="LIST",
              help="outputs among md, html, csv, json (layers.csv and config.json are always written) "
                   "[default: md,html,csv,json]")
@click.option("--out", default=None, help=f"output directory [default: {DEFAULT_RUNS_DIR}/<descriptive name>]")
@force_option
@threads_option
def simulate(config_file: str | None, title: str | None, formats: str, out: str | None, force: bool,
             threads: str | None, **raw: Any) -> None:
    """Push random inputs through a deep stack and report every layer's statistics.

    \b
    Examples:
      varprop simulate --layers 100 --init fan_in
      varprop simulate --layers 100 --width 100 --init unit --init fan_in
      varprop simulate --widths 784,512,256,128,64,10 --activation sigmoid --activation relu
      varprop simulate --widths 784,512,256,128,64,10 --bn-position post --bn-count 0 --bn-count 4 \\
          --batch-size 4 --batch-size 1024 --backward
    """
    on_line = given("simulate", raw)
    values = read_config(config_file) if config_file is not None else {}
    # The command line's shape beats the file's, whichever way it is given.
    shaped = {"layers", "width"} & set(on_line)
    for key in ("layers", "width") if "widths" in on_line else ("widths",) if shaped else ():
        values.pop(key, None)
    values.update(on_line)
    fmts = parse_formats(formats)
    n_threads = parse_threads(threads)
    configs = expand(values)
    out_dir = out if out is not None else str(DEFAULT_RUNS_DIR / report.run_name(configs))
    bar = LazyBar(total_steps(configs))

    def work(tmp: Path) -> tuple[Any, dict[str, Any]]:
        try:
            run = run_configs(configs, progress=bar, threads=n_threads)
        finally:
            bar.close()
        extra = (["--out", out] if out else []) + (["--title", title] if title else [])
        run.command = options.command_line("simulate", options.parse(values), *extra)
        run.title = title
        return run, report.write(run, tmp, formats=fmts, workers=n_threads or available_cores())

    run, paths = in_staging(out_dir, work, force=force)
    click.echo(report.terminal_table(run))
    echo_written(out_dir, paths["report"].name if "report" in paths else None)

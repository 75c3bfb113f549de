"""``varprop train``: the batch-norm study's training half, on real MNIST."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import click

from .. import options
from ..options import parse_threads
from ..parallel import available_cores
from .common import (DEFAULT_RUNS_DIR, LazyBar, echo_written, force_option, given, in_staging, parse_formats,
                     read_config, table_options, threads_option)

FORMATS = ("md", "html", "csv")  # csv alone: the data files without a report


def run_name(values: dict[str, Any], configs: list[Any]) -> str:
    """``train-<activations>-<what varies>-<hash of every option as given>``."""
    acts = "-vs-".join(dict.fromkeys(c.arch.activation for c in configs))
    varied = "-".join(dict.fromkeys(k for c in configs for k in c.varied if k != "activation")) or "single"
    key = hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:6]
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"train-{acts}-{varied}")[:100]
    return f"{safe}-{key}"


@click.command("train")
@click.option("--config", "config_file", default=None, metavar="FILE.toml",
              help="TOML file of options (the same names; command-line options override it)")
@table_options("train")
@click.option("--title", default=None, help="report title [default: what was compared, in one line]")
@click.option("--format", "formats", default="md,html", metavar="LIST",
              help="outputs among md, html, csv (history.csv, layers_over_training.csv and config.json are "
                   "always written; csv alone skips the report) [default: md,html]")
@click.option("--out", default=None, help=f"output directory [default: {DEFAULT_RUNS_DIR}/train-...]")
@force_option
@threads_option
def train_cmd(config_file: str | None, title: str | None, formats: str, out: str | None, force: bool,
              threads: str | None, **raw: Any) -> None:
    """Train the batch-norm study's MLP on MNIST and record the loss and every layer's statistics.

    \b
    Examples:
      varprop train                                   # sigmoid, SGD + Nesterov, batch 128, 10 epochs, 3 seeds
      varprop train --bn-count 0 --bn-count 1         # the study's first comparison
      varprop train --activation relu --optimizer sgd-nesterov --optimizer adam --bn-count 0 --bn-count 1
      varprop train --batch-size 4 --batch-size 64 --batch-size 256 --batch-size 1024 --bn-count 0 --bn-count 1
      varprop train --data ~/.keras/datasets/mnist.npz --epochs 5
    """
    from ..report import training as report
    from ..train import loop

    on_line = given("train", raw)
    values = read_config(config_file, "train") if config_file is not None else {}
    if {"bn_count", "bn_layers"} & set(on_line):  # the command line's choice of BN beats the file's
        values.pop("bn_count", None)
        values.pop("bn_layers", None)
    values.update(on_line)
    fmts = parse_formats(formats, FORMATS)
    n_threads = parse_threads(threads)
    configs, run, dataset = loop.resolve(values)  # every refusal before anything is written
    out_dir = out if out is not None else str(DEFAULT_RUNS_DIR / run_name(values, configs))  # '' is refused
    bar = LazyBar(loop.total_epochs(configs, run), label="training (epochs)")

    def work(tmp: Path) -> tuple[Any, dict[str, Path]]:
        try:
            result = loop.fit(configs, run, dataset, progress=bar, threads=n_threads)
        finally:
            bar.close()
        extra = (["--out", out] if out else []) + (["--title", title] if title else [])
        meta = {**result.meta, "title": title,
                "command": options.command_line("train", options.parse(values, "train"), *extra)}
        return result, report.write(result.history, result.layers, meta, tmp, fmts,
                                    workers=n_threads or available_cores())

    result, paths = in_staging(out_dir, work, force=force)
    click.echo(report.terminal_table(result.history, result.meta))
    echo_written(out_dir, paths["report"].name if "report" in paths else None)

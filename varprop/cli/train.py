"""``varprop train``: the batch-norm study's training half, on real MNIST."""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import click

from ..errors import SpecError
from ..train.options import OPTIONS
from .common import DEFAULT_RUNS_DIR, force_option, in_staging

FORMATS = ("md", "html", "csv")  # csv alone: the data files without a report


def _options(fn: Any) -> Any:
    for name, opt in reversed(OPTIONS.items()):
        shown = ",".join(map(str, opt.default)) if isinstance(opt.default, tuple) else opt.default
        help_text = opt.help + (f" [default: {shown}]" if shown is not None and "[default" not in opt.help else "") + (
            " [repeatable: compares every combination]" if opt.repeatable else "")
        fn = click.option("--" + name.replace("_", "-"), name, multiple=opt.repeatable, default=None,
                          metavar=opt.metavar, help=help_text)(fn)
    return fn


def read_config(path: str) -> dict[str, Any]:
    """A TOML file of options (the same names; a list compares its values), optionally under ``[train]``."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise SpecError("config", f"cannot read {path} ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError("config", f"{path} is not valid TOML ({exc})") from None
    if isinstance(data.get("train"), dict):
        data = data["train"]
    unknown = [k for k in data if k.replace("-", "_") not in OPTIONS]
    if unknown:
        raise SpecError("config", f"{path}: unknown option {unknown[0]!r}; known: "
                        + ", ".join(k.replace("_", "-") for k in OPTIONS))
    return {k.replace("-", "_"): v for k, v in data.items()}


def _formats(value: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in value.split(",") if p.strip())
    if not parts or any(p not in FORMATS for p in parts):
        raise SpecError("format", f"expected a comma-separated list of {', '.join(FORMATS)}, got {value!r}")
    return parts


def _threads(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise SpecError("threads", f"expected a positive integer, got {value!r}")
    return n


def command_line(options: dict[str, Any], out: str | None, title: str | None) -> str:
    """The command that reruns ``options`` (a config file's values inlined)."""
    words = ["varprop", "train"]
    for key, value in options.items():
        for v in value if isinstance(value, list) else [value]:
            v = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v
            words += ["--" + key.replace("_", "-"), str(v)]
    if out:
        words += ["--out", out]
    if title:
        words += ["--title", title]
    return shlex.join(words)


def run_name(options: dict[str, Any], configs: list[Any]) -> str:
    """``train-<activations>-<what varies>-<hash of every option>``."""
    acts = "-vs-".join(dict.fromkeys(c.arch.activation for c in configs))
    varied = "-".join(dict.fromkeys(k for c in configs for k in c.varied if k != "activation")) or "single"
    key = hashlib.sha1(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:6]
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"train-{acts}-{varied}")[:100]
    return f"{safe}-{key}"


class _Bar:
    """A click progress bar over epochs, shown once a run has taken a second (on a terminal only)."""

    def __init__(self, total: int):
        self.total, self.done, self.start, self.bar = total, 0, time.monotonic(), None

    def __call__(self, k: int) -> None:
        self.done += k
        if self.bar is None:
            if sys.stderr.isatty() and time.monotonic() - self.start > 1.0:
                self.bar = click.progressbar(length=self.total, label="training (epochs)", file=sys.stderr)
                self.bar.__enter__()
                self.bar.update(self.done)
        else:
            self.bar.update(k)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


@click.command("train")
@click.option("--config", "config_file", default=None, metavar="FILE.toml",
              help="TOML file of options (the same names; command-line options override it)")
@_options
@click.option("--title", default=None, help="report title [default: what was compared, in one line]")
@click.option("--format", "formats", default="md,html", metavar="LIST",
              help="outputs among md, html, csv (history.csv, layers_over_training.csv and config.json are "
                   "always written; csv alone skips the report) [default: md,html]")
@click.option("--out", default=None, help=f"output directory [default: {DEFAULT_RUNS_DIR}/train-...]")
@force_option
@click.option("--threads", default=None, metavar="N",
              help="threads to compute on; the numbers are the same for any N [default: every core]")
def train_cmd(config_file: str | None, title: str | None, formats: str, out: str | None, force: bool,
              threads: str | None, **cli_options: Any) -> None:
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

    given = {k: list(v) if isinstance(v, tuple) else v for k, v in cli_options.items() if v is not None and v != ()}
    options = read_config(config_file) if config_file else {}
    if {"bn_count", "bn_layers"} & set(given):  # the command line's choice of BN beats the file's
        options.pop("bn_count", None)
        options.pop("bn_layers", None)
    options.update(given)
    fmts = _formats(formats)
    n_threads = _threads(threads)
    configs, run, dataset = loop.resolve(options)  # every refusal before anything is written
    out_dir = Path(out) if out else DEFAULT_RUNS_DIR / run_name(options, configs)
    bar = _Bar(loop.total_epochs(configs, run))

    def work(tmp: Path) -> tuple[Any, dict[str, Path]]:
        try:
            result = loop.fit(configs, run, dataset, progress=bar, threads=n_threads)
        finally:
            bar.close()
        meta = {**result.meta, "title": title, "command": command_line(options, out, title)}
        return result, report.write(result.history, result.layers, meta, tmp, fmts)

    result, paths = in_staging(out_dir, work, force=force)
    click.echo(report.terminal_table(result.history, result.meta))
    shown = paths.get("report", paths["history"])
    others = ", ".join(dict.fromkeys(p.name for p in paths.values() if p != shown))
    click.echo(f"\n{'report' if 'report' in paths else 'data'}: {out_dir / shown.name}  ({others} beside it)")

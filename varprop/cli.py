"""The ``varprop`` command line: parses options, calls the library, writes results."""

from __future__ import annotations

import shlex
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import click

from . import report
from .engine import simulate as run_simulation
from .engine import total_steps
from .spec import OPTIONS, SpecError, expand, parse

DEFAULT_RUNS_DIR = Path("reports") / "runs"


class _Group(click.Group):
    """Every error is one line on stderr and exit status 2, never a traceback."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            click.echo(f"varprop: error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except SpecError as exc:
            click.echo(f"varprop: error: {exc}", err=True)
            sys.exit(2)
        except click.Abort:
            click.echo("varprop: aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Group, invoke_without_command=True)
@click.version_option(package_name="varprop")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Monte-Carlo variance propagation through deep networks at initialization."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


def _spec_options(fn: Any) -> Any:
    """One click option per spec option; values stay strings for spec.parse."""
    for name, opt in reversed(OPTIONS.items()):
        flag = "--" + name.replace("_", "-")
        help_text = opt.help + (" [repeatable: compares every combination]" if opt.repeatable else "")
        if opt.flag:
            fn = click.option(flag, name, is_flag=True, default=None, help=opt.help)(fn)
        else:
            fn = click.option(flag, name, multiple=opt.repeatable, default=None, metavar=opt.metavar,
                              help=help_text)(fn)
    return fn


def _read_config(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise SpecError("config", f"cannot read {path} ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError("config", f"{path} is not valid TOML ({exc})") from None
    data = data.get("simulate", data)
    unknown = [k for k in data if k.replace("-", "_") not in OPTIONS]
    if unknown:
        raise SpecError("config", f"{path}: unknown option {unknown[0]!r}; known: "
                        + ", ".join(k.replace("_", "-") for k in OPTIONS))
    return {k.replace("-", "_"): v for k, v in data.items()}


def _word(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if callable(value):
        return f"{value.__module__}:{value.__qualname__}"
    return value if isinstance(value, str) else repr(value) if isinstance(value, float) else str(value)


def _command_line(options: dict[str, Any], out: str | None) -> str:
    """The command that reruns ``options`` (a config file's values inlined)."""
    words = ["varprop", "simulate"]
    for key, value in parse(options).items():
        if OPTIONS[key].flag:
            words += ["--" + key.replace("_", "-")] if value else []
            continue
        for v in value if isinstance(value, list) else [value]:
            words += ["--" + key.replace("_", "-"), _word(v)]
    if out:
        words += ["--out", out]
    return shlex.join(words)


class _LazyBar:
    """A click progress bar that appears only once a run has taken a second."""

    def __init__(self, total: int, delay: float = 1.0):
        self.total, self.delay, self.done = total, delay, 0
        self.start = time.monotonic()
        self.bar: Any = None

    def __call__(self, k: int) -> None:
        self.done += k
        if self.bar is None:
            if sys.stderr.isatty() and time.monotonic() - self.start > self.delay:
                self.bar = click.progressbar(length=self.total, label="simulating", file=sys.stderr)
                self.bar.__enter__()
                self.bar.update(self.done)
        else:
            self.bar.update(k)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


@main.command()
@click.option("--config", "config_file", default=None, help="TOML file of options (CLI options override it)")
@_spec_options
@click.option("--out", default=None, help=f"output directory [default: {DEFAULT_RUNS_DIR}/<descriptive name>]")
def simulate(config_file: str | None, out: str | None, **cli_options: Any) -> None:
    """Push random inputs through a deep stack and report every layer's statistics.

    \b
    Examples:
      varprop simulate --layers 100 --init fan_in
      varprop simulate --layers 100 --width 100 --init unit --init fan_in
      varprop simulate --widths 784,512,256,128,64,10 --activation sigmoid --activation relu
      varprop simulate --widths 784,512,256,128,64,10 --bn-position post --bn-count 0 --bn-count 4 \\
          --batch-size 4 --batch-size 1024 --backward
    """
    given = {k: list(v) if isinstance(v, tuple) else v for k, v in cli_options.items()
             if v is not None and v != ()}
    options = _read_config(config_file) if config_file else {}
    # The command line's shape beats the file's, whichever way it is given.
    for key in ("layers", "width") if "widths" in given else ("widths",) if {"layers", "width"} & set(given) else ():
        options.pop(key, None)
    options.update(given)
    configs = expand(options)
    out_dir = Path(out) if out else DEFAULT_RUNS_DIR / report.run_name(configs)
    try:
        stage = report.staging(out_dir)
        tmp = stage.__enter__()
    except OSError as exc:
        raise SpecError("out", f"cannot write to {out_dir} ({exc.strerror or exc})") from None
    # Everything below writes only into the staging directory, renamed at the end.
    bar = _LazyBar(total_steps(configs))
    try:
        layers = run_simulation(configs, progress=bar)
        bar.close()
        paths = report.write(layers, tmp, command=_command_line(options, out))
    except BaseException:
        bar.close()
        stage.__exit__(*sys.exc_info())
        raise
    stage.__exit__(None, None, None)
    click.echo(report.terminal_table(layers, paths["summary"]))
    click.echo(f"\nreport: {out_dir / paths['report'].name}  (layers.csv, config.json, std_per_layer.png beside it)")


if __name__ == "__main__":
    main()

"""What the commands share: the simulate option set, TOML configs, the
reproduce-command, staging of output directories, progress and JSON output."""

from __future__ import annotations

import json
import math
import sys
import time
import tomllib
from pathlib import Path
from typing import Any, Callable

import click

from .. import options, report
from ..errors import SpecError
from ..nn import activations, inits
from ..options import parse_activation
from ..run import json_default

DEFAULT_RUNS_DIR = Path("reports") / "runs"


def table_options(command: str) -> Callable[[Any], Any]:
    """click options for every option of ``command`` in the option table
    (varprop.options), with its help, metavar and default. Values reach the
    command as click gives them (tuples of strings): :func:`given` turns them
    into what options.parse reads, so CLI, TOML and Python share one parser."""
    def decorate(fn: Any) -> Any:
        for name in reversed(options.COMMANDS[command]):
            opt = options.option(name, command)
            value = options.default(name, command)
            default = options.word(value) if value is not None and value is not False else opt.unset
            help_text = (opt.help + (f" [default: {default}]" if default else "")
                         + (" [repeatable: compares every combination]" if command in options.COMPARING
                            and options.repeatable(name, command) else ""))
            flag = "--" + name.replace("_", "-")
            if opt.flag:
                fn = click.option(flag, name, is_flag=True, default=None, help=help_text)(fn)
            else:  # every option collects repeats: given() refuses them where the option takes one value
                fn = click.option(flag, name, multiple=True, default=None, metavar=opt.metavar, help=help_text)(fn)
        return fn
    return decorate


def given(command: str, raw: dict[str, Any]) -> dict[str, Any]:
    """The options given on the command line (click's tuples) as
    options.parse reads them: a list where the command compares values
    (simulate, train), one value elsewhere (a repeat of an option that takes
    one is refused)."""
    out: dict[str, Any] = {}
    for name in [n for n in raw if n in options.COMMANDS[command]]:  # click's order: as the user gave them
        value = raw.pop(name)
        if value is None or value == ():
            continue
        if isinstance(value, tuple):
            comparing = command in options.COMPARING
            if not comparing and len(value) > 1:
                raise SpecError(name, f"takes one value, got {len(value)}: " + ", ".join(value))
            value = list(value) if comparing else value[0]
        out[name] = value
    return out


def read_config(path: str, command: str = "simulate") -> dict[str, Any]:
    """The options of ``command`` in a TOML config file, by the option table's names: those at the top
    level, and those of its own table (``[simulate]``, ``[train]``), which win. A file with command tables
    is shared: another command's table, and a top-level option only another command has, are left to it."""
    if not path:
        raise SpecError("config", "expected the path of a TOML file, got ''")
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise SpecError("config", f"cannot read {path} ({exc.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SpecError("config", f"{path} is not valid TOML ({exc})") from None
    tables = [k for k, v in data.items() if k in options.COMMANDS and isinstance(v, dict)]
    top = {k: v for k, v in data.items() if k not in tables}
    if tables:  # a shared file: a top-level option that only another command has is left to that command
        top = {k: v for k, v in top.items() if k.replace("-", "_") in options.COMMANDS[command] or not any(
            k.replace("-", "_") in names for names in options.COMMANDS.values())}
        if command not in tables and not top:
            raise SpecError("config", f"{path} has {', '.join(f'[{k}]' for k in tables)} but no [{command}] "
                            f"table nor options of {command}'s at the top level")
    data = {**top, **(data[command] if command in tables else {})}
    odd = [k for k in data if k.replace("-", "_") not in options.COMMANDS[command]]
    if odd:
        raise SpecError("config", f"{path}: {odd[0]!r}: {options.unknown(odd[0], command)}")
    return {k.replace("-", "_"): v for k, v in data.items()}


def in_staging(out_dir: str | Path, work: Any, force: bool = False, option: str = "out") -> Any:
    """Run ``work(tmp)`` writing into a staging directory that becomes
    ``out_dir`` only when it succeeds (:func:`varprop.outdir.staging`: what
    may be replaced, --force, the lock); a directory it must not write, or a
    failed write (full disk), is one line naming ``option``."""
    from ..outdir import OutDirError, staging

    try:
        with staging(out_dir, force=force) as tmp:
            return work(tmp)
    except OutDirError as exc:
        raise SpecError(option, str(exc)) from None


def echo_written(out_dir: str | Path, main: str | None) -> None:
    """``report: DIR/report.md  (... beside it)``, or ``wrote ... in DIR``
    without ``main``: every file the run wrote, as its manifest lists them
    (data first, then figures), so none goes unmentioned."""
    from ..outdir import read_manifest

    manifest = read_manifest(out_dir) or {"files": {}}
    rank = {".csv": 0, ".json": 0, ".png": 1, ".html": 2}
    names = sorted((n for n in manifest["files"] if n != main), key=lambda n: (rank.get(Path(n).suffix, 3), n))
    if main is None:
        click.echo(f"\nwrote {', '.join(names)} in {out_dir}")
    else:
        click.echo(f"\nreport: {Path(out_dir) / main}  ({', '.join(names)} beside it)")


def force_option(fn: Any) -> Any:
    """``--force``: write into a directory holding files varprop did not write."""
    return click.option("--force", is_flag=True,
                        help="write into an output directory that holds files varprop did not write: they are "
                             "kept, and one a new output would replace is kept as NAME.~1~")(fn)


def threads_option(fn: Any) -> Any:
    """``--threads N`` (parsed by the command, which names the option in its error)."""
    return click.option("--threads", default=None, metavar="N",
                        help="cores to compute on (threads, or forked processes for small pieces of work; more "
                             "than the machine has gains nothing); the numbers are the same for any N "
                             "[default: every core]")(fn)


class LazyBar:
    """A click progress bar that appears only once a run has taken a second."""

    def __init__(self, total: int, delay: float = 1.0, label: str = "simulating"):
        self.total, self.delay, self.done, self.label = total, delay, 0, label
        self.start = time.monotonic()
        self.bar: Any = None

    def __call__(self, k: int) -> None:
        self.done += k
        if self.bar is None:
            if sys.stderr.isatty() and time.monotonic() - self.start > self.delay:
                self.bar = click.progressbar(length=self.total, label=self.label, file=sys.stderr)
                self.bar.__enter__()
                self.bar.update(self.done)
        else:
            self.bar.update(k)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


def parse_formats(value: str, accepted: tuple[str, ...] = report.FORMATS) -> tuple[str, ...]:
    """``--format``: a comma-separated list of the ``accepted`` outputs."""
    parts = tuple(p.strip() for p in value.split(",") if p.strip())
    bad = [p for p in parts if p not in accepted]
    if bad or not parts:
        raise SpecError("format", f"expected a comma-separated list of {', '.join(accepted)}, got {value!r}")
    return parts


def finite(value: Any) -> Any:
    """JSON has no NaN or infinity: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def echo_json(data: Any) -> None:
    click.echo(json.dumps(finite(json.loads(json.dumps(data, default=json_default))), indent=2,
                          allow_nan=False))


def activation_arg(name: str, leaky_slope: float, option: str = "activation") -> Any:
    """A registered activation name, or ``module:function`` for a user callable."""
    if ":" in name:
        try:
            return inits.load_callable(name)
        except ValueError as exc:
            raise SpecError(option, str(exc)) from None
    return activations.get(parse_activation(name, option), leaky_slope)

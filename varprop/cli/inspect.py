"""``varprop inspect``: measure a PyTorch model of your own at initialization."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import click

from .. import options
from ..errors import SpecError
from .common import DEFAULT_RUNS_DIR, echo_written, force_option, given, table_options


def require_torch() -> None:
    """One line naming the extra when PyTorch is missing (exit status 2)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        from ..inspect import TORCH_MISSING

        exc = click.ClickException(TORCH_MISSING)
        exc.exit_code = 2
        raise exc from None


def load_inputs(path: str | None) -> Any:
    """The array of ``--input-file`` (.npy), or None."""
    if path is None:
        return None
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise SpecError("input_file", f"no such file: {path}") from None
    except Exception as exc:  # unreadable, not .npy, pickled: one line for the user
        raise SpecError("input_file", f"cannot read {path} as a .npy array ({exc})") from None


@click.command("inspect")
@click.argument("model", metavar="MODEL")
@table_options("inspect")
@click.option("--title", default=None, help="report title [default: the model's name]")
@click.option("--format", "formats", default="md,html,csv,json", metavar="LIST",
              help="outputs among md, html, csv, json (layers.csv and config.json are always written) "
                   "[default: md,html,csv,json]")
@click.option("--out", default=None, help="output directory [default: reports/runs/inspect-<model>-<shape>-...]")
@force_option
def inspect_cmd(model: str, title: str | None, formats: str, out: str | None, force: bool, **raw: Any) -> None:
    """Measure every module of your PyTorch model at initialization, over re-initialisations.

    MODEL is module:function, a function (or class) that returns a fresh torch.nn.Module, found
    from the working directory too. Each re-initialisation calls it under a torch generator seeded from
    --seed, so re-initialisation r is the same model whatever else runs.

    \b
    Examples:
      varprop inspect mypkg.models:make_model --input-shape 8,3,32,32
      varprop inspect mypkg.models:make_model --input-shape 8,3,32,32 --replicates 10 --backward
      varprop inspect mypkg.models:make_model --input-shape 64,784 --types Linear,ReLU --mode eval
      varprop inspect mypkg.models:make_mlp --input-shape 64,784 --width-sweep 64,128,256,512
    """
    require_torch()
    from .. import report as report_pkg
    from ..inspect.model import load_model
    from ..inspect.run import inspect, residual_table
    from ..inspect.sweep import width_sweep
    from ..report import inspect as report
    from ..report.document import terminal
    from .common import in_staging, parse_formats

    values = options.parse(given("inspect", raw), "inspect")
    get = lambda k: values.get(k, options.default(k, "inspect"))  # noqa: E731
    fmts = parse_formats(formats)
    shape, inputs = model_inputs(get)
    ws = get("width_sweep")
    factory = load_model(model, "MODEL")
    run_options = dict(replicates=get("replicates"), backward=get("backward"), modules=get("modules"),
                       types=get("types"), mode=get("mode"), inputs=inputs, seed=get("seed"), device=get("device"),
                       trace=not get("no_trace"))
    # the tolerance only with a width sweep, which reads it
    pinned = ("replicates", "mode", "seed", "tolerance") if ws else ("replicates", "mode", "seed")
    words = reproduce("inspect", {k: v for k, v in values.items() if ws or k != "tolerance"}, get, pinned, [model])
    shape_text = "x".join(map(str, shape if shape is not None else inputs.shape))
    name = f"inspect-{model.rpartition(':')[2]}-{shape_text}-seed{get('seed')}"
    out_dir = out if out is not None else str(DEFAULT_RUNS_DIR / report_pkg.dir_name(name, shlex.join(words)))
    command = shlex.join(words + (["--out", out] if out is not None else []) + (["--title", title] if title else []))

    def work(tmp: Path) -> tuple[Any, Any, dict[str, Any]]:
        if ws:
            sweep = width_sweep(factory, ws, shape, tolerance=get("tolerance"), **run_options)
            table = sweep.table
        else:
            sweep, table = None, inspect(factory, shape, **run_options)
        return table, sweep, report.write(table, tmp, command=command, title=title, formats=fmts, sweep=sweep)

    try:
        table, sweep, paths = in_staging(out_dir, work, force=force)
    except SpecError as exc:
        if exc.option != "model":
            raise
        raise SpecError("MODEL", str(exc).split(": ", 1)[1]) from None
    summary = paths["summary"]
    info = table.attrs["inspect"]
    residual = residual_table(table)
    shown = residual[residual["config"] == summary["config"].iloc[0]] if len(residual) else residual
    for line in report.findings(summary, shown, info, sweep):
        click.echo("- " + terminal(line))
    echo_written(out_dir, paths["report"].name if "report" in paths else None)


MODEL_OPTIONS = ("model", "input_shape", "input_file", "model_mode", "modules", "types", "device")


def check_model(given: dict[str, Any]) -> Any:
    """``varprop check --model``: every module's std within the band (varprop.torch.check_preserves_variance).
    ``given`` holds check's options as given on the command line: a model's (MODEL_OPTIONS) and --band,
    --backward, --replicates and --seed apply; another is refused."""
    if "model" not in given:
        raise SpecError("model", "--input-shape, --input-file, --model-mode, --modules, --types and --device "
                        "describe a PyTorch model: give it with --model module:function")
    plain = [k for k in given if k not in (*MODEL_OPTIONS, "band", "backward", "replicates", "seed")]
    if plain:
        raise SpecError(plain[0], "is an option of the plain-stack check; with --model the model is yours (drop it)")
    values = options.parse(given, "check")
    get = lambda k: values.get(k, options.default(k, "check"))  # noqa: E731
    if get("replicates") == "auto":
        raise SpecError("replicates", "auto is the plain-stack check's; with --model give a number (at least 8)")
    require_torch()
    from ..inspect.check import check_preserves_variance
    from ..inspect.model import load_model

    factor = float(get("band"))
    if not factor > 1:
        raise SpecError("band", f"expected a factor > 1, got {given.get('band')!r}")
    shape, inputs = model_inputs(get)
    model = values.pop("model")
    command = shlex.join(reproduce("check", values, get, ("band", "replicates", "seed", "model_mode"),
                                   ["--model", model]))
    return check_preserves_variance(
        load_model(model, "model"), shape, band=factor, direction="both" if get("backward") else "forward",
        replicates=int(get("replicates")), seed=int(get("seed")), mode=get("model_mode"), modules=get("modules"),
        types=get("types"), inputs=inputs, device=get("device"), command=command, label=model)


def model_inputs(get: Any) -> tuple[tuple[int, ...] | None, Any]:
    """A model's input shape and ``--input-file`` array (one of them), by ``get(option)``."""
    shape, input_file = get("input_shape"), get("input_file")
    if shape is None and input_file is None:
        raise SpecError("input_shape", "give the input's shape, samples first (such as 8,3,32,32), or --input-file")
    if shape is not None and input_file is not None:
        raise SpecError("input_file", "give --input-shape or --input-file, not both")
    return shape, load_inputs(input_file)


def reproduce(command: str, values: dict[str, Any], get: Any, pinned: tuple[str, ...], lead: list[str]
              ) -> list[str]:
    """The words of the command that reruns ``command`` with ``values`` and, written out whatever later
    defaults become, the values of ``pinned`` (by ``get(option)``); ``lead`` right after the command."""
    return shlex.split(options.command_line(command, {**{k: get(k) for k in pinned}, **values}, lead=lead))

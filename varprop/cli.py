"""The ``varprop`` command line: parses options, calls the library, writes results."""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import click
import numpy as np

from . import activations, fit, inits, report, theory
from .engine import simulate as run_simulation
from .engine import total_steps
from .spec import (OPTIONS, SpecError, expand, from_options, parse, parse_activation, parse_int_list, parse_threads,
                   parse_nonneg_float, parse_pos_float, parse_pos_int)

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
        help_text = opt.help + (f" [default: {opt.default}]" if opt.default not in (None, False) else "") + (
            " [repeatable: compares every combination]" if opt.repeatable else "")
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
    if isinstance(data.get("simulate"), dict):
        data = data["simulate"]  # options may sit under a [simulate] table
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


def _in_staging(out_dir: Path, work: Any) -> Any:
    """Run ``work(tmp)`` writing into a staging directory that becomes
    ``out_dir`` only when it succeeds (report.staging)."""
    try:
        stage = report.staging(out_dir)
        tmp = stage.__enter__()
    except OSError as exc:
        raise SpecError("out", f"cannot write to {out_dir} ({exc.strerror or exc})") from None
    try:
        result = work(tmp)
    except BaseException:
        stage.__exit__(*sys.exc_info())
        raise
    stage.__exit__(None, None, None)
    return result


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


def _formats(value: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in value.split(",") if p.strip())
    bad = [p for p in parts if p not in report.FORMATS]
    if bad or not parts:
        raise SpecError("format", f"expected a comma-separated list of {', '.join(report.FORMATS)}, got {value!r}")
    return parts


@main.command()
@click.option("--config", "config_file", default=None, help="TOML file of options (CLI options override it)")
@_spec_options
@click.option("--title", default=None, help="report title [default: what was run, in one sentence]")
@click.option("--format", "formats", default="md,html,csv,json", metavar="LIST",
              help="outputs among md, html, csv, json (layers.csv and config.json are always written) "
                   "[default: md,html,csv,json]")
@click.option("--out", default=None, help=f"output directory [default: {DEFAULT_RUNS_DIR}/<descriptive name>]")
@click.option("--threads", default=None, metavar="N",
              help="threads to compute on; the numbers are the same for any N [default: every core]")
def simulate(config_file: str | None, title: str | None, formats: str, out: str | None, threads: str | None,
             **cli_options: Any) -> None:
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
    fmts = _formats(formats)
    n_threads = parse_threads(threads)
    configs = expand(options)
    out_dir = Path(out) if out else DEFAULT_RUNS_DIR / report.run_name(configs)
    bar = _LazyBar(total_steps(configs))

    def work(tmp: Path) -> tuple[Any, dict[str, Any]]:
        try:
            layers = run_simulation(configs, progress=bar, threads=n_threads)
        finally:
            bar.close()
        command = _command_line(options, out) + (f" --title {shlex.quote(title)}" if title else "")
        return layers, report.write(layers, tmp, command=command, title=title, formats=fmts)

    layers, paths = _in_staging(out_dir, work)
    click.echo(report.terminal_table(layers, paths["summary"]))
    written = ", ".join(p.name for k, p in paths.items() if k not in ("summary",) and k != "report")
    click.echo(f"\nreport: {out_dir / paths['report'].name}  ({written} beside it)")



def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(_finite(json.loads(json.dumps(data, default=report.json_default))), indent=2,
                          allow_nan=False))


def _activation_arg(name: str, leaky_slope: float, option: str = "activation") -> Any:
    """A registered activation name, or ``module:function`` for a user callable."""
    if ":" in name:
        try:
            return inits.load_callable(name)
        except ValueError as exc:
            raise SpecError(option, str(exc)) from None
    return activations.get(parse_activation(name, option), leaky_slope)


@main.command()
@click.argument("activation")
@click.option("--leaky-slope", default="0.01", metavar="SLOPE", help="negative slope of leaky_relu")
@click.option("--json", "as_json", is_flag=True, help="print machine-readable JSON")
def gain(activation: str, leaky_slope: str, as_json: bool) -> None:
    """Both gains of ACTIVATION (a name or module:function), z ~ N(0, 1).

    \b
    second-moment gain 1/sqrt(E[phi(z)^2])  (PyTorch's calculate_gain convention)
    variance gain      1/sqrt(Var phi(z))   (NFNets' gamma)
    """
    slope = OPTIONS["leaky_slope"].parse(leaky_slope, "leaky_slope")
    act = _activation_arg(activation, slope)
    try:
        g = theory.gains(act, slope)
    except Exception as exc:  # a user activation that fails or is not numeric: one line, not a traceback
        raise SpecError("activation", f"{activation} cannot be evaluated on an array of floats "
                        f"({type(exc).__name__}: {exc})") from None
    if not (math.isfinite(g["second_moment_gain"]) and math.isfinite(g["variance_gain"])):
        raise SpecError("activation", f"{activation} has no finite gain (E[phi^2] or Var phi is 0 or infinite)")
    if as_json:
        _echo_json(g)
        return
    click.echo(f"{g['activation']}:  E[phi] = {g['mean']:.6g}, E[phi^2] = {g['second_moment']:.6g}, "
               f"Var phi = {g['variance']:.6g}  (z ~ N(0, 1))")
    click.echo(f"  second-moment gain 1/sqrt(E[phi^2]) = {g['second_moment_gain']:.6f}"
               + (f"   torch calculate_gain: {g['torch_calculate_gain']:.6f}" if g["torch_calculate_gain"] else ""))
    click.echo(f"  variance gain      1/sqrt(Var phi)  = {g['variance_gain']:.6f}"
               + (f"   NFNets gamma (sampled): {g['nfnets_gamma']:.6f}" if g["nfnets_gamma"] else ""))


@main.command("theory")
@click.option("--activation", "activation", default="tanh", metavar="NAME", help="activation")
@click.option("--sigma-w", default="1.0", metavar="SW", help="weight std: sigma_w^2 = fan_in * Var(W_ij)")
@click.option("--sigma-b", default="0.0", metavar="SB", help="bias std: sigma_b^2 = Var(b_i)")
@click.option("--layers", default=None, metavar="L", help="also print the per-layer predictions for L layers")
@click.option("--width", default="1000", metavar="N", help="width used for --layers (theory is width-free)")
@click.option("--leaky-slope", default="0.01", metavar="SLOPE", help="negative slope of leaky_relu")
@click.option("--json", "as_json", is_flag=True, help="print machine-readable JSON")
def theory_cmd(activation: str, sigma_w: str, sigma_b: str, layers: str | None, width: str, leaky_slope: str,
               as_json: bool) -> None:
    """Mean-field fixed point q*, chi_1, phase and depth scales (Schoenholz et al. 2017)."""
    sw = parse_pos_float(sigma_w, "sigma_w")
    sb = parse_nonneg_float(sigma_b, "sigma_b")
    slope = OPTIONS["leaky_slope"].parse(leaky_slope, "leaky_slope")
    act = activations.get(parse_activation(activation, "activation"), slope)
    try:
        result: dict[str, Any] = theory.mean_field(act, sw, sb)
    except (OverflowError, ZeroDivisionError, ValueError) as exc:
        raise SpecError("sigma_w", f"the mean-field iteration fails at sigma_w = {sw:g}, sigma_b = {sb:g} ({exc}); "
                        "use values of order 0.1 to 10") from None
    table = None
    if layers is not None:
        n = parse_pos_int(width, "width")
        spec = from_options({"layers": layers, "width": n, "activation": activation, "init": "fan_in",
                             "gain": sw, "bias_std": sb, "leaky_slope": slope, "samples": 2})
        table = theory.predict(spec)
        result["layers"] = table.to_dict(orient="records")
    if as_json:
        _echo_json(result)
        return
    fmt = lambda v: f"{v:.6g}" if isinstance(v, float) else str(v)  # noqa: E731
    click.echo(f"{act.name}, sigma_w = {sw:g}, sigma_b = {sb:g}")
    for key, label in (("q_star", "fixed point q*"), ("chi_1", "chi_1 = sigma_w^2 E[phi'(z)^2] at q*"),
                       ("phase", "phase"), ("c_star", "correlation fixed point c*"),
                       ("xi_q", "depth scale xi_q (layers)"), ("xi_c", "depth scale xi_c (layers)")):
        click.echo(f"  {label:40s} {fmt(result[key])}")
    if table is not None:
        shown = table[["layer", "theory_pre_std", "theory_post_mean", "theory_post_std", "theory_post_cos_sim"]]
        click.echo("\n" + shown.rename(columns=lambda c: c.replace("theory_", "")).to_markdown(
            index=False, tablefmt="simple", floatfmt=".6g"))


@main.command("fit")
@click.option("--fan-in", "fan_ins", default="10,30,100,300,1000,3000", metavar="N1,N2,...",
              help="fan-ins to measure")
@click.option("--fan-out", default="100", metavar="N", help="units of the one layer measured")
@click.option("--init", default="unit", metavar="SCHEME", help="init scheme (as for simulate)")
@click.option("--activation", default="linear", metavar="NAME", help="activation")
@click.option("--samples", default="500", metavar="N", help="input samples")
@click.option("--replicates", default="10", metavar="R", help="independent layers per fan-in")
@click.option("--seed", default="0", metavar="SEED", help="seed")
@click.option("--out", default=None,
              help=f"output directory [default: {DEFAULT_RUNS_DIR}/fit-<init>-<activation>-<hash>]")
@click.option("--json", "as_json", is_flag=True, help="print machine-readable JSON")
def fit_cmd(fan_ins: str, fan_out: str, init: str, activation: str, samples: str, replicates: str, seed: str,
            out: str | None, as_json: bool) -> None:
    """The sqrt(fan_in) law: fit log std = a + b log fan_in over one layer."""
    ns = parse_int_list(fan_ins, "fan_in")
    if len(set(ns)) < 2:
        raise SpecError("fan_in", f"expected at least two different fan-ins to fit a line, got {fan_ins!r}")
    base = from_options({"layers": 1, "width": ns[0], "init": init, "activation": activation, "samples": samples,
                         "replicates": replicates, "seed": seed})
    n_out = parse_pos_int(fan_out, "fan_out")
    command = shlex.join(["varprop", "fit", "--fan-in", ",".join(map(str, ns)), "--fan-out", str(n_out),
                          "--init", init, "--activation", activation, "--samples", str(base.samples),
                          "--replicates", str(base.replicates), "--seed", str(base.seed)])
    out_dir = Path(out) if out else DEFAULT_RUNS_DIR / report.dir_name(f"fit-{init}-{activation}", command)

    def work(tmp: Path) -> tuple[Any, Any]:
        points, result = fit.fan_in_law(base, ns, n_out)
        report.write_fit(points, result, tmp, command)
        return points, result

    points, result = _in_staging(out_dir, work)
    if as_json:
        _echo_json({"fit": result.as_dict(), "points": points.to_dict(orient="records"), "out": str(out_dir)})
        return
    click.echo(f"log10 std = a + b log10 fan_in over fan_in {', '.join(map(str, ns))} "
               f"({base.replicates} replicates each, {init} init, {activation})")
    click.echo(f"  b = {result.slope:.4f} +- {result.slope_se:.4f}  (95% CI {result.slope_lo:.4f} .. "
               f"{result.slope_hi:.4f}, t with {result.dof} dof)")
    click.echo(f"  a = {result.intercept:.4f} +- {result.intercept_se:.4f},  R^2 = {result.r2:.5f}")
    click.echo(f"\nreport: {out_dir / 'report.md'}")


@main.command("phase")
@click.option("--activation", default="tanh", metavar="NAME", help="activation")
@click.option("--sigma-w2-max", default="4.0", metavar="X", help="largest sigma_w^2 of the grid")
@click.option("--sigma-b2-max", default="0.5", metavar="X", help="largest sigma_b^2 of the grid")
@click.option("--resolution", default="40", metavar="N", help="grid points along sigma_w^2 (3/4 as many on sigma_b^2)")
@click.option("--measure", is_flag=True, help="overlay the engine's measured correlations at a few grid points")
@click.option("--seed", default="0", metavar="SEED", help="seed of the measurements")
@click.option("--out", default=None, help=f"output directory [default: {DEFAULT_RUNS_DIR}/phase-<activation>-<hash>]")
@click.option("--json", "as_json", is_flag=True, help="print the grid as JSON")
def phase_cmd(activation: str, sigma_w2_max: str, sigma_b2_max: str, resolution: str, measure: bool, seed: str,
              out: str | None, as_json: bool) -> None:
    """The order-to-chaos phase diagram over (sigma_w^2, sigma_b^2)."""
    act = activations.get(parse_activation(activation, "activation"))
    sw_max = parse_pos_float(sigma_w2_max, "sigma_w2_max")
    sb_max = parse_nonneg_float(sigma_b2_max, "sigma_b2_max")
    n = parse_pos_int(resolution, "resolution")
    if n < 3:
        raise SpecError("resolution", f"expected at least 3 grid points, got {resolution!r}")
    seed_n = OPTIONS["seed"].parse(seed, "seed")
    command = shlex.join(["varprop", "phase", "--activation", act.name, "--sigma-w2-max", repr(sw_max),
                          "--sigma-b2-max", repr(sb_max), "--resolution", str(n)]
                         + (["--measure", "--seed", str(seed_n)] if measure else []))
    out_dir = Path(out) if out else DEFAULT_RUNS_DIR / report.dir_name(f"phase-{act.name}", command)

    def work(tmp: Path) -> Any:
        grid = theory.phase_grid(act, np.linspace(sw_max / n, sw_max, n), np.linspace(0, sb_max, max(3, 3 * n // 4)))
        measured = fit.correlation_decay(act.name, np.linspace(sw_max / 8, sw_max, 4), min(0.05, sb_max),
                                         seed_n) if measure else None
        report.write_phase(grid, act.name, tmp, measured, command=command)
        return grid

    grid = _in_staging(out_dir, work)
    if as_json:
        _echo_json(grid.to_dict(orient="records"))
        return
    crit = grid[grid["sigma_b2"] == grid["sigma_b2"].min()]
    edge = crit.iloc[(crit["chi_1"] - 1).abs().argmin()]
    click.echo(f"{act.name}: chi_1 = 1 near sigma_w^2 = {edge['sigma_w2']:.3g} at sigma_b^2 = {edge['sigma_b2']:.3g}; "
               f"ordered at {int((grid['phase'] == 'ordered').sum())} of {len(grid)} grid points")
    click.echo(f"report: {out_dir / 'report.md'}")


@main.command("check")
@click.option("--init", "init", default="he", metavar="SCHEME", help="init scheme or module:function [default: he]")
@click.option("--activation", default="relu", metavar="NAME", help="activation [default: relu]")
@click.option("--layers", default="50", metavar="L", help="depth [default: 50]")
@click.option("--width", default="256", metavar="N", help="width [default: 256]")
@click.option("--band", default="2", metavar="FACTOR", help="allowed factor from the start [default: 2]")
@click.option("--backward", is_flag=True, help="check the gradients too")
@click.option("--replicates", default="16", metavar="R", help="independent networks [default: 16]")
@click.option("--samples", default="128", metavar="N", help="input samples [default: 128]")
@click.option("--seed", default="0", metavar="SEED", help="seed [default: 0]")
@click.option("--bias-std", default=None, metavar="STD", help="bias std")
@click.option("--json", "as_json", is_flag=True, help="print machine-readable JSON")
def check_cmd(init: str, activation: str, layers: str, width: str, band: str, backward: bool, replicates: str,
              samples: str, seed: str, bias_std: str | None, as_json: bool) -> None:
    """Does the std stay within a factor BAND over the depth? Exit 0 yes, 1 no, 2 bad input."""
    from .testing import check_preserves_variance

    spec = from_options({"layers": layers, "width": width, "init": init, "activation": activation,
                         "replicates": replicates, "samples": samples, "seed": seed,
                         **({"bias_std": bias_std} if bias_std is not None else {})})
    factor = parse_pos_float(band, "band")
    if factor <= 1:
        raise SpecError("band", f"expected a factor > 1, got {band!r}")
    result = check_preserves_variance(spec.network.init.scheme, activation, spec.network.depth, spec.network.widths[0],
                                      direction="both" if backward else "forward", band=factor,
                                      samples=spec.samples, replicates=spec.replicates, seed=spec.seed,
                                      **({"bias_std": spec.network.bias_std} if bias_std is not None else {}))
    if as_json:
        _echo_json(result.as_dict())
    else:
        click.echo(("PASS: " if result.passed else "FAIL: ") + result.message)
    sys.exit(0 if result.passed else 1)


@main.command("report")
@click.argument("run_dir")
@click.option("--format", "formats", default="md,html", metavar="LIST", help="outputs among md, html, json "
              "[default: md,html]")
def report_cmd(run_dir: str, formats: str) -> None:
    """Redraw RUN_DIR's figures and reports from its layers.csv and config.json, without rerunning."""
    fmts = _formats(formats)
    path = Path(run_dir)
    if not (path / "layers.csv").is_file() or not (path / "config.json").is_file():
        raise SpecError("RUN_DIR", f"{run_dir} holds no layers.csv and config.json of a varprop simulate run")
    try:
        paths = report.render(path, fmts)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SpecError("RUN_DIR", f"cannot read the run in {run_dir} ({type(exc).__name__}: {exc})") from None
    click.echo("rewrote " + ", ".join(str(p) for k, p in paths.items() if k in ("report", "html", "json", "figure")))


@main.command("gallery")
@click.option("--out", default="reports", help="gallery root [default: reports]")
@click.option("--only", multiple=True, metavar="NAME", help="regenerate only this entry (repeatable)")
def gallery_cmd(out: str, only: tuple[str, ...]) -> None:
    """Regenerate the committed reports/ gallery (deterministic)."""
    from . import gallery

    for name in only:
        if name not in gallery.ENTRIES:
            raise SpecError("only", f"expected one of {', '.join(gallery.ENTRIES)}, got {name!r}")
    try:
        paths = gallery.build(Path(out), list(only) or None)
    except OSError as exc:
        raise SpecError("out", f"cannot write to {out} ({exc.strerror or exc})") from None
    for p in paths:
        click.echo(f"wrote {p}")

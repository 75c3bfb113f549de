"""The theory commands: ``gain``, ``theory``, ``fit`` and ``phase``."""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Any

import click
import numpy as np

from .. import fit, report, theory
from ..montecarlo import memory
from ..nn import activations, inits
from ..spec import (OPTIONS, SpecError, from_options, parse, parse_activation, parse_int_list, parse_nonneg_float,
                    parse_pos_float, parse_pos_int, parse_size)
from .common import DEFAULT_RUNS_DIR, activation_arg, echo_json, force_option, in_staging


@click.command()
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
    act = activation_arg(activation, slope)
    try:
        g = theory.gains(act, slope)
    except Exception as exc:  # a user activation that fails or is not numeric: one line, not a traceback
        raise SpecError("activation", f"{activation} cannot be evaluated on an array of floats "
                        f"({type(exc).__name__}: {exc})") from None
    if not (math.isfinite(g["second_moment_gain"]) and math.isfinite(g["variance_gain"])):
        raise SpecError("activation", f"{activation} has no finite gain (E[phi^2] or Var phi is 0 or infinite)")
    if as_json:
        echo_json(g)
        return
    click.echo(f"{g['activation']}:  E[phi] = {g['mean']:.6g}, E[phi^2] = {g['second_moment']:.6g}, "
               f"Var phi = {g['variance']:.6g}  (z ~ N(0, 1))")
    click.echo(f"  second-moment gain 1/sqrt(E[phi^2]) = {g['second_moment_gain']:.6f}"
               + (f"   torch calculate_gain: {g['torch_calculate_gain']:.6f}" if g["torch_calculate_gain"] else ""))
    click.echo(f"  variance gain      1/sqrt(Var phi)  = {g['variance_gain']:.6f}"
               + (f"   NFNets gamma (sampled): {g['nfnets_gamma']:.6f}" if g["nfnets_gamma"] else ""))


@click.command("theory")
@click.option("--activation", "activation", default="tanh", metavar="NAME", help="activation [default: tanh]")
@click.option("--sigma-w", default=None, metavar="SW",
              help="weight std: sigma_w^2 = fan_in * Var(W_ij) [default: 1, or from --init]")
@click.option("--init", "init", default=None, metavar="SCHEME",
              help="init scheme (as for simulate) instead of --sigma-w: sigma_w^2 = width * Var(W_ij) at --width")
@click.option("--distribution", default=None, metavar="NAME", help="with --init: weight distribution (as simulate)")
@click.option("--mode", default=None, metavar="MODE", help="with --init: fan the variance is divided by")
@click.option("--gain", default=None, metavar="GAIN", help="with --init: gain replacing the scheme's own")
@click.option("--scale", default=None, metavar="SCALE", help="with --init: extra factor on the weight variance")
@click.option("--sigma-b", default=None, metavar="SB",
              help="bias std: sigma_b^2 = Var(b_i) [default: 0, or --init's own bias (torch-default)]")
@click.option("--layers", default=None, metavar="L", help="also print the per-layer predictions for L layers")
@click.option("--width", default="1000", metavar="N",
              help="width: --init's fan, and the width of --layers' stack (the theory itself is width-free) "
                   "[default: 1000]")
@click.option("--leaky-slope", default="0.01", metavar="SLOPE", help="negative slope of leaky_relu")
@click.option("--json", "as_json", is_flag=True, help="print machine-readable JSON")
def theory_cmd(activation: str, sigma_w: str | None, init: str | None, distribution: str | None, mode: str | None,
               gain: str | None, scale: str | None, sigma_b: str | None, layers: str | None, width: str,
               leaky_slope: str, as_json: bool) -> None:
    """Mean-field fixed point q*, chi_1, phase and depth scales (Schoenholz et al. 2017).

    \b
    Examples:
      varprop theory --activation tanh --sigma-w 1.5 --sigma-b 0.05
      varprop theory --activation relu --init kaiming_uniform --layers 10
      varprop theory --activation tanh --init xavier --width 512
    """
    slope = OPTIONS["leaky_slope"].parse(leaky_slope, "leaky_slope")
    act = activations.get(parse_activation(activation, "activation"), slope)
    n = parse_pos_int(width, "width")
    init_opts = {k: v for k, v in (("distribution", distribution), ("mode", mode), ("gain", gain), ("scale", scale))
                 if v is not None}
    if init is None:
        for key in init_opts:
            raise SpecError(key, "applies only with --init (without it, give sigma_w itself with --sigma-w)")
        sw = parse_pos_float("1.0" if sigma_w is None else sigma_w, "sigma_w")
        sb = 0.0 if sigma_b is None else parse_nonneg_float(sigma_b, "sigma_b")
        spec_init = {"init": "fan_in", "gain": sw, "bias_std": sb}
        source = None
    else:
        if sigma_w is not None:
            raise SpecError("sigma_w", "give --sigma-w or --init, not both (--init sets sigma_w^2 = width * Var W)")
        spec_init = {"init": init, **init_opts, **({"bias_std": sigma_b} if sigma_b is not None else {})}
        net = from_options({"layers": 1, "width": n, "activation": act.name, "leaky_slope": slope,
                            "samples": 2, **spec_init}).network
        scheme = net.init.resolve()
        if scheme.user is not None:
            raise SpecError("init", f"{init}: the theory needs the weight variance, which varprop cannot know for "
                            "your own function; give --sigma-w (sigma_w^2 = fan_in * Var W_ij) instead")
        variance = inits.variance(scheme, n, n)
        sw = math.sqrt(n * variance)
        sb = math.exp(0.5 * theory.bias_log_variance(scheme, net.bias_std, n))
        source = {"init": init, "width": n, "weight_variance": variance, **parse(init_opts)}
    try:
        theory.check_sigmas(sw, sb)
    except ValueError as exc:
        raise SpecError("sigma_w" if "sigma_w" in str(exc) else "sigma_b", str(exc)) from None
    result: dict[str, Any] = theory.mean_field(act, sw, sb)
    if source is not None:
        result["from_init"] = source
    table = None
    if layers is not None:
        spec = from_options({"layers": layers, "width": n, "activation": act.name, "leaky_slope": slope,
                             "samples": 2, **spec_init})
        table = theory.predict(spec)
        result["layers"] = table.to_dict(orient="records")
    if as_json:
        echo_json(result)
        return
    fmt = lambda v: f"{v:.6g}" if isinstance(v, float) else str(v)  # noqa: E731
    click.echo(f"{act.name}, sigma_w = {sw:g}, sigma_b = {sb:g}"
               + ("" if source is None else f"  (--init {init} at width {n}: Var W_ij = {source['weight_variance']:.6g}"
                  + (f", Var b_i = {sb * sb:.6g}" if sb else "") + ")"))
    for key, label in (("q_star", "fixed point q*"), ("chi_1", "chi_1 = sigma_w^2 E[phi'(z)^2] at q*"),
                       ("phase", "phase"), ("c_star", "correlation fixed point c*"),
                       ("xi_q", "depth scale xi_q (layers)"), ("xi_c", "depth scale xi_c (layers)")):
        click.echo(f"  {label:40s} {fmt(result[key])}")
    if table is not None:
        shown = table[["layer", "theory_pre_std", "theory_post_mean", "theory_post_std", "theory_post_cos_sim"]]
        click.echo("\n" + shown.rename(columns=lambda c: c.replace("theory_", "")).to_markdown(
            index=False, tablefmt="simple", floatfmt=".6g"))


@click.command("fit")
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
@force_option
@click.option("--json", "as_json", is_flag=True, help="print machine-readable JSON")
def fit_cmd(fan_ins: str, fan_out: str, init: str, activation: str, samples: str, replicates: str, seed: str,
            out: str | None, force: bool, as_json: bool) -> None:
    """The sqrt(fan_in) law: fit log std = a + b log fan_in over one layer."""
    ns = parse_int_list(fan_ins, "fan_in")
    if len(set(ns)) < 2:
        raise SpecError("fan_in", f"expected at least two different fan-ins to fit a line, got {fan_ins!r}")
    base = from_options({"layers": 1, "width": ns[0], "init": init, "activation": activation, "samples": samples,
                         "replicates": replicates, "seed": seed})
    n_out = parse_pos_int(fan_out, "fan_out")
    memory.precheck(1, max(*ns, n_out), base.samples, base.replicates, None, "fan_in",
                    "use smaller --fan-in and --fan-out values, or fewer --samples or --replicates")
    command = shlex.join(["varprop", "fit", "--fan-in", ",".join(map(str, ns)), "--fan-out", str(n_out),
                          "--init", init, "--activation", activation, "--samples", str(base.samples),
                          "--replicates", str(base.replicates), "--seed", str(base.seed)])
    out_dir = out if out is not None else str(DEFAULT_RUNS_DIR / report.dir_name(f"fit-{init}-{activation}", command))

    def work(tmp: Path) -> tuple[Any, Any]:
        points, result = fit.fan_in_law(base, ns, n_out)
        report.write_fit(points, result, tmp, command)
        return points, result

    points, result = in_staging(out_dir, work, force=force)
    if as_json:
        echo_json({"fit": result.as_dict(), "points": points.to_dict(orient="records"), "out": str(out_dir)})
        return
    click.echo(f"log10 std = a + b log10 fan_in over fan_in {', '.join(map(str, ns))} "
               f"({base.replicates} replicates each, {init} init, {activation})")
    click.echo(f"  b = {result.slope:.4f} +- {result.slope_se:.4f}  (95% CI {result.slope_lo:.4f} .. "
               f"{result.slope_hi:.4f}, t with {result.dof} dof)")
    click.echo(f"  a = {result.intercept:.4f} +- {result.intercept_se:.4f},  R^2 = {result.r2:.5f}")
    click.echo(f"\nreport: {Path(out_dir) / 'report.md'}")


@click.command("phase")
@click.option("--activation", default="tanh", metavar="NAME", help="activation")
@click.option("--sigma-w2-max", default="4.0", metavar="X", help="largest sigma_w^2 of the grid")
@click.option("--sigma-b2-max", default="0.5", metavar="X", help="largest sigma_b^2 of the grid")
@click.option("--resolution", default="40", metavar="N", help="grid points along sigma_w^2 (3/4 as many on sigma_b^2)")
@click.option("--max-memory", default=None, metavar="SIZE",
              help="memory the grid may use, e.g. 2G [default: half of what is available]")
@click.option("--measure", is_flag=True, help="overlay the engine's measured correlations at a few grid points")
@click.option("--seed", default="0", metavar="SEED", help="seed of the measurements")
@click.option("--out", default=None, help=f"output directory [default: {DEFAULT_RUNS_DIR}/phase-<activation>-<hash>]")
@force_option
@click.option("--json", "as_json", is_flag=True, help="print the grid as JSON")
def phase_cmd(activation: str, sigma_w2_max: str, sigma_b2_max: str, resolution: str, max_memory: str | None,
              measure: bool, seed: str, out: str | None, force: bool, as_json: bool) -> None:
    """The order-to-chaos phase diagram over (sigma_w^2, sigma_b^2)."""
    act = activations.get(parse_activation(activation, "activation"))
    sw_max = parse_pos_float(sigma_w2_max, "sigma_w2_max")
    sb_max = parse_nonneg_float(sigma_b2_max, "sigma_b2_max")
    lo, hi = (s * s for s in theory.SIGMA_W_RANGE)
    if not lo <= sw_max <= hi:
        raise SpecError("sigma_w2_max", f"expected a number in {lo:g}..{hi:g}, where chi_1 is computed accurately, "
                        f"got {sigma_w2_max!r}")
    if sb_max > theory.SIGMA_B_MAX**2:
        raise SpecError("sigma_b2_max", f"expected a number in 0..{theory.SIGMA_B_MAX**2:g}, where chi_1 is computed "
                        f"accurately, got {sigma_b2_max!r}")
    n = parse_pos_int(resolution, "resolution")
    if n < 3:
        raise SpecError("resolution", f"expected at least 3 grid points, got {resolution!r}")
    points = n * max(3, 3 * n // 4)
    memory.refuse_beyond(points * memory.PHASE_POINT_BYTES, parse_size(max_memory, "max_memory") if max_memory
                         else None, f"a grid of {points:,} points", "use a smaller --resolution", "resolution")
    seed_n = OPTIONS["seed"].parse(seed, "seed")
    command = shlex.join(["varprop", "phase", "--activation", act.name, "--sigma-w2-max", repr(sw_max),
                          "--sigma-b2-max", repr(sb_max), "--resolution", str(n)]
                         + (["--measure", "--seed", str(seed_n)] if measure else []))
    out_dir = out if out is not None else str(DEFAULT_RUNS_DIR / report.dir_name(f"phase-{act.name}", command))

    def work(tmp: Path) -> Any:
        grid = theory.phase_grid(act, np.linspace(sw_max / n, sw_max, n), np.linspace(0, sb_max, max(3, 3 * n // 4)))
        measured = fit.correlation_decay(act.name, np.linspace(sw_max / 8, sw_max, 4), min(0.05, sb_max),
                                         seed_n) if measure else None
        report.write_phase(grid, act.name, tmp, measured, command=command)
        return grid

    grid = in_staging(out_dir, work, force=force)
    if as_json:
        echo_json(grid.to_dict(orient="records"))
        return
    crit = grid[grid["sigma_b2"] == grid["sigma_b2"].min()]
    edge = crit.iloc[(crit["chi_1"] - 1).abs().argmin()]
    click.echo(f"{act.name}: chi_1 = 1 near sigma_w^2 = {edge['sigma_w2']:.3g} at sigma_b^2 = {edge['sigma_b2']:.3g}; "
               f"ordered at {int((grid['phase'] == 'ordered').sum())} of {len(grid)} grid points")
    click.echo(f"report: {Path(out_dir) / 'report.md'}")

"""The theory commands: ``gain``, ``theory``, ``fit`` and ``phase``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click
import numpy as np

from .. import fit, options, report, theory
from ..errors import SpecError
from ..montecarlo import memory
from ..nn import activations, inits
from ..spec import from_options
from .common import DEFAULT_RUNS_DIR, activation_arg, echo_json, force_option, given, in_staging, table_options


@click.command()
@click.argument("activation")
@table_options("gain")
@click.option("--json", "as_json", is_flag=True, help="print machine-readable JSON")
def gain(activation: str, as_json: bool, **raw: Any) -> None:
    """Both gains of ACTIVATION (a name or module:function), z ~ N(0, 1).

    \b
    second-moment gain 1/sqrt(E[phi(z)^2])  (PyTorch's calculate_gain convention)
    variance gain      1/sqrt(Var phi(z))   (NFNets' gamma)
    """
    values = options.parse(given("gain", raw), "gain")
    slope = values.get("leaky_slope", options.default("leaky_slope", "gain"))
    act = activation_arg(activation, slope, option="ACTIVATION")  # the argument, named as --help shows it
    try:
        g = theory.gains(act, slope)
    except Exception as exc:  # a user activation that fails or is not numeric: one line, not a traceback
        raise SpecError("ACTIVATION", f"{activation} cannot be evaluated on an array of floats "
                        f"({type(exc).__name__}: {exc})") from None
    if not (math.isfinite(g["second_moment_gain"]) and math.isfinite(g["variance_gain"])):
        raise SpecError("ACTIVATION", f"{activation} has no finite gain (E[phi^2] or Var phi is 0 or infinite)")
    if as_json:
        echo_json(g)
        return
    # a mean below the quadrature's rounding (odd phi: 1e-18) reads as the 0 it is
    mean = g["mean"] if abs(g["mean"]) > 1e-12 * math.sqrt(g["second_moment"]) else 0.0
    click.echo(f"{g['activation']}:  E[phi] = {mean:.6g}, E[phi^2] = {g['second_moment']:.6g}, "
               f"Var phi = {g['variance']:.6g}  (z ~ N(0, 1))")
    click.echo(f"  second-moment gain 1/sqrt(E[phi^2]) = {g['second_moment_gain']:.6f}"
               + (f"   torch calculate_gain: {g['torch_calculate_gain']:.6f}" if g["torch_calculate_gain"] else ""))
    click.echo(f"  variance gain      1/sqrt(Var phi)  = {g['variance_gain']:.6f}"
               + (f"   NFNets gamma (sampled): {g['nfnets_gamma']:.6f}" if g["nfnets_gamma"] else ""))


@click.command("theory")
@table_options("theory")
@click.option("--json", "as_json", is_flag=True, help="print machine-readable JSON")
def theory_cmd(as_json: bool, **raw: Any) -> None:
    """Mean-field fixed point q*, chi_1, phase and depth scales (Schoenholz et al. 2017).

    --init (with --distribution, --mode, --gain, --scale) sets sigma_w^2 =
    width * Var(W_ij) at --width instead of --sigma-w; --layers also prints
    the per-layer predictions for a stack of --width (the theory itself is
    width-free).

    \b
    Examples:
      varprop theory --activation tanh --sigma-w 1.5 --sigma-b 0.05
      varprop theory --activation relu --init kaiming_uniform --layers 10
      varprop theory --activation tanh --init xavier --width 512
    """
    values = options.parse(given("theory", raw), "theory")
    get = lambda k: values.get(k, options.default(k, "theory"))  # noqa: E731
    slope, n = get("leaky_slope"), get("width")
    act = activations.get(get("activation"), slope)
    init_opts = {k: values[k] for k in ("distribution", "mode", "gain", "scale") if k in values}
    if "init" not in values:
        for key in init_opts:
            raise SpecError(key, "applies only with --init (without it, give sigma_w itself with --sigma-w)")
        sw, sb = values.get("sigma_w", 1.0), values.get("sigma_b", 0.0)
        spec_init = {"init": "fan_in", "gain": sw, "bias_std": sb}
        source = None
    else:
        if "sigma_w" in values:
            raise SpecError("sigma_w", "give --sigma-w or --init, not both (--init sets sigma_w^2 = width * Var W)")
        spec_init = {"init": values["init"], **init_opts,
                     **({"bias_std": values["sigma_b"]} if "sigma_b" in values else {})}
        net = from_options({"layers": 1, "width": n, "activation": act.name, "leaky_slope": slope,
                            "samples": 2, **spec_init}).network
        scheme = net.init.resolve()
        if scheme.user is not None:
            raise SpecError("init", f"{values['init']}: the theory needs the weight variance, which varprop cannot "
                            "know for your own function; give --sigma-w (sigma_w^2 = fan_in * Var W_ij) instead")
        variance = inits.variance(scheme, n, n)
        sw = math.sqrt(n * variance)
        sb = math.exp(0.5 * theory.bias_log_variance(scheme, net.bias_std, n))
        source = {"init": values["init"], "width": n, "weight_variance": variance, **init_opts}
    try:
        theory.check_sigmas(sw, sb)
    except ValueError as exc:
        raise SpecError("sigma_w" if "sigma_w" in str(exc) else "sigma_b", str(exc)) from None
    result: dict[str, Any] = theory.mean_field(act, sw, sb)
    if source is not None:
        result["from_init"] = source
    table = None
    if "layers" in values:  # refused in theory's own words before a spec of that depth is built
        memory.precheck(options.parse_pos_int(values["layers"], "layers"), n, 1, 1, None, "layers",
                        "use fewer --layers or a narrower --width")
        spec = from_options({"layers": values["layers"], "width": n, "activation": act.name, "leaky_slope": slope,
                             "samples": 2, **spec_init})
        table = theory.predict(spec)
        result["layers"] = table.to_dict(orient="records")
    if as_json:
        echo_json(result)
        return
    fmt = lambda v: f"{v:.6g}" if isinstance(v, float) else str(v)  # noqa: E731
    click.echo(f"{act.name}, sigma_w = {sw:g}, sigma_b = {sb:g}"
               + ("" if source is None else f"  (--init {values['init']} at width {n}: Var W_ij = "
                  f"{source['weight_variance']:.6g}" + (f", Var b_i = {sb * sb:.6g}" if sb else "") + ")"))
    shown_result = dict(result)
    if act.homogeneous and sb == 0 and 0 < result["q_star"] < math.inf:
        # q' = sigma_w^2 E[phi(z)^2] is then a multiple of q; finite and nonzero, it is q itself: the q_0 that the
        # fixed-point iteration started from is no more "the" fixed point than any other q.
        shown_result["q_star"] = "every q (the q-map is the identity: q_l = q_0)"
    for key, label in (("q_star", "fixed point q*"), ("chi_1", "chi_1 = sigma_w^2 E[phi'(z)^2] at q*"),
                       ("phase", "phase"), ("c_star", "correlation fixed point c*"),
                       ("xi_q", "depth scale xi_q (layers)"), ("xi_c", "depth scale xi_c (layers)")):
        click.echo(f"  {label:40s} {fmt(shown_result[key])}")
    if table is not None:
        shown = table[["layer", "theory_pre_std", "theory_post_mean", "theory_post_std", "theory_post_cos_sim"]]
        # an odd activation's mean is 0 but for the quadrature's rounding (1e-18): shown as the 0 it is
        tiny = shown["theory_post_mean"].abs() <= 1e-12 * shown["theory_post_std"]
        shown = shown.assign(theory_post_mean=shown["theory_post_mean"].where(~tiny, 0.0),
                             theory_post_cos_sim=shown["theory_post_cos_sim"].where(
                                 ~(shown["theory_post_cos_sim"].abs() <= 1e-12), 0.0))  # likewise a cosine of 0
        shown = shown.astype(object).where(shown.notna(), None)  # layer 0 has no pre-activation: a blank
        click.echo("\n" + shown.rename(columns=lambda c: c.replace("theory_", "")).to_markdown(
            index=False, tablefmt="simple", floatfmt=".6g", missingval=""))


@click.command("fit")
@table_options("fit")
@click.option("--out", default=None,
              help=f"output directory [default: {DEFAULT_RUNS_DIR}/fit-<init>-<activation>-<hash>]")
@force_option
@click.option("--json", "as_json", is_flag=True, help="print machine-readable JSON")
def fit_cmd(out: str | None, force: bool, as_json: bool, **raw: Any) -> None:
    """The sqrt(fan_in) law: fit log std = a + b log fan_in over one layer."""
    values = options.parse(given("fit", raw), "fit")
    values = {k: values.get(k, options.default(k, "fit")) for k in options.COMMANDS["fit"]}
    ns, n_out, init, activation = values["fan_in"], values["fan_out"], values["init"], values["activation"]
    base = from_options({"layers": 1, "width": ns[0], "init": init, "activation": activation,
                         "samples": values["samples"], "replicates": values["replicates"], "seed": values["seed"]})
    memory.precheck(1, max(*ns, n_out), base.samples, base.replicates, None, "fan_in",
                    "use smaller --fan-in and --fan-out values, or fewer --samples or --replicates")
    command = options.command_line("fit", values)
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
               f"({base.replicates} replicate{'s' if base.replicates != 1 else ''} each, {init} init, {activation})")
    click.echo(f"  b = {result.slope:.4f} +- {result.slope_se:.4f}  (95% CI {result.slope_lo:.4f} .. "
               f"{result.slope_hi:.4f}, t with {result.dof} dof)")
    click.echo(f"  a = {result.intercept:.4f} +- {result.intercept_se:.4f},  R^2 = {result.r2:.5f}")
    click.echo(f"\nreport: {Path(out_dir) / 'report.md'}")


@click.command("phase")
@table_options("phase")
@click.option("--out", default=None, help=f"output directory [default: {DEFAULT_RUNS_DIR}/phase-<activation>-<hash>]")
@force_option
@click.option("--json", "as_json", is_flag=True, help="print the grid as JSON")
def phase_cmd(out: str | None, force: bool, as_json: bool, **raw: Any) -> None:
    """The order-to-chaos phase diagram over (sigma_w^2, sigma_b^2)."""
    values = options.parse(given("phase", raw), "phase")
    get = lambda k: values.get(k, options.default(k, "phase"))  # noqa: E731
    act = activations.get(get("activation"))
    sw_max, sb_max, n, measure, seed_n = (get(k) for k in ("sigma_w2_max", "sigma_b2_max", "resolution", "measure",
                                                           "seed"))
    lo, hi = (s * s for s in theory.SIGMA_W_RANGE)
    if not lo <= sw_max <= hi:
        raise SpecError("sigma_w2_max", f"expected a number in {lo:g}..{hi:g}, where chi_1 is computed accurately, "
                        f"got {sw_max!r}")
    if sb_max > theory.SIGMA_B_MAX**2:
        raise SpecError("sigma_b2_max", f"expected a number in 0..{theory.SIGMA_B_MAX**2:g}, where chi_1 is computed "
                        f"accurately, got {sb_max!r}")
    points = n * max(3, 3 * n // 4)
    memory.refuse_beyond(points * memory.PHASE_POINT_BYTES, get("max_memory"), f"a grid of {points:,} points",
                         "use a smaller --resolution", "resolution")
    command = options.command_line("phase", {"activation": act.name, "sigma_w2_max": sw_max, "sigma_b2_max": sb_max,
                                             "resolution": n, "measure": measure,
                                             **({"seed": seed_n} if measure else {})})
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

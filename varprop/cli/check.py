"""``varprop check``: does an init keep the signal? Exit 0 yes, 1 no, 2 bad input."""

from __future__ import annotations

import sys
from typing import Any, Callable

import click

from ..spec import OPTIONS, SpecError, expand, parse, parse_pos_float
from .common import echo_json

# simulate's options that apply to one square stack, with simulate's parsers and help.
_SHARED = ("distribution", "mode", "gain", "scale", "bias_std", "leaky_slope", "bn", "bn_count", "bn_layers",
           "bn_position", "bn_eps", "batch_size")
_TO_CHECK = ("distribution", "mode", "gain", "scale", "bias_std", "leaky_slope", "bn_position", "bn_eps",
             "batch_size")


def _shared_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for name in reversed(_SHARED):
        opt = OPTIONS[name]
        fn = click.option("--" + name.replace("_", "-"), name, default=None, metavar=opt.metavar,
                          help=opt.help)(fn)
    return fn


@click.command("check")
@click.option("--init", "init", default="he", metavar="SCHEME", help="init scheme or module:function [default: he]")
@click.option("--activation", default="relu", metavar="NAME", help="activation [default: relu]")
@click.option("--layers", default="50", metavar="L", help="depth [default: 50]")
@click.option("--width", default="256", metavar="N", help="width [default: 256]")
@click.option("--band", default="2", metavar="FACTOR", help="allowed factor from the start [default: 2]")
@click.option("--backward", is_flag=True, help="check the gradients too")
@click.option("--replicates", default="16", metavar="R|auto",
              help="independent networks, or auto: 16, then as many as decide the layers left undecided "
                   "(at most 512; each run at half the false-alarm rate) [default: 16]")
@click.option("--samples", default="128", metavar="N", help="input samples [default: 128]")
@click.option("--seed", default="0", metavar="SEED", help="seed [default: 0]")
@_shared_options
@click.option("--json", "as_json", is_flag=True, help="print machine-readable JSON")
def check_cmd(init: str, activation: str, layers: str, width: str, band: str, backward: bool, replicates: str,
              samples: str, seed: str, as_json: bool, **shared: str | None) -> None:
    """Does the std stay within a factor BAND over the depth? Exit 0 yes, 1 no, 2 bad input.

    \b
    Examples:
      varprop check --init kaiming_uniform --activation relu --layers 50
      varprop check --init he --activation relu --bn all --batch-size 32 --backward
      varprop check --init he --replicates auto
    """
    from ..testing import check_preserves_variance

    auto = replicates.strip().lower() == "auto"
    given = {k: v for k, v in shared.items() if v is not None}
    options = {"layers": layers, "width": width, "init": init, "activation": activation, "samples": samples,
               "seed": seed, "replicates": 16 if auto else replicates, **given}
    spec = expand(options)[0].spec  # every option checked as simulate checks it
    parsed = parse(given)
    factor = parse_pos_float(band, "band")
    if factor <= 1:
        raise SpecError("band", f"expected a factor > 1, got {band!r}")
    net = spec.network
    kw: dict[str, Any] = {k: parsed[k] for k in _TO_CHECK if k in parsed}
    if net.bn_layers:
        kw["bn_layers"] = net.bn_layers
    result = check_preserves_variance(parse({"init": init})["init"], net.activation, net.depth, net.widths[0],
                                      direction="both" if backward else "forward", band=factor,
                                      samples=spec.samples, replicates="auto" if auto else spec.replicates,
                                      seed=spec.seed, **kw)
    message = result.message.replace("replicates='auto'", "--replicates auto")  # the option's spelling here
    if as_json:
        echo_json({**result.as_dict(), "message": message})
    else:
        click.echo(("PASS: " if result.passed else "FAIL: ") + message)
    sys.exit(0 if result.passed else 1)

"""``varprop check``: does an init keep the signal? Exit 0 yes, 1 no, 2 bad input."""

from __future__ import annotations

import sys

import click

from ..spec import SpecError, from_options, parse_pos_float
from .common import echo_json


@click.command("check")
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
@click.option("--model", default=None, metavar="MODULE:FACTORY",
              help="check your PyTorch model instead (every module's std; see varprop inspect)")
@click.option("--input-shape", default=None, metavar="N,C,...", help="with --model: the input's shape, samples first")
@click.option("--input-file", default=None, metavar="X.NPY", help="with --model: inputs from a .npy file")
@click.option("--mode", default="train", metavar="train|eval", help="with --model: the model's mode [default: train]")
@click.option("--modules", default=None, metavar="GLOBS", help="with --model: check only these modules")
@click.option("--types", default=None, metavar="NAMES", help="with --model: check only these module types")
@click.option("--device", default="cpu", metavar="DEVICE", help="with --model: cpu, cuda or cuda:N")
@click.pass_context
def check_cmd(ctx: click.Context, init: str, activation: str, layers: str, width: str, band: str, backward: bool,
              replicates: str, samples: str, seed: str, bias_std: str | None, as_json: bool, model: str | None,
              input_shape: str | None, input_file: str | None, mode: str, modules: str | None, types: str | None,
              device: str) -> None:
    """Does the std stay within a factor BAND over the depth? Exit 0 yes, 1 no, 2 bad input.

    With --model, every module of your PyTorch model is checked instead, over --replicates
    re-initialisations (forward: against the input's std; with --backward, also each gradient against
    the output gradient's).
    """
    from ..testing import check_preserves_variance

    if model is not None:
        from .inspect import check_model

        result = check_model(ctx, model, band, backward, replicates, seed, input_shape, input_file, mode, modules,
                             types, device)
        if as_json:
            echo_json(result.as_dict())
        else:
            click.echo(("PASS: " if result.passed else "FAIL: ") + result.message)
        sys.exit(0 if result.passed else 1)

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
        echo_json(result.as_dict())
    else:
        click.echo(("PASS: " if result.passed else "FAIL: ") + result.message)
    sys.exit(0 if result.passed else 1)

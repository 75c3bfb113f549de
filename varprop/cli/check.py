"""``varprop check``: does an init keep the signal? Exit 0 yes, 1 no, 2 bad input."""

from __future__ import annotations

import sys
from typing import Any

import click

from .. import options
from ..spec import expand
from .common import echo_json, given, table_options
from .inspect import MODEL_OPTIONS, check_model

# check's options that describe the network, handed to check_preserves_variance as keyword arguments.
_NETWORK = ("distribution", "mode", "gain", "scale", "bias_std", "leaky_slope", "bn_position", "bn_eps", "batch_size")


@click.command("check")
@table_options("check")
@click.option("--json", "as_json", is_flag=True, help="print machine-readable JSON")
def check_cmd(as_json: bool, **raw: Any) -> None:
    """Does the std stay within a factor BAND over the depth? Exit 0 yes, 1 no, 2 bad input.

    A layer fails only when its whole interval over the networks lies outside
    the band; PASS, FAIL, or UNDECIDED (exit 0: no layer shown to fail, but
    an undecided layer's estimate lies outside the band; more replicates
    decide). --replicates auto runs 16 networks, then as many as decide the
    layers left undecided (at most 512; each run at half the false-alarm rate).
    With --model, every module of your PyTorch model is checked instead (see
    varprop inspect): its output std against the input's and, with --backward,
    each gradient's against the output gradient's.

    \b
    Examples:
      varprop check --init kaiming_uniform --activation relu --layers 50
      varprop check --init he --activation relu --bn all --batch-size 32 --backward
      varprop check --init he --replicates auto
      varprop check --model mypkg.models:make_model --input-shape 8,3,32,32 --backward
    """
    from ..testing import check_preserves_variance

    on_line = given("check", raw)
    if set(on_line) & set(MODEL_OPTIONS):
        result = check_model(on_line)
        if as_json:
            echo_json(result.as_dict())
        else:
            click.echo(f"{result.verdict.upper()}: {result.message}")
        sys.exit(0 if result.passed else 1)

    values = options.parse(on_line, "check")
    get = lambda k: values.get(k, options.default(k, "check"))  # noqa: E731
    auto = get("replicates") == "auto"
    network = {k: v for k, v in values.items() if k not in ("band", "backward", "replicates")}
    spec = expand({**{k: get(k) for k in ("init", "activation", "layers", "width", "samples", "seed")}, **network,
                   "replicates": 16 if auto else get("replicates")})[0].spec  # checked as simulate checks it
    net = spec.network
    kw: dict[str, Any] = {k: values[k] for k in _NETWORK if k in values}
    if net.bn_layers:
        kw["bn_layers"] = net.bn_layers
    result = check_preserves_variance(get("init"), net.activation, net.depth, net.widths[0],
                                      direction="both" if get("backward") else "forward", band=get("band"),
                                      samples=spec.samples, replicates="auto" if auto else spec.replicates,
                                      seed=spec.seed, **kw)
    message = result.message.replace("replicates='auto'", "--replicates auto")  # the option's spelling here
    if auto and result.replicates and "replicates" not in message:  # say how many auto took
        chose = f"{result.replicates} replicates, as --replicates auto chose"
        message = message[:-1] + f"; {chose})" if message.endswith(")") else message + f" ({chose})"
    if as_json:
        echo_json({**result.as_dict(), "message": message})
    else:  # undecided: no layer shown to fail (exit 0), but some estimate lies outside the band
        click.echo(f"{result.verdict.upper()}: {message}")
    sys.exit(0 if result.passed else 1)

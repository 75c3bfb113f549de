"""The memory estimate bounds what a whole command really allocates (the
interpreter and libraries aside), so --max-memory means what it says."""

import tracemalloc

import pytest
from click.testing import CliRunner

from varprop.cli import main
from varprop.montecarlo import memory
from varprop.spec import expand

CASES = [  # the theory's heaviest per-layer state (a new Mehler series at every layer), many rows, the tape
    {"layers": 1500, "width": 64, "init": "he", "activation": "elu", "samples": 64},
    {"layers": 3000, "width": 32, "samples": 32, "replicates": 4, "backward": True},
    {"layers": 400, "width": 48, "samples": 96, "activation": ["tanh", "relu"], "bias_std": 0.1, "backward": True},
]


@pytest.mark.parametrize("options", CASES, ids=["elu-theory", "rows-and-tape", "comparison"])
def test_the_estimate_bounds_the_peak_of_the_whole_command(tmp_path, options):
    args = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
            continue
        for v in value if isinstance(value, list) else [value]:
            args += [flag, str(v)]
    need = memory.estimate(expand(options))
    # The estimate leaves out the interpreter and the libraries: a first small run imports them all.
    CliRunner().invoke(main, ["simulate", "--layers", "2", "--width", "4", "--samples", "4", "--backward",
                              "--out", str(tmp_path / "warm")], catch_exceptions=False)
    tracemalloc.start()
    try:
        result = CliRunner().invoke(main, ["simulate", *args, "--out", str(tmp_path / "run")], catch_exceptions=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.exit_code == 0, result.output
    assert peak <= need, f"measured {memory.human(peak)}, estimated {memory.human(need)}"


def test_a_budget_below_the_estimate_is_refused_before_the_run(tmp_path):
    options = CASES[1]
    need = memory.estimate(expand(options))
    result = CliRunner().invoke(main, ["simulate", "--layers", "3000", "--width", "32", "--samples", "32",
                                       "--replicates", "4", "--max-memory", str(need // 4),
                                       "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "--max-memory" in result.output and not (tmp_path / "run").exists()

"""Replicates stepped together (montecarlo/batch.py) give each replicate the
numbers it gets stepped alone: the same draws, the same kernels, bit for bit,
on one thread or two, whatever the grouping."""

import numpy as np
import pytest

from varprop.montecarlo import batch
from varprop.montecarlo.run import run_replicate, run_replicates
from varprop.parallel import Pool
from varprop.spec import expand

CASES = {
    "linear": {"layers": 12, "width": 40, "samples": 90, "init": "fan_in"},
    "relu": {"layers": 10, "width": 32, "samples": 50, "init": "he", "activation": "relu"},
    "tanh, uniform weights": {"layers": 8, "width": 24, "samples": 33, "init": "xavier", "activation": "tanh",
                              "distribution": "uniform"},
    "gelu, odd widths": {"widths": [7, 30, 13, 41, 5], "samples": 21, "init": "he", "activation": "gelu"},
    # layer 1 at scale 1e12 (tanh) or 1e-30 (sigmoid, phi(0) != 0): the phased path, for that layer only
    "tanh, huge inputs": {"layers": 5, "width": 20, "samples": 40, "init": "fan_in", "activation": "tanh",
                          "input_std": 1e12},
    "sigmoid, tiny inputs": {"layers": 5, "width": 20, "samples": 40, "init": "fan_in", "activation": "sigmoid",
                             "input_std": 1e-30},
}


@pytest.mark.parametrize("name", list(CASES))
def test_stacked_replicates_are_the_replicates_alone(name):
    (config,) = expand({**CASES[name], "replicates": 7, "seed": 3})
    spec = config.spec
    assert batch.group_size(spec) > 1  # the stacked path really runs
    alone = [run_replicate(spec, rep) for rep in range(7)]
    for threads in (1, 2):
        together = run_replicates(spec, range(7), pool=Pool(threads))
        for a, b in zip(alone, together):
            assert np.array_equal(a.values, b.values, equal_nan=True)
            assert a.hist.keys() == b.hist.keys() and all(np.array_equal(a.hist[k], b.hist[k]) for k in a.hist)


@pytest.mark.parametrize("options", [
    {"backward": True}, {"bias_std": 0.1}, {"bn_count": 1}, {"init": "orthogonal"}, {"dtype": "float64",
                                                                                     "activation": "tanh"},
])
def test_what_is_not_stacked_runs_alone(options):
    (config,) = expand({"layers": 3, "width": 16, "samples": 32, "replicates": 3, "init": "fan_in", **options})
    assert batch.group_size(config.spec) == 1


def test_large_layers_run_alone():
    (config,) = expand({"layers": 2, "width": 600, "samples": 600, "replicates": 3})
    assert batch.group_size(config.spec) == 1


# Small layers' statistics are taken several at a time (stats.Later); the engine's rows are those it takes
# layer by layer, bit for bit: forward and backward, plain and residual, with and without a projection,
# a zero branch, a linear layer's delta (the incoming gradient's statistics).
LATER_CASES = {
    "relu, backward": {"layers": 9, "width": 24, "samples": 40, "init": "he", "activation": "relu"},
    "linear, backward": {"layers": 7, "width": 20, "samples": 30, "init": "fan_in"},
    # a large linear layer under small ones: its delta is the incoming gradient's row, which waits in Later
    "linear, large under small": {"widths": [600, 16, 16, 16], "samples": 200, "init": "fan_in"},
    "residual, tanh": {"residual": "plain", "blocks": 6, "branch_depth": 2, "width": 24, "samples": 40,
                       "activation": "tanh", "init": "xavier"},
    "residual, projections": {"residual": "plain", "widths": [16, 16, 32, 32], "projection": True,
                              "branch_depth": 2, "samples": 40, "activation": "relu", "init": "he"},
    "skipinit": {"residual": "skipinit", "blocks": 4, "branch_depth": 2, "width": 16, "samples": 30,
                 "activation": "relu", "init": "he"},
    "nf-resnet": {"residual": "nf", "blocks": 5, "branch_depth": 3, "width": 20, "samples": 30,
                  "activation": "gelu", "init": "he"},
}


@pytest.mark.parametrize("name", list(LATER_CASES))
def test_small_layers_statistics_taken_later_are_the_same(name, monkeypatch):
    from varprop import stats

    (config,) = expand({**LATER_CASES[name], "backward": True, "seed": 5})
    assert stats.Later.takes(np.empty((config.spec.samples, 16), np.float32))
    later = run_replicate(config.spec, 1, pool=Pool(2))
    monkeypatch.setattr(stats.Later, "takes", staticmethod(lambda u: False))
    alone = run_replicate(config.spec, 1, pool=Pool(2))
    assert np.array_equal(later.values, alone.values, equal_nan=True)

"""Measure a PyTorch model of your own at initialization, over re-initialisations.

:func:`inspect` runs a model (or a factory that makes one) on seeded random
inputs, once per replicate, each replicate a fresh initialisation drawn under
a torch generator seeded from varprop's seed tree; forward hooks record every
module's output and, with ``backward=True``, tensor hooks the gradient with
respect to it (safe with in-place activations, unlike
``register_full_backward_hook``). The table has one row per module call and
replicate, with the statistic names of simulate's ``layers.csv``, the
mean-field prediction beside them where it is derivable, and the residual
additions' skip and branch in :func:`residual_table`. :func:`width_sweep`
fits each module's statistics against width (an automated coord check) and
:func:`check_preserves_variance` / :func:`assert_preserves_variance` decide a
band for a test suite.

This module is the public face; the work is done in :mod:`varprop.inspect`,
one question a module. PyTorch is optional (``pip install 'varprop[torch]'``):
it is imported by the functions here, never by ``import varprop``.

>>> import torch.nn as nn
>>> table = inspect(lambda: nn.Sequential(nn.Linear(64, 64), nn.ReLU()), input_shape=(32, 64), replicates=2)
>>> list(table["name"].unique())
['(input)', '0', '1']
"""

from __future__ import annotations

from .inspect import TORCH_MISSING
from .inspect.check import assert_preserves_variance, check_preserves_variance
from .inspect.model import load_model
from .inspect.run import inspect, residual_table
from .inspect.sweep import SweepResult, width_sweep
from .inspect.tensorstats import tensor_stats

__all__ = ["inspect", "residual_table", "width_sweep", "check_preserves_variance", "assert_preserves_variance",
           "load_model", "tensor_stats", "TORCH_MISSING", "SweepResult"]

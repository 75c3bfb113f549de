"""``varprop inspect``: a PyTorch model of the user's own, measured at initialization over re-initialisations.

One question a module:

- :mod:`.tensorstats`: the statistics of one tensor (simulate's ``layers.csv`` names, float64 sums);
- :mod:`.modules`: which modules a run measures, their activations, and the axes of their outputs;
- :mod:`.graph`: what module hooks cannot see (residual additions, functional activations), made visible
  by tracing with torch.fx;
- :mod:`.model`: what a replicate's model and inputs are (factory or re-initialised copy, seeded from
  varprop's tree), and the model's own refusals (device, input shape);
- :mod:`.hooks`: the hooks of one forward (and backward) pass, one row per module call;
- :mod:`.theory`: mean-field predictions along the data flow the hooks recorded;
- :mod:`.run`: :func:`inspect`, replicates -> the per-module table (and :func:`residual_table`);
- :mod:`.sweep`: :func:`width_sweep`, the exponent of every module's std against width;
- :mod:`.check`: :func:`check_preserves_variance` / :func:`assert_preserves_variance` for a test suite.

The public API is :mod:`varprop.torch` (these names, re-exported). PyTorch is optional
(``pip install 'varprop[torch]'``): no module here imports it before a function needs it, so
``import varprop.torch`` works without it.
"""

from __future__ import annotations

import importlib
from typing import Any

TORCH_MISSING = "PyTorch is not installed; install it with: pip install 'varprop[torch]'"

# public name -> the module that defines it
_PUBLIC = {"inspect": "run", "residual_table": "run", "width_sweep": "sweep", "SweepResult": "sweep",
           "check_preserves_variance": "check", "assert_preserves_variance": "check", "load_model": "model",
           "tensor_stats": "tensorstats"}

__all__ = [*_PUBLIC, "TORCH_MISSING", "load_torch"]


def load_torch() -> Any:
    """The torch module, or ImportError naming the extra that installs it."""
    try:
        import torch
    except ImportError:
        raise ImportError(TORCH_MISSING) from None
    return torch


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

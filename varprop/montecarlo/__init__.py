"""The Monte-Carlo engine, split by question: the seed tree (seeds.py),
values carried in log scale (scaled.py), one layer forward and backward
(stepper.py), small layers of several replicates stepped together
(batch.py), residual blocks (residual.py), the memory plan (memory.py) and
the run that maps configurations to the per-layer table (run.py).

Names load on first use: spec.py's size checks import memory.py without
pulling in the engine.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {"Table": "run", "configs_for": "run", "make_inputs": "run", "run_configs": "run", "run_replicate": "run",
           "simulate": "run", "total_steps": "run", "upstream": "run", "generator": "seeds"}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

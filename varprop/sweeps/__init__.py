"""Sweeps over grids of configurations on dask.distributed, resumable (``varprop sweep``).

Names load on first use, so a worker that needs only the small plugin
module does not import pandas for it.

>>> from varprop.sweeps import build_grid
>>> [c.label for c in build_grid({"layers": [10, 100], "width": 64}).configs]
['layers=10', 'layers=100']
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {"Grid": "grid", "Task": "grid", "build_grid": "grid", "read_grid": "grid", "SweepResult": "run",
           "sweep": "run", "read_results": "store"}

__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'varprop.sweeps' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

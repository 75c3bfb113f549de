"""Sweeps over grids of configurations on dask.distributed, resumable (``varprop sweep``).

>>> from varprop.sweeps import build_grid
>>> [c.label for c in build_grid({"layers": [10, 100], "width": 64}).configs]
['layers=10', 'layers=100']
"""

from .grid import Grid, Task, build_grid, read_grid
from .run import SweepResult, sweep
from .store import read_results

__all__ = ["Grid", "SweepResult", "Task", "build_grid", "read_grid", "read_results", "sweep"]

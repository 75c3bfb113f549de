"""What a dask worker runs for a sweep (imported on the workers)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
from threadpoolctl import threadpool_limits

from ..montecarlo import memory
from ..montecarlo.run import replicate_rows
from ..spec import expand


def task_frame(options: Mapping[str, Any], start: int, stop: int) -> pd.DataFrame:
    """Replicates ``start .. stop - 1`` of one configuration: the rows
    ``varprop.simulate`` gives for them (layers.csv's columns after the
    label), made by the same function (tests/test_sweep.py holds the two
    equal, bit for bit)."""
    (config,) = expand(dict(options))
    (plan,) = memory.check([config])  # this task's table is all it holds
    frame, _ = replicate_rows(config.spec, range(start, stop), plan)
    frame["fan_in"] = frame["fan_in"].astype("Int64")
    frame["fan_out"] = frame["fan_out"].astype("Int64")
    return frame


def run_task(options: Mapping[str, Any], start: int, stop: int) -> Any:
    """The function a worker runs: :func:`task_frame` as an Arrow table (made
    here, on the workers, rather than by the driver), with the worker's BLAS
    pinned to one thread for good (threadpoolctl's context, entered and left
    by tasks on several threads of one worker, could restore another thread
    count under a running task)."""
    import pyarrow as pa

    threadpool_limits(1, user_api="blas")
    return pa.Table.from_pandas(task_frame(options, start, stop), preserve_index=False)

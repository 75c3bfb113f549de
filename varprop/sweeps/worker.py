"""What a dask worker runs for a sweep (imported on the workers)."""

from __future__ import annotations

import json
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


def train_frames(options: Mapping[str, Any], start: int, stop: int) -> tuple[pd.DataFrame, pd.DataFrame,
                                                                               dict[str, Any]]:
    """Replicates ``start .. stop - 1`` of one training configuration: the
    rows of ``varprop.train``'s history and per-layer tables for them
    (history.csv's and layers_over_training.csv's columns after the label
    and the compared options), made by the same function on one thread
    (tests/test_sweep_train.py holds them equal, bit for bit), and what the
    report needs to know of the run (its options, the data, steps per epoch)."""
    from ..parallel import SERIAL
    from ..train import loop

    (config,), run, dataset = loop.resolve(options)
    history: list[dict[str, Any]] = []
    layers: list[dict[str, Any]] = []
    for replicate in range(start, stop):
        h, l = loop.train_replicate(config, replicate, run, dataset, SERIAL)
        history += h
        layers += l
    n_eval = min(loop.EVAL_SAMPLES, dataset.n_train)
    meta = {"options": config.options(),
            "run": {"epochs": run.epochs, "seed": run.seed, "record_every": run.record_every, "dtype": run.dtype,
                    "data": run.data},
            "data": {"name": dataset.name, "n_train": dataset.n_train, "n_test": dataset.n_test,
                     "top_test_share": dataset.top_test_share,
                     "n_features": dataset.n_features, "eval_samples": n_eval},
            "probe_samples": loop.probe_size(n_eval, config.batch_size),
            "steps_per_epoch": loop.steps_per_epoch(dataset.n_train, config.batch_size)}
    return pd.DataFrame(history), pd.DataFrame(layers), meta


def run_task(options: Mapping[str, Any], start: int, stop: int, command: str = "simulate") -> Any:
    """The function a worker runs: :func:`task_frame` as an Arrow table, or
    for a train task :func:`train_frames` as ``{"history": table, "layers":
    table}`` (the run's facts in the history table's ``varprop_train``
    metadata), made here, on the workers, rather than by the driver; the
    worker's BLAS pinned to one thread for good (threadpoolctl's context,
    entered and left by tasks on several threads of one worker, could
    restore another thread count under a running task)."""
    import pyarrow as pa

    threadpool_limits(1, user_api="blas")
    if command == "train":
        history, layers, meta = train_frames(options, start, stop)
        table = pa.Table.from_pandas(history, preserve_index=False)
        table = table.replace_schema_metadata({**table.schema.metadata, b"varprop_train": json.dumps(meta).encode()})
        return {"history": table, "layers": pa.Table.from_pandas(layers, preserve_index=False)}
    return pa.Table.from_pandas(task_frame(options, start, stop), preserve_index=False)

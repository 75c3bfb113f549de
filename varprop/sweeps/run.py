"""Running a sweep on dask.distributed: one task per configuration (or block
of its replicates), results written as they arrive, resumable.

A task computes exactly what ``varprop simulate`` (or, in a grid with
``command = "train"``, ``varprop train``) computes for its configuration:
replicate r of a configuration comes from the seed tree's nodes (seed; r,
layer, role) alone (montecarlo.run_replicate; a training run's initial
weights and batch order likewise, train.loop), so its numbers are the same
whichever worker runs it, in whatever order, however often. Workers run
BLAS on one thread (threadpoolctl), as simulate and train do.

Faults. A task that raises is recorded with its reason in
``DIR/_failures.json`` and the others go on. A worker process that dies
takes its running task with it; the scheduler runs it again on another worker
(up to ``distributed.scheduler.allowed-failures`` deaths, 3 by default, after
which the task fails with KilledWorker). A driver killed mid-sweep loses
nothing written: results are renamed into place whole, and a rerun skips
them. Ctrl-C cancels the running tasks and keeps the finished ones.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import SpecError
from ..parallel import available_cores
from .grid import Grid, build_grid, read_grid
from .store import SweepDir, read_results, write_text

INSTALL = "pip install 'varprop[sweep]'"
Progress = Callable[[int, int], None]  # (tasks done, of total)


def require() -> None:
    """SpecError naming the extra to install when dask.distributed or pyarrow is missing."""
    missing = [name for name in ("distributed", "pyarrow") if importlib.util.find_spec(name) is None]
    if missing:
        raise SpecError("GRID", f"sweeps need {' and '.join(missing)}: {INSTALL}")


# --- the driver ---------------------------------------------------------------------

@dataclass
class SweepResult:
    """What a sweep did: ``tasks`` in its grid, ``reused`` (finished before),
    ``ran`` now, ``failed`` (key -> label and reason); ``read()`` gives every
    finished row (of a train sweep: ``read("history")`` or ``read("layers")``)."""

    out: Path
    tasks: int
    reused: int
    ran: int
    failed: dict[str, dict[str, Any]] = field(default_factory=dict)
    elapsed_s: float = 0.0
    workers: int = 0  # threads running tasks
    processes: int = 0  # the worker processes they run in
    dashboard: str | None = None
    report: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.failed and self.reused + self.ran == self.tasks

    def read(self, table: str | None = None) -> pd.DataFrame:
        """Every finished row, as ``pandas.read_parquet(out)`` reads them (a
        train sweep's: ``out / table``, history by default), in grid order."""
        return read_results(self.out, table=table)


def sweep(grid: str | os.PathLike[str] | Mapping[str, Any] | Grid, client: Any = None, *,
          out: str | os.PathLike[str], workers: int | None = None, threads_per_worker: int = 1,
          scheduler: str | None = None, replicates_per_task: int | None = None, extend: bool = False,
          progress: Progress | None = None, report: bool = True,
          on_start: Callable[[SweepResult], None] | None = None) -> SweepResult:
    """Run every task of ``grid`` not yet finished in ``out`` on dask.distributed.

    ``grid`` is a TOML file's path, the same as a dict, or a built Grid.
    Runs on ``client`` when given, else on a scheduler at ``scheduler``, else
    on a LocalCluster of ``workers`` processes (default: one per core) of
    ``threads_per_worker`` threads. ``replicates_per_task`` cuts each
    configuration's replicates into tasks of that many (default: one task per
    configuration; a train grid's: one per replicate). ``extend`` adds the grid's tasks to a sweep directory
    holding another grid. ``progress(done, total)`` follows the tasks;
    ``on_start`` sees the result object once the work is known (before
    anything runs). Raises KeyboardInterrupt after a Ctrl-C, once the
    finished tasks are safely written.

    Example (from a script: worker processes import its main module, so
    guard the call with ``if __name__ == "__main__":``)::

        res = sweep({"layers": [2, 3], "width": 8, "samples": 16}, out="sweeps/s", workers=2)
        res.read().groupby("config").size().to_dict()   # {'layers=2': 3, 'layers=3': 4}
    """
    require()
    start_time = time.perf_counter()
    text = None
    if isinstance(grid, (str, os.PathLike)):
        text, grid = _from_file(Path(grid))
    elif not isinstance(grid, Grid):
        grid = build_grid(grid)
    if client is not None and (scheduler is not None or workers is not None):
        raise SpecError("scheduler" if scheduler is not None else "workers", "applies when no client is given")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise SpecError("workers", f"expected a positive integer, got {workers!r}")
    if not isinstance(threads_per_worker, int) or threads_per_worker < 1:
        raise SpecError("threads_per_worker", f"expected a positive integer, got {threads_per_worker!r}")
    _check_memory(grid)
    tasks = grid.tasks(replicates_per_task)
    out = Path(out)
    with SweepDir.open(out, grid.source, grid.keys, tasks, replicates_per_task, extend, grid.command) as store:
        if text is not None:
            write_text(store.dir, text, len(store.manifest["grids"]))
        done = store.finished()
        todo = [store.tasks[k] for k in store.tasks if k not in done]
        result = SweepResult(out, len(store.tasks), len(done), 0)
        if todo:
            try:
                _run(store, todo, result, client, scheduler, workers, threads_per_worker, progress, on_start)
            except BaseException:
                # Ctrl-C can land between a result's rename and its count: the files say what is kept.
                result.ran = sum(map(store.complete, store.tasks)) - result.reused
                store.discard()
                raise
        elif on_start is not None:
            on_start(result)
        result.failed = {k: {"label": store.failures[k]["label"], "error": store.failures[k]["error"]}
                         for k in store.tasks if k in store.failures}  # in grid order, not order of failing
        result.elapsed_s = time.perf_counter() - start_time
        if report and result.reused + result.ran > 0:
            from ..report.sweep import write_report

            try:
                result.report = write_report(out, store.manifest)
            except OSError as exc:
                raise SpecError("out", f"the results are in {out}, but its report could not be written "
                                f"({exc.strerror or exc}); redraw it with varprop report {out}") from None
    return result


def _from_file(path: Path) -> tuple[str, Grid]:
    """A grid file's text and grid; an error in it says which file."""
    if not path.is_file():
        raise SpecError("GRID", f"no such file: {path}")
    source = read_grid(path)
    try:
        return path.read_text(), build_grid(source)
    except SpecError as exc:
        raise SpecError(exc.option, f"{str(exc).split(': ', 1)[1]} (in {path})") from None


def _check_memory(grid: Grid) -> None:
    """Refuse before any work a configuration that cannot fit the memory
    it was given (--max-memory; without it, each worker judges its own)."""
    from ..montecarlo import memory

    if grid.command != "simulate":
        return
    for config in grid.configs:
        if config.spec.max_memory is not None:
            memory.check([config])


def _run(store: SweepDir, todo: list[dict[str, Any]], result: SweepResult, client: Any, scheduler: str | None,
         workers: int | None, threads_per_worker: int, progress: Progress | None,
         on_start: Callable[[SweepResult], None] | None) -> None:
    from dask.distributed import as_completed

    from .worker import run_task

    own = client is None
    cluster = None
    if own:
        client, cluster = _connect(scheduler, workers, threads_per_worker)
    futures: dict[str, Any] = {}
    kill_at = _kill_at()
    failed = 0  # in this run (the failures file also holds those of the runs before, rerun now)
    try:
        info = client.scheduler_info()
        result.workers = sum(w.get("nthreads", 1) for w in info.get("workers", {}).values())
        result.processes = len(info.get("workers", {}))
        # a local cluster lists its dashboard service without bokeh, which serves nothing then
        if "dashboard" in info.get("services", {}) and (cluster is None or importlib.util.find_spec("bokeh")):
            result.dashboard = client.dashboard_link
        if on_start is not None:
            on_start(result)
        total = len(store.tasks)
        if progress is not None:
            progress(result.reused, total)
        for task in todo:
            futures[f"varprop-sweep-{task['key']}"] = client.submit(
                run_task, task["options"], *task["replicates"], store.command, key=f"varprop-sweep-{task['key']}",
                pure=False)
        for future in as_completed(list(futures.values())):
            task = store.tasks[future.key.removeprefix("varprop-sweep-")]
            if future.status == "finished":
                try:
                    table = future.result()
                except Exception as exc:  # lost between finishing and being fetched: a failure like any
                    _safely(store, store.fail, task["key"], _reason(exc), traceback.format_exc())
                    failed += 1
                else:
                    kill = kill_at is not None and result.ran + 1 == kill_at
                    _safely(store, store.add, task, table, before_rename=_kill_self if kill else None)
                    result.ran += 1
            else:
                exc = future.exception()
                tb = "".join(traceback.format_exception(type(exc), exc, future.traceback())) if exc else ""
                _safely(store, store.fail, task["key"], _reason(exc), tb)
                failed += 1
            future.release()
            if progress is not None:
                progress(result.reused + result.ran + failed, total)
    finally:
        for future in futures.values():
            if not future.done():
                future.cancel()
        if own:
            _close(client, cluster)


def _safely(store: SweepDir, write: Callable[..., None], *args: Any, **kwargs: Any) -> None:
    try:
        write(*args, **kwargs)
    except OSError as exc:
        raise SpecError("out", f"cannot write to {store.dir} ({exc.strerror or exc}); the finished tasks are "
                        "kept: rerun to go on") from None


def _reason(exc: BaseException | None) -> str:
    if exc is None:
        return "cancelled"
    text = " ".join(str(exc).split())
    if isinstance(exc, SpecError):  # "--init: ...": says what it is
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_at() -> int | None:
    """Tests only: VARPROP_SWEEP_KILL_AT=k kills the driver with SIGKILL while
    it writes the k-th result (after the temporary file, before the rename)."""
    value = os.environ.get("VARPROP_SWEEP_KILL_AT")
    return int(value) if value else None


CONNECT_TIMEOUT = "10s"  # how long a --scheduler may take to answer


def _connect(scheduler: str | None, workers: int | None, threads_per_worker: int) -> tuple[Any, Any]:
    from dask.distributed import Client

    from .signals import IgnoreSigint

    if scheduler:
        try:
            return Client(scheduler, timeout=CONNECT_TIMEOUT), None
        except (OSError, TimeoutError, ValueError) as exc:
            raise SpecError("scheduler", f"cannot reach a dask scheduler at {scheduler} ({exc})") from None
    dashboard = ":8787" if importlib.util.find_spec("bokeh") is not None else None
    # Workers spawned while SIGINT is ignored inherit that (see IgnoreSigint, which also covers the
    # workers a nanny restarts later).
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        with warnings.catch_warnings():  # the link printed says which port the dashboard took
            warnings.filterwarnings("ignore", message="Port .* is already in use", category=UserWarning)
            cluster = local_cluster(workers or available_cores(), threads_per_worker, dashboard)
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
    client = Client(cluster)
    client.register_plugin(IgnoreSigint())
    return client, cluster


def local_cluster(workers: int, threads_per_worker: int = 1, dashboard: str | None = None) -> Any:
    """The LocalCluster a sweep starts: ``workers`` processes of
    ``threads_per_worker`` threads, without dask's MALLOC_TRIM_THRESHOLD_.

    dask sets that variable for the worker processes it spawns (and in this
    process's environment, so processes started later inherit it too) to
    return freed memory to the system sooner. Setting it turns off glibc's
    adaptive mmap threshold, so each array of a megabyte or more the engine
    allocates is a fresh mapping: on 512-wide layers that took 1.4x the CPU
    time of the same task in a plain process (twice the page faults). A
    variable set in the user's own environment is still passed on.
    """
    import dask
    from dask.distributed import LocalCluster

    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        return LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, processes=True,
                            dashboard_address=dashboard, silence_logs=logging.CRITICAL)


def _close(client: Any, cluster: Any) -> None:
    # Stopping workers that were running cancelled tasks logs warnings that say nothing to a user.
    quiet = [logging.getLogger(n) for n in ("distributed", "tornado")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.CRITICAL)
    try:
        client.close()
        if cluster is not None:
            cluster.close()
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)

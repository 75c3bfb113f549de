"""``varprop sweep``: a grid of configurations on dask.distributed, resumable."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import click

from ..errors import SpecError
from ..options import parse_pos_int
from . import Interrupted


@click.command("sweep")
@click.argument("grid", metavar="GRID.toml")
@click.option("--out", required=True, metavar="DIR",
              help="sweep directory: new, empty, or one this grid already ran in (it goes on from there)")
@click.option("--scheduler", default=None, metavar="ADDR",
              help="a running dask scheduler, e.g. tcp://host:8786 [default: a local cluster]")
@click.option("--workers", default=None, metavar="N", help="local worker processes [default: one per core]")
@click.option("--threads-per-worker", default="1", metavar="N",
              help="tasks each local worker runs at once [default: 1]")
@click.option("--replicates-per-task", default=None, metavar="N",
              help="cut each configuration's replicates into tasks of N [default: one task per configuration; "
                   "a train grid's: one per replicate]")
@click.option("--extend", is_flag=True, help="add this grid's tasks to a sweep directory holding another grid")
def sweep_cmd(grid: str, out: str, scheduler: str | None, workers: str | None, threads_per_worker: str,
              replicates_per_task: str | None, extend: bool) -> None:
    """Run every configuration of GRID.toml (simulate's options, or train's with command = "train";
    a list means every value) on dask.distributed, one Parquet file per task in DIR, and write
    DIR/_report/.

    \b
    A rerun of the same command skips finished tasks and reruns missing or
    broken ones. Read the results with pandas.read_parquet(DIR); a train
    sweep's with pandas.read_parquet(DIR/history) and DIR/layers.
    \b
    Example GRID.toml:
      layers = [10, 30, 100]
      width = [64, 256]
      activation = ["tanh", "relu"]
      init = "fan_in"
      gain = [1.0, 1.5]          # sigma_w (fan_in init, normal weights)
      bias_std = [0.0, 0.3]      # sigma_b
      replicates = 4
      [[exclude]]
      activation = "relu"
      gain = 1.5
    \b
    A train grid (varprop train's options; one task per replicate):
      command = "train"
      activation = ["sigmoid", "relu"]
      bn_count = [0, 1]
      optimizer = ["sgd-nesterov", "adam"]
      epochs = 5
      replicates = 3
    """
    from ..sweeps import run

    run.require()
    if scheduler is not None and workers is not None:
        raise SpecError("workers", "starts a local cluster; it cannot be combined with --scheduler")
    if scheduler is not None and threads_per_worker != "1":
        raise SpecError("threads_per_worker", "applies to a local cluster; it cannot be combined with --scheduler")
    n_workers = parse_pos_int(workers, "workers") if workers is not None else None
    threads = parse_pos_int(threads_per_worker, "threads_per_worker")
    per_task = parse_pos_int(replicates_per_task, "replicates_per_task") if replicates_per_task is not None else None
    state: dict[str, Any] = {}
    bar = _Bar()

    def started(result: run.SweepResult) -> None:
        state["result"] = result
        todo = result.tasks - result.reused
        n, threads = result.processes, result.workers
        where = "" if not n else (f"on {n} worker process{'es' if n > 1 else ''}"
                                  + (f" ({threads} threads)" if threads != n else ""))
        click.echo(f"sweep: {result.tasks} tasks in {out}: {result.reused} finished before, {todo} to run {where}"
                   .rstrip())
        if result.dashboard:
            click.echo(f"dashboard: {result.dashboard}")
        bar.start(todo)

    try:
        result = run.sweep(grid, out=out, scheduler=scheduler, workers=n_workers, threads_per_worker=threads,
                           replicates_per_task=per_task, extend=extend, on_start=started,
                           progress=lambda done, total: bar.update(done - state["result"].reused
                                                                   if "result" in state else 0))
    except SpecError:
        bar.close()
        raise
    except (KeyboardInterrupt, Interrupted) as exc:  # Ctrl-C, SIGTERM, SIGHUP (varprop.cli's handler)
        bar.close()
        res = state.get("result")
        if res is None or not Path(out).exists():
            click.echo("varprop: interrupted before any task finished; nothing written", err=True)
        else:
            click.echo(f"varprop: interrupted: {res.reused + res.ran} of {res.tasks} tasks finished and kept in "
                       f"{out}; rerun the same command to go on", err=True)
        sys.exit(128 + getattr(exc, "signum", signal.SIGINT))
    bar.close()
    click.echo(f"sweep: {result.ran} ran, {result.reused} reused, {len(result.failed)} failed; "
               f"{result.reused + result.ran} of {result.tasks} tasks finished ({result.elapsed_s:.1f} s)")
    if result.report is not None:
        click.echo(f"report: {result.report}  (report.md beside it)")
    tables = [str(Path(out) / t) for t in ("history", "layers")] if (Path(out) / "history").is_dir() else [out]
    click.echo("results: " + ", ".join(f"pandas.read_parquet({str(t)!r})" for t in tables))
    if result.failed:
        first = next(iter(result.failed.values()))
        click.echo(f"varprop: error: {len(result.failed)} of {result.tasks} tasks failed (first: {first['label']}: "
                   f"{_short(first['error'])}); reasons in {Path(out) / '_failures.json'}; rerun to retry them",
                   err=True)
        sys.exit(1)


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


class _Bar:
    """A click progress bar (tasks done/total, ETA) when stderr is a terminal."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.pos = 0

    def start(self, total: int) -> None:
        if sys.stderr.isatty() and total > 0 and self.bar is None:
            self.bar = click.progressbar(length=total, label="tasks", show_pos=True, show_eta=True, file=sys.stderr)
            self.bar.__enter__()

    def update(self, done: int) -> None:
        if self.bar is not None and done > self.pos:
            self.bar.update(done - self.pos)
            self.pos = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def redraw(directory: Path) -> Path:
    """``varprop report DIR`` for a sweep directory: DIR/_report/ drawn again
    from its results (refused while a sweep runs in DIR)."""
    from ..sweeps import run
    from ..sweeps.store import SweepDir

    run.require()
    with SweepDir.lock(directory):
        from ..report.sweep import write_report

        try:
            return write_report(directory)
        except (ValueError, KeyError, OSError) as exc:
            raise SpecError("RUN_DIR", f"cannot redraw the sweep in {directory} ({type(exc).__name__}: {exc})"
                            ) from None

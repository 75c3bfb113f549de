"""varprop sweep on dask.distributed: overhead per task, and speed-up on 2 workers.

    python benchmarks/bench_sweep.py            # full run (about 10 minutes), writes benchmarks/RESULTS-sweep.md
    python benchmarks/bench_sweep.py --quick    # about two minutes (20 tasks of 0.5 s), writes nothing
    python benchmarks/bench_sweep.py --out FILE
    python benchmarks/bench_sweep.py --tasks 40 --repeats 2   # fewer 1-second tasks (a busy machine)

Measured:

- overhead per task: 200 tiny tasks (1 layer of width 4) through
  ``varprop.sweep`` on a running 2-worker LocalCluster (cluster start
  excluded), result files written; wall time per task, beside the tasks'
  own compute time in this process;
- whole process: ``varprop sweep`` of one tiny task from the shell
  (interpreter, imports, cluster start and stop, report), and its rerun
  with everything finished (no cluster started);
- speed-up: 200 tasks of about 1 second (one configuration, seeds 0..199,
  depth calibrated here) as a sweep on 2 workers against the same tasks one
  after another in one process (each computed and written as a Parquet
  file, BLAS on one thread as in the sweep), and against the peer a user
  would write instead, a joblib loop (``Parallel(n_jobs=2)``, loky
  processes). The three contenders are interleaved, in turns A B C, C B A, ...
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dask  # noqa: E402
import joblib  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402  (comes with distributed)
from dask.distributed import Client  # noqa: E402

import varprop  # noqa: E402
from benchmarks.machine import describe  # noqa: E402
from varprop.sweeps.grid import build_grid  # noqa: E402
from varprop.sweeps.run import local_cluster  # noqa: E402
from varprop.sweeps.worker import task_frame  # noqa: E402

TINY = {"layers": 1, "width": 4, "samples": 4}
HEAVY = {"width": 512, "samples": 512, "activation": "tanh"}


def one_task(options: dict, out: str, name: str) -> None:
    """A task as a loop would run it: computed, then written as Parquet."""
    task_frame(options, 0, options.get("replicates", 1)).to_parquet(Path(out) / f"{name}.parquet")


def calibrate(seconds: float) -> int:
    """The depth at which one HEAVY task takes about ``seconds`` here."""
    base = {**HEAVY, "layers": 20, "seed": 0}
    task_frame(base, 0, 1)
    t = min(_timed(lambda: task_frame(base, 0, 1)) for _ in range(3))
    return max(2, round(20 * seconds / t))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _cpu() -> dict[int, float]:
    """CPU seconds (user + system) so far of this process and of every process it
    started (the LocalCluster's workers, joblib's), by process id."""
    me = psutil.Process()
    out = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.Error:  # ended meanwhile
            continue
        out[p.pid] = t.user + t.system
    return out


def _measured(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process tree) of ``fn()``: each process's
    CPU time at the end less its time at the start (a process that ends meanwhile,
    such as an idle joblib worker timing out, drops out instead of subtracting)."""
    before = _cpu()
    wall = _timed(fn)
    after = _cpu()
    return wall, sum(t - before.get(pid, 0.0) for pid, t in after.items())


def overhead(client: Client, n: int, repeats: int) -> dict:
    grid = {**TINY, "seed": list(range(n))}
    opts = [t.options for t in build_grid(grid).tasks()]
    compute = statistics.median(_timed(lambda: [task_frame(o, 0, 1) for o in opts]) for _ in range(repeats)) / n
    walls, cpus = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            wall, cpu = _measured(lambda: varprop.sweep(grid, client, out=Path(tmp) / "s", report=False))
        walls.append(wall / n)
        cpus.append(cpu / n)
    return {"tasks": n, "wall_per_task_ms": 1e3 * statistics.median(walls), "walls_ms": [1e3 * w for w in walls],
            "cpu_per_task_ms": 1e3 * statistics.median(cpus), "compute_per_task_ms": 1e3 * compute}


def whole_process() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        grid = Path(tmp) / "grid.toml"
        grid.write_text("layers = 1\nwidth = 4\nsamples = 4\n")
        cmd = [sys.executable, "-m", "varprop", "sweep", str(grid), "--out", str(Path(tmp) / "o"), "--workers", "2"]
        first = _timed(lambda: subprocess.run(cmd, check=True, capture_output=True))
        again = _timed(lambda: subprocess.run(cmd, check=True, capture_output=True))
    return {"first_s": first, "rerun_s": again}


def speedup(client: Client, n: int, depth: int, seconds: float, repeats: int) -> dict:
    grid = {**HEAVY, "layers": depth, "seed": list(range(n))}
    opts = [t.options for t in build_grid(grid).tasks()]
    names = ("one process, one after another", "varprop sweep, 2 workers", "joblib loop, 2 processes")
    times: dict[str, list[float]] = {name: [] for name in names}
    cpus: dict[str, list[float]] = {name: [] for name in names}
    loads: dict[str, list[float]] = {name: [] for name in names}
    with joblib.Parallel(n_jobs=2) as parallel:
        parallel(joblib.delayed(task_frame)(o, 0, 1) for o in opts[:2])  # start loky's workers first
        for r in range(repeats):
            for name in (names if r % 2 == 0 else names[::-1]):  # A B C, C B A, ...: drift hits all alike
                with tempfile.TemporaryDirectory() as tmp:
                    if name.startswith("one process"):
                        t, c = _measured(lambda: [one_task(o, tmp, str(i)) for i, o in enumerate(opts)])
                    elif name.startswith("varprop"):
                        t, c = _measured(lambda: varprop.sweep(grid, client, out=Path(tmp) / "s", report=False))
                    else:
                        t, c = _measured(lambda: parallel(joblib.delayed(one_task)(o, tmp, str(i))
                                                          for i, o in enumerate(opts)))
                times[name].append(t)
                cpus[name].append(c)
                loads[name].append(os.getloadavg()[0])
                print(f"  {name}: {t:.1f} s, {c:.1f} CPU s", flush=True)
    seq = times[names[0]]
    return {"tasks": n, "depth": depth, "seconds": seconds, "times": times, "cpus": cpus, "loads": loads,
            "speedup": [s / v for s, v in zip(seq, times[names[1]])],
            "vs_joblib": [v / j for v, j in zip(times[names[1]], times[names[2]])]}


def load() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def report(res: dict, args: argparse.Namespace) -> str:
    o, w, s = res["overhead"], res["whole"], res["speedup"]
    names = list(s["times"])
    seq, seq_cpu = statistics.median(s["times"][names[0]]), statistics.median(s["cpus"][names[0]])
    per_task = seq_cpu / s["tasks"]
    sweep_cpu = statistics.median(s["cpus"][names[1]])
    lines = [
        "# Sweep benchmark results", "",
        f"Command: `python benchmarks/bench_sweep.py{' '.join(['', *sys.argv[1:]])}`; machine: "
        f"{describe()}, dask "
        f"{dask.__version__}, joblib {joblib.__version__}, numpy {np.__version__}. Load average (1, 5, 15 min) "
        f"before the run: {res['load_before']}; after: {res['load_after']}.", "",
        "## Targets", "",
        "| measure | value | repeats | target |", "|---|---:|---:|---|",
        f"| overhead per task on a running 2-worker LocalCluster, wall (ms) | {o['wall_per_task_ms']:.1f} | "
        f"{', '.join(f'{x:.1f}' for x in o['walls_ms'])} | <= 50 |",
        f"| {s['tasks']} tasks of {per_task:.2f} CPU s: one process / varprop sweep on 2 workers, wall | "
        f"{statistics.median(s['speedup']):.2f}x | {', '.join(f'{x:.2f}' for x in s['speedup'])} | >= 1.7x |",
        f"| the same: CPU seconds of the sweep (driver and workers) / the loop's | {sweep_cpu / seq_cpu:.3f} | | "
        "(2 cores: speed-up <= 2 / this) |",
        "", "## Times", "",
        "CPU: user + system seconds of the benchmark's process and every process it started. *cores*: CPU / wall, "
        "the cores the contender actually got.", "",
        "| contender | wall (s), median | repeats (s) | speed-up over one process | CPU (s) | cores | "
        "load average (1 min) at the end of each repeat |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name in names:
        ts, cs = s["times"][name], s["cpus"][name]
        lines.append(f"| {name} | {statistics.median(ts):.1f} | {', '.join(f'{t:.1f}' for t in ts)} | "
                     f"{seq / statistics.median(ts):.2f}x | {statistics.median(cs):.1f} | "
                     f"{statistics.median(c / t for c, t in zip(cs, ts)):.2f} | "
                     f"{', '.join(f'{x:.1f}' for x in s['loads'][name])} |")
    lines += [
        "",
        f"varprop sweep / joblib loop (wall): {', '.join(f'{x:.2f}' for x in s['vs_joblib'])} per repeat.", "",
        f"Tasks: one configuration ({', '.join(f'{k} {v}' for k, v in HEAVY.items())}, {s['depth']} layers, "
        f"calibrated here to about {s['seconds']:g} s) with seeds 0..{s['tasks'] - 1}: one task each. Every "
        "contender computes the same rows (`varprop.sweeps.worker.task_frame`, BLAS on one thread) and writes "
        "one Parquet file per task; the sweep also writes its manifest and checks its directory.", "",
        f"Overhead: {o['tasks']} tasks of one layer of width 4 (their own compute: {o['compute_per_task_ms']:.1f} ms "
        f"each in this process) through `varprop.sweep` on a 2-worker LocalCluster already running: wall time per "
        f"task {o['wall_per_task_ms']:.1f} ms, CPU time per task {o['cpu_per_task_ms']:.1f} ms (driver and "
        "workers: submitting, scheduling, running, sending the rows back, writing the Parquet file, the "
        "driver's bookkeeping).", "",
        f"Whole process: `varprop sweep` of one tiny task from the shell takes {w['first_s']:.1f} s (interpreter, "
        f"imports, starting and stopping 2 worker processes, the report), and {w['rerun_s']:.1f} s to rerun "
        "with the task finished (no cluster is started; the report is redrawn).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="results file [default: benchmarks/RESULTS-sweep.md; --quick: none]")
    ap.add_argument("--tasks", type=int, default=None, help="tasks of the speed-up grid [default: 200; --quick: 20]")
    ap.add_argument("--repeats", type=int, default=None, help="repeats of the speed-up [default: 2; --quick: 1]")
    args = ap.parse_args()
    n, seconds, repeats = (20, 0.5, 1) if args.quick else (200, 1.0, 2)
    n, repeats = args.tasks or n, args.repeats or repeats
    res = {"load_before": load()}
    depth = calibrate(seconds)
    print(f"task depth {depth} (about {seconds} s a task)", flush=True)
    with local_cluster(2) as cluster, Client(cluster) as client:  # the cluster varprop sweep starts
        client.run(lambda: task_frame({**TINY, "seed": 0}, 0, 1))  # the workers' first imports, outside the timing
        res["overhead"] = overhead(client, 200, 3)
        print(f"overhead {res['overhead']['wall_per_task_ms']:.1f} ms a task", flush=True)
        res["speedup"] = speedup(client, n, depth, seconds, repeats)
    res["whole"] = whole_process()
    res["load_after"] = load()
    text = report(res, args)
    print(text)
    out = args.out or (None if args.quick else Path(__file__).with_name("RESULTS-sweep.md"))
    if out:
        Path(out).write_text(text)


if __name__ == "__main__":
    main()

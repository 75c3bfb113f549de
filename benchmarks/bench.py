"""Speed and memory of varprop against the peers a user would reach for: issue 18's ratios.

    python benchmarks/bench.py            # full run (~15 minutes on 2 cores), writes benchmarks/RESULTS.md
    python benchmarks/bench.py --quick    # a few minutes; prints, writes nothing
    python benchmarks/bench.py --quick --results quick.md   # ... into quick.md
    python benchmarks/bench.py --json out.json

The committed RESULTS.md is replaced only by a full run (or by --write): a
quick run's fewer repeats and shallower large case would pass for the real numbers.

Every group of contenders runs interleaved (A B C ... A B C ...), so drift of
a shared machine hits all of them alike; a ratio is taken within each repeat
(the two ran seconds apart) and reported as its median and range over the
repeats. Whole-process times are a fresh child process from spawn to exit
(start-up, imports, work and output files: varprop's full report, the peers'
CSV of their statistics); its peak RSS comes with it (os.wait4). The peers are
in benchmarks/peers.py. Everyone uses every core: varprop's threads, PyTorch's
intra-op threads, NumPy's BLAS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import varprop  # noqa: E402
import varprop.theory  # noqa: E402
from benchmarks.machine import describe, settle  # noqa: E402
from peers import numpy_loop, torch_autograd, torch_hooks  # noqa: E402

try:
    import torch
except ImportError:  # the peer is optional
    torch = None

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
PEERS_PY = str(Path(__file__).with_name("peers.py"))


def varprop_command() -> list[str]:
    """The installed console script beside this Python, else ``python -m varprop``."""
    script = Path(sys.executable).with_name("varprop")
    return [str(script)] if script.exists() else [sys.executable, "-m", "varprop"]


# A child forked from this (large) process would report this process's peak RSS as its own (Linux keeps
# the high-water mark across fork and exec): a small launcher starts the command and reports its child's.
LAUNCHER = """
import os, subprocess, sys, time
t = time.perf_counter()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
err = p.stderr.read()
_, status, usage = os.wait4(p.pid, 0)
print(time.perf_counter() - t, usage.ru_maxrss, os.waitstatus_to_exitcode(status))
sys.stderr.write(err.decode()[-2000:])
"""


def run_child(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds of a child process from spawn to exit, and its peak RSS (MiB)."""
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], capture_output=True, text=True, env=ENV)
    seconds, rss_kib, code = proc.stdout.split()
    if int(code) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({code}): {proc.stderr}")
    return float(seconds), int(rss_kib) / 1024


def engine_peak_mib(code: str) -> float:
    """Peak RSS (MiB) of a fresh Python running ``code``, as the child itself reports it (VmHWM)."""
    probe = code + "\nprint([int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True, env=ENV).stdout
    return int(out.split()[-1]) / 1024


def interleaved(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each case per repeat, run A B C ... A B C ...; a case returning
    a (seconds, ...) tuple reports its own time (a child process)."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            settle()
            t = time.perf_counter()
            out = fn()
            times[name].append(out[0] if isinstance(out, tuple) else time.perf_counter() - t)
    return times


# The engine timed in a process of its own, as the command runs it: this one has torch loaded, where varprop
# shares its work over threads alone (a fork is not safe beside torch's thread pools), not over forked
# processes (varprop/forked.py).
ENGINE_WORKER = """
import sys, time, varprop
sys.path.insert(0, sys.argv[1])
from peers import least_engine
width, depth, n, replicates = map(int, sys.argv[3:7])
spec = varprop.NetworkSpec.square(depth, width, init="fan_in")
run = {"varprop": lambda: varprop.simulate(spec, samples=n, replicates=replicates),
       "least": lambda: least_engine(width, depth, n, replicates)}[sys.argv[2]]
run()  # warm-up
for line in sys.stdin:
    t = time.perf_counter()
    run()
    print(time.perf_counter() - t, flush=True)
"""


def engine_worker(which: str, width: int, depth: int, n: int, replicates: int) -> Callable[[], tuple[float]]:
    """A contender that times an engine in a worker process without torch (kept for the run):
    ``varprop.simulate``, or ``least``, peers.least_engine, the least it could do."""
    proc = subprocess.Popen([sys.executable, "-c", ENGINE_WORKER, str(Path(__file__).parent), which, str(width),
                             str(depth), str(n), str(replicates)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)

    def run() -> tuple[float]:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("run\n")
        proc.stdin.flush()
        return (float(proc.stdout.readline()),)
    return run


def paired(times: dict[str, list[float]], num: str, den: str) -> tuple[float, float, float] | None:
    """Median and range over repeats of the ratio num / den within each repeat."""
    if num not in times or den not in times:
        return None
    r = sorted(a / b for a, b in zip(times[num], times[den]))
    return statistics.median(r), r[0], r[-1]


def one_blas_thread(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` with BLAS on one thread (small products run faster so on a busy machine)."""
    def run() -> None:
        with threadpool_limits(1, user_api="blas"):
            fn()
    return run


def floor_of(times: dict[str, list[float]], prefix: str) -> None:
    """Add ``prefix``: per repeat, the faster of its variants (BLAS's threads or one)."""
    variants = [v for k, v in times.items() if k.startswith(prefix + " (")]
    times[prefix] = [min(ts) for ts in zip(*variants)]


def floor_forward(width: int, depth: int, n: int, replicates: int) -> Callable[[], None]:
    """The same products as the forward pass of every replicate, weights drawn beforehand."""
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal((width, width), dtype=np.float32) * np.float32(width ** -0.5) for _ in range(depth)]
    x0 = rng.standard_normal((n, width), dtype=np.float32)

    def floor() -> None:
        for _ in range(replicates):
            x = x0
            for w in ws:
                x = x @ w
    return floor


def floor_backward(width: int, depth: int, n: int) -> Callable[[], None]:
    """Three products a layer: forward ``x W``, then ``g W^T`` and the weight gradient ``x^T g``."""
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal((width, width), dtype=np.float32) * np.float32(width ** -0.5) for _ in range(depth)]
    x0 = rng.standard_normal((n, width), dtype=np.float32)
    g0 = rng.standard_normal((n, width), dtype=np.float32)

    def floor() -> None:
        xs = [x0]
        for w in ws:
            xs.append(xs[-1] @ w)
        g = g0
        for w, x in zip(reversed(ws), reversed(xs[:-1])):
            x.T @ g
            g = g @ w.T
    return floor


def simulate_args(width: int, depth: int, n: int, replicates: int) -> list[str]:
    return ["simulate", "--layers", str(depth), "--width", str(width), "--samples", str(n), "--replicates",
            str(replicates), "--init", "fan_in", "--force"]


REPORT_CHILD = """
import json, sys, time, tempfile
from pathlib import Path
from varprop.spec import expand
from varprop.montecarlo.run import run_configs
from varprop import report
from varprop.parallel import available_cores
run = run_configs(expand({"layers": 100, "width": 100, "samples": 500, "replicates": 50, "init": "fan_in"}))
out = {"matplotlib loaded before": "matplotlib" in sys.modules}
for name, formats in [("full report, first", report.FORMATS), ("full report, again", report.FORMATS),
                      ("html only", ("html",)), ("csv and json only", ("csv", "json"))]:
    d = Path(tempfile.mkdtemp())
    t = time.perf_counter(); report.write(run, d, formats, available_cores()); out[name] = time.perf_counter() - t
print(json.dumps(out))
"""


def report_seconds(repeats: int) -> dict[str, list[float]]:
    """report.write of the seed case's 100-layer run, timed inside a fresh process
    (the first call imports matplotlib and draws from cold caches), its figures drawn in as
    many processes as there are cores, as ``varprop simulate`` draws them."""
    runs: dict[str, list] = {}
    for _ in range(repeats):
        out = json.loads(subprocess.run([sys.executable, "-c", REPORT_CHILD], check=True, capture_output=True,
                                        text=True, env=ENV).stdout.splitlines()[-1])
        for k, v in out.items():
            runs.setdefault(k, []).append(v)
    return runs


def theory_seconds(depth: int = 10_000) -> dict[str, float]:
    """Time of the theory's per-layer predictions for ``depth`` layers, per activation."""
    out = {}
    for act in ("linear", "relu", "tanh", "sigmoid", "gelu", "selu"):
        spec = varprop.RunSpec(varprop.NetworkSpec.square(depth, 100, init="fan_in", activation=act))
        t = time.perf_counter()
        varprop.theory.predict(spec)
        out[act] = time.perf_counter() - t
    return out


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


RESULTS = Path(__file__).with_name("RESULTS.md")


def destination(quick: bool, results: str | None, write: bool) -> Path | None:
    """Where the Markdown results go: ``--results PATH``; else the committed
    RESULTS.md on a full run or with ``--write``; else nowhere (printed only)."""
    if results:
        return Path(results)
    return RESULTS if write or not quick else None


def fmt(v: tuple[float, float, float] | None, digits: int = 2) -> tuple[str, str]:
    if v is None:
        return "not measured", ""
    return f"{v[0]:.{digits}f}", f"{v[1]:.{digits}f}-{v[2]:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and a shallower large case")
    ap.add_argument("--json", metavar="FILE", help="also write the measured times and ratios as JSON")
    ap.add_argument("--results", metavar="PATH", default=None,
                    help="write the Markdown results to PATH [default: benchmarks/RESULTS.md on a full run, "
                         "nowhere with --quick]")
    ap.add_argument("--write", action="store_true", help="write benchmarks/RESULTS.md even with --quick")
    args = ap.parse_args()
    results = destination(args.quick, args.results, args.write)
    repeats = 3 if args.quick else 5
    big_depth = 20 if args.quick else 100
    tmp = Path(tempfile.mkdtemp(prefix="varprop-bench-"))
    vp = varprop_command()
    loads = [load()]
    data: dict = {"machine": describe(), "numpy": np.__version__,
                  "torch": torch.__version__ if torch else None, "repeats": repeats, "groups": {}}
    groups = data["groups"]

    def child(cmd: list[str]) -> Callable[[], tuple[float, float]]:
        return lambda: run_child(cmd)

    def peer_child(name: str, w: int, d: int, n: int, r: int) -> Callable[[], tuple[float, float]]:
        out = tmp / (name if name.startswith("least-report") else f"{name}.csv")  # the floors write a report
        return child([sys.executable, PEERS_PY, name, str(w), str(d), str(n), str(r), str(out)])

    peaks: dict[str, float] = {}

    def with_peak(name: str, fn: Callable[[], tuple[float, float]]) -> Callable[[], tuple[float, float]]:
        def run() -> tuple[float, float]:
            seconds, peak = fn()
            peaks[name] = max(peaks.get(name, 0.0), peak)
            return seconds, peak
        return run

    # 1. The seed case, whole process: the command with its full report against the peers' scripts.
    seed = (100, 100, 500, 50)
    cases = {"varprop simulate (full report)": with_peak("seed: varprop simulate", child(
                 [*vp, *simulate_args(*seed), "--out", str(tmp / "seed")])),
             "varprop simulate --format csv,json": child(
                 [*vp, *simulate_args(*seed), "--format", "csv,json", "--out", str(tmp / "seed-csv")]),
             "numpy loop script": with_peak("seed: numpy loop script", peer_child("numpy-loop", *seed)),
             "least full-report script": peer_child("least-report", *seed),
             "least full-report script, NumPy and matplotlib alone": peer_child("least-report-lean", *seed)}
    if torch is not None:
        cases["pytorch + hooks script"] = with_peak("seed: pytorch + hooks script", peer_child("torch-hooks", *seed))
    groups["seed case, whole process"] = interleaved(cases, repeats)
    print("seed whole-process done", flush=True)

    # 2. The seed case in-process: the engine against the floor of its products.
    spec = varprop.NetworkSpec.square(seed[1], seed[0], init="fan_in")
    cases = {"varprop engine": engine_worker("varprop", *seed),
             "least engine": engine_worker("least", *seed),
             "varprop engine, in this process (torch loaded: threads only)":
                 lambda: varprop.simulate(spec, samples=seed[2], replicates=seed[3]),
             "floor (BLAS threads)": floor_forward(*seed),
             "floor (BLAS one thread)": one_blas_thread(floor_forward(*seed)),
             "numpy loop": lambda: numpy_loop(*seed)}
    if torch is not None:
        cases["pytorch + hooks"] = lambda: torch_hooks(*seed)
    groups["seed case, in-process"] = interleaved(cases, repeats)
    floor_of(groups["seed case, in-process"], "floor")
    print("seed in-process done", flush=True)

    # 3. Width 1024, 1024 samples, whole process and in-process.
    big = (1024, big_depth, 1024, 1)
    cases = {"varprop simulate (full report)": with_peak("big: varprop simulate", child(
                 [*vp, *simulate_args(*big), "--out", str(tmp / "big")])),
             "numpy loop script": peer_child("numpy-loop", *big)}
    if torch is not None:
        cases["pytorch + hooks script"] = with_peak("big: pytorch + hooks script", peer_child("torch-hooks", *big))
    groups["width 1024, whole process"] = interleaved(cases, repeats)
    print("big whole-process done", flush=True)
    big_spec = varprop.NetworkSpec.square(big[1], big[0], init="fan_in")
    cases = {"varprop forward": lambda: varprop.simulate(big_spec, samples=big[2]),
             "floor (BLAS threads)": floor_forward(*big),
             "floor (BLAS one thread)": one_blas_thread(floor_forward(*big)),
             "varprop forward+backward": lambda: varprop.simulate(big_spec, samples=big[2], backward=True),
             "floor3 (BLAS threads)": floor_backward(*big[:3]),
             "floor3 (BLAS one thread)": one_blas_thread(floor_backward(*big[:3]))}
    if torch is not None:
        cases["pytorch + hooks"] = lambda: torch_hooks(*big)
        cases["pytorch autograd + hooks"] = lambda: torch_autograd(*big)
    groups["width 1024, in-process"] = interleaved(cases, repeats)
    floor_of(groups["width 1024, in-process"], "floor")
    floor_of(groups["width 1024, in-process"], "floor3")
    print("big in-process done", flush=True)

    # 4. Start-up: --help, import, and the interpreter alone.
    no_mpl = "import sys, varprop; assert 'matplotlib' not in sys.modules and 'pandas' not in sys.modules"
    groups["start-up"] = interleaved({"varprop --help": child([*vp, "--help"]),
                                      "python -c 'import varprop'": child([sys.executable, "-c", no_mpl]),
                                      "python -c pass": child([sys.executable, "-c", "pass"])}, repeats)
    # 5. Report writing.
    data["report_s"] = report_s = report_seconds(repeats)
    # 6. Memory of the engine alone (fresh child each; width 256, 256 samples), as before.
    mem = "import varprop; varprop.simulate(varprop.NetworkSpec.square({d}, 256, init='fan_in'), samples=256{b})"
    memory = {"engine: imports only": engine_peak_mib("import varprop.montecarlo.run")}
    memory.update({f"engine: {k}": engine_peak_mib(mem.format(d=d, b=b))
                   for k, d, b in [("forward depth 10", 10, ""), ("forward depth 1000", 1000, ""),
                                   ("forward+backward depth 100", 100, ", backward=True")]})
    memory.update({f"whole process, {k}": v for k, v in peaks.items()})
    data["peak_rss_mib"] = memory
    data["theory_10000_layers_s"] = theory = theory_seconds()
    loads.append(load())
    data["load"] = loads
    shutil.rmtree(tmp, ignore_errors=True)

    g = groups
    seed_wp, seed_ip = g["seed case, whole process"], g["seed case, in-process"]
    big_wp, big_ip, start = g["width 1024, whole process"], g["width 1024, in-process"], g["start-up"]
    vs = "varprop simulate (full report)"
    checks = [
        ("seed case, whole process: varprop simulate / PyTorch + hooks script", paired(seed_wp, vs,
                                                                                        "pytorch + hooks script"),
         "<= 0.6"),
        ("seed case, whole process: varprop simulate / NumPy loop script", paired(seed_wp, vs, "numpy loop script"),
         ""),
        ("seed case, whole process: least full-report script / PyTorch + hooks script",
         paired(seed_wp, "least full-report script", "pytorch + hooks script"), "(the target's floor)"),
        ("seed case, whole process: the same, NumPy and matplotlib alone / PyTorch + hooks script",
         paired(seed_wp, "least full-report script, NumPy and matplotlib alone", "pytorch + hooks script"),
         "(without the project's libraries)"),
        ("seed case, in-process: varprop engine / floor", paired(seed_ip, "varprop engine", "floor"), "<= 2.5"),
        ("seed case, in-process: least engine / floor", paired(seed_ip, "least engine", "floor"),
         "(the target's floor)"),
        ("seed case, in-process: varprop engine / PyTorch + hooks", paired(seed_ip, "varprop engine",
                                                                           "pytorch + hooks"), ""),
        ("width 1024, whole process: varprop simulate / PyTorch + hooks script",
         paired(big_wp, vs, "pytorch + hooks script"), "<= 0.8"),
        ("width 1024, whole process: varprop simulate / NumPy loop script", paired(big_wp, vs, "numpy loop script"),
         ""),
        ("width 1024, in-process: varprop forward / floor", paired(big_ip, "varprop forward", "floor"), "<= 1.6"),
        ("width 1024, in-process: varprop forward / PyTorch + hooks", paired(big_ip, "varprop forward",
                                                                             "pytorch + hooks"), ""),
        ("forward+backward: varprop / PyTorch autograd + hooks", paired(big_ip, "varprop forward+backward",
                                                                        "pytorch autograd + hooks"), "<= 0.8"),
        ("forward+backward: varprop / floor of three products a layer",
         paired(big_ip, "varprop forward+backward", "floor3"), "<= 1.4"),
    ]

    def secs(values: list[float]) -> tuple[float, float, float]:
        s = sorted(values)
        return statistics.median(s), s[0], s[-1]

    seconds = [("`varprop --help` (s)", secs(start["varprop --help"]), "<= 0.3"),
               ("`python -c 'import varprop'` without matplotlib or pandas (s)",
                secs(start["python -c 'import varprop'"]), ""),
               ("`python -c pass` (the interpreter alone, s)", secs(start["python -c pass"]), ""),
               ("report writing, 100-layer seed run, full report in a fresh process (s)",
                secs(report_s["full report, first"]), "<= 0.5"),
               ("report writing, the same again in that process (s)", secs(report_s["full report, again"]), ""),
               ("report writing, html only (s)", secs(report_s["html only"]), ""),
               ("report writing, csv and json only (s)", secs(report_s["csv and json only"]), "")]
    data["targets"] = {name: v and v[0] for name, v, _ in checks + seconds}
    lines = ["# Benchmark results", "",
             f"Command: `python benchmarks/bench.py{' --quick' if args.quick else ''}`; machine: {data['machine']}, "
             f"numpy {data['numpy']}, "
             f"torch {data['torch'] or 'not installed'}. {repeats} interleaved repeats per group; load average "
             f"(1, 5, 15 min) {loads[0]} at the start and {loads[1]} at the end (other work shared the machine: "
             "read the ranges). Everyone uses every core. Each contender is timed after a 0.2 s pause "
             "(benchmarks/machine.py's settle), once the previous one's BLAS threads have stopped spinning.", "",
             "## Targets (issue 18)", "",
             "A ratio is taken within each repeat (the contenders ran seconds apart); the table gives its median "
             "and range over the repeats.", "",
             "| measure | median | range | target |", "|---|---:|---:|---|"]
    lines += [f"| {name} | {fmt(v)[0]} | {fmt(v)[1]} | {target} |" for name, v, target in checks]
    lines += [f"| {name} | {fmt(v, 3)[0]} | {fmt(v, 3)[1]} | {target} |" for name, v, target in seconds]
    lines += ["", "## Times", "", "Median and range over the repeats (seconds).", "",
              "| group | contender | median | range |", "|---|---|---:|---:|"]
    for group, times in groups.items():
        for name, t in times.items():
            m, lo, hi = secs(t)
            lines.append(f"| {group} | {name} | {m:.3f} | {lo:.3f}-{hi:.3f} |")
    lines += ["", f"Seed case: width {seed[0]}, depth {seed[1]}, {seed[2]} samples, {seed[3]} replicates, float32, "
              f"init fan_in, linear. Width 1024: depth {big[1]}, 1024 samples, one replicate. The floor: the same "
              "float32 products with weights drawn beforehand (three a layer for forward+backward: `x W`, `g W^T`, "
              "`x^T g`), with BLAS on its own threads and on one: floor and floor3 are the faster of the two in each "
              "repeat. The seed case's 'varprop engine' runs in a worker process without torch, as the command "
              "runs it (its replicate groups in forked processes); in this process, where torch is loaded, varprop "
              "shares the groups over threads alone. The least full-report script and the least engine "
              "(benchmarks/peers.py's least_report and least_engine) are floors for the seed case's targets: the "
              "least a full report needs (the imports, the draws from the seed tree, the float64 sums behind the "
              "mean, std and |cos|, a t-interval per layer, a table and four one-line figures), written as plainly "
              "and run as fast as we found, each leaving out much that varprop's report shows. The script imports "
              "the libraries the project's rules name (SciPy for the intervals, pandas for the tables, matplotlib); "
              "its lean twin NumPy and matplotlib alone.", "",
              "## Memory", "", "Peak RSS (MiB): the engine in a fresh process (width 256, 256 samples), and the "
              "whole-process runs above (the largest over the repeats).", "",
              "| run | peak RSS (MiB) |", "|---|---:|"] + [f"| {k} | {v:.0f} |" for k, v in memory.items()]
    lines += ["", "## Theory", "", "`theory.predict` for 10,000 layers of width 100 (seconds):", "",
              "| activation | seconds |", "|---|---:|"] + [f"| {k} | {v:.3f} |" for k, v in theory.items()]
    if torch is None:
        lines += ["", "PyTorch is not installed here, so its peers were not measured "
                  "(`pip install torch` and rerun)."]
    print("\n".join(lines))
    if results is not None:
        results.write_text("\n".join(lines) + "\n")
        print(f"\nwrote {results}")
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()

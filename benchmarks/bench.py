"""Speed and memory of varprop's engine against the peers a user would reach for.

    python benchmarks/bench.py            # full run, writes benchmarks/RESULTS.md
    python benchmarks/bench.py --quick    # about a minute; prints, writes nothing
    python benchmarks/bench.py --quick --results quick.md   # ... into quick.md
    python benchmarks/bench.py --json out.json

The committed RESULTS.md is replaced only by a full run (or by --write): a
quick run's fewer repeats and shallower case would pass for the real numbers.

Every contender runs in this one process, interleaved (A B C ... A B C ...),
so drift of a shared machine hits all of them alike; the table reports
medians and ratios. Memory is the peak RSS of a fresh child process per case.
PyTorch is used when installed (`pip install torch`), and said to be absent
otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import varprop  # noqa: E402
import varprop.theory  # noqa: E402

try:
    import torch
except ImportError:  # the peer is optional
    torch = None


def varprop_forward(width: int, depth: int, n: int, dtype: str, backward: bool = False) -> None:
    spec = varprop.NetworkSpec.square(depth, width, init="fan_in")
    varprop.simulate(spec, samples=n, dtype=dtype, backward=backward)


def naive_numpy(width: int, depth: int, n: int, dtype: str) -> None:
    """The loop a user writes first: fresh normal weights, X @ W, mean and var."""
    x = np.random.normal(size=(n, width)).astype(dtype)
    means, variances = [], []
    for _ in range(depth):
        w = np.random.normal(scale=np.sqrt(1 / width), size=(width, width)).astype(dtype)
        x = x @ w
        means.append(x.mean())
        variances.append(x.var())


def torch_hooks(width: int, depth: int, n: int, dtype: str) -> None:
    tdtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
    layers = [torch.nn.Linear(width, width, bias=False, dtype=tdtype) for _ in range(depth)]
    stats = []
    for layer in layers:
        torch.nn.init.normal_(layer.weight, std=width ** -0.5)
        layer.register_forward_hook(lambda m, i, o: stats.append((o.mean().item(), o.std().item())))
    with torch.no_grad():
        torch.nn.Sequential(*layers)(torch.randn(n, width, dtype=tdtype))


def make_floor(width: int, depth: int, n: int, dtype: str):
    """The matrix products alone, weights drawn once outside the timing."""
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal((width, width), dtype=np.dtype(dtype).type) * np.dtype(dtype).type(width ** -0.5)
          for _ in range(depth)]
    x0 = rng.standard_normal((n, width), dtype=np.dtype(dtype).type)

    def floor() -> None:
        x = x0
        for w in ws:
            x = x @ w
    return floor


def rng_alone(width: int, depth: int, n: int, dtype: str) -> None:
    rng = np.random.default_rng(0)
    for _ in range(depth):
        rng.standard_normal((width, width), dtype=np.dtype(dtype).type)


def theory_seconds(depth: int = 10_000) -> dict[str, float]:
    """Time of the theory's per-layer predictions for ``depth`` layers, per activation."""
    out = {}
    for act in ("linear", "relu", "tanh", "sigmoid", "gelu", "selu"):
        spec = varprop.RunSpec(varprop.NetworkSpec.square(depth, 100, init="fan_in", activation=act))
        t = time.perf_counter()
        varprop.theory.predict(spec)
        out[act] = time.perf_counter() - t
    return out


ACTIVATIONS = ("linear", "relu", "tanh", "sigmoid", "gelu", "silu", "selu", "elu", "softplus")


def activation_times(depth: int, repeats: int) -> dict[str, float]:
    """Median seconds per layer of varprop's forward at width 1024, 1024 samples,
    float32, for each activation (interleaved): what phi, phi' and the second
    side's statistics add to the linear stack of the targets."""
    specs = {a: varprop.NetworkSpec.square(depth, 1024, init="fan_in", activation=a) for a in ACTIVATIONS}
    cases = {a: (lambda s=s: varprop.simulate(s, samples=1024, dtype="float32")) for a, s in specs.items()}
    return {a: statistics.median(t) / depth for a, t in time_interleaved(cases, repeats).items()}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def time_interleaved(cases: dict, repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def peak_rss_mib(code: str) -> float:
    """Peak RSS of a fresh child Python running ``code`` (MiB), as the child itself reports it.

    VmHWM, not getrusage: ru_maxrss survives exec on Linux and would report this parent's peak.
    """
    probe = code + ("\nprint([int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}).stdout
    return int(out.split()[-1]) / 1024


RESULTS = Path(__file__).with_name("RESULTS.md")


def destination(quick: bool, results: str | None, write: bool) -> Path | None:
    """Where the Markdown results go: ``--results PATH``; else the committed
    RESULTS.md on a full run or with ``--write``; else nowhere (printed only)."""
    if results:
        return Path(results)
    return RESULTS if write or not quick else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and a shallower large case (~1 minute)")
    ap.add_argument("--json", metavar="FILE", help="also write the measured times and ratios as JSON")
    ap.add_argument("--results", metavar="PATH", default=None,
                    help="write the Markdown results to PATH [default: benchmarks/RESULTS.md on a full run, "
                         "nowhere with --quick]")
    ap.add_argument("--write", action="store_true", help="write benchmarks/RESULTS.md even with --quick")
    args = ap.parse_args()
    results = destination(args.quick, args.results, args.write)
    repeats = 3 if args.quick else 7
    sizes = [(100, 100, 500), (1024, 20 if args.quick else 100, 1024)]
    rows, data = [], {"machine": platform.platform(), "cpu": cpu_model(), "cpus": os.cpu_count(),
                      "python": platform.python_version(),
                      "numpy": np.__version__, "torch": torch.__version__ if torch else None, "cases": []}
    for width, depth, n in sizes:
        for dtype in ("float32", "float64"):
            cases = {
                "varprop forward": lambda: varprop_forward(width, depth, n, dtype),
                "varprop forward+backward": lambda: varprop_forward(width, depth, n, dtype, backward=True),
                "naive numpy loop": lambda: naive_numpy(width, depth, n, dtype),
                "floor (matmuls only)": make_floor(width, depth, n, dtype),
                "numpy RNG (weights only)": lambda: rng_alone(width, depth, n, dtype),
            }
            if torch is not None:
                cases["pytorch + hooks"] = lambda: torch_hooks(width, depth, n, dtype)
            times = time_interleaved(cases, repeats)
            med = {k: statistics.median(v) for k, v in times.items()}
            base = med["varprop forward"]
            for name, t in med.items():
                rows.append((f"{width}x{depth}, N={n}, {dtype}", name, t, t / base))
            data["cases"].append({"width": width, "depth": depth, "samples": n, "dtype": dtype, "median_s": med,
                                  "times_s": times})
            print(f"{width}x{depth} N={n} {dtype}: " + ", ".join(f"{k} {v:.3f}s" for k, v in med.items()),
                  flush=True)
    mem_code = ("import varprop; varprop.simulate(varprop.NetworkSpec.square({d}, 256, init='fan_in'), "
                "samples=256{b})")
    deep = 300 if args.quick else 1000
    memory = {
        "import only": peak_rss_mib("import varprop"),
        "forward depth 10": peak_rss_mib(mem_code.format(d=10, b="")),
        f"forward depth {deep}": peak_rss_mib(mem_code.format(d=deep, b="")),
        "forward+backward depth 100": peak_rss_mib(mem_code.format(d=100, b=", backward=True")),
    }
    data["peak_rss_mib"] = memory
    data["theory_10000_layers_s"] = theory = theory_seconds()
    data["activation_s_per_layer"] = by_act = activation_times(5 if args.quick else 20, repeats)
    big_case = next(c for c in data["cases"] if c["width"] == 1024 and c["dtype"] == "float32")
    runs = big_case["times_s"]

    def paired(num: str, den: str) -> tuple[float, float, float] | None:
        """Median and range over repeats of the ratio within each repeat: the two ran seconds apart,
        so the machine's drift between repeats cancels."""
        if num not in runs or den not in runs:
            return None
        r = sorted(a / b for a, b in zip(runs[num], runs[den]))
        return statistics.median(r), r[0], r[-1]

    fwd = "varprop forward"
    checks = [
        ("varprop forward / PyTorch + hooks", paired(fwd, "pytorch + hooks"), "<= 0.8"),
        ("varprop forward / floor (matmuls only)", paired(fwd, "floor (matmuls only)"), "<= 1.5"),
        ("naive numpy loop / varprop forward", paired("naive numpy loop", fwd), ">= 3"),
        ("varprop forward+backward / forward", paired("varprop forward+backward", fwd), "<= 2.5"),
        (f"peak RSS forward depth {deep} / depth 10",
         (memory[f"forward depth {deep}"] / memory["forward depth 10"], None, None), "<= 1.2"),
        ("theory for 10,000 layers, slowest activation (s)", (max(theory.values()), None, None), "well under 1"),
    ]
    data["targets"] = {name: value and value[0] for name, value, _ in checks}
    big_name = next(c for c, *_ in rows if c.startswith("1024x") and c.endswith("float32"))
    lines = ["# Benchmark results", "",
             f"Command: `python benchmarks/bench.py{' --quick' if args.quick else ''}`; machine: {data['machine']}, "
             f"{data['cpu']}, {data['cpus']} CPUs; Python {data['python']}, numpy {data['numpy']}, "
             f"torch {data['torch'] or 'not installed'}. Medians of {repeats} interleaved repeats; ratio = time / "
             "varprop forward's. varprop, the naive loop, the floor and PyTorch all use every core.", "",
             f"## Targets (case {big_name})", "",
             "Speed ratios: the median over repeats of the ratio within each repeat, and its range.", "",
             "| measure | value | range | target |", "|---|---:|---:|---|"]
    lines += [f"| {name} | " + ("not measured | |" if v is None else f"{v[0]:.2f} | "
                                 + ("" if v[1] is None else f"{v[1]:.2f}-{v[2]:.2f}") + " |") + f" {target} |"
              for name, v, target in checks]
    lines += ["", "## Times", "",
              "| case | contender | median (s) | ratio to varprop forward |", "|---|---|---:|---:|"]
    lines += [f"| {c} | {name} | {t:.4f} | {r:.2f} |" for c, name, t, r in rows]
    lines += ["", "## Memory", "", "Peak RSS of a fresh process (MiB; width 256, 256 samples):", "",
              "| run | peak RSS (MiB) |", "|---|---:|"] + [f"| {k} | {v:.0f} |" for k, v in memory.items()]
    lines += ["", "## Theory", "", "`theory.predict` for 10,000 layers of width 100 (seconds):", "",
              "| activation | seconds |", "|---|---:|"] + [f"| {k} | {v:.3f} |" for k, v in theory.items()]
    lines += ["", "## Forward by activation", "",
              "varprop forward, width 1024, 1024 samples, float32 (ms per layer; ratio to linear):", "",
              "| activation | ms per layer | ratio to linear |", "|---|---:|---:|"]
    lines += [f"| {a} | {t * 1e3:.1f} | {t / by_act['linear']:.2f} |" for a, t in by_act.items()]
    if torch is None:
        lines += ["", "PyTorch is not installed here, so the PyTorch + hooks peer was not measured "
                  "(`pip install torch` and rerun)."]
    print("\n".join(lines))
    if results is not None:
        results.write_text("\n".join(lines) + "\n")
        print(f"\nwrote {results}")
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()

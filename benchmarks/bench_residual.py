"""Speed of varprop's residual stacks against their own branch layers run as a plain stack, and against a
PyTorch residual MLP with hooks collecting the same statistics.

    python benchmarks/bench_residual.py            # full run, writes benchmarks/RESULTS-residual.md
    python benchmarks/bench_residual.py --quick    # fewer repeats; prints, writes nothing
    python benchmarks/bench_residual.py --json out.json

The network: ``--residual plain --alpha 1/sqrt(L)``, two-layer pre-activation branches (relu -> dense ->
relu -> dense), He init, no biases; one replicate. Issue 19's targets:

- a residual block costs no more than its branch's layers plus one addition: the residual stack's time
  against a plain stack of the same dense layers and activations (2 x blocks layers of relu, He), <= 1.1x;
- against a PyTorch residual MLP of the same shape whose hooks take the same statistics of every block
  (the stream, the branch's output, and backward the gradient reaching each block and the branch's share
  of it, and each block's weight-gradient norm), <= 0.8x, in-process and whole-process.

In-process, the contenders run interleaved (A B C A B C ...), so drift of a shared machine hits them alike;
each ratio is taken within a repeat and reported as the median and range over repeats. Whole-process runs
``varprop simulate`` as a user does (report, figures and all, and with ``--format csv``) against a script that
imports torch, builds the model, runs it with its hooks and writes the statistics with pandas, each in a fresh
process, also interleaved. The load average (``os.getloadavg``) is recorded at the start and end of each part.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import varprop  # noqa: E402
from benchmarks.machine import describe  # noqa: E402
from varprop.spec import from_options  # noqa: E402

# The PyTorch peer, as a user would write it; run in-process and, as a script, whole-process.
PEER_SOURCE = '''
import math

import torch
import torch.nn as nn

ABS_COS_SAMPLES = 128


def stats(t):
    """varprop's statistics of one (samples x units) tensor, in float64 as varprop takes them."""
    x = t.detach().double()
    n_rows = x.shape[0]
    col_mean = x.mean(0)
    mean = col_mean.mean()
    var = x.var(unbiased=False)
    norms = x.norm(dim=1, keepdim=True)
    unit = x / norms
    s = unit.sum(0)
    head = unit[:ABS_COS_SAMPLES]
    gram = (head @ head.T).abs()
    m = head.shape[0]
    out = {"mean": mean, "std": var.sqrt(), "second_moment": (x * x).mean(), "sq_unit_mean": (col_mean ** 2).mean(),
           "unit_var": x.var(0, unbiased=False).mean(), "frac_zero": (x == 0).double().mean(),
           "cos_sim": (s @ s - n_rows) / (n_rows * (n_rows - 1)),
           "abs_cos_sim": (gram.sum() - gram.trace()) / (m * (m - 1))}
    out = {k: float(v) for k, v in out.items()}
    out["log10_std"] = math.log10(out["std"]) if out["std"] > 0 else -math.inf
    return out


class Block(nn.Module):
    """x + alpha f(x), f = relu -> dense -> relu -> dense (pre-activation order)."""

    def __init__(self, width, alpha):
        super().__init__()
        self.alpha = alpha
        self.branch = nn.Sequential(nn.ReLU(), nn.Linear(width, width, bias=False), nn.ReLU(),
                                    nn.Linear(width, width, bias=False))
        for layer in (self.branch[1], self.branch[3]):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")  # He

    def forward(self, x):
        return x + self.alpha * self.branch(x)


def run(width, blocks, samples, backward):
    """Build the model, run it with hooks taking every block's statistics; return one row per block."""
    alpha = 1 / math.sqrt(blocks)
    model = nn.Sequential(*[Block(width, alpha) for _ in range(blocks)])
    rows = [{"block": b} for b in range(blocks + 1)]
    for b, block in enumerate(model, start=1):
        def forward_hook(module, inputs, output, row=rows[b]):
            row.update({f"post_{k}": v for k, v in stats(output).items()})
        def branch_hook(module, inputs, output, row=rows[b], alpha=alpha):
            f = stats(output)
            row.update({f"branch_{k}": v for k, v in f.items()})
            row.update({"pre_std": alpha * f["std"], "pre_second_moment": alpha ** 2 * f["second_moment"]})
        block.register_forward_hook(forward_hook)
        block.branch.register_forward_hook(branch_hook)
        if backward:
            def grad_hook(module, grad_input, grad_output, row=rows[b]):
                row.update({f"grad_{k}": v for k, v in stats(grad_output[0]).items()})
            def delta_hook(module, grad_input, grad_output, row=rows[b]):
                row.update({f"delta_{k}": v for k, v in stats(grad_input[0]).items()})
            block.register_full_backward_hook(grad_hook)
            block.branch.register_full_backward_hook(delta_hook)
    x = torch.randn(samples, width, requires_grad=backward)
    rows[0].update({f"post_{k}": v for k, v in stats(x).items()})
    if not backward:
        with torch.no_grad():
            model(x)
        return rows
    (model(x) * torch.randn(samples, width)).sum().backward()  # a N(0, 1) gradient at the output
    rows[0].update({f"grad_{k}": v for k, v in stats(x.grad).items()})
    for b, block in enumerate(model, start=1):
        rows[b]["weight_grad_norm"] = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in block.parameters()))
    return rows
'''

PEER_SCRIPT = '''
import sys
import pandas as pd
import residual_peer

width, blocks, samples = (int(a) for a in sys.argv[1:4])
rows = residual_peer.run(width, blocks, samples, sys.argv[4] == "1")
pd.DataFrame(rows).to_csv(sys.argv[5], index=False)
'''


def load_peer(directory: Path) -> Any:
    (directory / "residual_peer.py").write_text(PEER_SOURCE)
    (directory / "peer_script.py").write_text(PEER_SCRIPT)
    sys.path.insert(0, str(directory))
    import residual_peer

    return residual_peer


def specs(width: int, blocks: int, samples: int, backward: bool) -> tuple[Any, Any]:
    """The residual stack and the plain stack of its branch layers (one replicate each)."""
    common = {"width": width, "samples": samples, "activation": "relu", "init": "he", "backward": backward,
              "replicates": 1, "seed": 0}
    return (from_options({**common, "residual": "plain", "alpha": "1/sqrt(L)", "blocks": blocks, "branch_depth": 2}),
            from_options({**common, "layers": 2 * blocks}))


def time_interleaved(cases: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    for fn in cases.values():  # warm up: first calls import, allocate and pick kernels
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def paired(times: dict[str, list[float]], num: str, den: str) -> tuple[float, float, float]:
    r = sorted(a / b for a, b in zip(times[num], times[den]))
    return statistics.median(r), r[0], r[-1]


def in_process(peer: Any, threads: int, width: int, blocks: int, samples: int, repeats: int) -> dict[str, Any]:
    """The three contenders on ``threads`` threads each, forward and forward + backward."""
    torch.set_num_threads(threads)
    out: dict[str, Any] = {"threads": threads, "width": width, "blocks": blocks, "samples": samples}
    for backward in (False, True):
        res, plain = specs(width, blocks, samples, backward)
        cases = {"varprop residual": lambda: varprop.simulate(res, threads=threads),
                 "varprop plain (branch layers)": lambda: varprop.simulate(plain, threads=threads),
                 "pytorch residual + hooks": lambda: peer.run(width, blocks, samples, backward)}
        times = time_interleaved(cases, repeats)
        key = "forward+backward" if backward else "forward"
        out[key] = {"times_s": times, "median_s": {k: statistics.median(v) for k, v in times.items()},
                    "residual / plain": paired(times, "varprop residual", "varprop plain (branch layers)"),
                    "residual / pytorch": paired(times, "varprop residual", "pytorch residual + hooks")}
        print(f"{threads} threads, {width}x{blocks} blocks N={samples} {key}: "
              + ", ".join(f"{k} {v:.3f}s" for k, v in out[key]["median_s"].items()), flush=True)
    return out


def whole_process(directory: Path, threads: int, width: int, blocks: int, samples: int, repeats: int
                  ) -> dict[str, Any]:
    """Fresh processes, forward + backward, interleaved: varprop simulate (its full report; and csv only)
    against the PyTorch script writing its statistics, each on ``threads`` threads."""
    size = ["--width", str(width), "--blocks", str(blocks), "--samples", str(samples)]
    simulate = [sys.executable, "-m", "varprop", "simulate", "--residual", "plain", "--alpha", "1/sqrt(L)", *size,
                "--activation", "relu", "--init", "he", "--backward", "--replicates", "1", "--seed", "0",
                "--threads", str(threads)]
    commands = {
        "varprop simulate (report)": simulate + ["--out", str(directory / "report")],
        "varprop simulate --format csv": simulate + ["--format", "csv", "--out", str(directory / "csv")],
        "pytorch script": [sys.executable, str(directory / "peer_script.py"), str(width), str(blocks), str(samples),
                           "1", str(directory / "peer.csv")],
    }
    env = {**os.environ, "PYTHONPATH": f"{directory}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": str(threads)}

    def runner(cmd: list[str]) -> Callable[[], None]:
        return lambda: subprocess.run(cmd, cwd=directory, env=env, check=True, capture_output=True)
    times = time_interleaved({k: runner(c) for k, c in commands.items()}, repeats)
    out = {"threads": threads, "width": width, "blocks": blocks, "samples": samples, "times_s": times,
           "median_s": {k: statistics.median(v) for k, v in times.items()},
           "report / pytorch": paired(times, "varprop simulate (report)", "pytorch script"),
           "csv / pytorch": paired(times, "varprop simulate --format csv", "pytorch script")}
    print(f"whole process, {threads} threads, {width}x{blocks} N={samples}: "
          + ", ".join(f"{k} {v:.2f}s" for k, v in out["median_s"].items()), flush=True)
    return out


def fmt_ratio(r: tuple[float, float, float]) -> str:
    return f"{r[0]:.2f} ({r[1]:.2f}-{r[2]:.2f})"


def write_results(path: Path, data: dict[str, Any], command: str) -> None:
    load = data["load"]
    lines = ["# Benchmark results: residual stacks", "",
             f"Command: `{command}`; machine: {data['machine']}, "
             f"numpy {data['numpy']}, torch {data['torch']}. Each part runs every contender on 1 thread, then on "
             "2 (PyTorch's default here; varprop's is every core). Medians of "
             f"{data['repeats']} interleaved repeats; a ratio is taken within each repeat "
             "(median and range over repeats). Load average at the start and end of each part: in-process "
             f"{load['in_process'][0]:.1f} -> {load['in_process'][1]:.1f}, whole-process "
             f"{load['whole_process'][0]:.1f} -> {load['whole_process'][1]:.1f}.", "",
             "The network: `--residual plain --alpha 1/sqrt(L) --branch-depth 2` (relu -> dense -> relu -> dense "
             "branches, He init, no biases), one replicate; the plain stack: the same 2 x blocks dense layers "
             "with relu; the PyTorch peer: the same residual MLP with forward and full-backward hooks on every "
             "block and branch taking the same statistics in float64 (mean, std, second moment, average squared "
             "channel mean, average channel variance, zeros, cos and |cos| between samples) of the stream, the "
             "branch's output, the gradient reaching each block and the branch's share of it, and each block's "
             "weight-gradient norm.", "",
             "## In-process", "",
             "Targets: residual / plain <= 1.1; residual / PyTorch + hooks <= 0.8.", "",
             "| threads | case | pass | varprop residual (s) | plain (s) | PyTorch + hooks (s) | residual / plain "
             "| residual / PyTorch |", "|---:|---|---|---:|---:|---:|---:|---:|"]
    for case in data["in_process"]:
        name = f"{case['threads']} | width {case['width']}, {case['blocks']} blocks, N={case['samples']}"
        for key in ("forward", "forward+backward"):
            r, med = case[key], case[key]["median_s"]
            lines.append(f"| {name} | {key} | {med['varprop residual']:.4f} | "
                         f"{med['varprop plain (branch layers)']:.4f} | {med['pytorch residual + hooks']:.4f} | "
                         f"{fmt_ratio(r['residual / plain'])} | {fmt_ratio(r['residual / pytorch'])} |")
    lines += ["", "## Whole process", "",
              "Fresh processes, forward + backward: `varprop simulate` as a user runs it (report.md, report.html, "
              "figures, layers.csv, theory) and with `--format csv` (layers.csv and config.json only), against "
              "`python peer_script.py` (import torch and pandas, build, run with the hooks, write the statistics "
              "as CSV). Target: varprop / PyTorch <= 0.8.", "",
              "| threads | case | varprop report (s) | varprop csv (s) | PyTorch script (s) | report / PyTorch "
              "| csv / PyTorch |", "|---:|---|---:|---:|---:|---:|---:|"]
    for case in data["whole_process"]:
        med = case["median_s"]
        lines.append(f"| {case['threads']} | width {case['width']}, {case['blocks']} blocks, N={case['samples']} | "
                     f"{med['varprop simulate (report)']:.2f} | {med['varprop simulate --format csv']:.2f} | "
                     f"{med['pytorch script']:.2f} | {fmt_ratio(case['report / pytorch'])} | "
                     f"{fmt_ratio(case['csv / pytorch'])} |")
    if max(max(v) for v in load.values()) > (data["cpus"] or 1):
        lines += ["", "Reading: the machine was busy (load average above its core count: other processes shared the "
                  "cores), so absolute times are inflated and swing between repeats (see the ranges); the ratios, "
                  "taken within a repeat, are the measure. On a shared machine a kernel split over two threads waits "
                  "for a descheduled one: PyTorch's OpenMP kernels suffer most (compare its 1- and 2-thread "
                  "times), which flatters varprop's 2-thread ratios; the 1-thread rows are the fair comparison."]
    lines.append("")
    path.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and smaller cases; writes nothing")
    ap.add_argument("--json", metavar="FILE", help="also write the measured times and ratios as JSON")
    args = ap.parse_args()
    repeats, whole_repeats = (3, 2) if args.quick else (7, 5)
    # A wide case where the products dominate, and the gallery's narrow one where per-block overheads do.
    cases = [(256, 25, 512), (64, 100, 64)] if args.quick else [(512, 25, 1024), (64, 100, 64)]
    whole = [(256, 25, 512)] if args.quick else [(512, 25, 1024)]
    data: dict[str, Any] = {"machine": describe(), "cpus": os.cpu_count(), "numpy": np.__version__,
                            "torch": torch.__version__,
                            "repeats": repeats, "load": {}}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        peer = load_peer(directory)
        start = os.getloadavg()[0]
        data["in_process"] = [in_process(peer, t, *case, repeats) for t in (1, 2) for case in cases]
        data["load"]["in_process"] = (start, os.getloadavg()[0])
        start = os.getloadavg()[0]
        data["whole_process"] = [whole_process(directory, t, *case, whole_repeats) for t in (1, 2) for case in whole]
        data["load"]["whole_process"] = (start, os.getloadavg()[0])
    command = "python benchmarks/bench_residual.py" + (" --quick" if args.quick else "")
    if not args.quick:
        write_results(ROOT / "benchmarks" / "RESULTS-residual.md", data, command)
        print("wrote benchmarks/RESULTS-residual.md")
    else:
        out = Path(tempfile.gettempdir()) / "RESULTS-residual-quick.md"
        write_results(out, data, command)
        print(out.read_text())
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()

"""What a user would write instead of varprop: the peers of benchmarks/bench.py.

Each peer measures per-layer statistics of a fan_in-scaled linear stack over
replicates (fresh weights each) and, run as a script, writes them to a CSV,
so that whole-process times compare like with like (start-up, work, output):

    python benchmarks/peers.py torch-hooks WIDTH DEPTH SAMPLES REPLICATES OUT.csv
    python benchmarks/peers.py numpy-loop WIDTH DEPTH SAMPLES REPLICATES OUT.csv
    python benchmarks/peers.py torch-autograd WIDTH DEPTH SAMPLES REPLICATES OUT.csv
    python benchmarks/peers.py least-report WIDTH DEPTH SAMPLES REPLICATES OUT_DIR
    python benchmarks/peers.py least-report-lean WIDTH DEPTH SAMPLES REPLICATES OUT_DIR

``torch-hooks``: nn.Linear layers with forward hooks taking each output's
mean and std (the PyTorch way). ``numpy-loop``: the seed documents' loop,
``x @ w`` with fresh normal weights, mean and variance per layer.
``torch-autograd``: forward and backward with hooks on both passes (output
and gradient mean and std) and every weight gradient's norm, the statistics
varprop's ``--backward`` adds.

``least-report`` and ``least-report-lean``: not peers but floors, the least a
full-report ``varprop simulate`` could do, written as plainly as it gets
(:func:`least_report`), with the project's libraries and without pandas and SciPy.
"""

from __future__ import annotations

import csv
import math
import sys
from typing import Any

import numpy as np


def torch_hooks(width: int, depth: int, n: int, replicates: int, dtype: str = "float32") -> list[tuple]:
    import torch

    tdtype = getattr(torch, dtype)
    rows: list[tuple] = []
    for rep in range(replicates):
        layers = [torch.nn.Linear(width, width, bias=False, dtype=tdtype) for _ in range(depth)]
        for i, layer in enumerate(layers):
            torch.nn.init.normal_(layer.weight, std=width ** -0.5)
            layer.register_forward_hook(
                lambda m, inp, out, i=i: rows.append((rep, i + 1, out.mean().item(), out.std().item())))
        with torch.no_grad():
            torch.nn.Sequential(*layers)(torch.randn(n, width, dtype=tdtype))
    return rows


def numpy_loop(width: int, depth: int, n: int, replicates: int, dtype: str = "float32") -> list[tuple]:
    rows: list[tuple] = []
    for rep in range(replicates):
        x = np.random.normal(size=(n, width)).astype(dtype)
        for layer in range(1, depth + 1):
            w = np.random.normal(scale=np.sqrt(1 / width), size=(width, width)).astype(dtype)
            x = x @ w
            rows.append((rep, layer, float(x.mean()), float(x.var())))
    return rows


def torch_autograd(width: int, depth: int, n: int, replicates: int, dtype: str = "float32") -> list[tuple]:
    import torch

    tdtype = getattr(torch, dtype)
    rows: list[tuple] = []
    for rep in range(replicates):
        stats: dict[tuple[int, str], tuple[float, float]] = {}
        layers = [torch.nn.Linear(width, width, bias=False, dtype=tdtype) for _ in range(depth)]
        for i, layer in enumerate(layers):
            torch.nn.init.normal_(layer.weight, std=width ** -0.5)
            layer.register_forward_hook(
                lambda m, inp, out, i=i: stats.__setitem__((i, "post"), (out.mean().item(), out.std().item())))
            layer.register_full_backward_hook(
                lambda m, g_in, g_out, i=i: stats.__setitem__((i, "grad"), (g_out[0].mean().item(),
                                                                           g_out[0].std().item())))
        x = torch.randn(n, width, dtype=tdtype, requires_grad=True)
        out = torch.nn.Sequential(*layers)(x)
        out.backward(torch.randn_like(out))
        for i, layer in enumerate(layers):
            rows.append((rep, i + 1, *stats[(i, "post")], *stats[(i, "grad")], layer.weight.grad.norm().item()))
    return rows


def least_engine(width: int, depth: int, n: int, replicates: int, processes: int = 2) -> list[tuple]:
    """The least varprop's engine does for a fan_in linear stack, as fast as we found: each
    replicate's weights and inputs drawn from its own node of the seed tree (varprop's own
    float32 draws), the replicates shared over ``processes`` forked processes (one BLAS thread
    each), and per layer only the float64 sums the report's columns need: column sums (mean),
    row sums of squares (std, and the norms) and the Gram matrix of the first 128 samples
    (|cos|). Left out, though the report shows them: the centred variance, channel statistics,
    the signed cosine, zero counts, histograms, the scale that keeps any depth from
    overflowing, and the theory. (Stacking replicates, as varprop does to pay its Python once
    a layer, made this loop slower: its float64 copy then leaves the core's cache.)"""
    import multiprocessing

    per = -(-replicates // processes)
    shares = [(width, depth, n, range(r, min(r + per, replicates))) for r in range(0, replicates, per)]
    with multiprocessing.get_context("fork").Pool(len(shares)) as pool:
        return [row for rows in pool.map(_least_share, shares) for row in rows]


def _least_share(share: tuple[int, int, int, range]) -> list[tuple]:
    from threadpoolctl import threadpool_limits

    from varprop.montecarlo.seeds import generator
    from varprop.nn.inits import standard_normal

    width, depth, n, reps = share
    f32, scale, m = np.float32, np.float32(width ** -0.5), min(n, 128)
    buf, ones = np.empty((n, width)), np.ones(n)
    rows: list[tuple] = []
    with threadpool_limits(1, user_api="blas"):  # a process a core: BLAS threads would only contend
        for rep in reps:
            x = standard_normal(generator(0, rep, 0, "inputs"), (n, width), f32)
            for layer in range(1, depth + 1):
                w = standard_normal(generator(0, rep, layer, "weights", 0), (width, width), f32)
                w *= scale
                x = x @ w
                np.copyto(buf, x)
                mean = float(ones @ buf @ np.ones(width)) / x.size
                sq = np.vecdot(buf, buf)
                std = math.sqrt(float(sq.sum()) / x.size - mean * mean)
                gram = np.abs(x[:m] @ x[:m].T).astype(np.float64)
                inv = 1 / np.sqrt(sq[:m])
                rows.append((rep, layer, mean, std, (float(inv @ gram @ inv) - m) / (m * (m - 1))))
    return rows


def least_report(width: int, depth: int, n: int, replicates: int, out: str, lean: bool = False) -> None:
    """A floor for the whole ``varprop simulate`` command: the imports its report needs,
    :func:`least_engine`, then per layer the mean over replicates with its 95% t-interval,
    written as a CSV, a Markdown and an HTML table, and four figures of one line each (std, on
    a log scale, |cos|, mean, and the mean's spread), drawn in as many processes as the engine
    used, with no layout pass. The imports are those the project's rules name: SciPy for the
    intervals, pandas for the tables, matplotlib. ``lean``: NumPy and matplotlib alone (the
    tables written by hand, the t quantile by its Cornish-Fisher expansion), the least any
    report could import."""
    import multiprocessing
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (as varprop's figures load it, before any work)

    names = ["mean", "std", "abs_cos"]
    os.makedirs(out, exist_ok=True)
    if lean:
        rows = np.array(least_engine(width, depth, n, replicates), float)
        by = rows[np.lexsort((rows[:, 0], rows[:, 1]))].reshape(depth, replicates, 5)[:, :, 2:]
        means, half = by.mean(axis=1), _t975(replicates - 1) * by.std(axis=1, ddof=1) / math.sqrt(replicates)
        cols = names + [f"{c}_ci95" for c in names]
        values = np.column_stack([means, half])
        np.savetxt(os.path.join(out, "layers.csv"), rows, delimiter=",", header="rep,layer," + ",".join(names),
                   comments="")
        layer = np.arange(1, depth + 1)
        with open(os.path.join(out, "report.md"), "w") as fh:
            fh.write("\n".join(["| layer | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
                               + [f"| {k} | " + " | ".join(f"{v:.6g}" for v in row) + " |"
                                  for k, row in zip(layer, values)]))
        with open(os.path.join(out, "report.html"), "w") as fh:
            fh.write("<table><tr><th>layer</th>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"
                     + "".join(f"<tr><td>{k}</td>" + "".join(f"<td>{v:.6g}</td>" for v in row) + "</tr>"
                               for k, row in zip(layer, values)) + "</table>")
        series = [(layer, values[:, i], c) for i, c in enumerate(cols[:4])]
    else:
        import pandas as pd
        from scipy import special

        rows = pd.DataFrame(least_engine(width, depth, n, replicates), columns=["rep", "layer", *names])
        by = rows.groupby("layer")[names]
        half = special.stdtrit(replicates - 1, 0.975) * by.std() / np.sqrt(replicates)
        table = pd.concat([by.mean(), half.add_suffix("_ci95")], axis=1)
        rows.to_csv(os.path.join(out, "layers.csv"), index=False)
        with open(os.path.join(out, "report.md"), "w") as fh:
            fh.write(table.to_markdown())
        with open(os.path.join(out, "report.html"), "w") as fh:
            fh.write(table.to_html())
        series = [(table.index.to_numpy(), table[c].to_numpy(), c) for c in table.columns[:4]]
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.map(_least_figure, [(x, y, c, os.path.join(out, f"{c}.png")) for x, y, c in series])


def _t975(dof: int) -> float:
    """Student's t 0.975 quantile by the Cornish-Fisher expansion about the normal's (off by under 4e-4
    from 20 degrees of freedom on, 2e-5 at 49: 2.00955 against scipy's stdtrit 2.00958)."""
    z = 1.959963984540054
    return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)


def _least_figure(job: tuple[Any, Any, str, str]) -> None:
    import matplotlib.pyplot as plt

    x, y, name, path = job
    fig, ax = plt.subplots()
    ax.plot(x, y)
    if name == "std":  # as varprop draws it
        ax.set_yscale("log")
    fig.savefig(path)
    plt.close(fig)


PEERS: dict[str, Any] = {"torch-hooks": torch_hooks, "numpy-loop": numpy_loop, "torch-autograd": torch_autograd}


def main(argv: list[str]) -> None:
    name, width, depth, n, replicates, out = argv
    if name.startswith("least-report"):
        least_report(int(width), int(depth), int(n), int(replicates), out, lean=name == "least-report-lean")
        return
    rows = PEERS[name](int(width), int(depth), int(n), int(replicates))
    with open(out, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)


if __name__ == "__main__":
    main(sys.argv[1:])

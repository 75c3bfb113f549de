"""What a user would write instead of varprop: the peers of benchmarks/bench.py.

Each peer measures per-layer statistics of a fan_in-scaled linear stack over
replicates (fresh weights each) and, run as a script, writes them to a CSV,
so that whole-process times compare like with like (start-up, work, output):

    python benchmarks/peers.py torch-hooks WIDTH DEPTH SAMPLES REPLICATES OUT.csv
    python benchmarks/peers.py numpy-loop WIDTH DEPTH SAMPLES REPLICATES OUT.csv
    python benchmarks/peers.py torch-autograd WIDTH DEPTH SAMPLES REPLICATES OUT.csv

``torch-hooks``: nn.Linear layers with forward hooks taking each output's
mean and std (the PyTorch way). ``numpy-loop``: the seed documents' loop,
``x @ w`` with fresh normal weights, mean and variance per layer.
``torch-autograd``: forward and backward with hooks on both passes (output
and gradient mean and std) and every weight gradient's norm, the statistics
varprop's ``--backward`` adds.
"""

from __future__ import annotations

import csv
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


PEERS: dict[str, Any] = {"torch-hooks": torch_hooks, "numpy-loop": numpy_loop, "torch-autograd": torch_autograd}


def main(argv: list[str]) -> None:
    name, width, depth, n, replicates, out = argv
    rows = PEERS[name](int(width), int(depth), int(n), int(replicates))
    with open(out, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)


if __name__ == "__main__":
    main(sys.argv[1:])

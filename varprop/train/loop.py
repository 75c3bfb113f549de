"""Training loops: epochs of shuffled batches, and what is recorded on the way.

Every configuration x replicate trains from its own nodes of the run's seed
tree: the initial weights are ``varprop simulate``'s replicate r (the same
generators), and epoch e's batch order comes from node (r, e). Configurations
are not in the key, so replicate r of every configuration starts from the
same kernels (where shapes agree) and sees the same batch order: the
difference between two configurations is theirs, not the draws' (common
random numbers), which is what makes paired comparisons over replicates
tight. With BLAS on one thread and a step's work in pieces fixed by the shapes
(:mod:`.model`), results are bit-identical for any thread count.

Recorded at step 0, at the end of every epoch and every ``record_every``
steps (``history``): the training loss as Keras' History reports it (the
mean of the batch losses since the epoch began, each weighted by its batch's
size, in training mode), the loss and accuracy in inference mode over the
training data (up to a fixed 10,000 of it) and the test data; per layer
(``layers``) the statistics of :meth:`.Model.layer_statistics` on a fixed
probe of 1,000 training images, the weight norm, the last gradient's norm,
and ``||dW|| / ||W||`` of the last step.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from ..errors import SpecError
from ..montecarlo.seeds import generator
from .. import forked
from ..montecarlo import memory
from ..parallel import SERIAL, Pool
from . import data as data_mod
from . import optim
from .model import Model, splits_rows
from .options import RunOptions, TrainConfig, expand, memory_bytes

EVAL_SAMPLES = 10_000  # training images the inference-mode training loss is measured on, at most
PROBE_SAMPLES = 1_000  # training images the per-layer statistics are measured on
Progress = Callable[[int], None]


class TrainResult(NamedTuple):
    """``history`` (one row per configuration x replicate x record point),
    ``layers`` (the same x layer) and ``meta`` (configurations, data, options)."""

    history: pd.DataFrame
    layers: pd.DataFrame
    meta: dict[str, Any]


def shuffle_order(seed: int, replicate: int, epoch: int, n: int) -> np.ndarray:
    """The order of the training images in epoch ``epoch`` (1-based) of replicate ``replicate``."""
    return generator(seed, replicate, epoch, "shuffle").permutation(n)


def eval_indices(seed: int, n: int) -> np.ndarray:
    """The fixed training images the inference-mode training loss is measured on
    (all of them up to 10,000); the first 1,000 are the per-layer probe."""
    order = generator(seed, 0, 0, "probe").permutation(n)
    return order[:EVAL_SAMPLES]


def probe_size(n_eval: int, batch_size: int) -> int:
    """The probe: whole batches, about 1,000 images (at least one batch, at most the evaluation set)."""
    batches = max(1, round(PROBE_SAMPLES / batch_size))
    return min(batches * batch_size, n_eval - n_eval % batch_size if n_eval >= batch_size else n_eval)


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Batches per epoch: the last one is partial when the batch size does not divide the data (as in Keras)."""
    return math.ceil(n_train / batch_size)


def _schedule(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    if config.lr_schedule == "cosine":
        return optim.cosine(config.lr, total_steps)
    return optim.constant(config.lr)


def train_replicate(config: TrainConfig, replicate: int, run: RunOptions, dataset: data_mod.Dataset,
                    pool: Pool, progress: Progress | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train one configuration from replicate ``replicate``'s initial weights;
    return its history rows and per-layer rows."""
    dtype = np.dtype(run.dtype)
    model = Model(config.arch, dtype, pool)
    try:
        model.initialize(run.seed, replicate, config.init)
    except ValueError as exc:  # a user init that returned something unusable
        raise SpecError("init", str(exc)) from None
    n = dataset.n_train
    per_epoch = steps_per_epoch(n, config.batch_size)
    schedule = _schedule(config, per_epoch * run.epochs)
    opt = optim.make(config.optimizer, schedule, model.n_params, dtype, config.momentum)
    x_train, x_test = dataset.x_train.astype(dtype, copy=False), dataset.x_test.astype(dtype, copy=False)
    ev = eval_indices(run.seed, n)
    x_eval, y_eval = x_train[ev], dataset.y_train[ev]
    probe = probe_size(len(ev), config.batch_size)
    x_probe, y_probe = x_eval[:probe], y_eval[:probe]
    history: list[dict[str, Any]] = []
    layer_rows: list[dict[str, Any]] = []
    w_before: dict[int, np.ndarray] | None = None

    def record(step: int, epoch: float, keras_loss: float) -> None:
        with np.errstate(all="ignore"):  # a diverged network records NaN, not warnings
            train_loss, train_acc = model.evaluate(x_eval, y_eval)
            test_loss, test_acc = model.evaluate(x_test, dataset.y_test)
            stats = model.layer_statistics(x_probe, y_probe, min(config.batch_size, probe))
        head = {"replicate": replicate, "epoch": epoch, "step": step}
        history.append({**head, "train_loss_keras": keras_loss, "train_loss": train_loss, "train_accuracy": train_acc,
                        "test_loss": test_loss, "test_accuracy": test_acc,
                        "learning_rate": schedule(max(step - 1, 0))})  # Keras' name: --lr may be a column
        norms = model.weight_norms()
        for row in stats:
            l = row["layer"]
            w_norm, g_norm = norms[l]
            ratio = math.nan
            if w_before is not None and step > 0:
                before = w_before[l].astype(np.float64)
                ratio = float(np.linalg.norm(model.W[l].astype(np.float64) - before) / np.linalg.norm(before))
            layer_rows.append({**head, **row, "weight_norm": w_norm,
                               "weight_grad_norm": g_norm if step else math.nan, "update_ratio": ratio})

    record(0, 0.0, math.nan)
    step = 0
    for epoch in range(1, run.epochs + 1):
        order = shuffle_order(run.seed, replicate, epoch, n)
        loss_sum, seen = 0.0, 0
        for i in range(per_epoch):
            idx = order[i * config.batch_size:(i + 1) * config.batch_size]
            step += 1
            last = i == per_epoch - 1
            due = last or (run.record_every and step % run.record_every == 0)
            if due:
                w_before = {l: model.W[l].copy() for l in model.layers}
            with np.errstate(all="ignore"):
                loss = model.loss_and_grad(x_train[idx], dataset.y_train[idx], opt=opt)
            if not math.isfinite(loss):  # diverged (and not updated): the history ends here, at NaN
                history.append({"replicate": replicate, "epoch": epoch - 1 + (i + 1) / per_epoch, "step": step,
                                "train_loss_keras": math.nan, "train_loss": math.nan, "train_accuracy": math.nan,
                                "test_loss": math.nan, "test_accuracy": math.nan,
                                "learning_rate": schedule(step - 1)})
                if progress:
                    progress(run.epochs - epoch + 1)
                return history, layer_rows
            loss_sum += loss * len(idx)
            seen += len(idx)
            if due:
                record(step, epoch - 1 + (i + 1) / per_epoch, loss_sum / seen)
        if progress:
            progress(1)
    return history, layer_rows


def fit(configs: list[TrainConfig], run: RunOptions, dataset: data_mod.Dataset, progress: Progress | None = None,
        threads: int | None = None) -> TrainResult:
    """Train every configuration ``run.replicates`` times on ``dataset``."""
    widths = {c.arch.widths[0] for c in configs}
    if widths != {dataset.n_features}:
        bad = next(w for w in widths if w != dataset.n_features)
        raise SpecError("widths", f"the input width {bad} differs from the data's {dataset.n_features} features "
                        f"per image ({dataset.name.split(';')[0]})")
    pool = Pool(threads)
    start = time.perf_counter()
    history, layers = [], []
    runs = [(config, rep) for config in configs for rep in range(run.replicates)]
    # The pixels in the run's dtype once, not once a run (and shared with forked processes)
    dataset = dataclasses.replace(dataset, x_train=dataset.x_train.astype(run.dtype, copy=False),
                                  x_test=dataset.x_test.astype(run.dtype, copy=False))
    # Multi-threaded BLAS splits a product differently for each thread count (other last bits): BLAS runs
    # on one thread and varprop's own threads work on pieces fixed by the shapes.
    with threadpool_limits(1, user_api="blas"):
        shares = process_shares(runs, run, dataset.n_train, dataset.n_test, pool.threads)
        if len(shares) > 1 and forked.forkable():
            results = forked.share_items(lambda r, report: train_replicate(*r, run, dataset, SERIAL, report), runs,
                                         shares, progress)
        else:
            results = [train_replicate(config, rep, run, dataset, pool, progress) for config, rep in runs]
    for (config, _), (h, l) in zip(runs, results):
        head = {"config": config.label, **config.varied}
        history += [{**head, **row} for row in h]
        layers += [{**head, **row} for row in l]
    meta = {"configs": [{"label": c.label, "varied": c.varied, "options": c.options()} for c in configs],
            "run": {"epochs": run.epochs, "replicates": run.replicates, "seed": run.seed,
                    "record_every": run.record_every, "dtype": run.dtype, "data": run.data},
            "data": {"name": dataset.name, "n_train": dataset.n_train, "n_test": dataset.n_test,
                     "top_test_share": dataset.top_test_share,
                     "n_features": dataset.n_features,
                     # what simulate's Gaussian inputs need to give the first layer the data's second moment
                     "pixel_rms": float(np.sqrt(np.mean(np.square(dataset.x_train, dtype=np.float64)))),
                     "eval_samples": min(EVAL_SAMPLES, dataset.n_train),
                     "probe_samples": {c.label: probe_size(min(EVAL_SAMPLES, dataset.n_train), c.batch_size)
                                       for c in configs}},
            "steps_per_epoch": {c.label: steps_per_epoch(dataset.n_train, c.batch_size) for c in configs},
            "elapsed_s": time.perf_counter() - start}
    return TrainResult(pd.DataFrame(history), pd.DataFrame(layers), meta)


def run_memory(config: TrainConfig, dtype: str, n_train: int) -> int:
    """What one run holds: its model and step (:func:`.options.memory_bytes`) and its own copy of the
    evaluation images (the data itself, in the run's dtype, is shared)."""
    return memory_bytes(config, dtype) + min(EVAL_SAMPLES, n_train) * config.arch.widths[0] * np.dtype(dtype).itemsize


def step_cost(config: TrainConfig) -> float:
    """A training step's relative cost: the optimizer's and the elementwise work's passes over the
    parameters, and the products' multiply-adds (measured: the study's MLP takes 1.1 ms a step at
    batch 4 and 28 ms at batch 1024 on one core, 26 to 1; this gives 24 to 1)."""
    return 2 * config.arch.dense_params + 0.05 * config.batch_size * config.arch.macs_per_row


def epoch_cost(config: TrainConfig, n_train: int, n_test: int) -> float:
    """An epoch's relative cost, in :func:`step_cost`'s unit: its steps, and its records, which evaluate
    the training images (up to EVAL_SAMPLES), the test images and the probe (measured 0.1 s a record on
    the subset for the study's MLP, as much as training on 3,600 rows at batch 1024)."""
    recorded = min(EVAL_SAMPLES, n_train) + n_test + PROBE_SAMPLES
    return step_cost(config) * steps_per_epoch(n_train, config.batch_size) + 0.03 * recorded * config.arch.macs_per_row


def process_shares(runs: list[tuple[TrainConfig, int]], run: RunOptions, n_train: int, n_test: int, threads: int
                   ) -> list[list[int]]:
    """The runs (configuration x replicate) each process trains, by index, when several train at once
    in forked processes on one thread each; one share (everything here, on ``threads`` threads) when that
    would not be faster or does not fit in memory. A run's step shares out over threads poorly (1.0x at
    batch 4, about 1.2x at 128 and 1.8x at 1024 on two cores: thread hand-overs and the GIL), whole runs
    in processes nearly perfectly (two at once each ran at 0.96-1.0x their speed alone). The longest
    runs are placed first, each on the least loaded process; processes are used when the slowest
    finishes before the runs would one after another on threads (a run taken as 1.5x faster there
    where its step splits the batch over threads, :func:`.model.splits_rows`)."""
    need = max((run_memory(config, run.dtype, n_train) for config, _ in runs), default=1)
    n = min(threads, len(runs), max(1, memory.budget(run.max_memory) // max(need, 1)))
    if n < 2:
        return [list(range(len(runs)))]
    cost = [epoch_cost(config, n_train, n_test) for config, _ in runs]
    shares: list[list[int]] = [[] for _ in range(n)]
    load = [0.0] * n
    for i in sorted(range(len(runs)), key=lambda i: -cost[i]):
        k = load.index(min(load))
        shares[k].append(i)
        load[k] += cost[i]
    on_threads = sum(c / (1.5 if splits_rows(config.batch_size, config.arch.macs_per_row) else 1.0)
                     for c, (config, _) in zip(cost, runs))
    if max(load) >= on_threads:
        return [list(range(len(runs)))]
    return [sorted(share) for share in shares]


def total_epochs(configs: list[TrainConfig], run: RunOptions) -> int:
    """How many epochs :func:`fit` reports to ``progress``."""
    return len(configs) * run.replicates * run.epochs


def train(progress: Progress | None = None, threads: int | None = None, **options: Any) -> TrainResult:
    """Train the study's MLP (or any widths) on MNIST and record everything.

    ``options`` are ``varprop train``'s, with underscores; a list of values
    compares every combination. ``threads`` changes the speed, never the numbers (runs may train
    in forked processes: :func:`process_shares`; ``threads=1`` keeps them in this one).

    >>> import varprop
    >>> r = varprop.train(widths="784,32,10", activation="relu", bn_count=[0, 1], epochs=1, replicates=1,
    ...                   data="subset")
    >>> sorted(r.history["config"].unique()), r.history["epoch"].tolist()
    (['bn_count=0', 'bn_count=1'], [0.0, 1.0, 0.0, 1.0])
    >>> bool(r.history["test_accuracy"].iloc[-1] > 0.5)  # one epoch, 32 steps: far above chance (0.1)
    True
    """
    configs, run, dataset = resolve(options)
    return fit(configs, run, dataset, progress, threads)


def resolve(options: Mapping[str, Any]) -> tuple[list[TrainConfig], RunOptions, data_mod.Dataset]:
    """Configurations, run options and the data, validated before any training starts."""
    configs, run = expand(options)
    dataset = data_mod.load(run.data, run.seed, n_classes=min(c.arch.widths[-1] for c in configs))
    features = dataset.n_features
    for c in configs:
        if c.arch.widths[0] != features:
            raise SpecError("widths", f"the input width {c.arch.widths[0]} differs from the data's {features} "
                            "features per image")
    return configs, run, dataset


__all__ = ["EVAL_SAMPLES", "PROBE_SAMPLES", "TrainResult", "eval_indices", "fit", "resolve", "shuffle_order",
           "steps_per_epoch", "total_epochs", "train", "train_replicate"]

"""The training readings' rules (varprop/train/reading.py), on curves whose answer is known."""

import math

import numpy as np
import pandas as pd

from varprop.train.reading import _Run


def _history(rates: dict[str, float], epochs: int = 10, seeds: int = 3) -> pd.DataFrame:
    """Keras' epoch losses 2.3 exp(-rate epoch) per configuration, each seed off by a few per cent."""
    rows = []
    for config, rate in rates.items():
        for r in range(seeds):
            for e in range(epochs + 1):
                loss = 2.3 * math.exp(-rate * e) * (1 + 0.02 * (r - 1))
                rows.append({"config": config, "replicate": r, "step": 32 * e, "epoch": float(e),
                             "train_loss": loss, "train_loss_keras": loss, "test_accuracy": 0.5})
    return pd.DataFrame(rows)


def _run(rates: dict[str, float]) -> _Run:
    return _Run(_history(rates), pd.DataFrame(), {"run": {"epochs": 10, "replicates": 3}})


def test_more_than_twice_as_fast_is_further_in_half_the_epochs_than_the_other_in_all():
    # Exponential decay: twice the rate is exactly twice as fast. 2.5x: further at epoch 5 than the other at 10.
    m, lo, hi, n = _run({"a": 0.25, "b": 0.1}).halfway_vs_end("a", "b")
    assert n == 3 and hi < 0
    # 1.5x the rate: at epoch 5 still above where the other ends.
    m, lo, hi, n = _run({"a": 0.15, "b": 0.1}).halfway_vs_end("a", "b")
    assert lo > 0
    # A model that never leaves its initial loss is outrun by anything that learns.
    assert _run({"a": 0.05, "b": 0.0}).halfway_vs_end("a", "b")[2] < 0


def test_epochs_to_a_loss_differ_by_the_rates():
    run = _run({"a": 0.2, "b": 0.1})
    target = 2.3 * math.exp(-0.5)
    m, lo, hi, n = run.reach_diff("a", "b", target)
    # 2.5 against 5 epochs (each seed's offset moves both by the same few hundredths)
    assert n == 3 and np.isclose(m, -2.5, atol=0.2) and hi < 0

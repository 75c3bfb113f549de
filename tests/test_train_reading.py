"""The training readings' rules (varprop/train/reading.py), on curves whose answer is known."""

import math

import numpy as np
import pandas as pd

from varprop.train import reading
from varprop.train.reading import _Run

EPOCHS, SEEDS, STEPS = 10, 3, 32


def _history(rates: dict[str, float]) -> pd.DataFrame:
    """Keras' epoch losses 2.3 exp(-rate epoch) per configuration, each seed off by a few per cent."""
    rows = []
    for config, rate in rates.items():
        for r in range(SEEDS):
            for e in range(EPOCHS + 1):
                loss = 2.3 * math.exp(-rate * e) * (1 + 0.02 * (r - 1))
                rows.append({"config": config, "replicate": r, "step": STEPS * e, "epoch": float(e),
                             "train_loss": loss, "train_loss_keras": loss,
                             "test_accuracy": 0.1 + 0.8 * (1 - math.exp(-rate * EPOCHS)) + 0.01 * r})
    return pd.DataFrame(rows)


def _run(rates: dict[str, float]) -> _Run:
    # Layer 1 and the logits (layer 2) at the start and at the end of epoch 1, for the readings' "why" lines.
    layers = pd.DataFrame([{"config": c, "replicate": r, "step": step, "layer": layer, "delta_std": 1.0,
                            "post_std": 0.1, "update_ratio": 1e-4}
                           for c in rates for r in range(SEEDS) for step in (0, STEPS) for layer in (1, 2)])
    meta = {"run": {"epochs": EPOCHS, "replicates": SEEDS}, "steps_per_epoch": {c: STEPS for c in rates},
            "data": {"n_train": 4000, "n_test": 1000}}
    return _Run(_history(rates), layers, meta)


def _verdict(lines: list[str]) -> str:
    return next(line for line in lines if line.startswith("**Verdict:"))


def test_more_than_twice_as_fast_is_further_in_half_the_epochs_than_the_other_in_all():
    # Exponential decay: twice the rate is exactly twice as fast. 2.5x: further at epoch 5 than the other at 10.
    m, lo, hi, n = _run({"a": 0.25, "b": 0.1}).halfway_vs_end("a", "b")
    assert n == SEEDS and hi < 0
    # 1.5x the rate: at epoch 5 still above where the other ends.
    assert _run({"a": 0.15, "b": 0.1}).halfway_vs_end("a", "b")[1] > 0


def test_sigmoid_bn_holds_only_for_more_than_twice_as_fast():
    assert "holds." in _verdict(reading.sigmoid_bn(_run({"bn_count=1": 0.25, "bn_count=0": 0.1})))
    # Lower at the end, but at half the run still above the other's end: in part.
    assert "holds in part." in _verdict(reading.sigmoid_bn(_run({"bn_count=1": 0.15, "bn_count=0": 0.1})))
    assert "does not hold" in _verdict(reading.sigmoid_bn(_run({"bn_count=1": 0.1, "bn_count=0": 0.15})))


def test_relu_is_insensitive_to_bn_layers_only_without_a_significant_difference():
    sigmoid = {f"sigmoid, bn_count={k}": 0.05 * k for k in range(1, 5)}  # each added layer lowers the loss
    same = _run({**sigmoid, **{f"relu, bn_count={k}": 0.3 for k in range(1, 5)}})
    assert "holds." in _verdict(reading.bn_layers(same))
    # More layers reach the halfway loss sooner, every seed alike: a difference, whatever its size.
    faster = _run({**sigmoid, **{f"relu, bn_count={k}": 0.3 + 0.02 * k for k in range(1, 5)}})
    verdict = _verdict(reading.bn_layers(faster))
    assert "holds in part." in verdict and "2 vs 1, 3 vs 1, 4 vs 1 differ" in verdict


def test_epochs_to_a_loss_differ_by_the_rates_and_are_unknown_if_a_seed_never_gets_there():
    run = _run({"a": 0.2, "b": 0.1})
    m, lo, hi, n = run.reach_diff("a", "b", 2.3 * math.exp(-0.5))
    # 2.5 against 5 epochs (each seed's offset moves both by a tenth of an epoch or so)
    assert n == SEEDS and np.isclose(m, -2.5, atol=0.2) and hi < 0
    # b's slowest seed does not get to 2.3 exp(-1.005) within 10 epochs: no interval over the other two
    assert all(math.isnan(v) for v in run.reach_diff("a", "b", 2.3 * math.exp(-1.005))[:3])


def test_the_loss_curves_name_a_line_hidden_under_another(tmp_path, monkeypatch):
    """Two configurations that learn alike draw one line over the other: the figure says so under its legend,
    as every other figure does (batch sizes 64, 256 and 1024 without BN lay at chance unnamed)."""
    from varprop.report import figures, training

    saved = []
    real = figures.save
    monkeypatch.setattr(figures, "save", lambda fig, path: saved.append(fig) or real(fig, path))
    history = _history({"batch_size=64": 0.0, "batch_size=256": 0.0, "batch_size=4": 0.2})
    history["test_loss"] = history["train_loss"]
    configs = [{"label": c, "varied": {"batch_size": int(c.split("=")[1])}, "options": {}}
               for c in ("batch_size=4", "batch_size=64", "batch_size=256")]
    training.loss_curves(history, {"configs": configs, "run": {"replicates": SEEDS}}, tmp_path / "loss.png")
    notes = " ".join(t.get_text() for t in saved[-1].texts)
    assert "batch_size=64 is drawn behind batch_size=256: identical" in notes
    assert "batch_size=4" not in notes

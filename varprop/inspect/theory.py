"""Mean-field theory beside the measurement of a user's model (``varprop inspect``).

Along the data flow the hooks recorded (which module's output feeds which
module), each module's output is predicted from its input's prediction, with
the weights each layer actually has (their mean square over the replicates)
and its real fan-in:

- Linear / Conv: ``q = fan_in_eff * mean(w^2) * E[x^2] + mean(b^2)``; z is a
  zero-mean Gaussian (over the weights) with second moment q, and the cosine
  between samples follows ``c_z = (fan_in_eff mean(w^2) E[x^2] c + mean(b^2)) / q``.
  A convolution's effective fan-in counts the taps that fall inside the
  zero-padded input, averaged over output positions (a 3x3 kernel at the
  border of an 8x8 input sees 6 or 4 of its 9 taps);
- an elementwise activation of a zero-mean Gaussian: E[phi(z)], E[phi(z)^2]
  and the c-map, by :mod:`varprop.theory`'s quadrature;
- batch norm with batch statistics: ``gamma^2 Var / (Var + eps) + beta^2``
  (the correlation after it is not modelled); layer norm alike; dropout
  ``E[x^2] / (1 - p)``; a residual addition: the sum of its operands' second
  moments when one of them is odd in weights of its own (the cross term then
  vanishes in expectation);
- gradients going back (``backward``): ``fan_out_eff * mean(w^2)`` per
  Linear/Conv, ``E[phi'(z)^2]`` per activation, 1 per addition operand, summed
  over a tensor's consumers; only where every module's inputs are seen (a
  closed data flow), and not through batch norm with batch statistics.

Anything else (pooling, attention, a module whose input is not Gaussian)
stops the chain: the ``theory`` column says why. A Linear, Conv or norm layer
after such a stop starts a new chain from its measured input ("restart").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..theory import cos_post, moments
from . import load_torch

_LN10 = math.log(10.0)


@dataclass(frozen=True)
class Pred:
    """A predicted tensor: E[x^2] and E[x] per position (a map over the axes other than samples and
    channels: a convolution's border sees fewer taps), the cosine between samples, and what the next module
    may assume."""

    m2: np.ndarray
    mean: np.ndarray
    cos: float
    gauss: bool  # a zero-mean Gaussian per entry (over the weights): an activation's theory applies
    sym: bool  # odd in weights no other operand shares: E[this * other] = 0
    basis: str


def _uniform(m2: float, mean: float, cos: float, gauss: bool, sym: bool, basis: str) -> Pred:
    return Pred(np.asarray(m2, float), np.asarray(mean, float), cos, gauss, sym, basis)


def _kind(module: Any, info: dict[str, Any]) -> str:
    """What the theory makes of a module."""
    name = type(module).__name__
    if getattr(module, "fname", None):  # a traced functional call
        if module.fname == "add":
            return "add"
        return "act" if info.get("act") is not None else "other"
    if not type(module).__module__.startswith("torch.nn."):
        return "other"
    if info.get("act") is not None:
        return "act"
    if name == "Linear":
        return "linear"
    if name in ("Conv1d", "Conv2d", "Conv3d"):
        return "conv"
    if name in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "GroupNorm"):
        return "bn"  # normalised over the batch (or the group) and every position
    if name in ("LayerNorm", "RMSNorm"):
        return "norm"  # normalised per sample and position when over the last axis only
    if name in ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d"):
        return "dropout"
    if name in ("Identity", "Flatten", "Unflatten"):
        return "pass"
    return "other"


def _mean_square(t: Any) -> float:
    return float(t.detach().double().square().mean()) if t is not None and t.numel() else 0.0


def _mean_of(t: Any) -> float:
    return float(t.detach().double().mean()) if t is not None and t.numel() else 0.0


def describe(module: Any, info: dict[str, Any], out_shape: tuple[int, ...]) -> dict[str, Any]:
    """What the theory needs of one module call (its parameters as this replicate drew them)."""
    kind = _kind(module, info)
    type_name = f"{module.fname}()" if getattr(module, "fname", None) else type(module).__name__
    node: dict[str, Any] = {"kind": kind, "type": type_name, "act": info.get("act"),
                            "sources": list(info["sources"]), "in_shape": info.get("in_shape"),
                            "out_shape": out_shape}
    for key in ("input_second_moment", "input_cos_sim", "input_mean"):
        if key in info:
            node[key] = info[key]
    weight = getattr(module, "weight", None)
    if kind in ("linear", "conv"):
        w = module.weight
        receptive = math.prod(w.shape[2:]) if w.dim() > 2 else 1
        node.update(fan_in=w.shape[1] * receptive, fan_out=w.shape[0] * receptive, weight_ms=_mean_square(w),
                    bias_ms=_mean_square(module.bias))
        if kind == "conv":
            node["conv"] = {"dims": w.dim() - 2, "kernel": tuple(module.kernel_size), "stride": module.stride,
                            "padding": module.padding, "dilation": module.dilation, "groups": module.groups,
                            "mode": module.padding_mode,
                            "pad": tuple(getattr(module, "_reversed_padding_repeated_twice", ())),
                            "c_in": w.shape[1], "c_out": w.shape[0]}
    elif kind in ("bn", "norm"):
        affine = isinstance(weight, load_torch().nn.Parameter)
        bias = getattr(module, "bias", None) if affine else None
        eps = getattr(module, "eps", None)
        node.update(eps=float(eps) if eps is not None else float(np.finfo(np.float32).eps),
                    gamma2=_mean_square(weight) if affine else 1.0, gamma_mean=_mean_of(weight) if affine else 1.0,
                    beta2=_mean_square(bias), beta_mean=_mean_of(bias),
                    gamma_beta=float((weight.detach().double() * bias.detach().double()).mean())
                    if bias is not None else 0.0,
                    centred=type(module).__name__ != "RMSNorm",
                    last_axis=len(getattr(module, "normalized_shape", (0,))) == 1)
        if type(module).__name__.startswith(("BatchNorm", "SyncBatchNorm")):
            batch = module.training or module.running_mean is None
            node["batch_stats"] = batch
            if not batch:
                node.update(running_ms=_mean_square(module.running_mean),
                            running_var=float(module.running_var.detach().double().mean()))
        if affine:
            node["weight_ms"] = _mean_square(weight)
    elif kind == "dropout":
        node["p"] = float(module.p) if module.training else 0.0
    elif weight is not None and hasattr(weight, "dim") and weight.dim() >= 2:
        node["weight_ms"] = _mean_square(weight)
    return node


def _mean(nodes: list[dict[str, Any]], key: str) -> float:
    values = [n[key] for n in nodes if key in n and n[key] is not None]
    return float(np.mean(values)) if values else math.nan


_GRID = 64  # above this many distinct q in a map, moments are interpolated from this many in log q


def _moments(act: Any, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """E[phi], E[phi^2] and E[phi'^2] under z ~ N(0, q), for each q of a map."""
    q = np.asarray(q, float)
    if act.homogeneous:  # closed forms: a+ z above 0, a- z below
        a, b = act.slope_pos, act.slope_neg
        root = np.sqrt(np.maximum(q, 0.0))
        return ((a - b) / math.sqrt(2 * math.pi) * root, (a * a + b * b) / 2 * q,
                np.full(q.shape, (a * a + b * b) / 2))
    values, inverse = np.unique(q, return_inverse=True)
    grid = values if len(values) <= _GRID else np.geomspace(values[0], values[-1], _GRID)
    res = np.array([_moments_at(act, v) for v in grid])
    if grid is not values:  # smooth in log q: linear interpolation there is accurate to ~1e-5
        res = np.array([np.interp(np.log(values), np.log(grid), res[:, k]) for k in range(3)]).T
    res = res[inverse.reshape(q.shape)]
    return res[..., 0], res[..., 1], res[..., 2]


def _moments_at(act: Any, q: float) -> tuple[float, float, float]:
    if q <= 0:
        zero = np.zeros(1)
        phi0 = float(act.phi(zero)[0])
        return phi0, phi0 * phi0, float(act.dphi(zero)[0]) ** 2
    mo = moments(act, math.log(q))
    return mo.mean, math.exp(mo.log_m2), mo.dphi2


def _fit(m: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A map on ``shape``: itself, broadcast from one value, or (a different layout) its mean everywhere."""
    m = np.asarray(m, float)
    if m.shape == tuple(shape):
        return m
    return np.full(tuple(shape), float(m.mean()) if m.size else math.nan)


def _conv_map(conv: dict[str, Any], m: np.ndarray, in_spatial: Sequence[int], transpose: bool = False
              ) -> np.ndarray:
    """Sum over each output position's taps of ``m`` (forward), or over each input position's outputs of
    ``m`` (``transpose``: the gradient going back), with the convolution's padding, stride and dilation."""
    import torch
    import torch.nn.functional as F

    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[conv["dims"]]
    kernel = torch.ones((1, 1, *conv["kernel"]), dtype=torch.float64)
    x = torch.zeros((1, 1, *in_spatial), dtype=torch.float64, requires_grad=transpose)
    if not transpose:
        x = torch.as_tensor(_fit(m, in_spatial)).reshape(1, 1, *in_spatial)

    def run(inp: Any) -> Any:
        if conv["mode"] != "zeros":  # reflect / replicate / circular: pad, then every tap is inside
            return fn(F.pad(inp, conv["pad"], mode=conv["mode"]), kernel, stride=conv["stride"], padding=0,
                      dilation=conv["dilation"])
        return fn(inp, kernel, stride=conv["stride"], padding=conv["padding"], dilation=conv["dilation"])

    with torch.enable_grad():
        out = run(x)
        if not transpose:
            return out.detach().numpy()[0, 0]
        (grad,) = torch.autograd.grad(out, x, torch.as_tensor(_fit(m, out.shape[2:])).reshape(out.shape))
    return grad.numpy()[0, 0]


def _positions(shape: Sequence[int] | None, axes: tuple[int, int]) -> tuple[int, ...]:
    """The axes other than samples and channels (a map's shape)."""
    if not shape:
        return ()
    drop = {axes[0] % len(shape), axes[1] % len(shape)}
    return tuple(d for i, d in enumerate(shape) if i not in drop)


_ODD = ("linear", "tanh")  # phi(-z) = -phi(z): the output stays odd in the weights that made z


def predict(table: pd.DataFrame, replicates: Sequence[Sequence[Any]], backward: bool, generated: bool,
            outputs: set[int] | None = None) -> pd.DataFrame:
    """``table`` with ``theory`` and ``theory_post_*`` (and ``theory_grad`` / ``theory_grad_*``) columns,
    from the rows' data flow (replicate 0's) and their parameters averaged over ``replicates`` (each a list
    of recorded rows)."""
    rows = list(replicates[0])
    by_layer = [[rep[i].node for rep in replicates] for i in range(len(rows))]
    measured = table.groupby("layer")[["post_second_moment", "post_mean", "post_cos_sim"]].mean()
    preds: dict[int, Pred | None] = {}
    reasons: dict[int, str] = {}
    names = {row.layer: row.name for row in rows}

    def unpredicted(src: int | None) -> str:
        if src is None:
            return ("input unseen: made, or changed in place, by an operation the hooks do not see or a module "
                    "left out of the selection")
        return f"input ({names.get(src, 'unseen')}) not predicted"

    def measured_input(layer: int, src: int | None) -> Pred | None:
        nodes = by_layer[layer]
        if src is not None and src in measured.index:
            m = measured.loc[src]
            m2, mean, cos = float(m["post_second_moment"]), float(m["post_mean"]), float(m["post_cos_sim"])
        elif "input_second_moment" in nodes[0]:
            m2, mean, cos = (_mean(nodes, "input_second_moment"), _mean(nodes, "input_mean"),
                             _mean(nodes, "input_cos_sim"))
        else:
            return None
        return _uniform(m2, mean, cos, False, False, f"restart at {names[layer]}")

    for row in rows:
        layer = row.layer
        if layer == 0:
            if generated:
                preds[0] = _uniform(1.0, 0.0, 0.0, True, False, "input")
            else:
                m = measured.loc[0]
                preds[0] = _uniform(float(m["post_second_moment"]), float(m["post_mean"]),
                                    float(m["post_cos_sim"]), False, False, "input")
            continue
        nodes = by_layer[layer]
        node = nodes[0]
        kind = node.get("kind", "other")
        sources = node.get("sources", [])
        src = sources[0] if sources else None
        p_in = preds.get(src) if src is not None else None
        out_pos = _positions(node.get("out_shape"), row.axes)
        pred: Pred | None = None
        why = ""
        if kind in ("linear", "conv"):
            p_in = p_in or measured_input(layer, src)
            if p_in is None:
                why = "input not measured"
            else:
                w_ms, bias = _mean(nodes, "weight_ms"), _mean(nodes, "bias_ms")
                if kind == "linear":
                    in_pos = tuple(node["in_shape"][1:-1])
                    signal = node["fan_in"] * w_ms * _fit(p_in.m2, in_pos)
                else:
                    conv = node["conv"]
                    signal = w_ms * conv["c_in"] * _conv_map(conv, p_in.m2, node["in_shape"][2:])
                q = signal + bias
                mean_q, mean_s = float(np.mean(q)), float(np.mean(signal))
                cos = (mean_s * p_in.cos + bias) / mean_q if mean_q > 0 and math.isfinite(p_in.cos) else math.nan
                pred = Pred(_fit(q, out_pos), np.zeros(out_pos), cos, True, True, p_in.basis)
        elif kind == "act":
            if p_in is None:
                why = unpredicted(src)
            elif not p_in.gauss or np.any(np.abs(p_in.mean) > 1e-12 * np.sqrt(np.maximum(p_in.m2, 1e-300))):
                why = f"input ({names.get(src, 'unseen')}) is not a zero-mean Gaussian"
            else:
                act = node["act"]
                mean, m2, _ = _moments(act, p_in.m2)
                q_avg = float(np.mean(p_in.m2))
                cos = cos_post(act, math.log(q_avg), p_in.cos) if (
                    math.isfinite(p_in.cos) and q_avg > 0) else math.nan
                odd = act.name in _ODD
                pred = Pred(m2, mean, cos, act.name == "linear", odd and p_in.sym, p_in.basis)
        elif kind in ("bn", "norm"):
            p_in = p_in or measured_input(layer, src)
            eps, g2, b2 = _mean(nodes, "eps"), _mean(nodes, "gamma2"), _mean(nodes, "beta2")
            beta_mean, gb = _mean(nodes, "beta_mean"), _mean(nodes, "gamma_beta")
            clean = b2 == 0
            if p_in is None:
                why = "input not measured"
            elif kind == "bn" and not node.get("batch_stats", True):  # eval: running statistics
                if _mean(nodes, "running_ms") != 0:
                    why = "running statistics are not the initial ones"
                else:
                    s2 = _mean(nodes, "running_var") + eps
                    pred = Pred(g2 * p_in.m2 / s2 + 2 * gb * p_in.mean / math.sqrt(s2) + b2,
                                _mean(nodes, "gamma_mean") * p_in.mean / math.sqrt(s2) + beta_mean,
                                p_in.cos if clean else math.nan, p_in.gauss and clean, p_in.sym and clean,
                                p_in.basis)
            elif kind == "bn" or not node.get("last_axis", True):  # over the batch or group and positions
                mu = float(np.mean(p_in.mean))
                s2 = float(np.mean(p_in.m2)) - mu * mu + eps
                dev = p_in.m2 - 2 * p_in.mean * mu + mu * mu
                pred = Pred(g2 * dev / s2 + 2 * gb * (p_in.mean - mu) / math.sqrt(s2) + b2,
                            _mean(nodes, "gamma_mean") * (p_in.mean - mu) / math.sqrt(s2) + beta_mean,
                            math.nan, p_in.gauss and clean, p_in.sym and clean, p_in.basis)
            else:  # per sample and position, over the last axis
                var = p_in.m2 - p_in.mean**2 if node.get("centred", True) else p_in.m2
                centred = node.get("centred", True) or np.all(p_in.mean == 0)
                pred = Pred(g2 * var / (var + eps) + b2, np.full(np.shape(var), beta_mean),
                            p_in.cos if clean and centred and np.all(p_in.mean == 0) else math.nan,
                            p_in.gauss and clean, p_in.sym and clean, p_in.basis)
        elif kind == "dropout":
            if p_in is None:
                why = unpredicted(src)
            else:
                p = _mean(nodes, "p")
                pred = replace(p_in, m2=p_in.m2 / (1 - p), cos=p_in.cos * (1 - p), gauss=p_in.gauss and p == 0)
        elif kind == "pass":
            pred = p_in
            why = "" if p_in is not None else unpredicted(src)
        elif kind == "add":
            pa = preds.get(sources[0]) if len(sources) > 0 and sources[0] is not None else None
            pb = preds.get(sources[1]) if len(sources) > 1 and sources[1] is not None else None
            if pa is None or pb is None:
                why = "an operand is not predicted"
            elif not (pa.sym or pb.sym):
                why = "the operands' cross term is not known (neither is odd in weights of its own)"
            else:
                try:
                    m2, mean = pa.m2 + pb.m2, pa.mean + pb.mean
                except ValueError:
                    m2 = mean = None
                if m2 is None:
                    why = "the operands' maps do not line up"
                else:
                    total = float(np.mean(m2))
                    cos = (float(np.mean(pa.m2)) * pa.cos + float(np.mean(pb.m2)) * pb.cos) / total \
                        if total > 0 else math.nan
                    basis = pa.basis if pa.basis == pb.basis else f"{pa.basis}; {pb.basis}"
                    pred = Pred(m2, mean, cos, pa.gauss and pb.gauss, pa.sym and pb.sym, basis)
        else:
            why = f"{node.get('type', 'this module')} is not modelled"
        preds[layer] = pred
        if pred is None:
            reasons[layer] = why

    def label(layer: int) -> str:
        p = preds.get(layer)
        return p.basis if p is not None else f"n/a: {reasons.get(layer, '')}"

    scalars = {k: (float(np.mean(v.m2)), float(np.mean(v.mean)), v.cos) for k, v in preds.items() if v is not None}
    out = table.copy()
    out["theory"] = out["layer"].map(label)
    for col, values in _columns("post", scalars).items():
        out[col] = out["layer"].map(values)
    if backward:
        grad, why_grad = _backward(rows, by_layer, preds, outputs)
        out["theory_grad"] = out["layer"].map(lambda layer: "mean field" if layer in grad else
                                              f"n/a: {why_grad.get(layer, '')}")
        scalars = {k: (float(np.mean(v)), 0.0, math.nan) for k, v in grad.items()}
        for col, values in _columns("grad", scalars).items():
            if not col.endswith("cos_sim"):
                out[col] = out["layer"].map(values)
    return out


def _columns(side: str, preds: dict[int, tuple[float, float, float]]) -> dict[str, dict[int, float]]:
    cols: dict[str, dict[int, float]] = {f"theory_{side}_{k}": {} for k in
                                         ("mean", "std", "log10_std", "second_moment", "cos_sim")}
    for layer, (m2, mean, cos) in preds.items():
        var = max(m2 - mean * mean, 0.0)
        cols[f"theory_{side}_mean"][layer] = mean
        cols[f"theory_{side}_std"][layer] = math.sqrt(var)
        cols[f"theory_{side}_log10_std"][layer] = 0.5 * math.log10(var) if var > 0 else -math.inf
        cols[f"theory_{side}_second_moment"][layer] = m2
        cols[f"theory_{side}_cos_sim"][layer] = cos
    return cols


def _backward(rows: Sequence[Any], by_layer: list[list[dict[str, Any]]], preds: dict[int, Pred | None],
              outputs: set[int] | None) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    """Predicted E[g^2] per position of the gradient with respect to each row's output, for a N(0, 1)
    gradient entering the model's outputs (a tensor used twice sums both paths' gradients, whose cross term
    vanishes in expectation); and why, where there is none."""
    why: dict[int, str] = {}
    open_rows = [r for r in rows if r.layer > 0 and (not r.sources or any(s is None for s in r.sources))]
    if outputs is None or open_rows:
        reason = (f"{open_rows[0].name} takes an input the hooks do not see" if open_rows else
                  "the model's output is not a measured module's")
        return {}, {r.layer: reason for r in rows}
    consumers: dict[int, list[tuple[int, int]]] = {r.layer: [] for r in rows}
    for r in rows:
        for pos, s in enumerate(r.sources):
            consumers[s].append((r.layer, pos))
    grad: dict[int, np.ndarray] = {}
    for r in reversed(rows):
        shape = _positions(r.shape, r.axes)
        total = np.full(shape, 1.0 if r.layer in outputs else 0.0)
        ok = True
        for c, pos in consumers[r.layer]:
            if c not in grad:
                ok, why[r.layer] = False, why.get(c, f"the gradient of {rows[c].name} is not predicted")
                break
            contrib, reason = _through(by_layer[c], preds.get(rows[c].sources[0]), pos, rows[c], grad[c])
            if contrib is None:
                ok, why[r.layer] = False, reason
                break
            total = total + _fit(contrib, shape)
        if ok:
            grad[r.layer] = total
    return grad, why


def _through(nodes: list[dict[str, Any]], p_in: Pred | None, pos: int, row: Any, g: np.ndarray
             ) -> tuple[np.ndarray | None, str]:
    """E[g_in^2] per input position through one consumer, for its input at ``pos``, from its E[g_out^2]."""
    node = nodes[0]
    kind = node.get("kind", "other")
    name = node.get("type", "module")
    if kind == "add":
        return (g, "") if len(set(row.sources)) == len(row.sources) else (None, "an addition of a tensor to itself")
    if pos != 0:
        return None, f"{name} takes several inputs"
    if kind == "linear":
        return _mean(nodes, "fan_out") * _mean(nodes, "weight_ms") * _fit(g, node["in_shape"][1:-1]), ""
    if kind == "conv":
        conv = node["conv"]
        back = _conv_map(conv, g, node["in_shape"][2:], transpose=True)
        return _mean(nodes, "weight_ms") * conv["c_out"] / conv["groups"] * back, ""
    if kind == "act":
        if p_in is None:
            return None, f"{name}'s input is not predicted"
        return _moments(node["act"], p_in.m2)[2] * _fit(g, np.shape(p_in.m2)), ""
    if kind == "dropout":
        return g / (1.0 - _mean(nodes, "p")), ""
    if kind == "pass":
        return g, ""
    if kind == "bn" and not node.get("batch_stats", True):
        return g * _mean(nodes, "gamma2") / (_mean(nodes, "running_var") + _mean(nodes, "eps")), ""
    if kind in ("bn", "norm"):
        return None, f"gradients through {name} are not modelled"
    return None, f"{name} is not modelled"


def residual_theory(residual: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """The residual table with the predicted second moments of skip, branch and sum (where predicted)."""
    th = table.groupby("layer")["theory_post_second_moment"].first() if "theory_post_second_moment" in table \
        else pd.Series(dtype=float)
    out = residual.copy()
    for part, col in (("skip", "skip_layer"), ("branch", "branch_layer"), ("sum", "layer")):
        out[f"theory_{part}_second_moment"] = out[col].map(lambda v: th.get(v, math.nan) if v is not None and
                                                           not (isinstance(v, float) and math.isnan(v))
                                                           else math.nan)
    return out

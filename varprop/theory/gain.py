"""Gains of an activation in both conventions, computed exactly, with the
published tables beside them (never in place of them).

>>> round(gains("relu")["variance_gain"], 6)
1.712859
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from ..nn import activations
from ..nn.activations import Activation
from .quadrature import expect

# Published gain tables, shown beside ours (never in place of them).
TORCH_GAIN = {"linear": 1.0, "sigmoid": 1.0, "tanh": 5 / 3, "relu": math.sqrt(2.0), "selu": 3 / 4}


NFNET_GAMMA = {  # nfnets' _nonlin_gamma, estimated by sampling
    "linear": 1.0, "relu": 1.7139588594436646, "gelu": 1.7015043497085571, "silu": 1.7881293296813965,
    "tanh": 1.5939117670059204, "sigmoid": 4.803835391998291, "elu": 1.2716004848480225,
    "selu": 1.0008515119552612, "softplus": 1.9203323125839233, "leaky_relu": 1.70590341091156,
}


def gains(act: Activation | str | Callable[[np.ndarray], np.ndarray], leaky_slope: float = 0.01) -> dict[str, Any]:
    """Both gains (ARCHITECTURE.md, "Definitions") for z ~ N(0, 1), with the published tables beside.

    second_moment_gain = 1/sqrt(E[phi(z)^2]) (PyTorch's convention);
    variance_gain = 1/sqrt(Var phi(z)) (NFNets' gamma). ``act`` may be any
    callable on numpy arrays.
    """
    if isinstance(act, str):
        act = activations.get(act, leaky_slope)
    name, phi = (act.name, act.phi) if isinstance(act, Activation) else (getattr(act, "__name__", "custom"), act)
    m = expect(phi)
    m2 = expect(lambda z: phi(z) ** 2)
    var = expect(lambda z: (phi(z) - m) ** 2)
    torch = TORCH_GAIN.get(name)
    if name == "leaky_relu":
        torch = math.sqrt(2 / (1 + leaky_slope**2))
    return {"activation": name, "second_moment_gain": 1 / math.sqrt(m2), "variance_gain": 1 / math.sqrt(var),
            "mean": m, "second_moment": m2, "variance": var, "torch_calculate_gain": torch,
            "nfnets_gamma": NFNET_GAMMA.get(name) if name != "leaky_relu" or leaky_slope == 0.01 else None}

"""Mean-field theory, split by question: quadrature rules (quadrature.py),
an activation's expectations and c-map at one q (cmap.py), per-layer
predictions for a network (perlayer.py), fixed points, phases and depth scales
(meanfield.py), gains (gain.py) and residual stacks (residual.py).
ARCHITECTURE.md, "Definitions", states what each computes.

>>> round(gains("relu")["variance_gain"], 6)
1.712859
"""

from .cmap import Moments, cos_post, moments
from .gain import NFNET_GAMMA, TORCH_GAIN, gains
from .meanfield import SIGMA_B_MAX, SIGMA_W_RANGE, check_sigmas, fixed_point, mean_field, phase_grid, q_map
from .perlayer import bias_log_variance, predict
from .quadrature import expect, nodes

__all__ = ["Moments", "NFNET_GAMMA", "SIGMA_B_MAX", "SIGMA_W_RANGE", "TORCH_GAIN", "bias_log_variance",
           "check_sigmas", "cos_post", "expect", "fixed_point", "gains", "mean_field", "moments", "nodes",
           "phase_grid", "predict", "q_map"]

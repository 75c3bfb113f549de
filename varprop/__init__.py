"""varprop: how signals propagate through deep networks at initialization.

>>> import varprop
>>> spec = varprop.NetworkSpec.square(layers=10, width=64, init="he", activation="relu")
>>> df = varprop.simulate(spec, samples=128, seed=0)
>>> len(df), round(float(df["theory_post_second_moment"].iloc[-1]), 9)  # He init keeps E[h^2] = 1 through relu
(11, 1.0)
"""

__version__ = "0.1.0"

from .engine import simulate  # noqa: E402
from .spec import InitSpec, NetworkSpec, RunSpec, SpecError  # noqa: E402
from .stats import summarize  # noqa: E402

__all__ = ["InitSpec", "NetworkSpec", "RunSpec", "SpecError", "simulate", "summarize", "__version__"]

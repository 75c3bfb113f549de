"""varprop: how signals propagate through deep networks at initialization.

The public names load on first use, so ``import varprop`` is cheap (no
pandas, SciPy or matplotlib until a function needs them).

>>> import varprop
>>> spec = varprop.NetworkSpec.square(layers=10, width=64, init="he", activation="relu")
>>> df = varprop.simulate(spec, samples=128, seed=0)
>>> len(df), round(float(df["theory_post_second_moment"].iloc[-1]), 9)  # He init keeps E[h^2] = 1 through relu
(11, 1.0)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {"simulate": "montecarlo", "InitSpec": "spec", "NetworkSpec": "spec", "RunSpec": "spec",
           "SpecError": "errors", "summarize": "stats", "sweep": "sweeps", "train": "train"}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'varprop' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

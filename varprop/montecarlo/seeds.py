"""The random-number tree: every draw of a run comes from its own generator,
keyed by (seed; replicate, layer, role[, block]).

So results do not depend on the order of work or the thread count, and
replicate r of every configuration in a comparison sees the same underlying
draws where shapes and distributions agree (common random numbers): the
configuration is deliberately not in the key (ARCHITECTURE.md, "Random numbers").

>>> a = generator(0, replicate=1, layer=2, role="weights").standard_normal(2)
>>> b = generator(0, replicate=1, layer=2, role="weights").standard_normal(2)
>>> bool((a == b).all())
True
"""

from __future__ import annotations

import numpy as np

# The engine's roles, then the trainer's: its data split (replicate 0, layer 0), each epoch's shuffle
# (layer = the epoch) and the images its per-layer statistics are measured on.
ROLES = {"inputs": 0, "weights": 1, "bias": 2, "upstream": 3, "split": 16, "shuffle": 17, "probe": 18}


def generator(seed: int, replicate: int, layer: int, role: str, block: int | None = None) -> np.random.Generator:
    """The generator of one (replicate, layer, role[, block]) node of the seed's tree."""
    key = (replicate, layer, ROLES[role]) + (() if block is None else (block,))
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))

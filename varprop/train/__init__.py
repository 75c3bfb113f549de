"""Training the batch-norm study's MLP on real MNIST, with per-layer statistics over training.

Pure NumPy with Keras' semantics: :mod:`.data` (loaders, no download),
:mod:`.model` (Dense, activations, BatchNormalization, softmax
cross-entropy, exact backward), :mod:`.optim` (SGD, Nesterov, Adam),
:mod:`.loop` (epochs, recording), :mod:`.options` (the option table).

``varprop.train(...)`` runs it (:func:`.loop.train`): this package is
callable, so the name means the same whether ``varprop.train`` resolves to
the function or, once a submodule is imported, to the package.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from .loop import TrainResult, train

__all__ = ["TrainResult", "train"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> TrainResult:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

"""The one exception type for bad input, importable without NumPy (the CLI's
error handler needs it before any command loads)."""

from __future__ import annotations


class SpecError(ValueError):
    """A bad option value; ``str()`` is the one line shown to the user.

    >>> str(SpecError("bn_eps", "a number >= 0"))
    '--bn-eps: a number >= 0'
    """

    def __init__(self, option: str, message: str):
        self.option = option
        name = option if option.isupper() else "--" + option.replace("_", "-")  # RUN_DIR: an argument
        super().__init__(f"{name}: {message}")

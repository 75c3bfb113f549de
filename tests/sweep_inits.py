"""User inits for tests/test_sweep.py, imported by the dask workers (module:function)."""

import os
import signal
import tempfile

import numpy as np


def _normal(rng, fan_in, fan_out):
    return rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)


def boom(rng, fan_in, fan_out):
    """Fails on layers of fan_in 24: one configuration of a grid raises, the others run."""
    if fan_in == 24:
        raise ValueError("no init for fan_in 24 <b>|x|</b>")  # markup a report must show as text
    return _normal(rng, fan_in, fan_out)


MARKER = os.path.join(tempfile.gettempdir(), f"varprop-test-die-once-{os.getuid()}")


def die_once(rng, fan_in, fan_out):
    """Kills the worker process running it the first time it is called (the
    marker file records that it did), then draws like _normal."""
    if not os.path.exists(MARKER):
        with open(MARKER, "w") as fh:
            fh.write(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return _normal(rng, fan_in, fan_out)

"""A worker plugin small enough to load in a moment (it is sent to every worker as it starts)."""

from __future__ import annotations

import signal
import threading
from typing import Any

from distributed import WorkerPlugin


class IgnoreSigint(WorkerPlugin):
    """Worker plugin: Ctrl-C in a terminal reaches the whole process group;
    the driver handles it and stops the workers, which must not die of it
    first (each would print a KeyboardInterrupt traceback)."""

    name = "varprop-ignore-sigint"

    def setup(self, worker: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)

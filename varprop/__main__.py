"""``python -m varprop ...`` == ``varprop ...``."""

from .cli import run

run()

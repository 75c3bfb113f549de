"""``python -m varprop ...`` == ``varprop ...``."""

from .cli import main

main()

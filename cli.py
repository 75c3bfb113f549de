"""Run the varprop CLI from a checkout: ``python cli.py simulate ...`` == ``varprop simulate ...``."""

from varprop.cli import run

if __name__ == "__main__":
    run()

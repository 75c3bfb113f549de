"""Collection settings for the repository's own test run (users' suites get varprop.pytest_plugin)."""

import importlib.util

# PyTorch is an optional extra: without it, the doctests of the module that needs it are not collected
# (tests/test_inspect.py skips itself).
collect_ignore = [] if importlib.util.find_spec("torch") else ["varprop/torch.py"]

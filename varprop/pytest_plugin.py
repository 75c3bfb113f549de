"""pytest plugin (entry point ``pytest11``): the ``varprop_check`` fixture.

Loaded by pytest only; ``import varprop`` never imports pytest.

    def test_my_init_is_healthy(varprop_check):
        varprop_check.assert_preserves_variance("mypkg.inits:my_init", "relu", depth=30)
"""

from __future__ import annotations

import pytest

from . import testing


@pytest.fixture
def varprop_check():  # type: ignore[no-untyped-def]
    """The :mod:`varprop.testing` assertions."""
    return testing


def pytest_configure(config):  # type: ignore[no-untyped-def]
    config.addinivalue_line("markers", "varprop: tests that check network initializations with varprop")

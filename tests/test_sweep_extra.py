"""Without the sweep extra (dask.distributed, pyarrow), varprop sweep says in
one line what to install. Runs whether or not the extra is installed: a
missing package is simulated by blocking its import (sys.modules[name] = None)."""

import importlib.util
import sys

import pytest
from click.testing import CliRunner

import varprop
from varprop.cli import main
from varprop.errors import SpecError


@pytest.mark.parametrize("missing", [("distributed",), ("pyarrow",), ("distributed", "pyarrow")])
def test_missing_extra_names_the_install(monkeypatch, tmp_path, missing):
    for name in {"distributed", "pyarrow"} - set(missing):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed either")
    for name in missing:
        monkeypatch.setitem(sys.modules, name, None)
    grid = tmp_path / "g.toml"
    grid.write_text("layers = [2, 3]\n")
    need = " and ".join(missing)
    r = CliRunner().invoke(main, ["sweep", str(grid), "--out", str(tmp_path / "o")])
    assert (r.exit_code, r.output) == (2, f"varprop: error: GRID: sweeps need {need}: pip install 'varprop[sweep]'\n")
    with pytest.raises(SpecError, match=r"pip install 'varprop\[sweep\]'"):
        varprop.sweep({"layers": [2, 3]}, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_help_needs_no_extra(monkeypatch):
    for name in ("distributed", "dask", "pyarrow"):
        monkeypatch.setitem(sys.modules, name, None)
    r = CliRunner().invoke(main, ["sweep", "--help"])
    assert r.exit_code == 0 and "GRID.toml" in r.output

"""Bad input, every command: one line on stderr naming the option, exit status
2, no traceback, and nothing written; and extreme values that are valid are
carried exactly (log scale), never turned into NaN or a wrong finite number."""

import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import varprop
from varprop.cli import main


def _files(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.ones((10, 16)))
    np.save(tmp_path / "complex.npy", np.ones((10, 16)) + 1j)
    (tmp_path / "five.toml").write_text("input_file = 5\n")
    (tmp_path / "table.toml").write_text("input_file = {a = 1}\n")
    (tmp_path / "latin1.toml").write_bytes(b"layers = 3\n# caf\xe9\n")
    (tmp_path / "billion.toml").write_text("layers = 1e9\n")
    (tmp_path / "replicates.toml").write_text("replicates = 1e12\nlayers = 3\nwidth = 4\n")


CASES = [  # (arguments, the option the line must name)
    (["simulate", "--input-file", "{tmp}/x.npz", "--layers", "3", "--width", "16"], "--input-file"),
    (["simulate", "--input-file", "{tmp}/complex.npy", "--layers", "3", "--width", "16"], "--input-file"),
    (["simulate", "--config", "{tmp}/five.toml"], "--input-file"),
    (["simulate", "--config", "{tmp}/table.toml"], "--input-file"),
    (["simulate", "--config", "{tmp}/latin1.toml"], "--config"),
    (["simulate", "--config", "{tmp}/billion.toml"], "--max-memory"),
    (["simulate", "--config", "{tmp}/replicates.toml"], "--max-memory"),
    (["simulate", "--config", ""], "--config"),
    (["simulate", "--layers", "9223372036854775807"], "--max-memory"),
    (["simulate", "--layers", "1e9"], "--layers"),
    (["simulate", "--layers", "40000", "--max-memory", "50M"], "--max-memory"),
    (["simulate", "--width", "100000000", "--layers", "2"], "--max-memory"),
    (["simulate", "--seed", "1", "--seed", "2", "--layers", "2"], "--seed"),
    (["simulate", "--replicates", "1", "--replicates", "2", "--layers", "2"], "--replicates"),
    (["theory", "--sigma-w", "1e-308"], "--sigma-w"),
    (["theory", "--sigma-w", "1e300"], "--sigma-w"),
    (["theory", "--sigma-b", "1e300"], "--sigma-b"),
    (["theory", "--layers", "1e18"], "--layers"),
    (["phase", "--sigma-w2-max", "1e308"], "--sigma-w2-max"),
    (["phase", "--resolution", "3000"], "--resolution"),
    (["fit", "--fan-in", "10,100000000"], "--fan-in"),
    (["check", "--layers", "100000000000"], "--max-memory"),
]


@pytest.mark.parametrize("args, option", CASES, ids=[" ".join(a[:3]) for a, _ in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, args, option):
    _files(tmp_path)
    out = tmp_path / "out"
    argv = [a.format(tmp=tmp_path) for a in args]
    if argv[0] in ("simulate", "fit", "phase"):
        argv += ["--out", str(out)]
    result = CliRunner().invoke(main, argv)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith(f"varprop: error: {option}"), result.output
    assert "Traceback" not in result.output and not out.exists()


def test_a_real_process_refuses_a_billion_layers_before_allocating(tmp_path):
    """TOML's layers = 1e9 is an integer-valued float: it used to build an 8 GB tuple before any check."""
    (tmp_path / "billion.toml").write_text("layers = 1e9\n")
    proc = subprocess.run([sys.executable, "-m", "varprop", "simulate", "--config", str(tmp_path / "billion.toml"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--max-memory" in proc.stderr


def test_inputs_near_the_float64_limits_are_carried_exactly(tmp_path):
    """An input file of values near 1e308 (or 1e-310) is scaled by a power of two before the cast, so a
    linear fan_in stack of it gives exactly what the same file at scale 1 gives, shifted by log10 of the
    factor (it gave NaN and -inf)."""
    x = np.random.default_rng(0).standard_normal((40, 16))
    for factor in (1e307, 1e-310):
        np.save(tmp_path / "base.npy", x)
        np.save(tmp_path / "scaled.npy", x * factor)
        spec = varprop.NetworkSpec.square(layers=3, width=16)
        base = varprop.simulate(spec, input_file=str(tmp_path / "base.npy"), seed=0)
        scaled = varprop.simulate(spec, input_file=str(tmp_path / "scaled.npy"), seed=0)
        for col in ("post_log10_std", "theory_post_log10_std"):
            shift = scaled[col].to_numpy() - base[col].to_numpy()
            # float32 compute: each value is rounded at its own scale, so the shift holds to float32's precision
            assert np.allclose(shift, math.log10(factor), rtol=0, atol=1e-6), (factor, col, shift)
        assert np.isfinite(scaled["post_log10_std"]).all() and np.isfinite(scaled["post_log10_abs_mean"]).all()


def test_user_weights_beyond_float32_are_carried_exactly(tmp_path, monkeypatch):
    """A user init returning weights of 1e300 (or 1e-300) was cast to float32 inf (or 0): it is now divided
    by a power of two first, so the stack equals the same init at scale 1, shifted by 300 decades a layer."""
    (tmp_path / "bigweights.py").write_text(
        "import numpy as np\n"
        "def unit(rng, fan_in, fan_out):\n    return rng.standard_normal((fan_in, fan_out))\n"
        "def huge(rng, fan_in, fan_out):\n    return rng.standard_normal((fan_in, fan_out)) * 1e300\n"
        "def tiny(rng, fan_in, fan_out):\n    return rng.standard_normal((fan_in, fan_out)) * 1e-300\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    results = {}
    for name in ("unit", "huge", "tiny"):
        spec = varprop.NetworkSpec.square(layers=3, width=16, init=f"bigweights:{name}")
        results[name] = varprop.simulate(spec, samples=32, seed=0)["post_log10_std"].to_numpy()
    layers = np.arange(4)
    assert np.allclose(results["huge"] - results["unit"], 300 * layers, rtol=0, atol=1e-4)
    assert np.allclose(results["tiny"] - results["unit"], -300 * layers, rtol=0, atol=1e-4)


def test_layers_of_the_table_are_kept_compactly():
    """The per-layer table holds 8 bytes a statistic (a dict per layer held 7 kB): 20,000 layers of a
    linear stack stay within the memory estimate's row budget."""
    import tracemalloc

    from varprop.montecarlo import memory

    spec = varprop.NetworkSpec.square(layers=20_000, width=8)
    tracemalloc.start()
    try:
        df = varprop.simulate(spec, samples=8, seed=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(df) == 20_001 and np.isfinite(df["post_log10_std"]).all()
    assert peak <= memory.run_bytes(varprop.RunSpec(spec, samples=8)), peak
    assert isinstance(df, pd.DataFrame)

"""The command line: happy paths (CliRunner and real subprocesses), the
per-layer table contract, TOML configs, determinism across thread counts, and
every bad-input case of the error contract."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from varprop.cli import main
from varprop.stats import STATS

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--layers", "4", "--width", "16", "--samples", "8"]
CONTRACT = ["config", "replicate", "layer", "fan_in", "fan_out"] + [
    f"{side}_{stat}" for side in ("pre", "post") for stat in STATS]


def run(args, **kw):
    return CliRunner().invoke(main, args, catch_exceptions=False, **kw)


def test_simulate_writes_report(tmp_path):
    out = tmp_path / "run"
    result = run(["simulate", *SMALL, "--init", "he", "--activation", "relu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {".varprop-manifest.json", "config.json", "layers.csv", "report.md",
                                               "report.html",
                                               "summary.json", "std_per_layer.png", "means_per_layer.png",
                                               "correlation_per_layer.png", "histograms.csv", "histograms.png"}
    layers = pd.read_csv(out / "layers.csv")
    assert list(layers.columns[:len(CONTRACT)]) == CONTRACT or set(CONTRACT) <= set(layers.columns)
    assert len(layers) == 5 and list(layers["layer"]) == [0, 1, 2, 3, 4]
    report = (out / "report.md").read_text()
    assert "varprop simulate --layers 4 --width 16" in report and "std_per_layer.png" in report
    meta = json.loads((out / "config.json").read_text())
    assert meta["configs"][0]["options"]["init"] == "he" and meta["seed"] == 0
    assert "report:" in result.output and "post std" in result.output
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging directory left"


def test_rerun_command_reproduces(tmp_path):
    out = tmp_path / "a"
    run(["simulate", *SMALL, "--init", "unit", "--init", "xavier", "--replicates", "2", "--out", str(out)])
    command = json.loads((out / "config.json").read_text())["command"].split()
    assert command[:2] == ["varprop", "simulate"]
    again = tmp_path / "b"
    args = command[2:command.index("--out")] + ["--out", str(again)]
    assert run(["simulate", *args]).exit_code == 0
    assert (out / "layers.csv").read_bytes() == (again / "layers.csv").read_bytes()


def test_comparison_has_one_row_per_config_replicate_layer(tmp_path):
    out = tmp_path / "cmp"
    result = run(["simulate", *SMALL, "--init", "unit", "--init", "fan_in", "--activation", "tanh",
                  "--activation", "relu", "--replicates", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    layers = pd.read_csv(out / "layers.csv")
    assert len(layers) == 4 * 3 * 5
    assert set(layers["config"]) == {"unit, tanh", "unit, relu", "fan_in, tanh", "fan_in, relu"}
    assert {"init", "activation"} <= set(layers.columns)


def test_values_equal_to_six_digits_keep_configurations_apart(tmp_path):
    out = tmp_path / "close"
    result = run(["simulate", *SMALL, "--scale", "0.1", "--scale", "0.1000001", "--format", "csv", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert set(pd.read_csv(out / "layers.csv")["config"]) == {"scale=0.1", "scale=0.1000001"}


def test_a_value_given_twice_is_one_configuration(tmp_path):
    out = tmp_path / "twice"
    result = run(["simulate", *SMALL, "--init", "he", "--init", "unit", "--init", "he", "--format", "csv",
                  "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert list(dict.fromkeys(pd.read_csv(out / "layers.csv")["config"])) == ["he", "unit"]


def test_default_output_directory_is_descriptive(tmp_path):
    proc = _subprocess([sys.executable, str(ROOT / "cli.py"), "simulate", *SMALL], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    runs = list((tmp_path / "reports" / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("linear-fan_in-L4-w16-N8-seed0-")


def test_toml_config_and_cli_override(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('widths = [16, 12, 8]\ninit = ["unit", "fan_in"]\nsamples = 10\nactivation = "tanh"\n')
    out = tmp_path / "out"
    result = run(["simulate", "--config", str(cfg), "--activation", "relu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    layers = pd.read_csv(out / "layers.csv")
    assert set(layers["config"]) == {"unit", "fan_in"} and layers["layer"].max() == 2
    meta = json.loads((out / "config.json").read_text())
    assert meta["configs"][0]["options"]["activation"] == "relu"
    # --layers on the command line replaces the file's widths.
    out2 = tmp_path / "out2"
    assert run(["simulate", "--config", str(cfg), "--layers", "3", "--width", "5", "--out", str(out2)]).exit_code == 0
    assert pd.read_csv(out2 / "layers.csv")["layer"].max() == 3


def test_input_file_gives_samples(tmp_path):
    x = np.random.default_rng(0).standard_normal((12, 16))
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out"
    result = run(["simulate", "--layers", "2", "--width", "16", "--input-file", str(tmp_path / "x.npy"),
                  "--dtype", "float64", "--out", str(out)])
    assert result.exit_code == 0, result.output
    layer0 = pd.read_csv(out / "layers.csv").iloc[0]
    assert layer0["post_mean"] == pytest.approx(x.mean(), rel=1e-12)
    assert layer0["post_std"] == pytest.approx(x.std(), rel=1e-12)


def _subprocess(args, cwd=ROOT, env=None):
    return subprocess.run(args, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=300)


def _installed_varprop() -> str:
    script = Path(sys.executable).with_name("varprop")
    if not script.exists():
        pytest.skip("the varprop console script is not installed beside this Python")
    return str(script)


def test_installed_script_and_checkout_shim(tmp_path):
    for i, prefix in enumerate([[_installed_varprop()], [sys.executable, "cli.py"]]):
        out = tmp_path / f"run{i}"
        proc = _subprocess([*prefix, "simulate", *SMALL, "--out", str(out)])
        assert proc.returncode == 0, proc.stderr
        assert (out / "report.md").exists()
    assert (tmp_path / "run0" / "layers.csv").read_bytes() == (tmp_path / "run1" / "layers.csv").read_bytes()


def test_identical_results_whatever_the_thread_count(tmp_path):
    """varprop's own threads (--threads) and BLAS's (the environment) change
    nothing: every block of work is fixed by the shapes alone."""
    outputs = []
    for threads in ("1", "2", "3"):
        env = {name: threads for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
        out = tmp_path / f"t{threads}"
        proc = _subprocess([sys.executable, "cli.py", "simulate", "--layers", "6", "--width", "384", "--samples",
                            "512", "--activation", "tanh", "--bias-std", "0.1", "--replicates", "2", "--bn-count",
                            "3", "--batch-size", "64", "--backward", "--threads", threads, "--out", str(out)],
                           env=env)
        assert proc.returncode == 0, proc.stderr
        outputs.append((out / "layers.csv").read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]


@pytest.fixture
def bad_files(tmp_path):
    np.save(tmp_path / "narrow.npy", np.zeros((10, 5)))
    x = np.ones((10, 100))
    x[2, 3] = np.nan
    np.save(tmp_path / "nan.npy", x)
    (tmp_path / "a_file").write_text("")
    np.save(tmp_path / "zeros.npy", np.zeros((10, 100)))
    (tmp_path / "bad_table.toml").write_text("simulate = 3\n")
    (tmp_path / "empty_list.toml").write_text("init = []\n")
    return tmp_path


ERRORS = [
    (["--layers", "0"], "--layers"),
    (["--layers", "-5"], "--layers"),
    (["--width", "abc"], "--width"),
    (["--init", "nope"], "--init"),
    (["--widths", "10"], "--widths"),
    (["--samples", "0"], "--samples"),
    (["--input-file", "{tmp}/missing.npy"], "--input-file"),
    (["--input-file", "{tmp}/narrow.npy"], "--input-file"),
    (["--input-file", "{tmp}/nan.npy"], "--input-file"),
    (["--activation", "nope"], "--activation"),
    (["--distribution", "cauchy"], "--distribution"),
    (["--gain", "-1"], "--gain"),
    (["--widths", "10,5", "--layers", "3"], "--widths"),
    (["--init", "no_such_module_xyz:f"], "--init"),
    (["--batch-size", "3", "--samples", "10"], "--batch-size"),
    (["--batch-size", "1"], "--batch-size"),
    (["--bn-count", "5", "--layers", "5"], "--bn-count"),
    (["--bn", "all", "--bn-count", "2"], "--bn-count"),
    (["--bn-layers", "0,2"], "--bn-layers"),
    (["--bn-position", "middle"], "--bn-position"),
    (["--backward", "--layers", "100", "--width", "1000", "--samples", "1000", "--max-memory", "1M"], "--max-memory"),
    (["--max-memory", "lots"], "--max-memory"),
    (["--threads", "0"], "--threads"),
    (["--input-file", "{tmp}/zeros.npy"], "--input-file"),
    (["--init", "os:getcwd"], "--init"),
    (["--layers", "1", "--width", "200000"], "--max-memory"),
    (["--config", "{tmp}/bad_table.toml"], "--config"),
    (["--config", "{tmp}/empty_list.toml"], "--init"),
    (["--config", "{tmp}/missing.toml"], "--config"),
]


@pytest.mark.parametrize("args,option", ERRORS)
def test_bad_input_is_one_line_exit_2_nothing_written(bad_files, args, option):
    args = [a.format(tmp=bad_files) for a in args]
    out = bad_files / "out"
    result = CliRunner().invoke(main, ["simulate", *args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and option in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not [p for p in bad_files.iterdir() if p.name.startswith(".")]


def test_unwritable_out(bad_files):
    result = CliRunner().invoke(main, ["simulate", *SMALL, "--out", str(bad_files / "a_file" / "run")])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "--out" in result.stderr and "not a directory" in result.stderr


def test_error_from_a_real_process_has_no_traceback():
    proc = _subprocess([sys.executable, "cli.py", "simulate", "--layers", "0"])
    assert proc.returncode == 2
    assert proc.stderr == "varprop: error: --layers: expected a positive integer, got '0'\n"
    assert proc.stdout == ""


def test_batch_norm_study_command(tmp_path):
    """The seed study at initialization in one command (smaller batches for speed)."""
    out = tmp_path / "study"
    result = run(["simulate", "--widths", "784,512,256,128,64,10", "--activation", "sigmoid", "--activation", "relu",
                  "--bn-position", "post", "--bn-count", "0", "--bn-count", "1", "--bn-count", "4",
                  "--batch-size", "4", "--batch-size", "64", "--backward", "--out", str(out)])
    assert result.exit_code == 0, result.output
    layers = pd.read_csv(out / "layers.csv")
    assert layers["config"].nunique() == 12 and {"activation", "bn_count", "batch_size"} <= set(layers.columns)
    assert {f"{side}_{stat}" for side in ("grad", "delta") for stat in STATS} <= set(layers.columns)
    assert "weight_grad_norm" in layers and (layers[layers["layer"] > 0]["weight_grad_norm"] > 0).all()
    report = (out / "report.md").read_text()
    assert "input gradient std" in report and "grad std" in report and "--backward" in report
    assert json.loads((out / "config.json").read_text())["configs"][0]["options"]["samples"] == 512


def test_out_never_destroys_other_files(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(main, ["simulate", *SMALL, "--out", str(mine)])
    assert result.exit_code == 2 and "--out" in result.stderr
    assert (mine / "notes.txt").read_text() == "keep me"
    # An earlier run is replaced; a file the user added to it is kept (tests/test_outdir.py has the rest).
    run_dir = tmp_path / "run"
    assert run(["simulate", *SMALL, "--out", str(run_dir)]).exit_code == 0
    (run_dir / "notes.txt").write_text("mine")
    assert run(["simulate", *SMALL, "--seed", "1", "--out", str(run_dir)]).exit_code == 0
    assert (run_dir / "notes.txt").read_text() == "mine" and '"seed": 1' in (run_dir / "config.json").read_text()


def test_failed_run_leaves_no_created_parents(tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((4, 8)))
    out = tmp_path / "a" / "b" / "run"
    result = CliRunner().invoke(main, ["simulate", "--layers", "2", "--width", "8", "--input-file",
                                       str(tmp_path / "x.npy"), "--init", "os:getcwd", "--out", str(out)])
    assert result.exit_code == 2
    assert not (tmp_path / "a").exists()


def test_a_misspelled_choice_gets_a_suggestion():
    result = CliRunner().invoke(main, ["simulate", "--activation", "sigmoud"])
    assert result.exit_code == 2 and "(did you mean sigmoid?)" in result.stderr
    result = CliRunner().invoke(main, ["simulate", "--activation", "zzz"])
    assert result.exit_code == 2 and "did you mean" not in result.stderr


def test_fit_runs_with_other_options_do_not_replace_each_other(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for fan_ins in ("10,20", "10,30"):
        result = CliRunner().invoke(main, ["fit", "--fan-in", fan_ins, "--replicates", "3", "--samples", "20"])
        assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "reports" / "runs").glob("fit-unit-linear-*"))) == 2


def test_comparing_widths_runs_end_to_end(tmp_path):
    """--width repeated compares widths (it crashed: 'cannot insert width, already exists')."""
    out = tmp_path / "w"
    result = run(["simulate", "--layers", "3", "--width", "8", "--width", "16", "--samples", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    layers = pd.read_csv(out / "layers.csv")
    assert sorted(set(layers["config"])) == ["width=16", "width=8"]
    assert set(layers.loc[layers["config"] == "width=16", "width"]) == {16}


@pytest.mark.parametrize("formats", ["csv", "json", "csv,json"])
def test_formats_without_a_report_write_no_figures(tmp_path, formats):
    """--format csv/json wrote the run, then failed with KeyError: 'report'; and drew every figure."""
    out = tmp_path / "f"
    result = run(["simulate", *SMALL, "--format", formats, "--out", str(out)])
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "layers.csv"} <= names and not {n for n in names if n.endswith((".png", ".svg", ".md"))}
    assert ("summary.json" in names) == ("json" in formats)


@pytest.mark.parametrize("args, status", [(["gain", "relu"], 0), (["simulate", "--layers", "0"], 2)])
def test_the_command_ends_without_teardown_but_runs_exit_functions_and_keeps_its_status(args, status):
    # varprop.cli.run ends the process once the command is done (os._exit after the exit functions and a
    # flush): the status, every line of output and an atexit function's output must all survive it.
    code = ("import atexit, sys\n"
            "atexit.register(lambda: print('exit functions ran', flush=True))\n"
            "class Torn:\n"
            "    def __del__(self): print('torn down', flush=True)\n"
            "kept = Torn()\n"
            f"sys.argv = ['varprop', *{args!r}]\n"
            "from varprop.cli import run\n"
            "run()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == status, proc.stderr
    assert proc.stdout.rstrip().endswith("exit functions ran")
    assert "torn down" not in proc.stdout  # the teardown, which would have collected it, was skipped
    if status == 0:
        assert "variance gain" in proc.stdout and "NFNets gamma" in proc.stdout
    else:
        assert proc.stderr.count("\n") == 1 and "--layers" in proc.stderr


def test_the_command_waits_for_a_live_thread_before_ending():
    # Another Python thread alive at the end: the ordinary exit, which waits for it.
    code = ("import sys, threading, time\n"
            "threading.Thread(target=lambda: (time.sleep(3), print('thread done', flush=True))).start()\n"
            "sys.argv = ['varprop', 'gain', 'relu']\n"
            "from varprop.cli import run\n"
            "run()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "thread done" in proc.stdout


@pytest.mark.parametrize("args", [["gain", "relu"], ["--help"], ["--version"]])
def test_a_reader_that_left_ends_the_command_as_sigpipe_would_quietly(args):
    # `varprop gain relu | head -0`: the pipe's reader is gone before the first line. Exit 141 (128 + SIGPIPE),
    # as shells report a tool that SIGPIPE ended, not 1 (check's "fails"), and no traceback; --help and
    # --version too, which click prints while parsing.
    read_end, write_end = os.pipe()
    os.close(read_end)
    proc = subprocess.run([sys.executable, "-m", "varprop", *args], stdout=write_end, stderr=subprocess.PIPE,
                          text=True, timeout=120)
    os.close(write_end)
    assert proc.returncode == 141 and proc.stderr == ""

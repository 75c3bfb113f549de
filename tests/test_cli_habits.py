"""What users of PyTorch, Keras and JAX type: framework names on the command
line, ``varprop theory --init``, ``varprop check``'s simulate options, and
the benchmark's results file."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from varprop.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--layers", "4", "--width", "24", "--samples", "32", "--replicates", "2", "--format", "csv"]


def run(args):
    return CliRunner().invoke(main, args)


def test_a_framework_name_runs_the_same_numbers_as_its_canonical_options(tmp_path):
    alias = run(["simulate", *SMALL, "--init", "Kaiming_Uniform", "--activation", "ReLU", "--out", str(tmp_path / "a")])
    plain = run(["simulate", *SMALL, "--init", "he", "--distribution", "uniform", "--activation", "relu",
                 "--out", str(tmp_path / "b")])
    assert alias.exit_code == plain.exit_code == 0, alias.output + plain.output
    assert (tmp_path / "a" / "layers.csv").read_bytes() == (tmp_path / "b" / "layers.csv").read_bytes()
    configs = [json.loads((tmp_path / d / "config.json").read_text())["configs"] for d in "ab"]
    assert configs[0] == configs[1]
    assert configs[0][0]["options"]["init"] == "he" and configs[0][0]["options"]["distribution"] == "uniform"


def test_a_comparison_of_framework_names_is_labelled_canonically(tmp_path):
    result = run(["simulate", *SMALL, "--init", "kaiming_uniform", "--init", "HeNormal", "--init", "kaiming",
                  "--out", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    configs = json.loads((tmp_path / "c" / "config.json").read_text())["configs"]
    assert [c["label"] for c in configs] == ["he_uniform", "he_truncated_normal", "he"]
    assert [c["options"].get("distribution") for c in configs] == ["uniform", "truncated_normal", None]


@pytest.mark.parametrize("args,message", [
    (["--activation", "rleu"], "--activation: expected one of linear, relu"),
    (["--activation", "rleu"], "(did you mean relu?)"),
    (["--init", "glorot_unifrom"], "(did you mean glorot_uniform?)"),
    (["--init", "he_uniform", "--distribution", "normal"], "--distribution: normal contradicts --init he_uniform"),
    (["--distribution", "gaussian"], "(did you mean normal?)"),
])
def test_misspelled_or_contradicting_names_are_one_line(tmp_path, args, message):
    result = run(["simulate", *SMALL, *args, "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("typed,hint", [("simulat", "; did you mean 'simulate'?"), ("trian", "; did you mean 'train'?"),
                                         ("xyzzy", " (varprop --help lists them)")])
def test_a_misspelled_command_is_one_line_with_the_closest_command(typed, hint):
    result = run([typed, "--layers", "3"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"varprop: error: no command '{typed}'") and hint in result.stderr


def test_report_refuses_a_run_it_does_not_redraw_by_name(tmp_path):
    """fit and phase write their report with their data: report names the command instead of calling the
    directory no varprop run; csv is refused as the run's data, in one line, before anything is read."""
    fit = tmp_path / "fit"
    assert run(["fit", "--fan-in", "50,100", "--replicates", "2", "--samples", "50",
                "--out", str(fit)]).exit_code == 0
    before = {p.name: p.read_bytes() for p in fit.iterdir()}
    result = run(["report", str(fit)])
    assert result.exit_code == 2 and "is a varprop fit run, which is not redrawn" in result.stderr, result.stderr
    for formats in ("csv", "md,csv"):
        result = run(["report", str(fit), "--format", formats])
        assert result.exit_code == 2 and "--format: csv: a run's data files" in result.stderr
    assert {p.name: p.read_bytes() for p in fit.iterdir()} == before


def theory_json(*args):
    result = run(["theory", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_theory_takes_an_init_at_the_width_s_fan():
    he = theory_json("--activation", "relu", "--init", "kaiming_uniform", "--width", "300", "--layers", "3")
    direct = theory_json("--activation", "relu", "--sigma-w", repr(math.sqrt(2)), "--layers", "3")
    assert he["sigma_w"] == pytest.approx(math.sqrt(2), rel=1e-15) and he["sigma_b"] == 0
    # the canonical name, as config.json and labels write it
    assert he["from_init"] == {"init": "he_uniform", "width": 300, "weight_variance": pytest.approx(2 / 300)}
    for key in ("q_star", "chi_1"):
        assert he[key] == pytest.approx(direct[key], rel=1e-12)
    assert he["phase"] == direct["phase"] == "critical"
    for mine, theirs in zip(he["layers"], direct["layers"]):
        assert mine["theory_post_std"] == pytest.approx(theirs["theory_post_std"], rel=1e-12)
    # torch-default: variance 1/(3 fan_in) and its own bias, U(+-1/sqrt(fan_in)): sigma_b^2 = 1/(3 fan_in)
    torch = theory_json("--activation", "tanh", "--init", "torch-default", "--width", "300")
    assert torch["sigma_w"] == pytest.approx(math.sqrt(1 / 3)) and torch["sigma_b"] == pytest.approx(1 / 30)
    # --gain, --scale and --mode apply to the init as in simulate
    scaled = theory_json("--activation", "tanh", "--init", "xavier", "--gain", "2", "--scale", "0.5")
    assert scaled["sigma_w"] == pytest.approx(math.sqrt(2.0))


@pytest.mark.parametrize("args,option", [
    (["--init", "he", "--sigma-w", "1.4"], "--sigma-w"),
    (["--gain", "2"], "--gain"),
    (["--distribution", "uniform"], "--distribution"),
    (["--init", "kaimng"], "--init"),
    (["--init", "os:getcwd"], "--init"),
    (["--init", "he", "--scale", "0"], "--scale"),
])
def test_theory_init_refusals(args, option):
    result = run(["theory", *args])
    assert result.exit_code == 2 and result.stderr.startswith(f"varprop: error: {option}:"), result.stderr
    assert result.stderr.count("\n") == 1


CHECK = ["check", "--layers", "8", "--width", "64", "--samples", "64"]


def test_check_takes_batch_norm_and_init_options():
    bn = run([*CHECK, "--init", "kaiming_normal", "--bn", "all", "--batch-size", "16", "--bn-eps", "0", "--json"])
    assert bn.exit_code == 0, bn.output
    command = json.loads(bn.output)["command"]
    assert all(part in command for part in ("--init he ", "--bn all", "--bn-eps 0.0", "--batch-size 16")), command
    scaled = run([*CHECK, "--init", "he", "--scale", "4"])  # std doubles per layer
    assert scaled.exit_code == 1 and "--scale 4.0" in scaled.output
    gained = run([*CHECK, "--init", "he", "--gain", "1", "--distribution", "uniform", "--mode", "fan_out"])
    assert gained.exit_code == 1 and "leaves the band" in gained.output  # gain 1 with relu halves the variance


@pytest.mark.parametrize("args,option", [
    (["--batch-size", "16"], "--batch-size"),
    (["--bn", "some"], "--bn"),
    (["--bn-count", "9"], "--bn-count"),
    (["--bn", "all", "--bn-eps", "-1"], "--bn-eps"),
    (["--mode", "fan_sum"], "--mode"),
    (["--replicates", "2"], "--replicates"),
    (["--replicates", "auto-ish"], "--replicates"),
])
def test_check_refusals(args, option):
    result = run([*CHECK, *args])
    assert result.exit_code == 2 and result.stderr.startswith(f"varprop: error: {option}:"), result.stderr


def test_quick_benchmark_does_not_replace_the_committed_results():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "benchmarks" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    committed = ROOT / "benchmarks" / "RESULTS.md"
    assert bench.destination(quick=True, results=None, write=False) is None
    assert bench.destination(quick=True, results=None, write=True) == committed
    assert bench.destination(quick=False, results=None, write=False) == committed
    assert bench.destination(quick=True, results="q.md", write=False) == Path("q.md")

"""``varprop train`` as a user meets it: a run's files, the reproduce command,
bad input (one line, exit 2, nothing written), a user's directory left alone,
Ctrl-C leaving nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from varprop.cli import main
from varprop.outdir import AREA

TINY = ["--widths", "784,16,10", "--epochs", "1", "--replicates", "1", "--data", "subset"]


def run(args):
    return CliRunner().invoke(main, ["train", *args], catch_exceptions=False)


def test_train_writes_report_and_data(tmp_path):
    out = tmp_path / "run"
    result = run([*TINY, "--bn-count", "0", "--bn-count", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    assert {"history.csv", "layers_over_training.csv", "config.json", "report.md", "report.html",
            "loss_curves.png", "layers_post_std.png", "layers_grad_std.png"} <= names
    history = pd.read_csv(out / "history.csv")
    assert list(history["config"].unique()) == ["bn_count=0", "bn_count=1"] and len(history) == 4
    layers = pd.read_csv(out / "layers_over_training.csv")
    assert len(layers) == 2 * 2 * 2 and {"grad_std", "update_ratio", "bn_var_ratio"} <= set(layers.columns)
    report = (out / "report.md").read_text()
    for text in ("## Findings", "mlxtend", "BN's effect", "## At initialization", "varprop simulate --widths"):
        assert text in report
    meta = json.loads((out / "config.json").read_text())
    assert meta["command"].startswith("varprop train --widths 784,16,10")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging directory left"


def test_varprop_report_redraws_a_training_run(tmp_path):
    out = tmp_path / "run"
    assert run([*TINY, "--bn-count", "0", "--bn-count", "1", "--format", "csv", "--out", str(out)]).exit_code == 0
    data = {name: (out / name).read_bytes() for name in ("history.csv", "layers_over_training.csv", "config.json")}
    drawn = CliRunner().invoke(main, ["report", str(out)])
    assert drawn.exit_code == 0, drawn.output
    assert {"report.md", "report.html", "loss_curves.png", "layers_post_std.png"} <= {p.name for p in out.iterdir()}
    assert "## Findings" in (out / "report.md").read_text()
    assert {name: (out / name).read_bytes() for name in data} == data  # the data is read, never rewritten
    # Drawn again from the same data: the same report, word for word.
    first = (out / "report.md").read_text()
    assert CliRunner().invoke(main, ["report", str(out), "--format", "md"]).exit_code == 0
    assert (out / "report.md").read_text() == first
    # History naming a configuration config.json does not: one line, exit 2, nothing changed.
    history = pd.read_csv(out / "history.csv")
    history.loc[0, "config"] = "relu, bn_count=7"
    history.to_csv(out / "history.csv", index=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    bad = CliRunner().invoke(main, ["report", str(out)])  # the manifest sees the edit first
    assert bad.exit_code == 2 and "history.csv changed since varprop wrote it" in bad.output
    bad = CliRunner().invoke(main, ["report", str(out), "--force"])
    assert bad.exit_code == 2 and "relu, bn_count=7" in bad.output and len(bad.output.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # A table cut short, or short of a row in one replicate: refused, not drawn as other curves.
    for name, edit, words in (("history.csv", lambda t: t[:-9], "ends in the middle of a row"),
                              ("layers_over_training.csv", lambda t: "".join(t.splitlines(True)[:-1]),
                               "lacks rows")):
        (out / name).write_text(edit(data[name].decode()))
        bad = CliRunner().invoke(main, ["report", str(out), "--force"])
        assert bad.exit_code == 2 and words in bad.output and len(bad.output.strip().splitlines()) == 1, bad.output
        (out / name).write_bytes(data[name])


def test_rerun_command_reproduces(tmp_path):
    out = tmp_path / "a"
    assert run([*TINY, "--activation", "relu", "--format", "csv", "--out", str(out)]).exit_code == 0
    assert {p.name for p in out.iterdir() if p.name != ".varprop-manifest.json"} == {
        "history.csv", "layers_over_training.csv", "config.json"}
    command = json.loads((out / "config.json").read_text())["command"].split()
    args = command[2:command.index("--out")] + ["--format", "csv", "--out", str(tmp_path / "b")]
    assert run(args).exit_code == 0
    assert (out / "history.csv").read_bytes() == (tmp_path / "b" / "history.csv").read_bytes()


def test_a_config_files_top_level_and_its_train_table_both_count(tmp_path):
    """Options at the top level of a TOML file apply to every command, its [train] table's to train (and win
    over the top level's); a [simulate] table beside them is simulate's alone."""
    (tmp_path / "both.toml").write_text("epochs = 1\nreplicates = 3\nwidths = '784,8,10'\nlayers = 3\n[train]\n"
                                        "replicates = 1\n[simulate]\nsamples = 30\n")  # layers: simulate's alone
    out = tmp_path / "run"
    result = run(["--config", str(tmp_path / "both.toml"), "--format", "csv", "--data", "subset", "--out", str(out)])
    assert result.exit_code == 0, result.output
    history = pd.read_csv(out / "history.csv")
    assert history["epoch"].max() == 1 and set(history["replicate"]) == {0}


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "bad.toml").write_text("epochs = [\n")
    (tmp_path / "unknown.toml").write_text("epoch = 3\n")
    (tmp_path / "other.toml").write_text("[simulate]\nlayers = 3\n")
    np.savez(tmp_path / "nan.npz", X=np.full((10, 784), np.nan), y=np.zeros(10, int))
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really")
    return tmp_path


@pytest.mark.parametrize("args, option", [
    (["--activation", "sigmoud"], "--activation"),
    (["--batch-size", "0"], "--batch-size"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--momentum", "2"], "--momentum"),
    (["--optimizer", "rmsprop"], "--optimizer"),
    (["--epochs", "1.5"], "--epochs"),
    (["--widths", "100,10"], "--widths"),
    (["--widths", "784"], "--widths"),
    (["--widths", "784,16,5"], "--data"),  # labels 0..9 do not fit 5 outputs
    (["--bn-count", "5"], "--bn-count"),
    (["--bn-count", "1", "--bn-layers", "1"], "--bn-layers"),
    (["--bn-layers", "0"], "--bn-layers"),
    (["--init", "nope"], "--init"),
    (["--data", "{d}/missing"], "--data"),
    (["--data", "{d}/nan.npz"], "--data"),
    (["--data", "{d}/junk.npz"], "--data"),
    (["--config", "{d}/bad.toml"], "--config"),
    (["--config", "{d}/unknown.toml"], "--config"),
    (["--format", "pdf"], "--format"),
    (["--threads", "0"], "--threads"),
    (["--widths", "784,10000000,10"], "--max-memory"),  # refused before 30 GiB of weights are drawn
    (["--max-memory", "1M"], "--max-memory"),
    (["--out", ""], "--out"),  # not 'the default directory'
    (["--config", "{d}/other.toml"], "--config: {d}/other.toml has [simulate] but no [train] table"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(bad_files, args, option):
    out = bad_files / "out"
    args = [a.replace("{d}", str(bad_files)) for a in args]
    result = CliRunner().invoke(main, ["train", "--widths", "784,16,10", "--epochs", "1", "--replicates", "1",
                                       "--out", str(out), *args], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"varprop: error: {option.replace('{d}', str(bad_files))}"), \
        result.stderr
    assert not out.exists() and not [p for p in bad_files.iterdir() if p.name.startswith(".")]


def test_suggestion_for_a_typo():
    result = CliRunner().invoke(main, ["train", "--activation", "sigmoud"])
    assert "(did you mean sigmoid?)" in result.stderr


def test_out_holding_other_files_is_left_alone(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    result = run([*TINY, "--format", "csv", "--out", str(out)])
    assert result.exit_code == 2 and "--out" in result.stderr
    assert [p.name for p in out.iterdir()] == ["thesis.tex"] and (out / "thesis.tex").read_text() == "precious"


def test_ctrl_c_leaves_nothing(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "varprop", "train", "--widths", "784,16,10", "--epochs", "200",
                             "--data", "subset", "--batch-size", "8", "--out", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    area = tmp_path / AREA
    while not (area.is_dir() and any(area.iterdir())):  # training has started, into its staging directory
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err  # 128 + SIGINT, the CLI's convention
    assert list(tmp_path.iterdir()) == []

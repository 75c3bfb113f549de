"""varprop sweep over varprop train's options (command = "train") on a
2-worker LocalCluster: every task's history and per-layer rows equal
varprop.train's bit for bit, both tables keep train's CSV columns plus the
grid's keys, resume after kill -9 of the driver and after a broken file,
grid validation with train's own messages, the report and its redraw."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

pytest.importorskip("distributed")
pytest.importorskip("pyarrow")

import pyarrow.parquet as pq  # noqa: E402
from dask.distributed import Client, LocalCluster  # noqa: E402

import varprop  # noqa: E402
from varprop.cli import main  # noqa: E402
from varprop.errors import SpecError  # noqa: E402
from varprop.sweeps import build_grid, sweep  # noqa: E402
from varprop.train import data  # noqa: E402

TINY = {"command": "train", "widths": "784,16,10", "activation": "sigmoid", "epochs": 1, "data": "subset"}


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as c:
        yield c


def same(a, b):
    """Bit for bit (NaN equal to NaN)."""
    if a.dtype.kind in "fc" or b.dtype.kind in "fc":
        return a.dtype == b.dtype and np.array_equal(a.to_numpy(), b.to_numpy(), equal_nan=True)
    return a.reset_index(drop=True).astype(object).equals(b.reset_index(drop=True).astype(object))


@pytest.mark.slow  # 18 s on 2 cores at load 2.8: six training runs, three more as references, a report
def test_equal_to_train_both_tables_report_and_redraw(client, tmp_path):
    """Tasks of one replicate each on two worker processes, in whatever order
    they finish, give varprop.train's numbers for their configuration; each
    table has train's CSV columns (the grid's keys where train puts what it
    compares); the report maps the final accuracy and loss and redraws the same."""
    grid = {**TINY, "bn_count": [0, 1], "optimizer": ["sgd", "adam"], "replicates": 2, "record_every": 20,
            "exclude": [{"bn_count": 1, "optimizer": "sgd"}]}
    out = tmp_path / "s"
    res = varprop.sweep(grid, client, out=out)
    assert res.ok and res.ran == res.tasks == 6  # 3 configurations x 2 replicates, one task each
    manifest = json.loads((out / "_sweep.json").read_text())
    history, layers = res.read("history"), res.read("layers")  # in grid order
    # one line of pandas reads the same rows (its files in the order of their names: the task keys')
    for table, df, order in (("history", history, ["config", "replicate", "step"]),
                             ("layers", layers, ["config", "replicate", "step", "layer"])):
        pd.testing.assert_frame_equal(pd.read_parquet(out / table).sort_values(order, ignore_index=True),
                                      df.sort_values(order, ignore_index=True))
    for label in dict.fromkeys(t["label"] for t in manifest["tasks"]):
        options = next(t["options"] for t in manifest["tasks"] if t["label"] == label)
        ref = varprop.train(**options)  # this configuration alone (no compared option), both replicates
        for got, want in ((history, ref.history), (layers, ref.layers)):
            assert list(got.columns) == ["config", *manifest["keys"], *want.columns.drop("config")]
            mine = got[got["config"] == label].reset_index(drop=True)
            assert len(mine) == len(want) > 0
            for col in want.columns.drop("config"):
                assert same(mine[col], want[col]), (label, col)
    assert history.groupby(["config", "replicate", "step"]).size().max() == 1
    assert set(history["step"]) == {0, 20, 32}  # record_every 20, and the epoch's end (32 batches)
    for table in ("history", "layers"):
        schemas = {pq.read_schema(p).remove_metadata() for p in (out / table).glob("task-*.parquet")}
        assert len(schemas) == 1

    report = (out / "_report" / "report.md").read_text()
    assert report.index("## Findings") < report.index("## Maps over the grid's options") < report.index(
        "## Loss curves") < report.index("## Configurations") < report.index("## Per-layer statistics")
    assert "pandas.read_parquet(" in report and "/history')" in report
    for name in ("heatmap_test_accuracy_optimizer_by_bn_count.png",
                 "heatmap_train_loss_keras_optimizer_by_bn_count.png", "loss_curves.png", "layers_post_std.png"):
        assert (out / "_report" / name).is_file(), name
    summary = pd.read_csv(out / "_report" / "summary.csv")
    final = history[history["step"] == 32].groupby("config")["test_accuracy"]
    assert np.array_equal(summary.set_index("config")["test_accuracy"].sort_index(), final.median().sort_index())
    (out / "_report").rename(tmp_path / "old")
    r = CliRunner().invoke(main, ["report", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "_report" / "report.md").read_text() == report


@pytest.mark.slow  # 16 s on 2 cores at load 2.8: a driver of its own (cluster start) killed, two reruns
def test_resume_after_kill_9_and_broken_file(client, tmp_path):
    """The driver killed (SIGKILL) while writing its 2nd task, between the
    task's two files: the first task stays, the half-written one and the
    rest run again once. A truncated result file later: its task alone reruns."""
    grid = tmp_path / "grid.toml"
    grid.write_text('command = "train"\nwidths = ["784,16,10", "784,12,10", "784,8,10"]\nactivation = "sigmoid"\n'
                    'epochs = 1\nreplicates = 1\ndata = "subset"\n')
    out = tmp_path / "out"
    env = {**os.environ, "VARPROP_SWEEP_KILL_AT": "2"}
    first = subprocess.run([sys.executable, "-m", "varprop", "sweep", str(grid), "--out", str(out), "--workers", "2"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert first.returncode == -signal.SIGKILL, first.stderr
    done = {t: sorted((out / t).glob("task-*.parquet")) for t in ("history", "layers")}
    assert len(done["layers"]) == 1 and len(done["history"]) == 2, "task 2's history renamed, its layers not"
    assert len(list((out / "layers").glob("_tmp.task-*"))) == 1
    kept = done["layers"][0]
    before = (kept.stat().st_ino, kept.stat().st_mtime_ns)

    res = sweep(grid, client, out=out, report=False)
    assert (res.tasks, res.reused, res.ran) == (3, 1, 2) and res.ok
    assert (kept.stat().st_ino, kept.stat().st_mtime_ns) == before, "nothing redone"
    assert not list(out.rglob("_tmp.*"))
    for table in ("history", "layers"):
        df = pd.read_parquet(out / table)
        assert df.groupby("config")["replicate"].nunique().to_dict() == {
            "widths=[784,16,10]": 1, "widths=[784,12,10]": 1, "widths=[784,8,10]": 1}
        assert df.groupby(["config", "step"] + (["layer"] if table == "layers" else [])).size().max() == 1

    victim = next(p for p in sorted((out / "history").glob("task-*.parquet")) if p.name != kept.name)
    victim.write_bytes(victim.read_bytes()[:-100])
    res = sweep(grid, client, out=out, report=False)
    assert (res.reused, res.ran) == (2, 1) and (kept.stat().st_ino, kept.stat().st_mtime_ns) == before
    assert len(pd.read_parquet(out / "history")) == 3 * 2  # step 0 and the epoch's end, per configuration


def train_error(*args):
    r = CliRunner().invoke(main, ["train", *args, "--out", "/nonexistent/never"])
    assert r.exit_code == 2
    return r.output


@pytest.mark.parametrize("text, message", [
    ('command = "fit"\nlayers = [2, 3]\n', "--command: expected one of simulate, train"),
    ('layers = [2, 3]\noptimizer = "adam"\n', '--optimizer: is an option of varprop train: add command = "train"'),
    ('command = "train"\nlayers = [2, 3]\n', "--layers: is an option of varprop simulate, not of train"),
    ('command = "train"\noptimizer = ["sgd", "adamw"]\n', lambda: train_error("--optimizer", "adamw")),
    ('command = "train"\nlr_schedule = ["constant", "cosin"]\n', lambda: train_error("--lr-schedule", "cosin")),
    ('command = "train"\nepochs = [1, 2]\n', "--epochs: takes one value, got 2"),
    ('command = "train"\nwidths = "100,10"\ndata = "subset"\n',
     lambda: train_error("--widths", "100,10", "--data", "subset")),
    ('command = "train"\nbn_count = [0, 1]\n[[exclude]]\nbn_count = [0, 1]\n',
     "GRID: the [[exclude]] tables remove every configuration of the grid"),
    ('command = "train"\nbn_count = [0, 1]\n[[include]]\nlayers = 3\n', "GRID: [[include]] table 1: --layers: is an "
     "option of varprop simulate"),
])
def test_bad_train_grid_one_line_exit_2_nothing_written(tmp_path, text, message):
    grid = tmp_path / "g.toml"
    grid.write_text(text)
    r = CliRunner().invoke(main, ["sweep", str(grid), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    expected = message() if callable(message) else f"varprop: error: {message}"
    if callable(message):  # varprop train's own line, word for word (the file named after it)
        assert r.output.startswith(expected.rstrip("\n")) and r.output.endswith(f" (in {grid})\n"), (r.output, expected)
    assert r.output.startswith(expected.rstrip("\n")) and r.output.count("\n") == 1, r.output
    assert not (tmp_path / "o").exists()


def test_train_grid_semantics():
    g = build_grid({**TINY, "optimizer": ["sgd", "adam"], "momentum": [0.9, 0.5], "bn_position": ["pre", "post"],
                    "bn_count": [0, 1], "replicates": 3})
    # Adam takes no momentum, a network without BN no bn_position: those merge, as varprop train merges them.
    assert [c.label for c in g.configs] == [
        "sgd, momentum=0.9, bn_count=0", "sgd, momentum=0.9, pre, bn_count=1", "sgd, momentum=0.9, post, bn_count=1",
        "sgd, momentum=0.5, bn_count=0", "sgd, momentum=0.5, pre, bn_count=1", "sgd, momentum=0.5, post, bn_count=1",
        "adam, bn_count=0", "adam, pre, bn_count=1", "adam, post, bn_count=1"]  # the grid's order of options
    assert g.keys == ["optimizer", "momentum", "bn_position", "bn_count"]
    tasks = g.tasks()
    assert len(tasks) == 27 and {(t.start, t.stop) for t in tasks} == {(0, 1), (1, 2), (2, 3)}
    assert next(t for t in tasks if t.label == "adam, bn_count=0").values == {
        "optimizer": "adam", "momentum": None, "bn_position": None, "bn_count": 0}
    assert len({t.key for t in tasks}) == 27
    # replicate r's key does not depend on the replicate count, nor on the block size asked of the other runs
    assert tasks[0].key == build_grid({**TINY, "optimizer": "sgd", "momentum": 0.9, "bn_count": 0}).tasks()[0].key
    assert build_grid({**TINY, "replicates": 2}).tasks(2)[0].key not in {t.key for t in tasks}
    # the default data is resolved where the grid is built (workers may run elsewhere)
    cached = data.keras_cache()
    assert build_grid({k: v for k, v in TINY.items() if k != "data"}).options[0]["data"] == (
        "subset" if cached is None else str(cached))


def test_train_grid_cannot_extend_a_simulate_sweep(client, tmp_path):
    out = tmp_path / "s"
    sweep({"layers": [2, 3], "width": 8, "samples": 16}, client, out=out, report=False)
    with pytest.raises(SpecError, match="holds a sweep of varprop simulate, this grid's tasks run varprop train"):
        sweep({**TINY, "bn_count": [0, 1]}, client, out=out, extend=True, report=False)
    assert not (out / "history").exists()


def test_raising_train_task_is_recorded_others_go_on(client, tmp_path):
    """A user init that raises for one configuration: its task is recorded
    with the reason, the other runs, and the report says so first."""
    out = tmp_path / "s"
    res = sweep({**TINY, "widths": ["784,16,10", "784,24,10"], "init": "sweep_inits:boom", "replicates": 1}, client,
                out=out)
    assert res.ran == 1 and [f["label"] for f in res.failed.values()] == ["widths=[784,24,10]"]
    assert list(res.failed.values())[0]["error"] == ("--init: sweep_inits:boom raised ValueError: no init for fan_in "
                                                     "24 <b>|x|</b>")
    assert set(pd.read_parquet(out / "history")["config"]) == {"widths=[784,16,10]"}
    assert set(pd.read_parquet(out / "layers")["config"]) == {"widths=[784,16,10]"}
    report = (out / "_report" / "report.md").read_text()
    assert report.split("## Findings\n\n- ")[1].startswith("**1 of 2 tasks failed**") and "## Failed tasks" in report


def test_extend_makes_a_key_of_an_option_the_grids_fix_differently(tmp_path):
    """Two grids that each hold widths fixed, at different values: in one
    directory widths varies, so it becomes a key and the labels differ."""
    from varprop.sweeps.store import SweepDir

    first = build_grid({**TINY, "bn_count": [0, 1]})
    with SweepDir.open(tmp_path, first.source, first.keys, first.tasks(), None, command="train"):
        pass
    second = build_grid({**TINY, "widths": "784,12,10", "bn_count": [0, 1]})
    with SweepDir.open(tmp_path, second.source, second.keys, second.tasks(), None, extend=True,
                       command="train") as store:
        labels = {t["label"] for t in store.manifest["tasks"]}
        assert store.manifest["keys"] == ["bn_count", "widths"]
    assert labels == {f"bn_count={n}, widths=[784,{w},10]" for n in (0, 1) for w in (16, 12)}


def test_diverged_runs_are_marked_not_averaged(client, tmp_path):
    """A learning rate that makes every run diverge (NaN loss): its cells
    say so instead of a median of the runs' last finite epoch."""
    out = tmp_path / "s"
    res = sweep({**TINY, "activation": "relu", "optimizer": "sgd", "bn_count": 1, "lr": [0.01, 50.0],
                 "replicates": 1}, client, out=out)
    assert res.ok
    history = pd.read_parquet(out / "history")
    assert history[history["lr"] == 50.0]["train_loss_keras"].isna().any(), "the test's premise: it diverges"
    summary = pd.read_csv(out / "_report" / "summary.csv").set_index("config")
    assert summary.loc["lr=50", "diverged"] == 1 and np.isnan(summary.loc["lr=50", "test_accuracy"])
    assert summary.loc["lr=0.01", "diverged"] == 0 and summary.loc["lr=0.01", "test_accuracy"] > 0.1
    report = (out / "_report" / "report.md").read_text()
    assert "**Diverged**" in report and "lr=50 does not reach it (diverged)" in report


def test_a_map_keeps_configurations_an_option_does_not_apply_to(tmp_path, monkeypatch):
    """relu has no slope: its cell stands in an n/a column rather than vanishing from the map."""
    from varprop.report import figures
    from varprop.report import sweep as sweep_report

    drawn = []
    real = figures.save
    monkeypatch.setattr(figures, "save", lambda fig, path: (drawn.append(fig), real(fig, path))[1])
    summary = pd.DataFrame({"activation": ["relu", "leaky_relu", "leaky_relu"], "leaky_slope": [None, 0.1, 0.2],
                            "test_accuracy": [0.9, 0.8, 0.85], "test_accuracy_lo": [0.89, 0.79, 0.84],
                            "test_accuracy_hi": [0.91, 0.81, 0.86], "diverged": 0, "replicates": 2})
    sweep_report.heatmap(summary, "leaky_slope", "activation", "test_accuracy", ["activation", "leaky_slope"],
                         tmp_path / "h.png")
    ax = drawn[-1].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["n/a", "0.1", "0.2"]
    assert any(t.get_text().startswith("90.0%") for t in ax.texts)


def test_a_data_folder_is_keyed_by_the_files_train_reads(tmp_path):
    """A README beside the IDX files leaves the task keys alone (the next run would otherwise refuse DIR
    as another sweep); a changed IDX file changes them."""
    from test_train_data import write_idx_folder

    folder = write_idx_folder(tmp_path / "mnist", "dash", gz=False)
    grid = {**TINY, "widths": "16,4,3", "data": str(folder)}
    keys = [t.key for t in build_grid(grid).tasks()]
    (folder / "README").write_text("where these came from")
    assert [t.key for t in build_grid(grid).tasks()] == keys
    labels = folder / "t10k-labels-idx1-ubyte"
    raw = bytearray(labels.read_bytes())
    raw[-1] = (raw[-1] + 1) % 3
    labels.write_bytes(bytes(raw))
    assert [t.key for t in build_grid(grid).tasks()] != keys


def test_zipped_options_share_one_map(tmp_path, monkeypatch):
    """width and samples zipped: one width x layers map in one panel, not a second samples map nor
    panels split by samples (each half empty)."""
    from varprop.report import figures
    from varprop.report import sweep as sweep_report

    summary = pd.DataFrame({"layers": [3, 3, 6, 6], "width": [8, 16, 8, 16], "samples": [10, 20, 10, 20],
                            "out_log10_std": [0.1, 0.2, 0.3, 0.4]})
    keys = ["layers", "width", "samples"]
    assert sweep_report.pairs(keys, summary) == [("width", "layers")]
    drawn = []
    real = figures.save
    monkeypatch.setattr(figures, "save", lambda fig, path: (drawn.append(fig), real(fig, path))[1])
    sweep_report.heatmap(summary, "width", "layers", "out_log10_std", keys, tmp_path / "h.png")
    panels = [ax for ax in drawn[-1].axes if ax.get_label() != "<colorbar>" and ax.axison]
    assert len(panels) == 1

"""varprop sweep on a 2-worker LocalCluster: results equal simulate's bit for
bit, resume after kill -9 of the driver, a killed worker, a raising task,
Ctrl-C, grid validation, the Parquet schema, --extend and the report."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

pytest.importorskip("distributed")
pytest.importorskip("pyarrow")

import pyarrow.parquet as pq  # noqa: E402
from dask.distributed import Client, LocalCluster  # noqa: E402

import sweep_inits  # noqa: E402
from varprop.cli import main  # noqa: E402
from varprop.montecarlo import simulate  # noqa: E402
from varprop.errors import SpecError  # noqa: E402
from varprop.spec import expand  # noqa: E402
from varprop.sweeps import build_grid, sweep  # noqa: E402

TESTS = Path(__file__).resolve().parent
SMALL = {"width": 16, "samples": 24, "replicates": 2}


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as c:
        yield c


def cli(*args, env=None, **kw):
    """``varprop`` in a subprocess (its own LocalCluster), from the tests' directory's modules."""
    e = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    return subprocess.run([sys.executable, "-m", "varprop", *args], capture_output=True, text=True, env=e,
                          timeout=120, **kw)


def write_grid(path, text):
    path.write_text(text)
    return path


def same(a, b):
    """Bit for bit (NaN equal to NaN, nullable integers compared with their nulls)."""
    if a.dtype != b.dtype:
        return False
    if a.dtype.kind in "fc":
        return np.array_equal(a.to_numpy(), b.to_numpy(), equal_nan=True)
    return a.reset_index(drop=True).equals(b.reset_index(drop=True))


def check_equals_simulate(out, tasks):
    """Each task's rows equal varprop.simulate's for its configuration and replicates."""
    df = pd.read_parquet(out)
    for task in tasks:
        start, stop = task["replicates"]
        ref = simulate(expand(task["options"]))
        ref = ref[(ref["replicate"] >= start) & (ref["replicate"] < stop)].reset_index(drop=True)
        got = df[(df["config"] == task["label"]) & (df["replicate"] >= start) & (df["replicate"] < stop)]
        got = got.reset_index(drop=True)
        assert len(got) == len(ref) == (stop - start) * (task["depth"] + 1)
        for col in ref.columns.drop("config"):
            assert same(got[col], ref[col]), (task["label"], col)
        extra = [c for c in got.columns if c not in ref.columns and c not in ("config", *task["values"])]
        assert got[extra].isna().all().all(), "columns other configurations brought are empty here"


def test_equal_to_simulate_and_one_schema(client, tmp_path):
    """Tasks on two worker processes, in whatever order they finish, give
    simulate's numbers; every file has the same columns: layers.csv's plus the grid's keys."""
    grid = {**SMALL, "layers": [3, 5], "activation": ["tanh", "relu", "leaky_relu"], "leaky_slope": 0.2,
            "replicates": 3, "exclude": [{"layers": 5, "activation": "tanh"}],
            "include": [{"layers": 4, "activation": "relu", "bn_count": 2, "batch_size": 8, "backward": True}]}
    out = tmp_path / "s"
    res = sweep(grid, client, out=out, replicates_per_task=2, report=False)
    assert res.ok and res.ran == res.tasks == 12  # 6 configurations x blocks of replicates {0, 1} and {2}
    manifest = json.loads((out / "_sweep.json").read_text())
    assert manifest["keys"] == ["layers", "activation", "leaky_slope", "bn_count", "batch_size", "backward"]
    check_equals_simulate(out, manifest["tasks"])

    schemas = {pq.read_schema(p).remove_metadata() for p in out.glob("task-*.parquet")}
    assert len(schemas) == 1
    columns = next(iter(schemas)).names
    union = {c for t in manifest["tasks"] for c in simulate(expand(t["options"])).columns}
    assert columns[:1 + len(manifest["keys"])] == ["config", *manifest["keys"]]
    assert set(columns) == union | set(manifest["keys"]) and len(columns) == len(set(columns))
    df = pd.read_parquet(out)
    assert len(df) == sum((t["replicates"][1] - t["replicates"][0]) * (t["depth"] + 1) for t in manifest["tasks"])
    assert df.groupby(["config", "replicate", "layer"]).size().max() == 1
    relu = df[df["config"] == "layers=3, relu, backward=False"]
    assert len(relu) == 3 * 4 and relu["leaky_slope"].isna().all(), \
        "leaky_slope does nothing for relu: neither in its label nor in its column"


def test_resume_after_kill_9_and_failure_summary(tmp_path):
    """The driver killed (SIGKILL) while writing its 2nd result: the finished
    one stays readable, the rerun skips it and runs the rest once. The
    configurations of width 24 raise (their init refuses fan_in 24): recorded,
    the others go on, exit status 1 and a one-line summary."""
    grid = write_grid(tmp_path / "grid.toml", "layers = [2, 3, 4]\nwidth = [8, 24]\nsamples = 16\n"
                                              'init = "sweep_inits:boom"\nreplicates = 2\n')
    out = tmp_path / "out"
    first = cli("sweep", str(grid), "--out", str(out), "--workers", "2", env={"VARPROP_SWEEP_KILL_AT": "2"})
    assert first.returncode == -signal.SIGKILL, first.stderr
    done = list(out.glob("task-*.parquet"))
    assert len(done) == 1 and len(list(out.glob("_tmp.task-*"))) == 1, "one renamed, the next caught mid-write"
    assert len(pd.read_parquet(out)) == pq.read_metadata(done[0]).num_rows
    before = (done[0].stat().st_ino, done[0].stat().st_mtime_ns)

    second = cli("sweep", str(grid), "--out", str(out), "--workers", "2")
    assert second.returncode == 1
    assert "1 finished before, 5 to run" in second.stdout and "2 ran, 1 reused, 3 failed" in second.stdout
    assert second.stderr.count("\n") == 1 and second.stderr.startswith(
        "varprop: error: 3 of 6 tasks failed (first: layers=2, width=24: --init: sweep_inits:boom raised "
        "ValueError: no init for fan_in 24 <b>|x|</b>); reasons in "), second.stderr
    assert (done[0].stat().st_ino, done[0].stat().st_mtime_ns) == before, "nothing redone"
    assert not list(out.glob("_tmp.*")), "the killed run's temporary file is gone"
    df = pd.read_parquet(out)
    assert df.groupby("config").size().to_dict() == {f"layers={n}, width=8": 2 * (n + 1) for n in (2, 3, 4)}
    assert df.groupby(["config", "replicate", "layer"]).size().max() == 1
    failures = json.loads((out / "_failures.json").read_text())
    assert sorted(f["label"] for f in failures.values()) == [f"layers={n}, width=24" for n in (2, 3, 4)]
    report = (out / "_report" / "report.md").read_text()
    assert "**3 of 6 tasks failed**" in report and "## Failed tasks" in report
    row = next(line for line in report.splitlines() if line.startswith("| layers=2, width=24"))
    assert "no init for fan_in 24 &lt;b&gt;\\|x\\|&lt;/b&gt;" in row and row.count(" | ") == 2, row


def test_broken_result_files_rerun(client, tmp_path):
    grid = {**SMALL, "layers": [2, 3, 4]}
    out = tmp_path / "s"
    sweep(grid, client, out=out, report=False)
    files = sorted(out.glob("task-*.parquet"))
    good = pd.read_parquet(files[2])
    files[0].write_bytes(files[0].read_bytes()[:-100])  # truncated
    raw = bytearray(files[1].read_bytes())
    raw[200:400] = bytes(200)  # zeroed pages: caught by the page checksums
    files[1].write_bytes(bytes(raw))
    res = sweep(grid, client, out=out, report=False)
    assert (res.reused, res.ran) == (1, 2)
    pd.testing.assert_frame_equal(pd.read_parquet(files[2]), good)
    manifest = json.loads((out / "_sweep.json").read_text())
    check_equals_simulate(out, manifest["tasks"])


def test_worker_killed_task_reruns(client, tmp_path):
    """A worker process dies (SIGKILL) inside a task: the scheduler runs the
    task again on a worker, and its numbers are the same."""
    Path(sweep_inits.MARKER).unlink(missing_ok=True)
    out = tmp_path / "s"
    res = sweep({**SMALL, "layers": [2, 3], "init": "sweep_inits:die_once"}, client, out=out, report=False)
    assert Path(sweep_inits.MARKER).exists(), "a worker did kill itself"
    died = int(Path(sweep_inits.MARKER).read_text())
    assert res.ok and res.ran == 2
    check_equals_simulate(out, json.loads((out / "_sweep.json").read_text())["tasks"])
    deadline = time.monotonic() + 30
    while len(client.nthreads()) < 2 and time.monotonic() < deadline:  # the nanny restarts it
        time.sleep(0.2)
    assert died not in client.run(os.getpid).values()
    Path(sweep_inits.MARKER).unlink()


def test_raising_task_is_recorded_others_go_on(client, tmp_path):
    out = tmp_path / "s"
    res = sweep({"widths": [[16, 24, 8], [16, 32, 8]], "init": "sweep_inits:boom", "samples": 16}, client, out=out,
                report=False)
    assert res.ran == 1 and list(res.failed.values())[0]["label"] == "widths=16,24,8"
    assert list(res.failed.values())[0]["error"] == ("--init: sweep_inits:boom raised ValueError: no init for fan_in "
                                                     "24 <b>|x|</b>")
    failures = json.loads((out / "_failures.json").read_text())
    assert "Traceback" in list(failures.values())[0]["traceback"]
    assert set(pd.read_parquet(out)["config"]) == {"widths=16,32,8"}


@pytest.mark.parametrize("signum, group", [(signal.SIGINT, True), (signal.SIGTERM, False)])
def test_ctrl_c_keeps_finished_tasks(tmp_path, signum, group):
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it, or
    SIGTERM to the driver alone, as a job scheduler's kill does: one line,
    exit 128 + the signal, finished tasks kept, no worker left running."""
    grid = write_grid(tmp_path / "g.toml", "layers = [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]\nwidth = 256\n"
                                           "samples = 512\nreplicates = 3\n")
    out = tmp_path / "o"
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    p = subprocess.Popen([sys.executable, "-m", "varprop", "sweep", str(grid), "--out", str(out), "--workers", "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    deadline = time.monotonic() + 90
    while not list(out.glob("task-*.parquet")) and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.1)
    if group:
        os.killpg(p.pid, signum)
    else:
        os.kill(p.pid, signum)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 128 + signum, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("varprop: interrupted: ")
    kept = list(out.glob("task-*.parquet"))
    assert 1 <= len(kept) < 10 and f"{len(kept)} of 10 tasks finished and kept" in stderr
    assert len(pd.read_parquet(out)) == sum(pq.read_metadata(f).num_rows for f in kept)
    assert not list(out.glob("_tmp.*"))
    deadline = time.monotonic() + 15
    while group_alive(p.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not group_alive(p.pid), "the worker processes stopped too"


@pytest.mark.parametrize("at", ["created", "writing"])
def test_an_interrupt_in_an_atomic_write_leaves_no_temporary_file(tmp_path, monkeypatch, at):
    """A Ctrl-C that lands as the temporary file is created (it arrives between two bytecodes) or while it
    is written: the file is removed, the target untouched (a sweep interrupted so left _tmp.task-* behind)."""
    from varprop.sweeps import store

    target = tmp_path / "task-x.parquet"
    close = os.close

    def interrupted_close(fd):
        close(fd)
        raise KeyboardInterrupt
    if at == "created":
        monkeypatch.setattr(store.os, "close", interrupted_close)

    def write(path):
        if at == "writing":
            path.write_text("half")
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        store.atomic(target, write)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def group_alive(pgid):
    """Processes of a process group that still run (zombies waiting to be reaped do not)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(stat.parent.name)
    return alive


@pytest.mark.parametrize("text, message", [
    ("layers = [2, 3]\nlayerz = 4\n", "--layerz: unknown option (did you mean layers?); known: layers, width"),
    ("layers = []\n", "--layers: an empty list gives nothing to run"),
    ("layers = [2, 3]\n[[exclude]]\nlayers = [2, 3]\n",
     "GRID: the [[exclude]] tables remove every configuration of the grid"),
    ('layers = [2, 3]\nwidth = [4, 8, 16]\nzip = ["layers", "width"]\n',
     "GRID: zip: the lists of a group must have equal lengths, got layers 2, width 3"),
    ('activation = ["tanh", "relo"]\n', "--activation: expected one of"),
    ("layers = [2, 3]\n[[exclude]]\ngain = 2\n", "GRID: [[exclude]] table 1 names gain, which the grid does not set"),
    ("replicates = [2, 3]\n", "--replicates: takes one value"),
    ("layers = [2,\n", "GRID: "),
])
def test_bad_grid_one_line_exit_2_nothing_written(tmp_path, text, message):
    grid = write_grid(tmp_path / "g.toml", text)
    r = CliRunner().invoke(main, ["sweep", str(grid), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    assert r.output.startswith(f"varprop: error: {message}") and r.output.count("\n") == 1, r.output
    assert not (tmp_path / "o").exists()


def test_out_dir_with_other_files_is_refused(tmp_path):
    grid = write_grid(tmp_path / "g.toml", "layers = [2, 3]\n")
    mine = tmp_path / "o"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for args in (["--out", str(mine)], ["--out", str(mine / "notes.txt")], ["--out", str(mine), "--workers", "0"],
                 ["--out", str(mine), "--workers", "2", "--scheduler", "tcp://localhost:1"]):
        r = CliRunner().invoke(main, ["sweep", str(grid), *args])
        assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "mine"


def test_other_grid_refused_unless_extend(client, tmp_path):
    out = tmp_path / "s"
    sweep({**SMALL, "layers": [2, 3]}, client, out=out, report=False)
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("task-*.parquet")}
    wider = {**SMALL, "layers": [2, 3], "activation": ["linear", "tanh"]}
    with pytest.raises(SpecError, match="holds another sweep .* add --extend"):
        sweep(wider, client, out=out, report=False)
    res = sweep(wider, client, out=out, extend=True, report=False)
    assert (res.tasks, res.reused, res.ran) == (4, 2, 2)
    df = pd.read_parquet(out)
    assert sorted(set(df["config"])) == ["layers=2, linear", "layers=2, tanh", "layers=3, linear", "layers=3, tanh"]
    assert (df["activation"].notna()).all(), "the files already there gained the new key's column"
    assert {p.name for p in out.glob("task-*.parquet")} >= set(first)
    check_equals_simulate(out, json.loads((out / "_sweep.json").read_text())["tasks"])


def test_grid_semantics():
    g = build_grid({"layers": [2, 3], "width": [8, 16], "samples": [32, 64], "zip": [["width", "samples"]],
                    "activation": ["tanh", "relu"], "exclude": [{"layers": 3, "activation": ["relu"]}],
                    "include": [{"layers": 3, "activation": "selu", "width": [8], "samples": [32]}]})
    assert [c.label for c in g.configs] == [
        "layers=2, width=8, samples=32, tanh", "layers=2, width=8, samples=32, relu",
        "layers=2, width=16, samples=64, tanh", "layers=2, width=16, samples=64, relu",
        "layers=3, width=8, samples=32, tanh", "layers=3, width=16, samples=64, tanh",
        "layers=3, width=8, samples=32, selu"]
    keys = [t.key for t in g.tasks()]
    assert len(set(keys)) == len(keys) and keys == [t.key for t in build_grid(g.source).tasks()]
    blocks = build_grid({"layers": 2, "replicates": 5}).tasks(2)
    assert [(t.start, t.stop) for t in blocks] == [(0, 2), (2, 4), (4, 5)]
    # replicate r's key does not depend on how many replicates there are
    assert blocks[0].key == build_grid({"layers": 2, "replicates": 2}).tasks()[0].key
    bn = build_grid({"bn_count": [0, 1], "batch_size": [4, 10], "layers": 3})
    assert {c.spec.samples for c in bn.configs} == {500} and len(bn.configs) == 3  # batch size is moot without BN


def test_report_redraw(client, tmp_path):
    out = tmp_path / "s"
    sweep({"layers": [2, 4], "width": [8, 16], "samples": 16, "gain": [0.8, 1.2], "bias_std": [0.0, 0.3],
           "activation": "tanh", "replicates": 2}, client, out=out)
    report = (out / "_report" / "report.md").read_text()
    assert report.index("## Findings") < report.index("## Maps over two options") < report.index(
        "## Order to chaos") < report.index("## Fitted exponents")
    assert (out / "_report" / "heatmap_out_log10_std_layers_by_width.png").is_file()
    fits = pd.read_csv(out / "_report" / "fits.csv")
    assert set(fits["option"]) == {"layers", "width", "gain", "bias_std"}
    (out / "_report").rename(tmp_path / "old")
    r = CliRunner().invoke(main, ["report", str(out)])
    assert r.exit_code == 0 and (out / "_report" / "report.html").is_file()
    assert (out / "_report" / "report.md").read_text() == report


def test_a_residual_grid_with_stages_speaks_of_blocks(client, tmp_path):
    out = tmp_path / "r"
    res = sweep({"residual": ["plain", "nf"], "widths": [[16, 16, 32, 32], [16, 32, 64, 64]], "projection": True,
                 "samples": 16, "activation": "relu", "init": "he"}, client, out=out)
    assert res.ok
    findings = (out / "_report" / "report.md").read_text().split("## Findings")[1].split("##")[0]
    assert findings.count("healthy through 3 blocks") == 4 and " layer" not in findings


def test_a_failed_start_leaves_nothing(tmp_path, monkeypatch):
    """A scheduler that cannot be reached: one error, and the --out it would have made is not there."""
    from varprop.sweeps import run as sweep_run

    monkeypatch.setattr(sweep_run, "CONNECT_TIMEOUT", "1s")
    out = tmp_path / "new" / "sub"
    with pytest.raises(SpecError, match="scheduler"):
        sweep({"layers": 2, "width": 4, "samples": 4}, out=out, scheduler="tcp://127.0.0.1:1")
    assert not (tmp_path / "new").exists()


def test_the_dashboard_is_named_only_when_it_can_serve(tmp_path):
    """Without bokeh a local cluster lists a dashboard service that serves nothing: no address is printed."""
    import importlib.util

    grid = write_grid(tmp_path / "g.toml", "layers = [2, 3]\nwidth = 4\nsamples = 4\n")
    r = CliRunner().invoke(main, ["sweep", str(grid), "--out", str(tmp_path / "o"), "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert ("dashboard:" in r.output) == (importlib.util.find_spec("bokeh") is not None), r.output

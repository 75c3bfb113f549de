"""Work in forked children (varprop.forked): the figures' drawing and the engine's replicate groups.

A fork happens only in a process without torch and without other Python threads, which a pytest session
may not be: every test here runs its forks in a fresh Python process."""

import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

_DRAW_SCRIPT = """
import os, signal, sys, threading
from pathlib import Path
from varprop import forked
from varprop.parallel import Pool
from varprop.report import figures
d, parent = Path(sys.argv[1]), os.getpid()
def pid(path):
    path.write_text(str(os.getpid()))
def only_here(path):
    if os.getpid() != parent:
        raise RuntimeError("the child fails")
    path.write_text(str(os.getpid()))
assert forked.forkable()
figures.draw([(pid, d / f"a{k}") for k in range(5)], workers=2)
figures.draw([(only_here, d / f"b{k}") for k in range(4)], workers=2)
fork = os.fork
def no_process():
    raise BlockingIOError(11, "Resource temporarily unavailable")
os.fork = no_process  # as under a cgroup's pids limit
figures.draw([(pid, d / f"c{k}") for k in range(3)], workers=2)
os.fork = fork
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the child's exit status is lost (ECHILD); its result is not
figures.draw([(pid, d / f"e{k}") for k in range(3)], workers=2)
signal.signal(signal.SIGCHLD, signal.SIG_DFL)
release, started = threading.Event(), threading.Event()
def item(i):
    started.set()
    release.wait(10)
busy = threading.Thread(target=lambda: Pool(2).map(item, [0, 1]))
busy.start()
started.wait(10)
assert not forked.forkable()  # a map under way elsewhere: its threads stay, no fork
release.set()
busy.join()
assert forked.forkable()
os.register_at_fork(after_in_child=lambda: signal.raise_signal(signal.SIGINT))  # a Ctrl-C as the child begins
try:
    figures.draw([(pid, d / f"g{k}") for k in range(3)], workers=2)
except KeyboardInterrupt:
    print("a child unwound its parent's stack")
signal.signal(signal.SIGINT, signal.SIG_IGN)  # as under nohup or in a background job: the child ignores it too
figures.draw([(pid, d / f"h{k}") for k in range(3)], workers=2)
print(parent)
"""


def _python(script: str, *args: str) -> str:
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True).stdout


def test_figures_draw_every_second_job_in_a_forked_child(tmp_path):
    """Every second figure job runs in a forked child; the parent draws the child's jobs after all when the
    child fails, when no process can be forked and when a signal kills it as it begins (which never
    reaches the parent's handlers in the child), while a signal the parent ignores leaves the child
    drawing, and a child whose exit status is lost (SIGCHLD ignored) still hands back its result; no
    fork while a map runs."""
    parent = int(_python(_DRAW_SCRIPT, str(tmp_path)))
    a = [int((tmp_path / f"a{k}").read_text()) for k in range(5)]
    assert a[0::2] == [parent] * 3 and len(set(a[1::2])) == 1 and a[1] != parent
    for name in ("e", "h"):
        assert int((tmp_path / f"{name}1").read_text()) != parent, name
    for name, n in (("b", 4), ("c", 3), ("g", 3)):
        assert [int((tmp_path / f"{name}{k}").read_text()) for k in range(n)] == [parent] * n, name


_SHARE_SCRIPT = """
import json, os
from varprop import forked
parent = os.getpid()
def work(share, progress):
    for _ in range(share):
        progress(2)
    if share == 3 and os.getpid() != parent:
        raise RuntimeError("this child fails after its progress")
    return os.getpid(), share * 10
steps = []
assert forked.forkable()
out = forked.share_out(work, [1, 2, 3, 4], steps.append)
print(json.dumps({"parent": parent, "out": out, "steps": sum(steps)}))
"""


def test_share_out_returns_in_order_relays_progress_and_redoes_a_failed_share():
    got = json.loads(_python(_SHARE_SCRIPT))
    parent, out = got["parent"], got["out"]
    assert [value for _, value in out] == [10, 20, 30, 40]
    pids = [pid for pid, _ in out]
    assert pids[0] == parent and pids[2] == parent  # the first share here; the failed one redone here
    assert parent not in (pids[1], pids[3]) and pids[1] != pids[3]
    assert got["steps"] == 2 * (1 + 2 + 3 + 4)  # the failed child's progress counted once


_SIGNAL_SCRIPT = """
import json, os, signal, time
from pathlib import Path
from varprop import forked
parent, fork = os.getpid(), os.fork
def signalled_fork():  # a Ctrl-C that arrives while the parent forks (blocked, pending until the unmask)
    pid = fork()
    if pid:
        os.kill(parent, signal.SIGINT)
    return pid
os.fork = signalled_fork
def work(share, progress):
    time.sleep(2)
    return b"x" * 200_000  # more than a pipe holds: a child left unread would block for ever
try:
    forked.share_out(work, [1, 2, 3])
    interrupted = False
except KeyboardInterrupt:
    interrupted = True
os.fork = fork
children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
descriptors = len(os.listdir("/proc/self/fd"))
frames = []
original = forked._Child.frames
def spy(self, data):
    out = original(self, data)
    frames.extend(out)
    return out
forked._Child.frames = spy
assert forked.share_out(lambda share, progress: progress is None, [1, 2]) == [True, True]
forked._Child.frames = original
print(json.dumps({"interrupted": interrupted, "children": children, "leaked": len(os.listdir("/proc/self/fd"))
                  - descriptors, "kinds": [kind.decode() for kind, _ in frames]}))
"""


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads a process's children from Linux's /proc")
def test_a_signal_while_forking_leaves_no_child_and_no_progress_goes_unasked():
    """A signal that arrives while the children are forked is raised once all are recorded: every child is
    killed and reaped, no descriptor leaks; without a progress callback the children send none (a pipe
    full of unread progress would stall them)."""
    got = json.loads(_python(_SIGNAL_SCRIPT))
    assert got["interrupted"] and got["children"] == [] and got["leaked"] == 0
    assert got["kinds"] == ["r"]


_ENGINE_SCRIPT = """
import json, os, sys
import pandas as pd
import varprop
from varprop.montecarlo import configs_for, run_configs
forks = []
os.register_at_fork(before=lambda: forks.append(1))
spec = varprop.NetworkSpec.square(12, 40, init="he", activation="relu")
cases = {  # replicate groups of small plain layers; then replicates one at a time: backward, BN, residual
    "groups": dict(vary={"init": ["he", "fan_in"]}, samples=64, replicates=7),
    "backward": dict(samples=32, replicates=5, backward=True),
    "bn": dict(samples=32, replicates=5, bn="all"),
    "residual": dict(residual="plain", blocks=6, width=24, samples=16, replicates=4),
}
out = {}
for name, options in cases.items():
    runs, steps, before = {}, {}, len(forks)
    for threads in (1, 2, 3):
        counted = []
        runs[threads] = run_configs(configs_for(spec, **options), progress=counted.append, threads=threads)
        steps[threads] = sum(counted)
    for threads in (2, 3):
        pd.testing.assert_frame_equal(runs[1].layers, runs[threads].layers, check_exact=True)
        pd.testing.assert_frame_equal(runs[1].histograms, runs[threads].histograms, check_exact=True)
    out[name] = {"forks": len(forks) - before, "steps": sorted(set(steps.values()))}
print(json.dumps(out))
"""


def test_replicates_in_forked_children_give_the_same_numbers():
    """Small layers' replicates run in forked children when there are several threads (a stack of plain
    layers in groups stepped together, others one replicate at a time): the same table and histograms,
    bit for bit, as on one thread, and every step reported to the progress bar."""
    got = json.loads(_python(_ENGINE_SCRIPT))
    assert got["groups"] == {"forks": 2 * (1 + 2), "steps": [2 * 7 * 12]}  # a child on 2 threads, two on 3
    assert got["backward"] == {"forks": 3, "steps": [5 * 12 * 2]}  # (forward and backward steps)
    assert got["bn"] == {"forks": 3, "steps": [5 * 12]}
    assert got["residual"]["forks"] == 3


def test_replicates_run_in_one_process_where_two_would_not_fit():
    from varprop.montecarlo import memory
    from varprop.montecarlo.run import replicate_processes
    from varprop.parallel import Pool
    from varprop.spec import RunSpec

    spec = RunSpec(varprop_spec(), samples=64, replicates=4, backward=True)
    each = memory.replicate_bytes(spec, memory.backward_plan(spec))
    room = memory.REPORT_BYTES + memory.run_bytes(spec)
    assert replicate_processes(spec, 4, Pool(2), None) == 2
    assert replicate_processes(RunSpec(varprop_spec(), samples=64, replicates=4, backward=True,
                                       max_memory=room + 2 * each - 1), 4, Pool(2), None) == 1
    assert replicate_processes(spec, 4, Pool(1), None) == 1
    # a comparison's other configurations' tables are held too (memory.reserved_bytes)
    assert replicate_processes(spec, 4, Pool(2), None, spare_for(spec, 2 * each - 1)) == 1
    big = RunSpec(varprop_spec(1024), samples=512, replicates=4)  # layers of several chunks: threads share them
    assert replicate_processes(big, 4, Pool(2), None) == 1


def spare_for(spec, left):
    """The bytes reserved beside the passes that leave ``left`` of ``spec``'s budget."""
    from varprop.montecarlo import memory

    return memory.budget(spec.max_memory) - left


def varprop_spec(width=40):
    import varprop

    return varprop.NetworkSpec.square(12, width, init="he", activation="relu")


# A run long enough to be caught while its children work (about 2 s on two cores).
_LONG = ["simulate", "--layers", "100", "--width", "100", "--samples", "500", "--replicates", "200", "--init",
         "fan_in", "--threads", "2"]


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by init, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads a process's children from Linux's /proc")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_a_signal_while_children_compute_leaves_no_child(tmp_path, sig):
    target = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "varprop", *_LONG, "--out", str(target)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (kids := _children(proc.pid)) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert kids, "the run forked no child"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    deadline = time.monotonic() + 10
    while any(map(_alive, kids)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(map(_alive, kids))
    assert proc.returncode == (-sig if sig == signal.SIGKILL else 128 + sig)
    if sig != signal.SIGKILL:  # (a kill -9 leaves its staging for the next run to clean: test_outdir.py)
        assert err == "varprop: interrupted\n" and list(tmp_path.iterdir()) == []


_TRAIN_SCRIPT = """
import json, os
import pandas as pd
import varprop
forks = []
os.register_at_fork(before=lambda: forks.append(1))
results, steps = {}, {}
for threads in (1, 2):
    counted = []
    results[threads] = varprop.train(widths="784,24,10", activation="relu", batch_size=[4, 64], epochs=1,
                                     replicates=2, data="subset", threads=threads, progress=counted.append)
    steps[threads] = sum(counted)
for frame in ("history", "layers"):
    pd.testing.assert_frame_equal(getattr(results[1], frame), getattr(results[2], frame), check_exact=True)
print(json.dumps({"forks": len(forks), "steps": steps}))
"""


def test_training_runs_in_forked_children_give_the_same_numbers():
    """Whole runs (configuration x replicate) train in forked children when that is faster: the same
    history and per-layer rows, bit for bit, as on one thread, in the same order."""
    got = json.loads(_python(_TRAIN_SCRIPT))
    assert got["forks"] == 1 and set(got["steps"].values()) == {4}


def _runs(batches, replicates=1):
    from varprop.train.options import expand

    configs, run = expand({"widths": "784,512,256,128,64,10", "batch_size": list(batches), "epochs": 1,
                           "replicates": replicates})
    return [(c, r) for c in configs for r in range(replicates)], run


@pytest.mark.parametrize("batches, replicates, threads, shares", [
    ((1024,), 3, 2, 1),  # 2 runs' time on one thread each against 3 on two threads (1.5x): threads
    ((1024,), 4, 2, 2),
    ((4,), 3, 2, 2),  # a batch of 4 does not split over threads: processes, however uneven
    ((4, 1024), 1, 2, 2),
    ((128,), 3, 1, 1),  # one thread: one process
    ((128,), 1, 2, 1),  # one run
])
def test_process_shares_balance_the_runs(batches, replicates, threads, shares):
    from varprop.train.loop import epoch_cost, process_shares

    runs, run = _runs(batches, replicates)
    got = process_shares(runs, run, 4000, 1000, threads)
    assert len(got) == shares and sorted(i for share in got for i in share) == list(range(len(runs)))
    if shares > 1:  # the longest runs first, each on the least loaded process: within one run of even
        cost = [epoch_cost(c, 4000, 1000) for c, _ in runs]
        loads = [sum(cost[i] for i in share) for share in got]
        assert max(loads) - min(loads) <= max(cost)


def test_process_shares_fit_in_memory():
    from varprop.train.loop import process_shares, run_memory

    runs, run = _runs((128,), 4)
    need = run_memory(runs[0][0], "float32", 4000)
    assert len(process_shares(runs, dataclasses.replace(run, max_memory=need), 4000, 1000, 2)) == 1
    assert len(process_shares(runs, dataclasses.replace(run, max_memory=2 * need), 4000, 1000, 2)) == 2

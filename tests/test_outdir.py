"""Output directories (varprop/outdir.py): what may be replaced, refusals,
kills at every step of a replacement, signals, concurrent runs, tampered
runs given to ``varprop report``, and full disks.

Kills are real: ``VARPROP_TEST_FAULT=step=kill`` makes a real process send
itself SIGKILL at a named step (``stop``: SIGSTOP, so a test can signal it
from outside at that exact point). Most of the state machine is driven by a
tiny Python process that only imports varprop.outdir (milliseconds); real
``varprop simulate`` processes are killed, stopped and signalled too.
"""

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from varprop.cli import main
from varprop.outdir import AREA, MANIFEST, OutDirError, staging

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--layers", "3", "--width", "8", "--samples", "8"]


def snapshot(root: Path) -> dict:
    """Every entry under ``root``: its type, bytes (or link target), mode and mtime
    (``root``'s own mtime aside: the staging area comes and goes in it)."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if path.is_symlink():
            content = ("link", os.readlink(path))
        elif path.is_dir():
            content = ("dir",)
        elif path.is_file():
            content = ("file", path.read_bytes())
        else:
            content = ("other",)  # a FIFO: reading would block
        out[str(path.relative_to(root))] = (content, st.st_mode, st.st_mtime_ns)
    return out


def complete(target: Path) -> dict:
    """``target``'s manifest, after checking every file it lists is there, unchanged."""
    manifest = json.loads((target / MANIFEST).read_text())
    assert "incomplete" not in manifest
    for name, entry in manifest["files"].items():
        data = (target / name).read_bytes()
        assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"], name
    return manifest


def write_run(target: Path, tag: str, names=("a.txt", "b.txt", "c.txt"), force=False) -> None:
    with staging(target, force=force) as tmp:
        for name in names:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(f"{tag} {name}\n")


def tag_of(target: Path) -> str:
    tags = {(target / n).read_text().split()[0] for n in complete(target)["files"]}
    assert len(tags) == 1, tags
    return tags.pop()


def no_staging_left(parent: Path) -> bool:
    return not (parent / AREA).exists()


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line(result, option: str, *words: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"varprop: error: {option}: "), result.stderr
    assert all(w in lines[0] for w in words), lines[0]


# -- which directories may be written, and the one line for those that may not -------------------------------

def _foreign(d):
    d.mkdir()
    (d / "thesis.tex").write_text("mine")
    (d / "config.json").write_text("{}")
    (d / "src").mkdir()
    (d / "src" / "main.c").write_text("int main;")


def _old_layout(d):
    d.mkdir()
    (d / "config.json").write_text('{"configs": []}')
    (d / "layers.csv").write_text("config,layer\n")


def _edited_run(d):
    write_run(d, "old")
    (d / "b.txt").write_text("my edit")


def _read_only(d):
    write_run(d, "old")
    d.chmod(0o555)


REFUSED = [
    ("''", lambda tmp: "", None, ["expected a directory path, got ''"]),
    (".", lambda tmp: ".", None, ["the current directory", "directory of its own"]),
    ("..", lambda tmp: "..", None, ["a parent directory"]),
    ("run/.", lambda tmp: str(tmp / "run") + "/.", lambda d: write_run(d, "old"), ["'.' or '..'"]),
    ("a file", lambda tmp: tmp / "run", lambda d: d.write_text("x"), ["is a file, not a directory"]),
    ("below a file", lambda tmp: tmp / "run" / "sub", lambda d: d.write_text("x"), ["is a file, not a directory"]),
    ("link to a run", lambda tmp: tmp / "link", lambda d: write_run(d, "old"), ["symbolic link (to run)"]),
    ("dangling link", lambda tmp: tmp / "dangling", None, ["dangling symbolic link (to nowhere)"]),
    ("foreign files", lambda tmp: tmp / "run", _foreign, ["did not write (config.json, src, thesis.tex)", "--force"]),
    ("older varprop run", lambda tmp: tmp / "run", _old_layout, ["did not write (config.json, layers.csv)"]),
    ("changed output", lambda tmp: tmp / "run", _edited_run, ["b.txt changed since varprop wrote it", "b.txt.~N~"]),
    ("read-only", lambda tmp: tmp / "run", _read_only, ["is read-only (mode 0555)"]),
    ("staging area", lambda tmp: tmp / AREA / "x", None, [f"inside {AREA}/"]),
    ("newlines in names", lambda tmp: tmp / "run", lambda d: (d.mkdir(), (d / "a\nb").write_text("")),
     ["did not write ('a\\nb')"]),
]


@pytest.mark.parametrize("case,out,setup,words", REFUSED, ids=[c[0] for c in REFUSED])
def test_refusals_are_one_line_and_touch_nothing(tmp_path, monkeypatch, case, out, setup, words):
    monkeypatch.chdir(tmp_path)
    if setup is not None:
        setup(tmp_path / "run")
    (tmp_path / "link").symlink_to("run")
    (tmp_path / "dangling").symlink_to("nowhere")
    before = snapshot(tmp_path)
    try:
        one_line(cli("simulate", *SMALL, "--out", out(tmp_path)), "--out", *words)
        assert snapshot(tmp_path) == before
    finally:
        if (tmp_path / "run").is_dir():
            (tmp_path / "run").chmod(0o755)  # for pytest's clean-up


def test_a_mount_point_is_refused(tmp_path):
    """It cannot be renamed, nor a staged file renamed into it from beside it."""
    write_run(tmp_path / "src", "old")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "--bind", str(tmp_path / "src"), str(mnt)]).returncode:
        pytest.skip("cannot bind-mount here (needs root)")
    try:
        before = snapshot(tmp_path)
        one_line(cli("simulate", *SMALL, "--out", mnt), "--out", "is a mount point", f"{mnt}/run")
        assert snapshot(tmp_path) == before
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_foreign_files_are_kept_with_force(tmp_path):
    target = tmp_path / "run"
    _foreign(target)
    (target / "a.txt").write_text("my a")
    (target / "b.txt").write_text("new b.txt\n")  # the same bytes as the run writes: nothing to keep aside
    (target / "ln").symlink_to("/etc/passwd")
    with pytest.raises(OutDirError, match="did not write"):
        write_run(target, "new")
    write_run(target, "new", force=True)
    assert tag_of(target) == "new" and set(complete(target)["files"]) == {"a.txt", "b.txt", "c.txt"}
    assert (target / "a.txt.~1~").read_text() == "my a" and not (target / "b.txt.~1~").exists()
    assert (target / "thesis.tex").read_text() == "mine" and (target / "config.json").read_text() == "{}"
    assert (target / "src" / "main.c").read_text() == "int main;" and os.readlink(target / "ln") == "/etc/passwd"
    # A varprop run now: the next run needs no --force and keeps the same files.
    write_run(target, "third", names=("a.txt",))
    assert tag_of(target) == "third" and not (target / "b.txt").exists()
    assert {p.name for p in target.iterdir()} == {MANIFEST, "a.txt", "a.txt.~1~", "thesis.tex", "config.json",
                                                  "src", "ln"}
    assert no_staging_left(tmp_path)


def test_a_run_replaces_only_what_varprop_wrote(tmp_path):
    target = tmp_path / "run"
    write_run(target, "old", names=("a.txt", "old-only.txt"))
    inode = target.stat().st_ino
    write_run(target, "new", names=("a.txt", "b.txt"))  # only varprop's files: one atomic exchange
    assert tag_of(target) == "new" and not (target / "old-only.txt").exists() and target.stat().st_ino != inode
    (target / "notes.txt").write_text("mine")
    write_run(target, "newer")  # a user's file inside: replaced file by file, the file kept
    assert tag_of(target) == "newer" and (target / "notes.txt").read_text() == "mine"
    (target / "c.txt").write_text("edited")
    write_run(target, "fourth", force=True)  # an edited output: kept aside
    assert tag_of(target) == "fourth" and (target / "c.txt.~1~").read_text() == "edited"
    assert no_staging_left(tmp_path)


def test_odd_names(tmp_path):
    long = tmp_path / ("n" * 250)  # staging entries add a pid and a suffix: too long for a file name as it is
    write_run(long, "x")
    write_run(long, "y")
    assert tag_of(long) == "y" and no_staging_left(tmp_path)
    odd = tmp_path / "a\nb"
    r = cli("simulate", *SMALL, "--out", odd)
    assert r.exit_code == 0, r.output
    assert complete(odd)
    (odd / "x").write_text("")
    os.unlink(odd / MANIFEST)
    one_line(cli("simulate", *SMALL, "--out", odd), "--out", repr(str(odd)))


def test_planted_links_and_tampered_manifests_reach_nothing_outside(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    target = tmp_path / "run"
    write_run(target, "old")
    manifest = json.loads((target / MANIFEST).read_text())
    entry = {"bytes": victim.stat().st_size, "sha256": hashlib.sha256(victim.read_bytes()).hexdigest()}
    manifest["files"].update({"../victim.txt": entry, "/" + str(victim): entry, ".": entry, "src": entry})
    (target / MANIFEST).write_text(json.dumps(manifest))
    (target / "src").mkdir()
    with pytest.raises(OutDirError, match="src changed since varprop wrote it"):  # it claims a directory
        write_run(target, "new", names=("a.txt",))
    write_run(target, "new", names=("a.txt",), force=True)
    assert victim.read_text() == "precious\n" and (target / "src").is_dir() and tag_of(target) == "new"
    # A link planted as the lock file is not followed (it would be truncated), nor a planted staging area.
    (tmp_path / AREA).mkdir()
    (tmp_path / AREA / "run.lock").symlink_to(victim)
    with pytest.raises(OutDirError):
        write_run(target, "x")
    assert victim.read_text() == "precious\n"
    shutil.rmtree(tmp_path / AREA)
    (tmp_path / AREA).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OutDirError, match="not varprop's staging directory"):
        write_run(target, "x")
    (tmp_path / AREA).unlink()
    # The target swapped for a link while the run computes: refused, the link's directory untouched.
    write_run(tmp_path / "other", "other")
    before = snapshot(tmp_path / "other")
    with pytest.raises(OutDirError, match="symbolic link"):
        with staging(target) as tmp:
            (tmp / "a.txt").write_text("x")
            target.rename(tmp_path / "moved")
            target.symlink_to("other")
    assert snapshot(tmp_path / "other") == before and target.is_symlink() and no_staging_left(tmp_path)


def test_nested_outputs(tmp_path):
    """A command may write subdirectories: they are listed, replaced and removed like files."""
    target = tmp_path / "run"
    write_run(target, "old", names=("a.txt", "figs/x.png", "figs/deep/y.png", "gone/z.txt"))
    assert complete(target)["dirs"] == ["figs", "figs/deep", "gone"]
    write_run(target, "new", names=("a.txt", "figs/x.png"))  # all varprop's: one exchange
    assert tag_of(target) == "new" and sorted(p.name for p in target.iterdir()) == [MANIFEST, "a.txt", "figs"]
    (target / "figs" / "notes.txt").write_text("mine")
    write_run(target, "newer", names=("a.txt", "other/b.txt"))  # file by file: figs/ stays for notes.txt
    assert tag_of(target) == "newer" and sorted(p.name for p in (target / "figs").iterdir()) == ["notes.txt"]
    (target / "sub").write_text("a file where the next run puts a directory")
    with pytest.raises(OutDirError, match="sub is not varprop's"):
        write_run(target, "x", names=("sub/b.txt",))
    write_run(target, "fourth", names=("sub/b.txt",), force=True)
    assert tag_of(target) == "fourth" and (target / "sub.~1~").read_text().startswith("a file where")
    assert not (target / "other").exists() and no_staging_left(tmp_path)


def test_new_empty_and_nested_targets(tmp_path):
    write_run(tmp_path / "a" / "b" / "run", "x")
    assert tag_of(tmp_path / "a" / "b" / "run") == "x"
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["run"]
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o750)
    write_run(empty, "x")
    assert tag_of(empty) == "x" and (empty.stat().st_mode & 0o777) == 0o750


def test_failed_run_changes_nothing_and_leaves_nothing(tmp_path):
    target = tmp_path / "run"
    write_run(target, "old")
    (target / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(RuntimeError):
        with staging(target) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("the run failed")
    assert snapshot(tmp_path) == before
    with pytest.raises(RuntimeError):
        with staging(tmp_path / "new" / "deeper" / "run") as tmp:
            raise RuntimeError("the run failed")
    assert snapshot(tmp_path) == before  # the parents it created are gone too


def test_current_directory_inside_the_target_is_replaced_in_place(tmp_path, monkeypatch):
    target = tmp_path / "run"
    write_run(target, "old")
    monkeypatch.chdir(target)
    inode = target.stat().st_ino
    write_run(target, "new")
    assert tag_of(target) == "new" and target.stat().st_ino == inode and Path.cwd() == target


def test_without_an_atomic_exchange(tmp_path, monkeypatch):
    """Systems without renameat2 rename the old run aside first (recovery: see the kill matrix)."""
    monkeypatch.setenv("VARPROP_TEST_FAULT", "exchange=off")
    target = tmp_path / "run"
    write_run(target, "old")
    write_run(target, "new")
    assert tag_of(target) == "new" and no_staging_left(tmp_path)


def test_the_cli_keeps_a_users_files_and_says_what_it_kept(tmp_path):
    target = tmp_path / "thesis"
    _foreign(target)
    one_line(cli("simulate", *SMALL, "--out", target), "--out", "--force")
    r = cli("simulate", *SMALL, "--out", target, "--force")
    assert r.exit_code == 0, r.output
    assert "config.json -> config.json.~1~" in r.stderr and (target / "config.json.~1~").read_text() == "{}"
    assert (target / "thesis.tex").read_text() == "mine" and (target / "src" / "main.c").exists()
    manifest = complete(target)
    assert {"config.json", "layers.csv", "report.md"} <= set(manifest["files"])
    assert "thesis.tex" not in manifest["files"]
    for args in (["fit", "--fan-in", "10,20", "--samples", "8", "--replicates", "2"],
                 ["phase", "--resolution", "3"], ["gallery", "--only", "small-check"]):
        foreign = tmp_path / args[0]
        foreign.mkdir()
        (foreign / "mine.txt").write_text("x")
        where = foreign / "small-check" if args[0] == "gallery" else foreign
        if args[0] == "gallery":
            where.mkdir()
            (where / "mine.txt").write_text("x")
        one_line(cli(*args, "--out", foreign), "--out", "did not write (mine.txt)")
        assert {p.name for p in where.iterdir()} == {"mine.txt"}
    one_line(cli("gallery", "--out", ""), "--out", "got ''")


# -- kill -9 at every step of a replacement ----------------------------------------------------------------

LIGHT = """
import sys
from pathlib import Path
from varprop.outdir import staging
target, tag, force, names = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4].split(",")
with staging(target, force=force) as tmp:
    for name in names:
        (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
        (Path(tmp) / name).write_text(f"{tag} {name}\\n")
"""


def light(target: Path, tag: str, fault: str = "", force=False, names="a.txt,b.txt,c.txt"):
    env = {**os.environ, "VARPROP_TEST_FAULT": fault}
    return subprocess.run([sys.executable, "-c", LIGHT, str(target), tag, "1" if force else "0", names], env=env,
                          capture_output=True, text=True, timeout=60)


NEW = "a.txt,b.txt,c.txt,d.txt,sub/e.txt"
KILLS = [("create", s) for s in ("staging", "staged")] \
    + [("exchange", s) for s in ("staging", "staged", "journal", "exchanged")] \
    + [("aside", s) for s in ("staging", "journal", "aside", "exchanged")] \
    + [("merge", s) for s in ("staged", "journal", "merge-1", "merge-2", "merge-4", "merge-5")]


@pytest.mark.parametrize("mode,step", KILLS, ids=[f"{m}-{s}" for m, s in KILLS])
def test_kill_9_at_any_step_then_the_next_run_cleans_up(tmp_path, mode, step):
    target = tmp_path / "run"
    fault = f"{step}=kill" + (",exchange=off" if mode == "aside" else "")
    if mode != "create":
        write_run(target, "old", names=("a.txt", "b.txt", "old-only.txt", "old/x.txt", "sub/y.txt"))
    if mode == "merge":
        (target / "notes.txt").write_text("mine")
        (target / "d.txt").write_text("my d")  # the new run writes d.txt too: kept aside with force
        (target / "sub" / "notes.txt").write_text("mine too")
    killed = light(target, "new", fault, force=mode == "merge", names=NEW)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (tmp_path / AREA).is_dir()  # kill -9 leaves staging, and only staging, behind
    assert {p.name for p in tmp_path.iterdir()} <= {"run", AREA}
    if mode == "create":
        assert not target.exists()
    elif mode == "aside" and step == "aside":
        assert not target.exists()  # the one instant without an atomic exchange; the next run restores it
    elif mode == "merge":
        assert (target / "notes.txt").read_text() == "mine"
        assert [p.read_text() for p in target.glob("d.txt*") if p.read_text() == "my d"] == ["my d"]
    else:
        assert tag_of(target) == ("new" if step == "exchanged" else "old")
    # The next run, of any target in the same directory, finishes or undoes what the dead one left...
    sibling = light(tmp_path / "sibling", "x")
    assert sibling.returncode == 0, sibling.stderr
    assert no_staging_left(tmp_path)
    if step in ("aside", "exchanged") or (mode == "merge" and step != "staged"):
        assert tag_of(target) == "new"  # a replacement that had begun is completed
    elif mode != "create":
        assert tag_of(target) == "old"  # one that had not leaves the old run
    # ... and the next run of the same target completes as usual.
    again = light(target, "third", force=mode == "merge", names=NEW)
    assert again.returncode == 0, again.stderr
    assert tag_of(target) == "third" and no_staging_left(tmp_path)
    assert not (target / "old").exists() and not (target / "sub" / "y.txt").exists()
    if mode == "merge":
        assert (target / "notes.txt").read_text() == "mine" and (target / "sub" / "notes.txt").read_text() == "mine too"
        assert [p.name for p in target.glob("d.txt.~*~")] == ["d.txt.~1~"]
        assert (target / "d.txt.~1~").read_text() == "my d"


def _stopped(proc: subprocess.Popen) -> None:
    """Wait until ``proc`` stopped itself (VARPROP_TEST_FAULT=step=stop)."""
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), status


def _finished(proc: subprocess.Popen) -> int:
    proc.communicate(timeout=60)  # reads the pipes, so a chatty process cannot block on them
    return proc.returncode


def _varprop(args, fault=""):
    return subprocess.Popen([sys.executable, "-m", "varprop", *map(str, args)], cwd=ROOT,
                            env={**os.environ, "VARPROP_TEST_FAULT": fault}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _staging_dirs(parent: Path) -> list[Path]:
    return sorted(p for p in (parent / AREA).glob("run.*") if p.is_dir()) if (parent / AREA).exists() else []


@pytest.mark.slow
def test_kill_9_of_varprop_simulate(tmp_path):
    """Real runs killed mid-simulation, right after the exchange and half-way
    through a file-by-file replacement; each next run cleans up the last."""
    target = tmp_path / "run"
    write_run(target, "old")
    before = snapshot(target)
    # 1. mid-run: killed from outside once it works in its staging
    proc = _varprop(["simulate", *SMALL, "--seed", "1", "--out", target], fault="staging=stop")
    _stopped(proc)
    os.kill(proc.pid, signal.SIGCONT)
    os.kill(proc.pid, signal.SIGKILL)
    _finished(proc)
    assert snapshot(target) == before and len(_staging_dirs(tmp_path)) == 1
    # 2. right after the atomic exchange, before the old run is deleted
    proc = _varprop(["simulate", *SMALL, "--seed", "2", "--out", target], fault="exchanged=kill")
    assert _finished(proc) == -signal.SIGKILL
    assert json.loads((target / "config.json").read_text())["seed"] == 2 and complete(target)
    [left] = _staging_dirs(tmp_path)  # run 1's staging is gone; run 2's old run is left
    assert tag_of(left / "run") == "old"
    # 3. half-way through replacing file by file (a user's file is inside)
    (target / "notes.txt").write_text("mine")
    proc = _varprop(["simulate", *SMALL, "--seed", "3", "--out", target], fault="merge-5=kill")
    assert _finished(proc) == -signal.SIGKILL
    assert (target / "notes.txt").read_text() == "mine" and json.loads((target / MANIFEST).read_text())["incomplete"]
    # 4. the next run completes the replacement it finds, then its own
    proc = _varprop(["simulate", *SMALL, "--seed", "4", "--out", target])
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert json.loads((target / "config.json").read_text())["seed"] == 4 and complete(target)
    assert (target / "notes.txt").read_text() == "mine" and no_staging_left(tmp_path)
    assert not list(target.glob("*.~*~"))


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("saved") / "run"
    assert cli("simulate", *SMALL, "--init", "unit", "--init", "he", "--out", out).exit_code == 0
    return out


# -- signals and concurrent runs ---------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_run_leaves_nothing(tmp_path, sig):
    target = tmp_path / "new" / "deep" / "run"
    proc = _varprop(["simulate", *SMALL, "--out", target], fault="staging=stop")
    _stopped(proc)
    assert _staging_dirs(target.parent)
    os.kill(proc.pid, sig)
    os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig and err == "varprop: interrupted\n" and out == ""
    assert list(tmp_path.iterdir()) == []  # not even the parents it created


def test_a_signal_during_the_swap_waits_for_it(tmp_path):
    target = tmp_path / "run"
    write_run(target, "old")
    proc = _varprop(["simulate", *SMALL, "--seed", "1", "--out", target], fault="exchanged=stop")
    _stopped(proc)
    os.kill(proc.pid, signal.SIGTERM)
    os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    # still an interruption (the status says so), but the new output is whole and the last word says that
    assert proc.returncode == 143 and err == f"varprop: interrupted after {target} was written whole\n"
    assert json.loads((target / "config.json").read_text())["seed"] == 1 and complete(target)
    assert no_staging_left(tmp_path)


def test_concurrent_runs_on_one_directory(saved_run, tmp_path):
    """The lock is the same for every command: here a small writer holds it while varprop simulate tries."""
    target = tmp_path / "run"
    shutil.copytree(saved_run, target)
    first = subprocess.Popen([sys.executable, "-c", LIGHT, str(target), "first", "0", "a.txt"],
                             env={**os.environ, "VARPROP_TEST_FAULT": "staging=stop"}, stderr=subprocess.PIPE)
    _stopped(first)
    one_line(cli("simulate", *SMALL, "--out", target), "--out",
             f"another varprop run (pid {first.pid}) is writing {target}; wait for it")
    one_line(cli("report", target), "RUN_DIR", "another varprop run")
    write_run(tmp_path / "other", "x")  # a directory beside it is not locked out
    os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=60) == 0, first.stderr.read()
    assert tag_of(target) == "first" and tag_of(tmp_path / "other") == "x" and no_staging_left(tmp_path)


# -- varprop report on tampered runs -----------------------------------------------------------------------

def _config(d, edit):
    meta = json.loads((d / "config.json").read_text())
    edit(meta)
    (d / "config.json").write_text(json.dumps(meta))


def _header_only(d):
    (d / "layers.csv").write_text((d / "layers.csv").read_text().splitlines()[0] + "\n")


def _rows(d, edit):
    """layers.csv with its data lines (header kept) passed through ``edit``."""
    head, *rows = (d / "layers.csv").read_text().splitlines(keepends=True)
    (d / "layers.csv").write_text(head + "".join(edit(rows)))


def _relabel(d):
    (d / "layers.csv").write_text((d / "layers.csv").read_text().replace("he,", "xavier,"))


def _loop(d):
    (d / "layers.csv").unlink()
    (d / "layers.csv").symlink_to("layers.csv")


def _unreadable(d):
    if os.geteuid() == 0:
        pytest.skip("root reads a file of mode 000; the symbolic-link loop case covers a read error")
    (d / "config.json").chmod(0)


TAMPERED = [
    ("no configs", lambda d: _config(d, lambda m: m.pop("configs")), "has no list of configurations"),
    ("configs not a list", lambda d: _config(d, lambda m: m.update(configs={"a": 1})), "has no list"),
    ("empty configs", lambda d: _config(d, lambda m: m.update(configs=[])), "has no list"),
    ("no versions", lambda d: _config(d, lambda m: m.pop("versions")), "has no 'versions'"),
    ("not JSON", lambda d: (d / "config.json").write_bytes(b"\xff{"), "is not valid JSON"),
    ("header-only layers.csv", _header_only, "holds a header and no rows"),
    ("empty layers.csv", lambda d: (d / "layers.csv").write_text(""), "is not a varprop table"),
    ("label mismatch", _relabel, "disagree on the configurations"),
    ("no layers.csv", lambda d: (d / "layers.csv").unlink(), "holds no layers.csv"),
    ("layers.csv a directory", lambda d: ((d / "layers.csv").unlink(), (d / "layers.csv").mkdir()),
     "cannot read"),
    ("layers.csv a link loop", _loop, "cannot read"),
    ("unreadable config.json", _unreadable, "cannot read"),
    ("missing column", lambda d: (d / "layers.csv").write_text("config,layer,replicate\nhe,0,0\n"),
     "lacks the column 'post_log10_std'"),
    ("layers.csv cut short", lambda d: os.truncate(d / "layers.csv", (d / "layers.csv").stat().st_size - 9),
     "ends in the middle of a row: it was cut short"),
    ("a row missing", lambda d: _rows(d, lambda r: r[:3] + r[4:]), "lacks rows or repeats them"),
    ("a row twice", lambda d: _rows(d, lambda r: r[:3] + r[2:]), "lacks rows or repeats them"),
    ("a configuration's last layer missing",
     lambda d: _rows(d, lambda r: [x for x in r if not x.startswith("he,he,0,3,")]),
     "configuration 'he' has 3 rows where its 1 replicate of layers 0..3 make 4"),
    ("read-only directory", lambda d: d.chmod(0o555), "is read-only"),
    ("layers.csv a FIFO", lambda d: ((d / "layers.csv").unlink(), os.mkfifo(d / "layers.csv")),
     "is not a regular file"),
]


@pytest.mark.parametrize("case,tamper,words", TAMPERED, ids=[c[0] for c in TAMPERED])
def test_report_on_a_tampered_run_touches_nothing(saved_run, tmp_path, case, tamper, words):
    d = tmp_path / "run"
    shutil.copytree(saved_run, d, symlinks=True)
    tamper(d)
    before = snapshot(tmp_path)
    try:
        one_line(cli("report", d), "RUN_DIR", words)
        assert snapshot(tmp_path) == before
    finally:
        d.chmod(0o755)


def test_report_redraws_in_place_and_keeps_the_rest(saved_run, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(saved_run, d)
    (d / "notes.txt").write_text("mine")
    data = {n: (d / n).stat().st_ino for n in ("config.json", "layers.csv", "histograms.csv")}
    html = (d / "report.html").read_bytes()
    r = cli("report", d, "--format", "md")
    assert r.exit_code == 0, r.output
    assert {n: (d / n).stat().st_ino for n in data} == data  # the data are not rewritten, not even copied
    assert (d / "report.html").read_bytes() == html and (d / "notes.txt").read_text() == "mine"
    assert (d / "report.md").read_bytes() == (saved_run / "report.md").read_bytes()
    assert "report.html" in complete(d)["files"] and no_staging_left(tmp_path)
    os.unlink(d / MANIFEST)  # an older varprop's run: foreign, --force redraws beside it
    one_line(cli("report", d), "RUN_DIR", "did not write", "--force")
    assert cli("report", d, "--force").exit_code == 0
    assert not list(d.glob("*.~*~")), "identical files are taken over, not kept aside"


def test_report_leaves_behind_a_figure_an_older_version_drew(saved_run, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(saved_run, d)
    for name in ("std_per_layer.svg", "mine.svg"):
        (d / name).write_text("<svg/>")
    manifest = json.loads((d / MANIFEST).read_text())
    data = (d / "std_per_layer.svg").read_bytes()
    manifest["files"]["std_per_layer.svg"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (d / MANIFEST).write_text(json.dumps(manifest))  # as an older varprop, which drew SVGs too, left it
    r = cli("report", d)
    assert r.exit_code == 0, r.output
    assert not (d / "std_per_layer.svg").exists() and (d / "mine.svg").read_text() == "<svg/>"
    assert "std_per_layer.svg" not in complete(d)["files"] and (d / "report.html").is_file()


# -- full disks --------------------------------------------------------------------------------------------

def test_full_disk_mid_render_keeps_the_previous_run(saved_run, tmp_path, monkeypatch):
    d = tmp_path / "run"
    shutil.copytree(saved_run, d)
    before = snapshot(tmp_path)
    real = Path.write_text

    def full(self, *args, **kw):
        if self.name == "report.html":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, *args, **kw)

    monkeypatch.setattr(Path, "write_text", full)
    one_line(cli("report", d), "RUN_DIR", f"cannot write {d / 'report.html'} (No space left on device)",
             f"{d} is unchanged")
    one_line(cli("simulate", *SMALL, "--out", d), "--out", "report.html (No space left on device)")
    assert snapshot(tmp_path) == before


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 1.2 MB file system (tmpfs): room for one small run."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); the monkeypatched ENOSPC test covers the logic")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_a_really_full_disk(tiny_fs):
    target = tiny_fs / "run"
    assert cli("simulate", *SMALL, "--out", target).exit_code == 0
    # a file of the user's leaves an eighth of a run's size free, whatever the size of a run's files
    run_bytes = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    st = os.statvfs(tiny_fs)
    free = st.f_bavail * st.f_frsize
    if free > run_bytes // 8:
        (tiny_fs / "filler").write_bytes(bytes(free - run_bytes // 8))
    before = snapshot(tiny_fs)
    r = cli("simulate", *SMALL, "--seed", "1", "--out", target)
    one_line(r, "--out", f"cannot write {target}/", "(No space left on device)", f"{target} is unchanged")
    assert snapshot(tiny_fs) == before
    r = cli("report", target)
    one_line(r, "RUN_DIR", f"cannot write {target}/", "(No space left on device)", f"{target} is unchanged")
    assert snapshot(tiny_fs) == before


# -- proportionate outputs ---------------------------------------------------------------------------------

def test_summary_json_holds_the_layers_the_tables_show(tmp_path):
    from varprop.report.markdown import shown_layers

    out = tmp_path / "run"
    assert cli("simulate", "--layers", "40", "--width", "4", "--samples", "4", "--init", "unit", "--init",
               "fan_in", "--format", "json", "--out", out).exit_code == 0
    rows = json.loads((out / "summary.json").read_text())
    assert sorted((r["config"], r["layer"]) for r in rows) == sorted(
        (c, layer) for c in ("unit", "fan_in") for layer in shown_layers(40))
    assert len(shown_layers(40)) < 41 and (out / "layers.csv").read_text().count("\n") == 1 + 2 * 41


FINALISER_SIGNAL = """
import os, signal, sys, time, weakref
import varprop.montecarlo.run as engine
from varprop.cli import main

def slow_run(*args, **kwargs):  # a long run, during which the signal lands in a finaliser
    class Held:
        pass
    held = Held()
    ref = weakref.ref(held, lambda _: os.kill(os.getpid(), signal.{sig}))
    del held
    time.sleep(5)
    print("finished")

engine.run_configs = slow_run
main(["simulate", "--layers", "2", "--width", "4", "--out", sys.argv[1]])
"""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_landing_in_a_finaliser_still_interrupts(sig, tmp_path):
    """Python drops an exception raised in a weakref callback or __del__: the signal's exception raised
    there would be lost, and the run go on to the end (and replace the previous output), every later signal
    ignored as if unwinding. It is delivered again once the finaliser is done."""
    done = subprocess.run([sys.executable, "-c", FINALISER_SIGNAL.replace("{sig}", sig), str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=60)
    signum = getattr(signal, sig)
    assert done.returncode == 128 + signum and "finished" not in done.stdout, (done.returncode, done.stderr)
    assert done.stderr.strip() == "varprop: interrupted" and not (tmp_path / "run").exists()

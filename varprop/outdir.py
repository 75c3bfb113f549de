"""Output directories: what varprop may replace, and how, so that nothing is
lost and nothing is half-written. Pure I/O (no NumPy), used by every command
through :func:`staging`.

The rules (the README's "Output directories" states them for users):

- A run directory is one holding ``.varprop-manifest.json``: the files that
  run wrote, each with its size and SHA-256. varprop replaces only those
  (and only while unchanged); every other file is kept.
- A non-empty directory without a manifest (a user's directory, or a run
  of a varprop older than manifests) is refused unless ``force``; even then
  its files are kept, and one whose name a new output takes (or a manifest
  file changed since varprop wrote it) is kept as ``NAME.~N~``.
- A symbolic link, ``''``, ``.``, ``..``, a file, a read-only directory or a
  mount point as the target is refused.
- The new output is written into ``PARENT/.varprop-staging/NAME.PID.XXXX/run``
  and published only when complete: by one atomic exchange of the two
  directories (Linux ``renameat2(RENAME_EXCHANGE)``) when the target holds
  only varprop's files, else (or where the exchange is not supported) under
  a journal that the next run finds and completes. A lock
  (``NAME.lock`` beside the staging, ``flock``) refuses a second concurrent
  run on the same target; the next run removes staging that no live run
  holds.

For tests, ``VARPROP_TEST_FAULT=step=action[,...]`` kills (``kill``) or stops
(``stop``: SIGSTOP) the process at a named step, and ``exchange=off`` takes
the path of systems without an atomic exchange; see :func:`_fault`.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import stat
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

try:
    import fcntl
except ImportError:  # Windows: a byte-range lock instead of flock (same semantics for one byte)
    fcntl = None  # type: ignore[assignment]
    import msvcrt

MANIFEST = ".varprop-manifest.json"
AREA = ".varprop-staging"
JOURNAL = "journal.json"
_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}

__all__ = ["MANIFEST", "AREA", "OutDirError", "staging", "check_target", "read_manifest", "owned_files", "critical",
           "deferring"]


class OutDirError(OSError):
    """A directory varprop must not or cannot write; ``str()`` is one line for the user."""

    def __str__(self) -> str:
        return str(self.args[0])


def show(path: Any) -> str:
    """A path (or name) for a one-line message: quoted when it holds a newline or other control character."""
    text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    return text if text.isprintable() else repr(text)


def _key(name: str) -> str:
    """The target's name as staging entries spell it (``KEY.lock``, ``KEY.PID.XXXX``): itself, or a
    prefix and a hash when it is too long to take those suffixes within a file name's 255 bytes."""
    if len(os.fsencode(name)) <= 200:
        return name
    return os.fsencode(name)[:160].decode(errors="ignore") + "-" + hashlib.sha1(os.fsencode(name)).hexdigest()[:16]


def _warn(message: str) -> None:
    print(f"varprop: warning: {message}", file=sys.stderr)


# -- signals: the CLI's handler asks whether to defer -------------------------------------------------------

_critical = 0
_pending: list[int] = []
_published: list[str] = []  # the outputs this process replaced whole, as the user named them


def published() -> list[str]:
    """The output directories this process has published, in order: what an interrupted command still
    wrote whole (a signal arriving while one is published is delivered once it is complete)."""
    return list(_published)


@contextmanager
def critical() -> Iterator[None]:
    """A section no SIGINT/SIGTERM may cut: a signal arriving inside is
    delivered (re-raised) when the outermost section ends."""
    global _critical
    _critical += 1
    try:
        yield
    finally:
        _critical -= 1
        if not _critical and _pending:
            signal.raise_signal(_pending.pop())


def deferring(signum: int) -> bool:
    """True (and the signal is kept for later) inside :func:`critical`."""
    if _critical:
        _pending[:] = [signum]
        return True
    return False


# -- test hooks --------------------------------------------------------------------------------------------

def _fault_action(step: str) -> str | None:
    for item in os.environ.get("VARPROP_TEST_FAULT", "").split(","):
        name, _, action = item.partition("=")
        if name.strip() == step:
            return action.strip()
    return None


def _fault(step: str) -> None:
    """Die (``kill``: SIGKILL, as kill -9) or stop (``stop``: SIGSTOP, for a
    test to signal or kill from outside) at ``step``, when a test asks to."""
    action = _fault_action(step)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)


# -- manifests ---------------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _entry(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _same(path: Path, entry: Any) -> bool:
    """``path`` is a regular file (not a link) holding exactly what ``entry`` records."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    return (stat.S_ISREG(st.st_mode) and isinstance(entry, dict) and st.st_size == entry.get("bytes")
            and _sha256(path) == entry.get("sha256"))


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest of a varprop run directory, or None (absent, a link, or not a varprop manifest)."""
    path = Path(directory) / MANIFEST
    try:
        if not stat.S_ISREG(path.lstat().st_mode):
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = (isinstance(data, dict) and data.get("tool") == "varprop"
          and all(isinstance(data.get(k, {}), dict) for k in ("files", "previous"))
          and isinstance(data.get("dirs", []), list))
    return data if ok else None


def owned_files(directory: str | os.PathLike[str], manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """The files of ``directory`` that varprop wrote and nobody changed since:
    relative path -> manifest entry (the manifest itself excluded)."""
    directory = Path(directory)
    manifest = read_manifest(directory) if manifest is None else manifest
    if manifest is None:
        return {}
    out = {}
    for name, entry in manifest["files"].items():
        path = _within(directory, name)
        if path is not None and _same(path, entry):
            out[name] = entry
        elif path is not None and _same(path, manifest.get("previous", {}).get(name)):
            out[name] = manifest["previous"][name]  # a merge cut short: the earlier run's file
    return out


def _plain(name: Any) -> bool:
    """A relative path as manifests spell it: '/'-separated, no empty, '.' or '..' part; not the manifest."""
    return (isinstance(name, str) and name != MANIFEST and "\0" not in name
            and all(part not in ("", ".", "..") for part in name.split("/")))


def _within(directory: Path, rel: Any) -> Path | None:
    """``directory/rel`` when ``rel`` is plain and every directory on the way
    is a real one (a link there is never followed), else None."""
    if not _plain(rel):
        return None
    path = directory
    for part in rel.split("/")[:-1]:
        path = path / part
        try:
            if not stat.S_ISDIR(path.lstat().st_mode):
                return None
        except OSError:
            return None
    return directory / rel


def _walk(directory: Path, prefix: str = "") -> list[tuple[str, str]]:
    """Every entry under ``directory``, parents before children: (relative path,
    'dir' | 'file' | 'other'); links are 'other' and never followed."""
    out = []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        rel = prefix + entry.name
        if entry.is_dir(follow_symlinks=False):
            out.append((rel, "dir"))
            out += _walk(Path(entry.path), rel + "/")
        else:
            out.append((rel, "file" if entry.is_file(follow_symlinks=False) else "other"))
    return out


def _manifest_for(run: Path) -> dict[str, Any]:
    from . import __version__

    files, dirs = {}, []
    for rel, kind in _walk(run):
        if kind == "other":
            raise OutDirError(f"internal error: {show(rel)} in a run's staging is a link or a special file")
        if kind == "dir":
            dirs.append(rel)
        else:
            files[rel] = _entry(run / rel)
    return {"tool": "varprop", "version": __version__, "format": 1, "files": files,
            **({"dirs": dirs} if dirs else {})}


def _write_json(path: Path, data: Any, scratch: Path) -> None:
    """Write ``path`` at once (written beside in ``scratch``, same file system, then renamed)."""
    tmp = scratch / f".{path.name}.{secrets.token_hex(4)}.tmp"
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# -- the target --------------------------------------------------------------------------------------------

@dataclass
class _State:
    exists: bool
    manifest: dict[str, Any] | None = None
    ours: dict[str, Any] = field(default_factory=dict)  # varprop's unchanged files (relative paths)
    foreign: list[str] = field(default_factory=list)  # every other entry, the manifest aside when valid
    changed: list[str] = field(default_factory=list)  # listed in the manifest but changed since

    def tops(self) -> list[str]:
        """The top-level names that hold something not varprop's."""
        return sorted({rel.split("/")[0] for rel in self.foreign})


def _inspect(target: Path) -> _State:
    if not os.path.lexists(target):
        return _State(False)
    manifest = read_manifest(target)
    ours = owned_files(target, manifest) if manifest else {}
    our_dirs = set(manifest.get("dirs", [])) if manifest else set()
    foreign = [rel for rel, kind in _walk(target) if not (rel == MANIFEST and manifest)
               and (rel not in our_dirs if kind == "dir" else rel not in ours)]
    changed = [rel for rel in foreign if manifest and rel in manifest["files"]]
    return _State(True, manifest, ours, foreign, changed)


def check_target(out_dir: str | os.PathLike[str]) -> Path:
    """``out_dir`` as an absolute path, or :class:`OutDirError` when it can
    never be an output directory ('', '.', '..', a link, a file, read-only)."""
    return _target(out_dir)[0]


def _target(out_dir: str | os.PathLike[str]) -> tuple[Path, str]:
    """The absolute target (its parent's links resolved, its own name kept) and
    how to name it in messages; refuses what can never be an output directory."""
    raw = os.fspath(out_dir)
    shown = show(raw)
    if raw == "":
        raise OutDirError("expected a directory path, got ''")
    last = os.path.basename(os.path.normpath(raw))
    if last in (".", "..", "") or os.path.basename(raw.rstrip("/" + os.sep)) in (".", ".."):
        what = {".": "the current directory", "..": "a parent directory", "": "the root directory"}.get(
            last, "a directory named by '.' or '..'")
        raise OutDirError(f"{raw!r} is {what}: a run is written into a directory of its own; name one, "
                          "e.g. ./run")
    if AREA in Path(raw).parts:
        raise OutDirError(f"{shown} is inside {AREA}/, varprop's own staging area")
    path = Path(raw)
    parent = path.parent.resolve()
    target = parent / path.name
    try:
        st = target.lstat()
    except (FileNotFoundError, NotADirectoryError):  # an ancestor that is a file: said when parents are made
        return target, shown
    except OSError as exc:
        raise OutDirError(f"cannot inspect {shown} ({exc.strerror})") from None
    if stat.S_ISLNK(st.st_mode):
        to = show(os.readlink(target))
        what = "a dangling symbolic link" if not target.exists() else "a symbolic link"
        raise OutDirError(f"{shown} is {what} (to {to}); varprop does not write through links: "
                          "give the directory itself")
    if not stat.S_ISDIR(st.st_mode):
        raise OutDirError(f"{shown} exists and is a file, not a directory")
    if not os.access(target, os.W_OK | os.X_OK) or not st.st_mode & 0o222:
        raise OutDirError(f"{shown} is read-only (mode {stat.S_IMODE(st.st_mode):04o})")
    if _mount_point(target):
        raise OutDirError(f"{shown} is a mount point, which cannot be replaced by a staged directory; give a "
                          f"directory inside it, e.g. {show(os.path.join(raw, 'run'))}")
    return target, shown


def _mount_point(path: Path) -> bool:
    """``path`` is where a file system (or a bind mount, same device) is mounted."""
    if os.path.ismount(path):
        return True
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
            points = {re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4]) for line in fh}
    except OSError:
        return False
    return str(path) in points


def _refusal(state: _State, shown: str, force: bool) -> str | None:
    if force:
        return None
    if state.manifest is None and state.foreign:
        tops = state.tops()
        names = ", ".join(map(show, tops[:3])) + (", ..." if len(tops) > 3 else "")
        return (f"{shown} holds files varprop did not write ({names}); choose another --out, or --force to "
                "write beside them (they are kept)")
    if state.changed:
        name = show(state.changed[0])
        return (f"{shown}/{name} changed since varprop wrote it; move it away, or --force to "
                f"keep it as {name}.~N~")
    return None


def _make_parents(parent: Path) -> list[Path]:
    """Create ``parent`` and its missing ancestors; return those created, deepest first."""
    created = []
    p = parent
    while not os.path.lexists(p):
        created.append(p)
        p = p.parent
    if not p.is_dir():
        raise OutDirError(f"{show(p)} is a file, not a directory")
    for d in list(reversed(created)):
        try:
            d.mkdir()
        except FileExistsError:
            created.remove(d)  # made meanwhile by someone else: not ours to remove
    return created


def _rmdirs(dirs: list[Path]) -> None:
    for d in dirs:  # deepest first; stop at the first that holds something
        try:
            d.rmdir()
        except OSError:
            return


# -- renames -----------------------------------------------------------------------------------------------

_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2; False where the system or file system does not offer it."""
    if sys.platform != "linux" or (flags == _RENAME_EXCHANGE and _fault_action("exchange") == "off"):
        return False
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _move_noreplace(src: Path, dst: Path) -> bool:
    """Rename ``src`` to ``dst`` unless ``dst`` exists; False when it does."""
    try:
        if _renameat2(src, dst, _RENAME_NOREPLACE):
            return True
    except FileExistsError:
        return False
    if os.path.lexists(dst):
        return False
    os.rename(src, dst)
    return True


def _backup_name(directory: Path, name: str, taken: set[str]) -> str:
    n = 1
    while f"{name}.~{n}~" in taken or os.path.lexists(directory / f"{name}.~{n}~"):
        n += 1
    return f"{name}.~{n}~"


# -- the lock ----------------------------------------------------------------------------------------------

def _make_area(area: Path) -> None:
    """The staging area, with its parent's permissions: in a directory others
    write in too (/tmp: 1777), their runs can stage beside ours."""
    try:
        area.mkdir()
    except FileExistsError:
        if not stat.S_ISDIR(area.lstat().st_mode):
            raise OutDirError(f"{show(area)} is not varprop's staging directory (a link or a file); "
                              "remove it") from None
        return
    try:
        area.chmod(stat.S_IMODE(area.parent.stat().st_mode))
    except OSError:
        pass  # a file system without modes: the default is as good


class _Lock:
    """An exclusive lock on ``AREA/NAME.lock``, held for a whole run."""

    def __init__(self, area: Path, name: str):
        self.path = area / f"{name}.lock"
        self.fd: int | None = None

    def acquire(self, wait: float = 0.5) -> bool:
        """Try for ``wait`` seconds (a sweeping run holds another's lock for milliseconds)."""
        deadline = time.monotonic() + wait
        while True:
            _make_area(self.path.parent)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            except FileNotFoundError:  # the area was removed between the two calls
                if time.monotonic() > deadline:
                    raise
                continue
            if self._lock(fd):
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if same:  # not a file its last holder unlinked meanwhile
                    self.fd = fd
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
                    return True
            os.close(fd)
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)

    @staticmethod
    def _lock(fd: int) -> bool:
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def holder(self) -> str:
        try:
            pid = self.path.read_text().strip()
        except OSError:
            pid = ""
        return f" (pid {pid})" if pid.isdigit() else ""

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except OSError:
            pass  # another user's (in a shared directory) stays; it locks nothing once closed
        os.close(self.fd)
        self.fd = None


# -- staging, publishing, recovery -------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there: assume alive, the lock decides
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, someone else's
        return True
    return True


def _sweep(area: Path, own: str) -> None:
    """Remove (or complete) staging that no live run holds: ``own``'s (whose
    lock this run holds) and that of other targets whose run died."""
    def wrappers() -> list[tuple[str, int, Path]]:
        out = []
        for entry in sorted(os.scandir(area), key=lambda e: e.name):
            name, _, pid = entry.name.rpartition(".")[0].rpartition(".")  # NAME.PID.XXXX
            if entry.is_dir(follow_symlinks=False) and name and pid.isdigit():
                out.append((name, int(pid), Path(entry.path)))
        return out

    try:
        found = wrappers()
    except FileNotFoundError:
        return
    for name, pid, path in found:
        try:
            if name == own:
                _recover(path)
            elif not _pid_alive(pid):
                lock = _Lock(area, name)
                if lock.acquire(wait=0):
                    try:
                        _recover(path)
                    finally:
                        lock.release()
        except OSError as exc:  # e.g. another user's, in a shared directory: theirs to clean up
            _warn(f"left {show(path)} ({exc.strerror or exc})")
    staged = {name for name, _, _ in wrappers()}
    for entry in list(os.scandir(area)):  # locks of runs killed after their staging went
        name = entry.name.removesuffix(".lock")
        if name != entry.name and name != own and name not in staged and entry.is_file(follow_symlinks=False):
            lock = _Lock(area, name)
            try:
                if lock.acquire(wait=0):
                    lock.release()
            except OSError:
                pass  # another user's


def _discard_old(old: Path, target: Path) -> bool:
    """Delete a replaced run's files (those its manifest lists, unchanged) and
    its emptied directories; move anything else back into ``target``. True
    when ``old`` is gone."""
    if old.is_symlink():  # what was exchanged was a link put at the target meanwhile: not ours to follow
        return False
    manifest = read_manifest(old)
    for name in owned_files(old, manifest) if manifest else {}:
        (old / name).unlink()
    if manifest:
        (old / MANIFEST).unlink()
    for rel, kind in reversed(_walk(old)):
        if kind == "dir":
            try:
                (old / rel).rmdir()
            except OSError:
                pass  # holds something that is not varprop's: moved back below
    _move_back(old, target)
    try:
        old.rmdir()
        return True
    except OSError:
        return False


def _move_back(src: Path, dst: Path) -> None:
    """Move what is left in ``src`` (files that appeared in a run directory while
    it was being replaced) to the same place under ``dst``, never over anything."""
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        there = dst / entry.name
        if _move_noreplace(Path(entry.path), there):
            continue
        if entry.is_dir(follow_symlinks=False) and stat.S_ISDIR(there.lstat().st_mode):
            _move_back(Path(entry.path), there)
            try:
                os.rmdir(entry.path)
            except OSError:
                pass
        else:
            _warn(f"kept {show(entry.path)}: it appeared in {show(dst)} while that was being replaced, and "
                  "its name is taken there")


def _recover(wrapper: Path) -> None:
    """Complete or undo what a dead run left in ``wrapper`` (idempotent)."""
    journal = _read_json(wrapper / JOURNAL)
    run, old = wrapper / "run", wrapper / "old"
    mode = journal.get("mode") if isinstance(journal, dict) else None
    target = Path(journal["target"]) if mode and isinstance(journal.get("target"), str) else None
    if target is not None and target.parent != wrapper.parent.parent:
        return _warn(f"left {wrapper}: its journal names {target}, outside {wrapper.parent.parent}")
    if mode == "merge" and target is not None and target.is_dir() and not target.is_symlink():
        _merge_steps(wrapper, target, journal)
    elif mode == "exchange" and target is not None and run.is_dir():
        st = run.stat()
        if [st.st_dev, st.st_ino] != journal.get("run") and not _discard_old(run, target):
            return _warn(f"left {wrapper}: it still holds files that are not varprop's")
    elif mode == "aside" and target is not None and old.is_dir():
        if run.is_dir() and not os.path.lexists(target):
            os.rename(run, target)  # the new run was complete: finish the swap
        if not os.path.lexists(target):
            os.rename(old, target)  # no new run to put there: the old one goes back
        elif not run.exists() and not _discard_old(old, target):
            return _warn(f"left {wrapper}: it still holds files that are not varprop's")
        elif run.exists():
            return _warn(f"left {wrapper}: {target} was recreated while the run was being replaced")
    # What remains is this run's own unpublished output and bookkeeping.
    shutil.rmtree(wrapper, ignore_errors=True)


def _merge_steps(wrapper: Path, target: Path, journal: dict[str, Any]) -> None:
    """Replace the target's varprop files by the new run's one by one, keeping
    every other file; safe to repeat from the start after a kill at any point."""
    run = wrapper / "run"
    new: dict[str, Any] = {n: e for n, e in journal["manifest"]["files"].items() if _plain(n)}
    new_dirs = [d for d in journal["manifest"].get("dirs", []) if _plain(d)]
    for name, backup in sorted(journal["backups"].items(), key=lambda item: item[0].count("/")):
        path = target / MANIFEST if name == MANIFEST else _within(target, name)
        if path is None or not os.path.lexists(path) or not (name == MANIFEST or _plain(backup)):
            continue
        if name == MANIFEST:
            in_the_way = read_manifest(target) is None
        elif name in new_dirs:
            in_the_way = not stat.S_ISDIR(path.lstat().st_mode)
        else:
            in_the_way = os.path.lexists(run / name) and not _same(path, new.get(name))
        if in_the_way and not _move_noreplace(path, target / backup):
            _move_noreplace(path, target / _backup_name(target, name, set()))
    transitional = {**journal["manifest"], "previous": journal["previous"], "incomplete": True,
                    "dirs": [*new_dirs, *(d for d in journal.get("remove_dirs", []) if d not in new_dirs)]}
    _write_json(target / MANIFEST, transitional, wrapper)  # lists old and new: neither looks foreign midway
    for name, entry in journal["remove"].items():
        path = _within(target, name)
        if path is not None and _same(path, entry):
            path.unlink()
    for d in new_dirs:
        (target / d).mkdir(exist_ok=True)  # parents first; what was in the way was kept aside above
    for i, name in enumerate(sorted(new)):
        if os.path.lexists(run / name):
            os.replace(run / name, target / name)
        _fault(f"merge-{i + 1}")
    for d in sorted(journal.get("remove_dirs", []), key=lambda d: -str(d).count("/")):
        path = _within(target, d)
        if path is not None and d not in new_dirs:
            try:
                path.rmdir()
            except OSError:
                pass  # holds a file that is not varprop's: kept, with its directory
    _write_json(target / MANIFEST, journal["manifest"], wrapper)


class _Staging:
    """One run's staging: ``wrapper/run`` becomes the target on success."""

    def __init__(self, out_dir: str | os.PathLike[str], target: Path, shown: str, area: Path, force: bool):
        self.out_dir, self.target, self.shown, self.area, self.force = out_dir, target, shown, area, force
        self.wrapper = area / f"{_key(target.name)}.{os.getpid()}.{secrets.token_hex(4)}"
        self.run = self.wrapper / "run"
        self.journal = {"tool": "varprop", "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "target": str(target), "mode": "staging"}

    def create(self) -> None:
        self.wrapper.mkdir()
        _write_json(self.wrapper / JOURNAL, self.journal, self.wrapper)
        self.run.mkdir()

    def _set_journal(self, **items: Any) -> None:
        self.journal.update(items)
        _write_json(self.wrapper / JOURNAL, self.journal, self.wrapper)

    def publish(self) -> None:
        manifest = _manifest_for(self.run)
        _write_json(self.run / MANIFEST, manifest, self.wrapper)
        _fault("staged")
        if _target(self.out_dir)[0] != self.target:  # what it is now (a link put there meanwhile is refused)
            raise OutDirError(f"{self.shown} moved while this run was computing; nothing was replaced")
        state = _inspect(self.target)
        refusal = _refusal(state, self.shown, self.force)
        if refusal:
            raise OutDirError(refusal + " (it changed while this run was computing; nothing was replaced)")
        if not state.exists:
            self._set_journal(mode="create")
            if not _renameat2(self.run, self.target, _RENAME_NOREPLACE):
                os.rename(self.run, self.target)
            return
        self.run.chmod(stat.S_IMODE(self.target.stat().st_mode))
        if not state.foreign and not _holds_cwd(self.target):
            st = self.run.stat()
            self._set_journal(mode="exchange", run=[st.st_dev, st.st_ino])
            _fault("journal")
            if _renameat2(self.run, self.target, _RENAME_EXCHANGE):
                _fault("exchanged")
                if not _discard_old(self.run, self.target):
                    _warn(f"left {self.wrapper}: it still holds files that are not varprop's")
                    self.wrapper = None  # type: ignore[assignment]
                return
            self._set_journal(mode="aside")
            old = self.wrapper / "old"
            os.rename(self.target, old)
            _fault("aside")
            os.rename(self.run, self.target)
            _fault("exchanged")
            if not _discard_old(old, self.target):
                _warn(f"left {self.wrapper}: it still holds files that are not varprop's")
                self.wrapper = None  # type: ignore[assignment]
            return
        self._merge(state, manifest)

    def _merge(self, state: _State, manifest: dict[str, Any]) -> None:
        new, new_dirs = manifest["files"], manifest.get("dirs", [])
        backups: dict[str, str] = {}
        for name in [*new_dirs, *sorted(new), MANIFEST]:  # a directory before what goes in it
            path = self.target / MANIFEST if name == MANIFEST else _within(self.target, name)
            if path is None or not os.path.lexists(path) or any(name.startswith(b + "/") for b in backups):
                continue  # free, or below something kept aside already
            if name == MANIFEST:
                mine = state.manifest is not None
            elif name in new_dirs:
                mine = stat.S_ISDIR(path.lstat().st_mode)  # files inside are judged one by one
            else:
                mine = name in state.ours or _same(path, new[name])
            if mine:
                continue
            if not self.force:
                raise OutDirError(
                    f"{self.shown}/{show(name)} "
                    + ("changed since varprop wrote it" if name in state.changed else "is not varprop's")
                    + f"; move it away, or --force to keep it as {show(name)}.~N~ (nothing was replaced)")
            backups[name] = _backup_name(self.target, name, set(backups.values()))
        remove = {n: e for n, e in state.ours.items() if n not in new}
        previous = {n: e for n, e in state.ours.items() if n in new}
        remove_dirs = [d for d in (state.manifest or {}).get("dirs", []) if d not in new_dirs]
        self._set_journal(mode="merge", manifest=manifest, previous=previous, remove=remove,
                          remove_dirs=remove_dirs, backups=backups)
        _fault("journal")
        _merge_steps(self.wrapper, self.target, self.journal)
        if backups:
            _warn(f"kept {len(backups)} file(s) of {self.shown} that varprop did not write under new names: "
                  + ", ".join(f"{show(n)} -> {show(b)}" for n, b in backups.items()))

    def discard(self) -> None:
        """Undo (or, half-way through a merge, complete) this run's staging."""
        if self.wrapper is not None:
            _recover(self.wrapper)

    def finish(self) -> None:
        """After a publish: what is left in the staging is this run's own bookkeeping."""
        if self.wrapper is not None:
            shutil.rmtree(self.wrapper, ignore_errors=True)


def _holds_cwd(target: Path) -> bool:
    """The current directory is ``target`` or inside it: renaming it away would
    leave the user's shell in a deleted directory, so it is replaced file by file."""
    try:
        cwd = Path.cwd()
    except OSError:
        return False
    return cwd == target or target in cwd.parents


def _describe(exc: OSError, shown: str, run: Path, existed: bool, writing: bool = True) -> OutDirError:
    """One line for a failed write into staging, naming the file as the user knows it
    (``writing``: the run was writing its files, not varprop its bookkeeping)."""
    where = shown  # a staged file by its name in the target; varprop's bookkeeping by the target's
    rel = None
    if exc.filename and _inside(exc.filename, run):
        rel = str(Path(os.fsdecode(exc.filename)).resolve().relative_to(run.resolve()))
    elif not exc.filename and writing and run.is_dir():
        # A failed write() names no file (open() succeeded): the one being written is the newest.
        files = [((run / r).stat().st_mtime_ns, r) for r, kind in _walk(run) if kind == "file"]
        rel = max(files)[1] if files else None
    if rel:
        where = f"{shown}/{show(rel)}"
    kept = f"{shown} is unchanged" if existed else "nothing was written"
    return OutDirError(f"cannot write {where} ({exc.strerror or exc}); {kept}")


@contextmanager
def staging(out_dir: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """A directory to write a run into; it replaces ``out_dir`` when the block succeeds.

    Refuses (:class:`OutDirError`, one line) before the block runs when
    ``out_dir`` cannot be an output directory, holds files varprop did not
    write (unless ``force``), or another run is writing it. On failure or
    interruption nothing changes at ``out_dir`` and nothing is left behind,
    not even parent directories this call created; a write that fails for
    lack of space (or any other OS error on a staged file) becomes one
    :class:`OutDirError` naming the file.

    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> with staging(root / "run") as tmp:
    ...     _ = (tmp / "report.md").write_text("hello")
    >>> sorted(p.name for p in (root / "run").iterdir())
    ['.varprop-manifest.json', 'report.md']
    >>> sorted(p.name for p in root.iterdir())
    ['run']
    """
    target, shown = _target(out_dir)
    if os.path.lexists(target):
        refusal = _refusal(_inspect(target), shown, force)
        if refusal:
            raise OutDirError(refusal)
    try:
        created = _make_parents(target.parent)
    except OutDirError:
        raise
    except OSError as exc:
        raise OutDirError(f"cannot create {show(exc.filename or target.parent)} ({exc.strerror or exc})") from None
    area = target.parent / AREA
    lock = _Lock(area, _key(target.name))
    stage: _Staging | None = None
    ok = False
    try:
        try:
            got = lock.acquire()
        except OSError as exc:
            raise OutDirError(f"cannot write in {show(target.parent)} ({exc.strerror or exc})") from None
        if not got:
            raise OutDirError(f"another varprop run{lock.holder()} is writing {shown}; wait for it to finish "
                              "or choose another --out")
        with critical():
            _sweep(area, _key(target.name))
        existed = os.path.lexists(target)
        if existed:  # again: the sweep may have completed a dead run's replacement
            refusal = _refusal(_inspect(target), shown, force)
            if refusal:
                raise OutDirError(refusal)
        stage = _Staging(out_dir, target, shown, area, force)
        try:
            stage.create()
        except OSError as exc:
            raise _describe(exc, shown, stage.run, existed) from None
        _fault("staging")
        try:
            yield stage.run
        except OSError as exc:
            if isinstance(exc, OutDirError) or not (
                    exc.errno in _DISK_ERRORS or _inside(exc.filename, stage.run)):
                raise
            raise _describe(exc, shown, stage.run, existed) from None
        with critical():
            try:
                stage.publish()
            except OutDirError:
                raise
            except OSError as exc:
                if stage.journal["mode"] == "merge":  # half-way: the journal lets the next run finish it
                    stage.wrapper = None  # type: ignore[assignment]
                    raise OutDirError(f"cannot finish replacing {shown} ({exc.strerror or exc}); the next "
                                      f"varprop run writing there completes it") from None
                raise _describe(exc, shown, stage.run, existed, writing=False) from None
            ok = True
            stage.finish()
            _published.append(shown)
    finally:
        with critical():
            if stage is not None and not ok:
                stage.discard()
            lock.release()
            _rmdirs([area])
            if not ok:
                _rmdirs(created)


def _inside(filename: Any, directory: Path) -> bool:
    if not filename:
        return False
    try:
        Path(os.fsdecode(filename)).resolve().relative_to(directory.resolve())
        return True
    except (ValueError, OSError):
        return False

"""A sweep's directory: one Parquet file per finished task, and its own records.

Layout of DIR (every name but the results starts with ``_``, which Parquet
readers skip, so ``pandas.read_parquet(DIR)`` reads exactly the results):

- ``task-<key>.parquet``: a finished task's rows, written as ``_tmp.task-*``
  and renamed, so a reader never sees a partial file;
- ``_sweep.json``: the manifest (it marks DIR as varprop's): the grid, its
  tasks, the table's columns, versions;
- ``_failures.json``: the tasks that raised and why; ``_sweep.lock``: held
  by the run working on DIR; ``_report/``: the report.

Every result file has the same schema (a Parquet dataset takes its schema
from one file and silently drops other files' extra columns): the union of
every result's columns so far. A result that brings a new column (a
backward configuration after forward ones) widens the manifest's schema
first, then the files already written are rewritten to it; a rerun finishes
any rewrite a kill interrupted.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from .. import __version__
from ..errors import SpecError
from ..run import json_default
from ..run import versions as run_versions
from .grid import Task

MANIFEST = "_sweep.json"
FAILURES = "_failures.json"
LOCK = "_sweep.lock"
REPORT = "_report"
TMP = "_tmp."
KIND = "varprop sweep"


def _arrow() -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa, pq


def result_path(directory: Path, key: str) -> Path:
    return Path(directory) / f"task-{key}.parquet"


def atomic(path: Path, write: Callable[[Path], None], before_rename: Callable[[], None] | None = None) -> None:
    """``write(tmp)`` to a temporary name beside ``path`` (``_tmp.`` + ..., which
    Parquet readers skip and the next run clears), then renamed to ``path``:
    a reader sees the old file or the new one, never a part."""
    path = Path(path)
    while True:
        tmp = path.parent / f"{TMP}{path.name}.{secrets.token_hex(4)}"
        try:  # created with the umask's permissions (mkstemp's are owner-only)
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        write(tmp)
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    """``data`` as JSON at ``path``, atomically."""
    atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1, default=json_default) + "\n"))


def write_text(directory: Path, text: str, n: int) -> None:
    """The grid file as given, beside its results: ``_grid.toml``, then
    ``_grid.2.toml`` ... for the grids ``--extend`` added."""
    path = Path(directory) / ("_grid.toml" if n == 1 else f"_grid.{n}.toml")
    if not path.exists():
        atomic(path, lambda tmp: tmp.write_text(text))


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of a sweep directory, or None when DIR holds none."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("kind") == KIND else None


def versions() -> dict[str, str]:
    """What a simulate run records (:func:`varprop.run.versions`), and the sweep's own libraries."""
    import dask
    import distributed
    import pyarrow

    return {**run_versions(), "dask": dask.__version__, "distributed": distributed.__version__,
            "pyarrow": pyarrow.__version__}


# --- column types ----------------------------------------------------------------
# A column is (name, kind, pandas dtype): kind is its Parquet type (bool, int64, float64,
# string); the pandas dtype, kept in every file's pandas metadata, is what read_parquet
# gives back (Int64 for fan_in, which layer 0 leaves empty, as simulate's table has it).

def _cell_type(values: Iterable[Any]) -> str:
    kinds = {("bool" if isinstance(v, bool) else "int64" if isinstance(v, int) else "float64"
              if isinstance(v, float) else "string") for v in values if v is not None}
    return _unify(kinds)


def _unify(kinds: Iterable[str]) -> str:
    kinds = set(kinds)
    if len(kinds) <= 1:
        return next(iter(kinds), "string")
    return "float64" if kinds <= {"int64", "float64"} else "string"


def _arrow_kind(t: Any) -> str:
    pa, _ = _arrow()
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_integer(t):
        return "int64"
    if pa.types.is_floating(t):
        return "float64"
    return "string"


_NULLABLE = {"bool": "boolean", "int64": "Int64", "float64": "float64", "string": "str"}


def _arrow_type(kind: str) -> Any:
    pa, _ = _arrow()
    return {"bool": pa.bool_(), "int64": pa.int64(), "float64": pa.float64(), "string": pa.string()}[kind]


def _pandas_dtypes(table: Any) -> dict[str, str]:
    """The pandas dtype of each column of a table made from a DataFrame (its pandas metadata)."""
    meta = table.schema.pandas_metadata or {}
    return {c["name"]: c["numpy_type"] for c in meta.get("columns", [])}


def _as_array(column: Any, kind: str) -> Any:
    """An Arrow column in the Parquet type ``kind`` (numbers as text where a column holds both)."""
    pa, _ = _arrow()
    t = _arrow_type(kind)
    return column if column.type == t else column.cast(t)


def _constant(value: Any, kind: str, n: int) -> Any:
    pa, _ = _arrow()
    if value is None:
        return pa.nulls(n, _arrow_type(kind))
    if kind == "string":
        value = str(value)
    elif kind == "float64":
        value = float(value)
    return pa.array([value] * n, _arrow_type(kind))


def _acquire(directory: Path, option: str = "out") -> int:
    """DIR's lock, taken (the kernel drops it when its holder dies, kill -9 included)."""
    try:
        fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise SpecError(option, f"cannot write to {directory} ({exc.strerror or exc})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise SpecError(option, f"{directory} is in use by a running varprop sweep; wait for it to finish") from None
    return fd


class SweepDir:
    """The directory of one sweep, opened (and locked) for a run.

    ``open`` checks that DIR is new, empty or a sweep directory varprop made
    for this grid (or, with ``extend``, any of its grids), takes the lock,
    clears what a killed run left (its temporary files) and finds which
    tasks are finished, rereading every result file.
    """

    def __init__(self, directory: Path, manifest: dict[str, Any], lock_fd: int):
        self.dir, self.manifest, self._lock_fd = Path(directory), manifest, lock_fd
        self.created: Path | None = None  # the topmost directory open() made
        self.fresh = False  # whether open() made the manifest (DIR was new or empty)
        self.tasks = {t["key"]: t for t in manifest["tasks"]}
        self.failures: dict[str, dict[str, Any]] = {}
        path = self.dir / FAILURES
        if path.is_file():
            try:
                self.failures = {k: v for k, v in json.loads(path.read_text()).items() if k in self.tasks}
            except (OSError, ValueError):
                self.failures = {}

    # --- opening ---------------------------------------------------------------

    @classmethod
    def open(cls, directory: Path, grid_source: dict[str, Any], keys: Sequence[str], tasks: Sequence[Task],
             replicates_per_task: int | None, extend: bool = False) -> SweepDir:
        directory = Path(directory)
        if directory.is_symlink():
            raise SpecError("out", f"{directory} is a symbolic link; give the directory itself")
        if directory.exists() and not directory.is_dir():
            raise SpecError("out", f"{directory} exists and is not a directory")
        created = None  # the topmost directory this run makes
        for ancestor in [directory.absolute(), *directory.absolute().parents]:
            if ancestor.exists():
                break
            created = ancestor
        old = read_manifest(directory) if directory.is_dir() else None
        if directory.is_dir() and old is None:
            others = [p.name for p in directory.iterdir() if not p.name.startswith(TMP) and p.name != LOCK]
            if others:
                raise SpecError("out", f"{directory} holds other files ({others[0]}, ...) and is not a varprop "
                                "sweep; give a new or empty directory")
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpecError("out", f"cannot write to {directory} ({exc.strerror or exc})") from None
        lock_fd = _acquire(directory)
        try:
            old = read_manifest(directory)  # again, now that no other run can change it
            manifest = cls._merge(directory, old, grid_source, keys, tasks, replicates_per_task, extend)
            for p in directory.iterdir():
                if p.name.startswith(TMP):  # left by a killed run; the lock says no run is writing it
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            write_json(directory / MANIFEST, manifest)
        except BaseException:
            os.close(lock_fd)
            raise
        made = cls(directory, manifest, lock_fd)
        made.created, made.fresh = created, old is None
        return made

    def discard(self) -> None:
        """Remove what this run wrote, and the directories it made, when it
        ends before any task of a new sweep finished (a scheduler that cannot
        be reached, Ctrl-C at once): a failed start leaves nothing behind."""
        if not self.fresh or any(self.dir.glob("task-*.parquet")):
            return
        for name in (MANIFEST, FAILURES, "_grid.toml"):
            (self.dir / name).unlink(missing_ok=True)
        for p in self.dir.glob(f"{TMP}*"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        (self.dir / LOCK).unlink(missing_ok=True)
        self.close()
        if self.created is None:  # an empty directory of the user's stays, empty again
            return
        for d in [self.dir.absolute(), *self.dir.absolute().parents]:
            try:
                d.rmdir()
            except OSError:  # something else appeared in it meanwhile: leave it
                return
            if d == self.created:
                return

    @staticmethod
    def _merge(directory: Path, old: dict[str, Any] | None, grid_source: dict[str, Any], keys: Sequence[str],
               tasks: Sequence[Task], replicates_per_task: int | None, extend: bool) -> dict[str, Any]:
        new = [{"key": t.key, "config_key": t.config_key, "label": t.label, "options": t.options,
                "values": t.values, "replicates": [t.start, t.stop], "depth": t.depth} for t in tasks]
        if old is None:
            return {"kind": KIND, "format": 1, "versions": versions(), "grids": [grid_source], "keys": list(keys),
                    "key_types": {k: _cell_type(t["values"][k] for t in new) for k in keys},
                    "replicates_per_task": replicates_per_task, "columns": [], "tasks": new}
        if old.get("format") != 1:
            raise SpecError("out", f"{directory} is a sweep of another varprop version's format; give another --out")
        have = {t["key"] for t in old["tasks"]}
        want = {t["key"] for t in new}
        if want == have:
            return old
        if old["versions"].get("varprop") != __version__:  # its numbers may differ from this version's
            raise SpecError("out", f"{directory} holds a sweep made by varprop {old['versions'].get('varprop')}, "
                            f"this is {__version__}; give another --out")
        if not extend:
            own = (directory / "_grid.toml") if (directory / "_grid.toml").exists() else directory / MANIFEST
            raise SpecError("out", f"{directory} holds another sweep ({len(want - have)} of this grid's {len(want)} "
                            f"tasks are not in it, {len(have - want)} of its {len(have)} not in this grid); rerun "
                            f"the grid it was made with ({own}), add --extend to add this grid's tasks to it, or "
                            "give another --out")
        # Extend: a configuration's replicates may be cut into blocks only one way.
        blocks: dict[str, list[tuple[int, int, str]]] = {}
        for t in old["tasks"]:
            blocks.setdefault(t["config_key"], []).append((*t["replicates"], t["key"]))
        for t in new:
            for start, stop, key in blocks.get(t["config_key"], []):
                if key != t["key"] and start < t["replicates"][1] and t["replicates"][0] < stop:
                    raise SpecError("replicates_per_task", f"configuration {t['label']} has replicates "
                                    f"{start}..{stop - 1} in {directory} as one task, which overlaps this grid's "
                                    f"{t['replicates'][0]}..{t['replicates'][1] - 1}; keep --replicates and "
                                    "--replicates-per-task as they were for configurations already there")
        all_keys = list(dict.fromkeys([*old["keys"], *keys]))
        from .grid import cell, label

        merged = old["tasks"] + [t for t in new if t["key"] not in have]
        for t in merged:
            t["values"] = {k: cell(t["options"], k) for k in all_keys}
            t["label"] = label(t["options"], all_keys) or t["label"]
        return {**old, "grids": [*old["grids"], grid_source], "keys": all_keys,
                "key_types": {k: _cell_type(t["values"][k] for t in merged) for k in all_keys},
                "versions": versions(), "tasks": merged}

    @staticmethod
    @contextmanager
    def lock(directory: Path) -> Iterator[None]:
        """Hold DIR's lock (SpecError when a sweep is running in it)."""
        fd = _acquire(Path(directory), "RUN_DIR")
        try:
            yield
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> SweepDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- results -----------------------------------------------------------------

    @property
    def columns(self) -> list[tuple[str, str, str]]:
        """The table's columns so far, (name, Parquet type, pandas dtype): ``config``,
        the grid keys, then the result's own."""
        types = self.manifest["key_types"]
        return ([("config", "string", "str")] + [(k, types[k], _NULLABLE[types[k]]) for k in self.manifest["keys"]]
                + [(name, kind, dtype) for name, kind, dtype in self.manifest["columns"]])

    def finished(self) -> set[str]:
        """Keys of the tasks whose result file is whole. A file that cannot be
        read, or holds other rows, is removed (its task runs again); one of an
        older schema or label (a kill during a rewrite, an extended grid) is
        rewritten."""
        found = {}
        for key, task in self.tasks.items():
            path = result_path(self.dir, key)
            if path.exists():
                seen = self._check(path, task)
                if seen is None:
                    path.unlink(missing_ok=True)
                else:
                    found[key] = seen
        if any([self._widen(columns) for columns, _ in found.values()]):  # a list: widen by every file
            write_json(self.dir / MANIFEST, self.manifest)
        for key, (columns, label) in found.items():
            if columns != self.columns or label != self.tasks[key]["label"]:
                self._rewrite(key)
        return set(found)

    def _check(self, path: Path, task: dict[str, Any]) -> tuple[list[tuple[str, str]], str] | None:
        """A result file's columns and label, or None when it is not task's whole result."""
        _, pq = _arrow()
        try:
            table = pq.read_table(path, page_checksum_verification=True)
        except Exception:  # any unreadable file is rerun, whatever pyarrow calls its fault
            return None
        meta = (table.schema.metadata or {}).get(b"varprop_task", b"").decode()
        start, stop = task["replicates"]
        if meta != task["key"] or table.num_rows != (stop - start) * (task["depth"] + 1) or not table.num_rows:
            return None
        dtypes = _pandas_dtypes(table)
        return [(f.name, _arrow_kind(f.type), dtypes.get(f.name)) for f in table.schema], str(table.column("config")[0])

    def _rewrite(self, key: str) -> None:
        _, pq = _arrow()
        self._write(key, pq.read_table(result_path(self.dir, key)))

    def add(self, task: Task | dict[str, Any], table: Any, before_rename: Callable[[], None] | None = None) -> None:
        """Write a finished task's rows (an Arrow table of simulate's columns) with
        its label and grid keys as its result file."""
        key = task.key if isinstance(task, Task) else task["key"]
        dtypes = _pandas_dtypes(table)
        if self._widen([(f.name, _arrow_kind(f.type), dtypes.get(f.name)) for f in table.schema]):
            write_json(self.dir / MANIFEST, self.manifest)
            for other in self.tasks:  # the results already written, to the wider schema
                if other != key and result_path(self.dir, other).exists():
                    self._rewrite(other)
        self._write(key, table, before_rename)
        if self.failures.pop(key, None) is not None:
            write_json(self.dir / FAILURES, self.failures)

    def _widen(self, columns: Sequence[tuple[str, str, str | None]]) -> bool:
        """Add new columns to the schema (after the column they follow), or
        widen a column's type; True when the schema changed."""
        cols = [list(c) for c in self.manifest["columns"]]
        keyed = {"config", *self.manifest["keys"]}
        index = {c[0]: i for i, c in enumerate(cols)}
        changed, previous = False, None
        for name, kind, dtype in columns:
            if name in keyed:
                continue
            if name in index:
                col = cols[index[name]]
                merged = _unify([col[1], kind])
                if merged != col[1]:
                    col[1], col[2], changed = merged, _NULLABLE[merged], True
            else:
                at = index[previous] + 1 if previous in index else len(cols)
                cols.insert(at, [name, kind, dtype or _NULLABLE[kind]])
                index = {c[0]: i for i, c in enumerate(cols)}
                changed = True
            previous = name
        present = {name for name, _, _ in columns}
        for col in cols:  # a column some result lacks holds nulls there: its pandas dtype must allow them
            if col[0] not in present and col[2] in ("int64", "bool"):
                col[2], changed = _NULLABLE[col[1]], True
        if changed:
            self.manifest["columns"] = cols
            self._meta = None
        return changed

    _meta: Any = None

    def _pandas_meta(self) -> bytes:
        """The pandas metadata every file carries (so read_parquet restores the same dtypes)."""
        if self._meta is None:
            pa, _ = _arrow()
            empty = pd.DataFrame({name: pd.Series([], dtype=dtype) for name, _, dtype in self.columns})
            schema = pa.schema([(name, _arrow_type(kind)) for name, kind, _ in self.columns])
            self._meta = pa.Table.from_pandas(empty, schema=schema, preserve_index=False).schema.metadata[b"pandas"]
        return self._meta

    def _write(self, key: str, table: Any, before_rename: Callable[[], None] | None = None) -> None:
        pa, pq = _arrow()
        task = self.tasks[key]
        n, have = table.num_rows, set(table.column_names)
        arrays = []
        for name, kind, _ in self.columns:
            if name == "config":
                arrays.append(_constant(task["label"], kind, n))
            elif name in self.manifest["keys"] and not (name == "width" and name in have):
                # (width is also a per-layer column of the result: the same value in a square stack,
                # and the right one in a stack given by widths)
                arrays.append(_constant(task["values"].get(name), kind, n))
            elif name in have:
                arrays.append(_as_array(table.column(name), kind))
            else:
                arrays.append(_constant(None, kind, n))
        out = pa.Table.from_arrays(arrays, schema=pa.schema(
            [(name, _arrow_type(kind)) for name, kind, _ in self.columns],
            metadata={b"pandas": self._pandas_meta(), b"varprop_task": key.encode()}))
        atomic(result_path(self.dir, key), lambda tmp: pq.write_table(out, tmp, write_page_checksum=True),
               before_rename)

    def fail(self, key: str, error: str, detail: str) -> None:
        """Record that a task raised (kept until it succeeds)."""
        task = self.tasks[key]
        self.failures[key] = {"label": task["label"], "replicates": task["replicates"], "error": error,
                              "traceback": detail}
        write_json(self.dir / FAILURES, self.failures)

    def read(self) -> pd.DataFrame:
        """Every finished task's rows (what ``pandas.read_parquet(DIR)`` gives), in grid order."""
        return read_results(self.dir, self.manifest)


def read_results(directory: Path, manifest: dict[str, Any] | None = None) -> pd.DataFrame:
    """A sweep directory's finished rows, ordered as the grid's tasks."""
    manifest = manifest or read_manifest(directory)
    if manifest is None:
        raise SpecError("RUN_DIR", f"{directory} is not a varprop sweep directory (no {MANIFEST})")
    paths = [result_path(directory, t["key"]) for t in manifest["tasks"]]
    paths = [p for p in paths if p.exists()]
    if not paths:
        return pd.DataFrame(columns=[n for n, _ in [("config", "")] + [(k, "") for k in manifest["keys"]]])
    return pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)

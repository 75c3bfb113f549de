"""A sweep's directory: one Parquet file per finished task, and its own records.

Layout of DIR (every name but the results starts with ``_``, which Parquet
readers skip, so ``pandas.read_parquet(DIR)`` reads exactly the results):

- ``task-<key>.parquet``: a finished task's rows, written as ``_tmp.task-*``
  and renamed, so a reader never sees a partial file; a train sweep's
  tasks write two tables, each in its own folder (:data:`TABLES`):
  ``history/task-<key>.parquet`` and ``layers/task-<key>.parquet``, read
  with ``pandas.read_parquet(DIR / "history")``. A train task is finished
  when both files are there and whole;
- ``_sweep.json``: the manifest (it marks DIR as varprop's): the command,
  the grid, its tasks, each table's columns, versions;
- ``_failures.json``: the tasks that raised and why; ``_sweep.lock``: held
  by the run working on DIR; ``_report/``: the report.

Every result file of a table has the same schema (a Parquet dataset takes its schema
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
# Per command, the tables a task writes: the folder each lives in ("": DIR itself).
TABLES = {"simulate": ("",), "train": ("history", "layers")}


def _arrow() -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa, pq


def result_path(directory: Path, key: str, table: str = "") -> Path:
    """Where task ``key``'s rows of ``table`` live (a simulate sweep's one table: DIR itself)."""
    return Path(directory) / table / f"task-{key}.parquet"


def command_of(manifest: dict[str, Any]) -> str:
    """The command a sweep directory's tasks run (manifests of simulate sweeps made before train grids name none)."""
    return manifest.get("command", "simulate")


def atomic(path: Path, write: Callable[[Path], None], before_rename: Callable[[], None] | None = None) -> None:
    """``write(tmp)`` to a temporary name beside ``path`` (``_tmp.`` + ..., which
    Parquet readers skip and the next run clears), then renamed to ``path``:
    a reader sees the old file or the new one, never a part."""
    path = Path(path)
    tmp: Path | None = None
    try:
        while True:
            # named before it exists: an interrupt between its creation and the next line still removes it
            tmp = path.parent / f"{TMP}{path.name}.{secrets.token_hex(4)}"
            try:  # created with the umask's permissions (mkstemp's are owner-only)
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                break
            except FileExistsError:  # another's: not ours to remove
                tmp = None
        write(tmp)
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
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
        self.command = command_of(manifest)
        self.tables = TABLES[self.command]
        self._meta: dict[str, bytes] = {}
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
             replicates_per_task: int | None, extend: bool = False, command: str = "simulate") -> SweepDir:
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
            manifest = cls._merge(directory, old, grid_source, keys, tasks, replicates_per_task, extend, command)
            for table in TABLES[command]:
                folder = directory / table
                if not folder.is_dir():
                    folder.mkdir()
                for p in folder.iterdir():
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
        if not self.fresh or any(any((self.dir / table).glob("task-*.parquet")) for table in self.tables):
            return
        for name in (MANIFEST, FAILURES, "_grid.toml"):
            (self.dir / name).unlink(missing_ok=True)
        for table in self.tables:
            for p in (self.dir / table).glob(f"{TMP}*"):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            if table:
                try:
                    (self.dir / table).rmdir()
                except OSError:  # something else appeared in it meanwhile: leave it
                    pass
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
               tasks: Sequence[Task], replicates_per_task: int | None, extend: bool,
               command: str = "simulate") -> dict[str, Any]:
        new = [{"key": t.key, "config_key": t.config_key, "label": t.label, "options": t.options,
                "values": t.values, "replicates": [t.start, t.stop], "depth": t.depth} for t in tasks]
        if old is None:
            # columns: a simulate sweep's one table's, as the format has always had it; else per table
            columns: Any = [] if command == "simulate" else {table: [] for table in TABLES[command]}
            return {"kind": KIND, "format": 1, **({} if command == "simulate" else {"command": command}),
                    "versions": versions(), "grids": [grid_source], "keys": list(keys),
                    "key_types": {k: _cell_type(t["values"][k] for t in new) for k in keys},
                    "replicates_per_task": replicates_per_task, "columns": columns, "tasks": new}
        if old.get("format") != 1:
            raise SpecError("out", f"{directory} is a sweep of another varprop version's format; give another --out")
        if command_of(old) != command:
            raise SpecError("out", f"{directory} holds a sweep of varprop {command_of(old)}, this grid's tasks run "
                            f"varprop {command} (its command = ...); give another --out")
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
        from .grid import cell, label, value

        merged = old["tasks"] + [t for t in new if t["key"] not in have]
        # An option each grid holds fixed, at different values (width 8 in one, 16 in the other), varies
        # now: a key, or two configurations would share a label.
        fixed = [k for k in dict.fromkeys(k for t in merged for k in t["options"])
                 if k not in (*old["keys"], *keys, "replicates", "max_memory")
                 and len({json.dumps(value(t["options"], k, command), default=str) for t in merged}) > 1]
        all_keys = list(dict.fromkeys([*old["keys"], *keys, *fixed]))
        for t in merged:
            t["values"] = {k: cell(t["options"], k, command) for k in all_keys}
            t["label"] = label(t["options"], all_keys, command) or t["label"]
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

    def _stored(self, table: str = "") -> list[list[Any]]:
        """The manifest's columns of ``table`` so far (a simulate sweep keeps its one table's as a list)."""
        cols = self.manifest["columns"]
        return cols if self.command == "simulate" else cols[table]

    def columns_of(self, table: str = "") -> list[tuple[str, str, str]]:
        """A table's columns so far, (name, Parquet type, pandas dtype): ``config``,
        the grid keys, then the result's own."""
        types, keys = self.manifest["key_types"], self.manifest["keys"]
        # a result's column that a grid added by --extend made a key (train's lr) stands where keys do
        return ([("config", "string", "str")] + [(k, types[k], _NULLABLE[types[k]]) for k in keys]
                + [(name, kind, dtype) for name, kind, dtype in self._stored(table) if name not in keys])

    @property
    def columns(self) -> list[tuple[str, str, str]]:
        """A simulate sweep's table's columns (:meth:`columns_of`)."""
        return self.columns_of()

    def complete(self, key: str) -> bool:
        """Whether every table's result file of task ``key`` is there."""
        return all(result_path(self.dir, key, table).exists() for table in self.tables)

    def finished(self) -> set[str]:
        """Keys of the tasks whose result files are whole. A task with a file
        that cannot be read, holds other rows, or lacks its other table's
        file (a kill between a train task's two files) has its files removed
        (it runs again); one of an older schema or label (a kill during a
        rewrite, an extended grid) is rewritten."""
        found: dict[str, dict[str, tuple[list[tuple[str, str, str | None]], str]]] = {}
        for key, task in self.tasks.items():
            paths = {table: result_path(self.dir, key, table) for table in self.tables}
            if not any(p.exists() for p in paths.values()):
                continue
            seen = {table: self._check(p, task) if p.exists() else None for table, p in paths.items()}
            if any(v is None for v in seen.values()):
                for p in paths.values():
                    p.unlink(missing_ok=True)
            else:
                found[key] = seen  # type: ignore[assignment]
        widened = [self._widen(columns, table) for seen in found.values() for table, (columns, _) in seen.items()]
        if any(widened):  # a list: widen by every file
            write_json(self.dir / MANIFEST, self.manifest)
        for key, seen in found.items():
            for table, (columns, label) in seen.items():
                if columns != self.columns_of(table) or label != self.tasks[key]["label"]:
                    self._rewrite(key, table)
        return set(found)

    def _check(self, path: Path, task: dict[str, Any]) -> tuple[list[tuple[str, str, str | None]], str] | None:
        """A result file's columns and label, or None when it is not task's whole result."""
        _, pq = _arrow()
        try:
            table = pq.read_table(path, page_checksum_verification=True)
        except Exception:  # any unreadable file is rerun, whatever pyarrow calls its fault
            return None
        meta = (table.schema.metadata or {}).get(b"varprop_task", b"").decode()
        start, stop = task["replicates"]
        if meta != task["key"] or not table.num_rows:
            return None
        if self.command == "simulate":
            if table.num_rows != (stop - start) * (task["depth"] + 1):
                return None
        elif "replicate" not in table.column_names or \
                set(table.column("replicate").to_pylist()) != set(range(start, stop)):
            return None  # a training run's rows per replicate vary (record_every, divergence): its replicates
        dtypes = _pandas_dtypes(table)
        return [(f.name, _arrow_kind(f.type), dtypes.get(f.name)) for f in table.schema], str(table.column("config")[0])

    def _rewrite(self, key: str, table: str = "") -> None:
        _, pq = _arrow()
        self._write(key, pq.read_table(result_path(self.dir, key, table)), table)

    def add(self, task: Task | dict[str, Any], result: Any, before_rename: Callable[[], None] | None = None) -> None:
        """Write a finished task's rows (an Arrow table of simulate's columns;
        for a train task, a dict of its tables) with its label and grid keys
        as its result files, the last with ``before_rename`` (tests: a kill)."""
        key = task.key if isinstance(task, Task) else task["key"]
        tables = result if isinstance(result, dict) else {"": result}
        for table in self.tables:
            dtypes = _pandas_dtypes(tables[table])
            if self._widen([(f.name, _arrow_kind(f.type), dtypes.get(f.name)) for f in tables[table].schema],
                           table):
                write_json(self.dir / MANIFEST, self.manifest)
                for other in self.tasks:  # the results already written, to the wider schema
                    if other != key and result_path(self.dir, other, table).exists():
                        self._rewrite(other, table)
        for table in self.tables:
            self._write(key, tables[table], table, before_rename if table == self.tables[-1] else None)
        if self.failures.pop(key, None) is not None:
            write_json(self.dir / FAILURES, self.failures)

    def _widen(self, columns: Sequence[tuple[str, str, str | None]], table: str = "") -> bool:
        """Add new columns to a table's schema (after the column they follow),
        or widen a column's type; True when the schema changed."""
        cols = [list(c) for c in self._stored(table)]
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
            if self.command == "simulate":
                self.manifest["columns"] = cols
            else:
                self.manifest["columns"][table] = cols
            self._meta.pop(table, None)
        return changed

    def _pandas_meta(self, table: str = "") -> bytes:
        """The pandas metadata every file of a table carries (so read_parquet restores the same dtypes)."""
        if table not in self._meta:
            pa, _ = _arrow()
            columns = self.columns_of(table)
            empty = pd.DataFrame({name: pd.Series([], dtype=dtype) for name, _, dtype in columns})
            schema = pa.schema([(name, _arrow_type(kind)) for name, kind, _ in columns])
            self._meta[table] = pa.Table.from_pandas(empty, schema=schema, preserve_index=False).schema.metadata[
                b"pandas"]
        return self._meta[table]

    def _write(self, key: str, result: Any, table: str = "", before_rename: Callable[[], None] | None = None) -> None:
        pa, pq = _arrow()
        task = self.tasks[key]
        n, have = result.num_rows, set(result.column_names)
        arrays = []
        columns = self.columns_of(table)
        for name, kind, _ in columns:
            if name == "config":
                arrays.append(_constant(task["label"], kind, n))
            elif name in self.manifest["keys"] and name not in have:
                # (a key the result has is its own column too, with the right values: simulate's per-layer
                # width in a stack given by widths, train's learning rate under a schedule)
                arrays.append(_constant(task["values"].get(name), kind, n))
            elif name in have:
                arrays.append(_as_array(result.column(name), kind))
            else:
                arrays.append(_constant(None, kind, n))
        # the result's own facts (a train task's varprop_train) travel with it, through rewrites too
        kept = {k: v for k, v in (result.schema.metadata or {}).items() if k.startswith(b"varprop_")}
        out = pa.Table.from_arrays(arrays, schema=pa.schema(
            [(name, _arrow_type(kind)) for name, kind, _ in columns],
            metadata={**kept, b"pandas": self._pandas_meta(table), b"varprop_task": key.encode()}))
        atomic(result_path(self.dir, key, table), lambda tmp: pq.write_table(out, tmp, write_page_checksum=True),
               before_rename)

    def fail(self, key: str, error: str, detail: str) -> None:
        """Record that a task raised (kept until it succeeds)."""
        task = self.tasks[key]
        self.failures[key] = {"label": task["label"], "replicates": task["replicates"], "error": error,
                              "traceback": detail}
        write_json(self.dir / FAILURES, self.failures)

    def read(self, table: str | None = None) -> pd.DataFrame:
        """Every finished task's rows of a table (what ``pandas.read_parquet`` gives), in grid order."""
        return read_results(self.dir, self.manifest, table)


def read_results(directory: Path, manifest: dict[str, Any] | None = None, table: str | None = None) -> pd.DataFrame:
    """A sweep directory's finished rows, ordered as the grid's tasks: its one
    table, or of a train sweep ``table`` ("history", the default, or "layers")."""
    manifest = manifest or read_manifest(directory)
    if manifest is None:
        raise SpecError("RUN_DIR", f"{directory} is not a varprop sweep directory (no {MANIFEST})")
    tables = TABLES[command_of(manifest)]
    table = tables[0] if table is None else table
    if table not in tables:
        accepted = "None (a simulate sweep has one table)" if tables == ("",) else " or ".join(tables)
        raise SpecError("table", f"expected {accepted}, got {table!r}")
    # a task is finished when every table's file is there (a kill between a train task's two writes
    # leaves one, which the next run replaces): only finished tasks' rows are read
    paths = [result_path(directory, t["key"], table) for t in manifest["tasks"]
             if all(result_path(directory, t["key"], other).exists() for other in tables)]
    if not paths:
        return pd.DataFrame(columns=[n for n, _ in [("config", "")] + [(k, "") for k in manifest["keys"]]])
    return pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)

"""The results store of a campaign: DIR/manifest.json and four CSV tables with header rows.

Contract (other tools read it; columns in this order):
  runs.csv         run_id, experiment, technique, app, layout, migration, rep, started_at, finished_at, status
  vm_times.csv     run_id, vm, start_host, end_host, exec_time_s
  migrations.csv   run_id, vm, source, destination, mode, started_at, total_time_s, downtime_s, bytes, status
  cpu_samples.csv  run_id, t_s, host, vm, cpu_pct
Times of day are ISO 8601 in UTC; `t_s` is seconds since the run started; `cpu_pct` is percent of
the host's capacity (a row with an empty `vm` is the host's total); `status` is `ok`, `invalid`
(the validity gate refused the run) or `failed`. DIR/runs/<run_id>.json holds a run's details
(validity checks, errors, artifacts).

Crash safety: a run's rows are written only when the run is complete, one table at a time, each
with a single write + flush + fsync, and runs.csv last. Its row there is the commit marker: rows
of the other tables whose run_id is not in runs.csv belong to a run cut short by a crash, and
are dropped when the store is opened for writing (readers ignore them), so killing the runner
at any instant loses at most the run in flight and rerunning it writes no duplicate rows. A
record that fails without killing the process (a full disk) cuts every table back to its size
before the record, so a store that stays in use never glues a row onto a fragment.

Numbers are written as Python writes them: a non-finite one as `nan`, `inf` or `-inf`, which
float() reads back; an empty cell is a value the run could not measure (None).
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

from testbed.errors import InputError

RUN_STATUSES = ("ok", "invalid", "failed")


def iso(t: float) -> str:
    """A host-clock time (seconds since the epoch) as the store writes it."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


def epoch(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


@dataclass(frozen=True)
class RunRow:
    run_id: str
    experiment: str
    technique: str
    app: str
    layout: str
    migration: bool
    rep: int
    started_at: float
    finished_at: float
    status: str


@dataclass(frozen=True)
class VmTime:
    vm: str
    start_host: str
    end_host: str
    exec_time_s: float


@dataclass(frozen=True)
class MigrationRow:
    vm: str
    source: str
    destination: str
    mode: str
    started_at: float
    total_time_s: float
    downtime_s: float | None  # None: the VM never stopped (or the technique cannot tell)
    bytes: int
    status: str


@dataclass(frozen=True)
class CpuSample:
    t_s: float
    host: str
    vm: str  # "" for the host's total
    cpu_pct: float


def _columns(row_type: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(row_type))


#: Table name -> columns, in commit order: runs.csv is written last.
TABLES: dict[str, tuple[str, ...]] = {
    "vm_times": ("run_id", *_columns(VmTime)),
    "migrations": ("run_id", *_columns(MigrationRow)),
    "cpu_samples": ("run_id", *_columns(CpuSample)),
    "runs": _columns(RunRow),
}
_TIME_COLUMNS = {"started_at", "finished_at"}


def _cell(name: str, value: Any) -> str:
    if value is None:
        return ""
    if name in _TIME_COLUMNS:
        return iso(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(round(float(value), 6))  # nan, inf, -inf as float() reads them
    return str(value)


def number(text: str) -> float:
    """A numeric cell as written by _cell: empty (not measured) reads as nan."""
    return math.nan if text == "" else float(text)


def _csv_text(rows: Iterable[Sequence[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Replace a file so a reader (or a crash) sees the old content or the new, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_table(directory: Path, table: str) -> list[dict[str, str]]:
    """Committed rows of a table: complete lines of runs that have their runs.csv row. A table
    that is not the contract's (another header, bytes that are not UTF-8) is an InputError."""
    committed = {row["run_id"] for row in _read_rows(directory / "runs.csv", TABLES["runs"])}
    return [row for row in _read_rows(directory / f"{table}.csv", TABLES[table]) if row["run_id"] in committed]


def _read_rows(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not a results table (byte {err.start} is not UTF-8)") from None
    complete = text[: text.rfind("\n") + 1]  # a torn last line is not a row
    reader = csv.DictReader(io.StringIO(complete))
    if complete:
        _check_header(path, reader.fieldnames or [], columns)
    return list(reader)


def _check_header(path: Path, header: Sequence[str], columns: tuple[str, ...]) -> None:
    """Refuse a table whose columns are not the contract's (the readers index them by name)."""
    if tuple(header) != columns:
        raise InputError(f"{path}: header {','.join(header)} is not the results contract's {','.join(columns)}")


def make_dir(directory: Path) -> Path:
    """Create a results directory (and its parents); a file in its place, or a parent that cannot
    be written, is an InputError naming it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise InputError(f"{directory}: exists and is not a directory (a results directory goes there)") from None
    except OSError as err:
        raise InputError(f"{err.filename or directory}: cannot create the results directory: {err.strerror}") from None
    return directory


class ResultsStore:
    """A campaign's results directory, opened for writing by one runner at a time."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = make_dir(Path(directory))
        (self.dir / "runs").mkdir(exist_ok=True)
        self._lock = (self.dir / ".lock").open("w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise InputError(f"{self.dir}: another runner is writing these results") from None
        for table, columns in TABLES.items():
            self._prepare(table, columns)
        runs = _read_rows(self.path("runs"), TABLES["runs"])
        self.statuses: dict[str, str] = {row["run_id"]: row["status"] for row in runs}
        for table in TABLES:
            if table != "runs":
                self._drop_uncommitted(table)
        self.exec_times: dict[str, dict[str, float]] = {}
        for row in _read_rows(self.path("vm_times"), TABLES["vm_times"]):
            self.exec_times.setdefault(row["run_id"], {})[row["vm"]] = number(row["exec_time_s"])

    def close(self) -> None:
        self._lock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def path(self, table: str) -> Path:
        return self.dir / f"{table}.csv"

    def recorded(self) -> set[str]:
        """Run ids already recorded (whatever their status): a resumed campaign skips them."""
        return set(self.statuses)

    def record(self, run: RunRow, vm_times: Sequence[VmTime] = (), migrations: Sequence[MigrationRow] = (),
               cpu_samples: Sequence[CpuSample] = (), details: dict[str, Any] | None = None) -> None:
        """Append one complete run; runs.csv last, so the run counts only once everything is on disk."""
        if run.run_id in self.statuses:
            raise ValueError(f"run {run.run_id} is already recorded")
        if run.status not in RUN_STATUSES:
            raise ValueError(f"run {run.run_id}: status {run.status!r} is not one of {RUN_STATUSES}")
        if details is not None:
            write_atomic(self.dir / "runs" / f"{run.run_id}.json", json.dumps(details, indent=2, default=str))
        batches = {
            "vm_times": [(run.run_id, *astuple(r)) for r in vm_times],
            "migrations": [(run.run_id, *astuple(r)) for r in migrations],
            "cpu_samples": [(run.run_id, *astuple(r)) for r in cpu_samples],
            "runs": [astuple(run)],
        }
        sizes = {table: self.path(table).stat().st_size for table in batches}
        try:
            for table, rows in batches.items():
                columns = TABLES[table]
                self._append(table, [[_cell(c, v) for c, v in zip(columns, row, strict=True)] for row in rows])
        except BaseException:
            self._cut_back(sizes)
            raise
        self.statuses[run.run_id] = run.status
        self.exec_times[run.run_id] = {r.vm: r.exec_time_s for r in vm_times}

    def _append(self, table: str, rows: list[list[str]]) -> None:
        if not rows:
            return
        data = _csv_text(rows).encode()
        fd = os.open(self.path(table), os.O_WRONLY | os.O_APPEND)
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(f"{self.path(table)}: short write ({written} of {len(data)} bytes)")
            os.fsync(fd)
        finally:
            os.close(fd)

    def _cut_back(self, sizes: dict[str, int]) -> None:
        """Truncate each table to its size before a failed record: no fragment of a line, and
        no row of the run, stays for the next record to be appended after."""
        for table, size in sizes.items():
            os.truncate(self.path(table), size)

    def _prepare(self, table: str, columns: tuple[str, ...]) -> None:
        """Create the table with its header, or check the header and cut a torn last line."""
        path = self.path(table)
        if not path.exists() or path.stat().st_size == 0:
            write_atomic(path, _csv_text([columns]))
            return
        data = path.read_bytes()
        header = next(csv.reader(io.StringIO(data.decode(errors="replace"))), [])
        _check_header(path, header, columns)
        end = data.rfind(b"\n") + 1
        if end < len(data):
            with path.open("r+b") as out:
                out.truncate(end)
                out.flush()
                os.fsync(out.fileno())

    def _drop_uncommitted(self, table: str) -> None:
        """Remove rows of runs a crash cut short (no runs.csv row), so rerunning them adds no duplicates."""
        rows = _read_rows(self.path(table), TABLES[table])
        kept = [row for row in rows if row["run_id"] in self.statuses]
        if len(kept) != len(rows):
            columns = TABLES[table]
            write_atomic(self.path(table), _csv_text([columns, *([row[c] for c in columns] for row in kept)]))

    # --- manifest.json: spec, variants, lab facts, versions, git revision, start/end ---

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    def manifest(self) -> dict[str, Any]:
        return read_manifest(self.dir)

    def update_manifest(self, **entries: Any) -> dict[str, Any]:
        manifest = self.manifest() | entries
        write_atomic(self.manifest_path, json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        return manifest


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(directory) / "manifest.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None

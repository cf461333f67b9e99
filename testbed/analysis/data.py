"""A results directory as pandas tables, plus the statistics tables the report shows.

Only committed runs are read (rows whose run_id has its runs.csv row), so a directory a runner
is still writing, or one a crash cut short, reads consistently. Each run gets its variant's axes
from the manifest (run ids are `<technique>.<variant id>.r<rep>`), so Appendix A's link rate and
compression need no extra columns.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from testbed.analysis.stats import relative_change, summarize, welch_p
from testbed.errors import InputError
from testbed.results import RUN_STATUSES, TABLES, number, read_manifest, read_table

#: Columns naming a variant besides the migration switch (a with/without pair shares them).
TWIN_KEYS = ["technique", "app", "layout", "mode", "link_rate", "compression", "concurrency"]
#: Axes a label names only when they take more than one value in a campaign (variant_label).
LABEL_WHEN_VARYING = ("mode", "concurrency")
VARIANT_KEYS = [*TWIN_KEYS[:3], "migration", *TWIN_KEYS[3:]]


@dataclass
class Campaign:
    directory: Path
    manifest: dict[str, Any]
    runs: pd.DataFrame  # every committed run, with its variant's axes
    vm_times: pd.DataFrame
    migrations: pd.DataFrame
    cpu_samples: pd.DataFrame

    @property
    def ok_runs(self) -> pd.DataFrame:
        return self.runs[self.runs["status"] == "ok"]

    def ok(self, table: pd.DataFrame) -> pd.DataFrame:
        """Rows of a table that belong to runs with status ok, with the run's variant columns (a
        column the table has itself, like migrations' measured `mode`, keeps the table's value)."""
        return table.merge(self.ok_runs[["run_id", "rep", "variant", *VARIANT_KEYS]], on="run_id",
                           suffixes=("", "_variant"))


def load(directory: str | Path) -> Campaign:
    """A results directory as typed tables; anything the contract does not allow (a cell that is
    not a number or a time, a run recorded twice, a run id that is not a file name) is an
    InputError naming the file, the column and the run, before anything is drawn or written."""
    directory = Path(directory)
    if not (directory / "runs.csv").exists():
        raise InputError(f"{directory}: not a results directory (no runs.csv)")
    manifest = read_manifest(directory)
    variants = (manifest.get("variants") or {}) if isinstance(manifest, dict) else None
    if not (isinstance(variants, dict) and all(isinstance(axes, dict) for axes in variants.values())):
        raise InputError(f"{directory / 'manifest.json'}: must be a JSON object whose variants map ids to axes")
    tables = {t: pd.DataFrame(read_table(directory, t), columns=list(cols)) for t, cols in TABLES.items()}
    columns = _Columns(directory)
    runs = _with_variants(columns.runs(tables["runs"]), variants)
    vm_times = columns.parse(tables["vm_times"], "vm_times", exec_time_s=number)
    migrations = columns.parse(tables["migrations"], "migrations", total_time_s=number, downtime_s=number,
                               bytes=number, started_at=_time)
    cpu = columns.parse(tables["cpu_samples"], "cpu_samples", t_s=number, cpu_pct=number)
    return Campaign(directory, manifest, runs, vm_times, migrations, cpu)


#: A value in these columns of runs.csv becomes part of a file name (figures are named
#: `cpu_timeline.<run_id>`, `exec_time.<technique>.<app>`): a results directory is input, and a
#: crafted `../x` would otherwise write figures outside the figure directory.
FILE_NAME_COLUMNS = ("run_id", "technique", "app")
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def _time(text: str) -> datetime:
    """An ISO 8601 time of the store, with its UTC offset (times of runs and migrations are
    subtracted from each other, which a time without one would break)."""
    when = datetime.fromisoformat(text)
    if when.tzinfo is None:
        raise ValueError("no UTC offset")
    return when


def _rep(text: str) -> int:
    rep = int(text)
    if rep < 1:
        raise ValueError("a repetition counts from 1")
    return rep


def _flag(text: str) -> bool:
    if text not in ("true", "false"):
        raise ValueError("not true or false")
    return text == "true"


def _status(text: str) -> str:
    if text not in RUN_STATUSES:
        raise ValueError(f"not one of {', '.join(RUN_STATUSES)}")
    return text


_DTYPES: dict[Callable[[str], Any], str] = {number: "float64", _rep: "int64", _flag: "bool"}


@dataclass(frozen=True)
class _Columns:
    """Parses the tables' text cells into typed columns, naming the first bad cell in one line."""

    directory: Path

    def parse(self, table: pd.DataFrame, name: str, **parsers: Callable[[str], Any]) -> pd.DataFrame:
        return table.assign(**{col: self._column(table, name, col, parse) for col, parse in parsers.items()})

    def _column(self, table: pd.DataFrame, name: str, column: str, parse: Callable[[str], Any]) -> pd.Series:
        values = pd.Series(self._values(table, name, column, parse), index=table.index, dtype=object)
        return pd.to_datetime(values, utc=True) if parse is _time else values.astype(_DTYPES.get(parse, object))

    def _values(self, table: pd.DataFrame, name: str, column: str, parse: Callable[[str], Any]) -> list[Any]:
        values = []
        for run_id, text in zip(table["run_id"], table[column], strict=True):
            try:
                values.append(parse(text))
            except (ValueError, TypeError, OverflowError) as err:
                raise InputError(f"{self.directory / name}.csv: {column}: {text!r} of run {run_id} is not valid "
                                 f"({err})") from None
        return values

    def runs(self, runs: pd.DataFrame) -> pd.DataFrame:
        path = self.directory / "runs.csv"
        for column in FILE_NAME_COLUMNS:
            for text in runs[column]:
                if not _FILE_NAME.match(text):
                    raise InputError(f"{path}: {column}: {text!r} is not a name (letters, digits, . _ + - only)")
        twice = runs["run_id"][runs["run_id"].duplicated()]
        if not twice.empty:
            raise InputError(f"{path}: run {twice.iloc[0]} is recorded twice")
        return self.parse(runs, "runs", rep=_rep, migration=_flag, started_at=_time, finished_at=_time,
                          status=_status)


def _with_variants(runs: pd.DataFrame, variants: dict[str, dict[str, Any]]) -> pd.DataFrame:
    ids = [_variant_id(r.run_id, r.technique) for r in runs.itertuples()]
    runs["variant"] = ids
    for key in ("mode", "link_rate", "compression", "concurrency"):
        runs[key] = [str(variants.get(v, {}).get(key) or "") for v in ids]
    return runs


def _variant_id(run_id: str, technique: str) -> str:
    """`qemu.synthetic1.balanced.mig.1mbit.r3` -> `synthetic1.balanced.mig.1mbit`."""
    return run_id.removeprefix(f"{technique}.").rsplit(".r", 1)[0]


def varying_axes(runs: pd.DataFrame) -> frozenset[str]:
    """The axes of LABEL_WHEN_VARYING that take more than one (non-empty) value among `runs`."""
    return frozenset(k for k in LABEL_WHEN_VARYING if k in runs and runs.loc[runs[k] != "", k].nunique() > 1)


def variant_label(row: Any, varying: frozenset[str] = frozenset()) -> str:
    """`unbalanced, migration` as the thesis names variants, plus the axes Appendix A varies, and
    the migration mode and concurrency when they vary in the campaign (`varying`, from
    varying_axes), so two variants never share a label."""
    parts = [row["layout"], "migration" if row["migration"] else "no migration"]
    if "mode" in varying and row["mode"]:
        parts.append(row["mode"])
    parts += [row[k] for k in ("link_rate",) if row[k]]
    if row["compression"] and row["compression"] != "none":
        parts.append(row["compression"])
    if "concurrency" in varying and row.get("concurrency"):
        parts.append(f"{row['concurrency']} at once")
    return ", ".join(parts)


def _per_run(c: Campaign, how: str) -> pd.DataFrame:
    """One row per ok run with its VMs' execution times reduced by `how` (mean, max)."""
    times = c.ok(c.vm_times)
    return times.groupby(["run_id", "variant", *VARIANT_KEYS], as_index=False, dropna=False)["exec_time_s"].agg(how)


def run_means(c: Campaign) -> pd.DataFrame:
    """One observation per ok run: the mean execution time over its VMs (VMs of one run are not
    independent samples, runs are)."""
    return _per_run(c, "mean")


def manager_interval_s(manifest: dict[str, Any]) -> float | None:
    """The CC's effective interval of a campaign: as recorded (`manager_times`, since issue #16),
    else its unscaled spec's `balancer.interval_s`; None when unknown (no spec, or a time-scaled
    spec whose times were not recorded: they depend on the lab's link)."""
    if "manager_times" in manifest:
        return float(manifest["manager_times"]["interval_s"])
    balancer = (manifest.get("spec") or {}).get("balancer") or {}
    if balancer.get("time_scale") is not None or "interval_s" not in balancer:
        return None
    return float(balancer["interval_s"])


def interval_table(c: Campaign, interval_s: float) -> pd.DataFrame:
    """Per variant, how many balancer rounds a run lasts: the mean over ok runs of the run's
    length (its longest VM execution time) divided by the CC's interval. The thesis' Exp. 1 ran
    ~113 s and more against 10 s rounds; a ratio near 1 leaves the balancer no time to act."""
    rows = []
    for keys, group in _per_run(c, "max").groupby(VARIANT_KEYS, dropna=False, sort=True):
        length = float(group["exec_time_s"].mean())
        rows.append({**dict(zip(VARIANT_KEYS, keys, strict=True)), "runs": len(group), "run_length_s": length,
                     "interval_s": interval_s, "run_over_interval": length / interval_s})
    return pd.DataFrame(rows, columns=[*VARIANT_KEYS, "runs", "run_length_s", "interval_s", "run_over_interval"])


def variant_table(c: Campaign) -> pd.DataFrame:
    """Mean, std and 95 % CI of the per-run mean execution time, per technique and variant."""
    rows = []
    for keys, group in run_means(c).groupby(VARIANT_KEYS, dropna=False, sort=True):
        s = summarize(group["exec_time_s"].tolist())
        rows.append({**dict(zip(VARIANT_KEYS, keys, strict=True)), "runs": s.n, "mean_s": s.mean,
                     "std_s": s.std, "ci_low_s": s.ci_low, "ci_high_s": s.ci_high,
                     "run_ids": sorted(group["run_id"])})
    return pd.DataFrame(rows, columns=[*VARIANT_KEYS, "runs", "mean_s", "std_s", "ci_low_s", "ci_high_s", "run_ids"])


def comparison_table(c: Campaign) -> pd.DataFrame:
    """Each "with migration" variant against its "no migration" twin: relative change, Welch p."""
    means = run_means(c)
    rows = []
    for keys, group in means.groupby(TWIN_KEYS, dropna=False, sort=True):
        with_mig = group.loc[group["migration"], "exec_time_s"].tolist()
        without = group.loc[~group["migration"], "exec_time_s"].tolist()
        if not with_mig or not without:
            continue
        rows.append({**dict(zip(TWIN_KEYS, keys, strict=True)), "runs_without": len(without),
                     "runs_with": len(with_mig), "mean_without_s": sum(without) / len(without),
                     "mean_with_s": sum(with_mig) / len(with_mig),
                     "change_pct": 100 * relative_change(with_mig, without), "welch_p": welch_p(with_mig, without),
                     "run_ids": sorted(group["run_id"])})
    return pd.DataFrame(rows, columns=[*TWIN_KEYS, "runs_without", "runs_with", "mean_without_s",
                                       "mean_with_s", "change_pct", "welch_p", "run_ids"])

"""A results directory as pandas tables, plus the statistics tables the report shows.

Only committed runs are read (rows whose run_id has its runs.csv row), so a directory a runner
is still writing, or one a crash cut short, reads consistently. Each run gets its variant's axes
from the manifest (run ids are `<technique>.<variant id>.r<rep>`), so Appendix A's link rate and
compression need no extra columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from testbed.analysis.stats import relative_change, summarize, welch_p
from testbed.errors import InputError
from testbed.results import TABLES, read_manifest, read_table

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
    directory = Path(directory)
    if not (directory / "runs.csv").exists():
        raise InputError(f"{directory}: not a results directory (no runs.csv)")
    manifest = read_manifest(directory)
    tables = {t: pd.DataFrame(read_table(directory, t), columns=list(cols)) for t, cols in TABLES.items()}
    runs = _with_variants(tables["runs"], manifest.get("variants", {}))
    vm_times = tables["vm_times"].astype({"exec_time_s": float})
    migrations = tables["migrations"].assign(
        total_time_s=pd.to_numeric(tables["migrations"]["total_time_s"]),
        downtime_s=pd.to_numeric(tables["migrations"]["downtime_s"]),
        bytes=pd.to_numeric(tables["migrations"]["bytes"]),
        started_at=pd.to_datetime(tables["migrations"]["started_at"], format="ISO8601"),
    )
    cpu = tables["cpu_samples"].astype({"t_s": float, "cpu_pct": float})
    return Campaign(directory, manifest, runs, vm_times, migrations, cpu)


def _with_variants(runs: pd.DataFrame, variants: dict[str, dict[str, Any]]) -> pd.DataFrame:
    runs = runs.assign(
        rep=runs["rep"].astype(int),
        migration=runs["migration"] == "true",
        started_at=pd.to_datetime(runs["started_at"], format="ISO8601"),
        finished_at=pd.to_datetime(runs["finished_at"], format="ISO8601"),
    )
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


def run_means(c: Campaign) -> pd.DataFrame:
    """One observation per ok run: the mean execution time over its VMs (VMs of one run are not
    independent samples, runs are)."""
    times = c.ok(c.vm_times)
    return times.groupby(["run_id", "variant", *VARIANT_KEYS], as_index=False, dropna=False)["exec_time_s"].mean()


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

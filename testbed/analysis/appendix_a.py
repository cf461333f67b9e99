"""Thesis Table A.1 from a migration study's results: the mean of each migration phase per
technique, mode, app, link rate and compression, with total time, downtime and the megabytes moved.

migrations.csv holds a migration's total time, downtime and bytes; its phases are in the record
the study keeps in DIR/runs/<run_id>.json under `migration` (testbed/runner/migration_study.py),
so the table reads both from there, for the ok runs only. Phase names are the drivers' own, the
`_s` suffix dropped: containers suspend, dump, copy, undump, resume (downtime is their sum);
QEMU prepare (before the migration starts: the destination's QEMU), transfer, resume.

The migration's CPU overhead (the thesis' conclusions, ch. 6, found it insignificant) is read from the CPU the
study samples on every PM all along (cpu_samples.csv): the CPU-seconds the source and the
destination PM used above their own rate just before the migration, over the samples that overlap
it. Each PM's total counts: the containers' dump agent and QEMU's migration thread run in the
PM's cgroup. The figure is net of the app: a stop-and-copy freezes the app, whose CPU then stops
(a busy server's row can read below zero), and on a PM saturated before the migration (a compiling
VM) the migration can only displace the app's CPU, not add to it: the idle VM's row is the clean
measure.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from testbed.analysis.data import Campaign
from testbed.lab import parse_rate

#: Phases in the order they happen (App. A's for containers, then QEMU's).
PHASE_ORDER = ("suspend", "dump", "copy", "undump", "prepare", "transfer", "resume")
KEYS = ["technique", "mode", "app", "link_rate", "compression"]
#: Seconds of CPU samples just before a migration that give a PM's rate without it.
BASELINE_S = 10.0
OVERHEAD_CAPTION = ("Migration CPU overhead: the CPU-seconds each PM used above its rate of the "
                    f"{BASELINE_S:.0f} s before the migration, over the CPU samples that overlap the migration; "
                    "mean and sample standard deviation over the ok runs of each variant, and the source's rate "
                    "before the migration (% of one core). Net of the app: a frozen app's CPU stops (a busy "
                    "server's row can read below zero), and on a saturated PM the migration can only "
                    "displace the app's CPU; the idle VM's rows are the clean measure.")
CAPTION = ("Mean of each migration phase (s) over the ok runs of each variant (thesis Table A.1), with "
           "the mean total time and downtime, the memory the technique moved (container: its dump; QEMU: "
           "the RAM it sent) and the megabytes on the wire (after compression).")


def migration_records(c: Campaign) -> pd.DataFrame:
    """One row per completed migration of an ok run: its variant, phases and volumes."""
    rows = []
    for run in c.ok_runs.itertuples():
        path = c.directory / "runs" / f"{run.run_id}.json"
        record = json.loads(path.read_text(encoding="utf-8")).get("migration") if path.exists() else None
        if not record or record.get("status") != "completed":
            continue
        rows.append({"run_id": run.run_id, **{k: getattr(run, k) for k in KEYS}, **_measures(record)})
    return pd.DataFrame(rows)


def _measures(record: dict[str, Any]) -> dict[str, Any]:
    details = record.get("details") or {}
    phases = {name.removesuffix("_s"): seconds for name, seconds in (record.get("phases") or {}).items()}
    moved = details.get("dump_bytes") or record["bytes"]
    wire = details.get("wire_bytes") or record["bytes"]
    return {"mode": record["mode"], **{f"{name}_s": seconds for name, seconds in phases.items()},
            "total_time_s": record["total_time_s"], "downtime_s": record["downtime_s"],
            "memory_mb": details.get("memory_mb"), "moved_mb": moved / 2**20, "wire_mb": wire / 2**20}


def phase_table(c: Campaign) -> pd.DataFrame:
    """Table A.1: per variant, the number of runs and the mean of every measure (empty when the
    campaign kept no migration records, e.g. a balancing campaign)."""
    records = migration_records(c)
    if records.empty:
        return records
    phases = sorted({col.removesuffix("_s") for col in records if col.endswith("_s")} - {"total_time", "downtime"},
                    key=lambda p: (PHASE_ORDER.index(p) if p in PHASE_ORDER else len(PHASE_ORDER), p))
    measures = [*(f"{p}_s" for p in phases), "total_time_s", "downtime_s", "memory_mb", "moved_mb", "wire_mb"]
    table = records.groupby(KEYS, as_index=False).agg(runs=("run_id", "count"),
                                                      **{m: (m, "mean") for m in measures})
    return _in_order(table)


def phase_figure(c: Campaign) -> tuple[Figure, list[str]] | None:
    """Table A.1 drawn: one stacked bar of mean phase times per variant, a panel per technique
    (None when there is nothing to draw). Returns the figure and the runs it was drawn from."""
    table = phase_table(c)
    if table.empty:
        return None
    techniques = sorted(table["technique"].unique())
    fig = Figure(figsize=(10, 3.2 * len(techniques) + 0.6), layout="constrained")
    axes = fig.subplots(len(techniques), 1, squeeze=False)[:, 0]
    colours = {p: f"C{k}" for k, p in enumerate(PHASE_ORDER)}
    for ax, technique in zip(axes, techniques, strict=True):
        rows = table[table["technique"] == technique].reset_index(drop=True)
        labels = [", ".join(v for v in (r.app, r.link_rate, r.compression) if v) for r in rows.itertuples()]
        bottom = np.zeros(len(rows))
        for phase in (p for p in PHASE_ORDER if f"{p}_s" in rows and rows[f"{p}_s"].notna().any()):
            values = rows[f"{phase}_s"].fillna(0).to_numpy()
            ax.bar(np.arange(len(rows)), values, bottom=bottom, color=colours[phase], label=phase)
            bottom += values
        ax.set_xticks(np.arange(len(rows)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("seconds")
        ax.set_title(f"{technique} ({', '.join(sorted(rows['mode'].unique()))})", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, title="phase")
    return fig, migration_records(c)["run_id"].tolist()


def overhead_records(c: Campaign) -> pd.DataFrame:
    """One row per completed migration of an ok run: the CPU-seconds its source and its destination
    PM used above their rate before it (BASELINE_S), and the source's rate before it."""
    moves = c.ok(c.migrations)
    moves = moves[moves["status"] == "completed"].merge(
        c.runs[["run_id", "started_at"]].rename(columns={"started_at": "run_started_at"}), on="run_id")
    pms = c.cpu_samples[c.cpu_samples["vm"].fillna("") == ""]
    rows = []
    for move in moves.itertuples():
        start = (move.started_at - move.run_started_at).total_seconds()
        window = (start, start + move.total_time_s)
        samples = pms[pms["run_id"] == move.run_id]
        source = _excess(samples[samples["host"] == move.source], *window)
        destination = _excess(samples[samples["host"] == move.destination], *window)
        if source is None or destination is None:
            continue
        rows.append({"run_id": move.run_id, **{k: getattr(move, k) for k in KEYS},
                     "total_time_s": move.total_time_s, "source_before_pct": source[1],
                     "source_cpu_s": source[0], "destination_cpu_s": destination[0]})
    return pd.DataFrame(rows)


def _excess(samples: pd.DataFrame, start: float, end: float) -> tuple[float, float] | None:
    """(CPU-seconds above the rate before `start`, that rate in %) of one PM's samples, each
    covering the time to the next; None without samples on both sides of `start`."""
    samples = samples.sort_values("t_s")
    t = samples["t_s"].to_numpy()
    pct = samples["cpu_pct"].to_numpy()
    if len(t) < 3:
        return None
    gaps = np.diff(t)
    dt = np.append(gaps, np.median(gaps))  # the last sample covers a typical period
    before = (t + dt <= start) & (t >= start - BASELINE_S)
    during = (t < end) & (t + dt > start)
    if not before.any() or not during.any():
        return None
    rate = float(pct[before].mean())
    return float(((pct[during] - rate) / 100 * dt[during]).sum()), rate


def overhead_table(c: Campaign) -> pd.DataFrame:
    """The migration CPU overhead per variant: runs, mean and sd of each PM's CPU-seconds, the
    source's rate before (empty without completed migrations and their PMs' samples)."""
    records = overhead_records(c)
    if records.empty:
        return records
    table = records.groupby(KEYS, as_index=False).agg(
        runs=("run_id", "count"), total_time_s=("total_time_s", "mean"),
        source_before_pct=("source_before_pct", "mean"),
        source_cpu_s=("source_cpu_s", "mean"), source_cpu_s_sd=("source_cpu_s", "std"),
        destination_cpu_s=("destination_cpu_s", "mean"), destination_cpu_s_sd=("destination_cpu_s", "std"))
    return _in_order(table)


def _in_order(table: pd.DataFrame) -> pd.DataFrame:
    """A per-variant table by technique, app, link rate (slowest first; the lab's own rate last)
    and compression."""
    rates = [parse_rate(r) if r else np.inf for r in table["link_rate"]]
    return table.assign(rate_bps=rates).sort_values(["technique", "app", "rate_bps", "compression"]) \
        .drop(columns="rate_bps").reset_index(drop=True)

"""Thesis Table A.1 from a migration study's results: the mean of each migration phase per
technique, mode, app, link rate and compression, with total time, downtime and the megabytes moved.

migrations.csv holds a migration's total time, downtime and bytes; its phases are in the record
the study keeps in DIR/runs/<run_id>.json under `migration` (testbed/runner/migration_study.py),
so the table reads both from there, for the ok runs only. Phase names are the drivers' own, the
`_s` suffix dropped: containers suspend, dump, copy, undump, resume (downtime is their sum);
QEMU prepare (before the migration starts: the destination's QEMU), transfer, resume.
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
    table["rate_bps"] = [parse_rate(r) if r else np.inf for r in table["link_rate"]]
    return table.sort_values(["technique", "app", "rate_bps", "compression"]).drop(columns="rate_bps") \
        .reset_index(drop=True)


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

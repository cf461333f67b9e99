"""Fit the simulator's parameters (testbed/sim/calibration.py) from a real campaign's results.

What is fitted, from which rows (each fit records its inputs under `fitted`):
* migration effective rate and fixed cost, per mode: total_time_s = fixed + bytes / (eff x link),
  a least-squares line over completed migrations with x = bytes / nominal link rate (the run's
  link rate variant, else the lab's). With one VM size at one link rate the two are not
  separable: eff keeps its default and fixed = mean(total - x / eff).
* per-round behaviour: pre-copy's dirty rate is the one at which the model's rounds (Clark et
  al.: V (1 - lambda^(n+1)) / (1 - lambda) bytes) send what each migration sent, found by
  bisection; its stop = downtime minus the model's last round (medians over migrations).
  Stop-and-copy: stop = fixed, and the dump fraction = median(bytes) / V.
* CPU work per Synthetic1 block: per VM of a no-migration Synthetic1 run, the integral of its
  CPU samples (percent of its PM x capacity x sample interval) / (instances x blocks).
* migration CPU overhead: per migration, the PM's total CPU minus its VMs' (the machinery's
  share) inside the migration's window, minus the same outside any window, on source and
  destination.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from testbed.analysis.data import Campaign, load
from testbed.errors import InputError
from testbed.lab import parse_rate
from testbed.sim.calibration import Calibration, ModeCosts
from testbed.sim.migration import plan
from testbed.sim.workloads import SYNTHETIC1_BLOCKS

DEFAULT_LINK = "100mbit"


def calibrate(
    directory: str | Path, base: Calibration | None = None, capacity: float | None = None
) -> Calibration:
    """A calibration fitted from DIR's rows, starting from `base` (the defaults) for what DIR lacks."""
    c = load(directory)
    if c.ok_runs.empty:
        raise InputError(f"{directory}: no run with status ok to calibrate from")
    base = base or Calibration()
    spec = c.manifest.get("spec", {})
    capacity = capacity or float(c.manifest.get("lab", {}).get("capacity", 0.6))
    fitted: dict[str, Any] = {}
    changes: dict[str, Any] = {"source": str(directory), "fitted": fitted}
    techniques = sorted(set(c.ok_runs["technique"]))
    changes["mimics"] = techniques[0] if techniques and techniques[0] != "sim" else base.mimics
    work = _cpu_per_block(c, spec, capacity)
    if work is not None:
        changes["cpu_s_per_block"], fitted["cpu_s_per_block"] = work
    moves = _migrations(c)
    memory = float(spec.get("memory_mb", 100)) * 1e6
    modes = dict(base.modes)
    efficiency = base.link_efficiency
    for mode, rows in moves.groupby("mode"):
        if mode not in modes or rows.empty:
            continue
        eff, fixed, how = _line_fit(rows, efficiency)
        efficiency = eff
        if mode == "stopcopy":
            stop = fixed
            changes["dump_fraction"] = float(np.clip(rows["bytes"].median() / memory, 1e-6, 1.0))
        elif mode == "precopy":
            model = base.model_copy(
                update={"modes": modes | {mode: ModeCosts(fixed_s=fixed, stop_fixed_s=0.0)}}
            )
            dirty, stop, how["per_round"] = _precopy_rounds(rows, memory, eff, model)
            if dirty is not None:
                apps = sorted(set(c.ok(rows[["run_id"]])["app"]))
                changes["dirty_mb_s"] = base.dirty_mb_s | {app: dirty / 1e6 for app in apps}
        else:
            stop = (
                float(rows["downtime_s"].dropna().median())
                if rows["downtime_s"].notna().any()
                else modes[mode].stop_fixed_s
            )
        stop = float(np.clip(stop, 0.0, fixed))
        modes[mode] = ModeCosts(fixed_s=fixed, stop_fixed_s=stop)
        fitted[f"migration.{mode}"] = how | {"stop_fixed_s": stop}
    changes["modes"] = modes
    changes["link_efficiency"] = efficiency
    overhead = _cpu_overhead(c, moves, capacity)
    if overhead is not None:
        changes["cpu_overhead_src"], changes["cpu_overhead_dst"] = overhead["src"], overhead["dst"]
        fitted["cpu_overhead"] = overhead
    return Calibration.model_validate(base.model_dump() | changes)


def _migrations(c: Campaign) -> pd.DataFrame:
    """Completed migrations of ok runs with their nominal link rate (bytes/s)."""
    moves = c.ok(c.migrations)
    moves = moves[(moves["status"] == "completed") & moves["total_time_s"].notna()]
    lab_rate = str(c.manifest.get("lab", {}).get("link_rate") or DEFAULT_LINK)
    return moves.assign(link_bytes_s=[parse_rate(r or lab_rate) / 8.0 for r in moves["link_rate"]])


def _precopy_rounds(
    rows: pd.DataFrame, memory: float, efficiency: float, model: Calibration
) -> tuple[float | None, float, dict[str, Any]]:
    """(dirty bytes/s, stop seconds, how): per migration, the dirty rate at which the model's rounds
    send the bytes it sent (bisection: bytes grow with the dirty rate), then its stop = downtime
    minus the model's last round; medians over migrations."""
    dirties, stops = [], []
    for row in rows.itertuples():
        rate = efficiency * row.link_bytes_s

        def sent(dirty: float, rate: float = rate) -> float:
            return plan("precopy", memory, dirty, rate, model).bytes

        if row.bytes <= sent(0.0):
            dirty = 0.0
        elif row.bytes >= sent(rate):
            dirty = rate  # never converged: the round cap decided
        else:
            lo, hi = 0.0, rate
            for _ in range(80):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if sent(mid) < row.bytes else (lo, mid)
            dirty = (lo + hi) / 2
        dirties.append(dirty)
        if not np.isnan(row.downtime_s):
            stops.append(row.downtime_s - plan("precopy", memory, dirty, rate, model).downtime_s)
    dirty = float(np.median(dirties)) if dirties else None
    stop = float(np.median(stops)) if stops else model.modes["precopy"].stop_fixed_s
    return dirty, stop, {"migrations": len(dirties), "dirty_mb_s": None if dirty is None else dirty / 1e6}


def _line_fit(rows: pd.DataFrame, efficiency: float) -> tuple[float, float, dict[str, Any]]:
    """(efficiency, fixed seconds, how) from total = fixed + (bytes / link) / efficiency."""
    x = (rows["bytes"] / rows["link_bytes_s"]).to_numpy(float)
    y = rows["total_time_s"].to_numpy(float)
    how: dict[str, Any] = {"rows": len(rows)}
    if len(rows) >= 2 and np.ptp(x) > 1e-6 * max(float(x.mean()), 1e-12):
        slope, intercept = np.polyfit(x, y, 1)
        if slope >= 1.0 and intercept >= 0:
            residual = y - (intercept + slope * x)
            return (
                1.0 / slope,
                float(intercept),
                how | {"fit": "line", "rms_residual_s": float(np.sqrt(np.mean(residual**2)))},
            )
        how["line_rejected"] = {"slope": float(slope), "intercept": float(intercept)}
    fixed = max(float(np.mean(y - x / efficiency)), 0.0)
    return efficiency, fixed, how | {"fit": "fixed only (one size and rate: efficiency kept)"}


def _cpu_per_block(c: Campaign, spec: dict[str, Any], capacity: float) -> tuple[float, dict[str, Any]] | None:
    runs = c.ok_runs[(c.ok_runs["app"] == "synthetic1") & ~c.ok_runs["migration"]]
    if runs.empty:
        return None
    blocks = max(1, round(SYNTHETIC1_BLOCKS * float(spec.get("scale", 1.0)))) * int(spec.get("instances", 1))
    per_vm = []
    samples = c.cpu_samples[c.cpu_samples["run_id"].isin(runs["run_id"]) & (c.cpu_samples["vm"] != "")]
    for run in runs.itertuples():
        mine = samples[samples["run_id"] == run.run_id]
        if mine.empty:
            continue
        duration = (run.finished_at - run.started_at).total_seconds()
        times = np.sort(mine["t_s"].unique())
        width = dict(zip(times, np.diff(np.append(times, max(duration, times[-1]))), strict=True))
        used = (mine["cpu_pct"] / 100 * capacity * mine["t_s"].map(width)).groupby(mine["vm"]).sum()
        per_vm += list(used / blocks)
    if not per_vm:
        return None
    value = float(np.median(per_vm))
    return value, {
        "vms": len(per_vm),
        "median": value,
        "iqr": [float(np.percentile(per_vm, 25)), float(np.percentile(per_vm, 75))],
    }


def _cpu_overhead(c: Campaign, moves: pd.DataFrame, capacity: float) -> dict[str, Any] | None:
    """Machinery CPU (PM total minus its VMs) inside migration windows minus outside, in CPUs."""
    if moves.empty or c.cpu_samples.empty:
        return None
    samples = c.cpu_samples
    hosts = samples[samples["vm"] == ""].set_index(["run_id", "t_s", "host"])["cpu_pct"]
    vms = samples[samples["vm"] != ""].groupby(["run_id", "t_s", "host"])["cpu_pct"].sum()
    machinery = (hosts - vms.reindex(hosts.index, fill_value=0.0)).rename("rest").reset_index()
    starts = c.runs.set_index("run_id")["started_at"]
    machinery["role"] = ""
    for m in moves.itertuples():
        t0 = (m.started_at - starts[m.run_id]).total_seconds()
        inside = (machinery["run_id"] == m.run_id) & machinery["t_s"].between(t0 - 1e-6, t0 + m.total_time_s)
        machinery.loc[inside & (machinery["host"] == m.source), "role"] = "src"
        machinery.loc[inside & (machinery["host"] == m.destination), "role"] = "dst"
    base = machinery.loc[machinery["role"] == "", "rest"].mean()
    out: dict[str, Any] = {}
    for role in ("src", "dst"):
        rows = machinery.loc[machinery["role"] == role, "rest"]
        if rows.empty or np.isnan(base):
            return None
        out[role] = max(float(rows.mean() - base), 0.0) / 100 * capacity
        out[f"{role}_samples"] = len(rows)
    return out

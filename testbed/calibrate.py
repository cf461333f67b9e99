"""Fit the simulator's parameters (testbed/sim/calibration.py) from a real campaign's results.

What is fitted, from which rows (each fit records its inputs under `fitted`):
* migration effective rate and fixed cost, per mode: total_time_s = fixed + bytes / (eff x link),
  a least-squares line over completed migrations with x = bytes / nominal link rate (the run's
  link rate variant, else the lab's). With one VM size at one link rate the two are not
  separable: eff keeps its default and fixed = mean(total - x / eff).
* per-round behaviour: pre-copy's dirty rate is the one at which the model's rounds (Clark et
  al.: V (1 - lambda^(n+1)) / (1 - lambda) bytes) send what each migration sent, found by
  bisection; its stop = downtime minus the model's last round (medians over migrations).
  Stop-and-copy: stop = fixed; stop-and-copy and post-copy give the memory fraction =
  median(bytes) / V; a pre-copy-only campaign fits it from the downtime (see _precopy_rounds).
* CPU work per Synthetic1 block and contention: per VM of a no-migration Synthetic1 run, the
  integral of its CPU samples while it ran (percent of its PM x capacity x sample interval) and
  its mean share; the contention that makes crowded and lone VMs agree on the work per block
  (see _cpu_per_block and the engine's CPU model).
* migration CPU overhead: per migration, the PM's total CPU minus its VMs' (the machinery's
  share) inside the migration's window, minus the same outside any window, on source and
  destination.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import ValidationError

from testbed.analysis.data import Campaign, load
from testbed.errors import InputError, describe_validation_error
from testbed.lab import parse_rate
from testbed.sim.calibration import Calibration, ModeCosts
from testbed.sim.migration import plan
from testbed.sim.workloads import SYNTHETIC1_BLOCKS
from testbed.techniques import SIMULATOR

DEFAULT_LINK = "100mbit"


def calibrate(
    directories: str | Path | Sequence[str | Path],
    base: Calibration | None = None,
    capacity: float | None = None,
) -> Calibration:
    """A calibration fitted from the rows of one or more campaigns (pooled: e.g. Exp. 1 for the CPU
    work, Exp. 1 and 2 for migrations and each app's dirty rate), starting from `base` (the
    defaults) for what they lack."""
    dirs = [Path(directories)] if isinstance(directories, str | Path) else [Path(d) for d in directories]
    campaigns = []
    for directory in dirs:
        c = load(directory)
        if c.ok_runs.empty:
            raise InputError(f"{directory}: no run with status ok to calibrate from")
        campaigns.append(c)
    base = base or Calibration()
    caps = [_checked_capacity(capacity, "--capacity") if capacity is not None
            else _checked_capacity(_capacity(c), f"{c.directory / 'manifest.json'}: lab capacity") for c in campaigns]
    fitted: dict[str, Any] = {}
    changes: dict[str, Any] = {
        "source": ", ".join(str(d) for d in dirs),
        "sources": [str(d.resolve()) for d in dirs],
        "fitted": fitted,
    }
    techniques = sorted({t for c in campaigns for t in c.ok_runs["technique"]} - {SIMULATOR})
    changes["mimics"] = techniques[0] if techniques else base.mimics
    work = _cpu_per_block(campaigns, caps)
    if work is not None:
        changes["cpu_s_per_block"], changes["contention_cpus"], fitted["cpu_s_per_block"] = work
    moves = pd.concat([_migrations(c) for c in campaigns], ignore_index=True)
    modes = dict(base.modes)
    efficiency = base.link_efficiency
    fraction: float | None = None
    # modes that send each page once first: they give the memory fraction pre-copy then uses
    for mode, rows in sorted(moves.groupby("mode"), key=lambda item: item[0] == "precopy"):
        if mode not in modes or rows.empty:
            continue
        eff, fixed, how = _line_fit(rows, efficiency)
        efficiency = eff
        if mode == "precopy":
            stop0 = base.modes[mode].stop_fixed_s
            model = base.model_copy(
                update={"modes": modes | {mode: ModeCosts(fixed_s=max(fixed, stop0), stop_fixed_s=stop0)}}
            )
            dirty, stop, fraction, how["per_round"] = _precopy_rounds(rows, eff, model, fraction)
            changes["dirty_mb_s"] = base.dirty_mb_s | {app: d / 1e6 for app, d in dirty.items()}
        else:
            fraction = float(np.clip((rows["bytes"] / rows["memory"]).median(), 1e-6, 1.0))
            if mode == "stopcopy":
                stop = fixed
            else:
                stop = (
                    float(rows["downtime_s"].dropna().median())
                    if rows["downtime_s"].notna().any()
                    else modes[mode].stop_fixed_s
                )
        stop = float(np.clip(stop, 0.0, fixed))
        modes[mode] = ModeCosts(fixed_s=fixed, stop_fixed_s=stop)
        fitted[f"migration.{mode}"] = how | {"stop_fixed_s": stop}
    if fraction is not None:
        changes["memory_fraction"] = fraction
    changes["modes"] = modes
    changes["link_efficiency"] = efficiency
    overheads = [
        o for c, cap in zip(campaigns, caps, strict=True) if (o := _cpu_overhead(c, _migrations(c), cap))
    ]
    if overheads:
        weights = {role: [o[f"{role}_samples"] for o in overheads] for role in ("src", "dst")}
        for role in ("src", "dst"):
            changes[f"cpu_overhead_{role}"] = float(
                np.average([o[role] for o in overheads], weights=weights[role])
            )
        fitted["cpu_overhead"] = {"per_campaign": overheads}
    try:
        return Calibration.model_validate(base.model_dump() | changes)
    except ValidationError as err:  # e.g. every execution time nan: nothing finite to fit from
        raise InputError(describe_validation_error(err, f"calibration from {changes['source']}")
                         + " (too few finite measurements to fit it)") from None


def _checked_capacity(capacity: float, what: str) -> float:
    """A PM's CPUs scale every CPU integral: zero, negative or non-finite would fit nonsense."""
    if not (math.isfinite(capacity) and capacity > 0):
        raise InputError(f"{what}: CPUs of each PM must be a finite number > 0, not {capacity:g}")
    return capacity


def _capacity(c: Campaign) -> float:
    """CPUs per PM of the campaign's lab (its manifest's PM hosts), else the embedded lab's 0.6."""
    lab = c.manifest.get("lab", {})
    pms = [h.get("capacity") for h in lab.get("hosts", []) if h.get("role") == "pm" and h.get("capacity")]
    return float(pms[0]) if pms else float(lab.get("capacity", 0.6))


def _migrations(c: Campaign) -> pd.DataFrame:
    """Completed migrations of ok runs with their nominal link rate (bytes/s) and VM memory (bytes)."""
    moves = c.ok(c.migrations)
    moves = moves[(moves["status"] == "completed") & moves["total_time_s"].notna()]
    lab_rate = str(c.manifest.get("lab", {}).get("link_rate") or DEFAULT_LINK)
    memory = float(c.manifest.get("spec", {}).get("memory_mb", 100)) * 1e6
    return moves.assign(
        link_bytes_s=[parse_rate(r or lab_rate) / 8.0 for r in moves["link_rate"]],
        memory=memory,
    )


def _precopy_rounds(
    rows: pd.DataFrame, efficiency: float, model: Calibration, fraction: float | None
) -> tuple[dict[str, float], float, float, dict[str, Any]]:
    """({app: dirty bytes/s}, stop seconds, memory fraction, how), medians over migrations.

    With the memory fraction known (another mode of the campaigns sent each page once): per
    migration, the dirty rate at which the model's rounds send the bytes it sent, then its stop =
    downtime minus the model's last round. Without it, bytes alone cannot tell zero pages QEMU
    skipped from pages dirtied twice, so the downtime decides: the stop keeps its measured default
    (the device state, DESIGN.md) and the fraction is the one at which the model, with the dirty
    rate that sends the bytes measured, stops the VM as long as it was stopped."""
    dirties: dict[str, list[float]] = {}
    stops, fractions = [], []
    stop0 = model.modes["precopy"].stop_fixed_s
    for row in rows.itertuples():
        rate = efficiency * row.link_bytes_s
        if fraction is not None:
            dirty = _dirty_for_bytes(row.bytes, row.memory, fraction, rate, model)
            if not np.isnan(row.downtime_s):
                final = plan(
                    "precopy", row.memory, dirty, rate, model.model_copy(update={"memory_fraction": fraction})
                )
                stops.append(row.downtime_s - (final.downtime_s - stop0))
        else:
            f = _fraction_for_downtime(row, rate, model)
            fractions.append(f)
            dirty = _dirty_for_bytes(row.bytes, row.memory, f, rate, model)
        dirties.setdefault(row.app, []).append(dirty)
    if fraction is None:
        fraction = float(np.median(fractions)) if fractions else model.memory_fraction
    dirty = {app: float(np.median(values)) for app, values in dirties.items()}
    stop = float(np.median(stops)) if stops else stop0
    return (
        dirty,
        stop,
        fraction,
        {
            "migrations": len(rows),
            "dirty_mb_s": {app: d / 1e6 for app, d in dirty.items()},
            "memory_fraction": fraction,
            "memory_fraction_from": "downtime (stop kept)" if fractions else "another mode",
        },
    )


def _fraction_for_downtime(row: Any, rate: float, model: Calibration) -> float:
    """The memory fraction at which the model, dirtying just enough to send the bytes measured,
    stops the VM as long as the migration did (bisection: a smaller fraction needs more dirtying,
    so a longer last round)."""
    top = float(np.clip(row.bytes / row.memory, 1e-6, 1.0))
    if np.isnan(row.downtime_s) or row.downtime_s <= model.modes["precopy"].stop_fixed_s:
        return top
    lo, hi = 1e-3 * top, top
    for _ in range(60):
        mid = (lo + hi) / 2
        dirty = _dirty_for_bytes(row.bytes, row.memory, mid, rate, model)
        down = plan(
            "precopy", row.memory, dirty, rate, model.model_copy(update={"memory_fraction": mid})
        ).downtime_s
        lo, hi = (mid, hi) if down > row.downtime_s else (lo, mid)
    return (lo + hi) / 2


def _dirty_for_bytes(
    sent_bytes: float, memory: float, fraction: float, rate: float, model: Calibration
) -> float:
    """The dirty rate at which the model's pre-copy rounds send `sent_bytes` (bisection: bytes grow
    with the dirty rate); 0 when even no dirtying sends more, the link rate when the cap decides."""
    model = model.model_copy(update={"memory_fraction": fraction})

    def sent(dirty: float) -> float:
        return plan("precopy", memory, dirty, rate, model).bytes

    if sent_bytes <= sent(0.0):
        return 0.0
    if sent_bytes >= sent(rate):
        return rate
    lo, hi = 0.0, rate
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sent(mid) < sent_bytes else (lo, mid)
    return (lo + hi) / 2


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


def _cpu_per_block(
    campaigns: Sequence[Campaign], caps: Sequence[float]
) -> tuple[float, float, dict[str, Any]] | None:
    """(CPU-seconds per block, contention in CPUs, how) from no-migration Synthetic1 runs.

    Per VM: the CPU it used while its workload ran (its samples up to its execution time T) and
    its mean share s = used / T. The engine's model does W x blocks of work with a share s at
    s x s / (s + c) CPUs, so W x blocks = used x s / (s + c) for every VM, crowded or alone: c is
    the one that makes those estimates of W agree best (least coefficient of variation), W their
    median. With every VM equally crowded, c cannot be seen: c = 0."""
    from scipy.optimize import minimize_scalar

    points = [p for c, cap in zip(campaigns, caps, strict=True) for p in _cpu_points(c, cap)]
    if not points:
        return None
    blocks, busy, used = (np.asarray(column, dtype=float) for column in zip(*points, strict=True))
    share = used / busy
    how: dict[str, Any] = {
        "vms": len(points),
        "blocks_per_vm": sorted({int(b) for b in blocks}),
        "share_cpus_range": [float(share.min()), float(share.max())],
    }

    def work(c: float) -> np.ndarray:
        return used * share / (share + c) / blocks

    def spread(c: float) -> float:
        w = work(c)
        return float(np.std(w) / np.mean(w))

    contention = 0.0
    if len(points) >= 3 and np.ptp(share) > 0.2 * share.mean():
        best = minimize_scalar(spread, bounds=(0.0, 10 * float(share.max())), method="bounded")
        contention = float(best.x) if spread(float(best.x)) < spread(0.0) else 0.0
        how["fit"] = "contention: least spread of the VMs' work estimates"
    else:
        how["fit"] = "one crowding level: contention 0"
    how |= {"spread_pct": 100 * spread(contention), "spread_without_contention_pct": 100 * spread(0.0)}
    return float(np.median(work(contention))), contention, how


def _cpu_points(c: Campaign, capacity: float) -> list[tuple[int, float, float]]:
    """(blocks, execution time, CPU-seconds used while it ran) per VM of no-migration Synthetic1 runs."""
    runs = c.ok_runs[(c.ok_runs["app"] == "synthetic1") & ~c.ok_runs["migration"]]
    spec = c.manifest.get("spec", {})

    def blocks_of(vm: str) -> int:
        """The VM's Synthetic1 blocks: the spec's scale and instances, or its own (`per_vm`)."""
        own = (spec.get("per_vm") or {}).get(vm) or {}
        scale = float(spec.get("scale", 1.0)) * float(own.get("work") or 1.0)
        return max(1, round(SYNTHETIC1_BLOCKS * scale)) * int(own.get("instances") or spec.get("instances", 1))

    samples = c.cpu_samples[c.cpu_samples["run_id"].isin(runs["run_id"]) & (c.cpu_samples["vm"] != "")]
    times = c.vm_times.set_index(["run_id", "vm"])["exec_time_s"]
    points = []
    for (run_id, vm), mine in samples.groupby(["run_id", "vm"]):
        if (run_id, vm) not in times.index:
            continue
        t_exec = float(times[(run_id, vm)])
        t = np.sort(mine["t_s"].unique())
        # a sample is the mean over the window up to the next one: the window holding the end
        # counts whole (the VM idles in its rest, at a negligible ~1 %)
        width = pd.Series(np.diff(np.append(t, max(t_exec, t[-1]))), index=t)
        mine = mine[mine["t_s"] < t_exec]
        points.append(
            (blocks_of(vm), t_exec, float((mine["cpu_pct"] / 100 * capacity * mine["t_s"].map(width)).sum()))
        )
    return points


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

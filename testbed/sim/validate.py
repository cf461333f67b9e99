"""Validation: the simulator against the lab on the same experiment (thesis Exp. 1 and 2).

Per variant (app, layout, migration; of the lab technique the calibration mimics), the mean
over runs of the per-run mean execution time, lab and simulator side by side, and their
relative difference; the simulator is trusted at scale only when every variant is within the
bound (10 %). Beside them, how much of their quota the lab's saturated PMs got (saturated_use): a
lab run whose machine could not serve its PMs is slower for a reason no calibration should absorb.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from testbed.analysis.data import Campaign, load, variant_table
from testbed.errors import InputError

KEYS = ["app", "layout", "migration"]


def compare(real_dir: str | Path, sim_dir: str | Path, bound_pct: float = 10.0) -> pd.DataFrame:
    real, sim = load(real_dir), load(sim_dir)
    if not sim.manifest.get("simulated"):
        raise InputError(f"{sim_dir}: not a simulated campaign (its manifest has no `simulated: true`)")
    if real.manifest.get("simulated"):
        raise InputError(f"{real_dir}: is itself simulated; validation needs a lab campaign")
    mimics = sim.manifest.get("calibration_values", {}).get("mimics")
    lab = variant_table(real)
    if mimics in set(lab["technique"]):  # a lab campaign of several techniques: the one calibrated
        lab = lab[lab["technique"] == mimics]
    r = lab.groupby(KEYS, as_index=False).agg(lab_s=("mean_s", "mean"), lab_runs=("runs", "sum"))
    s = (
        variant_table(sim)
        .groupby(KEYS, as_index=False)
        .agg(sim_s=("mean_s", "mean"), sim_runs=("runs", "sum"))
    )
    table = r.merge(s, on=KEYS, how="inner")
    if table.empty:
        raise InputError(f"{real_dir} and {sim_dir} share no variant")
    table = table.merge(saturated_use(real), on=KEYS, how="left")
    table["diff_pct"] = 100 * (table["sim_s"] - table["lab_s"]) / table["lab_s"]
    table["within"] = table["diff_pct"].abs() <= bound_pct
    return table


def saturated_use(c: Campaign) -> pd.DataFrame:
    """Per variant, the mean CPU % of the lab's saturated PMs: samples of a PM whose busy VMs (above
    5 % each) are capped at a total of at least its capacity (busy x vcpus / cores >= 1). A PM's
    quota is a cap, not a guarantee: below ~95 % the machine's cores could not serve it (other load
    on the machine), which the simulator, always serving the quota, cannot reproduce."""
    spec = c.manifest.get("spec", {})
    cores = [h.get("cores") for h in c.manifest.get("lab", {}).get("hosts", []) if h.get("role") == "pm"]
    per_vm = float(spec.get("vcpus", 2)) / float((cores[0] if cores else None) or 4)
    samples = c.ok(c.cpu_samples)
    busy = samples[(samples["vm"] != "") & (samples["cpu_pct"] > 5)].groupby(["run_id", "t_s", "host"]).size()
    totals = samples[samples["vm"] == ""].set_index(["run_id", "t_s", "host"])
    saturated = totals[busy.reindex(totals.index, fill_value=0).to_numpy() * per_vm >= 1 - 1e-9]
    if saturated.empty:
        return pd.DataFrame(columns=[*KEYS, "lab_saturated_pct"])
    return saturated.groupby(KEYS, as_index=False).agg(lab_saturated_pct=("cpu_pct", "mean"))


def render(table: pd.DataFrame, bound_pct: float) -> str:
    lines = [
        f"lab vs SIMULATED, per variant (bound ±{bound_pct:g} %)",
        f"{'variant':<40} {'lab s':>9} {'sim s':>9} {'diff %':>8}  ok   saturated lab PMs used",
    ]
    for row in table.itertuples():
        name = f"{row.app}, {row.layout}, {'migration' if row.migration else 'no migration'}"
        lines.append(
            f"{name:<40} {row.lab_s:9.1f} {row.sim_s:9.1f} {row.diff_pct:8.1f}  {'yes' if row.within else 'NO ':<3}  "
            + ("-" if pd.isna(row.lab_saturated_pct) else f"{row.lab_saturated_pct:.0f} % of their quota")
        )
    return "\n".join(lines)

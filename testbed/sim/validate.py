"""Validation: the simulator against the lab on the same experiment (thesis Exp. 1 and 2).

Per variant (app, layout, migration; of the lab technique the calibration mimics), the mean
over runs of the per-run mean execution time, lab and simulator side by side, and their
relative difference; the simulator is trusted at scale only when every variant is within the
bound (10 %).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from testbed.analysis.data import load, variant_table
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
    table["diff_pct"] = 100 * (table["sim_s"] - table["lab_s"]) / table["lab_s"]
    table["within"] = table["diff_pct"].abs() <= bound_pct
    return table


def render(table: pd.DataFrame, bound_pct: float) -> str:
    lines = [
        f"lab vs SIMULATED, per variant (bound ±{bound_pct:g} %)",
        f"{'variant':<40} {'lab s':>9} {'sim s':>9} {'diff %':>8}  ok",
    ]
    for row in table.itertuples():
        name = f"{row.app}, {row.layout}, {'migration' if row.migration else 'no migration'}"
        lines.append(
            f"{name:<40} {row.lab_s:9.1f} {row.sim_s:9.1f} {row.diff_pct:8.1f}  {'yes' if row.within else 'NO'}"
        )
    return "\n".join(lines)

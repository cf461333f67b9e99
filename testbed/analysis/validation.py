"""The simulator against the lab, side by side, in a simulated campaign's figures and report.

A simulated campaign names its calibration, and the calibration the lab campaigns it was fitted
from (`sources`). The lab counterpart is the one of those that ran the same experiment (same spec
but for techniques and repetitions); `testbed calibrate results/exp1-... results/exp2-...` makes
both Exp. 1 and Exp. 2 validatable. Per variant: the lab's and the simulator's mean execution time,
the relative difference and whether it is within the bound (testbed.sim.validate, 10 %).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from testbed.errors import InputError
from testbed.results import read_manifest

BOUND_PCT = 10.0
#: Spec fields that may differ between a lab campaign and its simulation.
_FREE = {"techniques", "repetitions", "description"}


@dataclass(frozen=True)
class SideBySide:
    lab_dir: Path | None
    table: pd.DataFrame | None  # testbed.sim.validate.compare's, None when no counterpart
    note: str  # which lab campaign, or why there is none


def _comparable(manifest: dict) -> dict:
    return {k: v for k, v in manifest.get("spec", {}).items() if k not in _FREE}


def _same_experiment(a: dict, b: dict) -> bool:
    return _comparable(a) == _comparable(b)


def side_by_side(directory: Path, manifest: dict) -> SideBySide:
    """The lab counterpart of a simulated campaign and the per-variant comparison with it."""
    from testbed.sim.validate import compare

    sources = manifest.get("calibration_values", {}).get("sources", [])
    if not sources:
        return SideBySide(None, None, f"calibration {manifest.get('calibration')!r} names no lab campaign")
    for source in sources:
        lab = read_manifest(source) if (Path(source) / "manifest.json").exists() else {}
        if lab and not lab.get("simulated") and _same_experiment(lab, manifest):
            try:
                table = compare(source, directory, BOUND_PCT)
            except InputError as err:
                return SideBySide(Path(source), None, str(err))
            return SideBySide(Path(source), table, f"lab campaign {source}")
    return SideBySide(
        None,
        None,
        f"none of the calibration's lab campaigns ({', '.join(sources)}) ran this experiment at this scale",
    )


def validation_figure(table: pd.DataFrame, lab_dir: Path) -> Figure:
    """Bars of the lab's and the simulator's mean execution time per variant, the ±bound band
    around the lab's, and each difference in percent."""
    labels = [f"{r.layout}, {'migration' if r.migration else 'no migration'}" for r in table.itertuples()]
    x = np.arange(len(table))
    fig = Figure(figsize=(max(6, 2.2 * len(table) + 2), 4.5), layout="constrained")
    ax = fig.subplots()
    ax.bar(x - 0.2, table["lab_s"], 0.4, label=f"lab ({lab_dir.name})", color="tab:blue")
    ax.bar(x + 0.2, table["sim_s"], 0.4, label="SIMULATED", color="tab:orange", hatch="//")
    ax.errorbar(
        x - 0.2,
        table["lab_s"],
        yerr=table["lab_s"] * BOUND_PCT / 100,
        fmt="none",
        color="black",
        capsize=4,
        label=f"±{BOUND_PCT:g} % of the lab",
    )
    for k, row in enumerate(table.itertuples()):
        ax.annotate(
            f"{row.diff_pct:+.1f} %" + ("" if row.within else " (out)"),
            (k + 0.2, row.sim_s),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            fontsize=8,
        )
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("mean execution time (s)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return fig

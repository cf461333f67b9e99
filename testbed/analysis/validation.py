"""Two validations: the simulator against the lab, and the VM manager's three steps (thesis §4.5).

The simulator against the lab, side by side, in a simulated campaign's figures and report: a
simulated campaign names its calibration, and the calibration the lab campaigns it was fitted
from (`sources`). The lab counterpart is the one of those that ran the same experiment (same spec
but for techniques and repetitions); `testbed calibrate results/exp1-... results/exp2-...` makes
both Exp. 1 and Exp. 2 validatable. Per variant: the lab's and the simulator's mean execution time,
the relative difference and whether it is within the bound (testbed.sim.validate, 10 %).

The manager's steps (`manager_steps`), for a spec whose VMs start in three groups (its start
delays: experiments/validation.yml), judged per run with migration from the run's migrations and
VM times, lab or simulated alike: (1) while only the first group runs, no migration; (2) when
the second group joins its PM, a migration off that PM at once (within two of the CC's intervals
of the join: the first round whose window the newcomer fills); (3) when the third group joins, a
migration off its PM while every VM started before still runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from testbed.analysis.data import Campaign, manager_interval_s
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
    """The manifest's spec but for the free fields, and without the fields added to specs since
    (testbed.runner.campaign's ADDED_*) at their defaults, so that a lab campaign recorded before
    them still matches its simulation."""
    from testbed.runner.campaign import ADDED_BALANCER_FIELDS, ADDED_SPEC_FIELDS

    spec = {k: v for k, v in manifest.get("spec", {}).items()
            if k not in _FREE and not (k in ADDED_SPEC_FIELDS and v == ADDED_SPEC_FIELDS[k])}
    if isinstance(spec.get("balancer"), dict):
        spec["balancer"] = {k: v for k, v in spec["balancer"].items()
                            if not (k in ADDED_BALANCER_FIELDS and v == ADDED_BALANCER_FIELDS[k])}
    return spec


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


#: Step 2 of §4.5 is "moved at once": within this many CC intervals of the newcomer's start.
AT_ONCE_INTERVALS = 2.0
STEP_COLUMNS = ["run_id", "step", "t_s", "joined", "expected", "move", "after_s", "ok"]


def _start_groups(spec: dict) -> list[tuple[float, list[str]]] | None:
    """The spec's VMs grouped by start time (its delay x its scale), earliest first; None if the
    spec cannot be read or does not start its VMs in exactly three groups."""
    from testbed.runner.layouts import vm_names
    from testbed.spec import parse_spec

    try:
        parsed = parse_spec(spec)
    except InputError:
        return None
    groups: dict[float, list[str]] = {}
    for vm in vm_names(parsed.vms):
        groups.setdefault(parsed.vm_delay_s(vm), []).append(vm)
    return sorted(groups.items()) if len(groups) == 3 else None


def manager_steps(c: Campaign) -> pd.DataFrame | None:
    """The §4.5 steps judged per ok run with migration (module docstring); None when the campaign's
    spec does not start its VMs in three groups. One row per run and step: when the step begins
    (s from the run's start), which VMs joined which PM, what the thesis expects, the move that
    answers it (the first completed migration in the step's window, none for step 1) and the
    verdict."""
    groups = _start_groups(c.manifest.get("spec") or {})
    if groups is None:
        return None
    interval = manager_interval_s(c.manifest) or float("nan")
    runs = c.ok_runs[c.ok_runs["migration"]]
    rows = []
    for run in runs.itertuples():
        times = c.vm_times[c.vm_times["run_id"] == run.run_id].set_index("vm")
        starts = {vm: t for t, vms in groups for vm in vms}
        ends = {vm: starts[vm] + float(row.exec_time_s) for vm, row in times.iterrows() if vm in starts}
        where = {vm: str(row.start_host) for vm, row in times.iterrows()}
        moves = c.migrations[(c.migrations["run_id"] == run.run_id) & (c.migrations["status"] == "completed")]
        moves = sorted(((m.started_at - run.started_at).total_seconds(), m.vm, m.source, m.destination)
                       for m in moves.itertuples())
        (t1, first), (t2, second), (t3, third) = groups
        before = [m for m in moves if m[0] < t2]
        rows.append({"run_id": run.run_id, "step": 1, "t_s": t1, "joined": _joined(first, where),
                     "expected": "no migration", "move": _move(before[0]) if before else "",
                     "after_s": before[0][0] - t1 if before else float("nan"), "ok": not before})
        for step, t, group, until, wanted in (
                (2, t2, second, t2 + AT_ONCE_INTERVALS * interval, "at once"),
                (3, t3, third, min((ends.get(vm, t3) for vm in first + second), default=t3),
                 f"while {', '.join(first + second)} still run")):
            pms = {where.get(vm) for vm in group}
            answer = next((m for m in moves if t <= m[0] <= until and m[2] in pms), None)
            rows.append({"run_id": run.run_id, "step": step, "t_s": t, "joined": _joined(group, where),
                         "expected": f"a migration off {', '.join(sorted(p for p in pms if p))} {wanted}",
                         "move": _move(answer) if answer else "",
                         "after_s": answer[0] - t if answer else float("nan"), "ok": answer is not None})
    return pd.DataFrame(rows, columns=STEP_COLUMNS)


def _joined(vms: list[str], where: dict[str, str]) -> str:
    return ", ".join(f"{vm} on {where.get(vm, '?')}" for vm in vms)


def _move(move: tuple[float, str, str, str]) -> str:
    t, vm, source, destination = move
    return f"{vm} {source} -> {destination} at {t:.1f} s"

"""The scale study (experiments/studies/scale.yml): balancer policies x migration modes at 10 to 1,000 PMs,
simulated, with its summary table and figures.

Why not an ordinary spec: a spec holds one balancer and at most 1,000 VMs, and the analysis keys
variants by technique/app/layout/mode, not by policy. So the study expands into one ordinary
results directory per (PMs, policy, mode, concurrency) (DIR/<N>pms/<policy label>/<mode>[-xK]/;
`testbed plot` draws each) and writes DIR/summary.csv (one row per run: mean execution time, migrations,
bytes moved, time to balance) and DIR/figures/ across sizes and policies. Every file says
SIMULATED.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from testbed.errors import InputError, describe_validation_error
from testbed.results import ResultsStore, RunRow, make_dir, write_atomic
from testbed.runner.layouts import counts_for
from testbed.sim.calibration import Calibration
from testbed.sim.executor import SIMULATED_NOTE, Cluster, SimExecutor, run_result, scenario
from testbed.sim.run import simulate
from testbed.techniques import SIMULATOR

SUMMARY_COLUMNS = (
    "pms",
    "vms",
    "policy",
    "label",
    "mode",
    "concurrency",
    "rep",
    "mean_exec_time_s",
    "unfinished_vms",
    "migrations",
    "bytes_moved",
    "time_to_balance_s",
    "sim_s",
    "wall_s",
)


class PolicyChoice(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    policy: str
    params: dict[str, float] = {}

    @property
    def label(self) -> str:
        return "-".join([self.policy, *(f"{k}{v:g}" for k, v in sorted(self.params.items()))])


Positive = Annotated[int, Field(ge=1)]
Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class Study(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    description: str = ""
    simulated: Literal[True] = True
    app: Literal["synthetic1", "synthetic-random"] = "synthetic-random"
    instances: int = Field(1, ge=1)
    scale: float = Field(1.0, gt=0, le=100)  # as a spec's
    vcpus: int = Field(2, ge=1)
    memory_mb: int = Field(100, ge=1)
    sizes: list[Positive] = Field(min_length=1)  # PMs
    vms_per_pm: int = Field(3, ge=1)
    layout: Literal["third", "unbalanced", "balanced"] = "third"
    policies: list[PolicyChoice] = Field(min_length=1)
    modes: list[Literal["precopy", "stopcopy", "postcopy"]] = Field(["precopy"], min_length=1)
    concurrency: list[Positive] = Field([1], min_length=1)
    interval_s: float = Field(10.0, ge=1, allow_inf_nan=False)
    cooldown_s: Seconds = 60.0
    repetitions: int = Field(3, ge=1)
    seed: int = 0

    def placement(self, pms: int) -> list[int]:
        """`third`: every VM on the first third of the PMs, evenly (3x VMs -> 9 per loaded PM, the
        rest empty); `unbalanced`/`balanced`: the thesis' layouts generalized (runner.layouts)."""
        vms = pms * self.vms_per_pm
        if self.layout == "third":
            loaded = max(1, pms // 3)
            counts = list(counts_for("balanced", vms, loaded)) + [0] * (pms - loaded)
        else:
            counts = list(counts_for(self.layout, vms, pms))
        return [pm for pm, n in enumerate(counts, start=1) for _ in range(n)]


def load_study(path: str | Path) -> Study:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        study = Study.model_validate(data)
    except OSError as err:
        raise InputError(f"{path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML ({err})") from None
    except ValidationError as err:
        raise InputError(describe_validation_error(err, str(path))) from None
    from testbed.balancer import get_policy

    for k, choice in enumerate(study.policies):
        try:
            get_policy(choice.policy, **choice.params)
        except InputError as err:
            raise InputError(f"{path}: policies.{k}: {err}") from None
    return study


def study_with(study: Study, source: str, sizes: list[int] | None = None, reps: int | None = None) -> Study:
    """The study with the command line's --sizes and --reps, validated like the file (a size of 0
    or -3 would make empty or `-3pms` result directories, 0 repetitions nothing at all)."""
    changes = {k: v for k, v in (("sizes", sizes), ("repetitions", reps)) if v is not None}
    try:
        return Study.model_validate(study.model_dump() | changes)
    except ValidationError as err:
        raise InputError(describe_validation_error(err, f"{source} (command line)")) from None


def _seed(study: Study, rep: int, vm: int) -> int:
    return (study.seed * 1_000_003 + rep * 10_007 + vm) % 2**31


def run_study(
    study: Study,
    out: Path,
    cal: Calibration,
    calibration_name: str,
    log=print,
) -> list[dict[str, Any]]:
    """Simulate every cell; write the per-cell results dirs, summary.csv and the figures (command
    line overrides of sizes and repetitions: study_with)."""
    make_dir(out)
    rows: list[dict[str, Any]] = []
    manifest_extra = SimExecutor(cal, calibration_name).manifest_fields()
    for pms in study.sizes:
        placement = study.placement(pms)
        for choice in study.policies:
            for mode, conc in _cells(study, choice):
                with ResultsStore(out / f"{pms}pms" / _dir_name(choice, mode, conc)) as store:
                    _open(store, study, pms, choice, mode, conc, manifest_extra)
                    for rep in range(1, study.repetitions + 1):
                        row = _one(
                            study, store, pms, placement, choice, mode, conc, rep, cal, calibration_name
                        )
                        rows.append(row)
                        log(_line(row))
    _write_summary(out, study, rows, calibration_name)
    from testbed.sim.figures import study_figures

    study_figures(out, rows)
    return rows


def _cells(study: Study, choice: PolicyChoice) -> list[tuple[str, int]]:
    """(mode, concurrency) pairs a policy runs: all of them, or one for `none` (nothing moves)."""
    if choice.policy == "none":
        return [(study.modes[0], study.concurrency[0])]
    return [(mode, conc) for mode in study.modes for conc in study.concurrency]


def _dir_name(choice: PolicyChoice, mode: str, conc: int) -> str:
    """One results dir per (PMs, policy, mode, concurrency): the analysis names variants by
    layout and migration only, so each dir holds one variant (`none`: DIR/<N>pms/none)."""
    if choice.policy == "none":
        return "none"
    return f"{choice.label}/{mode}" + (f"-x{conc}" if conc != 1 else "")


def _variant_id(study: Study, migrate: bool, mode: str, conc: int) -> str:
    """`synthetic-random.third.mig.precopy` (plus `.c4` with 4 concurrent migrations)."""
    parts = [study.app, study.layout, "mig" if migrate else "nomig"] + ([mode] if migrate else [])
    return ".".join(parts + ([f"c{conc}"] if conc != 1 else []))


def _open(
    store: ResultsStore,
    study: Study,
    pms: int,
    choice: PolicyChoice,
    mode: str,
    conc: int,
    extra: dict[str, Any],
) -> None:
    migrate = choice.policy != "none"
    variant = {
        "layout": study.layout,
        "migration": migrate,
        "app": study.app,
        "link_rate": None,
        "compression": "none",
        "mode": mode if migrate else None,
        "concurrency": conc,
    }
    store.update_manifest(
        experiment=f"{study.name}-{pms}pms-" + _dir_name(choice, mode, conc).replace("/", "-"),
        study=study.model_dump(mode="json"),
        pms=pms,
        vms=pms * study.vms_per_pm,
        policy=choice.model_dump(),
        variants={_variant_id(study, migrate, mode, conc): variant},
        **extra,
    )
    write_atomic(store.dir / "SIMULATED", SIMULATED_NOTE + "\n")


def _one(
    study: Study,
    store: ResultsStore,
    pms: int,
    placement: list[int],
    choice: PolicyChoice,
    mode: str,
    conc: int,
    rep: int,
    cal: Calibration,
    calibration_name: str,
) -> dict[str, Any]:
    migrate = choice.policy != "none"
    run_id = f"sim.{_variant_id(study, migrate, mode, conc)}.r{rep}"
    vms = len(placement)
    sc = scenario(
        pms=pms,
        placement=placement,
        app=study.app,
        instances=[study.instances] * vms,
        scales=[study.scale] * vms,
        seeds=[_seed(study, rep, k) for k in range(vms)],
        start_s=[0.0] * vms,
        vcpus=[study.vcpus] * vms,
        memory_mb=study.memory_mb,
        cal=cal,
        cluster=Cluster(),
        link_rate=None,
        policy=choice.policy if migrate else None,
        params=choice.params,
        mode=mode,
        interval_s=study.interval_s,
        cooldown_s=study.cooldown_s,
        concurrency=conc,
        record_cpu=vms <= 100,
    )
    outcome = simulate(sc)
    result = run_result(sc, outcome, calibration_name)
    if run_id not in store.statuses:
        store.record(
            RunRow(
                run_id,
                study.name,
                SIMULATOR,
                study.app,
                study.layout,
                migrate,
                rep,
                result.started_at,
                result.finished_at,
                result.status,
            ),
            result.vm_times,
            result.migrations,
            result.cpu_samples,
            {"run_id": run_id, **result.details},
        )
    return {
        "pms": pms,
        "vms": vms,
        "policy": choice.policy,
        "label": choice.label,
        "mode": mode if migrate else "",
        "concurrency": conc,
        "rep": rep,
        "mean_exec_time_s": result.details["mean_exec_time_s"],
        "unfinished_vms": int(np.isnan(outcome.vm_end).sum()),
        "migrations": len(outcome.migrations),
        "bytes_moved": outcome.bytes_moved,
        "time_to_balance_s": outcome.time_to_balance_s,
        "sim_s": outcome.sim_s,
        "wall_s": outcome.wall_s,
    }


def _line(row: dict[str, Any]) -> str:
    ttb = row["time_to_balance_s"]
    return (
        f"SIMULATED {row['pms']:>5} PMs {row['label']:<22} {row['mode'] or '-':<9} c{row['concurrency']} "
        f"r{row['rep']}: mean exec {row['mean_exec_time_s']:.1f} s, {row['migrations']} migrations, "
        f"{row['bytes_moved'] / 1e9:.2f} GB, balanced at {'never' if ttb is None else f'{ttb:.0f} s'} "
        f"({row['wall_s']:.1f} s wall)"
    )


def _write_summary(out: Path, study: Study, rows: list[dict[str, Any]], calibration_name: str) -> None:
    with (out / "summary.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    k: ""
                    if row[k] is None or (isinstance(row[k], float) and not math.isfinite(row[k]))
                    else row[k]
                    for k in SUMMARY_COLUMNS
                }
            )
    meta = {
        "simulated": True,
        "note": SIMULATED_NOTE,
        "calibration": calibration_name,
        "study": study.model_dump(mode="json"),
        "tables": ["summary.csv"],
    }
    write_atomic(out / "summary.json", json.dumps(meta, indent=2) + "\n")
    write_atomic(out / "SIMULATED", SIMULATED_NOTE + "\n")

"""`SimExecutor`: the campaign runner's RunExecutor for technique `sim`, and the record of a
simulated run in the results store's contract (runs, vm_times, migrations, cpu_samples).

A run's times in the store are the host clock at which the simulation ran plus simulated
seconds; every run's details say `simulated: true`, the calibration, the wall time it took and
the scale metrics the CSV tables have no column for (migrations, bytes moved, time to balance).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from testbed.balancer import get_policy
from testbed.lab import parse_rate
from testbed.results import CpuSample, MigrationRow, VmTime
from testbed.runner.campaign import Run, RunResult
from testbed.runner.layouts import vm_names
from testbed.runner.time_scale import ManagerTimes, manager_times
from testbed.sim.calibration import Calibration
from testbed.sim.run import Outcome, Scenario, SimVM, simulate
from testbed.sim.workloads import vm_chains
from testbed.spec import Spec
from testbed.techniques import CATALOGUE, SIMULATOR

#: The embedded lab's defaults (common brief: 0.6 CPU, 4 cores, 100mbit per PM).
DEFAULT_CAPACITY = 0.6
DEFAULT_CORES = 4
DEFAULT_LINK = "100mbit"
SIMULATED_NOTE = "SIMULATED: produced by testbed's simulator (testbed/sim), not measured on a lab"


def pm_names(count: int) -> list[str]:
    """The embedded lab's PM names, so simulated and real results line up host by host."""
    return [f"tb-pm{k}" for k in range(1, count + 1)]


@dataclass(frozen=True)
class Cluster:
    """The simulated PMs: all alike, as the embedded lab's."""

    capacity: float = DEFAULT_CAPACITY
    cores: int = DEFAULT_CORES
    link_rate: str = DEFAULT_LINK


def scenario(
    *,
    pms: int,
    placement: Sequence[int],
    app: str,
    instances: Sequence[int],
    scales: Sequence[float],
    seeds: Sequence[int],
    start_s: Sequence[float],
    vcpus: Sequence[int],
    memory_mb: int,
    cal: Calibration,
    cluster: Cluster,
    link_rate: str | None,
    policy: str | None,
    params: dict[str, float],
    mode: str,
    interval_s: float,
    cooldown_s: float,
    signal: str = "use",
    concurrency: int = 1,
    horizon_s: float | None = None,
    record_cpu: bool = True,
    dry_run: bool = False,
) -> Scenario:
    """A scenario from an experiment's terms: per VM (in order vm1, vm2, ...) its PM (1-based, as
    layouts give it), app instances, work scale, seed, start time and vCPUs."""
    per_vm = zip(placement, instances, scales, seeds, start_s, vcpus, strict=True)
    vms = [
        SimVM(f"vm{k}", pm - 1, vm_chains(app, count, scale, seed, cal), cpus, memory_mb, app, delay)
        for k, (pm, count, scale, seed, delay, cpus) in enumerate(per_vm, start=1)
    ]
    link = parse_rate(link_rate or cluster.link_rate) / 8.0
    return Scenario(
        pm_names(pms),
        np.full(pms, cluster.capacity),
        np.full(pms, cluster.cores),
        np.full(pms, link),
        vms,
        cal,
        policy=None if policy is None else get_policy(policy, **params),
        dry_run=dry_run,
        mode=mode,
        signal=signal,
        interval_s=interval_s,
        cooldown_s=cooldown_s,
        concurrency=concurrency,
        horizon_s=horizon_s,
        record_cpu=record_cpu,
    )


def run_result(sc: Scenario, out: Outcome, calibration: str, origin: float | None = None) -> RunResult:
    """The simulated run in the store's terms; unfinished VMs make it `failed`."""
    origin = time.time() if origin is None else origin
    vm_times = [
        VmTime(vm.name, out.start_host[k], out.end_host[k], float(out.exec_time_s[k]))
        for k, vm in enumerate(sc.vms)
        if math.isfinite(out.vm_end[k])
    ]
    migrations = [
        MigrationRow(
            sc.vms[f.vm].name,
            sc.host_names[f.source],
            sc.host_names[f.destination],
            f.plan.mode,
            origin + float(f.start),
            float(f.plan.total_s),
            float(f.plan.downtime_s),
            int(f.plan.bytes),
            "completed" if f.ended else "in-flight",
        )
        for f in out.migrations
    ]
    samples = []
    for t, pct in zip(out.sample_t, out.host_pct, strict=True):
        samples += [
            CpuSample(round(float(t), 3), name, "", float(p))
            for name, p in zip(sc.host_names, pct, strict=True)
        ]
    for t, (pct, hosts) in zip(out.sample_t, out.vm_pct, strict=True):
        samples += [
            CpuSample(round(float(t), 3), sc.host_names[int(h)], vm.name, float(p))
            for vm, p, h in zip(sc.vms, pct, hosts, strict=True)
        ]
    unfinished = [vm.name for k, vm in enumerate(sc.vms) if not math.isfinite(out.vm_end[k])]
    details: dict[str, Any] = {
        "simulated": True,
        "note": SIMULATED_NOTE,
        "calibration": calibration,
        "sim_s": out.sim_s,
        "wall_s": out.wall_s,
        "events": out.events,
        "rounds": out.rounds,
        "migrations": len(out.migrations),
        "bytes_moved": out.bytes_moved,
        "time_to_balance_s": out.time_to_balance_s,
        "balance_stddev_pts": sc.balance_stddev,
        "mean_exec_time_s": float(np.nanmean(out.exec_time_s)) if vm_times else None,
        "stddev_pts": [round(s, 3) for s in out.stddev],
    }
    if unfinished and sc.horizon_s is None:
        details["error"] = f"{len(unfinished)} VMs unfinished at {out.sim_s:.0f} simulated s"
    status = "failed" if unfinished and sc.horizon_s is None else "ok"
    return RunResult(status, origin, origin + out.sim_s, vm_times, migrations, samples, details)


class SimExecutor:
    """RunExecutor for technique `sim`: each run simulated from the spec and one calibration.

    The technique's migration mode when the spec names none is the mimicked technique's own
    (qemu: pre-copy, container: stop-and-copy), as in the lab executor."""

    def __init__(
        self,
        cal: Calibration,
        calibration_name: str,
        cluster: Cluster = Cluster(),
        samples_up_to_vms: int = 100,
    ) -> None:
        self.cal = cal
        self.calibration_name = calibration_name
        self.cluster = cluster
        self.samples_up_to_vms = samples_up_to_vms

    def default_mode(self) -> str:
        """The mimicked technique's own mode (the technique catalogue's); a calibration that mimics
        a technique the catalogue does not know migrates as the simulator's own default."""
        mimicked = CATALOGUE.get(self.cal.mimics, CATALOGUE[SIMULATOR])
        return mimicked.default_mode

    def manager_times(self, spec: Spec, link_rate: str | None = None) -> ManagerTimes:
        """The simulated CC's interval, cool-down and settling: the lab's, from the same function."""
        return manager_times(spec, parse_rate(link_rate or self.cluster.link_rate))

    def execute(self, run: Run) -> RunResult:
        spec, variant = run.spec, run.variant
        names = vm_names(spec.vms)
        b = spec.balancer
        times = self.manager_times(spec, variant.link_rate)
        sc = scenario(
            pms=spec.pms,
            placement=variant.placement,
            app=variant.app,
            instances=[spec.vm_instances(vm) for vm in names],
            scales=[spec.vm_scale(vm) for vm in names],
            seeds=[run.workload_seed(vm) for vm in names],
            start_s=[spec.vm_delay_s(vm) for vm in names],
            vcpus=[spec.vm_vcpus(vm) for vm in names],
            memory_mb=spec.memory_mb,
            cal=self.cal,
            cluster=self.cluster,
            link_rate=variant.link_rate,
            policy=b.policy,
            dry_run=not variant.migration,  # as the lab's runner configures the CC
            params=dict(b.params),
            mode=variant.mode or b.mode or self.default_mode(),
            interval_s=times.interval_s,
            cooldown_s=times.cooldown_s,
            signal=b.signal,
            record_cpu=spec.vms <= self.samples_up_to_vms,
        )
        return run_result(sc, simulate(sc), self.calibration_name)

    def manifest_fields(self) -> dict[str, Any]:
        """What a simulated campaign's manifest adds: the flag, the note, the calibration, the cluster."""
        return {
            "simulated": True,
            "note": SIMULATED_NOTE,
            "calibration": self.calibration_name,
            "calibration_values": self.cal.model_dump(mode="json"),
            "lab": {
                "simulated": True,
                "capacity": self.cluster.capacity,
                "cores": self.cluster.cores,
                "link_rate": self.cluster.link_rate,
            },
        }

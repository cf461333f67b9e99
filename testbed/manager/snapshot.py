"""From what the LCs answered to the balancer's Snapshot, and from its Decision to an order.

Units: an LC reports percent of its own PM's capacity; the Snapshot wants one unit across
hosts. The reference host here is one CPU: a PM's capacity is 100 x its CPUs and a VM's cpu is
its percent x its PM's CPUs, so PMs of different sizes compare correctly."""

from __future__ import annotations

from typing import Any

import numpy as np

from testbed.balancer import Decision, Snapshot
from testbed.balancer.assign_u import AssignU
from testbed.manager.api import HostSample, MigrateOrder, MigrationMode, Signal


def snapshot_from_samples(samples: dict[str, HostSample], signal: Signal, drained: set[str],
                          in_flight: MigrateOrder | None) -> Snapshot | None:
    """The Snapshot of the reachable PMs (None if no LC answered).

    A VM seen on two PMs is a migration in progress (QEMU's incoming side already exists):
    it is counted where the CC sent it from while the order is in flight, otherwise where it
    uses more CPU (the side that runs)."""
    if not samples:
        return None
    placed: dict[str, tuple[float, str, float]] = {}
    for host, sample in samples.items():
        for vm in sample.vms:
            cpu = getattr(vm, signal) * sample.capacity
            if in_flight is not None and vm.name == in_flight.vm:
                if host != in_flight.source:
                    continue
            elif vm.name in placed and placed[vm.name][0] >= vm.use:
                continue
            placed[vm.name] = (vm.use, host, cpu)
    return Snapshot.create(
        capacities={host: 100.0 * sample.capacity for host, sample in samples.items()},
        vms=[(name, host, cpu) for name, (_, host, cpu) in placed.items()],
        measured_loads={host: getattr(sample, signal) * sample.capacity for host, sample in samples.items()},
        excluded=drained & set(samples),
    )


def drain_decision(snapshot: Snapshot | None, cost: AssignU) -> Decision | None:
    """The next move of a drain, or None: the lowest-named VM still on an excluded (drained)
    host goes to its least-marginal-cost eligible host (Assign-U's H_j(v), whatever policy
    balances otherwise: drain is a maintenance move, not a balancing one)."""
    if snapshot is None or not snapshot.excluded or not snapshot.eligible.any():
        return None
    stranded = np.flatnonzero(~snapshot.eligible[snapshot.vm_host])
    if stranded.size == 0:
        return None
    vm = int(stranded[0])
    return Decision(snapshot.migration(vm, cost.destination(snapshot, vm)))


def decision_order(decision: Decision | None, mode: MigrationMode) -> MigrateOrder | None:
    move = None if decision is None else decision.migration
    if move is None:
        return None
    return MigrateOrder(vm=move.vm, source=move.source, dest=move.destination, mode=mode)


def snapshot_json(snapshot: Snapshot | None) -> dict[str, Any] | None:
    """The Snapshot as logged: per host capacity, load and percent load; per VM host and cpu."""
    if snapshot is None:
        return None
    hosts = snapshot.host_names.tolist()
    return {
        "hosts": {name: {"capacity": float(snapshot.capacity[k]), "load": float(snapshot.host_load[k]),
                         "load_pct": float(snapshot.load_pct[k])} for k, name in enumerate(hosts)},
        "vms": {name: {"host": hosts[snapshot.vm_host[k]], "cpu": float(snapshot.vm_cpu[k])}
                for k, name in enumerate(snapshot.vm_names.tolist())},
        "excluded": sorted(snapshot.excluded),
    }

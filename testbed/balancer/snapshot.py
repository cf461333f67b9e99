"""The balancer's input (Snapshot) and output (Decision): plain data, no I/O.

A Snapshot is canonical: hosts and VMs are stored sorted by name. Every policy therefore sees
the same arrays, in the same order, whatever order the collector listed them in, so float sums
and tie-breaking ("lowest name wins") do not depend on input order.

Units: capacity 100 is one reference host; VM cpu and host load are in percent of a
capacity-100 host (a VM using a whole reference core-set is 100). The normalized load of host i
is L_i = 100 * load_i / capacity_i (percent of that host), and VM v would add
p_j(v) = 100 * cpu_v / capacity_j percentage points to host j.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class Migration:
    vm: str
    source: str
    destination: str


@dataclass(frozen=True)
class Decision:
    """Balanced (migration is None) or exactly one migration: the thesis' one-move-per-round rule."""

    migration: Migration | None = None

    @property
    def balanced(self) -> bool:
        return self.migration is None

    def to_json(self) -> dict[str, object]:
        """The `testbed balance` output object (a contract other tools parse)."""
        move = self.migration
        return {
            "balanced": move is None,
            "migration": None
            if move is None
            else {"vm": move.vm, "source": move.source, "destination": move.destination},
        }


def _is_strictly_sorted(names: np.ndarray) -> bool:
    return bool(np.all(names[1:] > names[:-1])) if names.size > 1 else True


@dataclass(frozen=True, eq=False)
class Snapshot:
    """Hosts and VMs as numpy arrays, sorted by name (build one with `Snapshot.create`).

    host_load is the absolute load of each host (normally the sum of its VMs' cpu, or a measured
    value); excluded names hosts that must receive no VM (e.g. a host being drained).
    """

    host_names: np.ndarray  # str, (H,), strictly increasing
    capacity: np.ndarray  # float64, (H,), > 0
    host_load: np.ndarray  # float64, (H,), >= 0, same units as vm_cpu
    vm_names: np.ndarray  # str, (V,), strictly increasing
    vm_cpu: np.ndarray  # float64, (V,), >= 0
    vm_host: np.ndarray  # intp, (V,), index into host arrays
    excluded: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        n_hosts, n_vms = self.host_names.shape[0], self.vm_names.shape[0]
        if self.capacity.shape != (n_hosts,) or self.host_load.shape != (n_hosts,):
            raise ValueError("capacity and host_load must have one entry per host")
        if self.vm_cpu.shape != (n_vms,) or self.vm_host.shape != (n_vms,):
            raise ValueError("vm_cpu and vm_host must have one entry per VM")
        if not (_is_strictly_sorted(self.host_names) and _is_strictly_sorted(self.vm_names)):
            raise ValueError("names must be unique and sorted; build snapshots with Snapshot.create")
        if n_hosts == 0:
            raise ValueError("a snapshot needs at least one host")
        if n_vms and (self.vm_host.min() < 0 or self.vm_host.max() >= n_hosts):
            raise ValueError("vm_host holds an index outside the host list")
        if not set(self.excluded) <= set(self.host_names.tolist()):
            raise ValueError("excluded names a host that is not in the snapshot")

    @classmethod
    def create(
        cls,
        capacities: Mapping[str, float],
        vms: Iterable[tuple[str, str, float]],
        measured_loads: Mapping[str, float] | None = None,
        excluded: Iterable[str] = (),
    ) -> Snapshot:
        """Canonical snapshot from host capacities, (vm, host, cpu) triples and optional measured
        host loads (which win over the sum of the host's VMs, as the thesis' collector reports
        the PM's own CPU use)."""
        host_names = np.array(sorted(capacities), dtype=str)
        index = {name: k for k, name in enumerate(host_names.tolist())}
        rows = sorted(vms)
        vm_names = np.array([r[0] for r in rows], dtype=str).reshape(-1)
        vm_host = np.array([index[r[1]] for r in rows], dtype=np.intp).reshape(-1)
        vm_cpu = np.array([float(r[2]) for r in rows], dtype=np.float64).reshape(-1)
        load = np.bincount(vm_host, weights=vm_cpu, minlength=len(host_names)).astype(np.float64)
        for name, value in (measured_loads or {}).items():
            load[index[name]] = float(value)
        return cls(
            host_names=host_names,
            capacity=np.array([float(capacities[n]) for n in host_names.tolist()], dtype=np.float64),
            host_load=load,
            vm_names=vm_names,
            vm_cpu=vm_cpu,
            vm_host=vm_host,
            excluded=frozenset(excluded),
        )

    @property
    def n_hosts(self) -> int:
        return int(self.host_names.shape[0])

    @property
    def n_vms(self) -> int:
        return int(self.vm_names.shape[0])

    @cached_property
    def scale(self) -> np.ndarray:
        """100 / capacity: multiplies an absolute cpu into percentage points of each host."""
        return 100.0 / self.capacity

    @cached_property
    def load_pct(self) -> np.ndarray:
        """L_i, the load of each host in percent of its own capacity."""
        return self.host_load * self.scale

    @cached_property
    def eligible(self) -> np.ndarray:
        """Boolean mask of hosts that may receive a VM (not excluded)."""
        if not self.excluded:
            return np.ones(self.n_hosts, dtype=bool)
        return ~np.isin(self.host_names, sorted(self.excluded))

    def host_index(self, name: str) -> int:
        k = int(np.searchsorted(self.host_names, name))
        if k >= self.n_hosts or self.host_names[k] != name:
            raise KeyError(name)
        return k

    def vm_index(self, name: str) -> int:
        k = int(np.searchsorted(self.vm_names, name))
        if k >= self.n_vms or self.vm_names[k] != name:
            raise KeyError(name)
        return k

    def migration(self, vm: int, destination: int) -> Migration:
        """The Migration record for VM index `vm` moving to host index `destination`."""
        return Migration(
            vm=str(self.vm_names[vm]),
            source=str(self.host_names[self.vm_host[vm]]),
            destination=str(self.host_names[destination]),
        )

    def apply(self, move: Migration) -> Snapshot:
        """The snapshot after `move`, with static VM loads (what the next round would see if
        nothing but the migration changed): used by tests and the simulator."""
        v, src, dst = self.vm_index(move.vm), self.host_index(move.source), self.host_index(move.destination)
        if self.vm_host[v] != src:
            raise ValueError(f"{move.vm} is not on {move.source}")
        load = self.host_load.copy()
        load[src] -= self.vm_cpu[v]
        load[dst] += self.vm_cpu[v]
        vm_host = self.vm_host.copy()
        vm_host[v] = dst
        return Snapshot(
            host_names=self.host_names,
            capacity=self.capacity,
            host_load=load,
            vm_names=self.vm_names,
            vm_cpu=self.vm_cpu,
            vm_host=vm_host,
            excluded=self.excluded,
        )

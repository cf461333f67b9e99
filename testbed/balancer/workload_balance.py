"""`workload-balance`: OpenStack Watcher's strategy of that name, as a baseline.

Source: openstack/watcher, watcher/decision_engine/strategy/strategies/workload_balance.py
(Intel, 2016; strategy docs "Workload Balance Migration Strategy", parameter `threshold`,
default 25.0). Its rule, on CPU:

1. A host whose utilisation (percent of its capacity) is >= threshold is a source; the others
   are possible targets. No source, or no target: nothing to do.
2. Sources are taken from the most to the least utilised; the first one that has a VM with
   0 <= (host workload - average workload) - vm workload gives up the VM minimising that gap,
   i.e. the VM that brings the host closest to the cluster average from above. Workloads here
   are absolute (Watcher uses vcpus x utilisation), the average is over all hosts.
3. The destination is the least-utilised target that stays strictly under the threshold with
   the VM added; if none fits, Watcher plans nothing this round, and neither do we.

One migration per audit, as Watcher recommends with continuous audits. Ties (same utilisation,
same gap) go to the lowest name, so input order never matters. Excluded hosts are no targets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from testbed.balancer.snapshot import Decision, Snapshot

DEFAULT_THRESHOLD = 25.0


@dataclass(frozen=True)
class WorkloadBalance:
    threshold: float = DEFAULT_THRESHOLD

    def __post_init__(self) -> None:
        if not (math.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError(f"threshold must be a positive number of percent, got {self.threshold}")

    def __call__(self, snap: Snapshot) -> Decision:
        util = snap.load_pct
        source = util >= self.threshold
        target = ~source & snap.eligible
        if not source.any() or not target.any():
            return Decision()
        vm = self._choose_vm(snap, source)
        if vm is None:
            return Decision()
        fits = target & (snap.vm_cpu[vm] + snap.host_load < self.threshold / 100.0 * snap.capacity)
        if not fits.any():
            return Decision()
        hosts = np.flatnonzero(fits)
        return Decision(snap.migration(vm, int(hosts[np.argmin(util[hosts])])))

    @staticmethod
    def _choose_vm(snap: Snapshot, source: np.ndarray) -> int | None:
        """Step 2: the first source (most utilised first) with a VM not taking it below the
        average, and on it the VM leaving the smallest non-negative gap."""
        average = snap.host_load.mean()
        gap = snap.host_load[snap.vm_host] - average - snap.vm_cpu
        candidates = np.flatnonzero(source[snap.vm_host] & (gap >= 0))
        if candidates.size == 0:
            return None
        # rank of each host when sources are sorted by utilisation, highest first, then name
        host_rank = np.empty(snap.n_hosts, dtype=np.intp)
        host_rank[np.lexsort((np.arange(snap.n_hosts), -snap.load_pct))] = np.arange(snap.n_hosts)
        order = np.lexsort((candidates, gap[candidates], host_rank[snap.vm_host[candidates]]))
        return int(candidates[order[0]])

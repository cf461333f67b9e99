"""`stddev`: rebalance on the standard deviation of host load, as a baseline.

Sources: OpenStack Watcher's `workload_stabilization` strategy (openstack/watcher,
watcher/decision_engine/strategy/strategies/workload_stabilization.py: when the standard
deviation of normalized host utilisation exceeds a threshold, default 0.1 of capacity, simulate
migrations and keep the one giving the lowest standard deviation) and VMware DRS's load-imbalance
metric (the standard deviation of normalized host entitlement, compared with a target; DRS
recommends the move that lowers it most). Here: if the population standard deviation of
L_i (percent of each host) exceeds `trigger` percentage points (default 10, Watcher's 0.1), apply
the single VM move that lowers it most, and only if it lowers it (by more than 1e-9 %^2 of
variance, so float noise never causes a move).

Exhaustive search without a (v, j) matrix: with deviations l = L - mean, moving v from i to j
changes n * variance by p_i^2 - 2 l_i p_i + 2 l_j p_j + p_j^2 - (p_j - p_i)^2 / n. For hosts of one
capacity (one p_j) this grows with l_j, so per capacity class only the least-loaded eligible host
can be the best destination. A VM sitting on that host itself gains nothing inside its class
(moving to an equal host at least as loaded changes n * variance by 2 p (p + l_j - l_i) > 0), so
it only needs the other classes' hosts. Cost O(H log H + V K) for K capacity classes, in VM
chunks. Ties go to the lowest name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from testbed.balancer.snapshot import Decision, Snapshot

DEFAULT_TRIGGER = 10.0
MIN_VARIANCE_GAIN = 1e-9
_CHUNK_ELEMENTS = 1 << 21


@dataclass(frozen=True)
class StdDev:
    trigger: float = DEFAULT_TRIGGER

    def __post_init__(self) -> None:
        if not (math.isfinite(self.trigger) and self.trigger >= 0):
            raise ValueError(
                f"trigger must be a non-negative number of percentage points, got {self.trigger}"
            )

    def __call__(self, snap: Snapshot) -> Decision:
        if float(np.std(snap.load_pct)) <= self.trigger or snap.n_vms == 0:
            return Decision()
        delta = self.variance_change(snap)
        vm = int(np.argmin(delta))  # first minimum = lowest VM name
        if not delta[vm] < -MIN_VARIANCE_GAIN:
            return Decision()
        hosts = np.flatnonzero(snap.eligible & (np.arange(snap.n_hosts) != snap.vm_host[vm]))
        gain = _destination_term(snap, snap.vm_cpu[vm], snap.vm_host[vm], hosts)
        return Decision(snap.migration(vm, int(hosts[np.argmin(gain)])))

    @staticmethod
    def variance_change(snap: Snapshot) -> np.ndarray:
        """For every VM, the change of variance of its best move (+inf if it cannot move)."""
        n = snap.n_hosts
        dev = snap.load_pct - snap.load_pct.mean()
        own = snap.vm_host
        p_own = snap.vm_cpu * snap.scale[own]
        leave = p_own * p_own - 2.0 * dev[own] * p_own
        cand = _least_per_capacity(snap)
        best = np.full(snap.n_vms, np.inf)
        if cand.size:
            step = max(1, _CHUNK_ELEMENTS // cand.size)
            for start in range(0, snap.n_vms, step):
                part = slice(start, start + step)
                term = _destination_term(snap, snap.vm_cpu[part, None], own[part, None], cand[None, :])
                term[own[part, None] == cand[None, :]] = np.inf
                best[part] = term.min(axis=1)
        return (leave + best) / n


def _destination_term(snap: Snapshot, cpu: np.ndarray, own: np.ndarray, hosts: np.ndarray) -> np.ndarray:
    """The part of n * (variance change) that depends on the destination j."""
    dev = snap.load_pct - snap.load_pct.mean()
    p_own = cpu * snap.scale[own]
    p_dst = cpu * snap.scale[hosts]
    return 2.0 * dev[hosts] * p_dst + p_dst * p_dst - (p_dst - p_own) ** 2 / snap.n_hosts


def _least_per_capacity(snap: Snapshot) -> np.ndarray:
    """Per capacity class, its least-loaded eligible host (lowest name on ties)."""
    hosts = np.flatnonzero(snap.eligible)
    order = hosts[np.lexsort((hosts, snap.load_pct[hosts], snap.capacity[hosts]))]
    cap = snap.capacity[order]
    return order[np.concatenate(([True], cap[1:] != cap[:-1]))]

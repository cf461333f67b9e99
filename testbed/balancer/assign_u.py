"""Assign-U extended (thesis §3.3.1 and App. B.1, after Awerbuch, Azar, Plotkin and Waarts,
SODA 1994), as one vectorized decision. Derivations and the default base: docs/balancer.md.

The thesis' rule, with a > 1, for VM v on host i and any other host j:

    out of equilibrium  <=>  a^(h_i+p_i) - a^(h_i)  >  2 (a^(L_j+p_j) - a^(L_j))
    marginal cost           H_j(v) = a^(L_j+p_j) - a^(L_j)

How it is computed here, and why:

* Log space. With lam = ln a, the left side is D_v = a^L_i (1 - a^-p_i) and the marginal cost is
  H_j = a^(L_j+p_j) (1 - a^-p_j), so log D = lam L_i + log1mexp(lam p_i) and
  log H = lam (L_j + p_j) + log1mexp(lam p_j), with log1mexp(x) = log(1 - e^-x) computed as
  log(-expm1(-x)). Nothing is exponentiated, so loads of several hundred percent with any base
  neither overflow nor lose the small differences that decide the rule.
* No (v, j) matrix. v is out of equilibrium with *some* j iff D_v > 2 min_{j != i} H_j(v), so
  only that minimum matters. H_j(v) = a^L_j (a^(cpu_v 100/capacity_j) - 1) grows with L_j and with
  100/capacity_j, so a host that another host beats on both (no lighter, no bigger) never holds
  the minimum: only the first Pareto layer of the hosts in (L, 100/capacity) is a candidate. The
  one subtlety is j != i when v's own host i is on that layer: the hosts that only i beats are
  at least as loaded and as small as i, so their cost is at least a^L_i (a^p_i - 1) =
  a^p_i D_v >= D_v, and such a host can neither put v out of equilibrium nor be its
  destination. Hence min over (layer minus i) gives the exact minimum for every VM that is out
  of equilibrium, and a value above D_v / 2 for every VM that is not (the verdict is exact for
  all). With equal capacities the layer is the single least-loaded host (a VM on it cannot be
  out of equilibrium); with K capacity classes it has at most K hosts; for distinct random
  capacities, O(log H). Cost O(H log H + V C) for C candidates, in VM chunks so memory stays
  O(chunk C) even at 10,000 hosts x 100,000 VMs; the destination of the one VM that moves is
  then found over all H hosts.
* Which VM moves. The thesis takes the first VM found in list order. Here the move is the
  out-of-equilibrium VM whose move to its least-cost host lowers the potential
  Phi = sum_i a^(L_i) the most (Phi drops by D_v - H_min(v) > D_v / 2 > 0), ties going to the
  lowest VM name; the destination is the least-cost host, ties to the lowest host name. Each
  decision strictly lowers Phi, so repeated decisions on static loads terminate and never
  ping-pong.
* Excluded hosts are never destinations, and equilibrium is checked only against hosts that
  could receive the VM (being "out of equilibrium" with a host that may not receive it cannot
  produce a migration).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from testbed.balancer.snapshot import Decision, Snapshot

DEFAULT_BASE = 2.0 ** (1.0 / 10.0)
"""a = 2^(1/10) ~= 1.0718: a VM moves when its host, without it, is more than log_a 2 = 10
percentage points above the destination (equal capacities). Why 10: docs/balancer.md."""

IDLE_PCT = 1.0
"""A VM using less than this share of its host (percent) is idle and never moves. As p -> 0 the
rule's two sides shrink together (D_v / H_j -> a^(L_i - L_j)), so without a floor an idle VM on a
host 10 points above another is out of equilibrium and moves, carrying no load. The thesis' LCs
read idle VMs as 0 % and its manager left them alone (§4.5); an idle TCG guest here uses ~0.4 %
of a PM, which the floor treats as the idle it is."""

LN2 = math.log(2.0)
_CHUNK_ELEMENTS = 1 << 21  # (VMs x candidate hosts) evaluated at once: ~16 MiB of float64


def log1mexp(x: np.ndarray) -> np.ndarray:
    """log(1 - e^-x) for x >= 0, accurate for tiny x and -inf at 0."""
    with np.errstate(divide="ignore"):
        return np.log(-np.expm1(-x))


def threshold_points(base: float) -> float:
    """Load gap (percentage points, equal capacities) beyond which a VM moves: log_a 2."""
    return LN2 / math.log(base)


@dataclass(frozen=True)
class AssignU:
    """The policy `assign-u`: a callable Snapshot -> Decision with its base `a`."""

    base: float = DEFAULT_BASE
    idle_pct: float = IDLE_PCT

    def __post_init__(self) -> None:
        if not (math.isfinite(self.base) and self.base > 1.0):
            raise ValueError(f"base must be a finite number greater than 1, got {self.base}")
        if not (math.isfinite(self.idle_pct) and self.idle_pct >= 0.0):
            raise ValueError(f"idle_pct must be a finite number >= 0, got {self.idle_pct}")

    @property
    def lam(self) -> float:
        return math.log(self.base)

    def log_removal_gain(self, snap: Snapshot) -> np.ndarray:
        """log D_v for every VM: what its own host's term a^L_i loses if v leaves."""
        own = snap.vm_host
        return self.lam * snap.load_pct[own] + log1mexp(self.lam * snap.vm_cpu * snap.scale[own])

    def log_cost(self, snap: Snapshot, cpu: np.ndarray, hosts: np.ndarray) -> np.ndarray:
        """log H_j(v) for cpu values broadcast against host indices."""
        x = self.lam * cpu * snap.scale[hosts]
        return self.lam * snap.load_pct[hosts] + x + log1mexp(x)

    def min_log_cost(self, snap: Snapshot) -> np.ndarray:
        """min over candidate hosts j != host(v) of log H_j(v), for every VM (+inf if none):
        the exact minimum over all eligible j != host(v) whenever v is out of equilibrium."""
        cand = candidate_hosts(snap)
        best = np.full(snap.n_vms, np.inf)
        if cand.size == 0:
            return best
        step = max(1, _CHUNK_ELEMENTS // cand.size)
        for start in range(0, snap.n_vms, step):
            part = slice(start, start + step)
            cost = self.log_cost(snap, snap.vm_cpu[part, None], cand[None, :])
            cost[snap.vm_host[part, None] == cand[None, :]] = np.inf
            best[part] = cost.min(axis=1)
        return best

    def out_of_equilibrium(self, snap: Snapshot) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(violating mask, log D, min log H) over all VMs; an idle VM never violates."""
        log_gain = self.log_removal_gain(snap)
        log_best = self.min_log_cost(snap)
        busy = snap.vm_cpu * snap.scale[snap.vm_host] >= self.idle_pct
        return busy & (log_gain > LN2 + log_best), log_gain, log_best

    def destination(self, snap: Snapshot, vm: int) -> int:
        """The least-marginal-cost eligible host other than the VM's own (lowest name on ties)."""
        hosts = np.flatnonzero(snap.eligible & (np.arange(snap.n_hosts) != snap.vm_host[vm]))
        cost = self.log_cost(snap, snap.vm_cpu[vm], hosts)
        return int(hosts[np.argmin(cost)])

    def __call__(self, snap: Snapshot) -> Decision:
        violating, log_gain, log_best = self.out_of_equilibrium(snap)
        if not violating.any():
            return Decision()
        movable = np.flatnonzero(violating)
        # log(D - H_min) = log D + log(1 - H_min/D): the potential drop, compared in log space.
        log_drop = log_gain[movable] + log1mexp(log_gain[movable] - log_best[movable])
        vm = int(movable[np.argmax(log_drop)])  # first maximum = lowest VM name
        return Decision(snap.migration(vm, self.destination(snap, vm)))


def candidate_hosts(snap: Snapshot) -> np.ndarray:
    """Eligible hosts that no other eligible host beats on both load and 100/capacity (ties:
    the lower name beats), sorted by load: the only possible least-cost destinations."""
    hosts = np.flatnonzero(snap.eligible)
    order = hosts[np.lexsort((hosts, snap.scale[hosts], snap.load_pct[hosts]))]
    scale = snap.scale[order]
    lighter_min = np.concatenate(([np.inf], np.minimum.accumulate(scale)[:-1]))
    return order[scale < lighter_min]

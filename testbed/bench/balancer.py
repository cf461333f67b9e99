"""`testbed bench balancer`: decision time of every policy, and Assign-U against the thesis'
triple loop (App. B.1, Listing B.1) run as written in plain Python.

Two snapshots of the same VMs (cpu uniform in [0.5, 4.5], ~21 % mean host load) on hosts of three
capacity classes (50, 100, 200):
* steady: VMs placed largest first on the host of least Assign-U marginal cost (Assign-U's own
  on-line placement), so nothing is out of equilibrium. The triple loop must then check every
  (v, j) pair before answering "balanced": its normal case, and its worst.
* random: VMs placed uniformly at random, so every policy has work to do (the triple loop stops at
  its first violation, which is why the ratio is taken on the steady snapshot).
The triple loop is O(V H) Python steps, hours at 10,000 x 100,000, so the ratio is measured on a
reduced snapshot with the same VMs per host (at most 200 hosts); the policies are also timed at
the full size.
"""

from __future__ import annotations

import argparse
import heapq
import math
import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy as np

from testbed.balancer import POLICIES, Snapshot, get_policy
from testbed.balancer.assign_u import DEFAULT_BASE, IDLE_PCT
from testbed.errors import InputError

CAPACITY_CLASSES = (50.0, 100.0, 200.0)
RATIO_MAX_HOSTS = 200


def triple_loop(snap: Snapshot, base: float = DEFAULT_BASE) -> tuple[str, str, str] | None:
    """The thesis' pseudo-code, literally: for each PM i, each VM v on i, each PM j != i, test the
    equilibrium inequality; at the first violation migrate v to the least-marginal-cost PM and
    stop. Idle VMs (below assign_u.IDLE_PCT of their PM) are skipped, as AssignU skips them.
    Plain Python floats, linear space (so it overflows for large loads: a reference only)."""
    hosts = snap.host_names.tolist()
    cap = dict(zip(hosts, snap.capacity.tolist()))
    load = {h: 100.0 * x / cap[h] for h, x in zip(hosts, snap.host_load.tolist())}
    receivers = [h for h, ok in zip(hosts, snap.eligible.tolist()) if ok]
    vms_of: dict[str, list[tuple[str, float]]] = {h: [] for h in hosts}
    for name, k, cpu in zip(snap.vm_names.tolist(), snap.vm_host.tolist(), snap.vm_cpu.tolist()):
        vms_of[hosts[k]].append((name, cpu))

    def cost(j: str, cpu: float) -> float:
        p = 100.0 * cpu / cap[j]
        return base ** (load[j] + p) - base ** load[j]

    for i in hosts:
        for v, cpu in vms_of[i]:
            p_i = 100.0 * cpu / cap[i]
            if p_i < IDLE_PCT:
                continue
            h_i = load[i] - p_i
            for j in receivers:
                if j != i and base ** (h_i + p_i) - base**h_i > 2.0 * cost(j, cpu):
                    destination = min((c for c in receivers if c != i), key=lambda c: cost(c, cpu))
                    return v, i, destination
    return None


def make_snapshot(hosts: int, vms: int, seed: int, steady: bool, base: float = DEFAULT_BASE) -> Snapshot:
    """The bench's snapshot (see the module docstring); `steady` picks the placement."""
    rng = np.random.default_rng(seed)
    capacity = rng.choice(CAPACITY_CLASSES, size=hosts)
    cpu = np.sort(rng.uniform(0.5, 4.5, size=vms))[::-1]
    placed = _assign_u_placement(capacity, cpu, base) if steady else rng.integers(0, hosts, size=vms)
    width = len(str(max(hosts, vms)))
    return Snapshot.create(
        capacities={f"pm{k:0{width}d}": float(c) for k, c in enumerate(capacity.tolist())},
        vms=[(f"vm{v:0{width}d}", f"pm{k:0{width}d}", float(u)) for v, (k, u) in enumerate(zip(placed, cpu))],
    )


def _assign_u_placement(capacity: np.ndarray, cpu: np.ndarray, base: float) -> np.ndarray:
    """Each VM, in the given order, to the host of least marginal cost: per capacity class a heap
    of hosts by load (a class's least-cost host is its least-loaded one); the best head wins."""
    lam = math.log(base)
    heaps: dict[float, list[tuple[float, int]]] = {c: [] for c in CAPACITY_CLASSES}
    for k, c in enumerate(capacity.tolist()):
        heaps[c].append((0.0, k))
    placed = np.empty(cpu.size, dtype=np.intp)
    for v, u in enumerate(cpu.tolist()):

        def log_cost(c: float, u: float = u) -> float:
            x = lam * 100.0 * u / c
            return lam * heaps[c][0][0] + x + math.log(-math.expm1(-x))

        best = min((c for c in CAPACITY_CLASSES if heaps[c]), key=log_cost)
        pct, k = heapq.heappop(heaps[best])
        heapq.heappush(heaps[best], (pct + 100.0 * u / best, k))
        placed[v] = k
    return placed


def median_seconds(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _describe(decision: object) -> str:
    move = getattr(decision, "migration", decision)
    if move is None:
        return "balanced"
    if isinstance(move, tuple):
        return f"{move[0]} {move[1]}->{move[2]}"
    return f"{move.vm} {move.source}->{move.destination}"


def run(args: argparse.Namespace) -> int:
    for flag, value, least in (
        ("--hosts", args.hosts, 2),
        ("--vms", args.vms, 1),
        ("--repeats", args.repeats, 1),
    ):
        if value < least:
            raise InputError(f"{flag}: must be at least {least}, got {value}")
    small_hosts = min(args.hosts, RATIO_MAX_HOSTS)
    small_vms = max(1, round(args.vms * small_hosts / args.hosts))
    steady, rand = (make_snapshot(args.hosts, args.vms, args.seed, s) for s in (True, False))
    small = make_snapshot(small_hosts, small_vms, args.seed, steady=True)
    loop_time, loop_result = median_seconds(partial(triple_loop, small), args.repeats)

    print(
        f"testbed bench balancer: median of {args.repeats} runs, seed {args.seed}, "
        f"host capacities {'/'.join(f'{c:g}' for c in CAPACITY_CLASSES)}"
    )
    print(
        f"full size {args.hosts} hosts x {args.vms} VMs (steady and random placement); "
        f"ratio size {small_hosts} hosts x {small_vms} VMs, steady (where the triple loop finishes)"
    )
    print(
        f"triple loop (thesis Listing B.1, assign-u, a={DEFAULT_BASE:.4f}) at ratio size: "
        f"{loop_time * 1e3:.1f} ms, {_describe(loop_result)}"
    )
    print(
        f"{'policy':<17}{'steady ms':>10}{'random ms':>10}  {'random-placement decision':<28}"
        f"{'ratio-size ms':>14}{'vs loop':>9}"
    )
    for name in POLICIES:
        policy = get_policy(name)
        steady_time, _ = median_seconds(partial(policy, steady), args.repeats)
        rand_time, rand_decision = median_seconds(partial(policy, rand), args.repeats)
        small_time, _ = median_seconds(partial(policy, small), args.repeats)
        ratio = f"{loop_time / small_time:>8.0f}x" if name != "none" else f"{'-':>9}"
        print(
            f"{name:<17}{steady_time * 1e3:>10.1f}{rand_time * 1e3:>10.1f}  {_describe(rand_decision):<28}"
            f"{small_time * 1e3:>14.3f}{ratio}"
        )
    return 0

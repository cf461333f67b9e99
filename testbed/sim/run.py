"""One simulated run: a scenario (PMs, VMs and their workloads, the balancer) driven to its end.

The Central Controller is mirrored on simulated time with the same rules, in the same order, as
testbed/manager/central.py: every `interval_s` it reads each PM's and VM's CPU use (or demand,
the scenario's `signal`) over the last interval, builds the balancer Snapshot in the same units as testbed.manager.snapshot (capacity
100 x CPUs, a VM's cpu = its use x 100, the PM's measured load including migration machinery),
and decides nothing while a migration is in flight (`concurrency` of them; the thesis: one) or
for one interval after one ends ("settling"); a VM moved less than `cooldown_s` ago is not moved
again. Those rules are testbed/manager/round_rule.py's, which the real CC calls too, and the
policy is testbed.balancer's, by name, so the same rule decides here and in the lab.
With concurrency > 1 the policy is asked again on the snapshot with its last move applied
(Snapshot.apply), once per free slot.

Every output says it is simulated: the run's details carry `simulated: true` and the
calibration's name.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from testbed.balancer import Policy, Snapshot
from testbed.manager import round_rule
from testbed.sim.calibration import Calibration
from testbed.sim.engine import Engine, Flight, Step

BALANCE_STDDEV = 10.0  # percentage points: the judge of "balanced" shared by every policy (Watcher's default)


@dataclass(frozen=True)
class SimVM:
    name: str
    host: int  # index into the scenario's PMs
    chains: list[list[Step]]
    vcpus: int = 2
    memory_mb: int = 100
    app: str = "synthetic1"
    start_s: float = 0.0


@dataclass
class Scenario:
    host_names: list[str]
    capacity: np.ndarray
    cores: np.ndarray
    link_bytes_s: np.ndarray
    vms: list[SimVM]
    cal: Calibration
    policy: Policy | None = None  # None: nothing decides (the CC's `paused`: it only watches)
    dry_run: bool = False  # the policy decides, nothing moves (the lab's runs without migration)
    mode: str = "precopy"
    signal: str = "use"  # what the balancer reads per VM: CPU use, or demand (testbed.manager.Signal)
    interval_s: float = 10.0
    cooldown_s: float = 60.0
    concurrency: int = 1
    horizon_s: float | None = None  # stop here even if VMs still run (benchmarks); None: when all end
    max_s: float = 7 * 24 * 3600.0
    record_cpu: bool = True  # keep per-PM and per-VM CPU samples (off for thousands of VMs: GBs of rows)
    balance_stddev: float = BALANCE_STDDEV


@dataclass
class Outcome:
    """What a simulated run produced (times in simulated seconds from its start)."""

    vm_start: np.ndarray
    vm_end: np.ndarray  # nan: unfinished at the horizon
    start_host: list[str]
    end_host: list[str]
    migrations: list[Flight]
    sample_t: list[float]
    host_pct: list[np.ndarray]  # per tick (with record_cpu), per PM: percent of its capacity
    vm_pct: list[tuple[np.ndarray, np.ndarray]]  # per tick: (percent of its PM, PM index) per VM
    rounds: dict[str, int]
    stddev: list[float]  # per tick: population std of PM load (points)
    time_to_balance_s: float | None
    sim_s: float
    wall_s: float
    events: int
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def exec_time_s(self) -> np.ndarray:
        return self.vm_end - self.vm_start

    @property
    def bytes_moved(self) -> int:
        return sum(f.plan.bytes for f in self.migrations)


class _Controller:
    """The CC's rounds on simulated time (see the module docstring)."""

    def __init__(self, sc: Scenario, engine: Engine) -> None:
        self.sc = sc
        self.engine = engine
        host_order = np.argsort(np.array(sc.host_names))
        self.rank = np.empty(len(sc.host_names), dtype=np.intp)
        self.rank[host_order] = np.arange(len(sc.host_names))
        self.host_sorted = np.array(sc.host_names)[host_order]
        names = np.array([vm.name for vm in sc.vms])
        self.vm_order = np.argsort(names)
        self.vm_sorted = names[self.vm_order]
        self.host_order = host_order
        self.last_used = engine.vm_used.copy()
        self.last_demanded = engine.vm_demanded.copy()
        self.last_over = engine.host_overhead_used.copy()
        self.last_t = engine.t
        self.migrated_at = np.full(len(sc.vms), -np.inf)
        self.settle_until = -np.inf
        self.seen_done = 0
        self.rounds: dict[str, int] = {}
        self.samples: list[tuple[float, np.ndarray, tuple[np.ndarray, np.ndarray]]] = []
        self.stddev: list[float] = []
        self.balanced_at: float | None = None

    def tick(self, engine: Engine) -> None:
        vm_cpu, host_cpu = self.sample(engine)
        if vm_cpu is not None:
            self._round(engine, vm_cpu, host_cpu)

    def sample(self, engine: Engine) -> tuple[np.ndarray | None, np.ndarray]:
        """Record CPU use since the last sample; (per-VM CPUs, per-PM CPUs) over that window as
        the balancer reads them: use, or with signal `demand` each VM's demand and each PM's
        machinery plus its VMs' demands (testbed/manager/local.py). The samples are use."""
        window = engine.t - self.last_t
        if window <= 1e-9:
            return None, np.zeros(0)
        vm_cpu = (engine.vm_used - self.last_used) / window
        vm_demand = (engine.vm_demanded - self.last_demanded) / window
        over = (engine.host_overhead_used - self.last_over) / window
        self.last_used, self.last_demanded, self.last_over, self.last_t = (
            engine.vm_used.copy(),
            engine.vm_demanded.copy(),
            engine.host_overhead_used.copy(),
            engine.t,
        )
        hosts = len(self.sc.host_names)
        host_cpu = np.bincount(engine.vm_host, weights=vm_cpu, minlength=hosts) + over
        pct = 100.0 * host_cpu / engine.capacity
        t0 = engine.t - window
        if self.sc.record_cpu:
            self.samples.append(
                (t0, pct, (100.0 * vm_cpu / engine.capacity[engine.vm_host], engine.vm_host.copy()))
            )
        spread = float(np.std(pct))
        self.stddev.append(spread)
        if self.balanced_at is None and spread <= self.sc.balance_stddev:
            self.balanced_at = engine.t
        if self.sc.signal == "demand":
            return vm_demand, np.bincount(engine.vm_host, weights=vm_demand, minlength=hosts) + over
        return vm_cpu, host_cpu

    def _note_ended(self, engine: Engine) -> None:
        """Start the cool-down and settling clocks of the migrations that ended since last time
        (at their end, as the real CC does)."""
        for f in engine.done_flights[self.seen_done :]:
            self.migrated_at[f.vm] = f.end_at
            self.settle_until = max(self.settle_until, round_rule.settle_until(f.end_at, self.sc.interval_s))
        self.seen_done = len(engine.done_flights)

    def _round(self, engine: Engine, vm_cpu: np.ndarray, host_cpu: np.ndarray) -> None:
        self._note_ended(engine)
        policy = self.sc.policy
        reason = round_rule.gate(no_lcs=False, paused=policy is None, in_flight=len(engine.flights),
                                 now=engine.t, settle_until=self.settle_until, concurrency=self.sc.concurrency)
        if reason is not None:
            return self._count(reason)
        assert policy is not None  # the gate says `paused` without one
        snap = Snapshot(
            host_names=self.host_sorted,
            capacity=100.0 * engine.capacity[self.host_order],
            host_load=100.0 * host_cpu[self.host_order],
            vm_names=self.vm_sorted,
            vm_cpu=100.0 * vm_cpu[self.vm_order],
            vm_host=self.rank[engine.vm_host[self.vm_order]],
        )
        action = "balanced"
        for _ in range(self.sc.concurrency - len(engine.flights)):
            move = policy(snap).migration
            vm = None if move is None else int(self.vm_order[snap.vm_index(move.vm)])
            this = round_rule.action(
                vm is not None, now=engine.t, cooldown=self.sc.cooldown_s, dry_run=self.sc.dry_run,
                migrated_at=-np.inf if vm is None else float(self.migrated_at[vm]),
                moving=any(f.vm == vm for f in engine.flights),
            )
            if this != "migrate":  # balanced, cooldown or dry-run: the round's first answer is its action
                action = this if action == "balanced" else action
                break
            engine.migrate(vm, int(self.host_order[snap.host_index(move.destination)]), self.sc.mode)
            self._note_ended(engine)  # a migration that took no time has ended already
            action = "migrate"
            snap = snap.apply(move)
        self._count(action)

    def _count(self, action: str) -> None:
        self.rounds[action] = self.rounds.get(action, 0) + 1


def build_engine(sc: Scenario) -> Engine:
    engine = Engine(sc.host_names, sc.capacity, sc.cores, sc.link_bytes_s, sc.cal, tick_s=sc.interval_s)
    engine.add_vms(
        [vm.name for vm in sc.vms],
        np.array([vm.host for vm in sc.vms], dtype=np.intp),
        np.array([vm.vcpus for vm in sc.vms]),
        np.array([vm.memory_mb for vm in sc.vms]),
        np.array([sc.cal.dirty_bytes_s(vm.app) for vm in sc.vms]),
    )
    owners = [k for k, vm in enumerate(sc.vms) for _ in vm.chains]
    chains = [chain for vm in sc.vms for chain in vm.chains]
    delays = [vm.start_s for vm in sc.vms for _ in vm.chains]
    if chains:
        engine.add_chains(owners, chains, delays)
    return engine


def simulate(sc: Scenario) -> Outcome:
    """Run the scenario to its end (every VM done and no migration in flight) or its horizon."""
    began = time.perf_counter()
    engine = build_engine(sc)
    cc = _Controller(sc, engine)
    engine.on_tick = cc.tick
    until = sc.horizon_s if sc.horizon_s is not None else sc.max_s
    engine.advance(until, stop=None if sc.horizon_s is not None else Engine.all_done)
    cc.sample(engine)  # the last, partial interval: the samples then account for all the work
    vm_start = np.array([vm.start_s for vm in sc.vms], dtype=float)
    ends = np.full(len(sc.vms), -np.inf)
    np.maximum.at(ends, engine.chain_vm, np.nan_to_num(engine.chain_end, nan=np.inf))
    vm_end = np.where(np.isfinite(ends), ends, np.nan)
    return Outcome(
        vm_start=vm_start,
        vm_end=vm_end,
        start_host=[sc.host_names[vm.host] for vm in sc.vms],
        end_host=[sc.host_names[h] for h in engine.vm_host],
        migrations=list(engine.done_flights) + list(engine.flights),
        sample_t=[s[0] for s in cc.samples],
        host_pct=[s[1] for s in cc.samples],
        vm_pct=[s[2] for s in cc.samples],
        rounds=cc.rounds,
        stddev=cc.stddev,
        time_to_balance_s=cc.balanced_at,
        sim_s=engine.t,
        wall_s=time.perf_counter() - began,
        events=engine.events,
    )

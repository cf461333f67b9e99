"""The simulator's core: PMs, VMs, workloads and migrations on simulated time, vectorized with numpy.

A fluid discrete-event model. Between two events every rate is constant, so the engine jumps
from event to event: a workload step ends (its CPU work is done, or its sleep is over), a
migration changes phase (stop, resume at the destination, end), or a tick (CPU sampling and the
Central Controller's round, every `interval_s`). Nothing is approximated by a time step.

CPU, as on the embedded lab (DESIGN.md): a PM has `capacity` CPUs and stands for `cores` cores;
a VM with k vCPUs is capped at k / cores x capacity; a workload thread uses at most one core
(`thread_cpus`). The PM's capacity is shared max-min fairly among its VMs (CFS between sibling
cgroups: each gets an equal share, a VM wanting less than its share gives the rest to the
others), and a VM's share equally among its running threads. A share s does the work of
s x s / (s + contention_cpus) CPUs: a squeezed VM runs in short slices, each starting with caches
(TCG's translated code, TLBs) its neighbours evicted, a cost per slice while the slice shrinks with
the share; so crowded VMs progress less than in proportion, as measured on the lab (calibrate.py). A migration takes
`cpu_overhead_src` / `cpu_overhead_dst` CPUs off its source and destination PMs first (the
migration machinery lives in the PMs' cgroups, thesis §4.5). A stopped VM (migration downtime)
uses nothing and progresses nothing while wall time runs, so downtime lengthens its execution
time exactly as in the lab.

The hot path (every event) is O(V log V + C) numpy work on arrays of VMs (V) and workload chains
(C); migrations in flight are a short Python list.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from testbed.sim.calibration import Calibration
from testbed.sim.migration import Plan, plan

EPS = 1e-9


@dataclass(frozen=True)
class Step:
    """One step of a workload chain: `threads` threads each doing `amount` CPU-seconds of work
    at once (the step ends when all have), or a sleep of `amount` seconds when threads is 0."""

    threads: int
    amount: float


@dataclass
class Flight:
    """A migration in progress (or done: `ended`)."""

    vm: int
    source: int
    destination: int
    start: float
    plan: Plan
    ended: bool = False
    stopped: bool = False
    resumed: bool = False

    @property
    def stop_at(self) -> float:
        return self.start + self.plan.live_s

    @property
    def resume_at(self) -> float:
        return self.stop_at + self.plan.downtime_s

    @property
    def end_at(self) -> float:
        return self.start + self.plan.total_s

    def next_event(self) -> float:
        if not self.stopped:
            return self.stop_at
        return self.resume_at if not self.resumed else self.end_at


def water_fill(demand: np.ndarray, group: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Max-min fair shares: each group (PM) splits its capacity among its members (VMs), none
    getting more than its demand. Vectorized: members sorted by (group, demand); the first member
    whose demand exceeds (capacity - demands before it) / (members from it on) sets the group's
    level, and every member gets min(demand, level)."""
    n = demand.shape[0]
    if n == 0:
        return demand.copy()
    order = np.lexsort((demand, group))
    d, g = demand[order], group[order]
    counts = np.bincount(g, minlength=capacity.shape[0])
    starts = np.cumsum(counts) - counts
    pos = np.arange(n) - starts[g]
    before = np.cumsum(d) - d
    before = before - before[starts[g]]
    candidate = (capacity[g] - before) / (counts[g] - pos)
    first = np.full(capacity.shape[0], n, dtype=np.intp)
    saturated = np.flatnonzero(d > candidate)
    np.minimum.at(first, g[saturated], saturated)
    level = np.full(capacity.shape[0], np.inf)
    has = first < n
    level[has] = candidate[first[has]]
    out = np.empty(n)
    out[order] = np.minimum(d, level[g])
    return out


@dataclass
class Engine:
    """The simulated cluster. Build it, add VMs and chains, then `advance` time."""

    host_names: list[str]
    capacity: np.ndarray  # CPUs per PM
    cores: np.ndarray  # cores each PM stands for
    link_bytes_s: np.ndarray  # nominal link rate per PM
    cal: Calibration
    t: float = 0.0
    vm_names: list[str] = field(default_factory=list)
    on_tick: Callable[[Engine], None] | None = None
    tick_s: float = math.inf

    def __post_init__(self) -> None:
        h = len(self.host_names)
        self.capacity = np.asarray(self.capacity, dtype=float).reshape(h)
        self.cores = np.asarray(self.cores, dtype=float).reshape(h)
        self.link_bytes_s = np.asarray(self.link_bytes_s, dtype=float).reshape(h)
        self.host_index = {name: k for k, name in enumerate(self.host_names)}
        self.vm_index: dict[str, int] = {}
        self.vm_host = np.zeros(0, dtype=np.intp)
        self.vm_vcpus = np.zeros(0)
        self.vm_memory = np.zeros(0)  # bytes
        self.vm_dirty = np.zeros(0)  # bytes per second while the VM runs
        self.vm_alive = np.zeros(0, dtype=bool)
        self.vm_stopped = np.zeros(0, dtype=bool)
        self.vm_speed = np.zeros(0)  # progress per CPU (post-copy faults slow it)
        self.vm_used = np.zeros(0)  # CPU-seconds used since the start
        self.vm_demanded = np.zeros(0)  # CPU-seconds demanded (used or runnable, within its cap)
        self.host_overhead_used = np.zeros(h)  # CPU-seconds of migration machinery
        self.chain_vm = np.zeros(0, dtype=np.intp)
        self.chain_threads = np.zeros((0, 1), dtype=np.intp)
        self.chain_amount = np.zeros((0, 1))
        self.chain_len = np.zeros(0, dtype=np.intp)
        self.chain_idx = np.zeros(0, dtype=np.intp)
        self.chain_cur = np.zeros(0, dtype=np.intp)  # threads running now (0: sleeping or done)
        self.chain_rem = np.zeros(0)  # CPU-seconds left per thread of the current step
        self.chain_wake = np.zeros(0)  # end of the current sleep (inf otherwise)
        self.chain_start = np.zeros(0)
        self.chain_end = np.zeros(0)  # nan until done
        self.flights: list[Flight] = []
        self.done_flights: list[Flight] = []
        self.next_tick = self.tick_s
        self.events = 0

    # -- building -------------------------------------------------------------------------

    def add_vms(
        self,
        names: list[str],
        hosts: np.ndarray,
        vcpus: np.ndarray,
        memory_mb: np.ndarray,
        dirty_bytes_s: np.ndarray,
    ) -> None:
        for k, name in enumerate(names, start=len(self.vm_names)):
            if name in self.vm_index:
                raise ValueError(f"VM {name} exists already")
            self.vm_index[name] = k
        self.vm_names += names
        n = len(names)
        self.vm_host = np.concatenate([self.vm_host, np.asarray(hosts, dtype=np.intp)])
        self.vm_vcpus = np.concatenate([self.vm_vcpus, np.asarray(vcpus, dtype=float)])
        self.vm_memory = np.concatenate([self.vm_memory, np.asarray(memory_mb, dtype=float) * 1e6])
        self.vm_dirty = np.concatenate([self.vm_dirty, np.asarray(dirty_bytes_s, dtype=float)])
        self.vm_alive = np.concatenate([self.vm_alive, np.ones(n, dtype=bool)])
        self.vm_stopped = np.concatenate([self.vm_stopped, np.zeros(n, dtype=bool)])
        self.vm_speed = np.concatenate([self.vm_speed, np.ones(n)])
        self.vm_used = np.concatenate([self.vm_used, np.zeros(n)])
        self.vm_demanded = np.concatenate([self.vm_demanded, np.zeros(n)])

    def add_chains(self, vms: list[int], chains: list[list[Step]], delays: list[float]) -> np.ndarray:
        """Start workload chains (a chain's steps run one after another) after their delays;
        returns their indices."""
        width = max([self.chain_threads.shape[1], *(len(c) for c in chains)])
        n = len(chains)
        threads = np.zeros((n, width), dtype=np.intp)
        amount = np.zeros((n, width))
        for k, chain in enumerate(chains):
            threads[k, : len(chain)] = [s.threads for s in chain]
            amount[k, : len(chain)] = [s.amount for s in chain]
        pad = width - self.chain_threads.shape[1]
        self.chain_threads = np.vstack([np.pad(self.chain_threads, ((0, 0), (0, pad))), threads])
        self.chain_amount = np.vstack([np.pad(self.chain_amount, ((0, 0), (0, pad))), amount])
        first = self.chain_vm.shape[0]
        delays_arr = np.asarray(delays, dtype=float)
        self.chain_vm = np.concatenate([self.chain_vm, np.asarray(vms, dtype=np.intp)])
        self.chain_len = np.concatenate([self.chain_len, [len(c) for c in chains]]).astype(np.intp)
        self.chain_idx = np.concatenate([self.chain_idx, np.full(n, -1, dtype=np.intp)])
        self.chain_cur = np.concatenate([self.chain_cur, np.zeros(n, dtype=np.intp)])
        self.chain_rem = np.concatenate([self.chain_rem, np.zeros(n)])
        self.chain_wake = np.concatenate([self.chain_wake, self.t + delays_arr])
        self.chain_start = np.concatenate([self.chain_start, self.t + delays_arr])
        self.chain_end = np.concatenate([self.chain_end, np.full(n, np.nan)])
        new = np.arange(first, first + n)
        self._wake(new[delays_arr <= 0])
        return new

    def destroy(self, vm: int) -> None:
        """The VM is gone: its chains stop (unfinished), it uses nothing."""
        self.vm_alive[vm] = False
        mine = (self.chain_vm == vm) & np.isnan(self.chain_end)
        self.chain_cur[mine] = 0
        self.chain_wake[mine] = np.inf

    # -- CPU --------------------------------------------------------------------------------

    def overhead(self) -> np.ndarray:
        """CPUs the migrations in flight take on each PM now."""
        over = np.zeros(len(self.host_names))
        for f in self.flights:
            over[f.source] += self.cal.cpu_overhead_src
            over[f.destination] += self.cal.cpu_overhead_dst
        return np.minimum(over, self.capacity)

    def allocation(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(CPUs per VM, CPUs of migration machinery per PM, progress per thread of each VM, CPUs
        each VM demands: its running threads' wish within its cap, what the LC's `demand` reads)."""
        n_vms = len(self.vm_names)
        running = self.chain_cur > 0
        threads = np.bincount(self.chain_vm[running], weights=self.chain_cur[running], minlength=n_vms)
        host = self.vm_host
        cap_vm = self.vm_vcpus / self.cores[host] * self.capacity[host]
        demand = np.minimum(threads * self.cal.thread_cpus, cap_vm)
        demand[self.vm_stopped | ~self.vm_alive] = 0.0
        over = self.overhead()
        alloc = water_fill(demand, host, self.capacity - over)
        c = self.cal.contention_cpus
        with np.errstate(divide="ignore", invalid="ignore"):
            useful = alloc * alloc / (alloc + c) if c > 0 else alloc
            per_thread = np.where(threads > 0, useful * self.vm_speed / threads, 0.0)
        return alloc, over, per_thread, demand

    # -- time ---------------------------------------------------------------------------------

    def advance(self, until: float, stop: Callable[[Engine], bool] | None = None) -> None:
        """Run events until simulated time `until` (or until `stop(engine)` holds after an event)."""
        while self.t < until - EPS:
            alloc, over, per_thread, demand = self.allocation()
            rate = per_thread[self.chain_vm]
            busy = (self.chain_cur > 0) & (rate > 0)
            to_finish = np.full(self.chain_rem.shape, np.inf)
            to_finish[busy] = self.chain_rem[busy] / rate[busy]
            t_next = min(
                until,
                self.next_tick,
                float(to_finish.min(initial=np.inf)) + self.t,
                float(self.chain_wake.min(initial=np.inf)),
                min((f.next_event() for f in self.flights), default=np.inf),
            )
            dt = max(t_next - self.t, 0.0)
            self.chain_rem[busy] -= rate[busy] * dt
            self.vm_used += alloc * dt
            self.vm_demanded += demand * dt
            self.host_overhead_used += over * dt
            self.t = t_next
            self.events += 1
            finished = np.flatnonzero(busy & (to_finish <= dt * (1 + 1e-12) + EPS))
            self.chain_rem[finished] = 0.0
            self._next_step(finished)
            self._wake(np.flatnonzero(self.chain_wake <= self.t + EPS))
            self._flight_events()
            if self.t >= self.next_tick - EPS:
                self.next_tick += self.tick_s
                if self.on_tick is not None:
                    self.on_tick(self)
            if stop is not None and stop(self):
                return

    def _wake(self, chains: np.ndarray) -> None:
        self.chain_wake[chains] = np.inf
        self._next_step(chains)

    def _next_step(self, chains: np.ndarray) -> None:
        """Move chains to their next step (zero-length steps are passed at once)."""
        for c in chains.tolist():
            while True:
                k = self.chain_idx[c] = self.chain_idx[c] + 1
                if k >= self.chain_len[c]:
                    self.chain_cur[c] = 0
                    self.chain_end[c] = self.t
                    break
                threads, amount = int(self.chain_threads[c, k]), float(self.chain_amount[c, k])
                if threads > 0 and amount > 0:
                    self.chain_cur[c], self.chain_rem[c] = threads, amount
                    break
                if threads == 0 and amount > 0:
                    self.chain_cur[c], self.chain_wake[c] = 0, self.t + amount
                    break

    # -- migration ------------------------------------------------------------------------------

    def migrate(self, vm: int, destination: int, mode: str) -> Flight:
        """Start moving `vm`; the link rate is the slower end's, shared with the migrations already
        leaving the source or entering the destination."""
        source = int(self.vm_host[vm])
        if source == destination:
            raise ValueError(f"{self.vm_names[vm]} is already on {self.host_names[destination]}")
        if any(f.vm == vm for f in self.flights):
            raise ValueError(f"{self.vm_names[vm]} is migrating already")
        sharing = 1 + sum(f.source == source or f.destination == destination for f in self.flights)
        rate = (
            min(self.link_bytes_s[source], self.link_bytes_s[destination])
            * self.cal.link_efficiency
            / sharing
        )
        flight = Flight(
            vm, source, destination, self.t, plan(mode, self.vm_memory[vm], self.vm_dirty[vm], rate, self.cal)
        )
        self.flights.append(flight)
        self._flight_events()
        return flight

    def _flight_events(self) -> None:
        for f in list(self.flights):
            if not f.stopped and self.t >= f.stop_at - EPS:
                f.stopped = True
                self.vm_stopped[f.vm] = True
            if f.stopped and not f.resumed and self.t >= f.resume_at - EPS:
                f.resumed = True
                self.vm_stopped[f.vm] = False
                self.vm_host[f.vm] = f.destination
                if f.plan.mode == "postcopy":
                    self.vm_speed[f.vm] = self.cal.postcopy_speed
            if f.resumed and self.t >= f.end_at - EPS:
                f.ended = True
                self.vm_speed[f.vm] = 1.0
                self.flights.remove(f)
                self.done_flights.append(f)

    # -- questions --------------------------------------------------------------------------------

    def vm_done(self) -> np.ndarray:
        """VMs all of whose chains have ended (VMs without chains count as done)."""
        pending = np.bincount(self.chain_vm, weights=np.isnan(self.chain_end), minlength=len(self.vm_names))
        return pending == 0

    def all_done(self) -> bool:
        return bool(np.all(~np.isnan(self.chain_end))) and not self.flights

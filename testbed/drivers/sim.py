"""Technique `sim`: the Driver protocol over the simulator (testbed/sim), on simulated time.

Every call that waits advances the one simulated clock instead of sleeping: `cpu_use(10)`
simulates 10 s and reports what the PMs and VMs used in them, `wait_workload` runs until the
workload ends (or its timeout passes), `migrate` runs until the migration ends, exactly as a
real driver blocks. Host-clock times in the records are `origin` + simulated seconds. Guest
programs are the lab's: `synthetic1 BLOCKS` (one thread, BLOCKS x the calibration's CPU work
per block) and `sleep S`.

The clock is shared, so the driver serves one caller at a time (a lock serializes calls): it
fits code that drives VMs in turn (tests, benchmarks, a scripted scenario). Whole campaigns use
testbed.sim.executor.SimExecutor, which runs the Central Controller's rules inside the event
loop. Every record says simulated (`details["simulated"]`).
"""

from __future__ import annotations

import itertools
import math
import threading
import time

import numpy as np

from testbed.drivers.base import (
    CpuUse,
    Host,
    MigrationMode,
    MigrationOrder,
    MigrationRecord,
    VMInfo,
    VMSpec,
    WorkloadRun,
)
from testbed.lab import parse_rate
from testbed.sim.calibration import Calibration
from testbed.sim.engine import Engine, Step


class SimDriver:
    technique = "sim"

    def __init__(
        self,
        hosts: list[Host],
        cal: Calibration | None = None,
        link_rate: str = "100mbit",
        origin: float | None = None,
    ) -> None:
        self.cal = cal or Calibration()
        self._hosts = list(hosts)
        self.origin = time.time() if origin is None else origin
        self.engine = Engine(
            [h.name for h in hosts],
            np.array([h.capacity for h in hosts]),
            np.array([h.cores for h in hosts]),
            np.full(len(hosts), parse_rate(link_rate) / 8.0),
            self.cal,
        )
        self._current: dict[str, tuple[int, VMSpec]] = {}  # VM name -> engine index (a new one per creation)
        self._workloads: dict[tuple[str, str], tuple[int, WorkloadRun]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._last_used = np.zeros(0)
        self._last_over = np.zeros(len(hosts))

    # -- the protocol ------------------------------------------------------------------------------

    def hosts(self) -> list[Host]:
        return list(self._hosts)

    def list_vms(self) -> list[VMInfo]:
        with self._lock:
            return [
                VMInfo(name, self.engine.host_names[self.engine.vm_host[k]], spec, True)
                for name, (k, spec) in self._current.items()
            ]

    def cpu_use(self, interval_s: float) -> CpuUse:
        with self._lock:
            self._sync_used()
            before, over_before = self._last_used.copy(), self.engine.host_overhead_used.copy()
            self.engine.advance(self.engine.t + interval_s)
            used = (self.engine.vm_used - before) / interval_s
            over = (self.engine.host_overhead_used - over_before) / interval_s
            self._last_used = self.engine.vm_used.copy()
            cap = self.engine.capacity
            host_cpu = np.bincount(self.engine.vm_host, weights=used, minlength=cap.shape[0]) + over
            return CpuUse(
                interval_s,
                {n: float(100 * host_cpu[i] / cap[i]) for i, n in enumerate(self.engine.host_names)},
                {
                    name: float(100 * used[k] / cap[self.engine.vm_host[k]])
                    for name, (k, _) in self._current.items()
                },
            )

    def create_vm(self, spec: VMSpec, host: str) -> VMInfo:
        with self._lock:
            if spec.name in self._current:
                raise ValueError(f"VM {spec.name} exists already")
            if host not in self.engine.host_index:
                raise ValueError(f"no PM named {host}")
            generation = sum(n.split("#")[0] == spec.name for n in self.engine.vm_names)
            self.engine.add_vms(
                [f"{spec.name}#{generation}"],
                np.array([self.engine.host_index[host]]),
                np.array([spec.vcpus]),
                np.array([spec.memory_mb]),
                np.array([0.0]),
            )
            self._current[spec.name] = (len(self.engine.vm_names) - 1, spec)
            self._sync_used()
            return VMInfo(spec.name, host, spec, True)

    def destroy_vm(self, vm: str) -> None:
        with self._lock:
            entry = self._current.pop(vm, None)
            if entry is not None:
                self.engine.destroy(entry[0])

    def start_workload(self, vm: str, argv: list[str]) -> WorkloadRun:
        with self._lock:
            k = self._vm(vm)
            step = self._step(argv)
            if step.threads:
                self.engine.vm_dirty[k] = max(self.engine.vm_dirty[k], self.cal.dirty_bytes_s("synthetic1"))
            chain = int(self.engine.add_chains([k], [[step]], [0.0])[0])
            run = WorkloadRun(vm, f"w{next(self._ids)}", tuple(argv), start=self.origin + self.engine.t)
            self._workloads[(vm, run.id)] = (chain, run)
            return self._refresh(vm, run.id)

    def workload(self, vm: str, workload_id: str) -> WorkloadRun:
        with self._lock:
            return self._refresh(vm, workload_id)

    def wait_workload(self, vm: str, workload_id: str, timeout_s: float) -> WorkloadRun:
        with self._lock:
            chain, _ = self._workload(vm, workload_id)
            self.engine.advance(self.engine.t + timeout_s, stop=lambda e: not math.isnan(e.chain_end[chain]))
            return self._refresh(vm, workload_id)

    def migrate(self, vm: str, destination: str, mode: MigrationMode, *,
                compression: str | None = None) -> MigrationRecord:
        """`compression` is accepted and not modelled (the catalogue's sim entry)."""
        with self._lock:
            k = self._vm(vm)
            source = self.engine.host_names[self.engine.vm_host[k]]
            order = MigrationOrder(vm, source, destination, MigrationMode(mode), self.origin + self.engine.t)
            try:
                flight = self.engine.migrate(k, self.engine.host_index[destination], str(mode))
            except (KeyError, ValueError) as err:
                return order.record(0.0, error=str(err), details={"simulated": True})
            self.engine.advance(math.inf, stop=lambda e: flight.ended)
            p = flight.plan
            phases = {
                "live": p.live_s,
                "stopped": p.downtime_s,
                "after_resume": p.total_s - p.live_s - p.downtime_s,
            }
            return order.record(p.total_s, downtime_s=p.downtime_s, bytes_sent=p.bytes, rounds=p.rounds,
                                phases=phases, details={"simulated": True})

    # -- helpers --------------------------------------------------------------------------------------

    def _sync_used(self) -> None:
        """Grow the last-sample array with VMs created since (their use starts at zero)."""
        grow = self.engine.vm_used.shape[0] - self._last_used.shape[0]
        if grow > 0:
            self._last_used = np.concatenate([self._last_used, self.engine.vm_used[-grow:]])

    def _vm(self, vm: str) -> int:
        try:
            return self._current[vm][0]
        except KeyError:
            raise ValueError(f"no VM named {vm}") from None

    def _workload(self, vm: str, workload_id: str) -> tuple[int, WorkloadRun]:
        try:
            return self._workloads[(vm, workload_id)]
        except KeyError:
            raise ValueError(f"no workload {workload_id} in {vm}") from None

    def _refresh(self, vm: str, workload_id: str) -> WorkloadRun:
        chain, run = self._workload(vm, workload_id)
        end = self.engine.chain_end[chain]
        if not math.isnan(end) and run.end is None:
            run.end, run.exit_status = self.origin + float(end), 0
            run.output.append((run.end, "done"))
        return run

    def _step(self, argv: list[str]) -> Step:
        """The lab's guest programs: `synthetic1 BLOCKS [REPORT_EVERY]` and `sleep SECONDS`."""
        if len(argv) >= 2 and argv[0] == "synthetic1" and argv[1].isdigit():
            return Step(1, int(argv[1]) * self.cal.cpu_s_per_block)
        if len(argv) == 2 and argv[0] == "sleep":
            return Step(0, float(argv[1]))
        raise ValueError(f"the simulator runs `synthetic1 BLOCKS` and `sleep S`, not {argv!r}")

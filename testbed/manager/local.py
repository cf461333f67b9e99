"""The Local Controller (LC): one per PM. Samples the PM's and its VMs' CPU through a Sampler
(testbed.manager.sampler: the embedded lab's cgroups, or a real PM's /proc/stat and its
technique's tools), answers the CC's collections, and executes the migrations it orders
with the driver of the VM's technique: it holds one driver per technique and takes the one that
lists the VM running on its PM (`DriverDispatch`), so one LC serves QEMU VMs and containers.

demand = min(use + wait, limit): a VM's wait is the time its threads were runnable but not
running, where the sampler can tell (the embedded lab's cgroups).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence

from fastapi import FastAPI, HTTPException, Query

from testbed.drivers.base import Driver, Host, MigrationMode, MigrationRecord
from testbed.lab import Lab
from testbed.manager.api import MAX_WINDOW, HostSample, MigrateOrder, MigrationOutcome, VmSample, make_app
from testbed.manager.sampler import NS_PER_S, Reading, Sampler

STALE_PERIODS = 5  # no reading for this many periods: the LC says so (503) instead of answering


def summarize(host: str, capacity: float, readings: Sequence[Reading], window: float) -> HostSample:
    """Percent-of-capacity figures over the last `window` seconds of `readings` (oldest first):
    from the newest reading at least `window` old (or the oldest there is) to the newest.

    Each VM is measured from the oldest reading in the window that already had it, so a VM
    that just arrived is measured over the time it has been here. A PM that counts its total CPU
    time (a real PM's /proc/stat) is measured as busy over total, so the kernel's own tick
    accounting, not the LC's clock, decides what 100 % is."""
    new = readings[-1]
    start = max((k for k, r in enumerate(readings) if r.t <= new.t - window), default=0)
    inside = readings[start:]
    old = inside[0]
    elapsed = new.t - old.t

    def percent(ns: float, seconds: float) -> float:
        return 0.0 if seconds <= 0 else 100.0 * ns / (seconds * NS_PER_S * capacity)

    vms = []
    for name, now in new.vms.items():
        then = next(r for r in inside if name in r.vms)
        seconds = new.t - then.t
        before = then.vms[name]
        used = max(now.usage_ns - before.usage_ns, 0)
        waited = sum(max(delay - before.run_delay_ns.get(tid, 0), 0)
                     for tid, delay in now.run_delay_ns.items())
        limit_cpus = capacity if now.limit_cpus is None else now.limit_cpus
        demand = max(used, min(used + waited, seconds * NS_PER_S * limit_cpus))
        vms.append(VmSample(name=name, use=percent(used, seconds), demand=percent(demand, seconds),
                            limit=100.0 * limit_cpus / capacity,
                            throttled=max(now.throttled_ns - before.throttled_ns, 0) / NS_PER_S))
    vm_use = sum(vm.use for vm in vms)
    busy = max(new.host_usage_ns - old.host_usage_ns, 0)
    if new.pm_is_its_vms:  # PMs sharing one kernel: /proc/stat is the machine's, not this PM's
        use = vm_use
    elif new.host_total_ns is not None and old.host_total_ns is not None and new.host_total_ns > old.host_total_ns:
        # at most 100 %: the kernel may step a CPU's iowait back (proc(5)), never its busy fields
        use = 100.0 * min(busy / (new.host_total_ns - old.host_total_ns), 1.0)
    else:
        use = percent(busy, elapsed)
    demand = max(use - vm_use, 0.0) + sum(vm.demand for vm in vms)
    return HostSample(host=host, t=new.wall, window=elapsed, capacity=capacity,
                      use=use, demand=demand, vms=vms)


def lab_driver_hosts(lab: Lab) -> dict[str, Host]:
    """The lab's PMs as drivers see them (on the embedded lab each is a namespace of its name)."""
    return {pm.name: Host(pm.name, pm.address, pm.capacity, pm.cores, netns=pm.name if lab.embedded else None)
            for pm in lab.pms}


Migrate = Callable[[str, str, str, str | None], MigrationRecord]
"""How an LC executes a migration: (vm, destination host, mode, compression) -> MigrationRecord; in the
daemon, a DriverDispatch over every technique's driver (testbed.drivers.base.Driver)."""

class DriverDispatch:
    """The LC's Migrate: the order goes to the driver that lists the VM running on this PM.

    Why the LC finds the technique itself rather than being told (by its own flag or by the
    CC's config): the drivers already know it from their state (one identity for a VM
    everywhere, thesis §3.2), so nothing can name the wrong one; one set of daemons serves a lab
    whatever technique a campaign runs, without a restart between techniques; and the order's
    mode and compression are passed on unchanged, so one the technique lacks (a pre-copy order
    for a container, bzip2 for QEMU) fails with the driver's reason instead of being swapped for
    another, which would mislabel the run. The runner sets both per run (the technique's own
    mode and no compression by default)."""

    def __init__(self, drivers: Mapping[str, Driver], host: str) -> None:
        self.drivers = dict(drivers)
        self.host = host

    def driver_for(self, vm: str) -> Driver:
        """The one driver that has `vm` running on this PM; LookupError if none or several."""
        holders = [technique for technique, driver in self.drivers.items()
                   if any(info.name == vm and info.host == self.host and info.running for info in driver.list_vms())]
        if len(holders) != 1:
            found = f"the {' and '.join(holders)} drivers" if holders else "no driver"
            raise LookupError(f"{self.host}: {found} of {', '.join(self.drivers)} list {vm} running here")
        return self.drivers[holders[0]]

    def __call__(self, vm: str, destination: str, mode: str, compression: str | None = None) -> MigrationRecord:
        return self.driver_for(vm).migrate(vm, destination, MigrationMode(mode), compression=compression)


class LocalController:
    def __init__(self, sampler: Sampler, migrate: Migrate | None, period: float = 1.0) -> None:
        self.sampler = sampler
        self.host = sampler.host
        self.period = period
        self._migrate = migrate
        self._readings: deque[Reading] = deque(maxlen=int(MAX_WINDOW / period) + 2)
        self._readings.append(sampler.read())
        self._migrating = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: str | None = None

    def start(self) -> None:
        """Sample every `period` in the background until `stop()`."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample_forever, name=f"lc-{self.host}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _sample_forever(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self._readings.append(self.sampler.read())
                self._error = None
            except OSError as err:  # the PM's cgroup is gone (lab torn down): answer 503, not stale data
                self._error = f"{type(err).__name__}: {err}"

    def sample(self, window: float) -> HostSample:
        readings = list(self._readings)
        if time.monotonic() - readings[-1].t > STALE_PERIODS * self.period:
            raise HTTPException(status_code=503, detail=f"{self.host}: sampling stalled: {self._error}")
        return summarize(self.host, self.sampler.capacity, readings, window)

    def migrate(self, order: MigrateOrder) -> MigrationOutcome:
        """Run one migration (one at a time per LC); a failure is an answer, not an error."""
        if self._migrate is None:
            raise HTTPException(status_code=501, detail=f"{self.host}: no driver to migrate with")
        if order.source not in (None, self.host):
            raise HTTPException(status_code=409, detail=f"{self.host}: order is for source {order.source}")
        if order.vm not in self.sampler.vm_names():
            raise HTTPException(status_code=404, detail=f"{self.host}: no VM named {order.vm}")
        if not self._migrating.acquire(blocking=False):
            raise HTTPException(status_code=409, detail=f"{self.host}: a migration is in flight")
        outcome = MigrationOutcome(vm=order.vm, source=self.host, dest=order.dest, ok=False)
        try:
            record = self._migrate(order.vm, order.dest, order.mode, order.compression)
            outcome.record = record.as_dict()
            outcome.ok, outcome.error = record.status == "completed", record.error
        except Exception as err:  # noqa: BLE001 - any driver failure is reported to the CC with its reason
            outcome.error = f"{type(err).__name__}: {err}"
        finally:
            self._migrating.release()
        return outcome


def create_app(lc: LocalController, token: str) -> FastAPI:
    app = make_app(f"testbed Local Controller ({lc.host})", token, lc.start, lc.stop)

    @app.get("/v1/sample", response_model=HostSample)
    def sample(window: float = Query(10.0, gt=0, le=MAX_WINDOW)) -> HostSample:
        """PM and VM CPU over the last `window` seconds."""
        return lc.sample(window)

    @app.post("/v1/migrate", response_model=MigrationOutcome)
    def migrate(order: MigrateOrder) -> MigrationOutcome:
        """Migrate a VM of this PM to `dest`; blocks until the driver is done."""
        return lc.migrate(order)

    return app

"""The Local Controller (LC): one per PM. Samples the PM's and its VMs' CPU from the cgroups of
the embedded-lab contract, answers the CC's collections, and executes the migrations it orders
with the driver of the VM's technique: it holds one driver per technique and takes the one that
lists the VM running on its PM (`DriverDispatch`), so one LC serves QEMU VMs and containers.

Where the numbers come from (cgroup v1, the lab contract):
- PM use: cpuacct.usage of testbed/<pm>, which holds everything running "on" the PM, VMs and
  migration machinery alike; capacity: cpu.cfs_quota_us / cpu.cfs_period_us of that cgroup.
- VM use: cpuacct.usage of the nested testbed/<pm>/<vm>; its limit is that cgroup's quota.
- VM wait: the run_delay (ns spent runnable but not running, /proc/TID/schedstat) of every
  thread in the VM's cgroup, which includes time throttled by a CFS quota; cpu.stat's
  throttled_time is reported beside it. demand = min(use + wait, limit).
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, HTTPException, Query

from testbed.drivers.base import CGROUP_ROOT, Driver, Host, MigrationMode, MigrationRecord
from testbed.lab import CGROUP_CONTROLLERS, Lab
from testbed.manager.api import MAX_WINDOW, HostSample, MigrateOrder, MigrationOutcome, VmSample, make_app

NS_PER_S = 1_000_000_000
STALE_PERIODS = 5  # no reading for this many periods: the LC says so (503) instead of answering

_CLONE_NEWNS = 0x00020000
_MS_REC = 0x4000
_MS_SLAVE = 0x80000


def ensure_cgroupfs(root: Path = CGROUP_ROOT) -> bool:
    """Make the lab's cgroup hierarchies visible to this process; True if it had to mount.

    `ip netns exec` (how the PM's sshd, and so everything started "on" the PM, entered its
    namespace) remounts /sys, which hides /sys/fs/cgroup, and /proc/1/root is not readable
    here. Mounting cgroup v1 again is allowed, so the LC takes a private mount namespace (no
    other process of the PM sees the change) and mounts the hierarchies of the lab contract:
    cpu and cpuacct to read, all four for the driver to start QEMU in a PM's cgroups. Must run
    before any thread starts: unshare(CLONE_NEWNS) is refused to a threaded process."""
    if (root / "cpuacct" / "cpuacct.usage").exists():
        return False
    libc = ctypes.CDLL(None, use_errno=True)

    def check(result: int, what: str) -> None:
        if result != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"{what}: {os.strerror(errno)}")

    check(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    check(libc.mount(b"none", b"/", None, _MS_REC | _MS_SLAVE, None), "make / a slave mount")
    check(libc.mount(b"tmpfs", bytes(root), b"tmpfs", 0, b"mode=755"), f"mount tmpfs on {root}")
    for controller in CGROUP_CONTROLLERS:
        target = root / controller
        target.mkdir(exist_ok=True)
        check(libc.mount(b"cgroup", bytes(target), b"cgroup", 0, controller.encode()), f"mount {target}")
    return True


@dataclass(frozen=True)
class VmCounters:
    usage_ns: int
    run_delay_ns: dict[int, int]
    throttled_ns: int
    limit_cpus: float


@dataclass(frozen=True)
class Reading:
    """Cumulative counters at one instant (monotonic `t`, Unix `wall`)."""

    t: float
    wall: float
    host_usage_ns: int
    vms: dict[str, VmCounters]


def _read_int(path: Path) -> int:
    return int(path.read_text().split()[0])


def _quota_cpus(cpu_cgroup: Path) -> float | None:
    quota = _read_int(cpu_cgroup / "cpu.cfs_quota_us")
    return None if quota < 0 else quota / _read_int(cpu_cgroup / "cpu.cfs_period_us")


def _holds_tasks(cgroup: Path) -> bool:
    try:
        return bool((cgroup / "tasks").read_text().strip())
    except FileNotFoundError:  # removed while listed
        return False


def _run_delays(tasks_file: Path) -> dict[int, int]:
    delays = {}
    for tid in tasks_file.read_text().split():
        try:
            delays[int(tid)] = int((Path("/proc") / tid / "schedstat").read_text().split()[1])
        except (OSError, IndexError):
            continue  # the thread exited between the two reads
    return delays


class CgroupSampler:
    """Reads the counters of one PM's cgroup and of the VM cgroups nested in it.

    The VMs are the nested cgroups that hold at least one task: the driver names a VM's cgroup
    after the VM (one identity everywhere) and an emptied cgroup left behind by a migration
    is not a VM any more."""

    def __init__(self, host: Host) -> None:
        self.host = host.name
        self.cpu = host.cgroup("cpu")
        self.cpuacct = host.cgroup("cpuacct")
        self.capacity = _quota_cpus(self.cpu) or float(os.cpu_count() or 1)

    def vm_names(self) -> list[str]:
        return sorted(child.name for child in self.cpu.iterdir() if child.is_dir() and _holds_tasks(child))

    def read(self) -> Reading:
        vms = {}
        for name in self.vm_names():
            try:
                vms[name] = VmCounters(
                    usage_ns=_read_int(self.cpuacct / name / "cpuacct.usage"),
                    run_delay_ns=_run_delays(self.cpu / name / "tasks"),
                    throttled_ns=_throttled_ns(self.cpu / name),
                    limit_cpus=_quota_cpus(self.cpu / name) or self.capacity,
                )
            except FileNotFoundError:
                continue  # the VM left (migrated away or destroyed) while being read
        return Reading(t=time.monotonic(), wall=time.time(),
                       host_usage_ns=_read_int(self.cpuacct / "cpuacct.usage"), vms=vms)


def _throttled_ns(cpu_cgroup: Path) -> int:
    for line in (cpu_cgroup / "cpu.stat").read_text().splitlines():
        key, value = line.split()
        if key == "throttled_time":
            return int(value)
    return 0


def summarize(host: str, capacity: float, readings: Sequence[Reading], window: float) -> HostSample:
    """Percent-of-capacity figures over the last `window` seconds of `readings` (oldest first):
    from the newest reading at least `window` old (or the oldest there is) to the newest.

    Each VM is measured from the oldest reading in the window that already had it, so a VM
    that just arrived is measured over the time it has been here."""
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
        demand = max(used, min(used + waited, seconds * NS_PER_S * now.limit_cpus))
        vms.append(VmSample(name=name, use=percent(used, seconds), demand=percent(demand, seconds),
                            limit=100.0 * now.limit_cpus / capacity,
                            throttled=max(now.throttled_ns - before.throttled_ns, 0) / NS_PER_S))
    use = percent(max(new.host_usage_ns - old.host_usage_ns, 0), elapsed)
    vm_use = sum(vm.use for vm in vms)
    demand = max(use - vm_use, 0.0) + sum(vm.demand for vm in vms)
    return HostSample(host=host, t=new.wall, window=elapsed, capacity=capacity,
                      use=use, demand=demand, vms=vms)


def lab_driver_hosts(lab: Lab) -> dict[str, Host]:
    """The lab's PMs as drivers see them (on the embedded lab each is a namespace of its name)."""
    return {pm.name: Host(pm.name, pm.address, pm.capacity, pm.cores, netns=pm.name if lab.embedded else None)
            for pm in lab.pms}


Migrate = Callable[[str, str, str], MigrationRecord]
"""How an LC executes a migration: (vm, destination host, mode) -> MigrationRecord; in the
daemon, a DriverDispatch over every technique's driver (testbed.drivers.base.Driver)."""

#: The techniques with a driver on the embedded lab; an LC holds all of them by default.
TECHNIQUES = ("qemu", "container")


def make_driver(technique: str, hosts: Iterable[Host]) -> Driver:
    """The driver of `technique` over `hosts`, the one place that maps a technique to its class
    (the runner builds its drivers here too, so both sides agree on what a technique is)."""
    if technique == "qemu":
        from testbed.drivers.qemu import QemuDriver

        return QemuDriver(hosts)
    if technique == "container":
        from testbed.drivers.container import ContainerDriver

        return ContainerDriver(hosts)
    raise ValueError(f"technique {technique!r} has no driver here (available: {', '.join(TECHNIQUES)})")


class DriverDispatch:
    """The LC's Migrate: the order goes to the driver that lists the VM running on this PM.

    Why the LC finds the technique itself rather than being told (by its own flag or by the
    CC's config): the drivers already know it from their state (one identity for a VM
    everywhere, thesis §3.2), so nothing can name the wrong one; one set of daemons serves a lab
    whatever technique a campaign runs, without a restart between techniques; and the order's
    mode is passed on unchanged, so a mode the technique lacks (a pre-copy order for a
    container) fails with the driver's reason instead of being swapped for another, which would
    mislabel the run. The runner sets the mode per run (the technique's own by default)."""

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

    def __call__(self, vm: str, destination: str, mode: str) -> MigrationRecord:
        return self.driver_for(vm).migrate(vm, destination, MigrationMode(mode))


class LocalController:
    def __init__(self, sampler: CgroupSampler, migrate: Migrate | None, period: float = 1.0) -> None:
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
            record = self._migrate(order.vm, order.dest, order.mode)
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

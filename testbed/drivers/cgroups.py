"""The cgroup v1 operations the drivers share: the one place that knows the lab contract's layout.

Every VM or container lives in a cgroup nested in its PM's (<ctrl>/testbed/<pm>/<vm>), so what it
uses comes out of the PM's capacity, and every process a driver starts "on" a PM joins the PM's
cgroups before anything else (see `join_then_exec`). What differs between the techniques (which
threads go where, freezing) stays in their drivers; the file layout and its pitfalls are here.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Sequence
from pathlib import Path

from testbed.drivers.base import CpuUse, Driver, Host
from testbed.lab import CFS_PERIOD_US, CGROUP_CONTROLLERS

#: Controllers every PM has a cgroup in (the lab contract) and a driver's processes join.
CONTROLLERS = CGROUP_CONTROLLERS
#: Shortest CFS quota the kernel accepts (1 ms): a tiny share is capped here, not refused.
MIN_QUOTA_US = 1000


def join_then_exec(procs: Sequence[Path]) -> list[str]:
    """An argv prefix that writes its own PID to each `cgroup.procs` file, then execs the rest.

    The join must come first: `ip netns exec` remounts /sys, and a new mount namespace may hide
    /sys/fs/cgroup, so a process that entered its PM's namespace can no longer join its cgroups.
    It is a fixed shell script with the paths as arguments because the drivers are threaded: the
    fork between `Popen` and exec must run no Python.
    """
    script = 'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1"; shift; n=$((n-1)); done; exec "$@"'
    return ["sh", "-ec", script, "sh", str(len(procs)), *map(str, procs)]


def create(group: Path) -> Path:
    """A cgroup nested in an existing one (its parent is never created: a PM cgroup the lab did
    not make would have no quota, so a missing parent is an error, FileNotFoundError)."""
    group.mkdir(exist_ok=True)
    return group


def set_quota(group: Path, cpus: float) -> None:
    """Cap a cpu cgroup at `cpus` CPUs: a CFS quota per period, as the lab caps its PMs."""
    (group / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
    (group / "cpu.cfs_quota_us").write_text(str(max(round(cpus * CFS_PERIOD_US), MIN_QUOTA_US)))


def usage_ns(group: Path) -> int:
    """CPU time used by a cpuacct cgroup and all below it; 0 for one that does not exist (yet, or
    any more: a VM that migrated away or was destroyed between two readings)."""
    try:
        return int((group / "cpuacct.usage").read_text())
    except FileNotFoundError:
        return 0


def percent_of_capacity(delta_ns: int, elapsed_s: float, capacity: float) -> float:
    """CPU time used over an interval, in percent of a PM's capacity (CPUs), the unit every
    figure of the balancer and the thesis is in."""
    return 100.0 * delta_ns / 1e9 / elapsed_s / capacity


def cpu_use(driver: Driver, interval_s: float) -> CpuUse:
    """What the driver's PMs and running VMs used over the next `interval_s`, from cpuacct.

    A PM's figure is all that ran in its cgroup (its VMs and the migration machinery alike).
    Where each VM runs is asked again after the interval, so a VM is measured against its
    current PM's capacity; one that migrated meanwhile is read in its new cgroup, whose count
    began at its arrival (clamped at 0), and one that came or went meanwhile is left out.
    """
    pms = {host.name: host for host in driver.hosts()}
    before_pm = {name: usage_ns(host.cgroup("cpuacct")) for name, host in pms.items()}
    before_vm = {vm: usage_ns(group) for vm, (group, _) in _vm_groups(driver, pms).items()}
    start = time.monotonic()
    time.sleep(interval_s)
    elapsed = time.monotonic() - start
    return CpuUse(
        elapsed,
        {name: percent_of_capacity(usage_ns(host.cgroup("cpuacct")) - before_pm[name], elapsed, host.capacity)
         for name, host in pms.items()},
        {vm: percent_of_capacity(max(0, usage_ns(group) - before_vm[vm]), elapsed, capacity)
         for vm, (group, capacity) in _vm_groups(driver, pms).items() if vm in before_vm},
    )


def _vm_groups(driver: Driver, pms: dict[str, Host]) -> dict[str, tuple[Path, float]]:
    """Each running VM's cpuacct cgroup (nested in its PM's) and its PM's capacity. The state
    directories are shared: VMs on PMs this driver does not place on are not its."""
    return {info.name: (pms[info.host].cgroup("cpuacct") / info.name, pms[info.host].capacity)
            for info in driver.list_vms() if info.running and info.host in pms}


def remove(group: Path, timeout_s: float = 5.0) -> None:
    """Remove a cgroup and any nested in it, deepest first; a missing one is a no-op at once.

    The kernel refuses (EBUSY) to remove a cgroup while it has tasks or children, and tasks leave
    a cgroup only once they have exited, a little after they were killed: EBUSY is waited out for
    up to `timeout_s`, then raised (as OSError naming the cgroup). Any other error is raised at once.
    """
    deadline = time.monotonic() + timeout_s
    for directory in _deepest_first(group):
        while True:
            try:
                directory.rmdir()
                break
            except FileNotFoundError:  # removed meanwhile (by another driver or a teardown)
                break
            except OSError as err:
                if err.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)


def _deepest_first(group: Path) -> list[Path]:
    """The cgroup directories of a tree, children before their parent (empty if it is gone)."""
    return [Path(top) for top, _, _ in os.walk(group, topdown=False)]

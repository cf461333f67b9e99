"""The Kernel app (thesis Exp. 3) in a container, for real on the embedded lab: the container sees
the Kernel app's Debian root at /mnt through an overlay whose upper layer is its private directory
on the VM storage, runs the app's command as a QEMU kernel guest does (`chroot /mnt
/usr/local/bin/kernel JOBS COUNT`), and migrates by stop-and-copy while the compile's processes
come and go; the compile ends with exit 0 and its objects are on the container's storage.

A few objects at -j2 keep it within its CI budget (about a minute here) and within a 200 MB limit
(-j4 needs about 300 MB without swap: the container's kernel_mb_per_job in testbed.techniques).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.drivers.base import Host, MigrationMode, VMSpec, pm_hosts
from testbed.drivers.container import KERNEL_ROOT, ContainerDriver
from testbed.lab import Lab

pytestmark = pytest.mark.lab

NAME = "test-ctk"
COUNT = 6  # objects: about 35 s of compiling at a 1-vCPU container's 0.15 CPU
JOBS = 2  # the runner's 2 jobs per vCPU; slow enough that a cc1 is often frozen mid-object
TREE = Path("usr/src/linux")


@pytest.fixture(scope="module")
def driver(embedded_lab: Lab) -> Iterator[tuple[ContainerDriver, list[Host]]]:
    pms = pm_hosts(embedded_lab)[:2]
    drv = ContainerDriver(pms, migration_timeout_s=120.0)
    assert drv.has_kernel_root(), f"{KERNEL_ROOT}: the kernel_root role (run by the qemu role) has not built it"
    drv.destroy_vm(NAME)  # a leftover of an interrupted run
    yield drv, pms
    drv.destroy_vm(NAME)


def _compiling(drv: ContainerDriver, timeout_s: float = 60.0) -> list[str]:
    """Wait until a cc1 runs in the container; the names of its processes then."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        names = []
        for pid in drv.pids(NAME):
            try:
                names.append(Path(f"/proc/{pid}/comm").read_text().strip())
            except OSError:
                continue  # it ended meanwhile: the compile's processes come and go
        if "cc1" in names:
            return names
        time.sleep(0.05)
    raise AssertionError(f"no cc1 in the container after {timeout_s:g} s")


def test_kernel_app_compiles_in_a_container_that_migrates_meanwhile(driver) -> None:
    drv, (pm1, pm2) = driver
    drv.create_vm(VMSpec(NAME, memory_mb=200, vcpus=1), pm1.name)
    objects = (KERNEL_ROOT / TREE / "testbed-objects.list").read_text().split()[:COUNT]
    assert not any((KERNEL_ROOT / TREE / o).exists() for o in objects)  # the role leaves them to compile
    run = drv.start_workload(NAME, ["chroot", "/mnt", "/usr/local/bin/kernel", str(JOBS), str(COUNT)])
    processes = _compiling(drv)

    record = drv.migrate(NAME, pm2.name, MigrationMode.STOPCOPY, compression="zstd")
    assert record.status == "completed", record.error
    assert record.details["processes"] >= 3 and record.details["compression"] == "zstd", (record.details, processes)
    done = drv.wait_workload(NAME, run.id, timeout_s=240)
    said = [line for _, line in done.output]
    assert done.finished and done.exit_status == 0, said
    assert said[-1].startswith(f"kernel: compiled {COUNT} objects with -j{JOBS}")
    assert record.start + record.total_time_s < done.end  # it migrated mid-compile and went on
    assert [(i.host, i.running) for i in drv.list_vms() if i.name == NAME] == [(pm2.name, True)]

    upper = Path(drv._load(NAME).root_dir) / "kernel" / "upper" / TREE
    assert str(upper).startswith(str(drv.storage.share(pm1.name)))  # the owner PM's share of the VM storage
    assert all((upper / o).stat().st_size > 0 for o in objects), sorted(upper.glob("kernel/*.o"))
    assert not any((KERNEL_ROOT / TREE / o).exists() for o in objects)  # nothing written to the shared root
    print(f"container kernel compile: {COUNT} objects -j{JOBS} in {done.end - done.start:.1f} s; migrated "
          f"mid-compile ({record.details['processes']} processes, {record.details['dump_bytes'] / 2**20:.0f} MiB "
          f"dumped, {record.bytes / 2**20:.1f} MiB zstd on the wire, downtime {record.downtime_s:.2f} s)")

"""The QEMU driver for real, on the embedded lab: guests boot on PM1, run timed workloads and
migrate between PM1 and PM2 in the three modes over the lab's shaped links.

Guests are small (128 MB) and few (two at a time) to keep the module within its CI budget.
VM state and the guest image are the lab's own (/var/lib/testbed/vms, the qemu role's image).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.bench.migration import continued, links_at, synthetic1_blocks, wait_blocks
from testbed.drivers.base import Host, MigrationMode, MigrationRecord, VMSpec, pm_hosts
from testbed.drivers.qemu import QemuDriver, QemuError
from testbed.lab import Lab

pytestmark = pytest.mark.lab

LOOP = ["synthetic1", "1000000", "100"]  # bounded; far longer than the module runs


@pytest.fixture(scope="module")
def pms(embedded_lab: Lab) -> list[Host]:
    return pm_hosts(embedded_lab)[:2]


@pytest.fixture(scope="module")
def driver(pms: list[Host]) -> Iterator[QemuDriver]:
    drv = QemuDriver(pms)
    yield drv
    for vm in drv.list_vms():
        if vm.name.startswith("test-"):
            drv.destroy_vm(vm.name)


@pytest.fixture(scope="module")
def busy(driver: QemuDriver, pms: list[Host]):
    """One VM running Synthetic1 for the whole module; the migration tests move it around."""
    driver.destroy_vm("test-busy")  # a leftover of an interrupted run
    driver.create_vm(VMSpec("test-busy", memory_mb=128), pms[0].name)
    return driver.start_workload("test-busy", LOOP)


@pytest.fixture(scope="module")
def memcheck(driver: QemuDriver, busy):
    """A checksummed 8 MB buffer re-read twice a second in the busy VM: a migration that lost
    or damaged a page shows as a "bad" check."""
    return driver.start_workload("test-busy", ["memcheck", "8", "600"])


def _qemu_processes(vm_dir: Path) -> list[str]:
    """Live QEMU processes whose command line names this VM's state directory."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
            continue
        if "qemu-system" in cmdline and str(vm_dir) in cmdline and state != "Z":
            found.append(cmdline)
    return found


def _other(driver: QemuDriver, vm: str) -> str:
    here = next(v.host for v in driver.list_vms() if v.name == vm)
    return next(h.name for h in driver.hosts() if h.name != here)


def _guest_used_bytes(driver: QemuDriver, vm: str) -> int:
    """Memory the guest kernel reports in use (MemTotal - MemFree), read inside the guest."""
    run = driver.wait_workload(vm, driver.start_workload(vm, ["cat", "/proc/meminfo"]).id, timeout_s=30)
    info = {line.split(":")[0]: int(line.split()[1]) * 1024 for _, line in run.output if ":" in line}
    return info["MemTotal"] - info["MemFree"]


def test_workload_runs_and_is_timed_by_the_host(driver: QemuDriver, busy) -> None:
    run = driver.start_workload("test-busy", ["synthetic1", "300", "100"])
    run = driver.wait_workload("test-busy", run.id, timeout_s=120)
    assert run.finished and run.exit_status == 0
    assert run.start is not None and run.end is not None and run.end > run.start
    assert [n for _, n in synthetic1_blocks(run)] == [100, 200, 300]
    assert run.output[-1][1] == "done 300"
    assert all(run.start <= t <= run.end for t, _ in run.output)


def test_vm_cpu_is_capped_at_its_share_of_the_pm(driver: QemuDriver, busy, pms: list[Host]) -> None:
    use = driver.cpu_use(2.0)
    cap = 100 / pms[0].cores  # a 1-vCPU VM on an N-core PM: 1/N of the PM's capacity
    assert 0.5 * cap < use.vms["test-busy"] <= cap * 1.1
    assert use.hosts[busy_host(driver)] >= use.vms["test-busy"]


def busy_host(driver: QemuDriver) -> str:
    return next(v.host for v in driver.list_vms() if v.name == "test-busy")


def test_bad_requests_are_refused(driver: QemuDriver, busy) -> None:
    with pytest.raises(QemuError, match="memory_mb"):
        driver.create_vm(VMSpec("test-tiny", memory_mb=64), busy_host(driver))
    with pytest.raises(QemuError, match="plain words"):
        driver.start_workload("test-busy", ["sh", "-c", "reboot; echo"])
    with pytest.raises(QemuError, match="unknown PM"):
        driver.migrate("test-busy", "nowhere", MigrationMode.PRECOPY)
    with pytest.raises(QemuError, match="already runs"):
        driver.migrate("test-busy", busy_host(driver), MigrationMode.PRECOPY)


@pytest.mark.parametrize("mode", list(MigrationMode))
def test_migration_keeps_the_workload_running(driver: QemuDriver, busy, memcheck,
                                              mode: MigrationMode) -> None:
    used = _guest_used_bytes(driver, "test-busy")
    assert wait_blocks(driver, busy, after=0.0, count=1), "Synthetic1 reported no progress"
    source, destination = busy_host(driver), _other(driver, "test-busy")
    record = driver.migrate("test-busy", destination, mode)
    print(record.as_dict())
    assert record.status == "completed", record.error
    assert (record.source, record.destination, record.mode) == (source, destination, mode)
    assert busy_host(driver) == destination
    assert continued(driver, busy, record)
    _assert_consistent(record, used)
    checks = [line for _, line in memcheck.output if line.startswith("check ")]
    assert checks and not [line for line in checks if " bad" in line], checks[-3:]
    if mode is MigrationMode.STOPCOPY:
        # The VM is down from the moment it stops until it runs again: all but the latency of
        # the `stop` command (a vCPU thread throttled by its cgroup answers within a CFS period).
        assert record.total_time_s - record.downtime_s < 0.25
        assert record.details["precopy_bytes"] == 0
    if mode is MigrationMode.POSTCOPY:
        assert record.details["postcopy_bytes"] > 0
    assert not _qemu_processes(driver.state_dir / "test-busy" / f"{source}.pid")


def _assert_consistent(record: MigrationRecord, used: int) -> None:
    assert record.total_time_s > 0
    assert record.downtime_s is not None and 0 <= record.downtime_s <= record.total_time_s
    assert record.bytes >= used, f"sent {record.bytes} bytes, the guest uses {used}"
    assert sum(record.phases.values()) >= record.total_time_s * 0.95


def test_precopy_of_an_idle_vm_fills_a_100mbit_link(driver: QemuDriver, pms: list[Host],
                                                     embedded_lab: Lab) -> None:
    driver.create_vm(VMSpec("test-idle", memory_mb=128), pms[0].name)
    try:
        with links_at(embedded_lab, embedded_lab.pms[:2], "100mbit"):
            record = driver.migrate("test-idle", pms[1].name, MigrationMode.PRECOPY)
    finally:
        driver.destroy_vm("test-idle")
    assert record.status == "completed", record.error
    mbit_s = record.bytes * 8 / record.phases["transfer_s"] / 1e6
    print(f"idle pre-copy at 100mbit: {record.bytes} bytes in {record.phases['transfer_s']:.2f} s = "
          f"{mbit_s:.1f} Mbit/s, downtime {record.downtime_s:.3f} s")
    assert mbit_s >= 80


def test_failed_migration_leaves_the_vm_running_on_the_source(driver: QemuDriver, busy,
                                                             embedded_lab: Lab) -> None:
    """The destination PM's cable is pulled: the source cannot reach its incoming port."""
    source, destination = busy_host(driver), _other(driver, "test-busy")
    cable = embedded_lab.host(destination).veth
    subprocess.run(["ip", "link", "set", cable, "down"], check=True)
    # Forget the destination's MAC address, as after a while on a real network: ARP then
    # gives up in ~3 s, where a cached entry would let TCP retry its SYN for over a minute.
    subprocess.run(["ip", "-n", source, "neigh", "flush", "all"], check=True)
    try:
        record = driver.migrate("test-busy", destination, MigrationMode.PRECOPY)
    finally:
        subprocess.run(["ip", "link", "set", cable, "up"], check=True)
    print(record.as_dict())
    assert record.status == "failed"
    assert record.error and ("route" in record.error.lower() or "unreachable" in record.error.lower())
    assert busy_host(driver) == source
    assert all(v.running for v in driver.list_vms() if v.name == "test-busy")
    assert not _qemu_processes(driver.state_dir / "test-busy" / f"{destination}.pid")
    assert not (driver.state_dir / "test-busy" / f"{destination}.pid").exists()
    blocks = [n for _, n in synthetic1_blocks(busy)]
    run = driver.workload("test-busy", busy.id)
    driver.wait_workload("test-busy", run.id, timeout_s=5)
    assert [n for _, n in synthetic1_blocks(busy)][-1] > blocks[-1]


def test_destroy_leaves_nothing(driver: QemuDriver, pms: list[Host]) -> None:
    driver.create_vm(VMSpec("test-gone", memory_mb=96), pms[1].name)
    vm_dir = driver.state_dir / "test-gone"
    assert _qemu_processes(vm_dir)
    driver.destroy_vm("test-gone")
    assert not _qemu_processes(vm_dir) and not vm_dir.exists()
    assert not (pms[1].cgroup("cpu") / "test-gone").exists()
    assert "test-gone" not in {v.name for v in driver.list_vms()}


def test_bench_migration_prints_the_record_as_json(embedded_lab: Lab, capsys: pytest.CaptureFixture) -> None:
    from testbed.cli import main

    status = main(["bench", "migration", "--technique", "qemu", "--mode", "stopcopy", "--rate", "100mbit",
                   "--memory", "128", "--dirty-mbps", "5"])
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    print(out[:-1])
    assert status == 0 and result["status"] == "completed" and result["continued"] is True
    assert result["mode"] == "stopcopy" and result["rate"] == "100mbit"
    assert 0 < result["total_time_s"] - result["downtime_s"] < 0.25
    assert result["bytes"] > 0

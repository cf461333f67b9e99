"""The container driver for real, on the embedded lab: containers start on PM1 in their own
namespaces and cgroups, run timed workloads, freeze and thaw, and migrate by stop-and-copy
between PM1 and PM2 over the lab's shaped links, with and without compression; a workload keeps
its progress and its memory across the move, and a failed transfer leaves the container running
on its source.

One container (96 MB, an 8 MB memory checker, Synthetic1 and an HTTP server) serves the module,
to keep it within its CI budget.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.bench.container_migration import continued, wait_checks
from testbed.bench.migration import links_at, wait_blocks
from testbed.drivers.base import Host, MigrationMode, MigrationRecord, VMSpec, pm_hosts
from testbed.drivers.container import CONTROLLERS, ContainerDriver, ContainerError, _ns_init
from testbed.lab import Lab, parse_rate

pytestmark = pytest.mark.lab

RATE = "100mbit"  # the thesis' link
CHECK_MB = 8  # incompressible bytes the memory checker holds
HTTP_PORT = 8080


@pytest.fixture(scope="module")
def pms(embedded_lab: Lab) -> Iterator[list[Host]]:
    with links_at(embedded_lab, embedded_lab.pms[:2], RATE):
        yield pm_hosts(embedded_lab)[:2]


@pytest.fixture(scope="module")
def driver(pms: list[Host]) -> Iterator[ContainerDriver]:
    drv = ContainerDriver(pms, connect_timeout_s=2.0, migration_timeout_s=120.0)
    yield drv
    for vm in drv.list_vms():
        if vm.name.startswith("test-"):
            drv.destroy_vm(vm.name)


class Busy:
    """The module's container: Synthetic1, a memory checker and an HTTP server on its address."""

    def __init__(self, driver: ContainerDriver, pm: str) -> None:
        driver.destroy_vm("test-ct")  # a leftover of an interrupted run
        self.info = driver.create_vm(VMSpec("test-ct", memory_mb=96), pm)
        self.loop = driver.start_workload("test-ct", ["synthetic1", "1000000", "100"])
        self.check = driver.start_workload("test-ct", ["memcheck", str(CHECK_MB), "600"])
        self.http = driver.start_workload("test-ct", ["python3", "-u", "-m", "http.server", str(HTTP_PORT)])
        wait_blocks(driver, self.loop, after=0.0, count=1)
        for _ in range(300):  # it prints "Serving HTTP on ..." once it listens
            if driver.wait_workload("test-ct", self.http.id, timeout_s=0.1).output:
                break
        wait_checks(driver, self.check, after=0.0, count=1)
        self.pids = driver.pids("test-ct")
        self.address = driver.address("test-ct")


@pytest.fixture(scope="module")
def busy(driver: ContainerDriver, pms: list[Host]) -> Busy:
    return Busy(driver, pms[0].name)


def host_of(driver: ContainerDriver, vm: str) -> str:
    return next(info.host for info in driver.list_vms() if info.name == vm)


def other(driver: ContainerDriver) -> str:
    return next(h.name for h in driver.hosts() if h.name != host_of(driver, "test-ct"))


def fetch(pm: Host, address: str) -> int:
    """HTTP status of the container's server as fetched from a PM's namespace."""
    code = f"import urllib.request as u; print(u.urlopen('http://{address}:{HTTP_PORT}/', timeout=5).status)"
    done = subprocess.run(["ip", "netns", "exec", pm.netns, "python3", "-c", code], capture_output=True,
                          text=True, timeout=30, check=False)
    return int(done.stdout.strip() or 0)


def agents() -> list[str]:
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    return [line for line in ps.splitlines() if "testbed.drivers.memdump" in line]


def test_container_has_its_namespaces_cgroups_and_address(driver: ContainerDriver, busy: Busy,
                                                          pms: list[Host]) -> None:
    init = _ns_init(pms[0].cgroup("freezer") / "test-ct")  # PID 1 in its own PID namespace
    for ns in ("pid", "mnt", "uts", "ipc", "net"):
        assert os.readlink(f"/proc/{init}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    source = pms[0]
    assert (source.cgroup("cpu") / "test-ct" / "cpu.cfs_quota_us").read_text().strip() == str(
        round(1 / source.cores * source.capacity * 100_000))
    assert int((source.cgroup("memory") / "test-ct" / "memory.limit_in_bytes").read_text()) == 96 * 2**20
    for controller in CONTROLLERS:
        assert sorted(int(p) for p in (source.cgroup(controller) / "test-ct" / "cgroup.procs").read_text().split()) \
            == sorted(busy.pids)
    assert fetch(pms[1], busy.address) == 200


def test_workload_is_timed_and_root_is_read_only_but_for_its_own_dirs(driver: ContainerDriver, busy: Busy) -> None:
    for argv, status in ((["touch", "/usr/tc-probe"], 1), (["touch", "/root/tc-probe"], 0),
                         (["synthetic1", "300", "100"], 0)):
        run = driver.start_workload("test-ct", argv)
        run = driver.wait_workload("test-ct", run.id, timeout_s=60)
        assert run.finished and run.exit_status == status, (argv, run.output)
        assert run.start is not None and run.end is not None and run.start <= run.end
    assert [line for _, line in run.output] == ["block 100", "block 200", "block 300", "done 300"]
    assert all(run.start <= t <= run.end for t, _ in run.output)
    assert not Path("/usr/tc-probe").exists()
    assert (Path(driver._load("test-ct").root_dir) / "home" / "tc-probe").exists()


def test_container_cpu_is_capped_at_its_share_of_the_pm(driver: ContainerDriver, busy: Busy) -> None:
    use = driver.cpu_use(2.0)
    cap = 100 / driver.hosts()[0].cores  # 1 vCPU on an N-core PM: 1/N of the PM's capacity
    assert 0.5 * cap < use.vms["test-ct"] <= cap * 1.1
    assert use.hosts[host_of(driver, "test-ct")] >= use.vms["test-ct"]


def test_freeze_stops_the_container_and_thaw_resumes_it(driver: ContainerDriver, busy: Busy, pms: list[Host]) -> None:
    freezer = pms[0].cgroup("freezer") / "test-ct" / "freezer.state"
    freezer.write_text("FROZEN")
    try:
        checks = wait_checks(driver, busy.check, after=0.0, count=0)
        time.sleep(1.5)
        assert freezer.read_text().strip() == "FROZEN"
        assert wait_checks(driver, busy.check, after=0.0, count=0) == checks
    finally:
        freezer.write_text("THAWED")
    assert len(wait_checks(driver, busy.check, after=0.0, count=len(checks) + 2, timeout_s=10)) >= len(checks) + 2


@pytest.mark.parametrize("compression", [None, "bzip2", "zstd"])
def test_migration_carries_progress_memory_and_address(driver: ContainerDriver, busy: Busy, pms: list[Host],
                                                       compression: str | None) -> None:
    source = host_of(driver, "test-ct")
    destination = next(h for h in pms if h.name != source)
    record = driver.migrate("test-ct", destination.name, MigrationMode.STOPCOPY, compression=compression)
    assert record.status == "completed", record.error
    assert (record.source, record.destination) == (source, destination.name)
    assert host_of(driver, "test-ct") == destination.name
    assert continued(driver, busy.loop, busy.check, record)
    assert driver.pids("test-ct") == busy.pids  # the same processes, not a restarted container
    assert fetch(pms[0], busy.address) == 200  # its address went with it
    print(record.as_dict())
    _assert_measured(record, compression)
    for controller in CONTROLLERS:
        assert not (next(h for h in pms if h.name == source).cgroup(controller) / "test-ct").exists()
        procs = (destination.cgroup(controller) / "test-ct" / "cgroup.procs").read_text().split()
        assert sorted(map(int, procs)) == sorted(busy.pids)
    assert not agents()


def _assert_measured(record: MigrationRecord, compression: str | None) -> None:
    assert list(record.phases) == ["suspend", "dump", "copy", "undump", "resume"]
    assert record.downtime_s == pytest.approx(record.total_time_s)
    assert sum(record.phases.values()) == pytest.approx(record.downtime_s, rel=0.05)
    assert record.details["mechanism"] == "shared-kernel stop-and-copy"
    assert record.details["compression"] == (compression or "none")
    dump_bytes = record.details["dump_bytes"]
    assert dump_bytes >= CHECK_MB * 2**20
    if compression is None:
        assert record.bytes == dump_bytes
    else:
        assert record.bytes < dump_bytes
    # Everything sent crossed the shaped link: the outage lasts at least the wire time.
    wire_s = record.bytes * 8 / parse_rate(RATE)
    assert record.phases["copy"] >= 0.9 * wire_s
    assert record.downtime_s >= 0.9 * wire_s


def test_failed_transfer_leaves_the_container_running_on_its_source(driver: ContainerDriver, busy: Busy,
                                                                    pms: list[Host]) -> None:
    source = host_of(driver, "test-ct")
    destination = next(h for h in pms if h.name != source)
    # The receiver listens on the destination, but the source has no route to it.
    unreachable = ["route", "add", "unreachable", f"{destination.address}/32"]
    subprocess.run(["ip", "-n", source, *unreachable], check=True)
    try:
        record = driver.migrate("test-ct", destination.name, MigrationMode.STOPCOPY)
    finally:
        subprocess.run(["ip", "-n", source, "route", "del", f"{destination.address}/32"], check=True)
    print(record.as_dict())
    assert record.status == "failed" and record.bytes == 0
    assert record.error and "no route to host" in record.error.lower()
    assert record.phases["suspend"] >= 0 and "dump" in record.phases and "copy" not in record.phases
    assert host_of(driver, "test-ct") == source
    src_host = next(h for h in pms if h.name == source)
    assert (src_host.cgroup("freezer") / "test-ct" / "freezer.state").read_text().strip() == "THAWED"
    assert all(not (destination.cgroup(c) / "test-ct").exists() for c in CONTROLLERS)
    assert driver.pids("test-ct") == busy.pids and not agents()
    after = record.start + record.total_time_s
    assert wait_checks(driver, busy.check, after=after, count=2)[0] > 0
    assert not [line for _, line in busy.check.output if " bad " in line]


def test_bad_requests_are_refused(driver: ContainerDriver, busy: Busy) -> None:
    with pytest.raises(ContainerError, match="stop-and-copy only"):
        driver.migrate("test-ct", other(driver), MigrationMode.PRECOPY)
    with pytest.raises(ContainerError, match="already runs"):
        driver.migrate("test-ct", host_of(driver, "test-ct"), MigrationMode.STOPCOPY)
    with pytest.raises(ContainerError, match="compression"):
        driver.migrate("test-ct", other(driver), MigrationMode.STOPCOPY, compression="gzip")
    with pytest.raises(ContainerError, match="already exists"):
        driver.create_vm(VMSpec("test-ct"), host_of(driver, "test-ct"))
    with pytest.raises(ContainerError, match="unknown PM"):
        driver.migrate("test-ct", "nowhere", MigrationMode.STOPCOPY)
    with pytest.raises(ContainerError, match="plain words"):
        driver.start_workload("test-ct", ["echo", "two words"])


def test_destroy_leaves_nothing(driver: ContainerDriver, busy: Busy, pms: list[Host]) -> None:
    state = driver._load("test-ct")
    driver.destroy_vm("test-ct")
    assert driver.list_vms() == []
    assert all(not Path(f"/proc/{pid}").exists() or b"zombie" in Path(f"/proc/{pid}/status").read_bytes().lower()
               for pid in busy.pids)
    assert all(not (h.cgroup(c) / "test-ct").exists() for h in pms for c in CONTROLLERS)
    assert state.netns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                                check=True).stdout
    assert not Path(f"/sys/class/net/{state.veth}").exists()
    assert not (driver.state_dir / "test-ct").exists()


def test_bench_migration_prints_the_record_as_json(embedded_lab: Lab, capsys: pytest.CaptureFixture) -> None:
    from testbed.cli import main

    status = main(["bench", "migration", "--technique", "container", "--mode", "stopcopy", "--rate", "100mbit",
                   "--memory", "64", "--compress", "zstd"])
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    print(out[:-1])
    assert status == 0 and result["status"] == "completed" and result["continued"] is True
    assert (result["mode"], result["rate"], result["compress"]) == ("stopcopy", "100mbit", "zstd")
    assert list(result["phases"]) == ["suspend", "dump", "copy", "undump", "resume"]
    # The checker's 32 MB are random bytes: zstd cannot shrink them, but the rest of the dump shrinks.
    assert result["dump_bytes"] >= 32 * 2**20 and 32 * 2**20 < result["bytes"] < result["dump_bytes"]

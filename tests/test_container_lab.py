"""Containers under the VM manager on the embedded lab: LCs (which hold every technique's driver,
docs/manager.md "Techniques") sample a container's CPU from its cgroups, refuse a mode containers
lack, and migrate one for real by stop-and-copy when a CC orders it.

The LCs under test are this checkout's, one per PM on a port of their own, started as the
balancer role starts its daemons: in the PM's cgroups, then its network namespace (the role's
LCs may run an older version, and other users of the lab talk to them). As in
tests/test_manager_lab.py the CC under test runs here, round by round. The role's CC is left
alone when in dry run (it never orders then), else paused meanwhile: two CCs must never balance
the same PMs."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from manager_helpers import wait_answering

from testbed.drivers import cgroups
from testbed.drivers.base import VMSpec, WorkloadRun
from testbed.drivers.container import CONTROLLERS, ContainerDriver
from testbed.lab import Lab
from testbed.manager import CC_PORT, LC_PORT
from testbed.manager.api import CcConfig, ManagerClient, MigrateOrder, load_token, url_for
from testbed.manager.central import CentralController
from testbed.manager.events import read_events
from testbed.manager.local import lab_driver_hosts

pytestmark = pytest.mark.lab

WINDOW = 2.0  # the CC's interval: each round averages the last 2 s of samples
SETTLE = WINDOW + 1.0  # a load change is fully inside the window after this
#: About 1.5 minutes at a 1-vCPU container's 0.15 CPU: bounded, and destroyed at the end anyway.
BUSY = ["synthetic1", "100000", "500"]
NAMES = ("ct-mgr-1", "ct-mgr-2")
TEST_LC_PORT = LC_PORT + 10


def _start_lc(lab: Lab, pm: str, log: Path) -> subprocess.Popen:
    """`testbed manager lc` on `pm`, in its cgroups and network namespace."""
    host = lab_driver_hosts(lab)[pm]
    argv = [*cgroups.join_then_exec([host.cgroup(c) / "cgroup.procs" for c in CONTROLLERS]),
            "ip", "netns", "exec", pm, sys.executable, "-m", "testbed.cli", "manager", "lc", "--host", pm,
            "--port", str(TEST_LC_PORT), "-i", str(lab.inventory), "--token-file", str(lab.state_dir / "manager.token")]
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def lcs(embedded_lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ManagerClient]]:
    token = load_token(embedded_lab.state_dir / "manager.token")
    logs = tmp_path_factory.mktemp("lcs")
    role_cc = ManagerClient(url_for(embedded_lab.controller.address, CC_PORT), token)
    wait_answering({embedded_lab.controller.name: role_cc}, "/v1/status", timeout_s=90)
    with ExitStack() as stack:
        for pm in embedded_lab.pms:
            stack.callback(_stop, _start_lc(embedded_lab, pm.name, logs / f"{pm.name}.log"))
        clients = {pm.name: ManagerClient(url_for(pm.address, TEST_LC_PORT), token) for pm in embedded_lab.pms}
        wait_answering(clients, "/v1/sample", timeout_s=90)
        if not role_cc.get("/v1/status")["config"]["dry_run"]:
            role_cc.post("/v1/pause")
            stack.callback(role_cc.post, "/v1/resume")
        yield clients


class Busy:
    """Two busy 1-vCPU containers on PM1 (each capped at a quarter of it) and their Synthetic1
    runs. The driver's default state directory is the one the LCs' container drivers read."""

    def __init__(self, lab: Lab, cleanup: ExitStack) -> None:
        self.driver = ContainerDriver(lab_driver_hosts(lab).values())
        self.runs: dict[str, WorkloadRun] = {}
        for name in NAMES:
            self.driver.destroy_vm(name)  # a leftover of an interrupted run
            cleanup.callback(self.driver.destroy_vm, name)
            self.driver.create_vm(VMSpec(name, memory_mb=100, vcpus=1), lab.pms[0].name)
            self.runs[name] = self.driver.start_workload(name, BUSY)

    def where(self) -> dict[str, str]:
        return {info.name: info.host for info in self.driver.list_vms() if info.name in NAMES and info.running}


@pytest.fixture(scope="module")
def containers(embedded_lab: Lab, lcs) -> Iterator[Busy]:
    with ExitStack() as cleanup:  # destroys every container made here, even if one fails
        busy = Busy(embedded_lab, cleanup)
        time.sleep(SETTLE)
        yield busy


def test_an_lc_samples_its_containers_from_their_cgroups(embedded_lab: Lab, lcs, containers) -> None:
    pm1, pm2 = (pm.name for pm in embedded_lab.pms[:2])
    sample = lcs[pm1].get("/v1/sample", window=WINDOW)
    vms = {vm["name"]: vm for vm in sample["vms"]}
    assert set(NAMES) <= set(vms), sample
    for name in NAMES:
        assert vms[name]["limit"] == pytest.approx(25.0)  # 1 vCPU of a 4-core PM
        assert 15.0 < vms[name]["use"] <= 28.0, vms[name]  # busy, held at its quota
    assert sample["use"] >= sum(vms[name]["use"] for name in NAMES) - 1.0
    assert not set(NAMES) & {vm["name"] for vm in lcs[pm2].get("/v1/sample", window=WINDOW)["vms"]}


def test_an_order_in_a_mode_containers_lack_fails_and_moves_nothing(embedded_lab: Lab, lcs, containers) -> None:
    pm1, pm2 = (pm.name for pm in embedded_lab.pms[:2])
    outcome = lcs[pm1].post("/v1/migrate", MigrateOrder(vm=NAMES[0], dest=pm2, source=pm1, mode="precopy"))
    assert not outcome["ok"] and "stop-and-copy only" in outcome["error"], outcome
    assert containers.where() == dict.fromkeys(NAMES, pm1)


def test_the_cc_migrates_a_container_by_stop_and_copy(embedded_lab: Lab, lcs, containers, tmp_path: Path) -> None:
    """PM1 50 %, PM2 and PM3 idle: Assign-U moves one container off PM1; its LC does it with the
    container driver, the program in it goes on where it was, and the destination's LC sees it."""
    pm1 = embedded_lab.pms[0].name
    cc = CentralController(lcs, CcConfig(interval=WINDOW, cooldown=60.0, mode="stopcopy"), tmp_path / "events.jsonl")
    try:
        ordered = cc.run_round()
        assert ordered["action"] == "migrate", ordered["snapshot"]
        vm, dest = ordered["order"]["vm"], ordered["order"]["dest"]
        assert ordered["order"]["source"] == pm1 and vm in NAMES and dest != pm1
        deadline = time.monotonic() + 120
        while cc.in_flight is not None:
            assert time.monotonic() < deadline, "the migration did not end in 120 s"
            time.sleep(0.5)
    finally:
        cc.stop()
    (event,) = [e for e in read_events(tmp_path / "events.jsonl") if e["kind"] == "migration"]
    assert event["ok"], event
    record = event["record"]
    assert (record["vm"], record["source"], record["destination"], record["mode"]) == (vm, pm1, dest, "stopcopy")
    assert record["details"]["mechanism"] in ("shared-kernel stop-and-copy", "criu")
    assert list(record["phases"]) == ["suspend", "dump", "copy", "undump", "resume"]
    assert record["downtime_s"] == pytest.approx(record["total_time_s"]) and record["bytes"] > 2**20
    assert containers.where() == {name: dest if name == vm else pm1 for name in NAMES}

    run = containers.runs[vm]  # its Synthetic1
    before = _blocks(containers.driver.workload(vm, run.id).output, until=record["start"])
    time.sleep(SETTLE)
    after = _blocks(containers.driver.workload(vm, run.id).output, until=time.time())
    assert after > before > 0  # it went on counting from where it was, on the destination
    sample = lcs[dest].get("/v1/sample", window=WINDOW)
    moved = next(v for v in sample["vms"] if v["name"] == vm)
    assert moved["use"] > 10.0, sample  # the destination's LC samples it there, busy
    print(f"CC-ordered container migration {vm} {pm1}->{dest}: total {record['total_time_s']:.2f} s = downtime, "
          f"{record['bytes'] / 2**20:.1f} MiB on the wire, phases "
          + ", ".join(f"{k} {v:.3f}" for k, v in record["phases"].items()))


def _blocks(output: list[tuple[float, str]], until: float) -> int:
    """The last "block N" Synthetic1 printed up to `until` (host time)."""
    return max((int(line.split()[1]) for when, line in output if when <= until and line.startswith("block ")),
               default=0)

"""Per-VM work (`per_vm` in a spec, issue #16): each VM's own instances, work multiplier and vCPUs
reach the programs the lab executor starts in it, the VM it creates and the simulator's VMs; the
start delays scale with the spec's scale only. No lab: the executor runs over a fake driver."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from testbed.drivers.base import CpuUse, VMInfo, VMSpec, WorkloadRun
from testbed.errors import InputError
from testbed.runner import executor
from testbed.runner.campaign import Run
from testbed.runner.executor import (
    KERNEL_JOBS_PER_VCPU,
    KERNEL_OBJECTS,
    SYNTHETIC1_BLOCKS,
    LabExecutor,
    chains,
    supported,
)
from testbed.spec import parse_spec

REPO = Path(__file__).resolve().parents[1]
SPEC = {"name": "t", "techniques": ["qemu"], "vms": 4, "pms": 3, "instances": 1, "vcpus": 1, "scale": 0.5,
        "start_delay_s": {"vm3": 0.2, "vm4": 0.4},
        "per_vm": {"vm1": {"work": 3}, "vm3": {"work": 0.5, "instances": 2}, "vm4": {"instances": 2, "vcpus": 2}},
        "matrix": {"layout": [{"vm1": 1, "vm2": 2, "vm3": 1, "vm4": 2}], "migration": [True]}}


def _run(**changes: object) -> Run:
    spec = parse_spec(SPEC | changes)
    return Run(spec, "qemu", spec.variants()[0], 1)


def test_synthetic1_chains_follow_each_vms_instances_and_work() -> None:
    run = _run()
    blocks = {vm: [step.argvs for chain in chains(run, vm) for step in chain] for vm in ("vm1", "vm2", "vm3", "vm4")}
    assert blocks == {
        "vm1": [(("synthetic1", str(round(SYNTHETIC1_BLOCKS * 1.5))),)],
        "vm2": [(("synthetic1", str(round(SYNTHETIC1_BLOCKS * 0.5))),)],
        "vm3": [(("synthetic1", str(round(SYNTHETIC1_BLOCKS * 0.25))),)] * 2,  # two chains at once
        "vm4": [(("synthetic1", str(round(SYNTHETIC1_BLOCKS * 0.5))),)] * 2,
    }


def test_synthetic_random_sleeps_scale_with_the_vms_work_too() -> None:
    run = _run(app="synthetic-random")
    sr = executor._synthetic_random()
    for vm, scale in (("vm1", 1.5), ("vm2", 0.5)):
        for step in (step for chain in chains(run, vm) for step in chain):
            assert step.argvs in ((("sleep", f"{sr.SLEEP_S * scale:g}"),),
                                  *((("synthetic1", str(round(SYNTHETIC1_BLOCKS * scale))),) * n for n in (1, 2, 4)))


def test_kernel_jobs_follow_each_vms_vcpus_and_one_tree_per_vm_is_enforced() -> None:
    spec = SPEC | {"app": "kernel", "per_vm": {"vm4": {"vcpus": 2, "work": 2}}}
    run = _run(**spec)
    ((vm1,),) = chains(run, "vm1")
    ((vm4,),) = chains(run, "vm4")
    assert vm1.argvs[0][-2:] == (str(KERNEL_JOBS_PER_VCPU * 1), str(round(KERNEL_OBJECTS * 0.5)))
    assert vm4.argvs[0][-2:] == (str(KERNEL_JOBS_PER_VCPU * 2), str(round(KERNEL_OBJECTS * 1.0)))
    with pytest.raises(InputError) as err:
        supported(parse_spec(spec | {"per_vm": {"vm3": {"instances": 2}}}), ["container"])
    assert str(err.value) == "t: per_vm.vm3.instances: the kernel app compiles one tree per VM (instances: 1)"


def test_kernel_memory_check_counts_each_vms_own_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Containers need 75 MB per make job (or swap): a 1-vCPU VM's -j2 fits 150 MB, vm4's -j4 does not."""
    monkeypatch.setattr(executor, "machine_swap_mb", lambda: 0)
    spec = SPEC | {"app": "kernel", "memory_mb": 150, "per_vm": {}}
    supported(parse_spec(spec), ["container"])
    with pytest.raises(InputError, match=r"-j4 .* needs memory_mb >= 300 in a container, or 150 MB of swap"):
        supported(parse_spec(spec | {"per_vm": {"vm4": {"vcpus": 2}}}), ["container"])


class FakeDriver:
    """Workloads end at once (exit 0); records what was created and started, and when."""

    technique = "qemu"

    def __init__(self) -> None:
        self.created: dict[str, VMSpec] = {}
        self.hosts: dict[str, str] = {}
        self.started: list[tuple[str, tuple[str, ...], float]] = []
        self._runs: dict[str, WorkloadRun] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def create_vm(self, spec: VMSpec, host: str) -> VMInfo:
        self.created[spec.name], self.hosts[spec.name] = spec, host
        return VMInfo(spec.name, host, spec, True)

    def destroy_vm(self, vm: str) -> None:
        self.created.pop(vm, None)

    def list_vms(self) -> list[VMInfo]:
        return [VMInfo(vm, self.hosts[vm], spec, True) for vm, spec in list(self.created.items())]

    def start_workload(self, vm: str, argv: list[str]) -> WorkloadRun:
        now = time.time()
        with self._lock:
            self.started.append((vm, tuple(argv), now))
            workload_id = str(next(self._ids))
            self._runs[workload_id] = WorkloadRun(vm, workload_id, tuple(argv), now, now + 0.01, 0)
            return self._runs[workload_id]

    def wait_workload(self, vm: str, workload_id: str, timeout_s: float) -> WorkloadRun:
        return self._runs[workload_id]

    def cpu_use(self, interval_s: float) -> CpuUse:
        time.sleep(interval_s)
        return CpuUse(interval_s, {}, {})


class CcStub:
    def __init__(self) -> None:
        self.configs: list = []

    def put(self, path: str, config: object) -> None:
        self.configs.append(config)

    def get(self, path: str, **query: object) -> object:
        return [] if path == "/v1/events" else {"in_flight": None}


def _lab_executor(driver: FakeDriver) -> LabExecutor:
    lab = SimpleNamespace(pms=[SimpleNamespace(name=f"tb-pm{k}", link_rate_bps=100_000_000) for k in (1, 2, 3)])
    return LabExecutor(lab, {"qemu": driver}, CcStub(), sample_period_s=0.05)


def test_the_lab_executor_creates_each_vm_with_its_vcpus_and_starts_its_own_chains_after_its_delay() -> None:
    run = _run(start_delay_s={"vm3": 0.4, "vm4": 0.8}, scale=0.5, balancer={"signal": "demand"})
    driver = FakeDriver()
    lab_executor = _lab_executor(driver)
    lab_executor._create_vms(driver, run, {})
    assert {vm: spec.vcpus for vm, spec in driver.created.items()} == {"vm1": 1, "vm2": 1, "vm3": 1, "vm4": 2}
    assert driver.hosts == {"vm1": "tb-pm1", "vm2": "tb-pm2", "vm3": "tb-pm1", "vm4": "tb-pm2"}
    driver.started.clear()  # the creation's probes
    began = time.time()
    result = lab_executor._measure(driver, run, {})
    assert result.status == "ok", result.details
    assert lab_executor.cc.configs[0].signal == "demand"  # the spec's signal, to the CC
    started = {vm: [(argv, t - began) for v, argv, t in driver.started if v == vm] for vm in driver.created}
    assert [len(started[vm]) for vm in ("vm1", "vm2", "vm3", "vm4")] == [1, 1, 2, 2]
    assert started["vm1"][0][0] == ("synthetic1", str(round(SYNTHETIC1_BLOCKS * 1.5)))
    assert {argv for argv, _ in started["vm3"]} == {("synthetic1", str(round(SYNTHETIC1_BLOCKS * 0.25)))}
    # delays x the spec's scale (0.5), whatever the VM's work: vm3 at 0.2 s, vm4 at 0.4 s
    assert max(t for _, t in started["vm1"] + started["vm2"]) < 0.15
    assert all(0.2 <= t < 0.35 for _, t in started["vm3"])
    assert all(0.4 <= t < 0.55 for _, t in started["vm4"])


def test_the_run_timeout_follows_the_longest_vm_work() -> None:
    assert _run().spec.max_vm_scale() == 1.5
    assert parse_spec(SPEC | {"per_vm": {}}).max_vm_scale() == 0.5

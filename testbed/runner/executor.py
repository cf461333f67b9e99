"""The lab's RunExecutor: one run of a balancing experiment on real hosts, VMs and the VM manager.

For every run, in this order (each check is recorded in the run's details under `gate`):
1. quiet the Central Controller (dry run, no label) so nothing migrates while the lab is reset;
2. reset: destroy every experiment VM (vm1, vm2, ...) of the technique, then check that no VM of
   any kind is left on a PM (a nested cgroup holding tasks) and that every PM is idle, waiting a
   while for another user's passing work to end;
3. check every host's clock offset (the ntp role's chronyd reports) and, per VM, that its disk on
   the PMs' shared storage is reachable (the disk is created fresh over nfs://, which is the check);
4. create the VMs where the layout puts them (PMs in parallel, one boot at a time per PM), check
   that each runs a one-block Synthetic1 over its workload channel (if not, it is booted again, at
   most twice), and read the placement back from the driver: a placement that did not apply marks
   the run `invalid`;
5. give the CC the run's config (migration on: the spec's policy; off: dry run, so its rounds are
   logged all the same) with the run id as label, start every workload at once and wait for all
   of them with a bounded timeout, sampling every PM's and VM's CPU meanwhile (the Fig. 4.4
   timeline, finer than the CC's rounds);
6. quiet the CC again, wait for a migration in flight to end, read the run's round and migration
   events, and destroy the VMs.

The same run drives a real lab (testbed.lab_drivers: its `testbed_technique`'s driver over SSH,
its PMs' LCs with the same driver): there the reset's stray VMs are whatever the driver lists, the
driver makes each VM's disk on the share of the PM it boots on, and the CC's token is the one its
controller holds (testbed.manager.tokens).

A gate that fails ends the run at once as `invalid` (the campaign adds a repetition in its place);
a VM that cannot be created, a workload that fails or does not end in time makes it `failed`.
Only a lab that cannot be driven at all (the CC does not answer) raises, which stops the campaign.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import re
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx

from testbed.drivers.base import Driver, VMSpec, WorkloadRun
from testbed.errors import InputError
from testbed.lab import Lab
from testbed.manager.api import CcConfig, ManagerClient
from testbed.results import CpuSample, MigrationRow, VmTime
from testbed.runner.campaign import Run, RunResult
from testbed.runner.layouts import vm_names
from testbed.runner.time_scale import ManagerTimes, manager_times
from testbed.spec import Spec
from testbed.techniques import EMBEDDED, RUNNABLE, technique

#: Apps this executor turns into guest programs (the guest image ships synthetic1 and busybox;
#: `kernel` runs in the Kernel app's Debian root: a QEMU kernel guest's disk holds it, and a
#: container has it at /mnt as an overlay, testbed.drivers.container).
APPS = ("synthetic1", "synthetic-random", "kernel")
#: The Kernel app (thesis §4.4: `make -j8 bzImage`, 2 jobs per core): `make -j(2 x vCPUs)` of the
#: first KERNEL_OBJECTS x scale objects of the kernel guest's list (docs/workloads.md).
KERNEL_OBJECTS = 12  # ~10-14 s each in a TCG guest at full speed, plus ~20 s of kbuild per make
KERNEL_JOBS_PER_VCPU = 2
KERNEL_PROGRAM = ("chroot", "/mnt", "/usr/local/bin/kernel")  # the root is at /mnt in guests and containers
#: The kernel guest's root disk in each PM's share (the qemu role builds it there); a kernel VM's
#: disk is a qcow2 overlay of the one in its owner's share, so the compile writes to the VM's disk.
KERNEL_ROOT = "images/kernel-root.qcow2"
SYNTHETIC1_BLOCKS = 18_000  # a full Synthetic1 run (thesis §4.4); scaled by the spec's `scale`
#: Seconds a whole run may last at scale 1 (far above the slowest case measured here), plus a
#: fixed margin for boot-level slowness; scaled with the spec.
TIMEOUT_AT_SCALE_1_S = 7200.0
TIMEOUT_MARGIN_S = 300.0
CLOCK_BOUND_S = 0.05  # thesis App. B.4: a host behind its peers slows migrated VMs down
IDLE_BOUND_PCT = 10.0  # a PM with no VM uses less than this much of its capacity
RESET_WAIT_S = 120.0  # how long a reset waits for stray VMs or load to go before refusing the run
SAMPLE_PERIOD_S = 2.0
CREATE_RETRIES = 2  # boots again a VM whose workload channel does not answer (see _create_vms)
PROBE_TIMEOUT_S = 30.0
#: A one-block Synthetic1: proves the workload channel answers and the guest's timers work.
PROBE = ("synthetic1", "1", "1")
WATCH_PERIOD_S = 5.0  # how often a waiting run checks that its VMs still run
WATCH_MISSES = 2  # checks in a row that must miss a VM before it counts as stopped (see _wait)
MIGRATION_DRAIN_S = 600.0  # how long a migration in flight may take to end after the workloads
REPO = Path(__file__).resolve().parents[2]
EXPERIMENT_VM = re.compile(r"vm[0-9]+")  # testbed.runner.layouts.vm_names


class GateFailed(Exception):
    """A validity check refused the run; the message says which and why."""


@dataclass(frozen=True)
class Step:
    """Programs started together in a VM; the step ends when all of them have."""

    argvs: tuple[tuple[str, ...], ...]


def supported(spec: Spec, techniques: Sequence[str]) -> None:
    """Refuse (InputError, before any host is touched) what this executor cannot run."""
    where = f"{spec.name}"
    if spec.kind != "balancing":
        raise InputError(f"{where}: kind: the lab executor runs balancing experiments, not {spec.kind!r}")
    if spec.app not in APPS:
        raise InputError(f"{where}: app: {spec.app!r} has no guest program yet (available: {', '.join(APPS)})")
    runnable(where, "the lab executor", techniques)
    for variant in spec.variants():
        if variant.app not in APPS:
            raise InputError(f"{where}: matrix.app: {variant.app!r} has no guest program yet")
        if variant.app == "kernel":
            kernel_single(spec)
            kernel_fits(spec, techniques)
        if variant.link_rate is not None:
            raise InputError(f"{where}: matrix.link_rate: link rate variants are run by the migration study "
                             "(kind: migration) only")


def on_lab(spec: Spec, lab: Lab, techniques: Sequence[str]) -> None:
    """Refuse (InputError, before any host is touched) what this lab cannot run: a technique its
    PMs do not run (testbed.lab_drivers), and on a real lab what only the embedded lab has (the
    migration study's link shaping and services, the Kernel app's root disk on the shares)."""
    from testbed.lab_drivers import refuse_off_lab

    refuse_off_lab(lab, techniques, spec.name)
    if lab.embedded:
        return
    if spec.kind != "balancing":
        raise InputError(f"{spec.name}: kind: on a real lab `testbed run` runs balancing experiments only yet, "
                         f"not {spec.kind!r}")
    if any(variant.app == "kernel" for t in techniques for variant in spec.variants(t)):
        raise InputError(f"{spec.name}: app: the kernel app's root disk is built on the embedded lab's shares only "
                         "yet; run synthetic1 or synthetic-random on a real lab")


def kernel_single(spec: Spec) -> None:
    """Refuse a Kernel app with more than one instance in a VM (the spec's, or a VM's own)."""
    if spec.instances != 1:
        raise InputError(f"{spec.name}: instances: the kernel app compiles one tree per VM (instances: 1)")
    for vm, own in spec.per_vm.items():
        if own.instances not in (None, 1):
            raise InputError(f"{spec.name}: per_vm.{vm}.instances: the kernel app compiles one tree per VM "
                             "(instances: 1)")


def runnable(where: str, runner: str, techniques: Sequence[str]) -> None:
    """Refuse a technique `runner` cannot drive on a lab, with the technique catalogue's reason."""
    for name in techniques:
        if reason := technique(name).unrunnable:
            raise InputError(f"{where}: techniques: {name!r} is not run by {runner} yet: {reason} "
                             f"(available: {', '.join(RUNNABLE)}; use --technique)")


def kernel_fits(spec: Spec, techniques: Sequence[str]) -> None:
    """Refuse a Kernel app whose `make -j(2 x vCPUs)` would be OOM-killed in a VM that cannot swap
    to a disk of its own (a container swaps only if its PM has swap: the embedded lab's, with
    lab_host_swap_mb set): one that needs more than its memory limit, on PMs (this machine's
    kernel) without swap for the excess."""
    vms = vm_names(spec.vms)
    jobs = KERNEL_JOBS_PER_VCPU * max(spec.vm_vcpus(vm) for vm in vms)
    for name in techniques:
        can = technique(name)
        if can.kernel_mb_per_job is None or spec.memory_mb >= (need := can.kernel_mb_per_job * jobs):
            continue
        swap_need = sum(max(0, can.kernel_mb_per_job * KERNEL_JOBS_PER_VCPU * spec.vm_vcpus(vm) - spec.memory_mb)
                        for vm in vms)
        swap = machine_swap_mb()
        if swap < swap_need:
            raise InputError(f"{spec.name}: memory_mb: the kernel app compiles with -j{jobs} ({KERNEL_JOBS_PER_VCPU} "
                             f"jobs per vCPU), which needs memory_mb >= {need} in {can.vm_noun}, or {swap_need} MB of "
                             f"swap on the PMs for {spec.vms} of them (this machine has {swap} MB: set lab_host_swap_mb "
                             "in the inventory, then `testbed lab up`); raise memory_mb, lower vcpus or use "
                             f"--technique {' or '.join(n for n in EMBEDDED if technique(n).kernel_mb_per_job is None)}")


def machine_swap_mb() -> int:
    """Swap of this machine, whose kernel the embedded lab's PMs (and so its containers) share."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("SwapTotal:"):
            return int(line.split()[1]) // 1024
    return 0


@cache
def _synthetic_random() -> ModuleType:
    """workloads/synthetic_random.py, whose seeded draws are the one definition of the app."""
    path = REPO / "workloads" / "synthetic_random.py"
    module_spec = importlib.util.spec_from_file_location("synthetic_random", path)
    assert module_spec and module_spec.loader
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def chains(run: Run, vm: str) -> list[list[Step]]:
    """The programs a VM runs: one chain of steps per app instance, all chains at once.

    A VM runs the spec's `instances` (or its own, `per_vm`) and its work is scaled by the spec's
    scale times its own work multiplier (Spec.vm_scale). Synthetic1 is one step (the C program,
    its block count scaled). Synthetic-Random is driven from here, draw by draw, over the workload
    channel, since the guest has no Python: the draws come from workloads/synthetic_random.py with
    the VM's seed (instance k: seed + k), each starting one, two or four Synthetic1 in the guest
    or the guest's `sleep`."""
    scale = run.spec.vm_scale(vm)
    instances = run.spec.vm_instances(vm)
    if run.variant.app == "kernel":
        objects = str(max(1, round(KERNEL_OBJECTS * scale)))
        kernel = (*KERNEL_PROGRAM, str(KERNEL_JOBS_PER_VCPU * run.spec.vm_vcpus(vm)), objects)
        return [[Step((kernel,))] for _ in range(instances)]
    blocks = str(max(1, round(SYNTHETIC1_BLOCKS * scale)))
    synthetic1 = ("synthetic1", blocks)
    if run.variant.app == "synthetic1":
        return [[Step((synthetic1,))] for _ in range(instances)]
    sr = _synthetic_random()
    result = []
    for k in range(instances):
        steps = []
        for r in sr.draws(run.workload_seed(vm) + k):
            count = sr.instances_for(r)
            sleep = ("sleep", f"{sr.SLEEP_S * scale:g}")
            steps.append(Step((synthetic1,) * count if count else (sleep,)))
        result.append(steps)
    return result


@dataclass
class _VmRuns:
    """What a VM's chains did: every workload run, or why a chain stopped."""

    runs: list[WorkloadRun] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _run_chain(driver: Driver, vm: str, steps: Sequence[Step], delay_s: float, deadline: float,
               out: _VmRuns, lock: threading.Lock) -> None:
    if delay_s:
        time.sleep(delay_s)
    for step in steps:
        started = [driver.start_workload(vm, list(argv)) for argv in step.argvs]
        with lock:
            out.runs.extend(started)
        for workload in started:
            done = _wait(driver, vm, workload, deadline)
            if done.exit_status != 0:
                raise RuntimeError(f"{' '.join(workload.argv)} exited with {done.exit_status}: "
                                   f"{[line for _, line in done.output[-3:]]}")


def _wait(driver: Driver, vm: str, workload: WorkloadRun, deadline: float) -> WorkloadRun:
    """Wait for a workload to end, checking every few seconds that its VM still runs: a guest
    that crashed (its QEMU exits: -no-reboot) never reports an end, and the run would otherwise
    wait for the whole timeout. A VM must be missing twice in a row: at a live migration's
    switchover a libvirt domain is paused on its source and not yet resumed on its destination,
    so for a moment no PM lists it running."""
    missing = 0
    while True:
        done = driver.wait_workload(vm, workload.id, max(0.0, min(WATCH_PERIOD_S, deadline - time.time())))
        if done.finished:
            return done
        if time.time() >= deadline:
            raise TimeoutError(f"{' '.join(workload.argv)} still running at the deadline")
        running = any(info.name == vm and info.running for info in driver.list_vms())
        missing = 0 if running else missing + 1
        if missing >= WATCH_MISSES:
            raise RuntimeError(f"the VM stopped running during {' '.join(workload.argv)} (guest crash?)")


class _CpuSampler:
    """Samples every PM's and VM's CPU through the driver every `period` until stopped.
    `pm_is_its_vms`: a PM's figure is the sum of its VMs' (PMs sharing one kernel, whose
    /proc/stat is the machine's: testbed.lab.PM_CPU_SOURCES)."""

    def __init__(self, driver: Driver, period: float, pm_is_its_vms: bool = False) -> None:
        self.driver = driver
        self.period = period
        self.pm_is_its_vms = pm_is_its_vms
        self.origin = time.time()
        self.samples: list[CpuSample] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cpu-sampler", daemon=True)

    def start(self, origin: float) -> None:
        self.origin = origin
        self._thread.start()

    def stop(self) -> list[CpuSample]:
        self._stop.set()
        self._thread.join(timeout=self.period + 30)
        return self.samples

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                where = {info.name: info.host for info in self.driver.list_vms() if info.running}
                began = time.time()
                use = self.driver.cpu_use(self.period)
            except Exception as err:  # noqa: BLE001 - a VM vanishing mid-read costs one sample, not the run
                self.errors.append(f"{type(err).__name__}: {err}")
                time.sleep(self.period)
                continue
            t = round(began - self.origin, 3)  # the interval's start: plots draw it as a step
            hosts = use.hosts
            if self.pm_is_its_vms:
                hosts = {host: sum(pct for vm, pct in use.vms.items() if where.get(vm) == host) for host in hosts}
            self.samples += [CpuSample(t, host, "", pct) for host, pct in hosts.items()]
            self.samples += [CpuSample(t, where[vm], vm, pct) for vm, pct in use.vms.items() if vm in where]


class LabExecutor:
    """The RunExecutor of the embedded (or a real) lab, over the drivers and the VM manager."""

    def __init__(self, lab: Lab, drivers: Mapping[str, Driver], cc: ManagerClient, *,
                 timeout_s: float | None = None, sample_period_s: float = SAMPLE_PERIOD_S,
                 clock_bound_s: float = CLOCK_BOUND_S, idle_bound_pct: float = IDLE_BOUND_PCT,
                 reset_wait_s: float = RESET_WAIT_S, log: Callable[[str], None] = lambda _: None) -> None:
        self.lab = lab
        self.drivers = drivers
        self.cc = cc
        self.timeout_s = timeout_s
        self.sample_period_s = sample_period_s
        self.clock_bound_s = clock_bound_s
        self.idle_bound_pct = idle_bound_pct
        self.reset_wait_s = reset_wait_s
        self.log = log

    # --- the run ---------------------------------------------------------------------------

    def execute(self, run: Run) -> RunResult:
        driver = self.drivers[run.technique]
        gate: dict[str, Any] = {}
        details: dict[str, Any] = {"gate": gate}
        now = time.time()
        self._configure_cc(run, quiet=True)
        try:
            self.log("reset")
            _check(gate, "reset", lambda: self._reset(driver))
            _check(gate, "clock", self._check_clocks)
            disks = _check(gate, "storage", lambda: self._prepare_disks(run))["disks"]
            self.log("create VMs")
            _check(gate, "placement", lambda: self._create_vms(driver, run, disks))
        except GateFailed as err:
            details["error"] = str(err)
            details["cleanup"] = self._destroy_all(driver)
            return RunResult("invalid", now, time.time(), details=details)
        except Exception as err:  # noqa: BLE001 - a VM that would not start fails this run only
            details["error"] = f"{type(err).__name__}: {err}"
            details["cleanup"] = self._destroy_all(driver)
            return RunResult("failed", now, time.time(), details=details)
        try:
            return self._measure(driver, run, details)
        except Exception as err:  # noqa: BLE001 - a PM that stops answering fails this run, not the campaign
            details["error"] = f"{type(err).__name__}: {err}"
            return RunResult("failed", now, time.time(), details=details)
        finally:
            details["cleanup"] = self._destroy_all(driver)

    def _measure(self, driver: Driver, run: Run, details: dict[str, Any]) -> RunResult:
        timeout = self.timeout_s or TIMEOUT_MARGIN_S + TIMEOUT_AT_SCALE_1_S * run.spec.max_vm_scale()
        sampler = _CpuSampler(driver, self.sample_period_s, pm_is_its_vms=self._pm_is_its_vms)
        per_vm = {vm: _VmRuns() for vm in run.placement}
        lock = threading.Lock()
        config = self._configure_cc(run, quiet=False)
        details["manager_config"] = config.model_dump()
        started_at = time.time()
        deadline = started_at + timeout
        sampler.start(started_at)
        self.log("workloads")
        jobs = [(vm, chain) for vm in run.placement for chain in chains(run, vm)]
        pool = ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="workload")
        try:
            futures = {
                pool.submit(_run_chain, driver, vm, chain, run.spec.vm_delay_s(vm), deadline, per_vm[vm], lock): vm
                for vm, chain in jobs
            }
            for future, vm in futures.items():
                if (err := future.exception()) is not None:  # waits for the chain to end
                    per_vm[vm].errors.append(f"{type(err).__name__}: {err}")
        except BaseException:
            # Ctrl-C or SIGTERM: do not wait for the chains (up to the run's timeout); the caller
            # destroys the VMs next, which ends them.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        ends = [w.end for r in per_vm.values() for w in r.runs if w.end is not None]
        finished_at = max(ends, default=time.time())
        samples = sampler.stop()
        self.log("collect")
        self._configure_cc(run, quiet=True)
        events = self._run_events(run, started_at)
        located = {info.name: info.host for info in driver.list_vms()}
        vm_times, errors = [], {}
        for vm, pm in run.placement.items():
            runs = per_vm[vm]
            if runs.errors or not runs.runs or any(not w.finished for w in runs.runs):
                errors[vm] = runs.errors or ["no workload finished"]
                continue
            first = min(w.start for w in runs.runs if w.start is not None)
            vm_times.append(VmTime(vm, self._pm(pm), located.get(vm, ""), max(w.end for w in runs.runs) - first))
        details.update(
            workloads={vm: [{"argv": list(w.argv), "start": w.start, "end": w.end, "exit_status": w.exit_status}
                            for w in r.runs] for vm, r in per_vm.items()},
            sampler_errors=sampler.errors[:20],
            manager_rounds=[_round_summary(e, started_at) for e in events if e["kind"] == "round"],
        )
        if errors:
            details["error"] = f"workloads failed in {', '.join(sorted(errors))}"
            details["workload_errors"] = errors
        return RunResult("failed" if errors else "ok", started_at, finished_at, vm_times,
                         [_migration_row(e) for e in events if e["kind"] == "migration"], samples, details)

    def close(self) -> None:
        """After the campaign, or when it is interrupted: no more migrations, no VMs left
        running (best effort: the next run's reset checks the lab anyway)."""
        with contextlib.suppress(Exception):
            self.cc.put("/v1/config", CcConfig(dry_run=True))
        for driver in self.drivers.values():
            with contextlib.suppress(Exception):
                self._destroy_all(driver)

    @property
    def _pm_is_its_vms(self) -> bool:
        """A real lab whose PMs share one kernel (testbed_pm_cpu: vms): no PM's own CPU is known."""
        return getattr(self.lab, "pm_cpu", "machine") == "vms"

    # --- the gate ---------------------------------------------------------------------------

    def _pm(self, index: int) -> str:
        return self.lab.pms[index - 1].name

    def _reset(self, driver: Driver) -> dict[str, Any]:
        """Destroy the experiment VMs of every technique (a container vm1 left by an earlier
        campaign is as much in the way as a QEMU one, and would share a name with this run's);
        then no VM of any kind may be left, nor any load.

        What is left may be another user's passing work (a benchmark on a shared lab), so the
        check is repeated for up to `reset_wait_s` before the run is refused: refusing at once
        would spend every repetition of the campaign on the same moment of the lab."""
        destroyed = self._destroy_all(*self.drivers.values())
        if destroyed["errors"]:
            raise GateFailed(f"VMs left by an earlier run could not be destroyed: {destroyed['errors']}")
        deadline = time.monotonic() + self.reset_wait_s
        while True:
            stray = self._stray_vms()
            # PMs sharing one kernel have no load of their own to measure (the machine's is not
            # theirs): with no VM left on them they are idle by that account
            load = {pm.name: 0.0 for pm in self.lab.pms} if self._pm_is_its_vms else driver.cpu_use(1.0).hosts
            busy = {pm: round(pct, 1) for pm, pct in load.items() if pct > self.idle_bound_pct}
            if not stray and not busy:
                idle = {pm: round(p, 2) for pm, p in load.items()}
                return {"destroyed": destroyed["destroyed"], "idle_cpu_pct": idle,
                        "waited_s": round(self.reset_wait_s - (deadline - time.monotonic()), 1)}
            if time.monotonic() > deadline:
                if stray:
                    raise GateFailed(f"stray VMs left on the PMs after the reset: {stray}")
                raise GateFailed(f"PMs busy with no VM on them (% of capacity, bound {self.idle_bound_pct:g}): "
                                 f"{busy}")
            time.sleep(5)

    def _stray_vms(self) -> dict[str, list[str]]:
        """{PM: VMs of any kind on it} (PMs without any left out): on the embedded lab the PM's
        nested cgroups that hold tasks (a VM of any technique, or a container); on a real lab every
        VM its technique's driver lists there (whoever started it: not ours to destroy)."""
        if self.lab.embedded:
            found = {pm.name: _vm_cgroups(pm.cgroup("cpu")) for pm in self.lab.pms}
        else:
            found = {pm.name: [] for pm in self.lab.pms}
            for driver in self.drivers.values():
                for info in driver.list_vms():
                    found.setdefault(info.host, []).append(info.name)
        return {pm: sorted(vms) for pm, vms in found.items() if vms}

    def _destroy_all(self, *drivers: Driver) -> dict[str, Any]:
        """Destroy the drivers' experiment VMs (vm1, vm2, ...: whatever count a previous
        campaign had), never another VM: on a shared lab that is someone else's, and the reset's
        stray check refuses the run while it is there instead."""
        errors: dict[str, str] = {}
        found: list[tuple[Driver, str]] = []
        for driver in drivers:
            try:  # a real lab's PM may not answer (SSH): the run fails on it, the campaign goes on
                found += [(driver, info.name) for info in driver.list_vms() if EXPERIMENT_VM.fullmatch(info.name)]
            except Exception as err:  # noqa: BLE001 - reported; the next reset refuses its run on it
                errors[f"{driver.technique}:list"] = f"{type(err).__name__}: {err}"

        def destroy(driver: Driver, vm: str) -> None:
            try:
                driver.destroy_vm(vm)
            except Exception as err:  # noqa: BLE001 - reported; the next reset's stray check decides
                errors[f"{driver.technique}:{vm}"] = f"{type(err).__name__}: {err}"

        if found:
            with ThreadPoolExecutor(max_workers=len(found)) as pool:
                list(pool.map(destroy, *zip(*found, strict=True)))
        return {"destroyed": [vm for _, vm in found], "errors": errors}

    def _check_clocks(self) -> dict[str, Any]:
        """Every host within the bound of the lab's time server, as its own chronyd measures it."""
        from testbed.clock import clock_offsets

        try:
            offsets = clock_offsets(self.lab)
        except Exception as err:  # noqa: BLE001 - an unreadable clock is a failed check, whatever the cause
            raise GateFailed(f"clock offsets unreadable: {type(err).__name__}: {err}") from None
        off = {h: o for h, o in offsets.items() if abs(o) > self.clock_bound_s}
        if off:
            raise GateFailed(f"clock offsets beyond ±{self.clock_bound_s:g} s: {off}")
        return {"offsets_s": offsets, "bound_s": self.clock_bound_s}

    def _prepare_disks(self, run: Run) -> dict[str, Any]:
        """A fresh disk per VM on its owner PM's share, created over nfs:// (the reachability
        check: the owner's NFS server answered and wrote it).

        On a real lab the driver makes each VM's disk itself, on the share of the PM it boots on
        and over SSH there (libvirt: owned by QEMU's user before the NFS server first sees it, which
        a disk written over NFS from here would not be); the VM's boot, which opens it over nfs://,
        is then the reachability check."""
        from testbed.storage import DEFAULT_LAYOUT, create_disk_argv, disk_url, spread

        if not self.lab.embedded:
            return {"disks": {}, "made_by": "the driver, on the share of the PM each VM boots on"}

        owners = spread(list(run.placement), [pm.name for pm in self.lab.pms])
        disks = {vm: disk_url(self.lab, vm, owner) for vm, owner in owners.items()}

        def create(vm: str) -> str | None:
            owner = owners[vm]
            if run.variant.app == "kernel":  # an overlay of the root disk (its size), over nfs:// too
                root = f"nfs://{self.lab.host(owner).address}{DEFAULT_LAYOUT.share(owner) / KERNEL_ROOT}"
                argv = create_disk_argv(disks[vm], backing=root)
            else:
                argv = create_disk_argv(disks[vm], size="256M")
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
            return None if proc.returncode == 0 else proc.stderr.strip() or f"exit {proc.returncode}"

        with ThreadPoolExecutor(max_workers=len(disks)) as pool:
            failures = {vm: e for vm, e in zip(disks, pool.map(create, disks), strict=True) if e}
        if failures:
            raise GateFailed(f"VM storage unreachable: {failures}")
        return {"disks": disks}

    def _create_vms(self, driver: Driver, run: Run, disks: Mapping[str, str]) -> dict[str, Any]:
        """The PMs in parallel, each booting its VMs one at a time: seven guests booting at once
        on one PM's 0.6 CPU were seen to come up with broken timers (a workload's first usleep
        never returned); then the placement read back must match."""
        want = {vm: self._pm(pm) for vm, pm in run.placement.items()}

        def create(vm: str) -> int:
            """Create the VM; recreate it while it dies at boot or its workload channel does not
            answer (returns how many times): such a guest would never run a workload."""
            for attempt in range(1 + CREATE_RETRIES):
                try:
                    driver.create_vm(VMSpec(vm, run.spec.memory_mb, run.spec.vm_vcpus(vm), disks.get(vm)), want[vm])
                    probe = driver.start_workload(vm, list(PROBE))
                    if driver.wait_workload(vm, probe.id, PROBE_TIMEOUT_S).exit_status == 0:
                        return attempt
                except Exception:  # a guest that crashed or does not answer: boot it again
                    if attempt == CREATE_RETRIES:
                        raise
                driver.destroy_vm(vm)
            raise GateFailed(f"{vm}: its workload channel did not answer after {1 + CREATE_RETRIES} boots")

        def create_on(pm: str) -> dict[str, int]:
            return {vm: create(vm) for vm in want if want[vm] == pm}

        pms = sorted(set(want.values()))
        with ThreadPoolExecutor(max_workers=len(pms)) as pool:
            recreated = {vm: n for done in pool.map(create_on, pms) for vm, n in done.items() if n}
        have = {info.name: info.host for info in driver.list_vms() if info.running}
        if have != want:
            wrong = {vm: {"want": want.get(vm), "have": have.get(vm)}
                     for vm in sorted(set(want) | set(have)) if want.get(vm) != have.get(vm)}
            raise GateFailed(f"placement read back differs from the layout: {wrong}")
        return {"placement": have, "recreated": recreated}

    # --- the manager ------------------------------------------------------------------------

    def manager_times(self, spec: Spec) -> ManagerTimes:
        """The CC's interval, cool-down and settling for `spec` on this lab (its slowest PM link
        bounds how fast a VM can be moved, hence the cool-down's floor)."""
        return manager_times(spec, min(pm.link_rate_bps for pm in self.lab.pms))

    def _configure_cc(self, run: Run, quiet: bool) -> CcConfig:
        """Quiet: decide nothing (between runs). Else the run's config, labelled with its id."""
        balancer = run.spec.balancer
        times = self.manager_times(run.spec)
        config = CcConfig(
            policy=balancer.policy, params=balancer.params, interval=times.interval_s,
            signal=balancer.signal, cooldown=times.cooldown_s,
            mode=run.variant.mode or technique(run.technique).default_mode,
            compression=run.variant.order_compression,
            dry_run=quiet or not run.variant.migration, label=None if quiet else run.run_id,
        )
        self._cc_call(lambda: self.cc.put("/v1/config", config))
        if quiet:
            self._wait_no_migration()
        return config

    def _wait_no_migration(self) -> None:
        deadline = time.monotonic() + MIGRATION_DRAIN_S
        while self._cc_call(lambda: self.cc.get("/v1/status")).get("in_flight") is not None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the CC's migration in flight did not end in {MIGRATION_DRAIN_S:g} s")
            time.sleep(0.5)

    def _run_events(self, run: Run, since: float) -> list[dict[str, Any]]:
        interval = self.manager_times(run.spec).interval_s
        return self._cc_call(lambda: self.cc.get("/v1/events", since=since - interval, label=run.run_id))

    def _cc_call(self, call: Callable[[], Any]) -> Any:
        """A CC request, retried for a while (the supervisor respawns a CC that died)."""
        for attempt in range(10):
            try:
                return call()
            except httpx.TransportError:
                if attempt == 9:
                    raise
                time.sleep(3)
        raise AssertionError("unreachable")


def _check(gate: dict[str, Any], name: str, check: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one validity check and record it in the gate: its findings, or why it failed."""
    try:
        found = check()
    except GateFailed as err:
        gate[name] = {"ok": False, "error": str(err)}
        raise
    except Exception as err:
        gate[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        raise
    gate[name] = {"ok": True, **found}
    return found


def _vm_cgroups(pm_cpu_cgroup: Path) -> list[str]:
    """Nested cgroups of a PM that hold tasks: VMs or containers of any technique."""
    found = []
    for child in sorted(pm_cpu_cgroup.iterdir()) if pm_cpu_cgroup.is_dir() else ():
        with contextlib.suppress(FileNotFoundError):
            if child.is_dir() and (child / "tasks").read_text().strip():
                found.append(child.name)
    return found


def _migration_row(event: Mapping[str, Any]) -> MigrationRow:
    """A CC migration event as a migrations.csv row (a failed order without a record has no times)."""
    record = event.get("record") or {}
    return MigrationRow(
        vm=event["vm"], source=event["source"], destination=event["dest"],
        mode=record.get("mode", ""), started_at=record.get("start", event["t"]),
        total_time_s=record.get("total_time_s", math.nan), downtime_s=record.get("downtime_s"),
        bytes=record.get("bytes", 0), status=record.get("status", "completed" if event["ok"] else "failed"),
    )


def _round_summary(event: Mapping[str, Any], origin: float) -> dict[str, Any]:
    """A CC round as the run keeps it: when, what the balancer saw and decided, what was done."""
    return {"t_s": round(event["t"] - origin, 3), "round": event.get("round"), "action": event.get("action"),
            "decision": event.get("decision"), "order": event.get("order"), "snapshot": event.get("snapshot")}


# --- construction and provenance ---------------------------------------------------------------

def make_drivers(lab: Lab) -> dict[str, Driver]:
    """The drivers of the techniques the lab runs, made as the Local Controllers make theirs
    (which migrate with the driver that lists the VM, so both sides see the same VMs); a real
    lab's reach its PMs with the inventory's key and known hosts (testbed.lab_drivers)."""
    from testbed.lab_drivers import lab_drivers

    return lab_drivers(lab)


def cc_client(lab: Lab, token_file: Path | None = None) -> ManagerClient:
    """A client of the lab's CC with the lab's own token (testbed.manager.tokens: `token_file`,
    else the embedded lab's file, else the real lab's controller's), never another lab's."""
    from testbed.manager import CC_PORT
    from testbed.manager.api import url_for
    from testbed.manager.tokens import lab_token

    return ManagerClient(url_for(lab.controller.address, CC_PORT), lab_token(lab, token_file), timeout=30)


def lab_facts(lab: Lab) -> dict[str, Any]:
    """Ansible facts of every host (OS, kernel, CPU, memory) and the PMs' QEMU version, gathered
    with ansible-runner exactly as the playbooks see the hosts (same ansible.cfg and venv)."""
    import tempfile

    from testbed import ansible

    wanted = ("distribution", "distribution_version", "kernel", "architecture", "processor",
              "processor_vcpus", "memtotal_mb", "hostname")
    facts: dict[str, dict[str, Any]] = {h.name: {} for h in lab.hosts}

    def ad_hoc(pattern: str, module: str, args: str) -> list[tuple[str, dict[str, Any]]]:
        with tempfile.TemporaryDirectory(prefix="testbed-facts-") as tmp:
            result = ansible.run(private_data_dir=tmp, inventory=str(Path(lab.inventory).resolve()),
                                 host_pattern=pattern, module=module, module_args=args, quiet=True)
            return [(e["event_data"]["host"], e["event_data"]["res"]) for e in result.events
                    if e.get("event") == "runner_on_ok"]

    for host, res in ad_hoc("lab", "ansible.builtin.setup", "gather_subset=!all,!min,hardware,distribution,platform"):
        got = res.get("ansible_facts", {})
        facts[host] |= {key: got.get(f"ansible_{key}") for key in wanted}
    for host, res in ad_hoc("pms", "ansible.builtin.command", "qemu-system-x86_64 --version"):
        facts[host]["qemu"] = res.get("stdout", "").partition("\n")[0]
    return {
        "inventory": str(lab.inventory),
        "embedded": lab.embedded,
        "hosts": [{"name": h.name, "role": h.role, "address": h.address, "capacity": h.capacity,
                   "cores": h.cores, "link_rate": h.link_rate} for h in lab.hosts],
        "facts": facts,
    }

"""The Driver protocol every virtualization technique implements, and the records it returns.

The manager's Local Controller, the runner and the benchmarks talk to VMs only through this
protocol, so it is technology-neutral: a VM is a name with a memory size and vCPUs that runs on
a PM, runs workloads whose start and end the host clock times, uses CPU that its PM's cgroups
account for, and migrates to another PM in one of the thesis' modes (§2.3), yielding one
MigrationRecord with every figure measured, never estimated.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from testbed.lab import Lab

CGROUP_ROOT = Path("/sys/fs/cgroup")


class MigrationMode(enum.StrEnum):
    """How memory reaches the destination (thesis §2.3)."""

    PRECOPY = "precopy"  # copy while running, then a short stop for the last dirty pages
    STOPCOPY = "stopcopy"  # stop first, copy everything, resume (OpenVZ-style): downtime = total
    POSTCOPY = "postcopy"  # resume at the destination at once, fetch pages on demand


@dataclass(frozen=True)
class Host:
    """A PM as the driver needs it: facts from the lab inventory, passed in as data.

    `netns` names the network namespace the PM lives in on the embedded lab; None on a real
    lab, where the driver runs on the PM itself. `cgroup_parent` is the directory under
    each cgroup controller that holds the PMs' cgroups (`testbed` on the embedded lab).
    """

    name: str
    address: str
    capacity: float  # CPUs the PM may use
    cores: int  # cores it stands for: a k-vCPU VM is capped at k/cores of the capacity
    netns: str | None = None
    cgroup_parent: str = "testbed"
    cgroup_root: Path = CGROUP_ROOT

    def cgroup(self, controller: str) -> Path:
        return self.cgroup_root / controller / self.cgroup_parent / self.name


def pm_hosts(lab: Lab) -> list[Host]:
    """The lab's PMs as driver hosts; on the embedded lab each lives in its own namespace."""
    from testbed import lab as lab_facts

    return [
        Host(pm.name, pm.address, pm.capacity, pm.cores, netns=pm.name if lab.embedded else None,
             cgroup_parent=lab_facts.CGROUP_PARENT)
        for pm in lab.pms
    ]


@dataclass(frozen=True)
class VMSpec:
    """What a VM is made of; the same spec is used to start it again on a destination PM.

    `disk` is a path or URL (e.g. `nfs://198.18.0.11/vms/vm1.qcow2`) on storage every PM
    reaches; None lets the driver pick a path next to the VM's state.
    """

    name: str
    memory_mb: int = 128
    vcpus: int = 1
    disk: str | None = None


@dataclass(frozen=True)
class VMInfo:
    name: str
    host: str
    spec: VMSpec
    running: bool


@dataclass
class WorkloadRun:
    """One program run in a VM, timed by the host clock (seconds since the epoch)."""

    vm: str
    id: str
    argv: tuple[str, ...]
    start: float | None = None
    end: float | None = None
    exit_status: int | None = None
    output: list[tuple[float, str]] = field(default_factory=list)  # (host time, line)

    @property
    def finished(self) -> bool:
        return self.end is not None

    @property
    def duration_s(self) -> float | None:
        return None if self.start is None or self.end is None else self.end - self.start


@dataclass(frozen=True)
class CpuUse:
    """CPU used over one interval, in percent of the PM's capacity (the thesis' load figures).

    `vms` maps each VM to the share of its *current* PM's capacity it used.
    """

    interval_s: float
    hosts: dict[str, float]
    vms: dict[str, float]


@dataclass
class MigrationRecord:
    """One migration as measured: host-clock times and the technique's own counters."""

    vm: str
    source: str
    destination: str
    mode: MigrationMode
    start: float  # host clock, seconds since the epoch, when the migration was ordered
    status: str  # "completed" or "failed"
    total_time_s: float
    downtime_s: float | None  # the VM's real outage; None when it never stopped
    bytes: int  # bytes sent over the network
    rounds: int = 0  # memory passes (pre-copy iterations)
    phases: dict[str, float] = field(default_factory=dict)  # phase name -> seconds
    error: str | None = None
    details: dict[str, object] = field(default_factory=dict)  # technique-specific counters

    def as_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["mode"] = str(self.mode)
        return data


@dataclass(frozen=True)
class MigrationOrder:
    """A migration as ordered: the fields every record of it starts with, whatever the
    toolstack then reports, in one place so that failed and completed records agree."""

    vm: str
    source: str
    destination: str
    mode: MigrationMode
    start: float  # host clock when the migration was ordered

    def record(
        self,
        total_time_s: float,
        *,
        error: str | None = None,
        downtime_s: float | None = None,
        bytes_sent: int = 0,
        rounds: int = 0,
        phases: dict[str, float] | None = None,
        details: dict[str, object] | None = None,
    ) -> MigrationRecord:
        """The record; a failed migration left the VM running where it was, so it has no
        downtime."""
        return MigrationRecord(
            vm=self.vm,
            source=self.source,
            destination=self.destination,
            mode=self.mode,
            start=self.start,
            status="failed" if error else "completed",
            total_time_s=total_time_s,
            downtime_s=None if error else downtime_s,
            bytes=bytes_sent,
            rounds=rounds,
            phases=phases or {},
            error=error,
            details=details or {},
        )


@runtime_checkable
class Driver(Protocol):
    """What the testbed asks of a virtualization technique."""

    technique: str

    def hosts(self) -> list[Host]:
        """The PMs this driver places VMs on."""

    def list_vms(self) -> list[VMInfo]:
        """Every VM this driver knows, with the PM it runs on."""

    def cpu_use(self, interval_s: float) -> CpuUse:
        """Per-PM and per-VM CPU use measured over the next `interval_s` seconds."""

    def create_vm(self, spec: VMSpec, host: str) -> VMInfo:
        """Start a VM on a PM; returns once the guest can run workloads."""

    def destroy_vm(self, vm: str) -> None:
        """Stop a VM and remove everything it left on its PM; a no-op for an unknown VM."""

    def start_workload(self, vm: str, argv: list[str]) -> WorkloadRun:
        """Start a program in the VM; returns once the guest reported it started."""

    def workload(self, vm: str, workload_id: str) -> WorkloadRun:
        """The current state of a workload run (times, exit status, output so far)."""

    def wait_workload(self, vm: str, workload_id: str, timeout_s: float) -> WorkloadRun:
        """Block until the workload ends (or the timeout passes) and return its state."""

    def migrate(self, vm: str, destination: str, mode: MigrationMode, *,
                compression: str | None = None) -> MigrationRecord:
        """Move a running VM, its state compressed with `compression` on the wire (None:
        uncompressed; ValueError for one its technique does not offer); on failure the VM keeps
        running where it was."""

"""OpenVZ on a real lab (the thesis' 2.6.18-028stab kernel): vzlist, vzctl, /proc/vz/vestat and
vzmigrate, over SSH on each PM.

CPU: /proc/vz/vestat gives each container's user, nice and system time in clock ticks
(USER_HZ, as /proc/stat); /proc/stat gives the PM's. The driver reads /proc/uptime, /proc/stat
and /proc/vz/vestat in one command, twice, so both rates share the host's own elapsed time.

Migration: `vzmigrate-shared --online -v` (roles/openvz: vzmigrate with the private area on
storage every PM mounts, as the thesis adapted it). Its verbose messages mark the thesis' App. A
phases (1st rsync, suspend, dump, copy dump file, 2nd rsync, undump, resume); the driver stamps
each line as it arrives and a phase lasts from its message to the next. Newer vzmigrate also
prints its own timing table (print_times), which is kept beside them.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from testbed.drivers.base import CpuUse, Host, MigrationMode, MigrationOrder, MigrationRecord, VMInfo, VMSpec
from testbed.drivers.remote_base import RemoteDriverBase, stream_migration
from testbed.techniques import check_compression

VZMIGRATE = "/usr/local/sbin/vzmigrate-shared"
#: The guest programs (synthetic1) the openvz role builds on every PM: a container's template has
#: none, so each container gets a copy in its /usr/bin (on vzctl exec2's PATH) before it starts.
GUEST_PROGRAMS = "/var/lib/testbed/workloads"
#: vzmigrate's messages (bin/vzmigrate.in) -> the thesis' phase each one starts.
PHASE_MARKERS = {
    "Syncing private": "first_rsync",
    "Suspending container": "suspend",
    "Dumping container": "dump",
    "Copying dumpfile": "copy_dump",
    "Syncing private (2nd pass)": "second_rsync",
    "Syncing 2nd level quota": "quota",
    "Undumping container": "undump",
    "Resuming container": "resume",
    "Cleaning up": "cleanup",
}
#: Phases while the container is suspended: the downtime (App. A: all but the 1st rsync).
DOWNTIME_PHASES = ("suspend", "dump", "copy_dump", "second_rsync", "quota", "undump", "resume")
_TIMES_ROW = re.compile(r"^\s*(?P<name>[A-Za-z0-9 +]+?):\s+(?P<seconds>\d+\.\d+)\s*$")


@dataclass(frozen=True)
class Container:
    """One row of `vzlist -a`: the CTID, its name (or hostname) and status."""

    ctid: int
    status: str
    name: str
    nproc: int | None


def parse_vzlist(text: str) -> list[Container]:
    """`vzlist -a` / `vzlist -a -n` output: columns found by the header (VEID or CTID, NPROC,
    STATUS, IP_ADDR, HOSTNAME or NAME); `-` means none."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return []
    header = lines[0].split()
    id_col = "CTID" if "CTID" in header else "VEID"
    name_col = "NAME" if "NAME" in header else "HOSTNAME"
    containers = []
    for line in lines[1:]:
        row = dict(zip(header, line.split()))
        name = row.get(name_col, "-")
        nproc = row.get("NPROC", "-")
        containers.append(
            Container(
                int(row[id_col]),
                row["STATUS"],
                row[id_col] if name == "-" else name,
                None if nproc == "-" else int(nproc),
            )
        )
    return containers


@dataclass(frozen=True)
class CpuSample:
    """One read of a PM: its uptime (s), busy ticks, and each container's busy ticks."""

    uptime_s: float
    host_ticks: int
    containers: dict[int, int]


def parse_vestat(text: str) -> dict[int, int]:
    """/proc/vz/vestat (Version 2.2): CTID -> user + nice + system clock ticks."""
    ticks = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[0].isdigit():
            ticks[int(fields[0])] = int(fields[1]) + int(fields[2]) + int(fields[3])
    return ticks


def parse_cpu_sample(text: str) -> CpuSample:
    """`cat /proc/uptime /proc/stat /proc/vz/vestat`: one consistent read of a PM."""
    lines = text.splitlines()
    uptime = float(lines[0].split()[0])
    cpu = next(line.split() for line in lines if line.startswith("cpu "))
    # user nice system idle iowait irq softirq steal: busy = all but idle and iowait.
    values = [int(v) for v in cpu[1:9]]
    busy = sum(values) - values[3] - values[4]
    return CpuSample(uptime, busy, parse_vestat(text))


def cpu_between(
    before: CpuSample, after: CpuSample, ticks_per_s: int, host: Host
) -> tuple[float, dict[int, float]]:
    """(PM load, {CTID: load}) in percent of the PM's capacity between two samples."""
    elapsed = after.uptime_s - before.uptime_s
    if elapsed <= 0:
        raise ValueError("samples out of order")

    def pct(ticks: int) -> float:
        return 100.0 * ticks / ticks_per_s / elapsed / host.capacity

    return pct(after.host_ticks - before.host_ticks), {
        ctid: pct(ticks - before.containers[ctid])
        for ctid, ticks in after.containers.items()
        if ctid in before.containers
    }


def parse_vzmigrate(log: Sequence[tuple[float, str]]) -> tuple[dict[str, float], dict[str, float]]:
    """(phases from the timestamped messages, vzmigrate's own print_times table) in seconds."""
    marks: list[tuple[str, float]] = []
    table: dict[str, float] = {}
    for stamp, line in log:
        message = line.strip()
        if message in PHASE_MARKERS:
            marks.append((PHASE_MARKERS[message], stamp))
        elif row := _TIMES_ROW.match(line):
            table[row["name"].strip()] = float(row["seconds"])
    phases: dict[str, float] = {}
    for (name, start), (_, end) in itertools.pairwise(marks):
        phases[name] = phases.get(name, 0.0) + end - start
    return phases, table


class OpenVZDriver(RemoteDriverBase):
    """OpenVZ containers on the lab's PMs; a VM is a container whose name is the VM's name."""

    technique = "openvz"

    def __init__(
        self,
        hosts: Sequence[Host],
        key_file: Path,
        *,
        template: str = "centos-5-x86",
        private_root: str = "/var/lib/testbed/shared",
        known_hosts: Path | None = None,
    ) -> None:
        super().__init__(hosts, key_file, known_hosts)
        self.template, self.private_root = template, private_root
        self._ticks: dict[str, int] = {}
        # One container created at a time per driver: a CTID is the lowest no PM uses, and the runner
        # creates on every PM in parallel, so two creations at once took the same one, and a later
        # migration between those PMs failed (the destination has that CTID already). Seen on the
        # fake PMs (tests/test_openvz_fake_lab.py).
        self._creating = threading.Lock()

    def _containers(self, host: str) -> list[Container]:
        return parse_vzlist(self.remote(host).run(["vzlist", "-a", "-n"]))

    def _find(self, vm: str) -> tuple[str, Container]:
        for host, containers in self.on_every_pm(self._containers).items():
            for container in containers:
                if container.name == vm and container.status != "deleted":
                    return host, container
        raise KeyError(vm)

    def list_vms(self) -> list[VMInfo]:
        return [
            VMInfo(c.name, host, self._specs.get(c.name, VMSpec(c.name)), c.status == "running")
            for host, containers in self.on_every_pm(self._containers).items()
            for c in containers
        ]

    def vm_host(self, vm: str) -> str:
        return self._find(vm)[0]

    def guest_argv(self, vm: str, argv: Sequence[str]) -> list[str]:
        return ["vzctl", "exec2", vm, *argv]

    def _sample(self, host: str) -> CpuSample:
        return parse_cpu_sample(
            self.remote(host).run(["cat", "/proc/uptime", "/proc/stat", "/proc/vz/vestat"])
        )

    def cpu_use(self, interval_s: float) -> CpuUse:
        for host in self._hosts:
            if host not in self._ticks:
                self._ticks[host] = int(self.remote(host).run(["getconf", "CLK_TCK"]))
        before = self.on_every_pm(self._sample)
        time.sleep(interval_s)
        after = self.on_every_pm(self._sample)
        names = {
            c.ctid: c.name for containers in self.on_every_pm(self._containers).values() for c in containers
        }
        hosts, vms = {}, {}
        for host in self._hosts:
            hosts[host], per_ct = cpu_between(before[host], after[host], self._ticks[host], self._hosts[host])
            vms.update({names[ct]: pct for ct, pct in per_ct.items() if ct in names and ct != 0})
        return CpuUse(interval_s, hosts, vms)

    def create_vm(self, spec: VMSpec, host: str) -> VMInfo:
        remote = self.remote(host)
        with self._creating:
            ctid = self._free_ctid()
            private = spec.disk or f"{self.private_root}/{host}/roots/{ctid}"
            remote.run(
                ["vzctl", "create", str(ctid), "--ostemplate", self.template, "--private", private],
                timeout_s=1800,
            )
        remote.run(["mkdir", "-p", f"{private}/usr/bin"])
        remote.run(["cp", "-pR", f"{GUEST_PROGRAMS}/.", f"{private}/usr/bin/"])
        pages = spec.memory_mb * 256  # 4 KiB pages
        remote.run(
            [
                "vzctl",
                "set",
                str(ctid),
                "--name",
                spec.name,
                "--cpus",
                str(spec.vcpus),
                "--privvmpages",
                f"{pages}:{pages}",
                "--vmguarpages",
                f"{pages}:unlimited",
                "--save",
            ]
        )
        remote.run(["vzctl", "start", str(ctid)], timeout_s=300)
        return self.created(spec, host)

    def _free_ctid(self) -> int:
        used = {c.ctid for containers in self.on_every_pm(self._containers).values() for c in containers}
        return next(ctid for ctid in range(101, 100_000) if ctid not in used)

    def destroy_vm(self, vm: str) -> None:
        try:
            host, container = self._find(vm)
        except KeyError:
            return
        self.remote(host).run(["vzctl", "stop", str(container.ctid), "--fast"], timeout_s=300)
        self.remote(host).run(["vzctl", "destroy", str(container.ctid)], timeout_s=300)
        self._specs.pop(vm, None)

    def migrate(self, vm: str, destination: str, mode: MigrationMode, *,
                compression: str | None = None) -> MigrationRecord:
        mode = MigrationMode(mode)
        check_compression(self.technique, compression, mode.value)
        if mode is not MigrationMode.STOPCOPY:
            raise ValueError(f"OpenVZ migrates by stop-and-copy (checkpoint/restore) only, not {mode}")
        source, container = self._find(vm)
        argv = [VZMIGRATE, "--online", "-v", self._hosts[destination].address, str(container.ctid)]
        run = stream_migration(self.remote(source), argv)
        phases, table = parse_vzmigrate(run.log)
        return MigrationOrder(vm, source, destination, mode, run.start).record(
            run.total_s,
            error=run.error,
            downtime_s=sum(phases.get(p, 0.0) for p in DOWNTIME_PHASES) if "suspend" in phases else None,
            bytes_sent=run.sent_bytes,
            phases=phases,
            details={"ctid": container.ctid, "vzmigrate_times": table, "log": run.relative_log()},
        )

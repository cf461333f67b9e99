"""Where a Local Controller's CPU figures come from: a Sampler reads cumulative counters of its
PM and of the VMs on it, and `testbed.manager.local.summarize` turns two readings into percents.

Two kinds of PM, two samplers:
- The embedded lab (`CgroupSampler`, cgroup v1, the lab contract): a PM is the cgroup
  testbed/<pm>, which holds everything running "on" it, VMs and migration machinery alike; its
  capacity is that cgroup's quota; each VM is a nested cgroup testbed/<pm>/<vm> with its own
  quota; a VM's wait is the run_delay (ns runnable but not running, /proc/TID/schedstat) of
  every thread in its cgroup, which includes time throttled by a CFS quota, and cpu.stat's
  throttled_time is reported beside it.
- A real PM (`ProcStatSampler`): a whole machine with no lab cgroup (cgroup v2 on Debian 12, none
  on CentOS 5). The PM's use is /proc/stat's busy jiffies over its total jiffies, so its capacity
  is the CPUs /proc/stat counts; each VM's CPU time comes from its technique's own tools on the
  PM (`vm_reader`): libvirt's domain CPU time (kvm, through virsh), /proc/vz/vestat (openvz),
  the nested cgroups of the container technique. Those tools say nothing of a VM's waiting, so
  on a real PM a VM's demand is its use.
- A Xen PM (`XenSampler`, the catalogue's `pm_sampler` for xen): dom0's /proc/stat counts only
  dom0's vCPUs, not the guests the hypervisor runs beside it, so the PM's use and its guests' come
  from one `xl list`/`xm list` (every domain's CPU time, Domain-0 included) over the physical CPUs.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from testbed.drivers.base import CGROUP_ROOT, Host
from testbed.lab import CGROUP_CONTROLLERS, PM_CPU_SOURCES
from testbed.techniques import REAL_LAB, technique

if TYPE_CHECKING:
    from testbed.drivers.ssh import Remote

NS_PER_S = 1_000_000_000
PROC_STAT = Path("/proc/stat")
VESTAT = Path("/proc/vz/vestat")
TOOL_TIMEOUT_S = 10.0

_CLONE_NEWNS = 0x00020000
_MS_REC = 0x4000
_MS_SLAVE = 0x80000


@dataclass(frozen=True)
class VmCounters:
    """One VM's cumulative counters. `limit_cpus` None: no cap of its own (the PM's capacity)."""

    usage_ns: int
    run_delay_ns: dict[int, int] = field(default_factory=dict)
    throttled_ns: int = 0
    limit_cpus: float | None = None


@dataclass(frozen=True)
class Reading:
    """Cumulative counters at one instant (monotonic `t`, Unix `wall`).

    `host_total_ns`, when the PM counts it, is the CPU time its CPUs had in all (busy or not),
    so that its use is busy over total exactly; None: the capacity over the wall-clock time.
    `pm_is_its_vms`: the PM's own figure is unknown (PMs sharing one kernel, testbed.lab's
    PM_CPU_SOURCES "vms"), so its use is the sum of its VMs'."""

    t: float
    wall: float
    host_usage_ns: int
    vms: dict[str, VmCounters]
    host_total_ns: int | None = None
    pm_is_its_vms: bool = False


class Sampler(Protocol):
    """What the Local Controller samples: one PM's counters, read every sampling period."""

    host: str
    capacity: float  # CPUs the PM's percents are of

    def vm_names(self) -> list[str]:
        """The VMs on the PM now (the LC refuses to migrate any other)."""

    def read(self) -> Reading:
        """The counters now; OSError when the PM's counters are gone."""


# --- The embedded lab: cgroup v1 -----------------------------------------------------------------

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


def _throttled_ns(cpu_cgroup: Path) -> int:
    for line in (cpu_cgroup / "cpu.stat").read_text().splitlines():
        key, value = line.split()
        if key == "throttled_time":
            return int(value)
    return 0


def cgroup_vm_names(host: Host) -> list[str]:
    """The VMs are the cgroups nested in the PM's that hold at least one task: the driver names
    a VM's cgroup after the VM (one identity everywhere) and an emptied cgroup left behind by a
    migration is not a VM any more."""
    cpu = host.cgroup("cpu")
    return sorted(child.name for child in cpu.iterdir() if child.is_dir() and _holds_tasks(child))


def cgroup_vms(host: Host) -> dict[str, VmCounters]:
    """The counters of the VM cgroups nested in the PM's."""
    cpu, cpuacct = host.cgroup("cpu"), host.cgroup("cpuacct")
    vms = {}
    for name in cgroup_vm_names(host):
        try:
            vms[name] = VmCounters(
                usage_ns=_read_int(cpuacct / name / "cpuacct.usage"),
                run_delay_ns=_run_delays(cpu / name / "tasks"),
                throttled_ns=_throttled_ns(cpu / name),
                limit_cpus=_quota_cpus(cpu / name),
            )
        except FileNotFoundError:
            continue  # the VM left (migrated away or destroyed) while being read
    return vms


class CgroupSampler:
    """An embedded-lab PM: the counters of its cgroup and of the VM cgroups nested in it."""

    def __init__(self, host: Host) -> None:
        self._host = host
        self.host = host.name
        self.capacity = _quota_cpus(host.cgroup("cpu")) or float(os.cpu_count() or 1)

    def vm_names(self) -> list[str]:
        return cgroup_vm_names(self._host)

    def read(self) -> Reading:
        vms = cgroup_vms(self._host)
        return Reading(t=time.monotonic(), wall=time.time(),
                       host_usage_ns=_read_int(self._host.cgroup("cpuacct") / "cpuacct.usage"), vms=vms)


# --- A real PM: /proc/stat and the technique's tools ----------------------------------------------

@dataclass(frozen=True)
class ProcStat:
    """The machine's CPU time from /proc/stat's `cpu` line, in clock ticks (USER_HZ)."""

    busy_ticks: int
    total_ticks: int
    cpus: int  # the `cpuN` lines: the CPUs the totals are of


def parse_proc_stat(text: str) -> ProcStat:
    """Busy = user + nice + system + irq + softirq + steal; idle and iowait are not busy. guest
    and guest_nice are left out: the kernel already counts them in user and nice."""
    lines = text.splitlines()
    fields = next(line.split() for line in lines if line.startswith("cpu "))
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    busy = user + nice + system + irq + softirq + steal
    return ProcStat(busy_ticks=busy, total_ticks=busy + idle + iowait, cpus=cpus)


VmReader = Callable[[], dict[str, VmCounters]]
"""The VMs on a real PM and their counters, as the technique's tools report them; {} when the
tools do not answer (no VM is better than no sample: the CC balances on what it sees)."""
#: Runs argv on the PM and returns its stdout; OSError or SubprocessError when it fails. An LC on
#: its PM runs tools as subprocesses (`local_tool`); one on another host reaches the PM over SSH
#: (`ssh_tool`: the 2010 profile's PMs cannot run the LC's Python).
Tool = Callable[[list[str]], str]


def parse_domstats(text: str) -> dict[str, dict[str, str]]:
    """`virsh domstats` output: {domain: {field: value}}. Lines that are neither a `Domain:`
    header nor key=value pairs are skipped (the libvirt driver reads it after /proc/stat)."""
    fields: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("Domain: '") and line.endswith("'"):
            current = fields.setdefault(line[len("Domain: '"):-1], {})
        elif "=" in line:
            for pair in line.split():  # older virsh put several key=value on a line
                key, _, value = pair.partition("=")
                current[key] = value
    return fields


def domain_cpu_ns(fields: dict[str, str]) -> int | None:
    """A domain's CPU time (ns) in `virsh domstats --cpu-total --vcpu`: cpu.time, which libvirt
    reads from the domain's cgroup, or where it has none (libvirt without cgroup controllers, as
    in the test hosts) the sum of its vCPUs' vcpu.N.time; None when neither is there."""
    if "cpu.time" in fields:
        return int(fields["cpu.time"])
    vcpus = [int(value) for key, value in fields.items() if key.startswith("vcpu.") and key.endswith(".time")]
    return sum(vcpus) if vcpus else None


def libvirt_vms(domstats: str) -> dict[str, VmCounters]:
    """Running domains of `virsh domstats --cpu-total --vcpu`: CPU time (domain_cpu_ns) and
    vcpu.current."""
    return {name: VmCounters(usage_ns=ns, limit_cpus=float(f.get("vcpu.current") or 0) or None)
            for name, f in parse_domstats(domstats).items() if (ns := domain_cpu_ns(f)) is not None}


def xen_vms(xl_list: str) -> dict[str, VmCounters]:
    """Domains of `xl list` / `xm list` (the xen driver's parser) but dom0: CPU time and vCPUs."""
    from testbed.drivers.xen import DOM0, parse_xl_list  # lazily: the driver needs paramiko, a PM does not

    return {d.name: VmCounters(usage_ns=round(d.cpu_time_s * NS_PER_S), limit_cpus=float(d.vcpus))
            for d in parse_xl_list(xl_list) if d.name != DOM0 and d.running}


def openvz_vms(vestat: str, vzlist: str, ticks_per_s: int) -> dict[str, VmCounters]:
    """Running containers of `vzlist -a -n` with their /proc/vz/vestat CPU ticks (the openvz
    driver's parsers); CT 0 is the host itself."""
    from testbed.drivers.openvz import parse_vestat, parse_vzlist

    ticks = parse_vestat(vestat)
    return {c.name: VmCounters(usage_ns=ticks[c.ctid] * NS_PER_S // ticks_per_s)
            for c in parse_vzlist(vzlist) if c.status == "running" and c.ctid in ticks and c.ctid != 0}


class XenSampler:
    """A Xen PM, as the hypervisor accounts for it: every domain's cumulative CPU time (the
    counter xentop's CPU(%) is a rate of, 0.1 s resolution) from one `xl list` (`xm list` on Xen
    3.2) per reading; the PM's use is all domains' sum, Domain-0 included (its I/O backends and
    the migration machinery run there), over the physical CPUs `xl info` counts (nr_cpus); each
    guest's is its own row. pm_cpu "vms": the guests' sum only."""

    def __init__(self, host: str, pm_cpu: str = "machine", toolstack: str | None = None,
                 tool: Tool | None = None) -> None:
        """`toolstack` None: xl, else xm (Xen 3.2, 2010), whichever answers `info` on the PM
        (through `tool`: an LC over SSH must ask the PM, not look at its own PATH)."""
        if pm_cpu not in PM_CPU_SOURCES:
            raise ValueError(f"no PM CPU source {pm_cpu!r} (known: {', '.join(PM_CPU_SOURCES)})")
        from testbed.drivers.xen import physical_cpus

        self.host = host
        self._tool = tool or local_tool
        self._pm_is_its_vms = pm_cpu == "vms"
        failure: Exception | None = None
        for candidate in (toolstack,) if toolstack else ("xl", "xm"):
            try:
                info = self._tool([candidate, "info"])
            except (OSError, subprocess.SubprocessError) as err:
                failure = err
                continue
            self._toolstack = candidate
            self.capacity = float(physical_cpus(info))
            return
        raise ValueError(f"{candidate} info: {failure} (is this PM running Xen?)") from failure

    def _list(self) -> str:
        try:
            return self._tool([self._toolstack, "list"])
        except subprocess.SubprocessError as err:  # the LC answers 503 rather than stale figures
            raise OSError(f"{self._toolstack} list: {err}") from err

    def vm_names(self) -> list[str]:
        return sorted(xen_vms(self._list()))

    def read(self) -> Reading:
        from testbed.drivers.xen import parse_xl_list

        text = self._list()
        domains = parse_xl_list(text)
        return Reading(t=time.monotonic(), wall=time.time(), vms=xen_vms(text),
                       host_usage_ns=round(sum(d.cpu_time_s for d in domains) * NS_PER_S),
                       pm_is_its_vms=self._pm_is_its_vms)


def local_tool(argv: list[str]) -> str:
    """Tool: argv as a subprocess of the LC, on its own PM."""
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=TOOL_TIMEOUT_S).stdout


def ssh_tool(remote: Remote) -> Tool:
    """Tool: argv on the PM over SSH (`testbed.drivers.ssh.Remote`), its failures as OSError so
    that a reading fails the way a local one does (a VM reader answers no VMs, a sampler stalls)."""
    import paramiko

    from testbed.drivers.ssh import RemoteError

    def run(argv: list[str]) -> str:
        try:
            return remote.run(argv, timeout_s=TOOL_TIMEOUT_S)
        except (RemoteError, paramiko.SSHException, EOFError) as err:
            raise OSError(f"{remote.target.address}: {err}") from err

    return run


def _answering(read: VmReader) -> VmReader:
    """`read`, with a tool that fails or is missing meaning "no VMs" rather than an error."""

    def guarded() -> dict[str, VmCounters]:
        try:
            return read()
        except (OSError, ValueError, subprocess.SubprocessError):
            return {}

    return guarded


# The makers of each real-lab technique's VmReader, named by its entry in the technique catalogue
# (testbed.techniques); each takes the PM's Host, which only the container technique's needs.


def libvirt_reader(host: Host, tool: Tool) -> VmReader:
    """virsh (libvirt-clients, where the kvm technique is installed), read-only: the PM's venv
    has no libvirt binding, which is compiled against the host's libvirt."""
    argv = ["virsh", "-r", "-c", "qemu:///system", "domstats", "--list-running", "--cpu-total", "--vcpu"]
    return lambda: libvirt_vms(tool(argv))


def openvz_reader(host: Host, tool: Tool) -> VmReader:
    ticks_per_s = clock_ticks(tool)
    return lambda: openvz_vms(tool(["cat", str(VESTAT)]), tool(["vzlist", "-a", "-n"]), ticks_per_s)


def container_reader(host: Host, tool: Tool) -> VmReader:
    """The embedded lab's own cgroups, read where the LC runs (never over SSH)."""
    return lambda: cgroup_vms(host)


def clock_ticks(tool: Tool) -> int:
    """The PM's USER_HZ, what /proc/stat and /proc/vz/vestat count in."""
    try:
        return int(tool(["getconf", "CLK_TCK"]))
    except (OSError, ValueError, subprocess.SubprocessError) as err:
        raise ValueError(f"getconf CLK_TCK: {err}") from err


#: `testbed manager lc --vm-cpu` of a PM whose VMs the LC does not see.
NO_VMS = "none"


def vm_reader(source: str, host: Host, tool: Tool = local_tool) -> VmReader:
    """The reader of this PM's VMs: those of technique `source` (the inventory's
    testbed_technique, its reader named in the technique catalogue), or none; its tools run
    through `tool` (on the PM itself, or over SSH)."""
    if source == NO_VMS:
        return _answering(dict)
    readers = [name for name in REAL_LAB if technique(name).vm_cpu is not None]
    if source not in readers:
        raise ValueError(f"no VM CPU source for {source!r} (known: {', '.join((*readers, NO_VMS))})")
    return _answering(technique(source).vm_cpu_reader(host, tool))


class ProcStatSampler:
    """A real PM: the machine's CPU from /proc/stat, each VM's from its technique's tools; with
    pm_cpu "vms" (PMs sharing one kernel) the PM's use is its VMs' (Reading.pm_is_its_vms)."""

    def __init__(self, host: str, vms: VmReader, proc_stat: Path = PROC_STAT, pm_cpu: str = "machine",
                 tool: Tool | None = None) -> None:
        """`tool` None: the PM is this machine (`proc_stat` read here); else /proc/stat is read
        through `tool` (an LC reaching its PM over SSH)."""
        if pm_cpu not in PM_CPU_SOURCES:
            raise ValueError(f"no PM CPU source {pm_cpu!r} (known: {', '.join(PM_CPU_SOURCES)})")
        self.host = host
        self._vms = vms
        self._stat: Callable[[], str] = proc_stat.read_text if tool is None else lambda: tool(["cat", str(PROC_STAT)])
        self._pm_is_its_vms = pm_cpu == "vms"
        self._ns_per_tick = NS_PER_S / (os.sysconf("SC_CLK_TCK") if tool is None else clock_ticks(tool))
        self.capacity = float(parse_proc_stat(self._stat()).cpus)

    def vm_names(self) -> list[str]:
        return sorted(self._vms())

    def read(self) -> Reading:
        vms = self._vms()
        stat = parse_proc_stat(self._stat())
        return Reading(t=time.monotonic(), wall=time.time(), vms=vms,
                       host_usage_ns=round(stat.busy_ticks * self._ns_per_tick),
                       host_total_ns=round(stat.total_ticks * self._ns_per_tick),
                       pm_is_its_vms=self._pm_is_its_vms)

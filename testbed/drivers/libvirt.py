"""QEMU/KVM through libvirt on a real lab (modern profile, testbed_technique kvm).

The driver runs `virsh` on each PM over SSH (the xen and openvz drivers' way), not the
libvirt-python binding: the binding is compiled against the host's libvirt, so it cannot live in
the testbed's venv, and virsh comes with the kvm technique's packages on every PM. What it reads
is what virsh prints: `virsh domstats` for the domains and their CPU time (with the PM's
/proc/stat for the PM's own), `virsh domjobinfo --completed --rawstats` for a migration's
figures.

Migration is libvirt's peer-to-peer (`virsh migrate --p2p`, run on the source PM, whose
libvirtd opens the destination's with the PMs' own keys): pre-copy (--live), stop-and-copy (no
--live: the domain is paused for the whole copy) or post-copy (--postcopy, switched over by
--postcopy-after-precopy once the first pass is done). Its figures are libvirt's job statistics
of the completed migration, read on the destination, where libvirt hands them over: elapsed
time, downtime, bytes processed, memory passes.

Domains are transient (`virsh create`): destroying one leaves nothing defined on any PM. Their
guests have no NIC: the workload channel is the serial console, a raw TCP server on the PM
running the domain (`domain_xml(console_port=...)`), speaking the guest-init protocol
(testbed.drivers.guest_console). Each domain has its own port, lab-wide (it may move to any PM):
the lowest free one from CONSOLE_BASE_PORT, read back from the domains' XML, so that a
driver in another process finds the same port; the domain keeps it across migrations.
"""

from __future__ import annotations

import socket
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Collection, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

from testbed.drivers.base import (
    CpuUse,
    Host,
    MigrationMode,
    MigrationOrder,
    MigrationRecord,
    VMInfo,
    VMSpec,
)
from testbed.drivers.guest_console import ConsoleWorkloads, GuestConsole
from testbed.drivers.remote_base import RemoteDriverBase, stream_migration
from testbed.manager.sampler import libvirt_vms, parse_domstats, parse_proc_stat
from testbed.storage import create_disk_argv
from testbed.techniques import check_compression

KVM_DOMAIN_TYPE = "kvm"
TCG_DOMAIN_TYPE = "qemu"  # libvirt's type of a domain QEMU emulates (TCG)
IMAGE_DIR = "/var/lib/testbed/images/qemu"  # the guest image the qemu role builds on each PM
STORAGE_DIR = "/var/lib/testbed/storage"  # vm_storage: PM/disks/ under it is that PM's share
CONSOLE_BASE_PORT = 4600
DISK_SIZE = "64M"
GUEST_CMDLINE = "console=ttyS0 quiet panic=-1"
BOOT_TIMEOUT_S = 120.0  # a TCG guest on a busy 2-core machine
READY_LISTEN_S = 20.0  # listen for "@ready" before pinging (GuestConsole.wait_ready)
CONNECT_RETRY_S = 0.5  # between attempts to reach a console not (yet) listening
MIGRATION_TIMEOUT_S = 1800.0
#: /proc/stat and the running domains' counters in one call, so both are read at one instant;
#: parse_proc_stat reads the `cpu` lines, parse_domstats the rest (constant text, no data in it).
CPU_READ = ["sh", "-c", "cat /proc/stat && virsh domstats --list-running --cpu-total --vcpu --balloon"]


def migration_flags(mode: MigrationMode) -> list[str]:
    """virsh migrate's flags for a thesis mode (§2.3); always peer-to-peer (the source PM's
    libvirtd talks to the destination's itself)."""
    return [
        "--p2p",
        *{
            MigrationMode.PRECOPY: ["--live"],
            MigrationMode.STOPCOPY: [],
            MigrationMode.POSTCOPY: ["--live", "--postcopy", "--postcopy-after-precopy"],
        }[mode],
    ]


def parse_job_stats(text: str) -> dict[str, int | float | str]:
    """`virsh domjobinfo --completed --rawstats`: libvirt's typed job parameters as they are
    (`name: value` lines; numbers as numbers, in libvirt's units: ms and bytes)."""
    stats: dict[str, int | float | str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep or " " in key.strip() or not key.strip():
            continue  # the cooked lines ("Job type:", "Time elapsed:") have blanks in the name
        value = value.strip()
        try:
            stats[key.strip()] = int(value)
        except ValueError:
            try:
                stats[key.strip()] = float(value)
            except ValueError:
                stats[key.strip()] = value
    return stats


def record_from_job_stats(
    stats: Mapping[str, Any],
    *,
    vm: str,
    source: str,
    destination: str,
    mode: MigrationMode,
    start: float,
    wall_s: float,
) -> MigrationRecord:
    """A MigrationRecord from libvirt's completed-job statistics (times in ms, sizes in bytes)."""
    total = stats.get("time_elapsed", wall_s * 1000) / 1000
    downtime = stats.get("downtime")
    if mode is MigrationMode.STOPCOPY and downtime is None:
        downtime = total * 1000  # paused for the whole migration
    phases = {"setup": stats["setup_time"] / 1000} if "setup_time" in stats else {}
    return MigrationOrder(vm, source, destination, mode, start).record(
        total,
        downtime_s=None if downtime is None else downtime / 1000,
        bytes_sent=int(stats.get("data_processed", stats.get("memory_processed", 0))),
        rounds=int(stats.get("memory_iteration", 0)),
        phases=phases,
        details={key: stats[key] for key in sorted(stats)},
    )


def domain_type_for(accel: str) -> str:
    """libvirt's domain type for the accelerator the PM's KVM probe chose (roles/qemu's
    probe-kvm.sh writes kvm or tcg to IMAGE_DIR/accel): a TCG guest is libvirt type 'qemu'."""
    answer = accel.strip()
    if answer == "tcg":
        return TCG_DOMAIN_TYPE
    if answer == KVM_DOMAIN_TYPE:
        return KVM_DOMAIN_TYPE
    raise ValueError(f"the KVM probe's answer must be kvm or tcg, not {answer!r}")


def nfs_disk(url: str) -> tuple[str, str]:
    """(host, path) of an nfs://HOST/PATH disk URL (QEMU's user-space NFS client, libnfs)."""
    rest = url.removeprefix("nfs://")
    host, _, path = rest.partition("/")
    if not url.startswith("nfs://") or not host or not path:
        raise ValueError(f"not an nfs://HOST/PATH disk: {url}")
    return host, "/" + path


def domain_xml(
    spec: VMSpec,
    disk: str,
    bridge: str | None = None,
    kernel: str | None = None,
    *,
    domain_type: str = KVM_DOMAIN_TYPE,
    initrd: str | None = None,
    cmdline: str | None = None,
    console_port: int | None = None,
) -> str:
    """A domain's XML, built as a tree (names and paths are text nodes, never markup).

    domain_type is 'kvm' or, where KVM does not work (TCG), 'qemu'. A disk named nfs://HOST/PATH
    is a network disk QEMU opens itself over NFSv3 (no kernel NFS client needed); any other is a
    file. bridge None: no network interface (the guest's channel is its serial console).
    console_port: the serial console is a raw TCP server on that port of whichever PM runs the
    domain (after a migration, the destination's), else a pty.
    """
    if domain_type != KVM_DOMAIN_TYPE and domain_type != TCG_DOMAIN_TYPE:
        raise ValueError(f"libvirt domain type must be kvm or qemu, not {domain_type!r}")
    domain = ET.Element("domain", type=domain_type)
    ET.SubElement(domain, "name").text = spec.name
    ET.SubElement(domain, "memory", unit="MiB").text = str(spec.memory_mb)
    ET.SubElement(domain, "vcpu").text = str(spec.vcpus)
    os_el = ET.SubElement(domain, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
    for tag, value in (("kernel", kernel), ("initrd", initrd), ("cmdline", cmdline)):
        if value:
            ET.SubElement(os_el, tag).text = value
    ET.SubElement(domain, "on_reboot").text = "destroy"  # the guest's panic=-1 ends it
    devices = ET.SubElement(domain, "devices")
    if disk.startswith("nfs://"):
        host, path = nfs_disk(disk)
        disk_el = ET.SubElement(devices, "disk", type="network", device="disk")
        ET.SubElement(disk_el, "driver", name="qemu", type="qcow2", cache="none")
        source = ET.SubElement(disk_el, "source", protocol="nfs", name=path)
        ET.SubElement(source, "host", name=host)
    else:
        disk_el = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(disk_el, "driver", name="qemu", type="qcow2", cache="none")  # shared storage: no cache
        ET.SubElement(disk_el, "source", file=disk)
    ET.SubElement(disk_el, "target", dev="vda", bus="virtio")
    if bridge:
        iface = ET.SubElement(devices, "interface", type="bridge")
        ET.SubElement(iface, "source", bridge=bridge)
        ET.SubElement(iface, "model", type="virtio")
    if console_port is None:
        ET.SubElement(devices, "console", type="pty")
    else:
        serial = ET.SubElement(devices, "serial", type="tcp")
        ET.SubElement(serial, "source", mode="bind", host="0.0.0.0", service=str(console_port))
        ET.SubElement(serial, "protocol", type="raw")
    return ET.tostring(domain, encoding="unicode")


def peer_uri(address: str) -> str:
    """The URI a PM's libvirtd reaches another PM's with in a peer-to-peer migration."""
    return f"qemu+ssh://root@{address}/system"


def console_port_of(xml: str) -> int | None:
    """The TCP port of a domain's serial console (domain_xml's `console_port`), from its XML."""
    source = ET.fromstring(xml).find("devices/serial[@type='tcp']/source")
    return None if source is None else int(source.get("service", ""))


def free_console_port(used: Collection[int], base: int = CONSOLE_BASE_PORT) -> int:
    """The lowest port from `base` that no domain of the lab uses."""
    return next(port for port in range(base, base + len(used) + 1) if port not in used)


def cpu_from_reads(
    before: tuple[float, str], after: tuple[float, str], host: Host
) -> tuple[float, dict[str, float]]:
    """(PM load, {VM: load}) in percent of the PM's capacity between two CPU_READ outputs taken
    at local monotonic times. The PM's is its busy share of /proc/stat's ticks (all its CPUs);
    a domain's is its CPU time (sampler.domain_cpu_ns) over the time between the reads."""
    (t0, text0), (t1, text1) = before, after
    stat0, stat1 = parse_proc_stat(text0), parse_proc_stat(text1)
    ticks = stat1.total_ticks - stat0.total_ticks
    pm_cpus = (stat1.busy_ticks - stat0.busy_ticks) / ticks * stat1.cpus if ticks else 0.0
    times0, times1 = libvirt_vms(text0), libvirt_vms(text1)
    elapsed_ns = (t1 - t0) * 1e9
    vms = {
        vm: (counters.usage_ns - times0[vm].usage_ns) / elapsed_ns * 100 / host.capacity
        for vm, counters in times1.items()
        if vm in times0
    }
    return pm_cpus * 100 / host.capacity, vms


class TcpConsole(GuestConsole):
    """A domain's serial console as a TCP server on the PM running it, (address, port).

    During a migration it follows both PMs' (`also`): the destination's QEMU listens from
    its start, before the guest runs there, so the console is connected when the guest
    resumes; QEMU drops what the guest writes while no client is connected.

    `everywhere`: the console's endpoint on every PM the domain may move to (the same port on
    each: it is lab-wide). It keeps trying those it is not connected to, so it follows a
    migration another process ordered (a Local Controller, for the CC) as it follows its own
    driver's: the destination's QEMU listens from its start, and the source's closes at the end.
    Commands go to the console connected longest (the source, until it closes)."""

    def __init__(self, vm: str, home: tuple[str, int], everywhere: Sequence[tuple[str, int]] = ()) -> None:
        self._endpoints: tuple[tuple[str, int], ...] = (home,)  # replaced whole, never mutated
        self._everywhere = tuple(everywhere)
        self._drop: frozenset[tuple[str, int]] = frozenset()  # let go of these once (move)
        self._next_try: dict[Hashable, float] = {}
        super().__init__(vm)

    def also(self, endpoint: tuple[str, int]) -> None:
        """Follow another console too (a migration's destination)."""
        self._endpoints = (*self._endpoints, endpoint)

    def move(self, home: tuple[str, int]) -> None:
        """The domain lives at `home` now; let go of every other console."""
        self._drop = frozenset(key for key in self._wanted() if key != home)
        self._endpoints = (home,)

    def _wanted(self) -> tuple[tuple[str, int], ...]:
        return tuple(dict.fromkeys((*self._endpoints, *self._everywhere)))

    def _home(self) -> tuple[str, int]:
        """The console connected longest (the source's, until its QEMU goes at the end of a
        migration), else the one the domain was created or moved at."""
        with self._cond:  # the console thread adds and removes sockets
            connected = list(self._sockets)  # in the order they were connected
        return connected[0] if connected else self._endpoints[0]  # type: ignore[return-value]

    def _follow(self) -> None:
        wanted, now = self._wanted(), time.monotonic()
        drop, self._drop = self._drop, frozenset()
        for key in list(self._sockets):
            if key not in wanted or key in drop:
                self._close(self._sockets[key])
        for key in wanted:
            if key not in self._sockets and now >= self._next_try.get(key, 0.0):
                self._next_try[key] = now + CONNECT_RETRY_S
                self._connect(key)

    def _open(self, key: Hashable) -> socket.socket:
        address, port = key  # type: ignore[misc]
        return socket.create_connection((address, port), timeout=1.0)


class LibvirtDriver(ConsoleWorkloads, RemoteDriverBase):
    """Domains on the lab's PMs through each PM's libvirtd, driven by virsh over SSH.

    A domain boots the testbed guest image each PM holds (IMAGE_DIR: kernel, initramfs, and
    `accel`, the KVM probe's answer, which sets the domain type); a spec without a disk gets a
    blank qcow2 on its PM's share, opened by QEMU over nfs:// from whichever PM runs it."""

    technique = "kvm"

    def __init__(
        self,
        hosts: Sequence[Host],
        key_file: Path,
        *,
        known_hosts: Path | None = None,
        image_dir: str = IMAGE_DIR,
        storage_dir: str = STORAGE_DIR,
        bridge: str | None = None,
        console_base: int = CONSOLE_BASE_PORT,
        boot_timeout_s: float = BOOT_TIMEOUT_S,
    ) -> None:
        super().__init__(hosts, key_file, known_hosts)
        self.image_dir, self.storage_dir, self.bridge = image_dir, storage_dir, bridge
        self.console_base, self.boot_timeout_s = console_base, boot_timeout_s
        # Peer-to-peer migration: the source PM's libvirtd opens the destination itself, with the
        # PM's own root key and known_hosts (roles/libvirt/tasks/peers.yml), not this machine's.
        self.peer_uris = {h.name: peer_uri(h.address) for h in hosts}
        self._ports: dict[str, int] = {}
        self._consoles: dict[str, TcpConsole] = {}
        self._disks: dict[str, tuple[str, str]] = {}  # VM -> (PM, path) of a disk this driver made
        # One domain created at a time per driver: a console port is chosen from the running
        # domains' XML, so two creations at once (the runner boots on every PM in parallel) would
        # take the same one.
        self._creating = threading.Lock()

    def virsh(self, host: str, *args: str, timeout_s: float = 60.0) -> str:
        return self.remote(host).run(["virsh", *args], timeout_s=timeout_s)

    def _domains(self, host: str) -> dict[str, dict[str, str]]:
        return parse_domstats(self.virsh(host, "domstats", "--list-running", "--vcpu", "--balloon"))

    def list_vms(self) -> list[VMInfo]:
        return [
            VMInfo(
                vm,
                host,
                self._specs.get(vm)
                or VMSpec(vm, int(f.get("balloon.maximum", 0)) // 1024, int(f.get("vcpu.current", 1))),
                True,
            )
            for host, domains in self.on_every_pm(self._domains).items()
            for vm, f in domains.items()
        ]

    def vm_host(self, vm: str) -> str:
        for info in self.list_vms():
            if info.name == vm:
                return info.host
        raise KeyError(vm)

    def cpu_use(self, interval_s: float) -> CpuUse:
        def read(host: str) -> tuple[float, str]:
            return time.monotonic(), self.remote(host).run(CPU_READ)

        before = self.on_every_pm(read)
        time.sleep(interval_s)
        after = self.on_every_pm(read)
        loads = {h: cpu_from_reads(before[h], after[h], self._hosts[h]) for h in self._hosts}
        return CpuUse(
            interval_s,
            {h: load[0] for h, load in loads.items()},
            {vm: pct for load in loads.values() for vm, pct in load[1].items()},
        )

    # --- domains --------------------------------------------------------------------------------
    def console_port(self, vm: str, host: str | None = None) -> int:
        """The domain's console port, from its XML on the PM running it (`host` if known)."""
        if vm not in self._ports:
            port = console_port_of(self.virsh(host or self.vm_host(vm), "dumpxml", vm))
            if port is None:
                raise ValueError(f"domain {vm} has no TCP serial console")
            self._ports[vm] = port
        return self._ports[vm]

    def _used_ports(self) -> set[int]:
        return {self.console_port(info.name, info.host) for info in self.list_vms()}

    def _disk(self, spec: VMSpec, host: str) -> str:
        """The spec's disk, or a blank qcow2 made on `host`'s share. It is libvirt-qemu's (QEMU's
        user on the PMs) before the NFS server first sees it: nfs-ganesha caches attributes, so
        a later chown showed as "Allowed access r--" for a while (DESIGN, the test hosts)."""
        if spec.disk:
            return spec.disk
        path = f"{self.storage_dir}/{host}/disks/{spec.name}.qcow2"
        remote = self.remote(host)
        remote.run(create_disk_argv(path, DISK_SIZE))
        remote.run(["chown", "libvirt-qemu:libvirt-qemu", path])
        self._disks[spec.name] = (host, path)
        return f"nfs://{self._hosts[host].address}{path}"

    def create_vm(self, spec: VMSpec, host: str) -> VMInfo:
        remote = self.remote(host)
        domain_type = domain_type_for(remote.run(["cat", f"{self.image_dir}/accel"]))
        disk = self._disk(spec, host)
        with self._creating:
            port = free_console_port(self._used_ports(), self.console_base)
            xml = domain_xml(
                spec,
                disk,
                self.bridge,
                f"{self.image_dir}/vmlinux",
                domain_type=domain_type,
                initrd=f"{self.image_dir}/initramfs.cpio",
                cmdline=GUEST_CMDLINE,
                console_port=port,
            )
            remote.run(["virsh", "create", "/dev/stdin"], stdin=xml.encode())
            self._ports[spec.name] = port
        console = self._console(spec.name, host)
        console.wait_ready(self.boot_timeout_s, READY_LISTEN_S)
        return self.created(spec, host)

    def destroy_vm(self, vm: str) -> None:
        console = self._consoles.pop(vm, None)
        if console is not None:
            console.close()
        try:
            self.virsh(self.vm_host(vm), "destroy", vm)
        except KeyError:
            pass  # not running anywhere
        if vm in self._disks:
            host, path = self._disks.pop(vm)
            self.remote(host).run(["rm", "-f", path])
        self._specs.pop(vm, None)
        self._ports.pop(vm, None)

    # --- workloads: the guest-init protocol on the serial console --------------------------------
    def _console(self, vm: str, host: str | None = None) -> TcpConsole:
        console = self._consoles.get(vm)
        if console is None:
            host = host or self.vm_host(vm)
            port = self.console_port(vm, host)
            endpoint = (self._hosts[host].address, port)
            everywhere = [(h.address, port) for h in self._hosts.values()]  # wherever it may move
            console = self._consoles[vm] = TcpConsole(vm, endpoint, everywhere)
            console.attach(endpoint, self.boot_timeout_s)
        return console

    # --- migration ------------------------------------------------------------------------------
    def migrate_argv(self, vm: str, destination: str, mode: MigrationMode) -> list[str]:
        return ["virsh", "migrate", *migration_flags(mode), vm, self.peer_uris[destination]]

    def migrate(
        self, vm: str, destination: str, mode: MigrationMode, *, compression: str | None = None
    ) -> MigrationRecord:
        """`virsh migrate --p2p` on the source PM; `compression` only None or "none" (the
        catalogue offers libvirt no compression; a Local Controller passes the order's on)."""
        mode = MigrationMode(mode)
        check_compression(self.technique, compression, mode.value)
        source = self.vm_host(vm)
        console = self._consoles.get(vm)
        there = (self._hosts[destination].address, self.console_port(vm, source))
        if console is not None:
            console.also(there)
        run = stream_migration(self.remote(source), self.migrate_argv(vm, destination, mode))
        if run.error is not None:
            if console is not None:
                console.move((self._hosts[source].address, there[1]))
            return MigrationOrder(vm, source, destination, mode, run.start).record(
                run.total_s, error=run.error, details={"log": run.relative_log()}
            )
        if console is not None:
            console.move(there)
        stats = parse_job_stats(self.virsh(destination, "domjobinfo", "--completed", "--rawstats", vm))
        return record_from_job_stats(
            stats, vm=vm, source=source, destination=destination, mode=mode, start=run.start, wall_s=run.total_s
        )

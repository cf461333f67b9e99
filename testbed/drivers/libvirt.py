"""QEMU/KVM through libvirt on a real lab (modern profile, testbed_technique kvm).

libvirt has a local API that reaches remote hosts itself (`qemu+ssh://root@PM/system`), so this
driver talks to each PM's libvirtd through libvirt-python, not through shell commands. Migration is
libvirt's: pre-copy (VIR_MIGRATE_LIVE), stop-and-copy (no LIVE flag: the domain is paused for the
whole copy) or post-copy (VIR_MIGRATE_POSTCOPY, switched over with migrateStartPostCopy once the
first pass is under way). Its figures come from libvirt's own job statistics of the completed
migration (read on the destination, where libvirt hands them over): elapsed time, downtime, bytes
processed, memory passes.
"""

from __future__ import annotations

import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from testbed.drivers.base import CpuUse, Host, MigrationMode, MigrationOrder, MigrationRecord, VMInfo, VMSpec
from testbed.drivers.remote_base import SshGuestDriverBase

# libvirt constants (libvirt-domain.h), so flag logic is testable without the binding.
VIR_MIGRATE_LIVE = 1 << 0
VIR_MIGRATE_PEER2PEER = 1 << 1
VIR_MIGRATE_PERSIST_DEST = 1 << 3
VIR_MIGRATE_UNDEFINE_SOURCE = 1 << 4
VIR_MIGRATE_POSTCOPY = 1 << 15
VIR_DOMAIN_JOB_STATS_COMPLETED = 1 << 0
VIR_NODE_CPU_STATS_ALL_CPUS = -1
POSTCOPY_SWITCH_DELAY_S = 0.5
KVM_DOMAIN_TYPE = "kvm"
TCG_DOMAIN_TYPE = "qemu"  # libvirt's type of a domain QEMU emulates (TCG)  # let the first pre-copy pass start before switching over


def migration_flags(mode: MigrationMode) -> int:
    """libvirt migration flags for a thesis mode (§2.3)."""
    base = VIR_MIGRATE_PEER2PEER | VIR_MIGRATE_PERSIST_DEST | VIR_MIGRATE_UNDEFINE_SOURCE
    return (
        base
        | {
            MigrationMode.PRECOPY: VIR_MIGRATE_LIVE,
            MigrationMode.STOPCOPY: 0,
            MigrationMode.POSTCOPY: VIR_MIGRATE_LIVE | VIR_MIGRATE_POSTCOPY,
        }[mode]
    )


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


def host_busy_ns(stats: Mapping[str, int]) -> int:
    """Busy CPU time of a node from virNodeGetCPUStats (all CPUs): kernel + user, in ns."""
    return int(stats["kernel"]) + int(stats["user"])


class LibvirtDriver(SshGuestDriverBase):
    """KVM domains on the lab's PMs through each PM's libvirtd."""

    technique = "kvm"

    def __init__(
        self,
        hosts: Sequence[Host],
        key_file: Path,
        *,
        disk_dir: str = "/var/lib/testbed/shared",
        bridge: str = "br0",
        guest_addresses: Mapping[str, str] | None = None,
        uris: Mapping[str, str] | None = None,
        known_hosts: Path | None = None,
        domain_type: str = KVM_DOMAIN_TYPE,
    ) -> None:
        super().__init__(hosts, key_file, guest_addresses, known_hosts)
        self.disk_dir, self.bridge, self.domain_type = disk_dir, bridge, domain_type
        self.uris = {
            h.name: f"qemu+ssh://root@{h.address}/system?keyfile={key_file}&no_verify=1" for h in hosts
        } | dict(uris or {})
        # Peer-to-peer migration: the source PM's libvirtd opens the destination itself, with the
        # PM's own root key and known_hosts (roles/libvirt/tasks/peers.yml), not this machine's.
        self.peer_uris = {h.name: peer_uri(h.address) for h in hosts}
        self._conns: dict[str, Any] = {}

    def conn(self, host: str) -> Any:
        import libvirt  # python3-libvirt (apt) on the machine running the driver

        if host not in self._conns or not self._conns[host].isAlive():
            self._conns[host] = libvirt.open(self.uris[host])
        return self._conns[host]

    def list_vms(self) -> list[VMInfo]:
        infos = []
        for host in self._hosts:
            for dom in self.conn(host).listAllDomains():
                _, max_kib, _, vcpus, _ = dom.info()
                spec = self._specs.get(dom.name(), VMSpec(dom.name(), max_kib // 1024, vcpus))
                infos.append(VMInfo(dom.name(), host, spec, bool(dom.isActive())))
        return infos

    def vm_host(self, vm: str) -> str:
        for info in self.list_vms():
            if info.name == vm and info.running:
                return info.host
        raise KeyError(vm)

    def _cpu_counters(self, host: str) -> tuple[float, int, dict[str, int]]:
        conn = self.conn(host)
        domains = {d.name(): d.info()[4] for d in conn.listAllDomains() if d.isActive()}
        return time.monotonic(), host_busy_ns(conn.getCPUStats(VIR_NODE_CPU_STATS_ALL_CPUS)), domains

    def cpu_use(self, interval_s: float) -> CpuUse:
        before = {h: self._cpu_counters(h) for h in self._hosts}
        time.sleep(interval_s)
        after = {h: self._cpu_counters(h) for h in self._hosts}
        hosts, vms = {}, {}
        for name, host in self._hosts.items():
            elapsed_ns = (after[name][0] - before[name][0]) * 1e9
            scale = 100.0 / elapsed_ns / host.capacity
            hosts[name] = (after[name][1] - before[name][1]) * scale
            vms.update(
                {
                    vm: (ns - before[name][2][vm]) * scale
                    for vm, ns in after[name][2].items()
                    if vm in before[name][2]
                }
            )
        return CpuUse(interval_s, hosts, vms)

    def create_vm(self, spec: VMSpec, host: str) -> VMInfo:
        disk = spec.disk or f"{self.disk_dir}/{host}/disks/{spec.name}.qcow2"
        self.conn(host).createXML(domain_xml(spec, disk, self.bridge, domain_type=self.domain_type), 0)
        return self.created(spec, host)

    def destroy_vm(self, vm: str) -> None:
        import libvirt

        for host in self._hosts:
            try:
                dom = self.conn(host).lookupByName(vm)
            except libvirt.libvirtError:
                continue
            if dom.isActive():
                dom.destroy()
            if dom.isPersistent():
                dom.undefine()
        self._specs.pop(vm, None)

    def migrate(self, vm: str, destination: str, mode: MigrationMode) -> MigrationRecord:
        import libvirt

        source = self.vm_host(vm)
        dom = self.conn(source).lookupByName(vm)
        dest_uri = self.peer_uris[destination]
        start = time.time()
        switcher = None
        if mode is MigrationMode.POSTCOPY:

            def switch() -> None:
                time.sleep(POSTCOPY_SWITCH_DELAY_S)
                try:
                    dom.migrateStartPostCopy(0)
                except libvirt.libvirtError:
                    pass  # finished in pre-copy before the switch: recorded as it happened

            switcher = threading.Thread(target=switch, daemon=True)
            switcher.start()
        try:
            dom.migrateToURI3(dest_uri, {}, migration_flags(mode))
        except libvirt.libvirtError as err:
            return MigrationOrder(vm, source, destination, mode, start).record(
                time.time() - start, error=str(err)
            )
        finally:
            if switcher:
                switcher.join()
        wall = time.time() - start
        stats = self.conn(destination).lookupByName(vm).jobStats(VIR_DOMAIN_JOB_STATS_COMPLETED)
        return record_from_job_stats(
            stats, vm=vm, source=source, destination=destination, mode=mode, start=start, wall_s=wall
        )

"""Xen on a real lab: `xl` (Xen 4, modern profile) or `xm` (Xen 3.2, the thesis' lab), over SSH.

What the driver reads is what the toolstacks print: `xl list`/`xm list` for the domains on a PM,
`xentop -b` for their CPU use (the thesis' LC read the same counters through libxenstat). Both
toolstacks share these formats, so one parser serves both. xentop's CPU(%) is a rate between two
of its own samples, so the driver asks for two iterations `interval` seconds apart and keeps the
second; its NAME column is the first 10 characters of the domain name (`%10.10s`), matched back
to the full names `xl list` gives.

A guest is reached by SSH from its PM (SshGuestDriverBase) at the address the inventory gives it
(`testbed_xen_guests`: VM name -> address in the lab network, `lab_options`); the driver hands
that address to the guest's kernel on its command line (`ip=`, the kernel's own IP
autoconfiguration), so the guest image needs no per-VM network setup: it must boot the
inventory's kernel (`testbed_xen_kernel`, a path on the PMs), bring up sshd authorizing the PMs'
root key and ship the guest programs (synthetic1) in its PATH. Each VM's disk is a copy of that
image (`testbed_xen_image`) made at its creation on the lab-wide share.

Migration is the toolstack's: pre-copy (`xl migrate`, `xm migrate --live`) or, on xm only,
stop-and-copy (`xm migrate` without --live). Xen has no post-copy. Disks live on the lab-wide
share paths (vm_storage), so migration moves memory only, as in the thesis.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from testbed.drivers.base import CpuUse, Host, MigrationMode, MigrationOrder, MigrationRecord, VMInfo, VMSpec
from testbed.drivers.remote_base import SshGuestDriverBase, stream_migration
from testbed.drivers.ssh import RemoteError
from testbed.errors import InputError
from testbed.techniques import check_compression

if TYPE_CHECKING:
    from testbed.lab import Lab

DOM0 = "Domain-0"
XENTOP_NAME_WIDTH = 10  # xentop prints names with "%10.10s"
CONFIG_DIR = "/etc/xen/testbed"
GUEST_CMDLINE = "root=/dev/xvda ro console=hvc0"  # a guest's kernel line, its address added (kernel_ip)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,9}$")
_XENTOP_ROW = re.compile(
    r"^\s*(?P<name>\S.*?)\s+(?P<state>[-dsbcpr]{6})\s+(?P<cpu_s>\d+)\s+(?P<cpu_pct>\d+\.\d)\s+"
    r"(?P<mem_k>\d+)\s+(?P<mem_pct>\d+\.\d)\s+(?:no limit|\d+)\s+(?:n/a|\d+\.\d)\s+(?P<vcpus>\d+)\b"
)


@dataclass(frozen=True)
class XenDomain:
    """One row of `xl list` / `xm list`."""

    name: str
    domid: int
    memory_mb: int
    vcpus: int
    state: str  # six flags, r b p s c d or '-'
    cpu_time_s: float

    @property
    def running(self) -> bool:
        return not any(flag in self.state for flag in "scd")


@dataclass(frozen=True)
class XentopRow:
    """One domain in one xentop iteration; `name` is at most 10 characters (xentop's cut)."""

    name: str
    state: str
    cpu_s: int
    cpu_pct: float  # percent of one physical CPU over the iteration's interval
    memory_kb: int
    vcpus: int


def parse_xl_list(text: str) -> list[XenDomain]:
    """Rows of `xl list`/`xm list` (header `Name ID Mem VCPUs State Time(s)`)."""
    domains = []
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0] == "Name":
            continue
        if len(fields) < 6:
            raise ValueError(f"not an xl list row: {line!r}")
        *name, domid, mem, vcpus, state, cpu = fields
        domains.append(XenDomain(" ".join(name), int(domid), int(mem), int(vcpus), state, float(cpu)))
    return domains


def parse_xl_info(text: str) -> dict[str, str]:
    """`xl info` / `xm info`: one `key<padding>: value` line each (xl's output_physinfo and xm's
    `"%-23s:" % key` print the same layout); a continued value (a line without its own key) is
    left out."""
    info = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and " " not in key.strip():
            info[key.strip()] = value.strip()
    return info


def physical_cpus(xl_info: str) -> int:
    """The CPUs Xen schedules domains on (`nr_cpus`), what a Xen PM's capacity is."""
    cpus = parse_xl_info(xl_info).get("nr_cpus", "")
    if not cpus.isdigit() or int(cpus) < 1:
        raise ValueError(f"no nr_cpus in the xl info output: {cpus!r}")
    return int(cpus)


def parse_xentop(text: str) -> list[list[XentopRow]]:
    """Every iteration of `xentop -b` output, in order; each a list of domain rows."""
    frames: list[list[XentopRow]] = []
    for line in text.splitlines():
        if line.split()[:2] == ["NAME", "STATE"]:
            frames.append([])
            continue
        match = _XENTOP_ROW.match(line)
        if match and frames:
            frames[-1].append(
                XentopRow(
                    match["name"],
                    match["state"],
                    int(match["cpu_s"]),
                    float(match["cpu_pct"]),
                    int(match["mem_k"]),
                    int(match["vcpus"]),
                )
            )
    return frames


def match_xentop_names(rows: Sequence[XentopRow], names: Sequence[str]) -> dict[str, XentopRow]:
    """Full domain name -> its xentop row, by xentop's 10-character cut of the name."""
    by_cut: dict[str, str] = {}
    for name in names:
        cut = name[:XENTOP_NAME_WIDTH]
        if cut in by_cut:
            raise ValueError(
                f"domains {by_cut[cut]!r} and {name!r} look alike in xentop (first 10 characters)"
            )
        by_cut[cut] = name
    return {by_cut[row.name]: row for row in rows if row.name in by_cut}


def domain_config(
    spec: VMSpec,
    kernel: str,
    ramdisk: str | None,
    disk: str,
    bridge: str,
    extra: str = GUEST_CMDLINE,
) -> str:
    """A paravirtualized domain's config, valid for both xl and xm (strings quoted as JSON,
    which both parsers read)."""
    lines = {
        "name": json.dumps(spec.name),
        "memory": str(spec.memory_mb),
        "vcpus": str(spec.vcpus),
        "kernel": json.dumps(kernel),
        "extra": json.dumps(extra),
        "disk": f"[{json.dumps(f'file:{disk},xvda,w')}]",
        "vif": f"[{json.dumps(f'bridge={bridge}')}]",
        "on_crash": json.dumps("destroy"),
    }
    if ramdisk:
        lines["ramdisk"] = json.dumps(ramdisk)
    return "".join(f"{key} = {value}\n" for key, value in lines.items())


def kernel_ip(address: str, network: str) -> str:
    """The kernel's `ip=` parameter giving a guest its static address on the lab network (no
    gateway: the guest talks to its PM and the lab only): client-ip::gw:netmask::device:autoconf."""
    return f"ip={address}::{ipaddress.ip_network(network).netmask}::eth0:off"


def lab_options(lab: Lab) -> dict[str, Any]:
    """The driver's settings from a Xen lab's inventory (InputError naming the variable, before
    any host is touched): the guests' kernel (testbed_xen_kernel, required), ramdisk
    (testbed_xen_ramdisk), image (testbed_xen_image, required), toolstack (testbed_xen_toolstack:
    xl, the default, or xm on Xen 3.2) and addresses (testbed_xen_guests: VM name -> address in
    testbed_lab_network, one per VM a spec creates)."""
    where = f"inventory {lab.inventory}"
    settings = lab.driver_vars
    for var in ("testbed_xen_kernel", "testbed_xen_image", "testbed_xen_guests"):
        if not settings.get(var):
            raise InputError(f"{where}: {var}: not set (a Xen lab's guests need it; docs/real-labs.md)")
    guests = settings["testbed_xen_guests"]
    if not isinstance(guests, Mapping):
        raise InputError(f"{where}: testbed_xen_guests: a mapping of VM name to address, not {guests!r}")
    network = ipaddress.ip_network(lab.network)
    taken = {h.address for h in lab.hosts} | {lab.gateway}
    for vm, address in guests.items():
        try:
            inside = ipaddress.ip_address(str(address)) in network
        except ValueError:
            inside = False
        if not inside or str(address) in taken:
            raise InputError(f"{where}: testbed_xen_guests: {vm}: {address!r} is not a free address of {network}")
    return {
        "toolstack": str(settings.get("testbed_xen_toolstack", "xl")),
        "kernel": str(settings["testbed_xen_kernel"]),
        "ramdisk": settings.get("testbed_xen_ramdisk"),
        "image": str(settings["testbed_xen_image"]),
        "guest_addresses": {str(vm): str(address) for vm, address in guests.items()},
        "guest_network": lab.network,
    }


def cpu_from_xentop(
    frame: Sequence[XentopRow], names: Sequence[str], host: Host
) -> tuple[float, dict[str, float]]:
    """(PM load, {VM: load}) in percent of the PM's capacity from one xentop iteration. The PM's
    load counts every domain, dom0 included (it does the VMs' I/O and the migrations)."""
    rows = match_xentop_names([r for r in frame if r.name != DOM0[:XENTOP_NAME_WIDTH]], names)
    total = sum(r.cpu_pct for r in frame)
    return total / host.capacity, {name: row.cpu_pct / host.capacity for name, row in rows.items()}


class XenDriver(SshGuestDriverBase):
    """Xen domains on the lab's PMs through `xl` (toolstack="xl") or `xm` (toolstack="xm")."""

    technique = "xen"

    def __init__(
        self,
        hosts: Sequence[Host],
        key_file: Path,
        *,
        toolstack: str = "xl",
        kernel: str,
        ramdisk: str | None = None,
        disk_dir: str = "/var/lib/testbed/shared",
        bridge: str = "xenbr0",
        guest_addresses: Mapping[str, str] | None = None,
        known_hosts: Path | None = None,
        image: str | None = None,
        guest_network: str | None = None,
    ) -> None:
        """`image`: the guest image each VM's disk is copied from at its creation (None: the disk
        is the spec's, or already there); `guest_network`: the network of `guest_addresses`, each
        given to its guest's kernel (`kernel_ip`; None: the guests configure their own)."""
        if toolstack not in ("xl", "xm"):
            raise ValueError(f"toolstack must be xl or xm, not {toolstack!r}")
        super().__init__(hosts, key_file, guest_addresses, known_hosts)
        self.toolstack = toolstack
        self.kernel, self.ramdisk, self.disk_dir, self.bridge = kernel, ramdisk, disk_dir, bridge
        self.image, self.guest_network = image, guest_network

    def _domains(self, host: str) -> list[XenDomain]:
        return [d for d in parse_xl_list(self.remote(host).run([self.toolstack, "list"])) if d.name != DOM0]

    def list_vms(self) -> list[VMInfo]:
        return [
            VMInfo(d.name, host, self._specs.get(d.name, VMSpec(d.name, d.memory_mb, d.vcpus)), d.running)
            for host, domains in self.on_every_pm(self._domains).items()
            for d in domains
        ]

    def vm_host(self, vm: str) -> str:
        for info in self.list_vms():
            if info.name == vm:
                return info.host
        raise KeyError(vm)

    def cpu_use(self, interval_s: float) -> CpuUse:
        delay = max(1, round(interval_s))  # xentop's delay is whole seconds

        def sample(host: str) -> tuple[float, dict[str, float]]:
            names = [d.name for d in self._domains(host)]
            frames = parse_xentop(
                self.remote(host).run(["xentop", "-b", "-i", "2", "-d", str(delay)], timeout_s=delay + 30)
            )
            if len(frames) < 2:
                raise RemoteError(host, ["xentop"], 0, "xentop printed fewer than two iterations")
            return cpu_from_xentop(frames[-1], names, self._hosts[host])

        samples = self.on_every_pm(sample)
        return CpuUse(
            float(delay),
            {h: s[0] for h, s in samples.items()},
            {vm: pct for _, vms in samples.values() for vm, pct in vms.items()},
        )

    def create_vm(self, spec: VMSpec, host: str) -> VMInfo:
        if not _NAME.match(spec.name):
            raise ValueError(
                f"Xen VM name {spec.name!r}: 1-10 of [A-Za-z0-9_.-] (xentop shows 10 characters)"
            )
        cmdline = GUEST_CMDLINE
        if self.guest_network is not None:
            if spec.name not in self.guest_addresses:
                raise ValueError(f"Xen VM {spec.name!r}: no guest address (the inventory's testbed_xen_guests)")
            cmdline += " " + kernel_ip(self.guest_addresses[spec.name], self.guest_network)
        disk = spec.disk or f"{self.disk_dir}/{host}/disks/{spec.name}.img"
        remote = self.remote(host)
        if self.image is not None:  # a fresh disk: nothing of an earlier run's guest is left on it
            remote.run(["mkdir", "-p", str(PurePosixPath(disk).parent)])
            remote.run(["cp", "--sparse=always", self.image, disk], timeout_s=600)
        remote.run(["mkdir", "-p", CONFIG_DIR])
        path = f"{CONFIG_DIR}/{spec.name}.cfg"
        remote.write_file(path, domain_config(spec, self.kernel, self.ramdisk, disk, self.bridge, cmdline).encode())
        remote.run([self.toolstack, "create", path])
        return self.created(spec, host)

    def destroy_vm(self, vm: str) -> None:
        try:
            host = self.vm_host(vm)
        except KeyError:
            return
        self.remote(host).run([self.toolstack, "destroy", vm])
        self.remote(host).run(["rm", "-f", f"{CONFIG_DIR}/{vm}.cfg"])
        self._specs.pop(vm, None)

    def migrate_argv(self, vm: str, destination: Host, mode: MigrationMode) -> list[str]:
        """The toolstack's migration command for a mode; ValueError for one Xen cannot do."""
        if mode is MigrationMode.PRECOPY:
            return (
                ["xl", "migrate", vm, destination.address]
                if self.toolstack == "xl"
                else ["xm", "migrate", "--live", vm, destination.address]
            )
        if mode is MigrationMode.STOPCOPY and self.toolstack == "xm":
            return ["xm", "migrate", vm, destination.address]
        raise ValueError(f"Xen ({self.toolstack}) cannot migrate in mode {mode}")

    def migrate(self, vm: str, destination: str, mode: MigrationMode, *,
                compression: str | None = None) -> MigrationRecord:
        mode = MigrationMode(mode)
        check_compression(self.technique, compression, mode.value)
        source = self.vm_host(vm)
        argv = self.migrate_argv(vm, self._hosts[destination], mode)
        run = stream_migration(self.remote(source), argv)
        return MigrationOrder(vm, source, destination, mode, run.start).record(
            run.total_s,
            error=run.error,
            # The toolstacks do not report the pause; stop-and-copy's outage is the whole move.
            downtime_s=run.total_s if mode is MigrationMode.STOPCOPY else None,
            bytes_sent=run.sent_bytes,
            phases={"migrate": run.total_s},
            details={"toolstack": self.toolstack, "log": run.relative_log()},
        )

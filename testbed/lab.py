"""The lab as data: hosts, roles, addresses, capacities and links, read from an Ansible inventory.

The inventory is the single description of a lab (the playbooks read the same one), so it is read
with ansible-core's own inventory and variable managers: host ranges, group_vars and templated
defaults mean here exactly what they mean to `ansible-playbook`. Everything is validated before
any host is touched, so a bad inventory fails with one line naming the host and the field.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from testbed.errors import InputError

CGROUP_ROOT = Path("/sys/fs/cgroup")
#: cgroup v1 controllers every lab host (and every VM on a PM) gets a directory in.
CGROUP_CONTROLLERS = ("cpu", "cpuacct", "memory", "freezer")
#: The lab's parent cgroup under each controller; everything below it belongs to the lab.
CGROUP_PARENT = "testbed"
CFS_PERIOD_US = 100_000
BRIDGE = "tbbr0"
VETH_PREFIX = "tbv-"
HOST_PREFIX = "tb-"
IFNAMSIZ = 15
DEFAULT_INVENTORY = Path(__file__).resolve().parent.parent / "inventory" / "local"
#: Where a real PM's own CPU use comes from (`testbed_pm_cpu`, `testbed manager lc --pm-cpu`): the
#: machine's /proc/stat, or the sum of its VMs' use, for PMs that share one kernel and so one
#: /proc/stat (the test hosts: systemd-nspawn containers on one machine), where the machine's figure
#: would make every PM look equally loaded.
PM_CPU_SOURCES = ("machine", "vms")

_RATE = re.compile(r"^(?P<value>\d+(?:\.\d+)?)(?P<unit>bit|kbit|mbit|gbit)$", re.IGNORECASE)
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}


def parse_rate(rate: str) -> int:
    """Bits per second of a tc rate such as `100mbit` (SI units, as tc reads them)."""
    match = _RATE.match(str(rate).strip())
    if not match:
        raise ValueError(f"{rate!r} is not a rate like 100mbit (units: bit, kbit, mbit, gbit)")
    return round(float(match["value"]) * _RATE_UNITS[match["unit"].lower()])


# tbf as every shaped lab link has it: a bucket of 10 ms of traffic at the rate, at least 16 kB (a
# few full-size frames), and packets wait at most 50 ms (roles/lab_host/defaults keeps the same).
TBF_BURST_S, TBF_MIN_BURST, TBF_LATENCY = 0.01, 16_000, "50ms"


def tbf_options(rate_bps: int) -> list[str]:
    """tc's tbf options for a link at `rate_bps` bit/s: `rate ... burst ... latency ...`."""
    return ["rate", f"{rate_bps}bit", "burst", str(max(int(rate_bps / 8 * TBF_BURST_S), TBF_MIN_BURST)),
            "latency", TBF_LATENCY]


def machine_cores() -> int:
    """CPUs this process may run on (what `nproc` prints): the budget the hosts' quotas share."""
    return len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class LabHost:
    """One lab host; on the embedded lab a network namespace with its own sshd and cgroups."""

    name: str
    role: str  # "controller" or "pm"
    address: str
    capacity: float  # CPUs it may use (cgroup CPU quota)
    cores: int  # cores it stands for: a k-vCPU VM gets k/cores of its capacity
    link_rate: str  # tc syntax, e.g. "100mbit"
    #: Where the PM's Local Controller answers ("ADDRESS:PORT") when it does not run on the PM
    #: (`testbed manager lc --over-ssh`: PMs whose Python cannot run it); None: on the PM itself.
    lc_endpoint: str | None = None

    @property
    def short(self) -> str:
        """The name without the lab prefix (`pm1` for `tb-pm1`), used in interface names."""
        return self.name.removeprefix(HOST_PREFIX)

    @property
    def veth(self) -> str:
        """Root-namespace end of the host's veth pair, attached to the lab bridge."""
        return VETH_PREFIX + self.short

    @property
    def link_rate_bps(self) -> int:
        return parse_rate(self.link_rate)

    @property
    def cfs_quota_us(self) -> int:
        return round(self.capacity * CFS_PERIOD_US)

    def cgroup(self, controller: str) -> Path:
        return CGROUP_ROOT / controller / CGROUP_PARENT / self.name


@dataclass(frozen=True)
class Lab:
    """A lab read from an inventory: one controller and one or more PMs."""

    inventory: Path
    hosts: tuple[LabHost, ...]
    network: str
    gateway: str
    embedded: bool
    state_dir: Path
    #: What this machine reaches the hosts with as root (testbed.drivers.ssh, testbed.clock): the key
    #: (None: the lab state directory's id_ed25519, the embedded lab's) and the hosts' keys (None: the
    #: state directory's known_hosts on the embedded lab, the user's ~/.ssh/known_hosts on a real one).
    key_file: Path | None = None
    known_hosts_file: Path | None = None
    #: The virtualization technique a real lab's PMs run (its `testbed_technique`); None: embedded.
    technique: str | None = None
    #: Where a real PM's own CPU use comes from (PM_CPU_SOURCES, `testbed_pm_cpu`).
    pm_cpu: str = "machine"
    #: The inventory's DRIVER_VARS that are set: what a real lab's driver needs beyond its PMs and
    #: key (a Xen guest's kernel, image and addresses), read by the catalogue's `lab_options`.
    driver_vars: Mapping[str, object] = field(default_factory=dict)

    @property
    def controller(self) -> LabHost:
        return next(h for h in self.hosts if h.role == "controller")

    @property
    def pms(self) -> tuple[LabHost, ...]:
        return tuple(h for h in self.hosts if h.role == "pm")

    @property
    def ssh_key(self) -> Path:
        """The key this machine logs in to the hosts with: the inventory's
        `ansible_ssh_private_key_file` (the one Ansible uses), else the lab state directory's."""
        return self.key_file or self.state_dir / "id_ed25519"

    @property
    def known_hosts(self) -> Path | None:
        """The hosts' SSH keys this machine trusts (testbed.drivers.ssh.ssh_client): the inventory's
        `testbed_known_hosts`, else the embedded lab's file (lab_host writes it), else None (a real
        lab: the user's ~/.ssh/known_hosts)."""
        if self.known_hosts_file is not None:
            return self.known_hosts_file
        return self.state_dir / "known_hosts" if self.embedded else None

    def ssh_argv(self, host: LabHost, argv: list[str]) -> list[str]:
        """`ssh` command line running `argv` on a host as root with the lab key (on the embedded
        lab: inside the host's namespace and cgroups). The remote shell sees `argv` quoted."""
        import shlex

        known = ["-o", f"UserKnownHostsFile={self.known_hosts}"] if self.known_hosts else []
        return ["ssh", "-i", str(self.ssh_key), "-o", "BatchMode=yes", *known,
                "-o", "StrictHostKeyChecking=accept-new", f"root@{host.address}", "--", shlex.join(argv)]

    def host(self, name: str) -> LabHost:
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(name)


def load_lab(inventory: str | os.PathLike[str] = DEFAULT_INVENTORY) -> Lab:
    """Read and validate a lab inventory (a directory or file Ansible accepts as `-i`)."""
    path = Path(inventory)
    if not path.exists():
        raise InputError(f"inventory {path}: no such file or directory")
    raw = _read_inventory(path)
    return _validate(path, raw, machine_cores())


# Variables read per host; `None` marks the ones without a default.
_HOST_VARS = {
    "testbed_address": None,
    "testbed_capacity": None,
    "testbed_cores": 4,
    "testbed_link_rate": "100mbit",
    "testbed_lc_endpoint": None,
}
_LAB_VARS = {
    "testbed_lab_network": "198.18.0.0/24",
    "testbed_lab_gateway": "198.18.0.1",
    "testbed_embedded": False,
    "testbed_lab_state_dir": "/var/lib/testbed/lab",
    "testbed_technique": None,
    "testbed_pm_cpu": "machine",
    "testbed_known_hosts": None,
    "ansible_ssh_private_key_file": None,
}
#: A real lab's driver settings (Lab.driver_vars): the Xen guests' kernel, image, toolstack and
#: addresses (testbed.drivers.xen.lab_options says what each is).
DRIVER_VARS = ("testbed_xen_kernel", "testbed_xen_ramdisk", "testbed_xen_image", "testbed_xen_toolstack",
               "testbed_xen_guests")


@dataclass(frozen=True)
class _RawHost:
    name: str
    group: str
    vars: dict[str, object]


@functools.cache
def _init_ansible_plugins() -> None:
    """Ansible's plugin loader (lookups in inventory templates need it); once per process."""
    from ansible.plugins.loader import init_plugin_loader

    init_plugin_loader()


def _read_inventory(path: Path) -> list[_RawHost]:
    """Hosts of the `controller` and `pms` groups with their templated variables."""
    from ansible.errors import AnsibleError
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader
    from ansible.template import Templar
    from ansible.vars.manager import VariableManager

    _init_ansible_plugins()
    loader = DataLoader()
    inventory = InventoryManager(loader=loader, sources=[str(path)])
    variables = VariableManager(loader=loader, inventory=inventory)
    groups = inventory.get_groups_dict()
    for group in ("controller", "pms"):
        if not groups.get(group):
            raise InputError(f"inventory {path}: group '{group}' is missing or has no hosts")
    hosts = []
    for group in ("controller", "pms"):
        for name in groups[group]:
            host_vars = variables.get_vars(host=inventory.get_host(name), include_hostvars=False)
            templar = Templar(loader=loader, variables=host_vars)
            wanted = {}
            for var, default in (_HOST_VARS | _LAB_VARS | dict.fromkeys(DRIVER_VARS)).items():
                try:
                    wanted[var] = templar.template(host_vars.get(var, default))
                except AnsibleError as err:
                    raise InputError(f"inventory {path}: host {name}: {var}: {err.message}") from None
            hosts.append(_RawHost(name, group, wanted))
    return hosts


def _validate(path: Path, raw: list[_RawHost], cores: float) -> Lab:
    """Apply the lab's rules (the lab_host role asserts the same ones) and build the Lab.

    The rules that come from sharing one machine (capacities within its cores, names that fit
    an interface name) bind only the embedded lab; a real lab's PMs bring their own cores."""
    first = raw[0].vars
    embedded = bool(first["testbed_embedded"])
    if not embedded:
        cores = math.inf
    where = f"inventory {path}"
    try:
        network = ipaddress.ip_network(str(first["testbed_lab_network"]))
    except ValueError as err:
        raise InputError(f"{where}: testbed_lab_network: {err}") from None
    controllers = [r.name for r in raw if r.group == "controller"]
    if len(controllers) != 1:
        raise InputError(f"{where}: group 'controller' must hold exactly one host, not {controllers}")
    seen: dict[str, str] = {}
    hosts = []
    for r in raw:
        host = _host(f"{where}: host {r.name}", r, network, cores, embedded)
        if host.address in seen:
            raise InputError(
                f"{where}: host {r.name}: testbed_address: {host.address} is also {seen[host.address]}'s"
            )
        seen[host.address] = r.name
        hosts.append(host)
    pm_cpu = str(first["testbed_pm_cpu"])
    if pm_cpu not in PM_CPU_SOURCES:
        raise InputError(f"{where}: testbed_pm_cpu: {pm_cpu!r} is not one of {', '.join(PM_CPU_SOURCES)}")
    gateway = str(first["testbed_lab_gateway"])
    if gateway in seen:
        raise InputError(f"{where}: host {seen[gateway]}: testbed_address: {gateway} is the lab gateway")
    total = sum(h.capacity for h in hosts if h.role == "pm")
    if total > cores + 1e-9:
        raise InputError(
            f"{where}: testbed_capacity: the PMs' capacities add up to {total:g} CPUs,"
            f" more than this machine's {cores} cores"
        )
    return Lab(
        inventory=path,
        hosts=tuple(hosts),
        network=str(network),
        gateway=gateway,
        embedded=embedded,
        state_dir=Path(str(first["testbed_lab_state_dir"])),
        key_file=_path(first["ansible_ssh_private_key_file"]),
        known_hosts_file=_path(first["testbed_known_hosts"]),
        technique=None if embedded or first["testbed_technique"] is None else str(first["testbed_technique"]),
        pm_cpu=pm_cpu,
        driver_vars={var: first[var] for var in DRIVER_VARS if first[var] is not None},
    )


def _path(value: object) -> Path | None:
    """An inventory path (`~` expanded, as Ansible does), or None when unset."""
    return None if value in (None, "") else Path(str(value)).expanduser()


def _host(where: str, raw: _RawHost, network: ipaddress.IPv4Network | ipaddress.IPv6Network,
          cores: float, embedded: bool) -> LabHost:
    values = raw.vars
    if embedded and len(VETH_PREFIX + raw.name.removeprefix(HOST_PREFIX)) > IFNAMSIZ:
        raise InputError(f"{where}: name: too long for an interface name (at most 11 characters after tb-)")
    if values["testbed_address"] is None:
        raise InputError(f"{where}: testbed_address: not set")
    try:
        address = ipaddress.ip_address(str(values["testbed_address"]))
    except ValueError:
        raise InputError(f"{where}: testbed_address: {values['testbed_address']!r} is not an address") from None
    if address not in network or address in (network.network_address, network.broadcast_address):
        raise InputError(f"{where}: testbed_address: {address} is outside the lab network {network}")
    capacity = _number(where, "testbed_capacity", values["testbed_capacity"], float)
    if capacity <= 0:
        raise InputError(f"{where}: testbed_capacity: must be > 0 CPUs, not {capacity:g}")
    if capacity > cores:
        raise InputError(f"{where}: testbed_capacity: {capacity:g} CPUs is more than this machine's {cores}")
    host_cores = _number(where, "testbed_cores", values["testbed_cores"], int)
    if host_cores < 1:
        raise InputError(f"{where}: testbed_cores: must be >= 1, not {host_cores}")
    rate = str(values["testbed_link_rate"])
    try:
        parse_rate(rate)
    except ValueError as err:
        raise InputError(f"{where}: testbed_link_rate: {err}") from None
    role = "controller" if raw.group == "controller" else "pm"
    return LabHost(raw.name, role, str(address), capacity, host_cores, rate,
                   _endpoint(where, values["testbed_lc_endpoint"]))


def _endpoint(where: str, value: object) -> str | None:
    """testbed_lc_endpoint: "ADDRESS:PORT" (an IPv4 address or a name), or None when unset."""
    if value in (None, ""):
        return None
    address, sep, port = str(value).rpartition(":")
    if not sep or not address or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"{where}: testbed_lc_endpoint: {value!r} is not ADDRESS:PORT")
    return f"{address}:{int(port)}"


def _number(where: str, field: str, value: object, kind: type[float | int]) -> float | int:
    try:
        return kind(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"{where}: {field}: {value!r} is not a number") from None


# --- Reading back what the embedded lab really has (for `testbed lab status` and the tests) ---

def reachable(address: str, port: int = 22, timeout: float = 2.0) -> bool:
    """True when an SSH server answers on address:port (its banner, not just an open port)."""
    import socket

    try:
        with socket.create_connection((address, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            return sock.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def cgroup_quota_cpus(host: LabHost) -> float | None:
    """The CPU quota the host's cgroup really has, in CPUs (None: no cgroup; -1: unlimited)."""
    try:
        quota = int((host.cgroup("cpu") / "cpu.cfs_quota_us").read_text())
        period = int((host.cgroup("cpu") / "cpu.cfs_period_us").read_text())
    except OSError:
        return None
    return -1.0 if quota < 0 else quota / period


def tc_rate_bps(dev: str, netns: str | None = None) -> int | None:
    """Rate of the root tbf/htb qdisc on a device, in bit/s, as the kernel reports it."""
    import json
    import subprocess

    argv = ["tc", *(["-n", netns] if netns else []), "-j", "qdisc", "show", "dev", dev]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    for qdisc in json.loads(proc.stdout):
        rate = qdisc.get("options", {}).get("rate")
        if qdisc.get("root") and rate is not None:
            return int(rate) * 8
    return None


def host_status(host: LabHost) -> dict[str, object]:
    """What a host is supposed to be (inventory) beside what it is (read back from the machine)."""
    return {
        "name": host.name,
        "role": host.role,
        "address": host.address,
        "reachable": reachable(host.address),
        "capacity": host.capacity,
        "cores": host.cores,
        "link_rate": host.link_rate,
        "link_rate_bps": host.link_rate_bps,
        "namespace": (Path("/run/netns") / host.name).exists(),
        "cgroup_quota_cpus": cgroup_quota_cpus(host),
        "tc_rate_bps": {"bridge_side": tc_rate_bps(host.veth), "host_side": tc_rate_bps("eth0", host.name)},
    }

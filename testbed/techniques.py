"""The technique catalogue: what each virtualization technique is and can do, in one module.

Why one module: what a technique could do used to be spread over spec validation, the Local
Controller's dispatch, the sampler's VM readers, the runner's defaults and the simulator, which
drifted apart. Every one of them now reads the `Technique` entry here, so adding a technique
means adding its entry (and its driver) and nothing else that names techniques.

A technique's driver and its sampler reader are named as "module:attribute" and imported only
when used: importing the catalogue (as spec validation does) must not import every driver and
its dependencies (QEMU's QMP client, paramiko, numpy).

The catalogue is honest about what runs: `testbed run` drives the embedded lab's techniques (qemu,
container) and, on a real lab whose PMs run it (`testbed_technique: kvm`, `openvz` or `xen`), libvirt,
OpenVZ or Xen (the latter two proven on fake PMs only: real sshd, their toolstacks faked,
tests/fakes/openvz and tests/fakes/xen). A real lab's driver is made from its PMs, the SSH key
and known hosts this machine (or a PM's Local Controller) reaches them with, and what else the
inventory tells it (`lab_options`: Xen's guest kernel, image and addresses) (`make_driver`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from testbed.drivers.base import Driver, Host, MigrationMode
from testbed.errors import InputError

if TYPE_CHECKING:
    import argparse

    from testbed.lab import Lab

MODES = tuple(mode.value for mode in MigrationMode)
#: Every compression a migration may be asked for ("none": uncompressed).
COMPRESSIONS = ("none", "bzip2", "zstd", "zlib")


@dataclass(frozen=True)
class Technique:
    """One virtualization technique, as every part of the package sees it."""

    name: str  # in specs, `--technique`, the results' `technique` column and the drivers' `technique`
    label: str  # the technology in messages ("QEMU cannot compress ...")
    vm_noun: str  # one of its VMs in messages ("a QEMU guest keeps ~96 MB ...")
    driver: str  # "module:Class" of its Driver
    default_mode: str  # its own migration mode when a spec names none (thesis §2.3)
    modes: tuple[str, ...]  # the migration modes its driver performs
    compressions: tuple[str, ...]  # what its migrations can be compressed with, "none" included
    compresses_postcopy: bool = True  # False: no compression together with post-copy
    #: "module:function" making the sampler's reader of its VMs' CPU on a real PM (from the PM's
    #: Host); None: no real lab runs it, so neither an inventory's `testbed_technique` nor
    #: `testbed manager lc --vm-cpu` may name it.
    vm_cpu: str | None = None
    #: "module:Class" of a real PM's Sampler (made with the PM's name and pm_cpu) where the PM's
    #: kernel does not see its VMs' CPU (Xen: dom0's /proc/stat counts dom0 alone); None: /proc/stat
    #: and `vm_cpu` (testbed.manager.sampler.ProcStatSampler).
    pm_sampler: str | None = None
    in_specs: bool = True  # an experiment spec may name it
    embedded: bool = False  # its driver is made from the PMs alone: every embedded LC holds one
    simulated: bool = False  # its VMs are simulated (never compared with a lab technique in one campaign)
    unrunnable: str | None = None  # why `testbed run` cannot drive it on a lab yet; None: it can
    guest_footprint_mb: int = 0  # memory its guest OS keeps from the VM's memory
    #: MB a Kernel app `make` job needs inside the VM's memory limit (its VMs cannot swap to a disk
    #: of their own); None: the VM swaps to its disk.
    kernel_mb_per_job: int | None = None
    services: bool = False  # its VMs run the study's server apps (apache2, postgres)
    bench: str | None = None  # "module:function" of its `testbed bench migration` on the embedded lab
    #: "module:function" giving a real lab's driver its keyword arguments from the Lab (the
    #: inventory's settings); None: its driver needs the PMs and the key only.
    lab_options: str | None = None

    @property
    def runnable(self) -> bool:
        """Whether `testbed run` drives it on a lab (else `unrunnable` says why not)."""
        return self.unrunnable is None

    def driver_class(self) -> type[Driver]:
        """Its driver's class, its module imported now."""
        return _resolve(self.driver)

    def vm_cpu_reader(self, host: Host, tool: Callable[[list[str]], str]) -> Callable[[], Any]:
        """The sampler's reader of this technique's VMs on the real PM `host`, its tools run
        through `tool` (testbed.manager.sampler.Tool)."""
        if self.vm_cpu is None:
            raise ValueError(f"technique {self.name!r} runs on no real lab")
        return _resolve(self.vm_cpu)(host, tool)

    def real_pm_sampler(self, host: str, pm_cpu: str, tool: Callable[[list[str]], str] | None = None) -> Any:
        """Its own Sampler of the real PM `host` (only techniques with a `pm_sampler`), its tools
        run through `tool` (None: on this machine)."""
        if self.pm_sampler is None:
            raise ValueError(f"technique {self.name!r} is sampled from /proc/stat and its VM CPU reader")
        return _resolve(self.pm_sampler)(host, pm_cpu=pm_cpu, tool=tool)

    def driver_options(self, lab: Lab) -> dict[str, Any]:
        """Its real-lab driver's keyword arguments from `lab` beyond the PMs and key (InputError,
        before any host is touched, for a setting the lab lacks)."""
        return {} if self.lab_options is None else _resolve(self.lab_options)(lab)

    def run_bench(self, args: argparse.Namespace) -> int:
        """Its `testbed bench migration` (only techniques in BENCHED have one)."""
        if self.bench is None:
            raise InputError(f"--technique: {self.name} has no migration bench (available: {', '.join(BENCHED)})")
        return _resolve(self.bench)(args)

    def refuses_mode(self, mode: str) -> str | None:
        """Why its migrations cannot use `mode` (None: they can)."""
        if mode in self.modes:
            return None
        return f"technique {self.name} migrates by {' or '.join(self.modes)} only"

    def refuses_compression(self, compression: str, mode: str | None) -> str | None:
        """Why its migrations in `mode` (None: its own) cannot be compressed so (None: they can)."""
        if compression not in self.compressions:
            offered = [c for c in self.compressions if c != "none"]
            if not offered:
                return f"technique {self.name} does not compress migrations"
            return f"technique {self.name} compresses migrations with {' or '.join(offered)} only"
        if compression != "none" and (mode or self.default_mode) == "postcopy" and not self.compresses_postcopy:
            return f"{self.label} cannot compress a post-copy migration"
        return None


def _resolve(ref: str) -> Any:
    """The attribute `ref` ("module:attribute") names, importing its module now."""
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)


_ENTRIES = (
    Technique(
        name="qemu", label="QEMU", vm_noun="a QEMU guest", driver="testbed.drivers.qemu:QemuDriver",
        default_mode="precopy", modes=MODES,
        compressions=("none", "zstd", "zlib"),  # multifd zstd or zlib; no bzip2
        compresses_postcopy=False,  # QEMU 7.2 cannot combine multifd compression with post-copy
        embedded=True, bench="testbed.bench.migration:run",
        # its kernel and initramfs: a 128 MB guest has 82 MB total, 47 free; an allocator of 80 MB
        # in a 160 MB guest is OOM-killed, 128 MB in 256 MB runs
        guest_footprint_mb=96,
    ),
    Technique(
        name="container", label="containers", vm_noun="a container",
        driver="testbed.drivers.container:ContainerDriver",
        default_mode="stopcopy", modes=("stopcopy",),
        compressions=("none", "bzip2", "zstd"),  # the dump through bzip2 (the thesis' App. A) or zstd
        vm_cpu="testbed.manager.sampler:container_reader", embedded=True,
        # -j2 ran in 160 MB, -j4 was OOM-killed in 200 and 256 MB and ran in 300 MB (peak 251 MB)
        kernel_mb_per_job=75,
        services=True, bench="testbed.bench.container_migration:run",
    ),
    Technique(
        name="xen", label="Xen", vm_noun="a Xen domain", driver="testbed.drivers.xen:XenDriver",
        default_mode="precopy", modes=("precopy", "stopcopy"),  # stop-and-copy with xm (Xen 3.2) only
        compressions=("none",),
        pm_sampler="testbed.manager.sampler:XenSampler", lab_options="testbed.drivers.xen:lab_options",
    ),
    Technique(
        name="openvz", label="OpenVZ", vm_noun="an OpenVZ container", driver="testbed.drivers.openvz:OpenVZDriver",
        default_mode="stopcopy", modes=("stopcopy",),  # vzmigrate --online: suspend, dump, copy, undump
        compressions=("none",),
        vm_cpu="testbed.manager.sampler:openvz_reader",
    ),
    Technique(
        name="kvm", label="libvirt/KVM", vm_noun="a libvirt domain", driver="testbed.drivers.libvirt:LibvirtDriver",
        default_mode="precopy", modes=MODES, compressions=("none",),
        vm_cpu="testbed.manager.sampler:libvirt_reader",
        # a QEMU guest's image (the qemu role's, booted by libvirt): its kernel keeps as much
        guest_footprint_mb=96,
    ),
    Technique(
        name="sim", label="the simulator", vm_noun="a simulated VM", driver="testbed.drivers.sim:SimDriver",
        # the mimicked technique's mode by default (testbed.sim.executor); compression is not
        # modelled, accepted so that a lab spec simulates unchanged
        default_mode="precopy", modes=MODES, compressions=COMPRESSIONS,
        simulated=True,
        unrunnable="it is simulated: `testbed sim run SPEC` or `testbed run SPEC --technique sim`",
    ),
)

CATALOGUE: Mapping[str, Technique] = MappingProxyType({t.name: t for t in _ENTRIES})
#: What an experiment spec may name (spec.Technique).
SPEC_NAMES = tuple(t.name for t in _ENTRIES if t.in_specs)
#: What every embedded Local Controller holds a driver of.
EMBEDDED = tuple(t.name for t in _ENTRIES if t.embedded)
#: What `testbed run` drives on a lab.
RUNNABLE = tuple(t.name for t in _ENTRIES if t.runnable)
#: What `testbed run` drives on a real lab whose PMs run it (a driver over SSH, made with a key).
REAL_RUNNABLE = tuple(t.name for t in _ENTRIES if t.runnable and not t.embedded and not t.simulated)
#: What `testbed bench migration` measures.
BENCHED = tuple(t.name for t in _ENTRIES if t.bench is not None)
#: What a real lab's `testbed_technique` (and `testbed manager lc --vm-cpu`) may name.
REAL_LAB = tuple(t.name for t in _ENTRIES if t.vm_cpu is not None or t.pm_sampler is not None)
#: The one technique whose runs are simulated.
(SIMULATOR,) = (t.name for t in _ENTRIES if t.simulated)


def technique(name: str) -> Technique:
    """The catalogue's entry for `name`; InputError (a user's typo, before any host is touched)
    naming the known techniques otherwise."""
    try:
        return CATALOGUE[name]
    except KeyError:
        raise InputError(f"unknown technique {name!r} (known: {', '.join(CATALOGUE)})") from None


def check_compression(name: str, compression: str | None, mode: str | None) -> None:
    """ValueError when technique `name`'s migrations in `mode` cannot be compressed so (None:
    uncompressed): a driver's own check of a Local Controller's order, by the catalogue's rule."""
    if reason := technique(name).refuses_compression(compression or "none", mode):
        raise ValueError(reason)


def make_driver(name: str, hosts: Iterable[Host], *, key_file: Path | None = None,
                known_hosts: Path | None = None, options: Mapping[str, Any] | None = None) -> Driver:
    """The driver of technique `name` over the PMs `hosts`, the one place that maps a technique to
    its driver (the LCs and the runner both make theirs here, so both sides agree on a technique).
    The embedded lab's drivers are made from the PMs alone; a real lab's runnable ones (REAL_RUNNABLE)
    from the PMs, the SSH key (and known_hosts: None, the user's) they are reached with as root and
    `options` (the technique's `driver_options` of the lab). ValueError for any other."""
    entry = CATALOGUE.get(name)
    if entry is not None and entry.embedded:
        return entry.driver_class()(list(hosts))
    if entry is None or entry.name not in REAL_RUNNABLE:
        raise ValueError(f"technique {name!r} has no driver here (available: {', '.join(EMBEDDED + REAL_RUNNABLE)})")
    if key_file is None:
        raise ValueError(f"technique {name!r}: its driver reaches the PMs over SSH and needs a key file")
    return entry.driver_class()(list(hosts), key_file, known_hosts=known_hosts, **(options or {}))

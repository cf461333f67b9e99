"""QEMU full-system VMs on the lab's PMs, driven over QMP, migrated by QEMU itself.

A VM is one QEMU process started *on* its PM: it joins the PM's cgroups and then enters the
PM's network namespace (in that order: `ip netns exec` hides /sys/fs/cgroup), so the PM pays
for everything QEMU does, migration included, as dom0 pays in the thesis' Xen. Only the vCPU
threads move on into the VM's own cgroup, capped at vcpus/cores of the PM's capacity, which is
what a k-vCPU guest gets on an N-core host. Guests boot Debian's kernel with the initramfs the
`qemu` role builds; its init serves the workload channel on the serial console (see
roles/qemu/files/guest-init), which the host reads and timestamps here.

Migration is QEMU's own, over TCP between the PMs' addresses on the lab network. The link's
shaping decides the bandwidth: QEMU's 128 MiB/s default cap is lifted, never used to fake a
rate. Every figure in a MigrationRecord comes from `query-migrate`, QMP event timestamps or
the host clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Hashable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

from qemu.qmp import ConnectError, EventListener, QMPClient

from testbed.drivers import cgroups
from testbed.drivers.base import (
    CpuUse,
    Host,
    MigrationMode,
    MigrationRecord,
    VMInfo,
    VMSpec,
)
from testbed.drivers.guest_console import ATTACH_TIMEOUT_S, ConsoleWorkloads, GuestConsole
from testbed.drivers.qemu_memcheck import RamComparison, compare_ram
from testbed.drivers.qemu_snapshot import BootSnapshots, pass_fd
from testbed.storage import create_disk_argv

STATE_DIR = Path("/var/lib/testbed/vms")
IMAGE_DIR = Path("/var/lib/testbed/images/qemu")
QEMU = "qemu-system-x86_64"
#: The guest (kernel + initramfs unpacked in RAM) hangs silently at 64 MB; 96 MB boots.
MIN_MEMORY_MB = 96
#: Controllers of the VM's own cgroup, which holds the vCPU threads.
VM_CONTROLLERS = ("cpu", "cpuacct")
#: Under TCG, QEMU 7.2's pre-copy loses pages the guest dirties through TLB entries that were
#: already writable: the fast path of cpu_physical_memory_sync_dirty_bitmap() clears a whole
#: bitmap word of dirty bits without resetting the TLB (fixed in QEMU 9.0, commits 7e8ccf99ed,
#: 86a9ae80cc, 03bfc2188f). That path runs only for RAM blocks whose length is a multiple of 64
#: pages (256 KiB); the per-page path resets the TLB of every page it clears. So under TCG a guest
#: gets 8 KiB more RAM than asked (QEMU rounds RAM to 8 KiB), which makes no size in MB a multiple
#: of 256 KiB (docs/DESIGN.md, "Known facts": the A/B behind it).
TCG_RAM_PAD_KIB = 8
#: Far above any lab link: the shaped link, not QEMU, must set the migration rate.
UNCAPPED_BYTES_PER_S = 100 * 2**30
#: Xen 3.2's pre-copy bounds (xc_domain_save: max_iters 29, max_factor 3), which the thesis' Xen
#: had: after 29 rounds, or once 3x the guest's RAM was sent, the domain is suspended and the rest
#: copied. QEMU's own rule (stop only when the rest fits its 300 ms downtime limit) never ends
#: while a guest dirties memory faster than the link carries it; past these bounds the driver
#: raises the downtime limit to QEMU's maximum, so the next round is the last, as in Xen.
XEN_MAX_ROUNDS, XEN_MAX_FACTOR = 29, 3
MAX_DOWNTIME_LIMIT_MS = 2_000_000  # QEMU's upper bound for downtime-limit (2,000 s)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,40}$")


_log = logging.getLogger(__name__)
REAP_PERIOD_S = 2.0
CRASHED_KEPT = 50  # crashed VMs whose logs are kept
RESTORE_TIMEOUT_S = 30.0  # a guest started from its boot snapshot answers in ~1 s (2 cores, busy)
READY_LISTEN_S = 20.0  # a guest boots in ~5 s alone, ~20 s with 9 booting on 2 cores


class QemuError(RuntimeError):
    """A VM could not be started, reached or stopped; the message says which and why."""


@dataclass(frozen=True)
class _Instance:
    """The files of one QEMU process of a VM on one PM (a migration briefly has two)."""

    vm_dir: Path
    host: str

    @property
    def qmp(self) -> Path:
        return self.vm_dir / f"{self.host}.qmp"

    @property
    def serial(self) -> Path:
        return self.vm_dir / f"{self.host}.serial"

    @property
    def pidfile(self) -> Path:
        return self.vm_dir / f"{self.host}.pid"

    @property
    def log(self) -> Path:
        return self.vm_dir / f"{self.host}.log"

    @property
    def console_log(self) -> Path:
        return self.vm_dir / "console.log"

    def pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def alive(self) -> bool:
        return _alive(self.pid())

    def remove_files(self) -> None:
        for path in (self.qmp, self.serial, self.pidfile, self.log):
            path.unlink(missing_ok=True)


def _alive(pid: int | None) -> bool:
    """Whether a QEMU process still runs (a zombie awaiting its reaper counts as gone)."""
    if pid is None:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state != "Z" and b"qemu" in cmdline


def _identity(path: Path) -> tuple[int, int]:
    """Inode and change time: tells a QEMU's socket file from the next one at the same path
    (inode numbers alone are reused at once)."""
    stat = path.stat()
    return stat.st_ino, stat.st_ctime_ns


class _Console(GuestConsole):
    """A QEMU process's console as a Unix socket in the VM's directory (HOST.serial).

    It watches the VM's directory for a new QEMU's console, so that it follows the VM when
    another process (a Local Controller) migrates it; a driver that only migrates never
    connects. Commands go to the PM named in vm.json, read at each send.
    """

    error = QemuError

    def __init__(self, vm: str, vm_dir: Path) -> None:
        self.vm_dir = vm_dir
        self._dropped: dict[Path, tuple[int, int]] = {}  # console → identity of a socket let go
        super().__init__(vm)

    def attach(self, key: Hashable, timeout_s: float = ATTACH_TIMEOUT_S) -> None:
        with self._cond:
            self._dropped.pop(key, None)  # type: ignore[call-overload]
        super().attach(key, timeout_s)

    def detach(self, path: Path) -> None:
        """Stop following the QEMU console at `path` (a process about to go)."""
        with contextlib.suppress(OSError), self._cond:
            self._dropped[path] = _identity(path)

    def _home(self) -> Path:
        host = json.loads((self.vm_dir / "vm.json").read_text())["host"]
        return self.vm_dir / f"{host}.serial"

    def _follow(self) -> None:
        """Connect to every live QEMU console of the VM not yet connected; let go of those
        asked to (detach) while they are the same socket file."""
        for path in self.vm_dir.glob("*.serial"):
            try:
                identity = _identity(path)
            except OSError:
                continue
            if self._dropped.get(path) == identity:
                if path in self._sockets:
                    self._close(self._sockets[path])
                continue
            if path not in self._sockets:
                self._connect(path)

    def _open(self, key: Hashable) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(1.0)  # a QEMU that queues but does not accept must not stall the loop
        try:
            sock.connect(str(key))
        except OSError:
            sock.close()
            raise
        return sock


class QemuDriver(ConsoleWorkloads):
    """The Driver protocol (testbed.drivers.base) for QEMU VMs on the given PMs."""

    technique = "qemu"

    def __init__(
        self,
        hosts: Iterable[Host],
        *,
        state_dir: Path = STATE_DIR,
        image_dir: Path = IMAGE_DIR,
        accel: str | None = None,
        boot_timeout_s: float = 120.0,
        migration_timeout_s: float = 300.0,
        boot_snapshots: bool = True,
        tcg_ram_pad: bool = True,
    ) -> None:
        self._hosts = {h.name: h for h in hosts}
        self.state_dir = state_dir
        self.image_dir = image_dir
        self.accel = accel or _probed_accel(image_dir)
        #: KiB added to every guest's RAM under TCG (TCG_RAM_PAD_KIB); False reproduces QEMU's bug.
        self.ram_pad_kib = TCG_RAM_PAD_KIB if tcg_ram_pad and self.accel == "tcg" else 0
        #: Start VMs from a saved fresh boot when one fits (testbed.drivers.qemu_snapshot): a
        #: runner resets its VMs before every run, and boots dominated a run's time under TCG.
        self.boot_snapshots = (BootSnapshots(image_dir, self.accel, QEMU, self.ram_pad_kib)
                               if boot_snapshots else None)
        self.boot_timeout_s = boot_timeout_s
        self.migration_timeout_s = migration_timeout_s
        self._consoles: dict[str, _Console] = {}
        self._children: list[subprocess.Popen] = []  # QEMU processes this driver started
        self._children_lock = threading.Lock()
        self._reaper: threading.Thread | None = None

    # --- inventory -------------------------------------------------------------------------

    def hosts(self) -> list[Host]:
        return list(self._hosts.values())

    def list_vms(self) -> list[VMInfo]:
        self._reap()
        if not self.state_dir.is_dir():
            return []
        return [self._info(p.parent.name) for p in sorted(self.state_dir.glob("*/vm.json"))]

    def _info(self, vm: str) -> VMInfo:
        spec, host = self._load(vm)
        return VMInfo(vm, host, spec, self._instance(vm, host).alive())

    def _host(self, name: str) -> Host:
        try:
            return self._hosts[name]
        except KeyError:
            raise QemuError(f"unknown PM {name!r} (known: {', '.join(self._hosts)})") from None

    def _vm_dir(self, vm: str) -> Path:
        return self.state_dir / vm

    def _instance(self, vm: str, host: str) -> _Instance:
        return _Instance(self._vm_dir(vm), host)

    def _load(self, vm: str) -> tuple[VMSpec, str]:
        try:
            state = json.loads((self._vm_dir(vm) / "vm.json").read_text())
        except FileNotFoundError:
            raise QemuError(f"unknown VM {vm!r}") from None
        return VMSpec(**state["spec"]), state["host"]

    def _save(self, spec: VMSpec, host: str) -> None:
        path = self._vm_dir(spec.name) / "vm.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"spec": asdict(spec), "host": host}))
        tmp.replace(path)  # atomic: a reader never sees half a location

    # --- CPU ---------------------------------------------------------------------------------

    def cpu_use(self, interval_s: float) -> CpuUse:
        return cgroups.cpu_use(self, interval_s)

    # --- life cycle --------------------------------------------------------------------------

    def create_vm(self, spec: VMSpec, host: str) -> VMInfo:
        if not _NAME.match(spec.name):
            raise QemuError(f"VM name {spec.name!r}: letters, digits, '-' and '_' only")
        if spec.memory_mb < MIN_MEMORY_MB or spec.vcpus < 1:
            raise QemuError(f"VM {spec.name}: memory_mb must be >= {MIN_MEMORY_MB} and vcpus >= 1")
        pm = self._host(host)
        vm_dir = self._vm_dir(spec.name)
        if (vm_dir / "vm.json").exists():
            raise QemuError(f"VM {spec.name} already exists (destroy it first)")
        vm_dir.mkdir(parents=True, exist_ok=True)
        spec = self._with_disk(spec)
        self._save(spec, host)
        instance = self._instance(spec.name, host)
        snapshot = self.boot_snapshots.path_for(spec.memory_mb, spec.vcpus, spec.disk) if self.boot_snapshots else None
        try:
            if not (snapshot is not None and self._restored(spec, pm, instance, snapshot)):
                self._boot(spec, pm, instance, save_to=snapshot)
            cgroups.set_quota(pm.cgroup("cpu") / spec.name, spec.vcpus / pm.cores * pm.capacity)
        except BaseException:
            self.destroy_vm(spec.name)
            raise
        return self._info(spec.name)

    def _boot(self, spec: VMSpec, pm: Host, instance: _Instance, save_to: Path | None) -> None:
        """Boot the guest; boot is no part of any experiment: it runs under the PM's cap only
        (the VM's own cap applies once the guest is ready). A fresh boot is saved as the boot
        snapshot of such VMs when `save_to` names one."""
        self._launch(spec, pm, instance, incoming=False)
        asyncio.run(self._confine_vcpus(spec, pm, instance))
        cgroups.set_quota(pm.cgroup("cpu") / spec.name, pm.capacity)
        self._wait_ready(self._console(spec.name))
        if save_to is not None and self.boot_snapshots is not None:
            asyncio.run(self._save_snapshot(instance, save_to))

    async def _save_snapshot(self, instance: _Instance, dest: Path) -> None:
        """Save the fresh boot; a snapshot is only a cache, so a failed save costs later VMs a
        boot, never this VM, which runs on."""
        assert self.boot_snapshots is not None
        try:
            async with _qmp(instance.qmp) as qmp:
                await self.boot_snapshots.save(qmp, dest)
        except Exception as err:  # noqa: BLE001 - any failure: later VMs boot
            _log.warning("saving boot snapshot %s failed (%s: %s); later VMs boot", dest.name,
                         type(err).__name__, err)

    def _restored(self, spec: VMSpec, pm: Host, instance: _Instance, snapshot: Path) -> bool:
        """Start the VM from its boot snapshot; False (and nothing left running) if there is no
        sound snapshot or the VM did not come up answering its console, so that the caller boots
        it instead. Whatever went wrong, the snapshot is discarded: a bad one must not fail every
        later VM (issue #13); a good one costs one boot to save again."""
        assert self.boot_snapshots is not None
        stream = self.boot_snapshots.open_verified(snapshot)
        if stream is None:
            return False
        with stream:
            try:
                self._restore(spec, pm, instance, stream)
                return True
            except Exception as err:  # noqa: BLE001 - any failure: discard the snapshot and boot
                _log.warning("VM %s: restoring %s failed (%s: %s); discarding it and booting",
                             spec.name, snapshot.name, type(err).__name__, err)
                console = self._consoles.pop(spec.name, None)
                if console is not None:
                    console.close()
                self._stop_instance(spec.name, pm)
                self.boot_snapshots.discard(snapshot, os.fstat(stream.fileno()).st_ino)
                return False

    def _restore(self, spec: VMSpec, pm: Host, instance: _Instance, stream: BinaryIO) -> None:
        """Start the VM from its boot snapshot, read by QEMU from `stream` (checked already;
        testbed.drivers.qemu_snapshot), then check that its console answers as after a boot."""
        self._launch(spec, pm, instance, incoming=True)

        async def restore() -> None:
            async with _qmp(instance.qmp) as qmp:
                await qmp.execute("migrate-incoming", {"uri": await pass_fd(qmp, stream.fileno())})
                while (status := (await qmp.execute("query-status"))["status"]) == "inmigrate":
                    await asyncio.sleep(0.02)
                if status == "paused":  # saved stopped (a consistent state): run it
                    await qmp.execute("cont")
                    status = (await qmp.execute("query-status"))["status"]
                if status != "running":
                    raise QemuError(f"VM {spec.name}: restored from its boot snapshot but {status}")
            await self._confine_vcpus(spec, pm, instance)

        asyncio.run(asyncio.wait_for(restore(), timeout=RESTORE_TIMEOUT_S))
        self._wait_ready(self._console(spec.name), timeout_s=RESTORE_TIMEOUT_S, booting=False)

    def _with_disk(self, spec: VMSpec) -> VMSpec:
        """A VM without a disk URL gets a small qcow2 next to its state (shared in the lab)."""
        if spec.disk is not None:
            return spec
        disk = self._vm_dir(spec.name) / "disk.qcow2"
        subprocess.run(create_disk_argv(str(disk), size="256M"), check=True)
        return VMSpec(spec.name, spec.memory_mb, spec.vcpus, str(disk))

    def destroy_vm(self, vm: str) -> None:
        vm_dir = self._vm_dir(vm)
        if not vm_dir.is_dir():
            return
        console = self._consoles.pop(vm, None)
        if console is not None:
            console.close()
        # A QEMU instance leaves its log until stopped here; QEMU itself removes its pidfile
        # when it ends, as it does after a guest panic (-no-reboot), so logs tell, not pidfiles.
        logs = [log for log in vm_dir.glob("*.log") if log.name != "console.log"]
        if logs and not any(self._instance(vm, log.stem).alive() for log in logs):
            self._keep_remains(vm)
        pidfiles = list(vm_dir.glob("*.pid"))
        for pidfile in pidfiles:
            self._stop_instance(vm, self._host(pidfile.stem))
        shutil.rmtree(vm_dir, ignore_errors=True)

    def _keep_remains(self, vm: str) -> None:
        """A VM whose QEMU ended by itself (a guest panic ends it: -no-reboot) keeps its console
        and QEMU logs in state_dir/crashed/ (the newest CRASHED_KEPT), to say why it died."""
        crashed = self.state_dir / "crashed"
        dest = crashed / f"{vm}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
        dest.mkdir(parents=True, exist_ok=True)
        for log in self._vm_dir(vm).glob("*.log"):
            shutil.copy2(log, dest / log.name)
        for old in sorted(crashed.iterdir(), key=lambda p: p.stat().st_mtime)[:-CRASHED_KEPT]:
            shutil.rmtree(old, ignore_errors=True)

    def _stop_instance(self, vm: str, host: Host) -> None:
        """Quit one QEMU process of the VM (SIGKILL if QMP fails) and remove its traces."""
        instance = self._instance(vm, host.name)
        pid = instance.pid()
        if _alive(pid):
            with contextlib.suppress(Exception):
                asyncio.run(asyncio.wait_for(_quit(instance.qmp), timeout=5))
            if not _wait_gone(pid, 5) and pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _wait_gone(pid, 5)
        instance.remove_files()
        for controller in VM_CONTROLLERS:
            cgroups.remove(host.cgroup(controller) / vm)

    def _qemu_argv(self, spec: VMSpec, host: Host, instance: _Instance, incoming: bool,
                   paused: bool = False) -> list[str]:
        argv = [
            QEMU,
            "-name", f"{spec.name},debug-threads=on",
            "-machine", f"pc,accel={self.accel}",
            "-m", f"{spec.memory_mb * 1024 + self.ram_pad_kib}k",
            "-smp", str(spec.vcpus),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(self.image_dir / "vmlinux"),
            "-initrd", str(self.image_dir / "initramfs.cpio"),
            "-append", "console=ttyS0 quiet panic=-1",
            "-chardev", (f"socket,id=console,path={instance.serial},server=on,wait=off,"
                        f"logfile={instance.console_log},logappend=on"),
            "-serial", "chardev:console",
            "-qmp", f"unix:{instance.qmp},server=on,wait=off",
            "-drive", f"file={spec.disk},format=qcow2,if=none,id=disk0",
            "-device", "virtio-blk-pci,drive=disk0",
            "-pidfile", str(instance.pidfile),
        ]
        if incoming:
            argv += ["-incoming", "defer"]
        if paused:  # stays paused after an incoming migration until `cont`
            argv += ["-S"]
        if host.netns is not None:
            argv = ["ip", "netns", "exec", host.netns, *argv]
        return argv

    def _launch(self, spec: VMSpec, host: Host, instance: _Instance, incoming: bool,
                paused: bool = False) -> None:
        """Start QEMU on the PM: in its cgroups first, then in its namespace (see module doc).

        QEMU stays this process's child (no -daemonize, whose double fork leaves the process
        to whichever ancestor reaps orphans: an unreaped zombie keeps its cgroups busy), in a
        session of its own so that it outlives a terminal or a test run's process group.
        """
        for controller in ("cpu", "cpuacct"):
            if not host.cgroup(controller).is_dir():
                raise QemuError(f"PM {host.name}: cgroup {host.cgroup(controller)} does not exist")
        procs = [host.cgroup(c) / "cgroup.procs" for c in cgroups.CONTROLLERS if host.cgroup(c).is_dir()]
        self._reap()
        instance.remove_files()
        with instance.log.open("w") as log:
            process = subprocess.Popen(
                [*cgroups.join_then_exec(procs), *self._qemu_argv(spec, host, instance, incoming, paused)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        with self._children_lock:
            self._children.append(process)
        self._start_reaper()
        deadline = time.monotonic() + 30
        while not (instance.qmp.exists() and instance.pidfile.exists()):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                process.wait()
                raise QemuError(f"VM {spec.name}: QEMU did not start on {host.name}: "
                                f"{instance.log.read_text().strip()}")
            time.sleep(0.01)

    def _reap(self) -> None:
        """Collect the exit status of QEMU processes this driver started and another process
        (a Local Controller, a test) stopped, so that none lingers as a zombie."""
        with self._children_lock:
            self._children = [child for child in self._children if child.poll() is None]

    def _start_reaper(self) -> None:
        """Reap in the background too: a Local Controller starts a VM's QEMU at a migration's
        destination and may not call its driver again for hours, while the runner destroys
        that VM at the end of the run (zombies of its QEMUs piled up under the LCs)."""

        def reap_forever() -> None:
            while True:
                time.sleep(REAP_PERIOD_S)
                self._reap()

        with self._children_lock:
            if self._reaper is None:
                self._reaper = threading.Thread(target=reap_forever, name="qemu-reaper", daemon=True)
                self._reaper.start()

    async def _confine_vcpus(self, spec: VMSpec, host: Host, instance: _Instance) -> None:
        """Move the vCPU threads into the VM's cgroup, capped at vcpus/cores of the PM."""
        async with _qmp(instance.qmp) as qmp:
            cpus = await qmp.execute("query-cpus-fast")
        for controller in VM_CONTROLLERS:
            group = cgroups.create(host.cgroup(controller) / spec.name)
            if controller == "cpu":
                cgroups.set_quota(group, spec.vcpus / host.cores * host.capacity)
            for cpu in cpus:
                (group / "tasks").write_text(str(cpu["thread-id"]))

    # --- the workload channel ----------------------------------------------------------------

    def _console(self, vm: str) -> _Console:
        """The VM's console, connected to the QEMU process where the VM runs now."""
        console = self._consoles.get(vm)
        if console is None:
            _, host = self._load(vm)
            console = _Console(vm, self._vm_dir(vm))
            console.attach(self._instance(vm, host).serial)
            self._consoles[vm] = console
        return console

    def _wait_ready(self, console: _Console, timeout_s: float | None = None, booting: bool = True) -> None:
        """Wait for a booting guest (listen first) or one restored from its boot snapshot,
        which already serves (ask at once)."""
        timeout_s = timeout_s or self.boot_timeout_s
        console.wait_ready(timeout_s, min(READY_LISTEN_S, timeout_s / 2) if booting else 0.0)

    def reboots(self, vm: str) -> int:
        """Times the guest booted again after its first boot (a restarted VM is not a migrated one)."""
        return max(0, self._console(vm).ready_lines - 1)

    # --- migration ---------------------------------------------------------------------------

    def migrate(self, vm: str, destination: str, mode: MigrationMode, *,
                compression: str | None = None, verify_memory: bool = False) -> MigrationRecord:
        """Migrate in `mode`; `compression` ("zstd" or "zlib") sends the memory over QEMU's
        multifd channels compressed (not with post-copy, which QEMU 7.2 cannot combine).
        `verify_memory` compares both sides' RAM page by page before the destination runs
        (testbed.drivers.qemu_memcheck; the VM stays paused meanwhile, so its downtime grows by
        the `verify_s` phase) and reports it in the record's details (`ram_check`)."""
        mode = MigrationMode(mode)
        spec, source = self._load(vm)
        if destination == source:
            raise QemuError(f"VM {vm} already runs on {destination}")
        if compression not in (None, "zstd", "zlib"):
            raise QemuError(f"compression {compression!r}: QEMU offers zstd or zlib")
        if compression and mode is MigrationMode.POSTCOPY:
            raise QemuError("compression: QEMU 7.2 cannot combine multifd compression with post-copy")
        if verify_memory and mode is MigrationMode.POSTCOPY:
            raise QemuError("verify_memory: in post-copy the destination runs before it holds every page")
        src_host, dst_host = self._host(source), self._host(destination)
        return asyncio.run(_Migration(self, spec, src_host, dst_host, mode, compression, verify_memory).run())

    def _adopt(self, spec: VMSpec, source: Host, destination: Host) -> None:
        """After a migration: the destination is the VM's home; the source process goes."""
        self._save(spec, destination.name)
        console = self._consoles.get(spec.name)
        if console is not None:
            console.detach(self._instance(spec.name, source.name).serial)
        self._stop_instance(spec.name, source)

    def _abandon(self, spec: VMSpec, destination: Host) -> None:
        """After a failed migration: remove the destination's process and traces."""
        console = self._consoles.get(spec.name)
        if console is not None:
            console.detach(self._instance(spec.name, destination.name).serial)
        self._stop_instance(spec.name, destination)


class _Failed(Exception):
    """A migration QEMU ended without success; carries QEMU's last `query-migrate`."""

    def __init__(self, reason: str, info: dict) -> None:
        super().__init__(reason)
        self.info = info


class _Migration:
    """One migration, step by step; every failure ends in `_fail` with the VM on the source."""

    def __init__(self, driver: QemuDriver, spec: VMSpec, source: Host, destination: Host,
                 mode: MigrationMode, compression: str | None, verify_memory: bool = False) -> None:
        self.driver = driver
        self.compression = compression
        self.verify_memory = verify_memory
        self.ram_check: RamComparison | None = None
        self.spec = spec
        self.source = source
        self.destination = destination
        self.mode = mode
        self.src = driver._instance(spec.name, source.name)
        self.dst = driver._instance(spec.name, destination.name)
        self.start = time.time()
        self.phases: dict[str, float] = {}
        self.wire_bytes: int | None = None
        self.stopped_source = False

    async def run(self) -> MigrationRecord:
        try:
            return await asyncio.wait_for(self._migrate(), timeout=self.driver.migration_timeout_s)
        except _Failed as failed:
            return await self._fail(str(failed), failed.info)
        except TimeoutError:
            return await self._fail(f"timed out after {self.driver.migration_timeout_s:.0f} s", {})
        except Exception as err:  # noqa: BLE001 - every failure becomes a failed record
            return await self._fail(str(err) or type(err).__name__, {})

    async def _migrate(self) -> MigrationRecord:
        postcopy = self.mode is MigrationMode.POSTCOPY
        t = time.time()
        self.driver._launch(self.spec, self.destination, self.dst, incoming=True, paused=self.verify_memory)
        await self.driver._confine_vcpus(self.spec, self.destination, self.dst)
        console = self.driver._consoles.get(self.spec.name)
        if console is not None:  # this process holds the console: follow the VM at once
            console.attach(self.dst.serial)
        async with _qmp(self.src.qmp) as src, _qmp(self.dst.qmp) as dst:
            src_events = _listen(src, "STOP")
            dst_events = _listen(dst, "RESUME")
            capabilities = {"capabilities": [
                {"capability": "postcopy-ram", "state": postcopy},
                {"capability": "multifd", "state": self.compression is not None},
            ]}
            compression = {"multifd-compression": self.compression or "none"}
            for side in (dst, src):
                await side.execute("migrate-set-capabilities", capabilities)
                await side.execute("migrate-set-parameters", compression)
            await dst.execute("migrate-incoming", {"uri": f"tcp:{self.destination.address}:0"})
            port = await _incoming_port(dst)
            await src.execute("migrate-set-parameters", {"max-bandwidth": UNCAPPED_BYTES_PER_S})
            self.phases["prepare_s"] = time.time() - t

            # The migration proper starts here, with the source's first step (a `stop` in
            # stop-and-copy), so that total time and downtime share one origin.
            sent_before = _tx_bytes(self.source)
            self.start = t = time.time()
            if self.mode is MigrationMode.STOPCOPY:
                await src.execute("stop")
                self.stopped_source = True
            await src.execute("migrate", {"uri": f"tcp:{self.destination.address}:{port}"})
            if postcopy:
                await src.execute("migrate-start-postcopy")
            info = await _wait_migration(src, bounded=self.mode is MigrationMode.PRECOPY)
            self.phases["transfer_s"] = time.time() - t
            self.wire_bytes = _tx_bytes(self.source) - sent_before
            if info["status"] != "completed":
                raise _Failed(info.get("error-desc", f"migration {info['status']}"), info)

            t = time.time()
            await _wait_left_inmigrate(dst)
            if self.verify_memory:
                verified = time.time()
                self.ram_check = await compare_ram(src, dst, self.dst.vm_dir)
                self.phases["verify_s"] = time.time() - verified
            if self.mode is MigrationMode.STOPCOPY or self.verify_memory:
                await dst.execute("cont")
            resumed = await _event_time(dst_events, timeout_s=30)
            running = time.time()
            self.phases["resume_s"] = running - t
            stopped = _first_time(src_events)
        return self._record("completed", info, running, stopped, resumed, error=await self._adopt())

    async def _adopt(self) -> str | None:
        """Make the destination the VM's home; a failure to clean the source up is reported
        in the record, never turned into a failed migration (the VM runs at the destination)."""
        try:
            await asyncio.to_thread(self.driver._adopt, self.spec, self.source, self.destination)
        except (QemuError, OSError) as err:
            return f"migrated, but cleaning up the source failed: {err}"
        return None

    def _record(self, status: str, info: dict, end: float, stopped: float | None,
                resumed: float | None, error: str | None = None) -> MigrationRecord:
        ram = info.get("ram", {})
        downtime = None if stopped is None or resumed is None else max(0.0, resumed - stopped)
        return MigrationRecord(
            vm=self.spec.name,
            source=self.source.name,
            destination=self.destination.name,
            mode=self.mode,
            start=self.start,
            status=status,
            total_time_s=end - self.start,
            downtime_s=downtime,
            bytes=int(ram.get("transferred", 0)),
            rounds=int(ram.get("dirty-sync-count", 0)),
            phases=dict(self.phases),
            error=error,
            details={
                "qemu_total_time_ms": info.get("total-time"),
                "qemu_downtime_ms": info.get("downtime"),
                "qemu_setup_time_ms": info.get("setup-time"),
                "ram_total_bytes": ram.get("total"),
                "ram_normal_pages": ram.get("normal"),
                "ram_zero_pages": ram.get("duplicate"),
                "precopy_bytes": ram.get("precopy-bytes"),
                "downtime_bytes": ram.get("downtime-bytes"),
                "postcopy_bytes": ram.get("postcopy-bytes"),
                "postcopy_requests": ram.get("postcopy-requests"),
                "memory_mb": self.spec.memory_mb,
                "compression": self.compression,
                # What the source PM's lab interface sent meanwhile (all its traffic): with
                # compression the only measure of the wire, as QEMU counts payload bytes.
                "wire_bytes": self.wire_bytes,
                "precopy_bounded": info.get("precopy_bounded", False),
                **({"ram_check": self.ram_check.as_dict()} if self.ram_check else {}),
            },
        )

    async def _fail(self, reason: str, info: dict) -> MigrationRecord:
        """Leave the VM running on the source and nothing on the destination.

        Called with no QMP session open: QEMU's monitor serves one client at a time. If the
        source had already completed the migration, the VM lives at the destination: it stays
        there (a source resumed now would run a stale copy beside it).
        """
        moved = False
        with contextlib.suppress(Exception):
            async with _qmp(self.src.qmp) as src:
                status = (await src.execute("query-migrate")).get("status")
                moved = status == "completed" and self.dst.alive()
                if status in ("setup", "active", "pre-switchover", "device"):
                    await src.execute("migrate_cancel")
                    await _wait_migration(src)
                if not moved and (self.stopped_source
                                  or (await src.execute("query-status"))["status"] != "running"):
                    await src.execute("cont")
        if moved:
            return await self._keep_destination(reason, info)
        try:
            await asyncio.to_thread(self.driver._abandon, self.spec, self.destination)
        except (QemuError, OSError) as err:
            reason = f"{reason}; cleaning up the destination: {err}"
        return self._record("failed", info, time.time(), None, None, error=reason)

    async def _keep_destination(self, reason: str, info: dict) -> MigrationRecord:
        with contextlib.suppress(Exception):
            async with _qmp(self.dst.qmp) as dst:
                if (await dst.execute("query-status"))["status"] != "running":
                    await dst.execute("cont")
        cleanup = await self._adopt()
        error = f"completed, but {reason}" + (f"; {cleanup}" if cleanup else "")
        return self._record("completed", info, time.time(), None, None, error=error)


def _probed_accel(image_dir: Path) -> str:
    """The accelerator the qemu role's probe found to boot a guest here (KVM can hang)."""
    try:
        return (image_dir / "accel").read_text().strip() or "tcg"
    except FileNotFoundError:
        return "tcg"


# --- QMP helpers ------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def _qmp(path: Path) -> AsyncIterator[QMPClient]:
    client = QMPClient(path.parent.name)
    for attempt in range(100):  # QEMU binds the socket (the file appears) just before it listens
        try:
            await client.connect(str(path))
            break
        except ConnectError as err:
            if not isinstance(err.exc, ConnectionRefusedError) or attempt == 99:
                raise
            await asyncio.sleep(0.02)
    try:
        yield client
    finally:
        with contextlib.suppress(EOFError, ConnectionError):
            await client.disconnect()


async def _quit(path: Path) -> None:
    async with _qmp(path) as qmp:
        with contextlib.suppress(EOFError, ConnectionError):
            await qmp.execute("quit")


def _listen(client: QMPClient, name: str) -> EventListener:
    listener = EventListener(name)
    client.register_listener(listener)
    return listener


def _first_time(listener: EventListener) -> float | None:
    events = listener.clear()
    return _stamp(events[0]) if events else None


async def _event_time(listener: EventListener, timeout_s: float) -> float | None:
    try:
        return _stamp(await asyncio.wait_for(listener.get(), timeout=timeout_s))
    except TimeoutError:
        return None


def _stamp(event: dict) -> float:
    """QEMU's own host-clock time of an event (when it happened, not when we read it)."""
    return event["timestamp"]["seconds"] + event["timestamp"]["microseconds"] / 1e6


async def _incoming_port(dst: QMPClient) -> int:
    """The port the destination listens on (port 0 asked the kernel to pick a free one)."""
    for _ in range(100):
        info = await dst.execute("query-migrate")
        for address in info.get("socket-address", []):
            if address.get("type") == "inet":
                return int(address["port"])
        await asyncio.sleep(0.02)
    raise QemuError("destination QEMU reported no listening port")


async def _wait_migration(src: QMPClient, bounded: bool = False) -> dict:
    """Poll the source until the migration ends; returns its last `query-migrate`, with
    `precopy_bounded` True when `bounded` (pre-copy) and Xen's bounds ended the pre-copy."""
    forced = False
    while True:
        info = await src.execute("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info | {"precopy_bounded": forced}
        if bounded and not forced and past_xen_bounds(info.get("ram", {})):
            await src.execute("migrate-set-parameters", {"downtime-limit": MAX_DOWNTIME_LIMIT_MS})
            forced = True
        await asyncio.sleep(0.02)


def past_xen_bounds(ram: dict) -> bool:
    """Whether a pre-copy's `query-migrate` RAM counters are past Xen 3.2's bounds."""
    total = ram.get("total") or 0
    return (ram.get("dirty-sync-count", 0) > XEN_MAX_ROUNDS
            or (total > 0 and ram.get("transferred", 0) >= XEN_MAX_FACTOR * total))


async def _wait_left_inmigrate(dst: QMPClient) -> None:
    while (await dst.execute("query-status"))["status"] == "inmigrate":
        await asyncio.sleep(0.01)


# --- processes and links ---------------------------------------------------------------------

def _wait_gone(pid: int | None, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while pid is not None:
        with contextlib.suppress(ChildProcessError):  # reap it if it was ever our child
            os.waitpid(pid, os.WNOHANG)
        if not _alive(pid):
            break
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _tx_bytes(host: Host) -> int:
    """Bytes sent so far by the PM's interface that holds its lab address."""
    prefix = ["ip", "-n", host.netns] if host.netns else ["ip"]
    owner = json.loads(subprocess.run([*prefix, "-j", "addr", "show", "to", host.address],
                                      capture_output=True, text=True, check=True).stdout)
    if not owner:
        raise QemuError(f"PM {host.name}: no interface holds {host.address}")
    link = json.loads(subprocess.run([*prefix, "-j", "-s", "link", "show", "dev", owner[0]["ifname"]],
                                     capture_output=True, text=True, check=True).stdout)
    return int(link[0]["stats64"]["tx"]["bytes"])

